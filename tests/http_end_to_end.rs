//! The three shipped journeys end to end: examples/events.jsonl through the
//! engine on a virtual clock, to three real HTTP endpoints (push, email, call task).

mod harness;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nudge::model::{ChannelKind, Outcome};
use nudge::sim::read_events;
use nudge::store::Store;
use support::*;

#[tokio::test]
async fn the_example_events_reach_exactly_the_right_endpoints() {
    let file = read_events(&examples()).expect("examples/events.jsonl");
    assert!(file.errors.is_empty(), "{:?}", file.errors);
    let start = file.events.first().unwrap().1.time;
    let h = Harness::new(shipped_rules(), start).await;
    for (line, e) in file.events {
        let (outcome, _) = h.feed(e).await;
        assert!(outcome.failures.is_empty(), "line {line}: {outcome:?}");
    }
    h.finish().await;

    // What each endpoint received, as (customer, step, the instance's key).
    let received = |kind: ChannelKind| -> Vec<(String, String, String)> {
        let mut v: Vec<_> = h
            .sinks
            .get(kind)
            .requests()
            .iter()
            .map(|r| {
                let vars = &r.body["variables"];
                let key = ["application_id", "merchant", "state"]
                    .iter()
                    .find_map(|k| vars[k].as_str())
                    .unwrap_or("")
                    .to_string();
                (r.str("/customer").into(), r.str("/step").into(), key)
            })
            .collect();
        v.sort();
        v
    };
    let t = |c: &str, s: &str, k: &str| (c.to_string(), s.to_string(), k.to_string());
    // c-1001: A-1 pushed, then signed before the email; A-4 arrived signed.
    // c-1002: A-2 runs its course; A-3 is withdrawn after its email, before the call.
    // c-1003: Netflix went up (pushed after quiet hours); City Gym went down.
    // c-1004: eligible, consented to marketing push; c-1005 is a boarder.
    assert_eq!(
        received(ChannelKind::Push),
        vec![
            t("c-1001", "push", "A-1"),
            t("c-1002", "push", "A-2"),
            t("c-1002", "push", "A-3"),
            t("c-1003", "alert", "Netflix"),
            t("c-1004", "invite", "QLD"),
        ]
    );
    assert_eq!(
        received(ChannelKind::Email),
        vec![t("c-1002", "email", "A-2"), t("c-1002", "email", "A-3")]
    );
    assert_eq!(
        received(ChannelKind::CallTask),
        vec![t("c-1002", "call", "A-2")]
    );

    let all: Vec<Received> = ChannelKind::ALL
        .into_iter()
        .flat_map(|k| h.sinks.get(k).requests())
        .collect();
    for r in &all {
        let expected = format!("{}:{}", r.str("/instance"), r.str("/step"));
        assert_eq!(r.key(), Some(expected.as_str()), "{}", r.body);
        assert_eq!(r.str("/idempotency_key"), expected);
        assert_eq!(r.status, 200);
    }

    // The agent sees the journey so far: the push and the email already sent.
    let call = h.sinks.call.requests().remove(0).message();
    let history: Vec<_> = call
        .history
        .iter()
        .map(|e| (e.step.as_str(), e.channel.as_str(), e.template.as_str()))
        .collect();
    assert_eq!(
        history,
        vec![
            ("push", "push", "loan_unsigned_push"),
            ("email", "email", "loan_unsigned_email"),
        ]
    );
    assert!(call.history[0].sent_at < call.history[1].sent_at);
    assert_eq!(call.address.as_deref(), Some("+61400000002"));
    assert_eq!(call.variables.to_map()["product"], "Car loan");
    let a2_email = h
        .sinks
        .email
        .requests()
        .into_iter()
        .map(|r| r.message())
        .find(|m| m.instance == call.instance)
        .expect("A-2's email");
    assert_eq!(a2_email.history.len(), 1);
    assert_eq!(a2_email.history[0].template, "loan_unsigned_push");
    assert_eq!(a2_email.address.as_deref(), Some("bob@example.com"));

    // One `sent` record per request received, for the same (instance, step).
    let log = h.sim.store.log_after(0, 10_000).unwrap();
    let mut sent: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in log.iter().filter(|r| r.outcome == Outcome::Sent) {
        *sent
            .entry((r.instance.clone(), r.step.clone()))
            .or_default() += 1;
    }
    assert!(sent.values().all(|&n| n == 1), "{sent:?}");
    let requested: BTreeSet<_> = all
        .iter()
        .map(|r| (r.str("/instance").to_string(), r.str("/step").to_string()))
        .collect();
    assert_eq!(requested.len(), all.len(), "no request was repeated");
    assert_eq!(sent.keys().cloned().collect::<BTreeSet<_>>(), requested);
}

#[tokio::test]
async fn an_endpoint_down_for_a_while_still_gets_each_message_once() {
    // The email service answers 503 to its first three requests.
    let file = read_events(&examples()).unwrap();
    let start = file.events.first().unwrap().1.time;
    let h = Harness::with_timeout(shipped_rules(), start, Duration::from_secs(5)).await;
    h.sinks
        .email
        .fail_next(3, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    for (_, e) in file.events {
        h.feed(e).await;
    }
    h.finish().await;
    let got = h.sinks.email.requests();
    let accepted: Vec<_> = got.iter().filter(|r| r.status == 200).collect();
    let keys: BTreeSet<_> = got.iter().map(|r| r.key().unwrap().to_string()).collect();
    assert_eq!(got.len(), 5, "two emails, three refusals");
    assert_eq!(accepted.len(), 2);
    assert_eq!(keys.len(), 2, "retries reuse the key: {keys:?}");
    let log = h.sim.store.log_after(0, 10_000).unwrap();
    let email_log: Vec<_> = log.iter().filter(|r| r.channel == "email").collect();
    assert_eq!(
        email_log
            .iter()
            .filter(|r| r.outcome == Outcome::Retrying)
            .count(),
        3
    );
    assert_eq!(
        email_log
            .iter()
            .filter(|r| r.outcome == Outcome::Sent)
            .count(),
        2
    );
}
