//! Channel faults, on the virtual clock with real HTTP endpoints on
//! 127.0.0.1: an endpoint answering 503 for five minutes, one that accepts
//! requests and never answers, and `Retry-After` on 429 and 503 (seconds and
//! HTTP-dates). In each case every step is delivered exactly once afterwards
//! (counted by Idempotency-Key among the answers 2xx, and as one `sent` in the
//! dispatch log) and the healthy channel is not held up meanwhile.
//!
//! The daemon reads the wall clock only; the scheduler and pipeline here are
//! wired as the daemon wires them, with the scheduler's default retry
//! settings, so "five minutes" are five minutes of the clock the scheduler
//! plans with, not a shortened outage.

mod harness;
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde_json::json;

use nudge::clock::{Clock, VirtualClock};
use nudge::config::{PolicyConfig, SchedulerConfig};
use nudge::journey::{record_rules_version, Pipeline};
use nudge::model::{ChannelKind, LogRecord, Outcome};
use nudge::policy::Policy;
use nudge::rules::RulesHandle;
use nudge::scheduler::Scheduler;
use nudge::store::{SqliteStore, Store};
use support::*;

/// A push and an email for the customer, both due at once.
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

/// The engine as the daemon wires it, on a virtual clock.
struct Engine {
    clock: VirtualClock,
    store: Arc<SqliteStore>,
    pipeline: Pipeline,
    scheduler: Scheduler,
    _dir: tempfile::TempDir,
}

impl Engine {
    fn new(
        sinks: &Sinks,
        timeout: StdDuration,
        lateness: HashMap<ChannelKind, StdDuration>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("nudge.db")).unwrap());
        let start = t0() - Duration::hours(1);
        let clock = VirtualClock::new(start);
        let clock_dyn: Arc<dyn Clock> = Arc::new(clock.clone());
        let rules = RulesHandle::new(inline_rules(&[("duo", DUO)]));
        record_rules_version(store.as_ref(), &rules.current(), start).unwrap();
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
            sinks.channels(timeout),
            clock_dyn,
            Policy::new(PolicyConfig::default()),
            SchedulerConfig::default(),
            lateness,
        );
        Engine {
            clock,
            store,
            pipeline,
            scheduler,
            _dir: dir,
        }
    }

    /// Sends what falls due up to `t` in time order, as the daemon's loop would.
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

    /// Customer `c` (reachable on every channel) starts the journey at `t`;
    /// what is due then is sent.
    async fn start_duo(&self, c: &str, t: DateTime<Utc>) -> Vec<LogRecord> {
        let mut records = self.run_until(t).await;
        let contact = Arc::new(contact(c, t));
        let duo = Arc::new(event(&format!("duo-{c}"), "test.duo", c, t, json!({})));
        let out = self.pipeline.process(&[contact, duo], &[]).unwrap();
        assert_eq!(out.started.len(), 1, "{c}");
        records.extend(self.scheduler.run_due().await.unwrap());
        records
    }

    fn log(&self) -> Vec<LogRecord> {
        self.store.log_after(0, 100_000).unwrap()
    }
}

/// Each of `customers` has exactly one `sent` for `step` in the log, and the
/// endpoint answered exactly one request per key 2xx; returns the sends.
fn delivered_once<'a>(
    log: &'a [LogRecord],
    sink: &Sink,
    customers: &[String],
    step: &str,
) -> Vec<&'a LogRecord> {
    let by_key = sink.delivered_by_key();
    let mut sent = Vec::new();
    for c in customers {
        let records = of(log, c, step);
        let sends: Vec<&LogRecord> = records
            .iter()
            .copied()
            .filter(|r| r.outcome == Outcome::Sent)
            .collect();
        assert_eq!(sends.len(), 1, "{c}/{step}: {records:#?}");
        assert!(
            records
                .iter()
                .all(|r| matches!(r.outcome, Outcome::Sent | Outcome::Retrying)),
            "{c}/{step}: {records:#?}"
        );
        let key = format!("{}:{step}", sends[0].instance);
        assert_eq!(by_key.get(&key), Some(&1), "{key} delivered once");
        sent.push(sends[0]);
    }
    assert_eq!(by_key.len(), customers.len(), "no other key delivered");
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_503_for_five_minutes_loses_nothing_and_holds_up_nothing() {
    let sinks = Sinks::start().await;
    let e = Engine::new(&sinks, StdDuration::from_secs(5), HashMap::new());
    let outage_end = t0() + Duration::minutes(5);
    let clock = e.clock.clone();
    sinks.push.answer_with(Arc::new(move || {
        (clock.now() < outage_end).then(|| (StatusCode::SERVICE_UNAVAILABLE, vec![]))
    }));

    // A customer starts the journey every 20 s of the outage.
    let customers: Vec<String> = (0..15).map(|i| format!("c-{i:02}")).collect();
    for (i, c) in customers.iter().enumerate() {
        e.start_duo(c, t0() + Duration::seconds(20 * i as i64))
            .await;
    }
    e.run_until(outage_end - Duration::seconds(1)).await;
    assert_eq!(
        sinks.push.delivered_by_key().len(),
        0,
        "the push endpoint is down"
    );
    let push_refused = sinks.push.count();
    assert!(
        push_refused >= 3 * customers.len(),
        "retried: {push_refused}"
    );

    // Meanwhile every email went out at the moment it fell due.
    let log = e.log();
    for email in delivered_once(&log, &sinks.email, &customers, "mail") {
        assert_eq!(email.latency_ms, Some(0), "{email:?}");
    }

    // The endpoint recovers: every push goes out once, none given up.
    e.run_until(outage_end + Duration::minutes(30)).await;
    let log = e.log();
    assert!(
        log.iter().all(|r| r.outcome != Outcome::Failed),
        "{:#?}",
        log.iter()
            .filter(|r| r.outcome == Outcome::Failed)
            .collect::<Vec<_>>()
    );
    let pushes = delivered_once(&log, &sinks.push, &customers, "tell");
    let recovery = pushes
        .iter()
        .map(|r| (r.time - outage_end).to_std().unwrap())
        .max()
        .unwrap();
    let attempts = pushes.iter().map(|r| r.attempt).max().unwrap();
    eprintln!(
        "503 for 5 min: {} pushes, {push_refused} refused tries, the last push {recovery:?} \
         after the outage (attempt {attempts})",
        pushes.len()
    );
    assert!(
        recovery <= SchedulerConfig::default().retry_max,
        "{recovery:?}"
    );
    assert!(attempts <= SchedulerConfig::default().max_attempts);
    let refused: Vec<_> = log
        .iter()
        .filter(|r| r.outcome == Outcome::Retrying)
        .collect();
    assert!(refused
        .iter()
        .all(|r| r.step == "tell" && r.reason.contains("HTTP 503")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_times_out_is_retried_and_holds_up_nothing() {
    let sinks = Sinks::start().await;
    let timeout = StdDuration::from_secs(2);
    let e = Engine::new(&sinks, timeout, HashMap::new());
    let customers: Vec<String> = (0..8).map(|i| format!("c-{i}")).collect();
    sinks.push.hang(true);

    // Both channels' steps fall due together; the push sends hang.
    e.run_until(t0()).await;
    let contacts: Vec<_> = customers
        .iter()
        .map(|c| Arc::new(contact(c, t0())))
        .collect();
    let duos: Vec<_> = customers
        .iter()
        .map(|c| Arc::new(event(&format!("duo-{c}"), "test.duo", c, t0(), json!({}))))
        .collect();
    e.pipeline.process(&contacts, &[]).unwrap();
    e.pipeline.process(&duos, &[]).unwrap();
    let started = Instant::now();
    let records = e.scheduler.run_due().await.unwrap();
    let round = started.elapsed();

    assert_eq!(sinks.push.hung(), customers.len());
    assert!(round >= timeout, "the channel timeout fired: {round:?}");
    for c in &customers {
        let push = only(&records, c, "tell");
        assert_eq!(push.outcome, Outcome::Retrying, "{push:?}");
        assert!(push.reason.contains("timed out"), "{push:?}");
    }
    // The emails reached their endpoint while the pushes were hanging.
    let emails = sinks.email.requests();
    assert_eq!(emails.len(), customers.len());
    let slowest = emails.iter().map(|r| r.at - started).max().unwrap();
    eprintln!("hung push endpoint: round {round:?}, slowest email {slowest:?}");
    assert!(
        slowest < timeout / 2,
        "emails waited for pushes: {slowest:?}"
    );

    // The endpoint answers again: each push is delivered once, on its retry.
    sinks.push.hang(false);
    e.run_until(t0() + Duration::hours(1)).await;
    let log = e.log();
    for push in delivered_once(&log, &sinks.push, &customers, "tell") {
        assert_eq!(push.attempt, 2, "{push:?}");
    }
    delivered_once(&log, &sinks.email, &customers, "mail");
}

/// An HTTP-date as a server writes it: IMF-fixdate, or the obsolete RFC 850 form.
fn http_date(t: DateTime<Utc>, rfc850: bool) -> String {
    let format = if rfc850 {
        "%A, %d-%b-%y %H:%M:%S GMT"
    } else {
        "%a, %d %b %Y %H:%M:%S GMT"
    };
    t.format(format).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_429_and_503_is_honoured_within_bounds() {
    let retry_max = SchedulerConfig::default().retry_max;
    // (status, Retry-After from the virtual now, expected wait before the retry)
    type Case = (StatusCode, fn(DateTime<Utc>) -> String, Option<StdDuration>);
    let cases: [(&str, Case); 5] = [
        (
            "seconds on 429",
            (
                StatusCode::TOO_MANY_REQUESTS,
                |_| "120".into(),
                Some(StdDuration::from_secs(120)),
            ),
        ),
        (
            "IMF-fixdate on 503",
            (
                StatusCode::SERVICE_UNAVAILABLE,
                |now| http_date(now + Duration::seconds(90), false),
                Some(StdDuration::from_secs(90)),
            ),
        ),
        (
            "RFC 850 date on 429",
            (
                StatusCode::TOO_MANY_REQUESTS,
                |now| http_date(now + Duration::seconds(45), true),
                Some(StdDuration::from_secs(45)),
            ),
        ),
        (
            "a day, capped at retry_max",
            (
                StatusCode::SERVICE_UNAVAILABLE,
                |_| "86400".into(),
                Some(retry_max),
            ),
        ),
        (
            "past the push lateness bound of 5 min: expired at once",
            (StatusCode::SERVICE_UNAVAILABLE, |_| "400".into(), None),
        ),
    ];
    for (name, (status, retry_after, wait)) in cases {
        let sinks = Sinks::start().await;
        // In the last case push steps are stale after 5 min (12 h by default).
        let lateness = match wait {
            Some(_) => HashMap::new(),
            None => HashMap::from([(ChannelKind::Push, StdDuration::from_secs(300))]),
        };
        let e = Engine::new(&sinks, StdDuration::from_secs(5), lateness);
        let clock = e.clock.clone();
        let answered = Arc::new(AtomicUsize::new(0));
        let n = answered.clone();
        sinks.push.answer_with(Arc::new(move || {
            let now = clock.now();
            (n.fetch_add(1, Ordering::SeqCst) == 0).then(|| {
                let headers = vec![
                    ("retry-after", retry_after(now)),
                    ("date", http_date(now, false)),
                ];
                (status, headers)
            })
        }));
        e.start_duo("c-1", t0()).await;
        e.run_until(t0() + Duration::days(1)).await;
        let log = e.log();
        let pushes = of(&log, "c-1", "tell");
        assert_eq!(answered.load(Ordering::SeqCst), pushes.len(), "{name}");
        match wait {
            Some(wait) => {
                assert_eq!(
                    outcomes(&pushes),
                    [Outcome::Retrying, Outcome::Sent],
                    "{name}: {pushes:#?}"
                );
                let waited = (pushes[1].time - pushes[0].time).to_std().unwrap();
                assert_eq!(waited, wait, "{name}: {pushes:#?}");
                assert!(
                    pushes[0].reason.contains("retry after"),
                    "{name}: {pushes:#?}"
                );
                delivered_once(&log, &sinks.push, &["c-1".to_string()], "tell");
            }
            None => {
                assert_eq!(outcomes(&pushes), [Outcome::Expired], "{name}: {pushes:#?}");
                assert!(pushes[0].reason.contains("lateness bound"), "{pushes:#?}");
                assert!(sinks.push.delivered_by_key().is_empty());
            }
        }
        // The email is not affected either way.
        delivered_once(&log, &sinks.email, &["c-1".to_string()], "mail");
    }
}

/// Without `Retry-After` the scheduler's own backoff applies (1-2 s after a
/// first failure): the waits above are the endpoint's, not a coincidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retry_after_the_backoff_applies() {
    let sinks = Sinks::start().await;
    let e = Engine::new(&sinks, StdDuration::from_secs(5), HashMap::new());
    sinks.push.fail_next(1, StatusCode::SERVICE_UNAVAILABLE);
    e.start_duo("c-1", t0()).await;
    e.run_until(t0() + Duration::hours(1)).await;
    let log = e.log();
    let pushes = of(&log, "c-1", "tell");
    assert_eq!(outcomes(&pushes), [Outcome::Retrying, Outcome::Sent]);
    let waited = (pushes[1].time - pushes[0].time).to_std().unwrap();
    assert!(
        waited >= StdDuration::from_secs(1) && waited <= StdDuration::from_secs(2),
        "{waited:?}"
    );
}

/// An endpoint that stays down past the step's lateness bound: the backoff
/// is cut short to a last try at the bound, then the step expires; nothing
/// is sent stale and the email is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_waits_past_the_lateness_bound() {
    let sinks = Sinks::start().await;
    // Shorter than the default backoff's first eight waits add up to with
    // the least jitter (255 s): the bound, not the attempts, ends the step.
    // At 300 s a run whose jitter came out low made its ninth try before
    // the bound and its tenth and last at it, and the step `failed`.
    let bound = StdDuration::from_secs(120);
    let e = Engine::new(
        &sinks,
        StdDuration::from_secs(5),
        HashMap::from([(ChannelKind::Push, bound)]),
    );
    sinks.push.always(StatusCode::SERVICE_UNAVAILABLE);
    e.start_duo("c-1", t0()).await;
    e.run_until(t0() + Duration::hours(1)).await;
    let log = e.log();
    let pushes = of(&log, "c-1", "tell");
    let (last, tries) = pushes.split_last().unwrap();
    assert_eq!(last.outcome, Outcome::Expired, "{pushes:#?}");
    assert!(tries.iter().all(|r| r.outcome == Outcome::Retrying));
    let deadline = t0() + Duration::from_std(bound).unwrap();
    // The last try is at the bound; refused again, the step expires.
    assert_eq!(last.time, deadline, "a last try at the bound");
    assert!(tries.iter().all(|r| r.time < deadline), "{pushes:#?}");
    assert_eq!(
        sinks.push.count(),
        pushes.len(),
        "nothing sent after the bound"
    );
    assert!(last.reason.contains("lateness bound"), "{last:?}");
    assert!(tries.len() < SchedulerConfig::default().max_attempts as usize);
    delivered_once(&log, &sinks.email, &["c-1".to_string()], "mail");
}
