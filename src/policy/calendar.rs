//! When a step may go out by the customer's calendar: quiet hours of its
//! channel, the channel's business hours, and public holidays in the
//! customer's region. All in the customer's local time.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use super::settings::Window;
use super::Policy;
use crate::config::TimeOfDay;
use crate::context::CustomerContext;
use crate::model::{Category, ChannelKind};

/// Enough for any real calendar (a long holiday run across a weekend, each
/// closed day and each night one step); a calendar still closed after that
/// many steps is left to decide again at the instant reached.
const MAX_STEPS: usize = 64;

impl Policy {
    /// When the calendar holds a step of `channel` and `category` for the
    /// customer at `now`: the first instant it may go out, and why it waits
    /// (the first reason met).
    pub fn hold(
        &self,
        channel: ChannelKind,
        category: Category,
        customer: &CustomerContext,
        now: DateTime<Utc>,
    ) -> Option<(DateTime<Utc>, String)> {
        let tz = self.zone(customer);
        let region = customer
            .region
            .as_deref()
            .unwrap_or(&self.config.default_region);
        let mut at = now;
        let mut first = None;
        for _ in 0..MAX_STEPS {
            match self.closed(channel, category, region, tz, at) {
                None => break,
                Some((until, reason)) => {
                    first.get_or_insert(reason);
                    at = until;
                }
            }
        }
        first.map(|reason| (at, reason))
    }

    /// Whether `at` is closed for the step, and until when (which may be
    /// closed for another reason: the caller checks again).
    fn closed(
        &self,
        channel: ChannelKind,
        category: Category,
        region: &str,
        tz: Tz,
        at: DateTime<Utc>,
    ) -> Option<(DateTime<Utc>, String)> {
        let local = at.with_timezone(&tz);
        let today = local.date_naive();
        let minute = local.hour() * 60 + local.minute();
        let hours = self.config.business_hours.0.get(&channel);
        let hold = &self.config.holiday_hold;
        let held_on_holidays = hours.is_some()
            || hold.channels.contains(&channel)
            || hold.categories.contains(&category);
        if held_on_holidays {
            if let Some((name, from)) = self.holidays.on(region, today) {
                let tomorrow = today.succ_opt()?;
                return Some((
                    local_instant(tz, tomorrow, TimeOfDay::new(0, 0))?,
                    format!("public holiday: {name} ({from})"),
                ));
            }
        }
        if let Some(hours) = hours {
            let (start, end) = (hours.window.start, hours.window.end);
            let open_day = hours.days[today.weekday().num_days_from_monday() as usize];
            let reason = || format!("outside business hours {} in {tz}", hours.describe());
            if open_day && minute < start.minutes() {
                return Some((local_instant(tz, today, start)?, reason()));
            }
            if !open_day || minute >= end.minutes() {
                return Some((local_instant(tz, today.succ_opt()?, start)?, reason()));
            }
        }
        if let Some(window) = self.config.quiet_hours.window(channel) {
            if let Some(until) = window_end(window, tz, at) {
                return Some((until, format!("quiet hours {window} in {tz}")));
            }
        }
        None
    }
}

/// When `now` falls in the daily `window` in `tz`, the instant it ends.
pub(super) fn window_end(window: Window, tz: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&tz);
    let minute = local.hour() * 60 + local.minute();
    if !window.contains(minute) {
        return None;
    }
    let mut day = local.date_naive();
    if minute >= window.end.minutes() {
        day = day.succ_opt()?;
    }
    local_instant(tz, day, window.end)
}

/// The instant of a local date and time; in a DST gap, the first valid
/// instant after it (the wall clock jumps: 02:30 becomes 03:30).
pub(super) fn local_instant(tz: Tz, day: NaiveDate, time: TimeOfDay) -> Option<DateTime<Utc>> {
    let time = NaiveTime::from_hms_opt(time.minutes() / 60, time.minutes() % 60, 0)?;
    let local = day.and_time(time);
    tz.from_local_datetime(&local)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(local + Duration::hours(1)))
                .earliest()
        })
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use crate::policy::Verdict;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn customer(tz: &str, region: Option<&str>) -> CustomerContext {
        let mut c = CustomerContext::new("c");
        c.timezone = Some(tz.into());
        c.region = region.map(String::from);
        c.app_installed = true;
        c.phone = Some("+61400000000".into());
        c.email = Some("c@example.com".into());
        c.consents.insert(
            ChannelKind::Push,
            [(Category::Marketing, true)].into_iter().collect(),
        );
        c
    }

    use crate::policy::tests::step;

    use Category::{Marketing as M, Service as S};
    use ChannelKind::{CallTask as Call, Email, Push};

    /// (case, zone, region, channel, category, now, expected: when it may go
    /// and the reason, or None for now).
    #[allow(clippy::type_complexity)]
    #[test]
    fn call_windows_holidays_and_quiet_hours_by_channel() {
        let perth = "Australia/Perth";
        let cases: &[(&str, &str, Option<&str>, ChannelKind, Category, &str, Option<(&str, &str)>)] = &[
            ("Perth, Monday 23:30: Tuesday 09:00", perth, Some("AU-WA"), Call, S,
                "2026-03-09T23:30:00+08:00",
                Some(("2026-03-10T09:00:00+08:00", "outside business hours Mon-Fri 09:00-17:00 in Australia/Perth"))),
            ("Perth, Tuesday 08:59: 09:00", perth, Some("AU-WA"), Call, S,
                "2026-03-10T08:59:00+08:00", Some(("2026-03-10T09:00:00+08:00", "outside business hours Mon-Fri 09:00-17:00 in Australia/Perth"))),
            ("Perth, Tuesday noon: now", perth, Some("AU-WA"), Call, S, "2026-03-10T12:00:00+08:00", None),
            ("Perth, Friday 17:00: Monday 09:00", perth, Some("AU-WA"), Call, S,
                "2026-03-13T17:00:00+08:00", Some(("2026-03-16T09:00:00+08:00", "outside business hours Mon-Fri 09:00-17:00 in Australia/Perth"))),
            ("Perth, Saturday: Monday 09:00", perth, Some("AU-WA"), Call, S,
                "2026-03-14T10:00:00+08:00", Some(("2026-03-16T09:00:00+08:00", "outside business hours Mon-Fri 09:00-17:00 in Australia/Perth"))),
            ("Perth, WA Labour Day (Monday 2 March): Tuesday", perth, Some("AU-WA"), Call, S,
                "2026-03-02T10:00:00+08:00", Some(("2026-03-03T09:00:00+08:00", "public holiday: Labour Day (AU-WA)"))),
            ("Perth, Thursday before Easter 17:30: past Good Friday to Easter Monday, Tuesday 09:00", perth, Some("AU-WA"), Call, S,
                "2026-04-02T17:30:00+08:00", Some(("2026-04-07T09:00:00+08:00", "outside business hours Mon-Fri 09:00-17:00 in Australia/Perth"))),
            ("VIC, Melbourne Cup day: the next working day", "Australia/Melbourne", Some("AU-VIC"), Call, S,
                "2026-11-03T10:00:00+11:00", Some(("2026-11-04T09:00:00+11:00", "public holiday: Melbourne Cup (AU-VIC)"))),
            ("NSW, Melbourne Cup day: goes", "Australia/Sydney", Some("AU-NSW"), Call, S,
                "2026-11-03T10:00:00+11:00", None),
            ("region unknown: national holidays only, Cup day goes", "Australia/Melbourne", None, Call, S,
                "2026-11-03T10:00:00+11:00", None),
            ("region unknown: Good Friday waits", "Australia/Melbourne", None, Call, S,
                "2027-03-26T10:00:00+11:00", Some(("2027-03-30T09:00:00+11:00", "public holiday: Good Friday (AU)"))),
            ("marketing push on Australia Day: next day, after quiet hours", "Australia/Sydney", Some("AU-NSW"), Push, M,
                "2026-01-26T12:00:00+11:00", Some(("2026-01-27T08:00:00+11:00", "public holiday: Australia Day (AU)"))),
            ("service push on Australia Day: goes", "Australia/Sydney", Some("AU-NSW"), Push, S,
                "2026-01-26T12:00:00+11:00", None),
            ("service email on Melbourne Cup day: goes", "Australia/Melbourne", Some("AU-VIC"), Email, S,
                "2026-11-03T10:00:00+11:00", None),
            ("quiet hours for email configured: 20:00-09:00", "Australia/Sydney", Some("AU-NSW"), Email, S,
                "2026-01-27T22:00:00+11:00", Some(("2026-01-28T09:00:00+11:00", "quiet hours 20:00-09:00 in Australia/Sydney"))),
            ("push keeps its own window", "Australia/Sydney", Some("AU-NSW"), Push, S,
                "2026-01-27T20:30:00+11:00", None),
        ];
        let config: PolicyConfig = toml::from_str::<toml::Table>(
            "[quiet_hours.push]\nstart = \"21:00\"\nend = \"08:00\"\n[quiet_hours.email]\nstart = \"20:00\"\nend = \"09:00\"\n",
        )
        .unwrap()
        .try_into()
        .unwrap();
        let p = Policy::new(config);
        for (name, tz, region, channel, category, now, expected) in cases {
            let got = p.hold(*channel, *category, &customer(tz, *region), at(now));
            let expected = expected.map(|(until, reason)| (at(until), reason.to_string()));
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn a_call_task_due_on_a_closed_hour_is_deferred_not_expired() {
        let p = Policy::new(PolicyConfig::default());
        let hour = std::time::Duration::from_secs(3600);
        let c = customer("Australia/Perth", Some("AU-WA"));
        // Planned for Saturday 10:00, decided two hours later: past the
        // lateness bound of the planned time, within it of Monday 09:00.
        let s = step(Call, S, at("2026-03-14T10:00:00+08:00"));
        assert_eq!(
            p.check(&s, &c, hour, at("2026-03-14T12:00:00+08:00")),
            Verdict::Defer {
                until: at("2026-03-16T09:00:00+08:00"),
                reason: "outside business hours Mon-Fri 09:00-17:00 in Australia/Perth".into()
            }
        );
        // Late within open hours it still expires.
        let s = step(Call, S, at("2026-03-16T09:00:00+08:00"));
        assert!(matches!(
            p.check(&s, &c, hour, at("2026-03-16T11:00:00+08:00")),
            Verdict::Expire(_)
        ));
        // A push late by the same is expired: push has no business hours.
        let s = step(Push, S, at("2026-03-14T10:00:00+08:00"));
        assert!(matches!(
            p.check(&s, &c, hour, at("2026-03-14T12:00:00+08:00")),
            Verdict::Expire(_)
        ));
    }

    #[test]
    fn a_dst_gap_moves_the_window_end_to_the_first_valid_instant() {
        // Sydney skips 02:00-03:00 on 4 October 2026; a window ending 02:30
        // ends at 03:30 AEDT.
        let w = Window {
            start: TimeOfDay::new(1, 0),
            end: TimeOfDay::new(2, 30),
        };
        assert_eq!(
            window_end(
                w,
                chrono_tz::Australia::Sydney,
                at("2026-10-04T01:30:00+10:00")
            ),
            Some(at("2026-10-04T03:30:00+11:00"))
        );
    }
}
