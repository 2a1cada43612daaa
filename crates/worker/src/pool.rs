//! A worker pool: runs jobs with at most `size` of them at a time, and shuts
//! down by refusing new jobs and waiting for the running ones.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

/// The pool no longer takes jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the worker pool is shut down")]
pub struct PoolClosed;

/// A bounded pool of workers; cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    size: usize,
}

impl WorkerPool {
    /// A pool of `size` workers (at least one).
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Self {
            permits: Arc::new(Semaphore::new(size)),
            tracker: TaskTracker::new(),
            size,
        }
    }

    /// Runs `job` on a worker as soon as one is free, and returns its output.
    /// The job runs on its own task, so it finishes even if the caller stops
    /// waiting.
    pub async fn run<F>(&self, job: F) -> Result<F::Output, PoolClosed>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PoolClosed)?;
        let handle = self.tracker.spawn(async move {
            let out = job.await;
            drop(permit);
            out
        });
        match handle.await {
            Ok(out) => Ok(out),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(PoolClosed),
        }
    }

    /// Workers in all.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Workers running a job now.
    pub fn busy(&self) -> usize {
        self.size - self.permits.available_permits()
    }

    /// Refuses new jobs and waits until the running ones are done.
    pub async fn shutdown(&self) {
        self.permits.close();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn never_runs_more_jobs_than_its_size() {
        let pool = WorkerPool::new(3);
        let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

        let runs = (0..20).map(|_| {
            let (pool, now, max) = (pool.clone(), now.clone(), max.clone());
            async move {
                pool.run(async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }
        });
        let results = futures::future::join_all(runs).await;

        assert!(results.iter().all(Result::is_ok));
        assert_eq!(max.load(Ordering::SeqCst), 3);
        assert_eq!(pool.busy(), 0);
    }

    #[tokio::test]
    async fn shutdown_waits_for_running_jobs_and_then_refuses_new_ones() {
        let pool = WorkerPool::new(2);
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        let p = pool.clone();
        let running = tokio::spawn(async move {
            p.run(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                f.store(true, Ordering::SeqCst);
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.busy(), 1);

        pool.shutdown().await;

        assert!(
            finished.load(Ordering::SeqCst),
            "shutdown returned before the job ended"
        );
        assert_eq!(running.await.unwrap(), Ok(()));
        assert_eq!(pool.run(async {}).await, Err(PoolClosed));
    }
}
