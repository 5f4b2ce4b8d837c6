//! A fresh database per test, on SQLite or PostgreSQL.

use std::fmt;

use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

use crate::{Error, Result};

/// A storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, a file in a temporary directory.
    Sqlite,
    /// PostgreSQL, a uniquely named database on the test server.
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

/// The PostgreSQL server tests use: `$SKEIN_TEST_POSTGRES_URL`, else the
/// local server on 127.0.0.1:5432 as user `postgres`.
pub fn postgres_admin_url() -> String {
    std::env::var("SKEIN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists for one test.
///
/// The database itself is created by whoever connects first (skein's stores
/// create a missing database); [`TestDb`] chooses a unique name and removes
/// it on drop. A PostgreSQL database of a failed (panicking) test is kept and
/// its name printed, for a look afterwards.
pub struct TestDb {
    backend: Backend,
    url: String,
    name: String,
    admin_url: Option<String>,
    dir: Option<TempDir>,
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("backend", &self.backend)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestDb {
    /// A fresh database on `backend`. For PostgreSQL, checks that the server
    /// answers, and fails with what to do when it does not.
    pub async fn new(backend: Backend) -> Result<Self> {
        let name = format!("skein_test_{}", uuid::Uuid::now_v7().simple());
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("skein-db-")
                    .tempdir()
                    .map_err(|source| Error::Io {
                        context: "cannot create a directory for the SQLite file".into(),
                        source,
                    })?;
                let url = format!("sqlite://{}/{name}.db", dir.path().display());
                Ok(Self {
                    backend,
                    url,
                    name,
                    admin_url: None,
                    dir: Some(dir),
                })
            }
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let conn = PgConnection::connect(&admin).await.map_err(|e| {
                    Error::Database(format!(
                        "PostgreSQL is not reachable at {admin}: {e}; run scripts/test.sh (it starts one) \
                         or set SKEIN_TEST_POSTGRES_URL to a server where the user may create databases"
                    ))
                })?;
                let _ = conn.close().await;
                let mut url = url_with_database(&admin, &name);
                if url.is_empty() {
                    url = format!("postgres://postgres@127.0.0.1:5432/{name}");
                }
                Ok(Self {
                    backend,
                    url,
                    name,
                    admin_url: Some(admin),
                    dir: None,
                })
            }
        }
    }

    /// A fresh SQLite database.
    pub async fn sqlite() -> Result<Self> {
        Self::new(Backend::Sqlite).await
    }

    /// A fresh PostgreSQL database.
    pub async fn postgres() -> Result<Self> {
        Self::new(Backend::Postgres).await
    }

    /// The database URL to hand to the code under test.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A URL of another fresh database next to this one (same server or same
    /// directory), for tests that need a database per service. Removed with
    /// this one.
    pub fn sibling_url(&self, suffix: &str) -> String {
        match (&self.backend, &self.dir, &self.admin_url) {
            (Backend::Sqlite, Some(dir), _) => {
                format!(
                    "sqlite://{}/{}_{suffix}.db",
                    dir.path().display(),
                    self.name
                )
            }
            (_, _, Some(admin)) => url_with_database(admin, &format!("{}_{suffix}", self.name)),
            _ => self.url.clone(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin) = self.admin_url.clone() else {
            return;
        };
        // Removed after a failed test too (tests leave nothing behind),
        // unless asked to keep them for a look.
        if std::env::var("SKEIN_TEST_KEEP_DB").is_ok_and(|v| v == "1") {
            eprintln!(
                "keeping PostgreSQL database {} for inspection (SKEIN_TEST_KEEP_DB=1)",
                self.name
            );
            return;
        }
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a thread with its own.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(mut conn) = PgConnection::connect(&admin).await else {
                    return;
                };
                let like = format!("{name}%");
                let names: Vec<(String,)> =
                    sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE $1")
                        .bind(&like)
                        .fetch_all(&mut conn)
                        .await
                        .unwrap_or_default();
                for (db,) in names {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
                let _ = conn.close().await;
            });
        });
        let _ = handle.join();
    }
}

/// `admin` with its database name replaced by `database`.
fn url_with_database(admin: &str, database: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin, None),
    };
    // postgres://user@host:port/dbname: the database is after the third '/'.
    let prefix = match base.match_indices('/').nth(2) {
        Some((i, _)) => &base[..i],
        None => base,
    };
    match query {
        Some(q) => format!("{prefix}/{database}?{q}"),
        None => format!("{prefix}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn the_database_name_in_a_url_is_replaced() {
        assert_eq!(
            url_with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            url_with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            url_with_database("postgres://u@h/p?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
