//! The identity queries: register, issue token, refresh token, get user,
//! verification key; and [`create_user`], which the admin seed shares.

use std::sync::{Arc, OnceLock};

use skein_auth::{
    hash_password, hash_refresh_token, new_refresh_token, verify_password, Claims, SigningKey,
};
use skein_contracts::identity::{
    GetUser, GetVerificationKey, GetVerificationKeys, IssueToken, RefreshToken, Register,
    RevokeToken, Revoked, TokenPair, User, UserRegistered, VerificationKey, VerificationKeys,
};
use skein_contracts::validate::describe;
use skein_contracts::{Role, ServiceError, Validate, Violation};
use skein_message::{Envelope, MessageContext};
use skein_outbox::{now_micros, Store};
use skein_service::Host;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::store::{self, NewRefreshToken, NewUser};
use crate::{AdminSeed, IdentityConfig, NAME};

/// The one answer to a failed login, whatever failed: it must not tell
/// whether the email exists.
pub const INVALID_LOGIN: &str = "invalid email or password";
/// The one answer to a refresh token that does not work.
pub const INVALID_REFRESH: &str = "invalid, expired or already used refresh token";
/// Longest password looked at on login (register accepts up to 1024
/// characters); longer ones cannot match and are not hashed.
const MAX_PASSWORD_BYTES: usize = 4 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every handler needs.
#[derive(Debug)]
pub struct State {
    /// The database.
    pub store: Store,
    /// The token signing key.
    pub key: SigningKey,
    /// Its public half, as published.
    pub verification_key: VerificationKey,
    /// Every key that verifies tokens, the signing key's first.
    pub verification_keys: VerificationKeys,
    /// Settings.
    pub config: IdentityConfig,
    /// Bounds concurrent argon2 work: each hash holds 19 MiB and a core, and
    /// a burst of logins must queue rather than exhaust memory.
    hashing: Semaphore,
}

impl State {
    /// The state of one identity worker.
    pub fn new(
        store: Store,
        key: SigningKey,
        verification_keys: Vec<VerificationKey>,
        config: IdentityConfig,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            verification_key: key.verification_key(&config.issuer, &config.audience),
            verification_keys: VerificationKeys {
                keys: verification_keys,
            },
            store,
            key,
            config,
            hashing: Semaphore::new(cores.clamp(1, 8)),
        }
    }

    /// Runs slow password work on a blocking thread, a few at a time.
    async fn hashing<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BoxError> {
        let _permit = self.hashing.acquire().await?;
        Ok(tokio::task::spawn_blocking(work).await?)
    }
}

/// Why a user could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateUserError {
    /// The request is invalid; every violation.
    #[error("{}", describe(.0))]
    Invalid(Vec<Violation>),
    /// A user with this email (in any case) exists.
    #[error("email already registered")]
    EmailTaken,
    /// The id asked for is another email's user.
    #[error("user id {0} is taken by another email")]
    IdTaken(Uuid),
    /// The database, hashing or the outbox failed.
    #[error("cannot {context}")]
    Internal {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: BoxError,
    },
}

fn failed<E: Into<BoxError>>(context: &'static str) -> impl FnOnce(E) -> CreateUserError {
    move |e| CreateUserError::Internal {
        context,
        source: e.into(),
    }
}

/// Logs an internal failure (with its cause chain) and hides it from the
/// client.
fn internal<E: Into<BoxError>>(context: &'static str) -> impl FnOnce(E) -> ServiceError {
    move |e| {
        let e: BoxError = e.into();
        tracing::error!(error = %chain(&*e), "identity failed to {context}");
        ServiceError::internal()
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn to_service_error(e: CreateUserError) -> ServiceError {
    match e {
        CreateUserError::Invalid(violations) => ServiceError::invalid(&violations),
        CreateUserError::EmailTaken => ServiceError::conflict("email already registered"),
        e @ CreateUserError::IdTaken(_) => ServiceError::conflict(e.to_string()),
        e @ CreateUserError::Internal { .. } => {
            tracing::error!(error = %chain(&e), "identity failed to register a user");
            ServiceError::internal()
        }
    }
}

/// Registers every identity query on `host`.
pub async fn register(host: &mut Host, state: Arc<State>) -> skein_service::Result<()> {
    let s = state.clone();
    host.query(move |q: Register, ctx| {
        let s = s.clone();
        async move {
            create_user(&s, q, Role::Customer, &ctx)
                .await
                .map_err(to_service_error)
        }
    })
    .await?;
    let s = state.clone();
    host.query(move |q: IssueToken, _| issue_token(s.clone(), q))
        .await?;
    let s = state.clone();
    host.query(move |q: RefreshToken, _| refresh_token(s.clone(), q))
        .await?;
    let s = state.clone();
    host.query(move |q: RevokeToken, _| revoke_token(s.clone(), q))
        .await?;
    let s = state.clone();
    host.query(move |q: GetUser, _| get_user(s.clone(), q))
        .await?;
    // The key set before the single key: a copy answering the single-key
    // query (which an ingress asks only when nobody answers the key set)
    // answers the key set too, so a copy still starting never makes an
    // ingress drop the keys besides its signing key.
    let s = state.clone();
    host.query(move |_: GetVerificationKeys, _| {
        let keys = s.verification_keys.clone();
        async move { Ok(keys) }
    })
    .await?;
    let s = state;
    host.query(move |_: GetVerificationKey, _| {
        let key = s.verification_key.clone();
        async move { Ok(key) }
    })
    .await?;
    Ok(())
}

/// Creates a user with `role` and announces it (`user_registered`) in the
/// same transaction.
pub async fn create_user(
    state: &State,
    q: Register,
    role: Role,
    ctx: &MessageContext,
) -> Result<User, CreateUserError> {
    q.validate().map_err(CreateUserError::Invalid)?;
    let email = q.email.to_lowercase();
    let name = q.name.trim().to_owned();
    // Skip the slow hash when the answer is already known; the insert below
    // still settles a race between two registrations.
    if let Some(existing) = registered(state, &email).await? {
        return again(state, existing, q.user_id, &name, role, q.password).await;
    }
    let password = q.password.clone();
    let hash = state
        .hashing(move || hash_password(&password))
        .await
        .map_err(failed("hash a password"))?
        .map_err(failed("hash a password"))?;
    let user = User {
        id: q.user_id.unwrap_or_else(Uuid::now_v7),
        email,
        name,
        role,
        created_at: String::new(),
    };
    let created_at = now_micros();
    let mut tx = state
        .store
        .begin()
        .await
        .map_err(failed("begin a transaction"))?;
    let inserted = store::insert_user(
        &mut tx,
        &NewUser {
            id: user.id,
            email: &user.email,
            name: &user.name,
            role,
            password_hash: &hash,
            created_at,
        },
    )
    .await
    .map_err(failed("insert a user"))?;
    if !inserted {
        // Another registration of this email (or id) committed meanwhile:
        // maybe this one's own retry.
        drop(tx);
        return match registered(state, &user.email).await? {
            Some(existing) => again(state, existing, q.user_id, &user.name, role, q.password).await,
            // Not the email: the id asked for is taken (a sender choosing
            // ids badly; the ingress derives them from the email).
            None => Err(q
                .user_id
                .map_or(CreateUserError::EmailTaken, CreateUserError::IdTaken)),
        };
    }
    let event = UserRegistered {
        user_id: user.id,
        email: user.email.clone(),
        name: user.name.clone(),
        role,
    };
    tx.publish(&Envelope::event(NAME, &event, ctx).map_err(failed("encode user_registered"))?);
    tx.commit().await.map_err(failed("commit a new user"))?;
    tracing::info!(user_id = %user.id, role = store::role_name(role), "user registered");
    Ok(User {
        created_at: store::rfc3339(created_at),
        ..user
    })
}

/// The user registered with `email` (lower-cased), if any.
async fn registered(state: &State, email: &str) -> Result<Option<store::UserRow>, CreateUserError> {
    let mut conn = state
        .store
        .pool()
        .acquire()
        .await
        .map_err(failed("open a connection"))?;
    store::user_by_email(&mut conn, email)
        .await
        .map_err(failed("look up an email"))
}

/// A registration of an email that is taken: the same registration asked
/// again (a retry under one idempotency key: the same id, name, role and
/// password) answers its user; anything else is `EmailTaken`.
async fn again(
    state: &State,
    existing: store::UserRow,
    user_id: Option<Uuid>,
    name: &str,
    role: Role,
    password: String,
) -> Result<User, CreateUserError> {
    if user_id != Some(existing.user.id) || existing.user.name != name || existing.user.role != role
    {
        return Err(CreateUserError::EmailTaken);
    }
    let hash = existing.password_hash;
    let same = state
        .hashing(move || verify_password(&password, &hash))
        .await
        .map_err(failed("verify a password"))?;
    if same {
        Ok(existing.user)
    } else {
        Err(CreateUserError::EmailTaken)
    }
}

/// Creates the admin account unless a user with its email exists (then
/// nothing changes, also when that user is a customer: it is not promoted).
pub async fn seed_admin(state: &State, admin: &AdminSeed) -> Result<(), CreateUserError> {
    let request = Register {
        email: admin.email.clone(),
        password: admin.password.clone(),
        name: admin.name.clone(),
        user_id: None,
    };
    match create_user(state, request, Role::Admin, &MessageContext::root()).await {
        Ok(user) => {
            tracing::info!(user_id = %user.id, email = %user.email, "created the admin account");
            Ok(())
        }
        Err(CreateUserError::EmailTaken) => {
            let existing = registered(state, &admin.email.to_lowercase()).await?;
            if existing.is_some_and(|u| u.user.role != Role::Admin) {
                tracing::warn!(
                    email = %admin.email,
                    "the admin email belongs to a customer account; it was not made an admin"
                );
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A real argon2id hash to check the passwords of unknown emails against, so
/// that a login for an unknown email takes as long as a wrong password.
fn dummy_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| hash_password("not anybody's password").unwrap_or_default())
}

async fn issue_token(state: Arc<State>, q: IssueToken) -> Result<TokenPair, ServiceError> {
    if q.password.len() > MAX_PASSWORD_BYTES {
        // No stored password can match.
        return Err(ServiceError::unauthenticated(INVALID_LOGIN));
    }
    let email = q.email.trim().to_lowercase();
    let mut conn = read_connection(&state).await?;
    let found = store::user_by_email(&mut conn, &email)
        .await
        .map_err(internal("look up a user"))?;
    drop(conn);
    let (user, hash) = match found {
        Some(row) => (Some(row.user), Some(row.password_hash)),
        None => (None, None),
    };
    let password = q.password;
    let matches = state
        .hashing(move || match &hash {
            Some(hash) => verify_password(&password, hash),
            None => verify_password(&password, dummy_hash()),
        })
        .await
        .map_err(internal("verify a password"))?;
    let Some(user) = user.filter(|_| matches) else {
        tracing::debug!("login refused");
        return Err(ServiceError::unauthenticated(INVALID_LOGIN));
    };
    let mut tx = state
        .store
        .begin()
        .await
        .map_err(internal("begin a transaction"))?;
    let now = now_micros();
    store::delete_expired_refresh_tokens(&mut tx, Some(user.id), now)
        .await
        .map_err(internal("delete expired refresh tokens"))?;
    let pair = token_pair(&state, &mut tx, user.id, user.role, Uuid::now_v7(), now).await?;
    tx.commit()
        .await
        .map_err(internal("commit a refresh token"))?;
    tracing::debug!(user_id = %user.id, "logged in");
    Ok(pair)
}

/// A new access token and a new refresh token of `family`, stored in `conn`.
async fn token_pair(
    state: &State,
    conn: &mut sqlx::AnyConnection,
    user: Uuid,
    role: Role,
    family: Uuid,
    now: i64,
) -> Result<TokenPair, ServiceError> {
    let c = &state.config;
    let claims = Claims::new(user, role, &c.issuer, &c.audience, c.access_ttl);
    let access_token = state.key.issue(&claims).map_err(internal("sign a token"))?;
    let (refresh_token, hash) = new_refresh_token().map_err(internal("make a refresh token"))?;
    let ttl = i64::try_from(c.refresh_ttl.as_micros()).unwrap_or(i64::MAX);
    store::insert_refresh_token(
        conn,
        &NewRefreshToken {
            hash: &hash,
            family,
            user_id: user,
            created_at: now,
            expires_at: now.saturating_add(ttl),
        },
    )
    .await
    .map_err(internal("store a refresh token"))?;
    Ok(TokenPair {
        access_token,
        token_type: "Bearer".into(),
        expires_in: c.access_ttl.as_secs(),
        refresh_token,
    })
}

/// A connection for reads (on SQLite a reader, not the writer).
async fn read_connection(
    state: &State,
) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, ServiceError> {
    state
        .store
        .pool()
        .acquire()
        .await
        .map_err(internal("open a connection"))
}

/// Whether the refresh token `hash` was ever issued. A token never issued
/// (anyone may send one) is answered on a read, without the write lock
/// that log-ins and registrations wait for.
async fn issued(state: &State, hash: &str) -> Result<bool, ServiceError> {
    let mut conn = read_connection(state).await?;
    store::refresh_token_exists(&mut conn, hash)
        .await
        .map_err(internal("look up a refresh token"))
}

async fn refresh_token(state: Arc<State>, q: RefreshToken) -> Result<TokenPair, ServiceError> {
    let hash = hash_refresh_token(&q.refresh_token);
    let now = now_micros();
    if !issued(&state, &hash).await? {
        return Err(ServiceError::unauthenticated(INVALID_REFRESH));
    }
    let mut tx = state
        .store
        .begin()
        .await
        .map_err(internal("begin a transaction"))?;
    // Single use: of concurrent refreshes with one token, exactly one wins.
    let Some((user_id, family)) = store::use_refresh_token(&mut tx, &hash, now)
        .await
        .map_err(internal("use a refresh token"))?
    else {
        if let Some(store::TokenState {
            user_id, family, ..
        }) = store::refresh_token_state(&mut tx, &hash, now)
            .await
            .map_err(internal("look up a refresh token"))?
            .filter(|t| t.used)
        {
            // A used token again: someone kept a copy. End that login
            // everywhere; its owner logs in again.
            let revoked = store::revoke_family(&mut tx, state.store.backend(), family, now)
                .await
                .map_err(internal("revoke refresh tokens"))?;
            tx.commit().await.map_err(internal("commit a revocation"))?;
            tracing::warn!(%user_id, %family, revoked, "a used refresh token was presented again; revoked its login");
        }
        return Err(ServiceError::unauthenticated(INVALID_REFRESH));
    };
    let Some(user) = store::user_by_id(&mut tx, user_id)
        .await
        .map_err(internal("look up a user"))?
    else {
        return Err(ServiceError::unauthenticated(INVALID_REFRESH));
    };
    let pair = token_pair(&state, &mut tx, user_id, user.user.role, family, now).await?;
    tx.commit().await.map_err(internal("commit a refresh"))?;
    Ok(pair)
}

/// Logs out: revokes the token's login, or with `everywhere` every login of
/// its user. `everywhere` takes the newest token of a login only: a copy
/// already exchanged for a newer one, which may be a stolen one, does not
/// end its owner's other logins. A token whose log-in has ended already (a
/// repeat, a log-out elsewhere, a reused token's log-in ended for theft)
/// and a token never issued revoke nothing and are not an error: a copy
/// of a revoked token must not end the log-ins its owner made since.
async fn revoke_token(state: Arc<State>, q: RevokeToken) -> Result<Revoked, ServiceError> {
    let hash = hash_refresh_token(&q.refresh_token);
    let now = now_micros();
    if !issued(&state, &hash).await? {
        return Ok(Revoked { revoked: 0 });
    }
    let mut tx = state
        .store
        .begin()
        .await
        .map_err(internal("begin a transaction"))?;
    let Some(token) = store::refresh_token_state(&mut tx, &hash, now)
        .await
        .map_err(internal("look up a refresh token"))?
    else {
        return Ok(Revoked { revoked: 0 });
    };
    if token.revoked {
        return Ok(Revoked { revoked: 0 });
    }
    if q.everywhere && (token.used || token.expired) {
        return Err(ServiceError::unauthenticated(
            "to log out everywhere, present the last refresh token issued to you (this one was \
             exchanged for a newer one, or expired)",
        ));
    }
    let backend = state.store.backend();
    let revoked = if q.everywhere {
        store::revoke_user(&mut tx, backend, token.user_id, now).await
    } else {
        store::revoke_family(&mut tx, backend, token.family, now).await
    }
    .map_err(internal("revoke refresh tokens"))?;
    tx.commit().await.map_err(internal("commit a revocation"))?;
    let (user_id, family) = (token.user_id, token.family);
    tracing::info!(%user_id, %family, everywhere = q.everywhere, revoked, "logged out");
    Ok(Revoked { revoked })
}

async fn get_user(state: Arc<State>, q: GetUser) -> Result<User, ServiceError> {
    if !q.caller.may_access(q.user_id) {
        return Err(ServiceError::forbidden("you may only see your own account"));
    }
    let mut conn = read_connection(&state).await?;
    store::user_by_id(&mut conn, q.user_id)
        .await
        .map_err(internal("look up a user"))?
        .map(|row| row.user)
        .ok_or_else(|| ServiceError::not_found(format!("no user {}", q.user_id)))
}
