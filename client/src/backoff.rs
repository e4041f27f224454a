//! Reconnect delays: exponential backoff with full jitter, so that after a
//! server restart clients come back spread over the whole window instead
//! of in the same second.

use std::time::Duration;

/// Backoff settings.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Largest upper bound.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(500), max: Duration::from_secs(60) }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0-based): uniform in
    /// `[0, min(max, initial * 2^attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl rand::Rng) -> Duration {
        let cap = self.initial.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).min(self.max);
        Duration::from_nanos(rng.random_range(0..=cap.as_nanos() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delays_grow_to_the_cap_and_spread_out() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            let cap = (Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(20))).min(Duration::from_secs(2));
            for _ in 0..50 {
                assert!(b.delay(attempt, &mut rng) <= cap);
            }
        }
        // Full jitter: 1,000 clients restarting together spread over the
        // window rather than bunching at its end.
        let delays: Vec<Duration> = (0..1_000).map(|_| b.delay(10, &mut rng)).collect();
        let early = delays.iter().filter(|d| **d < Duration::from_secs(1)).count();
        assert!((350..650).contains(&early), "{early} of 1000 in the first half");
    }
}
