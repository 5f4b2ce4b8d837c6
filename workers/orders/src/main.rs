//! `skein-orders`: the orders worker as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/orders.db skein-orders
//! ```
//!
//! `skein worker orders` runs the same worker from the `skein` command.

use anyhow::Context;
use skein_service::standalone;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = standalone::connect(skein_orders::NAME).await?;
    let host = skein_orders::start(env.bus, env.store, env.host)
        .await
        .context("failed to start the orders worker")?;
    standalone::serve(host, env.health).await
}
