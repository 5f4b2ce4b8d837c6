//! Rebuilding a read model from the `EVENTS` stream.
//!
//! [`rebuild`] empties a model's tables and applies every stored event again
//! with the live projection ([`apply`]), in one transaction, then reports
//! what differs from before. It runs beside the live consumer:
//!
//! 1. the stream is read outside any lock (the long part, [`read_history`]);
//! 2. a transaction takes the rebuild lock, which waits for live handlers in
//!    flight and holds new ones back (PostgreSQL advisory lock; SQLite's
//!    write lock); every event a live handler has committed is in the stream
//!    by then;
//! 3. the events stored since step 1 are read, the tables cleared, all
//!    events applied, the result compared with the state before, committed
//!    ([`rebuild_from`] does steps 2 and 3).
//!
//! Live handlers that ran before step 2 are covered by the replay; those
//! after it apply on top, and because projections are idempotent and an
//! order's status only moves forward, re-applying an event the rebuild
//! already applied changes nothing. The inbox is left alone.
//!
//! An event the projection refuses permanently (undecodable, unknown
//! version) is skipped and listed, as the live consumer dead-letters it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use skein_bus::provision::EVENTS;
use skein_bus::replay::{read, StartAt, StoredMessage};
use skein_bus::{Bus, ErrorKind};
use skein_message::{subject, Envelope};
use skein_outbox::Store;

use crate::projection::{apply, Applied};
use crate::store::{self, Snapshot};
use crate::{MIGRATIONS, NAME};

/// A read model of the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadModel {
    /// Users (table `users`), from identity's `user_registered`.
    Users,
    /// Orders and their status (table `orders`), from orders' events.
    Orders,
    /// Every event about each order (table `timeline`).
    Timeline,
    /// All of the above.
    All,
}

impl ReadModel {
    /// Every name [`FromStr`] accepts.
    pub const NAMES: [&'static str; 4] = ["users", "orders", "timeline", "all"];

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadModel::Users => "users",
            ReadModel::Orders => "orders",
            ReadModel::Timeline => "timeline",
            ReadModel::All => "all",
        }
    }

    /// Whether this model is `part` or contains it.
    pub fn includes(self, part: ReadModel) -> bool {
        self == ReadModel::All || self == part
    }

    /// The tables of this model.
    pub fn tables(self) -> Vec<&'static str> {
        [
            (ReadModel::Users, "users"),
            (ReadModel::Orders, "orders"),
            (ReadModel::Timeline, "timeline"),
        ]
        .into_iter()
        .filter(|(part, _)| self.includes(*part))
        .map(|(_, table)| table)
        .collect()
    }

    /// The `EVENTS` subjects this model is built from.
    pub fn filters(self) -> Vec<String> {
        let identity = format!("{}.identity.>", subject::EVENTS_PREFIX);
        let orders = format!("{}.orders.>", subject::EVENTS_PREFIX);
        match self {
            ReadModel::Users => vec![identity],
            ReadModel::Orders | ReadModel::Timeline => vec![orders],
            ReadModel::All => vec![identity, orders],
        }
    }
}

impl fmt::Display for ReadModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a read model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown read model {0:?}; expected one of users, orders, timeline, all")]
pub struct UnknownReadModel(pub String);

impl FromStr for ReadModel {
    type Err = UnknownReadModel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "users" => Ok(ReadModel::Users),
            "orders" => Ok(ReadModel::Orders),
            "timeline" => Ok(ReadModel::Timeline),
            "all" => Ok(ReadModel::All),
            _ => Err(UnknownReadModel(s.to_owned())),
        }
    }
}

/// Why a rebuild failed. Nothing changed: the transaction rolled back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// The `EVENTS` stream could not be read.
    #[error("cannot read the EVENTS stream: {0}")]
    Bus(#[from] skein_bus::Error),
    /// The projector's database could not be opened or migrated.
    #[error("projector database: {0}")]
    Store(#[from] skein_outbox::Error),
    /// A query on the projector's database failed.
    #[error("projector database: {0}")]
    Database(#[from] sqlx::Error),
    /// `EVENTS` no longer holds its oldest messages (its `max_age` or
    /// `max_bytes` removed them), and the rebuild would remove or change
    /// rows of the model: what was built from them. Nothing changed.
    #[error(
        "EVENTS no longer holds its first {lost} message(s) (its max_age or max_bytes removed \
         them), and rebuilding from what is left removes or changes rows of the model \
         ({changes}): users and orders from before would be lost; nothing changed. Accept a model built from the \
         history left with --partial-history (skein replay)"
    )]
    HistoryCut {
        /// Messages the stream no longer holds (its first sequence less 1).
        lost: u64,
        /// What the rebuild would have changed.
        changes: String,
    },
    /// An event could not be applied for a reason that may pass; run the
    /// rebuild again.
    #[error("event {sequence} could not be applied: {reason}")]
    Apply {
        /// Stream sequence of the event.
        sequence: u64,
        /// Why.
        reason: String,
    },
}

/// An event the rebuild skipped, as the live consumer dead-letters it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEvent {
    /// Stream sequence.
    pub sequence: u64,
    /// NATS subject.
    pub subject: String,
    /// Why.
    pub reason: String,
}

/// What a rebuild did to one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableReport {
    /// The table.
    pub table: String,
    /// Rows before.
    pub rows_before: usize,
    /// Rows after.
    pub rows_after: usize,
    /// Rows only after (missing before).
    pub added: usize,
    /// Rows only before (gone after).
    pub removed: usize,
    /// Rows present before and after with different contents.
    pub modified: usize,
}

impl TableReport {
    /// Whether the table's contents changed.
    pub fn changed(&self) -> bool {
        self.added + self.removed + self.modified > 0
    }
}

/// The outcome of a rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildReport {
    /// The model rebuilt.
    pub model: ReadModel,
    /// Events read from the stream.
    pub events_read: usize,
    /// Events that concern the model and were applied.
    pub events_applied: usize,
    /// Events refused permanently and skipped.
    pub skipped: Vec<SkippedEvent>,
    /// Per table: rows before and after and what differs.
    pub tables: Vec<TableReport>,
    /// Whether any table's contents changed; `false` means the read model
    /// was exactly what the events say.
    pub changed: bool,
    /// The first sequence `EVENTS` still held, when it no longer held its
    /// oldest messages (a rebuild accepted with
    /// [`History::accept_partial`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_from: Option<u64>,
}

impl fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rebuilt {} from {} event(s) ({} applied, {} skipped): {}",
            self.model,
            self.events_read,
            self.events_applied,
            self.skipped.len(),
            if self.changed { "changed" } else { "unchanged" }
        )?;
        for t in &self.tables {
            write!(
                f,
                "  {:<8} {} -> {} rows",
                t.table, t.rows_before, t.rows_after
            )?;
            if t.changed() {
                writeln!(
                    f,
                    ": {} added, {} removed, {} modified",
                    t.added, t.removed, t.modified
                )?;
            } else {
                writeln!(f, ", unchanged")?;
            }
        }
        for s in &self.skipped {
            writeln!(f, "  skipped #{} {}: {}", s.sequence, s.subject, s.reason)?;
        }
        if let Some(first) = self.history_from {
            writeln!(
                f,
                "  from EVENTS #{first} on: its first {} message(s) are gone (max_age or max_bytes)",
                first - 1
            )?;
        }
        Ok(())
    }
}

/// Rebuilds `model` from the whole `EVENTS` stream and reports what changed.
///
/// Safe while the projector runs (see the module docs). Migrates the store
/// first, so it also works on a fresh database. The same as
/// [`read_history`] followed by [`rebuild_from`].
pub async fn rebuild(
    bus: &Bus,
    store: &Store,
    model: ReadModel,
) -> Result<RebuildReport, RebuildError> {
    let history = read_history(bus, model).await?;
    rebuild_from(bus, store, history).await
}

/// The events a model is built from, as read so far.
#[derive(Debug)]
pub struct History {
    model: ReadModel,
    messages: Vec<StoredMessage>,
    /// Per filter, where reading resumes (`None`: nothing read yet).
    resume: Vec<(String, Option<u64>)>,
    /// Whether a model built from a stream that lost its oldest messages
    /// is wanted anyway.
    partial: bool,
}

impl History {
    /// Accepts a model built from what `EVENTS` still holds when it no
    /// longer holds its oldest messages; without this the rebuild refuses
    /// to change the model then ([`RebuildError::HistoryCut`]).
    pub fn accept_partial(mut self) -> Self {
        self.partial = true;
        self
    }

    /// The model.
    pub fn model(&self) -> ReadModel {
        self.model
    }

    /// Events read.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether no event was read.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Reads what was stored since, up to the end of the stream now.
    async fn catch_up(&mut self, bus: &Bus) -> Result<(), RebuildError> {
        for (filter, resume) in &mut self.resume {
            let start = resume.map_or(StartAt::Beginning, StartAt::Sequence);
            let more = read(bus, EVENTS, filter, start).await?;
            if let Some(last) = more.last() {
                *resume = Some(last.sequence + 1);
            }
            self.messages.extend(more);
        }
        self.messages.sort_by_key(|m| m.sequence);
        self.messages.dedup_by_key(|m| m.sequence);
        Ok(())
    }
}

/// Step 1 of a rebuild: reads the whole history of `model`, holding nothing.
pub async fn read_history(bus: &Bus, model: ReadModel) -> Result<History, RebuildError> {
    let mut history = History {
        model,
        messages: Vec::new(),
        resume: model.filters().into_iter().map(|f| (f, None)).collect(),
        partial: false,
    };
    history.catch_up(bus).await?;
    Ok(history)
}

/// Steps 2 and 3 of a rebuild: under the rebuild lock, reads what the
/// stream got since `history` was read, clears the model and applies
/// everything.
pub async fn rebuild_from(
    bus: &Bus,
    store: &Store,
    mut history: History,
) -> Result<RebuildReport, RebuildError> {
    let model = history.model;
    store.migrate(NAME, MIGRATIONS).await?;

    // Exclusive against the live handlers from here to the commit.
    let mut tx = store.begin().await?;
    store::lock_for_rebuild(&mut tx, store.backend()).await?;
    let before = store::dump(&mut tx, model).await?;
    // Every event a live handler committed is in the stream by now.
    history.catch_up(bus).await?;
    let messages = std::mem::take(&mut history.messages);

    store::clear(&mut tx, model).await?;
    let mut applied = 0;
    let mut skipped = Vec::new();
    for message in &messages {
        match replay_one(&mut tx, message, model).await {
            Ok(Applied::Projected) => applied += 1,
            Ok(Applied::Ignored) => {}
            Err(Replayed::Skip(reason)) => {
                tracing::warn!(seq = message.sequence, subject = %message.subject, %reason, "rebuild skips an event");
                skipped.push(SkippedEvent {
                    sequence: message.sequence,
                    subject: message.subject.clone(),
                    reason,
                });
            }
            Err(Replayed::Fail(reason)) => {
                return Err(RebuildError::Apply {
                    sequence: message.sequence,
                    reason,
                })
            }
        }
    }
    let after = store::dump(&mut tx, model).await?;
    let tables = compare(model, &before, &after);
    let changed = tables.iter().any(TableReport::changed);
    // Read after the catch-up: what the stream has lost by now, the
    // history read may lack.
    let first = skein_bus::replay::first_sequence(bus, EVENTS).await?;
    let history_from = (first > 1).then_some(first);
    // Rows only added (a model rebuilt into a new database) lose nothing.
    let loses = tables.iter().any(|t| t.removed + t.modified > 0);
    if history_from.is_some() && loses && !history.partial {
        // Dropped: rolled back.
        return Err(RebuildError::HistoryCut {
            lost: first - 1,
            changes: tables
                .iter()
                .filter(|t| t.changed())
                .map(|t| {
                    format!(
                        "{}: {} added, {} removed, {} modified",
                        t.table, t.added, t.removed, t.modified
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    tx.commit().await?;

    let report = RebuildReport {
        model,
        events_read: messages.len(),
        events_applied: applied,
        skipped,
        tables,
        changed,
        history_from,
    };
    tracing::info!(model = %model, events = report.events_read, changed, "read model rebuilt");
    Ok(report)
}

enum Replayed {
    Skip(String),
    Fail(String),
}

async fn replay_one(
    tx: &mut skein_outbox::Tx,
    message: &StoredMessage,
    model: ReadModel,
) -> Result<Applied, Replayed> {
    // A copy `skein dlq redrive` published for another consumer: the live
    // projector passes it over (it had the original), so the rebuild does
    // too; applied, it would move the order's status_seq to the copy's.
    if skein_bus::dlq::redriven_for_another(message.headers.as_ref(), NAME).is_some() {
        return Ok(Applied::Ignored);
    }
    let envelope = Envelope::from_parts(
        &message.subject,
        message.headers.as_ref(),
        message.payload.clone(),
    )
    .map_err(|e| Replayed::Skip(format!("undecodable message: {e}")))?;
    apply(tx, &envelope, message.sequence, model)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::Permanent => Replayed::Skip(e.reason().to_owned()),
            ErrorKind::Transient => Replayed::Fail(e.reason().to_owned()),
        })
}

fn compare(model: ReadModel, before: &Snapshot, after: &Snapshot) -> Vec<TableReport> {
    let mut out = Vec::new();
    for table in model.tables() {
        out.push(match table {
            "users" => diff(table, &before.users, &after.users, |r| &r.id),
            "orders" => diff(table, &before.orders, &after.orders, |r| &r.id),
            _ => diff(table, &before.timeline, &after.timeline, |r| &r.event_id),
        });
    }
    out
}

fn diff<T: PartialEq>(
    table: &str,
    before: &[T],
    after: &[T],
    key: impl Fn(&T) -> &str,
) -> TableReport {
    let old: BTreeMap<&str, &T> = before.iter().map(|r| (key(r), r)).collect();
    let new: BTreeMap<&str, &T> = after.iter().map(|r| (key(r), r)).collect();
    let added = new.keys().filter(|k| !old.contains_key(*k)).count();
    let removed = old.keys().filter(|k| !new.contains_key(*k)).count();
    let modified = new
        .iter()
        .filter(|(k, row)| old.get(*k).is_some_and(|o| o != *row))
        .count();
    TableReport {
        table: table.to_owned(),
        rows_before: before.len(),
        rows_after: after.len(),
        added,
        removed,
        modified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_models_parse_from_their_names() {
        for name in ReadModel::NAMES {
            assert_eq!(name.parse::<ReadModel>().map(|m| m.as_str()), Ok(name));
        }
        assert_eq!(" Users ".parse::<ReadModel>(), Ok(ReadModel::Users));
        assert!("products".parse::<ReadModel>().is_err());
        assert_eq!(ReadModel::All.tables(), ["users", "orders", "timeline"]);
        assert_eq!(ReadModel::Timeline.filters(), ["events.orders.>"]);
    }

    #[test]
    fn a_diff_counts_added_removed_and_modified_rows() {
        let before = [("a", 1), ("b", 2), ("c", 3)];
        let after = [("b", 2), ("c", 4), ("d", 5)];
        let t = diff("t", &before, &after, |r| r.0);
        assert_eq!((t.added, t.removed, t.modified), (1, 1, 1));
        assert!(t.changed());
        assert!(!diff("t", &before, &before, |r| r.0).changed());
    }
}
