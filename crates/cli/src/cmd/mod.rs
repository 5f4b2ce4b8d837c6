//! The subcommands.

pub(crate) mod audit;
pub(crate) mod dlq;
pub(crate) mod ingress;
pub(crate) mod load;
pub(crate) mod replay;
pub(crate) mod saga;
pub(crate) mod select;
pub(crate) mod streams;
pub(crate) mod trace;
pub(crate) mod up;
pub(crate) mod worker;

use anyhow::Context;
use skein_bus::{Bus, BusConfig};

/// The NATS credentials and TLS of this process (its flags and their
/// environment variables), set once by `main`.
static NATS_SECURITY: std::sync::OnceLock<skein_bus::NatsSecurity> = std::sync::OnceLock::new();

pub(crate) fn set_nats_security(security: skein_bus::NatsSecurity) {
    let _ = NATS_SECURITY.set(security);
}

/// How this process reaches `url`: its NATS credentials and TLS included.
pub(crate) fn bus_config(url: &str, name: &str) -> BusConfig {
    BusConfig {
        // Were it not set, the environment still counts.
        security: NATS_SECURITY
            .get()
            .cloned()
            .or_else(|| skein_bus::NatsSecurity::from_env().ok())
            .unwrap_or_default(),
        ..BusConfig::new(url, name)
    }
}

/// Connects for a command-line run: a short connect timeout, a clear error.
pub(crate) async fn connect(url: &str) -> anyhow::Result<Bus> {
    connect_with(bus_config(url, "skein-cli")).await
}

/// [`connect`] without the environment's credentials and TLS: for the
/// server `skein up` starts itself.
pub(crate) async fn connect_plain(url: &str) -> anyhow::Result<Bus> {
    connect_with(BusConfig::new(url, "skein-cli")).await
}

async fn connect_with(mut config: BusConfig) -> anyhow::Result<Bus> {
    config.connect_timeout = std::time::Duration::from_secs(3);
    Bus::connect(&config).await.context("cannot reach NATS")
}
