//! Every contract with its kind, subject and JSON Schema.
//!
//! `schemas/` holds one file per entry (`<service>/<name>.v<N>.json`, replies
//! `<service>/<name>.reply.v<N>.json`) and `schemas/index.json`; the test
//! `schemas_match_the_types` regenerates them from the types and fails on
//! any difference (`SKEIN_BLESS_SCHEMAS=1` rewrites them after a deliberate
//! change).

use schemars::{JsonSchema, Schema};
use serde::Serialize;
use skein_message::{subject, Command, Event, Query};

use crate::{catalog, identity, orchestrator, orders, payments, projector};

/// What a contract is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A command, on the `COMMANDS` stream.
    Command,
    /// An event, on the `EVENTS` stream.
    Event,
    /// A query or request, over request-reply.
    Query,
    /// The reply to a query.
    Reply,
}

/// One contract.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// `ce-type`, e.g. `orders.order_placed.v1` (replies: `….reply.v1`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// What it is.
    pub kind: Kind,
    /// NATS subject (pattern for events).
    pub subject: String,
    /// Schema file under `schemas/`.
    pub file: String,
    /// The JSON Schema.
    #[serde(skip)]
    pub schema: Schema,
}

fn schema<T: JsonSchema>(file: &str) -> Schema {
    let mut schema = schemars::schema_for!(T);
    schema.insert("$id".into(), format!("urn:skein:schemas:{file}").into());
    schema
}

fn event<E: Event + JsonSchema>() -> Entry {
    let file = format!("{}/{}.v{}.json", E::SERVICE, E::NAME, E::VERSION);
    Entry {
        type_name: E::type_name().to_string(),
        kind: Kind::Event,
        subject: subject::event(E::SERVICE, "<id>", E::NAME),
        schema: schema::<E>(&file),
        file,
    }
}

fn command<C: Command + JsonSchema>() -> Entry {
    let file = format!("{}/{}.v{}.json", C::SERVICE, C::NAME, C::VERSION);
    Entry {
        type_name: C::type_name().to_string(),
        kind: Kind::Command,
        subject: subject::command(C::SERVICE, C::NAME),
        schema: schema::<C>(&file),
        file,
    }
}

fn query<Q>() -> [Entry; 2]
where
    Q: Query + JsonSchema,
    Q::Reply: JsonSchema,
{
    let file = format!("{}/{}.v{}.json", Q::SERVICE, Q::NAME, Q::VERSION);
    let reply_file = format!("{}/{}.reply.v{}.json", Q::SERVICE, Q::NAME, Q::VERSION);
    let subject = subject::query(Q::SERVICE, Q::NAME);
    [
        Entry {
            type_name: Q::type_name().to_string(),
            kind: Kind::Query,
            subject: subject.clone(),
            schema: schema::<Q>(&file),
            file,
        },
        Entry {
            type_name: format!("{}.{}.reply.v{}", Q::SERVICE, Q::NAME, Q::VERSION),
            kind: Kind::Reply,
            subject,
            schema: schema::<Q::Reply>(&reply_file),
            file: reply_file,
        },
    ]
}

/// Every contract of the platform, by service.
pub fn all() -> Vec<Entry> {
    let mut entries = vec![
        event::<identity::UserRegistered>(),
        event::<catalog::ProductAdded>(),
        event::<catalog::Restocked>(),
        event::<catalog::StockReserved>(),
        event::<catalog::StockRejected>(),
        event::<catalog::StockReleased>(),
        event::<catalog::StockCommitted>(),
        command::<catalog::ReserveStock>(),
        command::<catalog::ReleaseStock>(),
        command::<catalog::CommitStock>(),
        event::<orders::OrderPlaced>(),
        event::<orders::OrderConfirmed>(),
        event::<orders::OrderRejected>(),
        event::<orders::OrderCancellationRequested>(),
        event::<orders::OrderCancelled>(),
        command::<orders::PlaceOrder>(),
        command::<orders::ConfirmOrder>(),
        command::<orders::RejectOrder>(),
        command::<orders::CancelOrder>(),
        command::<orders::MarkCancelled>(),
        event::<payments::PaymentAuthorized>(),
        event::<payments::PaymentDeclined>(),
        event::<payments::PaymentRefunded>(),
        command::<payments::AuthorizePayment>(),
        command::<payments::RefundPayment>(),
    ];
    entries.extend(query::<identity::Register>());
    entries.extend(query::<identity::IssueToken>());
    entries.extend(query::<identity::RefreshToken>());
    entries.extend(query::<identity::RevokeToken>());
    entries.extend(query::<identity::GetUser>());
    entries.extend(query::<identity::GetVerificationKey>());
    entries.extend(query::<identity::GetVerificationKeys>());
    entries.extend(query::<catalog::AddProduct>());
    entries.extend(query::<catalog::Restock>());
    entries.extend(query::<catalog::ListProducts>());
    entries.extend(query::<catalog::GetProduct>());
    entries.extend(query::<orders::GetOrder>());
    entries.extend(query::<orders::ListOrders>());
    entries.extend(query::<payments::GetAccount>());
    entries.extend(query::<payments::Ledger>());
    entries.extend(query::<projector::GetDashboard>());
    entries.extend(query::<projector::GetProfile>());
    entries.extend(query::<projector::GetTimeline>());
    entries.extend(query::<orchestrator::GetSaga>());
    entries.extend(query::<orchestrator::ListSagas>());
    entries.extend(query::<orchestrator::StuckSagas>());
    entries.extend(query::<orchestrator::RetrySaga>());
    entries.sort_by(|a, b| a.file.cmp(&b.file));
    entries
}

/// The contents of `schemas/index.json`.
pub fn index() -> serde_json::Value {
    serde_json::json!({
        "description": "Every skein message contract: type, kind, subject and schema file (generated from crates/contracts).",
        "contracts": all(),
    })
}

/// `schemas/README.md`: every contract by service, as tables.
pub fn markdown() -> String {
    let entries = all();
    let mut out = String::from(
        "# Message contracts\n\n\
         Generated from `crates/contracts` by the test `schemas_match_the_types`; do not edit.\n\
         Each row links the JSON Schema (draft 2020-12) of the payload.\n",
    );
    let mut services: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.file.split('/').next())
        .collect();
    services.dedup();
    for service in services {
        out.push_str(&format!(
            "\n## {service}\n\n| type | kind | subject | what |\n|---|---|---|---|\n"
        ));
        for e in entries
            .iter()
            .filter(|e| e.file.starts_with(&format!("{service}/")))
        {
            let what = e
                .schema
                .get("description")
                .and_then(|d| d.as_str())
                .and_then(|d| d.split("\n\n").next())
                .unwrap_or("")
                .replace('\n', " ")
                .replace('|', "\\|");
            let kind = match e.kind {
                Kind::Command => "command",
                Kind::Event => "event",
                Kind::Query => "query",
                Kind::Reply => "reply",
            };
            out.push_str(&format!(
                "| [`{}`]({}) | {kind} | `{}` | {what} |\n",
                e.type_name, e.file, e.subject
            ));
        }
    }
    out
}

/// The schema entry of a `ce-type` (commands, events, queries).
pub fn find(type_name: &str) -> Option<Entry> {
    all().into_iter().find(|e| e.type_name == type_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_name_and_file_is_unique() {
        let entries = all();
        let mut names = std::collections::HashSet::new();
        let mut files = std::collections::HashSet::new();
        for e in &entries {
            assert!(
                names.insert(e.type_name.clone()),
                "duplicate {}",
                e.type_name
            );
            assert!(files.insert(e.file.clone()), "duplicate {}", e.file);
        }
    }
}
