//! Fatigue: a journey whose last `after` sends to a customer, all within
//! `pause` of each other, brought no conversion (no instance of the journey
//! converted since the first of them) pauses for that customer until
//! `pause` after the last of them. The journey's own `fatigue` key wins
//! over `policy.fatigue`.

use chrono::{DateTime, Utc};

use super::settings::Fatigue;
use super::Policy;
use crate::clock::span;
use crate::context::CustomerContext;
use crate::model::{DueStep, InstanceStatus};

impl Policy {
    /// The fatigue in force for a journey that sets `own` (or not).
    pub fn fatigue_for(&self, own: Option<Fatigue>) -> Option<Fatigue> {
        own.or(self.config.fatigue).filter(|f| f.after > 0)
    }

    /// Why the step's journey is paused for the customer, if it is: reads
    /// `recent_sends` (with the sends possibly made) and the customer's
    /// journeys (their conversions).
    pub fn fatigue_refusal(
        &self,
        own: Option<Fatigue>,
        step: &DueStep,
        customer: &CustomerContext,
        now: DateTime<Utc>,
    ) -> Option<String> {
        let fatigue = self.fatigue_for(own)?;
        let pause = span(fatigue.pause);
        let mut sends: Vec<DateTime<Utc>> = customer
            .recent_sends
            .iter()
            .filter(|s| s.journey == step.journey && s.at <= now)
            .map(|s| s.at)
            .collect();
        sends.sort_unstable_by(|a, b| b.cmp(a));
        let last = *sends.first()?;
        let first = *sends.get(fatigue.after as usize - 1)?;
        if last - first > pause || now >= last + pause {
            return None;
        }
        let converted = customer.journeys.iter().any(|j| {
            j.journey == step.journey
                && j.status == InstanceStatus::Converted
                && j.ended_at.is_some_and(|t| t >= first)
        });
        if converted {
            return None;
        }
        Some(format!(
            "fatigue: {} sends of {} without a conversion, paused until {}",
            fatigue.after,
            step.journey,
            (last + pause).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use crate::context::{JourneySummary, RecentSend};
    use crate::model::{Category, ChannelKind, Mode};
    use chrono::Duration;

    fn day(n: i64) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-05-01T02:00:00Z")
            .unwrap()
            .to_utc()
            + Duration::days(n)
    }

    fn step() -> DueStep {
        DueStep {
            row: 0,
            instance_id: "i".into(),
            step: "s".into(),
            channel: ChannelKind::Push,
            template: "t".into(),
            condition: None,
            planned_at: day(0),
            due_at: day(0),
            attempt: 1,
            customer: "c".into(),
            journey: "fee_increase".into(),
            mode: Mode::Live,
            category: Category::Marketing,
            rule_hash: "h".into(),
            vars: Default::default(),
            instance_status: InstanceStatus::Open,
            begun_before: false,
        }
    }

    fn customer(sends: &[(&str, i64)], converted_on: Option<i64>) -> CustomerContext {
        let mut c = CustomerContext::new("c");
        c.recent_sends = sends
            .iter()
            .rev()
            .map(|(journey, d)| RecentSend {
                at: day(*d),
                journey: journey.to_string(),
                channel: ChannelKind::Push,
                category: Category::Marketing,
            })
            .collect();
        c.journeys = converted_on
            .map(|d| JourneySummary {
                journey: "fee_increase".into(),
                key: "k".into(),
                status: InstanceStatus::Converted,
                mode: Mode::Live,
                started_at: day(d - 1),
                ended_at: Some(day(d)),
            })
            .into_iter()
            .collect();
        c
    }

    const J: &str = "fee_increase";

    #[allow(clippy::type_complexity)]
    #[test]
    fn fatigue_pauses_after_sends_without_a_conversion() {
        let three = Some(Fatigue {
            after: 3,
            pause: std::time::Duration::from_secs(30 * 86400),
        });
        let paused = "fatigue: 3 sends of fee_increase without a conversion, paused until 2026-06-02T02:00:00Z";
        let cases: &[(&str, Option<Fatigue>, &[(&str, i64)], Option<i64>, i64, Option<&str>)] = &[
            ("three sends, no conversion: paused", three, &[(J, 0), (J, 1), (J, 2)], None, 3, Some(paused)),
            ("two sends: not yet", three, &[(J, 1), (J, 2)], None, 3, None),
            ("other journeys' sends do not count", three, &[("x", 0), (J, 1), (J, 2)], None, 3, None),
            ("a conversion since the first: not paused", three, &[(J, 0), (J, 1), (J, 2)], Some(1), 3, None),
            ("a conversion before the three: paused", three, &[(J, 5), (J, 6), (J, 7)], Some(1), 8, Some("fatigue: 3 sends of fee_increase without a conversion, paused until 2026-06-07T02:00:00Z")),
            ("paused to the last day", three, &[(J, 0), (J, 1), (J, 2)], None, 31, Some(paused)),
            ("the pause is over", three, &[(J, 0), (J, 1), (J, 2)], None, 32, None),
            ("sends further apart than the pause", three, &[(J, 0), (J, 20), (J, 40)], None, 41, None),
            ("after = 0 turns the default off", Some(Fatigue { after: 0, pause: std::time::Duration::ZERO }), &[(J, 0), (J, 1), (J, 2)], None, 3, None),
        ];
        let p = Policy::new(PolicyConfig {
            fatigue: three,
            ..PolicyConfig::default()
        });
        for (name, own, sends, converted, now, expected) in cases {
            let got = p.fatigue_refusal(*own, &step(), &customer(sends, *converted), day(*now));
            assert_eq!(got.as_deref(), *expected, "{name}");
        }
        // No journey key and no default: off.
        let off = Policy::new(PolicyConfig::default());
        assert_eq!(
            off.fatigue_refusal(
                None,
                &step(),
                &customer(&[(J, 0), (J, 1), (J, 2)], None),
                day(3)
            ),
            None
        );
        // The journey's own setting without a default.
        assert!(off
            .fatigue_refusal(
                three,
                &step(),
                &customer(&[(J, 0), (J, 1), (J, 2)], None),
                day(3)
            )
            .is_some());
    }
}
