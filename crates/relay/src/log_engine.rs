//! The delivery engine of one event-stream destination read from the log
//! (`store::log`): a lane claims its share of the partitions that are
//! behind, reads each one's next run in commit order, hands the runs to the
//! sink as one batch, and moves each cursor past what was delivered or
//! buried, in one transaction. What failed and may pass stays ahead of its
//! cursor, with everything after it, and is read again by the next claim.

use std::sync::Arc;

use domain::Destination;
use sink::{FailureKind, Message};
use store::log::LogEvent;
use store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use worker::{Cron, Progress};

use crate::engine::lanes_job;
use crate::guard::SinkGuard;
use crate::metrics::DestinationMetrics;
use crate::{Result, ServiceConfig};

/// The log's delivery engine of one destination.
pub struct LogEngine {
    store: Store,
    destination: Destination,
    guard: Arc<SinkGuard>,
    config: ServiceConfig,
    /// The partition count, read (and the cursor rows made) on first use.
    partitions: tokio::sync::OnceCell<u16>,
    wake: Arc<Notify>,
    metrics: DestinationMetrics,
}

impl LogEngine {
    /// An engine delivering `destination`'s log through `guard`; its first
    /// run makes the cursor rows when missing.
    pub fn new(
        store: Store,
        destination: Destination,
        guard: Arc<SinkGuard>,
        config: ServiceConfig,
        metrics: DestinationMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            destination,
            guard,
            config,
            partitions: tokio::sync::OnceCell::new(),
            wake: Arc::new(Notify::new()),
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
        self.wake.clone()
    }

    /// Registers `log <destination>` on every relay, one lane per claim
    /// lane, run early on wake-ups.
    pub fn register(self: &Arc<Self>, cron: &dyn Cron) {
        let engine = self.clone();
        cron.schedule(lanes_job(
            format!("log {}", self.destination),
            &self.config,
            &self.wake,
            Arc::new(move |cancel| {
                let engine = engine.clone();
                Box::pin(async move { Ok(engine.deliver_next(cancel).await?) })
            }),
        ));
    }

    /// Claims this lane's share of the partitions that are behind (the
    /// partitions over the claim lanes, so the lanes and the other relays
    /// split them), reads each one's next run, and hands all of them to the
    /// sink as one batch (Kafka: one transaction). A batch delivered
    /// reports more work.
    pub async fn deliver_next(&self, cancel: CancellationToken) -> Result<Progress> {
        let partitions = self.partitions().await?;
        if self.guard.capacity() == 0 || cancel.is_cancelled() {
            return Ok(Progress::Idle);
        }
        let lanes = u16::try_from(self.config.claim_lanes.max(1)).unwrap_or(u16::MAX);
        let Some(mut claim) = self
            .store
            .claim_partitions(
                &self.destination,
                &self.config.relay_id,
                partitions.div_ceil(lanes),
            )
            .await?
        else {
            return Ok(Progress::Idle);
        };
        let runs = claim.read_all(self.config.batch_size).await?;
        let messages: Vec<Message> = runs
            .iter()
            .flat_map(|r| r.events.iter().map(message))
            .collect();
        if messages.is_empty() {
            // Windows that closed with nothing left in them.
            claim.advance().await?;
            return Ok(Progress::MoreWork);
        }
        let sent = self.guard.deliver_run(&messages, &cancel);
        let Some(outcomes) = sent.await else {
            claim.release().await?;
            return Ok(Progress::Idle);
        };
        // Each partition's cursor passes the prefix of its run that was
        // delivered or refused for good; the first failure that may pass
        // stops it there.
        let (mut outcomes, mut passed) = (outcomes.iter(), Vec::with_capacity(runs.len()));
        let (mut delivered, mut stopped) = (0, false);
        for run in &runs {
            let mut last = None;
            let mut answers = outcomes.by_ref().take(run.events.len());
            for event in &run.events {
                match answers.next().expect("one outcome per message") {
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
                        tracing::warn!(destination = %self.destination, key = %event.key, partition = run.partition, position = event.position, class = f.class, error = %f.detail, "not delivered; the partition resumes here");
                        stopped = true;
                        break;
                    }
                }
                last = Some(event.position);
            }
            // What the break left of this run's answers.
            answers.for_each(drop);
            passed.push((last, run));
        }
        claim.advance_through(&passed).await?;
        self.metrics.completed(delivered);
        Ok(if stopped {
            Progress::Idle
        } else {
            Progress::MoreWork
        })
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
