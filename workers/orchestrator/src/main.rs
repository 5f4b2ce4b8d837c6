//! `skein-orchestrator`: the saga coordinator as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/orchestrator.db skein-orchestrator
//! ```
//!
//! Start more copies to share the work; `skein worker orchestrator` runs
//! the same worker from the `skein` command.

use anyhow::Context;
use skein_orchestrator::OrchestratorConfig;
use skein_service::{standalone, HostConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = standalone::connect(skein_orchestrator::NAME).await?;
    let health = standalone::listen(env.health).await?;
    let host = skein_orchestrator::start(
        env.bus,
        env.store,
        HostConfig::new(skein_orchestrator::NAME),
        OrchestratorConfig::default(),
    )
    .await
    .context("failed to start the orchestrator")?;
    standalone::serve(host, health).await
}
