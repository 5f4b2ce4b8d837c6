//! Passwords: argon2id hashes in PHC strings.
//!
//! Parameters are the OWASP recommendation for argon2id (19 MiB, 2 passes,
//! 1 lane); the PHC string records them, so a hash stays verifiable after the
//! defaults change. Hashing takes tens of milliseconds on purpose: call it
//! from a blocking thread (`tokio::task::spawn_blocking`), not an async task.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::{random, AuthError, Result};

fn argon2id() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::default())
}

/// Hashes `password` with argon2id and a fresh random 128-bit salt, as a
/// PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`).
pub fn hash_password(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    random(&mut salt, "a salt")?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Crypto(e.to_string()))?;
    argon2id()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Crypto(format!("cannot hash a password: {e}")))
}

/// Whether `password` matches `hash` (from [`hash_password`]). The final
/// comparison is constant-time; a hash that does not parse matches nothing.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            argon2id()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A random password of 24 URL-safe characters (144 bits), for generated
/// accounts such as the first admin.
pub fn random_password() -> Result<String> {
    let mut bytes = [0u8; 18];
    random(&mut bytes, "a password")?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_only_against_its_own_hash() -> Result<()> {
        let hash = hash_password("correct horse battery")?;
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("", &hash));
        assert!(!verify_password("correct horse battery", "not a hash"));
        assert!(!verify_password("correct horse battery", ""));
        let again = hash_password("correct horse battery")?;
        assert_ne!(hash, again, "every hash has its own salt");
        assert!(verify_password("correct horse battery", &again));
        Ok(())
    }

    #[test]
    fn generated_passwords_are_long_and_different() -> Result<()> {
        let a = random_password()?;
        assert_eq!(a.len(), 24);
        assert_ne!(a, random_password()?);
        Ok(())
    }
}
