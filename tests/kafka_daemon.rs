//! `nudge run` against a real Kafka-protocol broker (tansu) and real HTTP
//! endpoints: third-party producer, dead letters, crash and rebalance.

mod harness;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::*;
use serde_json::json;

const LONG: Duration = Duration::from_secs(90);

/// The example events, re-timed to now (so nothing is past its lateness bound),
/// split into starts and the exit events that must come after the pushes.
fn examples_now() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(repo().join("examples/events.jsonl")).unwrap();
    let now = chrono::Utc::now().to_rfc3339();
    let (mut starts, mut exits) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut e: serde_json::Value = serde_json::from_str(line).unwrap();
        e["time"] = json!(now);
        let t = e["type"].as_str().unwrap().to_string();
        let line = format!("{}\t{}", e["subject"].as_str().unwrap(), e);
        if t.ends_with(".signed") || t.ends_with(".withdrawn") || t.ends_with(".enrolled") {
            exits.push(line);
        } else {
            starts.push(line);
        }
    }
    (starts, exits)
}

fn kcat_produce(topic: &str, lines: &[String]) {
    let mut child = Command::new(repo().join("scripts/kafka-broker.sh"))
        .args(["kcat", "-b", &brokers(), "-t", topic, "-P", "-K", "\t"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat");
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success(), "kcat failed");
}

#[test]
fn kcat_produced_examples_reach_the_endpoints_exactly() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 3);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);

    let (starts, exits) = examples_now();
    kcat_produce(&cfg.topic, &starts);
    // Loans A-1, A-2, A-3 (A-3 delivered twice), the Netflix rise and Dana's invite.
    daemon.wait_until(LONG, "five pushes", || recv.on("/push").len() >= 5);
    kcat_produce(&cfg.topic, &exits);
    daemon.wait_until(LONG, "the exits to be stored", || {
        let counts = store_counts(&cfg.store);
        counts.get("pending") == Some(&2) && counts.get("cancelled") == Some(&4)
    });

    let pushes = recv.on("/push");
    let mut got: Vec<(String, String)> = pushes
        .iter()
        .map(|r| {
            (
                r.body["customer"].as_str().unwrap().to_string(),
                r.body["template"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("c-1001".into(), "loan_unsigned_push".into()),
            ("c-1002".into(), "loan_unsigned_push".into()),
            ("c-1002".into(), "loan_unsigned_push".into()),
            ("c-1003".into(), "fee_increase_alert".into()),
            ("c-1004".into(), "energy_rebate_invite".into()),
        ],
        "{}",
        daemon.log_tail()
    );
    for r in &pushes {
        assert_eq!(
            r.key,
            format!(
                "{}:{}",
                r.body["instance"].as_str().unwrap(),
                r.body["step"].as_str().unwrap()
            )
        );
    }
    assert!(
        recv.on("/email").is_empty() && recv.on("/call").is_empty(),
        "later steps are not due yet"
    );
    // A-2's email and call wait; A-1 (signed) and A-3 (withdrawn) lost theirs.
    let sent = sent_steps(&cfg.store);
    assert_eq!(sent.len(), 5);
    let took = daemon.terminate();
    assert!(
        took < Duration::from_secs(10),
        "drained within the deadline"
    );
}

fn store_counts(path: &std::path::Path) -> HashMap<String, i64> {
    use nudge::store::Store;
    store(path).step_counts().unwrap().into_iter().collect()
}

#[test]
fn bad_records_go_to_the_dead_letter_topic_and_the_daemon_keeps_going() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    // The shipped rules plus a journey whose script throws.
    let rules = dir.path().join("rules");
    copy_rules(&rules);
    std::fs::write(
        rules.join("explode.rhai"),
        r#"fn journey() { #{ name: "explode", category: "service", triggers: ["test.explode"],
             steps: [#{ id: "push", channel: "push", template: "t", delay: "0s" }] } }
           fn decide(event, customer) { throw "boom: " + event.id; }"#,
    )
    .unwrap();
    cfg.rules = rules;
    create_topic(&rt, &cfg.topic, 2);
    create_topic(&rt, &cfg.dlq, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);

    let malformed = ("c-1".to_string(), b"{\"id\": \"x\", oops".to_vec());
    let not_cloudevent = (
        "c-2".to_string(),
        br#"{"id":"e2","type":"loan_application.completed","time":"2026-01-01T00:00:00Z"}"#
            .to_vec(),
    );
    let unknown = event("e3", "card.transaction", "c-3", json!({"amount": 3}));
    let throws = event("e4", "test.explode", "c-4", json!({}));
    let contact = event(
        "e5",
        "customer.contact_updated",
        "c-5",
        json!({"app_installed": true}),
    );
    let good = event(
        "e6",
        "loan_application.completed",
        "c-5",
        json!({"application_id": "A-9", "product": "Car loan", "amount": 100, "signed": false, "resume_url": "u"}),
    );
    // An exit whose instance key is misnamed cannot say what it ends.
    let exit_without_key = event(
        "e7",
        "loan_application.signed",
        "c-5",
        json!({"applicationId": "A-9"}),
    );
    // Contact data in the wrong field: refused, and not repeated in the log.
    let leaky = event(
        "e8",
        "customer.contact_updated",
        "c-6",
        json!({"timezone": "+61 400 111 222"}),
    );
    // Keyed by something else, and without a key (empty here): counted as
    // key mismatches.
    let mut other_key = event(
        "e9",
        "customer.contact_updated",
        "c-7",
        json!({"app_installed": true}),
    );
    other_key.0 = "c-someone-else".into();
    let mut no_key = event(
        "e10",
        "customer.contact_updated",
        "c-8",
        json!({"app_installed": true}),
    );
    no_key.0 = String::new();
    // A profile that every later decision would read and keep a copy of.
    let fields: serde_json::Map<String, serde_json::Value> = (0..1_000)
        .map(|i| (format!("field_{i}"), json!("x".repeat(90))))
        .collect();
    let oversized = event(
        "e11",
        "customer.profile_updated",
        "c-9",
        json!({ "profile": fields }),
    );
    produce(
        &cfg.topic,
        &[
            malformed.clone(),
            not_cloudevent.clone(),
            unknown,
            throws.clone(),
            contact,
            good,
            exit_without_key.clone(),
            leaky,
            other_key,
            no_key,
            oversized.clone(),
        ],
    );

    daemon.wait_until(LONG, "the good event's push", || {
        recv.on("/push").len() == 1
    });
    let letters = read_topic(&cfg.dlq, 6);
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l.headers["nudge.reason"].as_str())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not valid JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("not a CloudEvent: missing `")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("boom: e4")),
        "{reasons:?}"
    );
    let by_payload: HashMap<&[u8], &Letter> =
        letters.iter().map(|l| (l.payload.as_slice(), l)).collect();
    for original in [&malformed, &not_cloudevent, &throws] {
        let l = by_payload
            .get(original.1.as_slice())
            .expect("original bytes kept");
        assert_eq!(l.key.as_deref(), Some(original.0.as_bytes()));
        assert_eq!(l.headers["nudge.source.topic"], cfg.topic);
        assert!(l.headers["nudge.source.offset"].parse::<i64>().is_ok());
    }
    assert_eq!(
        by_payload[throws.1.as_slice()].headers["nudge.journey"],
        "explode"
    );
    let unkeyed_exit = &by_payload[exit_without_key.1.as_slice()].headers;
    assert_eq!(unkeyed_exit["nudge.journey"], "unsigned_loan");
    assert!(
        unkeyed_exit["nudge.reason"].contains("has no data.application_id")
            && unkeyed_exit["nudge.reason"].contains("nothing ended"),
        "{unkeyed_exit:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("timezone is not an IANA zone")),
        "{reasons:?}"
    );
    let overgrown = &by_payload[oversized.1.as_slice()].headers["nudge.reason"];
    assert!(
        overgrown.contains("the profile would hold 1000 fields")
            && overgrown.contains("over the limit of 256 fields"),
        "{overgrown}"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        !log.contains("400 111 222"),
        "contact data in the log: {log}"
    );

    let (_, metrics) = daemon.get("/metrics").unwrap();
    assert!(
        metrics.contains("nudge_dead_letters_total{kind=\"invalid\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nudge_dead_letters_total{kind=\"rule\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nudge_dead_letters_total{kind=\"context\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nudge_key_mismatch_total 2"),
        "a record keyed by another id and one without a key: {metrics}"
    );
    assert!(
        metrics.contains("nudge_rule_errors_total{journey=\"explode\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nudge_events_ignored_total 1"),
        "unknown types are ignored and counted: {metrics}"
    );
    assert!(
        metrics.contains("nudge_steps_total{channel=\"push\",outcome=\"sent\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nudge_ingest_batch_seconds_bucket{le=\"0.001\"}")
            && !metrics.contains("nudge_ingest_batch_seconds_count 0"),
        "batch latency is a histogram with buckets: {metrics}"
    );
    daemon.terminate();
}

/// `n` customers: each gets a contact update; every fifth completes a loan;
/// the rest of the `total` events are card transactions no journey reads.
fn workload(total: usize, customers: usize) -> (Vec<(String, Vec<u8>)>, usize) {
    let mut records = Vec::with_capacity(total);
    let mut loans = 0;
    for c in 0..customers {
        let cust = format!("c{c}");
        records.push(event(
            &format!("ctx-{c}"),
            "customer.contact_updated",
            &cust,
            json!({"app_installed": true, "email": "x@example.com"}),
        ));
        if c % 5 == 0 {
            loans += 1;
            records.push(unsigned_loan(c, "Personal loan"));
        }
    }
    let mut i = 0;
    while records.len() < total {
        let cust = format!("c{}", i % customers);
        records.push(event(
            &format!("card-{i}"),
            "card.transaction",
            &cust,
            json!({"amount": i}),
        ));
        i += 1;
    }
    (records, loans)
}

fn assert_exactly_once(recv: &Receiver, store_path: &std::path::Path, expected: usize, logs: &str) {
    let by_key = recv.by_key();
    assert_eq!(
        by_key.len(),
        expected,
        "distinct idempotency keys at the endpoint\n{logs}"
    );
    let sent = sent_steps(store_path);
    let distinct: HashSet<_> = sent.iter().collect();
    assert_eq!(
        sent.len(),
        expected,
        "one `sent` record per step in the dispatch log"
    );
    assert_eq!(distinct.len(), expected, "no step logged as sent twice");
    for (instance, step) in &sent {
        assert!(
            by_key.contains_key(&format!("{instance}:{step}")),
            "logged sends reached the endpoint"
        );
    }
}

#[test]
fn sigkill_at_several_points_loses_nothing_and_sends_each_step_once() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.scheduler = "lease = \"5m\"\nretry_base = \"100ms\"".into();
    create_topic(&rt, &cfg.topic, 6);
    let (records, loans) = workload(20_000, 5_000);
    produce(&cfg.topic, &records);

    let mut logs = String::new();
    let mut claimed_at_kill = HashSet::new();
    for (round, kill_after) in [loans / 10, loans / 3, loans * 2 / 3]
        .into_iter()
        .enumerate()
    {
        let daemon = Daemon::start(&cfg, &format!("run{round}"));
        daemon.wait_until(LONG, "progress before the kill", || {
            recv.by_key().len() >= kill_after
        });
        logs.push_str(&daemon.log_tail());
        daemon.kill();
        claimed_at_kill = claimed_keys(&cfg.store);
    }
    let daemon = Daemon::start(&cfg, "final");
    // The lease is five minutes: the steps the last kill left claimed go out
    // within seconds only because a restarted owner releases them at start.
    let ready_after = daemon.wait_ready(LONG);
    let started = std::time::Instant::now();
    daemon.wait_until(
        Duration::from_secs(10),
        "the steps claimed at the kill, re-sent",
        || {
            let got = recv.by_key();
            claimed_at_kill.iter().all(|k| got.contains_key(k))
        },
    );
    eprintln!(
        "{} steps claimed at the last kill re-sent {:?} after readiness ({ready_after:?} to ready)",
        claimed_at_kill.len(),
        started.elapsed()
    );
    // Earlier runs may have finished the work; the last one must still come up.
    daemon.wait_until(LONG, "the last daemon to own every partition", || {
        daemon.partitions() == Some(6)
    });
    // Recorded, not only received: a push delivered before a kill but not
    // recorded goes again (same key) once the final daemon gets to it.
    daemon.wait_until(LONG * 2, "every push recorded and every offset", || {
        recv.by_key().len() >= loans
            && stored_offsets_total(&cfg.store, &cfg.topic) == records.len() as i64
            && sent_steps(&cfg.store).len() >= loans
    });
    // Leased steps of killed runs were re-sent only if their send was not recorded.
    daemon.wait_until(LONG, "no claimed step left", || {
        !store_counts(&cfg.store).contains_key("claimed")
    });
    daemon.terminate();
    assert_exactly_once(&recv, &cfg.store, loans, &logs);
    let instances = store(&cfg.store);
    use nudge::store::Store;
    let pending = instances
        .step_counts()
        .unwrap()
        .into_iter()
        .find(|(s, _)| s == "pending")
        .map(|(_, n)| n);
    assert_eq!(
        pending,
        Some(2 * loans as i64),
        "every loan's email and call are scheduled: no event lost"
    );
    let repeats = recv.requests().len() - loans;
    eprintln!("{loans} pushes, {repeats} repeated deliveries (same idempotency key) after kills");
}

#[test]
fn a_second_daemon_on_one_store_is_refused_and_a_successor_takes_over_halfway() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 6);
    let (records, loans) = workload(10_000, 2_500);
    let a = Daemon::start(&cfg, "a");
    a.wait_until(LONG, "a to own every partition", || {
        a.partitions() == Some(6)
    });

    // One daemon per SQLite file: a second one exits at start, naming the holder.
    let b = Daemon::start(&cfg, "b");
    wait_for_or(
        LONG,
        "the second daemon to refuse the store",
        || b.exited().is_some(),
        || b.log_tail(),
    );
    let status = b.exited().unwrap();
    let refusal = b.log_tail();
    assert!(!status.success(), "{status:?}\n{refusal}");
    assert!(
        refusal.contains("in use by another nudge process")
            && refusal.contains(&format!("pid {}", a.pid()))
            && refusal.contains(cfg.store.to_str().unwrap()),
        "{refusal}"
    );
    assert!(
        a.exited().is_none(),
        "the owner keeps running:\n{}",
        a.log_tail()
    );

    produce(&cfg.topic, &records);
    a.wait_until(LONG, "halfway", || recv.by_key().len() >= loans / 2);
    a.terminate();
    let c = Daemon::start(&cfg, "c");
    c.wait_until(LONG, "the successor to own every partition", || {
        c.partitions() == Some(6)
    });
    c.wait_until(LONG * 2, "every push and offset", || {
        recv.by_key().len() >= loans
            && stored_offsets_total(&cfg.store, &cfg.topic) == records.len() as i64
    });
    let logs = c.log_tail();
    c.terminate();
    assert_exactly_once(&recv, &cfg.store, loans, &logs);
    assert_eq!(
        recv.requests().len(),
        loans,
        "a graceful hand-over repeats nothing"
    );
}

/// Idempotency keys of the steps a store holds as claimed (being sent).
fn claimed_keys(path: &std::path::Path) -> HashSet<String> {
    let conn = store_reader(path).expect("the store exists");
    let mut stmt = conn
        .prepare("SELECT instance_id || ':' || step FROM steps WHERE status = 'claimed'")
        .unwrap();
    let keys = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    keys
}

/// The rules version of a daemon that answers `/readyz`; fails otherwise.
fn loaded_version(daemon: &Daemon) -> String {
    daemon.rules_version().unwrap_or_else(|| {
        panic!(
            "/readyz of {} gave no rules version; log tail:\n{}",
            daemon.name,
            daemon.log_tail()
        )
    })
}

/// The rules directory as Kubernetes mounts a ConfigMap: each file a symlink
/// through `..data`, itself a symlink to a timestamped directory.
fn configmap_layout(dir: &std::path::Path) -> std::path::PathBuf {
    let mount = dir.join("mount");
    std::fs::create_dir(&mount).unwrap();
    copy_rules(&mount.join("..2026_v1"));
    std::os::unix::fs::symlink("..2026_v1", mount.join("..data")).unwrap();
    for f in std::fs::read_dir(mount.join("..2026_v1")).unwrap() {
        let name = f.unwrap().file_name();
        std::os::unix::fs::symlink(
            std::path::Path::new("..data").join(&name),
            mount.join(&name),
        )
        .unwrap();
    }
    mount
}

#[test]
fn with_watch_on_rules_reload_on_a_configmap_swap_and_on_an_edit() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.rules = configmap_layout(dir.path());
    cfg.watch = true;
    create_topic(&rt, &cfg.topic, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    let v1 = loaded_version(&daemon);

    // What the kubelet does on a ConfigMap update: a new data directory, then
    // an atomic rename of a new `..data` symlink over the old one.
    let v2 = cfg.rules.join("..2026_v2");
    copy_dir(&cfg.rules.join("..2026_v1"), &v2);
    let fee = v2.join("fee_increase.rhai");
    let text = std::fs::read_to_string(&fee).unwrap();
    std::fs::write(&fee, text.replace("priority: 50", "priority: 52")).unwrap();
    std::os::unix::fs::symlink("..2026_v2", cfg.rules.join("..data_tmp")).unwrap();
    std::fs::rename(cfg.rules.join("..data_tmp"), cfg.rules.join("..data")).unwrap();
    // A /readyz that does not answer is no new version: `is_some_and`.
    daemon.wait_until(LONG, "the swapped rules", || {
        daemon.rules_version().is_some_and(|v| v != v1)
    });
    let v2_version = loaded_version(&daemon);

    // Edited in place (a bind mount, a local directory).
    let text = std::fs::read_to_string(&fee).unwrap();
    std::fs::write(&fee, text.replace("priority: 52", "priority: 53")).unwrap();
    daemon.wait_until(LONG, "the edited rules", || {
        daemon.rules_version().is_some_and(|v| v != v2_version)
    });
    daemon.terminate();
}

#[test]
fn sighup_reloads_good_rules_and_refuses_broken_ones() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    let rules = dir.path().join("rules");
    copy_rules(&rules);
    cfg.rules = rules.clone();
    create_topic(&rt, &cfg.topic, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    let v1 = loaded_version(&daemon);

    let fee = rules.join("fee_increase.rhai");
    let good = std::fs::read_to_string(&fee).unwrap();
    std::fs::write(&fee, good.replace("let currency", "let currency = ;")).unwrap();
    daemon.signal("HUP");
    daemon.wait_until(LONG, "the refusal in the log", || {
        std::fs::read_to_string(&daemon.log)
            .unwrap()
            .contains("rules reload refused")
    });
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    let refusal = log
        .lines()
        .find(|l| l.contains("rules reload refused"))
        .unwrap();
    assert!(
        refusal.contains("fee_increase.rhai") && refusal.contains("\"line\":"),
        "names file and line: {refusal}"
    );
    assert_eq!(
        daemon.rules_version(),
        Some(v1.clone()),
        "the old rules keep running"
    );
    // Still ready, but /readyz and a gauge say a restart would not start.
    let readyz = daemon.readyz().unwrap();
    assert_eq!(readyz.status, 200, "{:?}", readyz.body);
    let refused = &readyz.body["rules_refused"];
    assert!(
        refused["first"]
            .as_str()
            .is_some_and(|f| f.contains("fee_increase.rhai:")),
        "{refused}"
    );
    assert!(refused["since"].is_string(), "{refused}");
    let gauge = |daemon: &Daemon| {
        let (_, text) = daemon.get("/metrics").unwrap();
        text.lines()
            .find(|l| l.starts_with("nudge_rules_refused "))
            .map(String::from)
    };
    assert_eq!(gauge(&daemon).as_deref(), Some("nudge_rules_refused 1"));

    // Put back as it was: the same version as in force, and the refusal over.
    std::fs::write(&fee, &good).unwrap();
    daemon.signal("HUP");
    daemon.wait_until(LONG, "the refusal's end in the log", || {
        std::fs::read_to_string(&daemon.log)
            .unwrap()
            .contains("rules on disk compile again")
    });
    assert!(daemon.readyz().unwrap().body["rules_refused"].is_null());
    assert_eq!(gauge(&daemon).as_deref(), Some("nudge_rules_refused 0"));

    std::fs::write(&fee, good.replace("priority: 50", "priority: 51")).unwrap();
    daemon.signal("HUP");
    daemon.wait_until(LONG, "the new version", || {
        daemon.rules_version().is_some_and(|v| v != v1)
    });
    assert!(daemon.readyz().unwrap().body["rules_refused"].is_null());
    assert_eq!(gauge(&daemon).as_deref(), Some("nudge_rules_refused 0"));
    let versions: i64 = rusqlite::Connection::open(&cfg.store)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM rule_versions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 2, "each loaded version is recorded");
    daemon.terminate();
}

/// The harness itself: a daemon that is gone is never ready and never
/// reports a version, so waits on it fail at once and show its log.
#[test]
fn waits_on_a_dead_daemon_fail_at_once_with_its_log() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.rules = dir.path().join("no-such-rules");
    let daemon = Daemon::start(&cfg, "dead");
    let failure = |wait: &dyn Fn()| -> String {
        let started = std::time::Instant::now();
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(wait))
            .expect_err("a wait on a dead daemon fails");
        assert!(
            started.elapsed() < LONG / 2,
            "failed at once, not at the limit"
        );
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let not_ready = failure(&|| {
        daemon.wait_ready(LONG);
    });
    assert!(
        not_ready.contains("exited") && not_ready.contains("do not compile"),
        "names the exit and shows the log: {not_ready}"
    );
    assert_eq!(daemon.rules_version(), None, "no answer is no version");
    let no_version = failure(&|| {
        daemon.wait_until(LONG, "another rules version", || {
            daemon.rules_version().is_some_and(|v| v != "v1")
        })
    });
    assert!(no_version.contains("exited"), "{no_version}");
}

/// The store stops answering writes (another process holds SQLite's write
/// lock longer than the daemon's busy timeout): the daemon keeps running,
/// stops consuming, says why on `/readyz`, and once the store is back it
/// stores the same batch and sends each step once.
#[test]
fn a_store_that_refuses_writes_makes_the_daemon_not_ready_until_it_returns() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 2);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);

    let blocker = rusqlite::Connection::open(&cfg.store).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (records, loans) = workload(200, 50);
    produce(&cfg.topic, &records);
    daemon.wait_until(LONG, "/readyz to say the store refuses the batch", || {
        daemon.readyz().is_some_and(|r| {
            !r.ready()
                && r.body["store"]
                    .as_str()
                    .is_some_and(|s| s.contains("storing a batch failed") && s.contains("locked"))
        })
    });
    assert!(daemon.exited().is_none(), "the daemon keeps running");
    assert_eq!(recv.requests().len(), 0, "nothing decided, nothing sent");

    blocker.execute_batch("ROLLBACK").unwrap();
    daemon.wait_until(LONG, "ready again with every push sent", || {
        daemon
            .readyz()
            .is_some_and(|r| r.ready() && r.body["store"] == "ok")
            && recv.by_key().len() >= loans
    });
    daemon.wait_until(LONG, "every offset stored", || {
        stored_offsets_total(&cfg.store, &cfg.topic) == records.len() as i64
    });
    let logs = daemon.log_tail();
    daemon.terminate();
    assert_exactly_once(&recv, &cfg.store, loans, &logs);
}

/// A customer completes a loan and signs it while the daemon is down, with
/// many other records between the two: at start the daemon reads them all
/// before it sends, so the reminder push that fell due in the gap is not
/// sent (the journey converted), while the other customers' pushes go.
#[test]
fn a_customer_who_acted_while_the_daemon_was_down_is_not_sent_the_step_due_meanwhile() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 1);
    let loan = |c: &str, id: &str| {
        event(
            id,
            "loan_application.completed",
            c,
            json!({"application_id": "A1", "product": "Personal loan", "amount": 1000, "signed": false, "resume_url": "u"}),
        )
    };
    let mut records = vec![
        event(
            "ctx-signer",
            "customer.contact_updated",
            "signer",
            json!({"app_installed": true}),
        ),
        loan("signer", "loan-signer"),
    ];
    let (filler, loans) = workload(20_000, 2_000);
    records.extend(filler);
    records.push(event(
        "signed-signer",
        "loan_application.signed",
        "signer",
        json!({"application_id": "A1"}),
    ));
    produce(&cfg.topic, &records);

    let daemon = Daemon::start(&cfg, "d");
    daemon.wait_until(LONG, "every record decided", || {
        store_reader(&cfg.store).is_some_and(|c| {
            c.query_row(
                "SELECT COALESCE(SUM(next_offset), 0) FROM kafka_offsets",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
                == records.len() as i64
        })
    });
    daemon.wait_until(LONG, "the other customers' pushes", || {
        recv.by_key().len() >= loans
    });
    let logs = daemon.log_tail();
    daemon.terminate();
    let to_signer = recv
        .requests()
        .into_iter()
        .filter(|r| r.body["customer"] == "signer")
        .count();
    assert_eq!(to_signer, 0, "the signer was sent a reminder\n{logs}");
    let conn = store_reader(&cfg.store).unwrap();
    let outcome: String = conn
        .query_row(
            "SELECT outcome FROM dispatch_log WHERE customer = 'signer' AND step = 'push'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(outcome, "converted", "{logs}");
    assert!(logs.contains("sending begins"), "{logs}");
}

/// The instance of `customer`'s unsigned loan as the store at `path` holds it.
fn loan_status(path: &std::path::Path, customer: &str) -> Option<String> {
    store_reader(path)?
        .query_row(
            "SELECT status FROM instances WHERE customer = ?1 AND journey = 'unsigned_loan'",
            [customer],
            |r| r.get(0),
        )
        .ok()
}

/// The store restored from a backup taken before the customer signed, as
/// deploy/README's rollback says: the daemon reads again from the store's
/// offset (behind the group's committed one), so the signature is decided
/// again and the reminders stay cancelled; nothing after the backup is lost.
#[test]
fn a_store_restored_from_a_backup_reads_again_what_came_after_it() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 1);
    produce(
        &cfg.topic,
        &[
            event(
                "ctx-c1",
                "customer.contact_updated",
                "c1",
                json!({"app_installed": true, "email": "c1@example.com"}),
            ),
            event(
                "loan-c1",
                "loan_application.completed",
                "c1",
                json!({"application_id": "A1", "product": "Personal loan", "amount": 5000, "signed": false, "resume_url": "u"}),
            ),
        ],
    );
    let daemon = Daemon::start(&cfg, "d");
    daemon.wait_until(LONG, "the loan push", || recv.on("/push").len() == 1);
    daemon.wait_until(LONG, "both records stored", || {
        stored_offsets_total(&cfg.store, &cfg.topic) == 2
    });
    daemon.terminate();
    let backup = dir.path().join("backup.db");
    rusqlite::Connection::open(&cfg.store)
        .unwrap()
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();

    produce(
        &cfg.topic,
        &[event(
            "signed-c1",
            "loan_application.signed",
            "c1",
            json!({"application_id": "A1"}),
        )],
    );
    let daemon = Daemon::start(&cfg, "d");
    daemon.wait_until(LONG, "the signature decided", || {
        loan_status(&cfg.store, "c1").as_deref() == Some("converted")
    });
    daemon.terminate();

    // The rollback: the backup replaces the store (its -wal and -shm with it).
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", cfg.store.display()));
    }
    std::fs::copy(&backup, &cfg.store).unwrap();
    assert_eq!(loan_status(&cfg.store, "c1").as_deref(), Some("open"));
    let daemon = Daemon::start(&cfg, "d");
    daemon.wait_ready(LONG);
    daemon.wait_until(
        Duration::from_secs(30),
        "the signature decided again",
        || loan_status(&cfg.store, "c1").as_deref() == Some("converted"),
    );
    assert_eq!(stored_offsets_total(&cfg.store, &cfg.topic), 3);
    let logs = daemon.log_tail();
    daemon.terminate();
    assert_eq!(recv.on("/push").len(), 1, "{logs}");
    assert!(recv.on("/email").is_empty(), "{logs}");
}

/// The partition's log restarted beneath the store's offset (a topic
/// re-created while the daemon was down): the daemon starts the partition
/// at the log's beginning, decides its records and says so, though the
/// broker (tansu) answers the store's offset with an empty fetch rather
/// than as out of range. (It waited there for an offset the new log would
/// reach only after as many records, reporting ready.)
#[test]
fn a_log_that_restarted_beneath_the_stores_offset_is_read_from_its_start() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 1);
    produce(
        &cfg.topic,
        &[event(
            "ctx-c1",
            "customer.contact_updated",
            "c1",
            json!({"app_installed": true, "email": "c1@example.com"}),
        )],
    );
    let daemon = Daemon::start(&cfg, "d");
    daemon.wait_until(LONG, "the contact stored", || {
        stored_offsets_total(&cfg.store, &cfg.topic) == 1
    });
    daemon.terminate();
    // As after the topic was re-created: the store is 100 records ahead of
    // a log that holds two.
    let moved = rusqlite::Connection::open(&cfg.store)
        .unwrap()
        .execute(
            "UPDATE kafka_offsets SET next_offset = 100 WHERE topic = ?1",
            [&cfg.topic],
        )
        .unwrap();
    assert_eq!(moved, 1);
    produce(
        &cfg.topic,
        &[event(
            "loan-c1",
            "loan_application.completed",
            "c1",
            json!({"application_id": "A1", "product": "Personal loan", "amount": 5000, "signed": false, "resume_url": "u"}),
        )],
    );
    let daemon = Daemon::start(&cfg, "d");
    daemon.wait_until(LONG, "the loan push", || recv.on("/push").len() == 1);
    daemon.wait_until(LONG, "the store's offset back on the log", || {
        stored_offsets_total(&cfg.store, &cfg.topic) == 2
    });
    let logs = daemon.log_tail();
    daemon.terminate();
    assert!(
        logs.contains("the broker's log is behind the store's offset"),
        "{logs}"
    );
}

/// Under steady traffic the consumer is never idle for a second, so being
/// caught up with what waited at start is when every partition reaches
/// records produced after the assignment: sending begins then, not after
/// `kafka.catch_up_timeout` (every start held all sending for it).
#[test]
fn under_steady_traffic_sending_begins_once_what_waited_is_read() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.kafka.push_str("\ncatch_up_timeout = \"5m\"");
    create_topic(&rt, &cfg.topic, 2);
    // What waited at start: one customer's loan, a push to send.
    produce(
        &cfg.topic,
        &[
            event(
                "ctx-w",
                "customer.contact_updated",
                "c1",
                json!({"app_installed": true}),
            ),
            unsigned_loan(1, "Personal loan"),
        ],
    );
    // Then steady traffic, from before the daemon starts until it sends.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, topic) = (stop.clone(), cfg.topic.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..10)
                    .map(|i| {
                        n += 1;
                        event(
                            &format!("ctx-{n}"),
                            "customer.contact_updated",
                            &format!("c-busy-{i}"),
                            json!({"timezone": "Australia/Sydney"}),
                        )
                    })
                    .collect();
                produce(&topic, &batch);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_until(LONG, "sending to begin", || {
        std::fs::read_to_string(&daemon.log)
            .unwrap_or_default()
            .contains("sending begins")
    });
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        !log.contains("sending begins before the records that waited were read"),
        "{}",
        daemon.log_tail()
    );
    assert!(
        log.contains("each partition reached records produced after it was assigned"),
        "{}",
        daemon.log_tail()
    );
    daemon.wait_until(LONG, "the waiting loan's push", || {
        !recv.on("/push").is_empty()
    });
}

/// A receiver that cannot be reached: each step is tried `max_attempts`
/// times, recorded `failed`, and the log says so, once per channel and
/// cause, with ids and the error's kind (a receiver's answer may quote the
/// customer, so it stays in the dispatch log).
#[test]
fn steps_given_up_on_an_unreachable_receiver_are_logged_once_per_cause() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.receiver = format!("http://127.0.0.1:{}", free_port());
    cfg.scheduler = "lease = \"2s\"\nretry_base = \"50ms\"\nmax_attempts = 2".into();
    create_topic(&rt, &cfg.topic, 1);
    let mut records = Vec::new();
    for c in 0..3 {
        records.push(event(
            &format!("ctx-{c}"),
            "customer.contact_updated",
            &format!("c{c}"),
            json!({"app_installed": true}),
        ));
        records.push(unsigned_loan(c, "Personal loan"));
    }
    produce(&cfg.topic, &records);

    let daemon = Daemon::start(&cfg, "d");
    daemon.wait_until(LONG, "three pushes failed", || {
        store_reader(&cfg.store).is_some_and(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM dispatch_log WHERE outcome = 'failed' AND channel = 'push'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
                == 3
        })
    });
    let logs = daemon.log_tail();
    daemon.terminate();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("step given up"))
        .collect();
    assert_eq!(lines.len(), 1, "one line for the three pushes:\n{logs}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    for (field, value) in [
        ("channel", json!("push")),
        ("journey", json!("unsigned_loan")),
        ("outcome", json!("failed")),
        ("cause", json!("transport")),
        ("attempts", json!(2)),
    ] {
        assert_eq!(line[field], value, "{field} in {line}");
    }
    assert!(line["instance"].is_string(), "{line}");
    assert!(!lines[0].contains("Personal loan"), "{}", lines[0]);
}

/// A signature read before the application it signs (one partition, sent
/// out of order; or the signature keyed to another partition and read
/// first): the journey does not start, nothing is sent, and `nudge explain`
/// says why. A signature of another application changes nothing. On both
/// stores: the exit is remembered in the customer's context. A contact
/// update refused for a bad field is in the record too, with why.
#[test]
fn an_exit_read_before_its_trigger_ends_the_journey_before_it_starts() {
    let rt = runtime();
    for backend in ["sqlite", "postgres"] {
        let dir = tempfile::tempdir().unwrap();
        let recv = Receiver::start(&rt);
        let schema = Schema::new();
        let mut cfg = DaemonConfig::new(dir.path(), &recv);
        if backend == "postgres" {
            cfg.store_url = Some(schema.url.clone());
        }
        create_topic(&rt, &cfg.topic, 1);
        let now = chrono::Utc::now();
        let at = |t: chrono::DateTime<chrono::Utc>| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        let record = |id: &str, kind: &str, customer: &str, time: &str, app: &str| {
            let e = json!({"specversion": "1.0", "id": id, "type": kind, "source": "core-banking",
                "subject": customer, "time": time, "data": {"application_id": app,
                "product": "Personal loan", "amount": 1000, "signed": false, "resume_url": "u"}});
            (customer.to_string(), serde_json::to_vec(&e).unwrap())
        };
        let (completed, signed) = (at(now - chrono::Duration::minutes(2)), at(now));
        let mut records = Vec::new();
        for c in ["early", "other"] {
            records.push(event(
                &format!("ctx-{c}"),
                "customer.contact_updated",
                c,
                json!({"app_installed": true}),
            ));
        }
        records.push(event(
            "ctx-bad",
            "customer.contact_updated",
            "early",
            json!({"timezone": "Mars/Olympus", "email": "early@example.com"}),
        ));
        records.extend([
            record(
                "s-early",
                "loan_application.signed",
                "early",
                &signed,
                "A-1",
            ),
            record(
                "s-other",
                "loan_application.signed",
                "other",
                &signed,
                "A-9",
            ),
            record(
                "c-early",
                "loan_application.completed",
                "early",
                &completed,
                "A-1",
            ),
            record(
                "c-other",
                "loan_application.completed",
                "other",
                &completed,
                "A-1",
            ),
        ]);
        produce(&cfg.topic, &records);

        let daemon = Daemon::start(&cfg, backend);
        daemon.wait_until(LONG, "the other customer's push", || {
            !recv.on("/push").is_empty()
        });
        let logs = daemon.log_tail();
        daemon.terminate();
        let customers: Vec<String> = recv
            .requests()
            .iter()
            .map(|r| r.body["customer"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(customers, ["other"], "{backend}\n{logs}");

        let (config, _) = cfg.write("review");
        let (code, out, err) = nudge(&["explain", "early", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{backend}: {err}");
        assert!(
            out.contains("unsigned_loan not started by event c-early (already ended by an exit read before it): loan_application.signed (event s-early"),
            "{backend}: {out}"
        );
        assert!(
            out.contains("customer.contact_updated (id ctx-bad), partly refused and dead-lettered (nothing decided): invalid customer update: timezone is not an IANA zone (like Australia/Sydney); its other fields were applied (email)"),
            "{backend}: {out}"
        );
        // The good field of it was applied: the new address, masked.
        assert!(
            out.contains("contact now: timezone -, app yes, email e***@example.com"),
            "{backend}: {out}"
        );
        let (code, out, err) = nudge(&[
            "explain",
            "early",
            "--format",
            "json",
            "--config",
            config.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{backend}: {err}");
        let record: serde_json::Value = serde_json::from_str(&out).unwrap();
        let refused: Vec<&serde_json::Value> = record["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["refused"].is_string())
            .collect();
        assert_eq!(refused.len(), 1, "{backend}: {out}");
        assert_eq!(refused[0]["event_id"], "ctx-bad", "{backend}: {out}");
        // The applied address is shown masked only.
        assert!(!out.contains("early@example.com"), "{backend}: {out}");
    }
}

/// (outcome, reason) of each dispatch-log record of `journey`, in order.
fn journey_log(path: &std::path::Path, journey: &str) -> Vec<(String, String)> {
    let Some(conn) = store_reader(path) else {
        return Vec::new();
    };
    let mut stmt = conn
        .prepare("SELECT outcome, reason FROM dispatch_log WHERE journey = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([journey], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn an_answer_that_came_while_the_daemon_stood_still_counts_as_sent_once() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let recv = Receiver::holding(&rt, gate.clone());
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("ping.rhai"),
        r#"fn journey() { #{ name: "ping", category: "service", triggers: ["test.ping"],
             steps: [#{ id: "push", channel: "push", template: "ping", delay: "0s" }] } }
           fn decide(event, customer) { start() }"#,
    )
    .unwrap();
    cfg.rules = rules;
    cfg.push = "timeout = \"1s\"".into();
    create_topic(&rt, &cfg.topic, 1);
    create_topic(&rt, &cfg.dlq, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_sending(LONG);
    produce(
        &cfg.topic,
        &[
            event(
                "contact",
                "customer.contact_updated",
                "c-paused",
                json!({"app_installed": true}),
            ),
            event("ping", "test.ping", "c-paused", json!({})),
        ],
    );
    daemon.wait_until(LONG, "the push to reach the receiver", || {
        recv.waiting() == 1
    });
    // The daemon stands still (SIGSTOP, a paused VM) while the receiver
    // answers, for longer than the push timeout and its allowance for a
    // stall: when it runs again, the timeout and the answer are both there.
    daemon.signal("STOP");
    gate.add_permits(1);
    wait_for(LONG, "the receiver to answer", || recv.waiting() == 0);
    std::thread::sleep(Duration::from_secs(3)); // the pause itself, not a wait for a result
    daemon.signal("CONT");
    gate.add_permits(100); // another try, if one went, is answered at once
    daemon.wait_until(LONG, "the push to be recorded", || {
        !journey_log(&cfg.store, "ping").is_empty()
    });
    let log = journey_log(&cfg.store, "ping");
    assert_eq!(
        log.iter().map(|(o, _)| o.as_str()).collect::<Vec<_>>(),
        ["sent"],
        "{log:?}\n{}",
        daemon.log_tail()
    );
    let keys = recv.by_key();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys.values().all(|&n| n == 1), "sent once: {keys:?}");
    daemon.terminate();
}

/// A misspelt topic among several: the others are read, but `/readyz`
/// says not ready and names it, and the log says so, until it exists.
#[test]
fn a_topic_missing_from_the_broker_is_named_until_it_exists() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    let missing = format!("{}-misspelt", cfg.topic);
    cfg.also_topics = vec![missing.clone()];
    create_topic(&rt, &cfg.topic, 1);
    let daemon = Daemon::start(&cfg, "topics");
    daemon.wait_until(LONG, "/readyz to name the missing topic", || {
        daemon.readyz().is_some_and(|r| {
            !r.ready()
                && r.body["reason"]
                    .as_str()
                    .is_some_and(|s| s == format!("kafka.topics: `{missing}` not on the broker"))
        })
    });
    assert!(
        daemon.log_tail().contains(&format!(
            "kafka.topics names topics the broker does not have ({missing})"
        )),
        "{}",
        daemon.log_tail()
    );
    // The topic that exists is read meanwhile.
    produce(&cfg.topic, &loans(0, 1));
    daemon.wait_until(LONG, "the push of the topic that exists", || {
        recv.by_key().len() == 1
    });
    create_topic(&rt, &missing, 1);
    daemon.wait_until(LONG, "ready once the topic exists", || {
        daemon.readyz().is_some_and(|r| r.ready())
    });
    daemon.terminate();
}
