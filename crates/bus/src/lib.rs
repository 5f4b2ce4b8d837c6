//! JetStream for skein services.
//!
//! # Layout
//!
//! - [`connect`]: [`Bus`], a NATS connection with its JetStream context,
//!   connected with retry and a clear error when NATS is not there.
//! - [`provision`]: the `EVENTS`, `COMMANDS` and `DLQ` streams and the
//!   workers' durable consumers, applied idempotently from the JSON
//!   definitions in `nats/`.
//! - [`publish`]: [`Publisher`], publishes and awaits the stream's ack, one
//!   at a time or pipelined in batches.
//! - [`consumer`]: the consumer-group runtime: [`Worker`] binds a
//!   [`Handler`] to a durable consumer shared by all copies, with lanes that
//!   keep per-entity order, ack/nak/dead-letter decided in one place,
//!   in-progress signals for slow handlers and graceful shutdown.
//! - [`dlq`]: dead letters, the original message plus why it failed.
//! - [`service`]: the NATS service API (`$SRV.PING/INFO/STATS`) with a
//!   worker's figures ([`stats`]).
//! - [`replay`]: reading history back from a stream.
//! - [`error`]: bus errors and [`HandlerError`], the classified failure of a
//!   handler.
//!
//! # Example
//!
//! ```no_run
//! use skein_bus::{Bus, BusConfig, Delivery, Handler, HandlerError, Worker, WorkerConfig};
//!
//! struct Print;
//! impl Handler for Print {
//!     async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
//!         println!("{} {}", delivery.envelope.kind, delivery.envelope.id);
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), skein_bus::Error> {
//! let bus = Bus::connect(&BusConfig::new("nats://127.0.0.1:4222", "printer")).await?;
//! skein_bus::provision::apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
//! let worker = Worker::start(
//!     &bus,
//!     WorkerConfig::new("printer", "EVENTS", vec!["events.>".into()]),
//!     Print,
//! )
//! .await?;
//! tokio::signal::ctrl_c().await.ok();
//! worker.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod connect;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod provision;
pub mod publish;
pub mod replay;
pub mod service;
pub mod stats;

pub use connect::{redact_url, Bus, BusConfig, NatsSecurity};
pub use consumer::{Delivery, DeliveryInfo, Handler, RunningWorker, Worker, WorkerConfig};
pub use error::{Error, ErrorKind, HandlerError, Result};
pub use publish::{Outgoing, Publisher};
pub use stats::{StatsSnapshot, WorkerStats};
