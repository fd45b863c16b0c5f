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
pub const CSV_COLUMNS: [&str; 16] = [
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
    "http_status",
    "response_ms",
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
                let latency = r.latency_ms.map_or_else(String::new, |l| {
                    crate::humanize::duration(std::time::Duration::from_millis(l))
                });
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
                    write!(self.out, "{}\r\n", CSV_COLUMNS.join(","))?;
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
                    r.http_status.map(|s| s.to_string()).unwrap_or_default(),
                    r.response_ms.map(|l| l.to_string()).unwrap_or_default(),
                ];
                let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                // RFC 4180 ends every record, the last one too, with CRLF.
                write!(self.out, "{}\r\n", line.join(","))
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
        let [customer, journey, step, reason] =
            [customer, journey, step, reason].map(super::printable);
        writeln!(
            self.out,
            "{time:<20}  {customer:<10}  {journey:<14}  {step:<13}  {channel:<9}  {outcome:<10}  {attempt:>3}  {latency:>10}  {reason}"
        )
    }

    /// Ends the output (the JSON array's bracket; an empty array or just
    /// the CSV header when nothing was written) and flushes it. Returns the
    /// records written.
    pub fn finish(mut self) -> std::io::Result<usize> {
        match self.format {
            LogFormat::Json if self.written == 0 => self.out.write_all(b"[]\n")?,
            LogFormat::Json => self.out.write_all(b"\n]\n")?,
            LogFormat::Csv if self.written == 0 => {
                write!(self.out, "{}\r\n", CSV_COLUMNS.join(","))?
            }
            _ => {}
        }
        self.out.flush()?;
        Ok(self.written)
    }
}

/// A record in JSON with every field present (`null` when it has no
/// value), so that each object has the same keys, and its seq (the
/// store's position).
struct JsonRecord<'a>(&'a LogRecord);

impl serde::Serialize for JsonRecord<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(self.0).map_err(serde::ser::Error::custom)?;
        v["seq"] = self.0.seq.into();
        for optional in ["latency_ms", "event_id", "http_status", "response_ms"] {
            if v.get(optional).is_none() {
                v[optional] = serde_json::Value::Null;
            }
        }
        v.serialize(s)
    }
}

/// One CSV field (RFC 4180): quoted when it holds a comma, quote or line
/// break. A text starting like a spreadsheet formula (`=`, `+`, `@`, `-`
/// followed by more) gets a leading `'`, so opening the file cannot run
/// anything an event put in a customer id or a reason (CSV injection).
///
/// Other control characters, and invisible or direction-changing ones, are
/// written escaped (`\u{1b}`), as in the table: the file is read on
/// terminals too, where an escape sequence in a customer id would act.
pub fn csv_field(value: &str) -> String {
    let value = crate::humanize::escaped_where(value, |c| {
        crate::humanize::hidden(c) && !matches!(c, '\n' | '\r' | '\t')
    });
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
        assert_eq!(
            csv_field("c-1\u{1b}[2J\u{202e}x"),
            "c-1\\u{1b}[2J\\u{202e}x",
            "acts on no terminal"
        );
    }

    fn record(customer: &str) -> LogRecord {
        let subject = crate::model::StepRef {
            customer,
            journey: "j",
            instance: "i",
            step: "call:withdraw",
            channel: "call_task",
            template: "t",
            rule_hash: "h",
        };
        LogRecord::about(
            subject,
            chrono::DateTime::UNIX_EPOCH,
            crate::model::Outcome::Withdrawn,
            "r",
        )
    }

    fn written(format: LogFormat, records: &[LogRecord]) -> String {
        let mut out = Vec::new();
        let mut w = LogWriter::new(&mut out, format);
        for r in records {
            w.write(r).unwrap();
        }
        w.finish().unwrap();
        String::from_utf8(out).unwrap()
    }

    /// What an event put in a customer id (an escape sequence, a line
    /// break) is shown, not acted on: one line per record, no ESC.
    #[test]
    fn the_table_shows_control_characters_escaped_and_lateness_for_people() {
        let mut late = record("c-1");
        late.latency_ms = Some(20_676_588);
        let table = written(
            LogFormat::Table,
            &[
                record("c-\u{1b}[2J\nforged  sent"),
                late,
                record("c-1\u{200b}\u{202e}"),
            ],
        );
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(table.contains("c-1\\u{200b}\\u{202e}"), "{table}");
        assert!(!table.contains('\u{1b}'), "{table:?}");
        assert!(table.contains("c-\\u{1b}[2J\\nforged"), "{table}");
        assert!(table.contains(" 5h 44m 36s  r"), "{table}");
        // A step as long as `call:withdraw` and a lateness of hours keep
        // the columns under their headers.
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0].find("channel"),
            lines[2].find("call_task"),
            "{table}"
        );
        assert_eq!(
            lines[0].find("reason"),
            lines[2].find(" r").map(|i| i + 1),
            "{table}"
        );
    }

    /// Every JSON record has the same keys, absent values as null; the CSV
    /// has the HTTP status and response time too.
    #[test]
    fn json_records_have_the_same_keys_and_csv_the_answer() {
        let mut answered = record("c-2");
        answered.http_status = Some(503);
        answered.response_ms = Some(12);
        answered.latency_ms = Some(5);
        answered.event_id = Some("e".into());
        let json: Vec<serde_json::Value> = serde_json::from_str(&written(
            LogFormat::Json,
            &[record("c-1"), answered.clone()],
        ))
        .unwrap();
        let keys =
            |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&json[0]), keys(&json[1]));
        assert!(json[0]["http_status"].is_null() && json[1]["http_status"] == 503);
        let csv = written(LogFormat::Csv, &[answered]);
        let mut lines = csv.lines();
        assert!(lines.next().unwrap().ends_with(",http_status,response_ms"));
        assert!(lines.next().unwrap().ends_with(",5,e,503,12"), "{csv}");
    }
}
