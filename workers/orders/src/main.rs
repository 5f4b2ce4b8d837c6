//! `skein-orders`: the orders worker as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/orders.db skein-orders
//! ```

use anyhow::Context;
use skein_bus::{provision, Bus, BusConfig};
use skein_outbox::Store;
use skein_service::HostConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite:data/orders.db".into());
    let bus = Bus::connect(&BusConfig::new(&nats_url, skein_orders::NAME)).await?;
    provision::apply_builtin_streams(bus.jetstream(), &Default::default())
        .await
        .context("failed to apply the streams")?;
    let store = Store::connect(&database_url)
        .await
        .context("failed to open the orders database")?;
    let host = skein_orders::start(bus, store, HostConfig::new(skein_orders::NAME))
        .await
        .context("failed to start the orders worker")?;
    tracing::info!(nats = %nats_url, db = %skein_outbox::store::redact(&database_url), "orders running; Ctrl-C stops");
    tokio::signal::ctrl_c()
        .await
        .context("failed to wait for Ctrl-C")?;
    host.shutdown().await;
    Ok(())
}
