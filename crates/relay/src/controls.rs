//! What an operator may change per destination while the relay runs:
//! pausing it, and its batch size, limits and breaker. The flags give the
//! starting [`Settings`]; whoever steers the relay (the `OutboxRelay`
//! resource) applies new ones, and the engines read them on every claim.

use std::sync::Arc;

use domain::Destination;
use tokio::sync::{watch, Notify};
use worker::BreakerState;

use crate::guard::{ProtectionConfig, SinkGuard};

/// One destination's live settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// No new claims while set; deliveries in flight finish.
    pub paused: bool,
    /// Most tasks (or log events) claimed at once.
    pub batch_size: u32,
    /// The limits and breaker in front of the sink.
    pub protection: ProtectionConfig,
}

/// The controls of one destination of this relay.
pub struct Controls {
    destination: Destination,
    guard: Arc<SinkGuard>,
    flags: Settings,
    settings: watch::Sender<Settings>,
    wake: Arc<Notify>,
}

impl Controls {
    /// The controls of `destination`, delivered through `guard`, starting
    /// unpaused with the guard's protection and `batch_size`.
    pub fn new(destination: Destination, guard: Arc<SinkGuard>, batch_size: u32) -> Self {
        let flags = Settings {
            paused: false,
            batch_size,
            protection: guard.config(),
        };
        Self {
            destination,
            guard,
            flags,
            settings: watch::Sender::new(flags),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The destination.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// The settings the flags gave, in force while nobody applies others.
    pub fn flags(&self) -> Settings {
        self.flags
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        *self.settings.borrow()
    }

    /// Applies `settings` from the next claim on. Resuming wakes the
    /// engine at once rather than at its next poll.
    pub fn apply(&self, settings: Settings) {
        let before = self.settings();
        if before == settings {
            return;
        }
        self.guard.reconfigure(settings.protection);
        self.settings.send_replace(settings);
        tracing::info!(destination = %self.destination, paused = settings.paused, batch_size = settings.batch_size,
            max_in_flight = settings.protection.max_in_flight, rate_per_second = ?settings.protection.rate_per_second,
            breaker = ?settings.protection.breaker, "delivery settings changed");
        if before.paused && !settings.paused {
            self.wake.notify_one();
        }
    }

    /// Whether claims are paused.
    pub fn paused(&self) -> bool {
        self.settings.borrow().paused
    }

    /// The batch size in force.
    pub fn batch_size(&self) -> u32 {
        self.settings.borrow().batch_size.max(1)
    }

    /// The breaker's state in this relay.
    pub fn breaker(&self) -> BreakerState {
        self.guard.breaker_state()
    }

    /// The breaker's transitions in this relay.
    pub fn breaker_changes(&self) -> watch::Receiver<BreakerState> {
        self.guard.breaker_changes()
    }

    pub(crate) fn guard(&self) -> &SinkGuard {
        &self.guard
    }

    /// Notified when the destination may have work: a save's NOTIFY, a
    /// rescue, or a resume.
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use worker::{BreakerConfig, SystemClock};

    #[tokio::test]
    async fn settings_apply_to_the_guard_and_a_resume_wakes_the_engine() {
        let protection = ProtectionConfig {
            max_in_flight: 4,
            rate_per_second: None,
            breaker: BreakerConfig {
                failure_threshold: 5,
                cool_down: Duration::from_secs(10),
            },
        };
        let guard = Arc::new(SinkGuard::new(
            Arc::new(sink::MockSink::new()),
            protection,
            Arc::new(SystemClock),
            crate::RelayMetrics::new().destination("onec"),
        ));
        let controls = Controls::new(Destination::onec(), guard.clone(), 100);
        let wake = controls.wake();
        let mut paused = controls.flags();
        paused.paused = true;
        paused.protection.max_in_flight = 2;
        controls.apply(paused);
        assert!(controls.paused());
        assert_eq!(guard.capacity(), 2, "the guard took the new limit");
        let woken = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
        assert!(woken.is_err(), "a pause wakes nobody");

        controls.apply(controls.flags());
        assert!(!controls.paused());
        assert_eq!(guard.capacity(), 4);
        tokio::time::timeout(Duration::from_secs(1), wake.notified())
            .await
            .expect("a resume wakes the engine at once");
    }
}
