//! The HTTP ingress: the client API of skein over commands and queries.
//!
//! Thin and stateless (no database): it checks who calls ([`auth`], JWTs
//! verified with identity's public key only) and what they send ([`body`]:
//! content type, size, JSON Schema and contract rules), applies per-client
//! rate limits ([`limits`]), and then either publishes a command to JetStream
//! (`202 Accepted` with `Location`; `Idempotency-Key` honoured; `Prefer:
//! wait=N` holds the answer until the order is final) or asks the owning
//! service over request-reply behind a timeout and a circuit breaker
//! ([`breaker`]). Every error is RFC 9457 problem+json ([`problem`]); every
//! request's `x-request-id` is the correlation id of what it causes.
//!
//! # Layout
//!
//! - [`config`]: [`IngressConfig`], every limit with its default.
//! - `state`: what handlers share; `ask` (query behind breaker and timeout)
//!   and `publish` (command stored by JetStream).
//! - [`context`]: the middleware: request id and `traceparent`,
//!   authentication once per request, rate limits, problem bodies, metrics.
//! - [`problem`]: [`ApiError`] and the problem body.
//! - [`auth`]: the verification key (fetched from identity, refreshed on an
//!   unknown `kid`), the caller extractors, 401/403.
//! - [`body`]: the validated JSON extractor.
//! - [`limits`]: token buckets per user or IP.
//! - [`breaker`]: a circuit breaker per service.
//! - [`idempotency`]: `Idempotency-Key` answers, in flight and done; ids
//!   derived from (caller, key).
//! - [`prefer`]: `Prefer: wait=N` on the order's event subject.
//! - [`routes`]: the route table ([`routes::ROUTES`]) and the handlers, one
//!   module per resource.
//! - [`health`], [`metrics`], [`openapi`]: `/health`, `/metrics`,
//!   `/openapi.json`.
//!
//! # Example
//!
//! ```no_run
//! use skein_bus::{Bus, BusConfig};
//! use skein_ingress::{Ingress, IngressConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::connect(&BusConfig::new("nats://127.0.0.1:4222", "ingress")).await?;
//! let ingress = Ingress::build(IngressConfig::new("127.0.0.1:8080".parse()?), bus).await?;
//! println!("listening on http://{}", ingress.local_addr());
//! ingress.run_until(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod body;
pub mod breaker;
pub mod config;
pub mod context;
pub mod error;
pub mod health;
pub mod idempotency;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod prefer;
pub mod problem;
pub mod routes;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use skein_bus::Bus;

pub use config::{BreakerConfig, IngressConfig, RateLimit};
pub use error::{Error, Result};
pub use problem::{ApiError, Problem};

/// A bound, ready-to-serve ingress.
#[derive(Debug)]
pub struct Ingress {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    grace: std::time::Duration,
    header_timeout: std::time::Duration,
    max_connections: usize,
}

impl Ingress {
    /// Checks `config`, binds its address and prepares the routes on `bus`.
    ///
    /// Identity need not be running yet: the verification key is fetched on
    /// the first request that carries a token.
    pub async fn build(config: IngressConfig, bus: Bus) -> Result<Self> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|source| Error::Bind {
                addr: config.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.bind,
            source,
        })?;
        let (grace, header_timeout, max_connections) = (
            config.shutdown_grace,
            config.header_timeout,
            config.max_connections,
        );
        let state = Arc::new(state::AppState::new(config, bus));
        Ok(Self {
            listener,
            addr,
            router: routes::router(state),
            grace,
            header_timeout,
            max_connections,
        })
    }

    /// The address it listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then finishes the requests in
    /// flight and returns; connections still open `shutdown_grace` later
    /// (a client that never finishes its request) are closed.
    ///
    /// HTTP/1.1 with keep-alive; a client has `header_timeout` to send a
    /// request's headers (then its connection is closed) and `body_timeout`
    /// for its body (then 408), so a slow client holds a connection for a
    /// bounded time.
    pub async fn run_until<F>(self, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tracing::info!(addr = %self.addr, "ingress listening");
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                // At `max_connections`, new ones wait in the listen queue
                // until one closes (reaped below).
                accepted = self.listener.accept(), if connections.len() < self.max_connections => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: pause rather
                            // than spin.
                            tracing::warn!(error = %e, "cannot accept a connection");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        self.router.clone(),
                        self.header_timeout,
                        stopping.clone(),
                    ));
                }
                // Reap finished connections as they end.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(self.listener);
        let _ = stop.send(true);
        let drained = tokio::time::timeout(self.grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = connections.len(),
                grace_s = self.grace.as_secs_f64(),
                "requests still in flight after the shutdown grace; closing their connections"
            );
            connections.shutdown().await;
        }
        Ok(())
    }
}

/// Serves one connection until it closes; once `stopping` turns true, ends
/// it after the request in flight, if any.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    header_timeout: std::time::Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    use tower::ServiceExt;
    let _ = stream.set_nodelay(true);
    let service = router.map_request(
        move |mut request: axum::extract::Request<hyper::body::Incoming>| {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            request
        },
    );
    let service = hyper_util::service::TowerToHyperService::new(service);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => {
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stopping.wait_for(|stop| *stop) => {}
    }
    connection.as_mut().graceful_shutdown();
    if let Err(e) = connection.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
