//! The read models' tables: the projection's writes, the queries' reads and
//! the canonical [`Snapshot`].

use serde::{Deserialize, Serialize};
use skein_contracts::orders::OrderStatus;
use skein_contracts::Role;
use skein_outbox::{Backend, Statements, Store};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use uuid::Uuid;

use crate::projection::status_rank;
use crate::ReadModel;

/// PostgreSQL advisory lock between the live projection (shared) and a
/// rebuild (exclusive). "skeinprj"; distinct from the relay's key.
const REBUILD_LOCK_KEY: i64 = 0x736b_6569_6e70_726a;

/// Taken by the live handler in its transaction before it writes: waits
/// while a rebuild runs. On SQLite every write transaction already holds the
/// database's write lock (`BEGIN IMMEDIATE`), which serialises the same way.
pub(crate) async fn lock_for_event(
    conn: &mut AnyConnection,
    backend: Backend,
) -> Result<(), sqlx::Error> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock_shared($1)) AS locked")
            .bind(REBUILD_LOCK_KEY)
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Taken by a rebuild in its transaction: waits for the live handlers in
/// flight to commit and holds new ones back until the rebuild commits.
pub(crate) async fn lock_for_rebuild(
    conn: &mut AnyConnection,
    backend: Backend,
) -> Result<(), sqlx::Error> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) AS locked")
            .bind(REBUILD_LOCK_KEY)
            .execute(conn)
            .await?;
    }
    Ok(())
}

// ---- rows ----

/// A user, from `user_registered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    /// User id.
    pub id: String,
    /// Email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// `customer` or `admin`.
    pub role: String,
    /// RFC 3339 `ce-time` of `user_registered`.
    pub created_at: String,
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRow {
    /// Order id.
    pub id: String,
    /// The customer.
    pub customer_id: String,
    /// Total in cents (0 for an order only ever rejected).
    pub total_cents: i64,
    /// `pending`, `confirmed`, `rejected` or `cancelled`.
    pub status: String,
    /// See [`status_rank`].
    pub status_rank: i64,
    /// Stream sequence of the event that set the status.
    pub status_seq: i64,
    /// Earliest `ce-time` of the order's events, unix microseconds.
    pub placed_at: i64,
}

/// One timeline entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineRow {
    /// `ce-id`.
    pub event_id: String,
    /// The order.
    pub order_id: String,
    /// Stream sequence.
    pub stream_seq: i64,
    /// `ce-type`.
    pub kind: String,
    /// RFC 3339 `ce-time`.
    pub event_time: String,
    /// `ce-time`, unix microseconds.
    pub event_at: i64,
}

/// A canonical dump of the read models: every row of every table, sorted by
/// primary key. Two snapshots are equal exactly when the read models hold
/// the same contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Users by id.
    pub users: Vec<UserRow>,
    /// Orders by id.
    pub orders: Vec<OrderRow>,
    /// Timeline entries by event id.
    pub timeline: Vec<TimelineRow>,
}

/// Dumps every read model in one consistent read.
pub async fn snapshot(store: &Store) -> Result<Snapshot, sqlx::Error> {
    let mut tx = read_tx(store).await?;
    let snapshot = dump(&mut tx, ReadModel::All).await?;
    tx.commit().await?;
    Ok(snapshot)
}

/// A read-only transaction that sees one state of the database.
pub(crate) async fn read_tx(
    store: &Store,
) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
    match store.backend() {
        Backend::Sqlite => store.pool().begin().await,
        Backend::Postgres => {
            store
                .pool()
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
        }
    }
}

/// Dumps the tables of `model` (the others stay empty).
pub(crate) async fn dump(
    conn: &mut AnyConnection,
    model: ReadModel,
) -> Result<Snapshot, sqlx::Error> {
    let mut out = Snapshot::default();
    if model.includes(ReadModel::Users) {
        out.users = sqlx::query("SELECT id, email, name, role, created_at FROM users ORDER BY id")
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(to_user_row)
            .collect::<Result<_, _>>()?;
    }
    if model.includes(ReadModel::Orders) {
        out.orders = sqlx::query(
            "SELECT id, customer_id, total_cents, status, status_rank, status_seq, placed_at \
             FROM orders ORDER BY id",
        )
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| {
            Ok(OrderRow {
                id: r.try_get("id")?,
                customer_id: r.try_get("customer_id")?,
                total_cents: r.try_get("total_cents")?,
                status: r.try_get("status")?,
                status_rank: r.try_get("status_rank")?,
                status_seq: r.try_get("status_seq")?,
                placed_at: r.try_get("placed_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    }
    if model.includes(ReadModel::Timeline) {
        out.timeline = sqlx::query(
            "SELECT event_id, order_id, stream_seq, kind, event_time, event_at \
             FROM timeline ORDER BY event_id",
        )
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(to_timeline_row)
        .collect::<Result<_, _>>()?;
    }
    Ok(out)
}

/// Empties the tables of `model`.
pub(crate) async fn clear(conn: &mut AnyConnection, model: ReadModel) -> Result<(), sqlx::Error> {
    for table in model.tables() {
        // Table names come from a fixed list, never from input.
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

// ---- writes ----

/// Inserts or refreshes a user.
pub(crate) async fn upsert_user(
    conn: &mut AnyConnection,
    user: &UserRow,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (id, email, name, role, created_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name, \
         role = excluded.role, created_at = excluded.created_at",
    )
    .bind(&user.id)
    .bind(&user.email)
    .bind(&user.name)
    .bind(&user.role)
    .bind(&user.created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// What one orders event says about its order.
#[derive(Debug, Clone)]
pub(crate) struct OrderChange {
    pub(crate) order_id: Uuid,
    pub(crate) customer_id: Uuid,
    /// The total, when the event carries it.
    pub(crate) total_cents: Option<i64>,
    pub(crate) status: OrderStatus,
    pub(crate) status_seq: i64,
    /// The event's `ce-time`, unix microseconds.
    pub(crate) at: i64,
}

/// Creates the order or merges `change` into it: the total when carried,
/// the earliest time, and the status only if it is newer by (rank, sequence).
/// Every column is a max/min/constant over the events, so the result does
/// not depend on the order they come in.
pub(crate) fn push_upsert_order(writes: &mut Statements, change: &OrderChange) {
    const NEWER: &str = "(excluded.status_rank > orders.status_rank OR \
        (excluded.status_rank = orders.status_rank AND excluded.status_seq > orders.status_seq))";
    let total = if change.total_cents.is_some() {
        "excluded.total_cents"
    } else {
        "orders.total_cents"
    };
    let sql = format!(
        "INSERT INTO orders (id, customer_id, total_cents, status, status_rank, status_seq, placed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (id) DO UPDATE SET \
         customer_id = excluded.customer_id, \
         total_cents = {total}, \
         status = CASE WHEN {NEWER} THEN excluded.status ELSE orders.status END, \
         status_rank = CASE WHEN {NEWER} THEN excluded.status_rank ELSE orders.status_rank END, \
         status_seq = CASE WHEN {NEWER} THEN excluded.status_seq ELSE orders.status_seq END, \
         placed_at = CASE WHEN excluded.placed_at < orders.placed_at \
             THEN excluded.placed_at ELSE orders.placed_at END"
    );
    writes.push(&sql, |b| {
        b.bind(change.order_id.to_string())
            .bind(change.customer_id.to_string())
            .bind(change.total_cents.unwrap_or(0))
            .bind(change.status.as_str())
            .bind(status_rank(change.status))
            .bind(change.status_seq)
            .bind(change.at);
    });
}

/// One event in an order's timeline.
#[derive(Debug, Clone)]
pub(crate) struct TimelineEntry {
    pub(crate) event_id: Uuid,
    pub(crate) order_id: Uuid,
    pub(crate) stream_seq: i64,
    pub(crate) kind: String,
    pub(crate) event_time: String,
    pub(crate) event_at: i64,
}

/// Adds an entry once: a replayed event is already there.
pub(crate) fn push_timeline_entry(writes: &mut Statements, entry: &TimelineEntry) {
    writes.push(
        "INSERT INTO timeline (event_id, order_id, stream_seq, kind, event_time, event_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
        |b| {
            b.bind(entry.event_id.to_string())
                .bind(entry.order_id.to_string())
                .bind(entry.stream_seq)
                .bind(entry.kind.clone())
                .bind(entry.event_time.clone())
                .bind(entry.event_at);
        },
    );
}

// ---- reads ----

/// Users, and orders count and total per status.
#[derive(Debug, Clone, Default)]
pub(crate) struct Totals {
    pub(crate) users: i64,
    /// (status, orders, sum of totals)
    pub(crate) by_status: Vec<(String, i64, i64)>,
}

/// The dashboard's figures.
pub(crate) async fn totals(conn: &mut AnyConnection) -> Result<Totals, sqlx::Error> {
    let users: i64 = sqlx::query("SELECT COUNT(*) AS n FROM users")
        .fetch_one(&mut *conn)
        .await?
        .try_get("n")?;
    let by_status = sqlx::query(
        "SELECT status, COUNT(*) AS n, CAST(COALESCE(SUM(total_cents), 0) AS BIGINT) AS cents \
         FROM orders GROUP BY status",
    )
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| Ok((r.try_get("status")?, r.try_get("n")?, r.try_get("cents")?)))
    .collect::<Result<_, sqlx::Error>>()?;
    Ok(Totals { users, by_status })
}

/// A user.
pub(crate) async fn user(
    conn: &mut AnyConnection,
    id: Uuid,
) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query("SELECT id, email, name, role, created_at FROM users WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .as_ref()
        .map(to_user_row)
        .transpose()
}

/// A customer's orders, newest first: (id, status, total).
pub(crate) async fn orders_of(
    conn: &mut AnyConnection,
    customer_id: Uuid,
) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query(
        "SELECT id, status, total_cents FROM orders WHERE customer_id = $1 \
         ORDER BY placed_at DESC, id DESC",
    )
    .bind(customer_id.to_string())
    .fetch_all(conn)
    .await?
    .iter()
    .map(|r| {
        Ok((
            r.try_get("id")?,
            r.try_get("status")?,
            r.try_get("total_cents")?,
        ))
    })
    .collect()
}

/// An order's customer.
pub(crate) async fn order_owner(
    conn: &mut AnyConnection,
    order_id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query("SELECT customer_id FROM orders WHERE id = $1")
        .bind(order_id.to_string())
        .fetch_optional(conn)
        .await?
        .map(|r| r.try_get("customer_id"))
        .transpose()
}

/// An order's timeline entries, oldest first.
pub(crate) async fn timeline_of(
    conn: &mut AnyConnection,
    order_id: Uuid,
) -> Result<Vec<TimelineRow>, sqlx::Error> {
    sqlx::query(
        "SELECT event_id, order_id, stream_seq, kind, event_time, event_at FROM timeline \
         WHERE order_id = $1 ORDER BY stream_seq, event_id",
    )
    .bind(order_id.to_string())
    .fetch_all(conn)
    .await?
    .iter()
    .map(to_timeline_row)
    .collect()
}

fn to_user_row(r: &AnyRow) -> Result<UserRow, sqlx::Error> {
    Ok(UserRow {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        name: r.try_get("name")?,
        role: r.try_get("role")?,
        created_at: r.try_get("created_at")?,
    })
}

fn to_timeline_row(r: &AnyRow) -> Result<TimelineRow, sqlx::Error> {
    Ok(TimelineRow {
        event_id: r.try_get("event_id")?,
        order_id: r.try_get("order_id")?,
        stream_seq: r.try_get("stream_seq")?,
        kind: r.try_get("kind")?,
        event_time: r.try_get("event_time")?,
        event_at: r.try_get("event_at")?,
    })
}

/// The stored name of a role.
pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Customer => "customer",
        Role::Admin => "admin",
    }
}

/// A stored role name.
pub(crate) fn parse_role(name: &str) -> Option<Role> {
    match name {
        "customer" => Some(Role::Customer),
        "admin" => Some(Role::Admin),
        _ => None,
    }
}

/// A stored status name.
pub(crate) fn parse_status(name: &str) -> Option<OrderStatus> {
    [
        OrderStatus::Pending,
        OrderStatus::Confirmed,
        OrderStatus::Rejected,
        OrderStatus::Cancelled,
    ]
    .into_iter()
    .find(|s| s.as_str() == name)
}
