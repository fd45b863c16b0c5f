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
    /// Exit events read lately, newest last: an exit read before its
    /// trigger (another partition, a producer that sent them out of order)
    /// still ends the journey, at its start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exits: Vec<ExitRead>,
    /// When each field was last set (the setting event's time): an update
    /// older than the value held does not overwrite it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_times: BTreeMap<String, DateTime<Utc>>,
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

/// An exit event, remembered for the journey and instance key it ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitRead {
    pub journey: String,
    pub key: String,
    pub event_type: String,
    pub event_id: String,
    /// The event's own time (not when it was read).
    pub time: DateTime<Utc>,
}

/// Exits remembered per customer: the newest, for this long after their time.
const EXITS_KEPT: usize = 16;
const EXITS_KEPT_FOR: chrono::TimeDelta = chrono::TimeDelta::days(30);

/// How far an exit's time may precede its trigger's and still end it: the
/// producers' clocks differ (a signature stamped a little before the
/// application it signs).
pub const EXIT_CLOCK_SLACK: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

impl CustomerContext {
    /// Remembers an exit event (once per event and journey), forgetting
    /// the oldest beyond [`EXITS_KEPT`] and those older than 30 days.
    pub fn remember_exit(&mut self, exit: ExitRead, now: DateTime<Utc>) {
        self.exits.retain(|x| x.time >= now - EXITS_KEPT_FOR);
        if self
            .exits
            .iter()
            .any(|x| x.event_id == exit.event_id && x.journey == exit.journey)
        {
            return;
        }
        self.exits.push(exit);
        if self.exits.len() > EXITS_KEPT {
            let extra = self.exits.len() - EXITS_KEPT;
            self.exits.drain(..extra);
        }
    }

    /// An exit remembered for `journey` and `key` that happened at or after
    /// `trigger_time` (give or take [`EXIT_CLOCK_SLACK`]): the customer had
    /// already done what the journey would ask of them.
    pub fn exit_since(
        &self,
        journey: &str,
        key: &str,
        trigger_time: DateTime<Utc>,
    ) -> Option<&ExitRead> {
        self.exits.iter().rev().find(|x| {
            x.journey == journey && x.key == key && x.time >= trigger_time - EXIT_CLOCK_SLACK
        })
    }

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

    /// The (channel, category) pairs of `channels` the customer may be
    /// contacted on: reachable and consented.
    pub fn contactable(
        &self,
        channels: &[ChannelKind],
    ) -> std::collections::BTreeSet<(ChannelKind, Category)> {
        channels
            .iter()
            .filter(|c| self.reachable(**c))
            .flat_map(|c| [(*c, Category::Service), (*c, Category::Marketing)])
            .filter(|(c, category)| self.consented(*c, *category))
            .collect()
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

    /// Applies a `customer.*` event read at its own time (see
    /// [`Self::apply_update_at`]).
    pub fn apply_update(&mut self, event: &Event) -> Result<bool, ContextError> {
        self.apply_update_at(event, event.time)
    }

    /// Applies a `customer.*` event read at `now`, field by field: a field
    /// an update of a later time has set keeps that value, so updates read
    /// out of order (another partition, a replayed backlog) never bring
    /// back an old address. A time ahead of `now` counts as `now` (a
    /// producer's clock running fast must not pin a field). Every field is
    /// checked first: a bad field of a contact update is refused alone and
    /// the others are applied (the error names both); a bad consent or
    /// profile update is refused whole. Returns whether it changed anything.
    pub fn apply_update_at(
        &mut self,
        event: &Event,
        now: DateTime<Utc>,
    ) -> Result<bool, ContextError> {
        if !is_context_event(&event.event_type) {
            return Ok(false);
        }
        let mut next = self.clone();
        let refused = next.apply_all(event)?;
        let time = event.time.min(now);
        let before = self.clone();
        let mut applied = Vec::new();
        for field in fields_of(event) {
            if refused.iter().any(|(name, _)| *name == field) {
                continue;
            }
            applied.push(field.clone());
            if self.field_times.get(&field).is_some_and(|set| *set > time) {
                continue;
            }
            self.take_field(&next, &field);
            self.field_times.insert(field, time);
        }
        if !refused.is_empty() {
            let reasons: Vec<&str> = refused.iter().map(|(_, why)| why.as_str()).collect();
            return Err(ContextError {
                reason: reasons.join("; "),
                applied,
            });
        }
        Ok(*self != before)
    }

    /// Copies one field, named as [`fields_of`] names it, from `next`.
    fn take_field(&mut self, next: &CustomerContext, field: &str) {
        match field {
            "timezone" => self.timezone.clone_from(&next.timezone),
            "email" => self.email.clone_from(&next.email),
            "phone" => self.phone.clone_from(&next.phone),
            "app_installed" => self.app_installed = next.app_installed,
            "region" => self.region.clone_from(&next.region),
            "preferred_channel" => self.preferred_channel = next.preferred_channel,
            _ => {
                if let Some(key) = field.strip_prefix("profile.") {
                    match next.profile.get(key) {
                        Some(v) => self.profile.insert(key.to_string(), v.clone()),
                        None => self.profile.remove(key),
                    };
                } else if let Some((channel, category)) = field
                    .strip_prefix("consents.")
                    .and_then(|rest| rest.split_once('.'))
                {
                    let (Ok(channel), Ok(category)) =
                        (channel.parse::<ChannelKind>(), category.parse::<Category>())
                    else {
                        return;
                    };
                    if let Some(granted) =
                        next.consents.get(&channel).and_then(|c| c.get(&category))
                    {
                        self.consents
                            .entry(channel)
                            .or_default()
                            .insert(category, *granted);
                    }
                }
            }
        }
    }

    /// Applies every field of a `customer.*` event, checking each. A
    /// contact update's fields are independent: a bad one is refused alone
    /// (returned, with why) and the others are applied, so that a CRM value
    /// nudge does not know cannot cost the customer an address change. A
    /// consent or profile update is refused as a whole.
    fn apply_all(&mut self, event: &Event) -> Result<Vec<(&'static str, String)>, ContextError> {
        let data = &event.data;
        match event.event_type.as_str() {
            CONTACT_UPDATED => {
                let mut refused = Vec::new();
                let mut field =
                    |name: &'static str, apply: &mut dyn FnMut(&Value) -> Result<(), String>| {
                        if let Some(v) = data.get(name) {
                            if let Err(why) = apply(v) {
                                refused.push((name, why));
                            }
                        }
                    };
                field("timezone", &mut |v| {
                    let tz = opt_string(v, "timezone")?;
                    if let Some(name) = &tz {
                        name.parse::<chrono_tz::Tz>().map_err(|_| {
                            "timezone is not an IANA zone (like Australia/Sydney)".to_string()
                        })?;
                    }
                    self.timezone = tz;
                    Ok(())
                });
                field("email", &mut |v| {
                    // An empty address clears it, as `null` does.
                    let email = opt_string(v, "email")?.filter(|e| !e.trim().is_empty());
                    if email.as_deref().is_some_and(|e| !is_email_address(e)) {
                        return Err("email is not an address (one @ between a name and a domain such as example.com, no spaces)".into());
                    }
                    self.email = email;
                    Ok(())
                });
                field("phone", &mut |v| {
                    let phone = opt_string(v, "phone")?;
                    // E.164 has at most 15 digits; room for spaces, dashes
                    // and an extension, not for a document.
                    if phone.as_ref().is_some_and(|p| p.chars().count() > 64) {
                        return Err("phone is longer than 64 characters".into());
                    }
                    self.phone = phone;
                    Ok(())
                });
                field("app_installed", &mut |v| {
                    self.app_installed = v
                        .as_bool()
                        .ok_or_else(|| "app_installed must be a boolean".to_string())?;
                    Ok(())
                });
                field("region", &mut |v| {
                    let region = opt_string(v, "region")?;
                    if region.as_deref().is_some_and(|r| !is_region(r)) {
                        return Err(
                            "region is not an ISO 3166-2 code like AU-VIC (or a country like AU)"
                                .into(),
                        );
                    }
                    self.region = region.map(|r| r.to_ascii_uppercase());
                    Ok(())
                });
                field("preferred_channel", &mut |v| {
                    self.preferred_channel = match opt_string(v, "preferred_channel")? {
                        None => None,
                        Some(c) => Some(c.parse().map_err(|_| {
                            "preferred_channel is not a channel (push, email, call_task)"
                                .to_string()
                        })?),
                    };
                    Ok(())
                });
                Ok(refused)
            }
            CONSENT_UPDATED => {
                let consents =
                    data.get("consents")
                        .and_then(Value::as_object)
                        .ok_or_else(|| {
                            ContextError::new(
                                "consent_updated needs data.consents: {channel: {category: bool}}"
                                    .into(),
                            )
                        })?;
                for (channel, categories) in consents {
                    let channel: ChannelKind = channel.parse().map_err(|_| {
                        ContextError::new(
                            "data.consents: a key is not a channel (push, email, call_task)".into(),
                        )
                    })?;
                    let categories = categories.as_object().ok_or_else(|| {
                        ContextError::new(format!(
                            "consents.{channel} must be an object of category: bool"
                        ))
                    })?;
                    for (category, granted) in categories {
                        let category: Category = category.parse().map_err(|_| {
                            ContextError::new(format!(
                                "consents.{channel}: a key is not a category (service, marketing)"
                            ))
                        })?;
                        let granted = granted.as_bool().ok_or_else(|| {
                            ContextError::new(format!(
                                "consents.{channel}.{category} must be a boolean"
                            ))
                        })?;
                        self.consents
                            .entry(channel)
                            .or_default()
                            .insert(category, granted);
                    }
                }
                Ok(Vec::new())
            }
            PROFILE_UPDATED => {
                let profile = data
                    .get("profile")
                    .and_then(Value::as_object)
                    .ok_or_else(|| {
                        ContextError::new("profile_updated needs data.profile as an object".into())
                    })?;
                for (k, v) in profile {
                    if v.is_null() {
                        self.profile.remove(k);
                    } else {
                        self.profile.insert(k.clone(), v.clone());
                    }
                }
                check_profile_size(&self.profile)?;
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// The most fields a customer's profile may hold. Every decision reads the
/// profile and every decision record keeps a copy of it: one customer's
/// oversized profile would otherwise slow every batch it is in and grow the
/// store by its size at each decision.
pub const PROFILE_MAX_FIELDS: usize = 256;
/// The most a customer's profile may hold, as JSON.
pub const PROFILE_MAX_BYTES: usize = 16 * 1024;

/// Refuses a profile over [`PROFILE_MAX_FIELDS`] or [`PROFILE_MAX_BYTES`].
fn check_profile_size(profile: &Map<String, Value>) -> Result<(), ContextError> {
    let bytes = serde_json::to_vec(profile).map_or(usize::MAX, |v| v.len());
    if profile.len() > PROFILE_MAX_FIELDS || bytes > PROFILE_MAX_BYTES {
        return Err(ContextError::new(format!(
            "the profile would hold {} fields and {} bytes as JSON, over the limit of \
             {PROFILE_MAX_FIELDS} fields and {PROFILE_MAX_BYTES} bytes: keep in it what \
             journeys decide on (a field set to null is removed)",
            profile.len(),
            bytes
        )));
    }
    Ok(())
}

/// The context fields a (valid) `customer.*` event sets: `email`,
/// `consents.push.marketing`, `profile.segment` …
fn fields_of(event: &Event) -> Vec<String> {
    let data = &event.data;
    match event.event_type.as_str() {
        CONTACT_UPDATED => [
            "timezone",
            "email",
            "phone",
            "app_installed",
            "region",
            "preferred_channel",
        ]
        .into_iter()
        .filter(|f| data.get(*f).is_some())
        .map(String::from)
        .collect(),
        CONSENT_UPDATED => data
            .get("consents")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .flat_map(|(channel, categories)| {
                categories
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(move |(category, _)| format!("consents.{channel}.{category}"))
            })
            .collect(),
        PROFILE_UPDATED => data
            .get("profile")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, _)| format!("profile.{k}"))
            .collect(),
        _ => Vec::new(),
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

/// Whether `text` has an address's shape: one `@` between a local part and
/// a dotted domain, no spaces or control characters, within the lengths
/// mail servers accept. Deliverability is the email provider's to judge;
/// this keeps a phone number or a name sent in the wrong field from being
/// mailed to.
pub fn is_email_address(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    text.len() <= 254
        && (1..=64).contains(&local.len())
        && !domain.contains('@')
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
        && domain.contains('.')
        && domain.split('.').all(|label| !label.is_empty())
}

fn opt_string(v: &Value, field: &str) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(format!("{field} must be a string or null")),
    }
}

#[derive(Debug, thiserror::Error)]
/// Says what was expected, never the value given: the reason reaches the
/// log and the dead letter's headers, and the value may be contact data
/// sent in the wrong field (the dead letter keeps the original).
#[error("invalid customer update: {reason}{}", applied_text(.applied))]
pub struct ContextError {
    pub reason: String,
    /// The update's other fields, applied (a contact update's fields are
    /// refused one by one); empty when nothing of it was.
    pub applied: Vec<String>,
}

impl ContextError {
    fn new(reason: String) -> Self {
        Self {
            reason,
            applied: Vec::new(),
        }
    }
}

fn applied_text(applied: &[String]) -> String {
    match applied.is_empty() {
        true => String::new(),
        false => format!("; its other fields were applied ({})", applied.join(", ")),
    }
}

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
    fn an_update_that_would_overgrow_the_profile_is_refused_whole() {
        let mut c = CustomerContext::new("c1");
        c.apply_update(&event(
            PROFILE_UPDATED,
            serde_json::json!({"profile": {"segment": "gold", "tier": 2}}),
        ))
        .unwrap();
        let fields: Map<String, Value> = (0..PROFILE_MAX_FIELDS)
            .map(|i| (format!("f{i}"), Value::from(i)))
            .collect();
        let e = c
            .apply_update(&event(
                PROFILE_UPDATED,
                serde_json::json!({ "profile": fields }),
            ))
            .unwrap_err();
        assert!(
            e.reason.contains("would hold 258 fields")
                && e.reason
                    .contains("over the limit of 256 fields and 16384 bytes"),
            "{}",
            e.reason
        );
        let big = "x".repeat(PROFILE_MAX_BYTES);
        let e = c
            .apply_update(&event(
                PROFILE_UPDATED,
                serde_json::json!({"profile": {"note": big}}),
            ))
            .unwrap_err();
        assert!(e.reason.contains("3 fields and 16"), "{}", e.reason);
        // Nothing of either was applied.
        assert_eq!(c.profile.len(), 2);
        assert_eq!(c.profile["segment"], "gold");
        assert!(!c.field_times.contains_key("profile.note"));
        // A phone number that is a document is refused alone.
        let e = c
            .apply_update(&event(
                CONTACT_UPDATED,
                serde_json::json!({"phone": "1".repeat(65), "app_installed": true}),
            ))
            .unwrap_err();
        assert!(
            e.reason.contains("phone is longer than 64 characters"),
            "{}",
            e.reason
        );
        assert!(c.phone.is_none() && c.app_installed);
        // A field set to null is removed, so a profile can be brought back
        // under the bound.
        c.apply_update(&event(
            PROFILE_UPDATED,
            serde_json::json!({"profile": {"tier": null, "segment": "silver"}}),
        ))
        .unwrap();
        assert_eq!(
            Value::Object(c.profile.clone()),
            serde_json::json!({"segment": "silver"})
        );
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

    /// Updates read out of order: each field keeps the value of the latest
    /// update that set it, whatever the order they are read in; a field
    /// only the older update carries is taken; a time ahead of the reader's
    /// clock counts as now; a bad field still refuses the whole event.
    #[test]
    fn updates_apply_field_by_field_by_their_time_not_the_order_read() {
        let at = |time: &str, t: &str, data: Value| {
            Event::parse(
                serde_json::json!({"specversion":"1.0","id":time,"type":t,"source":"s","subject":"c1","time":time,"data":data})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap()
        };
        let now: DateTime<Utc> = "2026-06-01T12:00:00Z".parse().unwrap();
        let mut c = CustomerContext::new("c1");
        let newer = at(
            "2026-06-01T11:59:00Z",
            CONTACT_UPDATED,
            serde_json::json!({"app_installed": true, "email": "new@example.com"}),
        );
        let older = at(
            "2026-06-01T07:00:00Z",
            CONTACT_UPDATED,
            serde_json::json!({"app_installed": false, "email": "old@example.com", "phone": "+61400000000"}),
        );
        assert!(c.apply_update_at(&newer, now).unwrap());
        assert!(c.apply_update_at(&older, now).unwrap(), "the phone is new");
        assert_eq!(c.email.as_deref(), Some("new@example.com"));
        assert!(c.app_installed);
        assert_eq!(c.phone.as_deref(), Some("+61400000000"));
        assert!(
            !c.apply_update_at(&older, now).unwrap(),
            "nothing left to take"
        );

        let consent = |time: &str, granted: bool| {
            at(
                time,
                CONSENT_UPDATED,
                serde_json::json!({"consents": {"email": {"marketing": granted}}}),
            )
        };
        c.apply_update_at(&consent("2026-06-01T11:00:00Z", false), now)
            .unwrap();
        c.apply_update_at(&consent("2026-06-01T10:00:00Z", true), now)
            .unwrap();
        assert!(!c.consented(ChannelKind::Email, Category::Marketing));

        // A producer's clock a year ahead does not pin the address.
        let future = at(
            "2027-06-01T00:00:00Z",
            CONTACT_UPDATED,
            serde_json::json!({"email": "future@example.com"}),
        );
        c.apply_update_at(&future, now).unwrap();
        let fixed = at(
            "2026-06-01T12:30:00Z",
            CONTACT_UPDATED,
            serde_json::json!({"email": "fixed@example.com"}),
        );
        c.apply_update_at(&fixed, now + chrono::TimeDelta::hours(1))
            .unwrap();
        assert_eq!(c.email.as_deref(), Some("fixed@example.com"));

        let bad = at(
            "2026-06-01T12:40:00Z",
            CONTACT_UPDATED,
            serde_json::json!({"email": "bad@example.com", "timezone": "AEST", "phone": 61_400_000_000_u64}),
        );
        // A bad field is refused alone, naming why and what was applied;
        // never the values.
        let err = c
            .apply_update_at(&bad, now + chrono::TimeDelta::hours(1))
            .unwrap_err();
        assert_eq!(err.applied, ["email"]);
        assert_eq!(
            err.to_string(),
            "invalid customer update: timezone is not an IANA zone (like Australia/Sydney); \
             phone must be a string or null; its other fields were applied (email)"
        );
        assert_eq!(c.email.as_deref(), Some("bad@example.com"));
        assert_eq!(c.timezone, None, "refused: unchanged");
        assert_eq!(
            c.phone.as_deref(),
            Some("+61400000000"),
            "refused: unchanged"
        );
        // A consent update with one bad category is refused whole.
        let consent = at(
            "2026-06-01T12:50:00Z",
            CONSENT_UPDATED,
            serde_json::json!({"consents": {"email": {"marketing": true, "service": "no"}}}),
        );
        let err = c
            .apply_update_at(&consent, now + chrono::TimeDelta::hours(1))
            .unwrap_err();
        assert!(err.applied.is_empty());
        assert!(!c.consented(ChannelKind::Email, Category::Marketing));
    }

    /// An email that is not address-shaped is refused without echoing it;
    /// an empty one clears the address as `null` does.
    #[test]
    fn an_email_must_look_like_an_address() {
        for good in [
            "a@b.co",
            "first.last+tag@mail.example.com.au",
            "o'brien@example.ie",
            "jürgen@bücher.de",
        ] {
            assert!(is_email_address(good), "{good}");
        }
        for bad in [
            "0412 345 678",
            "jane",
            "@example.com",
            "jane@",
            "jane@localhost",
            "jane@example..com",
            "jane@.example.com",
            "jane@example.com.",
            "ja ne@example.com",
            "jane@exa@mple.com",
            "jane@example.com\n",
            &format!("{}@example.com", "x".repeat(65)),
        ] {
            assert!(!is_email_address(bad), "{bad}");
        }
        let mut c = CustomerContext::new("c1");
        let update = |email: Value| event(CONTACT_UPDATED, serde_json::json!({ "email": email }));
        c.apply_update(&update("jane@example.com".into())).unwrap();
        let err = c
            .apply_update(&update("0412 345 678".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("email is not an address"), "{err}");
        assert!(!err.contains("0412"), "{err}");
        assert_eq!(c.email.as_deref(), Some("jane@example.com"));
        c.apply_update(&update("  ".into())).unwrap();
        assert_eq!(c.email, None);
        assert!(!c.reachable(ChannelKind::Email));
    }

    /// An exit ends a trigger of its journey and key that it does not
    /// precede by more than the clock slack; the memory is bounded by count
    /// and age, and one event is remembered once.
    #[test]
    fn exits_are_remembered_by_journey_and_key_and_bounded() {
        let t = |m: i64| {
            chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
                .unwrap()
                .with_timezone(&Utc)
                + chrono::TimeDelta::minutes(m)
        };
        let exit = |id: &str, key: &str, m: i64| ExitRead {
            journey: "loan".into(),
            key: key.into(),
            event_type: "signed".into(),
            event_id: id.into(),
            time: t(m),
        };
        let mut c = CustomerContext::new("c");
        c.remember_exit(exit("s1", "A-1", 0), t(0));
        c.remember_exit(exit("s1", "A-1", 0), t(0));
        assert_eq!(c.exits.len(), 1);
        assert!(c.exit_since("loan", "A-1", t(-60)).is_some());
        assert!(
            c.exit_since("loan", "A-1", t(5)).is_some(),
            "within the slack"
        );
        assert!(
            c.exit_since("loan", "A-1", t(6)).is_none(),
            "a later trigger"
        );
        assert!(c.exit_since("loan", "A-2", t(-60)).is_none(), "another key");
        assert!(
            c.exit_since("card", "A-1", t(-60)).is_none(),
            "another journey"
        );

        for i in 0..20 {
            c.remember_exit(exit(&format!("n{i}"), &format!("B-{i}"), i), t(i));
        }
        assert_eq!(c.exits.len(), EXITS_KEPT);
        assert!(c.exit_since("loan", "B-19", t(0)).is_some());
        assert!(
            c.exit_since("loan", "A-1", t(-60)).is_none(),
            "the oldest went"
        );
        c.remember_exit(exit("late", "C-1", 31 * 24 * 60), t(31 * 24 * 60));
        assert_eq!(c.exits.len(), 1, "a month later only the new one is kept");

        let text = serde_json::to_string(&CustomerContext::new("d")).unwrap();
        assert!(!text.contains("exits"), "{text}");
    }
}
