//! The vocabulary every stage speaks: what a journey is made of, where a
//! message goes, what became of a step. Types only, with their text forms;
//! no stage logic lives here, so every module may depend on this one and
//! this one depends on none of them.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Servicing the customer's own business (allowed unless opted out).
    Service,
    /// Selling or promoting (needs opt-in consent).
    Marketing,
}

impl FromStr for Category {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "service" => Ok(Category::Service),
            "marketing" => Ok(Category::Marketing),
            other => Err(format!(
                "unknown category `{other}` (expected service or marketing)"
            )),
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Category::Service => "service",
            Category::Marketing => "marketing",
        })
    }
}

/// How an exit event closes a journey instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitOutcome {
    /// The customer did what the journey was for.
    Converted,
    /// The reason for the journey went away.
    Cancelled,
}

impl ExitOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitOutcome::Converted => "converted",
            ExitOutcome::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// In-app push notification.
    Push,
    Email,
    /// A task for a contact-centre agent to call the customer.
    CallTask,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 3] =
        [ChannelKind::Push, ChannelKind::Email, ChannelKind::CallTask];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Push => "push",
            ChannelKind::Email => "email",
            ChannelKind::CallTask => "call_task",
        }
    }
}

/// Read through `FromStr`, so that a config or event naming an unknown one
/// gets its message (`unknown channel `fax` (expected …)`), not serde's.
macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<str>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
deserialize_from_str!(Category, ChannelKind);

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChannelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ChannelKind::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown channel `{s}` (expected push, email or call_task)"))
    }
}

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
    /// A delivered step taken back on its channel after the journey ended
    /// by an exit event (`channels.<kind>.withdraw`): not a send.
    Withdrawn,
}

impl Outcome {
    /// Every outcome, in the order a reviewer's filter lists them.
    pub const ALL: [Outcome; 11] = [
        Outcome::Sent,
        Outcome::Failed,
        Outcome::Retrying,
        Outcome::Suppressed,
        Outcome::Deferred,
        Outcome::Cancelled,
        Outcome::Expired,
        Outcome::HeldOut,
        Outcome::Shadow,
        Outcome::Converted,
        Outcome::Withdrawn,
    ];

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
            Outcome::Withdrawn => "withdrawn",
        }
    }

    /// What the outcome means, for the people who read the log (the
    /// review page's glossary).
    pub fn meaning(self) -> &'static str {
        match self {
            Outcome::Sent => "delivered: the channel's receiver accepted it (2xx)",
            Outcome::Failed => "not delivered, for good: the receiver refused it (4xx) or every try failed",
            Outcome::Retrying => "a try failed (5xx, timeout, no answer); it is tried again later",
            Outcome::Suppressed => "not sent, by the contact policy: consent, reachability, a frequency cap, a kill switch, a condition, cooldown or fatigue",
            Outcome::Deferred => "waiting: quiet hours, business hours, a public holiday or the channel's send rate; it goes out later",
            Outcome::Cancelled => "not sent: the journey ended (an exit event, a withdrawn application) before the step was due",
            Outcome::Expired => "not sent: it could no longer go out within its lateness bound",
            Outcome::HeldOut => "control group: not sent, to measure the journey's effect",
            Outcome::Shadow => "shadow mode: decided but not sent, to try a journey on live traffic",
            Outcome::Converted => "not sent: the customer did what the journey asked first (its exit event converted it)",
            Outcome::Withdrawn => "a delivered step taken back after the customer acted or withdrew consent; not a send",
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
    /// A send or withdrawal attempt: the receiver's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub http_status: Option<u16>,
    /// A send or withdrawal attempt: how long the channel took to answer
    /// (or to fail), in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub response_ms: Option<u64>,
}

/// Which step of which instance a log record is about. `"-"` stands for a
/// step or channel when the record is about the instance as a whole.
#[derive(Debug, Clone, Copy)]
pub struct StepRef<'a> {
    pub customer: &'a str,
    pub journey: &'a str,
    pub instance: &'a str,
    pub step: &'a str,
    pub channel: &'a str,
    pub template: &'a str,
    pub rule_hash: &'a str,
}

impl LogRecord {
    /// A record about `subject` (attempt 0, no latency, no event).
    pub fn about(
        subject: StepRef<'_>,
        time: DateTime<Utc>,
        outcome: Outcome,
        reason: impl Into<String>,
    ) -> LogRecord {
        LogRecord {
            seq: 0,
            time,
            customer: subject.customer.into(),
            journey: subject.journey.into(),
            instance: subject.instance.into(),
            step: subject.step.into(),
            channel: subject.channel.into(),
            template: subject.template.into(),
            outcome,
            reason: reason.into(),
            rule_hash: subject.rule_hash.into(),
            attempt: 0,
            latency_ms: None,
            event_id: None,
            http_status: None,
            response_ms: None,
        }
    }
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// How an instance's steps are treated when due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    /// Control group: logged as `held_out`, never sent.
    HeldOut,
    /// Shadow mode: logged as `shadow`, never sent.
    Shadow,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::HeldOut => "held_out",
            Mode::Shadow => "shadow",
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "live" => Ok(Mode::Live),
            "held_out" => Ok(Mode::HeldOut),
            "shadow" => Ok(Mode::Shadow),
            other => Err(format!("unknown mode `{other}`")),
        }
    }
}

/// Where a journey instance stands. Held-out and shadow instances go
/// through the same states (their [`Mode`] says they are not sent), so a
/// control group's conversions are recorded like anyone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Steps may still be sent.
    Open,
    /// Every step settled; an exit event within the attribution window
    /// still converts it.
    Completed,
    Converted,
    Cancelled,
}

impl InstanceStatus {
    pub const ALL: [InstanceStatus; 4] = [
        InstanceStatus::Open,
        InstanceStatus::Completed,
        InstanceStatus::Converted,
        InstanceStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Open => "open",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Converted => "converted",
            InstanceStatus::Cancelled => "cancelled",
        }
    }

    /// Whether an exit event can still end it (and count as its outcome).
    pub fn exitable(self) -> bool {
        matches!(self, InstanceStatus::Open | InstanceStatus::Completed)
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InstanceStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        InstanceStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown instance status `{s}`"))
    }
}

impl From<ExitOutcome> for InstanceStatus {
    fn from(o: ExitOutcome) -> Self {
        match o {
            ExitOutcome::Converted => InstanceStatus::Converted,
            ExitOutcome::Cancelled => InstanceStatus::Cancelled,
        }
    }
}

impl From<ExitOutcome> for Outcome {
    fn from(o: ExitOutcome) -> Self {
        match o {
            ExitOutcome::Converted => Outcome::Converted,
            ExitOutcome::Cancelled => Outcome::Cancelled,
        }
    }
}

/// A journey instance's id: deterministic, so re-processing the same event
/// names the same instance and the idempotency keys of its steps do not change.
pub fn instance_id(journey: &str, customer: &str, key: &str, event_id: &str) -> String {
    let digest = content_hash(format!("{customer}\u{1f}{key}\u{1f}{event_id}").as_bytes());
    format!("{journey}-{digest}")
}

/// The key a channel uses to drop repeats of one step: the same on every
/// retry and after a restart.
pub fn idempotency_key(instance: &str, step: &str) -> String {
    format!("{instance}:{step}")
}

/// What the store names the withdrawal of a delivered step: `<step>:withdraw`.
/// A row of its own beside the step, so that it is claimed, retried and
/// survives a crash like a send; its idempotency key is then
/// `<instance>:<step>:withdraw`.
pub const WITHDRAW_SUFFIX: &str = ":withdraw";

/// The step a withdrawal row takes back, if `step` names one.
pub fn withdrawn_step(step: &str) -> Option<&str> {
    step.strip_suffix(WITHDRAW_SUFFIX)
}

/// Short content hash (first 12 hex digits of SHA-256): script versions and
/// instance ids.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(bytes)[..6])
}

/// What a journey's `decide` returned for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Start {
        /// Instance key override; otherwise the journey's key field or the customer id.
        key: Option<String>,
        /// Template variables carried by every step of the instance.
        vars: Map<String, Value>,
    },
    Skip(String),
}

/// A journey's template variables: the JSON object the rules produced, kept
/// as text from the store to the wire. Sending a step copies it into the body
/// instead of parsing it into a map and writing it out again (measured:
/// 6 k instructions a step); only a step condition or a reader parses it.
#[derive(Debug, Clone)]
pub struct Variables(Box<RawValue>);

impl Variables {
    /// Takes JSON text as stored; it must be an object.
    pub fn from_json(text: String) -> Result<Self, serde_json::Error> {
        let raw = RawValue::from_string(text)?;
        if !raw.get().starts_with('{') {
            return Err(serde::de::Error::custom("variables must be a JSON object"));
        }
        Ok(Self(raw))
    }

    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(self.0.get()).expect("variables are a JSON object")
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        self.to_map().remove(key)
    }
}

impl Default for Variables {
    fn default() -> Self {
        Self::from(Map::new())
    }
}

impl From<Map<String, Value>> for Variables {
    fn from(map: Map<String, Value>) -> Self {
        Self(serde_json::value::to_raw_value(&map).expect("a map serializes to JSON"))
    }
}

impl PartialEq for Variables {
    fn eq(&self, other: &Self) -> bool {
        self.as_json() == other.as_json() || self.to_map() == other.to_map()
    }
}

impl Serialize for Variables {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Through a map, so that any deserializer works (not only serde_json's).
impl<'de> Deserialize<'de> for Variables {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Map::<String, Value>::deserialize(d).map(Self::from)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    pub step: String,
    pub channel: String,
    pub template: String,
    pub sent_at: String,
}

/// A step claimed for sending, with what the scheduler needs to decide and send.
#[derive(Debug, Clone)]
pub struct DueStep {
    /// The store's handle on the claimed step (SQLite: its rowid), handed
    /// back in [`StepResult::claimed_row`] so that settling it needs no key lookup.
    pub row: i64,
    pub instance_id: String,
    pub step: String,
    pub channel: ChannelKind,
    pub template: String,
    pub condition: Option<String>,
    /// The time lateness is measured from (moves only when deferred).
    pub planned_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    /// 1 for the first try.
    pub attempt: u32,
    pub customer: String,
    pub journey: String,
    pub mode: Mode,
    pub category: Category,
    pub rule_hash: String,
    pub vars: Variables,
    /// The instance's status as the step was claimed (read just after): a step claimed by a
    /// worker that died is not sent once its journey has ended meanwhile.
    pub instance_status: InstanceStatus,
    /// A send of this step began under an earlier claim that was never
    /// settled (its holder died or stalled past its lease): the receiver
    /// may have it.
    pub begun_before: bool,
}

impl DueStep {
    /// What a log record about this step names.
    pub fn subject(&self) -> StepRef<'_> {
        StepRef {
            customer: &self.customer,
            journey: &self.journey,
            instance: &self.instance_id,
            step: &self.step,
            channel: self.channel.as_str(),
            template: &self.template,
            rule_hash: &self.rule_hash,
        }
    }
}

/// What happens to a step that lost arbitration (journey key `on_lose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLose {
    /// Wait until the caps have room again (within the lateness bound).
    Defer,
    /// Suppressed for good.
    Drop,
}

impl OnLose {
    /// Service messages the customer needs wait; marketing gives way.
    pub fn default_for(category: Category) -> Self {
        match category {
            Category::Service => OnLose::Defer,
            Category::Marketing => OnLose::Drop,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnLose::Defer => "defer",
            OnLose::Drop => "drop",
        }
    }
}

impl std::str::FromStr for OnLose {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "defer" => Ok(OnLose::Defer),
            "drop" => Ok(OnLose::Drop),
            other => Err(format!(
                "unknown on_lose `{other}` (expected \"defer\" or \"drop\")"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Outcome::ALL` holds every outcome once, in order: a new variant
    /// does not compile here until it has its place there.
    #[test]
    fn every_outcome_is_listed_once() {
        let place = |o: Outcome| match o {
            Outcome::Sent => 0,
            Outcome::Failed => 1,
            Outcome::Retrying => 2,
            Outcome::Suppressed => 3,
            Outcome::Deferred => 4,
            Outcome::Cancelled => 5,
            Outcome::Expired => 6,
            Outcome::HeldOut => 7,
            Outcome::Shadow => 8,
            Outcome::Converted => 9,
            Outcome::Withdrawn => 10,
        };
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(place(o), i);
            assert_eq!(o.as_str().parse::<Outcome>(), Ok(o));
        }
    }
}
