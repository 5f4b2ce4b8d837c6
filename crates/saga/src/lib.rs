//! Sagas: multi-service workflows that either complete or undo what they
//! did, declared rather than hand-coded.
//!
//! A [`Saga`] is built with [`Saga::builder`]: the event that starts an
//! instance (and its key: one instance per key), then named steps in order,
//! each with the command it sends, the events that complete or fail it, the
//! command that compensates it, and its deadline. One step may be the
//! pivot: once it completes the saga only goes forward. Data carried
//! between steps is a typed, serializable struct. The definition is checked
//! when it is built, and a broken one names the step at fault.
//!
//! The [`Coordinator`] runs instances: it consumes the events the sagas
//! react to through the worker's inbox, keeps each instance's state, the
//! commands it sends (through the outbox) and a record of every transition
//! in one transaction, correlates replies by the `ce-causationid` that
//! names the command they answer, and watches stored deadlines. When a step
//! fails or misses its deadline it compensates in reverse order, each
//! compensation retried on its own deadline, then sends the saga's final
//! command (awaited like a step when the saga declares its answers); it
//! ends `compensated`, or `failed` when it can neither go on nor back,
//! never silently stuck. An
//! instance failed for want of an answer still takes that answer: coming
//! late, it resumes the instance as if it had come in time, and an operator
//! can send its command again ([`Coordinator::retry`]).
//! Copies of the coordinator share the work with optimistic versioning.
//! Instances that ended are deleted after a retention period
//! ([`Coordinator::prune`]).
//!
//! # Layout
//!
//! - [`definition`]: the builder and its checks.
//! - `engine`: the state machine of one instance (pure).
//! - `store`: the tables; [`MIGRATIONS`].
//! - [`coordinator`]: consuming, deadlines, views for queries.

mod backlog;
pub mod coordinator;
pub mod definition;
mod engine;
mod store;
#[cfg(test)]
#[path = "../tests/support/shop_messages.rs"]
mod test_messages;

pub use coordinator::{Coordinator, RetryError};
pub use definition::{DefinitionError, Saga, SagaBuilder, SagaError, StepBuilder};

use skein_outbox::Migration;
use time::format_description::well_known::Rfc3339;

/// The saga tables; run with `store.migrate("saga", MIGRATIONS)`.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "saga instances, sent commands and transitions",
    sqlite: include_str!("../migrations/0001_saga.sql"),
    postgres: include_str!("../migrations/0001_saga.sql"),
}];

/// Microseconds since the epoch as RFC 3339.
pub(crate) fn rfc3339(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}
