//! What stands between the relay and each destination's sink: a limit on
//! requests in flight, a requests-per-second limit and the circuit breaker.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sink::{Message, Outcome, Sink};
use tokio::sync::Semaphore;
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

/// The guarded path to one destination; share it through an `Arc`.
pub struct SinkGuard {
    sink: Arc<dyn Sink>,
    metrics: DestinationMetrics,
    in_flight: Semaphore,
    limiter: Option<DefaultDirectRateLimiter>,
    /// The limiter's burst: the most cells one wait may ask for.
    burst: u32,
    max_in_flight: usize,
    breaker: CircuitBreaker,
}

impl SinkGuard {
    /// Guards `sink` with `config`.
    pub fn new(
        sink: Arc<dyn Sink>,
        config: ProtectionConfig,
        clock: Arc<dyn Clock>,
        metrics: DestinationMetrics,
    ) -> Self {
        Self {
            sink,
            metrics,
            in_flight: Semaphore::new(config.max_in_flight.max(1)),
            max_in_flight: config.max_in_flight.max(1),
            burst: config.rate_per_second.map_or(u32::MAX, NonZeroU32::get),
            limiter: config
                .rate_per_second
                .map(|r| RateLimiter::direct(Quota::per_second(r))),
            breaker: CircuitBreaker::new(config.breaker, clock),
        }
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
            slot = self.in_flight.acquire() => slot.expect("the semaphore is never closed"),
        };
        if let Some(limiter) = &self.limiter {
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
        let slots = n.min(u32::try_from(self.max_in_flight).unwrap_or(u32::MAX));
        let _slots = tokio::select! {
            biased;
            () = cancel.cancelled() => return None,
            slots = self.in_flight.acquire_many(slots) => slots.expect("the semaphore is never closed"),
        };
        if let Some(limiter) = &self.limiter {
            let mut left = n;
            while left > 0 {
                let take = left.min(self.burst);
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
