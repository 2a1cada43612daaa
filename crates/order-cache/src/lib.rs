//! The API's read cache of whole orders (seed 002, guarantee 7).
//!
//! - **What:** an order as `GET /api/v1/orders/{id}` answers it, kept as its
//!   rendered JSON, with its version. The list and the history are not
//!   cached: a page depends on every order's row, and the history is part of
//!   the order's own body anyway.
//! - **How much:** bounded by a budget in bytes ([`moka`] weighs every entry
//!   by its body and key plus a fixed overhead, and evicts by TinyLFU).
//! - **Kept right by:** the `order_changed` notification every committed
//!   order write sends ([`listener`]); an entry older than a notified version
//!   is dropped. A listener that loses its connection drops the whole cache
//!   and serves nothing from it until it listens again, because what was
//!   announced meanwhile is lost.
//! - **Never older than seen:** a fill from the database is refused if a
//!   notification of a newer version was applied while it read, so a slow
//!   read can never put back what a notification took out.
//! - **The 1C state** (`sync`) changes without a new order version. An entry
//!   whose latest version is delivered (or has no 1C task) is served as is;
//!   one still in flight re-reads that one small row on each hit.

pub mod listener;
mod metrics;
mod warm;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use domain::{OrderFull, OrderView, SyncStatus, TaskState};
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use serde::Serialize;

pub use listener::Listener;
pub use metrics::CacheMetrics;
pub use warm::WarmUp;

/// What the cache may hold and how long a start may wait for it.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The most bytes the entries may weigh together.
    pub budget_bytes: u64,
    /// Readiness waits for the warm-up at most this long.
    pub warmup_limit: Duration,
}

/// Counted per entry on top of its body and key: the map node, the `Arc`
/// and the entry's own fields.
const ENTRY_OVERHEAD: u32 = 192;

/// How many applied notifications a fill can be checked against. A fill
/// whose read began before the oldest of them is not kept (it is served,
/// just not cached).
const RECENT: usize = 8192;

/// One cached order.
#[derive(Debug)]
pub struct Entry {
    version: i64,
    sync: Option<SyncStatus>,
    /// The answer's JSON; `body[..head]` is everything before `,"sync":`.
    body: Bytes,
    head: usize,
}

/// `OrderView` without its trailing `sync`, serialized the same way.
#[derive(Serialize)]
struct Head<'a> {
    #[serde(flatten)]
    full: &'a OrderFull,
    version: i64,
}

impl Entry {
    /// Renders `view` once.
    pub fn of(view: &OrderView) -> Self {
        let mut head = serde_json::to_vec(&Head {
            full: &view.full,
            version: view.version,
        })
        .expect("orders serialize");
        head.pop(); // the closing brace; `sync` follows
        let head_len = head.len();
        Self::assemble(view.version, view.sync.clone(), &head, head_len)
    }

    fn assemble(version: i64, sync: Option<SyncStatus>, head: &[u8], head_len: usize) -> Self {
        let sync_json = serde_json::to_vec(&sync).expect("sync states serialize");
        let mut body = BytesMut::with_capacity(head.len() + sync_json.len() + 10);
        body.put_slice(&head[..head_len]);
        body.put_slice(b",\"sync\":");
        body.put_slice(&sync_json);
        body.put_u8(b'}');
        Self {
            version,
            sync,
            body: body.freeze(),
            head: head_len,
        }
    }

    /// The same order with another 1C state.
    pub fn with_sync(&self, sync: Option<SyncStatus>) -> Self {
        Self::assemble(self.version, sync, &self.body, self.head)
    }

    /// The order's version (its ETag).
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The JSON answer, exactly as `serde_json` renders the `OrderView`.
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }

    /// Whether the 1C state can change without a new order version: only
    /// while the latest version's task is pending, running or dead (an
    /// operator may replay a dead one).
    pub fn sync_in_flight(&self) -> bool {
        self.sync.as_ref().is_some_and(|s| {
            matches!(
                s.state,
                TaskState::Pending | TaskState::Running | TaskState::Dead
            )
        })
    }

    /// The 1C state in the entry.
    pub fn sync(&self) -> Option<&SyncStatus> {
        self.sync.as_ref()
    }

    fn weight(&self, key: &str) -> u32 {
        u32::try_from(self.body.len() + key.len())
            .unwrap_or(u32::MAX)
            .saturating_add(ENTRY_OVERHEAD)
    }
}

/// Where the cache stood when a database read began; [`OrderCache::fill`]
/// keeps the read only if nothing since says it may be stale.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    live: bool,
    generation: u64,
    seq: u64,
}

/// The cache's bookkeeping of the listener, under one lock so a fill and a
/// notification never interleave.
struct Ledger {
    live: bool,
    /// Bumped whenever the whole cache is dropped or becomes live again.
    generation: u64,
    /// Notifications applied so far.
    seq: u64,
    /// The last [`RECENT`] of them: `(seq, order id, version)`.
    recent: VecDeque<(u64, String, i64)>,
}

struct Inner {
    entries: moka::sync::Cache<String, Arc<Entry>>,
    ledger: Mutex<Ledger>,
    /// `ledger.live`, readable by hits without the lock.
    live: AtomicBool,
    ready: AtomicBool,
    metrics: CacheMetrics,
    config: CacheConfig,
}

/// The cache; clones share it.
#[derive(Clone)]
pub struct OrderCache(Arc<Inner>);

impl OrderCache {
    /// An empty cache that serves nothing until a [`Listener`] listens.
    pub fn new(config: CacheConfig, metrics: CacheMetrics) -> Self {
        let evictions = metrics.evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.budget_bytes)
            .weigher(|k: &String, v: &Arc<Entry>| v.weight(k))
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build();
        Self(Arc::new(Inner {
            entries,
            ledger: Mutex::new(Ledger {
                live: false,
                generation: 0,
                seq: 0,
                recent: VecDeque::with_capacity(RECENT),
            }),
            live: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            metrics,
            config,
        }))
    }

    /// Its metrics.
    pub fn metrics(&self) -> &CacheMetrics {
        &self.0.metrics
    }

    /// Its configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.0.config
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.0
            .ledger
            .lock()
            .expect("no code panics holding the ledger")
    }

    /// The entry of `id` at `min_version` or newer, if the cache may serve
    /// one; counts a hit or a miss.
    pub fn get(&self, id: &str, min_version: i64) -> Option<Arc<Entry>> {
        let found = self
            .0
            .entries
            .get(id)
            .filter(|e| e.version >= min_version && self.0.live.load(Ordering::Acquire));
        self.0.metrics.lookup(found.is_some());
        found
    }

    /// Where the cache stands, before a database read whose result will be
    /// offered to [`OrderCache::fill`].
    pub fn snapshot(&self) -> Snapshot {
        let l = self.ledger();
        Snapshot {
            live: l.live,
            generation: l.generation,
            seq: l.seq,
        }
    }

    /// Offers `view`, read from the database since `snapshot`, to the
    /// cache; answers whether it was kept. It is not kept when the cache was
    /// not listening, was dropped meanwhile, may have missed a notification
    /// of this order, or already holds the same version or a newer one.
    pub fn fill(&self, snapshot: Snapshot, view: &OrderView) -> bool {
        self.offer(snapshot, &view.full.order.id, Entry::of(view))
    }

    /// Replaces the 1C state of the cached `version` of `id`, read since
    /// `snapshot`.
    pub fn refresh_sync(
        &self,
        snapshot: Snapshot,
        id: &str,
        entry: &Entry,
        sync: Option<SyncStatus>,
    ) -> Arc<Entry> {
        let fresh = Arc::new(entry.with_sync(sync));
        let l = self.ledger();
        if l.live && l.generation == snapshot.generation {
            let version = entry.version;
            let replacement = fresh.clone();
            self.0
                .entries
                .entry(id.to_owned())
                .and_compute_with(|existing| match existing {
                    Some(e) if e.value().version == version => Op::Put(replacement),
                    _ => Op::Nop,
                });
        }
        drop(l);
        fresh
    }

    fn offer(&self, snapshot: Snapshot, id: &str, entry: Entry) -> bool {
        let l = self.ledger();
        if !(snapshot.live && l.live && l.generation == snapshot.generation) {
            return false;
        }
        let version = entry.version;
        if l.seq != snapshot.seq {
            let covered = l
                .recent
                .front()
                .is_some_and(|(seq, _, _)| *seq <= snapshot.seq + 1);
            let newer = l
                .recent
                .iter()
                .rev()
                .take_while(|(seq, _, _)| *seq > snapshot.seq)
                .any(|(_, i, v)| i == id && *v > version);
            if !covered || newer {
                return false;
            }
        }
        let entry = Arc::new(entry);
        let kept =
            self.0
                .entries
                .entry(id.to_owned())
                .and_compute_with(|existing| match existing {
                    Some(e) if e.value().version >= version => Op::Nop,
                    _ => Op::Put(entry),
                });
        drop(l);
        self.0.metrics.size(&self.0.entries);
        matches!(
            kept,
            moka::ops::compute::CompResult::Inserted(_)
                | moka::ops::compute::CompResult::ReplacedWith(_)
        )
    }

    /// Applies a notification that `id` was committed at `version`, `lag`
    /// after its commit.
    pub fn notified(&self, id: &str, version: i64, lag: Duration) {
        let mut l = self.ledger();
        l.seq += 1;
        let seq = l.seq;
        if l.recent.len() == RECENT {
            l.recent.pop_front();
        }
        l.recent.push_back((seq, id.to_owned(), version));
        if self.0.entries.get(id).is_some_and(|e| e.version < version) {
            self.0.entries.invalidate(id);
        }
        drop(l);
        self.0.metrics.lag.observe(lag.as_secs_f64());
        self.0.metrics.size(&self.0.entries);
    }

    /// The listener lost its connection: notifications may be lost, so
    /// nothing cached can be trusted and nothing is served or kept until
    /// [`OrderCache::listening`].
    pub fn lost(&self) {
        let mut l = self.ledger();
        l.live = false;
        self.0.live.store(false, Ordering::Release);
        l.generation += 1;
        self.0.entries.invalidate_all();
        drop(l);
        self.0.metrics.resets.inc();
        self.0.entries.run_pending_tasks();
        self.0.metrics.size(&self.0.entries);
    }

    /// The listener listens (again): from now on every commit is announced.
    pub fn listening(&self) {
        let mut l = self.ledger();
        l.live = true;
        self.0.live.store(true, Ordering::Release);
        l.generation += 1;
        // Anything kept before is from a time nobody listened.
        self.0.entries.invalidate_all();
    }

    /// Whether a listener is listening now.
    pub fn is_live(&self) -> bool {
        self.0.live.load(Ordering::Acquire)
    }

    /// Whether the warm-up finished or its time limit passed.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
    }

    fn mark_ready(&self) {
        self.0.ready.store(true, Ordering::Release);
    }

    /// Entries and their total weight in bytes, with pending evictions done.
    pub fn usage(&self) -> (u64, u64) {
        self.0.entries.run_pending_tasks();
        self.0.metrics.size(&self.0.entries);
        (self.0.entries.entry_count(), self.0.entries.weighted_size())
    }
}

#[cfg(test)]
mod tests;
