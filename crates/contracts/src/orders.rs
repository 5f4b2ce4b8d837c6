//! orders: placing, confirming, rejecting and cancelling orders.
//!
//! The orders service keeps its own replicas of the products (from catalog
//! events) and customers (from identity events) it needs, so placing an
//! order asks no other service.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::{lines_violations, StockLine};
use crate::validate::{Validate, Violation};
use crate::Caller;

/// The service name.
pub const SERVICE: &str = "orders";

/// An order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed, waiting for stock and payment.
    Pending,
    /// Stock reserved and payment authorized.
    Confirmed,
    /// Refused (stock, payment or deadline); nothing is held.
    Rejected,
    /// Cancelled by the customer or an admin; everything was given back.
    Cancelled,
}

impl OrderStatus {
    /// Whether the order's placement is over (confirmed, rejected or
    /// cancelled). A confirmed order can still be cancelled.
    pub fn is_final(self) -> bool {
        self != OrderStatus::Pending
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Cancelled => "cancelled",
        }
    }
}

/// One priced line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderLine {
    /// The product.
    pub product_id: Uuid,
    /// Units.
    pub quantity: i64,
    /// Unit price in cents when the order was placed.
    pub unit_price_cents: i64,
}

/// An order as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Order {
    /// Order id.
    pub id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Status.
    pub status: OrderStatus,
    /// Lines.
    pub lines: Vec<OrderLine>,
    /// Sum of the lines in cents.
    pub total_cents: i64,
    /// Why it was rejected or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

// ---- commands ----

/// Places an order for the caller. The order id is chosen by the sender
/// (the ingress), so a retried request places the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// The new order's id.
    pub order_id: Uuid,
    /// The customer placing it.
    pub customer_id: Uuid,
    /// Lines: 1 to 100, quantities 1 to 10000, each product once.
    #[validate(length(min = 1, max = 100))]
    pub lines: Vec<StockLine>,
}
contract!(command PlaceOrder, "orders", "place_order", v 1, entity = order_id);

impl Validate for PlaceOrder {
    fn violations(&self) -> Vec<Violation> {
        lines_violations(&self.lines)
    }
}

/// Confirms a pending order (sent by the place-order saga).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmOrder {
    /// The order.
    pub order_id: Uuid,
}
contract!(command ConfirmOrder, "orders", "confirm_order", v 1, entity = order_id);

/// Rejects a pending order (sent by the place-order saga).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectOrder {
    /// The order.
    pub order_id: Uuid,
    /// Why.
    pub reason: String,
}
contract!(command RejectOrder, "orders", "reject_order", v 1, entity = order_id);

/// Asks to cancel an order (owner or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelOrder {
    /// The order.
    pub order_id: Uuid,
    /// Who asks.
    pub caller: Caller,
}
contract!(command CancelOrder, "orders", "cancel_order", v 1, entity = order_id);

/// Marks an order cancelled once its compensations are done (sent by the
/// cancel-order saga).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Why.
    pub reason: String,
}
contract!(command MarkCancelled, "orders", "mark_cancelled", v 1, entity = order_id);

// ---- events ----

/// An order was accepted for processing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderPlaced {
    /// The order.
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Priced lines.
    pub lines: Vec<OrderLine>,
    /// Total in cents.
    pub total_cents: i64,
}
contract!(event OrderPlaced, "orders", "order_placed", v 1, entity = order_id);

/// An order was confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Total in cents.
    pub total_cents: i64,
}
contract!(event OrderConfirmed, "orders", "order_confirmed", v 1, entity = order_id);

/// An order was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderRejected {
    /// The order.
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Why.
    pub reason: String,
}
contract!(event OrderRejected, "orders", "order_rejected", v 1, entity = order_id);

/// Cancellation of an order was requested and accepted; the cancel-order
/// saga gives back what the order holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderCancellationRequested {
    /// The order.
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Status when the request was accepted.
    pub status: OrderStatus,
    /// Who asked.
    pub requested_by: Uuid,
}
contract!(event OrderCancellationRequested, "orders", "order_cancellation_requested", v 1, entity = order_id);

/// An order was cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Why.
    pub reason: String,
}
contract!(event OrderCancelled, "orders", "order_cancelled", v 1, entity = order_id);

// ---- queries ----

/// One order (owner or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetOrder {
    /// Who asks.
    pub caller: Caller,
    /// The order.
    pub order_id: Uuid,
}
contract!(query GetOrder, "orders", "get_order", v 1, reply = Order);

/// A customer's orders, newest first (self or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListOrders {
    /// Who asks.
    pub caller: Caller,
    /// Whose orders.
    pub customer_id: Uuid,
    /// Page size, 1 to 100.
    #[validate(range(min = 1, max = 100))]
    pub limit: u32,
    /// Cursor from the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}
contract!(query ListOrders, "orders", "list_orders", v 1, reply = OrderPage);

impl Validate for ListOrders {
    fn violations(&self) -> Vec<Violation> {
        crate::validate::Checker::default()
            .check(
                (1..=100).contains(&self.limit),
                "/limit",
                "must be between 1 and 100",
            )
            .finish()
    }
}

/// A page of orders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderPage {
    /// Orders, newest first.
    pub items: Vec<Order>,
    /// Cursor of the next page, absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
