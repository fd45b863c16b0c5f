//! The suite every [`Store`] passes: written once, run against each
//! implementation by `store_conformance!`.

use super::*;
use crate::model::{Outcome, StepRef};
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
    tx.set_offset("events", 3, 42).unwrap();
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
    // The worker died: once the lease runs out the step is claimed again.
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
        })
        .unwrap();
    assert!(written.seq > 0);
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
    assert!(
        tx.start_instance(&instance("i3", "c1", "a1"), &steps())
            .is_err(),
        "second open instance for one key"
    );
    tx.commit().unwrap();
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
    store
        .mark_dead_letters_published(&[pending[0].0], t0())
        .unwrap();
    assert!(store.unpublished_dead_letters(10).unwrap().is_empty());
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
    store.release_claim("live", "push").unwrap();
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

#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        #[test]
        fn transaction_is_atomic() {
            let store = $make;
            $crate::store::conformance::transaction_is_atomic(&store);
        }
        #[test]
        fn claims_are_exclusive_and_leases_expire() {
            let store = $make;
            $crate::store::conformance::claims_are_exclusive_and_leases_expire(&store);
        }
        #[test]
        fn one_open_instance_and_close_cancels_pending() {
            let store = $make;
            $crate::store::conformance::one_open_instance_and_close_cancels_pending(&store);
        }
        #[test]
        fn exit_after_last_step_converts_within_window() {
            let store = $make;
            $crate::store::conformance::exit_after_last_step_converts_within_window(&store);
        }
        #[test]
        fn dead_letters_wait_in_the_outbox_until_published() {
            let store = $make;
            $crate::store::conformance::dead_letters_wait_in_the_outbox_until_published(&store);
        }
        #[test]
        fn purge_keeps_what_is_live() {
            let store = $make;
            $crate::store::conformance::purge_keeps_what_is_live(&store);
        }
        #[test]
        fn retry_reschedules_and_customer_round_trips() {
            let store = $make;
            $crate::store::conformance::retry_reschedules_and_customer_round_trips(&store);
        }
    };
}
