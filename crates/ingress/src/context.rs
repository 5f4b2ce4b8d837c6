//! The request middleware: request id, trace context, authentication, rate
//! limits, problem bodies, metrics and the access log.
//!
//! Every request gets an `x-request-id`: the client's when it is well formed
//! (1 to 128 of `A-Z a-z 0-9 - _ . :`), else a fresh UUIDv7. It is returned in
//! the response, written into every problem body, and is the correlation id of
//! every message the request causes. A well-formed W3C `traceparent` is
//! continued (same trace id, new span id), else a new trace starts.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use skein_message::MessageContext;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{presented, verify, Authn, Presented};
use crate::problem::{render, ApiError, Problem};
use crate::state::Shared;

/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// Who the request is and which trace it belongs to.
#[derive(Debug, Clone)]
pub(crate) struct RequestContext {
    /// `x-request-id`, the correlation id.
    pub(crate) request_id: String,
    /// W3C `traceparent` of this request.
    pub(crate) traceparent: String,
}

impl RequestContext {
    /// The context of the messages this request sends.
    pub(crate) fn message_context(&self) -> MessageContext {
        let mut context = MessageContext::with_correlation(self.request_id.clone());
        context.traceparent = Some(self.traceparent.clone());
        context
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RequestContext>()
            .cloned()
            .ok_or(ApiError::Internal)
    }
}

fn well_formed_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn hex(n: usize) -> String {
    let mut out = String::with_capacity(n);
    while out.len() < n {
        out.push_str(&Uuid::new_v4().simple().to_string());
    }
    out.truncate(n);
    out
}

/// Continues `incoming` (`00-<trace>-<parent>-<flags>`) with a new span id,
/// or starts a new trace.
fn traceparent(incoming: Option<&str>) -> String {
    let parsed = incoming
        .and_then(skein_message::envelope::trace_and_flags)
        .map(|(trace, flags)| (trace.to_owned(), flags.to_owned()));
    let (trace, flags) = parsed.unwrap_or_else(|| (hex(32), "01".to_owned()));
    format!("00-{trace}-{}-{flags}", hex(16))
}

/// The outermost layer: ids, problem bodies, metrics, access log.
pub(crate) async fn observe(
    State(state): State<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| well_formed_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    let traceparent = traceparent(
        request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    request.extensions_mut().insert(RequestContext {
        request_id: request_id.clone(),
        traceparent: traceparent.clone(),
    });
    let span = tracing::info_span!("http", %method, route = %route, request_id = %request_id, traceparent = %traceparent);
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Some(problem) = response.extensions_mut().remove::<Problem>() {
        let problem = Problem {
            instance: Some(path),
            request_id: Some(request_id.clone()),
            ..problem
        };
        if problem.status >= 500 {
            span.in_scope(
                || tracing::warn!(status = problem.status, kind = %problem.kind, "request failed"),
            );
        }
        render(&mut response, &problem);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    state
        .metrics
        .request(method.as_str(), &route, status, elapsed);
    span.in_scope(|| {
        tracing::debug!(
            status,
            elapsed_ms = elapsed.as_millis() as u64,
            "request done"
        )
    });
    response
}

/// The client's address: the peer, or, when the ingress is configured to
/// trust a proxy, the address that proxy appended to `X-Forwarded-For`
/// (the last one).
fn client_ip(state: &Shared, request: &Request) -> Option<IpAddr> {
    if state.config.trust_forwarded_for {
        if let Some(ip) = forwarded_for(request.headers()) {
            return Some(ip);
        }
    }
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The last address of `X-Forwarded-For` (of its last line, when there are
/// several): the one the proxy in front of the ingress appended, the
/// address it saw the request come from. Those before it are whatever the
/// client sent, free to change with every request.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()?
        .to_str()
        .ok()?
        .rsplit(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The rate-limit bucket of an address: an IPv4 address, or the /64 an
/// IPv6 address is in (one subscriber's network usually: a client could
/// take a fresh address from it for every request).
fn bucket_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let network = u128::from(v6) & (u128::MAX << 64);
                format!("{}/64", std::net::Ipv6Addr::from(network))
            }
        },
    }
}

/// Routes limited per IP with the (stricter) login limit.
const LOGIN_ROUTES: &[&str] = &["/v1/auth/token", "/v1/auth/register"];

/// On `/v1`: authenticates once and applies the rate limits.
///
/// A request is limited by its user when it carries a valid token, else by
/// its address. A token not verified before is first charged to its
/// address in a bucket of its own, *before* its signature is checked (the
/// costliest step of a request, and for a key id the ingress does not know
/// a fetch from identity): a client sending made-up tokens is limited
/// without the ingress doing that work for each, while anonymous requests
/// from the same address (a NAT, a proxy) do not use up what its users'
/// new tokens need.
pub(crate) async fn guard(
    State(state): State<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let correlation = request
        .extensions()
        .get::<RequestContext>()
        .map(|c| c.request_id.clone())
        .unwrap_or_default();
    let ip = format!(
        "ip:{}",
        client_ip(&state, &request)
            .map(bucket_of)
            .unwrap_or_else(|| "unknown".to_owned())
    );
    if LOGIN_ROUTES.contains(&request.uri().path()) {
        if let Err(retry_after) = state.login_limiter.check(&ip) {
            return ApiError::RateLimited { retry_after }.into_response();
        }
    }
    let authn = match presented(&state, request.headers(), &correlation) {
        Presented::Known(authn) => authn,
        Presented::Unchecked(token) => {
            if let Err(retry_after) = state.unchecked_limiter.check(&ip) {
                return ApiError::RateLimited { retry_after }.into_response();
            }
            verify(&state, token, &correlation).await
        }
    };
    let client = match &authn {
        Authn::Verified(claims) => format!("user:{}", claims.sub),
        _ => ip,
    };
    if let Err(retry_after) = state.limiter.check(&client) {
        return ApiError::RateLimited { retry_after }.into_response();
    }
    request.extensions_mut().insert(ClientKey(client));
    request.extensions_mut().insert(authn);
    next.run(request).await
}

/// The rate-limit key of the client (`user:<id>` or `ip:<addr>`), also the
/// idempotency scope of anonymous requests.
#[derive(Debug, Clone)]
pub(crate) struct ClientKey(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for ClientKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ClientKey>()
            .cloned()
            .ok_or(ApiError::Internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_address_the_proxy_appended() {
        let header = |v: &'static str| HeaderValue::from_static(v);
        let mut headers = HeaderMap::new();
        assert_eq!(forwarded_for(&headers), None);
        headers.insert("x-forwarded-for", header("203.0.113.7"));
        assert_eq!(forwarded_for(&headers), "203.0.113.7".parse().ok());
        headers.insert(
            "x-forwarded-for",
            header("6.6.6.6, 198.51.100.1 , 203.0.113.7"),
        );
        assert_eq!(forwarded_for(&headers), "203.0.113.7".parse().ok());
        headers.append("x-forwarded-for", header("2001:db8::1"));
        assert_eq!(forwarded_for(&headers), "2001:db8::1".parse().ok());
        headers.insert("x-forwarded-for", header("1.1.1.1, not an address"));
        assert_eq!(forwarded_for(&headers), None);
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let bucket = |s: &str| s.parse::<IpAddr>().map(bucket_of).ok();
        assert_eq!(bucket("203.0.113.7").as_deref(), Some("203.0.113.7"));
        let net = Some("2001:db8:1:2::/64");
        assert_eq!(bucket("2001:db8:1:2:aaaa::1").as_deref(), net);
        assert_eq!(bucket("2001:db8:1:2:ffff:ffff:ffff:ffff").as_deref(), net);
        assert_ne!(bucket("2001:db8:1:3::1").as_deref(), net);
        assert_eq!(bucket("::ffff:203.0.113.7").as_deref(), Some("203.0.113.7"));
    }

    #[test]
    fn request_ids_are_kept_only_when_well_formed() {
        assert!(well_formed_request_id("abc-123_x.y:z"));
        assert!(!well_formed_request_id(""));
        assert!(!well_formed_request_id("has space"));
        assert!(!well_formed_request_id(&"x".repeat(129)));
        assert!(!well_formed_request_id("new\nline"));
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let next = traceparent(Some(incoming));
        assert!(next.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(next.ends_with("-01"));
        assert_ne!(next, incoming);
        let fresh = traceparent(Some("00-zz-00f067aa0ba902b7-01"));
        assert_eq!(fresh.len(), 55);
        assert!(!fresh.contains("zz"));
    }
}
