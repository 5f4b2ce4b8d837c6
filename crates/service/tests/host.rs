//! A worker host on a real nats-server and database: what its consumers
//! do when the server has lost them.
//!
//! ```text
//! cargo nextest run -p skein-service --test host
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde::{Deserialize, Serialize};
use skein_bus::provision::{apply_builtin_streams, EVENTS};
use skein_bus::{Bus, BusConfig, Delivery, HandlerError};
use skein_message::{Contract, Envelope, Event, MessageContext};
use skein_outbox::{Migration, Store, Tx, TxHandler};
use skein_service::{Host, HostConfig};
use skein_testkit::{eventually, Backend, NatsServer, TestDb};

#[derive(Debug, Serialize, Deserialize)]
struct Happened {
    n: i64,
}

impl Contract for Happened {
    const SERVICE: &'static str = "test";
    const NAME: &'static str = "happened";
    const VERSION: u32 = 1;
}

impl Event for Happened {
    fn entity_id(&self) -> String {
        self.n.to_string()
    }
}

const APPLIED: &[Migration] = &[Migration {
    version: 1,
    description: "what each worker applied",
    sqlite: "CREATE TABLE applied (worker TEXT NOT NULL, n BIGINT NOT NULL);",
    postgres: "CREATE TABLE applied (worker TEXT NOT NULL, n BIGINT NOT NULL);",
}];

/// A nats-server with the streams, and a SQLite database with the
/// `applied` table (both kept while the caller holds them).
async fn set_up() -> anyhow::Result<(NatsServer, Bus, TestDb, Store)> {
    let nats = NatsServer::start().await?;
    let bus = Bus::connect(&BusConfig::new(nats.url(), "host-test")).await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    let db = TestDb::new(Backend::Sqlite).await?;
    let store = Store::connect(db.url()).await?;
    store.migrate("test", APPLIED).await?;
    Ok((nats, bus, db, store))
}

/// Records each event it is handed, in the inbox's transaction.
struct Recorder(&'static str);

impl TxHandler for Recorder {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: Happened = delivery.envelope.decode()?;
        sqlx::query("INSERT INTO applied (worker, n) VALUES ($1, $2)")
            .bind(self.0)
            .bind(event.n)
            .execute(&mut **tx)
            .await
            .map_err(|e| HandlerError::transient(e.to_string()))?;
        Ok(())
    }
}

async fn host(bus: &Bus, store: &Store, name: &'static str) -> anyhow::Result<Host> {
    let mut config = HostConfig::new(name);
    // The inbox remembers 2 s; its cleanup is left to the test.
    config.relay.inbox_retention = Duration::from_secs(2);
    config.relay.cleanup_interval = None;
    let mut host = Host::start(bus.clone(), store.clone(), config).await?;
    host.consume(EVENTS, vec!["events.test.>".into()], Recorder(name), |_| {})
        .await?;
    Ok(host)
}

async fn applied(store: &Store, worker: &str) -> anyhow::Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT n FROM applied WHERE worker = $1 ORDER BY n")
            .bind(worker)
            .fetch_all(store.pool())
            .await?,
    )
}

async fn applied_becomes(store: &Store, worker: &str, expected: &[i64]) -> anyhow::Result<()> {
    eventually(Duration::from_secs(15), || async {
        (applied(store, worker).await.ok()? == expected).then_some(())
    })
    .await
    .with_context(|| {
        format!("{worker} did not apply {expected:?} (it applied what `applied` holds)")
    })
}

/// Past the inbox's retention (its cleanup forgets what ran), `worker`'s
/// consumer is deleted.
async fn lose_consumer_and_memory(bus: &Bus, store: &Store, worker: &str) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sqlx::query("DELETE FROM skein_inbox")
        .execute(store.pool())
        .await?;
    bus.jetstream()
        .get_stream(EVENTS)
        .await?
        .delete_consumer(worker)
        .await
        .with_context(|| format!("cannot delete {worker}'s consumer"))?;
    Ok(())
}

/// A worker's consumer on `EVENTS` is deleted (by an operator, or the
/// server lost its state) while the worker is down, and its inbox has
/// forgotten the events it handled longer ago than its retention. Started
/// again, the worker makes its consumer again at the events its inbox
/// remembers, not at the beginning of the stream: the old event does not
/// run a second time; nor when the consumer goes while the worker runs. A
/// worker new to the stream still takes it from its beginning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_consumer_is_made_again_where_the_inbox_remembers() -> anyhow::Result<()> {
    let (_nats, bus, _db, store) = set_up().await?;
    let publish = |n: i64| {
        let bus = bus.clone();
        async move {
            let envelope = Envelope::event("test", &Happened { n }, &MessageContext::root())?;
            bus.publisher().publish(&envelope).await?;
            anyhow::Ok(())
        }
    };

    let first = host(&bus, &store, "recorder").await?;
    publish(1).await?;
    applied_becomes(&store, "recorder", &[1]).await?;
    first.shutdown().await;

    lose_consumer_and_memory(&bus, &store, "recorder").await?;

    let again = host(&bus, &store, "recorder").await?;
    publish(2).await?;
    applied_becomes(&store, "recorder", &[1, 2]).await?;
    // Time for an old event to come round again, if it were going to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recorded = applied(&store, "recorder").await?;
    ensure!(recorded == [1, 2], "applied {recorded:?}");

    // Lost again while the worker runs: bound again the same way.
    lose_consumer_and_memory(&bus, &store, "recorder").await?;
    let bound = eventually(Duration::from_secs(15), || async {
        let stream = bus.jetstream().get_stream(EVENTS).await.ok()?;
        stream.consumer_info("recorder").await.ok()
    })
    .await;
    ensure!(bound.is_some(), "the running worker did not bind again");
    publish(3).await?;
    applied_becomes(&store, "recorder", &[1, 2, 3]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recorded = applied(&store, "recorder").await?;
    ensure!(recorded == [1, 2, 3], "applied {recorded:?}");
    again.shutdown().await;

    let newcomer = host(&bus, &store, "newcomer").await?;
    applied_becomes(&store, "newcomer", &[1, 2, 3]).await?;
    // New to the stream when it started, it has now run longer than its
    // inbox remembers: a consumer lost now is made again within that
    // retention too, not at the beginning.
    lose_consumer_and_memory(&bus, &store, "newcomer").await?;
    eventually(Duration::from_secs(15), || async {
        let stream = bus.jetstream().get_stream(EVENTS).await.ok()?;
        stream.consumer_info("newcomer").await.ok()
    })
    .await
    .context("the newcomer did not bind again")?;
    publish(4).await?;
    applied_becomes(&store, "newcomer", &[1, 2, 3, 4]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recorded = applied(&store, "newcomer").await?;
    ensure!(
        recorded == [1, 2, 3, 4],
        "the newcomer applied {recorded:?}"
    );
    newcomer.shutdown().await;
    Ok(())
}

/// Records each event it is handed once `open` is set; the first (n = 1)
/// at once.
struct Gated {
    open: Arc<AtomicBool>,
    inner: Recorder,
}

impl TxHandler for Gated {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: Happened = delivery.envelope.decode()?;
        while event.n > 1 && !self.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.inner.handle(tx, delivery).await
    }
}

/// A worker new to the stream is still working through it after more than
/// its inbox retention when its consumer is lost: it is made again after
/// what the consumer had acknowledged, not within the retention (which
/// would skip the events it has not reached) nor at the beginning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_lost_while_catching_up_is_made_again_after_what_it_acknowledged(
) -> anyhow::Result<()> {
    let (_nats, bus, _db, store) = set_up().await?;
    for n in 1..=3 {
        let envelope = Envelope::event("test", &Happened { n }, &MessageContext::root())?;
        bus.publisher().publish(&envelope).await?;
    }
    let open = Arc::new(AtomicBool::new(false));
    let mut config = HostConfig::new("slowpoke");
    // Long enough that a reading of the floor delayed by a loaded machine
    // (the figures come every 100 ms) is still trusted: with 2 s, one full
    // run's floor reading was stale and the consumer was made by time.
    config.relay.inbox_retention = Duration::from_secs(5);
    config.relay.cleanup_interval = None;
    let mut host = Host::start(bus.clone(), store.clone(), config).await?;
    let gated = Gated {
        open: open.clone(),
        inner: Recorder("slowpoke"),
    };
    // One message at a time: the third is not pulled while the second waits.
    host.consume(EVENTS, vec!["events.test.>".into()], gated, |c| {
        c.lanes = 1;
        c.batch = 1;
        c.max_held = 1;
        c.figures_interval = Duration::from_millis(100);
    })
    .await?;
    applied_becomes(&store, "slowpoke", &[1]).await?;
    // Past the retention: all three were stored longer ago than that.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    bus.jetstream()
        .get_stream(EVENTS)
        .await?
        .delete_consumer("slowpoke")
        .await
        .context("cannot delete the consumer")?;
    // The second finishes (its ack finds no consumer); the copy, with room
    // to pull again, finds its consumer gone and binds it again.
    open.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(15), || async {
        let stream = bus.jetstream().get_stream(EVENTS).await.ok()?;
        stream.consumer_info("slowpoke").await.ok()
    })
    .await
    .context("the worker did not bind again")?;
    applied_becomes(&store, "slowpoke", &[1, 2, 3]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recorded = applied(&store, "slowpoke").await?;
    ensure!(recorded == [1, 2, 3], "applied {recorded:?}");
    host.shutdown().await;
    Ok(())
}

/// A query that writes a message: it records `n` and announces it.
#[derive(Debug, Serialize, Deserialize)]
struct Note {
    n: i64,
}

impl Contract for Note {
    const SERVICE: &'static str = "notes";
    const NAME: &'static str = "note";
    const VERSION: u32 = 1;
}

impl skein_message::Query for Note {
    type Reply = i64;
}

/// A query in flight when the host shuts down is answered, and the message
/// it committed is published before the shutdown returns: queries stop
/// before the relay's last pass, not after it (its message waited for the
/// next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_answered_during_shutdown_has_its_message_published() -> anyhow::Result<()> {
    let (_nats, bus, _db, store) = set_up().await?;
    let mut host = Host::start(bus.clone(), store.clone(), HostConfig::new("notes")).await?;
    let started = Arc::new(tokio::sync::Notify::new());
    let handler_store = store.clone();
    let handler_started = started.clone();
    host.query(move |note: Note, context: MessageContext| {
        let (store, started) = (handler_store.clone(), handler_started.clone());
        async move {
            started.notify_one();
            // Long enough for the rest of the shutdown to be over.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let fail = |e: skein_outbox::Error| skein_service::ServiceError {
                status: 500,
                message: e.to_string(),
            };
            let mut tx = store.begin().await.map_err(fail)?;
            let event =
                Envelope::event("notes", &Happened { n: note.n }, &context).map_err(|e| {
                    skein_service::ServiceError {
                        status: 500,
                        message: e.to_string(),
                    }
                })?;
            tx.publish(&event);
            tx.commit().await.map_err(fail)?;
            Ok(note.n)
        }
    })
    .await?;

    let asking = bus.clone();
    let answer = tokio::spawn(async move { skein_service::request(&asking, &Note { n: 7 }).await });
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .context("the query never reached the handler")?;
    host.shutdown().await;
    let answered = answer.await?.context("the query in flight got no answer")?;
    ensure!(answered == 7, "answered {answered}");
    ensure!(
        store.outbox_backlog().await? == 0,
        "the query's message was left in the outbox at shutdown"
    );
    let stored = skein_bus::replay::read(
        &bus,
        EVENTS,
        "events.test.>",
        skein_bus::replay::StartAt::Beginning,
    )
    .await?;
    ensure!(stored.len() == 1, "{} events stored", stored.len());
    Ok(())
}
