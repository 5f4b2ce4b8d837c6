//! The causal chain of one request or order across services, as a tree by
//! causation id: what `skein trace` prints and `GET /v1/trace/{id}` returns.
//!
//! Where the messages come from:
//! - `EVENTS`: an order id is an entity, so its events are one subject
//!   filter away (`events.*.<id>.>`); a correlation id is looked for in
//!   every event since a given time (default: the whole stream).
//! - commands: `COMMANDS` is a work queue and drops a command once it is
//!   handled, so the commands the sagas sent come from the orchestrator's
//!   record of them (`get_saga`); those still waiting are read from the
//!   stream.
//! - `DLQ`: dead letters of the request, with their reason.
//!
//! A message whose cause is in none of these (the client's command taken
//! by the ingress, for example) starts a chain of its own and names that
//! cause.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::time::Duration;

use serde::Serialize;
use skein_bus::dlq::DeadLetterInfo;
use skein_bus::replay::{read, read_each, StartAt};
use skein_bus::Bus;
use skein_message::Envelope;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::client::RequestError;

/// Why a trace could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// A stream could not be read.
    #[error("cannot read {stream}")]
    Stream {
        /// The stream.
        stream: &'static str,
        /// Why.
        #[source]
        source: skein_bus::Error,
    },
    /// Nothing is known about the id.
    #[error("no message has correlation id or entity {0:?}")]
    NotFound(String),
}

/// One message of the chain.
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    /// `ce-id`.
    pub id: Uuid,
    /// `ce-type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `ce-source`: the service that sent it.
    pub service: String,
    /// NATS subject.
    pub subject: String,
    /// `ce-subject`: the entity.
    pub entity: Option<String>,
    /// `ce-correlationid`.
    pub correlation_id: String,
    /// `ce-causationid`.
    pub causation_id: Option<Uuid>,
    /// `ce-time`.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Where it was found: `events`, `commands` (still queued), `saga` (a
    /// command a saga sent), `dlq`.
    pub found_in: &'static str,
    /// Dead-lettered: by which handler, after how many deliveries, why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
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

/// A message in tree order.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEntry {
    /// The message.
    #[serde(flatten)]
    pub hop: Hop,
    /// 0 for the start of a chain, its cause's depth + 1 otherwise.
    pub depth: usize,
    /// Milliseconds since the first message of the trace.
    pub offset_ms: i64,
    /// Milliseconds since its cause (none at depth 0).
    pub hop_ms: Option<i64>,
}

/// The causal tree of one request or order.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// What was asked for.
    pub id: String,
    /// The time of the first message.
    #[serde(with = "time::serde::rfc3339")]
    pub first: OffsetDateTime,
    /// Every message, depth-first, children in time order.
    pub messages: Vec<TraceEntry>,
    /// Whether part of the picture is missing (queued commands or the
    /// sagas' record could not be read), and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<String>,
}

impl Trace {
    /// How many messages were dead-lettered.
    pub fn failures(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.hop.failure.is_some())
            .count()
    }
}

fn stream(stream: &'static str) -> impl FnOnce(skein_bus::Error) -> TraceError {
    move |source| TraceError::Stream { stream, source }
}

async fn envelopes(
    bus: &Bus,
    name: &'static str,
    filter: &str,
    start: StartAt,
) -> Result<Vec<Envelope>, TraceError> {
    let messages = read(bus, name, filter, start).await.map_err(stream(name))?;
    Ok(messages
        .iter()
        .filter_map(|m| {
            Envelope::from_parts(&m.subject, m.headers.as_ref(), m.payload.clone()).ok()
        })
        .collect())
}

/// Traces `id`, an order id (an entity) or a correlation id; a correlation
/// id is looked for in events since `since` (default: all).
pub async fn trace(
    bus: &Bus,
    id: &str,
    since: Option<OffsetDateTime>,
) -> Result<Trace, TraceError> {
    let mut hops: HashMap<Uuid, Hop> = HashMap::new();
    let mut gaps = Vec::new();

    // An entity first (server-side filter), else a correlation id.
    let mut correlations = HashSet::new();
    let mut entities = HashSet::new();
    let token = skein_message::subject::check_token(id).is_ok();
    if token {
        for envelope in envelopes(
            bus,
            "EVENTS",
            &format!("events.*.{id}.>"),
            StartAt::Beginning,
        )
        .await?
        {
            correlations.insert(envelope.correlation_id.clone());
            hops.insert(envelope.id, Hop::of(&envelope, "events"));
        }
    }
    let entity_events = !hops.is_empty();
    if !entity_events {
        correlations.insert(id.to_owned());
        let start = since.map_or(StartAt::Beginning, StartAt::Time);
        // Every event since `start`, one at a time: only the request's are
        // kept.
        read_each(bus, "EVENTS", "events.>", start, |m| {
            if let Ok(envelope) = Envelope::from_parts(&m.subject, m.headers.as_ref(), m.payload) {
                if envelope.correlation_id == id {
                    hops.insert(envelope.id, Hop::of(&envelope, "events"));
                }
            }
            ControlFlow::Continue(())
        })
        .await
        .map_err(stream("EVENTS"))?;
    }
    // An entity without events yet may still have commands: an order
    // whose place_order waits in COMMANDS (orders is down) or was
    // dead-lettered, what an operator traces first. (A request's id whose
    // events were found is no entity: no saga is asked about it.)
    if token && (entity_events || hops.is_empty()) {
        entities.insert(id.to_owned());
    }
    entities.extend(hops.values().filter_map(|h| h.entity.clone()));
    let about_ours = |envelope: &Envelope| {
        correlations.contains(&envelope.correlation_id)
            || envelope
                .subject
                .as_ref()
                .is_some_and(|e| entities.contains(e))
    };

    // Commands still queued (also a later one of the entity's, a cancel
    // under another correlation id), and dead letters.
    // Each read one message at a time, keeping only ours: a backlog or a
    // month of dead letters is not held in memory.
    let queued = read_each(bus, "COMMANDS", "commands.>", StartAt::Beginning, |m| {
        if let Ok(envelope) = Envelope::from_parts(&m.subject, m.headers.as_ref(), m.payload) {
            if about_ours(&envelope) {
                hops.entry(envelope.id)
                    .or_insert_with(|| Hop::of(&envelope, "commands"));
            }
        }
        ControlFlow::Continue(())
    })
    .await;
    if let Err(e) = queued {
        gaps.push(format!(
            "commands still queued are not shown: cannot read COMMANDS: {e}"
        ));
    }
    read_each(
        bus,
        "DLQ",
        skein_bus::dlq::DEAD_LETTERS,
        StartAt::Beginning,
        |message| {
            let Some(headers) = message.headers.as_ref() else {
                return ControlFlow::Continue(());
            };
            let Some(info) = DeadLetterInfo::from_headers(headers) else {
                return ControlFlow::Continue(());
            };
            let Ok(envelope) =
                Envelope::from_parts(&info.subject, Some(headers), message.payload.clone())
            else {
                return ControlFlow::Continue(());
            };
            if about_ours(&envelope) {
                let hop = hops
                    .entry(envelope.id)
                    .or_insert_with(|| Hop::of(&envelope, "dlq"));
                hop.failure = Some(format!(
                    "dead-lettered by {} after {} deliveries: {}",
                    info.handler, info.deliveries, info.reason
                ));
            }
            ControlFlow::Continue(())
        },
    )
    .await
    .map_err(stream("DLQ"))?;

    // The commands sagas sent (consumed from COMMANDS long ago).
    match saga_commands(bus, &entities).await {
        Ok((sent, unreadable)) => {
            for hop in sent {
                if correlations.contains(&hop.correlation_id) {
                    hops.entry(hop.id).or_insert(hop);
                }
            }
            gaps.extend(unreadable);
        }
        Err(e) => gaps.push(format!("commands sent by sagas are not shown: {e}")),
    }

    if hops.is_empty() {
        return Err(TraceError::NotFound(id.to_owned()));
    }
    Ok(arrange(id, hops, gaps))
}

/// Every command the sagas about `entities` sent, as hops, and what could
/// not be shown.
async fn saga_commands(
    bus: &Bus,
    entities: &HashSet<String>,
) -> Result<(Vec<Hop>, Vec<String>), RequestError> {
    let timeout = Duration::from_secs(3);
    let mut hops = Vec::new();
    let mut unreadable = Vec::new();
    for entity in entities {
        for saga in crate::client::sagas_about(bus, entity, 10, timeout).await? {
            for t in &saga.transitions {
                // A time that does not read would put the hop in 1970 and
                // every offset of the tree with it: such a transition's
                // commands are left out, said as a gap.
                let Ok(at) =
                    OffsetDateTime::parse(&t.at, &time::format_description::well_known::Rfc3339)
                else {
                    unreadable.push(format!(
                        "commands saga {} sent at {:?} are not shown: that is no RFC 3339 time",
                        saga.id, t.at
                    ));
                    continue;
                };
                for sent in &t.sent {
                    let name = sent
                        .kind
                        .rsplit_once('.')
                        .map_or(sent.kind.as_str(), |(n, _)| n);
                    hops.push(Hop {
                        id: sent.id,
                        kind: sent.kind.clone(),
                        service: skein_contracts::orchestrator::SERVICE.to_owned(),
                        subject: format!("commands.{name}"),
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
    Ok((hops, unreadable))
}

/// Puts `hops` in tree order: chains in the order they start, each
/// depth-first with children in time order.
fn arrange(id: &str, hops: HashMap<Uuid, Hop>, gaps: Vec<String>) -> Trace {
    let mut children: HashMap<Option<Uuid>, Vec<&Hop>> = HashMap::new();
    for hop in hops.values() {
        // A cause we do not have starts a chain of its own.
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
    let millis = |d: time::Duration| i64::try_from(d.whole_milliseconds()).unwrap_or(i64::MAX);
    let mut messages = Vec::new();
    let mut stack: Vec<(&Hop, Option<&Hop>, usize)> = children
        .get(&None)
        .into_iter()
        .flatten()
        .rev()
        .map(|h| (*h, None, 0))
        .collect();
    while let Some((hop, parent, depth)) = stack.pop() {
        messages.push(TraceEntry {
            hop: hop.clone(),
            depth,
            offset_ms: millis(hop.time - first),
            hop_ms: parent.map(|p| millis(hop.time - p.time)),
        });
        for child in children.get(&Some(hop.id)).into_iter().flatten().rev() {
            stack.push((child, Some(hop), depth + 1));
        }
    }
    Trace {
        id: id.to_owned(),
        first,
        messages,
        gaps,
    }
}
