//! Contact policy, checked when a step is due (not only when planned):
//! lateness, kill switches, control groups, consent, reachability, the
//! calendar (quiet hours, business hours, public holidays), frequency caps
//! and fatigue. A step that is not sent gets a reason.
//!
//! Calendar deferrals move the step (its lateness counts from the deferred
//! time); for a channel with business hours the lateness bound counts from
//! the first open slot at or after the planned time, so a call task planned
//! for a closed hour is deferred, never expired for it.

pub mod arbitration;
mod calendar;
pub mod caps;
mod fatigue;
pub use crate::config::{holidays, settings};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::clock::span;
use crate::config::PolicyConfig;
use crate::context::CustomerContext;
use crate::control::Controls;
use crate::model::{ChannelKind, DueStep, Mode};
use holidays::Holidays;
use settings::Cap;

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Send,
    /// Logged, never sent: shadow mode (with what would have happened).
    Shadow(String),
    HeldOut,
    Suppress(String),
    Expire(String),
    Defer {
        until: DateTime<Utc>,
        reason: String,
    },
    /// Lost arbitration, waiting for the caps to free: tried again at
    /// `until` with its lateness still measured from when it was planned.
    Wait {
        until: DateTime<Utc>,
        reason: String,
    },
}

/// Why a channel cannot carry a step to the customer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelRefusal {
    NoConsent,
    /// "no app installed", "no email address", "no phone number".
    Unreachable(&'static str),
}

impl std::fmt::Display for ChannelRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelRefusal::NoConsent => f.write_str("no consent"),
            ChannelRefusal::Unreachable(why) => f.write_str(why),
        }
    }
}

/// How long after its due time a retry's claim may take and still be
/// measured at its due time against the lateness bound.
const RETRY_CLAIM_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Policy {
    config: PolicyConfig,
    default_tz: Tz,
    caps: Vec<Cap>,
    holidays: Holidays,
    /// Runtime control: journeys disabled or put in shadow while running.
    controls: Controls,
}

impl Policy {
    /// The holiday calendar is read from `policy.holidays` (checked when the
    /// config loaded) or is the shipped one.
    pub fn new(config: PolicyConfig) -> Self {
        let holidays = match &config.holidays {
            None => Holidays::shipped(),
            Some(path) => Holidays::load(path).unwrap_or_else(|e| {
                crate::telemetry::events::HolidayCalendarUnreadable { error: &e }.emit();
                Holidays::default()
            }),
        };
        if let Some(note) = holidays.ending_note(chrono::Utc::now().date_naive()) {
            crate::telemetry::events::HolidayCalendarEnding { note: &note }.emit();
        }
        Self::with_holidays(config, holidays)
    }

    pub fn with_holidays(config: PolicyConfig, holidays: Holidays) -> Self {
        Self {
            default_tz: config.default_timezone,
            caps: config.effective_caps(),
            holidays,
            config,
            controls: Controls::default(),
        }
    }

    /// Checks steps against these runtime-control overrides too.
    pub fn with_controls(mut self, controls: Controls) -> Self {
        self.controls = controls;
        self
    }

    pub fn controls(&self) -> &Controls {
        &self.controls
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The caps in force.
    pub fn caps(&self) -> &[Cap] {
        &self.caps
    }

    /// How far back the customer's sends must be read for the caps, fatigue
    /// (`fatigue_pause`: the longest pause of any journey) and the rules.
    pub fn lookback(&self, fatigue_pause: std::time::Duration) -> chrono::Duration {
        let days = self.caps.iter().map(|c| c.per).max().unwrap_or(0);
        // A calendar day starts up to 14 hours from UTC midnight: one more day covers it.
        let caps = chrono::Duration::days(i64::from(days) + 1);
        let pause = self
            .config
            .fatigue
            .map_or(std::time::Duration::ZERO, |f| f.pause)
            .max(fatigue_pause);
        caps.max(span(self.config.cap_window)).max(span(pause * 2))
    }

    /// Decides what to do with a due step. `lateness` is the channel's bound.
    pub fn check(
        &self,
        step: &DueStep,
        customer: &CustomerContext,
        lateness: std::time::Duration,
        now: DateTime<Utc>,
    ) -> Verdict {
        if let Some(reason) = self.expiry(step, customer, lateness, now, now) {
            return Verdict::Expire(reason);
        }
        self.check_on_time(step, customer, now)
    }

    /// Why the step is too late to send at `now`, if it is: due longer ago
    /// than `lateness`, counted from when its channel's hours opened.
    /// `claimed_at`: when the step was claimed (`now` at the claim).
    pub fn expiry(
        &self,
        step: &DueStep,
        customer: &CustomerContext,
        lateness: std::time::Duration,
        now: DateTime<Utc>,
        claimed_at: DateTime<Utc>,
    ) -> Option<String> {
        let mut reference = step.planned_at;
        if self.config.business_hours.0.contains_key(&step.channel) {
            if let Some((open, _)) = self.hold(step.channel, step.category, customer, reference) {
                reference = open;
            }
        }
        // A retry the scheduler placed at the bound is the step's last try;
        // the moment its claim takes does not expire it, but any wait after
        // the claim (behind the channel's concurrency) counts. Claimed much
        // later (the daemon was down), it is as late as it is. Earlier
        // retries have no allowance: they are due within the bound.
        let last_try = step.attempt > 1 && step.due_at >= step.planned_at + span(lateness);
        let claim_took = claimed_at - step.due_at;
        let measured_at = if last_try && claim_took <= span(RETRY_CLAIM_GRACE) {
            now - claim_took.max(chrono::Duration::zero())
        } else {
            now
        };
        let late_by = measured_at - reference;
        (late_by > span(lateness)).then(|| {
            format!(
                "due {} ago, past the {} lateness bound of {}",
                crate::humanize::duration(late_by.to_std().unwrap_or_default()),
                step.channel,
                crate::humanize::duration(lateness)
            )
        })
    }

    /// [`Self::check`] of a step not too late.
    fn check_on_time(
        &self,
        step: &DueStep,
        customer: &CustomerContext,
        now: DateTime<Utc>,
    ) -> Verdict {
        let overrides = self.controls.current();
        let over = overrides.journey(&step.journey);
        match over.and_then(|o| o.enabled) {
            Some(false) => {
                return Verdict::Suppress(format!(
                    "kill switch: journey {} disabled by runtime control",
                    step.journey
                ))
            }
            Some(true) => {}
            None if self.config.disabled_journeys.contains(&step.journey) => {
                return Verdict::Suppress(format!(
                    "kill switch: journey {} disabled",
                    step.journey
                ));
            }
            None => {}
        }
        // A channel stopped at run time holds its steps (the scheduler);
        // one resumed at run time is no longer the config's kill switch.
        if self.config.disabled_channels.contains(&step.channel)
            && !overrides.channels.contains_key(&step.channel)
        {
            return Verdict::Suppress(format!("kill switch: channel {} disabled", step.channel));
        }
        if step.mode == Mode::HeldOut {
            return Verdict::HeldOut;
        }
        let refusal = self.refusal(step, customer, now);
        // Shadow set at run time also holds back live instances' steps.
        let shadow = step.mode == Mode::Shadow || over.and_then(|o| o.shadow) == Some(true);
        if shadow {
            return Verdict::Shadow(match refusal {
                None => "shadow mode: would send".into(),
                Some(Verdict::Suppress(r)) => format!("shadow mode: would suppress ({r})"),
                Some(Verdict::Defer { reason, .. }) => {
                    format!("shadow mode: would defer ({reason})")
                }
                Some(other) => format!("shadow mode: {other:?}"),
            });
        }
        refusal.unwrap_or(Verdict::Send)
    }

    fn refusal(
        &self,
        step: &DueStep,
        customer: &CustomerContext,
        now: DateTime<Utc>,
    ) -> Option<Verdict> {
        if let Some(why) = Self::channel_refusal(step.channel, step.category, customer) {
            return Some(Verdict::Suppress(match why {
                ChannelRefusal::NoConsent => {
                    format!("no {} consent for {}", step.category, step.channel)
                }
                ChannelRefusal::Unreachable(why) => {
                    format!("unreachable on {}: {why}", step.channel)
                }
            }));
        }
        if let Some((until, reason)) = self.hold(step.channel, step.category, customer, now) {
            return Some(Verdict::Defer { until, reason });
        }
        if let Err(hit) = self.caps_room(customer, step, now) {
            return Some(Verdict::Suppress(hit.reason));
        }
        None
    }

    /// The cap a step meets, as reasons name it ("frequency cap: 1
    /// marketing within 1 calendar day"); when the step alone would fit and
    /// only the steps it competes with fill the cap, the first cap counting it.
    pub fn cap_text(
        &self,
        customer: &CustomerContext,
        step: &DueStep,
        now: DateTime<Utc>,
    ) -> String {
        match self.caps_room(customer, step, now) {
            Err(hit) => hit.reason,
            Ok(()) => self
                .caps
                .iter()
                .find(|c| c.counts(step.channel, step.category))
                .map_or_else(|| "frequency cap".into(), |c| c.describe()),
        }
    }

    /// Whether `channel` can carry a step of `category` to the customer:
    /// consent, then reachability.
    pub fn channel_refusal(
        channel: ChannelKind,
        category: crate::model::Category,
        customer: &CustomerContext,
    ) -> Option<ChannelRefusal> {
        if !customer.consented(channel, category) {
            return Some(ChannelRefusal::NoConsent);
        }
        if !customer.reachable(channel) {
            return Some(ChannelRefusal::Unreachable(match channel {
                ChannelKind::Push => "no app installed",
                ChannelKind::Email => "no email address",
                ChannelKind::CallTask => "no phone number",
            }));
        }
        None
    }

    /// The channel a step goes on: its own, or when that one is refused
    /// ([`channel_refusal`](Self::channel_refusal)) the first of
    /// `fallback` that is not, with the reason `fallback from push: no app
    /// installed`. `None`: the step's own channel (refused or not).
    pub fn fallback(
        &self,
        step: &DueStep,
        fallback: &[ChannelKind],
        customer: &CustomerContext,
    ) -> Option<(ChannelKind, String)> {
        let why = Self::channel_refusal(step.channel, step.category, customer)?;
        let to = fallback.iter().copied().find(|&c| {
            !self.config.disabled_channels.contains(&c)
                && Self::channel_refusal(c, step.category, customer).is_none()
        })?;
        Some((to, format!("fallback from {}: {why}", step.channel)))
    }

    /// The channel a step declared on the customer's `preferred` channel
    /// goes on now, when the customer has since come to prefer another that
    /// can carry it (consented, reachable, not disabled), with the reason the
    /// sent record carries. `None`: the channel it was planned on.
    pub fn preferred_now(
        &self,
        step: &DueStep,
        customer: &CustomerContext,
    ) -> Option<(ChannelKind, String)> {
        let now = customer.preferred_channel?;
        let can_take = now != step.channel
            && !self.config.disabled_channels.contains(&now)
            && Self::channel_refusal(now, step.category, customer).is_none();
        can_take.then(|| {
            let reason = format!(
                "preferred channel: the customer prefers {now} since the step was planned on {}",
                step.channel
            );
            (now, reason)
        })
    }

    /// Why none of `fallback` could take a step its own channel refuses:
    /// `; no fallback could take it: email (no email address)`. `None` when
    /// the step's channel does not refuse it or it has no fallback.
    pub fn fallbacks_refused(
        &self,
        step: &DueStep,
        fallback: &[ChannelKind],
        customer: &CustomerContext,
    ) -> Option<String> {
        if fallback.is_empty() {
            return None;
        }
        Self::channel_refusal(step.channel, step.category, customer)?;
        let each: Vec<String> = fallback
            .iter()
            .map(|&c| {
                let why = match Self::channel_refusal(c, step.category, customer) {
                    _ if self.config.disabled_channels.contains(&c) => "disabled".to_string(),
                    Some(why) => why.to_string(),
                    None => "available".to_string(),
                };
                format!("{c} ({why})")
            })
            .collect();
        Some(format!("; no fallback could take it: {}", each.join(", ")))
    }

    /// Whether a step could go now but for the caps: what arbitration
    /// weighs a due step against. Conditions and quiet hours are asked
    /// when the step itself is due.
    pub fn may_compete(
        &self,
        step: &DueStep,
        fallback: &[ChannelKind],
        customer: &CustomerContext,
    ) -> bool {
        step.mode == Mode::Live
            && step.instance_status == crate::model::InstanceStatus::Open
            && !self.config.disabled_journeys.contains(&step.journey)
            && !self.config.disabled_channels.contains(&step.channel)
            && (Self::channel_refusal(step.channel, step.category, customer).is_none()
                || self.fallback(step, fallback, customer).is_some())
    }

    /// What the caps leave for arbitration, given the sends the customer's
    /// window already holds (`customer.recent_sends`). The one place that
    /// turns the cap config into [`arbitration::Room`].
    pub fn cap_room(&self, customer: &CustomerContext) -> arbitration::CapsRoom {
        arbitration::CapsRoom {
            caps: self.caps.clone(),
            sent: customer.recent_sends.clone(),
            tz: self.zone(customer),
        }
    }

    fn zone(&self, customer: &CustomerContext) -> Tz {
        customer
            .timezone
            .as_deref()
            .and_then(|z| z.parse().ok())
            .unwrap_or(self.default_tz)
    }

    /// When quiet hours of `channel` are on for the customer now, the
    /// instant they end.
    pub fn quiet_until(
        &self,
        customer: &CustomerContext,
        channel: ChannelKind,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let window = self.config.quiet_hours.window(channel)?;
        calendar::window_end(window, self.zone(customer), now)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Category, InstanceStatus};
    use chrono::Duration;

    /// A live, open step due when planned (shared by the policy's tests).
    pub(crate) fn step(
        channel: ChannelKind,
        category: Category,
        planned: DateTime<Utc>,
    ) -> DueStep {
        DueStep {
            row: 0,
            instance_id: "i".into(),
            step: "s".into(),
            channel,
            template: "t".into(),
            condition: None,
            planned_at: planned,
            due_at: planned,
            attempt: 1,
            customer: "c".into(),
            journey: "j".into(),
            mode: Mode::Live,
            category,
            rule_hash: "h".into(),
            vars: Default::default(),
            instance_status: InstanceStatus::Open,
            begun_before: false,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn reachable() -> CustomerContext {
        let mut c = CustomerContext::new("c");
        c.app_installed = true;
        c.email = Some("c@example.com".into());
        c.timezone = Some("Australia/Sydney".into());
        c
    }

    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    #[test]
    fn quiet_hours_defer_to_local_morning() {
        let p = Policy::new(PolicyConfig::default());
        // 22:30 in Sydney (UTC+11 in January) is 11:30 UTC.
        let now = at("2026-01-10T11:30:00Z");
        let v = p.check(
            &step(ChannelKind::Push, Category::Service, now),
            &reachable(),
            HOUR,
            now,
        );
        assert_eq!(
            v,
            Verdict::Defer {
                until: at("2026-01-10T21:00:00Z"),
                reason: "quiet hours 21:00-08:00 in Australia/Sydney".into()
            }
        );
        // Email is not held by quiet hours by default.
        assert_eq!(
            p.check(
                &step(ChannelKind::Email, Category::Service, now),
                &reachable(),
                HOUR,
                now
            ),
            Verdict::Send
        );
        // Just after midnight the end is the same local day.
        let after_midnight = at("2026-01-10T14:00:00Z"); // 01:00 local
        assert_eq!(
            p.quiet_until(&reachable(), ChannelKind::Push, after_midnight),
            Some(at("2026-01-10T21:00:00Z"))
        );
    }

    #[test]
    fn consent_reachability_caps_and_lateness() {
        let p = Policy::new(PolicyConfig::default());
        let now = at("2026-01-10T01:00:00Z"); // 12:00 local
        let c = reachable();
        assert!(
            matches!(p.check(&step(ChannelKind::Email, Category::Marketing, now), &c, HOUR, now), Verdict::Suppress(r) if r.contains("consent"))
        );
        assert!(
            matches!(p.check(&step(ChannelKind::CallTask, Category::Service, now), &c, HOUR, now), Verdict::Suppress(r) if r.contains("no phone"))
        );
        let mut busy = c.clone();
        busy.recent_sends = vec![
            crate::context::RecentSend {
                at: now,
                journey: "j".into(),
                channel: ChannelKind::Email,
                category: Category::Service,
            };
            4
        ];
        assert!(
            matches!(p.check(&step(ChannelKind::Push, Category::Service, now), &busy, HOUR, now), Verdict::Suppress(r) if r.contains("frequency cap"))
        );
        let old = step(
            ChannelKind::Push,
            Category::Service,
            now - Duration::hours(2),
        );
        assert!(matches!(p.check(&old, &c, HOUR, now), Verdict::Expire(_)));
    }

    /// The last try placed at the bound goes though its claim comes a
    /// moment after; a first try, or a retry claimed long after its time,
    /// is past the bound.
    #[test]
    fn a_retry_at_the_bound_is_tried_though_claimed_a_moment_late() {
        let p = Policy::new(PolicyConfig::default());
        let planned = at("2026-01-10T01:00:00Z"); // 12:00 in Sydney
        let bound = planned + Duration::hours(1);
        let last_try = DueStep {
            due_at: bound,
            attempt: 4,
            ..step(ChannelKind::Push, Category::Service, planned)
        };
        let moment = bound + Duration::milliseconds(40);
        assert_eq!(
            p.check(&last_try, &reachable(), HOUR, moment),
            Verdict::Send
        );
        let much_later = bound + Duration::minutes(5);
        assert!(matches!(
            p.check(&last_try, &reachable(), HOUR, much_later),
            Verdict::Expire(_)
        ));
        let first_try = step(ChannelKind::Push, Category::Service, planned);
        assert!(matches!(
            p.check(&first_try, &reachable(), HOUR, moment),
            Verdict::Expire(_)
        ));
    }

    /// The allowance is for the last try's claim only: a wait after the
    /// claim (behind the channel's concurrency) counts, and a retry due
    /// before the bound has none.
    #[test]
    fn a_retry_has_no_allowance_for_waiting_after_its_claim() {
        let p = Policy::new(PolicyConfig::default());
        let planned = at("2026-01-10T01:00:00Z");
        let bound = planned + Duration::hours(1);
        let c = reachable();
        let last_try = DueStep {
            due_at: bound,
            attempt: 4,
            ..step(ChannelKind::Push, Category::Service, planned)
        };
        let claimed = bound + Duration::seconds(2);
        assert_eq!(p.expiry(&last_try, &c, HOUR, claimed, claimed), None);
        let sent = claimed + Duration::milliseconds(500);
        assert!(
            p.expiry(&last_try, &c, HOUR, sent, claimed)
                .is_some_and(|r| r.contains("due 1h ago")),
            "half a second of waiting past the bound after the claim"
        );
        let earlier_retry = DueStep {
            due_at: bound - Duration::seconds(3),
            attempt: 2,
            ..step(ChannelKind::Push, Category::Service, planned)
        };
        let claimed = bound - Duration::seconds(3);
        assert_eq!(p.expiry(&earlier_retry, &c, HOUR, claimed, claimed), None);
        let sent = bound + Duration::seconds(4);
        assert!(
            p.expiry(&earlier_retry, &c, HOUR, sent, claimed).is_some(),
            "sent 4 s past the bound after waiting behind others"
        );
    }

    #[test]
    fn control_group_shadow_and_kill_switch() {
        let p = Policy::new(PolicyConfig {
            disabled_channels: vec![ChannelKind::Email],
            ..PolicyConfig::default()
        });
        let now = at("2026-01-10T01:00:00Z");
        let mut s = step(ChannelKind::Push, Category::Service, now);
        s.mode = Mode::HeldOut;
        assert_eq!(p.check(&s, &reachable(), HOUR, now), Verdict::HeldOut);
        s.mode = Mode::Shadow;
        assert_eq!(
            p.check(&s, &reachable(), HOUR, now),
            Verdict::Shadow("shadow mode: would send".into())
        );
        assert!(
            matches!(p.check(&step(ChannelKind::Email, Category::Service, now), &reachable(), HOUR, now), Verdict::Suppress(r) if r.contains("kill switch"))
        );
    }
}
