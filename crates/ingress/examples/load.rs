//! Accepted `POST /v1/orders` per second at the ingress, beside the raw
//! JetStream publish rate on the same machine.
//!
//! ```sh
//! cargo run --release -p skein-ingress --example load -- [concurrency] [seconds] [live]
//! ```
//!
//! Starts a local nats-server (testkit), identity and catalog on SQLite in a
//! temporary directory, and an ingress; registers a customer, adds a
//! product, then keeps `concurrency` (default 64) keep-alive connections
//! busy with orders for `seconds` (default 10). The orders worker is not
//! running: the commands wait on `COMMANDS`, so this measures what the
//! ingress accepts (validation, JWT, rate limit, publish with ack), not how
//! fast orders are processed. Then as many tasks publish commands straight to
//! JetStream, each awaiting its ack, for the same time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use skein_bus::provision::apply_builtin_streams;
use skein_bus::{Bus, BusConfig};
use skein_contracts::catalog::StockLine;
use skein_contracts::orders::PlaceOrder;
use skein_ingress::{Ingress, IngressConfig, RateLimit};
use skein_message::{Envelope, MessageContext};
use skein_outbox::Store;
use skein_service::HostConfig;
use uuid::Uuid;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn call(
    sender: &mut Sender,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    sender.ready().await?;
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body.to_string())))?)
        .await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let duration = Duration::from_secs(seconds);
    // `live`: GET /health/live instead, the HTTP floor of this set-up.
    let live = args.next().as_deref() == Some("live");

    let nats = skein_testkit::NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let bus = Bus::connect(&BusConfig::new(nats.url(), "load")).await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    let db = |name: &str| format!("sqlite:{}/{name}.db", dir.path().display());
    let _identity = skein_identity::start(
        Bus::connect(&BusConfig::new(nats.url(), "identity")).await?,
        Store::connect(&db("identity")).await?,
        HostConfig::new("identity"),
        Default::default(),
    )
    .await?;
    let _catalog = skein_catalog::start(
        Bus::connect(&BusConfig::new(nats.url(), "catalog")).await?,
        Store::connect(&db("catalog")).await?,
        HostConfig::new("catalog"),
    )
    .await?;
    let mut config = IngressConfig::new(([127, 0, 0, 1], 0).into());
    config.rate_limit = RateLimit {
        per_second: 1e9,
        burst: u32::MAX,
    };
    let ingress = Ingress::build(
        config,
        Bus::connect(&BusConfig::new(nats.url(), "ingress")).await?,
    )
    .await?;
    let addr = ingress.local_addr();
    tokio::spawn(ingress.run_until(std::future::pending()));

    let mut s = connect(addr).await?;
    let user =
        json!({"email": "load@example.org", "password": "a long enough password", "name": "Load"});
    let (status, _) = call(&mut s, "POST", "/v1/auth/register", None, &user).await?;
    ensure!(status == 201, "register: {status}");
    let (status, pair) = call(
        &mut s,
        "POST",
        "/v1/auth/token",
        None,
        &user
            .as_object()
            .map(|o| json!({"email": o["email"], "password": o["password"]}))
            .unwrap_or_default(),
    )
    .await?;
    ensure!(status == 200, "token: {status}");
    let token: Arc<str> = pair["access_token"].as_str().context("token")?.into();
    let product = Uuid::now_v7();
    let order = json!({"lines": [{"product_id": product, "quantity": 1}]});

    // Warm-up: the verification key, connections.
    let (status, _) = call(&mut s, "POST", "/v1/orders", Some(&token), &order).await?;
    ensure!(status == 202, "order: {status}");

    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let token = token.clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await?;
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let answer = if live {
                    call(&mut sender, "GET", "/health/live", None, &Value::Null).await
                } else {
                    call(&mut sender, "POST", "/v1/orders", Some(&token), &order).await
                };
                match answer {
                    Ok((202 | 200, _)) => latencies.push(t.elapsed()),
                    _ => failed += 1,
                }
            }
            anyhow::Ok((latencies, failed))
        }));
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await??;
        latencies.extend(l);
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "ingress  POST /v1/orders: {:>8.0} accepted/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} accepted, {} failed, concurrency {concurrency}, {seconds} s)",
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.len(),
        failed,
    );

    // Raw JetStream: publish with ack, same concurrency.
    let publisher = bus.publisher();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let command = PlaceOrder {
                    order_id: Uuid::now_v7(),
                    customer_id: Uuid::now_v7(),
                    lines: vec![StockLine {
                        product_id: product,
                        quantity: 1,
                    }],
                };
                let envelope = Envelope::command("load", &command, &MessageContext::root())?;
                let t = Instant::now();
                publisher.publish(&envelope).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "raw JetStream publish+ack:  {:>8.0} msgs/s      p50 {:>6.2} ms  p99 {:>6.2} ms  ({} published)",
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.len(),
    );
    Ok(())
}
