//! The order platform's message contracts.
//!
//! This crate is the only language the workers share: every command, event
//! and query of every service, with its `ce-type`, subject, payload type and
//! validation. A worker depends on this crate, never on another worker.
//! Each type's JSON Schema lives under `schemas/`; a test regenerates them
//! from these types and fails on any difference.
//!
//! # Layout
//!
//! - [`identity`], [`catalog`], [`orders`], [`payments`], [`projector`],
//!   [`orchestrator`]: one module per service with its commands, events and queries.
//! - [`validate`]: [`Validate`] and [`Violation`], the precise reasons an
//!   input is refused, shared by the ingress and the workers.
//! - [`registry`]: every contract with its kind and schema, for
//!   `schemas/` and the API documentation.
//!
//! Names and versions here are wire contracts: a change that old readers
//! cannot read is a new version with an upcaster, never an edit.

#[macro_use]
mod macros;

pub mod catalog;
pub mod identity;
pub mod orchestrator;
pub mod orders;
pub mod payments;
pub mod projector;
pub mod registry;
pub mod validate;

pub use validate::{Validate, Violation};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Places and manages their own orders.
    Customer,
    /// Manages the catalog and sees everything.
    Admin,
}

/// Who is asking: set by the ingress from a verified token, checked by the
/// service that owns the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Caller {
    /// The caller's user id.
    pub user_id: Uuid,
    /// The caller's role.
    pub role: Role,
}

impl Caller {
    /// The operator of the system (`skein up`, `skein saga`, traces): an
    /// admin with no user account, for tools whose access to NATS already
    /// grants everything.
    pub fn operator() -> Self {
        Self {
            user_id: Uuid::nil(),
            role: Role::Admin,
        }
    }

    /// Whether the caller may see or act on data owned by `owner`.
    pub fn may_access(&self, owner: Uuid) -> bool {
        self.role == Role::Admin || self.user_id == owner
    }
}

/// The error answer of a query or request, carried in the NATS service
/// error headers (`Nats-Service-Error-Code` = `status`, `Nats-Service-Error`
/// = `message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceError {
    /// HTTP-like status: 400 invalid, 401 unauthenticated, 403 forbidden,
    /// 404 not found, 409 conflict, 500 internal.
    pub status: u16,
    /// A precise message safe to show to the client.
    pub message: String,
}

impl ServiceError {
    /// 400 with the input's violations.
    pub fn invalid(violations: &[Violation]) -> Self {
        Self {
            status: 400,
            message: validate::describe(violations),
        }
    }
    /// 401.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            status: 401,
            message: message.into(),
        }
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: 403,
            message: message.into(),
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
        }
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
        }
    }
    /// 500; the message must not leak internals.
    pub fn internal() -> Self {
        Self {
            status: 500,
            message: "internal error".into(),
        }
    }
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for ServiceError {}

/// Largest quantity of one product in one order line or restock.
pub const MAX_QUANTITY: i64 = 10_000;
/// Most lines in one order.
pub const MAX_LINES: usize = 100;
/// Largest price of one product, in cents (one million).
pub const MAX_PRICE_CENTS: i64 = 100_000_000;
