//! Relay and consumer throughput on a real nats-server and database.
//!
//! ```sh
//! cargo run --release -p skein-outbox --example throughput -- sqlite 50000
//! cargo run --release -p skein-outbox --example throughput -- postgres 50000
//! ```
//!
//! Needs what the tests need (see the README): a nats-server >= 2.10 and, for
//! postgres, `SKEIN_TEST_POSTGRES_URL` or a local server. It measures, on a
//! fresh stream and database:
//!
//! 1. commit: N events written by transactions of 100 events each;
//! 2. relay: from the first poll to every row acknowledged by JetStream and
//!    marked published (events/s committed-to-acked);
//! 3. consumer: one worker copy (16 lanes) applying every event through the
//!    inbox, the deliveries that wait together in one transaction (messages/s);
//! 4. raw: JetStream async publish of N messages, no database (the ceiling).
//!
//! Each phase also reports how busy the whole machine was and the CPU time
//! it spent per event (every process counts: nats-server, a local
//! PostgreSQL, this program), so the phases add up to what a message costs.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use skein_bus::provision::{apply_builtin_streams, EVENTS};
use skein_bus::{Bus, BusConfig, Delivery, HandlerError, Outgoing, Worker, WorkerConfig};
use skein_message::{Contract, Envelope, Event, MessageContext};
use skein_outbox::{Inbox, Migration, Relay, RelayConfig, Store, Tx, TxHandler};
use skein_testkit::cpu::CpuTicks;
use skein_testkit::{eventually, Backend, NatsServer, TestDb};

#[derive(Serialize, Deserialize)]
struct Tick {
    entity: String,
    n: i64,
}
impl Contract for Tick {
    const SERVICE: &'static str = "bench";
    const NAME: &'static str = "tick";
    const VERSION: u32 = 1;
}
impl Event for Tick {
    fn entity_id(&self) -> String {
        self.entity.clone()
    }
}

const TABLE: &[Migration] = &[Migration {
    version: 1,
    description: "applied ticks",
    sqlite: "CREATE TABLE ticks (entity TEXT NOT NULL, n BIGINT NOT NULL);",
    postgres: "CREATE TABLE ticks (entity TEXT NOT NULL, n BIGINT NOT NULL);",
}];

struct Apply;
impl TxHandler for Apply {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        let tick: Tick = delivery.envelope.decode()?;
        sqlx::query("INSERT INTO ticks (entity, n) VALUES ($1, $2)")
            .bind(tick.entity)
            .bind(tick.n)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

/// The rate of a phase that handled `n` events in `d`, and what the whole
/// machine spent on each (every process counts: nats-server, a local
/// PostgreSQL, this program).
fn rate(n: usize, d: Duration, cpu: Option<CpuTicks>) -> String {
    let spent = CpuTicks::now()
        .zip(cpu)
        .map(|(now, before)| now.since(before))
        .map(|s| {
            format!(
                ", machine {:.0} % busy, {:.0} us CPU per event",
                s.busy_share * 100.0,
                s.cpu_seconds * 1e6 / n.max(1) as f64
            )
        })
        .unwrap_or_default();
    format!(
        "{:>9.0}/s ({n} in {:.2}s){spent}",
        n as f64 / d.as_secs_f64(),
        d.as_secs_f64()
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let backend = match args.next().as_deref() {
        Some("sqlite") | None => Backend::Sqlite,
        Some("postgres") => Backend::Postgres,
        Some(other) => bail!("unknown backend {other:?}: use sqlite or postgres"),
    };
    let n: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()
        .context("the event count must be a number")?
        .unwrap_or(20_000);

    let nats = NatsServer::start().await?;
    let bus = Bus::connect(&BusConfig::new(nats.url(), "bench")).await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    let db = TestDb::new(backend).await?;
    let store = Store::connect(db.url()).await?;
    store.migrate("bench", TABLE).await?;
    println!("backend {backend}, {n} events");

    // 1. commit
    let cpu = CpuTicks::now();
    let started = Instant::now();
    let ctx = MessageContext::root();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut tx = store.begin().await?;
        for &i in chunk {
            let tick = Tick {
                entity: format!("e{}", i % 64),
                n: i as i64,
            };
            tx.publish(&Envelope::event("bench", &tick, &ctx)?);
        }
        tx.commit().await?;
    }
    println!("commit   {}", rate(n, started.elapsed(), cpu));

    // 2. relay
    let relay = Relay::new(store.clone(), bus.publisher(), RelayConfig::default());
    let cpu = CpuTicks::now();
    let started = Instant::now();
    let published = relay.drain().await?;
    let relay_time = started.elapsed();
    if store.outbox_backlog().await? != 0 || published != n {
        bail!("relay published {published} of {n}");
    }
    println!("relay    {}", rate(n, relay_time, cpu));

    // 3. consumer
    let cpu = CpuTicks::now();
    let started = Instant::now();
    let worker = Worker::start(
        &bus,
        WorkerConfig::new("bench", EVENTS, vec!["events.bench.>".into()]),
        Inbox::new(store.clone(), "bench", Apply),
    )
    .await?;
    eventually(Duration::from_secs(600), || async {
        (worker.stats().snapshot().handled as usize >= n).then_some(())
    })
    .await
    .context("the consumer did not finish")?;
    let consumer_time = started.elapsed();
    let consumer = rate(n, consumer_time, cpu);
    worker.shutdown().await;
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ticks")
        .fetch_one(store.pool())
        .await?;
    if applied as usize != n {
        bail!("applied {applied} of {n}");
    }
    println!("consumer {consumer}");

    // 4. raw JetStream publish, same message sizes, no database.
    let messages: Vec<Outgoing> = (0..n)
        .map(|i| {
            let tick = Tick {
                entity: format!("e{}", i % 64),
                n: i as i64,
            };
            Envelope::event("bench", &tick, &ctx).map(|e| Outgoing::from(&e))
        })
        .collect::<Result<_, _>>()?;
    let publisher = bus.publisher();
    let cpu = CpuTicks::now();
    let started = Instant::now();
    for chunk in messages.chunks(512) {
        for result in publisher.publish_batch(chunk).await {
            result?;
        }
    }
    println!("raw      {}", rate(n, started.elapsed(), cpu));
    Ok(())
}
