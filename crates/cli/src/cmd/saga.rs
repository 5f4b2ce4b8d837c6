//! `skein saga list | show | stuck | retry`: saga instances, their
//! transitions, those waiting past their deadline, from the orchestrator's
//! queries; and a retry of a failed one.
//!
//! The orchestrator answers only admins; the command asks as the operator
//! (an admin caller), which is as much as access to NATS allows anyway.

use std::time::Duration;

use anyhow::Context;
use skein_contracts::orchestrator::{
    GetSaga, ListSagas, RetrySaga, SagaInstance, SagaStatus, StuckSagas,
};
use skein_contracts::Caller;
use skein_service::client::sagas_about;
use skein_service::{request_with, RequestError};
use uuid::Uuid;

use super::select::cell;

/// Inspect saga instances.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: SagaCommand,
    /// Output: an aligned table or JSON (one object per line for lists).
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Subcommand)]
enum SagaCommand {
    /// Instances, newest first.
    List {
        /// Only this status: running, compensating, completed, compensated, failed.
        #[arg(long, value_parser = parse_status)]
        status: Option<SagaStatus>,
        /// Only instances about this order id.
        #[arg(long)]
        order: Option<Uuid>,
        /// How many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// The page after this one: the cursor a previous list printed.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One instance and every transition: an instance id or an order id.
    Show {
        /// Saga instance id, or an order id (shows its sagas).
        id: Uuid,
    },
    /// Instances waiting past their deadline, and failed ones, with what they wait for.
    Stuck {
        /// How far past its deadline an instance must be, in seconds.
        #[arg(long, default_value_t = 5)]
        overdue: u64,
    },
    /// Send a failed instance's unanswered command again, its attempts
    /// counted afresh, and show the instance: once the cause is fixed, for
    /// a command that will not be answered by itself (its dead letter
    /// purged, or lost; a redriven dead letter brings its answer anyway).
    Retry {
        /// Saga instance id (`skein saga stuck` lists the failed ones).
        id: Uuid,
    },
}

fn parse_status(text: &str) -> Result<SagaStatus, String> {
    SagaStatus::parse(text).ok_or_else(|| {
        format!(
            "unknown status {text:?}; use running, compensating, completed, compensated or failed"
        )
    })
}

fn explain(e: RequestError) -> anyhow::Error {
    match e {
        RequestError::NoResponders(_) => anyhow::anyhow!(
            "no orchestrator is running; start one with `skein worker orchestrator` (or `skein up`)"
        ),
        other => anyhow::Error::new(other),
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    let bus = super::connect(nats_url).await?;
    match args.command {
        SagaCommand::List {
            status,
            order,
            limit,
            cursor,
        } => {
            let page = request_with(
                &bus,
                &ListSagas {
                    caller: Caller::operator(),
                    status,
                    key: order.map(|o| o.to_string()),
                    limit,
                    cursor,
                },
                None,
                TIMEOUT,
            )
            .await
            .map_err(explain)?;
            print_list(&page.items, args.format)?;
            if let Some(next) = &page.next_cursor {
                eprintln!(
                    "more: the next page is `skein saga list --cursor {next}` (same filters)"
                );
            }
        }
        SagaCommand::Show { id } => {
            let found = request_with(
                &bus,
                &GetSaga {
                    caller: Caller::operator(),
                    saga_id: id,
                },
                None,
                TIMEOUT,
            )
            .await;
            let instances = match found {
                Ok(instance) => vec![instance],
                // Not an instance id: the sagas of that order.
                Err(RequestError::Service(e)) if e.status == 404 => {
                    sagas_about(&bus, &id.to_string(), 10, TIMEOUT)
                        .await
                        .map_err(explain)?
                }
                Err(e) => return Err(explain(e)),
            };
            if instances.is_empty() {
                anyhow::bail!(
                    "no saga instance of id or order {id} (one that ended is kept for 30 days); \
                     `skein saga list` shows the instances"
                );
            }
            for instance in &instances {
                print_show(instance, args.format)?;
            }
        }
        SagaCommand::Retry { id } => {
            let retried = request_with(
                &bus,
                &RetrySaga {
                    caller: Caller::operator(),
                    saga_id: id,
                },
                None,
                TIMEOUT,
            )
            .await
            .map_err(explain)?;
            print_show(&retried, args.format)?;
        }
        SagaCommand::Stuck { overdue } => {
            let stuck = request_with(
                &bus,
                &StuckSagas {
                    caller: Caller::operator(),
                    min_overdue_ms: Some(overdue.saturating_mul(1000)),
                },
                None,
                TIMEOUT,
            )
            .await
            .map_err(explain)?;
            if stuck.more {
                eprintln!(
                    "more sagas need attention than the {} listed (live ones first, then failed ones): deal with these first",
                    stuck.items.len()
                );
            }
            match args.format {
                Format::Json => {
                    for item in &stuck.items {
                        println!("{}", serde_json::to_string(item)?);
                    }
                }
                Format::Table => {
                    if stuck.items.is_empty() {
                        println!("no saga is waiting past its deadline or failed");
                        return Ok(());
                    }
                    println!(
                        "{}  {}  {}  {}  {}  WAITING FOR / REASON",
                        cell("INSTANCE", 36),
                        cell("SAGA", 13),
                        cell("STATUS", 12),
                        cell("STEP", 18),
                        cell("OVERDUE", 9)
                    );
                    for item in &stuck.items {
                        let i = &item.instance;
                        let waiting = if i.status.is_live() {
                            i.waiting_for.join(", ")
                        } else {
                            i.reason.clone().unwrap_or_default()
                        };
                        println!(
                            "{}  {}  {}  {}  {}  {waiting}",
                            cell(&i.id.to_string(), 36),
                            cell(&i.saga, 13),
                            cell(i.status.as_str(), 12),
                            cell(i.step.as_deref().unwrap_or("-"), 18),
                            cell(&format!("{}s", item.overdue_ms / 1000), 9),
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn print_list(items: &[SagaInstance], format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        for item in items {
            println!("{}", serde_json::to_string(item)?);
        }
        return Ok(());
    }
    println!(
        "{}  {}  {}  {}  {}  UPDATED",
        cell("INSTANCE", 36),
        cell("SAGA", 13),
        cell("ORDER", 36),
        cell("STATUS", 12),
        cell("STEP", 18),
    );
    for i in items {
        println!(
            "{}  {}  {}  {}  {}  {}",
            cell(&i.id.to_string(), 36),
            cell(&i.saga, 13),
            cell(&i.key, 36),
            cell(i.status.as_str(), 12),
            cell(i.step.as_deref().unwrap_or("-"), 18),
            i.updated_at
        );
    }
    Ok(())
}

fn print_show(i: &SagaInstance, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(i).context("cannot encode")?
        );
        return Ok(());
    }
    println!("{} {}  order {}", i.saga, i.id, i.key);
    println!("  status   {}", i.status.as_str());
    if let Some(step) = &i.step {
        println!(
            "  step     {step}, waiting for {} until {}",
            i.waiting_for.join(" or "),
            i.deadline.as_deref().unwrap_or("-")
        );
    }
    if let Some(reason) = &i.reason {
        println!("  reason   {reason}");
    }
    println!("  request  {} (correlation id)", i.correlation_id);
    println!("  version  {}, started {}", i.version, i.created_at);
    println!("  transitions:");
    for t in &i.transitions {
        let from = t.from.map_or("start", SagaStatus::as_str);
        println!(
            "  {:>3}  {}  {} -> {}  {}  [{}]",
            t.seq,
            t.at,
            from,
            t.to.as_str(),
            t.note,
            t.cause
        );
        for sent in &t.sent {
            println!("         sent {} {}", sent.kind, sent.id);
        }
    }
    println!();
    Ok(())
}
