//! Reading history back from a stream.
//!
//! An ordered, ephemeral consumer reads the messages of a stream that match a
//! subject filter, from a start point to the end as it was when reading
//! began. Nothing is acknowledged and no durable state is left behind.
//!
//! A work-queue stream (`COMMANDS`) takes no such consumer beside the
//! workers' (the server refuses overlapping consumers there, and an
//! acknowledging reader would consume what it reads), so its messages are
//! fetched one by one with the stream's get-message API instead: each
//! request names the filter and the next sequence, and the server skips
//! what does not match.

use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::connect::Bus;
use crate::error::{Error, Result};

/// A reading consumer's name: its own, never a worker's, so that it is
/// created through `$JS.API.CONSUMER.CREATE.<stream>.<name>…`, which a
/// server's permissions can tell from a worker's durable consumer (the
/// ingress's NATS user may create the one, not the other).
fn reader_name() -> String {
    format!("skein-read-{}", skein_message::new_id().simple())
}

/// Where to start reading.
#[derive(Debug, Clone, Copy)]
pub enum StartAt {
    /// The first message.
    Beginning,
    /// The given stream sequence.
    Sequence(u64),
    /// The first message at or after this time.
    Time(time::OffsetDateTime),
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Stream sequence.
    pub sequence: u64,
    /// Subject.
    pub subject: String,
    /// Headers.
    pub headers: Option<HeaderMap>,
    /// Payload.
    pub payload: Bytes,
    /// When the stream stored it.
    pub published: time::OffsetDateTime,
}

/// Reads every message of `stream` matching `filter` from `start` up to the
/// last message present when the read began.
pub async fn read(
    bus: &Bus,
    stream: &str,
    filter: &str,
    start: StartAt,
) -> Result<Vec<StoredMessage>> {
    read_with(bus, stream, filter, start, false).await
}

/// [`read`] without the payloads (each is empty; the server adds a
/// `Nats-Msg-Size` header), for readers of headers only (ids, dead-letter
/// details): the payloads are neither sent nor kept. A work-queue stream is
/// read whole.
pub async fn read_headers(
    bus: &Bus,
    stream: &str,
    filter: &str,
    start: StartAt,
) -> Result<Vec<StoredMessage>> {
    read_with(bus, stream, filter, start, true).await
}

async fn read_with(
    bus: &Bus,
    stream: &str,
    filter: &str,
    start: StartAt,
    headers_only: bool,
) -> Result<Vec<StoredMessage>> {
    let mut out = Vec::new();
    read_each_with(bus, stream, filter, start, headers_only, |m| {
        out.push(m);
        ControlFlow::Continue(())
    })
    .await?;
    Ok(out)
}

/// [`read`] one message at a time: `each` gets every message in stream
/// order and may stop the reading early (`ControlFlow::Break`). What it
/// does not keep is not held, so a selection from a long stream (a year of
/// `EVENTS`) takes the memory of what it selects, not of the stream.
pub async fn read_each(
    bus: &Bus,
    stream: &str,
    filter: &str,
    start: StartAt,
    each: impl FnMut(StoredMessage) -> ControlFlow<()>,
) -> Result<()> {
    read_each_with(bus, stream, filter, start, false, each).await
}

async fn read_each_with(
    bus: &Bus,
    stream: &str,
    filter: &str,
    start: StartAt,
    headers_only: bool,
    mut each: impl FnMut(StoredMessage) -> ControlFlow<()>,
) -> Result<()> {
    let (handle, info) = open(bus, stream).await?;
    if info.config.retention == async_nats::jetstream::stream::RetentionPolicy::WorkQueue {
        return read_by_sequence(&handle, stream, filter, start, &info.state, each).await;
    }
    let deliver_policy = match start {
        StartAt::Beginning => DeliverPolicy::All,
        StartAt::Sequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
        StartAt::Time(start_time) => DeliverPolicy::ByStartTime { start_time },
    };
    let consumer = handle
        .create_consumer(pull::OrderedConfig {
            name: Some(reader_name()),
            filter_subject: filter.to_owned(),
            deliver_policy,
            headers_only,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::jetstream(format!("cannot read stream {stream}"), e))?;
    let mut pending = consumer.cached_info().num_pending;
    if pending == 0 {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::jetstream(format!("cannot read stream {stream}"), e))?;
    while pending > 0 {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| Error::jetstream(format!("reading stream {stream}"), "timed out"))?;
        let Some(message) = next else { break };
        let message =
            message.map_err(|e| Error::jetstream(format!("reading stream {stream}"), e))?;
        let (stored, left) = stored(&message)?;
        pending = left;
        if each(stored).is_break() {
            break;
        }
    }
    Ok(())
}

/// Reads a stream by sequence, without a consumer (for work queues),
/// handing each message to `each` as [`read_each`] does.
async fn read_by_sequence(
    handle: &async_nats::jetstream::stream::Stream,
    stream: &str,
    filter: &str,
    start: StartAt,
    state: &async_nats::jetstream::stream::State,
    mut each: impl FnMut(StoredMessage) -> ControlFlow<()>,
) -> Result<()> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
    let last = state.last_sequence;
    let mut next = match start {
        StartAt::Sequence(s) => s.max(state.first_sequence),
        StartAt::Beginning | StartAt::Time(_) => state.first_sequence,
    };
    while next <= last && state.messages > 0 {
        let message = match handle.get_first_raw_message_by_subject(filter, next).await {
            Ok(m) => m,
            // Nothing matches from here on (or the rest was consumed meanwhile).
            Err(e) if e.kind() == Kind::NoMessageFound => break,
            Err(e) => return Err(Error::jetstream(format!("reading stream {stream}"), e)),
        };
        if message.sequence > last {
            break;
        }
        next = message.sequence + 1;
        if let StartAt::Time(t) = start {
            if message.time < t {
                continue;
            }
        }
        let stored = StoredMessage {
            sequence: message.sequence,
            subject: message.subject.to_string(),
            headers: Some(message.headers),
            payload: message.payload,
            published: message.time,
        };
        if each(stored).is_break() {
            break;
        }
    }
    Ok(())
}

/// The messages of `stream` matching `filter` with a sequence above
/// `after`, as they arrive: what was stored after a [`read`] and everything
/// published from now on. Ends only when the caller drops it.
///
/// A work-queue stream cannot be followed (its workers are its only
/// readers); [`read`] still shows what is queued.
pub async fn follow(
    bus: &Bus,
    stream: &str,
    filter: &str,
    after: u64,
) -> Result<impl Stream<Item = Result<StoredMessage>>> {
    let (handle, info) = open(bus, stream).await?;
    if info.config.retention == async_nats::jetstream::stream::RetentionPolicy::WorkQueue {
        return Err(Error::jetstream(
            format!("cannot follow {stream}"),
            "a work queue is read only by its workers; follow EVENTS or DLQ",
        ));
    }
    let consumer = handle
        // No name: a long follow outlives reconnections and leader
        // changes, after which the client recreates its consumer, and a
        // new name each time never clashes with one it could not delete.
        // (Only the user skein follows; the ingress reads, named.)
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| Error::jetstream(format!("cannot follow stream {stream}"), e))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| Error::jetstream(format!("cannot follow stream {stream}"), e))?;
    let stream = stream.to_owned();
    Ok(messages.map(move |message| {
        let message = message.map_err(|e| Error::jetstream(format!("following {stream}"), e))?;
        Ok(stored(&message)?.0)
    }))
}

/// The last sequence of `stream` now (0 when empty).
pub async fn last_sequence(bus: &Bus, stream: &str) -> Result<u64> {
    Ok(open(bus, stream).await?.1.state.last_sequence)
}

/// The first sequence `stream` still holds: 1 (or 0, empty) for a stream
/// that has lost nothing; more once its limits (`max_age`, `max_bytes`)
/// have removed its oldest messages, which no reader gets back.
pub async fn first_sequence(bus: &Bus, stream: &str) -> Result<u64> {
    Ok(open(bus, stream).await?.1.state.first_sequence)
}

/// The stream `name` and its current info.
async fn open(
    bus: &Bus,
    name: &str,
) -> Result<(
    async_nats::jetstream::stream::Stream,
    async_nats::jetstream::stream::Info,
)> {
    let mut handle = bus
        .jetstream()
        .get_stream(name)
        .await
        .map_err(|e| Error::jetstream(format!("cannot open stream {name}"), e))?;
    let info = handle
        .info()
        .await
        .map_err(|e| Error::jetstream(format!("cannot read stream {name}"), e))?
        .clone();
    Ok((handle, info))
}

/// A consumed message as stored, with how many are pending after it.
fn stored(message: &async_nats::jetstream::Message) -> Result<(StoredMessage, u64)> {
    let info = message
        .info()
        .map_err(|e| Error::jetstream("message without metadata", e.to_string()))?;
    Ok((
        StoredMessage {
            sequence: info.stream_sequence,
            subject: message.subject.to_string(),
            headers: message.headers.clone(),
            payload: message.payload.clone(),
            published: info.published,
        },
        info.pending,
    ))
}
