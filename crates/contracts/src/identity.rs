//! identity: users, passwords and tokens.
//!
//! Identity signs access tokens (short-lived JWTs, EdDSA) and keeps refresh
//! tokens hashed. The ingress verifies tokens with the public key it gets
//! from [`GetVerificationKey`]; it never holds the signing key.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::validate::{is_email, is_text, Checker, Validate, Violation};
use crate::{Caller, Role};

/// The service name.
pub const SERVICE: &str = "identity";

/// Shortest accepted password.
pub const MIN_PASSWORD_LEN: usize = 10;

/// A user as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct User {
    /// User id.
    pub id: Uuid,
    /// Email, lower-cased.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// RFC 3339.
    pub created_at: String,
}

/// Registers a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Email, unique (case-insensitive).
    #[validate(email)]
    pub email: String,
    /// Password, at least 10 characters.
    #[validate(length(min = 10, max = 1024))]
    pub password: String,
    /// Display name, 1 to 100 characters.
    #[validate(length(min = 1, max = 100))]
    pub name: String,
    /// The new user's id, when the caller chooses it (the ingress derives
    /// it from an `Idempotency-Key`): registering again with this id, email,
    /// name and password answers that user instead of `email already
    /// registered`. Without it identity picks a new id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
}
contract!(query Register, "identity", "register", v 1, reply = User);

impl Validate for Register {
    fn violations(&self) -> Vec<Violation> {
        Checker::default()
            .check(is_email(&self.email), "/email", "must be an email address")
            .check(
                (MIN_PASSWORD_LEN..=1024).contains(&self.password.chars().count()),
                "/password",
                format!("must be {MIN_PASSWORD_LEN} to 1024 characters"),
            )
            .check(
                is_text(&self.name, 100),
                "/name",
                "must be 1 to 100 characters",
            )
            .finish()
    }
}

/// Logs in: email and password for a token pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueToken {
    /// Email.
    pub email: String,
    /// Password.
    pub password: String,
}
contract!(query IssueToken, "identity", "issue_token", v 1, reply = TokenPair);

/// Exchanges a refresh token for a new pair; the old refresh token stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshToken {
    /// The refresh token.
    pub refresh_token: String,
}
contract!(query RefreshToken, "identity", "refresh_token", v 1, reply = TokenPair);

/// Logs out: revokes the login a refresh token belongs to (that token and
/// every token refreshed from the same log-in), or with `everywhere` every
/// login of its user. Access tokens already issued stay valid until they
/// expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeToken {
    /// A refresh token of the login to end; for `everywhere`, the newest of
    /// its login (not exchanged for another, not expired).
    pub refresh_token: String,
    /// End every login of the token's user, not only this one.
    #[serde(default)]
    pub everywhere: bool,
}
contract!(query RevokeToken, "identity", "revoke_token", v 1, reply = Revoked);

/// What a log-out revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// Refresh tokens that stopped working (0 for a token unknown, or one
    /// whose login had ended already).
    pub revoked: u64,
}

/// An access token and a refresh token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TokenPair {
    /// Signed JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Opaque refresh token, single use.
    pub refresh_token: String,
}

/// A user (self or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetUser {
    /// Who asks.
    pub caller: Caller,
    /// The user.
    pub user_id: Uuid,
}
contract!(query GetUser, "identity", "get_user", v 1, reply = User);

/// The public key that verifies access tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetVerificationKey {}
contract!(query GetVerificationKey, "identity", "verification_key", v 1, reply = VerificationKey);

/// Every public key that verifies access tokens now: the signing key's,
/// and those configured besides it for a rotation (the next key before
/// identity signs with it, the previous one until its tokens expire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetVerificationKeys {}
contract!(query GetVerificationKeys, "identity", "verification_keys", v 1, reply = VerificationKeys);

/// The answer to `verification_keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VerificationKeys {
    /// The keys, the one tokens are signed with now first; key ids unique.
    pub keys: Vec<VerificationKey>,
}

/// A token verification key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VerificationKey {
    /// JWT algorithm, `EdDSA`.
    pub algorithm: String,
    /// Key id, the `kid` of tokens it verifies.
    pub key_id: String,
    /// Public key, PEM.
    pub public_key_pem: String,
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
}

/// A user registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserRegistered {
    /// User id.
    pub user_id: Uuid,
    /// Email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Role.
    pub role: Role,
}
contract!(event UserRegistered, "identity", "user_registered", v 1, entity = user_id);

#[cfg(test)]
mod tests {
    use super::*;

    fn register(password: String) -> Register {
        Register {
            email: "ada@example.org".into(),
            password,
            name: "Ada".into(),
            user_id: None,
        }
    }

    /// The password's limits count characters, as the schema's do (a
    /// multi-byte character is one).
    #[test]
    fn a_password_s_length_is_counted_in_characters() {
        assert!(register("é".repeat(600)).violations().is_empty());
        assert!(register("é".repeat(1024)).violations().is_empty());
        let long = register("é".repeat(1025)).violations();
        assert_eq!(long.len(), 1, "{long:?}");
        assert_eq!(long[0].field, "/password");
        assert_eq!(register("é".repeat(9)).violations().len(), 1);
    }
}
