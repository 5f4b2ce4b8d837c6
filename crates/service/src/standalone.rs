//! Running a worker as its own process: the shared part of every worker's
//! `main` (this module is the binary edge, so its errors are `anyhow`).
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let env = skein_service::standalone::connect("catalog").await?;
//! # let start = |bus, store, config| async move { skein_service::Host::start(bus, store, config).await };
//! let host = start(env.bus.clone(), env.store.clone(), skein_service::HostConfig::new("catalog")).await?;
//! skein_service::standalone::serve(host, env.health).await
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use skein_bus::{provision, Bus, BusConfig};
use skein_outbox::{RelayConfig, Store};

use crate::health::{self, HealthServer};
use crate::{Host, HostConfig};

/// The least inbox retention a worker accepts: the inbox must remember a
/// message longer than the message can come back (a redelivery after an
/// outage, a replay), or the message runs again.
pub const MIN_INBOX_RETENTION: Duration = Duration::from_secs(3600);

/// A worker process's connections.
pub struct Standalone {
    /// Connected, streams applied.
    pub bus: Bus,
    /// The worker's database, migrated for the outbox.
    pub store: Store,
    /// `NATS_URL` (default `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// `DATABASE_URL` (default `sqlite:data/<name>.db`).
    pub database_url: String,
    /// The health endpoint on `SKEIN_HEALTH_HTTP` (e.g. `0.0.0.0:9090`),
    /// when set: answering (`starting`) from before NATS is reached; hand
    /// it to [`serve`].
    pub health: Option<HealthServer>,
    /// The worker's name and relay settings, its retentions from
    /// `SKEIN_OUTBOX_RETENTION` and `SKEIN_INBOX_RETENTION` (see
    /// [`relay_config`]).
    pub host: HostConfig,
}

impl std::fmt::Debug for Standalone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standalone")
            .field("bus", &self.bus)
            .field("nats_url", &skein_bus::redact_url(&self.nats_url))
            .field(
                "database_url",
                &skein_outbox::store::redact(&self.database_url),
            )
            .field("health", &self.health)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Installs logging (`RUST_LOG`, default `info`), reads `NATS_URL`,
/// `DATABASE_URL`, `SKEIN_DATABASE_POOL`, `SKEIN_SQLITE_CACHE_KIB`,
/// `SKEIN_HEALTH_HTTP`, `SKEIN_OUTBOX_RETENTION` and
/// `SKEIN_INBOX_RETENTION` (each empty one as unset, as `skein worker`
/// reads them), connects, applies the streams and opens the store.
pub async fn connect(name: &str) -> anyhow::Result<Standalone> {
    connect_with(name, |url: &str| skein_outbox::StoreConfig::new(url)).await
}

/// [`connect`], with the worker's own store settings for a URL (the
/// projector's longer SQLite busy timeout, say); the environment's pool and
/// cache settings go on top.
pub async fn connect_with(
    name: &str,
    store_config: impl FnOnce(&str) -> skein_outbox::StoreConfig,
) -> anyhow::Result<Standalone> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    let nats_url = env_setting("NATS_URL")?.unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    // A template (`…/skein_{service}`, as `skein worker` takes) names this
    // worker's own database.
    let database_url = env_setting("DATABASE_URL")?
        .unwrap_or_else(|| format!("sqlite:data/{name}.db"))
        .replace("{service}", name);
    let mut store_config = store_config(database_url.as_str());
    if let Some(pool) = positive("SKEIN_DATABASE_POOL")? {
        store_config.max_connections = pool;
    }
    if let Some(kib) = positive("SKEIN_SQLITE_CACHE_KIB")? {
        store_config.sqlite_cache_kib = Some(kib);
    }
    // Taken and answered on first: a taken address fails at once, and a
    // start that takes long (NATS not reachable yet, a long migration)
    // answers `starting`.
    let health = match health_address()? {
        Some(addr) => Some(HealthServer::start(health::bind(addr).await?)),
        None => None,
    };
    let mut host = HostConfig::new(name);
    host.relay = relay_config(
        env_setting("SKEIN_OUTBOX_RETENTION")?.as_deref(),
        env_setting("SKEIN_INBOX_RETENTION")?.as_deref(),
    )?;
    let bus = Bus::connect(&BusConfig::from_env(&nats_url, name)?).await?;
    provision::ensure_builtin_streams(bus.jetstream())
        .await
        .context("failed to create the streams")?;
    let store = Store::connect_with(store_config)
        .await
        .with_context(|| format!("failed to open the {name} database; check DATABASE_URL"))?;
    tracing::info!(nats = %skein_bus::redact_url(&nats_url), db = %skein_outbox::store::redact(&database_url), "{name} connected");
    Ok(Standalone {
        bus,
        store,
        nats_url,
        database_url,
        health,
        host,
    })
}

/// The environment variable `name` as a whole number of at least 1, when
/// set; an error saying so otherwise.
fn positive(name: &str) -> anyhow::Result<Option<u32>> {
    env_setting(name)?
        .map(|v| match v.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("{name}={v:?}: give a whole number of at least 1"),
        })
        .transpose()
}

/// The environment variable `name`, when set and not empty; an error when
/// it is not Unicode.
pub fn env_setting(name: &str) -> anyhow::Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v.trim().to_owned())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{name} is not valid Unicode")),
    }
}

/// A duration as skein's settings write it: a whole number and a unit, `s`,
/// `m`, `h` or `d` (`90s`, `15m`, `2h`, `30d`), up to about 100 years.
pub fn parse_duration(value: &str) -> anyhow::Result<Duration> {
    let (number, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let n: u64 = number
        .parse()
        .with_context(|| format!("{value:?} is not a duration such as 15m, 2h or 7d"))?;
    let unit_seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{value:?}: a duration ends in s, m, h or d (e.g. 15m)"),
    };
    let seconds = n
        .checked_mul(unit_seconds)
        .filter(|s| *s <= 100 * 366 * 86_400)
        .with_context(|| format!("{value:?} is too long a duration"))?;
    Ok(Duration::from_secs(seconds))
}

/// Relay settings with the retentions given (durations as
/// [`parse_duration`] reads them, trimmed; `None` or an empty one keeps
/// the default): how long
/// published outbox rows are kept (default 7 days; `0s` deletes them at the
/// next cleanup, leaving `skein audit` nothing to compare) and how long
/// inbox records are (default 30 days, at least [`MIN_INBOX_RETENTION`]).
pub fn relay_config(outbox: Option<&str>, inbox: Option<&str>) -> anyhow::Result<RelayConfig> {
    // As settings are read everywhere: trimmed, an empty one unset.
    fn given(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    let (outbox, inbox) = (given(outbox), given(inbox));
    let mut relay = RelayConfig::default();
    if let Some(value) = outbox {
        relay.retention = parse_duration(value)
            .context("the outbox retention (--outbox-retention, SKEIN_OUTBOX_RETENTION)")?;
    }
    if let Some(value) = inbox {
        relay.inbox_retention = parse_duration(value)
            .context("the inbox retention (--inbox-retention, SKEIN_INBOX_RETENTION)")?;
        if relay.inbox_retention < MIN_INBOX_RETENTION {
            bail!(
                "an inbox retention of {value} is too short: the inbox must remember a message \
                 longer than it can be redelivered or replayed, or it runs again; give at least 1h \
                 (the default is 30d)"
            );
        }
    }
    Ok(relay)
}

/// `SKEIN_HEALTH_HTTP`, when set and not empty.
fn health_address() -> anyhow::Result<Option<SocketAddr>> {
    match env_setting("SKEIN_HEALTH_HTTP")? {
        Some(v) => v.parse().map(Some).with_context(|| {
            format!("SKEIN_HEALTH_HTTP={v:?} is not an address and port such as 0.0.0.0:9090")
        }),
        None => Ok(None),
    }
}

/// Runs `host` as [`run`] does, with the health endpoint `health` (from
/// [`connect`]).
pub async fn serve(host: Host, health: Option<HealthServer>) -> anyhow::Result<()> {
    tracing::info!(worker = host.name(), "running; Ctrl-C or SIGTERM stops");
    run(vec![host], health).await
}

/// Runs `hosts` until Ctrl-C or SIGTERM, then shuts them down gracefully
/// (in reverse order), answering on `health` meanwhile (the NATS
/// connection it reports is the first host's). A second Ctrl-C or SIGTERM
/// while they stop stops the process at once ([`StopSignals::or_at_once`]).
///
/// A part of a host that stops on its own (a panic) does not come back: the
/// others are then shut down too and the error names it, so that the
/// process exits with it and its supervisor restarts it.
pub async fn run(hosts: Vec<Host>, health: Option<HealthServer>) -> anyhow::Result<()> {
    let mut signals = StopSignals::listen()?;
    let probes: Vec<_> = hosts.iter().map(Host::probe).collect();
    if let (Some(health), Some(first)) = (&health, hosts.first()) {
        health.running(first.bus().clone(), probes.clone());
    }
    let failed = tokio::select! {
        stop = signals.next() => {
            stop?;
            if let Some(health) = &health {
                health.stopping();
            }
            None
        }
        stopped = health::first_stopped(&probes) => Some(stopped),
    };
    eprintln!("stopping: finishing messages in flight ({AT_ONCE})");
    let stopping = signals.or_at_once(crate::host::shutdown_all(hosts)).await;
    if let Some(health) = health {
        health.stop();
    }
    outcome(failed, stopping, "the process stopped, restart it")
}

/// How a stop ended: `stopping` (an error when a second signal cut it
/// short), after `part` of a worker stopped on its own, if one did (then
/// an error naming it, and `restart`, what to do).
pub fn outcome<T>(
    part: Option<String>,
    stopping: anyhow::Result<T>,
    restart: &str,
) -> anyhow::Result<T> {
    match (part, stopping) {
        (Some(part), Err(at_once)) => bail!("{part} on its own; {restart} ({at_once:#})"),
        (Some(part), Ok(_)) => bail!("{part} on its own; {restart}"),
        (None, stopping) => stopping,
    }
}

/// What a process stopping gracefully says about a second signal.
pub const AT_ONCE: &str = "Ctrl-C or SIGTERM now stops at once";

/// Ctrl-C and SIGTERM, listened for from when this is made until it is
/// dropped, so that none is lost in between (a signal that comes while no
/// listener exists reaches none, and once tokio has listened the default,
/// ending the process, is gone for good). Signals that come before the
/// next [`StopSignals::next`] count as one.
#[derive(Debug)]
pub struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts listening.
    pub fn listen() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Waits for the next Ctrl-C or SIGTERM (one that came since the last
    /// call, or since listening began, at once).
    pub async fn next(&mut self) -> anyhow::Result<()> {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
            Ok(())
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c()
                .await
                .context("cannot listen for Ctrl-C")
        }
    }

    /// Runs `stopping`, a graceful stop that waits for the work in flight,
    /// unless Ctrl-C or SIGTERM comes again first: then gives it up at once
    /// with an error that says so. What was in flight is then handled
    /// again (by another copy once its `ack_wait` has passed, or after the
    /// next start), as after a crash: a handler that cannot finish (a
    /// database that does not answer, a lock held elsewhere) does not keep
    /// the process from stopping.
    pub async fn or_at_once<T>(&mut self, stopping: impl Future<Output = T>) -> anyhow::Result<T> {
        tokio::select! {
            done = stopping => Ok(done),
            again = self.next() => {
                again?;
                anyhow::bail!(
                    "stopped at once on a second signal, without waiting for the work in flight: \
                     what was unfinished is delivered again (to another copy, or after the next \
                     start)"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error<T>(result: anyhow::Result<T>) -> String {
        result.err().map(|e| format!("{e:#}")).unwrap_or_default()
    }

    #[test]
    fn durations_are_a_number_and_a_unit() -> anyhow::Result<()> {
        assert_eq!(parse_duration("90s")?, Duration::from_secs(90));
        assert_eq!(parse_duration("15m")?, Duration::from_secs(900));
        assert_eq!(parse_duration("2h")?, Duration::from_secs(7200));
        assert_eq!(parse_duration("30d")?, Duration::from_secs(30 * 86_400));
        assert_eq!(parse_duration("0s")?, Duration::ZERO);
        for bad in [
            "",
            "15",
            "m",
            "-1d",
            "1.5h",
            "15 m",
            "2w",
            "99999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        Ok(())
    }

    /// A stop after a part stopped on its own is an error naming it, and
    /// says so too when a second signal cut it short.
    #[test]
    fn a_stop_s_outcome_names_the_part_that_stopped() {
        let part = || Some("catalog: the outbox relay stopped".to_owned());
        assert!(outcome(None, Ok(7), "restart it").is_ok_and(|n| n == 7));
        let stopped = error(outcome(part(), Ok(()), "restart it"));
        assert_eq!(
            stopped,
            "catalog: the outbox relay stopped on its own; restart it"
        );
        let both = error(outcome(
            part(),
            Err::<(), _>(anyhow::anyhow!("stopped at once")),
            "restart it",
        ));
        assert_eq!(
            both,
            "catalog: the outbox relay stopped on its own; restart it (stopped at once)"
        );
        let at_once = error(outcome(
            None,
            Err::<(), _>(anyhow::anyhow!("stopped at once")),
            "x",
        ));
        assert_eq!(at_once, "stopped at once");
    }

    #[test]
    fn retentions_keep_their_defaults_unless_given_and_refuse_a_forgetful_inbox(
    ) -> anyhow::Result<()> {
        let default = RelayConfig::default();
        let relay = relay_config(None, None)?;
        assert_eq!(relay.retention, default.retention);
        assert_eq!(relay.inbox_retention, default.inbox_retention);

        let relay = relay_config(Some("0s"), Some("90d"))?;
        assert_eq!(relay.retention, Duration::ZERO);
        assert_eq!(relay.inbox_retention, Duration::from_secs(90 * 86_400));
        assert_eq!(relay.cleanup_interval, default.cleanup_interval);

        assert_eq!(
            relay_config(None, Some("1h"))?.inbox_retention,
            MIN_INBOX_RETENTION
        );
        // As every setting is read: trimmed, an empty one unset.
        let padded = relay_config(Some(""), Some(" 2h "))?;
        assert_eq!(padded.retention, default.retention);
        assert_eq!(padded.inbox_retention, Duration::from_secs(7_200));
        let short = error(relay_config(None, Some("59m")));
        assert!(
            short.contains("59m is too short") && short.contains("at least 1h"),
            "{short}"
        );
        let bad = error(relay_config(Some("7 days"), None));
        assert!(
            bad.contains("--outbox-retention") && bad.contains("\"7 days\""),
            "{bad}"
        );
        Ok(())
    }
}
