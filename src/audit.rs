//! The dispatch log: one record per decision about a step — what was sent, to
//! whom, why, what was held back and why. Marketing reads it; `simulate`
//! prints it as JSON lines or as a timeline.

use std::fmt;
use std::io::Write;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Sent,
    /// Final failure (a 4xx, or retries exhausted).
    Failed,
    /// A send failed and will be tried again (5xx, timeout).
    Retrying,
    /// Policy said no: consent, reachability, caps, kill switch, condition.
    Suppressed,
    /// Quiet hours: tried again when they end.
    Deferred,
    Cancelled,
    Expired,
    HeldOut,
    Shadow,
    Converted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Failed => "failed",
            Outcome::Retrying => "retrying",
            Outcome::Suppressed => "suppressed",
            Outcome::Deferred => "deferred",
            Outcome::Cancelled => "cancelled",
            Outcome::Expired => "expired",
            Outcome::HeldOut => "held_out",
            Outcome::Shadow => "shadow",
            Outcome::Converted => "converted",
        }
    }

    /// Whether the step is settled by this outcome (otherwise it is tried again).
    pub fn is_final(self) -> bool {
        !matches!(self, Outcome::Retrying | Outcome::Deferred)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("unknown outcome `{s}`"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogRecord {
    /// Position in the log (assigned by the store; 0 before it is written).
    #[serde(skip_serializing_if = "is_zero", default)]
    pub seq: i64,
    #[serde(serialize_with = "rfc3339")]
    pub time: DateTime<Utc>,
    pub customer: String,
    pub journey: String,
    pub instance: String,
    pub step: String,
    pub channel: String,
    pub template: String,
    pub outcome: Outcome,
    pub reason: String,
    pub rule_hash: String,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub latency_ms: Option<u64>,
    /// The event that caused this decision, when one did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event_id: Option<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

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
                        "{:<24} {:<10} {:<15} {:<8} {:<10} {:<10} reason",
                        "time", "customer", "journey", "step", "channel", "outcome"
                    )?;
                    self.header_done = true;
                }
                writeln!(
                    self.out,
                    "{:<24} {:<10} {:<15} {:<8} {:<10} {:<10} {}",
                    record.time.to_rfc3339_opts(SecondsFormat::Secs, true),
                    record.customer,
                    record.journey,
                    record.step,
                    record.channel,
                    record.outcome.as_str(),
                    record.reason
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
