//! Delays between attempts: a task's retries, delay(n) = min(1 s · 2^n ·
//! U(0.75, 1.25), 60 s), and the reconnect loops of the processes
//! ([`Backoff`]).

use std::time::Duration;

use rand::Rng;

pub const BASE: Duration = Duration::from_secs(1);
pub const CAP: Duration = Duration::from_secs(60);
pub const JITTER_LOW: f64 = 0.75;
pub const JITTER_HIGH: f64 = 1.25;
/// Retries after the first attempt when a task does not say.
pub const DEFAULT_MAX_RETRIES: i32 = 3;

/// Delay before retry number `retry` (0 for the first retry).
pub fn delay(retry: u32, rng: &mut impl Rng) -> Duration {
    let factor = rng.random_range(JITTER_LOW..JITTER_HIGH);
    delay_with_factor(retry, factor)
}

/// The delay for a given jitter factor; `delay` draws the factor.
pub fn delay_with_factor(retry: u32, factor: f64) -> Duration {
    // From 2^7 s on even the lowest jitter exceeds the cap, so larger
    // exponents need no arithmetic (and cannot overflow).
    let exp = retry.min(7);
    let secs = BASE.as_secs_f64() * f64::from(1u32 << exp) * factor;
    Duration::from_secs_f64(secs).min(CAP)
}

/// The window that `delay(retry, _)` falls in: [low, high].
pub fn bounds(retry: u32) -> (Duration, Duration) {
    (
        delay_with_factor(retry, JITTER_LOW),
        delay_with_factor(retry, JITTER_HIGH),
    )
}

/// Exponential delays for a loop that retries a connection or a call:
/// `first`, doubling up to `max`; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The delay before the next attempt; the one after is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn reconnect_backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn doubles_from_one_second_within_jitter_and_caps() {
        let table = [
            (0, 0.75, 1.25),
            (1, 1.5, 2.5),
            (2, 3.0, 5.0),
            (3, 6.0, 10.0),
            (4, 12.0, 20.0),
            (5, 24.0, 40.0),
            (6, 48.0, 60.0),
            (7, 60.0, 60.0),
            (40, 60.0, 60.0),
        ];
        for (retry, low, high) in table {
            let (lo, hi) = bounds(retry);
            assert!((lo.as_secs_f64() - low).abs() < 1e-9, "retry {retry}: low {lo:?}");
            assert!((hi.as_secs_f64() - high).abs() < 1e-9, "retry {retry}: high {hi:?}");
        }
        assert_eq!(delay_with_factor(0, 1.0), Duration::from_secs(1));
        assert_eq!(delay_with_factor(3, 1.0), Duration::from_secs(8));
    }

    #[test]
    fn seeded_draws_are_deterministic_and_inside_the_window() {
        let mut a = StdRng::seed_from_u64(7);
        let mut b = StdRng::seed_from_u64(7);
        for retry in 0..10 {
            let (da, db) = (delay(retry, &mut a), delay(retry, &mut b));
            assert_eq!(da, db);
            let (lo, hi) = bounds(retry);
            assert!(lo <= da && da <= hi, "retry {retry}: {da:?} outside {lo:?}..{hi:?}");
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut rng = StdRng::seed_from_u64(1);
        let draws: Vec<Duration> = (0..50).map(|_| delay(2, &mut rng)).collect();
        let min = draws.iter().min().copied().unwrap_or_default();
        let max = draws.iter().max().copied().unwrap_or_default();
        assert!(max - min > Duration::from_millis(500), "{min:?}..{max:?}");
    }
}
