//! Dead letters: messages that could not be handled, kept with why.
//!
//! A dead letter is published to `dlq.<stream>.<consumer>` with the original
//! headers and payload unchanged, plus `Skein-Dlq-*` headers saying which
//! handler gave up, why, after how many deliveries, and where the message came
//! from (stream, sequence, subject), so it can be inspected and redriven.

use async_nats::jetstream::publish::PublishAck;
use async_nats::HeaderMap;
use bytes::Bytes;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::publish::{Outgoing, Publisher};

/// Header names of dead letters. Part of the wire contract.
pub mod headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "Skein-Dlq-Reason";
    /// The consumer (worker) that gave up.
    pub const HANDLER: &str = "Skein-Dlq-Handler";
    /// How many times it was delivered.
    pub const DELIVERIES: &str = "Skein-Dlq-Deliveries";
    /// The stream it came from.
    pub const STREAM: &str = "Skein-Dlq-Stream";
    /// Its sequence in that stream.
    pub const STREAM_SEQ: &str = "Skein-Dlq-Stream-Seq";
    /// The subject it was published on.
    pub const SUBJECT: &str = "Skein-Dlq-Subject";
    /// When it was dead-lettered, RFC 3339.
    pub const TIME: &str = "Skein-Dlq-Time";
    /// On a purge record: when the dead letter was purged, RFC 3339.
    pub const PURGED: &str = "Skein-Dlq-Purged";
    /// On a message `skein dlq redrive` published back to its origin: how
    /// many times it was redriven (it keeps its `ce-id`, so an inbox still
    /// knows it).
    pub const REDRIVEN: &str = "Skein-Redriven";
    /// On a message `skein dlq redrive` published back to its origin: the
    /// consumer (worker) that gave up on it, the only one to handle the
    /// copy. Every consumer of the stream receives it; the others had the
    /// original, and ack the copy unhandled.
    pub const REDRIVEN_FOR: &str = "Skein-Redriven-For";
}

/// The consumer a copy `skein dlq redrive` published is for
/// ([`headers::REDRIVEN_FOR`]); `None` for any other message, and for a copy
/// redriven before the header existed (it goes to every consumer).
pub fn redriven_for(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers
        .and_then(|h| h.get(headers::REDRIVEN_FOR))
        .map(|v| v.as_str())
}

/// The consumer a copy redriven for *another* consumer than `consumer` was
/// meant for: what `consumer` passes over (it had the original).
pub fn redriven_for_another<'h>(
    headers: Option<&'h async_nats::HeaderMap>,
    consumer: &str,
) -> Option<&'h str> {
    redriven_for(headers).filter(|owner| *owner != consumer)
}

/// The dead letters' subjects, `dlq.<stream>.<consumer>`: what is listed,
/// counted and redriven. Purge records (`dlq.purged.<stream>.<consumer>`)
/// are not among them.
pub const DEAD_LETTERS: &str = "dlq.*.*";

/// The token after `dlq.` of a purge record's subject.
const PURGED_TOKEN: &str = "purged";
/// What the server adds to a message read without its payload.
const MESSAGE_SIZE: &str = "Nats-Msg-Size";

/// Why, where and by whom a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The reason, e.g. the handler's error or the decode error.
    pub reason: String,
    /// The consumer that gave up.
    pub handler: String,
    /// Deliveries so far.
    pub deliveries: u64,
    /// Origin stream.
    pub stream: String,
    /// Origin stream sequence.
    pub stream_sequence: u64,
    /// Origin subject.
    pub subject: String,
}

impl DeadLetterInfo {
    /// The DLQ subject for this dead letter: `dlq.<stream>.<handler>`.
    pub fn dlq_subject(&self) -> String {
        format!(
            "{}.{}.{}",
            skein_message::subject::DLQ_PREFIX,
            self.stream,
            self.handler
        )
    }

    /// Reads the dead-letter headers back, `None` if they are missing.
    pub fn from_headers(h: &HeaderMap) -> Option<Self> {
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned());
        Some(Self {
            reason: get(headers::REASON)?,
            handler: get(headers::HANDLER)?,
            deliveries: get(headers::DELIVERIES)?.parse().ok()?,
            stream: get(headers::STREAM)?,
            stream_sequence: get(headers::STREAM_SEQ)?.parse().ok()?,
            subject: get(headers::SUBJECT)?,
        })
    }
}

/// Publishes a dead letter: the original headers and payload plus the
/// dead-letter headers, and awaits the DLQ stream's ack.
///
/// Its `Nats-Msg-Id` is `<original id or stream:seq>:<handler>`, so the same
/// message dead-lettered by two consumers is kept twice, but the same
/// consumer retrying the dead-lettering is not.
pub async fn publish_dead_letter(
    publisher: &Publisher,
    original_headers: Option<&HeaderMap>,
    payload: Bytes,
    info: &DeadLetterInfo,
) -> Result<PublishAck> {
    let mut h = original_headers.cloned().unwrap_or_default();
    let origin_id = h
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| format!("{}:{}", info.stream, info.stream_sequence));
    // NATS headers are single-line.
    let reason: String = info
        .reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect();
    h.insert(headers::REASON, reason.as_str());
    h.insert(headers::HANDLER, info.handler.as_str());
    h.insert(headers::DELIVERIES, info.deliveries.to_string().as_str());
    h.insert(headers::STREAM, info.stream.as_str());
    h.insert(
        headers::STREAM_SEQ,
        info.stream_sequence.to_string().as_str(),
    );
    h.insert(headers::SUBJECT, info.subject.as_str());
    h.insert(
        headers::TIME,
        skein_message::envelope::format_time(OffsetDateTime::now_utc()).as_str(),
    );
    h.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{origin_id}:{}", info.handler).as_str(),
    );
    let outgoing = Outgoing {
        subject: info.dlq_subject(),
        headers: h,
        payload,
    };
    publisher
        .publish_outgoing(&outgoing)
        .await
        .map_err(|e| match e {
            Error::Publish { subject, source } => Error::Publish {
                subject: format!("{subject} (dead letter)"),
                source,
            },
            other => other,
        })
}

/// Records that the dead letter `dead_letter_subject` #`dlq_sequence` (with
/// `dead_letter_headers`) is being purged by an operator, before it is
/// deleted: its headers (the original message's and the dead-letter ones)
/// without its payload, on `dlq.purged.<stream>.<consumer>`, outside
/// [`DEAD_LETTERS`]. `skein audit` reads these, so a message an operator
/// discarded is not taken for one the broker lost (and not published again
/// by `--repair`). Its `Nats-Msg-Id` is `purged:<dlq sequence>`: a purge
/// tried again records it once. The headers may come from a headers-only
/// read ([`crate::replay::read_headers`]): the `Nats-Msg-Size` header such
/// a read adds is not copied.
pub async fn publish_purge_record(
    publisher: &Publisher,
    dead_letter_subject: &str,
    dead_letter_headers: Option<&HeaderMap>,
    dlq_sequence: u64,
) -> Result<PublishAck> {
    let mut h = HeaderMap::new();
    for (name, values) in dead_letter_headers.into_iter().flat_map(HeaderMap::iter) {
        let name_str: &str = name.as_ref();
        if name_str.eq_ignore_ascii_case(MESSAGE_SIZE) {
            continue;
        }
        for value in values {
            h.append(name.clone(), value.clone());
        }
    }
    h.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{PURGED_TOKEN}:{dlq_sequence}").as_str(),
    );
    h.insert(
        headers::PURGED,
        skein_message::envelope::format_time(OffsetDateTime::now_utc()).as_str(),
    );
    let rest = dead_letter_subject
        .strip_prefix(skein_message::subject::DLQ_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(dead_letter_subject);
    let outgoing = Outgoing {
        subject: format!(
            "{}.{PURGED_TOKEN}.{rest}",
            skein_message::subject::DLQ_PREFIX
        ),
        headers: h,
        payload: Bytes::new(),
    };
    publisher.publish_outgoing(&outgoing).await
}
