//! Prometheus metrics of the relay role, on its own registry. Every outbox
//! figure carries a `destination` label.

use chrono::{DateTime, Utc};
use domain::SyncStats;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use store::log::CursorLag;

const SECONDS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The relay's metrics.
pub struct RelayMetrics {
    registry: Registry,
    /// Backlog figures, exposed only by the leader that computes them, so a
    /// dashboard never mixes stale figures of followers in.
    leader_registry: Registry,
    /// 1 while this relay leads.
    pub is_leader: IntGauge,
    backlog_pending: IntGaugeVec,
    backlog_running: IntGaugeVec,
    backlog_dead: IntGaugeVec,
    backlog_oldest_age: GaugeVec,
    cursor_lag_events: IntGaugeVec,
    cursor_lag_seconds: GaugeVec,
    delivered: IntCounterVec,
    failed: IntCounterVec,
    dead: IntCounterVec,
    superseded: IntCounterVec,
    released: IntCounterVec,
    request: HistogramVec,
    lag: HistogramVec,
    claim_batch: HistogramVec,
    breaker_state: IntGaugeVec,
    /// Unix time of each cron job's last successful run.
    pub cron_last_success: GaugeVec,
    /// Workers running a job.
    pub workers_busy: IntGauge,
    /// Workers in the pool.
    pub workers: IntGauge,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauges(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &["destination"]).expect("valid metric")
}

fn histograms(name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric")
}

impl RelayMetrics {
    /// Registers every metric on a fresh registry.
    pub fn new() -> Self {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let d = &["destination"];
        let m = Self {
            registry: Registry::new(),
            leader_registry: Registry::new(),
            is_leader: gauge(
                "orders_center_relay_is_leader",
                "Whether this relay leads: 1 or 0.",
            ),
            backlog_pending: gauges(
                "orders_center_outbox_backlog_pending",
                "Tasks waiting for delivery (from the leader).",
            ),
            backlog_running: gauges(
                "orders_center_outbox_backlog_running",
                "Tasks being delivered (from the leader).",
            ),
            backlog_dead: gauges(
                "orders_center_outbox_backlog_dead",
                "Dead tasks (from the leader).",
            ),
            backlog_oldest_age: GaugeVec::new(
                Opts::new(
                    "orders_center_outbox_backlog_oldest_pending_age_seconds",
                    "Age of the oldest pending task (from the leader).",
                ),
                d,
            )
            .expect("valid metric"),
            cursor_lag_events: IntGaugeVec::new(
                Opts::new(
                    "orders_center_log_cursor_lag_events",
                    "Committed log events a cursor has not passed (from the leader).",
                ),
                &["destination", "partition"],
            )
            .expect("valid metric"),
            cursor_lag_seconds: GaugeVec::new(
                Opts::new(
                    "orders_center_log_cursor_lag_seconds",
                    "Age of the oldest log event a cursor has not passed; 0 when none (from the leader).",
                ),
                &["destination", "partition"],
            )
            .expect("valid metric"),
            delivered: counters(
                "orders_center_outbox_delivered_total",
                "Tasks delivered.",
                d,
            ),
            failed: counters(
                "orders_center_outbox_failed_total",
                "Failed delivery attempts, by error class.",
                &["destination", "class"],
            ),
            dead: counters(
                "orders_center_outbox_dead_total",
                "Tasks that went dead.",
                d,
            ),
            superseded: counters(
                "orders_center_outbox_superseded_total",
                "Pending versions skipped because a newer version of the order was claimed.",
                d,
            ),
            released: counters(
                "orders_center_outbox_released_total",
                "Claimed tasks given back unsent.",
                d,
            ),
            request: histograms(
                "orders_center_sink_request_duration_seconds",
                "Time a destination took to answer a delivery, by outcome.",
                SECONDS.to_vec(),
                &["destination", "outcome"],
            ),
            lag: histograms(
                "orders_center_outbox_delivery_lag_seconds",
                "Time from the event's commit to the destination's answer.",
                [&SECONDS[..], &[30.0, 60.0, 300.0]].concat(),
                d,
            ),
            claim_batch: histograms(
                "orders_center_outbox_claim_batch_size",
                "Tasks per non-empty claim.",
                vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0],
                d,
            ),
            breaker_state: gauges(
                "orders_center_sink_breaker_state",
                "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            ),
            cron_last_success: GaugeVec::new(
                Opts::new(
                    "orders_center_cron_last_success_timestamp_seconds",
                    "Unix time of each cron job's last successful run on this relay.",
                ),
                &["job"],
            )
            .expect("valid metric"),
            workers_busy: gauge("orders_center_relay_workers_busy", "Workers running a job."),
            workers: gauge("orders_center_relay_workers", "Workers in the pool."),
        };
        for c in [
            Box::new(m.delivered.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.failed.clone()),
            Box::new(m.dead.clone()),
            Box::new(m.superseded.clone()),
            Box::new(m.request.clone()),
            Box::new(m.cron_last_success.clone()),
            Box::new(m.released.clone()),
            Box::new(m.lag.clone()),
            Box::new(m.claim_batch.clone()),
            Box::new(m.breaker_state.clone()),
            Box::new(m.workers_busy.clone()),
            Box::new(m.workers.clone()),
            Box::new(m.is_leader.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        for c in [
            Box::new(m.backlog_pending.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.backlog_running.clone()),
            Box::new(m.backlog_dead.clone()),
            Box::new(m.backlog_oldest_age.clone()),
            Box::new(m.cursor_lag_events.clone()),
            Box::new(m.cursor_lag_seconds.clone()),
        ] {
            m.leader_registry
                .register(c)
                .expect("metric names are unique");
        }
        m
    }

    /// The figures of one destination.
    pub fn destination(&self, name: &str) -> DestinationMetrics {
        let l = &[name];
        DestinationMetrics {
            name: name.to_owned(),
            delivered: self.delivered.with_label_values(l),
            dead: self.dead.with_label_values(l),
            superseded: self.superseded.with_label_values(l),
            released: self.released.with_label_values(l),
            lag: self.lag.with_label_values(l),
            claim_batch: self.claim_batch.with_label_values(l),
            breaker_state: self.breaker_state.with_label_values(l),
            failed: self.failed.clone(),
            request: self.request.clone(),
        }
    }

    pub(crate) fn cursor(&self, lag: &CursorLag) {
        let partition = lag.partition.to_string();
        let l = &[lag.destination.as_str(), partition.as_str()];
        self.cursor_lag_events.with_label_values(l).set(lag.events);
        self.cursor_lag_seconds
            .with_label_values(l)
            .set(lag.seconds());
    }

    pub(crate) fn backlog(&self, stats: &SyncStats) {
        let l = &[stats.destination.as_str()];
        self.backlog_pending.with_label_values(l).set(stats.pending);
        self.backlog_running.with_label_values(l).set(stats.running);
        self.backlog_dead.with_label_values(l).set(stats.dead);
        self.backlog_oldest_age
            .with_label_values(l)
            .set(stats.oldest_pending_age_seconds);
    }

    /// Tasks of `destination` whose delivery has been recorded as done.
    pub fn delivered_total(&self, destination: &str) -> u64 {
        self.delivered.with_label_values(&[destination]).get()
    }

    /// Tasks of `destination` superseded by newer ones (latest wins).
    pub fn superseded_total(&self, destination: &str) -> u64 {
        self.superseded.with_label_values(&[destination]).get()
    }

    /// Non-empty claims of `destination` so far.
    pub fn claims(&self, destination: &str) -> u64 {
        self.claim_batch
            .with_label_values(&[destination])
            .get_sample_count()
    }

    /// Records a successful run of cron job `job`.
    pub fn ticked(&self, job: &str) {
        let now = Utc::now().timestamp_millis() as f64 / 1000.0;
        self.cron_last_success.with_label_values(&[job]).set(now);
    }

    /// The text exposition: every metric, plus the backlog while leading,
    /// plus the process-wide default registry (where consumers that run
    /// inside the relay, fed from the outbox, register theirs).
    pub fn render(&self, leading: bool) -> String {
        self.is_leader.set(i64::from(leading));
        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        if leading {
            families.extend(self.leader_registry.gather());
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

/// One destination's metrics, resolved once.
#[derive(Clone)]
pub struct DestinationMetrics {
    name: String,
    /// Tasks delivered, counted once their completion has committed.
    pub delivered: IntCounter,
    /// Tasks that went dead.
    pub dead: IntCounter,
    /// Pending versions skipped under latest wins.
    pub superseded: IntCounter,
    /// Claimed tasks given back unsent (breaker open, shutdown).
    pub released: IntCounter,
    lag: prometheus::Histogram,
    claim_batch: prometheus::Histogram,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGauge,
    failed: IntCounterVec,
    request: HistogramVec,
}

impl DestinationMetrics {
    pub(crate) fn claimed(&self, claimed: &store::Claimed) {
        if !claimed.tasks.is_empty() {
            self.claim_batch.observe(claimed.tasks.len() as f64);
        }
        self.superseded.inc_by(claimed.superseded);
    }

    pub(crate) fn answered(&self, outcome: &sink::Outcome, seconds: f64) {
        let label = match outcome {
            Ok(()) => "delivered",
            Err(f) => f.class,
        };
        self.request
            .with_label_values(&[self.name.as_str(), label])
            .observe(seconds);
    }

    /// The destination has the message: the lag ends at its answer.
    pub(crate) fn answered_ok(&self, committed_at: DateTime<Utc>) {
        let lag = (Utc::now() - committed_at)
            .num_microseconds()
            .unwrap_or(0)
            .max(0);
        self.lag.observe(lag as f64 / 1e6);
    }

    /// `n` deliveries are recorded as done, committed.
    pub(crate) fn completed(&self, n: u64) {
        self.delivered.inc_by(n);
    }

    pub(crate) fn failed(&self, failure: &sink::Failure) {
        self.failed
            .with_label_values(&[self.name.as_str(), failure.class])
            .inc();
    }
}
