//! `skein-projector`: the projector worker as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/projector.db skein-projector
//! # rebuild one read model (users, orders, timeline or all) and exit:
//! skein-projector rebuild all
//! ```

use anyhow::Context;
use skein_projector::ReadModel;
use skein_service::standalone;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rebuild = match args.as_slice() {
        [] => None,
        [command, model] if command == "rebuild" => Some(model.parse::<ReadModel>()?),
        _ => anyhow::bail!("usage: skein-projector [rebuild users|orders|timeline|all]"),
    };
    let env =
        standalone::connect_with(skein_projector::NAME, skein_projector::store_config).await?;
    if let Some(model) = rebuild {
        let report = skein_projector::rebuild(&env.bus, &env.store, model)
            .await
            .with_context(|| format!("failed to rebuild {model}"))?;
        print!("{report}");
        return Ok(());
    }
    let host = skein_projector::start(env.bus, env.store, env.host)
        .await
        .context("failed to start the projector")?;
    standalone::serve(host, env.health).await
}
