//! Declaring a saga: its trigger, its steps (command, completing and failing
//! events, compensation, deadline), its pivot, and how it ends.
//!
//! ```
//! use std::time::Duration;
//! # use serde::{Deserialize, Serialize};
//! # use skein_message::{Command, Contract, Event};
//! # macro_rules! msg { ($t:ident, $svc:literal, $name:literal, $kind:ident) => {
//! #   #[derive(Serialize, Deserialize)] struct $t { id: String }
//! #   impl Contract for $t { const SERVICE: &'static str = $svc; const NAME: &'static str = $name; const VERSION: u32 = 1; }
//! #   impl $kind for $t { fn entity_id(&self) -> String { self.id.clone() } }
//! # } }
//! # msg!(Placed, "orders", "placed", Event); msg!(Reserve, "stock", "reserve", Command);
//! # msg!(Reserved, "stock", "reserved", Event); msg!(Refused, "stock", "refused", Event);
//! # msg!(Release, "stock", "release", Command); msg!(Released, "stock", "released", Event);
//! # msg!(Confirm, "orders", "confirm", Command); msg!(Confirmed, "orders", "confirmed", Event);
//! # msg!(Reject, "orders", "reject", Command);
//! use skein_saga::Saga;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order { id: String }
//!
//! let saga = Saga::builder::<Order>("place")
//!     .start_on(|e: &Placed| Some((e.id.clone(), Order { id: e.id.clone() })))
//!     .step("reserve", |s| {
//!         s.send(|o: &Order| Reserve { id: o.id.clone() })
//!             .completes_on::<Reserved>()
//!             .fails_on(|_: &Refused| "out of stock".to_owned())
//!             .compensate(|o: &Order| Release { id: o.id.clone() })
//!             .compensation_completes_on::<Released>()
//!             .deadline(Duration::from_secs(10))
//!     })
//!     .step("confirm", |s| {
//!         s.pivot()
//!             .send(|o: &Order| Confirm { id: o.id.clone() })
//!             .completes_on::<Confirmed>()
//!             .deadline(Duration::from_secs(10))
//!     })
//!     .on_compensated(|o: &Order, _why: &str| Reject { id: o.id.clone() })
//!     .build()
//!     .expect("a valid definition");
//! assert_eq!(saga.name(), "place");
//! ```
//!
//! [`SagaBuilder::build`] checks the definition and names the step at fault:
//! unique, non-empty names; a deadline and a completing event on every
//! step; a compensation on every step before the pivot (on every step when
//! no pivot is marked); at most one pivot; no event both completing and
//! failing a step; optionally ([`SagaBuilder::known_types`]) every awaited
//! event a declared contract.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use skein_message::{Command, Envelope, Event, MessageContext};

/// Why a definition was refused; the message names the saga and the step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("saga {saga}: {problem}")]
pub struct DefinitionError {
    /// The saga.
    pub saga: String,
    /// What is wrong, naming the step.
    pub problem: String,
}

/// Why the runtime could not do what a definition says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The saga data could not be (de)serialized.
    #[error("saga data of {saga}: {source}")]
    Data {
        /// The saga.
        saga: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An event could not be decoded.
    #[error("cannot decode {kind}: {reason}")]
    Decode {
        /// Its type.
        kind: String,
        /// Why.
        reason: String,
    },
    /// A command could not be encoded.
    #[error("cannot encode a command: {0}")]
    Encode(String),
}

/// Builds the envelope of a command from the saga data.
pub(crate) type CommandFn =
    Arc<dyn Fn(&Value, &MessageContext, &str) -> Result<Envelope, SagaError> + Send + Sync>;
/// Applies a completing event to the data.
pub(crate) type UpdateFn =
    Arc<dyn Fn(&mut Value, &Envelope) -> Result<(), SagaError> + Send + Sync>;
/// The reason a failing event gives.
pub(crate) type ReasonFn = Arc<dyn Fn(&Envelope) -> Result<String, SagaError> + Send + Sync>;
/// The key and data of a new instance, if the trigger starts one.
pub(crate) type StartFn =
    Arc<dyn Fn(&Envelope) -> Result<Option<(String, Value)>, SagaError> + Send + Sync>;
/// The key of the instance a cancel event is about, and why.
pub(crate) type KeyFn = Arc<dyn Fn(&Envelope) -> Result<(String, String), SagaError> + Send + Sync>;

/// Builds a saga's final command from the data and a reason.
pub(crate) type FinalFn =
    Arc<dyn Fn(&Value, &MessageContext, &str, &str) -> Result<Envelope, SagaError> + Send + Sync>;

/// The command that ends a saga that compensated (after a failure or a
/// cancel), and the events that answer it.
#[derive(Clone)]
pub(crate) struct FinalDef {
    pub(crate) make: FinalFn,
    /// `<service>.<name>` of the command.
    pub(crate) command_type: String,
    /// The events that answer it; empty: it is sent and not waited for.
    pub(crate) completes: Vec<EventType>,
}

/// An event type a saga reacts to.
#[derive(Clone)]
pub(crate) struct EventType {
    /// `<service>.<name>` (any version: readers upcast).
    pub(crate) name: String,
    /// Filter subject on `EVENTS`.
    pub(crate) subject: String,
    matches: fn(&Envelope) -> bool,
}

impl EventType {
    fn of<E: Event>() -> Self {
        Self {
            name: E::type_name().unversioned(),
            subject: skein_message::subject::event(E::SERVICE, "*", E::NAME),
            matches: |e| e.is::<E>(),
        }
    }

    pub(crate) fn matches(&self, envelope: &Envelope) -> bool {
        (self.matches)(envelope)
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

fn decode<T: skein_message::Contract>(envelope: &Envelope) -> Result<T, SagaError> {
    envelope.decode().map_err(|e| SagaError::Decode {
        kind: envelope.kind.clone(),
        reason: e.to_string(),
    })
}

fn data_error(saga: &str) -> impl Fn(serde_json::Error) -> SagaError + '_ {
    move |source| SagaError::Data {
        saga: saga.to_owned(),
        source,
    }
}

fn command_fn<D, C, F>(make: F) -> CommandFn
where
    D: DeserializeOwned,
    C: Command,
    F: Fn(&D) -> C + Send + Sync + 'static,
{
    Arc::new(move |data, context, source| {
        let data: D = serde_json::from_value(data.clone()).map_err(data_error(source))?;
        Envelope::command(source, &make(&data), context)
            .map_err(|e| SagaError::Encode(e.to_string()))
    })
}

/// One step: the command it sends and what answers it.
#[derive(Clone)]
pub(crate) struct StepDef {
    pub(crate) name: String,
    pub(crate) command: Option<CommandFn>,
    pub(crate) command_type: String,
    pub(crate) completes: Vec<(EventType, Option<UpdateFn>)>,
    pub(crate) fails: Vec<(EventType, ReasonFn)>,
    pub(crate) compensation: Option<CommandFn>,
    pub(crate) compensation_type: String,
    pub(crate) compensation_completes: Vec<EventType>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) compensation_deadline: Option<Duration>,
    pub(crate) attempts: u32,
    pub(crate) compensation_attempts: u32,
    pub(crate) pivot: bool,
}

impl fmt::Debug for StepDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("command", &self.command_type)
            .field(
                "completes",
                &self.completes.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .field(
                "fails",
                &self.fails.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .field("compensation", &self.compensation_type)
            .field("deadline", &self.deadline)
            .field("pivot", &self.pivot)
            .finish()
    }
}

/// Declares one step; see [`SagaBuilder::step`].
pub struct StepBuilder<D> {
    step: StepDef,
    _data: PhantomData<fn(D)>,
}

impl<D> fmt::Debug for StepBuilder<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.step.fmt(f)
    }
}

impl<D: Serialize + DeserializeOwned + Send + Sync + 'static> StepBuilder<D> {
    /// The command this step sends, made from the saga data.
    pub fn send<C: Command>(mut self, make: impl Fn(&D) -> C + Send + Sync + 'static) -> Self {
        self.step.command = Some(command_fn(make));
        self.step.command_type = C::type_name().unversioned();
        self
    }

    /// An event (caused by this step's command) that completes the step.
    pub fn completes_on<E: Event>(mut self) -> Self {
        self.step.completes.push((EventType::of::<E>(), None));
        self
    }

    /// An event that completes the step and changes the saga data (to carry
    /// what the step learned to the next steps).
    pub fn completes_with<E: Event>(
        mut self,
        update: impl Fn(&mut D, E) + Send + Sync + 'static,
    ) -> Self {
        let f: UpdateFn = Arc::new(move |value, envelope| {
            let mut data: D = serde_json::from_value(value.clone()).map_err(data_error("step"))?;
            update(&mut data, decode::<E>(envelope)?);
            *value = serde_json::to_value(&data).map_err(data_error("step"))?;
            Ok(())
        });
        self.step.completes.push((EventType::of::<E>(), Some(f)));
        self
    }

    /// An event that fails the step (it had no effect): the saga compensates
    /// the steps completed before it, with the reason `reason` gives.
    pub fn fails_on<E: Event>(
        mut self,
        reason: impl Fn(&E) -> String + Send + Sync + 'static,
    ) -> Self {
        let f: ReasonFn = Arc::new(move |envelope| Ok(reason(&decode::<E>(envelope)?)));
        self.step.fails.push((EventType::of::<E>(), f));
        self
    }

    /// The command that undoes this step. It must be safe to send when the
    /// step had no effect or has not taken effect yet (the step's command
    /// may still be on its way when its deadline passes): the receiving
    /// service then makes sure it never takes effect.
    pub fn compensate<C: Command>(
        mut self,
        make: impl Fn(&D) -> C + Send + Sync + 'static,
    ) -> Self {
        self.step.compensation = Some(command_fn(make));
        self.step.compensation_type = C::type_name().unversioned();
        self
    }

    /// An event (caused by the compensation) that says it is done.
    pub fn compensation_completes_on<E: Event>(mut self) -> Self {
        self.step.compensation_completes.push(EventType::of::<E>());
        self
    }

    /// How long the step (and its compensation) may take before the saga
    /// acts: sends again while attempts remain, then compensates (before
    /// the pivot) or fails (after it).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.step.deadline = Some(deadline);
        self
    }

    /// How long each send of the compensation may take before it is sent
    /// again (default: the step's deadline). A compensation often queues
    /// behind the step's own command at the receiving service, so give it
    /// at least as long as that command may take.
    pub fn compensation_deadline(mut self, deadline: Duration) -> Self {
        self.step.compensation_deadline = Some(deadline);
        self
    }

    /// How many times the command is sent before its deadline counts as a
    /// failure (default 1). Each send is a new message: the receiving
    /// service answers a repeat with its first outcome.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.step.attempts = attempts.max(1);
        self
    }

    /// How many times the compensation is sent before the saga gives up and
    /// fails (default 5).
    pub fn compensation_attempts(mut self, attempts: u32) -> Self {
        self.step.compensation_attempts = attempts.max(1);
        self
    }

    /// Marks this step as the pivot: once it completes, the saga only goes
    /// forward. Steps before it must have compensations.
    pub fn pivot(mut self) -> Self {
        self.step.pivot = true;
        self
    }
}

/// A checked saga definition, shared by every instance.
#[derive(Clone)]
pub struct Saga {
    pub(crate) name: String,
    pub(crate) trigger: EventType,
    pub(crate) start: StartFn,
    pub(crate) steps: Vec<StepDef>,
    pub(crate) pivot: Option<usize>,
    pub(crate) cancel: Option<(EventType, KeyFn)>,
    pub(crate) on_compensated: Option<FinalDef>,
    pub(crate) on_cancelled: Option<FinalDef>,
    /// How long each send of an answered final command may take.
    pub(crate) final_deadline: Duration,
    /// Sends of an answered final command before the instance fails.
    pub(crate) final_attempts: u32,
}

impl fmt::Debug for Saga {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Saga")
            .field("name", &self.name)
            .field("trigger", &self.trigger)
            .field("steps", &self.steps)
            .field("pivot", &self.pivot)
            .finish_non_exhaustive()
    }
}

impl Saga {
    /// Starts declaring a saga named `name` whose data is `D`. The name is a
    /// contract: stored instances refer to it.
    pub fn builder<D>(name: impl Into<String>) -> SagaBuilder<D> {
        SagaBuilder {
            name: name.into(),
            trigger: None,
            steps: Vec::new(),
            cancel: None,
            on_compensated: None,
            on_cancelled: None,
            compensated_on: Vec::new(),
            cancelled_on: Vec::new(),
            final_deadline: None,
            final_attempts: 5,
            known: None,
            problems: Vec::new(),
            _data: PhantomData,
        }
    }

    /// The saga's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The steps' names, in order.
    pub fn step_names(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| s.name.as_str())
    }

    /// Whether the step at `index` may still be undone: it is before the
    /// pivot or is the pivot itself (until it completes).
    pub(crate) fn compensable(&self, index: usize) -> bool {
        self.pivot.is_none_or(|p| index <= p)
    }

    /// Whether the step at `index`, in flight with no answer, may be
    /// undone: it is compensable and has a compensation. A pivot without
    /// one may have taken effect, and nothing undoes it, so the saga can
    /// only wait for its answer.
    pub(crate) fn undoable(&self, index: usize) -> bool {
        self.compensable(index)
            && self
                .steps
                .get(index)
                .is_some_and(|s| s.compensation.is_some())
    }

    /// The final command of an instance that compensated after `finish`.
    pub(crate) fn final_of(&self, finish: crate::engine::Finish) -> Option<&FinalDef> {
        match finish {
            crate::engine::Finish::Failure => self.on_compensated.as_ref(),
            crate::engine::Finish::Cancel => self.on_cancelled.as_ref(),
        }
    }

    /// Whether an instance that compensated after `finish` waits for its
    /// final command's answer (at the position after the last step) before
    /// it is `compensated`.
    pub(crate) fn awaits_final(&self, finish: crate::engine::Finish) -> bool {
        self.final_of(finish)
            .is_some_and(|f| !f.completes.is_empty())
    }

    /// Whether `index` is the position after the last step where an
    /// instance that compensated after `finish` waits for its final
    /// command's answer.
    pub(crate) fn is_final_position(&self, index: usize, finish: crate::engine::Finish) -> bool {
        index == self.steps.len() && self.awaits_final(finish)
    }

    /// The name of the step at `index`, or `final` for the position after
    /// the last; `None` past that.
    pub(crate) fn position_name(&self, index: usize) -> Option<String> {
        match self.steps.get(index) {
            Some(step) => Some(step.name.clone()),
            None if index == self.steps.len() => Some(crate::engine::FINAL.to_owned()),
            None => None,
        }
    }

    /// Every event type this saga reacts to, as `EVENTS` filter subjects.
    pub fn filter_subjects(&self) -> BTreeSet<String> {
        let mut subjects = BTreeSet::new();
        subjects.insert(self.trigger.subject.clone());
        if let Some((event, _)) = &self.cancel {
            subjects.insert(event.subject.clone());
        }
        for step in &self.steps {
            subjects.extend(step.completes.iter().map(|(e, _)| e.subject.clone()));
            subjects.extend(step.fails.iter().map(|(e, _)| e.subject.clone()));
            subjects.extend(
                step.compensation_completes
                    .iter()
                    .map(|e| e.subject.clone()),
            );
        }
        for last in [&self.on_compensated, &self.on_cancelled]
            .into_iter()
            .flatten()
        {
            subjects.extend(last.completes.iter().map(|e| e.subject.clone()));
        }
        subjects
    }

    /// The event types the step at `index` waits for, going forward or
    /// compensating.
    /// At the position after the last step, the answers of the final
    /// command of `finish`.
    pub(crate) fn waiting_for(
        &self,
        index: usize,
        compensating: bool,
        finish: crate::engine::Finish,
    ) -> Vec<String> {
        let Some(step) = self.steps.get(index) else {
            return match self.final_of(finish) {
                Some(last) if index == self.steps.len() => {
                    last.completes.iter().map(|e| e.name.clone()).collect()
                }
                _ => Vec::new(),
            };
        };
        if compensating {
            step.compensation_completes
                .iter()
                .map(|e| e.name.clone())
                .collect()
        } else {
            step.completes
                .iter()
                .map(|(e, _)| e.name.clone())
                .chain(step.fails.iter().map(|(e, _)| e.name.clone()))
                .collect()
        }
    }
}

/// Declares a saga; [`SagaBuilder::build`] checks it.
pub struct SagaBuilder<D> {
    name: String,
    trigger: Option<(EventType, StartFn)>,
    steps: Vec<StepDef>,
    cancel: Option<(EventType, KeyFn)>,
    on_compensated: Option<(FinalFn, String)>,
    on_cancelled: Option<(FinalFn, String)>,
    compensated_on: Vec<EventType>,
    cancelled_on: Vec<EventType>,
    final_deadline: Option<Duration>,
    final_attempts: u32,
    known: Option<HashSet<String>>,
    problems: Vec<String>,
    _data: PhantomData<fn(D)>,
}

impl<D> fmt::Debug for SagaBuilder<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaBuilder")
            .field("name", &self.name)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

fn final_fn<D, C, F>(make: F) -> FinalFn
where
    D: DeserializeOwned,
    C: Command,
    F: Fn(&D, &str) -> C + Send + Sync + 'static,
{
    Arc::new(move |data, context, source, reason| {
        let data: D = serde_json::from_value(data.clone()).map_err(data_error(source))?;
        Envelope::command(source, &make(&data, reason), context)
            .map_err(|e| SagaError::Encode(e.to_string()))
    })
}

impl<D: Serialize + DeserializeOwned + Send + Sync + 'static> SagaBuilder<D> {
    /// The event that starts an instance: `start` gives its key (one
    /// instance per key, so a duplicate trigger starts nothing) and its
    /// data, or `None` to start nothing for this event.
    pub fn start_on<E: Event>(
        mut self,
        start: impl Fn(&E) -> Option<(String, D)> + Send + Sync + 'static,
    ) -> Self {
        let f: StartFn = Arc::new(move |envelope| {
            let event = decode::<E>(envelope)?;
            start(&event)
                .map(|(key, data)| {
                    serde_json::to_value(&data)
                        .map(|v| (key, v))
                        .map_err(data_error("trigger"))
                })
                .transpose()
        });
        if self.trigger.is_some() {
            self.problems.push("more than one start_on".to_owned());
        }
        self.trigger = Some((EventType::of::<E>(), f));
        self
    }

    /// Adds the step `name`, declared by `declare`.
    pub fn step(
        mut self,
        name: &str,
        declare: impl FnOnce(StepBuilder<D>) -> StepBuilder<D>,
    ) -> Self {
        let builder = StepBuilder {
            step: StepDef {
                name: name.to_owned(),
                command: None,
                command_type: String::new(),
                completes: Vec::new(),
                fails: Vec::new(),
                compensation: None,
                compensation_type: String::new(),
                compensation_completes: Vec::new(),
                deadline: None,
                compensation_deadline: None,
                attempts: 1,
                compensation_attempts: 5,
                pivot: false,
            },
            _data: PhantomData,
        };
        self.steps.push(declare(builder).step);
        self
    }

    /// The event that asks a running instance (found by the key `key`
    /// gives, with a reason) to stop: before its pivot completes it
    /// compensates what it did, the step in flight included, and ends with
    /// [`SagaBuilder::on_cancelled`]'s command; after, it goes on.
    pub fn cancel_on<E: Event>(
        mut self,
        key: impl Fn(&E) -> (String, String) + Send + Sync + 'static,
    ) -> Self {
        let f: KeyFn = Arc::new(move |envelope| Ok(key(&decode::<E>(envelope)?)));
        self.cancel = Some((EventType::of::<E>(), f));
        self
    }

    /// The command sent once every compensation is done after a failure,
    /// with the failure's reason.
    pub fn on_compensated<C: Command>(
        mut self,
        make: impl Fn(&D, &str) -> C + Send + Sync + 'static,
    ) -> Self {
        self.on_compensated = Some((final_fn(make), C::type_name().unversioned()));
        self
    }

    /// The command sent once every compensation is done after a cancel.
    pub fn on_cancelled<C: Command>(
        mut self,
        make: impl Fn(&D, &str) -> C + Send + Sync + 'static,
    ) -> Self {
        self.on_cancelled = Some((final_fn(make), C::type_name().unversioned()));
        self
    }

    /// An event that answers [`SagaBuilder::on_compensated`]'s command
    /// (call again for more). With one, an instance that compensated after
    /// a failure stays `compensating` until the answer comes, sending the
    /// command again on [`SagaBuilder::final_deadline`], and fails when its
    /// attempts run out (a late answer still ends it `compensated`); a
    /// command the receiving service refused or dead-lettered then shows in
    /// `skein saga stuck` instead of leaving the saga ended and the work
    /// half done. Without, the command is sent and the instance is
    /// `compensated` at once.
    pub fn compensated_on<E: Event>(mut self) -> Self {
        self.compensated_on.push(EventType::of::<E>());
        self
    }

    /// An event that answers [`SagaBuilder::on_cancelled`]'s command, as
    /// [`SagaBuilder::compensated_on`] for a failure's.
    pub fn cancelled_on<E: Event>(mut self) -> Self {
        self.cancelled_on.push(EventType::of::<E>());
        self
    }

    /// How long each send of a final command that is answered
    /// ([`SagaBuilder::compensated_on`], [`SagaBuilder::cancelled_on`]) may
    /// take before it is sent again. Required with them.
    pub fn final_deadline(mut self, deadline: Duration) -> Self {
        self.final_deadline = Some(deadline);
        self
    }

    /// How many times an answered final command is sent before the
    /// instance fails waiting for its answer (default 5).
    pub fn final_attempts(mut self, attempts: u32) -> Self {
        self.final_attempts = attempts.max(1);
        self
    }

    /// Checks at build time that every awaited event is one of `types`
    /// (`<service>.<name>`, any version), e.g. the platform's contracts.
    pub fn known_types(mut self, types: impl IntoIterator<Item = String>) -> Self {
        self.known = Some(types.into_iter().collect());
        self
    }

    /// Checks the definition; the error names the saga and the step.
    pub fn build(self) -> Result<Saga, DefinitionError> {
        let fail = |problem: String| DefinitionError {
            saga: self.name.clone(),
            problem,
        };
        if self.name.trim().is_empty() {
            return Err(fail("the saga has no name".into()));
        }
        if let Some(problem) = self.problems.first() {
            return Err(fail(problem.clone()));
        }
        let Some((trigger, start)) = self.trigger.clone() else {
            return Err(fail("no start_on: nothing starts an instance".into()));
        };
        if self.steps.is_empty() {
            return Err(fail("no steps".into()));
        }
        let mut names = HashSet::new();
        for step in &self.steps {
            if step.name.trim().is_empty() {
                return Err(fail("a step has an empty name".into()));
            }
            if step.name == crate::engine::FINAL {
                return Err(fail(format!(
                    "a step may not be named {:?}: the name of the final command's place",
                    crate::engine::FINAL
                )));
            }
            if !names.insert(step.name.as_str()) {
                return Err(fail(format!("step {:?} is declared twice", step.name)));
            }
        }
        let pivots: Vec<usize> = (0..self.steps.len())
            .filter(|&i| self.steps[i].pivot)
            .collect();
        if pivots.len() > 1 {
            return Err(fail(format!(
                "steps {} are all marked pivot; a saga has at most one",
                pivots
                    .iter()
                    .map(|&i| format!("{:?}", self.steps[i].name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let pivot = pivots.first().copied();
        for (i, step) in self.steps.iter().enumerate() {
            let name = &step.name;
            if step.command.is_none() {
                return Err(fail(format!("step {name:?} sends no command")));
            }
            if step.deadline.is_none_or(|d| d.is_zero()) {
                return Err(fail(format!("step {name:?} has no deadline")));
            }
            if step.completes.is_empty() {
                return Err(fail(format!(
                    "step {name:?} has no event that completes it"
                )));
            }
            let needs_compensation = pivot.is_none_or(|p| i < p);
            if needs_compensation && step.compensation.is_none() {
                return Err(fail(format!(
                    "step {name:?} comes before the pivot but has no compensation"
                )));
            }
            if step.compensation_deadline.is_some_and(|d| d.is_zero()) {
                return Err(fail(format!(
                    "step {name:?} has a zero compensation deadline"
                )));
            }
            if step.compensation.is_some() && step.compensation_completes.is_empty() {
                return Err(fail(format!(
                    "step {name:?} has a compensation but no event that completes it"
                )));
            }
            for (event, _) in &step.completes {
                if step.fails.iter().any(|(f, _)| f.name == event.name) {
                    return Err(fail(format!(
                        "step {name:?}: {} both completes and fails it",
                        event.name
                    )));
                }
            }
            if let Some(known) = &self.known {
                let awaited = step
                    .completes
                    .iter()
                    .map(|(e, _)| e)
                    .chain(step.fails.iter().map(|(e, _)| e))
                    .chain(step.compensation_completes.iter());
                for event in awaited {
                    if !known.contains(&event.name) {
                        return Err(fail(format!(
                            "step {name:?} waits for {}, which is not a declared event type",
                            event.name
                        )));
                    }
                }
            }
        }
        if self.cancel.is_some() && self.on_cancelled.is_none() {
            return Err(fail("cancel_on without on_cancelled".into()));
        }
        let finals = [
            (
                "on_compensated",
                "compensated_on",
                self.on_compensated,
                self.compensated_on,
            ),
            (
                "on_cancelled",
                "cancelled_on",
                self.on_cancelled,
                self.cancelled_on,
            ),
        ];
        let mut built = Vec::with_capacity(2);
        for (command, answers, last, completes) in finals {
            if last.is_none() && !completes.is_empty() {
                return Err(fail(format!("{answers} without {command}")));
            }
            if !completes.is_empty() && self.final_deadline.is_none_or(|d| d.is_zero()) {
                return Err(fail(format!(
                    "{answers} without a final_deadline: an awaited final command needs one"
                )));
            }
            if let Some(known) = &self.known {
                if let Some(event) = completes.iter().find(|e| !known.contains(&e.name)) {
                    return Err(fail(format!(
                        "{command}'s command waits for {}, which is not a declared event type",
                        event.name
                    )));
                }
            }
            built.push(last.map(|(make, command_type)| FinalDef {
                make,
                command_type,
                completes,
            }));
        }
        let on_cancelled = built.pop().flatten();
        let on_compensated = built.pop().flatten();
        Ok(Saga {
            name: self.name,
            trigger,
            start,
            steps: self.steps,
            pivot,
            cancel: self.cancel,
            on_compensated,
            on_cancelled,
            final_deadline: self.final_deadline.unwrap_or_default(),
            final_attempts: self.final_attempts,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    use crate::test_messages::*;

    #[derive(Serialize, Deserialize)]
    struct Data {
        id: String,
    }

    fn reserve(s: StepBuilder<Data>) -> StepBuilder<Data> {
        s.send(|d: &Data| Reserve { id: d.id.clone() })
            .completes_on::<Reserved>()
            .fails_on(|_: &Refused| "refused".to_owned())
            .compensate(|d: &Data| Release { id: d.id.clone() })
            .compensation_completes_on::<Released>()
            .deadline(Duration::from_secs(1))
    }

    fn pay(s: StepBuilder<Data>) -> StepBuilder<Data> {
        s.pivot()
            .send(|d: &Data| Pay { id: d.id.clone() })
            .completes_on::<Paid>()
            .deadline(Duration::from_secs(1))
    }

    fn saga() -> SagaBuilder<Data> {
        Saga::builder::<Data>("shop")
            .start_on(|e: &Placed| Some((e.id.clone(), Data { id: e.id.clone() })))
    }

    fn problem(builder: SagaBuilder<Data>) -> String {
        match builder.build() {
            Ok(_) => "accepted".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_valid_definition_builds_and_lists_what_it_consumes() -> Result<(), DefinitionError> {
        let saga = saga().step("reserve", reserve).step("pay", pay).build()?;
        assert_eq!(saga.step_names().collect::<Vec<_>>(), ["reserve", "pay"]);
        assert_eq!(saga.pivot, Some(1));
        assert!(saga.compensable(1) && !saga.compensable(2));
        let subjects: Vec<String> = saga.filter_subjects().into_iter().collect();
        assert_eq!(
            subjects,
            [
                "events.shop.*.paid",
                "events.shop.*.placed",
                "events.shop.*.refused",
                "events.shop.*.released",
                "events.shop.*.reserved"
            ]
        );
        Ok(())
    }

    #[test]
    fn broken_definitions_are_refused_naming_the_step() {
        let cases: Vec<(SagaBuilder<Data>, &str)> = vec![
            (
                saga().step("reserve", |s| reserve(s).deadline(Duration::ZERO)).step("pay", pay),
                "saga shop: step \"reserve\" has no deadline",
            ),
            (
                saga().step("reserve", |s| reserve(s).compensation_deadline(Duration::ZERO)).step("pay", pay),
                "saga shop: step \"reserve\" has a zero compensation deadline",
            ),
            (
                saga()
                    .step("reserve", |s| s.send(|d: &Data| Reserve { id: d.id.clone() }).completes_on::<Reserved>().deadline(Duration::from_secs(1)))
                    .step("pay", pay),
                "saga shop: step \"reserve\" comes before the pivot but has no compensation",
            ),
            (
                saga().step("reserve", reserve).step("final", pay),
                "saga shop: a step may not be named \"final\": the name of the final command's place",
            ),
            (
                saga().step("reserve", reserve).step("reserve", pay),
                "saga shop: step \"reserve\" is declared twice",
            ),
            (
                saga().step("reserve", |s| reserve(s).pivot()).step("pay", pay),
                "saga shop: steps \"reserve\", \"pay\" are all marked pivot; a saga has at most one",
            ),
            (
                saga().step("pay", |s| s.pivot().send(|d: &Data| Pay { id: d.id.clone() }).deadline(Duration::from_secs(1))),
                "saga shop: step \"pay\" has no event that completes it",
            ),
            (
                saga().step("reserve", |s| reserve(s).fails_on(|_: &Reserved| "no".into())).step("pay", pay),
                "saga shop: step \"reserve\": shop.reserved both completes and fails it",
            ),
            (
                saga().step("reserve", reserve).step("pay", pay).known_types(["shop.placed".to_owned(), "shop.paid".to_owned()]),
                "saga shop: step \"reserve\" waits for shop.reserved, which is not a declared event type",
            ),
            (
                saga().step("reserve", reserve).step("pay", pay).cancel_on(|e: &Placed| (e.id.clone(), "stop".into())),
                "saga shop: cancel_on without on_cancelled",
            ),
            (
                saga().step("reserve", reserve).step("pay", pay).compensated_on::<Released>().final_deadline(Duration::from_secs(1)),
                "saga shop: compensated_on without on_compensated",
            ),
            (
                saga().step("reserve", reserve).step("pay", pay).on_compensated(|d: &Data, _: &str| Release { id: d.id.clone() }).compensated_on::<Released>(),
                "saga shop: compensated_on without a final_deadline: an awaited final command needs one",
            ),
            (
                saga()
                    .step("reserve", reserve)
                    .step("pay", pay)
                    .on_compensated(|d: &Data, _: &str| Release { id: d.id.clone() })
                    .compensated_on::<Refunded>()
                    .final_deadline(Duration::from_secs(1))
                    .known_types(["shop.reserved", "shop.refused", "shop.released", "shop.paid"].map(String::from)),
                "saga shop: on_compensated's command waits for shop.refunded, which is not a declared event type",
            ),
            (
                Saga::builder::<Data>("shop").step("pay", pay),
                "saga shop: no start_on: nothing starts an instance",
            ),
        ];
        for (builder, expected) in cases {
            assert_eq!(problem(builder), expected);
        }
    }

    #[test]
    fn a_step_without_a_pivot_needs_a_compensation_everywhere() {
        let all_forward = saga().step("reserve", reserve).step("pay", |s| {
            s.send(|d: &Data| Pay { id: d.id.clone() })
                .completes_on::<Paid>()
                .deadline(Duration::from_secs(1))
        });
        assert_eq!(
            problem(all_forward),
            "saga shop: step \"pay\" comes before the pivot but has no compensation"
        );
    }
}
