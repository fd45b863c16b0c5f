//! The dispatch log: one record per decision about a step — what was sent, to
//! whom, why, what was held back and why. Marketing reads it; `simulate`
//! prints it as JSON lines or as a timeline.

use std::io::Write;

use chrono::SecondsFormat;

use crate::humanize::printable;

use crate::model::LogRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// A readable timeline.
    Table,
}

/// Writes records as they come, in the chosen format.
pub struct LogWriter<W: Write> {
    out: W,
    format: Format,
    header_done: bool,
}

impl<W: Write> LogWriter<W> {
    pub fn new(out: W, format: Format) -> Self {
        Self {
            out,
            format,
            header_done: false,
        }
    }

    pub fn write(&mut self, record: &LogRecord) -> std::io::Result<()> {
        match self.format {
            Format::Jsonl => {
                serde_json::to_writer(&mut self.out, record)?;
                writeln!(self.out)
            }
            Format::Table => {
                if !self.header_done {
                    writeln!(
                        self.out,
                        "{:<24} {:<10} {:<15} {:<13} {:<10} {:<10} reason",
                        "time", "customer", "journey", "step", "channel", "outcome"
                    )?;
                    self.header_done = true;
                }
                writeln!(
                    self.out,
                    "{:<24} {:<10} {:<15} {:<13} {:<10} {:<10} {}",
                    record.time.to_rfc3339_opts(SecondsFormat::Secs, true),
                    printable(&record.customer),
                    printable(&record.journey),
                    printable(&record.step),
                    record.channel,
                    record.outcome.as_str(),
                    printable(&record.reason)
                )
            }
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Outcome;
    use chrono::DateTime;

    #[test]
    fn jsonl_has_the_contract_fields() {
        let rec = LogRecord {
            seq: 0,
            time: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .to_utc(),
            customer: "c1".into(),
            journey: "j".into(),
            instance: "i".into(),
            step: "push".into(),
            channel: "push".into(),
            template: "t".into(),
            outcome: Outcome::HeldOut,
            reason: "control group".into(),
            rule_hash: "abc".into(),
            attempt: 0,
            latency_ms: None,
            event_id: None,
            http_status: None,
            response_ms: None,
        };
        let mut buf = Vec::new();
        LogWriter::new(&mut buf, Format::Jsonl).write(&rec).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        for field in [
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
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["outcome"], "held_out");
        assert_eq!(v["time"], "2026-01-01T00:00:00.000Z");
        assert_eq!("held_out".parse::<Outcome>().unwrap(), Outcome::HeldOut);
    }
}
