//! projector: read models built from events, rebuildable from scratch.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::identity::User;
use crate::orders::OrderStatus;
use crate::Caller;

/// The service name.
pub const SERVICE: &str = "projector";

/// The admin dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetDashboard {
    /// Who asks; must be an admin.
    pub caller: Caller,
}
contract!(query GetDashboard, "projector", "dashboard", v 1, reply = Dashboard);

/// Totals over all users and orders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Dashboard {
    /// Registered users.
    pub total_users: i64,
    /// Orders placed.
    pub total_orders: i64,
    /// Orders per status.
    pub orders_by_status: BTreeMap<String, i64>,
    /// Sum of confirmed orders' totals, in cents.
    pub revenue_cents: i64,
}

/// A customer's profile (self or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetProfile {
    /// Who asks.
    pub caller: Caller,
    /// The user.
    pub user_id: Uuid,
}
contract!(query GetProfile, "projector", "profile", v 1, reply = Profile);

/// One order in a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProfileOrder {
    /// Order id.
    pub order_id: Uuid,
    /// Status.
    pub status: OrderStatus,
    /// Total in cents.
    pub total_cents: i64,
}

/// A user with their orders and totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Profile {
    /// The user.
    pub user: User,
    /// Their orders, newest first.
    pub orders: Vec<ProfileOrder>,
    /// Orders placed.
    pub order_count: i64,
    /// Sum of confirmed orders, in cents.
    pub spent_cents: i64,
}

/// An order's timeline (owner or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetTimeline {
    /// Who asks.
    pub caller: Caller,
    /// The order.
    pub order_id: Uuid,
}
contract!(query GetTimeline, "projector", "timeline", v 1, reply = Timeline);

/// One event in a timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TimelineEntry {
    /// `ce-type`.
    pub kind: String,
    /// RFC 3339 `ce-time`.
    pub time: String,
    /// `ce-id`.
    pub event_id: Uuid,
}

/// Every event about one order, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Timeline {
    /// The order.
    pub order_id: Uuid,
    /// Events, oldest first.
    pub entries: Vec<TimelineEntry>,
}
