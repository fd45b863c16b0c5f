//! Benchmark 4: latency. `nudge run` (release, SQLite) consumes a fresh topic
//! into which events are produced at a fixed rate (default 1,000/s for 30 s),
//! every one a fee increase that starts a journey whose push goes out at
//! once. Measured: time from the producer's `send` to the push arriving at
//! the HTTP endpoint (same process, same clock): p50, p99, max. The producer
//! sends each record at once (linger.ms=0, acks=all). The limit beside it:
//! the Kafka leg alone, produce → a plain consumer in the same process.
//!
//!   cargo bench --bench latency [-- --rate 1000 --secs 30]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn producer(brokers: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .set("acks", "all")
        .create()
        .unwrap()
}

/// Produces `n` records at `rate`/s; `sent[i]` gets the send time of record i
/// (nanoseconds since `origin`).
fn paced(
    brokers: &str,
    topic: &str,
    n: u64,
    rate: u64,
    origin: Instant,
    sent: &[AtomicU64],
    make: impl Fn(u64) -> (String, Vec<u8>),
) {
    let p = producer(brokers);
    let start = Instant::now();
    for i in 0..n {
        let at = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let (k, v) = make(i);
        loop {
            let now = Instant::now();
            if now >= at {
                break;
            }
            p.poll(Duration::ZERO);
            std::thread::sleep((at - now).min(Duration::from_micros(200)));
        }
        sent[i as usize].store(origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
        p.send(BaseRecord::to(topic).key(&k).payload(&v))
            .map_err(|(e, _)| e)
            .expect("produce");
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

fn summary(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        *ms.last().unwrap(),
    )
}

fn main() {
    let rate: u64 = arg("rate", 1000);
    let secs: u64 = arg("secs", 30);
    // tansu answers a fetch only when fetch.wait.max.ms runs out, even when
    // records arrive meanwhile (Apache Kafka answers at once): both consumers
    // here wait at most this long (ms).
    let fetch_wait: String = arg("fetch-wait", "10".to_string());
    let which: String = arg("broker", "both".to_string());
    println!("machine: {}", machine());
    let rt = runtime();
    let mut report = Report::default();
    if which == "tansu" || which == "both" {
        let brokers = brokers();
        let create = |topic: &str| create_topic_on(&rt, &brokers, topic, 6);
        run_on(
            "tansu",
            &brokers,
            &create,
            &rt,
            rate,
            secs,
            &fetch_wait,
            &mut report,
        );
    }
    if which == "mock" || which == "both" {
        // librdkafka's own mock broker, listening on 127.0.0.1 in this
        // process; nudge reaches it over TCP like any broker. Its fetch
        // latency does not grow with the topic, unlike tansu's memory store.
        let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        let brokers = mock.bootstrap_servers();
        let create = |topic: &str| mock.create_topic(topic, 6, 1).expect("mock topic");
        run_on(
            "librdkafka mock",
            &brokers,
            &create,
            &rt,
            rate,
            secs,
            &fetch_wait,
            &mut report,
        );
    }
    report.finish("Benchmark 4: latency at a fixed rate");
}

/// One latency run against one broker: the Kafka leg alone for the same
/// number of records at the same rate, then nudge.
#[allow(clippy::too_many_arguments)]
fn run_on(
    broker: &str,
    brokers: &str,
    create: &dyn Fn(&str),
    rt: &tokio::runtime::Runtime,
    rate: u64,
    secs: u64,
    fetch_wait: &str,
    report: &mut Report,
) {
    let n = rate * secs;
    let brokers = brokers.to_string();
    let origin = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let latencies: Arc<Mutex<Vec<(usize, f64)>>> = Arc::default();

    // The Kafka leg alone: a plain consumer (same settings as nudge's) in this process.
    let kafka_only = {
        let topic = unique("bench-latency-kafka");
        create(&topic);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("lat"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.queue.backoff.ms", "10")
            .set("fetch.wait.max.ms", fetch_wait)
            .create()
            .unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        // Join the group before producing; the same number of records at
        // the same rate as nudge gets (on tansu the broker's latency grows
        // as the topic fills, so a shorter run would flatter the limit).
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
            consumer.poll(Duration::from_millis(50));
            assert!(Instant::now() < deadline, "no assignment");
        }
        let m = n;
        let s2 = sent.clone();
        let b2 = brokers.clone();
        let t2 = topic.clone();
        let prod = std::thread::spawn(move || {
            paced(&b2, &t2, m, rate, origin, &s2, |i| {
                (format!("k-{i}"), i.to_string().into_bytes())
            })
        });
        let mut ms = Vec::with_capacity(m as usize);
        while (ms.len() as u64) < m {
            if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) {
                let i: usize = std::str::from_utf8(msg.payload().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                let now = origin.elapsed().as_nanos() as u64;
                ms.push((now - sent[i].load(Ordering::Relaxed)) as f64 / 1e6);
            }
        }
        prod.join().unwrap();
        summary(ms)
    };
    println!(
        "[{broker}] kafka only: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        kafka_only.0, kafka_only.1, kafka_only.2
    );

    // nudge: produce → consume → decide → store → schedule → push.
    let (s2, l2) = (sent.clone(), latencies.clone());
    let endpoint = Receiver::counting(
        rt,
        Some(Arc::new(move |body: &[u8]| {
            let now = origin.elapsed().as_nanos() as u64;
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            if let Some(i) = v["customer"]
                .as_str()
                .and_then(|c| c.strip_prefix("lat-"))
                .and_then(|i| i.parse::<usize>().ok())
            {
                let t = s2[i].load(Ordering::Relaxed);
                l2.lock().unwrap().push((i, (now - t) as f64 / 1e6));
            }
        })),
    );
    let topic = unique("bench-latency");
    create(&topic);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("nudge.db");
    if std::env::var("NUDGE_BENCH_KEEP").is_ok() {
        println!("keeping {}", dir.path().display());
    }
    // The customers have the app (or the push would be suppressed).
    {
        use nudge::store::Store;
        let s = nudge::store::SqliteStore::open(&store).unwrap();
        let mut tx = s.begin().unwrap();
        for i in 0..n {
            let mut c = nudge::context::CustomerContext::new(&format!("lat-{i}"));
            c.app_installed = true;
            tx.save_customer(&c, chrono::Utc::now()).unwrap();
        }
        tx.commit().unwrap();
    }
    let mut cfg = DaemonConfig::with_defaults(dir.path(), &endpoint);
    cfg.brokers = brokers.clone();
    cfg.topic = topic.clone();
    cfg.group = unique("nudge");
    cfg.store = store.clone();
    cfg.consumer = format!("\"fetch.wait.max.ms\" = \"{fetch_wait}\"");
    let daemon = Daemon::start(&cfg, "nudge");
    daemon.wait_ready(Duration::from_secs(60));
    for s in sent.iter() {
        s.store(0, Ordering::Relaxed);
    }
    paced(&brokers, &topic, n, rate, origin, &sent, |i| {
        event(
            &format!("lat-e-{i}"),
            "recurring_payment.amount_changed",
            &format!("lat-{i}"),
            serde_json::json!({"payment_id": format!("p-{i}"), "merchant": "StreamFlix", "previous_amount": 15.99, "new_amount": 18.99, "currency": "AUD"}),
        )
    });
    daemon.poll_until(
        Duration::from_secs(60),
        Duration::from_millis(20),
        "every push",
        || latencies.lock().unwrap().len() as u64 >= n,
        || {
            format!(
                "only {} of {n} pushes arrived",
                latencies.lock().unwrap().len()
            )
        },
    );
    let rss = daemon.rss_kb();
    daemon.terminate();
    // Where the time went, from the store's own timestamps (ms): the event's
    // time (set when it was produced) → processed (the batch's transaction)
    // → the push's dispatch-log record (after the endpoint answered).
    let stages = {
        let conn = rusqlite::Connection::open(&store).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT p.received_at - i.started_at, l.time - p.received_at
                 FROM instances i JOIN received_events p ON p.event_id = i.trigger_event
                 JOIN dispatch_log l ON l.instance = i.id AND l.outcome = 'sent'",
            )
            .unwrap();
        let rows: Vec<(f64, f64)> = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as f64, r.get::<_, i64>(1)? as f64))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        (
            summary(rows.iter().map(|r| r.0).collect()),
            summary(rows.iter().map(|r| r.1).collect()),
        )
    };
    println!(
        "[{broker}] stages: produced → stored p50 {:.0} / p99 {:.0} / max {:.0} ms; stored → push answered p50 {:.0} / p99 {:.0} / max {:.0} ms",
        stages.0 .0, stages.0 .1, stages.0 .2, stages.1 .0, stages.1 .1, stages.1 .2
    );
    let all = latencies.lock().unwrap().clone();
    assert_eq!(all.len() as u64, n, "one push per event");
    // The same figures without the first 5 s, to tell a start-up effect from
    // the steady state (reported beside the headline, which counts every event).
    let warm = (5 * rate).min(n / 2) as usize;
    let steady = summary(all.iter().filter(|l| l.0 >= warm).map(|l| l.1).collect());
    let mut by_second = vec![0f64; (n / rate.max(1) + 1) as usize];
    for (i, ms) in &all {
        let s = &mut by_second[*i / rate.max(1) as usize];
        *s = s.max(*ms);
    }
    println!("[{broker}] worst latency per second of producing (ms): {by_second:.0?}");
    let (p50, p99, max) = summary(all.into_iter().map(|l| l.1).collect());
    println!("[{broker}] nudge: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");

    report.ratio(
        "4 latency",
        &format!("{broker}: produce → push at {rate}/s for {secs} s ({n} journeys): p99"),
        format!("p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"),
        format!(
            "Kafka alone p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            kafka_only.0, kafka_only.1, kafka_only.2
        ),
        p99 / kafka_only.1.max(0.001),
        "p99 ≤ 50 ms",
        Some(p99 <= 50.0),
    );
    report.info(
        "4 latency",
        &format!("{broker}: {}", "the same without the first 5 s"),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            steady.0, steady.1, steady.2
        ),
    );
    report.info(
        "4 latency",
        &format!(
            "{broker}: {}",
            "stages (store timestamps, ms resolution): produced → stored; stored → push answered"
        ),
        format!(
            "p50 {:.0} / p99 {:.0} / max {:.0} ms; p50 {:.0} / p99 {:.0} / max {:.0} ms",
            stages.0 .0, stages.0 .1, stages.0 .2, stages.1 .0, stages.1 .1, stages.1 .2
        ),
    );
    report.info(
        "4 latency",
        &format!("{broker}: {}", "daemon RSS after the run (current / peak)"),
        format!("{} MB / {} MB", rss.0 / 1024, rss.1 / 1024),
    );
    if std::env::var("NUDGE_BENCH_KEEP").is_ok() {
        std::mem::forget(dir);
    }
}
