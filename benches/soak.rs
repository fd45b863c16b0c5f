//! Soak: `nudge run` SIGKILLed and restarted `--cycles` times (default 100)
//! while a producer keeps writing loan events (`--rate` loans/s, each a
//! contact update and a loan completed, unsigned: a push at once) to the
//! broker; then one last daemon finishes the work. Counts, at the recording
//! endpoint and in the dispatch log:
//!
//! - lost: a customer whose push never arrived;
//! - doubled: a customer who got pushes under more than one idempotency
//!   key, or a step logged `sent` twice (a receiver cannot drop these);
//! - re-sent: the same key delivered again after a kill (a send made but not
//!   recorded when the process died; the receiver drops it by its key);
//! - late: a push that arrived more than `--late` seconds (default 30) after
//!   its event was produced.
//!
//! Not a timed benchmark and not in CI: `scripts/soak.sh` runs it. Exits 1
//! when anything was lost or doubled.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use serde_json::json;

/// One request at the endpoint: (idempotency key, customer, arrival).
type Arrival = (String, String, Instant);

/// Counts records the broker did not take (the soak must not blame the
/// daemon for them).
#[derive(Default)]
struct Failures(std::sync::atomic::AtomicU64);

impl rdkafka::ClientContext for Failures {}

impl ProducerContext for Failures {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn main() {
    let cycles: usize = arg("cycles", 100);
    let rate: u64 = arg("rate", 50);
    let late = Duration::from_secs(arg("late", 30));
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();

    let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let sink = arrivals.clone();
    let recv = Receiver::counting(
        &rt,
        Some(Arc::new(move |body: &[u8]| {
            let at = Instant::now();
            let Ok(m) = serde_json::from_slice::<serde_json::Value>(body) else {
                return;
            };
            let field = |f: &str| m[f].as_str().unwrap_or_default().to_string();
            sink.lock()
                .unwrap()
                .push((field("idempotency_key"), field("customer"), at));
        })),
    );
    let cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 6);

    // The load: `rate` loans a second, in batches of a tenth of a second.
    let produced: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let records_produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (produced, count, stop, topic) = (
            produced.clone(),
            records_produced.clone(),
            stop.clone(),
            cfg.topic.clone(),
        );
        std::thread::spawn(move || {
            // One producer for the whole run (a new one per batch costs a
            // connection and an idempotent-producer handshake each).
            let producer: BaseProducer<Failures> = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("linger.ms", "5")
                .set("enable.idempotence", "true")
                .create_with_context(Failures::default())
                .unwrap();
            let per_tick = (rate / 10).max(1) as usize;
            let mut next = 0usize;
            let start = Instant::now();
            let mut tick = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut batch = Vec::with_capacity(2 * per_tick);
                let mut customers = Vec::with_capacity(per_tick);
                for c in next..next + per_tick {
                    let customer = format!("c{c}");
                    batch.push(event(
                        &format!("ctx-{c}"),
                        "customer.contact_updated",
                        &customer,
                        json!({"app_installed": true, "email": "x@example.com"}),
                    ));
                    batch.push(event(
                        &format!("loan-{c}"),
                        "loan_application.completed",
                        &customer,
                        json!({"application_id": format!("A{c}"), "product": "Personal loan",
                               "amount": 1000, "signed": false, "resume_url": "u"}),
                    ));
                    customers.push(customer);
                }
                next += per_tick;
                for (key, payload) in &batch {
                    producer
                        .send(BaseRecord::to(&topic).key(key).payload(payload))
                        .map_err(|(e, _)| e)
                        .expect("produce");
                }
                producer.flush(Duration::from_secs(60)).expect("flush");
                let failed = producer.context().0.load(Ordering::Relaxed);
                assert_eq!(failed, 0, "records the broker did not take");
                let now = Instant::now();
                produced
                    .lock()
                    .unwrap()
                    .extend(customers.into_iter().map(|c| (c, now)));
                count.fetch_add(batch.len() as u64, Ordering::Relaxed);
                tick += 1;
                let due = start + Duration::from_millis(100) * tick;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        })
    };

    // The kills: each daemon runs until ready, then a random 0.2-4 s more
    // (mid-batch, mid-send, mid-commit), then SIGKILL.
    let started = Instant::now();
    let mut rng = rand::thread_rng();
    let mut ready_times = Vec::with_capacity(cycles);
    for cycle in 0..cycles {
        let daemon = Daemon::start(&cfg, &format!("soak{cycle}"));
        ready_times.push(daemon.wait_ready(Duration::from_secs(120)));
        let until = Instant::now() + Duration::from_millis(rng.gen_range(200..4000));
        daemon.wait_until(Duration::from_secs(10), "the time to kill", || {
            Instant::now() >= until
        });
        daemon.kill();
        if cycle % 10 == 9 {
            eprintln!(
                "{} cycles, {:?}, {} pushes received",
                cycle + 1,
                started.elapsed(),
                recv.received()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let total = records_produced.load(Ordering::Relaxed) as i64;
    let customers: HashSet<String> = produced.lock().unwrap().keys().cloned().collect();

    // The last daemon finishes: every offset stored and every push out, or
    // 5 minutes (whatever is missing then is counted lost).
    let last = Daemon::start(&cfg, "final");
    last.wait_ready(Duration::from_secs(120));
    let finish = Instant::now() + Duration::from_secs(300);
    while Instant::now() < finish {
        let pushed: HashSet<String> = arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.1.clone())
            .collect();
        if stored_offsets_total(&cfg.store, &cfg.topic) == total && customers.is_subset(&pushed) {
            break;
        }
        if let Some(status) = last.exited() {
            eprintln!("the last daemon exited ({status}):\n{}", last.log_tail());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let offsets = stored_offsets_total(&cfg.store, &cfg.topic);
    last.terminate();

    let arrivals = arrivals.lock().unwrap().clone();
    let produced = produced.lock().unwrap().clone();
    let mut keys_of: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut first: HashMap<&str, Instant> = HashMap::new();
    for (key, customer, at) in &arrivals {
        keys_of.entry(customer).or_default().insert(key);
        let f = first.entry(customer).or_insert(*at);
        *f = (*f).min(*at);
    }
    let lost = customers
        .iter()
        .filter(|c| !keys_of.contains_key(c.as_str()))
        .count();
    let doubled_keys = keys_of.values().filter(|k| k.len() > 1).count();
    let sent = sent_steps(&cfg.store);
    let doubled_log = sent.len() - sent.iter().collect::<HashSet<_>>().len();
    let distinct_keys: usize = keys_of.values().map(HashSet::len).sum();
    let resent = arrivals.len() - distinct_keys;
    let lateness: Vec<Duration> = first
        .iter()
        .filter_map(|(c, at)| produced.get(*c).map(|p| at.saturating_duration_since(*p)))
        .collect();
    let late_count = lateness.iter().filter(|l| **l > late).count();
    let max_late = lateness.iter().max().copied().unwrap_or_default();
    let mut ready_sorted = ready_times.clone();
    ready_sorted.sort();
    let ready_median = ready_sorted
        .get(ready_sorted.len() / 2)
        .copied()
        .unwrap_or_default();
    println!(
        "soak: {cycles} SIGKILL cycles in {:?}; {} events ({} loans) at {rate} loans/s; \
         offsets stored {offsets}/{total}",
        started.elapsed(),
        total,
        customers.len()
    );
    println!(
        "lost {lost}, doubled {} ({doubled_keys} customers with two keys, {doubled_log} steps \
         logged sent twice), late {late_count} (> {late:?}; slowest {max_late:?}), \
         re-sent under the same key {resent}; median start to ready {ready_median:?}",
        doubled_keys + doubled_log
    );
    if lost > 0 || doubled_keys + doubled_log > 0 || offsets != total {
        std::process::exit(1);
    }
}
