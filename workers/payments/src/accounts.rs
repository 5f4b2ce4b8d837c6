//! Opening accounts from identity's `user_registered`.

use skein_bus::{Delivery, HandlerError};
use skein_contracts::identity::UserRegistered;
use skein_contracts::Role;
use skein_outbox::{Tx, TxHandler};

use crate::store;

/// Opens an account with the starting balance for every registered
/// customer, once per customer (a replayed or re-published event grants
/// nothing twice). Admins get no account.
#[derive(Debug)]
pub struct Accounts {
    /// Balance of a new account, in cents.
    pub starting_balance_cents: i64,
}

impl TxHandler for Accounts {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        // The consumer only takes user_registered; a version this build
        // cannot upcast is dead-lettered by the decode error.
        let user: UserRegistered = delivery.envelope.decode()?;
        if user.role != Role::Customer {
            return Ok(());
        }
        let opened = store::open_account(tx, user.user_id, self.starting_balance_cents)
            .await
            .map_err(|e| HandlerError::transient(format!("database: {e}")))?;
        if opened {
            tracing::info!(customer = %user.user_id, balance_cents = self.starting_balance_cents, "account opened");
        }
        Ok(())
    }
}
