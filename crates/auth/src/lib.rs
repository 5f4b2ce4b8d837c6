//! Tokens and passwords for skein.
//!
//! - [`SigningKey`]: an Ed25519 key (JWT `EdDSA`) that identity signs access
//!   tokens with; generated, saved and loaded as PKCS#8 PEM. Its public half
//!   ([`SigningKey::verification_key`]) is all the ingress holds.
//! - [`Verifier`]: checks a token's signature, algorithm, key id, issuer,
//!   audience and expiry, and returns its [`Claims`].
//! - [`hash_password`] / [`verify_password`]: argon2id in PHC strings.
//! - [`new_refresh_token`] / [`hash_refresh_token`]: opaque single-use
//!   refresh tokens, stored only as their SHA-256.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use skein_contracts::identity::VerificationKey;
use skein_contracts::Role;
use uuid::Uuid;

/// What a token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// The user's role.
    pub role: Role,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expires at, seconds since the epoch.
    pub exp: u64,
    /// Token id.
    pub jti: Uuid,
}

/// Why a token or key was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// The signature does not match (tampered, or another key).
    #[error("the token signature is invalid")]
    BadSignature,
    /// The token was issued for another audience or by another issuer.
    #[error("the token was not issued for this API")]
    WrongAudience,
    /// The token names a key this verifier does not have.
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    /// The token is not a well-formed EdDSA JWT.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// A key could not be read or created.
    #[error("invalid key: {0}")]
    Key(String),
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const PRIVATE_PEM: &str = "PRIVATE KEY";
const PUBLIC_PEM: &str = "PUBLIC KEY";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410) before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn unpem(label: &str, text: &str) -> Result<Vec<u8>, AuthError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text
        .find(&begin)
        .ok_or_else(|| AuthError::Key(format!("no {begin} block")))?
        + begin.len();
    let stop = text[start..]
        .find(&end)
        .ok_or_else(|| AuthError::Key(format!("no {end} line")))?
        + start;
    let body: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD
        .decode(body)
        .map_err(|e| AuthError::Key(format!("bad base64 in PEM: {e}")))
}

/// An Ed25519 signing key.
pub struct SigningKey {
    pkcs8: Vec<u8>,
    encoding: EncodingKey,
    public: Vec<u8>,
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<Self, AuthError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| AuthError::Key("cannot generate an Ed25519 key".into()))?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    /// Reads a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(text: &str) -> Result<Self, AuthError> {
        Self::from_pkcs8(unpem(PRIVATE_PEM, text)?)
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, AuthError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|e| AuthError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        let public = pair.public_key().as_ref().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, &public);
        let key_id = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]);
        Ok(Self {
            encoding: EncodingKey::from_ed_der(&pkcs8),
            pkcs8,
            public,
            key_id,
        })
    }

    /// The key as PKCS#8 PEM, to save.
    pub fn to_pem(&self) -> String {
        pem(PRIVATE_PEM, &self.pkcs8)
    }

    /// The key id (`kid`), derived from the public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public half, for verifiers.
    pub fn verification_key(&self, issuer: &str, audience: &str) -> VerificationKey {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&self.public);
        VerificationKey {
            algorithm: "EdDSA".into(),
            key_id: self.key_id.clone(),
            public_key_pem: pem(PUBLIC_PEM, &spki),
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }

    /// Signs `claims` into a JWT with this key's `kid`.
    pub fn issue(&self, claims: &Claims) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AuthError::Key(e.to_string()))
    }

    /// Claims for `user`, valid for `ttl_secs` from now.
    pub fn claims(user: Uuid, role: Role, issuer: &str, audience: &str, ttl_secs: u64) -> Claims {
        let iat = now();
        Claims {
            sub: user,
            role,
            iss: issuer.into(),
            aud: audience.into(),
            iat,
            exp: iat + ttl_secs,
            jti: Uuid::now_v7(),
        }
    }
}

/// Verifies access tokens with a public key.
pub struct Verifier {
    key: DecodingKey,
    key_id: String,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for tokens signed by `key`, for its issuer and audience.
    pub fn new(key: &VerificationKey) -> Result<Self, AuthError> {
        if key.algorithm != "EdDSA" {
            return Err(AuthError::Key(format!(
                "unsupported algorithm {}",
                key.algorithm
            )));
        }
        let decoding = DecodingKey::from_ed_pem(key.public_key_pem.as_bytes())
            .map_err(|e| AuthError::Key(e.to_string()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[&key.audience]);
        validation.set_issuer(&[&key.issuer]);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(Self {
            key: decoding,
            key_id: key.key_id.clone(),
            validation,
        })
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Malformed(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        if header.kid.as_deref() != Some(self.key_id.as_str()) {
            return Err(AuthError::UnknownKey);
        }
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                K::ExpiredSignature => AuthError::Expired,
                K::InvalidSignature => AuthError::BadSignature,
                K::InvalidAudience | K::InvalidIssuer => AuthError::WrongAudience,
                _ => AuthError::Malformed(e.to_string()),
            })
    }
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| AuthError::Key("no randomness for a salt".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Key(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Key(e.to_string()))
}

/// Whether `password` matches a hash from [`hash_password`] (constant time).
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash)
        .map(|parsed| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A new refresh token and the hash to store for it.
pub fn new_refresh_token() -> Result<(String, String), AuthError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthError::Key("no randomness for a token".into()))?;
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_refresh_token(&token);
    Ok((token, hash))
}

/// The stored form of a refresh token: its SHA-256, hex.
pub fn hash_refresh_token(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A random password of 20 URL-safe characters.
pub fn random_password() -> Result<String, AuthError> {
    let mut bytes = [0u8; 15];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthError::Key("no randomness for a password".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> Result<(SigningKey, Verifier), AuthError> {
        let key = SigningKey::generate()?;
        let verifier = Verifier::new(&key.verification_key("skein", "skein-api"))?;
        Ok((key, verifier))
    }

    #[test]
    fn a_token_round_trips_and_a_saved_key_signs_the_same() -> Result<(), AuthError> {
        let (key, verifier) = pair()?;
        let claims = SigningKey::claims(Uuid::now_v7(), Role::Admin, "skein", "skein-api", 60);
        assert_eq!(verifier.verify(&key.issue(&claims)?)?, claims);
        let reloaded = SigningKey::from_pem(&key.to_pem())?;
        assert_eq!(reloaded.key_id(), key.key_id());
        assert_eq!(verifier.verify(&reloaded.issue(&claims)?)?, claims);
        Ok(())
    }

    #[test]
    fn expired_tampered_foreign_and_misaddressed_tokens_are_refused() -> Result<(), AuthError> {
        let (key, verifier) = pair()?;
        let mut old = SigningKey::claims(Uuid::now_v7(), Role::Customer, "skein", "skein-api", 60);
        old.exp = now() - 60;
        assert!(matches!(
            verifier.verify(&key.issue(&old)?),
            Err(AuthError::Expired)
        ));

        let good = key.issue(&SigningKey::claims(
            Uuid::now_v7(),
            Role::Customer,
            "skein",
            "skein-api",
            60,
        ))?;
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let forged = SigningKey::claims(Uuid::now_v7(), Role::Admin, "skein", "skein-api", 60);
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json_bytes(&forged));
        assert!(matches!(
            verifier.verify(&parts.join(".")),
            Err(AuthError::BadSignature)
        ));

        let other = SigningKey::generate()?;
        let foreign = other.issue(&SigningKey::claims(
            Uuid::now_v7(),
            Role::Admin,
            "skein",
            "skein-api",
            60,
        ))?;
        assert!(matches!(
            verifier.verify(&foreign),
            Err(AuthError::UnknownKey)
        ));

        let elsewhere = key.issue(&SigningKey::claims(
            Uuid::now_v7(),
            Role::Admin,
            "skein",
            "other-api",
            60,
        ))?;
        assert!(matches!(
            verifier.verify(&elsewhere),
            Err(AuthError::WrongAudience)
        ));

        // alg "none": header {"alg":"none"} and no signature.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(verifier.verify(&none).is_err());
        assert!(matches!(
            verifier.verify("not a token"),
            Err(AuthError::Malformed(_))
        ));
        Ok(())
    }

    fn serde_json_bytes(claims: &Claims) -> Vec<u8> {
        // Minimal JSON without pulling serde_json into the library.
        format!(
            r#"{{"sub":"{}","role":"admin","iss":"{}","aud":"{}","iat":{},"exp":{},"jti":"{}"}}"#,
            claims.sub, claims.iss, claims.aud, claims.iat, claims.exp, claims.jti
        )
        .into_bytes()
    }

    #[test]
    fn passwords_verify_only_against_their_hash() -> Result<(), AuthError> {
        let hash = hash_password("correct horse battery")?;
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("wrong horse battery", &hash));
        assert!(!verify_password("correct horse battery", "not a hash"));
        assert_ne!(
            hash,
            hash_password("correct horse battery")?,
            "salts must differ"
        );
        Ok(())
    }

    #[test]
    fn refresh_tokens_are_random_and_stored_hashed() -> Result<(), AuthError> {
        let (a, ha) = new_refresh_token()?;
        let (b, _) = new_refresh_token()?;
        assert_ne!(a, b);
        assert_eq!(hash_refresh_token(&a), ha);
        assert_eq!(ha.len(), 64);
        assert!(random_password()?.len() >= 16);
        Ok(())
    }
}
