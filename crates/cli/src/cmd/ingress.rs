//! `skein ingress`: the HTTP API in front of the workers.
//!
//! Stateless: start as many copies as needed behind a load balancer; they
//! share nothing but NATS. Ctrl-C or SIGTERM stops accepting connections and
//! finishes the requests in flight.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use skein_bus::provision::ensure_builtin_streams;
use skein_bus::Bus;
use skein_ingress::config::MIN_RATE_PER_SECOND;
use skein_ingress::{Ingress, IngressConfig, RateLimit};

/// Run the HTTP ingress.
#[derive(Debug, clap::Args)]
#[group(skip)]
pub(crate) struct Args {
    /// Address to listen on.
    #[arg(long, env = "SKEIN_HTTP", default_value = "127.0.0.1:8080")]
    pub(crate) http: SocketAddr,
    /// How long a service may take to answer a query, in milliseconds (then 504).
    #[arg(long, env = "SKEIN_QUERY_TIMEOUT_MS", default_value_t = 3000)]
    query_timeout_ms: u64,
    /// Requests per second allowed per user (or IP when anonymous).
    #[arg(long, env = "SKEIN_RATE_LIMIT", default_value_t = 50.0)]
    rate_limit: f64,
    /// Requests allowed at once per user (or IP) above the rate.
    #[arg(long, env = "SKEIN_RATE_BURST", default_value_t = 100)]
    rate_burst: u32,
    /// Log-ins and registrations per second allowed per client IP (default:
    /// one every 6 s); raise it for load tests that register many customers.
    #[arg(long, env = "SKEIN_LOGIN_RATE_LIMIT", default_value_t = 1.0 / 6.0)]
    login_rate_limit: f64,
    /// Log-ins and registrations allowed at once per client IP above that rate.
    #[arg(long, env = "SKEIN_LOGIN_RATE_BURST", default_value_t = 10)]
    login_rate_burst: u32,
    /// Take the client IP from X-Forwarded-For (only behind a trusted proxy).
    #[arg(long, env = "SKEIN_TRUST_FORWARDED_FOR")]
    trust_forwarded_for: bool,
    /// Connections served at once; more wait until one closes. Keep it
    /// under the process's file descriptor limit (`ulimit -n`).
    #[arg(long, env = "SKEIN_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
}

/// The ingress configuration these flags describe, or which flag is wrong.
pub(crate) fn config(args: &Args) -> anyhow::Result<IngressConfig> {
    for (flag, rate) in [
        ("--rate-limit", args.rate_limit),
        ("--login-rate-limit", args.login_rate_limit),
    ] {
        if !(rate.is_finite() && rate >= MIN_RATE_PER_SECOND) {
            anyhow::bail!(
                "{flag} must be a number of requests per second of at least {MIN_RATE_PER_SECOND} \
                 (one in 1,000 s), not {rate}"
            );
        }
    }
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections must be at least 1");
    }
    for (flag, burst) in [
        ("--rate-burst", args.rate_burst),
        ("--login-rate-burst", args.login_rate_burst),
    ] {
        if burst == 0 {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    let mut config = IngressConfig::new(args.http);
    config.query_timeout = Duration::from_millis(args.query_timeout_ms);
    config.rate_limit = RateLimit {
        per_second: args.rate_limit,
        burst: args.rate_burst,
    };
    config.login_rate_limit = RateLimit {
        per_second: args.login_rate_limit,
        burst: args.login_rate_burst,
    };
    config.trust_forwarded_for = args.trust_forwarded_for;
    config.max_connections = args.max_connections;
    Ok(config)
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    let config = config(&args)?;
    let bus = Bus::connect(&super::bus_config(nats_url, "skein-ingress"))
        .await
        .context("cannot reach NATS")?;
    ensure_builtin_streams(bus.jetstream())
        .await
        .context("cannot create the streams")?;
    let ingress = Ingress::build(config, bus)
        .await
        .context("cannot start the ingress")?;
    // Until here a signal ends the process at once, as it did nothing yet.
    let mut signals = skein_service::standalone::StopSignals::listen()?;
    eprintln!("ingress listening on http://{}", ingress.local_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(ingress.run_until(async {
        let _ = stop_rx.await;
    }));
    let stopped = tokio::select! {
        r = signals.next() => { r?; None }
        r = &mut server => Some(r),
    };
    if stopped.is_none() {
        eprintln!(
            "stopping: finishing requests in flight ({})",
            skein_service::standalone::AT_ONCE
        );
        let _ = stop_tx.send(());
    }
    // Returning ends the runtime and with it every request still served:
    // wait for the server to finish them (it closes what is still open
    // after its shutdown grace).
    let finished = match stopped {
        Some(r) => r,
        None => signals.or_at_once(server).await?,
    };
    finished
        .context("the ingress task failed")?
        .context("the HTTP server failed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ingress: Args,
    }

    fn config_of(flags: &[&str]) -> anyhow::Result<IngressConfig> {
        let cli = Cli::try_parse_from(std::iter::once("ingress").chain(flags.iter().copied()))?;
        config(&cli.ingress)
    }

    #[test]
    fn rates_too_small_for_a_wait_are_refused_by_name() {
        for rate in ["1e-30", "0.0009", "0", "-1", "NaN", "inf"] {
            for flag in ["--rate-limit", "--login-rate-limit"] {
                let e = config_of(&[&format!("{flag}={rate}")])
                    .expect_err(rate)
                    .to_string();
                assert!(
                    e.starts_with(&format!("{flag} must be")),
                    "{flag} {rate}: {e}"
                );
            }
        }
        let slowest = config_of(&["--login-rate-limit", "0.001"]).expect("the slowest valid rate");
        assert!(slowest.problems().is_empty(), "{:?}", slowest.problems());
    }
}
