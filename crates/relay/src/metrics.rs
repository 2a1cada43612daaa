//! Prometheus metrics of the relay role, on its own registry.

use chrono::{DateTime, Utc};
use domain::SyncStats;
use onec::Outcome;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The relay's metrics.
pub struct RelayMetrics {
    registry: Registry,
    /// Backlog figures, exposed only by the leader that computes them, so a
    /// dashboard never mixes stale figures of followers in.
    leader_registry: Registry,
    /// 1 while this relay leads.
    pub is_leader: IntGauge,
    backlog_pending: IntGauge,
    backlog_running: IntGauge,
    backlog_dead: IntGauge,
    backlog_oldest_age: Gauge,
    /// Tasks delivered (1C answered 200).
    pub delivered_total: IntCounter,
    /// Failed attempts by error class.
    pub failed_total: IntCounterVec,
    /// Tasks that went dead.
    pub dead: IntCounter,
    /// Pending versions skipped because a newer one of the order was sent.
    pub superseded: IntCounter,
    /// Time 1C took to answer, by outcome.
    pub onec_request: prometheus::HistogramVec,
    /// Unix time of each cron job's last successful run.
    pub cron_last_success: prometheus::GaugeVec,
    /// Claimed tasks given back unsent (breaker open, shutdown).
    pub released: IntCounter,
    /// Time from the save's commit to 1C's answer.
    pub lag: Histogram,
    /// Tasks per non-empty claim.
    pub claim_batch: Histogram,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGauge,
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

impl RelayMetrics {
    /// Registers every metric on a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let m = Self {
            leader_registry: Registry::new(),
            is_leader: gauge(
                "orders_center_relay_is_leader",
                "Whether this relay leads: 1 or 0.",
            ),
            backlog_pending: gauge(
                "orders_center_onec_backlog_pending",
                "Tasks waiting for delivery (from the leader).",
            ),
            backlog_running: gauge(
                "orders_center_onec_backlog_running",
                "Tasks being delivered (from the leader).",
            ),
            backlog_dead: gauge(
                "orders_center_onec_backlog_dead",
                "Dead tasks (from the leader).",
            ),
            backlog_oldest_age: Gauge::new(
                "orders_center_onec_backlog_oldest_pending_age_seconds",
                "Age of the oldest pending task (from the leader).",
            )
            .expect("valid metric"),
            delivered_total: counter(
                "orders_center_onec_tasks_delivered_total",
                "Tasks delivered to 1C.",
            ),
            failed_total: IntCounterVec::new(
                Opts::new(
                    "orders_center_onec_tasks_failed_total",
                    "Failed delivery attempts, by error class.",
                ),
                &["class"],
            )
            .expect("valid metric"),
            dead: counter(
                "orders_center_onec_tasks_dead_total",
                "Tasks that went dead.",
            ),
            superseded: counter(
                "orders_center_onec_tasks_superseded_total",
                "Pending versions skipped because a newer version of the order was claimed.",
            ),
            onec_request: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "orders_center_onec_request_duration_seconds",
                    "Time 1C took to answer a delivery, by outcome.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["outcome"],
            )
            .expect("valid metric"),
            cron_last_success: prometheus::GaugeVec::new(
                Opts::new(
                    "orders_center_cron_last_success_timestamp_seconds",
                    "Unix time of each cron job's last successful run on this relay.",
                ),
                &["job"],
            )
            .expect("valid metric"),
            released: counter(
                "orders_center_onec_tasks_released_total",
                "Claimed tasks given back unsent.",
            ),
            lag: Histogram::with_opts(
                HistogramOpts::new(
                    "orders_center_onec_delivery_lag_seconds",
                    "Time from the save's commit to 1C's answer.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0,
                ]),
            )
            .expect("valid metric"),
            claim_batch: Histogram::with_opts(
                HistogramOpts::new(
                    "orders_center_onec_claim_batch_size",
                    "Tasks per non-empty claim.",
                )
                .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]),
            )
            .expect("valid metric"),
            breaker_state: gauge(
                "orders_center_onec_breaker_state",
                "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            ),
            workers_busy: gauge("orders_center_relay_workers_busy", "Workers running a job."),
            workers: gauge("orders_center_relay_workers", "Workers in the pool."),
            registry,
        };
        for c in [
            Box::new(m.delivered_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.failed_total.clone()),
            Box::new(m.dead.clone()),
            Box::new(m.superseded.clone()),
            Box::new(m.onec_request.clone()),
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
        ] {
            m.leader_registry
                .register(c)
                .expect("metric names are unique");
        }
        m
    }

    pub(crate) fn backlog(&self, stats: &SyncStats) {
        self.backlog_pending.set(stats.pending);
        self.backlog_running.set(stats.running);
        self.backlog_dead.set(stats.dead);
        self.backlog_oldest_age
            .set(stats.oldest_pending_age_seconds);
    }

    pub(crate) fn claimed(&self, claimed: &store::Claimed) {
        if !claimed.tasks.is_empty() {
            self.claim_batch.observe(claimed.tasks.len() as f64);
        }
        self.superseded.inc_by(claimed.superseded);
    }

    pub(crate) fn answered(&self, outcome: &Outcome, seconds: f64) {
        let label = match outcome {
            Outcome::Delivered(_) => "delivered",
            Outcome::Failed(f) => f.class.as_str(),
        };
        self.onec_request
            .with_label_values(&[label])
            .observe(seconds);
    }

    /// Records a successful run of cron job `job`.
    pub fn ticked(&self, job: &str) {
        let now = Utc::now().timestamp_millis() as f64 / 1000.0;
        self.cron_last_success.with_label_values(&[job]).set(now);
    }

    pub(crate) fn delivered(&self, committed_at: DateTime<Utc>) {
        self.delivered_total.inc();
        let lag = (Utc::now() - committed_at)
            .num_microseconds()
            .unwrap_or(0)
            .max(0);
        self.lag.observe(lag as f64 / 1e6);
    }

    pub(crate) fn failed(&self, outcome: &Outcome) {
        if let Outcome::Failed(f) = outcome {
            self.failed_total
                .with_label_values(&[f.class.as_str()])
                .inc();
        }
    }

    /// The text exposition: every metric, plus the backlog while leading.
    pub fn render(&self, leading: bool) -> String {
        self.is_leader.set(i64::from(leading));
        let mut families = self.registry.gather();
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
