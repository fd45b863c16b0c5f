//! The dispatch log as a reviewer reads it: filtered, newest first, a page
//! at a time by keyset ([`page`]), or all of a filter's records streamed a
//! page at a time ([`LogStream`]: memory stays one page whatever the
//! count), written as a table, CSV or JSON.

use std::collections::VecDeque;
use std::io::Write;

use chrono::SecondsFormat;

use super::{LogCursor, LogFilter, ReviewRead};
use crate::model::LogRecord;
use crate::store::StoreError;

/// Records per store read when streaming.
pub const STREAM_PAGE: usize = 1_000;

/// One page of the filtered log and where the next one starts (`None`: this
/// was the last).
#[derive(Debug, Clone)]
pub struct LogPage {
    pub records: Vec<LogRecord>,
    pub next: Option<LogCursor>,
}

/// Up to `limit` records passing `filter` after `after`, newest first. One
/// record more is read to know whether another page follows.
pub fn page(
    store: &dyn ReviewRead,
    filter: &LogFilter,
    after: Option<LogCursor>,
    limit: usize,
) -> Result<LogPage, StoreError> {
    let limit = limit.max(1);
    let mut records = store.log_page(filter, after, limit + 1)?;
    let next = match records.len() > limit {
        true => {
            records.truncate(limit);
            records.last().map(LogCursor::of)
        }
        false => None,
    };
    Ok(LogPage { records, next })
}

/// Every record passing a filter (up to a limit), newest first, read a page
/// at a time through the keyset: the iterator holds one page.
pub struct LogStream<'a> {
    store: &'a dyn ReviewRead,
    filter: LogFilter,
    after: Option<LogCursor>,
    buffer: VecDeque<LogRecord>,
    /// Records still to yield (`None`: all).
    remaining: Option<usize>,
    page_size: usize,
    exhausted: bool,
}

impl<'a> LogStream<'a> {
    pub fn new(store: &'a dyn ReviewRead, filter: LogFilter, limit: Option<usize>) -> Self {
        Self::with_page_size(store, filter, limit, STREAM_PAGE)
    }

    pub fn with_page_size(
        store: &'a dyn ReviewRead,
        filter: LogFilter,
        limit: Option<usize>,
        page_size: usize,
    ) -> Self {
        Self {
            store,
            filter,
            after: None,
            buffer: VecDeque::new(),
            remaining: limit,
            page_size: page_size.max(1),
            exhausted: false,
        }
    }
}

impl Iterator for LogStream<'_> {
    type Item = Result<LogRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == Some(0) {
            return None;
        }
        if self.buffer.is_empty() && !self.exhausted {
            let want = self
                .remaining
                .map_or(self.page_size, |r| r.min(self.page_size));
            match self.store.log_page(&self.filter, self.after, want) {
                Ok(records) => {
                    self.exhausted = records.len() < want;
                    self.after = records.last().map(LogCursor::of).or(self.after);
                    self.buffer.extend(records);
                }
                Err(e) => {
                    self.exhausted = true;
                    return Some(Err(e));
                }
            }
        }
        let record = self.buffer.pop_front()?;
        if let Some(r) = &mut self.remaining {
            *r -= 1;
        }
        Some(Ok(record))
    }
}

/// How `nudge log` prints records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Aligned columns for a terminal.
    Table,
    /// RFC 4180 CSV with a header row (for spreadsheets and warehouses).
    Csv,
    /// One JSON array of records.
    Json,
}

/// The columns of the CSV, in order.
pub const CSV_COLUMNS: [&str; 14] = [
    "seq",
    "time",
    "customer",
    "journey",
    "instance",
    "step",
    "channel",
    "template",
    "outcome",
    "reason",
    "rule_hash",
    "attempt",
    "latency_ms",
    "event_id",
];

/// Writes records as they come; [`finish`](Self::finish) closes the output.
pub struct LogWriter<W: Write> {
    out: W,
    format: LogFormat,
    written: usize,
}

impl<W: Write> LogWriter<W> {
    pub fn new(out: W, format: LogFormat) -> Self {
        Self {
            out,
            format,
            written: 0,
        }
    }

    pub fn write(&mut self, r: &LogRecord) -> std::io::Result<()> {
        let first = self.written == 0;
        self.written += 1;
        match self.format {
            LogFormat::Table => {
                if first {
                    self.table_row(
                        "time", "customer", "journey", "step", "channel", "outcome", "try", "late",
                        "reason",
                    )?;
                }
                let latency = r.latency_ms.map_or_else(String::new, |l| format!("{l}ms"));
                self.table_row(
                    &r.time.to_rfc3339_opts(SecondsFormat::Secs, true),
                    &r.customer,
                    &r.journey,
                    &r.step,
                    &r.channel,
                    r.outcome.as_str(),
                    &r.attempt.to_string(),
                    &latency,
                    &r.reason,
                )
            }
            LogFormat::Csv => {
                if first {
                    writeln!(self.out, "{}", CSV_COLUMNS.join(","))?;
                }
                let fields = [
                    r.seq.to_string(),
                    r.time.to_rfc3339_opts(SecondsFormat::Millis, true),
                    r.customer.clone(),
                    r.journey.clone(),
                    r.instance.clone(),
                    r.step.clone(),
                    r.channel.clone(),
                    r.template.clone(),
                    r.outcome.as_str().into(),
                    r.reason.clone(),
                    r.rule_hash.clone(),
                    r.attempt.to_string(),
                    r.latency_ms.map(|l| l.to_string()).unwrap_or_default(),
                    r.event_id.clone().unwrap_or_default(),
                ];
                let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                writeln!(self.out, "{}", line.join(","))
            }
            LogFormat::Json => {
                self.out.write_all(if first { b"[\n" } else { b",\n" })?;
                serde_json::to_writer(&mut self.out, &JsonRecord(r))?;
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn table_row(
        &mut self,
        time: &str,
        customer: &str,
        journey: &str,
        step: &str,
        channel: &str,
        outcome: &str,
        attempt: &str,
        latency: &str,
        reason: &str,
    ) -> std::io::Result<()> {
        writeln!(
            self.out,
            "{time:<20}  {customer:<10}  {journey:<14}  {step:<6}  {channel:<9}  {outcome:<10}  {attempt:>3}  {latency:>7}  {reason}"
        )
    }

    /// Ends the output (the JSON array's bracket; an empty array or just
    /// the CSV header when nothing was written) and flushes it. Returns the
    /// records written.
    pub fn finish(mut self) -> std::io::Result<usize> {
        match self.format {
            LogFormat::Json if self.written == 0 => self.out.write_all(b"[]\n")?,
            LogFormat::Json => self.out.write_all(b"\n]\n")?,
            LogFormat::Csv if self.written == 0 => writeln!(self.out, "{}", CSV_COLUMNS.join(","))?,
            _ => {}
        }
        self.out.flush()?;
        Ok(self.written)
    }
}

/// A record in JSON with its seq always present (the store's position).
struct JsonRecord<'a>(&'a LogRecord);

impl serde::Serialize for JsonRecord<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(self.0).map_err(serde::ser::Error::custom)?;
        v["seq"] = self.0.seq.into();
        v.serialize(s)
    }
}

/// One CSV field (RFC 4180): quoted when it holds a comma, quote or line
/// break. A text starting like a spreadsheet formula (`=`, `+`, `@`, `-`
/// followed by more) gets a leading `'`, so opening the file cannot run
/// anything an event put in a customer id or a reason (CSV injection).
pub fn csv_field(value: &str) -> String {
    let risky = matches!(value.chars().next(), Some('=' | '+' | '@' | '\t' | '\r'))
        || (value.starts_with('-') && value.len() > 1);
    let value = if risky {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_field("-"), "-");
        assert_eq!(csv_field("-1+2"), "'-1+2");
    }
}
