//! A circuit breaker in front of a destination. While it fails, the relay stops
//! sending (and stops claiming), so an outage does not burn the attempts of
//! the whole backlog; after a cool-down one probe tests whether it is back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::clock::Clock;

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before a probe is let through.
    pub cool_down: Duration,
}

/// The breaker's state, as exported to metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Deliveries flow.
    Closed,
    /// Deliveries are refused until the cool-down ends.
    Open,
    /// One probe delivery decides between closed and open.
    HalfOpen,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }

    /// Its name, as reports and statuses spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "Closed",
            Self::Open => "Open",
            Self::HalfOpen => "HalfOpen",
        }
    }

    /// The state [`name`](Self::name) spells, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Closed, Self::Open, Self::HalfOpen]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// What the breaker says to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it.
    Allowed,
    /// Send it as the probe that decides whether to close.
    Probe,
    /// Do not send it.
    Refused,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// The breaker. Thread-safe; share it through an `Arc`.
pub struct CircuitBreaker {
    /// Changed while running (an operator's `OutboxRelay`); read under the
    /// state's lock, so one decision sees one config.
    config: Mutex<BreakerConfig>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// Every stored transition, for whoever reports them (Kubernetes
    /// Events): the lazy open → half-open of [`CircuitBreaker::state`] is
    /// published when a probe is admitted.
    changes: watch::Sender<BreakerState>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            config: Mutex::new(config),
            clock,
            state: Mutex::new(State::Closed { failures: 0 }),
            changes: watch::Sender::new(BreakerState::Closed),
        }
    }

    /// Applies new thresholds from the next decision on; the current state
    /// stays (an open breaker keeps its cool-down).
    pub fn reconfigure(&self, config: BreakerConfig) {
        *self.config.lock().expect("not poisoned") = config;
    }

    /// The thresholds in force.
    pub fn config(&self) -> BreakerConfig {
        *self.config.lock().expect("not poisoned")
    }

    /// The breaker's transitions: closed, open, half-open.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.changes.subscribe()
    }

    fn publish(&self, state: &State) {
        let public = match state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        self.changes
            .send_if_modified(|s| std::mem::replace(s, public) != public);
    }

    /// Asks to send one delivery.
    pub fn admit(&self) -> Admission {
        let mut state = self.state.lock().expect("not poisoned");
        match *state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } if self.clock.now() < until => Admission::Refused,
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                self.publish(&state);
                Admission::Probe
            }
            State::HalfOpen { probing: true } => Admission::Refused,
        }
    }

    /// Reports how an admitted delivery went: `healthy` unless the failure
    /// says something about 1C itself.
    pub fn record(&self, admission: Admission, healthy: bool) {
        let mut state = self.state.lock().expect("not poisoned");
        let config = self.config();
        let next = match (&*state, admission, healthy) {
            (State::HalfOpen { .. }, Admission::Probe, true) | (State::Closed { .. }, _, true) => {
                State::Closed { failures: 0 }
            }
            (State::HalfOpen { .. }, Admission::Probe, false) => self.opened(config),
            (State::Closed { failures }, _, false) if failures + 1 >= config.failure_threshold => {
                tracing::warn!(cool_down = ?config.cool_down, "the destination keeps failing; circuit breaker opens");
                self.opened(config)
            }
            (State::Closed { failures }, _, false) => State::Closed {
                failures: failures + 1,
            },
            // Late results of deliveries admitted before the breaker opened
            // change nothing: only the probe decides.
            _ => return,
        };
        *state = next;
        self.publish(&state);
    }

    fn opened(&self, config: BreakerConfig) -> State {
        State::Open {
            until: self.clock.now() + config.cool_down,
        }
    }

    /// How many deliveries the breaker would let through now: `None` for no
    /// limit, `Some(1)` when a probe is due, `Some(0)` while open.
    pub fn capacity(&self) -> Option<usize> {
        let state = self.state.lock().expect("not poisoned");
        match *state {
            State::Closed { .. } => None,
            State::Open { until } if self.clock.now() < until => Some(0),
            State::Open { .. } | State::HalfOpen { probing: false } => Some(1),
            State::HalfOpen { probing: true } => Some(0),
        }
    }

    /// Closes a breaker whose probe is due but has nothing to carry: the
    /// destination's backlog is empty, so other relays delivered it all and
    /// there is nothing left to protect. Without this, a relay that sat out
    /// the recovery would report half-open, and alert, until its next send.
    /// Returns whether it closed.
    pub fn close_when_idle(&self) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        let due = match *state {
            State::Open { until } => self.clock.now() >= until,
            State::HalfOpen { probing } => !probing,
            State::Closed { .. } => false,
        };
        if due {
            *state = State::Closed { failures: 0 };
            self.publish(&state);
        }
        due
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match *self.state.lock().expect("not poisoned") {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if self.clock.now() < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MockClock;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A mocked clock whose reading the test moves forward.
    fn clock() -> (Arc<dyn Clock>, Arc<AtomicU64>) {
        let start = Instant::now();
        let offset_ms = Arc::new(AtomicU64::new(0));
        let o = offset_ms.clone();
        let mut mock = MockClock::new();
        mock.expect_now()
            .returning(move || start + Duration::from_millis(o.load(Ordering::SeqCst)));
        (Arc::new(mock), offset_ms)
    }

    fn breaker() -> (CircuitBreaker, Arc<AtomicU64>) {
        let (clock, offset) = clock();
        let config = BreakerConfig {
            failure_threshold: 3,
            cool_down: Duration::from_secs(10),
        };
        (CircuitBreaker::new(config, clock), offset)
    }

    #[test]
    fn a_state_is_read_back_from_its_name() {
        for state in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            assert_eq!(BreakerState::from_name(state.name()), Some(state));
        }
        assert_eq!(BreakerState::from_name("open"), None);
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_in_between_resets_the_count() {
        let (b, _) = breaker();
        for healthy in [false, false, true, false, false] {
            assert_eq!(b.admit(), Admission::Allowed);
            b.record(Admission::Allowed, healthy);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(Admission::Allowed, false);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(), Admission::Refused);
        assert_eq!(b.capacity(), Some(0));
    }

    #[test]
    fn after_the_cool_down_one_probe_decides() {
        let (b, now) = breaker();
        for _ in 0..3 {
            b.record(b.admit(), false);
        }
        now.store(9_999, Ordering::SeqCst);
        assert_eq!(b.admit(), Admission::Refused);

        now.store(10_000, Ordering::SeqCst);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.capacity(), Some(1));
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.admit(), Admission::Refused, "only one probe at a time");
        b.record(Admission::Probe, false);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens it");

        now.store(20_000, Ordering::SeqCst);
        assert_eq!(b.admit(), Admission::Probe);
        b.record(Admission::Probe, true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.capacity(), None);
        assert_eq!(b.admit(), Admission::Allowed);
    }

    #[test]
    fn an_idle_close_waits_for_the_cool_down_and_never_cuts_a_probe_short() {
        let (b, now) = breaker();
        for _ in 0..3 {
            b.record(b.admit(), false);
        }
        assert!(!b.close_when_idle(), "still cooling down");
        assert_eq!(b.state(), BreakerState::Open);

        now.store(10_000, Ordering::SeqCst);
        assert_eq!(b.admit(), Admission::Probe);
        assert!(!b.close_when_idle(), "a probe in flight decides");
        b.record(Admission::Probe, false);

        now.store(20_000, Ordering::SeqCst);
        assert!(b.close_when_idle());
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Admission::Allowed);
        assert!(!b.close_when_idle(), "already closed");
    }

    #[test]
    fn transitions_are_published_and_new_thresholds_apply_to_the_next_decision() {
        let (b, now) = breaker();
        let mut changes = b.subscribe();
        b.reconfigure(BreakerConfig {
            failure_threshold: 1,
            cool_down: Duration::from_secs(1),
        });
        b.record(b.admit(), false);
        assert_eq!(
            *changes.borrow_and_update(),
            BreakerState::Open,
            "one failure opens it now"
        );
        now.store(1_000, Ordering::SeqCst);
        assert_eq!(
            b.admit(),
            Admission::Probe,
            "after the new, shorter cool-down"
        );
        assert_eq!(*changes.borrow_and_update(), BreakerState::HalfOpen);
        b.record(Admission::Probe, true);
        assert_eq!(*changes.borrow_and_update(), BreakerState::Closed);
        b.record(b.admit(), true);
        assert!(
            !changes.has_changed().unwrap(),
            "closed stays closed: nothing published"
        );
    }

    #[test]
    fn late_results_from_before_the_opening_do_not_close_it() {
        let (b, _) = breaker();
        for _ in 0..3 {
            b.record(Admission::Allowed, false);
        }
        b.record(Admission::Allowed, true);
        assert_eq!(b.state(), BreakerState::Open);
    }
}
