//! Withdrawal (`channels.<kind>.withdraw`): when a journey ends by an exit
//! event, what it delivered on a withdrawing channel is taken back there, so
//! that no agent calls a customer who already signed. On the virtual clock,
//! every channel a real HTTP endpoint on 127.0.0.1.

mod harness;
mod support;

use axum::http::StatusCode;
use chrono::Duration;
use serde_json::json;

use nudge::model::Outcome;
use support::*;

/// A push and a call task at once; signing converts it.
const CALLBACK: &str = r#"
fn journey() {
    #{ name: "callback", category: "service", triggers: ["test.applied"],
       exits: #{ "test.signed": "converted" },
       steps: [
           #{ id: "tell", channel: "push", template: "callback_push", delay: "0s" },
           #{ id: "call", channel: "call_task", template: "callback_call", delay: "0s" },
       ] }
}
fn decide(event, customer) { start() }
"#;

/// The call task goes out; the customer signs; the call-task endpoint gets
/// the withdrawal with the contract's body and key, answers 503 once, gets
/// it again and takes it. The push (not withdrawn by default) is left
/// alone; the dispatch log reads retrying, then withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_call_task_is_withdrawn_when_the_customer_signs() {
    let h = Harness::new(inline_rules(&[("callback", CALLBACK)]), t0()).await;
    h.feed(contact("c-1", t0())).await;
    h.feed(event("e1", "test.applied", "c-1", t0(), json!({})))
        .await;
    assert_eq!(h.sinks.call.count(), 1, "the call task went out");
    let task = h.sinks.call.requests()[0].clone();
    let instance = task.str("/instance").to_string();

    h.sinks.call.fail_next(1, StatusCode::SERVICE_UNAVAILABLE);
    let signed = t0() + Duration::hours(2);
    h.feed(event("e2", "test.signed", "c-1", signed, json!({})))
        .await;
    h.finish().await;

    let calls = h.sinks.call.requests();
    assert_eq!(calls.len(), 3, "task, refused withdrawal, withdrawal");
    let key = format!("{instance}:call:withdraw");
    for w in &calls[1..] {
        assert_eq!(
            w.body,
            json!({
                "action": "withdraw",
                "idempotency_key": format!("{instance}:call"),
                "reason": "converted"
            })
        );
        assert_eq!(w.key(), Some(key.as_str()));
    }
    assert_eq!((calls[1].status, calls[2].status), (503, 200));
    assert_eq!(h.sinks.push.count(), 1, "push is not withdrawn by default");

    let log = h.log();
    let withdrawal: Vec<_> = log.iter().filter(|r| r.step == "call:withdraw").collect();
    let outcomes: Vec<Outcome> = withdrawal.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [Outcome::Retrying, Outcome::Withdrawn],
        "{log:#?}"
    );
    assert!(withdrawal[0].reason.contains("HTTP 503"), "{log:#?}");
    assert!(
        withdrawal[1]
            .reason
            .contains("withdrawn on call_task: journey converted"),
        "{log:#?}"
    );
    assert!(withdrawal[1].time >= signed);
    let sends = log.iter().filter(|r| r.outcome == Outcome::Sent).count();
    assert_eq!(sends, 2, "a withdrawal is not a send: {log:#?}");
}

/// CALLBACK with its call task a day after the push: not yet due when the
/// customer signs, two hours in.
fn call_a_day_later() -> String {
    CALLBACK.replace(
        r#"template: "callback_call", delay: "0s""#,
        r#"template: "callback_call", delay: "1d""#,
    )
}

/// `script` as the journey `callback`: c-1 applies at t0 and signs two
/// hours later; then the schedule runs out.
async fn applied_then_signed(script: &str) -> Harness {
    let h = Harness::new(inline_rules(&[("callback", script)]), t0()).await;
    h.feed(contact("c-1", t0())).await;
    h.feed(event("e1", "test.applied", "c-1", t0(), json!({})))
        .await;
    h.feed(event(
        "e2",
        "test.signed",
        "c-1",
        t0() + Duration::hours(2),
        json!({}),
    ))
    .await;
    h.finish().await;
    h
}

/// A journey that ends before its call task was delivered withdraws
/// nothing: the step is cancelled unsent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_withdrawn_that_was_not_delivered() {
    let h = applied_then_signed(&call_a_day_later()).await;
    assert_eq!(h.sinks.call.count(), 0);
    let log = h.log();
    assert!(
        log.iter().all(|r| r.outcome != Outcome::Withdrawn),
        "{log:#?}"
    );
    assert!(log
        .iter()
        .any(|r| r.step == "call" && r.outcome == Outcome::Converted));
}

/// The call task is still being sent (its endpoint holds the answer) when
/// the customer signs: the exit finds it claimed, not delivered, so it
/// withdraws nothing then. The delivery lands after the exit and is taken
/// back at once, so no agent calls a customer who signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_task_delivered_after_the_customer_signed_is_withdrawn() {
    let h = Harness::new(inline_rules(&[("callback", CALLBACK)]), t0()).await;
    let gate = Sink::start().await;
    h.sinks.call.answer_after(&gate);
    h.feed(contact("c-1", t0())).await;
    let applied = h.feed(event("e1", "test.applied", "c-1", t0(), json!({})));
    let signed_meanwhile = async {
        h.sinks.call.wait_for_requests(1).await;
        let (_, records) = h
            .feed(event("e2", "test.signed", "c-1", t0(), json!({})))
            .await;
        // The exit is recorded while the call task's answer is held.
        assert!(
            records.iter().any(|r| r.outcome == Outcome::Converted),
            "{records:#?}"
        );
        assert_eq!(h.sinks.call.count(), 1, "no withdrawal yet");
        reqwest::Client::new()
            .post(&gate.url)
            .send()
            .await
            .expect("gate");
    };
    tokio::join!(applied, signed_meanwhile);
    h.finish().await;

    let calls = h.sinks.call.requests();
    assert_eq!(calls.len(), 2, "the task, then its withdrawal: {calls:#?}");
    let instance = calls[0].str("/instance").to_string();
    assert_eq!(calls[0].status, 200);
    assert_eq!(
        calls[1].body,
        json!({
            "action": "withdraw",
            "idempotency_key": format!("{instance}:call"),
            "reason": "converted"
        })
    );
    assert_eq!(
        calls[1].key(),
        Some(format!("{instance}:call:withdraw").as_str())
    );
    let log = h.log();
    let call: Vec<Outcome> = log
        .iter()
        .filter(|r| r.step.starts_with("call"))
        .map(|r| r.outcome)
        .collect();
    assert_eq!(call, [Outcome::Sent, Outcome::Withdrawn], "{log:#?}");
}

/// A control-group instance that converts before its call task is due:
/// the task is logged in its arm (`held_out`, naming the exit), so the
/// funnel does not list it among the journey's losses, and nothing is
/// sent or withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_group_exit_stays_in_its_arm_not_among_the_losses() {
    let held = call_a_day_later().replace(
        r#"category: "service","#,
        r#"category: "service", holdout: 100,"#,
    );
    let h = applied_then_signed(&held).await;
    assert_eq!(h.sinks.total(), 0, "a control group is never sent");
    let log = h.log();
    let call = only(&log, "c-1", "call");
    assert_eq!(call.outcome, Outcome::HeldOut, "{log:#?}");
    assert!(
        call.reason.contains("test.signed ended the journey"),
        "{call:?}"
    );
    let report = nudge::review::funnel::funnels(h.sim.store.as_ref(), Some("callback")).unwrap();
    let funnel = &report.journeys[0];
    for step in &funnel.steps {
        assert!(step.not_sent.is_empty(), "{:?}", step);
    }
}

/// The call-task endpoint takes the task but answers after nudge's
/// timeout: the attempt is logged as timed out, to be retried. The customer
/// signs before the retry. The task may be open in the agents' queue, so it
/// is withdrawn all the same (the endpoint's copy is taken back by key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_task_whose_answer_timed_out_is_withdrawn_when_the_customer_signs() {
    let h = Harness::with_timeout(
        inline_rules(&[("callback", CALLBACK)]),
        t0(),
        std::time::Duration::from_millis(300),
    )
    .await;
    h.sinks.call.slow(std::time::Duration::from_secs(1));
    h.feed(contact("c-1", t0())).await;
    h.feed(event("e1", "test.applied", "c-1", t0(), json!({})))
        .await;
    assert_eq!(h.sinks.call.count(), 1, "the task reached the endpoint");
    let instance = h.sinks.call.requests()[0].str("/instance").to_string();
    h.sinks.call.slow(std::time::Duration::ZERO);
    let signed = t0() + Duration::milliseconds(1);
    h.feed(event("e2", "test.signed", "c-1", signed, json!({})))
        .await;
    h.finish().await;

    let log = h.log();
    let call: Vec<_> = log.iter().filter(|r| r.step == "call").collect();
    assert_eq!(
        outcomes(&call),
        [Outcome::Retrying, Outcome::Converted],
        "timed out, then ended unsent: {log:#?}"
    );
    assert!(call[0].reason.starts_with("timed out"), "{log:#?}");
    let calls = h.sinks.call.requests();
    assert_eq!(calls.len(), 2, "the task, then its withdrawal");
    assert_eq!(
        calls[1].body,
        json!({
            "action": "withdraw",
            "idempotency_key": format!("{instance}:call"),
            "reason": "converted"
        })
    );
    let withdrawn = only(&log, "c-1", "call:withdraw");
    assert_eq!(withdrawn.outcome, Outcome::Withdrawn, "{log:#?}");
}

/// A customer who withdraws consent to calls, or removes their number,
/// after the call task went out: the task is taken back with why, so no
/// agent phones them; the push stays. Consent withdrawn for marketing only
/// (this journey is service) or a new email address takes nothing back.
/// A later exit withdraws nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_call_task_is_withdrawn_when_the_customer_can_no_longer_be_called() {
    let h = Harness::new(inline_rules(&[("callback", CALLBACK)]), t0()).await;
    for c in ["c-consent", "c-phone", "c-other"] {
        h.feed(contact(c, t0())).await;
        h.feed(event(
            &format!("{c}-applied"),
            "test.applied",
            c,
            t0(),
            json!({}),
        ))
        .await;
    }
    assert_eq!(h.sinks.call.count(), 3, "the call tasks went out");
    let later = t0() + Duration::hours(1);
    let consent = |c: &str, category: &str| {
        event(
            &format!("{c}-{category}"),
            "customer.consent_updated",
            c,
            later,
            json!({"consents": {"call_task": {category: false}}}),
        )
    };
    h.feed(consent("c-consent", "service")).await;
    h.feed(event(
        "c-phone-removed",
        "customer.contact_updated",
        "c-phone",
        later,
        json!({"phone": null}),
    ))
    .await;
    h.feed(consent("c-other", "marketing")).await;
    h.feed(event(
        "c-other-email",
        "customer.contact_updated",
        "c-other",
        later,
        json!({"email": "new@example.com"}),
    ))
    .await;
    h.feed(event(
        "c-consent-signed",
        "test.signed",
        "c-consent",
        later + Duration::hours(1),
        json!({}),
    ))
    .await;
    h.finish().await;

    let log = h.log();
    let customer_of = |key: &str| {
        log.iter()
            .find(|r| r.step == "call" && key == format!("{}:call", r.instance))
            .map(|r| r.customer.clone())
            .unwrap_or_else(|| panic!("{key} is no call task's key"))
    };
    // Sent concurrently: compared by customer.
    let mut withdrawals: Vec<(String, String)> = h
        .sinks
        .call
        .requests()
        .iter()
        .filter(|r| r.body["action"] == "withdraw")
        .map(|r| {
            (
                customer_of(r.str("/idempotency_key")),
                r.str("/reason").to_string(),
            )
        })
        .collect();
    withdrawals.sort();
    assert_eq!(
        withdrawals,
        [
            ("c-consent".to_string(), "consent_withdrawn".to_string()),
            ("c-phone".to_string(), "unreachable".to_string()),
        ]
    );
    assert_eq!(h.sinks.push.count(), 3, "pushes are not withdrawn");
    let mut reasons: Vec<(&str, &str)> = log
        .iter()
        .filter(|r| r.outcome == Outcome::Withdrawn)
        .map(|r| (r.customer.as_str(), r.reason.as_str()))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            (
                "c-consent",
                "step call withdrawn on call_task: the customer withdrew consent to call_task (service)"
            ),
            (
                "c-phone",
                "step call withdrawn on call_task: the customer can no longer be reached on call_task"
            ),
        ],
        "{log:#?}"
    );
}
