//! An ephemeral nats-server with JetStream, one per test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{Error, Result};

/// A running nats-server on `127.0.0.1:<free port>` with a temporary store.
///
/// Killed (SIGKILL) on drop; its store directory is removed with it.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    /// The server's name, unique: what tells this server from another that
    /// got the same port first.
    name: String,
    store: TempDir,
    extra_args: Vec<String>,
    secured: Secured,
    child: Option<Child>,
}

/// What a server asks of its clients: credentials, TLS, client
/// certificates (from [`tls_dir`]).
#[derive(Debug, Clone, Default)]
pub struct Secured {
    /// A user and password every client must give.
    pub user_password: Option<(String, String)>,
    /// A token every client must give (instead of a user).
    pub token: Option<String>,
    /// TLS with the test server certificate.
    pub tls: bool,
    /// Clients must present a certificate signed by the test CA (implies
    /// `tls`).
    pub verify_clients: bool,
    /// An `authorization { ... }` block of nats-server's configuration
    /// (users with permissions, say), in place of `user_password`'s flags;
    /// `user_password` is then what the harness itself connects with.
    pub authorization: Option<String>,
    /// The server's environment besides the harness's (what
    /// `$VARIABLE`s in `authorization` read).
    pub env: Vec<(String, String)>,
}

impl Secured {
    /// The server's arguments; a configuration file, when one is needed,
    /// is written into `dir`.
    fn args(&self, dir: &Path) -> Result<Vec<String>> {
        let file = |name: &str| tls_dir().join(name).display().to_string();
        let mut args = Vec::new();
        if let Some(authorization) = &self.authorization {
            let config = dir.join("skein-test.conf");
            std::fs::write(&config, authorization).map_err(|source| Error::Io {
                context: format!("cannot write {}", config.display()),
                source,
            })?;
            args.extend(["-c".into(), config.display().to_string()]);
        } else if let Some((user, password)) = &self.user_password {
            args.extend([
                "--user".into(),
                user.clone(),
                "--pass".into(),
                password.clone(),
            ]);
        }
        if let Some(token) = &self.token {
            args.extend(["--auth".into(), token.clone()]);
        }
        if self.tls || self.verify_clients {
            args.extend([
                "--tls".into(),
                "--tlscert".into(),
                file("server.pem"),
                "--tlskey".into(),
                file("server-key.pem"),
            ]);
        }
        if self.verify_clients {
            args.extend(["--tlsverify".into(), "--tlscacert".into(), file("ca.pem")]);
        }
        Ok(args)
    }

    /// What a client needs to be let in.
    fn client(&self, mut options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        if let Some((user, password)) = &self.user_password {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if self.tls || self.verify_clients {
            options = options.add_root_certificates(tls_dir().join("ca.pem"));
        }
        if self.verify_clients {
            options = options.add_client_certificate(
                tls_dir().join("client.pem"),
                tls_dir().join("client-key.pem"),
            );
        }
        options
    }
}

/// The test CA, server and client certificates and keys (`ca.pem`,
/// `server.pem`, `server-key.pem`, `client.pem`, `client-key.pem`): for
/// tests only, their keys are public.
pub fn tls_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tls")
}

impl NatsServer {
    /// Starts a new server and waits until JetStream answers.
    pub async fn start() -> Result<Self> {
        Self::start_with_args(&[]).await
    }

    /// Starts a new server that asks `secured` of its clients.
    pub async fn start_secured(secured: Secured) -> Result<Self> {
        Self::start_with(&[], secured).await
    }

    /// Starts a new server with extra command-line arguments. They must not
    /// name the server (`-n`): the harness names each server uniquely, to
    /// tell it from another that got its port.
    pub async fn start_with_args(args: &[&str]) -> Result<Self> {
        Self::start_with(args, Secured::default()).await
    }

    async fn start_with(args: &[&str], secured: Secured) -> Result<Self> {
        let binary = find_binary()?;
        let mut last_error = None;
        // A free port can be taken between choosing it and the server binding
        // it; try a few.
        for _ in 0..5 {
            let mut server = Self {
                binary: binary.clone(),
                port: free_port()?,
                name: format!("skein-test-{}", uuid::Uuid::now_v7().simple()),
                store: tempfile::Builder::new()
                    .prefix("skein-nats-")
                    .tempdir()
                    .map_err(|source| Error::Io {
                        context: "cannot create a store directory for nats-server".into(),
                        source,
                    })?,
                extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
                secured: secured.clone(),
                child: None,
            };
            match server.start_process().await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::NatsServerStart("no attempt made".into())))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on; the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory; the same across restarts.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server's process without ending it (SIGSTOP): connections
    /// stay open and nothing is answered, as a server stalled on its disk
    /// would be; [`NatsServer::resume`] lets it go on with what it was sent.
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")?;
        // The signal is sent when `kill` returns, not yet acted on by every
        // thread of the server: until then it may still answer.
        let pid = self.pid()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            if std::time::Instant::now() >= deadline {
                return Err(Error::Io {
                    context: "nats-server did not stop within 5 s of SIGSTOP".into(),
                    source: std::io::Error::other("some of its threads still run"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Lets a [`NatsServer::pause`]d server go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn pid(&self) -> Result<u32> {
        self.child.as_ref().map(Child::id).ok_or_else(|| Error::Io {
            context: "nats-server is not running".into(),
            source: std::io::Error::other("no process"),
        })
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let failed = |source| Error::Io {
            context: format!("cannot send {signal} to nats-server"),
            source,
        };
        let pid = self.pid()?;
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .map_err(failed)?;
        if status.success() {
            Ok(())
        } else {
            Err(failed(std::io::Error::other(format!(
                "kill exited with {status}"
            ))))
        }
    }

    /// Starts the server again on the same port with the same store, and
    /// waits until JetStream answers.
    pub async fn start_again(&mut self) -> Result<()> {
        self.kill();
        self.start_process().await
    }

    /// Kills and starts the server again.
    pub async fn restart(&mut self) -> Result<()> {
        self.start_again().await
    }

    async fn start_process(&mut self) -> Result<()> {
        let log = self.store.path().join("nats-server.log");
        let mut command = Command::new(&self.binary);
        command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-n", &self.name])
            .arg("-js")
            .arg("-sd")
            .arg(self.store.path())
            .arg("-l")
            .arg(&log)
            .args(&self.extra_args)
            .args(self.secured.args(self.store.path())?)
            .envs(self.secured.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|e| {
            Error::NatsServerStart(format!("cannot run {}: {e}", self.binary.display()))
        })?;
        self.child = Some(child);

        let url = self.url();
        let name = self.name.clone();
        let pid = self.child.as_ref().map(std::process::Child::id);
        // Ready when JetStream answers, and it is this server that does: if
        // another test's server took the port first, this one exits, and the
        // one answering has another name (the port is tried again). One that
        // exited (the port held by something else) is not waited for.
        let ready = crate::eventually(Duration::from_secs(10), || {
            let (url, name) = (url.clone(), name.clone());
            let options = self.secured.client(
                async_nats::ConnectOptions::new().connection_timeout(Duration::from_millis(500)),
            );
            async move {
                if pid.is_some_and(exited) {
                    return Some(false);
                }
                let client = options.connect(&url).await.ok()?;
                if client.server_info().server_name != name {
                    return Some(false);
                }
                let js = async_nats::jetstream::new(client);
                js.query_account().await.ok().map(|_| true)
            }
        })
        .await;
        let ready = match ready {
            Some(true) => Some(()),
            Some(false) => {
                self.kill();
                return Err(Error::NatsServerStart(format!(
                    "another server answers on {url}: the port was taken"
                )));
            }
            None => None,
        };
        if ready.is_none() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .map(|status| format!(" (exited: {status})"))
                .unwrap_or_default();
            let tail = std::fs::read_to_string(&log)
                .map(|l| l.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
                .unwrap_or_default();
            self.kill();
            return Err(Error::NatsServerStart(format!(
                "no JetStream answer on {url} within 10s{exited}; log: {tail}"
            )));
        }
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on loopback (free when asked; bind it soon).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
        context: "cannot bind a loopback port".into(),
        source,
    })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| Error::Io {
            context: "cannot read the bound port".into(),
            source,
        })
}

/// `n` different free TCP ports on loopback, held together while they
/// are picked (one at a time, a port just freed can come back).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
                context: "cannot bind a loopback port".into(),
                source,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|source| Error::Io {
                    context: "cannot read the bound port".into(),
                    source,
                })
        })
        .collect()
}

/// Finds a nats-server >= 2.10: `$SKEIN_NATS_SERVER`, the project's
/// `.tools/bin/nats-server` (installed by `nats/find-nats-server.sh`), or PATH.
pub fn find_binary() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("SKEIN_NATS_SERVER") {
        candidates.push(PathBuf::from(path));
    }
    if let Some(dir) = std::env::var_os("SKEIN_TOOLS_DIR") {
        candidates.push(PathBuf::from(dir).join("bin/nats-server"));
    }
    candidates.push(root.join(".tools/bin/nats-server"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    let mut seen = Vec::new();
    for candidate in candidates {
        if !candidate.is_file() {
            continue;
        }
        match version_of(&candidate) {
            Some((major, minor)) if (major, minor) >= (2, 10) => return Ok(candidate),
            Some((major, minor)) => {
                seen.push(format!("{} is {major}.{minor}", candidate.display()))
            }
            None => seen.push(format!("{} does not run", candidate.display())),
        }
    }
    Err(Error::NatsServerMissing(format!(
        "{}; run nats/find-nats-server.sh (it installs one into .tools/bin) or set SKEIN_NATS_SERVER",
        if seen.is_empty() { "none on PATH or in .tools/bin".to_owned() } else { seen.join(", ") }
    )))
}

fn version_of(binary: &Path) -> Option<(u32, u32)> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.12.8"
    let v = text.rsplit(" v").next()?;
    let mut parts = v.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether process `pid` (a child of this one) has exited: gone, or a
/// zombie not yet reaped (Linux; elsewhere nothing tells, so `false`).
fn exited(pid: u32) -> bool {
    if !std::path::Path::new("/proc/self").exists() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// Whether every thread of process `pid` is stopped (state `T` in
/// `/proc/<pid>/task/<tid>/stat`); `true` off Linux, where nothing tells.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return !std::path::Path::new("/proc/self").exists();
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // `pid (comm) S ...`: the state follows the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server whose port another test's server took first is not
    /// mistaken for its own: the start fails (and `start` tries another
    /// port) instead of two tests sharing one broker.
    #[tokio::test]
    async fn a_server_started_on_a_port_another_holds_is_refused() -> Result<()> {
        let first = NatsServer::start().await?;
        let mut second = NatsServer {
            binary: first.binary.clone(),
            port: first.port(),
            name: "skein-test-second".into(),
            store: tempfile::tempdir().map_err(|source| Error::Io {
                context: "cannot create a store directory".into(),
                source,
            })?,
            extra_args: Vec::new(),
            secured: Secured::default(),
            child: None,
        };
        match second.start_process().await {
            Err(Error::NatsServerStart(why)) => assert!(why.contains("another server"), "{why}"),
            other => panic!("a start on a taken port gave {other:?}"),
        }
        Ok(())
    }
}
