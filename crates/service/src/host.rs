//! [`Host`]: a worker's store, relay, consumers, queries and figures.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use skein_bus::service::{start_service, ServiceHandle};
use skein_bus::{Bus, RunningWorker, Worker, WorkerConfig, WorkerStats};
use skein_contracts::ServiceError;
use skein_message::{envelope::headers, MessageContext, Query};
use skein_outbox::{Inbox, Relay, RelayConfig, Store, TxHandler};
use std::time::Duration;

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::Result;

/// How to host a worker.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Worker (service) name: the durable consumer names, the inbox name,
    /// the service API name and the query subjects' middle token. A contract.
    pub name: String,
    /// Version shown on the service API.
    pub version: String,
    /// Relay settings.
    pub relay: RelayConfig,
}

impl HostConfig {
    /// Defaults for `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            relay: RelayConfig::default(),
        }
    }
}

/// A running worker host.
#[derive(Debug)]
pub struct Host {
    config: HostConfig,
    bus: Bus,
    store: Store,
    stats: Arc<WorkerStats>,
    service: ServiceHandle,
    workers: Vec<RunningWorker>,
    relay: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
    /// A host dropped without [`Host::shutdown`] (a start that failed after
    /// it, say) stops its relay and background tasks instead of leaving
    /// them running, the relay holding its lock or lease. (Its consumers
    /// stop when dropped.)
    _stop_when_dropped: DropGuard,
}

impl Host {
    /// Starts the relay and registers the service; add consumers and queries next.
    pub async fn start(bus: Bus, store: Store, config: HostConfig) -> Result<Self> {
        let stats = Arc::new(WorkerStats::default());
        let shutdown = CancellationToken::new();
        let relay = Relay::new(store.clone(), bus.publisher(), config.relay.clone())
            .for_service(&config.name)
            .with_stats(stats.clone())
            .spawn(shutdown.clone());
        let service = start_service(&bus, &config.name, &config.version, stats.clone()).await?;
        Ok(Self {
            config,
            bus,
            store,
            stats,
            service,
            workers: Vec::new(),
            relay,
            tasks: Vec::new(),
            _stop_when_dropped: shutdown.clone().drop_guard(),
            shutdown,
        })
    }

    /// Binds this worker's durable consumer on `stream` (named after the
    /// worker) to `handler`, run once per message through the inbox.
    /// `tune` adjusts the consumer settings (lanes, ack wait, retries).
    pub async fn consume<H: TxHandler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        handler: H,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> Result<()> {
        let inbox = self.inbox(handler);
        self.consume_handler(stream, filter_subjects, inbox, tune)
            .await
    }

    /// Binds this worker's durable consumer on `stream` to a bus handler of
    /// your own, for work that must happen outside the transaction (a slow
    /// call to a provider); wrap the transactional part with [`Host::inbox`].
    pub async fn consume_handler<H: skein_bus::Handler>(
        &mut self,
        stream: &str,
        filter_subjects: Vec<String>,
        handler: H,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> Result<()> {
        let mut config = WorkerConfig::new(&self.config.name, stream, filter_subjects);
        tune(&mut config);
        // A consumer of a worker that consumed this stream before and is
        // missing now was lost: made again where the inbox still knows what
        // ran, not at the beginning of a year of history.
        let (name, stream) = (config.name.clone(), config.stream.clone());
        let before = self.store.consumed_before(&name, &stream).await?;
        config.start_within = before.then_some(self.config.relay.inbox_retention);
        config.forgets_after = Some(self.config.relay.inbox_retention);
        let worker =
            Worker::start_with_stats(&self.bus, config, handler, self.stats.clone()).await?;
        if !before {
            self.store.record_consumer(&name, &stream).await?;
        }
        self.workers.push(worker);
        Ok(())
    }

    /// `handler` wrapped in this worker's inbox.
    pub fn inbox<H: TxHandler>(&self, handler: H) -> Inbox<H> {
        Inbox::new(self.store.clone(), &self.config.name, handler)
    }

    /// Answers the query `Q` on `queries.<Q::SERVICE>.<Q::NAME>` with `handler`.
    ///
    /// A request that is not valid JSON for `Q` (including unknown fields) is
    /// answered 400 with the parse error; the handler's [`ServiceError`]s are
    /// answered as they are; the correlation id of the request
    /// (`ce-correlationid` header) is handed to the handler for the messages
    /// it causes.
    pub async fn query<Q, F, Fut>(&mut self, handler: F) -> Result<()>
    where
        Q: Query,
        F: Fn(Q, MessageContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Q::Reply, ServiceError>> + Send + 'static,
    {
        let subject = skein_message::subject::query(Q::SERVICE, Q::NAME);
        let handler = Arc::new(handler);
        self.service
            .add_endpoint(Q::NAME, &subject, move |message| {
                let handler = handler.clone();
                async move {
                    let query: Q = serde_json::from_slice(&message.payload)
                        .map_err(|e| (400, format!("invalid {} request: {e}", Q::type_name())))?;
                    let header = |name: &str| {
                        message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(name))
                            .map(|v| v.as_str().to_owned())
                    };
                    let mut context = header(headers::CORRELATION_ID)
                        .map(MessageContext::with_correlation)
                        .unwrap_or_else(MessageContext::root);
                    // What the request continues (an HTTP request's trace),
                    // continued in the messages the handler sends.
                    // A malformed one (a request sent by hand) is not
                    // carried on, as `Envelope::from_parts` does not.
                    context.traceparent = header(headers::TRACEPARENT)
                        .filter(|v| skein_message::envelope::trace_and_flags(v).is_some());
                    let reply = handler(query, context)
                        .await
                        .map_err(|e| (e.status, e.message))?;
                    serde_json::to_vec(&reply)
                        .map(Bytes::from)
                        .map_err(|e| (500, format!("cannot encode reply: {e}")))
                }
            })
            .await?;
        Ok(())
    }

    /// Runs a background task of the worker (a timer, a sweeper) for as
    /// long as the host: `spawn` gets the token that is cancelled when the
    /// host shuts down, and the task is awaited then (aborted by
    /// [`Host::abort`]).
    pub fn spawn_task(&mut self, spawn: impl FnOnce(CancellationToken) -> JoinHandle<()>) {
        self.tasks.push(spawn(self.shutdown.child_token()));
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The figures.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// The worker name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// What a health check needs to see of this worker, without holding it.
    pub fn probe(&self) -> HostProbe {
        let mut parts = vec![("the outbox relay".to_owned(), self.relay.abort_handle())];
        for worker in &self.workers {
            if let Some(task) = worker.watch_handle() {
                parts.push((format!("the consumer on {}", worker.stream()), task));
            }
        }
        for (n, task) in self.tasks.iter().enumerate() {
            parts.push((format!("background task {}", n + 1), task.abort_handle()));
        }
        HostProbe {
            name: self.config.name.clone(),
            store: self.store.clone(),
            parts,
        }
    }

    /// Tells every consumer to stop pulling, without waiting: what
    /// [`Host::shutdown`] does first. Stopping several hosts, call this on
    /// each before shutting any down, so that none takes new messages
    /// while another finishes its own.
    pub fn stop_pulling(&self) {
        for worker in &self.workers {
            worker.shutdown_token().cancel();
        }
    }

    /// Stops consuming (finishing in-flight messages, every consumer at
    /// once), stops answering queries (answering those that reached this
    /// copy, some of which write messages; once this returns the server
    /// sends its queries to the other copies), stops the background tasks,
    /// and last publishes what is committed.
    pub async fn shutdown(self) {
        self.stop_pulling();
        for worker in self.workers {
            worker.shutdown().await;
        }
        self.service.stop().await;
        self.shutdown.cancel();
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(worker = %self.config.name, error = %e, "a background task failed");
            }
        }
        if let Err(e) = self.relay.await {
            tracing::error!(worker = %self.config.name, error = %e, "the outbox relay failed");
        }
    }

    /// Stops everything at once, as a crash would.
    pub fn abort(self) {
        for worker in self.workers {
            worker.abort();
        }
        for task in self.tasks {
            task.abort();
        }
        self.relay.abort();
        drop(self.service);
    }
}

/// Shuts `hosts` down: every consumer of every host stops pulling at once,
/// then each host shuts down ([`Host::shutdown`]), the last started first.
pub async fn shutdown_all(hosts: Vec<Host>) {
    for host in &hosts {
        host.stop_pulling();
    }
    for host in hosts.into_iter().rev() {
        host.shutdown().await;
    }
}

/// A running [`Host`] as a health check sees it ([`Host::probe`]).
#[derive(Debug, Clone)]
pub struct HostProbe {
    name: String,
    store: Store,
    parts: Vec<(String, AbortHandle)>,
}

impl HostProbe {
    /// The worker name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The parts of the worker (relay, consumers, background tasks) that
    /// stopped, each named. They run until the host shuts down; one that
    /// ended before (a panic) comes back only with a restart.
    pub fn stopped(&self) -> Vec<String> {
        self.parts
            .iter()
            .filter(|(_, task)| task.is_finished())
            .map(|(what, _)| what.clone())
            .collect()
    }

    /// Whether the worker's database answers a query within `within`; if
    /// not, why.
    pub async fn database(&self, within: Duration) -> std::result::Result<(), String> {
        match tokio::time::timeout(within, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", within.as_millis())),
        }
    }
}
