//! Both content modes of the CloudEvents Kafka protocol binding, produced
//! by third parties against `nudge run` on the real broker: the official
//! CloudEvents Python SDK (PyPI `cloudevents`, both its current
//! `cloudevents.core.bindings.kafka` and the 1.x `cloudevents.kafka` API)
//! with confluent-kafka, and kcat with `-H`. Each event runs a journey whose
//! push reaches a recording endpoint with what the journey saw; each bad
//! record reaches the dead-letter topic with its original headers.
//! Needs python3 with `cloudevents` and `confluent-kafka` (scripts/ci-deps.sh).

mod harness;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use harness::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

/// The shipped journeys plus `probe`: on `test.probe` it pushes at once,
/// one instance per `data.n`, with what the script saw of the event.
fn rules_with_probe(dir: &std::path::Path) -> std::path::PathBuf {
    let rules = dir.join("rules");
    copy_rules(&rules);
    std::fs::write(
        rules.join("probe.rhai"),
        r#"fn journey() { #{ name: "probe", category: "service", triggers: ["test.probe"], key: "n",
             steps: [#{ id: "push", channel: "push", template: "probe", delay: "0s" }] } }
           fn decide(event, customer) {
               start(#{ n: event.data.n, id: event.id, source: event.source, time: event.time })
           }"#,
    )
    .unwrap();
    rules
}

/// Variables of the probe pushes, by `n`.
fn probes(recv: &Receiver) -> HashMap<String, Value> {
    recv.on("/push")
        .into_iter()
        .filter(|r| r.body["journey"] == "probe")
        .map(|r| {
            let vars = r.body["variables"].clone();
            (vars["n"].as_str().unwrap_or_default().to_string(), vars)
        })
        .collect()
}

/// One record as the Python producer sent it.
#[derive(Debug)]
struct Sent {
    key: Option<String>,
    value: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// Runs tests/python/cloudevents_produce.py with `events` (see its doc).
fn python_produce(topic: &str, events: Value) -> Vec<Sent> {
    let request = json!({"brokers": brokers(), "topic": topic, "events": events});
    let mut child = Command::new("python3")
        .arg(repo().join("tests/python/cloudevents_produce.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK producer failed (scripts/ci-deps.sh installs cloudevents and confluent-kafka):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Sent {
                key: v["key"].as_str().map(String::from),
                value: base64::engine::general_purpose::STANDARD
                    .decode(v["value_base64"].as_str().unwrap())
                    .unwrap(),
                headers: v["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| (h[0].as_str().unwrap().into(), h[1].as_str().unwrap().into()))
                    .collect(),
            }
        })
        .collect()
}

/// Produces one record with kcat: `headers` as `-H NAME=VALUE` (raw bytes).
fn kcat(topic: &str, key: &str, headers: &[&[u8]], value: &str) {
    let mut cmd = Command::new(repo().join("scripts/kafka-broker.sh"));
    cmd.args(["kcat", "-b", &brokers(), "-t", topic, "-P", "-k", key]);
    for h in headers {
        cmd.arg("-H").arg(OsStr::from_bytes(h));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kcat");
    writeln!(child.stdin.take().unwrap(), "{value}").unwrap();
    assert!(child.wait().unwrap().success(), "kcat failed");
}

/// (step, outcome, reason) of every dispatch-log record.
fn dispatch_log(store_path: &std::path::Path) -> Vec<(String, String, String)> {
    use nudge::store::Store;
    store(store_path)
        .log_after(0, 1000)
        .unwrap()
        .into_iter()
        .map(|r| (r.instance, r.outcome.as_str().to_string(), r.reason))
        .collect()
}

fn start_daemon(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    recv: &Receiver,
) -> (DaemonConfig, Daemon) {
    let mut cfg = DaemonConfig::new(dir, recv);
    cfg.rules = rules_with_probe(dir);
    create_topic(rt, &cfg.topic, 2);
    create_topic(rt, &cfg.dlq, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    (cfg, daemon)
}

#[test]
fn the_cloudevents_sdk_in_both_modes_reaches_the_journey_and_a_bad_record_keeps_its_headers() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let (cfg, daemon) = start_daemon(&rt, dir.path(), &recv);

    let customer = "c-py";
    let probe = |api: &str, mode: &str, n: &str| {
        let mut attributes = json!({"type": "test.probe", "source": "sdk-test", "subject": customer,
                                    "partitionkey": customer});
        if api == "v1" {
            // The 1.x SDK's to_binary needs it.
            attributes["datacontenttype"] = json!("application/json");
        }
        json!({"api": api, "mode": mode, "attributes": attributes, "data": {"n": n}})
    };
    // A Kafka timestamp a while ago, to tell it from the time of ingest.
    let created = chrono::Utc::now().timestamp_millis() - 90_000;
    let mut no_time = probe("core", "binary", "core-no-time");
    no_time["drop_headers"] = json!(["ce_time"]);
    no_time["timestamp_ms"] = json!(created);
    let mut base64_data = probe("core", "structured", "core-base64");
    base64_data["data_as_bytes"] = json!(true);
    let mut no_specversion = probe("core", "binary", "core-no-specversion");
    no_specversion["drop_headers"] = json!(["ce_specversion"]);
    let sent = python_produce(
        &cfg.topic,
        json!([
            {"api": "core", "mode": "binary",
             "attributes": {"type": "customer.contact_updated", "source": "sdk-test",
                            "subject": customer, "partitionkey": customer},
             "data": {"app_installed": true, "timezone": "Australia/Sydney"}},
            probe("core", "binary", "core-binary"),
            probe("core", "structured", "core-structured"),
            base64_data,
            no_time,
            probe("v1", "binary", "v1-binary"),
            probe("v1", "structured", "v1-structured"),
            no_specversion,
        ]),
    );
    // What the SDK sent is what this test means by each mode.
    let header = |s: &Sent, name: &str| {
        s.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert!(header(&sent[1], "ce_id").is_some() && !sent[1].value.starts_with(b"{\"type\""));
    assert_eq!(
        header(&sent[2], "content-type").as_deref(),
        Some("application/cloudevents+json")
    );
    assert!(String::from_utf8_lossy(&sent[3].value).contains("\"data_base64\""));
    assert_eq!(header(&sent[4], "ce_time"), None);

    let want = [
        "core-binary",
        "core-structured",
        "core-base64",
        "core-no-time",
        "v1-binary",
        "v1-structured",
    ];
    daemon.wait_until(LONG, "a probe push per event", || {
        probes(&recv).len() >= want.len()
    });
    let got = probes(&recv);
    let mut names: Vec<&str> = got.keys().map(String::as_str).collect();
    names.sort();
    let mut expected = want.to_vec();
    expected.sort();
    assert_eq!(names, expected, "{}", daemon.log_tail());
    for (n, vars) in &got {
        assert_eq!(vars["source"], "sdk-test", "{n}");
        assert!(!vars["id"].as_str().unwrap_or_default().is_empty(), "{n}");
    }
    // No `time`: the record's Kafka timestamp (CreateTime), not the time of ingest.
    let time = chrono::DateTime::parse_from_rfc3339(got["core-no-time"]["time"].as_str().unwrap())
        .unwrap();
    assert_eq!(time.timestamp_millis(), created);

    let letters = read_topic(&cfg.dlq, 1);
    let letter = &letters[0];
    let original = &sent[7];
    assert_eq!(letter.payload, original.value, "the original value");
    assert_eq!(
        letter.key.as_deref(),
        original.key.as_deref().map(str::as_bytes)
    );
    assert!(
        letter.headers["nudge.reason"].contains("missing `specversion`"),
        "{:?}",
        letter.headers
    );
    assert_eq!(letter.headers["nudge.source.topic"], cfg.topic);
    assert!(original.headers.len() >= 6, "{:?}", original.headers);
    for (k, v) in &original.headers {
        assert_eq!(letter.headers.get(k), Some(v), "original header {k} kept");
    }
    let extra: Vec<&String> = letter
        .headers
        .keys()
        .filter(|k| !k.starts_with("nudge.") && header(original, k).is_none())
        .collect();
    assert!(extra.is_empty(), "{extra:?}");

    let (_, metrics) = daemon.get("/metrics").unwrap();
    assert!(
        metrics.contains("nudge_dead_letters_total{kind=\"invalid\"} 1"),
        "{metrics}"
    );
    daemon.terminate();
}

/// `nudge_record_age_seconds` in a `/metrics` text.
fn record_age(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("nudge_record_age_seconds "))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn records_stamped_ahead_of_the_hosts_clock_say_it_is_behind() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let (cfg, daemon) = start_daemon(&rt, dir.path(), &recv);
    let probe = |n: &str, timestamp_ms: i64| {
        json!({"api": "core", "mode": "binary",
               "attributes": {"type": "test.probe", "source": "clock-test", "subject": "c-clock",
                              "partitionkey": "c-clock"},
               "data": {"n": n}, "timestamp_ms": timestamp_ms})
    };
    // A producer whose clock is two hours ahead of this host's, as this
    // host's would look to the others had it fallen two hours behind.
    let ahead = chrono::Utc::now().timestamp_millis() + 2 * 3_600_000;
    python_produce(&cfg.topic, json!([probe("ahead", ahead)]));
    daemon.wait_until(LONG, "the youngest record's age to be reported", || {
        let (_, metrics) = daemon.get("/metrics").unwrap_or_default();
        record_age(&metrics).is_some()
    });
    let (_, metrics) = daemon.get("/metrics").unwrap();
    let age = record_age(&metrics).unwrap();
    assert!(
        (-7_200.5..-7_000.0).contains(&age),
        "two hours in the future: {age}"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("ahead of this host's clock"))
        .unwrap_or_else(|| panic!("no warning: {}", daemon.log_tail()));
    assert!(
        warning.contains("WARN") && warning.contains("timestamps 71"),
        "{warning}"
    );
    // Still decided: a clock's disagreement is reported, not enforced.
    assert!(
        metrics.contains("nudge_journeys_started_total{journey=\"probe\"} 1"),
        "{metrics}"
    );

    // The next interval with records starts afresh: a record stamped now
    // reads as a few seconds old at most.
    python_produce(
        &cfg.topic,
        json!([probe("now", chrono::Utc::now().timestamp_millis())]),
    );
    daemon.wait_until(LONG, "the age of a record stamped now", || {
        let (_, metrics) = daemon.get("/metrics").unwrap_or_default();
        record_age(&metrics).is_some_and(|age| age > -60.0)
    });
    let (_, metrics) = daemon.get("/metrics").unwrap();
    let age = record_age(&metrics).unwrap();
    assert!((-1.0..30.0).contains(&age), "stamped now: {age}");
    daemon.terminate();
}

#[test]
fn kcat_binary_records_with_headers_reach_the_journey_and_bad_ones_are_dead_lettered() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let (cfg, daemon) = start_daemon(&rt, dir.path(), &recv);
    let topic = &cfg.topic;
    let customer = "c-kcat";

    kcat(
        topic,
        customer,
        &[],
        &json!({"specversion": "1.0", "id": "ctx-k", "type": "customer.contact_updated",
                "source": "kcat", "subject": customer, "time": chrono::Utc::now().to_rfc3339(),
                "data": {"app_installed": true}})
        .to_string(),
    );
    let binary = |id: &str, extra: &[&[u8]]| {
        let mut h: Vec<Vec<u8>> = vec![
            b"ce_specversion=1.0".to_vec(),
            format!("ce_id={id}").into_bytes(),
            b"ce_type=test.probe".to_vec(),
            b"ce_source=kcat".to_vec(),
            format!("ce_subject={customer}").into_bytes(),
            b"content-type=application/json".to_vec(),
        ];
        h.extend(extra.iter().map(|e| e.to_vec()));
        h
    };
    let send = |headers: Vec<Vec<u8>>, value: &str| {
        let refs: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        kcat(topic, customer, &refs, value);
    };
    let before = chrono::Utc::now();
    // No ce_time (kcat sets CreateTime to now); a traceparent extension; a
    // header whose name is not UTF-8, which must not stop the consumer.
    send(
        binary("k-1", &[b"ce_traceparent=00-abc-def-01", b"\xffodd=1"]),
        r#"{"n": "kcat-binary"}"#,
    );
    let after = chrono::Utc::now();
    // A time of its own, in another offset.
    let timed = (chrono::Utc::now() - chrono::Duration::hours(1))
        .with_timezone(&chrono::FixedOffset::east_opt(10 * 3600).unwrap());
    let ce_time = format!(
        "ce_time={}",
        timed.to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
    );
    send(
        binary("k-2", &[ce_time.as_bytes()]),
        r#"{"n": "kcat-timed"}"#,
    );
    // Bad: no ce_specversion; data not an object; data_base64 that is not JSON.
    let no_version: Vec<Vec<u8>> = binary("k-3", &[b"ce_time=2026-12-01T00:00:00Z"])
        .into_iter()
        .filter(|h| !h.starts_with(b"ce_specversion"))
        .collect();
    send(no_version, r#"{"n": "kcat-no-version"}"#);
    send(binary("k-4", &[]), "[1, 2]");
    kcat(
        topic,
        customer,
        &[],
        &json!({"specversion": "1.0", "id": "k-5", "type": "test.probe", "source": "kcat",
                "subject": customer, "data_base64": "bm90IGpzb24="})
        .to_string(),
    );

    daemon.poll_until(
        LONG,
        POLL,
        "two probe pushes",
        || probes(&recv).len() >= 2,
        || format!("{:?}", dispatch_log(&cfg.store)),
    );
    let got = probes(&recv);
    assert_eq!(got.len(), 2, "{got:?}");
    let t =
        chrono::DateTime::parse_from_rfc3339(got["kcat-binary"]["time"].as_str().unwrap()).unwrap();
    assert!(
        t >= before - chrono::Duration::seconds(1) && t <= after + chrono::Duration::seconds(1),
        "the record's timestamp {t}, produced between {before} and {after}"
    );
    assert_eq!(got["kcat-binary"]["id"], "k-1");
    let t =
        chrono::DateTime::parse_from_rfc3339(got["kcat-timed"]["time"].as_str().unwrap()).unwrap();
    assert_eq!(t.timestamp_millis(), timed.timestamp_millis());
    assert_eq!(t.offset().local_minus_utc(), 0, "in UTC");

    let letters = read_topic(&cfg.dlq, 3);
    let by_id: BTreeMap<String, &Letter> = letters
        .iter()
        .map(|l| {
            let id = l.headers.get("ce_id").cloned().unwrap_or_else(|| {
                serde_json::from_slice::<Value>(&l.payload).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            });
            (id, l)
        })
        .collect();
    let reason = |id: &str| by_id[id].headers["nudge.reason"].as_str();
    assert!(
        reason("k-3").contains("missing `specversion`"),
        "{}",
        reason("k-3")
    );
    let k3 = &by_id["k-3"].headers;
    for (k, v) in [
        ("ce_id", "k-3"),
        ("ce_type", "test.probe"),
        ("ce_source", "kcat"),
        ("ce_subject", customer),
        ("ce_time", "2026-12-01T00:00:00Z"),
        ("content-type", "application/json"),
    ] {
        assert_eq!(k3.get(k).map(String::as_str), Some(v), "{k3:?}");
    }
    assert_eq!(by_id["k-3"].payload, br#"{"n": "kcat-no-version"}"#);
    assert!(
        reason("k-4").contains("must be a JSON object"),
        "{}",
        reason("k-4")
    );
    assert!(
        reason("k-5").contains("`data_base64` does not hold JSON"),
        "{}",
        reason("k-5")
    );
    daemon.terminate();
}
