//! Embedded migrations, several components per database.
//!
//! Each component (the outbox itself, each worker) keeps its own numbered
//! migrations with one SQL text per backend. Applied versions are recorded
//! in `skein_migrations` per component, so components never collide.
//!
//! A migration runs in a transaction that holds the database's migration
//! lock (SQLite's write lock, a PostgreSQL advisory lock), so copies
//! starting together apply each once; versions already applied are skipped
//! without taking it.

use sqlx::Executor;

use crate::error::{Error, Result};
use crate::store::{Backend, Store};

/// One migration: a version and its SQL for each backend.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version, increasing from 1.
    pub version: i64,
    /// What it does.
    pub description: &'static str,
    /// SQL for SQLite (may hold several statements).
    pub sqlite: &'static str,
    /// SQL for PostgreSQL (may hold several statements).
    pub postgres: &'static str,
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS skein_migrations (
    component  TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    description TEXT  NOT NULL,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (component, version)
)";

pub(crate) async fn run(store: &Store, component: &str, migrations: &[Migration]) -> Result<()> {
    let mut sorted = migrations.to_vec();
    sorted.sort_by_key(|m| m.version);
    // Copies starting at the same time race here; on SQLite a lost race is a
    // busy error, so try again (applied versions are re-read each time).
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_run(store, component, &sorted).await {
            Err(Error::Migrate {
                source: sqlx::Error::Database(ref db),
                ..
            }) if attempt < 5
                && store.backend() == Backend::Sqlite
                && db.message().contains("locked") =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
            }
            other => return other,
        }
    }
}

/// Serialises migrators of one PostgreSQL database across processes.
const LOCK: &str = "SELECT 1 FROM (SELECT pg_advisory_xact_lock(7152201)) AS locked";

async fn try_run(store: &Store, component: &str, migrations: &[Migration]) -> Result<()> {
    match store.backend() {
        Backend::Sqlite => {
            store
                .pool()
                .execute(CREATE_TABLE)
                .await
                .map_err(Error::query("cannot create skein_migrations"))?;
        }
        Backend::Postgres => {
            // Two copies creating the table at once collide in the catalog
            // (a unique violation on pg_type) even with IF NOT EXISTS.
            let failed = Error::query("cannot create skein_migrations");
            let mut tx = store.pool().begin().await.map_err(failed)?;
            for statement in [LOCK, CREATE_TABLE] {
                tx.execute(statement)
                    .await
                    .map_err(Error::query("cannot create skein_migrations"))?;
            }
            tx.commit()
                .await
                .map_err(Error::query("cannot create skein_migrations"))?;
        }
    }
    // What is applied already, read without a lock: a start with nothing
    // to apply (every start but the first of a version) takes no write
    // lock, so it does not wait for another process's transaction. Each
    // version missing here is checked again under the lock.
    let applied = applied(store, component)
        .await
        .map_err(Error::query("cannot read skein_migrations"))?;
    for m in migrations.iter().filter(|m| !applied.contains(&m.version)) {
        let failed = |source| Error::Migrate {
            component: component.to_owned(),
            version: m.version,
            description: m.description.to_owned(),
            source,
        };
        let mut tx = match store.backend() {
            Backend::Sqlite => store.pool().begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => store.pool().begin().await,
        }
        .map_err(failed)?;
        if store.backend() == Backend::Postgres {
            // Serialise migrators of this database across processes.
            sqlx::query(LOCK).execute(&mut *tx).await.map_err(failed)?;
        }
        let applied: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM skein_migrations WHERE component = $1 AND version = $2",
        )
        .bind(component)
        .bind(m.version)
        .fetch_one(&mut *tx)
        .await
        .map_err(failed)?;
        if applied > 0 {
            continue;
        }
        let sql = match store.backend() {
            Backend::Sqlite => m.sqlite,
            Backend::Postgres => m.postgres,
        };
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(failed)?;
        sqlx::query(
            "INSERT INTO skein_migrations (component, version, description, applied_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(component)
        .bind(m.version)
        .bind(m.description)
        .bind(crate::now_micros())
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(
            component,
            version = m.version,
            description = m.description,
            "migration applied"
        );
    }
    Ok(())
}

/// The versions of `component` applied to `store`.
async fn applied(store: &Store, component: &str) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar("SELECT version FROM skein_migrations WHERE component = $1")
        .bind(component)
        .fetch_all(store.pool())
        .await
}

/// Checks, changing nothing, that every one of `migrations` of `component`
/// is applied and no later one is (a newer build's).
pub(crate) async fn check(store: &Store, component: &str, migrations: &[Migration]) -> Result<()> {
    let applied = applied(store, component).await.map_err(Error::query(
        "cannot read skein_migrations (is this a skein database?)",
    ))?;
    let known = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    let missing: Vec<String> = migrations
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| format!("v{} ({})", m.version, m.description))
        .collect();
    let schema = |problem: String| Error::Schema {
        component: component.to_owned(),
        problem,
    };
    if !missing.is_empty() {
        return Err(schema(format!(
            "behind this build (not applied: {}): start the worker of this version first, which applies them, or use the skein its database was made with",
            missing.join(", ")
        )));
    }
    if let Some(newer) = applied.iter().filter(|v| **v > known).max() {
        return Err(schema(format!(
            "ahead of this build (v{newer} applied, this build knows up to v{known}): use a skein at least as new as the workers"
        )));
    }
    Ok(())
}
