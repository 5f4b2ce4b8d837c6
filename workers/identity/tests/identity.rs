//! The identity worker against a real nats-server, on SQLite and PostgreSQL.

use std::time::Duration;

use anyhow::{bail, ensure};
use skein_auth::{AuthError, SigningKey, Verifier};
use skein_contracts::identity::*;
use skein_contracts::Role;
use skein_identity::{AdminSeed, IdentityConfig, StartError};
use skein_service::testing::{admin, assert_schema, customer, Platform, TestError};
use skein_service::{request, Host, HostConfig, RequestError};
use skein_testkit::{backend_tests, Backend};
use uuid::Uuid;

const PASSWORD: &str = "a long enough password";

fn boxed(e: TestError) -> anyhow::Error {
    anyhow::Error::from_boxed(e)
}

/// The identity worker on its own database, restartable on the same one.
struct Identity {
    p: Platform,
    host: Option<Host>,
}

impl Identity {
    async fn start(backend: Backend, config: IdentityConfig) -> anyhow::Result<Self> {
        let p = Platform::start(backend).await.map_err(boxed)?;
        let mut identity = Self { p, host: None };
        identity.host = Some(identity.try_start(config).await?);
        Ok(identity)
    }

    async fn try_start(&self, config: IdentityConfig) -> Result<Host, anyhow::Error> {
        let store = self.p.store("identity").await.map_err(boxed)?;
        let bus = self.p.connect("identity").await.map_err(boxed)?;
        Ok(skein_identity::start(bus, store, HostConfig::new("identity"), config).await?)
    }

    /// Stops the worker gracefully and starts it again on the same database.
    async fn restart(&mut self, config: IdentityConfig) -> anyhow::Result<()> {
        if let Some(host) = self.host.take() {
            host.shutdown().await;
        }
        self.host = Some(self.try_start(config).await?);
        Ok(())
    }

    async fn register(&self, email: &str) -> Result<User, RequestError> {
        request(
            &self.p.bus,
            &Register {
                email: email.into(),
                password: PASSWORD.into(),
                name: "Ada".into(),
                user_id: None,
            },
        )
        .await
    }

    async fn login(&self, email: &str, password: &str) -> Result<TokenPair, RequestError> {
        request(
            &self.p.bus,
            &IssueToken {
                email: email.into(),
                password: password.into(),
            },
        )
        .await
    }

    async fn logout(&self, token: &str, everywhere: bool) -> Result<Revoked, RequestError> {
        request(
            &self.p.bus,
            &RevokeToken {
                refresh_token: token.into(),
                everywhere,
            },
        )
        .await
    }

    async fn refresh(&self, token: &str) -> Result<TokenPair, RequestError> {
        request(
            &self.p.bus,
            &RefreshToken {
                refresh_token: token.into(),
            },
        )
        .await
    }

    /// A verifier built only from what identity publishes, as the ingress does.
    async fn verifier(&self) -> anyhow::Result<Verifier> {
        let key = request(&self.p.bus, &GetVerificationKey {}).await?;
        ensure!(key.algorithm == "EdDSA" && key.issuer == "skein" && key.audience == "skein-api");
        Ok(Verifier::new(&key)?)
    }

    /// Every `user_registered` so far, after checking each against its schema.
    async fn registrations(&self) -> anyhow::Result<Vec<UserRegistered>> {
        let mut out = Vec::new();
        for envelope in self.p.envelopes("events.identity.>").await.map_err(boxed)? {
            assert_schema(&envelope).map_err(boxed)?;
            out.push(envelope.decode::<UserRegistered>()?);
        }
        Ok(out)
    }

    /// Registers a marker user and waits for its event: the relay publishes
    /// in commit order, so every event committed before it is out too.
    async fn registrations_settled(&self) -> anyhow::Result<Vec<UserRegistered>> {
        let marker = self
            .register(&format!("marker-{}@example.org", Uuid::now_v7()))
            .await?;
        self.p
            .wait_events::<UserRegistered>(&marker.id.to_string(), 1)
            .await
            .map_err(boxed)?;
        let all = self.registrations().await?;
        Ok(all.into_iter().filter(|e| e.user_id != marker.id).collect())
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            host.abort();
        }
    }
}

/// The status and message of a refused request; fails if it was not refused.
fn refused<T: std::fmt::Debug>(answer: Result<T, RequestError>) -> anyhow::Result<(u16, String)> {
    match answer {
        Err(RequestError::Service(e)) => Ok((e.status, e.message)),
        Err(other) => bail!("expected a refusal, got {other}"),
        Ok(reply) => bail!("expected a refusal, got {reply:?}"),
    }
}

async fn registering_creates_a_customer_and_announces_it_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    let user = id.register("Ada.Lovelace@Example.org").await?;
    ensure!(
        user.email == "ada.lovelace@example.org" && user.role == Role::Customer,
        "{user:?}"
    );
    ensure!(user.name == "Ada" && !user.created_at.is_empty());
    let events =
        id.p.wait_events::<UserRegistered>(&user.id.to_string(), 1)
            .await
            .map_err(boxed)?;
    ensure!(
        events[0]
            == UserRegistered {
                user_id: user.id,
                email: "ada.lovelace@example.org".into(),
                name: "Ada".into(),
                role: Role::Customer,
            },
        "{events:?}"
    );

    for twin in ["ada.lovelace@example.org", "ADA.LOVELACE@EXAMPLE.ORG"] {
        let (status, message) = refused(id.register(twin).await)?;
        ensure!(
            status == 409 && message == "email already registered",
            "{status} {message}"
        );
    }
    let registered = id.registrations_settled().await?;
    ensure!(
        registered.len() == 1 && registered[0].user_id == user.id,
        "a duplicate was announced: {registered:?}"
    );
    Ok(())
}

/// A registration asked again with the id it was given (a client's retry
/// under one `Idempotency-Key`, through another ingress copy) answers the
/// same user and announces nothing more; the same email with another id,
/// name or password is still taken.
async fn a_registration_asked_again_with_its_id_answers_the_same_user(
    backend: Backend,
) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    let user_id = Uuid::now_v7();
    let registration = Register {
        email: "Grace@Example.org".into(),
        password: PASSWORD.into(),
        name: "Grace".into(),
        user_id: Some(user_id),
    };
    let first = request(&id.p.bus, &registration).await?;
    ensure!(first.id == user_id, "{first:?}");
    let again = request(&id.p.bus, &registration).await?;
    ensure!(
        again == first,
        "the repeat answered {again:?}, not {first:?}"
    );
    for other in [
        Register {
            user_id: None,
            ..registration.clone()
        },
        Register {
            user_id: Some(Uuid::now_v7()),
            ..registration.clone()
        },
        Register {
            name: "Someone else".into(),
            ..registration.clone()
        },
        Register {
            password: "another long password".into(),
            ..registration.clone()
        },
    ] {
        let (status, message) = refused(request(&id.p.bus, &other).await)?;
        ensure!(
            status == 409 && message == "email already registered",
            "{other:?}: {status} {message}"
        );
    }
    // Another email asking for the same id: refused as a conflict, not a
    // failure, and nothing stored.
    let (status, message) = refused(
        request(
            &id.p.bus,
            &Register {
                email: "someone@example.org".into(),
                ..registration.clone()
            },
        )
        .await,
    )?;
    ensure!(
        status == 409 && message == format!("user id {user_id} is taken by another email"),
        "{status} {message}"
    );
    let registered = id.registrations_settled().await?;
    ensure!(
        registered.len() == 1 && registered[0].user_id == user_id,
        "announced: {registered:?}"
    );
    Ok(())
}

async fn invalid_registrations_name_every_bad_field_and_store_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    let valid = Register {
        email: "eve@example.org".into(),
        password: PASSWORD.into(),
        name: "Eve".into(),
        user_id: None,
    };
    let cases = [
        (
            Register {
                email: "not-an-email".into(),
                ..valid.clone()
            },
            vec!["/email"],
        ),
        (
            Register {
                password: "short".into(),
                ..valid.clone()
            },
            vec!["/password"],
        ),
        (
            Register {
                name: "  ".into(),
                ..valid.clone()
            },
            vec!["/name"],
        ),
        (
            Register {
                email: "eve@".into(),
                password: "123456789".into(),
                name: String::new(),
                user_id: None,
            },
            vec!["/email", "/password", "/name"],
        ),
    ];
    for (bad, fields) in cases {
        let (status, message) = refused(request(&id.p.bus, &bad).await)?;
        ensure!(status == 400, "{status} {message}");
        for field in ["/email", "/password", "/name"] {
            ensure!(
                message.contains(field) == fields.contains(&field),
                "{bad:?} answered {message:?}"
            );
        }
    }

    // An unknown field is refused before any handler runs, and named.
    let raw = id
        .p
        .bus
        .client()
        .request(
            "queries.identity.register",
            r#"{"email":"eve@example.org","password":"a long enough password","name":"Eve","role":"admin"}"#
                .into(),
        )
        .await?;
    let header = |name: &str| {
        raw.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    ensure!(header("Nats-Service-Error-Code") == "400");
    ensure!(
        header("Nats-Service-Error").contains("unknown field `role`"),
        "{}",
        header("Nats-Service-Error")
    );

    // Nothing was stored: no login, no event, and the email is still free.
    let (status, _) = refused(id.login("eve@example.org", PASSWORD).await)?;
    ensure!(status == 401);
    ensure!(id.registrations().await?.is_empty(), "an event was emitted");
    let eve = request(&id.p.bus, &valid).await?;
    ensure!(eve.email == "eve@example.org");
    Ok(())
}

async fn a_login_token_verifies_with_the_published_key_and_bad_logins_look_alike(
    backend: Backend,
) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    let bob = id.register("bob@example.org").await?;
    let tokens = id.login("Bob@Example.org", PASSWORD).await?;
    ensure!(tokens.token_type == "Bearer" && tokens.expires_in == 900);
    ensure!(!tokens.refresh_token.is_empty() && tokens.refresh_token != tokens.access_token);
    let claims = id.verifier().await?.verify(&tokens.access_token)?;
    ensure!(
        claims.sub == bob.id && claims.role == Role::Customer,
        "{claims:?}"
    );
    ensure!(claims.iss == "skein" && claims.aud == "skein-api");
    ensure!(claims.exp - claims.iat == 900, "{claims:?}");

    let (wrong_status, wrong_password) =
        refused(id.login("bob@example.org", "not bob's password").await)?;
    let (unknown_status, unknown_email) = refused(id.login("nobody@example.org", PASSWORD).await)?;
    ensure!(wrong_status == 401 && unknown_status == 401);
    ensure!(
        wrong_password == "invalid email or password" && unknown_email == wrong_password,
        "{wrong_password:?} vs {unknown_email:?}"
    );
    let (status, _) = refused(id.login("bob@example.org", &"x".repeat(100_000)).await)?;
    ensure!(status == 401);

    // A token signed by anyone else is refused by the published key.
    let forged = SigningKey::generate()?.issue(&claims)?;
    ensure!(matches!(
        id.verifier().await?.verify(&forged),
        Err(AuthError::UnknownKey)
    ));
    Ok(())
}

async fn a_refresh_token_works_once_and_its_reuse_ends_the_login(
    backend: Backend,
) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    let cy = id.register("cy@example.org").await?;
    let first = id.login("cy@example.org", PASSWORD).await?;
    let second = id.refresh(&first.refresh_token).await?;
    ensure!(second.refresh_token != first.refresh_token);
    ensure!(second.token_type == "Bearer" && second.expires_in == 900);
    let verifier = id.verifier().await?;
    let claims = verifier.verify(&second.access_token)?;
    ensure!(claims.sub == cy.id && claims.role == Role::Customer);
    let third = id.refresh(&second.refresh_token).await?;

    // The rotated-out token no longer works ...
    let (status, message) = refused(id.refresh(&first.refresh_token).await)?;
    ensure!(status == 401, "{status} {message}");
    // ... and presenting it revoked the whole login, the newest token too.
    let (status, _) = refused(id.refresh(&third.refresh_token).await)?;
    ensure!(
        status == 401,
        "the login survived the reuse of a refresh token"
    );

    // Another login is unaffected; unknown tokens are refused.
    let other = id.login("cy@example.org", PASSWORD).await?;
    let (status, _) = refused(id.refresh("made-up").await)?;
    ensure!(status == 401);
    let (status, _) = refused(id.refresh("").await)?;
    ensure!(status == 401);

    // While another transaction holds identity's writes (SQLite's write
    // lock; on PostgreSQL a lock on the tokens that lets reads through),
    // made-up tokens are still refused at once: they take no write lock,
    // which anyone could otherwise keep busy.
    let store = id.p.store("identity").await.map_err(boxed)?;
    let mut holder = store.pool().begin().await?;
    let hold = match backend {
        Backend::Sqlite => {
            "INSERT INTO refresh_tokens (hash, family, user_id, created_at, expires_at) \
                            SELECT 'held', family, user_id, 0, 0 FROM refresh_tokens LIMIT 1"
        }
        Backend::Postgres => "LOCK TABLE refresh_tokens IN EXCLUSIVE MODE",
    };
    sqlx::query(hold).execute(&mut *holder).await?;
    let made_up = tokio::time::timeout(Duration::from_secs(3), id.refresh("made-up")).await;
    holder.rollback().await?;
    let (status, _) = refused(
        made_up
            .map_err(|_| anyhow::anyhow!("a made-up refresh token waited for the write lock"))?,
    )?;
    ensure!(status == 401);

    // Of concurrent refreshes with one token, exactly one wins.
    let answers = refresh_four_at_once(&id, &other.refresh_token).await;
    let won = answers.iter().filter(|a| a.is_ok()).count();
    ensure!(
        won == 1,
        "{won} concurrent refreshes succeeded: {answers:?}"
    );
    for lost in answers.into_iter().filter(|a| a.is_err()) {
        ensure!(refused(lost)?.0 == 401);
    }
    Ok(())
}

/// A log-out ends its login (the token presented, and the newer token
/// refreshed from it) and no other; with `everywhere`, every login of the
/// user, and only from a token that still works; another user's logins and
/// made-up tokens are left alone.
async fn a_logout_ends_its_login_and_everywhere_ends_every_login(
    backend: Backend,
) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    id.register("cy@example.org").await?;
    id.register("di@example.org").await?;
    let phone = id.login("cy@example.org", PASSWORD).await?;
    let laptop = id.login("cy@example.org", PASSWORD).await?;
    let tablet = id.login("cy@example.org", PASSWORD).await?;
    let di = id.login("di@example.org", PASSWORD).await?;

    // The phone logs out with a token it has since refreshed: its login
    // (both tokens) ends, the laptop's does not.
    let newer = id.refresh(&phone.refresh_token).await?;
    let out = id.logout(&phone.refresh_token, false).await?;
    ensure!(out.revoked == 1, "{out:?}");
    ensure!(refused(id.refresh(&newer.refresh_token).await)?.0 == 401);
    let laptop = id.refresh(&laptop.refresh_token).await?;
    // Done again, or with a token never issued: nothing more, no error.
    ensure!(id.logout(&phone.refresh_token, false).await?.revoked == 0);
    ensure!(id.logout("made-up", false).await?.revoked == 0);

    // A token exchanged for a newer one does not log its user out
    // everywhere.
    let (status, message) = refused(id.logout(&phone.refresh_token, true).await)?;
    ensure!(
        status == 401 && message.contains("exchanged for a newer one"),
        "{message}"
    );
    let stale = laptop.refresh_token.clone();
    let laptop = id.refresh(&laptop.refresh_token).await?;
    ensure!(refused(id.logout(&stale, true).await)?.0 == 401);

    // Everywhere: the laptop's and the tablet's logins end, di's does not;
    // a repeat (its answer lost, say) is answered as done.
    let out = id.logout(&laptop.refresh_token, true).await?;
    ensure!(out.revoked == 2, "{out:?}");
    ensure!(refused(id.refresh(&laptop.refresh_token).await)?.0 == 401);
    ensure!(refused(id.refresh(&tablet.refresh_token).await)?.0 == 401);
    ensure!(id.logout(&laptop.refresh_token, true).await?.revoked == 0);
    id.refresh(&di.refresh_token).await?;
    // Logging in again works, and a copy of a revoked token (left on a
    // shared computer, or a thief's whose theft ended its log-in) does not
    // end the log-ins made since.
    let again = id.login("cy@example.org", PASSWORD).await?;
    ensure!(id.logout(&laptop.refresh_token, true).await?.revoked == 0);
    ensure!(id.logout(&tablet.refresh_token, false).await?.revoked == 0);
    id.refresh(&again.refresh_token).await?;
    Ok(())
}

/// A log-out and a refresh of the same log-in at once: whichever comes
/// first, no token of that log-in works afterwards.
async fn a_logout_racing_a_refresh_leaves_no_working_token(backend: Backend) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    id.register("eve@example.org").await?;
    for round in 0..20 {
        let pair = id.login("eve@example.org", PASSWORD).await?;
        let (refreshed, out) = tokio::join!(
            id.refresh(&pair.refresh_token),
            id.logout(&pair.refresh_token, false)
        );
        out?;
        if let Ok(newer) = refreshed {
            ensure!(
                refused(id.refresh(&newer.refresh_token).await)?.0 == 401,
                "round {round}: the token of a refresh racing the log-out still works"
            );
        }
    }
    Ok(())
}

/// A registration asked over NATS with a malformed `traceparent` (a
/// request sent by hand): its `user_registered` carries none, and a
/// well-formed one is continued.
async fn a_query_s_malformed_traceparent_is_not_carried_into_its_events(
    backend: Backend,
) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for (email, sent, kept) in [
        ("bad@example.org", "not-a-trace", None),
        ("good@example.org", good, Some(good)),
    ] {
        let mut context = skein_message::MessageContext::with_correlation("req-1".to_owned());
        context.traceparent = Some(sent.into());
        let user = skein_service::request_in(
            &id.p.bus,
            &Register {
                email: email.into(),
                password: PASSWORD.into(),
                name: "Tracy".into(),
                user_id: None,
            },
            Some(&context),
            Duration::from_secs(5),
        )
        .await?;
        id.p.wait_events::<UserRegistered>(&user.id.to_string(), 1)
            .await
            .map_err(boxed)?;
        // The header as stored (reading an envelope would drop a bad one).
        let stored = skein_bus::replay::read(
            &id.p.bus,
            skein_bus::provision::EVENTS,
            &format!("events.identity.{}.>", user.id),
            skein_bus::replay::StartAt::Beginning,
        )
        .await?;
        let traceparents: Vec<Option<String>> = stored
            .iter()
            .map(|m| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get("traceparent"))
                    .map(|v| v.as_str().to_owned())
            })
            .collect();
        ensure!(
            traceparents == [kept.map(str::to_owned)],
            "{sent}: {traceparents:?}"
        );
    }
    Ok(())
}

/// Four refreshes with the same token at once.
async fn refresh_four_at_once(id: &Identity, token: &str) -> Vec<Result<TokenPair, RequestError>> {
    let (a, b, c, d) = tokio::join!(
        id.refresh(token),
        id.refresh(token),
        id.refresh(token),
        id.refresh(token)
    );
    vec![a, b, c, d]
}

async fn users_see_themselves_and_admins_see_everyone(backend: Backend) -> anyhow::Result<()> {
    let id = Identity::start(backend, IdentityConfig::default()).await?;
    let dee = id.register("dee@example.org").await?;
    let me = request(
        &id.p.bus,
        &GetUser {
            caller: customer(dee.id),
            user_id: dee.id,
        },
    )
    .await?;
    ensure!(me == dee, "{me:?} != {dee:?}");
    let seen = request(
        &id.p.bus,
        &GetUser {
            caller: admin(),
            user_id: dee.id,
        },
    )
    .await?;
    ensure!(seen == dee);

    let stranger = customer(Uuid::now_v7());
    let (status, _) = refused(
        request(
            &id.p.bus,
            &GetUser {
                caller: stranger.clone(),
                user_id: dee.id,
            },
        )
        .await,
    )?;
    ensure!(status == 403);
    // Whether the user exists is not told to a stranger either.
    let (status, _) = refused(
        request(
            &id.p.bus,
            &GetUser {
                caller: stranger,
                user_id: Uuid::now_v7(),
            },
        )
        .await,
    )?;
    ensure!(status == 403);
    let (status, _) = refused(
        request(
            &id.p.bus,
            &GetUser {
                caller: admin(),
                user_id: Uuid::now_v7(),
            },
        )
        .await,
    )?;
    ensure!(status == 404);
    Ok(())
}

async fn the_admin_is_seeded_once_and_the_key_survives_a_restart(
    backend: Backend,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = IdentityConfig {
        key_dir: Some(dir.path().join("keys")),
        access_ttl: Duration::from_secs(120),
        admin: Some(AdminSeed {
            email: "Root@Example.org".into(),
            password: "root password 123".into(),
            name: "Root".into(),
        }),
        ..IdentityConfig::default()
    };
    let mut id = Identity::start(backend, config.clone()).await?;
    let key_file = dir.path().join("keys").join(skein_identity::keys::KEY_FILE);
    ensure!(key_file.exists(), "no key file in the key directory");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "the key file has mode {mode:o}");
    }
    let tokens = id.login("root@example.org", "root password 123").await?;
    ensure!(tokens.expires_in == 120);
    let claims = id.verifier().await?.verify(&tokens.access_token)?;
    ensure!(claims.role == Role::Admin && claims.exp - claims.iat == 120);
    let key_before = request(&id.p.bus, &GetVerificationKey {}).await?;

    id.restart(config.clone()).await?;
    id.restart(config).await?;
    let key_after = request(&id.p.bus, &GetVerificationKey {}).await?;
    ensure!(
        key_after == key_before,
        "the signing key changed across a restart"
    );
    let still = id.verifier().await?.verify(&tokens.access_token)?;
    ensure!(
        still.sub == claims.sub,
        "a token from before the restart no longer verifies"
    );
    ensure!(id.refresh(&tokens.refresh_token).await.is_ok());
    ensure!(id
        .login("root@example.org", "root password 123")
        .await
        .is_ok());

    let registered = id.registrations_settled().await?;
    ensure!(
        registered
            == vec![UserRegistered {
                user_id: claims.sub,
                email: "root@example.org".into(),
                name: "Root".into(),
                role: Role::Admin,
            }],
        "the admin was not announced exactly once: {registered:?}"
    );
    Ok(())
}

async fn a_configured_key_is_used_and_bad_settings_refuse_to_start(
    backend: Backend,
) -> anyhow::Result<()> {
    let key = SigningKey::generate()?;
    let config = IdentityConfig {
        signing_key_pem: Some(key.to_pem()),
        ..IdentityConfig::default()
    };
    let id = Identity::start(backend, config).await?;
    let published = request(&id.p.bus, &GetVerificationKey {}).await?;
    ensure!(published == key.verification_key("skein", "skein-api"));
    id.register("fay@example.org").await?;
    let tokens = id.login("fay@example.org", PASSWORD).await?;
    let local = Verifier::new(&key.verification_key("skein", "skein-api"))?;
    ensure!(local.verify(&tokens.access_token).is_ok());

    let bad_settings = [
        IdentityConfig {
            access_ttl: Duration::ZERO,
            ..IdentityConfig::default()
        },
        IdentityConfig {
            signing_key_pem: Some("not a key".into()),
            ..IdentityConfig::default()
        },
        IdentityConfig {
            admin: Some(AdminSeed {
                email: "root@example.org".into(),
                password: "s3cr3t!".into(),
                name: "Root".into(),
            }),
            ..IdentityConfig::default()
        },
    ];
    for config in bad_settings {
        let started = id.try_start(config).await;
        let Err(e) = started else {
            bail!("started with bad settings");
        };
        ensure!(
            matches!(
                e.downcast_ref::<StartError>(),
                Some(StartError::Config(_) | StartError::Key(_) | StartError::Admin(_))
            ),
            "{e:#}"
        );
        ensure!(
            !format!("{e:#}").contains("s3cr3t"),
            "a password in an error: {e:#}"
        );
    }
    Ok(())
}

backend_tests!(
    registering_creates_a_customer_and_announces_it_once,
    a_registration_asked_again_with_its_id_answers_the_same_user,
    invalid_registrations_name_every_bad_field_and_store_nothing,
    a_login_token_verifies_with_the_published_key_and_bad_logins_look_alike,
    a_refresh_token_works_once_and_its_reuse_ends_the_login,
    a_logout_ends_its_login_and_everywhere_ends_every_login,
    a_logout_racing_a_refresh_leaves_no_working_token,
    a_query_s_malformed_traceparent_is_not_carried_into_its_events,
    users_see_themselves_and_admins_see_everyone,
    the_admin_is_seeded_once_and_the_key_survives_a_restart,
    a_configured_key_is_used_and_bad_settings_refuse_to_start,
);

/// `skein-identity` reads its settings as every skein process does: an
/// empty one is unset (an empty admin password is no password, and the
/// admin's e-mail alone is refused before anything starts). (White space
/// around a number: the next test.)
#[tokio::test]
async fn the_binary_takes_an_empty_setting_as_unset() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein-identity"))
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env(
            "DATABASE_URL",
            format!("sqlite:{}/identity.db", dir.path().display()),
        )
        .env("SKEIN_KEY_DIR", dir.path())
        .env("SKEIN_ADMIN_EMAIL", "admin@example.org")
        .env("SKEIN_ADMIN_PASSWORD", "")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output).await??;
    let said = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success()
            && said.contains("set both SKEIN_ADMIN_EMAIL and SKEIN_ADMIN_PASSWORD, or neither"),
        "{}: {said}",
        output.status
    );
    Ok(())
}

/// One HTTP/1.1 GET on a fresh connection: the status and the body.
async fn get(port: u16, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, serde_json::from_str(body).unwrap_or_default()))
}

/// The worker's own binary answers its health endpoint from before it
/// reaches NATS: live and not ready (`starting`) while the server does not
/// answer, ready once it does and the worker runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_answers_its_health_endpoint_while_it_starts() -> anyhow::Result<()> {
    let nats = skein_testkit::NatsServer::start().await?;
    nats.pause()?;
    let dir = tempfile::tempdir()?;
    let port = skein_testkit::free_port()?;
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein-identity"))
        .env("NATS_URL", nats.url())
        .env(
            "DATABASE_URL",
            format!("sqlite:{}/identity.db", dir.path().display()),
        )
        .env("SKEIN_KEY_DIR", dir.path())
        .env("SKEIN_HEALTH_HTTP", format!("127.0.0.1:{port}"))
        // White space around a number is no error.
        .env("SKEIN_ACCESS_TTL_SECS", " 900 ")
        .env_remove("SKEIN_ADMIN_EMAIL")
        .env_remove("SKEIN_ADMIN_PASSWORD")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let live = skein_testkit::eventually(Duration::from_secs(20), || async {
        get(port, "/health/live").await.ok()
    })
    .await;
    let ready = get(port, "/health/ready").await;
    nats.resume()?;
    let (code, live) = live.ok_or_else(|| anyhow::anyhow!("no answer while starting"))?;
    ensure!(
        code == 200 && live["status"] == "starting",
        "live: {code} {live}"
    );
    let (code, ready) = ready?;
    ensure!(
        code == 503 && ready["failing"] == serde_json::json!(["starting"]),
        "ready: {code} {ready}"
    );
    skein_testkit::eventually(Duration::from_secs(30), || async {
        get(port, "/health/ready")
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("the worker never became ready"))?;
    worker.start_kill()?;
    Ok(())
}
