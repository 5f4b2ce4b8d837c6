//! `skein-catalog`, the catalog worker as its own process: the part every
//! per-worker binary shares (`skein_service::standalone`), run for real.

use std::time::Duration;

use anyhow::{ensure, Context};
use skein_testkit::{eventually, free_port, Backend, NatsServer, TestDb};

/// A GET on a fresh connection: the status and the body.
async fn get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(skein_testkit::http::request(port, "GET", path, &[], None).await?)
}

/// `skein-catalog` on `nats` and the database `database_url`, its errors
/// piped; more settings go on top.
fn worker(nats: &NatsServer, database_url: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein-catalog"));
    command
        .env("NATS_URL", nats.url())
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

fn spawn(nats: &NatsServer, db: &TestDb, health: &str) -> std::io::Result<tokio::process::Child> {
    worker(nats, db.url())
        .env("SKEIN_HEALTH_HTTP", health)
        .spawn()
}

/// Waits until the worker on `port` answers 200 on `/health/ready`; its
/// answer.
async fn until_ready(port: u16) -> anyhow::Result<String> {
    let (_, ready) = eventually(Duration::from_secs(30), || async {
        get(port, "/health/ready")
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .context("the binary never answered 200 on /health/ready")?;
    Ok(ready)
}

/// `SKEIN_HEALTH_HTTP` gives the binary the health endpoint `skein worker
/// --health-http` has: live and ready while it runs; a taken address or a
/// malformed one fails the start with a message naming the variable; SIGTERM
/// stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_its_health_endpoint_and_stops_on_sigterm() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let db = TestDb::new(Backend::Sqlite).await?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut worker = spawn(&nats, &db, &addr)?;
    let ready: serde_json::Value = serde_json::from_str(&until_ready(port).await?)?;
    ensure!(
        ready["status"] == "ok" && ready["workers"]["catalog"]["database"] == true,
        "ready: {ready}"
    );
    let (code, live) = get(port, "/health/live").await?;
    ensure!(code == 200, "live: {code} {live}");

    for (health, says) in [
        (addr.as_str(), "cannot listen on"),
        ("localhost-9090", "SKEIN_HEALTH_HTTP"),
    ] {
        let failed = tokio::time::timeout(
            Duration::from_secs(30),
            spawn(&nats, &db, health)?.wait_with_output(),
        )
        .await
        .with_context(|| format!("a start with SKEIN_HEALTH_HTTP={health} did not fail"))??;
        let stderr = String::from_utf8_lossy(&failed.stderr);
        ensure!(
            !failed.status.success()
                && stderr.contains(says)
                && stderr.contains("SKEIN_HEALTH_HTTP"),
            "SKEIN_HEALTH_HTTP={health}: {}, {stderr}",
            failed.status
        );
    }

    let pid = worker.id().context("the worker exited early")?;
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    let status = tokio::time::timeout(Duration::from_secs(15), worker.wait())
        .await
        .context("did not stop on SIGTERM")??;
    ensure!(status.success(), "exited with {status}");
    Ok(())
}

/// `DATABASE_URL` as a template, as `skein worker` takes it (compose.yaml's
/// `…/skein_{service}`): the binary opens its own database, `catalog.db`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_a_database_url_template() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let template = format!("sqlite:{}/{{service}}.db", dir.path().display());
    let mut worker = worker(&nats, &template)
        .env("SKEIN_HEALTH_HTTP", format!("127.0.0.1:{port}"))
        .spawn()?;
    until_ready(port).await?;
    let files: Vec<String> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".db"))
        .collect();
    ensure!(files == ["catalog.db"], "databases: {files:?}");
    worker.kill().await?;
    Ok(())
}

/// `SKEIN_DATABASE_POOL` and `SKEIN_SQLITE_CACHE_KIB` are read as `skein
/// worker` reads them: a value that is not a whole number of at least 1
/// fails the start with a message naming the variable; a good one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_its_database_settings() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let db = TestDb::new(Backend::Sqlite).await?;
    for (variable, value) in [
        ("SKEIN_DATABASE_POOL", "0"),
        ("SKEIN_SQLITE_CACHE_KIB", "a lot"),
    ] {
        let output = worker(&nats, db.url()).env(variable, value).output();
        let failed = tokio::time::timeout(Duration::from_secs(30), output)
            .await
            .with_context(|| format!("{variable}={value} did not fail the start"))??;
        let stderr = String::from_utf8_lossy(&failed.stderr);
        ensure!(
            !failed.status.success() && stderr.contains(variable),
            "{variable}={value}: {}, {stderr}",
            failed.status
        );
    }
    let port = free_port()?;
    let mut worker = worker(&nats, db.url())
        .env("SKEIN_HEALTH_HTTP", format!("127.0.0.1:{port}"))
        .env("SKEIN_DATABASE_POOL", "2")
        .env("SKEIN_SQLITE_CACHE_KIB", "512")
        .spawn()?;
    until_ready(port).await?;
    worker.kill().await?;
    Ok(())
}
