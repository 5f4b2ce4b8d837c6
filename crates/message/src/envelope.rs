//! The envelope: CloudEvents attributes plus the JSON payload.

use async_nats::HeaderMap;
use bytes::Bytes;
use time::{format_description::well_known::Rfc3339, OffsetDateTime};
use uuid::Uuid;

use crate::contract::{Command, Contract, Event, Query, TypeName};
use crate::error::{DecodeError, EncodeError};
use crate::subject;

/// Header names. They are part of the wire contract.
pub mod headers {
    /// CloudEvents spec version, always `1.0`.
    pub const SPECVERSION: &str = "ce-specversion";
    /// Message id, a UUIDv7; equal to `Nats-Msg-Id`.
    pub const ID: &str = "ce-id";
    /// The producing service.
    pub const SOURCE: &str = "ce-source";
    /// `<service>.<name>.v<N>`.
    pub const TYPE: &str = "ce-type";
    /// RFC 3339 time the message was created.
    pub const TIME: &str = "ce-time";
    /// The entity the message is about.
    pub const SUBJECT: &str = "ce-subject";
    /// Media type of the payload, always `application/json`.
    pub const DATACONTENTTYPE: &str = "ce-datacontenttype";
    /// Id of the request that started the causal chain.
    pub const CORRELATION_ID: &str = "ce-correlationid";
    /// `ce-id` of the message that caused this one.
    pub const CAUSATION_ID: &str = "ce-causationid";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// JetStream de-duplication id, equal to `ce-id`.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
}

/// A fresh message id: a UUIDv7, so ids sort by creation time.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// Where a message sits in a causal chain: the request it belongs to and the
/// message that caused it.
///
/// A handler derives the context of what it sends from the message it handles
/// with [`Envelope::context`], so one correlation id follows a request through
/// every service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageContext {
    /// Id shared by every message a request causes.
    pub correlation_id: String,
    /// `ce-id` of the message that caused this one; `None` at the root.
    pub causation_id: Option<Uuid>,
    /// W3C `traceparent` to continue.
    pub traceparent: Option<String>,
}

impl MessageContext {
    /// The start of a new causal chain with a fresh correlation id.
    pub fn root() -> Self {
        Self {
            correlation_id: new_id().to_string(),
            causation_id: None,
            traceparent: None,
        }
    }

    /// The start of a causal chain whose correlation id is given, for example
    /// an HTTP request's `x-request-id`.
    pub fn with_correlation(correlation_id: impl Into<String>) -> Self {
        Self {
            correlation_id: correlation_id.into(),
            causation_id: None,
            traceparent: None,
        }
    }
}

/// One message: its CloudEvents attributes, its NATS subject and its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// `ce-id`, also `Nats-Msg-Id`, the outbox row id and the inbox key.
    pub id: Uuid,
    /// `ce-source`: the producing service.
    pub source: String,
    /// `ce-type`: `<service>.<name>.v<N>`.
    pub kind: String,
    /// `ce-time`.
    pub time: OffsetDateTime,
    /// `ce-subject`: the entity the message is about, if any.
    pub subject: Option<String>,
    /// `ce-correlationid`.
    pub correlation_id: String,
    /// `ce-causationid`.
    pub causation_id: Option<Uuid>,
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// The NATS subject the message is published on.
    pub nats_subject: String,
    /// The JSON payload.
    pub data: Bytes,
}

impl Envelope {
    fn build<T: Contract>(
        source: &str,
        payload: &T,
        entity: Option<&str>,
        nats_subject: String,
        context: &MessageContext,
    ) -> Result<Self, EncodeError> {
        let kind = T::type_name().to_string();
        let data = serde_json::to_vec(payload).map_err(|source| EncodeError::Payload {
            kind: kind.clone(),
            source,
        })?;
        Ok(Self {
            id: new_id(),
            source: source.to_owned(),
            kind,
            time: OffsetDateTime::now_utc(),
            subject: entity.map(str::to_owned),
            correlation_id: context.correlation_id.clone(),
            causation_id: context.causation_id,
            traceparent: context.traceparent.clone(),
            nats_subject,
            data: data.into(),
        })
    }

    fn checked_entity<T: Contract>(id: &str) -> Result<&str, EncodeError> {
        subject::check_token(id).map_err(|reason| EncodeError::InvalidEntityId {
            kind: T::type_name().to_string(),
            id: id.to_owned(),
            reason,
        })?;
        Ok(id)
    }

    /// An event published by `source`, on `events.<service>.<entity>.<name>`.
    pub fn event<E: Event>(
        source: &str,
        event: &E,
        context: &MessageContext,
    ) -> Result<Self, EncodeError> {
        let entity = event.entity_id();
        let entity = Self::checked_entity::<E>(&entity)?;
        let nats_subject = subject::event(E::SERVICE, entity, E::NAME);
        Self::build(source, event, Some(entity), nats_subject, context)
    }

    /// A command sent by `source` to the command's service, on
    /// `commands.<service>.<name>`.
    pub fn command<C: Command>(
        source: &str,
        command: &C,
        context: &MessageContext,
    ) -> Result<Self, EncodeError> {
        let entity = command.entity_id();
        let entity = Self::checked_entity::<C>(&entity)?;
        let nats_subject = subject::command(C::SERVICE, C::NAME);
        Self::build(source, command, Some(entity), nats_subject, context)
    }

    /// A query request sent by `source`, on `queries.<service>.<name>`.
    pub fn query<Q: Query>(
        source: &str,
        query: &Q,
        context: &MessageContext,
    ) -> Result<Self, EncodeError> {
        let nats_subject = subject::query(Q::SERVICE, Q::NAME);
        Self::build(source, query, None, nats_subject, context)
    }

    /// The context for messages caused by this one: same correlation id, this
    /// message as the cause, same trace.
    pub fn context(&self) -> MessageContext {
        MessageContext {
            correlation_id: self.correlation_id.clone(),
            causation_id: Some(self.id),
            traceparent: self.traceparent.clone(),
        }
    }

    /// The parsed `ce-type`.
    pub fn type_name(&self) -> Result<TypeName, DecodeError> {
        TypeName::parse(&self.kind)
    }

    /// The entity this message is about: `ce-subject`, or else the entity
    /// token of an event subject.
    pub fn entity(&self) -> Option<&str> {
        self.subject
            .as_deref()
            .or_else(|| subject::entity_of_event(&self.nats_subject))
    }

    /// Whether this message is some version of `T`.
    pub fn is<T: Contract>(&self) -> bool {
        self.type_name()
            .map(|t| t.same_message(&T::type_name()))
            .unwrap_or(false)
    }

    /// Decodes the payload as `T`, upcasting older versions.
    pub fn decode<T: Contract>(&self) -> Result<T, DecodeError> {
        let expected = T::type_name();
        let actual = self.type_name()?;
        if !actual.same_message(&expected) {
            return Err(DecodeError::UnexpectedType {
                expected: expected.unversioned(),
                actual: self.kind.clone(),
            });
        }
        let payload_error = |source| DecodeError::Payload {
            kind: self.kind.clone(),
            source,
        };
        if actual.version == expected.version {
            return serde_json::from_slice(&self.data).map_err(payload_error);
        }
        if actual.version > expected.version {
            return Err(DecodeError::UnsupportedVersion {
                expected: expected.to_string(),
                actual: self.kind.clone(),
            });
        }
        let old: serde_json::Value = serde_json::from_slice(&self.data).map_err(payload_error)?;
        let upcast = T::upcast(actual.version, old).map_err(|reason| DecodeError::Upcast {
            expected: expected.to_string(),
            actual: self.kind.clone(),
            reason,
        })?;
        serde_json::from_value(upcast).map_err(payload_error)
    }

    /// The NATS headers carrying this envelope's attributes, including
    /// `Nats-Msg-Id` = `ce-id` so JetStream drops duplicate publishes.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let id = self.id.to_string();
        h.insert(headers::SPECVERSION, "1.0");
        h.insert(headers::ID, id.as_str());
        h.insert(headers::NATS_MSG_ID, id.as_str());
        h.insert(headers::SOURCE, self.source.as_str());
        h.insert(headers::TYPE, self.kind.as_str());
        h.insert(headers::TIME, format_time(self.time).as_str());
        h.insert(headers::DATACONTENTTYPE, "application/json");
        if let Some(subject) = &self.subject {
            h.insert(headers::SUBJECT, subject.as_str());
        }
        h.insert(headers::CORRELATION_ID, self.correlation_id.as_str());
        if let Some(causation) = &self.causation_id {
            h.insert(headers::CAUSATION_ID, causation.to_string().as_str());
        }
        if let Some(traceparent) = &self.traceparent {
            h.insert(headers::TRACEPARENT, traceparent.as_str());
        }
        h
    }

    /// Reads an envelope from a received message's subject, headers and payload.
    /// A malformed `traceparent` is left out, as if there were none.
    ///
    /// Fails with a precise [`DecodeError`] when a required attribute is
    /// missing or malformed; the payload is not parsed here (see [`Envelope::decode`]).
    pub fn from_parts(
        nats_subject: &str,
        headers: Option<&HeaderMap>,
        data: Bytes,
    ) -> Result<Self, DecodeError> {
        let h = headers.ok_or(DecodeError::NoHeaders)?;
        let get = |name: &'static str| h.get(name).map(|v| v.as_str());
        let required = |name: &'static str| get(name).ok_or(DecodeError::MissingHeader(name));

        let spec = required(headers::SPECVERSION)?;
        if spec != "1.0" {
            return Err(DecodeError::UnsupportedSpecVersion(spec.to_owned()));
        }
        let id = parse_uuid(headers::ID, required(headers::ID)?)?;
        let source = required(headers::SOURCE)?;
        if source.is_empty() {
            return Err(invalid(headers::SOURCE, "must not be empty"));
        }
        let kind = required(headers::TYPE)?;
        TypeName::parse(kind)?;
        let time = OffsetDateTime::parse(required(headers::TIME)?, &Rfc3339)
            .map_err(|e| invalid(headers::TIME, format!("not an RFC 3339 time: {e}")))?;
        let correlation_id = required(headers::CORRELATION_ID)?;
        if correlation_id.is_empty() {
            return Err(invalid(headers::CORRELATION_ID, "must not be empty"));
        }
        let causation_id = get(headers::CAUSATION_ID)
            .map(|v| parse_uuid(headers::CAUSATION_ID, v))
            .transpose()?;
        if let Some(content_type) = get(headers::DATACONTENTTYPE) {
            if !content_type.starts_with("application/json") {
                return Err(invalid(
                    headers::DATACONTENTTYPE,
                    format!("{content_type:?} is not application/json"),
                ));
            }
        }

        Ok(Self {
            id,
            source: source.to_owned(),
            kind: kind.to_owned(),
            time,
            subject: get(headers::SUBJECT).map(str::to_owned),
            correlation_id: correlation_id.to_owned(),
            causation_id,
            // A malformed one (a message published by hand) is not carried
            // on into everything the message causes.
            traceparent: get(headers::TRACEPARENT)
                .filter(|v| trace_and_flags(v).is_some())
                .map(str::to_owned),
            nats_subject: nats_subject.to_owned(),
            data,
        })
    }

    /// The envelope as one CloudEvent in JSON (structured mode), for printing
    /// and for `jq`. The payload is embedded as `data` when it is JSON.
    pub fn to_cloudevent_json(&self) -> serde_json::Value {
        let data: serde_json::Value = serde_json::from_slice(&self.data).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&self.data).into_owned())
        });
        serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.kind,
            "time": format_time(self.time),
            "subject": self.subject,
            "datacontenttype": "application/json",
            "correlationid": self.correlation_id,
            "causationid": self.causation_id,
            "traceparent": self.traceparent,
            "natssubject": self.nats_subject,
            "data": data,
        })
    }
}

/// Formats a time as RFC 3339 with sub-second precision.
pub fn format_time(time: OffsetDateTime) -> String {
    time.format(&Rfc3339)
        .unwrap_or_else(|_| time.unix_timestamp().to_string())
}

fn invalid(header: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::InvalidHeader {
        header,
        reason: reason.into(),
    }
}

fn parse_uuid(header: &'static str, value: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(value).map_err(|e| invalid(header, format!("not a UUID: {e}")))
}

/// The trace id and flags of a well-formed W3C `traceparent`
/// (`<version>-<trace id>-<parent id>-<flags>`, lower-case hex, version
/// not `ff`, trace id not all zeros), else `None`.
pub fn trace_and_flags(traceparent: &str) -> Option<(&str, &str)> {
    let mut parts = traceparent.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    // Version 00 has exactly four parts; a later version may add some.
    let more = parts.next().is_some();
    (is_hex(version, 2)
        && version != "ff"
        && !(version == "00" && more)
        && is_hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && is_hex(parent, 16)
        && is_hex(flags, 2))
    .then_some((trace, flags))
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Placed {
        order_id: String,
        total_cents: i64,
    }
    impl Contract for Placed {
        const SERVICE: &'static str = "orders";
        const NAME: &'static str = "order_placed";
        const VERSION: u32 = 2;
        fn upcast(version: u32, mut data: serde_json::Value) -> Result<serde_json::Value, String> {
            // v1 carried the total in whole units as `total`.
            match version {
                1 => {
                    let total = data
                        .get("total")
                        .and_then(|t| t.as_i64())
                        .ok_or("v1 payload has no integer `total`")?;
                    let obj = data.as_object_mut().ok_or("v1 payload is not an object")?;
                    obj.remove("total");
                    obj.insert("total_cents".into(), (total * 100).into());
                    Ok(data)
                }
                v => Err(format!("no upcaster from v{v}")),
            }
        }
    }
    impl Event for Placed {
        fn entity_id(&self) -> String {
            self.order_id.clone()
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Reserve {
        order_id: String,
    }
    impl Contract for Reserve {
        const SERVICE: &'static str = "catalog";
        const NAME: &'static str = "reserve_stock";
        const VERSION: u32 = 1;
    }
    impl Command for Reserve {
        fn entity_id(&self) -> String {
            self.order_id.clone()
        }
    }

    fn placed() -> Placed {
        Placed {
            order_id: "o-1".into(),
            total_cents: 1250,
        }
    }

    fn roundtrip(e: &Envelope) -> Result<Envelope, DecodeError> {
        Envelope::from_parts(&e.nats_subject, Some(&e.headers()), e.data.clone())
    }

    #[test]
    fn an_event_survives_the_wire_with_every_attribute() -> Result<(), Box<dyn std::error::Error>> {
        let ctx = MessageContext {
            correlation_id: "req-42".into(),
            causation_id: Some(new_id()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        };
        let e = Envelope::event("orders", &placed(), &ctx)?;
        let back = roundtrip(&e)?;
        assert_eq!(back, e);
        assert_eq!(back.id.get_version_num(), 7);
        let h = e.headers();
        assert_eq!(
            h.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(e.id.to_string().as_str())
        );
        assert_eq!(back.decode::<Placed>()?, placed());
        Ok(())
    }

    #[test]
    fn a_malformed_traceparent_is_not_carried_on() -> Result<(), Box<dyn std::error::Error>> {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        for (sent, kept) in [
            (good, Some(good)),
            ("foo", None),
            (
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                None,
            ),
            (
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                None,
            ),
            (
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
                None,
            ),
        ] {
            let e = Envelope::event("orders", &placed(), &MessageContext::root())?;
            let mut h = e.headers();
            h.insert(headers::TRACEPARENT, sent);
            let back = Envelope::from_parts(&e.nats_subject, Some(&h), e.data.clone())?;
            assert_eq!(back.traceparent.as_deref(), kept, "{sent}");
        }
        Ok(())
    }

    #[test]
    fn a_command_carries_its_entity_as_ce_subject() -> Result<(), Box<dyn std::error::Error>> {
        let e = Envelope::command(
            "orchestrator",
            &Reserve {
                order_id: "o-9".into(),
            },
            &MessageContext::root(),
        )?;
        assert_eq!(e.nats_subject, "commands.catalog.reserve_stock");
        assert_eq!(roundtrip(&e)?.entity(), Some("o-9"));
        Ok(())
    }

    #[test]
    fn the_context_of_a_caused_message_points_back_at_its_cause() -> Result<(), EncodeError> {
        let first = Envelope::event(
            "orders",
            &placed(),
            &MessageContext::with_correlation("req-1"),
        )?;
        let second = Envelope::command(
            "orchestrator",
            &Reserve {
                order_id: "o-1".into(),
            },
            &first.context(),
        )?;
        assert_eq!(second.correlation_id, "req-1");
        assert_eq!(second.causation_id, Some(first.id));
        Ok(())
    }

    #[test]
    fn an_entity_id_that_would_break_the_subject_is_refused() {
        let bad = Placed {
            order_id: "a.b".into(),
            total_cents: 1,
        };
        assert!(matches!(
            Envelope::event("orders", &bad, &MessageContext::root()),
            Err(EncodeError::InvalidEntityId { .. })
        ));
    }

    #[test]
    fn each_missing_or_bad_header_is_named() -> Result<(), EncodeError> {
        let e = Envelope::event("orders", &placed(), &MessageContext::root())?;
        assert!(matches!(
            Envelope::from_parts("s", None, e.data.clone()),
            Err(DecodeError::NoHeaders)
        ));
        for name in [
            headers::SPECVERSION,
            headers::ID,
            headers::SOURCE,
            headers::TYPE,
            headers::TIME,
            headers::CORRELATION_ID,
        ] {
            let mut h = HeaderMap::new();
            for (k, v) in e.headers().iter() {
                if AsRef::<str>::as_ref(k) != name {
                    for value in v {
                        h.append(k.clone(), value.clone());
                    }
                }
            }
            match Envelope::from_parts(&e.nats_subject, Some(&h), e.data.clone()) {
                Err(DecodeError::MissingHeader(missing)) => assert_eq!(missing, name),
                other => panic!("expected missing {name}, got {other:?}"),
            }
        }
        let mut h = e.headers();
        h.insert(headers::ID, "not-a-uuid");
        assert!(matches!(
            Envelope::from_parts(&e.nats_subject, Some(&h), e.data.clone()),
            Err(DecodeError::InvalidHeader {
                header: "ce-id",
                ..
            })
        ));
        let mut h = e.headers();
        h.insert(headers::SPECVERSION, "0.3");
        assert!(matches!(
            Envelope::from_parts(&e.nats_subject, Some(&h), e.data.clone()),
            Err(DecodeError::UnsupportedSpecVersion(_))
        ));
        let mut h = e.headers();
        h.insert(headers::TIME, "yesterday");
        assert!(matches!(
            Envelope::from_parts(&e.nats_subject, Some(&h), e.data.clone()),
            Err(DecodeError::InvalidHeader {
                header: "ce-time",
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn decoding_names_a_wrong_type_a_newer_version_and_a_bad_payload() -> Result<(), EncodeError> {
        let e = Envelope::command(
            "x",
            &Reserve {
                order_id: "o".into(),
            },
            &MessageContext::root(),
        )?;
        assert!(matches!(
            e.decode::<Placed>(),
            Err(DecodeError::UnexpectedType { .. })
        ));

        let mut newer = Envelope::event("orders", &placed(), &MessageContext::root())?;
        newer.kind = "orders.order_placed.v3".into();
        assert!(matches!(
            newer.decode::<Placed>(),
            Err(DecodeError::UnsupportedVersion { .. })
        ));

        let mut bad = Envelope::event("orders", &placed(), &MessageContext::root())?;
        bad.data = Bytes::from_static(br#"{"order_id": 5}"#);
        let err = bad
            .decode::<Placed>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("invalid payload for orders.order_placed.v2"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn an_old_version_is_upcast_on_read() -> Result<(), Box<dyn std::error::Error>> {
        let mut old = Envelope::event("orders", &placed(), &MessageContext::root())?;
        old.kind = "orders.order_placed.v1".into();
        old.data = Bytes::from_static(br#"{"order_id": "o-1", "total": 12}"#);
        assert_eq!(
            old.decode::<Placed>()?,
            Placed {
                order_id: "o-1".into(),
                total_cents: 1200
            }
        );
        old.data = Bytes::from_static(br#"{"order_id": "o-1"}"#);
        assert!(matches!(
            old.decode::<Placed>(),
            Err(DecodeError::Upcast { .. })
        ));
        Ok(())
    }
}
