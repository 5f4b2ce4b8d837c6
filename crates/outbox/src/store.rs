//! The service database: SQLite or PostgreSQL, chosen by URL.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use sqlx::any::{AnyArguments, AnyConnectOptions, AnyPoolOptions, AnyQueryResult, AnyRow};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Any, AnyConnection, AnyPool, ConnectOptions, Connection, Executor};
use tokio::sync::{Mutex, Notify, OwnedMappedMutexGuard, OwnedMutexGuard};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::migrate::{self, Migration};
use crate::tx::Tx;

/// The storage backend of a [`Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite: one file per service, WAL mode. The embedded default.
    Sqlite,
    /// PostgreSQL: one database per service, created if missing.
    Postgres,
}

impl Backend {
    /// The backend a URL names.
    pub fn of_url(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(Error::UnsupportedUrl(redact(url)))
        }
    }
}

/// [`StoreConfig::checkpoint_pages`] by default: a log of about 40 MB per
/// database. Against SQLite's 1,000 pages, a saga costs 10 % less
/// CPU and writes 10 % fewer bytes (runs alternated, `skein load`, one copy
/// of every worker).
pub const DEFAULT_CHECKPOINT_PAGES: u32 = 10_000;

/// How to open a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite:<path>` or `postgres://user@host/db`.
    pub url: String,
    /// Pool size. SQLite serialises writers anyway; a few connections let
    /// readers run beside the writer.
    pub max_connections: u32,
    /// How long a SQLite writer waits for the write lock held by another
    /// process (trying every millisecond or two), and a reader for a lock
    /// it needs, before it fails with "database is locked".
    pub busy_timeout: Duration,
    /// SQLite: the write-ahead log's length, in pages (4 KiB each), at which
    /// a commit copies the log into the database file (`PRAGMA
    /// wal_autocheckpoint`; 0 never does). A copy writes each page changed
    /// since the last one once, however often it changed, and syncs the
    /// file: a longer log makes fewer and cheaper copies of a busy
    /// outbox's pages, and costs its length in disk space (the log file
    /// keeps its size once grown) and in recovery time after a crash.
    pub checkpoint_pages: u32,
    /// SQLite: the page cache of each connection, in KiB (`PRAGMA
    /// cache_size`); `None` keeps SQLite's default of about 2 MB. The
    /// writer's cache fills up under load and stays allocated, so a
    /// process holding several databases pays it once per database; a
    /// smaller one costs a read from the operating system's page cache on
    /// a miss.
    pub sqlite_cache_kib: Option<u32>,
    /// Whether opening the store and [`Store::migrate`] apply missing
    /// migrations (the default). Tools that must change no schema (`skein
    /// audit`, `skein replay --into`) set it to `false`: then they check instead that every
    /// migration is applied, and refuse a database whose schema is behind
    /// or ahead of this build.
    pub migrate: bool,
}

impl StoreConfig {
    /// Defaults for `url`: 4 connections on SQLite, 10 on PostgreSQL.
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        let max_connections = if url.starts_with("sqlite:") { 4 } else { 10 };
        Self {
            url,
            max_connections,
            busy_timeout: Duration::from_secs(10),
            checkpoint_pages: DEFAULT_CHECKPOINT_PAGES,
            sqlite_cache_kib: None,
            migrate: true,
        }
    }
}

/// A service's database with the outbox and inbox tables.
///
/// Cheap to clone; clones share the pool and the relay wake-up.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: AnyPool,
    backend: Backend,
    url: String,
    committed: Notify,
    /// On SQLite, the one connection this process writes with, and the
    /// turn to use it (see `Store::write_permit`).
    writer: Option<Arc<Writer>>,
    /// `StoreConfig::migrate`.
    migrates: bool,
}

/// This process's SQLite writer: one connection, outside the pool, used by
/// one task at a time.
///
/// Outside the pool because a pool costs a write three more hand-offs to
/// the connection's thread: sqlx pings every connection it takes back, in a
/// task of its own, and its `BEGIN` and `COMMIT` wait for the caller to
/// acknowledge the answer. Here a transaction is `BEGIN IMMEDIATE`, its
/// statements and `COMMIT`, one hand-off each.
///
/// One connection for every write also keeps its page cache warm: in WAL
/// mode a connection drops its whole cache when it finds the database
/// changed by another connection.
#[derive(Debug)]
struct Writer {
    /// The connection; its lock is the turn to write.
    state: Arc<Mutex<WriterState>>,
    /// Set while a transaction may be open on the connection (from before
    /// `BEGIN` until `COMMIT` or `ROLLBACK` succeeds): whoever takes the
    /// turn next rolls it back first, and opens a new connection when that
    /// fails for any reason but "no transaction is active" (its thread is
    /// gone, I/O). Only changed with the turn held.
    in_tx: AtomicBool,
    options: AnyConnectOptions,
    busy_timeout: Duration,
    checkpoint_pages: u32,
    cache_kib: Option<u32>,
}

#[derive(Debug)]
struct WriterState {
    /// `None` once lost (until the next turn reopens it) or closed.
    conn: Option<AnyConnection>,
    closed: bool,
}

impl Writer {
    /// Waits for the turn, and makes the connection ready: reopened if it
    /// was lost, a transaction left open rolled back.
    async fn turn(self: &Arc<Self>) -> Result<SqliteTurn> {
        let mut state = self.state.clone().lock_owned().await;
        if self.in_tx.swap(false, Ordering::Relaxed) {
            if let Some(conn) = state.conn.as_mut() {
                match sqlx::query("ROLLBACK").execute(conn).await {
                    Ok(_) => {}
                    Err(sqlx::Error::Database(e)) if e.message().contains("no transaction") => {}
                    // Anything else leaves the connection in doubt: a new
                    // one, and dropping this one rolls back what it holds.
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot roll back a transaction left open; reopening the writer connection");
                        state.conn = None;
                    }
                }
            }
        }
        if state.conn.is_none() && !state.closed {
            state.conn = Some(
                open_sqlite_writer(&self.options, self.checkpoint_pages, self.cache_kib).await?,
            );
        }
        let conn =
            OwnedMutexGuard::try_map(state, |s| s.conn.as_mut()).map_err(|_| Error::Closed)?;
        Ok(SqliteTurn {
            conn,
            writer: self.clone(),
        })
    }
}

/// Evaluates `$attempt`, a statement awaited on the connection of `$turn`
/// (a [`SqliteTurn`]), again while another process holds SQLite's write
/// lock, up to the busy timeout. Only for statements [`busy_again`] says
/// may be sent again.
macro_rules! while_busy {
    ($turn:expr, $attempt:expr) => {{
        let deadline = $turn.lock_deadline();
        loop {
            match $attempt {
                Err(e) if $crate::store::busy_again(&e, deadline).await => continue,
                done => break done,
            }
        }
    }};
}
pub(crate) use while_busy;

/// Opens the SQLite writer connection, without a busy handler (its
/// statements wait for another process's write lock in [`busy_again`]) and
/// checkpointing at `checkpoint_pages` (a commit checkpoints on the
/// connection that made it, and only the writer commits under load).
async fn open_sqlite_writer(
    options: &AnyConnectOptions,
    checkpoint_pages: u32,
    cache_kib: Option<u32>,
) -> Result<AnyConnection> {
    let mut conn = AnyConnection::connect_with(options)
        .await
        .map_err(Error::query("cannot open the SQLite writer connection"))?;
    set_up_sqlite(&mut conn, Duration::ZERO, cache_kib)
        .await
        .map_err(Error::query("cannot set up the SQLite writer connection"))?;
    conn.execute(format!("PRAGMA wal_autocheckpoint = {checkpoint_pages}").as_str())
        .await
        .map_err(Error::query("cannot set up the SQLite writer connection"))?;
    Ok(conn)
}

/// This process's turn to write on SQLite, with the connection to write on.
/// A transaction begun on it and not ended when the turn is dropped is
/// rolled back before anyone writes again.
#[derive(Debug)]
pub(crate) struct SqliteTurn {
    conn: OwnedMappedMutexGuard<WriterState, AnyConnection>,
    writer: Arc<Writer>,
}

impl SqliteTurn {
    pub(crate) fn conn(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }

    pub(crate) fn conn_ref(&self) -> &AnyConnection {
        &self.conn
    }

    /// `BEGIN IMMEDIATE`: takes SQLite's write lock at once, so two writers
    /// wait for each other instead of failing on a lock upgrade.
    pub(crate) async fn begin(&mut self) -> std::result::Result<(), sqlx::Error> {
        self.beginning();
        while_busy!(self, self.run("BEGIN IMMEDIATE").await)
    }

    /// Until when a statement that finds SQLite's write lock held by
    /// another process is tried again (the store's busy timeout from now).
    /// The writer connection has no busy handler of its own: SQLite's
    /// sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and 100 ms between
    /// attempts, so a copy that found the lock taken once sleeps on while
    /// another copy takes and releases it many times. [`busy_again`] tries
    /// again after a millisecond (a tick of tokio's timer: one to two).
    pub(crate) fn lock_deadline(&self) -> Instant {
        Instant::now() + self.writer.busy_timeout
    }

    /// To be called before a `BEGIN` is sent (alone or with other
    /// statements): a begin cancelled midway may still run on the
    /// connection, and must then be rolled back.
    pub(crate) fn beginning(&mut self) {
        self.writer.in_tx.store(true, Ordering::Relaxed);
    }

    /// To be called once a `COMMIT` or `ROLLBACK` sent with other
    /// statements succeeded.
    pub(crate) fn ended(&mut self) {
        self.writer.in_tx.store(false, Ordering::Relaxed);
    }

    pub(crate) async fn commit(&mut self) -> std::result::Result<(), sqlx::Error> {
        self.run("COMMIT").await?;
        self.ended();
        Ok(())
    }

    pub(crate) async fn rollback(&mut self) -> std::result::Result<(), sqlx::Error> {
        self.run("ROLLBACK").await?;
        self.ended();
        Ok(())
    }

    /// Runs `sql`, a transaction control statement.
    async fn run(&mut self, sql: &'static str) -> std::result::Result<(), sqlx::Error> {
        sqlx::query(sql).execute(&mut *self.conn).await.map(|_| ())
    }
}

impl Drop for SqliteTurn {
    fn drop(&mut self) {
        // A transaction left open holds SQLite's write lock, which other
        // processes wait for: roll it back now, not when this process next
        // writes. The task queues for the turn behind whoever waits already;
        // a writer that gets it first rolls back itself.
        if self.writer.in_tx.load(Ordering::Relaxed) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let writer = self.writer.clone();
                runtime.spawn(async move {
                    match writer.turn().await {
                        Ok(_) | Err(Error::Closed) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot roll back a transaction left open")
                        }
                    }
                });
            }
        }
    }
}

/// Whether `e` says another process holds SQLite's write lock and
/// `deadline` has not passed; if so, waits a millisecond first. Only for a
/// single statement outside a transaction or a string whose first
/// statement is the `BEGIN`: those did nothing when they failed so, and
/// can be sent again as they were (a later statement of a string, such as
/// a `COMMIT`, may fail with the same code after the others ran).
pub(crate) async fn busy_again(e: &sqlx::Error, deadline: Instant) -> bool {
    let busy = match e {
        // SQLITE_BUSY, or one of its extended codes (low byte 5).
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| c & 0xff == 5),
        _ => false,
    };
    if !busy || Instant::now() >= deadline {
        return false;
    }
    tokio::time::sleep(LOCK_RETRY).await;
    true
}

/// The pause between attempts to take SQLite's write lock from another
/// process (see [`SqliteTurn::lock_deadline`]).
const LOCK_RETRY: Duration = Duration::from_millis(1);

/// This process's turn to write (on SQLite; at once on PostgreSQL), and
/// where to write. Held by a [`Tx`] until it commits or is dropped.
#[derive(Debug)]
pub(crate) enum WritePermit {
    /// The turn on this process's writer connection.
    Sqlite(SqliteTurn),
    /// PostgreSQL: no turn; writes take a connection from the pool.
    Postgres(AnyPool),
}

impl WritePermit {
    /// Runs the query `query` builds where writes go; on SQLite again while
    /// another process holds the write lock (so it builds it per attempt).
    pub(crate) async fn execute<'q>(
        &mut self,
        query: impl Fn() -> sqlx::query::Query<'q, Any, AnyArguments<'q>>,
    ) -> std::result::Result<AnyQueryResult, sqlx::Error> {
        match self {
            WritePermit::Sqlite(turn) => while_busy!(turn, query().execute(turn.conn()).await),
            WritePermit::Postgres(pool) => query().execute(&*pool).await,
        }
    }

    /// Runs the query `query` builds where writes go and returns its rows:
    /// on SQLite a read on the writer connection, which finds what it just
    /// wrote in its cache.
    pub(crate) async fn fetch_all<'q>(
        &mut self,
        query: impl Fn() -> sqlx::query::Query<'q, Any, AnyArguments<'q>>,
    ) -> std::result::Result<Vec<AnyRow>, sqlx::Error> {
        match self {
            WritePermit::Sqlite(turn) => while_busy!(turn, query().fetch_all(turn.conn()).await),
            WritePermit::Postgres(pool) => query().fetch_all(&*pool).await,
        }
    }
}

impl Store {
    /// Opens (creating if missing) the database at `url` and applies the
    /// outbox/inbox migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(StoreConfig::new(url)).await
    }

    /// Opens the database described by `config`.
    pub async fn connect_with(config: StoreConfig) -> Result<Self> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);

        let backend = Backend::of_url(&config.url)?;
        let connect_error = |source| Error::Connect {
            url: redact(&config.url),
            source,
        };
        let (pool, writer) = match backend {
            Backend::Sqlite => {
                let url = sqlite_url_creating(&config.url)?;
                let options = AnyConnectOptions::from_str(&url).map_err(connect_error)?;
                // The writer first: it creates the file and switches it to WAL.
                let conn =
                    open_sqlite_writer(&options, config.checkpoint_pages, config.sqlite_cache_kib)
                        .await
                        .map_err(|e| match e {
                            Error::Query { source, .. } => connect_error(source),
                            other => other,
                        })?;
                let readers = sqlite_pool(config.busy_timeout, config.sqlite_cache_kib)
                    .max_connections(config.max_connections)
                    .connect_with(options.clone())
                    .await
                    .map_err(connect_error)?;
                let writer = Writer {
                    state: Arc::new(Mutex::new(WriterState {
                        conn: Some(conn),
                        closed: false,
                    })),
                    in_tx: AtomicBool::new(false),
                    options,
                    busy_timeout: config.busy_timeout,
                    checkpoint_pages: config.checkpoint_pages,
                    cache_kib: config.sqlite_cache_kib,
                };
                (readers, Some(Arc::new(writer)))
            }
            Backend::Postgres => {
                create_postgres_database_if_missing(&config.url).await?;
                let options = AnyConnectOptions::from_str(&config.url).map_err(connect_error)?;
                let pool = AnyPoolOptions::new()
                    .max_connections(config.max_connections)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await
                    .map_err(connect_error)?;
                (pool, None)
            }
        };
        let store = Self {
            inner: Arc::new(Inner {
                pool,
                backend,
                url: config.url.clone(),
                committed: Notify::new(),
                writer,
                migrates: config.migrate,
            }),
        };
        store.migrate("skein_outbox", crate::MIGRATIONS).await?;
        Ok(store)
    }

    /// Applies `migrations` of `component` that are not applied yet, in
    /// version order, each in its own transaction. A store opened with
    /// `StoreConfig::migrate` false applies none: it checks that all are
    /// applied, and that none it does not know is ([`Error::Schema`]).
    pub async fn migrate(&self, component: &str, migrations: &[Migration]) -> Result<()> {
        if self.inner.migrates {
            migrate::run(self, component, migrations).await
        } else {
            migrate::check(self, component, migrations).await
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The connection pool, for reads outside a transaction.
    pub fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// The database URL (with its password).
    pub(crate) fn url(&self) -> &str {
        &self.inner.url
    }

    /// The URL without its password, for logs and errors.
    pub fn display_url(&self) -> String {
        redact(&self.inner.url)
    }

    /// Begins a transaction. Its state changes, inbox records and outgoing
    /// messages commit together with [`Tx::commit`].
    ///
    /// On SQLite the transaction takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers wait for each other instead of
    /// failing on a lock upgrade; and writers of this process queue for
    /// their turn before they begin, instead of sleeping in SQLite's busy
    /// handler.
    pub async fn begin(&self) -> Result<Tx> {
        let permit = self.write_permit().await?;
        Tx::begin(permit, self.clone()).await
    }

    /// Waits for this process's turn to write (SQLite; at once on
    /// PostgreSQL). Write with the permit.
    ///
    /// SQLite lets one connection write at a time. Left to SQLite, writers
    /// that find the lock taken sleep in its busy handler (1, 2, 5, 10 ms
    /// and longer) and the lock often sits free while they sleep; under
    /// load most of the time goes there. Writers of one process queue here
    /// instead, in arrival order; the lock held by another process (a
    /// second copy, the CLI) is tried for every millisecond or two, up to
    /// the busy timeout (see [`SqliteTurn::lock_deadline`]). Writes go through one
    /// connection of their own, so readers keep the pool.
    pub(crate) async fn write_permit(&self) -> Result<WritePermit> {
        match &self.inner.writer {
            Some(writer) => Ok(WritePermit::Sqlite(writer.turn().await?)),
            None => Ok(WritePermit::Postgres(self.inner.pool.clone())),
        }
    }

    /// Whether worker `name` has bound its consumer on `stream` with this
    /// database before (see [`Store::record_consumer`]), or, for a
    /// database from before that record, its inbox holds anything.
    pub async fn consumed_before(&self, name: &str, stream: &str) -> Result<bool> {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT COUNT(*) FROM skein_consumers WHERE name = $1 AND stream = $2) \
             + (SELECT COUNT(*) FROM (SELECT 1 FROM skein_inbox WHERE handler = $1 LIMIT 1) AS i \
             WHERE NOT EXISTS (SELECT 1 FROM skein_consumers WHERE name = $1))",
        )
        .bind(name)
        .bind(stream)
        .fetch_one(&self.inner.pool)
        .await
        .map(|n| n > 0)
        .map_err(Error::query("cannot read the consumers bound before"))
    }

    /// Records that worker `name` bound its consumer on `stream` (kept from
    /// the first time on).
    pub async fn record_consumer(&self, name: &str, stream: &str) -> Result<()> {
        self.write_permit()
            .await?
            .execute(|| {
                sqlx::query(
                    "INSERT INTO skein_consumers (name, stream, first_bound_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name, stream) DO NOTHING",
                )
                .bind(name)
                .bind(stream)
                .bind(crate::now_micros())
            })
            .await
            .map(|_| ())
            .map_err(Error::query("cannot record the consumer bound"))
    }

    /// Runs a trivial query on the pool: whether the database answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.inner.pool)
            .await
            .map(|_| ())
            .map_err(Error::query("the database does not answer"))
    }

    /// Messages committed and not yet marked published: not yet
    /// acknowledged by the stream, and on SQLite also those acknowledged in
    /// the last `RelayConfig::mark_delay` (the relay marks them together).
    pub async fn outbox_backlog(&self) -> Result<i64> {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM skein_outbox WHERE published_at IS NULL")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(Error::query("cannot count the outbox backlog"))
    }

    pub(crate) fn notify_committed(&self) {
        self.inner.committed.notify_one();
    }

    pub(crate) async fn committed(&self) {
        self.inner.committed.notified().await;
    }

    /// Closes the pool and the writer connection; writing afterwards fails.
    pub async fn close(&self) {
        self.inner.pool.close().await;
        if let Some(writer) = &self.inner.writer {
            let mut state = writer.state.lock().await;
            state.closed = true;
            if let Some(conn) = state.conn.take() {
                let _ = conn.close().await;
            }
        }
    }
}

/// Pool options for a SQLite database: no ping before use, and each
/// connection set up for WAL.
fn sqlite_pool(busy_timeout: Duration, cache_kib: Option<u32>) -> AnyPoolOptions {
    AnyPoolOptions::new()
        // A file does not drop connections: no ping (a round trip to the
        // connection's thread) before every use.
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| Box::pin(set_up_sqlite(conn, busy_timeout, cache_kib)))
}

/// Sets a new SQLite connection up: WAL lets readers run beside the
/// writer; NORMAL syncs at checkpoints, which WAL keeps durable against
/// process crashes.
async fn set_up_sqlite(
    conn: &mut AnyConnection,
    busy_timeout: Duration,
    cache_kib: Option<u32>,
) -> std::result::Result<(), sqlx::Error> {
    conn.execute("PRAGMA journal_mode = WAL").await?;
    conn.execute("PRAGMA synchronous = NORMAL").await?;
    conn.execute(format!("PRAGMA busy_timeout = {}", busy_timeout.as_millis()).as_str())
        .await?;
    conn.execute("PRAGMA foreign_keys = ON").await?;
    if let Some(kib) = cache_kib {
        // Negative: a size in KiB rather than in pages.
        conn.execute(format!("PRAGMA cache_size = -{}", kib.max(1)).as_str())
            .await?;
    }
    Ok(())
}

/// The file path of a `sqlite:` URL and its query string, if any.
fn sqlite_path(url: &str) -> (&str, Option<&str>) {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    }
}

/// `url` with `mode=rwc` so SQLite creates the file, and its directory created.
fn sqlite_url_creating(url: &str) -> Result<String> {
    let (path, query) = sqlite_path(url);
    if path.is_empty() || path == ":memory:" {
        return Err(Error::UnsupportedUrl(format!(
            "{url}: an in-memory SQLite database cannot be shared by the relay; give a file path"
        )));
    }
    if let Some(dir) = std::path::Path::new(path).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                context: format!("cannot create the database directory {}", dir.display()),
                source,
            })?;
        }
    }
    Ok(match query {
        Some(q) if q.contains("mode=") => format!("sqlite://{path}?{q}"),
        Some(q) => format!("sqlite://{path}?{q}&mode=rwc"),
        None => format!("sqlite://{path}?mode=rwc"),
    })
}

/// Creates the database a PostgreSQL URL names when it does not exist, by
/// connecting to the server's `postgres` database.
/// Whether the database at `url` exists, without creating it or changing
/// anything: the file for `sqlite:`, the database on the server for
/// `postgres:` (the server must be reachable).
pub async fn database_exists(url: &str) -> Result<bool> {
    match Backend::of_url(url)? {
        Backend::Sqlite => {
            let (path, _) = sqlite_path(url);
            Ok(!path.is_empty() && std::path::Path::new(path).exists())
        }
        Backend::Postgres => {
            let connect_error = |source| Error::Connect {
                url: redact(url),
                source,
            };
            let options = PgConnectOptions::from_str(url).map_err(connect_error)?;
            match options.connect().await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    Ok(true)
                }
                // invalid_catalog_name: the server is there, the database not.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => Ok(false),
                Err(e) => Err(connect_error(e)),
            }
        }
    }
}

async fn create_postgres_database_if_missing(url: &str) -> Result<()> {
    let connect_error = |source| Error::Connect {
        url: redact(url),
        source,
    };
    let options = PgConnectOptions::from_str(url).map_err(connect_error)?;
    let Some(database) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    if options.connect().await.is_ok() {
        return Ok(());
    }
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(connect_error)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&database)
            .fetch_one(&mut admin)
            .await
            .map_err(connect_error)?;
    if !exists {
        let quoted = database.replace('"', "\"\"");
        match admin
            .execute(format!("CREATE DATABASE \"{quoted}\"").as_str())
            .await
        {
            Ok(_) => tracing::info!(database = %database, "created PostgreSQL database"),
            // Another copy created it at the same moment.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42P04") || e.is_unique_violation() => {}
            Err(e) => return Err(connect_error(e)),
        }
    }
    let _ = admin.close().await;
    Ok(())
}

/// A database URL with its passwords replaced by `***`: the one in the
/// user info (`user:password@host`, up to the authority's last `@`, as
/// sqlx's URL parser reads it) and the query parameters `password` and
/// `sslpassword`, which sqlx accepts too. Everything else is kept as given.
pub fn redact(url: &str) -> String {
    let (url, fragment) = match url.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (url, None),
    };
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => authority.to_owned(),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => base.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_password_parameter(key) => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// A query parameter that carries a password (`password`, `sslpassword`,
/// in any case, `+` or percent-encoded letters included).
fn is_password_parameter(key: &str) -> bool {
    let mut decoded = String::with_capacity(key.len());
    let mut bytes = key.bytes();
    while let Some(b) = bytes.next() {
        let c = match b {
            b'%' => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                std::str::from_utf8(&hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .unwrap_or(b'%')
            }
            other => other,
        };
        decoded.push(char::from(c).to_ascii_lowercase());
    }
    matches!(decoded.as_str(), "password" | "sslpassword")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:data/x.db"), "sqlite:data/x.db");
        // sqlx takes a password from the query too, and reads the user
        // info up to the authority's last `@`.
        assert_eq!(
            redact("postgres://u@h/skein_{service}?password=s3cret&sslmode=disable"),
            "postgres://u@h/skein_{service}?password=***&sslmode=disable"
        );
        assert_eq!(
            redact("postgres://h/db?sslmode=require&SSLPassword=k3y&pass%77ord=x#f"),
            "postgres://h/db?sslmode=require&SSLPassword=***&pass%77ord=***#f"
        );
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("postgres://u:pw@h/db@x?application_name=a"),
            "postgres://u:***@h/db@x?application_name=a"
        );
    }

    #[test]
    fn the_backend_follows_the_url() {
        assert_eq!(Backend::of_url("sqlite:x.db").ok(), Some(Backend::Sqlite));
        assert_eq!(
            Backend::of_url("postgresql://h/db").ok(),
            Some(Backend::Postgres)
        );
        assert!(matches!(
            Backend::of_url("mysql://h/db"),
            Err(Error::UnsupportedUrl(_))
        ));
    }

    #[test]
    fn sqlite_urls_get_create_mode() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("skein-url-{}", std::process::id()));
        let path = dir.join("a.db");
        let url = sqlite_url_creating(&format!("sqlite:{}", path.display()))?;
        assert_eq!(url, format!("sqlite://{}?mode=rwc", path.display()));
        assert!(dir.is_dir());
        let _ = std::fs::remove_dir_all(dir);
        assert!(sqlite_url_creating("sqlite::memory:").is_err());
        Ok(())
    }
}
