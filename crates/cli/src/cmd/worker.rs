//! `skein worker <name>...`: run workers in this process.
//!
//! Every copy started with the same worker name joins the same consumer
//! groups and the same query queue group, so starting the command again
//! (here or on another machine) scales that worker. [`Settings`] and
//! [`start`] are shared with `skein up`, which runs every worker.

use std::path::{Path, PathBuf};

use anyhow::Context;
use skein_bus::provision::ensure_builtin_streams;
use skein_bus::Bus;
use skein_outbox::{Store, StoreConfig};
use skein_service::{Host, HostConfig};

/// Where `skein worker` keeps data unless told otherwise.
pub(crate) const DEFAULT_DATA_DIR: &str = "data";
/// The database URL template that goes with it.
pub(crate) const DEFAULT_DATABASE_URL: &str = "sqlite:data/{service}.db";

/// Run one or more workers.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The workers to run.
    #[arg(required = true, value_enum)]
    names: Vec<Name>,
    /// Serve `/health/live` and `/health/ready` for this process's workers
    /// on this address (e.g. 0.0.0.0:9090), for health checks.
    #[arg(long, env = "SKEIN_HEALTH_HTTP", value_name = "ADDR")]
    health_http: Option<std::net::SocketAddr>,
    #[command(flatten)]
    settings: Settings,
}

/// How workers are configured (shared by `skein worker` and `skein up`).
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub(crate) struct Settings {
    /// Database URL; `{service}` is replaced by the worker name, so every
    /// worker gets its own database (e.g. postgres://db/skein_{service}).
    /// Default: `sqlite:DATA_DIR/{service}.db`.
    #[arg(long, env = "DATABASE_URL")]
    pub(crate) database_url: Option<String>,
    /// Connections per worker database (default: 4 on SQLite, 10 on
    /// PostgreSQL). On PostgreSQL each database also takes up to 3
    /// connections outside the pools (the active outbox relay's lock
    /// connection and its LISTEN connection, and a standby copy's relay
    /// trying the lock): workers × (copies × this + 3) must stay under the
    /// server's max_connections.
    #[arg(long, env = "SKEIN_DATABASE_POOL")]
    database_pool: Option<u32>,
    /// SQLite page cache of each database connection, in KiB (default:
    /// 256 in `skein up`, whose six databases share one process; SQLite's
    /// own, about 2,000, in `skein worker`). A worker's writer connection
    /// fills its cache under load and keeps it.
    #[arg(long, env = "SKEIN_SQLITE_CACHE_KIB", value_name = "KIB")]
    pub(crate) sqlite_cache_kib: Option<u32>,
    /// Starting balance of new payment accounts, in cents.
    #[arg(long, env = "SKEIN_STARTING_BALANCE_CENTS", default_value_t = 100_000)]
    starting_balance_cents: i64,
    /// Latency of the simulated payment provider, in milliseconds.
    #[arg(long, env = "SKEIN_PROVIDER_LATENCY_MS", default_value_t = 0)]
    provider_latency_ms: u64,
    /// Share of payments the simulated provider declines (0.0 to 1.0).
    #[arg(long, env = "SKEIN_PROVIDER_FAILURE_RATE", default_value_t = 0.0)]
    provider_failure_rate: f64,
    /// Directory of identity's token signing key (generated there on first
    /// start). Default: the data directory.
    #[arg(long, env = "SKEIN_KEY_DIR")]
    key_dir: Option<PathBuf>,
    /// Identity's token signing key as PKCS#8 PEM (wins over --key-dir).
    #[arg(long, env = "SKEIN_SIGNING_KEY_PEM", hide_env_values = true)]
    signing_key_pem: Option<String>,
    /// More public keys (PEM blocks) that verify tokens besides the signing
    /// key, for a key rotation: the next key before identity signs with it,
    /// then the previous one until its tokens expire. Also read from
    /// KEY_DIR/identity-verification-keys.pem.
    #[arg(long, env = "SKEIN_VERIFICATION_KEYS_PEM")]
    verification_keys_pem: Option<String>,
    /// Email of the first admin account (created once, with --admin-password).
    #[arg(long, env = "SKEIN_ADMIN_EMAIL")]
    pub(crate) admin_email: Option<String>,
    /// Password of the first admin account.
    #[arg(long, env = "SKEIN_ADMIN_PASSWORD", hide_env_values = true)]
    pub(crate) admin_password: Option<String>,
    /// How long published outbox rows are kept, such as 7d (the default):
    /// what `skein audit` can compare. 0s deletes them at the next cleanup.
    /// Unpublished rows are never deleted.
    #[arg(long, env = "SKEIN_OUTBOX_RETENTION", value_name = "DURATION")]
    outbox_retention: Option<String>,
    /// How long each inbox remembers the messages it handled, such as 30d
    /// (the default; at least 1h): a message redelivered or replayed later
    /// than that runs again. Keep it longer than any outage of a worker.
    #[arg(long, env = "SKEIN_INBOX_RETENTION", value_name = "DURATION")]
    inbox_retention: Option<String>,
    /// How long the orchestrator keeps a saga that ended (completed or
    /// compensated) with its transitions, such as 30d (the default); failed
    /// sagas are kept until dealt with. Keep it at least as long as the
    /// inbox retention.
    #[arg(long, env = "SKEIN_SAGA_RETENTION", value_name = "DURATION")]
    saga_retention: Option<String>,
}

impl Settings {
    /// Refuses settings that cannot work, saying which flag to fix.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.provider_failure_rate) {
            anyhow::bail!("--provider-failure-rate must be between 0.0 and 1.0");
        }
        if self.database_pool == Some(0) {
            anyhow::bail!("--database-pool must be at least 1");
        }
        if self.sqlite_cache_kib == Some(0) {
            anyhow::bail!("--sqlite-cache-kib must be at least 1 (KiB)");
        }
        if self.starting_balance_cents < 0 {
            anyhow::bail!("--starting-balance-cents must not be negative");
        }
        if self.admin_email.is_some() != self.admin_password.is_some() {
            anyhow::bail!("set both SKEIN_ADMIN_EMAIL and SKEIN_ADMIN_PASSWORD, or neither");
        }
        self.relay()?;
        self.orchestrator()?;
        Ok(())
    }

    /// Several workers in one process each need a database of their own:
    /// a `--database-url` without `{service}` would put them all in one
    /// (an application's `DATABASE_URL` left in the environment, say).
    pub(crate) fn check_one_database_each(&self, workers: usize) -> anyhow::Result<()> {
        match &self.database_url {
            Some(url) if workers > 1 && !url.contains("{service}") => anyhow::bail!(
                "--database-url / DATABASE_URL {} has no {{service}}: the {workers} workers would \
                 share one database; give a template with {{service}} where each worker's name \
                 goes (postgres://user@host/skein_{{service}}, sqlite:data/{{service}}.db), or \
                 run one worker per process",
                skein_outbox::store::redact(url)
            ),
            _ => Ok(()),
        }
    }

    /// The relay settings of every worker: the outbox and inbox retentions.
    pub(crate) fn relay(&self) -> anyhow::Result<skein_outbox::RelayConfig> {
        skein_service::standalone::relay_config(
            self.outbox_retention.as_deref(),
            self.inbox_retention.as_deref(),
        )
    }

    /// The orchestrator's settings: the saga retention.
    pub(crate) fn orchestrator(&self) -> anyhow::Result<skein_orchestrator::OrchestratorConfig> {
        let mut config = skein_orchestrator::OrchestratorConfig::default();
        if let Some(value) = &self.saga_retention {
            config.retention = skein_service::standalone::parse_duration(value)
                .context("the saga retention (--saga-retention, SKEIN_SAGA_RETENTION)")?;
        }
        Ok(config)
    }

    /// The database URL template: the flag, or SQLite files in `data_dir`.
    pub(crate) fn database_url(&self, data_dir: &Path) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| Self::default_database_url(data_dir))
    }

    /// SQLite files in `data_dir`, one per service.
    pub(crate) fn default_database_url(data_dir: &Path) -> String {
        format!("sqlite:{}/{{service}}.db", data_dir.display())
    }
}

/// The first admin to create when identity starts, if any.
pub(crate) fn admin_seed(settings: &Settings) -> Option<skein_identity::AdminSeed> {
    match (&settings.admin_email, &settings.admin_password) {
        (Some(email), Some(password)) => Some(skein_identity::AdminSeed {
            email: email.clone(),
            password: password.clone(),
            name: "Admin".into(),
        }),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Name {
    Identity,
    Catalog,
    Orders,
    Payments,
    Projector,
    Orchestrator,
}

impl Name {
    pub(crate) fn as_str(self) -> &'static str {
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

/// Binds `worker`'s handlers to `consumers` as the live worker binds them,
/// on `store`, migrated first. `payments` configures the payments worker.
pub(crate) async fn bind_worker<C: skein_service::Consumers>(
    worker: Name,
    store: &skein_outbox::Store,
    consumers: &mut C,
    payments: &skein_payments::PaymentsConfig,
) -> anyhow::Result<()> {
    match worker {
        Name::Catalog => {
            store
                .migrate(skein_catalog::NAME, skein_catalog::MIGRATIONS)
                .await?;
            skein_catalog::bind_consumers(consumers).await?;
        }
        Name::Orders => {
            store
                .migrate(skein_orders::NAME, skein_orders::MIGRATIONS)
                .await?;
            skein_orders::bind_consumers(consumers, |_| {}).await?;
        }
        Name::Payments => {
            store
                .migrate(skein_payments::NAME, skein_payments::MIGRATIONS)
                .await?;
            skein_payments::bind_consumers(consumers, payments).await?;
        }
        Name::Projector => {
            store
                .migrate(skein_projector::NAME, skein_projector::MIGRATIONS)
                .await?;
            skein_projector::bind_consumers(consumers).await?;
        }
        Name::Orchestrator => {
            let coordinator = skein_orchestrator::coordinator(
                store,
                skein_orchestrator::NAME,
                &skein_orchestrator::OrchestratorConfig::default(),
            )
            .await?;
            skein_orchestrator::bind_consumers(consumers, coordinator, |_| {}).await?;
        }
        Name::Identity => anyhow::bail!("identity consumes no stream"),
    }
    Ok(())
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    args.settings.check()?;
    // Each worker once, in the order given.
    let mut names = args.names.clone();
    let mut seen = Vec::new();
    names.retain(|n| {
        let first = !seen.contains(n);
        seen.push(*n);
        first
    });
    args.settings.check_one_database_each(names.len())?;
    let listener = match args.health_http {
        Some(addr) => Some(skein_service::health::HealthServer::start(
            skein_service::health::bind(addr).await?,
        )),
        None => None,
    };
    let bus = super::connect(nats_url).await?;
    ensure_builtin_streams(bus.jetstream())
        .await
        .context("cannot create the streams")?;
    let data_dir = Path::new(DEFAULT_DATA_DIR);
    let admin = admin_seed(&args.settings);
    let hosts = start(&bus, &names, &args.settings, data_dir, admin).await?;
    skein_service::standalone::run(hosts, listener).await
}

/// Starts `names` on `bus`, each with its own database, identity with
/// `admin` as its first admin; stops the ones started if one fails.
pub(crate) async fn start(
    bus: &Bus,
    names: &[Name],
    settings: &Settings,
    data_dir: &Path,
    admin: Option<skein_identity::AdminSeed>,
) -> anyhow::Result<Vec<Host>> {
    let mut hosts: Vec<Host> = Vec::new();
    for &name in names {
        match start_one(bus, name, settings, data_dir, admin.clone()).await {
            Ok(host) => hosts.push(host),
            Err(e) => {
                skein_service::host::shutdown_all(hosts).await;
                return Err(e);
            }
        }
    }
    Ok(hosts)
}

async fn start_one(
    bus: &Bus,
    name: Name,
    settings: &Settings,
    data_dir: &Path,
    admin: Option<skein_identity::AdminSeed>,
) -> anyhow::Result<Host> {
    let args = settings;
    {
        let service = name.as_str();
        let url = args.database_url(data_dir).replace("{service}", service);
        let mut store_config = match name {
            Name::Projector => skein_projector::store_config(&url),
            _ => StoreConfig::new(url.as_str()),
        };
        if let Some(pool) = args.database_pool {
            store_config.max_connections = pool;
        }
        if let Some(kib) = args.sqlite_cache_kib {
            store_config.sqlite_cache_kib = Some(kib);
        }
        let store = Store::connect_with(store_config).await.with_context(|| {
            format!("cannot open the {service} database; check --database-url / DATABASE_URL")
        })?;
        let mut config = HostConfig::new(service);
        config.relay = args.relay()?;
        let host = match name {
            Name::Catalog => skein_catalog::start(bus.clone(), store, config)
                .await
                .map_err(anyhow::Error::from),
            Name::Identity => {
                let identity = skein_identity::IdentityConfig {
                    key_dir: Some(args.key_dir.clone().unwrap_or_else(|| data_dir.to_owned())),
                    signing_key_pem: args.signing_key_pem.clone(),
                    verification_keys_pem: args.verification_keys_pem.clone(),
                    admin,
                    ..Default::default()
                };
                skein_identity::start(bus.clone(), store, config, identity)
                    .await
                    .map_err(anyhow::Error::from)
            }
            Name::Orders => skein_orders::start(bus.clone(), store, config)
                .await
                .map_err(anyhow::Error::from),
            Name::Orchestrator => {
                skein_orchestrator::start(bus.clone(), store, config, args.orchestrator()?)
                    .await
                    .map_err(anyhow::Error::from)
            }
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
        Ok(host)
    }
}
