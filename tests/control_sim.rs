//! Runtime control through the simulated daemon on a virtual clock: a
//! stopped channel holds its steps, shadow and disable apply to steps due
//! after the change, pilot and holdout to new decisions, and a restarted
//! pipeline puts each customer in the same hash group.

use std::path::PathBuf;

use chrono::{DateTime, Duration as Span, Utc};
use serde_json::json;

use nudge::config::PolicyConfig;
use nudge::control::JourneyOverride;
use nudge::event::Event;
use nudge::model::{ChannelKind, Outcome};
use nudge::rules::{bucket, load_sources, Limits, RuleSet};
use nudge::sim::Simulation;
use nudge::store::Store;

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
        max_per_customer: Some(0),
        quiet_hours: nudge::config::QuietHours {
            channels: Default::default(),
            legacy: None,
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

fn outcomes(records: &[nudge::model::LogRecord]) -> Vec<(String, Outcome)> {
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
