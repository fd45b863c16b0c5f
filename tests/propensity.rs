//! Propensity learned from outcomes, end to end on the simulated daemon: the
//! conversions of earlier customers change which of two competing journeys
//! `rank` (through `customer.propensity`) sends first to the next one.

use std::path::PathBuf;

use chrono::{DateTime, Duration as Span, Utc};
use serde_json::json;

use nudge::config::{Cap, PolicyConfig};
use nudge::event::Event;
use nudge::model::{LogRecord, Outcome};
use nudge::rules::{load_sources, Limits, RuleSet};
use nudge::sim::Simulation;
use nudge::store::Store;

/// Two service journeys with a push an hour after their offer. Each ranks
/// by its learned push rate (in points), `alpha` with a head start of 10:
/// with nothing learned alpha scores 15 and beta 5.
fn script(name: &str, bonus: f64) -> String {
    format!(
        r#"fn journey() {{ #{{ name: "{name}", category: "service", triggers: ["{name}.offer"],
  exits: #{{ "{name}.accepted": "converted" }},
  steps: [#{{ id: "push", channel: "push", template: "{name}_push", delay: "1h" }}] }} }}
fn decide(event, customer) {{ start() }}
fn rank(customer, vars) {{ customer.propensity("{name}", "push") * 100.0 + {bonus:.1} }}
"#
    )
}

fn rules() -> RuleSet {
    load_sources(
        vec![
            (PathBuf::from("alpha.rhai"), script("alpha", 10.0)),
            (PathBuf::from("beta.rhai"), script("beta", 0.0)),
        ],
        &Limits::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn t0() -> DateTime<Utc> {
    // 11:00 in Sydney on a Monday.
    DateTime::parse_from_rfc3339("2026-03-02T00:00:00Z")
        .unwrap()
        .to_utc()
}

fn event(id: &str, kind: &str, customer: &str, at: DateTime<Utc>) -> Event {
    Event::parse(
        json!({"specversion": "1.0", "id": id, "type": kind, "source": "s", "subject": customer,
               "time": at.to_rfc3339(),
               "data": {"app_installed": true, "timezone": "Australia/Sydney"}})
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

/// One message a day, no quiet hours: the two pushes compete.
fn sim() -> Simulation {
    let policy = PolicyConfig {
        caps: Some(vec![Cap {
            category: None,
            channel: None,
            max: 1,
            per: 1,
        }]),
        quiet_hours: nudge::config::QuietHours {
            channels: Default::default(),
            legacy: None,
        },
        ..PolicyConfig::default()
    };
    Simulation::new(rules(), t0(), policy).unwrap()
}

/// Who got the push for customer `x` first: both journeys' pushes fall due
/// at once, the cap lets one go.
async fn contest(sim: &Simulation, at: DateTime<Utc>) -> Vec<(String, Outcome, String)> {
    sim.feed(event("x-ctx", "customer.contact_updated", "x", at))
        .await
        .unwrap();
    sim.feed(event("x-a", "alpha.offer", "x", at))
        .await
        .unwrap();
    sim.feed(event("x-b", "beta.offer", "x", at)).await.unwrap();
    let records = sim.run_until(at + Span::hours(2)).await.unwrap();
    records
        .iter()
        .filter(|r: &&LogRecord| r.customer == "x")
        .map(|r| (r.journey.clone(), r.outcome, r.reason.clone()))
        .collect()
}

/// What became of `journey`'s push to customer `x`: (outcome, reason).
fn of<'a>(got: &'a [(String, Outcome, String)], journey: &str) -> &'a (String, Outcome, String) {
    got.iter()
        .find(|(j, _, _)| j == journey)
        .unwrap_or_else(|| panic!("no record of {journey}: {got:?}"))
}

#[tokio::test]
async fn conversions_after_sends_change_which_journey_rank_sends_first() {
    // Nothing learned: alpha's head start wins (15 vs 5); beta's push, due
    // in the same batch and decided after alpha went, is told it lost and
    // waits for the cap.
    let fresh = sim();
    let got = contest(&fresh, t0()).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(of(&got, "alpha").1, Outcome::Sent, "{got:?}");
    assert_eq!(of(&got, "beta").1, Outcome::Deferred, "{got:?}");
    assert!(
        of(&got, "beta")
            .2
            .starts_with("frequency cap: 1 message within 1 calendar day; arbitration: lost to alpha/push (score 15 vs 5)"),
        "{got:?}"
    );

    // Five customers accept beta after its push, five ignore alpha's.
    let sim = sim();
    for i in 0..5 {
        let (a, b) = (format!("a{i}"), format!("b{i}"));
        for c in [&a, &b] {
            sim.feed(event(
                &format!("{c}-ctx"),
                "customer.contact_updated",
                c,
                t0(),
            ))
            .await
            .unwrap();
        }
        sim.feed(event(&format!("{a}-o"), "alpha.offer", &a, t0()))
            .await
            .unwrap();
        sim.feed(event(&format!("{b}-o"), "beta.offer", &b, t0()))
            .await
            .unwrap();
    }
    sim.run_until(t0() + Span::hours(2)).await.unwrap();
    for i in 0..5 {
        let b = format!("b{i}");
        sim.feed(event(
            &format!("{b}-y"),
            "beta.accepted",
            &b,
            t0() + Span::hours(3),
        ))
        .await
        .unwrap();
    }
    let counts: Vec<(String, u64, u64)> = sim
        .store
        .propensity_counts(None)
        .unwrap()
        .into_iter()
        .map(|c| (c.journey, c.sends, c.conversions))
        .collect();
    assert_eq!(
        counts,
        [("alpha".to_string(), 5, 0), ("beta".to_string(), 5, 5)]
    );

    // Now beta's learned rate outweighs alpha's head start:
    // alpha 1/25 → 4 + 10 = 14, beta 6/25 → 24. Alpha, decided first,
    // loses the arbitration and waits for the cap.
    let got = contest(&sim, t0() + Span::hours(4)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(of(&got, "beta").1, Outcome::Sent, "{got:?}");
    let alpha = of(&got, "alpha");
    assert_eq!(alpha.1, Outcome::Deferred, "{got:?}");
    assert!(alpha.2.contains("lost to beta/push (score 24"), "{got:?}");
}
