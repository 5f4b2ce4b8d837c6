//! A circuit breaker per service.
//!
//! Closed: requests pass; `failure_threshold` consecutive failures (timeout,
//! no responders, transport error, 5xx) open it. Open: requests are refused at
//! once (503 with `Retry-After`) for `open_for`, so a dead service costs
//! clients nothing and is not hammered. Then half-open: exactly one probe
//! passes; its success closes the breaker, its failure opens it again
//! (requests let through before the breaker opened, answering late, decide
//! nothing while it is open or half-open, nor does one of them abandoned
//! free the probe's place).
//! A business error (4xx) is a success: the service answered.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// A breaker's state, as `/health` and `/metrics` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests pass.
    Closed,
    /// Requests are refused.
    Open,
    /// One probe may pass.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// The breakers of every service, created on first use.
#[derive(Debug)]
pub(crate) struct Breakers {
    config: BreakerConfig,
    services: Mutex<BTreeMap<String, Inner>>,
}

/// Permission to send one request; report how it went.
#[derive(Debug)]
#[must_use]
pub(crate) struct Permit<'a> {
    breakers: &'a Breakers,
    service: String,
    reported: bool,
    /// The half-open breaker's one probe.
    probe: bool,
}

impl Permit<'_> {
    /// The service answered (an error answer below 500 counts as an answer).
    pub(crate) fn success(mut self) {
        self.reported = true;
        self.breakers.report(&self.service, true, self.probe);
    }

    /// The service failed to answer.
    pub(crate) fn failure(mut self) {
        self.reported = true;
        self.breakers.report(&self.service, false, self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // A request abandoned mid-way (client went away) must not leave a
        // half-open breaker waiting for a probe that never reports.
        if !self.reported && self.probe {
            self.breakers.release_probe(&self.service);
        }
    }
}

impl Breakers {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            services: Mutex::new(BTreeMap::new()),
        }
    }

    /// A permit for `service`, or how long it stays open.
    pub(crate) fn acquire(&self, service: &str) -> Result<Permit<'_>, Duration> {
        let now = Instant::now();
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let state = services
            .entry(service.to_owned())
            .or_insert(Inner::Closed { failures: 0 });
        let probe = match state {
            Inner::Closed { .. } => false,
            Inner::Open { until } if *until > now => return Err(*until - now),
            Inner::Open { .. } => {
                *state = Inner::HalfOpen { probing: true };
                true
            }
            Inner::HalfOpen { probing: true } => return Err(Duration::from_secs(1)),
            Inner::HalfOpen { probing } => {
                *probing = true;
                true
            }
        };
        Ok(Permit {
            breakers: self,
            service: service.to_owned(),
            reported: false,
            probe,
        })
    }

    fn report(&self, service: &str, ok: bool, probe: bool) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = services.get_mut(service) else {
            return;
        };
        if !matches!(state, Inner::Closed { .. }) && !probe {
            // A request from before the breaker opened, answering late:
            // while open the breaker stays open for its time (one slow
            // answer does not make a struggling service healthy), and when
            // half-open the probe decides.
            return;
        }
        let open = Inner::Open {
            until: Instant::now() + self.config.open_for,
        };
        *state = match (&*state, ok) {
            (_, true) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    tracing::warn!(service, failures, "circuit breaker opened");
                    open
                } else {
                    Inner::Closed { failures }
                }
            }
            (Inner::HalfOpen { .. }, false) => {
                tracing::warn!(service, "probe failed, circuit breaker open again");
                open
            }
            // Only a probe reports here, and a probe exists only half-open.
            (Inner::Open { until }, false) => Inner::Open { until: *until },
        };
    }

    fn release_probe(&self, service: &str) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Inner::HalfOpen { probing }) = services.get_mut(service) {
            *probing = false;
        }
    }

    /// Every known breaker's state.
    pub(crate) fn states(&self) -> BTreeMap<String, BreakerState> {
        let now = Instant::now();
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services
            .iter()
            .map(|(name, s)| {
                let state = match s {
                    Inner::Closed { .. } => BreakerState::Closed,
                    Inner::Open { until } if *until > now => BreakerState::Open,
                    Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
                };
                (name.clone(), state)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers(open_for: Duration) -> Breakers {
        Breakers::new(BreakerConfig {
            failure_threshold: 3,
            open_for,
        })
    }

    #[test]
    fn consecutive_failures_open_the_breaker_and_a_success_in_between_resets_them() {
        let b = breakers(Duration::from_secs(60));
        for _ in 0..2 {
            b.acquire("orders").map(Permit::failure).ok();
        }
        b.acquire("orders").map(Permit::success).ok();
        for _ in 0..2 {
            b.acquire("orders").map(Permit::failure).ok();
        }
        assert_eq!(b.states()["orders"], BreakerState::Closed);
        b.acquire("orders").map(Permit::failure).ok();
        assert_eq!(b.states()["orders"], BreakerState::Open);
        assert!(b.acquire("orders").is_err());
        assert!(b.acquire("catalog").is_ok(), "breakers are per service");
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_outcome_decides() {
        let b = breakers(Duration::from_millis(1));
        for _ in 0..3 {
            b.acquire("orders").map(Permit::failure).ok();
        }
        std::thread::sleep(Duration::from_millis(5));
        let probe = b.acquire("orders").ok();
        assert!(probe.is_some());
        assert!(b.acquire("orders").is_err(), "only one probe at a time");
        if let Some(p) = probe {
            p.failure();
        }
        assert_eq!(b.states()["orders"], BreakerState::Open);
        std::thread::sleep(Duration::from_millis(5));
        b.acquire("orders").map(Permit::success).ok();
        assert_eq!(b.states()["orders"], BreakerState::Closed);
    }

    #[test]
    fn a_request_from_before_the_breaker_opened_decides_nothing_once_half_open() {
        let b = breakers(Duration::from_millis(1));
        let (early, late) = (b.acquire("orders").ok(), b.acquire("orders").ok());
        for _ in 0..3 {
            b.acquire("orders").map(Permit::failure).ok();
        }
        std::thread::sleep(Duration::from_millis(5));
        let probe = b.acquire("orders").ok();
        assert!(probe.is_some());
        // Abandoned meanwhile: the probe's place stays taken.
        drop(early);
        assert!(b.acquire("orders").is_err(), "only one probe at a time");
        // Answering late: the probe still decides.
        if let Some(p) = late {
            p.success();
        }
        assert_eq!(b.states()["orders"], BreakerState::HalfOpen);
        if let Some(p) = probe {
            p.failure();
        }
        assert_eq!(b.states()["orders"], BreakerState::Open);
    }

    #[test]
    fn a_request_from_before_the_breaker_opened_decides_nothing_while_open() {
        let b = breakers(Duration::from_secs(60));
        let (slow, failing) = (b.acquire("orders").ok(), b.acquire("orders").ok());
        for _ in 0..3 {
            b.acquire("orders").map(Permit::failure).ok();
        }
        assert_eq!(b.states()["orders"], BreakerState::Open);
        if let Some(p) = slow {
            p.success();
        }
        assert_eq!(
            b.states()["orders"],
            BreakerState::Open,
            "a late answer closed it"
        );
        if let Some(p) = failing {
            p.failure();
        }
        assert_eq!(b.states()["orders"], BreakerState::Open);
        assert!(b.acquire("orders").is_err());
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_one_through() {
        let b = breakers(Duration::from_millis(1));
        for _ in 0..3 {
            b.acquire("orders").map(Permit::failure).ok();
        }
        std::thread::sleep(Duration::from_millis(5));
        drop(b.acquire("orders"));
        assert!(b.acquire("orders").is_ok());
    }
}
