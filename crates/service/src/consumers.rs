//! [`Consumers`]: where a worker binds its handlers.
//!
//! A worker crate says once, in a function generic over [`Consumers`],
//! which handler takes which stream and subjects. The live [`Host`] binds
//! them to the worker's durable consumers; a
//! [`Redelivery`](crate::redeliver::Redelivery) feeds stored messages to the
//! very same handlers outside the consumer group (`skein replay --into`); a
//! [`ConsumerPlan`] only notes the durable consumers the live worker would
//! bind, for `skein streams apply` to create them.
//! So a replay runs the code the live worker runs, through the same inbox,
//! never a copy of it.

use std::future::Future;

use skein_bus::provision::ConsumerSpec;
use skein_bus::{Handler, WorkerConfig};
use skein_outbox::{Inbox, Store, TxHandler};

use crate::{Host, Result};

/// Where a worker binds its handlers: the live [`Host`] or a
/// [`Redelivery`](crate::redeliver::Redelivery).
pub trait Consumers {
    /// The worker name: its durable consumer names and its inbox name. A
    /// contract.
    fn name(&self) -> &str;

    /// The worker's store.
    fn store(&self) -> &Store;

    /// `handler` wrapped in this worker's inbox (named after the worker).
    fn inbox<H: TxHandler>(&self, handler: H) -> Inbox<H> {
        Inbox::new(self.store().clone(), self.name(), handler)
    }

    /// Binds `handler`, run once per message through the worker's inbox, to
    /// the messages of `stream` on `filter_subjects`. `tune` adjusts the
    /// live consumer's settings (lanes, ack wait, retries).
    fn consume<H: TxHandler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        handler: H,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> impl Future<Output = Result<()>>;

    /// Binds a bus handler of the worker's own (which wraps its
    /// transactional part with [`Consumers::inbox`]) to the messages of
    /// `stream` on `filter_subjects`.
    fn consume_handler<H: Handler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        handler: H,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> impl Future<Output = Result<()>>;
}

impl Consumers for Host {
    fn name(&self) -> &str {
        Host::name(self)
    }

    fn store(&self) -> &Store {
        Host::store(self)
    }

    fn inbox<H: TxHandler>(&self, handler: H) -> Inbox<H> {
        Host::inbox(self, handler)
    }

    async fn consume<H: TxHandler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        handler: H,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> Result<()> {
        Host::consume(self, stream, filter_subjects, handler, tune).await
    }

    async fn consume_handler<H: Handler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        handler: H,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> Result<()> {
        Host::consume_handler(self, stream, filter_subjects, handler, tune).await
    }
}

/// The durable consumers a worker binds, noted instead of bound: what the
/// live [`Host`] would create or update, with the same settings (each
/// `tune` applied to the default [`WorkerConfig`]). `skein streams apply`
/// creates them ahead of workers whose NATS user may not.
#[derive(Debug)]
pub struct ConsumerPlan {
    name: String,
    store: Store,
    specs: Vec<ConsumerSpec>,
}

impl ConsumerPlan {
    /// No consumers yet, for worker `name`. `store` is only handed to the
    /// worker's code that asks for one (handlers are built, never run).
    pub fn new(store: Store, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            store,
            specs: Vec::new(),
        }
    }

    /// The consumers noted, in the order the worker binds them.
    pub fn into_specs(self) -> Vec<ConsumerSpec> {
        self.specs
    }

    fn note(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        tune: impl FnOnce(&mut WorkerConfig),
    ) {
        let mut config = WorkerConfig::new(&self.name, stream, filter_subjects);
        tune(&mut config);
        self.specs.push(ConsumerSpec::from(&config));
    }
}

impl Consumers for ConsumerPlan {
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
        _handler: H,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> Result<()> {
        self.note(stream, filter_subjects, tune);
        Ok(())
    }

    async fn consume_handler<H: Handler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        _handler: H,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> Result<()> {
        self.note(stream, filter_subjects, tune);
        Ok(())
    }
}
