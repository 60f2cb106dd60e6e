//! The retry schedule: a pure function, so it is tested without time passing.
//!
//! Attempt `n` (1-based, the one that just failed) waits a uniformly random time between
//! `initial_delay` and `min(max_delay, initial_delay * 2^(n-1))`: exponential backoff with
//! full jitter. Jitter spreads the retries of many deliveries that failed together (one
//! outage) so the recovering destination is not hit by a synchronized wave; the floor of
//! `initial_delay` keeps a flapping destination from being retried in a tight loop.
//!
//! A server's `Retry-After` replaces the computed delay (at least `initial_delay`, so
//! `Retry-After: 0` is no tight loop, and at most [`MAX_RETRY_AFTER`], so a bogus header
//! cannot park a delivery for years).

use std::time::Duration;

use rand::Rng;

use crate::config::RetryPolicy;

/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What to do after a retryable failure of attempt number `attempts` (1-based).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// The retry budget is spent: dead-letter it.
    GiveUp,
}

/// The upper bound of the jittered delay after attempt `attempts`.
pub fn backoff_cap(policy: &RetryPolicy, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(32);
    policy
        .initial_delay
        .saturating_mul(1u32 << exp.min(31))
        .min(policy.max_delay)
        .max(policy.initial_delay.min(policy.max_delay))
}

/// Decides the next step after a retryable failure.
pub fn next(
    policy: &RetryPolicy,
    attempts: u32,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Next {
    if attempts >= policy.max_attempts {
        return Next::GiveUp;
    }
    if let Some(after) = retry_after {
        // `Retry-After: 0` (or a date in the past) must not become a tight loop.
        let floor = policy.initial_delay.min(policy.max_delay);
        return Next::RetryAfter(after.clamp(floor, MAX_RETRY_AFTER));
    }
    let low = policy.initial_delay.min(policy.max_delay);
    let high = backoff_cap(policy, attempts);
    let nanos = rng.random_range(low.as_nanos() as u64..=high.as_nanos() as u64);
    Next::RetryAfter(Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        }
    }

    #[test]
    fn caps_double_until_max_delay() {
        let p = policy();
        let caps: Vec<u64> = (1..=6).map(|n| backoff_cap(&p, n).as_secs()).collect();
        assert_eq!(caps, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff_cap(&p, 200), Duration::from_secs(10));
    }

    #[test]
    fn delays_stay_within_initial_and_cap() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for attempts in 1..5 {
            for _ in 0..200 {
                let Next::RetryAfter(d) = next(&p, attempts, None, &mut rng) else {
                    panic!("gave up early");
                };
                assert!(
                    d >= p.initial_delay && d <= backoff_cap(&p, attempts),
                    "{d:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<Duration> = (0..50)
            .map(|_| match next(&p, 4, None, &mut rng) {
                Next::RetryAfter(d) => d,
                Next::GiveUp => panic!(),
            })
            .collect();
        assert!(delays.len() > 40);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(next(&policy(), 5, None, &mut rng), Next::GiveUp);
        assert_eq!(
            next(&policy(), 5, Some(Duration::from_secs(1)), &mut rng),
            Next::GiveUp
        );
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            next(&policy(), 1, Some(Duration::from_secs(42)), &mut rng),
            Next::RetryAfter(Duration::from_secs(42))
        );
        assert_eq!(
            next(
                &policy(),
                1,
                Some(Duration::from_secs(10 * 86400)),
                &mut rng
            ),
            Next::RetryAfter(MAX_RETRY_AFTER)
        );
        assert_eq!(
            next(&policy(), 1, Some(Duration::ZERO), &mut rng),
            Next::RetryAfter(policy().initial_delay),
            "Retry-After: 0 waits at least initial_delay"
        );
    }
}
