//! `/v1/products`: catalog's requests.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use schemars::JsonSchema;
use serde::Deserialize;
use skein_contracts::catalog::{AddProduct, ListProducts, Restock};
use skein_contracts::validate::{Validate, Violation};
use skein_contracts::{Caller, Role};
use uuid::Uuid;

use super::{idempotent, json, path_id, PathParam};
use crate::auth::Admin;
use crate::body::{body, Json};
use crate::context::RequestContext;
use crate::idempotency::derived_id;
use crate::problem::ApiError;
use crate::state::Shared;

/// A new product.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// Unique stock-keeping unit, 1 to 64 characters, no white space.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^\S+$"))]
    pub sku: String,
    /// Display name, 1 to 200 characters.
    #[schemars(length(min = 1, max = 200))]
    pub name: String,
    /// Unit price in cents.
    #[schemars(range(min = 0, max = 100000000))]
    pub price_cents: i64,
    /// Initial stock.
    #[schemars(range(min = 0, max = 10000))]
    pub stock: i64,
}

impl NewProduct {
    fn into_request(self, caller: Caller, product_id: Option<Uuid>) -> AddProduct {
        AddProduct {
            caller,
            sku: self.sku,
            name: self.name,
            price_cents: self.price_cents,
            stock: self.stock,
            product_id,
        }
    }
}

impl Validate for NewProduct {
    fn violations(&self) -> Vec<Violation> {
        let probe = Caller {
            user_id: Uuid::nil(),
            role: Role::Admin,
        };
        AddProduct {
            caller: probe,
            sku: self.sku.clone(),
            name: self.name.clone(),
            price_cents: self.price_cents,
            stock: self.stock,
            product_id: None,
        }
        .violations()
    }
}

/// Stock to add.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestockBody {
    /// Units to add, 1 to 10000.
    #[schemars(range(min = 1, max = 10000))]
    pub quantity: i64,
}

impl Validate for RestockBody {
    fn violations(&self) -> Vec<Violation> {
        Restock {
            caller: Caller {
                user_id: Uuid::nil(),
                role: Role::Admin,
            },
            product_id: Uuid::nil(),
            quantity: self.quantity,
            request_id: None,
        }
        .violations()
    }
}

body!(NewProduct, RestockBody);

pub(crate) async fn list(
    State(state): State<Shared>,
    ctx: RequestContext,
) -> Result<Response, ApiError> {
    let products = state.ask(&ListProducts {}, &ctx.message_context()).await?;
    Ok(json(StatusCode::OK, &products))
}

pub(crate) async fn add(
    State(state): State<Shared>,
    ctx: RequestContext,
    Admin(caller): Admin,
    headers: HeaderMap,
    Json(body, raw): Json<NewProduct>,
) -> Response {
    let scope = format!("user:{}", caller.user_id);
    idempotent(&state, &headers, &scope, "add_product", &raw, |key| async {
        // With a key the product's id is derived from it: a retry through
        // another ingress copy (which has not seen the key) asks for the
        // same product, which the catalog then answers without adding it
        // again.
        let product_id = key.map(|key| derived_id("product", &scope, &key));
        let product = state
            .ask(
                &body.into_request(caller, product_id),
                &ctx.message_context(),
            )
            .await?;
        Ok(json(StatusCode::CREATED, &product))
    })
    .await
}

pub(crate) async fn restock(
    State(state): State<Shared>,
    ctx: RequestContext,
    Admin(caller): Admin,
    PathParam(id): PathParam,
    headers: HeaderMap,
    Json(body, raw): Json<RestockBody>,
) -> Response {
    let product_id = match path_id(&id, "product") {
        Ok(id) => id,
        Err(e) => return axum::response::IntoResponse::into_response(e),
    };
    let scope = format!("user:{}", caller.user_id);
    let what = format!("restock {product_id}");
    idempotent(&state, &headers, &scope, &what, &raw, |key| async {
        // With a key the restock's id is derived from it and from what it
        // asks: a retry through another ingress copy is not applied twice.
        let request_id = key.map(|key| {
            derived_id(
                &format!("restock {product_id} {}", body.quantity),
                &scope,
                &key,
            )
        });
        let request = Restock {
            caller,
            product_id,
            quantity: body.quantity,
            request_id,
        };
        let product = state.ask(&request, &ctx.message_context()).await?;
        Ok(json(StatusCode::OK, &product))
    })
    .await
}
