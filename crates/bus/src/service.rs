//! The NATS service API of a worker (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`).
//!
//! Every worker copy registers as a NATS micro service named after the
//! worker, so `$SRV.PING.<name>` finds all its copies, and `$SRV.STATS.<name>`
//! returns each copy's figures ([`StatsSnapshot`](crate::StatsSnapshot)) in
//! the endpoint `data`. The same figures answer `queries.<name>.status`.
//! Further endpoints (a service's queries) are added with
//! [`ServiceHandle::add_endpoint`]; all share the queue group `<name>`, so a
//! request goes to exactly one copy.

use std::future::Future;
use std::sync::Arc;

use async_nats::service::{Service, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::connect::Bus;
use crate::error::{Error, Result};
use crate::stats::WorkerStats;

/// An error answer: a status code (HTTP-like) and a message, sent in the
/// `Nats-Service-Error-Code` and `Nats-Service-Error` headers.
pub type EndpointError = (u16, String);

/// A registered service; stops answering when dropped or stopped.
#[derive(Debug)]
pub struct ServiceHandle {
    service: Service,
    tasks: Vec<JoinHandle<()>>,
    name: String,
}

impl ServiceHandle {
    /// Answers requests on `subject` with `handler`, each request in its own
    /// task. `name` shows in `$SRV.INFO` and `$SRV.STATS`.
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
        let mut endpoint = self
            .service
            .endpoint_builder()
            .name(name)
            .add(subject)
            .await
            .map_err(|e| {
                Error::jetstream(format!("cannot add endpoint {subject} to {}", self.name), e)
            })?;
        let handler = Arc::new(handler);
        self.tasks.push(tokio::spawn(async move {
            while let Some(request) = endpoint.next().await {
                if !answerable(request.message.reply.as_deref()) {
                    tracing::warn!(
                        subject = %request.message.subject,
                        reply = ?request.message.reply.as_deref(),
                        "not answering a request whose reply subject is not an inbox"
                    );
                    continue;
                }
                let handler = handler.clone();
                tokio::spawn(async move {
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
        }));
        Ok(())
    }

    /// Stops answering.
    pub fn stop(self) {}
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
        service,
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
