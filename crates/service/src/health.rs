//! The health endpoint of a worker process (`skein worker --health-http
//! ADDR`, or `SKEIN_HEALTH_HTTP` for the per-worker binaries): this
//! process's workers over HTTP, for container health checks, orchestrators
//! and load balancers.
//!
//! - `GET /health/live`: 200 while every part of every worker in this
//!   process runs (the outbox relay, each consumer, each background task),
//!   else 503 naming the parts that stopped. A part stops before shutdown
//!   only when it failed for good (a panic): the process then stops with an
//!   error ([`crate::standalone::run`]), for a supervisor to restart it, and this
//!   answers 503 meanwhile. While the process stops on a signal it
//!   answers 200. NATS or a database being away is not a reason: the
//!   workers reconnect by themselves.
//! - `GET /health/ready`: 200 when the process is live, connected to NATS,
//!   and every worker's database answers within two seconds; 503 naming what
//!   fails otherwise, and while the process is stopping.
//!
//! The answers are JSON like the ingress's `/health`: `status` (`ok` or
//! `failing`), `failing` (what fails, in words) and the details.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::HostProbe;
use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use skein_bus::Bus;
use tokio::task::JoinHandle;

/// How long a database has to answer the readiness check.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The health endpoint of a worker process, from before its workers start.
#[derive(Debug)]
pub struct HealthServer {
    state: Arc<Endpoint>,
    task: JoinHandle<()>,
}

/// Binds `addr` for the endpoint: before the workers start, so a taken
/// port fails the command at once.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} for the health endpoint (--health-http or SKEIN_HEALTH_HTTP); choose a free address and port"
        )
    })
}

impl HealthServer {
    /// Answers on `listener` until [`HealthServer::stop`]: while the
    /// process starts (connects, migrates its databases, binds its
    /// consumers), `/health/live` 200 and `/health/ready` 503, each with
    /// `starting`; once [`HealthServer::running`] is called, the checks.
    pub fn start(listener: tokio::net::TcpListener) -> Self {
        let state = Arc::new(Endpoint {
            checked: std::sync::OnceLock::new(),
            stopping: AtomicBool::new(false),
        });
        let app = axum::Router::new()
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the health endpoint stopped");
            }
        });
        Self { state, task }
    }

    /// The workers have started: from now on the endpoint checks `probes`
    /// and the NATS connection of `bus`.
    pub fn running(&self, bus: Bus, probes: Vec<HostProbe>) {
        let _ = self.state.checked.set(Checked { bus, probes });
    }

    /// From now on `/health/ready` answers 503 (`stopping`): the process is
    /// finishing its messages and takes no more work.
    pub fn stopping(&self) {
        self.state.stopping.store(true, Ordering::Relaxed);
    }

    /// Stops answering.
    pub fn stop(self) {
        self.task.abort();
    }
}

/// What the endpoint answers from.
#[derive(Debug)]
struct Endpoint {
    /// Set once the workers run.
    checked: std::sync::OnceLock<Checked>,
    stopping: AtomicBool,
}

#[derive(Debug)]
struct Checked {
    bus: Bus,
    probes: Vec<HostProbe>,
}

/// One worker as the checks see it.
#[derive(Debug, Serialize)]
struct WorkerHealth {
    /// Its parts that stopped.
    stopped: Vec<String>,
    /// Whether its database answered (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    failing: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nats: Option<bool>,
    workers: BTreeMap<String, WorkerHealth>,
}

impl Health {
    fn new() -> Self {
        Self {
            status: "ok",
            failing: Vec::new(),
            nats: None,
            workers: BTreeMap::new(),
        }
    }

    /// The parts of every worker that stopped.
    fn liveness(&mut self, checked: &Checked) {
        for probe in &checked.probes {
            let stopped = probe.stopped();
            for part in &stopped {
                self.failing
                    .push(format!("{}: {part} stopped", probe.name()));
            }
            self.workers.insert(
                probe.name().to_owned(),
                WorkerHealth {
                    stopped,
                    database: None,
                },
            );
        }
    }

    fn into_response(mut self) -> Response {
        let code = if self.failing.is_empty() {
            StatusCode::OK
        } else {
            self.status = "failing";
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, axum::Json(self)).into_response()
    }
}

async fn live(State(endpoint): State<Arc<Endpoint>>) -> Response {
    let mut health = Health::new();
    let Some(checked) = endpoint.checked.get() else {
        health.status = "starting";
        return health.into_response();
    };
    // Parts stop one by one as the process stops: that is no failure.
    if !endpoint.stopping.load(Ordering::Relaxed) {
        health.liveness(checked);
    }
    health.into_response()
}

/// The first part of a worker in `probes` found stopped, checked once a
/// second; pending while all run.
pub async fn first_stopped(probes: &[HostProbe]) -> String {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for probe in probes {
            if let Some(part) = probe.stopped().into_iter().next() {
                return format!("{}: {part} stopped", probe.name());
            }
        }
    }
}

async fn ready(State(endpoint): State<Arc<Endpoint>>) -> Response {
    let mut health = Health::new();
    if endpoint.stopping.load(Ordering::Relaxed) {
        health.failing.push("stopping".into());
    }
    let Some(checked) = endpoint.checked.get() else {
        health.failing.push("starting".into());
        return health.into_response();
    };
    health.liveness(checked);
    let connected =
        checked.bus.client().connection_state() == async_nats::connection::State::Connected;
    if !connected {
        health.failing.push("not connected to NATS".into());
    }
    health.nats = Some(connected);
    let databases = futures::future::join_all(
        checked
            .probes
            .iter()
            .map(|probe| probe.database(DATABASE_TIMEOUT)),
    )
    .await;
    for (probe, answered) in checked.probes.iter().zip(databases) {
        if let Err(reason) = &answered {
            health
                .failing
                .push(format!("{}: database: {reason}", probe.name()));
        }
        if let Some(worker) = health.workers.get_mut(probe.name()) {
            worker.database = Some(answered.is_ok());
        }
    }
    health.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Host, HostConfig};
    use skein_bus::BusConfig;
    use skein_outbox::Store;
    use skein_testkit::{Backend, NatsServer, TestDb};

    /// The watch every worker process keeps: pending while every
    /// part runs, then the first part that stopped, named.
    #[tokio::test]
    async fn the_watch_names_the_first_part_that_stopped() -> anyhow::Result<()> {
        let nats = NatsServer::start().await?;
        let bus = Bus::connect(&BusConfig::new(nats.url(), "health-test")).await?;
        let db = TestDb::new(Backend::Sqlite).await?;
        let store = Store::connect(db.url()).await?;
        let host = Host::start(bus, store, HostConfig::new("watched")).await?;
        let probes = vec![host.probe()];
        let watch = tokio::spawn(async move { first_stopped(&probes).await });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        anyhow::ensure!(!watch.is_finished(), "the watch ended while every part ran");
        host.abort();
        let stopped = tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .context("the watch did not see the relay stop")??;
        anyhow::ensure!(
            stopped == "watched: the outbox relay stopped",
            "the watch said {stopped:?}"
        );
        Ok(())
    }
}
