//! `skein-identity`: the identity worker as its own process.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=sqlite:data/identity.db SKEIN_KEY_DIR=data \
//!   SKEIN_ADMIN_EMAIL=admin@example.org SKEIN_ADMIN_PASSWORD='a long secret' skein-identity
//! ```
//!
//! - `SKEIN_SIGNING_KEY_PEM`: the token signing key (PKCS#8 PEM); else the
//!   key in `SKEIN_KEY_DIR` (default `data`), generated there on first start.
//! - `SKEIN_ADMIN_EMAIL` and `SKEIN_ADMIN_PASSWORD`: the first admin, created
//!   once; both or neither.
//! - `SKEIN_ACCESS_TTL_SECS` (default 900), `SKEIN_REFRESH_TTL_SECS`
//!   (default 30 days).
//!
//! `skein worker identity` runs the same worker from the `skein` command.

use std::time::Duration;

use anyhow::Context;
use skein_identity::{AdminSeed, IdentityConfig};
use skein_service::standalone;

/// A setting as every skein process reads it: trimmed, an empty one unset.
fn setting(name: &str) -> anyhow::Result<Option<String>> {
    standalone::env_setting(name)
}

/// A password or a key: as given (white space is part of a password), an
/// empty one unset.
fn secret(name: &str) -> anyhow::Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{name} is not valid Unicode")),
    }
}

fn secs(var: &str, default: Duration) -> anyhow::Result<Duration> {
    match setting(var)? {
        Some(text) => text
            .parse()
            .map(Duration::from_secs)
            .with_context(|| format!("{var} must be a number of seconds")),
        None => Ok(default),
    }
}

fn config() -> anyhow::Result<IdentityConfig> {
    let defaults = IdentityConfig::default();
    let admin = match (
        setting("SKEIN_ADMIN_EMAIL")?,
        secret("SKEIN_ADMIN_PASSWORD")?,
    ) {
        (Some(email), Some(password)) => Some(AdminSeed {
            email,
            password,
            name: "Admin".into(),
        }),
        (None, None) => None,
        _ => anyhow::bail!("set both SKEIN_ADMIN_EMAIL and SKEIN_ADMIN_PASSWORD, or neither"),
    };
    Ok(IdentityConfig {
        access_ttl: secs("SKEIN_ACCESS_TTL_SECS", defaults.access_ttl)?,
        refresh_ttl: secs("SKEIN_REFRESH_TTL_SECS", defaults.refresh_ttl)?,
        signing_key_pem: secret("SKEIN_SIGNING_KEY_PEM")?,
        verification_keys_pem: secret("SKEIN_VERIFICATION_KEYS_PEM")?,
        // A path as given (it need not be Unicode), an empty one unset.
        key_dir: Some(
            std::env::var_os("SKEIN_KEY_DIR")
                .filter(|dir| !dir.is_empty())
                .unwrap_or_else(|| "data".into())
                .into(),
        ),
        admin,
        ..defaults
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = config()?;
    let env = standalone::connect(skein_identity::NAME).await?;
    let host = skein_identity::start(env.bus, env.store, env.host, config)
        .await
        .context("failed to start the identity worker")?;
    standalone::serve(host, env.health).await
}
