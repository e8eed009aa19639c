//! Capped exponential backoff with jitter.
//!
//! Used for three things: when a failed row may be tried again, how long a
//! source waits after a database error, and how long the broker supervisor
//! waits between connection attempts. Pure arithmetic: the random part is
//! passed in, so every case is testable.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay before attempt number `attempt + 1`, after `attempt`
    /// failures (`attempt` >= 1). `unit` is a uniform random number in
    /// [0, 1): the result lies in [d/2, d), where d = min(initial * 2^(attempt-1), max)
    /// ("equal jitter"), so retries of rows that failed together spread out
    /// but never come back sooner than half the nominal delay.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(62);
        let nominal = self
            .initial
            .checked_mul(1u32.checked_shl(exp.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        let unit = unit.clamp(0.0, 1.0);
        nominal / 2 + nominal.mul_f64(unit / 2.0)
    }

    /// [`Backoff::delay`] with a fresh random jitter.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

    #[test]
    fn doubles_then_caps() {
        let cases = [
            // first failure: initial delay (no jitter at unit = 1.0 gives the full nominal)
            (1, 1.0, 100),
            // second failure doubles
            (2, 1.0, 200),
            (3, 1.0, 400),
            // 100ms * 2^7 = 12.8s, capped at 10s
            (8, 1.0, 10_000),
            // enormous attempt counts do not overflow
            (u32::MAX, 1.0, 10_000),
            // attempt 0 is treated like attempt 1
            (0, 1.0, 100),
        ];
        for (attempt, unit, want_ms) in cases {
            assert_eq!(
                B.delay(attempt, unit),
                Duration::from_millis(want_ms),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        // unit = 0 gives exactly half the nominal delay
        assert_eq!(B.delay(3, 0.0), Duration::from_millis(200));
        // out-of-range randomness is clamped, not trusted
        assert_eq!(B.delay(3, 7.0), Duration::from_millis(400));
        for _ in 0..1000 {
            let d = B.jittered(4);
            assert!(
                d >= Duration::from_millis(400) && d <= Duration::from_millis(800),
                "{d:?}"
            );
        }
    }
}
