//! Running a worker as its own process: the shared part of every worker's
//! `main` (this module is the binary edge, so its errors are `anyhow`).
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let env = skein_service::standalone::connect("catalog").await?;
//! # let start = |bus, store, config| async move { skein_service::Host::start(bus, store, config).await };
//! let host = start(env.bus.clone(), env.store.clone(), skein_service::HostConfig::new("catalog")).await?;
//! skein_service::standalone::serve(host).await
//! # }
//! ```

use anyhow::Context;
use skein_bus::{provision, Bus, BusConfig};
use skein_outbox::Store;

use crate::Host;

/// A worker process's connections.
#[derive(Debug)]
pub struct Standalone {
    /// Connected, streams applied.
    pub bus: Bus,
    /// The worker's database, migrated for the outbox.
    pub store: Store,
    /// `NATS_URL` (default `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// `DATABASE_URL` (default `sqlite:data/<name>.db`).
    pub database_url: String,
}

/// Installs logging (`RUST_LOG`, default `info`), reads `NATS_URL` and
/// `DATABASE_URL`, connects, applies the streams and opens the store.
pub async fn connect(name: &str) -> anyhow::Result<Standalone> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| format!("sqlite:data/{name}.db"));
    let bus = Bus::connect(&BusConfig::new(&nats_url, name)).await?;
    provision::apply_builtin_streams(bus.jetstream(), &Default::default())
        .await
        .context("failed to apply the streams")?;
    let store = Store::connect(&database_url)
        .await
        .with_context(|| format!("failed to open the {name} database; check DATABASE_URL"))?;
    tracing::info!(nats = %nats_url, db = %skein_outbox::store::redact(&database_url), "{name} connected");
    Ok(Standalone {
        bus,
        store,
        nats_url,
        database_url,
    })
}

/// Runs `host` until Ctrl-C or SIGTERM, then shuts it down gracefully.
pub async fn serve(host: Host) -> anyhow::Result<()> {
    tracing::info!(worker = host.name(), "running; Ctrl-C or SIGTERM stops");
    wait_for_stop().await?;
    tracing::info!(
        worker = host.name(),
        "stopping: finishing messages in flight"
    );
    host.shutdown().await;
    Ok(())
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
