//! The payments tables: one account per customer, one payment per order.
//!
//! Money only moves inside conditional statements
//! (`... WHERE balance_cents >= $1`, `... WHERE status = 'authorized'`), so
//! two copies handling
//! commands at the same time can neither overdraw an account nor refund an
//! order twice: on PostgreSQL the second statement waits for the first
//! transaction and re-checks its condition; on SQLite writers take turns.

use std::fmt;
use std::str::FromStr;

use skein_contracts::payments::LedgerTotals;
use skein_outbox::now_micros;
use sqlx::{AnyConnection, Row};
use uuid::Uuid;

/// Where an order's payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The amount was taken from the balance.
    Authorized,
    /// Nothing was taken; `reason` says why.
    Declined,
    /// The amount was taken and given back.
    Refunded,
    /// A refund arrived before any authorization: nothing was taken and a
    /// late authorization is declined.
    Voided,
}

impl Status {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Authorized => "authorized",
            Status::Declined => "declined",
            Status::Refunded => "refunded",
            Status::Voided => "voided",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "authorized" => Status::Authorized,
            "declined" => Status::Declined,
            "refunded" => Status::Refunded,
            "voided" => Status::Voided,
            other => return Err(format!("unknown payment status {other:?}")),
        })
    }
}

/// An order's payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// The paying customer (nil for a voided order: nobody asked to pay).
    pub customer_id: Uuid,
    /// The amount asked for (0 for a voided order).
    pub amount_cents: i64,
    /// Where it stands.
    pub status: Status,
    /// Why it was declined.
    pub reason: Option<String>,
    /// Balance right after the authorization.
    pub authorized_balance_cents: Option<i64>,
    /// Balance right after the refund.
    pub refunded_balance_cents: Option<i64>,
}

fn decode_error(e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

fn parse_uuid(s: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(s).map_err(decode_error)
}

/// Reads an order's payment.
pub async fn payment(
    conn: &mut AnyConnection,
    order: Uuid,
) -> Result<Option<Payment>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT customer_id, amount_cents, status, reason, authorized_balance_cents, refunded_balance_cents \
         FROM payments WHERE order_id = $1",
    )
    .bind(order.to_string())
    .fetch_optional(conn)
    .await?
    else {
        return Ok(None);
    };
    let customer: String = row.try_get("customer_id")?;
    let status: String = row.try_get("status")?;
    Ok(Some(Payment {
        customer_id: parse_uuid(&customer)?,
        amount_cents: row.try_get("amount_cents")?,
        status: status
            .parse()
            .map_err(|e: String| decode_error(std::io::Error::other(e)))?,
        reason: row.try_get("reason")?,
        authorized_balance_cents: row.try_get("authorized_balance_cents")?,
        refunded_balance_cents: row.try_get("refunded_balance_cents")?,
    }))
}

/// A customer's balance, `None` without an account.
pub async fn balance(conn: &mut AnyConnection, customer: Uuid) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query("SELECT balance_cents FROM accounts WHERE customer_id = $1")
        .bind(customer.to_string())
        .fetch_optional(conn)
        .await?
        .map(|r| r.try_get::<i64, _>("balance_cents"))
        .transpose()
}

/// Opens `customer`'s account with `starting_balance_cents`, once: returns
/// `false` when it was already open (nothing is granted twice).
pub async fn open_account(
    conn: &mut AnyConnection,
    customer: Uuid,
    starting_balance_cents: i64,
) -> Result<bool, sqlx::Error> {
    let opened = sqlx::query(
        "INSERT INTO accounts (customer_id, balance_cents, granted_cents, created_at) VALUES ($1, $2, $2, $3) \
         ON CONFLICT (customer_id) DO NOTHING",
    )
    .bind(customer.to_string())
    .bind(starting_balance_cents)
    .bind(now_micros())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(opened == 1)
}

/// Takes `amount_cents` from `customer`'s balance if it covers it; returns
/// the balance afterwards, `None` when it is short (nothing taken).
pub async fn take(
    conn: &mut AnyConnection,
    customer: Uuid,
    amount_cents: i64,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query(
        "UPDATE accounts SET balance_cents = balance_cents - $1 \
         WHERE customer_id = $2 AND balance_cents >= $1 RETURNING balance_cents",
    )
    .bind(amount_cents)
    .bind(customer.to_string())
    .fetch_optional(conn)
    .await?
    .map(|r| r.try_get::<i64, _>("balance_cents"))
    .transpose()
}

/// Gives `amount_cents` back to `customer`; returns the balance afterwards
/// (`None` without an account).
pub async fn give_back(
    conn: &mut AnyConnection,
    customer: Uuid,
    amount_cents: i64,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query(
        "UPDATE accounts SET balance_cents = balance_cents + $1 WHERE customer_id = $2 RETURNING balance_cents",
    )
    .bind(amount_cents)
    .bind(customer.to_string())
    .fetch_optional(conn)
    .await?
    .map(|r| r.try_get::<i64, _>("balance_cents"))
    .transpose()
}

/// Records an order's first outcome. Fails with a unique violation when the
/// order already has one (a concurrent copy got there first).
pub async fn insert_payment(
    conn: &mut AnyConnection,
    order: Uuid,
    payment: &Payment,
    refund_reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments (order_id, customer_id, amount_cents, status, reason, \
         authorized_balance_cents, refunded_balance_cents, refund_reason, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
    )
    .bind(order.to_string())
    .bind(payment.customer_id.to_string())
    .bind(payment.amount_cents)
    .bind(payment.status.as_str())
    .bind(payment.reason.as_deref())
    .bind(payment.authorized_balance_cents)
    .bind(payment.refunded_balance_cents)
    .bind(refund_reason)
    .bind(now_micros())
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves an authorized payment to refunded; `false` when it is not
/// authorized (any more): only one refund can win.
pub async fn claim_refund(
    conn: &mut AnyConnection,
    order: Uuid,
    refund_reason: &str,
) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query(
        "UPDATE payments SET status = 'refunded', refund_reason = $1, updated_at = $2 \
         WHERE order_id = $3 AND status = 'authorized'",
    )
    .bind(refund_reason)
    .bind(now_micros())
    .bind(order.to_string())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(claimed == 1)
}

/// Records the balance right after an order's refund.
pub async fn set_refunded_balance(
    conn: &mut AnyConnection,
    order: Uuid,
    balance_cents: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE payments SET refunded_balance_cents = $1 WHERE order_id = $2")
        .bind(balance_cents)
        .bind(order.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// The totals, read in one statement so that they come from one snapshot
/// (on PostgreSQL each statement of a read-committed transaction sees its
/// own): money in flight can never make them disagree.
pub async fn ledger(conn: &mut AnyConnection) -> Result<LedgerTotals, sqlx::Error> {
    // PostgreSQL sums BIGINT as NUMERIC: cast back so both backends answer BIGINT.
    let row = sqlx::query(
        "SELECT \
           (SELECT COUNT(*) FROM accounts) AS accounts, \
           (SELECT CAST(COALESCE(SUM(balance_cents), 0) AS BIGINT) FROM accounts) AS balances, \
           (SELECT CAST(COALESCE(SUM(granted_cents), 0) AS BIGINT) FROM accounts) AS granted, \
           (SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM payments WHERE status = 'authorized') AS captured",
    )
    .fetch_one(conn)
    .await?;
    Ok(LedgerTotals {
        accounts: row.try_get("accounts")?,
        balances_cents: row.try_get("balances")?,
        captured_cents: row.try_get("captured")?,
        granted_cents: row.try_get("granted")?,
    })
}
