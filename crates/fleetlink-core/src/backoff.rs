//! Reconnect delays: exponential backoff with jitter.

use std::time::Duration;

/// Exponential backoff: the cap doubles (by `multiplier`) per failed attempt up to `max`, and the
/// delay is drawn uniformly from the upper half of the cap ("equal jitter"), so a fleet that lost
/// its server does not reconnect in lockstep yet never retries immediately.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Cap of the first retry.
    pub initial: Duration,
    /// Largest cap.
    pub max: Duration,
    /// Growth of the cap per attempt.
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based); `jitter` is a random number in [0, 1).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let cap = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.5
        };
        Duration::from_secs_f64(cap / 2.0 + cap / 2.0 * jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Delays stay within [cap/2, cap], never exceed `max`, and the cap grows with attempts.
        #[test]
        fn delays_are_bounded_and_grow(attempt in 0u32..100, j1 in 0.0f64..1.0, j2 in 0.0f64..1.0) {
            let b = Backoff::default();
            let d = b.delay(attempt, j1);
            prop_assert!(d <= b.max);
            prop_assert!(d >= b.initial / 2);
            let lo_now = b.delay(attempt, 0.0);
            let lo_next = b.delay(attempt + 1, 0.0);
            prop_assert!(lo_next >= lo_now);
            prop_assert!(b.delay(attempt, j2.max(j1)) >= b.delay(attempt, j2.min(j1)));
        }
    }
}
