//! The NATS service API of a worker (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`).
//!
//! Every worker copy registers as a NATS micro service named after the
//! worker, so `$SRV.PING.<name>` finds all its copies, and `$SRV.STATS.<name>`
//! returns each copy's figures ([`StatsSnapshot`](crate::StatsSnapshot)) in
//! the endpoint `data`. The same figures answer `queries.<name>.status`.
//! Further endpoints (a service's queries) are added with
//! [`ServiceHandle::add_endpoint`]; all share the queue group `<name>`, so a
//! request goes to exactly one copy.
//!
//! A copy that stops ([`ServiceHandle::stop`]) unsubscribes, waits until the
//! server has processed that (so the requests sent afterwards go to the
//! other copies) and answers every request that reached it before it
//! returns: a rolling restart costs callers no timeouts. What is still
//! lost is a request the server routed to the copy in the instant between
//! the copy's dropping its subscription and the server's reading of the
//! unsubscribe (the client library has no drain that waits for the server).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::{Service, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::{JoinHandle, JoinSet};

use crate::connect::Bus;
use crate::error::{Error, Result};
use crate::stats::WorkerStats;

/// An error answer: a status code (HTTP-like) and a message, sent in the
/// `Nats-Service-Error-Code` and `Nats-Service-Error` headers.
pub type EndpointError = (u16, String);

/// How long a stopping copy waits for the requests that reached it to be
/// answered: far past any caller's timeout (the ingress gives a query 3 s by
/// default), so only a handler that hangs is cut off.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A registered service; stops answering when stopped ([`ServiceHandle::stop`],
/// gracefully) or dropped (at once).
#[derive(Debug)]
pub struct ServiceHandle {
    service: Option<Service>,
    client: async_nats::Client,
    /// One task per endpoint; it ends once its subscription is gone and
    /// every request it received has been answered.
    tasks: Vec<JoinHandle<()>>,
    name: String,
}

impl ServiceHandle {
    /// Answers requests on `subject` with `handler`, each request in its own
    /// task. `name` shows in `$SRV.INFO` and `$SRV.STATS`. Once this returns
    /// the server routes requests on `subject` to this copy.
    pub async fn add_endpoint<F, Fut>(
        &mut self,
        name: &str,
        subject: &str,
        handler: F,
    ) -> Result<()>
    where
        F: Fn(async_nats::Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, EndpointError>> + Send + 'static,
    {
        let Some(service) = &self.service else {
            return Err(Error::jetstream(
                format!("cannot add endpoint {subject} to {}", self.name),
                "the service has stopped",
            ));
        };
        let mut endpoint = service
            .endpoint_builder()
            .name(name)
            .add(subject)
            .await
            .map_err(|e| {
                Error::jetstream(format!("cannot add endpoint {subject} to {}", self.name), e)
            })?;
        let handler = Arc::new(handler);
        self.tasks.push(tokio::spawn(async move {
            // Each request runs in a task of its own; they are awaited
            // before this task ends, so a stop answers them all.
            let mut in_flight = JoinSet::new();
            loop {
                let request = tokio::select! {
                    request = endpoint.next() => match request {
                        Some(request) => request,
                        // Stopped: what had arrived has been handed out.
                        None => break,
                    },
                    Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
                };
                if !answerable(request.message.reply.as_deref()) {
                    tracing::warn!(
                        subject = %request.message.subject,
                        reply = ?request.message.reply.as_deref(),
                        "not answering a request whose reply subject is not an inbox"
                    );
                    continue;
                }
                let handler = handler.clone();
                in_flight.spawn(async move {
                    let answer =
                        handler(request.message.clone())
                            .await
                            .map_err(|(status, message)| async_nats::service::error::Error {
                                code: usize::from(status),
                                status: message,
                            });
                    if let Err(e) = request.respond(answer).await {
                        tracing::debug!(error = %e, "cannot answer request");
                    }
                });
            }
            while in_flight.join_next().await.is_some() {}
        }));
        // Once this returns the server knows the subscription, so a request
        // sent right after (from any connection) finds a responder: a
        // request on this connection is processed after its SUB, and any
        // copy's answer proves the server has got that far.
        let ping = format!("$SRV.PING.{}", self.name);
        self.client
            .request(ping.clone(), Bytes::new())
            .await
            .map_err(|e| Error::Io {
                context: format!("cannot confirm the endpoint {subject} with {ping}"),
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(())
    }

    /// Stops answering, gracefully: the endpoints unsubscribe, the requests
    /// that reached this copy are answered (for at most 10 s),
    /// and a round trip to the server confirms it has dropped this copy's
    /// subscriptions, so a request sent once this returns goes to another
    /// copy (or gets "no responders" at once) instead of waiting for an
    /// answer that never comes. Disconnected from NATS, it stops at once.
    pub async fn stop(mut self) {
        if let Some(service) = self.service.take() {
            // Every endpoint sees the stop on its next poll and
            // unsubscribes; its stream then ends after what had arrived.
            let _ = service.stop().await;
        }
        let tasks = std::mem::take(&mut self.tasks);
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        if self.client.connection_state() != async_nats::connection::State::Connected {
            // Nothing reaches the server now: no unsubscribe, no answer.
            // Waiting would only hold up the stop.
            for abort in aborts {
                abort.abort();
            }
            return;
        }
        if tokio::time::timeout(STOP_GRACE, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!(
                service = %self.name,
                grace = ?STOP_GRACE,
                "requests still unanswered after the grace; stopping them"
            );
            for abort in aborts {
                abort.abort();
            }
        }
        // The unsubscribes went out before this request on the same
        // connection, so any reply (an answer from another copy, or the
        // server's "no responders") comes after the server processed them.
        // (Should it reach this copy's own PING handler, stopping too, no
        // answer comes: a second is all that waits for one.)
        let confirm = format!("$SRV.PING.{}", self.name);
        let request = async_nats::Request::new().timeout(Some(Duration::from_secs(1)));
        if let Err(e) = self.client.send_request(confirm, request).await {
            if e.kind() != async_nats::client::RequestErrorKind::NoResponders {
                tracing::debug!(service = %self.name, error = %e, "cannot confirm the unsubscribe");
            }
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Subjects an answer must never go to: JetStream's and the system's API
/// and skein's own message subjects.
const NOT_A_REPLY: [&str; 10] = [
    "$JS.",
    "$KV.",
    "$O.",
    "$SRV.",
    "$SYS.",
    "events.",
    "commands.",
    "queries.",
    "dlq.",
    "skein.",
];

/// Whether a request's answer may go to `reply`. An answer is published
/// with this service's permissions, so a caller that names one of skein's
/// subjects or JetStream's API as its reply (say `$JS.ACK.…` of a message
/// this service is handling, which an empty error answer would
/// acknowledge, or a command subject, which would store the answer in
/// `COMMANDS`) gets none. Inboxes of any prefix (`_INBOX.`, a user's, a
/// client's own, `_R_.` of an imported service) are answered.
fn answerable(reply: Option<&str>) -> bool {
    reply.is_some_and(|r| !NOT_A_REPLY.iter().any(|p| r.starts_with(p)))
}

/// Registers `name` on the service API, answering with `stats`, with the
/// endpoint `queries.<name>.status`.
pub async fn start_service(
    bus: &Bus,
    name: &str,
    version: &str,
    stats: Arc<WorkerStats>,
) -> Result<ServiceHandle> {
    let for_stats = stats.clone();
    let service = bus
        .client()
        .service_builder()
        .description(format!("skein worker {name}"))
        .queue_group(name)
        .stats_handler(move |_endpoint, _stats| {
            serde_json::to_value(for_stats.snapshot()).unwrap_or(serde_json::Value::Null)
        })
        .start(name, version)
        .await
        .map_err(|e| Error::jetstream(format!("cannot register service {name}"), e))?;
    let mut handle = ServiceHandle {
        service: Some(service),
        client: bus.client().clone(),
        tasks: Vec::new(),
        name: name.to_owned(),
    };
    let subject = skein_message::subject::query(name, "status");
    handle
        .add_endpoint("status", &subject, move |_request| {
            let body = serde_json::to_vec(&stats.snapshot()).unwrap_or_default();
            async move { Ok(Bytes::from(body)) }
        })
        .await?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_go_only_to_inboxes() {
        for reply in [
            "_INBOX.abc.1",
            "_INBOX.payments.abc.1",
            "MY_INBOX.abc.1",
            "_R_.abc.1",
        ] {
            assert!(super::answerable(Some(reply)), "{reply}");
        }
        for reply in [
            None,
            Some("$JS.ACK.COMMANDS.payments.1.2.3.4.5"),
            Some("$JS.API.STREAM.DELETE.EVENTS"),
            Some("commands.orders.confirm_order"),
            Some("events.orders.x.order_confirmed"),
            Some("skein.outbox.wake.orders.x"),
        ] {
            assert!(!super::answerable(reply), "{reply:?}");
        }
    }
}
