//! Frequency caps by category and channel, counted by the customer's
//! calendar day: a cap `per = "7d"` counts today and the six local days
//! before it, from local midnight, whatever the hour now (not a rolling
//! window). A cap counts the sends it matches, and holds only the steps it
//! matches: a marketing cap neither counts nor holds service messages. A
//! service step never counts marketing sends, whatever the cap, so that
//! marketing cannot use up the room of a message the customer needs (the
//! design's promise); marketing steps count service sends under a cap that
//! covers both.
//!
//! [`Policy::caps_room`] is the whole check, so that arbitration can ask
//! whether a step still fits before choosing among several.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use super::calendar::local_instant;
use super::settings::Cap;
use super::Policy;
use crate::config::TimeOfDay;
use crate::context::{CustomerContext, RecentSend};
use crate::model::{Category, ChannelKind, DueStep};

/// A cap with no room left for a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapHit {
    /// `frequency cap: 1 marketing within 1 calendar day`.
    pub reason: String,
    /// Local midnight when enough of the counted sends fall out of the
    /// window for the step to fit (the latest over the caps hit).
    pub frees_at: DateTime<Utc>,
}

impl Policy {
    /// Whether the caps leave room for `step` for the customer at `now`,
    /// counting `customer.recent_sends` (the caller adds sends possibly made
    /// but not yet recorded).
    pub fn caps_room(
        &self,
        customer: &CustomerContext,
        step: &DueStep,
        now: DateTime<Utc>,
    ) -> Result<(), CapHit> {
        caps_room(
            &self.caps,
            &customer.recent_sends,
            step.channel,
            step.category,
            self.zone(customer),
            now,
        )
    }
}

/// The caps check over explicit sends: see the module docs.
pub fn caps_room(
    caps: &[Cap],
    sends: &[RecentSend],
    channel: ChannelKind,
    category: Category,
    tz: Tz,
    now: DateTime<Utc>,
) -> Result<(), CapHit> {
    let today = now.with_timezone(&tz).date_naive();
    let mut hit: Option<CapHit> = None;
    for cap in caps.iter().filter(|c| c.counts(channel, category)) {
        let first_day = today - Duration::days(i64::from(cap.per) - 1);
        let Some(since) = local_instant(tz, first_day, TimeOfDay::new(0, 0)) else {
            continue;
        };
        // A send recorded after `now` was made before a backward step of
        // the clock (an NTP correction): it counts as made now, not never.
        let mut counted: Vec<DateTime<Utc>> = sends
            .iter()
            .map(|s| (s, s.at.min(now)))
            .filter(|(s, at)| {
                *at >= since
                    && cap.counts(s.channel, s.category)
                    && !(category == Category::Service && s.category == Category::Marketing)
            })
            .map(|(_, at)| at)
            .collect();
        if counted.len() < cap.max as usize {
            continue;
        }
        counted.sort_unstable();
        // Room comes back when the oldest `len - max + 1` have left the window:
        // at the local midnight `per` days after the last of them was sent.
        let leaving = counted[counted.len() - cap.max as usize];
        let sent_on = leaving.with_timezone(&tz).date_naive();
        let frees_at = local_instant(
            tz,
            sent_on + Duration::days(i64::from(cap.per)),
            TimeOfDay::new(0, 0),
        )
        .unwrap_or(now);
        let reason = cap.describe();
        match &mut hit {
            Some(h) if h.frees_at >= frees_at => {}
            Some(h) => h.frees_at = frees_at,
            None => hit = Some(CapHit { reason, frees_at }),
        }
    }
    hit.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::{Australia, Pacific};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn send(t: &str, channel: ChannelKind, category: Category) -> RecentSend {
        RecentSend {
            at: at(t),
            journey: "j".into(),
            channel,
            category,
        }
    }

    fn caps() -> Vec<Cap> {
        let cap = |category, channel, max, per| Cap {
            category,
            channel,
            max,
            per,
        };
        vec![
            cap(Some(Category::Marketing), None, 1, 1),
            cap(Some(Category::Marketing), None, 3, 7),
            cap(None, Some(ChannelKind::CallTask), 1, 7),
        ]
    }

    use Category::{Marketing as M, Service as S};
    use ChannelKind::{CallTask as Call, Email, Push};

    /// (zone, earlier sends, step channel and category, now, expected reason or
    /// None, and when the cap frees). Instants written with their offset: the
    /// local day is what counts.
    #[allow(clippy::type_complexity)]
    #[test]
    fn caps_count_calendar_days_in_the_customers_zone() {
        let cases: &[(&str, Tz, &[(&str, ChannelKind, Category)], (ChannelKind, Category), &str, Option<(&str, &str)>)] = &[
            (
                "Sydney: a marketing send at 23:50 does not count the next local day",
                Australia::Sydney,
                &[("2026-01-10T23:50:00+11:00", Push, M)],
                (Push, M),
                "2026-01-11T00:10:00+11:00",
                None,
            ),
            (
                "Sydney: the same local day, 20 minutes later, is capped",
                Australia::Sydney,
                &[("2026-01-10T00:10:00+11:00", Push, M)],
                (Email, M),
                "2026-01-10T23:50:00+11:00",
                Some(("frequency cap: 1 marketing within 1 calendar day", "2026-01-11T00:00:00+11:00")),
            ),
            (
                "Sydney: service messages are not counted against a marketing cap",
                Australia::Sydney,
                &[("2026-01-10T09:00:00+11:00", Push, S), ("2026-01-10T10:00:00+11:00", Email, S)],
                (Push, M),
                "2026-01-10T12:00:00+11:00",
                None,
            ),
            (
                "Sydney: nor does a marketing cap hold a service message",
                Australia::Sydney,
                &[("2026-01-10T09:00:00+11:00", Push, M)],
                (Push, S),
                "2026-01-10T12:00:00+11:00",
                None,
            ),
            (
                "Sydney, DST ends 5 April 2026 (a 25-hour day): 00:30 AEDT and 23:30 AEST are one day",
                Australia::Sydney,
                &[("2026-04-05T00:30:00+11:00", Push, M)],
                (Push, M),
                "2026-04-05T23:30:00+10:00",
                Some(("frequency cap: 1 marketing within 1 calendar day", "2026-04-06T00:00:00+10:00")),
            ),
            (
                "Sydney, DST ends: free from the next local midnight, 24.5 hours on",
                Australia::Sydney,
                &[("2026-04-05T00:30:00+11:00", Push, M)],
                (Push, M),
                "2026-04-06T00:00:00+10:00",
                None,
            ),
            (
                "Sydney, DST starts 4 October 2026 (a 23-hour day): 01:30 AEST and 23:30 AEDT are one day",
                Australia::Sydney,
                &[("2026-10-04T01:30:00+10:00", Push, M)],
                (Push, M),
                "2026-10-04T23:30:00+11:00",
                Some(("frequency cap: 1 marketing within 1 calendar day", "2026-10-05T00:00:00+11:00")),
            ),
            (
                "Sydney, DST starts: the next local day is free though only 22 hours passed",
                Australia::Sydney,
                &[("2026-10-04T01:30:00+10:00", Push, M)],
                (Push, M),
                "2026-10-05T00:30:00+11:00",
                None,
            ),
            (
                "Sydney: three marketing in 7 calendar days (the first 6 local days ago)",
                Australia::Sydney,
                &[
                    ("2026-03-01T08:00:00+11:00", Email, M),
                    ("2026-03-03T08:00:00+11:00", Push, M),
                    ("2026-03-05T08:00:00+11:00", Push, M),
                ],
                (Push, M),
                "2026-03-07T20:00:00+11:00",
                Some(("frequency cap: 3 marketing within 7 calendar days", "2026-03-08T00:00:00+11:00")),
            ),
            (
                "Sydney: 7 local days later the first no longer counts",
                Australia::Sydney,
                &[
                    ("2026-03-01T08:00:00+11:00", Email, M),
                    ("2026-03-03T08:00:00+11:00", Push, M),
                    ("2026-03-05T08:00:00+11:00", Push, M),
                ],
                (Push, M),
                "2026-03-08T00:01:00+11:00",
                None,
            ),
            (
                "Perth (no DST): a call task in the last 7 local days holds another",
                Australia::Perth,
                &[("2026-06-01T16:30:00+08:00", Call, S)],
                (Call, S),
                "2026-06-07T23:59:00+08:00",
                Some(("frequency cap: 1 call_task within 7 calendar days", "2026-06-08T00:00:00+08:00")),
            ),
            (
                "Perth: Perth's midnight, not Sydney's, starts the day",
                Australia::Perth,
                // 00:30 on 2 June in Sydney, still 1 June in Perth.
                &[("2026-06-01T22:30:00+08:00", Push, M)],
                (Push, M),
                "2026-06-01T23:30:00+08:00",
                Some(("frequency cap: 1 marketing within 1 calendar day", "2026-06-02T00:00:00+08:00")),
            ),
            (
                "Auckland: a send at 23:59 NZDT is yesterday at 00:01",
                Pacific::Auckland,
                &[("2026-02-10T23:59:00+13:00", Push, M)],
                (Push, M),
                "2026-02-11T00:01:00+13:00",
                None,
            ),
            (
                "Auckland, DST ends 5 April 2026: one local day across the change",
                Pacific::Auckland,
                &[("2026-04-05T01:00:00+13:00", Push, M)],
                (Push, M),
                "2026-04-05T23:00:00+12:00",
                Some(("frequency cap: 1 marketing within 1 calendar day", "2026-04-06T00:00:00+12:00")),
            ),
            (
                "Auckland, DST starts 27 September 2026",
                Pacific::Auckland,
                &[("2026-09-27T01:00:00+12:00", Push, M)],
                (Push, M),
                "2026-09-27T23:00:00+13:00",
                Some(("frequency cap: 1 marketing within 1 calendar day", "2026-09-28T00:00:00+13:00")),
            ),
        ];
        for (name, tz, sent, (channel, category), now, expected) in cases {
            let sends: Vec<RecentSend> =
                sent.iter().map(|(t, ch, cat)| send(t, *ch, *cat)).collect();
            let got = caps_room(&caps(), &sends, *channel, *category, *tz, at(now));
            let expected = expected.map(|(reason, frees)| CapHit {
                reason: reason.into(),
                frees_at: at(frees),
            });
            assert_eq!(got.err(), expected, "{name}");
        }
    }

    #[test]
    fn a_cap_on_everything_counts_every_send_toward_marketing() {
        let all = [Cap {
            category: None,
            channel: None,
            max: 2,
            per: 1,
        }];
        let sends = [
            send("2026-01-10T09:00:00+11:00", Push, S),
            send("2026-01-10T10:00:00+11:00", Call, M),
        ];
        let room = |sends: &[RecentSend], category| {
            caps_room(
                &all,
                sends,
                Email,
                category,
                Australia::Sydney,
                at("2026-01-10T11:00:00+11:00"),
            )
        };
        assert_eq!(
            room(&sends, M).unwrap_err().reason,
            "frequency cap: 2 messages within 1 calendar day"
        );
        assert!(room(&sends[..1], M).is_ok());
        // Two service sends fill it for a service step too.
        let services = [sends[0].clone(), send("2026-01-10T10:00:00+11:00", Call, S)];
        assert!(room(&services, S).is_err());
    }

    /// The host's clock stepped back a day (an NTP correction): the sends
    /// it recorded before the step are dated "tomorrow", and still fill
    /// today's cap, freeing it a day after now.
    #[test]
    fn sends_dated_after_now_by_a_clock_stepped_back_still_count() {
        let one_a_day = [Cap {
            category: None,
            channel: None,
            max: 1,
            per: 1,
        }];
        let ahead = [send("2026-01-11T10:00:00+11:00", Push, M)];
        let got = caps_room(
            &one_a_day,
            &ahead,
            Push,
            M,
            Australia::Sydney,
            at("2026-01-10T10:00:00+11:00"),
        );
        assert_eq!(got.unwrap_err().frees_at, at("2026-01-11T00:00:00+11:00"));
    }

    /// The design's promise: a service message is never starved by marketing.
    #[test]
    fn marketing_sends_never_use_up_a_service_steps_room() {
        let one_a_day = [Cap {
            category: None,
            channel: None,
            max: 1,
            per: 1,
        }];
        let marketing = [send("2026-01-10T09:00:00+11:00", Push, M)];
        let room = |category| {
            caps_room(
                &one_a_day,
                &marketing,
                Email,
                category,
                Australia::Sydney,
                at("2026-01-10T11:00:00+11:00"),
            )
        };
        assert!(room(S).is_ok());
        assert!(room(M).is_err());
    }
}
