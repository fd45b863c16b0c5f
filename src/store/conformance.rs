//! The suite every [`Store`] passes: written once, run against each
//! implementation by `store_conformance!` (Quickwit's metastore tests are
//! the model). It covers every method the engine calls. Tests of several
//! replicas sharing one database run for the stores that can be shared
//! (`store_conformance!(make, replicas: make_pair)`): SQLite is one node
//! per file, and a second owner is refused (its own test).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::*;
use crate::context::RecentSend;
use crate::model::{Outcome, StepRef, WITHDRAW_SUFFIX};
use chrono::Duration;

/// A log record about the push step of an `unsigned_loan` instance.
fn push_record(
    time: DateTime<Utc>,
    customer: &str,
    instance: &str,
    template: &str,
    outcome: Outcome,
    reason: &str,
) -> LogRecord {
    let subject = StepRef {
        customer,
        journey: "unsigned_loan",
        instance,
        step: "push",
        channel: "push",
        template,
        rule_hash: "h1",
    };
    LogRecord::about(subject, time, outcome, reason)
}

pub fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-02T00:00:00Z")
        .unwrap()
        .to_utc()
}

pub fn instance(id: &str, customer: &str, key: &str) -> NewInstance {
    NewInstance {
        id: id.into(),
        customer: customer.into(),
        journey: "unsigned_loan".into(),
        key: key.into(),
        mode: Mode::Live,
        category: Category::Service,
        started_at: t0(),
        rule_hash: "h1".into(),
        trigger_event: "e1".into(),
        vars: Map::new(),
        decision_inputs: Value::Null,
    }
}

pub fn steps() -> Vec<NewStep> {
    [
        ("push", ChannelKind::Push, 0),
        ("email", ChannelKind::Email, 1),
        ("call", ChannelKind::CallTask, 3),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (id, channel, days))| NewStep {
        step: id.into(),
        seq: i as u32,
        channel,
        template: format!("t_{id}"),
        condition: None,
        due_at: t0() + Duration::days(days),
    })
    .collect()
}

pub fn transaction_is_atomic(store: &dyn Store) {
    {
        let mut tx = store.begin().unwrap();
        tx.start_instance(&instance("i1", "c1", "a1"), &steps())
            .unwrap();
        tx.mark_processed("e1", t0()).unwrap();
        // dropped without commit
    }
    let mut tx = store.begin().unwrap();
    assert!(!tx.already_processed("e1").unwrap());
    assert!(tx
        .open_instance("c1", "unsigned_loan", "a1")
        .unwrap()
        .is_none());
    tx.start_instance(&instance("i1", "c1", "a1"), &steps())
        .unwrap();
    tx.mark_processed("e1", t0()).unwrap();
    tx.set_offset("events", 3, 0, 42).unwrap();
    tx.commit().unwrap();
    let mut tx = store.begin().unwrap();
    assert!(tx.already_processed("e1").unwrap());
    assert_eq!(
        tx.open_instance("c1", "unsigned_loan", "a1")
            .unwrap()
            .unwrap()
            .id,
        "i1"
    );
    drop(tx);
    assert_eq!(store.offsets("events").unwrap(), vec![(3, 42)]);
    assert_eq!(store.next_due(None).unwrap(), Some(t0()));
}

pub fn claims_are_exclusive_and_leases_expire(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    tx.start_instance(&instance("i1", "c1", "a1"), &steps())
        .unwrap();
    tx.commit().unwrap();
    let lease = t0() + Duration::minutes(5);
    let claimed = store.claim_due(ChannelKind::Push, t0(), 10, lease).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempt, 1);
    assert!(
        store
            .claim_due(ChannelKind::Push, t0(), 10, lease)
            .unwrap()
            .is_empty(),
        "claimed twice"
    );
    assert!(
        store
            .claim_due(ChannelKind::Email, t0(), 10, lease)
            .unwrap()
            .is_empty(),
        "not yet due"
    );
    // The worker began its send and died: once the lease runs out the step
    // is claimed again, as a second attempt (the first may have gone out).
    store.mark_sending(&[claimed[0].row], t0()).unwrap();
    let later = lease + Duration::seconds(1);
    let again = store
        .claim_due(ChannelKind::Push, later, 10, later + Duration::minutes(5))
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    let mut rec = push_record(later, "c1", "i1", "t_push", Outcome::Sent, "ok");
    rec.attempt = 2;
    let written = store
        .finish_step(&StepResult {
            record: rec,
            again_at: None,
            replan: false,
            claimed_row: Some(again[0].row),
            withdraw_if_ended: false,
        })
        .unwrap()
        .expect("the holder's result is recorded");
    assert!(written.seq > 0);
    // The first worker comes back from a stall past its lease: its result
    // for the step the second one settled is fenced off, not logged again.
    let mut late = push_record(later, "c1", "i1", "t_push", Outcome::Sent, "ok");
    late.attempt = 1;
    let fenced = store
        .settle_steps(&[StepResult {
            record: late,
            again_at: None,
            replan: false,
            claimed_row: Some(claimed[0].row),
            withdraw_if_ended: false,
        }])
        .unwrap();
    assert_eq!(fenced, [None], "a step settled is not settled again");
    assert!(store
        .claim_due(
            ChannelKind::Push,
            later + Duration::days(9),
            10,
            later + Duration::days(10)
        )
        .unwrap()
        .is_empty());
    assert_eq!(store.history("i1").unwrap().len(), 1);
    assert_eq!(store.log_after(0, 10).unwrap().len(), 1);
}

pub fn one_open_instance_and_close_cancels_pending(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    tx.start_instance(&instance("i1", "c1", "a1"), &steps())
        .unwrap();
    tx.start_instance(&instance("i2", "c1", "a2"), &steps())
        .unwrap();
    tx.commit().unwrap();
    // Refused at the call or, where writes are batched, at the commit.
    let refused = {
        let mut tx = store.begin().unwrap();
        match tx.start_instance(&instance("i3", "c1", "a1"), &steps()) {
            Err(_) => true,
            Ok(()) => tx.commit().is_err(),
        }
    };
    assert!(refused, "second open instance for one key");
    let mut tx = store.begin().unwrap();
    let closed = tx
        .close_instance("i1", InstanceStatus::Converted, t0() + Duration::hours(1))
        .unwrap();
    assert_eq!(closed.len(), 3);
    tx.commit().unwrap();
    let far = t0() + Duration::days(30);
    let due: Vec<_> = ChannelKind::ALL
        .into_iter()
        .flat_map(|c| store.claim_due(c, far, 10, far).unwrap())
        .collect();
    assert_eq!(due.len(), 3, "only the other application's steps remain");
    assert!(due.iter().all(|d| d.instance_id == "i2"));
    let ctx = store.customer("c1", t0()).unwrap();
    assert!(ctx.has_status("unsigned_loan", InstanceStatus::Converted));
    assert!(ctx.in_journey("unsigned_loan"));
}

pub fn exit_after_last_step_converts_within_window(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    tx.start_instance(&instance("i1", "c1", "a1"), &steps()[..1])
        .unwrap();
    tx.commit().unwrap();
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(1))
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let rec = push_record(t0(), "c1", "i1", "t_push", Outcome::Sent, "ok");
    store
        .finish_step(&StepResult {
            record: rec,
            again_at: None,
            replan: false,
            claimed_row: Some(claimed[0].row),
            withdraw_if_ended: false,
        })
        .unwrap();
    let mut tx = store.begin().unwrap();
    assert!(
        tx.open_instance("c1", "unsigned_loan", "a1")
            .unwrap()
            .is_none(),
        "completed"
    );
    assert!(
        tx.exitable_instance("c1", "unsigned_loan", "a1", t0() + Duration::days(1))
            .unwrap()
            .is_none(),
        "outside the window"
    );
    let target = tx
        .exitable_instance("c1", "unsigned_loan", "a1", t0() - Duration::days(30))
        .unwrap()
        .unwrap();
    assert_eq!(target.id, "i1");
    assert!(tx
        .close_instance("i1", InstanceStatus::Converted, t0() + Duration::hours(2))
        .unwrap()
        .is_empty());
    tx.commit().unwrap();
    assert!(store
        .customer("c1", t0())
        .unwrap()
        .has_status("unsigned_loan", InstanceStatus::Converted));
}

pub fn dead_letters_wait_in_the_outbox_until_published(store: &dyn Store) {
    let letter = DeadLetter {
        topic: "events".into(),
        partition: 1,
        offset: 7,
        key: Some(b"c1".to_vec()),
        payload: b"{not json".to_vec(),
        reason: "not valid JSON".into(),
        journey: None,
        event_id: None,
        headers: Vec::new(),
    };
    {
        let mut tx = store.begin().unwrap();
        tx.add_dead_letter(&letter, t0()).unwrap();
    }
    assert!(
        store.unpublished_dead_letters(10).unwrap().is_empty(),
        "rolled back with its transaction"
    );
    let mut tx = store.begin().unwrap();
    tx.add_dead_letter(&letter, t0()).unwrap();
    tx.commit().unwrap();
    let pending = store.unpublished_dead_letters(10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].1, letter);
    let claimed = store
        .claim_dead_letters(10, 1 << 20, t0(), t0() + Duration::minutes(1))
        .unwrap();
    assert_eq!(
        claimed,
        vec![ClaimedDeadLetter {
            id: pending[0].0,
            letter: letter.clone(),
            payload_size: letter.payload.len(),
            attempts: 0,
        }],
        "the publisher's claim hands out the same letter"
    );
    assert_eq!(
        store.dead_letter_backlog().unwrap(),
        DeadLetterBacklog {
            waiting: 1,
            failed: 0
        }
    );
    store
        .mark_dead_letters_published(&[pending[0].0], t0())
        .unwrap();
    assert!(store.unpublished_dead_letters(10).unwrap().is_empty());
    assert!(store
        .claim_dead_letters(
            10,
            1 << 20,
            t0() + Duration::hours(1),
            t0() + Duration::hours(2)
        )
        .unwrap()
        .is_empty());
    assert_eq!(
        store.dead_letter_backlog().unwrap(),
        DeadLetterBacklog::default()
    );
}

/// A dead letter keeps the original record's headers, byte for byte and in
/// order (binary-mode CloudEvents keep their attributes there); a claim
/// hands out at most the payload's first bytes asked for, with its size.
pub fn dead_letters_keep_their_headers_and_claims_cut_payloads(store: &dyn Store) {
    let header = |key: &str, value: Option<&[u8]>| RecordHeader {
        key: key.into(),
        value: value.map(<[u8]>::to_vec),
    };
    let big = DeadLetter {
        topic: "events".into(),
        partition: 2,
        offset: 9,
        key: None,
        payload: (0..5000u32).map(|i| (i % 251) as u8).collect(),
        reason: "not a CloudEvent: missing `specversion`".into(),
        journey: None,
        event_id: None,
        headers: vec![
            header("ce_id", Some(b"e-1")),
            header("ce_type", Some("loan_application.completed é".as_bytes())),
            header("content-type", Some(b"application/json")),
            header("traceparent", None),
            header("bin", Some(&[0xff, 0x00, 0x7f])),
            header("empty", Some(b"")),
            header("ce_id", Some(b"second")),
        ],
    };
    let empty = DeadLetter {
        payload: Vec::new(),
        offset: 10,
        headers: Vec::new(),
        ..big.clone()
    };
    let mut tx = store.begin().unwrap();
    tx.add_dead_letter(&big, t0()).unwrap();
    tx.add_dead_letter(&empty, t0()).unwrap();
    tx.commit().unwrap();
    let pending = store.unpublished_dead_letters(10).unwrap();
    assert_eq!(pending[0].1, big, "headers and payload round trip");
    assert_eq!(pending[1].1, empty);
    let claimed = store
        .claim_dead_letters(10, 1000, t0(), t0() + Duration::minutes(1))
        .unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(claimed[0].letter.payload, big.payload[..1000]);
    assert_eq!(claimed[0].payload_size, 5000);
    assert_eq!(claimed[0].letter.headers, big.headers);
    assert_eq!(claimed[1].letter.payload, Vec::<u8>::new());
    assert_eq!(claimed[1].payload_size, 0);
}

/// A failed publish is counted and backs the letter off until `retry_at`;
/// one given up stays in the store, counted as failed, and is never handed
/// out again, while the letters behind it still are.
pub fn failed_dead_letters_back_off_and_are_given_up_but_kept(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    for offset in 0..2 {
        tx.add_dead_letter(
            &DeadLetter {
                topic: "events".into(),
                partition: 0,
                offset,
                key: None,
                payload: b"x".to_vec(),
                reason: "bad".into(),
                journey: None,
                event_id: None,
                headers: Vec::new(),
            },
            t0(),
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let minute = Duration::minutes(1);
    let claim = |now: DateTime<Utc>| {
        store
            .claim_dead_letters(10, 100, now, now + minute)
            .unwrap()
            .into_iter()
            .map(|c| (c.letter.offset, c.attempts))
            .collect::<Vec<_>>()
    };
    // The stuck letter's attempts, if a claim at `now` hands it out.
    let stuck_in = |now| {
        claim(now)
            .into_iter()
            .find(|(o, _)| *o == 0)
            .map(|(_, a)| a)
    };
    let first = store
        .claim_dead_letters(10, 100, t0(), t0() + minute)
        .unwrap();
    let (stuck, behind) = (first[0].id, first[1].id);
    let mut now = t0();
    for attempt in 1..=3u32 {
        let retry = now + Duration::seconds(attempt as i64);
        store
            .dead_letter_publish_failed(stuck, "too large", retry, false, now)
            .unwrap();
        assert_eq!(
            stuck_in(retry - Duration::milliseconds(1)),
            None,
            "not before its retry"
        );
        now = retry;
        // The failure released its claim: it comes back at `retry`.
        assert_eq!(stuck_in(now), Some(attempt));
    }
    assert_eq!(
        store.dead_letter_backlog().unwrap(),
        DeadLetterBacklog {
            waiting: 2,
            failed: 0
        }
    );
    store
        .dead_letter_publish_failed(stuck, "too large", now + minute, true, now)
        .unwrap();
    assert_eq!(
        store.dead_letter_backlog().unwrap(),
        DeadLetterBacklog {
            waiting: 1,
            failed: 1
        }
    );
    let much_later = t0() + Duration::days(1);
    assert_eq!(
        claim(much_later),
        vec![(1, 0)],
        "the failed letter is never handed out again; the one behind it is"
    );
    assert_eq!(
        store
            .unpublished_dead_letters(10)
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        vec![behind]
    );
    store.mark_dead_letters_published(&[behind], now).unwrap();
    assert_eq!(
        store.dead_letter_backlog().unwrap(),
        DeadLetterBacklog {
            waiting: 0,
            failed: 1
        }
    );
    assert!(
        store.purge(much_later + Duration::days(365)).unwrap() > 0,
        "the published one is purged"
    );
    assert_eq!(
        store.dead_letter_backlog().unwrap().failed,
        1,
        "a failed letter is kept by retention"
    );
}

pub fn purge_keeps_what_is_live(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    tx.start_instance(&instance("old", "c1", "a1"), &steps())
        .unwrap();
    tx.start_instance(&instance("live", "c1", "a2"), &steps())
        .unwrap();
    tx.mark_processed("e-old", t0()).unwrap();
    tx.append_log(&push_record(t0(), "c1", "old", "t", Outcome::Sent, "ok"))
        .unwrap();
    tx.close_instance("old", InstanceStatus::Converted, t0())
        .unwrap();
    tx.commit().unwrap();
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(1))
        .unwrap();
    assert_eq!(claimed.len(), 1);
    store.release_claim("live", "push", None).unwrap();
    let again = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(1))
        .unwrap();
    assert_eq!(
        again[0].attempt, 1,
        "a released claim does not count as an attempt"
    );

    assert!(store.purge(t0() + Duration::days(1)).unwrap() > 0);
    let mut tx = store.begin().unwrap();
    assert!(!tx.already_processed("e-old").unwrap());
    assert!(
        tx.open_instance("c1", "unsigned_loan", "a2")
            .unwrap()
            .is_some(),
        "open instances stay"
    );
    drop(tx);
    assert!(store.log_after(0, 10).unwrap().is_empty());
    let ctx = store.customer("c1", t0()).unwrap();
    assert_eq!(
        ctx.journeys.len(),
        1,
        "the ended instance is gone, the open one stays"
    );
    let pending: i64 = store
        .step_counts()
        .unwrap()
        .iter()
        .filter(|(s, _)| s != "cancelled")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(pending, 3, "the open instance keeps all its steps");
}

pub fn retry_reschedules_and_customer_round_trips(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    let mut c = CustomerContext::new("c9");
    c.app_installed = true;
    c.timezone = Some("Australia/Perth".into());
    tx.save_customer(&c, t0()).unwrap();
    tx.start_instance(&instance("i1", "c9", "a1"), &steps())
        .unwrap();
    tx.commit().unwrap();
    let got = store.customer("c9", t0()).unwrap();
    assert_eq!(got.timezone, c.timezone);
    assert!(got.app_installed);
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(1))
        .unwrap();
    let rec = push_record(t0(), "c9", "i1", "t_push", Outcome::Retrying, "HTTP 503");
    let retry_at = t0() + Duration::seconds(4);
    store
        .finish_step(&StepResult {
            record: rec,
            again_at: Some(retry_at),
            replan: false,
            // By key: a result need not carry the claim's row.
            claimed_row: None,
            withdraw_if_ended: false,
        })
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(store
        .claim_due(ChannelKind::Push, t0(), 10, t0())
        .unwrap()
        .is_empty());
    let again = store
        .claim_due(
            ChannelKind::Push,
            retry_at,
            10,
            retry_at + Duration::minutes(1),
        )
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(
        again[0].planned_at,
        t0(),
        "retries do not move the lateness reference"
    );
}

/// A result settling `step` (claimed as `row`) with `outcome` at `time`.
fn settle(step: &DueStep, time: DateTime<Utc>, outcome: Outcome) -> StepResult {
    let mut record = LogRecord::about(step.subject(), time, outcome, "test");
    record.attempt = step.attempt;
    StepResult {
        record,
        again_at: None,
        replan: false,
        claimed_row: Some(step.row),
        withdraw_if_ended: false,
    }
}

fn start(store: &dyn Store, instances: &[(&str, &str, &str)], steps: &[NewStep]) {
    let mut tx = store.begin().unwrap();
    for (id, customer, key) in instances {
        tx.start_instance(&instance(id, customer, key), steps)
            .unwrap();
    }
    tx.commit().unwrap();
}

fn status_counts(store: &dyn Store) -> HashMap<String, i64> {
    store.step_counts().unwrap().into_iter().collect()
}

/// Several results in one call: records come back in order with rising
/// seqs; sends settle, retries and deferrals go back to pending (a deferral
/// moves the lateness reference and gives back its attempt, a retry does
/// not); an instance completes
/// when its last step settles.
pub fn finish_steps_writes_a_batch_in_order(store: &dyn Store) {
    start(
        store,
        &[("i1", "c1", "a1"), ("i2", "c2", "a1"), ("i3", "c3", "a1")],
        &steps()[..1],
    );
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
        .unwrap();
    assert_eq!(claimed.len(), 3);
    let by_instance: HashMap<&str, &DueStep> = claimed
        .iter()
        .map(|d| (d.instance_id.as_str(), d))
        .collect();
    let t = t0() + Duration::seconds(1);
    let sent = settle(by_instance["i1"], t, Outcome::Sent);
    let mut retry = settle(by_instance["i2"], t, Outcome::Retrying);
    retry.again_at = Some(t + Duration::seconds(30));
    let mut defer = settle(by_instance["i3"], t, Outcome::Deferred);
    defer.again_at = Some(t + Duration::hours(8));
    defer.replan = true;
    // Without the claim's row: found by key.
    defer.claimed_row = None;
    let written = store.finish_steps(vec![sent, retry, defer]).unwrap();
    let instances: Vec<&str> = written.iter().map(|r| r.instance.as_str()).collect();
    assert_eq!(instances, ["i1", "i2", "i3"]);
    assert!(written[0].seq > 0);
    assert!(
        written.windows(2).all(|w| w[0].seq < w[1].seq),
        "{written:?}"
    );
    let log = store.log_after(0, 10).unwrap();
    assert_eq!(log, written, "as returned, in order");
    let counts = status_counts(store);
    assert_eq!(counts.get("sent"), Some(&1));
    assert_eq!(counts.get("pending"), Some(&2));
    assert_eq!(counts.get("claimed"), None);
    let mut tx = store.begin().unwrap();
    assert!(
        tx.open_instance("c1", "unsigned_loan", "a1")
            .unwrap()
            .is_none(),
        "i1's only step settled: completed"
    );
    assert_eq!(
        tx.exitable_instance("c1", "unsigned_loan", "a1", t)
            .unwrap()
            .map(|i| i.id),
        Some("i1".into()),
        "completed at the send's time"
    );
    assert!(tx
        .open_instance("c2", "unsigned_loan", "a1")
        .unwrap()
        .is_some());
    drop(tx);
    assert_eq!(
        store.next_due(Some(ChannelKind::Push)).unwrap(),
        Some(t + Duration::seconds(30))
    );
    let later = t + Duration::hours(9);
    let again = store
        .claim_due(ChannelKind::Push, later, 10, later + Duration::minutes(5))
        .unwrap();
    let again: HashMap<&str, &DueStep> =
        again.iter().map(|d| (d.instance_id.as_str(), d)).collect();
    assert_eq!(again["i2"].planned_at, t0(), "a retry keeps its reference");
    assert_eq!(again["i2"].attempt, 2);
    assert_eq!(
        again["i3"].planned_at,
        t + Duration::hours(8),
        "a deferral moves it"
    );
    assert_eq!(
        again["i3"].attempt, 1,
        "a deferral (quiet hours, a rate limit) is not an attempt"
    );
    assert!(store.finish_steps(Vec::new()).unwrap().is_empty());
}

/// The dispatch path's batch reads: one context per id asked, in order,
/// duplicates included; recent sends within the window only, newest first;
/// journeys only when asked for; histories oldest first.
pub fn customers_and_histories_come_back_in_the_order_asked(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    let mut c1 = CustomerContext::new("c1");
    c1.email = Some("c1@example.com".into());
    tx.save_customer(&c1, t0()).unwrap();
    tx.start_instance(&instance("i1", "c1", "a1"), &steps())
        .unwrap();
    // A marketing instance: each send comes back with its category.
    let mut marketing = instance("i2", "c2", "a1");
    marketing.category = Category::Marketing;
    tx.start_instance(&marketing, &steps()).unwrap();
    for (minutes, customer, instance, template, outcome) in [
        (1, "c1", "i1", "t_push", Outcome::Sent),
        (2, "c2", "i2", "t_push", Outcome::Sent),
        (3, "c1", "i1", "t_email", Outcome::Suppressed),
        (4, "c1", "i1", "t_email", Outcome::Sent),
    ] {
        let mut rec = push_record(
            t0() + Duration::minutes(minutes),
            customer,
            instance,
            template,
            outcome,
            "ok",
        );
        if template == "t_email" {
            rec.step = "email".into();
            rec.channel = "email".into();
        }
        tx.append_log(&rec).unwrap();
    }
    tx.commit().unwrap();
    let ids: Vec<String> = ["c2", "c1", "nobody", "c1"].map(String::from).to_vec();
    let got = store.customers(&ids, Some(t0()), true).unwrap();
    let got_ids: Vec<&str> = got.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(got_ids, ["c2", "c1", "nobody", "c1"]);
    assert_eq!(got[1].email.as_deref(), Some("c1@example.com"));
    let times = |sends: &[RecentSend]| sends.iter().map(|s| s.at).collect::<Vec<_>>();
    assert_eq!(
        times(&got[1].recent_sends),
        [t0() + Duration::minutes(4), t0() + Duration::minutes(1)],
        "sends only, newest first"
    );
    assert_eq!(
        got[1].recent_sends[0],
        RecentSend {
            at: t0() + Duration::minutes(4),
            journey: "unsigned_loan".into(),
            channel: ChannelKind::Email,
            category: Category::Service,
        },
        "each send with its journey, channel and category"
    );
    assert_eq!(got[3].recent_sends, got[1].recent_sends);
    assert_eq!(got[0].recent_sends.len(), 1);
    assert_eq!(
        (
            got[0].recent_sends[0].channel,
            got[0].recent_sends[0].category
        ),
        (ChannelKind::Push, Category::Marketing)
    );
    assert!(got[2].recent_sends.is_empty() && got[2].journeys.is_empty());
    assert_eq!(got[1].journeys.len(), 1);
    assert_eq!(got[1].journeys[0].status, InstanceStatus::Open);
    // The window bounds what counts against the cap.
    let window = store
        .customers(&ids[1..2], Some(t0() + Duration::minutes(2)), false)
        .unwrap();
    assert_eq!(
        times(&window[0].recent_sends),
        [t0() + Duration::minutes(4)]
    );
    assert!(window[0].journeys.is_empty(), "journeys not asked for");
    let none = store.customers(&ids[1..2], None, false).unwrap();
    assert!(none[0].recent_sends.is_empty(), "sends not asked for");
    assert_eq!(none[0].email.as_deref(), Some("c1@example.com"));
    let one = store.customer("c1", t0() + Duration::minutes(2)).unwrap();
    assert_eq!(one.recent_sends, window[0].recent_sends);
    assert_eq!(one.journeys, got[1].journeys);

    let histories = store
        .histories(&["i1", "nothing", "i2", "i1"].map(String::from))
        .unwrap();
    let steps_of = |h: &Vec<HistoryEntry>| h.iter().map(|e| e.step.clone()).collect::<Vec<_>>();
    assert_eq!(
        steps_of(&histories[0]),
        ["push", "email"],
        "oldest first, sends only"
    );
    assert!(histories[1].is_empty());
    assert_eq!(steps_of(&histories[2]), ["push"]);
    assert_eq!(histories[3], histories[0]);
    assert_eq!(histories[0][0].template, "t_push");
    assert_eq!(histories[0][0].sent_at, "2026-03-02T00:01:00.000Z");
    assert_eq!(store.history("i1").unwrap(), histories[0]);
}

/// Offsets are kept per topic and partition and move from the offset the
/// consumer expects, forward or back (a log restarted beneath the store's
/// offset); a rolled-back transaction moves nothing.
pub fn offsets_are_per_partition_and_move_from_the_one_expected(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    tx.set_offset("events", 2, 0, 100).unwrap();
    tx.set_offset("events", 0, 0, 7).unwrap();
    tx.set_offset("other", 0, 0, 1).unwrap();
    tx.commit().unwrap();
    let mut tx = store.begin().unwrap();
    tx.set_offset("events", 2, 100, 50).unwrap();
    tx.set_offset("events", 0, 7, 9).unwrap();
    tx.commit().unwrap();
    {
        let mut tx = store.begin().unwrap();
        tx.set_offset("events", 0, 9, 1000).unwrap();
    }
    assert_eq!(store.offsets("events").unwrap(), [(0, 9), (2, 50)]);
    assert_eq!(store.offsets("other").unwrap(), [(0, 1)]);
    assert!(store.offsets("unknown").unwrap().is_empty());
    // Twice in one transaction: the second move starts where the first left it.
    let mut tx = store.begin().unwrap();
    tx.set_offset("events", 0, 9, 10).unwrap();
    tx.set_offset("events", 0, 10, 12).unwrap();
    tx.commit().unwrap();
    assert_eq!(store.offsets("events").unwrap(), [(0, 12), (2, 50)]);
}

/// Tries to move `partition` of "events" from `expected` to `next` with an
/// event marked processed, as a decide batch would; the error, if any.
fn move_offset_with_an_event(
    store: &dyn Store,
    partition: i32,
    expected: i64,
    next: i64,
) -> Option<StoreError> {
    let mut tx = store.begin().unwrap();
    tx.mark_processed("moved-e1", t0()).unwrap();
    tx.set_offset("events", partition, expected, next)
        .and_then(|()| tx.commit())
        .err()
}

/// The store holding another offset than the one expected (it went back
/// under the consumer in a failover, or another consumer moved it): the
/// transaction fails whole, saying which partition and both offsets, and
/// is not worth retrying as it is.
pub fn an_offset_moved_under_the_consumer_fails_the_transaction(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    tx.set_offset("events", 0, 0, 700).unwrap();
    tx.commit().unwrap();
    for (partition, expected, found) in [(0, 1000, Some(700)), (0, 0, Some(700)), (5, 3, None)] {
        let err =
            move_offset_with_an_event(store, partition, expected, expected + 50).expect("refused");
        assert!(
            matches!(&err, StoreError::OffsetMoved { topic, partition: p, expected: e, found: f }
                if topic == "events" && *p == partition && *e == expected && *f == found),
            "{err:?}"
        );
        assert!(!err.is_transient());
        assert!(
            err.to_string()
                .contains(&format!("events/{partition}, not {expected}")),
            "{err}"
        );
        let mut tx = store.begin().unwrap();
        assert!(
            !tx.already_processed("moved-e1").unwrap(),
            "the batch's effects were rolled back with it"
        );
    }
    assert_eq!(store.offsets("events").unwrap(), [(0, 700)]);
    // From the offset the store holds, the batch goes in.
    assert!(move_offset_with_an_event(store, 0, 700, 750).is_none());
    assert_eq!(store.offsets("events").unwrap(), [(0, 750)]);
}

/// Event ids are remembered with the transaction that processed them.
pub fn processed_event_ids_dedup(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    assert!(!tx.already_processed("e1").unwrap());
    tx.mark_processed("e1", t0()).unwrap();
    assert!(
        tx.already_processed("e1").unwrap(),
        "seen within the transaction"
    );
    // Marking twice (two records of one event in a batch) is harmless.
    tx.mark_processed("e1", t0()).unwrap();
    tx.commit().unwrap();
    let mut tx = store.begin().unwrap();
    assert!(tx.already_processed("e1").unwrap());
    assert!(!tx.already_processed("e2").unwrap());
    tx.mark_processed("e1", t0() + Duration::days(1)).unwrap();
    tx.commit().unwrap();
    // Kept from when first processed: purged by that age.
    store.purge(t0() + Duration::hours(1)).unwrap();
    let mut tx = store.begin().unwrap();
    assert!(!tx.already_processed("e1").unwrap());
}

/// A claim handed back to another channel (a fallback stopped at run time)
/// is that channel's to claim, unsent and with no attempt counted.
pub fn a_claim_handed_back_to_another_channel_waits_there(store: &dyn Store) {
    start(store, &[("i1", "c1", "a1")], &steps()[..1]);
    let lease = t0() + Duration::minutes(5);
    let held = store.claim_due(ChannelKind::Push, t0(), 10, lease).unwrap();
    assert_eq!(held.len(), 1);
    store
        .release_claim("i1", "push", Some(ChannelKind::Email))
        .unwrap();
    assert!(store
        .claim_due(ChannelKind::Push, t0(), 10, lease)
        .unwrap()
        .is_empty());
    assert_eq!(
        store.next_due(Some(ChannelKind::Email)).unwrap(),
        Some(t0())
    );
    let again = store
        .claim_due(ChannelKind::Email, t0(), 10, lease)
        .unwrap();
    assert_eq!(
        again
            .iter()
            .map(|d| (d.step.as_str(), d.channel, d.attempt))
            .collect::<Vec<_>>(),
        [("push", ChannelKind::Email, 1)]
    );
}

/// An exit cancels the pending steps only: a step being sent stays claimed
/// and, handed back, is claimed again with the instance's new status, so
/// that the scheduler settles it unsent.
pub fn exit_cancels_pending_steps_but_not_a_claimed_one(store: &dyn Store) {
    start(store, &[("i1", "c1", "a1")], &steps());
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
        .unwrap();
    assert_eq!(claimed[0].instance_status, InstanceStatus::Open);
    let mut tx = store.begin().unwrap();
    let closed = tx
        .close_instance("i1", InstanceStatus::Converted, t0() + Duration::minutes(1))
        .unwrap();
    tx.commit().unwrap();
    let names: Vec<&str> = closed.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(names, ["email", "call"], "pending ones, in plan order");
    assert_eq!(closed[0].channel, ChannelKind::Email);
    assert_eq!(closed[0].template, "t_email");
    let counts = status_counts(store);
    assert_eq!(counts.get("cancelled"), Some(&2));
    assert_eq!(counts.get("claimed"), Some(&1));
    store.release_claim("i1", "push", None).unwrap();
    let again = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].instance_status, InstanceStatus::Converted);
    assert_eq!(again[0].customer, "c1");
    assert_eq!(again[0].journey, "unsigned_loan");
    assert_eq!(again[0].mode, Mode::Live);
    assert_eq!(again[0].category, Category::Service);
    assert_eq!(again[0].template, "t_push");
    store
        .finish_step(&settle(&again[0], t0(), Outcome::Converted))
        .unwrap();
    assert!(
        store.next_due(None).unwrap().is_none(),
        "nothing left to send"
    );
    // The conversion stands: settling the last step does not complete it.
    assert!(store
        .customer("c1", t0())
        .unwrap()
        .has_status("unsigned_loan", InstanceStatus::Converted));
}

/// The dispatch log pages by seq; rule versions are recorded once.
pub fn log_pages_in_order_and_rules_record_once(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    for i in 0..5 {
        let mut rec = push_record(
            t0() + Duration::seconds(i),
            "c1",
            "i1",
            "t_push",
            Outcome::Sent,
            "ok",
        );
        rec.latency_ms = Some(i as u64 * 10);
        rec.event_id = Some(format!("e{i}"));
        rec.attempt = 1;
        tx.append_log(&rec).unwrap();
    }
    tx.commit().unwrap();
    let first = store.log_after(0, 2).unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[1].latency_ms, Some(10));
    assert_eq!(first[1].event_id.as_deref(), Some("e1"));
    assert_eq!(first[1].attempt, 1);
    let rest = store.log_after(first[1].seq, 10).unwrap();
    assert_eq!(rest.len(), 3);
    assert!(rest[0].seq > first[1].seq);
    assert_eq!(rest[2].time, t0() + Duration::seconds(4));
    assert!(store.log_after(rest[2].seq, 10).unwrap().is_empty());
    let files = serde_json::json!({"rules/a.rhai": "h1"});
    store.record_rules("v1", &files, t0()).unwrap();
    store
        .record_rules("v1", &files, t0() + Duration::days(1))
        .unwrap();
    store.record_rules("v2", &files, t0()).unwrap();
}

/// Next due per channel and overall; counts by status; dead letters
/// published in a batch.
pub fn next_due_counts_and_dead_letter_batches(store: &dyn Store) {
    assert_eq!(store.next_due(None).unwrap(), None);
    start(store, &[("i1", "c1", "a1")], &steps());
    assert_eq!(store.next_due(None).unwrap(), Some(t0()));
    assert_eq!(
        store.next_due(Some(ChannelKind::Email)).unwrap(),
        Some(t0() + Duration::days(1))
    );
    assert_eq!(
        store.next_due(Some(ChannelKind::CallTask)).unwrap(),
        Some(t0() + Duration::days(3))
    );
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        store.next_due(None).unwrap(),
        Some(t0() + Duration::days(1)),
        "claimed steps are not due"
    );
    assert_eq!(
        store.step_counts().unwrap(),
        [("claimed".to_string(), 1), ("pending".to_string(), 2)],
        "by status, in order"
    );
    let mut tx = store.begin().unwrap();
    for offset in 0..3 {
        let letter = DeadLetter {
            topic: "events".into(),
            partition: 0,
            offset,
            key: None,
            payload: vec![offset as u8],
            reason: "bad".into(),
            journey: Some("unsigned_loan".into()),
            event_id: Some(format!("e{offset}")),
            headers: Vec::new(),
        };
        tx.add_dead_letter(&letter, t0()).unwrap();
    }
    tx.commit().unwrap();
    let pending = store.unpublished_dead_letters(2).unwrap();
    assert_eq!(pending.len(), 2, "limited");
    assert_eq!(pending[0].1.offset, 0, "oldest first");
    assert_eq!(pending[0].1.key, None);
    assert_eq!(pending[0].1.journey.as_deref(), Some("unsigned_loan"));
    let ids: Vec<i64> = pending.iter().map(|(id, _)| *id).collect();
    store.mark_dead_letters_published(&ids, t0()).unwrap();
    let left = store.unpublished_dead_letters(10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1.offset, 2);
    store.mark_dead_letters_published(&[], t0()).unwrap();
}

/// Start-up hands back the claims this store holds; a heartbeat keeps a
/// claim from being taken over, and renews only steps still claimed.
pub fn leases_are_released_at_start_and_renewed_by_heartbeat(store: &dyn Store) {
    start(store, &[("i1", "c1", "a1"), ("i2", "c2", "a1")], &steps());
    let lease = t0() + Duration::minutes(5);
    let claimed = store.claim_due(ChannelKind::Push, t0(), 10, lease).unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(store.release_all_leases().unwrap(), 2);
    let claimed = store.claim_due(ChannelKind::Push, t0(), 10, lease).unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(
        claimed.iter().all(|d| d.attempt == 1),
        "handed back before its send began: no attempt"
    );
    let rows: Vec<i64> = claimed.iter().map(|d| d.row).collect();
    store.mark_sending(&rows[1..], t0()).unwrap();
    let renewed_until = lease + Duration::minutes(10);
    let sorted = |mut v: Vec<i64>| {
        v.sort_unstable();
        v
    };
    assert_eq!(
        sorted(store.renew_claims(&rows, renewed_until).unwrap()),
        sorted(rows.clone())
    );
    // A renewal never shortens a lease.
    assert_eq!(store.renew_claims(&rows, t0()).unwrap().len(), 2);
    let after_lease = lease + Duration::seconds(1);
    assert!(
        store
            .claim_due(
                ChannelKind::Push,
                after_lease,
                10,
                after_lease + Duration::minutes(5)
            )
            .unwrap()
            .is_empty(),
        "renewed: not taken over"
    );
    store
        .finish_step(&settle(&claimed[0], t0(), Outcome::Sent))
        .unwrap();
    assert!(store.claim_held(rows[1], after_lease).unwrap(), "renewed");
    assert!(
        !store.claim_held(rows[1], renewed_until).unwrap(),
        "its lease is over"
    );
    assert!(!store.claim_held(rows[0], t0()).unwrap(), "settled");
    assert_eq!(
        store.renew_claims(&rows, renewed_until).unwrap(),
        vec![claimed[1].row],
        "a settled step is not renewed"
    );
    assert!(store.renew_claims(&[], renewed_until).unwrap().is_empty());
    let after = renewed_until + Duration::seconds(1);
    let taken = store
        .claim_due(ChannelKind::Push, after, 10, after + Duration::minutes(5))
        .unwrap();
    assert_eq!(taken.len(), 1, "the renewed lease ran out");
    assert_eq!(taken[0].row, claimed[1].row);
    // Claimed and handed back at start before its send began (no attempt),
    // claimed again and its send begun (it may have gone out: the attempt
    // counts), and now taken over.
    assert_eq!(taken[0].attempt, 2);
}

/// A send that began is counted as possibly delivered until its result is
/// settled: through a hand-back at start and a lease that ran out (its
/// sender may have died after delivering), not after a settle or a
/// release of a step never started.
pub fn sends_begun_count_until_settled(store: &dyn Store) {
    start(store, &[("i1", "c1", "a1"), ("i2", "c2", "a1")], &steps());
    let lease = t0() + Duration::minutes(5);
    let claimed = store.claim_due(ChannelKind::Push, t0(), 10, lease).unwrap();
    assert_eq!(claimed.len(), 2);
    let (c1, c2) = if claimed[0].customer == "c1" {
        (&claimed[0], &claimed[1])
    } else {
        (&claimed[1], &claimed[0])
    };
    let began = t0() + Duration::seconds(1);
    store.mark_sending(&[c1.row, c2.row], began).unwrap();
    store.mark_sending(&[], began).unwrap();
    let ids = ["c1".to_string(), "c2".to_string(), "c3".to_string()];
    let read = |window: DateTime<Utc>| {
        store
            .customers(&ids, Some(window), false)
            .unwrap()
            .into_iter()
            .map(|c| {
                c.possibly_sent
                    .into_iter()
                    .map(|(row, send)| (row, send.at))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let begun = &store.customers(&ids, Some(t0()), false).unwrap()[0].possibly_sent;
    assert_eq!(
        begun[0].1,
        RecentSend {
            at: began,
            journey: "unsigned_loan".into(),
            channel: ChannelKind::Push,
            category: Category::Service,
        },
        "a send begun counts by its journey, channel and category too"
    );
    assert_eq!(
        read(t0()),
        [vec![(c1.row, began)], vec![(c2.row, began)], vec![]]
    );
    assert!(
        store.customers(&ids, None, false).unwrap()[0]
            .possibly_sent
            .is_empty(),
        "only read with the sends"
    );
    assert_eq!(
        read(began + Duration::seconds(1))[0],
        [],
        "outside the window"
    );
    // c1's send is recorded; c2's worker hands its claim back at start.
    store
        .finish_step(&settle(c1, began, Outcome::Sent))
        .unwrap();
    assert_eq!(store.release_all_leases().unwrap(), 1);
    assert_eq!(read(t0()), [vec![], vec![(c2.row, began)], vec![]]);
    // Taken again, it still counts, as an attempt too; its own result
    // clears it.
    let again = store.claim_due(ChannelKind::Push, t0(), 10, lease).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2, "its first send began");
    assert_eq!(read(t0())[1], [(c2.row, began)]);
    let mut retry = settle(&again[0], began, Outcome::Retrying);
    retry.again_at = Some(began + Duration::minutes(1));
    store.finish_step(&retry).unwrap();
    assert_eq!(read(t0())[1], [], "a failed attempt is known not delivered");
    // A step handed back before its send started never counted.
    let later = began + Duration::minutes(1);
    let third = store
        .claim_due(ChannelKind::Push, later, 10, later + Duration::minutes(5))
        .unwrap();
    assert_eq!(third.len(), 1);
    store.mark_sending(&[third[0].row], later).unwrap();
    store
        .release_claim(&third[0].instance_id, &third[0].step, None)
        .unwrap();
    assert_eq!(read(t0())[1], []);
}

/// Reads a batch prefetched at once see the transaction's own writes: ids
/// marked processed, a customer saved, instances started and closed.
pub fn prefetched_reads_follow_the_transactions_writes(store: &dyn Store) {
    start(store, &[("i1", "c1", "a1")], &steps());
    let mut tx = store.begin().unwrap();
    tx.mark_processed("e0", t0()).unwrap();
    tx.commit().unwrap();

    let mut tx = store.begin().unwrap();
    tx.prefetch(&[("e0", "c1"), ("e1", "c1"), ("e2", "c2")], t0())
        .unwrap();
    assert!(tx.already_processed("e0").unwrap());
    assert!(!tx.already_processed("e1").unwrap());
    tx.mark_processed("e1", t0()).unwrap();
    assert!(
        tx.already_processed("e1").unwrap(),
        "marked in this transaction"
    );
    let open = |tx: &mut Box<dyn Tx + '_>, customer: &str| {
        tx.open_instance(customer, "unsigned_loan", "a1")
            .unwrap()
            .map(|i| i.id)
    };
    assert_eq!(open(&mut tx, "c1").as_deref(), Some("i1"));
    assert_eq!(open(&mut tx, "c2"), None);
    assert_eq!(open(&mut tx, "c3"), None, "not prefetched: read");
    let mut c2 = tx.customer("c2", t0()).unwrap();
    assert!(c2.journeys.is_empty());
    c2.email = Some("c2@example.com".into());
    tx.save_customer(&c2, t0()).unwrap();
    assert_eq!(
        tx.customer("c2", t0()).unwrap().email.as_deref(),
        Some("c2@example.com")
    );
    tx.start_instance(&instance("i2", "c2", "a1"), &steps())
        .unwrap();
    assert_eq!(open(&mut tx, "c2").as_deref(), Some("i2"));
    let c2 = tx.customer("c2", t0()).unwrap();
    assert_eq!(c2.journeys.len(), 1);
    assert_eq!(c2.email.as_deref(), Some("c2@example.com"));
    tx.close_instance("i1", InstanceStatus::Converted, t0())
        .unwrap();
    assert_eq!(open(&mut tx, "c1"), None);
    assert_eq!(
        tx.customer("c1", t0()).unwrap().journeys[0].status,
        InstanceStatus::Converted
    );
    tx.commit().unwrap();

    let mut tx = store.begin().unwrap();
    assert!(tx.already_processed("e1").unwrap(), "written at commit");
    assert!(!tx.already_processed("e2").unwrap());
    assert_eq!(open(&mut tx, "c2").as_deref(), Some("i2"));
}

/// Claimers on several threads never get one step twice, and between them
/// get every step once.
pub fn concurrent_claimers_never_share_a_step(store: &dyn Store) {
    concurrent_claims(&[store, store, store], false);
}

/// Claims from `stores` on a thread each until nothing is due, settling each
/// batch as sent. With `exclusive_customers` (one store per replica), also
/// checks that no two replicas held one customer's steps at once. Every
/// customer has steps on two channels and two instances.
fn concurrent_claims(stores: &[&dyn Store], exclusive_customers: bool) {
    const CUSTOMERS: usize = 40;
    let mut tx = stores[0].begin().unwrap();
    for c in 0..CUSTOMERS {
        for key in ["a1", "a2"] {
            let plan: Vec<NewStep> = steps()
                .into_iter()
                .take(2)
                .map(|mut s| {
                    s.due_at = t0();
                    s
                })
                .collect();
            tx.start_instance(
                &instance(&format!("i{c}-{key}"), &format!("c{c}"), key),
                &plan,
            )
            .unwrap();
        }
    }
    tx.commit().unwrap();
    let holding: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    let seen: Mutex<HashSet<(String, String)>> = Mutex::new(HashSet::new());
    let violations: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for (replica, store) in stores.iter().enumerate() {
            for channel in [ChannelKind::Push, ChannelKind::Email] {
                let (holding, seen, violations) = (&holding, &seen, &violations);
                scope.spawn(move || loop {
                    let now = t0() + Duration::seconds(1);
                    let batch = store
                        .claim_due(channel, now, 3, now + Duration::minutes(5))
                        .unwrap();
                    if batch.is_empty() {
                        // Steps of customers another replica holds may still come.
                        if store.next_due(Some(channel)).unwrap().is_none() {
                            break;
                        }
                        std::thread::yield_now();
                        continue;
                    }
                    for d in &batch {
                        if !seen
                            .lock()
                            .unwrap()
                            .insert((d.instance_id.clone(), d.step.clone()))
                        {
                            violations
                                .lock()
                                .unwrap()
                                .push(format!("{}/{} claimed twice", d.instance_id, d.step));
                        }
                        if exclusive_customers {
                            let mut holding = holding.lock().unwrap();
                            let holder = holding.entry(d.customer.clone()).or_insert(replica);
                            if *holder != replica {
                                violations.lock().unwrap().push(format!(
                                    "{} held by replicas {holder} and {replica}",
                                    d.customer
                                ));
                            }
                        }
                    }
                    // Forgotten here before the store releases it, so that a
                    // replica taking the customer next is never a false alarm.
                    if exclusive_customers {
                        let mut holding = holding.lock().unwrap();
                        for d in &batch {
                            holding.remove(&d.customer);
                        }
                    }
                    let results = batch
                        .iter()
                        .map(|d| settle(d, now, Outcome::Sent))
                        .collect();
                    store.finish_steps(results).unwrap();
                });
            }
        }
    });
    let violations = violations.into_inner().unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(seen.into_inner().unwrap().len(), CUSTOMERS * 4);
    let counts = status_counts(stores[0]);
    assert_eq!(
        counts.get("sent"),
        Some(&(CUSTOMERS as i64 * 4)),
        "{counts:?}"
    );
    assert_eq!(stores[0].log_after(0, 1000).unwrap().len(), CUSTOMERS * 4);
}

// Several replicas on one database.

/// While one replica holds a customer's step, another claims none of the
/// customer's steps (on any channel), though the holder may claim more;
/// once the holder settles them, the customer is free.
pub fn a_customer_is_with_one_replica_at_a_time(a: &dyn Store, b: &dyn Store) {
    start(a, &[("i1", "c1", "a1"), ("i2", "c1", "a2")], &steps()[..2]);
    // c2's steps fall due an hour after c1's.
    let later: Vec<NewStep> = steps()[..2]
        .iter()
        .cloned()
        .map(|mut s| {
            s.due_at += Duration::hours(1);
            s
        })
        .collect();
    start(a, &[("i3", "c2", "a1")], &later);
    let now = t0() + Duration::days(1);
    let lease = now + Duration::minutes(5);
    let first = a.claim_due(ChannelKind::Push, now, 1, lease).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].customer, "c1", "the earliest due");
    let other = b.claim_due(ChannelKind::Push, now, 10, lease).unwrap();
    let customers: Vec<&str> = other.iter().map(|d| d.customer.as_str()).collect();
    assert_eq!(customers, ["c2"], "c1 is with replica a");
    assert_eq!(
        b.next_due(Some(ChannelKind::Push)).unwrap(),
        Some(lease),
        "b waits for a's hold on c1 to end, at the latest"
    );
    assert_eq!(
        a.next_due(Some(ChannelKind::Push)).unwrap(),
        Some(t0()),
        "a may claim c1's other step now"
    );
    assert!(b
        .claim_due(ChannelKind::Email, now, 10, lease)
        .unwrap()
        .iter()
        .all(|d| d.customer != "c1"));
    let more = a.claim_due(ChannelKind::Email, now, 10, lease).unwrap();
    assert_eq!(more.len(), 2, "the holder takes c1's other steps");
    let more_push = a.claim_due(ChannelKind::Push, now, 10, lease).unwrap();
    assert_eq!(more_push.len(), 1);
    // Settled one by one: c1 stays with a until its last claimed step settles.
    let held: Vec<DueStep> = first.into_iter().chain(more).chain(more_push).collect();
    for (i, d) in held.iter().enumerate() {
        a.finish_step(&settle(d, now, Outcome::Suppressed)).unwrap();
        if i + 1 < held.len() {
            let mut tx = a.begin().unwrap();
            tx.start_instance(
                &instance(&format!("late{i}"), "c1", &format!("k{i}")),
                &steps()[..1],
            )
            .unwrap();
            tx.commit().unwrap();
            assert!(
                b.claim_due(ChannelKind::Push, now, 10, lease)
                    .unwrap()
                    .is_empty(),
                "c1 still with a"
            );
        }
    }
    let freed = b.claim_due(ChannelKind::Push, now, 10, lease).unwrap();
    assert_eq!(freed.len(), held.len() - 1, "c1's new steps, now with b");
    assert!(freed.iter().all(|d| d.customer == "c1"));
}

/// A replica that dies holding claims: another takes them (and the
/// customers) once the lease has run out, not before; the dead one's late
/// heartbeat renews nothing, and its late hand-back undoes nothing.
pub fn abandoned_claims_are_taken_over_after_the_lease(a: &dyn Store, b: &dyn Store) {
    start(a, &[("i1", "c1", "a1"), ("i2", "c1", "a2")], &steps()[..1]);
    let lease = t0() + Duration::minutes(5);
    let held = a.claim_due(ChannelKind::Push, t0(), 1, lease).unwrap();
    assert_eq!(held.len(), 1);
    assert!(
        b.claim_due(ChannelKind::Push, lease, 10, lease + Duration::minutes(5))
            .unwrap()
            .is_empty(),
        "the lease has not run out"
    );
    let after = lease + Duration::seconds(1);
    let taken = b
        .claim_due(ChannelKind::Push, after, 10, after + Duration::minutes(5))
        .unwrap();
    assert_eq!(
        taken.len(),
        2,
        "the abandoned step and the customer's other one"
    );
    let retaken = taken.iter().find(|d| d.row == held[0].row).unwrap();
    assert_eq!(retaken.attempt, 1, "a's send never began: no attempt");
    assert_eq!(
        a.renew_claims(&[held[0].row], after + Duration::hours(1))
            .unwrap(),
        Vec::<i64>::new(),
        "no longer a's"
    );
    assert!(
        !a.claim_held(held[0].row, after).unwrap(),
        "taken over: not a's"
    );
    assert!(b.claim_held(held[0].row, after).unwrap(), "b's");
    a.release_claim(&held[0].instance_id, &held[0].step, None)
        .unwrap();
    assert_eq!(a.release_all_leases().unwrap(), 0);
    assert!(
        a.claim_due(ChannelKind::Push, after, 10, after + Duration::minutes(5))
            .unwrap()
            .is_empty(),
        "still b's"
    );
    // a was only stalled: its send went out, and it settles it late. b
    // holds the step now and records it; a's result is fenced off.
    let stale = a
        .settle_steps(&[settle(&held[0], after, Outcome::Sent)])
        .unwrap();
    assert_eq!(
        stale,
        [None],
        "settled by a replica that no longer holds it"
    );
    assert_eq!(a.log_after(0, 10).unwrap().len(), 0);
    let results = taken
        .iter()
        .map(|d| settle(d, after, Outcome::Sent))
        .collect();
    assert_eq!(b.finish_steps(results).unwrap().len(), 2);
    assert_eq!(status_counts(a).get("sent"), Some(&2));
    // Late again, after b settled it: still fenced off.
    let stale = a
        .settle_steps(&[settle(&held[0], after, Outcome::Failed)])
        .unwrap();
    assert_eq!(stale, [None]);
    let sent: Vec<_> = b
        .log_after(0, 10)
        .unwrap()
        .into_iter()
        .map(|r| (r.instance, r.outcome))
        .collect();
    assert_eq!(sent.len(), 2, "one record a step: {sent:?}");
    assert!(sent.iter().all(|(_, o)| *o == Outcome::Sent), "{sent:?}");
    let counted = b.propensity_counts(None).unwrap();
    assert_eq!(
        counted.iter().map(|c| c.sends).sum::<u64>(),
        2,
        "each send counted once"
    );
}

/// An idle replica is told when another's claim runs out, so that it wakes
/// then to take the step over, not at its idle bound; its own claims (which
/// it renews) do not wake it.
pub fn a_claim_running_out_wakes_the_other_replicas(a: &dyn Store, b: &dyn Store) {
    start(a, &[("i1", "c1", "a1")], &steps()[..1]);
    let lease = t0() + Duration::minutes(5);
    let held = a.claim_due(ChannelKind::Push, t0(), 10, lease).unwrap();
    assert_eq!(held.len(), 1);
    let wake = b.next_due(Some(ChannelKind::Push)).unwrap();
    assert!(
        wake.is_some_and(|t| t >= lease && t <= lease + Duration::seconds(1)),
        "b wakes when a's lease ends: {wake:?}"
    );
    assert_eq!(a.next_due(Some(ChannelKind::Push)).unwrap(), None);
    assert_eq!(b.next_due(Some(ChannelKind::Email)).unwrap(), None);
    let results = held
        .iter()
        .map(|d| settle(d, t0(), Outcome::Sent))
        .collect();
    a.finish_steps(results).unwrap();
    assert_eq!(b.next_due(Some(ChannelKind::Push)).unwrap(), None);
}

/// Two consumers moving one partition from the same offset at once (a
/// replica that lost the partition without knowing it yet, and its new
/// owner): one commits, the other is told the offset moved, whether the
/// store held none yet or one both expected.
pub fn two_consumers_cannot_both_move_a_partition_from_one_offset(a: &dyn Store, b: &dyn Store) {
    let mut expected = 0;
    for round in 0..10 {
        let barrier = std::sync::Barrier::new(2);
        let results: Vec<(i64, Result<(), StoreError>)> = std::thread::scope(|scope| {
            let runs: Vec<_> = [(a, 1), (b, 2)]
                .into_iter()
                .map(|(store, step)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        let next = expected + 10 * step;
                        let mut tx = store.begin().unwrap();
                        tx.mark_processed(&format!("race-{round}-{step}"), t0())
                            .unwrap();
                        barrier.wait();
                        let result = tx
                            .set_offset("events", 0, expected, next)
                            .and_then(|()| tx.commit());
                        (next, result)
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let won: Vec<i64> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(next, _)| *next)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        let lost = results.iter().find(|(_, r)| r.is_err()).unwrap();
        assert!(
            matches!(&lost.1, Err(StoreError::OffsetMoved { expected: e, .. }) if *e == expected),
            "round {round}: {results:?}"
        );
        assert_eq!(a.offsets("events").unwrap(), [(0, won[0])]);
        expected = won[0];
    }
}

/// With a cap of one send per customer, replicas sending at once send one
/// message, never two: each decides from the sends it read when it claimed.
pub fn caps_hold_across_replicas(a: &dyn Store, b: &dyn Store) {
    const CUSTOMERS: usize = 20;
    let mut tx = a.begin().unwrap();
    for c in 0..CUSTOMERS {
        for key in ["a1", "a2", "a3"] {
            tx.start_instance(
                &instance(&format!("i{c}-{key}"), &format!("c{c}"), key),
                &steps()[..1],
            )
            .unwrap();
        }
    }
    tx.commit().unwrap();
    let now = t0() + Duration::seconds(1);
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        for store in [a, b] {
            let barrier = &barrier;
            scope.spawn(move || {
                barrier.wait();
                loop {
                    let batch = store
                        .claim_due(ChannelKind::Push, now, 4, now + Duration::minutes(5))
                        .unwrap();
                    if batch.is_empty() {
                        if store.next_due(None).unwrap().is_none() {
                            break;
                        }
                        std::thread::yield_now();
                        continue;
                    }
                    let ids: Vec<String> = batch.iter().map(|d| d.customer.clone()).collect();
                    let contexts = store.customers(&ids, Some(t0()), false).unwrap();
                    let mut sent_now: HashSet<&str> = HashSet::new();
                    let results = batch
                        .iter()
                        .zip(&contexts)
                        .map(|(d, c)| {
                            let capped =
                                !c.recent_sends.is_empty() || !sent_now.insert(&d.customer);
                            let outcome = match capped {
                                true => Outcome::Suppressed,
                                false => Outcome::Sent,
                            };
                            settle(d, now, outcome)
                        })
                        .collect();
                    store.finish_steps(results).unwrap();
                }
            });
        }
    });
    let log = a.log_after(0, 1000).unwrap();
    assert_eq!(log.len(), CUSTOMERS * 3);
    let mut sends: HashMap<&str, usize> = HashMap::new();
    for r in log.iter().filter(|r| r.outcome == Outcome::Sent) {
        *sends.entry(&r.customer).or_default() += 1;
    }
    assert_eq!(sends.len(), CUSTOMERS);
    assert!(sends.values().all(|&n| n == 1), "{sends:?}");
}

/// Replicas claiming at once from the same steps: none shared, none lost,
/// and a customer with one replica at a time.
pub fn concurrent_replicas_never_share_a_step_or_a_customer(a: &dyn Store, b: &dyn Store) {
    concurrent_claims(&[a, b], true);
}

/// Each dead letter goes to one replica's publisher at a time: claimed by
/// one, it is not handed to the other until the claim runs out, and once
/// published to neither.
pub fn a_dead_letter_is_published_by_one_replica(a: &dyn Store, b: &dyn Store) {
    let mut tx = a.begin().unwrap();
    for offset in 0..4 {
        let letter = DeadLetter {
            topic: "events".into(),
            partition: 0,
            offset,
            key: None,
            payload: b"x".to_vec(),
            reason: "bad".into(),
            journey: None,
            event_id: None,
            headers: Vec::new(),
        };
        tx.add_dead_letter(&letter, t0()).unwrap();
    }
    tx.commit().unwrap();
    let minute = Duration::minutes(1);
    let first = a.claim_dead_letters(3, 100, t0(), t0() + minute).unwrap();
    let second = b.claim_dead_letters(10, 100, t0(), t0() + minute).unwrap();
    let offsets = |l: &[ClaimedDeadLetter]| l.iter().map(|c| c.letter.offset).collect::<Vec<_>>();
    assert_eq!(offsets(&first), vec![0, 1, 2], "oldest first");
    assert_eq!(
        offsets(&second),
        vec![3],
        "only what the other does not hold"
    );
    assert!(a
        .claim_dead_letters(10, 100, t0(), t0() + minute)
        .unwrap()
        .is_empty());
    // `b` published its letter; `a` published two and died: its claim on
    // the third runs out and `b` takes it.
    b.mark_dead_letters_published(&[second[0].id], t0())
        .unwrap();
    a.mark_dead_letters_published(&[first[0].id, first[1].id], t0())
        .unwrap();
    let later = t0() + minute + Duration::seconds(1);
    let retaken = b
        .claim_dead_letters(10, 100, later, later + minute)
        .unwrap();
    assert_eq!(offsets(&retaken), vec![2]);
}

/// Withdrawal: an exit plans, once, a `<step>:withdraw` row for each step
/// delivered on a withdrawing channel, due at the exit; claimed like a
/// step (with its instance's end), it settles as `withdrawn`.
pub fn exits_plan_withdrawals_of_delivered_steps(store: &dyn Store) {
    start(store, &[("i1", "c1", "a1")], &steps());
    let lease = |t: DateTime<Utc>| t + Duration::minutes(5);
    for (channel, at) in [
        (ChannelKind::Push, t0()),
        (ChannelKind::CallTask, t0() + Duration::days(3)),
    ] {
        let claimed = store.claim_due(channel, at, 10, lease(at)).unwrap();
        assert_eq!(claimed.len(), 1, "{channel}");
        store
            .finish_step(&settle(&claimed[0], at, Outcome::Sent))
            .unwrap();
    }
    let exit = t0() + Duration::days(4);
    let mut tx = store.begin().unwrap();
    tx.close_instance("i1", InstanceStatus::Converted, exit)
        .unwrap();
    let planned = tx
        .plan_withdrawals("i1", &[ChannelKind::CallTask, ChannelKind::Email], exit)
        .unwrap();
    assert_eq!(planned, ["call"], "the email was never delivered");
    assert!(tx
        .plan_withdrawals("i1", &[ChannelKind::CallTask], exit)
        .unwrap()
        .is_empty());
    tx.commit().unwrap();
    assert_eq!(
        store.next_due(Some(ChannelKind::CallTask)).unwrap(),
        Some(exit)
    );
    assert!(store
        .claim_due(ChannelKind::Push, exit, 10, lease(exit))
        .unwrap()
        .is_empty());
    let claimed = store
        .claim_due(ChannelKind::CallTask, exit, 10, lease(exit))
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let w = &claimed[0];
    assert_eq!(
        (w.step.as_str(), w.template.as_str(), w.attempt),
        ("call:withdraw", "t_call", 1)
    );
    assert_eq!(w.instance_status, InstanceStatus::Converted);
    assert_eq!(w.planned_at, exit);
    store
        .finish_step(&settle(w, exit, Outcome::Withdrawn))
        .unwrap();
    let counts = status_counts(store);
    assert_eq!(counts.get("withdrawn"), Some(&1), "{counts:?}");
    let log = store.log_after(0, 10).unwrap();
    assert_eq!(log.last().unwrap().outcome, Outcome::Withdrawn);
    assert!(store
        .claim_due(ChannelKind::CallTask, exit, 10, lease(exit))
        .unwrap()
        .is_empty());

    // A push delivered by its fallback, email, is withdrawn on email.
    start(store, &[("i2", "c2", "a2")], &steps()[..1]);
    let claimed = store
        .claim_due(ChannelKind::Push, exit, 10, lease(exit))
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let mut by_email = settle(&claimed[0], exit, Outcome::Sent);
    by_email.record.channel = "email".into();
    store.finish_step(&by_email).unwrap();
    let mut tx = store.begin().unwrap();
    tx.close_instance("i2", InstanceStatus::Converted, exit)
        .unwrap();
    assert!(tx
        .plan_withdrawals("i2", &[ChannelKind::Push], exit)
        .unwrap()
        .is_empty());
    assert_eq!(
        tx.plan_withdrawals("i2", &[ChannelKind::Email], exit)
            .unwrap(),
        ["push"]
    );
    tx.commit().unwrap();
    let claimed = store
        .claim_due(ChannelKind::Email, exit, 10, lease(exit))
        .unwrap();
    assert_eq!(
        claimed.iter().map(|d| d.step.as_str()).collect::<Vec<_>>(),
        ["push:withdraw"]
    );
}

/// A call task whose attempt timed out may have reached the agents' queue
/// though its answer did not come back: when the customer signs before the
/// retry goes, it is withdrawn all the same, once. One whose attempt was
/// refused (a 503: nothing was taken) is not.
pub fn an_attempt_that_timed_out_is_withdrawn_at_the_exit(store: &dyn Store) {
    let call = &steps()[2..];
    start(store, &[("i5", "c5", "a5"), ("i6", "c6", "a6")], call);
    let due = t0() + Duration::days(3);
    let claimed = store
        .claim_due(ChannelKind::CallTask, due, 10, due + Duration::minutes(5))
        .unwrap();
    assert_eq!(claimed.len(), 2);
    for step in &claimed {
        let reason = match step.instance_id.as_str() {
            "i5" => "timed out (the receiver may have it); attempt 1 of 8, next in 2s",
            _ => "unavailable: HTTP 503; attempt 1 of 8, next in 2s",
        };
        let mut retry = settle(step, due, Outcome::Retrying);
        retry.record.reason = reason.into();
        retry.again_at = Some(due + Duration::seconds(2));
        store.finish_step(&retry).unwrap();
    }
    let exit = due + Duration::seconds(1);
    let mut tx = store.begin().unwrap();
    for id in ["i5", "i6"] {
        tx.close_instance(id, InstanceStatus::Converted, exit)
            .unwrap();
    }
    assert_eq!(
        tx.plan_withdrawals("i5", &[ChannelKind::CallTask], exit)
            .unwrap(),
        ["call"],
        "the timed-out attempt may have landed"
    );
    assert!(tx
        .plan_withdrawals("i5", &[ChannelKind::CallTask], exit)
        .unwrap()
        .is_empty());
    assert!(
        tx.plan_withdrawals("i6", &[ChannelKind::CallTask], exit)
            .unwrap()
            .is_empty(),
        "a refused attempt left nothing to take back"
    );
    tx.commit().unwrap();
    let claimed = store
        .claim_due(ChannelKind::CallTask, exit, 10, exit + Duration::minutes(5))
        .unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|d| (d.instance_id.as_str(), d.step.as_str()))
            .collect::<Vec<_>>(),
        [("i5", "call:withdraw")]
    );
}

/// A send begun by a worker that died may have landed: when an exit ends
/// its journey, it is withdrawn, whether the exit finds its claim handed
/// back (and cancels it) or still held (the claim is taken over after the
/// lease, told that a send had begun, and settled with a withdrawal). A
/// claim whose send never began is taken over as never begun.
pub fn a_send_begun_by_a_dead_worker_is_withdrawn_at_the_exit(store: &dyn Store) {
    let call = &steps()[2..];
    let due = t0() + Duration::days(3);
    let lease = due + Duration::minutes(5);
    // The steps due now, claimed and settled as sent.
    let withdrawals = |at: DateTime<Utc>| -> Vec<(String, String)> {
        let due = store
            .claim_due(ChannelKind::CallTask, at, 10, at + Duration::minutes(5))
            .unwrap();
        let results = due
            .iter()
            .map(|d| settle(d, at, Outcome::Withdrawn))
            .collect();
        store.finish_steps(results).unwrap();
        due.into_iter().map(|d| (d.instance_id, d.step)).collect()
    };
    // The exit comes while the dead worker's claims are held: i8's send had
    // begun, i9's had not.
    start(store, &[("i8", "c8", "a8"), ("i9", "c9", "a9")], call);
    let claimed = store
        .claim_due(ChannelKind::CallTask, due, 10, lease)
        .unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|d| !d.begun_before));
    let i8 = claimed.iter().find(|d| d.instance_id == "i8").unwrap();
    store.mark_sending(&[i8.row], due).unwrap();
    let exit = due + Duration::seconds(1);
    let mut tx = store.begin().unwrap();
    for id in ["i8", "i9"] {
        tx.close_instance(id, InstanceStatus::Converted, exit)
            .unwrap();
        assert!(
            tx.plan_withdrawals(id, &[ChannelKind::CallTask], exit)
                .unwrap()
                .is_empty(),
            "still claimed: its worker may yet say how it went"
        );
    }
    tx.commit().unwrap();
    let after = lease + Duration::seconds(1);
    let taken = store
        .claim_due(
            ChannelKind::CallTask,
            after,
            10,
            after + Duration::minutes(5),
        )
        .unwrap();
    let begun: Vec<(&str, bool, InstanceStatus)> = taken
        .iter()
        .map(|d| (d.instance_id.as_str(), d.begun_before, d.instance_status))
        .collect();
    assert_eq!(
        begun,
        [
            ("i8", true, InstanceStatus::Converted),
            ("i9", false, InstanceStatus::Converted)
        ]
    );
    let results = taken
        .iter()
        .map(|d| StepResult {
            withdraw_if_ended: d.begun_before,
            ..settle(d, after, Outcome::Converted)
        })
        .collect();
    assert_eq!(store.finish_steps(results).unwrap().len(), 2);
    assert_eq!(
        withdrawals(after),
        [("i8".to_string(), format!("call{WITHDRAW_SUFFIX}"))]
    );
    // The worker died and its claim was handed back at start; the exit
    // then cancels the step, and withdraws it, as the send had begun.
    start(store, &[("i7", "c7", "a7")], call);
    let claimed = store
        .claim_due(
            ChannelKind::CallTask,
            after,
            10,
            after + Duration::minutes(5),
        )
        .unwrap();
    assert_eq!(claimed.len(), 1);
    store.mark_sending(&[claimed[0].row], after).unwrap();
    assert_eq!(store.release_all_leases().unwrap(), 1);
    let exit = after + Duration::seconds(1);
    let mut tx = store.begin().unwrap();
    tx.close_instance("i7", InstanceStatus::Converted, exit)
        .unwrap();
    assert_eq!(
        tx.plan_withdrawals("i7", &[ChannelKind::CallTask], exit)
            .unwrap(),
        ["call"],
        "its send had begun: the receiver may have it"
    );
    assert!(
        tx.plan_withdrawals("i7", &[ChannelKind::Email], exit)
            .unwrap()
            .is_empty(),
        "only on the channels that withdraw"
    );
    tx.commit().unwrap();
    assert_eq!(
        withdrawals(exit),
        [("i7".to_string(), format!("call{WITHDRAW_SUFFIX}"))]
    );
}

/// A call task still being sent when the customer signs: the exit sees it
/// claimed, not sent, so plans nothing; the delivery lands after it and
/// its settle plans the withdrawal, in its own transaction. A delivery of
/// an open journey, or one not asking for it, plans none.
pub fn a_delivery_landing_after_its_exit_is_withdrawn(store: &dyn Store) {
    start(
        store,
        &[("i1", "c1", "a1"), ("i2", "c2", "a2"), ("i3", "c3", "a3")],
        &steps(),
    );
    let at = t0() + Duration::days(3);
    let lease = at + Duration::minutes(5);
    let mut claimed = store
        .claim_due(ChannelKind::CallTask, at, 10, lease)
        .unwrap();
    claimed.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    assert_eq!(claimed.len(), 3);
    let exit = at + Duration::seconds(1);
    let mut tx = store.begin().unwrap();
    for (id, status) in [
        ("i1", InstanceStatus::Converted),
        ("i3", InstanceStatus::Cancelled),
    ] {
        tx.close_instance(id, status, exit).unwrap();
        assert!(
            tx.plan_withdrawals(id, &[ChannelKind::CallTask], exit)
                .unwrap()
                .is_empty(),
            "{id}: nothing delivered yet"
        );
    }
    tx.commit().unwrap();
    let landed = exit + Duration::seconds(2);
    let results: Vec<StepResult> = claimed
        .iter()
        .map(|d| StepResult {
            withdraw_if_ended: d.instance_id != "i3",
            ..settle(d, landed, Outcome::Sent)
        })
        .collect();
    store.settle_steps(&results).unwrap();
    assert_eq!(
        store.next_due(Some(ChannelKind::CallTask)).unwrap(),
        Some(landed)
    );
    let again = store
        .claim_due(
            ChannelKind::CallTask,
            landed,
            10,
            landed + Duration::minutes(5),
        )
        .unwrap();
    let planned: Vec<_> = again
        .iter()
        .map(|d| (d.instance_id.as_str(), d.step.as_str(), d.instance_status))
        .collect();
    assert_eq!(
        planned,
        [("i1", "call:withdraw", InstanceStatus::Converted)]
    );
    assert_eq!(again[0].planned_at, landed);
    assert_eq!(again[0].template, "t_call");
}

// Audit stream (`store::audit`).

/// Log records written while the outbox is on (by the scheduler's batch and
/// by an event's transaction) wait in it in log order until deleted; a
/// rolled-back record leaves no row; nothing is queued while it is off;
/// purged log records come back as `None` rather than vanishing.
pub fn audit_outbox_follows_the_log_in_its_transaction(store: &dyn Store) {
    let record = |c: &str, i: &str| push_record(t0(), c, i, "t", Outcome::Suppressed, "cap");
    let mut tx = store.begin().unwrap();
    tx.append_log(&record("c0", "i0")).unwrap();
    tx.commit().unwrap();
    assert_eq!(store.audit_backlog().unwrap(), 0, "off: nothing queued");

    store.set_audit_outbox(true).unwrap();
    let mut tx = store.begin().unwrap();
    tx.append_log(&record("c1", "i1")).unwrap();
    tx.append_log(&record("c2", "i2")).unwrap();
    tx.commit().unwrap();
    let mut tx = store.begin().unwrap();
    tx.append_log(&record("c9", "rolled back")).unwrap();
    drop(tx);
    start(store, &[("i3", "c3", "a1")], &steps()[..1]);
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
        .unwrap();
    let written = store
        .finish_steps(vec![settle(&claimed[0], t0(), Outcome::Sent)])
        .unwrap();
    assert_eq!(store.audit_backlog().unwrap(), 3);

    let until = t0() + Duration::minutes(1);
    let out = store.claim_audit_records(10, t0(), until).unwrap();
    let customers: Vec<&str> = out.iter().map(|a| a.customer.as_str()).collect();
    assert_eq!(customers, ["c1", "c2", "c3"]);
    assert!(out.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(out[2].record.as_ref(), Some(&written[0]));
    assert!(out
        .iter()
        .all(|a| a.record.as_ref().map(|r| r.seq) == Some(a.seq)));
    assert_eq!(store.claim_audit_records(2, t0(), until).unwrap().len(), 2);

    store
        .delete_audit_records(&[out[0].seq, out[1].seq])
        .unwrap();
    assert_eq!(store.audit_backlog().unwrap(), 1);
    let left = store.claim_audit_records(10, t0(), until).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, out[2].seq);

    // An outage longer than retention: the record is gone, the row says so.
    store.purge(t0() + Duration::days(1)).unwrap();
    let left = store.claim_audit_records(10, t0(), until).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].record, None);
    store.delete_audit_records(&[left[0].seq]).unwrap();

    store.set_audit_outbox(false).unwrap();
    let mut tx = store.begin().unwrap();
    tx.append_log(&record("c4", "i4")).unwrap();
    tx.commit().unwrap();
    assert_eq!(store.audit_backlog().unwrap(), 0);
}

/// One publisher at a time: a second replica gets nothing until the
/// first one's lease runs out, so one customer's records never race.
pub fn audit_outbox_is_published_by_one_replica_at_a_time(a: &dyn Store, b: &dyn Store) {
    a.set_audit_outbox(true).unwrap();
    let mut tx = b.begin().unwrap();
    tx.append_log(&push_record(t0(), "c1", "i1", "t", Outcome::Sent, ""))
        .unwrap();
    tx.commit().unwrap();
    let until = t0() + Duration::seconds(30);
    assert_eq!(a.claim_audit_records(10, t0(), until).unwrap().len(), 1);
    assert!(b.claim_audit_records(10, t0(), until).unwrap().is_empty());
    assert_eq!(
        a.claim_audit_records(10, t0(), until).unwrap().len(),
        1,
        "renewed"
    );
    let later = until + Duration::seconds(1);
    let taken = b
        .claim_audit_records(10, later, later + Duration::seconds(30))
        .unwrap();
    assert_eq!(taken.len(), 1, "the lease ran out: taken over");
    assert!(a.claim_audit_records(10, later, later).unwrap().is_empty());
}

/// Arbitration's look-ahead: the pending steps of open instances of the
/// customers asked, due by `until`, soonest first, with their journey's
/// fields; claimed, settled and later steps, other customers' steps and
/// ended instances' steps are left out; nothing is claimed by the read.
pub fn upcoming_steps_are_the_customers_pending_steps_due_soon(store: &dyn Store) {
    let mut tx = store.begin().unwrap();
    let mut loan = instance("i1", "c1", "a1");
    loan.vars.insert("amount".into(), Value::from(5000));
    tx.start_instance(&loan, &steps()).unwrap();
    let mut fee = instance("i2", "c1", "p1");
    fee.journey = "fee_increase".into();
    fee.category = Category::Marketing;
    let soon = NewStep {
        step: "alert".into(),
        seq: 0,
        channel: ChannelKind::Push,
        template: "t_alert".into(),
        condition: Some("worth_it".into()),
        due_at: t0() + Duration::minutes(5),
    };
    tx.start_instance(&fee, std::slice::from_ref(&soon))
        .unwrap();
    tx.start_instance(&instance("i3", "c2", "a3"), &steps())
        .unwrap();
    tx.start_instance(&instance("i4", "c3", "a4"), &steps())
        .unwrap();
    tx.commit().unwrap();
    let mut tx = store.begin().unwrap();
    tx.close_instance("i4", InstanceStatus::Converted, t0())
        .unwrap();
    tx.commit().unwrap();

    let until = t0() + Duration::minutes(10);
    let customers = ["c1".to_string(), "c3".to_string()];
    let found = store.upcoming_steps(&customers, until).unwrap();
    let keys: Vec<(&str, &str, ChannelKind)> = found
        .iter()
        .map(|s| (s.instance_id.as_str(), s.step.as_str(), s.channel))
        .collect();
    assert_eq!(
        keys,
        [
            ("i1", "push", ChannelKind::Push),
            ("i2", "alert", ChannelKind::Push)
        ]
    );
    let alert = &found[1];
    assert_eq!(alert.journey, "fee_increase");
    assert_eq!(alert.category, Category::Marketing);
    assert_eq!(alert.customer, "c1");
    assert_eq!(alert.due_at, t0() + Duration::minutes(5));
    assert_eq!(alert.condition.as_deref(), Some("worth_it"));
    assert_eq!(alert.instance_status, InstanceStatus::Open);
    assert_eq!(
        found[0].vars.to_map().get("amount"),
        Some(&Value::from(5000))
    );

    // A claimed step is another worker's to decide: not listed, and the
    // read claimed nothing (the alert is still there to claim).
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
        .unwrap();
    assert_eq!(claimed.len(), 2, "c1's and c2's push, due now");
    let found = store.upcoming_steps(&customers, until).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].step, "alert");
    assert!(store.upcoming_steps(&[], until).unwrap().is_empty());
}

/// Runtime control: overrides replace per target, an edit sees the
/// settings in force, an empty override is removed, and every change is
/// in the control log, in order, by time.
pub fn control_overrides_and_log_round_trip(store: &dyn Store) {
    use crate::store::control::{ControlChange, ControlEdit};
    use serde_json::json;

    assert!(store.control_overrides().unwrap().is_empty());
    assert!(store.control_log(None, None, 10).unwrap().is_empty());
    // The edit the control module makes, reduced: merge, log the override.
    fn merge(patch: Value) -> impl Fn(&Map<String, Value>) -> ControlEdit + Sync {
        move |current: &Map<String, Value>| {
            let mut next = current.clone();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    next.remove(k);
                } else {
                    next.insert(k.clone(), v.clone());
                }
            }
            ControlEdit {
                before: Value::Object(current.clone()),
                after: Value::Object(next.clone()),
                settings: next,
            }
        }
    }
    let change = |kind: &str, target: &str, minutes: i64, patch: Value| {
        store
            .change_control(&ControlChange {
                kind,
                target,
                who: "admin",
                at: t0() + Duration::minutes(minutes),
                edit: &merge(patch),
            })
            .unwrap()
    };
    let e1 = change("journey", "unsigned_loan", 0, json!({"shadow": true}));
    assert_eq!(
        (e1.before.clone(), e1.after.clone()),
        (json!({}), json!({"shadow": true}))
    );
    let e2 = change("channel", "push", 1, json!({"enabled": false}));
    let e3 = change("journey", "unsigned_loan", 2, json!({"pilot_percent": 10}));
    assert_eq!(
        e3.before,
        json!({"shadow": true}),
        "the edit sees the change before it"
    );
    assert_eq!(e3.after, json!({"shadow": true, "pilot_percent": 10}));
    assert!(e1.seq < e2.seq && e2.seq < e3.seq);

    let rows = store.control_overrides().unwrap();
    let view: Vec<(String, String, Value, DateTime<Utc>, String)> = rows
        .into_iter()
        .map(|r| {
            (
                r.kind,
                r.target,
                Value::Object(r.settings),
                r.updated_at,
                r.updated_by,
            )
        })
        .collect();
    assert_eq!(
        view,
        vec![
            (
                "channel".into(),
                "push".into(),
                json!({"enabled": false}),
                t0() + Duration::minutes(1),
                "admin".into()
            ),
            (
                "journey".into(),
                "unsigned_loan".into(),
                json!({"shadow": true, "pilot_percent": 10}),
                t0() + Duration::minutes(2),
                "admin".into()
            ),
        ]
    );

    // Clearing every field removes the override; the log keeps it all.
    let e4 = change(
        "journey",
        "unsigned_loan",
        3,
        json!({"shadow": null, "pilot_percent": null}),
    );
    assert_eq!(e4.after, json!({}));
    let rows = store.control_overrides().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].target, "push");

    let all = store.control_log(None, None, 100).unwrap();
    assert_eq!(all, vec![e1.clone(), e2.clone(), e3.clone(), e4.clone()]);
    assert_eq!(all[1].who, "admin");
    assert_eq!(all[1].kind, "channel");
    assert_eq!(all[1].time, t0() + Duration::minutes(1));
    // By time: since is inclusive, until exclusive.
    let window = store
        .control_log(
            Some(t0() + Duration::minutes(1)),
            Some(t0() + Duration::minutes(2)),
            100,
        )
        .unwrap();
    assert_eq!(window, vec![e2]);
    // A limit keeps the newest, still in order.
    assert_eq!(store.control_log(None, None, 2).unwrap(), vec![e3, e4]);
}

// Propensity (`crate::propensity`).

fn counts_of(store: &dyn Store, journey: Option<&str>) -> Vec<(String, String, u64, u64)> {
    store
        .propensity_counts(journey)
        .unwrap()
        .into_iter()
        .map(|c| (c.step, c.channel, c.sends, c.conversions))
        .collect()
}

fn count(step: &str, channel: &str, sends: u64, conversions: u64) -> (String, String, u64, u64) {
    (step.into(), channel.into(), sends, conversions)
}

/// A send counts once, when the step settles `sent` (on the channel it went
/// out on: a fallback's), not when it is retried or refused; a conversion
/// credits each step of the instance sent within the window before the
/// exit, in the exit's transaction (rolled back with it); retention keeps
/// the counts.
pub fn propensity_counts_sends_and_conversions_within_the_window(store: &dyn Store) {
    start(
        store,
        &[("i1", "c1", "a1"), ("i2", "c2", "a1")],
        &steps()[..2],
    );
    let lease = |t: DateTime<Utc>| t + Duration::minutes(5);
    let pushes = store
        .claim_due(ChannelKind::Push, t0(), 10, lease(t0()))
        .unwrap();
    assert_eq!(pushes.len(), 2);
    // A retry first: not a send.
    let mut retry = settle(&pushes[0], t0(), Outcome::Retrying);
    retry.again_at = Some(t0() + Duration::minutes(1));
    store.finish_step(&retry).unwrap();
    store
        .finish_step(&settle(&pushes[1], t0(), Outcome::Sent))
        .unwrap();
    let again = t0() + Duration::minutes(1);
    let retried = store
        .claim_due(ChannelKind::Push, again, 10, lease(again))
        .unwrap();
    assert_eq!(retried.len(), 1);
    store
        .finish_step(&settle(&retried[0], again, Outcome::Sent))
        .unwrap();
    assert_eq!(counts_of(store, None), [count("push", "push", 2, 0)]);

    // Day 1: i1's email goes out on its fallback (push); i2's is refused.
    let day1 = t0() + Duration::days(1);
    let emails = store
        .claim_due(ChannelKind::Email, day1, 10, lease(day1))
        .unwrap();
    assert_eq!(emails.len(), 2);
    let (e1, e2) = match emails[0].instance_id.as_str() {
        "i1" => (&emails[0], &emails[1]),
        _ => (&emails[1], &emails[0]),
    };
    let mut fallback = settle(e1, day1, Outcome::Sent);
    fallback.record.channel = "push".into();
    store
        .finish_steps(vec![fallback, settle(e2, day1, Outcome::Suppressed)])
        .unwrap();
    assert_eq!(
        counts_of(store, None),
        [count("email", "push", 1, 0), count("push", "push", 2, 0)]
    );

    // i1 converts on day 5 with a 4-day window: only its email is credited.
    let exit = t0() + Duration::days(5);
    let mut tx = store.begin().unwrap();
    tx.close_instance("i1", InstanceStatus::Converted, exit)
        .unwrap();
    assert_eq!(
        tx.credit_conversion("i1", exit - Duration::days(4), exit)
            .unwrap(),
        1
    );
    tx.commit().unwrap();
    assert_eq!(
        counts_of(store, None),
        [count("email", "push", 1, 1), count("push", "push", 2, 0)]
    );

    // A rolled-back exit credits nothing.
    {
        let mut tx = store.begin().unwrap();
        assert_eq!(
            tx.credit_conversion("i2", t0() - Duration::days(30), exit)
                .unwrap(),
            1
        );
    }
    assert_eq!(counts_of(store, None)[1], count("push", "push", 2, 0));

    // i2 converts within the window: its push (its email was never sent).
    let mut tx = store.begin().unwrap();
    assert_eq!(
        tx.credit_conversion("i2", exit - Duration::days(30), exit)
            .unwrap(),
        1
    );
    tx.commit().unwrap();
    // Sent after the exit: not what converted the customer.
    let mut tx = store.begin().unwrap();
    assert_eq!(
        tx.credit_conversion("i1", t0() - Duration::days(1), t0() - Duration::hours(1))
            .unwrap(),
        0
    );
    tx.commit().unwrap();
    let all = [count("email", "push", 1, 1), count("push", "push", 2, 1)];
    assert_eq!(counts_of(store, None), all);
    assert_eq!(counts_of(store, Some("unsigned_loan")), all);
    assert!(counts_of(store, Some("fee_increase")).is_empty());

    // Retention purges the log and the instances, never the counts.
    assert!(store.purge(t0() + Duration::days(400)).unwrap() > 0);
    assert_eq!(counts_of(store, None), all);
}

/// Replicas: an exit's transaction that credits a conversion holds no
/// counter while it goes on, so a replica settling a send of the same
/// journey, step and channel (which counts it) is not left waiting for it
/// while holding the instance the exit then ends. Before, PostgreSQL broke
/// the cycle by failing one of them (deadlock, 40P01). `waiting_on_a_lock`
/// tells whether a session of the store waits on another's lock.
pub fn a_conversion_holds_no_counter_a_settle_needs(
    store: &dyn Store,
    waiting_on_a_lock: &dyn Fn() -> bool,
) {
    start(
        store,
        &[("i1", "c1", "a1"), ("i2", "c2", "a1")],
        &steps()[..1],
    );
    let claimed = store
        .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
        .unwrap();
    let of = |id: &str| claimed.iter().find(|s| s.instance_id == id).unwrap();
    store
        .finish_step(&settle(of("i1"), t0(), Outcome::Sent))
        .unwrap();
    let exit = t0() + Duration::hours(1);
    let mut tx = store.begin().unwrap();
    tx.close_instance("i1", InstanceStatus::Converted, exit)
        .unwrap();
    assert_eq!(
        tx.credit_conversion("i1", exit - Duration::days(7), exit)
            .unwrap(),
        1
    );
    std::thread::scope(|s| {
        let settling = s.spawn(|| store.finish_step(&settle(of("i2"), t0(), Outcome::Sent)));
        while !settling.is_finished() && !waiting_on_a_lock() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let closed = tx.close_instance("i2", InstanceStatus::Converted, exit);
        let settled = settling.join().unwrap();
        assert!(settled.is_ok(), "the settle: {settled:?}");
        assert!(closed.is_ok(), "the exit: {:?}", closed.err());
    });
    tx.commit().unwrap();
    assert_eq!(counts_of(store, None), [count("push", "push", 2, 1)]);
}

/// The counts are in the store, not in the process: a store opened again
/// (a restart, or another replica) reads what the first one counted.
/// `open` opens the same database each time.
pub fn propensity_counts_survive_a_restart(open: &dyn Fn() -> Box<dyn Store>) {
    {
        let store = open();
        start(&*store, &[("i1", "c1", "a1")], &steps()[..1]);
        let claimed = store
            .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
            .unwrap();
        store
            .finish_step(&settle(&claimed[0], t0(), Outcome::Sent))
            .unwrap();
        let exit = t0() + Duration::hours(3);
        let mut tx = store.begin().unwrap();
        tx.close_instance("i1", InstanceStatus::Converted, exit)
            .unwrap();
        tx.credit_conversion("i1", exit - Duration::days(7), exit)
            .unwrap();
        tx.commit().unwrap();
    }
    let store = open();
    assert_eq!(counts_of(&*store, None), [count("push", "push", 1, 1)]);
}

/// The decision record's writes: received events per customer, in the
/// transaction of their effects (gone with a rollback), read back oldest
/// first, purged by retention; and an attempt's HTTP status and response
/// time on its log record.
pub fn received_events_and_attempt_answers_round_trip(store: &dyn Store) {
    let event = |id: &str, customer: &str, at: DateTime<Utc>| ReceivedEvent {
        event_id: id.into(),
        customer: customer.into(),
        event_type: "loan_unsigned".into(),
        event_time: at - Duration::seconds(1),
        received_at: at,
        context_updated: false,
        not_started: Vec::new(),
        refused: None,
        ended_nothing: Vec::new(),
    };
    let old = t0() - Duration::days(30);
    let first = ReceivedEvent {
        context_updated: true,
        event_type: "contact_updated".into(),
        ..event("e-old", "c1", old)
    };
    let second = ReceivedEvent {
        not_started: vec![
            NotStarted {
                journey: "unsigned_loan".into(),
                rule_hash: "h1".into(),
                why: NotStartedWhy::Skip,
                reason: "amount below 1000".into(),
            },
            NotStarted {
                journey: "fee_refund".into(),
                rule_hash: "h2".into(),
                why: NotStartedWhy::Pilot,
                reason: "customer outside the pilot (10% of customers)".into(),
            },
        ],
        ended_nothing: vec![
            EndedNothing {
                refused: None,
                journey: "unsigned_loan".into(),
                key: "L-1".into(),
                completed_since: t0() - Duration::days(7),
            },
            EndedNothing {
                refused: Some("event e-new has no data.application_id: nothing ended".into()),
                journey: "unsigned_loan".into(),
                key: String::new(),
                completed_since: t0(),
            },
        ],
        ..event("e-new", "c1", t0())
    };
    let other = ReceivedEvent {
        event_type: "customer.contact_updated".into(),
        refused: Some("invalid customer update: timezone is not an IANA zone".into()),
        ..event("e-other", "c2", t0())
    };
    let mut answered = push_record(t0(), "c1", "i1", "t_push", Outcome::Retrying, "HTTP 503");
    answered.attempt = 1;
    answered.http_status = Some(503);
    answered.response_ms = Some(42);
    {
        let mut tx = store.begin().unwrap();
        tx.record_event(&event("e-rolled-back", "c1", t0()))
            .unwrap();
        // Dropped: rolled back.
    }
    let mut tx = store.begin().unwrap();
    tx.prefetch(&[("e-new", "c1")], t0()).unwrap();
    tx.record_event(&first).unwrap();
    tx.record_event(&second).unwrap();
    tx.record_event(&other).unwrap();
    tx.append_log(&answered).unwrap();
    tx.commit().unwrap();

    assert_eq!(
        store.received_events("c1").unwrap(),
        vec![first, second.clone()]
    );
    assert_eq!(store.received_events("c2").unwrap(), vec![other]);
    assert!(store.received_events("nobody").unwrap().is_empty());
    let log = store.log_after(0, 10).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].http_status, log[0].response_ms),
        (Some(503), Some(42))
    );
    // A record without an answer keeps none.
    let plain = push_record(
        t0(),
        "c1",
        "i1",
        "t_push",
        Outcome::Suppressed,
        "no consent",
    );
    let mut tx = store.begin().unwrap();
    tx.append_log(&plain).unwrap();
    tx.commit().unwrap();
    let log = store.log_after(log[0].seq, 10).unwrap();
    assert_eq!((log[0].http_status, log[0].response_ms), (None, None));

    // Retention: what was received before the cutoff goes, the rest stays.
    assert!(store.purge(t0() - Duration::days(1)).unwrap() >= 1);
    assert_eq!(store.received_events("c1").unwrap(), vec![second]);
}

/// The suite, as `#[test]` functions: `store_conformance!(make)` for a store
/// (`make` gives something that derefs to it), plus `replicas: make_pair`
/// for stores that replicas share (`make_pair` gives two on one database).
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::store_conformance!(@each $make;
            transaction_is_atomic,
            claims_are_exclusive_and_leases_expire,
            one_open_instance_and_close_cancels_pending,
            exit_after_last_step_converts_within_window,
            dead_letters_wait_in_the_outbox_until_published,
            dead_letters_keep_their_headers_and_claims_cut_payloads,
            failed_dead_letters_back_off_and_are_given_up_but_kept,
            purge_keeps_what_is_live,
            retry_reschedules_and_customer_round_trips,
            finish_steps_writes_a_batch_in_order,
            customers_and_histories_come_back_in_the_order_asked,
            offsets_are_per_partition_and_move_from_the_one_expected,
            an_offset_moved_under_the_consumer_fails_the_transaction,
            processed_event_ids_dedup,
            exit_cancels_pending_steps_but_not_a_claimed_one,
            a_claim_handed_back_to_another_channel_waits_there,
            log_pages_in_order_and_rules_record_once,
            next_due_counts_and_dead_letter_batches,
            leases_are_released_at_start_and_renewed_by_heartbeat,
            sends_begun_count_until_settled,
            prefetched_reads_follow_the_transactions_writes,
            concurrent_claimers_never_share_a_step,
            exits_plan_withdrawals_of_delivered_steps,
            an_attempt_that_timed_out_is_withdrawn_at_the_exit,
            a_send_begun_by_a_dead_worker_is_withdrawn_at_the_exit,
            a_delivery_landing_after_its_exit_is_withdrawn,
            audit_outbox_follows_the_log_in_its_transaction,
            upcoming_steps_are_the_customers_pending_steps_due_soon,
            control_overrides_and_log_round_trip,
            propensity_counts_sends_and_conversions_within_the_window,
            received_events_and_attempt_answers_round_trip
        );
    };
    ($make:expr, replicas: $pair:expr) => {
        $crate::store_conformance!($make);
        $crate::store_conformance!(@pairs $pair;
            a_customer_is_with_one_replica_at_a_time,
            abandoned_claims_are_taken_over_after_the_lease,
            a_claim_running_out_wakes_the_other_replicas,
            caps_hold_across_replicas,
            two_consumers_cannot_both_move_a_partition_from_one_offset,
            concurrent_replicas_never_share_a_step_or_a_customer,
            a_dead_letter_is_published_by_one_replica,
            audit_outbox_is_published_by_one_replica_at_a_time
        );
    };
    (@each $make:expr; $($name:ident),+) => {
        $(
            #[test]
            fn $name() {
                let store = $make;
                $crate::store::conformance::$name(&*store);
            }
        )+
    };
    (@pairs $pair:expr; $($name:ident),+) => {
        $(
            #[test]
            fn $name() {
                let (a, b) = $pair;
                $crate::store::conformance::$name(&*a, &*b);
            }
        )+
    };
}
