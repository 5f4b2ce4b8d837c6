//! `/v1/trace/{id}`: every message a request (correlation id) or an order
//! caused, as a tree by causation id with timings (admins). The same tree
//! `skein trace` prints (see [`skein_service::trace`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use skein_service::trace::{trace, TraceError};

use super::json;
use crate::auth::Admin;
use crate::problem::ApiError;
use crate::state::Shared;

/// Longest id looked up (request ids are at most this long too).
const MAX_ID: usize = 128;

pub(crate) async fn get(
    State(state): State<Shared>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let usable = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !usable {
        return Err(ApiError::NotFound(format!("no request or order {id:?}")));
    }
    if !state.bus_connected() {
        return Err(ApiError::BusUnavailable);
    }
    match trace(&state.bus, &id, None).await {
        Ok(found) => Ok(json(StatusCode::OK, &found)),
        Err(TraceError::NotFound(_)) => Err(ApiError::NotFound(format!(
            "no message was caused by request {id} or is about order {id}"
        ))),
        Err(e) => {
            tracing::error!(error = %e, "trace failed");
            Err(ApiError::Internal)
        }
    }
}
