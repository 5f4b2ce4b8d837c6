//! `skein_service::trace` on a real nats-server, with the sagas' record
//! answered by a stand-in orchestrator.
//!
//! ```text
//! cargo nextest run -p skein-service --test trace
//! ```

use anyhow::{ensure, Context};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use skein_bus::provision::apply_builtin_streams;
use skein_bus::{Bus, BusConfig};
use skein_contracts::orchestrator::{
    SagaInstance, SagaPage, SagaStatus, SagaTransition, SentMessage,
};
use skein_message::{Contract, Envelope, Event, MessageContext};
use skein_testkit::NatsServer;
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize)]
struct Placed {
    order: String,
}

impl Contract for Placed {
    const SERVICE: &'static str = "shop";
    const NAME: &'static str = "placed";
    const VERSION: u32 = 1;
}

impl Event for Placed {
    fn entity_id(&self) -> String {
        self.order.clone()
    }
}

/// A saga transition whose time does not read leaves its commands out of
/// the trace, said as a gap, instead of putting them in 1970 (and every
/// offset of the tree with them); the transitions that read are shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_transition_whose_time_does_not_read_is_a_gap() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let bus = Bus::connect(&BusConfig::new(nats.url(), "trace-test")).await?;
    apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
    let context = MessageContext::with_correlation("req-1");
    let placed = Envelope::event(
        "shop",
        &Placed {
            order: "o-1".into(),
        },
        &context,
    )?;
    bus.publisher().publish(&placed).await?;

    let now =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?;
    let transition = |seq, at: String, kind: &str| SagaTransition {
        seq,
        at,
        from: None,
        to: SagaStatus::Running,
        step: None,
        cause_id: Some(placed.id),
        cause: "shop.placed.v1".into(),
        sent: vec![SentMessage {
            id: Uuid::now_v7(),
            kind: kind.into(),
        }],
        note: String::new(),
    };
    let instance = SagaInstance {
        id: Uuid::now_v7(),
        saga: "shopping".into(),
        key: "o-1".into(),
        status: SagaStatus::Running,
        step: None,
        waiting_for: Vec::new(),
        deadline: None,
        reason: None,
        data: serde_json::Value::Null,
        correlation_id: "req-1".into(),
        version: 2,
        created_at: now.clone(),
        updated_at: now.clone(),
        transitions: vec![
            transition(1, now.clone(), "stock.reserve.v1"),
            transition(2, "yesterday".into(), "payments.charge.v1"),
        ],
    };
    // The stand-in orchestrator: the list, then the instance.
    let client = bus.client();
    let mut queries = client.subscribe("queries.orchestrator.>").await?;
    client.flush().await?;
    let answering = client.clone();
    let page = serde_json::to_vec(&SagaPage {
        items: vec![instance.clone()],
        next_cursor: None,
    })?;
    let one = serde_json::to_vec(&instance)?;
    let orchestrator = tokio::spawn(async move {
        while let Some(query) = queries.next().await {
            let answer = if query.subject.as_str().ends_with("list_sagas") {
                page.clone()
            } else {
                one.clone()
            };
            if let Some(reply) = query.reply {
                let _ = answering.publish(reply, answer.into()).await;
            }
        }
    });

    let trace = skein_service::trace::trace(&bus, "o-1", None)
        .await
        .context("no trace")?;
    orchestrator.abort();
    let kinds: Vec<&str> = trace.messages.iter().map(|m| m.hop.kind.as_str()).collect();
    ensure!(kinds == ["shop.placed.v1", "stock.reserve.v1"], "{kinds:?}");
    ensure!(
        trace.gaps.len() == 1 && trace.gaps[0].contains("\"yesterday\""),
        "{:?}",
        trace.gaps
    );
    ensure!(
        trace.first.year() > 2000,
        "the trace starts in {}",
        trace.first
    );
    Ok(())
}
