//! Killing the engine between scheduling and sending, while sending, and after
//! a send but before it was recorded: a new engine on the same SQLite file
//! sends every planned step, each step's requests carry one idempotency key,
//! and the dispatch log has exactly one `sent` per step.

mod harness;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::watch;

use nudge::clock::{Clock, VirtualClock};
use nudge::config::{PolicyConfig, SchedulerConfig};
use nudge::dispatch::{Channel, Channels, DispatchError, HttpChannel, Message};
use nudge::event::Event;
use nudge::journey::{record_rules_version, Pipeline};
use nudge::model::{ChannelKind, LogRecord, Outcome};
use nudge::policy::Policy;
use nudge::rules::RulesHandle;
use nudge::scheduler::Scheduler;
use nudge::store::{SqliteStore, Store};
use support::*;

/// The engine as the daemon wires it, on a store file and a virtual clock.
struct Engine {
    clock: VirtualClock,
    store: Arc<SqliteStore>,
    pipeline: Pipeline,
    scheduler: Scheduler,
}

impl Engine {
    fn open(path: &Path, now: DateTime<Utc>, channels: Channels) -> Engine {
        let store = Arc::new(SqliteStore::open(path).expect("open store"));
        let clock = VirtualClock::new(now);
        let clock_dyn: Arc<dyn Clock> = Arc::new(clock.clone());
        let rules = RulesHandle::new(shipped_rules());
        record_rules_version(store.as_ref(), &rules.current(), now).unwrap();
        let store_dyn: Arc<dyn Store> = store.clone();
        let pipeline = Pipeline::new(
            store_dyn.clone(),
            rules.clone(),
            clock_dyn.clone(),
            PolicyConfig::default(),
        );
        let scheduler = Scheduler::new(
            store_dyn,
            rules,
            channels,
            clock_dyn,
            Policy::new(PolicyConfig::default()),
            SchedulerConfig::default(),
            HashMap::new(),
        );
        Engine {
            clock,
            store,
            pipeline,
            scheduler,
        }
    }

    /// Sends what falls due up to `t` in time order (as the daemon's loop would).
    async fn run_until(&self, t: DateTime<Utc>) -> Vec<LogRecord> {
        let mut records = Vec::new();
        loop {
            records.extend(self.scheduler.run_due().await.unwrap());
            match self.scheduler.next_due().await.unwrap() {
                Some(next) if next <= t => self.clock.advance_to(next),
                _ => break,
            }
        }
        self.clock.advance_to(t);
        records.extend(self.scheduler.run_due().await.unwrap());
        records
    }

    fn counts(&self) -> BTreeMap<String, i64> {
        self.store.step_counts().unwrap().into_iter().collect()
    }
}

fn http(sinks: &Sinks) -> Channels {
    sinks.channels(std::time::Duration::from_secs(5))
}

/// Delivers over HTTP, then never returns: the process dies after the
/// receiver accepted the message and before the store recorded it.
struct DiesAfterSending {
    inner: Arc<HttpChannel>,
    delivered: watch::Sender<usize>,
}

impl Channel for DiesAfterSending {
    fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), DispatchError>> {
        Box::pin(async move {
            self.inner.send(message).await?;
            self.delivered.send_modify(|n| *n += 1);
            futures::future::pending().await
        })
    }
}

const CUSTOMERS: usize = 200;

fn workload() -> (Vec<Arc<Event>>, Vec<Arc<Event>>) {
    let contacts = (0..CUSTOMERS)
        .map(|i| Arc::new(contact(&format!("c-{i:03}"), t0() - Duration::hours(1))))
        .collect();
    let loans = (0..CUSTOMERS)
        .map(|i| {
            Arc::new(loan_completed(
                &format!("loan-{i:03}"),
                &format!("c-{i:03}"),
                &format!("A-{i:03}"),
                t0() + Duration::minutes(i as i64),
            ))
        })
        .collect();
    (contacts, loans)
}

#[tokio::test]
async fn killed_between_scheduling_and_sending_and_mid_send_nothing_is_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nudge.db");
    let sinks = Sinks::start().await;
    let (contacts, loans) = workload();
    let last = loans.last().unwrap().time;

    // 1. Decide and schedule, then die before the scheduler runs.
    {
        let a = Engine::open(&db, t0() - Duration::hours(1), http(&sinks));
        a.pipeline.process(&contacts, &[]).unwrap();
        for chunk in loans.chunks(50) {
            a.clock.advance_to(chunk.last().unwrap().time);
            let out = a.pipeline.process(chunk, &[]).unwrap();
            assert_eq!(out.started.len(), chunk.len());
        }
        assert_eq!(
            a.counts(),
            BTreeMap::from([("pending".into(), 3 * CUSTOMERS as i64)])
        );
    }
    assert_eq!(sinks.total(), 0);

    // 2. A new engine gets the same events again (the source redelivers what
    //    it cannot know was processed): nothing new. Then it dies mid-send:
    //    8 pushes reach the endpoint, none is recorded, 200 stay claimed.
    {
        let (tx, mut delivered) = watch::channel(0usize);
        let dying = Arc::new(DiesAfterSending {
            inner: sinks.push.channel(std::time::Duration::from_secs(5)),
            delivered: tx,
        });
        let b = Engine::open(&db, last, http(&sinks).with(ChannelKind::Push, dying, 8));
        let all: Vec<_> = contacts.iter().chain(&loans).cloned().collect();
        let again = b.pipeline.process(&all, &[]).unwrap();
        assert_eq!((again.duplicates, again.started.len()), (2 * CUSTOMERS, 0));
        tokio::select! {
            r = b.scheduler.run_due() => panic!("the dying channel never returns: {r:?}"),
            _ = delivered.wait_for(|n| *n >= 8) => {}
        }
        assert_eq!(b.counts()["claimed"], CUSTOMERS as i64);
        assert!(b.store.log_after(0, 10).unwrap().is_empty());
    }
    assert_eq!(
        sinks.push.count(),
        8,
        "concurrency 8, each stuck after sending"
    );
    let delivered_before_crash: BTreeSet<String> = sinks
        .push
        .requests()
        .iter()
        .map(|r| r.key().unwrap().to_string())
        .collect();

    // 3. Single-node restart: leases are released and every push goes out.
    //    Then a worker claims 50 emails and dies without sending them.
    let emails_due = last + Duration::days(1);
    {
        let c = Engine::open(&db, last, http(&sinks));
        assert_eq!(c.store.release_all_leases().unwrap(), CUSTOMERS);
        let records = c.run_until(last).await;
        assert_eq!(records.len(), CUSTOMERS);
        assert!(records.iter().all(|r| r.outcome == Outcome::Sent));
        c.clock.advance_to(emails_due);
        let claimed = c
            .store
            .claim_due(
                ChannelKind::Email,
                emails_due,
                50,
                emails_due + Duration::minutes(5),
            )
            .unwrap();
        assert_eq!(claimed.len(), 50);
    }
    assert_eq!(sinks.email.count(), 0);

    // 4. Restart without releasing: the dead worker's claims come back once
    //    their lease runs out; everything else follows the schedule.
    {
        let d = Engine::open(&db, emails_due, http(&sinks));
        let records = d.run_until(emails_due).await;
        assert_eq!(records.len(), CUSTOMERS - 50, "claimed emails wait");
        d.run_until(emails_due + Duration::minutes(6)).await;
        assert_eq!(sinks.email.count(), CUSTOMERS);
        d.run_until(last + Duration::days(10)).await;
        assert_eq!(
            d.counts(),
            BTreeMap::from([("sent".into(), 3 * CUSTOMERS as i64)])
        );

        // Every request's key is its instance and step, header and body alike.
        let mut by_key: BTreeMap<String, Vec<Received>> = BTreeMap::new();
        for kind in ChannelKind::ALL {
            for r in sinks.get(kind).requests() {
                let key = format!("{}:{}", r.str("/instance"), r.str("/step"));
                assert_eq!(r.key(), Some(key.as_str()));
                assert_eq!(r.str("/idempotency_key"), key);
                by_key.entry(key).or_default().push(r);
            }
        }
        assert_eq!(by_key.len(), 3 * CUSTOMERS, "distinct idempotency keys");
        // Only the pushes delivered before the crash were delivered twice,
        // with the same key and the same content.
        let repeated: BTreeSet<String> = by_key
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(repeated, delivered_before_crash);
        for key in &repeated {
            let v = &by_key[key];
            assert_eq!(v.len(), 2);
            let (a, b) = (v[0].message(), v[1].message());
            assert_eq!(
                (&a.template, &a.variables, &a.customer),
                (&b.template, &b.variables, &b.customer)
            );
            assert!(
                b.attempt > a.attempt,
                "{key}: {} then {}",
                a.attempt,
                b.attempt
            );
        }

        // The log: exactly one `sent` per planned step, nothing else.
        let log = d.store.log_after(0, 10_000).unwrap();
        assert_eq!(log.len(), 3 * CUSTOMERS, "no doubles in the log");
        assert!(log.iter().all(|r| r.outcome == Outcome::Sent));
        let logged: BTreeSet<String> = log
            .iter()
            .map(|r| format!("{}:{}", r.instance, r.step))
            .collect();
        assert_eq!(logged, by_key.keys().cloned().collect());
        let expected: BTreeSet<(String, String)> = (0..CUSTOMERS)
            .flat_map(|i| ["push", "email", "call"].map(|s| (format!("c-{i:03}"), s.to_string())))
            .collect();
        let got: BTreeSet<(String, String)> = log
            .iter()
            .map(|r| (r.customer.clone(), r.step.clone()))
            .collect();
        assert_eq!(got, expected, "none lost");
    }
}

#[tokio::test]
async fn a_step_claimed_by_a_dead_worker_is_not_sent_after_the_journey_ended() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nudge.db");
    let sinks = Sinks::start().await;
    {
        let a = Engine::open(&db, t0() - Duration::hours(1), http(&sinks));
        a.pipeline
            .process(&[Arc::new(contact("c-1", t0() - Duration::hours(1)))], &[])
            .unwrap();
        a.clock.advance_to(t0());
        a.pipeline
            .process(
                &[Arc::new(loan_completed("loan-1", "c-1", "A-1", t0()))],
                &[],
            )
            .unwrap();
        // A worker claims the push and dies.
        let claimed = a
            .store
            .claim_due(ChannelKind::Push, t0(), 10, t0() + Duration::minutes(5))
            .unwrap();
        assert_eq!(claimed.len(), 1);
    }
    // Another node signs the application while the claim is still leased.
    let b = Engine::open(&db, t0() + Duration::minutes(1), http(&sinks));
    let signed = b
        .pipeline
        .process(
            &[Arc::new(event(
                "signed-1",
                "loan_application.signed",
                "c-1",
                t0() + Duration::minutes(1),
                json!({"application_id": "A-1"}),
            ))],
            &[],
        )
        .unwrap();
    assert_eq!(signed.ended.len(), 1);
    // The lease runs out while the push is still fresh enough to send.
    b.run_until(t0() + Duration::minutes(6)).await;
    b.run_until(t0() + Duration::days(10)).await;
    assert_eq!(
        sinks.total(),
        0,
        "nothing is sent after the customer signed: {:?}",
        sinks.push.requests()
    );
    let log = b.store.log_after(0, 100).unwrap();
    let push = only(&log, "c-1", "push");
    assert_eq!(push.outcome, Outcome::Converted, "{push:?}");
    assert!(push.reason.contains("step not sent"), "{push:?}");
    assert_eq!(
        b.counts(),
        BTreeMap::from([("cancelled".into(), 2), ("converted".into(), 1)]),
        "nothing left claimed or pending"
    );
}
