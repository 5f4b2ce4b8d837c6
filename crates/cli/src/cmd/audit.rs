//! `skein audit [--repair]`: compare every service's outbox with the
//! streams and the inboxes.
//!
//! One id runs end to end (outbox row = `ce-id` = `Nats-Msg-Id` = inbox
//! key). For each published row still kept (7 days by default):
//! - an event must be in `EVENTS`, exactly once;
//! - a command must be queued in `COMMANDS`, recorded in its service's
//!   inbox, or dead-lettered.
//!
//! Anything else is lost (a single nats-server acknowledges before it
//! fsyncs). `--repair` publishes the lost rows again with their original
//! ids, so whoever already has them skips them. Rows not yet published are
//! counted as backlog: the relay still owes them, nothing is lost.
//!
//! The audit reads the streams first and the outboxes after, so on a live
//! system a row marked published meanwhile would be missing from what it
//! read of the streams: only rows marked before the audit began (less
//! `--skip-recent`, for clocks of other hosts a little behind) are checked;
//! the others are counted as recent and left for the next audit.
//!
//! Then the consumers: every durable consumer on `EVENTS` and `COMMANDS`
//! with its lag (messages not yet delivered, delivered but not yet
//! acknowledged, redelivered). A consumer is named after its worker, which
//! is also its inbox name and the `{service}` of its database, so for each
//! published event every audited consumer that subscribes to it must have
//! it in its inbox or have dead-lettered it; otherwise:
//! - past the consumer's acknowledgement floor it is *not yet consumed*:
//!   lag, not a loss, and no reason to fail;
//! - at or below it, the consumer acknowledged it without applying it (its
//!   database was replaced, say): *missed*, a problem that
//!   `skein replay --into <worker>` repairs.
//!
//! A queued command is not yet consumed by the consumer that takes it. The
//! consumers are read before the inboxes, so a message handled meanwhile is
//! never taken for missed.
//!
//! An inbox forgets what it processed after its retention (30 days by
//! default; a worker's `--inbox-retention` may be shorter than another
//! service's outbox retention), and each database records how far back it
//! may have (`skein_inbox_horizon`: the newest record a cleanup deleted).
//! A message marked published before that horizon, or up to
//! [`HORIZON_MARGIN`] after it, and not found in the inbox of a service
//! that takes it is *forgotten*: it may have been applied and its
//! record deleted, so it is neither lost nor missed as far as the audit can
//! tell, and `--repair` does not publish it again (the inbox would apply it
//! a second time).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use skein_bus::dlq::DeadLetterInfo;
use skein_bus::replay::{read, read_headers, StartAt};
use skein_message::envelope::headers;
use skein_message::subject;
use skein_outbox::Store;

use super::select::cell;
use super::worker::{Settings, DEFAULT_DATA_DIR};

/// How much later than an inbox's horizon a message must have been marked
/// published for the audit to trust that a record of it would still be
/// there: a row is marked after its publish is acknowledged (the relay's
/// mark delay later, by the relay's clock), and may be processed, by
/// another host's clock, before that.
pub(crate) const HORIZON_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Every service with a database.
const SERVICES: [&str; 6] = [
    "identity",
    "catalog",
    "orders",
    "payments",
    "orchestrator",
    "projector",
];

/// Compare outboxes, streams and inboxes; report gaps and duplicates.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Also lists every durable consumer of EVENTS and COMMANDS with its lag \
(pending, ack pending, redelivered) and, per published message, each audited consumer that \
takes it but has not consumed it yet.\n\n\
Exit status: non-zero while a message is lost, duplicated in EVENTS, or missed by a consumer \
(acknowledged, yet neither in its inbox nor dead-lettered; `skein replay --into <worker>` \
applies it). Messages not yet consumed (consumer lag) and the outbox backlog are reported, \
not failures: they clear as the workers catch up. Neither are messages older than the inbox \
that takes them remembers (its --inbox-retention), not found there: forgotten, not repaired."
)]
pub(crate) struct Args {
    /// Only these services (default: all that have a database).
    #[arg(long, value_delimiter = ',')]
    services: Vec<String>,
    /// Publish lost messages again, with their original ids.
    #[arg(long)]
    repair: bool,
    /// Output: a table, or one JSON object per service.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Database URL; `{service}` is replaced by each service's name.
    /// Default: `sqlite:data/{service}.db`.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Leave rows marked published less than this long before the audit
    /// began to the next audit: they may reach the streams only after the
    /// audit read them. Covers relays on hosts whose clocks run behind.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    skip_recent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

/// What the audit found in one service.
#[derive(Debug, Default, Serialize)]
struct Report {
    service: String,
    /// Published rows checked.
    checked: usize,
    /// Rows the relay has not published yet.
    backlog: i64,
    /// Rows marked published too recently to check (see `--skip-recent`).
    recent: i64,
    /// Ids of rows published but found nowhere.
    lost: Vec<String>,
    /// Ids of events stored more than once in EVENTS.
    duplicated: Vec<String>,
    /// Lost rows published again (with --repair).
    republished: usize,
    /// Published messages a consumer that takes them has not consumed yet
    /// (lag, not loss).
    not_yet_consumed: Vec<Unconsumed>,
    /// Events a consumer acknowledged without recording them in its inbox
    /// or dead-lettering them.
    missed: Vec<Unconsumed>,
    /// Messages published before the inbox of a service that takes them
    /// may have forgotten what it processed, not found there: applied and
    /// forgotten, or not, the audit cannot tell.
    forgotten: Vec<Unconsumed>,
}

/// A message one consumer has not applied.
#[derive(Debug, Clone, Serialize)]
struct Unconsumed {
    /// The message id.
    id: String,
    /// The consumer (worker) that takes it.
    consumer: String,
    /// Its stream.
    stream: String,
    /// Its sequence there (0: a command no longer in `COMMANDS`).
    sequence: u64,
}

/// One durable consumer and its lag.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConsumerReport {
    /// Its name: the worker's.
    pub(crate) consumer: String,
    /// Its stream.
    pub(crate) stream: String,
    /// The subjects it takes.
    pub(crate) filter_subjects: Vec<String>,
    /// Messages not yet delivered to it (`num_pending`).
    pub(crate) pending: u64,
    /// Messages delivered and not yet acknowledged (`num_ack_pending`).
    pub(crate) ack_pending: usize,
    /// Messages delivered again after their ack wait (`num_redelivered`).
    pub(crate) redelivered: usize,
    /// Pull requests waiting (0: no copy of the worker is pulling now).
    pub(crate) waiting_pulls: usize,
    /// Every message up to this stream sequence is acknowledged.
    pub(crate) ack_floor: u64,
}

impl ConsumerReport {
    fn takes(&self, subject: &str) -> bool {
        self.filter_subjects
            .iter()
            .any(|f| subject::matches(f, subject))
    }
}

/// The durable consumers of `stream`, sorted by name (also what `skein
/// load` waits on before its last read).
pub(crate) async fn consumers(
    bus: &skein_bus::Bus,
    stream: &str,
) -> anyhow::Result<Vec<ConsumerReport>> {
    use futures::TryStreamExt;
    let handle = bus
        .jetstream()
        .get_stream(stream)
        .await
        .with_context(|| format!("cannot open {stream}"))?;
    let infos: Vec<async_nats::jetstream::consumer::Info> = handle
        .consumers()
        .try_collect()
        .await
        .with_context(|| format!("cannot list the consumers of {stream}"))?;
    let mut out: Vec<ConsumerReport> = infos
        .into_iter()
        .filter(|i| i.config.durable_name.is_some())
        .map(|i| {
            let mut filter_subjects = i.config.filter_subjects.clone();
            if !i.config.filter_subject.is_empty() {
                filter_subjects.push(i.config.filter_subject.clone());
            }
            if filter_subjects.is_empty() {
                filter_subjects.push(">".into());
            }
            ConsumerReport {
                consumer: i.name,
                stream: stream.to_owned(),
                filter_subjects,
                pending: i.num_pending,
                ack_pending: i.num_ack_pending,
                redelivered: i.num_redelivered,
                waiting_pulls: i.num_waiting,
                ack_floor: i.ack_floor.stream_sequence,
            }
        })
        .collect();
    out.sort_by(|a, b| a.consumer.cmp(&b.consumer));
    Ok(out)
}

/// `message` without `Nats-Msg-Id`: the stream may still remember the id in
/// its duplicate window although the message itself is gone, and would drop
/// the repair. The audit has just seen the id missing from the stream, and
/// `ce-id` stays, so inboxes still recognise the message.
fn without_msg_id(message: &skein_bus::Outgoing) -> skein_bus::Outgoing {
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in message.headers.iter() {
        if name.as_ref() as &str == async_nats::header::NATS_MESSAGE_ID.as_ref() as &str {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    skein_bus::Outgoing {
        subject: message.subject.clone(),
        headers,
        payload: message.payload.clone(),
    }
}

fn header<'a>(h: Option<&'a async_nats::HeaderMap>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    if !(args.skip_recent.is_finite() && (0.0..=3600.0).contains(&args.skip_recent)) {
        anyhow::bail!("--skip-recent takes seconds from 0 to 3600");
    }
    // Before anything is read: rows marked published later are not checked.
    let checked_before =
        skein_outbox::now_micros() - (args.skip_recent * 1_000_000.0).round() as i64;
    let template = args
        .database_url
        .clone()
        .unwrap_or_else(|| Settings::default_database_url(Path::new(DEFAULT_DATA_DIR)));
    if let Some(unknown) = args
        .services
        .iter()
        .find(|s| !SERVICES.contains(&s.as_str()))
    {
        anyhow::bail!(
            "--services: no service {unknown:?}; the services are {}",
            SERVICES.join(", ")
        );
    }
    let named = !args.services.is_empty();
    let mut services: Vec<String> = if named {
        args.services.clone()
    } else {
        SERVICES.iter().map(|s| (*s).to_owned()).collect()
    };
    // An audit changes nothing: a missing database is not created. A
    // service named in --services must have one; of the default list,
    // those without are skipped, but not all of them (an audit that checked
    // nothing must not say "clean").
    let mut skipped = Vec::new();
    for service in &services {
        let (shown, exists) = super::select::service_database(&template, service).await?;
        if !exists {
            eprintln!("{service}: no database at {shown}; skipped");
            skipped.push(service.clone());
        }
    }
    if named && !skipped.is_empty() {
        anyhow::bail!(
            "no {} database (see above): check --database-url / DATABASE_URL, or leave the service out of --services",
            skipped.join(", ")
        );
    }
    if skipped.len() == services.len() {
        anyhow::bail!(
            "no service database found with {}: nothing to audit; check --database-url / DATABASE_URL (the default is data/{{service}}.db under the current directory)",
            skein_outbox::store::redact(&template)
        );
    }
    services.retain(|s| !skipped.contains(s));
    let bus = super::connect(nats_url).await?;

    // The consumers first: whatever is at or below an acknowledgement floor
    // now is in its inbox by the time the inboxes are read.
    let mut lag = consumers(&bus, "EVENTS").await?;
    lag.extend(consumers(&bus, "COMMANDS").await?);

    // What the broker holds, by message id: copies (a copy `skein dlq
    // redrive` published is no duplicate: it is meant to be there) and the
    // newest copy's sequence (a consumer that dead-lettered the message
    // takes the redriven copy).
    let mut in_events: HashMap<String, (usize, u64)> = HashMap::new();
    for m in read_headers(&bus, "EVENTS", "events.>", StartAt::Beginning)
        .await
        .context("cannot read EVENTS")?
    {
        if let Some(id) = header(m.headers.as_ref(), headers::ID) {
            let redriven = header(m.headers.as_ref(), skein_bus::dlq::headers::REDRIVEN).is_some();
            let entry = in_events.entry(id.to_owned()).or_insert((0, 0));
            if !redriven || entry.0 == 0 {
                entry.0 += 1;
            }
            entry.1 = m.sequence;
        }
    }
    let queued: HashMap<String, u64> = read(&bus, "COMMANDS", "commands.>", StartAt::Beginning)
        .await
        .context("cannot read COMMANDS")?
        .iter()
        .filter_map(|m| {
            header(m.headers.as_ref(), headers::ID).map(|id| (id.to_owned(), m.sequence))
        })
        .collect();
    // Dead letters by message id, with the handlers that gave up on them.
    let mut dead: HashMap<String, HashSet<String>> = HashMap::new();
    for m in read_headers(&bus, "DLQ", ">", StartAt::Beginning)
        .await
        .context("cannot read DLQ")?
    {
        let info = m.headers.as_ref().and_then(DeadLetterInfo::from_headers);
        if let (Some(info), Some(id)) = (info, header(m.headers.as_ref(), headers::ID)) {
            dead.entry(id.to_owned()).or_default().insert(info.handler);
        }
    }

    // Every service's store and inbox first: a command is checked against
    // its target's inbox.
    let mut stores = Vec::new();
    let mut inboxes: HashMap<String, HashSet<String>> = HashMap::new();
    // Each inbox's horizon, plus the margin: rows marked published before
    // that may have been forgotten there.
    let mut horizons: HashMap<String, i64> = HashMap::new();
    for service in &services {
        let url = template.replace("{service}", service);
        // An audit changes nothing, the schema included: one behind or
        // ahead of this build is refused, not migrated.
        let store = Store::connect_with(skein_outbox::StoreConfig {
            migrate: false,
            ..skein_outbox::StoreConfig::new(&url)
        })
        .await
        .with_context(|| format!("cannot audit the {service} database"))?;
        let ids = skein_outbox::audit::inbox_ids(&store, service)
            .await
            .with_context(|| format!("cannot read the {service} inbox"))?;
        inboxes.insert(service.clone(), ids);
        if let Some(horizon) = skein_outbox::audit::inbox_horizon(&store)
            .await
            .with_context(|| format!("cannot read the {service} inbox's horizon"))?
        {
            let margin = i64::try_from(HORIZON_MARGIN.as_micros()).unwrap_or(i64::MAX);
            horizons.insert(service.clone(), horizon.saturating_add(margin));
        }
        stores.push((service.clone(), store));
    }

    let mut reports = Vec::new();
    let publisher = bus.publisher();
    for (service, store) in &stores {
        let mut report = Report {
            service: service.clone(),
            backlog: store.outbox_backlog().await.unwrap_or(0),
            recent: skein_outbox::audit::published_since(store, checked_before)
                .await
                .unwrap_or(0),
            ..Report::default()
        };
        let mut after = 0;
        loop {
            let rows = skein_outbox::audit::published_rows(store, after, checked_before, 1000)
                .await
                .with_context(|| format!("cannot read the {service} outbox"))?;
            let Some(last) = rows.last() else { break };
            after = last.row.seq;
            for published in &rows {
                let row = &published.row;
                // Whether `service`'s inbox may have forgotten the row.
                let forgotten_by = |service: &str| {
                    horizons
                        .get(service)
                        .is_some_and(|&horizon| published.published_at < horizon)
                };
                report.checked += 1;
                let subject = row.message.subject.as_str();
                let found = if subject.starts_with("events.") {
                    let (copies, sequence) = in_events.get(&row.id).copied().unwrap_or((0, 0));
                    if copies > 1 {
                        report.duplicated.push(row.id.clone());
                    }
                    // Every audited consumer that takes it must have it.
                    for c in lag.iter().filter(|c| c.stream == "EVENTS") {
                        let Some(ids) = inboxes.get(&c.consumer) else {
                            continue;
                        };
                        if copies == 0
                            || !c.takes(subject)
                            || ids.contains(&row.id)
                            || dead.get(&row.id).is_some_and(|h| h.contains(&c.consumer))
                        {
                            continue;
                        }
                        let gap = Unconsumed {
                            id: row.id.clone(),
                            consumer: c.consumer.clone(),
                            stream: c.stream.clone(),
                            sequence,
                        };
                        if sequence > c.ack_floor {
                            report.not_yet_consumed.push(gap);
                        } else if forgotten_by(&c.consumer) {
                            report.forgotten.push(gap);
                        } else {
                            report.missed.push(gap);
                        }
                    }
                    copies > 0
                } else if let Some(rest) = subject.strip_prefix("commands.") {
                    let target = rest.split('.').next().unwrap_or_default();
                    if let Some(sequence) = queued.get(&row.id) {
                        let consumer = lag
                            .iter()
                            .find(|c| c.stream == "COMMANDS" && c.takes(subject))
                            .map(|c| c.consumer.clone())
                            .unwrap_or_else(|| format!("{target} (no consumer yet)"));
                        report.not_yet_consumed.push(Unconsumed {
                            id: row.id.clone(),
                            consumer,
                            stream: "COMMANDS".into(),
                            sequence: *sequence,
                        });
                    }
                    let found = queued.contains_key(&row.id)
                        || dead.contains_key(&row.id)
                        || inboxes.get(target).is_some_and(|ids| ids.contains(&row.id))
                        // A target we did not audit: cannot tell.
                        || !inboxes.contains_key(target);
                    if !found && forgotten_by(target) {
                        report.forgotten.push(Unconsumed {
                            id: row.id.clone(),
                            consumer: target.to_owned(),
                            stream: "COMMANDS".into(),
                            sequence: 0,
                        });
                        true
                    } else {
                        found
                    }
                } else {
                    true
                };
                if !found {
                    report.lost.push(row.id.clone());
                    if args.repair {
                        publisher
                            .publish_outgoing(&without_msg_id(&row.message))
                            .await
                            .with_context(|| format!("cannot republish {}", row.id))?;
                        report.republished += 1;
                    }
                }
            }
        }
        reports.push(report);
    }

    let problems: usize = reports
        .iter()
        .map(|r| (r.lost.len() - r.republished) + r.duplicated.len() + r.missed.len())
        .sum();
    let unconsumed: usize = reports.iter().map(|r| r.not_yet_consumed.len()).sum();
    let missed: Vec<&Unconsumed> = reports.iter().flat_map(|r| &r.missed).collect();
    match args.format {
        Format::Json => {
            for r in &reports {
                println!("{}", serde_json::to_string(r)?);
            }
            for c in &lag {
                println!("{}", serde_json::to_string(c)?);
            }
        }
        Format::Table => {
            println!(
                "{}  {}  {}  {}  {}  {}  {}  REPUBLISHED",
                cell("SERVICE", 12),
                cell("CHECKED", 8),
                cell("BACKLOG", 8),
                cell("LOST", 6),
                cell("DUPLICATED", 10),
                cell("UNCONSUMED", 10),
                cell("MISSED", 6)
            );
            for r in &reports {
                println!(
                    "{}  {}  {}  {}  {}  {}  {}  {}",
                    cell(&r.service, 12),
                    cell(&r.checked.to_string(), 8),
                    cell(&r.backlog.to_string(), 8),
                    cell(&r.lost.len().to_string(), 6),
                    cell(&r.duplicated.len().to_string(), 10),
                    cell(&r.not_yet_consumed.len().to_string(), 10),
                    cell(&r.missed.len().to_string(), 6),
                    r.republished
                );
                if r.recent > 0 {
                    println!(
                        "  {} published just before the audit began: left for the next one",
                        r.recent
                    );
                }
                if !r.forgotten.is_empty() {
                    let mut by: Vec<&str> =
                        r.forgotten.iter().map(|u| u.consumer.as_str()).collect();
                    by.sort_unstable();
                    by.dedup();
                    println!(
                        "  {} older than the inbox of {} remembers, not found there: not checked",
                        r.forgotten.len(),
                        by.join(", ")
                    );
                }
                for id in &r.lost {
                    println!("  lost {id}");
                }
                for id in &r.duplicated {
                    println!("  duplicated in EVENTS {id}");
                }
                for u in &r.not_yet_consumed {
                    println!(
                        "  not yet consumed by {} {} ({} #{})",
                        u.consumer, u.id, u.stream, u.sequence
                    );
                }
                for u in &r.missed {
                    println!(
                        "  missed by {} {} ({} #{}): acknowledged, yet neither in its inbox nor dead-lettered",
                        u.consumer, u.id, u.stream, u.sequence
                    );
                }
            }
            println!();
            println!(
                "{}  {}  {}  {}  {}  {}  FILTERS",
                cell("CONSUMER", 12),
                cell("STREAM", 8),
                cell("PENDING", 8),
                cell("ACK_PENDING", 11),
                cell("REDELIVERED", 11),
                cell("PULLS", 5)
            );
            for c in &lag {
                println!(
                    "{}  {}  {}  {}  {}  {}  {}",
                    cell(&c.consumer, 12),
                    cell(&c.stream, 8),
                    cell(&c.pending.to_string(), 8),
                    cell(&c.ack_pending.to_string(), 11),
                    cell(&c.redelivered.to_string(), 11),
                    cell(&c.waiting_pulls.to_string(), 5),
                    c.filter_subjects.join(" ")
                );
            }
        }
    }
    if problems > 0 {
        let mut hints = Vec::new();
        if reports.iter().any(|r| r.lost.len() > r.republished) {
            hints.push("skein audit --repair publishes lost messages again".to_owned());
        }
        if reports.iter().any(|r| !r.duplicated.is_empty()) {
            hints.push(
                "a message duplicated in EVENTS was published again after the stream's duplicate \
                 window (a relay stopped between publishing a row and marking it): consumers' \
                 inboxes skip the second copy, there is nothing to repair, and the report \
                 clears once the outbox row is deleted (--outbox-retention)"
                    .to_owned(),
            );
        }
        let mut missed_by: Vec<&str> = missed.iter().map(|u| u.consumer.as_str()).collect();
        missed_by.sort_unstable();
        missed_by.dedup();
        for consumer in missed_by {
            let sequences: Vec<u64> = missed
                .iter()
                .filter(|u| u.consumer == consumer)
                .map(|u| u.sequence)
                .collect();
            let from = sequences.iter().min().copied().unwrap_or(1);
            let to = sequences.iter().max().copied().unwrap_or(from);
            hints.push(format!(
                "skein replay --into {consumer} --seq {from}-{to} applies what {consumer} missed"
            ));
        }
        let hint = if hints.is_empty() {
            String::new()
        } else {
            format!("; {}", hints.join("; "))
        };
        anyhow::bail!("{problems} problem(s) found{hint}");
    }
    if args.format == Format::Table {
        let lag = if unconsumed > 0 {
            format!("; {unconsumed} not yet consumed (lag, not loss)")
        } else {
            String::new()
        };
        let skipped = if skipped.is_empty() {
            String::new()
        } else {
            format!("; not audited (no database): {}", skipped.join(", "))
        };
        let forgotten: usize = reports.iter().map(|r| r.forgotten.len()).sum();
        let forgotten = if forgotten > 0 {
            format!("; {forgotten} not checked (older than an inbox remembers)")
        } else {
            String::new()
        };
        println!("clean: every published message is where it belongs{lag}{forgotten}{skipped}");
    }
    Ok(())
}
