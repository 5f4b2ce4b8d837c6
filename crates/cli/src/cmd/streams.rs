//! `skein streams apply`.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use skein_bus::provision::{
    apply_consumer, apply_stream, builtin_streams, streams_from_dir, ConsumerSpec, Filters,
    ProvisionOptions,
};
use skein_service::ConsumerPlan;

use super::worker::{bind_worker, Name};

/// Manage the JetStream streams.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Create missing streams and update changed ones, then every worker's
    /// durable consumers (as the workers would bind them), showing what
    /// changed. Workers whose NATS user may not create consumers need this
    /// before they start, and again after an upgrade that changes them.
    Apply {
        /// Read the definitions from this directory instead of the built-in ones (nats/streams).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Replicas per stream (3 on a 3-node cluster). Without it an
        /// existing stream keeps its replicas (a definition's
        /// `num_replicas` is used when a stream is created).
        #[arg(long, env = "SKEIN_STREAM_REPLICAS")]
        replicas: Option<usize>,
        /// Only the streams, not the workers' consumers.
        #[arg(long)]
        streams_only: bool,
        /// The consumers of these workers only (comma-separated; default
        /// every worker): a consumer no copy pulls from shows as lag.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            conflicts_with = "streams_only"
        )]
        workers: Vec<Name>,
        /// Set each consumer's subjects to exactly this version's, removing
        /// any other: after an upgrade that drops a subject, once no copy of
        /// the older version runs. Without it a consumer's subjects are only
        /// added to, as every worker copy does at start, so applying a new
        /// version before its rolling upgrade takes nothing from the older
        /// copies still running.
        #[arg(long, conflicts_with = "streams_only")]
        exact: bool,
        /// How long the workers' inboxes remember what they handled (their
        /// --inbox-retention, the same variable; default 30d). A consumer
        /// missing on a stream kept as history (EVENTS) is created at the
        /// messages stored within this long: a worker whose consumer was
        /// lost has run older ones and forgotten them, and would run them
        /// again. Not read with --streams-only or --from-beginning.
        // No `conflicts_with`: clap counts the variable as given, and the
        // workers' environment may well hold it.
        #[arg(long, env = "SKEIN_INBOX_RETENTION", value_name = "DURATION")]
        inbox_retention: Option<String>,
        /// Create a missing consumer at the stream's beginning however old
        /// its messages: for a worker new to a stream kept longer than its
        /// inbox retention, never for one whose consumer was lost. Any
        /// --inbox-retention is then not used.
        #[arg(long, conflicts_with = "streams_only")]
        from_beginning: bool,
    },
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::Apply {
            dir,
            replicas,
            streams_only,
            workers,
            exact,
            inbox_retention,
            from_beginning,
        } => {
            // Read before anything changes: a bad value changes nothing. As
            // the workers read it, and not with --streams-only, which
            // creates no consumer.
            let start_within = if from_beginning || streams_only {
                None
            } else {
                let retention = inbox_retention.as_deref();
                Some(skein_service::standalone::relay_config(None, retention)?.inbox_retention)
            };
            let bus = super::connect(nats_url).await?;
            let definitions = match dir {
                Some(dir) => streams_from_dir(&dir)?,
                None => builtin_streams()?,
            };
            let options = ProvisionOptions {
                replicas,
                keep_existing: false,
            };
            for config in definitions {
                let name = config.name.clone();
                let change = apply_stream(bus.jetstream(), config, &options).await?;
                println!("{name:<10} {change}");
            }
            if streams_only {
                return Ok(());
            }
            for mut spec in consumer_specs(&workers).await? {
                spec.start_within = start_within;
                let (_, change) = apply_consumer(
                    bus.jetstream(),
                    &spec,
                    if exact {
                        Filters::Exact
                    } else {
                        Filters::Widen
                    },
                )
                .await?;
                let name = format!("{}/{}", spec.stream, spec.durable);
                println!("{name:<22} {change}");
            }
            Ok(())
        }
    }
}

/// The durable consumers of `workers` (every worker when empty), as their
/// live copies would bind them: each worker's own code binds its handlers
/// to a [`ConsumerPlan`] on a throw-away database (built, never run).
pub(crate) async fn consumer_specs(workers: &[Name]) -> anyhow::Result<Vec<ConsumerSpec>> {
    let dir = tempfile::Builder::new()
        .prefix("skein-consumers-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let mut specs = Vec::new();
    for &worker in Name::value_variants() {
        if worker == Name::Identity || !(workers.is_empty() || workers.contains(&worker)) {
            continue;
        }
        let url = format!("sqlite:{}/{}.db", dir.path().display(), worker.as_str());
        let store = skein_outbox::Store::connect(&url).await?;
        let mut plan = ConsumerPlan::new(store.clone(), worker.as_str());
        bind_worker(
            worker,
            &store,
            &mut plan,
            &skein_payments::PaymentsConfig::default(),
        )
        .await
        .with_context(|| format!("cannot list the consumers of {}", worker.as_str()))?;
        specs.extend(plan.into_specs());
        store.close().await;
    }
    Ok(specs)
}
