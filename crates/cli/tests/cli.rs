//! The `skein` binary against a real nats-server.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde::{Deserialize, Serialize};
use skein_bus::provision::{apply_builtin_streams, EVENTS};
use skein_bus::{Bus, BusConfig, Delivery, Handler, HandlerError, Worker, WorkerConfig};
use skein_message::{Contract, Envelope, Event, MessageContext};
use skein_testkit::{eventually, free_port, tls_dir, NatsServer, Secured};

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
    // The three streams, then every worker's consumers as it binds them.
    let created: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_suffix("created"))
        .map(str::trim)
        .collect();
    ensure!(
        created
            == [
                "EVENTS",
                "COMMANDS",
                "DLQ",
                "COMMANDS/catalog",
                "EVENTS/orders",
                "COMMANDS/orders",
                "EVENTS/payments",
                "COMMANDS/payments",
                "EVENTS/projector",
                "EVENTS/orchestrator",
            ],
        "{out}"
    );
    // (That they equal what the live workers bind, so that a worker
    // without permission to change them starts, the load test of services
    // under their own NATS users shows.)
    let second = skein(&server, &["streams", "apply"]).await?;
    ensure!(
        stdout(&second).matches("unchanged").count() == 10,
        "{}",
        stdout(&second)
    );
    let other = NatsServer::start().await?;
    let only = skein(&other, &["streams", "apply", "--streams-only"]).await?;
    ensure!(
        stdout(&only).matches("created").count() == 3 && !stdout(&only).contains('/'),
        "{}",
        stdout(&only)
    );
    // Some workers' consumers only.
    let some = skein(
        &other,
        &["streams", "apply", "--workers", "catalog,projector"],
    )
    .await?;
    let some = stdout(&some);
    let created: Vec<&str> = some
        .lines()
        .filter_map(|l| l.strip_suffix("created"))
        .map(str::trim)
        .collect();
    ensure!(
        created == ["COMMANDS/catalog", "EVENTS/projector"],
        "{some}"
    );
    Ok(())
}

/// An inbox retention too short to create a lost consumer by is refused
/// before anything is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_apply_refuses_a_bad_inbox_retention_and_changes_nothing() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let apply = |args: &'static [&'static str], retention: Option<&'static str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"));
        command
            .args(["streams", "apply"])
            .args(args)
            .env("NATS_URL", server.url());
        match retention {
            Some(value) => command.env("SKEIN_INBOX_RETENTION", value),
            None => command.env_remove("SKEIN_INBOX_RETENTION"),
        };
        async move { command.output().await.context("cannot run skein") }
    };
    let refused: [(&'static [&'static str], _, _); 4] = [
        (&["--inbox-retention", "10m"], None, "give at least 1h"),
        (&["--inbox-retention", "soon"], None, "is not a duration"),
        (&[], Some("10m"), "give at least 1h"),
        // The flag before the workers' variable.
        (&["--inbox-retention", "0h"], Some("2h"), "give at least 1h"),
    ];
    for (args, variable, says) in refused {
        let out = apply(args, variable).await?;
        ensure!(
            !out.status.success(),
            "{args:?} {variable:?}: {}",
            stdout(&out)
        );
        ensure!(
            stderr(&out).contains(says),
            "{args:?} {variable:?}: {}",
            stderr(&out)
        );
        ensure!(stdout(&out).is_empty(), "{}", stdout(&out));
    }
    let bus = Bus::connect(&BusConfig::new(server.url(), "cli-test")).await?;
    ensure!(
        bus.jetstream().get_stream(EVENTS).await.is_err(),
        "a refused apply created the streams"
    );
    // The streams alone take no retention, whatever the environment says;
    // the workers' variable is read as they read it.
    let out = apply(&["--streams-only"], Some("10m")).await?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let out = apply(&[], Some(" 2h ")).await?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let out = apply(&["--from-beginning"], Some("10m")).await?;
    ensure!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

/// The variables of NATS credentials and TLS.
const NATS_SECURITY: [&str; 6] = [
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_CA",
    "NATS_CERT",
    "NATS_KEY",
];

/// Every skein process takes NATS credentials and TLS from the environment
/// (`NATS_USER`, `NATS_PASSWORD`, `NATS_CA`, `NATS_CERT`, `NATS_KEY`):
/// refused without them, with a message naming what to set; a worker runs
/// with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_reach_a_secured_nats_with_the_environment_s_credentials() -> anyhow::Result<()>
{
    let server = NatsServer::start_secured(Secured {
        user_password: Some(("ops".into(), "a long secret".into())),
        verify_clients: true,
        ..Secured::default()
    })
    .await?;
    let dir = tls_dir();
    let file = |name: &str| dir.join(name).display().to_string();
    let secured = [
        ("NATS_USER", "ops".to_owned()),
        ("NATS_PASSWORD", "a long secret".to_owned()),
        ("NATS_CA", file("ca.pem")),
        ("NATS_CERT", file("client.pem")),
        ("NATS_KEY", file("client-key.pem")),
    ];
    let run = |env: Vec<(&'static str, String)>, args: &'static [&'static str]| {
        let url = server.url();
        async move {
            let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"));
            // Only what each case gives: none inherited from the caller.
            for name in NATS_SECURITY {
                command.env_remove(name);
            }
            command
                .args(args)
                .env("NATS_URL", url)
                .envs(env)
                .output()
                .await
                .context("cannot run skein")
        }
    };
    for (env, says) in [
        (vec![], "NATS_CA"),
        (secured[2..].to_vec(), "NATS_USER"),
        (
            secured[..1].to_vec(),
            "set both NATS_USER and NATS_PASSWORD",
        ),
    ] {
        let out = run(env, &["streams", "apply"]).await?;
        ensure!(
            !out.status.success() && stderr(&out).contains(says),
            "expected a refusal naming {says}: {}",
            stderr(&out)
        );
        ensure!(!stderr(&out).contains("a long secret"), "{}", stderr(&out));
    }
    let out = run(secured.to_vec(), &["streams", "apply"]).await?;
    ensure!(
        out.status.success() && stdout(&out).matches("created").count() == 10,
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // The same as flags.
    let out = run(
        secured[2..].to_vec(),
        &[
            "--nats-user",
            "ops",
            "--nats-password",
            "a long secret",
            "streams",
            "apply",
        ],
    )
    .await?;
    ensure!(
        out.status.success() && stdout(&out).matches("unchanged").count() == 10,
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // And --help never shows the password of the environment.
    let help = run(secured.to_vec(), &["streams", "--help"]).await?;
    ensure!(
        !stdout(&help).contains("a long secret") && stdout(&help).contains("NATS_PASSWORD"),
        "{}",
        stdout(&help)
    );

    // A worker, the same way.
    let data = tempfile::tempdir()?;
    let port = free_port()?;
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args([
            "worker",
            "catalog",
            "--health-http",
            &format!("127.0.0.1:{port}"),
        ])
        .env("NATS_URL", server.url())
        .env(
            "DATABASE_URL",
            format!("sqlite:{}/{{service}}.db", data.path().display()),
        )
        .env_remove("NATS_TOKEN")
        .envs(secured.clone())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    eventually(Duration::from_secs(30), || async {
        http(port, "GET", "/health/ready", None, &[], None)
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .context("a worker with the credentials never became ready")?;
    let status = terminate(&mut worker, Duration::from_secs(15)).await?;
    ensure!(status.success(), "exited with {status}");
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
    // The first matching ones, and a word that more match; none when
    // exactly that many do.
    let limited = skein(
        &server,
        &[
            "replay", "--entity", "e1", "--limit", "1", "--format", "json",
        ],
    )
    .await?;
    ensure!(
        json_ids(&limited)? == vec![ids[0].clone()]
            && stderr(&limited).contains("(stopped at --limit 1)"),
        "{}{}",
        stdout(&limited),
        stderr(&limited)
    );
    let all_of_them = skein(
        &server,
        &[
            "replay", "--entity", "e1", "--limit", "2", "--format", "json",
        ],
    )
    .await?;
    ensure!(
        json_ids(&all_of_them)?.len() == 2 && !stderr(&all_of_them).contains("stopped at"),
        "{}",
        stderr(&all_of_them)
    );
    // An entity id that is not one subject token is refused, not turned
    // into a wider or broken filter.
    for bad in ["*", ">", "e1.x", "e 1"] {
        let refused = skein(&server, &["replay", "--entity", bad]).await?;
        ensure!(
            refused.status.code() == Some(2) && stderr(&refused).contains("an entity id"),
            "{bad}: {}",
            stderr(&refused)
        );
    }
    // A worker's setting in the operator's environment (for `--into`)
    // does not get in the way of other replays.
    let with_worker_env = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["replay", "--entity", "e1", "--format", "json"])
        .env("NATS_URL", server.url())
        .env("SKEIN_INBOX_RETENTION", "7d")
        .output()
        .await?;
    ensure!(
        with_worker_env.status.success() && json_ids(&with_worker_env)?.len() == 2,
        "{}",
        stderr(&with_worker_env)
    );
    // --since still filters when --seq says where to start reading.
    let seq_and_since = skein(
        &server,
        &[
            "replay",
            "--seq",
            "1-",
            "--since",
            "2099-01-01T00:00:00Z",
            "--format",
            "json",
        ],
    )
    .await?;
    ensure!(
        json_ids(&seq_and_since)?.is_empty(),
        "{}",
        stdout(&seq_and_since)
    );
    let backwards = skein(&server, &["replay", "--since", "1h", "--until", "2h"]).await?;
    ensure!(
        !backwards.status.success() && stderr(&backwards).contains("--until is before --since"),
        "{}",
        stderr(&backwards)
    );
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

/// A worker `name` on the notes events that fails while `broken` is set,
/// and how many it handled.
async fn fragile(
    bus: &Bus,
    name: &str,
    broken: &Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<(
    skein_bus::RunningWorker,
    Arc<std::sync::atomic::AtomicUsize>,
)> {
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = Worker::start(
        bus,
        WorkerConfig::new(name, EVENTS, vec!["events.notes.>".into()]),
        Fragile {
            broken: broken.clone(),
            handled: handled.clone(),
        },
    )
    .await?;
    Ok((worker, handled))
}

/// How many messages `stream` holds.
async fn stored_in(bus: &Bus, stream: &str) -> anyhow::Result<u64> {
    Ok(bus
        .jetstream()
        .get_stream(stream)
        .await?
        .info()
        .await?
        .state
        .messages)
}

/// A note about `entity`, as the notes service would announce it.
fn noted(entity: &str) -> anyhow::Result<Envelope> {
    Ok(Envelope::event(
        "notes",
        &Noted {
            entity: entity.into(),
            n: 1,
        },
        &MessageContext::root(),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_and_redriven_once_the_handler_is_fixed() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (worker, handled) = fragile(&bus, "fragile", &broken).await?;
    // Another consumer of the same events, which handles them.
    let steady_handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let steady = Worker::start(
        &bus,
        WorkerConfig::new("steady", EVENTS, vec!["events.notes.>".into()]),
        Fragile {
            broken: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            handled: steady_handled.clone(),
        },
    )
    .await?;
    let e = noted("x")?;
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
    // The copy reached the other consumer too, which had the original: it
    // passes the copy over.
    eventually(Duration::from_secs(10), || async {
        let mut consumer = bus
            .jetstream()
            .get_stream(EVENTS)
            .await
            .ok()?
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("steady")
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.delivered.stream_sequence == 2 && info.num_ack_pending == 0).then_some(())
    })
    .await
    .context("the other consumer did not take the redriven copy")?;
    let steady_count = steady_handled.load(std::sync::atomic::Ordering::SeqCst);
    ensure!(
        steady_count == 1,
        "the other consumer handled the event {steady_count} times"
    );
    steady.shutdown().await;
    let after = skein(&server, &["dlq", "list"]).await?;
    ensure!(
        stderr(&after).contains("0 dead letter(s)"),
        "{}",
        stderr(&after)
    );
    worker.shutdown().await;
    Ok(())
}

/// One message two consumers gave up on: a redrive publishes a copy for
/// each (the second is not taken for a repeat of the first and dropped), and
/// each consumer handles its own copy once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_two_consumers_gave_up_on_is_redriven_to_each() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut workers = Vec::new();
    for name in ["fragile-a", "fragile-b"] {
        let (worker, handled) = fragile(&bus, name, &broken).await?;
        workers.push((name, worker, handled));
    }
    let e = noted("x")?;
    bus.publisher().publish(&e).await?;
    eventually(Duration::from_secs(10), || async {
        workers
            .iter()
            .all(|(_, w, _)| w.stats().snapshot().dead_lettered == 1)
            .then_some(())
    })
    .await
    .context("not dead-lettered by both")?;

    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    let redrive = skein(&server, &["dlq", "redrive"]).await?;
    let out = stdout(&redrive);
    ensure!(
        redrive.status.success()
            && out.matches("redriven to events.notes.x.noted").count() == 2
            && !out.contains("already has this redrive"),
        "{out}{}",
        stderr(&redrive)
    );
    for (name, _, handled) in &workers {
        eventually(Duration::from_secs(10), || async {
            (handled.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
        })
        .await
        .with_context(|| format!("{name} did not handle its copy"))?;
    }
    let stored = stored_in(&bus, EVENTS).await?;
    ensure!(stored == 3, "{stored} messages in EVENTS");
    // Each handled its copy and passed the other's over: once each, in all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, worker, handled) in workers {
        let n = handled.load(std::sync::atomic::Ordering::SeqCst);
        ensure!(n == 1, "{name} handled it {n} times");
        worker.shutdown().await;
    }
    Ok(())
}

/// A paced redrive works from the DLQ as it read it at the start: a dead
/// letter purged meanwhile is not published (the audit has its purge
/// record), and the run goes on instead of failing on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_purged_during_a_paced_redrive_is_not_redriven() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (worker, handled) = fragile(&bus, "fragile", &broken).await?;
    for entity in ["x", "y", "z"] {
        let e = noted(entity)?;
        bus.publisher().publish(&e).await?;
    }
    eventually(Duration::from_secs(10), || async {
        (worker.stats().snapshot().dead_lettered == 3).then_some(())
    })
    .await
    .context("not dead-lettered")?;
    broken.store(false, std::sync::atomic::Ordering::SeqCst);

    // One every 2 s: #3 comes 4 s after #1.
    let mut redrive = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["dlq", "redrive", "--rate", "0.5"])
        .env("NATS_URL", server.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(redrive.stdout.take().context("no stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("the redrive printed nothing")??
        .unwrap_or_default();
    ensure!(first.starts_with("#1: redriven to"), "{first}");
    let purge = skein(&server, &["dlq", "purge", "--seq", "3"]).await?;
    ensure!(purge.status.success(), "{}", stderr(&purge));
    let mut rest = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("the redrive did not finish")??
    {
        rest.push(line);
    }
    let status = redrive.wait().await?;
    let mut summary = String::new();
    if let Some(mut err) = redrive.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut err, &mut summary).await?;
    }
    ensure!(
        status.success()
            && rest.len() == 2
            && rest[0].starts_with("#2: redriven to")
            && rest[1].starts_with("#3: gone from the DLQ meanwhile")
            && summary.contains("2 redriven, 0 not, 1 gone meanwhile"),
        "{rest:?} {summary}"
    );
    eventually(Duration::from_secs(10), || async {
        (handled.load(std::sync::atomic::Ordering::SeqCst) == 2).then_some(())
    })
    .await
    .context("the two redriven were not handled")?;
    let stored = stored_in(&bus, EVENTS).await?;
    ensure!(
        stored == 5,
        "{stored} messages in EVENTS: the purged one was redriven"
    );
    worker.shutdown().await;
    Ok(())
}

/// An order with no event yet (orders is down: its place_order waits in
/// COMMANDS) is traced by its id: the queued command shows, as does a
/// command about it dead-lettered under another correlation id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_commands_wait_or_were_dead_lettered_is_traced() -> anyhow::Result<()> {
    use skein_contracts::catalog::StockLine;
    use skein_contracts::orders::{CancelOrder, PlaceOrder};
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let (order_id, customer) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let place = Envelope::command(
        "ingress",
        &PlaceOrder {
            order_id,
            customer_id: customer,
            lines: vec![StockLine {
                product_id: uuid::Uuid::now_v7(),
                quantity: 1,
            }],
        },
        &MessageContext::with_correlation("req-place"),
    )?;
    bus.publisher().publish(&place).await?;
    let cancel = Envelope::command(
        "ingress",
        &CancelOrder {
            order_id,
            caller: skein_contracts::Caller {
                user_id: customer,
                role: skein_contracts::Role::Customer,
            },
        },
        &MessageContext::with_correlation("req-cancel"),
    )?;
    let outgoing = skein_bus::Outgoing::from(&cancel);
    skein_bus::dlq::publish_dead_letter(
        &bus.publisher(),
        Some(&outgoing.headers),
        outgoing.payload.clone(),
        &skein_bus::dlq::DeadLetterInfo {
            reason: "cancel_order: no order".into(),
            handler: "orders".into(),
            deliveries: 3,
            stream: "COMMANDS".into(),
            stream_sequence: 2,
            subject: outgoing.subject.clone(),
        },
    )
    .await?;
    let order_text = order_id.to_string();
    let trace = skein(&server, &["trace", &order_text]).await?;
    let out = stdout(&trace);
    ensure!(
        trace.status.success()
            && out.contains("orders.place_order.v1  (waiting in COMMANDS)")
            && out
                .contains("orders.cancel_order.v1  !! dead-lettered by orders after 3 deliveries"),
        "{out}{}",
        stderr(&trace)
    );
    // A request's events, by its correlation id (read from all of EVENTS).
    for (n, correlation) in [(1, "req-other"), (2, "req-note"), (3, "req-other")] {
        let noted = Envelope::event(
            "notes",
            &Noted {
                entity: format!("n{n}"),
                n,
            },
            &MessageContext::with_correlation(correlation),
        )?;
        bus.publisher().publish(&noted).await?;
    }
    let by_request = skein(&server, &["trace", "req-note", "--format", "json"]).await?;
    let hops: Vec<serde_json::Value> = stdout(&by_request)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        hops.len() == 1 && hops[0]["entity"] == "n2" && hops[0]["type"] == "notes.noted.v1",
        "{hops:?}"
    );
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
    let e = noted("x")?;
    bus.publisher().publish(&e).await?;
    // Redrive it into the still-broken handler until the limit.
    // A rate a pause cannot be made of is refused, not a panic.
    for rate in ["1e-20", "0", "NaN"] {
        let r = skein(&server, &["dlq", "redrive", "--rate", rate]).await?;
        ensure!(
            !r.status.success() && stderr(&r).contains("--rate takes messages per second"),
            "--rate {rate}: {}",
            stderr(&r)
        );
    }
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
    // Dead letters whose headers claim an origin their consumer does not
    // take, or another consumer than their DLQ subject: a worker writes
    // its dead letters' headers itself, so a redrive would publish a
    // forged command as the operator. Refused.
    let forge = |dlq_subject: &'static str, handler: &'static str, origin: &'static str| {
        let bus = bus.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            for (name, value) in [
                (skein_bus::dlq::headers::REASON, "forged"),
                (skein_bus::dlq::headers::HANDLER, handler),
                (skein_bus::dlq::headers::DELIVERIES, "1"),
                (skein_bus::dlq::headers::STREAM, "EVENTS"),
                (skein_bus::dlq::headers::STREAM_SEQ, "1"),
                (skein_bus::dlq::headers::SUBJECT, origin),
            ] {
                headers.insert(name, value);
            }
            let ack = bus
                .jetstream()
                .publish_with_headers(dlq_subject, headers, "{}".into())
                .await?
                .await?;
            anyhow::Ok(ack.sequence)
        }
    };
    forge(
        "dlq.EVENTS.fragile",
        "fragile",
        "commands.orders.confirm_order",
    )
    .await?;
    forge("dlq.EVENTS.fragile", "orders", "events.notes.x.noted").await?;
    let r = skein(&server, &["dlq", "redrive", "--max-redrives", "1"]).await?;
    ensure!(
        stdout(&r).contains(
            "refused, its origin commands.orders.confirm_order is not what fragile takes from EVENTS (events.notes.>)"
        ) && stdout(&r).contains(
            "refused, it was dead-lettered on dlq.EVENTS.fragile but its headers name dlq.EVENTS.orders"
        ) && !stdout(&r).contains("redriven to"),
        "{}",
        stdout(&r)
    );
    let commands = bus
        .jetstream()
        .get_stream("COMMANDS")
        .await?
        .info()
        .await?
        .state
        .messages;
    ensure!(commands == 0, "{commands} message(s) reached COMMANDS");
    // Purge: a range, then the rest, each leaving a record of its headers
    // (not its payload, nor the size a headers-only read adds).
    let mut forged = Vec::new();
    for _ in 0..200 {
        forged.push(forge("dlq.EVENTS.fragile", "fragile", "events.notes.x.noted").await?);
    }
    let range = format!("{}-{}", forged[50], forged[99]);
    let purge = skein(&server, &["dlq", "purge", "--seq", &range]).await?;
    ensure!(
        stderr(&purge).contains("50 dead letter(s) purged"),
        "{}",
        stderr(&purge)
    );
    let left = skein_bus::replay::read_headers(
        &bus,
        "DLQ",
        skein_bus::dlq::DEAD_LETTERS,
        skein_bus::replay::StartAt::Beginning,
    )
    .await?;
    ensure!(
        left.len() == 153
            && left
                .iter()
                .all(|m| !(forged[50]..=forged[99]).contains(&m.sequence)),
        "{} dead letters left after purging {range}",
        left.len()
    );
    let purge = skein(&server, &["dlq", "purge"]).await?;
    ensure!(
        stderr(&purge).contains("153 dead letter(s) purged"),
        "{}",
        stderr(&purge)
    );
    let start = skein_bus::replay::StartAt::Beginning;
    ensure!(
        skein_bus::replay::read_headers(&bus, "DLQ", skein_bus::dlq::DEAD_LETTERS, start)
            .await?
            .is_empty(),
        "dead letters left after the purge"
    );
    let records = skein_bus::replay::read(&bus, "DLQ", "dlq.purged.>", start).await?;
    ensure!(records.len() == 203, "{} purge records", records.len());
    for record in &records {
        let headers = record
            .headers
            .as_ref()
            .context("a record without headers")?;
        ensure!(
            headers.get(skein_bus::dlq::headers::REASON).is_some()
                && headers.get(skein_bus::dlq::headers::PURGED).is_some()
                && headers.get("Nats-Msg-Size").is_none()
                && record.payload.is_empty(),
            "purge record #{}: {headers:?}",
            record.sequence
        );
    }
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

/// `--outbox-retention` and `--inbox-retention` reach the relay and
/// `--saga-retention` the orchestrator: rows and sagas that ended older
/// than they say go as soon as the worker starts, younger ones stay. A
/// retention that would make the inbox forget too soon, or one that is not
/// a duration, is refused before anything is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_outbox_inbox_and_saga_rows_as_long_as_it_is_told() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let database_url = format!("sqlite:{}/{{service}}.db", dir.path().display());
    for (flags, says) in [
        (&["--inbox-retention", "30m"][..], "30m is too short"),
        (&["--outbox-retention", "a week"][..], "--outbox-retention"),
        (&["--saga-retention", "forever"][..], "--saga-retention"),
    ] {
        let mut args = vec!["worker", "catalog", "--database-url", database_url.as_str()];
        args.extend_from_slice(flags);
        let refused = skein(&server, &args).await?;
        ensure!(
            !refused.status.success() && stderr(&refused).contains(says),
            "{flags:?}: {}",
            stderr(&refused)
        );
    }
    ensure!(
        std::fs::read_dir(dir.path())?.next().is_none(),
        "a refused start left files behind"
    );

    let store =
        skein_outbox::Store::connect(&database_url.replace("{service}", skein_catalog::NAME))
            .await?;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros(),
    )?;
    let hour = 3_600_000_000_i64;
    for (id, age) in [("old", 2 * hour), ("young", hour / 2)] {
        sqlx::query(
            "INSERT INTO skein_outbox (id, subject, headers, payload, created_at, published_at) \
             VALUES ($1, 'events.catalog.test.kept', '[]', x'', $2, $2)",
        )
        .bind(id)
        .bind(now - age)
        .execute(store.pool())
        .await?;
        sqlx::query(
            "INSERT INTO skein_inbox (handler, message_id, processed_at) VALUES ('catalog', $1, $2)",
        )
        .bind(id)
        .bind(now - age)
        .execute(store.pool())
        .await?;
    }
    // Sagas that ended, one older than an hour, one younger (the keys say
    // which).
    let sagas =
        skein_outbox::Store::connect(&database_url.replace("{service}", skein_orchestrator::NAME))
            .await?;
    sagas.migrate("saga", skein_saga::MIGRATIONS).await?;
    for (key, age) in [("old", 2 * hour), ("young", hour / 2)] {
        let at = now - age;
        let id = uuid::Builder::from_unix_timestamp_millis(u64::try_from(at / 1000)?, &[0; 10])
            .into_uuid();
        sqlx::query(
            "INSERT INTO saga_instances (id, saga, saga_key, status, step, attempt, compensations, \
             finish, data, reason, correlation_id, deadline_at, version, created_at, updated_at) \
             VALUES ($1, 'place_order', $2, 'completed', 3, 1, '[]', 'failure', '{}', NULL, 'c', NULL, 4, $3, $3)",
        )
        .bind(id.to_string())
        .bind(key)
        .bind(at)
        .execute(sagas.pool())
        .await?;
    }
    let kept = || async {
        let outbox: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM skein_outbox WHERE id IN ('old', 'young') ORDER BY id",
        )
        .fetch_all(store.pool())
        .await?;
        let inbox: Vec<String> = sqlx::query_scalar(
            "SELECT message_id FROM skein_inbox WHERE message_id IN ('old', 'young') ORDER BY message_id",
        )
        .fetch_all(store.pool())
        .await?;
        let sagas: Vec<String> =
            sqlx::query_scalar("SELECT saga_key FROM saga_instances ORDER BY saga_key")
                .fetch_all(sagas.pool())
                .await?;
        anyhow::Ok((outbox, inbox, sagas))
    };

    let mut child = spawn_worker(
        &server,
        &database_url,
        &[
            "catalog",
            "orchestrator",
            "--outbox-retention",
            "1h",
            "--inbox-retention",
            "1h",
            "--saga-retention",
            "1h",
        ],
    )?;
    let bus = bus(&server).await?;
    eventually(Duration::from_secs(20), || async {
        (service_replies(&bus, "PING", "catalog").await.ok()?.len() == 1).then_some(())
    })
    .await
    .context("the worker never answered $SRV.PING.catalog")?;
    let young = vec!["young".to_owned()];
    let only_young = (young.clone(), young.clone(), young);
    eventually(Duration::from_secs(20), || async {
        (kept().await.ok()? == only_young).then_some(())
    })
    .await
    .context("the rows older than an hour were not deleted (or younger ones were)")?;
    let status = terminate(&mut child, Duration::from_secs(15)).await?;
    ensure!(status.success(), "exited with {status}");
    ensure!(kept().await? == only_young, "a young row went");
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
    let spawn = || spawn_worker(&server, &database_url, &["catalog"]);
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
            product_id: None,
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
        let status = terminate(child, Duration::from_secs(15)).await?;
        ensure!(status.success(), "exited with {status}");
    }
    Ok(())
}

/// `skein worker ARGS` on `server` and the databases of `database_url`,
/// its errors kept.
fn spawn_worker(
    server: &NatsServer,
    database_url: &str,
    args: &[&str],
) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .arg("worker")
        .args(args)
        .env("NATS_URL", server.url())
        .env("DATABASE_URL", database_url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// Sends `child` SIGTERM.
async fn sigterm(child: &tokio::process::Child) -> anyhow::Result<()> {
    let pid = child.id().context("already exited")?;
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    ensure!(sent.success(), "kill -TERM {pid}: {sent}");
    Ok(())
}

/// Sends `child` SIGTERM and waits up to `within` for its exit status.
async fn terminate(
    child: &mut tokio::process::Child,
    within: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    sigterm(child).await?;
    tokio::time::timeout(within, child.wait())
        .await
        .context("did not stop on SIGTERM")?
        .context("cannot wait for it")
}

/// A `skein ingress` (its stderr kept) whose catalog takes queries and
/// never answers, with a request to the catalog in flight through it
/// (answered once the ingress gives up after `query_timeout_ms`).
struct IngressInFlight {
    ingress: tokio::process::Child,
    request: tokio::task::JoinHandle<anyhow::Result<(u16, serde_json::Value)>>,
    _server: NatsServer,
    _catalog: async_nats::Subscriber,
}

async fn ingress_with_a_request_in_flight(
    query_timeout_ms: u32,
) -> anyhow::Result<IngressInFlight> {
    let server = NatsServer::start().await?;
    let _streams = bus(&server).await?;
    let client = async_nats::connect(server.url()).await?;
    let mut catalog = client
        .queue_subscribe("queries.catalog.>", "catalog".into())
        .await?;
    client.flush().await?;
    let port = free_port()?;
    let ingress = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args([
            "ingress",
            "--http",
            &format!("127.0.0.1:{port}"),
            "--query-timeout-ms",
            &query_timeout_ms.to_string(),
        ])
        .env("NATS_URL", server.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    eventually(Duration::from_secs(30), || async {
        http(port, "GET", "/health/live", None, &[], None)
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .context("the ingress never became live")?;
    let request =
        tokio::spawn(async move { http(port, "GET", "/v1/products", None, &[], None).await });
    // In flight once the catalog has the query.
    tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut catalog),
    )
    .await
    .context("the query never reached the catalog")?;
    Ok(IngressInFlight {
        ingress,
        request,
        _server: server,
        _catalog: catalog,
    })
}

/// `skein ingress` stopped by SIGTERM finishes the requests in flight: a
/// query waiting for its service gets its answer (here the timeout's 504)
/// before the process exits, cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_finishes_the_requests_in_flight_on_sigterm() -> anyhow::Result<()> {
    // Bound whole: its server and catalog live as long as the test.
    let mut setup = ingress_with_a_request_in_flight(1500).await?;
    let (ingress, in_flight) = (&mut setup.ingress, &mut setup.request);
    let status = terminate(ingress, Duration::from_secs(15)).await?;
    let (code, body) = in_flight
        .await?
        .context("the request in flight got no answer")?;
    ensure!(code == 504, "{code} {body}");
    ensure!(status.success(), "exited with {status}");
    Ok(())
}

/// A worker stopping gracefully waits for the message in flight; a second
/// SIGTERM stops it at once, saying so, where it used to be swallowed and
/// the process waited on (here the projector, waiting up to 10 minutes for
/// a SQLite write lock held elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_a_worker_whose_message_cannot_finish() -> anyhow::Result<()> {
    use skein_contracts::identity::UserRegistered;
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let dir = tempfile::tempdir()?;
    let database_url = format!("sqlite:{}/{{service}}.db", dir.path().display());
    let port = free_port()?;
    let mut worker = spawn_worker(
        &server,
        &database_url,
        &["projector", "--health-http", &format!("127.0.0.1:{port}")],
    )?;
    eventually(Duration::from_secs(30), || async {
        http(port, "GET", "/health/ready", None, &[], None)
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .context("the projector never became ready")?;

    // Another process's write lock on the projector's database.
    let mut lock = write_lock(&dir.path().join("projector.db")).await?;
    let registered = Envelope::event(
        "identity",
        &UserRegistered {
            user_id: uuid::Uuid::now_v7(),
            email: "waiting@example.org".into(),
            name: "Waiting".into(),
            role: skein_contracts::Role::Customer,
        },
        &MessageContext::root(),
    )?;
    bus.publisher().publish(&registered).await?;
    eventually(Duration::from_secs(10), || async {
        let mut consumer = bus
            .jetstream()
            .get_stream(EVENTS)
            .await
            .ok()?
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("projector")
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_ack_pending == 1).then_some(())
    })
    .await
    .context("the projector did not take the event")?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    sigterm(&worker).await?;
    ensure!(
        tokio::time::timeout(Duration::from_secs(3), worker.wait())
            .await
            .is_err(),
        "the first SIGTERM did not wait for the message in flight"
    );
    sigterm(&worker).await?;
    let status = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .context("a second SIGTERM did not stop the worker")??;
    let said = said(&mut worker).await?;
    ensure!(!status.success(), "exited with {status}: {said}");
    ensure!(
        said.contains("Ctrl-C or SIGTERM now stops at once") && said.contains("stopped at once"),
        "{said}"
    );
    sqlx::query("ROLLBACK").execute(&mut lock).await?;
    Ok(())
}

/// A connection holding the write lock of the SQLite database at `path`
/// (made if missing, in WAL mode as the workers keep it), as another
/// process would: `ROLLBACK` on it lets go.
async fn write_lock(path: &std::path::Path) -> anyhow::Result<sqlx::SqliteConnection> {
    use sqlx::Connection;
    let mut lock =
        sqlx::SqliteConnection::connect(&format!("sqlite:{}?mode=rwc", path.display())).await?;
    sqlx::query("PRAGMA journal_mode = WAL")
        .execute(&mut lock)
        .await?;
    sqlx::query("BEGIN IMMEDIATE").execute(&mut lock).await?;
    Ok(lock)
}

/// What `child` (its stderr piped) said on stderr, once it has exited.
async fn said(child: &mut tokio::process::Child) -> anyhow::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut said = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut said).await?;
    }
    Ok(said)
}

/// A second SIGTERM stops the ingress at once while a request in flight
/// still waits for its service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_the_ingress_without_waiting_for_its_requests() -> anyhow::Result<()>
{
    let mut setup = ingress_with_a_request_in_flight(60_000).await?;
    let ingress = &mut setup.ingress;
    sigterm(ingress).await?;
    ensure!(
        tokio::time::timeout(Duration::from_secs(2), ingress.wait())
            .await
            .is_err(),
        "the first SIGTERM did not wait for the request in flight"
    );
    sigterm(ingress).await?;
    let status = tokio::time::timeout(Duration::from_secs(10), ingress.wait())
        .await
        .context("a second SIGTERM did not stop the ingress")??;
    let said = said(ingress).await?;
    ensure!(
        !status.success() && said.contains("stopped at once"),
        "exited with {status}: {said}"
    );
    Ok(())
}

/// While a worker starts (here its migrations wait for another process's
/// lock on its database), its health endpoint answers already: live, not
/// ready, both saying `starting`; ready once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_worker_answers_live_and_not_ready() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let mut lock = write_lock(&dir.path().join("projector.db")).await?;
    let database_url = format!("sqlite:{}/{{service}}.db", dir.path().display());
    let port = free_port()?;
    let mut worker = spawn_worker(
        &server,
        &database_url,
        &["projector", "--health-http", &format!("127.0.0.1:{port}")],
    )?;
    let get = |path: &'static str| http(port, "GET", path, None, &[], None);
    let (code, live) = eventually(Duration::from_secs(30), || async {
        get("/health/live").await.ok()
    })
    .await
    .context("the starting worker's health endpoint never answered")?;
    ensure!(
        code == 200 && live["status"] == "starting",
        "live: {code} {live}"
    );
    let (code, ready) = get("/health/ready").await?;
    ensure!(
        code == 503 && ready["failing"] == serde_json::json!(["starting"]),
        "ready: {code} {ready}"
    );
    sqlx::query("ROLLBACK").execute(&mut lock).await?;
    eventually(Duration::from_secs(30), || async {
        get("/health/ready")
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .context("the worker never became ready")?;
    let status = terminate(&mut worker, Duration::from_secs(15)).await?;
    ensure!(status.success(), "exited with {status}");
    Ok(())
}

/// `skein worker --health-http`: live and ready while all is well; not
/// ready (and still live) while NATS is away, ready again once it is back;
/// a taken address refused at start; SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_s_health_endpoint_says_live_ready_and_what_fails() -> anyhow::Result<()> {
    let mut server = NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let database_url = format!("sqlite:{}/{{service}}.db", dir.path().display());
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let spawn = || {
        spawn_worker(
            &server,
            &database_url,
            &["catalog", "orders", "--health-http", &addr],
        )
    };
    let mut worker = spawn()?;
    let get = |path: &'static str| http(port, "GET", path, None, &[], None);
    let ready = eventually(Duration::from_secs(30), || async {
        get("/health/ready")
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .context("the worker never answered 200 on /health/ready")?
    .1;
    ensure!(ready["status"] == "ok", "ready: {ready}");
    ensure!(ready["nats"] == true, "ready: {ready}");
    for name in ["catalog", "orders"] {
        ensure!(
            ready["workers"][name]["database"] == true,
            "{name} not in {ready}"
        );
    }
    let (code, live) = get("/health/live").await?;
    ensure!(code == 200 && live["status"] == "ok", "live: {code} {live}");

    // A second copy asking for the same address is refused at once.
    let taken = spawn()?.wait_with_output().await?;
    ensure!(
        !taken.status.success(),
        "a second copy took the same address"
    );
    ensure!(
        stderr(&taken).contains("--health-http"),
        "the error does not name the flag: {}",
        stderr(&taken)
    );

    server.kill();
    let (_, away) = eventually(Duration::from_secs(10), || async {
        get("/health/ready")
            .await
            .ok()
            .filter(|(code, _)| *code == 503)
    })
    .await
    .context("still ready with NATS gone")?;
    ensure!(
        away["failing"]
            .as_array()
            .is_some_and(|f| f.iter().any(|r| r == "not connected to NATS")),
        "not ready for another reason: {away}"
    );
    let (code, live) = get("/health/live").await?;
    ensure!(code == 200, "not live with NATS away: {live}");
    server.start_again().await?;
    eventually(Duration::from_secs(20), || async {
        get("/health/ready")
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .context("not ready again after NATS came back")?;

    let status = terminate(&mut worker, Duration::from_secs(15)).await?;
    ensure!(status.success(), "exited with {status}");
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
    let rebuild = |args: &'static [&'static str]| {
        let url = url.clone();
        let server_url = server.url();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
                .args(["replay", "--rebuild", "users"])
                .args(args)
                .env("NATS_URL", server_url)
                .env("DATABASE_URL", url)
                .output()
                .await
        }
    };
    // No projector database there (a wrong URL, another directory):
    // refused, nothing created.
    let missing = rebuild(&[]).await?;
    ensure!(
        !missing.status.success()
            && stderr(&missing).contains("no projector database at")
            && stderr(&missing).contains("--create-database"),
        "{}",
        stderr(&missing)
    );
    ensure!(
        std::fs::read_dir(dir.path())?.next().is_none(),
        "a refused rebuild created a file"
    );
    let first = rebuild(&["--create-database"]).await?;
    let out = stdout(&first);
    ensure!(first.status.success(), "{}", stderr(&first));
    ensure!(
        out.contains("from 3 event(s)") && out.contains("changed") && out.contains("0 -> 3 rows"),
        "{out}"
    );
    let again = rebuild(&["--create-database"]).await?;
    ensure!(
        !again.status.success() && stderr(&again).contains("exists: --create-database is for"),
        "{}",
        stderr(&again)
    );
    let second = rebuild(&["--format", "json"]).await?;
    let report: serde_json::Value = serde_json::from_str(stdout(&second).trim())?;
    ensure!(report["changed"] == false, "{report}");
    // A database whose schema is behind this build (a projector of an
    // older version runs on it): refused, not migrated under it.
    let projector = skein_outbox::Store::connect(&url.replace("{service}", "projector")).await?;
    let forget = "DELETE FROM skein_migrations WHERE component = 'projector' AND version = 1";
    ensure!(
        sqlx::query(forget)
            .execute(projector.pool())
            .await?
            .rows_affected()
            == 1
    );
    let behind = rebuild(&[]).await?;
    ensure!(
        !behind.status.success() && stderr(&behind).contains("behind this build"),
        "{}",
        stderr(&behind)
    );
    ensure!(
        sqlx::query(forget)
            .execute(projector.pool())
            .await?
            .rows_affected()
            == 0,
        "a migration was applied"
    );
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

// ---- skein up ----

/// A NATS URL that is not a test-owned server.
struct NatsAt(String);

/// Runs `skein` against the NATS at `url`.
async fn skein_at(url: &NatsAt, args: &[&str]) -> anyhow::Result<Output> {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(args)
        .env("NATS_URL", &url.0)
        .output()
        .await
        .context("cannot run skein")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skein_saga_without_an_orchestrator_says_how_to_start_one() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let out = skein(&server, &["saga", "stuck"]).await?;
    ensure!(!out.status.success());
    ensure!(
        stderr(&out)
            .contains("no orchestrator is running; start one with `skein worker orchestrator`"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

/// One HTTP/1.1 request on a fresh connection; the status and the body.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let payload = body.map(serde_json::Value::to_string).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        payload.len()
    );
    if body.is_some() {
        request.push_str("content-type: application/json\r\n");
    }
    if let Some(token) = token {
        request.push_str(&format!("authorization: Bearer {token}\r\n"));
    }
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&payload);
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let (head, rest) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    // The ingress answers with a content length, not chunks.
    let json = if rest.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(rest.trim()).with_context(|| format!("not JSON: {rest}"))?
    };
    Ok((status, json))
}

/// `skein up` as a child process, with what it printed until it was up.
struct Up {
    child: tokio::process::Child,
    printed: String,
    data: std::path::PathBuf,
}

/// A test that fails with its `skein up` running (or not yet up) stops it
/// gracefully (the SIGKILL of `kill_on_drop` would leave its nats-server
/// running, in a process group of its own); a nats-server that outlived a
/// `skein up` that did not stop cleanly is killed.
impl Drop for Up {
    fn drop(&mut self) {
        if let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            for _ in 0..150 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.start_kill();
            let _ = self.child.try_wait();
        }
        if matches!(self.child.try_wait(), Ok(Some(status)) if status.success()) {
            return;
        }
        let nats = std::fs::read_to_string(self.data.join("nats-server.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        // Only the nats-server on this data directory's store (as skein up
        // itself checks a leftover): the number may be another process's now.
        let store = std::fs::canonicalize(&self.data)
            .map(|dir| dir.join("nats"))
            .unwrap_or_default();
        let ours = |pid: &u32| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"nats-server"))
                && args.contains(&store.as_os_str().as_encoded_bytes())
                && process_state(*pid).is_some_and(|s| s != 'Z')
        };
        if let Some(nats) = nats.filter(ours) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &nats.to_string()])
                .status();
        }
    }
}

impl Up {
    async fn start(data: &std::path::Path, http_port: u16, nats_port: u16) -> anyhow::Result<Self> {
        Self::start_with(
            data,
            http_port,
            &["--nats-port", &nats_port.to_string()],
            None,
        )
        .await
    }

    /// With `args` besides the data directory and the address, and
    /// `NATS_URL` when given (a server of the operator's).
    async fn start_with(
        data: &std::path::Path,
        http_port: u16,
        args: &[&str],
        nats_url: Option<&str>,
    ) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        // What it says on stderr, to tell why a start failed.
        let errors = tempfile::NamedTempFile::new().context("cannot create the error log")?;
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"));
        match nats_url {
            Some(url) => command.env("NATS_URL", url),
            None => command.env_remove("NATS_URL"),
        };
        let child = command
            .args(["up", "--data-dir"])
            .arg(data)
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .args(args)
            .env("SKEIN_NATS_SERVER", skein_testkit::nats::find_binary()?)
            .env_remove("DATABASE_URL")
            .env_remove("SKEIN_ADMIN_EMAIL")
            .env_remove("SKEIN_ADMIN_PASSWORD")
            .stdout(std::process::Stdio::piped())
            .stderr(errors.reopen().context("cannot open the error log")?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot run skein up")?;
        // Held from here, so that a start that fails is stopped.
        let mut up = Self {
            child,
            printed: String::new(),
            data: data.to_owned(),
        };
        let stdout = up.child.stdout.take().context("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut printed = String::new();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                printed.push_str(&line);
                printed.push('\n');
                if line.starts_with("Ctrl-C stops everything") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        ensure!(
            matches!(ready, Ok(Ok(true))),
            "skein up did not come up: {ready:?}\n{printed}{}",
            std::fs::read_to_string(errors.path()).unwrap_or_default()
        );
        // Keep reading so a full pipe never blocks it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        up.printed = printed;
        Ok(up)
    }

    /// SIGTERM, then the exit status.
    async fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        terminate(&mut self.child, Duration::from_secs(30)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skein_up_runs_the_whole_system_and_a_second_start_reuses_its_data() -> anyhow::Result<()> {
    use serde_json::json;
    let data = tempfile::tempdir()?;
    let (http_port, nats_port) = (free_port()?, free_port()?);
    let up = Up::start(data.path(), http_port, nats_port).await?;
    let printed = up.printed.clone();
    ensure!(
        printed.contains(&format!("skein is up: http://127.0.0.1:{http_port}")),
        "{printed}"
    );
    ensure!(
        printed.contains(&format!("NATS at nats://127.0.0.1:{nats_port}")),
        "{printed}"
    );
    ensure!(printed.contains("demo catalog: 5 products"), "{printed}");
    let password = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin: admin@skein.local / "))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no generated admin password printed")?
        .to_owned();

    let (status, products) = http(http_port, "GET", "/v1/products", None, &[], None).await?;
    ensure!(status == 200, "{products}");
    let items = products["items"].as_array().context("no items")?;
    ensure!(items.len() == 5, "{products}");
    let mug = items
        .iter()
        .find(|p| p["sku"] == "DEMO-MUG")
        .context("no mug")?["id"]
        .as_str()
        .context("no id")?
        .to_owned();

    let me = json!({"email": "me@example.org", "password": "a long password", "name": "Me"});
    let (status, _) = http(http_port, "POST", "/v1/auth/register", None, &[], Some(&me)).await?;
    ensure!(status == 201, "register: {status}");
    let login = json!({"email": "me@example.org", "password": "a long password"});
    let (status, tokens) =
        http(http_port, "POST", "/v1/auth/token", None, &[], Some(&login)).await?;
    ensure!(status == 200, "log in: {tokens}");
    let token = tokens["access_token"]
        .as_str()
        .context("no token")?
        .to_owned();
    let order = json!({"lines": [{"product_id": mug, "quantity": 2}]});
    // The customer reaches orders and payments by their events: retry the
    // order until both know them.
    let confirmed = eventually(Duration::from_secs(30), || async {
        let (status, body) = http(
            http_port,
            "POST",
            "/v1/orders",
            Some(&token),
            &[("prefer", "wait=10")],
            Some(&order),
        )
        .await
        .ok()?;
        (status == 200 && body["status"] == "confirmed").then_some(body)
    })
    .await
    .context("no order was confirmed through skein up")?;
    ensure!(confirmed["total_cents"] == 2_400, "{confirmed}");

    // The saga that confirmed it, as an operator sees it.
    let order_id = confirmed["id"].as_str().context("no order id")?;
    let nats = NatsAt(format!("nats://127.0.0.1:{nats_port}"));
    let show = skein_at(&nats, &["saga", "show", order_id]).await?;
    ensure!(show.status.success(), "{}", stderr(&show));
    let text = stdout(&show);
    for expected in [
        "place_order",
        "status   completed",
        "sent catalog.reserve_stock.v1",
        "sent payments.authorize_payment.v1",
        "sent orders.confirm_order.v1",
        "orders.order_confirmed.v1 completed confirm_order, the last step",
    ] {
        ensure!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
    let list = skein_at(
        &nats,
        &["saga", "list", "--status", "completed", "--format", "json"],
    )
    .await?;
    let lines: Vec<serde_json::Value> = stdout(&list)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        lines
            .iter()
            .any(|l| l["key"] == order_id && l["saga"] == "place_order"),
        "{}",
        stdout(&list)
    );
    let stuck = skein_at(&nats, &["saga", "stuck"]).await?;
    ensure!(
        stdout(&stuck).contains("no saga is waiting past its deadline or failed"),
        "{}",
        stdout(&stuck)
    );
    // Only a failed saga is retried: a completed one is refused, as is an
    // order id (retry takes an instance id).
    let saga_id = lines
        .iter()
        .find(|l| l["key"] == order_id)
        .and_then(|l| l["id"].as_str())
        .context("no saga id in the list")?;
    let retry = skein_at(&nats, &["saga", "retry", saga_id]).await?;
    ensure!(
        !retry.status.success()
            && stderr(&retry).contains(&format!(
                "409 saga instance {saga_id} is completed: only a failed one is retried"
            )),
        "{}",
        stderr(&retry)
    );
    let by_order = skein_at(&nats, &["saga", "retry", order_id]).await?;
    ensure!(
        !by_order.status.success()
            && stderr(&by_order).contains(&format!("404 no saga instance {order_id}")),
        "{}",
        stderr(&by_order)
    );
    let bad = skein_at(&nats, &["saga", "list", "--status", "lost"]).await?;
    ensure!(
        !bad.status.success() && stderr(&bad).contains("unknown status \"lost\""),
        "{}",
        stderr(&bad)
    );

    // Its causal chain, from the order placed to the order confirmed.
    let trace = skein_at(&nats, &["trace", order_id, "--format", "json"]).await?;
    ensure!(trace.status.success(), "{}", stderr(&trace));
    let hops: Vec<serde_json::Value> = stdout(&trace)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let chain: Vec<(&str, u64)> = hops
        .iter()
        .filter_map(|h| Some((h["type"].as_str()?, h["depth"].as_u64()?)))
        .collect();
    ensure!(
        chain
            == [
                ("orders.order_placed.v1", 0),
                ("catalog.reserve_stock.v1", 1),
                ("catalog.stock_reserved.v1", 2),
                ("payments.authorize_payment.v1", 3),
                ("payments.payment_authorized.v1", 4),
                ("orders.confirm_order.v1", 5),
                ("orders.order_confirmed.v1", 6),
            ],
        "{chain:?}"
    );
    ensure!(
        hops.iter()
            .skip(1)
            .all(|h| h["hop_ms"].as_i64().is_some_and(|ms| ms >= 0)),
        "{hops:?}"
    );
    let tree = skein_at(&nats, &["trace", order_id]).await?;
    ensure!(
        stdout(&tree).starts_with("7 messages from "),
        "{}",
        stdout(&tree)
    );
    let unknown = skein_at(&nats, &["trace", "no-such-request"]).await?;
    ensure!(
        !unknown.status.success()
            && stderr(&unknown).contains("no message has correlation id or entity"),
        "{}",
        stderr(&unknown)
    );

    // A failed order: the payment is declined, the stock is given back.
    let pen = items
        .iter()
        .find(|p| p["sku"] == "DEMO-PEN")
        .context("no pen")?["id"]
        .as_str()
        .context("no id")?
        .to_owned();
    let too_dear = json!({"lines": [{"product_id": pen, "quantity": 20}]});
    let (status, declined) = http(
        http_port,
        "POST",
        "/v1/orders",
        Some(&token),
        &[("prefer", "wait=10")],
        Some(&too_dear),
    )
    .await?;
    ensure!(
        status == 200 && declined["status"] == "rejected",
        "{declined}"
    );
    ensure!(
        declined["reason"] == "authorize_payment: payment declined: insufficient_funds",
        "{declined}"
    );
    let failed_id = declined["id"].as_str().context("no id")?;
    let trace = skein_at(&nats, &["trace", failed_id, "--format", "json"]).await?;
    let kinds: Vec<String> = stdout(&trace)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|h| h["type"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        kinds
            == [
                "orders.order_placed.v1",
                "catalog.reserve_stock.v1",
                "catalog.stock_reserved.v1",
                "payments.authorize_payment.v1",
                "payments.payment_declined.v1",
                "catalog.release_stock.v1",
                "catalog.stock_released.v1",
                "orders.reject_order.v1",
                "orders.order_rejected.v1",
            ],
        "the trace shows the compensation: {kinds:?}"
    );
    let (_, products_now) = http(http_port, "GET", "/v1/products", None, &[], None).await?;
    let pen_now = products_now["items"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["sku"] == "DEMO-PEN").cloned())
        .context("no pen")?;
    ensure!(pen_now["available"] == 20, "the stock is back: {pen_now}");

    // Two orders, two place_order sagas: a page of one says how to get the
    // next, and the next is the other one.
    let page = |cursor: Option<String>| {
        let nats = NatsAt(nats.0.clone());
        async move {
            let mut args = vec!["saga", "list", "--limit", "1", "--format", "json"];
            if let Some(c) = &cursor {
                args.extend(["--cursor", c.as_str()]);
            }
            let out = skein_at(&nats, &args).await?;
            let keys: Vec<String> = stdout(&out)
                .lines()
                .map(serde_json::from_str::<serde_json::Value>)
                .collect::<Result<Vec<_>, _>>()?
                .iter()
                .map(|v| v["key"].as_str().unwrap_or("").to_owned())
                .collect();
            let next = stderr(&out)
                .split("--cursor ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(|c| c.trim_end_matches('`').to_owned());
            anyhow::Ok((keys, next))
        }
    };
    let (first, next) = page(None).await?;
    let next = next.context("a page of one of several names no next page")?;
    let (second, _) = page(Some(next)).await?;
    ensure!(
        first.len() == 1 && second.len() == 1 && first != second,
        "{first:?} then {second:?}"
    );

    // The audit: clean; then a lost event is found and repaired.
    let db = format!("sqlite:{}/{{service}}.db", data.path().display());
    let audit = |repair: bool| {
        let (nats, db) = (nats.0.clone(), db.clone());
        async move {
            // Nothing is published meanwhile: check the newest rows too.
            let mut args = vec!["audit", "--database-url", db.as_str(), "--skip-recent", "0"];
            if repair {
                args.push("--repair");
            }
            skein_at(&NatsAt(nats), &args).await
        }
    };
    let clean = eventually(Duration::from_secs(20), || async {
        audit(false).await.ok().filter(|o| o.status.success())
    })
    .await
    .context("the audit of a healthy system is not clean")?;
    ensure!(
        stdout(&clean).contains("clean: every published message is where it belongs"),
        "{}",
        stdout(&clean)
    );
    let lost = {
        let bus = Bus::connect(&BusConfig::new(&nats.0, "audit-test")).await?;
        let events = skein_bus::replay::read(
            &bus,
            "EVENTS",
            &format!("events.orders.{order_id}.order_confirmed"),
            skein_bus::replay::StartAt::Beginning,
        )
        .await?;
        let victim = events.first().context("no order_confirmed stored")?;
        bus.jetstream()
            .get_stream("EVENTS")
            .await?
            .delete_message(victim.sequence)
            .await?;
        victim
            .headers
            .as_ref()
            .and_then(|h| h.get("ce-id"))
            .map(|v| v.as_str().to_owned())
            .context("no ce-id")?
    };
    let found = audit(false).await?;
    ensure!(!found.status.success(), "a lost event fails the audit");
    ensure!(
        stdout(&found).contains(&format!("lost {lost}")),
        "{}",
        stdout(&found)
    );
    ensure!(
        stderr(&found).contains("skein audit --repair"),
        "{}",
        stderr(&found)
    );
    let repaired = audit(true).await?;
    ensure!(
        repaired.status.success(),
        "{}\n{}",
        stdout(&repaired),
        stderr(&repaired)
    );
    let again = audit(false).await?;
    ensure!(
        again.status.success(),
        "clean after the repair: {}",
        stdout(&again)
    );

    // The catalog's inbox forgets what it processed (its retention run
    // out, as with `--inbox-retention 0s`): the commands the orchestrator
    // sent it are older than it remembers, not lost, and a repair would
    // have it apply them again.
    {
        let catalog = skein_outbox::Store::connect(&db.replace("{service}", "catalog")).await?;
        let bus = Bus::connect(&BusConfig::new(&nats.0, "audit-test")).await?;
        let config = skein_outbox::RelayConfig {
            inbox_retention: Duration::ZERO,
            ..skein_outbox::RelayConfig::default()
        };
        let (_, forgotten) = skein_outbox::Relay::new(catalog.clone(), bus.publisher(), config)
            .cleanup()
            .await?;
        ensure!(forgotten > 0, "the catalog's inbox held nothing");
        catalog.close().await;
    }
    let forgotten = audit(false).await?;
    ensure!(
        forgotten.status.success()
            && stdout(&forgotten).contains("older than the inbox of catalog remembers"),
        "commands the catalog forgot are not lost: {}{}",
        stdout(&forgotten),
        stderr(&forgotten)
    );

    let admin_login = json!({"email": "admin@skein.local", "password": password});
    let (status, admin) = http(
        http_port,
        "POST",
        "/v1/auth/token",
        None,
        &[],
        Some(&admin_login),
    )
    .await?;
    ensure!(status == 200, "the printed admin password works: {admin}");
    let stopped = up.stop().await?;
    ensure!(stopped.success(), "a graceful stop exits 0: {stopped}");

    // Again on the same data: nothing seeded twice, everything kept.
    let again = Up::start(data.path(), http_port, nats_port).await?;
    ensure!(
        !again.printed.contains("admin:"),
        "no second admin: {}",
        again.printed
    );
    ensure!(
        !again.printed.contains("demo catalog"),
        "no second catalog: {}",
        again.printed
    );
    let (_, products) = http(http_port, "GET", "/v1/products", None, &[], None).await?;
    let items = products["items"].as_array().context("no items")?;
    ensure!(items.len() == 5, "{products}");
    let mug_now = items
        .iter()
        .find(|p| p["sku"] == "DEMO-MUG")
        .context("no mug")?;
    ensure!(
        mug_now["available"] == 48,
        "the reservation is kept: {mug_now}"
    );
    let (status, tokens) =
        http(http_port, "POST", "/v1/auth/token", None, &[], Some(&login)).await?;
    ensure!(status == 200, "users are kept: {tokens}");
    let token = tokens["access_token"].as_str().context("no token")?;
    let (status, mine) = http(http_port, "GET", "/v1/orders", Some(token), &[], None).await?;
    ensure!(
        status == 200 && mine["items"].as_array().map(Vec::len) == Some(2),
        "{mine}"
    );
    ensure!(again.stop().await?.success());
    Ok(())
}

/// The state letter of process `pid`, if it exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// A second `skein up` on a data directory in use is refused, the first
/// untouched. A nats-server that outlives its `skein up` (killed with
/// SIGKILL) is stopped by the next start on that data directory before it
/// starts its own: two servers on one store would corrupt it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_left_by_a_killed_skein_up_is_stopped_by_the_next_start() -> anyhow::Result<()>
{
    let data = tempfile::tempdir()?;
    let (http_port, nats_port) = (free_port()?, free_port()?);
    let mut first = Up::start(data.path(), http_port, nats_port).await?;
    let nats: u32 = std::fs::read_to_string(data.path().join("nats-server.pid"))?
        .trim()
        .parse()?;

    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["up", "--data-dir"])
        .arg(data.path())
        .args(["--http", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--nats-port", &free_port()?.to_string()])
        .env("SKEIN_NATS_SERVER", skein_testkit::nats::find_binary()?)
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let second = tokio::time::timeout(Duration::from_secs(30), second.wait_with_output())
        .await
        .context("a second skein up on the data directory in use started")??;
    ensure!(
        !second.status.success() && stderr(&second).contains("another skein up"),
        "{}",
        stderr(&second)
    );
    let (status, _) = http(http_port, "GET", "/v1/products", None, &[], None).await?;
    ensure!(status == 200, "the first one stopped serving: {status}");

    first.child.kill().await?;
    ensure!(
        process_state(nats).is_some_and(|s| s != 'Z'),
        "nats-server did not outlive skein up"
    );
    let again = Up::start(data.path(), http_port, nats_port).await?;
    let left = process_state(nats);
    let (status, products) = http(http_port, "GET", "/v1/products", None, &[], None).await?;
    let printed = again.printed.clone();
    ensure!(again.stop().await?.success());
    ensure!(
        left.is_none_or(|s| s == 'Z'),
        "the old nats-server still runs ({left:?})"
    );
    ensure!(status == 200, "{status} {products}");
    // On its own port again: the leftover was stopped before the port was
    // chosen.
    ensure!(
        printed.contains(&format!("NATS at nats://127.0.0.1:{nats_port}")),
        "{printed}"
    );
    Ok(())
}

/// A Ctrl-C while `skein up` is still starting (here its nats-server takes
/// 2 s to start) stops everything once it is up, nats-server too: it does
/// not kill skein up and leave the server running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ctrl_c_during_the_start_stops_everything_once_up() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir()?;
    let slow = data.path().join("slow-nats-server");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nsleep 2\nexec {} \"$@\"\n",
            skein_testkit::nats::find_binary()?.display()
        ),
    )?;
    std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755))?;
    let mut up = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["up", "--data-dir"])
        .arg(data.path())
        .args(["--http", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--nats-port", &free_port()?.to_string()])
        .env("SKEIN_NATS_SERVER", &slow)
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = up.id().context("skein up exited early")?;
    tokio::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await?;
    let status = tokio::time::timeout(Duration::from_secs(60), up.wait())
        .await
        .context("skein up did not stop")??;
    let nats: u32 = std::fs::read_to_string(data.path().join("nats-server.pid"))
        .context("nats-server never started")?
        .trim()
        .parse()?;
    let left = eventually(Duration::from_secs(5), || async {
        process_state(nats).is_none_or(|s| s == 'Z').then_some(())
    })
    .await;
    ensure!(left.is_some(), "nats-server (pid {nats}) still runs");
    ensure!(status.success(), "exited with {status}");
    Ok(())
}

/// The generated admin password of a start that stopped after identity
/// created the admin and before the password was shown (the state such a
/// start leaves: no marker, the password pending) is shown by the next
/// start, and works; once shown it is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_admin_password_not_shown_yet_is_shown_by_the_next_start() -> anyhow::Result<()>
{
    use serde_json::json;
    let data = tempfile::tempdir()?;
    let (http_port, nats_port) = (free_port()?, free_port()?);
    let shown = |printed: &str| {
        printed
            .lines()
            .find_map(|l| l.trim().strip_prefix("admin: admin@skein.local / "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    let pending = data.path().join("admin-password.pending");
    let marker = data.path().join("admin-created");
    let first = Up::start(data.path(), http_port, nats_port).await?;
    let password = shown(&first.printed).context("no admin password printed")?;
    ensure!(first.stop().await?.success());
    ensure!(marker.exists() && !pending.exists());

    // As a start stopped between identity's admin and the printing leaves it.
    std::fs::remove_file(&marker)?;
    std::fs::write(&pending, &password)?;
    let again = Up::start(data.path(), http_port, nats_port).await?;
    let shown_again = shown(&again.printed);
    let login = json!({"email": "admin@skein.local", "password": password});
    let (status, body) = http(http_port, "POST", "/v1/auth/token", None, &[], Some(&login)).await?;
    ensure!(again.stop().await?.success());
    ensure!(
        shown_again.as_deref() == Some(password.as_str()),
        "shown {shown_again:?}, not the admin's password"
    );
    ensure!(status == 200, "{status} {body}");
    ensure!(marker.exists() && !pending.exists());
    Ok(())
}

/// `NATS_URL` set but empty (an .env template) is not set: `skein up`
/// starts its own server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skein_up_with_an_empty_nats_url_starts_its_own_server() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let nats_port = free_port()?.to_string();
    let up = Up::start_with(
        data.path(),
        free_port()?,
        &["--nats-port", &nats_port],
        Some(""),
    )
    .await?;
    let printed = up.printed.clone();
    ensure!(up.stop().await?.success());
    ensure!(
        printed.contains(&format!("NATS at nats://127.0.0.1:{nats_port}")),
        "{printed}"
    );
    Ok(())
}

/// `skein up` on a NATS server of the operator's creates what is missing
/// and leaves the streams there as they are: an EVENTS kept two years is
/// not cut back to the built-in year (which would delete the older history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skein_up_on_an_operator_s_server_keeps_its_streams() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let two_years = Duration::from_secs(2 * 365 * 24 * 3600);
    let js = bus.jetstream();
    let mut events = js.get_stream(EVENTS).await?.info().await?.config.clone();
    events.max_age = two_years;
    js.update_stream(events).await?;
    js.delete_stream("DLQ").await?;

    let data = tempfile::tempdir()?;
    let up = Up::start_with(data.path(), free_port()?, &[], Some(&server.url())).await?;
    let kept = js.get_stream(EVENTS).await?.info().await?.config.max_age;
    let dlq = js.get_stream("DLQ").await.is_ok();
    ensure!(up.stop().await?.success());
    ensure!(kept == two_years, "EVENTS keeps {kept:?} now");
    ensure!(dlq, "the missing DLQ was not created");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skein_up_says_what_to_do_when_its_port_is_taken_or_its_data_dir_unusable(
) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let run = |args: Vec<String>| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(&args)
            .env_remove("NATS_URL")
            .output()
            .await
            .context("cannot run skein up")
    };
    let out = run(vec![
        "up".into(),
        "--data-dir".into(),
        data.path().display().to_string(),
        "--http".into(),
        format!("127.0.0.1:{port}"),
    ])
    .await?;
    ensure!(!out.status.success());
    let err = stderr(&out);
    ensure!(
        err.contains(&format!("127.0.0.1:{port} is taken")) && err.contains("--http"),
        "{err}"
    );

    let file = data.path().join("a-file");
    std::fs::write(&file, "not a directory")?;
    let out = run(vec![
        "up".into(),
        "--data-dir".into(),
        file.join("data").display().to_string(),
        "--http".into(),
        format!("127.0.0.1:{}", free_port()?),
    ])
    .await?;
    ensure!(!out.status.success());
    let err = stderr(&out);
    ensure!(
        err.contains("cannot create the data directory") && err.contains("--data-dir"),
        "{err}"
    );
    Ok(())
}

/// Several workers in one process given one database (a `DATABASE_URL`
/// without `{service}`): refused before anything is created, naming what
/// to give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_one_database_are_refused() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let shared = format!("sqlite:{}/one.db", dir.path().display());
    for args in [
        &["worker", "catalog", "orders"][..],
        &["up", "--data-dir", &dir.path().display().to_string()][..],
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(args)
            .env("NATS_URL", server.url())
            .env("DATABASE_URL", &shared)
            .output()
            .await?;
        ensure!(
            !out.status.success() && stderr(&out).contains("has no {service}: the"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    ensure!(
        !dir.path().join("one.db").exists(),
        "the shared database was created"
    );
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct Note {
    entity: String,
}
impl Contract for Note {
    const SERVICE: &'static str = "notes";
    const NAME: &'static str = "note";
    const VERSION: u32 = 1;
}
impl skein_message::Command for Note {
    fn entity_id(&self) -> String {
        self.entity.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_the_commands_work_queue_beside_its_worker_and_consumes_nothing(
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    // A worker's consumer, bound and idle: the queue's only reader.
    bus.jetstream()
        .get_stream("COMMANDS")
        .await?
        .create_consumer(pull::Config {
            durable_name: Some("notes".into()),
            filter_subject: "commands.notes.>".into(),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    for n in 0..3 {
        let command = Envelope::command(
            "test",
            &Note {
                entity: format!("n{n}"),
            },
            &MessageContext::root(),
        )?;
        bus.publisher().publish(&command).await?;
    }
    for _ in 0..2 {
        let out = skein(
            &server,
            &["replay", "--stream", "COMMANDS", "--format", "json"],
        )
        .await?;
        ensure!(out.status.success(), "{}", stderr(&out));
        let lines: Vec<serde_json::Value> = stdout(&out)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        ensure!(lines.len() == 3, "{}", stdout(&out));
        ensure!(
            lines.iter().all(|l| l["type"] == "notes.note.v1"),
            "{}",
            stdout(&out)
        );
    }
    let one = skein(
        &server,
        &[
            "replay", "--stream", "COMMANDS", "--seq", "2-2", "--format", "json",
        ],
    )
    .await?;
    ensure!(stdout(&one).lines().count() == 1, "{}", stdout(&one));
    let limited = skein(
        &server,
        &[
            "replay", "--stream", "COMMANDS", "--limit", "2", "--format", "json",
        ],
    )
    .await?;
    ensure!(
        stdout(&limited).lines().count() == 2
            && stderr(&limited).contains("(stopped at --limit 2)"),
        "{}{}",
        stdout(&limited),
        stderr(&limited)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_follow_prints_the_history_then_what_arrives_until_stopped() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let server = NatsServer::start().await?;
    let bus = bus(&server).await?;
    let publish = |n: u32| {
        let bus = bus.clone();
        async move {
            let event = Envelope::event(
                "notes",
                &Noted {
                    entity: format!("e{n}"),
                    n,
                },
                &MessageContext::root(),
            )?;
            bus.publisher().publish(&event).await?;
            anyhow::Ok(())
        }
    };
    publish(1).await?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein"))
        .args([
            "replay",
            "--follow",
            "--format",
            "json",
            "--type",
            "notes.noted",
        ])
        .env("NATS_URL", server.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = tokio::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let mut err = tokio::io::BufReader::new(child.stderr.take().context("no stderr")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), out.next_line())
        .await??
        .context("no history")?;
    ensure!(first.contains("\"n\":1"), "{first}");
    // Publish once it follows, then expect the new event.
    let following = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = err.next_line().await? {
            if line.starts_with("(following EVENTS") {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("stderr closed")
    })
    .await?;
    following?;
    publish(2).await?;
    let second = tokio::time::timeout(Duration::from_secs(10), out.next_line())
        .await??
        .context("nothing followed")?;
    ensure!(second.contains("\"n\":2"), "{second}");
    let status = terminate(&mut child, Duration::from_secs(10)).await?;
    ensure!(
        status.success(),
        "Ctrl-C or SIGTERM ends it cleanly: {status}"
    );

    let refused = skein(&server, &["replay", "--stream", "COMMANDS", "--follow"]).await?;
    ensure!(
        !refused.status.success() && stderr(&refused).contains("work queue"),
        "{}",
        stderr(&refused)
    );
    Ok(())
}
