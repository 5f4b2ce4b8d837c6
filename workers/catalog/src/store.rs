//! The catalog's tables.

use skein_contracts::catalog::{Product, StockLine};
use sqlx::{AnyConnection, Row};
use uuid::Uuid;

/// Reads a product.
pub async fn product(conn: &mut AnyConnection, id: Uuid) -> Result<Option<Product>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, sku, name, price_cents, on_hand - reserved AS available FROM products WHERE id = $1",
    )
    .bind(id.to_string())
    .fetch_optional(conn)
    .await?;
    row.map(|r| to_product(&r)).transpose()
}

/// Every product, by name.
pub async fn products(conn: &mut AnyConnection) -> Result<Vec<Product>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, sku, name, price_cents, on_hand - reserved AS available FROM products ORDER BY name, sku",
    )
    .fetch_all(conn)
    .await?;
    rows.iter().map(to_product).collect()
}

fn to_product(row: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    let id: String = row.try_get("id")?;
    Ok(Product {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        available: row.try_get("available")?,
    })
}

/// An order's reservation: its status, its stored outcome and its lines.
#[derive(Debug)]
pub struct Reservation {
    /// `reserved`, `rejected`, `released` or `committed`.
    pub status: String,
    /// JSON of the outcome event's payload.
    pub outcome: String,
    /// Reserved lines (empty for a rejection).
    pub lines: Vec<StockLine>,
}

/// Reads an order's reservation.
pub async fn reservation(
    conn: &mut AnyConnection,
    order_id: Uuid,
) -> Result<Option<Reservation>, sqlx::Error> {
    let Some(row) = sqlx::query("SELECT status, outcome FROM reservations WHERE order_id = $1")
        .bind(order_id.to_string())
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let lines = sqlx::query(
        "SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(order_id.to_string())
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        let id: String = r.try_get("product_id")?;
        Ok(StockLine {
            product_id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            quantity: r.try_get("quantity")?,
        })
    })
    .collect::<Result<_, sqlx::Error>>()?;
    Ok(Some(Reservation {
        status: row.try_get("status")?,
        outcome: row.try_get("outcome")?,
        lines,
    }))
}
