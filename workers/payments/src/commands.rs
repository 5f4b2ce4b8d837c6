//! The payments commands: authorize and refund.
//!
//! Each order has at most one payment; every command about it answers with
//! an event, and a repeated command answers with the event it answered
//! first (same figures), so a saga that re-sends after a timeout learns the
//! real outcome and nobody is charged twice.

use skein_bus::{Delivery, HandlerError};
use skein_contracts::payments::{
    AuthorizePayment, PaymentAuthorized, PaymentDeclined, PaymentRefunded, RefundPayment,
};
use skein_message::{Envelope, Event, MessageContext};
use skein_outbox::{Tx, TxHandler};
use uuid::Uuid;

use crate::store::{self, Payment, Status};
use crate::{ProviderConfig, NAME};

/// Why an authorization was declined: the `reason` of `payment_declined`.
pub mod reason {
    /// The balance is smaller than the amount.
    pub const INSUFFICIENT_FUNDS: &str = "insufficient_funds";
    /// The customer has no account (after waiting for their registration).
    pub const UNKNOWN_ACCOUNT: &str = "unknown_account";
    /// The simulated provider said no.
    pub const PROVIDER_DECLINED: &str = "provider_declined";
    /// The order was refunded before its authorization arrived.
    pub const VOIDED: &str = "voided";
}

/// Deliveries of an authorization for a customer without an account before
/// it is declined with `unknown_account`: their `user_registered` may still
/// be on its way, so the first ones are retried (with the consumer's
/// backoff: about 3 s in all by default, as orders waits for its replicas;
/// well within the saga's 30 s for the step).
pub const ACCOUNT_WAIT_DELIVERIES: u64 = 6;

/// Handles `commands.payments.*`.
#[derive(Debug)]
pub struct Commands {
    /// The simulated provider's verdicts.
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

fn db(e: sqlx::Error) -> HandlerError {
    HandlerError::transient(format!("database: {e}"))
}

fn emit<E: Event>(tx: &mut Tx, event: &E, context: &MessageContext) -> Result<(), HandlerError> {
    tx.publish(&Envelope::event(NAME, event, context)?);
    Ok(())
}

impl Commands {
    async fn authorize(
        &self,
        tx: &mut Tx,
        c: AuthorizePayment,
        delivered: u64,
        context: &MessageContext,
    ) -> Result<(), HandlerError> {
        if c.amount_cents < 0 {
            return Err(HandlerError::permanent(format!(
                "invalid authorize_payment for order {}: /amount_cents: must be at least 0, got {}",
                c.order_id, c.amount_cents
            )));
        }
        if let Some(first) = store::payment(tx, c.order_id).await.map_err(db)? {
            return answer_again(tx, &c, first, context).await;
        }
        // The common case first: take the money in one statement, and only
        // when that takes nothing find out why (no account yet, or short).
        // Nothing to take (free products): no provider to ask.
        let provider_declines = c.amount_cents > 0 && self.provider.declines(c.order_id);
        let taken = if provider_declines {
            None
        } else {
            store::take(tx, c.customer_id, c.amount_cents)
                .await
                .map_err(db)?
        };
        let Some(balance_cents) = taken else {
            if store::balance(tx, c.customer_id)
                .await
                .map_err(db)?
                .is_none()
            {
                if delivered < ACCOUNT_WAIT_DELIVERIES {
                    return Err(HandlerError::transient(format!(
                        "no account for customer {} yet (delivery {delivered} of {ACCOUNT_WAIT_DELIVERIES} before declining)",
                        c.customer_id
                    )));
                }
                return decline(tx, &c, reason::UNKNOWN_ACCOUNT, context).await;
            }
            let why = if provider_declines {
                reason::PROVIDER_DECLINED
            } else {
                reason::INSUFFICIENT_FUNDS
            };
            return decline(tx, &c, why, context).await;
        };
        let payment = Payment {
            customer_id: c.customer_id,
            amount_cents: c.amount_cents,
            status: Status::Authorized,
            reason: None,
            authorized_balance_cents: Some(balance_cents),
            refunded_balance_cents: None,
        };
        store::insert_payment(tx, c.order_id, &payment, None)
            .await
            .map_err(db)?;
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

async fn decline(
    tx: &mut Tx,
    c: &AuthorizePayment,
    why: &str,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    let payment = Payment {
        customer_id: c.customer_id,
        amount_cents: c.amount_cents,
        status: Status::Declined,
        reason: Some(why.to_owned()),
        authorized_balance_cents: None,
        refunded_balance_cents: None,
    };
    store::insert_payment(tx, c.order_id, &payment, None)
        .await
        .map_err(db)?;
    emit(
        tx,
        &PaymentDeclined {
            order_id: c.order_id,
            customer_id: c.customer_id,
            amount_cents: c.amount_cents,
            reason: why.to_owned(),
        },
        context,
    )
}

/// Answers an authorization of an order that already has a payment.
async fn answer_again(
    tx: &mut Tx,
    c: &AuthorizePayment,
    first: Payment,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    if first.status == Status::Voided {
        // Refunded before it was authorized: never charge it now.
        return emit(
            tx,
            &PaymentDeclined {
                order_id: c.order_id,
                customer_id: c.customer_id,
                amount_cents: c.amount_cents,
                reason: reason::VOIDED.to_owned(),
            },
            context,
        );
    }
    if (first.customer_id, first.amount_cents) != (c.customer_id, c.amount_cents) {
        // Answering with the first outcome would tell the sender that an
        // amount it did not ask for was (or was not) taken.
        return Err(HandlerError::permanent(format!(
            "authorize_payment for order {} asks {} cents from customer {}, but the order's payment \
             is already {} for {} cents from customer {}",
            c.order_id,
            c.amount_cents,
            c.customer_id,
            first.status,
            first.amount_cents,
            first.customer_id
        )));
    }
    match first.status {
        // A refunded payment was authorized first: that is the answer to
        // the authorization (its refund was announced on its own).
        Status::Authorized | Status::Refunded => {
            let balance_cents = match first.authorized_balance_cents {
                Some(b) => b,
                None => store::balance(tx, first.customer_id)
                    .await
                    .map_err(db)?
                    .unwrap_or(0),
            };
            emit(
                tx,
                &PaymentAuthorized {
                    order_id: c.order_id,
                    customer_id: first.customer_id,
                    amount_cents: first.amount_cents,
                    balance_cents,
                },
                context,
            )
        }
        Status::Declined | Status::Voided => emit(
            tx,
            &PaymentDeclined {
                order_id: c.order_id,
                customer_id: first.customer_id,
                amount_cents: first.amount_cents,
                reason: first.reason.unwrap_or_else(|| "declined".to_owned()),
            },
            context,
        ),
    }
}

async fn refund(
    tx: &mut Tx,
    c: RefundPayment,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    let order = c.order_id;
    let Some(p) = store::payment(tx, order).await.map_err(db)? else {
        // Not authorized yet: void the order so that an authorization still
        // on its way cannot take money that nobody would give back.
        let void = Payment {
            customer_id: Uuid::nil(),
            amount_cents: 0,
            status: Status::Voided,
            reason: None,
            authorized_balance_cents: None,
            refunded_balance_cents: Some(0),
        };
        store::insert_payment(tx, order, &void, Some(&c.reason))
            .await
            .map_err(db)?;
        return emit(tx, &refunded(order, Uuid::nil(), 0, 0), context);
    };
    let (amount_cents, balance_cents) = match p.status {
        Status::Authorized => {
            if !store::claim_refund(tx, order, &c.reason)
                .await
                .map_err(db)?
            {
                // Another copy refunded it between our read and our claim:
                // start again to answer with its figures.
                return Err(HandlerError::transient(format!(
                    "order {order} was refunded concurrently"
                )));
            }
            let balance = store::give_back(tx, p.customer_id, p.amount_cents)
                .await
                .map_err(db)?
                .ok_or_else(|| {
                    HandlerError::permanent(format!(
                        "order {order} was paid from account {} that no longer exists",
                        p.customer_id
                    ))
                })?;
            store::set_refunded_balance(tx, order, balance)
                .await
                .map_err(db)?;
            (p.amount_cents, balance)
        }
        Status::Refunded => match p.refunded_balance_cents {
            Some(balance) => (p.amount_cents, balance),
            None => (p.amount_cents, current_balance(tx, p.customer_id).await?),
        },
        // Nothing was taken, nothing to give back.
        Status::Declined => (0, current_balance(tx, p.customer_id).await?),
        Status::Voided => (0, 0),
    };
    emit(
        tx,
        &refunded(order, p.customer_id, amount_cents, balance_cents),
        context,
    )
}

fn refunded(
    order_id: Uuid,
    customer_id: Uuid,
    amount_cents: i64,
    balance_cents: i64,
) -> PaymentRefunded {
    PaymentRefunded {
        order_id,
        customer_id,
        amount_cents,
        balance_cents,
    }
}

async fn current_balance(tx: &mut Tx, customer: Uuid) -> Result<i64, HandlerError> {
    Ok(store::balance(tx, customer).await.map_err(db)?.unwrap_or(0))
}
