//! The payments worker against a real nats-server, on SQLite and PostgreSQL.
//!
//! ```sh
//! cargo nextest run -p skein-payments
//! ```

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use skein_contracts::identity::UserRegistered;
use skein_contracts::payments::*;
use skein_contracts::Role;
use skein_message::{Envelope, MessageContext};
use skein_payments::{PaymentsConfig, ProviderConfig};
use skein_service::testing::{admin, assert_schema, customer, Platform, TestError};
use skein_service::{request, Host, HostConfig, RequestError};
use skein_testkit::{backend_tests, Backend};
use uuid::Uuid;

fn boxed(e: TestError) -> anyhow::Error {
    anyhow::Error::from_boxed(e)
}

/// A platform with the payments worker on it.
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

    /// Starts with a starting balance of 100.00 and an instant provider
    /// that never declines.
    async fn with_balance(backend: Backend, starting_balance_cents: i64) -> anyhow::Result<Self> {
        Self::start(
            backend,
            PaymentsConfig {
                starting_balance_cents,
                ..Default::default()
            },
        )
        .await
    }

    /// 10,000 cents per account; the provider declines every order it is
    /// asked about.
    async fn declining_everything(backend: Backend) -> anyhow::Result<Self> {
        Self::start(
            backend,
            PaymentsConfig {
                starting_balance_cents: 10_000,
                provider: ProviderConfig {
                    latency: Duration::ZERO,
                    failure_rate: 1.0,
                },
            },
        )
        .await
    }

    /// Publishes identity's `user_registered` for `id` as identity would.
    async fn register(&self, id: Uuid, role: Role) -> anyhow::Result<()> {
        let event = UserRegistered {
            user_id: id,
            email: format!("{id}@example.org"),
            name: "Someone".into(),
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
        Ok(())
    }

    /// Registers a new customer and waits for their account.
    async fn customer(&self) -> anyhow::Result<Uuid> {
        let id = Uuid::now_v7();
        self.register(id, Role::Customer).await?;
        self.wait_account(id).await?;
        Ok(id)
    }

    async fn wait_account(&self, id: Uuid) -> anyhow::Result<i64> {
        skein_testkit::eventually(Duration::from_secs(10), || async {
            self.balance(id).await.ok()
        })
        .await
        .with_context(|| format!("no account opened for {id}"))
    }

    /// The balance as an admin sees it.
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

    async fn refund(&self, order_id: Uuid) -> anyhow::Result<()> {
        self.p
            .send(&RefundPayment {
                order_id,
                reason: "order_cancelled".into(),
            })
            .await
            .map_err(boxed)?;
        Ok(())
    }

    /// Waits for the `count`th event of type `E` about `order`; all of them.
    async fn wait<E: skein_message::Event>(
        &self,
        order: Uuid,
        count: usize,
    ) -> anyhow::Result<Vec<E>> {
        self.p
            .wait_events::<E>(&order.to_string(), count)
            .await
            .map_err(boxed)
    }

    /// Every outcome event about `order`: (authorized, declined, refunded).
    async fn outcomes(&self, order: Uuid) -> anyhow::Result<(usize, usize, usize)> {
        let o = order.to_string();
        Ok((
            self.p
                .events::<PaymentAuthorized>(&o)
                .await
                .map_err(boxed)?
                .len(),
            self.p
                .events::<PaymentDeclined>(&o)
                .await
                .map_err(boxed)?
                .len(),
            self.p
                .events::<PaymentRefunded>(&o)
                .await
                .map_err(boxed)?
                .len(),
        ))
    }

    async fn ledger(&self) -> anyhow::Result<LedgerTotals> {
        Ok(request(&self.p.bus, &Ledger {}).await?)
    }

    /// Checks every payments event emitted so far against its schema.
    async fn events_match_their_schemas(&self) -> anyhow::Result<usize> {
        let envelopes = self.p.envelopes("events.payments.>").await.map_err(boxed)?;
        for envelope in &envelopes {
            assert_schema(envelope).map_err(boxed)?;
        }
        Ok(envelopes.len())
    }

    fn host(&self) -> anyhow::Result<&Host> {
        self.host.as_ref().context("the host is gone")
    }
}

impl Drop for Payments {
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

async fn customers_get_one_account_with_the_starting_balance_and_admins_none(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::start(backend, PaymentsConfig::default()).await?;
    let c = s.customer().await?;
    ensure!(s.balance(c).await? == 100_000, "default is 1,000.00");
    // The same registration again (a replay or a re-publish under a new
    // message id) grants nothing twice.
    s.register(c, Role::Customer).await?;
    let a = Uuid::now_v7();
    s.register(a, Role::Admin).await?;
    let c2 = s.customer().await?;
    ensure!(s.balance(c2).await? == 100_000);
    let host = s.host()?;
    skein_testkit::eventually(Duration::from_secs(10), || async {
        (host.stats().snapshot().handled >= 4).then_some(())
    })
    .await
    .context("not every registration was handled")?;
    let missing = request(
        &s.p.bus,
        &GetAccount {
            caller: admin(),
            customer_id: a,
        },
    )
    .await
    .err()
    .context("an admin got an account")?;
    ensure!(status(&missing) == 404, "{missing}");
    let t = s.ledger().await?;
    ensure!(
        t == LedgerTotals {
            accounts: 2,
            balances_cents: 200_000,
            captured_cents: 0,
            granted_cents: 200_000,
        },
        "{t:?}"
    );
    Ok(())
}

async fn an_authorization_takes_the_amount_and_a_short_balance_is_declined_taking_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let c = s.customer().await?;
    let (ok, short) = (Uuid::now_v7(), Uuid::now_v7());
    s.authorize(ok, c, 6_000).await?;
    let authorized = s.wait::<PaymentAuthorized>(ok, 1).await?;
    ensure!(
        authorized[0]
            == PaymentAuthorized {
                order_id: ok,
                customer_id: c,
                amount_cents: 6_000,
                balance_cents: 4_000,
            },
        "{authorized:?}"
    );
    s.authorize(short, c, 4_001).await?;
    let declined = s.wait::<PaymentDeclined>(short, 1).await?;
    ensure!(
        declined[0]
            == PaymentDeclined {
                order_id: short,
                customer_id: c,
                amount_cents: 4_001,
                reason: "insufficient_funds".into(),
            },
        "{declined:?}"
    );
    ensure!(
        s.balance(c).await? == 4_000,
        "a declined payment took money"
    );
    // Exactly the balance is enough.
    let exact = Uuid::now_v7();
    s.authorize(exact, c, 4_000).await?;
    ensure!(s.wait::<PaymentAuthorized>(exact, 1).await?[0].balance_cents == 0);
    ensure!(s.events_match_their_schemas().await? == 3);
    Ok(())
}

async fn a_repeated_authorization_answers_with_the_first_outcome_and_charges_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let c = s.customer().await?;
    let (order, other, big) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    s.authorize(order, c, 3_000).await?;
    s.wait::<PaymentAuthorized>(order, 1).await?;
    // Money moves in between: the repeat still tells the first figures.
    s.authorize(other, c, 1_000).await?;
    s.wait::<PaymentAuthorized>(other, 1).await?;
    s.authorize(order, c, 3_000).await?;
    let answers = s.wait::<PaymentAuthorized>(order, 2).await?;
    ensure!(
        answers[0] == answers[1] && answers[0].balance_cents == 7_000,
        "{answers:?}"
    );
    ensure!(s.balance(c).await? == 6_000, "charged twice");

    s.authorize(big, c, 50_000).await?;
    s.wait::<PaymentDeclined>(big, 1).await?;
    s.authorize(big, c, 50_000).await?;
    let declines = s.wait::<PaymentDeclined>(big, 2).await?;
    ensure!(
        declines[0] == declines[1] && declines[0].reason == "insufficient_funds",
        "{declines:?}"
    );
    ensure!(s.balance(c).await? == 6_000);
    ensure!(s.outcomes(order).await? == (2, 0, 0));
    ensure!(s.outcomes(big).await? == (0, 2, 0));
    let t = s.ledger().await?;
    ensure!(
        t.captured_cents == 4_000 && t.balances_cents == 6_000,
        "{t:?}"
    );
    Ok(())
}

async fn a_conflicting_authorization_for_a_decided_order_is_dead_lettered(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let c = s.customer().await?;
    let order = Uuid::now_v7();
    s.authorize(order, c, 3_000).await?;
    s.wait::<PaymentAuthorized>(order, 1).await?;
    s.authorize(order, c, 5_000).await?;
    let dead = s.p.wait_dead_letters(1).await.map_err(boxed)?;
    let reason = &dead[0].0.reason;
    ensure!(
        reason.contains("asks 5000 cents") && reason.contains("already authorized for 3000 cents"),
        "{reason}"
    );
    ensure!(s.balance(c).await? == 7_000);
    ensure!(s.outcomes(order).await? == (1, 0, 0));
    Ok(())
}

async fn a_refund_gives_the_money_back_once_and_a_repeat_tells_the_same_figures(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let c = s.customer().await?;
    let (order, later) = (Uuid::now_v7(), Uuid::now_v7());
    s.authorize(order, c, 2_500).await?;
    s.wait::<PaymentAuthorized>(order, 1).await?;
    s.refund(order).await?;
    let first = s.wait::<PaymentRefunded>(order, 1).await?;
    ensure!(
        first[0]
            == PaymentRefunded {
                order_id: order,
                customer_id: c,
                amount_cents: 2_500,
                balance_cents: 10_000,
            },
        "{first:?}"
    );
    s.authorize(later, c, 1_000).await?;
    s.wait::<PaymentAuthorized>(later, 1).await?;
    s.refund(order).await?;
    let both = s.wait::<PaymentRefunded>(order, 2).await?;
    ensure!(both[1] == both[0], "{both:?}");
    ensure!(s.balance(c).await? == 9_000, "refunded twice");
    // The refunded order's authorization, asked again, is still answered.
    s.authorize(order, c, 2_500).await?;
    let again = s.wait::<PaymentAuthorized>(order, 2).await?;
    ensure!(again[1] == again[0], "{again:?}");
    ensure!(s.balance(c).await? == 9_000);

    // A declined order has nothing to give back, and says so.
    let declined = Uuid::now_v7();
    s.authorize(declined, c, 1_000_000).await?;
    s.wait::<PaymentDeclined>(declined, 1).await?;
    s.refund(declined).await?;
    let nothing = s.wait::<PaymentRefunded>(declined, 1).await?;
    ensure!(
        nothing[0]
            == PaymentRefunded {
                order_id: declined,
                customer_id: c,
                amount_cents: 0,
                balance_cents: 9_000,
            },
        "{nothing:?}"
    );
    let t = s.ledger().await?;
    ensure!(
        t.captured_cents == 1_000 && t.balances_cents == 9_000 && t.granted_cents == 10_000,
        "{t:?}"
    );
    s.events_match_their_schemas().await?;
    Ok(())
}

async fn a_refund_before_the_authorization_voids_the_order(backend: Backend) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let c = s.customer().await?;
    let order = Uuid::now_v7();
    s.refund(order).await?;
    let refunded = s.wait::<PaymentRefunded>(order, 1).await?;
    ensure!(
        refunded[0]
            == PaymentRefunded {
                order_id: order,
                customer_id: Uuid::nil(),
                amount_cents: 0,
                balance_cents: 0,
            },
        "{refunded:?}"
    );
    // The authorization overtaken by its compensation arrives late.
    s.authorize(order, c, 4_000).await?;
    let declined = s.wait::<PaymentDeclined>(order, 1).await?;
    ensure!(
        declined[0]
            == PaymentDeclined {
                order_id: order,
                customer_id: c,
                amount_cents: 4_000,
                reason: "voided".into(),
            },
        "{declined:?}"
    );
    ensure!(s.balance(c).await? == 10_000, "a voided order was charged");
    s.refund(order).await?;
    let again = s.wait::<PaymentRefunded>(order, 2).await?;
    ensure!(again[1] == again[0], "{again:?}");
    let t = s.ledger().await?;
    ensure!(t.balances_cents == 10_000 && t.captured_cents == 0, "{t:?}");
    s.events_match_their_schemas().await?;
    Ok(())
}

async fn an_authorization_waits_for_a_registration_still_on_its_way(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let (c, order) = (Uuid::now_v7(), Uuid::now_v7());
    s.authorize(order, c, 1_000).await?;
    let host = s.host()?;
    skein_testkit::eventually(Duration::from_secs(10), || async {
        (host.stats().snapshot().transient_failures >= 1).then_some(())
    })
    .await
    .context("the authorization did not wait for the account")?;
    // The registration lands within the retries (100 ms, then 200 ms).
    s.register(c, Role::Customer).await?;
    let authorized = s.wait::<PaymentAuthorized>(order, 1).await?;
    ensure!(authorized[0].balance_cents == 9_000, "{authorized:?}");
    ensure!(s.outcomes(order).await? == (1, 0, 0));
    Ok(())
}

async fn an_unknown_account_is_retried_then_declined(backend: Backend) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let order = Uuid::now_v7();
    let stranger = Uuid::now_v7();
    s.authorize(order, stranger, 100).await?;
    let declined = s.wait::<PaymentDeclined>(order, 1).await?;
    ensure!(
        declined[0].reason == "unknown_account" && declined[0].customer_id == stranger,
        "{declined:?}"
    );
    let stats = s.host()?.stats().snapshot();
    ensure!(
        stats.transient_failures >= 2,
        "declined without waiting: {stats:?}"
    );
    // The decision stands even once the account exists.
    s.register(stranger, Role::Customer).await?;
    s.wait_account(stranger).await?;
    s.authorize(order, stranger, 100).await?;
    let again = s.wait::<PaymentDeclined>(order, 2).await?;
    ensure!(again[1] == again[0], "{again:?}");
    ensure!(s.balance(stranger).await? == 10_000);
    Ok(())
}

async fn an_invalid_amount_is_dead_lettered_with_its_reason_and_changes_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let c = s.customer().await?;
    let negative = Uuid::now_v7();
    s.authorize(negative, c, -5).await?;
    let dead = s.p.wait_dead_letters(1).await.map_err(boxed)?;
    let (info, _) = &dead[0];
    ensure!(
        info.reason.contains("/amount_cents: must be at least 0")
            && info.reason.contains(&negative.to_string())
            && info.reason.contains("got -5")
            && info.handler == "payments",
        "{info:?}"
    );
    // The worker goes on, and nothing about the refused order exists.
    let good = Uuid::now_v7();
    s.authorize(good, c, 10).await?;
    s.wait::<PaymentAuthorized>(good, 1).await?;
    ensure!(s.outcomes(negative).await? == (0, 0, 0));
    ensure!(s.balance(c).await? == 9_990);
    // A refused order was not recorded: a valid authorization of it works.
    s.authorize(negative, c, 10).await?;
    s.wait::<PaymentAuthorized>(negative, 1).await?;
    Ok(())
}

/// An order of free products (amount 0) is authorized with nothing taken
/// and without asking the provider (here declining every order it is
/// asked about), and its refund gives nothing back; before, it was
/// dead-lettered and the order's saga rejected it after its deadline.
async fn a_free_order_is_authorized_taking_nothing_and_refunded_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::declining_everything(backend).await?;
    let c = s.customer().await?;
    s.wait_account(c).await?;
    let free = Uuid::now_v7();
    s.authorize(free, c, 0).await?;
    let authorized = s.wait::<PaymentAuthorized>(free, 1).await?;
    ensure!(
        authorized[0].amount_cents == 0 && authorized[0].balance_cents == 10_000,
        "{authorized:?}"
    );
    s.refund(free).await?;
    let refunded = s.wait::<PaymentRefunded>(free, 1).await?;
    ensure!(
        refunded[0]
            == PaymentRefunded {
                order_id: free,
                customer_id: c,
                amount_cents: 0,
                balance_cents: 10_000,
            },
        "{refunded:?}"
    );
    ensure!(s.balance(c).await? == 10_000);
    let t = s.ledger().await?;
    ensure!(
        t.captured_cents == 0 && t.balances_cents == 10_000 && t.granted_cents == 10_000,
        "{t:?}"
    );
    ensure!(s.events_match_their_schemas().await? == 2);
    Ok(())
}

async fn the_provider_declines_at_its_failure_rate_and_takes_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let s = Payments::declining_everything(backend).await?;
    let c = s.customer().await?;
    let orders: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    for o in &orders {
        s.authorize(*o, c, 100).await?;
    }
    for o in &orders {
        let d = s.wait::<PaymentDeclined>(*o, 1).await?;
        ensure!(d[0].reason == "provider_declined", "{d:?}");
    }
    ensure!(s.balance(c).await? == 10_000);
    ensure!(s.events_match_their_schemas().await? == 5);
    Ok(())
}

async fn provider_latency_delays_each_order_without_holding_up_the_others(
    backend: Backend,
) -> anyhow::Result<()> {
    let latency = Duration::from_millis(400);
    let s = Payments::start(
        backend,
        PaymentsConfig {
            starting_balance_cents: 10_000,
            provider: ProviderConfig {
                latency,
                failure_rate: 0.0,
            },
        },
    )
    .await?;
    let c = s.customer().await?;
    let orders: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    let started = Instant::now();
    for o in &orders {
        s.authorize(*o, c, 100).await?;
    }
    for o in &orders {
        s.wait::<PaymentAuthorized>(*o, 1).await?;
    }
    let took = started.elapsed();
    ensure!(took >= latency, "the provider answered in {took:?}");
    // Eight slow authorizations in parallel lanes, not one after another.
    ensure!(took < latency * 6, "eight authorizations took {took:?}");
    ensure!(s.balance(c).await? == 9_200);
    Ok(())
}

async fn only_the_customer_and_admins_see_an_account(backend: Backend) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let c = s.customer().await?;
    let own = request(
        &s.p.bus,
        &GetAccount {
            caller: customer(c),
            customer_id: c,
        },
    )
    .await?;
    ensure!(
        own == Account {
            customer_id: c,
            balance_cents: 10_000
        }
    );
    ensure!(s.balance(c).await? == 10_000, "an admin cannot see it");
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
    ensure!(status(&other) == 403, "{other}");
    ensure!(
        !other.to_string().contains("10000"),
        "the refusal leaks the balance"
    );
    let nobody = Uuid::now_v7();
    let missing = request(
        &s.p.bus,
        &GetAccount {
            caller: customer(nobody),
            customer_id: nobody,
        },
    )
    .await
    .err()
    .context("an account nobody opened")?;
    ensure!(status(&missing) == 404, "{missing}");
    Ok(())
}

async fn the_ledger_balances_after_a_mix_of_operations(backend: Backend) -> anyhow::Result<()> {
    let s = Payments::start(
        backend,
        PaymentsConfig {
            starting_balance_cents: 5_000,
            provider: ProviderConfig::default(),
        },
    )
    .await?;
    let (a, b) = (s.customer().await?, s.customer().await?);
    let orders: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    s.authorize(orders[0], a, 1_200).await?; // authorized
    s.authorize(orders[1], a, 9_999).await?; // declined
    s.authorize(orders[2], b, 3_000).await?; // authorized, then refunded
    s.authorize(orders[3], b, 2_000).await?; // authorized
    s.authorize(orders[4], Uuid::now_v7(), 10).await?; // unknown account
    s.wait::<PaymentAuthorized>(orders[2], 1).await?;
    s.refund(orders[2]).await?;
    s.refund(orders[5]).await?; // voided
    s.wait::<PaymentAuthorized>(orders[0], 1).await?;
    s.wait::<PaymentDeclined>(orders[1], 1).await?;
    s.wait::<PaymentRefunded>(orders[2], 1).await?;
    s.wait::<PaymentAuthorized>(orders[3], 1).await?;
    s.wait::<PaymentDeclined>(orders[4], 1).await?;
    s.wait::<PaymentRefunded>(orders[5], 1).await?;
    let t = s.ledger().await?;
    ensure!(
        t == LedgerTotals {
            accounts: 2,
            balances_cents: 10_000 - 1_200 - 2_000,
            captured_cents: 1_200 + 2_000,
            granted_cents: 10_000,
        },
        "{t:?}"
    );
    ensure!(t.balances_cents + t.captured_cents == t.granted_cents);
    ensure!(s.balance(a).await? == 3_800 && s.balance(b).await? == 3_000);
    ensure!(s.events_match_their_schemas().await? == 7);
    Ok(())
}

async fn concurrent_authorizations_never_overdraw(backend: Backend) -> anyhow::Result<()> {
    let s = Payments::with_balance(backend, 10_000).await?;
    let c = s.customer().await?;
    let orders: Vec<Uuid> = (0..30).map(|_| Uuid::now_v7()).collect();
    for o in &orders {
        s.authorize(*o, c, 1_000).await?;
    }
    let mut authorized = 0;
    for o in &orders {
        let yes = skein_testkit::eventually(Duration::from_secs(15), || async {
            let (a, d, _) = s.outcomes(*o).await.ok()?;
            (a + d > 0).then_some(a > 0)
        })
        .await
        .context("an authorization got no answer")?;
        authorized += usize::from(yes);
    }
    ensure!(
        authorized == 10,
        "{authorized} authorizations of 10.00 on a 100.00 balance"
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
    customers_get_one_account_with_the_starting_balance_and_admins_none,
    an_authorization_takes_the_amount_and_a_short_balance_is_declined_taking_nothing,
    a_repeated_authorization_answers_with_the_first_outcome_and_charges_once,
    a_conflicting_authorization_for_a_decided_order_is_dead_lettered,
    a_refund_gives_the_money_back_once_and_a_repeat_tells_the_same_figures,
    a_refund_before_the_authorization_voids_the_order,
    an_authorization_waits_for_a_registration_still_on_its_way,
    an_unknown_account_is_retried_then_declined,
    a_free_order_is_authorized_taking_nothing_and_refunded_nothing,
    an_invalid_amount_is_dead_lettered_with_its_reason_and_changes_nothing,
    the_provider_declines_at_its_failure_rate_and_takes_nothing,
    provider_latency_delays_each_order_without_holding_up_the_others,
    only_the_customer_and_admins_see_an_account,
    the_ledger_balances_after_a_mix_of_operations,
    concurrent_authorizations_never_overdraw,
);
