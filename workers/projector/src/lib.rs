//! The projector worker: read models built only from events.
//!
//! # Contracts (see `skein_contracts::projector`)
//!
//! - events consumed (stream `EVENTS`, durable consumer `projector`, filters
//!   `events.identity.>` and `events.orders.>`): `identity.user_registered`
//!   builds the users; `orders.order_placed`, `order_confirmed`,
//!   `order_rejected` and `order_cancelled` build the orders; every
//!   `orders.*` event about an order (including
//!   `order_cancellation_requested`) goes to that order's timeline;
//! - queries: `dashboard` (admins), `profile` (the user or an admin),
//!   `timeline` (the order's owner or an admin; another customer's order is
//!   "not found", so existence does not leak).
//!
//! The projector emits nothing.
//!
//! # Read models and rebuilds
//!
//! Three read models, each in its own table: [`ReadModel::Users`],
//! [`ReadModel::Orders`] and [`ReadModel::Timeline`]. Every projection is an
//! idempotent upsert keyed by entity or event id, and an order's status only
//! moves forward (pending, then confirmed or rejected, then cancelled; ties
//! by stream sequence). A row is therefore a function of the *set* of events
//! applied: applying an event twice, or in another order, changes nothing.
//! This is what lets [`rebuild()`] clear a model and replay
//! the whole `EVENTS` stream while the live consumer keeps running, and end
//! with exactly what the incremental path built. An order's events may
//! arrive before its customer's `user_registered`: orders are stored by
//! customer id regardless and show in the profile once the user exists.
//!
//! # Layout
//!
//! - [`projection`]: applying one event to the read models, and the live
//!   handler that does it for the consumer.
//! - [`mod@rebuild`]: [`ReadModel`], rebuilding a model from the stream and
//!   reporting what changed.
//! - [`store`]: the tables: writes, reads and the canonical [`Snapshot`].
//! - [`queries`]: the query handlers.

pub mod projection;
pub mod queries;
pub mod rebuild;
pub mod store;

pub use rebuild::{
    read_history, rebuild, rebuild_from, History, ReadModel, RebuildError, RebuildReport,
    TableReport,
};
pub use store::{snapshot, Snapshot};

use skein_bus::provision::EVENTS;
use skein_bus::Bus;
use skein_outbox::{Migration, Store};
use skein_service::{Consumers, Host, HostConfig};

/// The worker's name: its consumer, inbox and service name. A contract:
/// renaming it makes the projector consume `EVENTS` again from the start.
pub const NAME: &str = skein_contracts::projector::SERVICE;

/// The projector's tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "users, orders and timeline read models",
    sqlite: include_str!("../migrations/0001_projector.sql"),
    postgres: include_str!("../migrations/0001_projector.sql"),
}];

/// How long a projector write waits for SQLite's write lock held by
/// another process: long enough for `skein replay --rebuild`, whose one
/// transaction holds it while it applies the whole history. The live
/// projector's events wait (reported in progress, so neither redelivered
/// nor counted towards the dead-letter limit) instead of failing after the
/// 10 s other workers wait and reaching the DLQ after about two minutes.
pub const SQLITE_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The projector's store settings for `url`: [`SQLITE_BUSY_TIMEOUT`].
pub fn store_config(url: &str) -> skein_outbox::StoreConfig {
    let mut config = skein_outbox::StoreConfig::new(url);
    config.busy_timeout = SQLITE_BUSY_TIMEOUT;
    config
}

/// The `EVENTS` subjects the projector reads, live and when rebuilding.
pub fn event_filters() -> Vec<String> {
    ReadModel::All.filters()
}

/// Migrates the store and starts the projector on `bus`.
pub async fn start(bus: Bus, store: Store, config: HostConfig) -> skein_service::Result<Host> {
    store.migrate(NAME, MIGRATIONS).await?;
    let mut host = Host::start(bus, store, config).await?;
    queries::register(&mut host).await?;
    bind_consumers(&mut host).await?;
    Ok(host)
}

/// Binds the projection, from `EVENTS`. The live worker ([`start`]) and
/// `skein replay --into projector` both bind it here.
pub async fn bind_consumers<C: Consumers>(consumers: &mut C) -> skein_service::Result<()> {
    let backend = consumers.store().backend();
    consumers
        .consume(
            EVENTS,
            event_filters(),
            projection::Projection::new(backend),
            |_| {},
        )
        .await
}
