//! `skein dlq`: inspect, redrive and purge dead letters.
//!
//! Redrive publishes a dead letter back to its original subject with its
//! original headers (so the same `ce-id`: consumers' inboxes still recognise
//! it) minus the dead-letter headers, adds `Skein-Redriven: <n>` and a
//! de-duplication id of its own (`<ce-id>:<consumer>:redrive-<n>`, so a
//! redrive within the stream's duplicate window is not dropped, nor the copy
//! for a second consumer that gave up on the same message) and `Skein-Redriven-For:
//! <consumer>` (the consumer that gave up: the stream's other consumers
//! ack the copy unhandled), and removes it from the DLQ once the origin
//! stream has stored it. A message already
//! redriven `--max-redrives` times is refused: it keeps failing, fix the
//! cause first.

use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::HeaderMap;
use futures::StreamExt;
use skein_bus::dlq::headers::{REDRIVEN, REDRIVEN_FOR};
use skein_bus::dlq::DeadLetterInfo;
use skein_bus::provision::DLQ;
use skein_bus::replay::{read, read_headers, StartAt, StoredMessage};
use skein_bus::Outgoing;

use super::select::{cell, parse_range, short_time};

/// Inspect, redrive or purge dead letters.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// List dead letters: sequence, time, handler, deliveries, origin, reason.
    List {
        /// Only these DLQ sequences, e.g. 10-20.
        #[arg(long)]
        seq: Option<String>,
        /// Only dead letters whose reason contains this text.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show one dead letter with all its headers and its payload.
    Show {
        /// DLQ sequence.
        seq: u64,
    },
    /// Publish dead letters back to their original subject and remove them from the DLQ.
    Redrive {
        /// Only these DLQ sequences, e.g. 10-20.
        #[arg(long)]
        seq: Option<String>,
        /// Only dead letters whose reason contains this text.
        #[arg(long)]
        reason: Option<String>,
        /// Say what would be redriven, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many messages per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Refuse messages already redriven this many times.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
    },
    /// Delete dead letters (all of them without --seq), leaving a record of
    /// each (its headers, on `dlq.purged.<stream>.<consumer>`) so that
    /// `skein audit` knows it was discarded, not lost.
    Purge {
        /// Only these DLQ sequences, e.g. 10-20.
        #[arg(long)]
        seq: Option<String>,
    },
}

struct Selected {
    message: StoredMessage,
    info: Option<DeadLetterInfo>,
}

/// Purge records published and dead letters deleted at a time: a purge of
/// tens of thousands waits for one round trip per batch, not per message.
const PURGES_IN_FLIGHT: usize = 64;

/// The dead letters in `seq` whose reason contains `reason`; with
/// `payloads` false their payloads are left on the server (empty here).
async fn select(
    bus: &skein_bus::Bus,
    seq: Option<&str>,
    reason: Option<&str>,
    payloads: bool,
) -> anyhow::Result<Vec<Selected>> {
    let range = seq.map(parse_range).transpose()?;
    let start = range
        .as_ref()
        .map_or(StartAt::Beginning, |r| StartAt::Sequence(*r.start()));
    let messages = if payloads {
        read(bus, DLQ, skein_bus::dlq::DEAD_LETTERS, start).await
    } else {
        read_headers(bus, DLQ, skein_bus::dlq::DEAD_LETTERS, start).await
    }
    .context("cannot read the DLQ")?;
    Ok(messages
        .into_iter()
        .filter(|m| range.as_ref().is_none_or(|r| r.contains(&m.sequence)))
        .map(|message| {
            let info = message
                .headers
                .as_ref()
                .and_then(DeadLetterInfo::from_headers);
            Selected { message, info }
        })
        .filter(|s| reason.is_none_or(|r| s.info.as_ref().is_some_and(|i| i.reason.contains(r))))
        .collect())
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    let bus = super::connect(nats_url).await?;
    match args.action {
        Action::List { seq, reason } => {
            let selected = select(&bus, seq.as_deref(), reason.as_deref(), false).await?;
            println!(
                "{:>6}  {:<23}  {:<14}  {:>5}  {:<40}  REASON",
                "SEQ", "TIME", "HANDLER", "TRIES", "ORIGIN"
            );
            for s in &selected {
                let (handler, tries, origin, why) = match &s.info {
                    Some(i) => (
                        i.handler.clone(),
                        i.deliveries.to_string(),
                        format!("{} #{} {}", i.stream, i.stream_sequence, i.subject),
                        i.reason.clone(),
                    ),
                    None => (
                        "?".into(),
                        "?".into(),
                        s.message.subject.clone(),
                        "(no dead-letter headers)".into(),
                    ),
                };
                println!(
                    "{:>6}  {}  {}  {:>5}  {}  {}",
                    s.message.sequence,
                    short_time(s.message.published),
                    cell(&handler, 14),
                    tries,
                    cell(&origin, 40),
                    why
                );
            }
            eprintln!("{} dead letter(s)", selected.len());
            Ok(())
        }
        Action::Show { seq } => {
            let stream = bus
                .jetstream()
                .get_stream(DLQ)
                .await
                .context("cannot open the DLQ")?;
            let message = stream.get_raw_message(seq).await.with_context(|| {
                format!("no dead letter with sequence {seq}; see skein dlq list")
            })?;
            println!("sequence: {}", message.sequence);
            println!("subject:  {}", message.subject);
            println!("time:     {}", short_time(message.time));
            println!("headers:");
            for (name, values) in message.headers.iter() {
                for value in values {
                    println!("  {}: {}", AsRef::<str>::as_ref(name), value.as_str());
                }
            }
            println!("payload:");
            match serde_json::from_slice::<serde_json::Value>(&message.payload) {
                Ok(json) => println!("{}", serde_json::to_string_pretty(&json)?),
                Err(_) => println!("{}", String::from_utf8_lossy(&message.payload)),
            }
            Ok(())
        }
        Action::Redrive {
            seq,
            reason,
            dry_run,
            rate,
            max_redrives,
        } => {
            // From one message in 1,000 s (a pause a Duration holds).
            if !rate.is_finite() || rate < 0.001 {
                bail!("--rate takes messages per second, at least 0.001");
            }
            let selected = select(&bus, seq.as_deref(), reason.as_deref(), true).await?;
            let stream = bus
                .jetstream()
                .get_stream(DLQ)
                .await
                .context("cannot open the DLQ")?;
            let publisher = bus.publisher();
            let pause = Duration::from_secs_f64(1.0 / rate);
            let (mut sent, mut refused, mut gone) = (0, 0, 0);
            for s in selected {
                let seq = s.message.sequence;
                let Some(info) = &s.info else {
                    println!("#{seq}: skipped, no dead-letter headers to say where it came from");
                    refused += 1;
                    continue;
                };
                if let Err(why) = origin_checked(&bus, &s.message.subject, info).await {
                    println!("#{seq}: refused, {why}");
                    refused += 1;
                    continue;
                }
                let (outgoing, times) = redriven(&s.message, info)?;
                if times > max_redrives {
                    println!("#{seq}: refused, already redriven {} times (--max-redrives {max_redrives}); fix the cause: {}", times - 1, info.reason);
                    refused += 1;
                    continue;
                }
                if dry_run {
                    println!(
                        "#{seq}: would redrive to {} (redrive {times})",
                        outgoing.subject
                    );
                    continue;
                }
                // The DLQ was read at the start; a purge or another redrive
                // may have removed this one since (a paced run takes a
                // while): what is gone is not published.
                if !still_there(&stream, seq).await? {
                    println!("#{seq}: gone from the DLQ meanwhile (purged or redriven by another run); not redriven");
                    gone += 1;
                    continue;
                }
                let ack = publisher
                    .publish_outgoing(&outgoing)
                    .await
                    .with_context(|| format!("cannot redrive #{seq} to {}", outgoing.subject))?;
                if ack.duplicate {
                    // Redriven before, and the DLQ copy could not be removed then.
                    println!(
                        "#{seq}: {} already has this redrive; removing it from the DLQ",
                        ack.stream
                    );
                }
                let mut meanwhile = "";
                if let Err(e) = stream.delete_message(seq).await {
                    // Removed by another run between the look and the
                    // delete: redriven all the same, nothing to remove.
                    if still_there(&stream, seq).await? {
                        return Err(e).with_context(|| {
                            format!("redriven #{seq}, but cannot remove it from the DLQ")
                        });
                    }
                    meanwhile = "; another run removed it from the DLQ meanwhile (a purge?): \
                                 check that it should have run";
                }
                println!(
                    "#{seq}: redriven to {} ({} #{}){meanwhile}",
                    outgoing.subject, ack.stream, ack.sequence
                );
                sent += 1;
                tokio::time::sleep(pause).await;
            }
            eprintln!(
                "{sent} redriven, {refused} not{}{}",
                if gone > 0 {
                    format!(", {gone} gone meanwhile")
                } else {
                    String::new()
                },
                if dry_run { " (dry run)" } else { "" }
            );
            Ok(())
        }
        Action::Purge { seq } => {
            let stream = bus
                .jetstream()
                .get_stream(DLQ)
                .await
                .context("cannot open the DLQ")?;
            // Each dead letter leaves a record first (its headers), so
            // that `skein audit` knows it was discarded, not lost; it is
            // deleted once its record is stored. Many at a time.
            let selected = select(&bus, seq.as_deref(), None, false).await?;
            let publisher = bus.publisher();
            let (publisher, stream) = (&publisher, &stream);
            let mut purges = futures::stream::iter(&selected)
                .map(|s| async move {
                    let sequence = s.message.sequence;
                    skein_bus::dlq::publish_purge_record(
                        publisher,
                        &s.message.subject,
                        s.message.headers.as_ref(),
                        sequence,
                    )
                    .await
                    .with_context(|| {
                        format!("cannot record the purge of #{sequence}; it was not deleted")
                    })?;
                    stream.delete_message(sequence).await.with_context(|| {
                        format!("recorded the purge of #{sequence} but cannot delete it")
                    })?;
                    anyhow::Ok(())
                })
                .buffer_unordered(PURGES_IN_FLIGHT);
            let mut purged = 0;
            while let Some(done) = purges.next().await {
                if let Err(e) = done {
                    drop(purges);
                    eprintln!(
                        "at least {purged} dead letter(s) purged before the error; run the purge again"
                    );
                    return Err(e);
                }
                purged += 1;
            }
            eprintln!("{purged} dead letter(s) purged");
            Ok(())
        }
    }
}

/// Why a dead letter must not be redriven where its headers say it came
/// from, if so. A worker may publish to the DLQ under its own name only
/// (`dlq.<stream>.<worker>`, which a NATS user per service enforces), but
/// it writes the headers itself: a redrive, published as the operator,
/// goes back only to what the named worker's consumer takes from the
/// named stream.
async fn origin_checked(
    bus: &skein_bus::Bus,
    dlq_subject: &str,
    info: &DeadLetterInfo,
) -> Result<(), String> {
    if dlq_subject != info.dlq_subject() {
        return Err(format!(
            "it was dead-lettered on {dlq_subject} but its headers name {} (stream {}, handler {})",
            info.dlq_subject(),
            info.stream,
            info.handler
        ));
    }
    let config = match bus.jetstream().get_stream(&info.stream).await {
        Ok(stream) => match stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&info.handler)
            .await
        {
            Ok(mut consumer) => match consumer.info().await {
                Ok(info) => info.config.clone(),
                Err(e) => return Err(format!("cannot read consumer {}: {e}", info.handler)),
            },
            Err(e) => {
                return Err(format!(
                    "{} has no consumer {} to send it back to ({e})",
                    info.stream, info.handler
                ))
            }
        },
        Err(e) => return Err(format!("cannot open stream {}: {e}", info.stream)),
    };
    let mut filters = config.filter_subjects.clone();
    if !config.filter_subject.is_empty() {
        filters.push(config.filter_subject.clone());
    }
    let taken = filters.is_empty()
        || filters
            .iter()
            .any(|f| skein_message::subject::matches(f, &info.subject));
    if taken {
        Ok(())
    } else {
        Err(format!(
            "its origin {} is not what {} takes from {} ({}): a dead letter goes back only to its consumer",
            info.subject,
            info.handler,
            info.stream,
            filters.join(", ")
        ))
    }
}

/// Whether dead letter `seq` is still in the DLQ.
async fn still_there(
    stream: &async_nats::jetstream::stream::Stream,
    seq: u64,
) -> anyhow::Result<bool> {
    match stream.get_raw_message(seq).await {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot look for #{seq} in the DLQ")),
    }
}

/// The message to publish for a redrive and which redrive it is (1 = first).
fn redriven(message: &StoredMessage, info: &DeadLetterInfo) -> anyhow::Result<(Outgoing, u32)> {
    let original = message.headers.clone().unwrap_or_default();
    let times = original
        .get(REDRIVEN)
        .and_then(|v| v.as_str().parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    let mut headers = HeaderMap::new();
    for (name, values) in original.iter() {
        let name_str: &str = name.as_ref();
        if name_str.starts_with("Skein-Dlq-") || name_str == REDRIVEN || name_str == REDRIVEN_FOR {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    // A redrive is deliberate, so it must not be dropped as a duplicate of the
    // original publish: it gets its own de-duplication id. Consumers recognise
    // the message by its unchanged ce-id. The id names the handler too: two
    // consumers that gave up on one message each get their copy (with the
    // same id, the second would be taken for a redrive already stored and
    // its dead letter removed unpublished).
    let origin = original
        .get(skein_message::envelope::headers::ID)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| format!("{}:{}", info.stream, info.stream_sequence));
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{origin}:{}:redrive-{times}", info.handler).as_str(),
    );
    headers.insert(REDRIVEN, times.to_string().as_str());
    // For the consumer that gave up only: the stream's other consumers
    // handled the original (they may have forgotten it since, and would
    // apply it again).
    headers.insert(REDRIVEN_FOR, info.handler.as_str());
    Ok((
        Outgoing {
            subject: info.subject.clone(),
            headers,
            payload: message.payload.clone(),
        },
        times,
    ))
}
