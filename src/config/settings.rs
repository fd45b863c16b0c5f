//! The contact policy's calendar settings (`policy.caps`, `policy.fatigue`,
//! `policy.quiet_hours`, `policy.business_hours`, `policy.holidays`,
//! `policy.holiday_hold`): typed, refusing unknown keys, with defaults.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::TimeOfDay;
use crate::model::{Category, ChannelKind};

const DAY: u64 = 24 * 3600;

/// One frequency cap: at most `max` messages (of `category`, on `channel`,
/// or everything when neither is set) within `per` calendar days of the
/// customer's time zone: today and the `per - 1` local days before it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cap {
    #[serde(default)]
    pub category: Option<Category>,
    #[serde(default)]
    pub channel: Option<ChannelKind>,
    pub max: u32,
    /// Whole days ("1d", "7d"): calendar days, not a rolling window.
    #[serde(deserialize_with = "whole_days")]
    pub per: u32,
}

impl Cap {
    /// What the cap counts, for its reason: "marketing", "call_task",
    /// "marketing call_task" or "messages" ("message" for a cap of one).
    pub fn what(&self) -> String {
        match (self.category, self.channel) {
            (None, None) if self.max == 1 => "message".into(),
            (None, None) => "messages".into(),
            (Some(c), None) => c.to_string(),
            (None, Some(ch)) => ch.to_string(),
            (Some(c), Some(ch)) => format!("{c} {ch}"),
        }
    }

    /// `frequency cap: 1 marketing within 1 calendar day`, as reasons name it.
    pub fn describe(&self) -> String {
        let days = match self.per {
            1 => "1 calendar day".to_string(),
            n => format!("{n} calendar days"),
        };
        format!("frequency cap: {} {} within {days}", self.max, self.what())
    }

    pub fn counts(&self, channel: ChannelKind, category: Category) -> bool {
        self.category.is_none_or(|c| c == category) && self.channel.is_none_or(|c| c == channel)
    }
}

/// Days as a duration of whole days: "1d", "7d", "2 weeks".
fn whole_days<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    let value = crate::config::parse_duration(&text).map_err(serde::de::Error::custom)?;
    let secs = value.as_secs();
    if secs == 0 || secs % DAY != 0 || value.subsec_nanos() != 0 {
        return Err(serde::de::Error::custom(format!(
            "`{text}` is not a whole number of days like 1d or 7d (caps count calendar days)"
        )));
    }
    u32::try_from(secs / DAY).map_err(|_| serde::de::Error::custom("too many days"))
}

/// A journey whose last `after` sends to a customer, all within `pause`,
/// brought no conversion pauses for that customer for `pause` after the
/// last of them. `after = 0` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fatigue {
    pub after: u32,
    #[serde(deserialize_with = "crate::config::duration")]
    pub pause: Duration,
}

/// `policy.propensity`: how the conversion rates scripts read
/// (`customer.propensity`) are smoothed and how often the daemon reads the
/// counts again.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PropensityConfig {
    /// Beta prior of every rate: `(conversions + a) / (sends + a + b)`.
    pub prior: Prior,
    /// How often the daemon reads the counts from the store (the table
    /// scripts read is at most this old; another replica's counts too).
    #[serde(deserialize_with = "crate::config::duration")]
    pub refresh: Duration,
}

impl Default for PropensityConfig {
    fn default() -> Self {
        Self {
            prior: Prior::default(),
            refresh: Duration::from_secs(5),
        }
    }
}

impl PropensityConfig {
    pub(crate) fn problems(&self, problems: &mut Vec<String>) {
        for (key, v) in [("a", self.prior.a), ("b", self.prior.b)] {
            if !(v.is_finite() && v > 0.0) {
                problems.push(format!(
                    "policy.propensity.prior.{key}: must be a number above 0 (it is {v})"
                ));
            }
        }
        if self.refresh < Duration::from_millis(100) {
            problems.push("policy.propensity.refresh: must be at least 100ms".into());
        }
    }
}

/// A Beta(a, b) prior: `a` conversions in `a + b` sends, imagined before
/// the first real one. The default, 1 in 20, reads 5 % for a step nothing
/// is known of and lets about 20 real sends weigh as much as the prior.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prior {
    pub a: f64,
    pub b: f64,
}

impl Default for Prior {
    fn default() -> Self {
        Self { a: 1.0, b: 19.0 }
    }
}

/// A daily window of local time; `start > end` wraps past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: TimeOfDay,
    pub end: TimeOfDay,
}

impl Window {
    /// Whether the local minute of the day falls inside.
    pub fn contains(&self, minute: u32) -> bool {
        let (s, e) = (self.start.minutes(), self.end.minutes());
        if s < e {
            minute >= s && minute < e
        } else {
            minute >= s || minute < e
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// A window as written: both times, or neither (off); anything else is
/// reported by validation with the other problems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub start: Option<TimeOfDay>,
    pub end: Option<TimeOfDay>,
}

impl WindowSpec {
    pub fn window(&self) -> Option<Window> {
        match (self.start, self.end) {
            (Some(start), Some(end)) if start != end => Some(Window { start, end }),
            _ => None,
        }
    }

    fn problem(&self, key: &str) -> Option<String> {
        match (self.start, self.end) {
            (Some(start), Some(end)) if start == end => Some(format!(
                "{key}.end: equal to start ({start}); leave both empty to turn it off"
            )),
            (Some(_), None) | (None, Some(_)) => Some(format!(
                "{key}.start: set start and end, or leave both empty to turn it off"
            )),
            _ => None,
        }
    }
}

/// Quiet hours per channel. Written as a table per channel
/// (`[policy.quiet_hours.push] start = "21:00" end = "08:00"`), or in the
/// deprecated single-window form (`start`, `end`, `channels` directly under
/// `policy.quiet_hours`), which applies the one window to each listed channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuietHours {
    pub channels: BTreeMap<ChannelKind, WindowSpec>,
    /// The window of the deprecated form, when used.
    pub legacy: Option<WindowSpec>,
}

impl QuietHours {
    /// The channel's window, if it has one that is on.
    pub fn window(&self, channel: ChannelKind) -> Option<Window> {
        self.channels.get(&channel).and_then(WindowSpec::window)
    }

    pub fn problems(&self, problems: &mut Vec<String>) {
        if let Some(spec) = &self.legacy {
            problems.extend(spec.problem("policy.quiet_hours"));
            return;
        }
        for (channel, spec) in &self.channels {
            problems.extend(spec.problem(&format!("policy.quiet_hours.{channel}")));
        }
    }
}

impl Default for QuietHours {
    fn default() -> Self {
        Self {
            channels: [(
                ChannelKind::Push,
                WindowSpec {
                    start: Some(TimeOfDay::new(21, 0)),
                    end: Some(TimeOfDay::new(8, 0)),
                },
            )]
            .into(),
            legacy: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowText {
    #[serde(default)]
    start: String,
    #[serde(default)]
    end: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyQuiet {
    #[serde(default = "legacy_start")]
    start: String,
    #[serde(default = "legacy_end")]
    end: String,
    #[serde(default = "legacy_channels")]
    channels: Vec<ChannelKind>,
}

fn legacy_start() -> String {
    "21:00".into()
}
fn legacy_end() -> String {
    "08:00".into()
}
fn legacy_channels() -> Vec<ChannelKind> {
    vec![ChannelKind::Push]
}

/// "HH:MM", or empty for none.
fn time(text: &str, key: &str) -> Result<Option<TimeOfDay>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    TimeOfDay::parse(text)
        .map(Some)
        .ok_or_else(|| format!("{key}: `{text}` is not a time like 21:00"))
}

fn spec(start: &str, end: &str, key: &str) -> Result<WindowSpec, String> {
    Ok(WindowSpec {
        start: time(start, &format!("{key}.start"))?,
        end: time(end, &format!("{key}.end"))?,
    })
}

impl<'de> Deserialize<'de> for QuietHours {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let table = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        let legacy_keys = ["start", "end", "channels"];
        let err = serde::de::Error::custom;
        if table.keys().any(|k| legacy_keys.contains(&k.as_str())) {
            let old: LegacyQuiet =
                serde_json::from_value(serde_json::Value::Object(table.into_iter().collect()))
                    .map_err(|e| err(format!("policy.quiet_hours: {e}")))?;
            let window = spec(&old.start, &old.end, "policy.quiet_hours").map_err(err)?;
            return Ok(Self {
                channels: old.channels.into_iter().map(|c| (c, window)).collect(),
                legacy: Some(window),
            });
        }
        let mut channels = BTreeMap::new();
        for (name, value) in table {
            let key = format!("policy.quiet_hours.{name}");
            let channel: ChannelKind = name
                .parse()
                .map_err(|e: String| err(format!("{key}: {e} (a table per channel)")))?;
            let text: WindowText =
                serde_json::from_value(value).map_err(|e| err(format!("{key}: {e}")))?;
            channels.insert(channel, spec(&text.start, &text.end, &key).map_err(err)?);
        }
        Ok(Self {
            channels,
            legacy: None,
        })
    }
}

/// When agents (or a channel's recipients) can be reached: open `days`,
/// between `start` and `end` local time, and never on a public holiday.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessHours {
    /// Monday = 0 … Sunday = 6.
    pub days: [bool; 7],
    pub window: Window,
}

impl BusinessHours {
    pub fn office() -> Self {
        Self {
            days: [true, true, true, true, true, false, false],
            window: Window {
                start: TimeOfDay::new(9, 0),
                end: TimeOfDay::new(17, 0),
            },
        }
    }

    /// "Mon-Fri 09:00-17:00".
    pub fn describe(&self) -> String {
        const NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        let open: Vec<usize> = (0..7).filter(|&d| self.days[d]).collect();
        let contiguous = open.windows(2).all(|w| w[1] == w[0] + 1);
        let days = match (open.first(), open.last()) {
            (Some(&a), Some(&b)) if contiguous && b > a => format!("{}-{}", NAMES[a], NAMES[b]),
            _ => open.iter().map(|&d| NAMES[d]).collect::<Vec<_>>().join(","),
        };
        format!("{days} {}", self.window)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BusinessHoursText {
    #[serde(default = "office_days")]
    days: Vec<String>,
    #[serde(default = "office_start")]
    start: String,
    #[serde(default = "office_end")]
    end: String,
}

fn office_days() -> Vec<String> {
    ["mon", "tue", "wed", "thu", "fri"]
        .map(String::from)
        .to_vec()
}
fn office_start() -> String {
    "09:00".into()
}
fn office_end() -> String {
    "17:00".into()
}

/// Business hours per channel (`[policy.business_hours.call_task]`);
/// default: call tasks Monday to Friday 09:00-17:00.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessHoursByChannel(pub BTreeMap<ChannelKind, BusinessHours>);

impl Default for BusinessHoursByChannel {
    fn default() -> Self {
        Self([(ChannelKind::CallTask, BusinessHours::office())].into())
    }
}

impl<'de> Deserialize<'de> for BusinessHoursByChannel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let err = serde::de::Error::custom;
        let table = BTreeMap::<String, BusinessHoursText>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (name, text) in table {
            let key = format!("policy.business_hours.{name}");
            let channel: ChannelKind = name
                .parse()
                .map_err(|e: String| err(format!("{key}: {e}")))?;
            if text.days.is_empty() {
                continue; // no open day: the channel is not bound to hours
            }
            let mut days = [false; 7];
            for day in &text.days {
                let i = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
                    .iter()
                    .position(|d| day.eq_ignore_ascii_case(d))
                    .ok_or_else(|| {
                        err(format!("{key}.days: `{day}` is not a day like mon or fri"))
                    })?;
                days[i] = true;
            }
            let window = spec(&text.start, &text.end, &key)
                .map_err(err)?
                .window()
                .ok_or_else(|| {
                    err(format!(
                        "{key}.start: business hours need a start and a later end"
                    ))
                })?;
            if window.start > window.end {
                return Err(err(format!(
                    "{key}.end: business hours end ({}) before they start ({})",
                    window.end, window.start
                )));
            }
            out.insert(channel, BusinessHours { days, window });
        }
        Ok(Self(out))
    }
}

/// Which steps wait for the next working day on a public holiday: those of
/// these categories, and those on these channels. Channels with business
/// hours are always held.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HolidayHold {
    pub categories: Vec<Category>,
    pub channels: Vec<ChannelKind>,
}

impl Default for HolidayHold {
    fn default() -> Self {
        Self {
            categories: vec![Category::Marketing],
            channels: vec![ChannelKind::CallTask],
        }
    }
}
