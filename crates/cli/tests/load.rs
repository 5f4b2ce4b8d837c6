//! `skein load` against a system of real processes, and the fault tests:
//! every worker and the ingress run as their own `skein worker` / `skein
//! ingress` process on a test nats-server, `skein load` places orders through
//! HTTP, a fault is injected once it has started placing them (a process
//! killed with SIGKILL, the broker restarted, a cluster node stopped, the
//! database's connections cut, a flood of poison), and at the end every
//! invariant `skein load` checks must hold, every order must have ended as
//! its kind demands, and `skein audit` must be clean.
//!
//! Each test runs a whole system; they take turns (a nextest test group,
//! and [`ONE_AT_A_TIME`] under `cargo test`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use skein_testkit::{free_port, Backend, NatsServer, Secured, TestDb};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// `cargo test` runs a binary's tests on parallel threads; these run a
/// whole system of processes each and would starve one another, so each
/// holds this while it runs. (Under nextest every test is its own process
/// and the `system-load` test group serializes them.)
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ADMIN_EMAIL: &str = "admin@load.skein.test";
const ADMIN_PASSWORD: &str = "the load test admin's password";
/// Every worker, in start order.
const WORKERS: [&str; 6] = [
    "identity",
    "catalog",
    "payments",
    "orders",
    "orchestrator",
    "projector",
];

/// How long a fault load may run once it places orders: the orders
/// (well under a minute when healthy), 150 s for the slowest to settle,
/// and 150 s of invariant checks waiting for agreement, with a margin.
/// The nextest `slow-timeout` of this binary must exceed a test's total.
const FAULT_LOAD_WITHIN: Duration = Duration::from_secs(420);

/// A GET on a fresh connection: the status, or an error when nothing answers.
async fn get(port: u16, path: &str) -> anyhow::Result<u16> {
    Ok(request(port, "GET", path, None, None).await?.0)
}

/// One request on a fresh connection: the status and the JSON body (null if none).
async fn request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| ("authorization", b))
        .into_iter()
        .collect();
    let payload = body.map(Value::to_string);
    let (status, text) =
        skein_testkit::http::request(port, method, path, &headers, payload.as_deref()).await?;
    Ok((
        status,
        serde_json::from_str(text.trim()).unwrap_or(Value::Null),
    ))
}

/// Waits until no order is pending (the projector's dashboard, as the admin).
async fn wait_until_no_order_is_pending(port: u16, within: Duration) -> anyhow::Result<()> {
    let credentials = serde_json::json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD});
    let (status, pair) = request(port, "POST", "/v1/auth/token", None, Some(&credentials)).await?;
    ensure!(status == 200, "admin log-in: {status} {pair}");
    let token = pair["access_token"].as_str().context("no token")?;
    let deadline = Instant::now() + within;
    loop {
        let (status, dashboard) = request(port, "GET", "/v1/dashboard", Some(token), None).await?;
        if status == 200 && dashboard["orders_by_status"]["pending"] == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "orders still pending: {dashboard}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One component process.
struct Component {
    /// Its `skein` arguments.
    args: Vec<String>,
    /// Its environment besides what every component gets.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// A whole system as processes: the workers (`copies` of each) and one
/// ingress, on `nats_url`, with databases from `database_url`.
struct System {
    nats_url: String,
    database_url: String,
    dir: tempfile::TempDir,
    http_port: u16,
    components: Vec<(String, Component)>,
    /// Each service's NATS password when it connects as its own NATS user
    /// (named after it); empty: every component connects with `nats_url`.
    users: BTreeMap<String, String>,
    /// The URL the components connect to: `nats_url`, or without its
    /// credentials when they connect as their own users.
    component_url: String,
}

impl System {
    async fn start(
        nats_url: String,
        database_url: Option<String>,
        workers: &[&str],
        copies: usize,
    ) -> anyhow::Result<Self> {
        let component_url = nats_url.clone();
        Self::start_as_users(
            nats_url,
            component_url,
            database_url,
            workers,
            copies,
            BTreeMap::new(),
        )
        .await
    }

    /// [`System::start`], each service named in `users` connecting to
    /// `component_url` (no credentials in it) as its own NATS user with the
    /// password there; `nats_url` is for the operator commands.
    async fn start_as_users(
        nats_url: String,
        component_url: String,
        database_url: Option<String>,
        workers: &[&str],
        copies: usize,
        users: BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("skein-load-").tempdir()?;
        let database_url = database_url
            .unwrap_or_else(|| format!("sqlite:{}/{{service}}.db", dir.path().display()));
        let http_port = free_port()?;
        let mut system = Self {
            nats_url,
            database_url,
            dir,
            http_port,
            components: Vec::new(),
            users,
            component_url,
        };
        for worker in workers {
            for copy in 1..=copies {
                system.add(&format!("{worker}-{copy}"), &["worker", worker]);
            }
        }
        let port = http_port.to_string();
        system.add(
            "ingress",
            &[
                "ingress",
                "--http",
                &format!("127.0.0.1:{port}"),
                "--rate-limit",
                "100000",
                "--rate-burst",
                "100000",
                "--login-rate-limit",
                "1000",
                "--login-rate-burst",
                "1000",
            ],
        );
        for (name, component) in &mut system.components {
            component.child = Some(spawn(
                &system.component_url,
                &system.database_url,
                system.dir.path(),
                name,
                component,
            )?);
        }
        system.wait_healthy(workers).await?;
        Ok(system)
    }

    fn add(&mut self, name: &str, args: &[&str]) {
        // `worker <service>` or `ingress`.
        let service = match args {
            ["worker", service, ..] => service,
            [command, ..] => command,
            [] => "",
        };
        let env = self
            .users
            .get(service)
            .map(|password| {
                vec![
                    ("NATS_USER".to_owned(), service.to_owned()),
                    ("NATS_PASSWORD".to_owned(), password.clone()),
                ]
            })
            .unwrap_or_default();
        self.components.push((
            name.to_owned(),
            Component {
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                env,
                child: None,
            },
        ));
    }

    /// Waits until the ingress answers and every worker in `workers` answers its ping.
    async fn wait_healthy(&self, workers: &[&str]) -> anyhow::Result<()> {
        let bus = skein_bus::Bus::connect(&skein_bus::BusConfig::new(&self.nats_url, "load-test"))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        'wait: loop {
            ensure!(
                Instant::now() < deadline,
                "the system did not come up in 90 s; logs in {}:\n{}",
                self.dir.path().display(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !matches!(get(self.http_port, "/health/live").await, Ok(200)) {
                continue;
            }
            for worker in workers {
                let ping = bus
                    .client()
                    .request(format!("$SRV.PING.{worker}"), "".into())
                    .await;
                if ping.is_err() {
                    continue 'wait;
                }
            }
            return Ok(());
        }
    }

    /// Kills a component at once (SIGKILL), as a crash would.
    async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let component = self.component(name)?;
        let mut child = component.child.take().context("not running")?;
        child.start_kill()?;
        child.wait().await?;
        Ok(())
    }

    /// Starts a killed component again.
    fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let (nats, db, dir) = (
            self.component_url.clone(),
            self.database_url.clone(),
            self.dir.path().to_owned(),
        );
        let component = self.component(name)?;
        ensure!(component.child.is_none(), "{name} is running");
        component.child = Some(spawn(&nats, &db, &dir, name, component)?);
        Ok(())
    }

    fn component(&mut self, name: &str) -> anyhow::Result<&mut Component> {
        self.components
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .with_context(|| format!("no component {name}"))
    }

    /// Starts `skein load --json` with `args`.
    fn load(&self, args: &[&str]) -> anyhow::Result<LoadRun> {
        let child = Command::new(env!("CARGO_BIN_EXE_skein"))
            .arg("load")
            .args(["--url", &format!("http://127.0.0.1:{}", self.http_port)])
            .args(["--nats-url", &self.nats_url])
            .args([
                "--admin-email",
                ADMIN_EMAIL,
                "--admin-password",
                ADMIN_PASSWORD,
            ])
            .arg("--json")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run skein load")?;
        LoadRun::new(child)
    }

    /// The load of a fault test: `orders` orders, 16 in flight, up to
    /// 150 s each to become final (a killed copy's messages wait for
    /// ack_wait; also how long its checks may wait for agreement), answers
    /// held at most 5 s. See [`FAULT_LOAD_WITHIN`].
    fn fault_load(&self, orders: u32) -> anyhow::Result<LoadRun> {
        let orders = orders.to_string();
        self.load(&[
            "--orders",
            &orders,
            "--concurrency",
            "16",
            "--settle-timeout",
            "150",
            "--wait",
            "5",
        ])
    }

    /// `skein audit` until it is clean (the relays may still be publishing),
    /// or its last output after `within`.
    async fn audit_clean(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let output = Command::new(env!("CARGO_BIN_EXE_skein"))
                .args(["audit", "--format", "json", "--nats-url", &self.nats_url])
                .env("DATABASE_URL", &self.database_url)
                .output()
                .await?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            // Clean, and every outbox drained.
            let drained = String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .all(|service| service["backlog"].as_i64().unwrap_or(0) == 0);
            if output.status.success() && drained {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("skein audit is not clean after {within:?}:\n{text}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Nothing was dead-lettered: a fault must cost retries, never messages.
    async fn no_dead_letters(&self) -> anyhow::Result<()> {
        // Through skein's own connect, which takes credentials from the URL.
        let bus = skein_bus::Bus::connect(&skein_bus::BusConfig::new(&self.nats_url, "load-test"))
            .await?;
        let dead = bus
            .jetstream()
            .get_stream("DLQ")
            .await?
            .info()
            .await?
            .state
            .messages;
        if dead > 0 {
            let listed = Command::new(env!("CARGO_BIN_EXE_skein"))
                .args(["dlq", "list", "--nats-url", &self.nats_url])
                .output()
                .await?;
            bail!(
                "{dead} dead letters:\n{}",
                String::from_utf8_lossy(&listed.stdout)
            );
        }
        Ok(())
    }

    /// A verdict on a run, with what explains a failure: every
    /// component's log, `skein audit`, and the trace of the first order a
    /// failed check names.
    async fn explain(&self, verdict: anyhow::Result<()>, report: &Value) -> anyhow::Result<()> {
        match verdict {
            Ok(()) => Ok(()),
            Err(e) => Err(e.context(format!("{}\n{}", self.logs(), self.diagnose(report).await))),
        }
    }

    /// What `skein audit` and `skein trace` say about a failed run's first
    /// order a failed check names, for a failure message.
    async fn diagnose(&self, report: &Value) -> String {
        let mut out = String::new();
        let run = |args: Vec<String>| {
            let (nats, db) = (self.nats_url.clone(), self.database_url.clone());
            async move {
                match Command::new(env!("CARGO_BIN_EXE_skein"))
                    .args(&args)
                    .args(["--nats-url", &nats])
                    .env("DATABASE_URL", &db)
                    .output()
                    .await
                {
                    Ok(o) => format!(
                        "$ skein {}\n{}{}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    ),
                    Err(e) => format!("$ skein {}: {e}", args.join(" ")),
                }
            }
        };
        out.push_str(&run(vec!["audit".into()]).await);
        // "... e.g. order #141 <id>: not final ..."
        let stuck = report["invariants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["ok"] != true)
            .filter_map(|c| c["detail"].as_str())
            .flat_map(|d| d.split_whitespace())
            .find_map(|w| uuid::Uuid::try_parse(w.trim_end_matches(':')).ok());
        if let Some(id) = stuck {
            out.push_str(&run(vec!["trace".into(), id.to_string()]).await);
        }
        out
    }

    /// Every component's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.components {
            let text = std::fs::read_to_string(log_path(self.dir.path(), name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {name}\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// An admin's trace of one placed order through the ingress (which
    /// reads the streams and asks the orchestrator): whole, without gaps.
    async fn trace_one_order(&self) -> anyhow::Result<()> {
        let bus = skein_bus::Bus::connect(&skein_bus::BusConfig::new(&self.nats_url, "load-test"))
            .await?;
        let placed = skein_bus::replay::read(
            &bus,
            "EVENTS",
            "events.orders.*.order_placed",
            skein_bus::replay::StartAt::Beginning,
        )
        .await?;
        let order = placed
            .first()
            .and_then(|m| m.subject.split('.').nth(2))
            .context("no order was placed")?;
        let credentials = serde_json::json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD});
        let (status, pair) = request(
            self.http_port,
            "POST",
            "/v1/auth/token",
            None,
            Some(&credentials),
        )
        .await?;
        ensure!(status == 200, "admin log-in: {status} {pair}");
        let token = pair["access_token"].as_str().context("no token")?;
        let path = format!("/v1/trace/{order}");
        let (status, trace) = request(self.http_port, "GET", &path, Some(token), None).await?;
        ensure!(status == 200, "GET {path}: {status} {trace}");
        let hops = trace["messages"].as_array().map_or(0, Vec::len);
        ensure!(
            hops >= 4 && trace.get("gaps").is_none(),
            "GET {path}: {trace:#}"
        );
        Ok(())
    }

    /// A component's log so far.
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(log_path(self.dir.path(), name)).unwrap_or_default()
    }

    /// Every line of the components' logs where NATS refused something.
    fn refused(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, _) in &self.components {
            let text = std::fs::read_to_string(log_path(self.dir.path(), name)).unwrap_or_default();
            out.extend(
                text.lines()
                    .filter(|l| l.to_lowercase().contains("permissions violation"))
                    .map(|l| format!("{name}: {l}")),
            );
        }
        out
    }
}

fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

fn spawn(
    nats_url: &str,
    database_url: &str,
    dir: &Path,
    name: &str,
    component: &Component,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(dir, name))?;
    Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(&component.args)
        .envs(component.env.iter().map(|(k, v)| (k, v)))
        .env("NATS_URL", nats_url)
        .env("DATABASE_URL", database_url)
        .env("SKEIN_KEY_DIR", dir)
        .env("SKEIN_ADMIN_EMAIL", ADMIN_EMAIL)
        .env("SKEIN_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("SKEIN_LOG", "warn")
        // Twelve worker processes on a shared PostgreSQL server (max_connections 100).
        .env("SKEIN_DATABASE_POOL", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))
}

/// A running `skein load --json`, its stderr read as it comes.
struct LoadRun {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// Fires when skein load says `placing N orders`: set-up is over.
    placing: Option<tokio::sync::oneshot::Receiver<()>>,
    reader: JoinHandle<()>,
}

impl LoadRun {
    fn new(mut child: Child) -> anyhow::Result<Self> {
        let stderr = child.stderr.take().context("skein load's stderr")?;
        let text = Arc::new(Mutex::new(String::new()));
        let (placing_tx, placing) = tokio::sync::oneshot::channel();
        let collected = text.clone();
        let reader = tokio::spawn(async move {
            let mut placing_tx = Some(placing_tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("placing ") {
                    if let Some(tx) = placing_tx.take() {
                        let _ = tx.send(());
                    }
                }
                let mut all = collected.lock().unwrap_or_else(|p| p.into_inner());
                all.push_str(&line);
                all.push('\n');
            }
        });
        Ok(Self {
            child,
            stderr: text,
            placing: Some(placing),
            reader,
        })
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until set-up is over and orders are being placed: faults are
    /// injected from here, whatever set-up took.
    async fn placing(&mut self) -> anyhow::Result<()> {
        let placing = self.placing.take().context("waited for placing twice")?;
        match tokio::time::timeout(Duration::from_secs(120), placing).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => bail!("skein load ended before placing orders:\n{}", self.stderr()),
            Err(_) => bail!(
                "skein load did not start placing orders in 120 s:\n{}",
                self.stderr()
            ),
        }
    }
}

/// Waits for a `skein load --json` run: its exit status and report.
async fn finish(load: LoadRun, within: Duration) -> anyhow::Result<(ExitStatus, Value)> {
    let LoadRun {
        child,
        stderr,
        reader,
        ..
    } = load;
    let output = tokio::time::timeout(within, child.wait_with_output())
        .await
        .with_context(|| format!("skein load did not finish in {within:?}"))??;
    let _ = reader.await;
    let stderr = stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "skein load printed no report (exit {}):\n{stdout}\n{stderr}",
            output.status,
        )
    })?;
    ensure!(
        stderr.lines().any(|l| l.starts_with("placing ")),
        "skein load did not say when it started placing orders:\n{stderr}"
    );
    Ok((output.status, report))
}

/// The named invariant of a report.
fn invariant<'a>(report: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    report["invariants"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no invariant {name:?} in {report}"))
}

/// A run that passed: exit 0, every invariant ok, every order final, and
/// every order ended as its kind demands on this system (no provider
/// declines: every normal order confirmed; out-of-stock orders rejected
/// for stock, declined ones for funds).
fn passed(status: ExitStatus, report: &Value, orders: u64) -> anyhow::Result<()> {
    let failed: Vec<&Value> = report["invariants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["ok"] != true)
        .collect();
    ensure!(
        status.success() && report["ok"] == true,
        "skein load failed ({status}): {failed:?}\n{report:#}"
    );
    ensure!(report["final_orders"] == orders, "{report:#}");
    let invariants = report["invariants"].as_array().context("no invariants")?;
    ensure!(invariants.len() == 6, "{report:#}");
    for check in invariants {
        ensure!(check["ok"] == true, "{check}");
    }
    ended_as_meant(report)
}

/// Every order of the report ended as its kind demands when the payment
/// provider declines nothing: normal ones confirmed, the others rejected,
/// and every rejection for the failure its kind adds.
fn ended_as_meant(report: &Value) -> anyhow::Result<()> {
    let by_kind = report["by_kind"].as_object().context("no by_kind")?;
    for (kind, statuses) in by_kind {
        let want = if kind == "normal" {
            "confirmed"
        } else {
            "rejected"
        };
        let statuses = statuses.as_object().context("by_kind counts")?;
        ensure!(
            statuses.keys().all(|s| s == want),
            "{kind} orders must all be {want}: {statuses:?}\n{report:#}"
        );
    }
    ensure!(
        by_kind.contains_key("normal"),
        "no normal order: {report:#}"
    );
    let reasons = report["reasons"].as_object().context("no reasons")?;
    for reason in reasons.keys() {
        ensure!(
            reason.ends_with("payment declined: insufficient_funds")
                || (reason.contains("stock rejected:") && reason.contains("insufficient_stock")),
            "a rejection for another reason: {reason:?}\n{report:#}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_passes_on_a_healthy_system_and_fails_a_run_whose_orders_get_stuck(
) -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await?;
    // No orchestrator: orders are placed, but no saga ever finishes them.
    let without = ["identity", "catalog", "payments", "orders", "projector"];
    let mut system = System::start(nats.url(), None, &without, 1).await?;

    let (status, report) = finish(
        system.load(&[
            "--orders",
            "20",
            "--concurrency",
            "4",
            "--settle-timeout",
            "3",
            "--wait",
            "1",
        ])?,
        Duration::from_secs(120),
    )
    .await?;
    ensure!(
        !status.success(),
        "a run with stuck orders passed: {report:#}"
    );
    ensure!(report["ok"] == false, "{report:#}");
    let stuck = invariant(&report, "no order lost or stuck")?;
    ensure!(stuck["ok"] == false, "{stuck}");
    ensure!(
        stuck["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("20 of 20 not final")),
        "{stuck}"
    );
    // Nothing else is wrong: no stock moved, no money moved, each customer
    // lists exactly their pending orders.
    for name in [
        "stock conserved",
        "money conserved",
        "money conserved per customer",
        "orders listed as placed",
        "outcomes match their cause",
    ] {
        ensure!(invariant(&report, name)?["ok"] == true, "{report:#}");
    }

    // With the orchestrator the same system passes, with the failures the mix asked for.
    system.add("orchestrator-1", &["worker", "orchestrator"]);
    system.restart("orchestrator-1")?;
    system.wait_healthy(&WORKERS).await?;
    // The stuck orders finish now; the next run's money check must not see them.
    wait_until_no_order_is_pending(system.http_port, Duration::from_secs(60)).await?;
    let (status, report) = finish(
        system.load(&[
            "--orders",
            "120",
            "--concurrency",
            "8",
            "--failure-mix",
            "out-of-stock=0.2,declined=0.2",
            "--seed",
            "42",
        ])?,
        Duration::from_secs(120),
    )
    .await?;
    passed(status, &report, 120)?;
    for kind in ["out-of-stock", "declined"] {
        let rejected = report["by_kind"][kind]["rejected"].as_u64().unwrap_or(0);
        ensure!(rejected > 5, "few {kind} orders: {report:#}");
    }
    ensure!(
        report["by_kind"]["normal"]["confirmed"]
            .as_u64()
            .unwrap_or(0)
            > 30,
        "{report:#}"
    );
    system.audit_clean(Duration::from_secs(30)).await?;
    Ok(())
}

/// A client connected to `url` as `user`, the way skein connects (replies
/// under `_INBOX.<user>`), and the server's errors as they come.
async fn connect_as(
    url: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<(
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
)> {
    let (errors_tx, errors) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX.{user}"))
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = errors_tx.send(e.to_string());
                }
            }
        })
        .connect(url)
        .await?;
    Ok((client, errors))
}

/// Waits for the server to refuse `subject` to this client.
async fn refused(
    client: &async_nats::Client,
    errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    who: &str,
    subject: &str,
) -> anyhow::Result<()> {
    client.flush().await?;
    let wanted = format!("\"{}\"", subject.to_lowercase());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let said = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .with_context(|| format!("{who} was not refused {subject}"))?
            .unwrap_or_default()
            .to_lowercase();
        if said.contains("permissions violation") && said.contains(&wanted) {
            return Ok(());
        }
    }
}

/// Every service connects as its own NATS user of the shipped users file
/// (nats/skein-users.conf, the passwords in the server's environment as
/// compose.yaml gives them), the operator commands as the user `skein`:
/// orders complete, the audit is clean, and the server refused the system
/// nothing it does. Each service is refused what belongs to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_as_its_own_nats_user_completes_orders_and_is_refused_the_others_subjects(
) -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    const SERVICES: [&str; 7] = [
        "ingress",
        "identity",
        "catalog",
        "orders",
        "payments",
        "orchestrator",
        "projector",
    ];
    // Letters and digits: nats-server reads them from its environment as
    // configuration values, as compose.yaml's nodes do.
    let password = |user: &str| format!("secretOf{user}42");
    let users = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../nats/skein-users.conf"),
    )?;
    let mut env = vec![("NATS_PASSWORD".to_owned(), password("skein"))];
    env.extend(
        SERVICES
            .iter()
            .map(|s| (format!("NATS_PASSWORD_{}", s.to_uppercase()), password(s))),
    );
    let nats = NatsServer::start_secured(Secured {
        user_password: Some(("skein".into(), password("skein"))),
        authorization: Some(users),
        env,
        ..Secured::default()
    })
    .await?;
    let admin_url = format!(
        "nats://skein:{}@127.0.0.1:{}",
        password("skein"),
        nats.port()
    );

    // Only skein may create the streams: the ingress, which applies them at
    // start, fails without them, and says what to do (after its request
    // timeout: a refused request gets no answer).
    let early = Command::new(env!("CARGO_BIN_EXE_skein"))
        .args([
            "ingress",
            "--http",
            "127.0.0.1:0",
            "--nats-url",
            &nats.url(),
        ])
        .env("NATS_USER", "ingress")
        .env("NATS_PASSWORD", password("ingress"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;

    // The user skein is limited too: a subject outside skein's is refused.
    let (skein, mut skein_errors) = connect_as(&nats.url(), "skein", &password("skein")).await?;
    skein.publish("elsewhere.x", "no".into()).await?;
    refused(&skein, &mut skein_errors, "skein", "elsewhere.x").await?;

    let early = tokio::time::timeout(Duration::from_secs(60), early.wait_with_output())
        .await
        .context("the ingress started without streams did not stop")??;
    let said = String::from_utf8_lossy(&early.stderr);
    ensure!(
        !early.status.success() && said.contains("`skein streams apply` as a user that may"),
        "{said}"
    );
    // skein creates them and every worker's consumers; the services then
    // find them.
    let applied = Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["streams", "apply", "--nats-url", &admin_url])
        .output()
        .await?;
    let listed = String::from_utf8_lossy(&applied.stdout);
    ensure!(
        applied.status.success()
            && ["COMMANDS/payments", "EVENTS/orchestrator", "EVENTS/orders"]
                .iter()
                .all(|c| listed
                    .lines()
                    .any(|l| l.starts_with(c) && l.ends_with("created"))),
        "{listed}{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let admin =
        skein_bus::Bus::connect(&skein_bus::BusConfig::new(&admin_url, "load-test")).await?;
    let consumer_config = |stream: &'static str, name: &'static str| {
        let js = admin.jetstream().clone();
        async move {
            let mut consumer = js
                .get_stream(stream)
                .await?
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
                .await
                .map_err(|e| anyhow::anyhow!("consumer {name} on {stream}: {e}"))?;
            anyhow::Ok(consumer.info().await?.config.clone())
        }
    };
    let orchestrator_before = consumer_config("EVENTS", "orchestrator").await?;

    // A service is refused another's events, commands, consumer and
    // replies, creating consumers (its own name included: a push consumer
    // could deliver anywhere), and changing a stream.
    let (payments, mut errors) = connect_as(&nats.url(), "payments", &password("payments")).await?;
    for subject in [
        "events.orders.0197a0b0-0000-7000-8000-000000000001.order_confirmed",
        "commands.orders.confirm_order",
        "$JS.API.CONSUMER.MSG.NEXT.COMMANDS.orders",
        "$JS.ACK.COMMANDS.orders.1.1.1.1.1.1.1",
        "$JS.API.CONSUMER.CREATE.DLQ.payments",
        "$JS.API.CONSUMER.CREATE.COMMANDS.payments.commands.payments.>",
        "$JS.API.CONSUMER.CREATE.COMMANDS",
        "$JS.API.STREAM.DELETE.EVENTS",
        "$JS.API.STREAM.UPDATE.EVENTS",
    ] {
        payments.publish(subject, "{}".into()).await?;
        refused(&payments, &mut errors, "payments", subject).await?;
    }
    let _sniffer = payments.subscribe("_INBOX.ingress.>").await?;
    refused(&payments, &mut errors, "payments", "_INBOX.ingress.>").await?;
    // The ingress may read the streams through consumers of its own, not
    // create, pull from or delete a worker's, and sends only the commands
    // clients may.
    let (ingress, mut errors) = connect_as(&nats.url(), "ingress", &password("ingress")).await?;
    for subject in [
        "commands.orders.confirm_order",
        "commands.catalog.reserve_stock",
        "$JS.API.CONSUMER.CREATE.EVENTS.orchestrator",
        "$JS.API.CONSUMER.CREATE.EVENTS.projector.events.>",
        "$JS.API.CONSUMER.DELETE.EVENTS.orchestrator",
        "$JS.API.CONSUMER.MSG.NEXT.EVENTS.orchestrator",
        "$JS.API.CONSUMER.CREATE.COMMANDS",
    ] {
        ingress.publish(subject, "{}".into()).await?;
        refused(&ingress, &mut errors, "ingress", subject).await?;
    }
    // Nor through the subject without a name in it, whose request would
    // replace the orchestrator's consumer.
    let hijack = serde_json::json!({
        "stream_name": "EVENTS",
        "config": {"name": "orchestrator", "ack_policy": "explicit",
                   "filter_subject": "events.none.>", "max_ack_pending": 1},
    });
    ingress
        .publish_with_reply(
            "$JS.API.CONSUMER.CREATE.EVENTS",
            "_INBOX.ingress.hijack",
            hijack.to_string().into(),
        )
        .await?;
    refused(
        &ingress,
        &mut errors,
        "ingress",
        "$JS.API.CONSUMER.CREATE.EVENTS",
    )
    .await?;
    let answer = "refused";
    let orchestrator_after = consumer_config("EVENTS", "orchestrator").await?;
    ensure!(
        orchestrator_after.filter_subjects == orchestrator_before.filter_subjects
            && orchestrator_after.filter_subject == orchestrator_before.filter_subject
            && orchestrator_after.max_ack_pending == orchestrator_before.max_ack_pending,
        "the ingress changed the orchestrator's consumer ({answer}): {orchestrator_after:?}"
    );

    // Two copies of each: on SQLite the standby relays wake the active
    // one over NATS, as their own users.
    let system = System::start_as_users(
        admin_url,
        nats.url(),
        None,
        &WORKERS,
        2,
        SERVICES
            .iter()
            .map(|s| ((*s).to_owned(), password(s)))
            .collect(),
    )
    .await?;
    // A reply subject outside what the sender may subscribe to is refused
    // by the server: the ingress cannot make payments answer to `$JS.ACK`
    // (an empty error answer there would acknowledge one of its messages).
    let forged = "$JS.ACK.COMMANDS.payments.1.1.1.1.1.1";
    ingress
        .publish_with_reply("queries.payments.status", forged, "{}".into())
        .await?;
    ingress.flush().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let said = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .context("the ingress was not refused a $JS.ACK reply subject")?
            .unwrap_or_default();
        if said.contains("Publish with Reply") && said.contains(forged) {
            break;
        }
    }
    // (The server refuses `$JS.ACK` reply subjects to every user with
    // permissions.) And a service answers only to an inbox, whoever asks:
    // an answer to a command subject would be stored in COMMANDS, with
    // the service's permissions (a response is allowed anywhere).
    skein
        .publish_with_reply(
            "queries.payments.status",
            "commands.orders.confirm_order",
            "{}".into(),
        )
        .await?;
    skein.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    // Either copy may have got it (a queue group).
    let payments_logs = || format!("{}{}", system.log("payments-1"), system.log("payments-2"));
    while !payments_logs().contains("not answering a request whose reply subject is not an inbox") {
        if Instant::now() > deadline {
            let mut said = Vec::new();
            while let Ok(e) = skein_errors.try_recv() {
                said.push(e);
            }
            bail!(
                "payments answered to a command subject (skein was told {said:?}):\n{}",
                payments_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let finished = finish(
        system.load(&["--orders", "60", "--concurrency", "8", "--wait", "5"])?,
        Duration::from_secs(90),
    )
    .await;
    let refusals = || format!("NATS refused the system:\n{}", system.refused().join("\n"));
    let (status, report) = finished.with_context(refusals)?;
    system.explain(passed(status, &report, 60), &report).await?;
    system.audit_clean(Duration::from_secs(30)).await?;
    system.no_dead_letters().await?;
    system.trace_one_order().await.with_context(refusals)?;
    // A service dead-letters as its own user: a command without headers.
    let admin_js = admin.jetstream();
    admin_js
        .publish("commands.payments.authorize_payment", "{}".into())
        .await?
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dead = skein_bus::replay::read(
            &admin,
            "DLQ",
            "dlq.>",
            skein_bus::replay::StartAt::Beginning,
        )
        .await?;
        if dead.iter().any(|m| m.subject == "dlq.COMMANDS.payments") {
            break;
        }
        ensure!(Instant::now() < deadline, "{}", refusals());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(system.refused().is_empty(), refusals());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_worker_and_the_ingress_mid_load_loses_nothing() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await?;
    let mut system = System::start(nats.url(), None, &WORKERS, 1).await?;
    let mut load = system.fault_load(1500)?;
    load.placing().await?;
    // The ingress first, while requests are surely in flight; the
    // orchestrator last: its pulled messages wait for ack_wait.
    for victim in [
        "ingress",
        "orders-1",
        "catalog-1",
        "payments-1",
        "projector-1",
        "orchestrator-1",
    ] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        system.kill(victim).await?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        system.restart(victim)?;
    }
    let (status, report) = finish(load, FAULT_LOAD_WITHIN).await?;
    system
        .explain(passed(status, &report, 1500), &report)
        .await?;
    // The ingress was gone for a while: some requests had to be sent again.
    ensure!(
        report["retries"].as_u64().unwrap_or(0) > 0,
        "no request was retried: {report:#}"
    );
    system.audit_clean(Duration::from_secs(60)).await?;
    system.no_dead_letters().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_nats_mid_load_loses_nothing_and_the_ingress_recovers_by_itself(
) -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut nats = NatsServer::start().await?;
    let system = System::start(nats.url(), None, &WORKERS, 1).await?;
    let mut load = system.fault_load(1000)?;
    load.placing().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    nats.kill();
    // While NATS is down the ingress says so: 503, not a hang.
    let mut seen = None;
    for _ in 0..50 {
        seen = get(system.http_port, "/v1/products").await.ok();
        if seen == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        seen == Some(503),
        "with NATS down GET /v1/products answered {seen:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.start_again().await?;
    let (status, report) = finish(load, FAULT_LOAD_WITHIN).await?;
    system
        .explain(passed(status, &report, 1000), &report)
        .await?;
    ensure!(
        matches!(get(system.http_port, "/v1/products").await, Ok(200)),
        "the ingress did not recover"
    );
    system.audit_clean(Duration::from_secs(60)).await?;
    system.no_dead_letters().await?;
    Ok(())
}

/// One kind of poison: where it goes, its `ce-type` (no headers at all
/// when `None`), its payload, and who must dead-letter it and why.
struct Poison {
    subject: String,
    kind: Option<String>,
    payload: &'static [u8],
    handler: &'static str,
    reason: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_poison_commands_ends_in_the_dlq_while_orders_keep_flowing() -> anyhow::Result<()>
{
    use skein_contracts::catalog::ReserveStock;
    use skein_contracts::orders::PlaceOrder;
    use skein_message::{subject, Contract};

    let _turn = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await?;
    let system = System::start(nats.url(), None, &WORKERS, 1).await?;
    let mut load = system.load(&["--orders", "600", "--concurrency", "16"])?;
    load.placing().await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let place_order = subject::command(PlaceOrder::SERVICE, PlaceOrder::NAME);
    let reserve_stock = subject::command(ReserveStock::SERVICE, ReserveStock::NAME);
    // Real command types with valid envelopes reach the handlers that own
    // them, which must refuse what they cannot decode: not JSON, and JSON
    // of the wrong shape. Then a message without any header, and a type
    // nobody handles.
    let poison = [
        Poison {
            subject: place_order.clone(),
            kind: Some(PlaceOrder::type_name().to_string()),
            payload: b"\x00\xffnot json",
            handler: "orders",
            reason: format!("invalid payload for {}", PlaceOrder::type_name()),
        },
        Poison {
            subject: reserve_stock,
            kind: Some(ReserveStock::type_name().to_string()),
            payload: br#"{"order_id": 7}"#,
            handler: "catalog",
            reason: format!("invalid payload for {}", ReserveStock::type_name()),
        },
        Poison {
            subject: "commands.payments.authorize_payment".to_owned(),
            kind: None,
            payload: b"{}",
            handler: "payments",
            reason: "no headers".to_owned(),
        },
        Poison {
            subject: place_order,
            kind: Some("poison.flood.v1".to_owned()),
            payload: br#"{"what": "ever"}"#,
            handler: "orders",
            reason: "poison.flood.v1".to_owned(),
        },
    ];
    let rounds = 50;
    // COMMANDS sequence of each poison message -> which poison it is.
    let mut sent: BTreeMap<u64, &Poison> = BTreeMap::new();
    for _ in 0..rounds {
        for p in &poison {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(kind) = &p.kind {
                let now = time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)?;
                let id = uuid::Uuid::now_v7().to_string();
                headers.insert("ce-specversion", "1.0");
                headers.insert("ce-id", id.as_str());
                headers.insert("Nats-Msg-Id", id.as_str());
                headers.insert("ce-source", "poison");
                headers.insert("ce-type", kind.as_str());
                headers.insert("ce-time", now.as_str());
                headers.insert("ce-correlationid", id.as_str());
            }
            let ack = js
                .publish_with_headers(p.subject.clone(), headers, p.payload.to_vec().into())
                .await?
                .await?;
            sent.insert(ack.sequence, p);
        }
    }
    let (status, report) = finish(load, Duration::from_secs(240)).await?;
    system
        .explain(passed(status, &report, 600), &report)
        .await?;

    // Every poison message is dead-lettered, once, by the handler that owns
    // it and for its own reason; nothing else is; and the work queue
    // drains. Dead-lettering runs on, so both are waited for.
    let bus = skein_bus::Bus::connect(&skein_bus::BusConfig::new(nats.url(), "load-test")).await?;
    let mut commands = js.get_stream("COMMANDS").await?;
    let mut dlq = js.get_stream("DLQ").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dead = dlq.info().await?.state.messages;
        let queued = commands.info().await?.state.messages;
        if dead >= sent.len() as u64 && queued == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after 60 s: {dead} dead letters for {} poison messages, {queued} commands queued",
            sent.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let letters =
        skein_bus::replay::read(&bus, "DLQ", ">", skein_bus::replay::StartAt::Beginning).await?;
    let mut dead: BTreeMap<u64, skein_bus::dlq::DeadLetterInfo> = BTreeMap::new();
    for letter in &letters {
        let info = letter
            .headers
            .as_ref()
            .and_then(skein_bus::dlq::DeadLetterInfo::from_headers)
            .with_context(|| format!("a dead letter without its headers: {letter:?}"))?;
        ensure!(
            info.stream == "COMMANDS",
            "a dead letter from elsewhere: {info:?}"
        );
        let p = sent
            .get(&info.stream_sequence)
            .with_context(|| format!("a dead letter that is not poison: {info:?}"))?;
        ensure!(
            info.handler == p.handler && info.reason.contains(&p.reason),
            "poison on {} ({:?}) dead-lettered by {} for {:?}; expected {} for {:?}",
            p.subject,
            p.kind,
            info.handler,
            info.reason,
            p.handler,
            p.reason
        );
        let first = dead.insert(info.stream_sequence, info);
        ensure!(
            first.is_none(),
            "a poison message dead-lettered twice: {first:?}"
        );
    }
    ensure!(
        dead.len() == sent.len(),
        "{} of {} poison messages dead-lettered",
        dead.len(),
        sent.len()
    );
    system.audit_clean(Duration::from_secs(60)).await?;
    Ok(())
}

/// Cuts every connection to the databases named like `prefix%` and refuses
/// new ones for `down`: to the workers this is the server restarting.
async fn cut_database_connections(prefix: &str, down: Duration) -> anyhow::Result<()> {
    use sqlx::{Connection, Row};
    let admin = skein_testkit::db::postgres_admin_url();
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    let names: Vec<String> = sqlx::query("SELECT datname FROM pg_database WHERE datname LIKE $1")
        .bind(format!("{prefix}%"))
        .fetch_all(&mut conn)
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    ensure!(
        names.len() >= 6,
        "expected the workers' databases, found {names:?}"
    );
    for name in &names {
        sqlx::query(&format!(
            "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS false"
        ))
        .execute(&mut conn)
        .await?;
    }
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname LIKE $1")
        .bind(format!("{prefix}%"))
        .execute(&mut conn)
        .await?;
    tokio::time::sleep(down).await;
    for name in &names {
        sqlx::query(&format!(
            "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS true"
        ))
        .execute(&mut conn)
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_two_copies_of_each_worker_survives_losing_the_database() -> anyhow::Result<()>
{
    let _turn = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await?;
    let db = TestDb::new(Backend::Postgres).await?;
    let template = db.sibling_url("{service}");
    let prefix = template
        .rsplit('/')
        .next()
        .and_then(|name| name.strip_suffix("{service}"))
        .context("a database name")?
        .to_owned();
    let system = System::start(nats.url(), Some(template), &WORKERS, 2).await?;
    let mut load = system.fault_load(1000)?;
    load.placing().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cut_database_connections(&prefix, Duration::from_secs(3)).await?;
    let (status, report) = finish(load, FAULT_LOAD_WITHIN).await?;
    system
        .explain(passed(status, &report, 1000), &report)
        .await?;
    system.audit_clean(Duration::from_secs(60)).await?;
    system.no_dead_letters().await?;
    drop(system);
    drop(db);
    Ok(())
}

/// One node of a 3-node nats-server cluster on loopback, with its own store.
struct ClusterNode {
    config: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl ClusterNode {
    fn start(&mut self) -> anyhow::Result<()> {
        let child = std::process::Command::new(skein_testkit::nats::find_binary()?)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start a cluster node")?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three nodes in `dir`, each on free ports, with JetStream.
fn cluster(dir: &Path) -> anyhow::Result<Vec<ClusterNode>> {
    let ports: Vec<(u16, u16)> = skein_testkit::free_ports(6)?
        .chunks(2)
        .map(|p| (p[0], p[1]))
        .collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
        .collect();
    let mut nodes = Vec::new();
    for (n, (port, route)) in ports.iter().enumerate() {
        let store = dir.join(format!("node{}", n + 1));
        std::fs::create_dir_all(&store)?;
        let config = dir.join(format!("node{}.conf", n + 1));
        std::fs::write(
            &config,
            format!(
                "server_name: n{}\nlisten: 127.0.0.1:{port}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: skein-test\n listen: 127.0.0.1:{route}\n routes: [{}] }}\n",
                n + 1,
                store.display(),
                routes.join(", ")
            ),
        )?;
        let mut node = ClusterNode {
            config,
            port: *port,
            child: None,
        };
        node.start()?;
        nodes.push(node);
    }
    Ok(nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_stopped_mid_load_loses_nothing_and_catches_up() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("skein-cluster-")
        .tempdir()?;
    let mut nodes = cluster(dir.path())?;
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("nats://127.0.0.1:{}", n.port))
        .collect();
    let url = urls.join(",");
    // Until the cluster has a JetStream meta leader, stream creation fails.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let applied = Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(["streams", "apply", "--replicas", "3", "--nats-url", &url])
            .output()
            .await?;
        if applied.status.success() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "streams apply on the cluster: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let system = System::start(url.clone(), None, &WORKERS, 1).await?;
    let mut load = system.fault_load(1000)?;
    load.placing().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    nodes[2].kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    nodes[2].start()?;
    let (status, report) = finish(load, FAULT_LOAD_WITHIN).await?;
    system
        .explain(passed(status, &report, 1000), &report)
        .await?;
    system.audit_clean(Duration::from_secs(60)).await?;
    system.no_dead_letters().await?;

    // Every stream still has three replicas (the workers' provisioning kept
    // them), and the node that was down caught up: every replica current.
    let client = async_nats::connect(urls[2].as_str()).await?;
    let js = async_nats::jetstream::new(client);
    for name in ["EVENTS", "COMMANDS", "DLQ"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = js.get_stream(name).await?.info().await?.clone();
            ensure!(
                info.config.num_replicas == 3,
                "{name}: {:?}",
                info.config.num_replicas
            );
            let cluster = info.cluster.clone().context("no cluster info")?;
            let caught_up = cluster.replicas.len() == 2
                && cluster
                    .replicas
                    .iter()
                    .all(|r| r.current && r.lag.unwrap_or(0) == 0);
            if caught_up {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{name} replicas did not catch up: {cluster:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}
