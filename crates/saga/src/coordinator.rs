//! The coordinator: runs the instances of a set of sagas from the events it
//! consumes and the deadlines it watches.
//!
//! - Events come through the worker's inbox ([`Coordinator`] is a
//!   [`TxHandler`]): an event runs at most once, and the instance's new
//!   state, its transition and the commands it sends commit together (the
//!   commands go out through the outbox).
//! - A reply finds its instance by `ce-causationid`: every command sent is
//!   recorded with its instance, step and phase.
//! - Copies share the work: a change is stored only if the instance is
//!   still at the version it was read at; the loser's transaction rolls
//!   back and its message is redelivered (a transient error) to be applied
//!   to the new state.
//! - Deadlines are stored with the instance, so they survive restarts;
//!   [`Coordinator::spawn_upkeep`] looks for passed ones every `tick`.
//! - Instances that ended (`completed`, `compensated`) are kept for a
//!   retention period ([`DEFAULT_RETENTION`], [`Coordinator::retain_ended_for`])
//!   with their transitions and the records of what they sent, for `skein
//!   saga show` and traces; then [`Coordinator::prune`] deletes them.
//!   `failed` instances wait for an operator and are kept; one that
//!   failed for want of an answer can be retried ([`Coordinator::retry`]).

use std::sync::Arc;
use std::time::Duration;

use skein_bus::{Bus, Delivery, HandlerError};
use skein_contracts::orchestrator::{SagaInstance, SagaStatus, SentMessage, StuckSaga};
use skein_message::Envelope;
use skein_outbox::{now_micros, Statements, Store, Tx, TxHandler};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backlog::Backlog;
use crate::definition::{Saga, SagaError};
use crate::engine::{Engine, Instance, Outcome, Phase};
use crate::store::{self, NewTransition};

/// How long an instance that ended is kept by default: as long as the
/// outbox relay keeps inbox records by default (30 days). While the inbox
/// has the event that started an instance, a replay of it is absorbed
/// there; while the instance is kept, the saga's key refuses a second
/// instance.
pub const DEFAULT_RETENTION: Duration = skein_outbox::relay::DEFAULT_INBOX_RETENTION;

/// How often [`Coordinator::spawn_upkeep`] deletes what is past its
/// retention.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// How long a message about an instance of another version (a rolling
/// upgrade: a step or saga this copy's definitions lack) waits before it is
/// delivered again, to a copy that may have them.
pub const OTHER_VERSION_RETRY: Duration = Duration::from_secs(30);

/// Instances [`Coordinator::prune`] deletes per transaction in
/// [`Coordinator::spawn_upkeep`]: short transactions between the
/// coordinator's own.
const PRUNE_BATCH: i64 = 500;

/// Runs a set of sagas on one store.
#[derive(Debug, Clone)]
pub struct Coordinator {
    sagas: Arc<Vec<Saga>>,
    store: Store,
    source: String,
    /// The consumer whose backlog deadlines wait for, if any.
    backlog: Option<Arc<Backlog>>,
    /// How long instances that ended are kept.
    retention: Duration,
}

fn db(e: sqlx::Error) -> HandlerError {
    HandlerError::transient(format!("saga store: {e}"))
}

/// A stored instance could not be read: a row that does not decode is
/// there for good, anything else may pass.
fn stored(e: sqlx::Error) -> HandlerError {
    match e {
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => {
            HandlerError::permanent(format!("saga store: {e}"))
        }
        e => db(e),
    }
}

fn definition(e: SagaError) -> HandlerError {
    HandlerError::permanent(e)
}

/// Why [`Coordinator::retry`] did not retry an instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError {
    /// There is no such instance (or it was deleted past its retention).
    #[error("no saga instance {0}")]
    NotFound(Uuid),
    /// The instance is not one a retry applies to; the message says why.
    #[error("{0}")]
    Refused(String),
    /// The instance could not be read, retried or stored (a database
    /// error, a command that cannot be encoded).
    #[error("cannot retry saga instance {id}: {reason}")]
    Failed {
        /// The instance.
        id: Uuid,
        /// What went wrong.
        reason: String,
    },
}

/// The cause of a transition.
struct Cause<'a> {
    id: Option<Uuid>,
    kind: &'a str,
}

/// What an input did to an instance, to store.
struct Change<'a> {
    /// Its status before; `None` for an instance the input started (just
    /// inserted, so there is no version to check).
    from: Option<SagaStatus>,
    out: Outcome,
    cause: Cause<'a>,
    now: i64,
}

/// Reads of an instance a retry makes when inputs keep changing it between
/// its read and its write.
const RETRY_READS: usize = 3;

impl Coordinator {
    /// A coordinator of `sagas` keeping its instances in `store` (migrated
    /// with [`crate::MIGRATIONS`]); `source` is the `ce-source` of what it
    /// sends (the worker's name).
    ///
    /// # Errors
    ///
    /// Two sagas with one name.
    pub fn new(
        sagas: Vec<Saga>,
        store: Store,
        source: impl Into<String>,
    ) -> Result<Self, crate::DefinitionError> {
        let mut names = std::collections::HashSet::new();
        for saga in &sagas {
            if !names.insert(saga.name.clone()) {
                return Err(crate::DefinitionError {
                    saga: saga.name.clone(),
                    problem: "declared twice in one coordinator".into(),
                });
            }
        }
        Ok(Self {
            sagas: Arc::new(sagas),
            store,
            source: source.into(),
            backlog: None,
            retention: DEFAULT_RETENTION,
        })
    }

    /// Keeps instances that ended for `retention` after their last change
    /// (default [`DEFAULT_RETENTION`]). Keep it at least as long as the
    /// inbox keeps its records: an event that started an instance no longer
    /// kept, replayed after the inbox forgot it too, starts the saga again.
    pub fn retain_ended_for(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Applies a deadline only once `consumer` (the one that delivers this
    /// coordinator's replies) has acknowledged every message `stream` stored
    /// before it: a reply that came in time but waited in its backlog (the
    /// coordinator was down or behind) is applied instead of being judged
    /// late. Without this, deadlines go by the clock alone.
    pub fn deadlines_wait_for(mut self, bus: Bus, stream: &str, consumer: &str) -> Self {
        self.backlog = Some(Arc::new(Backlog::new(bus, stream, consumer)));
        self
    }

    /// The `EVENTS` filter subjects of every event the sagas react to.
    pub fn filter_subjects(&self) -> Vec<String> {
        let mut all = std::collections::BTreeSet::new();
        for saga in self.sagas.iter() {
            all.extend(saga.filter_subjects());
        }
        all.into_iter().collect()
    }

    fn saga(&self, name: &str) -> Result<&Saga, HandlerError> {
        self.sagas.iter().find(|s| s.name == name).ok_or_else(|| {
            HandlerError::permanent(format!("no saga named {name:?} in this coordinator"))
        })
    }

    /// The saga of `inst` if this copy can advance it (answering `step`):
    /// an instance of a saga, or at a step, this copy's definitions lack is
    /// another version's (a rolling upgrade), and a transient error leaves
    /// the message for a copy that has it instead of dead-lettering it.
    /// It comes back after [`OTHER_VERSION_RETRY`] each time, so that an
    /// upgrade of several minutes (every delivery a consumer allows, 10 by
    /// default) does not dead-letter the answers a newer copy awaits.
    ///
    /// The position after the last step is the final command's, where an
    /// instance waits for its answer, if its saga here awaits one. An
    /// instance that ended (completed or compensated) needs no step of it:
    /// nothing moves it any more, a late reply or cancel is only noted.
    fn advancing(
        &self,
        inst: &Instance,
        step: usize,
        phase: Option<Phase>,
    ) -> Result<&Saga, HandlerError> {
        let known = |saga: &Saga, at: usize, phase: Option<Phase>| {
            at < saga.steps.len()
                || (saga.is_final_position(at, inst.finish)
                    && phase.is_none_or(|p| p == Phase::Final))
        };
        let ended = matches!(inst.status, SagaStatus::Completed | SagaStatus::Compensated);
        match self.sagas.iter().find(|s| s.name == inst.saga) {
            Some(saga) if ended || (known(saga, inst.step, None) && known(saga, step, phase)) => {
                Ok(saga)
            }
            _ => Err(HandlerError::transient(format!(
                "saga instance {} ({:?} at step {}) is another version's: left for a copy that has its definition",
                inst.id, inst.saga, inst.step.max(step)
            ))
            .retry_after(OTHER_VERSION_RETRY)),
        }
    }

    fn engine<'a>(&'a self, saga: &'a Saga, now: i64) -> Engine<'a> {
        Engine {
            saga,
            source: &self.source,
            now,
        }
    }

    /// What `input` (an engine function) does to `inst`, a stored instance
    /// of `saga`, as the change to store.
    fn apply<'a>(
        &self,
        saga: &Saga,
        inst: &mut Instance,
        cause: Cause<'a>,
        now: i64,
        input: impl FnOnce(&Engine<'_>, &mut Instance) -> Result<Outcome, SagaError>,
    ) -> Result<Change<'a>, SagaError> {
        let from = Some(inst.status);
        let out = input(&self.engine(saga, now), inst)?;
        Ok(Change {
            from,
            out,
            cause,
            now,
        })
    }

    /// [`Coordinator::try_persist`], with a lost race as a transient error:
    /// the message is handled again, on the instance as it is now.
    async fn persist(
        &self,
        tx: &mut Tx,
        inst: &mut Instance,
        change: Change<'_>,
    ) -> Result<(), HandlerError> {
        let id = inst.id;
        if self.try_persist(tx, inst, change).await? {
            Ok(())
        } else {
            Err(HandlerError::transient(format!(
                "saga {id} changed meanwhile (another coordinator copy); applying again"
            ))
            .retry_after(Duration::from_millis(20)))
        }
    }

    /// Stores what an input did to `inst`: its new state (if it changed and
    /// nobody changed it meanwhile), the commands to send and the transition.
    /// `false` when another copy changed the instance meanwhile (nothing of
    /// this is stored once the transaction is rolled back).
    async fn try_persist(
        &self,
        tx: &mut Tx,
        inst: &mut Instance,
        change: Change<'_>,
    ) -> Result<bool, HandlerError> {
        let Change {
            from,
            out,
            cause,
            now,
        } = change;
        // The instance, the commands' records and the transition: one
        // trip to the database where the backend allows it.
        let mut writes = Statements::new(tx.backend());
        let check_version = out.changed && from.is_some();
        if check_version {
            let expected = inst.version;
            inst.version += 1;
            inst.updated_at = now;
            store::push_update(&mut writes, inst, expected);
        }
        let records: Vec<_> = out
            .sends
            .iter()
            .map(|s| (s.envelope.id, s.envelope.kind.as_str(), s.step, s.phase))
            .collect();
        store::push_sent(&mut writes, inst.id, &records, now);
        let mut sent = Vec::with_capacity(out.sends.len());
        for s in &out.sends {
            tx.publish(&s.envelope);
            sent.push(SentMessage {
                id: s.envelope.id,
                kind: s.envelope.kind.clone(),
            });
        }
        store::push_transition(
            &mut writes,
            &NewTransition {
                instance: inst.id,
                from,
                to: inst.status,
                step: out.step.as_deref(),
                cause_id: cause.id,
                cause: cause.kind,
                sent: &sent,
                note: &out.note,
                at: now,
                if_kept: from.is_some() && !check_version,
            },
        );
        let updated = match writes.run(tx).await {
            Ok(rows) => rows,
            // PostgreSQL: the update waited for another copy's change and
            // then matched nothing, while the transition insert, which saw
            // the database as it was before (one statement), took the
            // number that copy's transition has. Only that key: any other
            // duplicate is no race and must not be retried as one.
            Err(sqlx::Error::Database(e))
                if e.is_unique_violation() && e.constraint() == Some("saga_transitions_pkey") =>
            {
                return Ok(false)
            }
            Err(e) => return Err(db(e)),
        };
        if check_version && updated.is_empty() {
            return Ok(false);
        }
        tracing::debug!(saga = %inst.saga, instance = %inst.id, key = %inst.key, status = inst.status.as_str(), note = %out.note, "saga transition");
        Ok(true)
    }

    async fn on_event(&self, tx: &mut Tx, event: &Envelope) -> Result<(), HandlerError> {
        let now = now_micros();
        let cause = || Cause {
            id: Some(event.id),
            kind: &event.kind,
        };
        for saga in self.sagas.iter() {
            if saga.trigger.matches(event) {
                if let Some((key, data)) = (saga.start)(event).map_err(definition)? {
                    let mut inst =
                        Instance::new(saga, key, data, event.correlation_id.clone(), now);
                    let out = self
                        .engine(saga, now)
                        .start(&mut inst, &event.context())
                        .map_err(definition)?;
                    inst.version = 1;
                    if store::insert(tx, &inst).await.map_err(db)? {
                        let change = Change {
                            from: None,
                            out,
                            cause: cause(),
                            now,
                        };
                        self.persist(tx, &mut inst, change).await?;
                    } else {
                        tracing::debug!(saga = %saga.name, key = %inst.key, "an instance exists for this key; not starting another");
                    }
                }
            }
            if let Some((cancel, key)) = &saga.cancel {
                if cancel.matches(event) {
                    let (key, reason) = key(event).map_err(definition)?;
                    match store::load_by_key(tx, &saga.name, &key).await.map_err(db)? {
                        Some(mut inst) => {
                            self.advancing(&inst, inst.step, None)?;
                            let change = self
                                .apply(saga, &mut inst, cause(), now, |engine, inst| {
                                    engine.cancel(inst, reason, event)
                                })
                                .map_err(definition)?;
                            self.persist(tx, &mut inst, change).await?;
                        }
                        None => {
                            tracing::info!(saga = %saga.name, %key, kind = %event.kind, "cancel for no instance; nothing to stop")
                        }
                    }
                }
            }
        }
        if let Some(caused_by) = event.causation_id {
            if let Some((inst, step, phase)) = store::sent_by(tx, caused_by).await.map_err(db)? {
                let mut inst = inst.map_err(|id| {
                    HandlerError::permanent(format!("saga instance {id} of a sent command is gone"))
                })?;
                let saga = self.advancing(&inst, step, Some(phase))?;
                let change = self
                    .apply(saga, &mut inst, cause(), now, |engine, inst| {
                        engine.reply(inst, step, phase, event)
                    })
                    .map_err(definition)?;
                self.persist(tx, &mut inst, change).await?;
            }
        }
        Ok(())
    }

    /// Applies passed deadlines, up to `limit` instances of this
    /// coordinator's sagas; returns how many.
    ///
    /// An instance whose deadline this copy cannot apply (its step is not
    /// in this copy's definition, its data does not decode: a newer
    /// version's, during a rolling upgrade, or a broken row) is left as it
    /// is for a copy that can, logged, and holds up none of the others:
    /// the round goes on with them. It stays overdue, so `skein saga
    /// stuck` lists it. A transient error (the database away) ends the
    /// round, to be tried again on the next tick.
    ///
    /// With [`Coordinator::deadlines_wait_for`], only deadlines up to the
    /// time the consumer has acknowledged everything before are applied;
    /// the others wait for it.
    pub async fn run_deadlines(&self, limit: i64) -> Result<usize, HandlerError> {
        let now = now_micros();
        let names: Vec<&str> = self.sagas.iter().map(|s| s.name.as_str()).collect();
        // A connection per query, given back before the deadlines are
        // applied (each takes one of its own: a pool of one must do).
        let due = |cutoff: i64, after: Option<(i64, Uuid)>, limit: i64| {
            let names = &names;
            async move {
                let mut conn = self.store.pool().acquire().await.map_err(db)?;
                store::due(&mut conn, names, cutoff, after, limit)
                    .await
                    .map_err(db)
            }
        };
        let mut cutoff = now;
        if let Some(backlog) = &self.backlog {
            if due(now, None, 1).await?.is_empty() {
                return Ok(0);
            }
            cutoff = backlog.cutoff(now).await;
            if cutoff < now {
                tracing::debug!(
                    behind_ms = now.saturating_sub(cutoff) / 1000,
                    "saga deadlines wait for the consumer's backlog"
                );
            }
        }
        // Page by page: instances this copy cannot advance (a newer
        // version's, a broken row) are passed over, however many there are.
        let mut after = None;
        let mut applied = 0;
        loop {
            let page = due(cutoff, after, limit).await?;
            let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= limit;
            after = page.last().map(|(id, at)| (*at, *id));
            for (id, _) in page {
                match self.apply_deadline(id, now, cutoff).await {
                    Ok(true) => applied += 1,
                    Ok(false) => {}
                    Err(e) if e.kind() == skein_bus::ErrorKind::Transient => return Err(e),
                    Err(e) => tracing::error!(
                        instance = %id,
                        "cannot apply the saga instance's deadline; left for a copy that can: {}",
                        e.reason()
                    ),
                }
            }
            if !full || i64::try_from(applied).unwrap_or(i64::MAX) >= limit {
                return Ok(applied);
            }
        }
    }

    /// Applies instance `id`'s deadline if it is at or before `cutoff`;
    /// `false` when there was none to apply (another copy got there first).
    async fn apply_deadline(&self, id: Uuid, now: i64, cutoff: i64) -> Result<bool, HandlerError> {
        let mut tx = self.store.begin().await.map_err(HandlerError::transient)?;
        let Some(mut inst) = store::load(&mut tx, id).await.map_err(stored)? else {
            return Ok(false);
        };
        if !inst.status.is_live() || inst.deadline_at.is_none_or(|d| d > cutoff) {
            // Another copy got there first.
            return Ok(false);
        }
        let saga = self.saga(&inst.saga)?;
        if inst.step >= saga.steps.len() && !saga.is_final_position(inst.step, inst.finish) {
            return Err(HandlerError::permanent(format!(
                "saga {:?} has no step {} here",
                saga.name, inst.step
            )));
        }
        let deadline = Cause {
            id: None,
            kind: "deadline",
        };
        let change = self
            .apply(saga, &mut inst, deadline, now, |engine, inst| {
                engine.deadline(inst)
            })
            .map_err(definition)?;
        if !self.try_persist(&mut tx, &mut inst, change).await? {
            tracing::debug!(instance = %id, "deadline raced another change");
            return Ok(false);
        }
        tx.commit().await.map_err(HandlerError::transient)?;
        Ok(true)
    }

    /// Deletes up to `limit` instances that ended more than the retention
    /// ago (see [`Coordinator::retain_ended_for`]), with their transitions
    /// and the records of the commands they sent, in one transaction;
    /// returns how many. `failed` and live instances are never deleted.
    /// Copies may prune at the same time: each instance goes once.
    pub async fn prune(&self, limit: i64) -> skein_outbox::Result<usize> {
        let retention = i64::try_from(self.retention.as_micros()).unwrap_or(i64::MAX);
        let before = now_micros().saturating_sub(retention);
        let mut tx = self.store.begin().await?;
        let pruned = store::prune(&mut tx, before, limit)
            .await
            .map_err(|source| skein_outbox::Error::Query {
                context: "cannot delete saga instances past their retention",
                source,
            })?;
        tx.commit().await?;
        Ok(pruned.len())
    }

    /// Until `shutdown`: applies passed deadlines every `tick`, and, beside
    /// that, at start and then every [`PRUNE_INTERVAL`] (or the retention,
    /// if shorter, but at most once a second) deletes the instances past
    /// their retention, in transactions of a
    /// few hundred until none is left: a long backlog of them (the first
    /// start of a version that prunes) holds up no deadline.
    pub fn spawn_upkeep(&self, tick: Duration, shutdown: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        // Not more often than once a second, whatever the retention.
        let prune_every = self.retention.clamp(Duration::from_secs(1), PRUNE_INTERVAL);
        tokio::spawn(async move {
            let deadlines = async {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(tick) => {}
                    }
                    match this.run_deadlines(100).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(count = n, "applied saga deadlines"),
                        Err(e) => {
                            tracing::warn!(error = %e.reason(), "cannot apply saga deadlines; trying again")
                        }
                    }
                }
            };
            // The first pass at start: a copy restarted more often than the
            // interval still prunes.
            let pruning = async {
                loop {
                    this.prune_all(&shutdown).await;
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(prune_every) => {}
                    }
                }
            };
            tokio::join!(deadlines, pruning);
        })
    }

    /// [`Coordinator::prune`] batch after batch until a batch is not full,
    /// with a pause between batches for the other writers.
    async fn prune_all(&self, shutdown: &CancellationToken) {
        let mut total = 0;
        while !shutdown.is_cancelled() {
            match self.prune(PRUNE_BATCH).await {
                Ok(n) => {
                    total += n;
                    if i64::try_from(n).unwrap_or(i64::MAX) < PRUNE_BATCH {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete saga instances past their retention; trying again later");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(count = total, "deleted saga instances past their retention");
        }
    }

    fn view(&self, inst: &Instance) -> SagaInstance {
        let saga = self.sagas.iter().find(|s| s.name == inst.saga);
        let live = inst.status.is_live();
        // Failed for want of an answer: it still waits for it (a step it
        // cannot undo, or a compensation), and says which.
        let awaiting = inst.status == SagaStatus::Failed && inst.attempt > 0;
        SagaInstance {
            id: inst.id,
            saga: inst.saga.clone(),
            key: inst.key.clone(),
            status: inst.status,
            step: (live || awaiting)
                .then(|| saga.and_then(|s| s.position_name(inst.step)))
                .flatten(),
            waiting_for: match saga {
                Some(s) if live => s.waiting_for(
                    inst.step,
                    inst.status == SagaStatus::Compensating,
                    inst.finish,
                ),
                Some(s) if awaiting => s.waiting_for(inst.step, s.undoable(inst.step), inst.finish),
                _ => Vec::new(),
            },
            deadline: inst.deadline_at.map(crate::rfc3339),
            reason: inst.reason.clone(),
            data: inst.data.clone(),
            correlation_id: inst.correlation_id.clone(),
            version: inst.version,
            created_at: crate::rfc3339(inst.created_at),
            updated_at: crate::rfc3339(inst.updated_at),
            transitions: Vec::new(),
        }
    }

    /// The instance `id` with its transitions.
    pub async fn get(&self, id: Uuid) -> sqlx::Result<Option<SagaInstance>> {
        let mut conn = self.store.pool().acquire().await?;
        let Some(inst) = store::load(&mut conn, id).await? else {
            return Ok(None);
        };
        let mut view = self.view(&inst);
        view.transitions = store::transitions(&mut conn, id).await?;
        Ok(Some(view))
    }

    /// Retries instance `id`, which failed waiting for an answer (`skein
    /// saga stuck` lists it): the command it waits on (a forward step, a
    /// compensation or the final command) is sent again, with its attempts
    /// counted afresh, as its deadlines would have sent it; `by` names who
    /// asked, in the transition's note. For an instance whose command was
    /// dead-lettered or lost, once its cause is fixed. Returns the instance
    /// as it is then.
    pub async fn retry(&self, id: Uuid, by: &str) -> Result<SagaInstance, RetryError> {
        let failed = |reason: String| RetryError::Failed { id, reason };
        for _ in 0..RETRY_READS {
            if let Some(inst) = self.retry_once(id, by).await? {
                tracing::info!(saga = %inst.saga, instance = %id, by, "saga instance retried");
                return self
                    .get(id)
                    .await
                    .map_err(|e| failed(e.to_string()))?
                    .ok_or(RetryError::NotFound(id));
            }
        }
        Err(RetryError::Refused(format!(
            "saga instance {id} kept changing while it was retried (answers coming in?); \
             look at it again"
        )))
    }

    /// One try of [`Coordinator::retry`] on the instance as it is now: the
    /// instance retried, or `None` when another input changed it between
    /// the read and the write (nothing stored).
    async fn retry_once(&self, id: Uuid, by: &str) -> Result<Option<Instance>, RetryError> {
        let failed = |reason: String| RetryError::Failed { id, reason };
        let now = now_micros();
        let mut tx = self
            .store
            .begin()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let Some(mut inst) = store::load(&mut tx, id)
            .await
            .map_err(|e| failed(e.to_string()))?
        else {
            return Err(RetryError::NotFound(id));
        };
        if inst.status != SagaStatus::Failed {
            return Err(RetryError::Refused(format!(
                "saga instance {id} is {}: only a failed one is retried",
                inst.status.as_str()
            )));
        }
        let saga = self.advancing(&inst, inst.step, None).map_err(|_| {
            RetryError::Refused(format!(
                "saga instance {id} ({:?} at step {}) is another version's: this orchestrator copy \
                 lacks its definition; ask again (a copy of its version may answer) once the \
                 upgrade is done",
                inst.saga, inst.step
            ))
        })?;
        let engine = self.engine(saga, now);
        let refused_answer = |inst: &Instance| {
            RetryError::Refused(format!(
                "saga instance {id} failed on an answer, not for want of one: sending its command \
                 again would not change that ({}); see its transitions",
                inst.reason.as_deref().unwrap_or("no reason recorded")
            ))
        };
        // What it waits for follows from its state; it must have sent that
        // command (the definition here must agree: another version's may
        // differ). Not the command sent last by time: copies' clocks differ.
        let Some(phase) = engine.awaited_late(&inst) else {
            return Err(refused_answer(&inst));
        };
        if !store::sent_in(&mut tx, id, inst.step, phase)
            .await
            .map_err(|e| failed(e.to_string()))?
        {
            return Err(RetryError::Refused(format!(
                "saga instance {id} sent no {} command at its step {}: there is nothing to send \
                 again",
                phase.as_str(),
                inst.step
            )));
        }
        let from = inst.status;
        let Some(out) = engine
            .retry(&mut inst, phase, by)
            .map_err(|e| failed(e.to_string()))?
        else {
            return Err(refused_answer(&inst));
        };
        let change = Change {
            from: Some(from),
            out,
            cause: Cause {
                id: None,
                kind: "retry",
            },
            now,
        };
        let stored = self
            .try_persist(&mut tx, &mut inst, change)
            .await
            .map_err(|e| failed(e.reason().to_owned()))?;
        if !stored {
            // Another input changed it between our read and our write (a
            // late answer, noted or applied): look at it again.
            return Ok(None);
        }
        tx.commit().await.map_err(|e| failed(e.to_string()))?;
        Ok(Some(inst))
    }

    /// The instance of `saga` about `key`, with its transitions.
    pub async fn find(&self, saga: &str, key: &str) -> sqlx::Result<Option<SagaInstance>> {
        let mut conn = self.store.pool().acquire().await?;
        let Some(inst) = store::load_by_key(&mut conn, saga, key).await? else {
            return Ok(None);
        };
        let mut view = self.view(&inst);
        view.transitions = store::transitions(&mut conn, inst.id).await?;
        Ok(Some(view))
    }

    /// Instances, newest first, with the cursor of the next page.
    pub async fn list(
        &self,
        status: Option<SagaStatus>,
        key: Option<&str>,
        cursor: Option<Uuid>,
        limit: u32,
    ) -> sqlx::Result<(Vec<SagaInstance>, Option<Uuid>)> {
        let mut conn = self.store.pool().acquire().await?;
        let limit = i64::from(limit.max(1));
        let mut rows = store::list(&mut conn, status, key, cursor, limit + 1).await?;
        let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next = more.then(|| rows.last().map(|r| r.id)).flatten();
        Ok((rows.iter().map(|i| self.view(i)).collect(), next))
    }

    /// Live instances past their deadline by `min_overdue` or more (most
    /// overdue first), then failed ones: at most `limit`, and whether there
    /// are more.
    pub async fn stuck(
        &self,
        min_overdue: Duration,
        limit: usize,
    ) -> sqlx::Result<(Vec<StuckSaga>, bool)> {
        let now = now_micros();
        let mut conn = self.store.pool().acquire().await?;
        let overdue = i64::try_from(min_overdue.as_micros()).unwrap_or(i64::MAX);
        let mut rows = store::stuck(
            &mut conn,
            now,
            overdue,
            i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
        )
        .await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let items = rows
            .iter()
            .map(|inst| StuckSaga {
                instance: self.view(inst),
                overdue_ms: inst
                    .deadline_at
                    .filter(|_| inst.status.is_live())
                    .map_or(0, |d| u64::try_from((now - d) / 1000).unwrap_or(0)),
            })
            .collect();
        Ok((items, more))
    }
}

impl TxHandler for Coordinator {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        self.on_event(tx, &delivery.envelope).await
    }
}
