//! `/v1/auth/*` and `/v1/me`: identity's requests.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use schemars::JsonSchema;
use serde::Deserialize;
use skein_contracts::identity::{GetUser, IssueToken, RefreshToken, Register, RevokeToken};
use skein_contracts::validate::{is_text, Checker, Validate, Violation};
use uuid::Uuid;

use super::{idempotent, json, with_header};
use crate::auth::User;
use crate::body::{body, Json};
use crate::context::{ClientKey, RequestContext};
use crate::idempotency::derived_id;
use crate::problem::ApiError;
use crate::state::Shared;

/// Registration body: email, password and name (what `register` takes,
/// less the id the ingress may derive).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Email, unique (case-insensitive).
    #[schemars(length(min = 3, max = 254))]
    pub email: String,
    /// Password, at least 10 characters.
    #[schemars(length(min = 10, max = 1024))]
    pub password: String,
    /// Display name, 1 to 100 characters.
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
}

impl Registration {
    fn into_request(self, user_id: Option<Uuid>) -> Register {
        Register {
            email: self.email,
            password: self.password,
            name: self.name,
            user_id,
        }
    }
}

impl Validate for Registration {
    fn violations(&self) -> Vec<Violation> {
        Register {
            email: self.email.clone(),
            password: self.password.clone(),
            name: self.name.clone(),
            user_id: None,
        }
        .violations()
    }
}

/// Log-in body: email and password.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// Email.
    #[schemars(length(min = 1, max = 254))]
    pub email: String,
    /// Password.
    #[schemars(length(min = 1, max = 1024))]
    pub password: String,
}

impl Validate for Login {
    fn violations(&self) -> Vec<Violation> {
        Checker::default()
            .check(is_text(&self.email, 254), "/email", "must not be empty")
            .check(
                (1..=1024).contains(&self.password.chars().count()),
                "/password",
                "must be 1 to 1024 characters",
            )
            .finish()
    }
}

/// Refresh body.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    /// The refresh token from the last token pair.
    #[schemars(length(min = 1, max = 1024))]
    pub refresh_token: String,
}

impl Validate for Refresh {
    fn violations(&self) -> Vec<Violation> {
        refresh_token_violations(&self.refresh_token)
    }
}

/// A refresh token's rule, in a refresh and a log-out alike.
fn refresh_token_violations(token: &str) -> Vec<Violation> {
    Checker::default()
        .check(is_text(token, 1024), "/refresh_token", "must not be empty")
        .finish()
}

/// Log-out body.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Logout {
    /// A refresh token of the login to end (for `everywhere`, the newest of
    /// its login: not exchanged for another, not expired).
    #[schemars(length(min = 1, max = 1024))]
    pub refresh_token: String,
    /// End every login of the token's user, not only this one.
    #[serde(default)]
    pub everywhere: bool,
}

impl Validate for Logout {
    fn violations(&self) -> Vec<Violation> {
        refresh_token_violations(&self.refresh_token)
    }
}

body!(Registration, Login, Refresh, Logout);

pub(crate) async fn register(
    State(state): State<Shared>,
    ctx: RequestContext,
    ClientKey(client): ClientKey,
    headers: HeaderMap,
    Json(body, raw): Json<Registration>,
) -> Response {
    idempotent(&state, &headers, &client, "register", &raw, |key| async {
        // With a key the new user's id is derived from it and the email
        // (not from the client's address, which a retry may not share: a
        // phone moving networks): a retry through another ingress copy,
        // which has not seen the key, gets the same account instead of
        // `email already registered`. Identity answers a repeat with the
        // account only when name and password match too, so knowing an
        // email and a key gives nothing a log-in would not.
        let user_id = key.map(|key| {
            derived_id(
                &format!("user {}", body.email.to_lowercase()),
                "any client",
                &key,
            )
        });
        let user = state
            .ask(&body.into_request(user_id), &ctx.message_context())
            .await?;
        let location = format!("/v1/users/{}/profile", user.id);
        Ok(with_header(
            json(StatusCode::CREATED, &user),
            header::LOCATION,
            &location,
        ))
    })
    .await
}

pub(crate) async fn token(
    State(state): State<Shared>,
    ctx: RequestContext,
    Json(body, _): Json<Login>,
) -> Result<Response, ApiError> {
    let query = IssueToken {
        email: body.email,
        password: body.password,
    };
    let pair = state.ask(&query, &ctx.message_context()).await?;
    Ok(with_header(
        json(StatusCode::OK, &pair),
        header::CACHE_CONTROL,
        "no-store",
    ))
}

pub(crate) async fn refresh(
    State(state): State<Shared>,
    ctx: RequestContext,
    Json(body, _): Json<Refresh>,
) -> Result<Response, ApiError> {
    let query = RefreshToken {
        refresh_token: body.refresh_token,
    };
    let pair = state.ask(&query, &ctx.message_context()).await?;
    Ok(with_header(
        json(StatusCode::OK, &pair),
        header::CACHE_CONTROL,
        "no-store",
    ))
}

pub(crate) async fn logout(
    State(state): State<Shared>,
    ctx: RequestContext,
    Json(body, _): Json<Logout>,
) -> Result<Response, ApiError> {
    let query = RevokeToken {
        refresh_token: body.refresh_token,
        everywhere: body.everywhere,
    };
    let revoked = state.ask(&query, &ctx.message_context()).await?;
    Ok(json(StatusCode::OK, &revoked))
}

pub(crate) async fn me(
    State(state): State<Shared>,
    ctx: RequestContext,
    User(caller): User,
) -> Result<Response, ApiError> {
    let query = GetUser {
        user_id: caller.user_id,
        caller,
    };
    let user = state.ask(&query, &ctx.message_context()).await?;
    Ok(json(StatusCode::OK, &user))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(password: String) -> Login {
        Login {
            email: "ada@example.org".into(),
            password,
        }
    }

    /// A log-in's password limit counts characters, as the schema's does (a
    /// multi-byte character is one), the same as registration's.
    #[test]
    fn a_log_in_password_s_length_is_counted_in_characters() {
        assert!(login("é".repeat(1024)).violations().is_empty());
        let long = login("é".repeat(1025)).violations();
        assert_eq!(long.len(), 1, "{long:?}");
        assert_eq!(long[0].field, "/password");
        assert_eq!(login(String::new()).violations().len(), 1);
    }
}
