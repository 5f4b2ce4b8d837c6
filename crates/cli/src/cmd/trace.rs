//! `skein trace <correlation-id | order-id>`: the causal chain of one
//! request across services, as a tree by causation id.
//!
//! Where the messages come from:
//! - `EVENTS`: an order id is an entity, so its events are one subject
//!   filter away (`events.*.<id>.>`); a correlation id is looked for in
//!   every event since `--since` (default: the whole stream).
//! - commands: `COMMANDS` is a work queue and drops a command once it is
//!   handled, so the commands the sagas sent come from the orchestrator's
//!   record of them (`get_saga`); those still waiting are read from the
//!   stream when the server allows a reader on it.
//! - `DLQ`: dead letters of the request, marked with their reason.
//!
//! A message whose cause is in none of these (the client's command taken
//! by the ingress, for example) hangs under a line naming that cause.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use skein_bus::dlq::DeadLetterInfo;
use skein_bus::replay::{read, StartAt};
use skein_bus::Bus;
use skein_contracts::orchestrator::{GetSaga, ListSagas};
use skein_contracts::{Caller, Role};
use skein_message::Envelope;
use skein_service::request_with;
use time::OffsetDateTime;
use uuid::Uuid;

use super::select::parse_time;

/// Show the causal chain of one request or order.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A correlation id (an HTTP request's x-request-id) or an order id.
    id: String,
    /// Look for a correlation id only in events since then (RFC 3339, or 15m, 2h, 7d ago).
    #[arg(long)]
    since: Option<String>,
    /// Output: an indented tree, or JSON (one message per line, in tree order).
    #[arg(long, value_enum, default_value_t = Format::Tree)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Tree,
    Json,
}

/// One message of the chain.
#[derive(Debug, Clone, Serialize)]
struct Hop {
    id: Uuid,
    #[serde(rename = "type")]
    kind: String,
    service: String,
    subject: String,
    entity: Option<String>,
    correlation_id: String,
    causation_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    time: OffsetDateTime,
    /// Where it was found: events, commands, saga (a command a saga sent), dlq.
    found_in: &'static str,
    /// Dead-lettered: the reason and the handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
}

impl Hop {
    fn of(envelope: &Envelope, found_in: &'static str) -> Self {
        Self {
            id: envelope.id,
            kind: envelope.kind.clone(),
            service: envelope.source.clone(),
            subject: envelope.nats_subject.clone(),
            entity: envelope.subject.clone(),
            correlation_id: envelope.correlation_id.clone(),
            causation_id: envelope.causation_id,
            time: envelope.time,
            found_in,
            failure: None,
        }
    }
}

/// A hop placed in the tree, as JSON lines show it.
#[derive(Debug, Serialize)]
struct Placed<'a> {
    #[serde(flatten)]
    hop: &'a Hop,
    depth: usize,
    offset_ms: i64,
    hop_ms: Option<i64>,
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    let bus = super::connect(nats_url).await?;
    let since = args.since.as_deref().map(parse_time).transpose()?;
    let mut hops: HashMap<Uuid, Hop> = HashMap::new();

    // An entity first (server-side filter), else a correlation id.
    let mut correlations = HashSet::new();
    let mut entities = HashSet::new();
    if skein_message::subject::check_token(&args.id).is_ok() {
        for envelope in envelopes(
            &bus,
            "EVENTS",
            &format!("events.*.{}.>", args.id),
            StartAt::Beginning,
        )
        .await?
        {
            correlations.insert(envelope.correlation_id.clone());
            hops.insert(envelope.id, Hop::of(&envelope, "events"));
        }
    }
    if hops.is_empty() {
        correlations.insert(args.id.clone());
        let start = since.map_or(StartAt::Beginning, StartAt::Time);
        for envelope in envelopes(&bus, "EVENTS", "events.>", start).await? {
            if envelope.correlation_id == args.id {
                hops.insert(envelope.id, Hop::of(&envelope, "events"));
            }
        }
    } else {
        entities.insert(args.id.clone());
    }
    entities.extend(hops.values().filter_map(|h| h.entity.clone()));

    // Commands still queued, and dead letters.
    match envelopes(&bus, "COMMANDS", "commands.>", StartAt::Beginning).await {
        Ok(queued) => {
            for envelope in queued {
                if correlations.contains(&envelope.correlation_id) {
                    hops.entry(envelope.id)
                        .or_insert_with(|| Hop::of(&envelope, "commands"));
                }
            }
        }
        // A work queue takes no second reading consumer while workers
        // consume it; the sagas' record below still names their commands.
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "COMMANDS not readable");
            eprintln!("(commands still waiting in COMMANDS are not shown: the work queue takes no reader beside its workers)");
        }
    }
    for message in read(&bus, "DLQ", ">", StartAt::Beginning)
        .await
        .context("cannot read DLQ")?
    {
        let Some(headers) = message.headers.as_ref() else {
            continue;
        };
        let Some(info) = DeadLetterInfo::from_headers(headers) else {
            continue;
        };
        let Ok(envelope) =
            Envelope::from_parts(&info.subject, Some(headers), message.payload.clone())
        else {
            continue;
        };
        let ours = correlations.contains(&envelope.correlation_id)
            || envelope
                .subject
                .as_ref()
                .is_some_and(|e| entities.contains(e));
        if ours {
            let hop = hops
                .entry(envelope.id)
                .or_insert_with(|| Hop::of(&envelope, "dlq"));
            hop.failure = Some(format!(
                "dead-lettered by {} after {} deliveries: {}",
                info.handler, info.deliveries, info.reason
            ));
        }
    }

    // The commands sagas sent (consumed from COMMANDS long ago).
    let sagas = saga_commands(&bus, &entities).await;
    match sagas {
        Ok(sent) => {
            for hop in sent {
                if correlations.contains(&hop.correlation_id) || correlations.is_empty() {
                    hops.entry(hop.id).or_insert(hop);
                }
            }
        }
        Err(e) => eprintln!("(saga commands left out: {e:#})"),
    }

    if hops.is_empty() {
        anyhow::bail!(
            "no message has correlation id or entity {:?}; check the id (skein replay --correlation / --entity), or widen --since",
            args.id
        );
    }
    print(&hops, args.format)
}

async fn envelopes(
    bus: &Bus,
    stream: &str,
    filter: &str,
    start: StartAt,
) -> anyhow::Result<Vec<Envelope>> {
    let messages = read(bus, stream, filter, start)
        .await
        .with_context(|| format!("cannot read {stream}"))?;
    Ok(messages
        .iter()
        .filter_map(|m| {
            Envelope::from_parts(&m.subject, m.headers.as_ref(), m.payload.clone()).ok()
        })
        .collect())
}

/// Every command the sagas about `entities` sent, as hops.
async fn saga_commands(bus: &Bus, entities: &HashSet<String>) -> anyhow::Result<Vec<Hop>> {
    let operator = Caller {
        user_id: Uuid::nil(),
        role: Role::Admin,
    };
    let timeout = Duration::from_secs(3);
    let mut hops = Vec::new();
    for entity in entities {
        let page = request_with(
            bus,
            &ListSagas {
                caller: operator.clone(),
                status: None,
                key: Some(entity.clone()),
                limit: 10,
                cursor: None,
            },
            None,
            timeout,
        )
        .await
        .context("the orchestrator does not answer")?;
        for item in page.items {
            let saga = request_with(
                bus,
                &GetSaga {
                    caller: operator.clone(),
                    saga_id: item.id,
                },
                None,
                timeout,
            )
            .await
            .context("the orchestrator does not answer")?;
            for t in &saga.transitions {
                let at = time::OffsetDateTime::parse(
                    &t.at,
                    &time::format_description::well_known::Rfc3339,
                )
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                for sent in &t.sent {
                    hops.push(Hop {
                        id: sent.id,
                        kind: sent.kind.clone(),
                        service: skein_contracts::orchestrator::SERVICE.to_owned(),
                        subject: format!(
                            "commands.{}",
                            sent.kind.rsplitn(2, '.').last().unwrap_or_default()
                        ),
                        entity: Some(saga.key.clone()),
                        correlation_id: saga.correlation_id.clone(),
                        causation_id: t.cause_id,
                        time: at,
                        found_in: "saga",
                        failure: None,
                    });
                }
            }
        }
    }
    Ok(hops)
}

fn print(hops: &HashMap<Uuid, Hop>, format: Format) -> anyhow::Result<()> {
    let mut children: HashMap<Option<Uuid>, Vec<&Hop>> = HashMap::new();
    for hop in hops.values() {
        // A cause we do not have is a root of its own (grouped by that cause).
        let parent = hop.causation_id.filter(|c| hops.contains_key(c));
        children.entry(parent).or_default().push(hop);
    }
    for list in children.values_mut() {
        list.sort_by_key(|h| (h.time, h.id));
    }
    let first = hops
        .values()
        .map(|h| h.time)
        .min()
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let millis = |d: time::Duration| d.whole_milliseconds() as i64;

    // Roots (already in time order) grouped by their missing cause, in the
    // order the groups start.
    let mut order: Vec<Option<Uuid>> = Vec::new();
    let mut merged: HashMap<Option<Uuid>, Vec<&Hop>> = HashMap::new();
    for hop in children.get(&None).into_iter().flatten() {
        if !merged.contains_key(&hop.causation_id) {
            order.push(hop.causation_id);
        }
        merged.entry(hop.causation_id).or_default().push(hop);
    }

    let mut out = Vec::new();
    fn walk<'a>(
        hop: &'a Hop,
        parent: Option<&'a Hop>,
        depth: usize,
        children: &HashMap<Option<Uuid>, Vec<&'a Hop>>,
        out: &mut Vec<(usize, &'a Hop, Option<&'a Hop>)>,
    ) {
        out.push((depth, hop, parent));
        for child in children.get(&Some(hop.id)).into_iter().flatten() {
            walk(child, Some(hop), depth + 1, children, out);
        }
    }
    let mut groups = Vec::new();
    for cause in order {
        let mut lines = Vec::new();
        for hop in merged.get(&cause).into_iter().flatten() {
            walk(hop, None, 0, &children, &mut lines);
        }
        groups.push((cause, lines));
    }
    for (_, lines) in &groups {
        out.extend(lines.iter().copied());
    }

    match format {
        Format::Json => {
            for (depth, hop, parent) in out {
                let placed = Placed {
                    hop,
                    depth,
                    offset_ms: millis(hop.time - first),
                    hop_ms: parent.map(|p| millis(hop.time - p.time)),
                };
                println!("{}", serde_json::to_string(&placed)?);
            }
        }
        Format::Tree => {
            let failures = out.iter().filter(|(_, h, _)| h.failure.is_some()).count();
            println!(
                "{} messages from {} (offsets from the first; in brackets the time since its cause){}",
                out.len(),
                super::select::short_time(first),
                if failures > 0 { format!("; {failures} FAILED") } else { String::new() }
            );
            for (cause, lines) in &groups {
                match cause {
                    Some(c) => {
                        println!("caused by {c} (not in the streams: a client's command, consumed)")
                    }
                    None => println!("(no cause: the start of a chain)"),
                }
                for (depth, hop, parent) in lines {
                    let hop_ms = parent.map_or(String::new(), |p| {
                        format!(" [+{} ms]", millis(hop.time - p.time))
                    });
                    let mark = match (&hop.failure, hop.found_in) {
                        (Some(f), _) => format!("  !! {f}"),
                        (None, "commands") => "  (waiting in COMMANDS)".to_owned(),
                        _ => String::new(),
                    };
                    println!(
                        "{}{:>7} ms{}  {:<12} {}{}",
                        "  ".repeat(depth + 1),
                        millis(hop.time - first),
                        hop_ms,
                        hop.service,
                        hop.kind,
                        mark
                    );
                }
            }
        }
    }
    Ok(())
}
