//! The HTTP routes: one table, one router.
//!
//! [`ROUTES`] lists every route with who may call it; the router, the OpenAPI
//! document and the tests all read it, so the three cannot drift.

use std::future::Future;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use uuid::Uuid;

use crate::context::{guard, observe};
use crate::idempotency::{check_key, Claim, Stored};
use crate::problem::{ApiError, Problem};
use crate::state::{AppState, Shared};

pub mod auth;
pub mod orders;
pub mod products;
pub(crate) mod sagas;
pub(crate) mod trace;
pub mod users;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Anyone,
    /// Any authenticated user.
    User,
    /// Admins.
    Admin,
}

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// `GET`, `POST`.
    pub method: &'static str,
    /// Path template, `{name}` for parameters.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// One line for the documentation.
    pub summary: &'static str,
}

const fn route(
    method: &'static str,
    path: &'static str,
    access: Access,
    summary: &'static str,
) -> Route {
    Route {
        method,
        path,
        access,
        summary,
    }
}

/// Every route the ingress serves.
pub const ROUTES: &[Route] = &[
    route(
        "POST",
        "/v1/auth/register",
        Access::Anyone,
        "Register a customer",
    ),
    route(
        "POST",
        "/v1/auth/token",
        Access::Anyone,
        "Log in: email and password for a token pair",
    ),
    route(
        "POST",
        "/v1/auth/refresh",
        Access::Anyone,
        "Exchange a refresh token for a new pair",
    ),
    route(
        "POST",
        "/v1/auth/logout",
        Access::Anyone,
        "Log out: end a refresh token's login, or every login of its user",
    ),
    route("GET", "/v1/me", Access::User, "The caller"),
    route(
        "GET",
        "/v1/products",
        Access::Anyone,
        "Every product with its available stock",
    ),
    route("POST", "/v1/products", Access::Admin, "Add a product"),
    route(
        "POST",
        "/v1/products/{id}/restock",
        Access::Admin,
        "Add stock to a product",
    ),
    route(
        "POST",
        "/v1/orders",
        Access::User,
        "Place an order (202; Prefer: wait=N to wait for the outcome)",
    ),
    route(
        "GET",
        "/v1/orders",
        Access::User,
        "The caller's orders, newest first",
    ),
    route(
        "GET",
        "/v1/orders/{id}",
        Access::User,
        "One order (owner or admin)",
    ),
    route(
        "POST",
        "/v1/orders/{id}/cancel",
        Access::User,
        "Cancel an order (owner or admin)",
    ),
    route(
        "GET",
        "/v1/users/{id}/profile",
        Access::User,
        "A user with their orders and totals (self or admin)",
    ),
    route(
        "GET",
        "/v1/dashboard",
        Access::Admin,
        "Users, orders by status and revenue",
    ),
    route(
        "GET",
        "/v1/sagas/{id}",
        Access::Admin,
        "A saga instance (by its id or its order id) with its transitions",
    ),
    route(
        "POST",
        "/v1/sagas/{id}/retry",
        Access::Admin,
        "Send a failed saga's awaited command again (by the instance id or its order id)",
    ),
    route(
        "GET",
        "/v1/trace/{id}",
        Access::Admin,
        "Every message a request (correlation id) or an order caused, as a causal tree with timings",
    ),
    route(
        "GET",
        "/health",
        Access::Anyone,
        "Aggregated health: NATS, streams, services, lag, breakers",
    ),
    route("GET", "/health/live", Access::Anyone, "The process is up"),
    route("GET", "/metrics", Access::Anyone, "Prometheus metrics"),
    route(
        "GET",
        "/openapi.json",
        Access::Anyone,
        "This API as OpenAPI 3.1",
    ),
];

/// The application: every route with its middleware.
pub(crate) fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/auth/register", post(auth::register))
        .route("/v1/auth/token", post(auth::token))
        .route("/v1/auth/refresh", post(auth::refresh))
        .route("/v1/auth/logout", post(auth::logout))
        .route("/v1/me", get(auth::me))
        .route("/v1/products", get(products::list).post(products::add))
        .route("/v1/products/{id}/restock", post(products::restock))
        .route("/v1/orders", get(orders::list).post(orders::place))
        .route("/v1/orders/{id}", get(orders::get))
        .route("/v1/orders/{id}/cancel", post(orders::cancel))
        .route("/v1/users/{id}/profile", get(users::profile))
        .route("/v1/dashboard", get(users::dashboard))
        .route("/v1/sagas/{id}", get(sagas::get))
        .route("/v1/sagas/{id}/retry", post(sagas::retry))
        .route("/v1/trace/{id}", get(trace::get))
        .route_layer(from_fn_with_state(state.clone(), guard));
    Router::new()
        .merge(v1)
        .route("/health", get(crate::health::health))
        .route("/health/live", get(crate::health::live))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn metrics(axum::extract::State(state): axum::extract::State<Shared>) -> Response {
    let text = state.metrics.render(&state.breakers.states());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn openapi() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

/// The one parameter of a route's path (`{id}`), as [`axum::extract::Path`]
/// takes it, but refused as problem+json: a path that does not decode (a
/// percent-encoded byte that is not UTF-8) names nothing there, 404.
#[derive(Debug)]
pub(crate) struct PathParam(pub(crate) String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(id)) => Ok(Self(id)),
            Err(_) => Err(ApiError::NotFound(format!(
                "nothing at {}: the path does not decode to text",
                parts.uri.path()
            ))),
        }
    }
}

/// A route's query string, as axum's `Query` extractor gave it.
pub(crate) type QueryParams = Result<
    axum::extract::Query<std::collections::BTreeMap<String, String>>,
    axum::extract::rejection::QueryRejection,
>;

/// The parameters of a query string, and a violation for each one not in
/// `known`; 400 when the string does not decode.
pub(crate) fn query_params(
    params: QueryParams,
    known: &[&str],
) -> Result<
    (
        std::collections::BTreeMap<String, String>,
        Vec<skein_contracts::Violation>,
    ),
    ApiError,
> {
    let axum::extract::Query(params) = params
        .map_err(|_| ApiError::BadRequest("the query string is not valid URL encoding".into()))?;
    let unknown = params
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| skein_contracts::Violation {
            field: format!("?{k}"),
            message: "unknown query parameter".into(),
        })
        .collect();
    Ok((params, unknown))
}

/// A path id: not a UUID means there is no such thing (404, not 400).
pub(crate) fn path_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound(format!("no {what} {raw}")))
}

/// A JSON answer with a status.
pub(crate) fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Adds a header to a response (values built here are always valid).
pub(crate) fn with_header(mut response: Response, name: HeaderName, value: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, v);
    }
    response
}

/// Replay marker on answers served from the idempotency store.
const REPLAYED: &str = "idempotent-replayed";

fn fingerprint(what: &str, body: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(what.as_bytes());
    ctx.update(b"\n");
    ctx.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

async fn capture(response: Response) -> Stored {
    let (mut parts, body) = response.into_parts();
    let problem = parts.extensions.remove::<Problem>();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    Stored {
        status: parts.status,
        headers: parts.headers,
        body,
        problem,
    }
}

fn replay(stored: Stored, replayed: bool) -> Response {
    let mut response = Response::new(axum::body::Body::from(stored.body));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers;
    if let Some(problem) = stored.problem {
        response.extensions_mut().insert(problem);
    }
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// Runs a creating request at most once per `Idempotency-Key` and `scope`
/// (the caller): duplicates get the first answer, also while it is running.
/// `run` gets the key, to derive ids from it.
pub(crate) async fn idempotent<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    scope: &str,
    what: &str,
    body: &[u8],
    run: F,
) -> Response
where
    F: FnOnce(Option<String>) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => return run(None).await.into_response(),
        Some(Err(_)) => {
            return ApiError::BadRequest("Idempotency-Key must be visible ASCII".into())
                .into_response()
        }
        Some(Ok(key)) => key.to_owned(),
    };
    if let Err(e) = check_key(&key) {
        return e.into_response();
    }
    let scoped = format!("{scope}\n{key}");
    let print = fingerprint(what, body);
    let mut run = Some(run);
    loop {
        match state.idempotency.claim(&scoped, print) {
            Err(e) => return e.into_response(),
            Ok(Claim::Replay(stored)) => return replay(*stored, true),
            Ok(Claim::Wait(mut done)) => {
                // The first request is still running: wait for its answer.
                let _ = done.changed().await;
                let answer = done.borrow().clone();
                if let Some(stored) = answer {
                    return replay(stored, true);
                }
                // It ended without an answer worth keeping: claim again.
            }
            Ok(Claim::Run(guard)) => {
                let Some(run) = run.take() else {
                    return ApiError::Internal.into_response();
                };
                let response = match run(Some(key.clone())).await {
                    // Found only by running it (the key was taken with
                    // another request elsewhere): nothing to keep under
                    // this request's fingerprint, or the key's own request
                    // would be refused here next.
                    Err(ApiError::IdempotencyKeyReused) => {
                        drop(guard);
                        return ApiError::IdempotencyKeyReused.into_response();
                    }
                    answer => answer.into_response(),
                };
                let stored = capture(response).await;
                guard.complete(stored.clone());
                return replay(stored, false);
            }
        }
    }
}
