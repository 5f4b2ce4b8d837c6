//! The orders' queries: one order, and a customer's orders by page.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use skein_contracts::orders::{GetOrder, ListOrders, Order, OrderPage};
use skein_contracts::{ServiceError, Validate, Violation};
use skein_outbox::Store;
use skein_service::Host;
use uuid::Uuid;

use crate::store::{self, After};

fn internal(e: impl std::fmt::Display) -> ServiceError {
    tracing::error!(error = %e, "orders query failed");
    ServiceError::internal()
}

/// Registers every orders query on `host`.
pub async fn register(host: &mut Host) -> skein_service::Result<()> {
    let s = host.store().clone();
    host.query(move |q: GetOrder, _| get(s.clone(), q)).await?;
    let s = host.store().clone();
    host.query(move |q: ListOrders, _| list(s.clone(), q))
        .await?;
    Ok(())
}

async fn get(store: Store, q: GetOrder) -> Result<Order, ServiceError> {
    let mut conn = store.pool().acquire().await.map_err(internal)?;
    match store::order(&mut conn, q.order_id)
        .await
        .map_err(internal)?
    {
        Some(order) if q.caller.may_access(order.customer_id) => Ok(order.to_order()),
        // Another customer's order is answered like a missing one, so its
        // existence does not leak.
        _ => Err(ServiceError::not_found(format!("no order {}", q.order_id))),
    }
}

async fn list(store: Store, q: ListOrders) -> Result<OrderPage, ServiceError> {
    if !q.caller.may_access(q.customer_id) {
        return Err(ServiceError::forbidden("you may only list your own orders"));
    }
    let mut violations = q.violations();
    let after = match q.cursor.as_deref().map(decode_cursor) {
        None => None,
        Some(Some(after)) => Some(after),
        Some(None) => {
            violations.push(Violation {
                field: "/cursor".into(),
                message: "is not a cursor from a previous page".into(),
            });
            None
        }
    };
    if !violations.is_empty() {
        return Err(ServiceError::invalid(&violations));
    }
    let limit = usize::try_from(q.limit).map_err(internal)?;
    let mut conn = store.pool().acquire().await.map_err(internal)?;
    // One more than asked tells whether there is a next page.
    let mut orders = store::orders_of(&mut conn, q.customer_id, after, i64::from(q.limit) + 1)
        .await
        .map_err(internal)?;
    let next_cursor = if orders.len() > limit {
        orders.truncate(limit);
        orders.last().map(|o| {
            encode_cursor(After {
                created_at: o.created_at,
                id: o.id,
            })
        })
    } else {
        None
    };
    Ok(OrderPage {
        items: orders.iter().map(store::StoredOrder::to_order).collect(),
        next_cursor,
    })
}

/// The opaque cursor of the page after `after`: URL-safe base64 of
/// `<created_at micros>:<order id>`.
pub fn encode_cursor(after: After) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", after.created_at, after.id))
}

/// Reads a cursor made by [`encode_cursor`]; `None` when it is not one.
pub fn decode_cursor(cursor: &str) -> Option<After> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (micros, id) = text.split_once(':')?;
    Some(After {
        created_at: micros.parse().ok()?,
        id: Uuid::parse_str(id).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let after = After {
            created_at: 1_700_000_000_123_456,
            id: Uuid::now_v7(),
        };
        assert_eq!(decode_cursor(&encode_cursor(after)), Some(after));
        for bad in ["", "x", "!!!", &URL_SAFE_NO_PAD.encode("12:not-a-uuid")] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
