//! Benchmark 5: scale of state. A store holding N pending steps (default
//! 10 M: unsigned-loan journeys whose push went out, each with its email due
//! in 3-23 h and its call task in 2-3 days, and a customer context each),
//! filled through the Store API. Beside it, in the same run, a small store
//! holding only the due steps. For both: bytes on disk, the time to find and
//! claim the next batch of due emails, and `nudge run` (release) on it: time
//! to ready, and the daemon's peak RSS while it sends the due emails to an
//! HTTP endpoint on 127.0.0.1.
//!
//!   cargo bench --bench state [-- --steps 10000000 --due 10000]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::*;
use nudge::context::CustomerContext;
use nudge::model::{Category, ChannelKind, Mode};
use nudge::rules::{self, Limits};
use nudge::store::{NewInstance, NewStep, SqliteStore, Store};
use serde_json::json;

/// One unsigned-loan instance with its email and call task pending.
fn instance(
    i: u64,
    started: DateTime<Utc>,
    hash: &str,
) -> (CustomerContext, NewInstance, Vec<NewStep>) {
    let customer = format!("c-{i:08}");
    let mut c = CustomerContext::new(&customer);
    c.app_installed = true;
    c.email = Some(format!("{customer}@example.com"));
    c.timezone = Some("Australia/Sydney".into());
    let app = format!("A-{i:08}");
    let vars = json!({
        "application_id": app, "product": "Car loan", "amount": "32000.50",
        "amount_value": 32000.5, "resume_url": format!("https://bank.example/resume/{app}"),
        "remaining_steps": ["review the loan contract", "sign electronically"],
    });
    let instance = NewInstance {
        id: format!(
            "unsigned_loan-{:016x}",
            i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ),
        customer: customer.clone(),
        journey: "unsigned_loan".into(),
        key: app.clone(),
        mode: Mode::Live,
        category: Category::Service,
        started_at: started,
        rule_hash: hash.into(),
        trigger_event: format!("loan-{i}"),
        vars: vars.as_object().unwrap().clone(),
        decision_inputs: json!({"event": {"id": format!("loan-{i}"), "type": "loan_application.completed"}}),
    };
    let steps = vec![
        NewStep {
            step: "email".into(),
            seq: 1,
            channel: ChannelKind::Email,
            template: "loan_unsigned_email".into(),
            condition: None,
            due_at: started + chrono::Duration::days(1),
        },
        NewStep {
            step: "call".into(),
            seq: 2,
            channel: ChannelKind::CallTask,
            template: "loan_unsigned_call".into(),
            condition: Some("worth_a_call".into()),
            due_at: started + chrono::Duration::days(3),
        },
    ];
    (c, instance, steps)
}

/// `pending` future steps (in pairs) and `due` instances whose email is due
/// now; returns instances/s.
fn fill(store: &SqliteStore, pending: u64, due: u64, hash: &str) -> f64 {
    let now = Utc::now();
    let start = Instant::now();
    let total = pending / 2 + due;
    let mut i = 0;
    while i < total {
        let mut tx = store.begin().unwrap();
        for _ in 0..10_000.min(total - i) {
            // The due ones started a day and a minute ago; the rest 1-21 h ago,
            // so none falls due while the benchmark runs.
            let started = if i < due {
                now - chrono::Duration::days(1) - chrono::Duration::minutes(1)
            } else {
                now - chrono::Duration::seconds((i % 72_000) as i64) - chrono::Duration::hours(1)
            };
            let (c, inst, steps) = instance(i, started, hash);
            tx.save_customer(&c, now).unwrap();
            tx.start_instance(&inst, &steps).unwrap();
            i += 1;
        }
        tx.commit().unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn disk_bytes(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| {
            std::fs::metadata(format!("{}{s}", db.display()))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

/// Median time to find the next due time and to claim a batch of 256 due
/// emails (each batch released again, so every round claims from the same state).
fn claim_times(store: &SqliteStore, rounds: usize) -> (Duration, Duration) {
    let (mut next, mut claim) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let due = store.next_due(Some(ChannelKind::Email)).unwrap();
        next.push(t.elapsed());
        assert!(due.unwrap() <= Utc::now());
        let now = Utc::now();
        let t = Instant::now();
        let batch = store
            .claim_due(
                ChannelKind::Email,
                now,
                256,
                now + chrono::Duration::minutes(5),
            )
            .unwrap();
        claim.push(t.elapsed());
        assert_eq!(batch.len(), 256);
        for s in &batch {
            store.release_claim(&s.instance_id, &s.step, None).unwrap();
        }
    }
    next.sort();
    claim.sort();
    (next[rounds / 2], claim[rounds / 2])
}

struct DaemonFigures {
    ready: Duration,
    sent_in: Duration,
    peak_rss_kb: u64,
}

fn run_daemon(db: &Path, due: u64, rt: &tokio::runtime::Runtime) -> DaemonFigures {
    let dir = tempfile::tempdir().unwrap();
    let keys: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let k = keys.clone();
    let endpoint = Receiver::counting(
        rt,
        Some(Arc::new(move |body: &[u8]| {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            k.lock().unwrap().push((
                v["idempotency_key"].as_str().unwrap_or("").to_string(),
                v["attempt"].as_u64().unwrap_or(0),
            ));
        })),
    );
    let topic = unique("bench-state");
    create_topic(rt, &topic, 1);
    let mut cfg = DaemonConfig::with_defaults(dir.path(), &endpoint);
    cfg.topic = topic;
    cfg.group = unique("state");
    cfg.store = db.to_path_buf();
    let daemon = Daemon::start(&cfg, "nudge");
    // The scheduler starts before the consumer joins its group: watch both.
    let ready = std::cell::Cell::new(None);
    let mut sent_in = None;
    let mut peak = 0;
    daemon.poll_until(
        Duration::from_secs(300),
        Duration::from_millis(10),
        "readiness and every due step sent",
        || {
            peak = peak.max(daemon.rss_kb().1);
            if sent_in.is_none() && endpoint.received() >= due {
                sent_in = Some(daemon.started.elapsed());
            }
            if ready.get().is_none() && daemon.readyz().is_some_and(|r| r.ready()) {
                ready.set(Some(daemon.started.elapsed()));
            }
            ready.get().is_some() && sent_in.is_some()
        },
        || {
            format!(
                "sent {} of {due}, ready: {:?}",
                endpoint.received(),
                ready.get()
            )
        },
    );
    let (ready, sent_in) = (ready.get().unwrap(), sent_in.unwrap());
    let daemon_log = daemon.log.clone();
    std::thread::sleep(Duration::from_millis(500));
    peak = peak.max(daemon.rss_kb().1);
    daemon.terminate();
    let keys = keys.lock().unwrap();
    let distinct: std::collections::HashSet<&String> = keys.iter().map(|k| &k.0).collect();
    if keys.len() as u64 != due {
        let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
        let retries: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("retry") || l.contains("WARN") || l.contains("warn"))
            .take(5)
            .collect();
        println!(
            "{} requests, {} distinct keys, attempts > 1: {}; log: {retries:#?}",
            keys.len(),
            distinct.len(),
            keys.iter().filter(|k| k.1 > 1).count()
        );
    }
    assert_eq!(
        distinct.len() as u64,
        due,
        "each due email sent, none twice"
    );
    DaemonFigures {
        ready,
        sent_in,
        peak_rss_kb: peak,
    }
}

fn main() {
    let pending: u64 = arg("steps", 10_000_000);
    let due: u64 = arg("due", 10_000);
    println!("machine: {}", machine());
    // Find or start the broker before anything is timed.
    brokers();
    let rt = runtime();
    let rule_set = rules::load_dir(&repo().join("rules"), &Limits::default()).unwrap();
    let hash = rule_set.journey("unsigned_loan").unwrap().hash.clone();
    let dir = tempfile::tempdir().unwrap();

    let small_db = dir.path().join("small.db");
    let big_db = dir.path().join("big.db");
    {
        let small = SqliteStore::open(&small_db).unwrap();
        fill(&small, 0, due, &hash);
        // Filling is set-up, not measured: a cache that holds the random-keyed
        // indexes keeps it fast. Everything measured below uses the default.
        let big = SqliteStore::open_with_cache(&big_db, 4096).unwrap();
        let rate = fill(&big, pending, due, &hash);
        println!(
            "filled: {} instances at {} ({} pending steps)",
            pending / 2 + due,
            fmt_rate(rate),
            pending + 2 * due
        );
    }
    let small_bytes = disk_bytes(&small_db);
    let big_bytes = disk_bytes(&big_db);
    let steps_big = pending + 2 * due;

    let t = Instant::now();
    let small = SqliteStore::open(&small_db).unwrap();
    let small_open = t.elapsed();
    let t = Instant::now();
    let big = SqliteStore::open(&big_db).unwrap();
    let big_open = t.elapsed();
    let (small_next, small_claim) = claim_times(&small, 21);
    let (big_next, big_claim) = claim_times(&big, 21);
    drop((small, big));
    println!(
        "claim 256: small {small_claim:?}, big {big_claim:?}; next_due: {small_next:?} / {big_next:?}"
    );

    let ds = run_daemon(&small_db, due, &rt);
    let db = run_daemon(&big_db, due, &rt);
    println!(
        "daemon: ready {:?} / {:?}, {due} emails sent in {:?} / {:?}, peak RSS {} / {} MB",
        ds.ready,
        db.ready,
        ds.sent_in,
        db.sent_in,
        ds.peak_rss_kb / 1024,
        db.peak_rss_kb / 1024
    );

    let mut report = Report::default();
    let mb = db.peak_rss_kb as f64 / 1024.0;
    report.ratio(
        "5 state",
        &format!("daemon peak RSS, {steps_big} pending steps, sending {due} due"),
        format!("{mb:.0} MB"),
        format!("{} pending: {} MB", 2 * due, ds.peak_rss_kb / 1024),
        db.peak_rss_kb as f64 / ds.peak_rss_kb.max(1) as f64,
        "≤ 256 MB",
        Some(mb <= 256.0),
    );
    report.info(
        "5 state",
        "bytes on disk per pending step (instance, customer, indexes included)",
        format!(
            "{:.0} B ({:.2} GB in all; small store {:.0} B)",
            big_bytes as f64 / steps_big as f64,
            big_bytes as f64 / 1e9,
            small_bytes as f64 / (2 * due) as f64
        ),
    );
    report.ratio(
        "5 state",
        "claim the next 256 due emails",
        format!("{:.2} ms", big_claim.as_secs_f64() * 1e3),
        format!("small store {:.2} ms", small_claim.as_secs_f64() * 1e3),
        big_claim.as_secs_f64() / small_claim.as_secs_f64(),
        "",
        None,
    );
    report.ratio(
        "5 state",
        "find the next due time (scheduler wake-up)",
        format!("{:.1} µs", big_next.as_secs_f64() * 1e6),
        format!("small store {:.1} µs", small_next.as_secs_f64() * 1e6),
        big_next.as_secs_f64() / small_next.as_secs_f64(),
        "",
        None,
    );
    report.ratio(
        "5 state",
        "start-up: `nudge run` to /readyz 200 (includes joining the group)",
        format!("{:.2} s", db.ready.as_secs_f64()),
        format!("small store {:.2} s", ds.ready.as_secs_f64()),
        db.ready.as_secs_f64() / ds.ready.as_secs_f64(),
        "",
        None,
    );
    report.info(
        "5 state",
        "opening the store",
        format!(
            "{:.1} ms (small store {:.1} ms)",
            big_open.as_secs_f64() * 1e3,
            small_open.as_secs_f64() * 1e3
        ),
    );
    report.ratio(
        "5 state",
        &format!("all {due} due emails sent, from process start"),
        format!("{:.2} s", db.sent_in.as_secs_f64()),
        format!("small store {:.2} s", ds.sent_in.as_secs_f64()),
        db.sent_in.as_secs_f64() / ds.sent_in.as_secs_f64(),
        "",
        None,
    );
    report.finish("Benchmark 5: scale of state");
}
