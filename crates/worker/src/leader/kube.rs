//! The `kube` backend: a `coordination.k8s.io/v1` Lease, read and written
//! with optimistic concurrency (`resourceVersion`), like client-go does.
//!
//! Written here rather than taken from kube-lease-manager: that crate's
//! `watch()` hides API errors and keeps reporting leadership while renewals
//! fail, so a leader cut off from the API server would go on leading after
//! its lease lapsed. This backend only answers one attempt at a time; the
//! [`Elector`](super::Elector) owns the deadline and steps down on time.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::time::Instant;

use super::election::{LeaseLock, LockError};

/// A Kubernetes Lease held under the pod's name.
pub struct KubeLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The last record seen and when: another holder's lease counts as
    /// expired once its record has not changed for a lease duration by our
    /// own clock, so clock skew between nodes does not matter.
    observed: Mutex<Option<(String, Instant)>>,
}

impl KubeLease {
    /// Lease `name` in `namespace`, held as `identity` for `duration`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: Mutex::new(None),
        }
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// When the current record was first seen.
    fn observe(&self, lease: &Lease) -> Instant {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let mut observed = self.observed.lock().expect("not poisoned");
        match &*observed {
            Some((seen, at)) if *seen == version => *at,
            _ => {
                let now = Instant::now();
                *observed = Some((version, now));
                now
            }
        }
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn lock_error(e: kube::Error) -> LockError {
    LockError(format!("Kubernetes API: {e}"))
}

#[async_trait]
impl LeaseLock for KubeLease {
    async fn try_acquire_or_renew(&self, leading: bool) -> Result<bool, LockError> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(lock_error)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.seconds()),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another candidate created it first.
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(lock_error(e)),
            };
        };
        let observed_at = self.observe(&lease);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        // Only a leader renews; a record naming us otherwise must expire
        // like anyone's.
        if holder.is_some() && !(mine && leading) {
            let theirs = spec.lease_duration_seconds.map_or(self.duration, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
            if observed_at.elapsed() < theirs {
                return Ok(false);
            }
        }
        let mut next = spec.clone();
        if !(mine && leading) {
            next.acquire_time = Some(now());
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        next.holder_identity = Some(self.identity.clone());
        next.lease_duration_seconds = Some(self.seconds());
        next.renew_time = Some(now());
        lease.spec = Some(next);
        // `replace` sends the resourceVersion we read: a concurrent writer
        // makes it fail with 409 instead of being overwritten.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(lock_error(e)),
        }
    }

    async fn release(&self) -> Result<(), LockError> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(lock_error)? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Someone took it meanwhile: it is not ours to release any more.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(lock_error(e)),
        }
    }
}
