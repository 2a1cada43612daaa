//! Leader election. Every relay claims tasks, but only the leader runs the
//! maintenance ticks. Three backends sit behind [`Leader`]: a Kubernetes
//! Lease ([`KubeLease`]), a PostgreSQL lease row ([`PgLease`]) and
//! [`AlwaysLeader`] for a single process.

mod election;
mod kube;
mod postgres;

use tokio::sync::watch;

pub use self::kube::KubeLease;
pub use election::{ElectionConfig, Elector, LeaseLock, LockError};
pub use postgres::PgLease;

/// Whether this process leads. The seam the cron and the health check use.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait Leader: Send + Sync {
    /// Leadership changes: `true` while this process leads.
    fn subscribe(&self) -> watch::Receiver<bool>;

    /// Whether this process leads now.
    fn is_leader(&self) -> bool;

    /// False when this process believes it leads but has not renewed its
    /// lease for a whole lease duration: the election is stuck, and the
    /// process should be restarted.
    fn healthy(&self) -> bool;
}

/// The `none` backend: always the leader, for a single process.
#[derive(Debug)]
pub struct AlwaysLeader(watch::Sender<bool>);

impl Default for AlwaysLeader {
    fn default() -> Self {
        Self(watch::Sender::new(true))
    }
}

impl Leader for AlwaysLeader {
    fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    fn is_leader(&self) -> bool {
        true
    }

    fn healthy(&self) -> bool {
        true
    }
}
