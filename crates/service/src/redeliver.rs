//! [`Redelivery`]: a worker's own handlers fed with stored messages,
//! outside its consumer group (`skein replay --into <worker>`).
//!
//! The worker's durable consumer is left alone: rewinding or recreating it
//! under running copies would break them, and their acknowledgements of
//! messages in flight could land on the new consumer's sequences. Instead a
//! worker crate binds its handlers to a [`Redelivery`] exactly as it binds
//! them to its [`Host`](crate::Host) (see [`Consumers`]), and each stored
//! message goes to the handler that takes its stream and subject, through
//! the worker's inbox (same name, same database). So:
//!
//! - a message the worker already applied is skipped (the inbox has it);
//! - one it never saw is applied once, in one transaction with its inbox
//!   record and the messages it sends (the outbox), whether or not copies of
//!   the worker run meanwhile: whoever records the message first applies
//!   it, the other skips it;
//! - a message none of its consumers' filters take is not delivered.
//!
//! What the handlers queue in the outbox is published by a relay of that
//! database ([`skein_outbox::Relay::publish_committed`]).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use skein_bus::{Delivery, DeliveryInfo, ErrorKind, Handler, HandlerError, WorkerConfig};
use skein_message::Envelope;
use skein_outbox::{Inbox, Processed, Store, TxHandler};

use crate::consumers::Consumers;
use crate::Result;

/// Attempts of a message whose handler fails transiently (a lock or a
/// version conflict with a running copy), before it is reported failed.
const ATTEMPTS: u32 = 3;

/// What redelivering one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its changes committed with the inbox record.
    Applied,
    /// The worker's inbox already had the message: nothing ran.
    Skipped,
    /// None of the worker's consumers takes this stream and subject.
    NotSubscribed,
    /// The handler refused the message, or kept failing. Nothing changed
    /// (its transaction rolled back); it is reported, not dead-lettered.
    Failed {
        /// Whether the handler said it can never succeed.
        permanent: bool,
        /// Why.
        reason: String,
    },
}

/// What redelivering one message would do (a dry run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preview {
    /// The inbox does not have it: the handler would run.
    WouldApply,
    /// The inbox has it: it would be skipped.
    Skipped,
    /// None of the worker's consumers takes it.
    NotSubscribed,
}

type Run<'a> = Pin<Box<dyn Future<Output = Result<Processed, HandlerError>> + Send + 'a>>;

/// A bound handler, its type erased.
trait Erased: Send + Sync {
    fn run<'a>(&'a self, delivery: &'a Delivery) -> Run<'a>;
}

/// A transactional handler in the worker's inbox: the inbox says whether it ran.
struct ThroughInbox<H>(Inbox<H>);

impl<H: TxHandler> Erased for ThroughInbox<H> {
    fn run<'a>(&'a self, delivery: &'a Delivery) -> Run<'a> {
        Box::pin(self.0.process(delivery))
    }
}

/// A bus handler of the worker's own, which runs its transactional part
/// through the inbox itself. It does not say whether it ran, so the inbox
/// is looked at first; a copy of the worker that applies the message
/// between the look and the handler's own inbox check makes this report
/// "applied" for what was in fact skipped (nothing runs twice either way).
struct OwnHandler<H> {
    handler: H,
    store: Store,
    inbox: String,
}

impl<H: Handler> Erased for OwnHandler<H> {
    fn run<'a>(&'a self, delivery: &'a Delivery) -> Run<'a> {
        Box::pin(async move {
            let seen =
                skein_outbox::inbox::was_processed(&self.store, &self.inbox, delivery.envelope.id)
                    .await
                    .map_err(HandlerError::transient)?;
            if seen {
                return Ok(Processed::AlreadyProcessed);
            }
            self.handler.handle(delivery).await?;
            Ok(Processed::Applied)
        })
    }
}

struct Bound {
    stream: String,
    filter_subjects: Vec<String>,
    handler: Box<dyn Erased>,
}

/// A worker's handlers, bound (through [`Consumers`]) for redelivering
/// stored messages to them.
pub struct Redelivery {
    name: String,
    store: Store,
    bound: Vec<Bound>,
}

impl std::fmt::Debug for Redelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redelivery")
            .field("name", &self.name)
            .field("store", &self.store.display_url())
            .field("subscriptions", &self.subscriptions())
            .finish()
    }
}

impl Redelivery {
    /// No handlers yet, for the worker `name` (its inbox name) with its
    /// `store`; bind them with the worker crate's function that binds its
    /// consumers.
    pub fn new(store: Store, name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            store,
            bound: Vec::new(),
        }
    }

    /// The worker's consumers: each stream with its filter subjects.
    pub fn subscriptions(&self) -> Vec<(&str, &[String])> {
        self.bound
            .iter()
            .map(|b| (b.stream.as_str(), b.filter_subjects.as_slice()))
            .collect()
    }

    /// Whether one of the worker's consumers takes `subject` from `stream`.
    pub fn subscribes(&self, stream: &str, subject: &str) -> bool {
        self.handler_for(stream, subject).is_some()
    }

    fn handler_for(&self, stream: &str, subject: &str) -> Option<&dyn Erased> {
        self.bound
            .iter()
            .find(|b| {
                b.stream == stream
                    && b.filter_subjects
                        .iter()
                        .any(|f| skein_message::subject::matches(f, subject))
            })
            .map(|b| b.handler.as_ref())
    }

    /// The delivery of `envelope`, stored at `sequence` in `stream`, as the
    /// worker's consumer would hand it over the first time.
    pub fn delivery(&self, stream: &str, sequence: u64, envelope: Envelope) -> Delivery {
        Delivery {
            envelope,
            info: DeliveryInfo {
                stream: stream.to_owned(),
                consumer: self.name.clone(),
                stream_sequence: sequence,
                // Always a first delivery: a handler that gives up after
                // some deliveries (waiting for a replica) never does so
                // because of a replay.
                delivered: 1,
            },
        }
    }

    /// What [`Redelivery::redeliver`] would do, changing nothing.
    pub async fn preview(&self, delivery: &Delivery) -> Result<Preview, skein_outbox::Error> {
        if !self.subscribes(&delivery.info.stream, &delivery.envelope.nats_subject) {
            return Ok(Preview::NotSubscribed);
        }
        let seen =
            skein_outbox::inbox::was_processed(&self.store, &self.name, delivery.envelope.id)
                .await?;
        Ok(if seen {
            Preview::Skipped
        } else {
            Preview::WouldApply
        })
    }

    /// Hands `delivery` to the handler of its stream and subject, through
    /// the worker's inbox. A transient failure is tried again a few times
    /// (a running copy may hold the same rows), then reported.
    pub async fn redeliver(&self, delivery: &Delivery) -> Outcome {
        let Some(handler) =
            self.handler_for(&delivery.info.stream, &delivery.envelope.nats_subject)
        else {
            return Outcome::NotSubscribed;
        };
        let mut attempt = 1;
        loop {
            match handler.run(delivery).await {
                Ok(Processed::Applied) => return Outcome::Applied,
                Ok(Processed::AlreadyProcessed) => return Outcome::Skipped,
                Err(e) if e.kind() == ErrorKind::Transient && attempt < ATTEMPTS => {
                    tracing::debug!(id = %delivery.envelope.id, error = %e, attempt, "redelivery failed, trying again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Outcome::Failed {
                        permanent: e.kind() == ErrorKind::Permanent,
                        reason: e.reason().to_owned(),
                    }
                }
            }
        }
    }
}

impl Consumers for Redelivery {
    fn name(&self) -> &str {
        &self.name
    }

    fn store(&self) -> &Store {
        &self.store
    }

    async fn consume<H: TxHandler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        handler: H,
        _tune: impl FnOnce(&mut WorkerConfig),
    ) -> Result<()> {
        let inbox = self.inbox(handler);
        self.bound.push(Bound {
            stream: stream.to_owned(),
            filter_subjects,
            handler: Box::new(ThroughInbox(inbox)),
        });
        Ok(())
    }

    async fn consume_handler<H: Handler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        handler: H,
        _tune: impl FnOnce(&mut WorkerConfig),
    ) -> Result<()> {
        self.bound.push(Bound {
            stream: stream.to_owned(),
            filter_subjects,
            handler: Box::new(OwnHandler {
                handler,
                store: self.store.clone(),
                inbox: self.name.clone(),
            }),
        });
        Ok(())
    }
}
