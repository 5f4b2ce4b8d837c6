//! `/openapi.json`: the API as an OpenAPI 3.1 document.
//!
//! Paths come from [`ROUTES`]; payload schemas from
//! the contracts registry (the same schemas as `schemas/`) where the body or
//! answer is a contract type, and from the ingress's own body types
//! otherwise. Component names are the contracts' `ce-type`s.

use serde_json::{json, Map, Value};

use crate::routes::{Access, ROUTES};

/// What one operation takes and answers.
struct Operation {
    /// Request body schema (component name).
    body: Option<&'static str>,
    /// Success status.
    status: &'static str,
    /// Success body schema (component name).
    reply: Option<&'static str>,
    /// Further answers than the common ones.
    errors: &'static [&'static str],
}

fn operation(method: &str, path: &str) -> Operation {
    let op = |body, status, reply, errors| Operation {
        body,
        status,
        reply,
        errors,
    };
    match (method, path) {
        ("POST", "/v1/auth/register") => op(
            Some("ingress.Register"),
            "201",
            Some("identity.register.reply.v1"),
            &["409", "422"],
        ),
        ("POST", "/v1/auth/token") => op(
            Some("ingress.Login"),
            "200",
            Some("identity.issue_token.reply.v1"),
            &["401", "422"],
        ),
        ("POST", "/v1/auth/refresh") => op(
            Some("ingress.Refresh"),
            "200",
            Some("identity.refresh_token.reply.v1"),
            &["401", "422"],
        ),
        ("POST", "/v1/auth/logout") => op(
            Some("ingress.Logout"),
            "200",
            Some("identity.revoke_token.reply.v1"),
            &["401", "422"],
        ),
        ("GET", "/v1/me") => op(None, "200", Some("identity.get_user.reply.v1"), &[]),
        ("GET", "/v1/products") => op(None, "200", Some("catalog.list_products.reply.v1"), &[]),
        ("POST", "/v1/products") => op(
            Some("ingress.NewProduct"),
            "201",
            Some("catalog.add_product.reply.v1"),
            &["409", "422"],
        ),
        ("POST", "/v1/products/{id}/restock") => op(
            Some("ingress.Restock"),
            "200",
            Some("catalog.restock.reply.v1"),
            &["404", "422"],
        ),
        ("POST", "/v1/orders") => op(
            Some("ingress.NewOrder"),
            "202",
            Some("ingress.Accepted"),
            &["422"],
        ),
        ("GET", "/v1/orders") => op(None, "200", Some("orders.list_orders.reply.v1"), &["422"]),
        ("GET", "/v1/orders/{id}") => op(None, "200", Some("orders.get_order.reply.v1"), &["404"]),
        ("POST", "/v1/orders/{id}/cancel") => {
            op(None, "202", Some("ingress.Accepted"), &["404", "409"])
        }
        ("GET", "/v1/users/{id}/profile") => {
            op(None, "200", Some("projector.profile.reply.v1"), &["404"])
        }
        ("GET", "/v1/dashboard") => op(None, "200", Some("projector.dashboard.reply.v1"), &[]),
        ("GET", "/v1/sagas/{id}") => op(
            None,
            "200",
            Some("orchestrator.get_saga.reply.v1"),
            &["404"],
        ),
        ("POST", "/v1/sagas/{id}/retry") => op(
            None,
            "200",
            Some("orchestrator.retry_saga.reply.v1"),
            &["404", "409"],
        ),
        ("GET", "/v1/trace/{id}") => op(None, "200", None, &["404", "422"]),
        _ => op(None, "200", None, &[]),
    }
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/problem+json": { "schema": schema_ref("ingress.Problem") } }
    })
}

fn error_description(status: &str) -> &'static str {
    match status {
        "400" => "Malformed JSON or header",
        "401" => "No valid access token (see WWW-Authenticate); on /v1/auth/token and /v1/auth/refresh, wrong credentials or refresh token; on /v1/auth/logout with everywhere, a refresh token that no longer works",
        "403" => "The caller's role does not allow this",
        "404" => "Not found, or not the caller's",
        "408" => "The body came too slowly",
        "409" => "Conflicts with the current state",
        "413" => "Body larger than the limit",
        "415" => "Body is not JSON",
        "422" => "Invalid input: every violation with its JSON pointer (a query parameter's as ?name); or an Idempotency-Key reused with another request",
        "429" => "Rate limited (see Retry-After)",
        "500" => "Internal error (quote the request id)",
        "502" => "The service answered with an error of its own",
        "503" => "Service or message bus unavailable, or circuit breaker open (see Retry-After); for a command, also not confirmed by the message bus: it may still be carried out, retry with the same Idempotency-Key; for your own profile or an order placed moments ago, not stored yet: retry",
        "504" => "The service did not answer in time",
        _ => "Error",
    }
}

fn path_item(method: &str, path: &str, summary: &str, access: Access) -> Value {
    let op = operation(method, path);
    let mut responses = Map::new();
    let success = match (op.reply, path) {
        (None, "/health") => json!({
            "description": "Everything answers",
            "content": { "application/json": { "schema": schema_ref("ingress.Health") } }
        }),
        (Some(reply), _) => json!({
            "description": "Success",
            "content": { "application/json": { "schema": schema_ref(reply) } }
        }),
        (None, "/metrics") => json!({
            "description": "Prometheus text exposition",
            "content": { "text/plain": { "schema": { "type": "string" } } }
        }),
        (None, _) => json!({
            "description": "Success",
            "content": { "application/json": { "schema": { "type": "object" } } }
        }),
    };
    responses.insert(op.status.to_owned(), success);
    let mut errors: Vec<&str> = op.errors.to_vec();
    if path.starts_with("/v1/") {
        errors.extend(["429", "500", "502", "503", "504"]);
        if access != Access::Anyone {
            errors.push("401");
        }
        if access == Access::Admin {
            errors.push("403");
        }
        if op.body.is_some() {
            errors.extend(["400", "408", "413", "415", "422"]);
        }
    }
    errors.sort_unstable();
    errors.dedup();
    if path == "/health" {
        // Not a problem: the same report as a 200, saying what fails.
        responses.insert(
            "503".to_owned(),
            json!({
                "description": "Something fails: the same report, with what in `failing`",
                "content": { "application/json": { "schema": schema_ref("ingress.Health") } }
            }),
        );
    }
    for status in errors {
        responses.insert(status.to_owned(), problem(error_description(status)));
    }
    if op.status == "202" {
        responses.insert(
            "200".to_owned(),
            json!({
                "description": "With Prefer: wait=N, the order once final (Preference-Applied)",
                "content": { "application/json": { "schema": schema_ref("orders.get_order.reply.v1") } }
            }),
        );
    }
    let mut operation = json!({
        "operationId": format!("{} {}", method.to_lowercase(), path),
        "summary": summary,
        "responses": responses,
    });
    let mut parameters = Vec::new();
    if path == "/v1/trace/{id}" {
        parameters.push(json!({
            "name": "id", "in": "path", "required": true,
            "description": "A request's id (its x-request-id, the correlation id of what it caused) or an order's id",
            "schema": { "type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9._:-]+$" }
        }));
        parameters.push(json!({
            "name": "since", "in": "query", "required": false,
            "description": "How far back a request id is looked for among all events (an order's are found however old); default 24 hours ago",
            "schema": { "type": "string", "format": "date-time" }
        }));
    } else if path.contains("{id}") {
        parameters.push(json!({
            "name": "id", "in": "path", "required": true,
            "schema": { "type": "string", "format": "uuid" }
        }));
    }
    if method == "POST"
        && op.body.is_some()
        && path != "/v1/auth/token"
        && path != "/v1/auth/refresh"
    {
        parameters.push(json!({
            "name": "Idempotency-Key", "in": "header", "required": false,
            "description": "Same key from the same caller: the same result, never a second effect",
            "schema": { "type": "string", "minLength": 1, "maxLength": 255 }
        }));
    }
    if path.starts_with("/v1/orders") && method == "POST" {
        parameters.push(json!({
            "name": "Prefer", "in": "header", "required": false,
            "description": "wait=N (N <= 30): hold the answer until the order is final or N seconds pass",
            "schema": { "type": "string", "example": "wait=5" }
        }));
    }
    if (method, path) == ("GET", "/v1/orders") {
        parameters.push(json!({ "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100, "default": 20 } }));
        parameters.push(json!({ "name": "cursor", "in": "query", "schema": { "type": "string" } }));
    }
    if path.starts_with("/v1/") {
        parameters.push(json!({
            "name": "x-request-id", "in": "header", "required": false,
            "description": "Kept when well formed; the correlation id of every message the request causes",
            "schema": { "type": "string", "maxLength": 128 }
        }));
    }
    if !parameters.is_empty() {
        operation["parameters"] = Value::Array(parameters);
    }
    if let Some(body) = op.body {
        operation["requestBody"] = json!({
            "required": true,
            "content": { "application/json": { "schema": schema_ref(body) } }
        });
    }
    if access != Access::Anyone {
        operation["security"] = json!([{ "bearer": [] }]);
    }
    operation
}

fn local<T: schemars::JsonSchema>(name: &str) -> (String, Value) {
    let mut schema = serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default();
    if let Some(o) = schema.as_object_mut() {
        o.insert("$id".into(), format!("urn:skein:ingress:{name}").into());
    }
    (name.to_owned(), schema)
}

/// The OpenAPI document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let item = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        item[r.method.to_lowercase()] = path_item(r.method, r.path, r.summary, r.access);
    }
    let mut schemas = Map::new();
    for entry in skein_contracts::registry::all() {
        if let Ok(schema) = serde_json::to_value(&entry.schema) {
            schemas.insert(entry.type_name, schema);
        }
    }
    use crate::routes::{auth, orders, products};
    for (name, schema) in [
        local::<auth::Registration>("ingress.Register"),
        local::<auth::Login>("ingress.Login"),
        local::<auth::Refresh>("ingress.Refresh"),
        local::<auth::Logout>("ingress.Logout"),
        local::<products::NewProduct>("ingress.NewProduct"),
        local::<products::RestockBody>("ingress.Restock"),
        local::<orders::NewOrder>("ingress.NewOrder"),
        local::<orders::Accepted>("ingress.Accepted"),
    ] {
        schemas.insert(name, schema);
    }
    schemas.insert(
        "ingress.Health".into(),
        json!({
            "type": "object",
            "description": "What /health checked",
            "required": ["status", "failing", "nats", "streams", "services"],
            "properties": {
                "status": { "enum": ["ok", "failing"] },
                "failing": { "type": "array", "items": { "type": "string" }, "description": "What fails, one line each" },
                "nats": { "type": "boolean" },
                "streams": { "type": "object", "additionalProperties": { "type": "boolean" } },
                "services": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["alive", "breaker"],
                        "properties": {
                            "alive": { "type": "boolean" },
                            "consumer_lag": { "type": "integer" },
                            "outbox_backlog": { "type": "integer" },
                            "dlq_depth": { "type": "integer" },
                            "breaker": { "type": "string" }
                        }
                    }
                }
            }
        }),
    );
    schemas.insert(
        "ingress.Problem".into(),
        json!({
            "type": "object",
            "description": "RFC 9457 problem details",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": { "type": "string", "description": "Stable problem type, urn:skein:problem:<slug>" },
                "title": { "type": "string" },
                "status": { "type": "integer" },
                "detail": { "type": "string" },
                "instance": { "type": "string" },
                "request_id": { "type": "string" },
                "violations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "message"],
                        "properties": {
                            "field": { "type": "string", "description": "JSON pointer" },
                            "message": { "type": "string" }
                        }
                    }
                }
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "skein",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The order platform's client API. Errors are RFC 9457 problem+json."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" }
            }
        }
    })
}
