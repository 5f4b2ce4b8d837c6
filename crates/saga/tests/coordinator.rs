//! The coordinator on a real database (SQLite and PostgreSQL): events go
//! through the inbox as a worker hands them over, replies find their
//! instance by the command they answer, deadlines are the stored ones.
//! No broker: what the sagas send stays in the outbox.
//!
//! ```text
//! cargo nextest run -p skein-saga --test coordinator
//! ```

use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use skein_bus::{Delivery, DeliveryInfo, ErrorKind, HandlerError};
use skein_contracts::orchestrator::{SagaInstance, SagaStatus};
use skein_message::{Envelope, Event, MessageContext};
use skein_outbox::{Inbox, Processed, Store};
use skein_saga::{Coordinator, Saga};
use skein_testkit::{backend_tests, Backend, TestDb};
use uuid::Uuid;

#[path = "support/shop_messages.rs"]
mod shop_messages;
use shop_messages::*;

#[derive(Serialize, Deserialize)]
struct Order {
    id: String,
}

/// What the tests let pass: pay and its refund, and ship.
const SHORT: Duration = Duration::from_millis(50);
/// What they never wait for.
const LONG: Duration = Duration::from_secs(60);

/// reserve -> pay (pivot) -> ship (2 sends) -> notify, cancelled by `stop`; compensations are
/// sent twice before the instance fails.
fn shop() -> anyhow::Result<Saga> {
    Ok(Saga::builder::<Order>("shop")
        .start_on(|e: &Placed| Some((e.id.clone(), Order { id: e.id.clone() })))
        .step("reserve", |s| {
            s.send(|o: &Order| Reserve { id: o.id.clone() })
                .completes_on::<Reserved>()
                .compensate(|o: &Order| Release { id: o.id.clone() })
                .compensation_completes_on::<Released>()
                .compensation_attempts(2)
                .deadline(LONG)
        })
        .step("pay", |s| {
            s.pivot()
                .send(|o: &Order| Pay { id: o.id.clone() })
                .completes_on::<Paid>()
                .compensate(|o: &Order| Refund { id: o.id.clone() })
                .compensation_completes_on::<Refunded>()
                .compensation_attempts(2)
                .deadline(SHORT)
        })
        .step("ship", |s| {
            s.send(|o: &Order| Ship { id: o.id.clone() })
                .completes_on::<Shipped>()
                .attempts(2)
                .deadline(SHORT)
        })
        .step("notify", |s| {
            s.send(|o: &Order| Notify { id: o.id.clone() })
                .completes_on::<Notified>()
                .deadline(LONG)
        })
        .cancel_on(|e: &Stop| (e.id.clone(), "stopped".to_owned()))
        .on_compensated(|o: &Order, _why: &str| Reject { id: o.id.clone() })
        .on_cancelled(|o: &Order, _why: &str| Reject { id: o.id.clone() })
        .build()?)
}

/// A coordinator of [`shop`] on a fresh database, fed through its inbox.
struct Shop {
    coordinator: Coordinator,
    inbox: Inbox<Coordinator>,
    store: Store,
    delivered: u64,
    _db: TestDb,
}

impl Shop {
    async fn start(backend: Backend) -> anyhow::Result<Self> {
        let db = TestDb::new(backend).await?;
        let store = Store::connect(db.url()).await?;
        store.migrate("saga", skein_saga::MIGRATIONS).await?;
        let coordinator = Coordinator::new(vec![shop()?], store.clone(), "orchestrator")?;
        let inbox = Inbox::new(store.clone(), "orchestrator", coordinator.clone());
        Ok(Self {
            coordinator,
            inbox,
            store,
            delivered: 0,
            _db: db,
        })
    }

    /// Hands `envelope` to the coordinator as its worker would.
    async fn deliver(&mut self, envelope: &Envelope) -> anyhow::Result<Processed> {
        self.deliver_raw(envelope).await.map_err(|e| {
            anyhow::anyhow!("the coordinator refused {}: {}", envelope.kind, e.reason())
        })
    }

    /// [`Shop::deliver`], with the coordinator's own error.
    async fn deliver_raw(&mut self, envelope: &Envelope) -> Result<Processed, HandlerError> {
        self.delivered += 1;
        let delivery = Delivery {
            envelope: envelope.clone(),
            info: DeliveryInfo {
                stream: "EVENTS".into(),
                consumer: "orchestrator".into(),
                stream_sequence: self.delivered,
                delivered: 1,
            },
        };
        self.inbox.process(&delivery).await
    }

    /// `event` in answer to the command `to`.
    async fn answer<E: Event>(&mut self, to: Uuid, event: &E) -> anyhow::Result<Envelope> {
        let context = MessageContext {
            correlation_id: "request-1".into(),
            causation_id: Some(to),
            traceparent: None,
        };
        let envelope = Envelope::event("shop", event, &context)?;
        self.deliver(&envelope).await?;
        Ok(envelope)
    }

    /// How many transitions are stored, of every instance.
    async fn transitions(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM saga_transitions")
            .fetch_one(self.store.pool())
            .await?)
    }

    async fn instance(&self, key: &str) -> anyhow::Result<SagaInstance> {
        self.coordinator
            .find("shop", key)
            .await?
            .with_context(|| format!("no instance for {key}"))
    }

    /// Waits past the current deadline and lets the coordinator act on it.
    async fn pass_deadline(&self) -> anyhow::Result<()> {
        tokio::time::sleep(SHORT * 2).await;
        let applied = self
            .coordinator
            .run_deadlines(100)
            .await
            .map_err(|e| anyhow::anyhow!("deadlines: {}", e.reason()))?;
        anyhow::ensure!(applied == 1, "{applied} deadlines applied");
        Ok(())
    }

    async fn stuck(&self) -> anyhow::Result<Vec<Uuid>> {
        Ok(self
            .coordinator
            .stuck(Duration::ZERO, 500)
            .await?
            .0
            .into_iter()
            .map(|s| s.instance.id)
            .collect())
    }
}

/// The ids of the commands of type `kind` the instance sent, oldest first.
fn sent(instance: &SagaInstance, kind: &str) -> Vec<Uuid> {
    instance
        .transitions
        .iter()
        .flat_map(|t| &t.sent)
        .filter(|s| s.kind == kind)
        .map(|s| s.id)
        .collect()
}

fn last(instance: &SagaInstance, kind: &str) -> anyhow::Result<Uuid> {
    sent(instance, kind)
        .last()
        .copied()
        .with_context(|| format!("no {kind} sent: {instance:#?}"))
}

fn placed(id: &str) -> anyhow::Result<Envelope> {
    Ok(Envelope::event(
        "shop",
        &Placed { id: id.into() },
        &MessageContext::with_correlation("request-1"),
    )?)
}

backend_tests!(
    a_compensation_answered_after_the_instance_failed_finishes_compensating,
    a_step_after_the_pivot_answered_after_the_instance_failed_completes_it,
    a_reply_whose_instance_was_deleted_is_refused_and_changes_nothing,
    instances_this_copy_cannot_advance_are_left_as_they_are_and_hold_up_no_other,
    a_reply_to_another_version_s_instance_is_left_for_a_copy_that_has_it,
    the_stuck_list_puts_live_instances_before_failed_ones_and_says_when_it_stops,
    instances_that_ended_are_deleted_past_their_retention_with_their_records,
);

impl Shop {
    /// Runs instance `key` to `completed`: every step answered.
    async fn complete(&mut self, key: &str) -> anyhow::Result<SagaInstance> {
        self.deliver(&placed(key)?).await?;
        self.answer_last(key, "shop.reserve.v1", |id| Reserved { id })
            .await?;
        self.answer_last(key, "shop.pay.v1", |id| Paid { id })
            .await?;
        self.answer_last(key, "shop.ship.v1", |id| Shipped { id })
            .await?;
        self.answer_last(key, "shop.notify.v1", |id| Notified { id })
            .await?;
        let done = self.instance(key).await?;
        anyhow::ensure!(done.status == SagaStatus::Completed, "{done:#?}");
        Ok(done)
    }

    /// Answers the last command of type `kind` instance `key` sent with
    /// the event `answer` makes of the key.
    async fn answer_last<E: Event>(
        &mut self,
        key: &str,
        kind: &str,
        answer: impl FnOnce(String) -> E,
    ) -> anyhow::Result<Envelope> {
        let to = last(&self.instance(key).await?, kind)?;
        self.answer(to, &answer(key.to_owned())).await
    }

    /// How many rows of `table` belong to `instance`.
    async fn rows_of(&self, table: &str, instance: Uuid) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM {table} WHERE instance_id = $1"
        ))
        .bind(instance.to_string())
        .fetch_one(self.store.pool())
        .await?)
    }
}

/// What needs attention now comes first: live instances past their
/// deadline, then failed ones (whatever their deadlines), and a list cut
/// short says so.
async fn the_stuck_list_puts_live_instances_before_failed_ones_and_says_when_it_stops(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut shop = Shop::start(backend).await?;
    for key in ["failed", "late", "later"] {
        shop.deliver(&placed(key)?).await?;
    }
    for (key, change) in [
        ("failed", "status = 'failed', deadline_at = 1"),
        ("late", "deadline_at = 2"),
        ("later", "deadline_at = 3"),
    ] {
        sqlx::query(&format!(
            "UPDATE saga_instances SET {change} WHERE saga_key = $1"
        ))
        .bind(key)
        .execute(shop.store.pool())
        .await?;
    }
    let keys = |list: &[skein_contracts::orchestrator::StuckSaga]| -> Vec<String> {
        list.iter().map(|s| s.instance.key.clone()).collect()
    };
    let (two, more) = shop.coordinator.stuck(Duration::ZERO, 2).await?;
    anyhow::ensure!(
        keys(&two) == ["late", "later"] && more,
        "{:?} {more}",
        keys(&two)
    );
    let (all, more) = shop.coordinator.stuck(Duration::ZERO, 3).await?;
    anyhow::ensure!(
        keys(&all) == ["late", "later", "failed"] && !more,
        "{:?} {more}",
        keys(&all)
    );
    Ok(())
}

/// During a rolling upgrade a reply can reach a copy whose definitions lack
/// its instance's saga or step: it is refused as transient (the message
/// goes back, for a copy that has them, after a delay long enough for an
/// upgrade of minutes), never dead-lettered, and the instance is not
/// touched. A cancel or reply once such an instance has ended needs no
/// definition and is taken.
async fn a_reply_to_another_version_s_instance_is_left_for_a_copy_that_has_it(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut shop = Shop::start(backend).await?;
    let mut replies = Vec::new();
    for key in ["gone", "shrunk"] {
        shop.deliver(&placed(key)?).await?;
        let reserve = last(&shop.instance(key).await?, "shop.reserve.v1")?;
        let context = MessageContext {
            correlation_id: "request-1".into(),
            causation_id: Some(reserve),
            traceparent: None,
        };
        replies.push(Envelope::event(
            "shop",
            &Reserved { id: key.into() },
            &context,
        )?);
    }
    for (key, change) in [("gone", "saga = 'a newer saga'"), ("shrunk", "step = 99")] {
        sqlx::query(&format!(
            "UPDATE saga_instances SET {change} WHERE saga_key = $1"
        ))
        .bind(key)
        .execute(shop.store.pool())
        .await?;
    }
    let store = shop.store.clone();
    let rows = || {
        let store = store.clone();
        async move {
            let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
                "SELECT saga_key, status, step, version FROM saga_instances ORDER BY saga_key",
            )
            .fetch_all(store.pool())
            .await?;
            anyhow::Ok(rows)
        }
    };
    let before = rows().await?;
    for reply in &replies {
        let refused = shop.deliver_raw(reply).await;
        anyhow::ensure!(
            matches!(&refused, Err(e) if e.kind() == ErrorKind::Transient
                && e.reason().contains("another version's")
                && e.requested_delay() == Some(skein_saga::coordinator::OTHER_VERSION_RETRY)),
            "{refused:?}"
        );
    }
    anyhow::ensure!(rows().await? == before, "an instance was changed");

    // A live instance at an unknown step: a cancel waits for a copy that
    // knows it, like a reply.
    let stop = |key: &str| {
        Envelope::event(
            "shop",
            &Stop { id: key.into() },
            &MessageContext {
                correlation_id: "request-2".into(),
                causation_id: None,
                traceparent: None,
            },
        )
    };
    let refused = shop.deliver_raw(&stop("shrunk")?).await;
    anyhow::ensure!(
        matches!(&refused, Err(e) if e.kind() == ErrorKind::Transient
            && e.reason().contains("another version's")),
        "{refused:?}"
    );
    // Once it has ended, a late cancel or reply is only noted: neither is
    // refused (and dead-lettered in the end) for want of the step's
    // definition.
    sqlx::query("UPDATE saga_instances SET status = 'completed' WHERE saga_key = 'shrunk'")
        .execute(shop.store.pool())
        .await?;
    let ended = rows().await?;
    shop.deliver(&stop("shrunk")?).await?;
    shop.deliver(&replies[1]).await?;
    anyhow::ensure!(rows().await? == ended, "an ended instance was changed");
    Ok(())
}

/// Instances whose deadline this copy cannot apply (another version's
/// saga, a step this copy's definition lacks: a rolling upgrade) come
/// first among the due ones: they are left as they are, for a copy that
/// can, and the deadlines behind them are applied in the same round; a
/// saga this copy does not know takes no place in the round at all.
async fn instances_this_copy_cannot_advance_are_left_as_they_are_and_hold_up_no_other(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut shop = Shop::start(backend).await?;
    for key in ["gone", "shrunk", "fine"] {
        shop.deliver(&placed(key)?).await?;
        let reserve = last(&shop.instance(key).await?, "shop.reserve.v1")?;
        shop.answer(reserve, &Reserved { id: key.into() }).await?;
    }
    // Both fall due before the sound one.
    for (key, change) in [("gone", "saga = 'a newer saga'"), ("shrunk", "step = 99")] {
        sqlx::query(&format!(
            "UPDATE saga_instances SET {change}, deadline_at = deadline_at - 1000000 \
             WHERE saga_key = $1"
        ))
        .bind(key)
        .execute(shop.store.pool())
        .await?;
    }
    let state = |key: &'static str| {
        let store = shop.store.clone();
        async move {
            let row: (String, i64, Option<i64>) = sqlx::query_as(
                "SELECT status, version, deadline_at FROM saga_instances WHERE saga_key = $1",
            )
            .bind(key)
            .fetch_one(store.pool())
            .await?;
            anyhow::Ok(row)
        }
    };
    let before = (state("gone").await?, state("shrunk").await?);
    tokio::time::sleep(SHORT * 2).await;
    // Pages of one: the one of the unknown saga takes no place, the one
    // this copy cannot advance fills a page and is passed over, the sound
    // one, on the next page, is applied (however many come before it).
    let applied = shop
        .coordinator
        .run_deadlines(1)
        .await
        .map_err(|e| anyhow::anyhow!("deadlines: {}", e.reason()))?;
    anyhow::ensure!(applied == 1, "{applied} deadlines applied");
    let fine = shop.instance("fine").await?;
    anyhow::ensure!(
        fine.status == SagaStatus::Compensating,
        "the sound instance's deadline was not applied: {fine:#?}"
    );
    anyhow::ensure!(
        (state("gone").await?, state("shrunk").await?) == before,
        "an instance this copy cannot advance was changed"
    );
    Ok(())
}

/// An operator deleted an instance (say, purging old sagas) while one of
/// its commands was still out: the reply is refused as a permanent error
/// naming the instance (its worker dead-letters it), and nothing of it is
/// kept, not even the inbox record, so a redrive after restoring the
/// instance would apply it.
async fn a_reply_whose_instance_was_deleted_is_refused_and_changes_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut shop = Shop::start(backend).await?;
    shop.deliver(&placed("o3")?).await?;
    let placed_instance = shop.instance("o3").await?;
    let reserve = last(&placed_instance, "shop.reserve.v1")?;
    sqlx::query("DELETE FROM saga_instances WHERE id = $1")
        .bind(placed_instance.id.to_string())
        .execute(shop.store.pool())
        .await?;
    let before = shop.transitions().await?;

    let refused = shop.answer(reserve, &Reserved { id: "o3".into() }).await;
    let reason = match refused {
        Ok(envelope) => anyhow::bail!("the reply {} was accepted", envelope.id),
        Err(e) => e.to_string(),
    };
    anyhow::ensure!(
        reason.contains(&placed_instance.id.to_string()) && reason.contains("is gone"),
        "the refusal does not name the deleted instance: {reason}"
    );
    anyhow::ensure!(
        shop.transitions().await? == before,
        "a refused reply wrote a transition"
    );
    let inbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM skein_inbox")
        .fetch_one(shop.store.pool())
        .await?;
    anyhow::ensure!(
        inbox == 1,
        "only the placed event is in the inbox, found {inbox}"
    );
    Ok(())
}

async fn a_compensation_answered_after_the_instance_failed_finishes_compensating(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut shop = Shop::start(backend).await?;
    shop.deliver(&placed("o1")?).await?;
    let reserve = last(&shop.instance("o1").await?, "shop.reserve.v1")?;
    shop.answer(reserve, &Reserved { id: "o1".into() }).await?;
    // Pay gets no answer, nor does its refund, sent twice.
    for _ in 0..3 {
        shop.pass_deadline().await?;
    }
    let failed = shop.instance("o1").await?;
    assert_eq!(failed.status, SagaStatus::Failed, "{failed:#?}");
    assert_eq!(failed.deadline, None);
    assert_eq!(
        failed.reason.as_deref(),
        Some(
            "pay got no answer before its deadline; \
             then the compensation of pay got no answer after 2 attempts"
        )
    );
    assert_eq!(shop.stuck().await?, [failed.id], "stuck lists it");
    // And says what it still waits for: the refund's answer.
    assert_eq!(
        (failed.step.as_deref(), failed.waiting_for.as_slice()),
        (Some("pay"), ["shop.refunded".to_owned()].as_slice())
    );
    let refunds = sent(&failed, "shop.refund.v1");
    assert_eq!(refunds.len(), 2);

    // The first refund's answer comes after all.
    let late = shop
        .answer(refunds[0], &Refunded { id: "o1".into() })
        .await?;
    let resumed = shop.instance("o1").await?;
    assert_eq!(resumed.status, SagaStatus::Compensating, "{resumed:#?}");
    assert_eq!(resumed.step.as_deref(), Some("reserve"));
    assert_eq!(resumed.waiting_for, ["shop.released"]);
    assert!(resumed.deadline.is_some(), "the release has its deadline");
    assert_eq!(
        resumed.reason.as_deref(),
        Some("pay got no answer before its deadline")
    );
    let t = resumed.transitions.last().context("no transition")?;
    assert_eq!(
        (t.from, t.to, t.cause_id),
        (
            Some(SagaStatus::Failed),
            SagaStatus::Compensating,
            Some(late.id)
        )
    );
    assert_eq!(
        t.note,
        "resumed on a late reply: shop.refunded.v1 completed the compensation of pay"
    );
    assert_eq!(sent(&resumed, "shop.release.v1").len(), 1);
    assert!(
        shop.stuck().await?.is_empty(),
        "it waits within its deadline"
    );

    // The same message again, and the second refund's answer: nothing more.
    assert_eq!(shop.deliver(&late).await?, Processed::AlreadyProcessed);
    shop.answer(refunds[1], &Refunded { id: "o1".into() })
        .await?;
    let after = shop.instance("o1").await?;
    assert_eq!(after.version, resumed.version, "{after:#?}");
    assert_eq!(after.transitions.len(), resumed.transitions.len() + 1);
    let note = &after.transitions.last().context("no transition")?.note;
    assert_eq!(
        note,
        "late shop.refunded.v1 for pay (compensation) while compensating at reserve; ignored"
    );

    // The release is answered in time: the saga ends as it would have.
    let release = last(&after, "shop.release.v1")?;
    shop.answer(release, &Released { id: "o1".into() }).await?;
    let done = shop.instance("o1").await?;
    assert_eq!(done.status, SagaStatus::Compensated, "{done:#?}");
    assert_eq!(sent(&done, "shop.reject.v1").len(), 1);
    assert_eq!(
        done.reason.as_deref(),
        Some("pay got no answer before its deadline"),
        "the reject carries the first reason"
    );
    assert_eq!(sent(&done, "shop.release.v1").len(), 1);
    assert_eq!(sent(&done, "shop.refund.v1").len(), 2);
    shop.store.close().await;
    Ok(())
}

async fn a_step_after_the_pivot_answered_after_the_instance_failed_completes_it(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut shop = Shop::start(backend).await?;
    shop.deliver(&placed("o2")?).await?;
    let reserve = last(&shop.instance("o2").await?, "shop.reserve.v1")?;
    shop.answer(reserve, &Reserved { id: "o2".into() }).await?;
    let pay = last(&shop.instance("o2").await?, "shop.pay.v1")?;
    shop.answer(pay, &Paid { id: "o2".into() }).await?;
    // Ship gets no answer to either send.
    shop.pass_deadline().await?;
    shop.pass_deadline().await?;
    let failed = shop.instance("o2").await?;
    assert_eq!(failed.status, SagaStatus::Failed, "{failed:#?}");
    assert_eq!(shop.stuck().await?, [failed.id]);
    assert_eq!(
        (failed.step.as_deref(), failed.waiting_for.as_slice()),
        (Some("ship"), ["shop.shipped".to_owned()].as_slice())
    );
    let ships = sent(&failed, "shop.ship.v1");
    assert_eq!(ships.len(), 2);

    // A late answer to an older step changes nothing.
    shop.answer(pay, &Paid { id: "o2".into() }).await?;
    let still = shop.instance("o2").await?;
    assert_eq!(
        (still.status, still.version),
        (SagaStatus::Failed, failed.version)
    );

    // The first ship's answer comes after all: on to notify.
    shop.answer(ships[0], &Shipped { id: "o2".into() }).await?;
    let resumed = shop.instance("o2").await?;
    assert_eq!(resumed.status, SagaStatus::Running, "{resumed:#?}");
    assert_eq!(resumed.step.as_deref(), Some("notify"));
    assert_eq!(resumed.reason, None);
    assert_eq!(
        resumed.transitions.last().map(|t| t.note.as_str()),
        Some("resumed on a late reply: shop.shipped.v1 completed ship")
    );
    shop.answer(ships[1], &Shipped { id: "o2".into() }).await?;
    assert_eq!(shop.instance("o2").await?.version, resumed.version);

    let notify = last(&resumed, "shop.notify.v1")?;
    shop.answer(notify, &Notified { id: "o2".into() }).await?;
    let done = shop.instance("o2").await?;
    assert_eq!(done.status, SagaStatus::Completed, "{done:#?}");
    assert_eq!(sent(&done, "shop.notify.v1").len(), 1);
    assert!(shop.stuck().await?.is_empty());
    shop.store.close().await;
    Ok(())
}

/// PostgreSQL: another copy changes the instance while this one applies a
/// reply to it. This copy's step (instance update, sent records and
/// transition in one statement) waits for the other's commit, then finds
/// the instance moved on; it must answer "changed meanwhile" (a quick
/// retry on the new state), not a duplicate-key database error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_step_racing_another_copy_is_retried_as_changed_meanwhile() -> anyhow::Result<()>
{
    let mut shop = Shop::start(Backend::Postgres).await?;
    shop.deliver(&placed("o4")?).await?;
    let instance = shop.instance("o4").await?;
    let reserve = last(&instance, "shop.reserve.v1")?;

    // The other copy's change, not committed yet: the instance's next
    // version and its next transition.
    let mut other = shop.store.pool().begin().await?;
    sqlx::query("UPDATE saga_instances SET version = version + 1 WHERE id = $1")
        .bind(instance.id.to_string())
        .execute(&mut *other)
        .await?;
    sqlx::query(
        "INSERT INTO saga_transitions (instance_id, seq, at, from_status, to_status, step, cause_id, cause, sent, note) \
         VALUES ($1, (SELECT MAX(seq) + 1 FROM saga_transitions WHERE instance_id = $1), 0, 'running', 'running', 'reserve', NULL, 'test', '[]', 'the other copy')",
    )
    .bind(instance.id.to_string())
    .execute(&mut *other)
    .await?;

    let reserved = Reserved { id: "o4".into() };
    let (answered, committed) = tokio::join!(shop.answer(reserve, &reserved), async {
        // Long enough for the reply to reach its statement and wait.
        tokio::time::sleep(Duration::from_millis(500)).await;
        other.commit().await
    });
    committed?;
    let reason = match answered {
        Ok(envelope) => anyhow::bail!(
            "the reply {} applied over the other copy's change",
            envelope.id
        ),
        Err(e) => e.to_string(),
    };
    anyhow::ensure!(
        reason.contains("changed meanwhile"),
        "expected a changed-meanwhile retry, got: {reason}"
    );
    // Applied again on the new state, it goes through.
    shop.answer(reserve, &reserved).await?;
    let after = shop.instance("o4").await?;
    anyhow::ensure!(
        sent(&after, "shop.pay.v1").len() == 1,
        "the retried reply did not move the saga on: {after:#?}"
    );
    Ok(())
}

/// PostgreSQL: an operator retries a failed instance while a late answer's
/// note about it (a transition, no change) is being committed. The retry's
/// transition, numbered before the note's commit, collides with it; the
/// retry reads the instance again and goes through instead of telling the
/// operator it changed (it did not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_retry_racing_a_note_reads_again_and_goes_through() -> anyhow::Result<()> {
    let mut shop = Shop::start(Backend::Postgres).await?;
    shop.deliver(&placed("o5")?).await?;
    shop.answer_last("o5", "shop.reserve.v1", |id| Reserved { id })
        .await?;
    shop.answer_last("o5", "shop.pay.v1", |id| Paid { id })
        .await?;
    shop.pass_deadline().await?;
    shop.pass_deadline().await?;
    let failed = shop.instance("o5").await?;
    anyhow::ensure!(failed.status == SagaStatus::Failed, "{failed:#?}");

    // The note, not committed yet.
    let mut note = shop.store.pool().begin().await?;
    sqlx::query(
        "INSERT INTO saga_transitions (instance_id, seq, at, from_status, to_status, step, cause_id, cause, sent, note) \
         VALUES ($1, (SELECT MAX(seq) + 1 FROM saga_transitions WHERE instance_id = $1), 0, 'failed', 'failed', 'ship', NULL, 'test', '[]', 'a late answer')",
    )
    .bind(failed.id.to_string())
    .execute(&mut *note)
    .await?;
    let pool = shop.store.pool().clone();
    let (retried, (waited, committed)) =
        tokio::join!(shop.coordinator.retry(failed.id, "the operator"), async {
            // Once the retry's write waits for the note's lock, not after a
            // fixed time: a retry that read after the commit tests nothing.
            let waited = skein_testkit::eventually(Duration::from_secs(10), || async {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                (n > 0).then_some(())
            })
            .await;
            (waited, note.commit().await)
        });
    committed?;
    anyhow::ensure!(waited.is_some(), "the retry never waited for the note");
    let retried = retried?;
    anyhow::ensure!(
        retried.status != SagaStatus::Failed
            && retried
                .transitions
                .iter()
                .any(|t| t.note == "a late answer")
            && retried
                .transitions
                .last()
                .is_some_and(|t| t.cause == "retry"),
        "{retried:#?}"
    );
    Ok(())
}

/// Instances that ended (completed, compensated) are deleted once past the
/// retention, with the records of what they sent and their transitions,
/// in batches of the size asked; live and failed ones are kept whatever
/// their age, younger ended ones until they are old enough. A late reply
/// to a deleted instance's command then changes nothing and is no error.
async fn instances_that_ended_are_deleted_past_their_retention_with_their_records(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut shop = Shop::start(backend).await?;
    let completed = shop.complete("old-completed").await?;
    // Compensated: pay gets no answer, its refund and the release do.
    shop.deliver(&placed("old-compensated")?).await?;
    shop.answer_last("old-compensated", "shop.reserve.v1", |id| Reserved { id })
        .await?;
    shop.pass_deadline().await?;
    shop.answer_last("old-compensated", "shop.refund.v1", |id| Refunded { id })
        .await?;
    shop.answer_last("old-compensated", "shop.release.v1", |id| Released { id })
        .await?;
    let compensated = shop.instance("old-compensated").await?;
    assert_eq!(
        compensated.status,
        SagaStatus::Compensated,
        "{compensated:#?}"
    );
    // Failed: ship gets no answer to either send.
    shop.deliver(&placed("old-failed")?).await?;
    shop.answer_last("old-failed", "shop.reserve.v1", |id| Reserved { id })
        .await?;
    shop.answer_last("old-failed", "shop.pay.v1", |id| Paid { id })
        .await?;
    shop.pass_deadline().await?;
    shop.pass_deadline().await?;
    let failed = shop.instance("old-failed").await?;
    assert_eq!(failed.status, SagaStatus::Failed, "{failed:#?}");
    // Live: waits for its reservation.
    shop.deliver(&placed("old-running")?).await?;
    let running = shop.instance("old-running").await?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let young = shop.complete("young-completed").await?;
    let pruning = shop
        .coordinator
        .clone()
        .retain_ended_for(Duration::from_millis(1_500));

    assert_eq!(pruning.prune(1).await?, 1, "one per batch of one");
    assert_eq!(pruning.prune(100).await?, 1, "then the other old one");
    assert_eq!(pruning.prune(100).await?, 0, "then none");
    for gone in [&completed, &compensated] {
        anyhow::ensure!(
            shop.coordinator.get(gone.id).await?.is_none(),
            "{} is still there",
            gone.key
        );
        for table in ["saga_sent", "saga_transitions"] {
            assert_eq!(
                shop.rows_of(table, gone.id).await?,
                0,
                "{table} of {}",
                gone.key
            );
        }
    }
    for kept in [&failed, &running, &young] {
        let now = shop
            .coordinator
            .get(kept.id)
            .await?
            .with_context(|| format!("{} was deleted", kept.key))?;
        assert_eq!(
            now.transitions.len(),
            kept.transitions.len(),
            "{}",
            kept.key
        );
        assert!(
            shop.rows_of("saga_sent", kept.id).await? > 0,
            "{}",
            kept.key
        );
    }

    // A late answer to the deleted instance's last command: acknowledged,
    // nothing written, no instance started.
    let notify = last(&completed, "shop.notify.v1")?;
    let before = shop.transitions().await?;
    let late = shop
        .answer(
            notify,
            &Notified {
                id: "old-completed".into(),
            },
        )
        .await?;
    assert_eq!(
        shop.transitions().await?,
        before,
        "the late answer {} wrote a transition",
        late.id
    );
    anyhow::ensure!(shop
        .coordinator
        .find("shop", "old-completed")
        .await?
        .is_none());

    // With no retention at all, the young one goes too; failed and live
    // ones stay.
    let now = shop.coordinator.clone().retain_ended_for(Duration::ZERO);
    assert_eq!(now.prune(100).await?, 1);
    anyhow::ensure!(shop.coordinator.get(young.id).await?.is_none());
    for kept in [&failed, &running] {
        anyhow::ensure!(
            shop.coordinator.get(kept.id).await?.is_some(),
            "{} was deleted",
            kept.key
        );
    }
    shop.store.close().await;
    Ok(())
}

/// PostgreSQL, read committed: a late answer to an instance that ended,
/// handled while pruning deletes that instance (the instance, its sent
/// records and its transitions deleted, not yet committed), records
/// nothing once the delete commits: no transition is left behind without
/// its instance. (SQLite has one writer: the answer waits for the prune
/// and then finds no record of its command.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_late_answer_racing_pruning_leaves_no_transition_behind() -> anyhow::Result<()> {
    let mut shop = Shop::start(Backend::Postgres).await?;
    let ended = shop.complete("ended").await?;
    let notify = last(&ended, "shop.notify.v1")?;
    let store = shop.store.clone();
    // What pruning does in one transaction, held open.
    let mut prune = store.pool().begin().await?;
    for sql in [
        "DELETE FROM saga_instances WHERE id = $1",
        "DELETE FROM saga_sent WHERE instance_id = $1",
        "DELETE FROM saga_transitions WHERE instance_id = $1",
    ] {
        sqlx::query(sql)
            .bind(ended.id.to_string())
            .execute(&mut *prune)
            .await?;
    }
    let late = tokio::spawn(async move {
        let answer = Notified { id: "ended".into() };
        shop.answer(notify, &answer).await.map(|_| shop)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    anyhow::ensure!(
        !late.is_finished(),
        "the answer did not wait for the prune in progress"
    );
    prune.commit().await?;
    let shop = late.await??;
    assert_eq!(
        shop.rows_of("saga_transitions", ended.id).await?,
        0,
        "a transition of the deleted instance was left behind"
    );
    anyhow::ensure!(shop.coordinator.get(ended.id).await?.is_none());
    shop.store.close().await;
    Ok(())
}
