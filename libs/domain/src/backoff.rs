//! Delays between attempts, one policy type for all of them: a task's
//! retries ([`TASK_RETRY`]: delay(n) = min(1 s · 2^n · U(0.75, 1.25), 60 s),
//! stored on the task) and every loop of the processes that retries a
//! connection or a call ([`Policy::start`] gives its [`Backoff`]).

use std::time::Duration;

use rand::Rng;

/// Retries after the first attempt when a task does not say.
pub const DEFAULT_MAX_RETRIES: i32 = 3;

/// A task's retries (RULES "Backoff"): 1 s doubling, ±25 %, at most 60 s.
pub const TASK_RETRY: Policy = Policy::exponential(Duration::from_secs(1), Duration::from_secs(60)).jitter(0.25);

/// How attempts are spaced: delays that start at `first` and grow by
/// `factor` each time (1: fixed) up to `max`, each drawn within ±`jitter`
/// of its nominal value (so that many processes retrying together spread
/// out), and, optionally, a limit on the attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub first: Duration,
    pub max: Duration,
    pub factor: u32,
    /// 0 to 0.5: a delay is its nominal value × U(1 − jitter, 1 + jitter),
    /// then capped at `max`.
    pub jitter: f64,
    /// Attempts in all (the first included) before the caller gives up;
    /// None: no limit.
    pub max_attempts: Option<u32>,
}

impl Policy {
    /// `first`, doubling up to `max`, no jitter, no limit.
    pub const fn exponential(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            factor: 2,
            jitter: 0.0,
            max_attempts: None,
        }
    }

    /// The same delay every time.
    pub const fn fixed(every: Duration) -> Self {
        Self {
            first: every,
            max: every,
            factor: 1,
            jitter: 0.0,
            max_attempts: None,
        }
    }

    /// Spreads each delay ±`fraction` (clamped to 0 ..= 0.5).
    pub const fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 0.5);
        self
    }

    /// Gives up after `n` attempts in all.
    pub const fn attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// The delay before retry `n` (0: the first retry) for a jitter draw
    /// `factor` in [1 − jitter, 1 + jitter].
    pub fn delay_with_factor(&self, n: u32, factor: f64) -> Duration {
        // In f64 the growth cannot overflow for any exponent this is given
        // (at most 64: far past every cap), and the cap applies after it.
        let growth = f64::from(self.factor.max(1)).powi(n.min(64) as i32);
        let secs = (self.first.as_secs_f64() * growth * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The delay before retry `n`, its jitter drawn from `rng`.
    pub fn delay(&self, n: u32, rng: &mut impl Rng) -> Duration {
        let factor = if self.jitter > 0.0 {
            rng.random_range(1.0 - self.jitter..1.0 + self.jitter)
        } else {
            1.0
        };
        self.delay_with_factor(n, factor)
    }

    /// The window `delay(n, _)` falls in: [low, high].
    pub fn bounds(&self, n: u32) -> (Duration, Duration) {
        (
            self.delay_with_factor(n, 1.0 - self.jitter),
            self.delay_with_factor(n, 1.0 + self.jitter),
        )
    }

    /// The delays of one run of attempts.
    pub fn start(self) -> Backoff {
        Backoff {
            policy: self,
            failures: 0,
        }
    }
}

/// Delay before a task's retry number `retry` (0 for the first retry).
pub fn delay(retry: u32, rng: &mut impl Rng) -> Duration {
    TASK_RETRY.delay(retry, rng)
}

/// The window a task's retry number `retry` falls in: [low, high].
pub fn bounds(retry: u32) -> (Duration, Duration) {
    TASK_RETRY.bounds(retry)
}

/// Where a loop stands in its policy: how many attempts failed since the
/// last success.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    failures: u32,
}

impl Backoff {
    /// Counts a failed attempt and says how long to wait before the next.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.failures, &mut rand::rng());
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Whether the policy allows another attempt after the failures
    /// counted so far.
    pub fn may_retry(&self) -> bool {
        self.policy.max_attempts.is_none_or(|n| self.failures < n)
    }

    /// After a success: the next failure starts from the first delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn a_loop_backs_off_doubling_to_its_cap_and_starts_over_after_a_success() {
        let mut b = Policy::exponential(Duration::from_millis(100), Duration::from_millis(500)).start();
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        let mut fixed = Policy::fixed(Duration::from_secs(2)).start();
        assert_eq!(
            (fixed.next_delay(), fixed.next_delay()),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
    }

    #[test]
    fn a_limited_policy_allows_its_attempts_and_no_more() {
        let mut b = Policy::fixed(Duration::ZERO).attempts(3).start();
        let mut attempts = 0;
        loop {
            attempts += 1;
            // The attempt failed: counted, then asked whether to go on.
            b.next_delay();
            if !b.may_retry() {
                break;
            }
        }
        assert_eq!(attempts, 3);
        let mut unlimited = Policy::fixed(Duration::ZERO).start();
        (0..1000).for_each(|_| {
            unlimited.next_delay();
        });
        assert!(unlimited.may_retry());
    }

    #[test]
    fn a_jittered_loop_stays_within_its_window_and_spreads() {
        let policy = Policy::exponential(Duration::from_millis(100), Duration::from_secs(5)).jitter(0.25);
        let mut b = policy.start();
        for n in 0..10 {
            let (lo, hi) = policy.bounds(n);
            let d = b.next_delay();
            assert!(lo <= d && d <= hi, "attempt {n}: {d:?} outside {lo:?}..{hi:?}");
        }
        let first: Vec<Duration> = (0..50).map(|_| policy.start().next_delay()).collect();
        let (min, max) = (first.iter().min().unwrap(), first.iter().max().unwrap());
        assert!(*max - *min > Duration::from_millis(20), "{min:?}..{max:?}");
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
        assert_eq!(TASK_RETRY.delay_with_factor(0, 1.0), Duration::from_secs(1));
        assert_eq!(TASK_RETRY.delay_with_factor(3, 1.0), Duration::from_secs(8));
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
