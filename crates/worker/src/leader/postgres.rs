//! The `postgres` backend: a lease row taken and renewed by conditional
//! upserts. Works without Kubernetes and behind PgBouncer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::election::{LeaseLock, LockError};

/// A PostgreSQL lease.
pub struct PgLease {
    store: Store,
    name: String,
    identity: String,
    duration: Duration,
    freed: Arc<Notify>,
}

impl PgLease {
    /// Lease `name` held as `identity` for `duration` per renewal. Listens
    /// for resignations until `shutdown`, so candidates take over at once.
    pub fn new(
        store: Store,
        name: &str,
        identity: &str,
        duration: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let freed = Arc::new(Notify::new());
        tokio::spawn(crate::wakeup::listen(
            store.pool().clone(),
            store::LEADER_CHANNEL,
            vec![freed.clone()],
            shutdown,
        ));
        Self {
            store,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            freed,
        }
    }
}

#[async_trait]
impl LeaseLock for PgLease {
    async fn try_acquire_or_renew(&self, leading: bool) -> Result<bool, LockError> {
        self.store
            .try_acquire_lease(&self.name, &self.identity, self.duration, leading)
            .await
            .map(|held| held.is_some())
            .map_err(|e| LockError(e.to_string()))
    }

    async fn release(&self) -> Result<(), LockError> {
        self.store
            .release_lease(&self.name, &self.identity)
            .await
            .map(drop)
            .map_err(|e| LockError(e.to_string()))
    }

    fn freed(&self) -> Option<Arc<Notify>> {
        Some(self.freed.clone())
    }
}
