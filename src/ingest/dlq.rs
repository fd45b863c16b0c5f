//! Publishes the dead-letter outbox to the dead-letter topic: the original
//! bytes, key and headers, with the reason and origin in `nudge.*` headers.
//! At least once: a crash between produce and mark may publish a letter twice.
//!
//! No letter holds back another. The letters of a pass are sent together
//! and each succeeds or fails on its own:
//! - an original too large for the producer's `message.max.bytes` is cut
//!   to fit (`nudge.truncated` = its size in bytes; the source coordinates
//!   in the headers find the whole record), and sent with no value at all if
//!   the broker still refuses it;
//! - a letter the topic refuses ([`refused`]) is tried [`MAX_ATTEMPTS`]
//!   times with backoff, then kept in the store marked failed and counted;
//! - while the topic cannot be reached, letters wait and are tried again
//!   (backoff up to a minute), never given up: an outage is not theirs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use serde_json::json;
use tokio::sync::{watch, Notify};

use super::kafka::{Producer, ProducerContext};
use crate::clock::Clock;
use crate::config::KafkaConfig;
use crate::store::{AsyncStore, ClaimedDeadLetter, Store};
use crate::telemetry::events::{
    DeadLetterBacklogMeasured, DeadLetterFailureNotRecorded, DeadLetterGivenUp,
    DeadLetterOutboxUnreadable, DeadLetterPublishFailed, DeadLettersNotMarked,
    DeadLettersPublished,
};

/// Attempts the topic may refuse a letter before it is given up.
pub const MAX_ATTEMPTS: u32 = 5;

/// Letters claimed per pass: at most this many originals' first
/// `message.max.bytes` in memory at once.
const CLAIM: usize = 100;

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MAX_BYTES: usize = 1_000_000;

/// Room kept for a record's framing (lengths, varints, batch header) when a
/// letter is cut to the producer's limit.
const FRAMING: usize = 1024;

/// What `/readyz` reports of the outbox, as of the publisher's last pass.
#[derive(Debug, Default)]
pub struct DeadLetterStatus {
    measured: AtomicBool,
    waiting: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl DeadLetterStatus {
    /// `{"waiting": n, "failed": n, "last_error": …}`; counts are null
    /// before the first pass.
    pub fn report(&self) -> serde_json::Value {
        let measured = self.measured.load(Ordering::Relaxed);
        let count = |n: &AtomicU64| measured.then(|| n.load(Ordering::Relaxed));
        json!({
            "waiting": count(&self.waiting),
            "failed": count(&self.failed),
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    fn set_last_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
}

pub struct DeadLetterPublisher {
    /// Replaced after a pass in which a send failed for the topic's sake: an
    /// idempotent producer that met a fatal error (a broker that lost its
    /// producer ids, a fence) fails every later send, so the letters would
    /// wait until a restart.
    producer: std::sync::Mutex<Producer>,
    client: rdkafka::ClientConfig,
    topic: String,
    store: AsyncStore,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
    /// The producer's `message.max.bytes`: no record larger than this is sent.
    max_bytes: usize,
    status: Arc<DeadLetterStatus>,
}

/// Why a send failed, and whether the letter is to blame.
struct SendError {
    text: String,
    refused: bool,
}

/// Errors about the letter itself, which another try would meet again:
/// the record too large or invalid. Anything else (timeouts, the broker
/// away, the topic unknown or not authorised) is the topic's, not the letter's.
fn refused(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::BadMessage
            | RDKafkaErrorCode::InvalidArgument
    )
}

/// When a letter that failed `attempts` times is tried again: 1, 2, 4, 8 s …, at most a minute.
fn retry_at(now: DateTime<Utc>, attempts: u32) -> DateTime<Utc> {
    let secs = 1i64 << attempts.saturating_sub(1).min(6);
    now + chrono::Duration::seconds(secs.min(60))
}

impl DeadLetterPublisher {
    pub fn new(
        config: &KafkaConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let mut cc = super::kafka::client_config(config)?;
        cc.set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000");
        let max_bytes = match cc.get("message.max.bytes") {
            None => DEFAULT_MAX_BYTES,
            Some(v) => v.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "kafka.properties.\"message.max.bytes\": {v:?} is not a number of bytes"
                )
            })?,
        };
        let producer: Producer = cc.create_with_context(ProducerContext)?;
        Ok(Self {
            producer: std::sync::Mutex::new(producer),
            client: cc,
            topic: config.dead_letter_topic.clone(),
            store: AsyncStore::new(store),
            clock,
            wake: Arc::new(Notify::new()),
            max_bytes,
            status: Arc::default(),
        })
    }

    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The outbox as of the last pass, for `/readyz`.
    pub fn status(&self) -> Arc<DeadLetterStatus> {
        self.status.clone()
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let published = self.publish_pending().await;
            if *shutdown.borrow() {
                break;
            }
            if published == 0 {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }

    /// One pass: publishes the letters due now (each on its own: one that
    /// fails is recorded and the rest go on), then measures the backlog.
    /// Returns how many were published.
    pub async fn publish_pending(&self) -> usize {
        let now = self.clock.now();
        // Another replica on the same store takes a letter this one failed to
        // publish once the claim runs out.
        let until = now + chrono::Duration::seconds(60);
        let max_payload = self.max_bytes;
        let pending = match self
            .store
            .call(move |s| s.claim_dead_letters(CLAIM, max_payload, now, until))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                DeadLetterOutboxUnreadable { error: &e }.emit();
                return 0;
            }
        };
        let producer = self
            .producer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let results =
            futures::future::join_all(pending.iter().map(|c| self.send(&producer, c))).await;
        let mut done = Vec::with_capacity(pending.len());
        let mut topic_failed = false;
        for (claimed, result) in pending.iter().zip(results) {
            match result {
                Ok(()) => done.push(claimed.id),
                Err(e) => {
                    topic_failed |= !e.refused;
                    self.failed(claimed, e).await
                }
            }
        }
        if topic_failed {
            // A fresh producer for the next pass (a letter sent twice after a
            // lost acknowledgement is known by its `nudge.source.*` headers).
            if let Ok(fresh) = self
                .client
                .create_with_context::<_, Producer>(ProducerContext)
            {
                *self.producer.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
            }
        }
        if !done.is_empty() {
            DeadLettersPublished {
                count: done.len() as u64,
            }
            .emit();
            let (ids, now) = (done.clone(), self.clock.now());
            if let Err(e) = self
                .store
                .call(move |s| s.mark_dead_letters_published(&ids, now))
                .await
            {
                DeadLettersNotMarked {
                    count: done.len(),
                    error: &e,
                }
                .emit();
            }
        }
        if !pending.is_empty() || !self.status.measured.load(Ordering::Relaxed) {
            self.measure().await;
        }
        done.len()
    }

    /// Records a failed send: tried again later, or given up.
    async fn failed(&self, c: &ClaimedDeadLetter, e: SendError) {
        let attempts = c.attempts.saturating_add(1);
        let give_up = e.refused && attempts >= MAX_ATTEMPTS;
        let l = &c.letter;
        if give_up {
            DeadLetterGivenUp {
                id: c.id,
                topic: &l.topic,
                partition: l.partition,
                offset: l.offset,
                attempts,
                error: &e.text,
            }
            .emit();
        } else {
            DeadLetterPublishFailed {
                topic: &self.topic,
                id: c.id,
                attempt: attempts,
                error: &e.text,
            }
            .emit();
        }
        self.status.set_last_error(Some(e.text.clone()));
        let now = self.clock.now();
        let (id, text) = (c.id, e.text);
        let retry = retry_at(now, attempts);
        if let Err(err) = self
            .store
            .call(move |s| s.dead_letter_publish_failed(id, &text, retry, give_up, now))
            .await
        {
            DeadLetterFailureNotRecorded { id, error: &err }.emit();
        }
    }

    async fn measure(&self) {
        match self.store.call(|s| s.dead_letter_backlog()).await {
            Ok(b) => {
                self.status.waiting.store(b.waiting, Ordering::Relaxed);
                self.status.failed.store(b.failed, Ordering::Relaxed);
                self.status.measured.store(true, Ordering::Relaxed);
                if b.waiting == 0 {
                    self.status.set_last_error(None);
                }
                DeadLetterBacklogMeasured {
                    waiting: b.waiting,
                    failed: b.failed,
                }
                .emit();
            }
            Err(e) => DeadLetterOutboxUnreadable { error: &e }.emit(),
        }
    }

    /// Sends one letter: whole if it fits the producer's limit, else its
    /// first bytes, and with no value if the broker refuses even that.
    async fn send(&self, producer: &Producer, c: &ClaimedDeadLetter) -> Result<(), SendError> {
        let l = &c.letter;
        let partition = l.partition.to_string();
        let offset = l.offset.to_string();
        let size = c.payload_size.to_string();
        let mut nudge: Vec<(&str, &str)> = vec![
            ("nudge.reason", &l.reason),
            ("nudge.source.topic", &l.topic),
            ("nudge.source.partition", &partition),
            ("nudge.source.offset", &offset),
        ];
        if let Some(j) = &l.journey {
            nudge.push(("nudge.journey", j));
        }
        if let Some(id) = &l.event_id {
            nudge.push(("nudge.event_id", id));
        }
        // What the record takes besides its value.
        let around = FRAMING
            + l.key.as_ref().map_or(0, Vec::len)
            + l.headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len) + 10)
                .sum::<usize>()
            + nudge
                .iter()
                .map(|(k, v)| k.len() + v.len() + 10)
                .sum::<usize>()
            + "nudge.truncated".len()
            + size.len()
            + 10;
        let room = self.max_bytes.saturating_sub(around);
        let fits = c.payload_size <= room && l.payload.len() == c.payload_size;
        let mut payload = match fits {
            true => &l.payload[..],
            false => {
                tracing::info!(target: "nudge::ingest::dlq", id = c.id, size = c.payload_size, kept = room.min(l.payload.len()), "dead letter too large for message.max.bytes: value cut");
                &l.payload[..room.min(l.payload.len())]
            }
        };
        loop {
            let mut headers = OwnedHeaders::new_with_capacity(l.headers.len() + nudge.len() + 1);
            for h in &l.headers {
                headers = headers.insert(Header {
                    key: h.key.as_str(),
                    value: h.value.as_deref(),
                });
            }
            for (key, value) in &nudge {
                headers = headers.insert(Header {
                    key,
                    value: Some(*value),
                });
            }
            if payload.len() < c.payload_size {
                headers = headers.insert(Header {
                    key: "nudge.truncated",
                    value: Some(size.as_str()),
                });
            }
            let mut record = FutureRecord::to(&self.topic)
                .payload(payload)
                .headers(headers);
            if let Some(k) = &l.key {
                record = record.key(&k[..]);
            }
            let error = match producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => return Ok(()),
                Err((e, _)) => e,
            };
            let code = error.rdkafka_error_code();
            let too_large = matches!(
                code,
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
                )
            );
            // The broker's own limit may be below the producer's: the
            // coordinates alone still say where the original is.
            if too_large && !payload.is_empty() {
                payload = &[];
                continue;
            }
            return Err(SendError {
                refused: code.is_some_and(refused),
                text: error.to_string(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idempotent producer that met a fatal error fails every later
    /// send; the next pass has a fresh one (a tansu restart left the letters
    /// `waiting` with `UnknownProducerId` until nudge restarted).
    #[tokio::test]
    async fn a_producer_broken_for_good_is_replaced_and_the_letters_go() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        mock.create_topic("dlq", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let clock = Arc::new(crate::clock::VirtualClock::new(Utc::now()));
        let mut tx = store.begin().unwrap();
        tx.add_dead_letter(
            &crate::store::DeadLetter {
                topic: "events".into(),
                partition: 0,
                offset: 7,
                key: Some(b"c1".to_vec()),
                payload: b"{not json".to_vec(),
                reason: "malformed".into(),
                journey: None,
                event_id: None,
                headers: Vec::new(),
            },
            clock.now(),
        )
        .unwrap();
        tx.commit().unwrap();
        let config = KafkaConfig {
            brokers: mock.bootstrap_servers(),
            dead_letter_topic: "dlq".into(),
            ..KafkaConfig::default()
        };
        let publisher = DeadLetterPublisher::new(&config, store.clone(), clock.clone()).unwrap();
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
        );
        assert_eq!(
            publisher.publish_pending().await,
            0,
            "the broker and the producer disagree"
        );
        let mut published = 0;
        for _ in 0..3 {
            clock.advance(chrono::Duration::seconds(61));
            published += publisher.publish_pending().await;
        }
        assert_eq!(published, 1, "{}", publisher.status().report());
        assert_eq!(store.dead_letter_backlog().unwrap().waiting, 0);
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "check")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&["dlq"]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no letter on the topic"
            );
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                assert_eq!(rdkafka::Message::payload(&m), Some(&b"{not json"[..]));
                break;
            }
        }
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        let waits: Vec<i64> = (1..=9)
            .map(|n| (retry_at(t0, n) - t0).num_seconds())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn only_the_letters_own_faults_count_towards_giving_up() {
        assert!(refused(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(refused(RDKafkaErrorCode::InvalidRecord));
        assert!(!refused(RDKafkaErrorCode::MessageTimedOut));
        assert!(!refused(RDKafkaErrorCode::AllBrokersDown));
        assert!(!refused(RDKafkaErrorCode::UnknownTopicOrPartition));
        assert!(!refused(RDKafkaErrorCode::TopicAuthorizationFailed));
    }
}
