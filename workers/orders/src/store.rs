//! The orders' tables: orders with their lines, and the replicas of products
//! and customers.
//!
//! Times are unix microseconds ([`skein_outbox::now_micros`]); ids are
//! stored as their hyphenated lower-case text, which sorts like the UUID.

use std::collections::HashMap;

use skein_contracts::orders::{Order, OrderLine, OrderStatus};
use skein_contracts::Role;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOrder {
    /// Order id.
    pub id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Status.
    pub status: OrderStatus,
    /// Priced lines, in the order they were placed.
    pub lines: Vec<OrderLine>,
    /// Sum of the lines in cents.
    pub total_cents: i64,
    /// Why it was rejected or cancelled.
    pub reason: Option<String>,
    /// Who asked to cancel it, while a cancellation is open or after it.
    pub cancel_requested_by: Option<Uuid>,
    /// Unix microseconds.
    pub created_at: i64,
    /// Unix microseconds.
    pub updated_at: i64,
}

impl StoredOrder {
    /// The order as clients see it.
    pub fn to_order(&self) -> Order {
        Order {
            id: self.id,
            customer_id: self.customer_id,
            status: self.status,
            lines: self.lines.clone(),
            total_cents: self.total_cents,
            reason: self.reason.clone(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
        }
    }
}

/// Formats unix microseconds as RFC 3339 (UTC, sub-second precision).
pub fn rfc3339(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| micros.to_string())
}

fn decode_err(e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

fn uuid(row: &AnyRow, column: &str) -> Result<Uuid, sqlx::Error> {
    let text: String = row.try_get(column)?;
    Uuid::parse_str(&text).map_err(decode_err)
}

fn parse_status(name: &str) -> Result<OrderStatus, sqlx::Error> {
    Ok(match name {
        "pending" => OrderStatus::Pending,
        "confirmed" => OrderStatus::Confirmed,
        "rejected" => OrderStatus::Rejected,
        "cancelled" => OrderStatus::Cancelled,
        other => {
            return Err(sqlx::Error::Decode(
                format!("unknown order status {other:?}").into(),
            ))
        }
    })
}

const ORDER_COLUMNS: &str = "id, customer_id, status, total_cents, reason, cancel_requested_by, \
                             created_at, updated_at";

/// [`ORDER_COLUMNS`] of `orders` aliased `o`, for joins.
const ORDER_COLUMNS_O: &str = "o.id, o.customer_id, o.status, o.total_cents, o.reason, \
                               o.cancel_requested_by, o.created_at, o.updated_at";

/// Reads an order with its lines, in one statement.
pub async fn order(conn: &mut AnyConnection, id: Uuid) -> Result<Option<StoredOrder>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS_O}, l.product_id, l.quantity, l.unit_price_cents \
         FROM orders o LEFT JOIN order_lines l ON l.order_id = o.id \
         WHERE o.id = $1 ORDER BY l.position"
    ))
    .bind(id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut order = decode_order(first)?;
    for row in &rows {
        // An order without lines gives one row with NULL line columns.
        if row.try_get::<Option<String>, _>("product_id")?.is_some() {
            order.lines.push(decode_line(row)?);
        }
    }
    Ok(Some(order))
}

fn decode_line(row: &AnyRow) -> Result<OrderLine, sqlx::Error> {
    Ok(OrderLine {
        product_id: uuid(row, "product_id")?,
        quantity: row.try_get("quantity")?,
        unit_price_cents: row.try_get("unit_price_cents")?,
    })
}

/// The order in `row` ([`ORDER_COLUMNS`]), without its lines.
fn decode_order(row: &AnyRow) -> Result<StoredOrder, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let cancel_requested_by: Option<String> = row.try_get("cancel_requested_by")?;
    Ok(StoredOrder {
        id: uuid(row, "id")?,
        customer_id: uuid(row, "customer_id")?,
        status: parse_status(&status)?,
        lines: Vec::new(),
        total_cents: row.try_get("total_cents")?,
        reason: row.try_get("reason")?,
        cancel_requested_by: cancel_requested_by
            .map(|s| Uuid::parse_str(&s).map_err(decode_err))
            .transpose()?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// `$first, $first+1, …`: `count` numbered placeholders.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a page of a customer's orders starts: after this order (exclusive)
/// in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct After {
    /// The last order's creation time, unix microseconds.
    pub created_at: i64,
    /// The last order's id.
    pub id: Uuid,
}

/// Up to `limit` of `customer`'s orders, newest first (by creation time,
/// then id), after `after`.
pub async fn orders_of(
    conn: &mut AnyConnection,
    customer: Uuid,
    after: Option<After>,
    limit: i64,
) -> Result<Vec<StoredOrder>, sqlx::Error> {
    // Without a cursor, start above every possible key.
    let (created_at, id) = match after {
        Some(a) => (a.created_at, a.id.to_string()),
        None => (i64::MAX, "~".to_owned()),
    };
    let rows = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders \
         WHERE customer_id = $1 AND (created_at < $2 OR (created_at = $2 AND id < $3)) \
         ORDER BY created_at DESC, id DESC LIMIT $4"
    ))
    .bind(customer.to_string())
    .bind(created_at)
    .bind(id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut orders = rows
        .iter()
        .map(decode_order)
        .collect::<Result<Vec<_>, _>>()?;
    if orders.is_empty() {
        return Ok(orders);
    }
    // The page's lines in one statement, not one per order.
    let sql = format!(
        "SELECT order_id, product_id, quantity, unit_price_cents FROM order_lines \
         WHERE order_id IN ({}) ORDER BY order_id, position",
        placeholders(1, orders.len())
    );
    let mut query = sqlx::query(&sql);
    for order in &orders {
        query = query.bind(order.id.to_string());
    }
    let mut lines: HashMap<Uuid, Vec<OrderLine>> = HashMap::new();
    for row in query.fetch_all(&mut *conn).await? {
        lines
            .entry(uuid(&row, "order_id")?)
            .or_default()
            .push(decode_line(&row)?);
    }
    for order in &mut orders {
        order.lines = lines.remove(&order.id).unwrap_or_default();
    }
    Ok(orders)
}

/// Records a new order with its lines. Returns `false` (and writes nothing)
/// when an order with that id already exists.
pub async fn insert_order(
    conn: &mut AnyConnection,
    order: &StoredOrder,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO orders (id, customer_id, status, total_cents, reason, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
    )
    .bind(order.id.to_string())
    .bind(order.customer_id.to_string())
    .bind(order.status.as_str())
    .bind(order.total_cents)
    .bind(order.reason.clone())
    .bind(order.created_at)
    .bind(order.updated_at)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }
    if order.lines.is_empty() {
        return Ok(true);
    }
    // All lines in one statement (an order has at most a few dozen).
    let values = (0..order.lines.len())
        .map(|i| format!("({})", placeholders(5 * i + 1, 5)))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO order_lines (order_id, position, product_id, quantity, unit_price_cents) \
         VALUES {values}"
    );
    let mut query = sqlx::query(&sql);
    for (position, line) in (0_i64..).zip(&order.lines) {
        query = query
            .bind(order.id.to_string())
            .bind(position)
            .bind(line.product_id.to_string())
            .bind(line.quantity)
            .bind(line.unit_price_cents);
    }
    query.execute(&mut *conn).await?;
    Ok(true)
}

/// Moves an order from `from` to `to` (with `reason`, when given, replacing
/// the stored one). Returns `false` when the order is not in `from` (any
/// more): the caller decides whether that is a no-op or a race to retry.
pub async fn transition(
    conn: &mut AnyConnection,
    id: Uuid,
    from: OrderStatus,
    to: OrderStatus,
    reason: Option<&str>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE orders SET status = $1, reason = COALESCE($2, reason), updated_at = $3 \
         WHERE id = $4 AND status = $5",
    )
    .bind(to.as_str())
    .bind(reason.map(str::to_owned))
    .bind(now)
    .bind(id.to_string())
    .bind(from.as_str())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Confirms a pending order. `None` when it is no longer pending; else who
/// asked to cancel it, if anyone, as of this change: read by the update
/// itself, which on PostgreSQL waits for a cancellation request committing
/// at the same moment and then sees it (a read before the update would
/// miss it, and the request would be lost).
pub async fn confirm(
    conn: &mut AnyConnection,
    id: Uuid,
    now: i64,
) -> Result<Option<Option<Uuid>>, sqlx::Error> {
    let row = sqlx::query(
        "UPDATE orders SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4 \
         RETURNING cancel_requested_by",
    )
    .bind(OrderStatus::Confirmed.as_str())
    .bind(now)
    .bind(id.to_string())
    .bind(OrderStatus::Pending.as_str())
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let by: Option<String> = row.try_get("cancel_requested_by")?;
    let by = by
        .map(|s| Uuid::parse_str(&s).map_err(decode_err))
        .transpose()?;
    Ok(Some(by))
}

/// Opens a cancellation request on an order that is in `status` and has
/// none open. Returns `false` when the order changed meanwhile.
pub async fn request_cancellation(
    conn: &mut AnyConnection,
    id: Uuid,
    status: OrderStatus,
    requested_by: Uuid,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE orders SET cancel_requested_by = $1, cancel_requested_at = $2, updated_at = $2 \
         WHERE id = $3 AND status = $4 AND cancel_requested_at IS NULL",
    )
    .bind(requested_by.to_string())
    .bind(now)
    .bind(id.to_string())
    .bind(status.as_str())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

// ---- replicas ----

/// A product as the orders service knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductReplica {
    /// Product id.
    pub id: Uuid,
    /// SKU.
    pub sku: String,
    /// Name.
    pub name: String,
    /// Unit price in cents.
    pub price_cents: i64,
}

/// Records (or refreshes, on a replay) a product.
pub async fn upsert_product(
    conn: &mut AnyConnection,
    product: &ProductReplica,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO products (id, sku, name, price_cents, updated_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (id) DO UPDATE SET sku = excluded.sku, name = excluded.name, \
         price_cents = excluded.price_cents, updated_at = excluded.updated_at",
    )
    .bind(product.id.to_string())
    .bind(product.sku.clone())
    .bind(product.name.clone())
    .bind(product.price_cents)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Reads a replicated product.
pub async fn product(
    conn: &mut AnyConnection,
    id: Uuid,
) -> Result<Option<ProductReplica>, sqlx::Error> {
    sqlx::query("SELECT id, sku, name, price_cents FROM products WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .map(|r| {
            Ok(ProductReplica {
                id: uuid(&r, "id")?,
                sku: r.try_get("sku")?,
                name: r.try_get("name")?,
                price_cents: r.try_get("price_cents")?,
            })
        })
        .transpose()
}

/// The unit prices of those of `ids` that are known.
pub async fn prices(
    conn: &mut AnyConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, i64>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT id, price_cents FROM products WHERE id IN ({})",
        placeholders(1, ids.len())
    );
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(id.to_string());
    }
    query
        .fetch_all(conn)
        .await?
        .iter()
        .map(|r| Ok((uuid(r, "id")?, r.try_get("price_cents")?)))
        .collect()
}

/// Records (or refreshes) a registered user.
pub async fn upsert_customer(
    conn: &mut AnyConnection,
    id: Uuid,
    role: Role,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO customers (id, role, registered_at) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET role = excluded.role",
    )
    .bind(id.to_string())
    .bind(role_name(role))
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// A replicated user's role, `None` when the user is not known (yet).
pub async fn customer_role(
    conn: &mut AnyConnection,
    id: Uuid,
) -> Result<Option<Role>, sqlx::Error> {
    let row = sqlx::query("SELECT role FROM customers WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let role: String = row.try_get("role")?;
    match role.as_str() {
        "customer" => Ok(Some(Role::Customer)),
        "admin" => Ok(Some(Role::Admin)),
        other => Err(sqlx::Error::Decode(
            format!("unknown role {other:?}").into(),
        )),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Customer => "customer",
        Role::Admin => "admin",
    }
}
