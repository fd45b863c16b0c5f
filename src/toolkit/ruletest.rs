//! `nudge test`: journey tests next to the journeys, in the spirit of
//! `opa test`. A `NAME.test.toml` file holds cases; each case feeds events at
//! offsets from its start and lists the dispatch-log records it expects, in
//! order. Any difference fails the case with a diff naming file and case.
//!
//! ```toml
//! journey = "unsigned_loan"          # default journey of the expectations
//! [[case]]
//! name = "signed after the push, before the email"
//! events = [
//!   { at = "0s", type = "loan_application.completed", data = { application_id = "A-1", signed = false } },
//!   { at = "12h", type = "loan_application.signed", data = { application_id = "A-1" } },
//! ]
//! expect = [
//!   { at = "0s", step = "push", outcome = "sent" },
//!   { at = "12h", step = "email", outcome = "converted" },
//!   { at = "12h", step = "call", outcome = "converted" },
//! ]
//! ```

use std::fmt::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::offset_text;
use crate::config::PolicyConfig;
use crate::event::Event;
use crate::model::LogRecord;
use crate::rules::{parse_delay, RuleSet};
use crate::sim::{ChannelSettings, Simulation};

/// Noon in Sydney on a Monday: clear of quiet hours unless a case moves it.
const DEFAULT_START: &str = "2026-01-05T01:00:00Z";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// Journey the expectations refer to unless they name one.
    journey: Option<String>,
    /// Customer of events that do not name one.
    #[serde(default = "default_customer")]
    customer: String,
    start: Option<DateTime<Utc>>,
    /// Which records the expectations are compared with.
    #[serde(default)]
    scope: Scope,
    #[serde(default, rename = "case")]
    cases: Vec<Case>,
}

/// `all` (the default): the whole log of the case, every journey's.
/// `journey`: only the records of the journeys the file names (its
/// `journey` and any an expectation names), so that a catalogue's other
/// journeys on the same trigger do not break the file; they still run,
/// and still compete for the customer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Scope {
    #[default]
    All,
    Journey,
}

fn default_customer() -> String {
    "c-1".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    start: Option<DateTime<Utc>>,
    #[serde(default)]
    events: Vec<TestEvent>,
    #[serde(default)]
    expect: Vec<Expect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestEvent {
    #[serde(default = "zero")]
    at: String,
    #[serde(rename = "type")]
    event_type: String,
    customer: Option<String>,
    /// Defaults to a fresh id; repeat an id to test duplicate delivery.
    id: Option<String>,
    #[serde(default)]
    data: toml::Table,
}

fn zero() -> String {
    "0s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    at: String,
    journey: Option<String>,
    step: String,
    /// Read as an outcome, so that a typo is refused with its line.
    outcome: crate::model::Outcome,
    customer: Option<String>,
    /// Text the record's reason must contain.
    reason: Option<String>,
    /// Template variables the sent message must carry (a subset).
    vars: Option<toml::Table>,
}

/// Result of running every test file in a directory.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    /// One block of text per failure: file, case and diff.
    pub failures: Vec<String>,
}

/// What the cases run under, as `nudge simulate` and the daemon would:
/// the contact policy and each channel's lateness, rate and withdrawal of
/// `--config` (the defaults without one).
#[derive(Debug, Clone, Default)]
pub struct Under {
    pub policy: PolicyConfig,
    pub channels: ChannelSettings,
}

/// Runs every `*.test.toml` under `dir` (subdirectories too) against `rules`.
pub async fn run_dir(
    dir: &Path,
    rules_for_case: impl Fn() -> anyhow::Result<RuleSet>,
    under: &Under,
) -> anyhow::Result<Report> {
    let files = crate::rules::files_under(dir, ".test.toml")?;
    run_files(&files, rules_for_case, under).await
}

/// Runs the cases of each test file, in order, against `rules`.
pub async fn run_files(
    files: &[std::path::PathBuf],
    rules_for_case: impl Fn() -> anyhow::Result<RuleSet>,
    under: &Under,
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    for file in files {
        run_file(file, &rules_for_case, under, &mut report).await?;
    }
    Ok(report)
}

async fn run_file(
    path: &Path,
    rules_for_case: &impl Fn() -> anyhow::Result<RuleSet>,
    under: &Under,
    report: &mut Report,
) -> anyhow::Result<()> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)?;
    let file: TestFile = match toml::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            report.failed += 1;
            report
                .failures
                .push(format!("{shown}: cannot read test file: {e}"));
            return Ok(());
        }
    };
    for case in &file.cases {
        match run_case(&file, case, rules_for_case()?, under).await {
            Ok(None) => report.passed += 1,
            Ok(Some(diff)) => {
                report.failed += 1;
                report
                    .failures
                    .push(format!("{shown}: case \"{}\" failed:\n{diff}", case.name));
            }
            Err(e) => {
                report.failed += 1;
                report
                    .failures
                    .push(format!("{shown}: case \"{}\": {e}", case.name));
            }
        }
    }
    Ok(())
}

/// The loaded names nearest to a misspelt one (a catalogue may hold
/// thousands: never all of them).
fn nearest_names<'a>(wanted: &str, loaded: impl Iterator<Item = &'a str>) -> String {
    let mut by_distance: Vec<(usize, &str)> =
        loaded.map(|n| (edit_distance(wanted, n), n)).collect();
    let count = by_distance.len();
    by_distance.sort();
    let near: Vec<&str> = by_distance.iter().take(3).map(|(_, n)| *n).collect();
    match near.as_slice() {
        [] => "no journeys are loaded".to_string(),
        _ => format!(
            "{} loaded; nearest: {}",
            crate::humanize::count(count as u64, "journey", "journeys"),
            near.join(", ")
        ),
    }
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Runs one case; `Some(diff)` when it fails.
async fn run_case(
    file: &TestFile,
    case: &Case,
    rules: RuleSet,
    under: &Under,
) -> anyhow::Result<Option<String>> {
    let start = case
        .start
        .or(file.start)
        .unwrap_or_else(|| DEFAULT_START.parse().expect("valid default"));
    // An expectation about a journey that is not loaded (a typo) could
    // only fail as a diff that never says why.
    for x in &case.expect {
        if let Some(journey) = x.journey.as_deref().or(file.journey.as_deref()) {
            let Some(loaded) = rules.journey(journey) else {
                anyhow::bail!(
                    "an expectation names journey `{journey}`, which is not loaded ({})",
                    nearest_names(journey, rules.journeys().iter().map(|j| j.name.as_str()))
                );
            };
            // A withdrawal is logged under its step's id and a suffix.
            let step = crate::model::withdrawn_step(&x.step).unwrap_or(&x.step);
            // `-`: a record about the instance as a whole (an exit's).
            if step != "-" && !loaded.steps.iter().any(|s| s.id == step) {
                let ids = loaded.steps.iter().map(|s| s.id.as_str());
                let nearest = ids
                    .clone()
                    .min_by_key(|id| edit_distance(step, id))
                    .filter(|id| edit_distance(step, id) <= 2.max(step.len() / 3));
                anyhow::bail!(
                    "an expectation names step `{}` of journey `{journey}`, which has no such step ({}{})",
                    x.step,
                    match nearest {
                        Some(n) => format!("did you mean `{n}`? "),
                        None => String::new(),
                    },
                    format_args!("its steps: {}", ids.collect::<Vec<_>>().join(", "))
                );
            }
        }
    }
    let sim =
        Simulation::with_settings(rules, start, under.policy.clone(), under.channels.clone())?;
    let mut records: Vec<LogRecord> = Vec::new();
    let mut events = Vec::with_capacity(case.events.len());
    for (i, e) in case.events.iter().enumerate() {
        let at = start + offset(&e.at)?;
        let json = serde_json::json!({
            "specversion": "1.0",
            "id": e.id.clone().unwrap_or_else(|| format!("test-{i}")),
            "type": e.event_type,
            "source": "nudge-test",
            "subject": e.customer.as_deref().unwrap_or(&file.customer),
            "time": at.to_rfc3339(),
            "data": serde_json::to_value(&e.data)?,
        });
        let event = Event::parse(json.to_string().as_bytes())
            .map_err(|err| anyhow::anyhow!("event {} ({}): {err}", i + 1, e.event_type))?;
        events.push(event);
    }
    // Events at one offset are decided together, as the daemon decides a batch.
    let (failures, recs) = sim.feed_in_moments(events).await?;
    records.extend(recs);
    records.extend(sim.finish().await?);
    let named: std::collections::HashSet<&str> = case
        .expect
        .iter()
        .filter_map(|x| x.journey.as_deref())
        .chain(file.journey.as_deref())
        .collect();
    let in_scope = |journey: Option<&str>| match file.scope {
        Scope::All => true,
        // An error of no journey (a bad event) is the case's own.
        Scope::Journey => journey.is_none_or(|j| named.contains(j)),
    };
    let rule_errors: Vec<String> = failures
        .into_iter()
        .filter(|f| in_scope(f.journey.as_deref()))
        .map(|f| f.reason)
        .collect();
    records.retain(|r| in_scope(Some(&r.journey)));
    if !rule_errors.is_empty() {
        return Ok(Some(format!(
            "  script errors:\n    {}",
            rule_errors.join("\n    ")
        )));
    }

    let default_journey = file.journey.as_deref();
    let expected: Vec<String> = case
        .expect
        .iter()
        .map(|x| -> anyhow::Result<String> {
            let journey = x.journey.as_deref().or(default_journey).ok_or_else(|| anyhow::anyhow!("expectation for step {} names no journey (set `journey` at the top of the file)", x.step))?;
            Ok(line(&offset_text(offset(&x.at)?), x.customer.as_deref().unwrap_or(&file.customer), journey, &x.step, x.outcome.as_str()))
        })
        .collect::<anyhow::Result<_>>()?;
    let actual: Vec<String> = records
        .iter()
        .map(|r| {
            line(
                &offset_text(r.time - start),
                &r.customer,
                &r.journey,
                &r.step,
                r.outcome.as_str(),
            )
        })
        .collect();
    if expected != actual {
        // An unexpected record says why it is what it is (which rule
        // deferred or suppressed it), so that the diff alone explains it.
        let reasons: Vec<String> = records
            .iter()
            .map(|r| match r.outcome {
                crate::model::Outcome::Sent => String::new(),
                _ => crate::humanize::printable(&r.reason).into_owned(),
            })
            .collect();
        return Ok(Some(diff(&expected, &actual, &reasons)));
    }
    // Same sequence: now the finer checks on each record.
    let messages = sim.channel.messages();
    let mut problems = String::new();
    for (x, r) in case.expect.iter().zip(&records) {
        if let Some(want) = &x.reason {
            if !r.reason.contains(want.as_str()) {
                let _ = writeln!(
                    problems,
                    "  {}: reason {:?} does not contain {want:?}",
                    line_of(r, start),
                    r.reason
                );
            }
        }
        if let Some(vars) = &x.vars {
            let msg = messages
                .iter()
                .find(|m| m.instance == r.instance && m.step == r.step);
            let Some(msg) = msg else {
                let _ = writeln!(
                    problems,
                    "  {}: no message was sent to check vars against",
                    line_of(r, start)
                );
                continue;
            };
            for (k, v) in vars {
                let want = serde_json::to_value(v)?;
                let got = msg.variables.get(k);
                if got.as_ref() != Some(&want) {
                    let _ = writeln!(
                        problems,
                        "  {}: vars.{k} expected {want}, got {}",
                        line_of(r, start),
                        got.map(|g| g.to_string()).unwrap_or("nothing".into())
                    );
                }
            }
        }
    }
    Ok((!problems.is_empty()).then_some(problems))
}

fn offset(text: &str) -> anyhow::Result<chrono::Duration> {
    let d = parse_delay(text).map_err(|e| anyhow::anyhow!("at: {e}"))?;
    Ok(chrono::Duration::from_std(d)?)
}

fn line(at: &str, customer: &str, journey: &str, step: &str, outcome: &str) -> String {
    format!("{at:>7}  {customer:<8} {journey}.{step} {outcome}")
}

fn line_of(r: &LogRecord, start: DateTime<Utc>) -> String {
    line(
        &offset_text(r.time - start),
        &r.customer,
        &r.journey,
        &r.step,
        r.outcome.as_str(),
    )
    .trim()
    .to_string()
}

/// A line diff (longest common subsequence): `-` expected only, `+` actual
/// only, each `+` line followed by its reason (`reasons[j]` for
/// `actual[j]`) when it has one; where a run of lines changed, the
/// expected ones first, as `diff -u`.
pub fn diff(expected: &[String], actual: &[String], reasons: &[String]) -> String {
    let (n, m) = (expected.len(), actual.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i] == actual[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::from("  --- expected\n  +++ actual\n");
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i] == actual[j] {
            let _ = writeln!(out, "    {}", expected[i]);
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] > lcs[i + 1][j]) {
            match reasons.get(j).filter(|r| !r.is_empty()) {
                Some(reason) => {
                    let _ = writeln!(out, "  + {}  ({reason})", actual[j]);
                }
                None => {
                    let _ = writeln!(out, "  + {}", actual[j]);
                }
            }
            j += 1;
        } else {
            let _ = writeln!(out, "  - {}", expected[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A misspelt journey is answered with the nearest few names and how
    /// many are loaded, not the whole catalogue.
    #[test]
    fn a_misspelt_journey_gets_the_nearest_names() {
        assert_eq!(edit_distance("unsigned_loan", "unsigned_loan"), 0);
        assert_eq!(edit_distance("unsigend_loan", "unsigned_loan"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        let mut names: Vec<String> = (0..2000).map(|i| format!("offer_{i:04}")).collect();
        names.push("unsigned_loan".into());
        names.push("unsigned_card".into());
        let text = nearest_names("unsigend_loan", names.iter().map(String::as_str));
        assert!(
            text.starts_with("2002 journeys loaded; nearest: unsigned_loan, unsigned_card, "),
            "{text}"
        );
        assert!(text.len() < 100, "{text}");
        assert_eq!(
            nearest_names("x", std::iter::empty()),
            "no journeys are loaded"
        );
    }
}
