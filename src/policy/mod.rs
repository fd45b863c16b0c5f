//! Contact policy, checked when a step is due (not only when planned):
//! lateness, kill switches, control groups, consent, reachability, quiet
//! hours and frequency caps. A step that is not sent gets a reason.

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::clock::span;
use crate::config::PolicyConfig;
use crate::context::CustomerContext;
use crate::control::Controls;
use crate::model::{ChannelKind, DueStep, Mode};

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
}

pub struct Policy {
    config: PolicyConfig,
    default_tz: Tz,
    quiet: Option<(u32, u32)>,
    /// Runtime control: journeys disabled or put in shadow while running.
    controls: Controls,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Self {
        let default_tz = config.default_timezone;
        let quiet = match (config.quiet_hours.start, config.quiet_hours.end) {
            (Some(s), Some(e)) if s != e => Some((s.minutes(), e.minutes())),
            _ => None,
        };
        Self {
            config,
            default_tz,
            quiet,
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

    /// Decides what to do with a due step. `lateness` is the channel's bound.
    pub fn check(
        &self,
        step: &DueStep,
        customer: &CustomerContext,
        lateness: std::time::Duration,
        now: DateTime<Utc>,
    ) -> Verdict {
        let late_by = now - step.planned_at;
        if late_by > span(lateness) {
            return Verdict::Expire(format!(
                "due {} ago, past the {} lateness bound of {}",
                crate::humanize::duration(late_by.to_std().unwrap_or_default()),
                step.channel,
                crate::humanize::duration(lateness)
            ));
        }
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
        if !customer.consented(step.channel, step.category) {
            return Some(Verdict::Suppress(format!(
                "no {} consent for {}",
                step.category, step.channel
            )));
        }
        if !customer.reachable(step.channel) {
            let why = match step.channel {
                ChannelKind::Push => "no app installed",
                ChannelKind::Email => "no email address",
                ChannelKind::CallTask => "no phone number",
            };
            return Some(Verdict::Suppress(format!(
                "unreachable on {}: {why}",
                step.channel
            )));
        }
        if self.config.quiet_hours.channels.contains(&step.channel) {
            if let Some(until) = self.quiet_until(customer, now) {
                return Some(Verdict::Defer {
                    until,
                    reason: format!(
                        "quiet hours {} in {}",
                        self.quiet_window(),
                        self.zone(customer)
                    ),
                });
            }
        }
        let cap = self.config.max_per_customer as usize;
        if cap > 0 && customer.recent_sends.len() >= cap {
            return Some(Verdict::Suppress(format!(
                "frequency cap: {cap} messages within {}",
                crate::humanize::duration(self.config.cap_window)
            )));
        }
        None
    }

    /// "21:00-08:00", as the config says.
    fn quiet_window(&self) -> String {
        let q = &self.config.quiet_hours;
        match (q.start, q.end) {
            (Some(s), Some(e)) => format!("{s}-{e}"),
            _ => "off".into(),
        }
    }

    fn zone(&self, customer: &CustomerContext) -> Tz {
        customer
            .timezone
            .as_deref()
            .and_then(|z| z.parse().ok())
            .unwrap_or(self.default_tz)
    }

    /// When quiet hours are on for the customer now, the instant they end.
    pub fn quiet_until(
        &self,
        customer: &CustomerContext,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let (start, end) = self.quiet?;
        let tz = self.zone(customer);
        let local = now.with_timezone(&tz);
        let minute = {
            use chrono::Timelike;
            local.hour() * 60 + local.minute()
        };
        let quiet = if start < end {
            minute >= start && minute < end
        } else {
            minute >= start || minute < end
        };
        if !quiet {
            return None;
        }
        let end_time = NaiveTime::from_hms_opt(end / 60, end % 60, 0)?;
        let mut day = local.date_naive();
        if minute >= end {
            day = day.succ_opt()?;
        }
        // On a DST gap, take the earliest valid instant after the end time.
        let end_local = tz
            .from_local_datetime(&day.and_time(end_time))
            .earliest()
            .or_else(|| {
                tz.from_local_datetime(&day.and_time(end_time + Duration::hours(1)))
                    .earliest()
            })?;
        Some(end_local.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Category, InstanceStatus};

    fn step(channel: ChannelKind, category: Category, planned: DateTime<Utc>) -> DueStep {
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
            p.quiet_until(&reachable(), after_midnight),
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
        busy.recent_sends = vec![now; 4];
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
