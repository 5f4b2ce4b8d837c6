//! Errors of the bus and of message handlers.

use std::time::Duration;

use skein_message::{DecodeError, EncodeError};

/// A boxed error from the NATS client, whose error kinds differ per call.
pub type NatsError = async_nats::Error;

/// An error of the bus: connecting, provisioning, publishing, consuming.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// NATS could not be reached within the connect timeout.
    #[error("cannot connect to NATS at {url} after {attempts} attempts ({source}); is nats-server running there? Start one (skein up does) or set NATS_URL")]
    Connect {
        /// The URL tried.
        url: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The server refused the connection's credentials.
    #[error("NATS at {url} refused the credentials ({source}); set NATS_USER and NATS_PASSWORD (or user:password@ in the URL), or NATS_TOKEN, to what the server expects")]
    Auth {
        /// The URL tried, without its password.
        url: String,
        /// What the server said.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The TLS handshake with the server failed.
    #[error("TLS with NATS at {url} failed ({source}); set NATS_CA to the certificate (PEM) of the CA that signed the server's, and NATS_CERT and NATS_KEY if the server verifies clients")]
    Tls {
        /// The URL tried, without its password.
        url: String,
        /// Why.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The connection's security settings are inconsistent or name files
    /// that cannot be read.
    #[error("NATS security settings: {0}")]
    Security(String),
    /// A NATS URL that cannot be parsed.
    #[error(
        "invalid NATS URL {url:?} ({source}); give nats://host:port, several separated by commas"
    )]
    Url {
        /// The URL as given.
        url: String,
        /// Why it is invalid.
        #[source]
        source: std::io::Error,
    },
    /// A stream or consumer definition file is not valid.
    #[error("invalid definition {file}: {source}")]
    Definition {
        /// The definition file.
        file: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// Creating or updating a stream or consumer failed.
    #[error("cannot provision {what}: {source}")]
    Provision {
        /// The stream or consumer.
        what: String,
        /// The server's answer.
        #[source]
        source: NatsError,
    },
    /// A publish was not acknowledged by JetStream.
    #[error("publish to {subject} failed: {source}")]
    Publish {
        /// The subject published to.
        subject: String,
        /// The cause.
        #[source]
        source: NatsError,
    },
    /// A JetStream request (stream or consumer info, message fetch) failed.
    #[error("{what}: {source}")]
    JetStream {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: NatsError,
    },
    /// A message could not be built.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What failed.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn jetstream(what: impl Into<String>, source: impl Into<NatsError>) -> Self {
        Error::JetStream {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// Result of the bus.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a failed message is to be treated: the one place where the ack
/// decision is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// May succeed later (a database or a dependency is unavailable): the
    /// message is nak'ed with backoff and redelivered, up to `max_deliver`.
    Transient,
    /// Will never succeed (bad payload, violated invariant): the message goes
    /// to the dead-letter stream at once.
    Permanent,
}

/// The failure of a message handler, classified.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} failure: {reason}")]
pub struct HandlerError {
    kind: ErrorKind,
    reason: String,
    retry_after: Option<Duration>,
}

impl HandlerError {
    /// A failure that may go away: redeliver later.
    pub fn transient(reason: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Transient,
            reason: reason.to_string(),
            retry_after: None,
        }
    }

    /// A failure that will not go away: dead-letter the message.
    pub fn permanent(reason: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            reason: reason.to_string(),
            retry_after: None,
        }
    }

    /// Asks for redelivery no sooner than `delay` (transient failures only).
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The reason, carried into the dead-letter message.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The requested redelivery delay, if any.
    pub fn requested_delay(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl From<DecodeError> for HandlerError {
    fn from(e: DecodeError) -> Self {
        HandlerError::permanent(e)
    }
}

impl From<EncodeError> for HandlerError {
    fn from(e: EncodeError) -> Self {
        HandlerError::permanent(e)
    }
}
