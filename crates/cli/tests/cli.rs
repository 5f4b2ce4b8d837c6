//! The `skein` binary against a real nats-server.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde::{Deserialize, Serialize};
use skein_bus::provision::{apply_builtin_streams, EVENTS};
use skein_bus::{Bus, BusConfig, Delivery, Handler, HandlerError, Worker, WorkerConfig};
use skein_message::{Contract, Envelope, Event, MessageContext};
use skein_testkit::{eventually, NatsServer};

#[derive(Debug, Serialize, Deserialize)]
struct Noted {
    entity: String,
    n: u32,
}
impl Contract for Noted {
    const SERVICE: &'static str = "notes";
    const NAME: &'static str = "noted";
    const VERSION: u32 = 1;
}
impl Event for Noted {
    fn entity_id(&self) -> String {
        self.entity.clone()
    }
}

async fn skein(server: &NatsServer, args: &[&str]) -> anyhow::Result<Output> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(args)
        .env("NATS_URL", server.url())
        .output()
        .await
        .context("cannot run skein")?;
    Ok(output)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn bus(server: &NatsServer) -> anyhow::Result<Bus> {
    let bus = Bus::connect(&BusConfig::new(server.url(), "cli-test")).await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    Ok(bus)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_apply_creates_then_reports_unchanged() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let first = skein(&server, &["streams", "apply"]).await?;
    ensure!(first.status.success(), "{}", stderr(&first));
    let out = stdout(&first);
    ensure!(
        out.matches("created").count() == 3 && out.contains("EVENTS"),
        "{out}"
    );
    let second = skein(&server, &["streams", "apply"]).await?;
    ensure!(
        stdout(&second).matches("unchanged").count() == 3,
        "{}",
        stdout(&second)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_filters_return_exactly_the_matching_events() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let request_a = MessageContext::with_correlation("req-a");
    let request_b = MessageContext::with_correlation("req-b");
    let mut ids = Vec::new();
    for (entity, n, ctx) in [
        ("e1", 1, &request_a),
        ("e2", 2, &request_a),
        ("e1", 3, &request_b),
        ("e3", 4, &request_b),
    ] {
        let e = Envelope::event(
            "notes",
            &Noted {
                entity: entity.into(),
                n,
            },
            ctx,
        )?;
        bus.publisher().publish(&e).await?;
        ids.push(e.id.to_string());
    }
    let json_ids = |o: &Output| -> anyhow::Result<Vec<String>> {
        stdout(o)
            .lines()
            .map(|l| {
                Ok(serde_json::from_str::<serde_json::Value>(l)?["id"]
                    .as_str()
                    .context("no id")?
                    .to_owned())
            })
            .collect()
    };
    let by_entity = skein(&server, &["replay", "--entity", "e1", "--format", "json"]).await?;
    ensure!(
        json_ids(&by_entity)? == vec![ids[0].clone(), ids[2].clone()],
        "{}",
        stdout(&by_entity)
    );
    let by_correlation = skein(
        &server,
        &["replay", "--correlation", "req-b", "--format", "json"],
    )
    .await?;
    ensure!(json_ids(&by_correlation)? == vec![ids[2].clone(), ids[3].clone()]);
    let by_seq = skein(&server, &["replay", "--seq", "2-3", "--format", "json"]).await?;
    ensure!(json_ids(&by_seq)? == vec![ids[1].clone(), ids[2].clone()]);
    let by_type = skein(
        &server,
        &["replay", "--type", "notes.other", "--format", "json"],
    )
    .await?;
    ensure!(json_ids(&by_type)?.is_empty() && stderr(&by_type).contains("no messages match"));
    let table = skein(&server, &["replay", "--subject", "events.notes.e3.>"]).await?;
    let out = stdout(&table);
    ensure!(
        out.lines().count() == 2 && out.contains("notes.noted.v1") && out.contains("req-b"),
        "{out}"
    );
    let event: serde_json::Value =
        serde_json::from_str(stdout(&by_entity).lines().next().context("no line")?)?;
    ensure!(
        event["data"]["n"] == 1
            && event["specversion"] == "1.0"
            && event["correlationid"] == "req-a"
    );
    Ok(())
}

/// Fails permanently while `broken` is set.
struct Fragile {
    broken: Arc<std::sync::atomic::AtomicBool>,
    handled: Arc<std::sync::atomic::AtomicUsize>,
}

impl Handler for Fragile {
    async fn handle(&self, _delivery: &Delivery) -> Result<(), HandlerError> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(HandlerError::permanent("the handler is broken"));
        }
        self.handled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_and_redriven_once_the_handler_is_fixed() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = Worker::start(
        &bus,
        WorkerConfig::new("fragile", EVENTS, vec!["events.notes.>".into()]),
        Fragile {
            broken: broken.clone(),
            handled: handled.clone(),
        },
    )
    .await?;
    let e = Envelope::event(
        "notes",
        &Noted {
            entity: "x".into(),
            n: 1,
        },
        &MessageContext::root(),
    )?;
    bus.publisher().publish(&e).await?;
    eventually(Duration::from_secs(10), || async {
        (worker.stats().snapshot().dead_lettered == 1).then_some(())
    })
    .await
    .context("not dead-lettered")?;

    let list = skein(&server, &["dlq", "list"]).await?;
    let out = stdout(&list);
    ensure!(
        out.contains("fragile")
            && out.contains("the handler is broken")
            && out.contains("events.notes.x.noted"),
        "{out}"
    );
    let show = skein(&server, &["dlq", "show", "1"]).await?;
    ensure!(
        stdout(&show).contains(&format!("ce-id: {}", e.id)),
        "{}",
        stdout(&show)
    );

    let dry = skein(&server, &["dlq", "redrive", "--dry-run"]).await?;
    ensure!(
        stdout(&dry).contains("would redrive to events.notes.x.noted"),
        "{}",
        stdout(&dry)
    );
    ensure!(
        stdout(&skein(&server, &["dlq", "list"]).await?).contains("fragile"),
        "a dry run changed the DLQ"
    );

    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    let redrive = skein(&server, &["dlq", "redrive", "--reason", "broken"]).await?;
    ensure!(
        redrive.status.success() && stdout(&redrive).contains("redriven to events.notes.x.noted"),
        "{}{}",
        stdout(&redrive),
        stderr(&redrive)
    );
    eventually(Duration::from_secs(10), || async {
        (handled.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .context("the redriven message was not handled")?;
    let after = skein(&server, &["dlq", "list"]).await?;
    ensure!(
        stderr(&after).contains("0 dead letter(s)"),
        "{}",
        stderr(&after)
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redriven_too_often_is_refused_and_purge_empties_the_dlq() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let worker = Worker::start(
        &bus,
        WorkerConfig::new("fragile", EVENTS, vec!["events.notes.>".into()]),
        Fragile {
            broken: Arc::new(true.into()),
            handled: Arc::new(0.into()),
        },
    )
    .await?;
    let e = Envelope::event(
        "notes",
        &Noted {
            entity: "x".into(),
            n: 1,
        },
        &MessageContext::root(),
    )?;
    bus.publisher().publish(&e).await?;
    // Redrive it into the still-broken handler until the limit.
    for round in 1..=2u64 {
        eventually(Duration::from_secs(10), || async {
            (worker.stats().snapshot().dead_lettered == round).then_some(())
        })
        .await
        .with_context(|| format!("not dead-lettered in round {round}"))?;
        let r = skein(&server, &["dlq", "redrive", "--max-redrives", "1"]).await?;
        if round == 1 {
            ensure!(stdout(&r).contains("redriven to"), "{}", stdout(&r));
        } else {
            ensure!(
                stdout(&r).contains("refused, already redriven 1 times"),
                "{}",
                stdout(&r)
            );
        }
    }
    let purge = skein(&server, &["dlq", "purge"]).await?;
    ensure!(
        stderr(&purge).contains("1 dead letter(s) purged"),
        "{}",
        stderr(&purge)
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_a_missing_server_get_errors_that_say_what_to_do() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let bad_time = skein(&server, &["replay", "--since", "yesterday"]).await?;
    ensure!(
        !bad_time.status.success() && stderr(&bad_time).contains("15m"),
        "{}",
        stderr(&bad_time)
    );
    let bad_stream = skein(&server, &["replay", "--stream", "NOPE"]).await?;
    ensure!(
        stderr(&bad_stream).contains("use EVENTS, COMMANDS or DLQ"),
        "{}",
        stderr(&bad_stream)
    );
    let bad_range = skein(&server, &["dlq", "list", "--seq", "9-2"]).await?;
    ensure!(
        stderr(&bad_range).contains("empty"),
        "{}",
        stderr(&bad_range)
    );
    let no_server = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["--nats-url", "nats://127.0.0.1:1", "streams", "apply"])
        .output()
        .await?;
    ensure!(
        !no_server.status.success() && stderr(&no_server).contains("NATS_URL"),
        "{}",
        stderr(&no_server)
    );
    Ok(())
}

/// Answers of every copy of `service` to a service API verb, gathered for a moment.
async fn service_replies(
    bus: &Bus,
    verb: &str,
    service: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    use futures::StreamExt;
    let client = bus.client();
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(format!("$SRV.{verb}.{service}"), inbox, "".into())
        .await?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, replies.next()).await {
        out.push(serde_json::from_slice(&m.payload)?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_share_the_consumer_group_and_stop_gracefully() -> anyhow::Result<()> {
    use skein_contracts::catalog::{AddProduct, ReserveStock, StockLine};
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let dir = tempfile::tempdir()?;
    let database_url = format!("sqlite:{}/{{service}}.db", dir.path().display());
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(["worker", "catalog"])
            .env("NATS_URL", server.url())
            .env("DATABASE_URL", &database_url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
    };
    let mut first = spawn()?;
    eventually(Duration::from_secs(20), || async {
        (service_replies(&bus, "PING", "catalog").await.ok()?.len() == 1).then_some(())
    })
    .await
    .context("the first copy never answered $SRV.PING.catalog")?;
    let admin = skein_contracts::Caller {
        user_id: uuid::Uuid::now_v7(),
        role: skein_contracts::Role::Admin,
    };
    let product = skein_service::request(
        &bus,
        &AddProduct {
            caller: admin,
            sku: "TEA".into(),
            name: "Tea".into(),
            price_cents: 100,
            stock: 1000,
        },
    )
    .await?;
    let mut second = spawn()?;
    eventually(Duration::from_secs(20), || async {
        (service_replies(&bus, "PING", "catalog").await.ok()?.len() == 2).then_some(())
    })
    .await
    .context("the second copy never joined")?;

    for _ in 0..60 {
        let reserve = ReserveStock {
            order_id: uuid::Uuid::now_v7(),
            lines: vec![StockLine {
                product_id: product.id,
                quantity: 1,
            }],
        };
        bus.publisher()
            .publish(&Envelope::command(
                "test",
                &reserve,
                &MessageContext::root(),
            )?)
            .await?;
    }
    let per_copy = eventually(Duration::from_secs(20), || async {
        let stats = service_replies(&bus, "STATS", "catalog").await.ok()?;
        let handled: Vec<u64> = stats
            .iter()
            .filter_map(|s| s["endpoints"][0]["data"]["handled"].as_u64())
            .collect();
        (handled.len() == 2 && handled.iter().sum::<u64>() == 60).then_some(handled)
    })
    .await
    .context("the 60 commands were not all handled by the two copies")?;
    ensure!(
        per_copy.iter().all(|h| *h > 0),
        "one copy got no work: {per_copy:?}"
    );
    let left = skein_service::request(
        &bus,
        &skein_contracts::catalog::GetProduct {
            product_id: product.id,
        },
    )
    .await?;
    ensure!(
        left.available == 940,
        "{} available, expected 940",
        left.available
    );

    for child in [&mut first, &mut second] {
        let pid = child.id().context("no pid")?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .context("did not stop on SIGTERM")??;
        ensure!(status.success(), "exited with {status}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuild_builds_a_read_model_from_history_and_reports_what_changed(
) -> anyhow::Result<()> {
    use skein_contracts::identity::UserRegistered;
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    for i in 0..3 {
        let user = UserRegistered {
            user_id: uuid::Uuid::now_v7(),
            email: format!("u{i}@example.org"),
            name: format!("User {i}"),
            role: skein_contracts::Role::Customer,
        };
        bus.publisher()
            .publish(&Envelope::event(
                "identity",
                &user,
                &MessageContext::root(),
            )?)
            .await?;
    }
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite:{}/{{service}}.db", dir.path().display());
    let rebuild = |format: &'static str| {
        let url = url.clone();
        let server_url = server.url();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
                .args(["replay", "--rebuild", "users", "--format", format])
                .env("NATS_URL", server_url)
                .env("DATABASE_URL", url)
                .output()
                .await
        }
    };
    let first = rebuild("table").await?;
    let out = stdout(&first);
    ensure!(first.status.success(), "{}", stderr(&first));
    ensure!(
        out.contains("from 3 event(s)") && out.contains("changed") && out.contains("0 -> 3 rows"),
        "{out}"
    );
    let second = rebuild("json").await?;
    let report: serde_json::Value = serde_json::from_str(stdout(&second).trim())?;
    ensure!(report["changed"] == false, "{report}");
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["replay", "--rebuild", "everything"])
        .env("NATS_URL", server.url())
        .env("DATABASE_URL", &url)
        .output()
        .await?;
    ensure!(
        !bad.status.success() && stderr(&bad).contains("users, orders, timeline, all"),
        "{}",
        stderr(&bad)
    );
    Ok(())
}
