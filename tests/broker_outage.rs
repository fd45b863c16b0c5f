//! The broker unreachable for 60 s: `nudge run` reaches its broker through a
//! TCP proxy on 127.0.0.1 that cuts every connection and refuses new ones
//! for 60 s, then restores the link. (The broker is a tansu instance of its
//! own that advertises the proxy, so that no connection bypasses it; the
//! test broker keeps data in memory only, so it cannot be restarted instead.)
//! Events produced before and during the cut are all delivered exactly once
//! afterwards, counted by Idempotency-Key at the recording endpoint.

mod harness;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::json;

/// The test's producer: on the broker's side of the cut.
const PRODUCER: &str = "outage-test-producer";
const LONG: Duration = Duration::from_secs(120);
const CUT: Duration = Duration::from_secs(60);

/// `n` customers from `first`: a contact update and a loan completed but
/// not signed each (the push goes out at once). Returns the records and the
/// customers who must get a push.
fn loans(first: usize, n: usize) -> (Vec<(String, Vec<u8>)>, HashSet<String>) {
    let mut records = Vec::new();
    let mut keys = HashSet::new();
    for c in first..first + n {
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
        keys.insert(customer);
    }
    (records, keys)
}

/// The customers who got a push so far.
fn pushed(recv: &Receiver) -> HashSet<String> {
    recv.on("/push")
        .iter()
        .map(|r| r.body["customer"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_broker_unreachable_for_60s_loses_nothing_and_doubles_nothing() {
    let rt = runtime();
    let broker = ProxiedBroker::start(&rt, PRODUCER);
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.brokers = broker.proxy.addr.clone();
    create_topic_on(&rt, &cfg.brokers, &cfg.topic, 3);
    create_topic_on(&rt, &cfg.brokers, &cfg.dlq, 1);
    let daemon = Daemon::start(&cfg, "outage");
    daemon.wait_ready(LONG);

    // Before the cut: produced, and cut while the daemon is still at it.
    let (before, before_keys) = loans(0, 3000);
    produce_on(&cfg.brokers, PRODUCER, &cfg.topic, &before);
    daemon.poll_until(
        LONG,
        Duration::from_millis(1),
        "the first pushes",
        || recv.received() > 0,
        String::new,
    );
    broker.proxy.cut();
    let cut_at = Instant::now();
    let mid_cut = recv.received();

    // During the cut: the broker takes the records (delivery confirmed).
    let (during, during_keys) = loans(3000, 3000);
    produce_on(&cfg.brokers, PRODUCER, &cfg.topic, &during);
    assert!(cut_at.elapsed() < CUT / 2, "produced during the cut");
    // `/readyz` once a second until the link comes back.
    let mut readiness = Vec::new();
    let mut reasons = Vec::new();
    daemon.poll_until(
        CUT + Duration::from_secs(10),
        Duration::from_secs(1),
        "the end of the cut",
        || {
            let probe = daemon.readyz();
            let status = probe.as_ref().map(|r| r.status);
            let reason = probe.map(|r| r.body["reason"].as_str().unwrap_or("").to_string());
            readiness.push((cut_at.elapsed().as_secs(), status));
            reasons.push((cut_at.elapsed().as_secs(), reason));
            cut_at.elapsed() >= CUT
        },
        String::new,
    );
    let got = pushed(&recv);
    let leaked: Vec<_> = during_keys.iter().filter(|c| got.contains(*c)).collect();
    assert!(leaked.is_empty(), "the cut did not cut: {leaked:?}");
    let refused = broker
        .proxy
        .stats
        .refused
        .load(std::sync::atomic::Ordering::Relaxed);
    let cut = broker
        .proxy
        .stats
        .cut
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(cut > 0, "connections were cut");
    // The daemon can tell once its group session runs out (6 s in the
    // tests' consumer settings, then the partitions are revoked): from then
    // on `/readyz` says not ready until the link is back.
    let after_session: Vec<_> = readiness.iter().filter(|(at, _)| *at >= 10).collect();
    assert!(
        after_session.iter().all(|(_, status)| *status == Some(503)),
        "/readyz during the cut: {readiness:?}"
    );
    // And says why: librdkafka's statistics (every 5 s) show no broker up.
    let explained = reasons
        .iter()
        .filter(|(at, _)| *at >= 16)
        .all(|(_, reason)| {
            reason.as_deref().is_some_and(|r| {
                r.starts_with("no partitions assigned; kafka: no broker reachable")
            })
        });
    assert!(explained, "/readyz reasons during the cut: {reasons:?}");
    broker.proxy.restore();
    let restored_at = Instant::now();

    // After: everything, each push once.
    let expected: HashSet<String> = before_keys.union(&during_keys).cloned().collect();
    daemon.wait_until(LONG, "every push", || pushed(&recv) == expected);
    let caught_up = restored_at.elapsed();
    daemon.wait_until(LONG, "every offset stored", || {
        stored_offsets_total(&cfg.store, &cfg.topic) == (before.len() + during.len()) as i64
    });
    let ready_again = daemon.wait_ready(LONG);
    daemon.wait_until(LONG, "`/readyz` to see the broker again", || {
        daemon
            .readyz()
            .is_some_and(|r| r.body["kafka"] == "ok" && r.body["reason"].is_null())
    });
    let by_key = recv.by_key();
    assert_eq!(by_key.len(), expected.len(), "one key per push");
    assert_eq!(
        recv.on("/push").len(),
        expected.len(),
        "one request per push"
    );
    let doubled: Vec<_> = by_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "delivered twice: {doubled:?}");
    let sent = sent_steps(&cfg.store);
    assert_eq!(sent.len(), expected.len(), "one `sent` per push in the log");
    let not_ready: Vec<_> = readiness.iter().filter(|(_, s)| *s != Some(200)).collect();
    eprintln!(
        "broker cut {CUT:?}: {mid_cut} of {} pushes out at the cut, {refused} connections \
         refused and {cut} cut; all {} delivered once {caught_up:?} after the restore \
         (ready again at {ready_again:?} since start); /readyz during the cut: {} of {} \
         probes not ready: {readiness:?}",
        before_keys.len(),
        expected.len(),
        not_ready.len(),
        readiness.len()
    );
    daemon.terminate();
}
