//! The consumer-group runtime.
//!
//! A worker binds one durable pull consumer named after it. Every copy of the
//! worker, in this process or another, pulls from that same consumer, so the
//! copies share the work and a dead copy's unacknowledged messages go to the
//! others after `ack_wait`.
//!
//! Inside one copy, messages run in *lanes*: a message goes to the lane its
//! entity hashes to (`ce-subject`, or the entity token of an event subject),
//! so messages about one entity run one after another while different
//! entities run in parallel, up to `lanes` at a time.
//!
//! The handler's result decides the acknowledgement, in one place
//! ([`Worker`]'s `settle`):
//!
//! | outcome | action |
//! |---|---|
//! | `Ok` | ack |
//! | transient error, deliveries < `max_deliver` | nak with backoff |
//! | transient error at `max_deliver`, permanent error, undecodable message | dead letter, then ack |
//!
//! While a handler runs, the runtime sends "in progress" to the server every
//! third of `ack_wait`, so a slow handler is not redelivered to another copy;
//! so it does for a message handed to a lane that waits behind others there
//! (a slow entity's backlog), which would otherwise be redelivered while it
//! waits, run twice and count deliveries towards the dead-letter limit
//! without ever failing.
//!
//! A lane's queue has no bound of its own: a copy holds at most `max_held`
//! messages, queued or running, whatever lanes they are in, so a slow
//! entity's backlog smaller than that does not hold up the messages of the
//! others (head-of-line blocking). Only when the copy holds `max_held`
//! (one entity's backlog of that many, or every lane busy) does it stop taking
//! messages from the pull; those pulled and not yet handed to a lane (at most
//! about one and a half pull batches) are then not reported in progress, and
//! what waits there longer than `ack_wait` is redelivered (the inbox absorbs
//! the second run). A `max_held` below `lanes` also caps how many run at once.
//!
//! Shutdown stops pulling, lets every lane finish the message it runs, and
//! then gives the messages still queued behind it back to the server (a nak
//! without delay, sent once this copy's pull request is gone, so that the
//! server hands them to other copies), instead of running them: a stopping
//! copy takes as long as its slowest running message, whatever its backlog.
//! Each such hand-over counts as a delivery towards `max_deliver`.
//! The server itself redelivers without limit (`max_deliver = -1` on the
//! consumer): the runtime counts deliveries and dead-letters a message that
//! exceeded the limit *before* running it, so a message whose handler kills
//! its process every time still ends in the DLQ.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures::StreamExt;
use skein_message::Envelope;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::connect::Bus;
use crate::dlq::{publish_dead_letter, DeadLetterInfo};
use crate::error::{ErrorKind, HandlerError, Result};
use crate::provision::{apply_consumer, filter_set, ConsumerSpec, Filters};
use crate::publish::{send_if_connected, Publisher};
use crate::stats::WorkerStats;

/// Where a message came from and how often it has been delivered.
#[derive(Debug, Clone)]
pub struct DeliveryInfo {
    /// The stream.
    pub stream: String,
    /// The consumer (worker) name.
    pub consumer: String,
    /// Sequence in the stream.
    pub stream_sequence: u64,
    /// 1 on first delivery.
    pub delivered: u64,
}

/// A message handed to a [`Handler`].
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The decoded envelope.
    pub envelope: Envelope,
    /// Delivery metadata.
    pub info: DeliveryInfo,
}

/// Handles one message. Must be safe to call again with the same message
/// (redelivery): use the inbox for that.
pub trait Handler: Send + Sync + 'static {
    /// Handles `delivery`. The returned error decides between redelivery and
    /// dead-lettering.
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Configuration of a worker's consumer and runtime.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Durable consumer name, by convention the worker's name. A contract:
    /// renaming it makes the worker consume the stream again from the start.
    pub name: String,
    /// Stream to consume.
    pub stream: String,
    /// Subjects to take from the stream.
    pub filter_subjects: Vec<String>,
    /// Parallel lanes (concurrency) in this copy.
    pub lanes: usize,
    /// Deliveries before a transiently failing message is dead-lettered.
    pub max_deliver: u64,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Nak delays by delivery count; the last one repeats.
    pub backoff: Vec<Duration>,
    /// Messages pulled per request.
    pub batch: usize,
    /// Messages this copy holds at most, queued in its lanes or running; it
    /// pulls no more while it holds that many.
    pub max_held: usize,
    /// How often the consumer lag and DLQ depth gauges are refreshed.
    pub figures_interval: Duration,
    /// See [`ConsumerSpec::start_within`]: where a consumer of this worker
    /// found missing (lost) starts on a stream kept as history. A worker
    /// with an inbox that consumed the stream before this start (its
    /// database says so) gives its inbox retention; `None`, for a worker
    /// new to the stream: at its beginning (a new read model is built from
    /// the whole history, and a consumer lost while it catches up must not
    /// skip what it has not run yet).
    pub start_within: Option<Duration>,
    /// How long the worker's inbox remembers what it handled (its
    /// retention), if it has one. A consumer lost after this copy has run
    /// that long is made again at the messages stored within it, also when
    /// the worker was new to the stream at start (`start_within` `None`):
    /// what it handled longer ago may be forgotten, and would run again.
    pub forgets_after: Option<Duration>,
    /// How long a message on a subject this copy does not take waits before
    /// it comes again. The consumer group takes every version's subjects
    /// during a rolling upgrade (a newer copy widens its filters), so an
    /// older copy is handed messages only a newer one handles; it leaves
    /// them for such a copy, 30 s at a time (about five minutes with 10
    /// deliveries, then the DLQ, from where `skein dlq redrive` brings them
    /// back once the upgrade is done).
    pub not_taken_delay: Duration,
}

/// The durable consumer a worker with this configuration binds (what
/// [`Worker::start`] creates or updates, and `skein streams apply` creates
/// for workers whose NATS user may not).
impl From<&WorkerConfig> for ConsumerSpec {
    fn from(config: &WorkerConfig) -> Self {
        Self {
            stream: config.stream.clone(),
            durable: config.name.clone(),
            filter_subjects: config.filter_subjects.clone(),
            ack_wait: Some(config.ack_wait),
            max_ack_pending: None,
            start_within: config.start_within,
            start_sequence: None,
        }
    }
}

impl WorkerConfig {
    /// Defaults: 16 lanes, 10 deliveries (with the backoff, a transient
    /// failure such as a database restarting is retried for about 20 s
    /// before the message is dead-lettered), 10 s ack wait (a copy that dies
    /// holding messages delays them that long; a live copy extends it while
    /// a handler runs), backoff 100 ms doubling to 5 s.
    pub fn new(
        name: impl Into<String>,
        stream: impl Into<String>,
        filter_subjects: Vec<String>,
    ) -> Self {
        Self {
            name: name.into(),
            stream: stream.into(),
            filter_subjects,
            lanes: 16,
            max_deliver: 10,
            ack_wait: Duration::from_secs(10),
            backoff: [100, 200, 400, 800, 1600, 3200, 5000]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            // Pulled but not yet handled messages wait on this copy; keep
            // the buffer near what the lanes can take.
            batch: 64,
            max_held: 128,
            figures_interval: Duration::from_secs(5),
            start_within: None,
            forgets_after: None,
            not_taken_delay: Duration::from_secs(30),
        }
    }

    /// How often a message held by this copy is reported in progress: a
    /// third of `ack_wait`, at least 100 ms.
    fn progress_period(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(100))
    }

    /// The consumer to bind again once lost, `running` after this copy
    /// first bound `spec`. After what it last saw acknowledged
    /// (`unacknowledged`: the first sequence not acknowledged, and how long
    /// ago it looked), unless it looked longer ago than the inbox
    /// remembers (what was acknowledged since may be forgotten); else past
    /// the inbox's retention within it (see
    /// [`WorkerConfig::forgets_after`]).
    fn rebinding(
        &self,
        spec: &ConsumerSpec,
        running: Duration,
        unacknowledged: Option<(u64, Duration)>,
    ) -> ConsumerSpec {
        let forgotten = self.forgets_after.filter(|after| running >= *after);
        let start_sequence = unacknowledged
            .filter(|(_, ago)| self.forgets_after.is_none_or(|after| *ago < after))
            .map(|(sequence, _)| sequence);
        ConsumerSpec {
            start_within: spec.start_within.or(forgotten),
            start_sequence,
            ..spec.clone()
        }
    }

    /// Whether this copy handles messages on `subject`: its filters match
    /// it (no filter: the whole stream).
    fn takes(&self, subject: &str) -> bool {
        self.filter_subjects.is_empty()
            || self
                .filter_subjects
                .iter()
                .any(|filter| skein_message::subject::matches(filter, subject))
    }

    fn delay_for(&self, delivered: u64) -> Duration {
        let i = usize::try_from(delivered.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// A worker: a handler bound to a consumer group.
#[derive(Debug)]
pub struct Worker;

/// A running worker copy.
#[derive(Debug)]
pub struct RunningWorker {
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    lanes: Vec<tokio::task::AbortHandle>,
    stats: Arc<WorkerStats>,
    name: String,
    stream: String,
}

impl Worker {
    /// Binds (creating or updating) the worker's durable consumer and starts
    /// pulling. Returns once the consumer exists.
    pub async fn start<H: Handler>(
        bus: &Bus,
        config: WorkerConfig,
        handler: H,
    ) -> Result<RunningWorker> {
        Self::start_with_stats(bus, config, handler, Arc::new(WorkerStats::default())).await
    }

    /// Like [`Worker::start`], reporting into the given stats (shared with
    /// the service endpoint and other components).
    pub async fn start_with_stats<H: Handler>(
        bus: &Bus,
        config: WorkerConfig,
        handler: H,
        stats: Arc<WorkerStats>,
    ) -> Result<RunningWorker> {
        let spec = ConsumerSpec::from(&config);
        let (consumer, change) = apply_consumer(bus.jetstream(), &spec, Filters::Widen).await?;
        tracing::info!(worker = %config.name, stream = %config.stream, consumer = %change, "worker bound to its consumer group");
        let taken = &consumer.cached_info().config;
        let mut besides = filter_set(&taken.filter_subject, &taken.filter_subjects);
        besides.retain(|s| !config.filter_subjects.contains(s));
        if !besides.is_empty() {
            tracing::info!(
                worker = %config.name,
                stream = %config.stream,
                subjects = ?besides,
                "the consumer group also takes subjects this copy does not (another version's?); \
                 `skein streams apply --exact` sets them to one version's once all copies run it"
            );
        }
        let shutdown = CancellationToken::new();
        let unacknowledged = Arc::new(std::sync::Mutex::new((
            consumer.cached_info().ack_floor.stream_sequence + 1,
            tokio::time::Instant::now(),
        )));
        let runtime = Arc::new(Runtime {
            config,
            handler,
            publisher: bus.publisher(),
            stats: stats.clone(),
            unacknowledged: unacknowledged.clone(),
        });
        let name = runtime.config.name.clone();
        let stream = runtime.config.stream.clone();
        let lanes = runtime.config.lanes.max(1);
        let waiting = Arc::new(Waiting::default());
        let held = Arc::new(Semaphore::new(runtime.config.max_held.max(1)));
        // Cancelled once this copy pulls no more (its pull request is gone).
        let pulled = CancellationToken::new();
        let mut senders = Vec::with_capacity(lanes);
        let mut lane_tasks = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            // No bound per lane: `held` bounds them all together.
            let (tx, rx) = mpsc::unbounded_channel::<Held>();
            senders.push(tx);
            let runtime = runtime.clone();
            let waiting = waiting.clone();
            let (shutdown, pulled) = (shutdown.clone(), pulled.clone());
            lane_tasks.push(tokio::spawn(async move {
                let mut lane = LaneQueue { rx, waiting };
                while let Some(Held { key, message, .. }) = lane.rx.recv().await {
                    if shutdown.is_cancelled() {
                        // Not before this copy's pull request is gone: the
                        // server would hand the message straight back.
                        pulled.cancelled().await;
                        lane.waiting.start(key).await;
                        let _ = release(&runtime.publisher.client(), &message).await;
                    } else {
                        lane.waiting.start(key).await;
                        runtime.process(message).await;
                    }
                }
            }));
        }
        let mut aborts: Vec<_> = lane_tasks.iter().map(JoinHandle::abort_handle).collect();
        let keeper = tokio::spawn(keep_waiting(
            bus.client().clone(),
            Arc::downgrade(&waiting),
            runtime.config.progress_period(),
        ))
        .abort_handle();
        aborts.push(keeper.clone());
        let figures = tokio::spawn(watch_figures(
            bus.clone(),
            spec.clone(),
            runtime.config.figures_interval,
            stats.clone(),
            unacknowledged,
            shutdown.clone(),
        ));
        aborts.push(figures.abort_handle());
        let task = tokio::spawn(run(
            runtime,
            bus.clone(),
            spec,
            consumer,
            Lanes {
                senders,
                tasks: lane_tasks,
                waiting,
                held,
                pulled,
                keeper,
            },
            shutdown.clone(),
        ));
        Ok(RunningWorker {
            shutdown,
            task: Some(task),
            lanes: aborts,
            stats,
            name,
            stream,
        })
    }
}

impl RunningWorker {
    /// Stops pulling, lets the messages running finish, gives those still
    /// queued behind them back to the server for other copies, and returns.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::error!(worker = %self.name, error = %e, "worker task failed");
            }
        }
    }

    /// A token that stops the worker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops at once without finishing anything, as a crash would: in-flight
    /// messages stay unacknowledged and are redelivered after `ack_wait`.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        for lane in &self.lanes {
            lane.abort();
        }
    }

    /// This copy's figures.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// The stream its consumer reads.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// A handle that tells, without the worker, whether its pulling task
    /// has ended ([`tokio::task::AbortHandle::is_finished`]): once it is
    /// stopped, or on its own (a panic), which only a restart repairs.
    pub fn watch_handle(&self) -> Option<tokio::task::AbortHandle> {
        self.task.as_ref().map(JoinHandle::abort_handle)
    }
}

impl Drop for RunningWorker {
    /// A worker dropped without [`RunningWorker::shutdown`] still stops
    /// gracefully, in the background.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct Runtime<H> {
    config: WorkerConfig,
    handler: H,
    publisher: Publisher,
    stats: Arc<WorkerStats>,
    /// The first stream sequence the consumer had not acknowledged when
    /// this copy last looked (its acknowledgement floor + 1), and when it
    /// looked: where a lost consumer is made again.
    unacknowledged: Unacknowledged,
}

/// See [`Runtime::unacknowledged`].
type Unacknowledged = Arc<std::sync::Mutex<(u64, tokio::time::Instant)>>;

/// What `unacknowledged` says now: the sequence and how long ago it was
/// read.
fn last_unacknowledged(unacknowledged: &Unacknowledged) -> Option<(u64, Duration)> {
    let (sequence, at) = *unacknowledged.lock().ok()?;
    Some((sequence, at.elapsed()))
}

/// A worker copy's lanes: where messages go, the tasks that run them, the
/// messages waiting in them (kept from redelivery by `keeper`), and the
/// permits that bound how many the copy holds.
struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Held>>,
    tasks: Vec<JoinHandle<()>>,
    waiting: Arc<Waiting>,
    held: Arc<Semaphore>,
    pulled: CancellationToken,
    keeper: tokio::task::AbortHandle,
}

/// A message in a lane: its key among the waiting ones, and the permit it
/// holds until it has run (or been released).
struct Held {
    key: u64,
    message: jetstream::Message,
    _permit: OwnedSemaphorePermit,
}

async fn run<H: Handler>(
    runtime: Arc<Runtime<H>>,
    bus: Bus,
    spec: ConsumerSpec,
    mut consumer: jetstream::consumer::Consumer<pull::Config>,
    lanes_of: Lanes,
    shutdown: CancellationToken,
) {
    let Lanes {
        senders,
        tasks: lane_tasks,
        waiting,
        held,
        pulled,
        keeper,
    } = lanes_of;
    let lanes = senders.len();
    let mut backoff = Duration::from_millis(100);
    let bound_at = tokio::time::Instant::now();
    'pull: while !shutdown.is_cancelled() {
        let messages = consumer
            .stream()
            .max_messages_per_batch(runtime.config.batch)
            .heartbeat(Duration::from_secs(3))
            // Short-lived pull requests: one left behind by a stopped copy
            // stops taking messages soon.
            .expires(Duration::from_secs(10))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(worker = %runtime.config.name, error = %e, "cannot pull, retrying");
                if sleep_or_shutdown(&shutdown, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            // Room for one more first: while the copy holds `max_held`
            // messages it takes none from the pull.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => {
                    release_buffered(bus.client(), messages).await;
                    break 'pull;
                }
                permit = held.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break 'pull,
                },
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    release_buffered(bus.client(), messages).await;
                    break 'pull;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    backoff = Duration::from_millis(100);
                    let lane = lane_of(&message, lanes);
                    let key = waiting.add(&message);
                    let held = Held {
                        key,
                        message,
                        _permit: permit,
                    };
                    if senders[lane].send(held).is_err() {
                        // The lane's task ended (a panic): stop, so the
                        // worker's watch sees it.
                        waiting.remove(key);
                        break 'pull;
                    }
                }
                Some(Err(e)) => {
                    use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                    match e.kind() {
                        K::MissingHeartbeat | K::Pull | K::Other => {
                            tracing::debug!(worker = %runtime.config.name, error = %e, "pull interrupted, continuing");
                        }
                        _ => {
                            tracing::warn!(worker = %runtime.config.name, error = %e, "consumer lost, binding again");
                            if sleep_or_shutdown(&shutdown, backoff).await {
                                break 'pull;
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            let spec = runtime.config.rebinding(
                                &spec,
                                bound_at.elapsed(),
                                last_unacknowledged(&runtime.unacknowledged),
                            );
                            match apply_consumer(bus.jetstream(), &spec, Filters::Widen).await {
                                Ok((c, _)) => consumer = c,
                                Err(e) => {
                                    tracing::warn!(worker = %runtime.config.name, error = %e, "cannot bind consumer")
                                }
                            }
                            continue 'pull;
                        }
                    }
                }
                None => continue 'pull,
            }
        }
    }
    // Pulling has stopped (dropping the stream ended the pull request): let
    // the lanes finish what runs and release what is queued.
    pulled.cancel();
    drop(senders);
    for task in lane_tasks {
        let _ = task.await;
    }
    keeper.abort();
    // The last acks and naks are written to the server before the process
    // may exit (else their messages wait for `ack_wait`); never waiting for
    // a reconnection.
    let client = bus.client();
    if client.connection_state() == async_nats::connection::State::Connected {
        if let Err(e) = tokio::time::timeout(Duration::from_secs(1), client.flush())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::debug!(worker = %runtime.config.name, error = %e, "cannot flush the last acknowledgements");
        }
    }
    tracing::info!(worker = %runtime.config.name, "worker stopped");
}

/// Each waiting message by key: its reply subject and when it was last
/// reported in progress (or arrived).
type WaitingMessages = HashMap<u64, (async_nats::Subject, tokio::time::Instant)>;

/// Messages handed to a lane and not yet started, with their reply
/// subjects (where acknowledgements go) and when they were last reported
/// in progress.
#[derive(Debug, Default)]
struct Waiting {
    next: std::sync::atomic::AtomicU64,
    messages: std::sync::Mutex<WaitingMessages>,
    /// Held by the keeper while it sends reports; a lane starting a message
    /// waits for it, so no report of a message follows its ack or nak (a
    /// report after a nak would stretch the nak's backoff to `ack_wait`).
    reporting: tokio::sync::Mutex<()>,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, WaitingMessages> {
        // The map stays consistent whatever a panicking holder did.
        self.messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `message` as waiting; the key to remove it with.
    fn add(&self, message: &jetstream::Message) -> u64 {
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(reply) = &message.reply {
            self.lock()
                .insert(key, (reply.clone(), tokio::time::Instant::now()));
        }
        key
    }

    fn remove(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// The message `key` leaves the queue to run: no more reports from the
    /// keeper, once those already on their way are sent.
    async fn start(&self, key: u64) {
        self.remove(key);
        drop(self.reporting.lock().await);
    }
}

/// A lane's queue. However the lane's task ends (a handler that panicked),
/// the messages still queued stop being reported in progress, so the
/// server redelivers them after `ack_wait`.
struct LaneQueue {
    rx: mpsc::UnboundedReceiver<Held>,
    waiting: Arc<Waiting>,
}

impl Drop for LaneQueue {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(held) = self.rx.try_recv() {
            self.waiting.remove(held.key);
        }
    }
}

/// Gives a message back to the server unrun (a nak without delay), so the
/// next pull request, another copy's, takes it at once. False when the nak
/// could not be sent (never waiting for a reconnection: this runs while
/// stopping): the server redelivers after `ack_wait`.
async fn release(client: &async_nats::Client, message: &jetstream::Message) -> bool {
    let sent = match &message.reply {
        Some(reply) => {
            send_if_connected(
                client,
                reply.clone(),
                bytes::Bytes::from_static(b"-NAK"),
                Duration::from_millis(100),
            )
            .await
        }
        None => false,
    };
    if !sent {
        tracing::debug!("cannot release a message; the server redelivers it after ack_wait");
    }
    sent
}

/// Reports "in progress", every half `period`, for each message that has
/// waited in a lane that long since it arrived or was last reported; ends
/// with the worker (when `waiting` is gone).
async fn keep_waiting(client: async_nats::Client, waiting: Weak<Waiting>, period: Duration) {
    let progress = bytes::Bytes::from_static(b"+WPI");
    let every = period / 2;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(waiting) = waiting.upgrade() else {
            return;
        };
        let _reporting = waiting.reporting.lock().await;
        let due: Vec<async_nats::Subject> = {
            let mut messages = waiting.lock();
            let now = tokio::time::Instant::now();
            messages
                .values_mut()
                .filter(|(_, at)| now.duration_since(*at) >= every)
                .map(|(reply, at)| {
                    *at = now;
                    reply.clone()
                })
                .collect()
        };
        // Never held up by a reconnection: lanes wait for the reports (and
        // the server keeps nothing alive meanwhile anyway).
        for reply in due {
            if !send_if_connected(&client, reply, progress.clone(), Duration::from_millis(100))
                .await
            {
                tracing::debug!("cannot send in-progress for waiting messages now");
                break;
            }
        }
    }
}

/// Keeps the gauges `consumer_lag` (messages not yet delivered to the
/// group), `ack_pending` (delivered, not yet acknowledged) and `dlq_depth`
/// (dead letters of this consumer in the DLQ stream) of the consumer on
/// `spec.stream` up to date (a worker's other consumers keep theirs).
async fn watch_figures(
    bus: Bus,
    spec: ConsumerSpec,
    every: Duration,
    stats: Arc<WorkerStats>,
    unacknowledged: Unacknowledged,
    shutdown: CancellationToken,
) {
    let js = bus.jetstream();
    loop {
        if let Ok(stream) = js.get_stream(&spec.stream).await {
            if let Ok(consumer) = stream.get_consumer::<pull::Config>(&spec.durable).await {
                if let Ok(info) = consumer.get_info().await {
                    if let Ok(mut last) = unacknowledged.lock() {
                        *last = (
                            info.ack_floor.stream_sequence + 1,
                            tokio::time::Instant::now(),
                        );
                    }
                    stats.set_consumer_gauge(
                        "consumer_lag",
                        &spec.stream,
                        i64::try_from(info.num_pending).unwrap_or(i64::MAX),
                    );
                    stats.set_consumer_gauge(
                        "ack_pending",
                        &spec.stream,
                        i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX),
                    );
                }
            }
        }
        if let Ok(dlq) = js.get_stream(crate::provision::DLQ).await {
            let filter = format!(
                "{}.{}.{}",
                skein_message::subject::DLQ_PREFIX,
                spec.stream,
                spec.durable
            );
            if let Ok(subjects) = dlq.info_with_subjects(filter).await {
                let depth: usize = subjects
                    .filter_map(|s| async move { s.ok().map(|(_, n)| n) })
                    .fold(0, |a, n| async move { a + n })
                    .await;
                stats.set_consumer_gauge(
                    "dlq_depth",
                    &spec.stream,
                    i64::try_from(depth).unwrap_or(i64::MAX),
                );
            }
        }
        if sleep_or_shutdown(&shutdown, every).await {
            return;
        }
    }
}

/// Gives back the messages already pulled into this copy but not yet handed
/// to a lane, so other copies get them now instead of after `ack_wait`.
///
/// It first takes what arrives until the connection has been quiet for
/// 50 ms (at most one second: messages still on the wire count too), then
/// drops the pull subscription, and only then naks them, so the server
/// redelivers them to the other copies' pull requests, not to this one's.
/// A message that arrives after that waits for `ack_wait`.
async fn release_buffered(client: &async_nats::Client, mut messages: pull::Stream) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut buffered = Vec::new();
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(50), messages.next()).await {
            Ok(Some(Ok(message))) => buffered.push(message),
            Ok(Some(Err(_))) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    drop(messages);
    let mut released = 0;
    for message in buffered {
        if release(client, &message).await {
            released += 1;
        }
    }
    if released > 0 {
        tracing::debug!(released, "released buffered messages on shutdown");
    }
}

/// Sleeps for `delay`; returns true when shutdown was requested meanwhile.
async fn sleep_or_shutdown(shutdown: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// The lane of a message: its entity (`ce-subject` header, else the entity
/// token of an event subject, else the whole subject) hashed over the lanes.
fn lane_of(message: &jetstream::Message, lanes: usize) -> usize {
    let key = message
        .headers
        .as_ref()
        .and_then(|h| h.get(skein_message::envelope::headers::SUBJECT))
        .map(|v| v.as_str())
        .or_else(|| skein_message::subject::entity_of_event(&message.subject))
        .unwrap_or(message.subject.as_str());
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
}

/// The consumer a copy `skein dlq redrive` published is for, when it is
/// not `consumer`.
fn redriven_for_another<'m>(message: &'m jetstream::Message, consumer: &str) -> Option<&'m str> {
    crate::dlq::redriven_for_another(message.headers.as_ref(), consumer)
}

impl<H: Handler> Runtime<H> {
    async fn process(&self, message: jetstream::Message) {
        let (stream, stream_sequence, delivered) = match message.info() {
            Ok(i) => (
                i.stream.to_owned(),
                i.stream_sequence,
                i.delivered.max(1) as u64,
            ),
            Err(e) => {
                tracing::error!(worker = %self.config.name, error = %e, "message without JetStream metadata, ignoring");
                return;
            }
        };
        let info = DeliveryInfo {
            stream,
            consumer: self.config.name.clone(),
            stream_sequence,
            delivered,
        };
        if let Some(owner) = redriven_for_another(&message, &self.config.name) {
            // The original came to this consumer too, and was handled here.
            tracing::debug!(worker = %self.config.name, seq = stream_sequence, owner, "a copy redriven for another consumer; acked unhandled");
            if let Err(e) = message.ack().await {
                tracing::debug!(error = %e, "ack failed; the copy comes again and is passed over again");
            }
            return;
        }
        if !self.config.takes(&message.subject) {
            // Another version's subject, which the group took when a newer
            // copy bound it: handling (or dead-lettering) it here would
            // take it from the copies that handle it.
            let left = HandlerError::transient(format!(
                "{} is not among the subjects this copy takes (another version's?): left for a \
                 copy that takes it",
                message.subject
            ))
            .retry_after(self.config.not_taken_delay);
            return self.settle(&message, &info, Err(left)).await;
        }
        let envelope = match Envelope::from_parts(
            &message.subject,
            message.headers.as_ref(),
            message.payload.clone(),
        ) {
            Ok(e) => e,
            Err(e) => {
                return self
                    .dead_letter(&message, &info, format!("undecodable message: {e}"))
                    .await;
            }
        };
        if delivered > self.config.max_deliver {
            let reason = format!(
                "delivered {delivered} times, more than max_deliver {}; an earlier delivery did not finish",
                self.config.max_deliver
            );
            return self.dead_letter(&message, &info, reason).await;
        }
        let span = tracing::info_span!(
            "handle",
            worker = %self.config.name,
            kind = %envelope.kind,
            id = %envelope.id,
            correlation_id = %envelope.correlation_id,
            delivered,
        );
        let delivery = Delivery { envelope, info };
        self.stats.started();
        let result = self
            .run_with_progress(&message, &delivery)
            .instrument(span)
            .await;
        self.stats.finished();
        self.settle(&message, &delivery.info, result).await;
    }

    /// Runs the handler, telling the server "in progress" while it runs so
    /// that a long handler keeps its message.
    async fn run_with_progress(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let handle = self.handler.handle(delivery);
        tokio::pin!(handle);
        let period = self.config.progress_period();
        // The first report after half a period: the message may have waited
        // up to a period in its lane since the last one.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period / 2, period);
        loop {
            tokio::select! {
                result = &mut handle => return result,
                _ = ticker.tick() => {
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "cannot send in-progress");
                    }
                }
            }
        }
    }

    /// The ack decision.
    async fn settle(
        &self,
        message: &jetstream::Message,
        info: &DeliveryInfo,
        result: Result<(), HandlerError>,
    ) {
        match result {
            Ok(()) => {
                self.stats.handled();
                if let Err(e) = message.ack().await {
                    // The message will be redelivered; the inbox absorbs it.
                    tracing::warn!(worker = %self.config.name, seq = info.stream_sequence, error = %e, "ack failed");
                }
            }
            Err(e)
                if e.kind() == ErrorKind::Transient && info.delivered < self.config.max_deliver =>
            {
                self.stats.transient_failure();
                let delay = e
                    .requested_delay()
                    .unwrap_or_else(|| self.config.delay_for(info.delivered));
                tracing::warn!(
                    worker = %self.config.name, seq = info.stream_sequence, delivered = info.delivered,
                    retry_in_ms = delay.as_millis() as u64, reason = %e.reason(), "transient failure, will retry"
                );
                if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(error = %e, "nak failed; the server redelivers after ack_wait");
                }
            }
            Err(e) => {
                let reason = match e.kind() {
                    ErrorKind::Permanent => e.reason().to_owned(),
                    ErrorKind::Transient => format!(
                        "gave up after {} deliveries: {}",
                        info.delivered,
                        e.reason()
                    ),
                };
                self.dead_letter(message, info, reason).await;
            }
        }
    }

    async fn dead_letter(&self, message: &jetstream::Message, info: &DeliveryInfo, reason: String) {
        let dead = DeadLetterInfo {
            reason,
            handler: self.config.name.clone(),
            deliveries: info.delivered,
            stream: info.stream.clone(),
            stream_sequence: info.stream_sequence,
            subject: message.subject.to_string(),
        };
        match publish_dead_letter(
            &self.publisher,
            message.headers.as_ref(),
            message.payload.clone(),
            &dead,
        )
        .await
        {
            Ok(_) => {
                self.stats.dead_lettered();
                tracing::warn!(worker = %dead.handler, seq = dead.stream_sequence, reason = %dead.reason, "dead-lettered");
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "ack after dead-lettering failed; the DLQ de-duplicates the retry");
                }
            }
            Err(e) => {
                tracing::error!(worker = %dead.handler, error = %e, "cannot dead-letter, will retry");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}
