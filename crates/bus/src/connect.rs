//! Connecting to NATS, with credentials and TLS when the server asks for
//! them ([`NatsSecurity`]).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;

use crate::error::{Error, Result};
use crate::publish::Publisher;

/// How to reach NATS.
#[derive(Clone)]
pub struct BusConfig {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Client name shown in the server's connection list.
    pub name: String,
    /// How long to keep retrying the first connection before giving up.
    pub connect_timeout: Duration,
    /// Timeout of JetStream API requests and publish acks.
    pub request_timeout: Duration,
    /// Credentials and TLS.
    pub security: NatsSecurity,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("url", &redact_url(&self.url))
            .field("name", &self.name)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("security", &self.security)
            .finish()
    }
}

impl BusConfig {
    /// Defaults for `url`: retry for 10 s, 10 s request timeout, no
    /// credentials but those in the URL (`nats://user:password@host`).
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            security: NatsSecurity::default(),
        }
    }

    /// Like [`BusConfig::new`], with the security settings of the
    /// environment ([`NatsSecurity::from_env`]): what every skein process
    /// uses.
    pub fn from_env(url: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        Ok(Self {
            security: NatsSecurity::from_env()?,
            ..Self::new(url, name)
        })
    }
}

/// How a connection proves who it is and protects itself, for a server
/// that asks (`authorization` and `tls` in its configuration).
///
/// Credentials: a user and password, or a token; a user and password in the
/// URL (`nats://user:password@host:4222`, percent-encoded) count when none
/// are set here. TLS: the server's certificate is checked against `ca_file`
/// (else the system's roots), and `client_cert` is presented to a server
/// that verifies clients. TLS is used when the server asks for it, the URL
/// is `tls://`, or a CA or client certificate is given.
#[derive(Clone, Default)]
pub struct NatsSecurity {
    /// User and password (`NATS_USER`, `NATS_PASSWORD`).
    pub user_password: Option<(String, String)>,
    /// Token (`NATS_TOKEN`).
    pub token: Option<String>,
    /// PEM certificate(s) of the CA that signs the server's (`NATS_CA`).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate and key of this client (`NATS_CERT`, `NATS_KEY`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for NatsSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSecurity")
            .field("user", &self.user_password.as_ref().map(|(u, _)| u))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl NatsSecurity {
    /// From `NATS_USER` and `NATS_PASSWORD` (both or neither),
    /// `NATS_TOKEN` (not with a user), `NATS_CA`, and `NATS_CERT` and
    /// `NATS_KEY` (both or neither); files must be readable. Empty values
    /// count as unset.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::new(
            var("NATS_USER"),
            var("NATS_PASSWORD"),
            var("NATS_TOKEN"),
            var("NATS_CA"),
            var("NATS_CERT"),
            var("NATS_KEY"),
        )
    }

    /// From the values `from_env` reads, given otherwise (command-line
    /// flags), with the same checks; messages name the variables.
    pub fn new(
        user: Option<String>,
        password: Option<String>,
        token: Option<String>,
        ca: Option<String>,
        cert: Option<String>,
        key: Option<String>,
    ) -> Result<Self> {
        let user_password = match (user, password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => return Err(Error::Security(
                "set both NATS_USER and NATS_PASSWORD (--nats-user, --nats-password), or neither"
                    .into(),
            )),
        };
        if user_password.is_some() && token.is_some() {
            return Err(Error::Security(
                "set NATS_USER and NATS_PASSWORD, or NATS_TOKEN, not both".into(),
            ));
        }
        let readable = |name: &str, path: String| -> Result<PathBuf> {
            std::fs::read(&path).map_err(|e| Error::Security(format!("{name}={path}: {e}")))?;
            Ok(PathBuf::from(path))
        };
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((readable("NATS_CERT", c)?, readable("NATS_KEY", k)?)),
            (None, None) => None,
            _ => {
                return Err(Error::Security(
                    "set both NATS_CERT and NATS_KEY (--nats-cert, --nats-key), or neither".into(),
                ))
            }
        };
        Ok(Self {
            user_password,
            token,
            ca_file: ca.map(|c| readable("NATS_CA", c)).transpose()?,
            client_cert,
        })
    }

    /// `options` with these settings, or with the credentials `from_url`
    /// (of the servers' URLs) when none are set here.
    fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
        from_url: Option<UrlCredentials>,
    ) -> async_nats::ConnectOptions {
        let mut named = None;
        if let Some((user, password)) = &self.user_password {
            options = options.user_and_password(user.clone(), password.clone());
            named = Some(user.clone());
        } else if let Some(token) = &self.token {
            options = options.token(token.clone());
        } else if let Some((user, password)) = from_url {
            options = match password {
                Some(password) => {
                    named = Some(user.clone());
                    options.user_and_password(user, password)
                }
                // `nats://token@host`
                None => options.token(user),
            };
        }
        if let Some(prefix) = named.as_deref().and_then(inbox_prefix) {
            options = options.custom_inbox_prefix(prefix);
        }
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.client_cert {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        options
    }
}

/// Where a client connected as `user` receives its replies:
/// `_INBOX.<user>.`, so that a server can let each user subscribe to its own
/// replies only (`nats/skein-users.conf`). `None` (the usual `_INBOX.`)
/// for a name that is not one subject token.
fn inbox_prefix(user: &str) -> Option<String> {
    skein_message::subject::check_token(user)
        .is_ok()
        .then(|| format!("_INBOX.{user}"))
}

/// A user and password, or a token, from a URL's user info.
type UrlCredentials = (String, Option<String>);

/// The servers without the credentials in their URLs (which the client
/// library would otherwise log with the addresses), and those credentials,
/// percent-decoded: the same in every URL that has any.
fn split_credentials(
    servers: Vec<async_nats::ServerAddr>,
) -> Result<(Vec<async_nats::ServerAddr>, Option<UrlCredentials>)> {
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut found: Option<UrlCredentials> = None;
    let mut bare = Vec::with_capacity(servers.len());
    for server in servers {
        if let Some(user) = server.username() {
            let these = (decode(user), server.password().map(decode));
            if found.as_ref().is_some_and(|f| *f != these) {
                return Err(Error::Security(
                    "the server URLs carry different credentials; give one user (NATS_USER and NATS_PASSWORD) for all".into(),
                ));
            }
            found = Some(these);
        }
        let mut url = server.into_inner();
        let _ = url.set_password(None);
        let _ = url.set_username("");
        bare.push(
            async_nats::ServerAddr::from_url(url).map_err(|source| Error::Url {
                url: "(a server of the list)".into(),
                source,
            })?,
        );
    }
    Ok((bare, found))
}

/// A failed TLS set-up or handshake: the client's TLS settings (a file that
/// cannot be read), or what the handshake refused (a certificate, by
/// either side), which the client library reports as I/O errors of kind
/// `InvalidData`.
fn is_tls_failure(error: &async_nats::ConnectError) -> bool {
    if error.kind() == async_nats::ConnectErrorKind::Tls {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// `url` with the password of each server replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            // The user info starts after the scheme, or at the start
            // (`user:password@host`, which the client library accepts).
            let start = one.find("://").map_or(0, |s| s + 3);
            match one[start..].rfind('@').map(|at| start + at) {
                Some(at) => {
                    let (head, userinfo) = one[..at].split_at(start);
                    match userinfo.split_once(':') {
                        Some((user, _)) => format!("{head}{user}:***{}", &one[at..]),
                        None => format!("{head}***{}", &one[at..]),
                    }
                }
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A connection to NATS with its JetStream context. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    name: String,
}

impl Bus {
    /// Connects, retrying with backoff for up to `config.connect_timeout`.
    ///
    /// Once connected the client reconnects by itself for ever: a broker
    /// restart pauses publishing and consuming, it does not end them.
    pub async fn connect(config: &BusConfig) -> Result<Self> {
        // `a,b,c`: the servers of a cluster; the client picks one and
        // fails over to the others.
        let servers = config
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|source| Error::Url {
                        url: redact_url(u),
                        source,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let (servers, from_url) = split_credentials(servers)?;
        if servers.is_empty() {
            // "" or ",": the client would wait for a server that is never named.
            return Err(Error::Url {
                url: redact_url(&config.url),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no server address given",
                ),
            });
        }
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let mut delay = Duration::from_millis(50);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let options = config
                .security
                .apply(async_nats::ConnectOptions::new(), from_url.clone())
                .name(&config.name)
                .connection_timeout(Duration::from_secs(2))
                .request_timeout(Some(config.request_timeout))
                .max_reconnects(None)
                .event_callback(|event| async move {
                    match event {
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        async_nats::Event::Connected => tracing::info!("connected to NATS"),
                        // A permission refused, or credentials refused on
                        // reconnecting (the server's settings changed).
                        async_nats::Event::ServerError(
                            e @ async_nats::ServerError::AuthorizationViolation,
                        ) => {
                            tracing::warn!(error = %e, "NATS refused the credentials; set NATS_USER and NATS_PASSWORD, or NATS_TOKEN, to what it expects")
                        }
                        async_nats::Event::ServerError(e) => {
                            tracing::warn!(error = %e, "NATS server error")
                        }
                        async_nats::Event::ClientError(e) => {
                            tracing::warn!(error = %e, "NATS client error")
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                });
            match options.connect(servers.as_slice()).await {
                Ok(client) => {
                    let js = jetstream::ContextBuilder::new()
                        .timeout(config.request_timeout)
                        .backpressure_on_inflight(true)
                        .build(client.clone());
                    return Ok(Self {
                        client,
                        js,
                        name: config.name.clone(),
                    });
                }
                Err(source) => {
                    use async_nats::ConnectErrorKind as K;
                    let url = redact_url(&config.url);
                    // Trying again does not change the server's mind.
                    match source.kind() {
                        K::AuthorizationViolation | K::Authentication => {
                            return Err(Error::Auth { url, source })
                        }
                        _ if is_tls_failure(&source) => return Err(Error::Tls { url, source }),
                        _ => {}
                    }
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(Error::Connect {
                            url,
                            attempts,
                            source,
                        });
                    }
                    tracing::debug!(url = %redact_url(&config.url), error = %source, "NATS not reachable yet, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// The core NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The client name this connection was made with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A publisher on this connection.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.js.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_user_gets_replies_under_its_own_inbox_prefix() {
        assert_eq!(inbox_prefix("payments").as_deref(), Some("_INBOX.payments"));
        // Not one subject token: the usual prefix.
        for name in ["", "a.b", "a*", "a>", "a b"] {
            assert_eq!(inbox_prefix(name), None, "{name:?}");
        }
    }

    #[test]
    fn security_settings_come_in_pairs_and_name_readable_files() {
        let some = |v: &str| Some(v.to_owned());
        let refused = |r: Result<NatsSecurity>, says: &str| match r {
            Err(Error::Security(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("expected a refusal naming {says}: {other:?}"),
        };
        refused(
            NatsSecurity::new(some("u"), None, None, None, None, None),
            "NATS_PASSWORD",
        );
        refused(
            NatsSecurity::new(some("u"), some("p"), some("t"), None, None, None),
            "not both",
        );
        refused(
            NatsSecurity::new(None, None, None, None, some("c.pem"), None),
            "NATS_KEY",
        );
        refused(
            NatsSecurity::new(None, None, None, some("/no/such/ca.pem"), None, None),
            "NATS_CA=/no/such/ca.pem",
        );
        let token = NatsSecurity::new(None, None, some("t"), None, None, None);
        assert!(
            matches!(&token, Ok(s) if s.token.as_deref() == Some("t") && s.user_password.is_none()),
            "{token:?}"
        );
        let fine = NatsSecurity::new(some("u"), some("p"), None, None, None, None);
        assert!(
            matches!(&fine, Ok(s) if s.user_password == Some(("u".into(), "p".into()))),
            "{fine:?}"
        );
        assert!(!format!("{fine:?}").contains("\"p\""), "{fine:?}");
    }

    #[test]
    fn passwords_and_tokens_are_left_out_of_urls_shown() {
        assert_eq!(
            redact_url("nats://a:secret@h1:4222, tls://token@h2:4222,nats://h3:4222"),
            "nats://a:***@h1:4222, tls://***@h2:4222,nats://h3:4222"
        );
        assert_eq!(redact_url("a:secret@h1:4222"), "a:***@h1:4222");
        assert_eq!(redact_url("token@h1"), "***@h1");
        assert_eq!(redact_url("h1:4222"), "h1:4222");
    }

    #[tokio::test]
    async fn a_url_list_without_a_server_is_an_invalid_url() {
        for url in ["", ",", " , ,"] {
            let mut config = BusConfig::new(url, "test");
            // Were the list taken as valid, connecting would fail only after this.
            config.connect_timeout = Duration::from_secs(30);
            let started = std::time::Instant::now();
            match Bus::connect(&config).await {
                Err(Error::Url { url: given, source }) => {
                    assert_eq!(given, url);
                    assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput, "{url:?}");
                }
                other => panic!("{url:?}: {other:?}"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{url:?} was tried"
            );
        }
    }
}
