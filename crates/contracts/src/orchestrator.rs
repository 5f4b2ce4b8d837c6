//! orchestrator: the saga coordinator's queries (instances, transitions,
//! stuck detection). Admin only.
//!
//! The sagas themselves talk through the other services' commands and
//! events; these contracts are for operators (`skein saga`) and the
//! ingress's `GET /v1/sagas/{id}`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::validate::{Validate, Violation};
use crate::Caller;

/// The service name.
pub const SERVICE: &str = "orchestrator";

/// Where a saga instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Going forward: waiting for the current step's outcome.
    Running,
    /// Going back: waiting for the current compensation's outcome, or, at
    /// the step `final`, for the answer to the command that ends the saga.
    Compensating,
    /// Every step completed.
    Completed,
    /// Every completed step was compensated (and the command that ends the
    /// saga answered, where the saga waits for its answer).
    Compensated,
    /// It could neither go on nor back: a step after the pivot or a
    /// compensation got no answer after its retries, or answered with a
    /// failure. One that failed for want of an answer still takes that
    /// answer if it comes late, and goes on as if it had come in time; one
    /// failed by an answer stays failed and needs an operator.
    Failed,
}

impl SagaStatus {
    /// The lower-case name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Failed => "failed",
        }
    }

    /// The status named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [
            SagaStatus::Running,
            SagaStatus::Compensating,
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Whether the instance still waits for something.
    pub fn is_live(self) -> bool {
        matches!(self, SagaStatus::Running | SagaStatus::Compensating)
    }
}

/// A message a saga sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SentMessage {
    /// `ce-id`.
    pub id: Uuid,
    /// `ce-type`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// One recorded change of a saga instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SagaTransition {
    /// 1, 2, … per instance.
    pub seq: i64,
    /// RFC 3339.
    pub at: String,
    /// Status before (none for the start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<SagaStatus>,
    /// Status after.
    pub to: SagaStatus,
    /// The step it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// `ce-id` of the message that caused it (none for a deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause_id: Option<Uuid>,
    /// `ce-type` of that message, or `deadline`.
    pub cause: String,
    /// What it sent, in order.
    pub sent: Vec<SentMessage>,
    /// What happened, in words.
    pub note: String,
}

/// A saga instance as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SagaInstance {
    /// Instance id.
    pub id: Uuid,
    /// The saga's name, e.g. `place_order`.
    pub saga: String,
    /// What the instance is about (the order id): one instance per saga and
    /// key.
    pub key: String,
    /// Where it is.
    pub status: SagaStatus,
    /// The step it runs or compensates, or `final` while it waits for the
    /// answer to the command that ends it (none once over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Event types it waits for.
    pub waiting_for: Vec<String>,
    /// When it stops waiting (RFC 3339), if it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Why it compensated or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The data carried between steps.
    pub data: serde_json::Value,
    /// Correlation id of the request that started it.
    pub correlation_id: String,
    /// Optimistic version: bumped by every change.
    pub version: i64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Every transition, oldest first (only in `get_saga`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transitions: Vec<SagaTransition>,
}

/// One saga instance with its transitions (admin only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetSaga {
    /// Who asks; must be an admin.
    pub caller: Caller,
    /// The instance id.
    pub saga_id: Uuid,
}
contract!(query GetSaga, "orchestrator", "get_saga", v 1, reply = SagaInstance);

/// Saga instances, newest first (admin only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSagas {
    /// Who asks; must be an admin.
    pub caller: Caller,
    /// Only instances in this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SagaStatus>,
    /// Only instances about this key (an order id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Page size, 1 to 500.
    #[validate(range(min = 1, max = 500))]
    pub limit: u32,
    /// Cursor from the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}
contract!(query ListSagas, "orchestrator", "list_sagas", v 1, reply = SagaPage);

impl Validate for ListSagas {
    fn violations(&self) -> Vec<Violation> {
        crate::validate::Checker::default()
            .check(
                (1..=500).contains(&self.limit),
                "/limit",
                format!("must be 1 to 500, got {}", self.limit),
            )
            .finish()
    }
}

/// A page of saga instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SagaPage {
    /// Instances, newest first, without transitions.
    pub items: Vec<SagaInstance>,
    /// Cursor of the next page, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Instances waiting past their deadline by more than `min_overdue_ms`, and
/// failed ones (admin only): what needs looking at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StuckSagas {
    /// Who asks; must be an admin.
    pub caller: Caller,
    /// How far past its deadline an instance must be, in milliseconds
    /// (default 5000: the coordinator acts on a deadline within a second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_overdue_ms: Option<u64>,
}
contract!(query StuckSagas, "orchestrator", "stuck_sagas", v 1, reply = StuckList);

/// Retries a saga instance that failed waiting for an answer (admin only;
/// `skein saga retry`): the command it waits on (a forward step, a
/// compensation or the final command) is sent again with its attempts
/// counted afresh, as if its deadlines had not run out. For an instance
/// whose command was dead-lettered or lost, once the cause is fixed. The
/// reply is the instance after the retry, with its transitions; 409 when
/// it is not failed, an answer failed it for good, or this orchestrator
/// copy lacks its definition (another version's), 404 when there is no
/// such instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySaga {
    /// Who asks; must be an admin.
    pub caller: Caller,
    /// The instance id.
    pub saga_id: Uuid,
}
contract!(query RetrySaga, "orchestrator", "retry_saga", v 1, reply = SagaInstance);

/// One instance that needs attention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StuckSaga {
    /// The instance (without transitions).
    pub instance: SagaInstance,
    /// How long past its deadline it is, in milliseconds (0 for a failed
    /// instance).
    pub overdue_ms: u64,
}

/// Instances that need attention: the live ones waiting past their
/// deadline (most overdue first), then the failed ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StuckList {
    /// Instances.
    pub items: Vec<StuckSaga>,
    /// More instances need attention than are listed (the list stops at
    /// 500).
    #[serde(default)]
    pub more: bool,
}
