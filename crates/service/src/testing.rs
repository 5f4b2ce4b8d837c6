//! Helpers for worker tests (feature `testing`): a real nats-server with the
//! streams, a database per service next to each other, and typed ways to
//! send commands and wait for events.

use std::time::Duration;

use skein_bus::dlq::DeadLetterInfo;
use skein_bus::provision::{apply_builtin_streams, DLQ, EVENTS};
use skein_bus::replay::{read, StartAt};
use skein_bus::{Bus, BusConfig};
use skein_contracts::{Caller, Role};
use skein_message::{Command, Envelope, Event, MessageContext};
use skein_outbox::{Store, StoreConfig};
use skein_testkit::{Backend, NatsServer, TestDb};
use uuid::Uuid;

/// A boxed error for test helpers.
pub type TestError = Box<dyn std::error::Error + Send + Sync>;

/// A nats-server with the streams applied and a database server.
#[derive(Debug)]
pub struct Platform {
    /// The nats-server; restart or kill it to test failures.
    pub nats: NatsServer,
    /// A connection for the test itself.
    pub bus: Bus,
    /// The database the test's services get siblings of.
    pub db: TestDb,
}

impl Platform {
    /// Starts nats-server, applies the streams and prepares `backend`.
    pub async fn start(backend: Backend) -> Result<Self, TestError> {
        skein_testkit::init_tracing();
        let nats = NatsServer::start().await?;
        let bus = Bus::connect(&BusConfig::new(nats.url(), "test")).await?;
        apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
        let db = TestDb::new(backend).await?;
        Ok(Self { nats, bus, db })
    }

    /// A new connection, as another process would have.
    pub async fn connect(&self, name: &str) -> Result<Bus, TestError> {
        Ok(Bus::connect(&BusConfig::new(self.nats.url(), name)).await?)
    }

    /// The store of `service`: its own database on the test backend, with
    /// a small pool (a test opens several stores, and tests run in
    /// parallel against one PostgreSQL server with a connection limit).
    pub async fn store(&self, service: &str) -> Result<Store, TestError> {
        let mut config = StoreConfig::new(self.db.sibling_url(service));
        config.max_connections = config.max_connections.min(3);
        Ok(Store::connect_with(config).await?)
    }

    /// Publishes a command to the `COMMANDS` stream.
    pub async fn send<C: Command>(&self, command: &C) -> Result<Envelope, TestError> {
        let envelope = Envelope::command("test", command, &MessageContext::root())?;
        self.bus.publisher().publish(&envelope).await?;
        Ok(envelope)
    }

    /// Every stored event of type `E` about `entity`, oldest first.
    pub async fn events<E: Event>(&self, entity: &str) -> Result<Vec<E>, TestError> {
        let filter = skein_message::subject::event(E::SERVICE, entity, E::NAME);
        let mut out = Vec::new();
        for m in read(&self.bus, EVENTS, &filter, StartAt::Beginning).await? {
            out.push(Envelope::from_parts(&m.subject, m.headers.as_ref(), m.payload)?.decode()?);
        }
        Ok(out)
    }

    /// Every stored event envelope matching a subject filter.
    pub async fn envelopes(&self, filter: &str) -> Result<Vec<Envelope>, TestError> {
        let mut out = Vec::new();
        for m in read(&self.bus, EVENTS, filter, StartAt::Beginning).await? {
            out.push(Envelope::from_parts(
                &m.subject,
                m.headers.as_ref(),
                m.payload,
            )?);
        }
        Ok(out)
    }

    /// Waits until at least `count` events of type `E` about `entity` exist.
    pub async fn wait_events<E: Event>(
        &self,
        entity: &str,
        count: usize,
    ) -> Result<Vec<E>, TestError> {
        let found = skein_testkit::eventually(Duration::from_secs(15), || async {
            let events = self.events::<E>(entity).await.ok()?;
            (events.len() >= count).then_some(events)
        })
        .await;
        found.ok_or_else(|| {
            format!(
                "no {count} {} event(s) about {entity} within 15s",
                E::type_name()
            )
            .into()
        })
    }

    /// Every dead letter with its payload.
    pub async fn dead_letters(&self) -> Result<Vec<(DeadLetterInfo, bytes::Bytes)>, TestError> {
        let mut out = Vec::new();
        for m in read(
            &self.bus,
            DLQ,
            skein_bus::dlq::DEAD_LETTERS,
            StartAt::Beginning,
        )
        .await?
        {
            let info = m
                .headers
                .as_ref()
                .and_then(DeadLetterInfo::from_headers)
                .ok_or("dead letter without its headers")?;
            out.push((info, m.payload));
        }
        Ok(out)
    }

    /// Waits until `count` dead letters exist.
    pub async fn wait_dead_letters(
        &self,
        count: usize,
    ) -> Result<Vec<(DeadLetterInfo, bytes::Bytes)>, TestError> {
        skein_testkit::eventually(Duration::from_secs(15), || async {
            let d = self.dead_letters().await.ok()?;
            (d.len() >= count).then_some(d)
        })
        .await
        .ok_or_else(|| format!("no {count} dead letter(s) within 15s").into())
    }
}

/// An admin caller.
pub fn admin() -> Caller {
    Caller {
        user_id: Uuid::now_v7(),
        role: Role::Admin,
    }
}

/// A customer caller.
pub fn customer(user_id: Uuid) -> Caller {
    Caller {
        user_id,
        role: Role::Customer,
    }
}

/// Checks an emitted message's payload against its schema in `schemas/`.
pub fn assert_schema(envelope: &Envelope) -> Result<(), TestError> {
    let entry = skein_contracts::registry::find(&envelope.kind)
        .ok_or_else(|| format!("no schema for {}", envelope.kind))?;
    let schema = serde_json::to_value(&entry.schema)?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| format!("bad schema {}: {e}", entry.file))?;
    let payload: serde_json::Value = serde_json::from_slice(&envelope.data)?;
    let errors: Vec<String> = validator
        .iter_errors(&payload)
        .map(|e| e.to_string())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} payload violates {}: {}",
            envelope.kind,
            entry.file,
            errors.join("; ")
        )
        .into())
    }
}
