//! What the store keeps for runtime control (the `control` module): the
//! overrides in force, one row per target (a journey or a channel), and the
//! control log, one entry per change, kept for good (retention does not
//! purge it: it is small and it is the audit trail).
//!
//! Settings are a JSON object whose fields the control module owns; the
//! store only keeps them, so a newer binary's fields survive an older one.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

/// One override in force.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRow {
    /// `journey` or `channel`.
    pub kind: String,
    /// The journey's name or the channel's kind.
    pub target: String,
    /// Only the fields overridden.
    pub settings: Map<String, Value>,
    pub updated_at: DateTime<Utc>,
    /// The token's name.
    pub updated_by: String,
}

/// One change, as the control log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlEntry {
    pub seq: i64,
    pub time: DateTime<Utc>,
    /// The token's name (`admin`).
    pub who: String,
    pub kind: String,
    pub target: String,
    /// The changed fields' values in force before the change.
    pub before: Value,
    /// ... and after it.
    pub after: Value,
}

/// What a change does, decided from the settings in force when the store
/// holds the target's row under its lock (so that two changes at once
/// each see the other's result).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlEdit {
    /// The new override; empty removes it.
    pub settings: Map<String, Value>,
    pub before: Value,
    pub after: Value,
}

/// A change to apply: `edit` is given the override in force (empty when
/// none) and says what to write.
pub struct ControlChange<'a> {
    pub kind: &'a str,
    pub target: &'a str,
    pub who: &'a str,
    pub at: DateTime<Utc>,
    pub edit: &'a (dyn Fn(&Map<String, Value>) -> ControlEdit + Sync),
}

/// Parses a stored settings object.
pub(crate) fn settings_of(text: &str) -> Result<Map<String, Value>, super::StoreError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(super::StoreError::Corrupt(format!(
            "control settings are not an object: {other}"
        ))),
        Err(e) => Err(super::StoreError::Corrupt(format!("control settings: {e}"))),
    }
}
