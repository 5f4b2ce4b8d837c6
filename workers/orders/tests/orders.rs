//! The orders worker against a real nats-server, on SQLite and PostgreSQL.
//!
//! The replicas are seeded the way production seeds them: by publishing
//! catalog's `product_added` and identity's `user_registered` events.
//! "Handled" means the command's inbox record committed, and "emitted" reads
//! the worker's outbox, so a test sees exactly what one command's
//! transaction produced without waiting on the relay.

use std::time::Duration;

use anyhow::{ensure, Context};
use skein_contracts::catalog::{ProductAdded, StockLine};
use skein_contracts::identity::UserRegistered;
use skein_contracts::orders::*;
use skein_contracts::{Caller, Role};
use skein_message::{Command, Envelope, Event, MessageContext};
use skein_outbox::Store;
use skein_service::testing::{admin, assert_schema, customer, Platform, TestError};
use skein_service::{request, Host, HostConfig, RequestError};
use skein_testkit::{backend_tests, eventually, Backend};
use sqlx::Row;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);

fn boxed(e: TestError) -> anyhow::Error {
    anyhow::Error::from_boxed(e)
}

/// The status of a query's error answer (0 when it is not one).
fn status(e: &RequestError) -> u16 {
    match e {
        RequestError::Service(s) => s.status,
        _ => 0,
    }
}

struct Orders {
    p: Platform,
    /// The worker's own database, to see what its transactions committed.
    store: Store,
    host: Option<Host>,
}

impl Orders {
    /// Orders with a 50 ms redelivery backoff, so retries are quick.
    async fn start(backend: Backend) -> anyhow::Result<Self> {
        Self::start_with_backoff(backend, Duration::from_millis(50)).await
    }

    async fn start_with_backoff(backend: Backend, backoff: Duration) -> anyhow::Result<Self> {
        let p = Platform::start(backend).await.map_err(boxed)?;
        let store = p.store("orders").await.map_err(boxed)?;
        let host = skein_orders::start_with(
            p.connect("orders").await.map_err(boxed)?,
            store.clone(),
            HostConfig::new("orders"),
            |config| config.backoff = vec![backoff],
        )
        .await?;
        Ok(Self {
            p,
            store,
            host: Some(host),
        })
    }

    fn host(&self) -> anyhow::Result<&Host> {
        self.host.as_ref().context("the host is gone")
    }

    /// Publishes an event as its owning service would.
    async fn publish<E: Event>(&self, source: &str, event: &E) -> anyhow::Result<()> {
        let envelope = Envelope::event(source, event, &MessageContext::root())?;
        self.p.bus.publisher().publish(&envelope).await?;
        Ok(())
    }

    /// Announces a product (as catalog does) and waits until the replica has it.
    async fn product(&self, sku: &str, price_cents: i64) -> anyhow::Result<Uuid> {
        let id = Uuid::now_v7();
        self.publish(
            "catalog",
            &ProductAdded {
                product_id: id,
                sku: sku.into(),
                name: format!("Product {sku}"),
                price_cents,
                stock: 100,
            },
        )
        .await?;
        eventually(WAIT, || async {
            let mut conn = self.store.pool().acquire().await.ok()?;
            skein_orders::store::product(&mut conn, id)
                .await
                .ok()
                .flatten()
        })
        .await
        .with_context(|| format!("product {sku} never reached the replica"))?;
        Ok(id)
    }

    /// Announces a customer's registration (as identity does).
    async fn announce_customer(&self, id: Uuid, role: Role) -> anyhow::Result<()> {
        self.publish(
            "identity",
            &UserRegistered {
                user_id: id,
                email: format!("{id}@example.org"),
                name: "Customer".into(),
                role,
            },
        )
        .await
    }

    /// Registers a customer and waits until the replica has them.
    async fn customer(&self) -> anyhow::Result<Uuid> {
        let id = Uuid::now_v7();
        self.announce_customer(id, Role::Customer).await?;
        eventually(WAIT, || async {
            let mut conn = self.store.pool().acquire().await.ok()?;
            skein_orders::store::customer_role(&mut conn, id)
                .await
                .ok()
                .flatten()
        })
        .await
        .context("the customer never reached the replica")?;
        Ok(id)
    }

    async fn send<C: Command>(&self, command: &C) -> anyhow::Result<Envelope> {
        self.p.send(command).await.map_err(boxed)
    }

    /// Sends `place_order` for a new order id.
    async fn place(
        &self,
        customer_id: Uuid,
        lines: &[(Uuid, i64)],
    ) -> anyhow::Result<(Uuid, Envelope)> {
        let order_id = Uuid::now_v7();
        let lines = lines
            .iter()
            .map(|&(product_id, quantity)| StockLine {
                product_id,
                quantity,
            })
            .collect();
        let envelope = self
            .send(&PlaceOrder {
                order_id,
                customer_id,
                lines,
            })
            .await?;
        Ok((order_id, envelope))
    }

    /// Places an order and waits for its `order_placed`.
    async fn placed(&self, customer_id: Uuid, lines: &[(Uuid, i64)]) -> anyhow::Result<Uuid> {
        let (id, _) = self.place(customer_id, lines).await?;
        self.p
            .wait_events::<OrderPlaced>(&id.to_string(), 1)
            .await
            .map_err(boxed)?;
        Ok(id)
    }

    /// Waits until the worker committed its handling of `envelope`.
    async fn handled(&self, envelope: &Envelope) -> anyhow::Result<()> {
        eventually(WAIT, || async {
            sqlx::query("SELECT message_id FROM skein_inbox WHERE handler = $1 AND message_id = $2")
                .bind("orders")
                .bind(envelope.id.to_string())
                .fetch_optional(self.store.pool())
                .await
                .ok()
                .flatten()
        })
        .await
        .with_context(|| format!("{} {} was never handled", envelope.kind, envelope.id))?;
        Ok(())
    }

    /// The names of the events the worker committed about `order`, in order.
    async fn emitted(&self, order: Uuid) -> anyhow::Result<Vec<String>> {
        let rows =
            sqlx::query("SELECT subject FROM skein_outbox WHERE subject LIKE $1 ORDER BY seq")
                .bind(format!("events.orders.{order}.%"))
                .fetch_all(self.store.pool())
                .await?;
        rows.iter()
            .map(|r| {
                let subject: String = r.try_get("subject")?;
                Ok(subject.rsplit('.').next().unwrap_or_default().to_owned())
            })
            .collect()
    }

    async fn get(&self, caller: Caller, order_id: Uuid) -> Result<Order, RequestError> {
        request(&self.p.bus, &GetOrder { caller, order_id }).await
    }

    /// The order as an admin sees it.
    async fn order(&self, id: Uuid) -> anyhow::Result<Order> {
        Ok(self.get(admin(), id).await?)
    }

    async fn list(
        &self,
        caller: Caller,
        customer_id: Uuid,
        limit: u32,
        cursor: Option<String>,
    ) -> Result<OrderPage, RequestError> {
        request(
            &self.p.bus,
            &ListOrders {
                caller,
                customer_id,
                limit,
                cursor,
            },
        )
        .await
    }

    /// Every `events.orders.*` payload matches its schema.
    async fn check_schemas(&self) -> anyhow::Result<()> {
        let envelopes = self.p.envelopes("events.orders.>").await.map_err(boxed)?;
        ensure!(!envelopes.is_empty(), "no orders events to check");
        for envelope in envelopes {
            assert_schema(&envelope).map_err(boxed)?;
        }
        Ok(())
    }
}

impl Drop for Orders {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            host.abort();
        }
    }
}

async fn a_placed_order_is_pending_with_lines_priced_from_the_replica(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let cake = o.product("CAKE", 1200).await?;
    let c = o.customer().await?;
    let (id, _) = o.place(c, &[(tea, 2), (cake, 1)]).await?;

    let placed =
        o.p.wait_events::<OrderPlaced>(&id.to_string(), 1)
            .await
            .map_err(boxed)?;
    let lines = vec![
        OrderLine {
            product_id: tea,
            quantity: 2,
            unit_price_cents: 450,
        },
        OrderLine {
            product_id: cake,
            quantity: 1,
            unit_price_cents: 1200,
        },
    ];
    ensure!(
        placed[0]
            == OrderPlaced {
                order_id: id,
                customer_id: c,
                lines: lines.clone(),
                total_cents: 2100,
            },
        "{:?}",
        placed[0]
    );
    let order = o.get(customer(c), id).await?;
    ensure!(order.status == OrderStatus::Pending, "{order:?}");
    ensure!(order.lines == lines && order.total_cents == 2100 && order.customer_id == c);
    ensure!(order.reason.is_none());
    let created = OffsetDateTime::parse(&order.created_at, &Rfc3339)
        .with_context(|| format!("created_at {:?} is not RFC 3339", order.created_at))?;
    ensure!((OffsetDateTime::now_utc() - created).whole_seconds().abs() < 60);
    ensure!(order.updated_at == order.created_at);
    ensure!(o.emitted(id).await? == ["order_placed"]);
    o.check_schemas().await
}

async fn an_order_naming_unknown_products_is_rejected_with_the_products_named(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;
    let (ghost, phantom) = (Uuid::now_v7(), Uuid::now_v7());
    let (id, _) = o.place(c, &[(tea, 1), (ghost, 1), (phantom, 3)]).await?;

    let rejected =
        o.p.wait_events::<OrderRejected>(&id.to_string(), 1)
            .await
            .map_err(boxed)?;
    let reason = &rejected[0].reason;
    ensure!(
        reason == &format!("unknown products {ghost}, {phantom}"),
        "{reason}"
    );
    ensure!(rejected[0].customer_id == c);
    let order = o.get(customer(c), id).await?;
    ensure!(order.status == OrderStatus::Rejected, "{order:?}");
    ensure!(order.reason.as_ref() == Some(reason));
    ensure!(order.lines.len() == 3 && order.total_cents == 450);
    ensure!(o.emitted(id).await? == ["order_rejected"]);
    ensure!(o
        .p
        .events::<OrderPlaced>(&id.to_string())
        .await
        .map_err(boxed)?
        .is_empty());
    o.check_schemas().await
}

async fn invalid_orders_are_dead_lettered_with_precise_reasons_and_store_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let cake = o.product("CAKE", 1200).await?;
    let c = o.customer().await?;
    let cases = [
        (
            o.place(c, &[]).await?.0,
            "/lines: must have at least one line",
        ),
        (
            o.place(c, &[(tea, 0)]).await?.0,
            "/lines/0/quantity: must be between 1 and 10000",
        ),
        (
            o.place(c, &[(cake, 1), (tea, 10_001)]).await?.0,
            "/lines/1/quantity: must be between 1 and 10000",
        ),
        (
            o.place(c, &[(tea, 1), (cake, 1), (tea, 2)]).await?.0,
            "/lines/2/product_id: product appears in more than one line",
        ),
    ];
    let dead = o.p.wait_dead_letters(cases.len()).await.map_err(boxed)?;
    ensure!(dead.len() == cases.len(), "{} dead letters", dead.len());
    for (id, expected) in &cases {
        let (info, _) = dead
            .iter()
            .find(|(_, payload)| {
                serde_json::from_slice::<PlaceOrder>(payload).is_ok_and(|p| p.order_id == *id)
            })
            .with_context(|| format!("order {id} was not dead-lettered"))?;
        ensure!(
            info.reason.contains(expected) && info.reason.contains("invalid place_order"),
            "order {id}: {:?} lacks {expected:?}",
            info.reason
        );
        ensure!(info.handler == "orders", "{info:?}");
        let missing = o
            .get(admin(), *id)
            .await
            .err()
            .context("an invalid order was stored")?;
        ensure!(status(&missing) == 404, "{missing}");
        ensure!(o.emitted(*id).await?.is_empty());
    }
    let stored: i64 = sqlx::query("SELECT COUNT(*) AS n FROM orders")
        .fetch_one(o.store.pool())
        .await?
        .try_get("n")?;
    ensure!(stored == 0, "{stored} orders stored");
    // The consumer keeps going: a valid order after them is placed.
    let good = o.placed(c, &[(tea, 1)]).await?;
    ensure!(o.order(good).await?.status == OrderStatus::Pending);
    Ok(())
}

async fn placing_the_same_order_twice_records_one_order_and_one_event(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;
    let order_id = Uuid::now_v7();
    let place = |quantity| PlaceOrder {
        order_id,
        customer_id: c,
        lines: vec![StockLine {
            product_id: tea,
            quantity,
        }],
    };
    o.send(&place(1)).await?;
    // A retry of the request (a new message for the same order), even with
    // other lines, changes nothing.
    let again = o.send(&place(5)).await?;
    o.handled(&again).await?;
    ensure!(o.emitted(order_id).await? == ["order_placed"]);
    let order = o.order(order_id).await?;
    ensure!(
        order.lines[0].quantity == 1 && order.total_cents == 450,
        "{order:?}"
    );
    let placed =
        o.p.wait_events::<OrderPlaced>(&order_id.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(placed.len() == 1);
    Ok(())
}

/// Late replies of a saga leave a final order as it is; a repeat of the
/// command that made it final is answered again with its first answer (the
/// saga may have lost it, and resends or is retried).
async fn saga_replies_that_come_late_never_flip_a_final_order(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;

    let kept = o.placed(c, &[(tea, 3)]).await?;
    o.send(&ConfirmOrder { order_id: kept }).await?;
    let confirmed =
        o.p.wait_events::<OrderConfirmed>(&kept.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(
        confirmed[0]
            == OrderConfirmed {
                order_id: kept,
                customer_id: c,
                total_cents: 1350
            }
    );
    let late = o
        .send(&RejectOrder {
            order_id: kept,
            reason: "payment_deadline_passed".into(),
        })
        .await?;
    o.handled(&late).await?;
    let twice = o.send(&ConfirmOrder { order_id: kept }).await?;
    o.handled(&twice).await?;
    let order = o.order(kept).await?;
    ensure!(
        order.status == OrderStatus::Confirmed && order.reason.is_none(),
        "{order:?}"
    );
    ensure!(o.emitted(kept).await? == ["order_placed", "order_confirmed", "order_confirmed"]);
    let answers =
        o.p.wait_events::<OrderConfirmed>(&kept.to_string(), 2)
            .await
            .map_err(boxed)?;
    ensure!(answers[1] == answers[0], "{answers:?}");

    let refused = o.placed(c, &[(tea, 1)]).await?;
    o.send(&RejectOrder {
        order_id: refused,
        reason: "insufficient_funds".into(),
    })
    .await?;
    let rejected =
        o.p.wait_events::<OrderRejected>(&refused.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(rejected[0].reason == "insufficient_funds" && rejected[0].customer_id == c);
    let late = o.send(&ConfirmOrder { order_id: refused }).await?;
    o.handled(&late).await?;
    let twice = o
        .send(&RejectOrder {
            order_id: refused,
            reason: "payment_deadline_passed".into(),
        })
        .await?;
    o.handled(&twice).await?;
    let order = o.order(refused).await?;
    ensure!(order.status == OrderStatus::Rejected, "{order:?}");
    ensure!(order.reason.as_deref() == Some("insufficient_funds"));
    ensure!(o.emitted(refused).await? == ["order_placed", "order_rejected", "order_rejected"]);
    let answers =
        o.p.wait_events::<OrderRejected>(&refused.to_string(), 2)
            .await
            .map_err(boxed)?;
    ensure!(
        answers[1].reason == "insufficient_funds" && answers[1] == answers[0],
        "{answers:?}"
    );
    o.check_schemas().await
}

/// A cancellation request and the saga's confirmation of the same pending
/// order, handled by two copies at the same moment: whichever commits
/// first, the order ends with a cancellation request as a confirmed order's
/// (which refunds and releases). Before, a confirmation that read the order
/// before the request committed, and updated it after, dropped the request.
async fn a_cancellation_committed_as_another_copy_confirms_the_order_is_not_lost(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let second = skein_orders::start_with(
        o.p.connect("orders").await.map_err(boxed)?,
        o.p.store("orders").await.map_err(boxed)?,
        HostConfig::new("orders"),
        |config| config.backoff = vec![Duration::from_millis(50)],
    )
    .await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;
    let mut orders = Vec::new();
    for _ in 0..30 {
        orders.push(o.place(c, &[(tea, 1)]).await?);
    }
    for (id, placed) in &orders {
        o.handled(placed).await?;
        ensure!(o.emitted(*id).await? == ["order_placed"], "order {id}");
    }
    // One after the other, so that each copy likely takes one of them.
    let mut sent = Vec::new();
    for (id, _) in &orders {
        sent.push(o.send(&ConfirmOrder { order_id: *id }).await?);
        sent.push(
            o.send(&CancelOrder {
                order_id: *id,
                caller: customer(c),
            })
            .await?,
        );
    }
    for envelope in &sent {
        o.handled(envelope).await?;
    }
    second.abort();
    let mut lost = Vec::new();
    for (id, _) in &orders {
        let requested =
            o.p.wait_events::<OrderCancellationRequested>(&id.to_string(), 1)
                .await
                .map_err(boxed)?;
        let as_confirmed = eventually(Duration::from_secs(5), || async {
            o.p.events::<OrderCancellationRequested>(&id.to_string())
                .await
                .ok()?
                .iter()
                .any(|r| r.status == OrderStatus::Confirmed)
                .then_some(())
        })
        .await;
        if as_confirmed.is_none() {
            lost.push((*id, requested));
        }
    }
    ensure!(
        lost.is_empty(),
        "{} of 30 confirmed orders have no cancellation request as a confirmed order's: {lost:?}",
        lost.len()
    );
    Ok(())
}

async fn owners_and_admins_cancel_pending_and_confirmed_orders_through_the_saga(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;
    let pending = o.placed(c, &[(tea, 1)]).await?;
    let confirmed = o.placed(c, &[(tea, 2)]).await?;
    let by_admin = o.placed(c, &[(tea, 3)]).await?;
    for id in [confirmed, by_admin] {
        o.send(&ConfirmOrder { order_id: id }).await?;
        o.p.wait_events::<OrderConfirmed>(&id.to_string(), 1)
            .await
            .map_err(boxed)?;
    }
    let boss = admin();
    for (id, caller, was) in [
        (pending, customer(c), OrderStatus::Pending),
        (confirmed, customer(c), OrderStatus::Confirmed),
        (by_admin, boss.clone(), OrderStatus::Confirmed),
    ] {
        o.send(&CancelOrder {
            order_id: id,
            caller: caller.clone(),
        })
        .await?;
        let requested =
            o.p.wait_events::<OrderCancellationRequested>(&id.to_string(), 1)
                .await
                .map_err(boxed)?;
        ensure!(
            requested[0]
                == OrderCancellationRequested {
                    order_id: id,
                    customer_id: c,
                    status: was,
                    requested_by: caller.user_id,
                },
            "{:?}",
            requested[0]
        );
        // The status stays until the saga has compensated.
        ensure!(o.order(id).await?.status == was);
        // A second request while one is open is a no-op.
        let repeat = o
            .send(&CancelOrder {
                order_id: id,
                caller,
            })
            .await?;
        o.handled(&repeat).await?;

        o.send(&MarkCancelled {
            order_id: id,
            reason: "cancelled by request".into(),
        })
        .await?;
        let cancelled =
            o.p.wait_events::<OrderCancelled>(&id.to_string(), 1)
                .await
                .map_err(boxed)?;
        ensure!(
            cancelled[0]
                == OrderCancelled {
                    order_id: id,
                    customer_id: c,
                    reason: "cancelled by request".into()
                }
        );
        let order = o.order(id).await?;
        ensure!(order.status == OrderStatus::Cancelled, "{order:?}");
        ensure!(order.reason.as_deref() == Some("cancelled by request"));
    }
    // Repeated and late saga messages change nothing any more; a repeated
    // mark_cancelled is answered again, with the first reason.
    let again = o
        .send(&MarkCancelled {
            order_id: pending,
            reason: "again".into(),
        })
        .await?;
    o.handled(&again).await?;
    let late = o.send(&ConfirmOrder { order_id: pending }).await?;
    o.handled(&late).await?;
    let cancel = o
        .send(&CancelOrder {
            order_id: pending,
            caller: customer(c),
        })
        .await?;
    o.handled(&cancel).await?;
    let order = o.order(pending).await?;
    ensure!(order.status == OrderStatus::Cancelled);
    ensure!(order.reason.as_deref() == Some("cancelled by request"));
    ensure!(
        o.emitted(pending).await?
            == [
                "order_placed",
                "order_cancellation_requested",
                "order_cancelled",
                "order_cancelled"
            ]
    );
    let answers =
        o.p.wait_events::<OrderCancelled>(&pending.to_string(), 2)
            .await
            .map_err(boxed)?;
    ensure!(answers[1] == answers[0], "{answers:?}");
    ensure!(
        o.emitted(confirmed).await?
            == [
                "order_placed",
                "order_confirmed",
                "order_cancellation_requested",
                "order_cancelled"
            ]
    );
    o.check_schemas().await
}

async fn another_customer_cannot_cancel_an_order_and_nothing_changes(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;
    let stranger = o.customer().await?;
    let id = o.placed(c, &[(tea, 1)]).await?;
    o.send(&CancelOrder {
        order_id: id,
        caller: customer(stranger),
    })
    .await?;
    let dead = o.p.wait_dead_letters(1).await.map_err(boxed)?;
    let reason = &dead[0].0.reason;
    ensure!(
        reason.contains(&format!("user {stranger} may not cancel order {id}")),
        "{reason}"
    );
    ensure!(o.order(id).await?.status == OrderStatus::Pending);
    ensure!(o.emitted(id).await? == ["order_placed"]);
    // No request was left open: the owner's own request still goes through.
    o.send(&CancelOrder {
        order_id: id,
        caller: customer(c),
    })
    .await?;
    let requested =
        o.p.wait_events::<OrderCancellationRequested>(&id.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(requested[0].requested_by == c);
    // An order that does not exist is dead-lettered too.
    let nothing = Uuid::now_v7();
    o.send(&CancelOrder {
        order_id: nothing,
        caller: customer(c),
    })
    .await?;
    let dead = o.p.wait_dead_letters(2).await.map_err(boxed)?;
    ensure!(
        dead.iter()
            .any(|(i, _)| i.reason.contains(&format!("no order {nothing}"))),
        "{dead:?}"
    );
    Ok(())
}

/// A cancel that arrives before its order's place_order (handled by
/// another copy, or waiting for a replica) is retried until the order is
/// there, instead of being dead-lettered while the client was told 202.
async fn a_cancel_that_overtakes_its_order_waits_for_it(backend: Backend) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;
    let order_id = Uuid::now_v7();
    let cancel = o
        .send(&CancelOrder {
            order_id,
            caller: customer(c),
        })
        .await?;
    // Its first delivery has found no order.
    eventually(WAIT, || async {
        (o.host().ok()?.stats().snapshot().transient_failures > 0).then_some(())
    })
    .await
    .context("the cancel was not tried before its order")?;
    o.send(&PlaceOrder {
        order_id,
        customer_id: c,
        lines: vec![StockLine {
            product_id: tea,
            quantity: 1,
        }],
    })
    .await?;
    o.handled(&cancel).await?;
    let requested =
        o.p.wait_events::<OrderCancellationRequested>(&order_id.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(
        requested[0].status == OrderStatus::Pending && requested[0].requested_by == c,
        "{requested:?}"
    );
    ensure!(
        o.p.dead_letters().await.map_err(boxed)?.is_empty(),
        "a dead letter"
    );
    Ok(())
}

async fn cancelling_a_rejected_order_changes_nothing(backend: Backend) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let c = o.customer().await?;
    let (id, _) = o.place(c, &[(Uuid::now_v7(), 1)]).await?;
    o.p.wait_events::<OrderRejected>(&id.to_string(), 1)
        .await
        .map_err(boxed)?;
    let cancel = o
        .send(&CancelOrder {
            order_id: id,
            caller: customer(c),
        })
        .await?;
    o.handled(&cancel).await?;
    let mark = o
        .send(&MarkCancelled {
            order_id: id,
            reason: "too late".into(),
        })
        .await?;
    o.handled(&mark).await?;
    let order = o.order(id).await?;
    ensure!(order.status == OrderStatus::Rejected, "{order:?}");
    ensure!(order
        .reason
        .as_deref()
        .is_some_and(|r| r.starts_with("unknown product ")));
    ensure!(o.emitted(id).await? == ["order_rejected"]);
    Ok(())
}

async fn an_order_is_visible_to_its_owner_and_admins_only(backend: Backend) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;
    let id = o.placed(c, &[(tea, 1)]).await?;

    let mine = o.get(customer(c), id).await?;
    ensure!(mine.id == id && mine.customer_id == c);
    ensure!(o.get(admin(), id).await? == mine);

    let theirs = o
        .get(customer(Uuid::now_v7()), id)
        .await
        .err()
        .context("another customer read the order")?;
    ensure!(status(&theirs) == 404, "{theirs}");
    ensure!(
        theirs.to_string() == format!("404 no order {id}"),
        "{theirs}"
    );
    // Exactly what a missing order answers: existence does not leak.
    let ghost = Uuid::now_v7();
    let missing = o
        .get(customer(c), ghost)
        .await
        .err()
        .context("a missing order was found")?;
    ensure!(
        missing.to_string() == format!("404 no order {ghost}"),
        "{missing}"
    );
    Ok(())
}

async fn a_customer_pages_through_their_orders_newest_first(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let c = o.customer().await?;
    let other = o.customer().await?;
    let mut placed = Vec::new();
    for quantity in 1..=7 {
        placed.push(o.placed(c, &[(tea, quantity)]).await?);
    }
    let theirs = o.placed(other, &[(tea, 1)]).await?;

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor = None;
    for _ in 0..10 {
        let page = o.list(customer(c), c, 3, cursor).await?;
        sizes.push(page.items.len());
        ensure!(page.items.iter().all(|i| i.customer_id == c));
        seen.extend(page.items.iter().map(|i| i.id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    ensure!(sizes == [3, 3, 1], "page sizes {sizes:?}");
    let newest_first: Vec<Uuid> = placed.iter().rev().copied().collect();
    ensure!(seen == newest_first, "not newest first: {seen:?}");

    // An exact page ends without a cursor.
    let all = o.list(customer(c), c, 7, None).await?;
    ensure!(all.items.len() == 7 && all.next_cursor.is_none());
    // Each listed order carries its own lines (read for the page at once).
    for (item, quantity) in all.items.iter().zip((1..=7).rev()) {
        let line = OrderLine {
            product_id: tea,
            quantity,
            unit_price_cents: 450,
        };
        ensure!(item.lines == [line], "{item:?}");
    }
    // Admins list anyone's orders; customers only their own.
    let page = o.list(admin(), c, 3, None).await?;
    ensure!(page
        .items
        .iter()
        .map(|i| i.id)
        .eq(newest_first[..3].iter().copied()));
    let own = o.list(customer(other), other, 3, None).await?;
    ensure!(own.items.len() == 1 && own.items[0].id == theirs);
    let forbidden = o
        .list(customer(other), c, 3, None)
        .await
        .err()
        .context("a customer listed another's orders")?;
    ensure!(status(&forbidden) == 403, "{forbidden}");

    for limit in [0, 101] {
        let invalid = o
            .list(customer(c), c, limit, None)
            .await
            .err()
            .with_context(|| format!("limit {limit} accepted"))?;
        ensure!(
            status(&invalid) == 400 && invalid.to_string().contains("/limit"),
            "{invalid}"
        );
    }
    for bad in ["x", "bm90IGEgY3Vyc29y", "MTIzOm5vdC1hLXV1aWQ"] {
        let invalid = o
            .list(customer(c), c, 3, Some(bad.into()))
            .await
            .err()
            .with_context(|| format!("cursor {bad:?} accepted"))?;
        ensure!(
            status(&invalid) == 400 && invalid.to_string().contains("/cursor"),
            "{invalid}"
        );
    }
    Ok(())
}

async fn an_order_of_an_unknown_customer_is_retried_then_rejected(
    backend: Backend,
) -> anyhow::Result<()> {
    let o = Orders::start(backend).await?;
    let tea = o.product("TEA", 450).await?;
    let nobody = Uuid::now_v7();
    let (id, _) = o.place(nobody, &[(tea, 1)]).await?;
    let rejected =
        o.p.wait_events::<OrderRejected>(&id.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(
        rejected[0].reason == format!("unknown customer {nobody}"),
        "{}",
        rejected[0].reason
    );
    let retries = o.host()?.stats().snapshot().transient_failures;
    ensure!(
        retries == skein_orders::commands::REPLICA_GRACE_DELIVERIES - 1,
        "{retries} retries"
    );
    let order = o.order(id).await?;
    ensure!(order.status == OrderStatus::Rejected && order.customer_id == nobody);
    ensure!(o.emitted(id).await? == ["order_rejected"]);
    Ok(())
}

async fn an_order_placed_before_its_customer_is_replicated_waits_for_them(
    backend: Backend,
) -> anyhow::Result<()> {
    // Redeliveries a second apart leave time to register in between.
    let o = Orders::start_with_backoff(backend, Duration::from_secs(1)).await?;
    let tea = o.product("TEA", 450).await?;
    let late = Uuid::now_v7();
    let (id, _) = o.place(late, &[(tea, 2)]).await?;
    // The customer comes late: after six tries (a grace of six deliveries,
    // about 3 s with the default backoff, had rejected the order by then;
    // now seven tries with the default backoff take about 11 s).
    let late_by = 6;
    eventually(WAIT, || async {
        let failures = o.host().ok()?.stats().snapshot().transient_failures;
        (failures >= late_by).then_some(())
    })
    .await
    .with_context(|| format!("the order was not retried {late_by} times"))?;
    o.announce_customer(late, Role::Customer).await?;
    let placed =
        o.p.wait_events::<OrderPlaced>(&id.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(placed[0].customer_id == late && placed[0].total_cents == 900);
    ensure!(o.order(id).await?.status == OrderStatus::Pending);
    Ok(())
}

backend_tests!(
    a_placed_order_is_pending_with_lines_priced_from_the_replica,
    an_order_naming_unknown_products_is_rejected_with_the_products_named,
    invalid_orders_are_dead_lettered_with_precise_reasons_and_store_nothing,
    placing_the_same_order_twice_records_one_order_and_one_event,
    saga_replies_that_come_late_never_flip_a_final_order,
    owners_and_admins_cancel_pending_and_confirmed_orders_through_the_saga,
    another_customer_cannot_cancel_an_order_and_nothing_changes,
    cancelling_a_rejected_order_changes_nothing,
    an_order_is_visible_to_its_owner_and_admins_only,
    a_customer_pages_through_their_orders_newest_first,
    an_order_of_an_unknown_customer_is_retried_then_rejected,
    an_order_placed_before_its_customer_is_replicated_waits_for_them,
    a_cancellation_committed_as_another_copy_confirms_the_order_is_not_lost,
    a_cancel_that_overtakes_its_order_waits_for_it,
);
