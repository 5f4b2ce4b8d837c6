//! `skein-catalog`: the catalog worker as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/catalog.db skein-catalog
//! ```
//!
//! `skein worker catalog` runs the same worker from the `skein` command.

use anyhow::Context;
use skein_service::standalone;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = standalone::connect(skein_catalog::NAME).await?;
    let host = skein_catalog::start(env.bus, env.store, env.host)
        .await
        .context("failed to start the catalog worker")?;
    standalone::serve(host, env.health).await
}
