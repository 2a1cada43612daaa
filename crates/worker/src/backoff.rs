//! When to try a failed delivery again.

use std::time::Duration;

/// Exponential backoff with "equal jitter": the delay doubles per attempt up
/// to `max`, and a random half of it is drawn, so retries of many tasks that
/// failed together spread out instead of arriving at 1C in one burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed attempt, before jitter.
    pub base: Duration,
    /// Largest delay, before jitter.
    pub max: Duration,
}

impl Backoff {
    /// The ceiling for the delay after `attempt` (1-based) failed attempts.
    pub fn ceiling(&self, attempt: i32) -> Duration {
        let doublings = attempt.saturating_sub(1).clamp(0, 30) as u32;
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The delay after `attempt` failed attempts, given `unit`, a random
    /// number in `[0, 1)`: between half the ceiling and the ceiling.
    pub fn delay(&self, attempt: i32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// [`Backoff::delay`] with a fresh random draw.
    pub fn delay_random(&self, attempt: i32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    #[test]
    fn the_ceiling_doubles_per_attempt_up_to_the_max() {
        let schedule: Vec<u64> = (1..=9).map(|a| POLICY.ceiling(a).as_secs()).collect();
        assert_eq!(schedule, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(POLICY.ceiling(10_000), Duration::from_secs(60));
        assert_eq!(POLICY.ceiling(0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_draws_between_half_the_ceiling_and_the_ceiling() {
        assert_eq!(POLICY.delay(4, 0.0), Duration::from_secs(4));
        assert_eq!(POLICY.delay(4, 0.5), Duration::from_secs(6));
        assert_eq!(
            POLICY.delay(4, 0.999_999),
            Duration::from_secs(8) - Duration::from_micros(4)
        );
        for _ in 0..1000 {
            let d = POLICY.delay_random(3);
            assert!(
                (Duration::from_secs(2)..Duration::from_secs(4)).contains(&d),
                "{d:?}"
            );
        }
    }
}
