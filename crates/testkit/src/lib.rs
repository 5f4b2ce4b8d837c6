//! Test harness for skein: real servers, one per test.
//!
//! # Layout
//!
//! - [`nats`]: [`NatsServer`] starts a real `nats-server` with JetStream on a
//!   free loopback port and a temporary store directory, and kills it on drop.
//!   It can be stopped and started again on the same port and store, to test
//!   what survives a broker restart.
//! - [`db`]: [`TestDb`] gives each test a fresh database, a SQLite file in a
//!   temporary directory or a uniquely named PostgreSQL database that is
//!   dropped afterwards (and kept, with its name printed, when the test fails).
//! - [`backend_tests!`]: runs one async test function against every storage
//!   backend, so SQLite and PostgreSQL pass the same suite.
//! - [`cpu`]: the machine's CPU time over a stretch of work, for the
//!   benchmark programs.
//!
//! A test that cannot reach the server it needs fails with a message that
//! says how to provide it; nothing is skipped in silence.
//!
//! Set `TEST_LOG=debug` (or any `tracing` filter) to see logs.

pub mod cpu;
pub mod db;
pub mod http;
pub mod nats;

pub use db::{Backend, TestDb};
pub use nats::{free_port, free_ports, tls_dir, NatsServer, Secured};

/// Error of the test harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable nats-server binary.
    #[error("no nats-server >= 2.10 found: {0}")]
    NatsServerMissing(String),
    /// The nats-server process could not be started or did not become ready.
    #[error("nats-server did not start: {0}")]
    NatsServerStart(String),
    /// The database server could not be reached or the database not created.
    #[error("test database: {0}")]
    Database(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What failed.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result of the test harness.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Installs a `tracing` subscriber when `TEST_LOG` is set; quiet otherwise.
/// Safe to call from every test.
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let filter = if filter.is_empty() || filter == "1" {
                "debug".to_owned()
            } else {
                filter
            };
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Waits until `check` returns `Some`, polling every 20 ms, for at most
/// `timeout`. Returns `None` on timeout. For tests that wait for an
/// asynchronous outcome without sleeping a fixed time.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Generates, for each named `async fn name(backend: Backend) -> anyhow::Result<()>`
/// in scope, one test per storage backend: `sqlite::name` and `postgres::name`.
///
/// ```ignore
/// async fn a_redelivered_message_runs_once(backend: Backend) -> anyhow::Result<()> { ... }
/// skein_testkit::backend_tests!(a_redelivered_message_runs_once);
/// ```
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    $crate::init_tracing();
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    $crate::init_tracing();
                    super::$name($crate::Backend::Postgres).await
                }
            )*
        }
    };
}
