//! Idempotent provisioning of streams and consumers from the JSON definitions
//! in `nats/`.
//!
//! Stream names (`EVENTS`, `COMMANDS`, `DLQ`) and consumer durable names are
//! contracts: renaming a stream orphans its history, renaming a durable
//! consumer makes its worker consume everything again from the start.
//!
//! Definitions use the server's own JSON (the `nats stream add --config`
//! format). Applying compares each field a definition sets with what the
//! server has and updates only on a difference, so start-up can apply them
//! every time; an update changes those fields and keeps the others as the
//! server has them.

use std::path::Path;

use async_nats::jetstream::consumer::FromConsumer;
use async_nats::jetstream::{self, consumer::pull, stream};
use serde_json::Value;

use crate::error::{Error, Result};

/// Name of the stream of domain events.
pub const EVENTS: &str = "EVENTS";
/// Name of the work-queue stream of commands.
pub const COMMANDS: &str = "COMMANDS";
/// Name of the dead-letter stream.
pub const DLQ: &str = "DLQ";

const BUILTIN_STREAMS: [(&str, &str); 3] = [
    (
        "nats/streams/EVENTS.json",
        include_str!("../../../nats/streams/EVENTS.json"),
    ),
    (
        "nats/streams/COMMANDS.json",
        include_str!("../../../nats/streams/COMMANDS.json"),
    ),
    (
        "nats/streams/DLQ.json",
        include_str!("../../../nats/streams/DLQ.json"),
    ),
];
const WORKER_CONSUMER: (&str, &str) = (
    "nats/consumers/worker.json",
    include_str!("../../../nats/consumers/worker.json"),
);

/// What applying a definition did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It did not exist and was created.
    Created,
    /// It existed with different settings; these fields were updated.
    Updated(Vec<String>),
    /// It existed as defined.
    Unchanged,
    /// It existed with different settings in these fields, and was left as
    /// it is ([`ProvisionOptions::keep_existing`]).
    Differs(Vec<String>),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Created => f.write_str("created"),
            Change::Updated(fields) => write!(f, "updated ({})", fields.join(", ")),
            Change::Unchanged => f.write_str("unchanged"),
            Change::Differs(fields) => write!(
                f,
                "differs from the definitions ({}), left as it is: `skein streams apply` changes it",
                fields.join(", ")
            ),
        }
    }
}

/// Options applied on top of the definitions.
#[derive(Debug, Clone, Default)]
pub struct ProvisionOptions {
    /// Replicas of every stream (3 on a 3-node cluster). `None` creates
    /// streams with the definitions' count (one) and leaves an existing
    /// stream's replicas as they are.
    pub replicas: Option<usize>,
    /// Create missing streams only; leave an existing stream that differs
    /// from its definition as it is ([`Change::Differs`]). What a worker or
    /// the ingress does at start: changing streams is `skein streams
    /// apply`'s (whose definitions may be an operator's own, `--dir`), and
    /// a service's NATS user may not.
    pub keep_existing: bool,
}

impl ProvisionOptions {
    /// What a service applies at start: missing streams created, existing
    /// ones kept as they are.
    pub fn at_service_start() -> Self {
        Self {
            replicas: None,
            keep_existing: true,
        }
    }
}

/// The stream definitions shipped in `nats/streams/`, compiled in.
pub fn builtin_streams() -> Result<Vec<stream::Config>> {
    BUILTIN_STREAMS
        .iter()
        .map(|(file, text)| parse(file, text))
        .collect()
}

/// The stream definitions in a directory (`*.json`), sorted by file name.
pub fn streams_from_dir(dir: &Path) -> Result<Vec<stream::Config>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        context: format!("cannot read stream definitions in {}", dir.display()),
        source,
    })?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                context: format!("cannot read {}", path.display()),
                source,
            })?;
            parse(&path.display().to_string(), &text)
        })
        .collect()
}

fn parse<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|source| Error::Definition {
        file: file.to_owned(),
        source,
    })
}

/// Creates or updates every built-in stream; returns what changed per stream.
pub async fn apply_builtin_streams(
    js: &jetstream::Context,
    options: &ProvisionOptions,
) -> Result<Vec<(String, Change)>> {
    let mut changes = Vec::new();
    for config in builtin_streams()? {
        let name = config.name.clone();
        changes.push((name, apply_stream(js, config, options).await?));
    }
    Ok(changes)
}

/// What a worker or the ingress does at start: creates missing built-in
/// streams and warns about existing ones that differ from their
/// definitions, leaving them as they are.
pub async fn ensure_builtin_streams(js: &jetstream::Context) -> Result<()> {
    for (name, change) in apply_builtin_streams(js, &ProvisionOptions::at_service_start()).await? {
        if let Change::Differs(_) = change {
            tracing::warn!(stream = %name, "stream {change}");
        }
    }
    Ok(())
}

/// Creates `config`'s stream, or updates it where it differs.
pub async fn apply_stream(
    js: &jetstream::Context,
    mut config: stream::Config,
    options: &ProvisionOptions,
) -> Result<Change> {
    if let Some(replicas) = options.replicas {
        config.num_replicas = replicas;
    }
    let what = format!("stream {}", config.name);
    match js.get_stream(&config.name).await {
        Ok(mut existing) => {
            let current = existing
                .info()
                .await
                .map_err(|e| Error::Provision {
                    what: what.clone(),
                    source: e.into(),
                })?
                .config
                .clone();
            // Without an explicit count, keep the replicas the stream has:
            // a worker starting against a 3-replica stream must not shrink
            // it to the definitions' 1.
            if options.replicas.is_none() {
                config.num_replicas = current.num_replicas;
            }
            let differences = differing_fields(&config, &current);
            if differences.is_empty() {
                return Ok(Change::Unchanged);
            }
            if options.keep_existing {
                return Ok(Change::Differs(differences));
            }
            // The fields the definition sets over what the server has: an
            // update replaces the whole configuration, and one built from
            // the definition alone would reset what an operator set beside
            // it (compression, metadata, sources, deny_delete ...).
            let update = overlaid(&config, &current).map_err(|e| Error::Provision {
                what: what.clone(),
                source: e.into(),
            })?;
            js.update_stream(&update)
                .await
                .map_err(|e| stream_change_failed(what, e))?;
            Ok(Change::Updated(differences))
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(config)
                .await
                .map_err(|e| stream_change_failed(what, e))?;
            Ok(Change::Created)
        }
        Err(e) => Err(Error::Provision {
            what,
            source: e.into(),
        }),
    }
}

/// Creating or updating a stream failed. No answer at all is what a NATS
/// user without permission to change streams gets (the server refuses the
/// request and nobody answers it), so that is said.
fn stream_change_failed(what: String, e: jetstream::context::CreateStreamError) -> Error {
    let timed_out = e.kind() == jetstream::context::CreateStreamErrorKind::TimedOut;
    Error::Provision {
        what: unanswered(what, timed_out),
        source: e.into(),
    }
}

/// `what` with the likely reasons why JetStream did not answer a change,
/// when it did not.
fn unanswered(what: String, timed_out: bool) -> String {
    if timed_out {
        format!(
            "{what} (no answer: JetStream has no leader, or this NATS user may not change \
             streams and consumers; then run `skein streams apply` as a user that may)"
        )
    } else {
        what
    }
}

/// A worker's durable pull consumer: the consumer group all its copies share.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// The stream consumed.
    pub stream: String,
    /// The durable name, by convention the worker's name. A contract: a new
    /// name starts a new consumer from the beginning of the stream.
    pub durable: String,
    /// Subjects this consumer takes.
    pub filter_subjects: Vec<String>,
    /// Time the server waits for an ack (or progress) before redelivering.
    pub ack_wait: Option<std::time::Duration>,
    /// Most unacknowledged messages in flight across all copies.
    pub max_ack_pending: Option<i64>,
    /// Where the consumer starts when it has to be created on a stream kept
    /// as history (limits retention, as `EVENTS`): at the messages stored
    /// within this long before now instead of the stream's beginning. A
    /// worker that consumed the stream before (its consumer was deleted or
    /// lost) gives its inbox retention: older messages ran already, and
    /// the inbox, which has forgotten them, would let them run again; so
    /// does `skein streams apply`, which cannot tell. A stream with no
    /// message older than that is read from its beginning all the same.
    /// Not used on a work queue (what is in it has not run) nor for a
    /// consumer that exists.
    pub start_within: Option<std::time::Duration>,
    /// Where the consumer starts when it has to be created again and the
    /// lost one's acknowledgement floor is known (a copy that was bound to
    /// it read it): the stream sequence after the floor. Everything below
    /// was handled; what is above was not, or recently enough for the
    /// inbox to know it. Before `start_within`, which guesses by time; same
    /// limits.
    pub start_sequence: Option<u64>,
}

/// The consumer template in `nats/consumers/worker.json`.
pub fn consumer_template() -> Result<pull::Config> {
    parse(WORKER_CONSUMER.0, WORKER_CONSUMER.1)
}

/// How [`apply_consumer`] treats the subjects an existing consumer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filters {
    /// Exactly the spec's: `skein streams apply --exact`, once no older
    /// copy is left to need a subject the new version dropped.
    Exact,
    /// At least the spec's, keeping any other subject the consumer takes
    /// (a subject another covers is folded into it: the server refuses
    /// filters that overlap that way): a worker copy binding at start, and
    /// `skein streams apply`. During a rolling upgrade copies of two
    /// versions share the consumer, and an older copy starting again must
    /// not take away what the newer ones wait for (they would never get it:
    /// a consumer skips what its filter leaves out). A consumer on a
    /// work-queue stream always takes exactly its spec's subjects: two of
    /// its consumers may not overlap.
    Widen,
}

/// Consumer settings the server does not change on an existing consumer.
const IMMUTABLE: &[&str] = &["ack_policy", "max_waiting", "replay_policy"];

/// Binds tried before giving up on a consumer others change meanwhile.
const BIND_TRIES: usize = 5;

/// Creates the durable consumer of `spec`, or updates it where it differs
/// (its subjects as `filters` says). Copies binding at once are safe: a
/// consumer created meanwhile is widened, and an update that another
/// copy's overwrote is made again.
pub async fn apply_consumer(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    filters: Filters,
) -> Result<(jetstream::consumer::Consumer<pull::Config>, Change)> {
    let mut config = consumer_template()?;
    config.durable_name = Some(spec.durable.clone());
    config.name = Some(spec.durable.clone());
    config.description = Some(format!("skein worker {}", spec.durable));
    set_filters(&mut config, spec.filter_subjects.clone());
    if let Some(ack_wait) = spec.ack_wait {
        config.ack_wait = ack_wait;
    }
    if let Some(max) = spec.max_ack_pending {
        config.max_ack_pending = max;
    }
    let what = format!("consumer {} on stream {}", spec.durable, spec.stream);
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| Error::Provision {
        what: what.clone(),
        source,
    };
    let stream = js.get_stream(&spec.stream).await.map_err(|e| {
        let what = if matches!(
            e.kind(),
            jetstream::context::GetStreamErrorKind::JetStream(ref js)
                if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
        ) {
            format!("{what} (create the streams first: `skein streams apply`)")
        } else {
            what.clone()
        };
        Error::Provision {
            what,
            source: e.into(),
        }
    })?;
    let work_queue =
        stream.cached_info().config.retention == jetstream::stream::RetentionPolicy::WorkQueue;
    let filters = if work_queue { Filters::Exact } else { filters };
    let wanted = filter_set(&config.filter_subject, &config.filter_subjects);
    let mut changed: Option<Vec<String>> = None;
    let mut bound = None;
    for _ in 0..BIND_TRIES {
        let info = match stream.consumer_info(&spec.durable).await {
            Ok(info) => info,
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                use jetstream::stream::ConsumerCreateStrictErrorKind as Kind;
                let mut create = config.clone();
                // A stream whose oldest message is within the window (a new
                // deployment, say): starting at the beginning delivers what
                // starting at the window would, and nothing was skipped, so
                // no warning.
                let oldest = stream.cached_info().state.first_timestamp;
                let since = spec
                    .start_within
                    .filter(|_| !work_queue)
                    .and_then(|within| time::Duration::try_from(within).ok())
                    .and_then(|within| time::OffsetDateTime::now_utc().checked_sub(within))
                    .filter(|since| stream.cached_info().state.messages > 0 && oldest < *since);
                if let Some(start_sequence) = spec.start_sequence.filter(|_| !work_queue) {
                    create.deliver_policy =
                        jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence };
                    tracing::warn!(
                        consumer = %spec.durable,
                        stream = %spec.stream,
                        start_sequence,
                        "the consumer is missing: created again after what it had acknowledged \
                         (everything before ran)"
                    );
                } else if let Some(since) = since {
                    create.deliver_policy =
                        jetstream::consumer::DeliverPolicy::ByStartTime { start_time: since };
                    tracing::warn!(
                        consumer = %spec.durable,
                        stream = %spec.stream,
                        since = %since,
                        "the consumer is missing and the stream holds messages older than the \
                         worker's inbox retention: created at the messages stored since then (a \
                         worker that consumed the stream before has forgotten older ones and \
                         would run them again); `skein replay --into` delivers older ones if \
                         needed, and `skein streams apply --from-beginning` creates a new \
                         worker's consumer at the beginning"
                    );
                }
                match stream.create_consumer_strict(create).await {
                    Ok(created) => return Ok((created, Change::Created)),
                    // Another copy created it meanwhile: widen that one.
                    Err(e) if e.kind() == Kind::AlreadyExists => continue,
                    Err(e) => {
                        let timed_out = e.kind() == Kind::TimedOut;
                        return Err(Error::Provision {
                            what: unanswered(what.clone(), timed_out),
                            source: e.into(),
                        });
                    }
                }
            }
            Err(e) => return Err(failed(e.into())),
        };
        let current = &info.config;
        if filters == Filters::Widen {
            let taken = filter_set(&current.filter_subject, &current.filter_subjects);
            if changed.is_some() && covered(&wanted, &taken) {
                // Updated, and still taking what this copy needs after
                // whatever others wrote meanwhile.
                bound = Some(info);
                break;
            }
            set_filters(&mut config, widened(&wanted, &taken));
        }
        let mut differences = differing_fields(&config, current);
        // The server keeps one of filter_subject/filter_subjects; where a
        // consumer started is set at its creation only.
        differences.retain(|f| {
            !matches!(
                f.as_str(),
                "filter_subject"
                    | "filter_subjects"
                    | "deliver_policy"
                    | "opt_start_time"
                    | "opt_start_seq"
            )
        });
        // What the server refuses to change on an existing consumer: an
        // update asking for it would fail every copy's start. Said, and
        // left as it is (a new durable name, or deleting the consumer,
        // changes it).
        let (fixed, changeable): (Vec<String>, Vec<String>) = differences
            .into_iter()
            .partition(|f| IMMUTABLE.contains(&f.as_str()));
        if !fixed.is_empty() {
            tracing::warn!(
                consumer = %spec.durable,
                fields = %fixed.join(", "),
                "the consumer differs from the template in settings the server cannot change on \
                 an existing consumer; left as they are"
            );
        }
        let mut differences = changeable;
        if !same_filters(&config, current) {
            differences.push("filter_subjects".into());
        }
        if differences.is_empty() {
            bound = Some(info);
            break;
        }
        // The server refuses to change where a consumer started (one made
        // again at a start time, say): the update keeps it.
        config.deliver_policy = current.deliver_policy;
        config.ack_policy = current.ack_policy;
        config.replay_policy = current.replay_policy;
        config.max_waiting = current.max_waiting;
        let updated = stream.update_consumer(config.clone()).await.map_err(|e| {
            let timed_out = e.kind() == jetstream::stream::ConsumerUpdateErrorKind::TimedOut;
            Error::Provision {
                what: unanswered(what.clone(), timed_out),
                source: e.into(),
            }
        })?;
        let mut all = changed.take().unwrap_or_default();
        all.extend(differences);
        all.sort();
        all.dedup();
        if filters == Filters::Exact {
            return Ok((updated, Change::Updated(all)));
        }
        // Widened: read again, in case another copy's update overwrote it.
        changed = Some(all);
    }
    let Some(info) = bound else {
        return Err(failed(
            format!(
                "it does not take all of {wanted:?} after {BIND_TRIES} tries: other copies keep \
                 changing it"
            )
            .into(),
        ));
    };
    let config = pull::Config::try_from_consumer_config(info.config.clone()).map_err(failed)?;
    let consumer = jetstream::consumer::Consumer::new(config, info, js.clone());
    Ok((consumer, changed.map_or(Change::Unchanged, Change::Updated)))
}

/// The subjects that take both `wanted` and `taken`: their union, with a
/// subject another one covers left out (none: every subject).
fn widened(wanted: &[String], taken: &[String]) -> Vec<String> {
    if wanted.is_empty() || taken.is_empty() {
        return Vec::new();
    }
    let mut all: Vec<String> = wanted.iter().chain(taken).cloned().collect();
    all.sort();
    all.dedup();
    let kept: Vec<String> = all
        .iter()
        .filter(|s| !all.iter().any(|o| o != *s && subject_covers(o, s)))
        .cloned()
        .collect();
    kept
}

/// Whether the filters `taken` take every subject the filters `wanted` do
/// (no filter takes everything).
fn covered(wanted: &[String], taken: &[String]) -> bool {
    taken.is_empty()
        || (!wanted.is_empty()
            && wanted
                .iter()
                .all(|w| taken.iter().any(|t| subject_covers(t, w))))
}

/// Whether the filter `wide` matches every subject the filter `narrow`
/// matches (`*` one token, `>` one or more at the end).
fn subject_covers(wide: &str, narrow: &str) -> bool {
    let mut narrow = narrow.split('.');
    for token in wide.split('.') {
        match (token, narrow.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(n)) => {
                if n == ">" {
                    return false;
                }
            }
            (literal, Some(n)) => {
                if literal != n {
                    return false;
                }
            }
        }
    }
    narrow.next().is_none()
}

/// Sets `config` to take `subjects` (none: every subject of the stream).
fn set_filters(config: &mut pull::Config, subjects: Vec<String>) {
    config.filter_subject = String::new();
    config.filter_subjects = Vec::new();
    match <[String; 1]>::try_from(subjects) {
        Ok([one]) => config.filter_subject = one,
        Err(many) => config.filter_subjects = many,
    }
}

/// A consumer's subjects, sorted, from either of the fields the server
/// keeps them in.
pub(crate) fn filter_set(one: &str, many: &[String]) -> Vec<String> {
    let mut v: Vec<String> = many.to_vec();
    if !one.is_empty() {
        v.push(one.to_owned());
    }
    v.sort();
    v
}

fn same_filters(wanted: &pull::Config, current: &jetstream::consumer::Config) -> bool {
    filter_set(&wanted.filter_subject, &wanted.filter_subjects)
        == filter_set(&current.filter_subject, &current.filter_subjects)
}

/// The top-level fields `wanted` sets (non-null) whose value differs on the
/// server. Fields the definition leaves out are the server's business.
fn differing_fields<A: serde::Serialize, B: serde::Serialize>(
    wanted: &A,
    current: &B,
) -> Vec<String> {
    let (Ok(Value::Object(wanted)), Ok(Value::Object(current))) =
        (serde_json::to_value(wanted), serde_json::to_value(current))
    else {
        return vec!["(unreadable config)".into()];
    };
    wanted
        .iter()
        .filter(|(_, v)| !v.is_null())
        .filter(|(k, v)| current.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect()
}

/// `current` with the top-level fields `wanted` sets (non-null; what
/// [`differing_fields`] compares) taken from `wanted`.
fn overlaid<T: serde::Serialize + serde::de::DeserializeOwned>(
    wanted: &T,
    current: &T,
) -> serde_json::Result<T> {
    let mut merged = serde_json::to_value(current)?;
    if let (Value::Object(merged), Value::Object(wanted)) =
        (&mut merged, serde_json::to_value(wanted)?)
    {
        for (key, value) in wanted {
            if !value.is_null() {
                merged.insert(key, value);
            }
        }
    }
    serde_json::from_value(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_keeps_what_the_definition_leaves_out() -> serde_json::Result<()> {
        let wanted: stream::Config = serde_json::from_str(
            r#"{"name": "EVENTS", "subjects": ["events.>"], "max_age": 86400000000000,
                "retention": "limits", "discard": "old", "storage": "file",
                "description": "ours", "num_replicas": 3}"#,
        )?;
        let current: stream::Config = serde_json::from_str(
            r#"{"name": "EVENTS", "subjects": ["events.>"], "max_age": 1000000000,
                "retention": "limits", "discard": "old", "storage": "file", "num_replicas": 1, "compression": "s2", "deny_delete": true,
                "metadata": {"owner": "ops"}}"#,
        )?;
        let update = overlaid(&wanted, &current)?;
        assert_eq!(update.max_age, std::time::Duration::from_secs(86_400));
        assert_eq!(update.description.as_deref(), Some("ours"));
        assert_eq!(update.num_replicas, 3);
        assert_eq!(update.compression, Some(stream::Compression::S2));
        assert!(update.deny_delete);
        assert_eq!(
            update.metadata.get("owner").map(String::as_str),
            Some("ops")
        );
        Ok(())
    }

    fn subjects(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_filter_covers_what_its_wildcards_match() {
        for (wide, narrow) in [
            ("events.orders.>", "events.orders.*.order_placed"),
            ("events.orders.>", "events.orders.x.y.z"),
            ("events.*.*.order_placed", "events.orders.*.order_placed"),
            ("events.>", "events.>"),
            ("a.*", "a.b"),
            ("a.b", "a.b"),
        ] {
            assert!(subject_covers(wide, narrow), "{wide} covers {narrow}");
        }
        for (wide, narrow) in [
            ("a.*", "a.>"),
            ("a.b", "a.*"),
            ("a.b", "a.b.c"),
            ("a.b.c", "a.b"),
            ("events.orders.>", "events.orders"),
            ("events.catalog.>", "events.orders.x.y"),
        ] {
            assert!(
                !subject_covers(wide, narrow),
                "{wide} does not cover {narrow}"
            );
        }
    }

    #[test]
    fn widening_keeps_both_sides_and_folds_a_covered_subject_into_its_wildcard() {
        let placed = subjects(&["events.orders.*.order_placed"]);
        let both = subjects(&[
            "events.orders.*.order_placed",
            "events.orders.*.order_rejected",
        ]);
        assert_eq!(widened(&placed, &both), both);
        assert_eq!(widened(&both, &placed), both);
        let all_orders = subjects(&["events.orders.>"]);
        assert_eq!(widened(&both, &all_orders), all_orders);
        assert_eq!(widened(&all_orders, &both), all_orders);
        // No filter takes every subject: widening with it takes them all.
        assert!(widened(&[], &both).is_empty());
        assert!(widened(&both, &[]).is_empty());
        assert!(covered(&both, &all_orders));
        assert!(covered(&both, &[]));
        assert!(!covered(&all_orders, &both));
        assert!(!covered(&[], &both));
    }

    #[test]
    fn the_shipped_definitions_parse_with_the_intended_retention() -> Result<()> {
        let streams = builtin_streams()?;
        let by_name = |n: &str| streams.iter().find(|s| s.name == n).cloned();
        let events = by_name(EVENTS).ok_or_else(|| Error::Io {
            context: "no EVENTS".into(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        assert_eq!(events.retention, stream::RetentionPolicy::Limits);
        assert_eq!(events.subjects, vec!["events.>".to_owned()]);
        let commands = by_name(COMMANDS).ok_or_else(|| Error::Io {
            context: "no COMMANDS".into(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        assert_eq!(commands.retention, stream::RetentionPolicy::WorkQueue);
        assert!(by_name(DLQ).is_some());
        let template = consumer_template()?;
        assert_eq!(
            template.ack_policy,
            jetstream::consumer::AckPolicy::Explicit
        );
        Ok(())
    }

    #[test]
    fn only_fields_the_definition_sets_are_compared() {
        let wanted = serde_json::json!({"a": 1, "b": null, "c": [1]});
        let current = serde_json::json!({"a": 1, "b": 7, "c": [2], "d": 4});
        assert_eq!(differing_fields(&wanted, &current), vec!["c".to_owned()]);
    }
}
