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
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
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

impl<H: TxHandler> Handler for Inbox<H> {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let mut tx = self.store.begin().await.map_err(HandlerError::transient)?;
        let first = tx
            .mark_processed(&self.name, delivery.envelope.id)
            .await
            .map_err(HandlerError::transient)?;
        if !first {
            tracing::debug!(id = %delivery.envelope.id, handler = %self.name, "already processed, skipping");
            return Ok(());
        }
        self.handler.handle(&mut tx, delivery).await?;
        tx.commit().await.map_err(HandlerError::transient)
    }
}
