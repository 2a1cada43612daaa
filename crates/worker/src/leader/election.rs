//! The election loop, shared by every lease backend, after client-go's
//! leaderelection: try to acquire or renew every retry period, and step down
//! the moment a renewal deadline passes without a successful renewal, even
//! while a request still hangs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Leader;

/// A lease backend could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LockError(pub String);

/// One lease, as a backend implements it.
#[async_trait]
pub trait LeaseLock: Send + Sync {
    /// Takes the lease if it is free or expired, or, while `leading`,
    /// renews it. A lease that names this process while it does not lead
    /// (it stepped down, or a write it gave up on committed anyway) counts
    /// as anyone's: renewing it would keep every other candidate out while
    /// nobody leads. `Ok(true)`: this process holds it now. `Ok(false)`:
    /// not.
    async fn try_acquire_or_renew(&self, leading: bool) -> Result<bool, LockError>;

    /// Gives the lease up if this process holds it, so a successor can take
    /// over at once.
    async fn release(&self) -> Result<(), LockError>;

    /// Notified when the lease may have become free (a leader resigned).
    fn freed(&self) -> Option<Arc<Notify>> {
        None
    }
}

/// Election timing, as client-go names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionConfig {
    /// How long a lease holds without renewal; followers wait this long
    /// before taking over.
    pub lease_duration: Duration,
    /// The leader steps down when it has not renewed for this long. Shorter
    /// than the lease duration, so it stops before anyone can take over.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// A running election: the [`Leader`] seen by the rest of the relay.
pub struct Elector {
    leading: watch::Sender<bool>,
    renewed_at: Mutex<Option<Instant>>,
    config: ElectionConfig,
}

impl Elector {
    /// Starts electing with `lock` until `shutdown`; on shutdown a leader
    /// steps down and releases the lease.
    pub fn start(
        lock: Arc<dyn LeaseLock>,
        config: ElectionConfig,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let elector = Arc::new(Self {
            leading: watch::Sender::new(false),
            renewed_at: Mutex::new(None),
            config,
        });
        let task = tokio::spawn(elector.clone().run(lock, shutdown));
        (elector, task)
    }

    async fn run(self: Arc<Self>, lock: Arc<dyn LeaseLock>, shutdown: CancellationToken) {
        let never = Arc::new(Notify::new());
        let freed = lock.freed().unwrap_or(never);
        let config = self.config;
        loop {
            // A leader's attempt may take what is left before its renew
            // deadline, not more: it must step down on time even while a
            // request hangs. Capping it at the retry period instead made a
            // leader behind a slow API server (2.5 s per answer) time out
            // every renewal and step down. A candidate's attempt gets a
            // whole renew deadline.
            let deadline = self.renewed_at().map(|t| t + config.renew_deadline);
            let budget = deadline.map_or(config.renew_deadline, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let leading = self.is_leader();
            let attempt = tokio::select! {
                () = shutdown.cancelled() => break,
                a = tokio::time::timeout(budget, lock.try_acquire_or_renew(leading)) => a,
            };
            match attempt {
                Ok(Ok(true)) => self.renewed(),
                Ok(Ok(false)) => self.step_down("another holder has the lease"),
                Ok(Err(e)) => tracing::warn!(error = %e, "lease request failed"),
                Err(_) => tracing::warn!(?budget, "lease request timed out"),
            }
            if self
                .renewed_at()
                .is_some_and(|t| Instant::now() >= t + config.renew_deadline)
            {
                self.step_down("renewal deadline passed");
            }
            let wait = self.renewed_at().map_or(config.retry_period, |t| {
                (t + config.renew_deadline)
                    .saturating_duration_since(Instant::now())
                    .min(config.retry_period)
            });
            let leading = self.is_leader();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
                () = freed.notified(), if !leading => {}
            }
        }
        if self.is_leader() {
            self.step_down("shutting down");
            match tokio::time::timeout(config.retry_period, lock.release()).await {
                Ok(Ok(())) => tracing::info!("released the lease"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not release the lease; it will expire")
                }
                Err(_) => tracing::warn!("releasing the lease timed out; it will expire"),
            }
        }
    }

    fn renewed_at(&self) -> Option<Instant> {
        *self.renewed_at.lock().expect("not poisoned")
    }

    fn renewed(&self) {
        *self.renewed_at.lock().expect("not poisoned") = Some(Instant::now());
        self.leading.send_if_modified(|leading| {
            let became = !*leading;
            if became {
                tracing::info!("became the leader");
            }
            *leading = true;
            became
        });
    }

    fn step_down(&self, why: &str) {
        *self.renewed_at.lock().expect("not poisoned") = None;
        self.leading.send_if_modified(|leading| {
            let was = *leading;
            if was {
                tracing::warn!(why, "stepped down as leader");
            }
            *leading = false;
            was
        });
    }
}

impl Leader for Elector {
    fn subscribe(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    fn healthy(&self) -> bool {
        !self.is_leader()
            || self
                .renewed_at()
                .is_some_and(|t| t.elapsed() <= self.config.lease_duration)
    }
}
