//! `skein-projector`: the projector worker as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/projector.db skein-projector
//! # rebuild one read model (users, orders, timeline or all) and exit:
//! skein-projector rebuild all
//! ```

use anyhow::Context;
use skein_bus::{provision, Bus, BusConfig};
use skein_outbox::Store;
use skein_projector::ReadModel;
use skein_service::HostConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rebuild = match args.as_slice() {
        [] => None,
        [command, model] if command == "rebuild" => Some(model.parse::<ReadModel>()?),
        _ => anyhow::bail!("usage: skein-projector [rebuild users|orders|timeline|all]"),
    };
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite:data/projector.db".into());
    let bus = Bus::connect(&BusConfig::new(&nats_url, skein_projector::NAME)).await?;
    provision::apply_builtin_streams(bus.jetstream(), &Default::default())
        .await
        .context("failed to apply the streams")?;
    let store = Store::connect(&database_url)
        .await
        .context("failed to open the projector database")?;
    if let Some(model) = rebuild {
        let report = skein_projector::rebuild(&bus, &store, model)
            .await
            .with_context(|| format!("failed to rebuild {model}"))?;
        print!("{report}");
        return Ok(());
    }
    let host = skein_projector::start(bus, store, HostConfig::new(skein_projector::NAME))
        .await
        .context("failed to start the projector")?;
    tracing::info!(nats = %nats_url, db = %skein_outbox::store::redact(&database_url), "projector running; Ctrl-C stops");
    tokio::signal::ctrl_c()
        .await
        .context("failed to wait for Ctrl-C")?;
    host.shutdown().await;
    Ok(())
}
