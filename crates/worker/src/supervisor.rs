//! The supervisor of a process's long-running tasks. Such a task runs until
//! shutdown; one that ends before (an error, a panic, or a plain return)
//! leaves a half-alive process, so the supervisor logs its cause chain and
//! shuts the whole process down, and [`Supervisor::wait`] reports it so the
//! binary exits non-zero and the orchestrator restarts it.

use std::error::Error;
use std::fmt::Write as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A long-running task ended before shutdown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {task} stopped before shutdown: {cause}")]
pub struct TaskDied {
    /// The task's name.
    pub task: &'static str,
    /// Why, with every cause.
    pub cause: String,
}

/// Spawns and watches long-running tasks; cheap to clone.
#[derive(Clone, Debug)]
pub struct Supervisor {
    shutdown: CancellationToken,
    tasks: TaskTracker,
    first_death: Arc<Mutex<Option<TaskDied>>>,
}

impl Supervisor {
    /// A supervisor whose tasks run until `shutdown` fires, and which fires
    /// it itself when one of them dies.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            tasks: TaskTracker::new(),
            first_death: Arc::default(),
        }
    }

    /// The token every supervised task must stop on.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs `task` until it ends. Ending before shutdown, in any way, stops
    /// the process.
    pub fn spawn<F, E>(&self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<Box<dyn Error + Send + Sync>>,
    {
        let this = self.clone();
        self.tasks.spawn(async move {
            let ended = AssertUnwindSafe(task).catch_unwind().await;
            let cause = match ended {
                Ok(Ok(())) if this.shutdown.is_cancelled() => return,
                Ok(Ok(())) => "it returned".to_owned(),
                Ok(Err(e)) => causes(e.into().as_ref()),
                Err(panic) => format!("it panicked: {}", panic_message(panic.as_ref())),
            };
            this.died(TaskDied { task: name, cause });
        });
    }

    fn died(&self, death: TaskDied) {
        tracing::error!(task = death.task, cause = %death.cause, "a long-running task stopped; shutting the process down");
        self.first_death
            .lock()
            .expect("not poisoned")
            .get_or_insert(death);
        self.shutdown.cancel();
    }

    /// Waits for shutdown and for every task to end. An error names the
    /// first task that died early, which caused the shutdown.
    pub async fn wait(&self) -> Result<(), TaskDied> {
        self.shutdown.cancelled().await;
        self.tasks.close();
        self.tasks.wait().await;
        match self.first_death.lock().expect("not poisoned").take() {
            Some(death) => Err(death),
            None => Ok(()),
        }
    }
}

/// An error and every cause under it, `outer: inner: root`.
pub fn causes(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-text payload")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, thiserror::Error)]
    #[error("listener failed")]
    struct Outer(#[source] std::io::Error);

    async fn forever(shutdown: CancellationToken) -> Result<(), Outer> {
        shutdown.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_task_that_fails_early_stops_the_process_with_its_cause_chain() {
        let supervisor = Supervisor::new(CancellationToken::new());
        supervisor.spawn("deliver", forever(supervisor.shutdown().clone()));
        supervisor.spawn("listen", async {
            Err(Outer(std::io::Error::other("connection reset")))
        });

        let died = tokio::time::timeout(Duration::from_secs(5), supervisor.wait())
            .await
            .expect("the process stops by itself")
            .unwrap_err();

        assert_eq!(died.task, "listen");
        assert_eq!(died.cause, "listener failed: connection reset");
        assert!(supervisor.shutdown().is_cancelled());
    }

    #[tokio::test]
    async fn a_task_that_returns_or_panics_early_stops_the_process_too() {
        for (name, task) in [
            ("returns", async { Ok::<(), Outer>(()) }.boxed()),
            ("panics", async { panic!("lost the lease twice") }.boxed()),
        ] {
            let supervisor = Supervisor::new(CancellationToken::new());
            supervisor.spawn("steady", forever(supervisor.shutdown().clone()));
            supervisor.spawn(name, task);
            let died = supervisor.wait().await.unwrap_err();
            assert_eq!(died.task, name);
            assert!(
                died.cause.contains(if name == "panics" {
                    "it panicked: lost the lease twice"
                } else {
                    "it returned"
                }),
                "{died}"
            );
        }
    }

    #[tokio::test]
    async fn a_requested_shutdown_is_clean() {
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::new(shutdown.clone());
        for _ in 0..3 {
            supervisor.spawn("steady", forever(shutdown.clone()));
        }
        shutdown.cancel();
        assert_eq!(supervisor.wait().await, Ok(()));
    }
}
