//! Benchmark 2: end to end from Kafka, `nudge run` (release, SQLite store).
//!
//! Two fresh topics (6 partitions): one with N events no journey triggers on,
//! one with N events of which 10 % start a journey. For each: raw rdkafka
//! consumption of the topic (plain BaseConsumer, fetch.queue.backoff.ms=10),
//! then `nudge run` on a fresh store, timed from the first to the last
//! committed offset (polled from the store's kafka_offsets table). Beside
//! them, the store's raw batched insert rate: rusqlite, 1000 rows per
//! transaction, into the real `steps` table of a fresh store.
//!
//!   cargo bench --bench e2e [-- --events 500000]
//!   cargo bench --bench e2e -- --postgres 1 --replicas 3 [--events 200000]
//!     (the 10 % mix only, on a fresh PostgreSQL schema, `--replicas`
//!     daemons in one consumer group, beside PostgreSQL's own UNNEST insert
//!     of 1000 rows per statement into the same `steps` table)

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;

/// Plain consumption of the whole topic: records/s from first to last record.
fn raw_consume(brokers: &str, topic: &str, n: u64) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut got = 0u64;
    let mut bytes = 0usize;
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while got < n {
        assert!(
            Instant::now() < deadline,
            "raw consumer stalled at {got}/{n}"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("consume");
            bytes += m.payload().map_or(0, |p| p.len());
            got += 1;
            first.get_or_insert_with(Instant::now);
        }
    }
    std::hint::black_box(bytes);
    let el = first.unwrap().elapsed().as_secs_f64();
    (n - 1) as f64 / el
}

/// rusqlite into the real `steps` table of a fresh store, 1000 rows per transaction.
fn raw_insert(dir: &std::path::Path, rows: u64) -> f64 {
    let path = dir.join("raw-insert.db");
    drop(nudge::store::SqliteStore::open(&path).unwrap());
    let mut conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let start = Instant::now();
    let mut i = 0u64;
    while i < rows {
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO steps (instance_id, step, seq, channel, template, condition, planned_at, due_at, status)
                     VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, ?6, 'pending')",
                )
                .unwrap();
            for _ in 0..1000 {
                let inst = format!(
                    "fee_increase-{:012x}",
                    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16
                );
                stmt.execute(rusqlite::params![
                    inst,
                    "alert",
                    0,
                    "push",
                    "fee_increase_alert",
                    now + (i % 1000) as i64
                ])
                .unwrap();
                i += 1;
            }
        }
        tx.commit().unwrap();
    }
    rows as f64 / start.elapsed().as_secs_f64()
}

struct DaemonRun {
    rate: f64,
    first_to_last: Duration,
    start_to_last: Duration,
    started: i64,
    rss_kb: u64,
}

/// `nudge run` on a fresh store over the whole topic.
fn daemon_consume(topic: &str, n: u64, endpoint: &Receiver, extra: &str) -> DaemonRun {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::with_defaults(dir.path(), endpoint);
    cfg.topic = topic.to_string();
    cfg.group = unique("nudge");
    cfg.extra = extra.to_string();
    let daemon = Daemon::start(&cfg, "nudge");
    // NUDGE_BENCH_PERF=FILE: profile the daemon with perf while it runs.
    let perf = std::env::var("NUDGE_BENCH_PERF").ok().map(|out| {
        std::process::Command::new("perf")
            .args(["record", "-a", "-F", "1999", "-o"])
            .arg(format!("{out}.{}", topic.split('-').nth(1).unwrap_or("x")))
            .arg("-p")
            .arg(daemon.pid().to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf")
    });
    // The daemon creates the file; open a reader once it exists.
    let mut conn = None;
    daemon.poll_until(
        Duration::from_secs(60),
        Duration::from_millis(20),
        "the store",
        || {
            conn = store_reader(&cfg.store);
            conn.is_some()
        },
        String::new,
    );
    let conn = conn.unwrap();
    let mut first: Option<(Instant, i64)> = None;
    let mut peak_rss = 0;
    let mut last = Instant::now();
    let stalled_at = std::cell::Cell::new(0);
    daemon.poll_until(
        Duration::from_secs(600),
        Duration::from_millis(5),
        "every offset committed",
        || {
            let c = committed(&conn, topic);
            last = Instant::now();
            if c > 0 && first.is_none() {
                first = Some((last, c));
            }
            peak_rss = peak_rss.max(daemon.rss_kb().0);
            stalled_at.set(c);
            c as u64 >= n
        },
        || format!("stalled at {}/{n}", stalled_at.get()),
    );
    let (t0, c0) = first.unwrap();
    let started: i64 = conn
        .query_row("SELECT COUNT(*) FROM instances", [], |r| r.get(0))
        .unwrap();
    let run = DaemonRun {
        rate: (n as i64 - c0) as f64 / (last - t0).as_secs_f64().max(1e-6),
        first_to_last: last - t0,
        start_to_last: last - daemon.started,
        started,
        rss_kb: peak_rss,
    };
    if let Some(mut p) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
    daemon.terminate();
    run
}

/// PostgreSQL's own batched insert: 1000 rows per `INSERT … SELECT FROM
/// unnest(…)` statement and transaction, into the `steps` table of a schema
/// the store migrated.
fn raw_insert_postgres(schema: &Schema, rows: u64) -> f64 {
    let mut db = schema.client();
    let now = chrono::Utc::now();
    let start = Instant::now();
    let mut i = 0u64;
    while i < rows {
        let batch: Vec<u64> = (i..(i + 1000).min(rows)).collect();
        let instances: Vec<String> = batch
            .iter()
            .map(|i| {
                format!(
                    "fee_increase-{:012x}",
                    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16
                )
            })
            .collect();
        let customers: Vec<String> = batch.iter().map(|i| format!("c-{i:07}")).collect();
        let due: Vec<chrono::DateTime<chrono::Utc>> = batch
            .iter()
            .map(|i| now + chrono::Duration::milliseconds((i % 1000) as i64))
            .collect();
        db.execute(
            "INSERT INTO steps (instance_id, customer, step, seq, channel, template, planned_at, due_at, status)
             SELECT u.i, u.c, 'alert', 0, 'push', 'fee_increase_alert', u.d, u.d, 'pending'
             FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(i, c, d)",
            &[&instances, &customers, &due],
        )
        .unwrap();
        i += batch.len() as u64;
    }
    rows as f64 / start.elapsed().as_secs_f64()
}

/// The 10 % mix on PostgreSQL with `replicas` daemons in one group: events/s
/// from the first to the last committed offset (polled from the database).
fn postgres_mix(topic: &str, n: u64, endpoint: &Receiver, replicas: usize) -> (f64, i64) {
    let dir = tempfile::tempdir().unwrap();
    let schema = Schema::new();
    let mut cfg = DaemonConfig::with_defaults(dir.path(), endpoint);
    cfg.topic = topic.to_string();
    cfg.group = unique("nudge");
    cfg.store_url = Some(schema.url.clone());
    let daemons: Vec<Daemon> = (0..replicas)
        .map(|r| Daemon::start(&cfg, &format!("replica{r}")))
        .collect();
    let mut db = schema.client();
    let committed = |db: &mut postgres::Client| -> i64 {
        db.query_one(
            "SELECT COALESCE(SUM(next_offset), 0)::BIGINT FROM kafka_offsets WHERE topic = $1",
            &[&topic],
        )
        .map(|r| r.get(0))
        .unwrap_or(0)
    };
    let mut first: Option<(Instant, i64)> = None;
    let mut last = Instant::now();
    daemons[0].poll_until(
        Duration::from_secs(900),
        Duration::from_millis(20),
        "every offset committed",
        || {
            let c = committed(&mut db);
            last = Instant::now();
            if c > 0 && first.is_none() {
                first = Some((last, c));
            }
            c as u64 >= n
        },
        String::new,
    );
    let (t0, c0) = first.unwrap();
    let started: i64 = db
        .query_one("SELECT COUNT(*) FROM instances", &[])
        .unwrap()
        .get(0);
    for d in daemons {
        d.terminate();
    }
    (
        (n as i64 - c0) as f64 / (last - t0).as_secs_f64().max(1e-6),
        started,
    )
}

fn postgres_main(n: u64, insert_rows: u64, replicas: usize) {
    println!("machine: {}", machine());
    let rt = runtime();
    let endpoint = Receiver::counting(&rt, None);
    let mix_topic = unique("bench-mix");
    create_topic(&rt, &mix_topic, 6);
    let records: Vec<_> = (0..n)
        .map(|i| {
            if i % 10 == 0 {
                starting(i)
            } else {
                untriggered(i)
            }
        })
        .collect();
    produce(&mix_topic, &records);
    drop(records);
    let insert = {
        let schema = Schema::new();
        let config = nudge::config::StoreConfig {
            url: Some(schema.url.clone()),
            ..Default::default()
        };
        drop(nudge::store::open(&config).unwrap());
        raw_insert_postgres(&schema, insert_rows)
    };
    let (rate, started) = postgres_mix(&mix_topic, n, &endpoint, replicas);
    assert_eq!(started as u64, n / 10, "every 10th event starts a journey");
    println!(
        "PostgreSQL, {replicas} replica(s): nudge 10% mix {} vs raw UNNEST insert {} = {:.2}",
        fmt_rate(rate),
        fmt_rate(insert),
        rate / insert
    );
    let mut report = Report::default();
    report.ratio(
        "2 e2e",
        &format!("PostgreSQL, {replicas} replica(s), 10 % start a journey, {n} events: nudge vs raw UNNEST insert"),
        fmt_rate(rate),
        format!("UNNEST {} rows", fmt_rate(insert)),
        rate / insert,
        "≥ 0.8",
        Some(rate / insert >= 0.8),
    );
    report.finish("Benchmark 2: end to end from Kafka, PostgreSQL");
}

fn main() {
    if arg("postgres", 0u8) == 1 {
        return postgres_main(
            arg("events", 200_000),
            arg("insert-rows", 200_000),
            arg("replicas", 1usize).max(1),
        );
    }
    let n: u64 = arg("events", 500_000);
    let nu: u64 = arg("untriggered", 1_000_000);
    let insert_rows: u64 = arg("insert-rows", 200_000);
    println!("machine: {}", machine());
    let brokers = brokers();
    let rt = runtime();
    let endpoint = Receiver::counting(&rt, None);
    let mut report = Report::default();

    // The topics.
    let untriggered_topic = unique("bench-untriggered");
    let mix_topic = unique("bench-mix");
    create_topic(&rt, &untriggered_topic, 6);
    create_topic(&rt, &mix_topic, 6);
    let records: Vec<_> = (0..nu).map(untriggered).collect();
    let p1 = produce(&untriggered_topic, &records);
    drop(records);
    let records: Vec<_> = (0..n)
        .map(|i| {
            if i % 10 == 0 {
                starting(i)
            } else {
                untriggered(i)
            }
        })
        .collect();
    let bytes: usize = records.iter().map(|r| r.1.len()).sum();
    let p2 = produce(&mix_topic, &records);
    drop(records);
    println!(
        "produced {nu} + {n} events (mean {} B) at {} and {}",
        bytes as u64 / n,
        fmt_rate(p1),
        fmt_rate(p2)
    );

    let dir = tempfile::tempdir().unwrap();
    let raw_u = raw_consume(&brokers, &untriggered_topic, nu);
    let raw_m = raw_consume(&brokers, &mix_topic, n);
    let insert = raw_insert(dir.path(), insert_rows);
    println!(
        "raw consume {} / {}, raw insert {}",
        fmt_rate(raw_u),
        fmt_rate(raw_m),
        fmt_rate(insert)
    );

    let extra = std::env::var("NUDGE_BENCH_DAEMON_EXTRA").unwrap_or_default();
    let du = daemon_consume(&untriggered_topic, nu, &endpoint, &extra);
    println!(
        "nudge untriggered: {} ({:.2} s first→last commit, {:.2} s from process start, peak RSS {} MB)",
        fmt_rate(du.rate),
        du.first_to_last.as_secs_f64(),
        du.start_to_last.as_secs_f64(),
        du.rss_kb / 1024
    );
    let dm = daemon_consume(&mix_topic, n, &endpoint, &extra);
    println!(
        "nudge 10% mix: {} ({:.2} s first→last commit, {:.2} s from process start, {} journeys started, peak RSS {} MB)",
        fmt_rate(dm.rate),
        dm.first_to_last.as_secs_f64(),
        dm.start_to_last.as_secs_f64(),
        dm.started,
        dm.rss_kb / 1024
    );
    assert_eq!(
        dm.started as u64,
        n / 10,
        "every 10th event starts a journey"
    );

    let r = du.rate / raw_u;
    report.ratio(
        "2 e2e",
        &format!("untriggered, {nu} events: nudge vs raw consumption"),
        fmt_rate(du.rate),
        format!("raw rdkafka {}", fmt_rate(raw_u)),
        r,
        "≥ 0.5",
        Some(r >= 0.5),
    );
    let r = dm.rate / insert;
    report.ratio(
        "2 e2e",
        &format!("10 % start a journey, {n} events: nudge vs raw batched insert"),
        fmt_rate(dm.rate),
        format!("rusqlite {} rows", fmt_rate(insert)),
        r,
        "≥ 0.8",
        Some(r >= 0.8),
    );
    report.ratio(
        "2 e2e",
        "10 % mix: absolute",
        fmt_rate(dm.rate),
        "60 k/s".into(),
        dm.rate / 60_000.0,
        "≥ 60 k/s",
        Some(dm.rate >= 60_000.0),
    );
    report.info(
        "2 e2e",
        "10 % mix vs raw consumption of the same topic",
        format!("{:.2} (raw {})", dm.rate / raw_m, fmt_rate(raw_m)),
    );
    report.info(
        "2 e2e",
        "daemon peak RSS (untriggered / mix)",
        format!("{} MB / {} MB", du.rss_kb / 1024, dm.rss_kb / 1024),
    );
    report.info(
        "2 e2e",
        "producer (acks=all, linger 5 ms)",
        format!("{} / {}", fmt_rate(p1), fmt_rate(p2)),
    );
    report.finish("Benchmark 2: end to end from Kafka");
}
