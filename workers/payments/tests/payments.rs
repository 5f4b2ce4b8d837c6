//! The payments worker against a real nats-server, on SQLite and PostgreSQL.

use std::time::Duration;

use anyhow::{ensure, Context};
use skein_contracts::identity::UserRegistered;
use skein_contracts::payments::*;
use skein_contracts::Role;
use skein_message::{Envelope, MessageContext};
use skein_payments::{PaymentsConfig, ProviderConfig};
use skein_service::testing::{admin, assert_schema, customer, Platform};
use skein_service::{request, Host, HostConfig, RequestError};
use skein_testkit::{backend_tests, Backend};
use uuid::Uuid;

fn boxed(e: skein_service::testing::TestError) -> anyhow::Error {
    anyhow::Error::from_boxed(e)
}

struct Payments {
    p: Platform,
    host: Option<Host>,
}

impl Payments {
    async fn start(backend: Backend, config: PaymentsConfig) -> anyhow::Result<Self> {
        let p = Platform::start(backend).await.map_err(boxed)?;
        let store = p.store("payments").await.map_err(boxed)?;
        let bus = p.connect("payments").await.map_err(boxed)?;
        let host = skein_payments::start(bus, store, HostConfig::new("payments"), config).await?;
        Ok(Self {
            p,
            host: Some(host),
        })
    }

    /// Registers a user and waits for their account.
    async fn customer(&self, role: Role) -> anyhow::Result<Uuid> {
        let id = Uuid::now_v7();
        let event = UserRegistered {
            user_id: id,
            email: format!("{id}@example.org"),
            name: "C".into(),
            role,
        };
        self.p
            .bus
            .publisher()
            .publish(&Envelope::event(
                "identity",
                &event,
                &MessageContext::root(),
            )?)
            .await?;
        if role == Role::Customer {
            skein_testkit::eventually(Duration::from_secs(10), || async {
                self.balance(id).await.ok()
            })
            .await
            .context("no account opened")?;
        }
        Ok(id)
    }

    async fn balance(&self, id: Uuid) -> anyhow::Result<i64> {
        Ok(request(
            &self.p.bus,
            &GetAccount {
                caller: admin(),
                customer_id: id,
            },
        )
        .await?
        .balance_cents)
    }

    async fn authorize(
        &self,
        order_id: Uuid,
        customer_id: Uuid,
        amount_cents: i64,
    ) -> anyhow::Result<()> {
        self.p
            .send(&AuthorizePayment {
                order_id,
                customer_id,
                amount_cents,
            })
            .await
            .map_err(boxed)?;
        Ok(())
    }

    async fn ledger(&self) -> anyhow::Result<LedgerTotals> {
        Ok(request(&self.p.bus, &Ledger {}).await?)
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            host.abort();
        }
    }
}

fn retry_fast(backend: Backend) -> (Backend, PaymentsConfig) {
    (
        backend,
        PaymentsConfig {
            starting_balance_cents: 10_000,
            ..Default::default()
        },
    )
}

async fn customers_get_an_account_with_the_starting_balance_and_admins_none(
    backend: Backend,
) -> anyhow::Result<()> {
    let (backend, config) = retry_fast(backend);
    let s = Payments::start(backend, config).await?;
    let c = s.customer(Role::Customer).await?;
    ensure!(s.balance(c).await? == 10_000);
    let a = s.customer(Role::Admin).await?;
    let c2 = s.customer(Role::Customer).await?;
    ensure!(s.balance(c2).await? == 10_000);
    let missing = request(
        &s.p.bus,
        &GetAccount {
            caller: admin(),
            customer_id: a,
        },
    )
    .await
    .err()
    .context("admin has an account")?;
    ensure!(
        matches!(missing, RequestError::Service(ref e) if e.status == 404),
        "{missing}"
    );
    let t = s.ledger().await?;
    ensure!(
        t.accounts == 2
            && t.granted_cents == 20_000
            && t.balances_cents == 20_000
            && t.captured_cents == 0,
        "{t:?}"
    );
    Ok(())
}

async fn an_authorization_takes_the_amount_and_a_short_balance_is_declined(
    backend: Backend,
) -> anyhow::Result<()> {
    let (backend, config) = retry_fast(backend);
    let s = Payments::start(backend, config).await?;
    let c = s.customer(Role::Customer).await?;
    let (ok, short) = (Uuid::now_v7(), Uuid::now_v7());
    s.authorize(ok, c, 6_000).await?;
    let authorized =
        s.p.wait_events::<PaymentAuthorized>(&ok.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(authorized[0].amount_cents == 6_000 && authorized[0].balance_cents == 4_000);
    s.authorize(short, c, 6_000).await?;
    let declined =
        s.p.wait_events::<PaymentDeclined>(&short.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(declined[0].reason == "insufficient_funds");
    ensure!(
        s.balance(c).await? == 4_000,
        "a declined payment took money"
    );
    for e in s.p.envelopes("events.payments.>").await.map_err(boxed)? {
        assert_schema(&e).map_err(boxed)?;
    }
    Ok(())
}

async fn a_repeated_authorization_answers_the_same_and_charges_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let (backend, config) = retry_fast(backend);
    let s = Payments::start(backend, config).await?;
    let c = s.customer(Role::Customer).await?;
    let order = Uuid::now_v7();
    s.authorize(order, c, 3_000).await?;
    s.authorize(order, c, 3_000).await?;
    let answers =
        s.p.wait_events::<PaymentAuthorized>(&order.to_string(), 2)
            .await
            .map_err(boxed)?;
    ensure!(answers.iter().all(|a| a.amount_cents == 3_000));
    ensure!(s.balance(c).await? == 7_000, "charged twice");
    Ok(())
}

async fn a_refund_gives_the_money_back_once(backend: Backend) -> anyhow::Result<()> {
    let (backend, config) = retry_fast(backend);
    let s = Payments::start(backend, config).await?;
    let c = s.customer(Role::Customer).await?;
    let order = Uuid::now_v7();
    s.authorize(order, c, 2_500).await?;
    s.p.wait_events::<PaymentAuthorized>(&order.to_string(), 1)
        .await
        .map_err(boxed)?;
    for _ in 0..2 {
        s.p.send(&RefundPayment {
            order_id: order,
            reason: "cancelled".into(),
        })
        .await
        .map_err(boxed)?;
    }
    let refunds =
        s.p.wait_events::<PaymentRefunded>(&order.to_string(), 2)
            .await
            .map_err(boxed)?;
    ensure!(
        refunds
            .iter()
            .all(|r| r.amount_cents == 2_500 && r.customer_id == c),
        "{refunds:?}"
    );
    ensure!(s.balance(c).await? == 10_000);
    // A refund of an order never authorized still answers, with nothing.
    let never = Uuid::now_v7();
    s.p.send(&RefundPayment {
        order_id: never,
        reason: "compensation".into(),
    })
    .await
    .map_err(boxed)?;
    let nothing =
        s.p.wait_events::<PaymentRefunded>(&never.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(nothing[0].amount_cents == 0);
    let t = s.ledger().await?;
    ensure!(
        t.balances_cents + t.captured_cents == t.granted_cents,
        "{t:?}"
    );
    Ok(())
}

async fn an_unknown_account_is_retried_then_declined(backend: Backend) -> anyhow::Result<()> {
    let (backend, config) = retry_fast(backend);
    let s = Payments::start(backend, config).await?;
    let order = Uuid::now_v7();
    s.authorize(order, Uuid::now_v7(), 100).await?;
    let declined =
        s.p.wait_events::<PaymentDeclined>(&order.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(declined[0].reason == "unknown_account");
    let stats = s.host.as_ref().context("host")?.stats().snapshot();
    ensure!(
        stats.transient_failures >= 2,
        "not retried first: {stats:?}"
    );
    Ok(())
}

async fn an_invalid_amount_is_dead_lettered_and_changes_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let (backend, config) = retry_fast(backend);
    let s = Payments::start(backend, config).await?;
    let c = s.customer(Role::Customer).await?;
    s.authorize(Uuid::now_v7(), c, -5).await?;
    let dead = s.p.wait_dead_letters(1).await.map_err(boxed)?;
    ensure!(
        dead[0].0.reason.contains("/amount_cents") && dead[0].0.handler == "payments",
        "{:?}",
        dead[0].0
    );
    ensure!(s.balance(c).await? == 10_000);
    Ok(())
}

async fn the_provider_declines_its_share_and_its_latency_holds_no_lock(
    backend: Backend,
) -> anyhow::Result<()> {
    let config = PaymentsConfig {
        starting_balance_cents: 10_000,
        provider: ProviderConfig {
            latency: Duration::from_millis(300),
            failure_rate: 1.0,
        },
    };
    let s = Payments::start(backend, config).await?;
    let c = s.customer(Role::Customer).await?;
    let started = std::time::Instant::now();
    let orders: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    for o in &orders {
        s.authorize(*o, c, 100).await?;
    }
    for o in &orders {
        let d =
            s.p.wait_events::<PaymentDeclined>(&o.to_string(), 1)
                .await
                .map_err(boxed)?;
        ensure!(d[0].reason == "provider_declined");
    }
    // Eight slow authorizations in parallel lanes, not one after another.
    ensure!(
        started.elapsed() < Duration::from_millis(8 * 300),
        "took {:?}",
        started.elapsed()
    );
    ensure!(s.balance(c).await? == 10_000);
    Ok(())
}

async fn only_the_customer_and_admins_see_an_account(backend: Backend) -> anyhow::Result<()> {
    let (backend, config) = retry_fast(backend);
    let s = Payments::start(backend, config).await?;
    let c = s.customer(Role::Customer).await?;
    ensure!(
        request(
            &s.p.bus,
            &GetAccount {
                caller: customer(c),
                customer_id: c
            }
        )
        .await?
        .balance_cents
            == 10_000
    );
    let other = request(
        &s.p.bus,
        &GetAccount {
            caller: customer(Uuid::now_v7()),
            customer_id: c,
        },
    )
    .await
    .err()
    .context("another customer saw the account")?;
    ensure!(
        matches!(other, RequestError::Service(ref e) if e.status == 403),
        "{other}"
    );
    Ok(())
}

async fn money_is_conserved_under_concurrent_authorizations(
    backend: Backend,
) -> anyhow::Result<()> {
    let (backend, config) = retry_fast(backend);
    let s = Payments::start(backend, config).await?;
    let c = s.customer(Role::Customer).await?;
    let orders: Vec<Uuid> = (0..30).map(|_| Uuid::now_v7()).collect();
    for o in &orders {
        s.authorize(*o, c, 1_000).await?;
    }
    let mut authorized = 0;
    for o in &orders {
        let yes = skein_testkit::eventually(Duration::from_secs(15), || async {
            let a =
                s.p.events::<PaymentAuthorized>(&o.to_string())
                    .await
                    .ok()?
                    .len();
            let d =
                s.p.events::<PaymentDeclined>(&o.to_string())
                    .await
                    .ok()?
                    .len();
            (a + d > 0).then_some(a > 0)
        })
        .await
        .context("an authorization got no answer")?;
        authorized += usize::from(yes);
    }
    ensure!(
        authorized == 10,
        "{authorized} authorizations of 1,000 on a 10,000 balance"
    );
    ensure!(s.balance(c).await? == 0);
    let t = s.ledger().await?;
    ensure!(
        t.balances_cents + t.captured_cents == t.granted_cents && t.captured_cents == 10_000,
        "{t:?}"
    );
    Ok(())
}

backend_tests!(
    customers_get_an_account_with_the_starting_balance_and_admins_none,
    an_authorization_takes_the_amount_and_a_short_balance_is_declined,
    a_repeated_authorization_answers_the_same_and_charges_once,
    a_refund_gives_the_money_back_once,
    an_unknown_account_is_retried_then_declined,
    an_invalid_amount_is_dead_lettered_and_changes_nothing,
    the_provider_declines_its_share_and_its_latency_holds_no_lock,
    only_the_customer_and_admins_see_an_account,
    money_is_conserved_under_concurrent_authorizations,
);
