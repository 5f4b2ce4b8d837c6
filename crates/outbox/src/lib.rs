//! Transactional outbox, relay and inbox for skein services.
//!
//! A service changes its state and announces it in one database transaction;
//! a relay publishes what was committed; consumers apply each message once.
//! Together they give effectively-once processing on top of at-least-once
//! delivery.
//!
//! # Layout
//!
//! - [`store`]: [`Store`], the service's database. The URL chooses the
//!   backend: `sqlite:<path>` (embedded default, WAL, one file per service)
//!   or `postgres://…` (one database per service, created if missing).
//! - [`tx`]: [`Tx`], a transaction whose state changes, inbox records and
//!   outgoing messages commit together.
//! - [`relay`]: [`Relay`], publishes committed rows in commit order, one
//!   active relay per database, woken on commit and by `LISTEN/NOTIFY`.
//! - [`inbox`]: [`Inbox`], wraps a [`TxHandler`] so every message runs once.
//! - [`migrate`]: embedded migrations, several components per database.
//! - [`error`]: what can fail, with [`Error::is_unique_violation`].
//!
//! # Example
//!
//! ```no_run
//! use skein_bus::{Bus, BusConfig, Delivery, HandlerError, Worker, WorkerConfig};
//! use skein_outbox::{Inbox, Relay, RelayConfig, Store, Tx, TxHandler};
//!
//! struct CountOrders;
//! impl TxHandler for CountOrders {
//!     async fn handle(&self, tx: &mut Tx, _delivery: &Delivery) -> Result<(), HandlerError> {
//!         sqlx::query("UPDATE counters SET n = n + 1 WHERE name = 'orders'")
//!             .execute(&mut **tx)
//!             .await
//!             .map_err(HandlerError::transient)?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::connect(&BusConfig::new("nats://127.0.0.1:4222", "counter")).await?;
//! let store = Store::connect("sqlite:data/counter.db").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! Relay::new(store.clone(), bus.publisher(), RelayConfig::default()).spawn(shutdown.clone());
//! let worker = Worker::start(
//!     &bus,
//!     WorkerConfig::new("counter", "EVENTS", vec!["events.orders.>".into()]),
//!     Inbox::new(store, "counter", CountOrders),
//! )
//! .await?;
//! # Ok(())
//! # }
//! ```

pub mod audit;
pub mod error;
pub mod inbox;
pub mod migrate;
pub mod relay;
pub mod statements;
pub mod store;
pub mod tx;

pub use error::{Error, Result};
pub use inbox::{Inbox, Processed, TxHandler};
pub use migrate::Migration;
pub use relay::{PendingRow, Relay, RelayConfig};
pub use statements::Statements;
pub use store::{Backend, Store, StoreConfig};
pub use tx::Tx;

/// The outbox's own migrations.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "outbox, inbox and relay lease",
        sqlite: include_str!("../migrations/0001_outbox_inbox.sqlite.sql"),
        postgres: include_str!("../migrations/0001_outbox_inbox.postgres.sql"),
    },
    Migration {
        version: 2,
        description: "relays notified by the outbox insert itself",
        sqlite: include_str!("../migrations/0002_notify_on_insert.sqlite.sql"),
        postgres: include_str!("../migrations/0002_notify_on_insert.postgres.sql"),
    },
    Migration {
        version: 3,
        description: "the consumers each worker has bound",
        sqlite: include_str!("../migrations/0003_consumers.sqlite.sql"),
        postgres: include_str!("../migrations/0003_consumers.postgres.sql"),
    },
    Migration {
        version: 4,
        description: "how far back the inbox may have forgotten",
        sqlite: include_str!("../migrations/0004_inbox_horizon.sqlite.sql"),
        postgres: include_str!("../migrations/0004_inbox_horizon.postgres.sql"),
    },
];

/// Now, in microseconds since the Unix epoch: the time column type of every
/// skein table (portable across SQLite and PostgreSQL).
pub fn now_micros() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}
