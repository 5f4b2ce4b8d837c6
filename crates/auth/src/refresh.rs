//! Refresh tokens: 256 random bits, base64url; stored only as their SHA-256.
//!
//! A refresh token is a bearer secret with a long life, so the database keeps
//! its hash: a leaked table does not let anyone refresh. The hash need not be
//! slow (unlike a password's): the token already has 256 bits of entropy.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::{random, Result};

/// A new refresh token (43 URL-safe characters) and the hash to store for it
/// ([`hash_refresh_token`] of the token).
pub fn new_refresh_token() -> Result<(String, String)> {
    let mut bytes = [0u8; 32];
    random(&mut bytes, "a refresh token")?;
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_refresh_token(&token);
    Ok((token, hash))
}

/// The stored form of a refresh token: its SHA-256, 64 lower-case hex digits.
pub fn hash_refresh_token(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_are_random_and_stored_as_their_sha256() -> crate::Result<()> {
        let (a, hash) = new_refresh_token()?;
        let (b, _) = new_refresh_token()?;
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash_refresh_token(&a), hash);
        assert_ne!(hash_refresh_token(&b), hash);
        // SHA-256("abc"), FIPS 180-2.
        assert_eq!(
            hash_refresh_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        Ok(())
    }
}
