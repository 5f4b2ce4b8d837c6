//! `skein-orchestrator`: the saga coordinator as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/orchestrator.db skein-orchestrator
//! ```
//!
//! `SKEIN_SAGA_RETENTION` (e.g. `30d`, the default) is how long a saga that
//! ended is kept; the other settings are every worker's
//! ([`skein_service::standalone::connect`]).
//!
//! Start more copies to share the work; `skein worker orchestrator` runs
//! the same worker from the `skein` command.

use anyhow::Context;
use skein_orchestrator::OrchestratorConfig;
use skein_service::standalone;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = OrchestratorConfig::default();
    if let Some(value) = standalone::env_setting("SKEIN_SAGA_RETENTION")? {
        config.retention = standalone::parse_duration(&value).context("SKEIN_SAGA_RETENTION")?;
    }
    let env = standalone::connect(skein_orchestrator::NAME).await?;
    let host = skein_orchestrator::start(env.bus, env.store, env.host, config)
        .await
        .context("failed to start the orchestrator")?;
    standalone::serve(host, env.health).await
}
