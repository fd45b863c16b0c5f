//! The audit stream (`audit.topic`): every dispatch-log record published to
//! Kafka as JSON (the fields of `nudge log --format json`, with `seq`),
//! keyed by customer id, for a warehouse to load.
//!
//! Delivery: the store writes an outbox row in the transaction that writes
//! the record (`store::audit`), so no record is lost between the log and the
//! topic. This publisher, the only one across replicas (a lease in the
//! store), reads the outbox in log order, produces a batch with one
//! request in flight per connection (so the broker keeps one partition's
//! records in the order sent, retries included), and deletes a row only once
//! the broker acknowledged it; after a failed pass it starts a new producer. A customer's records share a key and so a partition:
//! they arrive in log order. When a record fails (the topic unreachable for
//! longer than the delivery timeout), the customer's later records of that
//! batch stay in the outbox with it and go again behind it, so the order
//! still holds; the stream is at least once (a crash between the
//! acknowledgement and the delete, or such a retry, sends a record again),
//! and a consumer drops repeats by `seq`.
//!
//! This follows the dead-letter publisher (`ingest::dlq`): claim from the
//! store, produce with acknowledgements, delete, back off, count, report to
//! `/readyz`; unlike dead letters, records are ordered, so a failure holds
//! back the customer's later records instead of each going on its own.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::FutureRecord;
use serde_json::json;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::KafkaConfig;
use crate::ingest::kafka::{Producer, ProducerContext};
use crate::store::{AsyncStore, AuditRecord, Store};
use crate::telemetry::events::{
    AuditBacklogMeasured, AuditOutboxUnreadable, AuditPublishFailed, AuditRecordsLost,
    AuditRecordsPublished,
};

/// Outbox rows per pass.
const CLAIM: usize = 500;

/// How long the broker has to acknowledge a record before the pass counts
/// it failed; well within [`LEASE`], so a pass ends before its lease does.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The publisher's lease on the outbox, renewed every pass.
const LEASE: chrono::Duration = chrono::Duration::seconds(90);

/// How often an idle publisher looks for new records: the stream's lag
/// when the log is quiet.
const POLL: Duration = Duration::from_millis(250);

/// What `/readyz` reports of the stream, as of the last pass.
#[derive(Debug, Default)]
pub struct AuditStatus {
    measured: AtomicBool,
    waiting: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl AuditStatus {
    /// `{"topic": …, "waiting": n, "last_error": …}`; `waiting` is null before the first pass.
    pub fn report(&self, topic: &str) -> serde_json::Value {
        let waiting = self
            .measured
            .load(Ordering::Relaxed)
            .then(|| self.waiting.load(Ordering::Relaxed));
        json!({
            "topic": topic,
            "waiting": waiting,
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    fn set_last_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
}

pub struct AuditPublisher {
    /// Replaced after a pass with a failed delivery: an idempotent producer
    /// that the broker fenced during an outage never recovers by itself.
    producer: std::sync::Mutex<Producer>,
    client: rdkafka::ClientConfig,
    topic: String,
    store: AsyncStore,
    clock: Arc<dyn Clock>,
    status: Arc<AuditStatus>,
}

/// The outbox rows of a pass to delete: the acknowledged ones, except a
/// customer's records after its first failure (sent again behind it).
fn to_delete(claimed: &[AuditRecord], acked: &[bool]) -> Vec<i64> {
    let mut held: HashSet<&str> = HashSet::new();
    let mut out = Vec::with_capacity(claimed.len());
    for (a, &ok) in claimed.iter().zip(acked) {
        if !ok || held.contains(a.customer.as_str()) {
            held.insert(&a.customer);
        } else {
            out.push(a.seq);
        }
    }
    out
}

impl AuditPublisher {
    /// Turns the store's outbox on and makes the producer; `topic` is `audit.topic`.
    pub fn new(
        config: &KafkaConfig,
        topic: &str,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let mut cc = crate::ingest::kafka::client_config(config)?;
        // Not idempotent: tansu fences an idempotent producer after a long
        // outage (ProducerFenced, for good). One request in flight keeps a
        // partition's records in order across retries; a record sent twice
        // (a lost acknowledgement) is recognisable by its `seq`.
        cc.set("enable.idempotence", "false")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "1")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            );
        let producer: Producer = cc.create_with_context(ProducerContext)?;
        store.set_audit_outbox(true)?;
        Ok(Self {
            producer: std::sync::Mutex::new(producer),
            client: cc,
            topic: topic.to_string(),
            store: AsyncStore::new(store),
            clock,
            status: Arc::default(),
        })
    }

    pub fn status(&self) -> Arc<AuditStatus> {
        self.status.clone()
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::ZERO;
        loop {
            let pass = tokio::select! {
                p = self.publish_pending() => p,
                // Rows of an unfinished pass stay in the outbox: sent again
                // by the next start (at least once).
                _ = shutdown.changed() => break,
            };
            if *shutdown.borrow() {
                break;
            }
            let wait = match pass {
                Pass::Full => {
                    backoff = Duration::ZERO;
                    continue;
                }
                Pass::Partial => {
                    backoff = Duration::ZERO;
                    POLL
                }
                Pass::Failed => {
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
                    backoff
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => break,
            }
        }
    }

    /// One pass: claims the outbox's oldest rows, produces them in order,
    /// deletes what was acknowledged, then measures the backlog.
    pub async fn publish_pending(&self) -> Pass {
        let now = self.clock.now();
        let claimed = match self
            .store
            .call(move |s| s.claim_audit_records(CLAIM, now, now + LEASE))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                AuditOutboxUnreadable { error: &e }.emit();
                self.status.set_last_error(Some(e.to_string()));
                return Pass::Failed;
            }
        };
        let full = claimed.len() == CLAIM;
        let producer = self
            .producer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut lost = 0u64;
        let mut deliveries = Vec::with_capacity(claimed.len());
        for a in &claimed {
            let Some(record) = &a.record else {
                lost += 1;
                deliveries.push(None);
                continue;
            };
            let payload = match serde_json::to_vec(&json_of(record)) {
                Ok(p) => p,
                Err(_) => {
                    deliveries.push(None);
                    continue;
                }
            };
            // Enqueued now, in outbox order: one partition's records leave in it.
            let sent = producer.send_result(
                FutureRecord::to(&self.topic)
                    .key(a.customer.as_bytes())
                    .payload(&payload),
            );
            deliveries.push(Some(sent.map_err(|(e, _)| e)));
        }
        let mut acked = Vec::with_capacity(claimed.len());
        let mut error = None;
        for (a, d) in claimed.iter().zip(deliveries) {
            let ok = match d {
                // Retention removed it: nothing to send.
                None => a.record.is_none(),
                Some(Err(e)) => {
                    error.get_or_insert_with(|| e.to_string());
                    false
                }
                Some(Ok(future)) => match future.await {
                    Ok(Ok(_)) => true,
                    Ok(Err((e, _))) => {
                        error.get_or_insert_with(|| e.to_string());
                        false
                    }
                    Err(_) => {
                        error.get_or_insert_with(|| "delivery cancelled".into());
                        false
                    }
                },
            };
            acked.push(ok);
        }
        if lost > 0 {
            AuditRecordsLost { count: lost }.emit();
        }
        let done = to_delete(&claimed, &acked);
        let published = done.len() as u64 - lost.min(done.len() as u64);
        let failed = claimed.len() - done.len();
        if !done.is_empty() {
            let ids = done.clone();
            if let Err(e) = self.store.call(move |s| s.delete_audit_records(&ids)).await {
                // Published but still in the outbox: sent again next pass.
                AuditOutboxUnreadable { error: &e }.emit();
            }
        }
        if published > 0 {
            AuditRecordsPublished { count: published }.emit();
        }
        if failed > 0 {
            // A fresh producer for the next pass (its records go again, in order).
            if let Ok(fresh) = self
                .client
                .create_with_context::<_, Producer>(ProducerContext)
            {
                *self.producer.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
            }
            let text = error.unwrap_or_else(|| "not acknowledged".into());
            AuditPublishFailed {
                topic: &self.topic,
                count: failed as u64,
                error: &text,
            }
            .emit();
            self.status.set_last_error(Some(text));
        } else {
            self.status.set_last_error(None);
        }
        match self.store.call(|s| s.audit_backlog()).await {
            Ok(waiting) => {
                self.status.waiting.store(waiting, Ordering::Relaxed);
                self.status.measured.store(true, Ordering::Relaxed);
                AuditBacklogMeasured { waiting }.emit();
            }
            Err(e) => AuditOutboxUnreadable { error: &e }.emit(),
        }
        match (failed > 0, full) {
            (true, _) => Pass::Failed,
            (false, true) => Pass::Full,
            (false, false) => Pass::Partial,
        }
    }
}

/// How a pass went, for when to run the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// A whole claim published: more may be waiting.
    Full,
    /// Everything waiting was published.
    Partial,
    /// Something failed: back off.
    Failed,
}

/// A record as the stream carries it: the log record's JSON with its `seq`
/// (what a consumer deduplicates and orders by).
fn json_of(r: &crate::model::LogRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["seq"] = json!(r.seq);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, customer: &str) -> AuditRecord {
        AuditRecord {
            seq,
            customer: customer.into(),
            record: None,
        }
    }

    #[test]
    fn a_failure_holds_back_the_customers_later_records_only() {
        let claimed = [
            row(1, "a"),
            row(2, "b"),
            row(3, "a"),
            row(4, "b"),
            row(5, "c"),
        ];
        let acked = [true, false, true, true, true];
        assert_eq!(to_delete(&claimed, &acked), vec![1, 3, 5]);
        assert_eq!(to_delete(&claimed, &[true; 5]), vec![1, 2, 3, 4, 5]);
    }
}
