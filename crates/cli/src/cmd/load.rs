//! `skein load`: place orders through the HTTP API the way clients do, wait
//! for every one to become final, then check that nothing was lost.
//!
//! A run has four phases:
//!
//! 1. **Set-up** over HTTP: the admin creates this run's products (tagged
//!    with a run id, so runs never share stock): ordinary ones with ample
//!    stock and small prices, a scarce one with no stock, and an expensive
//!    one no customer can pay for. `--customers` customers register and log
//!    in. The run then waits until payments has opened their accounts.
//! 2. **Orders.** `--concurrency` tasks, each with its own keep-alive
//!    connection, place `--orders` orders (at `--rate` per second, or as fast
//!    as answers come). The `--failure-mix` decides how many are meant to
//!    fail: *out-of-stock* orders add a line of the scarce product (catalog
//!    must reject the whole reservation), *declined* orders add the
//!    expensive product (payments declines, the saga releases the stock).
//!    Every order carries an `Idempotency-Key` and asks `Prefer: wait`, so
//!    one request usually answers with the final state; a 202 is followed by
//!    polling, and a failed request (connection lost, 429, 5xx) is sent
//!    again with the same key, which can never place the order twice.
//! 3. **Settling.** Each order has `--settle-timeout` to become final
//!    (confirmed, rejected or cancelled); one that does not is *stuck*.
//! 4. **Invariants**, from what the services report, not from what the run
//!    believes: no order lost or stuck; every order meant to fail was
//!    rejected and every final order costs what its lines do; the stock of
//!    each product is its initial stock less the confirmed units (HTTP
//!    catalog); the money is conserved (payments' ledger over NATS: balances
//!    plus captured equals granted, and the captured amount grew by exactly
//!    the confirmed totals). The exit status is non-zero when one fails.
//!
//! The money check assumes no other orders are placed during the run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::{json, Value};
use skein_bus::Bus;
use skein_contracts::payments::{Ledger, LedgerTotals};
use skein_contracts::{MAX_PRICE_CENTS, MAX_QUANTITY};
use skein_service::request;
use uuid::Uuid;

/// Place orders through the HTTP API, wait until each is final, check the invariants.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The HTTP API (an ingress, or a plain-HTTP load balancer in front of several).
    #[arg(long, env = "SKEIN_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// How many orders to place.
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Orders in flight at once (one keep-alive connection each).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Customers to register for this run; orders are spread over them. Each
    /// customer is limited by the ingress's --rate-limit (50 requests/s by
    /// default), and registering and logging in by its --login-rate-limit.
    #[arg(long, default_value_t = 10)]
    customers: usize,
    /// Share of orders meant to fail, e.g. `out-of-stock=0.05,declined=0.05`
    /// (the default), or `none`. Out-of-stock orders add a product with no
    /// stock; declined orders one that costs more than any account holds.
    #[arg(long, default_value = "out-of-stock=0.05,declined=0.05")]
    failure_mix: String,
    /// Place orders at this rate per second (open loop); 0: as fast as the
    /// concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds each order may take from its first request to its final state
    /// before it counts as stuck.
    #[arg(long, default_value_t = 60)]
    settle_timeout: u64,
    /// Seconds the ingress may hold an answer until the order is final
    /// (`Prefer: wait`); 0 answers at once and the order is polled.
    #[arg(long, default_value_t = 30)]
    wait: u64,
    /// Seed of the order mix (random by default; the report prints it).
    #[arg(long)]
    seed: Option<u64>,
    /// An admin account, to create this run's products (skein up prints the
    /// generated one on its first start).
    #[arg(long, env = "SKEIN_ADMIN_EMAIL")]
    admin_email: Option<String>,
    /// The admin's password.
    #[arg(long, env = "SKEIN_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Print the report as one JSON object, and no progress bar.
    #[arg(long)]
    json: bool,
}

/// Starting balance the expensive product is sure to exceed.
const EXPENSIVE_PRICE_CENTS: i64 = MAX_PRICE_CENTS;
/// A customer's password; the accounts exist only for the run.
const CUSTOMER_PASSWORD: &str = "skein load customer password";

/// What an order is meant to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    /// Any final state is right (a provider may decline it).
    Normal,
    /// Must be rejected: one line cannot be reserved.
    OutOfStock,
    /// Must be rejected: no account can pay for it.
    Declined,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Normal => "normal",
            Kind::OutOfStock => "out-of-stock",
            Kind::Declined => "declined",
        }
    }
}

/// The `--failure-mix`: shares of orders meant to fail.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Mix {
    out_of_stock: f64,
    declined: f64,
}

impl Mix {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut mix = Mix {
            out_of_stock: 0.0,
            declined: 0.0,
        };
        if text.trim() == "none" {
            return Ok(mix);
        }
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, share) = part.split_once('=').with_context(|| {
                format!("--failure-mix: {part:?} is not NAME=SHARE (e.g. declined=0.05)")
            })?;
            let share: f64 = share.trim().parse().ok().filter(|s| (0.0..=1.0).contains(s)).with_context(
                || format!("--failure-mix: the share of {name} must be a number from 0 to 1, not {share:?}"),
            )?;
            match name.trim() {
                "out-of-stock" => mix.out_of_stock = share,
                "declined" => mix.declined = share,
                other => {
                    bail!("--failure-mix: unknown kind {other:?}; use out-of-stock and declined")
                }
            }
        }
        ensure!(
            mix.out_of_stock + mix.declined <= 1.0,
            "--failure-mix: the shares add up to more than 1"
        );
        Ok(mix)
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> Kind {
        let x = rng.f64();
        if x < self.out_of_stock {
            Kind::OutOfStock
        } else if x < self.out_of_stock + self.declined {
            Kind::Declined
        } else {
            Kind::Normal
        }
    }
}

/// One of this run's products.
#[derive(Debug, Clone)]
struct Product {
    id: Uuid,
    price_cents: i64,
    stock: i64,
}

/// This run's catalog.
#[derive(Debug)]
struct Catalog {
    ordinary: Vec<Product>,
    scarce: Product,
    expensive: Product,
}

impl Catalog {
    fn all(&self) -> impl Iterator<Item = &Product> {
        self.ordinary.iter().chain([&self.scarce, &self.expensive])
    }
}

/// One order as planned.
#[derive(Debug, Clone)]
struct Plan {
    index: usize,
    kind: Kind,
    customer: usize,
    lines: Vec<(Uuid, i64)>,
    total_cents: i64,
}

fn plan_orders(catalog: &Catalog, args: &Args, mix: Mix, seed: u64) -> Vec<Plan> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..args.orders)
        .map(|index| {
            let kind = mix.pick(&mut rng);
            let first = &catalog.ordinary[rng.usize(..catalog.ordinary.len())];
            let mut lines = vec![(first, rng.i64(1..=3))];
            match kind {
                Kind::Normal => {
                    let second = &catalog.ordinary[rng.usize(..catalog.ordinary.len())];
                    if rng.bool() && second.id != first.id {
                        lines.push((second, rng.i64(1..=3)));
                    }
                }
                Kind::OutOfStock => lines.push((&catalog.scarce, 1)),
                Kind::Declined => lines.push((&catalog.expensive, 1)),
            }
            Plan {
                index,
                kind,
                customer: index % args.customers,
                total_cents: lines.iter().map(|(p, q)| p.price_cents * q).sum(),
                lines: lines.into_iter().map(|(p, q)| (p.id, q)).collect(),
            }
        })
        .collect()
}

/// How one order ended.
#[derive(Debug, Clone)]
struct Outcome {
    plan: Plan,
    order_id: Option<Uuid>,
    /// `confirmed`, `rejected`, `cancelled`; `pending` or `unknown` when stuck.
    status: String,
    reason: Option<String>,
    total_cents: Option<i64>,
    /// First request to final state.
    latency: Option<Duration>,
    /// Why it never became final, or never was accepted.
    error: Option<String>,
}

impl Outcome {
    fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "confirmed" | "rejected" | "cancelled")
    }
}

/// Figures shared by the order tasks.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    rate_limited: AtomicU64,
}

/// An HTTP/1 connection to the API that reconnects after an error.
#[derive(Debug)]
struct Http {
    addr: SocketAddr,
    authority: String,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

/// An answer: status, `Retry-After` seconds, JSON body (null when not JSON).
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Value,
}

impl Http {
    async fn new(url: &str) -> anyhow::Result<Self> {
        let uri: hyper::Uri = url
            .parse()
            .with_context(|| format!("--url {url:?} is not a URL such as http://127.0.0.1:8080"))?;
        ensure!(
            uri.scheme_str() == Some("http"),
            "--url {url:?}: skein load speaks plain HTTP; point it at the ingress or a plain-HTTP load balancer"
        );
        ensure!(
            uri.path() == "/" || uri.path().is_empty(),
            "--url {url:?}: give the server only (http://host:port), not a path"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("--url {url:?} names no host"))?
            .clone();
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .with_context(|| format!("cannot resolve {}", authority.host()))?
            .next()
            .with_context(|| format!("{} has no address", authority.host()))?;
        Ok(Self {
            addr,
            authority: authority.to_string(),
            sender: None,
        })
    }

    fn fresh(&self) -> Self {
        Self {
            addr: self.addr,
            authority: self.authority.clone(),
            sender: None,
        }
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, String)],
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<Answer> {
        let result = tokio::time::timeout(timeout, self.send(method, path, token, headers, body))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {timeout:?}")));
        if result.is_err() {
            // The connection may be half-used; start over next time.
            self.sender = None;
        }
        result
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                let stream = tokio::net::TcpStream::connect(self.addr)
                    .await
                    .with_context(|| format!("cannot connect to {}", self.addr))?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(connection);
                self.sender.insert(sender)
            }
        };
        sender.ready().await?;
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let response = sender.send_request(request.body(Full::new(bytes))?).await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            retry_after,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }
}

/// A problem+json answer in one line.
fn problem(answer: &Answer) -> String {
    match answer
        .body
        .get("detail")
        .or_else(|| answer.body.get("title"))
    {
        Some(Value::String(detail)) => format!("{}: {detail}", answer.status),
        _ => format!("{}", answer.status),
    }
}

/// How long to wait before trying again after `answer` (or a transport error).
fn backoff(answer: Option<&Answer>, attempt: u32) -> Duration {
    answer
        .and_then(|a| a.retry_after)
        .unwrap_or_else(|| Duration::from_millis(50u64 << attempt.min(5)))
        .min(Duration::from_secs(5))
}

/// Sends an idempotent set-up request until it gets an answer that is not
/// 429 or 5xx (or `deadline` passes).
async fn setup_call(
    http: &mut Http,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
    deadline: Instant,
    rate_limited: &mut bool,
) -> anyhow::Result<Answer> {
    let mut attempt = 0;
    loop {
        let answer = http
            .call(
                method,
                path,
                token,
                &[],
                Some(body),
                Duration::from_secs(30),
            )
            .await;
        let retry = match &answer {
            Ok(a) if a.status == 429 => {
                *rate_limited = true;
                true
            }
            Ok(a) => a.status >= 500,
            Err(_) => true,
        };
        if !retry || Instant::now() + backoff(answer.as_ref().ok(), attempt) > deadline {
            return answer.with_context(|| format!("{method} {path}"));
        }
        tokio::time::sleep(backoff(answer.as_ref().ok(), attempt)).await;
        attempt += 1;
    }
}

/// Logs in, returning the access token.
async fn log_in(
    http: &mut Http,
    email: &str,
    password: &str,
    deadline: Instant,
    rate_limited: &mut bool,
) -> anyhow::Result<String> {
    let answer = setup_call(
        http,
        "POST",
        "/v1/auth/token",
        None,
        &json!({"email": email, "password": password}),
        deadline,
        rate_limited,
    )
    .await?;
    ensure!(
        answer.status == 200,
        "logging in as {email}: {}",
        problem(&answer)
    );
    answer.body["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("the token answer has no access_token")
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    let mix = Mix::parse(&args.failure_mix)?;
    ensure!(args.orders > 0, "--orders must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.customers > 0, "--customers must be at least 1");
    ensure!(
        args.rate.is_finite() && args.rate >= 0.0,
        "--rate must be a number of orders per second, or 0 for as fast as possible"
    );
    ensure!(
        args.settle_timeout > 0,
        "--settle-timeout must be at least 1 second"
    );
    let (Some(admin_email), Some(admin_password)) = (&args.admin_email, &args.admin_password)
    else {
        bail!(
            "skein load creates its own products and needs an admin: pass --admin-email and \
             --admin-password (or SKEIN_ADMIN_EMAIL and SKEIN_ADMIN_PASSWORD; skein up prints \
             the admin it generates on its first start)"
        );
    };
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let say = |line: String| {
        if !args.json {
            eprintln!("{line}");
        }
    };

    let mut http = Http::new(&args.url).await?;
    let live = http
        .call(
            "GET",
            "/health/live",
            None,
            &[],
            None,
            Duration::from_secs(5),
        )
        .await;
    if !matches!(&live, Ok(a) if a.status == 200) {
        bail!(
            "the HTTP API at {} does not answer ({}): start it with `skein up` or `skein ingress`, or pass --url",
            args.url,
            match live {
                Ok(a) => problem(&a),
                Err(e) => format!("{e:#}"),
            }
        );
    }
    let bus = super::connect(nats_url).await.with_context(|| {
        format!("skein load reads payments' ledger over NATS at {nats_url}; pass --nats-url")
    })?;
    let ledger_before = ledger(&bus).await?;

    // --- Set-up --------------------------------------------------------------
    let setup_deadline = Instant::now() + Duration::from_secs(300);
    let mut rate_limited = false;
    let admin = log_in(
        &mut http,
        admin_email,
        admin_password,
        setup_deadline,
        &mut rate_limited,
    )
    .await
    .context("the admin cannot log in (check --admin-email and --admin-password)")?;
    let run_id = Uuid::now_v7().simple().to_string();
    let tag = &run_id[run_id.len() - 10..];
    // Enough stock that ordinary orders never run out: at most 6 units an order.
    let ordinary = 4 + (args.orders * 6).div_ceil(MAX_QUANTITY as usize);
    let mut created = Vec::new();
    for n in 0..ordinary + 2 {
        let (name, price_cents, stock) = match n {
            n if n < ordinary => (
                format!("ordinary {n}"),
                5 + (n as i64 * 7) % 46,
                MAX_QUANTITY,
            ),
            n if n == ordinary => ("scarce".to_owned(), 10, 0),
            _ => ("expensive".to_owned(), EXPENSIVE_PRICE_CENTS, MAX_QUANTITY),
        };
        let answer = setup_call(
            &mut http,
            "POST",
            "/v1/products",
            Some(&admin),
            &json!({"sku": format!("load-{tag}-{n}"), "name": format!("Load {tag} {name}"),
                    "price_cents": price_cents, "stock": stock}),
            setup_deadline,
            &mut rate_limited,
        )
        .await?;
        ensure!(
            answer.status == 201,
            "creating a product: {}",
            problem(&answer)
        );
        let id = answer.body["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .context("the product answer has no id")?;
        created.push(Product {
            id,
            price_cents,
            stock,
        });
    }
    let expensive = created.pop().context("no products")?;
    let scarce = created.pop().context("no products")?;
    let catalog = Catalog {
        ordinary: created,
        scarce,
        expensive,
    };
    say(format!(
        "run {tag}: {} products, registering {} customers",
        ordinary + 2,
        args.customers
    ));
    let mut tokens = Vec::with_capacity(args.customers);
    for n in 0..args.customers {
        let email = format!("load-{tag}-{n}@load.skein.test");
        let answer = setup_call(
            &mut http,
            "POST",
            "/v1/auth/register",
            None,
            &json!({"email": email, "password": CUSTOMER_PASSWORD, "name": format!("Load customer {n}")}),
            setup_deadline,
            &mut rate_limited,
        )
        .await?;
        // 409: a retried registration that had worked.
        ensure!(
            matches!(answer.status, 201 | 409),
            "registering a customer: {}",
            problem(&answer)
        );
        tokens.push(Arc::<str>::from(
            log_in(
                &mut http,
                &email,
                CUSTOMER_PASSWORD,
                setup_deadline,
                &mut rate_limited,
            )
            .await?,
        ));
        if rate_limited && n == 0 {
            say("  registration is rate-limited by the ingress (--login-rate-limit); waiting as it asks".to_owned());
        }
    }
    wait_for_accounts(&bus, ledger_before.accounts + args.customers as i64).await?;

    // --- Orders --------------------------------------------------------------
    let plans = plan_orders(&catalog, &args, mix, seed);
    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(plans.len() as u64);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} final, {msg} [{elapsed}]")
        {
            bar.set_style(style);
        }
        bar
    };
    let plans = Arc::new(plans);
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let counters = Arc::new(Counters::default());
    let settle = Duration::from_secs(args.settle_timeout);
    let wait = args.wait.min(30);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(plans.len()) {
        let (plans, tokens, next, counters) = (
            plans.clone(),
            tokens.clone(),
            next.clone(),
            counters.clone(),
        );
        let (mut http, progress, tag) = (http.fresh(), progress.clone(), tag.to_owned());
        let rate = args.rate;
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(plan) = plans.get(i) else { break };
                if rate > 0.0 {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let key = format!("load-{tag}-{i}");
                let outcome = place(
                    &mut http,
                    plan,
                    &tokens[plan.customer],
                    &key,
                    wait,
                    settle,
                    &counters,
                )
                .await;
                progress.inc(1);
                progress.set_message(format!(
                    "{} retried, {} rate-limited",
                    counters.retries.load(Ordering::Relaxed),
                    counters.rate_limited.load(Ordering::Relaxed)
                ));
                outcomes.push(outcome);
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::with_capacity(plans.len());
    for task in tasks {
        outcomes.extend(task.await.context("an order task failed")?);
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    outcomes.sort_by_key(|o| o.plan.index);

    // --- Invariants ----------------------------------------------------------
    let checks = check(&mut http, &admin, &bus, &catalog, &outcomes, &ledger_before).await?;
    let report = Report::new(&args, tag, seed, mix, &outcomes, elapsed, &counters, checks);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    if !report.ok {
        bail!("an invariant does not hold (above)");
    }
    Ok(())
}

/// Places one order and follows it until it is final or `settle` passes.
async fn place(
    http: &mut Http,
    plan: &Plan,
    token: &str,
    key: &str,
    wait: u64,
    settle: Duration,
    counters: &Counters,
) -> Outcome {
    let body = json!({"lines": plan.lines.iter()
        .map(|(id, q)| json!({"product_id": id, "quantity": q})).collect::<Vec<_>>()});
    let mut outcome = Outcome {
        plan: plan.clone(),
        order_id: None,
        status: "unknown".to_owned(),
        reason: None,
        total_cents: None,
        latency: None,
        error: None,
    };
    let started = Instant::now();
    let deadline = started + settle;
    let timeout = Duration::from_secs(wait + 10);
    let mut attempt = 0u32;
    // Place it: until an answer says the order exists.
    let mut answer = loop {
        // Only the first try waits: a retry may find the order long final,
        // and no new event would end the wait.
        let mut headers = vec![("idempotency-key", key.to_owned())];
        if attempt == 0 && wait > 0 {
            headers.push(("prefer", format!("wait={wait}")));
        }
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let answer = http
            .call(
                "POST",
                "/v1/orders",
                Some(token),
                &headers,
                Some(&body),
                timeout,
            )
            .await;
        let done = match &answer {
            Ok(a) if (200..=202).contains(&a.status) => true,
            Ok(a) if a.status == 429 || a.status >= 500 => {
                if a.status == 429 {
                    counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
            Ok(a) => {
                // Refused: the run itself is wrong (or the API changed).
                outcome.error = Some(format!("POST /v1/orders: {}", problem(a)));
                return outcome;
            }
            Err(_) => false,
        };
        if done {
            break answer.ok();
        }
        let pause = backoff(answer.as_ref().ok(), attempt);
        if Instant::now() + pause > deadline {
            outcome.error = Some(match answer {
                Ok(a) => format!("POST /v1/orders kept failing: {}", problem(&a)),
                Err(e) => format!("POST /v1/orders kept failing: {e:#}"),
            });
            return outcome;
        }
        counters.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(pause).await;
        attempt += 1;
    };
    // Follow it: the answer, then GET until final.
    let mut poll = Duration::from_millis(10);
    loop {
        if let Some(a) = &answer {
            let id = a.body.get("id").or_else(|| a.body.get("order_id"));
            if let Some(id) = id.and_then(Value::as_str).and_then(|s| s.parse().ok()) {
                outcome.order_id = Some(id);
            }
            if a.status == 200 {
                if let Some(status) = a.body["status"].as_str() {
                    outcome.status = status.to_owned();
                    outcome.reason = a.body["reason"].as_str().map(str::to_owned);
                    outcome.total_cents = a.body["total_cents"].as_i64();
                    if outcome.is_final() {
                        outcome.latency = Some(started.elapsed());
                        return outcome;
                    }
                }
            }
        }
        if Instant::now() + poll > deadline {
            outcome.error = Some(format!(
                "not final after {settle:?} (last seen {})",
                outcome.status
            ));
            return outcome;
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(Duration::from_millis(500));
        let Some(id) = outcome.order_id else {
            outcome.error = Some("the order was accepted without an id".to_owned());
            return outcome;
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        answer = match http
            .call(
                "GET",
                &format!("/v1/orders/{id}"),
                Some(token),
                &[],
                None,
                timeout,
            )
            .await
        {
            // 404: orders has not handled the command yet.
            Ok(a) if a.status == 200 => Some(a),
            Ok(a) => {
                if a.status == 429 {
                    counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    if let Some(pause) = a.retry_after {
                        tokio::time::sleep(pause.min(Duration::from_secs(5))).await;
                    }
                }
                None
            }
            Err(_) => None,
        };
    }
}

async fn ledger(bus: &Bus) -> anyhow::Result<LedgerTotals> {
    request(bus, &Ledger {})
        .await
        .context("payments does not answer its ledger query: is the payments worker running?")
}

/// Waits until payments has opened `accounts` accounts (registrations reach
/// it as events).
async fn wait_for_accounts(bus: &Bus, accounts: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = ledger(bus).await?.accounts;
        if now >= accounts {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "payments opened {now} of {accounts} accounts in 60 s after the customers registered: \
                 are identity and payments running?"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One invariant and whether it holds.
#[derive(Debug, Clone, Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// Expected stock, money and outcomes from the orders, for [`check`].
#[derive(Debug, Default, PartialEq)]
struct Expected {
    /// Initial stock less confirmed units, per product.
    stock: BTreeMap<Uuid, i64>,
    /// Sum of the confirmed orders' totals.
    confirmed_cents: i64,
}

fn expected(catalog: &Catalog, outcomes: &[Outcome]) -> Expected {
    let mut stock: BTreeMap<Uuid, i64> = catalog.all().map(|p| (p.id, p.stock)).collect();
    let mut confirmed_cents = 0;
    for o in outcomes.iter().filter(|o| o.status == "confirmed") {
        confirmed_cents += o.total_cents.unwrap_or(o.plan.total_cents);
        for (id, quantity) in &o.plan.lines {
            *stock.entry(*id).or_default() -= quantity;
        }
    }
    Expected {
        stock,
        confirmed_cents,
    }
}

/// The invariants that need nothing but the outcomes.
fn check_outcomes(outcomes: &[Outcome]) -> [Check; 2] {
    let stuck: Vec<&Outcome> = outcomes.iter().filter(|o| !o.is_final()).collect();
    let lost = Check {
        name: "no order lost or stuck",
        ok: stuck.is_empty(),
        detail: match stuck.first() {
            None => format!("{} of {} final", outcomes.len(), outcomes.len()),
            Some(first) => format!(
                "{} of {} not final, e.g. order #{} {}: {}",
                stuck.len(),
                outcomes.len(),
                first.plan.index,
                first
                    .order_id
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "(no id)".into()),
                first.error.as_deref().unwrap_or(&first.status)
            ),
        },
    };
    let mut wrong = Vec::new();
    for o in outcomes.iter().filter(|o| o.is_final()) {
        if o.plan.kind != Kind::Normal && o.status != "rejected" {
            wrong.push(format!(
                "order #{} ({}) ended {}",
                o.plan.index,
                o.plan.kind.as_str(),
                o.status
            ));
        }
        if let Some(total) = o.total_cents.filter(|t| *t != o.plan.total_cents) {
            wrong.push(format!(
                "order #{} costs {total} cents, its lines {}",
                o.plan.index, o.plan.total_cents
            ));
        }
    }
    let meant_to_fail = outcomes
        .iter()
        .filter(|o| o.is_final() && o.plan.kind != Kind::Normal)
        .count();
    let outcomes_ok = Check {
        name: "outcomes match their cause",
        ok: wrong.is_empty(),
        detail: match wrong.first() {
            None => format!(
                "{meant_to_fail} orders meant to fail were rejected; every total matches its lines"
            ),
            Some(first) => format!("{} wrong, e.g. {first}", wrong.len()),
        },
    };
    [lost, outcomes_ok]
}

/// Stock of this run's products against what the confirmed orders took.
fn check_stock(expected: &Expected, available: &BTreeMap<Uuid, i64>) -> Check {
    let wrong: Vec<String> = expected
        .stock
        .iter()
        .filter(|(id, want)| available.get(id) != Some(want))
        .map(|(id, want)| match available.get(id) {
            Some(have) => format!("product {id} has {have} available, expected {want}"),
            None => format!("product {id} is missing from the catalog"),
        })
        .collect();
    Check {
        name: "stock conserved",
        ok: wrong.is_empty(),
        detail: match wrong.first() {
            None => format!(
                "{} products: available = initial - confirmed units",
                expected.stock.len()
            ),
            Some(first) => format!("{} products wrong, e.g. {first}", wrong.len()),
        },
    }
}

/// Payments' ledger: balances plus captured equals granted, and the
/// captured amount grew by the confirmed totals.
fn check_money(expected: &Expected, before: &LedgerTotals, after: &LedgerTotals) -> Check {
    let held = after.balances_cents + after.captured_cents;
    let captured = after.captured_cents - before.captured_cents;
    let conserved = held == after.granted_cents;
    let grew = captured == expected.confirmed_cents;
    Check {
        name: "money conserved",
        ok: conserved && grew,
        detail: format!(
            "balances + captured = {held}, granted {} ({}); captured grew by {captured}, \
             confirmed orders total {} ({})",
            after.granted_cents,
            if conserved { "equal" } else { "NOT EQUAL" },
            expected.confirmed_cents,
            if grew {
                "equal"
            } else {
                "NOT EQUAL: were other orders placed during the run?"
            }
        ),
    }
}

/// Runs every invariant check. Stock and money are read again for a few
/// seconds while they disagree: compensations may still be in flight when
/// an order is already final.
async fn check(
    http: &mut Http,
    admin: &str,
    bus: &Bus,
    catalog: &Catalog,
    outcomes: &[Outcome],
    ledger_before: &LedgerTotals,
) -> anyhow::Result<Vec<Check>> {
    let mut checks = check_outcomes(outcomes).to_vec();
    let expected = expected(catalog, outcomes);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = http
            .call(
                "GET",
                "/v1/products",
                Some(admin),
                &[],
                None,
                Duration::from_secs(10),
            )
            .await
            .context("GET /v1/products")?;
        ensure!(
            answer.status == 200,
            "GET /v1/products: {}",
            problem(&answer)
        );
        let available: BTreeMap<Uuid, i64> = answer.body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["id"].as_str()?.parse().ok()?, p["available"].as_i64()?)))
            .collect();
        let stock = check_stock(&expected, &available);
        let money = check_money(&expected, ledger_before, &ledger(bus).await?);
        if (stock.ok && money.ok) || Instant::now() > deadline {
            checks.push(stock);
            checks.push(money);
            return Ok(checks);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// What `skein load` prints.
#[derive(Debug, Serialize)]
struct Report {
    run: String,
    seed: u64,
    orders: usize,
    concurrency: usize,
    customers: usize,
    rate: Option<f64>,
    mix: Mix,
    final_orders: usize,
    elapsed_s: f64,
    /// Final orders per second of the run.
    throughput: f64,
    /// First request to final state, of the final orders.
    latency_ms: Latency,
    /// Final orders by status, and rejections by kind.
    by_status: BTreeMap<String, usize>,
    by_kind: BTreeMap<String, BTreeMap<String, usize>>,
    /// Rejections by reason, and the errors of orders that never became final.
    reasons: BTreeMap<String, usize>,
    requests: u64,
    retries: u64,
    rate_limited: u64,
    invariants: Vec<Check>,
    ok: bool,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn new(
        args: &Args,
        tag: &str,
        seed: u64,
        mix: Mix,
        outcomes: &[Outcome],
        elapsed: Duration,
        counters: &Counters,
        invariants: Vec<Check>,
    ) -> Self {
        let mut latencies: Vec<Duration> = outcomes.iter().filter_map(|o| o.latency).collect();
        latencies.sort();
        let mut by_status = BTreeMap::new();
        let mut by_kind: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        let mut reasons = BTreeMap::new();
        for o in outcomes {
            *by_status.entry(o.status.clone()).or_default() += 1;
            if let Some(reason) = o.error.as_ref().or(o.reason.as_ref()) {
                // Ids make every reason unique; count the kind of reason.
                let general: String = reason
                    .split_whitespace()
                    .filter(|w| {
                        Uuid::try_parse(
                            w.trim_matches(|c: char| !c.is_ascii_hexdigit() && c != '-'),
                        )
                        .is_err()
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                *reasons.entry(general).or_default() += 1;
            }
            *by_kind
                .entry(o.plan.kind.as_str().to_owned())
                .or_default()
                .entry(o.status.clone())
                .or_default() += 1;
        }
        let final_orders = latencies.len();
        Self {
            run: tag.to_owned(),
            seed,
            orders: outcomes.len(),
            concurrency: args.concurrency,
            customers: args.customers,
            rate: (args.rate > 0.0).then_some(args.rate),
            mix,
            final_orders,
            elapsed_s: elapsed.as_secs_f64(),
            throughput: final_orders as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_ms: Latency {
                p50: percentile(&latencies, 0.50),
                p90: percentile(&latencies, 0.90),
                p99: percentile(&latencies, 0.99),
                max: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            },
            by_status,
            by_kind,
            reasons,
            requests: counters.requests.load(Ordering::Relaxed),
            retries: counters.retries.load(Ordering::Relaxed),
            rate_limited: counters.rate_limited.load(Ordering::Relaxed),
            ok: invariants.iter().all(|c| c.ok),
            invariants,
        }
    }

    fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let counts = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "{} orders ({} final) in {:.1} s: {:.1} orders/s  [run {}, seed {}, concurrency {}, {} customers{}]",
            self.orders,
            self.final_orders,
            self.elapsed_s,
            self.throughput,
            self.run,
            self.seed,
            self.concurrency,
            self.customers,
            self.rate.map(|r| format!(", rate {r}/s")).unwrap_or_default(),
        );
        let _ = writeln!(out, "  outcomes: {}", counts(&self.by_status));
        for (kind, statuses) in &self.by_kind {
            let _ = writeln!(out, "    {kind:<13} {}", counts(statuses));
        }
        for (reason, n) in &self.reasons {
            let _ = writeln!(out, "    {n:>6} x {reason}");
        }
        let l = &self.latency_ms;
        let _ = writeln!(
            out,
            "  request to final state: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            l.p50, l.p90, l.p99, l.max
        );
        let _ = writeln!(
            out,
            "  {} requests, {} retried, {} rate-limited{}",
            self.requests,
            self.retries,
            self.rate_limited,
            if self.rate_limited > 0 {
                " (raise the ingress's --rate-limit or use more --customers)"
            } else {
                ""
            }
        );
        let _ = writeln!(out, "invariants:");
        for c in &self.invariants {
            let _ = writeln!(
                out,
                "  {}  {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(stock: i64, price_cents: i64) -> Product {
        Product {
            id: Uuid::now_v7(),
            price_cents,
            stock,
        }
    }

    fn catalog() -> Catalog {
        Catalog {
            ordinary: vec![product(100, 5), product(100, 7)],
            scarce: product(0, 10),
            expensive: product(100, EXPENSIVE_PRICE_CENTS),
        }
    }

    fn outcome(plan: Plan, status: &str) -> Outcome {
        Outcome {
            total_cents: Some(plan.total_cents),
            plan,
            order_id: Some(Uuid::now_v7()),
            status: status.to_owned(),
            reason: None,
            latency: Some(Duration::from_millis(5)),
            error: None,
        }
    }

    fn plan(index: usize, kind: Kind, lines: &[(&Product, i64)]) -> Plan {
        Plan {
            index,
            kind,
            customer: 0,
            total_cents: lines.iter().map(|(p, q)| p.price_cents * q).sum(),
            lines: lines.iter().map(|(p, q)| (p.id, *q)).collect(),
        }
    }

    #[test]
    fn the_failure_mix_parses_and_refuses_nonsense() {
        let mix = Mix::parse("out-of-stock=0.1, declined=0.2").expect("valid");
        assert_eq!((mix.out_of_stock, mix.declined), (0.1, 0.2));
        assert_eq!(Mix::parse("none").expect("none").declined, 0.0);
        for bad in [
            "declined",
            "declined=2",
            "declined=x",
            "lost=0.1",
            "declined=0.6,out-of-stock=0.6",
        ] {
            let e = Mix::parse(bad).expect_err(bad).to_string();
            assert!(e.starts_with("--failure-mix"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_healthy_run_passes_every_check() {
        let c = catalog();
        let a = &c.ordinary[0];
        let outcomes = vec![
            outcome(plan(0, Kind::Normal, &[(a, 3)]), "confirmed"),
            outcome(
                plan(1, Kind::OutOfStock, &[(a, 2), (&c.scarce, 1)]),
                "rejected",
            ),
            outcome(plan(2, Kind::Declined, &[(&c.expensive, 1)]), "rejected"),
        ];
        assert!(check_outcomes(&outcomes).iter().all(|c| c.ok));
        let want = expected(&c, &outcomes);
        assert_eq!(want.confirmed_cents, 15);
        let available: BTreeMap<Uuid, i64> = c.all().map(|p| (p.id, p.stock)).collect();
        let mut available = available;
        *available.entry(a.id).or_default() -= 3;
        assert!(check_stock(&want, &available).ok);
        let before = LedgerTotals {
            accounts: 1,
            balances_cents: 1000,
            captured_cents: 0,
            granted_cents: 1000,
        };
        let after = LedgerTotals {
            balances_cents: 985,
            captured_cents: 15,
            ..before.clone()
        };
        assert!(check_money(&want, &before, &after).ok);
    }

    #[test]
    fn a_broken_run_fails_the_check_it_breaks() {
        let c = catalog();
        let a = &c.ordinary[0];
        // Stuck, and a declined order that was confirmed.
        let outcomes = vec![
            outcome(plan(0, Kind::Normal, &[(a, 1)]), "pending"),
            outcome(plan(1, Kind::Declined, &[(&c.expensive, 1)]), "confirmed"),
        ];
        let [lost, causes] = check_outcomes(&outcomes);
        assert!(
            !lost.ok && lost.detail.starts_with("1 of 2 not final"),
            "{lost:?}"
        );
        assert!(
            !causes.ok && causes.detail.contains("(declined) ended confirmed"),
            "{causes:?}"
        );
        // Stock released twice: more available than there was.
        let fine = vec![outcome(plan(0, Kind::Normal, &[(a, 1)]), "confirmed")];
        let want = expected(&c, &fine);
        let mut available: BTreeMap<Uuid, i64> = c.all().map(|p| (p.id, p.stock)).collect();
        assert!(!check_stock(&want, &available).ok);
        *available.entry(a.id).or_default() -= 1;
        assert!(check_stock(&want, &available).ok);
        available.remove(&c.scarce.id);
        let stock = check_stock(&want, &available);
        assert!(
            !stock.ok && stock.detail.contains("is missing"),
            "{stock:?}"
        );
        // Money taken but not accounted, or created from nothing.
        let before = LedgerTotals {
            accounts: 1,
            balances_cents: 1000,
            captured_cents: 0,
            granted_cents: 1000,
        };
        let charged_twice = LedgerTotals {
            balances_cents: 990,
            captured_cents: 10,
            ..before.clone()
        };
        assert!(!check_money(&want, &before, &charged_twice).ok);
        let leaked = LedgerTotals {
            balances_cents: 1000,
            captured_cents: 5,
            ..before.clone()
        };
        let money = check_money(&want, &before, &leaked);
        assert!(!money.ok && money.detail.contains("NOT EQUAL"), "{money:?}");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&sorted, 0.5), 50.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&sorted[..1], 0.99), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
