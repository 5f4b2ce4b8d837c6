//! The payments queries: an account, the ledger.

use skein_contracts::payments::{Account, GetAccount, Ledger, LedgerTotals};
use skein_contracts::ServiceError;
use skein_outbox::Store;
use skein_service::Host;
use sqlx::Row;

fn internal(e: impl std::fmt::Display) -> ServiceError {
    tracing::error!(error = %e, "payments query failed");
    ServiceError::internal()
}

/// Registers every payments query on `host`.
pub async fn register(host: &mut Host) -> skein_service::Result<()> {
    let s = host.store().clone();
    host.query(move |q: GetAccount, _| account(s.clone(), q))
        .await?;
    let s = host.store().clone();
    host.query(move |_: Ledger, _| ledger(s.clone())).await?;
    Ok(())
}

async fn account(store: Store, q: GetAccount) -> Result<Account, ServiceError> {
    if !q.caller.may_access(q.customer_id) {
        return Err(ServiceError::forbidden("you may only see your own account"));
    }
    let row = sqlx::query("SELECT balance_cents FROM accounts WHERE customer_id = $1")
        .bind(q.customer_id.to_string())
        .fetch_optional(store.pool())
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            ServiceError::not_found(format!("no account for customer {}", q.customer_id))
        })?;
    Ok(Account {
        customer_id: q.customer_id,
        balance_cents: row.try_get("balance_cents").map_err(internal)?,
    })
}

async fn ledger(store: Store) -> Result<LedgerTotals, ServiceError> {
    // PostgreSQL sums BIGINT as NUMERIC: cast back so both backends answer BIGINT.
    let accounts = sqlx::query(
        "SELECT COUNT(*) AS accounts, CAST(COALESCE(SUM(balance_cents), 0) AS BIGINT) AS balances, \
         CAST(COALESCE(SUM(granted_cents), 0) AS BIGINT) AS granted FROM accounts",
    )
    .fetch_one(store.pool())
    .await
    .map_err(internal)?;
    let captured: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM payments WHERE status = 'authorized'",
    )
    .fetch_one(store.pool())
    .await
    .map_err(internal)?;
    Ok(LedgerTotals {
        accounts: accounts.try_get("accounts").map_err(internal)?,
        balances_cents: accounts.try_get("balances").map_err(internal)?,
        granted_cents: accounts.try_get("granted").map_err(internal)?,
        captured_cents: captured,
    })
}
