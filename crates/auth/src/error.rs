//! [`AuthError`]: why a token, key or password operation failed.

/// Why a token was refused, or a key or hash could not be made.
///
/// The token variants ([`AuthError::is_token_error`]) are the caller's fault
/// (answer 401); the others are the server's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token's `exp` has passed (beyond the leeway).
    #[error("the token has expired")]
    Expired,
    /// The token's `nbf` or `iat` lies in the future (beyond the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// The signature does not match the header and payload: tampered.
    #[error("the token signature is invalid")]
    BadSignature,
    /// The token was issued for another audience (`aud`).
    #[error("the token was not issued for this audience")]
    WrongAudience,
    /// The token was issued by someone else (`iss`).
    #[error("the token was not issued by this issuer")]
    WrongIssuer,
    /// The header names an algorithm other than `EdDSA` (`none`, `HS256` ...).
    #[error("the token algorithm {0:?} is not accepted")]
    WrongAlgorithm(String),
    /// The header names no key id, or one this verifier does not hold:
    /// signed by another (or a rotated-out) key.
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    /// Not a JWT, or its header or claims are not what skein issues.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// A key could not be read (not an Ed25519 PKCS#8 / SPKI PEM), or a
    /// verification key names an unsupported algorithm.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// Signing, hashing or the random source failed.
    #[error("cryptography failed: {0}")]
    Crypto(String),
}

impl AuthError {
    /// Whether the token was refused (the caller's fault: 401), rather than
    /// the server failing.
    pub fn is_token_error(&self) -> bool {
        !matches!(self, AuthError::InvalidKey(_) | AuthError::Crypto(_))
    }
}

/// Result of this crate.
pub type Result<T, E = AuthError> = std::result::Result<T, E>;
