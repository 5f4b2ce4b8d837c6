//! `skein streams apply`.

use std::path::PathBuf;

use skein_bus::provision::{apply_stream, builtin_streams, streams_from_dir, ProvisionOptions};

/// Manage the JetStream streams.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Create missing streams and update changed ones, showing what changed.
    Apply {
        /// Read the definitions from this directory instead of the built-in ones (nats/streams).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Replicas per stream (3 on a 3-node cluster).
        #[arg(long, env = "SKEIN_STREAM_REPLICAS")]
        replicas: Option<usize>,
    },
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::Apply { dir, replicas } => {
            let bus = super::connect(nats_url).await?;
            let definitions = match dir {
                Some(dir) => streams_from_dir(&dir)?,
                None => builtin_streams()?,
            };
            let options = ProvisionOptions { replicas };
            for config in definitions {
                let name = config.name.clone();
                let change = apply_stream(bus.jetstream(), config, &options).await?;
                println!("{name:<10} {change}");
            }
            Ok(())
        }
    }
}
