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

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use skein_bus::dlq::DeadLetterInfo;
use skein_bus::replay::{read, StartAt};
use skein_message::envelope::headers;
use skein_outbox::Store;

use super::select::cell;
use super::worker::{Settings, DEFAULT_DATA_DIR};

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
    /// Ids of rows published but found nowhere.
    lost: Vec<String>,
    /// Ids of events stored more than once in EVENTS.
    duplicated: Vec<String>,
    /// Lost rows published again (with --repair).
    republished: usize,
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
    let template = args
        .database_url
        .clone()
        .unwrap_or_else(|| Settings::default_database_url(Path::new(DEFAULT_DATA_DIR)));
    let services: Vec<String> = if args.services.is_empty() {
        SERVICES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.services.clone()
    };
    let bus = super::connect(nats_url).await?;

    // What the broker holds, by message id.
    let mut in_events: HashMap<String, usize> = HashMap::new();
    for m in read(&bus, "EVENTS", "events.>", StartAt::Beginning)
        .await
        .context("cannot read EVENTS")?
    {
        if let Some(id) = header(m.headers.as_ref(), headers::ID) {
            *in_events.entry(id.to_owned()).or_default() += 1;
        }
    }
    let queued: HashSet<String> = read(&bus, "COMMANDS", "commands.>", StartAt::Beginning)
        .await
        .context("cannot read COMMANDS")?
        .iter()
        .filter_map(|m| header(m.headers.as_ref(), headers::ID).map(str::to_owned))
        .collect();
    let dead: HashSet<String> = read(&bus, "DLQ", ">", StartAt::Beginning)
        .await
        .context("cannot read DLQ")?
        .iter()
        .filter(|m| {
            m.headers
                .as_ref()
                .and_then(DeadLetterInfo::from_headers)
                .is_some()
        })
        .filter_map(|m| header(m.headers.as_ref(), headers::ID).map(str::to_owned))
        .collect();

    // Every service's store and inbox first: a command is checked against
    // its target's inbox.
    let mut stores = Vec::new();
    let mut inboxes: HashMap<String, HashSet<String>> = HashMap::new();
    for service in &services {
        let url = template.replace("{service}", service);
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            if !Path::new(path.split('?').next().unwrap_or(path)).exists() {
                eprintln!("{service}: no database at {path}; skipped");
                continue;
            }
        }
        let store = Store::connect(&url)
            .await
            .with_context(|| format!("cannot open the {service} database; check --database-url"))?;
        let ids = skein_outbox::audit::inbox_ids(&store, service)
            .await
            .with_context(|| format!("cannot read the {service} inbox"))?;
        inboxes.insert(service.clone(), ids);
        stores.push((service.clone(), store));
    }

    let mut reports = Vec::new();
    let publisher = bus.publisher();
    for (service, store) in &stores {
        let mut report = Report {
            service: service.clone(),
            backlog: store.outbox_backlog().await.unwrap_or(0),
            ..Report::default()
        };
        let mut after = 0;
        loop {
            let rows = skein_outbox::audit::published_rows(store, after, 1000)
                .await
                .with_context(|| format!("cannot read the {service} outbox"))?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            for row in &rows {
                report.checked += 1;
                let subject = row.message.subject.as_str();
                let found = if subject.starts_with("events.") {
                    let copies = in_events.get(&row.id).copied().unwrap_or(0);
                    if copies > 1 {
                        report.duplicated.push(row.id.clone());
                    }
                    copies > 0
                } else if let Some(rest) = subject.strip_prefix("commands.") {
                    let target = rest.split('.').next().unwrap_or_default();
                    queued.contains(&row.id)
                        || dead.contains(&row.id)
                        || inboxes.get(target).is_some_and(|ids| ids.contains(&row.id))
                        // A target we did not audit: cannot tell.
                        || !inboxes.contains_key(target)
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
        .map(|r| (r.lost.len() - r.republished) + r.duplicated.len())
        .sum();
    match args.format {
        Format::Json => {
            for r in &reports {
                println!("{}", serde_json::to_string(r)?);
            }
        }
        Format::Table => {
            println!(
                "{}  {}  {}  {}  {}  REPUBLISHED",
                cell("SERVICE", 12),
                cell("CHECKED", 8),
                cell("BACKLOG", 8),
                cell("LOST", 6),
                cell("DUPLICATED", 10)
            );
            for r in &reports {
                println!(
                    "{}  {}  {}  {}  {}  {}",
                    cell(&r.service, 12),
                    cell(&r.checked.to_string(), 8),
                    cell(&r.backlog.to_string(), 8),
                    cell(&r.lost.len().to_string(), 6),
                    cell(&r.duplicated.len().to_string(), 10),
                    r.republished
                );
                for id in &r.lost {
                    println!("  lost {id}");
                }
                for id in &r.duplicated {
                    println!("  duplicated in EVENTS {id}");
                }
            }
        }
    }
    if problems > 0 {
        let hint = if args.repair {
            ""
        } else {
            "; skein audit --repair publishes lost messages again"
        };
        anyhow::bail!("{problems} problem(s) found{hint}");
    }
    if args.format == Format::Table {
        println!("clean: every published message is where it belongs");
    }
    Ok(())
}
