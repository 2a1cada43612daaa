//! The delivery engine of one event-stream destination read from the log
//! (`store::log`): a lane claims a partition, reads its next run in commit
//! order, hands the run to the sink as one batch, and moves the cursor past
//! what was delivered or buried, in one transaction. What failed and may
//! pass stays ahead of the cursor, with everything after it, and is read
//! again by the next claim.

use std::sync::Arc;

use domain::Destination;
use sink::{FailureKind, Message};
use store::log::LogEvent;
use store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use worker::{Cron, Progress};

use crate::controls::Controls;
use crate::engine::lanes_job;
use crate::metrics::DestinationMetrics;
use crate::{Result, ServiceConfig};

/// The log's delivery engine of one destination.
pub struct LogEngine {
    store: Store,
    destination: Destination,
    controls: Arc<Controls>,
    config: ServiceConfig,
    /// The partition count, read (and the cursor rows made) on first use.
    partitions: tokio::sync::OnceCell<u16>,
    metrics: DestinationMetrics,
}

impl LogEngine {
    /// An engine delivering the log of the destination of `controls`
    /// through its guard and under its live settings; its first run makes
    /// the cursor rows when missing.
    pub fn new(
        store: Store,
        controls: Arc<Controls>,
        config: ServiceConfig,
        metrics: DestinationMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            destination: controls.destination().clone(),
            controls,
            config,
            partitions: tokio::sync::OnceCell::new(),
            metrics,
        })
    }

    async fn partitions(&self) -> Result<u16> {
        let n = self
            .partitions
            .get_or_try_init(|| async {
                self.store.ensure_cursors(&self.destination).await?;
                Ok::<_, store::Error>(self.store.log_shape().await?.partitions)
            })
            .await?;
        Ok(*n)
    }

    /// Notified when new events may be waiting.
    pub fn wake(&self) -> Arc<Notify> {
        self.controls.wake()
    }

    /// Registers `log <destination>` on every relay, one lane per claim
    /// lane, run early on wake-ups.
    pub fn register(self: &Arc<Self>, cron: &dyn Cron) {
        let engine = self.clone();
        cron.schedule(lanes_job(
            format!("log {}", self.destination),
            &self.config,
            self.wake(),
            Arc::new(move |cancel| {
                let engine = engine.clone();
                Box::pin(async move { Ok(engine.deliver_next(cancel).await?) })
            }),
        ));
    }

    /// Delivers the next run of the first partition, in one pass over the
    /// free ones, that has events. A run delivered reports more work; a
    /// paused destination claims nothing.
    pub async fn deliver_next(&self, cancel: CancellationToken) -> Result<Progress> {
        let mut tried = Vec::new();
        let guard = self.controls.guard();
        for _ in 0..self.partitions().await? {
            if guard.capacity() == 0 || cancel.is_cancelled() || self.controls.paused() {
                return Ok(Progress::Idle);
            }
            let Some(mut claim) = self
                .store
                .claim_partition(&self.destination, &self.config.relay_id, &tried)
                .await?
            else {
                return Ok(Progress::Idle);
            };
            tried.push(claim.partition());
            let run = claim.read(self.controls.batch_size()).await?;
            if run.events.is_empty() {
                claim.advance().await?;
                continue;
            }
            let messages: Vec<Message> = run.events.iter().map(message).collect();
            let sent = guard.deliver_run(claim.partition(), &messages, &cancel);
            let Some(outcomes) = sent.await else {
                claim.release().await?;
                return Ok(Progress::Idle);
            };
            // The cursor passes the prefix that was delivered or refused for
            // good; the first failure that may pass stops it there.
            let (mut last, mut delivered, mut stopped) = (None, 0, false);
            for (event, outcome) in run.events.iter().zip(&outcomes) {
                match outcome {
                    Ok(()) => {
                        delivered += 1;
                        self.metrics.answered_ok(event.created_at);
                    }
                    Err(f) if f.kind == FailureKind::Permanent => {
                        tracing::error!(destination = %self.destination, key = %event.key, position = event.position, class = f.class, reason = %f.detail, "refused for good: buried in log_dead, the partition goes on");
                        claim.bury(event, f.class, &f.detail).await?;
                        self.metrics.dead.inc();
                    }
                    Err(f) => {
                        self.metrics.failed(f);
                        tracing::warn!(destination = %self.destination, key = %event.key, position = event.position, class = f.class, error = %f.detail, "not delivered; the partition resumes here");
                        stopped = true;
                        break;
                    }
                }
                last = Some(event.position);
            }
            claim.advance_through(last, &run).await?;
            self.metrics.completed(delivered);
            return Ok(if stopped {
                Progress::Idle
            } else {
                Progress::MoreWork
            });
        }
        // Every partition was free and had nothing: a breaker waiting for a
        // probe has nothing to carry one (the other relays delivered the
        // backlog), so it closes instead of reporting half-open until the
        // next save.
        if guard.probe_due() && guard.close_when_idle() {
            tracing::info!(destination = %self.destination, "nothing left to deliver; circuit breaker closes without a probe");
        }
        Ok(Progress::Idle)
    }
}

fn message(e: &LogEvent) -> Message {
    Message {
        event_id: e.event_id,
        aggregate_type: e.stream.clone(),
        aggregate_id: e.key.clone(),
        kind: e.kind.clone(),
        version: e.version,
        payload: e.payload.clone(),
        traceparent: e.traceparent.clone(),
        signature: None,
    }
}
