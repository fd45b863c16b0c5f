//! Runtime control: a journey's `enabled`, `shadow`, `pilot_percent` and
//! `holdout_percent`, and whether a channel sends, changed while the daemon
//! runs (the admin API, `nudge control`), without a deploy or a restart.
//!
//! An override is the operator's latest word: it wins over the config
//! (`policy.disabled_journeys`, `policy.shadow_journeys`,
//! `policy.disabled_channels`) and the script (`shadow`, `pilot`,
//! `holdout`); clearing it (`null`) brings those back. Overrides live in the
//! store, so they survive restarts and every replica sees them: each
//! daemon reads them at start, right after a change it made, and every
//! second ([`REFRESH`]). Every change is appended to the control log.
//!
//! When a change takes effect:
//! - `enabled = false`: steps due from then on are suppressed (`kill
//!   switch`), like `policy.disabled_journeys`; `true` lets them go again.
//! - `shadow = true`: new instances start in shadow, and the steps of live
//!   instances due from then on are logged `shadow`, not sent. `false`:
//!   new instances start live; an instance started in shadow stays in
//!   shadow (its earlier steps never went out, so its follow-ups would
//!   refer to messages the customer never had).
//! - `pilot_percent`, `holdout_percent`: new decisions only; a customer
//!   already in a journey keeps the group they started in, so the control
//!   group's measurement stays clean.
//! - a stopped channel: its due steps wait in the store, neither sent nor
//!   dropped, until it resumes; then they go, unless past their lateness
//!   bound (`expired`). A channel in `policy.disabled_channels` is a kill
//!   switch instead (its steps are suppressed).

pub mod client;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::config::PolicyConfig;
use crate::model::ChannelKind;
use crate::rules::Journey;
use crate::store::control::{ControlEdit, ControlRow};
use crate::store::{Store, StoreError};

/// How often a daemon reads the overrides again: the bound on how long
/// another replica's change takes to apply here.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The fields of a journey that can be changed, as the API names them.
pub const JOURNEY_FIELDS: &[&str] = &["enabled", "shadow", "pilot_percent", "holdout_percent"];
/// The fields of a channel that can be changed.
pub const CHANNEL_FIELDS: &[&str] = &["enabled"];

/// `kind` of a journey's override in the store.
pub const JOURNEY: &str = "journey";
/// `kind` of a channel's override in the store.
pub const CHANNEL: &str = "channel";

/// A journey's overridden settings; `None`: not overridden.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JourneyOverride {
    pub enabled: Option<bool>,
    pub shadow: Option<bool>,
    pub pilot_percent: Option<u8>,
    pub holdout_percent: Option<u8>,
    pub updated_at: Option<DateTime<Utc>>,
    pub updated_by: Option<String>,
}

impl JourneyOverride {
    /// From a stored settings object. Fields this binary does not know, or
    /// whose values it cannot read, are left out (a newer binary's).
    fn from_settings(settings: &Map<String, Value>) -> Self {
        let flag = |k: &str| settings.get(k).and_then(Value::as_bool);
        let percent = |k: &str| {
            settings
                .get(k)
                .and_then(Value::as_u64)
                .filter(|p| *p <= 100)
                .map(|p| p as u8)
        };
        Self {
            enabled: flag("enabled"),
            shadow: flag("shadow"),
            pilot_percent: percent("pilot_percent"),
            holdout_percent: percent("holdout_percent"),
            updated_at: None,
            updated_by: None,
        }
    }
}

/// Every override in force, as the daemon applies them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub journeys: BTreeMap<String, JourneyOverride>,
    /// Channels stopped (`false`) or resumed over the config (`true`).
    pub channels: BTreeMap<ChannelKind, bool>,
}

impl Overrides {
    pub fn from_rows(rows: &[ControlRow]) -> Self {
        let mut out = Self::default();
        for row in rows {
            match row.kind.as_str() {
                JOURNEY => {
                    let mut o = JourneyOverride::from_settings(&row.settings);
                    o.updated_at = Some(row.updated_at);
                    o.updated_by = Some(row.updated_by.clone());
                    out.journeys.insert(row.target.clone(), o);
                }
                CHANNEL => {
                    let (Ok(kind), Some(enabled)) = (
                        row.target.parse::<ChannelKind>(),
                        row.settings.get("enabled").and_then(Value::as_bool),
                    ) else {
                        continue;
                    };
                    out.channels.insert(kind, enabled);
                }
                _ => {}
            }
        }
        out
    }

    pub fn journey(&self, name: &str) -> Option<&JourneyOverride> {
        self.journeys.get(name)
    }

    /// Whether the channel is stopped by runtime control (its steps wait).
    pub fn channel_stopped(&self, channel: ChannelKind) -> bool {
        self.channels.get(&channel) == Some(&false)
    }
}

/// Where a setting in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Default,
    Script,
    Config,
    Override,
}

/// A setting in force and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

/// A journey's settings in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JourneySettings {
    pub enabled: Setting<bool>,
    pub shadow: Setting<bool>,
    pub pilot_percent: Setting<u8>,
    pub holdout_percent: Setting<u8>,
}

impl JourneySettings {
    /// The journey's settings: the override, else the config, else the
    /// script, else the default.
    pub fn of(journey: &Journey, policy: &PolicyConfig, o: Option<&JourneyOverride>) -> Self {
        let pick = |over: Option<bool>, config: bool, script: bool, default: bool| match over {
            Some(value) => Setting {
                value,
                source: Source::Override,
            },
            None if config => Setting {
                value: !default,
                source: Source::Config,
            },
            None if script => Setting {
                value: !default,
                source: Source::Script,
            },
            None => Setting {
                value: default,
                source: Source::Default,
            },
        };
        let percent = |over: Option<u8>, script: u8, default: u8| match over {
            Some(value) => Setting {
                value,
                source: Source::Override,
            },
            None => Setting {
                value: script,
                source: if script == default {
                    Source::Default
                } else {
                    Source::Script
                },
            },
        };
        Self {
            enabled: pick(
                o.and_then(|o| o.enabled),
                policy.disabled_journeys.contains(&journey.name),
                false,
                true,
            ),
            shadow: pick(
                o.and_then(|o| o.shadow),
                policy.shadow_journeys.contains(&journey.name),
                journey.shadow,
                false,
            ),
            pilot_percent: percent(o.and_then(|o| o.pilot_percent), journey.pilot_percent, 100),
            holdout_percent: percent(
                o.and_then(|o| o.holdout_percent),
                journey.holdout_percent,
                0,
            ),
        }
    }

    /// The value of a field by its API name.
    pub fn value(&self, field: &str) -> Value {
        match field {
            "enabled" => json!(self.enabled.value),
            "shadow" => json!(self.shadow.value),
            "pilot_percent" => json!(self.pilot_percent.value),
            "holdout_percent" => json!(self.holdout_percent.value),
            _ => Value::Null,
        }
    }

    /// The API's view of a journey (`GET /admin/journeys/{name}`).
    pub fn view(&self, name: &str, o: Option<&JourneyOverride>) -> Value {
        json!({
            "journey": name,
            "enabled": self.enabled.value,
            "shadow": self.shadow.value,
            "pilot_percent": self.pilot_percent.value,
            "holdout_percent": self.holdout_percent.value,
            "sources": {
                "enabled": self.enabled.source,
                "shadow": self.shadow.source,
                "pilot_percent": self.pilot_percent.source,
                "holdout_percent": self.holdout_percent.source,
            },
            "updated_at": o.and_then(|o| o.updated_at),
            "updated_by": o.and_then(|o| o.updated_by.clone()),
        })
    }
}

/// A channel's setting in force: stopped by runtime control, disabled by
/// the config (kill switch) or sending.
pub fn channel_setting(
    channel: ChannelKind,
    policy: &PolicyConfig,
    overrides: &Overrides,
) -> Setting<bool> {
    match overrides.channels.get(&channel) {
        Some(&value) => Setting {
            value,
            source: Source::Override,
        },
        None if policy.disabled_channels.contains(&channel) => Setting {
            value: false,
            source: Source::Config,
        },
        None => Setting {
            value: true,
            source: Source::Default,
        },
    }
}

/// A requested change: each field named, with its new value or `None` to
/// clear the override of that field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patch(pub BTreeMap<String, Option<Value>>);

/// Why a requested change was refused (the API answers 400 with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("the body must be a JSON object, e.g. {{\"shadow\": true}}: {0}")]
    NotAnObject(String),
    #[error("unknown field `{field}`: fields are {}", .known.join(", "))]
    UnknownField {
        field: String,
        known: &'static [&'static str],
    },
    #[error("`{field}` must be {expected} (or null to clear the override)")]
    BadValue {
        field: String,
        expected: &'static str,
    },
    #[error("nothing to change: name at least one of {}", .0.join(", "))]
    Empty(&'static [&'static str]),
}

/// Checks a journey change (`PUT /admin/journeys/{name}`).
pub fn journey_patch(body: &[u8]) -> Result<Patch, PatchError> {
    patch(body, JOURNEY_FIELDS)
}

/// Checks a channel change (`PUT /admin/channels/{kind}`).
pub fn channel_patch(body: &[u8]) -> Result<Patch, PatchError> {
    patch(body, CHANNEL_FIELDS)
}

fn patch(body: &[u8], known: &'static [&'static str]) -> Result<Patch, PatchError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| PatchError::NotAnObject(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(PatchError::NotAnObject(format!("got {value}")));
    };
    let mut out = BTreeMap::new();
    for (field, value) in map {
        if !known.contains(&field.as_str()) {
            return Err(PatchError::UnknownField { field, known });
        }
        let percent = field.ends_with("_percent");
        let ok = match &value {
            Value::Null => true,
            Value::Bool(_) => !percent,
            Value::Number(n) => percent && n.as_u64().is_some_and(|p| p <= 100),
            _ => false,
        };
        if !ok {
            return Err(PatchError::BadValue {
                field,
                expected: if percent {
                    "a whole percentage 0-100"
                } else {
                    "true or false"
                },
            });
        }
        out.insert(field, (!value.is_null()).then_some(value));
    }
    if out.is_empty() {
        return Err(PatchError::Empty(known));
    }
    Ok(Patch(out))
}

impl Patch {
    /// The override after this change: the fields set, the fields cleared.
    pub fn apply(&self, current: &Map<String, Value>) -> Map<String, Value> {
        let mut next = current.clone();
        for (field, value) in &self.0 {
            match value {
                Some(v) => next.insert(field.clone(), v.clone()),
                None => next.remove(field),
            };
        }
        next
    }

    /// The store's edit for a journey: before and after are the changed
    /// fields' values in force (not only the override), so the log reads
    /// as what changed for the customers.
    pub fn journey_edit(
        &self,
        journey: &Journey,
        policy: &PolicyConfig,
        current: &Map<String, Value>,
    ) -> ControlEdit {
        let settings = self.apply(current);
        let before = JourneySettings::of(
            journey,
            policy,
            Some(&JourneyOverride::from_settings(current)),
        );
        let after = JourneySettings::of(
            journey,
            policy,
            Some(&JourneyOverride::from_settings(&settings)),
        );
        let pick = |s: &JourneySettings| -> Value {
            Value::Object(self.0.keys().map(|f| (f.clone(), s.value(f))).collect())
        };
        ControlEdit {
            before: pick(&before),
            after: pick(&after),
            settings,
        }
    }

    /// The store's edit for a channel.
    pub fn channel_edit(
        &self,
        channel: ChannelKind,
        policy: &PolicyConfig,
        current: &Map<String, Value>,
    ) -> ControlEdit {
        let settings = self.apply(current);
        let enabled = |settings: &Map<String, Value>| {
            let row = ControlRow {
                kind: CHANNEL.into(),
                target: channel.as_str().into(),
                settings: settings.clone(),
                updated_at: DateTime::<Utc>::default(),
                updated_by: String::new(),
            };
            channel_setting(channel, policy, &Overrides::from_rows(&[row])).value
        };
        ControlEdit {
            before: json!({ "enabled": enabled(current) }),
            after: json!({ "enabled": enabled(&settings) }),
            settings,
        }
    }
}

/// The overrides in force in this process, shared by the pipeline, the
/// scheduler and the admin server; watchers are told when they change.
#[derive(Clone)]
pub struct Controls {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<Arc<Overrides>>,
    changed: watch::Sender<u64>,
}

impl Default for Controls {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                current: RwLock::default(),
                changed: watch::channel(0).0,
            }),
        }
    }
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Controls").field(&self.current()).finish()
    }
}

impl Controls {
    pub fn current(&self) -> Arc<Overrides> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `overrides` in force; tells the watchers when that changes
    /// anything. Returns whether it did.
    pub fn replace(&self, overrides: Overrides) -> bool {
        let mut current = self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if **current == overrides {
            return false;
        }
        for channel in ChannelKind::ALL {
            crate::telemetry::events::ChannelStopped {
                channel: channel.as_str(),
                stopped: overrides.channel_stopped(channel),
            }
            .emit();
        }
        *current = Arc::new(overrides);
        drop(current);
        self.inner.changed.send_modify(|n| *n += 1);
        true
    }

    /// Reads the overrides from the store and puts them in force (blocking).
    pub fn load(&self, store: &dyn Store) -> Result<bool, StoreError> {
        let rows = store.control_overrides()?;
        Ok(self.replace(Overrides::from_rows(&rows)))
    }

    /// A receiver that changes when the overrides do.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

/// Keeps the overrides of this process in step with the store: now, after
/// every [`REFRESH`](REFRESH), until `stop`.
pub async fn refresh(
    store: Arc<dyn Store>,
    controls: Controls,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (store, controls) = (store.clone(), controls.clone());
        let loaded = tokio::task::spawn_blocking(move || controls.load(store.as_ref())).await;
        if let Ok(Err(e)) = loaded {
            crate::telemetry::events::ControlRefreshFailed { error: &e }.emit();
        }
    }
}

#[cfg(test)]
mod tests;
