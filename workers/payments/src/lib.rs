//! The payments worker: customer accounts, authorizations and refunds.
//!
//! # Contracts (see `skein_contracts::payments`)
//!
//! - events consumed: `identity.user_registered` opens an account with the
//!   starting balance for every customer (admins get none);
//! - commands: `authorize_payment` (one payment per order: a repeated request
//!   answers with the first outcome), `refund_payment`;
//! - events: `payment_authorized`, `payment_declined` (`insufficient_funds`,
//!   `unknown_account`, `provider_declined`), `payment_refunded`;
//! - queries: `get_account` (self or admin), `ledger` (totals).
//!
//! Money is conserved: `sum(balance) + sum(authorized, not refunded) ==
//! sum(granted)`, which `ledger` reports.
//!
//! A refund for an order without an authorization (declined, or never seen)
//! still answers, with `payment_refunded` of amount 0 (and a nil customer id
//! when the order is unknown), so a compensating saga always hears back.
//!
//! A simulated provider ([`ProviderConfig`]) adds latency before each
//! authorization (outside the database transaction) and declines a
//! configurable share of orders, chosen by order id so a retried
//! authorization meets the same decision.
//!
//! # Layout
//!
//! - [`handlers`]: the account opener and the command handler.
//! - [`queries`]: the query handlers.

pub mod handlers;
pub mod queries;

use std::time::Duration;

use skein_bus::provision::{COMMANDS, EVENTS};
use skein_bus::{Bus, Delivery, Handler, HandlerError};
use skein_outbox::{Inbox, Migration, Store};
use skein_service::{Host, HostConfig};

/// The worker's name: its consumers, inbox and service. A contract.
pub const NAME: &str = skein_contracts::payments::SERVICE;

/// The payments tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "accounts and payments",
    sqlite: include_str!("../migrations/0001_payments.sql"),
    postgres: include_str!("../migrations/0001_payments.sql"),
}];

/// The simulated payment provider.
#[derive(Debug, Clone, Default)]
pub struct ProviderConfig {
    /// Time the provider takes to decide an authorization.
    pub latency: Duration,
    /// Share of orders the provider declines, 0.0 to 1.0.
    pub failure_rate: f64,
}

/// Payments settings.
#[derive(Debug, Clone)]
pub struct PaymentsConfig {
    /// Balance of a new customer's account, in cents.
    pub starting_balance_cents: i64,
    /// The simulated provider.
    pub provider: ProviderConfig,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            starting_balance_cents: 100_000,
            provider: ProviderConfig::default(),
        }
    }
}

/// Migrates the store and starts payments on `bus`.
pub async fn start(
    bus: Bus,
    store: Store,
    host: HostConfig,
    config: PaymentsConfig,
) -> skein_service::Result<Host> {
    if !(0.0..=1.0).contains(&config.provider.failure_rate) {
        tracing::warn!(
            rate = config.provider.failure_rate,
            "provider failure rate outside 0..1, clamping"
        );
    }
    store.migrate(NAME, MIGRATIONS).await?;
    let mut host = Host::start(bus, store, host).await?;
    queries::register(&mut host).await?;
    host.consume(
        EVENTS,
        vec![skein_message::subject::event(
            "identity",
            "*",
            "user_registered",
        )],
        handlers::Accounts {
            starting_balance_cents: config.starting_balance_cents,
        },
        |_| {},
    )
    .await?;
    let commands = host.inbox(handlers::Commands {
        provider: config.provider.clone(),
    });
    host.consume_handler(
        COMMANDS,
        vec![skein_message::subject::command(NAME, ">")],
        Provider {
            latency: config.provider.latency,
            inner: commands,
        },
        |_| {},
    )
    .await?;
    Ok(host)
}

/// Waits out the provider's latency before an authorization enters its
/// transaction, so a slow provider holds no database lock.
struct Provider {
    latency: Duration,
    inner: Inbox<handlers::Commands>,
}

impl Handler for Provider {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        if !self.latency.is_zero()
            && delivery
                .envelope
                .is::<skein_contracts::payments::AuthorizePayment>()
        {
            tokio::time::sleep(self.latency).await;
        }
        self.inner.handle(delivery).await
    }
}
