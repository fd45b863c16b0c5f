//! The audit stream (`audit.topic`) as a warehouse sees it: a real daemon
//! writes the dispatch log from events on the real broker, and the topic
//! is read with kcat (a client nudge did not write). Every log record is
//! on the topic, keyed by its customer, in log order per customer; a broker
//! cut longer than the publisher's delivery timeout loses none.

mod harness;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(120);

/// One record read from the audit topic.
#[derive(Debug)]
struct Published {
    partition: i32,
    key: String,
    body: Value,
}

/// Everything on `topic` now, in each partition's order, read by kcat as
/// the client `client_id`.
fn consume(brokers: &str, client_id: &str, topic: &str) -> Vec<Published> {
    let out = Command::new("kcat")
        .args([
            "-C",
            "-b",
            brokers,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
        ])
        .args(["-X", &format!("client.id={client_id}")])
        .args(["-f", "%p\t%k\t%s\n"])
        .output()
        .expect("run kcat");
    assert!(
        out.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut parts = l.splitn(3, '\t');
            let partition = parts.next().unwrap().parse().unwrap();
            let key = parts.next().unwrap().to_string();
            let body = serde_json::from_str(parts.next().unwrap()).unwrap();
            Published {
                partition,
                key,
                body,
            }
        })
        .collect()
}

/// The store's log as seq → customer.
fn stored(db: &Path) -> HashMap<i64, String> {
    let conn = store_reader(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, customer FROM dispatch_log")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Each record keyed by its customer, in one partition per customer, and
/// the first copies of a customer's records in log (seq) order.
fn check_keys_and_order(records: &[Published]) {
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut seen = BTreeSet::new();
    for r in records {
        assert_eq!(r.body["customer"].as_str(), Some(r.key.as_str()), "{r:?}");
        let p = *partition_of.entry(&r.key).or_insert(r.partition);
        assert_eq!(p, r.partition, "one partition per customer: {r:?}");
        let seq = r.body["seq"].as_i64().unwrap();
        if !seen.insert(seq) {
            continue;
        }
        if let Some(prev) = last.insert(&r.key, seq) {
            assert!(
                prev < seq,
                "customer {} out of order: {prev} then {seq}",
                r.key
            );
        }
    }
}

#[test]
fn every_dispatch_log_record_is_on_the_topic_once_keyed_and_in_order() {
    let rt = runtime();
    let recv = Receiver::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    let audit = unique("audit");
    cfg.extra = format!("[audit]\ntopic = \"{audit}\"\n");
    create_topic(&rt, &cfg.topic, 3);
    create_topic(&rt, &audit, 3);
    let daemon = Daemon::start(&cfg, "audit");
    daemon.wait_ready(LONG);
    assert_eq!(
        daemon.readyz().unwrap().body["audit"]["topic"],
        json!(audit),
        "reported on /readyz"
    );

    // Several records per customer: contact updates and loans, with signings.
    let mut starts = Vec::new();
    let mut exits = Vec::new();
    for c in 0..40 {
        let customer = format!("c{c}");
        starts.push(event(
            &format!("ctx-{c}"),
            "customer.contact_updated",
            &customer,
            json!({"app_installed": true, "email": "x@example.com"}),
        ));
        for a in 0..2 {
            starts.push(event(
                &format!("loan-{c}-{a}"),
                "loan_application.completed",
                &customer,
                json!({"application_id": format!("A{c}-{a}"), "product": "Personal loan",
                       "amount": 1000, "signed": false, "resume_url": "u"}),
            ));
            exits.push(event(
                &format!("signed-{c}-{a}"),
                "loan_application.signed",
                &customer,
                json!({"application_id": format!("A{c}-{a}")}),
            ));
        }
    }
    produce(&cfg.topic, &starts);
    daemon.wait_until(LONG, "80 pushes", || recv.on("/push").len() >= 80);
    produce(&cfg.topic, &exits);
    let db = cfg.store.clone();
    daemon.wait_until(LONG, "the signings to be stored", || {
        store_reader(&db).is_some_and(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM instances WHERE status = 'converted'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
                == 80
        })
    });
    let log = stored(&db);
    assert!(log.len() >= 160, "{}", log.len());
    let mut records = Vec::new();
    daemon.wait_until(LONG, "every record on the audit topic", || {
        records = consume(&brokers(), "audit-test", &audit);
        records.len() >= log.len()
    });
    daemon.terminate();

    let seqs: Vec<i64> = records
        .iter()
        .map(|r| r.body["seq"].as_i64().unwrap())
        .collect();
    let distinct: BTreeSet<i64> = seqs.iter().copied().collect();
    assert_eq!(seqs.len(), distinct.len(), "exactly once");
    let logged: BTreeSet<i64> = log.keys().copied().collect();
    assert_eq!(distinct, logged, "every record, nothing else");
    for r in &records {
        let seq = r.body["seq"].as_i64().unwrap();
        assert_eq!(r.body["customer"].as_str(), Some(log[&seq].as_str()));
        for field in [
            "time",
            "journey",
            "instance",
            "step",
            "channel",
            "outcome",
            "reason",
            "rule_hash",
        ] {
            assert!(r.body.get(field).is_some(), "{field}: {r:?}");
        }
    }
    check_keys_and_order(&records);
    let outbox: i64 = store_reader(&db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM audit_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outbox, 0, "the outbox is empty once published");
}

/// The audit test's kcat: on the broker's side of the cut.
const SPARED: &str = "audit-outage-test";
const CUT: Duration = Duration::from_secs(40);

#[test]
fn a_broker_cut_longer_than_the_delivery_timeout_loses_no_audit_record() {
    let rt = runtime();
    let broker = ProxiedBroker::start(&rt, SPARED);
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.brokers = broker.proxy.addr.clone();
    let audit = unique("audit");
    cfg.extra = format!("[audit]\ntopic = \"{audit}\"\n");
    create_topic_on(&rt, &cfg.brokers, &cfg.topic, 3);
    create_topic_on(&rt, &cfg.brokers, &cfg.dlq, 1);
    create_topic_on(&rt, &cfg.brokers, &audit, 3);
    let daemon = Daemon::start(&cfg, "audit-outage");
    daemon.wait_ready(LONG);

    let mut records = Vec::new();
    for c in 0..300 {
        let customer = format!("c{c}");
        records.push(event(
            &format!("ctx-{c}"),
            "customer.contact_updated",
            &customer,
            json!({"app_installed": true, "email": "x@example.com"}),
        ));
        records.push(event(
            &format!("loan-{c}"),
            "loan_application.completed",
            &customer,
            json!({"application_id": format!("A{c}"), "product": "Personal loan",
                   "amount": 1000, "signed": false, "resume_url": "u"}),
        ));
    }
    produce_on(&cfg.brokers, SPARED, &cfg.topic, &records);
    daemon.wait_until(LONG, "the first pushes", || recv.received() > 0);
    // Cut while the log is being written and published: the records of
    // the sends still going on wait in the outbox (reported on /readyz).
    broker.proxy.cut();
    let cut_at = Instant::now();
    let mut most_waiting = 0;
    daemon.poll_until(
        CUT + Duration::from_secs(10),
        Duration::from_secs(1),
        "the end of the cut",
        || {
            let waiting = daemon
                .readyz()
                .and_then(|r| r.body["audit"]["waiting"].as_u64())
                .unwrap_or(0);
            most_waiting = most_waiting.max(waiting);
            cut_at.elapsed() >= CUT
        },
        String::new,
    );
    broker.proxy.restore();
    assert!(most_waiting > 0, "the cut held records back");
    daemon.wait_until(LONG, "every push", || recv.on("/push").len() >= 300);

    let db = cfg.store.clone();
    let log = stored(&db);
    let logged: BTreeSet<i64> = log.keys().copied().collect();
    let mut published = Vec::new();
    daemon.wait_until(
        LONG,
        "every record on the audit topic after the cut",
        || {
            published = consume(&cfg.brokers, SPARED, &audit);
            let seen: BTreeSet<i64> = published
                .iter()
                .filter_map(|r| r.body["seq"].as_i64())
                .collect();
            logged.is_subset(&seen)
        },
    );
    daemon.terminate();
    check_keys_and_order(&published);
    let seen: BTreeSet<i64> = published
        .iter()
        .filter_map(|r| r.body["seq"].as_i64())
        .collect();
    assert_eq!(seen, logged, "none lost, nothing else");
}
