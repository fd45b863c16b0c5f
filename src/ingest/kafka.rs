//! The consumer loop: batch, decode, process, commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::headers;
use crate::config::KafkaConfig;
use crate::context;
use crate::event::{self, CeHeaders, Event, EventError};
use crate::journey::{BatchOutcome, Origin, Pipeline, SourceOffset};
use crate::rules::RuleSet;
use crate::store::{DeadLetter, RecordHeader, Store, StoreError};
use crate::telemetry::events::{
    BatchPanicked, BatchRefused, BatchStoreFailed, BatchStored, ConsumerLag, EventDeadLettered,
    EventsConsumed, FinalOffsetCommitFailed, InvalidOffset, KafkaClientError, KafkaReceiveFailed,
    KafkaTopicsMissing, KeyMismatches, LogBehindStore, OffsetCommitDeferred, RebalanceFailed,
    RecordAge, RecordDeadLettered, SeekFailed, StoreOffsetMoved, StoreRefusedRecord,
    StoredOffsetsUnreadable,
};

type Partition = (String, i32);

/// Records to store in one transaction: events (with where each came from,
/// to dead-letter it), records that were not events, and the offsets after them.
struct BatchPart {
    events: Vec<Arc<Event>>,
    origins: Vec<Origin>,
    rejects: Vec<DeadLetter>,
    offsets: Vec<SourceOffset>,
}

/// Why a part of a batch was not stored.
enum NotStored {
    /// The store refused it for good, saying why.
    Refused(String),
    /// The store holds another offset than the consumer's
    /// ([`StoreError::OffsetMoved`]): read again from there.
    OffsetMoved,
}

/// A batch was rolled back because the store holds another offset than the
/// consumer's for one of its partitions ([`StoreError::OffsetMoved`]).
struct OffsetMoved;

/// How often the consumer's offsets are compared with the store's when no
/// batch did so (see [`KafkaIngest::check_stored_offsets`]).
const OFFSET_CHECK: Duration = Duration::from_secs(5);

/// How often the subscribed topics are looked up in the broker's metadata
/// (the first look at start).
const TOPIC_CHECK: Duration = Duration::from_secs(15);

/// Called after each committed batch with whether it produced dead letters.
pub type AfterBatch = Box<dyn Fn(&BatchOutcome, bool) + Send + Sync>;

/// What `/readyz` and the loop share about the consumer's assignment.
#[derive(Default)]
pub struct Readiness {
    /// Assigned partitions and the next offset the store holds for each.
    resume: Mutex<HashMap<Partition, i64>>,
    assigned: AtomicUsize,
    /// Assignments received (an empty one too: a replica without a partition).
    assignments: AtomicUsize,
    /// When partitions were first assigned, in ms since the epoch (0: not yet).
    first_assigned_ms: std::sync::atomic::AtomicI64,
    /// True once the consumer, assigned, found nothing more to read: the
    /// records that arrived while the daemon was down are decided.
    caught_up: CaughtUp,
    /// Why the last batch could not be stored, while it is being retried
    /// (consuming has stopped meanwhile).
    store_problem: Mutex<Option<String>>,
    halted: Mutex<Option<String>>,
    /// What librdkafka last said about its brokers, for `/readyz`: an
    /// unreachable broker otherwise shows only as no partitions assigned.
    kafka: Mutex<KafkaLink>,
    /// Subscribed topics the broker's metadata lacks at the last look: a
    /// misspelt one among several otherwise shows nowhere but one line of
    /// librdkafka's, while its producer's stream goes unread.
    missing_topics: Mutex<Vec<String>>,
    /// A metadata request is under way.
    topic_check_running: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct KafkaLink {
    /// Brokers connected at the last statistics (`None`: none came yet).
    brokers_up: Option<usize>,
    /// The client's last error since a broker was last seen connected.
    last_error: Option<String>,
}

/// [`Readiness::caught_up`]'s signal.
pub struct CaughtUp(watch::Sender<bool>);

impl Default for CaughtUp {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

/// How long the consumer, once assigned, waits for a record before it
/// counts as caught up with its backlog.
const CAUGHT_UP_IDLE: Duration = Duration::from_secs(1);

/// A record stamped no earlier than this before the first assignment was
/// produced after the consumer joined (give or take the producers' clocks):
/// everything before it in its partition is read.
const LIVE_SLACK_MS: i64 = 1_000;

/// Whether each partition that delivered records at start has reached
/// records produced after the assignment. Under steady traffic the consumer
/// is never idle for [`CAUGHT_UP_IDLE`], so without this a start held all
/// sending for `kafka.catch_up_timeout` although nothing had waited. (The
/// broker's high watermark would say it directly, but tansu's is wrong.)
#[derive(Default)]
struct CatchUp {
    /// The first assignment, in ms since the epoch.
    assigned_at: Option<i64>,
    /// Per partition that delivered: whether its latest record was live.
    partitions: HashMap<(String, i32), bool>,
}

impl CatchUp {
    fn saw(&mut self, m: &BorrowedMessage<'_>, first_assigned_ms: i64) {
        self.record(
            m.topic(),
            m.partition(),
            m.timestamp().to_millis(),
            first_assigned_ms,
        );
    }

    fn record(&mut self, topic: &str, partition: i32, stamp: Option<i64>, first_assigned_ms: i64) {
        if self.assigned_at.is_none() && first_assigned_ms > 0 {
            self.assigned_at = Some(first_assigned_ms);
        }
        let Some(assigned_at) = self.assigned_at else {
            return;
        };
        let live = stamp.is_some_and(|t| t >= assigned_at - LIVE_SLACK_MS);
        self.partitions.insert((topic.to_owned(), partition), live);
    }

    /// Every partition that delivered is live, and a partition with a
    /// backlog had the time to deliver (its records come in the first fetch).
    fn done(&self, now_ms: i64) -> bool {
        self.assigned_at.is_some_and(|at| {
            now_ms - at >= CAUGHT_UP_IDLE.as_millis() as i64
                && !self.partitions.is_empty()
                && self.partitions.values().all(|live| *live)
        })
    }
}

impl Readiness {
    pub fn assigned_partitions(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    /// Turns true once the consumer has read what was waiting for it at
    /// start (see [`KafkaIngest::run`]).
    pub fn caught_up(&self) -> watch::Receiver<bool> {
        self.caught_up.0.subscribe()
    }

    /// Marks the daemon as stopping for good (a task failed): never ready again.
    pub fn halt(&self, why: String) {
        *self.halted.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Why the daemon is stopping for good, if it is.
    pub fn halted(&self) -> Option<String> {
        self.halted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why ingest is waiting for the store, if it is.
    pub fn store_problem(&self) -> Option<String> {
        self.store_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `ok` while a broker is connected; otherwise what is wrong, with the
    /// client's last error (all brokers down, a failed TLS handshake …).
    pub fn kafka_state(&self) -> String {
        let link = self.kafka.lock().unwrap_or_else(|e| e.into_inner());
        let error = link
            .last_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        match link.brokers_up {
            Some(0) => format!("no broker reachable{error}"),
            Some(_) => "ok".into(),
            None => format!("connecting{error}"),
        }
    }

    fn kafka_error(&self, error: String) {
        self.kafka
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = Some(error);
    }

    fn kafka_brokers_up(&self, up: usize) {
        let mut link = self.kafka.lock().unwrap_or_else(|e| e.into_inner());
        link.brokers_up = Some(up);
        if up > 0 {
            link.last_error = None;
        }
    }

    /// Subscribed topics not on the broker at the last look, in the order
    /// `kafka.topics` lists them.
    pub fn missing_topics(&self) -> Vec<String> {
        self.missing_topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_missing_topics(&self, missing: Vec<String>) {
        let mut known = self
            .missing_topics
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *known != missing {
            KafkaTopicsMissing { topics: &missing }.emit();
            *known = missing;
        }
    }

    fn set_store_problem(&self, problem: Option<String>) {
        *self.store_problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    fn snapshot(&self) -> HashMap<Partition, i64> {
        self.resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn advance(&self, offsets: &[SourceOffset]) {
        let mut resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        for o in offsets {
            if let Some(next) = resume.get_mut(&(o.topic.clone(), o.partition)) {
                *next = o.next_offset;
            }
        }
    }
}

/// The offsets the store holds for `topic`, read on a plain thread: the
/// rebalance callback runs inside the consumer's poll on an async worker,
/// where a store client that drives its own runtime must not block.
/// (The worker waits either way: librdkafka takes the assignment when the
/// callback returns.)
fn stored_offsets(store: &Arc<dyn Store>, topic: &str) -> Result<Vec<(i32, i64)>, StoreError> {
    std::thread::scope(|s| s.spawn(|| store.offsets(topic)).join()).unwrap_or_else(|_| {
        Err(StoreError::Corrupt(
            "reading stored offsets panicked".into(),
        ))
    })
}

/// The producers' context (dead letters, audit stream): librdkafka's
/// client errors through the throttled event, as the consumer's, instead of
/// rust-rdkafka's default of one error line each (several a second while a
/// broker is down).
#[derive(Clone, Copy, Default)]
pub struct ProducerContext;

impl ClientContext for ProducerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        KafkaClientError {
            error: &error,
            reason,
        }
        .emit();
    }
}

/// A producer whose client errors are logged throttled.
pub type Producer = rdkafka::producer::FutureProducer<ProducerContext>;

/// Keeps `Readiness` in step with rebalances. Callbacks run inside `recv`, when
/// the loop holds no unfinished batch, so revocation never strands work.
struct IngestContext {
    readiness: Arc<Readiness>,
    store: Arc<dyn Store>,
    youngest: YoungestRecord,
}

/// The least age, by this host's clock, of the records consumed since the
/// last statistics: how this clock compares with the producers' (or the
/// broker's), give or take the consumer's delay.
struct YoungestRecord(std::sync::atomic::AtomicI64);

impl YoungestRecord {
    const NONE: i64 = i64::MAX;

    fn new() -> Self {
        Self(std::sync::atomic::AtomicI64::new(Self::NONE))
    }

    fn saw(&self, age_ms: i64) {
        self.0.fetch_min(age_ms, Ordering::Relaxed);
    }

    /// The interval's age, and a new interval begun.
    fn take(&self) -> Option<chrono::Duration> {
        let ms = self.0.swap(Self::NONE, Ordering::Relaxed);
        (ms != Self::NONE).then(|| chrono::Duration::milliseconds(ms))
    }
}

impl ClientContext for IngestContext {
    /// Through the throttled event: librdkafka's default logs each one.
    fn error(&self, error: KafkaError, reason: &str) {
        self.readiness.kafka_error(format!("{error}: {reason}"));
        KafkaClientError {
            error: &error,
            reason,
        }
        .emit();
    }

    /// librdkafka's own view of lag (high watermark minus position), every
    /// `statistics.interval.ms`, and whether any broker is connected. On
    /// tansu the watermark is wrong, so is the lag.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let up = statistics
            .brokers
            .values()
            .filter(|b| b.source != "internal" && b.state == "UP")
            .count();
        self.readiness.kafka_brokers_up(up);
        if let Some(youngest) = self.youngest.take() {
            RecordAge { youngest }.emit();
        }
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    ConsumerLag {
                        topic: &topic,
                        partition,
                        lag: p.consumer_lag,
                    }
                    .emit();
                }
            }
        }
    }
}

/// How long an assignment waits for a partition's log end before starting
/// at the store's offset unchecked.
const LOG_END_TIMEOUT: Duration = Duration::from_secs(3);

impl ConsumerContext for IngestContext {
    /// librdkafka's default handling, except that an assigned partition
    /// starts at the offset the store holds, not the group's committed one:
    /// the store's offsets commit with the effects, so they are the truth.
    /// They differ after a crash between the two commits (the store is
    /// ahead: nothing is read twice) and after a store restored from a
    /// backup (the store is behind: what came after the backup is read
    /// again, or it would be lost).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let done = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.resume_at_stored_offsets(consumer, tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoked(tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => Err(KafkaError::Rebalance(other.into())),
        };
        if let Err(e) = done {
            RebalanceFailed { error: &e }.emit();
        }
    }
}

impl IngestContext {
    fn revoked(&self, tpl: &TopicPartitionList) {
        let mut resume = self
            .readiness
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for e in tpl.elements() {
            resume.remove(&(e.topic().to_string(), e.partition()));
        }
        self.readiness
            .assigned
            .store(resume.len(), Ordering::Relaxed);
        tracing::info!(partitions = tpl.count(), "partitions revoked");
    }

    /// Sets each assigned partition's start to the store's next offset for
    /// it (a partition the store has never seen starts where the group
    /// committed, or at the earliest record).
    ///
    /// A store's offset past the end of the partition's log means the log
    /// restarted beneath it (the topic re-created, a broker that lost its
    /// data): the partition starts at the log's beginning instead, and its
    /// records are decided ([`LogBehindStore`]). Apache Kafka would answer
    /// the store's offset as out of range, but not every broker does (tansu
    /// answers an empty fetch), and then the new log would never be read.
    fn resume_at_stored_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) {
        let mut stored: HashMap<String, HashMap<i32, i64>> = HashMap::new();
        let mut resume = self
            .readiness
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut from_store = 0;
        for (topic, partition) in tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect::<Vec<_>>()
        {
            if !stored.contains_key(&topic) {
                let offsets = stored_offsets(&self.store, &topic).unwrap_or_else(|err| {
                    StoredOffsetsUnreadable {
                        topic: &topic,
                        error: &err,
                    }
                    .emit();
                    Vec::new()
                });
                stored.insert(topic.clone(), offsets.into_iter().collect());
            }
            let next = stored[&topic].get(&partition).copied();
            if let Some(next) = next {
                // Unanswered (a slow broker): the store's offset, as before.
                let log_end = consumer
                    .fetch_watermarks(&topic, partition, LOG_END_TIMEOUT)
                    .ok()
                    .map(|(_, high)| high);
                let start = match log_end {
                    Some(end) if next > end => Offset::Beginning,
                    _ => Offset::Offset(next),
                };
                if tpl.set_partition_offset(&topic, partition, start).is_ok() {
                    from_store += 1;
                }
            }
            resume.insert((topic, partition), next.unwrap_or(0));
        }
        self.readiness
            .assigned
            .store(resume.len(), Ordering::Relaxed);
        self.readiness.assignments.fetch_add(1, Ordering::Relaxed);
        let _ = self.readiness.first_assigned_ms.compare_exchange(
            0,
            chrono::Utc::now().timestamp_millis(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        tracing::info!(
            partitions = tpl.count(),
            at_stored_offsets = from_store,
            "partitions assigned"
        );
    }
}

/// Records gathered for one batch, decoded as far as the rules need: an
/// event no journey (and no customer context) reads is only validated
/// ([`Event::peek`]), never built, and costs no allocation.
struct Gathered {
    /// Distinct partitions in the batch (a handful: found by linear search).
    partitions: Vec<Partition>,
    records: Vec<Record>,
    /// Records that are more than an offset to store (events, invalid records).
    relevant: usize,
    key_mismatches: u64,
    /// The latest Kafka timestamp among the records (ms since the epoch).
    newest_ms: Option<i64>,
}

/// Records no journey reads cost the store nothing but their offset, so a
/// batch may hold this many times `kafka.batch_size` of them: fewer
/// transactions per million such records, at a few bytes each in memory.
const IGNORED_PER_BATCH_SLOT: usize = 16;

struct Record {
    part: usize,
    offset: i64,
    kind: Kind,
}

enum Kind {
    Ignored,
    Event(Arc<Event>, Box<Origin>),
    Invalid(EventError, Box<Origin>),
}

impl Gathered {
    fn with_capacity(n: usize) -> Self {
        Self {
            partitions: Vec::new(),
            records: Vec::with_capacity(n),
            relevant: 0,
            key_mismatches: 0,
            newest_ms: None,
        }
    }

    /// Whether the batch has reached `batch_size`, counting ignored records
    /// at 1/`IGNORED_PER_BATCH_SLOT` each.
    fn is_full(&self, batch_size: usize) -> bool {
        self.relevant >= batch_size || self.records.len() >= batch_size * IGNORED_PER_BATCH_SLOT
    }

    fn add(&mut self, m: &BorrowedMessage<'_>, rules: &RuleSet) {
        let part = match self
            .partitions
            .iter()
            .position(|(t, p)| *p == m.partition() && t == m.topic())
        {
            Some(i) => i,
            None => {
                self.partitions.push((m.topic().to_string(), m.partition()));
                self.partitions.len() - 1
            }
        };
        let mut headers = CeHeaders::default();
        let mut any_header = false;
        headers::for_each(m, |key, value| {
            any_header = true;
            headers.add(key, value);
        });
        let stamped = m.timestamp().to_millis();
        self.newest_ms = self.newest_ms.max(stamped);
        let record = event::Record {
            value: m.payload().unwrap_or_default(),
            headers,
            // CreateTime or LogAppendTime; else when it was read.
            default_time_ms: Some(stamped.unwrap_or_else(|| chrono::Utc::now().timestamp_millis())),
        };
        // A record without a key goes to any partition, as one keyed by
        // something else: either way the customer's events may be decided
        // out of order.
        let key_differs = |customer: &str| m.key() != Some(customer.as_bytes());
        if let Some(head) = Event::peek_record(&record) {
            let t = head.event_type.as_ref();
            if !(context::is_context_event(t) || rules.interested_in(t)) {
                self.key_mismatches += key_differs(&head.customer) as u64;
                self.records.push(Record {
                    part,
                    offset: m.offset(),
                    kind: Kind::Ignored,
                });
                return;
            }
        }
        let mut kept = Vec::new();
        if any_header {
            headers::for_each(m, |key, value| {
                if !key.starts_with(b"nudge.") {
                    kept.push(RecordHeader {
                        key: String::from_utf8_lossy(key).into_owned(),
                        value: value.map(<[u8]>::to_vec),
                    });
                }
            });
        }
        let origin = Box::new(Origin {
            topic: self.partitions[part].0.clone(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: Arc::from(record.value),
            headers: kept,
        });
        self.relevant += 1;
        let kind = match Event::decode(&record) {
            Ok(event) => {
                self.key_mismatches += key_differs(&event.customer) as u64;
                Kind::Event(Arc::new(event), origin)
            }
            Err(e) => Kind::Invalid(e, origin),
        };
        self.records.push(Record {
            part,
            offset: m.offset(),
            kind,
        });
    }
}

pub struct KafkaIngest {
    /// Shared with the topic check, which asks for metadata on a thread
    /// of its own (a blocking call).
    consumer: Arc<StreamConsumer<IngestContext>>,
    pipeline: Arc<Pipeline>,
    readiness: Arc<Readiness>,
    config: KafkaConfig,
    /// Called after each committed batch (wakes the scheduler and the DLQ publisher).
    after_batch: AfterBatch,
}

/// librdkafka settings shared by the consumer and the dead-letter producer.
pub fn client_config(config: &KafkaConfig) -> anyhow::Result<ClientConfig> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.properties {
        cc.set(k, v);
    }
    let password = match (&config.sasl_password_env, &config.sasl_password_file) {
        (Some(var), _) => Some(
            std::env::var(var)
                .with_context(|| format!("kafka.sasl_password_env: environment variable {var}"))?,
        ),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("kafka.sasl_password_file: {}", path.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    // Each secret with the key it came from, to name that key in errors
    // and keep the value out of them.
    let mut secrets: Vec<(String, &str, String)> = Vec::new();
    if let Some(p) = password {
        let source = match &config.sasl_password_env {
            Some(var) => format!("kafka.sasl_password_env (environment variable {var})"),
            None => "kafka.sasl_password_file".to_string(),
        };
        secrets.push((source, "sasl.password", p));
    }
    for (property, var) in &config.secret_properties_env {
        let value = std::env::var(var).with_context(|| {
            format!("kafka.secret_properties_env.{property}: environment variable {var}")
        })?;
        secrets.push((
            format!("kafka.secret_properties_env.{property} (environment variable {var})"),
            property,
            value,
        ));
    }
    for (property, path) in &config.secret_properties_file {
        let value = std::fs::read_to_string(path).with_context(|| {
            format!(
                "kafka.secret_properties_file.{property}: {}",
                path.display()
            )
        })?;
        secrets.push((
            format!("kafka.secret_properties_file.{property}"),
            property,
            value.trim().to_string(),
        ));
    }
    for (source, property, value) in &secrets {
        if value.is_empty() {
            anyhow::bail!("{source}: the secret is empty");
        }
        cc.set(*property, value);
    }
    // librdkafka's own check, now rather than when a client is created: its
    // message quotes the value, which for a secret must not reach the log.
    if let Err(e) = cc.create_native_config() {
        let KafkaError::ClientConfig(_, mut description, key, _) = e else {
            return Err(e).context("kafka settings");
        };
        for (_, _, value) in &secrets {
            description = description.replace(value.as_str(), "***");
        }
        match secrets.iter().find(|(_, property, _)| *property == key) {
            Some((source, ..)) => {
                anyhow::bail!("{source}: librdkafka refused {key}: {description}")
            }
            None => anyhow::bail!("kafka.properties.{key}: {description}"),
        }
    }
    refuse_unsupported_mechanism(&cc, "kafka.properties")?;
    Ok(cc)
}

/// SASL mechanisms this build's librdkafka has a provider for (no Cyrus
/// SASL, so no GSSAPI). librdkafka itself refuses the others only when a
/// client is created, which `nudge check` does not do.
const SASL_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

fn refuse_unsupported_mechanism(cc: &ClientConfig, section: &str) -> anyhow::Result<()> {
    for key in ["sasl.mechanism", "sasl.mechanisms"] {
        if let Some(mechanism) = cc.get(key) {
            if !SASL_MECHANISMS.contains(&mechanism.trim()) {
                anyhow::bail!(
                    "{section}.{key}: `{mechanism}` is not supported by this build (Kerberos/GSSAPI is not); use one of {}",
                    SASL_MECHANISMS.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// The consumer's settings: [`client_config`], `kafka.consumer_properties`
/// and what nudge sets itself, checked as a whole (by `nudge check` too).
pub fn consumer_config(config: &KafkaConfig) -> anyhow::Result<ClientConfig> {
    let mut cc = client_config(config)?;
    for (k, v) in &config.consumer_properties {
        cc.set(k, v);
    }
    cc.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // librdkafka's default 1 s backoff stalls a fast consumer (see KAFKA.md).
        .set("fetch.queue.backoff.ms", "10")
        .set("statistics.interval.ms", "5000");
    if let Err(e) = cc.create_native_config() {
        return match e {
            KafkaError::ClientConfig(_, description, key, _) => Err(anyhow::anyhow!(
                "kafka.consumer_properties.{key}: {description}"
            )),
            e => Err(e).context("kafka consumer settings"),
        };
    }
    refuse_unsupported_mechanism(&cc, "kafka.consumer_properties")?;
    Ok(cc)
}

impl KafkaIngest {
    pub fn new(
        config: &KafkaConfig,
        pipeline: Arc<Pipeline>,
        store: Arc<dyn Store>,
        after_batch: AfterBatch,
    ) -> anyhow::Result<Self> {
        let readiness = Arc::new(Readiness::default());
        let cc = consumer_config(config)?;
        let consumer: StreamConsumer<IngestContext> = cc
            .create_with_context(IngestContext {
                readiness: readiness.clone(),
                store,
                youngest: YoungestRecord::new(),
            })
            .context("creating the Kafka consumer")?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .context("subscribing to kafka.topics")?;
        Ok(Self {
            consumer: Arc::new(consumer),
            pipeline,
            readiness,
            config: config.clone(),
            after_batch,
        })
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// Looks the subscribed topics up in the broker's metadata (all topics:
    /// asking for one by name may create it where the broker creates topics
    /// on demand), off the loop. An unanswered request changes nothing.
    fn check_topics(&self) {
        if self
            .readiness
            .topic_check_running
            .swap(true, Ordering::AcqRel)
        {
            return;
        }
        let consumer = self.consumer.clone();
        let readiness = self.readiness.clone();
        let topics = self.config.topics.clone();
        tokio::task::spawn_blocking(move || {
            if let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
                let on_broker: std::collections::HashSet<&str> = metadata
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                    .map(|t| t.name())
                    .collect();
                // A pattern (`^…`) matches whatever exists.
                let missing = topics
                    .into_iter()
                    .filter(|t| !t.starts_with('^') && !on_broker.contains(t.as_str()))
                    .collect();
                readiness.set_missing_topics(missing);
            }
            readiness
                .topic_check_running
                .store(false, Ordering::Release);
        });
    }

    /// Consumes until `shutdown` turns true; the batch in hand is finished and
    /// committed before returning.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let linger = Duration::from_millis(5);
        let caught_up = &self.readiness.caught_up.0;
        let mut catch_up = CatchUp::default();
        let now_ms = || chrono::Utc::now().timestamp_millis();
        let mut offset_check = tokio::time::interval(OFFSET_CHECK);
        offset_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut topic_check = tokio::time::interval(TOPIC_CHECK);
        topic_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !*caught_up.borrow() {
                if catch_up.assigned_at.is_none() {
                    let at = self.readiness.first_assigned_ms.load(Ordering::Relaxed);
                    catch_up.assigned_at = (at > 0).then_some(at);
                }
                if catch_up.done(now_ms()) {
                    caught_up.send_replace(true);
                    tracing::info!(
                        "caught up with the records waiting at start: each partition reached records produced after it was assigned"
                    );
                }
            }
            // Until caught up: a wait without a record, once assigned, means
            // the backlog is read (sending waits for that, see `daemon`).
            let idle = !*caught_up.borrow();
            let first = tokio::select! {
                m = self.consumer.recv() => m,
                _ = tokio::time::sleep(CAUGHT_UP_IDLE), if idle => {
                    if self.readiness.assignments.load(Ordering::Relaxed) > 0 {
                        caught_up.send_replace(true);
                        tracing::info!("caught up with the records waiting at start");
                    }
                    continue;
                }
                _ = offset_check.tick() => {
                    self.check_stored_offsets().await?;
                    continue;
                }
                _ = topic_check.tick() => {
                    self.check_topics();
                    continue;
                }
                _ = shutdown.changed() => break,
            };
            // One rule set for the whole batch decides which records are read.
            let rules = self.pipeline.rules().current();
            let mut batch = Gathered::with_capacity(self.config.batch_size);
            let watching = !*caught_up.borrow();
            match first {
                Ok(m) => {
                    if watching {
                        catch_up.saw(&m, self.readiness.first_assigned_ms.load(Ordering::Relaxed));
                    }
                    batch.add(&m, &rules)
                }
                Err(e) => {
                    KafkaReceiveFailed { error: &e }.emit();
                    continue;
                }
            }
            // Take what librdkafka already holds without a timer per record;
            // wait (until the linger deadline) only when nothing is ready.
            let deadline = tokio::time::Instant::now() + linger;
            while !batch.is_full(self.config.batch_size) {
                let next = match self.consumer.recv().now_or_never() {
                    Some(m) => m,
                    None => match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                };
                match next {
                    Ok(m) => {
                        if watching {
                            catch_up
                                .saw(&m, self.readiness.first_assigned_ms.load(Ordering::Relaxed));
                        }
                        batch.add(&m, &rules)
                    }
                    Err(e) => {
                        KafkaReceiveFailed { error: &e }.emit();
                        break;
                    }
                }
            }
            self.process(batch, &shutdown).await?;
        }
        // Everything processed is in the store; tell Kafka too before leaving.
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in self.readiness.snapshot() {
            if next > 0 {
                let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
                FinalOffsetCommitFailed { error: &e }.emit();
            }
        }
        tracing::info!("consumer stopped; offsets are committed");
        Ok(())
    }

    async fn process(
        &self,
        batch: Gathered,
        shutdown: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        // Assignment may have changed while the batch was gathered (callbacks
        // run inside `recv`): keep only records of partitions still assigned
        // and not yet durable in the store.
        let resume = self.readiness.snapshot();
        let from: Vec<Option<i64>> = batch
            .partitions
            .iter()
            .map(|p| resume.get(p).copied())
            .collect();
        let mut next: Vec<Option<i64>> = vec![None; batch.partitions.len()];
        let mut consumed = vec![0u64; batch.partitions.len()];
        let mut events = Vec::new();
        let mut origins = Vec::new();
        let mut rejects = Vec::new();
        let mut ignored = 0;
        // Per partition: the first record below the store's offset, and how many.
        let mut behind: Vec<Option<(i64, u64)>> = vec![None; batch.partitions.len()];
        for r in batch.records {
            match from[r.part] {
                Some(f) if r.offset >= f => {}
                // Each partition starts at the store's offset, so a record
                // below it means the log restarted there (see LogBehindStore).
                Some(_) => {
                    let (first, n) = behind[r.part].get_or_insert((r.offset, 0));
                    *first = (*first).min(r.offset);
                    *n += 1;
                }
                // revoked while the batch was gathered
                None => continue,
            }
            consumed[r.part] += 1;
            next[r.part] = Some(next[r.part].map_or(r.offset + 1, |n| n.max(r.offset + 1)));
            match r.kind {
                Kind::Ignored => ignored += 1,
                Kind::Event(event, origin) => {
                    events.push(event);
                    origins.push(*origin);
                }
                Kind::Invalid(error, origin) => {
                    RecordDeadLettered {
                        topic: &origin.topic,
                        partition: origin.partition,
                        offset: origin.offset,
                        reason: &error,
                    }
                    .emit();
                    rejects.push(origin.dead_letter(error.to_string(), None, None));
                }
            }
        }
        if let Some(newest) = batch.newest_ms {
            let age = chrono::Utc::now().timestamp_millis() - newest;
            self.consumer.context().youngest.saw(age);
        }
        if batch.key_mismatches > 0 {
            KeyMismatches {
                count: batch.key_mismatches,
            }
            .emit();
        }
        let mut offsets = Vec::new();
        for (i, (topic, partition)) in batch.partitions.into_iter().enumerate() {
            if let (Some((first, records)), Some(stored)) = (behind[i], from[i]) {
                LogBehindStore {
                    topic: &topic,
                    partition,
                    stored,
                    first,
                    records,
                }
                .emit();
            }
            if consumed[i] > 0 {
                EventsConsumed {
                    topic: &topic,
                    partition,
                    count: consumed[i],
                }
                .emit();
            }
            if let Some(next_offset) = next[i] {
                offsets.push(SourceOffset {
                    topic,
                    partition,
                    expected: from[i].unwrap_or(0),
                    next_offset,
                });
            }
        }
        if offsets.is_empty() {
            return Ok(());
        }
        let outcome = self
            .store_with_retry(events, origins, rejects.clone(), offsets.clone(), shutdown)
            .await;
        let mut outcome = match outcome {
            None => return Ok(()),
            Some(Ok(outcome)) => outcome,
            Some(Err(OffsetMoved)) => {
                let at: Vec<(String, i32, i64)> = offsets
                    .into_iter()
                    .map(|o| (o.topic, o.partition, o.expected))
                    .collect();
                return self.read_again_from_store(at).await;
            }
        };
        // Records the batch did not even decode count as ignored too.
        outcome.ignored += ignored;
        for f in &outcome.failures {
            EventDeadLettered {
                event_id: &f.event_id,
                journey: f.journey.as_deref(),
                reason: &f.reason,
            }
            .emit();
        }
        self.readiness.advance(&offsets);
        self.commit(&offsets);
        (self.after_batch)(
            &outcome,
            !rejects.is_empty() || !outcome.failures.is_empty(),
        );
        Ok(())
    }

    /// The store holds another offset than this consumer's for a partition:
    /// the batch was rolled back, and every partition it held is
    /// read again from the offset the store holds, the one that moved and
    /// the others, whose records were rolled back with it. Kafka keeps the
    /// records, so the decisions a failover to a lagging standby lost are
    /// made again, and a batch written over another consumer's is not.
    /// `partitions`: topic, partition and the offset this consumer expected.
    async fn read_again_from_store(
        &self,
        partitions: Vec<(String, i32, i64)>,
    ) -> anyhow::Result<()> {
        let mut stored: HashMap<String, Option<HashMap<i32, i64>>> = HashMap::new();
        for (topic, _, _) in &partitions {
            if !stored.contains_key(topic) {
                let store = self.consumer.context().store.clone();
                let t = topic.clone();
                let read = tokio::task::spawn_blocking(move || store.offsets(&t)).await;
                let offsets = match read {
                    Ok(Ok(offsets)) => Some(offsets.into_iter().collect()),
                    // Unreadable for now: the batch is read again from
                    // where it started, and checked again when stored.
                    Ok(Err(e)) => {
                        StoredOffsetsUnreadable { topic, error: &e }.emit();
                        None
                    }
                    Err(e) => {
                        StoredOffsetsUnreadable { topic, error: &e }.emit();
                        None
                    }
                };
                stored.insert(topic.clone(), offsets);
            }
        }
        for (topic, partition, expected) in partitions {
            let found = match &stored[&topic] {
                Some(offsets) => offsets.get(&partition).copied(),
                None => Some(expected),
            };
            let at = found.unwrap_or(0);
            if at != expected {
                StoreOffsetMoved {
                    topic: &topic,
                    partition,
                    expected,
                    found,
                }
                .emit();
            }
            let offset = match found {
                Some(at) => Offset::Offset(at),
                None => Offset::Beginning,
            };
            self.seek(&topic, partition, offset).await?;
            let mut resume = self
                .readiness
                .resume
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(next) = resume.get_mut(&(topic, partition)) {
                *next = at;
            }
        }
        Ok(())
    }

    /// Moves the consumer's position in an assigned partition. If it
    /// cannot, records already passed over would never be decided by this
    /// process: it stops, and the next start reads from the store's offsets.
    async fn seek(&self, topic: &str, partition: i32, offset: Offset) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            match self
                .consumer
                .seek(topic, partition, offset, Duration::from_secs(5))
            {
                Ok(()) => return Ok(()),
                Err(e) if tries < 5 => {
                    tries += 1;
                    SeekFailed {
                        topic,
                        partition,
                        error: &e,
                    }
                    .emit();
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("reading {topic}/{partition} again from the store's offset {offset:?}: restart to read from the store's offsets")
                    })
                }
            }
        }
    }

    /// Compares the store's offsets with this consumer's, for partitions
    /// that may see no record for a while: a failover that lost the last
    /// transactions is noticed within [`OFFSET_CHECK`], not at the next
    /// record. A store that cannot be read is checked again next time.
    async fn check_stored_offsets(&self) -> anyhow::Result<()> {
        let mine = self.readiness.snapshot();
        let mut topics: Vec<&String> = mine.keys().map(|(t, _)| t).collect();
        topics.sort();
        topics.dedup();
        let mut moved = Vec::new();
        for topic in topics {
            let store = self.consumer.context().store.clone();
            let t = topic.clone();
            let Ok(Ok(offsets)) = tokio::task::spawn_blocking(move || store.offsets(&t)).await
            else {
                continue;
            };
            let offsets: HashMap<i32, i64> = offsets.into_iter().collect();
            for ((t, partition), expected) in &mine {
                let found = offsets.get(partition).copied();
                if t == topic && found.unwrap_or(0) != *expected {
                    moved.push((t.clone(), *partition, *expected, found));
                }
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        let partitions = moved.into_iter().map(|(t, p, e, _)| (t, p, e)).collect();
        self.read_again_from_store(partitions).await
    }

    /// The store is the source of truth: a batch that cannot be stored for
    /// now (a transient error: the database busy or away) is retried with
    /// backoff while `/readyz` says why, never skipped. A batch the store
    /// refuses for good is stored record by record instead, so that the one
    /// record that causes it is dead-lettered with the reason and the rest
    /// go on ([`Self::isolate`]). Gives up only on shutdown (nothing committed).
    async fn store_with_retry(
        &self,
        events: Vec<Arc<Event>>,
        origins: Vec<Origin>,
        rejects: Vec<DeadLetter>,
        offsets: Vec<SourceOffset>,
        shutdown: &watch::Receiver<bool>,
    ) -> Option<Result<BatchOutcome, OffsetMoved>> {
        let started = std::time::Instant::now();
        let batch = Arc::new(BatchPart {
            events,
            origins,
            rejects,
            offsets,
        });
        let outcome = match self.store_part(batch.clone(), shutdown).await? {
            Ok(outcome) => outcome,
            Err(NotStored::OffsetMoved) => return Some(Err(OffsetMoved)),
            Err(NotStored::Refused(refusal)) => {
                match self.isolate(&batch, refusal, shutdown).await? {
                    Ok(outcome) => outcome,
                    Err(moved) => return Some(Err(moved)),
                }
            }
        };
        // Decide + store time of a batch: with the broker's own latency,
        // what an event waits before it is durable.
        BatchStored {
            elapsed: started.elapsed(),
        }
        .emit();
        Some(Ok(outcome))
    }

    /// Stores one part of a batch (events, their origins, rejects, offsets),
    /// retrying transient failures. `Some(Err(_))` when the store refuses
    /// it for good or holds another offset; `None` on shutdown.
    async fn store_part(
        &self,
        part: Arc<BatchPart>,
        shutdown: &watch::Receiver<bool>,
    ) -> Option<Result<BatchOutcome, NotStored>> {
        let mut wait = Duration::from_millis(100);
        loop {
            let pipeline = self.pipeline.clone();
            let p = part.clone();
            let result = tokio::task::spawn_blocking(move || {
                pipeline.process_with(&p.events, &p.origins, &p.rejects, &p.offsets)
            })
            .await;
            match result {
                Ok(Ok(outcome)) => {
                    self.readiness.set_store_problem(None);
                    return Some(Ok(outcome));
                }
                Ok(Err(e)) if e.is_transient() => {
                    BatchStoreFailed { error: &e }.emit();
                    self.readiness
                        .set_store_problem(Some(format!("storing a batch failed: {e}")));
                }
                Ok(Err(StoreError::OffsetMoved { .. })) => {
                    self.readiness.set_store_problem(None);
                    return Some(Err(NotStored::OffsetMoved));
                }
                Ok(Err(e)) => {
                    BatchStoreFailed { error: &e }.emit();
                    return Some(Err(NotStored::Refused(e.to_string())));
                }
                Err(e) => {
                    BatchPanicked { error: &e }.emit();
                    return Some(Err(NotStored::Refused(format!("processing panicked: {e}"))));
                }
            }
            if *shutdown.borrow() {
                return None;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// A batch the store refused for good (`refusal`): each event is stored
    /// in a transaction of its own; one that is refused again is
    /// dead-lettered with the store's reason instead of stalling its
    /// partition forever. The dead letters and the batch's offsets then
    /// commit together. A crash half-way is safe: the offsets have not
    /// moved, and events already stored are skipped by their id.
    async fn isolate(
        &self,
        batch: &Arc<BatchPart>,
        refusal: String,
        shutdown: &watch::Receiver<bool>,
    ) -> Option<Result<BatchOutcome, OffsetMoved>> {
        let BatchPart {
            events,
            origins,
            rejects,
            offsets,
        } = &**batch;
        BatchRefused {
            events: events.len(),
            reason: &refusal,
        }
        .emit();
        let mut outcome = BatchOutcome::default();
        let mut letters = rejects.clone();
        for (i, event) in events.iter().enumerate() {
            let origin: Vec<Origin> = origins.get(i).cloned().into_iter().collect();
            let one = Arc::new(BatchPart {
                events: vec![event.clone()],
                origins: origin.clone(),
                rejects: Vec::new(),
                offsets: Vec::new(),
            });
            match self.store_part(one, shutdown).await? {
                Ok(part) => outcome.absorb(part, i),
                Err(NotStored::OffsetMoved) => return Some(Err(OffsetMoved)),
                Err(NotStored::Refused(reason)) => {
                    let reason = format!("the store refused this record: {reason}");
                    StoreRefusedRecord {
                        event_id: &event.id,
                        reason: &reason,
                    }
                    .emit();
                    if let Some(origin) = origin.first() {
                        letters.push(origin.dead_letter(reason, None, Some(event.id.clone())));
                    }
                }
            }
        }
        let rest = Arc::new(BatchPart {
            events: Vec::new(),
            origins: Vec::new(),
            rejects: letters,
            offsets: offsets.clone(),
        });
        loop {
            match self.store_part(rest.clone(), shutdown).await? {
                Ok(part) => {
                    outcome.absorb(part, events.len());
                    return Some(Ok(outcome));
                }
                Err(NotStored::OffsetMoved) => return Some(Err(OffsetMoved)),
                // Only dead letters and offsets: a store that refuses those is
                // broken, not the data. Keep trying, and say so.
                Err(NotStored::Refused(reason)) => {
                    self.readiness.set_store_problem(Some(format!(
                        "storing offsets and dead letters failed: {reason}"
                    )));
                    if *shutdown.borrow() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    fn commit(&self, offsets: &[SourceOffset]) {
        let mut tpl = TopicPartitionList::new();
        for o in offsets {
            if let Err(e) =
                tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset))
            {
                InvalidOffset {
                    topic: &o.topic,
                    partition: o.partition,
                    offset: o.next_offset,
                    error: &e,
                }
                .emit();
            }
        }
        // The store holds the truth; a failed commit (e.g. during a rebalance)
        // only means some records are read again and skipped.
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            OffsetCommitDeferred { error: &e }.emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker's log restarted beneath the store's offset (a re-created
    /// topic): the consumer, started at the store's offset 100, is told it
    /// is out of range and reads the new log from its start. Its records
    /// are decided, not skipped as already durable, and the store's offset
    /// moves back to the new log's. (librdkafka's mock broker: tansu does
    /// not answer out-of-range fetches.)
    #[test]
    fn caught_up_once_every_partition_delivering_reads_records_from_after_the_assignment() {
        let at = 1_000_000;
        let mut c = CatchUp::default();
        assert!(!c.done(at + 5_000), "not assigned yet");
        // A backlog in partition 0 (records from an hour before), live records in 1.
        c.record("t", 0, Some(at - 3_600_000), at);
        c.record("t", 1, Some(at + 10), at);
        assert!(!c.done(at + 5_000), "partition 0 still reads its backlog");
        c.record("t", 0, Some(at - 500), at);
        assert!(
            !c.done(at + 500),
            "a partition with a backlog has had no time to deliver"
        );
        assert!(
            c.done(at + 1_000),
            "both reached records from around the assignment"
        );
        // A record with no timestamp is never taken for live.
        c.record("t", 2, None, at);
        assert!(!c.done(at + 5_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_restarted_beneath_the_stores_offset_is_read_from_its_start() {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        mock.create_topic("events", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let mut tx = store.begin().unwrap();
        tx.set_offset("events", 0, 0, 100).unwrap();
        tx.commit().unwrap();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .create()
            .unwrap();
        let now = chrono::Utc::now().to_rfc3339();
        for (id, kind, data) in [
            (
                "ctx-c1",
                "customer.contact_updated",
                r#"{"app_installed":true}"#,
            ),
            (
                "loan-c1",
                "loan_application.completed",
                r#"{"application_id":"A1","product":"Personal loan","amount":5000,"signed":false,"resume_url":"u"}"#,
            ),
        ] {
            let value = format!(
                r#"{{"specversion":"1.0","id":"{id}","source":"test","type":"{kind}","subject":"c1","time":"{now}","data":{data}}}"#
            );
            producer
                .send(BaseRecord::to("events").key("c1").payload(&value))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();

        let config = KafkaConfig {
            brokers: mock.bootstrap_servers(),
            topics: vec!["events".into()],
            group_id: "g".into(),
            ..KafkaConfig::default()
        };
        let rules = crate::rules::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"),
            &crate::rules::Limits::default(),
        )
        .unwrap();
        let pipeline = Arc::new(Pipeline::new(
            store.clone(),
            crate::rules::RulesHandle::new(rules),
            Arc::new(crate::clock::SystemClock),
            crate::config::PolicyConfig::default(),
        ));
        let ingest =
            KafkaIngest::new(&config, pipeline, store.clone(), Box::new(|_, _| {})).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let run = tokio::spawn(ingest.run(stop_rx));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.offsets("events").unwrap() != [(0, 2)] {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                store.offsets("events")
            );
            tokio::task::yield_now().await;
        }
        stop_tx.send(true).unwrap();
        run.await.unwrap().unwrap();
        let counts = store.step_counts().unwrap();
        assert!(
            counts
                .iter()
                .any(|(status, n)| status == "pending" && *n > 0),
            "the loan's steps were planned: {counts:?}"
        );
    }

    /// librdkafka refuses unsupported security settings when the client is
    /// created, so creating one proves the build carries TLS and SASL/SCRAM
    /// and that the password reaches librdkafka from the environment.
    #[test]
    fn sasl_ssl_settings_with_a_password_from_the_environment_are_accepted() {
        let var = "NUDGE_TEST_SASL_PASSWORD";
        std::env::set_var(var, "s3cret");
        let mut config = KafkaConfig::default();
        for (k, v) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "nudge"),
        ] {
            config.properties.insert(k.into(), v.into());
        }
        config.sasl_password_env = Some(var.into());
        let cc = client_config(&config).unwrap();
        assert_eq!(cc.get("sasl.password"), Some("s3cret"));
        let consumer: Result<rdkafka::consumer::BaseConsumer, _> =
            cc.clone().set("group.id", "g").create();
        assert!(consumer.is_ok(), "{:?}", consumer.err());

        config.sasl_password_env = Some("NUDGE_TEST_UNSET_PASSWORD".into());
        let err = client_config(&config).unwrap_err().to_string();
        assert!(err.contains("kafka.sasl_password_env"), "{err}");
    }

    /// A misspelt secret property is refused naming the key it came from,
    /// without its value (librdkafka's own message quotes the value); an
    /// empty secret is refused as empty, not as a missing SASL password.
    #[test]
    fn a_refused_or_empty_secret_is_named_without_its_value() {
        let var = "NUDGE_TEST_KEY_PASSWORD";
        std::env::set_var(var, "TopSecretEnv99");
        let mut config = KafkaConfig::default();
        config
            .secret_properties_env
            .insert("ssl.key.pasword".into(), var.into());
        let err = format!("{:#}", client_config(&config).unwrap_err());
        assert!(
            err.starts_with(
                "kafka.secret_properties_env.ssl.key.pasword (environment variable NUDGE_TEST_KEY_PASSWORD): librdkafka refused ssl.key.pasword"
            ),
            "{err}"
        );
        assert!(!err.contains("TopSecretEnv99"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("password");
        std::fs::write(&empty, "\n").unwrap();
        let config = KafkaConfig {
            sasl_password_file: Some(empty),
            ..KafkaConfig::default()
        };
        let err = format!("{:#}", client_config(&config).unwrap_err());
        assert_eq!(err, "kafka.sasl_password_file: the secret is empty");

        let mut config = KafkaConfig::default();
        config
            .properties
            .insert("security.protocol".into(), "SSLL".into());
        let err = format!("{:#}", client_config(&config).unwrap_err());
        assert!(
            err.starts_with("kafka.properties.security.protocol: "),
            "{err}"
        );
    }

    /// What librdkafka would refuse only when the consumer is created (after
    /// the store is opened, and never under `nudge check`) is refused by
    /// the settings' own check: a SASL mechanism without a provider in this
    /// build, a bad consumer property. Each error names the nudge key.
    #[test]
    fn consumer_settings_are_checked_whole_before_any_client_exists() {
        let mut config = KafkaConfig::default();
        config
            .properties
            .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
        config
            .properties
            .insert("sasl.mechanism".into(), "GSSAPI".into());
        let err = format!("{:#}", consumer_config(&config).unwrap_err());
        assert!(
            err.starts_with("kafka.properties.sasl.mechanism: `GSSAPI` is not supported"),
            "{err}"
        );
        // librdkafka agrees: the consumer cannot be created.
        let mut raw = ClientConfig::new();
        raw.set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "GSSAPI")
            .set("group.id", "g");
        let created: Result<rdkafka::consumer::BaseConsumer, _> = raw.create();
        assert!(created.is_err(), "this build has a GSSAPI provider now");

        let mut config = KafkaConfig::default();
        config
            .consumer_properties
            .insert("session.timeout.ms".into(), "soon".into());
        let err = format!("{:#}", consumer_config(&config).unwrap_err());
        assert!(
            err.starts_with("kafka.consumer_properties.session.timeout.ms: "),
            "{err}"
        );
        assert!(consumer_config(&KafkaConfig::default()).is_ok());
    }
}
