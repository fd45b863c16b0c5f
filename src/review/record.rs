//! "Why did (or didn't) this customer get this message?": one customer's
//! decision record, in time order, from what the store keeps:
//!
//! - events: every event the decide stage processed for the customer (id,
//!   type, time, whether it changed the context), kept by the journey
//!   stage (`store::received`); older ones, from before that was kept, from
//!   the instances they started and the log records they caused;
//! - decisions: each instance started, with its script hash, mode (live,
//!   control group, shadow), key, template variables and the inputs the
//!   script saw (the customer's context at that moment, as the journey
//!   stage kept it: contact details reduced to whether they exist); and
//!   each journey an event triggered that did not start, with its script
//!   hash and why: the script's `skip` and its reason, an instance already
//!   open, the customer outside the pilot, a rule error;
//! - verdicts: each policy decision about a step (suppressed with its
//!   reason: consent, reachability, frequency cap, fatigue, arbitration,
//!   kill switch, condition, cooldown; deferred for quiet hours, business
//!   hours, holidays or a rate limit; expired; held out; shadow);
//! - attempts: each send (and withdrawal) with its outcome, attempt
//!   number, lateness, the receiver's HTTP status and the response time;
//! - control changes (`nudge control`, the admin API) to the journeys the
//!   customer had decisions in and the channels their steps used, within
//!   the record's span;
//! - exits and completions.
//!
//! What the store does not keep is listed in [`NOT_RECORDED`] and printed
//! with every record rather than guessed at. Contact addresses (in the
//! current context, and any e-mail address or phone number inside variables
//! or inputs) are masked unless the caller unmasks them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

use super::log::LogStream;
use super::{LogFilter, ReviewRead};
use crate::mask::{mask_contacts, mask_email, mask_link_secrets, mask_phone};
use crate::model::{InstanceStatus, LogRecord, Outcome};
use crate::store::control::ControlEntry;
use crate::store::review::InstanceRecord;
use crate::store::{EndedNothing, NotStartedWhy, StoreError};

/// What a decision record cannot show, because nothing stores it.
pub const NOT_RECORDED: [&str; 2] = [
    "events of a type that no journey and no context update reads: they are dropped unread before the store, so not kept (nor are repeats of an event id already processed)",
    "rule reloads per customer: each decision names the script hash it ran, and the rule set versions are kept by the store, not shown here",
];

/// Control changes shown in one record at most (the newest, when more).
const CONTROL_LIMIT: usize = 1_000;
/// The latest control changes read before a customer's first entry, for
/// those in force then.
const CONTROL_BEFORE_LIMIT: usize = 1_000;

#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    pub customer: String,
    /// How to reach the customer now (masked unless unmasked).
    pub contact: Option<Contact>,
    /// Oldest first.
    pub entries: Vec<Entry>,
    pub not_recorded: Vec<&'static str>,
    pub log_reaches_back_to: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Contact {
    pub timezone: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub app_installed: bool,
    pub consents: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Event,
    Decision,
    Verdict,
    Attempt,
    Control,
    Exit,
    End,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Decision => "decision",
            Kind::Verdict => "verdict",
            Kind::Attempt => "attempt",
            Kind::Control => "control",
            Kind::Exit => "exit",
            Kind::End => "end",
        }
    }

    fn of(outcome: Outcome) -> Kind {
        match outcome {
            Outcome::Sent | Outcome::Failed | Outcome::Retrying | Outcome::Withdrawn => {
                Kind::Attempt
            }
            Outcome::Converted | Outcome::Cancelled => Kind::Exit,
            Outcome::Suppressed
            | Outcome::Deferred
            | Outcome::Expired
            | Outcome::HeldOut
            | Outcome::Shadow => Kind::Verdict,
        }
    }
}

/// One line of the record.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    #[serde(serialize_with = "rfc3339")]
    pub time: DateTime<Utc>,
    pub kind: Kind,
    /// What happened, in a sentence.
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journey: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Attempts: the receiver's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Attempts: how long the channel took to answer, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Events: the event's type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Events: whether it changed the customer's context (`None`: not known,
    /// processed before the store kept it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_updated: Option<bool>,
    /// Events: why its update of the context was refused (the event was
    /// dead-lettered and decided nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Events: when nudge read it (its entry stands at the event's own
    /// time; what it caused, at this one).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_rfc3339"
    )]
    pub received_at: Option<DateTime<Utc>>,
    /// Decisions not to start: `skip`, `already_open`, `pilot`, `rule_error`,
    /// `already_ended`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_started: Option<NotStartedWhy>,
    /// Control changes: who made it, and the settings before and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlEntry>,
    /// Decisions: what the script saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Value>,
    /// Decisions: the template variables the script produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variables: Option<Value>,
    /// The log position of a log entry (orders entries of one time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Events of one time: the order nudge read them in.
    #[serde(skip)]
    read: usize,
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn opt_rfc3339<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

impl Entry {
    fn new(time: DateTime<Utc>, kind: Kind, text: String) -> Self {
        Self {
            time,
            kind,
            text,
            journey: None,
            instance: None,
            step: None,
            channel: None,
            outcome: None,
            reason: None,
            rule_hash: None,
            attempt: None,
            latency_ms: None,
            http_status: None,
            response_ms: None,
            event_id: None,
            event_type: None,
            context_updated: None,
            refused: None,
            received_at: None,
            not_started: None,
            control: None,
            inputs: None,
            variables: None,
            seq: None,
            read: usize::MAX,
        }
    }

    /// Events before the decisions they caused, those before the log
    /// records; log records in log order.
    fn order(&self) -> (DateTime<Utc>, u8, i64, usize) {
        let rank = match self.kind {
            Kind::Event => 0,
            Kind::Decision => 1,
            Kind::End => 3,
            _ => 2,
        };
        (self.time, rank, self.seq.unwrap_or(0), self.read)
    }
}

/// An event as far as the record knows it: its time, type, whether it
/// updated the context, when it was read, why its update was refused.
type KnownEvent = (
    DateTime<Utc>,
    Option<String>,
    Option<bool>,
    Option<DateTime<Utc>>,
    Option<String>,
);

/// Why an exit ended (and converted) nothing of a journey: what the store
/// held for its key when the exit was read.
fn ended_nothing_reason(
    n: &EndedNothing,
    read_at: DateTime<Utc>,
    instances: &[InstanceRecord],
) -> String {
    let since = n.completed_since.to_rfc3339_opts(SecondsFormat::Secs, true);
    let window = format!(
        "no instance open and none completed since {since} (policy.attribution_window before the customer acted), so nothing converted"
    );
    let last = instances
        .iter()
        .filter(|i| i.journey == n.journey && i.key == n.key && i.started_at <= read_at)
        .max_by_key(|i| i.started_at);
    let Some(last) = last else {
        return format!("{window}; no instance of it had started for this key");
    };
    match last.ended_at.filter(|at| *at <= read_at) {
        Some(at) if last.status == InstanceStatus::Completed => format!(
            "{window}; its last instance ({}) completed at {}, before that",
            last.id,
            at.to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
        Some(at) => format!(
            "{window}; its last instance ({}) had already ended at {} ({})",
            last.id,
            at.to_rfc3339_opts(SecondsFormat::Secs, true),
            last.status.as_str()
        ),
        None => window,
    }
}

/// Reads the decision record of `customer`; contact details masked unless `unmask`.
pub fn decision_record(
    store: &dyn ReviewRead,
    customer: &str,
    unmask: bool,
) -> Result<DecisionRecord, StoreError> {
    let instances = store.customer_instances(customer)?;
    let received = store.customer_events(customer)?;
    let filter = LogFilter {
        customer: Some(customer.to_string()),
        ..LogFilter::default()
    };
    let mut log: Vec<LogRecord> = LogStream::new(store, filter, None).collect::<Result<_, _>>()?;
    log.reverse();
    let mask = |v: Value| if unmask { v } else { mask_value(v) };

    let mut entries = Vec::new();
    // Events by id: (time, type, context updated) where known. The journey
    // stage's own record of an event wins over what is inferred.
    let mut events: BTreeMap<String, KnownEvent> = BTreeMap::new();
    let mut read_order: HashMap<&str, usize> = HashMap::new();
    for (i, r) in received.iter().enumerate() {
        read_order.entry(r.event_id.as_str()).or_insert(i);
        // Never after the decisions it caused (those start at the event's
        // time, or when it was processed if that is earlier).
        let time = r.event_time.min(r.received_at);
        events.entry(r.event_id.clone()).or_insert((
            time,
            Some(r.event_type.clone()),
            Some(r.context_updated),
            Some(r.received_at),
            r.refused.clone(),
        ));
        for n in &r.not_started {
            let why = match n.why {
                NotStartedWhy::Skip => "the script skipped it",
                NotStartedWhy::AlreadyOpen => "already running",
                NotStartedWhy::Pilot => "outside the pilot",
                NotStartedWhy::RuleError => "the script failed",
                NotStartedWhy::AlreadyEnded => "already ended by an exit read before it",
            };
            let mut e = Entry::new(
                time,
                Kind::Decision,
                format!(
                    "{} not started by event {} ({why}): {}; script {}",
                    n.journey, r.event_id, n.reason, n.rule_hash
                ),
            );
            e.journey = Some(n.journey.clone());
            e.reason = Some(n.reason.clone());
            e.rule_hash = Some(n.rule_hash.clone());
            e.event_id = Some(r.event_id.clone());
            e.not_started = Some(n.why);
            entries.push(e);
        }
        for n in &r.ended_nothing {
            let (reason, text) = match &n.refused {
                Some(why) => (
                    why.clone(),
                    format!(
                        "{} not ended by event {}: it names no instance, so it was dead-lettered: {why}",
                        n.journey, r.event_id
                    ),
                ),
                None => {
                    let reason = ended_nothing_reason(n, r.received_at, &instances);
                    let text = format!(
                        "{} (key {}) not ended by event {}: {reason}",
                        n.journey, n.key, r.event_id
                    );
                    (reason, text)
                }
            };
            let mut e = Entry::new(time, Kind::Decision, text);
            e.journey = Some(n.journey.clone());
            e.reason = Some(reason);
            e.event_id = Some(r.event_id.clone());
            entries.push(e);
        }
    }
    for i in &instances {
        let event = &i.decision_inputs["event"];
        let time = event["time"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            // Never after the decision it caused (the store keeps
            // milliseconds on SQLite, the event may carry nanoseconds).
            .map_or(i.started_at, |t| t.to_utc().min(i.started_at));
        let kind = event["type"].as_str().map(String::from);
        events
            .entry(i.trigger_event.clone())
            .or_insert((time, kind, None, None, None));
        let mut e = Entry::new(
            i.started_at,
            Kind::Decision,
            format!(
                "{} started ({}, {}) for key {} by event {}; script {}",
                i.journey,
                match i.mode {
                    crate::model::Mode::Live => "live",
                    crate::model::Mode::HeldOut => "control group: held out, never sent",
                    crate::model::Mode::Shadow => "shadow: logged, never sent",
                },
                i.category,
                i.key,
                i.trigger_event,
                i.rule_hash
            ),
        );
        e.journey = Some(i.journey.clone());
        e.instance = Some(i.id.clone());
        e.rule_hash = Some(i.rule_hash.clone());
        e.event_id = Some(i.trigger_event.clone());
        e.inputs = Some(match unmask {
            true => i.decision_inputs.clone(),
            false => mask_inputs(i.decision_inputs.clone()),
        });
        e.variables = Some(mask(i.vars.clone()));
        entries.push(e);
        if let (InstanceStatus::Completed, Some(at)) = (i.status, i.ended_at) {
            let mut e = Entry::new(
                at,
                Kind::End,
                format!(
                    "{} (key {}): every step settled (completed)",
                    i.journey, i.key
                ),
            );
            e.journey = Some(i.journey.clone());
            e.instance = Some(i.id.clone());
            entries.push(e);
        }
    }
    // A customer may have several instances of one journey (one per key):
    // each log line names its instance's key.
    let keys: HashMap<&str, &str> = instances
        .iter()
        .map(|i| (i.id.as_str(), i.key.as_str()))
        .collect();
    for r in &log {
        if let Some(id) = &r.event_id {
            let kind = r
                .reason
                .split_once(" ended the journey")
                .map(|(t, _)| t.to_string());
            let known = events
                .entry(id.clone())
                .or_insert((r.time, None, None, None, None));
            if known.1.is_none() {
                known.1 = kind;
            }
        }
        entries.push(log_entry(r, keys.get(r.instance.as_str()).copied()));
    }
    for (id, (time, kind, context_updated, received_at, refused)) in events {
        let effect = match (&refused, context_updated) {
            // A contact update's good fields are applied beside a bad one.
            (Some(why), Some(true)) => {
                format!(", partly refused and dead-lettered (nothing decided): {why}")
            }
            (Some(why), _) => {
                format!(", refused and dead-lettered (nothing applied or decided): {why}")
            }
            (None, Some(true)) => ", updated the context".to_string(),
            _ => String::new(),
        };
        // Read a second or more after its time: said, so that a decision
        // listed between the two is not read as made after the event.
        let late = received_at
            .filter(|r| *r - time >= chrono::Duration::seconds(1))
            .map(|r| {
                let after = (r - time).to_std().unwrap_or_default();
                format!(
                    "; read by nudge at {}, {} after its time",
                    r.to_rfc3339_opts(SecondsFormat::Millis, true),
                    crate::humanize::duration(after)
                )
            })
            .unwrap_or_default();
        let mut e = Entry::new(
            time,
            Kind::Event,
            format!(
                "{} (id {id}){effect}{late}",
                kind.as_deref().unwrap_or("event")
            ),
        );
        e.read = read_order.get(id.as_str()).copied().unwrap_or(usize::MAX);
        e.event_id = Some(id);
        e.event_type = kind;
        e.context_updated = context_updated;
        e.refused = refused;
        e.received_at = received_at;
        entries.push(e);
    }
    entries.extend(control_entries(store, &entries)?);
    entries.sort_by_key(Entry::order);
    let contact = store.customer_context(customer)?.map(|c| Contact {
        timezone: c.timezone,
        email: c.email.map(|e| if unmask { e } else { mask_email(&e) }),
        phone: c.phone.map(|p| if unmask { p } else { mask_phone(&p) }),
        app_installed: c.app_installed,
        consents: serde_json::to_value(&c.consents).unwrap_or(Value::Null),
    });
    Ok(DecisionRecord {
        customer: customer.to_string(),
        contact,
        entries,
        not_recorded: NOT_RECORDED.to_vec(),
        log_reaches_back_to: store.log_reach()?,
    })
}

/// The control changes that could have affected what `entries` show: to a
/// journey they name or a channel their steps used, from the first entry
/// to the last, and for each of those the last change before the first
/// entry (the setting in force then, say the pilot that excluded the
/// customer's first event): a query-time join of the control log.
fn control_entries(store: &dyn ReviewRead, entries: &[Entry]) -> Result<Vec<Entry>, StoreError> {
    let (Some(first), Some(last)) = (
        entries.iter().map(|e| e.time).min(),
        entries.iter().map(|e| e.time).max(),
    ) else {
        return Ok(Vec::new());
    };
    let journeys: BTreeSet<&str> = entries
        .iter()
        .filter_map(|e| e.journey.as_deref())
        .collect();
    let channels: BTreeSet<&str> = entries
        .iter()
        .filter_map(|e| e.channel.as_deref())
        .collect();
    let named = |c: &ControlEntry| match c.kind.as_str() {
        crate::control::JOURNEY => journeys.contains(c.target.as_str()),
        crate::control::CHANNEL => channels.contains(c.target.as_str()),
        _ => false,
    };
    // The latest before, oldest first: the last of each target wins.
    let mut in_force: BTreeMap<(String, String), ControlEntry> = BTreeMap::new();
    for c in store.control_changes(None, Some(first), CONTROL_BEFORE_LIMIT)? {
        if named(&c) {
            in_force.insert((c.kind.clone(), c.target.clone()), c);
        }
    }
    let until = last + chrono::Duration::milliseconds(1);
    let changes = store.control_changes(Some(first), Some(until), CONTROL_LIMIT)?;
    Ok(in_force
        .into_values()
        .chain(changes.into_iter().filter(|c| named(c)))
        .map(|c| {
            let mut e = Entry::new(
                c.time,
                Kind::Control,
                format!(
                    "{} {} changed by {}: {} -> {}",
                    c.kind, c.target, c.who, c.before, c.after
                ),
            );
            match c.kind.as_str() {
                crate::control::JOURNEY => e.journey = Some(c.target.clone()),
                _ => e.channel = Some(c.target.clone()),
            }
            e.control = Some(c);
            e
        })
        .collect())
}

/// Lateness as the log gives it (`540 ms`), and for a long one also in
/// days and hours, which a count of milliseconds hides.
fn late(ms: u64) -> String {
    match ms < 60_000 {
        true => format!("{ms} ms"),
        false => format!(
            "{ms} ms ({})",
            crate::humanize::duration(std::time::Duration::from_millis(ms))
        ),
    }
}

fn log_entry(r: &LogRecord, key: Option<&str>) -> Entry {
    let kind = Kind::of(r.outcome);
    let key = key.map(|k| format!(" (key {k})")).unwrap_or_default();
    let subject = match r.step.as_str() {
        "-" => format!("{}{key}", r.journey),
        step => format!("{}/{step}{key} via {}", r.journey, r.channel),
    };
    let text = match r.outcome {
        Outcome::Sent => format!(
            "{subject}: sent, template {}, attempt {}{}{}{}",
            r.template,
            r.attempt,
            r.latency_ms
                .map(|l| format!(", {} after due", late(l)))
                .unwrap_or_default(),
            answer(r),
            // Sent on another channel than planned, and why.
            match r.reason.starts_with("fallback from ") {
                true => format!("; {}", r.reason),
                false => String::new(),
            }
        ),
        Outcome::Failed | Outcome::Retrying => format!(
            "{subject}: {}, attempt {}{}: {}",
            r.outcome,
            r.attempt,
            answer(r),
            r.reason
        ),
        Outcome::Withdrawn => format!("{subject}: {}{}: {}", r.outcome, answer(r), r.reason),
        Outcome::Converted | Outcome::Cancelled if r.step != "-" => {
            format!("{subject}: not sent, journey {}: {}", r.outcome, r.reason)
        }
        _ => format!("{subject}: {}: {}", r.outcome, r.reason),
    };
    let mut e = Entry::new(r.time, kind, text);
    e.journey = Some(r.journey.clone());
    e.instance = Some(r.instance.clone());
    if r.step != "-" {
        e.step = Some(r.step.clone());
        e.channel = Some(r.channel.clone());
    }
    e.outcome = Some(r.outcome);
    e.reason = Some(r.reason.clone());
    e.rule_hash = Some(r.rule_hash.clone());
    e.attempt = (r.attempt > 0).then_some(r.attempt);
    e.latency_ms = r.latency_ms;
    e.http_status = r.http_status;
    e.response_ms = r.response_ms;
    e.event_id = r.event_id.clone();
    e.seq = Some(r.seq);
    e
}

/// What the channel answered an attempt, and how fast: `, HTTP 200 in 12 ms`.
fn answer(r: &LogRecord) -> String {
    match (r.http_status, r.response_ms) {
        (Some(s), Some(ms)) => format!(", HTTP {s} in {ms} ms"),
        (Some(s), None) => format!(", HTTP {s}"),
        (None, Some(ms)) => format!(", {ms} ms on the channel"),
        (None, None) => String::new(),
    }
}

/// The record as `nudge explain` prints it for a terminal.
pub fn to_text(record: &DecisionRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "decision record of customer {} (times UTC, oldest first)",
        super::printable(&record.customer)
    );
    match &record.contact {
        Some(c) => {
            let _ = writeln!(
                out,
                "contact now: timezone {}, app {}, email {}, phone {}",
                super::printable(c.timezone.as_deref().unwrap_or("-")),
                if c.app_installed { "yes" } else { "no" },
                super::printable(c.email.as_deref().unwrap_or("-")),
                super::printable(c.phone.as_deref().unwrap_or("-")),
            );
            let _ = writeln!(out, "consents now: {}", c.consents);
        }
        None => out.push_str("contact now: no contact or consent event received\n"),
    }
    if let Some(t) = record.log_reaches_back_to {
        let _ = writeln!(
            out,
            "the dispatch log reaches back to {}",
            t.to_rfc3339_opts(SecondsFormat::Secs, true)
        );
    }
    out.push('\n');
    if record.entries.is_empty() {
        out.push_str("nothing recorded for this customer\n");
    }
    for e in &record.entries {
        let _ = writeln!(
            out,
            "{}  {:<8}  {}",
            e.time.to_rfc3339_opts(SecondsFormat::Millis, true),
            e.kind.as_str(),
            super::printable(&e.text)
        );
        let indent = " ".repeat(36);
        if let Some(inputs) = &e.inputs {
            let _ = writeln!(out, "{indent}saw: {inputs}");
        }
        if let Some(vars) = e
            .variables
            .as_ref()
            .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        {
            let _ = writeln!(out, "{indent}variables: {vars}");
        }
    }
    out.push_str("\nnot recorded (so not shown):\n");
    for n in &record.not_recorded {
        let _ = writeln!(out, "  - {n}");
    }
    // Ids and keys come from events: what they hold is shown, not acted
    // on by the terminal.
    let mut shown = String::with_capacity(out.len());
    for line in out.lines() {
        shown.push_str(&super::printable(line));
        shown.push('\n');
    }
    shown
}

fn looks_like_phone(s: &str) -> bool {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    digits >= 7
        && s.chars().all(|c| c.is_ascii_digit() || "+ ()-".contains(c))
        && (s.starts_with('+') || !s.contains('-'))
}

/// Masks every e-mail address and phone number among the strings of `v`,
/// also inside text (a note, a URL's query), and any string under a key
/// naming one.
/// [`mask_value`] for what a script saw, but the event's identity (its
/// id, type and time) and the rule set's hash as they are: ids, shown in
/// full on the event's own line, that a long run of digits in a UUID
/// would otherwise mask as if it were a phone number.
fn mask_inputs(v: Value) -> Value {
    let Value::Object(o) = v else {
        return mask_value(v);
    };
    o.into_iter()
        .map(|(k, v)| {
            let v = match (k.as_str(), v) {
                ("rule_set", v) => v,
                ("event", Value::Object(event)) => Value::Object(
                    event
                        .into_iter()
                        .map(|(k, v)| match k.as_str() {
                            "id" | "type" | "time" => (k, v),
                            _ => (k, mask_value(v)),
                        })
                        .collect(),
                ),
                (_, v) => mask_value(v),
            };
            (k, v)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub fn mask_value(v: Value) -> Value {
    match v {
        Value::String(s) if looks_like_phone(&s) => Value::String(mask_phone(&s)),
        Value::String(s) => Value::String(mask_contacts(&mask_link_secrets(&s))),
        Value::Array(a) => Value::Array(a.into_iter().map(mask_value).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| {
                    let v = match (&v, k.as_str()) {
                        // Ids are what a reviewer searches by, not contact
                        // data, however many digits they have.
                        (Value::String(_), k) if k == "id" || k.ends_with("_id") => v,
                        (Value::String(s), "email") => Value::String(mask_email(s)),
                        (Value::String(s), "phone" | "mobile") => Value::String(mask_phone(s)),
                        _ => mask_value(v),
                    };
                    (k, v)
                })
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An event id with a long run of digits stays whole in what the script
    /// saw (it is shown whole on the event's line); contact data beside it
    /// is masked as anywhere.
    #[test]
    fn the_event_id_in_the_inputs_is_not_masked() {
        let inputs = json!({
            "event": {"id": "7a193ff3-f3f9-4d8c-acae-0012345694f2ab2", "type": "t", "time": "2026-01-01T00:00:00Z",
                      "note": "call 0412345678"},
            "rule_set": "e61004ad82b1",
            "customer": {"profile": {"mobile": "0412345678"}}
        });
        let masked = mask_inputs(inputs);
        assert_eq!(
            masked["event"]["id"],
            "7a193ff3-f3f9-4d8c-acae-0012345694f2ab2"
        );
        assert!(
            !masked["event"]["note"]
                .as_str()
                .unwrap()
                .contains("0412345678"),
            "{masked}"
        );
        assert!(
            !masked["customer"]["profile"]["mobile"]
                .as_str()
                .unwrap()
                .contains("0412345678"),
            "{masked}"
        );
        assert_eq!(masked["rule_set"], "e61004ad82b1");
    }

    /// A send on a fallback channel says so and why; a long lateness is
    /// also given in hours.
    #[test]
    fn a_sent_entry_names_its_fallback_and_a_long_lateness_in_hours() {
        let subject = crate::model::StepRef {
            customer: "c1",
            journey: "fee_increase",
            instance: "i1",
            step: "alert",
            channel: "email",
            template: "fee_alert",
            rule_hash: "h",
        };
        let mut record = LogRecord::about(
            subject,
            chrono::Utc::now(),
            Outcome::Sent,
            "fallback from push: no app installed",
        );
        record.attempt = 2;
        record.latency_ms = Some(43_170_125);
        let text = log_entry(&record, None).text;
        assert_eq!(
            text,
            "fee_increase/alert via email: sent, template fee_alert, attempt 2, 43170125 ms (11h 59m 30s) after due; fallback from push: no app installed"
        );
    }

    /// What an event put in an id (a line break, an escape) is shown, not
    /// acted on: no line an operator reads is forged.
    #[test]
    fn the_text_shows_line_breaks_from_events_escaped() {
        let subject = crate::model::StepRef {
            customer: "c-a\nFORGED2 \u{1b}[31m",
            journey: "unsigned_loan",
            instance: "i1\nFORGED3",
            step: "push",
            channel: "push",
            template: "t",
            rule_hash: "h",
        };
        let record = LogRecord::about(subject, chrono::Utc::now(), Outcome::Sent, "ok");
        let text = to_text(&DecisionRecord {
            customer: subject.customer.into(),
            contact: None,
            entries: vec![log_entry(&record, None)],
            not_recorded: Vec::new(),
            log_reaches_back_to: None,
        });
        assert!(!text.lines().any(|l| l.starts_with("FORGED")), "{text}");
        assert!(text.contains("c-a\\nFORGED2 \\u{1b}[31m"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn contact_details_are_masked_wherever_they_appear() {
        assert_eq!(mask_email("alice@example.com"), "a***@example.com");
        assert_eq!(mask_phone("+61400000001"), "+*********01");
        assert_eq!(mask_phone("0400 000 123"), "**** *** *23");
        let v = json!({
            "email": "bob@example.com",
            "note": "call +61 400 000 002 or dave@example.com",
            "irish": "write to john.o'brien@example.com",
            "dotted": "0400.123.456, or 02.9876.5432.",
            "not_phones": ["25000.00", "1.234.567", "2026.03.02", "1234567.89"],
            "resume_url": "https://bank.example/sign?app=A-52&email=erin@example.com",
            "signed_url": "https://bank.example/sign?app=A-52&token=eyJhbGci.x-y_z&SIG=9f8e#top",
            "keys": "?apikey=k1;session_id=s2&t=&code=123456&codename=ok&q=key",
            "fragment": "https://bank.example/in#access_token=abc&X-Amz-Credential=AKIA/x#top",
            "profile_url": "https://crm.example/users/jane.smith@example.org/profile",
            "encoded": "https://crm.example/c?e=jane%40example.org&x=1",
            "contact": ["carol@example.org", "+61400000003"],
            "amount": "1234567",
            "application_id": "A-20261234567",
            "date": "2026-03-02",
            "product": "Car loan",
            "count": 12345678,
        });
        assert_eq!(
            mask_value(v),
            json!({
                "email": "b***@example.com",
                "note": "call +** *** *** *02 or d***@example.com",
                "irish": "write to j***@example.com",
                "dotted": "****.***.*56, or **.****.**32.",
                "not_phones": ["25000.00", "1.234.567", "2026.03.02", "*****67.89"],
                "resume_url": "https://bank.example/sign?app=A-52&email=e***@example.com",
                "signed_url": "https://bank.example/sign?app=A-52&token=***&SIG=***#top",
                "keys": "?apikey=***;session_id=***&t=&code=***&codename=ok&q=key",
                "fragment": "https://bank.example/in#access_token=***&X-Amz-Credential=***#top",
                "profile_url": "https://crm.example/users/j***@example.org/profile",
                "encoded": "https://crm.example/c?e=j***%40example.org&x=1",
                "contact": ["c***@example.org", "+*********03"],
                "amount": "*****67",
                "application_id": "A-20261234567",
                "date": "2026-03-02",
                "product": "Car loan",
                "count": 12345678,
            })
        );
    }
}
