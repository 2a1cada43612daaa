//! The delivery engine of one destination: claims a batch of its outbox
//! tasks under its delivery policy, delivers each through the guarded sink
//! and records the outcome. It registers its job with an injected [`Cron`]
//! and knows nothing of the pool that runs it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use domain::{DeliveryPolicy, Destination};
use futures::StreamExt;
use sink::{Failure, FailureKind, Message};
use store::{ClaimSpec, ClaimToken, ClaimedTask, Store, TaskId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use worker::{Backoff, Cron, Job, Progress, Scope};

use crate::controls::Controls;
use crate::guard::Attempt;
use crate::metrics::DestinationMetrics;
use crate::Result;

/// Delivery settings, shared by every destination of a relay.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// This relay's name in `claimed_by`, e.g. the pod name.
    pub relay_id: String,
    /// Most tasks claimed per query.
    pub batch_size: u32,
    /// How many claim-and-deliver runs may overlap, per destination.
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
    /// How long consumers' inbox rows are kept: the window in which a
    /// redelivered message is recognised.
    pub inbox_retention: Duration,
    /// How often the leader deletes rows past retention.
    pub retention_interval: Duration,
    /// How often the leader recounts the backlog.
    pub backlog_interval: Duration,
    /// After an attempt with no answer, how long the destination may still
    /// apply it; no newer message of that key is sent before this passes.
    pub in_doubt: Duration,
}

/// What to do with a task after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Try again after this long.
    RetryAfter(Duration, String),
    /// Permanent failure or out of attempts: dead, with this reason.
    Dead(String),
}

/// The retry policy: transient and in-doubt failures back off (at least as
/// long as the destination asked) until `max_attempts`, permanent ones go
/// dead at once.
pub fn decide(
    failure: &Failure,
    attempts: i32,
    max_attempts: i32,
    backoff_delay: Duration,
) -> Decision {
    if failure.kind == FailureKind::Permanent {
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

/// A job on every relay with one lane per claim lane, run early on `wake`.
pub(crate) fn lanes_job(
    name: String,
    config: &ServiceConfig,
    wake: Arc<Notify>,
    run: worker::JobFn,
) -> Job {
    Job {
        // Job names are static; one per destination, made once at start.
        name: Box::leak(name.into_boxed_str()),
        scope: Scope::EveryPod,
        every: config.poll_interval,
        parallelism: config.claim_lanes,
        wake: Some(wake),
        run,
    }
}

/// The delivery engine of one destination.
pub struct DeliveryEngine {
    store: Store,
    destination: Destination,
    policy: DeliveryPolicy,
    controls: Arc<Controls>,
    config: ServiceConfig,
    metrics: DestinationMetrics,
}

impl DeliveryEngine {
    /// An engine delivering the tasks of the destination of `controls`
    /// under `policy`, through its guard and under its live settings.
    pub fn new(
        store: Store,
        policy: DeliveryPolicy,
        controls: Arc<Controls>,
        config: ServiceConfig,
        metrics: DestinationMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            destination: controls.destination().clone(),
            policy,
            controls,
            config,
            metrics,
        })
    }

    /// Notified when new tasks may be waiting (a save's NOTIFY).
    pub fn wake(&self) -> Arc<Notify> {
        self.controls.wake()
    }

    /// Registers `deliver <destination>` on every relay, run early on
    /// wake-ups, with one lane per claim lane.
    pub fn register(self: &Arc<Self>, cron: &dyn Cron) {
        let engine = self.clone();
        cron.schedule(lanes_job(
            format!("deliver {}", self.destination),
            &self.config,
            self.wake(),
            Arc::new(move |cancel| {
                let engine = engine.clone();
                Box::pin(async move { Ok(engine.claim_and_deliver(cancel).await?) })
            }),
        ));
    }

    /// Claims one batch and delivers it. A full batch reports more work;
    /// a paused destination claims nothing.
    pub async fn claim_and_deliver(&self, cancel: CancellationToken) -> Result<Progress> {
        let guard = self.controls.guard();
        let want = guard.capacity().min(self.controls.batch_size() as usize) as u32;
        if want == 0 || cancel.is_cancelled() || self.controls.paused() {
            return Ok(Progress::Idle);
        }
        let claim = self
            .store
            .claim_batch(&ClaimSpec {
                destination: &self.destination,
                policy: self.policy,
                claimant: &self.config.relay_id,
                limit: want,
                lease: self.config.lease,
            })
            .await?;
        self.metrics.claimed(&claim);
        let more = claim.more;
        let claimed = claim.tasks.len();
        if claimed == 0 && guard.probe_due() {
            self.close_breaker_if_idle().await?;
        }
        // One run per key, sent in order by one worker; runs go out
        // concurrently, and the successes are then recorded in one
        // statement instead of one round trip each.
        let mut runs: BTreeMap<String, Vec<ClaimedTask>> = BTreeMap::new();
        for task in claim.tasks {
            runs.entry(task.aggregate_id.clone())
                .or_default()
                .push(task);
        }
        let delivered: Vec<(TaskId, ClaimToken)> = futures::stream::iter(runs.into_values())
            .map(|run| self.deliver_run(run, &cancel))
            .buffer_unordered(claimed.max(1))
            .flat_map(futures::stream::iter)
            .collect()
            .await;
        match self.store.complete_many(&delivered).await {
            Ok(n) => {
                self.metrics.completed(n);
                if n < delivered.len() as u64 {
                    tracing::warn!(
                        destination = %self.destination,
                        lost = delivered.len() as u64 - n,
                        "claims were lost before completion; other relays own those tasks now"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(destination = %self.destination, error = %worker::causes(&e), "could not record deliveries; their claims will expire and be retried")
            }
        }
        // A full page of candidates that gave some claims means more may be
        // due; one that gave none holds only keys that must wait (running
        // or in doubt elsewhere), and looping on it would spin.
        Ok(if (more && claimed > 0) || claimed as u32 >= want {
            Progress::MoreWork
        } else {
            Progress::Idle
        })
    }

    /// A probe needs a message to carry. When the destination has none left
    /// (the other relays delivered the backlog), the breaker closes instead
    /// of reporting half-open until the next save.
    async fn close_breaker_if_idle(&self) -> Result<()> {
        if !self.store.has_undelivered(&self.destination).await?
            && self.controls.guard().close_when_idle()
        {
            tracing::info!(destination = %self.destination, "nothing left to deliver; circuit breaker closes without a probe");
        }
        Ok(())
    }

    /// Delivers one key's run in order. After the first message that does
    /// not go, the rest are given back untried: sending them would put them
    /// ahead of it.
    async fn deliver_run(
        &self,
        mut run: Vec<ClaimedTask>,
        cancel: &CancellationToken,
    ) -> Vec<(TaskId, ClaimToken)> {
        run.sort_by_key(|t| t.id);
        let mut run = run.into_iter();
        let mut delivered = Vec::new();
        for task in run.by_ref() {
            match self.deliver(task, cancel).await {
                Some(done) => delivered.push(done),
                None => break,
            }
        }
        for untried in run {
            self.metrics.released.inc();
            self.settled(
                untried.id,
                "release",
                self.store.release(untried.id, untried.token).await,
            );
        }
        delivered
    }

    /// Delivers one task inside a span that continues the save's trace, and
    /// passes that span's context on to the destination. Returns the claim
    /// to complete when the destination has the message; every other
    /// outcome is recorded here.
    async fn deliver(
        &self,
        task: ClaimedTask,
        cancel: &CancellationToken,
    ) -> Option<(TaskId, ClaimToken)> {
        let span = tracing::info_span!("deliver", destination = %self.destination, task = %task.id, key = %task.aggregate_id, version = task.version);
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
    ) -> Option<(TaskId, ClaimToken)> {
        let (id, token, attempts, created_at) =
            (task.id, task.token, task.attempts, task.created_at);
        let message = Message {
            event_id: task.event_id.0,
            aggregate_type: task.aggregate_type,
            aggregate_id: task.aggregate_id,
            kind: task.kind,
            version: task.version,
            payload: task.payload,
            traceparent,
            signature: None,
        };
        let outcome = match self.controls.guard().deliver(&message, cancel).await {
            Attempt::Sent(outcome) => outcome,
            Attempt::NotSent => {
                self.metrics.released.inc();
                self.settled(id, "release", self.store.release(id, token).await);
                return None;
            }
        };
        let failure = match outcome {
            Ok(()) => {
                self.metrics.answered_ok(created_at);
                return Some((id, token));
            }
            Err(failure) => failure,
        };
        self.metrics.failed(&failure);
        let in_doubt = (failure.kind == FailureKind::InDoubt).then(|| {
            chrono::Utc::now()
                + chrono::Duration::from_std(self.config.in_doubt).unwrap_or_default()
        });
        let delay = self.config.backoff.delay_random(attempts);
        let key = &message.aggregate_id;
        match decide(&failure, attempts, self.config.max_attempts, delay) {
            Decision::RetryAfter(wait, reason) => {
                let at = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                tracing::debug!(task = %id, %key, ?wait, %reason, "delivery failed; will retry");
                self.settled(
                    id,
                    "retry",
                    self.store
                        .retry_later(id, token, at, &reason, in_doubt)
                        .await,
                );
            }
            Decision::Dead(reason) => {
                self.metrics.dead.inc();
                tracing::warn!(task = %id, %key, %reason, "task is dead");
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
                tracing::warn!(task = %id, what, error = %worker::causes(&e), "could not record the outcome; the claim will expire and be retried")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::{ProtectionConfig, SinkGuard};
    use worker::{BreakerConfig, MockCron, SystemClock};

    const SECOND: Duration = Duration::from_secs(1);

    fn failure(kind: FailureKind, retry_after: Option<Duration>) -> Failure {
        Failure {
            kind,
            class: "timeout",
            counts_against_destination: true,
            retry_after,
            detail: "it failed".into(),
        }
    }

    #[test]
    fn every_failure_maps_to_one_decision() {
        assert_eq!(
            decide(&failure(FailureKind::Transient, None), 2, 5, SECOND),
            Decision::RetryAfter(SECOND, "it failed".into())
        );
        assert_eq!(
            decide(
                &failure(FailureKind::Transient, Some(Duration::from_secs(30))),
                2,
                5,
                SECOND
            ),
            Decision::RetryAfter(Duration::from_secs(30), "it failed".into()),
            "Retry-After wins when longer"
        );
        assert_eq!(
            decide(
                &failure(FailureKind::InDoubt, Some(Duration::ZERO)),
                2,
                5,
                SECOND
            ),
            Decision::RetryAfter(SECOND, "it failed".into()),
            "but never shortens the backoff"
        );
        assert_eq!(
            decide(&failure(FailureKind::InDoubt, None), 5, 5, SECOND),
            Decision::Dead("it failed (gave up after 5 attempts)".into())
        );
        assert_eq!(
            decide(&failure(FailureKind::Permanent, None), 1, 5, SECOND),
            Decision::Dead("it failed (permanent)".into())
        );
    }

    #[tokio::test]
    async fn the_engine_registers_one_deliver_job_per_destination_through_the_injected_cron() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/none")
            .unwrap();
        let metrics = crate::RelayMetrics::new().destination("events");
        let guard = Arc::new(SinkGuard::new(
            Arc::new(sink::MockSink::new()),
            ProtectionConfig {
                max_in_flight: 4,
                rate_per_second: None,
                breaker: BreakerConfig {
                    failure_threshold: 5,
                    cool_down: SECOND,
                },
            },
            Arc::new(SystemClock),
            metrics.clone(),
        ));
        let engine = DeliveryEngine::new(
            Store::new(pool),
            DeliveryPolicy::EveryMessageInOrder,
            Arc::new(Controls::new("events".parse().unwrap(), guard, 10)),
            crate::upkeep::tests::config(),
            metrics,
        );
        let mut cron = MockCron::new();
        cron.expect_schedule()
            .withf(|job| {
                job.name == "deliver events"
                    && job.scope == Scope::EveryPod
                    && job.parallelism == 3
                    && job.wake.is_some()
                    && job.every == Duration::from_millis(500)
            })
            .times(1)
            .return_const(());

        engine.register(&cron);
    }
}
