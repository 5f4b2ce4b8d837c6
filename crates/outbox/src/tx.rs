//! A service transaction: state changes, inbox records and outgoing messages
//! commit together.

use std::ops::{Deref, DerefMut};

use skein_bus::Outgoing;
use skein_message::Envelope;
use sqlx::{Any, AnyConnection, Transaction};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{Backend, Store, WritePermit};

/// An open transaction on a service's [`Store`].
///
/// Use it as a connection (`&mut *tx`) for the handler's own queries, record
/// the handled message with [`Tx::mark_processed`], queue outgoing messages
/// with [`Tx::publish`], then [`Tx::commit`]. Dropping it without committing
/// rolls everything back, messages included.
#[derive(Debug)]
pub struct Tx {
    tx: Transaction<'static, Any>,
    outgoing: Vec<Outgoing>,
    store: Store,
    // Declared after `tx`: released after the transaction ends.
    _permit: WritePermit,
}

impl Tx {
    pub(crate) fn new(tx: Transaction<'static, Any>, store: Store, permit: WritePermit) -> Self {
        Self {
            tx,
            outgoing: Vec::new(),
            store,
            _permit: permit,
        }
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
        .execute(&mut *self.tx)
        .await
        .map_err(Error::query("cannot record the message in the inbox"))?;
        Ok(done.rows_affected() == 1)
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
            for message in std::mem::take(&mut self.outgoing) {
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
                sqlx::query(
                    "INSERT INTO skein_outbox (id, subject, headers, payload, created_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(message.subject)
                .bind(headers)
                .bind(message.payload.to_vec())
                .bind(now)
                .execute(&mut *self.tx)
                .await
                .map_err(Error::query("cannot write to the outbox"))?;
            }
            if self.store.backend() == Backend::Postgres {
                // Delivered to LISTENing relays when (and only if) we commit.
                sqlx::query("NOTIFY skein_outbox")
                    .execute(&mut *self.tx)
                    .await
                    .map_err(Error::query("cannot notify the relay"))?;
            }
        }
        self.tx
            .commit()
            .await
            .map_err(Error::query("cannot commit"))?;
        if has_messages {
            self.store.notify_committed();
        }
        Ok(())
    }

    /// Rolls back explicitly (dropping does the same).
    pub async fn rollback(self) -> Result<()> {
        self.tx
            .rollback()
            .await
            .map_err(Error::query("cannot roll back"))
    }
}

impl Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}
