//! Bearer tokens: verified with identity's public keys, never minted here.
//!
//! The keys come from identity's `verification_keys` query (its signing
//! key's and those it publishes besides for a rotation; an identity from
//! before key sets answers `verification_key`, one key): fetched on first
//! use, again when a token names a key id the ingress does not know (a
//! rotated key), at most once per `key_refresh_interval` so forged key ids
//! cannot turn the ingress into a load generator against identity, and
//! again, in the background, on the first request after they are
//! `key_max_age` old, so that a key identity no longer publishes stops
//! verifying. Keys that could not be fetched again for three times
//! `key_max_age` verify nothing more (503 until identity answers): a key
//! removed while identity was away must not verify for ever, and with
//! identity away no client can refresh its tokens anyway. A token verifies
//! with whichever key its `kid` names, so tokens of the old and the new key
//! both work while a rotation is under way.
//!
//! `authenticate` runs once per request in the middleware; it leaves an
//! `Authn` in the request's extensions, which the [`Caller`] extractors read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use skein_auth::{AuthError, Claims, Verifier};
use skein_contracts::identity::{GetVerificationKey, GetVerificationKeys};
use skein_contracts::{Caller, Role};

use crate::problem::ApiError;
use crate::state::{AppState, Shared};

/// Most verified tokens remembered; past it the memory starts over.
const VERIFIED_CAPACITY: usize = 10_000;

/// The verifiers, when the keys were last fetched, and the tokens they
/// verified.
///
/// A signature check costs far more than the rest of a request, and clients
/// send the same access token for its whole life, so verified tokens are
/// remembered by their exact text (the same text has the same signature) and
/// only their expiry is checked again. The memory is dropped whenever the
/// keys change.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    set: RwLock<Option<Arc<KeySet>>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Verified tokens, with the id of the key that verified each.
    verified: Mutex<HashMap<String, (Claims, String)>>,
    /// A fetch of keys grown old runs in the background.
    refreshing: AtomicBool,
}

/// Lowers a flag when dropped, however its holder ends.
struct Lowered<'a>(&'a AtomicBool);

impl Drop for Lowered<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The keys of one fetch.
#[derive(Debug)]
struct KeySet {
    verifiers: Vec<Verifier>,
    fetched: Instant,
}

impl KeySet {
    /// The key ids, sorted: identity copies may list them in another order.
    fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.verifiers.iter().map(Verifier::key_id).collect();
        ids.sort_unstable();
        ids
    }

    fn has(&self, key_id: &str) -> bool {
        self.verifiers.iter().any(|v| v.key_id() == key_id)
    }

    /// Verifies `token` with the key its `kid` names: its claims and that
    /// key's id.
    fn verify(&self, token: &str) -> Result<(Claims, String), AuthError> {
        for verifier in &self.verifiers {
            match verifier.verify(token) {
                Err(AuthError::UnknownKey) => continue,
                other => return other.map(|claims| (claims, verifier.key_id().to_owned())),
            }
        }
        Err(AuthError::UnknownKey)
    }
}

/// What the middleware found out about the caller.
#[derive(Debug, Clone)]
pub(crate) enum Authn {
    /// No `Authorization` header.
    Anonymous,
    /// A valid token.
    Verified(Claims),
    /// A token that was refused, and why (the 401 to answer).
    Refused(ApiError),
}

fn invalid(detail: &str) -> ApiError {
    ApiError::Unauthenticated {
        error: Some("invalid_token"),
        detail: detail.to_owned(),
    }
}

fn refusal(e: &AuthError) -> ApiError {
    invalid(match e {
        AuthError::Expired => "the token has expired",
        AuthError::NotYetValid => "the token is not valid yet",
        AuthError::BadSignature => "the token signature is invalid",
        AuthError::WrongAudience => "the token was not issued for this API",
        AuthError::WrongIssuer => "the token was not issued by skein",
        AuthError::WrongAlgorithm(_) => "the token algorithm is not accepted",
        AuthError::UnknownKey => "the token was signed with an unknown key",
        _ => "the token is malformed",
    })
}

impl Keys {
    fn current(&self) -> Option<Arc<KeySet>> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fetches the keys from identity, unless some are held and the last
    /// attempt was less than `every` ago. Concurrent callers wait for one
    /// fetch.
    async fn refresh(
        &self,
        state: &AppState,
        correlation: &str,
        every: Duration,
    ) -> Result<(), ApiError> {
        let mut last = self.last_fetch.lock().await;
        if self.current().is_some() {
            if let Some(at) = *last {
                if at.elapsed() < every {
                    return Ok(());
                }
            }
        }
        *last = Some(Instant::now());
        let keys = match state
            .ask(
                &GetVerificationKeys {},
                &skein_message::MessageContext::with_correlation(correlation),
            )
            .await
        {
            Ok(set) => set.keys,
            // Nobody answers that query: an identity from before key sets,
            // which has the one key. (Any other failure is no reason to
            // drop the keys held for one.)
            Err(e @ ApiError::ServiceUnavailable { .. }) => {
                match state
                    .ask(
                        &GetVerificationKey {},
                        &skein_message::MessageContext::with_correlation(correlation),
                    )
                    .await
                {
                    Ok(key) => vec![key],
                    Err(_) => {
                        tracing::warn!(error = %e, "cannot fetch the verification keys");
                        return Err(e);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the verification keys");
                return Err(e);
            }
        };
        let verifiers: Vec<Verifier> = keys
            .iter()
            .filter_map(|key| {
                Verifier::new(key)
                    .inspect_err(|e| {
                        tracing::error!(key_id = %key.key_id, error = %e, "identity published an unusable verification key")
                    })
                    .ok()
            })
            .collect();
        if verifiers.is_empty() {
            tracing::error!("identity published no usable verification key");
            return Err(ApiError::Internal);
        }
        let set = KeySet {
            verifiers,
            fetched: Instant::now(),
        };
        let mut current = self.set.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().map(|c| c.ids()) != Some(set.ids()) {
            tracing::info!(key_ids = ?set.ids(), "verification keys loaded");
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        *current = Some(Arc::new(set));
        Ok(())
    }

    /// Keys grown old are fetched again at most this often, whatever else
    /// fetched them or failed to.
    fn aged_every(state: &AppState) -> Duration {
        state
            .config
            .key_refresh_interval
            .min(state.config.key_max_age)
    }

    /// Whether the keys held are too old to trust without fetching them
    /// now; keys merely old are fetched again in the background.
    fn too_old(&self, state: &Shared, correlation: &str) -> bool {
        let age = self.current().map(|set| set.fetched.elapsed());
        if age.is_some_and(|age| age >= state.config.key_max_age * 3) {
            return true;
        }
        if age.is_some_and(|age| age >= state.config.key_max_age)
            && !self.refreshing.swap(true, Ordering::AcqRel)
        {
            // Fetched again in the background: requests meanwhile use the
            // keys held (and go on doing so while identity does not answer).
            // A key identity stopped publishing then takes its remembered
            // tokens with it.
            let state = state.clone();
            let correlation = correlation.to_owned();
            tokio::spawn(async move {
                let _done = Lowered(&state.keys.refreshing);
                let every = Self::aged_every(&state);
                let _ = state.keys.refresh(&state, &correlation, every).await;
            });
        }
        false
    }

    /// The claims of `token` if it was verified before and the keys are
    /// fresh enough to trust it: no signature check, no fetch.
    fn known(&self, state: &Shared, token: &str, correlation: &str) -> Option<Claims> {
        if self.too_old(state, correlation) {
            return None;
        }
        self.remembered(token)
    }

    /// Verifies `token`, fetching the keys when needed.
    async fn verify(
        &self,
        state: &Shared,
        token: &str,
        correlation: &str,
    ) -> Result<Claims, ApiError> {
        if self.too_old(state, correlation) {
            // Too old to trust: fetched now, or nothing verifies.
            self.refresh(state, correlation, Self::aged_every(state))
                .await
                .map_err(|_| identity_unavailable())?;
            if self
                .current()
                .is_none_or(|set| set.fetched.elapsed() >= state.config.key_max_age * 3)
            {
                return Err(identity_unavailable());
            }
        }
        if let Some(claims) = self.remembered(token) {
            return Ok(claims);
        }
        let (claims, key_id) = self.check(state, token, correlation).await?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= VERIFIED_CAPACITY {
            verified.clear();
        }
        verified.insert(token.to_owned(), (claims.clone(), key_id));
        Ok(claims)
    }

    /// The claims of a token verified before, while it has not expired and
    /// the key that verified it is still held.
    fn remembered(&self, token: &str) -> Option<Claims> {
        let set = self.current()?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        let (claims, key_id) = verified.get(token)?;
        if claims.exp.saturating_add(skein_auth::LEEWAY_SECS) > unix_now() && set.has(key_id) {
            Some(claims.clone())
        } else {
            verified.remove(token);
            None
        }
    }

    /// Checks `token`'s signature and claims.
    async fn check(
        &self,
        state: &AppState,
        token: &str,
        correlation: &str,
    ) -> Result<(Claims, String), ApiError> {
        if self.current().is_none() {
            self.refresh(state, correlation, state.config.key_refresh_interval)
                .await?;
        }
        let Some(set) = self.current() else {
            return Err(identity_unavailable());
        };
        state.metrics.token_checked();
        match set.verify(token) {
            Err(AuthError::UnknownKey) => {
                // Maybe identity rotated its key: fetch the keys
                // (rate-limited) and try again.
                self.refresh(state, correlation, state.config.key_refresh_interval)
                    .await?;
                match self.current() {
                    Some(now) if !Arc::ptr_eq(&now, &set) => {
                        state.metrics.token_checked();
                        now.verify(token).map_err(|e| refusal(&e))
                    }
                    _ => Err(refusal(&AuthError::UnknownKey)),
                }
            }
            other => other.map_err(|e| refusal(&e)),
        }
    }
}

fn identity_unavailable() -> ApiError {
    ApiError::ServiceUnavailable {
        service: "identity".into(),
        retry_after: std::time::Duration::from_secs(1),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(u64::MAX)
}

/// What a request's `Authorization` header presents, as far as it can be
/// told without checking a signature.
pub(crate) enum Presented<'a> {
    /// Known at once: no header, a header that holds no bearer token, or a
    /// token verified before (while the keys are fresh enough).
    Known(Authn),
    /// A token whose signature must be checked ([`verify`]).
    Unchecked(&'a str),
}

/// Reads the `Authorization` header.
pub(crate) fn presented<'a>(
    state: &Shared,
    headers: &'a HeaderMap,
    correlation: &str,
) -> Presented<'a> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Presented::Known(Authn::Anonymous);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Presented::Known(Authn::Refused(invalid(
            "use the Bearer scheme with an access token",
        )));
    };
    match state.keys.known(state, token, correlation) {
        Some(claims) => Presented::Known(Authn::Verified(claims)),
        None => Presented::Unchecked(token),
    }
}

/// Verifies a token [`presented`] found unchecked, fetching the keys when
/// needed.
pub(crate) async fn verify(state: &Shared, token: &str, correlation: &str) -> Authn {
    match state.keys.verify(state, token, correlation).await {
        Ok(claims) => Authn::Verified(claims),
        Err(e) => Authn::Refused(e),
    }
}

fn caller_of(parts: &Parts) -> Result<Caller, ApiError> {
    match parts.extensions.get::<Authn>() {
        Some(Authn::Verified(claims)) => Ok(Caller {
            user_id: claims.sub,
            role: claims.role,
        }),
        Some(Authn::Refused(e)) => Err(e.clone()),
        _ => Err(ApiError::Unauthenticated {
            error: None,
            detail: "this route needs an access token (Authorization: Bearer ...)".into(),
        }),
    }
}

/// Any authenticated caller.
#[derive(Debug, Clone)]
pub(crate) struct User(pub(crate) Caller);

/// An authenticated admin (403 for others).
#[derive(Debug, Clone)]
pub(crate) struct Admin(pub(crate) Caller);

impl<S: Send + Sync> FromRequestParts<S> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        caller_of(parts).map(User)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let caller = caller_of(parts)?;
        if caller.role != Role::Admin {
            return Err(ApiError::Forbidden("only admins may do this".into()));
        }
        Ok(Admin(caller))
    }
}
