//! Errors of the outbox, inbox and relay.

/// An error of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL names no supported backend.
    #[error("unsupported database URL {0:?}: expected sqlite:<path> or postgres://...")]
    UnsupportedUrl(String),
    /// The database could not be opened or created.
    #[error("cannot open database {url}: {source}")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("migration {component} v{version} ({description}) failed: {source}")]
    Migrate {
        /// The component (crate) whose migration failed.
        component: String,
        /// Its version.
        version: i64,
        /// Its description.
        description: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// The database's schema is not the one this build expects, and the
    /// store may not change it (`StoreConfig::migrate` false).
    #[error("{component}'s tables are {problem}")]
    Schema {
        /// The component (crate) whose tables differ.
        component: String,
        /// How: behind (migrations missing) or ahead (unknown ones applied).
        problem: String,
    },
    /// A query failed.
    #[error("{context}: {source}")]
    Query {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// A stored row could not be read back.
    #[error("corrupt outbox row {id}: {reason}")]
    CorruptRow {
        /// The row's message id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The store was closed.
    #[error("the database is closed")]
    Closed,
    /// The relay's lease was taken over by another relay.
    #[error("the relay lease was taken by another relay")]
    LockLost,
    /// The PostgreSQL relay's lock connection, or the SQLite database to
    /// renew the lease, did not answer in time.
    #[error("the relay lock was not confirmed within {0:?}")]
    LockUnanswered(std::time::Duration),
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What failed.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn query(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Query { context, source }
    }

    /// Whether this is a unique-constraint violation (a duplicate key).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Error::Query {
                source: sqlx::Error::Database(db),
                ..
            } => db.is_unique_violation(),
            _ => false,
        }
    }
}

/// Result of the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;
