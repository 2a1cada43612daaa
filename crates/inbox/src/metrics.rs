//! Prometheus metrics of consumers, on the registry of the role that runs
//! them. Every series carries the consumer's name.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::Verdict;

/// Consumer metrics; clones share the series.
#[derive(Clone)]
pub struct ConsumerMetrics {
    messages: IntCounterVec,
    dead: IntCounterVec,
    batch: HistogramVec,
    lag: IntGaugeVec,
}

impl ConsumerMetrics {
    /// Registers the consumer series on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            messages: IntCounterVec::new(
                Opts::new(
                    "orders_center_consumer_messages_total",
                    "Messages a consumer received, by outcome: applied, duplicate or dead.",
                ),
                &["consumer", "outcome"],
            )?,
            dead: IntCounterVec::new(
                Opts::new(
                    "orders_center_consumer_dead_total",
                    "Messages a consumer dead-lettered, by reason class.",
                ),
                &["consumer", "class"],
            )?,
            batch: HistogramVec::new(
                HistogramOpts::new(
                    "orders_center_consumer_batch_seconds",
                    "Time to apply one batch in its inbox transaction.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
                &["consumer"],
            )?,
            lag: IntGaugeVec::new(
                Opts::new(
                    "orders_center_consumer_lag",
                    "Messages waiting for a consumer: Kafka's end offsets minus its \
                     position, or the messages ready in its RabbitMQ queue.",
                ),
                &["consumer", "source"],
            )?,
        };
        registry.register(Box::new(m.messages.clone()))?;
        registry.register(Box::new(m.dead.clone()))?;
        registry.register(Box::new(m.batch.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        Ok(m)
    }

    /// Series that no one scrapes, for tests and benchmarks.
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("fresh registry")
    }

    /// Creates the consumer's series at zero, so that rates and increases
    /// have a start and dashboards show it before its first message.
    pub fn start(&self, consumer: &str) {
        for outcome in ["applied", "duplicate", "dead"] {
            self.messages.with_label_values(&[consumer, outcome]);
        }
        for class in crate::Poison::CLASSES {
            self.dead.with_label_values(&[consumer, class]);
        }
    }

    /// Counts a processed batch by verdict and times it.
    pub fn observe(&self, consumer: &str, verdicts: &[Verdict], took: Duration) {
        let (mut applied, mut duplicate) = (0, 0);
        for v in verdicts {
            match v {
                Verdict::Applied => applied += 1,
                Verdict::Duplicate => duplicate += 1,
                Verdict::Dead(p) => {
                    self.messages.with_label_values(&[consumer, "dead"]).inc();
                    self.dead.with_label_values(&[consumer, p.class]).inc();
                }
            }
        }
        self.messages
            .with_label_values(&[consumer, "applied"])
            .inc_by(applied);
        self.messages
            .with_label_values(&[consumer, "duplicate"])
            .inc_by(duplicate);
        self.batch
            .with_label_values(&[consumer])
            .observe(took.as_secs_f64());
    }

    /// Sets the lag of `consumer` on `source` (a partition or a queue).
    pub fn set_lag(&self, consumer: &str, source: &str, lag: i64) {
        self.lag.with_label_values(&[consumer, source]).set(lag);
    }

    /// Messages of `consumer` with `outcome`, for tests.
    pub fn count(&self, consumer: &str, outcome: &str) -> u64 {
        self.messages.with_label_values(&[consumer, outcome]).get()
    }
}
