//! `skein trace <correlation-id | order-id>`: the causal chain of one
//! request across services, as a tree by causation id (see
//! [`skein_service::trace`] for where each message comes from).

use skein_service::trace::{trace, Trace, TraceError};

use super::select::parse_time;

/// Show the causal chain of one request or order.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A correlation id (an HTTP request's x-request-id) or an order id.
    id: String,
    /// Look for a correlation id only in events since then (RFC 3339, or 15m, 2h, 7d ago).
    #[arg(long)]
    since: Option<String>,
    /// Output: an indented tree, or JSON (one message per line, in tree order).
    #[arg(long, value_enum, default_value_t = Format::Tree)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Tree,
    Json,
}

pub(crate) async fn run(nats_url: &str, args: Args) -> anyhow::Result<()> {
    let bus = super::connect(nats_url).await?;
    let since = args.since.as_deref().map(parse_time).transpose()?;
    let found = match trace(&bus, &args.id, since).await {
        Ok(found) => found,
        Err(TraceError::NotFound(id)) => anyhow::bail!(
            "no message has correlation id or entity {id:?}; check the id (skein replay --correlation / --entity), or widen --since"
        ),
        Err(e) => return Err(e.into()),
    };
    for gap in &found.gaps {
        eprintln!("({gap})");
    }
    match args.format {
        Format::Json => {
            for entry in &found.messages {
                println!("{}", serde_json::to_string(entry)?);
            }
        }
        Format::Tree => print_tree(&found),
    }
    Ok(())
}

fn print_tree(found: &Trace) {
    let failures = found.failures();
    println!(
        "{} messages from {} (offsets from the first; in brackets the time since its cause){}",
        found.messages.len(),
        super::select::short_time(found.first),
        if failures > 0 {
            format!("; {failures} FAILED")
        } else {
            String::new()
        }
    );
    for entry in &found.messages {
        let hop = &entry.hop;
        if entry.depth == 0 {
            match hop.causation_id {
                Some(c) => {
                    println!("caused by {c} (not in the streams: a client's command, consumed)")
                }
                None => println!("(no cause: the start of a chain)"),
            }
        }
        let since_cause = entry
            .hop_ms
            .map_or(String::new(), |ms| format!(" [+{ms} ms]"));
        let mark = match (&hop.failure, hop.found_in) {
            (Some(f), _) => format!("  !! {f}"),
            (None, "commands") => "  (waiting in COMMANDS)".to_owned(),
            _ => String::new(),
        };
        println!(
            "{}{:>7} ms{}  {:<12} {}{}",
            "  ".repeat(entry.depth + 1),
            entry.offset_ms,
            since_cause,
            hop.service,
            hop.kind,
            mark
        );
    }
}
