//! Selection flags shared by `replay` and `dlq`: times and sequence ranges.

use std::ops::RangeInclusive;

use anyhow::{bail, Context};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Parses a point in time: RFC 3339 (`2026-11-22T10:00:00Z`) or a duration
/// ago (`90s`, `15m`, `2h`, `7d`).
pub(crate) fn parse_time(value: &str) -> anyhow::Result<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(value, &Rfc3339) {
        return Ok(t);
    }
    match parse_duration(value) {
        Ok(ago) => Ok(OffsetDateTime::now_utc() - ago),
        // A number first: meant as a duration, and the unit is wrong.
        Err(e) if value.starts_with(|c: char| c.is_ascii_digit()) => Err(e),
        Err(_) => {
            bail!("{value:?} is neither an RFC 3339 time nor a duration such as 15m, 2h or 7d")
        }
    }
}

/// Parses a duration such as `90s`, `15m`, `2h` or `7d` (the syntax of
/// every duration setting, [`skein_service::standalone::parse_duration`]).
pub(crate) fn parse_duration(value: &str) -> anyhow::Result<time::Duration> {
    let duration = skein_service::standalone::parse_duration(value)?;
    time::Duration::try_from(duration).with_context(|| format!("{value:?} is too long a duration"))
}

/// Parses a sequence range: `A-B`, `A-`, `-B` or `A`.
pub(crate) fn parse_range(value: &str) -> anyhow::Result<RangeInclusive<u64>> {
    let bad = || format!("{value:?} is not a sequence range such as 10-20, 10-, -20 or 15");
    let (from, to) = match value.split_once('-') {
        Some((a, b)) => (a, b),
        None => (value, value),
    };
    let from = if from.is_empty() {
        1
    } else {
        from.parse().with_context(bad)?
    };
    let to = if to.is_empty() {
        u64::MAX
    } else {
        to.parse().with_context(bad)?
    };
    if from > to {
        bail!("{value:?}: the range is empty (start after end)");
    }
    Ok(from..=to)
}

/// Whether a service's database (from a `{service}` URL template) exists,
/// with its URL as shown (password hidden); nothing is created.
pub(crate) async fn service_database(
    template: &str,
    service: &str,
) -> anyhow::Result<(String, bool)> {
    let url = template.replace("{service}", service);
    let shown = skein_outbox::store::redact(&url);
    let exists = skein_outbox::store::database_exists(&url)
        .await
        .with_context(|| {
            format!("cannot look for the {service} database {shown}; check --database-url / DATABASE_URL")
        })?;
    Ok((shown, exists))
}

/// A fixed-width cell: cut with `…` when longer.
pub(crate) fn cell(text: &str, width: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= width {
        format!("{clean:<width$}")
    } else {
        let cut: String = clean.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
pub(crate) fn short_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_in_every_form() -> anyhow::Result<()> {
        assert_eq!(parse_range("10-20")?, 10..=20);
        assert_eq!(parse_range("10-")?, 10..=u64::MAX);
        assert_eq!(parse_range("-20")?, 1..=20);
        assert_eq!(parse_range("7")?, 7..=7);
        assert!(parse_range("20-10").is_err());
        assert!(parse_range("x").is_err());
        Ok(())
    }

    #[test]
    fn times_are_rfc3339_or_durations_ago() -> anyhow::Result<()> {
        let ago = parse_time("2h")?;
        let diff = OffsetDateTime::now_utc() - ago;
        assert!((diff.whole_seconds() - 7200).abs() < 5);
        assert_eq!(parse_time("2026-01-02T03:04:05Z")?.year(), 2026);
        let err = parse_time("yesterday")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("15m"), "{err}");
        assert!(parse_time("5w").is_err());
        assert!(parse_duration("99999999999999d").is_err());
        Ok(())
    }

    #[test]
    fn cells_are_cut_with_an_ellipsis() {
        assert_eq!(cell("abc", 5), "abc  ");
        assert_eq!(cell("abcdefgh", 5), "abcd…");
    }
}
