//! Publishing to JetStream with acknowledgements.

use async_nats::jetstream::{self, context::PublishAckFuture, publish::PublishAck};
use async_nats::HeaderMap;
use bytes::Bytes;
use skein_message::Envelope;

use crate::error::{Error, Result};

/// One message ready to publish: subject, headers (including `Nats-Msg-Id`)
/// and payload.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// NATS subject.
    pub subject: String,
    /// Headers; for skein messages the CloudEvents attributes.
    pub headers: HeaderMap,
    /// Payload.
    pub payload: Bytes,
}

impl From<&Envelope> for Outgoing {
    fn from(envelope: &Envelope) -> Self {
        Self {
            subject: envelope.nats_subject.clone(),
            headers: envelope.headers(),
            payload: envelope.data.clone(),
        }
    }
}

/// Publishes messages and waits for JetStream to store them.
///
/// A publish returns only once the stream has acknowledged the message; a
/// repeated `Nats-Msg-Id` within the stream's duplicate window is
/// acknowledged with `duplicate = true` and not stored twice.
#[derive(Debug, Clone)]
pub struct Publisher {
    js: jetstream::Context,
}

impl Publisher {
    pub(crate) fn new(js: jetstream::Context) -> Self {
        Self { js }
    }

    /// The NATS connection it publishes on, for core messages that need no
    /// stream (such as waking another process's outbox relay).
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// Publishes one envelope and awaits its ack.
    pub async fn publish(&self, envelope: &Envelope) -> Result<PublishAck> {
        self.publish_outgoing(&Outgoing::from(envelope)).await
    }

    /// Publishes one message and awaits its ack.
    pub async fn publish_outgoing(&self, message: &Outgoing) -> Result<PublishAck> {
        let future = self.send(message).await?;
        future.await.map_err(|e| Error::Publish {
            subject: message.subject.clone(),
            source: e.into(),
        })
    }

    /// Publishes many messages pipelined: all are sent before any ack is
    /// awaited, which is what makes a relay fast. Results come back in input
    /// order; the messages are stored in input order too, as they travel on
    /// one connection.
    pub async fn publish_batch(&self, messages: &[Outgoing]) -> Vec<Result<PublishAck>> {
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            pending.push(self.send(message).await);
        }
        // Awaited together: an ack's timeout starts when it is first
        // polled, so awaiting them one by one made N lost acks (a server
        // restarting) cost N timeouts instead of one.
        futures::future::join_all(
            messages
                .iter()
                .zip(pending)
                .map(|(message, sent)| async move {
                    match sent {
                        Ok(future) => future.await.map_err(|e| Error::Publish {
                            subject: message.subject.clone(),
                            source: e.into(),
                        }),
                        Err(e) => Err(e),
                    }
                }),
        )
        .await
    }

    async fn send(&self, message: &Outgoing) -> Result<PublishAckFuture> {
        self.js
            .send_publish(
                message.subject.clone(),
                jetstream::message::PublishMessage::build()
                    .headers(message.headers.clone())
                    .payload(message.payload.clone()),
            )
            .await
            .map_err(|e| Error::Publish {
                subject: message.subject.clone(),
                source: e.into(),
            })
    }
}

/// Sends a core NATS message (no stream, no ack) if the connection is up,
/// waiting at most `within` for room in the client's queue; returns whether
/// it went out. For signals that the poll or the server's timers make up
/// for when lost (a relay's wake-up, "in progress"), and that must never
/// hold their sender up while the client reconnects.
pub async fn send_if_connected(
    client: &async_nats::Client,
    subject: impl async_nats::subject::ToSubject,
    payload: Bytes,
    within: std::time::Duration,
) -> bool {
    if client.connection_state() != async_nats::connection::State::Connected {
        return false;
    }
    matches!(
        tokio::time::timeout(within, client.publish(subject, payload)).await,
        Ok(Ok(()))
    )
}
