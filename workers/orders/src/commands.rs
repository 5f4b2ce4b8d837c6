//! The orders' commands: place, confirm, reject, cancel, mark cancelled.
//!
//! Every handler runs in the inbox's transaction: the order's change and the
//! event announcing it commit together, and a redelivered command does not
//! run twice. Saga commands (`confirm_order`, `reject_order`,
//! `mark_cancelled`) arrive late or twice in normal operation, so on an order
//! that is no longer in the state they expect they change nothing and say so
//! in the log; they never flip a final order. A repeat of one on an order
//! it already moved (a saga's resend, `skein saga retry`) is answered again
//! with the event it answered first, as every service answers a saga's
//! repeated command: the first answer may be what the saga lost.

use skein_bus::{Delivery, HandlerError};
use skein_contracts::orders::{
    CancelOrder, ConfirmOrder, MarkCancelled, OrderCancellationRequested, OrderCancelled,
    OrderConfirmed, OrderLine, OrderPlaced, OrderRejected, OrderStatus, PlaceOrder, RejectOrder,
};
use skein_contracts::validate::{describe, Validate};
use skein_message::{Envelope, Event, MessageContext};
use skein_outbox::{now_micros, Tx};
use uuid::Uuid;

use crate::store::{self, StoredOrder};
use crate::NAME;

/// Deliveries of a `place_order` whose customer or products are not in the
/// replicas yet before the order is rejected: the `user_registered` or
/// `product_added` event may still be on its way (the replicas and the
/// commands are different consumers, with no order between them). With the
/// consumer's default backoff the first seven wait 0.1 + 0.2 + 0.4 + 0.8 +
/// 1.6 + 3.2 + 5 s: about 11 s for the replica to catch up, leaving two of
/// the ten deliveries for other transient failures. (3 deliveries, 0.3 s,
/// were too few for a replica consumer a moment behind; 6, about 3 s, too
/// few for a producer's relay cut off from NATS for a few seconds: a new
/// customer's first order, or an order of a product just added, was
/// rejected for good, and a retry with its Idempotency-Key got the same
/// rejection back.)
pub const REPLICA_GRACE_DELIVERIES: u64 = 8;

/// Handles `commands.orders.*`.
#[derive(Debug)]
pub struct Commands;

impl skein_outbox::TxHandler for Commands {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = &delivery.envelope;
        let context = envelope.context();
        if envelope.is::<PlaceOrder>() {
            place(tx, envelope.decode()?, delivery.info.delivered, &context).await
        } else if envelope.is::<ConfirmOrder>() {
            confirm(tx, envelope.decode()?, &context).await
        } else if envelope.is::<RejectOrder>() {
            reject(tx, envelope.decode()?, &context).await
        } else if envelope.is::<CancelOrder>() {
            cancel(tx, envelope.decode()?, delivery.info.delivered, &context).await
        } else if envelope.is::<MarkCancelled>() {
            mark_cancelled(tx, envelope.decode()?, &context).await
        } else {
            Err(HandlerError::permanent(format!(
                "orders has no command {}",
                envelope.kind
            )))
        }
    }
}

fn db(e: sqlx::Error) -> HandlerError {
    HandlerError::transient(format!("database: {e}"))
}

fn emit<E: Event>(tx: &mut Tx, event: &E, context: &MessageContext) -> Result<(), HandlerError> {
    tx.publish(&Envelope::event(NAME, event, context)?);
    Ok(())
}

/// The order a saga or customer command is about; an unknown order is a
/// permanent error (nothing can make it appear later: `place_order` for it
/// ran before, in the same lane).
async fn existing(tx: &mut Tx, id: Uuid, command: &str) -> Result<StoredOrder, HandlerError> {
    store::order(tx, id)
        .await
        .map_err(db)?
        .ok_or_else(|| HandlerError::permanent(format!("{command}: no order {id}")))
}

/// Another copy changed the order between our read and our write: run again.
fn changed_meanwhile(id: Uuid) -> HandlerError {
    HandlerError::transient(format!("order {id} changed meanwhile; retrying"))
}

async fn place(
    tx: &mut Tx,
    command: PlaceOrder,
    delivered: u64,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    if let Err(violations) = command.validate() {
        return Err(HandlerError::permanent(format!(
            "invalid place_order: {}",
            describe(&violations)
        )));
    }
    let id = command.order_id;
    if let Some(existing) = store::order(tx, id).await.map_err(db)? {
        tracing::info!(
            order = %id,
            status = existing.status.as_str(),
            "order already placed; ignoring the repeated place_order"
        );
        return Ok(());
    }

    let known_customer = store::customer_role(tx, command.customer_id)
        .await
        .map_err(db)?
        .is_some();
    let product_ids: Vec<Uuid> = command.lines.iter().map(|l| l.product_id).collect();
    let prices = store::prices(tx, &product_ids).await.map_err(db)?;
    let unknown_products: Vec<Uuid> = product_ids
        .iter()
        .copied()
        .filter(|p| !prices.contains_key(p))
        .collect();
    let mut reasons = Vec::new();
    if !known_customer {
        reasons.push(format!("unknown customer {}", command.customer_id));
    }
    if !unknown_products.is_empty() {
        let ids: Vec<String> = unknown_products.iter().map(Uuid::to_string).collect();
        reasons.push(format!(
            "unknown product{} {}",
            if ids.len() == 1 { "" } else { "s" },
            ids.join(", ")
        ));
    }
    let reason = (!reasons.is_empty()).then(|| reasons.join("; "));
    if let Some(reason) = &reason {
        if delivered < REPLICA_GRACE_DELIVERIES {
            return Err(HandlerError::transient(format!(
                "order {id}: {reason} (not replicated yet? delivery {delivered} of {REPLICA_GRACE_DELIVERIES})"
            )));
        }
    }
    // Unknown products are priced 0: the lines still say what was asked for.
    let lines: Vec<OrderLine> = command
        .lines
        .iter()
        .map(|l| OrderLine {
            product_id: l.product_id,
            quantity: l.quantity,
            unit_price_cents: prices.get(&l.product_id).copied().unwrap_or(0),
        })
        .collect();
    let total_cents = lines
        .iter()
        .try_fold(0_i64, |sum, l| {
            l.quantity
                .checked_mul(l.unit_price_cents)
                .and_then(|line| sum.checked_add(line))
        })
        .ok_or_else(|| HandlerError::permanent(format!("order {id}: total overflows")))?;
    let now = now_micros();
    let order = StoredOrder {
        id,
        customer_id: command.customer_id,
        status: if reason.is_some() {
            OrderStatus::Rejected
        } else {
            OrderStatus::Pending
        },
        lines,
        total_cents,
        reason,
        cancel_requested_by: None,
        created_at: now,
        updated_at: now,
    };
    if !store::insert_order(tx, &order).await.map_err(db)? {
        tracing::info!(order = %id, "order placed meanwhile by another copy; ignoring");
        return Ok(());
    }
    match order.reason {
        Some(reason) => {
            tracing::info!(order = %id, %reason, "order rejected at placement");
            emit(
                tx,
                &OrderRejected {
                    order_id: id,
                    customer_id: order.customer_id,
                    reason,
                },
                context,
            )
        }
        None => emit(
            tx,
            &OrderPlaced {
                order_id: id,
                customer_id: order.customer_id,
                lines: order.lines,
                total_cents: order.total_cents,
            },
            context,
        ),
    }
}

async fn confirm(
    tx: &mut Tx,
    command: ConfirmOrder,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    let order = existing(tx, command.order_id, "confirm_order").await?;
    if order.status == OrderStatus::Confirmed {
        tracing::info!(order = %order.id, "confirm_order for a confirmed order; answering again");
        return emit(tx, &confirmed(&order), context);
    }
    if order.status != OrderStatus::Pending {
        tracing::info!(order = %order.id, status = order.status.as_str(), "confirm_order for an order that is not pending; nothing to do");
        return Ok(());
    }
    let Some(cancel_requested_by) = store::confirm(tx, order.id, now_micros())
        .await
        .map_err(db)?
    else {
        return Err(changed_meanwhile(order.id));
    };
    emit(tx, &confirmed(&order), context)?;
    if let Some(requested_by) = cancel_requested_by {
        // The cancellation was asked for while the order was pending but
        // came too late to stop its placement (the payment was already
        // authorized): ask again, now as a confirmed order's, which refunds
        // and releases.
        emit(
            tx,
            &OrderCancellationRequested {
                order_id: order.id,
                customer_id: order.customer_id,
                status: OrderStatus::Confirmed,
                requested_by,
            },
            context,
        )?;
    }
    Ok(())
}

async fn reject(
    tx: &mut Tx,
    command: RejectOrder,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    let order = existing(tx, command.order_id, "reject_order").await?;
    if order.status == OrderStatus::Rejected {
        tracing::info!(order = %order.id, "reject_order for a rejected order; answering again");
        let reason = order.reason.clone().unwrap_or(command.reason);
        return emit(tx, &rejected(&order, reason), context);
    }
    if order.status != OrderStatus::Pending {
        tracing::info!(order = %order.id, status = order.status.as_str(), reason = %command.reason, "reject_order for an order that is not pending; nothing to do");
        return Ok(());
    }
    let moved = store::transition(
        tx,
        order.id,
        OrderStatus::Pending,
        OrderStatus::Rejected,
        Some(&command.reason),
        now_micros(),
    )
    .await
    .map_err(db)?;
    if !moved {
        return Err(changed_meanwhile(order.id));
    }
    emit(tx, &rejected(&order, command.reason), context)
}

async fn cancel(
    tx: &mut Tx,
    command: CancelOrder,
    delivered: u64,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    // A cancel can overtake its order's place_order (another copy has it,
    // or it waits for a replica): retried like a place_order waiting for
    // its replicas before an unknown order is a mistake.
    let Some(order) = store::order(tx, command.order_id).await.map_err(db)? else {
        let message = format!("cancel_order: no order {}", command.order_id);
        return Err(if delivered < REPLICA_GRACE_DELIVERIES {
            HandlerError::transient(format!(
                "{message} (not placed yet? delivery {delivered} of {REPLICA_GRACE_DELIVERIES})"
            ))
        } else {
            HandlerError::permanent(message)
        });
    };
    let caller = &command.caller;
    if !caller.may_access(order.customer_id) {
        return Err(HandlerError::permanent(format!(
            "cancel_order: user {} may not cancel order {} of another customer",
            caller.user_id, order.id
        )));
    }
    match order.status {
        OrderStatus::Pending | OrderStatus::Confirmed => {}
        OrderStatus::Rejected | OrderStatus::Cancelled => {
            tracing::info!(order = %order.id, status = order.status.as_str(), "cancel_order for an order that is already final; nothing to do");
            return Ok(());
        }
    }
    if let Some(by) = order.cancel_requested_by {
        tracing::info!(order = %order.id, requested_by = %by, "cancellation already requested; nothing to do");
        return Ok(());
    }
    let opened =
        store::request_cancellation(tx, order.id, order.status, caller.user_id, now_micros())
            .await
            .map_err(db)?;
    if !opened {
        return Err(changed_meanwhile(order.id));
    }
    emit(
        tx,
        &OrderCancellationRequested {
            order_id: order.id,
            customer_id: order.customer_id,
            status: order.status,
            requested_by: caller.user_id,
        },
        context,
    )
}

async fn mark_cancelled(
    tx: &mut Tx,
    command: MarkCancelled,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    let order = existing(tx, command.order_id, "mark_cancelled").await?;
    match order.status {
        OrderStatus::Pending | OrderStatus::Confirmed => {}
        OrderStatus::Cancelled => {
            tracing::info!(order = %order.id, "mark_cancelled for a cancelled order; answering again");
            let reason = order.reason.clone().unwrap_or(command.reason);
            return emit(tx, &cancelled(&order, reason), context);
        }
        OrderStatus::Rejected => {
            tracing::warn!(order = %order.id, reason = %command.reason, "mark_cancelled for a rejected order; it stays rejected");
            return Ok(());
        }
    }
    if order.cancel_requested_by.is_none() {
        tracing::warn!(order = %order.id, "mark_cancelled without a cancellation request; cancelling anyway");
    }
    let moved = store::transition(
        tx,
        order.id,
        order.status,
        OrderStatus::Cancelled,
        Some(&command.reason),
        now_micros(),
    )
    .await
    .map_err(db)?;
    if !moved {
        return Err(changed_meanwhile(order.id));
    }
    emit(tx, &cancelled(&order, command.reason), context)
}

fn confirmed(order: &StoredOrder) -> OrderConfirmed {
    OrderConfirmed {
        order_id: order.id,
        customer_id: order.customer_id,
        total_cents: order.total_cents,
    }
}

fn rejected(order: &StoredOrder, reason: String) -> OrderRejected {
    OrderRejected {
        order_id: order.id,
        customer_id: order.customer_id,
        reason,
    }
}

fn cancelled(order: &StoredOrder, reason: String) -> OrderCancelled {
    OrderCancelled {
        order_id: order.id,
        customer_id: order.customer_id,
        reason,
    }
}
