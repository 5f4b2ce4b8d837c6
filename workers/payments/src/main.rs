//! `skein-payments`: the payments worker as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/payments.db skein-payments
//! ```
//!
//! `SKEIN_STARTING_BALANCE_CENTS` (default 100000), `SKEIN_PROVIDER_LATENCY_MS`
//! (default 0) and `SKEIN_PROVIDER_FAILURE_RATE` (0.0 to 1.0, default 0) tune
//! the simulated provider.

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
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite:data/payments.db".into());
    let bus = Bus::connect(&BusConfig::new(&nats_url, skein_payments::NAME)).await?;
    provision::apply_builtin_streams(bus.jetstream(), &Default::default())
        .await
        .context("failed to apply the streams")?;
    let store = Store::connect(&database_url)
        .await
        .context("failed to open the payments database")?;
    let config = config_from_env()?;
    let host = skein_payments::start(bus, store, HostConfig::new(skein_payments::NAME), config)
        .await
        .context("failed to start the payments")?;
    tracing::info!(nats = %nats_url, db = %skein_outbox::store::redact(&database_url), "payments running; Ctrl-C stops");
    tokio::signal::ctrl_c()
        .await
        .context("failed to wait for Ctrl-C")?;
    host.shutdown().await;
    Ok(())
}

fn config_from_env() -> anyhow::Result<skein_payments::PaymentsConfig> {
    fn var<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid number")),
            Err(_) => Ok(default),
        }
    }
    let failure_rate: f64 = var("SKEIN_PROVIDER_FAILURE_RATE", 0.0)?;
    if !(0.0..=1.0).contains(&failure_rate) {
        anyhow::bail!(
            "SKEIN_PROVIDER_FAILURE_RATE must be between 0.0 and 1.0, got {failure_rate}"
        );
    }
    Ok(skein_payments::PaymentsConfig {
        starting_balance_cents: var("SKEIN_STARTING_BALANCE_CENTS", 100_000)?,
        provider: skein_payments::ProviderConfig {
            latency: std::time::Duration::from_millis(var("SKEIN_PROVIDER_LATENCY_MS", 0)?),
            failure_rate,
        },
    })
}
