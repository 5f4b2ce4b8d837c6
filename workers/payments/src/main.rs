//! `skein-payments`: the payments worker as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/payments.db skein-payments
//! ```
//!
//! `SKEIN_STARTING_BALANCE_CENTS` (default 100000), `SKEIN_PROVIDER_LATENCY_MS`
//! (default 0) and `SKEIN_PROVIDER_FAILURE_RATE` (0.0 to 1.0, default 0) tune
//! the accounts and the simulated provider. `skein worker payments` runs the
//! same worker from the `skein` command.

use anyhow::Context;
use skein_payments::{PaymentsConfig, ProviderConfig};
use skein_service::standalone;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = config_from_env()?;
    let env = standalone::connect(skein_payments::NAME).await?;
    let host = skein_payments::start(env.bus, env.store, env.host, config)
        .await
        .context("failed to start the payments worker")?;
    standalone::serve(host, env.health).await
}

fn config_from_env() -> anyhow::Result<PaymentsConfig> {
    fn var<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
        match standalone::env_setting(name)? {
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid number")),
            None => Ok(default),
        }
    }
    let config = PaymentsConfig {
        starting_balance_cents: var(
            "SKEIN_STARTING_BALANCE_CENTS",
            skein_payments::DEFAULT_STARTING_BALANCE_CENTS,
        )?,
        provider: ProviderConfig {
            latency: std::time::Duration::from_millis(var("SKEIN_PROVIDER_LATENCY_MS", 0)?),
            failure_rate: var("SKEIN_PROVIDER_FAILURE_RATE", 0.0)?,
        },
    };
    config
        .validate()
        .map_err(|problem| anyhow::anyhow!("invalid payments configuration: {problem}"))?;
    Ok(config)
}
