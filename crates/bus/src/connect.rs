//! Connecting to NATS.

use std::time::Duration;

use async_nats::jetstream;

use crate::error::{Error, Result};
use crate::publish::Publisher;

/// How to reach NATS.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Client name shown in the server's connection list.
    pub name: String,
    /// How long to keep retrying the first connection before giving up.
    pub connect_timeout: Duration,
    /// Timeout of JetStream API requests and publish acks.
    pub request_timeout: Duration,
}

impl BusConfig {
    /// Defaults for `url`: retry for 10 s, 10 s request timeout.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A connection to NATS with its JetStream context. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    name: String,
}

impl Bus {
    /// Connects, retrying with backoff for up to `config.connect_timeout`.
    ///
    /// Once connected the client reconnects by itself for ever: a broker
    /// restart pauses publishing and consuming, it does not end them.
    pub async fn connect(config: &BusConfig) -> Result<Self> {
        // `a,b,c`: the servers of a cluster; the client picks one and
        // fails over to the others.
        let servers = config
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|source| Error::Url {
                        url: u.to_owned(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        if servers.is_empty() {
            // "" or ",": the client would wait for a server that is never named.
            return Err(Error::Url {
                url: config.url.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no server address given",
                ),
            });
        }
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let mut delay = Duration::from_millis(50);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let options = async_nats::ConnectOptions::new()
                .name(&config.name)
                .connection_timeout(Duration::from_secs(2))
                .request_timeout(Some(config.request_timeout))
                .max_reconnects(None)
                .event_callback(|event| async move {
                    match event {
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        async_nats::Event::Connected => tracing::info!("connected to NATS"),
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                });
            match options.connect(servers.as_slice()).await {
                Ok(client) => {
                    let js = jetstream::ContextBuilder::new()
                        .timeout(config.request_timeout)
                        .backpressure_on_inflight(true)
                        .build(client.clone());
                    return Ok(Self {
                        client,
                        js,
                        name: config.name.clone(),
                    });
                }
                Err(source) => {
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(Error::Connect {
                            url: config.url.clone(),
                            attempts,
                            source,
                        });
                    }
                    tracing::debug!(url = %config.url, error = %source, "NATS not reachable yet, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// The core NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The client name this connection was made with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A publisher on this connection.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.js.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_url_list_without_a_server_is_an_invalid_url() {
        for url in ["", ",", " , ,"] {
            let mut config = BusConfig::new(url, "test");
            // Were the list taken as valid, connecting would fail only after this.
            config.connect_timeout = Duration::from_secs(30);
            let started = std::time::Instant::now();
            match Bus::connect(&config).await {
                Err(Error::Url { url: given, source }) => {
                    assert_eq!(given, url);
                    assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput, "{url:?}");
                }
                other => panic!("{url:?}: {other:?}"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{url:?} was tried"
            );
        }
    }
}
