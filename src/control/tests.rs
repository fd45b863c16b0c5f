use std::path::PathBuf;

use chrono::Duration as Span;
use serde_json::json;

use super::*;
use crate::event::Event;
use crate::model::Outcome;
use crate::rules::{bucket, load_sources, Limits, RuleSet};
use crate::sim::Simulation;

fn patch_err(body: &str) -> PatchError {
    journey_patch(body.as_bytes()).unwrap_err()
}

#[test]
fn a_change_names_what_is_wrong_with_it() {
    let ok = journey_patch(br#"{"shadow": true, "pilot_percent": 10, "enabled": null}"#).unwrap();
    assert_eq!(ok.0["shadow"], Some(json!(true)));
    assert_eq!(ok.0["pilot_percent"], Some(json!(10)));
    assert_eq!(ok.0["enabled"], None, "null clears the override");

    let e = patch_err(r#"{"shadow": true, "shaddow": false}"#);
    assert_eq!(
        e.to_string(),
        "unknown field `shaddow`: fields are enabled, shadow, pilot_percent, holdout_percent"
    );
    for bad in [
        r#"{"pilot_percent": 101}"#,
        r#"{"pilot_percent": -1}"#,
        r#"{"pilot_percent": 10.5}"#,
        r#"{"pilot_percent": "10"}"#,
    ] {
        assert_eq!(
            patch_err(bad).to_string(),
            "`pilot_percent` must be a whole percentage 0-100 (or null to clear the override)",
            "{bad}"
        );
    }
    assert!(
        matches!(patch_err(r#"{"holdout_percent": true}"#), PatchError::BadValue { field, .. } if field == "holdout_percent")
    );
    assert!(
        matches!(patch_err(r#"{"shadow": "yes"}"#), PatchError::BadValue { field, expected } if field == "shadow" && expected == "true or false")
    );
    assert!(matches!(patch_err("{}"), PatchError::Empty(_)));
    assert!(matches!(patch_err("[]"), PatchError::NotAnObject(_)));
    assert!(matches!(
        patch_err("shadow=true"),
        PatchError::NotAnObject(_)
    ));
    // A channel has one field.
    assert!(
        matches!(channel_patch(br#"{"shadow": true}"#), Err(PatchError::UnknownField { field, .. }) if field == "shadow")
    );
    assert_eq!(
        channel_patch(br#"{"enabled": false}"#).unwrap().0["enabled"],
        Some(json!(false))
    );
}

const JOURNEY_SCRIPT: &str = r#"fn journey() { #{ name: "j", category: "service", triggers: ["t"],
  steps: [#{ id: "push", channel: "push", template: "t1", delay: "0s" },
          #{ id: "email", channel: "email", template: "t2", delay: "1h" }] } }
fn decide(event, customer) { start() }
"#;

fn rules(extra_meta: &str) -> RuleSet {
    let script = JOURNEY_SCRIPT.replace(
        "triggers: [\"t\"],",
        &format!("triggers: [\"t\"],{extra_meta}"),
    );
    load_sources(vec![(PathBuf::from("j.rhai"), script)], &Limits::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn settings_come_from_the_override_then_config_then_script() {
    let set = rules(" shadow: true, pilot: 30,");
    let j = set.journey("j").unwrap();
    let policy = PolicyConfig::default();
    let s = JourneySettings::of(j, &policy, None);
    assert_eq!(
        (s.enabled, s.shadow, s.pilot_percent, s.holdout_percent),
        (
            Setting {
                value: true,
                source: Source::Default
            },
            Setting {
                value: true,
                source: Source::Script
            },
            Setting {
                value: 30,
                source: Source::Script
            },
            Setting {
                value: 0,
                source: Source::Default
            },
        )
    );
    let config = PolicyConfig {
        disabled_journeys: vec!["j".into()],
        ..PolicyConfig::default()
    };
    let s = JourneySettings::of(j, &config, None);
    assert_eq!(
        s.enabled,
        Setting {
            value: false,
            source: Source::Config
        }
    );
    // The override wins over both; clearing a field brings them back.
    let patch =
        journey_patch(br#"{"enabled": true, "shadow": false, "holdout_percent": 5}"#).unwrap();
    let edit = patch.journey_edit(j, &config, &Map::new());
    assert_eq!(
        edit.before,
        json!({"enabled": false, "shadow": true, "holdout_percent": 0})
    );
    assert_eq!(
        edit.after,
        json!({"enabled": true, "shadow": false, "holdout_percent": 5})
    );
    let o = JourneyOverride::from_settings(&edit.settings);
    let s = JourneySettings::of(j, &config, Some(&o));
    assert_eq!(
        s.enabled,
        Setting {
            value: true,
            source: Source::Override
        }
    );
    assert_eq!(
        s.shadow,
        Setting {
            value: false,
            source: Source::Override
        }
    );
    let clear = journey_patch(br#"{"shadow": null}"#).unwrap();
    let edit = clear.journey_edit(j, &config, &edit.settings);
    assert_eq!(edit.after, json!({"shadow": true}));
    assert_eq!(
        edit.settings,
        json!({"enabled": true, "holdout_percent": 5})
            .as_object()
            .unwrap()
            .clone()
    );
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-02T01:00:00Z")
        .unwrap()
        .to_utc()
}

fn event(id: &str, customer: &str, minutes: i64) -> Event {
    let time = (t0() + Span::minutes(minutes)).to_rfc3339();
    let kind = if id.starts_with("ctx") {
        "customer.contact_updated"
    } else {
        "t"
    };
    Event::parse(
        json!({"specversion": "1.0", "id": id, "type": kind, "source": "s", "subject": customer,
               "time": time, "data": {"app_installed": true, "email": "x@example.com", "timezone": "Australia/Sydney"}})
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

fn sim(set: RuleSet) -> Simulation {
    let policy = PolicyConfig {
        max_per_customer: 0,
        quiet_hours: crate::config::QuietHours {
            start: None,
            end: None,
            ..Default::default()
        },
        ..PolicyConfig::default()
    };
    Simulation::new(set, t0(), policy).unwrap()
}

fn stop(sim: &Simulation, channel: ChannelKind, stopped: bool) {
    let mut o = (*sim.controls.current()).clone();
    o.channels.insert(channel, !stopped);
    sim.controls.replace(o);
}

fn set_journey(sim: &Simulation, o: JourneyOverride) {
    let mut all = (*sim.controls.current()).clone();
    all.journeys.insert("j".into(), o);
    sim.controls.replace(all);
}

fn outcomes(records: &[crate::model::LogRecord]) -> Vec<(String, Outcome)> {
    records
        .iter()
        .map(|r| (r.step.clone(), r.outcome))
        .collect()
}

#[tokio::test]
async fn a_stopped_channel_holds_its_steps_until_resumed_within_lateness() {
    let sim = sim(rules(""));
    sim.feed(event("ctx-1", "c-1", 0)).await.unwrap();
    stop(&sim, ChannelKind::Push, true);
    let (_, records) = sim.feed(event("e1", "c-1", 0)).await.unwrap();
    assert!(
        outcomes(&records).is_empty(),
        "held, not logged: {records:?}"
    );
    // Time goes on: the email goes, the push still waits, unlogged.
    let records = sim.run_until(t0() + Span::hours(2)).await.unwrap();
    assert_eq!(outcomes(&records), vec![("email".into(), Outcome::Sent)]);
    let pending = sim.store.step_counts().unwrap();
    assert!(pending.contains(&("pending".into(), 1)), "{pending:?}");
    // Resumed within the lateness bound (12 h): it goes.
    stop(&sim, ChannelKind::Push, false);
    let records = sim.run_until(t0() + Span::hours(2)).await.unwrap();
    assert_eq!(outcomes(&records), vec![("push".into(), Outcome::Sent)]);
    assert_eq!(sim.channel.messages().len(), 2);

    // Stopped past the bound: expired on resume, never sent stale.
    stop(&sim, ChannelKind::Push, true);
    sim.feed(event("e2", "c-2", 150)).await.unwrap();
    sim.run_until(t0() + Span::hours(20)).await.unwrap();
    stop(&sim, ChannelKind::Push, false);
    let records = sim.run_until(t0() + Span::hours(20)).await.unwrap();
    assert_eq!(outcomes(&records), vec![("push".into(), Outcome::Expired)]);
}

#[tokio::test]
async fn shadow_and_disable_apply_to_steps_due_after_the_change() {
    let sim = sim(rules(""));
    sim.feed(event("ctx-1", "c-1", 0)).await.unwrap();
    let (_, records) = sim.feed(event("e1", "c-1", 0)).await.unwrap();
    assert_eq!(outcomes(&records), vec![("push".into(), Outcome::Sent)]);
    // A live instance's next step, due after the change: shadow.
    set_journey(
        &sim,
        JourneyOverride {
            shadow: Some(true),
            ..Default::default()
        },
    );
    let records = sim.run_until(t0() + Span::hours(2)).await.unwrap();
    assert_eq!(outcomes(&records), vec![("email".into(), Outcome::Shadow)]);
    // A new instance starts in shadow.
    let (outcome, records) = sim.feed(event("e2", "c-2", 180)).await.unwrap();
    assert_eq!(outcome.started.len(), 1);
    assert_eq!(outcomes(&records), vec![("push".into(), Outcome::Shadow)]);
    // Live again: an instance started in shadow stays in shadow.
    set_journey(
        &sim,
        JourneyOverride {
            shadow: Some(false),
            ..Default::default()
        },
    );
    let records = sim.run_until(t0() + Span::hours(5)).await.unwrap();
    assert_eq!(outcomes(&records), vec![("email".into(), Outcome::Shadow)]);
    // Disabled: suppressed by the kill switch, named as runtime control.
    set_journey(
        &sim,
        JourneyOverride {
            enabled: Some(false),
            ..Default::default()
        },
    );
    let (_, records) = sim.feed(event("e3", "c-3", 300)).await.unwrap();
    assert_eq!(
        outcomes(&records),
        vec![("push".into(), Outcome::Suppressed)]
    );
    assert!(
        records[0]
            .reason
            .contains("kill switch: journey j disabled by runtime control"),
        "{records:?}"
    );
    // Pilot 0: no new decision starts it at all.
    set_journey(
        &sim,
        JourneyOverride {
            pilot_percent: Some(0),
            ..Default::default()
        },
    );
    let (outcome, _) = sim.feed(event("e4", "c-4", 400)).await.unwrap();
    assert!(outcome.started.is_empty());
}

/// The customers `bucket` puts below `percent` for `salt` (pilot, holdout).
fn share(salt: &str, percent: u8, customers: u32) -> f64 {
    let inside = (0..customers)
        .filter(|i| bucket(&format!("c-{i}"), "unsigned_loan", salt) < percent)
        .count();
    100.0 * inside as f64 / customers as f64
}

#[test]
fn hash_groups_are_within_a_point_of_the_setting_on_100_000_customers() {
    for salt in ["pilot", "holdout"] {
        for percent in [1, 5, 10, 20, 50, 90] {
            let got = share(salt, percent, 100_000);
            assert!(
                (got - f64::from(percent)).abs() < 1.0,
                "{salt} {percent}%: {got:.2}% of 100,000 customers"
            );
        }
    }
}

#[test]
fn hash_groups_are_the_same_in_every_process_and_build() {
    // Fixed values: a change of hash (or of its input) would move
    // customers between groups across a restart or an upgrade.
    let got: Vec<u8> = ["c-1001", "c-1002", "c-1003", "c-42"]
        .iter()
        .flat_map(|c| {
            [
                bucket(c, "unsigned_loan", "pilot"),
                bucket(c, "unsigned_loan", "holdout"),
            ]
        })
        .collect();
    assert_eq!(got, GOLDEN.to_vec());
}

const GOLDEN: [u8; 8] = [13, 2, 23, 75, 92, 20, 5, 97];

#[tokio::test]
async fn a_restarted_pipeline_puts_each_customer_in_the_same_group() {
    let modes = || async {
        let sim = sim(rules(" holdout: 30,"));
        let mut held = Vec::new();
        for i in 0..300 {
            let customer = format!("c-{i}");
            let (_, records) = sim
                .feed(event(&format!("e{i}"), &customer, i))
                .await
                .unwrap();
            if records
                .iter()
                .any(|r| r.customer == customer && r.outcome == Outcome::HeldOut)
            {
                held.push(customer);
            }
        }
        held
    };
    let first = modes().await;
    let again = modes().await;
    assert_eq!(first, again);
    let expected: Vec<String> = (0..300)
        .map(|i| format!("c-{i}"))
        .filter(|c| bucket(c, "j", "holdout") < 30)
        .collect();
    assert_eq!(first, expected);
}
