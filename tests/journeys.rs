//! Journey semantics on the virtual clock, against the shipped `rules/` (and
//! small inline scripts), with every channel a real HTTP endpoint on 127.0.0.1.

mod harness;
mod support;

use std::collections::BTreeSet;
use std::time::Duration as StdDuration;

use axum::http::StatusCode;
use chrono::Duration;
use serde_json::json;

use nudge::model::{ChannelKind, Outcome};
use nudge::review::record::{decision_record, Kind};
use nudge::store::Store;
use support::*;

fn hash_of(h: &Harness, journey: &str) -> String {
    h.sim
        .pipeline
        .rules()
        .current()
        .journey(journey)
        .expect("journey loaded")
        .hash
        .clone()
}

#[tokio::test]
async fn loan_completed_pushes_at_once_emails_after_a_day_and_calls_on_day_three() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(contact("c-1", t0() - Duration::hours(1))).await;
    let (outcome, records) = h.feed(loan_completed("loan-1", "c-1", "A-1", t0())).await;
    assert_eq!(outcome.started.len(), 1, "{outcome:?}");
    let instance = outcome.started[0].clone();
    let hash = hash_of(&h, "unsigned_loan");

    let push = only(&records, "c-1", "push");
    assert_eq!(push.outcome, Outcome::Sent);
    assert_eq!(push.time, t0());
    assert_eq!(push.channel, "push");
    assert_eq!(push.template, "loan_unsigned_push");
    assert_eq!(push.instance, instance);
    assert_eq!(push.rule_hash, hash);
    let got = h.sinks.push.requests();
    assert_eq!(got.len(), 1);
    let m = got[0].message();
    assert_eq!(m.template, "loan_unsigned_push");
    assert_eq!(m.customer, "c-1");
    assert_eq!(m.variables.to_map()["product"], "Car loan");
    assert_eq!(
        m.variables.to_map()["resume_url"],
        "https://bank.example/loans/A-1/sign"
    );
    assert_eq!(m.variables.to_map()["application_id"], "A-1");
    assert_eq!(got[0].key(), Some(format!("{instance}:push").as_str()));
    assert!(m.history.is_empty(), "the first step has no history");
    assert_eq!(h.sinks.email.count() + h.sinks.call.count(), 0);

    h.run_until(t0() + Duration::days(1) - Duration::seconds(1))
        .await;
    assert_eq!(h.sinks.email.count(), 0, "email before a day has passed");
    let records = h.run_until(t0() + Duration::days(1)).await;
    let email = only(&records, "c-1", "email");
    assert_eq!(
        (email.outcome, email.time),
        (Outcome::Sent, t0() + Duration::days(1))
    );
    assert_eq!(email.template, "loan_unsigned_email");
    let got = h.sinks.email.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message().address.as_deref(), Some("c-1@example.com"));

    h.run_until(t0() + Duration::days(3) - Duration::seconds(1))
        .await;
    assert_eq!(h.sinks.call.count(), 0, "call before day three");
    let records = h.finish().await;
    let call = only(&records, "c-1", "call");
    assert_eq!(
        (call.outcome, call.time),
        (Outcome::Sent, t0() + Duration::days(3))
    );
    assert_eq!(call.channel, "call_task");
    assert_eq!(call.template, "loan_unsigned_call");
    assert_eq!(h.sinks.call.count(), 1);

    let log = h.log();
    let mine: Vec<_> = log.iter().filter(|r| r.instance == instance).collect();
    let steps: Vec<_> = mine
        .iter()
        .map(|r| (r.step.as_str(), r.outcome, r.rule_hash.as_str()))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("push", Outcome::Sent, hash.as_str()),
            ("email", Outcome::Sent, hash.as_str()),
            ("call", Outcome::Sent, hash.as_str()),
        ]
    );
}

#[tokio::test]
async fn signing_converts_and_withdrawing_cancels_the_steps_not_yet_sent() {
    let start = t0() - Duration::hours(1);
    let h = Harness::new(shipped_rules(), start).await;
    for c in ["c-sign", "c-wd"] {
        h.feed(contact(c, start)).await;
    }
    h.feed(loan_completed("loan-s", "c-sign", "A-1", t0()))
        .await;
    h.feed(loan_completed("loan-w", "c-wd", "A-2", t0())).await;
    assert_eq!(h.sinks.push.count(), 2);

    let exit_at = t0() + Duration::hours(12);
    let (signed, records) = h
        .feed(event(
            "signed-1",
            "loan_application.signed",
            "c-sign",
            exit_at,
            json!({"application_id": "A-1"}),
        ))
        .await;
    assert_eq!(
        signed.ended,
        vec![("unsigned_loan".to_string(), Outcome::Converted)]
    );
    assert_eq!(
        outcomes(&records.iter().collect::<Vec<_>>()),
        vec![Outcome::Converted, Outcome::Converted]
    );
    let (withdrawn, _) = h
        .feed(event(
            "withdrawn-2",
            "loan_application.withdrawn",
            "c-wd",
            exit_at,
            json!({"application_id": "A-2"}),
        ))
        .await;
    assert_eq!(
        withdrawn.ended,
        vec![("unsigned_loan".to_string(), Outcome::Cancelled)]
    );
    h.finish().await;

    let log = h.log();
    for (customer, outcome, why) in [
        ("c-sign", Outcome::Converted, "loan_application.signed"),
        ("c-wd", Outcome::Cancelled, "loan_application.withdrawn"),
    ] {
        assert_eq!(only(&log, customer, "push").outcome, Outcome::Sent);
        for step in ["email", "call"] {
            let r = only(&log, customer, step);
            assert_eq!(r.outcome, outcome, "{r:?}");
            assert_eq!(r.time, exit_at);
            assert!(r.reason.contains(why), "{r:?}");
        }
    }
    assert_eq!(h.sinks.email.count(), 0, "no email after the exit");
    assert_eq!(h.sinks.call.count(), 0, "no call after the exit");
}

/// A signature read a day late (its time 12 h after the push, read after
/// the email went): the journey converts, and the conversion is credited to
/// the push sent before the customer acted, not to the email sent after.
#[tokio::test]
async fn a_late_exit_credits_only_the_sends_before_the_customer_acted() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(contact("c-late", t0() - Duration::hours(1))).await;
    h.feed(loan_completed("loan-l", "c-late", "A-1", t0()))
        .await;
    h.run_until(t0() + Duration::days(1) + Duration::hours(1))
        .await;
    assert_eq!((h.sinks.push.count(), h.sinks.email.count()), (1, 1));
    let (signed, _) = h
        .feed(event(
            "signed-l",
            "loan_application.signed",
            "c-late",
            t0() + Duration::hours(12),
            json!({"application_id": "A-1"}),
        ))
        .await;
    assert_eq!(
        signed.ended,
        vec![("unsigned_loan".to_string(), Outcome::Converted)]
    );
    let credited = credited(&h);
    assert_eq!(
        credited,
        [("email".to_string(), 1, 0), ("push".to_string(), 1, 1)]
    );
}

/// An exit stamped years ahead (a producer's clock gone wrong) counts as
/// read now, as the README says: the customer acted then, and a trigger of
/// the same key later than that starts the journey again.
#[tokio::test]
async fn an_exit_stamped_ahead_of_the_clock_counts_as_read_now() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    let signed = event(
        "signed-future",
        "loan_application.signed",
        "c-future",
        t0() + Duration::days(365 * 70),
        json!({"application_id": "A-1"}),
    );
    h.sim
        .feed_batch(vec![contact("c-future", t0()), signed])
        .await
        .unwrap();
    let (later, _) = h
        .feed(loan_completed(
            "loan-f",
            "c-future",
            "A-1",
            t0() + Duration::minutes(10),
        ))
        .await;
    assert_eq!(later.started.len(), 1, "{later:?}");
    assert_eq!(h.sinks.push.count(), 1);
}

/// Per step: sends and the conversions credited to them.
fn credited(h: &Harness) -> Vec<(String, u64, u64)> {
    h.sim
        .store
        .propensity_counts(None)
        .unwrap()
        .into_iter()
        .map(|c| (c.step, c.sends, c.conversions))
        .collect()
}

/// An exit is matched by when the customer acted, not by when nudge read
/// it: a signature made within the attribution window after the journey's
/// last step, but read after the window (a backlog, an outage), converts,
/// and is credited to the sends within the window before it; one made after
/// the window does not convert, however soon it is read.
#[tokio::test]
async fn an_exit_within_the_window_converts_however_late_it_is_read() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    let window = Duration::days(30);
    for c in ["c-in", "c-out"] {
        h.feed(contact(c, t0() - Duration::hours(1))).await;
        h.feed(loan_completed(&format!("loan-{c}"), c, "A-1", t0()))
            .await;
    }
    h.run_until(t0() + Duration::days(7)).await;
    let log = h.log();
    let ended = log
        .iter()
        .filter(|r| r.outcome == Outcome::Sent)
        .map(|r| r.time)
        .max()
        .unwrap();
    assert_eq!(of(&log, "c-in", "call").len(), 1, "{log:#?}");
    // Both are read a day after the window closed.
    h.run_until(ended + window + Duration::days(1)).await;
    let signed = |c: &str, time| {
        event(
            &format!("signed-{c}"),
            "loan_application.signed",
            c,
            time,
            json!({"application_id": "A-1"}),
        )
    };
    let (inside, _) = h
        .feed(signed("c-in", ended + window - Duration::minutes(1)))
        .await;
    assert_eq!(
        inside.ended,
        vec![("unsigned_loan".to_string(), Outcome::Converted)]
    );
    let (outside, _) = h
        .feed(signed("c-out", ended + window + Duration::hours(1)))
        .await;
    assert!(outside.ended.is_empty(), "{outside:?}");
    let converted: Vec<String> = h
        .log()
        .into_iter()
        .filter(|r| r.outcome == Outcome::Converted)
        .map(|r| r.customer)
        .collect();
    assert_eq!(converted, ["c-in"]);
    // The decision record says why the one outside converted nothing, and
    // from when the window ran; the one inside has no such entry.
    let not_ended = |c: &str| -> Vec<String> {
        let record = decision_record(&*h.sim.store, c, false).unwrap();
        record
            .entries
            .into_iter()
            .filter(|e| e.kind == Kind::Decision && e.text.contains("not ended by event"))
            .map(|e| e.text)
            .collect()
    };
    let since = (ended + Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let outside = not_ended("c-out");
    assert_eq!(outside.len(), 1, "{outside:?}");
    assert!(
        outside[0].starts_with(&format!(
            "unsigned_loan (key A-1) not ended by event signed-c-out: no instance open and none completed since {since} (policy.attribution_window before the customer acted), so nothing converted; its last instance ("
        )) && outside[0].contains(") completed at "),
        "{outside:?}"
    );
    assert!(not_ended("c-in").is_empty());
    // The call went a minute inside the window: credited.
    let credited = credited(&h);
    assert_eq!(
        credited,
        [
            ("call".to_string(), 2, 1),
            ("email".to_string(), 2, 0),
            ("push".to_string(), 2, 0)
        ]
    );
}

/// An exit without the data that names its instance ends nothing and is
/// dead-lettered; the customer's decision record says so beside the event
/// (it showed only the event, though this is what someone looks up when
/// a customer who acted is still reminded).
#[tokio::test]
async fn an_exit_that_names_no_instance_is_in_the_decision_record() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(contact("c-1", t0() - Duration::hours(1))).await;
    h.feed(loan_completed("loan-1", "c-1", "A-1", t0())).await;
    let (outcome, _) = h
        .feed(event(
            "signed-no-id",
            "loan_application.signed",
            "c-1",
            t0() + Duration::hours(2),
            json!({}),
        ))
        .await;
    assert!(outcome.ended.is_empty(), "{outcome:?}");
    assert_eq!(outcome.failures.len(), 1, "dead-lettered: {outcome:?}");
    let record = decision_record(&*h.sim.store, "c-1", false).unwrap();
    let said: Vec<String> = record
        .entries
        .into_iter()
        .filter(|e| e.kind == Kind::Decision && e.text.contains("not ended by event"))
        .map(|e| e.text)
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].starts_with(
            "unsigned_loan not ended by event signed-no-id: it names no instance, so it was dead-lettered: "
        ) && said[0].contains("has no data.application_id"),
        "{said:?}"
    );
}

#[tokio::test]
async fn a_duplicate_event_id_changes_nothing() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(contact("c-1", t0() - Duration::hours(1))).await;
    let first = loan_completed("loan-1", "c-1", "A-1", t0());
    let (outcome, _) = h.feed(first.clone()).await;
    assert_eq!(outcome.started.len(), 1);
    let counts = h.sim.store.step_counts().unwrap();

    let (again, records) = h.feed(first.clone()).await;
    assert_eq!((again.duplicates, again.started.len()), (1, 0));
    assert!(records.is_empty(), "{records:?}");
    // Redelivered hours later (a consumer restart): still a duplicate.
    let mut late = first.clone();
    late.time = t0() + Duration::hours(2);
    let (again, records) = h.feed(late).await;
    assert_eq!((again.duplicates, again.started.len()), (1, 0));
    assert!(records.is_empty(), "{records:?}");
    assert_eq!(h.sim.store.step_counts().unwrap(), counts);
    // A new event for the same open application is a no-op too.
    let (same_app, _) = h
        .feed(loan_completed(
            "loan-1-bis",
            "c-1",
            "A-1",
            t0() + Duration::hours(3),
        ))
        .await;
    assert_eq!((same_app.duplicates, same_app.started.len()), (0, 0));
    h.finish().await;

    let log = h.log();
    let instances: BTreeSet<_> = log.iter().map(|r| r.instance.as_str()).collect();
    assert_eq!(instances.len(), 1, "{log:#?}");
    assert_eq!(
        (
            h.sinks.push.count(),
            h.sinks.email.count(),
            h.sinks.call.count()
        ),
        (1, 1, 1)
    );
    assert_eq!(log.iter().filter(|r| r.outcome == Outcome::Sent).count(), 3);
}

/// CloudEvents makes `source` and `id` unique together: another producer's
/// event under an id already seen is its own event, not a retry.
#[tokio::test]
async fn an_id_reused_by_another_source_is_not_a_duplicate() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(contact("c-1", t0() - Duration::hours(1))).await;
    h.feed(contact("c-2", t0() - Duration::hours(1))).await;
    let (first, _) = h.feed(loan_completed("1001", "c-1", "A-1", t0())).await;
    assert_eq!(first.started.len(), 1);
    let mut other = loan_completed("1001", "c-2", "A-2", t0());
    other.source = "cards".into();
    let (other, _) = h.feed(other).await;
    assert_eq!((other.duplicates, other.started.len()), (0, 1));
    // A retry from the second producer is still a duplicate.
    let mut retry = loan_completed("1001", "c-2", "A-2", t0());
    retry.source = "cards".into();
    let (retry, _) = h.feed(retry).await;
    assert_eq!((retry.duplicates, retry.started.len()), (1, 0));
}

#[tokio::test]
async fn two_applications_of_one_customer_run_independently() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(contact("c-1", t0() - Duration::hours(1))).await;
    let (a1, _) = h.feed(loan_completed("loan-1", "c-1", "A-1", t0())).await;
    let t2 = t0() + Duration::hours(1);
    let (a2, _) = h.feed(loan_completed("loan-2", "c-1", "A-2", t2)).await;
    let (a1, a2) = (a1.started[0].clone(), a2.started[0].clone());
    assert_ne!(a1, a2);
    h.feed(event(
        "signed-1",
        "loan_application.signed",
        "c-1",
        t0() + Duration::hours(2),
        json!({"application_id": "A-1"}),
    ))
    .await;
    h.finish().await;

    let log = h.log();
    let plan = |instance: &str| -> Vec<_> {
        log.iter()
            .filter(|r| r.instance == instance)
            .map(|r| (r.step.clone(), r.outcome, r.time))
            .collect()
    };
    let signed_at = t0() + Duration::hours(2);
    assert_eq!(
        plan(&a1),
        vec![
            ("push".into(), Outcome::Sent, t0()),
            ("email".into(), Outcome::Converted, signed_at),
            ("call".into(), Outcome::Converted, signed_at),
        ]
    );
    assert_eq!(
        plan(&a2),
        vec![
            ("push".into(), Outcome::Sent, t2),
            ("email".into(), Outcome::Sent, t2 + Duration::days(1)),
            ("call".into(), Outcome::Sent, t2 + Duration::days(3)),
        ]
    );
    for kind in [ChannelKind::Email, ChannelKind::CallTask] {
        let apps: Vec<_> = h
            .sinks
            .get(kind)
            .requests()
            .iter()
            .map(|r| r.str("/variables/application_id").to_string())
            .collect();
        assert_eq!(apps, vec!["A-2"], "{kind}");
    }
}

#[tokio::test]
async fn steps_past_the_lateness_bound_are_expired_not_sent() {
    let h = Harness::new(shipped_rules(), t0()).await;
    for c in ["c-old", "c-recent"] {
        h.feed(contact(c, t0() - Duration::days(3))).await;
    }
    // Replayed two days late: push and email are past 12h; the call is not.
    let (_, records) = h
        .feed(loan_completed(
            "loan-old",
            "c-old",
            "A-1",
            t0() - Duration::days(2),
        ))
        .await;
    assert_eq!(
        outcomes(&records.iter().collect::<Vec<_>>()),
        vec![Outcome::Expired, Outcome::Expired]
    );
    // Eleven hours late is within the bound: sent now.
    h.feed(loan_completed(
        "loan-recent",
        "c-recent",
        "A-2",
        t0() - Duration::hours(11),
    ))
    .await;
    h.finish().await;

    let log = h.log();
    for step in ["push", "email"] {
        let r = only(&log, "c-old", step);
        assert_eq!(r.outcome, Outcome::Expired, "{r:?}");
        assert!(r.reason.contains("lateness bound of 12h"), "{r:?}");
    }
    let call = only(&log, "c-old", "call");
    assert_eq!(
        (call.outcome, call.time),
        (Outcome::Sent, t0() + Duration::days(1))
    );
    let push = only(&log, "c-recent", "push");
    assert_eq!((push.outcome, push.time), (Outcome::Sent, t0()));
    assert_eq!(push.latency_ms, Some(11 * 3600 * 1000));
    let customers = |kind: ChannelKind| -> Vec<String> {
        h.sinks
            .get(kind)
            .requests()
            .iter()
            .map(|r| r.str("/customer").to_string())
            .collect()
    };
    assert_eq!(customers(ChannelKind::Push), vec!["c-recent"]);
    assert_eq!(customers(ChannelKind::Email), vec!["c-recent"]);
    assert_eq!(customers(ChannelKind::CallTask).len(), 2);
}

#[tokio::test]
async fn a_503_is_retried_with_the_same_idempotency_key_until_sent() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.sinks.push.fail_next(2, StatusCode::SERVICE_UNAVAILABLE);
    h.feed(contact("c-1", t0() - Duration::hours(1))).await;
    let (outcome, records) = h.feed(loan_completed("loan-1", "c-1", "A-1", t0())).await;
    let instance = outcome.started[0].clone();
    let first = only(&records, "c-1", "push");
    assert_eq!((first.outcome, first.attempt), (Outcome::Retrying, 1));
    // The retry is rescheduled in the store with backoff, not slept on.
    let next = h
        .sim
        .scheduler
        .next_due()
        .await
        .unwrap()
        .expect("retry planned");
    assert!(next > t0() && next <= t0() + Duration::seconds(2), "{next}");
    // The wait it reports is the real one, sub-second part included.
    let wait = nudge::humanize::duration((next - t0()).to_std().unwrap());
    assert!(
        first.reason.ends_with(&format!("next in {wait}")),
        "{first:?}"
    );
    assert_eq!(h.sinks.push.count(), 1);

    h.run_until(t0() + Duration::minutes(1)).await;
    let log = h.log();
    let push = of(&log, "c-1", "push");
    let seen: Vec<_> = push.iter().map(|r| (r.outcome, r.attempt)).collect();
    assert_eq!(
        seen,
        vec![
            (Outcome::Retrying, 1),
            (Outcome::Retrying, 2),
            (Outcome::Sent, 3)
        ]
    );
    assert!(
        push[..2].iter().all(|r| r.reason.contains("503")),
        "{push:?}"
    );
    assert!(push.windows(2).all(|w| w[0].time < w[1].time), "{push:?}");
    let got = h.sinks.push.requests();
    let statuses: Vec<_> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    let key = format!("{instance}:push");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.key(), Some(key.as_str()));
        assert_eq!(r.str("/idempotency_key"), key);
        assert_eq!(r.body["attempt"], json!(i + 1));
    }
}

#[tokio::test]
async fn a_400_fails_the_step_at_once_and_the_journey_goes_on() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.sinks.email.always(StatusCode::BAD_REQUEST);
    h.feed(contact("c-1", t0() - Duration::hours(1))).await;
    h.feed(loan_completed("loan-1", "c-1", "A-1", t0())).await;
    h.finish().await;

    let log = h.log();
    let email = only(&log, "c-1", "email");
    assert_eq!((email.outcome, email.attempt), (Outcome::Failed, 1));
    assert!(email.reason.contains("400"), "{email:?}");
    assert_eq!(h.sinks.email.count(), 1, "a 400 is not retried");
    assert_eq!(only(&log, "c-1", "call").outcome, Outcome::Sent);
    assert_eq!(h.sinks.call.count(), 1);
}

#[tokio::test]
async fn a_failing_channel_does_not_hold_up_the_others() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.sinks.email.always(StatusCode::SERVICE_UNAVAILABLE);
    for c in ["c-1", "c-2"] {
        h.feed(contact(c, t0() - Duration::hours(1))).await;
    }
    h.feed(loan_completed("loan-1", "c-1", "A-1", t0())).await;
    // c-2's push falls due at the moment c-1's email starts failing.
    let day = t0() + Duration::days(1);
    let (_, records) = h.feed(loan_completed("loan-2", "c-2", "A-2", day)).await;
    let email = only(&records, "c-1", "email");
    assert_eq!(email.outcome, Outcome::Retrying);
    let push = only(&records, "c-2", "push");
    assert_eq!((push.outcome, push.time), (Outcome::Sent, day));
    assert!(h
        .sinks
        .push
        .requests()
        .iter()
        .any(|r| r.str("/customer") == "c-2"));

    h.finish().await;
    let log = h.log();
    let email = of(&log, "c-1", "email");
    let max = nudge::config::SchedulerConfig::default().max_attempts as usize;
    assert_eq!(email.len(), max, "{email:#?}");
    assert!(email[..max - 1]
        .iter()
        .all(|r| r.outcome == Outcome::Retrying));
    assert_eq!(email[max - 1].outcome, Outcome::Failed);
    assert!(email[max - 1]
        .reason
        .contains(&format!("gave up after {max} attempts")));
    for (c, due) in [("c-1", t0()), ("c-2", day)] {
        let call = only(&log, c, "call");
        assert_eq!(
            (call.outcome, call.time),
            (Outcome::Sent, due + Duration::days(3))
        );
    }
}

#[tokio::test]
async fn a_slow_channel_times_out_without_holding_up_the_others() {
    let h = Harness::with_timeout(
        shipped_rules(),
        t0() - Duration::hours(1),
        StdDuration::from_millis(300),
    )
    .await;
    h.sinks.email.slow(StdDuration::from_secs(10));
    for c in ["c-1", "c-2"] {
        h.feed(contact(c, t0() - Duration::hours(1))).await;
    }
    h.feed(loan_completed("loan-1", "c-1", "A-1", t0())).await;
    let day = t0() + Duration::days(1);
    let (_, records) = h.feed(loan_completed("loan-2", "c-2", "A-2", day)).await;
    let email = only(&records, "c-1", "email");
    assert_eq!(email.outcome, Outcome::Retrying);
    assert!(email.reason.contains("timed out"), "{email:?}");
    let push = only(&records, "c-2", "push");
    assert_eq!((push.outcome, push.time), (Outcome::Sent, day));
    assert_eq!(h.sinks.email.count(), 1);
}

const DUO: &str = r#"
fn journey() {
    #{ name: "duo", category: "service", triggers: ["test.duo"],
       steps: [
           #{ id: "tell", channel: "push", template: "duo_push", delay: "0s" },
           #{ id: "mail", channel: "email", template: "duo_email", delay: "0s" },
       ] }
}
fn decide(event, customer) { start() }
"#;

#[tokio::test]
async fn channels_are_sent_side_by_side_so_a_failing_one_blocks_nothing() {
    let h = Harness::with_timeout(
        inline_rules(&[("duo", DUO)]),
        t0() - Duration::hours(1),
        StdDuration::from_secs(2),
    )
    .await;
    // The push endpoint answers only once the email endpoint was called, and
    // the email endpoint always fails: if push waited for email (or email
    // for push), the push would time out.
    h.sinks.email.always(StatusCode::SERVICE_UNAVAILABLE);
    h.sinks.push.answer_after(&h.sinks.email);
    h.feed(contact("c-1", t0() - Duration::hours(1))).await;
    let (_, records) = h
        .feed(event("duo-1", "test.duo", "c-1", t0(), json!({})))
        .await;
    let push = only(&records, "c-1", "tell");
    assert_eq!(
        (push.outcome, push.attempt, push.time),
        (Outcome::Sent, 1, t0()),
        "{push:?}"
    );
    let mail = only(&records, "c-1", "mail");
    assert_eq!(mail.outcome, Outcome::Retrying, "{mail:?}");
    assert_eq!((h.sinks.push.count(), h.sinks.email.count()), (1, 1));
}

fn fee_change(id: &str, payment: &str, merchant: &str, from: f64, to: f64) -> nudge::event::Event {
    event(
        id,
        "recurring_payment.amount_changed",
        "c-3",
        t0(),
        json!({"payment_id": payment, "merchant": merchant,
               "previous_amount": from, "new_amount": to, "currency": "AUD"}),
    )
}

/// Contact updates read out of order (an old one from a replayed backlog
/// after the current one): the alert goes where the latest update says, by
/// push, not by email to the old address.
#[tokio::test]
async fn an_older_contact_update_read_later_does_not_bring_back_old_details() {
    let h = Harness::new(shipped_rules(), t0() - Duration::minutes(1)).await;
    let update = |id: &str, time, app: bool, email: &str| {
        event(
            id,
            "customer.contact_updated",
            "c-3",
            time,
            json!({"app_installed": app, "email": email, "timezone": "Australia/Sydney"}),
        )
    };
    h.feed(update(
        "new",
        t0() - Duration::minutes(1),
        true,
        "new@example.com",
    ))
    .await;
    let (older, _) = h
        .feed(update(
            "old",
            t0() - Duration::hours(5),
            false,
            "old@example.com",
        ))
        .await;
    assert_eq!(older.context_updates, 0, "{older:?}");
    let (up, _) = h
        .feed(fee_change("fee-1", "P-77", "Netflix", 15.99, 18.5))
        .await;
    assert_eq!(up.started.len(), 1);
    h.finish().await;
    assert_eq!((h.sinks.push.count(), h.sinks.email.count()), (1, 0));
}

#[tokio::test]
async fn a_fee_increase_alerts_once_naming_merchant_and_amounts_and_a_decrease_says_nothing() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(contact("c-3", t0() - Duration::hours(1))).await;
    let (up, records) = h
        .feed(fee_change("fee-1", "P-77", "Netflix", 15.99, 18.5))
        .await;
    assert_eq!(up.started.len(), 1);
    let alert = only(&records, "c-3", "alert");
    assert_eq!(
        (alert.outcome, alert.template.as_str()),
        (Outcome::Sent, "fee_increase_alert")
    );
    for (id, from, to) in [("fee-2", 60.0, 55.0), ("fee-3", 20.0, 20.0)] {
        let (outcome, records) = h.feed(fee_change(id, "P-78", "City Gym", from, to)).await;
        assert!(outcome.started.is_empty() && outcome.failures.is_empty());
        assert!(records.is_empty(), "{records:?}");
    }
    // Amounts as text compare as text ("9.99" > "10.99"): refused with a
    // reason (a dead letter in the daemon), never a rise silently skipped.
    let as_text = event(
        "fee-4",
        "recurring_payment.amount_changed",
        "c-3",
        t0(),
        json!({"payment_id": "P-79", "merchant": "Stream", "previous_amount": "9.99",
               "new_amount": "10.99", "currency": "AUD"}),
    );
    let (outcome, records) = h.feed(as_text).await;
    assert!(
        outcome.started.is_empty() && records.is_empty(),
        "{records:?}"
    );
    assert_eq!(outcome.failures.len(), 1, "{:?}", outcome.failures);
    let failure = &outcome.failures[0];
    assert_eq!(failure.journey.as_deref(), Some("fee_increase"));
    assert!(
        failure.reason.contains("must be numbers, not text"),
        "{}",
        failure.reason
    );
    h.finish().await;

    let got = h.sinks.push.requests();
    assert_eq!(got.len(), 1, "one alert in all");
    let m = got[0].message();
    assert_eq!(m.variables.to_map()["merchant"], "Netflix");
    let vars = m.variables.to_map();
    let text = vars["message"].as_str().unwrap();
    assert!(text.contains("Netflix"), "{text}");
    assert!(text.contains("$15.99"), "{text}");
    assert!(text.contains("$18.50"), "{text}");
    assert!(
        text.find("15.99").unwrap() < text.find("18.50").unwrap(),
        "old amount first: {text}"
    );
    assert_eq!(h.log().len(), 1);
}

#[tokio::test]
async fn energy_rebate_invites_only_eligible_consenting_customers_and_enrolling_converts() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    let consent = |c: &str| {
        event(
            &format!("consent-{c}"),
            "customer.consent_updated",
            c,
            t0() - Duration::minutes(30),
            json!({"consents": {"push": {"marketing": true}}}),
        )
    };
    let profile = |c: &str, status: &str| {
        event(
            &format!("profile-{c}"),
            "customer.profile_updated",
            c,
            t0(),
            json!({"profile": {"state": "QLD", "residential_status": status, "concession_card": true}}),
        )
    };
    for c in ["e-yes", "e-noconsent", "e-inelig"] {
        h.feed(contact(c, t0() - Duration::hours(1))).await;
    }
    h.feed(consent("e-yes")).await;
    h.feed(consent("e-inelig")).await;

    let (yes, records) = h.feed(profile("e-yes", "renter")).await;
    assert_eq!(yes.started.len(), 1);
    assert_eq!(only(&records, "e-yes", "invite").outcome, Outcome::Sent);
    let (no, records) = h.feed(profile("e-noconsent", "owner")).await;
    assert_eq!(no.started.len(), 1);
    let r = only(&records, "e-noconsent", "invite");
    assert_eq!(r.outcome, Outcome::Suppressed);
    assert!(r.reason.contains("consent"), "{r:?}");
    let (inelig, records) = h.feed(profile("e-inelig", "boarder")).await;
    assert!(
        inelig.started.is_empty() && records.is_empty(),
        "{records:?}"
    );

    let (enrolled, records) = h
        .feed(event(
            "enrolled-1",
            "energy_rebate.enrolled",
            "e-yes",
            t0() + Duration::hours(5),
            json!({"program": "energy_rebate_2026"}),
        ))
        .await;
    assert_eq!(
        enrolled.ended,
        vec![("energy_rebate".to_string(), Outcome::Converted)]
    );
    let conv = only(&records, "e-yes", "-");
    assert_eq!(conv.outcome, Outcome::Converted);
    assert!(conv.reason.contains("energy_rebate.enrolled"), "{conv:?}");
    h.finish().await;

    let got = h.sinks.push.requests();
    assert_eq!(got.len(), 1);
    let m = got[0].message();
    assert_eq!(
        (m.customer.as_str(), m.template.as_str()),
        ("e-yes", "energy_rebate_invite")
    );
    assert_eq!(m.variables.to_map()["state"], "QLD");
    assert!(h.log().iter().all(|r| r.customer != "e-inelig"));
}

#[tokio::test]
async fn context_events_are_checked_when_each_step_is_due() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(event(
        "ctx-1",
        "customer.contact_updated",
        "c-1",
        t0() - Duration::hours(1),
        json!({"app_installed": false, "email": "c1@example.com", "phone": "+61400000001"}),
    ))
    .await;
    let (_, records) = h.feed(loan_completed("loan-1", "c-1", "A-1", t0())).await;
    let push = only(&records, "c-1", "push");
    assert_eq!(push.outcome, Outcome::Suppressed);
    assert!(
        push.reason
            .contains("unreachable on push: no app installed"),
        "{push:?}"
    );
    // The email address is removed after the journey was planned.
    let (ctx, _) = h
        .feed(event(
            "ctx-2",
            "customer.contact_updated",
            "c-1",
            t0() + Duration::hours(2),
            json!({"email": null}),
        ))
        .await;
    assert_eq!(ctx.context_updates, 1);
    h.finish().await;

    let log = h.log();
    let email = only(&log, "c-1", "email");
    assert_eq!(email.outcome, Outcome::Suppressed);
    assert!(email.reason.contains("no email address"), "{email:?}");
    assert_eq!(only(&log, "c-1", "call").outcome, Outcome::Sent);
    assert_eq!(
        (
            h.sinks.push.count(),
            h.sinks.email.count(),
            h.sinks.call.count()
        ),
        (0, 0, 1)
    );
}

const RUNAWAY: &str = r#"
fn journey() {
    #{ name: "runaway", category: "service", triggers: ["test.poke"],
       steps: [#{ id: "never", channel: "push", template: "runaway_push", delay: "0s" }] }
}
fn decide(event, customer) {
    loop {}
}
"#;

const STEADY: &str = r#"
fn journey() {
    #{ name: "steady", category: "service", triggers: ["test.poke"],
       steps: [#{ id: "hello", channel: "push", template: "steady_hello", delay: "0s" }] }
}
fn decide(event, customer) {
    start(#{ who: event.customer })
}
"#;

#[tokio::test]
async fn a_runaway_script_fails_only_its_own_journey() {
    let h = Harness::new(
        inline_rules(&[("runaway", RUNAWAY), ("steady", STEADY)]),
        t0() - Duration::hours(1),
    )
    .await;
    for (i, c) in ["c-1", "c-2"].into_iter().enumerate() {
        h.feed(contact(c, t0() - Duration::hours(1))).await;
        let (outcome, records) = h
            .feed(event(
                &format!("poke-{i}"),
                "test.poke",
                c,
                t0() + Duration::minutes(i as i64),
                json!({}),
            ))
            .await;
        assert_eq!(outcome.failures.len(), 1, "{outcome:?}");
        assert_eq!(outcome.failures[0].journey.as_deref(), Some("runaway"));
        assert_eq!(outcome.started.len(), 1, "{outcome:?}");
        assert!(outcome.started[0].starts_with("steady-"));
        assert_eq!(only(&records, c, "hello").outcome, Outcome::Sent);
    }
    h.finish().await;
    let got = h.sinks.push.requests();
    let sent: Vec<_> = got
        .iter()
        .map(|r| (r.str("/template"), r.str("/variables/who")))
        .collect();
    assert_eq!(sent, vec![("steady_hello", "c-1"), ("steady_hello", "c-2")]);
    assert!(h.log().iter().all(|r| r.journey == "steady"));
}

/// Lateness is how long after its due time a step went out, not how long
/// the receiver took to answer: an endpoint that answers 8 s later (on the
/// virtual clock) adds to the response time only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_is_not_counted_as_lateness() {
    let h = Harness::new(shipped_rules(), t0() - Duration::hours(1)).await;
    h.feed(contact("c-3", t0() - Duration::hours(1))).await;
    let clock = h.sim.clock.clone();
    h.sinks.push.answer_with(std::sync::Arc::new(move || {
        clock.advance(Duration::seconds(8));
        None
    }));
    let (_, records) = h
        .feed(fee_change("fee-1", "P-77", "Netflix", 15.99, 18.5))
        .await;
    let alert = only(&records, "c-3", "alert");
    assert_eq!(alert.outcome, Outcome::Sent, "{alert:?}");
    assert_eq!(alert.latency_ms, Some(0), "{alert:?}");
    assert_eq!(alert.time, t0() + Duration::seconds(8), "{alert:?}");
}
