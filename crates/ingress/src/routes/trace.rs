//! `/v1/trace/{id}`: every message a request (correlation id) or an order
//! caused, as a tree by causation id with timings (admins). The same tree
//! `skein trace` prints (see [`skein_service::trace`]).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use skein_service::trace::{trace, TraceError};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{json, query_params, PathParam, QueryParams};
use crate::auth::Admin;
use crate::problem::ApiError;
use crate::state::Shared;
use skein_contracts::Violation;

/// Longest id looked up (request ids are at most this long too).
const MAX_ID: usize = 128;

/// How far back a request id is looked for among all events unless
/// `?since=` says otherwise (an order's events are found by their subject,
/// however old).
const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Longest a trace may take: it reads the streams through.
const TRACE_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn get(
    State(state): State<Shared>,
    Admin(_): Admin,
    PathParam(id): PathParam,
    params: QueryParams,
) -> Result<Response, ApiError> {
    let usable = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if !usable {
        return Err(ApiError::NotFound(format!("no request or order {id:?}")));
    }
    let (params, mut violations) = query_params(params, &["since"])?;
    let since = match params.get("since") {
        None => OffsetDateTime::now_utc() - DEFAULT_WINDOW,
        // A `+` of an offset arrives as a space unless sent as %2B.
        Some(text) => {
            OffsetDateTime::parse(&text.replace(' ', "+"), &Rfc3339).unwrap_or_else(|_| {
                violations.push(Violation {
                    field: "?since".into(),
                    message: "must be an RFC 3339 time, e.g. 2026-11-24T10:00:00Z".into(),
                });
                OffsetDateTime::UNIX_EPOCH
            })
        }
    };
    if !violations.is_empty() {
        return Err(ApiError::Invalid(violations));
    }
    if !state.bus_connected() {
        return Err(ApiError::BusUnavailable);
    }
    let Ok(_one_at_a_time) = state.traces.try_acquire() else {
        return Err(ApiError::ServiceUnavailable {
            service: "trace (another one is running)".into(),
            retry_after: Duration::from_secs(1),
        });
    };
    let traced = tokio::time::timeout(TRACE_TIMEOUT, trace(&state.bus, &id, Some(since)))
        .await
        .map_err(|_| ApiError::Timeout("trace".into()))?;
    match traced {
        Ok(found) => Ok(json(StatusCode::OK, &found)),
        Err(TraceError::NotFound(_)) => Err(ApiError::NotFound(format!(
            "no message was caused by request {id} (since {}) or is about order {id}",
            since.format(&Rfc3339).unwrap_or_default()
        ))),
        Err(e) => {
            tracing::error!(error = %e, "trace failed");
            Err(ApiError::Internal)
        }
    }
}
