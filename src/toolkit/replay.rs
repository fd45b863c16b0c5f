//! `nudge replay`: the same events through two rule sets, and what would
//! change: per journey and channel, how many messages each sends, which
//! customers would get more or fewer, and which messages move in time, with
//! examples. Instance ids are derived from (journey, customer, key, event), so
//! the same step of the same instance is compared across both runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::PolicyConfig;
use crate::model::{LogRecord, Outcome};
use crate::rules::RuleSet;
use crate::sim::{read_events, ChannelSettings, Simulation};

const EXAMPLES: usize = 3;

#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub events: usize,
    pub baseline_version: String,
    pub candidate_version: String,
    pub rows: Vec<Row>,
    /// Events a script failed on (dead-lettered by the daemon), per side:
    /// a broken candidate sends nothing, which reads as "fewer" otherwise.
    pub baseline_failures: Failures,
    pub candidate_failures: Failures,
}

/// Rule failures of one side of a replay.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Failures {
    pub count: usize,
    /// Per journey (`-` when no journey is named: a context update).
    pub by_journey: BTreeMap<String, usize>,
    /// The first few, with the event and the reason.
    pub examples: Vec<String>,
}

impl Failures {
    fn of(failures: &[crate::journey::EventFailure]) -> Self {
        let mut out = Failures {
            count: failures.len(),
            ..Failures::default()
        };
        for f in failures {
            let journey = f.journey.clone().unwrap_or_else(|| "-".into());
            *out.by_journey.entry(journey).or_default() += 1;
            if out.examples.len() < EXAMPLES {
                out.examples
                    .push(format!("event {}: {}", f.event_id, f.reason));
            }
        }
        out
    }

    fn to_text(&self, side: &str, out: &mut String) {
        if self.count == 0 {
            return;
        }
        let per: Vec<String> = self
            .by_journey
            .iter()
            .map(|(j, n)| format!("{j} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "{side} rules failed on {} ({}), each dead-lettered by the daemon:",
            crate::humanize::count(self.count as u64, "event", "events"),
            per.join(", ")
        );
        for e in &self.examples {
            let _ = writeln!(out, "  {e}");
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Row {
    pub journey: String,
    pub channel: String,
    pub baseline_sent: usize,
    pub candidate_sent: usize,
    /// Customers who would get more messages on this journey and channel.
    pub customers_more: usize,
    pub customers_fewer: usize,
    /// Messages both send, at a different time.
    pub retimed: usize,
    /// Messages both send, with another template or other variables.
    pub reworded: usize,
    pub examples: Vec<String>,
}

impl ReplayReport {
    /// Whether a customer would be treated otherwise, or a script fails
    /// where it did not.
    pub fn changed(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.customers_more + r.customers_fewer + r.retimed + r.reworded > 0)
            || self.candidate_failures.by_journey != self.baseline_failures.by_journey
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "replayed {}: baseline rules {} vs candidate rules {}",
            crate::humanize::count(self.events as u64, "event", "events"),
            self.baseline_version,
            self.candidate_version
        );
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:>8} {:>9} {:>6} {:>5} {:>6} {:>7} {:>8}",
            "journey",
            "channel",
            "baseline",
            "candidate",
            "change",
            "more",
            "fewer",
            "retimed",
            "reworded"
        );
        for r in &self.rows {
            let change = r.candidate_sent as i64 - r.baseline_sent as i64;
            let _ = writeln!(
                out,
                "{:<16} {:<10} {:>8} {:>9} {:>+6} {:>5} {:>6} {:>7} {:>8}",
                r.journey,
                r.channel,
                r.baseline_sent,
                r.candidate_sent,
                change,
                r.customers_more,
                r.customers_fewer,
                r.retimed,
                r.reworded
            );
        }
        self.baseline_failures.to_text("baseline", &mut out);
        self.candidate_failures.to_text("candidate", &mut out);
        let examples: Vec<&String> = self.rows.iter().flat_map(|r| &r.examples).collect();
        if examples.is_empty() {
            let _ = writeln!(out, "no customer would get a different message");
        } else {
            let _ = writeln!(out, "examples:");
            for e in examples {
                let _ = writeln!(out, "  {e}");
            }
        }
        out
    }
}

/// Runs `events` through both rule sets and compares what each sends, each
/// under the config's channel settings as `nudge run` applies them
/// (lateness bounds, send-rate limits, withdrawals).
pub async fn replay(
    events: &Path,
    baseline: RuleSet,
    candidate: RuleSet,
    policy: &PolicyConfig,
    channels: &ChannelSettings,
) -> anyhow::Result<ReplayReport> {
    let file = read_events(events)?;
    let mut report = ReplayReport {
        events: file.events.len(),
        baseline_version: baseline.version.clone(),
        candidate_version: candidate.version.clone(),
        ..ReplayReport::default()
    };
    let (base, base_said, base_failed) = run(&file.events, baseline, policy, channels).await?;
    let (cand, cand_said, cand_failed) = run(&file.events, candidate, policy, channels).await?;
    report.baseline_failures = Failures::of(&base_failed);
    report.candidate_failures = Failures::of(&cand_failed);
    // A customer's events a script failed on, per journey: why nothing
    // started for them, when nothing did.
    let failed_for = |failed: &[crate::journey::EventFailure]| {
        let mut m: HashMap<(String, String), String> = HashMap::new();
        for f in failed {
            let customer = file.events[f.index].1.customer.clone();
            let journey = f.journey.clone().unwrap_or_default();
            m.entry((journey, customer))
                .or_insert_with(|| format!("script failed on event {}: {}", f.event_id, f.reason));
        }
        m
    };
    let (base_failed, cand_failed) = (failed_for(&base_failed), failed_for(&cand_failed));

    // (journey, channel) → customer → sends.
    let mut groups: BTreeSet<(String, String)> = BTreeSet::new();
    for r in base
        .iter()
        .chain(cand.iter())
        .filter(|r| r.outcome == Outcome::Sent)
    {
        groups.insert((r.journey.clone(), r.channel.clone()));
    }
    for (journey, channel) in groups {
        let pick = |records: &[LogRecord]| -> BTreeMap<String, Vec<(String, DateTime<Utc>)>> {
            let mut m: BTreeMap<String, Vec<(String, DateTime<Utc>)>> = BTreeMap::new();
            for r in records.iter().filter(|r| {
                r.outcome == Outcome::Sent && r.journey == journey && r.channel == channel
            }) {
                m.entry(r.customer.clone())
                    .or_default()
                    .push((format!("{}:{}", r.instance, r.step), r.time));
            }
            m
        };
        let (b, c) = (pick(&base), pick(&cand));
        let mut row = Row {
            journey: journey.clone(),
            channel: channel.clone(),
            ..Row::default()
        };
        row.baseline_sent = b.values().map(Vec::len).sum();
        row.candidate_sent = c.values().map(Vec::len).sum();
        let customers: BTreeSet<&String> = b.keys().chain(c.keys()).collect();
        let why_not = |records: &[LogRecord],
                       failed: &HashMap<(String, String), String>,
                       customer: &str|
         -> String {
            if let Some(failure) = failed.get(&(journey.clone(), customer.to_string())) {
                return failure.clone();
            }
            records
                .iter()
                .rev()
                .find(|r| {
                    r.customer == customer
                        && r.journey == journey
                        && r.channel == channel
                        && r.outcome != Outcome::Sent
                })
                .map(|r| format!("{} ({})", r.outcome, r.reason))
                .unwrap_or_else(|| "not started".into())
        };
        for customer in customers {
            let empty = Vec::new();
            let (bs, cs) = (
                b.get(customer).unwrap_or(&empty),
                c.get(customer).unwrap_or(&empty),
            );
            if cs.len() > bs.len() {
                row.customers_more += 1;
                if row.examples.len() < EXAMPLES {
                    row.examples.push(format!(
                        "{journey}/{channel}: {customer} gets {} instead of {} (baseline: {})",
                        cs.len(),
                        bs.len(),
                        why_not(&base, &base_failed, customer)
                    ));
                }
            } else if cs.len() < bs.len() {
                row.customers_fewer += 1;
                if row.examples.len() < EXAMPLES {
                    row.examples.push(format!(
                        "{journey}/{channel}: {customer} gets {} instead of {} (candidate: {})",
                        cs.len(),
                        bs.len(),
                        why_not(&cand, &cand_failed, customer)
                    ));
                }
            }
            let cand_times: HashMap<&String, &DateTime<Utc>> =
                cs.iter().map(|(k, t)| (k, t)).collect();
            for (key, t) in bs {
                if let (true, Some(was), Some(is)) = (
                    cand_times.contains_key(key),
                    base_said.get(key),
                    cand_said.get(key),
                ) {
                    if let Some(change) = content_change(was, is) {
                        row.reworded += 1;
                        if row.examples.len() < EXAMPLES {
                            row.examples.push(format!(
                                "{journey}/{channel}: {customer} {key} says something else: {change}"
                            ));
                        }
                    }
                }
                if let Some(ct) = cand_times.get(key) {
                    if *ct != t {
                        row.retimed += 1;
                        if row.examples.len() < EXAMPLES {
                            row.examples.push(format!(
                                "{journey}/{channel}: {customer} {key} moves from {} to {}",
                                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                                ct.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                            ));
                        }
                    }
                }
            }
        }
        report.rows.push(row);
    }
    Ok(report)
}

/// What a message says: its template and variables (by `instance:step`).
type Said = HashMap<String, (String, crate::model::Variables)>;

/// How two messages of one step differ in what they say, if they do:
/// the template, or the names of the variables that differ (not their
/// values, which may be a customer's).
fn content_change(
    (was_template, was): &(String, crate::model::Variables),
    (is_template, is): &(String, crate::model::Variables),
) -> Option<String> {
    if was_template != is_template {
        return Some(format!("template {was_template} -> {is_template}"));
    }
    if was == is {
        return None;
    }
    let (was, is) = (was.to_map(), is.to_map());
    let names: BTreeSet<&String> = was
        .keys()
        .chain(is.keys())
        .filter(|k| was.get(*k) != is.get(*k))
        .collect();
    let names: Vec<&str> = names.into_iter().map(String::as_str).collect();
    Some(format!("variables {} differ", names.join(", ")))
}

async fn run(
    events: &[(usize, crate::event::Event)],
    rules: RuleSet,
    policy: &PolicyConfig,
    channels: &ChannelSettings,
) -> anyhow::Result<(Vec<LogRecord>, Said, Vec<crate::journey::EventFailure>)> {
    let start = events.first().map(|(_, e)| e.time).unwrap_or_else(Utc::now);
    let sim = Simulation::with_settings(rules, start, policy.clone(), channels.clone())?;
    let events: Vec<crate::event::Event> = events.iter().map(|(_, e)| e.clone()).collect();
    let (failures, mut records) = sim.feed_in_moments(events).await?;
    records.extend(sim.finish().await?);
    let said = sim
        .messages()
        .into_iter()
        .map(|m| {
            (
                format!("{}:{}", m.instance, m.step),
                (m.template, m.variables),
            )
        })
        .collect();
    Ok((records, said, failures))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::dispatch::Rate;
    use crate::model::ChannelKind;
    use crate::rules::{load_dir, Limits};

    fn repo(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    /// A replay runs the journeys under the config's send-rate limits, as
    /// the daemon does: pushes over the rate wait for their turn.
    #[tokio::test]
    async fn replay_applies_the_channels_rate_limits() {
        let events = read_events(&repo("examples/events.jsonl")).unwrap().events;
        let rules = || load_dir(&repo("rules"), &Limits::default()).unwrap();
        let waits = |records: &[LogRecord]| {
            records
                .iter()
                .filter(|r| r.outcome == Outcome::Deferred && r.reason.starts_with("rate limit"))
                .count()
        };
        let policy = PolicyConfig::default();
        let (free, _, _) = run(&events, rules(), &policy, &ChannelSettings::default())
            .await
            .unwrap();
        assert_eq!(waits(&free), 0);
        // The examples' pushes go an hour apart: one every two hours makes some wait.
        let mut limited = ChannelSettings::default();
        limited.rates.insert(
            ChannelKind::Push,
            Rate {
                count: 1,
                per: Duration::from_secs(7200),
            },
        );
        let (slowed, _, _) = run(&events, rules(), &policy, &limited).await.unwrap();
        assert!(waits(&slowed) > 0, "{slowed:#?}");
    }
}
