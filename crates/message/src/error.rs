//! Errors of encoding and decoding messages.

/// A message could not be decoded from the wire or into a typed payload.
///
/// Every variant is permanent for the message it concerns: delivering the same
/// bytes again fails the same way, so consumers dead-letter it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has no NATS headers, so it carries no CloudEvents attributes.
    #[error("message has no headers; expected CloudEvents attributes as ce-* headers")]
    NoHeaders,
    /// A required `ce-*` header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but its value is not valid.
    #[error("invalid header {header}: {reason}")]
    InvalidHeader {
        /// The header name.
        header: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// `ce-specversion` names a CloudEvents version other than 1.0.
    #[error("unsupported CloudEvents specversion {0:?}, expected \"1.0\"")]
    UnsupportedSpecVersion(String),
    /// `ce-type` is not of the form `<service>.<name>.v<N>`.
    #[error("malformed message type {0:?}, expected <service>.<name>.v<N>")]
    MalformedType(String),
    /// The message is of a different type than the one asked for.
    #[error("unexpected message type {actual}, expected {expected}")]
    UnexpectedType {
        /// The type that was asked for (without version).
        expected: String,
        /// The `ce-type` of the message.
        actual: String,
    },
    /// The message is of a newer version than this reader knows.
    #[error(
        "message type {actual} is newer than the newest version this service reads ({expected})"
    )]
    UnsupportedVersion {
        /// The newest type this reader knows.
        expected: String,
        /// The `ce-type` of the message.
        actual: String,
    },
    /// An older version could not be upcast to the current one.
    #[error("cannot upcast {actual} to {expected}: {reason}")]
    Upcast {
        /// The type being read.
        expected: String,
        /// The `ce-type` of the message.
        actual: String,
        /// Why the upcaster refused.
        reason: String,
    },
    /// The payload is not valid JSON for the expected type.
    #[error("invalid payload for {kind}: {source}")]
    Payload {
        /// The `ce-type` of the message.
        kind: String,
        /// The JSON error, with line and column.
        #[source]
        source: serde_json::Error,
    },
}

/// A message could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The payload could not be serialized to JSON.
    #[error("cannot serialize payload of {kind}: {source}")]
    Payload {
        /// The `ce-type` of the message.
        kind: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The entity id cannot be a NATS subject token.
    #[error("invalid entity id {id:?} for {kind}: {reason}")]
    InvalidEntityId {
        /// The `ce-type` of the message.
        kind: String,
        /// The offending id.
        id: String,
        /// Why it is not a valid subject token.
        reason: &'static str,
    },
}
