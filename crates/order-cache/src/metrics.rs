//! Prometheus metrics of the cache, on the registry of the API that owns it.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

/// The cache's series; clones share them.
#[derive(Clone)]
pub struct CacheMetrics {
    lookups: IntCounterVec,
    pub(crate) evictions: IntCounter,
    pub(crate) resets: IntCounter,
    bytes: IntGauge,
    entries: IntGauge,
    pub(crate) warmup: Gauge,
    pub(crate) lag: Histogram,
}

impl CacheMetrics {
    /// Registers the series on `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let m = Self {
            lookups: IntCounterVec::new(
                Opts::new(
                    "orders_center_cache_lookups_total",
                    "Order reads by the cache's answer: hit or miss.",
                ),
                &["result"],
            )?,
            evictions: IntCounter::new(
                "orders_center_cache_evictions_total",
                "Entries evicted to stay within the cache's byte budget.",
            )?,
            resets: IntCounter::new(
                "orders_center_cache_resets_total",
                "Times the whole cache was dropped because its listener lost the connection.",
            )?,
            bytes: IntGauge::new(
                "orders_center_cache_size_bytes",
                "What the cached entries weigh: bodies, keys and a fixed overhead each.",
            )?,
            entries: IntGauge::new("orders_center_cache_entries", "Orders in the cache.")?,
            warmup: Gauge::new(
                "orders_center_cache_warmup_seconds",
                "How long the last warm-up from the database took.",
            )?,
            lag: Histogram::with_opts(
                HistogramOpts::new(
                    "orders_center_cache_notification_lag_seconds",
                    "From an order's commit to this replica's cache applying its notification.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                ]),
            )?,
        };
        for result in ["hit", "miss"] {
            m.lookups.with_label_values(&[result]);
        }
        registry.register(Box::new(m.lookups.clone()))?;
        registry.register(Box::new(m.evictions.clone()))?;
        registry.register(Box::new(m.resets.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.entries.clone()))?;
        registry.register(Box::new(m.warmup.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        Ok(m)
    }

    /// Series on a registry of their own, for tests and tools.
    pub fn unregistered() -> Self {
        Self::register(&prometheus::Registry::new()).expect("a fresh registry has no names")
    }

    pub(crate) fn lookup(&self, hit: bool) {
        self.lookups
            .with_label_values(&[if hit { "hit" } else { "miss" }])
            .inc();
    }

    pub(crate) fn size<K, V>(&self, cache: &moka::sync::Cache<K, V>)
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        self.bytes
            .set(i64::try_from(cache.weighted_size()).unwrap_or(i64::MAX));
        self.entries
            .set(i64::try_from(cache.entry_count()).unwrap_or(i64::MAX));
    }

    /// Hits and misses so far.
    pub fn lookups(&self) -> (u64, u64) {
        (
            self.lookups.with_label_values(&["hit"]).get(),
            self.lookups.with_label_values(&["miss"]).get(),
        )
    }

    /// Resets so far.
    pub fn resets(&self) -> u64 {
        self.resets.get()
    }

    /// Evictions so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.get()
    }

    /// Notifications applied, and the sum of their lags in seconds.
    pub fn lag(&self) -> (u64, f64) {
        (self.lag.get_sample_count(), self.lag.get_sample_sum())
    }
}
