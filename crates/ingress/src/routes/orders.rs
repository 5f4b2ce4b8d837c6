//! `/v1/orders`: placing and cancelling are commands (202), reading is a query.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use skein_contracts::catalog::{lines_violations, StockLine};
use skein_contracts::orders::{CancelOrder, GetOrder, ListOrders, OrderStatus, PlaceOrder};
use skein_contracts::validate::{Validate, Violation};
use skein_contracts::Caller;
use skein_message::{Envelope, MessageContext};
use uuid::Uuid;

use super::{idempotent, json, path_id, query_params, with_header, PathParam, QueryParams};
use crate::auth::User;
use crate::body::{body, Json};
use crate::context::RequestContext;
use crate::idempotency::derived_id;
use crate::prefer::{wait_preference, OrderWatch};
use crate::problem::ApiError;
use crate::state::{AppState, Shared};

/// The `ce-source` of what the ingress sends.
const SOURCE: &str = "ingress";

/// How long an order id minted by an ingress (a UUIDv7, which carries the
/// time it was made) is taken for an order whose `place_order` orders may
/// not have handled yet, when orders does not know it.
const PLACING: Duration = Duration::from_secs(30);

/// How far ahead of this copy's clock another copy's may be.
const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Whether an order orders does not know may be one still being placed:
/// its id is a UUIDv7 minted within [`PLACING`] (the ids of unkeyed
/// placements; a keyed placement's id follows from its key and carries no
/// time). Its `GET` and cancel are then 503 `not-yet` instead of 404: the
/// client that just got its 202 retries, and nothing is published.
fn may_be_placing(order_id: Uuid, now: std::time::SystemTime) -> bool {
    if order_id.get_version() != Some(uuid::Version::SortRand) {
        return false;
    }
    let Some((secs, nanos)) = order_id.get_timestamp().map(|t| t.to_unix()) else {
        return false;
    };
    let minted = std::time::UNIX_EPOCH + Duration::new(secs, nanos);
    match now.duration_since(minted) {
        Ok(age) => age <= PLACING,
        Err(ahead) => ahead.duration() <= CLOCK_SKEW,
    }
}

/// `NotFound` for an order that [`may_be_placing`] becomes `NotYet`.
fn not_yet_if_placing(e: ApiError, order_id: Uuid) -> ApiError {
    match e {
        ApiError::NotFound(_) if may_be_placing(order_id, std::time::SystemTime::now()) => {
            ApiError::NotYet(format!(
                "order {order_id} is not stored yet (orders takes an order within moments of its \
                 202); retry"
            ))
        }
        e => e,
    }
}

/// A new order.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// Lines: 1 to 100, quantities 1 to 10000, each product once.
    #[schemars(length(min = 1, max = 100))]
    pub lines: Vec<StockLine>,
}

impl Validate for NewOrder {
    fn violations(&self) -> Vec<Violation> {
        lines_violations(&self.lines)
    }
}

body!(NewOrder);

/// The answer to an accepted command about an order.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Accepted {
    /// The order.
    pub order_id: Uuid,
    /// Its status when the command was accepted (`pending` for a new order).
    pub status: OrderStatus,
}

fn location(order_id: Uuid) -> String {
    format!("/v1/orders/{order_id}")
}

/// 202 with `Location`.
fn accepted(order_id: Uuid, status: OrderStatus) -> Response {
    let response = json(StatusCode::ACCEPTED, &Accepted { order_id, status });
    with_header(response, header::LOCATION, &location(order_id))
}

/// Waits for one of `finals` about the order; then 200 with the order and
/// `Preference-Applied`, else `None` (answer 202).
///
/// `placed`: the lines of a keyed placement, which may repeat one placed
/// through another ingress copy or before this one's memory (orders keeps
/// the first and ignores the repeat, announcing nothing). An order whose
/// lines differ was placed with the same key and another request: 422, as
/// this copy answers a key it remembers. When no final event came within
/// the wait, the order is read once: one already final (placed before,
/// its events long gone) answers 200 too. `repeated` (JetStream already had
/// the placement: the same key within its duplicate window) reads it
/// first, so a repeat of an order already final is answered at once
/// instead of after the whole wait.
#[allow(clippy::too_many_arguments)]
async fn settle(
    state: &AppState,
    watch: Option<(OrderWatch, Duration)>,
    finals: &[&str],
    caller: &Caller,
    order_id: Uuid,
    context: &MessageContext,
    placed: Option<&[StockLine]>,
    repeated: bool,
) -> Result<Option<Response>, ApiError> {
    let Some((watch, wait)) = watch else {
        return Ok(None);
    };
    let started = std::time::Instant::now();
    if repeated && placed.is_some() {
        // Within the wait: orders not answering must not make it longer.
        let read = read_final(state, caller, order_id, context, placed, false, wait);
        if let Ok(answer) = tokio::time::timeout(wait, read).await {
            if let Some(done) = answer? {
                return Ok(Some(done));
            }
        }
    }
    let came = watch
        .until(finals, wait.saturating_sub(started.elapsed()))
        .await;
    if !came && placed.is_none() {
        return Ok(None);
    }
    read_final(state, caller, order_id, context, placed, came, wait).await
}

/// The order as `settle` answers it: 200 when a final event `came` or it
/// reads final, 422 when a keyed placement's lines differ, else `None`.
async fn read_final(
    state: &AppState,
    caller: &Caller,
    order_id: Uuid,
    context: &MessageContext,
    placed: Option<&[StockLine]>,
    came: bool,
    wait: Duration,
) -> Result<Option<Response>, ApiError> {
    let query = GetOrder {
        caller: caller.clone(),
        order_id,
    };
    let Ok(order) = state.ask(&query, context).await else {
        return Ok(None);
    };
    if let Some(placed) = placed {
        let asked = placed.iter().map(|l| (l.product_id, l.quantity));
        if !asked.eq(order.lines.iter().map(|l| (l.product_id, l.quantity))) {
            return Err(ApiError::IdempotencyKeyReused);
        }
    }
    if !came && order.status == OrderStatus::Pending {
        return Ok(None);
    }
    let response = with_header(
        json(StatusCode::OK, &order),
        header::LOCATION,
        &location(order_id),
    );
    Ok(Some(with_header(
        response,
        header::HeaderName::from_static("preference-applied"),
        &format!("wait={}", wait.as_secs()),
    )))
}

/// Subscribes to the order's events when the client asked to wait.
async fn watch_if_asked(
    state: &AppState,
    headers: &HeaderMap,
    order_id: Uuid,
) -> Result<Option<(OrderWatch, Duration)>, ApiError> {
    match wait_preference(headers, state.config.max_wait) {
        Some(wait) if !wait.is_zero() => {
            Ok(Some((OrderWatch::start(state, order_id).await?, wait)))
        }
        _ => Ok(None),
    }
}

pub(crate) async fn place(
    State(state): State<Shared>,
    ctx: RequestContext,
    User(caller): User,
    headers: HeaderMap,
    Json(body, raw): Json<NewOrder>,
) -> Response {
    let scope = format!("user:{}", caller.user_id);
    let (st, hd, sc, cx) = (&state, &headers, &scope, &ctx);
    idempotent(
        &state,
        &headers,
        &scope,
        "place_order",
        &raw,
        |key| async move {
            let (state, headers, scope, ctx) = (st, hd, sc, cx);
            // With a key, the order id and the message id follow from (caller,
            // key): a retry through any ingress copy is the same order.
            let (order_id, message_id) = match &key {
                Some(key) => (
                    derived_id("order", scope, key),
                    Some(derived_id("place_order", scope, key)),
                ),
                None => (Uuid::now_v7(), None),
            };
            let placed = key.is_some().then(|| body.lines.clone());
            let command = PlaceOrder {
                order_id,
                customer_id: caller.user_id,
                lines: body.lines,
            };
            let mut envelope = Envelope::command(SOURCE, &command, &ctx.message_context())
                .map_err(|_| ApiError::Internal)?;
            if let Some(id) = message_id {
                envelope.id = id;
            }
            let watch = watch_if_asked(state, headers, order_id).await?;
            let repeated = state.publish(&envelope).await?;
            let finals = ["order_confirmed", "order_rejected", "order_cancelled"];
            if let Some(done) = settle(
                state,
                watch,
                &finals,
                &caller,
                order_id,
                &ctx.message_context(),
                placed.as_deref(),
                repeated,
            )
            .await?
            {
                return Ok(done);
            }
            Ok(accepted(order_id, OrderStatus::Pending))
        },
    )
    .await
}

pub(crate) async fn get(
    State(state): State<Shared>,
    ctx: RequestContext,
    User(caller): User,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let order_id = path_id(&id, "order")?;
    let order = state
        .ask(&GetOrder { caller, order_id }, &ctx.message_context())
        .await
        .map_err(|e| not_yet_if_placing(e, order_id))?;
    Ok(json(StatusCode::OK, &order))
}

/// Query parameters of the order list.
const LIST_PARAMS: &[&str] = &["limit", "cursor"];

pub(crate) async fn list(
    State(state): State<Shared>,
    ctx: RequestContext,
    User(caller): User,
    params: QueryParams,
) -> Result<Response, ApiError> {
    let (params, mut violations) = query_params(params, LIST_PARAMS)?;
    let limit = match params.get("limit").map(|l| l.parse::<u32>()) {
        None => 20,
        Some(Ok(l)) => l,
        Some(Err(_)) => {
            violations.push(Violation {
                field: "?limit".into(),
                message: "must be an integer between 1 and 100".into(),
            });
            20
        }
    };
    let query = ListOrders {
        customer_id: caller.user_id,
        caller,
        limit,
        cursor: params.get("cursor").cloned(),
    };
    violations.extend(query.violations().into_iter().map(|v| Violation {
        field: v.field.replacen('/', "?", 1),
        ..v
    }));
    if !violations.is_empty() {
        return Err(ApiError::Invalid(violations));
    }
    let page = state.ask(&query, &ctx.message_context()).await?;
    Ok(json(StatusCode::OK, &page))
}

pub(crate) async fn cancel(
    State(state): State<Shared>,
    ctx: RequestContext,
    User(caller): User,
    PathParam(id): PathParam,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let order_id = path_id(&id, "order")?;
    // Refuse what certainly cannot be cancelled; when orders cannot answer
    // right now the command is still accepted: orders checks it again.
    let check = GetOrder {
        caller: caller.clone(),
        order_id,
    };
    let status = match state.ask(&check, &ctx.message_context()).await {
        Ok(order) => match order.status {
            OrderStatus::Rejected | OrderStatus::Cancelled => {
                return Err(ApiError::Conflict(format!(
                    "order {order_id} is {} and can no longer be cancelled",
                    order.status.as_str()
                )))
            }
            status => status,
        },
        Err(e @ (ApiError::NotFound(_) | ApiError::Forbidden(_))) => {
            return Err(match e {
                ApiError::Forbidden(_) => ApiError::NotFound(format!("no order {order_id}")),
                e => not_yet_if_placing(e, order_id),
            })
        }
        Err(ApiError::BusUnavailable) => return Err(ApiError::BusUnavailable),
        Err(_) => OrderStatus::Pending,
    };
    let command = CancelOrder {
        order_id,
        caller: caller.clone(),
    };
    let envelope = Envelope::command(SOURCE, &command, &ctx.message_context())
        .map_err(|_| ApiError::Internal)?;
    let watch = watch_if_asked(&state, &headers, order_id).await?;
    state.publish(&envelope).await?;
    if let Some(done) = settle(
        &state,
        watch,
        // A placement saga that rejects the order meanwhile ends it too.
        &["order_cancelled", "order_rejected"],
        &caller,
        order_id,
        &ctx.message_context(),
        None,
        false,
    )
    .await?
    {
        return Ok(done);
    }
    Ok(accepted(order_id, status).into_response())
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    fn minted_at(at: SystemTime) -> Uuid {
        let millis = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        uuid::Builder::from_unix_timestamp_millis(millis as u64, &[1; 10]).into_uuid()
    }

    #[test]
    fn only_a_recent_uuidv7_may_be_an_order_still_being_placed() {
        let now = SystemTime::now();
        let s = Duration::from_secs;
        assert!(may_be_placing(minted_at(now), now));
        assert!(may_be_placing(minted_at(now - s(29)), now));
        assert!(!may_be_placing(minted_at(now - s(31)), now));
        // Another copy's clock a little ahead; not a made-up future.
        assert!(may_be_placing(minted_at(now + s(4)), now));
        assert!(!may_be_placing(minted_at(now + s(6)), now));
        assert!(!may_be_placing(Uuid::new_v4(), now));
        assert!(!may_be_placing(derived_id("order", "user:u", "k"), now));
    }
}
