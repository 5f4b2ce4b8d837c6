//! `/metrics`: Prometheus text exposition from a small in-process registry.
//!
//! - `skein_ingress_requests_total{method,route,status}`: answered requests;
//! - `skein_ingress_request_duration_seconds{route}`: latency histogram;
//! - `skein_ingress_commands_published_total{type,duplicate}`: commands
//!   stored by JetStream (`duplicate="true"` when its dedup dropped a repeat);
//! - `skein_ingress_breaker_state{service,state}`: 1 for each breaker's state;
//! - `skein_ingress_token_signature_checks_total`: access tokens whose
//!   signature was checked (a token is checked once, then remembered).
//!
//! Routes are the matched templates (`/v1/orders/{id}`), never raw paths, so
//! the number of series stays bounded.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::breaker::BreakerState;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    commands: BTreeMap<(String, bool), u64>,
    token_checks: u64,
}

/// The ingress's figures.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one answered request. A method outside HTTP's own is
    /// counted as `OTHER`: a client choosing it freely would add a series
    /// per request.
    pub(crate) fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        const KNOWN: &[&str] = &[
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
        ];
        let method = if KNOWN.contains(&method) {
            method
        } else {
            "OTHER"
        };
        let secs = elapsed.as_secs_f64();
        let mut inner = self.lock();
        *inner
            .requests
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        let h = inner.latency.entry(route.to_owned()).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Records one command stored by JetStream.
    pub(crate) fn command_published(&self, kind: &str, duplicate: bool) {
        *self
            .lock()
            .commands
            .entry((kind.to_owned(), duplicate))
            .or_default() += 1;
    }

    /// Records one signature check of an access token.
    pub(crate) fn token_checked(&self) {
        self.lock().token_checks += 1;
    }

    /// The exposition text, with the breakers' current states.
    pub(crate) fn render(&self, breakers: &BTreeMap<String, BreakerState>) -> String {
        let inner = self.lock();
        let mut out = String::new();
        out.push_str("# HELP skein_ingress_requests_total HTTP requests answered.\n");
        out.push_str("# TYPE skein_ingress_requests_total counter\n");
        for ((method, route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "skein_ingress_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP skein_ingress_request_duration_seconds Time to answer a request.\n");
        out.push_str("# TYPE skein_ingress_request_duration_seconds histogram\n");
        for (route, h) in &inner.latency {
            let route = escape(route);
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "skein_ingress_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "skein_ingress_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n\
                 skein_ingress_request_duration_seconds_sum{{route=\"{route}\"}} {}\n\
                 skein_ingress_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        out.push_str(
            "# HELP skein_ingress_commands_published_total Commands stored by JetStream.\n",
        );
        out.push_str("# TYPE skein_ingress_commands_published_total counter\n");
        for ((kind, duplicate), n) in &inner.commands {
            let _ = writeln!(
                out,
                "skein_ingress_commands_published_total{{type=\"{}\",duplicate=\"{duplicate}\"}} {n}",
                escape(kind)
            );
        }
        out.push_str("# HELP skein_ingress_token_signature_checks_total Access tokens whose signature was checked.\n");
        out.push_str("# TYPE skein_ingress_token_signature_checks_total counter\n");
        let _ = writeln!(
            out,
            "skein_ingress_token_signature_checks_total {}",
            inner.token_checks
        );
        out.push_str(
            "# HELP skein_ingress_breaker_state Circuit breaker state per service (1 = current).\n",
        );
        out.push_str("# TYPE skein_ingress_breaker_state gauge\n");
        for (service, state) in breakers {
            for s in [
                BreakerState::Closed,
                BreakerState::Open,
                BreakerState::HalfOpen,
            ] {
                let _ = writeln!(
                    out,
                    "skein_ingress_breaker_state{{service=\"{}\",state=\"{}\"}} {}",
                    escape(service),
                    s.as_str(),
                    u8::from(*state == s)
                );
            }
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_counters_histograms_and_breakers() {
        let m = Metrics::default();
        m.request("GET", "/v1/products", 200, Duration::from_millis(3));
        m.request("GET", "/v1/products", 200, Duration::from_millis(30));
        m.command_published("orders.place_order.v1", false);
        let text = m.render(&BTreeMap::from([("orders".to_owned(), BreakerState::Open)]));
        assert!(text.contains(
            "skein_ingress_requests_total{method=\"GET\",route=\"/v1/products\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "skein_ingress_request_duration_seconds_bucket{route=\"/v1/products\",le=\"0.005\"} 1"
        ));
        assert!(
            text.contains("skein_ingress_request_duration_seconds_count{route=\"/v1/products\"} 2")
        );
        assert!(text.contains(
            "skein_ingress_commands_published_total{type=\"orders.place_order.v1\",duplicate=\"false\"} 1"
        ));
        assert!(text.contains("skein_ingress_breaker_state{service=\"orders\",state=\"open\"} 1"));
        assert!(text.contains("skein_ingress_breaker_state{service=\"orders\",state=\"closed\"} 0"));
    }
}
