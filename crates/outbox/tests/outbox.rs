//! The outbox, relay and inbox against a real nats-server, on SQLite and on
//! PostgreSQL: every test runs once per backend (`sqlite::…`, `postgres::…`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde::{Deserialize, Serialize};
use skein_bus::provision::{apply_builtin_streams, EVENTS};
use skein_bus::replay::{read, StartAt};
use skein_bus::{Bus, BusConfig, Delivery, HandlerError, Outgoing, Worker, WorkerConfig};
use skein_message::{Contract, Envelope, Event, MessageContext};
use skein_outbox::{Inbox, Migration, Relay, RelayConfig, Statements, Store, Tx, TxHandler};
use skein_testkit::{backend_tests, eventually, Backend, NatsServer, TestDb};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Serialize, Deserialize)]
struct Happened {
    entity: String,
    n: i64,
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

const ITEMS: &[Migration] = &[
    Migration {
        version: 1,
        description: "items",
        sqlite: "CREATE TABLE items (entity TEXT NOT NULL, n BIGINT NOT NULL);",
        postgres: "CREATE TABLE items (entity TEXT NOT NULL, n BIGINT NOT NULL);",
    },
    Migration {
        version: 2,
        description: "applied, in application order",
        sqlite: "CREATE TABLE applied (seq INTEGER PRIMARY KEY AUTOINCREMENT, entity TEXT NOT NULL, n BIGINT NOT NULL, copy TEXT NOT NULL);",
        postgres: "CREATE TABLE applied (seq BIGSERIAL PRIMARY KEY, entity TEXT NOT NULL, n BIGINT NOT NULL, copy TEXT NOT NULL);",
    },
];

struct Harness {
    nats: NatsServer,
    bus: Bus,
    store: Store,
    db: TestDb,
    shutdown: CancellationToken,
}

impl Harness {
    async fn start(backend: Backend) -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        let bus = Bus::connect(&BusConfig::new(nats.url(), "outbox-test")).await?;
        apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
        let db = TestDb::new(backend).await?;
        let store = Store::connect(db.url()).await?;
        store.migrate("test_items", ITEMS).await?;
        Ok(Self {
            nats,
            bus,
            store,
            db,
            shutdown: CancellationToken::new(),
        })
    }

    fn relay(&self, config: RelayConfig) -> Relay {
        Relay::new(self.store.clone(), self.bus.publisher(), config)
    }

    fn spawn_relay(&self) {
        self.relay(fast_relay()).spawn(self.shutdown.clone());
    }

    /// Writes an item and its event in one transaction.
    async fn write(&self, entity: &str, n: i64) -> anyhow::Result<Envelope> {
        let mut tx = self.store.begin().await?;
        insert_item(&mut tx, entity, n).await?;
        let envelope = happened(entity, n)?;
        tx.publish(&envelope);
        tx.commit().await?;
        Ok(envelope)
    }

    async fn stream_messages(&self) -> anyhow::Result<Vec<skein_bus::replay::StoredMessage>> {
        Ok(read(&self.bus, EVENTS, "events.test.>", StartAt::Beginning).await?)
    }

    /// Waits up to `within` until at most `rows` outbox rows are left
    /// unpublished (or published and not yet marked).
    async fn backlog_at_most(&self, rows: i64, within: Duration) -> Option<()> {
        eventually(within, || async {
            (self.store.outbox_backlog().await.ok()? <= rows).then_some(())
        })
        .await
    }

    /// Waits up to `within` until the stream holds `messages` test events.
    async fn stream_holds(&self, messages: usize, within: Duration) -> Option<()> {
        eventually(within, || async {
            (self.stream_messages().await.ok()?.len() == messages).then_some(())
        })
        .await
    }

    /// The SQLite relay lease's owner and how long it has left (µs;
    /// negative once run out), if anyone took it.
    async fn lease(&self) -> anyhow::Result<Option<(String, i64)>> {
        Ok(sqlx::query_as::<_, (String, i64)>(
            "SELECT owner, expires_at - $1 FROM skein_relay_lease WHERE name = 'outbox'",
        )
        .bind(skein_outbox::now_micros())
        .fetch_optional(self.store.pool())
        .await?)
    }

    /// The owner of a SQLite relay lease that has not run out.
    async fn holder(&self) -> anyhow::Result<Option<String>> {
        Ok(self
            .lease()
            .await?
            .filter(|(_, left)| *left >= 0)
            .map(|(owner, _)| owner))
    }

    async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(self.store.pool())
            .await?)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn fast_relay() -> RelayConfig {
    RelayConfig {
        poll_interval: Duration::from_millis(200),
        lease: Duration::from_secs(2),
        ..RelayConfig::default()
    }
}

async fn insert_item(tx: &mut Tx, entity: &str, n: i64) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO items (entity, n) VALUES ($1, $2)")
        .bind(entity)
        .bind(n)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Counts its applications in the `items` table: one row per message applied.
struct Apply;

impl TxHandler for Apply {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: Happened = delivery.envelope.decode()?;
        sqlx::query("INSERT INTO items (entity, n) VALUES ($1, $2)")
            .bind(format!("applied:{}", event.entity))
            .bind(event.n)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

async fn a_committed_change_is_published_and_a_rolled_back_one_is_not(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    h.spawn_relay();
    let committed = h.write("e1", 1).await?;

    let mut tx = h.store.begin().await?;
    insert_item(&mut tx, "e2", 2).await?;
    tx.publish(&Envelope::event(
        "test",
        &Happened {
            entity: "e2".into(),
            n: 2,
        },
        &MessageContext::root(),
    )?);
    tx.rollback().await?;

    let mut dropped = h.store.begin().await?;
    insert_item(&mut dropped, "e3", 3).await?;
    dropped.publish(&Envelope::event(
        "test",
        &Happened {
            entity: "e3".into(),
            n: 3,
        },
        &MessageContext::root(),
    )?);
    drop(dropped);

    h.backlog_at_most(0, Duration::from_secs(10))
        .await
        .context("the relay did not publish the committed message")?;
    let stored = h.stream_messages().await?;
    ensure!(
        stored.len() == 1,
        "expected only the committed message, got {}",
        stored.len()
    );
    let back = Envelope::from_parts(
        &stored[0].subject,
        stored[0].headers.as_ref(),
        stored[0].payload.clone(),
    )?;
    ensure!(back.id == committed.id && back.kind == "test.happened.v1");
    ensure!(
        h.count("SELECT COUNT(*) FROM items").await? == 1,
        "rolled-back writes persisted"
    );
    Ok(())
}

/// A commit whose outbox write fails (the same message queued twice breaks
/// the outbox's unique id) commits nothing, neither the state change nor
/// the inbox record, and the next transaction works: on SQLite the outbox
/// insert and the COMMIT travel together, and the COMMIT must not run.
async fn a_commit_whose_outbox_write_fails_commits_nothing(backend: Backend) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let id = uuid::Uuid::now_v7();
    let mut tx = h.store.begin().await?;
    ensure!(tx.mark_processed("failing", id).await?, "a new message");
    insert_item(&mut tx, "e1", 1).await?;
    let envelope = happened("e1", 1)?;
    tx.publish(&envelope);
    tx.publish(&envelope);
    let failed = tx.commit().await;
    ensure!(
        failed.is_err(),
        "a duplicate outbox id must fail the commit"
    );

    ensure!(
        h.count("SELECT COUNT(*) FROM items").await? == 0,
        "the state change of a failed commit persisted"
    );
    ensure!(
        h.count("SELECT COUNT(*) FROM skein_outbox").await? == 0,
        "outbox rows of a failed commit persisted"
    );
    let mut again = h.store.begin().await?;
    ensure!(
        again.mark_processed("failing", id).await?,
        "the inbox record of a failed commit persisted"
    );
    insert_item(&mut again, "e1", 1).await?;
    again.publish(&envelope);
    again.commit().await?;
    ensure!(h.count("SELECT COUNT(*) FROM items").await? == 1);
    ensure!(h.count("SELECT COUNT(*) FROM skein_outbox").await? == 1);
    Ok(())
}

/// Statements sent together each get their own values, the returning one's
/// rows come back (none when its update matched nothing), and a failing
/// statement takes the others with it once the transaction is dropped.
async fn statements_sent_together_apply_with_their_own_values(
    backend: Backend,
) -> anyhow::Result<()> {
    let db = TestDb::new(backend).await?;
    let store = Store::connect(db.url()).await?;
    store.migrate("test_items", ITEMS).await?;
    let items = || async {
        sqlx::query_as::<_, (String, i64)>("SELECT entity, n FROM items ORDER BY entity")
            .fetch_all(store.pool())
            .await
    };
    let mut tx = store.begin().await?;
    insert_item(&mut tx, "a", 1).await?;
    insert_item(&mut tx, "b", 2).await?;
    tx.commit().await?;

    let update = |entity: &'static str, n: i64, writes: &mut Statements| {
        writes.push_returning(
            "UPDATE items SET n = $1 WHERE entity = $2 RETURNING n",
            |b| {
                b.bind(n).bind(entity.to_owned());
            },
        );
    };
    let mut tx = store.begin().await?;
    let mut writes = Statements::new(tx.backend());
    writes.push(
        "INSERT INTO items (entity, n) VALUES ($1, $2), ($3, $4)",
        |b| {
            b.bind("c".to_owned())
                .bind(3_i64)
                .bind("d".to_owned())
                .bind(4_i64);
        },
    );
    update("a", 10, &mut writes);
    writes.push("UPDATE items SET n = $1 WHERE entity = $2", |b| {
        b.bind(20_i64).bind("b".to_owned());
    });
    let returned = writes.run(&mut tx).await?;
    ensure!(
        returned.len() == 1,
        "the update returns its row, got {}",
        returned.len()
    );
    let mut writes = Statements::new(tx.backend());
    update("missing", 30, &mut writes);
    writes.push("INSERT INTO items (entity, n) VALUES ($1, $2)", |b| {
        b.bind("e".to_owned()).bind(5_i64);
    });
    ensure!(
        writes.run(&mut tx).await?.is_empty(),
        "an update that matched nothing returns no row"
    );
    tx.commit().await?;
    let expected: Vec<(String, i64)> = [("a", 10), ("b", 20), ("c", 3), ("d", 4), ("e", 5)]
        .into_iter()
        .map(|(e, n)| (e.to_owned(), n))
        .collect();
    ensure!(items().await? == expected, "{:?}", items().await?);

    let mut tx = store.begin().await?;
    let mut writes = Statements::new(tx.backend());
    writes
        .push("UPDATE items SET n = n + 100 WHERE entity = $1", |b| {
            b.bind("a".to_owned());
        })
        .push("INSERT INTO items (entity, n) VALUES ($1, NULL)", |b| {
            b.bind("null".to_owned());
        })
        .push("INSERT INTO items (entity, n) VALUES ($1, $2)", |b| {
            b.bind("after".to_owned()).bind(6_i64);
        });
    ensure!(
        writes.run(&mut tx).await.is_err(),
        "a NOT NULL violation must fail"
    );
    drop(tx);
    ensure!(
        items().await? == expected,
        "a failed transaction left changes: {:?}",
        items().await?
    );

    let mut twice = Statements::new(store.backend());
    update("a", 1, &mut twice);
    update("b", 2, &mut twice);
    let mut tx = store.begin().await?;
    ensure!(
        twice.run(&mut tx).await.is_err(),
        "two statements returning rows must be refused"
    );
    Ok(())
}

async fn the_relay_publishes_in_commit_order(backend: Backend) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let mut written = Vec::new();
    for n in 0..300 {
        written.push(h.write(&format!("e{}", n % 7), n).await?.id);
    }
    h.spawn_relay();
    h.backlog_at_most(0, Duration::from_secs(20))
        .await
        .context("outbox not drained")?;
    let ids: Vec<String> = h
        .stream_messages()
        .await?
        .iter()
        .filter_map(|m| {
            m.headers
                .as_ref()?
                .get("ce-id")
                .map(|v| v.as_str().to_owned())
        })
        .collect();
    let expected: Vec<String> = written.iter().map(|id| id.to_string()).collect();
    ensure!(ids == expected, "stream order differs from commit order");
    Ok(())
}

/// Concurrent writers, the relay publishing as they commit: each entity's
/// events reach the stream in the order its writers committed them (each
/// writer takes the entity's row lock and counts on; on PostgreSQL `seq`
/// is given out at insert, not at commit, so rows of other entities commit
/// out of `seq` order all the time), and none is lost or doubled.
async fn concurrent_writers_events_reach_the_stream_in_each_entity_s_commit_order(
    backend: Backend,
) -> anyhow::Result<()> {
    const WRITERS: i64 = 8;
    const WRITES: i64 = 25;
    let h = Harness::start(backend).await?;
    let entities = ["a", "b", "c"];
    for entity in entities {
        let mut tx = h.store.begin().await?;
        insert_item(&mut tx, entity, 0).await?;
        tx.commit().await?;
    }
    h.spawn_relay();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = h.store.clone();
            tokio::spawn(async move {
                for i in 0..WRITES {
                    let entity = ["a", "b", "c"][usize::try_from((w + i) % 3)?];
                    let mut tx = store.begin().await?;
                    // The entity's row lock: its writers take turns.
                    let n: i64 = sqlx::query_scalar(
                        "UPDATE items SET n = n + 1 WHERE entity = $1 RETURNING n",
                    )
                    .bind(entity)
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.publish(&happened(entity, n)?);
                    tx.commit().await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    h.backlog_at_most(0, Duration::from_secs(30))
        .await
        .context("outbox not drained")?;
    let total = usize::try_from(WRITERS * WRITES)?;
    h.stream_holds(total, Duration::from_secs(10))
        .await
        .with_context(|| format!("the stream does not hold exactly {total} events"))?;
    let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in h.stream_messages().await? {
        let e = Envelope::from_parts(&m.subject, m.headers.as_ref(), m.payload)?;
        let event: Happened = e.decode()?;
        seen.entry(event.entity).or_default().push(event.n);
    }
    for (entity, ns) in &seen {
        let committed: Vec<i64> = (1..=i64::try_from(ns.len())?).collect();
        ensure!(
            *ns == committed,
            "{entity}'s events out of commit order: {ns:?}"
        );
    }
    ensure!(seen.len() == entities.len(), "{seen:?}");
    Ok(())
}

async fn a_relay_killed_between_publish_and_mark_loses_nothing_and_duplicates_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    for n in 0..20 {
        h.write("e", n).await?;
    }
    // The first relay publishes and dies before marking anything.
    let first = h.relay(fast_relay());
    let rows = first.fetch_pending().await?;
    ensure!(rows.len() == 20);
    let acked = first.publish(&rows).await;
    ensure!(acked.len() == 20);
    drop(first);
    ensure!(
        h.store.outbox_backlog().await? == 20,
        "rows must still be unpublished"
    );

    // Its successor publishes them again: JetStream drops the duplicates.
    let second = h.relay(fast_relay());
    ensure!(second.drain().await? == 20);
    ensure!(h.store.outbox_backlog().await? == 0);
    let stored = h.stream_messages().await?;
    ensure!(
        stored.len() == 20,
        "expected 20 messages in the stream, found {}",
        stored.len()
    );
    Ok(())
}

/// A message queued without `Nats-Msg-Id` (or with an empty one) gets its
/// outbox row id as one, kept with the row: published again after a relay
/// died before marking it, it is still stored once.
async fn a_message_queued_without_an_id_is_stored_once_under_its_row_id(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let mut tx = h.store.begin().await?;
    for (n, id) in [(1, None), (2, Some(""))] {
        let mut message = Outgoing::from(&happened("plain", n)?);
        message.headers = async_nats::HeaderMap::new();
        message.headers.insert("x-kind", "plain");
        if let Some(id) = id {
            message
                .headers
                .insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        tx.publish_outgoing(message);
    }
    tx.commit().await?;

    let first = h.relay(fast_relay());
    let rows = first.fetch_pending().await?;
    ensure!(rows.len() == 2);
    ensure!(first.publish(&rows).await.len() == 2);
    drop(first);
    let second = h.relay(fast_relay());
    ensure!(second.drain().await? == 2);

    let stored = h.stream_messages().await?;
    ensure!(
        stored.len() == 2,
        "two messages published twice are stored {} times",
        stored.len()
    );
    for (message, row) in stored.iter().zip(&rows) {
        let headers = message.headers.clone().unwrap_or_default();
        let id = headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned());
        ensure!(
            !row.id.is_empty() && id.as_deref() == Some(row.id.as_str()),
            "stored with Nats-Msg-Id {id:?}, the row's id is {:?}",
            row.id
        );
        ensure!(
            headers.get("x-kind").map(|v| v.as_str()) == Some("plain"),
            "the message's own headers were not kept"
        );
    }
    Ok(())
}

/// The active relay publishes every row once, round after round, however
/// late it marks them: on SQLite it marks them together (many rounds, few
/// marks), remembering meanwhile how far it has published.
async fn the_active_relay_publishes_each_row_once_and_on_sqlite_marks_rows_together(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    // Marks a second apart: however slow the machine, 30 rounds take far
    // fewer marks than rounds.
    let relay = h.relay(RelayConfig {
        mark_delay: Duration::from_secs(1),
        ..fast_relay()
    });
    let watch = relay.clone();
    relay.spawn(h.shutdown.clone());
    // One row per round: each is on the stream before the next commits.
    let rows = 30;
    for n in 0..rows {
        h.write("e", n).await?;
        let expected = usize::try_from(n + 1)?;
        h.stream_holds(expected, Duration::from_secs(5))
            .await
            .with_context(|| format!("row {n} was not published"))?;
    }
    h.backlog_at_most(0, Duration::from_secs(10))
        .await
        .context("the rows were not marked published")?;
    ensure!(
        watch.duplicates() == 0,
        "{} rows were published again",
        watch.duplicates()
    );
    ensure!(h.stream_messages().await?.len() == usize::try_from(rows)?);
    if backend == Backend::Sqlite {
        // One mark sets one time on all its rows.
        let marks = h
            .count("SELECT COUNT(DISTINCT published_at) FROM skein_outbox")
            .await?;
        ensure!(
            marks <= rows / 2,
            "{rows} rounds took {marks} marks: rows are not marked together"
        );
    }
    Ok(())
}

/// A backlog is marked while it is published, every eight batches, not
/// only once it is drained and the delay has passed; what is left is marked
/// when the relay stops.
#[tokio::test]
async fn sqlite_a_backlog_is_marked_while_the_relay_publishes_it() -> anyhow::Result<()> {
    let h = Harness::start(Backend::Sqlite).await?;
    for n in 0..100 {
        h.write("e", n).await?;
    }
    let stop = CancellationToken::new();
    let running = h
        .relay(RelayConfig {
            batch_size: 10,
            mark_delay: Duration::from_secs(3600),
            ..fast_relay()
        })
        .spawn(stop.clone());
    h.stream_holds(100, Duration::from_secs(10))
        .await
        .context("the backlog was not published")?;
    h.backlog_at_most(20, Duration::from_secs(5))
        .await
        .context("a backlog of ten batches was not marked every eight batches")?;
    stop.cancel();
    running.await?;
    ensure!(
        h.store.outbox_backlog().await? == 0,
        "the relay stopped without marking the rows it had published"
    );
    Ok(())
}

/// The active relay crashes holding rows it published and has not yet
/// marked (on SQLite it marks late): the relay that takes over publishes
/// them again, and the stream keeps each once.
#[tokio::test]
async fn sqlite_a_relay_that_crashes_before_marking_loses_nothing_and_duplicates_nothing(
) -> anyhow::Result<()> {
    let h = Harness::start(Backend::Sqlite).await?;
    let first = h
        .relay(RelayConfig {
            mark_delay: Duration::from_secs(3600),
            ..fast_relay()
        })
        .spawn(CancellationToken::new());
    for n in 0..10 {
        h.write("e", n).await?;
    }
    h.stream_holds(10, Duration::from_secs(10))
        .await
        .context("the first relay did not publish")?;
    ensure!(
        h.store.outbox_backlog().await? == 10,
        "the rows were marked before their delay"
    );
    // A crash: no final mark, no lease released.
    first.abort();
    let _ = first.await;

    // Another process's relay takes over once the lease runs out.
    let other = Store::connect(h.db.url()).await?;
    let standby = Relay::new(other, h.bus.publisher(), fast_relay());
    let watch = standby.clone();
    standby.spawn(h.shutdown.clone());
    h.backlog_at_most(0, Duration::from_secs(15))
        .await
        .context("the relay that took over did not publish the unmarked rows")?;
    let stored = h.stream_messages().await?.len();
    ensure!(
        stored == 10,
        "expected 10 messages in the stream, found {stored}"
    );
    ensure!(
        watch.duplicates() == 10,
        "the stream called {} of the 10 rows published again duplicates",
        watch.duplicates()
    );
    Ok(())
}

/// A row the stream refuses holds back only itself: the rows around it are
/// published and marked, and it is published once it can be.
async fn a_row_that_cannot_be_published_holds_back_only_itself(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let relay = h.relay(fast_relay());
    let watch = relay.clone();
    h.write("before", 1).await?;
    let mut tx = h.store.begin().await?;
    // No stream takes this subject yet.
    let mut later = Outgoing::from(&happened("later", 2)?);
    later.subject = "later.test".to_owned();
    tx.publish_outgoing(later);
    tx.commit().await?;
    h.write("after", 3).await?;
    relay.spawn(h.shutdown.clone());

    h.stream_holds(2, Duration::from_secs(10))
        .await
        .context("the rows around the refused one were not published")?;
    h.backlog_at_most(1, Duration::from_secs(5))
        .await
        .context("the published rows were not marked")?;
    // Some rounds retry the refused row.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(h.store.outbox_backlog().await? == 1);
    ensure!(h.stream_messages().await?.len() == 2);

    h.bus
        .jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: "LATER".into(),
            subjects: vec!["later.>".into()],
            ..Default::default()
        })
        .await?;
    h.backlog_at_most(0, Duration::from_secs(10))
        .await
        .context("the refused row was not published once a stream took it")?;
    ensure!(h.stream_messages().await?.len() == 2);
    ensure!(
        watch.duplicates() == 0,
        "{} rows were published again",
        watch.duplicates()
    );
    Ok(())
}

/// A whole batch of rows that cannot be published (no stream takes their
/// subject) no longer fills every round: they are held back between
/// tries, and the rows committed behind them are published.
async fn a_batch_of_rows_that_cannot_be_published_holds_back_none_behind_it(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let relay = h.relay(RelayConfig {
        batch_size: 3,
        ..fast_relay()
    });
    let mut tx = h.store.begin().await?;
    // More than a batch, of one entity: one of them is tried (and held
    // back), the others wait behind it.
    for n in 0..5 {
        let mut stuck = Outgoing::from(&happened("stuck", n)?);
        stuck.subject = "nowhere.test".to_owned();
        tx.publish_outgoing(stuck);
    }
    tx.commit().await?;
    h.write("behind", 10).await?;
    h.write("behind", 11).await?;
    relay.spawn(h.shutdown.clone());
    h.stream_holds(2, Duration::from_secs(10))
        .await
        .context("the rows behind a batch of unpublishable ones were not published")?;
    h.backlog_at_most(5, Duration::from_secs(5))
        .await
        .context("the published rows were not marked")?;
    Ok(())
}

/// An entity's rows reach the stream in commit order even when one fails:
/// a row whose publish fails holds back the rows of its entity behind it
/// (not the others'), until it is published.
async fn an_entity_s_rows_wait_behind_its_row_that_cannot_be_published(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let relay = h.relay(fast_relay());
    let mut tx = h.store.begin().await?;
    // No stream takes this subject yet.
    let mut first = Outgoing::from(&happened("same", 1)?);
    first.subject = "later.same".to_owned();
    tx.publish_outgoing(first);
    tx.commit().await?;
    h.write("same", 2).await?;
    h.write("other", 3).await?;
    relay.spawn(h.shutdown.clone());
    h.stream_holds(1, Duration::from_secs(10))
        .await
        .context("the other entity's row was not published")?;
    // Some rounds go by: the entity's second row stays behind its first.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stored = h.stream_messages().await?;
    ensure!(
        stored.len() == 1 && stored[0].subject.contains("other"),
        "published past its entity's failed row: {:?}",
        stored
            .iter()
            .map(|m| m.subject.to_string())
            .collect::<Vec<_>>()
    );
    let later = h
        .bus
        .jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: "LATER".into(),
            subjects: vec!["later.>".into()],
            ..Default::default()
        })
        .await?;
    h.backlog_at_most(0, Duration::from_secs(45))
        .await
        .context("the entity's rows were not published once a stream took the first")?;
    let second = h
        .stream_messages()
        .await?
        .into_iter()
        .find(|m| m.subject.contains("same"))
        .context("the second row is not in the stream")?;
    let first = later.get_raw_message(1).await?;
    ensure!(
        first.time <= second.published,
        "the second row was stored before the first"
    );
    Ok(())
}

async fn a_republish_beyond_the_duplicate_window_is_absorbed_by_the_inbox(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    // A short duplicate window, so the republish lands twice in the stream.
    let js = h.bus.jetstream();
    let mut config = js.get_stream(EVENTS).await?.info().await?.config.clone();
    config.duplicate_window = Duration::from_millis(500);
    js.update_stream(&config).await?;

    let envelope = h.write("dup", 7).await?;
    let relay = h.relay(fast_relay());
    let rows = relay.fetch_pending().await?;
    relay.publish(&rows).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    relay.drain().await?;
    let stored = h.stream_messages().await?;
    ensure!(
        stored.len() == 2,
        "the republish should be stored again, found {}",
        stored.len()
    );

    let worker = Worker::start(
        &h.bus,
        WorkerConfig::new("applier", EVENTS, vec!["events.test.>".into()]),
        Inbox::new(h.store.clone(), "applier", Apply),
    )
    .await?;
    eventually(Duration::from_secs(10), || async {
        (worker.stats().snapshot().handled == 2).then_some(())
    })
    .await
    .context("both copies should be acknowledged")?;
    let applied = h
        .count("SELECT COUNT(*) FROM items WHERE entity = 'applied:dup'")
        .await?;
    ensure!(
        applied == 1,
        "applied {applied} times, expected once (id {})",
        envelope.id
    );
    worker.shutdown().await;
    Ok(())
}

async fn the_same_message_handled_twice_has_one_effect(backend: Backend) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let envelope = Envelope::event(
        "test",
        &Happened {
            entity: "x".into(),
            n: 1,
        },
        &MessageContext::root(),
    )?;
    let inbox = Inbox::new(h.store.clone(), "applier", Apply);
    let delivery = Delivery {
        envelope,
        info: skein_bus::DeliveryInfo {
            stream: EVENTS.into(),
            consumer: "applier".into(),
            stream_sequence: 1,
            delivered: 1,
        },
    };
    use skein_bus::Handler;
    inbox.handle(&delivery).await?;
    inbox.handle(&delivery).await?;
    // Another handler name is another inbox.
    Inbox::new(h.store.clone(), "other", Apply)
        .handle(&delivery)
        .await?;
    ensure!(
        h.count("SELECT COUNT(*) FROM items WHERE entity = 'applied:x'")
            .await?
            == 2
    );
    ensure!(h.count("SELECT COUNT(*) FROM skein_inbox").await? == 2);
    Ok(())
}

/// A handler that fails permanently on its first message leaves no trace.
struct FailAfterWriting;

impl TxHandler for FailAfterWriting {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO items (entity, n) VALUES ('half-done', 0)")
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        tx.publish(&Envelope::event(
            "test",
            &Happened {
                entity: "never".into(),
                n: 0,
            },
            &delivery.envelope.context(),
        )?);
        Err(HandlerError::transient("fails after writing"))
    }
}

async fn a_failing_handler_commits_nothing_and_can_run_again(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let envelope = Envelope::event(
        "test",
        &Happened {
            entity: "x".into(),
            n: 1,
        },
        &MessageContext::root(),
    )?;
    let delivery = Delivery {
        envelope,
        info: skein_bus::DeliveryInfo {
            stream: EVENTS.into(),
            consumer: "f".into(),
            stream_sequence: 1,
            delivered: 1,
        },
    };
    use skein_bus::Handler;
    let failing = Inbox::new(h.store.clone(), "f", FailAfterWriting);
    ensure!(failing.handle(&delivery).await.is_err());
    ensure!(
        h.count("SELECT COUNT(*) FROM items").await? == 0,
        "a failed handler's write persisted"
    );
    ensure!(
        h.store.outbox_backlog().await? == 0,
        "a failed handler's message was queued"
    );
    ensure!(
        h.count("SELECT COUNT(*) FROM skein_inbox").await? == 0,
        "a failed message was recorded as processed"
    );
    Inbox::new(h.store.clone(), "f", Apply)
        .handle(&delivery)
        .await?;
    ensure!(
        h.count("SELECT COUNT(*) FROM items WHERE entity = 'applied:x'")
            .await?
            == 1
    );
    Ok(())
}

async fn the_relay_wakes_on_commit_without_waiting_for_the_poll(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    // Neither a poll nor a lease running out (a standby taking over) comes
    // within the test.
    let slow_poll = RelayConfig {
        poll_interval: Duration::from_secs(3600),
        lease: Duration::from_secs(600),
        ..fast_relay()
    };
    h.relay(slow_poll.clone()).spawn(h.shutdown.clone());
    // Let the relay take its lock and go to sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.write("a", 1).await?;
    h.backlog_at_most(0, Duration::from_secs(3))
        .await
        .context("the relay did not wake on an in-process commit")?;

    // A commit from another process (here: another store, with its own
    // pool and writer): on PostgreSQL it arrives by NOTIFY; on SQLite the
    // other process's relay, standing by, wakes the active one over NATS.
    let other = Store::connect(h.db.url()).await?;
    if backend == Backend::Sqlite {
        Relay::new(other.clone(), h.bus.publisher(), slow_poll.clone()).spawn(h.shutdown.clone());
        // Let it find the lease taken and stand by.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for n in 2..5 {
        let mut tx = other.begin().await?;
        tx.publish(&happened("b", n)?);
        tx.commit().await?;
        h.stream_holds(usize::try_from(n)?, Duration::from_secs(3))
            .await
            .with_context(|| format!("the relay did not wake on commit {n} of another process"))?;
    }
    Ok(())
}

async fn a_standby_relay_takes_over_when_the_active_one_stops(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let first_stop = CancellationToken::new();
    h.relay(fast_relay()).spawn(first_stop.clone());
    h.write("a", 1).await?;
    h.backlog_at_most(0, Duration::from_secs(5))
        .await
        .context("first relay did not publish")?;
    // The standby, with its own pool as another process would have.
    let other = Store::connect(h.db.url()).await?;
    let standby = Relay::new(other, h.bus.publisher(), fast_relay());
    standby.spawn(h.shutdown.clone());
    first_stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 0..5 {
        h.write("b", n).await?;
    }
    h.backlog_at_most(0, Duration::from_secs(10))
        .await
        .context("the standby did not take over")?;
    ensure!(h.stream_messages().await?.len() == 6);
    Ok(())
}

/// A backlog that takes the active relay several leases to publish does
/// not cost it its lock (the SQLite lease running out, the PostgreSQL
/// server ending a lock session silent for three leases: each is kept by a
/// task of its own): a standby beside it
/// never takes over mid-drain, so no row goes out twice.
async fn a_backlog_longer_than_a_lease_to_publish_keeps_the_active_relay_its_lock(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let commit = async |from: i64, rows: i64| -> anyhow::Result<()> {
        for chunk in (from..from + rows).step_by(1000) {
            let mut tx = h.store.begin().await?;
            for n in chunk..(chunk + 1000).min(from + rows) {
                tx.publish(&happened(&format!("e{}", n % 64), n)?);
            }
            tx.commit().await?;
        }
        Ok(())
    };
    let config = RelayConfig {
        lease: Duration::from_millis(500),
        ..fast_relay()
    };
    // How fast this machine publishes, so that the backlog takes several
    // leases whatever its speed.
    const PROBE: i64 = 5_000;
    commit(0, PROBE).await?;
    let probing = std::time::Instant::now();
    h.relay(config.clone()).drain().await?;
    let per_second = PROBE as f64 / probing.elapsed().as_secs_f64().max(0.001);
    let rows = ((per_second * config.lease.as_secs_f64() * 8.0) as i64).clamp(20_000, 400_000);
    commit(PROBE, rows).await?;

    let started = std::time::Instant::now();
    let active = h.relay(config.clone());
    active.clone().spawn(h.shutdown.clone());
    h.backlog_at_most(rows - 1, Duration::from_secs(10))
        .await
        .context("the first relay published nothing")?;
    let standby = Relay::new(
        Store::connect(h.db.url()).await?,
        h.bus.publisher(),
        config.clone(),
    );
    standby.clone().spawn(h.shutdown.clone());
    h.backlog_at_most(0, Duration::from_secs(120))
        .await
        .context("the backlog was not published")?;
    let took = started.elapsed();
    // Else the test shows nothing.
    ensure!(
        took > config.lease * 4,
        "{rows} rows took {took:?} to publish, not several leases (probed {per_second:.0}/s)"
    );
    let (active, standby) = (active.duplicates(), standby.duplicates());
    ensure!(
        active + standby == 0,
        "rows published twice: {active} by the first relay, {standby} by the standby (in {took:?})"
    );
    let published = h.stream_messages().await?.len();
    ensure!(
        i64::try_from(published)? == PROBE + rows,
        "{published} messages in the stream, expected {}",
        PROBE + rows
    );
    Ok(())
}

async fn rows_committed_while_nats_is_down_are_published_when_it_returns(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut h = Harness::start(backend).await?;
    h.spawn_relay();
    h.write("before", 0).await?;
    h.backlog_at_most(0, Duration::from_secs(5))
        .await
        .context("not published before the restart")?;
    h.nats.kill();
    for n in 1..=10 {
        h.write("during", n).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        h.store.outbox_backlog().await? == 10,
        "rows cannot be published while NATS is down"
    );
    h.nats.start_again().await?;
    h.backlog_at_most(0, Duration::from_secs(30))
        .await
        .context("outbox not drained after NATS returned")?;
    ensure!(h.stream_messages().await?.len() == 11);
    Ok(())
}

async fn published_rows_are_kept_for_the_retention_period_then_removed(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    h.write("a", 1).await?;
    let keep = h.relay(fast_relay());
    keep.drain().await?;
    h.write("b", 2).await?; // unpublished: never removed
    ensure!(
        keep.cleanup().await?.0 == 0,
        "a published row was removed before its retention"
    );
    let expire = h.relay(RelayConfig {
        retention: Duration::ZERO,
        ..fast_relay()
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    ensure!(expire.cleanup().await?.0 == 1);
    ensure!(h.count("SELECT COUNT(*) FROM skein_outbox").await? == 1);
    ensure!(h.store.outbox_backlog().await? == 1);
    Ok(())
}

/// Published rows and inbox records, `rows` of each, from long ago (names
/// starting with `prefix`).
async fn old_rows(h: &Harness, prefix: &str, rows: i64) -> anyhow::Result<()> {
    let numbers = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2) ";
    sqlx::query(&format!(
        "{numbers}INSERT INTO skein_outbox (id, subject, headers, payload, created_at, published_at) \
         SELECT $1 || i, 'events.test.old', '[]', $3, 1, 1 FROM n"
    ))
    .bind(prefix)
    .bind(rows)
    .bind(vec![0_u8])
    .execute(h.store.pool())
    .await?;
    sqlx::query(&format!(
        "{numbers}INSERT INTO skein_inbox (handler, message_id, processed_at) \
         SELECT 'test', $1 || i, 1 FROM n"
    ))
    .bind(prefix)
    .bind(rows)
    .execute(h.store.pool())
    .await?;
    Ok(())
}

/// More rows past their retention than one cleanup step deletes (a
/// retention lowered on a full table): `cleanup` deletes them all, step by
/// step, and the active relay goes on step after step without waiting for
/// its next interval. Younger rows stay.
async fn a_cleanup_of_many_old_rows_goes_on_until_none_is_left(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let rows = skein_outbox::relay::CLEANUP_BATCH * 5 / 2;
    let config = RelayConfig {
        retention: Duration::from_secs(3600),
        inbox_retention: Duration::from_secs(3600),
        ..fast_relay()
    };
    h.write("young", 1).await?;
    h.relay(config.clone()).drain().await?;
    sqlx::query(
        "INSERT INTO skein_inbox (handler, message_id, processed_at) VALUES ('test', 'young', $1)",
    )
    .bind(skein_outbox::now_micros())
    .execute(h.store.pool())
    .await?;
    let left = || async {
        anyhow::Ok((
            h.count("SELECT COUNT(*) FROM skein_outbox").await?,
            h.count("SELECT COUNT(*) FROM skein_inbox").await?,
        ))
    };

    old_rows(&h, "first-", rows).await?;
    let deleted = h.relay(config.clone()).cleanup().await?;
    ensure!(
        deleted == (rows.try_into()?, rows.try_into()?),
        "cleanup deleted {deleted:?} of {rows} old rows in each table"
    );
    ensure!(left().await? == (1, 1), "left: {:?}", left().await?);

    // The relay's first cleanup, and no other for a minute.
    old_rows(&h, "second-", rows).await?;
    h.relay(RelayConfig {
        cleanup_interval: Some(Duration::from_secs(60)),
        ..config
    })
    .spawn(h.shutdown.clone());
    let cleaned = eventually(Duration::from_secs(20), || async {
        (left().await.ok()? == (1, 1)).then_some(())
    })
    .await;
    ensure!(
        cleaned.is_some(),
        "the relay stopped cleaning up with {:?} rows left",
        left().await?
    );
    Ok(())
}

async fn migrations_run_once_per_component(backend: Backend) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    // A second open of the same database applies nothing again.
    let again = Store::connect(h.db.url()).await?;
    again.migrate("test_items", ITEMS).await?;
    let applied = h.count("SELECT COUNT(*) FROM skein_migrations").await?;
    let expected = skein_outbox::MIGRATIONS.len() + ITEMS.len();
    ensure!(
        usize::try_from(applied)? == expected,
        "expected the outbox's and test_items' {expected} migrations, each once, got {applied}"
    );
    Ok(())
}

/// A store opened to change nothing (an audit, a dry run) applies no
/// migration: a schema behind this build (a migration missing) or ahead of
/// it (one it does not know) is refused, naming it; a current one opens.
async fn a_store_that_may_not_migrate_checks_the_schema_and_changes_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let read_only = || {
        Store::connect_with(skein_outbox::StoreConfig {
            migrate: false,
            ..skein_outbox::StoreConfig::new(h.db.url())
        })
    };
    let store = read_only().await?;
    store.migrate("test_items", ITEMS).await?;
    let before = h.count("SELECT COUNT(*) FROM skein_migrations").await?;
    // A newer build's third migration: behind.
    let newer = [
        ITEMS[0],
        ITEMS[1],
        Migration {
            version: 3,
            description: "more items",
            sqlite: "CREATE TABLE more_items (n BIGINT NOT NULL);",
            postgres: "CREATE TABLE more_items (n BIGINT NOT NULL);",
        },
    ];
    let behind = store.migrate("test_items", &newer).await;
    ensure!(
        matches!(&behind, Err(skein_outbox::Error::Schema { problem, .. })
            if problem.contains("behind") && problem.contains("v3 (more items)")),
        "{behind:?}"
    );
    // An older build's first migration only: ahead.
    let ahead = store.migrate("test_items", &ITEMS[..1]).await;
    ensure!(
        matches!(&ahead, Err(skein_outbox::Error::Schema { problem, .. }) if problem.contains("ahead")),
        "{ahead:?}"
    );
    ensure!(
        h.count("SELECT COUNT(*) FROM skein_migrations").await? == before,
        "a migration was applied"
    );
    // The outbox's own tables, checked on opening.
    sqlx::query("DELETE FROM skein_migrations WHERE component = 'skein_outbox' AND version = 1")
        .execute(h.store.pool())
        .await?;
    let refused = read_only().await;
    ensure!(
        matches!(&refused, Err(skein_outbox::Error::Schema { component, .. }) if component == "skein_outbox"),
        "{refused:?}"
    );
    Ok(())
}

/// Blocks inside its transaction on the first delivery, as a copy that dies
/// mid-message would; applies normally afterwards.
struct BlockOnce {
    calls: Arc<AtomicUsize>,
    started: Arc<tokio::sync::Notify>,
}

impl TxHandler for BlockOnce {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        Apply.handle(tx, delivery).await?;
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            self.started.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

async fn a_copy_killed_mid_transaction_leaves_no_effect_and_the_other_applies_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    h.spawn_relay();
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let mut config = WorkerConfig::new("applier", EVENTS, vec!["events.test.>".into()]);
    config.ack_wait = Duration::from_secs(1);
    let handler = || BlockOnce {
        calls: calls.clone(),
        started: started.clone(),
    };
    let bus_a = Bus::connect(&BusConfig::new(h.nats.url(), "copy-a")).await?;
    let copy_a = Worker::start(
        &bus_a,
        config.clone(),
        Inbox::new(h.store.clone(), "applier", handler()),
    )
    .await?;
    h.write("k", 1).await?;
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .context("copy A never got the message")?;
    copy_a.abort();
    drop(bus_a);

    let copy_b = Worker::start(
        &h.bus,
        config,
        Inbox::new(h.store.clone(), "applier", handler()),
    )
    .await?;
    eventually(Duration::from_secs(15), || async {
        (copy_b.stats().snapshot().handled >= 1).then_some(())
    })
    .await
    .context("copy B did not finish the message")?;
    ensure!(
        h.count("SELECT COUNT(*) FROM items WHERE entity = 'applied:k'")
            .await?
            == 1
    );
    copy_b.shutdown().await;
    Ok(())
}

/// Records each application with the copy that made it, in commit order.
struct Record {
    copy: &'static str,
}

impl TxHandler for Record {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: Happened = delivery.envelope.decode()?;
        // Small, uneven work so that lanes interleave.
        tokio::time::sleep(Duration::from_millis((event.n % 3) as u64)).await;
        sqlx::query("INSERT INTO applied (entity, n, copy) VALUES ($1, $2, $3)")
            .bind(&event.entity)
            .bind(event.n)
            .bind(self.copy)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

impl Harness {
    /// A copy of the `recorder` worker on `bus`, applying through the inbox.
    async fn start_recorder(
        &self,
        bus: &Bus,
        copy: &'static str,
    ) -> anyhow::Result<skein_bus::RunningWorker> {
        Ok(Worker::start(
            bus,
            WorkerConfig::new("recorder", EVENTS, vec!["events.test.>".into()]),
            Inbox::new(self.store.clone(), "recorder", Record { copy }),
        )
        .await?)
    }
}

async fn applied(h: &Harness) -> anyhow::Result<Vec<(String, i64, String)>> {
    Ok(
        sqlx::query_as("SELECT entity, n, copy FROM applied ORDER BY seq")
            .fetch_all(h.store.pool())
            .await?,
    )
}

async fn two_copies_share_the_work_each_message_applied_once_in_entity_order(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    h.spawn_relay();
    let bus_b = Bus::connect(&BusConfig::new(h.nats.url(), "copy-b")).await?;
    let a = h.start_recorder(&h.bus, "a").await?;
    let b = h.start_recorder(&bus_b, "b").await?;
    let total = 200;
    for n in 0..total {
        h.write(&format!("e{}", n % 10), n).await?;
    }
    eventually(Duration::from_secs(30), || async {
        (applied(&h).await.ok()?.len() >= total as usize).then_some(())
    })
    .await
    .context("not every message was applied")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = applied(&h).await?;
    ensure!(
        rows.len() == total as usize,
        "{} applications for {total} messages",
        rows.len()
    );
    let mut seen = std::collections::HashSet::new();
    ensure!(
        rows.iter().all(|(_, n, _)| seen.insert(*n)),
        "a message was applied twice"
    );
    ensure!(
        rows.iter().any(|r| r.2 == "a") && rows.iter().any(|r| r.2 == "b"),
        "one copy got no work"
    );
    // Within one copy, an entity's messages apply in publish order.
    for copy in ["a", "b"] {
        for e in 0..10 {
            let entity = format!("e{e}");
            let ns: Vec<i64> = rows
                .iter()
                .filter(|r| r.0 == entity && r.2 == copy)
                .map(|r| r.1)
                .collect();
            ensure!(
                ns.windows(2).all(|w| w[0] < w[1]),
                "copy {copy} applied {entity} out of order: {ns:?}"
            );
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

async fn replaying_the_stream_into_a_consumer_changes_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    h.spawn_relay();
    let worker = h.start_recorder(&h.bus, "live").await?;
    for n in 0..20 {
        h.write("r", n).await?;
    }
    eventually(Duration::from_secs(10), || async {
        (applied(&h).await.ok()?.len() == 20).then_some(())
    })
    .await
    .context("live consumption incomplete")?;
    worker.shutdown().await;

    use skein_bus::Handler;
    let replay = Inbox::new(h.store.clone(), "recorder", Record { copy: "replay" });
    for stored in h.stream_messages().await? {
        let envelope =
            Envelope::from_parts(&stored.subject, stored.headers.as_ref(), stored.payload)?;
        let info = skein_bus::DeliveryInfo {
            stream: EVENTS.into(),
            consumer: "recorder".into(),
            stream_sequence: stored.sequence,
            delivered: 1,
        };
        replay.handle(&Delivery { envelope, info }).await?;
    }
    let rows = applied(&h).await?;
    ensure!(
        rows.len() == 20 && rows.iter().all(|r| r.2 == "live"),
        "the replay applied something again"
    );
    Ok(())
}

async fn a_poison_message_is_dead_lettered_without_effects_and_the_consumer_goes_on(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    h.spawn_relay();
    let worker = h.start_recorder(&h.bus, "a").await?;
    // Valid headers, payload of the wrong shape: the handler's decode fails permanently.
    let mut poison = Envelope::event(
        "test",
        &Happened {
            entity: "p".into(),
            n: 0,
        },
        &MessageContext::root(),
    )?;
    poison.data = bytes::Bytes::from_static(br#"{"entity": "p", "n": "not a number"}"#);
    h.bus.publisher().publish(&poison).await?;
    h.write("good", 1).await?;
    eventually(Duration::from_secs(10), || async {
        (applied(&h).await.ok()?.len() == 1).then_some(())
    })
    .await
    .context("the good message after the poison one was not applied")?;
    let dead = read(&h.bus, "DLQ", "dlq.>", StartAt::Beginning).await?;
    ensure!(
        dead.len() == 1,
        "expected one dead letter, got {}",
        dead.len()
    );
    let info = dead[0]
        .headers
        .as_ref()
        .and_then(skein_bus::dlq::DeadLetterInfo::from_headers)
        .context("dead letter without its headers")?;
    ensure!(
        info.handler == "recorder" && info.reason.contains("invalid payload"),
        "{info:?}"
    );
    ensure!(
        dead[0].payload == poison.data,
        "the original payload must be kept"
    );
    ensure!(
        h.count(&format!(
            "SELECT COUNT(*) FROM skein_inbox WHERE message_id = '{}'",
            poison.id
        ))
        .await?
            == 0,
        "a dead-lettered message must not be recorded as processed"
    );
    worker.shutdown().await;
    Ok(())
}

async fn a_worker_reports_backlog_lag_and_dead_letters_on_the_service_api(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = Harness::start(backend).await?;
    let stats = Arc::new(skein_bus::WorkerStats::default());
    let relay = h.relay(fast_relay()).with_stats(stats.clone());
    let mut config = WorkerConfig::new("reporter", EVENTS, vec!["events.test.>".into()]);
    config.figures_interval = Duration::from_millis(100);
    let worker = Worker::start_with_stats(
        &h.bus,
        config,
        Inbox::new(h.store.clone(), "reporter", Record { copy: "a" }),
        stats.clone(),
    )
    .await?;
    let _service =
        skein_bus::service::start_service(&h.bus, "reporter", "0.1.0", stats.clone()).await?;
    let mut poison = Envelope::event(
        "test",
        &Happened {
            entity: "p".into(),
            n: 0,
        },
        &MessageContext::root(),
    )?;
    poison.data = bytes::Bytes::from_static(b"not json");
    h.bus.publisher().publish(&poison).await?;
    for n in 0..3 {
        h.write("q", n).await?;
    }
    relay.spawn(h.shutdown.clone());
    eventually(Duration::from_secs(10), || async {
        let g = stats.snapshot();
        (g.handled == 3
            && g.gauges.get("dlq_depth") == Some(&1)
            && g.gauges.get("outbox_backlog") == Some(&0)
            && g.gauges.get("consumer_lag") == Some(&0))
        .then_some(())
    })
    .await
    .with_context(|| format!("figures never settled: {:?}", stats.snapshot()))?;

    let reply = h
        .bus
        .client()
        .request("$SRV.STATS.reporter", "".into())
        .await?;
    let body: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    let data = &body["endpoints"][0]["data"];
    ensure!(
        data["handled"] == 3 && data["dead_lettered"] == 1,
        "stats reply: {body}"
    );
    ensure!(
        data["gauges"]["dlq_depth"] == 1 && data["gauges"]["outbox_backlog"] == 0,
        "stats reply: {body}"
    );
    worker.shutdown().await;
    Ok(())
}

/// Counts its calls; applies a message and publishes one for it, or fails
/// permanently (after writing) for an entity starting with "bad".
struct CountingApply {
    calls: Arc<AtomicUsize>,
}

impl TxHandler for CountingApply {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Apply.handle(tx, delivery).await?;
        let event: Happened = delivery.envelope.decode()?;
        tx.publish(&Envelope::event(
            "test",
            &Happened {
                entity: format!("echo:{}", event.entity),
                n: event.n,
            },
            &delivery.envelope.context(),
        )?);
        if event.entity.starts_with("bad") {
            return Err(HandlerError::permanent("bad entity"));
        }
        Ok(())
    }
}

/// A root `Happened` event.
fn happened(entity: &str, n: i64) -> anyhow::Result<Envelope> {
    Ok(Envelope::event(
        "test",
        &Happened {
            entity: entity.into(),
            n,
        },
        &MessageContext::root(),
    )?)
}

fn delivery_of(entity: &str, n: i64) -> anyhow::Result<Delivery> {
    Ok(Delivery {
        envelope: happened(entity, n)?,
        info: skein_bus::DeliveryInfo {
            stream: EVENTS.into(),
            consumer: "batch".into(),
            stream_sequence: u64::try_from(n)?,
            delivered: 1,
        },
    })
}

/// Deliveries that arrive together commit in one transaction; when one of
/// them fails, none of the batch's effects survive the rollback and each
/// message is handled again alone: the failing one fails by itself (its
/// writes and messages gone), the others apply once, with one outgoing
/// message each.
// On a runtime of one thread, so that every delivery is queued before a
// committer runs and the batch is the same every time.
#[tokio::test]
async fn sqlite_batch_with_a_failing_message() -> anyhow::Result<()> {
    a_batch_with_a_failing_message_applies_the_others_once_and_only_them(Backend::Sqlite).await
}

#[tokio::test]
async fn postgres_batch_with_a_failing_message() -> anyhow::Result<()> {
    a_batch_with_a_failing_message_applies_the_others_once_and_only_them(Backend::Postgres).await
}

async fn a_batch_with_a_failing_message_applies_the_others_once_and_only_them(
    backend: Backend,
) -> anyhow::Result<()> {
    use skein_bus::Handler;
    let h = Harness::start(backend).await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let inbox = Inbox::new(
        h.store.clone(),
        "batch",
        CountingApply {
            calls: calls.clone(),
        },
    );
    let bad = [6, 13];
    let deliveries = (0..20)
        .map(|i| {
            let entity = if bad.contains(&i) {
                format!("bad{i}")
            } else {
                format!("e{i}")
            };
            delivery_of(&entity, i)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // All twenty queue before a committer runs: one batch.
    let outcomes = futures::future::join_all(deliveries.iter().map(|d| inbox.handle(d))).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        let i = i64::try_from(i)?;
        match outcome {
            Err(e) if bad.contains(&i) => ensure!(
                e.kind() == skein_bus::ErrorKind::Permanent,
                "message {i}: {e:?}"
            ),
            Ok(()) if !bad.contains(&i) => {}
            other => anyhow::bail!("message {i}: unexpected outcome {other:?}"),
        }
    }
    // The batch ran up to the first bad message (7 calls), rolled back,
    // then every message ran alone (20 calls).
    ensure!(
        calls.load(Ordering::SeqCst) == 27,
        "{} handler calls, expected 27",
        calls.load(Ordering::SeqCst)
    );
    ensure!(h.count("SELECT COUNT(*) FROM items").await? == 18);
    ensure!(h.count("SELECT COUNT(DISTINCT entity) FROM items").await? == 18);
    ensure!(
        h.count("SELECT COUNT(*) FROM items WHERE entity LIKE 'applied:bad%'")
            .await?
            == 0
    );
    ensure!(h.count("SELECT COUNT(*) FROM skein_outbox").await? == 18);
    ensure!(h.count("SELECT COUNT(*) FROM skein_inbox").await? == 18);

    // A clean batch, with two already processed messages in it: one
    // transaction, and the old ones do not run again.
    calls.store(0, Ordering::SeqCst);
    let mut again = (20..30)
        .map(|i| delivery_of(&format!("e{i}"), i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    again.push(deliveries[0].clone());
    again.push(deliveries[19].clone());
    let outcomes = futures::future::join_all(again.iter().map(|d| inbox.handle(d))).await;
    ensure!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    ensure!(
        calls.load(Ordering::SeqCst) == 10,
        "{} calls",
        calls.load(Ordering::SeqCst)
    );
    ensure!(h.count("SELECT COUNT(*) FROM items").await? == 28);
    ensure!(h.count("SELECT COUNT(*) FROM skein_outbox").await? == 28);

    // Every outgoing message reaches the stream once, in commit order.
    h.spawn_relay();
    h.backlog_at_most(0, Duration::from_secs(10))
        .await
        .context("the relay did not publish the batches' messages")?;
    let published = h.stream_messages().await?;
    let echoes: Vec<String> = published
        .iter()
        .map(|m| m.subject.to_string())
        .filter(|s| s.contains("echo:"))
        .collect();
    ensure!(echoes.len() == 28, "{} echoes published", echoes.len());
    let mut distinct = echoes.clone();
    distinct.sort();
    distinct.dedup();
    ensure!(distinct.len() == 28, "duplicate echoes: {echoes:?}");
    Ok(())
}

/// Applies a message, and then panics for an entity starting with "boom"
/// (its write inside the open transaction).
struct PanicsOnBoom;

impl TxHandler for PanicsOnBoom {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: Happened = delivery.envelope.decode()?;
        Apply.handle(tx, delivery).await?;
        if event.entity.starts_with("boom") {
            panic!("a bug in the handler for {}", event.entity);
        }
        Ok(())
    }
}

#[tokio::test]
async fn sqlite_a_panicking_handler() -> anyhow::Result<()> {
    a_panicking_handler_fails_its_message_for_good_and_the_inbox_goes_on(Backend::Sqlite).await
}

#[tokio::test]
async fn postgres_a_panicking_handler() -> anyhow::Result<()> {
    a_panicking_handler_fails_its_message_for_good_and_the_inbox_goes_on(Backend::Postgres).await
}

/// A handler that panics fails its message permanently, naming the panic
/// (its worker dead-letters it), in a batch or alone, and the inbox's
/// committer goes on: its batch-mates and every later message apply once.
async fn a_panicking_handler_fails_its_message_for_good_and_the_inbox_goes_on(
    backend: Backend,
) -> anyhow::Result<()> {
    use skein_bus::Handler;
    let h = Harness::start(backend).await?;
    let inbox = Inbox::new(h.store.clone(), "panics", PanicsOnBoom);
    let deliveries = (0..6)
        .map(|i| {
            delivery_of(
                &if i == 2 {
                    "boom2".to_owned()
                } else {
                    format!("e{i}")
                },
                i,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // One batch (a runtime of one thread: all queue before the committer runs).
    let outcomes = futures::future::join_all(deliveries.iter().map(|d| inbox.handle(d))).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Err(e) if i == 2 => ensure!(
                e.kind() == skein_bus::ErrorKind::Permanent
                    && e.reason()
                        .contains("the handler panicked: a bug in the handler for boom2"),
                "message {i}: {e:?}"
            ),
            Ok(()) if i != 2 => {}
            other => anyhow::bail!("message {i}: unexpected outcome {other:?}"),
        }
    }
    // Alone, and after it: the committer still runs.
    let alone = inbox.handle(&delivery_of("boom6", 6)?).await;
    ensure!(
        alone
            .as_ref()
            .is_err_and(|e| e.kind() == skein_bus::ErrorKind::Permanent),
        "{alone:?}"
    );
    inbox
        .handle(&delivery_of("e7", 7)?)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // The panicking handlers' writes rolled back with their transactions.
    ensure!(h.count("SELECT COUNT(*) FROM items").await? == 6);
    ensure!(
        h.count("SELECT COUNT(*) FROM items WHERE entity LIKE '%boom%'")
            .await?
            == 0
    );
    ensure!(h.count("SELECT COUNT(*) FROM skein_inbox").await? == 6);
    Ok(())
}

/// PostgreSQL: a batch that waits for a lock gives up after its lock
/// timeout (50 ms) instead of waiting for the lock holder, which may be
/// another copy's batch waiting for this one (a deadlock PostgreSQL would
/// only break after a second), and its messages run one by one, each
/// waiting as long as the lock is held. Its outgoing messages still
/// commit: the commit waits without a bound.
#[tokio::test]
async fn postgres_a_batch_blocked_by_a_lock_gives_up_and_runs_its_messages_alone(
) -> anyhow::Result<()> {
    use skein_bus::Handler;
    let h = Harness::start(Backend::Postgres).await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let inbox = Inbox::new(
        h.store.clone(),
        "batch",
        CountingApply {
            calls: calls.clone(),
        },
    );
    // Another transaction holds the table the handler writes to.
    let mut holder = h.store.pool().begin().await?;
    sqlx::query("LOCK TABLE items IN EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await?;
    let deliveries = (0..3)
        .map(|i| delivery_of(&format!("e{i}"), i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let release = async {
        // A second call while the lock is still held: the batch gave up and
        // the messages run alone. Without the timeout the batch would wait
        // for the lock with one call made.
        let fell_back = eventually(Duration::from_secs(10), || async {
            (calls.load(Ordering::SeqCst) >= 2).then_some(())
        })
        .await;
        holder.rollback().await?;
        fell_back.context("the batch waited for the lock instead of giving up")
    };
    let (outcomes, released) = tokio::join!(
        futures::future::join_all(deliveries.iter().map(|d| inbox.handle(d))),
        release
    );
    released?;
    ensure!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    // The batch's first call, which gave up, then each message alone.
    ensure!(
        calls.load(Ordering::SeqCst) == 4,
        "{} handler calls, expected 4",
        calls.load(Ordering::SeqCst)
    );
    ensure!(h.count("SELECT COUNT(*) FROM items").await? == 3);
    ensure!(h.count("SELECT COUNT(*) FROM skein_inbox").await? == 3);
    ensure!(h.count("SELECT COUNT(*) FROM skein_outbox").await? == 3);
    Ok(())
}

backend_tests!(
    a_worker_reports_backlog_lag_and_dead_letters_on_the_service_api,
    two_copies_share_the_work_each_message_applied_once_in_entity_order,
    replaying_the_stream_into_a_consumer_changes_nothing,
    a_poison_message_is_dead_lettered_without_effects_and_the_consumer_goes_on,
    a_committed_change_is_published_and_a_rolled_back_one_is_not,
    a_commit_whose_outbox_write_fails_commits_nothing,
    statements_sent_together_apply_with_their_own_values,
    the_relay_publishes_in_commit_order,
    concurrent_writers_events_reach_the_stream_in_each_entity_s_commit_order,
    a_relay_killed_between_publish_and_mark_loses_nothing_and_duplicates_nothing,
    a_message_queued_without_an_id_is_stored_once_under_its_row_id,
    the_active_relay_publishes_each_row_once_and_on_sqlite_marks_rows_together,
    a_row_that_cannot_be_published_holds_back_only_itself,
    a_batch_of_rows_that_cannot_be_published_holds_back_none_behind_it,
    an_entity_s_rows_wait_behind_its_row_that_cannot_be_published,
    a_republish_beyond_the_duplicate_window_is_absorbed_by_the_inbox,
    the_same_message_handled_twice_has_one_effect,
    a_failing_handler_commits_nothing_and_can_run_again,
    the_relay_wakes_on_commit_without_waiting_for_the_poll,
    a_standby_relay_takes_over_when_the_active_one_stops,
    a_backlog_longer_than_a_lease_to_publish_keeps_the_active_relay_its_lock,
    rows_committed_while_nats_is_down_are_published_when_it_returns,
    published_rows_are_kept_for_the_retention_period_then_removed,
    a_cleanup_of_many_old_rows_goes_on_until_none_is_left,
    migrations_run_once_per_component,
    a_store_that_may_not_migrate_checks_the_schema_and_changes_nothing,
    a_copy_killed_mid_transaction_leaves_no_effect_and_the_other_applies_once,
);

/// `sslmode=require` in the URL (what a managed PostgreSQL asks for):
/// the store's connections are encrypted.
#[tokio::test]
async fn postgres_a_store_reaches_its_server_over_tls_when_the_url_asks_for_it(
) -> anyhow::Result<()> {
    let db = TestDb::new(Backend::Postgres).await?;
    let separator = if db.url().contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=require", db.url());
    let store = Store::connect(&url).await.context(
        "connecting with sslmode=require failed: the test PostgreSQL must accept TLS \
         (Debian's server does; scripts/test.sh's temporary one is started with ssl=on)",
    )?;
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(store.pool())
            .await?;
    ensure!(encrypted, "the connection is not encrypted");
    Ok(())
}

/// A relay whose marks keep failing (here a trigger refuses them; in life a
/// revoked privilege, say) backs off between rounds instead of running one
/// per commit: on PostgreSQL every such round publishes again each row it
/// could not mark. Once marks work again it catches up and every message is
/// in the stream once.
#[tokio::test]
async fn postgres_a_relay_whose_marks_fail_backs_off_instead_of_republishing_at_commit_rate(
) -> anyhow::Result<()> {
    let h = Harness::start(Backend::Postgres).await?;
    for sql in [
        "CREATE FUNCTION refuse_marks() RETURNS trigger AS $$ \
         BEGIN RAISE EXCEPTION 'marks refused'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_marks BEFORE UPDATE ON skein_outbox \
         FOR EACH ROW EXECUTE FUNCTION refuse_marks()",
    ] {
        sqlx::query(sql).execute(h.store.pool()).await?;
    }
    let relay = h.relay(fast_relay());
    relay.clone().spawn(h.shutdown.clone());
    h.write("a", 0).await?;
    h.stream_holds(1, Duration::from_secs(5))
        .await
        .context("the first row was not published")?;
    // A commit every 25 ms for a second, each a wake-up of the relay.
    const COMMITS: i64 = 40;
    for n in 1..=COMMITS {
        h.write("a", n).await?;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A round per commit would publish about COMMITS² / 2 (800) rows again;
    // rounds 100, 200, 300 ms ... apart publish well under COMMITS * 5.
    let again = relay.duplicates();
    ensure!(
        again < 400,
        "{again} rows published again in a second of failing marks: the relay did not back off"
    );
    sqlx::query("DROP TRIGGER refuse_marks ON skein_outbox")
        .execute(h.store.pool())
        .await?;
    h.backlog_at_most(0, Duration::from_secs(5))
        .await
        .context("the relay did not catch up once marks worked again")?;
    let messages = h.stream_messages().await?;
    ensure!(
        messages.len() == usize::try_from(COMMITS + 1)?,
        "{} messages in the stream for {} rows",
        messages.len(),
        COMMITS + 1
    );
    Ok(())
}

/// Writers of one process take turns on a SQLite database instead of
/// meeting at its lock: with SQLite's own busy wait switched off
/// (`busy_timeout` 0), concurrent transactions that hold the lock for a
/// while all commit, and the relay's own writes fit between them.
#[tokio::test]
async fn sqlite_writers_of_one_process_take_turns_without_busy_errors() -> anyhow::Result<()> {
    let db = TestDb::new(Backend::Sqlite).await?;
    let store = Store::connect_with(skein_outbox::StoreConfig {
        busy_timeout: Duration::ZERO,
        ..skein_outbox::StoreConfig::new(db.url())
    })
    .await?;
    store.migrate("test_items", ITEMS).await?;
    let nats = NatsServer::start().await?;
    let bus = Bus::connect(&BusConfig::new(nats.url(), "outbox-test")).await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    let relay = Relay::new(store.clone(), bus.publisher(), fast_relay());

    let writers: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut tx = store.begin().await?;
                insert_item(&mut tx, &format!("w{i}"), i).await?;
                tx.publish(&Envelope::event(
                    "test",
                    &Happened {
                        entity: format!("w{i}"),
                        n: i,
                    },
                    &MessageContext::root(),
                )?);
                // Hold the lock long enough for the others to arrive.
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.commit().await?;
                anyhow::Ok(())
            })
        })
        .collect();
    let mut published = 0;
    for _ in 0..20 {
        published += relay
            .drain()
            .await
            .context("the relay met a busy database")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, writer) in writers.into_iter().enumerate() {
        writer
            .await?
            .with_context(|| format!("writer {i} failed"))?;
    }
    published += relay.drain().await?;
    let items: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items")
        .fetch_one(store.pool())
        .await?;
    ensure!(items == 16, "{items} of 16 transactions committed");
    ensure!(published == 16, "{published} of 16 messages published");
    Ok(())
}

/// SQLite, two processes (stores) on one file: a writer that finds the
/// write lock held by the other waits for it (its connection has no busy
/// handler, which would sleep up to 100 ms between attempts; the store
/// tries again every millisecond or two) and gets it once the holder
/// commits: a transaction, and the relay's writes outside one. One that
/// waits longer than its busy timeout fails with "database is locked" and
/// can write again afterwards.
#[tokio::test]
async fn sqlite_a_writer_waits_for_another_process_s_lock_and_gets_it() -> anyhow::Result<()> {
    let h = Harness::start(Backend::Sqlite).await?;
    let store = h.store.clone();
    let other = Store::connect_with(skein_outbox::StoreConfig {
        busy_timeout: Duration::from_secs(10),
        ..skein_outbox::StoreConfig::new(h.db.url())
    })
    .await?;

    // The writer connection has no busy handler: the store waits itself.
    let mut tx = other.begin().await?;
    let handler_ms: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(&mut *tx)
        .await?;
    ensure!(
        handler_ms == 0,
        "the writer's busy handler waits {handler_ms} ms"
    );
    tx.rollback().await?;

    let mut holder = store.begin().await?;
    insert_item(&mut holder, "first", 0).await?;
    let waiting = {
        let other = other.clone();
        tokio::spawn(async move {
            let mut tx = other.begin().await?;
            insert_item(&mut tx, "second", 0).await?;
            tx.commit().await?;
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !waiting.is_finished(),
        "the second writer did not wait for the lock"
    );
    holder.commit().await?;
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .context("the second writer did not get the lock once it was free")???;

    // The relay's writes outside a transaction wait the same way.
    let holder = store.begin().await?;
    let relay = Relay::new(other.clone(), h.bus.publisher(), RelayConfig::default());
    let cleanup = tokio::spawn(async move { relay.cleanup().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !cleanup.is_finished(),
        "the relay's cleanup did not wait for the lock"
    );
    holder.commit().await?;
    tokio::time::timeout(Duration::from_secs(5), cleanup)
        .await
        .context("the relay's cleanup did not get the lock once it was free")???;

    // Past the busy timeout: a clear error, nothing written.
    let impatient = Store::connect_with(skein_outbox::StoreConfig {
        busy_timeout: Duration::from_millis(200),
        ..skein_outbox::StoreConfig::new(h.db.url())
    })
    .await?;
    let holder = store.begin().await?;
    let failed = impatient.begin().await;
    let Err(e) = failed else {
        anyhow::bail!("a writer got the lock while another process held it");
    };
    ensure!(
        format!("{e:#}").contains("locked"),
        "unexpected error: {e:#}"
    );
    holder.rollback().await?;
    let mut tx = impatient.begin().await?;
    insert_item(&mut tx, "third", 0).await?;
    tx.commit().await?;
    ensure!(h.count("SELECT COUNT(*) FROM items").await? == 3);
    other.close().await;
    impatient.close().await;
    Ok(())
}

/// A transaction dropped without a commit (a handler that returned early, a
/// cancelled task) gives SQLite's write lock back at once, not when this
/// process next writes: another process, here a second store on the same
/// file with a short busy timeout, writes right after, and nothing of the
/// dropped transaction remains. The first store's next transaction works.
#[tokio::test]
async fn sqlite_a_dropped_transaction_releases_the_write_lock_at_once() -> anyhow::Result<()> {
    let db = TestDb::new(Backend::Sqlite).await?;
    let store = Store::connect(db.url()).await?;
    store.migrate("test_items", ITEMS).await?;
    let other = Store::connect_with(skein_outbox::StoreConfig {
        busy_timeout: Duration::from_millis(500),
        ..skein_outbox::StoreConfig::new(db.url())
    })
    .await?;

    for round in 0..3 {
        let mut tx = store.begin().await?;
        insert_item(&mut tx, "dropped", round).await?;
        drop(tx);
        // Nothing of this process writes now; the other one must get in.
        let mut tx = other
            .begin()
            .await
            .with_context(|| format!("round {round}: the write lock was not given back"))?;
        insert_item(&mut tx, "other", round).await?;
        tx.commit().await?;
    }
    // A transaction dropped inside a task that is aborted midway.
    let held = store.clone();
    let task = tokio::spawn(async move {
        let mut tx = held.begin().await?;
        insert_item(&mut tx, "aborted", 0).await?;
        tokio::time::sleep(Duration::from_secs(60)).await;
        tx.commit().await?;
        anyhow::Ok(())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    task.abort();
    let _ = task.await;
    let mut tx = other
        .begin()
        .await
        .context("the aborted task's write lock was not given back")?;
    insert_item(&mut tx, "other", 3).await?;
    tx.commit().await?;

    let mut tx = store.begin().await?;
    insert_item(&mut tx, "kept", 0).await?;
    tx.commit().await?;
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT entity, n FROM items ORDER BY entity, n")
        .fetch_all(store.pool())
        .await?;
    let expected: Vec<(String, i64)> = [
        ("kept", 0),
        ("other", 0),
        ("other", 1),
        ("other", 2),
        ("other", 3),
    ]
    .into_iter()
    .map(|(e, n)| (e.to_owned(), n))
    .collect();
    ensure!(rows == expected, "rows {rows:?}, expected {expected:?}");
    Ok(())
}

/// The writer connection, which makes the commits and so the checkpoints,
/// checkpoints at the configured length of the log.
#[tokio::test]
async fn sqlite_the_writer_is_set_to_checkpoint_at_the_configured_log_length() -> anyhow::Result<()>
{
    let db = TestDb::new(Backend::Sqlite).await?;
    let checkpoint_pages = async |store: &Store| -> anyhow::Result<i64> {
        let mut tx = store.begin().await?;
        Ok(sqlx::query_scalar("PRAGMA wal_autocheckpoint")
            .fetch_one(&mut *tx)
            .await?)
    };
    let default = Store::connect(db.url()).await?;
    let pages = checkpoint_pages(&default).await?;
    ensure!(
        pages == i64::from(skein_outbox::store::DEFAULT_CHECKPOINT_PAGES),
        "the writer checkpoints at {pages} pages by default"
    );
    let short = Store::connect_with(skein_outbox::StoreConfig {
        checkpoint_pages: 50,
        ..skein_outbox::StoreConfig::new(db.url())
    })
    .await?;
    let pages = checkpoint_pages(&short).await?;
    ensure!(pages == 50, "configured 50 pages, the writer has {pages}");
    Ok(())
}

/// Every SQLite connection, the writer and the readers, has the configured
/// page cache; without one, SQLite's default.
#[tokio::test]
async fn sqlite_every_connection_has_the_configured_page_cache() -> anyhow::Result<()> {
    let db = TestDb::new(Backend::Sqlite).await?;
    let caches = async |store: &Store| -> anyhow::Result<(i64, i64)> {
        let mut tx = store.begin().await?;
        let writer: i64 = sqlx::query_scalar("PRAGMA cache_size")
            .fetch_one(&mut *tx)
            .await?;
        tx.rollback().await?;
        let reader: i64 = sqlx::query_scalar("PRAGMA cache_size")
            .fetch_one(store.pool())
            .await?;
        Ok((writer, reader))
    };
    let default = Store::connect(db.url()).await?;
    let (writer, reader) = caches(&default).await?;
    // SQLite's default: 2,000 KiB, given as a negative number of KiB.
    ensure!(
        (writer, reader) == (-2000, -2000),
        "by default the writer's cache is {writer} and a reader's {reader}"
    );
    let small = Store::connect_with(skein_outbox::StoreConfig {
        sqlite_cache_kib: Some(300),
        ..skein_outbox::StoreConfig::new(db.url())
    })
    .await?;
    let (writer, reader) = caches(&small).await?;
    ensure!(
        (writer, reader) == (-300, -300),
        "configured 300 KiB, the writer's cache is {writer} and a reader's {reader}"
    );
    Ok(())
}

/// A PostgreSQL relay that goes silent while it holds the lock (its machine
/// paused or cut off, its connection left open) loses the lock within a few
/// leases, and a standby publishes what is committed meanwhile; before,
/// the server kept the silent session's lock until its TCP keepalives gave
/// up, two hours by default. The lock session is named after its relay.
#[tokio::test]
async fn postgres_a_standby_takes_over_from_an_active_relay_gone_silent() -> anyhow::Result<()> {
    let h = Harness::start(Backend::Postgres).await?;
    let config = RelayConfig {
        lease: Duration::from_secs(1),
        ..fast_relay()
    };
    // The first relay runs on a thread of its own, which the test then
    // blocks: its lock connection stays open and says nothing, as on a
    // paused machine.
    const SILENCE: Duration = Duration::from_secs(15);
    let (silence_tx, silence_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = CancellationToken::new();
    let silent = {
        let (url, publisher, config, stop) = (
            h.db.url().to_owned(),
            h.bus.publisher(),
            config.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let store = Store::connect(&url).await?;
                let relay = Relay::new(store, publisher, config).spawn(stop.clone());
                if silence_rx.await.is_ok() {
                    std::thread::sleep(SILENCE);
                }
                stop.cancel();
                relay.await?;
                Ok(())
            })
        })
    };
    h.write("a", 1).await?;
    h.backlog_at_most(0, Duration::from_secs(5))
        .await
        .context("the first relay did not publish")?;
    let holders: Vec<String> = sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND a.datname = current_database()",
    )
    .fetch_all(h.store.pool())
    .await?;
    ensure!(
        holders.len() == 1 && holders[0].starts_with("skein relay "),
        "the relay lock is held by sessions named {holders:?}"
    );

    let _ = silence_tx.send(());
    let other = Store::connect(h.db.url()).await?;
    Relay::new(other, h.bus.publisher(), config).spawn(h.shutdown.clone());
    for n in 0..3 {
        h.write("b", n).await?;
    }
    let taken_over = h.backlog_at_most(0, Duration::from_secs(10)).await;
    stop.cancel();
    let joined = tokio::task::spawn_blocking(move || silent.join()).await?;
    taken_over.context("the standby did not take over from the silent relay")?;
    joined
        .map_err(|_| anyhow::anyhow!("the silent relay's thread panicked"))?
        .context("the silent relay")?;
    let published = h.stream_messages().await?.len();
    ensure!(
        published == 4,
        "{published} messages in the stream, expected 4"
    );
    Ok(())
}

/// The PostgreSQL relay's LISTEN connection, lost, comes back: what another
/// process commits as it is lost is published at once, not at the next
/// poll (an hour here). The connection is named after its relay. (Whether
/// the notification of that commit comes before the relay listens again is
/// a race this test does not control; the relay runs a pass on reconnecting
/// for the case it does.)
#[tokio::test]
async fn postgres_a_commit_while_the_relay_s_listen_connection_was_lost_is_published_at_once(
) -> anyhow::Result<()> {
    let h = Harness::start(Backend::Postgres).await?;
    h.relay(RelayConfig {
        poll_interval: Duration::from_secs(3600),
        lease: Duration::from_secs(600),
        ..fast_relay()
    })
    .spawn(h.shutdown.clone());
    let other = Store::connect(h.db.url()).await?;
    let listener = "SELECT pid FROM pg_stat_activity \
                    WHERE datname = current_database() AND application_name LIKE 'skein relay listen %'";
    // Commits from another process; with `cut`, its transaction first ends
    // the relay's LISTEN session, so that the commit's notification comes
    // before the relay listens again.
    let commit_elsewhere = async |n: i64, cut: bool| -> anyhow::Result<()> {
        let mut tx = other.begin().await?;
        tx.publish(&happened("b", n)?);
        if cut {
            let terminated: Vec<bool> = sqlx::query_scalar(&format!(
                "SELECT pg_terminate_backend(pid, 5000) FROM ({listener}) AS l"
            ))
            .fetch_all(&mut *tx)
            .await?;
            ensure!(terminated == [true], "terminated {terminated:?}");
        }
        tx.commit().await?;
        Ok(())
    };
    eventually(Duration::from_secs(5), || async {
        let pids: Vec<i32> = sqlx::query_scalar(listener)
            .fetch_all(h.store.pool())
            .await
            .ok()?;
        (pids.len() == 1).then_some(())
    })
    .await
    .context("no session named 'skein relay listen …'")?;
    commit_elsewhere(1, false).await?;
    h.stream_holds(1, Duration::from_secs(3))
        .await
        .context("the relay did not wake on another process's commit")?;

    for round in 2..5 {
        commit_elsewhere(round, true).await?;
        h.stream_holds(usize::try_from(round)?, Duration::from_secs(5))
            .await
            .with_context(|| {
                format!(
                    "a commit after the LISTEN connection was lost ({round}) waits for the poll"
                )
            })?;
    }
    Ok(())
}

/// An active SQLite relay with nothing to do renews its lease in time even
/// when it polls less often than the lease lasts: a lease that ran out
/// would hand the outbox to a standby with every idle spell.
#[tokio::test]
async fn sqlite_an_idle_relay_keeps_its_lease_whatever_its_poll() -> anyhow::Result<()> {
    let h = Harness::start(Backend::Sqlite).await?;
    h.relay(RelayConfig {
        poll_interval: Duration::from_secs(3600),
        lease: Duration::from_secs(2),
        ..fast_relay()
    })
    .spawn(h.shutdown.clone());
    eventually(Duration::from_secs(5), || async {
        h.lease().await.ok().flatten()
    })
    .await
    .context("the relay did not take its lease")?;
    // Two and a half leases long, nothing committed.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, left) = h.lease().await?.context("the lease row is gone")?;
        ensure!(
            left > 0,
            "the idle relay's lease ran out {} ms ago",
            -left / 1000
        );
    }
    Ok(())
}

/// An active SQLite relay whose round waits on NATS for longer than its
/// lease (a stalled server: the publish is neither acknowledged nor failed)
/// keeps its lease, renewed by a task of its own: a standby beside it does
/// not take over meanwhile and publish the same rows, and the row goes out
/// once the server goes on. Before, the lease was renewed between rounds
/// only, and ran out while a round waited.
#[tokio::test]
async fn sqlite_a_relay_waiting_on_nats_longer_than_its_lease_keeps_it() -> anyhow::Result<()> {
    let h = Harness::start(Backend::Sqlite).await?;
    let config = RelayConfig {
        lease: Duration::from_secs(1),
        ..fast_relay()
    };
    let active = h.relay(config.clone());
    active.clone().spawn(h.shutdown.clone());
    h.write("a", 0).await?;
    h.backlog_at_most(0, Duration::from_secs(5))
        .await
        .context("the relay did not publish")?;
    let first = h
        .holder()
        .await?
        .context("the active relay holds no lease")?;
    let standby = Relay::new(
        Store::connect(h.db.url()).await?,
        h.bus.publisher(),
        config.clone(),
    );
    standby.clone().spawn(h.shutdown.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    h.nats.pause()?;
    h.write("a", 1).await?;
    // Three leases while the active relay's round waits for its ack.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = h.holder().await?;
        if now.as_ref() != Some(&first) {
            h.nats.resume()?;
            anyhow::bail!("the lease went from {first} to {now:?} while the relay waited on NATS");
        }
    }
    h.nats.resume()?;
    h.backlog_at_most(0, Duration::from_secs(15))
        .await
        .context("the row was not published once NATS went on")?;
    ensure!(h.stream_messages().await?.len() == 2);
    let (active, standby) = (active.duplicates(), standby.duplicates());
    ensure!(
        active + standby == 0,
        "rows published twice: {active} by the first relay, {standby} by the standby"
    );
    Ok(())
}

/// A copy that starts while another process holds SQLite's write lock (a
/// long transaction) is not held up by migrations already applied: it
/// reads what is applied without taking the lock.
#[tokio::test]
async fn sqlite_a_start_with_nothing_to_migrate_does_not_wait_for_the_write_lock(
) -> anyhow::Result<()> {
    let h = Harness::start(Backend::Sqlite).await?;
    let mut holder = h.store.begin().await?;
    insert_item(&mut holder, "held", 0).await?;
    let started = tokio::time::timeout(Duration::from_secs(5), async {
        let copy = Store::connect_with(skein_outbox::StoreConfig {
            busy_timeout: Duration::from_millis(200),
            ..skein_outbox::StoreConfig::new(h.db.url())
        })
        .await?;
        copy.migrate("test_items", ITEMS).await?;
        anyhow::Ok(copy)
    })
    .await
    .context("the start waited for the write lock")?
    .context("the start failed while another process held the write lock")?;
    holder.rollback().await?;
    let versions: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM skein_migrations")
        .fetch_one(started.pool())
        .await?;
    ensure!(
        versions == i64::try_from(skein_outbox::MIGRATIONS.len() + ITEMS.len())?,
        "{versions} versions recorded"
    );
    started.close().await;
    Ok(())
}

/// A standby relay whose process commits after the active relay (in
/// another process) stopped and gave its lease back takes the lease itself
/// and publishes at once, instead of waking the gone relay until its next
/// attempt at the lock.
#[tokio::test]
async fn sqlite_a_standby_that_commits_after_the_holder_left_takes_over_at_once(
) -> anyhow::Result<()> {
    let h = Harness::start(Backend::Sqlite).await?;
    // Attempts at the lock five minutes apart, no poll within the test.
    let slow = RelayConfig {
        poll_interval: Duration::from_secs(3600),
        lease: Duration::from_secs(600),
        ..fast_relay()
    };
    let first_stop = CancellationToken::new();
    let first = h.relay(slow.clone()).spawn(first_stop.clone());
    h.write("a", 1).await?;
    h.backlog_at_most(0, Duration::from_secs(3))
        .await
        .context("the first relay did not publish")?;
    let other = Store::connect(h.db.url()).await?;
    Relay::new(other.clone(), h.bus.publisher(), slow).spawn(h.shutdown.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first relay stops and gives its lease back.
    first_stop.cancel();
    first.await?;
    // Past the time the standby trusts the holder it read.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut tx = other.begin().await?;
    tx.publish(&happened("b", 2)?);
    tx.commit().await?;
    h.stream_holds(2, Duration::from_secs(3))
        .await
        .context("the standby did not take over when its process committed")?;
    Ok(())
}

/// A relay that finds its lease taken (here written over, as a relay that
/// took an expired lease would) ends its term by marking the rows it
/// published and had not yet marked, so the next relay does not send them
/// again; it then stands by and publishes nothing more.
#[tokio::test]
async fn sqlite_a_relay_that_loses_its_lease_marks_what_it_published() -> anyhow::Result<()> {
    let h = Harness::start(Backend::Sqlite).await?;
    let relay = h.relay(RelayConfig {
        mark_delay: Duration::from_secs(3600),
        ..fast_relay()
    });
    relay.clone().spawn(h.shutdown.clone());
    for n in 0..5 {
        h.write("e", n).await?;
    }
    h.stream_holds(5, Duration::from_secs(10))
        .await
        .context("the relay did not publish")?;
    ensure!(
        h.store.outbox_backlog().await? == 5,
        "the rows were marked before their delay"
    );
    // Another owner holds the lease from now on, for longer than the test.
    let far = skein_outbox::now_micros() + 3_600_000_000;
    sqlx::query("UPDATE skein_relay_lease SET owner = 'someone else', expires_at = $1")
        .bind(far)
        .execute(h.store.pool())
        .await?;
    h.backlog_at_most(0, Duration::from_secs(5))
        .await
        .context("the relay that lost its lease did not mark the rows it had published")?;
    // Standing by: a new row waits for the holder.
    h.write("e", 5).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        h.stream_messages().await?.len() == 5,
        "a relay without the lease published"
    );
    ensure!(relay.duplicates() == 0);
    Ok(())
}
