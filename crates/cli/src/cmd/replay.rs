//! `skein replay`: read history from a stream; print it, rebuild a
//! projector read model from it (`--rebuild`), or re-deliver it to a
//! worker's handlers (`--into`, in [`into`]).

mod into;

use std::ops::ControlFlow;

use anyhow::{bail, Context};
use futures::StreamExt;
use skein_bus::replay::{follow, last_sequence, read_each, StartAt, StoredMessage};
use skein_message::Envelope;

use super::select::{cell, parse_range, parse_time, short_time};

/// Read history from a stream.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The stream: EVENTS, COMMANDS or DLQ.
    #[arg(long, default_value = "EVENTS")]
    stream: String,
    /// Only messages on subjects matching this filter (NATS wildcards), e.g. events.orders.>.
    #[arg(long)]
    subject: Option<String>,
    /// Only messages about this entity (its id, e.g. an order id).
    #[arg(long, value_parser = parse_entity)]
    entity: Option<String>,
    /// Only messages of this correlation id (one request and all it caused).
    #[arg(long)]
    correlation: Option<String>,
    /// Only messages of this type, e.g. orders.order_placed.v1 (a prefix works: orders.order_placed).
    #[arg(long = "type")]
    kind: Option<String>,
    /// Start at this time: RFC 3339, or a duration ago such as 15m, 2h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Stop at this time (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Sequence range, e.g. 100-200, 100- or -200.
    #[arg(long)]
    seq: Option<String>,
    /// Output: an aligned table, or one CloudEvent per line (for jq).
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Take at most this many messages of the history [default: 1000 when
    /// printing; no limit with --into].
    #[arg(long)]
    limit: Option<usize>,
    /// After the history, keep printing new messages as they arrive (until Ctrl-C).
    #[arg(long, conflicts_with_all = ["until", "rebuild", "into"])]
    follow: bool,
    /// Instead of printing: rebuild a projector read model (users, orders,
    /// timeline or all) from the whole EVENTS stream and report what changed.
    #[arg(long, value_name = "READ_MODEL", conflicts_with_all = ["subject", "entity", "correlation", "kind", "since", "until", "seq"])]
    rebuild: Option<String>,
    /// With --rebuild: rebuild even when EVENTS no longer holds its oldest
    /// messages (its max_age or max_bytes removed them) and the model
    /// changes, dropping what was built from them. Without it such a
    /// rebuild is refused, and nothing changes.
    #[arg(long, requires = "rebuild")]
    partial_history: bool,
    /// Instead of printing: re-deliver the selected messages (EVENTS or
    /// COMMANDS) to this worker's handlers, through its inbox in its own
    /// database, as its consumer would. Each is applied once: what the
    /// inbox has is skipped, what none of its consumers subscribes to is
    /// not delivered. The worker's consumer is left alone, so this is safe
    /// while copies of the worker run. A message its handler refuses is
    /// reported as failed (after 3 tries for a transient failure), not
    /// dead-lettered; the exit status is then non-zero. What the handlers
    /// send is published by a relay of the worker's database before the
    /// command returns.
    #[arg(long, value_enum, value_name = "WORKER", conflicts_with = "rebuild")]
    into: Option<super::worker::Name>,
    /// With --into projector: apply the selected events that the inbox
    /// already has to this read model again (users, orders, timeline or
    /// all), repairing rows that are missing or behind their events; events
    /// the inbox lacks are applied normally. Projections are re-appliable;
    /// other workers' effects are not, so it is refused for them.
    #[arg(long, value_name = "READ_MODEL", requires = "into")]
    force_reprocess: Option<String>,
    /// With --into: show what would be applied, skipped or not delivered,
    /// changing nothing.
    #[arg(long, requires = "into")]
    dry_run: bool,
    /// With --into or --rebuild: the worker has never run here; create its
    /// database and apply the history to it. Without this a missing
    /// database is refused (a wrong --database-url would otherwise apply
    /// every event as new, or rebuild a read model no projector reads).
    #[arg(long, conflicts_with = "dry_run")]
    create_database: bool,
    /// With --into: a selected message the worker's inbox does not have
    /// but may have forgotten (its relay deletes records past the worker's
    /// --inbox-retention) may have run already, and is held back, not
    /// delivered. What the inbox has forgotten is read from the worker's
    /// database (how far back its relay has deleted); with this, a message
    /// stored longer ago than this (for a copy `dlq redrive` stored, made
    /// longer ago) is held back too. 0s holds nothing back.
    /// Without the flag, SKEIN_INBOX_RETENTION (the worker's setting) if set
    /// (read with --into only: it does not make other replays ask for
    /// --into).
    #[arg(long, requires = "into")]
    inbox_retention: Option<String>,
    /// The database of the worker (--into) or of the projector (--rebuild);
    /// `{service}` is replaced by the worker's name.
    #[arg(long, env = "DATABASE_URL", default_value = super::worker::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// With --into payments: the starting balance of accounts it opens, in
    /// cents; give what the running payments worker has.
    #[arg(long, env = "SKEIN_STARTING_BALANCE_CENTS", default_value_t = skein_payments::DEFAULT_STARTING_BALANCE_CENTS)]
    starting_balance_cents: i64,
    /// With --into payments: the simulated provider's failure rate; give
    /// what the running payments worker has.
    #[arg(long, env = "SKEIN_PROVIDER_FAILURE_RATE", default_value_t = 0.0)]
    provider_failure_rate: f64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

/// An entity id is one subject token: no '.', '*', '>' or white space
/// (which would widen or break the server's filter).
fn parse_entity(text: &str) -> Result<String, String> {
    skein_message::subject::check_token(text)
        .map(|()| text.to_owned())
        .map_err(|why| format!("an entity id {why} (give the id itself, e.g. an order id)"))
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    if let Some(model) = &args.rebuild {
        return rebuild(nats_url, model, &args).await;
    }
    if args.create_database && args.into.is_none() {
        bail!("--create-database goes with --into or --rebuild");
    }
    let stream = args.stream.to_uppercase();
    if !["EVENTS", "COMMANDS", "DLQ"].contains(&stream.as_str()) {
        bail!(
            "unknown stream {:?}: use EVENTS, COMMANDS or DLQ",
            args.stream
        );
    }
    if let Some(worker) = args.into {
        // Refused before touching NATS or a database.
        into::check(worker, &stream, &args).await?;
    }
    let bus = super::connect(nats_url).await?;
    if args.follow && stream == "COMMANDS" {
        bail!("COMMANDS is a work queue, read only by its workers; --follow reads EVENTS or DLQ");
    }
    // Taken before reading, so following misses nothing published meanwhile.
    let mut last_seen = if args.follow {
        last_sequence(&bus, &stream)
            .await
            .context("cannot read the stream")?
    } else {
        0
    };
    let limit = args.limit.or(args.into.is_none().then_some(1000));
    let (selected, more) = select(&bus, &args, &stream, limit).await?;
    if let Some(limit) = limit.filter(|_| more) {
        eprintln!("(stopped at --limit {limit})");
    }
    if let Some(worker) = args.into {
        return into::run(&bus, worker, &stream, selected, &args).await;
    }

    if matches!(args.format, Format::Table) {
        println!(
            "{:>7}  {:<23}  {:<44}  {:<34}  {:<12}  {:<12}  PAYLOAD",
            "SEQ", "TIME", "SUBJECT", "TYPE", "ENTITY", "CORRELATION"
        );
    }
    let shown = selected.len();
    for (message, envelope) in &selected {
        last_seen = last_seen.max(message.sequence);
        print(message, envelope.as_ref(), args.format)?;
    }
    if !args.follow {
        if shown == 0 {
            eprintln!("no messages match");
        }
        return Ok(());
    }
    eprintln!("(following {stream}; Ctrl-C stops)");
    let mut live = std::pin::pin!(
        follow(&bus, &stream, &server_filter(&args, &stream), last_seen)
            .await
            .with_context(|| format!("cannot follow {stream}"))?
    );
    // One listener for the whole follow: made again for each message, a
    // SIGTERM that came while a message was printed reached none, and was
    // lost (tokio's handler, installed by the first, keeps the default
    // from ending the process).
    let mut signals = skein_service::standalone::StopSignals::listen()?;
    loop {
        let next = tokio::select! {
            next = live.next() => next,
            r = signals.next() => { r?; return Ok(()); }
        };
        let Some(message) = next else { return Ok(()) };
        let message = message.with_context(|| format!("lost {stream}"))?;
        let envelope = Envelope::from_parts(
            &message.subject,
            message.headers.as_ref(),
            message.payload.clone(),
        )
        .ok();
        if matches(&args, envelope.as_ref()) {
            print(&message, envelope.as_ref(), args.format)?;
        }
    }
}

/// The subject filter the server applies for the selection flags.
fn server_filter(args: &Args, stream: &str) -> String {
    match (&args.subject, &args.entity, stream) {
        (Some(subject), _, _) => subject.clone(),
        // Event subjects carry the entity: let the server filter.
        (None, Some(entity), "EVENTS") => format!("events.*.{entity}.>"),
        _ => ">".to_owned(),
    }
}

/// The messages of `stream` the selection flags choose, oldest first, each
/// with its envelope when it decodes: at most `limit`, and whether more
/// match. The stream is read one message at a time and the reading stops
/// at the limit or past the end of `--seq`: what is not selected is not
/// kept.
async fn select(
    bus: &skein_bus::Bus,
    args: &Args,
    stream: &str,
    limit: Option<usize>,
) -> anyhow::Result<(Vec<(StoredMessage, Option<Envelope>)>, bool)> {
    let range = args.seq.as_deref().map(parse_range).transpose()?;
    let since = args.since.as_deref().map(parse_time).transpose()?;
    let until = args.until.as_deref().map(parse_time).transpose()?;
    if let (Some(since), Some(until)) = (since, until) {
        anyhow::ensure!(
            since <= until,
            "--until is before --since: no message can be in that window"
        );
    }
    let filter = server_filter(args, stream);
    let start = match (range.as_ref(), since) {
        (Some(r), _) => StartAt::Sequence(*r.start()),
        (None, Some(t)) => StartAt::Time(t),
        (None, None) => StartAt::Beginning,
    };
    let mut selected = Vec::new();
    let mut more = false;
    read_each(bus, stream, &filter, start, |message| {
        if range.as_ref().is_some_and(|r| message.sequence > *r.end()) {
            return ControlFlow::Break(());
        }
        if range
            .as_ref()
            .is_some_and(|r| !r.contains(&message.sequence))
            // With --seq the read starts at a sequence: --since filters.
            || since.is_some_and(|t| message.published < t)
            || until.is_some_and(|u| message.published > u)
        {
            return ControlFlow::Continue(());
        }
        let envelope = Envelope::from_parts(
            &message.subject,
            message.headers.as_ref(),
            message.payload.clone(),
        )
        .ok();
        if matches(args, envelope.as_ref()) {
            if limit.is_some_and(|l| selected.len() >= l) {
                more = true;
                return ControlFlow::Break(());
            }
            selected.push((message, envelope));
        }
        ControlFlow::Continue(())
    })
    .await
    .with_context(|| format!("cannot read {stream}"))?;
    Ok((selected, more))
}

fn matches(args: &Args, envelope: Option<&Envelope>) -> bool {
    let wants_envelope = args.entity.is_some() || args.correlation.is_some() || args.kind.is_some();
    let Some(e) = envelope else {
        return !wants_envelope;
    };
    args.entity
        .as_deref()
        .is_none_or(|id| e.entity() == Some(id))
        && args
            .correlation
            .as_deref()
            .is_none_or(|c| e.correlation_id == c)
        && args.kind.as_deref().is_none_or(|k| e.kind.starts_with(k))
}

fn print(
    message: &StoredMessage,
    envelope: Option<&Envelope>,
    format: Format,
) -> anyhow::Result<()> {
    match (format, envelope) {
        (Format::Json, Some(e)) => {
            let mut event = e.to_cloudevent_json();
            event["sequence"] = message.sequence.into();
            println!("{}", serde_json::to_string(&event)?);
        }
        (Format::Json, None) => println!(
            "{}",
            serde_json::json!({
                "sequence": message.sequence,
                "natssubject": message.subject,
                "undecodable": true,
                "data": String::from_utf8_lossy(&message.payload),
            })
        ),
        (Format::Table, e) => println!(
            "{:>7}  {}  {}  {}  {}  {}  {}",
            message.sequence,
            short_time(message.published),
            cell(&message.subject, 44),
            cell(
                e.map(|e| e.kind.as_str())
                    .unwrap_or("(not a skein message)"),
                34
            ),
            cell(e.and_then(Envelope::entity).unwrap_or("-"), 12),
            cell(e.map(|e| e.correlation_id.as_str()).unwrap_or("-"), 12),
            cell(&String::from_utf8_lossy(&message.payload), 60),
        ),
    }
    Ok(())
}

/// Checks that `service`'s database exists, unless `--create-database`
/// (then that it does not: it is migrated, which a database a worker runs
/// on must not be); its URL as shown. `doing` names what the command would
/// do in it.
async fn existing_database(args: &Args, service: &str, doing: &str) -> anyhow::Result<String> {
    let (shown, exists) = super::select::service_database(&args.database_url, service).await?;
    if args.create_database && exists {
        bail!(
            "the {service} database at {shown} exists: --create-database is for a worker that has never run; leave it off to {doing} this database"
        );
    }
    if !args.create_database && !exists {
        bail!(
            "no {service} database at {shown}: check --database-url / DATABASE_URL (the default is data/{{service}}.db under the current directory){}",
            if args.dry_run { "" } else { "; if the worker has never run, --create-database creates it" }
        );
    }
    Ok(shown)
}

/// Rebuilds a read model in the projector's database, which must exist
/// (unless `--create-database`) and have this build's schema: a rebuild
/// into a database made by mistake would report success and change
/// nothing the projector reads, and migrating one the projector runs on
/// would change its schema under it.
async fn rebuild(nats_url: &str, model: &str, args: &Args) -> anyhow::Result<()> {
    let model: skein_projector::ReadModel = model.parse()?;
    let service = skein_projector::NAME;
    let shown = existing_database(args, service, "rebuild in").await?;
    let url = args.database_url.replace("{service}", service);
    let bus = super::connect(nats_url).await?;
    let store = skein_outbox::Store::connect_with(skein_outbox::StoreConfig {
        migrate: args.create_database,
        ..skein_outbox::StoreConfig::new(&url)
    })
    .await
    .with_context(|| format!("cannot open the {service} database {shown}"))?;
    let format = args.format;
    let mut history = skein_projector::read_history(&bus, model)
        .await
        .context("rebuild failed; nothing changed")?;
    if args.partial_history {
        history = history.accept_partial();
    }
    let report = skein_projector::rebuild_from(&bus, &store, history)
        .await
        .context("rebuild failed; nothing changed")?;
    match format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Table => println!("{report}"),
    }
    Ok(())
}
