//! Per-client rate limits: token buckets keyed by user or IP.
//!
//! Each client has a bucket of `burst` tokens refilled at `per_second`; a
//! request takes one or is refused with the time until one is there
//! (`Retry-After`). Buckets are kept in memory (the ingress is stateless, so
//! with N copies a client gets up to N times the rate); at capacity, buckets
//! that are full again (idle clients) are dropped first. Looking for those
//! visits every bucket, so it is done at most once a second; in
//! between, a new client at capacity takes the place of an arbitrary one (a
//! flood of new addresses, say one per IPv6 /64, costs a map operation per
//! request, not a scan).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// The longest wait a refusal names: what the slowest valid rate
/// ([`MIN_RATE_PER_SECOND`](crate::config::MIN_RATE_PER_SECOND)) needs for
/// one token.
const MAX_WAIT: Duration = Duration::from_secs(1000);

/// How often, at most, a limiter at capacity looks for idle clients.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets, and when idle ones were last looked for.
#[derive(Debug, Default)]
struct Buckets {
    by_client: HashMap<String, Bucket>,
    swept: Option<Instant>,
    /// Sweeps so far (for tests).
    sweeps: u64,
}

/// Token buckets for one limit.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: RateLimit,
    capacity: usize,
    buckets: Mutex<Buckets>,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit, capacity: usize) -> Self {
        Self {
            limit,
            capacity,
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// Takes a token for `client`, or says how long until one is there.
    pub(crate) fn check(&self, client: &str) -> Result<(), Duration> {
        self.check_at(client, Instant::now())
    }

    fn check_at(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.limit.burst);
        let rate = self.limit.per_second;
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        let buckets = &mut state.by_client;
        if buckets.len() >= self.capacity && !buckets.contains_key(client) {
            if state
                .swept
                .is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY)
            {
                state.swept = Some(now);
                state.sweeps += 1;
                buckets.retain(|_, b| {
                    b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst
                });
            }
            if buckets.len() >= self.capacity {
                // Everyone is busy (or was at the last sweep): forget an
                // arbitrary one rather than grow.
                if let Some(k) = buckets.keys().next().cloned() {
                    buckets.remove(&k);
                }
            }
        }
        let bucket = buckets.entry(client.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            Ok(())
        } else {
            bucket.tokens = tokens;
            // A rate too small for a Duration (the configuration refuses
            // those) waits the longest, it does not panic.
            let wait = Duration::try_from_secs_f64((1.0 - tokens) / rate).unwrap_or(MAX_WAIT);
            Err(wait.min(MAX_WAIT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_requests_wait_for_the_refill() {
        let l = RateLimiter::new(
            RateLimit {
                per_second: 2.0,
                burst: 3,
            },
            10,
        );
        let t = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at("a", t).is_ok());
        }
        let wait = l.check_at("a", t).err();
        assert_eq!(wait, Some(Duration::from_millis(500)));
        assert!(l.check_at("b", t).is_ok(), "buckets are per client");
        assert!(l.check_at("a", t + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn a_tiny_or_zero_rate_waits_the_longest_instead_of_panicking() {
        for per_second in [1e-30, 0.0, f64::MIN_POSITIVE] {
            let l = RateLimiter::new(
                RateLimit {
                    per_second,
                    burst: 1,
                },
                10,
            );
            let t = Instant::now();
            assert!(l.check_at("a", t).is_ok());
            assert_eq!(l.check_at("a", t).err(), Some(MAX_WAIT), "{per_second}");
        }
        // The slowest valid rate fits under the cap exactly.
        let l = RateLimiter::new(
            RateLimit {
                per_second: crate::config::MIN_RATE_PER_SECOND,
                burst: 1,
            },
            10,
        );
        let t = Instant::now();
        assert!(l.check_at("a", t).is_ok());
        assert_eq!(l.check_at("a", t).err(), Some(MAX_WAIT));
    }

    #[test]
    fn the_number_of_buckets_is_bounded() {
        let l = RateLimiter::new(
            RateLimit {
                per_second: 1.0,
                burst: 1,
            },
            2,
        );
        let t = Instant::now();
        for c in ["a", "b", "c", "d"] {
            assert!(l.check_at(c, t).is_ok());
        }
        assert!(l.buckets.lock().map(|b| b.by_client.len()).unwrap_or(0) <= 2);
    }

    #[test]
    fn new_clients_at_capacity_do_not_each_look_through_every_bucket() {
        let l = RateLimiter::new(
            RateLimit {
                per_second: 0.01,
                burst: 5,
            },
            100,
        );
        let t = Instant::now();
        let sweeps = || l.buckets.lock().map(|b| b.sweeps).unwrap_or(u64::MAX);
        for c in 0..1_000 {
            assert!(l
                .check_at(&format!("10.0.{}.{}", c / 256, c % 256), t)
                .is_ok());
        }
        assert_eq!(sweeps(), 1, "one sweep for 900 clients over capacity");
        let len = l.buckets.lock().map(|b| b.by_client.len()).unwrap_or(0);
        assert!(len <= 100, "{len} buckets");
        // A second later idle clients are looked for again, and dropped.
        let later = t + Duration::from_secs(1000);
        assert!(l.check_at("a latecomer", later).is_ok());
        assert_eq!(sweeps(), 2);
        let len = l.buckets.lock().map(|b| b.by_client.len()).unwrap_or(0);
        assert_eq!(len, 1, "the idle clients were dropped");
    }
}
