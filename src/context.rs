//! The customer's context: how to reach them, what they consented to, their
//! profile and the journeys they were in. Every decision reads it; the
//! `customer.*` events keep it current.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::Event;
use crate::model::{Category, ChannelKind, InstanceStatus, Mode};

pub const CONTACT_UPDATED: &str = "customer.contact_updated";
pub const CONSENT_UPDATED: &str = "customer.consent_updated";
pub const PROFILE_UPDATED: &str = "customer.profile_updated";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CustomerContext {
    pub id: String,
    /// IANA zone; the policy's default applies when unknown.
    pub timezone: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub app_installed: bool,
    /// ISO 3166-2 subdivision (e.g. `AU-VIC`): which public holidays apply.
    /// Unknown: the country's national holidays only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub preferred_channel: Option<ChannelKind>,
    /// channel → category → granted. Unset means the default: service
    /// messages allowed, marketing not (opt-in).
    pub consents: BTreeMap<ChannelKind, BTreeMap<Category, bool>>,
    pub profile: Map<String, Value>,
    /// Not persisted with the profile: filled from the store on load.
    #[serde(skip)]
    pub journeys: Vec<JourneySummary>,
    /// Messages sent to this customer recently, newest first.
    #[serde(skip)]
    pub recent_sends: Vec<RecentSend>,
    /// Claimed steps whose send began and whose result is not recorded yet
    /// (row, the send): in flight, or delivered by a worker that died
    /// before recording it. Read with `recent_sends`.
    #[serde(skip)]
    pub possibly_sent: Vec<(i64, RecentSend)>,
}

/// One message sent (or possibly sent) to the customer: what the caps and
/// fatigue count, by category and channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentSend {
    pub at: DateTime<Utc>,
    pub journey: String,
    pub channel: ChannelKind,
    pub category: Category,
}

/// One journey instance the customer is or was in.
#[derive(Debug, Clone, PartialEq)]
pub struct JourneySummary {
    pub journey: String,
    pub key: String,
    /// `open`, then `converted`, `cancelled` or `completed`, in every mode.
    pub status: InstanceStatus,
    /// Live, held out (control group) or shadow.
    pub mode: Mode,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

impl CustomerContext {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            ..Self::default()
        }
    }

    pub fn consented(&self, channel: ChannelKind, category: Category) -> bool {
        self.consents
            .get(&channel)
            .and_then(|c| c.get(&category))
            .copied()
            .unwrap_or(category == Category::Service)
    }

    pub fn reachable(&self, channel: ChannelKind) -> bool {
        match channel {
            ChannelKind::Push => self.app_installed,
            ChannelKind::Email => self.email.as_deref().is_some_and(|e| !e.is_empty()),
            ChannelKind::CallTask => self.phone.as_deref().is_some_and(|p| !p.is_empty()),
        }
    }

    pub fn in_journey(&self, journey: &str) -> bool {
        self.journeys
            .iter()
            .any(|j| j.journey == journey && j.status == InstanceStatus::Open)
    }

    pub fn has_status(&self, journey: &str, status: InstanceStatus) -> bool {
        self.journeys
            .iter()
            .any(|j| j.journey == journey && j.status == status)
    }

    /// Applies a `customer.*` event. Returns whether it was one.
    pub fn apply_update(&mut self, event: &Event) -> Result<bool, ContextError> {
        let data = &event.data;
        match event.event_type.as_str() {
            CONTACT_UPDATED => {
                if let Some(tz) = data.get("timezone") {
                    let tz = opt_string(tz, "timezone")?;
                    if let Some(name) = &tz {
                        name.parse::<chrono_tz::Tz>().map_err(|_| {
                            ContextError(
                                "timezone is not an IANA zone (like Australia/Sydney)".into(),
                            )
                        })?;
                    }
                    self.timezone = tz;
                }
                if let Some(v) = data.get("email") {
                    self.email = opt_string(v, "email")?;
                }
                if let Some(v) = data.get("phone") {
                    self.phone = opt_string(v, "phone")?;
                }
                if let Some(v) = data.get("app_installed") {
                    self.app_installed = v
                        .as_bool()
                        .ok_or_else(|| ContextError("app_installed must be a boolean".into()))?;
                }
                if let Some(v) = data.get("region") {
                    let region = opt_string(v, "region")?;
                    if let Some(r) = &region {
                        if !is_region(r) {
                            return Err(ContextError(
                                "region is not an ISO 3166-2 code like AU-VIC (or a country like AU)"
                                    .into(),
                            ));
                        }
                    }
                    self.region = region.map(|r| r.to_ascii_uppercase());
                }
                if let Some(v) = data.get("preferred_channel") {
                    self.preferred_channel = match opt_string(v, "preferred_channel")? {
                        None => None,
                        Some(c) => Some(c.parse().map_err(|_| {
                            ContextError(
                                "preferred_channel is not a channel (push, email, call_task)"
                                    .into(),
                            )
                        })?),
                    };
                }
                Ok(true)
            }
            CONSENT_UPDATED => {
                let consents =
                    data.get("consents")
                        .and_then(Value::as_object)
                        .ok_or_else(|| {
                            ContextError(
                                "consent_updated needs data.consents: {channel: {category: bool}}"
                                    .into(),
                            )
                        })?;
                for (channel, categories) in consents {
                    let channel: ChannelKind = channel.parse().map_err(|_| {
                        ContextError(
                            "data.consents: a key is not a channel (push, email, call_task)".into(),
                        )
                    })?;
                    let categories = categories.as_object().ok_or_else(|| {
                        ContextError(format!(
                            "consents.{channel} must be an object of category: bool"
                        ))
                    })?;
                    for (category, granted) in categories {
                        let category: Category = category.parse().map_err(|_| {
                            ContextError(format!(
                                "consents.{channel}: a key is not a category (service, marketing)"
                            ))
                        })?;
                        let granted = granted.as_bool().ok_or_else(|| {
                            ContextError(format!("consents.{channel}.{category} must be a boolean"))
                        })?;
                        self.consents
                            .entry(channel)
                            .or_default()
                            .insert(category, granted);
                    }
                }
                Ok(true)
            }
            PROFILE_UPDATED => {
                let profile = data
                    .get("profile")
                    .and_then(Value::as_object)
                    .ok_or_else(|| {
                        ContextError("profile_updated needs data.profile as an object".into())
                    })?;
                for (k, v) in profile {
                    self.profile.insert(k.clone(), v.clone());
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

pub fn is_context_event(event_type: &str) -> bool {
    matches!(
        event_type,
        CONTACT_UPDATED | CONSENT_UPDATED | PROFILE_UPDATED
    )
}

/// `CC-SUB`: a two-letter country, a dash, one to three letters or digits.
/// An ISO 3166-2 subdivision (`AU-VIC`) or a country alone (`AU`), in any case.
pub fn is_region(code: &str) -> bool {
    let (country, sub) = code.split_once('-').unwrap_or((code, "X"));
    country.len() == 2
        && country.chars().all(|c| c.is_ascii_alphabetic())
        && (1..=3).contains(&sub.len())
        && sub.chars().all(|c| c.is_ascii_alphanumeric())
}

fn opt_string(v: &Value, field: &str) -> Result<Option<String>, ContextError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(ContextError(format!("{field} must be a string or null"))),
    }
}

#[derive(Debug, thiserror::Error)]
/// Says what was expected, never the value given: the reason reaches the
/// log and the dead letter's headers, and the value may be contact data
/// sent in the wrong field (the dead letter keeps the original).
#[error("invalid customer update: {0}")]
pub struct ContextError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(t: &str, data: Value) -> Event {
        Event::parse(
            serde_json::json!({"specversion":"1.0","id":"e","type":t,"source":"s","subject":"c1","time":"2026-01-01T00:00:00Z","data":data})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn consent_defaults_to_service_only() {
        let mut c = CustomerContext::new("c1");
        assert!(c.consented(ChannelKind::Email, Category::Service));
        assert!(!c.consented(ChannelKind::Email, Category::Marketing));
        c.apply_update(&event(
            CONSENT_UPDATED,
            serde_json::json!({"consents":{"email":{"marketing":true,"service":false}}}),
        ))
        .unwrap();
        assert!(c.consented(ChannelKind::Email, Category::Marketing));
        assert!(!c.consented(ChannelKind::Email, Category::Service));
        assert!(!c.consented(ChannelKind::Push, Category::Marketing));
    }

    #[test]
    fn contact_update_merges_and_validates() {
        let mut c = CustomerContext::new("c1");
        c.apply_update(&event(
            CONTACT_UPDATED,
            serde_json::json!({"app_installed":true,"timezone":"Australia/Perth"}),
        ))
        .unwrap();
        c.apply_update(&event(
            CONTACT_UPDATED,
            serde_json::json!({"email":"a@b.c"}),
        ))
        .unwrap();
        assert!(c.reachable(ChannelKind::Push) && c.reachable(ChannelKind::Email));
        assert!(!c.reachable(ChannelKind::CallTask));
        assert_eq!(c.timezone.as_deref(), Some("Australia/Perth"));
        assert_eq!(c.region, None);
        c.apply_update(&event(
            CONTACT_UPDATED,
            serde_json::json!({"region":"au-vic"}),
        ))
        .unwrap();
        assert_eq!(c.region.as_deref(), Some("AU-VIC"));
        // A country alone: its national holidays apply.
        c.apply_update(&event(CONTACT_UPDATED, serde_json::json!({"region":"au"})))
            .unwrap();
        assert_eq!(c.region.as_deref(), Some("AU"));
        assert!(c
            .apply_update(&event(
                CONTACT_UPDATED,
                serde_json::json!({"region":"Victoria"})
            ))
            .is_err());
        assert!(c
            .apply_update(&event(
                CONTACT_UPDATED,
                serde_json::json!({"timezone":"Nowhere/Land"})
            ))
            .is_err());
        assert!(c
            .apply_update(&event(
                CONSENT_UPDATED,
                serde_json::json!({"consents":{"fax":{"service":true}}})
            ))
            .is_err());
    }
}
