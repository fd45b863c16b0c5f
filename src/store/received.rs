//! What the decide stage keeps of every event it took in, for the decision
//! record (`review::record`): the event's identity, whether it changed the
//! customer's context, and each journey it triggered that did not start and
//! why (the script's `skip` and its reason, an instance already open, the
//! customer outside the journey's pilot, a rule error). One row per event,
//! written in the transaction of its effects (batched with the others on
//! PostgreSQL), purged by retention like the dispatch log.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// One event the decide stage processed (a duplicate is not kept again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceivedEvent {
    pub event_id: String,
    pub customer: String,
    pub event_type: String,
    /// The time the event carries.
    pub event_time: DateTime<Utc>,
    /// When the decide stage processed it.
    pub received_at: DateTime<Utc>,
    /// Whether it changed the customer's stored context.
    pub context_updated: bool,
    /// The journeys it triggered that did not start, in rule order.
    pub not_started: Vec<NotStarted>,
    /// Why its update of the context was refused (it was dead-lettered,
    /// and nothing else it could cause was decided).
    pub refused: Option<String>,
    /// The journeys it exits that it ended nothing of: no instance for its
    /// key was open, or had completed within the attribution window before
    /// the customer acted.
    pub ended_nothing: Vec<EndedNothing>,
}

/// An exit that found nothing to end (and so converted nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndedNothing {
    pub journey: String,
    pub key: String,
    /// The start of the attribution window it looked back to: an instance
    /// completed before this was out of its reach.
    pub completed_since: DateTime<Utc>,
    /// Why the exit could not say which instance it ends (no key in its
    /// data): it was dead-lettered, and `key` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A journey the event triggered that did not start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotStarted {
    pub journey: String,
    /// The script version that decided (or would have).
    pub rule_hash: String,
    pub why: NotStartedWhy,
    /// The script's reason, the open instance, the pilot share, the error.
    pub reason: String,
}

/// Why a triggered journey did not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotStartedWhy {
    /// The script returned `skip(reason)`.
    Skip,
    /// An instance of the journey is open for the key.
    AlreadyOpen,
    /// The customer is outside the journey's pilot share.
    Pilot,
    /// The script failed (the event is dead-lettered too).
    RuleError,
    /// An exit of the journey for the key, read earlier, happened at or
    /// after the trigger: the customer had already acted.
    AlreadyEnded,
}

impl NotStartedWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            NotStartedWhy::Skip => "skip",
            NotStartedWhy::AlreadyOpen => "already_open",
            NotStartedWhy::Pilot => "pilot",
            NotStartedWhy::RuleError => "rule_error",
            NotStartedWhy::AlreadyEnded => "already_ended",
        }
    }
}

/// The `not_started` column: a JSON array (empty: `[]`).
pub(crate) fn encode_not_started(n: &[NotStarted]) -> Result<String, StoreError> {
    serde_json::to_string(n).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The `ended_nothing` column: a JSON array, NULL when empty (most events).
pub(crate) fn encode_ended_nothing(n: &[EndedNothing]) -> Result<Option<String>, StoreError> {
    if n.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(n)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn decode_ended_nothing(text: Option<&str>) -> Result<Vec<EndedNothing>, StoreError> {
    text.map_or(Ok(Vec::new()), |t| {
        serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("ended_nothing: {e}")))
    })
}

pub(crate) fn decode_not_started(text: &str) -> Result<Vec<NotStarted>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("not_started: {e}")))
}
