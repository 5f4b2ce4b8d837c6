//! Running a worker as its own process: the shared part of every worker's
//! `main` (this module is the binary edge, so its errors are `anyhow`).
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let env = skein_service::standalone::connect("catalog").await?;
//! let health = skein_service::standalone::listen(env.health).await?;
//! # let start = |bus, store, config| async move { skein_service::Host::start(bus, store, config).await };
//! let host = start(env.bus.clone(), env.store.clone(), skein_service::HostConfig::new("catalog")).await?;
//! skein_service::standalone::serve(host, health).await
//! # }
//! ```

use std::net::SocketAddr;

use anyhow::Context;
use skein_bus::{provision, Bus, BusConfig};
use skein_outbox::Store;
use tokio::net::TcpListener;

use crate::health::{self, HealthServer};
use crate::Host;

/// A worker process's connections.
pub struct Standalone {
    /// Connected, streams applied.
    pub bus: Bus,
    /// The worker's database, migrated for the outbox.
    pub store: Store,
    /// `NATS_URL` (default `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// `DATABASE_URL` (default `sqlite:data/<name>.db`).
    pub database_url: String,
    /// Where to serve the health endpoint: `SKEIN_HEALTH_HTTP` (e.g.
    /// `0.0.0.0:9090`), when set.
    pub health: Option<SocketAddr>,
}

impl std::fmt::Debug for Standalone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standalone")
            .field("bus", &self.bus)
            .field("nats_url", &skein_bus::redact_url(&self.nats_url))
            .field(
                "database_url",
                &skein_outbox::store::redact(&self.database_url),
            )
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

/// Installs logging (`RUST_LOG`, default `info`), reads `NATS_URL`,
/// `DATABASE_URL` and `SKEIN_HEALTH_HTTP`, connects, applies the streams and
/// opens the store.
pub async fn connect(name: &str) -> anyhow::Result<Standalone> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| format!("sqlite:data/{name}.db"));
    let health = health_address()?;
    let bus = Bus::connect(&BusConfig::from_env(&nats_url, name)?).await?;
    provision::ensure_builtin_streams(bus.jetstream())
        .await
        .context("failed to create the streams")?;
    let store = Store::connect(&database_url)
        .await
        .with_context(|| format!("failed to open the {name} database; check DATABASE_URL"))?;
    tracing::info!(nats = %skein_bus::redact_url(&nats_url), db = %skein_outbox::store::redact(&database_url), "{name} connected");
    Ok(Standalone {
        bus,
        store,
        nats_url,
        database_url,
        health,
    })
}

/// `SKEIN_HEALTH_HTTP`, when set and not empty.
fn health_address() -> anyhow::Result<Option<SocketAddr>> {
    match std::env::var("SKEIN_HEALTH_HTTP") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map(Some).with_context(|| {
            format!("SKEIN_HEALTH_HTTP={v:?} is not an address and port such as 0.0.0.0:9090")
        }),
        _ => Ok(None),
    }
}

/// Binds the health endpoint's address ([`Standalone::health`]), if any:
/// before the worker starts, so that a taken one fails at once.
pub async fn listen(health: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match health {
        Some(addr) => Ok(Some(health::bind(addr).await?)),
        None => Ok(None),
    }
}

/// Runs `host` as [`run`] does, with the health endpoint on `health` (from
/// [`listen`]).
pub async fn serve(host: Host, health: Option<TcpListener>) -> anyhow::Result<()> {
    tracing::info!(worker = host.name(), "running; Ctrl-C or SIGTERM stops");
    run(vec![host], health).await
}

/// Runs `hosts` until Ctrl-C or SIGTERM, then shuts them down gracefully
/// (in reverse order), answering on `health` meanwhile (the NATS
/// connection it reports is the first host's).
///
/// A part of a host that stops on its own (a panic) does not come back: the
/// others are then shut down too and the error names it, so that the
/// process exits with it and its supervisor restarts it.
pub async fn run(hosts: Vec<Host>, health: Option<TcpListener>) -> anyhow::Result<()> {
    let probes: Vec<_> = hosts.iter().map(Host::probe).collect();
    let health = match (health, hosts.first()) {
        (Some(listener), Some(first)) => Some(HealthServer::start(
            listener,
            first.bus().clone(),
            probes.clone(),
        )),
        _ => None,
    };
    let failed = tokio::select! {
        stop = wait_for_stop() => {
            stop?;
            eprintln!("stopping: finishing messages in flight");
            if let Some(health) = &health {
                health.stopping();
            }
            None
        }
        stopped = health::first_stopped(&probes) => Some(stopped),
    };
    for host in hosts.into_iter().rev() {
        host.shutdown().await;
    }
    if let Some(health) = health {
        health.stop();
    }
    match failed {
        Some(stopped) => anyhow::bail!("{stopped} on its own; the process stopped, restart it"),
        None => Ok(()),
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn wait_for_stop() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C"),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")
    }
}
