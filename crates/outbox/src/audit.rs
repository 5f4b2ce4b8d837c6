//! What `skein audit` reads from a service's database: the published
//! outbox rows kept for the retention period, and the inbox.
//!
//! One id runs end to end (outbox row id = `ce-id` = `Nats-Msg-Id` = inbox
//! key), so comparing these with the streams finds messages the broker
//! lost (a single node acknowledges before fsync) and duplicates.

use std::collections::HashSet;

use sqlx::Row;

use crate::error::{Error, Result};
use crate::relay::{decode_row, PendingRow};
use crate::store::Store;

/// A published row still kept.
#[derive(Debug, Clone)]
pub struct PublishedRow {
    /// The row.
    pub row: PendingRow,
    /// When it was marked published (Unix microseconds, the relay's clock):
    /// at or after its publish was acknowledged.
    pub published_at: i64,
}

/// Published rows still kept, marked published before `before` (Unix
/// microseconds), in commit order, with a sequence above `after`, at most
/// `limit`.
pub async fn published_rows(
    store: &Store,
    after: i64,
    before: i64,
    limit: i64,
) -> Result<Vec<PublishedRow>> {
    let rows = sqlx::query(
        "SELECT seq, id, subject, headers, payload, published_at FROM skein_outbox \
         WHERE published_at IS NOT NULL AND published_at < $2 AND seq > $1 ORDER BY seq LIMIT $3",
    )
    .bind(after)
    .bind(before)
    .bind(limit)
    .fetch_all(store.pool())
    .await
    .map_err(Error::query("cannot read the outbox"))?;
    rows.iter()
        .map(|r| {
            Ok(PublishedRow {
                row: decode_row(r)?,
                published_at: r
                    .try_get("published_at")
                    .map_err(Error::query("cannot read an outbox row"))?,
            })
        })
        .collect()
}

/// Before when the inbox may have forgotten what it processed (Unix
/// microseconds): its records of messages processed earlier may have been
/// deleted past their retention; `None` while none has been.
pub async fn inbox_horizon(store: &Store) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT forgotten_before FROM skein_inbox_horizon WHERE name = 'inbox'")
        .fetch_optional(store.pool())
        .await
        .map_err(Error::query("cannot read the inbox's horizon"))
}

/// Rows marked published at or after `since` (Unix microseconds).
pub async fn published_since(store: &Store, since: i64) -> Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM skein_outbox WHERE published_at >= $1")
        .bind(since)
        .fetch_one(store.pool())
        .await
        .map_err(Error::query("cannot read the outbox"))
}

/// The message ids the inbox of `handler` recorded (kept for the inbox
/// retention period).
pub async fn inbox_ids(store: &Store, handler: &str) -> Result<HashSet<String>> {
    let rows = sqlx::query("SELECT message_id FROM skein_inbox WHERE handler = $1")
        .bind(handler)
        .fetch_all(store.pool())
        .await
        .map_err(Error::query("cannot read the inbox"))?;
    rows.iter()
        .map(|r| {
            r.try_get::<String, _>("message_id")
                .map_err(Error::query("cannot read the inbox"))
        })
        .collect()
}
