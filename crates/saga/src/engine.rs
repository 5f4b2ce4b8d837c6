//! The state machine of one instance: what a start, a reply, a deadline or
//! a cancel does to it and what it sends. Pure: the coordinator loads the
//! instance, calls one function here, and stores the result and the sent
//! commands in one transaction.
//!
//! - Running at step *s*: a completing event moves to *s + 1* (or
//!   `completed`); a failing event compensates steps *0..s* (the failed step
//!   had no effect); a passed deadline sends again while attempts remain,
//!   then compensates steps *0..=s* if *s* is not past the pivot (the step
//!   in flight may still take effect, so it is undone too) or fails.
//! - Compensating: compensations run one at a time in reverse order, each
//!   sent again on its deadline until its attempts run out (then `failed`);
//!   after the last, the final command (`on_compensated`, or `on_cancelled`
//!   after a cancel) is sent and the instance is `compensated`.
//! - A cancel before the pivot completes compensates like a deadline; after
//!   it, the instance goes on.
//! - Anything else (a late reply to an earlier step or attempt, a reply to
//!   a finished instance) changes nothing and is noted.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use skein_contracts::orchestrator::SagaStatus;
use skein_message::{Envelope, MessageContext};
use uuid::Uuid;

use crate::definition::{Saga, SagaError};

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
    /// Sends of the current step or compensation so far.
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

fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Engine<'_> {
    fn step_name(&self, index: usize) -> String {
        self.saga
            .steps
            .get(index)
            .map_or_else(|| format!("#{index}"), |s| s.name.clone())
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
    pub(crate) fn reply(
        &self,
        inst: &mut Instance,
        step: usize,
        phase: Phase,
        event: &Envelope,
    ) -> Result<Outcome, SagaError> {
        let context = event.context();
        let mut out = Outcome {
            step: Some(self.step_name(step)),
            ..Outcome::default()
        };
        let current = inst.step == step;
        match (phase, inst.status) {
            (Phase::Forward, SagaStatus::Running) if current => {
                let def = &self.saga.steps[step];
                if let Some((_, update)) = def.completes.iter().find(|(e, _)| e.matches(event)) {
                    if let Some(update) = update {
                        update(&mut inst.data, event)?;
                    }
                    out.changed = true;
                    if step + 1 < self.saga.steps.len() {
                        out.note = format!("{} completed {}", event.kind, def.name);
                        self.send_forward(inst, step + 1, &context, &mut out)?;
                    } else {
                        out.note = format!("{} completed {}, the last step", event.kind, def.name);
                        inst.status = SagaStatus::Completed;
                        inst.deadline_at = None;
                    }
                } else if let Some((_, reason)) = def.fails.iter().find(|(e, _)| e.matches(event)) {
                    let why = format!("{}: {}", def.name, reason(event)?);
                    out.changed = true;
                    if self.saga.compensable(step) {
                        out.note = format!("{} failed {}; compensating", event.kind, def.name);
                        self.begin_compensation(
                            inst,
                            step,
                            false,
                            why,
                            Finish::Failure,
                            &context,
                            &mut out,
                        )?;
                    } else {
                        out.note = format!(
                            "{} failed {} after the pivot; needs attention",
                            event.kind, def.name
                        );
                        inst.status = SagaStatus::Failed;
                        inst.reason = Some(why);
                        inst.deadline_at = None;
                    }
                } else {
                    out.note = format!(
                        "{} neither completes nor fails {}; ignored",
                        event.kind, def.name
                    );
                }
            }
            (Phase::Compensation, SagaStatus::Compensating) if current => {
                let def = &self.saga.steps[step];
                if def.compensation_completes.iter().any(|e| e.matches(event)) {
                    out.changed = true;
                    out.note = format!("{} completed the compensation of {}", event.kind, def.name);
                    self.next_compensation(inst, &context, &mut out)?;
                } else {
                    out.note = format!(
                        "{} does not complete the compensation of {}; ignored",
                        event.kind, def.name
                    );
                }
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

    /// The instance's deadline passed.
    pub(crate) fn deadline(&self, inst: &mut Instance) -> Result<Outcome, SagaError> {
        let context = MessageContext::with_correlation(inst.correlation_id.clone());
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
            SagaStatus::Running if self.saga.compensable(index) => {
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
                let why = format!(
                    "{} got no answer after {} attempts, after the pivot: the saga cannot go back",
                    def.name, def.attempts
                );
                out.note = format!("{why}; needs attention");
                inst.status = SagaStatus::Failed;
                inst.reason = Some(why);
                inst.deadline_at = None;
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
                    "the compensation of {} got no answer after {} attempts",
                    def.name, def.compensation_attempts
                );
                out.note = format!("{why}; needs attention");
                inst.reason = Some(match inst.reason.take() {
                    Some(first) => format!("{first}; then {why}"),
                    None => why,
                });
                inst.status = SagaStatus::Failed;
                inst.deadline_at = None;
            }
            _ => {
                out.changed = false;
                out.note = "deadline of a finished instance; ignored".into();
            }
        }
        Ok(out)
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
            SagaStatus::Running if self.saga.compensable(index) => {
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
            let why = inst.reason.clone().unwrap_or_default();
            let last = match inst.finish {
                Finish::Failure => &self.saga.on_compensated,
                Finish::Cancel => &self.saga.on_cancelled,
            };
            if let Some((make, _)) = last {
                out.sends.push(Sent {
                    envelope: make(&inst.data, context, self.source, &why)?,
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
