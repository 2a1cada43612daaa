//! The task service (`order_eno_1c`): claims outbox tasks, delivers them to
//! 1C and records each outcome. It registers its jobs with an injected
//! [`Cron`] and knows nothing of the pool that runs them.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use onec::{Delivery, Outcome};
use store::{ClaimSpec, ClaimedTask, Store, TaskId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::cron::{Cron, Job, Progress, Scope};
use crate::metrics::RelayMetrics;
use crate::protect::{Attempt, OnecGuard};

/// Task service settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// This relay's name in `claimed_by`, e.g. the pod name.
    pub relay_id: String,
    /// Most tasks claimed per query.
    pub batch_size: u32,
    /// How many claim-and-deliver runs may overlap.
    pub claim_lanes: usize,
    /// How long a claim holds before other relays may rescue it.
    pub lease: Duration,
    /// Attempts before a transiently failing task goes dead.
    pub max_attempts: i32,
    /// Retry delays.
    pub backoff: Backoff,
    /// Longest idle wait between claim runs, in case a wake-up was lost.
    pub poll_interval: Duration,
    /// How often the leader rescues expired claims.
    pub rescue_interval: Duration,
    /// How long done and superseded tasks are kept.
    pub retention: Duration,
    /// How long idempotency keys of creates are kept.
    pub idempotency_key_ttl: Duration,
    /// How often the leader deletes rows past retention.
    pub retention_interval: Duration,
    /// How often the leader recounts the backlog.
    pub backlog_interval: Duration,
    /// After an attempt with no answer, how long 1C may still apply it; no
    /// newer version of that order is sent before this passes.
    pub in_doubt: Duration,
}

/// What to do with a task after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Delivered: done.
    Complete,
    /// Transient failure: try again after this long.
    RetryAfter(Duration, String),
    /// Permanent failure or out of attempts: dead, with this reason.
    Dead(String),
}

/// The retry policy: transient failures back off (at least as long as 1C
/// asked) until `max_attempts`, permanent ones go dead at once.
pub fn decide(
    outcome: &Outcome,
    attempts: i32,
    max_attempts: i32,
    backoff_delay: Duration,
) -> Decision {
    let failure = match outcome {
        Outcome::Delivered(_) => return Decision::Complete,
        Outcome::Failed(f) => f,
    };
    if !failure.is_transient() {
        return Decision::Dead(format!("{} (permanent)", failure.detail));
    }
    if attempts >= max_attempts {
        return Decision::Dead(format!(
            "{} (gave up after {attempts} attempts)",
            failure.detail
        ));
    }
    let wait = failure
        .retry_after
        .map_or(backoff_delay, |asked| asked.max(backoff_delay));
    Decision::RetryAfter(wait, failure.detail.clone())
}

/// The task service.
pub struct TaskService {
    store: Store,
    onec: Arc<OnecGuard>,
    config: ServiceConfig,
    wake: Arc<Notify>,
    metrics: Arc<RelayMetrics>,
}

impl TaskService {
    /// A service over `store`, delivering through `onec`.
    pub fn new(
        store: Store,
        onec: Arc<OnecGuard>,
        config: ServiceConfig,
        metrics: Arc<RelayMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            onec,
            config,
            wake: Arc::new(Notify::new()),
            metrics,
        })
    }

    /// Notified when new tasks may be waiting (a save's NOTIFY).
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Registers the service's jobs: `deliver` on every relay (early on
    /// wake-ups), and on the leader only `rescue` (expired claims),
    /// `retention` (old finished rows) and `backlog` (the figures).
    pub fn register(self: &Arc<Self>, cron: &dyn Cron) {
        let c = &self.config;
        cron.schedule(self.job(
            "deliver",
            Scope::EveryPod,
            c.poll_interval,
            c.claim_lanes,
            Some(self.wake.clone()),
            |s, cancel| Box::pin(async move { s.claim_and_deliver(cancel).await }),
        ));
        cron.schedule(self.job(
            "rescue",
            Scope::Leader,
            c.rescue_interval,
            1,
            None,
            |s, _| Box::pin(async move { s.rescue_expired().await }),
        ));
        cron.schedule(self.job(
            "retention",
            Scope::Leader,
            c.retention_interval,
            1,
            None,
            |s, _| Box::pin(async move { s.delete_finished().await }),
        ));
        cron.schedule(self.job(
            "backlog",
            Scope::Leader,
            c.backlog_interval,
            1,
            None,
            |s, _| Box::pin(async move { s.refresh_backlog().await }),
        ));
    }

    fn job(
        self: &Arc<Self>,
        name: &'static str,
        scope: Scope,
        every: Duration,
        parallelism: usize,
        wake: Option<Arc<Notify>>,
        run: fn(
            Arc<Self>,
            CancellationToken,
        ) -> futures::future::BoxFuture<'static, anyhow::Result<Progress>>,
    ) -> Job {
        let s = self.clone();
        Job {
            name,
            scope,
            every,
            parallelism,
            wake,
            run: Arc::new(move |cancel| run(s.clone(), cancel)),
        }
    }

    /// Claims one batch and delivers it. A full batch reports more work.
    pub async fn claim_and_deliver(&self, cancel: CancellationToken) -> anyhow::Result<Progress> {
        let want = self.onec.capacity().min(self.config.batch_size as usize) as u32;
        if want == 0 || cancel.is_cancelled() {
            return Ok(Progress::Idle);
        }
        let claim = self
            .store
            .claim_batch(&ClaimSpec {
                claimant: &self.config.relay_id,
                limit: want,
                lease: self.config.lease,
            })
            .await?;
        self.metrics.claimed(&claim);
        let more = claim.more;
        let tasks = claim.tasks;
        let claimed = tasks.len();
        // Deliveries run concurrently; the successes are then recorded in one
        // statement instead of one round trip each.
        let delivered: Vec<(TaskId, store::ClaimToken)> = futures::stream::iter(tasks)
            .map(|task| self.deliver(task, &cancel))
            .buffer_unordered(claimed.max(1))
            .filter_map(|done| async move { done })
            .collect()
            .await;
        match self.store.complete_many(&delivered).await {
            Ok(n) if n < delivered.len() as u64 => tracing::warn!(
                lost = delivered.len() as u64 - n,
                "claims were lost before completion; other relays own those tasks now"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not record deliveries; their claims will expire and be retried")
            }
        }
        // A full page of candidates that gave some claims means more may be
        // due; one that gave none holds only orders that must wait (running
        // or in doubt elsewhere), and looping on it would spin.
        Ok(if (more && claimed > 0) || claimed as u32 >= want {
            Progress::MoreWork
        } else {
            Progress::Idle
        })
    }

    /// Delivers one task inside a span that continues the save's trace, and
    /// passes that span's context on to 1C. Returns the claim to complete
    /// when 1C has the version; every other outcome is recorded here.
    async fn deliver(
        &self,
        task: ClaimedTask,
        cancel: &CancellationToken,
    ) -> Option<(TaskId, store::ClaimToken)> {
        let span = tracing::info_span!("deliver", task = %task.id, order = %task.order_id, version = task.version);
        telemetry::set_parent(&span, task.traceparent.as_deref());
        let traceparent = telemetry::traceparent(&span);
        self.deliver_in(task, traceparent, cancel)
            .instrument(span)
            .await
    }

    async fn deliver_in(
        &self,
        task: ClaimedTask,
        traceparent: Option<String>,
        cancel: &CancellationToken,
    ) -> Option<(TaskId, store::ClaimToken)> {
        let (id, token, attempts, created_at) =
            (task.id, task.token, task.attempts, task.created_at);
        let delivery = Delivery {
            order_id: task.order_id,
            version: task.version,
            snapshot: task.snapshot,
            traceparent,
        };
        let outcome = match self.onec.deliver(&delivery, cancel).await {
            Attempt::Sent(outcome) => outcome,
            Attempt::NotSent => {
                self.metrics.released.inc();
                self.settled(id, "release", self.store.release(id, token).await);
                return None;
            }
        };
        let delay = self.config.backoff.delay_random(attempts);
        let in_doubt = match &outcome {
            Outcome::Failed(f) if f.class.outcome_unknown() => Some(
                chrono::Utc::now()
                    + chrono::Duration::from_std(self.config.in_doubt).unwrap_or_default(),
            ),
            _ => None,
        };
        match decide(&outcome, attempts, self.config.max_attempts, delay) {
            Decision::Complete => {
                self.metrics.delivered(created_at);
                return Some((id, token));
            }
            Decision::RetryAfter(wait, reason) => {
                self.metrics.failed(&outcome);
                let at = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                tracing::debug!(task = %id, order = %delivery.order_id, ?wait, %reason, "delivery failed; will retry");
                self.settled(
                    id,
                    "retry",
                    self.store
                        .retry_later(id, token, at, &reason, in_doubt)
                        .await,
                );
            }
            Decision::Dead(reason) => {
                self.metrics.failed(&outcome);
                self.metrics.dead.inc();
                tracing::warn!(task = %id, order = %delivery.order_id, %reason, "task is dead");
                self.settled(
                    id,
                    "bury",
                    self.store.mark_dead(id, token, &reason, in_doubt).await,
                );
            }
        }
        None
    }

    /// Logs what recording an outcome did. A lost claim means another relay
    /// rescued the task; a database error leaves it to the lease to expire.
    fn settled(&self, id: TaskId, what: &str, result: store::Result<bool>) {
        match result {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(task = %id, what, "claim was lost; another relay owns the task now")
            }
            Err(e) => {
                tracing::warn!(task = %id, what, error = %e, "could not record the outcome; the claim will expire and be retried")
            }
        }
    }

    /// Returns expired claims to `pending` (leader only).
    pub async fn rescue_expired(&self) -> anyhow::Result<Progress> {
        const BATCH: u32 = 500;
        let rescued = self.store.rescue_expired(BATCH).await?;
        if !rescued.is_empty() {
            tracing::warn!(rescued = rescued.len(), "rescued tasks whose claim expired");
            self.wake.notify_one();
        }
        Ok(more_if(rescued.len() == BATCH as usize))
    }

    /// Deletes finished tasks past retention, in small batches (leader only).
    pub async fn delete_finished(&self) -> anyhow::Result<Progress> {
        const BATCH: u32 = 1000;
        let c = &self.config;
        let deleted = self
            .store
            .delete_finished(c.retention, c.idempotency_key_ttl, BATCH)
            .await?;
        Ok(more_if(deleted == u64::from(BATCH)))
    }

    /// Recounts the backlog for the API and the metrics (leader only).
    pub async fn refresh_backlog(&self) -> anyhow::Result<Progress> {
        let stats = self.store.refresh_backlog().await?;
        self.metrics.backlog(&stats);
        Ok(Progress::Idle)
    }
}

fn more_if(full: bool) -> Progress {
    if full {
        Progress::MoreWork
    } else {
        Progress::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerConfig;
    use crate::clock::SystemClock;
    use crate::cron::MockCron;
    use crate::protect::ProtectionConfig;
    use onec::{Applied, ErrorClass, Failure, MockOnecClient};

    fn failure(class: ErrorClass, retry_after: Option<Duration>) -> Outcome {
        Outcome::Failed(Failure {
            class,
            retry_after,
            detail: format!("{} happened", class.as_str()),
        })
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn every_outcome_maps_to_one_decision() {
        assert_eq!(
            decide(&Outcome::Delivered(Applied::Stale), 1, 5, SECOND),
            Decision::Complete
        );
        assert_eq!(
            decide(&failure(ErrorClass::ServerError, None), 2, 5, SECOND),
            Decision::RetryAfter(SECOND, "server_error happened".into())
        );
        assert_eq!(
            decide(
                &failure(ErrorClass::Throttled, Some(Duration::from_secs(30))),
                2,
                5,
                SECOND
            ),
            Decision::RetryAfter(Duration::from_secs(30), "throttled happened".into()),
            "Retry-After wins when longer"
        );
        assert_eq!(
            decide(
                &failure(ErrorClass::Unavailable, Some(Duration::ZERO)),
                2,
                5,
                SECOND
            ),
            Decision::RetryAfter(SECOND, "unavailable happened".into()),
            "but never shortens the backoff"
        );
        assert_eq!(
            decide(&failure(ErrorClass::Timeout, None), 5, 5, SECOND),
            Decision::Dead("timeout happened (gave up after 5 attempts)".into())
        );
        assert_eq!(
            decide(&failure(ErrorClass::Rejected, None), 1, 5, SECOND),
            Decision::Dead("rejected happened (permanent)".into())
        );
    }

    #[tokio::test]
    async fn the_service_registers_its_jobs_through_the_injected_cron() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/none")
            .unwrap();
        let guard = Arc::new(OnecGuard::new(
            Arc::new(MockOnecClient::new()),
            ProtectionConfig {
                max_in_flight: 4,
                rate_per_second: None,
                breaker: BreakerConfig {
                    failure_threshold: 5,
                    cool_down: SECOND,
                },
            },
            Arc::new(SystemClock),
            Arc::default(),
        ));
        let config = ServiceConfig {
            relay_id: "r".into(),
            batch_size: 10,
            claim_lanes: 3,
            lease: SECOND,
            max_attempts: 5,
            backoff: Backoff {
                base: SECOND,
                max: SECOND,
            },
            poll_interval: Duration::from_millis(500),
            rescue_interval: Duration::from_secs(7),
            retention: Duration::from_secs(86_400),
            idempotency_key_ttl: Duration::from_secs(86_400),
            retention_interval: Duration::from_secs(60),
            backlog_interval: Duration::from_secs(5),
            in_doubt: Duration::from_secs(30),
        };
        let service = TaskService::new(Store::new(pool), guard, config, Arc::default());
        let mut cron = MockCron::new();
        let mut seq = mockall::Sequence::new();
        cron.expect_schedule()
            .withf(|job| {
                job.name == "deliver"
                    && job.scope == Scope::EveryPod
                    && job.parallelism == 3
                    && job.wake.is_some()
                    && job.every == Duration::from_millis(500)
            })
            .times(1)
            .in_sequence(&mut seq)
            .return_const(());
        for (name, every) in [
            ("rescue", Duration::from_secs(7)),
            ("retention", Duration::from_secs(60)),
            ("backlog", Duration::from_secs(5)),
        ] {
            cron.expect_schedule()
                .withf(move |job| {
                    job.name == name
                        && job.scope == Scope::Leader
                        && job.parallelism == 1
                        && job.every == every
                })
                .times(1)
                .in_sequence(&mut seq)
                .return_const(());
        }

        service.register(&cron);
    }
}
