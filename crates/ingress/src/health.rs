//! `/health` and `/health/live`.
//!
//! `/health` checks, concurrently and each within `health_timeout`: the NATS
//! connection, the `EVENTS`, `COMMANDS` and `DLQ` streams, every configured
//! service (`$SRV.PING.<name>` answered by at least one copy; the figures of
//! the copy that answers `$SRV.STATS.<name>`: consumer lag, outbox backlog,
//! DLQ depth) and the circuit breakers. It answers 200 when all is well,
//! else 503 with `failing` naming each failing part. DLQ depth is reported,
//! not failed on: dead letters need an operator, not a load balancer.
//!
//! An answer is reused for a second, and requests that come while one
//! is being made wait for it: each costs a dozen requests on the bus, and
//! `/health` answers anyone, as often as they ask.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use skein_bus::provision::{COMMANDS, DLQ, EVENTS};

use crate::breaker::BreakerState;
use crate::state::{AppState, Shared};

/// One service as `/health` sees it.
#[derive(Debug, Serialize, Default)]
struct ServiceHealth {
    /// A copy answered the ping.
    alive: bool,
    /// Messages its consumer has not received yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer_lag: Option<i64>,
    /// Committed messages its relay has not published yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    outbox_backlog: Option<i64>,
    /// Its dead letters.
    #[serde(skip_serializing_if = "Option::is_none")]
    dlq_depth: Option<i64>,
    /// The ingress's breaker for it.
    breaker: &'static str,
}

#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    failing: Vec<String>,
    nats: bool,
    streams: BTreeMap<&'static str, bool>,
    services: BTreeMap<String, ServiceHealth>,
}

pub(crate) async fn live() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn stream_present(state: &AppState, name: &'static str) -> (&'static str, bool) {
    let found = tokio::time::timeout(
        state.config.health_timeout,
        state.bus.jetstream().get_stream(name),
    )
    .await;
    (name, matches!(found, Ok(Ok(_))))
}

async fn srv_request(state: &AppState, verb: &str, service: &str) -> Option<bytes::Bytes> {
    let subject = format!("$SRV.{verb}.{service}");
    let request = async_nats::Request::new().timeout(Some(state.config.health_timeout));
    state
        .bus
        .client()
        .send_request(subject, request)
        .await
        .ok()
        .map(|m| m.payload)
}

async fn service_health(state: &AppState, service: String) -> (String, ServiceHealth) {
    let (ping, stats) = futures::join!(
        srv_request(state, "PING", &service),
        srv_request(state, "STATS", &service)
    );
    let mut health = ServiceHealth {
        alive: ping.is_some(),
        ..Default::default()
    };
    let gauges = stats
        .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v.get("endpoints")?
                .as_array()?
                .iter()
                .find_map(|e| e.get("data")?.get("gauges").cloned())
        });
    if let Some(g) = gauges {
        let gauge = |name: &str| g.get(name).and_then(serde_json::Value::as_i64);
        health.consumer_lag = gauge("consumer_lag");
        health.outbox_backlog = gauge("outbox_backlog");
        health.dlq_depth = gauge("dlq_depth");
    }
    (service, health)
}

/// How long an answer of `/health` is given again.
pub(crate) const FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The last answer of `/health`: when it was made, its status and body.
pub(crate) type LastHealth = Option<(tokio::time::Instant, StatusCode, axum::body::Bytes)>;

pub(crate) async fn health(State(state): State<Shared>) -> Response {
    // Held while checking: whoever comes meanwhile gets the same answer.
    let mut last = state.health.lock().await;
    let (status, body) = match &*last {
        Some((at, status, body)) if at.elapsed() < FRESH_FOR => (*status, body.clone()),
        _ => {
            let (status, body) = check(&state).await;
            let body = axum::body::Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
            *last = Some((tokio::time::Instant::now(), status, body.clone()));
            (status, body)
        }
    };
    drop(last);
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn check(state: &AppState) -> (StatusCode, Health) {
    let nats = state.bus_connected();
    let mut failing = Vec::new();
    let mut streams = BTreeMap::new();
    let mut services = BTreeMap::new();
    if nats {
        let (found, checked) = futures::join!(
            futures::future::join_all([EVENTS, COMMANDS, DLQ].map(|s| stream_present(state, s))),
            futures::future::join_all(
                state
                    .config
                    .services
                    .iter()
                    .map(|s| service_health(state, s.clone()))
            )
        );
        streams.extend(found);
        services.extend(checked);
    } else {
        failing.push("nats".to_owned());
        for s in [EVENTS, COMMANDS, DLQ] {
            streams.insert(s, false);
        }
        for s in &state.config.services {
            services.insert(s.clone(), ServiceHealth::default());
        }
    }
    if nats {
        failing.extend(
            streams
                .iter()
                .filter(|(_, ok)| !**ok)
                .map(|(s, _)| format!("stream {s}")),
        );
    }
    let breakers = state.breakers.states();
    for (name, s) in services.iter_mut() {
        let breaker = breakers.get(name).copied().unwrap_or(BreakerState::Closed);
        s.breaker = breaker.as_str();
        if nats && !s.alive {
            failing.push(format!("service {name}: not answering"));
        }
        if breaker == BreakerState::Open {
            failing.push(format!("service {name}: circuit breaker open"));
        }
        if s.consumer_lag
            .is_some_and(|l| l > state.config.max_consumer_lag)
        {
            failing.push(format!("service {name}: consumer lag"));
        }
        if s.outbox_backlog
            .is_some_and(|b| b > state.config.max_outbox_backlog)
        {
            failing.push(format!("service {name}: outbox backlog"));
        }
    }
    for (name, b) in &breakers {
        if *b == BreakerState::Open && !services.contains_key(name) {
            failing.push(format!("service {name}: circuit breaker open"));
        }
    }
    let ok = failing.is_empty();
    let body = Health {
        status: if ok { "ok" } else { "failing" },
        failing,
        nats,
        streams,
        services,
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}
