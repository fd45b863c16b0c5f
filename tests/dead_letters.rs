//! Dead letters never block each other, on the real broker: an original
//! over the producer's limit is cut to fit and still published with its
//! coordinates, the letter behind it goes out too; a letter the topic
//! refuses is given up after its attempts, kept in the store and counted,
//! and the others are published meanwhile.

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;
use nudge::clock::{Clock, VirtualClock};
use nudge::config::KafkaConfig;
use nudge::ingest::dlq::{DeadLetterPublisher, MAX_ATTEMPTS};
use nudge::store::{DeadLetter, DeadLetterBacklog, RecordHeader, SqliteStore, Store};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const LONG: Duration = Duration::from_secs(90);

/// Produces one record of any size (up to 10 MB) and waits for the broker to take it.
fn produce_one(rt: &tokio::runtime::Runtime, topic: &str, key: &str, value: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "10000000")
        .create()
        .unwrap();
    rt.block_on(producer.send(
        FutureRecord::to(topic).key(key).payload(value),
        Duration::from_secs(30),
    ))
    .map_err(|(e, _)| e)
    .expect("the broker takes the record");
}

#[test]
fn an_oversized_bad_record_and_the_one_behind_it_both_reach_the_dead_letter_topic() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 1);
    create_topic(&rt, &cfg.dlq, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);

    // 5 MB that is not JSON, then a small record that is not JSON either.
    let big: Vec<u8> = b"{\"oops\": "
        .iter()
        .copied()
        .chain((0..5_000_000).map(|i| b'a' + (i % 26) as u8))
        .collect();
    let small = b"{\"id\": \"x\", oops".to_vec();
    let started = Instant::now();
    produce_one(&rt, &cfg.topic, "c-big", &big);
    produce_one(&rt, &cfg.topic, "c-small", &small);

    let letters = read_topic(&cfg.dlq, 2);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "both letters within 30 s, not behind a retry loop: {took:?}"
    );
    let big_letter = letters
        .iter()
        .find(|l| l.key.as_deref() == Some(&b"c-big"[..]))
        .expect("the oversized record's letter");
    let small_letter = letters
        .iter()
        .find(|l| l.key.as_deref() == Some(&b"c-small"[..]))
        .expect("the letter behind it");
    assert_eq!(small_letter.payload, small);
    assert!(!small_letter.headers.contains_key("nudge.truncated"));

    let h = &big_letter.headers;
    assert_eq!(h["nudge.truncated"], big.len().to_string(), "{h:?}");
    assert!(
        !big_letter.payload.is_empty() && big_letter.payload.len() < 1_000_000,
        "cut to the producer's 1 MB: {} bytes",
        big_letter.payload.len()
    );
    assert_eq!(
        big_letter.payload[..],
        big[..big_letter.payload.len()],
        "the original's first bytes"
    );
    assert!(h["nudge.reason"].contains("not valid JSON"), "{h:?}");
    // The coordinates of the whole original in the source topic.
    assert_eq!(h["nudge.source.topic"], cfg.topic);
    assert_eq!(h["nudge.source.partition"], "0");
    assert_eq!(h["nudge.source.offset"], "0");
    assert_eq!(small_letter.headers["nudge.source.offset"], "1");

    daemon.wait_until(LONG, "/readyz to report an empty outbox", || {
        daemon.readyz().is_some_and(|r| {
            r.ready()
                && r.body["dead_letters"]["waiting"] == 0
                && r.body["dead_letters"]["failed"] == 0
        })
    });
    let (_, metrics) = daemon.get("/metrics").unwrap();
    for line in [
        "nudge_dead_letters_published_total 2",
        "nudge_dead_letters_pending{state=\"waiting\"} 0",
        "nudge_dead_letters_pending{state=\"failed\"} 0",
    ] {
        assert!(metrics.contains(line), "{line}:\n{metrics}");
    }
    daemon.terminate();
}

fn letter(offset: i64, key: Vec<u8>) -> DeadLetter {
    DeadLetter {
        topic: "events".into(),
        partition: 0,
        offset,
        key: Some(key),
        payload: format!("{{bad {offset}").into_bytes(),
        reason: "not valid JSON".into(),
        journey: None,
        event_id: None,
        headers: vec![RecordHeader {
            key: "ce_id".into(),
            value: Some(format!("e-{offset}").into_bytes()),
        }],
    }
}

/// The publisher on its own, on a virtual clock: a letter whose key alone
/// exceeds `message.max.bytes` (nothing can be cut to make it fit) is
/// refused by the producer on every attempt.
#[test]
fn a_letter_the_topic_refuses_is_given_up_after_its_attempts_and_the_others_go_out() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let dlq = unique("dlq");
    create_topic(&rt, &dlq, 1);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let mut tx = store.begin().unwrap();
    let clock = VirtualClock::new(chrono::Utc::now());
    tx.add_dead_letter(&letter(0, vec![b'k'; 5000]), clock.now())
        .unwrap();
    tx.add_dead_letter(&letter(1, b"c-1".to_vec()), clock.now())
        .unwrap();
    tx.commit().unwrap();

    let mut config = KafkaConfig {
        brokers: brokers(),
        dead_letter_topic: dlq.clone(),
        ..KafkaConfig::default()
    };
    config
        .properties
        .insert("message.max.bytes".into(), "2000".into());
    let publisher =
        DeadLetterPublisher::new(&config, store.clone(), Arc::new(clock.clone())).unwrap();
    let status = publisher.status();

    assert_eq!(
        rt.block_on(publisher.publish_pending()),
        1,
        "the one behind goes out"
    );
    let out = read_topic(&dlq, 1);
    assert_eq!(out[0].key.as_deref(), Some(&b"c-1"[..]));
    assert_eq!(
        out[0].headers["ce_id"], "e-1",
        "original headers re-emitted"
    );
    assert_eq!(out[0].headers["nudge.source.offset"], "1");
    let report = status.report();
    assert_eq!(report["waiting"], 1, "{report}");
    assert!(
        report["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("too large"),
        "{report}"
    );

    for attempt in 2..=MAX_ATTEMPTS {
        assert_eq!(rt.block_on(publisher.publish_pending()), 0);
        assert_eq!(
            store.dead_letter_backlog().unwrap(),
            DeadLetterBacklog {
                waiting: 1,
                failed: 0
            },
            "before attempt {attempt}: not claimed again until its retry"
        );
        clock.advance(chrono::Duration::seconds(61));
        assert_eq!(rt.block_on(publisher.publish_pending()), 0);
    }
    assert_eq!(
        store.dead_letter_backlog().unwrap(),
        DeadLetterBacklog {
            waiting: 0,
            failed: 1
        },
        "given up after {MAX_ATTEMPTS} attempts, kept"
    );
    let report = status.report();
    assert_eq!(
        (report["waiting"].as_u64(), report["failed"].as_u64()),
        (Some(0), Some(1))
    );
    clock.advance(chrono::Duration::days(1));
    assert_eq!(rt.block_on(publisher.publish_pending()), 0);
    assert_eq!(
        store.dead_letter_backlog().unwrap().failed,
        1,
        "never tried again"
    );
    assert!(store.unpublished_dead_letters(10).unwrap().is_empty());
}
