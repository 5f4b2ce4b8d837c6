//! Hosts a skein worker.
//!
//! A worker is a service that owns one database and talks through the bus.
//! [`Host`] wires the parts every worker has, so a worker's code is its
//! handlers and nothing else:
//!
//! - the store and its outbox [`Relay`](skein_outbox::Relay), reporting the
//!   outbox backlog;
//! - consumer groups ([`Host::consume`]): a durable consumer per stream named
//!   after the worker, each handler wrapped in the inbox so it runs once per
//!   message;
//! - query endpoints ([`Host::query`]): typed request-reply on
//!   `queries.<worker>.<name>` with queue group `<worker>`, errors as
//!   [`ServiceError`] in the NATS service error headers;
//! - the NATS service API with the worker's figures.
//!
//! A worker binds its handlers through [`Consumers`], which the [`Host`]
//! implements for the live consumer groups and [`Redelivery`] for feeding
//! stored messages to the same handlers (`skein replay --into`).
//!
//! [`request`] is the client side of a query.
//!
//! # Layout
//!
//! - [`host`]: [`Host`] and [`HostConfig`].
//! - [`consumers`]: [`Consumers`], where a worker binds its handlers.
//! - [`redeliver`]: [`Redelivery`], stored messages through a worker's own
//!   handlers and inbox, outside its consumer group.
//! - [`client`]: [`request`] and [`RequestError`].
//! - [`standalone`]: what a worker's own binary needs (environment, logs,
//!   connections, stop on Ctrl-C or SIGTERM).
//! - [`trace`]: the causal tree of one request or order (for `skein trace`
//!   and the ingress).

pub mod client;
pub mod consumers;
pub mod health;
pub mod host;
pub mod redeliver;
pub mod standalone;
pub mod trace;

pub use client::{request, request_in, request_with, RequestError};
pub use consumers::{ConsumerPlan, Consumers};
pub use host::{Host, HostConfig, HostProbe};
pub use redeliver::{Outcome, Preview, Redelivery};
pub use skein_contracts::ServiceError;

/// An error of the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] skein_bus::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] skein_outbox::Error),
}

/// Result of the host.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(feature = "testing")]
pub mod testing;
