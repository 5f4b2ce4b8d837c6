//! Statements that travel together.
//!
//! Every statement on SQLite is a hand-off to the connection's own thread
//! and back: two thread wake-ups, which on a small machine cost more than
//! the statement. [`Statements`] collects a handler's writes that do not
//! depend on each other's answers and sends them to SQLite as one query
//! string, in one hand-off; sqlx's SQLite driver runs each statement of a
//! string in turn and stops at the first that fails (a behaviour sqlx 0.8
//! keeps but calls deprecated: should a later sqlx drop it, every test that
//! writes through a saga or a read model fails at once). PostgreSQL allows
//! one statement per prepared query, so there they run one by one, on the
//! same transaction.
//!
//! ```no_run
//! # async fn f(tx: &mut skein_outbox::Tx) -> Result<(), sqlx::Error> {
//! use skein_outbox::Statements;
//!
//! let mut writes = Statements::new(tx.backend());
//! writes.push("UPDATE accounts SET balance = balance - $1 WHERE id = $2 RETURNING balance", |b| {
//!     b.bind(500_i64).bind("alice".to_owned());
//! });
//! writes.push("INSERT INTO payments (account, amount) VALUES ($1, $2)", |b| {
//!     b.bind("alice".to_owned()).bind(500_i64);
//! });
//! let rows = writes.run(tx).await?; // the UPDATE's RETURNING row, if it matched
//! # Ok(()) }
//! ```

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::{Any, AnyConnection, Arguments, Encode, Type};

use crate::store::Backend;
#[cfg(doc)]
use crate::tx::Tx;

/// Statements to run one after another in a transaction, sent together
/// where the backend allows it (see the [module docs](self)).
///
/// Each statement is written with its own placeholders, `$1` upwards, and
/// its values bound in their order. Rows that statements return
/// (`RETURNING`) come back together, in statement order.
pub struct Statements {
    /// SQLite: one string and one argument list for all.
    joined: Option<(String, AnyArguments<'static>)>,
    /// PostgreSQL: each statement with its own arguments.
    each: Vec<(String, AnyArguments<'static>)>,
    error: Option<BoxDynError>,
}

impl std::fmt::Debug for Statements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sql: Vec<&str> = match &self.joined {
            Some((sql, _)) => vec![sql.as_str()],
            None => self.each.iter().map(|(sql, _)| sql.as_str()).collect(),
        };
        f.debug_struct("Statements").field("sql", &sql).finish()
    }
}

impl Statements {
    /// No statements yet, for a transaction on `backend`.
    pub fn new(backend: Backend) -> Self {
        Self {
            joined: (backend == Backend::Sqlite).then(|| (String::new(), AnyArguments::default())),
            each: Vec::new(),
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

    /// Whether no statement was added.
    pub fn is_empty(&self) -> bool {
        match &self.joined {
            Some((sql, _)) => sql.is_empty(),
            None => self.each.is_empty(),
        }
    }

    /// Adds `sql`, whose placeholders are `$1`, `$2`, ..., with the values
    /// `bind` binds to them in that order.
    pub fn push(&mut self, sql: &str, bind: impl FnOnce(&mut Binder<'_>)) -> &mut Self {
        match &mut self.joined {
            Some((joined, args)) => {
                if !joined.is_empty() {
                    joined.push_str(";\n");
                }
                push_renumbered(joined, sql, args.len());
                let mut binder = Binder { args, error: None };
                bind(&mut binder);
                if let Some(e) = binder.error {
                    self.error.get_or_insert(e);
                }
            }
            None => {
                let mut args = AnyArguments::default();
                let mut binder = Binder {
                    args: &mut args,
                    error: None,
                };
                bind(&mut binder);
                if let Some(e) = binder.error {
                    self.error.get_or_insert(e);
                }
                self.each.push((sql.to_owned(), args));
            }
        }
        self
    }

    /// Runs the statements on `conn` (a transaction: a [`Tx`] or an open
    /// one), in order; stops at the first that fails (the transaction must
    /// then be dropped). Returns every row they returned, in order.
    pub async fn run(self, conn: &mut AnyConnection) -> Result<Vec<AnyRow>, sqlx::Error> {
        if let Some(e) = self.error {
            return Err(sqlx::Error::Encode(e));
        }
        let mut rows = Vec::new();
        match self.joined {
            Some((sql, _)) if sql.is_empty() => {}
            Some((sql, args)) => {
                // One text per combination of statements: worth preparing
                // once and keeping.
                rows = sqlx::query_with(&sql, args).fetch_all(&mut *conn).await?;
            }
            None => {
                for (sql, args) in self.each {
                    rows.extend(sqlx::query_with(&sql, args).fetch_all(&mut *conn).await?);
                }
            }
        }
        Ok(rows)
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
/// `$(n + offset)`; text in single quotes (literals) and double quotes
/// (names) is copied as it is.
fn push_renumbered(out: &mut String, sql: &str, offset: usize) {
    let mut chars = sql.char_indices().peekable();
    let mut quote: Option<char> = None;
    while let Some((_, c)) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '$') => {
                let mut digits = String::new();
                while let Some((_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                match digits.parse::<usize>() {
                    Ok(n) => {
                        out.push('$');
                        out.push_str(&(n + offset).to_string());
                    }
                    Err(_) => {
                        out.push('$');
                        out.push_str(&digits);
                    }
                }
            }
            (None, c) => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::push_renumbered;

    #[test]
    fn placeholders_move_up_by_the_values_before_them() {
        let mut sql = String::from("UPDATE t SET a = $1 WHERE b = $2;\n");
        push_renumbered(
            &mut sql,
            "INSERT INTO u (x, y) VALUES ($1, $2), ($3, '$1 stays'), (\"$2\", $10)",
            2,
        );
        assert_eq!(
            sql,
            "UPDATE t SET a = $1 WHERE b = $2;\n\
             INSERT INTO u (x, y) VALUES ($3, $4), ($5, '$1 stays'), (\"$2\", $12)"
        );
        let mut none = String::new();
        push_renumbered(&mut none, "SELECT 1", 7);
        assert_eq!(none, "SELECT 1");
    }
}
