//! Opening accounts, authorizing and refunding.

use skein_bus::{Delivery, HandlerError};
use skein_contracts::identity::UserRegistered;
use skein_contracts::payments::{
    AuthorizePayment, PaymentAuthorized, PaymentDeclined, PaymentRefunded, RefundPayment,
};
use skein_contracts::Role;
use skein_message::{Envelope, Event, MessageContext};
use skein_outbox::{now_micros, Tx, TxHandler};
use sqlx::Row;
use uuid::Uuid;

use crate::{ProviderConfig, NAME};

fn db(e: sqlx::Error) -> HandlerError {
    HandlerError::transient(format!("database: {e}"))
}

fn emit<E: Event>(tx: &mut Tx, event: &E, context: &MessageContext) -> Result<(), HandlerError> {
    tx.publish(&Envelope::event(NAME, event, context)?);
    Ok(())
}

/// Opens an account for every registered customer.
#[derive(Debug)]
pub struct Accounts {
    /// Balance of a new account.
    pub starting_balance_cents: i64,
}

impl TxHandler for Accounts {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let user: UserRegistered = delivery.envelope.decode()?;
        if user.role != Role::Customer {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO accounts (customer_id, balance_cents, granted_cents, created_at) VALUES ($1, $2, $2, $3) \
             ON CONFLICT (customer_id) DO NOTHING",
        )
        .bind(user.user_id.to_string())
        .bind(self.starting_balance_cents)
        .bind(now_micros())
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }
}

/// Handles `commands.payments.*`.
#[derive(Debug)]
pub struct Commands {
    /// The simulated provider.
    pub provider: ProviderConfig,
}

impl TxHandler for Commands {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = &delivery.envelope;
        let context = envelope.context();
        if envelope.is::<AuthorizePayment>() {
            self.authorize(tx, envelope.decode()?, delivery.info.delivered, &context)
                .await
        } else if envelope.is::<RefundPayment>() {
            refund(tx, envelope.decode()?, &context).await
        } else {
            Err(HandlerError::permanent(format!(
                "payments has no command {}",
                envelope.kind
            )))
        }
    }
}

/// A stored payment.
struct Payment {
    customer_id: Uuid,
    amount_cents: i64,
    status: String,
    reason: Option<String>,
}

async fn payment(tx: &mut Tx, order: Uuid) -> Result<Option<Payment>, HandlerError> {
    let Some(row) = sqlx::query(
        "SELECT customer_id, amount_cents, status, reason FROM payments WHERE order_id = $1",
    )
    .bind(order.to_string())
    .fetch_optional(&mut **tx)
    .await
    .map_err(db)?
    else {
        return Ok(None);
    };
    let customer: String = row.try_get("customer_id").map_err(db)?;
    Ok(Some(Payment {
        customer_id: Uuid::parse_str(&customer)
            .map_err(|e| HandlerError::permanent(format!("stored customer id: {e}")))?,
        amount_cents: row.try_get("amount_cents").map_err(db)?,
        status: row.try_get("status").map_err(db)?,
        reason: row.try_get("reason").map_err(db)?,
    }))
}

async fn balance(tx: &mut Tx, customer: Uuid) -> Result<Option<i64>, HandlerError> {
    sqlx::query("SELECT balance_cents FROM accounts WHERE customer_id = $1")
        .bind(customer.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?
        .map(|r| r.try_get::<i64, _>("balance_cents"))
        .transpose()
        .map_err(db)
}

async fn record(
    tx: &mut Tx,
    c: &AuthorizePayment,
    status: &str,
    reason: Option<&str>,
) -> Result<(), HandlerError> {
    let now = now_micros();
    sqlx::query(
        "INSERT INTO payments (order_id, customer_id, amount_cents, status, reason, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6)",
    )
    .bind(c.order_id.to_string())
    .bind(c.customer_id.to_string())
    .bind(c.amount_cents)
    .bind(status)
    .bind(reason)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(db)?;
    Ok(())
}

/// Whether the simulated provider declines `order`: a stable draw per order.
fn provider_declines(order: Uuid, failure_rate: f64) -> bool {
    if failure_rate <= 0.0 {
        return false;
    }
    // The random bits of a UUIDv7 are its last 8 bytes.
    let bytes = order.as_bytes();
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&bytes[8..16]);
    let draw = (u64::from_le_bytes(tail) >> 11) as f64 / (1u64 << 53) as f64;
    draw < failure_rate.min(1.0)
}

impl Commands {
    async fn authorize(
        &self,
        tx: &mut Tx,
        c: AuthorizePayment,
        delivered: u64,
        context: &MessageContext,
    ) -> Result<(), HandlerError> {
        if c.amount_cents <= 0 {
            return Err(HandlerError::permanent(format!(
                "invalid authorize_payment: /amount_cents: must be positive, got {}",
                c.amount_cents
            )));
        }
        let declined = |reason: &str| PaymentDeclined {
            order_id: c.order_id,
            customer_id: c.customer_id,
            amount_cents: c.amount_cents,
            reason: reason.to_owned(),
        };
        // One payment per order: a repeated request answers with the first outcome.
        if let Some(existing) = payment(tx, c.order_id).await? {
            let balance_cents = balance(tx, existing.customer_id).await?.unwrap_or(0);
            return match existing.status.as_str() {
                "authorized" => emit(
                    tx,
                    &PaymentAuthorized {
                        order_id: c.order_id,
                        customer_id: existing.customer_id,
                        amount_cents: existing.amount_cents,
                        balance_cents,
                    },
                    context,
                ),
                "declined" => emit(
                    tx,
                    &declined(existing.reason.as_deref().unwrap_or("declined")),
                    context,
                ),
                other => {
                    tracing::info!(order = %c.order_id, status = other, "payment already {other}; not authorizing again");
                    Ok(())
                }
            };
        }
        if balance(tx, c.customer_id).await?.is_none() {
            // The customer's user_registered may still be on its way.
            if delivered < 3 {
                return Err(HandlerError::transient(format!(
                    "no account for customer {} yet",
                    c.customer_id
                )));
            }
            record(tx, &c, "declined", Some("unknown_account")).await?;
            return emit(tx, &declined("unknown_account"), context);
        }
        if provider_declines(c.order_id, self.provider.failure_rate) {
            record(tx, &c, "declined", Some("provider_declined")).await?;
            return emit(tx, &declined("provider_declined"), context);
        }
        let taken = sqlx::query(
            "UPDATE accounts SET balance_cents = balance_cents - $1 WHERE customer_id = $2 AND balance_cents >= $1",
        )
        .bind(c.amount_cents)
        .bind(c.customer_id.to_string())
        .execute(&mut **tx)
        .await
        .map_err(db)?
        .rows_affected();
        if taken == 0 {
            record(tx, &c, "declined", Some("insufficient_funds")).await?;
            return emit(tx, &declined("insufficient_funds"), context);
        }
        record(tx, &c, "authorized", None).await?;
        let balance_cents = balance(tx, c.customer_id).await?.unwrap_or(0);
        emit(
            tx,
            &PaymentAuthorized {
                order_id: c.order_id,
                customer_id: c.customer_id,
                amount_cents: c.amount_cents,
                balance_cents,
            },
            context,
        )
    }
}

async fn refund(
    tx: &mut Tx,
    c: RefundPayment,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    let existing = payment(tx, c.order_id).await?;
    let (customer_id, amount_cents) = match &existing {
        Some(p) if p.status == "authorized" => {
            sqlx::query(
                "UPDATE accounts SET balance_cents = balance_cents + $1 WHERE customer_id = $2",
            )
            .bind(p.amount_cents)
            .bind(p.customer_id.to_string())
            .execute(&mut **tx)
            .await
            .map_err(db)?;
            sqlx::query("UPDATE payments SET status = 'refunded', reason = $1, updated_at = $2 WHERE order_id = $3")
                .bind(&c.reason)
                .bind(now_micros())
                .bind(c.order_id.to_string())
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            (p.customer_id, p.amount_cents)
        }
        Some(p) if p.status == "refunded" => (p.customer_id, p.amount_cents),
        Some(p) => (p.customer_id, 0),
        None => (Uuid::nil(), 0),
    };
    let balance_cents = balance(tx, customer_id).await?.unwrap_or(0);
    emit(
        tx,
        &PaymentRefunded {
            order_id: c.order_id,
            customer_id,
            amount_cents,
            balance_cents,
        },
        context,
    )
}

#[cfg(test)]
mod tests {
    use super::provider_declines;

    #[test]
    fn the_provider_declines_about_the_configured_share_and_always_the_same_orders() {
        let orders: Vec<uuid::Uuid> = (0..2000).map(|_| uuid::Uuid::now_v7()).collect();
        let declined = orders
            .iter()
            .filter(|o| provider_declines(**o, 0.25))
            .count();
        assert!((350..650).contains(&declined), "{declined} of 2000 at 25%");
        assert!(orders
            .iter()
            .all(|o| provider_declines(*o, 0.25) == provider_declines(*o, 0.25)));
        assert!(orders.iter().all(|o| !provider_declines(*o, 0.0)));
        assert!(orders.iter().all(|o| provider_declines(*o, 1.0)));
    }
}
