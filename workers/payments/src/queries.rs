//! The payments queries: an account, the ledger.

use skein_contracts::payments::{Account, GetAccount, Ledger, LedgerTotals};
use skein_contracts::ServiceError;
use skein_outbox::Store;
use skein_service::Host;

use crate::store;

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

/// A customer's account: the customer themselves or an admin; 404 without
/// an account (admins, or a registration not seen yet).
async fn account(store: Store, q: GetAccount) -> Result<Account, ServiceError> {
    if !q.caller.may_access(q.customer_id) {
        return Err(ServiceError::forbidden("you may only see your own account"));
    }
    let mut conn = store.pool().acquire().await.map_err(internal)?;
    let balance_cents = store::balance(&mut conn, q.customer_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            ServiceError::not_found(format!("no account for customer {}", q.customer_id))
        })?;
    Ok(Account {
        customer_id: q.customer_id,
        balance_cents,
    })
}

async fn ledger(store: Store) -> Result<LedgerTotals, ServiceError> {
    let mut conn = store.pool().acquire().await.map_err(internal)?;
    store::ledger(&mut conn).await.map_err(internal)
}
