//! The signing key: from the configuration, from the key directory, or new.
//!
//! Every copy of identity must sign with the same key, or tokens from one
//! copy fail at an ingress that fetched the other's verification key: give
//! copies the same [`IdentityConfig::signing_key_pem`] or a shared
//! [`IdentityConfig::key_dir`].

use std::io::Write;
use std::path::{Path, PathBuf};

use skein_auth::{verification_keys_from_pem, AuthError, SigningKey, VerificationKey};

use crate::IdentityConfig;

/// File name of the key in the key directory. Renaming it makes identity
/// generate a new key, and every token issued before stops verifying.
pub const KEY_FILE: &str = "identity-signing-key.pem";

/// File name, in the key directory, of more public keys that verify tokens
/// (a rotation's next or previous key).
pub const VERIFICATION_KEYS_FILE: &str = "identity-verification-keys.pem";

/// Why the signing key could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The configured PEM is not an Ed25519 PKCS#8 key.
    #[error("the configured signing key is unusable")]
    Configured(#[source] AuthError),
    /// The key file is not an Ed25519 PKCS#8 key.
    #[error("the signing key in {path} is unusable")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: AuthError,
    },
    /// Reading or writing the key directory failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was tried.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No key could be generated.
    #[error("cannot generate a signing key")]
    Generate(#[source] AuthError),
    /// The verification keys configured or in the key directory are not
    /// Ed25519 public keys.
    #[error("the verification keys in {from} are unusable")]
    Verification {
        /// `SKEIN_VERIFICATION_KEYS_PEM` or the file.
        from: String,
        /// Why.
        #[source]
        source: AuthError,
    },
}

/// Every key that verifies tokens: `signing`'s first, then those of
/// [`IdentityConfig::verification_keys_pem`] and of
/// `<key_dir>/identity-verification-keys.pem` (when it exists), each key id
/// once.
pub fn verification_keys(
    config: &IdentityConfig,
    signing: &SigningKey,
) -> Result<Vec<VerificationKey>, KeyError> {
    let mut keys = vec![signing.verification_key(&config.issuer, &config.audience)];
    let mut more = |text: &str, from: String| {
        let found = verification_keys_from_pem(text, &config.issuer, &config.audience)
            .map_err(|source| KeyError::Verification { from, source })?;
        for key in found {
            if !keys.iter().any(|k| k.key_id == key.key_id) {
                keys.push(key);
            }
        }
        Ok::<_, KeyError>(())
    };
    if let Some(pem) = &config.verification_keys_pem {
        more(pem, "SKEIN_VERIFICATION_KEYS_PEM".into())?;
    }
    if let Some(dir) = &config.key_dir {
        let path = dir.join(VERIFICATION_KEYS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => more(&text, path.display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("read", &path)(e)),
        }
    }
    Ok(keys)
}

/// The key from [`IdentityConfig::signing_key_pem`]; else the one in
/// `<key_dir>/identity-signing-key.pem`, generated and saved there (mode 0600)
/// on first start; else, with neither, a new key kept in memory only.
pub fn load_or_create(config: &IdentityConfig) -> Result<SigningKey, KeyError> {
    if let Some(pem) = &config.signing_key_pem {
        return SigningKey::from_pem(pem).map_err(KeyError::Configured);
    }
    let Some(dir) = &config.key_dir else {
        tracing::warn!(
            "no key directory: the token signing key lives in memory and tokens stop verifying after a restart"
        );
        return SigningKey::generate().map_err(KeyError::Generate);
    };
    get_or_create_key_file(&dir.join(KEY_FILE))
}

/// Loads the key at `path`, or generates one and saves it there.
///
/// The new file appears complete or not at all (written aside, then linked
/// into place), and linking fails if another process got there first, in
/// which case that process's key is used: copies starting together on a
/// shared directory end up with one key.
pub fn get_or_create_key_file(path: &Path) -> Result<SigningKey, KeyError> {
    if let Some(key) = read_key(path)? {
        return Ok(key);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let key = SigningKey::generate().map_err(KeyError::Generate)?;
    // A random name: copies on other hosts sharing the directory may have
    // the same process id.
    let tmp = path.with_extension(format!("pem.{}.tmp", uuid::Uuid::now_v7().simple()));
    if let Err(e) = write_private(&tmp, key.to_pem().as_bytes()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), key_id = key.key_id(), "generated a token signing key");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key(path)?.ok_or_else(|| io("read", path)(std::io::ErrorKind::NotFound.into()))
        }
        Err(e) => Err(io("create", path)(e)),
    }
}

fn read_key(path: &Path) -> Result<Option<SigningKey>, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => SigningKey::from_pem(&text)
            .map(Some)
            .map_err(|source| KeyError::File {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// Writes a new file readable by its owner only (from the start: the key is
/// never readable by others, not even briefly).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io("create", path))?;
    file.write_all(bytes).map_err(io("write", path))?;
    file.sync_all().map_err(io("write", path))
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyError {
    let path = path.to_owned();
    move |source| KeyError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_created_once_private_and_then_reused() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("keys").join(KEY_FILE);
        let first = get_or_create_key_file(&path)?;
        let second = get_or_create_key_file(&path)?;
        assert_eq!(first.key_id(), second.key_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path)?.permissions().mode() & 0o777,
                0o600
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("keys"))?.collect();
        assert_eq!(leftovers.len(), 1, "temporary files are removed");
        std::fs::write(&path, "garbage")?;
        assert!(matches!(
            get_or_create_key_file(&path),
            Err(KeyError::File { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_configured_key_wins_over_the_directory() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let key = SigningKey::generate()?;
        let config = IdentityConfig {
            signing_key_pem: Some(key.to_pem()),
            key_dir: Some(dir.path().to_owned()),
            ..IdentityConfig::default()
        };
        assert_eq!(load_or_create(&config)?.key_id(), key.key_id());
        assert!(!dir.path().join(KEY_FILE).exists());
        let broken = IdentityConfig {
            signing_key_pem: Some("nope".into()),
            ..config
        };
        assert!(matches!(
            load_or_create(&broken),
            Err(KeyError::Configured(_))
        ));
        Ok(())
    }

    #[test]
    fn the_verification_keys_are_the_signing_key_s_then_the_configured_and_the_file_s(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (signing, next, previous) = (
            SigningKey::generate()?,
            SigningKey::generate()?,
            SigningKey::generate()?,
        );
        let config = IdentityConfig {
            key_dir: Some(dir.path().to_owned()),
            // The signing key's own public key again changes nothing.
            verification_keys_pem: Some(format!(
                "{}{}",
                next.public_key_pem(),
                signing.public_key_pem()
            )),
            ..IdentityConfig::default()
        };
        let ids = |keys: Vec<VerificationKey>| -> Vec<String> {
            keys.into_iter().map(|k| k.key_id).collect()
        };
        assert_eq!(
            ids(verification_keys(&config, &signing)?),
            [signing.key_id(), next.key_id()]
        );
        std::fs::write(
            dir.path().join(VERIFICATION_KEYS_FILE),
            format!("{}{}", previous.public_key_pem(), next.public_key_pem()),
        )?;
        assert_eq!(
            ids(verification_keys(&config, &signing)?),
            [signing.key_id(), next.key_id(), previous.key_id()]
        );
        // A private key where public ones go is refused, naming where.
        std::fs::write(dir.path().join(VERIFICATION_KEYS_FILE), previous.to_pem())?;
        let refused = verification_keys(&config, &signing)
            .err()
            .ok_or("a private key was accepted")?;
        assert!(
            matches!(&refused, KeyError::Verification { from, .. } if from.ends_with(VERIFICATION_KEYS_FILE)),
            "{refused:?}"
        );
        Ok(())
    }
}
