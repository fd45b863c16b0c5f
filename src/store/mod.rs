//! Durable state behind one trait: customer context, journey instances,
//! scheduled steps, processed event ids, Kafka offsets and the dispatch log.
//!
//! Guarantees every implementation gives (checked by the conformance suite):
//! - everything written through one [`Tx`] commits or rolls back together, so
//!   one event's effects (and the Kafka offset that produced them) are atomic;
//! - at most one open instance per (customer, journey, key);
//! - a due step is claimed by one worker at a time, under a lease that
//!   expires if the worker dies, so no step is lost and none is claimed twice.

pub mod sqlite;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::audit::{LogRecord, Outcome};
use crate::context::CustomerContext;
use crate::dispatch::{ChannelKind, HistoryEntry, Variables};
use crate::rules::Category;

pub use sqlite::{SqliteStore, DEFAULT_CACHE_MB};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// How an instance's steps are treated when due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    /// Control group: logged as `held_out`, never sent.
    HeldOut,
    /// Shadow mode: logged as `shadow`, never sent.
    Shadow,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::HeldOut => "held_out",
            Mode::Shadow => "shadow",
        }
    }

    pub fn parse(s: &str) -> Result<Mode, StoreError> {
        match s {
            "live" => Ok(Mode::Live),
            "held_out" => Ok(Mode::HeldOut),
            "shadow" => Ok(Mode::Shadow),
            other => Err(StoreError::Corrupt(format!("mode {other}"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewInstance {
    pub id: String,
    pub customer: String,
    pub journey: String,
    pub key: String,
    pub mode: Mode,
    pub category: Category,
    pub started_at: DateTime<Utc>,
    pub rule_hash: String,
    pub trigger_event: String,
    pub vars: Map<String, Value>,
    /// What the script saw when it decided (the decision record).
    pub seen: Value,
}

#[derive(Debug, Clone)]
pub struct NewStep {
    pub step: String,
    pub seq: u32,
    pub channel: ChannelKind,
    pub template: String,
    pub condition: Option<String>,
    pub due_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpenInstance {
    pub id: String,
    pub rule_hash: String,
}

/// A step that was pending when its instance closed.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedStep {
    pub step: String,
    pub channel: ChannelKind,
    pub template: String,
}

/// A step claimed for sending, with what the scheduler needs to decide and send.
#[derive(Debug, Clone)]
pub struct DueStep {
    /// The store's handle on the claimed step (SQLite: its rowid), handed
    /// back in [`StepResult::claimed_row`] so that settling it needs no key lookup.
    pub row: i64,
    pub instance_id: String,
    pub step: String,
    pub channel: ChannelKind,
    pub template: String,
    pub condition: Option<String>,
    /// The time lateness is measured from (moves only when deferred).
    pub planned_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    /// 1 for the first try.
    pub attempt: u32,
    pub customer: String,
    pub journey: String,
    pub mode: Mode,
    pub category: Category,
    pub rule_hash: String,
    pub vars: Variables,
    /// The instance's status as the step was claimed (read just after): a step claimed by a
    /// worker that died is not sent once its journey has ended meanwhile.
    pub instance_status: String,
}

/// A record that could not be processed, kept in the store's outbox (in the
/// same transaction as its offset) until it is published to the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub reason: String,
    pub journey: Option<String>,
    pub event_id: Option<String>,
}

/// What became of a claimed step.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub record: LogRecord,
    /// Try again at this time (retry or deferral) instead of settling the step.
    pub again_at: Option<DateTime<Utc>>,
    /// For deferrals: lateness is measured from the new time.
    pub replan: bool,
    /// [`DueStep::row`] of the step settled, when known.
    pub claimed_row: Option<i64>,
}

pub trait Store: Send + Sync {
    /// Starts a write transaction; dropping it without `commit` rolls back.
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError>;

    /// Claims up to `limit` steps of `channel` due at `now` (and steps whose
    /// lease expired), leasing them until `lease_until`.
    fn claim_due(
        &self,
        channel: ChannelKind,
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<DueStep>, StoreError>;

    /// Settles (or reschedules) a claimed step and appends its log record, atomically.
    fn finish_step(&self, result: &StepResult) -> Result<LogRecord, StoreError>;

    /// [`finish_step`](Self::finish_step) for several steps, in one
    /// transaction where the store can (all of them or none); records in order.
    fn finish_steps(&self, results: Vec<StepResult>) -> Result<Vec<LogRecord>, StoreError> {
        results.iter().map(|r| self.finish_step(r)).collect()
    }

    /// Earliest time a pending step of `channel` (any channel if None) is due.
    fn next_due(&self, channel: Option<ChannelKind>) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Returns every claimed step to pending: for a single-node store at start-up,
    /// where no other worker can hold a lease.
    fn release_all_leases(&self) -> Result<usize, StoreError>;

    /// The customer's context, with journeys and sends since `window_start`.
    fn customer(
        &self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError>;

    /// Steps of an instance already sent, oldest first.
    fn history(&self, instance_id: &str) -> Result<Vec<HistoryEntry>, StoreError>;

    /// [`customer`](Self::customer) for several customers, in order, reading
    /// only what the caller needs: sends since `sends_since` (none when
    /// `None`) and the journeys only when `journeys`.
    fn customers(
        &self,
        ids: &[String],
        sends_since: Option<DateTime<Utc>>,
        journeys: bool,
    ) -> Result<Vec<CustomerContext>, StoreError> {
        ids.iter()
            .map(|id| {
                let mut c = self.customer(id, sends_since.unwrap_or(DateTime::<Utc>::MAX_UTC))?;
                if !journeys {
                    c.journeys.clear();
                }
                Ok(c)
            })
            .collect()
    }

    /// [`history`](Self::history) for several instances, in order.
    fn histories(&self, instance_ids: &[String]) -> Result<Vec<Vec<HistoryEntry>>, StoreError> {
        instance_ids.iter().map(|id| self.history(id)).collect()
    }

    /// Dispatch log records with seq > `after`, oldest first.
    fn log_after(&self, after: i64, limit: usize) -> Result<Vec<LogRecord>, StoreError>;

    /// Next offset to consume per partition of `topic`, as committed with the effects.
    fn offsets(&self, topic: &str) -> Result<Vec<(i32, i64)>, StoreError>;

    /// Remembers a rule set version (content hash per file) when it is loaded.
    fn record_rules(
        &self,
        version: &str,
        files: &Value,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Dead letters not yet published, oldest first, with their outbox ids.
    fn unpublished_dead_letters(&self, limit: usize) -> Result<Vec<(i64, DeadLetter)>, StoreError>;
    fn mark_dead_letters_published(&self, ids: &[i64], at: DateTime<Utc>)
        -> Result<(), StoreError>;

    /// Puts a claimed step back as it was, unsent (shutting down before sending it).
    fn release_claim(&self, instance_id: &str, step: &str) -> Result<(), StoreError>;

    /// Deletes what is older than `before` and no longer needed: ended
    /// instances and their steps, dispatch-log records, processed event ids,
    /// published dead letters. Returns the rows deleted.
    fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Counts steps by status (for metrics, tests and the benchmarks).
    fn step_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;
}

/// One atomic unit of work: the effects of one or more events.
pub trait Tx {
    /// Whether this event id was processed before.
    fn seen(&mut self, event_id: &str) -> Result<bool, StoreError>;
    fn mark_processed(&mut self, event_id: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
    fn customer(
        &mut self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError>;
    fn save_customer(
        &mut self,
        customer: &CustomerContext,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    fn open_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
    ) -> Result<Option<OpenInstance>, StoreError>;
    /// The instance an exit event ends: the open one, or else the latest one
    /// that completed (all steps settled) at or after `completed_since`.
    fn exit_target(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
        completed_since: DateTime<Utc>,
    ) -> Result<Option<OpenInstance>, StoreError>;
    fn start_instance(
        &mut self,
        instance: &NewInstance,
        steps: &[NewStep],
    ) -> Result<(), StoreError>;
    /// Ends an open (or completed) instance and cancels its pending steps,
    /// returning them in plan order.
    fn close_instance(
        &mut self,
        instance_id: &str,
        status: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<ClosedStep>, StoreError>;
    fn append_log(&mut self, record: &LogRecord) -> Result<(), StoreError>;
    fn set_offset(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), StoreError>;
    fn add_dead_letter(&mut self, letter: &DeadLetter, at: DateTime<Utc>)
        -> Result<(), StoreError>;
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// Shorthand for a log record about a step.
#[allow(clippy::too_many_arguments)]
pub fn step_record(
    time: DateTime<Utc>,
    customer: &str,
    journey: &str,
    instance: &str,
    step: &str,
    channel: &str,
    template: &str,
    outcome: Outcome,
    reason: impl Into<String>,
    rule_hash: &str,
) -> LogRecord {
    LogRecord {
        seq: 0,
        time,
        customer: customer.into(),
        journey: journey.into(),
        instance: instance.into(),
        step: step.into(),
        channel: channel.into(),
        template: template.into(),
        outcome,
        reason: reason.into(),
        rule_hash: rule_hash.into(),
        attempt: 0,
        latency_ms: None,
        event_id: None,
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The suite every `Store` passes; `store_conformance!` runs it against one.
    use super::*;
    use chrono::Duration;

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
            seen: Value::Null,
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
        assert!(!tx.seen("e1").unwrap());
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
        assert!(tx.seen("e1").unwrap());
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
        let mut rec = step_record(
            later,
            "c1",
            "unsigned_loan",
            "i1",
            "push",
            "push",
            "t_push",
            Outcome::Sent,
            "ok",
            "h1",
        );
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
            .close_instance("i1", "converted", t0() + Duration::hours(1))
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
        assert!(ctx.has_status("unsigned_loan", "converted"));
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
        let rec = step_record(
            t0(),
            "c1",
            "unsigned_loan",
            "i1",
            "push",
            "push",
            "t_push",
            Outcome::Sent,
            "ok",
            "h1",
        );
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
            tx.exit_target("c1", "unsigned_loan", "a1", t0() + Duration::days(1))
                .unwrap()
                .is_none(),
            "outside the window"
        );
        let target = tx
            .exit_target("c1", "unsigned_loan", "a1", t0() - Duration::days(30))
            .unwrap()
            .unwrap();
        assert_eq!(target.id, "i1");
        assert!(tx
            .close_instance("i1", "converted", t0() + Duration::hours(2))
            .unwrap()
            .is_empty());
        tx.commit().unwrap();
        assert!(store
            .customer("c1", t0())
            .unwrap()
            .has_status("unsigned_loan", "converted"));
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
        tx.append_log(&step_record(
            t0(),
            "c1",
            "unsigned_loan",
            "old",
            "push",
            "push",
            "t",
            Outcome::Sent,
            "ok",
            "h1",
        ))
        .unwrap();
        tx.close_instance("old", "converted", t0()).unwrap();
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
        assert!(!tx.seen("e-old").unwrap());
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
        let rec = step_record(
            t0(),
            "c9",
            "unsigned_loan",
            "i1",
            "push",
            "push",
            "t_push",
            Outcome::Retrying,
            "HTTP 503",
            "h1",
        );
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
}
