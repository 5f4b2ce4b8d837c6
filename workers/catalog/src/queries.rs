//! The catalog's queries: add product, restock, list, get.

use skein_contracts::catalog::{
    AddProduct, GetProduct, ListProducts, Product, ProductAdded, ProductList, Restock, Restocked,
};
use skein_contracts::{Role, ServiceError, Validate};
use skein_message::{Envelope, MessageContext};
use skein_outbox::{now_micros, Store};
use skein_service::Host;
use uuid::Uuid;

use crate::store;
use crate::NAME;

/// The inbox name under which applied restocks are recorded by id.
const RESTOCKS: &str = "catalog.restock";

fn internal(e: impl std::fmt::Display) -> ServiceError {
    tracing::error!(error = %e, "catalog query failed");
    ServiceError::internal()
}

/// Registers every catalog query on `host`.
pub async fn register(host: &mut Host) -> skein_service::Result<()> {
    let s = host.store().clone();
    host.query(move |q: AddProduct, ctx| add_product(s.clone(), q, ctx))
        .await?;
    let s = host.store().clone();
    host.query(move |q: Restock, ctx| restock(s.clone(), q, ctx))
        .await?;
    let s = host.store().clone();
    host.query(move |_: ListProducts, _| list(s.clone()))
        .await?;
    let s = host.store().clone();
    host.query(move |q: GetProduct, _| get(s.clone(), q))
        .await?;
    Ok(())
}

async fn add_product(
    store: Store,
    q: AddProduct,
    ctx: MessageContext,
) -> Result<Product, ServiceError> {
    if q.caller.role != Role::Admin {
        return Err(ServiceError::forbidden("only admins may add products"));
    }
    q.validate().map_err(|v| ServiceError::invalid(&v))?;
    let id = q.product_id.unwrap_or_else(Uuid::now_v7);
    let mut tx = store.begin().await.map_err(internal)?;
    // Neither the SKU nor the id may be taken.
    let inserted = sqlx::query(
        "INSERT INTO products (id, sku, name, price_cents, on_hand, reserved, created_at) \
         VALUES ($1, $2, $3, $4, $5, 0, $6) ON CONFLICT DO NOTHING",
    )
    .bind(id.to_string())
    .bind(q.sku.trim())
    .bind(q.name.trim())
    .bind(q.price_cents)
    .bind(q.stock)
    .bind(now_micros())
    .execute(&mut *tx)
    .await
    .map_err(internal)?
    .rows_affected();
    if inserted == 0 {
        // Asked again for a product it added (a retry under the same
        // idempotency key): the same answer, nothing added.
        if let Some(existing) = store::product(&mut tx, id).await.map_err(internal)? {
            if existing.sku == q.sku.trim()
                && existing.name == q.name.trim()
                && existing.price_cents == q.price_cents
            {
                return Ok(existing);
            }
            return Err(ServiceError::conflict(format!(
                "product {id} exists with another sku, name or price: its idempotency key was used for another product"
            )));
        }
        return Err(ServiceError::conflict(format!(
            "a product with sku {:?} already exists",
            q.sku.trim()
        )));
    }
    let event = ProductAdded {
        product_id: id,
        sku: q.sku.trim().to_owned(),
        name: q.name.trim().to_owned(),
        price_cents: q.price_cents,
        stock: q.stock,
    };
    tx.publish(&Envelope::event(NAME, &event, &ctx).map_err(internal)?);
    tx.commit().await.map_err(internal)?;
    Ok(Product {
        id,
        sku: event.sku,
        name: event.name,
        price_cents: event.price_cents,
        available: event.stock,
    })
}

async fn restock(store: Store, q: Restock, ctx: MessageContext) -> Result<Product, ServiceError> {
    if q.caller.role != Role::Admin {
        return Err(ServiceError::forbidden("only admins may restock"));
    }
    q.validate().map_err(|v| ServiceError::invalid(&v))?;
    let mut tx = store.begin().await.map_err(internal)?;
    if let Some(request_id) = q.request_id {
        // Recorded with the restock, in its transaction: a retry of one
        // already applied (under the same idempotency key) answers the
        // product as it is.
        if !tx
            .mark_processed(RESTOCKS, request_id)
            .await
            .map_err(internal)?
        {
            return store::product(&mut tx, q.product_id)
                .await
                .map_err(internal)?
                .ok_or_else(|| ServiceError::not_found(format!("no product {}", q.product_id)));
        }
    }
    let updated = sqlx::query("UPDATE products SET on_hand = on_hand + $1 WHERE id = $2")
        .bind(q.quantity)
        .bind(q.product_id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(internal)?
        .rows_affected();
    if updated == 0 {
        return Err(ServiceError::not_found(format!(
            "no product {}",
            q.product_id
        )));
    }
    let product = store::product(&mut tx, q.product_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ServiceError::not_found(format!("no product {}", q.product_id)))?;
    let event = Restocked {
        product_id: q.product_id,
        quantity: q.quantity,
        available: product.available,
    };
    tx.publish(&Envelope::event(NAME, &event, &ctx).map_err(internal)?);
    tx.commit().await.map_err(internal)?;
    Ok(product)
}

async fn list(store: Store) -> Result<ProductList, ServiceError> {
    let mut conn = store.pool().acquire().await.map_err(internal)?;
    Ok(ProductList {
        items: store::products(&mut conn).await.map_err(internal)?,
    })
}

async fn get(store: Store, q: GetProduct) -> Result<Product, ServiceError> {
    let mut conn = store.pool().acquire().await.map_err(internal)?;
    store::product(&mut conn, q.product_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ServiceError::not_found(format!("no product {}", q.product_id)))
}
