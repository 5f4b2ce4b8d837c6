//! A service transaction: state changes, inbox records and outgoing messages
//! commit together.

use std::collections::HashSet;
use std::ops::{Deref, DerefMut};

use skein_bus::Outgoing;
use skein_message::Envelope;
use sqlx::any::AnyArguments;
use sqlx::query::{Query, QueryScalar};
use sqlx::{Any, AnyConnection, Transaction};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{while_busy, SqliteTurn, Store, WritePermit};

/// An open transaction on a service's [`Store`].
///
/// Use it as a connection (`&mut *tx`) for the handler's own queries, record
/// the handled message with [`Tx::mark_processed`], queue outgoing messages
/// with [`Tx::publish`], then [`Tx::commit`]. Dropping it without committing
/// rolls everything back, messages included.
///
/// For a part that may fail on its own, write `SAVEPOINT name`, `RELEASE
/// name` and `ROLLBACK TO name` as statements; sqlx's nested `begin()` on
/// the connection is not for this transaction (on SQLite it would send a
/// second `BEGIN`, which fails).
#[derive(Debug)]
pub struct Tx {
    conn: TxConn,
    outgoing: Vec<Outgoing>,
    store: Store,
    /// PostgreSQL batch: lock waits are bounded (`BEGIN_BATCH`) until the
    /// last outbox insert lifts the bound for the `COMMIT`.
    bounded_lock_waits: bool,
}

#[derive(Debug)]
enum TxConn {
    /// SQLite: `BEGIN IMMEDIATE` on this process's writer connection, with
    /// the turn to write held until the transaction ends.
    Sqlite(SqliteTurn),
    /// PostgreSQL: a transaction on a pooled connection.
    Postgres(Transaction<'static, Any>),
}

impl Tx {
    pub(crate) async fn begin(permit: WritePermit, store: Store) -> Result<Self> {
        let conn = match permit {
            WritePermit::Sqlite(mut turn) => {
                turn.begin()
                    .await
                    .map_err(Error::query("cannot begin a transaction"))?;
                TxConn::Sqlite(turn)
            }
            WritePermit::Postgres(pool) => TxConn::Postgres(
                pool.begin()
                    .await
                    .map_err(Error::query("cannot begin a transaction"))?,
            ),
        };
        Ok(Self {
            conn,
            outgoing: Vec::new(),
            store,
            bounded_lock_waits: false,
        })
    }

    /// Records that `handler` processed message `id`. Returns `false` when
    /// it already had: the caller must then skip the message's effects (and
    /// may commit or drop the transaction; nothing changed).
    pub async fn mark_processed(&mut self, handler: &str, id: Uuid) -> Result<bool> {
        Ok(!self.record(handler, &[id]).await?.is_empty())
    }

    /// Records that `handler` processed each message of `ids`, in one
    /// statement, and returns those it had not processed before: only their
    /// effects may be applied.
    pub async fn mark_processed_many(
        &mut self,
        handler: &str,
        ids: &[Uuid],
    ) -> Result<HashSet<Uuid>> {
        self.record(handler, &distinct(ids)).await
    }

    /// Begins a transaction and records that `handler` processed each
    /// message of `ids`: [`Store::begin`] and [`Tx::mark_processed_many`]
    /// in one. On SQLite the `BEGIN` and the inbox insert reach the
    /// connection together, in one hand-off to its thread.
    ///
    /// Two statements in one query string: sqlx's SQLite driver runs each
    /// in turn, binding `$N` across the whole string (a behaviour sqlx 0.8
    /// keeps but calls deprecated; no other driver has it, so PostgreSQL
    /// gets them one by one). Should a later sqlx run only the first, no
    /// message would be recorded and every inbox test fails at once.
    ///
    /// On PostgreSQL a transaction recording more than one message (a
    /// batch) waits at most 50 ms for any lock while its handlers run:
    /// batches of two copies of a worker may take the same rows in
    /// different orders, and rather than wait for PostgreSQL's deadlock
    /// detection (a second by default), the batch fails and the inbox
    /// handles its messages one by one, each in a transaction that waits as
    /// long as it takes. [`Tx::commit`] lifts the bound before the
    /// `COMMIT`, whose only wait (the notify lock) is no deadlock.
    pub(crate) async fn begin_recording(
        store: &Store,
        handler: &str,
        ids: &[Uuid],
    ) -> Result<(Self, HashSet<Uuid>)> {
        let ids = distinct(ids);
        match store.write_permit().await? {
            WritePermit::Sqlite(mut turn) if !ids.is_empty() => {
                let (first, rest) = ids.split_at(ids.len().min(ROWS_PER_STATEMENT));
                let sql = format!("BEGIN IMMEDIATE; {}", inbox_insert(first.len()));
                turn.beginning();
                // A `BEGIN` that found the lock taken ran nothing after it.
                let inserted = while_busy!(
                    turn,
                    bind_inbox(sqlx::query_scalar(&sql), handler, first)
                        .fetch_all(turn.conn())
                        .await
                )
                .map_err(Error::query(
                    "cannot begin a transaction and record the messages in the inbox",
                ))?;
                let mut fresh = parse_ids(inserted)?;
                let mut tx = Self {
                    conn: TxConn::Sqlite(turn),
                    outgoing: Vec::new(),
                    store: store.clone(),
                    bounded_lock_waits: false,
                };
                fresh.extend(tx.record(handler, rest).await?);
                Ok((tx, fresh))
            }
            WritePermit::Postgres(pool) if ids.len() > 1 => {
                let conn = pool
                    .begin_with(BEGIN_BATCH)
                    .await
                    .map_err(Error::query("cannot begin a transaction"))?;
                let mut tx = Self {
                    conn: TxConn::Postgres(conn),
                    outgoing: Vec::new(),
                    store: store.clone(),
                    bounded_lock_waits: true,
                };
                let fresh = tx.record(handler, &ids).await?;
                Ok((tx, fresh))
            }
            permit => {
                let mut tx = Self::begin(permit, store.clone()).await?;
                let fresh = tx.record(handler, &ids).await?;
                Ok((tx, fresh))
            }
        }
    }

    /// Inserts inbox records for `ids` (distinct), returning those new.
    async fn record(&mut self, handler: &str, ids: &[Uuid]) -> Result<HashSet<Uuid>> {
        let mut fresh = HashSet::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let sql = inbox_insert(chunk.len());
            let inserted = bind_inbox(sqlx::query_scalar(&sql), handler, chunk)
                .fetch_all(&mut **self)
                .await
                .map_err(Error::query("cannot record the messages in the inbox"))?;
            fresh.extend(parse_ids(inserted)?);
        }
        Ok(fresh)
    }

    /// The backend this transaction runs on.
    pub fn backend(&self) -> crate::Backend {
        self.store.backend()
    }

    /// Queues `envelope` for publication once this transaction commits.
    pub fn publish(&mut self, envelope: &Envelope) {
        self.outgoing.push(Outgoing::from(envelope));
    }

    /// Queues an arbitrary message. Its `Nats-Msg-Id` header is its outbox
    /// row id (and so its id for `skein audit` and the broker's duplicate
    /// window); a message without one gets a new UUIDv7 there, written
    /// with the row, so a re-publish after a crash carries the same id.
    pub fn publish_outgoing(&mut self, message: Outgoing) {
        self.outgoing.push(message);
    }

    /// Messages queued so far.
    pub fn queued(&self) -> usize {
        self.outgoing.len()
    }

    /// Writes the queued messages to the outbox and commits everything in
    /// one transaction, then wakes the relay.
    ///
    /// Messages are written last, after the handler's own writes, so a later
    /// transaction on the same rows always gets later outbox sequence numbers.
    pub async fn commit(mut self) -> Result<()> {
        let has_messages = !self.outgoing.is_empty();
        let mut rows = Vec::with_capacity(self.outgoing.len());
        for message in std::mem::take(&mut self.outgoing) {
            rows.push(OutboxRow::of(message)?);
        }
        let now = crate::now_micros();
        // One statement per chunk of rows. Rows of one statement take their
        // `seq` in the order they are listed.
        let chunks: Vec<&[OutboxRow]> = rows.chunks(ROWS_PER_STATEMENT).collect();
        match self.conn {
            TxConn::Sqlite(mut turn) => {
                // The last insert and the COMMIT go to the connection
                // together, in one hand-off to its thread.
                let (last, before) = match chunks.split_last() {
                    Some((last, before)) => (Some(*last), before),
                    None => (None, &[][..]),
                };
                for chunk in before {
                    bind_outbox(sqlx::query(&outbox_insert(chunk.len())), chunk, now)
                        .execute(turn.conn())
                        .await
                        .map_err(Error::query("cannot write to the outbox"))?;
                }
                match last {
                    Some(chunk) => {
                        let sql = format!("{}; COMMIT", outbox_insert(chunk.len()));
                        bind_outbox(sqlx::query(&sql), chunk, now)
                            .execute(turn.conn())
                            .await
                            .map_err(Error::query("cannot write to the outbox and commit"))?;
                        turn.ended();
                    }
                    None => turn.commit().await.map_err(Error::query("cannot commit"))?,
                }
            }
            TxConn::Postgres(mut tx) => {
                for (i, chunk) in chunks.iter().enumerate() {
                    let mut sql = outbox_insert(chunk.len());
                    if self.bounded_lock_waits && i + 1 == chunks.len() {
                        // The insert trigger's NOTIFY makes the COMMIT take
                        // PostgreSQL's notify lock, one for the whole server,
                        // held by other commits through their WAL flush:
                        // a wait there is no deadlock and must not fail a
                        // batch whose handlers all succeeded. Lift the bound
                        // in this statement, with no trip of its own.
                        sql.push_str(" RETURNING set_config('lock_timeout', '0', true)");
                    }
                    bind_outbox(sqlx::query(&sql), chunk, now)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::query("cannot write to the outbox"))?;
                }
                // The outbox's insert trigger has notified the LISTENing
                // relays; they hear it when (and only if) we commit.
                tx.commit().await.map_err(Error::query("cannot commit"))?;
            }
        }
        if has_messages {
            self.store.notify_committed();
        }
        Ok(())
    }

    /// Rolls back explicitly (dropping does the same).
    pub async fn rollback(self) -> Result<()> {
        match self.conn {
            TxConn::Sqlite(mut turn) => turn.rollback().await,
            TxConn::Postgres(tx) => tx.rollback().await,
        }
        .map_err(Error::query("cannot roll back"))
    }
}

impl Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        match &self.conn {
            TxConn::Sqlite(turn) => turn.conn_ref(),
            TxConn::Postgres(tx) => tx,
        }
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.conn {
            TxConn::Sqlite(turn) => turn.conn(),
            TxConn::Postgres(tx) => tx,
        }
    }
}

/// `BEGIN` for a batch on PostgreSQL, with how long it waits for a lock
/// before it gives up (see [`Tx::begin_recording`]): one simple query.
const BEGIN_BATCH: &str = "BEGIN; SET LOCAL lock_timeout = '50ms'";

/// Rows per multi-row statement: far below the bind-parameter limits of
/// SQLite (32,766) and PostgreSQL (65,535) at five parameters a row.
const ROWS_PER_STATEMENT: usize = 200;

/// Appends `rows` groups of `columns` numbered placeholders:
/// `($1, $2), ($3, $4)`.
fn push_placeholders(sql: &mut String, rows: usize, columns: usize) {
    use std::fmt::Write;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "${}", row * columns + column + 1);
        }
        sql.push(')');
    }
}

/// `ids` without repeats, in their first order.
fn distinct(ids: &[Uuid]) -> Vec<Uuid> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

/// An insert of `rows` inbox records that returns the ids it inserted.
fn inbox_insert(rows: usize) -> String {
    let mut sql =
        String::from("INSERT INTO skein_inbox (handler, message_id, processed_at) VALUES ");
    push_placeholders(&mut sql, rows, 3);
    sql.push_str(" ON CONFLICT (handler, message_id) DO NOTHING RETURNING message_id");
    sql
}

fn bind_inbox<'q>(
    mut query: QueryScalar<'q, Any, String, AnyArguments<'q>>,
    handler: &'q str,
    ids: &[Uuid],
) -> QueryScalar<'q, Any, String, AnyArguments<'q>> {
    let now = crate::now_micros();
    for id in ids {
        query = query.bind(handler).bind(id.to_string()).bind(now);
    }
    query
}

fn parse_ids(ids: Vec<String>) -> Result<HashSet<Uuid>> {
    ids.into_iter()
        .map(|id| {
            Uuid::parse_str(&id).map_err(|e| Error::CorruptRow {
                id: id.clone(),
                reason: format!("inbox message id: {e}"),
            })
        })
        .collect()
}

/// An insert of `rows` outbox rows.
fn outbox_insert(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO skein_outbox (id, subject, headers, payload, created_at) VALUES ",
    );
    push_placeholders(&mut sql, rows, 5);
    sql
}

fn bind_outbox<'q>(
    mut query: Query<'q, Any, AnyArguments<'q>>,
    rows: &'q [OutboxRow],
    now: i64,
) -> Query<'q, Any, AnyArguments<'q>> {
    for row in rows {
        query = query
            .bind(row.id.as_str())
            .bind(row.subject.as_str())
            .bind(row.headers.as_str())
            .bind(row.payload.as_slice())
            .bind(now);
    }
    query
}

/// An outgoing message as an outbox row.
struct OutboxRow {
    id: String,
    subject: String,
    headers: String,
    payload: Vec<u8>,
}

impl OutboxRow {
    fn of(mut message: Outgoing) -> Result<Self> {
        // An empty id is none (NATS treats it so).
        let id = match message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .filter(|id| !id.as_str().is_empty())
        {
            Some(id) => id.as_str().to_owned(),
            None => {
                let id = Uuid::now_v7().to_string();
                message
                    .headers
                    .insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
                id
            }
        };
        let headers: Vec<(String, String)> = message
            .headers
            .iter()
            .flat_map(|(name, values)| {
                let name = AsRef::<str>::as_ref(name).to_owned();
                values
                    .iter()
                    .map(move |v| (name.clone(), v.as_str().to_owned()))
            })
            .collect();
        let headers = serde_json::to_string(&headers).map_err(|e| Error::CorruptRow {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            id,
            subject: message.subject,
            headers,
            payload: message.payload.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::push_placeholders;

    #[test]
    fn placeholders_are_numbered_row_by_row() {
        let mut sql = String::new();
        push_placeholders(&mut sql, 2, 3);
        assert_eq!(sql, "($1, $2, $3), ($4, $5, $6)");
        let mut one = String::new();
        push_placeholders(&mut one, 1, 1);
        assert_eq!(one, "($1)");
    }
}
