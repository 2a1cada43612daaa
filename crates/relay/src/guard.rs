//! What stands between the relay and each destination's sink: a limit on
//! requests in flight, a requests-per-second limit and the circuit breaker.
//! Each can be changed while deliveries run ([`SinkGuard::reconfigure`]).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sink::{Message, Outcome, Sink};
use tokio::sync::{watch, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use worker::{Admission, BreakerConfig, BreakerState, CircuitBreaker, Clock};

use crate::metrics::DestinationMetrics;

/// Protection settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProtectionConfig {
    /// Most requests to the destination at once, over all workers of this
    /// relay.
    pub max_in_flight: usize,
    /// Most requests per second from this relay; `None` for no limit.
    pub rate_per_second: Option<NonZeroU32>,
    /// Breaker settings.
    pub breaker: BreakerConfig,
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// It was sent, and this came back.
    Sent(Outcome),
    /// It was not sent: the breaker is open or the relay is shutting down.
    NotSent,
}

/// A requests-per-second limit and its burst: the most cells one wait
/// may ask for.
struct Rate {
    limiter: Arc<DefaultDirectRateLimiter>,
    burst: u32,
}

impl Rate {
    fn of(config: &ProtectionConfig) -> Option<Self> {
        config.rate_per_second.map(|r| Self {
            limiter: Arc::new(RateLimiter::direct(Quota::per_second(r))),
            burst: r.get(),
        })
    }
}

/// The guarded path to one destination; share it through an `Arc`.
pub struct SinkGuard {
    sink: Arc<dyn Sink>,
    metrics: DestinationMetrics,
    in_flight: Semaphore,
    /// The in-flight limit in force.
    max_in_flight: AtomicUsize,
    /// Slots owed after the limit was lowered while they were taken: each
    /// comes back as a delivery ends, and is dropped instead of freed.
    owed: AtomicUsize,
    rate: RwLock<Option<Rate>>,
    config: Mutex<ProtectionConfig>,
    breaker: CircuitBreaker,
}

/// Slots taken from the in-flight limit, given back (or paid towards a
/// lowered limit) on drop.
struct Slots<'a> {
    permit: Option<SemaphorePermit<'a>>,
    guard: &'a SinkGuard,
}

impl Drop for Slots<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let n = permit.num_permits();
        let paid = take_up_to(&self.guard.owed, n);
        if paid > 0 {
            permit.forget();
            self.guard.in_flight.add_permits(n - paid);
        }
    }
}

/// Subtracts up to `n` from `counter` and returns how much it took.
fn take_up_to(counter: &AtomicUsize, n: usize) -> usize {
    let mut taken = 0;
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| {
        taken = owed.min(n);
        Some(owed - taken)
    });
    taken
}

impl SinkGuard {
    /// Guards `sink` with `config`.
    pub fn new(
        sink: Arc<dyn Sink>,
        config: ProtectionConfig,
        clock: Arc<dyn Clock>,
        metrics: DestinationMetrics,
    ) -> Self {
        let max_in_flight = config.max_in_flight.max(1);
        Self {
            sink,
            metrics,
            in_flight: Semaphore::new(max_in_flight),
            max_in_flight: AtomicUsize::new(max_in_flight),
            owed: AtomicUsize::new(0),
            rate: RwLock::new(Rate::of(&config)),
            config: Mutex::new(config),
            breaker: CircuitBreaker::new(config.breaker, clock),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> ProtectionConfig {
        *self.config.lock().expect("not poisoned")
    }

    /// Applies `config` to the deliveries that start from now on; those in
    /// flight finish under the old limits. A lowered in-flight limit takes
    /// its slots back as deliveries end.
    pub fn reconfigure(&self, config: ProtectionConfig) {
        let mut current = self.config.lock().expect("not poisoned");
        if *current == config {
            return;
        }
        let new = config.max_in_flight.max(1);
        let old = self.max_in_flight.swap(new, Ordering::SeqCst);
        if new > old {
            let paid = take_up_to(&self.owed, new - old);
            self.in_flight.add_permits(new - old - paid);
        } else if new < old {
            let freed = self.in_flight.forget_permits(old - new);
            self.owed.fetch_add(old - new - freed, Ordering::SeqCst);
        }
        if current.rate_per_second != config.rate_per_second {
            *self.rate.write().expect("not poisoned") = Rate::of(&config);
        }
        self.breaker.reconfigure(config.breaker);
        *current = config;
    }

    /// How many deliveries are worth claiming now: the free in-flight slots,
    /// or one probe, or none while the breaker is open.
    pub fn capacity(&self) -> usize {
        let free = self.in_flight.available_permits();
        self.breaker.capacity().map_or(free, |n| n.min(free))
    }

    /// The breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The breaker's transitions.
    pub fn breaker_changes(&self) -> watch::Receiver<BreakerState> {
        self.breaker.subscribe()
    }

    /// The rate limit in force, if any: cloned out, so no lock is held
    /// across a wait.
    fn rate(&self) -> Option<(Arc<DefaultDirectRateLimiter>, u32)> {
        let rate = self.rate.read().expect("not poisoned");
        rate.as_ref().map(|r| (r.limiter.clone(), r.burst))
    }

    async fn slots(&self, n: u32) -> Slots<'_> {
        let permit = self
            .in_flight
            .acquire_many(n)
            .await
            .expect("the semaphore is never closed");
        Slots {
            permit: Some(permit),
            guard: self,
        }
    }

    /// Whether the breaker waits for a probe (it closes only after one).
    pub fn probe_due(&self) -> bool {
        self.breaker.capacity() == Some(1)
    }

    /// Closes a breaker whose probe is due when the destination has nothing
    /// left to deliver; see [`CircuitBreaker::close_when_idle`].
    pub fn close_when_idle(&self) -> bool {
        self.breaker.close_when_idle()
    }

    /// Sets the breaker gauge of this destination, for a scrape.
    pub fn report_breaker(&self) {
        self.metrics
            .breaker_state
            .set(self.breaker.state().as_gauge());
    }

    /// Sends `message` when a slot and the rate limit allow and the breaker
    /// admits it. Waiting ends early, unsent, when `cancel` fires; a request
    /// already sent is always awaited (the sink's own timeout bounds it).
    pub async fn deliver(&self, message: &Message, cancel: &CancellationToken) -> Attempt {
        let _slot = tokio::select! {
            biased;
            () = cancel.cancelled() => return Attempt::NotSent,
            slot = self.slots(1) => slot,
        };
        if let Some((limiter, _)) = self.rate() {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Attempt::NotSent,
                () = limiter.until_ready() => {}
            }
        }
        let admission = self.breaker.admit();
        if admission == Admission::Refused {
            return Attempt::NotSent;
        }
        let sent = std::time::Instant::now();
        let outcome = self.sink.deliver(message).await;
        self.metrics
            .answered(&outcome, sent.elapsed().as_secs_f64());
        let healthy = match &outcome {
            Ok(()) => true,
            Err(f) => !f.counts_against_destination,
        };
        self.breaker.record(admission, healthy);
        Attempt::Sent(outcome)
    }

    /// Sends `messages`, the run of log partition `partition`, as one batch
    /// when as many slots and the rate limit allow and the breaker admits
    /// it; `None` when it was not sent. The breaker counts the batch as one
    /// request, unwell when any answer says the destination is.
    pub async fn deliver_run(
        &self,
        partition: i16,
        messages: &[Message],
        cancel: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        let n = u32::try_from(messages.len()).unwrap_or(u32::MAX).max(1);
        let max_in_flight = self.max_in_flight.load(Ordering::SeqCst);
        let slots = n.min(u32::try_from(max_in_flight).unwrap_or(u32::MAX));
        let _slots = tokio::select! {
            biased;
            () = cancel.cancelled() => return None,
            slots = self.slots(slots) => slots,
        };
        if let Some((limiter, burst)) = self.rate() {
            let mut left = n;
            while left > 0 {
                let take = left.min(burst);
                let chunk = NonZeroU32::new(take).expect("more than zero");
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return None,
                    ready = limiter.until_n_ready(chunk) => ready.expect("within the burst"),
                }
                left -= take;
            }
        }
        let admission = self.breaker.admit();
        if admission == Admission::Refused {
            return None;
        }
        let sent = std::time::Instant::now();
        let outcomes = self.sink.deliver_run(partition, messages).await;
        let seconds = sent.elapsed().as_secs_f64();
        for outcome in &outcomes {
            self.metrics.answered(outcome, seconds);
        }
        let healthy = outcomes.iter().all(|o| {
            o.as_ref()
                .map_or_else(|f| !f.counts_against_destination, |()| true)
        });
        self.breaker.record(admission, healthy);
        Some(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use worker::SystemClock;

    fn config(max_in_flight: usize, rate: Option<u32>) -> ProtectionConfig {
        ProtectionConfig {
            max_in_flight,
            rate_per_second: rate.and_then(NonZeroU32::new),
            breaker: BreakerConfig {
                failure_threshold: 5,
                cool_down: Duration::from_secs(10),
            },
        }
    }

    fn guard(c: ProtectionConfig) -> SinkGuard {
        SinkGuard::new(
            Arc::new(sink::MockSink::new()),
            c,
            Arc::new(SystemClock),
            crate::RelayMetrics::new().destination("x"),
        )
    }

    #[tokio::test]
    async fn a_lowered_in_flight_limit_takes_its_slots_back_as_deliveries_end() {
        let g = guard(config(4, None));
        let held = g.slots(3).await;
        assert_eq!(g.capacity(), 1);
        g.reconfigure(config(2, None));
        assert_eq!(
            g.capacity(),
            0,
            "the free slot goes at once; one more is owed"
        );
        drop(held);
        assert_eq!(
            g.capacity(),
            2,
            "the owed slot was kept back, the rest freed"
        );
        g.reconfigure(config(5, None));
        assert_eq!(g.capacity(), 5);
        let held = g.slots(5).await;
        g.reconfigure(config(1, None));
        g.reconfigure(config(3, None));
        drop(held);
        assert_eq!(
            g.capacity(),
            3,
            "raising the limit again pays the debt first"
        );
    }

    #[tokio::test]
    async fn the_rate_limit_and_breaker_change_in_place() {
        let g = guard(config(4, Some(100)));
        assert_eq!(g.rate().map(|r| r.1), Some(100));
        let mut c = config(4, Some(7));
        c.breaker.failure_threshold = 1;
        g.reconfigure(c);
        assert_eq!(g.rate().map(|r| r.1), Some(7));
        assert_eq!(g.config(), c);
        g.breaker.record(g.breaker.admit(), false);
        assert_eq!(
            g.breaker_state(),
            BreakerState::Open,
            "one failure opens it now"
        );
        g.reconfigure(config(4, None));
        assert!(g.rate().is_none(), "no limit");
    }
}
