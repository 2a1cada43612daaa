//! The warm-up: at start the cache is filled from the database with the
//! most recently updated orders, newest first, until its budget is full, so
//! a restarted replica serves warm reads at once.

use std::time::{Duration, Instant};

use crate::{Entry, OrderCache};

/// What a warm-up loaded.
#[derive(Debug, Clone, Copy)]
pub struct WarmUp {
    /// Orders put in the cache.
    pub orders: usize,
    /// What they weigh.
    pub bytes: u64,
    /// How long it took.
    pub took: Duration,
}

/// Orders read per query.
const BATCH: usize = 500;

/// No order renders smaller than this, so a budget never needs more ids.
const SMALLEST_ENTRY: u64 = 400;

impl OrderCache {
    /// Fills the cache from `store`, most recently updated orders first,
    /// until the next one would not fit the budget; then it is ready.
    pub async fn warm_up(&self, store: &store::Store) -> store::Result<WarmUp> {
        let started = Instant::now();
        let budget = self.config().budget_bytes;
        let most = i64::try_from(budget / SMALLEST_ENTRY).unwrap_or(i64::MAX);
        let ids = store.recently_updated(most.clamp(1, 5_000_000)).await?;
        let (mut orders, mut bytes) = (0, 0u64);
        'batches: for chunk in ids.chunks(BATCH) {
            let snapshot = self.snapshot();
            let mut views = store.get_orders(chunk).await?;
            // Newest first within the batch too, as the ids came.
            let rank: std::collections::HashMap<&str, usize> = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| (id.as_str(), i))
                .collect();
            views.sort_by_key(|v| rank.get(v.full.order.id.as_str()).copied());
            for view in views {
                let entry = Entry::of(&view);
                let weight = u64::from(entry.weight(&view.full.order.id));
                if bytes + weight > budget {
                    break 'batches;
                }
                if self.offer(snapshot, &view.full.order.id, entry) {
                    orders += 1;
                    bytes += weight;
                }
            }
        }
        let took = started.elapsed();
        self.0.metrics.warmup.set(took.as_secs_f64());
        // Settles moka's pending writes, so the size gauges are exact.
        self.usage();
        self.mark_ready();
        Ok(WarmUp {
            orders,
            bytes,
            took,
        })
    }
}

/// The warm-up of a role: logged, and ready even if the database refused.
pub(crate) async fn run(cache: &OrderCache, store: &store::Store) {
    match cache.warm_up(store).await {
        Ok(w) => tracing::info!(
            orders = w.orders,
            bytes = w.bytes,
            took = ?w.took,
            "the order cache is warm"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "the order cache warm-up failed; it fills as orders are read");
            cache.mark_ready();
        }
    }
}
