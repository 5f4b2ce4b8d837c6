//! catalog: products and stock.
//!
//! Stock is reserved per order, all lines or none, idempotently: reserving
//! for an order that already holds a reservation answers with the same
//! outcome. A reservation is later committed (the order is confirmed) or
//! released (the order is rejected or cancelled).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::validate::{is_text, Checker, Validate, Violation};
use crate::{Caller, MAX_LINES, MAX_PRICE_CENTS, MAX_QUANTITY};

/// The service name.
pub const SERVICE: &str = "catalog";

/// A product as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Product {
    /// Product id.
    pub id: Uuid,
    /// Stock-keeping unit, unique.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Units on hand and not reserved.
    pub available: i64,
}

/// One line of a reservation: a product and a quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockLine {
    /// Product id.
    pub product_id: Uuid,
    /// Units, 1 to 10000.
    #[validate(range(min = 1, max = 10000))]
    pub quantity: i64,
}

// ---- requests (request-reply on queries.catalog.<name>) ----

/// Adds a product (admins only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddProduct {
    /// Who asks; must be an admin.
    pub caller: Caller,
    /// Unique stock-keeping unit, 1 to 64 characters, no white space.
    #[validate(length(min = 1, max = 64))]
    #[schemars(regex(pattern = r"^\S+$"))]
    pub sku: String,
    /// Display name, 1 to 200 characters.
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    /// Unit price in cents, 0 to 100000000.
    #[validate(range(min = 0, max = 100000000))]
    pub price_cents: i64,
    /// Initial stock, 0 to 10000.
    #[validate(range(min = 0, max = 10000))]
    pub stock: i64,
    /// The new product's id, when the caller chooses it (the ingress derives
    /// it from an `Idempotency-Key`): asked again for a product that exists
    /// with this id, sku, name and price, the answer is that product as it
    /// is now and nothing changes. Without it the catalog picks a new id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<Uuid>,
}
contract!(query AddProduct, "catalog", "add_product", v 1, reply = Product);

impl Validate for AddProduct {
    fn violations(&self) -> Vec<Violation> {
        Checker::default()
            .check(
                is_text(&self.sku, 64) && !self.sku.contains(char::is_whitespace),
                "/sku",
                "must be 1 to 64 characters without spaces",
            )
            .check(
                is_text(&self.name, 200),
                "/name",
                "must be 1 to 200 characters",
            )
            .check(
                (0..=MAX_PRICE_CENTS).contains(&self.price_cents),
                "/price_cents",
                format!("must be between 0 and {MAX_PRICE_CENTS}"),
            )
            .check(
                (0..=MAX_QUANTITY).contains(&self.stock),
                "/stock",
                format!("must be between 0 and {MAX_QUANTITY}"),
            )
            .finish()
    }
}

/// Adds stock to a product (admins only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Restock {
    /// Who asks; must be an admin.
    pub caller: Caller,
    /// The product.
    pub product_id: Uuid,
    /// Units to add, 1 to 10000.
    #[validate(range(min = 1, max = 10000))]
    pub quantity: i64,
    /// An id for this restock, when the caller has one (the ingress derives
    /// it from an `Idempotency-Key`): a restock whose id was applied before
    /// is not applied again; the answer is the product as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Uuid>,
}
contract!(query Restock, "catalog", "restock", v 1, reply = Product);

impl Validate for Restock {
    fn violations(&self) -> Vec<Violation> {
        Checker::default()
            .check(
                (1..=MAX_QUANTITY).contains(&self.quantity),
                "/quantity",
                format!("must be between 1 and {MAX_QUANTITY}"),
            )
            .finish()
    }
}

/// Lists every product.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListProducts {}
contract!(query ListProducts, "catalog", "list_products", v 1, reply = ProductList);

/// The answer to `list_products`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProductList {
    /// Products ordered by name.
    pub items: Vec<Product>,
}

/// One product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetProduct {
    /// The product.
    pub product_id: Uuid,
}
contract!(query GetProduct, "catalog", "get_product", v 1, reply = Product);

// ---- commands (COMMANDS stream, commands.catalog.<name>) ----

/// Reserves stock for an order: every line or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveStock {
    /// The order the reservation is for; a second reservation for the same
    /// order answers with the first one's outcome.
    pub order_id: Uuid,
    /// Lines, 1 to 100, each product at most once.
    #[validate(length(min = 1, max = 100))]
    pub lines: Vec<StockLine>,
}
contract!(command ReserveStock, "catalog", "reserve_stock", v 1, entity = order_id);

impl Validate for ReserveStock {
    fn violations(&self) -> Vec<Violation> {
        lines_violations(&self.lines)
    }
}

/// The violations of a list of order lines: empty, too many, bad quantities,
/// a product twice.
pub fn lines_violations(lines: &[StockLine]) -> Vec<Violation> {
    let mut c = Checker::default();
    c.check(!lines.is_empty(), "/lines", "must have at least one line");
    c.check(
        lines.len() <= MAX_LINES,
        "/lines",
        format!("must have at most {MAX_LINES} lines"),
    );
    let mut seen = std::collections::HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        c.check(
            (1..=MAX_QUANTITY).contains(&line.quantity),
            format!("/lines/{i}/quantity"),
            format!("must be between 1 and {MAX_QUANTITY}"),
        );
        c.check(
            seen.insert(line.product_id),
            format!("/lines/{i}/product_id"),
            "product appears in more than one line",
        );
    }
    c.finish()
}

/// Releases an order's reservation (no-op when there is none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseStock {
    /// The order.
    pub order_id: Uuid,
    /// Why, for the record.
    pub reason: String,
}
contract!(command ReleaseStock, "catalog", "release_stock", v 1, entity = order_id);

/// Makes an order's reservation final (the goods are sold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitStock {
    /// The order.
    pub order_id: Uuid,
}
contract!(command CommitStock, "catalog", "commit_stock", v 1, entity = order_id);

// ---- events (EVENTS stream, events.catalog.<entity>.<name>) ----

/// A product was added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProductAdded {
    /// Product id.
    pub product_id: Uuid,
    /// SKU.
    pub sku: String,
    /// Name.
    pub name: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Initial stock.
    pub stock: i64,
}
contract!(event ProductAdded, "catalog", "product_added", v 1, entity = product_id);

/// Stock was added to a product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Restocked {
    /// Product id.
    pub product_id: Uuid,
    /// Units added.
    pub quantity: i64,
    /// Units available afterwards.
    pub available: i64,
}
contract!(event Restocked, "catalog", "restocked", v 1, entity = product_id);

/// Every line of an order was reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StockReserved {
    /// The order.
    pub order_id: Uuid,
    /// What was reserved.
    pub lines: Vec<StockLine>,
}
contract!(event StockReserved, "catalog", "stock_reserved", v 1, entity = order_id);

/// Why one line could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RejectedLine {
    /// The product.
    pub product_id: Uuid,
    /// Units asked for.
    pub requested: i64,
    /// Units available at the time (0 for an unknown product).
    pub available: i64,
    /// `unknown_product` or `insufficient_stock`.
    pub reason: String,
}

/// An order's reservation was refused; nothing was reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StockRejected {
    /// The order.
    pub order_id: Uuid,
    /// The lines that could not be reserved, and why.
    pub lines: Vec<RejectedLine>,
}
contract!(event StockRejected, "catalog", "stock_rejected", v 1, entity = order_id);

/// An order's reservation was released; its units are available again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StockReleased {
    /// The order.
    pub order_id: Uuid,
    /// What was released (empty when there was nothing to release).
    pub lines: Vec<StockLine>,
    /// Why.
    pub reason: String,
}
contract!(event StockReleased, "catalog", "stock_released", v 1, entity = order_id);

/// An order's reservation became final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StockCommitted {
    /// The order.
    pub order_id: Uuid,
}
contract!(event StockCommitted, "catalog", "stock_committed", v 1, entity = order_id);
