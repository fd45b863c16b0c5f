//! Marketing and risk review of what the daemon did, read from its store
//! ([`ReviewRead`]), one module per question:
//!
//! - [`log`]: what was sent or held back, filtered, newest first, paged by
//!   keyset, streamed for CSV without holding the rows;
//! - [`funnel`]: per journey, started → each step sent → converted, why the
//!   rest was not sent, and the uplift against the control group;
//! - [`record`]: one customer's decision record, in time order;
//! - [`stats`]: sends and conversions per journey, step and channel, and
//!   the propensity scripts read.
//!
//! The `nudge log`, `nudge funnel` and `nudge explain` commands print them;
//! the admin page will serve the same. Nothing here writes to the store.

pub mod funnel;
pub mod log;
pub mod record;
pub mod stats;
#[cfg(test)]
pub(crate) mod tests;
pub mod unmask;

use chrono::{DateTime, NaiveDate, Utc};

pub use crate::store::review::{LogCursor, LogFilter, ReviewRead};

/// A time given on the command line or in a query: RFC 3339
/// (`2026-03-02T09:00:00Z`), a date (`2026-03-02`, midnight UTC), or a
/// duration before `now` (`7d`, `12h`, `30m`, `1h 30m`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.to_utc());
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    match humantime::parse_duration(text) {
        Ok(d) => chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .ok_or_else(|| format!("`{text}` reaches before any representable time")),
        Err(_) => Err(format!(
            "`{text}` is not a time: give RFC 3339 (2026-03-02T09:00:00Z, or with the offset of your zone: 2026-03-02T09:00:00+11:00), a date (2026-03-02, midnight UTC) or a duration before now (7d, 12h, 30m)"
        )),
    }
}

/// `part / whole`, or `None` when nothing was counted.
pub(crate) fn rate(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// A rate as a percentage with one decimal, `-` when there is none.
pub(crate) fn percent(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0))
}

pub(crate) use crate::humanize::printable;
