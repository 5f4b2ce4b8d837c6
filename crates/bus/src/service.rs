//! The NATS service API of a worker (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`).
//!
//! Every worker copy registers as a NATS micro service named after the
//! worker, so `$SRV.PING.<name>` finds all its copies, and `$SRV.STATS.<name>`
//! returns each copy's figures ([`StatsSnapshot`](crate::StatsSnapshot)) in the endpoint `data`. The
//! same figures answer `queries.<name>.status` (queue group = worker name).

use std::sync::Arc;

use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::connect::Bus;
use crate::error::{Error, Result};
use crate::stats::WorkerStats;

/// A registered service; stops answering when dropped or stopped.
#[derive(Debug)]
pub struct ServiceHandle {
    task: JoinHandle<()>,
}

impl ServiceHandle {
    /// Stops answering.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Registers `name` on the service API, answering with `stats`.
pub async fn start_service(
    bus: &Bus,
    name: &str,
    version: &str,
    stats: Arc<WorkerStats>,
) -> Result<ServiceHandle> {
    use async_nats::service::ServiceExt;

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
    let subject = skein_message::subject::query(name, "status");
    let mut endpoint = service
        .endpoint_builder()
        .name("status")
        .add(subject.as_str())
        .await
        .map_err(|e| Error::jetstream(format!("cannot add endpoint {subject}"), e))?;
    let task = tokio::spawn(async move {
        // Keep the service alive as long as the task runs.
        let _service = service;
        while let Some(request) = endpoint.next().await {
            let body = serde_json::to_vec(&stats.snapshot()).unwrap_or_default();
            if let Err(e) = request.respond(Ok(body.into())).await {
                tracing::debug!(error = %e, "cannot answer status request");
            }
        }
    });
    Ok(ServiceHandle { task })
}
