//! `skein`: operate a skein system from the command line.
//!
//! # Layout
//!
//! One module per subcommand under `cmd/`:
//!
//! - `up`: `skein up`, the whole system in one process (nats-server,
//!   workers, ingress, first admin, demo catalog);
//! - `streams`: `skein streams apply`, create or update the streams from `nats/`;
//! - `replay`: `skein replay`, read history by time, sequence, subject,
//!   entity, correlation id or type, as a table or JSON lines;
//! - `dlq`: `skein dlq list|show|redrive|purge`, inspect dead letters and
//!   send them back where they came from;
//! - `worker`: `skein worker <name>...`, run workers as a process; more
//!   copies share their consumer groups;
//! - `ingress`: `skein ingress`, the HTTP API (`--http` / `SKEIN_HTTP`);
//! - `saga`: `skein saga list|show|stuck`, saga instances and transitions;
//! - `trace`: `skein trace <correlation id | order id>`, the causal tree;
//! - `audit`: `skein audit [--repair]`, outboxes against streams and inboxes;
//! - `load`: `skein load`, orders through the HTTP API, then the invariants;
//! - `select`: the selection flags shared by replay and dlq (times, ranges).
//!
//! Every flag has an environment fallback where one is usual (`NATS_URL`).

mod cmd;

/// mimalloc instead of the C library's allocator. Under load, sqlx's
/// per-connection SQLite threads and tokio's workers allocate and free each
/// other's buffers; glibc's per-thread arenas kept what was freed that way,
/// and `skein up` grew to 300-500 MB resident while its heap in use peaked
/// at 26 MB (heaptrack). mimalloc gives freed memory back.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where the commands find NATS unless told otherwise.
const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

use clap::{Parser, Subcommand};

/// Run and operate a skein system: the whole system, workers, the HTTP API,
/// streams, event history and dead letters.
// No Debug: it holds the NATS password.
#[derive(Parser)]
#[command(name = "skein", version, about, long_about = None)]
struct Cli {
    /// NATS server URL(s), comma-separated [default: nats://127.0.0.1:4222;
    /// `skein up` starts its own nats-server unless this is given].
    #[arg(long, env = "NATS_URL", global = true)]
    nats_url: Option<String>,
    /// NATS user, with --nats-password (or user:password@ in the URL).
    #[arg(long, env = "NATS_USER", global = true)]
    nats_user: Option<String>,
    /// NATS password of --nats-user (prefer NATS_PASSWORD: a flag's value
    /// shows in the process list).
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS token, instead of a user (prefer NATS_TOKEN: a flag's value
    /// shows in the process list).
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    nats_token: Option<String>,
    /// PEM certificate(s) of the CA that signed the NATS server's (TLS).
    #[arg(long, env = "NATS_CA", global = true, value_name = "FILE")]
    nats_ca: Option<String>,
    /// PEM certificate of this client, for a NATS server that verifies clients.
    #[arg(long, env = "NATS_CERT", global = true, value_name = "FILE")]
    nats_cert: Option<String>,
    /// PEM key of --nats-cert.
    #[arg(long, env = "NATS_KEY", global = true, value_name = "FILE")]
    nats_key: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system here: nats-server, every worker, the HTTP API (first look, demos).
    Up(cmd::up::Args),
    /// Create or update the JetStream streams (EVENTS, COMMANDS, DLQ).
    Streams(cmd::streams::Args),
    /// Read history from a stream: filter it, print it as a table or JSON lines.
    Replay(cmd::replay::Args),
    /// Inspect, redrive or purge dead letters.
    Dlq(cmd::dlq::Args),
    /// Run workers in this process; start it again to add copies to their consumer groups.
    Worker(cmd::worker::Args),
    /// Run the HTTP API in front of the workers; start more copies to scale it.
    Ingress(cmd::ingress::Args),
    /// Saga instances: list, show one with its transitions, find the stuck ones.
    Saga(cmd::saga::Args),
    /// The causal chain of one request (correlation id) or order, as a tree with timings.
    Trace(cmd::trace::Args),
    /// Compare every outbox with the streams and inboxes; --repair republishes what was lost.
    Audit(cmd::audit::Args),
    /// Place orders through the HTTP API, wait until each is final, check that nothing was lost.
    Load(cmd::load::Args),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKEIN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let empty = |v: Option<String>| v.filter(|v| !v.is_empty());
    match skein_bus::NatsSecurity::new(
        empty(cli.nats_user),
        empty(cli.nats_password),
        empty(cli.nats_token),
        empty(cli.nats_ca),
        empty(cli.nats_cert),
        empty(cli.nats_key),
    ) {
        Ok(security) => cmd::set_nats_security(security),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    // Set but empty (`NATS_URL=` from an .env template) is not set.
    let given_nats_url = empty(cli.nats_url);
    let nats_url = given_nats_url.as_deref().unwrap_or(DEFAULT_NATS_URL);
    let result = match cli.command {
        Command::Up(args) => cmd::up::run(given_nats_url.as_deref(), args).await,
        Command::Streams(args) => cmd::streams::run(nats_url, args).await,
        Command::Replay(args) => cmd::replay::run(nats_url, args).await,
        Command::Dlq(args) => cmd::dlq::run(nats_url, args).await,
        Command::Worker(args) => cmd::worker::run(nats_url, args).await,
        Command::Ingress(args) => cmd::ingress::run(nats_url, args).await,
        Command::Saga(args) => cmd::saga::run(nats_url, args).await,
        Command::Trace(args) => cmd::trace::run(nats_url, args).await,
        Command::Audit(args) => cmd::audit::run(nats_url, args).await,
        Command::Load(args) => cmd::load::run(nats_url, args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
