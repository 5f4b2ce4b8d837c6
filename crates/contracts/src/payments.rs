//! payments: customer accounts, authorizations and refunds.
//!
//! Every registered customer gets an account with a starting balance. An
//! authorization for an order takes the amount from the balance (declined
//! when it is short); a refund gives it back. Both are idempotent per order.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Caller;

/// The service name.
pub const SERVICE: &str = "payments";

/// Takes an order's amount from the customer's balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizePayment {
    /// The order; a second authorization for it answers with the first outcome.
    pub order_id: Uuid,
    /// The paying customer.
    pub customer_id: Uuid,
    /// Amount in cents; 0 for an order of free products.
    #[validate(range(min = 0))]
    pub amount_cents: i64,
}
contract!(command AuthorizePayment, "payments", "authorize_payment", v 1, entity = order_id);

/// Gives an order's authorized amount back. Always answered with
/// `payment_refunded`: amount 0 without an authorization, and an order not
/// authorized yet is voided, so a later authorization of it is declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundPayment {
    /// The order.
    pub order_id: Uuid,
    /// Why, for the record.
    pub reason: String,
}
contract!(command RefundPayment, "payments", "refund_payment", v 1, entity = order_id);

/// The amount was taken from the balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PaymentAuthorized {
    /// The order.
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Amount in cents.
    pub amount_cents: i64,
    /// Balance afterwards.
    pub balance_cents: i64,
}
contract!(event PaymentAuthorized, "payments", "payment_authorized", v 1, entity = order_id);

/// The authorization was refused; nothing was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PaymentDeclined {
    /// The order.
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Amount asked for.
    pub amount_cents: i64,
    /// `insufficient_funds`, `unknown_account`, `provider_declined` or
    /// `voided` (the order was refunded before this authorization arrived).
    pub reason: String,
}
contract!(event PaymentDeclined, "payments", "payment_declined", v 1, entity = order_id);

/// An order's refund was handled: its authorized amount was given back, or
/// there was nothing to give back (amount 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: Uuid,
    /// The customer (nil when the order had no payment).
    pub customer_id: Uuid,
    /// Amount given back in cents, 0 when nothing was authorized.
    pub amount_cents: i64,
    /// Balance afterwards.
    pub balance_cents: i64,
}
contract!(event PaymentRefunded, "payments", "payment_refunded", v 1, entity = order_id);

/// A customer's account (self or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetAccount {
    /// Who asks.
    pub caller: Caller,
    /// The customer.
    pub customer_id: Uuid,
}
contract!(query GetAccount, "payments", "get_account", v 1, reply = Account);

/// A customer's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Account {
    /// The customer.
    pub customer_id: Uuid,
    /// Balance in cents.
    pub balance_cents: i64,
}

/// The sum of every balance and every authorized amount: constant while
/// money only moves (for invariant checks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ledger {}
contract!(query Ledger, "payments", "ledger", v 1, reply = LedgerTotals);

/// Totals of the payments service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LedgerTotals {
    /// Accounts.
    pub accounts: i64,
    /// Sum of balances.
    pub balances_cents: i64,
    /// Sum of authorized, not refunded amounts.
    pub captured_cents: i64,
    /// Sum of starting balances granted.
    pub granted_cents: i64,
}
