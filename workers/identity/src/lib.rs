//! The identity worker: users, passwords and tokens.
//!
//! # Contracts (see `skein_contracts::identity`)
//!
//! Queries (request-reply on `queries.identity.<name>`, queue group
//! `identity`):
//!
//! - `register`: email, password (10 to 1024 characters), name -> the user,
//!   role customer. 400 naming every bad field; the email is lower-cased and
//!   unique: 409 `email already registered`. The password is kept as an
//!   argon2id hash. Emits `user_registered` in the same transaction (outbox).
//! - `issue_token` (log in): email and password -> a [`TokenPair`]: an
//!   access JWT (EdDSA, `kid` in the header, `sub`/`role`/`iss`/`aud`/`exp`,
//!   [`IdentityConfig::access_ttl`]) and an opaque refresh token
//!   ([`IdentityConfig::refresh_ttl`]). 401 `invalid email or password` for an
//!   unknown email and for a wrong password alike, in about the same time.
//! - `refresh_token`: a refresh token -> a new pair. Each refresh token works
//!   once. Presenting one again (a used one: it was probably stolen) is
//!   refused and also revokes every token descended from the same login, so
//!   the thief and the victim both have to log in again (refresh token
//!   rotation with reuse detection, OAuth 2.0 Security BCP 4.14). Unknown,
//!   used, revoked or expired: 401.
//! - `revoke_token` (log out): a refresh token -> how many tokens stopped
//!   working: every token of its login, or with `everywhere` every login of
//!   its user (then from the newest token of a login only: 401 for one
//!   exchanged for a newer one or expired). An unknown token, or one whose
//!   log-in has ended already, revokes nothing (a copy of a revoked token
//!   does not end the log-ins made since). Access tokens stay valid until
//!   they expire.
//! - `get_user`: the caller itself, or anyone for an admin; 403 for another
//!   customer (checked before existence, so nothing leaks), 404 unknown.
//! - `verification_keys`: every public key, with its key id, issuer and
//!   audience, that verifies access tokens now: the signing key's first,
//!   then those of [`IdentityConfig::verification_keys_pem`] and
//!   `<key_dir>/identity-verification-keys.pem` (a rotation's next or
//!   previous key). The ingress builds a [`skein_auth::Verifier`] for each
//!   and never holds the signing key. `verification_key` (the signing key's
//!   alone) answers ingress copies from before key sets.
//!
//! Event: `user_registered` (`events.identity.<user_id>.user_registered`),
//! also for the seeded admin, with role `admin`.
//!
//! # Keys and the first admin
//!
//! The signing key comes from [`IdentityConfig::signing_key_pem`], else from
//! `<key_dir>/identity-signing-key.pem` (generated there on first start,
//! mode 0600), else it is generated in memory ([`keys`]). The first admin
//! comes from [`IdentityConfig::admin`] and is created once: a start finding
//! a user with that email changes nothing.
//!
//! Passwords, hashes, keys and tokens are never logged.
//!
//! # Layout
//!
//! - [`queries`]: the handlers, and creating users (also the admin).
//! - [`store`]: the tables and their queries.
//! - [`keys`]: loading or generating the signing key.
//!
//! [`TokenPair`]: skein_contracts::identity::TokenPair

pub mod keys;
pub mod queries;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skein_bus::Bus;
use skein_outbox::{Migration, Store};
use skein_service::{Host, HostConfig};

pub use keys::KeyError;
pub use queries::CreateUserError;

/// The worker's name: its service name and query subjects. A contract.
pub const NAME: &str = skein_contracts::identity::SERVICE;

/// The identity tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "users and refresh tokens",
    sqlite: include_str!("../migrations/0001_identity.sql"),
    postgres: include_str!("../migrations/0001_identity.sql"),
}];

/// The first admin account, created on start unless its email exists.
#[derive(Clone)]
pub struct AdminSeed {
    /// Email.
    pub email: String,
    /// Password, at least 10 characters. Never logged.
    pub password: String,
    /// Display name.
    pub name: String,
}

impl std::fmt::Debug for AdminSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSeed")
            .field("email", &self.email)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// How identity issues tokens and where its key lives.
#[derive(Clone)]
pub struct IdentityConfig {
    /// `iss` of the tokens (default `skein`).
    pub issuer: String,
    /// `aud` of the tokens (default `skein-api`).
    pub audience: String,
    /// Lifetime of access tokens (default 15 minutes).
    pub access_ttl: Duration,
    /// Lifetime of each refresh token (default 30 days).
    pub refresh_ttl: Duration,
    /// The signing key as PKCS#8 PEM; wins over `key_dir`. Never logged.
    pub signing_key_pem: Option<String>,
    /// Where the signing key is kept: loaded from, or generated into,
    /// `<key_dir>/identity-signing-key.pem`. Public keys in
    /// `<key_dir>/identity-verification-keys.pem`, when it exists, verify
    /// tokens too (as `verification_keys_pem`).
    pub key_dir: Option<PathBuf>,
    /// More public keys (SubjectPublicKeyInfo PEM blocks, any number) that
    /// verify tokens besides the signing key: during a rotation the next key
    /// before identity signs with it, then the previous one until the tokens
    /// it signed have expired. Public, so not secret.
    pub verification_keys_pem: Option<String>,
    /// The first admin, created once.
    pub admin: Option<AdminSeed>,
}

impl std::fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .field(
                "signing_key_pem",
                &self.signing_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("key_dir", &self.key_dir)
            .field(
                "verification_keys_pem",
                &self.verification_keys_pem.is_some(),
            )
            .field("admin", &self.admin)
            .finish()
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            issuer: "skein".into(),
            audience: "skein-api".into(),
            access_ttl: Duration::from_secs(900),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            signing_key_pem: None,
            verification_keys_pem: None,
            key_dir: None,
            admin: None,
        }
    }
}

impl IdentityConfig {
    /// Every problem with these settings (empty when they are usable).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.issuer.trim().is_empty() {
            problems.push("issuer must not be empty".to_owned());
        }
        if self.audience.trim().is_empty() {
            problems.push("audience must not be empty".to_owned());
        }
        if self.access_ttl < Duration::from_secs(1) {
            problems.push("access_ttl must be at least one second".to_owned());
        }
        if self.refresh_ttl < self.access_ttl {
            problems.push("refresh_ttl must not be shorter than access_ttl".to_owned());
        }
        problems
    }
}

/// Why identity could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is unusable.
    #[error("invalid identity configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The host (bus, store, migrations) failed.
    #[error(transparent)]
    Host(#[from] skein_service::Error),
    /// The signing key could not be loaded or created.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The database failed.
    #[error("cannot prepare the identity database")]
    Database(#[source] sqlx::Error),
    /// The admin account could not be created.
    #[error("cannot create the admin account")]
    Admin(#[source] CreateUserError),
}

/// Migrates the store, loads the signing key, creates the admin if needed,
/// and starts answering identity's queries on `bus`.
pub async fn start(
    bus: Bus,
    store: Store,
    host: HostConfig,
    config: IdentityConfig,
) -> Result<Host, StartError> {
    let problems = config.problems();
    if !problems.is_empty() {
        return Err(StartError::Config(problems));
    }
    store
        .migrate(NAME, MIGRATIONS)
        .await
        .map_err(skein_service::Error::from)?;
    let key = keys::load_or_create(&config)?;
    let verification_keys = keys::verification_keys(&config, &key)?;
    tracing::info!(
        key_id = key.key_id(),
        verifying = ?verification_keys.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>(),
        "token signing key ready"
    );
    let mut conn = store.pool().acquire().await.map_err(StartError::Database)?;
    let expired = store::delete_expired_refresh_tokens(&mut conn, None, skein_outbox::now_micros())
        .await
        .map_err(StartError::Database)?;
    drop(conn);
    if expired > 0 {
        tracing::info!(count = expired, "deleted expired refresh tokens");
    }
    let state = Arc::new(queries::State::new(
        store.clone(),
        key,
        verification_keys,
        config,
    ));
    if let Some(admin) = &state.config.admin {
        queries::seed_admin(&state, admin)
            .await
            .map_err(StartError::Admin)?;
    }
    let mut host = Host::start(bus, store, host).await?;
    queries::register(&mut host, state).await?;
    Ok(host)
}

/// A random password (24 URL-safe characters) for a first admin the
/// operator did not configure; show it once, never log it.
///
/// # Panics
///
/// When the operating system has no secure random source, which leaves
/// nothing safe to do at start-up.
pub fn generated_admin_password() -> String {
    skein_auth::random_password().expect("the operating system's random source failed")
}
