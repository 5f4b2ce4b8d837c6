//! The replicas of other services' data, built from their events.
//!
//! `catalog.product_added` gives the products (and their prices) an order
//! may name; `identity.user_registered` the customers who may place one.
//! Both are upserts, so a replay of `EVENTS` rebuilds the same replicas.

use skein_bus::{Delivery, HandlerError};
use skein_contracts::catalog::ProductAdded;
use skein_contracts::identity::UserRegistered;
use skein_outbox::{now_micros, Tx, TxHandler};

use crate::store::{self, ProductReplica};

/// Handles the events in [`crate::replica_subjects`].
#[derive(Debug)]
pub struct Replicas;

impl TxHandler for Replicas {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = &delivery.envelope;
        let db = |e: sqlx::Error| HandlerError::transient(format!("database: {e}"));
        if envelope.is::<ProductAdded>() {
            let event: ProductAdded = envelope.decode()?;
            let product = ProductReplica {
                id: event.product_id,
                sku: event.sku,
                name: event.name,
                price_cents: event.price_cents,
            };
            store::upsert_product(tx, &product, now_micros())
                .await
                .map_err(db)?;
            tracing::debug!(product = %product.id, price_cents = product.price_cents, "product replicated");
        } else if envelope.is::<UserRegistered>() {
            let event: UserRegistered = envelope.decode()?;
            store::upsert_customer(tx, event.user_id, event.role, now_micros())
                .await
                .map_err(db)?;
            tracing::debug!(customer = %event.user_id, "customer replicated");
        } else {
            // Only the replica subjects reach this consumer; anything else is
            // not ours to keep.
            tracing::debug!(kind = %envelope.kind, "event ignored by the replicas");
        }
        Ok(())
    }
}
