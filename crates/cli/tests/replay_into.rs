//! `skein replay --into` and the consumer lag of `skein audit`, as
//! processes against a real nats-server and real databases (SQLite and
//! PostgreSQL), beside workers running in the test.

use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context};
use skein_bus::provision::{apply_builtin_streams, COMMANDS, EVENTS};
use skein_bus::replay::{read, StartAt};
use skein_bus::{Bus, BusConfig};
use skein_contracts::identity::UserRegistered;
use skein_contracts::orders::{OrderConfirmed, OrderLine, OrderPlaced};
use skein_contracts::Role;
use skein_message::{Envelope, MessageContext};
use skein_outbox::{Relay, RelayConfig, Store};
use skein_projector::Snapshot;
use skein_service::{Host, HostConfig};
use skein_testkit::{backend_tests, eventually, Backend, NatsServer, TestDb};
use uuid::Uuid;

/// A nats-server with the streams, and databases `{service}` beside a test one.
struct Setup {
    server: NatsServer,
    bus: Bus,
    db: TestDb,
}

impl Setup {
    async fn start(backend: Backend) -> anyhow::Result<Self> {
        let server = NatsServer::start().await?;
        let bus = Bus::connect(&BusConfig::new(server.url(), "replay-into-test")).await?;
        apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
        let db = TestDb::new(backend).await?;
        Ok(Self { server, bus, db })
    }

    /// The `DATABASE_URL` template the commands get.
    fn template(&self) -> String {
        self.db.sibling_url("{service}")
    }

    async fn store(&self, service: &str) -> anyhow::Result<Store> {
        let mut config =
            skein_outbox::StoreConfig::new(self.template().replace("{service}", service));
        config.max_connections = 3;
        Ok(Store::connect_with(config).await?)
    }

    async fn skein(&self, args: &[&str]) -> anyhow::Result<Output> {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(args)
            .env("NATS_URL", self.server.url())
            .env("DATABASE_URL", self.template())
            .env_remove("SKEIN_STARTING_BALANCE_CENTS")
            .env_remove("SKEIN_PROVIDER_FAILURE_RATE")
            .output()
            .await
            .context("cannot run skein")
    }

    async fn publish(&self, envelope: &Envelope) -> anyhow::Result<u64> {
        Ok(self.bus.publisher().publish(envelope).await?.sequence)
    }

    async fn projector(&self, store: &Store) -> anyhow::Result<Host> {
        Ok(skein_projector::start(
            self.bus.clone(),
            store.clone(),
            HostConfig::new(skein_projector::NAME),
        )
        .await?)
    }

    /// Waits until `consumer` on `stream` has nothing pending or unacknowledged.
    async fn caught_up(&self, stream: &str, consumer: &str) -> anyhow::Result<()> {
        eventually(Duration::from_secs(20), || async {
            let mut c = self
                .bus
                .jetstream()
                .get_stream(stream)
                .await
                .ok()?
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer)
                .await
                .ok()?;
            let info = c.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        })
        .await
        .with_context(|| format!("{consumer} did not catch up on {stream}"))
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn user(id: Uuid, n: u32) -> anyhow::Result<Envelope> {
    Ok(Envelope::event(
        "identity",
        &UserRegistered {
            user_id: id,
            email: format!("u{n}@example.org"),
            name: format!("User {n}"),
            role: Role::Customer,
        },
        &MessageContext::root(),
    )?)
}

fn placed(order: Uuid, customer: Uuid, total_cents: i64) -> anyhow::Result<Envelope> {
    Ok(Envelope::event(
        "orders",
        &OrderPlaced {
            order_id: order,
            customer_id: customer,
            lines: vec![OrderLine {
                product_id: Uuid::now_v7(),
                quantity: 1,
                unit_price_cents: total_cents,
            }],
            total_cents,
        },
        &MessageContext::root(),
    )?)
}

fn confirmed(order: Uuid, customer: Uuid, total_cents: i64) -> anyhow::Result<Envelope> {
    Ok(Envelope::event(
        "orders",
        &OrderConfirmed {
            order_id: order,
            customer_id: customer,
            total_cents,
        },
        &MessageContext::root(),
    )?)
}

async fn execute(store: &Store, sql: &str) -> anyhow::Result<u64> {
    Ok(sqlx::query(sql)
        .execute(store.pool())
        .await?
        .rows_affected())
}

/// Deletes `store`'s inbox record of message `id`, as a database restored
/// from an older backup would have lost it.
async fn drop_record(store: &Store, id: &str) -> anyhow::Result<()> {
    execute(
        store,
        &format!("DELETE FROM skein_inbox WHERE message_id = '{id}'"),
    )
    .await?;
    Ok(())
}

async fn inbox_count(store: &Store, name: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM skein_inbox WHERE handler = $1")
            .bind(name)
            .fetch_one(store.pool())
            .await?,
    )
}

fn order(s: &Snapshot, id: Uuid) -> Option<&skein_projector::store::OrderRow> {
    s.orders.iter().find(|o| o.id == id.to_string())
}

async fn replaying_into_the_projector_skips_what_it_has_and_applies_what_it_missed_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let setup = Setup::start(backend).await?;
    let store = setup.store("projector").await?;
    let host = setup.projector(&store).await?;
    let (customer, o1, o2, o3) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    setup.publish(&user(customer, 1)?).await?;
    setup.publish(&placed(o1, customer, 500)?).await?;
    setup.publish(&confirmed(o1, customer, 500)?).await?;
    setup.publish(&placed(o2, customer, 700)?).await?;
    let before = eventually(Duration::from_secs(20), || async {
        let s = skein_projector::snapshot(&store).await.ok()?;
        (s.users.len() == 1
            && s.timeline.len() == 3
            && order(&s, o1).is_some_and(|o| o.status == "confirmed"))
        .then_some(s)
    })
    .await
    .context("the projector did not apply the events")?;
    setup.caught_up(EVENTS, "projector").await?;

    // Everything already applied, while the projector runs: all skipped.
    let all = setup.skein(&["replay", "--into", "projector"]).await?;
    ensure!(all.status.success(), "{}", stderr(&all));
    ensure!(
        stdout(&all).contains("0 applied, 0 reprocessed, 4 skipped"),
        "{}",
        stdout(&all)
    );
    ensure!(skein_projector::snapshot(&store).await? == before);
    ensure!(inbox_count(&store, "projector").await? == 4);

    // An event published while the projector is stopped.
    host.shutdown().await;
    setup.publish(&placed(o3, customer, 900)?).await?;
    let o3_text = o3.to_string();
    let dry = setup
        .skein(&[
            "replay",
            "--into",
            "projector",
            "--entity",
            &o3_text,
            "--dry-run",
        ])
        .await?;
    ensure!(dry.status.success(), "{}", stderr(&dry));
    ensure!(
        stdout(&dry).contains("would apply") && stdout(&dry).contains("1 would be applied"),
        "{}",
        stdout(&dry)
    );
    ensure!(order(&skein_projector::snapshot(&store).await?, o3).is_none());
    // Stored before what the inbox remembers (here 1 s), and not in it: it
    // may have run already (its record deleted), so it is held back, in a
    // dry run and for real, and nothing changes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for dry_run in [true, false] {
        let mut args = vec![
            "replay",
            "--into",
            "projector",
            "--entity",
            &o3_text,
            "--inbox-retention",
            "1s",
        ];
        if dry_run {
            args.push("--dry-run");
        }
        let held = setup.skein(&args).await?;
        ensure!(
            held.status.success() == dry_run
                && stdout(&held).contains("held back: stored")
                && stdout(&held).contains("1 held back (older than the inbox remembers)"),
            "{}{}",
            stdout(&held),
            stderr(&held)
        );
        if !dry_run {
            ensure!(
                stderr(&held).contains("--inbox-retention 0s to deliver them anyway"),
                "{}",
                stderr(&held)
            );
        }
        ensure!(order(&skein_projector::snapshot(&store).await?, o3).is_none());
    }
    // As old, but in the inbox: skipped as ever, not held back.
    let o1_text = o1.to_string();
    let had = setup
        .skein(&[
            "replay",
            "--into",
            "projector",
            "--entity",
            &o1_text,
            "--inbox-retention",
            "1s",
        ])
        .await?;
    ensure!(
        had.status.success()
            && stdout(&had).contains(
                "2 skipped (already in the inbox), 0 not subscribed, 0 failed, 0 held back"
            ),
        "{}{}",
        stdout(&had),
        stderr(&had)
    );
    let first = setup
        .skein(&["replay", "--into", "projector", "--entity", &o3_text])
        .await?;
    ensure!(first.status.success(), "{}", stderr(&first));
    ensure!(stdout(&first).contains("1 applied"), "{}", stdout(&first));
    let after = skein_projector::snapshot(&store).await?;
    ensure!(
        order(&after, o3).is_some_and(|o| o.status == "pending" && o.total_cents == 900),
        "{after:?}"
    );
    let second = setup
        .skein(&[
            "replay",
            "--into",
            "projector",
            "--entity",
            &o3_text,
            "--format",
            "json",
        ])
        .await?;
    ensure!(second.status.success(), "{}", stderr(&second));
    let line: serde_json::Value = serde_json::from_str(stdout(&second).trim())?;
    ensure!(
        line["outcome"] == "skipped" && line["sequence"] == 5,
        "{line}"
    );
    ensure!(skein_projector::snapshot(&store).await? == after);

    // A fresh inbox (a database restored without it): everything applied
    // once more, which changes no row, and recorded again.
    execute(&store, "DELETE FROM skein_inbox").await?;
    let fresh = setup.skein(&["replay", "--into", "projector"]).await?;
    ensure!(
        fresh.status.success() && stdout(&fresh).contains("5 applied"),
        "{}{}",
        stdout(&fresh),
        stderr(&fresh)
    );
    ensure!(inbox_count(&store, "projector").await? == 5);
    ensure!(skein_projector::snapshot(&store).await? == after);
    let again = setup.skein(&["replay", "--into", "projector"]).await?;
    ensure!(
        stdout(&again).contains("0 applied, 0 reprocessed, 5 skipped"),
        "{}",
        stdout(&again)
    );

    // Damaged rows: o1's order row and its timeline, and o2's order row.
    execute(
        &store,
        &format!(
            "UPDATE orders SET total_cents = 1, status = 'pending', status_rank = 0 \
             WHERE id IN ('{o1}', '{o2}')"
        ),
    )
    .await?;
    ensure!(
        execute(
            &store,
            &format!("DELETE FROM timeline WHERE order_id = '{o1}'")
        )
        .await?
            == 2
    );
    let o1_text = o1.to_string();
    let plain = setup
        .skein(&["replay", "--into", "projector", "--entity", &o1_text])
        .await?;
    ensure!(stdout(&plain).contains("2 skipped"), "{}", stdout(&plain));
    ensure!(
        order(&skein_projector::snapshot(&store).await?, o1).is_some_and(|o| o.total_cents == 1)
    );

    let dry = setup
        .skein(&[
            "replay",
            "--into",
            "projector",
            "--entity",
            &o1_text,
            "--force-reprocess",
            "orders",
            "--dry-run",
        ])
        .await?;
    ensure!(
        stdout(&dry).contains("would reprocess: into orders")
            && stdout(&dry).contains("2 reprocessed"),
        "{}",
        stdout(&dry)
    );
    ensure!(
        order(&skein_projector::snapshot(&store).await?, o1).is_some_and(|o| o.total_cents == 1)
    );

    let forced = setup
        .skein(&[
            "replay",
            "--into",
            "projector",
            "--entity",
            &o1_text,
            "--force-reprocess",
            "orders",
        ])
        .await?;
    ensure!(forced.status.success(), "{}", stderr(&forced));
    ensure!(
        stdout(&forced).contains("0 applied, 2 reprocessed"),
        "{}",
        stdout(&forced)
    );
    let repaired = skein_projector::snapshot(&store).await?;
    ensure!(
        order(&repaired, o1) == order(&after, o1),
        "o1 not repaired: {repaired:?}"
    );
    ensure!(
        order(&repaired, o2).is_some_and(|o| o.total_cents == 1),
        "o2 was not selected and must stay as it was"
    );
    ensure!(
        !repaired.timeline.iter().any(|t| t.order_id == o1_text),
        "--force-reprocess orders must not touch the timeline"
    );
    let timeline = setup
        .skein(&[
            "replay",
            "--into",
            "projector",
            "--entity",
            &o1_text,
            "--force-reprocess",
            "timeline",
        ])
        .await?;
    ensure!(timeline.status.success(), "{}", stderr(&timeline));
    let o2_text = o2.to_string();
    let all_models = setup
        .skein(&[
            "replay",
            "--into",
            "projector",
            "--entity",
            &o2_text,
            "--force-reprocess",
            "all",
        ])
        .await?;
    ensure!(all_models.status.success(), "{}", stderr(&all_models));
    ensure!(skein_projector::snapshot(&store).await? == after);
    ensure!(inbox_count(&store, "projector").await? == 5);

    // The projector comes back: it gets o3 from its consumer, skips it, and
    // changes nothing.
    let host = setup.projector(&store).await?;
    setup.caught_up(EVENTS, "projector").await?;
    ensure!(skein_projector::snapshot(&store).await? == after);
    host.shutdown().await;

    // An event its handler refuses: reported as failed, not dead-lettered,
    // nothing changed.
    let o4 = Uuid::now_v7();
    let mut bad = placed(o4, customer, 100)?;
    bad.data = bytes::Bytes::from_static(br#"{"order_id": 42}"#);
    setup.publish(&bad).await?;
    let o4_text = o4.to_string();
    let refused = setup
        .skein(&["replay", "--into", "projector", "--entity", &o4_text])
        .await?;
    ensure!(!refused.status.success(), "{}", stdout(&refused));
    ensure!(
        stdout(&refused).contains("failed: (permanent)")
            && stdout(&refused).contains("1 failed")
            && stderr(&refused).contains("not dead-lettered"),
        "{}{}",
        stdout(&refused),
        stderr(&refused)
    );
    ensure!(read(&setup.bus, "DLQ", ">", StartAt::Beginning)
        .await?
        .is_empty());
    ensure!(inbox_count(&store, "projector").await? == 5);
    ensure!(skein_projector::snapshot(&store).await? == after);
    Ok(())
}

async fn replaying_into_a_stopped_orchestrator_starts_its_saga_once_and_publishes_what_it_sends(
    backend: Backend,
) -> anyhow::Result<()> {
    let setup = Setup::start(backend).await?;
    let (customer, order_id) = (Uuid::now_v7(), Uuid::now_v7());
    // The orchestrator never ran: its database does not exist yet, and
    // the replay creates it only when told to.
    setup.publish(&user(customer, 1)?).await?;
    setup.publish(&placed(order_id, customer, 1200)?).await?;
    let refused = setup.skein(&["replay", "--into", "orchestrator"]).await?;
    ensure!(
        !refused.status.success() && stderr(&refused).contains("--create-database"),
        "{}",
        stderr(&refused)
    );

    let first = setup
        .skein(&["replay", "--into", "orchestrator", "--create-database"])
        .await?;
    ensure!(first.status.success(), "{}", stderr(&first));
    let out = stdout(&first);
    ensure!(
        out.contains("1 applied")
            && out.contains("1 not subscribed")
            && out.contains("everything the handlers sent is published"),
        "{out}"
    );
    let reserve = || async {
        let mut found = Vec::new();
        for m in read(
            &setup.bus,
            COMMANDS,
            "commands.catalog.reserve_stock",
            StartAt::Beginning,
        )
        .await?
        {
            let e = Envelope::from_parts(&m.subject, m.headers.as_ref(), m.payload)?;
            let c: skein_contracts::catalog::ReserveStock = e.decode()?;
            found.push(c.order_id);
        }
        anyhow::Ok(found)
    };
    ensure!(reserve().await? == vec![order_id], "{:?}", reserve().await?);

    // Now it exists: told to create it, the replay refuses (it would
    // migrate a database workers run on) and applies nothing.
    let again = setup
        .skein(&["replay", "--into", "orchestrator", "--create-database"])
        .await?;
    ensure!(
        !again.status.success()
            && stderr(&again)
                .contains("exists: --create-database is for a worker that has never run"),
        "{}{}",
        stdout(&again),
        stderr(&again)
    );
    ensure!(reserve().await? == vec![order_id]);

    let second = setup.skein(&["replay", "--into", "orchestrator"]).await?;
    ensure!(second.status.success(), "{}", stderr(&second));
    ensure!(
        stdout(&second).contains(
            "0 applied, 0 reprocessed, 1 skipped (already in the inbox), 1 not subscribed"
        ),
        "{}",
        stdout(&second)
    );
    ensure!(reserve().await? == vec![order_id]);
    let store = setup.store("orchestrator").await?;
    ensure!(
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM skein_outbox WHERE published_at IS NULL"
        )
        .fetch_one(store.pool())
        .await?
            == 0
    );
    // The replay's relay only publishes: rows a worker keeps longer than
    // the default retentions (an inbox record of 40 days, a row published 8
    // days ago) are still there after a replay that published.
    let day = 86_400_000_000_i64;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros(),
    )?;
    sqlx::query(
        "INSERT INTO skein_inbox (handler, message_id, processed_at) \
         VALUES ('orchestrator', 'kept-40d', $1)",
    )
    .bind(now - 40 * day)
    .execute(store.pool())
    .await?;
    sqlx::query(
        "INSERT INTO skein_outbox (id, subject, headers, payload, created_at, published_at) \
         VALUES ('kept-8d', 'events.orchestrator.test.kept', '[]', $1, $2, $2)",
    )
    .bind(Vec::<u8>::new())
    .bind(now - 8 * day)
    .execute(store.pool())
    .await?;
    setup
        .publish(&placed(Uuid::now_v7(), customer, 300)?)
        .await?;
    let third = setup.skein(&["replay", "--into", "orchestrator"]).await?;
    ensure!(
        stdout(&third).contains("1 applied")
            && stdout(&third).contains("everything the handlers sent is published"),
        "{}{}",
        stdout(&third),
        stderr(&third)
    );
    for (table, column, id) in [
        ("skein_inbox", "message_id", "kept-40d"),
        ("skein_outbox", "id", "kept-8d"),
    ] {
        let kept: i64 =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE {column} = $1"))
                .bind(id)
                .fetch_one(store.pool())
                .await?;
        ensure!(kept == 1, "the replay deleted {id} from {table}");
    }
    // A dry run checks the saga tables as well as the outbox's, and
    // changes nothing: current, it runs; behind this build, it is refused.
    let dry = setup
        .skein(&["replay", "--into", "orchestrator", "--dry-run"])
        .await?;
    ensure!(
        dry.status.success() && stdout(&dry).contains("2 skipped"),
        "{}{}",
        stdout(&dry),
        stderr(&dry)
    );
    let args = ["replay", "--into", "orchestrator", "--dry-run"];
    refused_behind(&store, "saga", || setup.skein(&args)).await?;
    Ok(())
}

/// Commits `envelope` to `store`'s outbox and publishes it, as identity does.
async fn announce(setup: &Setup, store: &Store, envelope: &Envelope) -> anyhow::Result<()> {
    let mut tx = store.begin().await?;
    tx.publish(envelope);
    tx.commit().await?;
    let published = Relay::new(store.clone(), setup.bus.publisher(), RelayConfig::default())
        .drain()
        .await?;
    ensure!(published == 1, "the relay published {published}");
    Ok(())
}

/// A fresh system with identity's and the projector's databases, the
/// projector running.
async fn with_projector(backend: Backend) -> anyhow::Result<(Setup, Store, Store, Host)> {
    let setup = Setup::start(backend).await?;
    let identity = setup.store("identity").await?;
    let projector = setup.store("projector").await?;
    let host = setup.projector(&projector).await?;
    Ok((setup, identity, projector, host))
}

async fn audit_reports_what_a_stopped_consumer_has_not_consumed_yet_and_what_it_missed(
    backend: Backend,
) -> anyhow::Result<()> {
    let (setup, identity, projector, host) = with_projector(backend).await?;
    let (u1, u2, u3) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    announce(&setup, &identity, &user(u1, 1)?).await?;
    setup.caught_up(EVENTS, "projector").await?;
    let clean = audit(&setup, "table").await?;
    ensure!(
        clean.status.success(),
        "{}{}",
        stdout(&clean),
        stderr(&clean)
    );
    ensure!(
        stdout(&clean).contains("clean: every published message is where it belongs\n")
            && !stdout(&clean).contains("not yet consumed"),
        "{}",
        stdout(&clean)
    );

    // Stopped: what is published meanwhile is lag, not loss.
    host.shutdown().await;
    announce(&setup, &identity, &user(u2, 2)?).await?;
    announce(&setup, &identity, &user(u3, 3)?).await?;
    let lagging = audit(&setup, "table").await?;
    let out = stdout(&lagging);
    ensure!(
        lagging.status.success(),
        "lag is no failure: {out}{}",
        stderr(&lagging)
    );
    ensure!(
        out.contains(&format!(
            "not yet consumed by projector {}",
            outbox_id(&identity, 1).await?
        )) && out.contains("not yet consumed by projector")
            && out.matches("not yet consumed by projector").count() == 2
            && out.contains("2 not yet consumed (lag, not loss)"),
        "{out}"
    );
    let consumer_line = out
        .lines()
        .find(|l| l.starts_with("projector") && l.contains("EVENTS"))
        .context("no consumer line for the projector")?;
    let pending: Vec<&str> = consumer_line.split_whitespace().collect();
    ensure!(pending.get(2) == Some(&"2"), "{consumer_line}");
    let json = audit(&setup, "json").await?;
    let lag: serde_json::Value = stdout(&json)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["consumer"] == "projector")
        .context("no JSON line for the projector consumer")?;
    ensure!(lag["pending"] == 2 && lag["stream"] == "EVENTS", "{lag}");

    // Started again: it catches up and the audit is clean.
    let host = setup.projector(&projector).await?;
    setup.caught_up(EVENTS, "projector").await?;
    let caught_up = audit(&setup, "table").await?;
    ensure!(
        caught_up.status.success() && !stdout(&caught_up).contains("not yet consumed"),
        "{}",
        stdout(&caught_up)
    );

    // Its database loses the record of u2 (restored from a backup, say):
    // acknowledged, yet not applied there. A problem, which replay repairs.
    drop_record(&projector, &outbox_id(&identity, 1).await?).await?;
    let missed = audit(&setup, "table").await?;
    ensure!(!missed.status.success(), "{}", stdout(&missed));
    ensure!(
        stdout(&missed).contains("missed by projector")
            && stderr(&missed).contains("skein replay --into projector --seq 2-2"),
        "{}{}",
        stdout(&missed),
        stderr(&missed)
    );
    let repair = setup
        .skein(&["replay", "--into", "projector", "--seq", "2-2"])
        .await?;
    ensure!(
        repair.status.success() && stdout(&repair).contains("1 applied"),
        "{}",
        stdout(&repair)
    );
    let repaired = audit(&setup, "table").await?;
    ensure!(
        repaired.status.success(),
        "{}{}",
        stdout(&repaired),
        stderr(&repaired)
    );
    ensure!(skein_projector::snapshot(&projector).await?.users.len() == 3);
    host.shutdown().await;
    Ok(())
}

/// `skein audit` of identity and the projector. Nothing is published while
/// it runs, so every row is checked, the newest too (`--skip-recent 0`).
async fn audit(setup: &Setup, format: &str) -> anyhow::Result<Output> {
    setup
        .skein(&[
            "audit",
            "--services",
            "identity,projector",
            "--format",
            format,
            "--skip-recent",
            "0",
        ])
        .await
}

/// An event stored twice (its relay published it again after the stream's
/// duplicate window): the audit names it and says why it is harmless; the
/// projector applied it once.
async fn an_event_stored_twice_is_reported_with_what_it_means(
    backend: Backend,
) -> anyhow::Result<()> {
    let (setup, identity, projector, host) = with_projector(backend).await?;
    let registered = user(Uuid::now_v7(), 1)?;
    announce(&setup, &identity, &registered).await?;
    setup.caught_up(EVENTS, "projector").await?;
    // Past the duplicate window the stream takes the same id again.
    let stored = read(&setup.bus, EVENTS, "events.>", StartAt::Beginning)
        .await?
        .pop()
        .context("the event is not in EVENTS")?;
    let mut headers = stored.headers.clone().unwrap_or_default();
    headers.insert(
        "Nats-Msg-Id",
        format!("{}:after-the-window", registered.id).as_str(),
    );
    setup
        .bus
        .publisher()
        .publish_outgoing(&skein_bus::Outgoing {
            subject: stored.subject.clone(),
            headers,
            payload: stored.payload.clone(),
        })
        .await?;
    setup.caught_up(EVENTS, "projector").await?;
    let report = audit(&setup, "table").await?;
    ensure!(
        !report.status.success()
            && stdout(&report).contains(&format!("duplicated in EVENTS {}", registered.id))
            && stderr(&report).contains("inboxes skip the second copy, there is nothing to repair"),
        "{}{}",
        stdout(&report),
        stderr(&report)
    );
    ensure!(inbox_count(&projector, "projector").await? == 1);
    ensure!(skein_projector::snapshot(&projector).await?.users.len() == 1);
    host.shutdown().await;
    Ok(())
}

/// A row marked published just before the audit began may reach the
/// stream only after the audit read it (a live system): it is left for the
/// next audit, not reported lost. Checked, it is found lost (here it never
/// reached the stream).
async fn audit_leaves_rows_published_just_before_it_to_the_next_one(
    backend: Backend,
) -> anyhow::Result<()> {
    let setup = Setup::start(backend).await?;
    let identity = setup.store("identity").await?;
    let mut tx = identity.begin().await?;
    tx.publish(&user(Uuid::now_v7(), 1)?);
    tx.commit().await?;
    // Marked published, never sent: what a relay's publish after the
    // audit's read of the stream looks like to the audit.
    sqlx::query("UPDATE skein_outbox SET published_at = $1")
        .bind(skein_outbox::now_micros())
        .execute(identity.pool())
        .await?;
    let id = outbox_id(&identity, 0).await?;
    let recent = setup
        .skein(&["audit", "--services", "identity", "--skip-recent", "30"])
        .await?;
    ensure!(
        recent.status.success()
            && stdout(&recent).contains("1 published just before the audit began")
            && !stdout(&recent).contains("lost"),
        "{}{}",
        stdout(&recent),
        stderr(&recent)
    );
    let checked = setup
        .skein(&["audit", "--services", "identity", "--skip-recent", "0"])
        .await?;
    ensure!(
        !checked.status.success() && stdout(&checked).contains(&format!("lost {id}")),
        "{}{}",
        stdout(&checked),
        stderr(&checked)
    );
    let bad = setup
        .skein(&["audit", "--services", "identity", "--skip-recent", "7200"])
        .await?;
    ensure!(
        !bad.status.success() && stderr(&bad).contains("--skip-recent"),
        "{}",
        stderr(&bad)
    );
    Ok(())
}

/// The id of the `nth` (from 0) message of `store`'s outbox.
async fn outbox_id(store: &Store, nth: i64) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("SELECT id FROM skein_outbox ORDER BY seq LIMIT 1 OFFSET $1")
            .bind(nth)
            .fetch_one(store.pool())
            .await?,
    )
}

backend_tests!(
    replaying_into_the_projector_skips_what_it_has_and_applies_what_it_missed_once,
    replaying_into_a_stopped_orchestrator_starts_its_saga_once_and_publishes_what_it_sends,
    audit_reports_what_a_stopped_consumer_has_not_consumed_yet_and_what_it_missed,
    audit_leaves_rows_published_just_before_it_to_the_next_one,
    a_dead_letter_an_operator_purged_is_discarded_for_the_audit_not_missed,
    an_event_redriven_from_the_dlq_is_no_duplicate_for_the_audit,
    a_copy_of_an_old_message_stored_just_now_is_held_back_like_the_message,
    an_inbox_record_deleted_past_its_retention_is_forgotten_not_missed,
    an_event_stored_twice_is_reported_with_what_it_means,
);

/// Runs the relay's cleanup on `store` with an inbox retention of
/// `inbox_retention`, as a worker started with that `--inbox-retention`
/// would.
async fn forget(setup: &Setup, store: &Store, inbox_retention: Duration) -> anyhow::Result<u64> {
    let config = RelayConfig {
        inbox_retention,
        ..RelayConfig::default()
    };
    let (_, inbox) = Relay::new(store.clone(), setup.bus.publisher(), config)
        .cleanup()
        .await?;
    Ok(inbox)
}

/// An inbox forgets what it processed after its retention, which may be
/// shorter than the producer's outbox keeps its rows: an event the
/// consumer applied and then forgot that way is no miss for the audit (it
/// would fail, and `skein replay --into` apply the event twice). A record
/// lost otherwise, of an event published after the inbox's horizon, is
/// still found missed.
async fn an_inbox_record_deleted_past_its_retention_is_forgotten_not_missed(
    backend: Backend,
) -> anyhow::Result<()> {
    let (setup, identity, projector, host) = with_projector(backend).await?;
    announce(&setup, &identity, &user(Uuid::now_v7(), 1)?).await?;
    setup.caught_up(EVENTS, "projector").await?;

    // A cleanup with two hours' retention forgets nothing of this: a
    // record deleted by other means is a miss.
    ensure!(forget(&setup, &projector, Duration::from_secs(7200)).await? == 0);
    let id = outbox_id(&identity, 0).await?;
    let record = format!("SELECT COUNT(*) FROM skein_inbox WHERE message_id = '{id}'");
    let kept: i64 = sqlx::query_scalar(&record)
        .fetch_one(projector.pool())
        .await?;
    ensure!(kept == 1, "the projector has no record of {id}");
    drop_record(&projector, &id).await?;
    let missed = audit(&setup, "table").await?;
    ensure!(
        !missed.status.success() && stdout(&missed).contains(&format!("missed by projector {id}")),
        "{}{}",
        stdout(&missed),
        stderr(&missed)
    );

    // The same inbox cleaned up with no retention: it may have forgotten
    // anything published before now, this event too.
    announce(&setup, &identity, &user(Uuid::now_v7(), 2)?).await?;
    setup.caught_up(EVENTS, "projector").await?;
    ensure!(forget(&setup, &projector, Duration::ZERO).await? == 1);
    let forgotten = audit(&setup, "table").await?;
    let out = stdout(&forgotten);
    ensure!(
        forgotten.status.success()
            && out.contains(
                "2 older than the inbox of projector remembers, not found there: not checked"
            )
            && !out.contains("missed by"),
        "{out}{}",
        stderr(&forgotten)
    );
    let json = audit(&setup, "json").await?;
    let report: serde_json::Value = stdout(&json)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["service"] == "identity")
        .context("no JSON report for identity")?;
    ensure!(
        report["forgotten"].as_array().map(Vec::len) == Some(2)
            && report["missed"].as_array().is_some_and(Vec::is_empty),
        "{report}"
    );

    // A replay into it, told nothing of the worker's retention, goes by the
    // horizon its relay recorded: both events may have run, and are held
    // back, not applied again.
    let replay = || setup.skein(&["replay", "--into", "projector"]);
    let held = replay().await?;
    ensure!(
        !held.status.success()
            && stdout(&held).contains("0 applied")
            && stdout(&held).contains("2 held back (older than the inbox remembers)"),
        "{}{}",
        stdout(&held),
        stderr(&held)
    );
    // Stored well after the horizon (moved back here, as if time passed):
    // not forgotten, delivered.
    execute(
        &projector,
        "UPDATE skein_inbox_horizon SET forgotten_before = forgotten_before - 120000000",
    )
    .await?;
    let applied = replay().await?;
    ensure!(
        applied.status.success() && stdout(&applied).contains("2 applied"),
        "{}{}",
        stdout(&applied),
        stderr(&applied)
    );
    host.shutdown().await;
    Ok(())
}

/// A copy `skein dlq redrive` stored just now of a message two days old is
/// as old as its message: a day's inbox retention holds it back, since the
/// original may have run (in the other consumers) and been forgotten. A
/// message that is no such copy goes by when it was stored, whatever its
/// producer's clock said.
async fn a_copy_of_an_old_message_stored_just_now_is_held_back_like_the_message(
    backend: Backend,
) -> anyhow::Result<()> {
    let (setup, _identity, projector, host) = with_projector(backend).await?;
    host.shutdown().await;
    let order_id = Uuid::now_v7();
    let mut old = placed(order_id, Uuid::now_v7(), 300)?;
    old.time -= time::Duration::days(2);
    // Its producer's clock was two days behind: stored now, delivered.
    setup.publish(&old).await?;
    let order_text = order_id.to_string();
    let replay = || async {
        setup
            .skein(&[
                "replay",
                "--into",
                "projector",
                "--entity",
                &order_text,
                "--inbox-retention",
                "1d",
                "--dry-run",
            ])
            .await
    };
    let skewed = replay().await?;
    ensure!(
        stdout(&skewed).contains("1 would be applied"),
        "{}{}",
        stdout(&skewed),
        stderr(&skewed)
    );
    // A redriven copy of it: held back.
    let mut copy = skein_bus::Outgoing::from(&old);
    copy.headers.insert("Skein-Redriven", "1");
    copy.headers
        .insert("Nats-Msg-Id", format!("{}:redrive-1", old.id).as_str());
    setup.bus.publisher().publish_outgoing(&copy).await?;
    let held = replay().await?;
    ensure!(
        stdout(&held).contains("1 held back (older than the inbox remembers)"),
        "{}{}",
        stdout(&held),
        stderr(&held)
    );
    // A copy redriven for another worker (orders gave up on it): passed
    // over, however old, as the projector's consumer passes it over.
    let mut for_orders = skein_bus::Outgoing::from(&old);
    for_orders.headers.insert("Skein-Redriven", "1");
    for_orders.headers.insert("Skein-Redriven-For", "orders");
    for_orders.headers.insert(
        "Nats-Msg-Id",
        format!("{}:redrive-orders-1", old.id).as_str(),
    );
    setup.bus.publisher().publish_outgoing(&for_orders).await?;
    let passed = replay().await?;
    ensure!(
        stdout(&passed).contains("1 held back (older than the inbox remembers), 1 passed over (copies redriven for another worker)")
            && stdout(&passed).contains("a copy redriven for orders, which gave up on it"),
        "{}{}",
        stdout(&passed),
        stderr(&passed)
    );
    // A replay changes no schema: into a database behind this build, even
    // a real one is refused and applies no migration.
    let args = ["replay", "--into", "projector", "--entity", &order_text];
    refused_behind(&projector, "skein_outbox", || setup.skein(&args)).await?;
    ensure!(order(&skein_projector::snapshot(&projector).await?, order_id).is_none());
    Ok(())
}

/// A system whose projector (stopped) gave up on identity's one event, as
/// far as its inbox and the DLQ tell: not in its inbox, dead-lettered.
async fn a_projector_that_gave_up_on_an_event(
    backend: Backend,
) -> anyhow::Result<(Setup, Store, Store)> {
    let (setup, identity, projector, host) = with_projector(backend).await?;
    announce(&setup, &identity, &user(Uuid::now_v7(), 1)?).await?;
    setup.caught_up(EVENTS, "projector").await?;
    host.shutdown().await;
    let id = outbox_id(&identity, 0).await?;
    drop_record(&projector, &id).await?;
    let event = read(&setup.bus, EVENTS, "events.>", StartAt::Beginning)
        .await?
        .into_iter()
        .next()
        .context("the event is not in EVENTS")?;
    skein_bus::dlq::publish_dead_letter(
        &setup.bus.publisher(),
        event.headers.as_ref(),
        event.payload.clone(),
        &skein_bus::dlq::DeadLetterInfo {
            reason: "refused".into(),
            handler: "projector".into(),
            deliveries: 1,
            stream: EVENTS.into(),
            stream_sequence: event.sequence,
            subject: event.subject.clone(),
        },
    )
    .await?;
    Ok((setup, identity, projector))
}

/// An event a consumer gave up on is redriven from the DLQ (a second copy
/// in EVENTS, meant to be there) and applied: the audit is clean, neither
/// a duplicate nor, while the copy waits, a message the consumer missed.
async fn an_event_redriven_from_the_dlq_is_no_duplicate_for_the_audit(
    backend: Backend,
) -> anyhow::Result<()> {
    let (setup, _identity, projector) = a_projector_that_gave_up_on_an_event(backend).await?;
    let redrive = setup.skein(&["dlq", "redrive"]).await?;
    ensure!(
        stdout(&redrive).contains("redriven to"),
        "{}{}",
        stdout(&redrive),
        stderr(&redrive)
    );
    // Not consumed yet: lag, not a miss.
    let waiting = audit(&setup, "table").await?;
    ensure!(
        waiting.status.success() && stdout(&waiting).contains("not yet consumed by projector"),
        "{}{}",
        stdout(&waiting),
        stderr(&waiting)
    );
    let host = setup.projector(&projector).await?;
    setup.caught_up(EVENTS, "projector").await?;
    let applied = audit(&setup, "table").await?;
    ensure!(
        applied.status.success()
            && stdout(&applied).contains("clean: every published message is where it belongs\n"),
        "{}{}",
        stdout(&applied),
        stderr(&applied)
    );
    host.shutdown().await;
    Ok(())
}

/// A consumer gave up on an event (dead-lettered, not in its inbox): the
/// audit counts it as handled. An operator then purges the dead letter: the
/// purge leaves a record, so the audit still does not take the event for
/// one the consumer missed (nor suggest replaying what was discarded). And
/// the audit changes no schema.
async fn a_dead_letter_an_operator_purged_is_discarded_for_the_audit_not_missed(
    backend: Backend,
) -> anyhow::Result<()> {
    let (setup, identity, _projector) = a_projector_that_gave_up_on_an_event(backend).await?;
    let dead_lettered = audit(&setup, "table").await?;
    ensure!(
        dead_lettered.status.success(),
        "{}{}",
        stdout(&dead_lettered),
        stderr(&dead_lettered)
    );

    let purge = setup.skein(&["dlq", "purge"]).await?;
    ensure!(
        stderr(&purge).contains("1 dead letter(s) purged"),
        "{}",
        stderr(&purge)
    );
    let list = setup.skein(&["dlq", "list"]).await?;
    ensure!(
        stdout(&list).lines().count() == 1,
        "the purge record is listed as a dead letter: {}",
        stdout(&list)
    );
    let purged = audit(&setup, "table").await?;
    ensure!(
        purged.status.success() && !stdout(&purged).contains("missed by"),
        "{}{}",
        stdout(&purged),
        stderr(&purged)
    );
    // An audit changes no schema either: a database behind this build is
    // refused, not migrated.
    refused_behind(&identity, "skein_outbox", || audit(&setup, "table")).await?;
    Ok(())
}

/// With `store`'s schema made to look behind this build (`component`'s
/// first migration forgotten), `run` is refused naming it, and applies
/// nothing.
async fn refused_behind<F, Fut>(store: &Store, component: &str, run: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Output>>,
{
    let forget =
        format!("DELETE FROM skein_migrations WHERE component = '{component}' AND version = 1");
    let forget = forget.as_str();
    execute(store, forget).await?;
    let behind = run().await?;
    ensure!(
        !behind.status.success() && stderr(&behind).contains("behind this build"),
        "{}",
        stderr(&behind)
    );
    ensure!(
        execute(store, forget).await? == 0,
        "a migration was applied"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replays_and_audits_say_what_is_wrong_and_create_nothing() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let run = |args: &'static [&'static str]| {
        let url = server.url();
        let db = format!("sqlite:{}/{{service}}.db", dir.path().display());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
                .args(args)
                .env("NATS_URL", url)
                .env("DATABASE_URL", db)
                .output()
                .await
        }
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &["replay", "--into", "orders", "--force-reprocess", "orders"],
            "needs --into projector",
        ),
        (&["replay", "--force-reprocess", "orders"], "--into"),
        (&["replay", "--dry-run"], "--into"),
        (
            &["replay", "--into", "projector", "--stream", "DLQ"],
            "skein dlq redrive",
        ),
        (&["replay", "--into", "identity"], "consumes no stream"),
        (
            &[
                "replay",
                "--into",
                "projector",
                "--force-reprocess",
                "everything",
            ],
            "users, orders, timeline, all",
        ),
        (
            &["replay", "--into", "projector", "--follow"],
            "cannot be used with",
        ),
        (
            &["replay", "--into", "projector", "--rebuild", "users"],
            "cannot be used with",
        ),
        (&["replay", "--into", "nobody"], "invalid value"),
        (
            &["replay", "--into", "projector", "--dry-run"],
            "no projector database",
        ),
        // A real run neither: it would apply everything to a new database.
        (
            &["replay", "--into", "orchestrator"],
            "no orchestrator database",
        ),
        // An audit that would check nothing does not say "clean".
        (&["audit", "--services", "order"], "no service \"order\""),
        (&["audit", "--services", "orders"], "no orders database"),
        (&["audit"], "nothing to audit"),
    ];
    for (args, expected) in cases {
        let out = run(args).await?;
        ensure!(
            !out.status.success() && stderr(&out).contains(expected),
            "{args:?}: expected an error with {expected:?}, got {}",
            stderr(&out)
        );
    }
    ensure!(
        std::fs::read_dir(dir.path())?.next().is_none(),
        "a refused replay created a database"
    );
    Ok(())
}

/// A dry run changes nothing, nor does an audit: against a PostgreSQL
/// server without the worker's database they say so, and the database is
/// still not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_or_an_audit_on_postgres_creates_no_database() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let db = TestDb::new(Backend::Postgres).await?;
    let template = db.sibling_url("{service}");
    let projector = template.replace("{service}", "projector");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["replay", "--into", "projector", "--dry-run"])
        .env("NATS_URL", server.url())
        .env("DATABASE_URL", &template)
        .output()
        .await?;
    ensure!(
        !out.status.success() && stderr(&out).contains("no projector database"),
        "expected an error naming the missing database, got {}",
        stderr(&out)
    );
    ensure!(
        !skein_outbox::store::database_exists(&projector).await?,
        "the dry run created {projector}"
    );
    // Nor does an audit: it refuses, naming the missing database.
    let bus = Bus::connect(&BusConfig::new(server.url(), "audit-test")).await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["audit", "--services", "projector"])
        .env("NATS_URL", server.url())
        .env("DATABASE_URL", &template)
        .output()
        .await?;
    ensure!(
        !out.status.success() && stderr(&out).contains("projector: no database at"),
        "the audit did not fail naming the missing database: {}",
        stderr(&out)
    );
    ensure!(
        !skein_outbox::store::database_exists(&projector).await?,
        "the audit created {projector}"
    );
    Ok(())
}
