//! The ingress end to end: a real nats-server, the real identity, catalog,
//! orders and projector workers (SQLite), and HTTP over a real socket.
//!
//! Each test starts its own platform and ingress on `127.0.0.1:0`. The saga
//! coordinator is not started: a test makes an order final by sending the
//! `confirm_order` / `reject_order` / `mark_cancelled` commands the saga
//! would send.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use skein_auth::{Claims, SigningKey};
use skein_contracts::orders::{ConfirmOrder, MarkCancelled, OrderPlaced, RejectOrder};
use skein_contracts::Role;
use skein_identity::{AdminSeed, IdentityConfig};
use skein_ingress::{BreakerConfig, Ingress, IngressConfig, RateLimit};
use skein_service::testing::{Platform, TestError};
use skein_service::{Host, HostConfig};
use skein_testkit::{eventually, Backend};
use uuid::Uuid;

const ADMIN_EMAIL: &str = "admin@example.org";
const PASSWORD: &str = "a long enough password";
const WAIT: Duration = Duration::from_secs(15);

fn boxed(e: TestError) -> anyhow::Error {
    anyhow::Error::from_boxed(e)
}

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The problem `type` slug (`urn:skein:problem:<slug>`).
    fn problem(&self) -> &str {
        self.body["type"]
            .as_str()
            .and_then(|t| t.strip_prefix("urn:skein:problem:"))
            .unwrap_or("")
    }

    /// The JSON pointers of the violations, sorted.
    fn pointers(&self) -> Vec<String> {
        let mut p: Vec<String> = self.body["violations"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|v| v["field"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        p.sort();
        p
    }
}

/// A request to send.
struct Req {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Req {
    fn new(method: &'static str, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
    fn token(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }
    fn json(self, body: &Value) -> Self {
        self.raw("application/json", body.to_string().into_bytes())
    }
    fn raw(mut self, content_type: &str, body: Vec<u8>) -> Self {
        if !content_type.is_empty() {
            self.headers
                .push(("content-type".to_owned(), content_type.to_owned()));
        }
        self.body = Some(body);
        self
    }
}

/// The platform, its workers and an ingress in front.
struct App {
    p: Platform,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<skein_ingress::Result<()>>>,
    /// Running workers with their connections.
    hosts: BTreeMap<&'static str, (Host, skein_bus::Bus)>,
    /// Identity's signing key, so tests can forge tokens it would sign.
    key: SigningKey,
    /// Public keys identity publishes besides its signing key's.
    verifying: Option<String>,
    admin: String,
}

const SERVICES: [&str; 4] = ["identity", "catalog", "orders", "projector"];

/// Identity signing with `key`, publishing `verifying` besides, with the
/// tests' admin.
fn identity_config(key: &SigningKey, verifying: Option<String>) -> IdentityConfig {
    IdentityConfig {
        signing_key_pem: Some(key.to_pem()),
        verification_keys_pem: verifying,
        admin: Some(AdminSeed {
            email: ADMIN_EMAIL.into(),
            password: PASSWORD.into(),
            name: "Admin".into(),
        }),
        ..IdentityConfig::default()
    }
}

/// Settings for tests: quick breakers and timeouts, generous rate limits.
fn test_config() -> IngressConfig {
    let mut c = IngressConfig::new(([127, 0, 0, 1], 0).into());
    c.services = SERVICES.map(String::from).to_vec();
    // Generous: the whole suite shares two cores with whole systems of
    // processes under load, and a log-in (argon2) once took longer than
    // 3 s there (504). Tests of the timeout set their own.
    c.query_timeout = Duration::from_secs(10);
    c.breaker = BreakerConfig {
        failure_threshold: 2,
        open_for: Duration::from_secs(1),
    };
    c.rate_limit = RateLimit {
        per_second: 1000.0,
        burst: 1000,
    };
    c.login_rate_limit = RateLimit {
        per_second: 100.0,
        burst: 100,
    };
    c.health_timeout = Duration::from_millis(500);
    c
}

impl App {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tune: impl FnOnce(&mut IngressConfig)) -> anyhow::Result<Self> {
        Self::start_workers(&SERVICES, tune).await
    }

    /// The whole platform: with payments and the saga coordinator, orders
    /// are confirmed or rejected for real.
    async fn start_full() -> anyhow::Result<Self> {
        let all = [
            "identity",
            "catalog",
            "orders",
            "projector",
            "payments",
            "orchestrator",
        ];
        Self::start_workers(&all, |c| c.services = all.map(String::from).to_vec()).await
    }

    async fn start_workers(
        workers: &[&'static str],
        tune: impl FnOnce(&mut IngressConfig),
    ) -> anyhow::Result<Self> {
        let p = Platform::start(Backend::Sqlite).await.map_err(boxed)?;
        let key = SigningKey::generate()?;
        let mut app = Self {
            p,
            addr: ([127, 0, 0, 1], 0).into(),
            stop: None,
            server: None,
            hosts: BTreeMap::new(),
            key,
            verifying: None,
            admin: String::new(),
        };
        for name in workers {
            app.start_worker(name).await?;
        }
        let mut config = test_config();
        tune(&mut config);
        let ingress =
            Ingress::build(config, app.p.connect("ingress").await.map_err(boxed)?).await?;
        app.addr = ingress.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        app.stop = Some(tx);
        app.server = Some(tokio::spawn(ingress.run_until(async {
            let _ = rx.await;
        })));
        app.admin = app.login(ADMIN_EMAIL).await?;
        Ok(app)
    }

    async fn start_worker(&mut self, name: &'static str) -> anyhow::Result<()> {
        let store = self.p.store(name).await.map_err(boxed)?;
        let bus = self.p.connect(name).await.map_err(boxed)?;
        let connection = bus.clone();
        let config = HostConfig::new(name);
        let host = match name {
            "identity" => {
                let identity = identity_config(&self.key, self.verifying.clone());
                skein_identity::start(bus, store, config, identity).await?
            }
            "catalog" => skein_catalog::start(bus, store, config).await?,
            "orders" => {
                skein_orders::start_with(bus, store, config, |c| {
                    c.backoff = vec![Duration::from_millis(100)]
                })
                .await?
            }
            "projector" => skein_projector::start(bus, store, config).await?,
            "payments" => skein_payments::start(bus, store, config, Default::default()).await?,
            "orchestrator" => {
                skein_orchestrator::start(bus, store, config, Default::default()).await?
            }
            other => bail!("no worker {other}"),
        };
        self.hosts.insert(name, (host, connection));
        Ok(())
    }

    /// Another copy of identity, `identity-2` (stopped with
    /// [`App::stop_worker`]), signing with `key` and publishing `verifying`
    /// besides: with the one of `hosts`, two copies configured differently,
    /// as during a rolling restart.
    async fn another_identity(
        &mut self,
        key: &SigningKey,
        verifying: Option<String>,
    ) -> anyhow::Result<()> {
        let store = self.p.store("identity").await.map_err(boxed)?;
        let bus = self.p.connect("identity").await.map_err(boxed)?;
        let host = skein_identity::start(
            bus.clone(),
            store,
            HostConfig::new("identity"),
            identity_config(key, verifying),
        )
        .await?;
        self.hosts.insert("identity-2", (host, bus));
        Ok(())
    }

    /// Stops a worker as its process would stop: gracefully, then its
    /// connection closes (so its service API and queue groups are gone).
    async fn stop_worker(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some((host, bus)) = self.hosts.remove(name) {
            host.shutdown().await;
            bus.client().drain().await?;
        }
        Ok(())
    }

    async fn send(&self, req: Req) -> anyhow::Result<Answer> {
        self.send_to(self.addr, req).await
    }

    /// Another ingress copy on the same NATS, as a load balancer would have
    /// behind it; it stops when the returned sender is dropped.
    async fn another_ingress(
        &self,
    ) -> anyhow::Result<(SocketAddr, tokio::sync::oneshot::Sender<()>)> {
        let ingress = Ingress::build(
            test_config(),
            self.p.connect("ingress-2").await.map_err(boxed)?,
        )
        .await?;
        let addr = ingress.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(ingress.run_until(async {
            let _ = rx.await;
        }));
        Ok((addr, tx))
    }

    async fn send_to(&self, addr: SocketAddr, req: Req) -> anyhow::Result<Answer> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut builder = hyper::Request::builder()
            .method(req.method)
            .uri(&req.path)
            .header("host", "localhost");
        for (k, v) in &req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let request = builder.body(Full::new(Bytes::from(req.body.unwrap_or_default())))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    async fn get(&self, path: &str, token: &str) -> anyhow::Result<Answer> {
        self.send(Req::new("GET", path).token(token)).await
    }

    async fn post(&self, path: &str, token: &str, body: &Value) -> anyhow::Result<Answer> {
        self.send(Req::new("POST", path).token(token).json(body))
            .await
    }

    async fn login(&self, email: &str) -> anyhow::Result<String> {
        let a = self
            .send(
                Req::new("POST", "/v1/auth/token")
                    .json(&json!({"email": email, "password": PASSWORD})),
            )
            .await?;
        ensure!(a.status == 200, "log-in failed: {a:?}");
        Ok(a.body["access_token"]
            .as_str()
            .context("no access token")?
            .to_owned())
    }

    /// Registers and logs in a customer: (user id, access token).
    async fn customer(&self, email: &str) -> anyhow::Result<(Uuid, String)> {
        let a = self
            .send(
                Req::new("POST", "/v1/auth/register")
                    .json(&json!({"email": email, "password": PASSWORD, "name": "Ada"})),
            )
            .await?;
        ensure!(a.status == 201, "register failed: {a:?}");
        let id = Uuid::parse_str(a.body["id"].as_str().unwrap_or("")).context("user id")?;
        Ok((id, self.login(email).await?))
    }

    /// Adds a product as admin.
    async fn product(&self, sku: &str, price_cents: i64, stock: i64) -> anyhow::Result<Uuid> {
        let a = self
            .post(
                "/v1/products",
                &self.admin,
                &json!({"sku": sku, "name": format!("Product {sku}"), "price_cents": price_cents, "stock": stock}),
            )
            .await?;
        ensure!(a.status == 201, "add product failed: {a:?}");
        Uuid::parse_str(a.body["id"].as_str().unwrap_or("")).context("product id")
    }

    /// Waits until `GET path` answers `status`.
    async fn until_status(&self, path: &str, token: &str, status: u16) -> anyhow::Result<Answer> {
        eventually(WAIT, || async {
            let a = self.get(path, token).await.ok()?;
            (a.status == status).then_some(a)
        })
        .await
        .with_context(|| format!("GET {path} never answered {status}"))
    }

    /// Waits until the order has `status`.
    async fn until_order(&self, id: Uuid, token: &str, status: &str) -> anyhow::Result<Answer> {
        let path = format!("/v1/orders/{id}");
        eventually(WAIT, || async {
            let a = self.get(&path, token).await.ok()?;
            (a.status == 200 && a.body["status"] == status).then_some(a)
        })
        .await
        .with_context(|| format!("order {id} never became {status}"))
    }

    /// A core subscription on every command subject, to see what is published.
    async fn watch_commands(&self) -> anyhow::Result<async_nats::Subscriber> {
        let sub = self.p.bus.client().subscribe("commands.>").await?;
        // A round trip on the same connection: once it is answered, the
        // server has the subscription (a flush only empties our buffer).
        self.p.bus.jetstream().query_account().await?;
        Ok(sub)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Every message on `sub` within `window`.
async fn drain(sub: &mut async_nats::Subscriber, window: Duration) -> Vec<async_nats::Message> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        out.push(m);
    }
    out
}

fn b64(json: &Value) -> String {
    URL_SAFE_NO_PAD.encode(json.to_string())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- auth ----

#[tokio::test]
async fn a_customer_registers_logs_in_refreshes_and_reads_themselves() -> anyhow::Result<()> {
    let app = App::start().await?;
    let a = app
        .send(
            Req::new("POST", "/v1/auth/register")
                .json(&json!({"email": "ada@example.org", "password": PASSWORD, "name": "Ada"})),
        )
        .await?;
    ensure!(a.status == 201, "{a:?}");
    let id = a.body["id"].as_str().context("id")?.to_owned();
    ensure!(a.header("location") == Some(&format!("/v1/users/{id}/profile")[..]));
    ensure!(a.body["role"] == "customer");

    let again = app
        .send(
            Req::new("POST", "/v1/auth/register")
                .json(&json!({"email": "ADA@example.org", "password": PASSWORD, "name": "Ada"})),
        )
        .await?;
    ensure!(
        again.status == 409 && again.problem() == "conflict",
        "{again:?}"
    );

    let wrong = app
        .send(
            Req::new("POST", "/v1/auth/token")
                .json(&json!({"email": "ada@example.org", "password": "not the password"})),
        )
        .await?;
    ensure!(wrong.status == 401, "{wrong:?}");
    ensure!(wrong.header("www-authenticate").is_some());

    let pair = app
        .send(
            Req::new("POST", "/v1/auth/token")
                .json(&json!({"email": "ada@example.org", "password": PASSWORD})),
        )
        .await?;
    ensure!(
        pair.status == 200 && pair.body["token_type"] == "Bearer",
        "{pair:?}"
    );
    ensure!(pair.header("cache-control") == Some("no-store"));
    let access = pair.body["access_token"].as_str().context("access")?;
    let refresh = pair.body["refresh_token"].as_str().context("refresh")?;

    let me = app.get("/v1/me", access).await?;
    ensure!(me.status == 200 && me.body["id"] == id.as_str(), "{me:?}");

    let renewed = app
        .send(Req::new("POST", "/v1/auth/refresh").json(&json!({"refresh_token": refresh})))
        .await?;
    ensure!(renewed.status == 200, "{renewed:?}");
    ensure!(renewed.body["refresh_token"] != refresh);
    let reused = app
        .send(Req::new("POST", "/v1/auth/refresh").json(&json!({"refresh_token": refresh})))
        .await?;
    ensure!(
        reused.status == 401,
        "the old refresh token must stop working: {reused:?}"
    );

    // Log out: the login's refresh token stops working.
    let login = |password: &'static str| {
        app.send(
            Req::new("POST", "/v1/auth/token")
                .json(&json!({"email": "ada@example.org", "password": password})),
        )
    };
    let pair = login(PASSWORD).await?;
    let refresh = pair.body["refresh_token"].as_str().context("refresh")?;
    let logout = |body: Value| app.send(Req::new("POST", "/v1/auth/logout").json(&body));
    let out = logout(json!({"refresh_token": refresh})).await?;
    ensure!(out.status == 200 && out.body["revoked"] == 1, "{out:?}");
    let after = app
        .send(Req::new("POST", "/v1/auth/refresh").json(&json!({"refresh_token": refresh})))
        .await?;
    ensure!(after.status == 401, "{after:?}");
    let bad = logout(json!({"refresh_token": ""})).await?;
    ensure!(bad.status == 422, "{bad:?}");
    let bad = logout(json!({"refresh_token": refresh, "all": true})).await?;
    ensure!(bad.status == 422, "{bad:?}");
    Ok(())
}

#[tokio::test]
async fn forged_expired_tampered_and_missing_tokens_get_401_with_www_authenticate(
) -> anyhow::Result<()> {
    let app = App::start().await?;
    let (user, token) = app.customer("eve@example.org").await?;
    let claims = Claims::new(
        user,
        Role::Customer,
        "skein",
        "skein-api",
        Duration::from_secs(600),
    );
    let header = |alg: &str, kid: &str| b64(&json!({"alg": alg, "typ": "JWT", "kid": kid}));

    let mut parts = token.split('.');
    let (h, _, s) = (
        parts.next().context("header")?,
        parts.next().context("payload")?,
        parts.next().context("signature")?,
    );
    let admin_claims = json!({"sub": user, "role": "admin", "iss": "skein", "aud": "skein-api",
        "iat": now(), "exp": now() + 600, "jti": Uuid::now_v7()});
    let tampered = format!("{h}.{}.{s}", b64(&admin_claims));
    let unsigned = format!(
        "{}.{}.",
        header("none", app.key.key_id()),
        b64(&admin_claims)
    );
    let hmac = format!(
        "{}.{}.{s}",
        header("HS256", app.key.key_id()),
        b64(&admin_claims)
    );
    let other_key = SigningKey::generate()?;
    let wrong_key = other_key.issue(&claims)?;
    let expired = app.key.issue(&Claims {
        iat: now() - 7200,
        exp: now() - 3600,
        ..claims.clone()
    })?;
    let wrong_audience = app.key.issue(&Claims::new(
        user,
        Role::Customer,
        "skein",
        "another-api",
        Duration::from_secs(600),
    ))?;

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, ""),
        ("alg none", Some(format!("Bearer {unsigned}")), "algorithm"),
        (
            "HS256 with the public key",
            Some(format!("Bearer {hmac}")),
            "algorithm",
        ),
        (
            "another key",
            Some(format!("Bearer {wrong_key}")),
            "unknown key",
        ),
        ("expired", Some(format!("Bearer {expired}")), "expired"),
        (
            "tampered payload",
            Some(format!("Bearer {tampered}")),
            "signature",
        ),
        (
            "wrong audience",
            Some(format!("Bearer {wrong_audience}")),
            "this API",
        ),
        ("garbage", Some("Bearer not.a.jwt".into()), "malformed"),
        (
            "basic scheme",
            Some("Basic YWRhOnB3".into()),
            "Bearer scheme",
        ),
    ];
    for (what, authorization, reason) in cases {
        let mut req = Req::new("GET", "/v1/me");
        if let Some(a) = &authorization {
            req = req.header("authorization", a);
        }
        let a = app.send(req).await?;
        ensure!(a.status == 401, "{what}: {a:?}");
        ensure!(a.problem() == "unauthenticated", "{what}: {a:?}");
        let challenge = a.header("www-authenticate").unwrap_or("");
        ensure!(
            challenge.starts_with("Bearer realm=\"skein\""),
            "{what}: {challenge}"
        );
        if authorization.is_some() {
            ensure!(
                challenge.contains("error=\"invalid_token\""),
                "{what}: {challenge}"
            );
            ensure!(
                challenge.contains(reason),
                "{what}: {challenge} lacks {reason}"
            );
        }
    }
    // A forged admin token does not reach admin routes either.
    let a = app
        .post(
            "/v1/products",
            &unsigned,
            &json!({"sku": "x", "name": "x", "price_cents": 1, "stock": 1}),
        )
        .await?;
    ensure!(a.status == 401, "{a:?}");
    ensure!(app.get("/v1/me", &token).await?.status == 200);
    Ok(())
}

#[tokio::test]
async fn roles_are_enforced_and_other_customers_data_does_not_exist() -> anyhow::Result<()> {
    let app = App::start().await?;
    let (ada, ada_token) = app.customer("ada@example.org").await?;
    let (bob, bob_token) = app.customer("bob@example.org").await?;
    let product = app.product("sku-1", 500, 10).await?;

    let a = app
        .post(
            "/v1/products",
            &ada_token,
            &json!({"sku": "sku-2", "name": "x", "price_cents": 1, "stock": 1}),
        )
        .await?;
    ensure!(a.status == 403 && a.problem() == "forbidden", "{a:?}");
    let a = app
        .post(
            &format!("/v1/products/{product}/restock"),
            &ada_token,
            &json!({"quantity": 5}),
        )
        .await?;
    ensure!(a.status == 403, "{a:?}");
    ensure!(app.get("/v1/dashboard", &ada_token).await?.status == 403);

    let placed = app
        .post(
            "/v1/orders",
            &ada_token,
            &json!({"lines": [{"product_id": product, "quantity": 1}]}),
        )
        .await?;
    ensure!(placed.status == 202, "{placed:?}");
    let order = placed.body["order_id"]
        .as_str()
        .context("order id")?
        .to_owned();
    app.until_status(&format!("/v1/orders/{order}"), &ada_token, 200)
        .await?;

    // Ada's order was placed moments ago: to bob it is what an id minted
    // moments ago that orders does not know is (503 `not-yet`), and then
    // what any id orders does not know is (404).
    let a = app.get(&format!("/v1/orders/{order}"), &bob_token).await?;
    ensure!(
        a.status == 503 && a.problem() == "not-yet",
        "bob must not see ada's order: {a:?}"
    );
    let a = app
        .post(
            &format!("/v1/orders/{order}/cancel"),
            &bob_token,
            &json!({}),
        )
        .await?;
    ensure!(
        a.status == 503 && a.problem() == "not-yet",
        "bob must not cancel ada's order: {a:?}"
    );
    let a = app
        .get(&format!("/v1/users/{ada}/profile"), &bob_token)
        .await?;
    ensure!(a.status == 404, "bob must not see ada's profile: {a:?}");
    ensure!(
        app.get(&format!("/v1/orders/{}", Uuid::new_v4()), &bob_token)
            .await?
            .status
            == 404
    );
    ensure!(app.get("/v1/orders/not-a-uuid", &bob_token).await?.status == 404);
    // A path that does not decode to text is problem+json too.
    for path in [
        "/v1/orders/%FF",
        "/v1/users/%C3%28/profile",
        "/v1/trace/%FF",
    ] {
        let token = if path.starts_with("/v1/trace") {
            &app.admin
        } else {
            &bob_token
        };
        let a = app.get(path, token).await?;
        ensure!(
            a.status == 404
                && a.problem() == "not-found"
                && a.header("content-type") == Some("application/problem+json"),
            "{path}: {a:?}"
        );
    }

    let admin_view = app.get(&format!("/v1/orders/{order}"), &app.admin).await?;
    ensure!(admin_view.status == 200, "{admin_view:?}");
    let profile = app
        .until_status(&format!("/v1/users/{ada}/profile"), &ada_token, 200)
        .await?;
    ensure!(
        profile.body["user"]["id"] == ada.to_string().as_str(),
        "{profile:?}"
    );
    app.until_status(&format!("/v1/users/{bob}/profile"), &app.admin, 200)
        .await?;

    let restocked = app
        .post(
            &format!("/v1/products/{product}/restock"),
            &app.admin,
            &json!({"quantity": 5}),
        )
        .await?;
    ensure!(restocked.status == 200, "{restocked:?}");
    let unknown = app
        .post(
            &format!("/v1/products/{}/restock", Uuid::now_v7()),
            &app.admin,
            &json!({"quantity": 5}),
        )
        .await?;
    ensure!(unknown.status == 404, "{unknown:?}");

    let dashboard = eventually(WAIT, || async {
        let a = app.get("/v1/dashboard", &app.admin).await.ok()?;
        (a.status == 200 && a.body["total_orders"].as_i64() >= Some(1)).then_some(a)
    })
    .await
    .context("dashboard")?;
    ensure!(
        dashboard.body["total_users"].as_i64() >= Some(3),
        "{dashboard:?}"
    );
    ensure!(dashboard.body["orders_by_status"].is_object());
    Ok(())
}

// ---- bad input ----

/// What is sent, its content type and body; the status, problem type and
/// violation pointers expected.
type BadInput = (
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    &'static str,
    Vec<&'static str>,
);

#[tokio::test]
async fn each_bad_input_is_answered_precisely_and_nothing_is_published() -> anyhow::Result<()> {
    let app = App::start().await?;
    let (_, token) = app.customer("ada@example.org").await?;
    let product = Uuid::now_v7();
    let mut commands = app.watch_commands().await?;

    let line = |q: Value| json!({"product_id": product, "quantity": q});
    let many: Vec<Value> = (0..101)
        .map(|_| json!({"product_id": Uuid::now_v7(), "quantity": 1}))
        .collect();
    // (what, content type, body, status, problem, pointers)
    let cases: Vec<BadInput> = vec![
        (
            "no content type",
            "",
            b"{}".to_vec(),
            415,
            "unsupported-media-type",
            vec![],
        ),
        (
            "text",
            "text/plain",
            b"{}".to_vec(),
            415,
            "unsupported-media-type",
            vec![],
        ),
        (
            "form",
            "application/x-www-form-urlencoded",
            b"a=1".to_vec(),
            415,
            "unsupported-media-type",
            vec![],
        ),
        (
            "oversized",
            "application/json",
            vec![b' '; 70 * 1024],
            413,
            "payload-too-large",
            vec![],
        ),
        (
            "truncated",
            "application/json",
            b"{\"lines\": [".to_vec(),
            400,
            "malformed-json",
            vec![],
        ),
        (
            "empty",
            "application/json",
            Vec::new(),
            400,
            "malformed-json",
            vec![],
        ),
        (
            "not an object",
            "application/json",
            b"[]".to_vec(),
            422,
            "validation",
            vec![""],
        ),
        (
            "missing lines",
            "application/json",
            b"{}".to_vec(),
            422,
            "validation",
            vec!["/lines"],
        ),
        (
            "no lines and an unknown field",
            "application/json",
            json!({"lines": [], "coupon": "FREE"})
                .to_string()
                .into_bytes(),
            422,
            "validation",
            vec!["/coupon", "/lines"],
        ),
        (
            "wrong types",
            "application/json",
            json!({"lines": [{"product_id": "not-a-uuid", "quantity": "2"}]})
                .to_string()
                .into_bytes(),
            422,
            "validation",
            vec!["/lines/0/product_id", "/lines/0/quantity"],
        ),
        (
            "quantities out of range and a product twice",
            "application/json; charset=utf-8",
            json!({"lines": [line(json!(0)), line(json!(10001))]})
                .to_string()
                .into_bytes(),
            422,
            "validation",
            vec![
                "/lines/0/quantity",
                "/lines/1/product_id",
                "/lines/1/quantity",
            ],
        ),
        (
            "too many lines",
            "application/json",
            json!({ "lines": many }).to_string().into_bytes(),
            422,
            "validation",
            vec!["/lines"],
        ),
        (
            "an unknown field in a line",
            "application/json",
            json!({"lines": [{"product_id": product, "quantity": 1, "price_cents": 0}]})
                .to_string()
                .into_bytes(),
            422,
            "validation",
            vec!["/lines/0/price_cents"],
        ),
    ];
    for (what, content_type, body, status, problem, pointers) in cases {
        let a = app
            .send(
                Req::new("POST", "/v1/orders")
                    .token(&token)
                    .raw(content_type, body),
            )
            .await?;
        ensure!(a.status == status, "{what}: {a:?}");
        ensure!(a.problem() == problem, "{what}: {a:?}");
        ensure!(
            a.header("content-type") == Some("application/problem+json"),
            "{what}: {a:?}"
        );
        ensure!(a.body["status"] == status, "{what}: {a:?}");
        ensure!(
            a.body["request_id"].is_string() && a.body["instance"] == "/v1/orders",
            "{what}: {a:?}"
        );
        ensure!(
            a.pointers() == pointers,
            "{what}: pointers {:?} != {pointers:?}",
            a.pointers()
        );
    }

    // Registration and products: every violation at once.
    let a = app
        .send(
            Req::new("POST", "/v1/auth/register")
                .json(&json!({"email": "nope", "password": "short", "name": " "})),
        )
        .await?;
    ensure!(
        a.status == 422 && a.pointers() == ["/email", "/name", "/password"],
        "{a:?}"
    );
    let a = app
        .post(
            "/v1/products",
            &app.admin,
            &json!({"sku": "has space", "name": "x", "price_cents": -1, "stock": 10001}),
        )
        .await?;
    ensure!(
        a.status == 422 && a.pointers() == ["/price_cents", "/sku", "/stock"],
        "{a:?}"
    );
    let a = app.get("/v1/orders?limit=0&colour=red", &token).await?;
    ensure!(
        a.status == 422 && a.pointers() == ["?colour", "?limit"],
        "{a:?}"
    );
    let a = app.get("/v1/orders?limit=many", &token).await?;
    ensure!(a.status == 422 && a.pointers() == ["?limit"], "{a:?}");

    // Routing errors are problems too.
    let a = app.get("/v1/nowhere", &token).await?;
    ensure!(a.status == 404 && a.problem() == "route-not-found", "{a:?}");
    let a = app
        .send(Req::new("DELETE", "/v1/orders").token(&token))
        .await?;
    ensure!(
        a.status == 405
            && a.problem() == "method-not-allowed"
            && a.header("allow")
                .is_some_and(|m| m.contains("GET") && m.contains("POST")),
        "{a:?}"
    );

    let published = drain(&mut commands, Duration::from_millis(500)).await;
    ensure!(
        published.is_empty(),
        "a refused request published {} command(s)",
        published.len()
    );
    let products = app.get("/v1/products", &token).await?;
    ensure!(
        products.body["items"].as_array().map(Vec::len) == Some(0),
        "{products:?}"
    );
    Ok(())
}

// ---- orders ----

#[tokio::test]
async fn an_order_is_accepted_read_listed_and_cancelled_until_it_is_final() -> anyhow::Result<()> {
    let app = App::start().await?;
    let (_, token) = app.customer("ada@example.org").await?;
    let product = app.product("sku-1", 250, 100).await?;
    let products = app.get("/v1/products", &token).await?;
    ensure!(
        products.body["items"][0]["available"] == 100,
        "{products:?}"
    );

    let mut ids = Vec::new();
    for _ in 0..3 {
        let a = app
            .post(
                "/v1/orders",
                &token,
                &json!({"lines": [{"product_id": product, "quantity": 2}]}),
            )
            .await?;
        ensure!(a.status == 202 && a.body["status"] == "pending", "{a:?}");
        let id = Uuid::parse_str(a.body["order_id"].as_str().unwrap_or(""))?;
        ensure!(
            a.header("location") == Some(&format!("/v1/orders/{id}")[..]),
            "{a:?}"
        );
        ids.push(id);
    }
    for id in &ids {
        let order = app.until_order(*id, &token, "pending").await?;
        ensure!(order.body["total_cents"] == 500, "{order:?}");
    }

    let page = app.get("/v1/orders?limit=2", &token).await?;
    ensure!(page.status == 200, "{page:?}");
    let first: Vec<&str> = page.body["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|o| o["id"].as_str())
        .collect();
    ensure!(first.len() == 2, "{page:?}");
    let cursor = page.body["next_cursor"].as_str().context("cursor")?;
    let rest = app
        .get(&format!("/v1/orders?limit=2&cursor={cursor}"), &token)
        .await?;
    ensure!(
        rest.body["items"].as_array().map(Vec::len) == Some(1),
        "{rest:?}"
    );

    // A rejected order can no longer be cancelled.
    app.p
        .send(&RejectOrder {
            order_id: ids[0],
            reason: "test".into(),
        })
        .await
        .map_err(boxed)?;
    app.until_order(ids[0], &token, "rejected").await?;
    let a = app
        .post(&format!("/v1/orders/{}/cancel", ids[0]), &token, &json!({}))
        .await?;
    ensure!(a.status == 409 && a.problem() == "conflict", "{a:?}");

    // A pending one can; once cancelled, not again.
    let a = app
        .post(&format!("/v1/orders/{}/cancel", ids[1]), &token, &json!({}))
        .await?;
    ensure!(a.status == 202, "{a:?}");
    ensure!(a.header("location") == Some(&format!("/v1/orders/{}", ids[1])[..]));
    app.p
        .wait_events::<skein_contracts::orders::OrderCancellationRequested>(&ids[1].to_string(), 1)
        .await
        .map_err(boxed)?;
    app.p
        .send(&MarkCancelled {
            order_id: ids[1],
            reason: "customer".into(),
        })
        .await
        .map_err(boxed)?;
    app.until_order(ids[1], &token, "cancelled").await?;
    let a = app
        .post(&format!("/v1/orders/{}/cancel", ids[1]), &token, &json!({}))
        .await?;
    ensure!(a.status == 409, "{a:?}");
    Ok(())
}

#[tokio::test]
async fn concurrent_duplicates_with_one_idempotency_key_place_one_order() -> anyhow::Result<()> {
    let app = App::start().await?;
    let (ada, token) = app.customer("ada@example.org").await?;
    let (_, bob_token) = app.customer("bob@example.org").await?;
    let product = app.product("sku-1", 100, 100).await?;
    let body = json!({"lines": [{"product_id": product, "quantity": 1}]});
    let mut commands = app.watch_commands().await?;

    let attempts = (0..8).map(|_| {
        app.send(
            Req::new("POST", "/v1/orders")
                .token(&token)
                .header("idempotency-key", "checkout-42")
                .json(&body),
        )
    });
    let answers = futures::future::join_all(attempts).await;
    let mut order_ids = std::collections::BTreeSet::new();
    let mut fresh = 0;
    for a in answers {
        let a = a?;
        ensure!(a.status == 202, "{a:?}");
        order_ids.insert(a.body["order_id"].as_str().unwrap_or("").to_owned());
        if a.header("idempotent-replayed").is_none() {
            fresh += 1;
        }
    }
    ensure!(
        order_ids.len() == 1,
        "one key, several orders: {order_ids:?}"
    );
    ensure!(fresh == 1, "{fresh} requests ran instead of one");
    let order_id = order_ids.into_iter().next().unwrap_or_default();
    // The id follows from caller and key, so any ingress copy picks the same.
    let derived =
        skein_ingress::idempotency::derived_id("order", &format!("user:{ada}"), "checkout-42");
    ensure!(order_id == derived.to_string(), "{order_id} != {derived}");

    let published = drain(&mut commands, Duration::from_millis(500)).await;
    ensure!(
        published.len() == 1,
        "{} place_order commands published",
        published.len()
    );

    let reused = app
        .send(
            Req::new("POST", "/v1/orders")
                .token(&token)
                .header("idempotency-key", "checkout-42")
                .json(&json!({"lines": [{"product_id": product, "quantity": 2}]})),
        )
        .await?;
    ensure!(
        reused.status == 422 && reused.problem() == "idempotency-key-reused",
        "{reused:?}"
    );
    let bad_key = app
        .send(
            Req::new("POST", "/v1/orders")
                .token(&token)
                .header("idempotency-key", "")
                .json(&body),
        )
        .await?;
    ensure!(bad_key.status == 400, "{bad_key:?}");

    // The same key from another customer is another order.
    let bob = app
        .send(
            Req::new("POST", "/v1/orders")
                .token(&bob_token)
                .header("idempotency-key", "checkout-42")
                .json(&body),
        )
        .await?;
    ensure!(
        bob.status == 202 && bob.body["order_id"] != order_id.as_str(),
        "{bob:?}"
    );

    let order = Uuid::parse_str(&order_id)?;
    app.until_order(order, &token, "pending").await?;
    let list = app.get("/v1/orders", &token).await?;
    ensure!(
        list.body["items"].as_array().map(Vec::len) == Some(1),
        "{list:?}"
    );
    Ok(())
}

/// A keyed request retried through another ingress copy, which has not
/// seen the key: the registration answers the same account, the new
/// product is the same one, the restock is applied once (identity and the
/// catalog recognise the ids derived from the key).
#[tokio::test]
async fn a_keyed_registration_product_or_restock_retried_through_another_copy_applies_once(
) -> anyhow::Result<()> {
    let app = App::start().await?;
    let (other, _stop) = app.another_ingress().await?;
    let copies = [app.addr, other];
    let mut users = Vec::new();
    for addr in copies {
        let a = app
            .send_to(
                addr,
                Req::new("POST", "/v1/auth/register")
                    .header("idempotency-key", "sign-up")
                    .json(&json!({"email": "grace@example.org", "password": PASSWORD, "name": "Grace"})),
            )
            .await?;
        ensure!(
            a.status == 201,
            "the registration through copy {addr}: {a:?}"
        );
        users.push(a.body["id"].clone());
    }
    ensure!(users[0] == users[1], "two answers for one key: {users:?}");
    let new_product = json!({"sku": "MUG-1", "name": "Mug", "price_cents": 900, "stock": 3});
    let mut ids = Vec::new();
    for addr in copies {
        let a = app
            .send_to(
                addr,
                Req::new("POST", "/v1/products")
                    .token(&app.admin)
                    .header("idempotency-key", "mug")
                    .json(&new_product),
            )
            .await?;
        ensure!(a.status == 201, "{a:?}");
        ids.push(a.body["id"].clone());
    }
    ensure!(ids[0] == ids[1], "two products for one key: {ids:?}");
    let id = ids[0].as_str().context("no product id")?;

    let path = format!("/v1/products/{id}/restock");
    for addr in copies {
        let a = app
            .send_to(
                addr,
                Req::new("POST", &path)
                    .token(&app.admin)
                    .header("idempotency-key", "restock-1")
                    .json(&json!({"quantity": 5})),
            )
            .await?;
        ensure!(
            a.status == 200 && a.body["available"] == 8,
            "the restock through copy {addr}: {a:?}"
        );
    }
    let list = app.get("/v1/products", &app.admin).await?;
    let items = list.body["items"].as_array().context("no product list")?;
    ensure!(
        items.len() == 1 && items[0]["id"] == id && items[0]["available"] == 8,
        "{list:?}"
    );
    // Another key is another restock.
    let a = app
        .send_to(
            other,
            Req::new("POST", &path)
                .token(&app.admin)
                .header("idempotency-key", "restock-2")
                .json(&json!({"quantity": 5})),
        )
        .await?;
    ensure!(a.status == 200 && a.body["available"] == 13, "{a:?}");
    Ok(())
}

#[tokio::test]
async fn prefer_wait_answers_with_the_final_order_or_falls_back_to_202() -> anyhow::Result<()> {
    let app = App::start().await?;
    let (ada, token) = app.customer("ada@example.org").await?;
    let product = app.product("sku-1", 100, 100).await?;
    let body = json!({"lines": [{"product_id": product, "quantity": 1}]});

    // Confirmed while the request waits: 200 with the order.
    let order = skein_ingress::idempotency::derived_id("order", &format!("user:{ada}"), "k1");
    let confirm = async {
        app.p
            .wait_events::<OrderPlaced>(&order.to_string(), 1)
            .await
            .map_err(boxed)?;
        app.p
            .send(&ConfirmOrder { order_id: order })
            .await
            .map_err(boxed)?;
        anyhow::Ok(())
    };
    let request = app.send(
        Req::new("POST", "/v1/orders")
            .token(&token)
            .header("idempotency-key", "k1")
            .header("prefer", "wait=15")
            .json(&body),
    );
    let (answer, confirmed) = tokio::join!(request, confirm);
    confirmed?;
    let a = answer?;
    ensure!(a.status == 200, "{a:?}");
    ensure!(
        a.body["status"] == "confirmed" && a.body["id"] == order.to_string().as_str(),
        "{a:?}"
    );
    ensure!(a.header("preference-applied") == Some("wait=15"), "{a:?}");

    // The key again through another copy, which has not seen it: JetStream
    // recognises the placement (its duplicate window), so the order is read
    // at once, not after the 15 s wait (orders would announce nothing): the
    // same request answers with the final order, another request with the
    // same key is refused, as the first copy does from its memory.
    let (other, _stop) = app.another_ingress().await?;
    let retry = |body: &serde_json::Value| {
        Req::new("POST", "/v1/orders")
            .token(&token)
            .header("idempotency-key", "k1")
            .header("prefer", "wait=15")
            .json(body)
    };
    let other_body = json!({"lines": [{"product_id": product, "quantity": 2}]});
    let started = Instant::now();
    for _ in 0..2 {
        let a = app.send_to(other, retry(&other_body)).await?;
        ensure!(
            a.status == 422 && a.problem() == "idempotency-key-reused",
            "{a:?}"
        );
    }
    // Refusing the other request kept nothing: the key's own request is
    // still answered, by the copy that refused, with the final order.
    let a = app.send_to(other, retry(&body)).await?;
    ensure!(
        a.status == 200
            && a.body["status"] == "confirmed"
            && a.body["id"] == order.to_string().as_str(),
        "{a:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "repeats waited out their wait: {:?}",
        started.elapsed()
    );
    let a = app.send(retry(&other_body)).await?;
    ensure!(
        a.status == 422 && a.problem() == "idempotency-key-reused",
        "{a:?}"
    );
    let a = app.get(&format!("/v1/orders/{order}"), &token).await?;
    ensure!(a.body["lines"][0]["quantity"] == 1, "{a:?}");

    // Nothing final within the wait: the normal 202, after the wait.
    let started = Instant::now();
    let a = app
        .send(
            Req::new("POST", "/v1/orders")
                .token(&token)
                .header("prefer", "wait=1")
                .json(&body),
        )
        .await?;
    ensure!(
        a.status == 202 && a.header("preference-applied").is_none(),
        "{a:?}"
    );
    ensure!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Cancelling with a wait: 200 once the cancellation is done.
    let pending = Uuid::parse_str(a.body["order_id"].as_str().unwrap_or(""))?;
    app.until_order(pending, &token, "pending").await?;
    let finish = async {
        app.p
            .wait_events::<skein_contracts::orders::OrderCancellationRequested>(
                &pending.to_string(),
                1,
            )
            .await
            .map_err(boxed)?;
        app.p
            .send(&MarkCancelled {
                order_id: pending,
                reason: "customer".into(),
            })
            .await
            .map_err(boxed)?;
        anyhow::Ok(())
    };
    let cancel = app.send(
        Req::new("POST", format!("/v1/orders/{pending}/cancel"))
            .token(&token)
            .header("prefer", "wait=15"),
    );
    let (answer, finished) = tokio::join!(cancel, finish);
    finished?;
    let a = answer?;
    ensure!(a.status == 200 && a.body["status"] == "cancelled", "{a:?}");
    Ok(())
}

#[tokio::test]
async fn the_request_id_is_kept_when_well_formed_and_becomes_the_correlation_id(
) -> anyhow::Result<()> {
    let app = App::start().await?;
    let (_, token) = app.customer("ada@example.org").await?;
    let product = app.product("sku-1", 100, 100).await?;
    let mut commands = app.watch_commands().await?;
    let a = app
        .send(
            Req::new("POST", "/v1/orders")
                .token(&token)
                .header("x-request-id", "checkout-7f3a")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .json(&json!({"lines": [{"product_id": product, "quantity": 1}]})),
        )
        .await?;
    ensure!(
        a.status == 202 && a.header("x-request-id") == Some("checkout-7f3a"),
        "{a:?}"
    );
    let published = drain(&mut commands, Duration::from_millis(500)).await;
    let headers = published
        .first()
        .and_then(|m| m.headers.clone())
        .context("no command published")?;
    // The request's id and its trace (the trace id kept, a span of its own).
    let continues = |headers: &async_nats::HeaderMap, request: &str, trace_id: &str| {
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        let trace = header("traceparent").unwrap_or_default();
        ensure!(
            header("ce-correlationid").as_deref() == Some(request)
                && trace.starts_with(&format!("00-{trace_id}-")),
            "{headers:?}"
        );
        anyhow::Ok(())
    };
    continues(
        &headers,
        "checkout-7f3a",
        "4bf92f3577b34da6a3ce929d0e0e4736",
    )?;

    // A request answered by a service (a registration, request-reply):
    // the event it causes carries the request id and the trace too.
    let a = app
        .send(
            Req::new("POST", "/v1/auth/register")
                .header("x-request-id", "signup-9c1d")
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .json(
                    &json!({"email": "grace@example.org", "password": PASSWORD, "name": "Grace"}),
                ),
        )
        .await?;
    ensure!(a.status == 201, "{a:?}");
    let user = a.body["id"].as_str().context("no user id")?.to_owned();
    let registered = eventually(Duration::from_secs(10), || async {
        skein_bus::replay::read(
            &app.p.bus,
            "EVENTS",
            &format!("events.identity.{user}.>"),
            skein_bus::replay::StartAt::Beginning,
        )
        .await
        .ok()?
        .pop()
    })
    .await
    .context("no user_registered stored")?;
    let headers = registered.headers.context("no headers")?;
    continues(&headers, "signup-9c1d", "0af7651916cd43dd8448eb211c80319c")?;

    let a = app
        .send(Req::new("GET", "/v1/products").header("x-request-id", "bad id with spaces"))
        .await?;
    let id = a.header("x-request-id").unwrap_or("");
    ensure!(
        Uuid::parse_str(id).is_ok(),
        "a malformed request id is replaced: {id}"
    );
    Ok(())
}

#[tokio::test]
async fn an_order_waited_for_is_confirmed_by_the_saga_and_admins_see_that_saga(
) -> anyhow::Result<()> {
    let app = App::start_full().await?;
    let (_, token) = app.customer("ada@example.org").await?;
    let product = app.product("tea-1", 450, 10).await?;
    let placed = eventually(WAIT, || async {
        // The first try may beat the replicas of the new customer and product
        // into orders; it is then rejected, and a retry with a new key runs.
        let a = app
            .send(
                Req::new("POST", "/v1/orders")
                    .token(&token)
                    .header("prefer", "wait=10")
                    .json(&json!({"lines": [{"product_id": product, "quantity": 2}]})),
            )
            .await
            .ok()?;
        (a.status == 200 && a.body["status"] == "confirmed").then_some(a)
    })
    .await
    .context("no order was confirmed")?;
    ensure!(
        placed.header("preference-applied") == Some("wait=10"),
        "{placed:?}"
    );
    ensure!(placed.body["total_cents"] == 900, "{placed:?}");
    let order = placed.body["id"].as_str().context("id")?.to_owned();

    let saga = app.get(&format!("/v1/sagas/{order}"), &app.admin).await?;
    ensure!(saga.status == 200, "{saga:?}");
    ensure!(
        saga.body["saga"] == "place_order" && saga.body["key"] == order.as_str(),
        "{saga:?}"
    );
    ensure!(
        saga.body["transitions"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{saga:?}"
    );
    let by_id = app
        .get(
            &format!("/v1/sagas/{}", saga.body["id"].as_str().unwrap_or("")),
            &app.admin,
        )
        .await?;
    ensure!(
        by_id.status == 200 && by_id.body["id"] == saga.body["id"],
        "{by_id:?}"
    );
    let denied = app.get(&format!("/v1/sagas/{order}"), &token).await?;
    ensure!(denied.status == 403, "{denied:?}");
    let none = app
        .get(&format!("/v1/sagas/{}", Uuid::now_v7()), &app.admin)
        .await?;
    ensure!(none.status == 404, "{none:?}");

    // Only a failed saga is retried: by its id a completed one is 409, by
    // its order there is no failed one to find; customers are refused.
    let saga_id = saga.body["id"].as_str().context("saga id")?.to_owned();
    let retry = |id: &str, token: &str| {
        app.send(Req::new("POST", format!("/v1/sagas/{id}/retry")).token(token))
    };
    let completed = retry(&saga_id, &app.admin).await?;
    ensure!(
        completed.status == 409
            && completed.body["detail"]
                == format!("saga instance {saga_id} is completed: only a failed one is retried")
                    .as_str()
            && completed.header("content-type") == Some("application/problem+json"),
        "{completed:?}"
    );
    let by_order = retry(&order, &app.admin).await?;
    ensure!(
        by_order.status == 404
            && by_order.body["detail"]
                == format!("no saga {order} and no failed saga about order {order}").as_str(),
        "{by_order:?}"
    );
    let not_admin = retry(&saga_id, &token).await?;
    ensure!(not_admin.status == 403, "{not_admin:?}");

    // The same order as a causal tree: placed, then each saga step.
    let traced = app.get(&format!("/v1/trace/{order}"), &app.admin).await?;
    ensure!(traced.status == 200, "{traced:?}");
    let chain: Vec<(String, u64)> = traced.body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|h| Some((h["type"].as_str()?.to_owned(), h["depth"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    let expected = [
        "orders.order_placed.v1",
        "catalog.reserve_stock.v1",
        "catalog.stock_reserved.v1",
        "payments.authorize_payment.v1",
        "payments.payment_authorized.v1",
        "orders.confirm_order.v1",
        "orders.order_confirmed.v1",
    ];
    ensure!(
        chain.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>() == expected
            && chain.iter().enumerate().all(|(i, (_, d))| *d == i as u64),
        "{chain:?}"
    );
    let denied = app.get(&format!("/v1/trace/{order}"), &token).await?;
    ensure!(denied.status == 403, "{denied:?}");
    let unknown = app.get("/v1/trace/no-such-request", &app.admin).await?;
    ensure!(unknown.status == 404, "{unknown:?}");
    // A request id is looked for since a time (a day ago by default); one
    // with colons is an id like any other.
    let since = app
        .get(
            "/v1/trace/req:with:colons?since=2026-01-01T01:00:00+01:00",
            &app.admin,
        )
        .await?;
    ensure!(
        since.status == 404
            && since.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("req:with:colons (since 2026-01-01T01:00:00+01:00)")),
        "{since:?}"
    );
    let bad = app
        .get(
            "/v1/trace/no-such-request?since=yesterday&depth=2",
            &app.admin,
        )
        .await?;
    let fields: Vec<&str> = bad.body["violations"]
        .as_array()
        .map(|v| v.iter().filter_map(|v| v["field"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        bad.status == 422 && fields == ["?depth", "?since"],
        "{bad:?}"
    );

    let products = app.get("/v1/products", &token).await?;
    ensure!(products.body["items"][0]["available"] == 8, "{products:?}");
    Ok(())
}

#[tokio::test]
async fn a_rotated_signing_key_is_fetched_when_a_token_names_it() -> anyhow::Result<()> {
    let mut app = App::start_with(|c| c.key_refresh_interval = Duration::from_millis(200)).await?;
    let (_, old_token) = app.customer("ada@example.org").await?;
    ensure!(app.get("/v1/me", &old_token).await?.status == 200);

    // Identity restarts with a new key.
    app.stop_worker("identity").await?;
    app.key = SigningKey::generate()?;
    app.start_worker("identity").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_token = app.login("ada@example.org").await?;
    let a = app.get("/v1/me", &new_token).await?;
    ensure!(
        a.status == 200,
        "a token of the new key must be accepted: {a:?}"
    );
    let a = app.get("/v1/me", &old_token).await?;
    ensure!(
        a.status == 401,
        "a token of the retired key must not: {a:?}"
    );
    Ok(())
}

/// The rotation README.md describes: identity first publishes the next
/// key, then signs with it while still publishing the previous one, then
/// drops the previous one, each step a rolling restart (two copies
/// configured differently for a while). Tokens of both keys work
/// throughout; once the previous key is gone and the ingress fetched the
/// keys again, its tokens stop working. A token naming an unknown key makes
/// the ingress fetch the keys at most once a minute here, so only the
/// fetches of keys grown old can teach it a key.
#[tokio::test]
async fn a_key_rotation_in_three_restarts_refuses_no_valid_token() -> anyhow::Result<()> {
    let mut app = App::start_with(|c| {
        c.key_refresh_interval = Duration::from_secs(60);
        c.key_max_age = Duration::from_millis(500);
    })
    .await?;
    let (ada, old_token) = app.customer("ada@example.org").await?;
    async fn me(app: &App, token: &str) -> anyhow::Result<u16> {
        Ok(app.get("/v1/me", token).await?.status)
    }
    ensure!(me(&app, &old_token).await? == 200);
    let old = SigningKey::from_pem(&app.key.to_pem())?;
    let new = SigningKey::generate()?;
    let ada_claims = Claims::new(
        ada,
        Role::Customer,
        "skein",
        "skein-api",
        Duration::from_secs(600),
    );
    // What identity will sign with the next key.
    let next_token = new.issue(&ada_claims)?;

    // 1. The next key is published, not used: a copy with the new settings
    // beside one with the old, then only the new settings.
    app.verifying = Some(new.public_key_pem());
    let verifying = app.verifying.clone();
    app.another_identity(&old, verifying).await?;
    app.stop_worker("identity").await?;
    app.start_worker("identity").await?;
    app.stop_worker("identity-2").await?;
    // Within the keys' maximum age (and a request to notice it) the
    // ingress knows the next key.
    eventually(WAIT, || async {
        (me(&app, &next_token).await.ok()? == 200).then_some(())
    })
    .await
    .context("the ingress never learnt the next key")?;
    ensure!(me(&app, &old_token).await? == 200);

    // 2. Identity signs with the next key and still publishes the old one:
    // while the copies are restarted one by one, tokens of both keys are
    // issued, and both verify whichever copy the ingress asks.
    app.another_identity(&new, Some(old.public_key_pem()))
        .await?;
    let mut tokens = vec![old_token.clone()];
    for _ in 0..4 {
        tokens.push(app.login("ada@example.org").await?);
    }
    app.stop_worker("identity").await?;
    app.key = SigningKey::from_pem(&new.to_pem())?;
    app.verifying = Some(old.public_key_pem());
    app.start_worker("identity").await?;
    app.stop_worker("identity-2").await?;
    let new_token = app.login("ada@example.org").await?;
    tokens.push(new_token.clone());
    for round in 0..3 {
        for (n, token) in tokens.iter().enumerate() {
            let status = me(&app, token).await?;
            ensure!(
                status == 200,
                "round {round}: token {n} got {status} while both keys are published"
            );
        }
        // Past the keys' age: the ingress fetches them again in between.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // 3. The old key is dropped: once the ingress fetched the keys again,
    // its tokens are refused, remembered or not; the new key's are not.
    app.stop_worker("identity").await?;
    app.verifying = None;
    app.start_worker("identity").await?;
    eventually(WAIT, || async {
        (me(&app, &old_token).await.ok()? == 401).then_some(())
    })
    .await
    .context("a token of the dropped key is still accepted")?;
    ensure!(me(&app, &new_token).await? == 200);
    Ok(())
}

/// Keys the ingress could not fetch again for three times their maximum
/// age verify nothing more, remembered tokens included: a key removed while
/// identity was away is not trusted for ever. Identity back, all is well.
#[tokio::test]
async fn keys_not_fetched_again_for_long_verify_nothing_until_identity_answers(
) -> anyhow::Result<()> {
    let mut app = App::start_with(|c| {
        c.key_max_age = Duration::from_secs(1);
        c.key_refresh_interval = Duration::from_millis(200);
    })
    .await?;
    let (_, token) = app.customer("ada@example.org").await?;
    // My orders: a route that needs a token and not identity.
    ensure!(app.get("/v1/orders", &token).await?.status == 200);
    app.stop_worker("identity").await?;
    // Within three maximum ages the keys held still verify.
    let a = app.get("/v1/orders", &token).await?;
    ensure!(a.status == 200, "{a:?}");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let a = app.get("/v1/orders", &token).await?;
    ensure!(
        a.status == 503 && a.header("retry-after").is_some(),
        "keys three maximum ages old verified with identity away: {a:?}"
    );
    app.start_worker("identity").await?;
    eventually(WAIT, || async {
        (app.get("/v1/orders", &token).await.ok()?.status == 200).then_some(())
    })
    .await
    .context("tokens did not verify again once identity was back")?;
    Ok(())
}

// ---- failures ----

#[tokio::test]
async fn a_stopped_service_opens_its_breaker_and_a_restarted_one_closes_it() -> anyhow::Result<()> {
    // A request that reaches the subscription being drained times out.
    let mut app = App::start_with(|c| {
        c.service_timeouts
            .insert("catalog".into(), Duration::from_secs(2));
    })
    .await?;
    let (_, token) = app.customer("ada@example.org").await?;
    ensure!(app.get("/v1/products", &token).await?.status == 200);
    app.stop_worker("catalog").await?;

    // The first failures open the breaker: no responder (503), or a 504
    // when a request still reached the subscription being drained.
    for _ in 0..2 {
        let a = app.get("/v1/products", &token).await?;
        ensure!(
            (a.status == 503 && a.header("retry-after").is_some()) || a.status == 504,
            "{a:?}"
        );
    }
    // Open: answered at once, and the request does not even go out.
    let mut reaching = app.p.bus.client().subscribe("queries.catalog.>").await?;
    app.p.bus.jetstream().query_account().await?;
    let started = Instant::now();
    let a = app.get("/v1/products", &token).await?;
    ensure!(
        a.status == 503 && a.problem() == "service-unavailable",
        "{a:?}"
    );
    ensure!(a.header("retry-after") == Some("1"), "{a:?}");
    ensure!(
        started.elapsed() < Duration::from_secs(1),
        "an open breaker answers at once"
    );
    let sent = drain(&mut reaching, Duration::from_millis(200)).await;
    ensure!(
        sent.is_empty(),
        "{} request(s) went out past an open breaker",
        sent.len()
    );
    drop(reaching);
    let metrics = app.send(Req::new("GET", "/metrics")).await?;
    let text = metrics.body.as_str().unwrap_or("");
    ensure!(
        text.contains("skein_ingress_breaker_state{service=\"catalog\",state=\"open\"} 1"),
        "{text}"
    );
    let health = app.send(Req::new("GET", "/health")).await?;
    ensure!(
        health.status == 503 && health.body["services"]["catalog"]["breaker"] == "open",
        "{health:?}"
    );

    // Commands are still accepted while a service is down.
    let product = Uuid::now_v7();
    let a = app
        .post(
            "/v1/orders",
            &token,
            &json!({"lines": [{"product_id": product, "quantity": 1}]}),
        )
        .await?;
    ensure!(a.status == 202, "{a:?}");

    app.start_worker("catalog").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = app.get("/v1/products", &token).await?;
    ensure!(a.status == 200, "the half-open probe must pass: {a:?}");
    let health = app.send(Req::new("GET", "/health")).await?;
    ensure!(
        health.body["services"]["catalog"]["breaker"] == "closed",
        "{health:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_service_that_does_not_answer_in_time_gets_504() -> anyhow::Result<()> {
    let mut app = App::start_with(|c| {
        c.service_timeouts
            .insert("projector".into(), Duration::from_millis(300));
    })
    .await?;
    app.stop_worker("projector").await?;
    // A copy that takes requests and never answers.
    let _hung = app
        .p
        .bus
        .client()
        .subscribe("queries.projector.dashboard")
        .await?;
    app.p.bus.jetstream().query_account().await?;
    let a = app.get("/v1/dashboard", &app.admin).await?;
    ensure!(a.status == 504 && a.problem() == "timeout", "{a:?}");
    ensure!(
        !a.body["detail"].as_str().unwrap_or("").contains("nats"),
        "{a:?}"
    );
    Ok(())
}

#[tokio::test]
async fn health_turns_503_naming_a_stopped_service_and_200_when_it_is_back() -> anyhow::Result<()> {
    let mut app = App::start().await?;
    let healthy = app.send(Req::new("GET", "/health")).await?;
    ensure!(
        healthy.status == 200 && healthy.body["status"] == "ok",
        "{healthy:?}"
    );
    ensure!(healthy.body["streams"]["COMMANDS"] == true, "{healthy:?}");
    ensure!(
        healthy.body["services"]["orders"]["alive"] == true,
        "{healthy:?}"
    );
    ensure!(
        healthy.body["services"]["orders"]["consumer_lag"].is_i64(),
        "{healthy:?}"
    );

    // Asked by many at once, it asks the services once: an answer serves
    // everyone for a second.
    let mut pings = app.p.bus.client().subscribe("$SRV.PING.orders").await?;
    app.p.bus.client().flush().await?;
    let asking = std::time::Instant::now();
    let asked = futures::future::join_all((0..20).map(|_| app.send(Req::new("GET", "/health"))))
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(asked.iter().all(|a| a.status == 200), "{asked:?}");
    // One check a second at most, however slow the machine.
    let seconds = asking.elapsed().as_secs() as usize;
    let pinged = drain(&mut pings, Duration::from_millis(300)).await.len();
    ensure!(
        pinged <= 2 + seconds,
        "20 health requests pinged orders {pinged} times in {seconds} s"
    );

    app.stop_worker("projector").await?;
    // Once the answer of before is a second old.
    let sick = eventually(WAIT, || async {
        let a = app.send(Req::new("GET", "/health")).await.ok()?;
        (a.status == 503).then_some(a)
    })
    .await
    .context("health never turned 503")?;
    let failing = sick.body["failing"].to_string();
    ensure!(
        failing.contains("service projector: not answering"),
        "{failing}"
    );
    ensure!(!failing.contains("orders"), "{failing}");
    let live = app.send(Req::new("GET", "/health/live")).await?;
    ensure!(live.status == 200);

    app.start_worker("projector").await?;
    let back = eventually(WAIT, || async {
        let a = app.send(Req::new("GET", "/health")).await.ok()?;
        (a.status == 200).then_some(a)
    })
    .await;
    ensure!(back.is_some(), "health never recovered");
    Ok(())
}

#[tokio::test]
async fn with_nats_down_the_ingress_answers_503_and_recovers_with_it() -> anyhow::Result<()> {
    let mut app = App::start().await?;
    let (_, token) = app.customer("ada@example.org").await?;
    let body = json!({"lines": [{"product_id": Uuid::now_v7(), "quantity": 1}]});
    app.p.nats.kill();

    let down = eventually(WAIT, || async {
        let a = app.post("/v1/orders", &token, &body).await.ok()?;
        (a.status == 503).then_some(a)
    })
    .await
    .context("no 503 while NATS is down")?;
    ensure!(
        down.problem() == "bus-unavailable" && down.header("retry-after").is_some(),
        "{down:?}"
    );
    let health = app.send(Req::new("GET", "/health")).await?;
    ensure!(
        health.status == 503 && health.body["nats"] == false,
        "{health:?}"
    );
    ensure!(
        health.body["failing"].to_string().contains("nats"),
        "{health:?}"
    );
    let products = app.send(Req::new("GET", "/v1/products")).await?;
    ensure!(products.status == 503, "{products:?}");

    app.p.nats.start_again().await?;
    let back = eventually(WAIT, || async {
        let a = app.post("/v1/orders", &token, &body).await.ok()?;
        (a.status == 202).then_some(a)
    })
    .await;
    ensure!(
        back.is_some(),
        "orders never accepted again after NATS came back"
    );
    Ok(())
}

/// JetStream does not confirm a command within the publish timeout (the
/// server stalls, as on a slow disk): the ingress says it may still be
/// carried out, not that nothing was accepted, and once the server goes on
/// the order is indeed placed.
#[tokio::test]
async fn a_command_not_confirmed_in_time_is_answered_as_perhaps_carried_out() -> anyhow::Result<()>
{
    let app = App::start_with(|c| c.publish_timeout = Duration::from_millis(500)).await?;
    let (_, token) = app.customer("ada@example.org").await?;
    let product = app.product("sku-1", 100, 10).await?;
    app.p.nats.pause()?;
    let placed = app
        .send(
            Req::new("POST", "/v1/orders")
                .token(&token)
                .header("idempotency-key", "checkout-1")
                .json(&json!({"lines": [{"product_id": product, "quantity": 1}]})),
        )
        .await;
    app.p.nats.resume()?;
    let placed = placed?;
    ensure!(
        placed.status == 503
            && placed.problem() == "bus-unavailable"
            && placed.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("may still be carried out")),
        "{placed:?}"
    );
    let carried_out = eventually(WAIT, || async {
        let mine = app.get("/v1/orders", &token).await.ok()?;
        (mine.body["items"].as_array()?.len() == 1).then_some(())
    })
    .await;
    ensure!(
        carried_out.is_some(),
        "the unconfirmed order was not placed"
    );
    Ok(())
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_log_in_is_limited_harder() -> anyhow::Result<()>
{
    let app = App::start_with(|c| {
        c.rate_limit = RateLimit {
            per_second: 0.01,
            burst: 8,
        };
        c.login_rate_limit = RateLimit {
            per_second: 0.01,
            burst: 3,
        };
    })
    .await?;
    // App::start logged the admin in once: two log-ins left for this IP.
    let login = || {
        app.send(
            Req::new("POST", "/v1/auth/token")
                .json(&json!({"email": ADMIN_EMAIL, "password": PASSWORD})),
        )
    };
    ensure!(login().await?.status == 200);
    ensure!(login().await?.status == 200);
    let limited = login().await?;
    ensure!(
        limited.status == 429 && limited.problem() == "rate-limited",
        "{limited:?}"
    );
    let retry: u64 = limited.header("retry-after").unwrap_or("0").parse()?;
    ensure!((1..=100).contains(&retry), "{limited:?}");

    // Other routes are limited per user, separately.
    let mut statuses = Vec::new();
    for _ in 0..9 {
        statuses.push(app.get("/v1/me", &app.admin).await?.status);
    }
    ensure!(statuses[..8].iter().all(|s| *s == 200), "{statuses:?}");
    ensure!(statuses[8] == 429, "{statuses:?}");
    Ok(())
}

/// Tokens not verified before are charged to their address before their
/// signature is checked: past the address's burst a client sending forged
/// tokens gets 429 without the ingress checking them (the costliest step of
/// a request), while a user whose token was verified before goes on from
/// the same address, limited as that user.
#[tokio::test]
async fn forged_tokens_are_limited_before_their_signature_is_checked() -> anyhow::Result<()> {
    let app = App::start_with(|c| {
        c.rate_limit = RateLimit {
            per_second: 0.01,
            burst: 5,
        };
    })
    .await?;
    ensure!(app.get("/v1/me", &app.admin).await?.status == 200);
    let checks = || async {
        let metrics = app.send(Req::new("GET", "/metrics")).await?;
        let text = metrics.body.as_str().unwrap_or("").to_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("skein_ingress_token_signature_checks_total "))
            .context("no signature-check count in /metrics")?
            .parse::<u64>()
            .context("a count that is not a number")
    };
    let before = checks().await?;
    // The admin's token with its signature changed: a known key id, so
    // one check each and no fetch from identity.
    let (head, signature) = app.admin.rsplit_once('.').context("not a JWT")?;
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let forged = format!("{head}.{flipped}{}", &signature[1..]);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(app.get("/v1/me", &forged).await?.status);
    }
    let refused = statuses.iter().take_while(|s| **s == 401).count();
    ensure!(
        (1..=5).contains(&refused) && statuses[refused..].iter().all(|s| *s == 429),
        "{statuses:?}"
    );
    let checked = checks().await? - before;
    ensure!(
        checked == refused as u64,
        "{checked} signatures checked for {refused} requests let through"
    );
    let me = app.get("/v1/me", &app.admin).await?;
    ensure!(me.status == 200, "{me:?}");
    Ok(())
}

/// Many users behind one address (a NAT, a proxy): anonymous requests that
/// use up the address's bucket do not stop a user's new token, whose check
/// is charged to a bucket of its own.
#[tokio::test]
async fn anonymous_requests_from_a_shared_address_do_not_lock_out_its_users_new_tokens(
) -> anyhow::Result<()> {
    let app = App::start_with(|c| {
        c.rate_limit = RateLimit {
            per_second: 0.01,
            burst: 5,
        };
    })
    .await?;
    let fresh = app.login(ADMIN_EMAIL).await?;
    let mut anonymous = Vec::new();
    for _ in 0..6 {
        anonymous.push(app.send(Req::new("GET", "/v1/me")).await?.status);
    }
    ensure!(anonymous.last() == Some(&429), "{anonymous:?}");
    let me = app.get("/v1/me", &fresh).await?;
    ensure!(me.status == 200, "{me:?}");
    Ok(())
}

/// A user's own profile before the projector has their registration (here
/// a user it will never hear of, with a token identity would sign): 503
/// `not-yet` with `Retry-After`, not 404; an admin asking for that id is
/// told there is no such user.
#[tokio::test]
async fn an_own_profile_not_built_yet_is_503_not_yet() -> anyhow::Result<()> {
    let app = App::start().await?;
    let user = Uuid::now_v7();
    let token = app.key.issue(&Claims::new(
        user,
        Role::Customer,
        "skein",
        "skein-api",
        Duration::from_secs(600),
    ))?;
    let path = format!("/v1/users/{user}/profile");
    let own = app.get(&path, &token).await?;
    ensure!(
        own.status == 503
            && own.header("retry-after") == Some("1")
            && own.body["type"] == "urn:skein:problem:not-yet",
        "{own:?}"
    );
    let admin = app.get(&path, &app.admin).await?;
    ensure!(admin.status == 404, "{admin:?}");
    Ok(())
}

/// An order orders does not know, whose id an ingress minted moments ago
/// (a UUIDv7: the 202 of a placement orders has not handled yet): its read
/// and its cancel are 503 `not-yet` with `Retry-After`, and the cancel
/// publishes nothing. An id minted a minute ago, or one that carries no
/// time (a keyed placement's), is 404 as before.
#[tokio::test]
async fn an_order_moments_after_its_202_is_503_not_yet_not_404() -> anyhow::Result<()> {
    let app = App::start().await?;
    let (_, token) = app.customer("ada@example.org").await?;
    let minted = |ago: Duration| {
        let millis = (std::time::SystemTime::now() - ago)
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        uuid::Builder::from_unix_timestamp_millis(millis, &[7; 10]).into_uuid()
    };
    let mut commands = app.watch_commands().await?;
    let fresh = minted(Duration::ZERO);
    for answer in [
        app.get(&format!("/v1/orders/{fresh}"), &token).await?,
        app.post(&format!("/v1/orders/{fresh}/cancel"), &token, &json!({}))
            .await?,
    ] {
        ensure!(
            answer.status == 503
                && answer.header("retry-after") == Some("1")
                && answer.problem() == "not-yet",
            "{answer:?}"
        );
    }
    for old in [minted(Duration::from_secs(60)), Uuid::new_v4()] {
        for answer in [
            app.get(&format!("/v1/orders/{old}"), &token).await?,
            app.post(&format!("/v1/orders/{old}/cancel"), &token, &json!({}))
                .await?,
        ] {
            ensure!(answer.status == 404, "{answer:?}");
        }
    }
    let published = drain(&mut commands, Duration::from_millis(300)).await;
    ensure!(published.is_empty(), "published {published:?}");
    Ok(())
}

/// A keyed registration retried from another address (a phone that moved
/// networks, behind a proxy that tells clients apart) gets the same account;
/// the same key with another password is still refused.
#[tokio::test]
async fn a_keyed_registration_retried_from_another_address_gets_the_same_account(
) -> anyhow::Result<()> {
    let app = App::start_with(|c| c.trust_forwarded_for = true).await?;
    let register = |from: &'static str, password: &'static str| {
        app.send(
            Req::new("POST", "/v1/auth/register")
                .header("x-forwarded-for", from)
                .header("idempotency-key", "sign-up")
                .json(&json!({"email": "ada@example.org", "password": password, "name": "Ada"})),
        )
    };
    let first = register("203.0.113.7", PASSWORD).await?;
    ensure!(first.status == 201, "{first:?}");
    let again = register("198.51.100.20", PASSWORD).await?;
    ensure!(
        again.status == 201 && again.body["id"] == first.body["id"],
        "{again:?}"
    );
    let other = register("198.51.100.21", "another long password").await?;
    ensure!(other.status == 409, "{other:?}");
    Ok(())
}

/// Behind a proxy (`trust_forwarded_for`), a client's log-ins are limited
/// by the address the proxy appended to `X-Forwarded-For`, whatever the
/// client put before it; clients the proxy tells apart have their own
/// buckets.
#[tokio::test]
async fn behind_a_proxy_log_ins_are_limited_by_the_address_it_appended() -> anyhow::Result<()> {
    let app = App::start_with(|c| {
        c.trust_forwarded_for = true;
        c.login_rate_limit = RateLimit {
            per_second: 0.01,
            burst: 3,
        };
    })
    .await?;
    let login = |forwarded: String| {
        app.send(
            Req::new("POST", "/v1/auth/token")
                .header("x-forwarded-for", &forwarded)
                .json(&json!({"email": ADMIN_EMAIL, "password": "a wrong guess"})),
        )
    };
    let mut statuses = Vec::new();
    for i in 0..4 {
        // A spoofed first hop that changes with every try.
        statuses.push(login(format!("10.9.8.{i}, 203.0.113.7")).await?.status);
    }
    ensure!(statuses == [401, 401, 401, 429], "{statuses:?}");
    // Another client behind the proxy is not limited by the first.
    let other = login("203.0.113.8".to_owned()).await?;
    ensure!(other.status == 401, "{other:?}");
    // Nor is an IPv6 client; fresh addresses of its /64 share its bucket.
    let mut statuses = Vec::new();
    for i in 1..=4 {
        statuses.push(login(format!("2001:db8:7:7::{i}")).await?.status);
    }
    ensure!(statuses == [401, 401, 401, 429], "{statuses:?}");
    Ok(())
}

/// A body that trickles in is answered 408 once `body_timeout` passed; and
/// a client that never finishes its request holds up a shutdown for
/// `shutdown_grace` at most.
#[tokio::test]
async fn a_slow_body_gets_408_and_a_stuck_client_does_not_hold_up_shutdown() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut app = App::start_with(|c| {
        c.body_timeout = Duration::from_secs(1);
        c.shutdown_grace = Duration::from_secs(1);
    })
    .await?;
    let start_body = |addr: SocketAddr| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                b"POST /v1/auth/token HTTP/1.1\r\nhost: localhost\r\n\
                  content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"email\":",
            )
            .await?;
        anyhow::Ok(stream)
    };
    let mut slow = start_body(app.addr).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("body-timeout") {
            let n = slow.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(())
    })
    .await
    .context("no answer to a body that stopped coming")??;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("urn:skein:problem:body-timeout"),
        "{answer}"
    );

    // Half the headers sent, and nothing more: the connection stays busy
    // (no body timeout applies yet); a shutdown closes it after the grace.
    let mut stuck = tokio::net::TcpStream::connect(app.addr).await?;
    stuck
        .write_all(b"POST /v1/auth/token HTTP/1.1\r\nhost: local")
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stop = app.stop.take().context("stop")?;
    let server = app.server.take().context("server")?;
    let stopping = std::time::Instant::now();
    let _ = stop.send(());
    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .context("the ingress did not stop with a client stuck in its request")??;
    served?;
    ensure!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopping took {:?}",
        stopping.elapsed()
    );
    Ok(())
}

/// A client that sends half its headers and stops has its connection
/// closed after `header_timeout`; a request after it is served as usual
/// (keep-alive included).
#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = App::start_with(|c| c.header_timeout = Duration::from_secs(1)).await?;
    let mut slow = tokio::net::TcpStream::connect(app.addr).await?;
    slow.write_all(b"GET /health/live HTTP/1.1\r\nhost: loc")
        .await?;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
        .await
        .context("the connection was still open after 10 s")?;
    // Closed (or answered and closed) once the timeout passed, not before.
    ensure!(
        started.elapsed() >= Duration::from_millis(900),
        "ended with {read:?} after {:?}",
        started.elapsed()
    );
    // Two requests on one connection still work.
    let mut kept = tokio::net::TcpStream::connect(app.addr).await?;
    let mut answers = String::new();
    for _ in 0..2 {
        kept.write_all(b"GET /health/live HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await?;
        let n = tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf)).await??;
        answers.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    ensure!(answers.matches("HTTP/1.1 200").count() == 2, "{answers}");
    Ok(())
}

/// Past `max_connections`, a new connection waits until one closes, and is
/// then served.
#[tokio::test]
async fn connections_past_the_limit_wait_for_one_to_close() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = App::start_with(|c| c.max_connections = 1).await?;
    let request = b"GET /health/live HTTP/1.1\r\nhost: localhost\r\n\r\n";
    let mut buf = [0u8; 1024];
    // Held open (keep-alive) after its answer.
    let mut first = tokio::net::TcpStream::connect(app.addr).await?;
    first.write_all(request).await?;
    let n = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf)).await??;
    ensure!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut second = tokio::net::TcpStream::connect(app.addr).await?;
    second.write_all(request).await?;
    let waited = tokio::time::timeout(Duration::from_secs(1), second.read(&mut buf)).await;
    ensure!(
        waited.is_err(),
        "a second connection was served: {waited:?}"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .context("the waiting connection was not served once the first closed")??;
    ensure!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    Ok(())
}

// ---- documentation and figures ----

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_every_route_is_served() -> anyhow::Result<()> {
    let app = App::start().await?;
    let doc = app.send(Req::new("GET", "/openapi.json")).await?;
    ensure!(
        doc.status == 200 && doc.body["openapi"] == "3.1.0",
        "{doc:?}"
    );
    let paths = doc.body["paths"].as_object().context("paths")?;
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in paths {
        for method in item.as_object().context("path item")?.keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: std::collections::BTreeSet<(String, String)> = skein_ingress::routes::ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    ensure!(
        documented == served,
        "documented {documented:?} != served {served:?}"
    );

    // Every $ref resolves and every schema compiles.
    let text = doc.body.to_string();
    let schemas = doc.body["components"]["schemas"]
        .as_object()
        .context("schemas")?;
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().unwrap_or("");
        ensure!(schemas.contains_key(name), "unresolved $ref {name}");
    }
    for (name, schema) in schemas {
        jsonschema::validator_for(schema).map_err(|e| anyhow::anyhow!("schema {name}: {e}"))?;
    }

    // Every documented route exists (no route-not-found, no 405), and
    // answers what its document says, as it says: a problem where it lists
    // one, JSON matching the schema where it lists that.
    for (method, route) in &documented {
        let path = route.replace("{id}", &Uuid::now_v7().to_string());
        let method: &'static str = if method == "GET" { "GET" } else { "POST" };
        let a = app
            .send(
                Req::new(method, path.clone())
                    .token(&app.admin)
                    .json(&json!({})),
            )
            .await?;
        ensure!(
            a.problem() != "route-not-found" && a.status != 405,
            "{method} {path}: {a:?}"
        );
        let answer = &paths[route][method.to_lowercase()]["responses"][a.status.to_string()];
        let content = answer["content"].as_object().with_context(|| {
            format!(
                "{method} {route} answered {}, undocumented: {a:?}",
                a.status
            )
        })?;
        let given = a.header("content-type").unwrap_or("").to_owned();
        let (documented_type, schema) = content
            .iter()
            .next()
            .context("a documented answer without content")?;
        ensure!(
            given.starts_with(documented_type.as_str()),
            "{method} {route} answered {} as {given}, documented as {documented_type}",
            a.status
        );
        if let Some(name) = schema["schema"]["$ref"]
            .as_str()
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
        {
            let validator = jsonschema::validator_for(&schemas[name])
                .map_err(|e| anyhow::anyhow!("schema {name}: {e}"))?;
            ensure!(
                validator.is_valid(&a.body),
                "{method} {route} answered {} not as {name}: {}",
                a.status,
                a.body
            );
        }
    }
    // Every problem the ingress answers with is documented somewhere.
    let documented_statuses: std::collections::BTreeSet<&str> = paths
        .values()
        .flat_map(|item| item.as_object().into_iter().flat_map(|ops| ops.values()))
        .flat_map(|op| {
            op["responses"]
                .as_object()
                .into_iter()
                .flat_map(|r| r.keys())
        })
        .map(String::as_str)
        .collect();
    for status in [
        "400", "401", "403", "404", "408", "409", "413", "415", "422", "429", "500", "502", "503",
        "504",
    ] {
        ensure!(
            documented_statuses.contains(status),
            "{status} is documented nowhere"
        );
    }
    Ok(())
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_published_commands() -> anyhow::Result<()> {
    let app = App::start().await?;
    let (_, token) = app.customer("ada@example.org").await?;
    app.get("/v1/products", &token).await?;
    app.get("/v1/orders/not-a-uuid", &token).await?;
    app.post(
        "/v1/orders",
        &token,
        &json!({"lines": [{"product_id": Uuid::now_v7(), "quantity": 1}]}),
    )
    .await?;
    // Methods a client makes up count as one series, not one each.
    for method in ["ZZ1", "ZZ2", "BREW"] {
        app.send(Req::new(method, "/no/such/route")).await?;
    }
    let m = app.send(Req::new("GET", "/metrics")).await?;
    ensure!(
        m.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "{m:?}"
    );
    let text = m.body.as_str().unwrap_or("");
    for expected in [
        "skein_ingress_requests_total{method=\"GET\",route=\"/v1/products\",status=\"200\"} 1",
        "skein_ingress_requests_total{method=\"GET\",route=\"/v1/orders/{id}\",status=\"404\"} 1",
        "skein_ingress_requests_total{method=\"POST\",route=\"/v1/orders\",status=\"202\"} 1",
        "skein_ingress_request_duration_seconds_count{route=\"/v1/products\"} 1",
        "skein_ingress_commands_published_total{type=\"orders.place_order.v1\",duplicate=\"false\"} 1",
    ] {
        ensure!(text.contains(expected), "missing {expected} in\n{text}");
    }
    let other: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("skein_ingress_requests_total{method=\"OTHER\""))
        .collect();
    ensure!(
        other.len() == 1 && other[0].ends_with(" 3") && !text.contains("ZZ1"),
        "made-up methods: {other:?} in\n{text}"
    );
    Ok(())
}
