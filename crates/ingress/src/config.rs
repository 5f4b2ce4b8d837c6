//! [`IngressConfig`]: where to listen and every limit, with defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// The slowest rate a [`RateLimit`] may have: one request in 1,000 s.
/// Anything slower is a mistake (and its waits would not fit a `Duration`).
pub const MIN_RATE_PER_SECOND: f64 = 0.001;

/// A token bucket: `burst` requests at once, refilled at `per_second`
/// (at least [`MIN_RATE_PER_SECOND`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

/// When a service's circuit breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures (timeouts, no responders, 5xx) that open it.
    pub failure_threshold: u32,
    /// How long it stays open before one probe is let through (half-open).
    pub open_for: Duration,
}

/// Settings of the HTTP ingress.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub bind: SocketAddr,
    /// How long a query may take when the service has no entry in
    /// `service_timeouts` (default 3 s); past it the client gets 504.
    pub query_timeout: Duration,
    /// Per-service query timeouts, by service name.
    pub service_timeouts: BTreeMap<String, Duration>,
    /// How long to wait for JetStream to store a command (default 5 s).
    pub publish_timeout: Duration,
    /// Largest accepted body in bytes (default 64 KiB); larger is 413.
    pub body_limit: usize,
    /// Connections served at once (default 10,000); more wait in the
    /// listen queue until one closes. Each costs a file descriptor: keep it
    /// under the process's limit (`ulimit -n`).
    pub max_connections: usize,
    /// How long a request's headers may take to arrive (default 30 s);
    /// slower closes the connection, so a client trickling its headers
    /// cannot hold one for ever.
    pub header_timeout: Duration,
    /// How long a request's body may take to arrive once its headers have
    /// (default 30 s); slower is 408, so a client trickling a body cannot
    /// hold a connection and a task for ever.
    pub body_timeout: Duration,
    /// On shutdown, how long requests in flight may take to finish
    /// (default 30 s) before their connections are closed.
    pub shutdown_grace: Duration,
    /// Longest `Prefer: wait=N` honoured (default and at most 30 s).
    pub max_wait: Duration,
    /// Per client (user, or IP when anonymous) on `/v1` (default 50/s, burst 100).
    pub rate_limit: RateLimit,
    /// Per IP on log-in and registration (default 1 every 6 s, burst 10).
    pub login_rate_limit: RateLimit,
    /// Most clients tracked by the rate limiter before idle ones are dropped.
    pub rate_limit_clients: usize,
    /// Circuit breaker per service (default 5 failures, open 5 s).
    pub breaker: BreakerConfig,
    /// How long an `Idempotency-Key`'s response is kept (default 24 h).
    pub idempotency_ttl: Duration,
    /// Most idempotency keys kept; the oldest go first (default 100 000).
    pub idempotency_capacity: usize,
    /// Fewest seconds between two fetches of identity's verification keys
    /// when a token names an unknown key (default 10 s).
    pub key_refresh_interval: Duration,
    /// How long the verification keys fetched are used before they are
    /// fetched again on the next request (default 5 min): a key identity
    /// stopped publishing (the end of a rotation) stops verifying by then.
    pub key_max_age: Duration,
    /// Services `/health` pings and reads figures from.
    pub services: Vec<String>,
    /// How long `/health` waits for each check (default 1 s).
    pub health_timeout: Duration,
    /// Consumer lag above which `/health` reports a service as failing.
    pub max_consumer_lag: i64,
    /// Outbox backlog above which `/health` reports a service as failing.
    pub max_outbox_backlog: i64,
    /// Whether to trust `X-Forwarded-For` for the client IP (only behind a proxy).
    pub trust_forwarded_for: bool,
}

impl IngressConfig {
    /// Defaults, listening on `bind`.
    pub fn new(bind: SocketAddr) -> Self {
        Self {
            bind,
            query_timeout: Duration::from_secs(3),
            service_timeouts: BTreeMap::new(),
            publish_timeout: Duration::from_secs(5),
            body_limit: 64 * 1024,
            max_connections: 10_000,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            max_wait: Duration::from_secs(30),
            rate_limit: RateLimit {
                per_second: 50.0,
                burst: 100,
            },
            login_rate_limit: RateLimit {
                per_second: 1.0 / 6.0,
                burst: 10,
            },
            rate_limit_clients: 100_000,
            breaker: BreakerConfig {
                failure_threshold: 5,
                open_for: Duration::from_secs(5),
            },
            idempotency_ttl: Duration::from_secs(24 * 3600),
            idempotency_capacity: 100_000,
            key_refresh_interval: Duration::from_secs(10),
            key_max_age: Duration::from_secs(300),
            services: [
                "identity",
                "catalog",
                "orders",
                "payments",
                "projector",
                "orchestrator",
            ]
            .map(String::from)
            .to_vec(),
            health_timeout: Duration::from_secs(1),
            max_consumer_lag: 10_000,
            max_outbox_backlog: 10_000,
            trust_forwarded_for: false,
        }
    }

    /// The query timeout of `service`.
    pub fn timeout_of(&self, service: &str) -> Duration {
        self.service_timeouts
            .get(service)
            .copied()
            .unwrap_or(self.query_timeout)
    }

    /// Every problem with these settings (empty when usable).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.query_timeout.is_zero() || self.service_timeouts.values().any(|d| d.is_zero()) {
            p.push("query timeouts must be positive".to_owned());
        }
        if self.publish_timeout.is_zero() {
            p.push("publish_timeout must be positive".to_owned());
        }
        if self.body_limit == 0 {
            p.push("body_limit must be positive".to_owned());
        }
        if self.max_connections == 0 {
            p.push("max_connections must be at least 1".to_owned());
        }
        if self.body_timeout.is_zero() || self.header_timeout.is_zero() {
            p.push("header_timeout and body_timeout must be positive".to_owned());
        }
        if self.max_wait > Duration::from_secs(30) {
            p.push("max_wait must be at most 30 s".to_owned());
        }
        for (name, limit) in [
            ("rate_limit", self.rate_limit),
            ("login_rate_limit", self.login_rate_limit),
        ] {
            if !(limit.per_second >= MIN_RATE_PER_SECOND && limit.per_second.is_finite())
                || limit.burst == 0
            {
                p.push(format!(
                    "{name} needs a rate of at least {MIN_RATE_PER_SECOND} per second and a positive burst, got {} and {}",
                    limit.per_second, limit.burst
                ));
            }
        }
        if self.breaker.failure_threshold == 0 || self.breaker.open_for.is_zero() {
            p.push("breaker needs a positive threshold and open time".to_owned());
        }
        if self.idempotency_capacity == 0 || self.rate_limit_clients == 0 {
            p.push("capacities must be positive".to_owned());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_usable_and_nonsense_is_named() {
        let ok = IngressConfig::new(([127, 0, 0, 1], 0).into());
        assert!(ok.problems().is_empty(), "{:?}", ok.problems());
        let mut bad = ok.clone();
        bad.body_limit = 0;
        bad.max_wait = Duration::from_secs(60);
        bad.rate_limit.burst = 0;
        assert_eq!(bad.problems().len(), 3, "{:?}", bad.problems());
        for per_second in [1e-30, 0.0009, 0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut slow = ok.clone();
            slow.login_rate_limit.per_second = per_second;
            let problems = slow.problems();
            assert!(
                problems.len() == 1
                    && problems[0].starts_with("login_rate_limit needs a rate of at least 0.001"),
                "{per_second}: {problems:?}"
            );
        }
        let mut slowest = ok.clone();
        slowest.rate_limit.per_second = MIN_RATE_PER_SECOND;
        assert!(slowest.problems().is_empty(), "{:?}", slowest.problems());
    }
}
