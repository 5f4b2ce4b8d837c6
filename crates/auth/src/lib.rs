//! Tokens and passwords for skein.
//!
//! Identity signs short-lived access tokens; every other component (the HTTP
//! ingress first) only verifies them, with the public key identity publishes
//! ([`VerificationKey`], answered by identity's `verification_key` query).
//! Nothing but identity ever holds a [`SigningKey`].
//!
//! Access tokens are JWTs signed with Ed25519 (`alg` `EdDSA`), with the key id
//! in the header (`kid`) and [`Claims`] as payload. A [`Verifier`] pins the
//! algorithm, so `none`, `HS256` signed with the public key and every other
//! algorithm-confusion trick is refused before any signature is checked.
//!
//! # Layout
//!
//! - [`keys`]: [`SigningKey`]: generate, save and load (PKCS#8 PEM, the same
//!   format `openssl genpkey -algorithm ed25519` writes), its key id and its
//!   public half.
//! - [`token`]: [`Claims`], issuing ([`SigningKey::issue`]) and verifying
//!   ([`Verifier::verify`]).
//! - [`password`]: [`hash_password`] / [`verify_password`], argon2id in PHC
//!   strings.
//! - [`refresh`]: [`new_refresh_token`] / [`hash_refresh_token`], opaque
//!   refresh tokens stored only as their SHA-256.
//! - [`error`]: [`AuthError`], one variant per reason a token is refused.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use skein_auth::{AuthError, Claims, SigningKey, Verifier};
//! use skein_contracts::Role;
//!
//! # fn main() -> Result<(), AuthError> {
//! // identity
//! let key = SigningKey::generate()?;
//! let published = key.verification_key("skein", "skein-api");
//! let claims = Claims::new(uuid::Uuid::now_v7(), Role::Customer, "skein", "skein-api", Duration::from_secs(900));
//! let token = key.issue(&claims)?;
//!
//! // ingress: only the public key
//! let verifier = Verifier::new(&published)?;
//! assert_eq!(verifier.verify(&token)?, claims);
//! // {"alg":"none"}, no signature
//! let unsigned = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
//! assert!(matches!(verifier.verify(unsigned), Err(AuthError::WrongAlgorithm(_))));
//! # Ok(())
//! # }
//! ```

pub mod error;
pub mod keys;
pub mod password;
pub mod refresh;
pub mod token;

pub use error::{AuthError, Result};
pub use keys::{verification_keys_from_pem, SigningKey};
pub use password::{hash_password, random_password, verify_password};
pub use refresh::{hash_refresh_token, new_refresh_token};
pub use skein_contracts::identity::VerificationKey;
pub use token::{Claims, Verifier, ALGORITHM, LEEWAY_SECS};

/// Fills `buf` from the operating system's secure random source.
fn random(buf: &mut [u8], what: &'static str) -> Result<()> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| AuthError::Crypto(format!("no randomness for {what}")))
}
