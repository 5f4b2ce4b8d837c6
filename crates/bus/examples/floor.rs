//! Raw JetStream publish throughput: the floor under everything skein
//! publishes (the relay, the ingress), with no database and no envelope work.
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
//!    through the ingress waits.
//!
//! Every message carries `--size` payload bytes (default 256) and a unique
//! `Nats-Msg-Id` (so the duplicate window is paid for, as in skein). The
//! stream is deleted at the end. Run it against nats-servers with different
//! settings (`sync_interval: always`, a cluster with `--replicas 3`) to see
//! what durability costs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;

const STREAM: &str = "FLOOR";

#[derive(Debug)]
struct Options {
    nats_url: String,
    messages: usize,
    serial: Option<usize>,
    size: usize,
    in_flight: usize,
    replicas: usize,
}

fn usage() -> &'static str {
    "usage: floor --nats-url URL [--messages N] [--serial N] [--size BYTES] [--in-flight N] [--replicas N]"
}

fn parse_args() -> anyhow::Result<Options> {
    let mut options = Options {
        nats_url: String::new(),
        messages: 20_000,
        serial: None,
        size: 256,
        in_flight: 512,
        replicas: 1,
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
    let client = async_nats::connect(options.nats_url.as_str())
        .await
        .with_context(|| format!("cannot connect to {}", options.nats_url))?;
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
    let deleted = js.delete_stream(STREAM).await;
    let (async_rate, serial_rate) = result?;
    deleted.context("cannot delete the FLOOR stream")?;

    let serial = options.serial.unwrap_or(options.messages / 10).max(1);
    println!(
        "{} B payload, R{}: async ({} in flight, {} messages) {async_rate:.0}/s; one at a time ({serial} messages) {serial_rate:.0}/s",
        options.size, options.replicas, options.in_flight, options.messages
    );
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
