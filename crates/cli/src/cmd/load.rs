//! `skein load`: place orders through the HTTP API the way clients do, wait
//! for every one to become final, then check that nothing was lost.
//!
//! A run has four phases:
//!
//! 1. **Set-up** over HTTP: the admin creates this run's products (tagged
//!    with a run id, so runs never share stock): ordinary ones with ample
//!    stock and small prices, a scarce one with no stock, and an expensive
//!    one no customer can pay for. `--customers` customers register and log
//!    in. The run then waits until payments has opened their accounts and
//!    reads each starting balance (which must be below the expensive price).
//!    Set-up requests are retried after 429, 5xx and lost connections;
//!    product creation carries an `Idempotency-Key`, and a product found to
//!    exist already (409, an earlier try that worked) is looked up by SKU.
//! 2. **Orders.** `placing N orders` goes to stderr (also with `--json`, so
//!    a supervising process knows when set-up is over). `--concurrency`
//!    tasks, each with its own keep-alive connection, place `--orders`
//!    orders (at `--rate` per second, or as fast as answers come). The
//!    `--failure-mix` decides how many are meant to fail: *out-of-stock*
//!    orders add a line of the scarce product (catalog must reject the whole
//!    reservation), *declined* orders add the expensive product (payments
//!    declines, the saga releases the stock). Every order carries an
//!    `Idempotency-Key` and asks `Prefer: wait`, so one request usually
//!    answers with the final state; a 202 is followed by polling, and a
//!    failed request (connection lost, 429, 5xx) is sent again with the same
//!    key, which can never place the order twice. A 401 (a token expired
//!    during a long run) logs in again and sends the request once more.
//! 3. **Settling.** Each order has `--settle-timeout` to become final
//!    (confirmed, rejected or cancelled); one that does not is *stuck*.
//!    Latency runs from the order's first request, or with `--rate` from the
//!    moment the schedule wanted it sent, so a backed-up system cannot hide
//!    its queueing (coordinated omission).
//! 4. **Invariants**, from what the services report, not from what the run
//!    believes: no order lost or stuck; each order ended as its kind allows,
//!    for the reason its kind allows, and costs what its lines do; each
//!    customer's order list (`GET /v1/orders` as that customer) holds
//!    exactly the orders this run placed for them, in the same state; the
//!    stock of each product is its initial stock less the confirmed units
//!    (HTTP catalog); the money is conserved: payments' ledger over NATS
//!    (balances plus captured equals granted, and the captured amount grew
//!    by exactly the confirmed totals) and per customer (starting balance
//!    less the balance now equals their confirmed orders' totals). The
//!    reads are retried after transient errors and repeated while they
//!    disagree, for `--settle-timeout` (at least 30 s): compensations may be
//!    in flight when an order is already final. Once they agree, they are
//!    read once more after the workers have gone quiet (no consumer of
//!    `EVENTS` or `COMMANDS` holds a message delivered and not acknowledged,
//!    or one not delivered yet; at most [`QUIET_WITHIN`]): a message a
//!    killed copy left unacknowledged comes back after `ack_wait`, and were
//!    it applied twice, that read would see it. The exit status is non-zero
//!    when one fails.
//!
//! The global money check assumes no other orders are placed during the
//! run; the per-customer checks do not (the customers are the run's own).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::{json, Value};
use skein_bus::Bus;
use skein_contracts::payments::{GetAccount, Ledger, LedgerTotals};
use skein_contracts::{Caller, MAX_PRICE_CENTS, MAX_QUANTITY};
use skein_message::Query;
use skein_service::{request, RequestError};
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
    /// Place orders at this rate per second (open loop; at least 0.001);
    /// 0: as fast as the concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds each order may take from its first request to its final state
    /// before it counts as stuck; also how long the invariant checks may
    /// wait for the services to agree (at least 30 s).
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

/// Price of the product no account can pay for: starting balances must be
/// below it (set-up checks).
const EXPENSIVE_PRICE_CENTS: i64 = MAX_PRICE_CENTS;
/// A customer's password; the accounts exist only for the run.
const CUSTOMER_PASSWORD: &str = "skein load customer password";
/// The slowest `--rate`: one order in 1,000 s. Slower is a mistake, and
/// its schedule would not fit a `Duration`.
const MIN_RATE: f64 = 0.001;
/// The longest open-loop schedule `--orders` and `--rate` may make.
const MAX_SCHEDULE: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest `Retry-After` obeyed at once (log-ins ask for 6 s by default).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long logging in again after a 401 may take.
const RENEWAL_TIMEOUT: Duration = Duration::from_secs(120);
/// The shortest time the invariant checks may wait for agreement.
const MIN_CHECK_WINDOW: Duration = Duration::from_secs(30);

/// What an order is meant to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    /// Confirmed, unless payments declines it (`provider_declined` from
    /// the simulated provider, `insufficient_funds` once a customer's
    /// balance runs out).
    Normal,
    /// Must be rejected: the scarce line cannot be reserved.
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

/// Refuses arguments that cannot make a run, saying which flag to fix;
/// returns the parsed failure mix.
fn validate(args: &Args) -> anyhow::Result<Mix> {
    let mix = Mix::parse(&args.failure_mix)?;
    ensure!(args.orders > 0, "--orders must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.customers > 0, "--customers must be at least 1");
    ensure!(
        args.rate == 0.0 || (args.rate.is_finite() && args.rate >= MIN_RATE),
        "--rate must be a number of orders per second of at least {MIN_RATE} (one in 1,000 s), \
         or 0 for as fast as possible; not {:?}",
        args.rate
    );
    ensure!(
        args.rate == 0.0 || args.orders as f64 / args.rate <= MAX_SCHEDULE.as_secs_f64(),
        "--orders {} at --rate {} would take more than a year to place",
        args.orders,
        args.rate
    );
    ensure!(
        (1..=86_400).contains(&args.settle_timeout),
        "--settle-timeout takes seconds from 1 to 86400 (a day)"
    );
    Ok(mix)
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
    /// From its first request (with `--rate`: from when it was due) to
    /// its final state.
    latency: Option<Duration>,
    /// Why it never became final, or never was accepted.
    error: Option<String>,
}

impl Outcome {
    fn is_final(&self) -> bool {
        is_final(&self.status)
    }
}

fn is_final(status: &str) -> bool {
    matches!(status, "confirmed" | "rejected" | "cancelled")
}

/// Figures shared by the tasks, set-up included.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    rate_limited: AtomicU64,
    /// Log-ins again after a 401 (an expired token).
    renewed_logins: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// An HTTP/1 connection to the API that reconnects after an error.
#[derive(Debug)]
struct Http {
    /// Every address the host resolves to; the one that last worked first.
    addrs: Vec<SocketAddr>,
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
        // `localhost` may resolve to ::1 first while the ingress listens on
        // 127.0.0.1 only: every address is tried.
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((authority.host(), port))
            .await
            .with_context(|| format!("cannot resolve {}", authority.host()))?
            .collect();
        ensure!(!addrs.is_empty(), "{} has no address", authority.host());
        Ok(Self::with_addrs(addrs, authority.to_string()))
    }

    fn with_addrs(addrs: Vec<SocketAddr>, authority: String) -> Self {
        Self {
            addrs,
            authority,
            sender: None,
        }
    }

    fn fresh(&self) -> Self {
        Self::with_addrs(self.addrs.clone(), self.authority.clone())
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

    /// A connection to the first address that accepts one.
    async fn connect(&mut self) -> anyhow::Result<tokio::net::TcpStream> {
        let mut last = None;
        for (n, addr) in self.addrs.iter().enumerate() {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => {
                    // Try it first next time.
                    self.addrs[..=n].rotate_right(1);
                    return Ok(stream);
                }
                Err(e) => last = Some(format!("{addr}: {e}")),
            }
        }
        bail!(
            "cannot connect to {} ({})",
            self.authority,
            last.unwrap_or_else(|| "no address".to_owned())
        )
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => self.sender.insert(sender),
            _ => {
                let stream = self.connect().await?;
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

/// How long to wait before trying again after `answer` (or a transport
/// error): what `Retry-After` asks, at least 50 ms and up to a minute,
/// else a doubling pause from 50 ms up to 1.6 s.
fn backoff(answer: Option<&Answer>, attempt: u32) -> Duration {
    match answer.and_then(|a| a.retry_after) {
        Some(asked) => asked.clamp(Duration::from_millis(50), MAX_RETRY_AFTER),
        None => Duration::from_millis(50u64 << attempt.min(5)).min(Duration::from_secs(5)),
    }
}

/// Whether a request is worth sending again: rate limited, a server
/// error, or no answer at all.
fn transient(answer: &anyhow::Result<Answer>) -> bool {
    match answer {
        Ok(a) => a.status == 429 || a.status >= 500,
        Err(_) => true,
    }
}

/// A logged-in account. Access tokens expire (15 minutes by default) and
/// a long run outlives them: after a 401 the account logs in again.
#[derive(Debug)]
struct Session {
    email: String,
    password: String,
    token: Mutex<Arc<str>>,
    /// One log-in at a time: the tasks that met the same expired token
    /// wait for it and use the new one.
    renewing: tokio::sync::Mutex<()>,
}

impl Session {
    fn new(email: &str, password: &str, token: Arc<str>) -> Self {
        Self {
            email: email.to_owned(),
            password: password.to_owned(),
            token: Mutex::new(token),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    fn token(&self) -> Arc<str> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A token newer than `stale`: one another task got meanwhile, or a new log-in.
    async fn renew(
        &self,
        http: &mut Http,
        stale: &Arc<str>,
        counters: &Counters,
    ) -> anyhow::Result<Arc<str>> {
        let _one = self.renewing.lock().await;
        let current = self.token();
        if !Arc::ptr_eq(&current, stale) {
            return Ok(current);
        }
        let mut limiting = Limiting::default();
        // Boxed: logging in is a request like the one that needed it.
        let token: Arc<str> = Box::pin(log_in(
            http,
            &self.email,
            &self.password,
            Instant::now() + RENEWAL_TIMEOUT,
            counters,
            &mut limiting,
        ))
        .await
        .with_context(|| format!("logging in again as {} after a 401", self.email))?
        .into();
        Counters::add(&counters.renewed_logins);
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token.clone();
        Ok(token)
    }
}

/// Sends a request as `session`; a 401 (an expired token) logs in again
/// and sends it once more.
#[allow(clippy::too_many_arguments)]
async fn call_as(
    http: &mut Http,
    session: &Session,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<&Value>,
    timeout: Duration,
    counters: &Counters,
) -> anyhow::Result<Answer> {
    let token = session.token();
    let answer = http
        .call(method, path, Some(&token), headers, body, timeout)
        .await?;
    if answer.status != 401 {
        return Ok(answer);
    }
    let token = session.renew(http, &token, counters).await?;
    Counters::add(&counters.requests);
    http.call(method, path, Some(&token), headers, body, timeout)
        .await
}

/// Whether the ingress is refusing this run's requests (429) right now, so
/// that each time it starts is announced once.
#[derive(Debug, Default)]
struct Limiting {
    now: bool,
}

impl Limiting {
    /// Notes an answer; warns on stderr when rate limiting starts.
    fn note(&mut self, answer: &anyhow::Result<Answer>, what: &str, counters: &Counters) {
        match answer {
            Ok(a) if a.status == 429 => {
                Counters::add(&counters.rate_limited);
                if !self.now {
                    eprintln!(
                        "  the ingress rate-limits {what} (429); waiting {} s as it asks \
                         (its --login-rate-limit limits registering and logging in, \
                         --rate-limit everything else)",
                        backoff(Some(a), 0).as_secs_f64().ceil()
                    );
                }
                self.now = true;
            }
            Ok(_) => self.now = false,
            Err(_) => {}
        }
    }
}

/// A set-up request: sent again after 429, 5xx or a lost connection until
/// `deadline`, as `session` when given (a 401 logs in again). Each onset of
/// rate limiting is announced on stderr.
#[allow(clippy::too_many_arguments)]
async fn setup_call(
    http: &mut Http,
    method: &str,
    path: &str,
    session: Option<&Session>,
    headers: &[(&str, String)],
    body: Option<&Value>,
    deadline: Instant,
    counters: &Counters,
    limiting: &mut Limiting,
) -> anyhow::Result<Answer> {
    let timeout = Duration::from_secs(30);
    let what = format!("{method} {path}");
    let mut attempt = 0;
    loop {
        Counters::add(&counters.requests);
        let answer = match session {
            Some(session) => {
                call_as(
                    http, session, method, path, headers, body, timeout, counters,
                )
                .await
            }
            None => http.call(method, path, None, headers, body, timeout).await,
        };
        limiting.note(&answer, &what, counters);
        if !transient(&answer) {
            return answer.with_context(|| what.clone());
        }
        let pause = backoff(answer.as_ref().ok(), attempt);
        if Instant::now() + pause > deadline {
            return match answer {
                Ok(a) if a.status == 429 => bail!(
                    "{what}: still rate limited (429) when set-up ran out of time: raise the \
                     ingress's --login-rate-limit (registering and logging in, per IP; one every \
                     6 s by default) and --rate-limit, or use fewer --customers"
                ),
                Ok(a) => bail!("{what} kept failing: {}", problem(&a)),
                Err(e) => Err(e.context(format!("{what} kept failing"))),
            };
        }
        Counters::add(&counters.retries);
        tokio::time::sleep(pause).await;
        attempt += 1;
    }
}

/// Logs in, returning the access token.
async fn log_in(
    http: &mut Http,
    email: &str,
    password: &str,
    deadline: Instant,
    counters: &Counters,
    limiting: &mut Limiting,
) -> anyhow::Result<String> {
    let answer = setup_call(
        http,
        "POST",
        "/v1/auth/token",
        None,
        &[],
        Some(&json!({"email": email, "password": password})),
        deadline,
        counters,
        limiting,
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

/// One of this run's customers.
#[derive(Debug)]
struct Customer {
    id: Uuid,
    session: Session,
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    let mix = validate(&args)?;
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
        format!(
            "skein load reads payments' ledger over NATS at {}; pass --nats-url",
            skein_bus::redact_url(nats_url)
        )
    })?;
    let ledger_before = ask(&bus, &Ledger {}, Instant::now() + Duration::from_secs(30))
        .await
        .map_err(payments_error)?;

    // --- Set-up --------------------------------------------------------------
    // Registering and logging in are limited per IP (by default one every
    // 6 s after a burst of 10): give each customer's two such requests time.
    let setup_deadline = Instant::now()
        + Duration::from_secs(300_u64.saturating_add((args.customers as u64).saturating_mul(12)));
    let counters = Arc::new(Counters::default());
    let mut limiting = Limiting::default();
    let admin_token = log_in(
        &mut http,
        admin_email,
        admin_password,
        setup_deadline,
        &counters,
        &mut limiting,
    )
    .await
    .context("the admin cannot log in (check --admin-email and --admin-password)")?;
    let admin = Session::new(admin_email, admin_password, admin_token.into());
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
        let sku = format!("load-{tag}-{n}");
        let answer = setup_call(
            &mut http,
            "POST",
            "/v1/products",
            Some(&admin),
            &[("idempotency-key", format!("load-{tag}-product-{n}"))],
            Some(&json!({"sku": sku, "name": format!("Load {tag} {name}"),
                         "price_cents": price_cents, "stock": stock})),
            setup_deadline,
            &counters,
            &mut limiting,
        )
        .await?;
        let id = match answer.status {
            201 => answer.body["id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .context("the product answer has no id")?,
            // An earlier try created it, and the answer was lost with an
            // ingress that no longer remembers the key (restarted, or
            // another copy behind a load balancer).
            409 => {
                find_product(
                    &mut http,
                    &admin,
                    &sku,
                    setup_deadline,
                    &counters,
                    &mut limiting,
                )
                .await?
            }
            _ => bail!("creating a product: {}", problem(&answer)),
        };
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
    let mut customers = Vec::with_capacity(args.customers);
    for n in 0..args.customers {
        let email = format!("load-{tag}-{n}@load.skein.test");
        let answer = setup_call(
            &mut http,
            "POST",
            "/v1/auth/register",
            None,
            &[],
            Some(&json!({"email": email, "password": CUSTOMER_PASSWORD, "name": format!("Load customer {n}")})),
            setup_deadline,
            &counters,
            &mut limiting,
        )
        .await?;
        // 409: a retried registration that had worked.
        ensure!(
            matches!(answer.status, 201 | 409),
            "registering a customer: {}",
            problem(&answer)
        );
        let registered = answer.body["id"].as_str().and_then(|id| id.parse().ok());
        let token = log_in(
            &mut http,
            &email,
            CUSTOMER_PASSWORD,
            setup_deadline,
            &counters,
            &mut limiting,
        )
        .await?;
        let session = Session::new(&email, CUSTOMER_PASSWORD, token.into());
        let id = match registered {
            Some(id) => id,
            None => {
                let me = setup_call(
                    &mut http,
                    "GET",
                    "/v1/me",
                    Some(&session),
                    &[],
                    None,
                    setup_deadline,
                    &counters,
                    &mut limiting,
                )
                .await?;
                ensure!(me.status == 200, "GET /v1/me as {email}: {}", problem(&me));
                me.body["id"]
                    .as_str()
                    .and_then(|id| id.parse().ok())
                    .context("GET /v1/me answered no id")?
            }
        };
        customers.push(Customer { id, session });
    }
    let starting = wait_for_accounts(&bus, &customers).await?;
    if mix.declined > 0.0 {
        if let Some((n, balance)) = starting
            .iter()
            .enumerate()
            .find(|(_, b)| **b >= EXPENSIVE_PRICE_CENTS)
        {
            bail!(
                "customer {n} starts with {balance} cents, not less than the unaffordable \
                 product's price ({EXPENSIVE_PRICE_CENTS} cents): its declined orders would be \
                 paid. Start payments with a smaller --starting-balance-cents, or leave \
                 declined out of --failure-mix"
            );
        }
    }

    // --- Orders --------------------------------------------------------------
    let plans = plan_orders(&catalog, &args, mix, seed);
    // Always, --json or not: whoever runs this learns that set-up is over.
    eprintln!("placing {} orders", plans.len());
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
    let customers = Arc::new(customers);
    let next = Arc::new(AtomicUsize::new(0));
    let settle = Duration::from_secs(args.settle_timeout);
    let wait = args.wait.min(30);
    let started = Instant::now();
    let cpu_before = CpuTicks::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(plans.len()) {
        let (plans, customers, next, counters) = (
            plans.clone(),
            customers.clone(),
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
                // The open-loop schedule (validate keeps it under a year).
                let due = (rate > 0.0).then(|| started + Duration::from_secs_f64(i as f64 / rate));
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
                let key = format!("load-{tag}-{i}");
                let outcome = place(
                    &mut http,
                    plan,
                    &customers[plan.customer].session,
                    &key,
                    wait,
                    settle,
                    due,
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
    let cpu_after = CpuTicks::now();
    progress.finish_and_clear();
    outcomes.sort_by_key(|o| o.plan.index);

    // --- Invariants ----------------------------------------------------------
    let window = settle.max(MIN_CHECK_WINDOW);
    let checks = check(
        &mut http,
        &admin,
        &bus,
        &catalog,
        &customers,
        &starting,
        &outcomes,
        &ledger_before,
        window,
    )
    .await;
    let mut report = Report::new(&args, tag, seed, mix, &outcomes, elapsed, &counters, checks);
    report.machine_cpu = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| after.since(before, elapsed, report.final_orders));
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

/// The id of this run's product `sku`, which exists already.
async fn find_product(
    http: &mut Http,
    admin: &Session,
    sku: &str,
    deadline: Instant,
    counters: &Counters,
    limiting: &mut Limiting,
) -> anyhow::Result<Uuid> {
    let answer = setup_call(
        http,
        "GET",
        "/v1/products",
        Some(admin),
        &[],
        None,
        deadline,
        counters,
        limiting,
    )
    .await?;
    ensure!(
        answer.status == 200,
        "GET /v1/products: {}",
        problem(&answer)
    );
    answer.body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["sku"] == sku)
        .and_then(|p| p["id"].as_str()?.parse().ok())
        .with_context(|| {
            format!(
                "creating product {sku}: 409 (it exists), yet GET /v1/products does not list it"
            )
        })
}

/// Places one order and follows it until it is final or `settle` passes.
#[allow(clippy::too_many_arguments)]
async fn place(
    http: &mut Http,
    plan: &Plan,
    session: &Session,
    key: &str,
    wait: u64,
    settle: Duration,
    due: Option<Instant>,
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
    let first_request = Instant::now();
    // Open loop: the order's latency includes any time it waited for a
    // free task past its due time.
    let since = due.unwrap_or(first_request);
    let deadline = first_request + settle;
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
        Counters::add(&counters.requests);
        let answer = call_as(
            http,
            session,
            "POST",
            "/v1/orders",
            &headers,
            Some(&body),
            timeout,
            counters,
        )
        .await;
        match &answer {
            Ok(a) if (200..=202).contains(&a.status) => break answer.ok(),
            Ok(a) if a.status == 429 => Counters::add(&counters.rate_limited),
            Ok(a) if a.status >= 500 => {}
            Ok(a) => {
                // Refused: the run itself is wrong (or the API changed).
                outcome.error = Some(format!("POST /v1/orders: {}", problem(a)));
                return outcome;
            }
            Err(_) => {}
        }
        let pause = backoff(answer.as_ref().ok(), attempt);
        if Instant::now() + pause > deadline {
            outcome.error = Some(match answer {
                Ok(a) => format!("POST /v1/orders kept failing: {}", problem(&a)),
                Err(e) => format!("POST /v1/orders kept failing: {e:#}"),
            });
            return outcome;
        }
        Counters::add(&counters.retries);
        tokio::time::sleep(pause).await;
        attempt += 1;
    };
    // Follow it: the answer, then GET until final.
    let mut poll = Duration::from_millis(10);
    // The last GET that did not answer 200: what a stuck order reports.
    let mut last_refusal: Option<String> = None;
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
                        outcome.latency = Some(since.elapsed());
                        return outcome;
                    }
                }
            }
        }
        if Instant::now() + poll > deadline {
            outcome.error = Some(format!(
                "not final after {settle:?} (last seen {}{})",
                outcome.status,
                last_refusal
                    .as_deref()
                    .map(|r| format!("; last GET: {r}"))
                    .unwrap_or_default()
            ));
            return outcome;
        }
        tokio::time::sleep(poll).await;
        // At most 100 ms apart: a polled order's latency (a 202, a retried
        // request, --wait 0) is then overstated by at most that.
        poll = (poll * 2).min(Duration::from_millis(100));
        let Some(id) = outcome.order_id else {
            outcome.error = Some("the order was accepted without an id".to_owned());
            return outcome;
        };
        Counters::add(&counters.requests);
        answer = match call_as(
            http,
            session,
            "GET",
            &format!("/v1/orders/{id}"),
            &[],
            None,
            timeout,
            counters,
        )
        .await
        {
            Ok(a) if a.status == 200 => Some(a),
            // 503 `not-yet` (404 for a keyed id): orders has not handled
            // the command yet.
            Ok(a) => {
                if a.status == 429 {
                    Counters::add(&counters.rate_limited);
                    let pause = backoff(Some(&a), 0);
                    tokio::time::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                last_refusal = Some(problem(&a));
                None
            }
            Err(e) => {
                last_refusal = Some(format!("{e:#}"));
                None
            }
        };
    }
}

/// Asks `query` over NATS, again after a transient failure (no
/// responders, a timeout, a lost connection, a 5xx) until `deadline`.
async fn ask<Q: Query>(bus: &Bus, query: &Q, deadline: Instant) -> Result<Q::Reply, RequestError> {
    let pause = Duration::from_millis(250);
    loop {
        let answer = request(bus, query).await;
        match &answer {
            Err(e) if transient_request(e) && Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
            }
            _ => return answer,
        }
    }
}

fn transient_request(e: &RequestError) -> bool {
    match e {
        RequestError::NoResponders(_) | RequestError::Timeout(..) | RequestError::Transport(_) => {
            true
        }
        RequestError::Service(e) => e.status >= 500,
        _ => false,
    }
}

fn payments_error(e: RequestError) -> anyhow::Error {
    let why = match &e {
        RequestError::NoResponders(_) => "no payments worker answers its queries: is one running?",
        // A NATS user that may not ask gets no answer either.
        RequestError::Timeout(..) | RequestError::Transport(_) => {
            "payments did not answer a query in time: is a payments worker running, and may \
             this NATS user ask it (--nats-url, NATS_USER)?"
        }
        RequestError::Service(_) => "payments refused a query",
        _ => "payments' answer could not be read: is it the same version as this skein?",
    };
    anyhow::Error::new(e).context(why)
}

/// Waits until payments has opened every customer's account
/// (registrations reach it as events); returns their starting balances.
async fn wait_for_accounts(bus: &Bus, customers: &[Customer]) -> anyhow::Result<Vec<i64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut balances = Vec::with_capacity(customers.len());
    for (n, customer) in customers.iter().enumerate() {
        let query = GetAccount {
            caller: Caller::operator(),
            customer_id: customer.id,
        };
        loop {
            match ask(bus, &query, deadline).await {
                Ok(account) => {
                    balances.push(account.balance_cents);
                    break;
                }
                Err(RequestError::Service(e)) if e.status == 404 && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(RequestError::Service(e)) if e.status == 404 => bail!(
                    "payments opened {n} of {} accounts in 60 s after the customers registered: \
                     are identity and payments running?",
                    customers.len()
                ),
                Err(e) => return Err(payments_error(e)),
            }
        }
    }
    Ok(balances)
}

/// One invariant and whether it holds.
#[derive(Debug, Clone, Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// The invariants, by name (the report's and the tests' vocabulary).
mod invariant {
    pub(super) const STUCK: &str = "no order lost or stuck";
    pub(super) const CAUSES: &str = "outcomes match their cause";
    pub(super) const LISTED: &str = "orders listed as placed";
    pub(super) const STOCK: &str = "stock conserved";
    pub(super) const MONEY: &str = "money conserved";
    pub(super) const CUSTOMER_MONEY: &str = "money conserved per customer";
}

impl Check {
    /// A check that could not be made: what it needed could not be read.
    fn unreadable(name: &'static str, error: &str) -> Self {
        Check {
            name,
            ok: false,
            detail: format!("cannot tell: {error}"),
        }
    }
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

/// Catalog's reason for a line it could not reserve.
const INSUFFICIENT_STOCK: &str = "insufficient_stock";

/// What a rejected order's reason says caused the rejection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cause {
    /// Payments declined: its reason (`insufficient_funds`,
    /// `provider_declined`, `unknown_account`, ...).
    Payment(String),
    /// Catalog could not reserve these lines: product and reason
    /// (`insufficient_stock`, `unknown_product`).
    Stock(Vec<(Uuid, String)>),
    /// Anything else, e.g. a step that got no answer before its deadline.
    Other,
}

/// Reads the cause from a rejection reason as the orchestrator words it:
/// `authorize_payment: payment declined: insufficient_funds`, or
/// `reserve_stock: stock rejected: <product> insufficient_stock (requested
/// 1, available 0), <product> ...`.
fn cause(reason: &str) -> Cause {
    if let Some((_, rest)) = reason.split_once("payment declined: ") {
        let code = rest
            .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '('))
            .next()
            .unwrap_or_default();
        return Cause::Payment(code.to_owned());
    }
    if let Some((_, rest)) = reason.split_once("stock rejected: ") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let lines = words
            .windows(2)
            .filter_map(|w| Some((Uuid::try_parse(w[0]).ok()?, w[1].to_owned())))
            .collect();
        return Cause::Stock(lines);
    }
    Cause::Other
}

/// Why `o`, a final order, did not end as its kind allows, if it did not:
/// a normal order is confirmed or declined by payments for lack of funds
/// or by the provider; an out-of-stock order is rejected for exactly its
/// scarce line; a declined order is declined by payments (payments asks
/// the provider before it looks at the balance, so a provider decline is
/// right too). Nothing is cancelled (the run cancels nothing), and every
/// final order has a total, the sum of its lines.
fn misfit(o: &Outcome, scarce: Uuid) -> Option<String> {
    use skein_payments::commands::reason::{INSUFFICIENT_FUNDS, PROVIDER_DECLINED};
    let Some(total) = o.total_cents else {
        return Some(format!("ended {} without a total_cents", o.status));
    };
    if total != o.plan.total_cents {
        return Some(format!(
            "costs {total} cents, its lines {}",
            o.plan.total_cents
        ));
    }
    let declined = |cause: Cause| matches!(cause, Cause::Payment(code) if code == INSUFFICIENT_FUNDS || code == PROVIDER_DECLINED);
    let reason = o.reason.as_deref().unwrap_or_default();
    let right = match (o.plan.kind, o.status.as_str()) {
        (Kind::Normal, "confirmed") => true,
        (Kind::Normal | Kind::Declined, "rejected") => declined(cause(reason)),
        (Kind::OutOfStock, "rejected") => {
            cause(reason) == Cause::Stock(vec![(scarce, INSUFFICIENT_STOCK.to_owned())])
        }
        _ => false,
    };
    (!right).then(|| match &o.reason {
        Some(reason) => format!("ended {}: {reason}", o.status),
        None => format!("ended {} with no reason", o.status),
    })
}

/// The invariants that need nothing but the outcomes.
fn check_outcomes(outcomes: &[Outcome], catalog: &Catalog) -> [Check; 2] {
    let stuck: Vec<&Outcome> = outcomes.iter().filter(|o| !o.is_final()).collect();
    let lost = Check {
        name: invariant::STUCK,
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
    let wrong: Vec<String> = outcomes
        .iter()
        .filter(|o| o.is_final())
        .filter_map(|o| {
            let why = misfit(o, catalog.scarce.id)?;
            Some(format!(
                "order #{} ({}) {why}",
                o.plan.index,
                o.plan.kind.as_str()
            ))
        })
        .collect();
    let meant_to_fail = outcomes
        .iter()
        .filter(|o| o.is_final() && o.plan.kind != Kind::Normal)
        .count();
    let causes = Check {
        name: invariant::CAUSES,
        ok: wrong.is_empty(),
        detail: match wrong.first() {
            None => format!(
                "{meant_to_fail} orders meant to fail were rejected for their cause, the others \
                 confirmed or declined by payments; every total matches its lines"
            ),
            Some(first) => format!("{} wrong, e.g. {first}", wrong.len()),
        },
    };
    [lost, causes]
}

/// An order as a customer's `GET /v1/orders` lists it.
#[derive(Debug, Clone, PartialEq)]
struct Listed {
    id: Uuid,
    status: String,
    total_cents: Option<i64>,
}

/// Each customer lists exactly the orders the run placed for them (none
/// missing, none extra, none twice), each final one in the state the run saw.
fn check_listings(outcomes: &[Outcome], listed: &[Vec<Listed>]) -> Check {
    let mut wrong = Vec::new();
    let mut placed_count = 0;
    for (customer, list) in listed.iter().enumerate() {
        let placed: BTreeMap<Uuid, &Outcome> = outcomes
            .iter()
            .filter(|o| o.plan.customer == customer)
            .filter_map(|o| Some((o.order_id?, o)))
            .collect();
        placed_count += placed.len();
        let mut seen: BTreeMap<Uuid, usize> = BTreeMap::new();
        for order in list {
            *seen.entry(order.id).or_default() += 1;
            match placed.get(&order.id) {
                None => wrong.push(format!(
                    "customer {customer} lists order {} ({}), which the run did not place",
                    order.id, order.status
                )),
                Some(o) if o.is_final() && o.status != order.status => wrong.push(format!(
                    "order #{} {} is listed {}, yet became {}",
                    o.plan.index, order.id, order.status, o.status
                )),
                Some(o) if order.total_cents.is_none() => wrong.push(format!(
                    "order #{} {} is listed without a total_cents",
                    o.plan.index, order.id
                )),
                Some(_) => {}
            }
        }
        for (id, times) in seen.iter().filter(|(_, n)| **n > 1) {
            wrong.push(format!(
                "customer {customer} lists order {id} {times} times"
            ));
        }
        for (id, o) in placed.iter().filter(|(id, _)| !seen.contains_key(id)) {
            wrong.push(format!(
                "order #{} {id} of customer {customer} is not listed",
                o.plan.index
            ));
        }
    }
    Check {
        name: invariant::LISTED,
        ok: wrong.is_empty(),
        detail: match wrong.first() {
            None => format!(
                "{} customers list exactly the {placed_count} orders placed for them",
                listed.len()
            ),
            Some(first) => format!("{} wrong, e.g. {first}", wrong.len()),
        },
    }
}

/// Each customer's starting balance less their balance now (payments) is
/// what their confirmed orders cost (orders' list).
fn check_customer_money(starting: &[i64], now: &[i64], listed: &[Vec<Listed>]) -> Check {
    let wrong: Vec<String> = starting
        .iter()
        .zip(now)
        .zip(listed)
        .enumerate()
        .filter_map(|(customer, ((start, now), list))| {
            let confirmed: i64 = list
                .iter()
                .filter(|o| o.status == "confirmed")
                .map(|o| o.total_cents.unwrap_or_default())
                .sum();
            (start - now != confirmed).then(|| {
                format!(
                    "customer {customer} started with {start} cents and has {now}: {} taken, \
                     its confirmed orders cost {confirmed}",
                    start - now
                )
            })
        })
        .collect();
    Check {
        name: invariant::CUSTOMER_MONEY,
        ok: wrong.is_empty() && starting.len() == now.len() && now.len() == listed.len(),
        detail: match wrong.first() {
            None => format!(
                "{} customers: starting balance - balance = their confirmed orders' totals",
                now.len()
            ),
            Some(first) => format!("{} customers wrong, e.g. {first}", wrong.len()),
        },
    }
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
        name: invariant::STOCK,
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
        name: invariant::MONEY,
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

/// `GET path` as `session` until a 200 (429, 5xx and lost connections are
/// tried again until `deadline`): the body.
async fn get_json(
    http: &mut Http,
    session: &Session,
    path: &str,
    deadline: Instant,
) -> anyhow::Result<Value> {
    // The check phase's requests are not the run's: not counted.
    let uncounted = Counters::default();
    let mut attempt = 0;
    loop {
        let answer = call_as(
            http,
            session,
            "GET",
            path,
            &[],
            None,
            Duration::from_secs(10),
            &uncounted,
        )
        .await;
        if let Ok(a) = &answer {
            if a.status == 200 {
                return answer.map(|a| a.body);
            }
        }
        let pause = backoff(answer.as_ref().ok(), attempt);
        if !transient(&answer) || Instant::now() + pause > deadline {
            return match answer {
                Ok(a) => Err(anyhow::anyhow!("GET {path}: {}", problem(&a))),
                Err(e) => Err(e.context(format!("GET {path}"))),
            };
        }
        tokio::time::sleep(pause).await;
        attempt += 1;
    }
}

/// Every product's available stock (the catalog lists them all).
async fn read_stock(
    http: &mut Http,
    admin: &Session,
    deadline: Instant,
) -> anyhow::Result<BTreeMap<Uuid, i64>> {
    let body = get_json(http, admin, "/v1/products", deadline).await?;
    Ok(body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_str()?.parse().ok()?, p["available"].as_i64()?)))
        .collect())
}

/// Every order `customer` lists, page by page.
async fn read_orders(
    http: &mut Http,
    customer: &Customer,
    deadline: Instant,
) -> anyhow::Result<Vec<Listed>> {
    let mut orders = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/orders?limit=100".to_owned(),
            Some(c) => format!("/v1/orders?limit=100&cursor={}", query_escape(c)),
        };
        let page = get_json(http, &customer.session, &path, deadline).await?;
        for item in page["items"].as_array().into_iter().flatten() {
            orders.push(Listed {
                id: item["id"]
                    .as_str()
                    .and_then(|id| id.parse().ok())
                    .with_context(|| format!("GET {path}: an order without an id: {item}"))?,
                status: item["status"].as_str().unwrap_or_default().to_owned(),
                total_cents: item["total_cents"].as_i64(),
            });
        }
        match page["next_cursor"].as_str() {
            Some(next) if cursor.as_deref() != Some(next) => cursor = Some(next.to_owned()),
            _ => return Ok(orders),
        }
    }
}

/// `text` percent-encoded for a query string value.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What the services report after the run.
struct Observed {
    available: Result<BTreeMap<Uuid, i64>, String>,
    ledger: Result<LedgerTotals, String>,
    /// Per customer: the orders they list.
    listed: Result<Vec<Vec<Listed>>, String>,
    /// Per customer: their balance now.
    balances: Result<Vec<i64>, String>,
}

async fn observe(
    http: &mut Http,
    admin: &Session,
    bus: &Bus,
    customers: &[Customer],
    deadline: Instant,
) -> Observed {
    let available = read_stock(http, admin, deadline)
        .await
        .map_err(|e| format!("{e:#}"));
    let ledger = ask(bus, &Ledger {}, deadline)
        .await
        .map_err(|e| format!("payments' ledger: {e}"));
    let mut listed = Ok(Vec::with_capacity(customers.len()));
    let mut balances = Ok(Vec::with_capacity(customers.len()));
    for customer in customers {
        if let Ok(all) = &mut listed {
            match read_orders(http, customer, deadline).await {
                Ok(orders) => all.push(orders),
                Err(e) => listed = Err(format!("{e:#}")),
            }
        }
        if let Ok(all) = &mut balances {
            let query = GetAccount {
                caller: Caller::operator(),
                customer_id: customer.id,
            };
            match ask(bus, &query, deadline).await {
                Ok(account) => all.push(account.balance_cents),
                Err(e) => balances = Err(format!("the account of {}: {e}", customer.id)),
            }
        }
    }
    Observed {
        available,
        ledger,
        listed,
        balances,
    }
}

/// Runs every invariant check. What the services report is read again
/// while a check fails, for `window`: compensations may still be in
/// flight when an order is already final; and once more when they agree,
/// after the workers have gone quiet ([`until_quiet`]). A read that keeps
/// failing fails its checks.
#[allow(clippy::too_many_arguments)]
async fn check(
    http: &mut Http,
    admin: &Session,
    bus: &Bus,
    catalog: &Catalog,
    customers: &[Customer],
    starting: &[i64],
    outcomes: &[Outcome],
    ledger_before: &LedgerTotals,
    window: Duration,
) -> Vec<Check> {
    let mut checks = check_outcomes(outcomes, catalog).to_vec();
    let expected = expected(catalog, outcomes);
    let deadline = Instant::now() + window;
    let mut quiet = false;
    loop {
        let seen = observe(http, admin, bus, customers, deadline).await;
        let listed = match &seen.listed {
            Ok(listed) => check_listings(outcomes, listed),
            Err(e) => Check::unreadable(invariant::LISTED, e),
        };
        let stock = match &seen.available {
            Ok(available) => check_stock(&expected, available),
            Err(e) => Check::unreadable(invariant::STOCK, e),
        };
        let money = match &seen.ledger {
            Ok(after) => check_money(&expected, ledger_before, after),
            Err(e) => Check::unreadable(invariant::MONEY, e),
        };
        let customer_money = match (&seen.balances, &seen.listed) {
            (Ok(now), Ok(listed)) => check_customer_money(starting, now, listed),
            (Err(e), _) | (_, Err(e)) => Check::unreadable(invariant::CUSTOMER_MONEY, e),
        };
        let later = [listed, stock, money, customer_money];
        let agree = later.iter().all(|c| c.ok);
        if agree && !quiet {
            // Agreeing now is not yet final: read again once nothing is in
            // flight.
            quiet = true;
            if let Err(e) = until_quiet(bus, QUIET_WITHIN).await {
                eprintln!("the workers did not go quiet ({e:#}); reading once more anyway");
            }
            continue;
        }
        if agree || Instant::now() >= deadline {
            checks.extend(later);
            return checks;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long the checks wait for the workers to go quiet before their last
/// read: more than a consumer's `ack_wait` (10 s), after which the server
/// delivers again what a killed copy held.
const QUIET_WITHIN: Duration = Duration::from_secs(25);

/// Waits until no consumer of `EVENTS` or `COMMANDS` has a message
/// delivered and not acknowledged, or (one a copy pulls from) a message
/// not delivered yet; an error when that does not happen `within`, or the
/// consumers cannot be read.
async fn until_quiet(bus: &Bus, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    // Quiet twice, half a second apart: a copy between two pull requests
    // shows no puller for a moment.
    let mut quiet_once = false;
    loop {
        let mut busy = Vec::new();
        for name in [skein_bus::provision::EVENTS, skein_bus::provision::COMMANDS] {
            for c in super::audit::consumers(bus, name).await? {
                // Messages not delivered count only where a copy pulls: a
                // worker that is not running changes nothing meanwhile.
                if c.ack_pending > 0 || (c.waiting_pulls > 0 && c.pending > 0) {
                    busy.push(format!(
                        "{name}/{}: {} unacknowledged, {} not delivered",
                        c.consumer, c.ack_pending, c.pending
                    ));
                }
            }
        }
        if busy.is_empty() && quiet_once {
            return Ok(());
        }
        quiet_once = busy.is_empty();
        if Instant::now() >= deadline {
            bail!("after {within:?}: {}", busy.join("; "));
        }
        let pause = if quiet_once { 500 } else { 200 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
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
    /// First request (with a rate: the time it was due) to final state,
    /// of the final orders.
    latency_ms: Latency,
    /// Final orders by status, and rejections by kind.
    by_status: BTreeMap<String, usize>,
    by_kind: BTreeMap<String, BTreeMap<String, usize>>,
    /// Rejections by reason, and the errors of orders that never became final.
    reasons: BTreeMap<String, usize>,
    /// Requests of set-up and orders, those sent again, and 429 answers.
    requests: u64,
    retries: u64,
    rate_limited: u64,
    /// Log-ins again after a 401 (an access token expired).
    renewed_logins: u64,
    /// The whole machine's CPU while the orders were placed (Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    machine_cpu: Option<MachineCpu>,
    invariants: Vec<Check>,
    ok: bool,
}

/// How busy the machine was while the orders were placed, from
/// `/proc/stat`: every process on it counts (the services, nats-server, a
/// local PostgreSQL, this load generator). Tells a run bound by CPU from
/// one that waits (on locks, disks, timeouts).
#[derive(Debug, Clone, Copy, Serialize)]
struct MachineCpu {
    /// Busy share of all CPUs, in percent.
    busy_percent: f64,
    /// CPUs the machine has.
    cpus: usize,
    /// CPU time spent per final order, in milliseconds.
    cpu_ms_per_order: f64,
}

/// CPU time of the whole machine so far, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    busy: u64,
    total: u64,
    cpus: usize,
}

impl CpuTicks {
    /// `None` where `/proc/stat` cannot be read (not Linux).
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count();
        let fields: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))?
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
        Some(Self {
            busy,
            total: busy + field(3) + field(4),
            cpus,
        })
    }

    /// How busy the machine was from `before` to `self`, `elapsed` apart,
    /// with `orders` final orders in that time.
    fn since(self, before: Self, elapsed: Duration, orders: usize) -> MachineCpu {
        let busy = self.busy.saturating_sub(before.busy) as f64;
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        let share = busy / total;
        let cpu_seconds = share * self.cpus as f64 * elapsed.as_secs_f64();
        MachineCpu {
            busy_percent: share * 100.0,
            cpus: self.cpus,
            cpu_ms_per_order: cpu_seconds * 1000.0 / orders.max(1) as f64,
        }
    }
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
            renewed_logins: counters.renewed_logins.load(Ordering::Relaxed),
            machine_cpu: None,
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
            "  {} to final state: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            if self.rate.is_some() {
                "due time"
            } else {
                "request"
            },
            l.p50,
            l.p90,
            l.p99,
            l.max
        );
        let _ = writeln!(
            out,
            "  {} requests, {} retried, {} rate-limited{}{}",
            self.requests,
            self.retries,
            self.rate_limited,
            if self.renewed_logins > 0 {
                format!(", {} logged in again", self.renewed_logins)
            } else {
                String::new()
            },
            if self.rate_limited > 0 {
                " (raise the ingress's --rate-limit and --login-rate-limit, or use more --customers)"
            } else {
                ""
            }
        );
        if let Some(cpu) = &self.machine_cpu {
            let _ = writeln!(
                out,
                "  machine while placing: {:.0} % of {} CPUs busy, {:.1} ms of CPU per final order (every process on it)",
                cpu.busy_percent, cpu.cpus, cpu.cpu_ms_per_order
            );
        }
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
    use clap::Parser;

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

    fn rejected(plan: Plan, reason: &str) -> Outcome {
        Outcome {
            reason: Some(reason.to_owned()),
            ..outcome(plan, "rejected")
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

    /// The reasons as the orchestrator words them.
    fn stock_reason(product: &Product) -> String {
        format!(
            "reserve_stock: stock rejected: {} insufficient_stock (requested 1, available 0)",
            product.id
        )
    }
    const FUNDS: &str = "authorize_payment: payment declined: insufficient_funds";
    const PROVIDER: &str = "authorize_payment: payment declined: provider_declined";

    /// How each customer lists the outcomes' orders, as the run saw them.
    fn listings(outcomes: &[Outcome], customers: usize) -> Vec<Vec<Listed>> {
        (0..customers)
            .map(|c| {
                outcomes
                    .iter()
                    .filter(|o| o.plan.customer == c)
                    .filter_map(|o| {
                        Some(Listed {
                            id: o.order_id?,
                            status: o.status.clone(),
                            total_cents: o.total_cents,
                        })
                    })
                    .collect()
            })
            .collect()
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        load: Args,
    }

    fn args(flags: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("load").chain(flags.iter().copied()))
            .expect("flags parse")
            .load
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
    fn rates_too_small_for_a_schedule_are_refused_not_a_panic() {
        for rate in ["1e-30", "0.0009", "-1", "NaN", "inf"] {
            let e = validate(&args(&[&format!("--rate={rate}")]))
                .expect_err(rate)
                .to_string();
            assert!(e.starts_with("--rate must be"), "{rate}: {e}");
        }
        // A schedule longer than a year, at a valid rate.
        let e = validate(&args(&["--rate", "0.001", "--orders", "40000"]))
            .expect_err("a year")
            .to_string();
        assert!(e.contains("more than a year"), "{e}");
        for fine in ["0", "0.001", "2.5", "1e9"] {
            validate(&args(&["--rate", fine])).expect(fine);
        }
    }

    #[test]
    fn a_settle_timeout_past_a_day_is_refused_not_an_overflow() {
        for bad in ["0", "86401", "18446744073709551615"] {
            let e = validate(&args(&["--settle-timeout", bad]))
                .expect_err(bad)
                .to_string();
            assert!(e.starts_with("--settle-timeout takes"), "{bad}: {e}");
        }
        validate(&args(&["--settle-timeout", "86400"])).expect("a day");
    }

    #[test]
    fn retry_after_is_obeyed_up_to_a_minute() {
        let asked = |secs| Answer {
            status: 429,
            retry_after: Some(Duration::from_secs(secs)),
            body: Value::Null,
        };
        assert_eq!(backoff(Some(&asked(6)), 0), Duration::from_secs(6));
        assert_eq!(backoff(Some(&asked(3600)), 0), MAX_RETRY_AFTER);
        assert_eq!(backoff(Some(&asked(0)), 0), Duration::from_millis(50));
        assert_eq!(backoff(None, 0), Duration::from_millis(50));
        // Without Retry-After: doubling from 50 ms, the sixth pause on.
        assert_eq!(backoff(None, 30), Duration::from_millis(1600));
    }

    #[test]
    fn rejection_reasons_are_read_as_the_orchestrator_words_them() {
        let a = product(1, 1);
        let b = product(1, 1);
        assert_eq!(cause(FUNDS), Cause::Payment("insufficient_funds".into()));
        assert_eq!(cause(PROVIDER), Cause::Payment("provider_declined".into()));
        assert_eq!(
            cause(&format!(
                "reserve_stock: stock rejected: {} insufficient_stock (requested 2, available 1), \
                 {} unknown_product (requested 1, available 0)",
                a.id, b.id
            )),
            Cause::Stock(vec![
                (a.id, "insufficient_stock".into()),
                (b.id, "unknown_product".into())
            ])
        );
        assert_eq!(
            cause("reserve_stock got no answer before its deadline"),
            Cause::Other
        );
    }

    #[test]
    fn each_kind_of_order_may_end_only_for_its_own_reasons() {
        let c = catalog();
        let a = &c.ordinary[0];
        let normal = || plan(0, Kind::Normal, &[(a, 1)]);
        let scarce = || plan(1, Kind::OutOfStock, &[(a, 1), (&c.scarce, 1)]);
        let dear = || plan(2, Kind::Declined, &[(a, 1), (&c.expensive, 1)]);
        let right = [
            outcome(normal(), "confirmed"),
            rejected(normal(), FUNDS),
            rejected(normal(), PROVIDER),
            rejected(scarce(), &stock_reason(&c.scarce)),
            rejected(dear(), FUNDS),
            // Payments asks the provider before it looks at the balance.
            rejected(dear(), PROVIDER),
        ];
        for o in &right {
            assert_eq!(misfit(o, c.scarce.id), None, "{o:?}");
        }
        let deadline = "reserve_stock: reserve_stock got no answer before its deadline";
        let wrong = [
            rejected(normal(), deadline),
            rejected(normal(), &stock_reason(a)),
            rejected(
                normal(),
                "authorize_payment: payment declined: unknown_account",
            ),
            outcome(normal(), "cancelled"),
            outcome(normal(), "rejected"),
            outcome(scarce(), "confirmed"),
            rejected(scarce(), FUNDS),
            // The wrong line, or more than the scarce one, was short.
            rejected(scarce(), &stock_reason(a)),
            rejected(
                scarce(),
                &format!(
                    "{}, {} insufficient_stock (requested 1, available 0)",
                    stock_reason(&c.scarce),
                    a.id
                ),
            ),
            rejected(scarce(), deadline),
            outcome(dear(), "confirmed"),
            rejected(dear(), &stock_reason(&c.scarce)),
            rejected(dear(), deadline),
            Outcome {
                total_cents: None,
                ..outcome(normal(), "confirmed")
            },
            Outcome {
                total_cents: Some(1),
                ..outcome(dear(), "rejected")
            },
        ];
        for o in &wrong {
            assert!(misfit(o, c.scarce.id).is_some(), "{o:?} passed");
        }
        let [_, causes] = check_outcomes(&wrong, &c);
        assert!(
            !causes.ok && causes.detail.starts_with(&format!("{} wrong", wrong.len())),
            "{causes:?}"
        );
        let missing_total = misfit(&wrong[13], c.scarce.id).unwrap_or_default();
        assert!(
            missing_total.contains("without a total_cents"),
            "{missing_total}"
        );
    }

    #[test]
    fn a_healthy_run_passes_every_check() {
        let c = catalog();
        let a = &c.ordinary[0];
        let mut outcomes = vec![
            outcome(plan(0, Kind::Normal, &[(a, 3)]), "confirmed"),
            rejected(
                plan(1, Kind::OutOfStock, &[(a, 2), (&c.scarce, 1)]),
                &stock_reason(&c.scarce),
            ),
            rejected(plan(2, Kind::Declined, &[(&c.expensive, 1)]), FUNDS),
        ];
        outcomes[1].plan.customer = 1;
        assert!(check_outcomes(&outcomes, &c).iter().all(|c| c.ok));
        let listed = listings(&outcomes, 2);
        let listed_check = check_listings(&outcomes, &listed);
        assert!(listed_check.ok, "{listed_check:?}");
        assert!(
            listed_check
                .detail
                .starts_with("2 customers list exactly the 3 orders"),
            "{listed_check:?}"
        );
        assert!(check_customer_money(&[1000, 1000], &[985, 1000], &listed).ok);
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
        let [lost, causes] = check_outcomes(&outcomes, &c);
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
    fn a_customer_listing_a_missing_extra_or_doubled_order_fails() {
        let c = catalog();
        let a = &c.ordinary[0];
        let outcomes = vec![
            outcome(plan(0, Kind::Normal, &[(a, 1)]), "confirmed"),
            outcome(plan(1, Kind::Normal, &[(a, 2)]), "confirmed"),
        ];
        let listed = listings(&outcomes, 1);
        assert!(check_listings(&outcomes, &listed).ok);
        let fails = |listed: Vec<Vec<Listed>>, what: &str| {
            let check = check_listings(&outcomes, &listed);
            assert!(
                !check.ok && check.detail.contains(what),
                "{what}: {check:?}"
            );
        };
        // Lost: the second order is not listed.
        fails(vec![listed[0][..1].to_vec()], "is not listed");
        // Extra: an order nobody placed (a retry that placed twice).
        let mut extra = listed.clone();
        extra[0].push(Listed {
            id: Uuid::now_v7(),
            status: "confirmed".into(),
            total_cents: Some(5),
        });
        fails(extra, "which the run did not place");
        // Twice.
        let mut twice = listed.clone();
        twice[0].push(listed[0][0].clone());
        fails(twice, "2 times");
        // In another state than the run saw become final.
        let mut changed = listed.clone();
        changed[0][1].status = "rejected".into();
        fails(changed, "is listed rejected, yet became confirmed");
        let mut no_total = listed.clone();
        no_total[0][0].total_cents = None;
        fails(no_total, "without a total_cents");
        // Another customer's order.
        let mut moved = listings(&outcomes, 2);
        let order = moved[0].remove(0);
        moved[1].push(order);
        let check = check_listings(&outcomes, &moved);
        assert!(
            !check.ok && check.detail.starts_with("2 wrong"),
            "{check:?}"
        );
    }

    #[test]
    fn a_customer_charged_other_than_their_confirmed_orders_fails() {
        let c = catalog();
        let a = &c.ordinary[0];
        let mut outcomes = vec![
            outcome(plan(0, Kind::Normal, &[(a, 3)]), "confirmed"),
            rejected(plan(1, Kind::Declined, &[(&c.expensive, 1)]), FUNDS),
            outcome(plan(2, Kind::Normal, &[(&c.ordinary[1], 1)]), "confirmed"),
        ];
        outcomes[2].plan.customer = 1;
        let listed = listings(&outcomes, 2);
        assert!(check_customer_money(&[100, 100], &[85, 93], &listed).ok);
        // Charged for the declined order too, while the ledger's totals
        // could still balance against another customer's refund.
        let check = check_customer_money(&[100, 100], &[84, 94], &listed);
        assert!(
            !check.ok && check.detail.starts_with("2 customers wrong"),
            "{check:?}"
        );
        assert!(
            check.detail.contains("customer 0 started with 100 cents and has 84: 16 taken, its confirmed orders cost 15"),
            "{check:?}"
        );
        // A balance missing is a failure, not a pass over fewer customers.
        assert!(!check_customer_money(&[100, 100], &[85], &listed).ok);
    }

    #[test]
    fn a_cursor_is_escaped_for_the_query_string() {
        assert_eq!(query_escape("AbZ09-_.~"), "AbZ09-_.~");
        assert_eq!(query_escape("a+b/c=="), "a%2Bb%2Fc%3D%3D");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&sorted, 0.5), 50.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&sorted[..1], 0.99), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn machine_cpu_is_the_busy_share_of_every_cpu_over_the_run() {
        let before = CpuTicks {
            busy: 100,
            total: 1000,
            cpus: 2,
        };
        let after = CpuTicks {
            busy: 700,
            total: 2000,
            cpus: 2,
        };
        // 600 of 1000 ticks busy: 60 %; of 2 CPUs over 5 s, 6 CPU-seconds
        // for 300 orders.
        let cpu = after.since(before, Duration::from_secs(5), 300);
        assert!((cpu.busy_percent - 60.0).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.cpu_ms_per_order - 20.0).abs() < 1e-9, "{cpu:?}");
        // Read off this machine: at least one CPU, busy never above total.
        if cfg!(target_os = "linux") {
            let now = CpuTicks::now().expect("/proc/stat is readable on Linux");
            assert!(now.cpus >= 1 && now.busy <= now.total, "{now:?}");
        }
    }

    /// A scripted HTTP/1 server on 127.0.0.1: `answer(method, path,
    /// authorization)` answers each request; connections are kept alive.
    async fn serve<F>(answer: F) -> SocketAddr
    where
        F: Fn(&str, &str, Option<&str>) -> (u16, Value) + Send + Sync + 'static,
    {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    loop {
                        let mut head = Vec::new();
                        loop {
                            let mut line = String::new();
                            match stream.read_line(&mut line).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) if line == "\r\n" => break,
                                Ok(_) => head.push(line.trim_end().to_owned()),
                            }
                        }
                        let mut first = head[0].split_whitespace();
                        let (method, path) = (
                            first.next().unwrap_or_default().to_owned(),
                            first.next().unwrap_or_default().to_owned(),
                        );
                        let header = |name: &str| {
                            head.iter().find_map(|h| {
                                let (n, v) = h.split_once(':')?;
                                n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                            })
                        };
                        let length: usize = header("content-length")
                            .and_then(|l| l.parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0; length];
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let (status, body) =
                            answer(&method, &path, header("authorization").as_deref());
                        let body = body.to_string();
                        let response = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream
                            .get_mut()
                            .write_all(response.as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// An address on which nothing listens.
    fn refusing() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    }

    #[tokio::test]
    async fn every_resolved_address_is_tried_and_the_one_that_answers_kept_first() {
        let live = serve(|_, _, _| (200, json!({"ok": true}))).await;
        let dead = refusing();
        let mut http = Http::with_addrs(vec![dead, live], "localhost".into());
        let answer = http
            .call(
                "GET",
                "/health/live",
                None,
                &[],
                None,
                Duration::from_secs(5),
            )
            .await
            .expect("the second address answers");
        assert_eq!(answer.status, 200);
        assert_eq!(http.addrs, vec![live, dead]);
        let mut none = Http::with_addrs(vec![dead], "localhost".into());
        let e = none
            .call("GET", "/", None, &[], None, Duration::from_secs(5))
            .await
            .expect_err("nothing listens");
        assert!(
            format!("{e:#}").contains("cannot connect to localhost"),
            "{e:#}"
        );
    }

    /// Quiet: nothing held unacknowledged, nothing undelivered where a copy
    /// pulls; a consumer nobody pulls from does not count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_are_quiet_once_nothing_is_held_or_waiting_for_a_puller() -> anyhow::Result<()>
    {
        use async_nats::jetstream::consumer::pull;
        use futures::StreamExt;
        let server = skein_testkit::NatsServer::start().await?;
        let bus = Bus::connect(&skein_bus::BusConfig::new(server.url(), "load-test")).await?;
        skein_bus::provision::apply_builtin_streams(bus.jetstream(), &Default::default()).await?;
        let events = bus.jetstream().get_stream("EVENTS").await?;
        let consumer = |name: &str| pull::Config {
            durable_name: Some(name.into()),
            ..Default::default()
        };
        let held = events.create_consumer(consumer("held")).await?;
        events.create_consumer(consumer("idle")).await?;
        bus.jetstream()
            .publish("events.test.e1.happened", "{}".into())
            .await?
            .await?;
        // "idle" has the message undelivered and nobody pulling: quiet.
        until_quiet(&bus, Duration::from_secs(1)).await?;

        let mut batch = held.fetch().max_messages(1).messages().await?;
        let message = batch
            .next()
            .await
            .context("no message")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let busy = until_quiet(&bus, Duration::from_millis(500))
            .await
            .expect_err("a message is held unacknowledged");
        assert!(
            format!("{busy:#}").contains("EVENTS/held: 1 unacknowledged"),
            "{busy:#}"
        );
        message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        until_quiet(&bus, Duration::from_secs(5)).await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_token_is_renewed_once_and_the_request_sent_again() {
        let logins = Arc::new(AtomicUsize::new(0));
        let counted = logins.clone();
        let addr = serve(move |method, path, auth| match (method, path) {
            ("POST", "/v1/auth/token") => {
                counted.fetch_add(1, Ordering::SeqCst);
                (200, json!({"access_token": "fresh"}))
            }
            (_, "/v1/orders/1") if auth == Some("Bearer fresh") => (200, json!({"id": 1})),
            _ => (401, json!({"title": "token expired"})),
        })
        .await;
        let session = Arc::new(Session::new("ada@example.org", "pw", "expired".into()));
        let counters = Arc::new(Counters::default());
        // Four tasks meet the expired token at once: one log-in for all.
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (session, counters) = (session.clone(), counters.clone());
                let mut http = Http::with_addrs(vec![addr], "localhost".into());
                tokio::spawn(async move {
                    call_as(
                        &mut http,
                        &session,
                        "GET",
                        "/v1/orders/1",
                        &[],
                        None,
                        Duration::from_secs(5),
                        &counters,
                    )
                    .await
                    .map(|a| a.status)
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("task").expect("answer"), 200);
        }
        assert_eq!(logins.load(Ordering::SeqCst), 1);
        assert_eq!(counters.renewed_logins.load(Ordering::Relaxed), 1);
        assert_eq!(&*session.token(), "fresh");
        // A 401 that a new token does not cure is the answer, not a loop.
        let mut http = Http::with_addrs(vec![addr], "localhost".into());
        let answer = call_as(
            &mut http,
            &session,
            "GET",
            "/v1/orders/2",
            &[],
            None,
            Duration::from_secs(5),
            &counters,
        )
        .await
        .expect("an answer");
        assert_eq!(answer.status, 401);
        assert_eq!(logins.load(Ordering::SeqCst), 2);
    }
}
