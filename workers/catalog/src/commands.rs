//! The catalog's commands: reserve, release and commit stock.

use skein_bus::{Delivery, HandlerError};
use skein_contracts::catalog::{
    CommitStock, RejectedLine, ReleaseStock, ReserveStock, StockCommitted, StockLine,
    StockRejected, StockReleased, StockReserved,
};
use skein_contracts::validate::{describe, Validate};
use skein_message::{Envelope, Event, MessageContext};
use skein_outbox::{now_micros, Tx};
use sqlx::Row;

use crate::store;
use crate::NAME;

/// Handles `commands.catalog.*`.
#[derive(Debug)]
pub struct Commands;

impl skein_outbox::TxHandler for Commands {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = &delivery.envelope;
        let context = envelope.context();
        if envelope.is::<ReserveStock>() {
            reserve(tx, envelope.decode()?, &context).await
        } else if envelope.is::<ReleaseStock>() {
            release(tx, envelope.decode()?, &context).await
        } else if envelope.is::<CommitStock>() {
            commit(tx, envelope.decode()?, &context).await
        } else {
            Err(HandlerError::permanent(format!(
                "catalog has no command {}",
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

async fn reserve(
    tx: &mut Tx,
    command: ReserveStock,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    if let Err(violations) = command.validate() {
        return Err(HandlerError::permanent(format!(
            "invalid reserve_stock: {}",
            describe(&violations)
        )));
    }
    let order = command.order_id;
    // One reservation per order: a repeated request answers with the first outcome.
    if let Some(existing) = store::reservation(tx, order).await.map_err(db)? {
        match existing.status.as_str() {
            "reserved" => emit(
                tx,
                &StockReserved {
                    order_id: order,
                    lines: existing.lines,
                },
                context,
            )?,
            "rejected" => {
                let rejected: StockRejected =
                    serde_json::from_str(&existing.outcome).map_err(|e| {
                        HandlerError::permanent(format!("stored outcome unreadable: {e}"))
                    })?;
                emit(tx, &rejected, context)?;
            }
            other => {
                tracing::info!(%order, status = other, "reservation already {other}; not reserving again")
            }
        }
        return Ok(());
    }

    // Lock products in a fixed order so concurrent reservations cannot deadlock.
    let mut lines = command.lines.clone();
    lines.sort_by_key(|l| l.product_id);
    sqlx::query("SAVEPOINT reserve")
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    let mut rejected = Vec::new();
    for line in &lines {
        let taken = sqlx::query(
            "UPDATE products SET reserved = reserved + $1 WHERE id = $2 AND on_hand - reserved >= $1",
        )
        .bind(line.quantity)
        .bind(line.product_id.to_string())
        .execute(&mut **tx)
        .await
        .map_err(db)?
        .rows_affected();
        if taken == 1 {
            continue;
        }
        let available: Option<i64> =
            sqlx::query("SELECT on_hand - reserved AS available FROM products WHERE id = $1")
                .bind(line.product_id.to_string())
                .fetch_optional(&mut **tx)
                .await
                .map_err(db)?
                .map(|r| r.try_get("available"))
                .transpose()
                .map_err(db)?;
        rejected.push(RejectedLine {
            product_id: line.product_id,
            requested: line.quantity,
            available: available.unwrap_or(0),
            reason: if available.is_some() {
                "insufficient_stock"
            } else {
                "unknown_product"
            }
            .into(),
        });
    }
    let now = now_micros();
    if rejected.is_empty() {
        sqlx::query("RELEASE SAVEPOINT reserve")
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        let event = StockReserved {
            order_id: order,
            lines: lines.clone(),
        };
        record(tx, &event.order_id.to_string(), "reserved", &event, now).await?;
        for line in &lines {
            sqlx::query("INSERT INTO reservation_lines (order_id, product_id, quantity) VALUES ($1, $2, $3)")
                .bind(order.to_string())
                .bind(line.product_id.to_string())
                .bind(line.quantity)
                .execute(&mut **tx)
                .await
                .map_err(db)?;
        }
        emit(tx, &event, context)
    } else {
        sqlx::query("ROLLBACK TO SAVEPOINT reserve")
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        sqlx::query("RELEASE SAVEPOINT reserve")
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        let event = StockRejected {
            order_id: order,
            lines: rejected,
        };
        record(tx, &order.to_string(), "rejected", &event, now).await?;
        emit(tx, &event, context)
    }
}

async fn record(
    tx: &mut Tx,
    order: &str,
    status: &str,
    outcome: &impl serde::Serialize,
    now: i64,
) -> Result<(), HandlerError> {
    let outcome =
        serde_json::to_string(outcome).map_err(|e| HandlerError::permanent(e.to_string()))?;
    sqlx::query(
        "INSERT INTO reservations (order_id, status, outcome, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
    )
    .bind(order)
    .bind(status)
    .bind(outcome)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(db)?;
    Ok(())
}

/// Moves the reservation of `order` from `from` to `to`; false when it is
/// not (or no longer) `from`. The stock moves only after this succeeds: two
/// copies handling a release (or commit) of one order at once both read
/// `reserved`, and on PostgreSQL the second waits for the first's row lock
/// and then finds the status changed, instead of moving the stock twice.
async fn claim(tx: &mut Tx, order: &str, from: &str, to: &str) -> Result<bool, HandlerError> {
    let moved = sqlx::query(
        "UPDATE reservations SET status = $1, updated_at = $2 WHERE order_id = $3 AND status = $4",
    )
    .bind(to)
    .bind(now_micros())
    .bind(order)
    .bind(from)
    .execute(&mut **tx)
    .await
    .map_err(db)?
    .rows_affected();
    Ok(moved == 1)
}

async fn release(
    tx: &mut Tx,
    command: ReleaseStock,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    let order = command.order_id;
    let existing = store::reservation(tx, order).await.map_err(db)?;
    let lines: Vec<StockLine> = match &existing {
        Some(r)
            if r.status == "reserved"
                && claim(tx, &order.to_string(), "reserved", "released").await? =>
        {
            r.lines.clone()
        }
        // Nothing held (rejected, already released or committed, or never
        // reserved, or released by another copy just now): releasing is a
        // no-op that still answers, so a saga compensating blindly always
        // hears back.
        Some(_) | None => Vec::new(),
    };
    if existing.is_none() {
        // Released before any reservation: the reservation may still be on
        // its way (its saga gave up waiting). Record the release so that a
        // late reserve_stock for this order holds nothing.
        let voided = StockReleased {
            order_id: order,
            lines: Vec::new(),
            reason: command.reason.clone(),
        };
        record(tx, &order.to_string(), "released", &voided, now_micros()).await?;
    }
    for line in &lines {
        sqlx::query("UPDATE products SET reserved = reserved - $1 WHERE id = $2")
            .bind(line.quantity)
            .bind(line.product_id.to_string())
            .execute(&mut **tx)
            .await
            .map_err(db)?;
    }
    emit(
        tx,
        &StockReleased {
            order_id: order,
            lines,
            reason: command.reason,
        },
        context,
    )
}

async fn commit(
    tx: &mut Tx,
    command: CommitStock,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    let order = command.order_id;
    let Some(existing) = store::reservation(tx, order).await.map_err(db)? else {
        return Err(HandlerError::permanent(format!(
            "commit_stock: order {order} has no reservation"
        )));
    };
    let status = if existing.status == "reserved"
        && !claim(tx, &order.to_string(), "reserved", "committed").await?
    {
        // Another copy moved it just now: answer as for that state.
        store::reservation(tx, order)
            .await
            .map_err(db)?
            .map_or_else(|| existing.status.clone(), |r| r.status)
    } else {
        existing.status.clone()
    };
    match status.as_str() {
        // Claimed above: the stock moves below.
        "reserved" => {}
        "committed" => return emit(tx, &StockCommitted { order_id: order }, context),
        other => {
            return Err(HandlerError::permanent(format!(
                "commit_stock: reservation of order {order} is {other}"
            )));
        }
    }
    for line in &existing.lines {
        sqlx::query(
            "UPDATE products SET reserved = reserved - $1, on_hand = on_hand - $1 WHERE id = $2",
        )
        .bind(line.quantity)
        .bind(line.product_id.to_string())
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    }
    emit(tx, &StockCommitted { order_id: order }, context)
}
