//! The catalog worker against a real nats-server, on SQLite and PostgreSQL.

use std::time::Duration;

use anyhow::{ensure, Context};
use skein_contracts::catalog::*;
use skein_service::testing::{admin, assert_schema, customer, Platform};
use skein_service::{request, Host, HostConfig, RequestError};
use skein_testkit::{backend_tests, Backend};
use uuid::Uuid;

struct Catalog {
    p: Platform,
    host: Option<Host>,
}

impl Catalog {
    async fn start(backend: Backend) -> anyhow::Result<Self> {
        let p = Platform::start(backend)
            .await
            .map_err(anyhow::Error::from_boxed)?;
        let store = p
            .store("catalog")
            .await
            .map_err(anyhow::Error::from_boxed)?;
        let host = skein_catalog::start(
            p.connect("catalog")
                .await
                .map_err(anyhow::Error::from_boxed)?,
            store,
            HostConfig::new("catalog"),
        )
        .await?;
        Ok(Self {
            p,
            host: Some(host),
        })
    }

    async fn add(&self, sku: &str, price_cents: i64, stock: i64) -> anyhow::Result<Product> {
        Ok(request(
            &self.p.bus,
            &AddProduct {
                caller: admin(),
                sku: sku.into(),
                name: format!("Product {sku}"),
                price_cents,
                stock,
                product_id: None,
            },
        )
        .await?)
    }

    async fn available(&self, id: Uuid) -> anyhow::Result<i64> {
        Ok(request(&self.p.bus, &GetProduct { product_id: id })
            .await?
            .available)
    }

    async fn reserve(&self, order_id: Uuid, lines: &[(Uuid, i64)]) -> anyhow::Result<()> {
        let lines = lines
            .iter()
            .map(|&(product_id, quantity)| StockLine {
                product_id,
                quantity,
            })
            .collect();
        self.p
            .send(&ReserveStock { order_id, lines })
            .await
            .map_err(anyhow::Error::from_boxed)?;
        Ok(())
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            host.abort();
        }
    }
}

fn status(e: &RequestError) -> u16 {
    match e {
        RequestError::Service(s) => s.status,
        _ => 0,
    }
}

async fn admins_add_and_restock_products_and_everyone_lists_them(
    backend: Backend,
) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    let tea = c.add("TEA-1", 450, 10).await?;
    ensure!(tea.available == 10 && tea.price_cents == 450);
    let restocked = request(
        &c.p.bus,
        &Restock {
            caller: admin(),
            product_id: tea.id,
            quantity: 5,
            request_id: None,
        },
    )
    .await?;
    ensure!(restocked.available == 15);
    let list = request(&c.p.bus, &ListProducts {}).await?;
    ensure!(
        list.items
            == vec![Product {
                available: 15,
                ..tea.clone()
            }]
    );

    let added =
        c.p.wait_events::<ProductAdded>(&tea.id.to_string(), 1)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    ensure!(added[0].sku == "TEA-1" && added[0].stock == 10);
    let restocks =
        c.p.wait_events::<Restocked>(&tea.id.to_string(), 1)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    ensure!(restocks[0].available == 15);
    for envelope in
        c.p.envelopes("events.catalog.>")
            .await
            .map_err(anyhow::Error::from_boxed)?
    {
        assert_schema(&envelope).map_err(anyhow::Error::from_boxed)?;
    }
    Ok(())
}

async fn bad_product_requests_are_refused_precisely_and_change_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    c.add("SKU-1", 100, 1).await?;
    let customer = customer(Uuid::now_v7());
    let forbidden = request(
        &c.p.bus,
        &AddProduct {
            caller: customer.clone(),
            sku: "X".into(),
            name: "X".into(),
            price_cents: 1,
            stock: 1,
            product_id: None,
        },
    )
    .await
    .err()
    .context("a customer added a product")?;
    ensure!(status(&forbidden) == 403, "{forbidden}");
    let duplicate = c
        .add("SKU-1", 100, 1)
        .await
        .err()
        .context("duplicate sku accepted")?;
    ensure!(duplicate.to_string().contains("409"), "{duplicate}");
    let invalid = request(
        &c.p.bus,
        &AddProduct {
            caller: admin(),
            sku: "".into(),
            name: "ok".into(),
            price_cents: -5,
            stock: 1_000_000,
            product_id: None,
        },
    )
    .await
    .err()
    .context("invalid product accepted")?;
    let message = invalid.to_string();
    ensure!(status(&invalid) == 400, "{message}");
    ensure!(
        message.contains("/sku") && message.contains("/price_cents") && message.contains("/stock"),
        "{message}"
    );
    let unknown = request(
        &c.p.bus,
        &Restock {
            caller: admin(),
            product_id: Uuid::now_v7(),
            quantity: 1,
            request_id: None,
        },
    )
    .await
    .err()
    .context("restocked nothing")?;
    ensure!(status(&unknown) == 404, "{unknown}");
    let zero = request(
        &c.p.bus,
        &Restock {
            caller: admin(),
            product_id: Uuid::now_v7(),
            quantity: 0,
            request_id: None,
        },
    )
    .await
    .err()
    .context("zero restock")?;
    ensure!(status(&zero) == 400, "{zero}");
    // Unknown fields are refused before any handler runs.
    let raw =
        c.p.bus
            .client()
            .request("queries.catalog.list_products", r#"{"surprise": 1}"#.into())
            .await?;
    let code = raw
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.as_str().to_owned());
    ensure!(
        code.as_deref() == Some("400"),
        "unknown field answered {code:?}"
    );
    ensure!(request(&c.p.bus, &ListProducts {}).await?.items.len() == 1);
    Ok(())
}

async fn a_reservation_takes_every_line_or_none(backend: Backend) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    let a = c.add("A", 100, 5).await?;
    let b = c.add("B", 200, 1).await?;
    let ok = Uuid::now_v7();
    c.reserve(ok, &[(a.id, 2), (b.id, 1)]).await?;
    let reserved =
        c.p.wait_events::<StockReserved>(&ok.to_string(), 1)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    ensure!(reserved[0].lines.len() == 2);
    ensure!(c.available(a.id).await? == 3 && c.available(b.id).await? == 0);

    let short = Uuid::now_v7();
    let ghost = Uuid::now_v7();
    c.reserve(short, &[(a.id, 1), (b.id, 1), (ghost, 1)])
        .await?;
    let rejected =
        c.p.wait_events::<StockRejected>(&short.to_string(), 1)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    let mut reasons: Vec<(Uuid, String, i64)> = rejected[0]
        .lines
        .iter()
        .map(|l| (l.product_id, l.reason.clone(), l.available))
        .collect();
    reasons.sort();
    let mut expected = vec![
        (b.id, "insufficient_stock".to_owned(), 0),
        (ghost, "unknown_product".to_owned(), 0),
    ];
    expected.sort();
    ensure!(reasons == expected, "{reasons:?}");
    ensure!(
        c.available(a.id).await? == 3,
        "a rejected reservation took stock of a line that fit"
    );
    for envelope in
        c.p.envelopes("events.catalog.*.stock_*")
            .await
            .map_err(anyhow::Error::from_boxed)?
    {
        assert_schema(&envelope).map_err(anyhow::Error::from_boxed)?;
    }
    Ok(())
}

async fn a_repeated_reservation_for_an_order_answers_the_same_and_reserves_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    let a = c.add("A", 100, 5).await?;
    let order = Uuid::now_v7();
    c.reserve(order, &[(a.id, 2)]).await?;
    c.reserve(order, &[(a.id, 2)]).await?;
    c.p.wait_events::<StockReserved>(&order.to_string(), 2)
        .await
        .map_err(anyhow::Error::from_boxed)?;
    ensure!(
        c.available(a.id).await? == 3,
        "the same order reserved twice"
    );
    Ok(())
}

async fn release_gives_stock_back_and_commit_sells_it(backend: Backend) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    let a = c.add("A", 100, 10).await?;
    let (kept, dropped) = (Uuid::now_v7(), Uuid::now_v7());
    c.reserve(kept, &[(a.id, 3)]).await?;
    c.reserve(dropped, &[(a.id, 4)]).await?;
    c.p.wait_events::<StockReserved>(&dropped.to_string(), 1)
        .await
        .map_err(anyhow::Error::from_boxed)?;
    c.p.wait_events::<StockReserved>(&kept.to_string(), 1)
        .await
        .map_err(anyhow::Error::from_boxed)?;
    ensure!(c.available(a.id).await? == 3);
    c.p.send(&ReleaseStock {
        order_id: dropped,
        reason: "payment_declined".into(),
    })
    .await
    .map_err(anyhow::Error::from_boxed)?;
    let released =
        c.p.wait_events::<StockReleased>(&dropped.to_string(), 1)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    ensure!(
        released[0].lines
            == vec![StockLine {
                product_id: a.id,
                quantity: 4
            }]
    );
    ensure!(c.available(a.id).await? == 7);
    // Releasing again gives nothing back twice.
    c.p.send(&ReleaseStock {
        order_id: dropped,
        reason: "again".into(),
    })
    .await
    .map_err(anyhow::Error::from_boxed)?;
    let again =
        c.p.wait_events::<StockReleased>(&dropped.to_string(), 2)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    ensure!(again[1].lines.is_empty());
    ensure!(c.available(a.id).await? == 7);

    c.p.send(&CommitStock { order_id: kept })
        .await
        .map_err(anyhow::Error::from_boxed)?;
    c.p.wait_events::<StockCommitted>(&kept.to_string(), 1)
        .await
        .map_err(anyhow::Error::from_boxed)?;
    ensure!(
        c.available(a.id).await? == 7,
        "committing changes availability"
    );
    // Releasing a committed reservation gives nothing back.
    c.p.send(&ReleaseStock {
        order_id: kept,
        reason: "late".into(),
    })
    .await
    .map_err(anyhow::Error::from_boxed)?;
    c.p.wait_events::<StockReleased>(&kept.to_string(), 1)
        .await
        .map_err(anyhow::Error::from_boxed)?;
    ensure!(c.available(a.id).await? == 7);
    Ok(())
}

async fn an_invalid_reservation_is_dead_lettered_and_reserves_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    let a = c.add("A", 100, 5).await?;
    let order = Uuid::now_v7();
    c.reserve(order, &[(a.id, 1), (a.id, 1)]).await?; // the same product twice
    c.reserve(Uuid::now_v7(), &[]).await?;
    c.reserve(Uuid::now_v7(), &[(a.id, 0)]).await?;
    let dead =
        c.p.wait_dead_letters(3)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    let reasons: Vec<&str> = dead.iter().map(|(i, _)| i.reason.as_str()).collect();
    ensure!(
        reasons.iter().any(|r| r.contains("/lines/1/product_id")),
        "{reasons:?}"
    );
    ensure!(
        reasons.iter().any(|r| r.contains("at least one line")),
        "{reasons:?}"
    );
    ensure!(
        reasons.iter().any(|r| r.contains("/lines/0/quantity")),
        "{reasons:?}"
    );
    ensure!(dead.iter().all(|(i, _)| i.handler == "catalog"));
    // A valid order after them goes through.
    let good = Uuid::now_v7();
    c.reserve(good, &[(a.id, 1)]).await?;
    c.p.wait_events::<StockReserved>(&good.to_string(), 1)
        .await
        .map_err(anyhow::Error::from_boxed)?;
    ensure!(c.available(a.id).await? == 4);
    Ok(())
}

async fn concurrent_reservations_never_oversell(backend: Backend) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    let a = c.add("A", 100, 20).await?;
    let orders: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
    for order in &orders {
        c.reserve(*order, &[(a.id, 1)]).await?;
    }
    let mut reserved = 0;
    for order in &orders {
        let outcome = skein_testkit::eventually(Duration::from_secs(15), || async {
            let r =
                c.p.events::<StockReserved>(&order.to_string())
                    .await
                    .ok()?
                    .len();
            let j =
                c.p.events::<StockRejected>(&order.to_string())
                    .await
                    .ok()?
                    .len();
            (r + j > 0).then_some(r > 0)
        })
        .await
        .context("an order got no answer")?;
        reserved += usize::from(outcome);
    }
    ensure!(reserved == 20, "{reserved} reservations of 20 units");
    ensure!(c.available(a.id).await? == 0);
    Ok(())
}

/// A saga that sends a release again (its deadline passed while the
/// catalog was slow) can have two copies of the catalog release one
/// reservation at the same moment: the stock comes back once. Another
/// order's reservation on the product keeps `reserved` above zero, so a
/// second release would not be refused by the table's check.
async fn two_copies_releasing_one_reservation_at_once_give_its_stock_back_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    let second = skein_catalog::start(
        c.p.connect("catalog")
            .await
            .map_err(anyhow::Error::from_boxed)?,
        c.p.store("catalog")
            .await
            .map_err(anyhow::Error::from_boxed)?,
        HostConfig::new("catalog"),
    )
    .await?;
    let a = c.add("A", 100, 150).await?;
    let bystander = Uuid::now_v7();
    c.reserve(bystander, &[(a.id, 50)]).await?;
    let orders: Vec<Uuid> = (0..60).map(|_| Uuid::now_v7()).collect();
    for order in &orders {
        c.reserve(*order, &[(a.id, 1)]).await?;
    }
    for order in orders.iter().chain([&bystander]) {
        c.p.wait_events::<StockReserved>(&order.to_string(), 1)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    }
    ensure!(c.available(a.id).await? == 40);
    // Each release twice, under two message ids, as a saga sends it again;
    // one after the other, so that each copy likely takes one of them.
    for order in &orders {
        for round in 0..2 {
            c.p.send(&ReleaseStock {
                order_id: *order,
                reason: format!("deadline, send {round}"),
            })
            .await
            .map_err(anyhow::Error::from_boxed)?;
        }
    }
    let mut given_back = 0;
    for order in &orders {
        let released =
            c.p.wait_events::<StockReleased>(&order.to_string(), 2)
                .await
                .map_err(anyhow::Error::from_boxed)?;
        given_back += released
            .iter()
            .flat_map(|r| &r.lines)
            .map(|l| l.quantity)
            .sum::<i64>();
    }
    let available = c.available(a.id).await?;
    second.abort();
    ensure!(
        given_back == 60 && available == 100,
        "60 units released once each: {given_back} given back, {available} available (expected 100)"
    );
    Ok(())
}

/// A health check's view of the worker: every part running and the
/// database answering; then, the worker gone as in a crash, each part named
/// as stopped, and a closed database as not answering.
async fn a_probe_sees_the_parts_running_and_names_those_that_stop(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut c = Catalog::start(backend).await?;
    let host = c.host.take().context("no host")?;
    let probe = host.probe();
    ensure!(probe.name() == "catalog");
    ensure!(
        probe.stopped().is_empty(),
        "stopped while running: {:?}",
        probe.stopped()
    );
    probe
        .database(Duration::from_secs(2))
        .await
        .map_err(anyhow::Error::msg)
        .context("the database did not answer")?;
    let store = host.store().clone();
    host.abort();
    skein_testkit::eventually(Duration::from_secs(5), || async {
        let stopped = probe.stopped();
        (stopped.iter().any(|p| p == "the outbox relay")
            && stopped.iter().any(|p| p == "the consumer on COMMANDS"))
        .then_some(())
    })
    .await
    .with_context(|| format!("after the abort only {:?} stopped", probe.stopped()))?;
    store.close().await;
    ensure!(
        probe.database(Duration::from_secs(2)).await.is_err(),
        "a closed database answered"
    );
    Ok(())
}

/// A restock or a new product asked again with the same id (a client's
/// retry under one `Idempotency-Key`, through another ingress copy) is
/// applied once: the repeat gets the product as it is, and no event.
async fn a_restock_or_product_asked_again_with_its_id_is_applied_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let c = Catalog::start(backend).await?;
    let new_product = |product_id, name: &str| AddProduct {
        caller: admin(),
        sku: "MUG-1".into(),
        name: name.into(),
        price_cents: 900,
        stock: 3,
        product_id,
    };
    let id = Uuid::now_v7();
    let mug = request(&c.p.bus, &new_product(Some(id), "Mug")).await?;
    ensure!(mug.id == id && mug.available == 3, "{mug:?}");
    let again = request(&c.p.bus, &new_product(Some(id), "Mug")).await?;
    ensure!(again == mug, "the repeat answered {again:?}");
    // The same id for another product is refused, and so is the same SKU
    // without an id.
    for other in [new_product(Some(id), "Cup"), new_product(None, "Mug")] {
        let refused = request(&c.p.bus, &other)
            .await
            .err()
            .context("added a product twice")?;
        ensure!(status(&refused) == 409, "{refused}");
    }

    let restock = |request_id, quantity| Restock {
        caller: admin(),
        product_id: id,
        quantity,
        request_id,
    };
    let once = Uuid::now_v7();
    let first = request(&c.p.bus, &restock(Some(once), 5)).await?;
    ensure!(first.available == 8, "{first:?}");
    let repeat = request(&c.p.bus, &restock(Some(once), 5)).await?;
    ensure!(
        repeat.available == 8,
        "a repeated restock was applied: {repeat:?}"
    );
    let other = request(&c.p.bus, &restock(Some(Uuid::now_v7()), 2)).await?;
    ensure!(other.available == 10, "{other:?}");
    let unkeyed = request(&c.p.bus, &restock(None, 1)).await?;
    ensure!(unkeyed.available == 11, "{unkeyed:?}");
    // A restock of an unknown product records nothing: its id stays free.
    let free = Uuid::now_v7();
    let missing = Restock {
        product_id: Uuid::now_v7(),
        ..restock(Some(free), 1)
    };
    ensure!(
        status(
            &request(&c.p.bus, &missing)
                .await
                .err()
                .context("restocked nothing")?
        ) == 404
    );
    let later = request(&c.p.bus, &restock(Some(free), 1)).await?;
    ensure!(
        later.available == 12,
        "the id of a failed restock was kept: {later:?}"
    );

    // One product_added and four restocked events, whatever was repeated.
    let added =
        c.p.wait_events::<ProductAdded>(&id.to_string(), 1)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    let restocks =
        c.p.wait_events::<Restocked>(&id.to_string(), 4)
            .await
            .map_err(anyhow::Error::from_boxed)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let envelopes =
        c.p.envelopes(&format!("events.catalog.{id}.>"))
            .await
            .map_err(anyhow::Error::from_boxed)?;
    ensure!(
        added.len() == 1 && restocks.len() == 4 && envelopes.len() == 5,
        "{} events for one product and four restocks",
        envelopes.len()
    );
    Ok(())
}

backend_tests!(
    a_restock_or_product_asked_again_with_its_id_is_applied_once,
    a_probe_sees_the_parts_running_and_names_those_that_stop,
    admins_add_and_restock_products_and_everyone_lists_them,
    bad_product_requests_are_refused_precisely_and_change_nothing,
    a_reservation_takes_every_line_or_none,
    a_repeated_reservation_for_an_order_answers_the_same_and_reserves_once,
    release_gives_stock_back_and_commit_sells_it,
    an_invalid_reservation_is_dead_lettered_and_reserves_nothing,
    concurrent_reservations_never_oversell,
    two_copies_releasing_one_reservation_at_once_give_its_stock_back_once,
);
