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
use skein_service::{standalone, HostConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = config_from_env()?;
    let env = standalone::connect(skein_payments::NAME).await?;
    let host = skein_payments::start(
        env.bus,
        env.store,
        HostConfig::new(skein_payments::NAME),
        config,
    )
    .await
    .context("failed to start the payments worker")?;
    standalone::serve(host).await
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
