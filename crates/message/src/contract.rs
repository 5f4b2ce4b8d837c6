//! Typed message contracts.
//!
//! A service declares each of its messages once, by implementing [`Contract`]
//! (service, name, version) and one of [`Command`], [`Event`] or [`Query`]. The
//! `ce-type` (`<service>.<name>.v<N>`) and the subject follow from that.
//!
//! Type names are contracts: a payload change that old readers cannot read is a
//! new `VERSION`, and the reader of the new version implements
//! [`Contract::upcast`] so that replaying an old stream still works.

use std::fmt;

use serde::{de::DeserializeOwned, Serialize};

use crate::error::DecodeError;

/// A message type: who owns it, what it is called, which version it is.
pub trait Contract: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The owning service, e.g. `orders`. Lower-case, no dots.
    const SERVICE: &'static str;
    /// The message name, e.g. `order_placed`. Lower-case snake case, no dots.
    const NAME: &'static str;
    /// The payload version, starting at 1.
    const VERSION: u32;

    /// The `ce-type` of this version, e.g. `orders.order_placed.v1`.
    fn type_name() -> TypeName {
        TypeName {
            service: Self::SERVICE.to_owned(),
            name: Self::NAME.to_owned(),
            version: Self::VERSION,
        }
    }

    /// Rewrites the JSON payload of an older `version` of this message into the
    /// shape of the current version.
    ///
    /// Called when a reader meets a message whose version is lower than
    /// [`Contract::VERSION`]. The default refuses: a type that has only ever
    /// had one version needs no upcaster.
    fn upcast(version: u32, data: serde_json::Value) -> Result<serde_json::Value, String> {
        let _ = data;
        Err(format!("no upcaster from v{version}"))
    }
}

/// A request to change state, handled by exactly one service.
pub trait Command: Contract {
    /// The entity the command is about (a subject token: no dots, wildcards or
    /// spaces); it becomes `ce-subject` and orders the
    /// command after earlier ones about the same entity.
    fn entity_id(&self) -> String;
}

/// A fact that happened; any number of services may react to it.
pub trait Event: Contract {
    /// The entity the event is about; it is a token of the subject.
    fn entity_id(&self) -> String;
}

/// A read answered over core NATS request-reply.
pub trait Query: Contract {
    /// The answer's payload type.
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

/// A parsed `ce-type`: `<service>.<name>.v<version>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TypeName {
    /// The owning service.
    pub service: String,
    /// The message name.
    pub name: String,
    /// The payload version.
    pub version: u32,
}

impl TypeName {
    /// Parses a `ce-type` value.
    pub fn parse(value: &str) -> Result<Self, DecodeError> {
        let malformed = || DecodeError::MalformedType(value.to_owned());
        let mut parts = value.split('.');
        let (Some(service), Some(name), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        // Canonical only (`v1`, not `v01` or `v+1`): a type is compared
        // and filtered by its text.
        let version = version
            .strip_prefix('v')
            .filter(|v| !v.starts_with(['0', '+']))
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|v| *v > 0)
            .ok_or_else(malformed)?;
        if service.is_empty() || name.is_empty() {
            return Err(malformed());
        }
        Ok(Self {
            service: service.to_owned(),
            name: name.to_owned(),
            version,
        })
    }

    /// Whether `self` names a version of the same message as `other`.
    pub fn same_message(&self, other: &TypeName) -> bool {
        self.service == other.service && self.name == other.name
    }

    /// `<service>.<name>`, without the version.
    pub fn unversioned(&self) -> String {
        format!("{}.{}", self.service, self.name)
    }
}

impl fmt::Display for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.v{}", self.service, self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_parse_and_print_back() -> Result<(), DecodeError> {
        let t = TypeName::parse("orders.order_placed.v12")?;
        assert_eq!(t.service, "orders");
        assert_eq!(t.name, "order_placed");
        assert_eq!(t.version, 12);
        assert_eq!(t.to_string(), "orders.order_placed.v12");
        Ok(())
    }

    #[test]
    fn malformed_type_names_are_refused() {
        for bad in [
            "",
            "orders",
            "orders.x",
            "orders.x.1",
            "orders.x.v",
            "orders.x.v0",
            "orders.x.v01",
            "orders.x.v+1",
            "a.b.v1.c",
            ".x.v1",
        ] {
            assert!(
                matches!(TypeName::parse(bad), Err(DecodeError::MalformedType(_))),
                "{bad:?} should be refused"
            );
        }
    }
}
