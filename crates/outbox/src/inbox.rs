//! The inbox: handlers that run once per message, in a transaction.
//!
//! [`Inbox`] adapts a [`TxHandler`] to the bus runtime's
//! [`skein_bus::Handler`]: for each delivery it begins a
//! transaction, records the message id for this handler (`skein_inbox`), runs
//! the handler, and commits the handler's changes, the inbox record and the
//! messages the handler queued, together. A message already recorded is
//! acknowledged without running the handler again: redeliveries, duplicate
//! publishes beyond the stream's duplicate window and replays have no effect.
//!
//! # Group commit
//!
//! Deliveries from the worker's lanes queue for the inbox's *committer*
//! (one per inbox). It takes every delivery waiting, up to [`MAX_BATCH`],
//! and handles them one after another in one transaction: one `BEGIN`, one
//! inbox insert, one outbox insert and one `COMMIT` for the lot, where each
//! message used to pay for all four. Nothing waits for a batch to fill: a
//! delivery that finds the queue empty is handled alone, at once; under
//! load batches form by themselves.
//!
//! On SQLite, which has one writer anyway, the `BEGIN` goes to the
//! connection's thread with the inbox insert and the `COMMIT` with the
//! outbox insert: a batch's bookkeeping is two hand-offs to that thread.
//!
//! On PostgreSQL one committer means an inbox's batches never wait for
//! each other's row locks (several committers per inbox took hot rows, a
//! product or an account, in different orders and deadlocked: a run fell
//! from 123 to 30 sagas/s). Batches of other transactions still can (the
//! same inbox in another copy of the worker, another inbox of the worker,
//! the saga deadline runner), so while its handlers run a batch waits at
//! most 50 ms for a lock and then counts as failed (below), long before
//! PostgreSQL's deadlock detection would step in.
//!
//! One committer also means an inbox handles one transaction at a time on
//! both backends: the lanes still keep each entity's messages in order and
//! let work done before the transaction (a wrapper around the inbox)
//! overlap, but a handler that waits inside its transaction holds up every
//! message of its inbox in this copy.
//!
//! A batch is all or nothing. When any handler in it fails, or the commit
//! does, the whole transaction rolls back and every message of the batch is
//! handled again alone, in its own transaction, as if there had been no
//! batch: each gets its own outcome (ack, retry or dead letter) and a
//! failing message never takes the others' effects with it. A handler
//! that panics fails the same way, permanently (the message is
//! dead-lettered with the panic's message): the committer runs every
//! message of the inbox and goes on. Order is kept:
//! a lane sends the next message about an entity only after the previous
//! one's outcome, and a batch runs in arrival order.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use futures::FutureExt;

use skein_bus::{Delivery, Handler, HandlerError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::Store;
use crate::tx::Tx;

/// The most messages one transaction takes.
pub const MAX_BATCH: usize = 32;

/// A handler that runs inside a service transaction.
pub trait TxHandler: Send + Sync + 'static {
    /// Handles `delivery` using `tx`. Return an error to roll back; its kind
    /// decides between redelivery and dead-lettering.
    ///
    /// `tx` may hold other messages' changes (a batch, see the [module
    /// docs](self)): the handler must not commit or roll it back, and it
    /// sees what the messages before it in the batch wrote, as it would if
    /// they had committed.
    fn handle(
        &self,
        tx: &mut Tx,
        delivery: &Delivery,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + Send;
}

/// A [`TxHandler`] made idempotent by the inbox.
#[derive(Debug)]
pub struct Inbox<H> {
    shared: Arc<Shared<H>>,
    /// Started on the first delivery (spawning needs a runtime).
    committer: OnceLock<Committer>,
}

/// The queue to the committer, and the committer, which stops with the
/// inbox: a worker stopped at once (a crash) rolls back what it holds.
#[derive(Debug)]
struct Committer {
    queue: mpsc::Sender<Job>,
    task: AbortHandle,
}

impl<H> Drop for Inbox<H> {
    fn drop(&mut self) {
        if let Some(committer) = self.committer.get() {
            committer.task.abort();
        }
    }
}

#[derive(Debug)]
struct Shared<H> {
    store: Store,
    name: String,
    handler: H,
}

/// A delivery waiting for a committer, and where its outcome goes.
#[derive(Debug)]
struct Job {
    delivery: Delivery,
    /// The lane's span, so the handler's logs carry the message's fields.
    span: tracing::Span,
    outcome: oneshot::Sender<Result<Processed, HandlerError>>,
}

impl<H: TxHandler> Inbox<H> {
    /// Wraps `handler`, recording messages under `name` (by convention the
    /// worker's consumer name). The name is a contract: renaming it forgets
    /// what was processed.
    pub fn new(store: Store, name: impl Into<String>, handler: H) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                name: name.into(),
                handler,
            }),
            committer: OnceLock::new(),
        }
    }
}

/// What [`Inbox::process`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// The handler ran and its changes committed with the inbox record.
    Applied,
    /// The inbox already had the message: nothing ran, nothing changed.
    AlreadyProcessed,
}

impl<H: TxHandler> Inbox<H> {
    /// The inbox name (the worker's consumer name).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Runs the handler once for `delivery`, in a transaction of its own,
    /// and says whether it ran: the same as [`Handler::handle`] without
    /// group commit, for callers that report what happened (`skein replay
    /// --into`).
    pub async fn process(&self, delivery: &Delivery) -> Result<Processed, HandlerError> {
        self.shared.process(delivery).await
    }

    fn committer(&self) -> &mpsc::Sender<Job> {
        &self
            .committer
            .get_or_init(|| {
                let (queue, jobs) = mpsc::channel(1024);
                let task = tokio::spawn(commit_loop(self.shared.clone(), jobs)).abort_handle();
                Committer { queue, task }
            })
            .queue
    }
}

impl<H: TxHandler> Handler for Inbox<H> {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let stopped = || HandlerError::transient("the inbox's committer stopped");
        let (outcome, answer) = oneshot::channel();
        let job = Job {
            delivery: delivery.clone(),
            span: tracing::Span::current(),
            outcome,
        };
        self.committer().send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map(|_| ())
    }
}

/// The committer: takes what waits in the queue and handles it as one
/// batch, until the inbox is dropped.
async fn commit_loop<H: TxHandler>(shared: Arc<Shared<H>>, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        shared.run(batch).await;
    }
}

impl<H: TxHandler> Shared<H> {
    async fn process(&self, delivery: &Delivery) -> Result<Processed, HandlerError> {
        let (mut tx, fresh) = Tx::begin_recording(&self.store, &self.name, &[delivery.envelope.id])
            .await
            .map_err(HandlerError::transient)?;
        if fresh.is_empty() {
            tracing::debug!(id = %delivery.envelope.id, handler = %self.name, "already processed, skipping");
            tx.rollback().await.map_err(HandlerError::transient)?;
            return Ok(Processed::AlreadyProcessed);
        }
        self.handle_caught(&mut tx, delivery).await?;
        tx.commit().await.map_err(HandlerError::transient)?;
        Ok(Processed::Applied)
    }

    /// The handler on `delivery`, a panic turned into a permanent error
    /// (its transaction then rolls back like any failure's). Handlers run
    /// on the committer's task, which every message of the worker goes
    /// through: a panic must not end it.
    async fn handle_caught(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        match AssertUnwindSafe(self.handler.handle(tx, delivery))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                tracing::error!(handler = %self.name, id = %delivery.envelope.id, "the handler panicked: {what}");
                Err(HandlerError::permanent(format!(
                    "the handler panicked: {what}"
                )))
            }
        }
    }

    /// Handles `batch` in one transaction, or, when that fails, each
    /// message alone; sends every outcome.
    async fn run(&self, batch: Vec<Job>) {
        if batch.len() > 1 {
            match self.process_batch(&batch).await {
                Ok(outcomes) => {
                    for (job, outcome) in batch.into_iter().zip(outcomes) {
                        let _ = job.outcome.send(Ok(outcome));
                    }
                    return;
                }
                Err(e) => tracing::debug!(
                    handler = %self.name, messages = batch.len(), reason = %e.reason(),
                    "batch rolled back; handling its messages one by one"
                ),
            }
        }
        for job in batch {
            let outcome = self.process(&job.delivery).instrument(job.span).await;
            let _ = job.outcome.send(outcome);
        }
    }

    async fn process_batch(&self, batch: &[Job]) -> Result<Vec<Processed>, HandlerError> {
        let ids: Vec<Uuid> = batch.iter().map(|j| j.delivery.envelope.id).collect();
        let (mut tx, mut fresh) = Tx::begin_recording(&self.store, &self.name, &ids)
            .await
            .map_err(HandlerError::transient)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for job in batch {
            // `remove`: the same message twice in one batch runs once.
            if fresh.remove(&job.delivery.envelope.id) {
                self.handle_caught(&mut tx, &job.delivery)
                    .instrument(job.span.clone())
                    .await?;
                outcomes.push(Processed::Applied);
            } else {
                outcomes.push(Processed::AlreadyProcessed);
            }
        }
        tx.commit().await.map_err(HandlerError::transient)?;
        Ok(outcomes)
    }
}

/// Whether the inbox `name` in `store` has recorded message `id`, without
/// changing anything (a look, e.g. for a dry run: the answer may change as
/// soon as it is given).
pub async fn was_processed(store: &Store, name: &str, id: Uuid) -> Result<bool> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM skein_inbox WHERE handler = $1 AND message_id = $2")
            .bind(name)
            .bind(id.to_string())
            .fetch_optional(store.pool())
            .await
            .map_err(Error::query("cannot read the inbox"))?;
    Ok(found.is_some())
}
