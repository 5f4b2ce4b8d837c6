//! The relay: publishes committed outbox rows to JetStream in order.
//!
//! One relay is active per database: on PostgreSQL it holds a session
//! advisory lock on a dedicated connection, on SQLite a lease row it renews.
//! Others wait as standbys and take over when the holder dies.
//!
//! The relay wakes at once when a transaction of this process commits
//! messages, and when another process commits to the same database: on
//! PostgreSQL by `NOTIFY skein_outbox` (sent by a trigger on the outbox
//! insert), on SQLite by a core NATS message on
//! `skein.outbox.wake.<owner>` (the active relay's lease owner,
//! `<service>.<id>` for a service's relay), which a
//! standby relay sends on every commit of its own process. A process that
//! writes to a SQLite outbox must therefore run a relay (every worker and
//! `skein replay --into` do); rows of one that does not are published at
//! the next poll. The relay polls (`poll_interval`) as a fallback.
//!
//! Each round reads up to `batch_size` unpublished rows in `seq` order,
//! publishes them pipelined, awaits every ack, and marks the acknowledged
//! rows published. A crash between publishing and marking re-publishes those
//! rows: JetStream drops them by `Nats-Msg-Id` within its duplicate window,
//! and consumers' inboxes absorb them after it. A row whose publish failed is
//! retried later, after rows behind it of other entities may have been
//! published (an entity's rows go out in commit order, each once the one
//! before it is acknowledged): it is held back from the rounds for 250 ms,
//! doubling to 30 s, and rounds read past the rows held back and those
//! waiting behind them (up to 10,000 more than a batch). Rows that fail
//! while NATS is away are not held back: they go out as soon as it is
//! back. So rows that cannot be published (no stream takes
//! their subject; a subject the relay's NATS user may not publish to, whose
//! publish gets no answer and costs the round an ack timeout) neither fill
//! every round nor slow each one down.
//!
//! On SQLite the active relay marks rows published together, `mark_delay`
//! (100 ms) after it published the first of them or after eight full
//! batches of a backlog, instead of after every round: a mark is a write
//! transaction, and the rows of a busy outbox share pages, so one `UPDATE`
//! for many rounds writes each page to the log once where every round
//! wrote it again. Until then the relay
//! remembers how far it has published: SQLite has one writer, so rows
//! commit in `seq` order, and every row committed after a round has a
//! larger `seq` than the rows it read. (PostgreSQL gives out `seq` when a
//! row is inserted, not when it commits, so there a round marks its rows at
//! once.) Rows published and not yet marked when the relay stops are
//! published again by the next one, as after a crash;
//! [`Store::outbox_backlog`] counts them meanwhile.
//!
//! Published rows are kept for `retention` (for `skein audit`) and then
//! deleted, as are inbox records older than `inbox_retention`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use skein_bus::publish::send_if_connected;
use skein_bus::{Outgoing, Publisher};
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{Backend, Store};

/// How long inbox records are kept by default: 30 days.
pub const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows published per round.
    pub batch_size: i64,
    /// Fallback polling period when no wake-up arrives.
    pub poll_interval: Duration,
    /// How long published rows are kept.
    pub retention: Duration,
    /// How long inbox records are kept. Must exceed the longest time a
    /// message can be redelivered or replayed into a live consumer.
    pub inbox_retention: Duration,
    /// How often old rows are cleaned up (first when the relay becomes the
    /// active one), [`CLEANUP_BATCH`] rows of each table per round of the
    /// relay until none past their retention are left; `None`: never, for
    /// a relay that only publishes for a tool (`skein replay --into`),
    /// which leaves deleting to the worker's own relay and its retentions.
    pub cleanup_interval: Option<Duration>,
    /// Lease duration on SQLite; standbys retry at this period. The active
    /// relay renews its lease (SQLite) or pings its lock session
    /// (PostgreSQL) every third of it from a task of its own, whatever it
    /// is publishing meanwhile; on PostgreSQL the server ends a lock session
    /// silent for three leases (freeing the lock for a standby), and a ping
    /// unanswered within a lease gives the lock up.
    pub lease: Duration,
    /// SQLite: how long the active relay lets published rows wait before
    /// it marks them published, to mark the rows of many rounds in one
    /// write (see the [module docs](self)).
    pub mark_delay: Duration,
}

/// Rows of each table (outbox, inbox) one cleanup step deletes at most: a
/// big cleanup (a retention lowered on a full table, a database whose relay
/// was away) goes in short writes, with the process's own writes and the
/// relay's publishing in between, instead of one write that holds the
/// database for seconds.
pub const CLEANUP_BATCH: i64 = 1_000;

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
            inbox_retention: DEFAULT_INBOX_RETENTION,
            cleanup_interval: Some(Duration::from_secs(60)),
            lease: Duration::from_secs(10),
            mark_delay: Duration::from_millis(100),
        }
    }
}

/// One unpublished outbox row.
#[derive(Debug, Clone)]
pub struct PendingRow {
    /// Commit-order sequence.
    pub seq: i64,
    /// Message id (`Nats-Msg-Id`).
    pub id: String,
    /// The message.
    pub message: Outgoing,
}

/// The outbox relay of one database.
///
/// Run one relay per [`Store`] (per process): the relays of one store share
/// its wake-up on commit, which only one of them receives.
#[derive(Debug, Clone)]
pub struct Relay {
    store: Store,
    publisher: Publisher,
    config: RelayConfig,
    owner: String,
    stats: Option<std::sync::Arc<skein_bus::WorkerStats>>,
    /// Publishes the stream acknowledged as duplicates, shared by clones.
    duplicates: Arc<AtomicU64>,
    /// Rows whose publish failed, held back until their next try.
    held: Arc<std::sync::Mutex<HashMap<i64, HeldRow>>>,
    /// How many rows the last round read and could not send (held back,
    /// or behind a held row of their entity): the next round reads as many
    /// more, so that they do not fill it.
    unsendable: Arc<std::sync::atomic::AtomicUsize>,
}

/// A row whose publish failed: how often in a row, and when to try again.
#[derive(Debug, Clone, Copy)]
struct HeldRow {
    failures: u32,
    until: tokio::time::Instant,
}

/// How long a row whose publish failed `failures` times in a row is held
/// back: 250 ms, doubling, at most 30 s. A refused publish can cost a
/// whole ack timeout (a subject the relay's NATS user may not publish to
/// gets no answer), and every row of the round waits for it.
fn hold_for(failures: u32) -> Duration {
    Duration::from_millis(250)
        .saturating_mul(1 << failures.saturating_sub(1).min(7))
        .min(Duration::from_secs(30))
}

/// The entity a row is about (`ce-subject`), if it says.
fn entity_of(row: &PendingRow) -> Option<&str> {
    row.message
        .headers
        .get(skein_message::envelope::headers::SUBJECT)
        .map(|v| v.as_str())
        .filter(|e| !e.is_empty())
}

/// Rows read beyond a round's batch at most, to get past held-back ones.
const MAX_HELD_READ: usize = 10_000;

impl Relay {
    /// A relay for `store`, publishing with `publisher`.
    pub fn new(store: Store, publisher: Publisher, config: RelayConfig) -> Self {
        Self {
            store,
            publisher,
            config,
            owner: Uuid::now_v7().to_string(),
            stats: None,
            duplicates: Arc::default(),
            held: Arc::default(),
            unsendable: Arc::default(),
        }
    }

    /// The relay of service `name`'s database: its SQLite lease owner, and
    /// so the subject a standby wakes it on, is `<name>.<id>`
    /// (`skein.outbox.wake.<name>.<id>`), which a NATS user per service can
    /// be limited to. `name` must be one subject token.
    pub fn for_service(mut self, name: &str) -> Self {
        if skein_message::subject::check_token(name).is_ok() {
            self.owner = format!("{name}.{}", Uuid::now_v7());
        }
        self
    }

    /// Reports the outbox backlog as the `outbox_backlog` gauge of `stats`
    /// (the worker's figures on the NATS service API), and
    /// [`Relay::duplicates`] as `outbox_duplicates`, after a round at most
    /// once a second.
    pub fn with_stats(mut self, stats: std::sync::Arc<skein_bus::WorkerStats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Runs until `shutdown` is cancelled.
    pub fn spawn(self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move { self.run(shutdown).await })
    }

    /// How many rows this relay (and its clones) published that the
    /// stream acknowledged as duplicates: rows published again within the
    /// stream's duplicate window, after a relay died or lost its lock
    /// between publishing and marking them, or after a lost ack or a
    /// failed mark. A row published again after the window is stored
    /// again (the consumers' inboxes absorb it) and not counted here.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Reads the next unpublished rows in commit order.
    pub async fn fetch_pending(&self) -> Result<Vec<PendingRow>> {
        self.fetch_after(0).await
    }

    /// Reads the next unpublished rows with a `seq` above `after`: a batch,
    /// and as many more as rows are held back, so that rows that keep
    /// failing do not fill every round.
    async fn fetch_after(&self, after: i64) -> Result<Vec<PendingRow>> {
        let unsendable = self
            .held()
            .len()
            .max(self.unsendable.load(Ordering::Relaxed))
            .min(MAX_HELD_READ);
        let limit = self
            .config
            .batch_size
            .saturating_add(i64::try_from(unsendable).unwrap_or(0));
        // Where writes go: on SQLite the writer connection, which has the
        // rows just committed in its cache.
        let mut permit = self.store.write_permit().await?;
        let rows = permit
            .fetch_all(|| {
                sqlx::query(
                    "SELECT seq, id, subject, headers, payload FROM skein_outbox \
                     WHERE published_at IS NULL AND seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(after)
                .bind(limit)
            })
            .await
            .map_err(Error::query("cannot read the outbox"))?;
        drop(permit);
        let rows: Vec<PendingRow> = rows.iter().map(decode_row).collect::<Result<_>>()?;
        // Held rows in the range read that did not come back are no longer
        // pending (another relay published them): forget them. (Nothing to
        // do in the usual round, with none held.)
        let mut held = self.held();
        if !held.is_empty() {
            let read: HashSet<i64> = rows.iter().map(|r| r.seq).collect();
            let end = match rows.last() {
                Some(last) if i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit => last.seq,
                _ => i64::MAX,
            };
            held.retain(|seq, _| *seq <= after || *seq > end || read.contains(seq));
        }
        drop(held);
        Ok(rows)
    }

    /// Publishes `rows` (read in `seq` order) pipelined and returns the
    /// sequences the stream acknowledged, in that order.
    ///
    /// One entity's rows (`ce-subject`) reach the stream in commit order,
    /// failures included: a row goes out only once the one before it of
    /// the same entity is acknowledged (in waves: the first row of each
    /// entity, then the next, ...), and none goes out behind one of its
    /// entity that failed or is held back. A row whose publish failed is
    /// held back from the following rounds for a while (250 ms, doubling
    /// to 30 s), so that it does not slow every round down. Rows not
    /// published count as not acknowledged.
    pub async fn publish(&self, rows: &[PendingRow]) -> Vec<i64> {
        let now = tokio::time::Instant::now();
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut remaining: Vec<&PendingRow> = rows.iter().collect();
        let mut acked = Vec::with_capacity(rows.len());
        let mut failed = 0;
        while !remaining.is_empty() {
            let mut wave = Vec::new();
            let mut later = Vec::new();
            {
                let held = self.held();
                let mut in_wave: HashSet<&str> = HashSet::new();
                for row in remaining {
                    let entity = entity_of(row);
                    let waiting = held.get(&row.seq).is_some_and(|h| h.until > now);
                    match entity {
                        Some(e) if waiting || blocked.contains(e) => {
                            blocked.insert(e);
                        }
                        Some(e) if !in_wave.insert(e) => later.push(row),
                        _ if waiting => {}
                        _ => wave.push(row),
                    }
                }
            }
            if wave.is_empty() {
                break;
            }
            let messages: Vec<Outgoing> = wave.iter().map(|r| r.message.clone()).collect();
            let results = self.publisher.publish_batch(&messages).await;
            let connected = self.publisher.client().connection_state()
                == async_nats::connection::State::Connected;
            let mut held = self.held();
            for (row, result) in wave.into_iter().zip(results) {
                match result {
                    Ok(ack) => {
                        if ack.duplicate {
                            self.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        held.remove(&row.seq);
                        acked.push(row.seq)
                    }
                    Err(e) => {
                        failed += 1;
                        if let Some(entity) = entity_of(row) {
                            blocked.insert(entity);
                        }
                        if !connected {
                            // Not this row's fault: every row fails while
                            // NATS is away, and is tried again as soon as it
                            // is back.
                            tracing::debug!(id = %row.id, error = %e, "outbox publish failed while NATS is away");
                            continue;
                        }
                        let failures = held.get(&row.seq).map_or(1, |h| h.failures + 1);
                        let wait = hold_for(failures);
                        held.insert(
                            row.seq,
                            HeldRow {
                                failures,
                                until: tokio::time::Instant::now() + wait,
                            },
                        );
                        tracing::warn!(id = %row.id, error = %e, failures, "outbox publish failed, will retry in {wait:?}")
                    }
                }
            }
            remaining = later;
        }
        // What could not be sent this time: the next round reads past it.
        let unsent = rows.len() - acked.len() - failed;
        self.unsendable.store(unsent, Ordering::Relaxed);
        acked.sort_unstable();
        acked
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<i64, HeldRow>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks rows published.
    pub async fn mark_published(&self, seqs: &[i64]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        // The sequences come from our own table: integers, safe to inline.
        let list = seqs
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "UPDATE skein_outbox SET published_at = $1 WHERE seq IN ({list}) AND published_at IS NULL"
        );
        let mut permit = self.store.write_permit().await?;
        let now = crate::now_micros();
        permit
            .execute(|| {
                sqlx::query(&sql)
                    // A new text every round: kept prepared, each would stay in
                    // the connection's statement cache (a hundred per
                    // connection, each as large as its list) for nothing.
                    .persistent(false)
                    .bind(now)
            })
            .await
            .map_err(Error::query("cannot mark outbox rows published"))?;
        Ok(())
    }

    /// One round: fetch, publish, mark. Returns (rows fetched, rows published).
    pub async fn publish_pending_once(&self) -> Result<(usize, usize)> {
        let rows = self.fetch_pending().await?;
        if rows.is_empty() {
            return Ok((0, 0));
        }
        let acked = self.publish(&rows).await;
        self.mark_published(&acked).await?;
        Ok((rows.len(), acked.len()))
    }

    /// SQLite's rounds as the active relay: like [`Relay::drain`], marking
    /// the rows published through `unmarked` (see the [module docs](self)).
    async fn drain_unmarked(
        &self,
        unmarked: &mut Unmarked,
        until: tokio::time::Instant,
        lost: &CancellationToken,
    ) -> Result<bool> {
        let batch = usize::try_from(self.config.batch_size).unwrap_or(usize::MAX);
        let mut more = false;
        loop {
            // Before reading: rows that are due get marked even when the
            // read fails.
            if unmarked.due(self.config.mark_delay, batch) {
                self.mark_unmarked(unmarked).await?;
            }
            let rows = self.fetch_after(unmarked.through).await?;
            if rows.is_empty() {
                break;
            }
            let acked = self.publish(&rows).await;
            let published = acked.len();
            if !unmarked.published(&rows, acked) {
                // A publish failed and rows behind it were published: mark
                // those now, or the next round reads them again with the
                // failed one.
                self.mark_unmarked(unmarked).await?;
                if published == 0 {
                    break;
                }
            }
            if rows.len() < batch {
                break;
            }
            if tokio::time::Instant::now() >= until || lost.is_cancelled() {
                more = true;
                break;
            }
        }
        if unmarked.due(self.config.mark_delay, batch) {
            self.mark_unmarked(unmarked).await?;
        }
        Ok(more)
    }

    /// Marks the rows of `unmarked` published.
    async fn mark_unmarked(&self, unmarked: &mut Unmarked) -> Result<()> {
        self.mark_published(&unmarked.seqs).await?;
        unmarked.seqs.clear();
        unmarked.since = None;
        Ok(())
    }

    /// One pass of the active relay: the rounds [`Relay::drain`] would
    /// run, on SQLite marking through `unmarked`, but none begun after
    /// `until`, and none after the lock is `lost`; whether it stopped for
    /// either with rows left. A backlog takes several passes, and the lock
    /// is checked between them: a lock found lost (a SQLite lease that
    /// could not be renewed in time, a PostgreSQL session ended) ends the
    /// term.
    async fn pass(
        &self,
        unmarked: &mut Unmarked,
        until: tokio::time::Instant,
        lost: &CancellationToken,
    ) -> Result<bool> {
        match self.store.backend() {
            Backend::Sqlite => self.drain_unmarked(unmarked, until, lost).await,
            Backend::Postgres => Ok(self.drain_until(Some((until, lost))).await?.1),
        }
    }

    /// Publishes until the outbox is empty or a round publishes nothing.
    pub async fn drain(&self) -> Result<usize> {
        let (total, _) = self.drain_until(None).await?;
        Ok(total)
    }

    /// [`Relay::drain`], beginning no round after the instant of `stop` or
    /// once its lock is lost; also whether it stopped for that with rows
    /// left.
    async fn drain_until(
        &self,
        stop: Option<(tokio::time::Instant, &CancellationToken)>,
    ) -> Result<(usize, bool)> {
        let mut total = 0;
        loop {
            let (fetched, published) = self.publish_pending_once().await?;
            total += published;
            if published == 0
                || fetched < usize::try_from(self.config.batch_size).unwrap_or(usize::MAX)
            {
                return Ok((total, false));
            }
            if stop.is_some_and(|(until, lost)| {
                tokio::time::Instant::now() >= until || lost.is_cancelled()
            }) {
                return Ok((total, true));
            }
        }
    }

    /// Publishes every row committed before this call, then stops; for a
    /// process that wrote to a service's outbox without running its worker
    /// (`skein replay --into`).
    ///
    /// The relay takes its lock like any other: when the worker's own relay
    /// is active this one stands by while that one publishes (at once: on
    /// PostgreSQL the commits notified it, on SQLite this relay wakes it as
    /// it stands by), and takes over when there is none (after a crashed
    /// holder's lease runs out, on SQLite). Returns how many of
    /// those rows are still unpublished when `timeout` passes (0: all
    /// published); they stay committed and wait for the next relay.
    pub async fn publish_committed(&self, timeout: Duration) -> Result<i64> {
        let through: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM skein_outbox")
                .fetch_one(self.store.pool())
                .await
                .map_err(Error::query("cannot read the outbox"))?;
        let left = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM skein_outbox WHERE published_at IS NULL AND seq <= $1",
            )
            .bind(through)
            .fetch_one(self.store.pool())
            .await
            .map_err(Error::query("cannot count the outbox backlog"))
        };
        let mut remaining = left().await?;
        if remaining == 0 {
            return Ok(0);
        }
        let stop = CancellationToken::new();
        let running = self.clone().spawn(stop.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        while remaining > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            remaining = left().await?;
        }
        stop.cancel();
        let _ = running.await;
        // A relay that held the lock publishes once more as it stops.
        left().await
    }

    /// Deletes published rows and inbox records past their retention, all
    /// of them, [`CLEANUP_BATCH`] rows of each table at a time. The active
    /// relay itself cleans up one batch per round (see
    /// [`RelayConfig::cleanup_interval`]).
    pub async fn cleanup(&self) -> Result<(u64, u64)> {
        let (mut outbox, mut inbox) = (0, 0);
        loop {
            let (o, i, more) = self.cleanup_batch().await?;
            outbox += o;
            inbox += i;
            if !more {
                return Ok((outbox, inbox));
            }
            tokio::task::yield_now().await;
        }
    }

    /// Deletes up to [`CLEANUP_BATCH`] published rows and as many inbox
    /// records past their retention, each table in a write of its own (the
    /// process's other writes take their turn in between): the rows
    /// deleted from each and whether a table may hold more.
    async fn cleanup_batch(&self) -> Result<(u64, u64, bool)> {
        let now = crate::now_micros();
        let micros = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let outbox = self
            .store
            .write_permit()
            .await?
            .execute(|| {
                sqlx::query(
                    "DELETE FROM skein_outbox WHERE seq IN (SELECT seq FROM skein_outbox \
                     WHERE published_at IS NOT NULL AND published_at < $1 \
                     ORDER BY published_at LIMIT $2)",
                )
                .bind(now.saturating_sub(micros(self.config.retention)))
                .bind(CLEANUP_BATCH)
            })
            .await
            .map_err(Error::query("cannot clean up the outbox"))?
            .rows_affected();
        let forget_before = now.saturating_sub(micros(self.config.inbox_retention));
        // The batch to delete ends at the newest `processed_at` among the
        // oldest records past retention; every record processed after it is
        // kept.
        let newest: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(processed_at) FROM (SELECT processed_at FROM skein_inbox \
             WHERE processed_at < $1 ORDER BY processed_at LIMIT $2) AS batch",
        )
        .bind(forget_before)
        .bind(CLEANUP_BATCH)
        .fetch_one(self.store.pool())
        .await
        .map_err(Error::query("cannot read the inbox"))?;
        let inbox = match newest {
            None => 0,
            Some(newest) => {
                let forgotten_before = newest.saturating_add(1);
                // Recorded before anything is deleted (a crash in between
                // leaves it ahead of what is gone, which only makes an audit
                // check less); it never moves back.
                self.store
                    .write_permit()
                    .await?
                    .execute(|| {
                        sqlx::query(
                            "INSERT INTO skein_inbox_horizon (name, forgotten_before) VALUES ('inbox', $1) \
                             ON CONFLICT (name) DO UPDATE SET forgotten_before = excluded.forgotten_before \
                             WHERE skein_inbox_horizon.forgotten_before < excluded.forgotten_before",
                        )
                        .bind(forgotten_before)
                    })
                    .await
                    .map_err(Error::query("cannot record the inbox's horizon"))?;
                self.store
                    .write_permit()
                    .await?
                    .execute(|| {
                        sqlx::query(
                            "DELETE FROM skein_inbox WHERE (handler, message_id) IN \
                             (SELECT handler, message_id FROM skein_inbox WHERE processed_at < $1 \
                             ORDER BY processed_at LIMIT $2)",
                        )
                        .bind(forgotten_before)
                        .bind(CLEANUP_BATCH)
                    })
                    .await
                    .map_err(Error::query("cannot clean up the inbox"))?
                    .rows_affected()
            }
        };
        let full = |deleted: u64| i64::try_from(deleted).is_ok_and(|d| d >= CLEANUP_BATCH);
        Ok((outbox, inbox, full(outbox) || full(inbox)))
    }

    async fn run(self, shutdown: CancellationToken) {
        let url = self.store.display_url();
        while !shutdown.is_cancelled() {
            let lock = match self.acquire().await {
                Ok(Some(lock)) => lock,
                Ok(None) => {
                    tracing::debug!(db = %url, "another relay is active; standing by");
                    if self.stand_by(&shutdown).await {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(db = %url, error = %e, "relay cannot take its lock, retrying");
                    if sleep_or_cancel(&shutdown, Duration::from_secs(1)).await {
                        break;
                    }
                    continue;
                }
            };
            tracing::info!(db = %url, "relay active");
            if let Err(e) = self.serve(lock, &shutdown).await {
                tracing::warn!(db = %url, error = %e, "relay lost its lock or database, starting over");
                if sleep_or_cancel(&shutdown, Duration::from_millis(500)).await {
                    break;
                }
            }
        }
        self.release().await;
    }

    /// Until the next attempt to take the lock (half a lease), or until
    /// `shutdown` (then returns `true`): on SQLite, wakes the active relay
    /// whenever this process commits, and once at the start for what it
    /// committed before. Returns early, to try the lock, when no relay
    /// holds the lease.
    async fn stand_by(&self, shutdown: &CancellationToken) -> bool {
        if self.store.backend() == Backend::Postgres {
            // NOTIFY reaches the active relay from every process.
            return sleep_or_cancel(shutdown, self.config.lease / 2).await;
        }
        let retry = tokio::time::Instant::now() + self.config.lease / 2;
        let client = self.publisher.client();
        let mut holder = None;
        let mut read_at = None::<tokio::time::Instant>;
        loop {
            // The holder, read again at most every HOLDER_MAX_AGE: another
            // relay may have taken over since.
            if read_at.is_none_or(|at| at.elapsed() >= HOLDER_MAX_AGE) {
                read_at = Some(tokio::time::Instant::now());
                holder = match self.holder().await {
                    Ok(Some(owner)) => Some(owner),
                    // Nobody holds it: try to take it now.
                    Ok(None) => return false,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the relay lease; not waking the active relay");
                        None
                    }
                };
            }
            if let Some(holder) = &holder {
                wake(&client, holder).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                _ = tokio::time::sleep_until(retry) => return false,
                _ = self.store.committed() => {}
            }
        }
    }

    /// The owner of the SQLite relay lease, if it has not run out.
    async fn holder(&self) -> Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT owner FROM skein_relay_lease WHERE name = 'outbox' AND expires_at >= $1",
        )
        .bind(crate::now_micros())
        .fetch_optional(self.store.pool())
        .await
        .map_err(Error::query("cannot read the relay lease"))
    }

    /// Holds the lock and relays until shutdown or until the lock is lost.
    async fn serve(&self, mut lock: Lock, shutdown: &CancellationToken) -> Result<()> {
        let mut wakeups = match self.store.backend() {
            Backend::Postgres => match self.listener().await {
                Ok(mut l) => match l.listen("skein_outbox").await {
                    Ok(()) => Wakeups::Notify {
                        listener: l,
                        retry_at: None,
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot LISTEN; falling back to polling");
                        Wakeups::None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN; falling back to polling");
                    Wakeups::None
                }
            },
            Backend::Sqlite => match self
                .publisher
                .client()
                .subscribe(wake_subject(&self.owner))
                .await
            {
                Ok(subscriber) => {
                    // The server knows the subscription before the first
                    // pass: a wake-up sent after that pass read is not lost.
                    if let Err(e) = self.publisher.client().flush().await {
                        tracing::debug!(error = %e, "cannot flush the wake-up subscription");
                    }
                    Wakeups::Nats(subscriber)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to wake-ups from other processes; their rows wait for the poll");
                    Wakeups::None
                }
            },
        };
        let mut unmarked = Unmarked::default();
        let result = self
            .serve_rounds(&mut lock, &mut wakeups, &mut unmarked, shutdown)
            .await;
        // Whatever ended the term (shutdown, a lost lock or database), rows
        // published are published: mark them if the database lets us, so
        // the next relay does not send them again.
        if !unmarked.seqs.is_empty() {
            if let Err(e) = self.mark_unmarked(&mut unmarked).await {
                tracing::debug!(error = %e, "cannot mark the last rows published; the next relay publishes them again");
            }
        }
        // No renewal after this: `run` gives the lease back next.
        lock.end().await;
        result
    }

    async fn serve_rounds(
        &self,
        lock: &mut Lock,
        wakeups: &mut Wakeups,
        unmarked: &mut Unmarked,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        // The first cleanup right after the first round: a relay restarted
        // more often than the interval still cleans up.
        let mut next_cleanup = self
            .config
            .cleanup_interval
            .map(|_| tokio::time::Instant::now());
        let mut last_report = tokio::time::Instant::now() - Duration::from_secs(1);
        let mut failures: u32 = 0;
        loop {
            // Before every pass: a relay that lost its lock publishes no more.
            lock.check().await?;
            let until = tokio::time::Instant::now() + self.config.lease / 3;
            let mut more = false;
            match self.pass(unmarked, until, &lock.lost).await {
                Ok(left) => {
                    more = left;
                    failures = 0;
                    // At most once a second: rounds can come at commit rate.
                    if let Some(stats) = self
                        .stats
                        .as_ref()
                        .filter(|_| last_report.elapsed() >= Duration::from_secs(1))
                    {
                        last_report = tokio::time::Instant::now();
                        if let Ok(backlog) = self.store.outbox_backlog().await {
                            stats.set_gauge("outbox_backlog", backlog);
                        }
                        stats.set_gauge(
                            "outbox_duplicates",
                            i64::try_from(self.duplicates()).unwrap_or(i64::MAX),
                        );
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "relay round failed");
                }
            }
            if next_cleanup.is_some_and(|due| tokio::time::Instant::now() >= due) {
                next_cleanup = self
                    .config
                    .cleanup_interval
                    .and_then(|every| tokio::time::Instant::now().checked_add(every));
                match self.cleanup_batch().await {
                    Ok((o, i, more)) => {
                        if o + i > 0 {
                            tracing::debug!(outbox = o, inbox = i, more, "cleaned up old rows");
                        }
                        if more {
                            // The next batch after the next round.
                            next_cleanup = Some(tokio::time::Instant::now());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cleanup failed"),
                }
            }
            let wait = if more {
                // Rows are left: on with them once the lock is checked.
                Duration::ZERO
            } else if failures > 0 {
                Duration::from_millis(100 * u64::from(failures.min(20)))
            } else {
                // Wake for the marks when they are due, if nothing comes
                // before (not after a failure: a mark that failed is due at
                // once and would be tried again without a pause).
                let poll = self.config.poll_interval;
                unmarked
                    .due_in(self.config.mark_delay)
                    .map_or(poll, |due| poll.min(due))
            };
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Publish what is committed before leaving (for a
                    // third of a lease at most: the next relay takes the
                    // rest).
                    let until = tokio::time::Instant::now() + self.config.lease / 3;
                    let _ = self.pass(unmarked, until, &lock.lost).await;
                    return Ok(());
                }
                _ = tokio::time::sleep(wait) => {}
                // After a failure the backoff runs out first: commits and
                // wake-ups would run the failing round again at their rate
                // (on PostgreSQL republishing every row it could not mark).
                _ = self.store.committed(), if failures == 0 => {}
                _ = wakeups.next(), if failures == 0 => {}
                // Lost while waiting: the term ends at the top of the loop.
                _ = lock.lost() => {}
            }
        }
    }

    async fn acquire(&self) -> Result<Option<Lock>> {
        match self.store.backend() {
            Backend::Postgres => {
                let options: PgConnectOptions = self
                    .store
                    .url()
                    .parse()
                    .map_err(Error::query("invalid PostgreSQL URL"))?;
                // Named, so `pg_stat_activity` shows who holds the lock.
                let mut conn = options
                    .application_name(&session_name("relay", &self.owner))
                    .connect()
                    .await
                    .map_err(Error::query("cannot open the relay lock connection"))?;
                self.end_with_silence(&mut conn).await;
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(RELAY_LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(Error::query("cannot take the relay lock"))?;
                if got {
                    Ok(Some(Lock::keep(ping_session(conn, self.config.lease))))
                } else {
                    let _ = conn.close().await;
                    Ok(None)
                }
            }
            Backend::Sqlite => {
                let attempt = tokio::time::Instant::now();
                Ok(self
                    .take_lease()
                    .await?
                    .then(|| Lock::keep(renew_lease(self.clone(), attempt))))
            }
        }
    }

    /// Takes or renews the SQLite relay lease for a lease from now; whether
    /// this relay holds it (not when another relay's has not run out).
    async fn take_lease(&self) -> Result<bool> {
        let mut permit = self.store.write_permit().await?;
        let lease = i64::try_from(self.config.lease.as_micros()).unwrap_or(i64::MAX / 2);
        let taken = permit
            .execute(|| {
                // The time of this attempt: one that waited for another
                // process's lock must not write a lease that ran out while
                // it waited.
                let now = crate::now_micros();
                let until = now.saturating_add(lease);
                sqlx::query(
                    "INSERT INTO skein_relay_lease (name, owner, expires_at) VALUES ('outbox', $1, $2) \
                     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at \
                     WHERE skein_relay_lease.owner = excluded.owner OR skein_relay_lease.expires_at < $3",
                )
                .bind(&self.owner)
                .bind(until)
                .bind(now)
            })
            .await
            .map_err(Error::query("cannot take the relay lease"))?
            .rows_affected();
        Ok(taken == 1)
    }

    /// The connection that hears of commits in other processes (`LISTEN`),
    /// named `skein relay listen <owner>` in `pg_stat_activity`.
    async fn listener(&self) -> std::result::Result<PgListener, sqlx::Error> {
        let options: PgConnectOptions = self.store.url().parse()?;
        let name = session_name("relay listen", &self.owner);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            // It only reconnects the listener: no timeouts.
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options.application_name(&name));
        PgListener::connect_with(&pool).await
    }

    /// Asks the server to end the lock session, and so free the lock, once
    /// this relay stops talking on it: a relay pings it every third of a
    /// lease, and the server ends it after three leases without a word
    /// (`idle_session_timeout`, PostgreSQL 14 and later) or when TCP
    /// keepalives find its peer gone. Without that, a relay whose host
    /// died without closing the connection (power lost, a partition, a
    /// paused machine) would keep the lock, and every copy's outbox
    /// waiting, until the server's own keepalives notice: two hours by
    /// default.
    ///
    /// Best effort: a server (or a proxy) that refuses these settings gets
    /// a warning, and the lock is taken without them.
    async fn end_with_silence(&self, conn: &mut PgConnection) {
        let lease = self.config.lease;
        let idle = (lease * 3).as_millis().max(1);
        let keepalive_idle = lease.as_secs().max(1);
        let keepalive_interval = (lease / 3).as_secs().max(1);
        if let Err(e) = conn
            .execute(
                format!(
                    "SET tcp_keepalives_idle = {keepalive_idle}; \
                     SET tcp_keepalives_interval = {keepalive_interval}; \
                     SET tcp_keepalives_count = 3"
                )
                .as_str(),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot set TCP keepalives on the relay lock session");
        }
        match conn
            .execute(format!("SET idle_session_timeout = {idle}").as_str())
            .await
        {
            Ok(_) => {}
            // Before PostgreSQL 14: the keepalives only (on TCP).
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42704") => {
                tracing::debug!(error = %e, "no idle_session_timeout on this server; a silent relay keeps the lock until TCP keepalives end its session");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot set idle_session_timeout on the relay lock session; a silent relay keeps the lock until TCP keepalives end its session");
            }
        }
    }

    async fn release(&self) {
        if self.store.backend() == Backend::Sqlite {
            if let Ok(mut permit) = self.store.write_permit().await {
                let _ = permit
                    .execute(|| {
                        sqlx::query(
                            "DELETE FROM skein_relay_lease WHERE name = 'outbox' AND owner = $1",
                        )
                        .bind(&self.owner)
                    })
                    .await;
            }
        }
        // The PostgreSQL lock goes with its connection.
    }
}

/// A backlog published round after round is marked at least every this
/// many batches, however short the rounds.
const MAX_UNMARKED_BATCHES: usize = 8;

/// On SQLite, how far the active relay has published in its term, and the
/// rows it published and has not yet marked.
#[derive(Debug, Default)]
struct Unmarked {
    /// Every row up to this `seq` is published (marked or in `seqs`).
    through: i64,
    /// Published, not yet marked.
    seqs: Vec<i64>,
    /// When the first of `seqs` was published.
    since: Option<tokio::time::Instant>,
}

impl Unmarked {
    /// Takes the outcome of a round: `rows` were read in `seq` order and
    /// `acked` (in the same order) acknowledged. Returns whether every
    /// row was; `through` moves only over rows all acknowledged, so a failed
    /// one is read again.
    fn published(&mut self, rows: &[PendingRow], acked: Vec<i64>) -> bool {
        let all = acked.len() == rows.len();
        let through = rows
            .iter()
            .zip(&acked)
            .take_while(|(row, seq)| row.seq == **seq)
            .last()
            .map(|(row, _)| row.seq);
        if let Some(through) = through {
            self.through = through;
        }
        if !acked.is_empty() && self.since.is_none() {
            self.since = Some(tokio::time::Instant::now());
        }
        self.seqs.extend(acked);
        all
    }

    /// How long until the rows are to be marked, `mark_delay` after the
    /// first; `None` when there are none.
    fn due_in(&self, mark_delay: Duration) -> Option<Duration> {
        self.since
            .map(|since| mark_delay.saturating_sub(since.elapsed()))
    }

    /// Whether the rows are to be marked now: `mark_delay` has passed
    /// since the first, or a backlog published without a pause has
    /// gathered [`MAX_UNMARKED_BATCHES`] batches of `batch` rows.
    fn due(&self, mark_delay: Duration, batch: usize) -> bool {
        self.due_in(mark_delay) == Some(Duration::ZERO)
            || self.seqs.len() >= batch.saturating_mul(MAX_UNMARKED_BATCHES)
    }
}

/// `skein <role> <owner>`, cut to the 63 bytes PostgreSQL keeps of an
/// `application_name`, at a character boundary (an owner may be any subject
/// token, not only ASCII).
fn session_name(role: &str, owner: &str) -> String {
    let mut name = format!("skein {role} {owner}");
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

/// Advisory lock key of the relay ("skein" outbox).
const RELAY_LOCK_KEY: i64 = 0x736b_6569_6e00_0001;

/// The active relay's lock, kept by a task of its own whatever the relay
/// is doing (a long cleanup, a round waiting for NATS): on PostgreSQL a
/// session holding an advisory lock, pinged (the server ends a session
/// silent for three leases); on SQLite a lease row, renewed (a standby
/// takes a lease that ran out). Either way every third of a lease. Ended
/// or dropped, the task stops; a dropped PostgreSQL session frees the lock.
struct Lock {
    /// Ends, with why, once the lock is lost.
    keeper: Option<JoinHandle<Error>>,
    /// Cancelled when the keeper ends.
    lost: CancellationToken,
}

impl Lock {
    fn keep<F>(keeper: F) -> Self
    where
        F: std::future::Future<Output = Error> + Send + 'static,
    {
        let lost = CancellationToken::new();
        let ended = lost.clone().drop_guard();
        let keeper = tokio::spawn(async move {
            let _ended = ended;
            keeper.await
        });
        Self {
            keeper: Some(keeper),
            lost,
        }
    }

    /// Why the lock was lost, once it was (the keeper is ending then, if
    /// not yet ended).
    async fn check(&mut self) -> Result<()> {
        if !self.lost.is_cancelled() {
            return Ok(());
        }
        match self.keeper.take() {
            Some(keeper) => Err(keeper.await.unwrap_or(Error::LockLost)),
            None => Err(Error::LockLost),
        }
    }

    /// Completes once the lock is lost.
    async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Stops keeping the lock, and returns once the keeper has stopped: a
    /// lease renewal in flight must not land after the lease is given back.
    async fn end(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
            let _ = keeper.await;
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(keeper) = &self.keeper {
            keeper.abort();
        }
    }
}

/// Pings the PostgreSQL lock's session every third of a lease; ends when
/// it is lost, or unanswered within a lease (the server may have ended it
/// already).
async fn ping_session(mut conn: PgConnection, lease: Duration) -> Error {
    let mut ticks = tokio::time::interval(lease / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match tokio::time::timeout(lease, conn.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Error::Query {
                    context: "relay lock connection lost",
                    source: e,
                }
            }
            Err(_) => return Error::LockUnanswered(lease),
        }
    }
}

/// Renews `relay`'s SQLite lease every third of a lease, the first time
/// a third of a lease after `taken` (when the attempt that took it began);
/// a renewal that fails is tried again after [`RENEW_RETRY`]. Ends when
/// another relay holds the lease, or when it was not renewed within two
/// thirds of a lease (the database's write lock held by another process
/// all that time): the term ends a third of a lease before a standby may
/// take the lease over.
async fn renew_lease(relay: Relay, taken: tokio::time::Instant) -> Error {
    let lease = relay.config.lease;
    let give_up = lease - lease / 3;
    // When the lease written last began: it runs a lease from then.
    let mut renewed = taken;
    let mut next = taken + lease / 3;
    loop {
        tokio::time::sleep_until(next).await;
        let attempt = tokio::time::Instant::now();
        let left = give_up.saturating_sub(renewed.elapsed());
        match tokio::time::timeout(left, relay.take_lease()).await {
            Ok(Ok(true)) => {
                renewed = attempt;
                next = attempt + lease / 3;
            }
            Ok(Ok(false)) => return Error::LockLost,
            Ok(Err(e)) if renewed.elapsed() >= give_up => return e,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot renew the relay lease; trying again");
                next = tokio::time::Instant::now() + RENEW_RETRY;
            }
            Err(_) => return Error::LockUnanswered(give_up),
        }
    }
}

/// How soon a SQLite lease renewal that failed is tried again.
const RENEW_RETRY: Duration = Duration::from_millis(100);

/// How the active relay hears of commits in other processes.
enum Wakeups {
    /// PostgreSQL: `LISTEN skein_outbox`; after a reconnection failed, not
    /// before `retry_at`.
    Notify {
        listener: PgListener,
        retry_at: Option<tokio::time::Instant>,
    },
    /// SQLite: `skein.outbox.wake.<owner>`, sent by the standby relays.
    Nats(async_nats::Subscriber),
    /// Neither could be set up: the poll only.
    None,
}

impl Wakeups {
    /// Waits for the next wake-up.
    async fn next(&mut self) {
        match self {
            Wakeups::Notify { listener, retry_at } => {
                // Kept across calls: this future is dropped whenever a
                // commit or the poll comes first.
                if let Some(at) = *retry_at {
                    tokio::time::sleep_until(at).await;
                    *retry_at = None;
                }
                match listener.try_recv().await {
                    // A notification; or the connection was lost and is
                    // back, listening again: the pass that follows reads
                    // what was committed while nobody listened.
                    Ok(_) => {}
                    // It cannot reconnect (the server full or away). Not
                    // again for a second: each failure runs a pass, and a
                    // reconnection that keeps failing while passes succeed
                    // would spin, opening a connection per pass. The poll
                    // covers the pause.
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection lost; reconnecting in a second");
                        *retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            Wakeups::Nats(subscriber) => {
                if subscriber.next().await.is_none() {
                    // The subscription ended (the connection closed for
                    // good): poll from now on.
                    *self = Wakeups::None;
                    return;
                }
                // Wake-ups that came meanwhile are answered by the same pass.
                while let Some(Some(_)) = subscriber.next().now_or_never() {}
            }
            Wakeups::None => std::future::pending().await,
        }
    }
}

/// How long a standby relay trusts the lease holder it read before it reads
/// it again to wake it.
const HOLDER_MAX_AGE: Duration = Duration::from_secs(1);

/// Wakes the SQLite relay holding the lease as `holder`, if NATS is
/// reachable now: never waits for a reconnection (the holder polls).
async fn wake(client: &async_nats::Client, holder: &str) {
    let subject = wake_subject(holder);
    if !send_if_connected(client, subject, Bytes::new(), Duration::from_millis(100)).await {
        tracing::debug!("cannot wake the active relay; it polls");
    }
}

/// Where the SQLite relay holding the lease as `owner` is woken.
fn wake_subject(owner: &str) -> String {
    format!("skein.outbox.wake.{owner}")
}

async fn sleep_or_cancel(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// An outbox row as the relay publishes it.
pub(crate) fn decode_row(row: &sqlx::any::AnyRow) -> Result<PendingRow> {
    let read = || Error::query("cannot read an outbox row");
    let seq: i64 = row.try_get("seq").map_err(read())?;
    let id: String = row.try_get("id").map_err(read())?;
    let subject: String = row.try_get("subject").map_err(read())?;
    let headers: String = row.try_get("headers").map_err(read())?;
    let payload: Vec<u8> = row.try_get("payload").map_err(read())?;
    let pairs: Vec<(String, String)> =
        serde_json::from_str(&headers).map_err(|e| Error::CorruptRow {
            id: id.clone(),
            reason: format!("headers are not a JSON list of pairs: {e}"),
        })?;
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(name.as_str(), value.as_str());
    }
    Ok(PendingRow {
        seq,
        id,
        message: Outgoing {
            subject,
            headers: map,
            payload: payload.into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_fit_postgres_and_cut_at_a_character() {
        assert_eq!(session_name("relay", "orders.1"), "skein relay orders.1");
        // "skein relay " is 12 bytes, each "é" 2: byte 63 falls inside one.
        let long = session_name("relay", &"é".repeat(40));
        assert!(long.starts_with("skein relay é") && long.ends_with('é'));
        assert_eq!(long.len(), 62, "{long}");
    }
}
