//! The cron: runs named jobs periodically, and early when woken. The task
//! service only sees the [`Cron`] trait; [`PoolCron`] runs the jobs on a
//! [`WorkerPool`].

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::leader::Leader;
use crate::pool::WorkerPool;
use crate::supervisor::Supervisor;

/// What a job run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// It did a full share of work; more is probably waiting, so run again now.
    MoreWork,
    /// Nothing (or little) was left; wait for the next tick or wake-up.
    Idle,
}

/// Why a job run failed; logged with its causes, and the job runs again at
/// its next tick.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// One run of a job. It receives a token that is cancelled on shutdown.
pub type JobFn =
    Arc<dyn Fn(CancellationToken) -> BoxFuture<'static, Result<Progress, JobError>> + Send + Sync>;

/// Where a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// On every relay (the claim loop).
    EveryPod,
    /// Only on the elected leader; cancelled the moment it steps down.
    Leader,
}

/// A named periodic job.
#[derive(Clone)]
pub struct Job {
    /// Name, for logs and metrics.
    pub name: &'static str,
    /// Where it runs.
    pub scope: Scope,
    /// Longest wait between runs when idle.
    pub every: Duration,
    /// How many runs of this job may overlap.
    pub parallelism: usize,
    /// Runs the job early when notified.
    pub wake: Option<Arc<Notify>>,
    /// The work.
    pub run: JobFn,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("every", &self.every)
            .field("parallelism", &self.parallelism)
            .finish_non_exhaustive()
    }
}

/// Schedules jobs. Injected into the task service, which does not know how
/// (or where) its jobs run.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait Cron: Send + Sync {
    /// Starts running `job` until shutdown.
    fn schedule(&self, job: Job);
}

/// Called with a job's name after each successful run.
pub type TickObserver = Arc<dyn Fn(&'static str) + Send + Sync>;

/// A [`Cron`] whose job runs execute on a [`WorkerPool`], and whose
/// leader-only jobs follow the [`Leader`].
#[derive(Clone)]
pub struct PoolCron {
    pool: WorkerPool,
    supervisor: Supervisor,
    leader: Arc<dyn Leader>,
    ticks: Option<TickObserver>,
}

impl PoolCron {
    /// A cron over `pool` whose schedulers run under `supervisor`, so one
    /// that dies (a job panicked) stops the process, and which stop
    /// scheduling on its shutdown.
    pub fn new(pool: WorkerPool, supervisor: Supervisor, leader: Arc<dyn Leader>) -> Self {
        Self {
            pool,
            supervisor,
            leader,
            ticks: None,
        }
    }

    /// Reports each successful run, e.g. to the metrics.
    pub fn on_success(mut self, observer: TickObserver) -> Self {
        self.ticks = Some(observer);
        self
    }
}

impl Cron for PoolCron {
    fn schedule(&self, job: Job) {
        for _ in 0..job.parallelism.max(1) {
            let (pool, cancel, ticks) = (
                self.pool.clone(),
                self.supervisor.shutdown().clone(),
                self.ticks.clone(),
            );
            let (name, job) = (job.name, job.clone());
            let leading = self.leader.subscribe();
            self.supervisor.spawn(name, async move {
                match job.scope {
                    Scope::EveryPod => lane(job, pool, cancel, ticks).await,
                    Scope::Leader => leader_lane(job, pool, cancel, ticks, leading).await,
                }
                Ok::<(), std::convert::Infallible>(())
            });
        }
    }
}

/// Runs a lane only while this process leads: it starts when leadership is
/// won and is cancelled as soon as it is lost.
async fn leader_lane(
    job: Job,
    pool: WorkerPool,
    cancel: CancellationToken,
    ticks: Option<TickObserver>,
    mut leading: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        while !*leading.borrow_and_update() {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
            }
        }
        let term = cancel.child_token();
        let run = lane(job.clone(), pool.clone(), term.clone(), ticks.clone());
        tokio::pin!(run);
        let mut watch = leading.clone();
        tokio::select! {
            () = &mut run => {}
            () = async {
                while *watch.borrow_and_update() {
                    if watch.changed().await.is_err() {
                        return;
                    }
                }
            } => {
                term.cancel();
                run.await;
            }
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}

/// One lane of a job: waits for a tick or a wake-up, runs the job on the
/// pool, and runs again at once while it reports more work.
async fn lane(job: Job, pool: WorkerPool, cancel: CancellationToken, ticks: Option<TickObserver>) {
    let never = Notify::new();
    let wake = job.wake.as_deref().unwrap_or(&never);
    let mut again = true;
    loop {
        if !again {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(job.every) => {}
                () = wake.notified() => {}
            }
        }
        if cancel.is_cancelled() {
            return;
        }
        let result = pool.run((job.run)(cancel.clone())).await;
        if let (Ok(Ok(_)), Some(ticked)) = (&result, &ticks) {
            ticked(job.name);
        }
        match result {
            Ok(Ok(Progress::MoreWork)) => {
                again = true;
                // Bring a sibling lane in while the backlog lasts.
                if job.parallelism > 1 {
                    wake.notify_one();
                }
            }
            Ok(Ok(Progress::Idle)) => again = false,
            Ok(Err(e)) => {
                tracing::warn!(job = job.name, error = %crate::causes(e.as_ref()), "job run failed");
                again = false;
            }
            Err(_closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting_job(runs: Arc<AtomicUsize>, more_until: usize, wake: Option<Arc<Notify>>) -> Job {
        Job {
            name: "count",
            scope: Scope::EveryPod,
            every: Duration::from_secs(3600),
            parallelism: 1,
            wake,
            run: Arc::new(move |_| {
                let runs = runs.clone();
                Box::pin(async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok(if n < more_until {
                        Progress::MoreWork
                    } else {
                        Progress::Idle
                    })
                })
            }),
        }
    }

    fn always() -> Arc<dyn Leader> {
        Arc::new(crate::leader::AlwaysLeader::default())
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn a_job_runs_at_once_and_again_while_it_reports_more_work() {
        let cancel = CancellationToken::new();
        let cron = PoolCron::new(
            WorkerPool::new(2),
            Supervisor::new(cancel.clone()),
            always(),
        );
        let runs = Arc::new(AtomicUsize::new(0));

        cron.schedule(counting_job(runs.clone(), 5, None));
        settle().await;

        assert_eq!(runs.load(Ordering::SeqCst), 5, "4 x more work, then idle");
        cancel.cancel();
        cron.supervisor.wait().await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_job_runs_again_when_woken() {
        let cancel = CancellationToken::new();
        let cron = PoolCron::new(
            WorkerPool::new(1),
            Supervisor::new(cancel.clone()),
            always(),
        );
        let (runs, wake) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        cron.schedule(counting_job(runs.clone(), 0, Some(wake.clone())));
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        wake.notify_one();
        settle().await;

        assert_eq!(runs.load(Ordering::SeqCst), 2);
        cancel.cancel();
        cron.supervisor.wait().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_job_runs_again_on_its_tick() {
        let cancel = CancellationToken::new();
        let cron = PoolCron::new(
            WorkerPool::new(1),
            Supervisor::new(cancel.clone()),
            always(),
        );
        let runs = Arc::new(AtomicUsize::new(0));
        let mut job = counting_job(runs.clone(), 0, None);
        job.every = Duration::from_secs(10);
        cron.schedule(job);

        tokio::time::sleep(Duration::from_secs(35)).await;

        assert_eq!(runs.load(Ordering::SeqCst), 4, "at 0, 10, 20 and 30 s");
        cancel.cancel();
        cron.supervisor.wait().await.unwrap();
    }

    /// A leader-only job runs while the mocked leader leads, stops when it
    /// steps down, and resumes when it leads again.
    #[tokio::test]
    async fn a_leader_only_job_runs_exactly_while_leading() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut leader = crate::leader::MockLeader::new();
        leader.expect_subscribe().returning(move || rx.clone());
        let cancel = CancellationToken::new();
        let cron = PoolCron::new(
            WorkerPool::new(2),
            Supervisor::new(cancel.clone()),
            Arc::new(leader),
        );
        let runs = Arc::new(AtomicUsize::new(0));
        let mut job = counting_job(runs.clone(), 0, None);
        job.scope = Scope::Leader;
        job.every = Duration::from_millis(20);
        cron.schedule(job);

        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 0, "not a leader yet");
        tx.send(true).unwrap();
        settle().await;
        let while_leading = runs.load(Ordering::SeqCst);
        assert!(
            while_leading >= 2,
            "ran {while_leading} times while leading"
        );
        tx.send(false).unwrap();
        settle().await;
        let after_step_down = runs.load(Ordering::SeqCst);
        settle().await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            after_step_down,
            "ran after stepping down"
        );
        tx.send(true).unwrap();
        settle().await;
        assert!(
            runs.load(Ordering::SeqCst) > after_step_down,
            "did not resume"
        );

        cancel.cancel();
        cron.supervisor.wait().await.unwrap();
    }

    #[tokio::test]
    async fn cancellation_stops_every_lane_and_no_run_starts_after_it() {
        let cancel = CancellationToken::new();
        let cron = PoolCron::new(
            WorkerPool::new(4),
            Supervisor::new(cancel.clone()),
            always(),
        );
        let runs = Arc::new(AtomicUsize::new(0));
        let mut job = counting_job(runs.clone(), usize::MAX, None);
        job.parallelism = 3;
        cron.schedule(job);
        settle().await;

        cancel.cancel();
        cron.supervisor.wait().await.unwrap();
        let after_stop = runs.load(Ordering::SeqCst);
        settle().await;

        assert!(after_stop > 0);
        assert_eq!(runs.load(Ordering::SeqCst), after_stop);
    }
}
