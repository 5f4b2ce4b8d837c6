//! skein-bus against a real nats-server: provisioning, publishing, replay,
//! the consumer-group runtime (lanes, retries, dead letters, copies, crashes,
//! shutdown, in-progress), the service API, connecting and broker restarts.
//!
//! Every test starts its own server on a free port with a temporary store.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use async_nats::jetstream::consumer::{self, pull, DeliverPolicy};
use serde::{Deserialize, Serialize};
use skein_bus::dlq::DeadLetterInfo;
use skein_bus::provision::{apply_builtin_streams, Change, COMMANDS, DLQ, EVENTS};
use skein_bus::replay::{read, StartAt, StoredMessage};
use skein_bus::service::start_service;
use skein_bus::{
    Bus, BusConfig, Delivery, Error, Handler, HandlerError, NatsSecurity, Outgoing, StatsSnapshot,
    Worker, WorkerConfig, WorkerStats,
};
use skein_message::{new_id, Contract, Envelope, Event, MessageContext};
use skein_testkit::{eventually, init_tracing, tls_dir, NatsServer, Secured};
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Test messages and helpers
// ---------------------------------------------------------------------------

/// The test event: `events.test.<entity>.happened`, `ce-subject` = entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Happened {
    entity: String,
    n: u32,
}

impl Contract for Happened {
    const SERVICE: &'static str = "test";
    const NAME: &'static str = "happened";
    const VERSION: u32 = 1;
}

impl Event for Happened {
    fn entity_id(&self) -> String {
        self.entity.clone()
    }
}

fn happened(entity: &str, n: u32) -> anyhow::Result<Envelope> {
    Ok(Envelope::event(
        "tester",
        &Happened {
            entity: entity.to_owned(),
            n,
        },
        &MessageContext::root(),
    )?)
}

/// A handler made of a closure taking the delivery by value.
struct FnHandler<F>(F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.0)(delivery.clone())
    }
}

fn handler<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnHandler(f)
}

/// A server with the built-in streams and one connection to it.
async fn start() -> anyhow::Result<(NatsServer, Bus)> {
    let server = NatsServer::start().await?;
    let bus = connect(&server, "test").await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    Ok((server, bus))
}

async fn connect(server: &NatsServer, name: &str) -> anyhow::Result<Bus> {
    Ok(Bus::connect(&BusConfig::new(server.url(), name)).await?)
}

/// A worker on `events.test.>` with timings short enough for tests.
fn fast_worker(name: &str) -> WorkerConfig {
    let mut config = WorkerConfig::new(name, EVENTS, vec!["events.test.>".into()]);
    config.lanes = 8;
    config.ack_wait = Duration::from_secs(2);
    config.backoff = vec![Duration::from_millis(50)];
    config.figures_interval = Duration::from_millis(200);
    config
}

fn lock<T>(mutex: &Mutex<T>) -> anyhow::Result<MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow!("a handler panicked holding the lock"))
}

fn lock_in_handler<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>, HandlerError> {
    mutex
        .lock()
        .map_err(|_| HandlerError::permanent("test lock poisoned"))
}

/// Waits in a handler until the test opens `gate` (adds a permit).
async fn pass(gate: &tokio::sync::Semaphore) -> Result<(), HandlerError> {
    let _open = gate
        .acquire()
        .await
        .map_err(|_| HandlerError::transient("gate closed"))?;
    Ok(())
}

async fn consumer_info(bus: &Bus, name: &str) -> anyhow::Result<consumer::Info> {
    let mut consumer = bus
        .jetstream()
        .get_stream(EVENTS)
        .await?
        .get_consumer::<pull::Config>(name)
        .await
        .map_err(|e| anyhow!("cannot open consumer {name}: {e}"))?;
    Ok(consumer.info().await?.clone())
}

/// Waits until the consumer has no delivered-but-unacknowledged message.
async fn all_acked(bus: &Bus, name: &str, timeout: Duration) -> anyhow::Result<consumer::Info> {
    eventually(timeout, || async {
        consumer_info(bus, name)
            .await
            .ok()
            .filter(|i| i.num_ack_pending == 0 && i.num_pending == 0)
    })
    .await
    .with_context(|| format!("consumer {name} still has unacknowledged or pending messages"))
}

async fn handled_at_least(stats: &WorkerStats, n: u64, timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, || async {
        (stats.snapshot().handled >= n).then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "expected {n} handled messages within {timeout:?}, stats: {:?}",
            stats.snapshot()
        )
    })
}

fn header<'a>(message: &'a StoredMessage, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

// ---------------------------------------------------------------------------
// Provisioning, publishing, replay
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_is_idempotent_and_restores_a_stream_changed_on_the_server(
) -> anyhow::Result<()> {
    init_tracing();
    let server = NatsServer::start().await?;
    let bus = connect(&server, "test").await?;
    let js = bus.jetstream();
    let all = |change: Change| {
        vec![
            (EVENTS.to_owned(), change.clone()),
            (COMMANDS.to_owned(), change.clone()),
            (DLQ.to_owned(), change),
        ]
    };

    // A worker started before the streams exist says what to do.
    let early = Worker::start(&bus, fast_worker("early"), handler(|_| async { Ok(()) })).await;
    match early {
        Err(e) => assert!(
            e.to_string()
                .contains("create the streams first: `skein streams apply`"),
            "{e}"
        ),
        Ok(_) => bail!("a worker started without its stream"),
    }

    let first = apply_builtin_streams(js, &Default::default()).await?;
    assert_eq!(first, all(Change::Created));
    let second = apply_builtin_streams(js, &Default::default()).await?;
    assert_eq!(second, all(Change::Unchanged));

    // Someone changes EVENTS by hand.
    let defined = js.get_stream(EVENTS).await?.info().await?.config.clone();
    let mut changed = defined.clone();
    changed.max_age = Duration::from_secs(3600);
    changed.description = Some("changed by hand".into());
    // ... and sets what the definitions leave out, which stays.
    changed.compression = Some(async_nats::jetstream::stream::Compression::S2);
    changed.metadata.insert("owner".into(), "operations".into());
    js.update_stream(&changed).await?;
    assert_eq!(
        js.get_stream(EVENTS).await?.info().await?.config.max_age,
        Duration::from_secs(3600)
    );

    let third = apply_builtin_streams(js, &Default::default()).await?;
    let (events, change) = third.first().context("no EVENTS change")?;
    assert_eq!(events, EVENTS);
    match change {
        Change::Updated(fields) => {
            let mut fields = fields.clone();
            fields.sort();
            assert_eq!(fields, vec!["description".to_owned(), "max_age".to_owned()]);
        }
        other => bail!("expected EVENTS to be updated, got {other}"),
    }
    assert_eq!(third[1..], all(Change::Unchanged)[1..]);
    let restored = js.get_stream(EVENTS).await?.info().await?.config.clone();
    assert_eq!(restored.max_age, defined.max_age);
    assert_eq!(restored.max_age, Duration::from_secs(365 * 24 * 3600));
    assert_eq!(restored.description, defined.description);
    assert_eq!(
        restored.compression,
        Some(async_nats::jetstream::stream::Compression::S2)
    );
    assert_eq!(
        restored.metadata.get("owner").map(String::as_str),
        Some("operations")
    );

    let fourth = apply_builtin_streams(js, &Default::default()).await?;
    assert_eq!(fourth, all(Change::Unchanged));
    Ok(())
}

/// The test's second event, `events.test.<entity>.answered`: what a newer
/// version of a worker also takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Answered {
    entity: String,
}

impl Contract for Answered {
    const SERVICE: &'static str = "test";
    const NAME: &'static str = "answered";
    const VERSION: u32 = 1;
}

impl Event for Answered {
    fn entity_id(&self) -> String {
        self.entity.clone()
    }
}

/// The subjects consumer `name` takes, sorted.
async fn filters(bus: &Bus, name: &str) -> anyhow::Result<Vec<String>> {
    let config = consumer_info(bus, name).await?.config;
    let mut subjects = config.filter_subjects;
    if !config.filter_subject.is_empty() {
        subjects.push(config.filter_subject);
    }
    subjects.sort();
    Ok(subjects)
}

/// A consumer made again at a start time (it was lost) starts at the
/// messages stored within it, and only when the stream holds older ones.
/// It is bound later by a copy that takes another subject, and set
/// exactly: the updates keep where it started (the server refuses to
/// change that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_at_a_start_time_is_updated_later_and_keeps_it() -> anyhow::Result<()> {
    use skein_bus::provision::{apply_consumer, ConsumerSpec, Filters};
    init_tracing();
    let (_server, bus) = start().await?;
    let spec = |durable: &str, subjects: &[&str], start_within| ConsumerSpec {
        stream: EVENTS.into(),
        durable: durable.into(),
        filter_subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        ack_wait: None,
        max_ack_pending: None,
        start_within,
        start_sequence: None,
    };
    let by_time = |p: &DeliverPolicy| matches!(p, DeliverPolicy::ByStartTime { .. });
    let a = "events.test.a.happened";
    bus.publisher().publish(&happened("a", 1)?).await?;
    // Every message within the window: from the beginning (what starting
    // at the window would deliver too), with no warning.
    let young = spec("young", &[a], Some(Duration::from_secs(60)));
    apply_consumer(bus.jetstream(), &young, Filters::Widen).await?;
    let info = consumer_info(&bus, "young").await?;
    assert_eq!(info.config.deliver_policy, DeliverPolicy::All, "{info:?}");
    assert_eq!(info.num_pending, 1);

    tokio::time::sleep(Duration::from_secs(4)).await;
    bus.publisher().publish(&happened("a", 2)?).await?;
    let made = spec("made-again", &[a], Some(Duration::from_secs(2)));
    apply_consumer(bus.jetstream(), &made, Filters::Widen).await?;
    let info = consumer_info(&bus, "made-again").await?;
    assert!(by_time(&info.config.deliver_policy), "{info:?}");
    assert_eq!(info.num_pending, 1, "the older message is skipped");
    let spec = |subjects: &[&str], start_within| spec("made-again", subjects, start_within);

    let wider = spec(&["events.test.b.happened"], None);
    apply_consumer(bus.jetstream(), &wider, Filters::Widen).await?;
    assert_eq!(
        filters(&bus, "made-again").await?,
        ["events.test.a.happened", "events.test.b.happened"]
    );
    apply_consumer(bus.jetstream(), &wider, Filters::Exact).await?;
    assert_eq!(
        filters(&bus, "made-again").await?,
        ["events.test.b.happened"]
    );
    let info = consumer_info(&bus, "made-again").await?;
    assert!(by_time(&info.config.deliver_policy), "{info:?}");
    Ok(())
}

/// A consumer whose settings the server cannot change (made by an older
/// template, or by hand) is bound, not refused, and keeps them, while the
/// rest is updated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_differing_in_fixed_settings_is_bound_and_keeps_them() -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::pull;
    use skein_bus::provision::{apply_consumer, ConsumerSpec, Filters};
    init_tracing();
    let (_server, bus) = start().await?;
    let stream = bus.jetstream().get_stream(EVENTS).await?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some("older".into()),
            filter_subject: "events.test.a.happened".into(),
            max_waiting: 64,
            max_ack_pending: 10,
            ..Default::default()
        })
        .await?;
    let spec = ConsumerSpec {
        stream: EVENTS.into(),
        durable: "older".into(),
        filter_subjects: vec!["events.test.a.happened".into()],
        ack_wait: None,
        max_ack_pending: None,
        start_within: None,
        start_sequence: None,
    };
    apply_consumer(bus.jetstream(), &spec, Filters::Widen).await?;
    let info = consumer_info(&bus, "older").await?;
    assert_eq!(info.config.max_waiting, 64);
    assert_eq!(info.config.max_ack_pending, 1000);
    Ok(())
}

/// During a rolling upgrade both versions' copies pull from one consumer,
/// which takes the newer one's subjects too: an older copy handed a message
/// on a subject it does not take leaves it (it comes again) for a copy that
/// takes it, instead of handling it as its own or dead-lettering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_copy_leaves_the_subjects_only_a_newer_copy_takes() -> anyhow::Result<()> {
    let (_server, bus) = start().await?;
    let config = |subjects: &[&str]| {
        let mut config = fast_worker("mixed");
        config.filter_subjects = subjects.iter().map(|s| (*s).to_owned()).collect();
        config.not_taken_delay = Duration::from_millis(50);
        // Each copy pulls a share; a message may land on the older one
        // several times before the newer one takes it.
        config.max_deliver = 200;
        config
    };
    let recorder = |kinds: Arc<Mutex<Vec<String>>>| {
        handler(move |d: Delivery| {
            let kinds = kinds.clone();
            async move {
                lock_in_handler(&kinds)?.push(d.envelope.kind.clone());
                Ok(())
            }
        })
    };
    let (old_saw, new_saw) = (Arc::default(), Arc::default());
    let old = Worker::start(
        &bus,
        config(&["events.test.*.happened"]),
        recorder(Arc::clone(&old_saw)),
    )
    .await?;
    let new = Worker::start(
        &bus,
        config(&["events.test.*.answered", "events.test.*.happened"]),
        recorder(Arc::clone(&new_saw)),
    )
    .await?;
    let publisher = bus.publisher();
    for i in 0..40u32 {
        let entity = format!("e{i}");
        publisher
            .publish(&Envelope::event(
                "tester",
                &Answered {
                    entity: entity.clone(),
                },
                &MessageContext::root(),
            )?)
            .await?;
        publisher
            .publish(&Envelope::event(
                "tester",
                &Happened { entity, n: i },
                &MessageContext::root(),
            )?)
            .await?;
    }
    let answered = |saw: &Arc<Mutex<Vec<String>>>| -> anyhow::Result<usize> {
        Ok(lock(saw)?
            .iter()
            .filter(|k| k.starts_with("test.answered"))
            .count())
    };
    eventually(Duration::from_secs(20), || async {
        (answered(&new_saw).ok()? == 40
            && lock(&old_saw).ok()?.len() + lock(&new_saw).ok()?.len() == 80)
            .then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "the newer copy handled {:?} answered; the older copy {:?}",
            answered(&new_saw).ok(),
            answered(&old_saw).ok()
        )
    })?;
    assert_eq!(
        answered(&old_saw)?,
        0,
        "the older copy handled a newer subject"
    );
    let stats = old.stats().snapshot();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    old.shutdown().await;
    new.shutdown().await;
    Ok(())
}

/// A rolling upgrade: a copy of a newer version binds the shared consumer
/// to more subjects; a copy of the older version starting again keeps them
/// (it widens, never narrows), so the newer copy still gets what only it
/// waits for. `skein streams apply` sets the subjects exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_copy_starting_again_keeps_the_subjects_a_newer_copy_takes() -> anyhow::Result<()>
{
    use skein_bus::provision::{apply_consumer, ConsumerSpec, Filters};
    let (_server, bus) = start().await?;
    let happened_only = vec!["events.test.*.happened".to_owned()];
    let both = vec![
        "events.test.*.answered".to_owned(),
        "events.test.*.happened".to_owned(),
    ];
    let config = |subjects: &[String]| {
        let mut config = fast_worker("upgraded");
        config.filter_subjects = subjects.to_vec();
        config
    };
    let ignore = || handler(|_| async { Ok(()) });
    let old = Worker::start(&bus, config(&happened_only), ignore()).await?;
    assert_eq!(filters(&bus, "upgraded").await?, happened_only);

    let answered = Arc::new(Mutex::new(Vec::new()));
    let seen = answered.clone();
    let new = Worker::start(
        &bus,
        config(&both),
        handler(move |d: Delivery| {
            let seen = seen.clone();
            async move {
                if d.envelope.is::<Answered>() {
                    lock_in_handler(&seen)?.push(d.envelope.id);
                }
                Ok(())
            }
        }),
    )
    .await?;
    assert_eq!(filters(&bus, "upgraded").await?, both);

    // The older copy restarts: the newer one's subject stays.
    old.shutdown().await;
    let old = Worker::start(&bus, config(&happened_only), ignore()).await?;
    assert_eq!(
        filters(&bus, "upgraded").await?,
        both,
        "an older copy narrowed the consumer"
    );
    old.shutdown().await;
    let answer = Envelope::event(
        "tester",
        &Answered { entity: "a".into() },
        &MessageContext::root(),
    )?;
    bus.publisher().publish(&answer).await?;
    eventually(Duration::from_secs(10), || async {
        lock(&answered).ok()?.contains(&answer.id).then_some(())
    })
    .await
    .context("the newer copy never got the event only it takes")?;
    new.shutdown().await;

    // A version taking a wildcard over both: the subjects it covers fold
    // into it (the server refuses filters where one covers another), and
    // an older copy keeps the wildcard.
    let all = vec!["events.test.>".to_owned()];
    Worker::start(&bus, config(&all), ignore())
        .await?
        .shutdown()
        .await;
    assert_eq!(filters(&bus, "upgraded").await?, all);
    Worker::start(&bus, config(&happened_only), ignore())
        .await?
        .shutdown()
        .await;
    assert_eq!(filters(&bus, "upgraded").await?, all);

    // Once no older copy is left, the operator's exact apply sets them.
    let spec = ConsumerSpec::from(&config(&happened_only));
    let (_, change) = apply_consumer(bus.jetstream(), &spec, Filters::Exact).await?;
    assert_eq!(change, Change::Updated(vec!["filter_subjects".into()]));
    assert_eq!(filters(&bus, "upgraded").await?, happened_only);

    // Copies of two versions binding a new consumer at the same moment:
    // whichever creates it, and whatever order the updates land in, it
    // takes both versions' subjects.
    for round in 0..8 {
        let durable = format!("raced-{round}");
        let spec = |subjects: &[String]| ConsumerSpec {
            durable: durable.clone(),
            ..ConsumerSpec::from(&config(subjects))
        };
        let (older, newer) = (
            spec(&happened_only),
            spec(&["events.test.*.answered".to_owned()]),
        );
        let (a, b) = tokio::join!(
            apply_consumer(bus.jetstream(), &older, Filters::Widen),
            apply_consumer(bus.jetstream(), &newer, Filters::Widen),
        );
        a?;
        b?;
        assert_eq!(filters(&bus, &durable).await?, both, "round {round}");
    }

    // On a work queue a consumer takes exactly its spec's subjects, Widen
    // or not: two consumers of one may not overlap.
    let commands = |subjects: &[&str]| ConsumerSpec {
        stream: COMMANDS.into(),
        durable: "queued".into(),
        filter_subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        ack_wait: None,
        max_ack_pending: None,
        start_within: None,
        start_sequence: None,
    };
    let both = ["commands.test.a", "commands.test.b"];
    apply_consumer(bus.jetstream(), &commands(&both), Filters::Widen).await?;
    apply_consumer(bus.jetstream(), &commands(&both[..1]), Filters::Widen).await?;
    let mut consumer = bus
        .jetstream()
        .get_stream(COMMANDS)
        .await?
        .get_consumer::<pull::Config>("queued")
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let info = consumer.info().await?;
    assert_eq!(
        (
            info.config.filter_subject.as_str(),
            info.config.filter_subjects.len()
        ),
        ("commands.test.a", 0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_envelope_reads_back_equal_and_a_repeat_is_stored_once() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    let context = MessageContext {
        correlation_id: "req-42".into(),
        causation_id: Some(new_id()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    };
    let payload = Happened {
        entity: "e-1".into(),
        n: 7,
    };
    let envelope = Envelope::event("tester", &payload, &context)?;
    let publisher = bus.publisher();

    let ack = publisher.publish(&envelope).await?;
    assert!(!ack.duplicate);
    assert_eq!(ack.stream, EVENTS);

    let stored = read(&bus, EVENTS, "events.>", StartAt::Beginning).await?;
    assert_eq!(stored.len(), 1);
    let message = &stored[0];
    assert_eq!(message.sequence, ack.sequence);
    assert_eq!(message.subject, "events.test.e-1.happened");
    assert_eq!(
        header(message, "Nats-Msg-Id"),
        Some(envelope.id.to_string().as_str())
    );
    let back = Envelope::from_parts(
        &message.subject,
        message.headers.as_ref(),
        message.payload.clone(),
    )?;
    assert_eq!(back, envelope);
    assert_eq!(back.decode::<Happened>()?, payload);

    let again = publisher.publish(&envelope).await?;
    assert!(again.duplicate, "the second publish was not a duplicate");
    assert_eq!(again.sequence, ack.sequence);
    let stored = read(&bus, EVENTS, "events.>", StartAt::Beginning).await?;
    assert_eq!(stored.len(), 1);
    let state = bus
        .jetstream()
        .get_stream(EVENTS)
        .await?
        .info()
        .await?
        .state
        .clone();
    assert_eq!(state.messages, 1);
    Ok(())
}

/// A read of headers only gives the same messages, headers and times as a
/// full read, with empty payloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_headers_only_leaves_out_the_payloads_and_nothing_else() -> anyhow::Result<()> {
    let (_server, bus) = start().await?;
    for n in 1..=3 {
        bus.publisher().publish(&happened("h", n)?).await?;
    }
    let full = read(&bus, EVENTS, "events.test.>", StartAt::Beginning).await?;
    let headers =
        skein_bus::replay::read_headers(&bus, EVENTS, "events.test.>", StartAt::Beginning).await?;
    ensure!(
        full.len() == 3 && headers.len() == 3,
        "{} and {}",
        full.len(),
        headers.len()
    );
    for (f, h) in full.iter().zip(&headers) {
        ensure!(
            f.sequence == h.sequence
                && f.subject == h.subject
                && f.published == h.published
                && header(f, "ce-id").is_some()
                && header(f, "ce-id") == header(h, "ce-id"),
            "{f:?} against {h:?}"
        );
        ensure!(!f.payload.is_empty() && h.payload.is_empty(), "{h:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_in_input_order() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    let envelopes = (0..60)
        .map(|i| happened(&format!("e-{}", i % 7), i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outgoing: Vec<Outgoing> = envelopes.iter().map(Outgoing::from).collect();

    let acks = bus
        .publisher()
        .publish_batch(&outgoing)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(acks.len(), envelopes.len());
    assert!(acks.iter().all(|a| !a.duplicate));

    let stored = read(&bus, EVENTS, "events.test.>", StartAt::Beginning).await?;
    let stored_ids = stored
        .iter()
        .map(|m| Ok(Envelope::from_parts(&m.subject, m.headers.as_ref(), m.payload.clone())?.id))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let input_ids: Vec<Uuid> = envelopes.iter().map(|e| e.id).collect();
    assert_eq!(stored_ids, input_ids);
    let ack_sequences: Vec<u64> = acks.iter().map(|a| a.sequence).collect();
    let stored_sequences: Vec<u64> = stored.iter().map(|m| m.sequence).collect();
    assert_eq!(ack_sequences, stored_sequences);
    assert!(stored_sequences.windows(2).all(|w| w[0] < w[1]));

    // Replay from a sequence starts there.
    let tail = read(
        &bus,
        EVENTS,
        "events.test.>",
        StartAt::Sequence(stored_sequences[50]),
    )
    .await?;
    assert_eq!(tail.len(), 10);
    assert_eq!(tail[0].sequence, stored_sequences[50]);
    Ok(())
}

// ---------------------------------------------------------------------------
// The consumer-group runtime
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_entity_is_handled_in_order_while_entities_run_in_parallel() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    const ENTITIES: u32 = 10;
    const PER_ENTITY: u32 = 20;

    let seen: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let mut config = fast_worker("orderly");
    config.lanes = 8;
    let running = Worker::start(&bus, config, {
        let (seen, in_flight, max_in_flight) =
            (seen.clone(), in_flight.clone(), max_in_flight.clone());
        handler(move |d: Delivery| {
            let (seen, in_flight, max_in_flight) =
                (seen.clone(), in_flight.clone(), max_in_flight.clone());
            async move {
                let event: Happened = d.envelope.decode()?;
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_in_flight.fetch_max(now, Ordering::SeqCst);
                // 0..=4 ms, varying so that lanes overtake each other.
                tokio::time::sleep(Duration::from_millis(d.info.stream_sequence * 7 % 5)).await;
                lock_in_handler(&seen)?
                    .entry(event.entity)
                    .or_default()
                    .push(event.n);
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
    })
    .await?;

    let outgoing = (0..ENTITIES * PER_ENTITY)
        .map(|i| {
            Ok(Outgoing::from(&happened(
                &format!("e-{}", i % ENTITIES),
                i / ENTITIES,
            )?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for result in bus.publisher().publish_batch(&outgoing).await {
        result?;
    }

    let total = u64::from(ENTITIES * PER_ENTITY);
    handled_at_least(running.stats(), total, Duration::from_secs(20)).await?;
    let seen = lock(&seen)?.clone();
    assert_eq!(seen.len(), ENTITIES as usize);
    let expected: Vec<u32> = (0..PER_ENTITY).collect();
    for (entity, order) in &seen {
        assert_eq!(order, &expected, "entity {entity} out of order");
    }
    let max = max_in_flight.load(Ordering::SeqCst);
    assert!(max > 1, "never more than {max} message at a time");
    assert!(max <= 8, "{max} messages at once with 8 lanes");
    assert_eq!(running.stats().snapshot().handled, total);
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_with_backoff_until_it_succeeds() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    let calls: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let mut config = fast_worker("retrier");
    config.max_deliver = 5;
    config.backoff = vec![Duration::from_millis(150), Duration::from_millis(300)];
    let running = Worker::start(&bus, config, {
        let calls = calls.clone();
        handler(move |d: Delivery| {
            let calls = calls.clone();
            async move {
                lock_in_handler(&calls)?.push((d.info.delivered, Instant::now()));
                if d.info.delivered < 3 {
                    return Err(HandlerError::transient("database unavailable"));
                }
                Ok(())
            }
        })
    })
    .await?;

    bus.publisher().publish(&happened("e-1", 1)?).await?;
    handled_at_least(running.stats(), 1, Duration::from_secs(10)).await?;
    all_acked(&bus, "retrier", Duration::from_secs(5)).await?;

    let calls = lock(&calls)?.clone();
    let delivered: Vec<u64> = calls.iter().map(|(d, _)| *d).collect();
    assert_eq!(delivered, vec![1, 2, 3]);
    let first_gap = calls[1].1 - calls[0].1;
    let second_gap = calls[2].1 - calls[1].1;
    assert!(first_gap >= Duration::from_millis(140), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(290), "{second_gap:?}");
    let stats = running.stats().snapshot();
    assert_eq!(stats.transient_failures, 2);
    assert_eq!(stats.handled, 1);
    assert_eq!(stats.dead_lettered, 0);
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dlq_with_why_and_the_consumer_keeps_going() -> anyhow::Result<()>
{
    init_tracing();
    let (_server, bus) = start().await?;
    const WORKER: &str = "poison-eater";
    let calls: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let mut config = fast_worker(WORKER);
    config.max_deliver = 3;
    let running = Worker::start(&bus, config, {
        let calls = calls.clone();
        handler(move |d: Delivery| {
            let calls = calls.clone();
            async move {
                let entity = d.envelope.entity().unwrap_or_default().to_owned();
                lock_in_handler(&calls)?
                    .entry(entity.clone())
                    .or_default()
                    .push(d.info.delivered);
                match entity.as_str() {
                    "perm" => Err(HandlerError::permanent("order total is negative")),
                    "flaky" => Err(HandlerError::transient("dependency down")),
                    _ => Ok(()),
                }
            }
        })
    })
    .await?;

    // (a) Not a skein message: no ce-* headers.
    let mut raw_headers = async_nats::HeaderMap::new();
    raw_headers.insert("x-origin", "raw-test");
    let raw_ack = bus
        .jetstream()
        .publish_with_headers(
            "events.test.raw.happened",
            raw_headers,
            "not json at all".into(),
        )
        .await?
        .await?;
    // (b) Refused for good by the handler.
    let perm = happened("perm", 1)?;
    let perm_ack = bus.publisher().publish(&perm).await?;
    // (c) Failing transiently on every delivery.
    let flaky = happened("flaky", 1)?;
    let flaky_ack = bus.publisher().publish(&flaky).await?;
    // And a good one after them.
    let good = happened("good", 1)?;
    bus.publisher().publish(&good).await?;

    eventually(Duration::from_secs(15), || async {
        let s = running.stats().snapshot();
        (s.handled == 1 && s.dead_lettered == 3).then_some(())
    })
    .await
    .with_context(|| format!("stats: {:?}", running.stats().snapshot()))?;
    all_acked(&bus, WORKER, Duration::from_secs(5)).await?;

    let letters = read(&bus, DLQ, "dlq.>", StartAt::Beginning).await?;
    assert_eq!(letters.len(), 3);
    let mut by_subject = HashMap::new();
    for letter in &letters {
        assert_eq!(letter.subject, format!("dlq.{EVENTS}.{WORKER}"));
        let headers = letter
            .headers
            .as_ref()
            .context("dead letter without headers")?;
        let info = DeadLetterInfo::from_headers(headers).context("no dead-letter headers")?;
        assert_eq!(info.handler, WORKER);
        assert_eq!(info.stream, EVENTS);
        by_subject.insert(info.subject.clone(), (info, letter));
    }

    let (info, letter) = by_subject
        .get("events.test.raw.happened")
        .context("the raw message was not dead-lettered")?;
    assert!(info.reason.contains("undecodable"), "{}", info.reason);
    assert!(info.reason.contains("ce-specversion"), "{}", info.reason);
    assert_eq!(info.deliveries, 1);
    assert_eq!(info.stream_sequence, raw_ack.sequence);
    assert_eq!(&letter.payload[..], b"not json at all");
    assert_eq!(header(letter, "x-origin"), Some("raw-test"));

    let (info, letter) = by_subject
        .get(&perm.nats_subject)
        .context("the permanently failing message was not dead-lettered")?;
    assert_eq!(info.reason, "order total is negative");
    assert_eq!(info.deliveries, 1);
    assert_eq!(info.stream_sequence, perm_ack.sequence);
    let original = Envelope::from_parts(
        &info.subject,
        letter.headers.as_ref(),
        letter.payload.clone(),
    )?;
    assert_eq!(original, perm);

    let (info, letter) = by_subject
        .get(&flaky.nats_subject)
        .context("the always failing message was not dead-lettered")?;
    assert!(
        info.reason.contains("gave up after 3 deliveries"),
        "{}",
        info.reason
    );
    assert!(info.reason.contains("dependency down"), "{}", info.reason);
    assert_eq!(info.deliveries, 3);
    assert_eq!(info.stream_sequence, flaky_ack.sequence);
    let original = Envelope::from_parts(
        &info.subject,
        letter.headers.as_ref(),
        letter.payload.clone(),
    )?;
    assert_eq!(original, flaky);

    let calls = lock(&calls)?.clone();
    assert_eq!(calls.get("perm"), Some(&vec![1]));
    assert_eq!(calls.get("flaky"), Some(&vec![1, 2, 3]));
    assert_eq!(calls.get("good"), Some(&vec![1]));
    assert_eq!(
        calls.len(),
        3,
        "the raw message reached the handler: {calls:?}"
    );
    let stats = running.stats().snapshot();
    assert_eq!(stats.transient_failures, 2);

    // The worker's figures count its dead letters.
    eventually(Duration::from_secs(5), || async {
        (running.stats().snapshot().gauges.get("dlq_depth") == Some(&3)).then_some(())
    })
    .await
    .with_context(|| format!("gauges: {:?}", running.stats().snapshot().gauges))?;
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_a_worker_share_the_work_and_handle_each_message_once() -> anyhow::Result<()>
{
    init_tracing();
    let (server, bus) = start().await?;
    const WORKER: &str = "sharer";
    const COUNT: usize = 100;
    let handled: Arc<Mutex<Vec<(&'static str, Uuid)>>> = Arc::default();
    let mut config = fast_worker(WORKER);
    config.ack_wait = Duration::from_secs(30);
    config.lanes = 4;
    config.batch = 4;
    let copy = |name: &'static str| {
        let handled = handled.clone();
        handler(move |d: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                lock_in_handler(&handled)?.push((name, d.envelope.id));
                Ok(())
            }
        })
    };
    let bus_a = connect(&server, "copy-a").await?;
    let bus_b = connect(&server, "copy-b").await?;
    let a = Worker::start(&bus_a, config.clone(), copy("a")).await?;
    let b = Worker::start(&bus_b, config, copy("b")).await?;
    // Both copies are pulling before the work arrives.
    eventually(Duration::from_secs(5), || async {
        consumer_info(&bus, WORKER)
            .await
            .ok()
            .filter(|i| i.num_waiting >= 2)
    })
    .await
    .context("the two copies are not both pulling")?;

    let envelopes = (0..COUNT)
        .map(|i| happened(&format!("e-{i}"), 1))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outgoing: Vec<Outgoing> = envelopes.iter().map(Outgoing::from).collect();
    for result in bus.publisher().publish_batch(&outgoing).await {
        result?;
    }

    eventually(Duration::from_secs(20), || async {
        (lock(&handled).ok()?.len() >= COUNT).then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "only {} handled",
            lock(&handled).map(|h| h.len()).unwrap_or(0)
        )
    })?;
    let info = all_acked(&bus, WORKER, Duration::from_secs(5)).await?;
    assert_eq!(
        info.delivered.consumer_sequence, COUNT as u64,
        "some message was delivered more than once"
    );

    let handled = lock(&handled)?.clone();
    let mut per_id: HashMap<Uuid, usize> = HashMap::new();
    let mut per_copy: HashMap<&str, usize> = HashMap::new();
    for (copy, id) in &handled {
        *per_id.entry(*id).or_default() += 1;
        *per_copy.entry(copy).or_default() += 1;
    }
    let published: HashSet<Uuid> = envelopes.iter().map(|e| e.id).collect();
    assert_eq!(per_id.keys().copied().collect::<HashSet<_>>(), published);
    assert!(
        per_id.values().all(|&n| n == 1),
        "handled twice: {per_id:?}"
    );
    let on_a = per_copy.get("a").copied().unwrap_or(0);
    let on_b = per_copy.get("b").copied().unwrap_or(0);
    assert!(on_a > 0 && on_b > 0, "a handled {on_a}, b handled {on_b}");
    assert_eq!(
        a.stats().snapshot().handled + b.stats().snapshot().handled,
        COUNT as u64
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_a_copy_killed_mid_message_is_finished_by_the_other_copy() -> anyhow::Result<()>
{
    init_tracing();
    let (server, bus) = start().await?;
    const WORKER: &str = "survivor";
    let mut config = fast_worker(WORKER);
    config.ack_wait = Duration::from_secs(1);

    let taken_by_a: Arc<Mutex<Option<Uuid>>> = Arc::default();
    let bus_a = connect(&server, "copy-a").await?;
    let a = Worker::start(&bus_a, config.clone(), {
        let taken_by_a = taken_by_a.clone();
        handler(move |d: Delivery| {
            let taken_by_a = taken_by_a.clone();
            async move {
                *lock_in_handler(&taken_by_a)? = Some(d.envelope.id);
                // Hangs until the copy dies.
                std::future::pending::<()>().await;
                Ok(())
            }
        })
    })
    .await?;

    let envelope = happened("e-1", 1)?;
    bus.publisher().publish(&envelope).await?;
    eventually(Duration::from_secs(5), || async {
        lock(&taken_by_a).ok().and_then(|t| *t)
    })
    .await
    .context("copy A never got the message")?;

    let handled_by_b: Arc<Mutex<Vec<(Uuid, u64)>>> = Arc::default();
    let bus_b = connect(&server, "copy-b").await?;
    let b = Worker::start(&bus_b, config, {
        let handled_by_b = handled_by_b.clone();
        handler(move |d: Delivery| {
            let handled_by_b = handled_by_b.clone();
            async move {
                lock_in_handler(&handled_by_b)?.push((d.envelope.id, d.info.delivered));
                Ok(())
            }
        })
    })
    .await?;

    // Copy A dies with the message in its hands.
    a.abort();
    drop(bus_a);

    eventually(Duration::from_secs(15), || async {
        (!lock(&handled_by_b).ok()?.is_empty()).then_some(())
    })
    .await
    .context("copy B never got the message of the dead copy")?;
    all_acked(&bus, WORKER, Duration::from_secs(5)).await?;
    let handled = lock(&handled_by_b)?.clone();
    assert_eq!(handled.len(), 1, "{handled:?}");
    assert_eq!(handled[0].0, envelope.id);
    assert!(handled[0].1 >= 2, "delivered {} times", handled[0].1);
    assert_eq!(b.stats().snapshot().handled, 1);
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_finishes_and_acknowledges_the_work_in_flight() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    const WORKER: &str = "finisher";
    const COUNT: u32 = 8;
    // The last message published waits for this gate, so it is certainly in
    // flight when shutdown begins; every other message takes 300 ms.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let mut config = fast_worker(WORKER);
    // Long enough that an unacknowledged message stays pending through the test.
    config.ack_wait = Duration::from_secs(30);
    let running = Worker::start(&bus, config, {
        let (gate, started, finished) = (gate.clone(), started.clone(), finished.clone());
        handler(move |d: Delivery| {
            let (gate, started, finished) = (gate.clone(), started.clone(), finished.clone());
            async move {
                let event: Happened = d.envelope.decode()?;
                started.fetch_add(1, Ordering::SeqCst);
                if event.n == COUNT - 1 {
                    pass(&gate).await?;
                } else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    })
    .await?;

    let outgoing = (0..COUNT)
        .map(|i| Ok(Outgoing::from(&happened(&format!("e-{}", i % 4), i)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for result in bus.publisher().publish_batch(&outgoing).await {
        result?;
    }
    // The gated message is the last of its lane, so once it has started every
    // message has reached the handler.
    eventually(Duration::from_secs(10), || async {
        (started.load(Ordering::SeqCst) == u64::from(COUNT)).then_some(())
    })
    .await
    .with_context(|| format!("only {} started", started.load(Ordering::SeqCst)))?;

    let stats = running.stats().clone();
    let shutting_down = tokio::spawn(running.shutdown());
    // A shutdown that dropped the work in flight would be over by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !shutting_down.is_finished(),
        "shutdown returned while a handler was still running"
    );
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(10), shutting_down)
        .await
        .context("shutdown did not return")??;

    let (s, f) = (
        started.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst),
    );
    assert_eq!(s, f, "{s} started but only {f} finished");
    assert_eq!(f, u64::from(COUNT));
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.handled, f);
    assert_eq!(snapshot.in_flight, 0);

    // Every message handled was acknowledged.
    let info = eventually(Duration::from_secs(3), || async {
        consumer_info(&bus, WORKER)
            .await
            .ok()
            .filter(|i| i.num_ack_pending == 0)
    })
    .await
    .context("messages left unacknowledged after shutdown")?;
    assert_eq!(info.ack_floor.consumer_sequence, f);
    assert_eq!(info.delivered.consumer_sequence, f);
    // And nothing ran after shutdown returned.
    assert_eq!(started.load(Ordering::SeqCst), s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_pulled_but_not_started_go_to_another_copy_at_shutdown() -> anyhow::Result<()> {
    init_tracing();
    let (server, bus) = start().await?;
    const WORKER: &str = "handover";
    const COUNT: u32 = 40;
    let mut config = fast_worker(WORKER);
    // Without the hand-over the buffered messages would wait this long.
    config.ack_wait = Duration::from_secs(60);
    let handled = Arc::new(Mutex::new(HashSet::new()));
    let slow = {
        let handled = handled.clone();
        handler(move |d: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let event: Happened = d.envelope.decode()?;
                lock_in_handler(&handled)?.insert(event.n);
                Ok(())
            }
        })
    };
    let first = Worker::start(&bus, config.clone(), slow).await?;
    // One entity: one lane, so most messages wait in its queue.
    let outgoing = (0..COUNT)
        .map(|i| Ok(Outgoing::from(&happened("only", i)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for result in bus.publisher().publish_batch(&outgoing).await {
        result?;
    }
    handled_at_least(first.stats(), 3, Duration::from_secs(10)).await?;
    let first_stats = first.stats().clone();
    let stopping = Instant::now();
    first.shutdown().await;
    // The stopping copy finished the message it ran (the fourth or so),
    // not the queue behind it (100 ms a message).
    let by_first = first_stats.snapshot().handled;
    assert!(
        by_first <= 6,
        "the stopping copy ran {by_first} of {COUNT} messages instead of handing its queue over"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "shutdown took {:?}",
        stopping.elapsed()
    );

    let other = connect(&server, "other").await?;
    let most_deliveries = Arc::new(AtomicU64::new(0));
    let second = Worker::start(&other, config, {
        let (handled, most_deliveries) = (handled.clone(), most_deliveries.clone());
        handler(move |d: Delivery| {
            let (handled, most_deliveries) = (handled.clone(), most_deliveries.clone());
            async move {
                let event: Happened = d.envelope.decode()?;
                most_deliveries.fetch_max(d.info.delivered, Ordering::SeqCst);
                lock_in_handler(&handled)?.insert(event.n);
                Ok(())
            }
        })
    })
    .await?;
    eventually(Duration::from_secs(10), || async {
        (lock(&handled).ok()?.len() == COUNT as usize).then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "only {} of {COUNT} handled: messages buffered by the stopped copy were not handed over",
            lock(&handled).map(|h| h.len()).unwrap_or_default()
        )
    })?;
    // Handed over once: none went back to the stopping copy first.
    let most = most_deliveries.load(Ordering::SeqCst);
    assert_eq!(
        most, 2,
        "a handed-over message came at delivery {most}, not 2"
    );
    second.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_keeps_its_message_by_reporting_progress() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    const WORKER: &str = "slowpoke";
    let calls: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut config = fast_worker(WORKER);
    config.ack_wait = Duration::from_secs(1);
    let running = Worker::start(&bus, config, {
        let calls = calls.clone();
        handler(move |d: Delivery| {
            let calls = calls.clone();
            async move {
                lock_in_handler(&calls)?.push(d.info.delivered);
                tokio::time::sleep(Duration::from_millis(2500)).await;
                Ok(())
            }
        })
    })
    .await?;

    bus.publisher().publish(&happened("e-1", 1)?).await?;
    handled_at_least(running.stats(), 1, Duration::from_secs(10)).await?;
    let info = all_acked(&bus, WORKER, Duration::from_secs(3)).await?;
    // A redelivery after ack_wait would have bumped the consumer sequence
    // while the handler was still running.
    assert_eq!(info.delivered.consumer_sequence, 1, "redelivered: {info:?}");
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(lock(&calls)?.clone(), vec![1]);
    running.shutdown().await;
    Ok(())
}

/// Messages waiting in a lane behind a slow one (one entity's backlog) are
/// reported in progress too: each runs once, none is redelivered while it
/// waits longer than `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_behind_a_slow_one_keep_theirs_by_reporting_progress() -> anyhow::Result<()>
{
    init_tracing();
    let (_server, bus) = start().await?;
    const WORKER: &str = "queued";
    let calls: Arc<Mutex<Vec<(u32, u64)>>> = Arc::default();
    let mut config = fast_worker(WORKER);
    config.ack_wait = Duration::from_secs(1);
    let running = Worker::start(&bus, config, {
        let calls = calls.clone();
        handler(move |d: Delivery| {
            let calls = calls.clone();
            async move {
                let event: Happened = d
                    .envelope
                    .decode()
                    .map_err(|e| HandlerError::permanent(e.to_string()))?;
                lock_in_handler(&calls)?.push((event.n, d.info.delivered));
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(())
            }
        })
    })
    .await?;

    // One entity, one lane: the last waits about 2.5 s, past ack_wait.
    for n in 1..=6 {
        bus.publisher().publish(&happened("e-1", n)?).await?;
    }
    handled_at_least(running.stats(), 6, Duration::from_secs(15)).await?;
    let info = all_acked(&bus, WORKER, Duration::from_secs(3)).await?;
    assert_eq!(info.num_redelivered, 0, "redelivered: {info:?}");
    assert_eq!(
        lock(&calls)?.clone(),
        (1..=6).map(|n| (n, 1)).collect::<Vec<_>>(),
        "each once, first delivery, in order"
    );
    running.shutdown().await;
    Ok(())
}

/// A slow entity's backlog does not hold up the other entities: a lane's
/// queue has no bound of its own, so the pull goes on past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_entity_s_backlog_does_not_hold_up_the_others() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    const WORKER: &str = "unblocked";
    const BACKLOG: u32 = 20;
    const OTHERS: u32 = 40;
    // The slow entity's messages wait for this gate until the end.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let others = Arc::new(AtomicU64::new(0));
    let running = Worker::start(&bus, fast_worker(WORKER), {
        let (gate, others) = (gate.clone(), others.clone());
        handler(move |d: Delivery| {
            let (gate, others) = (gate.clone(), others.clone());
            async move {
                let event: Happened = d.envelope.decode()?;
                if event.entity == "slow" {
                    pass(&gate).await?;
                } else {
                    others.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            }
        })
    })
    .await?;

    // The backlog first, in the stream ahead of everyone else's messages.
    let outgoing = (0..BACKLOG)
        .map(|n| Ok(Outgoing::from(&happened("slow", n)?)))
        .chain((0..OTHERS).map(|n| Ok(Outgoing::from(&happened(&format!("other-{n}"), n)?))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for result in bus.publisher().publish_batch(&outgoing).await {
        result?;
    }
    // Entities that share the slow one's lane wait behind it (one in eight
    // on average, and the same ones every run: the lane is a fixed hash);
    // every other entity runs.
    eventually(Duration::from_secs(10), || async {
        (others.load(Ordering::SeqCst) >= u64::from(OTHERS) * 3 / 4).then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "only {} of the {OTHERS} other entities' messages ran while one entity's backlog waited",
            others.load(Ordering::SeqCst)
        )
    })?;
    gate.add_permits(BACKLOG as usize);
    handled_at_least(
        running.stats(),
        u64::from(BACKLOG + OTHERS),
        Duration::from_secs(10),
    )
    .await?;
    let info = all_acked(&bus, WORKER, Duration::from_secs(3)).await?;
    assert_eq!(info.num_redelivered, 0, "redelivered: {info:?}");
    running.shutdown().await;
    Ok(())
}

/// However its messages spread over lanes, a copy holds at most `max_held`
/// of them (and what one pull request brings): the rest stay with the server
/// for other copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_holds_no_more_than_max_held_messages() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    const WORKER: &str = "bounded";
    const COUNT: u32 = 40;
    let mut config = fast_worker(WORKER);
    config.lanes = 4;
    config.max_held = 6;
    config.batch = 2;
    config.ack_wait = Duration::from_secs(30);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let running = Worker::start(&bus, config, {
        let (gate, started) = (gate.clone(), started.clone());
        handler(move |_: Delivery| {
            let (gate, started) = (gate.clone(), started.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                pass(&gate).await?;
                Ok(())
            }
        })
    })
    .await?;
    let outgoing = (0..COUNT)
        .map(|n| Ok(Outgoing::from(&happened(&format!("e-{n}"), n)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for result in bus.publisher().publish_batch(&outgoing).await {
        result?;
    }
    eventually(Duration::from_secs(10), || async {
        (started.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await
    .context("no handler started")?;
    // The copy takes what it holds (however slow the machine), then has
    // time to take more, if it would.
    eventually(Duration::from_secs(10), || async {
        let info = consumer_info(&bus, WORKER).await.ok()?;
        (info.num_ack_pending >= 6).then_some(())
    })
    .await
    .context("the copy did not take what it may hold")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = consumer_info(&bus, WORKER).await?;
    // Held (6) plus at most two pull requests in the client's buffer.
    assert!(
        (6..=10).contains(&info.num_ack_pending),
        "the copy holds {} messages, with max_held 6 and pull batches of 2",
        info.num_ack_pending
    );
    assert!(
        info.num_pending >= u64::from(COUNT) - 10,
        "{} left with the server",
        info.num_pending
    );
    gate.add_permits(COUNT as usize);
    handled_at_least(running.stats(), u64::from(COUNT), Duration::from_secs(10)).await?;
    all_acked(&bus, WORKER, Duration::from_secs(3)).await?;
    running.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Service API, connecting, broker restarts
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_api_answers_ping_stats_and_status() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    let stats = Arc::new(WorkerStats::default());
    let running = Worker::start_with_stats(
        &bus,
        fast_worker("tester"),
        handler(|_d: Delivery| async { Ok(()) }),
        stats.clone(),
    )
    .await?;
    stats.set_gauge("outbox_backlog", 7);
    bus.publisher().publish(&happened("e-1", 1)?).await?;
    handled_at_least(&stats, 1, Duration::from_secs(10)).await?;
    let _service = start_service(&bus, "tester", "0.1.0", stats.clone()).await?;
    let client = bus.client();

    let ping = client.request("$SRV.PING.tester", "".into()).await?;
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload)?;
    assert_eq!(ping["name"], "tester", "{ping}");
    assert_eq!(ping["version"], "0.1.0", "{ping}");
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response", "{ping}");

    let reply = client.request("$SRV.STATS.tester", "".into()).await?;
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    assert_eq!(reply["name"], "tester", "{reply}");
    let endpoints = reply["endpoints"].as_array().context("no endpoints")?;
    let status = endpoints
        .iter()
        .find(|e| e["name"] == "status")
        .with_context(|| format!("no status endpoint in {reply}"))?;
    assert_eq!(status["subject"], "queries.tester.status");
    assert_eq!(status["data"]["handled"], 1, "{reply}");
    assert_eq!(status["data"]["gauges"]["outbox_backlog"], 7, "{reply}");

    let reply = client.request("queries.tester.status", "".into()).await?;
    let snapshot: StatsSnapshot = serde_json::from_slice(&reply.payload)?;
    assert_eq!(snapshot.handled, 1);
    assert_eq!(snapshot.gauges.get("outbox_backlog"), Some(&7));
    running.shutdown().await;
    Ok(())
}

/// A worker that consumes two streams (as orders takes events and
/// commands) reports each consumer's figures by stream and their sums: the
/// dead letters of its commands are not hidden by its events' consumer
/// having none (both used to write one gauge, the last one winning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_two_streams_reports_each_consumer_s_figures() -> anyhow::Result<()> {
    init_tracing();
    let (_server, bus) = start().await?;
    const WORKER: &str = "two-streams";
    let stats = Arc::new(WorkerStats::default());
    let ok = || handler(|_d: Delivery| async { Ok(()) });
    let events = Worker::start_with_stats(&bus, fast_worker(WORKER), ok(), stats.clone()).await?;
    let mut on_commands = fast_worker(WORKER);
    on_commands.stream = COMMANDS.into();
    on_commands.filter_subjects = vec!["commands.two-streams.>".into()];
    let commands = Worker::start_with_stats(&bus, on_commands, ok(), stats.clone()).await?;
    bus.publisher().publish(&happened("e-1", 1)?).await?;
    // Not skein messages: dead letters of the commands' consumer.
    for n in 0..3 {
        bus.jetstream()
            .publish(format!("commands.two-streams.junk{n}"), "junk".into())
            .await?
            .await?;
    }
    let gauges = eventually(Duration::from_secs(15), || async {
        let g = stats.snapshot().gauges;
        (g.get("dlq_depth.COMMANDS") == Some(&3)
            && g.get("dlq_depth.EVENTS") == Some(&0)
            && g.get("consumer_lag.EVENTS") == Some(&0))
        .then_some(g)
    })
    .await
    .with_context(|| format!("gauges: {:?}", stats.snapshot().gauges))?;
    assert_eq!(gauges.get("dlq_depth"), Some(&3), "{gauges:?}");
    assert!(gauges.contains_key("consumer_lag.COMMANDS"), "{gauges:?}");
    events.shutdown().await;
    commands.shutdown().await;
    Ok(())
}

/// A copy of a service answering queries that stops answers the request
/// it is working on before its stop returns, and once it has returned
/// every request goes to the copies still running (none waits for an
/// answer that never comes). (A request the server routes to the copy in
/// the instant it unsubscribes is still lost: see `skein_bus::service`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_stops_answers_what_reached_it_and_receives_nothing_after() -> anyhow::Result<()>
{
    init_tracing();
    let (server, bus) = start().await?;
    let started = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicUsize::new(0));
    // A copy whose answers take `slow` and say which copy answered.
    async fn copy(
        bus: &Bus,
        who: String,
        slow: Duration,
        started: Arc<tokio::sync::Notify>,
        finished: Arc<AtomicUsize>,
    ) -> anyhow::Result<skein_bus::service::ServiceHandle> {
        let mut service = start_service(bus, "tester", "0.1.0", Arc::default()).await?;
        service
            .add_endpoint("echo", "queries.tester.echo", move |_request| {
                let (started, finished) = (started.clone(), finished.clone());
                let who = who.clone();
                async move {
                    started.notify_one();
                    tokio::time::sleep(slow).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok(bytes::Bytes::from(who))
                }
            })
            .await?;
        Ok(service)
    }
    let ask = |client: async_nats::Client| async move {
        let request = async_nats::Request::new()
            .payload(bytes::Bytes::new())
            .timeout(Some(Duration::from_secs(5)));
        let reply = client
            .send_request("queries.tester.echo", request)
            .await
            .context("a query got no answer")?;
        anyhow::Ok(String::from_utf8_lossy(&reply.payload).into_owned())
    };

    let first_bus = connect(&server, "first").await?;
    let first = copy(
        &first_bus,
        "first".into(),
        Duration::from_millis(500),
        started.clone(),
        finished.clone(),
    )
    .await?;
    let in_flight = tokio::spawn(ask(bus.client().clone()));
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .context("the first copy never got the query")?;
    let second_bus = connect(&server, "second").await?;
    let second = copy(
        &second_bus,
        "second".into(),
        Duration::ZERO,
        Arc::default(),
        Arc::default(),
    )
    .await?;
    tokio::time::timeout(Duration::from_secs(30), first.stop())
        .await
        .context("the stop never returned")?;
    ensure!(
        finished.load(Ordering::SeqCst) >= 1,
        "the stop returned before the request the copy was working on was answered"
    );
    ensure!(in_flight.await?? == "first");
    for _ in 0..100 {
        let who = ask(bus.client().clone()).await?;
        ensure!(who == "second", "a stopped copy answered");
    }
    // A rolling restart with nothing in flight: each stop is quick, and
    // the same holds once it returns.
    let (mut running, mut connections) = (second, vec![first_bus, second_bus]);
    for step in 0..10 {
        let who = format!("copy {step}");
        connections.push(connect(&server, &who).await?);
        let next = copy(
            connections.last().context("no connection")?,
            who.clone(),
            Duration::ZERO,
            Arc::default(),
            Arc::default(),
        )
        .await?;
        running.stop().await;
        for _ in 0..20 {
            let answered = ask(bus.client().clone()).await?;
            ensure!(answered == who, "a stopped copy answered");
        }
        running = next;
    }
    running.stop().await;
    Ok(())
}

/// A server that asks for TLS with client certificates and a user: a
/// client lacking the CA, its certificate or the credentials is refused at
/// once with a message naming what to set; with all three it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_server_lets_in_only_clients_with_its_ca_certificate_and_credentials(
) -> anyhow::Result<()> {
    init_tracing();
    let mut server = NatsServer::start_secured(Secured {
        user_password: Some(("orders".into(), "a long secret".into())),
        verify_clients: true,
        ..Secured::default()
    })
    .await?;
    let dir = tls_dir();
    let full = NatsSecurity {
        user_password: Some(("orders".into(), "a long secret".into())),
        token: None,
        ca_file: Some(dir.join("ca.pem")),
        client_cert: Some((dir.join("client.pem"), dir.join("client-key.pem"))),
    };
    let attempt = |security: NatsSecurity| {
        let mut config = BusConfig::new(server.url(), "secured");
        config.security = security;
        // A refusal must not wait for this.
        config.connect_timeout = Duration::from_secs(20);
        async move {
            let started = Instant::now();
            let result = Bus::connect(&config).await;
            (result, started.elapsed())
        }
    };
    let refusals = [
        (NatsSecurity::default(), "NATS_CA"),
        (
            NatsSecurity {
                user_password: None,
                ..full.clone()
            },
            "NATS_USER",
        ),
        (
            NatsSecurity {
                user_password: Some(("orders".into(), "wrong".into())),
                ..full.clone()
            },
            "NATS_USER",
        ),
    ];
    for (security, names) in refusals {
        let described = format!("{security:?}");
        let (result, took) = attempt(security).await;
        let error = match result {
            Ok(_) => bail!("{described} was let in"),
            Err(e) => e.to_string(),
        };
        ensure!(error.contains(names), "{described}: {error}");
        ensure!(!error.contains("a long secret"), "the password in {error}");
        ensure!(
            took < Duration::from_secs(5),
            "{described}: refused after {took:?}"
        );
    }
    // Without its certificate the server ends the handshake.
    // Without its certificate the server ends the handshake.
    let (without_cert, took) = attempt(NatsSecurity {
        client_cert: None,
        ..full.clone()
    })
    .await;
    match without_cert {
        Ok(_) => bail!("let in without a client certificate"),
        Err(e) => ensure!(
            matches!(e, Error::Tls { .. }) && e.to_string().contains("NATS_CERT"),
            "{e}"
        ),
    }
    ensure!(took < Duration::from_secs(5), "refused after {took:?}");

    let (bus, _) = attempt(full).await;
    let bus = bus?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    bus.publisher().publish(&happened("e-1", 1)?).await?;

    // A broker restart: the connection comes back by itself, through TLS
    // and with its credentials again.
    server.restart().await?;
    let envelope = happened("e-1", 2)?;
    eventually(Duration::from_secs(15), || async {
        bus.publisher().publish(&envelope).await.ok()
    })
    .await
    .context("no publish got through after the secured broker restarted")?;
    Ok(())
}

/// Credentials in the URL (percent-encoded) and a token there work like
/// the settings, and a URL's password never shows in an error or in any
/// log line, the client library's debug lines included.
#[tokio::test(flavor = "current_thread")]
async fn credentials_in_the_url_are_used_and_never_shown() -> anyhow::Result<()> {
    // Every log line of this test, at every level (one thread: the
    // subscriber sees the client library's lines too).
    let lines = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let lines = lines.clone();
        move || LogLines(lines.clone())
    };
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(writer)
            .with_ansi(false)
            .finish(),
    );
    let server = NatsServer::start_secured(Secured {
        user_password: Some(("catalog".into(), "p@ss:w/rd".into())),
        ..Secured::default()
    })
    .await?;
    let port = server.port();
    let bus = Bus::connect(&BusConfig::new(
        format!("nats://catalog:p%40ss%3Aw%2Frd@127.0.0.1:{port}"),
        "url-user",
    ))
    .await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    let wrong = format!("nats://catalog:not-it@127.0.0.1:{port}");
    let error = match Bus::connect(&BusConfig::new(&wrong, "url-user")).await {
        Ok(_) => bail!("a wrong password was let in"),
        Err(e) => e.to_string(),
    };
    ensure!(
        error.contains("refused the credentials") && !error.contains("not-it"),
        "{error}"
    );
    ensure!(
        skein_bus::redact_url(&wrong) == format!("nats://catalog:***@127.0.0.1:{port}"),
        "{}",
        skein_bus::redact_url(&wrong)
    );

    let with_token = NatsServer::start_secured(Secured {
        token: Some("s3cret-token".into()),
        ..Secured::default()
    })
    .await?;
    let url = format!("nats://s3cret-token@127.0.0.1:{}", with_token.port());
    Bus::connect(&BusConfig::new(&url, "url-token")).await?;
    ensure!(!skein_bus::redact_url(&url).contains("s3cret"));

    let logged = String::from_utf8_lossy(&lock(&lines)?).into_owned();
    ensure!(
        logged.contains("127.0.0.1"),
        "the client library's lines were not captured: {logged}"
    );
    for secret in ["p@ss", "p%40ss", "not-it", "s3cret"] {
        ensure!(!logged.contains(secret), "{secret} logged:\n{logged}");
    }
    Ok(())
}

/// A `tracing` writer into a shared buffer.
struct LogLines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_where_no_server_listens_fails_in_time_and_says_what_to_do() -> anyhow::Result<()>
{
    init_tracing();
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut config = BusConfig::new(&url, "test");
    config.connect_timeout = Duration::from_secs(1);

    let began = Instant::now();
    let result = Bus::connect(&config).await;
    let elapsed = began.elapsed();
    let error = match result {
        Ok(_) => bail!("connected to {url}, where nothing listens"),
        Err(e) => e,
    };
    match &error {
        Error::Connect {
            url: tried,
            attempts,
            ..
        } => {
            assert_eq!(tried, &url);
            assert!(*attempts > 1, "gave up after {attempts} attempt");
        }
        other => bail!("expected a connect error, got {other}"),
    }
    let text = error.to_string();
    assert!(text.contains("NATS_URL"), "{text}");
    assert!(text.contains(&url), "{text}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_working_across_a_broker_restart() -> anyhow::Result<()> {
    init_tracing();
    let mut server = NatsServer::start().await?;
    let mut bus_config = BusConfig::new(server.url(), "test");
    bus_config.request_timeout = Duration::from_secs(2);
    let bus = Bus::connect(&bus_config).await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    let handled: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let running = Worker::start(&bus, fast_worker("restarter"), {
        let handled = handled.clone();
        handler(move |d: Delivery| {
            let handled = handled.clone();
            async move {
                lock_in_handler(&handled)?.insert(d.envelope.id);
                Ok(())
            }
        })
    })
    .await?;
    let publisher = bus.publisher();
    let first = happened("e-1", 1)?;
    publisher.publish(&first).await?;
    eventually(Duration::from_secs(5), || async {
        lock(&handled).ok()?.contains(&first.id).then_some(())
    })
    .await
    .context("the first message was not handled")?;

    server.restart().await?;

    let second = happened("e-1", 2)?;
    // The client reconnects by itself; a publish may time out meanwhile and
    // is repeated (the stream drops a duplicate).
    eventually(Duration::from_secs(15), || async {
        publisher.publish(&second).await.ok()
    })
    .await
    .context("no publish acknowledged after the restart")?;
    eventually(Duration::from_secs(15), || async {
        lock(&handled).ok()?.contains(&second.id).then_some(())
    })
    .await
    .context("the worker did not handle a message published after the restart")?;
    running.shutdown().await;
    Ok(())
}
