//! The broker's floor: what JetStream and its client library alone cost, with
//! no database and no envelope work.
//!
//! ```sh
//! cargo run --release -p skein-bus --example floor -- --nats-url nats://127.0.0.1:4222
//! cargo run --release -p skein-bus --example floor -- --nats-url URL --messages 50000 --size 512
//! ```
//!
//! It creates a file-backed stream `FLOOR` (subjects `floor.>`, R1 unless
//! `--replicas`; refused if one exists), then measures:
//!
//! 1. async: `--messages` publishes with up to `--in-flight` (default 512)
//!    awaiting their acks at once, the way the relay publishes batches;
//! 2. one at a time: `--serial` publishes (default a tenth of `--messages`),
//!    each awaiting its ack before the next is sent, the way one request
//!    through the ingress waits;
//! 3. saga-shaped chains: `--chains` (default 10,000) runs of the message
//!    pattern of one place-order saga, `--chain-in-flight` (default 64) at
//!    a time. A chain is 8 messages, each published by the stage before
//!    (its publish ack awaited), pulled by a durable consumer of its own
//!    (batches of 64, as a worker pulls) and acknowledged once the next
//!    message is stored, as a worker acknowledges after its handler's
//!    outbox commit; messages 2 and 8 (the saga's `order_placed` and
//!    `order_confirmed`) also go to an observer consumer, as they go to
//!    the projector: 8 publishes, 10 deliveries and 10 acks per chain. Each
//!    stage has its own connection, as each worker process has. Reported
//!    with the CPU time the whole machine spent per chain (`/proc/stat`),
//!    this is the rate the broker and client library allow for sagas on
//!    this machine before any service does any work.
//!
//! Every message carries `--size` payload bytes (default 256) and a unique
//! `Nats-Msg-Id` (so the duplicate window is paid for, as in skein). The
//! stream is deleted at the end. Run it against nats-servers with different
//! settings (`sync_interval: always`, a cluster with `--replicas 3`) to see
//! what durability costs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use skein_testkit::cpu::CpuTicks;
use tokio::sync::mpsc;

const STREAM: &str = "FLOOR";

#[derive(Debug)]
struct Options {
    nats_url: String,
    messages: usize,
    serial: Option<usize>,
    size: usize,
    in_flight: usize,
    replicas: usize,
    chains: usize,
    chain_in_flight: usize,
}

fn usage() -> &'static str {
    "usage: floor --nats-url URL [--messages N] [--serial N] [--size BYTES] [--in-flight N] [--replicas N] [--chains N] [--chain-in-flight N]"
}

fn parse_args() -> anyhow::Result<Options> {
    let mut options = Options {
        nats_url: String::new(),
        messages: 20_000,
        serial: None,
        size: 256,
        in_flight: 512,
        replicas: 1,
        chains: 10_000,
        chain_in_flight: 64,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{}", usage());
            std::process::exit(0);
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{}", usage()))?;
        let number = || {
            value
                .parse::<usize>()
                .with_context(|| format!("{flag} takes a number, not {value:?}"))
        };
        match flag.as_str() {
            "--nats-url" => options.nats_url = value.clone(),
            "--messages" => options.messages = number()?,
            "--serial" => options.serial = Some(number()?),
            "--size" => options.size = number()?,
            "--in-flight" => options.in_flight = number()?.max(1),
            "--replicas" => options.replicas = number()?.max(1),
            "--chains" => options.chains = number()?,
            "--chain-in-flight" => options.chain_in_flight = number()?.max(1),
            other => bail!("unknown flag {other}\n{}", usage()),
        }
    }
    if options.nats_url.is_empty() {
        bail!("--nats-url is required\n{}", usage());
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse_args()?;
    let client = connect_client(options.nats_url.as_str()).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(options.in_flight)
        .backpressure_on_inflight(true)
        .build(client.clone());
    if js.get_stream(STREAM).await.is_ok() {
        bail!("a stream {STREAM} exists already; this example creates and deletes its own");
    }
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["floor.>".into()],
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("cannot create the FLOOR stream")?;

    let result = measure(&js, &options).await;
    let chained = match &result {
        Ok(_) if options.chains > 0 => Some(chains(&js, &options).await),
        _ => None,
    };
    let deleted = js.delete_stream(STREAM).await;
    let (async_rate, serial_rate) = result?;
    let chained = chained.transpose()?;
    deleted.context("cannot delete the FLOOR stream")?;

    let serial = options.serial.unwrap_or(options.messages / 10).max(1);
    println!(
        "{} B payload, R{}: async ({} in flight, {} messages) {async_rate:.0}/s; one at a time ({serial} messages) {serial_rate:.0}/s",
        options.size, options.replicas, options.in_flight, options.messages
    );
    if let Some(chained) = chained {
        println!(
            "saga-shaped chains (8 publishes, 10 deliveries and acks each; {} in flight, {} chains): {:.0} chains/s, machine {:.0} % busy, {:.2} ms CPU per chain",
            options.chain_in_flight,
            options.chains,
            chained.rate,
            chained.busy_percent,
            chained.cpu_ms_per_chain
        );
    }
    Ok(())
}

async fn measure(js: &jetstream::Context, options: &Options) -> anyhow::Result<(f64, f64)> {
    let payload = Bytes::from(vec![b'x'; options.size]);
    let mut next_id = 0u64;
    let mut message = || {
        next_id += 1;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("floor-{next_id}").as_str());
        (format!("floor.{}", next_id % 64), headers)
    };

    // Async: a sliding window of acks in flight.
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(options.in_flight);
    for _ in 0..options.messages {
        if pending.len() >= options.in_flight {
            if let Some(ack) = pending.pop_front() {
                check(ack).await?;
            }
        }
        let (subject, headers) = message();
        let ack = js
            .publish_with_headers(subject, headers, payload.clone())
            .await
            .context("publish failed")?;
        pending.push_back(ack);
    }
    while let Some(ack) = pending.pop_front() {
        check(ack).await?;
    }
    let async_rate = options.messages as f64 / started.elapsed().as_secs_f64();

    // One at a time: each ack awaited before the next publish.
    let serial = options.serial.unwrap_or(options.messages / 10).max(1);
    let started = Instant::now();
    for _ in 0..serial {
        let (subject, headers) = message();
        let ack = js
            .publish_with_headers(subject, headers, payload.clone())
            .await
            .context("publish failed")?;
        check(ack).await?;
    }
    let serial_rate = serial as f64 / started.elapsed().as_secs_f64();
    Ok((async_rate, serial_rate))
}

async fn check(ack: jetstream::context::PublishAckFuture) -> anyhow::Result<()> {
    let ack = ack.await.context("no ack")?;
    if ack.duplicate {
        bail!("the server took a message for a duplicate");
    }
    Ok(())
}

/// Stages in a chain: the place-order saga's messages (place, placed,
/// reserve, reserved, authorize, authorized, confirm, confirmed).
const HOPS: usize = 8;
/// The hops an observer (the projector) also consumes.
const OBSERVED: [usize; 2] = [2, HOPS];

/// What the chains measured.
#[derive(Debug)]
struct Chained {
    rate: f64,
    busy_percent: f64,
    cpu_ms_per_chain: f64,
}

/// Runs `--chains` saga-shaped chains (see the module docs) and measures
/// their rate and the machine's CPU time per chain.
async fn chains(js: &jetstream::Context, options: &Options) -> anyhow::Result<Chained> {
    let (done_tx, mut done) = mpsc::channel::<u64>(options.chain_in_flight.max(1));
    let mut stages = Vec::new();
    for hop in 1..=HOPS {
        let connection = connect(options).await?;
        let stream = connection.get_stream(STREAM).await?;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("hop{hop}")),
                filter_subject: format!("floor.hop.{hop}"),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create the consumer of hop {hop}"))?;
        let done = (hop == HOPS).then(|| done_tx.clone());
        stages.push(tokio::spawn(stage(connection, consumer, hop, done)));
    }
    let observer = connect(options).await?;
    let consumer = observer
        .get_stream(STREAM)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some("observer".into()),
            filter_subjects: OBSERVED.iter().map(|h| format!("floor.hop.{h}")).collect(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .context("cannot create the observer's consumer")?;
    stages.push(tokio::spawn(stage(observer, consumer, 0, None)));
    drop(done_tx);

    let payload = vec![b'x'; options.size.max(8)];
    let start = |chain: u64| {
        let mut body = payload.clone();
        body[..8].copy_from_slice(&chain.to_le_bytes());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("chain-{chain}-1").as_str());
        js.publish_with_headers("floor.hop.1", headers, Bytes::from(body))
    };
    let aborts: Vec<_> = stages.iter().map(|s| s.abort_handle()).collect();
    let mut running: FuturesUnordered<_> = stages.into_iter().collect();
    let cpu = CpuTicks::now();
    let started = Instant::now();
    let total = options.chains as u64;
    let mut next = 0u64;
    let mut finished = 0u64;
    let outcome = async {
        while next < total.min(options.chain_in_flight as u64) {
            check(start(next).await?).await?;
            next += 1;
        }
        while finished < total {
            tokio::select! {
                chain = done.recv() => {
                    chain.context("the last stage stopped")?;
                }
                // A stage runs until it is aborted: one that ends failed.
                Some(stopped) = running.next() => match stopped {
                    Ok(Ok(())) => bail!("a stage's pull stream ended"),
                    Ok(Err(e)) => return Err(e.context("a stage failed")),
                    Err(e) => bail!("a stage panicked: {e}"),
                },
                _ = tokio::time::sleep(Duration::from_secs(30)) => {
                    bail!("no chain finished for 30 s")
                }
            }
            finished += 1;
            if next < total {
                check(start(next).await?).await?;
                next += 1;
            }
        }
        Ok(())
    }
    .await;
    let elapsed = started.elapsed();
    let spent = CpuTicks::now()
        .zip(cpu)
        .map(|(now, before)| now.since(before));
    for stage in &aborts {
        stage.abort();
    }
    outcome?;
    let spent = spent.context("cannot read the machine's CPU time (/proc/stat)")?;
    Ok(Chained {
        rate: total as f64 / elapsed.as_secs_f64(),
        busy_percent: spent.busy_share * 100.0,
        cpu_ms_per_chain: spent.cpu_seconds * 1000.0 / total.max(1) as f64,
    })
}

/// A connection as skein's processes make it: credentials and TLS from
/// `NATS_USER`/`NATS_PASSWORD`, `NATS_TOKEN`, `NATS_CA`, `NATS_CERT`/`NATS_KEY`
/// or the URL (the user must be allowed `floor.>` and `$JS.API.>`).
async fn connect_client(url: &str) -> anyhow::Result<async_nats::Client> {
    let config = skein_bus::BusConfig::from_env(url, "skein-floor")?;
    let bus = skein_bus::Bus::connect(&config)
        .await
        .with_context(|| format!("cannot connect to {}", skein_bus::redact_url(url)))?;
    Ok(bus.client().clone())
}

async fn connect(options: &Options) -> anyhow::Result<jetstream::Context> {
    let client = connect_client(options.nats_url.as_str()).await?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client))
}

/// One stage: pulls its hop's messages, publishes each chain's next message
/// and acknowledges a message once its successor is stored. The last hop
/// reports the chain finished; the observer (`hop` 0) only acknowledges.
async fn stage(
    js: jetstream::Context,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    hop: usize,
    done: Option<mpsc::Sender<u64>>,
) -> anyhow::Result<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(64)
        .messages()
        .await?;
    let mut stored = FuturesUnordered::new();
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return Ok(()) };
                let message = message.map_err(|e| anyhow::anyhow!("pull failed: {e}"))?;
                let chain = message
                    .payload
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes)
                    .context("a chain message without its chain number")?;
                if hop == 0 || hop == HOPS {
                    message.ack().await.map_err(|e| anyhow::anyhow!("ack failed: {e}"))?;
                    if let Some(done) = &done {
                        done.send(chain).await?;
                    }
                    continue;
                }
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("chain-{chain}-{}", hop + 1).as_str());
                let ack = js
                    .publish_with_headers(format!("floor.hop.{}", hop + 1), headers, message.payload.clone())
                    .await?;
                stored.push(async move { check(ack).await.map(|()| message) });
            }
            Some(next) = stored.next(), if !stored.is_empty() => {
                next?.ack().await.map_err(|e| anyhow::anyhow!("ack failed: {e}"))?;
            }
        }
    }
}
