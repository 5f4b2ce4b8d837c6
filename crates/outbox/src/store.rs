//! The service database: SQLite or PostgreSQL, chosen by URL.

use std::str::FromStr;
use std::sync::{Arc, Once};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Connection, Executor};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

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

/// How to open a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite:<path>` or `postgres://user@host/db`.
    pub url: String,
    /// Pool size. SQLite serialises writers anyway; a few connections let
    /// readers run beside the writer.
    pub max_connections: u32,
    /// How long a SQLite writer waits for the write lock.
    pub busy_timeout: Duration,
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
    writer: Option<Writer>,
}

#[derive(Debug)]
struct Writer {
    turn: Arc<Mutex<()>>,
    /// A pool of one connection that is never closed for idleness or age:
    /// the connection that writes keeps its page cache. In WAL mode a
    /// connection drops its whole cache when it finds the database changed
    /// by another connection; with every write on one connection, its cache
    /// stays warm from one transaction to the next.
    pool: AnyPool,
}

/// This process's turn to write (on SQLite; at once on PostgreSQL), and the
/// pool to write with. Held by a [`Tx`] until it commits or is dropped.
#[derive(Debug)]
pub(crate) struct WritePermit {
    _turn: Option<OwnedMutexGuard<()>>,
    pool: AnyPool,
}

impl WritePermit {
    /// Where writes go while the permit is held.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
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
                let writer = sqlite_pool(config.busy_timeout)
                    .max_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_with(options.clone())
                    .await
                    .map_err(connect_error)?;
                let readers = sqlite_pool(config.busy_timeout)
                    .max_connections(config.max_connections)
                    .connect_with(options)
                    .await
                    .map_err(connect_error)?;
                let writer = Writer {
                    turn: Arc::new(Mutex::new(())),
                    pool: writer,
                };
                (readers, Some(writer))
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
            }),
        };
        store.migrate("skein_outbox", crate::MIGRATIONS).await?;
        Ok(store)
    }

    /// Applies `migrations` of `component` that are not applied yet, in
    /// version order, each in its own transaction.
    pub async fn migrate(&self, component: &str, migrations: &[Migration]) -> Result<()> {
        migrate::run(self, component, migrations).await
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
        let permit = self.write_permit().await;
        let tx = match self.inner.backend {
            Backend::Sqlite => permit.pool().begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => permit.pool().begin().await,
        }
        .map_err(Error::query("cannot begin a transaction"))?;
        Ok(Tx::new(tx, self.clone(), permit))
    }

    /// Waits for this process's turn to write (SQLite; at once on
    /// PostgreSQL). Write with the permit's [`WritePermit::pool`].
    ///
    /// SQLite lets one connection write at a time. Left to SQLite, writers
    /// that find the lock taken sleep in its busy handler (1, 2, 5, 10 ms
    /// and longer) and the lock often sits free while they sleep; under
    /// load most of the time goes there. Writers of one process queue here
    /// instead, in arrival order, and the busy handler only sees other
    /// processes (a second copy, the CLI). Writes go through one
    /// connection of their own, so readers keep the pool.
    pub(crate) async fn write_permit(&self) -> WritePermit {
        match &self.inner.writer {
            Some(writer) => WritePermit {
                _turn: Some(writer.turn.clone().lock_owned().await),
                pool: writer.pool.clone(),
            },
            None => WritePermit {
                _turn: None,
                pool: self.inner.pool.clone(),
            },
        }
    }

    /// Messages committed but not yet acknowledged by the stream.
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

    /// Closes the pools.
    pub async fn close(&self) {
        self.inner.pool.close().await;
        if let Some(writer) = &self.inner.writer {
            writer.pool.close().await;
        }
    }
}

/// Pool options for a SQLite database: no ping before use, and each
/// connection set up for WAL.
fn sqlite_pool(busy_timeout: Duration) -> AnyPoolOptions {
    let busy_ms = busy_timeout.as_millis();
    AnyPoolOptions::new()
        // A file does not drop connections: no ping (a round trip to the
        // connection's thread) before every use.
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                // WAL lets readers run beside the writer; NORMAL syncs at
                // checkpoints, which WAL keeps durable against process
                // crashes.
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute("PRAGMA synchronous = NORMAL").await?;
                conn.execute(format!("PRAGMA busy_timeout = {busy_ms}").as_str())
                    .await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                Ok(())
            })
        })
}

/// `url` with `mode=rwc` so SQLite creates the file, and its directory created.
fn sqlite_url_creating(url: &str) -> Result<String> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
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

/// A URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:data/x.db"), "sqlite:data/x.db");
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
