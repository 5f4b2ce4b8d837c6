//! `skein worker <name>...`: run workers in this process.
//!
//! Every copy started with the same worker name joins the same consumer
//! groups and the same query queue group, so starting the command again
//! (here or on another machine) scales that worker.

use anyhow::Context;
use skein_bus::provision::{apply_builtin_streams, ProvisionOptions};
use skein_outbox::Store;
use skein_service::{Host, HostConfig};

/// Where workers keep their data unless told otherwise.
pub(crate) const DEFAULT_DATABASE_URL: &str = "sqlite:data/{service}.db";

/// Run one or more workers.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The workers to run.
    #[arg(required = true, value_enum)]
    names: Vec<Name>,
    /// Database URL; `{service}` is replaced by the worker name, so every
    /// worker gets its own database (e.g. postgres://db/skein_{service}).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    /// Starting balance of new payment accounts, in cents.
    #[arg(long, env = "SKEIN_STARTING_BALANCE_CENTS", default_value_t = 100_000)]
    starting_balance_cents: i64,
    /// Latency of the simulated payment provider, in milliseconds.
    #[arg(long, env = "SKEIN_PROVIDER_LATENCY_MS", default_value_t = 0)]
    provider_latency_ms: u64,
    /// Directory of identity's token signing key (generated there on first start).
    #[arg(long, env = "SKEIN_KEY_DIR", default_value = "data")]
    key_dir: std::path::PathBuf,
    /// Identity's token signing key as PKCS#8 PEM (wins over --key-dir).
    #[arg(long, env = "SKEIN_SIGNING_KEY_PEM", hide_env_values = true)]
    signing_key_pem: Option<String>,
    /// Email of the first admin account (created once, with --admin-password).
    #[arg(long, env = "SKEIN_ADMIN_EMAIL")]
    admin_email: Option<String>,
    /// Password of the first admin account.
    #[arg(long, env = "SKEIN_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Share of payments the simulated provider declines (0.0 to 1.0).
    #[arg(long, env = "SKEIN_PROVIDER_FAILURE_RATE", default_value_t = 0.0)]
    provider_failure_rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Name {
    Identity,
    Catalog,
    Orders,
    Payments,
    Projector,
    Orchestrator,
}

impl Name {
    fn as_str(self) -> &'static str {
        match self {
            Name::Identity => skein_identity::NAME,
            Name::Catalog => skein_catalog::NAME,
            Name::Orders => skein_orders::NAME,
            Name::Payments => skein_payments::NAME,
            Name::Projector => skein_projector::NAME,
            Name::Orchestrator => skein_orchestrator::NAME,
        }
    }
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.provider_failure_rate) {
        anyhow::bail!("--provider-failure-rate must be between 0.0 and 1.0");
    }
    let mut names = args.names.clone();
    names.dedup();
    let bus = super::connect(nats_url).await?;
    apply_builtin_streams(bus.jetstream(), &ProvisionOptions::default())
        .await
        .context("cannot apply the streams")?;
    let mut hosts: Vec<Host> = Vec::new();
    for name in names {
        let service = name.as_str();
        let url = args.database_url.replace("{service}", service);
        let store = Store::connect(&url).await.with_context(|| {
            format!("cannot open the {service} database; check --database-url / DATABASE_URL")
        })?;
        let config = HostConfig::new(service);
        let host = match name {
            Name::Catalog => skein_catalog::start(bus.clone(), store, config)
                .await
                .map_err(anyhow::Error::from),
            Name::Identity => {
                let identity = skein_identity::IdentityConfig {
                    key_dir: Some(args.key_dir.clone()),
                    signing_key_pem: args.signing_key_pem.clone(),
                    admin: match (&args.admin_email, &args.admin_password) {
                        (Some(email), Some(password)) => Some(skein_identity::AdminSeed {
                            email: email.clone(),
                            password: password.clone(),
                            name: "Admin".into(),
                        }),
                        (None, None) => None,
                        _ => anyhow::bail!(
                            "set both SKEIN_ADMIN_EMAIL and SKEIN_ADMIN_PASSWORD, or neither"
                        ),
                    },
                    ..Default::default()
                };
                skein_identity::start(bus.clone(), store, config, identity)
                    .await
                    .map_err(anyhow::Error::from)
            }
            Name::Orders => skein_orders::start(bus.clone(), store, config)
                .await
                .map_err(anyhow::Error::from),
            Name::Orchestrator => skein_orchestrator::start(
                bus.clone(),
                store,
                config,
                skein_orchestrator::OrchestratorConfig::default(),
            )
            .await
            .map_err(anyhow::Error::from),
            Name::Projector => skein_projector::start(bus.clone(), store, config)
                .await
                .map_err(anyhow::Error::from),
            Name::Payments => {
                let payments = skein_payments::PaymentsConfig {
                    starting_balance_cents: args.starting_balance_cents,
                    provider: skein_payments::ProviderConfig {
                        latency: std::time::Duration::from_millis(args.provider_latency_ms),
                        failure_rate: args.provider_failure_rate,
                    },
                };
                skein_payments::start(bus.clone(), store, config, payments)
                    .await
                    .map_err(anyhow::Error::from)
            }
        }
        .with_context(|| format!("cannot start {service}"))?;
        eprintln!(
            "{service} running (database {})",
            skein_outbox::store::redact(&url)
        );
        hosts.push(host);
    }
    skein_service::standalone::wait_for_stop().await?;
    eprintln!("stopping: finishing messages in flight");
    for host in hosts {
        host.shutdown().await;
    }
    Ok(())
}
