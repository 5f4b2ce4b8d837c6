//! `compose.yaml` against the Compose specification and against the `skein`
//! binary it runs: the file must be valid Compose, and every subcommand,
//! flag, worker name and `SKEIN_*` / `NATS_*` / `DATABASE_URL` variable it
//! gives a skein container must be one that `skein <sub> --help` lists; the
//! NATS nodes' configurations must be valid and let in the user skein.
//!
//! The schema is vendored in `deploy/compose-spec.json` (where it came from:
//! `deploy/README.md`). Nothing here runs Docker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn compose_yaml() -> anyhow::Result<Value> {
    let path = repo_file("compose.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_saphyr::from_str(&text).context("compose.yaml is not valid YAML")
}

fn compose_spec() -> anyhow::Result<jsonschema::Validator> {
    let path = repo_file("deploy/compose-spec.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let schema: Value = serde_json::from_str(&text).context("the schema is not JSON")?;
    // Formats stay unchecked: the specification's `duration` is Go's ("5s"),
    // not the ISO 8601 one JSON Schema means by that name.
    jsonschema::options()
        .should_validate_formats(false)
        .build(&schema)
        .map_err(|e| anyhow::anyhow!("the Compose schema does not compile: {e}"))
}

fn schema_errors(validator: &jsonschema::Validator, document: &Value) -> Vec<String> {
    validator
        .iter_errors(document)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// A way to break a service, and what it is called.
type Breakage = (&'static str, fn(&mut Value));

fn service_mut<'a>(document: &'a mut Value, name: &str) -> anyhow::Result<&'a mut Value> {
    document
        .get_mut("services")
        .and_then(|s| s.get_mut(name))
        .with_context(|| format!("compose.yaml has no service {name}"))
}

#[test]
fn compose_yaml_follows_the_compose_specification() -> anyhow::Result<()> {
    let validator = compose_spec()?;
    let compose = compose_yaml()?;
    let errors = schema_errors(&validator, &compose);
    ensure!(
        errors.is_empty(),
        "compose.yaml breaks the Compose specification:\n{}",
        errors.join("\n")
    );

    // The check can fail: copies broken in three ways are refused.
    let breakages: [Breakage; 3] = [
        ("replicas as a word", |s| {
            s["deploy"] = json!({"replicas": "two"})
        }),
        ("an unknown service key", |s| s["replica"] = json!(2)),
        ("an unknown depends_on condition", |s| {
            s["depends_on"]["streams"]["condition"] = json!("service_finished")
        }),
    ];
    for (what, breakage) in breakages {
        let mut broken = compose.clone();
        breakage(service_mut(&mut broken, "orders")?);
        ensure!(
            !schema_errors(&validator, &broken).is_empty(),
            "a compose.yaml with {what} passed the schema"
        );
    }
    Ok(())
}

/// The help texts of the `skein` binary, asked once per subcommand.
#[derive(Default)]
struct Cli {
    help: HashMap<Vec<String>, String>,
}

impl Cli {
    fn help(&mut self, path: &[String]) -> anyhow::Result<&str> {
        if !self.help.contains_key(path) {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_skein"))
                .args(path)
                .arg("--help")
                // No [env: X=value] from the test's environment in the text.
                .env_clear()
                .output()
                .context("cannot run skein")?;
            ensure!(
                output.status.success(),
                "skein {} --help failed: {}",
                path.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
            let text = String::from_utf8(output.stdout).context("help is not UTF-8")?;
            self.help.insert(path.to_vec(), text);
        }
        Ok(self.help.get(path).map(String::as_str).unwrap_or_default())
    }
}

/// The names under "Commands:" in a help text.
fn subcommands(help: &str) -> Vec<String> {
    section(help, "Commands:")
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The lines of a help section, up to the next blank line.
fn section<'a>(help: &'a str, title: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    help.lines()
        .skip_while(move |l| l.trim() != title)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
}

/// Every `--flag` a help text lists, and whether it takes a value.
fn flags(help: &str) -> HashMap<String, bool> {
    let mut flags = HashMap::new();
    for line in help.lines().map(str::trim_start) {
        if !line.starts_with('-') {
            continue;
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        for (i, token) in tokens.iter().enumerate() {
            let token = token.trim_end_matches(',');
            if token.starts_with("--") {
                let takes_value = tokens.get(i + 1).is_some_and(|t| t.starts_with('<'));
                flags.insert(token.to_owned(), takes_value);
                break;
            }
        }
    }
    flags
}

/// The values the positional arguments accept, when the help lists them.
fn possible_values(help: &str) -> Option<Vec<String>> {
    let mut values = Vec::new();
    let mut listed = false;
    for line in section(help, "Arguments:") {
        if let Some((_, rest)) = line.split_once("[possible values: ") {
            listed = true;
            let list = rest.split(']').next().unwrap_or_default();
            values.extend(list.split(", ").map(|v| v.trim().to_owned()));
        }
    }
    listed.then_some(values)
}

/// A variable the binary reads (the others are left to other programs).
fn is_skein_variable(name: &str) -> bool {
    name.starts_with("SKEIN_") || name.starts_with("NATS_") || name == "DATABASE_URL"
}

/// Variable names set in a service's `environment` (mapping or list form).
fn environment_names(service: &Value) -> Vec<String> {
    match service.get("environment") {
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|i| i.split('=').next().unwrap_or_default().to_owned())
            .collect(),
        _ => Vec::new(),
    }
}

/// The services that run the skein image.
fn skein_services(compose: &Value) -> Vec<(&String, &Value)> {
    compose["services"]
        .as_object()
        .map(|s| {
            s.iter()
                .filter(|(_, service)| {
                    service["image"]
                        .as_str()
                        .is_some_and(|i| i.starts_with("skein"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What in `compose` the binary would not accept: unknown subcommands,
/// flags, worker names and variables.
fn cli_problems(compose: &Value, cli: &mut Cli) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for (name, service) in skein_services(compose) {
        let Some(command) = service["command"].as_array() else {
            problems.push(format!("{name}: command must be a list"));
            continue;
        };
        let args: Vec<String> = command
            .iter()
            .map(|a| {
                a.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| a.to_string())
            })
            .collect();
        // The subcommand path: as long as the next word is a subcommand.
        let mut path: Vec<String> = Vec::new();
        let mut rest = args.as_slice();
        while let Some((word, tail)) = rest.split_first() {
            if word.starts_with('-') || !subcommands(cli.help(&path)?).contains(word) {
                break;
            }
            path.push(word.clone());
            rest = tail;
        }
        if path.is_empty() {
            problems.push(format!(
                "{name}: {:?} is not a skein subcommand",
                args.first()
            ));
            continue;
        }
        let help = cli.help(&path)?.to_owned();
        if !subcommands(&help).is_empty() {
            problems.push(format!(
                "{name}: `skein {}` needs a subcommand",
                path.join(" ")
            ));
        }
        let known = flags(&help);
        let mut positionals = Vec::new();
        let mut words = rest.iter();
        while let Some(word) = words.next() {
            if word.starts_with("--") {
                let (flag, inline_value) = match word.split_once('=') {
                    Some((flag, _)) => (flag, true),
                    None => (word.as_str(), false),
                };
                match known.get(flag) {
                    None => problems.push(format!(
                        "{name}: `skein {}` has no flag {flag}",
                        path.join(" ")
                    )),
                    Some(true) if !inline_value => {
                        if words.next().is_none() {
                            problems.push(format!("{name}: {flag} needs a value"));
                        }
                    }
                    Some(_) => {}
                }
            } else {
                positionals.push(word.clone());
            }
        }
        match possible_values(&help) {
            Some(values) => {
                for p in positionals.iter().filter(|p| !values.contains(p)) {
                    problems.push(format!(
                        "{name}: `skein {}` does not take {p:?} (only {values:?})",
                        path.join(" ")
                    ));
                }
            }
            None if !positionals.is_empty() && !help.contains("Arguments:") => {
                problems.push(format!(
                    "{name}: `skein {}` takes no {positionals:?}",
                    path.join(" ")
                ))
            }
            None => {}
        }
        for variable in environment_names(service) {
            if !is_skein_variable(&variable) {
                continue;
            }
            let listed = [format!("[env: {variable}="), format!("[env: {variable}]")];
            if !listed.iter().any(|l| help.contains(l.as_str())) {
                problems.push(format!(
                    "{name}: `skein {}` does not read {variable}",
                    path.join(" ")
                ));
            }
        }
    }
    Ok(problems)
}

#[test]
fn compose_yaml_uses_only_commands_flags_and_variables_the_cli_has() -> anyhow::Result<()> {
    let compose = compose_yaml()?;
    let mut cli = Cli::default();
    let problems = cli_problems(&compose, &mut cli)?;
    ensure!(
        problems.is_empty(),
        "compose.yaml does not match the CLI:\n{}",
        problems.join("\n")
    );

    // The check can fail: each of these breakages is reported.
    let breakages: [Breakage; 5] = [
        ("an unknown subcommand", |s| {
            s["command"] = json!(["wroker", "orders"])
        }),
        ("an unknown flag", |s| {
            s["command"] = json!(["worker", "orders", "--replicas", "2"])
        }),
        ("an unknown worker", |s| {
            s["command"] = json!(["worker", "shipping"])
        }),
        ("a variable nothing reads", |s| {
            s["environment"] = json!({"SKEIN_WORKER_THREADS": "4"})
        }),
        ("a variable of another subcommand", |s| {
            s["environment"] = json!(["SKEIN_STREAM_REPLICAS=3"])
        }),
    ];
    for (what, breakage) in breakages {
        let mut broken = compose.clone();
        breakage(service_mut(&mut broken, "orders")?);
        ensure!(
            !cli_problems(&broken, &mut cli)?.is_empty(),
            "a compose.yaml with {what} passed the CLI check"
        );
    }
    Ok(())
}

#[test]
fn compose_yaml_runs_every_worker_in_copies_after_the_streams() -> anyhow::Result<()> {
    let compose = compose_yaml()?;
    let mut cli = Cli::default();
    let workers =
        possible_values(cli.help(&["worker".into()])?).context("worker lists no names")?;
    let services = skein_services(&compose);
    let command = |s: &Value| -> Vec<String> {
        s["command"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    for worker in &workers {
        let running: Vec<_> = services
            .iter()
            .filter(|(_, s)| {
                let c = command(s);
                c.first().map(String::as_str) == Some("worker") && c.contains(worker)
            })
            .collect();
        ensure!(!running.is_empty(), "no service runs the {worker} worker");
        for (name, s) in running {
            let replicas = s["deploy"]["replicas"].as_u64().unwrap_or(1);
            ensure!(
                replicas > 1,
                "{name} runs one copy of {worker}; a consumer group wants more"
            );
            // Its health check asks its own endpoint, where it listens.
            let listen = s["environment"]["SKEIN_HEALTH_HTTP"]
                .as_str()
                .with_context(|| format!("{name} sets no SKEIN_HEALTH_HTTP"))?;
            let port = listen.rsplit(':').next().unwrap_or_default();
            let check = s["healthcheck"]["test"].to_string();
            ensure!(
                check.contains(&format!(":{port}/health/live")),
                "{name}'s health check {check} does not ask /health/live on port {port}"
            );
        }
    }
    ensure!(
        services
            .iter()
            .any(|(_, s)| command(s).first().map(String::as_str) == Some("ingress")),
        "no service runs the ingress"
    );

    // The streams: applied once, with no more replicas than NATS nodes, and
    // waited for by everything else.
    let (streams, apply) = services
        .iter()
        .find(|(_, s)| command(s).starts_with(&["streams".into(), "apply".into()]))
        .context("no service runs skein streams apply")?;
    let apply = command(apply);
    let replicas: usize = apply
        .iter()
        .position(|a| a == "--replicas")
        .and_then(|i| apply.get(i + 1))
        .context("streams apply without --replicas")?
        .parse()
        .context("--replicas is not a number")?;
    let nats_nodes = compose["services"]
        .as_object()
        .map(|s| {
            s.values()
                .filter(|s| s["image"].as_str().is_some_and(|i| i.starts_with("nats:")))
                .count()
        })
        .unwrap_or(0);
    ensure!(
        (1..=nats_nodes).contains(&replicas),
        "streams at {replicas} replicas on {nats_nodes} NATS nodes"
    );
    for (name, s) in services.iter().filter(|(n, _)| n != streams) {
        ensure!(
            s["depends_on"][streams.as_str()]["condition"] == "service_completed_successfully",
            "{name} does not wait for {streams} to complete"
        );
    }
    Ok(())
}

/// What the compose nodes' cluster blocks read from the environment.
const ROUTE_VARIABLES: [&str; 4] = [
    "NATS_ROUTE_PASSWORD",
    "NATS_ROUTE_1",
    "NATS_ROUTE_2",
    "NATS_ROUTE_3",
];

/// The route variables for nodes whose routes listen on loopback `ports`,
/// joining with `password`.
fn route_environment(password: &str, ports: &[u16]) -> Vec<(String, String)> {
    let mut env = vec![("NATS_ROUTE_PASSWORD".to_owned(), password.to_owned())];
    env.extend(ports.iter().enumerate().map(|(n, port)| {
        (
            format!("NATS_ROUTE_{}", n + 1),
            format!("nats-route://route:{password}@127.0.0.1:{port}"),
        )
    }));
    env
}

/// Each user of `nats/skein-users.conf` and the variable its password
/// comes from.
type Users = Vec<(String, String)>;

/// The users of `nats/skein-users.conf`, and every subject the file names.
fn nats_users() -> anyhow::Result<(Users, Vec<String>)> {
    let text = std::fs::read_to_string(repo_file("nats/skein-users.conf"))?;
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .collect();
    let mut users = Vec::new();
    let mut name = None;
    for line in &lines {
        if let Some(user) = line.strip_prefix("user:") {
            name = Some(user.trim().to_owned());
        } else if let Some(variable) = line.strip_prefix("password: $") {
            let user = name.take().context("a password before its user")?;
            users.push((user, variable.trim().to_owned()));
        }
    }
    let subjects = lines
        .iter()
        .flat_map(|l| l.split('"').skip(1).step_by(2))
        .map(str::to_owned)
        .collect();
    Ok((users, subjects))
}

/// Every NATS node of compose.yaml mounts `nats/skein-users.conf` beside its
/// configuration and gets every password it reads; its configuration, as
/// mounted, is valid to `nats-server -t` and includes the users file. The
/// `streams` container connects as the user skein, every other skein
/// service as its own user with its own password; the user skein may use
/// every subject any other user may.
#[test]
fn compose_s_nats_nodes_let_in_skein_s_users_and_each_service_connects_as_its_own(
) -> anyhow::Result<()> {
    let compose = compose_yaml()?;
    let services = compose["services"].as_object().context("no services")?;
    let (users, subjects) = nats_users()?;
    let password_of = |user: &str| {
        users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, variable)| variable.clone())
    };
    ensure!(
        password_of("skein").as_deref() == Some("NATS_PASSWORD"),
        "the user skein's password is not NATS_PASSWORD: {users:?}"
    );
    // skein's own allow list is the file's first subjects (its publish list).
    let skein_allows: Vec<&str> = subjects
        .iter()
        .take_while(|s| s.ends_with('>'))
        .map(|s| s.trim_end_matches('>'))
        .collect();
    ensure!(skein_allows.len() >= 9, "skein's list: {skein_allows:?}");
    for subject in &subjects {
        ensure!(
            skein_allows.iter().any(|p| subject.starts_with(p)),
            "{subject} is not among the user skein's subjects"
        );
    }
    let nats_server = skein_testkit::nats::find_binary()?;
    let mut nodes = 0;
    let mut connected = std::collections::BTreeSet::new();
    for (name, service) in services {
        let image = service["image"].as_str().unwrap_or_default();
        let env = &service["environment"];
        if image.starts_with("nats:") {
            nodes += 1;
            let mounts: Vec<&str> = service["volumes"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            ensure!(
                mounts.contains(&"./nats/skein-users.conf:/etc/nats/skein-users.conf:ro"),
                "{name} does not mount the users file: {mounts:?}"
            );
            for (_, variable) in &users {
                ensure!(
                    env[variable.as_str()]
                        .as_str()
                        .is_some_and(|p| p.contains(&format!("${{{variable}:?"))),
                    "{name} does not pass {variable}: {env}"
                );
            }
            let config = mounts
                .iter()
                .find_map(|m| m.strip_suffix(":/etc/nats/skein.conf:ro"))
                .context(format!("{name} mounts no configuration"))?;
            let text = std::fs::read_to_string(repo_file(config))?;
            ensure!(
                text.lines().any(|l| l.trim() == "include skein-users.conf"),
                "{config} does not include skein-users.conf"
            );
            // As mounted: the configuration and the users file side by side.
            let dir = tempfile::tempdir()?;
            std::fs::write(dir.path().join("skein.conf"), &text)?;
            std::fs::copy(
                repo_file("nats/skein-users.conf"),
                dir.path().join("skein-users.conf"),
            )?;
            for variable in ROUTE_VARIABLES {
                ensure!(
                    env[variable]
                        .as_str()
                        .is_some_and(|v| v.contains("${NATS_ROUTE_PASSWORD:?")),
                    "{name} does not pass {variable}: {env}"
                );
            }
            let check = |skein_password: &str| {
                let mut command = std::process::Command::new(&nats_server);
                command
                    .arg("-c")
                    .arg(dir.path().join("skein.conf"))
                    .arg("-t");
                for (user, variable) in &users {
                    command.env(variable, format!("lettersAndDigits{user}42"));
                }
                command.env("NATS_PASSWORD", skein_password);
                command.envs(route_environment("routeSecret42", &[6222, 6223, 6224]));
                command.output()
            };
            let checked = check("lettersAndDigits42")?;
            ensure!(
                checked.status.success(),
                "{config}: {}{}",
                String::from_utf8_lossy(&checked.stdout),
                String::from_utf8_lossy(&checked.stderr)
            );
            // Why a password must start with a letter (README): the node
            // reads it as a configuration value, and numbers or booleans
            // are not passwords.
            for not_a_string in ["123456", "true"] {
                ensure!(
                    !check(not_a_string)?.status.success(),
                    "{config} took the password {not_a_string}"
                );
            }
        } else if image.starts_with("skein") {
            let command: Vec<&str> = service["command"]
                .as_array()
                .map(|c| c.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            // `worker <service>`, `ingress`; the streams container as skein.
            let user = match command.as_slice() {
                ["worker", worker] => *worker,
                ["streams", ..] => "skein",
                [first, ..] => first,
                [] => bail!("{name} has no command"),
            };
            let variable = password_of(user)
                .with_context(|| format!("{name}: the users file has no user {user}"))?;
            ensure!(
                env["NATS_USER"] == user
                    && env["NATS_PASSWORD"]
                        .as_str()
                        .is_some_and(|p| p.contains(&format!("${{{variable}:?"))),
                "{name} does not connect as the user {user} with {variable}: {env}"
            );
            ensure!(
                env["NATS_URL"] == "nats://nats:4222",
                "{name}'s NATS_URL: {env}"
            );
            connected.insert(user.to_owned());
        }
    }
    ensure!(nodes == 3, "{nodes} NATS nodes");
    let unused: Vec<&String> = users
        .iter()
        .map(|(u, _)| u)
        .filter(|u| !connected.contains(*u))
        .collect();
    ensure!(unused.is_empty(), "no service connects as {unused:?}");
    Ok(())
}

/// One of compose.yaml's NATS nodes, its configuration as shipped moved to
/// loopback ports, killed when dropped.
struct LoopbackNode {
    http: u16,
    log: PathBuf,
    _child: tokio::process::Child,
}

impl LoopbackNode {
    /// Starts `nats/compose/node{n}.conf` in `dir` with client, route and
    /// monitoring ports on loopback, the users' passwords and `routes`.
    fn start(
        dir: &std::path::Path,
        n: usize,
        (client, route, http): (u16, u16, u16),
        routes: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let (users, _) = nats_users()?;
        let node = dir.join(format!("node{n}"));
        std::fs::create_dir_all(node.join("store"))?;
        let mut text = std::fs::read_to_string(repo_file(&format!("nats/compose/node{n}.conf")))?;
        for (from, to) in [
            (
                "listen: 0.0.0.0:4222",
                format!("listen: 127.0.0.1:{client}"),
            ),
            ("http: 127.0.0.1:8222", format!("http: 127.0.0.1:{http}")),
            ("listen: 0.0.0.0:6222", format!("listen: 127.0.0.1:{route}")),
            (
                "store_dir: /data",
                format!("store_dir: \"{}\"", node.join("store").display()),
            ),
        ] {
            ensure!(text.contains(from), "node{n}.conf has no `{from}`");
            text = text.replace(from, &to);
        }
        std::fs::write(node.join("skein.conf"), text)?;
        std::fs::copy(
            repo_file("nats/skein-users.conf"),
            node.join("skein-users.conf"),
        )?;
        let log = node.join("nats.log");
        let child = tokio::process::Command::new(skein_testkit::nats::find_binary()?)
            .arg("-c")
            .arg(node.join("skein.conf"))
            .envs(
                users
                    .iter()
                    .map(|(user, variable)| (variable.clone(), format!("secretOf{user}42"))),
            )
            .envs(routes.iter().cloned())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            http,
            log,
            _child: child,
        })
    }

    /// How many other nodes the node has routes to now (0 while it does
    /// not answer; a pair of nodes shares several connections).
    async fn routes(&self) -> usize {
        let Ok((200, text)) =
            skein_testkit::http::request(self.http, "GET", "/routez", &[], None).await
        else {
            return 0;
        };
        let routez: Value = serde_json::from_str(&text).unwrap_or_default();
        routez["routes"]
            .as_array()
            .map(|routes| {
                routes
                    .iter()
                    .filter_map(|r| r["remote_name"].as_str())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            })
            .unwrap_or(0)
    }

    async fn healthy(&self) -> bool {
        matches!(
            skein_testkit::http::request(self.http, "GET", "/healthz", &[], None).await,
            Ok((200, _))
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// compose.yaml's three NATS node configurations, as shipped but on
/// loopback ports, form a cluster whose routes authenticate: the three
/// join with the route password and elect a JetStream leader, and a node
/// that does not know the password is refused and joins nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_s_nats_nodes_form_a_cluster_that_refuses_a_node_without_the_route_password(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let picked = skein_testkit::free_ports(12)?;
    let ports: Vec<(u16, u16, u16)> = picked.chunks(3).map(|p| (p[0], p[1], p[2])).collect();
    let route_ports: Vec<u16> = ports[..3].iter().map(|p| p.1).collect();
    let routes = route_environment("routeSecret42", &route_ports);
    let nodes: Vec<LoopbackNode> = ports[..3]
        .iter()
        .enumerate()
        .map(|(i, ports)| LoopbackNode::start(dir.path(), i + 1, *ports, &routes))
        .collect::<anyhow::Result<_>>()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut formed = true;
        let mut seen = Vec::new();
        for node in &nodes {
            let (routes, healthy) = (node.routes().await, node.healthy().await);
            formed &= routes == 2 && healthy;
            seen.push((routes, healthy));
        }
        if formed {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the three nodes formed no cluster in 30 s (routes, healthy: {seen:?}):\n{}",
            nodes
                .iter()
                .map(LoopbackNode::log)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A fourth node (node 1's configuration on its own ports) that knows
    // the routes' addresses but guesses the password.
    let guessed = route_environment("aGuess42", &route_ports);
    let intruder = LoopbackNode::start(&dir.path().join("intruder"), 1, ports[3], &guessed)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nodes
        .iter()
        .any(|n| n.log().contains("Authentication Failure"))
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no node refused the intruder:\n{}",
            intruder.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(intruder.routes().await == 0, "{}", intruder.log());
    for node in &nodes {
        ensure!(node.routes().await == 2, "{}", node.log());
        // The route URLs hold the password; the logs show none of it.
        ensure!(!node.log().contains("routeSecret42"), "{}", node.log());
    }
    ensure!(!intruder.log().contains("aGuess42"), "{}", intruder.log());
    Ok(())
}

/// The workers with a database: each has its own PostgreSQL role and
/// password variable (`POSTGRES_PASSWORD_<WORKER>`), as
/// deploy/postgres/init-databases.sh lists them.
const DATABASE_SERVICES: [&str; 6] = [
    "identity",
    "catalog",
    "orders",
    "payments",
    "orchestrator",
    "projector",
];

/// Every worker connects to PostgreSQL as its own role, to its own
/// database, with the password the postgres service hands to
/// deploy/postgres/init-databases.sh, which that service runs on its first
/// start; no worker uses the superuser.
#[test]
fn compose_yaml_gives_each_worker_its_own_postgres_role() -> anyhow::Result<()> {
    let compose = compose_yaml()?;
    let postgres = &compose["services"]["postgres"];
    let mounts = postgres["volumes"].to_string();
    ensure!(
        mounts.contains("./deploy/postgres:/docker-entrypoint-initdb.d"),
        "postgres does not run deploy/postgres at its first start: {mounts}"
    );
    for service in DATABASE_SERVICES {
        let variable = format!("POSTGRES_PASSWORD_{}", service.to_uppercase());
        let handed = postgres["environment"][variable.as_str()].as_str();
        ensure!(
            handed == Some(&format!("${{{variable}:?set {variable}}}")[..]),
            "postgres does not hand {variable} to the script: {handed:?}"
        );
        let url = compose["services"][service]["environment"]["DATABASE_URL"]
            .as_str()
            .with_context(|| format!("{service} sets no DATABASE_URL"))?;
        let expected = format!(
            "postgres://skein_{service}:${{{variable}:?set {variable}}}@postgres:5432/skein_{service}"
        );
        ensure!(url == expected, "{service}: {url}, not {expected}");
    }
    ensure!(
        compose["x-worker-environment"]["DATABASE_URL"].is_null(),
        "a DATABASE_URL shared by every worker"
    );
    Ok(())
}

/// `postgres://<user>:<password>@<host:port>/<database>`, on the test
/// server.
fn postgres_url(user: &str, password: &str, database: &str) -> String {
    let admin = skein_testkit::db::postgres_admin_url();
    let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
    let rest = base.split_once("://").map_or(base, |(_, rest)| rest);
    let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host_and_path.split('/').next().unwrap_or(host_and_path);
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("postgres://{user}:{password}@{host}/{database}{query}")
}

/// The roles and databases a run of the script made, dropped on the way out.
struct Made {
    prefix: String,
}

impl Drop for Made {
    fn drop(&mut self) {
        for service in DATABASE_SERVICES {
            let name = format!("{}{service}", self.prefix);
            for sql in [
                format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                format!("DROP ROLE IF EXISTS \"{name}\""),
            ] {
                let _ = std::process::Command::new("psql")
                    .args([
                        "-qX",
                        "-d",
                        &skein_testkit::db::postgres_admin_url(),
                        "-c",
                        &sql,
                    ])
                    .output();
            }
        }
    }
}

/// Runs deploy/postgres/init-databases.sh against the test server.
fn run_init_script(prefix: &str) -> anyhow::Result<()> {
    let mut script = std::process::Command::new("sh");
    script
        .arg(repo_file("deploy/postgres/init-databases.sh"))
        .env("SKEIN_ADMIN_URL", skein_testkit::db::postgres_admin_url())
        .env("SKEIN_DATABASE_PREFIX", prefix);
    for service in DATABASE_SERVICES {
        script.env(
            format!("POSTGRES_PASSWORD_{}", service.to_uppercase()),
            format!("pw{service}"),
        );
    }
    let out = script
        .output()
        .context("cannot run deploy/postgres/init-databases.sh (sh and psql)")?;
    ensure!(
        out.status.success(),
        "the script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The script on a real server: each role owns its database, runs its
/// worker's migrations there (tables, the outbox's trigger), and may not
/// connect to another service's. An install from before roles per service
/// (catalog's database and tables the superuser's) is handed over, and a
/// second run changes nothing that works.
#[tokio::test]
async fn the_postgres_init_script_gives_each_service_a_role_owning_only_its_database(
) -> anyhow::Result<()> {
    let made = Made {
        prefix: format!("skein_t{}_", uuid::Uuid::now_v7().simple()),
    };
    let catalog = format!("{}catalog", made.prefix);
    let admin = skein_testkit::db::postgres_admin_url();
    let admin_base = admin.split('?').next().unwrap_or(&admin);
    let old_url = format!(
        "{}/{catalog}",
        admin_base
            .rsplit_once('/')
            .map_or(admin_base, |(server, _)| server)
    );
    {
        // As compose.yaml set it up before: the superuser's database.
        let old = skein_outbox::Store::connect(&old_url).await?;
        old.migrate(skein_catalog::NAME, skein_catalog::MIGRATIONS)
            .await?;
        old.close().await;
    }
    run_init_script(&made.prefix)?;
    run_init_script(&made.prefix).context("a second run")?;

    let handed = skein_outbox::Store::connect(&postgres_url(&catalog, "pwcatalog", &catalog))
        .await
        .context("the catalog role cannot open its database")?;
    handed
        .migrate(skein_catalog::NAME, skein_catalog::MIGRATIONS)
        .await?;
    let mut tx = handed.begin().await?;
    tx.publish(&skein_message::Envelope::event(
        "catalog",
        &skein_contracts::catalog::Restocked {
            product_id: uuid::Uuid::now_v7(),
            quantity: 1,
            available: 1,
        },
        &skein_message::MessageContext::root(),
    )?);
    tx.commit()
        .await
        .context("the catalog role cannot write the outbox the superuser made")?;

    let orders = format!("{}orders", made.prefix);
    let store = skein_outbox::Store::connect(&postgres_url(&orders, "pworders", &orders))
        .await
        .context("the orders role cannot open its database")?;
    store
        .migrate(skein_orders::NAME, skein_orders::MIGRATIONS)
        .await
        .context("the orders role cannot migrate its database")?;
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(store.pool())
        .await?;
    ensure!(user == orders, "connected as {user}");

    let refused = sqlx::PgPool::connect(&postgres_url(&orders, "pworders", &catalog)).await;
    match refused {
        Err(e) => ensure!(
            e.to_string().contains("permission denied for database"),
            "refused for another reason: {e}"
        ),
        Ok(_) => bail!("the orders role reached the catalog's database"),
    }
    Ok(())
}
