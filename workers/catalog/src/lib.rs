//! The catalog worker: products and stock.
//!
//! # Contracts (see `skein_contracts::catalog`)
//!
//! - queries: `add_product` and `restock` (admins), `list_products`, `get_product`;
//! - commands: `reserve_stock` (all lines or none, one reservation per
//!   order), `release_stock`, `commit_stock`;
//! - events: `product_added`, `restocked`, `stock_reserved`,
//!   `stock_rejected`, `stock_released`, `stock_committed`.
//!
//! Stock is conserved: for every product, `on_hand` only changes by restocks
//! and committed reservations, and `reserved` is the sum of the open
//! reservations' lines.
//!
//! # Layout
//!
//! - [`store`]: the tables and their queries.
//! - [`commands`]: the command handler (reserve, release, commit).
//! - [`queries`]: the query handlers.

pub mod commands;
pub mod queries;
pub mod store;

use skein_bus::{provision::COMMANDS, Bus};
use skein_outbox::{Migration, Store};
use skein_service::{Consumers, Host, HostConfig};

/// The worker's name: its consumer, inbox and service name. A contract.
pub const NAME: &str = skein_contracts::catalog::SERVICE;

/// The catalog's tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "products and reservations",
    sqlite: include_str!("../migrations/0001_catalog.sql"),
    postgres: include_str!("../migrations/0001_catalog.sql"),
}];

/// Migrates the store and starts the catalog on `bus`.
pub async fn start(bus: Bus, store: Store, config: HostConfig) -> skein_service::Result<Host> {
    store.migrate(NAME, MIGRATIONS).await?;
    let mut host = Host::start(bus, store.clone(), config).await?;
    queries::register(&mut host).await?;
    bind_consumers(&mut host).await?;
    Ok(host)
}

/// Binds the catalog's handlers: its commands, from `COMMANDS`. The live
/// worker ([`start`]) and `skein replay --into catalog` both bind them here.
pub async fn bind_consumers<C: Consumers>(consumers: &mut C) -> skein_service::Result<()> {
    consumers
        .consume(
            COMMANDS,
            vec![skein_message::subject::command(NAME, ">")],
            commands::Commands,
            |_| {},
        )
        .await
}
