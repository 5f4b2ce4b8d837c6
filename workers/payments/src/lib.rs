//! The payments worker: customer accounts, authorizations and refunds.
//!
//! # Contracts (see `skein_contracts::payments`)
//!
//! - events consumed: `identity.user_registered` opens an account with the
//!   starting balance for every customer, once (admins get none);
//! - commands: `authorize_payment`, `refund_payment`;
//! - events: `payment_authorized`, `payment_declined` (reasons in
//!   [`commands::reason`]), `payment_refunded`;
//! - queries: `get_account` (the customer or an admin; 404 without an
//!   account), `ledger` (totals).
//!
//! # Behaviour
//!
//! - Money is integer cents and is conserved: `sum(balances) + captured ==
//!   granted`, where captured is the sum of authorized, not refunded
//!   amounts; `ledger` reports the three figures from one snapshot.
//! - One payment per order. An authorization takes the amount when the
//!   balance covers it, else it is declined `insufficient_funds`; nothing
//!   is taken on a decline. The balance check and the debit are one
//!   conditional `UPDATE`, so concurrent authorizations never overdraw.
//! - A repeated `authorize_payment` for an order (a new message with the
//!   same order, customer and amount) answers with the first outcome, same
//!   figures, and charges nothing. One with a different customer or amount
//!   is dead-lettered: the order's payment is already decided.
//! - A customer without an account: their `user_registered` may still be on
//!   its way, so the authorization is retried (transient error) until its
//!   [`commands::ACCOUNT_WAIT_DELIVERIES`]th delivery, then declined
//!   `unknown_account`.
//! - A negative amount is dead-lettered with the reason; nothing changes
//!   (0 is a free order, authorized as it is).
//! - `refund_payment` gives an authorized amount back once and answers
//!   `payment_refunded`; a repeat answers with the same figures. Without an
//!   authorization it still answers, so a compensating saga always hears
//!   back: `payment_refunded` with `amount_cents` 0 and the customer's
//!   current balance (declined order), or with a nil customer and balance 0
//!   (order not seen yet). An order not seen yet is then *voided*: an
//!   authorization arriving after its refund (overtaken in a retry or a
//!   redelivery) is declined `voided` instead of taking money that nobody
//!   would give back.
//! - The simulated provider ([`ProviderConfig`], see [`provider`]) waits
//!   its latency outside the database transaction and declines a share of
//!   orders `provider_declined`, chosen by order id. It is asked after the
//!   account check and before the balance check.
//!
//! # Layout
//!
//! - [`store`]: the tables and their statements.
//! - [`accounts`]: opening accounts from `user_registered`.
//! - [`commands`]: the command handler (authorize, refund).
//! - [`provider`]: the simulated provider.
//! - [`queries`]: the query handlers.

pub mod accounts;
pub mod commands;
pub mod provider;
pub mod queries;
pub mod store;

pub use provider::ProviderConfig;

use skein_bus::provision::{COMMANDS, EVENTS};
use skein_bus::Bus;
use skein_contracts::identity::UserRegistered;
use skein_message::Contract;
use skein_outbox::{Migration, Store};
use skein_service::{Consumers, Host, HostConfig};

/// The worker's name: its consumers (on `EVENTS` and `COMMANDS`), inbox and
/// service name. A contract: renaming it makes the worker consume both
/// streams again from the start.
pub const NAME: &str = skein_contracts::payments::SERVICE;

/// The payments tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "accounts and payments",
        sqlite: include_str!("../migrations/0001_payments.sql"),
        postgres: include_str!("../migrations/0001_payments.sql"),
    },
    Migration {
        version: 2,
        description: "figures of each payment outcome",
        sqlite: include_str!("../migrations/0002_payment_outcomes.sql"),
        postgres: include_str!("../migrations/0002_payment_outcomes.sql"),
    },
];

/// Starting balance of a new account unless configured: 1,000.00.
pub const DEFAULT_STARTING_BALANCE_CENTS: i64 = 100_000;

/// Payments settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentsConfig {
    /// Balance of a new customer's account, in cents (default 100,000).
    pub starting_balance_cents: i64,
    /// The simulated provider.
    pub provider: ProviderConfig,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            starting_balance_cents: DEFAULT_STARTING_BALANCE_CENTS,
            provider: ProviderConfig::default(),
        }
    }
}

impl PaymentsConfig {
    /// Why this configuration is not usable, if it is not.
    pub fn validate(&self) -> Result<(), String> {
        if self.starting_balance_cents < 0 {
            return Err(format!(
                "the starting balance must not be negative, got {} cents",
                self.starting_balance_cents
            ));
        }
        self.provider.validate()
    }
}

/// Migrates the store and starts payments on `bus`.
///
/// Check `config` with [`PaymentsConfig::validate`] first: `start` only
/// warns about an invalid one and uses the nearest valid values.
pub async fn start(
    bus: Bus,
    store: Store,
    host: HostConfig,
    mut config: PaymentsConfig,
) -> skein_service::Result<Host> {
    if let Err(problem) = config.validate() {
        tracing::warn!("{problem}; using the nearest valid value");
        config.starting_balance_cents = config.starting_balance_cents.max(0);
    }
    store.migrate(NAME, MIGRATIONS).await?;
    let mut host = Host::start(bus, store, host).await?;
    queries::register(&mut host).await?;
    bind_consumers(&mut host, &config).await?;
    Ok(host)
}

/// Binds the payments handlers with `config`: accounts, from `EVENTS`, and
/// the commands behind the provider's latency, from `COMMANDS`. The live
/// worker ([`start`]) and `skein replay --into payments` both bind them
/// here.
pub async fn bind_consumers<C: Consumers>(
    consumers: &mut C,
    config: &PaymentsConfig,
) -> skein_service::Result<()> {
    consumers
        .consume(
            EVENTS,
            vec![skein_message::subject::event(
                UserRegistered::SERVICE,
                "*",
                UserRegistered::NAME,
            )],
            accounts::Accounts {
                starting_balance_cents: config.starting_balance_cents,
            },
            |_| {},
        )
        .await?;
    let commands = consumers.inbox(commands::Commands {
        provider: config.provider.clone(),
    });
    let store = consumers.store().clone();
    consumers
        .consume_handler(
            COMMANDS,
            vec![skein_message::subject::command(NAME, ">")],
            provider::Latency {
                latency: config.provider.latency,
                store,
                inner: commands,
            },
            |_| {},
        )
        .await
}
