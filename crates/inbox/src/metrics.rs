//! Prometheus metrics of consumers, on the registry of the role that runs
//! them. Every series carries the consumer's name.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::Verdict;

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Consumer metrics; clones share the series.
#[derive(Clone)]
pub struct ConsumerMetrics {
    messages: IntCounterVec,
    dead: IntCounterVec,
    batch: HistogramVec,
    lag: IntGaugeVec,
    kept: IntCounterVec,
    progress: IntGaugeVec,
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
            kept: IntCounterVec::new(
                Opts::new(
                    "orders_center_consumer_dead_kept_total",
                    "Dead letters the broker's dead-letter destination refused, kept in \
                     the consumer's dead_letters table instead.",
                ),
                &["consumer"],
            )?,
            progress: IntGaugeVec::new(
                Opts::new(
                    "orders_center_consumer_progress_timestamp_seconds",
                    "When a consumer last settled a batch (or started), as a Unix time.",
                ),
                &["consumer"],
            )?,
        };
        registry.register(Box::new(m.kept.clone()))?;
        registry.register(Box::new(m.progress.clone()))?;
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
        self.kept.with_label_values(&[consumer]);
        self.progressed(consumer);
    }

    fn progressed(&self, consumer: &str) {
        self.progress.with_label_values(&[consumer]).set(unix_now());
    }

    /// Counts a dead letter kept in the database.
    pub fn kept(&self, consumer: &str) {
        self.kept.with_label_values(&[consumer]).inc();
    }

    /// The consumers that have messages waiting (a lag above zero on some
    /// source) and have settled no batch for `after`: a poison they cannot
    /// get past, or a dead-letter destination they cannot reach.
    pub fn stalled(&self, after: Duration) -> Vec<String> {
        let now = unix_now();
        let after = i64::try_from(after.as_secs()).unwrap_or(i64::MAX);
        let labelled = |vec: &IntGaugeVec| {
            vec.collect()
                .into_iter()
                .flat_map(|mut family| family.take_metric())
                .filter_map(|m| {
                    let consumer = m.get_label().iter().find(|l| l.name() == "consumer")?;
                    Some((
                        consumer.value().to_owned(),
                        m.get_gauge().get_value() as i64,
                    ))
                })
                .collect::<Vec<_>>()
        };
        let lags = labelled(&self.lag);
        labelled(&self.progress)
            .into_iter()
            .filter(|(consumer, at)| {
                now - at >= after && lags.iter().any(|(c, lag)| c == consumer && *lag > 0)
            })
            .map(|(consumer, _)| consumer)
            .collect()
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
        self.progressed(consumer);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_is_stalled_only_with_messages_waiting_and_no_progress_for_the_time() {
        let m = ConsumerMetrics::unregistered();
        m.start("journal");
        m.start("idle");
        m.set_lag("journal", "order/0", 3);
        m.set_lag("idle", "order/0", 0);
        assert_eq!(m.stalled(Duration::ZERO), ["journal"]);
        assert!(
            m.stalled(Duration::from_secs(60)).is_empty(),
            "it started just now"
        );
        m.set_lag("journal", "order/0", 0);
        assert!(m.stalled(Duration::ZERO).is_empty(), "nothing waits");
    }
}
