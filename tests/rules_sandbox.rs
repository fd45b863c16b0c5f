//! `rules.timeout` in `nudge run`, against the real broker and real HTTP
//! endpoints: a script that stays under the operation limit but runs for
//! seconds is stopped at the deadline and its event dead-lettered, while
//! another customer's push, `/readyz` and SIGTERM are not held up by it.

mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::*;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::json;

const LONG: Duration = Duration::from_secs(90);

/// Each `index_of` over 10,000 items is one operation: 10,000 of them stay
/// far under the 100,000-operation limit and take seconds (15-18 s in the
/// issue that found it).
const SLOW: &str = r#"fn journey() { #{ name: "slow", category: "service", triggers: ["test.slow"],
  steps: [#{ id: "push", channel: "push", template: "t", delay: "0s" }] } }
fn decide(event, customer) {
  let a = [];
  for i in 0..10000 { a.push(i); }
  let n = 0;
  for i in 0..10000 { n += a.index_of(9999); }
  start()
}
"#;

/// Records to chosen partitions (the harness's producer partitions by key).
fn produce_to(topic: &str, records: &[(i32, (String, Vec<u8>))]) {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for (partition, (key, payload)) in records {
        producer
            .send(
                BaseRecord::to(topic)
                    .partition(*partition)
                    .key(key)
                    .payload(payload),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn metric(daemon: &Daemon, name: &str, labels: &[&str]) -> Option<f64> {
    let (_, text) = daemon.get("/metrics")?;
    text.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?.strip_prefix('{')?;
        labels
            .iter()
            .all(|label| rest.contains(label))
            .then(|| value.parse().ok())?
    })
}

#[test]
fn a_slow_script_is_stopped_at_rules_timeout_and_holds_up_nothing_else() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    let rules = dir.path().join("rules");
    copy_rules(&rules);
    std::fs::write(rules.join("slow.rhai"), SLOW).unwrap();
    cfg.rules = rules;
    // 1 s rather than the default 100 ms, so that `/readyz` is asked many
    // times while one evaluation runs (the only test in this binary: the
    // daemon inherits the variable).
    std::env::set_var("NUDGE_RULES__TIMEOUT", "1s");
    create_topic(&rt, &cfg.topic, 2);
    create_topic(&rt, &cfg.dlq, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    daemon.wait_sending(LONG);

    // `/readyz` asked every 20 ms from before the slow event until the end.
    let polling = Arc::new(AtomicBool::new(true));
    let answers: Arc<Mutex<Vec<(Duration, u16)>>> = Arc::default();
    let poller = {
        let (polling, answers, admin) = (polling.clone(), answers.clone(), daemon.admin.clone());
        std::thread::spawn(move || {
            while polling.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let status = http_get(&admin, "/readyz").map_or(0, |(s, _)| s);
                answers.lock().unwrap().push((asked.elapsed(), status));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let slow = event("slow-1", "test.slow", "c-slow", json!({}));
    let contact = event(
        "fast-1",
        "customer.contact_updated",
        "c-fast",
        json!({"app_installed": true}),
    );
    let loan = event(
        "fast-2",
        "loan_application.completed",
        "c-fast",
        json!({"application_id": "A-1", "product": "Car loan", "amount": 100, "signed": false, "resume_url": "u"}),
    );
    let produced = Instant::now();
    produce_to(&cfg.topic, &[(0, slow.clone()), (1, contact), (1, loan)]);

    daemon.wait_until(LONG, "the other customer's push", || {
        recv.on("/push").len() == 1
    });
    let push_after = produced.elapsed();
    let letters = read_topic(&cfg.dlq, 1);
    polling.store(false, Ordering::Relaxed);
    poller.join().unwrap();

    // The slow event: dead-lettered with the journey and the timeout.
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.payload, slow.1, "original bytes kept");
    assert_eq!(letter.headers["nudge.journey"], "slow");
    let reason = &letter.headers["nudge.reason"];
    assert!(
        reason.contains("slow.rhai:")
            && reason.contains("journey `slow`")
            && reason.contains("ran longer than rules.timeout (1s)"),
        "{reason}"
    );
    // The other customer's push: one evaluation's timeout late at most.
    assert!(
        push_after < Duration::from_secs(2),
        "push after {push_after:?}"
    );
    assert_eq!(recv.on("/push")[0].body["customer"], "c-fast");
    // `/readyz`: answered, ready and fast every time, while the script ran.
    let answers = answers.lock().unwrap();
    assert!(answers.len() >= 25, "asked {} times", answers.len());
    let slowest = answers.iter().map(|a| a.0).max().unwrap();
    eprintln!(
        "/readyz asked {} times during the slow evaluation, slowest answer {slowest:?}",
        answers.len()
    );
    assert!(
        slowest < Duration::from_millis(100),
        "/readyz took {slowest:?}: {answers:?}"
    );
    assert!(answers.iter().all(|a| a.1 == 200), "{answers:?}");
    assert_eq!(
        metric(&daemon, "nudge_rule_timeouts_total", &["journey=\"slow\""]),
        Some(1.0)
    );
    assert_eq!(
        metric(&daemon, "nudge_dead_letters_total", &["kind=\"rule\""]),
        Some(1.0)
    );

    // SIGTERM while another slow evaluation runs: the drain waits for it
    // (its batch commits) and the daemon exits well within drain_timeout.
    let topic_label = format!("topic=\"{}\"", cfg.topic);
    let consumed = [topic_label.as_str(), "partition=\"0\""];
    produce_to(
        &cfg.topic,
        &[(0, event("slow-2", "test.slow", "c-slow", json!({})))],
    );
    daemon.wait_until(LONG, "the second slow event taken", || {
        metric(&daemon, "nudge_events_consumed_total", &consumed) == Some(2.0)
    });
    let store = cfg.store.clone();
    let took = daemon.terminate();
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM took {took:?}, drain_timeout is 10s"
    );
    // It finished the evaluation in hand: both slow events are dead letters.
    let conn = store_reader(&store).unwrap();
    let stored: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM dead_letters WHERE reason LIKE '%rules.timeout%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 2);
}
