//! The state machine of one instance: what a start, a reply, a deadline or
//! a cancel does to it and what it sends. Pure: the coordinator loads the
//! instance, calls one function here, and stores the result and the sent
//! commands in one transaction.
//!
//! - Running at step *s*: a completing event moves to *s + 1* (or
//!   `completed`); a failing event compensates steps *0..s* (the failed step
//!   had no effect; *0..=s* when it was sent more than once, as an earlier
//!   attempt may have); a passed deadline sends again while attempts remain,
//!   then compensates steps *0..=s* if *s* can be undone: before the pivot,
//!   or the pivot with a compensation (the step in flight may still take
//!   effect, so it is undone too). Otherwise (after the pivot, or a pivot
//!   without a compensation, which may have taken effect) it fails and
//!   waits for the answer.
//! - Compensating: compensations run one at a time in reverse order, each
//!   sent again on its deadline until its attempts run out (then `failed`);
//!   after the last, the final command (`on_compensated`, or `on_cancelled`
//!   after a cancel) is sent. If the saga declares its answers, the
//!   instance stays `compensating` at the position after the last step
//!   until one comes, sending the command again on its deadline until its
//!   attempts run out (then `failed`, waiting for the answer); else it is
//!   `compensated` at once.
//! - Failed for want of an answer (a step after the pivot or a compensation
//!   ran out of attempts): the instance still waits for that answer. When
//!   it comes, however late, it resumes as if it had come in time: the
//!   next step (or `completed`), or the next compensation (or the final
//!   command). A late failing answer to the step keeps it `failed`, now for
//!   that reason. An instance failed by an answer (a step after the pivot
//!   failed) waits for nothing and stays `failed`. An operator may retry an
//!   instance failed for want of an answer: the command it waits on is sent
//!   again with its attempts counted afresh (a pivot without a
//!   compensation counts it as sent more than once).
//! - A cancel before the pivot completes compensates like a deadline; after
//!   it (or at a pivot without a compensation), the instance goes on.
//! - Anything else (a late reply to an earlier step or attempt, a reply to
//!   a finished instance) changes nothing and is noted.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use skein_contracts::orchestrator::SagaStatus;
use skein_message::{Envelope, MessageContext};
use uuid::Uuid;

use crate::definition::{FinalDef, Saga, SagaError, StepDef};

/// How an instance that compensated ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Finish {
    /// After a failure: `on_compensated`.
    Failure,
    /// After a cancel: `on_cancelled`.
    Cancel,
}

/// One saga instance.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Instance {
    pub(crate) id: Uuid,
    pub(crate) saga: String,
    pub(crate) key: String,
    pub(crate) status: SagaStatus,
    /// The step running (forward) or being compensated.
    pub(crate) step: usize,
    /// Sends of the current step or compensation so far. On a `failed`
    /// instance, non-zero while the last of them is still unanswered (it
    /// failed for want of an answer, which resumes it), zero once an answer
    /// failed it for good.
    pub(crate) attempt: u32,
    /// Steps still to compensate after the current one, next first.
    pub(crate) compensations: Vec<usize>,
    pub(crate) finish: Finish,
    pub(crate) data: Value,
    pub(crate) reason: Option<String>,
    pub(crate) correlation_id: String,
    /// Microseconds since the epoch.
    pub(crate) deadline_at: Option<i64>,
    pub(crate) version: i64,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

impl Instance {
    /// A new instance, before its first step is sent.
    pub(crate) fn new(
        saga: &Saga,
        key: String,
        data: Value,
        correlation_id: String,
        now: i64,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            saga: saga.name.clone(),
            key,
            status: SagaStatus::Running,
            step: 0,
            attempt: 0,
            compensations: Vec::new(),
            finish: Finish::Failure,
            data,
            reason: None,
            correlation_id,
            deadline_at: None,
            version: 0,
            created_at: now,
            updated_at: now,
        }
    }
}

impl Instance {
    /// Fails the instance for want of an answer after `why` (the last
    /// send's deadline passed): the first reason is kept before it, for a
    /// late answer to go back to ([`Instance::resume_reason`]), and
    /// `attempt` stays non-zero, as the answer is still awaited.
    fn fail_unanswered(&mut self, why: String, out: &mut Outcome) {
        out.note = format!("{why}; needs attention (a late answer resumes it)");
        self.reason = Some(match self.reason.take() {
            Some(first) => format!("{first}; then {why}"),
            None => why,
        });
        self.status = SagaStatus::Failed;
        self.deadline_at = None;
    }

    /// Takes `; then <unanswered>…` off the reason again: the late answer
    /// came, and the reason it compensated for stands.
    fn resume_reason(&mut self, unanswered: &str) {
        if let Some(reason) = &mut self.reason {
            if let Some(at) = reason.rfind(&format!("; then {unanswered}")) {
                reason.truncate(at);
            }
        }
    }
}

/// Whether a sent command goes forward, compensates, or ends the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Forward,
    Compensation,
    Final,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Compensation => "compensation",
            Phase::Final => "final",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        [Phase::Forward, Phase::Compensation, Phase::Final]
            .into_iter()
            .find(|p| p.as_str() == text)
    }
}

/// A command to send, with what it belongs to (so its reply finds the
/// instance by its causation id).
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) envelope: Envelope,
    pub(crate) step: usize,
    pub(crate) phase: Phase,
}

/// What one input did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Commands to send, in order.
    pub(crate) sends: Vec<Sent>,
    /// Whether the instance changed (and must be stored).
    pub(crate) changed: bool,
    /// The step it concerns.
    pub(crate) step: Option<String>,
    /// What happened.
    pub(crate) note: String,
}

/// Applies inputs to instances of one saga.
#[derive(Debug)]
pub(crate) struct Engine<'a> {
    pub(crate) saga: &'a Saga,
    /// `ce-source` of the commands sent.
    pub(crate) source: &'a str,
    /// Now, in microseconds since the epoch.
    pub(crate) now: i64,
}

/// How the note of a transition that resumes a failed instance begins.
const RESUMED: &str = "resumed on a late reply: ";

/// The name of the position after the last step, where an instance that
/// compensated waits for its final command's answer.
pub(crate) const FINAL: &str = "final";

/// Why a compensation failed the instance, as its reason says after the
/// reason it compensated for (`<first>; then <this> after <n> attempts`):
/// a late answer finds it there to take it off again.
fn unanswered_compensation(def: &StepDef) -> String {
    format!("the compensation of {} got no answer", def.name)
}

/// Why a final command failed the instance, as its reason says after the
/// reason it compensated for.
fn unanswered_final(last: &FinalDef) -> String {
    format!("{} got no answer", last.command_type)
}

fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Engine<'_> {
    fn step_name(&self, index: usize) -> String {
        self.saga
            .position_name(index)
            .unwrap_or_else(|| format!("#{index}"))
    }

    /// Whether `inst` is at its final command, waiting for its answer.
    fn at_final(&self, inst: &Instance) -> bool {
        self.saga.is_final_position(inst.step, inst.finish)
    }

    /// Starts `inst`: sends the first step.
    pub(crate) fn start(
        &self,
        inst: &mut Instance,
        context: &MessageContext,
    ) -> Result<Outcome, SagaError> {
        let mut out = Outcome {
            changed: true,
            note: "started".into(),
            ..Outcome::default()
        };
        self.send_forward(inst, 0, context, &mut out)?;
        Ok(out)
    }

    fn send_forward(
        &self,
        inst: &mut Instance,
        index: usize,
        context: &MessageContext,
        out: &mut Outcome,
    ) -> Result<(), SagaError> {
        let step = &self.saga.steps[index];
        if inst.step != index || inst.status != SagaStatus::Running {
            inst.attempt = 0;
        }
        inst.status = SagaStatus::Running;
        inst.step = index;
        inst.attempt += 1;
        let envelope = match &step.command {
            Some(make) => make(&inst.data, context, self.source)?,
            None => {
                return Err(SagaError::Encode(format!(
                    "step {} has no command",
                    step.name
                )))
            }
        };
        out.sends.push(Sent {
            envelope,
            step: index,
            phase: Phase::Forward,
        });
        inst.deadline_at = Some(
            self.now
                .saturating_add(micros(step.deadline.unwrap_or_default())),
        );
        out.step = Some(step.name.clone());
        Ok(())
    }

    /// A reply to a command this instance sent for `step` in `phase`.
    ///
    /// It is current when the instance is at `step` and waits for that
    /// phase: running (forward) or compensating, or failed for want of the
    /// answer this reply gives ([`Engine::awaited_late`]), which resumes it.
    pub(crate) fn reply(
        &self,
        inst: &mut Instance,
        step: usize,
        phase: Phase,
        event: &Envelope,
    ) -> Result<Outcome, SagaError> {
        let mut out = Outcome {
            step: Some(self.step_name(step)),
            ..Outcome::default()
        };
        // A step of this definition (a reply to another version's step
        // past the last is only noted).
        let current = inst.step == step && step < self.saga.steps.len();
        let late = current && self.awaited_late(inst) == Some(phase);
        let at_final = inst.step == step && self.at_final(inst);
        match (phase, inst.status) {
            (Phase::Forward, SagaStatus::Running) if current => {
                self.forward_reply(inst, step, event, false, &mut out)?;
            }
            (Phase::Forward, SagaStatus::Failed) if late => {
                self.forward_reply(inst, step, event, true, &mut out)?;
            }
            (Phase::Compensation, SagaStatus::Compensating) if current => {
                self.compensation_reply(inst, step, event, false, &mut out)?;
            }
            (Phase::Compensation, SagaStatus::Failed) if late => {
                self.compensation_reply(inst, step, event, true, &mut out)?;
            }
            (Phase::Final, SagaStatus::Compensating) if at_final => {
                self.final_reply(inst, event, false, &mut out);
            }
            (Phase::Final, SagaStatus::Failed)
                if at_final && self.awaited_late(inst) == Some(Phase::Final) =>
            {
                self.final_reply(inst, event, true, &mut out);
            }
            (Phase::Final, _) => {
                out.note = format!("{} answered the final command", event.kind);
            }
            _ => {
                out.note = format!(
                    "late {} for {} ({}) while {} at {}; ignored",
                    event.kind,
                    self.step_name(step),
                    phase.as_str(),
                    inst.status.as_str(),
                    self.step_name(inst.step)
                );
            }
        }
        Ok(out)
    }

    /// What a `failed` instance still waits for at its step: the answer to
    /// the step's command (after the pivot) or to its compensation, when it
    /// failed because that answer did not come within its attempts. `None`
    /// when it is not failed, or failed on an answer (`attempt` is then 0).
    ///
    /// Which of the two follows from the step: an instance fails going
    /// forward only at a step it cannot undo (after the pivot, or a pivot
    /// without a compensation), and fails compensating only a step that
    /// has a compensation.
    pub(crate) fn awaited_late(&self, inst: &Instance) -> Option<Phase> {
        if inst.status != SagaStatus::Failed || inst.attempt == 0 {
            return None;
        }
        if self.at_final(inst) {
            return Some(Phase::Final);
        }
        self.saga.steps.get(inst.step)?;
        if self.saga.undoable(inst.step) {
            Some(Phase::Compensation)
        } else {
            Some(Phase::Forward)
        }
    }

    /// A reply to the current step's command; `late` when the instance had
    /// failed waiting for it.
    fn forward_reply(
        &self,
        inst: &mut Instance,
        step: usize,
        event: &Envelope,
        late: bool,
        out: &mut Outcome,
    ) -> Result<(), SagaError> {
        let context = event.context();
        let def = &self.saga.steps[step];
        let resumed = if late { RESUMED } else { "" };
        if let Some((_, update)) = def.completes.iter().find(|(e, _)| e.matches(event)) {
            if let Some(update) = update {
                update(&mut inst.data, event)?;
            }
            out.changed = true;
            if late {
                // Going on: the failure it resumes from no longer holds
                // (its transition keeps it).
                inst.reason = None;
            }
            if step + 1 < self.saga.steps.len() {
                out.note = format!("{resumed}{} completed {}", event.kind, def.name);
                self.send_forward(inst, step + 1, &context, out)?;
            } else {
                out.note = format!(
                    "{resumed}{} completed {}, the last step",
                    event.kind, def.name
                );
                inst.status = SagaStatus::Completed;
                inst.deadline_at = None;
            }
        } else if let Some((_, reason)) = def.fails.iter().find(|(e, _)| e.matches(event)) {
            let why = format!("{}: {}", def.name, reason(event)?);
            out.changed = true;
            let resent = inst.attempt > 1;
            if resent && self.saga.compensable(step) && !self.saga.undoable(step) {
                // A pivot without a compensation, sent more than once: an
                // earlier attempt may have taken effect and nothing undoes
                // it, so going back would be wrong; its answer is awaited.
                out.note = format!(
                    "{} failed {} (sent {} times: an earlier attempt may have taken effect, and it \
                     has no compensation); needs attention (a late answer resumes it)",
                    event.kind, def.name, inst.attempt
                );
                inst.status = SagaStatus::Failed;
                inst.reason = Some(why);
                inst.deadline_at = None;
            } else if self.saga.compensable(step) {
                // The failed step had no effect, unless it was sent more
                // than once: an earlier attempt may still have taken
                // effect, so it is undone too (compensations are safe
                // for what never happened).
                out.note = if resent {
                    format!(
                        "{} failed {} (sent {} times: it is compensated too); compensating",
                        event.kind, def.name, inst.attempt
                    )
                } else {
                    format!("{} failed {}; compensating", event.kind, def.name)
                };
                self.begin_compensation(inst, step, resent, why, Finish::Failure, &context, out)?;
            } else {
                out.note = if late {
                    format!(
                        "late {} failed {} after the pivot; failed now for this answer; needs attention",
                        event.kind, def.name
                    )
                } else {
                    format!(
                        "{} failed {} after the pivot; needs attention",
                        event.kind, def.name
                    )
                };
                inst.status = SagaStatus::Failed;
                inst.reason = Some(why);
                inst.deadline_at = None;
                // Answered: no later reply resumes it.
                inst.attempt = 0;
            }
        } else {
            out.note = format!(
                "{} neither completes nor fails {}; ignored",
                event.kind, def.name
            );
        }
        Ok(())
    }

    /// A reply to the final command the instance waits on; `late` when it
    /// had failed waiting for it.
    fn final_reply(&self, inst: &mut Instance, event: &Envelope, late: bool, out: &mut Outcome) {
        let Some(last) = self.saga.final_of(inst.finish) else {
            return;
        };
        if last.completes.iter().any(|e| e.matches(event)) {
            out.changed = true;
            if late {
                inst.resume_reason(&unanswered_final(last));
            }
            let resumed = if late { RESUMED } else { "" };
            out.note = format!("{resumed}{} answered {}", event.kind, last.command_type);
            inst.status = SagaStatus::Compensated;
            inst.deadline_at = None;
        } else {
            out.note = format!(
                "{} does not answer {}; ignored",
                event.kind, last.command_type
            );
        }
    }

    /// A reply to the current compensation; `late` when the instance had
    /// failed waiting for it.
    fn compensation_reply(
        &self,
        inst: &mut Instance,
        step: usize,
        event: &Envelope,
        late: bool,
        out: &mut Outcome,
    ) -> Result<(), SagaError> {
        let def = &self.saga.steps[step];
        if def.compensation_completes.iter().any(|e| e.matches(event)) {
            out.changed = true;
            if late {
                // The final command carries the reason it compensates for.
                inst.resume_reason(&unanswered_compensation(def));
            }
            let resumed = if late { RESUMED } else { "" };
            out.note = format!(
                "{resumed}{} completed the compensation of {}",
                event.kind, def.name
            );
            self.next_compensation(inst, &event.context(), out)?;
        } else {
            out.note = format!(
                "{} does not complete the compensation of {}; ignored",
                event.kind, def.name
            );
        }
        Ok(())
    }

    /// The instance's deadline passed.
    pub(crate) fn deadline(&self, inst: &mut Instance) -> Result<Outcome, SagaError> {
        let context = MessageContext::with_correlation(inst.correlation_id.clone());
        if self.at_final(inst) {
            return self.final_deadline(inst, &context);
        }
        let index = inst.step;
        let def = &self.saga.steps[index];
        let mut out = Outcome {
            changed: true,
            step: Some(def.name.clone()),
            ..Outcome::default()
        };
        match inst.status {
            SagaStatus::Running if inst.attempt < def.attempts => {
                out.note = format!(
                    "{} passed its deadline; sending again (attempt {} of {})",
                    def.name,
                    inst.attempt + 1,
                    def.attempts
                );
                self.send_forward(inst, index, &context, &mut out)?;
            }
            SagaStatus::Running if self.saga.undoable(index) => {
                let why = format!("{} got no answer before its deadline", def.name);
                out.note = format!("{why}; compensating, {} included", def.name);
                self.begin_compensation(
                    inst,
                    index,
                    true,
                    why,
                    Finish::Failure,
                    &context,
                    &mut out,
                )?;
            }
            SagaStatus::Running => {
                let why = if self.saga.compensable(index) {
                    format!(
                        "{} got no answer after {} attempts; it is the pivot, has no compensation \
                         and may have taken effect: the saga cannot go back",
                        def.name, def.attempts
                    )
                } else {
                    format!(
                        "{} got no answer after {} attempts, after the pivot: the saga cannot go back",
                        def.name, def.attempts
                    )
                };
                // Going forward there is no earlier reason to keep.
                inst.fail_unanswered(why, &mut out);
            }
            SagaStatus::Compensating if inst.attempt < def.compensation_attempts => {
                out.note = format!(
                    "the compensation of {} passed its deadline; sending again (attempt {} of {})",
                    def.name,
                    inst.attempt + 1,
                    def.compensation_attempts
                );
                self.send_compensation(inst, index, &context, &mut out)?;
            }
            SagaStatus::Compensating => {
                let why = format!(
                    "{} after {} attempts",
                    unanswered_compensation(def),
                    def.compensation_attempts
                );
                inst.fail_unanswered(why, &mut out);
            }
            _ => {
                out.changed = false;
                out.note = "deadline of a finished instance; ignored".into();
            }
        }
        Ok(out)
    }

    /// The deadline of the final command's send passed.
    fn final_deadline(
        &self,
        inst: &mut Instance,
        context: &MessageContext,
    ) -> Result<Outcome, SagaError> {
        let mut out = Outcome {
            changed: true,
            step: Some(FINAL.to_owned()),
            ..Outcome::default()
        };
        let Some(last) = self.saga.final_of(inst.finish) else {
            out.changed = false;
            return Ok(out);
        };
        match inst.status {
            SagaStatus::Compensating if inst.attempt < self.saga.final_attempts => {
                out.note = format!(
                    "{} passed its deadline; sending again (attempt {} of {})",
                    last.command_type,
                    inst.attempt + 1,
                    self.saga.final_attempts
                );
                self.send_final(inst, context, &mut out)?;
            }
            SagaStatus::Compensating => {
                let why = format!(
                    "{} after {} attempts",
                    unanswered_final(last),
                    self.saga.final_attempts
                );
                inst.fail_unanswered(why, &mut out);
            }
            _ => {
                out.changed = false;
                out.note = "deadline of a finished instance; ignored".into();
            }
        }
        Ok(out)
    }

    /// An operator retries `inst`, which failed waiting for an answer to
    /// its last command, sent in phase `sent` (its deadlines ran out): the
    /// command is sent again and its attempts are counted afresh, as if
    /// they had not run out; `by` names who asked. `None` when it waits for
    /// no answer (it is not failed, or an answer failed it for good), or
    /// not for one in `sent` (another version's definition).
    pub(crate) fn retry(
        &self,
        inst: &mut Instance,
        sent: Phase,
        by: &str,
    ) -> Result<Option<Outcome>, SagaError> {
        let Some(phase) = self.awaited_late(inst).filter(|p| *p == sent) else {
            return Ok(None);
        };
        let context = MessageContext::with_correlation(inst.correlation_id.clone());
        let mut out = Outcome {
            changed: true,
            ..Outcome::default()
        };
        let index = inst.step;
        inst.attempt = 0;
        match phase {
            Phase::Forward => {
                // Going forward again: no failure holds (its transition
                // keeps it).
                inst.reason = None;
                inst.status = SagaStatus::Running;
                if self.saga.compensable(index) {
                    // A pivot without a compensation (a step that fails
                    // forward before the pivot has one): it was sent
                    // before, and an earlier send may have taken effect, so
                    // this one counts as sent again; a failing answer then
                    // leaves it failed instead of compensating.
                    inst.attempt = 1;
                }
                self.send_forward(inst, index, &context, &mut out)?;
            }
            Phase::Compensation => {
                inst.resume_reason(&unanswered_compensation(&self.saga.steps[index]));
                self.send_compensation(inst, index, &context, &mut out)?;
            }
            Phase::Final => {
                if let Some(last) = self.saga.final_of(inst.finish) {
                    inst.resume_reason(&unanswered_final(last));
                }
                self.send_final(inst, &context, &mut out)?;
            }
        }
        let sent = out
            .sends
            .first()
            .map_or("nothing", |s| s.envelope.kind.as_str());
        out.note = format!("retried by {by}: {sent} sent again, its attempts counted afresh");
        Ok(Some(out))
    }

    /// A cancel event asks the instance to stop.
    pub(crate) fn cancel(
        &self,
        inst: &mut Instance,
        reason: String,
        event: &Envelope,
    ) -> Result<Outcome, SagaError> {
        let context = event.context();
        let index = inst.step;
        let mut out = Outcome {
            step: Some(self.step_name(index)),
            ..Outcome::default()
        };
        match inst.status {
            SagaStatus::Running if self.saga.undoable(index) => {
                out.changed = true;
                out.note = format!(
                    "{} cancels it at {}; compensating, {} included",
                    event.kind,
                    self.step_name(index),
                    self.step_name(index)
                );
                self.begin_compensation(
                    inst,
                    index,
                    true,
                    reason,
                    Finish::Cancel,
                    &context,
                    &mut out,
                )?;
            }
            SagaStatus::Running if self.saga.compensable(index) => {
                out.note = format!(
                    "{} at the pivot {}, which has no compensation and may take effect; the saga goes on",
                    event.kind,
                    self.step_name(index)
                );
            }
            SagaStatus::Running => {
                out.note = format!("{} after the pivot; the saga goes on", event.kind);
            }
            status => {
                out.note = format!("{} while {}; nothing to stop", event.kind, status.as_str());
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn begin_compensation(
        &self,
        inst: &mut Instance,
        index: usize,
        include_current: bool,
        reason: String,
        finish: Finish,
        context: &MessageContext,
        out: &mut Outcome,
    ) -> Result<(), SagaError> {
        let last = if include_current { index + 1 } else { index };
        inst.compensations = (0..last)
            .rev()
            .filter(|&i| self.saga.steps[i].compensation.is_some())
            .collect();
        inst.status = SagaStatus::Compensating;
        inst.reason = Some(reason);
        inst.finish = finish;
        self.next_compensation(inst, context, out)
    }

    fn next_compensation(
        &self,
        inst: &mut Instance,
        context: &MessageContext,
        out: &mut Outcome,
    ) -> Result<(), SagaError> {
        if inst.compensations.is_empty() {
            if self.saga.awaits_final(inst.finish) {
                return self.send_final(inst, context, out);
            }
            let why = inst.reason.clone().unwrap_or_default();
            if let Some(last) = self.saga.final_of(inst.finish) {
                out.sends.push(Sent {
                    envelope: (last.make)(&inst.data, context, self.source, &why)?,
                    step: inst.step,
                    phase: Phase::Final,
                });
            }
            inst.status = SagaStatus::Compensated;
            inst.deadline_at = None;
            return Ok(());
        }
        let index = inst.compensations.remove(0);
        inst.attempt = 0;
        self.send_compensation(inst, index, context, out)
    }

    /// Sends the final command the saga waits on, from the position after
    /// the last step.
    fn send_final(
        &self,
        inst: &mut Instance,
        context: &MessageContext,
        out: &mut Outcome,
    ) -> Result<(), SagaError> {
        let Some(last) = self.saga.final_of(inst.finish) else {
            return Err(SagaError::Encode("the saga has no final command".into()));
        };
        let index = self.saga.steps.len();
        if inst.step != index {
            inst.attempt = 0;
        }
        inst.status = SagaStatus::Compensating;
        inst.step = index;
        inst.attempt += 1;
        let why = inst.reason.clone().unwrap_or_default();
        out.sends.push(Sent {
            envelope: (last.make)(&inst.data, context, self.source, &why)?,
            step: index,
            phase: Phase::Final,
        });
        inst.deadline_at = Some(self.now.saturating_add(micros(self.saga.final_deadline)));
        out.step = Some(FINAL.to_owned());
        Ok(())
    }

    fn send_compensation(
        &self,
        inst: &mut Instance,
        index: usize,
        context: &MessageContext,
        out: &mut Outcome,
    ) -> Result<(), SagaError> {
        let step = &self.saga.steps[index];
        let Some(make) = &step.compensation else {
            return Err(SagaError::Encode(format!(
                "step {} has no compensation",
                step.name
            )));
        };
        inst.status = SagaStatus::Compensating;
        inst.step = index;
        inst.attempt += 1;
        out.sends.push(Sent {
            envelope: make(&inst.data, context, self.source)?,
            step: index,
            phase: Phase::Compensation,
        });
        let deadline = step
            .compensation_deadline
            .or(step.deadline)
            .unwrap_or_default();
        inst.deadline_at = Some(self.now.saturating_add(micros(deadline)));
        out.step = Some(step.name.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The state machine alone: replies are matched to what the instance
    //! sent as the coordinator matches them (by the command they answer),
    //! and time moves only when a test passes a deadline.

    use std::time::Duration;

    use serde::{Deserialize, Serialize};
    use skein_message::{Command, Contract, Event};
    use uuid::Uuid;

    use super::*;

    use crate::test_messages::*;

    /// How the saga ends after compensating, with the reason.
    #[derive(Debug, Serialize, Deserialize)]
    struct Reject {
        id: String,
        reason: String,
    }
    impl Contract for Reject {
        const SERVICE: &'static str = "shop";
        const NAME: &'static str = "reject";
        const VERSION: u32 = 1;
    }
    impl Command for Reject {
        fn entity_id(&self) -> String {
            self.id.clone()
        }
    }

    #[derive(Serialize, Deserialize)]
    struct Order {
        id: String,
    }

    const DEADLINE: Duration = Duration::from_secs(10);

    /// reserve -> pay (pivot) -> ship (2 sends) -> notify; compensations
    /// are sent twice before the instance fails.
    fn shop() -> Saga {
        shop_builder().build().expect("a valid definition")
    }

    /// [`shop`], waiting for its final commands' answers: `rejected` after
    /// a failure, `stopped` after a cancel; sent twice.
    fn shop_awaiting_its_end() -> Saga {
        shop_builder()
            .compensated_on::<Rejected>()
            .cancelled_on::<Stopped>()
            .final_deadline(DEADLINE)
            .final_attempts(2)
            .build()
            .expect("a valid definition")
    }

    fn shop_builder() -> crate::SagaBuilder<Order> {
        Saga::builder::<Order>("shop")
            .start_on(|e: &Placed| Some((e.id.clone(), Order { id: e.id.clone() })))
            .step("reserve", |s| {
                s.send(|o: &Order| Reserve { id: o.id.clone() })
                    .completes_on::<Reserved>()
                    .fails_on(|_: &Refused| "refused".to_owned())
                    .compensate(|o: &Order| Release { id: o.id.clone() })
                    .compensation_completes_on::<Released>()
                    .compensation_attempts(2)
                    .deadline(DEADLINE)
            })
            .step("pay", |s| {
                s.pivot()
                    .send(|o: &Order| Pay { id: o.id.clone() })
                    .completes_on::<Paid>()
                    .fails_on(|_: &Declined| "declined".to_owned())
                    .compensate(|o: &Order| Refund { id: o.id.clone() })
                    .compensation_completes_on::<Refunded>()
                    .compensation_attempts(2)
                    .deadline(DEADLINE)
            })
            .step("ship", |s| {
                s.send(|o: &Order| Ship { id: o.id.clone() })
                    .completes_on::<Shipped>()
                    .fails_on(|_: &Lost| "lost".to_owned())
                    .attempts(2)
                    .deadline(DEADLINE)
            })
            .step("notify", |s| {
                s.send(|o: &Order| Notify { id: o.id.clone() })
                    .completes_on::<Notified>()
                    .deadline(DEADLINE)
            })
            .cancel_on(|e: &Stop| (e.id.clone(), "stopped".to_owned()))
            .on_compensated(|o: &Order, why: &str| Reject {
                id: o.id.clone(),
                reason: format!("rejected: {why}"),
            })
            .on_cancelled(|o: &Order, why: &str| Reject {
                id: o.id.clone(),
                reason: format!("cancelled: {why}"),
            })
    }

    /// `shop`, but pay (the pivot) has no compensation and is sent twice.
    fn shop_with_a_bare_pivot() -> Saga {
        Saga::builder::<Order>("shop")
            .start_on(|e: &Placed| Some((e.id.clone(), Order { id: e.id.clone() })))
            .step("reserve", |s| {
                s.send(|o: &Order| Reserve { id: o.id.clone() })
                    .completes_on::<Reserved>()
                    .fails_on(|_: &Refused| "refused".to_owned())
                    .compensate(|o: &Order| Release { id: o.id.clone() })
                    .compensation_completes_on::<Released>()
                    .deadline(DEADLINE)
            })
            .step("pay", |s| {
                s.pivot()
                    .send(|o: &Order| Pay { id: o.id.clone() })
                    .completes_on::<Paid>()
                    .fails_on(|_: &Declined| "declined".to_owned())
                    .attempts(2)
                    .deadline(DEADLINE)
            })
            .step("ship", |s| {
                s.send(|o: &Order| Ship { id: o.id.clone() })
                    .completes_on::<Shipped>()
                    .deadline(DEADLINE)
            })
            .cancel_on(|e: &Stop| (e.id.clone(), "stopped".to_owned()))
            .on_compensated(|o: &Order, why: &str| Reject {
                id: o.id.clone(),
                reason: format!("rejected: {why}"),
            })
            .on_cancelled(|o: &Order, why: &str| Reject {
                id: o.id.clone(),
                reason: format!("cancelled: {why}"),
            })
            .build()
            .expect("a valid definition")
    }

    /// What one input did, as a test sees it.
    #[derive(Debug)]
    struct Did {
        changed: bool,
        /// Types of the commands sent.
        sent: Vec<String>,
        note: String,
    }

    /// One instance and everything it sent.
    struct Run {
        saga: Saga,
        inst: Instance,
        now: i64,
        /// Every command sent, with its step and phase (`saga_sent`).
        sent: Vec<Sent>,
    }

    impl Run {
        fn start() -> Self {
            Self::start_of(shop())
        }

        fn start_of(saga: Saga) -> Self {
            let now = 1_000_000;
            let inst = Instance::new(
                &saga,
                "o1".into(),
                serde_json::json!({ "id": "o1" }),
                "request-1".into(),
                now,
            );
            let mut run = Self {
                saga,
                inst,
                now,
                sent: Vec::new(),
            };
            let placed =
                Envelope::event("shop", &Placed { id: "o1".into() }, &MessageContext::root())
                    .expect("an event");
            run.apply(|engine, inst| engine.start(inst, &placed.context()));
            run
        }

        fn apply(
            &mut self,
            input: impl FnOnce(&Engine<'_>, &mut Instance) -> Result<Outcome, SagaError>,
        ) -> Did {
            let engine = Engine {
                saga: &self.saga,
                source: "orchestrator",
                now: self.now,
            };
            let before = self.inst.clone();
            let out = input(&engine, &mut self.inst).expect("the engine applies the input");
            if !out.changed {
                assert_eq!(self.inst, before, "unchanged, said {:?}", out.note);
                assert!(out.sends.is_empty(), "sent without a change");
            }
            let did = Did {
                changed: out.changed,
                sent: out.sends.iter().map(|s| s.envelope.kind.clone()).collect(),
                note: out.note,
            };
            self.sent.extend(out.sends);
            did
        }

        /// The ids of the commands of type `kind` sent so far, oldest first.
        fn sent(&self, kind: &str) -> Vec<Uuid> {
            self.sent
                .iter()
                .filter(|s| s.envelope.kind == kind)
                .map(|s| s.envelope.id)
                .collect()
        }

        /// The last command of type `kind` sent.
        fn last(&self, kind: &str) -> Uuid {
            *self.sent(kind).last().expect("sent")
        }

        /// `event` in answer to the command `to`, matched as the
        /// coordinator matches it.
        fn answer<E: Event>(&mut self, to: Uuid, event: &E) -> Did {
            let command = self
                .sent
                .iter()
                .find(|s| s.envelope.id == to)
                .expect("a command the instance sent");
            let (step, phase) = (command.step, command.phase);
            let envelope =
                Envelope::event("shop", event, &command.envelope.context()).expect("an event");
            self.apply(|engine, inst| engine.reply(inst, step, phase, &envelope))
        }

        /// Time passes the instance's deadline (if it has one) and the
        /// coordinator acts on it.
        fn deadline(&mut self) -> Did {
            if let Some(at) = self.inst.deadline_at {
                self.now = at + 1;
            }
            self.apply(|engine, inst| engine.deadline(inst))
        }

        fn cancel(&mut self) -> Did {
            let stop = Envelope::event("shop", &Stop { id: "o1".into() }, &MessageContext::root())
                .expect("an event");
            self.apply(|engine, inst| engine.cancel(inst, "stopped".into(), &stop))
        }

        /// The reason the final command carries.
        fn rejected_for(&self) -> String {
            let last = self.sent.last().expect("sent");
            assert_eq!(last.phase, Phase::Final);
            last.envelope.decode::<Reject>().expect("a reject").reason
        }

        fn reply_to_reserve(&mut self) {
            let reserve = self.last("shop.reserve.v1");
            self.answer(reserve, &Reserved { id: "o1".into() });
        }

        fn reply_to_pay(&mut self) {
            let pay = self.last("shop.pay.v1");
            self.answer(pay, &Paid { id: "o1".into() });
        }

        /// Pay gets no answer; so does its compensation, twice.
        fn fail_compensating_pay(&mut self) {
            self.reply_to_reserve();
            self.deadline();
            assert_eq!(self.inst.status, SagaStatus::Compensating);
            self.deadline();
            let failed = self.deadline();
            assert_eq!(self.inst.status, SagaStatus::Failed, "{failed:?}");
        }

        /// Ship gets no answer to either of its sends.
        fn fail_shipping(&mut self) {
            self.reply_to_reserve();
            self.reply_to_pay();
            self.deadline();
            let failed = self.deadline();
            assert_eq!(self.inst.status, SagaStatus::Failed, "{failed:?}");
        }
    }

    #[test]
    fn an_awaited_final_command_is_sent_again_then_fails_and_a_late_answer_ends_it() {
        let mut run = Run::start_of(shop_awaiting_its_end());
        run.reply_to_reserve();
        let pay = run.last("shop.pay.v1");
        run.answer(pay, &Declined { id: "o1".into() });
        let release = run.last("shop.release.v1");
        let did = run.answer(release, &Released { id: "o1".into() });
        assert_eq!(did.sent, ["shop.reject.v1"], "{did:?}");
        assert_eq!(run.rejected_for(), "rejected: pay: declined");
        assert_eq!(
            (run.inst.status, run.inst.step, run.inst.attempt),
            (SagaStatus::Compensating, 4, 1),
            "waits at the position after the last step"
        );
        assert!(run.inst.deadline_at.is_some());
        assert_eq!(
            run.saga.waiting_for(4, true, run.inst.finish),
            ["shop.rejected"]
        );

        let again = run.deadline();
        assert_eq!(again.sent, ["shop.reject.v1"]);
        assert_eq!(
            again.note,
            "shop.reject passed its deadline; sending again (attempt 2 of 2)"
        );
        let failed = run.deadline();
        assert!(failed.sent.is_empty());
        assert_eq!(run.inst.status, SagaStatus::Failed, "{failed:?}");
        assert_eq!(run.inst.deadline_at, None);
        assert_eq!(
            run.inst.reason.as_deref(),
            Some("pay: declined; then shop.reject got no answer after 2 attempts")
        );

        // The first send's answer comes after all.
        let first = run.sent("shop.reject.v1")[0];
        let late = run.answer(first, &Rejected { id: "o1".into() });
        assert_eq!(run.inst.status, SagaStatus::Compensated, "{late:?}");
        assert_eq!(
            late.note,
            "resumed on a late reply: shop.rejected.v1 answered shop.reject"
        );
        assert_eq!(run.inst.reason.as_deref(), Some("pay: declined"));
        assert_eq!(run.inst.deadline_at, None);
        let second = run.sent("shop.reject.v1")[1];
        let twice = run.answer(second, &Rejected { id: "o1".into() });
        assert!(!twice.changed, "{twice:?}");
        assert!(!run.deadline().changed);
    }

    impl Run {
        fn retry(&mut self) -> Option<Did> {
            let engine = Engine {
                saga: &self.saga,
                source: "orchestrator",
                now: self.now,
            };
            let before = self.inst.clone();
            let sent = self.sent.last().expect("sent").phase;
            let out = engine
                .retry(&mut self.inst, sent, "admin")
                .expect("the engine applies the retry");
            let Some(out) = out else {
                assert_eq!(self.inst, before, "refused, yet changed");
                return None;
            };
            let did = Did {
                changed: out.changed,
                sent: out.sends.iter().map(|s| s.envelope.kind.clone()).collect(),
                note: out.note,
            };
            self.sent.extend(out.sends);
            Some(did)
        }
    }

    #[test]
    fn a_retry_sends_what_a_failed_instance_waits_for_with_its_attempts_counted_afresh() {
        // A compensation that got no answer: sent again, twice more on its
        // deadlines, then failed again; retried once more and answered, the
        // saga goes on compensating with its first reason.
        let mut run = Run::start();
        run.fail_compensating_pay();
        let retried = run.retry().expect("retried");
        assert_eq!(retried.sent, ["shop.refund.v1"]);
        assert_eq!(
            retried.note,
            "retried by admin: shop.refund.v1 sent again, its attempts counted afresh"
        );
        assert_eq!(
            (run.inst.status, run.inst.step, run.inst.attempt),
            (SagaStatus::Compensating, 1, 1)
        );
        assert_eq!(run.inst.deadline_at, Some(run.now + 10_000_000));
        assert_eq!(
            run.inst.reason.as_deref(),
            Some("pay got no answer before its deadline")
        );
        assert_eq!(run.deadline().sent, ["shop.refund.v1"]);
        assert!(run.deadline().sent.is_empty());
        assert_eq!(run.inst.status, SagaStatus::Failed);
        assert_eq!(run.sent("shop.refund.v1").len(), 4);
        run.retry().expect("retried again");
        let refund = run.last("shop.refund.v1");
        let resumed = run.answer(refund, &Refunded { id: "o1".into() });
        assert_eq!(resumed.sent, ["shop.release.v1"]);
        assert_eq!(run.inst.status, SagaStatus::Compensating);

        // A step after the pivot that got no answer: forward again, with
        // no failure left to report; its answer lets the saga go on.
        let mut run = Run::start();
        run.fail_shipping();
        let retried = run.retry().expect("retried");
        assert_eq!(retried.sent, ["shop.ship.v1"]);
        assert_eq!(
            (run.inst.status, run.inst.step, run.inst.attempt),
            (SagaStatus::Running, 2, 1)
        );
        assert_eq!(run.inst.reason, None);
        let ship = run.last("shop.ship.v1");
        assert_eq!(
            run.answer(ship, &Shipped { id: "o1".into() }).sent,
            ["shop.notify.v1"]
        );

        // A final command that got no answer: sent again with the reason it
        // carries; its answer ends the saga compensated.
        let mut run = Run::start_of(shop_awaiting_its_end());
        run.reply_to_reserve();
        let pay = run.last("shop.pay.v1");
        run.answer(pay, &Declined { id: "o1".into() });
        let release = run.last("shop.release.v1");
        run.answer(release, &Released { id: "o1".into() });
        run.deadline();
        run.deadline();
        assert_eq!(run.inst.status, SagaStatus::Failed);
        let retried = run.retry().expect("retried");
        assert_eq!(retried.sent, ["shop.reject.v1"]);
        assert_eq!(run.rejected_for(), "rejected: pay: declined");
        assert_eq!(
            (run.inst.status, run.inst.step, run.inst.attempt),
            (SagaStatus::Compensating, 4, 1)
        );
        let reject = run.last("shop.reject.v1");
        run.answer(reject, &Rejected { id: "o1".into() });
        assert_eq!(run.inst.status, SagaStatus::Compensated);
        assert_eq!(run.inst.reason.as_deref(), Some("pay: declined"));
    }

    #[test]
    fn a_retried_pivot_without_compensation_counts_as_sent_again() {
        // Pay went out twice unanswered; a retry sends it a third time. A
        // decline, to that send or late to an earlier one, must not release
        // what an earlier pay may have paid for: the instance fails again,
        // waiting, and an earlier pay's success resumes it.
        let mut run = Run::start_of(shop_with_a_bare_pivot());
        run.reply_to_reserve();
        run.deadline();
        run.deadline();
        assert_eq!(run.inst.status, SagaStatus::Failed);
        let retried = run.retry().expect("retried");
        assert_eq!(retried.sent, ["shop.pay.v1"]);
        assert_eq!(
            (run.inst.status, run.inst.attempt),
            (SagaStatus::Running, 2)
        );
        let pays = run.sent("shop.pay.v1");
        let declined = run.answer(pays[2], &Declined { id: "o1".into() });
        assert!(declined.sent.is_empty(), "{declined:?}");
        assert_eq!(run.inst.status, SagaStatus::Failed);
        assert!(run.sent("shop.release.v1").is_empty());
        let resumed = run.answer(pays[0], &Paid { id: "o1".into() });
        assert_eq!(resumed.sent, ["shop.ship.v1"], "{resumed:?}");
    }

    #[test]
    fn only_an_instance_that_failed_for_want_of_an_answer_is_retried() {
        let mut run = Run::start();
        assert!(run.retry().is_none(), "a running instance");
        // A step after the pivot that an answer failed: sending it again
        // would not change the answer.
        run.reply_to_reserve();
        run.reply_to_pay();
        let ship = run.last("shop.ship.v1");
        run.answer(ship, &Lost { id: "o1".into() });
        assert_eq!(run.inst.status, SagaStatus::Failed);
        assert!(run.retry().is_none(), "failed on an answer");
        let mut run = Run::start();
        run.reply_to_reserve();
        run.reply_to_pay();
        let ship = run.last("shop.ship.v1");
        run.answer(ship, &Shipped { id: "o1".into() });
        let notify = run.last("shop.notify.v1");
        run.answer(notify, &Notified { id: "o1".into() });
        assert_eq!(run.inst.status, SagaStatus::Completed);
        assert!(run.retry().is_none(), "a completed instance");
    }

    #[test]
    fn a_cancelled_instance_ends_only_on_its_own_final_answer() {
        let mut run = Run::start_of(shop_awaiting_its_end());
        run.cancel();
        let release = run.last("shop.release.v1");
        run.answer(release, &Released { id: "o1".into() });
        assert_eq!(run.rejected_for(), "cancelled: stopped");
        let reject = run.last("shop.reject.v1");
        let wrong = run.answer(reject, &Rejected { id: "o1".into() });
        assert!(!wrong.changed, "{wrong:?}");
        assert_eq!(
            wrong.note,
            "shop.rejected.v1 does not answer shop.reject; ignored"
        );
        assert_eq!(
            run.saga.waiting_for(4, true, run.inst.finish),
            ["shop.stopped"]
        );
        let right = run.answer(reject, &Stopped { id: "o1".into() });
        assert!(right.changed);
        assert_eq!(run.inst.status, SagaStatus::Compensated);
        assert_eq!(right.note, "shop.stopped.v1 answered shop.reject");
        // A cancel now stops nothing.
        assert!(!run.cancel().changed);
    }

    #[test]
    fn a_step_sent_twice_and_then_failed_is_compensated_too() {
        let saga = Saga::builder::<Order>("shop")
            .start_on(|e: &Placed| Some((e.id.clone(), Order { id: e.id.clone() })))
            .step("reserve", |s| {
                s.send(|o: &Order| Reserve { id: o.id.clone() })
                    .completes_on::<Reserved>()
                    .fails_on(|_: &Refused| "refused".to_owned())
                    .compensate(|o: &Order| Release { id: o.id.clone() })
                    .compensation_completes_on::<Released>()
                    .attempts(2)
                    .deadline(DEADLINE)
            })
            .step("pay", |s| {
                s.pivot()
                    .send(|o: &Order| Pay { id: o.id.clone() })
                    .completes_on::<Paid>()
                    .deadline(DEADLINE)
            })
            .on_compensated(|o: &Order, why: &str| Reject {
                id: o.id.clone(),
                reason: format!("rejected: {why}"),
            })
            .build()
            .expect("a valid definition");
        // Sent once and refused: it had no effect, nothing to undo.
        let mut once = Run::start_of(saga.clone());
        let reserve = once.last("shop.reserve.v1");
        let refused = once.answer(reserve, &Refused { id: "o1".into() });
        assert_eq!(refused.sent, ["shop.reject.v1"], "{refused:?}");
        // Sent twice, the second refused: the first may have reserved.
        let mut twice = Run::start_of(saga);
        assert_eq!(twice.deadline().sent, ["shop.reserve.v1"]);
        let second = twice.last("shop.reserve.v1");
        let refused = twice.answer(second, &Refused { id: "o1".into() });
        assert_eq!(refused.sent, ["shop.release.v1"], "{refused:?}");
        assert_eq!(twice.inst.status, SagaStatus::Compensating);
    }

    #[test]
    fn a_pivot_without_compensation_that_gets_no_answer_waits_for_it_instead_of_compensating() {
        let mut run = Run::start_of(shop_with_a_bare_pivot());
        run.reply_to_reserve();
        // A cancel while pay may still take effect changes nothing.
        let cancel = run.cancel();
        assert!(!cancel.changed, "{cancel:?}");
        assert_eq!(
            cancel.note,
            "shop.stop.v1 at the pivot pay, which has no compensation and may take effect; the saga goes on"
        );
        assert_eq!(run.deadline().sent, ["shop.pay.v1"]);
        // Out of attempts: the payment may have gone through and nothing
        // refunds it, so nothing is released and nothing rejected.
        let failed = run.deadline();
        assert!(failed.sent.is_empty(), "{failed:?}");
        assert_eq!(run.inst.status, SagaStatus::Failed);
        assert_eq!(
            run.inst.reason.as_deref(),
            Some(
                "pay got no answer after 2 attempts; it is the pivot, has no compensation and \
                 may have taken effect: the saga cannot go back"
            )
        );
        assert!(run.sent("shop.release.v1").is_empty());
        // The late answer resumes it forward.
        let pays = run.sent("shop.pay.v1");
        let resumed = run.answer(pays[0], &Paid { id: "o1".into() });
        assert_eq!(resumed.sent, ["shop.ship.v1"], "{resumed:?}");
        assert_eq!((run.inst.status, run.inst.step), (SagaStatus::Running, 2));
        // Refused once it was sent twice: the first send may have taken
        // effect and nothing undoes it, so nothing is released and the
        // instance waits; the first send's success still resumes it.
        let mut declined = Run::start_of(shop_with_a_bare_pivot());
        declined.reply_to_reserve();
        declined.deadline();
        let pays = declined.sent("shop.pay.v1");
        assert_eq!(pays.len(), 2);
        let refused = declined.answer(pays[1], &Declined { id: "o1".into() });
        assert!(refused.sent.is_empty(), "{refused:?}");
        assert_eq!(declined.inst.status, SagaStatus::Failed);
        let resumed = declined.answer(pays[0], &Paid { id: "o1".into() });
        assert_eq!(resumed.sent, ["shop.ship.v1"], "{resumed:?}");
        // Refused when sent once, it had no effect: the steps before it
        // are compensated.
        let mut once = Run::start_of(shop_with_a_bare_pivot());
        once.reply_to_reserve();
        let pay = once.last("shop.pay.v1");
        let late = once.answer(pay, &Declined { id: "o1".into() });
        assert_eq!(late.sent, ["shop.release.v1"], "{late:?}");
        assert_eq!(once.inst.status, SagaStatus::Compensating);
    }

    #[test]
    fn a_compensation_answered_after_its_attempts_resumes_the_failed_instance() {
        let mut run = Run::start();
        run.fail_compensating_pay();
        assert_eq!(run.inst.step, 1);
        assert_eq!(run.inst.deadline_at, None);
        assert_eq!(
            run.inst.reason.as_deref(),
            Some(
                "pay got no answer before its deadline; \
                 then the compensation of pay got no answer after 2 attempts"
            )
        );
        assert!(!run.deadline().changed, "nothing moves it on its own");
        let refunds = run.sent("shop.refund.v1");
        assert_eq!(refunds.len(), 2);

        // The first refund's answer, after the instance gave up on it.
        let resumed = run.answer(refunds[0], &Refunded { id: "o1".into() });
        assert!(resumed.changed);
        assert_eq!(
            resumed.note,
            "resumed on a late reply: shop.refunded.v1 completed the compensation of pay"
        );
        assert_eq!(resumed.sent, ["shop.release.v1"]);
        assert_eq!(run.inst.status, SagaStatus::Compensating);
        assert_eq!((run.inst.step, run.inst.attempt), (0, 1));
        assert_eq!(run.inst.deadline_at, Some(run.now + 10_000_000));
        assert_eq!(
            run.inst.reason.as_deref(),
            Some("pay got no answer before its deadline")
        );

        // The second refund's answer, later still: nothing more.
        let again = run.answer(refunds[1], &Refunded { id: "o1".into() });
        assert!(!again.changed && again.sent.is_empty(), "{again:?}");
        assert_eq!(
            again.note,
            "late shop.refunded.v1 for pay (compensation) while compensating at reserve; ignored"
        );

        // The release goes as any compensation: resent on its deadline,
        // and its answer ends the saga with the first reason.
        let resent = run.deadline();
        assert_eq!(resent.sent, ["shop.release.v1"]);
        let release = run.sent("shop.release.v1")[0];
        let done = run.answer(release, &Released { id: "o1".into() });
        assert_eq!(done.sent, ["shop.reject.v1"]);
        assert_eq!(run.inst.status, SagaStatus::Compensated);
        assert_eq!(run.inst.deadline_at, None);
        assert_eq!(
            run.rejected_for(),
            "rejected: pay got no answer before its deadline"
        );
        for late in [refunds[0], refunds[1]] {
            assert!(!run.answer(late, &Refunded { id: "o1".into() }).changed);
        }
        assert_eq!(run.sent("shop.reject.v1").len(), 1);
        assert!(!run.deadline().changed);
    }

    #[test]
    fn the_last_compensation_answered_late_sends_the_final_command() {
        // After a failure: the final command carries the failure's reason.
        let mut run = Run::start();
        run.reply_to_reserve();
        let pay = run.last("shop.pay.v1");
        run.answer(pay, &Declined { id: "o1".into() });
        run.deadline();
        run.deadline();
        assert_eq!(run.inst.status, SagaStatus::Failed);
        assert_eq!(
            run.inst.reason.as_deref(),
            Some("pay: declined; then the compensation of reserve got no answer after 2 attempts")
        );
        let release = run.sent("shop.release.v1");
        let done = run.answer(release[1], &Released { id: "o1".into() });
        assert_eq!(
            done.note,
            "resumed on a late reply: shop.released.v1 completed the compensation of reserve"
        );
        assert_eq!(done.sent, ["shop.reject.v1"]);
        assert_eq!(run.inst.status, SagaStatus::Compensated);
        assert_eq!(run.inst.reason.as_deref(), Some("pay: declined"));
        assert_eq!(run.rejected_for(), "rejected: pay: declined");
        let again = run.answer(release[0], &Released { id: "o1".into() });
        assert!(!again.changed && again.sent.is_empty(), "{again:?}");

        // After a cancel: the cancel's final command, with its reason.
        let mut run = Run::start();
        run.cancel();
        run.deadline();
        run.deadline();
        assert_eq!(run.inst.status, SagaStatus::Failed);
        let release = run.last("shop.release.v1");
        let done = run.answer(release, &Released { id: "o1".into() });
        assert_eq!(done.sent, ["shop.reject.v1"]);
        assert_eq!(run.inst.status, SagaStatus::Compensated);
        assert_eq!(run.rejected_for(), "cancelled: stopped");
    }

    #[test]
    fn a_step_after_the_pivot_answered_after_its_attempts_resumes_forward() {
        let mut run = Run::start();
        run.fail_shipping();
        assert_eq!(run.inst.step, 2);
        assert_eq!(
            run.inst.reason.as_deref(),
            Some("ship got no answer after 2 attempts, after the pivot: the saga cannot go back")
        );
        let ships = run.sent("shop.ship.v1");
        assert_eq!(ships.len(), 2);

        let resumed = run.answer(ships[0], &Shipped { id: "o1".into() });
        assert_eq!(
            resumed.note,
            "resumed on a late reply: shop.shipped.v1 completed ship"
        );
        assert_eq!(resumed.sent, ["shop.notify.v1"]);
        assert_eq!(run.inst.status, SagaStatus::Running);
        assert_eq!((run.inst.step, run.inst.attempt), (3, 1));
        assert_eq!(run.inst.deadline_at, Some(run.now + 10_000_000));
        assert_eq!(run.inst.reason, None);
        let again = run.answer(ships[1], &Shipped { id: "o1".into() });
        assert!(!again.changed && again.sent.is_empty(), "{again:?}");

        // The last step too: no answer fails it, a late one completes it.
        let failed = run.deadline();
        assert_eq!(run.inst.status, SagaStatus::Failed, "{failed:?}");
        let notify = run.last("shop.notify.v1");
        let done = run.answer(notify, &Notified { id: "o1".into() });
        assert_eq!(
            done.note,
            "resumed on a late reply: shop.notified.v1 completed notify, the last step"
        );
        assert!(done.sent.is_empty());
        assert_eq!(run.inst.status, SagaStatus::Completed);
        assert_eq!(
            (run.inst.reason.as_deref(), run.inst.deadline_at),
            (None, None)
        );
        assert!(!run.answer(notify, &Notified { id: "o1".into() }).changed);
        assert!(!run.answer(ships[1], &Shipped { id: "o1".into() }).changed);
    }

    #[test]
    fn a_late_reply_that_is_not_what_the_failed_instance_waits_for_changes_nothing() {
        // Failed waiting for pay's refund.
        let mut run = Run::start();
        run.fail_compensating_pay();
        let pay = run.last("shop.pay.v1");
        let reserve = run.last("shop.reserve.v1");
        let refund = run.last("shop.refund.v1");
        let noise = [
            // Pay's own answer: the same step, the other phase.
            (
                run.answer(pay, &Paid { id: "o1".into() }),
                "late shop.paid.v1 for pay (forward) while failed at pay; ignored",
            ),
            // An older step.
            (
                run.answer(reserve, &Reserved { id: "o1".into() }),
                "late shop.reserved.v1 for reserve (forward) while failed at pay; ignored",
            ),
            // The awaited command, answered with something else.
            (
                run.answer(refund, &Released { id: "o1".into() }),
                "shop.released.v1 does not complete the compensation of pay; ignored",
            ),
        ];
        for (did, note) in noise {
            assert!(!did.changed && did.sent.is_empty(), "{did:?}");
            assert_eq!(did.note, note);
        }
        assert_eq!(run.inst.status, SagaStatus::Failed);
        // It still waits for the refund's answer.
        let resumed = run.answer(refund, &Refunded { id: "o1".into() });
        assert_eq!(resumed.sent, ["shop.release.v1"]);

        // Failed waiting for ship: an older step's answer, or the pay's
        // compensation that was never sent, change nothing.
        let mut run = Run::start();
        run.fail_shipping();
        let pay = run.last("shop.pay.v1");
        let did = run.answer(pay, &Paid { id: "o1".into() });
        assert!(!did.changed, "{did:?}");
        let ship = run.last("shop.ship.v1");
        let did = run.answer(ship, &Notified { id: "o1".into() });
        assert_eq!(
            did.note,
            "shop.notified.v1 neither completes nor fails ship; ignored"
        );
        assert!(!did.changed);

        // A late failing answer keeps it failed, now for that answer; no
        // later completion resumes it.
        let lost = run.answer(ship, &Lost { id: "o1".into() });
        assert!(lost.changed && lost.sent.is_empty(), "{lost:?}");
        assert_eq!(
            lost.note,
            "late shop.lost.v1 failed ship after the pivot; failed now for this answer; needs attention"
        );
        assert_eq!(run.inst.status, SagaStatus::Failed);
        assert_eq!(run.inst.reason.as_deref(), Some("ship: lost"));
        let shipped = run.answer(ship, &Shipped { id: "o1".into() });
        assert!(!shipped.changed && shipped.sent.is_empty(), "{shipped:?}");
        assert_eq!(
            shipped.note,
            "late shop.shipped.v1 for ship (forward) while failed at ship; ignored"
        );

        // Failed by an answer in time: final as well.
        let mut run = Run::start();
        run.reply_to_reserve();
        run.reply_to_pay();
        let ship = run.last("shop.ship.v1");
        run.answer(ship, &Lost { id: "o1".into() });
        assert_eq!(run.inst.status, SagaStatus::Failed);
        assert!(!run.answer(ship, &Shipped { id: "o1".into() }).changed);
        assert!(!run.deadline().changed);
        assert_eq!(run.inst.status, SagaStatus::Failed);
        assert_eq!(run.inst.reason.as_deref(), Some("ship: lost"));
    }
}
