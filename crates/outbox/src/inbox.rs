//! The inbox: handlers that run once per message, in a transaction.
//!
//! [`Inbox`] adapts a [`TxHandler`] to the bus runtime's
//! [`skein_bus::Handler`]: for each delivery it begins a
//! transaction, records the message id for this handler (`skein_inbox`), runs
//! the handler, and commits the handler's changes, the inbox record and the
//! messages the handler queued, together. A message already recorded is
//! acknowledged without running the handler again: redeliveries, duplicate
//! publishes beyond the stream's duplicate window and replays have no effect.

use std::future::Future;

use skein_bus::{Delivery, Handler, HandlerError};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::Store;
use crate::tx::Tx;

/// A handler that runs inside a service transaction.
pub trait TxHandler: Send + Sync + 'static {
    /// Handles `delivery` using `tx`. Return an error to roll back; its kind
    /// decides between redelivery and dead-lettering.
    fn handle(
        &self,
        tx: &mut Tx,
        delivery: &Delivery,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + Send;
}

/// A [`TxHandler`] made idempotent by the inbox.
#[derive(Debug)]
pub struct Inbox<H> {
    store: Store,
    name: String,
    handler: H,
}

impl<H: TxHandler> Inbox<H> {
    /// Wraps `handler`, recording messages under `name` (by convention the
    /// worker's consumer name). The name is a contract: renaming it forgets
    /// what was processed.
    pub fn new(store: Store, name: impl Into<String>, handler: H) -> Self {
        Self {
            store,
            name: name.into(),
            handler,
        }
    }
}

/// What [`Inbox::process`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// The handler ran and its changes committed with the inbox record.
    Applied,
    /// The inbox already had the message: nothing ran, nothing changed.
    AlreadyProcessed,
}

impl<H: TxHandler> Inbox<H> {
    /// The inbox name (the worker's consumer name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the handler once for `delivery` and says whether it ran: the
    /// same as [`Handler::handle`], for callers that report what happened
    /// (`skein replay --into`).
    pub async fn process(&self, delivery: &Delivery) -> Result<Processed, HandlerError> {
        let mut tx = self.store.begin().await.map_err(HandlerError::transient)?;
        let first = tx
            .mark_processed(&self.name, delivery.envelope.id)
            .await
            .map_err(HandlerError::transient)?;
        if !first {
            tracing::debug!(id = %delivery.envelope.id, handler = %self.name, "already processed, skipping");
            return Ok(Processed::AlreadyProcessed);
        }
        self.handler.handle(&mut tx, delivery).await?;
        tx.commit().await.map_err(HandlerError::transient)?;
        Ok(Processed::Applied)
    }
}

impl<H: TxHandler> Handler for Inbox<H> {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        self.process(delivery).await.map(|_| ())
    }
}

/// Whether the inbox `name` in `store` has recorded message `id`, without
/// changing anything (a look, e.g. for a dry run: the answer may change as
/// soon as it is given).
pub async fn was_processed(store: &Store, name: &str, id: Uuid) -> Result<bool> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM skein_inbox WHERE handler = $1 AND message_id = $2")
            .bind(name)
            .bind(id.to_string())
            .fetch_optional(store.pool())
            .await
            .map_err(Error::query("cannot read the inbox"))?;
    Ok(found.is_some())
}
