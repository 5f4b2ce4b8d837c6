//! RFC 9457 problem details: the one shape of every error answer.
//!
//! A handler returns [`ApiError`]; converting it into a response only attaches
//! a [`Problem`] to the response's extensions (no side effects, no logging).
//! The request middleware ([`crate::context`]) then writes the body with the
//! request id, so every problem names the request it answers. Problem `type`s
//! are stable URIs (`urn:skein:problem:<slug>`) clients may branch on; the
//! `detail` is written for people and never carries internal error text.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use skein_contracts::Violation;

/// Media type of problem bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The problem body (RFC 9457) with skein's extension members.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// Stable problem type URI, e.g. `urn:skein:problem:validation`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request, safe to show.
    pub detail: String,
    /// The request path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The request id (`x-request-id`), also the correlation id of messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Every violation of the input, each with its JSON pointer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<Violation>,
}

/// Why a request failed, as the client sees it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The body is not JSON (or not UTF-8, or empty).
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// The body or a parameter breaks the schema or the rules; every violation.
    #[error("invalid input")]
    Invalid(Vec<Violation>),
    /// A header or parameter is unusable (e.g. an `Idempotency-Key`).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The body is larger than the limit, in bytes.
    #[error("body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The body did not arrive within this long.
    #[error("the body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    /// The body is not `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// No usable credentials; `error` is the RFC 6750 error code (or none when
    /// there were no credentials at all).
    #[error("unauthenticated: {detail}")]
    Unauthenticated {
        /// RFC 6750 `error` (`invalid_token`), none without credentials.
        error: Option<&'static str>,
        /// Why.
        detail: String,
    },
    /// Authenticated, but not allowed.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Nothing there (or nothing the caller may know about).
    #[error("not found: {0}")]
    NotFound(String),
    /// The route does not exist.
    #[error("no such route")]
    RouteNotFound,
    /// The route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The state of the resource does not allow it.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The same `Idempotency-Key` came with a different request.
    #[error("idempotency key reused for a different request")]
    IdempotencyKeyReused,
    /// Too many requests from this client.
    #[error("rate limited")]
    RateLimited {
        /// When a request will be allowed again.
        retry_after: Duration,
    },
    /// A service's circuit breaker is open or the service is not running.
    #[error("{service} is unavailable")]
    ServiceUnavailable {
        /// The service.
        service: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// NATS is not reachable: nothing can be accepted or answered.
    #[error("the message bus is unavailable")]
    BusUnavailable,
    /// A command was sent and JetStream did not confirm it: it may have
    /// been stored and may still be carried out.
    #[error("the message bus did not confirm the command")]
    Unconfirmed,
    /// A service did not answer in time.
    #[error("{0} did not answer in time")]
    Timeout(String),
    /// What was asked for exists but a read model does not show it yet
    /// (it follows events): ask again in a moment.
    #[error("not there yet: {0}")]
    NotYet(String),
    /// A service failed or answered something unreadable.
    #[error("{0} failed")]
    BadGateway(String),
    /// Anything else; details are logged, never shown.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ServiceUnavailable { .. }
            | ApiError::BusUnavailable
            | ApiError::Unconfirmed
            | ApiError::NotYet(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable slug of the problem type.
    pub fn slug(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed-json",
            ApiError::Invalid(_) => "validation",
            ApiError::BadRequest(_) => "bad-request",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::BodyTimeout(_) => "body-timeout",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::Unauthenticated { .. } => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::RouteNotFound => "route-not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::IdempotencyKeyReused => "idempotency-key-reused",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::ServiceUnavailable { .. } => "service-unavailable",
            ApiError::BusUnavailable | ApiError::Unconfirmed => "bus-unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::NotYet(_) => "not-yet",
            ApiError::BadGateway(_) => "bad-gateway",
            ApiError::Internal => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "The body is not valid JSON",
            ApiError::Invalid(_) => "The input is invalid",
            ApiError::BadRequest(_) => "The request is malformed",
            ApiError::PayloadTooLarge(_) => "The body is too large",
            ApiError::BodyTimeout(_) => "The body came too slowly",
            ApiError::UnsupportedMediaType => "The body must be JSON",
            ApiError::Unauthenticated { .. } => "Authentication required",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::NotFound(_) => "Not found",
            ApiError::RouteNotFound => "No such route",
            ApiError::MethodNotAllowed => "Method not allowed",
            ApiError::Conflict(_) => "Conflict",
            ApiError::IdempotencyKeyReused => "Idempotency key reused",
            ApiError::RateLimited { .. } => "Too many requests",
            ApiError::ServiceUnavailable { .. } => "Service unavailable",
            ApiError::BusUnavailable | ApiError::Unconfirmed => "Message bus unavailable",
            ApiError::Timeout(_) => "Service timed out",
            ApiError::NotYet(_) => "Not there yet",
            ApiError::BadGateway(_) => "Service failed",
            ApiError::Internal => "Internal error",
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::MalformedJson(why) => format!("the body is not valid JSON: {why}"),
            ApiError::Invalid(v) => format!(
                "{} violation(s): {}",
                v.len(),
                skein_contracts::validate::describe(v)
            ),
            ApiError::BadRequest(why)
            | ApiError::Forbidden(why)
            | ApiError::NotFound(why)
            | ApiError::Conflict(why)
            | ApiError::NotYet(why) => why.clone(),
            ApiError::PayloadTooLarge(limit) => {
                format!("the body must be at most {limit} bytes")
            }
            ApiError::BodyTimeout(limit) => format!(
                "the body did not arrive within {} s of the headers",
                limit.as_secs_f64()
            ),
            ApiError::UnsupportedMediaType => "send the body as application/json".to_owned(),
            ApiError::Unauthenticated { detail, .. } => detail.clone(),
            ApiError::RouteNotFound => "there is no such route; see /openapi.json".to_owned(),
            ApiError::MethodNotAllowed => "the route does not allow this method".to_owned(),
            ApiError::IdempotencyKeyReused => {
                "this Idempotency-Key was used for a different request".to_owned()
            }
            ApiError::RateLimited { retry_after } => {
                format!("too many requests; retry in {} s", retry_secs(*retry_after))
            }
            ApiError::ServiceUnavailable {
                service,
                retry_after,
            } => format!(
                "{service} is unavailable; retry in {} s",
                retry_secs(*retry_after)
            ),
            ApiError::BusUnavailable => {
                "the message bus is unreachable; nothing was accepted".to_owned()
            }
            ApiError::Unconfirmed => "the message bus did not confirm the command: it may still \
                be carried out; retry with the same Idempotency-Key (a retry without one may \
                do it twice)"
                .to_owned(),
            ApiError::Timeout(service) => format!("{service} did not answer in time"),
            ApiError::BadGateway(service) => format!("{service} failed to answer"),
            ApiError::Internal => "an internal error occurred; quote the request id".to_owned(),
        }
    }

    /// The problem body (without request id and instance).
    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:skein:problem:{}", self.slug()),
            title: self.title().to_owned(),
            status: self.status().as_u16(),
            detail: self.detail(),
            instance: None,
            request_id: None,
            violations: match self {
                ApiError::Invalid(v) => v.clone(),
                _ => Vec::new(),
            },
        }
    }
}

/// Whole seconds for `Retry-After`, at least one.
pub(crate) fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.as_secs() == 0))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status().into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthenticated { error, detail } => {
                let value = match error {
                    Some(code) => format!(
                        "Bearer realm=\"skein\", error=\"{code}\", error_description=\"{}\"",
                        detail.replace(['"', '\\'], "'")
                    ),
                    None => "Bearer realm=\"skein\"".to_owned(),
                };
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            ApiError::RateLimited { retry_after }
            | ApiError::ServiceUnavailable { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_secs(*retry_after).into());
            }
            ApiError::BusUnavailable | ApiError::Unconfirmed | ApiError::NotYet(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response.extensions_mut().insert(self.problem());
        response
    }
}

/// Writes `problem` as the body of `response` (replacing any body).
pub(crate) fn render(response: &mut Response, problem: &Problem) {
    let body = serde_json::to_vec(problem).unwrap_or_default();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response.headers_mut().remove(header::CONTENT_LENGTH);
    *response.body_mut() = axum::body::Body::from(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_and_never_zero() {
        assert_eq!(retry_secs(Duration::ZERO), 1);
        assert_eq!(retry_secs(Duration::from_millis(200)), 1);
        assert_eq!(retry_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_secs(Duration::from_millis(2100)), 3);
    }
}
