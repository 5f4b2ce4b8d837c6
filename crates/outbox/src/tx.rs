//! A service transaction: state changes, inbox records and outgoing messages
//! commit together.

use std::collections::HashSet;
use std::ops::{Deref, DerefMut};

use skein_bus::Outgoing;
use skein_message::Envelope;
use sqlx::{Any, AnyConnection, Transaction};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{Backend, SqliteTurn, Store, WritePermit};

/// An open transaction on a service's [`Store`].
///
/// Use it as a connection (`&mut *tx`) for the handler's own queries, record
/// the handled message with [`Tx::mark_processed`], queue outgoing messages
/// with [`Tx::publish`], then [`Tx::commit`]. Dropping it without committing
/// rolls everything back, messages included.
#[derive(Debug)]
pub struct Tx {
    conn: TxConn,
    outgoing: Vec<Outgoing>,
    store: Store,
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
        })
    }

    /// Records that `handler` processed message `id`. Returns `false` when
    /// it already had: the caller must then skip the message's effects (and
    /// may commit or drop the transaction; nothing changed).
    pub async fn mark_processed(&mut self, handler: &str, id: Uuid) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO skein_inbox (handler, message_id, processed_at) VALUES ($1, $2, $3) \
             ON CONFLICT (handler, message_id) DO NOTHING",
        )
        .bind(handler)
        .bind(id.to_string())
        .bind(crate::now_micros())
        .execute(&mut **self)
        .await
        .map_err(Error::query("cannot record the message in the inbox"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that `handler` processed each message of `ids`, in one
    /// statement, and returns those it had not processed before: only their
    /// effects may be applied.
    pub async fn mark_processed_many(
        &mut self,
        handler: &str,
        ids: &[Uuid],
    ) -> Result<HashSet<Uuid>> {
        let mut seen = HashSet::with_capacity(ids.len());
        let ids: Vec<Uuid> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
        let mut fresh = HashSet::with_capacity(ids.len());
        let now = crate::now_micros();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut sql =
                String::from("INSERT INTO skein_inbox (handler, message_id, processed_at) VALUES ");
            push_placeholders(&mut sql, chunk.len(), 3);
            sql.push_str(" ON CONFLICT (handler, message_id) DO NOTHING RETURNING message_id");
            let mut query = sqlx::query_scalar::<_, String>(&sql);
            for id in chunk {
                query = query.bind(handler).bind(id.to_string()).bind(now);
            }
            let inserted = query
                .fetch_all(&mut **self)
                .await
                .map_err(Error::query("cannot record the messages in the inbox"))?;
            for id in inserted {
                let id = Uuid::parse_str(&id).map_err(|e| Error::CorruptRow {
                    id: id.clone(),
                    reason: format!("inbox message id: {e}"),
                })?;
                fresh.insert(id);
            }
        }
        Ok(fresh)
    }

    /// Queues `envelope` for publication once this transaction commits.
    pub fn publish(&mut self, envelope: &Envelope) {
        self.outgoing.push(Outgoing::from(envelope));
    }

    /// Queues an arbitrary message (its headers must carry `Nats-Msg-Id`).
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
        if has_messages {
            let now = crate::now_micros();
            let mut rows = Vec::with_capacity(self.outgoing.len());
            for message in std::mem::take(&mut self.outgoing) {
                rows.push(OutboxRow::of(message)?);
            }
            // One statement per chunk of rows. Rows of one statement take
            // their `seq` in the order they are listed.
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut sql = String::from(
                    "INSERT INTO skein_outbox (id, subject, headers, payload, created_at) VALUES ",
                );
                push_placeholders(&mut sql, chunk.len(), 5);
                let mut query = sqlx::query(&sql);
                for row in chunk {
                    query = query
                        .bind(row.id.as_str())
                        .bind(row.subject.as_str())
                        .bind(row.headers.as_str())
                        .bind(row.payload.as_slice())
                        .bind(now);
                }
                query
                    .execute(&mut *self)
                    .await
                    .map_err(Error::query("cannot write to the outbox"))?;
            }
            if self.store.backend() == Backend::Postgres {
                // Delivered to LISTENing relays when (and only if) we commit.
                sqlx::query("NOTIFY skein_outbox")
                    .execute(&mut *self)
                    .await
                    .map_err(Error::query("cannot notify the relay"))?;
            }
        }
        match self.conn {
            TxConn::Sqlite(mut turn) => turn.commit().await,
            TxConn::Postgres(tx) => tx.commit().await,
        }
        .map_err(Error::query("cannot commit"))?;
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

/// An outgoing message as an outbox row.
struct OutboxRow {
    id: String,
    subject: String,
    headers: String,
    payload: Vec<u8>,
}

impl OutboxRow {
    fn of(message: Outgoing) -> Result<Self> {
        let id = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| Uuid::now_v7().to_string());
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
