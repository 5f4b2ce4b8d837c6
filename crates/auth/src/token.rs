//! Access tokens: [`Claims`], and the [`Verifier`] that checks them.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use skein_contracts::identity::VerificationKey;
use skein_contracts::Role;
use uuid::Uuid;

use crate::keys::{key_id, public_key_from_pem};
use crate::{AuthError, Result};

/// The one JWT algorithm skein issues and accepts.
pub const ALGORITHM: &str = "EdDSA";

/// Clock skew tolerated between the issuer and a verifier, in seconds, on
/// `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;

/// Longest token a verifier looks at; skein's are about 400 bytes.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What an access token says about its bearer: the JWT payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// The user's role.
    pub role: Role,
    /// Issuer (`skein`).
    pub iss: String,
    /// Audience (`skein-api`).
    pub aud: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    /// Token id, unique per token.
    pub jti: Uuid,
}

impl Claims {
    /// Claims for `user`, issued now and valid for `ttl`.
    pub fn new(user: Uuid, role: Role, issuer: &str, audience: &str, ttl: Duration) -> Self {
        let iat = now();
        Self {
            sub: user,
            role,
            iss: issuer.into(),
            aud: audience.into(),
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
            jti: Uuid::now_v7(),
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The part of a JWT header a verifier decides on before anything else.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// Verifies access tokens with a public key only.
///
/// Checks, in this order: the header's `alg` is `EdDSA` (never `none` or an
/// HMAC keyed with the public key), its `kid` is this key's, the signature,
/// then `exp` / `nbf` / `iat` (with [`LEEWAY_SECS`]), `iss` and `aud`.
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
    /// A verifier for tokens signed with `key`, for its issuer and audience.
    ///
    /// Refuses a key that is not an Ed25519 public key, names another
    /// algorithm, or whose key id does not belong to its public key.
    pub fn new(key: &VerificationKey) -> Result<Self> {
        if key.algorithm != ALGORITHM {
            return Err(AuthError::InvalidKey(format!(
                "algorithm {:?} is not supported, only {ALGORITHM}",
                key.algorithm
            )));
        }
        let public = public_key_from_pem(&key.public_key_pem)?;
        if key_id(&public) != key.key_id {
            return Err(AuthError::InvalidKey(format!(
                "key id {:?} does not belong to this public key",
                key.key_id
            )));
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[&key.audience]);
        validation.set_issuer(&[&key.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Ok(Self {
            // For Ed25519 the "DER" jsonwebtoken wants is the raw 32-byte key.
            key: DecodingKey::from_ed_der(&public),
            key_id: key.key_id.clone(),
            validation,
        })
    }

    /// The key id this verifier accepts.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The claims of `token` if it is valid now.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        use jsonwebtoken::errors::ErrorKind as K;
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("too long".into()));
        }
        let header = raw_header(token)?;
        if header.alg != ALGORITHM {
            return Err(AuthError::WrongAlgorithm(header.alg));
        }
        if header.kid.as_deref() != Some(self.key_id.as_str()) {
            return Err(AuthError::UnknownKey);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidSignature => AuthError::BadSignature,
                K::InvalidAudience => AuthError::WrongAudience,
                K::InvalidIssuer => AuthError::WrongIssuer,
                K::InvalidAlgorithm => AuthError::WrongAlgorithm(header.alg.clone()),
                _ => AuthError::Malformed(e.to_string()),
            })?;
        if claims.iat > now().saturating_add(LEEWAY_SECS) {
            return Err(AuthError::NotYetValid);
        }
        Ok(claims)
    }
}

fn raw_header(token: &str) -> Result<RawHeader> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("not three dot-separated parts".into()));
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| AuthError::Malformed(format!("header is not base64url: {e}")))?;
    serde_json::from_slice(&json)
        .map_err(|e| AuthError::Malformed(format!("header is not a JWT header: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SigningKey;

    const ISS: &str = "skein";
    const AUD: &str = "skein-api";

    fn setup() -> Result<(SigningKey, Verifier)> {
        let key = SigningKey::generate()?;
        let verifier = Verifier::new(&key.verification_key(ISS, AUD))?;
        Ok((key, verifier))
    }

    fn claims(role: Role) -> Claims {
        Claims::new(Uuid::now_v7(), role, ISS, AUD, Duration::from_secs(900))
    }

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    /// `token` with its payload replaced by `payload` (signature kept).
    fn with_payload(token: &str, payload: &Claims) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        let json = serde_json::to_string(payload).unwrap_or_default();
        format!("{}.{}.{}", parts[0], b64(&json), parts[2])
    }

    #[test]
    fn a_token_round_trips_with_its_kid() -> Result<()> {
        let (key, verifier) = setup()?;
        let claims = claims(Role::Admin);
        let token = key.issue(&claims)?;
        assert_eq!(verifier.verify(&token)?, claims);
        assert_eq!(claims.exp - claims.iat, 900);
        let header =
            jsonwebtoken::decode_header(&token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some(key.key_id()));
        // A reloaded key signs tokens the same verifier accepts.
        let reloaded = SigningKey::from_pem(&key.to_pem())?;
        assert_eq!(verifier.verify(&reloaded.issue(&claims)?)?, claims);
        Ok(())
    }

    #[test]
    fn an_expired_token_is_refused_beyond_the_leeway() -> Result<()> {
        let (key, verifier) = setup()?;
        let mut old = claims(Role::Customer);
        old.iat = now() - 1000;
        old.exp = now() - LEEWAY_SECS - 5;
        assert!(matches!(
            verifier.verify(&key.issue(&old)?),
            Err(AuthError::Expired)
        ));
        // Within the leeway it still passes (clocks drift).
        old.exp = now() - 2;
        assert!(verifier.verify(&key.issue(&old)?).is_ok());
        Ok(())
    }

    #[test]
    fn a_token_from_the_future_is_refused() -> Result<()> {
        let (key, verifier) = setup()?;
        let mut future = claims(Role::Customer);
        future.iat = now() + 3600;
        future.exp = now() + 7200;
        assert!(matches!(
            verifier.verify(&key.issue(&future)?),
            Err(AuthError::NotYetValid)
        ));
        Ok(())
    }

    #[test]
    fn a_tampered_token_is_refused() -> Result<()> {
        let (key, verifier) = setup()?;
        let mine = claims(Role::Customer);
        let token = key.issue(&mine)?;
        let promoted = Claims {
            role: Role::Admin,
            ..mine.clone()
        };
        assert!(matches!(
            verifier.verify(&with_payload(&token, &promoted)),
            Err(AuthError::BadSignature)
        ));
        // A flipped signature byte, too.
        let (body, signature) = token.rsplit_once('.').unwrap_or_default();
        let mut sig = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|e| AuthError::Malformed(e.to_string()))?;
        sig[0] ^= 1;
        let flipped = format!("{body}.{}", URL_SAFE_NO_PAD.encode(sig));
        assert!(matches!(
            verifier.verify(&flipped),
            Err(AuthError::BadSignature)
        ));
        Ok(())
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() -> Result<()> {
        let (_, verifier) = setup()?;
        let other = SigningKey::generate()?;
        assert!(matches!(
            verifier.verify(&other.issue(&claims(Role::Admin))?),
            Err(AuthError::UnknownKey)
        ));
        // Another key that claims our kid: the signature gives it away.
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(verifier.key_id().to_owned());
        let forged = jsonwebtoken::encode(
            &header,
            &claims(Role::Admin),
            &jsonwebtoken::EncodingKey::from_ed_pem(other.to_pem().as_bytes())
                .map_err(|e| AuthError::InvalidKey(e.to_string()))?,
        )
        .map_err(|e| AuthError::Crypto(e.to_string()))?;
        assert!(matches!(
            verifier.verify(&forged),
            Err(AuthError::BadSignature)
        ));
        Ok(())
    }

    #[test]
    fn a_token_for_another_audience_or_issuer_is_refused() -> Result<()> {
        let (key, verifier) = setup()?;
        let elsewhere = Claims {
            aud: "other-api".into(),
            ..claims(Role::Admin)
        };
        assert!(matches!(
            verifier.verify(&key.issue(&elsewhere)?),
            Err(AuthError::WrongAudience)
        ));
        let stranger = Claims {
            iss: "someone-else".into(),
            ..claims(Role::Admin)
        };
        assert!(matches!(
            verifier.verify(&key.issue(&stranger)?),
            Err(AuthError::WrongIssuer)
        ));
        Ok(())
    }

    #[test]
    fn alg_none_and_hmac_with_the_public_key_are_refused() -> Result<()> {
        let (key, verifier) = setup()?;
        let payload = b64(&serde_json::to_string(&claims(Role::Admin)).unwrap_or_default());
        let kid = key.key_id();
        for alg in ["none", "None", "NONE"] {
            let header = b64(&format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}"}}"#));
            for token in [
                format!("{header}.{payload}."),
                format!("{header}.{payload}.c2ln"),
            ] {
                assert!(
                    matches!(verifier.verify(&token), Err(AuthError::WrongAlgorithm(ref a)) if a == alg),
                    "{token}"
                );
            }
        }
        // The classic confusion attack: HS256 keyed with the public key PEM.
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some(kid.to_owned());
        let hmac = jsonwebtoken::encode(
            &header,
            &claims(Role::Admin),
            &jsonwebtoken::EncodingKey::from_secret(key.public_key_pem().as_bytes()),
        )
        .map_err(|e| AuthError::Crypto(e.to_string()))?;
        assert!(matches!(
            verifier.verify(&hmac),
            Err(AuthError::WrongAlgorithm(ref a)) if a == "HS256"
        ));
        Ok(())
    }

    #[test]
    fn garbage_is_malformed() -> Result<()> {
        let (key, verifier) = setup()?;
        let token = key.issue(&claims(Role::Customer))?;
        for bad in [
            String::new(),
            "not a token".into(),
            "a.b".into(),
            format!("{token}.extra"),
            format!("!!.{}", &token[token.find('.').unwrap_or(0) + 1..]),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(verifier.verify(&bad), Err(AuthError::Malformed(_))),
                "{bad:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_verification_key_must_be_consistent() -> Result<()> {
        let key = SigningKey::generate()?;
        let good = key.verification_key(ISS, AUD);
        let wrong_alg = VerificationKey {
            algorithm: "RS256".into(),
            ..good.clone()
        };
        let wrong_kid = VerificationKey {
            key_id: SigningKey::generate()?.key_id().to_owned(),
            ..good.clone()
        };
        let not_a_key = VerificationKey {
            public_key_pem: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----".into(),
            ..good.clone()
        };
        for bad in [wrong_alg, wrong_kid, not_a_key] {
            assert!(matches!(Verifier::new(&bad), Err(AuthError::InvalidKey(_))));
        }
        assert!(Verifier::new(&good).is_ok());
        Ok(())
    }

    #[test]
    fn token_errors_are_told_apart_from_server_errors() {
        assert!(AuthError::Expired.is_token_error());
        assert!(AuthError::WrongAlgorithm("none".into()).is_token_error());
        assert!(!AuthError::InvalidKey("x".into()).is_token_error());
        assert!(!AuthError::Crypto("x".into()).is_token_error());
    }
}
