//! [`SigningKey`]: the Ed25519 key identity signs access tokens with.
//!
//! Saved as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), so a key made with
//! `openssl genpkey -algorithm ed25519` works too. Its public half is a
//! SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`, RFC 8410), what
//! `openssl pkey -pubout` prints.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::EncodingKey;
use ring::signature::{Ed25519KeyPair, KeyPair};
use skein_contracts::identity::VerificationKey;

use crate::token::{Claims, ALGORITHM};
use crate::{AuthError, Result};

const PRIVATE_LABEL: &str = "PRIVATE KEY";
const PUBLIC_LABEL: &str = "PUBLIC KEY";

/// DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410) up to the 32 key bytes:
/// SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) ... }.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// An Ed25519 private key that signs access tokens (JWT `alg` `EdDSA`).
///
/// Only identity holds one. Its [`Debug`](std::fmt::Debug) shows the key id
/// and nothing secret.
pub struct SigningKey {
    pkcs8: Vec<u8>,
    encoding: EncodingKey,
    public: [u8; 32],
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<Self> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| AuthError::Crypto("cannot generate an Ed25519 key".into()))?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    /// Reads a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) of an Ed25519 key.
    pub fn from_pem(text: &str) -> Result<Self> {
        Self::from_pkcs8(unpem(PRIVATE_LABEL, text)?)
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self> {
        // "maybe unchecked" accepts PKCS#8 v1 (no public key inside, what
        // OpenSSL writes) as well as the v2 documents ring generates.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|e| AuthError::InvalidKey(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        let public: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| AuthError::InvalidKey("an Ed25519 public key has 32 bytes".into()))?;
        Ok(Self {
            encoding: EncodingKey::from_ed_der(&pkcs8),
            pkcs8,
            key_id: key_id(&public),
            public,
        })
    }

    /// The key as PKCS#8 PEM, to save. Secret: never log it.
    pub fn to_pem(&self) -> String {
        pem(PRIVATE_LABEL, &self.pkcs8)
    }

    /// The key id (`kid` of the tokens it signs), derived from the public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public half as SubjectPublicKeyInfo PEM.
    pub fn public_key_pem(&self) -> String {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&self.public);
        pem(PUBLIC_LABEL, &spki)
    }

    /// What verifiers need: the public key, its id, and the issuer and
    /// audience tokens must carry.
    pub fn verification_key(&self, issuer: &str, audience: &str) -> VerificationKey {
        VerificationKey {
            algorithm: ALGORITHM.into(),
            key_id: self.key_id.clone(),
            public_key_pem: self.public_key_pem(),
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }

    /// Signs `claims` into a compact JWT whose header carries this key's `kid`.
    pub fn issue(&self, claims: &Claims) -> Result<String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AuthError::Crypto(format!("cannot sign a token: {e}")))
    }
}

/// The key id of an Ed25519 public key: the first 96 bits of its SHA-256,
/// base64url (16 characters). Short, stable, and reveals nothing secret.
pub(crate) fn key_id(public: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public);
    URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12])
}

/// The verification keys of the Ed25519 public keys in `text`: any number of
/// SubjectPublicKeyInfo PEM blocks (`-----BEGIN PUBLIC KEY-----`, what
/// `openssl pkey -in KEY -pubout` prints), one after another, for tokens
/// with `issuer` and `audience`. Text outside the blocks is ignored; a
/// private key is refused, so that one is never published by mistake.
pub fn verification_keys_from_pem(
    text: &str,
    issuer: &str,
    audience: &str,
) -> Result<Vec<VerificationKey>> {
    // Every block must be a public key: any private key (PKCS#8, encrypted,
    // OpenSSH, ...) is refused, so that one is never handed around as a
    // verification key by mistake.
    for label in text
        .split("-----BEGIN ")
        .skip(1)
        .filter_map(|b| b.split_once("-----"))
    {
        if label.0 != PUBLIC_LABEL {
            return Err(AuthError::InvalidKey(if label.0.contains("PRIVATE") {
                "a private key where public keys go: give its public half (openssl pkey -in KEY -pubout)"
                    .into()
            } else {
                format!("a {} block where public keys go", label.0)
            }));
        }
    }
    let end = format!("-----END {PUBLIC_LABEL}-----");
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(stop) = rest.find(&end) {
        let block = &rest[..stop + end.len()];
        let public = public_key_from_pem(block)?;
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&public);
        keys.push(VerificationKey {
            algorithm: ALGORITHM.into(),
            key_id: key_id(&public),
            public_key_pem: pem(PUBLIC_LABEL, &spki),
            issuer: issuer.into(),
            audience: audience.into(),
        });
        rest = &rest[stop + end.len()..];
    }
    if rest.contains("-----BEGIN") {
        return Err(AuthError::InvalidKey(
            "a PEM block that is not a public key, or one without its END line".into(),
        ));
    }
    Ok(keys)
}

/// The 32 key bytes of an Ed25519 SubjectPublicKeyInfo PEM.
pub(crate) fn public_key_from_pem(text: &str) -> Result<[u8; 32]> {
    let der = unpem(PUBLIC_LABEL, text)?;
    der.strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(|raw| <[u8; 32]>::try_from(raw).ok())
        .ok_or_else(|| AuthError::InvalidKey("not an Ed25519 public key (RFC 8410)".into()))
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    // Base64 is ASCII, so every 64-byte chunk is a valid str.
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unpem(label: &str, text: &str) -> Result<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text
        .find(&begin)
        .ok_or_else(|| AuthError::InvalidKey(format!("no {begin} line")))?
        + begin.len();
    let stop = text[start..]
        .find(&end)
        .ok_or_else(|| AuthError::InvalidKey(format!("no {end} line")))?
        + start;
    let body: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD
        .decode(body)
        .map_err(|e| AuthError::InvalidKey(format!("bad base64 in the PEM: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with `openssl genpkey -algorithm ed25519`; a test key only.
    const OPENSSL_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIKbuexcIiN48e3/iL14P8Hz9JO3ziXkSqXsqEzScF9rF
-----END PRIVATE KEY-----
";
    /// `openssl pkey -in key.pem -pubout` of the key above.
    const OPENSSL_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAzZW/f/m+ITwpCIVqsrbjwD4G1UsEyA2s98YEaVsbuKE=
-----END PUBLIC KEY-----
";

    #[test]
    fn an_openssl_key_loads_and_its_public_half_matches_openssl() -> Result<()> {
        let key = SigningKey::from_pem(OPENSSL_KEY)?;
        assert_eq!(key.public_key_pem(), OPENSSL_PUBLIC);
        assert_eq!(key.key_id().len(), 16);
        Ok(())
    }

    #[test]
    fn a_saved_key_loads_with_the_same_id_and_public_key() -> Result<()> {
        let key = SigningKey::generate()?;
        let pem = key.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = SigningKey::from_pem(&pem)?;
        assert_eq!(again.key_id(), key.key_id());
        assert_eq!(again.public_key_pem(), key.public_key_pem());
        assert_ne!(SigningKey::generate()?.key_id(), key.key_id());
        assert_eq!(public_key_from_pem(&key.public_key_pem())?, key.public);
        Ok(())
    }

    #[test]
    fn keys_that_are_not_ed25519_are_refused() {
        for bad in [
            "",
            "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            OPENSSL_PUBLIC,
        ] {
            assert!(
                matches!(SigningKey::from_pem(bad), Err(AuthError::InvalidKey(_))),
                "{bad:?}"
            );
        }
        assert!(public_key_from_pem(OPENSSL_KEY).is_err());
        assert!(!format!("{:?}", SigningKey::from_pem(OPENSSL_KEY)).contains("MC4C"));
    }

    #[test]
    fn a_bundle_of_public_keys_reads_as_verification_keys_and_private_ones_are_refused(
    ) -> Result<()> {
        let other = SigningKey::generate()?;
        let bundle = format!(
            "# the next key\n{OPENSSL_PUBLIC}\n# the previous one\n{}",
            other.public_key_pem()
        );
        let keys = verification_keys_from_pem(&bundle, "iss", "aud")?;
        let openssl = SigningKey::from_pem(OPENSSL_KEY)?;
        assert_eq!(
            keys,
            vec![
                openssl.verification_key("iss", "aud"),
                other.verification_key("iss", "aud")
            ]
        );
        assert_eq!(verification_keys_from_pem("", "iss", "aud")?, vec![]);
        for bad in [
            format!("{OPENSSL_PUBLIC}{OPENSSL_KEY}"),
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_owned(),
            format!("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n{OPENSSL_PUBLIC}"),
            format!("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n{OPENSSL_PUBLIC}"),
            format!("{OPENSSL_PUBLIC}-----BEGIN PUBLIC KEY-----\nMCow"),
        ] {
            assert!(
                matches!(
                    verification_keys_from_pem(&bad, "iss", "aud"),
                    Err(AuthError::InvalidKey(_))
                ),
                "{bad:?}"
            );
        }
        Ok(())
    }
}
