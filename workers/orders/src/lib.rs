//! The orders worker: placing, confirming, rejecting and cancelling orders.
//!
//! # Contracts (see `skein_contracts::orders`)
//!
//! - events consumed: `catalog.product_added` and `identity.user_registered`
//!   build local replicas of products (id, sku, name, price) and customers
//!   (id, role): a service keeps the data it needs from others' events, so
//!   placing an order asks no other service;
//! - commands: `place_order` (idempotent by order id), `confirm_order` and
//!   `reject_order` (from pending only), `cancel_order` (owner or admin,
//!   while pending or confirmed), `mark_cancelled` (idempotent);
//! - events: `order_placed`, `order_confirmed`, `order_rejected`,
//!   `order_cancellation_requested`, `order_cancelled`;
//! - queries: `get_order` (owner or admin), `list_orders` (self or admin,
//!   newest first, by cursor).
//!
//! # Life of an order
//!
//! ```text
//!                confirm_order             cancel_order                mark_cancelled
//! place_order ─► pending ───────► confirmed ───────────► (request open) ───────────► cancelled
//!      │          │  │                                        ▲  order_cancellation_requested;
//!      │          │  └──────────────── cancel_order ──────────┘  the cancel saga compensates
//!      │    reject_order
//!      ▼          ▼
//!   rejected ◄────┘
//!   (unknown customer or products)
//! ```
//!
//! - An invalid `place_order` (no lines, a quantity outside 1..=10000, a
//!   product twice, more than 100 lines) is dead-lettered with the precise
//!   violations; nothing is stored.
//! - A customer or product missing from the replicas may only be late (the
//!   replicas and the commands are separate consumers): the command is
//!   redelivered (with the consumer's backoff) until its
//!   [`commands::REPLICA_GRACE_DELIVERIES`]th delivery, then the order is
//!   recorded `rejected` with a reason naming what is unknown, and
//!   `order_rejected` is announced (never `order_placed`).
//! - Saga commands that arrive late or twice change nothing on an order that
//!   left the state they expect, and say so in the log: a final order never
//!   flips.
//! - A cancellation keeps the order's status until the cancel-order saga
//!   has given back what the order holds and sends `mark_cancelled`; a
//!   second request while one is open is a no-op.
//!
//! # Layout
//!
//! - [`store`]: the tables and their queries.
//! - [`replicas`]: the event handler that keeps the replicas.
//! - [`commands`]: the command handler.
//! - [`queries`]: the query handlers and the list cursor.

pub mod commands;
pub mod queries;
pub mod replicas;
pub mod store;

use skein_bus::provision::{COMMANDS, EVENTS};
use skein_bus::{Bus, WorkerConfig};
use skein_contracts::{catalog, identity};
use skein_message::subject;
use skein_outbox::{Migration, Store};
use skein_service::{Consumers, Host, HostConfig};

/// The worker's name: its consumers, inbox and service name. A contract:
/// renaming it makes the worker consume `COMMANDS` and `EVENTS` again from
/// the start.
pub const NAME: &str = skein_contracts::orders::SERVICE;

/// The orders tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "orders, order lines, product and customer replicas",
    sqlite: include_str!("../migrations/0001_orders.sql"),
    postgres: include_str!("../migrations/0001_orders.sql"),
}];

/// The events the replicas are built from, as `EVENTS` subject filters.
pub fn replica_subjects() -> Vec<String> {
    vec![
        subject::event(catalog::SERVICE, "*", "product_added"),
        subject::event(identity::SERVICE, "*", "user_registered"),
    ]
}

/// Migrates the store and starts orders on `bus` with the default consumer
/// settings.
pub async fn start(bus: Bus, store: Store, config: HostConfig) -> skein_service::Result<Host> {
    start_with(bus, store, config, |_| {}).await
}

/// Like [`start`], with `tune` applied to both consumers' settings (the
/// replicas' on `EVENTS` and the commands' on `COMMANDS`), e.g. a shorter
/// backoff in tests.
pub async fn start_with(
    bus: Bus,
    store: Store,
    config: HostConfig,
    tune: impl Fn(&mut WorkerConfig),
) -> skein_service::Result<Host> {
    store.migrate(NAME, MIGRATIONS).await?;
    let mut host = Host::start(bus, store, config).await?;
    queries::register(&mut host).await?;
    bind_consumers(&mut host, tune).await?;
    Ok(host)
}

/// Binds the orders handlers: the replicas, from `EVENTS`, and the
/// commands, from `COMMANDS` (one durable consumer per stream, both named
/// after the worker), with `tune` applied to both. The live worker
/// ([`start_with`]) and `skein replay --into orders` both bind them here.
pub async fn bind_consumers<C: Consumers>(
    consumers: &mut C,
    tune: impl Fn(&mut WorkerConfig),
) -> skein_service::Result<()> {
    consumers
        .consume(EVENTS, replica_subjects(), replicas::Replicas, &tune)
        .await?;
    consumers
        .consume(
            COMMANDS,
            vec![subject::command(NAME, ">")],
            commands::Commands,
            &tune,
        )
        .await
}
