//! `skein replay --into <worker>`: the selected messages through a
//! worker's own handlers and inbox.
//!
//! The worker's durable consumer is not touched (rewinding it under running
//! copies would break them). This process opens the worker's database,
//! binds the worker's handlers to a [`Redelivery`] with the worker crate's
//! own `bind_consumers` (the code the live worker runs), and hands each
//! selected message to the handler of its stream and subject, through the
//! inbox of the same name. What the handlers queue in the outbox is then
//! published by a relay of that database ([`Relay::publish_committed`]):
//! the running worker's relay if there is one (this one stands by), else
//! this one.
//!
//! `--force-reprocess <read model>` (projector only) applies events the
//! inbox already has to that read model again, with the projection's own
//! re-appliable writes under its rebuild lock.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use skein_bus::replay::StoredMessage;
use skein_bus::Bus;
use skein_message::envelope::format_time;
use skein_message::Envelope;
use skein_outbox::{Relay, RelayConfig, Store};
use skein_projector::projection::Applied;
use skein_projector::ReadModel;
use skein_service::{Outcome, Preview, Redelivery};

use super::super::select::cell;
use super::super::worker::Name;
use super::{Args, Format};

/// How long the relay may take to publish what the replay queued.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Before when the worker's inbox may have forgotten what it handled: its
/// horizon (how far back its relay has deleted records, read now: the
/// running worker's relay moves it) plus the audit's margin for clocks
/// ([`crate::cmd::audit::HORIZON_MARGIN`]), or `stated`
/// (from `--inbox-retention`), whichever is later; `None` while neither
/// says it has forgotten anything.
async fn forgotten_before(
    store: &Store,
    stated: Option<time::OffsetDateTime>,
) -> anyhow::Result<Option<time::OffsetDateTime>> {
    let horizon = skein_outbox::audit::inbox_horizon(store)
        .await
        .context("cannot read the inbox's horizon")?
        .and_then(|micros| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).ok()
        })
        .map(|at| at + crate::cmd::audit::HORIZON_MARGIN);
    Ok(horizon.max(stated))
}

/// Refuses what cannot work, before anything is read or opened.
pub(super) async fn check(worker: Name, stream: &str, args: &Args) -> anyhow::Result<()> {
    let force = args.force_reprocess.as_deref();
    if worker == Name::Identity {
        bail!(
            "identity consumes no stream (it answers queries only): there is nothing to replay into it"
        );
    }
    if stream == "DLQ" {
        bail!(
            "--into takes messages from EVENTS or COMMANDS; dead letters go back with \
             `skein dlq redrive`, which also removes them from the DLQ"
        );
    }
    if let Some(model) = force {
        if worker != Name::Projector {
            bail!(
                "--force-reprocess re-applies events to a projector read model, so it needs \
                 --into projector; {} has no read model, and its handlers' effects (stock, \
                 money, sagas, messages sent) are not safe to apply twice, so its inbox always \
                 decides",
                worker.as_str()
            );
        }
        model.parse::<ReadModel>()?;
    }
    // The worker's own database must exist, unless told to create one: a
    // real run into a database made by mistake would find an empty inbox
    // and apply every event as new, its handlers sending commands again
    // under new ids.
    super::existing_database(args, worker.as_str(), "replay into")
        .await
        .map(drop)
}

/// What happened to one message.
#[derive(Debug, Serialize)]
struct Line {
    sequence: u64,
    subject: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    applied: usize,
    reprocessed: usize,
    skipped: usize,
    not_subscribed: usize,
    failed: usize,
    held_back: usize,
    /// Copies `skein dlq redrive` published for another worker.
    passed_over: usize,
    would_apply: usize,
    would_reprocess: usize,
}

pub(super) async fn run(
    bus: &Bus,
    worker: Name,
    stream: &str,
    selected: Vec<(StoredMessage, Option<Envelope>)>,
    args: &Args,
) -> anyhow::Result<()> {
    let force: Option<ReadModel> = args
        .force_reprocess
        .as_deref()
        .map(str::parse)
        .transpose()?;
    let retention = match &args.inbox_retention {
        Some(value) => Some(value.clone()),
        None => skein_service::standalone::env_setting("SKEIN_INBOX_RETENTION")?,
    };
    let retention = retention
        .as_deref()
        .map(crate::cmd::select::parse_duration)
        .transpose()
        .context("--inbox-retention / SKEIN_INBOX_RETENTION")?;
    // 0s: hold nothing back. Otherwise what the inbox may have forgotten
    // is what was stored before its horizon (read for each message, as the
    // running worker's relay moves it) or before the stated retention.
    let hold_back = retention != Some(time::Duration::ZERO);
    let stated_before = retention.map(|r| time::OffsetDateTime::now_utc() - r);
    let service = worker.as_str();
    let url = args.database_url.replace("{service}", service);
    // A replay changes no schema: one behind or ahead of this build is
    // refused, not migrated under the workers that run on it (the worker's
    // own tables too, when its handlers are bound); only a database it
    // creates (--create-database) is migrated.
    let store = Store::connect_with(skein_outbox::StoreConfig {
        migrate: args.create_database,
        ..skein_outbox::StoreConfig::new(&url)
    })
    .await
    .with_context(|| {
        format!(
            "cannot open the {service} database {}; check --database-url / DATABASE_URL",
            skein_outbox::store::redact(&url)
        )
    })?;
    let redelivery = bind(worker, &store, args)
        .await
        .with_context(|| format!("cannot prepare {service}'s handlers"))?;

    let subscriptions: Vec<String> = redelivery
        .subscriptions()
        .iter()
        .map(|(stream, filters)| format!("{} from {stream}", filters.join(", ")))
        .collect();
    let table = matches!(args.format, Format::Table);
    if table {
        println!(
            "{} {} message(s) from {stream} into {service} (database {}, inbox {service:?}; it takes {})",
            if args.dry_run { "dry run:" } else { "replaying" },
            selected.len(),
            store.display_url(),
            subscriptions.join("; ")
        );
        println!("{:>7}  {:<44}  {:<34}  OUTCOME", "SEQ", "SUBJECT", "TYPE");
    }

    if selected.is_empty() {
        eprintln!("no messages match");
    }
    let mut summary = Summary::default();
    for (message, envelope) in selected {
        // A copy redriven for the worker that gave up on it: this one had
        // the original, as its consumer does not take the copy either.
        let owner = skein_bus::dlq::redriven_for_another(message.headers.as_ref(), service)
            .map(str::to_owned);
        let (outcome, reason) = match (owner, envelope.as_ref()) {
            (Some(owner), _) => {
                summary.passed_over += 1;
                (
                    "passed_over",
                    Some(format!(
                        "a copy redriven for {owner}, which gave up on it; {service} had the original"
                    )),
                )
            }
            (None, None) => {
                summary.failed += 1;
                let reason = Envelope::from_parts(
                    &message.subject,
                    message.headers.as_ref(),
                    message.payload.clone(),
                )
                .err()
                .map(|e| format!("undecodable: {e}"))
                .unwrap_or_else(|| "undecodable".into());
                ("failed", Some(reason))
            }
            (None, Some(envelope)) => {
                let delivery = redelivery.delivery(stream, message.sequence, envelope.clone());
                // A copy `skein dlq redrive` stored later is as old as its
                // message: the original may have run long before (in the
                // other consumers). Its envelope says when it was made.
                let redriven = message
                    .headers
                    .as_ref()
                    .is_some_and(|h| h.get(skein_bus::dlq::headers::REDRIVEN).is_some());
                let first_seen = if redriven {
                    message.published.min(envelope.time)
                } else {
                    message.published
                };
                let forgotten = if force.is_none()
                    && hold_back
                    && matches!(
                        redelivery
                            .preview(&delivery)
                            .await
                            .context("cannot read the inbox")?,
                        Preview::WouldApply
                    ) {
                    forgotten_before(&store, stated_before)
                        .await?
                        .filter(|before| first_seen < *before)
                } else {
                    None
                };
                if let Some(before) = forgotten {
                    summary.held_back += 1;
                    (
                        "held_back",
                        Some(format!(
                            "stored {}, before what the inbox remembers ({}): it may have run \
                             already; --inbox-retention 0s delivers it anyway",
                            format_time(first_seen),
                            format_time(before)
                        )),
                    )
                } else if args.dry_run {
                    dry(&redelivery, &delivery, force, &mut summary).await?
                } else {
                    wet(&redelivery, &store, &delivery, force, &mut summary).await
                }
            }
        };
        let line = Line {
            sequence: message.sequence,
            subject: message.subject.clone(),
            kind: envelope.as_ref().map(|e| e.kind.clone()),
            id: envelope.as_ref().map(|e| e.id.to_string()),
            outcome,
            reason,
        };
        if table {
            let text = match &line.reason {
                Some(r) => format!("{}: {r}", line.outcome.replace('_', " ")),
                None => line.outcome.replace('_', " "),
            };
            println!(
                "{:>7}  {}  {}  {}",
                line.sequence,
                cell(&line.subject, 44),
                cell(line.kind.as_deref().unwrap_or("(not a skein message)"), 34),
                text
            );
        } else {
            println!("{}", serde_json::to_string(&line)?);
        }
    }

    let mut total = format!(
        "{} applied, {} reprocessed, {} skipped (already in the inbox), {} not subscribed, {} failed",
        summary.applied, summary.reprocessed, summary.skipped, summary.not_subscribed, summary.failed
    );
    let held_back = format!(
        ", {} held back (older than the inbox remembers)",
        summary.held_back
    );
    total.push_str(&held_back);
    let passed_over = if summary.passed_over > 0 {
        format!(
            ", {} passed over (copies redriven for another worker)",
            summary.passed_over
        )
    } else {
        String::new()
    };
    total.push_str(&passed_over);
    if args.dry_run {
        total = format!(
            "dry run, nothing changed: {} would be applied, {} reprocessed, {} skipped (already in the inbox), {} not subscribed, {} undecodable",
            summary.would_apply,
            summary.would_reprocess,
            summary.skipped,
            summary.not_subscribed,
            summary.failed
        );
        total.push_str(&held_back);
        total.push_str(&passed_over);
    } else if summary.applied > 0 {
        // Handlers may have queued messages: see them published.
        // Publishing only: deleting old rows is the worker's relay's, with
        // the worker's retentions.
        let config = RelayConfig {
            cleanup_interval: None,
            ..RelayConfig::default()
        };
        let relay = Relay::new(store.clone(), bus.publisher(), config).for_service(service);
        let left = relay
            .publish_committed(PUBLISH_TIMEOUT)
            .await
            .context("cannot check the outbox")?;
        if left > 0 {
            total.push_str(&format!(
                "; {left} message(s) still in the {service} outbox after {}s: committed, they are \
                 published by the {service} worker's relay when it runs",
                PUBLISH_TIMEOUT.as_secs()
            ));
        } else {
            total.push_str("; everything the handlers sent is published");
        }
    }
    if table {
        println!("{total}");
    } else {
        eprintln!("{total}");
    }
    if summary.held_back > 0 && !args.dry_run {
        bail!(
            "{} message(s) held back: stored before what the {service} inbox remembers, they may \
             have run already; check them (skein trace) and pass --inbox-retention 0s to deliver \
             them anyway",
            summary.held_back
        );
    }
    if summary.failed > 0 && !args.dry_run {
        bail!(
            "{} message(s) failed; nothing of them changed (they were not dead-lettered)",
            summary.failed
        );
    }
    Ok(())
}

/// The worker's handlers, bound as the live worker binds them, on its
/// migrated database.
async fn bind(worker: Name, store: &Store, args: &Args) -> anyhow::Result<Redelivery> {
    let payments = skein_payments::PaymentsConfig {
        starting_balance_cents: args.starting_balance_cents,
        provider: skein_payments::ProviderConfig {
            // The provider's latency only slows a run down.
            latency: Duration::ZERO,
            failure_rate: args.provider_failure_rate,
        },
    };
    if let Err(problem) = payments.validate() {
        bail!("{problem}");
    }
    let mut redelivery = Redelivery::new(store.clone(), worker.as_str());
    crate::cmd::worker::bind_worker(worker, store, &mut redelivery, &payments).await?;
    Ok(redelivery)
}

/// Redelivers one message (and re-applies it to the forced read model when
/// the inbox had it).
async fn wet(
    redelivery: &Redelivery,
    store: &Store,
    delivery: &skein_bus::Delivery,
    force: Option<ReadModel>,
    summary: &mut Summary,
) -> (&'static str, Option<String>) {
    match redelivery.redeliver(delivery).await {
        Outcome::Applied => {
            summary.applied += 1;
            ("applied", None)
        }
        Outcome::Skipped => match force {
            None => {
                summary.skipped += 1;
                ("skipped", Some("already in the inbox".into()))
            }
            Some(model) => {
                match skein_projector::projection::reapply(
                    store,
                    &delivery.envelope,
                    delivery.info.stream_sequence,
                    model,
                )
                .await
                {
                    Ok(Applied::Projected) => {
                        summary.reprocessed += 1;
                        ("reprocessed", Some(format!("into {model}")))
                    }
                    Ok(Applied::Ignored) => {
                        summary.skipped += 1;
                        (
                            "skipped",
                            Some(format!("already in the inbox, not part of {model}")),
                        )
                    }
                    Err(e) => {
                        summary.failed += 1;
                        ("failed", Some(format!("reprocessing into {model}: {e}")))
                    }
                }
            }
        },
        Outcome::NotSubscribed => {
            summary.not_subscribed += 1;
            ("not_subscribed", None)
        }
        Outcome::Failed { permanent, reason } => {
            summary.failed += 1;
            let kind = if permanent {
                "permanent"
            } else {
                "transient, after 3 tries"
            };
            ("failed", Some(format!("({kind}) {reason}")))
        }
    }
}

/// What [`wet`] would do.
async fn dry(
    redelivery: &Redelivery,
    delivery: &skein_bus::Delivery,
    force: Option<ReadModel>,
    summary: &mut Summary,
) -> anyhow::Result<(&'static str, Option<String>)> {
    let preview = redelivery
        .preview(delivery)
        .await
        .context("cannot read the inbox")?;
    Ok(match (preview, force) {
        (Preview::WouldApply, _) => {
            summary.would_apply += 1;
            ("would_apply", None)
        }
        (Preview::Skipped, Some(model))
            if model
                .filters()
                .iter()
                .any(|f| skein_message::subject::matches(f, &delivery.envelope.nats_subject)) =>
        {
            summary.would_reprocess += 1;
            ("would_reprocess", Some(format!("into {model}")))
        }
        (Preview::Skipped, _) => {
            summary.skipped += 1;
            ("would_skip", Some("already in the inbox".into()))
        }
        (Preview::NotSubscribed, _) => {
            summary.not_subscribed += 1;
            ("not_subscribed", None)
        }
    })
}
