//! The identity tables: users and refresh tokens (see `migrations/`).
//!
//! Times are microseconds since the Unix epoch ([`skein_outbox::now_micros`]).

use skein_contracts::identity::User;
use skein_contracts::Role;
use skein_outbox::Backend;
use sqlx::{AnyConnection, Row};
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// A stored user with what logging in needs.
#[derive(Debug)]
pub struct UserRow {
    /// The user as clients see it.
    pub user: User,
    /// The argon2id PHC string. Secret: never log it.
    pub password_hash: String,
}

/// A new user.
#[derive(Debug)]
pub struct NewUser<'a> {
    /// Id.
    pub id: Uuid,
    /// Email, lower-cased.
    pub email: &'a str,
    /// Display name, trimmed.
    pub name: &'a str,
    /// Role.
    pub role: Role,
    /// argon2id PHC string.
    pub password_hash: &'a str,
    /// Creation time.
    pub created_at: i64,
}

/// Inserts `user` unless its email or its id is taken; `false` when one was.
pub async fn insert_user(conn: &mut AnyConnection, user: &NewUser<'_>) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, name, role, password_hash, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(user.id.to_string())
    .bind(user.email)
    .bind(user.name)
    .bind(role_name(user.role))
    .bind(user.password_hash)
    .bind(user.created_at)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// The user with `email` (lower-cased).
pub async fn user_by_email(conn: &mut AnyConnection, email: &str) -> sqlx::Result<Option<UserRow>> {
    sqlx::query(
        "SELECT id, email, name, role, password_hash, created_at FROM users WHERE email = $1",
    )
    .bind(email)
    .fetch_optional(conn)
    .await?
    .map(|r| to_user_row(&r))
    .transpose()
}

/// The user with `id`.
pub async fn user_by_id(conn: &mut AnyConnection, id: Uuid) -> sqlx::Result<Option<UserRow>> {
    sqlx::query("SELECT id, email, name, role, password_hash, created_at FROM users WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .map(|r| to_user_row(&r))
        .transpose()
}

fn to_user_row(row: &sqlx::any::AnyRow) -> sqlx::Result<UserRow> {
    let id: String = row.try_get("id")?;
    let role: String = row.try_get("role")?;
    Ok(UserRow {
        user: User {
            id: parse_uuid(&id)?,
            email: row.try_get("email")?,
            name: row.try_get("name")?,
            role: parse_role(&role)?,
            created_at: rfc3339(row.try_get("created_at")?),
        },
        password_hash: row.try_get("password_hash")?,
    })
}

/// A new refresh token, stored as its hash.
#[derive(Debug)]
pub struct NewRefreshToken<'a> {
    /// SHA-256 of the token, hex.
    pub hash: &'a str,
    /// The login it descends from.
    pub family: Uuid,
    /// Its user.
    pub user_id: Uuid,
    /// Issue time.
    pub created_at: i64,
    /// It stops working then.
    pub expires_at: i64,
}

/// Stores a refresh token.
pub async fn insert_refresh_token(
    conn: &mut AnyConnection,
    token: &NewRefreshToken<'_>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (hash, family, user_id, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(token.hash)
    .bind(token.family.to_string())
    .bind(token.user_id.to_string())
    .bind(token.created_at)
    .bind(token.expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks the refresh token `hash` used, if it is live (unused, not revoked,
/// not expired at `now`), and returns its user and family. Of concurrent
/// callers, exactly one gets `Some`.
pub async fn use_refresh_token(
    conn: &mut AnyConnection,
    hash: &str,
    now: i64,
) -> sqlx::Result<Option<(Uuid, Uuid)>> {
    let row = sqlx::query(
        "UPDATE refresh_tokens SET used_at = $1 \
         WHERE hash = $2 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $1 \
         RETURNING user_id, family",
    )
    .bind(now)
    .bind(hash)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        let user: String = r.try_get("user_id")?;
        let family: String = r.try_get("family")?;
        Ok((parse_uuid(&user)?, parse_uuid(&family)?))
    })
    .transpose()
}

/// Whether a refresh token `hash` was ever issued (used, revoked and
/// expired ones included): a read, before a refresh takes the write lock.
pub async fn refresh_token_exists(conn: &mut AnyConnection, hash: &str) -> sqlx::Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM refresh_tokens WHERE hash = $1")
        .bind(hash)
        .fetch_optional(conn)
        .await?
        .is_some())
}

/// Revokes every live token of `family` (unused, unexpired); returns how
/// many.
pub async fn revoke_family(
    conn: &mut AnyConnection,
    backend: Backend,
    family: Uuid,
    now: i64,
) -> sqlx::Result<u64> {
    revoke_where(conn, backend, "family", family, now).await
}

/// Revokes every live token whose `column` (`family` or `user_id`) is
/// `value`; returns how many.
///
/// On PostgreSQL the tokens are locked first, by a statement of their own:
/// a refresh of the same log-in in flight is waited for, and the `UPDATE`
/// after it (read committed: a snapshot per statement) sees the token that
/// refresh made, which it would miss otherwise and leave working. A refresh
/// that comes after waits for this one and finds its token revoked.
/// (SQLite writes one transaction at a time.)
async fn revoke_where(
    conn: &mut AnyConnection,
    backend: Backend,
    column: &'static str,
    value: Uuid,
    now: i64,
) -> sqlx::Result<u64> {
    if backend == Backend::Postgres {
        // The live tokens only, in one order whatever index finds them: a
        // log-out of one log-in and one of all of a user's take them alike,
        // and the clean-up of expired rows at log-in takes none of them.
        let lock = format!(
            "SELECT 1 FROM refresh_tokens WHERE {column} = $1 AND revoked_at IS NULL \
             AND used_at IS NULL AND expires_at > $2 ORDER BY hash FOR UPDATE"
        );
        sqlx::query(&lock)
            .bind(value.to_string())
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
    }
    let sql = format!(
        "UPDATE refresh_tokens SET revoked_at = $1 WHERE {column} = $2 \
         AND revoked_at IS NULL AND used_at IS NULL AND expires_at > $1"
    );
    Ok(sqlx::query(&sql)
        .bind(now)
        .bind(value.to_string())
        .execute(conn)
        .await?
        .rows_affected())
}

/// A refresh token as a log-out sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenState {
    /// Whose.
    pub user_id: Uuid,
    /// Its log-in.
    pub family: Uuid,
    /// Exchanged for a newer one.
    pub used: bool,
    /// Its log-in was ended (a log-out, or a used token presented again).
    pub revoked: bool,
    /// Past its lifetime at the time asked.
    pub expired: bool,
}

/// The refresh token `hash` at `now`; `None` for a token never issued or
/// deleted since.
pub async fn refresh_token_state(
    conn: &mut AnyConnection,
    hash: &str,
    now: i64,
) -> sqlx::Result<Option<TokenState>> {
    let row = sqlx::query(
        "SELECT user_id, family, used_at, revoked_at, expires_at FROM refresh_tokens \
         WHERE hash = $1",
    )
    .bind(hash)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        let user: String = r.try_get("user_id")?;
        let family: String = r.try_get("family")?;
        let used: Option<i64> = r.try_get("used_at")?;
        let revoked: Option<i64> = r.try_get("revoked_at")?;
        let expires: i64 = r.try_get("expires_at")?;
        Ok(TokenState {
            user_id: parse_uuid(&user)?,
            family: parse_uuid(&family)?,
            used: used.is_some(),
            revoked: revoked.is_some(),
            expired: expires <= now,
        })
    })
    .transpose()
}

/// Revokes every live token of `user` (unused, unexpired); returns how
/// many.
pub async fn revoke_user(
    conn: &mut AnyConnection,
    backend: Backend,
    user: Uuid,
    now: i64,
) -> sqlx::Result<u64> {
    revoke_where(conn, backend, "user_id", user, now).await
}

/// Deletes refresh tokens expired before `now` (of `user`, or of everyone).
pub async fn delete_expired_refresh_tokens(
    conn: &mut AnyConnection,
    user: Option<Uuid>,
    now: i64,
) -> sqlx::Result<u64> {
    let done = match user {
        Some(user) => {
            sqlx::query("DELETE FROM refresh_tokens WHERE user_id = $1 AND expires_at <= $2")
                .bind(user.to_string())
                .bind(now)
                .execute(conn)
                .await?
        }
        None => {
            sqlx::query("DELETE FROM refresh_tokens WHERE expires_at <= $1")
                .bind(now)
                .execute(conn)
                .await?
        }
    };
    Ok(done.rows_affected())
}

/// The stored name of a role.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Customer => "customer",
        Role::Admin => "admin",
    }
}

fn parse_role(name: &str) -> sqlx::Result<Role> {
    match name {
        "customer" => Ok(Role::Customer),
        "admin" => Ok(Role::Admin),
        other => Err(sqlx::Error::Decode(
            format!("unknown role {other:?}").into(),
        )),
    }
}

fn parse_uuid(text: &str) -> sqlx::Result<Uuid> {
    Uuid::parse_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Microseconds since the epoch as RFC 3339.
pub fn rfc3339(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}
