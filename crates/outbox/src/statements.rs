//! Statements that travel together.
//!
//! Every statement costs a trip: on SQLite a hand-off to the connection's
//! own thread and back (two thread wake-ups, which on a small machine cost
//! more than the statement), on PostgreSQL a round trip to the server.
//! [`Statements`] collects a handler's writes that do not depend on each
//! other and sends them in one trip:
//!
//! - SQLite: as one query string. sqlx's SQLite driver runs each statement
//!   of a string in turn and stops at the first that fails (a behaviour
//!   sqlx 0.8 keeps but calls deprecated: should a later sqlx drop it, every
//!   test that writes through a saga or a read model fails at once).
//! - PostgreSQL: as one statement, the others attached to it as
//!   data-modifying `WITH` queries, which PostgreSQL runs exactly once each,
//!   all or none.
//!
//! So the statements must not depend on each other's effects (on
//! PostgreSQL they all see the database as it was before them), must not
//! change the same row twice, and at most one of them returns the rows the
//! caller wants ([`Statements::push_returning`]).
//!
//! ```no_run
//! # async fn f(tx: &mut skein_outbox::Tx) -> Result<(), sqlx::Error> {
//! use skein_outbox::Statements;
//!
//! let mut writes = Statements::new(tx.backend());
//! writes.push_returning(
//!     "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1 RETURNING balance",
//!     |b| {
//!         b.bind(500_i64).bind("alice".to_owned());
//!     },
//! );
//! writes.push("INSERT INTO audit (account, amount) VALUES ($1, $2)", |b| {
//!     b.bind("alice".to_owned()).bind(500_i64);
//! });
//! let taken = writes.run(tx).await?; // the UPDATE's row, if it matched
//! # Ok(()) }
//! ```

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::{Any, AnyConnection, Arguments, Encode, Type};

use crate::store::Backend;
#[cfg(doc)]
use crate::tx::Tx;

/// Independent statements sent to a transaction in one trip (see the
/// [module docs](self)).
///
/// Each statement is written with its own placeholders, `$1` upwards, and
/// its values bound in their order.
pub struct Statements {
    backend: Backend,
    /// Each statement, its placeholders already numbered in `args`.
    parts: Vec<String>,
    /// Which of `parts` returns the caller's rows.
    returning: Option<usize>,
    args: AnyArguments<'static>,
    error: Option<String>,
}

impl std::fmt::Debug for Statements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statements")
            .field("backend", &self.backend)
            .field("parts", &self.parts)
            .field("values", &self.args.len())
            .finish()
    }
}

impl Statements {
    /// No statements yet, for a transaction on `backend`.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            parts: Vec::new(),
            returning: None,
            args: AnyArguments::default(),
            error: None,
        }
    }

    /// No statements yet, for a transaction on `conn` (an open transaction
    /// or a [`Tx`], whose backend it takes).
    pub fn for_connection(conn: &AnyConnection) -> Self {
        Self::new(if conn.backend_name().eq_ignore_ascii_case("sqlite") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        })
    }

    /// The backend the statements are written for.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether no statement was added.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Adds `sql`, a statement that returns no rows, whose placeholders
    /// are `$1`, `$2`, ..., with the values `bind` binds to them in that
    /// order.
    pub fn push(&mut self, sql: &str, bind: impl FnOnce(&mut Binder<'_>)) -> &mut Self {
        let offset = self.args.len();
        let mut part = String::with_capacity(sql.len() + 8);
        let placeholders = push_renumbered(&mut part, sql, offset);
        self.parts.push(part);
        let mut binder = Binder {
            args: &mut self.args,
            error: None,
        };
        bind(&mut binder);
        if let Some(e) = binder.error {
            self.error.get_or_insert(e.to_string());
        }
        // The next statement's numbers start after this one's values: they
        // must be as many as its placeholders.
        let bound = self.args.len() - offset;
        if bound != placeholders {
            self.error.get_or_insert_with(|| {
                format!(
                    "statement {} has {placeholders} placeholders but {bound} values were bound: {sql}",
                    self.parts.len()
                )
            });
        }
        self
    }

    /// Adds `sql` like [`push`](Self::push); [`run`](Self::run) returns
    /// its rows (`RETURNING`). One statement per batch may.
    pub fn push_returning(&mut self, sql: &str, bind: impl FnOnce(&mut Binder<'_>)) -> &mut Self {
        if self.returning.is_some() {
            self.error.get_or_insert_with(|| {
                "only one statement sent together may return rows".to_owned()
            });
        }
        self.returning = Some(self.parts.len());
        self.push(sql, bind)
    }

    /// The statements as one text for the backend.
    fn text(&self) -> String {
        match self.backend {
            Backend::Sqlite => self.parts.join(";\n"),
            Backend::Postgres => {
                let main = self.returning.unwrap_or(self.parts.len() - 1);
                let mut sql = String::new();
                for (i, part) in self.parts.iter().enumerate().filter(|(i, _)| *i != main) {
                    sql.push_str(if sql.is_empty() { "WITH " } else { ", " });
                    sql.push_str(&format!("w{i} AS ({part})"));
                }
                if !sql.is_empty() {
                    sql.push('\n');
                }
                sql.push_str(&self.parts[main]);
                sql
            }
        }
    }

    /// Runs the statements on `conn` (a transaction: a [`Tx`] or an open
    /// one). On an error the transaction must be dropped: what ran before
    /// the failing statement is still in it. Returns the rows of the
    /// statement added with [`push_returning`](Self::push_returning).
    pub async fn run(self, conn: &mut AnyConnection) -> Result<Vec<AnyRow>, sqlx::Error> {
        if let Some(e) = self.error {
            return Err(sqlx::Error::Encode(e.into()));
        }
        if self.parts.is_empty() {
            return Ok(Vec::new());
        }
        let sql = self.text();
        // One text per combination of statements: worth preparing once and
        // keeping.
        let rows = sqlx::query_with(&sql, self.args)
            .fetch_all(&mut *conn)
            .await?;
        // On SQLite statements without RETURNING return no rows, so the
        // rows are the returning statement's; an error above came first.
        Ok(if self.returning.is_some() {
            rows
        } else {
            Vec::new()
        })
    }
}

/// Binds a statement's values, in placeholder order.
pub struct Binder<'a> {
    args: &'a mut AnyArguments<'static>,
    error: Option<BoxDynError>,
}

impl std::fmt::Debug for Binder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binder")
            .field("values", &self.args.len())
            .finish()
    }
}

impl Binder<'_> {
    /// Binds the next placeholder to `value`.
    pub fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: Encode<'static, Any> + Type<Any> + 'static,
    {
        if self.error.is_none() {
            if let Err(e) = self.args.add(value) {
                self.error = Some(e);
            }
        }
        self
    }
}

/// Appends `sql` to `out` with each placeholder `$n` written as
/// `$(n + offset)`, and returns the highest `n`. Text in single quotes
/// (literals), double quotes (names), dollar quotes and comments is copied
/// as it is, and so is a `$` inside a name (`a$1`).
fn push_renumbered(out: &mut String, sql: &str, offset: usize) -> usize {
    let bytes = sql.as_bytes();
    let mut highest = 0;
    let mut i = 0;
    // Copies `sql[from..]` up to and including the first `end` at or after
    // `search`, or to the end; returns where it stopped.
    let copy_through = |out: &mut String, from: usize, search: usize, end: &str| -> usize {
        let stop = sql[search..]
            .find(end)
            .map_or(sql.len(), |at| search + at + end.len());
        out.push_str(&sql[from..stop]);
        stop
    };
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        match c {
            // A doubled quote inside is two quoted runs back to back.
            b'\'' => i = copy_through(out, i, i + 1, "'"),
            b'"' => i = copy_through(out, i, i + 1, "\""),
            b'-' if next == Some(b'-') => i = copy_through(out, i, i + 2, "\n"),
            b'/' if next == Some(b'*') => i = copy_through(out, i, i + 2, "*/"),
            b'$' => {
                let after_name = i > 0
                    && (bytes[i - 1].is_ascii_alphanumeric()
                        || bytes[i - 1] == b'_'
                        || bytes[i - 1] == b'$');
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if after_name {
                    out.push('$');
                    i += 1;
                } else if digits > 0 {
                    let n: usize = sql[i + 1..i + 1 + digits].parse().unwrap_or(usize::MAX);
                    highest = highest.max(n);
                    out.push('$');
                    out.push_str(&n.saturating_add(offset).to_string());
                    i += 1 + digits;
                } else {
                    // A dollar quote, `$$` or `$tag$`: copy to its closing tag.
                    let tag_len = bytes[i + 1..]
                        .iter()
                        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                        .count();
                    if bytes.get(i + 1 + tag_len) == Some(&b'$') {
                        let tag = &sql[i..i + 2 + tag_len];
                        i = copy_through(out, i, i + tag.len(), tag);
                    } else {
                        out.push('$');
                        i += 1;
                    }
                }
            }
            _ => {
                // Up to the next byte that may start something above.
                let run = bytes[i..]
                    .iter()
                    .position(|b| matches!(b, b'\'' | b'"' | b'-' | b'/' | b'$'))
                    .map_or(bytes.len(), |p| i + p.max(1));
                out.push_str(&sql[i..run]);
                i = run;
            }
        }
    }
    highest
}

#[cfg(test)]
mod tests {
    use super::{push_renumbered, Statements};
    use crate::store::Backend;

    fn renumbered(sql: &str, offset: usize) -> (String, usize) {
        let mut out = String::new();
        let highest = push_renumbered(&mut out, sql, offset);
        (out, highest)
    }

    #[test]
    fn placeholders_move_up_by_the_values_before_them() {
        assert_eq!(
            renumbered(
                "INSERT INTO u (x, y) VALUES ($1, $2), ($3, '$1 stays'), (\"$2\", $10)",
                2
            ),
            (
                "INSERT INTO u (x, y) VALUES ($3, $4), ($5, '$1 stays'), (\"$2\", $12)".into(),
                10
            )
        );
        assert_eq!(renumbered("SELECT 1", 7), ("SELECT 1".into(), 0));
        assert_eq!(
            renumbered("SELECT $1::text, 'it''s $2', x -> $2", 1),
            ("SELECT $2::text, 'it''s $2', x -> $3".into(), 2)
        );
    }

    #[test]
    fn a_statement_with_more_placeholders_than_values_is_refused() {
        let mut writes = Statements::new(Backend::Sqlite);
        writes.push("INSERT INTO t (a, b) VALUES ($1, $2)", |b| {
            b.bind(1_i64);
        });
        let error = writes.error.clone().unwrap_or_default();
        assert!(
            error.contains("statement 1 has 2 placeholders but 1 values"),
            "{error}"
        );
        let mut right = Statements::new(Backend::Postgres);
        right.push("UPDATE t SET a = $1 WHERE b = $2", |b| {
            b.bind(1_i64).bind(2_i64);
        });
        assert!(right.error.is_none());
    }

    #[test]
    fn comments_dollar_quotes_and_names_keep_their_dollars() {
        let sql =
            "SELECT a$1, $1 -- don't touch $2\n, $2 /* nor $3 */, $$ $1 $$, $q$ it's $1 $q$, $3";
        assert_eq!(
            renumbered(sql, 5),
            (
                "SELECT a$1, $6 -- don't touch $2\n, $7 /* nor $3 */, $$ $1 $$, $q$ it's $1 $q$, $8"
                    .into(),
                3
            )
        );
    }
}
