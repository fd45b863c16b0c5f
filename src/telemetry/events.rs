//! One type per thing an operator must be able to see, after Vector's
//! `internal_events`: `emit` writes the structured log line (lowercase text,
//! ids in fields, never contact details) and updates the event's metric, so
//! a failure can be neither logged without being counted nor counted under a
//! name that is not in the [catalog](super::catalog).
//!
//! Log lines keep the target of the module they describe, so `RUST_LOG`
//! filters such as `nudge::ingest=debug` select them as before.
//!
//! Fields borrow: building an event costs nothing beyond its metric.

use std::fmt::Display;
use std::time::Duration;

use super::catalog::*;

const INGEST: &str = "nudge::ingest::kafka";
const DLQ: &str = "nudge::ingest::dlq";
const SCHEDULER: &str = "nudge::scheduler";
const DAEMON: &str = "nudge::daemon";
const AUDIT: &str = "nudge::audit_stream";

// ── Ingest ──────────────────────────────────────────────────────────────

/// Records of one partition taken from a batch (whatever became of them).
pub struct EventsConsumed<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub count: u64,
}

impl EventsConsumed<'_> {
    pub fn emit(self) {
        metrics::counter!(EVENTS_CONSUMED.name, "topic" => self.topic.to_string(), "partition" => self.partition.to_string())
            .increment(self.count);
    }
}

/// librdkafka's statistics for one partition.
pub struct ConsumerLag<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub lag: i64,
}

impl ConsumerLag<'_> {
    pub fn emit(self) {
        metrics::gauge!(CONSUMER_LAG.name, "topic" => self.topic.to_string(), "partition" => self.partition.to_string())
            .set(self.lag as f64);
    }
}

/// The youngest record of a statistics interval, aged by this host's clock:
/// the one signal nudge has of a host clock that disagrees with the rest
/// (its delays, caps and lateness all read that clock).
pub struct RecordAge {
    pub youngest: chrono::Duration,
}

impl RecordAge {
    /// A record stamped further ahead than this says the clocks disagree:
    /// producers and brokers do not stamp records in the future.
    pub const BEHIND_WARNING: chrono::Duration = chrono::Duration::seconds(60);

    pub fn emit(self) {
        metrics::gauge!(RECORD_AGE.name).set(self.youngest.num_milliseconds() as f64 / 1000.0);
        if self.youngest > -Self::BEHIND_WARNING {
            return;
        }
        let Some(repeats) = CLOCK_BEHIND_LINES.admit("behind", std::time::Instant::now()) else {
            return;
        };
        let behind_s = -self.youngest.num_seconds();
        tracing::warn!(target: INGEST, behind_s, similar_not_logged = repeats, "records carry Kafka timestamps {behind_s} s ahead of this host's clock: this host's clock is behind the producers' or the broker's (or a producer's is ahead); delays, caps and lateness are reckoned by this host's clock, check its time synchronisation");
    }
}

static CLOCK_BEHIND_LINES: Throttle = Throttle::new(Duration::from_secs(60));

/// Records of a batch keyed by something other than their customer id.
/// Counted, not logged: a misconfigured producer would log on every record.
pub struct KeyMismatches {
    pub count: u64,
}

impl KeyMismatches {
    pub fn emit(self) {
        metrics::counter!(KEY_MISMATCH.name).increment(self.count);
    }
}

/// A record that is not a valid CloudEvent, put in the dead-letter outbox.
pub struct RecordDeadLettered<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a dyn Display,
}

impl RecordDeadLettered<'_> {
    pub fn emit(self) {
        metrics::counter!(DEAD_LETTERS.name, "kind" => "invalid").increment(1);
        // A bad producer sends thousands of one kind a second: each kind is
        // logged once per quiet period (the letters themselves are all kept).
        let reason = self.reason.to_string();
        if let Some(repeats) = DEAD_LETTER_LINES.admit(kind_of(&reason), std::time::Instant::now())
        {
            tracing::warn!(target: INGEST, topic = %self.topic, partition = self.partition, offset = self.offset, reason = %reason, similar_not_logged = repeats, "record dead-lettered");
        }
    }
}

/// Dead-letter reasons of one kind: the text before where they differ
/// (a position, a value), so that one bad producer is one kind.
fn kind_of(reason: &str) -> &str {
    let end = reason
        .find(|c: char| c.is_ascii_digit() || c == '`' || c == '"')
        .unwrap_or(reason.len());
    &reason[..end]
}

static DEAD_LETTER_LINES: Throttle = Throttle::new(Duration::from_secs(10));

/// An event a journey (or the customer context) failed on, put in the
/// dead-letter outbox. The failed `decide` is counted by [`RuleEvaluated`].
pub struct EventDeadLettered<'a> {
    pub event_id: &'a str,
    /// `None` when updating the customer context failed.
    pub journey: Option<&'a str>,
    pub reason: &'a str,
}

impl EventDeadLettered<'_> {
    pub fn emit(self) {
        tracing::warn!(target: INGEST, event_id = %self.event_id, journey = self.journey.unwrap_or("-"), reason = %self.reason, "event dead-lettered");
        let kind = if self.journey.is_some() {
            "rule"
        } else {
            "context"
        };
        metrics::counter!(DEAD_LETTERS.name, "kind" => kind).increment(1);
    }
}

pub struct KafkaReceiveFailed<'a> {
    pub error: &'a dyn Display,
}

impl KafkaReceiveFailed<'_> {
    pub fn emit(self) {
        metrics::counter!(KAFKA_ERRORS.name).increment(1);
        let error = self.error.to_string();
        if let Some(repeats) = KAFKA_ERROR_LINES.admit(&error, std::time::Instant::now()) {
            tracing::warn!(target: INGEST, error = %error, repeats_not_logged = repeats, "kafka receive error");
        }
    }
}

/// Subscribed topics the broker does not have (logged when the set
/// changes): nothing of theirs is read, and `/readyz` says not ready.
pub struct KafkaTopicsMissing<'a> {
    pub topics: &'a [String],
}

impl KafkaTopicsMissing<'_> {
    pub fn emit(self) {
        if self.topics.is_empty() {
            tracing::info!(target: INGEST, "every topic of kafka.topics is on the broker");
        } else {
            let topics = self.topics.join(", ");
            tracing::warn!(target: INGEST, topics = %topics, "kafka.topics names topics the broker does not have ({topics}): nothing is read from them until they are created; check the names");
        }
    }
}

/// An error librdkafka reports about the client as a whole (all brokers
/// down, a failed TLS handshake), in place of its own unthrottled line.
pub struct KafkaClientError<'a> {
    pub error: &'a dyn Display,
    pub reason: &'a str,
}

impl KafkaClientError<'_> {
    pub fn emit(self) {
        metrics::counter!(KAFKA_ERRORS.name).increment(1);
        let error = format!("{}: {}", self.error, self.reason);
        if let Some(repeats) = KAFKA_ERROR_LINES.admit(&error, std::time::Instant::now()) {
            tracing::warn!(target: INGEST, error = %error, repeats_not_logged = repeats, "kafka client error");
        }
    }
}

/// A broker that cannot be reached (or a wrong CA) fails every fetch and
/// every reconnect, tens of times a second: one line per distinct error
/// every `REPEAT_QUIET`, with how many repeats were left out, keeps the log
/// readable (the metric counts every one).
static KAFKA_ERROR_LINES: Throttle = Throttle::new(Duration::from_secs(10));

pub struct Throttle {
    quiet: Duration,
    /// Errors logged lately, when, and their repeats not logged since (a
    /// few: a failing broker gives two or three messages that take turns).
    recent: std::sync::Mutex<Vec<(String, std::time::Instant, u64)>>,
}

/// Distinct errors a [`Throttle`] remembers; the one logged longest ago
/// makes room for a new one.
const THROTTLE_SLOTS: usize = 16;

impl Throttle {
    pub const fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            recent: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// `Some(repeats left out before it)` when `text` is to be logged now.
    pub fn admit(&self, text: &str, now: std::time::Instant) -> Option<u64> {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, at, repeats)) = recent.iter_mut().find(|(seen, ..)| seen == text) {
            if now < *at + self.quiet {
                *repeats += 1;
                return None;
            }
            *at = now;
            return Some(std::mem::take(repeats));
        }
        if recent.len() >= THROTTLE_SLOTS {
            if let Some(oldest) = (0..recent.len()).min_by_key(|&i| recent[i].1) {
                recent.swap_remove(oldest);
            }
        }
        recent.push((text.to_string(), now, 0));
        Some(0)
    }
}

/// The PostgreSQL pool could not open a connection in the background (the
/// database is down or refuses): one line per distinct error every ten
/// seconds, with how many were left out; readiness and the work's own
/// errors say the rest.
pub struct StorePoolConnectFailed<'a> {
    pub error: &'a dyn Display,
}

static STORE_POOL_LINES: Throttle = Throttle::new(Duration::from_secs(10));

impl StorePoolConnectFailed<'_> {
    pub fn emit(self) {
        let error = self.error.to_string();
        if let Some(repeats) = STORE_POOL_LINES.admit(&error, std::time::Instant::now()) {
            tracing::warn!(target: "nudge::store", error = %error, repeats_not_logged = repeats, "store connection failed");
        }
    }
}

pub struct RebalanceFailed<'a> {
    pub error: &'a dyn Display,
}

impl RebalanceFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: INGEST, error = %self.error, "rebalance error");
        metrics::counter!(KAFKA_REBALANCE_ERRORS.name).increment(1);
    }
}

/// On assignment the store's offsets of a topic could not be read: Kafka's
/// committed offsets apply and event ids catch what is read again.
pub struct StoredOffsetsUnreadable<'a> {
    pub topic: &'a str,
    pub error: &'a dyn Display,
}

impl StoredOffsetsUnreadable<'_> {
    pub fn emit(self) {
        tracing::error!(target: INGEST, topic = %self.topic, error = %self.error, "cannot read stored offsets; relying on event-id dedup");
        metrics::counter!(OFFSET_RESUME_ERRORS.name).increment(1);
    }
}

/// Records below the store's offset reached the consumer, which starts each
/// partition at that offset: the broker's log restarted beneath it (the
/// topic was re-created, or the broker lost its data). They are decided,
/// not skipped; an event already decided is still caught by its id.
pub struct LogBehindStore<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub stored: i64,
    pub first: i64,
    pub records: u64,
}

impl LogBehindStore<'_> {
    pub fn emit(self) {
        tracing::warn!(
            target: INGEST,
            topic = %self.topic,
            partition = self.partition,
            stored_offset = self.stored,
            first_offset = self.first,
            records = self.records,
            "the broker's log is behind the store's offset (topic re-created or broker data lost?); deciding these records, not skipping them"
        );
    }
}

/// The store held another offset for a partition than the consumer's: the
/// batch was rolled back and the partition is read again from the store's
/// offset, so decisions a lagging standby lost are made again.
pub struct StoreOffsetMoved<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub expected: i64,
    /// `None`: the store holds no offset for the partition.
    pub found: Option<i64>,
}

impl StoreOffsetMoved<'_> {
    pub fn emit(self) {
        const WHY: &str = "the store's offset is not this consumer's (a failover to a standby that missed transactions, a restored backup, or another consumer moved it); reading the partition again from the store's offset";
        match self.found {
            Some(stored) => tracing::warn!(
                target: INGEST,
                topic = %self.topic,
                partition = self.partition,
                expected_offset = self.expected,
                stored_offset = stored,
                "{WHY}"
            ),
            None => tracing::warn!(
                target: INGEST,
                topic = %self.topic,
                partition = self.partition,
                expected_offset = self.expected,
                "{WHY} (none stored: from the log's start)"
            ),
        }
        metrics::counter!(STORE_OFFSET_MOVED.name).increment(1);
    }
}

/// Moving the consumer to the store's offset failed; it is tried again.
pub struct SeekFailed<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub error: &'a dyn Display,
}

impl SeekFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: INGEST, topic = %self.topic, partition = self.partition, error = %self.error, "could not move the consumer to the store's offset; trying again");
    }
}

/// An offset librdkafka would not put in the commit list.
pub struct InvalidOffset<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub error: &'a dyn Display,
}

impl InvalidOffset<'_> {
    pub fn emit(self) {
        tracing::warn!(target: INGEST, topic = %self.topic, partition = self.partition, offset = self.offset, error = %self.error, "bad offset");
        metrics::counter!(OFFSET_COMMIT_ERRORS.name, "commit" => "batch").increment(1);
    }
}

/// The commit after a batch failed. Debug only: it is usual during a
/// rebalance, and the store, not Kafka, holds the offsets that matter.
pub struct OffsetCommitDeferred<'a> {
    pub error: &'a dyn Display,
}

impl OffsetCommitDeferred<'_> {
    pub fn emit(self) {
        tracing::debug!(target: INGEST, error = %self.error, "offset commit deferred");
        metrics::counter!(OFFSET_COMMIT_ERRORS.name, "commit" => "batch").increment(1);
    }
}

pub struct FinalOffsetCommitFailed<'a> {
    pub error: &'a dyn Display,
}

impl FinalOffsetCommitFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: INGEST, error = %self.error, "final offset commit failed; the store's offsets will be used on restart");
        metrics::counter!(OFFSET_COMMIT_ERRORS.name, "commit" => "final").increment(1);
    }
}

/// A consumed batch decided and stored.
pub struct BatchStored {
    pub elapsed: Duration,
}

impl BatchStored {
    pub fn emit(self) {
        metrics::histogram!(INGEST_BATCH_SECONDS.name).record(self.elapsed.as_secs_f64());
    }
}

pub struct BatchStoreFailed<'a> {
    pub error: &'a dyn Display,
}

impl BatchStoreFailed<'_> {
    pub fn emit(self) {
        tracing::error!(target: INGEST, error = %self.error, "store write failed; retrying the batch");
        metrics::counter!(STORE_ERRORS.name).increment(1);
    }
}

/// Counted by the [`BatchStoreFailed`] before it; says what happens next.
pub struct BatchRefused<'a> {
    pub events: usize,
    pub reason: &'a str,
}

impl BatchRefused<'_> {
    pub fn emit(self) {
        tracing::warn!(target: INGEST, events = self.events, reason = %self.reason, "the store refused a batch for good; storing its events one by one");
    }
}

/// A record stored alone after its batch was refused, and refused again:
/// it goes to the dead-letter topic (counted there) with this reason.
pub struct StoreRefusedRecord<'a> {
    pub event_id: &'a str,
    pub reason: &'a str,
}

impl StoreRefusedRecord<'_> {
    pub fn emit(self) {
        tracing::error!(target: INGEST, event_id = %self.event_id, reason = %self.reason, "the store refused a record; dead-lettering it");
        metrics::counter!(DEAD_LETTERS.name, "kind" => "store").increment(1);
    }
}

pub struct BatchPanicked<'a> {
    pub error: &'a dyn Display,
}

impl BatchPanicked<'_> {
    pub fn emit(self) {
        tracing::error!(target: INGEST, error = %self.error, "batch processing panicked; retrying the batch");
        metrics::counter!(STORE_ERRORS.name).increment(1);
    }
}

// ── Journeys (from a stored batch's outcome) ────────────────────────────

pub struct EventsIgnored {
    pub count: u64,
}

impl EventsIgnored {
    pub fn emit(self) {
        metrics::counter!(EVENTS_IGNORED.name).increment(self.count);
    }
}

pub struct DuplicateEvents {
    pub count: u64,
}

impl DuplicateEvents {
    pub fn emit(self) {
        metrics::counter!(EVENTS_DUPLICATE.name).increment(self.count);
    }
}

/// One run of a journey's `decide`. A failed one is logged as the event's
/// [`EventDeadLettered`].
pub struct RuleEvaluated<'a> {
    pub journey: &'a str,
    pub ok: bool,
}

impl RuleEvaluated<'_> {
    pub fn emit(self) {
        metrics::counter!(RULE_EVALUATIONS.name, "journey" => self.journey.to_string())
            .increment(1);
        if !self.ok {
            metrics::counter!(RULE_ERRORS.name, "journey" => self.journey.to_string()).increment(1);
        }
    }
}

/// An evaluation (`decide` or a step condition) ran past `rules.timeout`
/// and was stopped; it also counts as a rule error and, for `decide`, its
/// event is dead-lettered ([`EventDeadLettered`]).
pub struct RuleTimedOut<'a> {
    pub journey: &'a str,
    /// `decide` or the condition function's name.
    pub function: &'a str,
}

impl RuleTimedOut<'_> {
    pub fn emit(self) {
        tracing::warn!(target: "nudge::rules", journey = %self.journey, function = %self.function, "script evaluation stopped at rules.timeout");
        metrics::counter!(RULE_TIMEOUTS.name, "journey" => self.journey.to_string()).increment(1);
    }
}

pub struct JourneyStarted<'a> {
    pub journey: &'a str,
}

impl JourneyStarted<'_> {
    pub fn emit(self) {
        metrics::counter!(JOURNEYS_STARTED.name, "journey" => self.journey.to_string())
            .increment(1);
    }
}

pub struct JourneyEnded<'a> {
    pub journey: &'a str,
    pub outcome: &'static str,
}

impl JourneyEnded<'_> {
    pub fn emit(self) {
        metrics::counter!(JOURNEYS_ENDED.name, "journey" => self.journey.to_string(), "outcome" => self.outcome)
            .increment(1);
    }
}

// ── Rule reloads ────────────────────────────────────────────────────────

pub struct RulesReloaded<'a> {
    pub trigger: &'a str,
    pub old: &'a str,
    pub new: &'a str,
    /// Journey names, comma-separated (empty: none).
    pub added: &'a str,
    pub removed: &'a str,
    pub changed: &'a str,
}

impl RulesReloaded<'_> {
    pub fn emit(self) {
        tracing::info!(target: DAEMON, trigger = self.trigger, old = %self.old, new = %self.new, added = self.added, removed = self.removed, changed = self.changed, "rules reloaded");
        metrics::counter!(RULE_RELOADS.name, "result" => "ok").increment(1);
        metrics::gauge!(RULES_REFUSED.name).set(0.0);
    }
}

/// A reload found the rules in force: nothing to swap, and nothing refused.
pub struct RulesUnchanged<'a> {
    pub trigger: &'a str,
    pub version: &'a str,
    /// The last reload was refused: the files on disk compile again.
    pub refused_before: bool,
}

impl RulesUnchanged<'_> {
    pub fn emit(self) {
        match self.refused_before {
            true => {
                tracing::info!(target: DAEMON, trigger = self.trigger, version = %self.version, "rules on disk compile again, the same as in force; the refusal is over")
            }
            false => {
                tracing::info!(target: DAEMON, trigger = self.trigger, version = %self.version, "rules unchanged")
            }
        }
        metrics::gauge!(RULES_REFUSED.name).set(0.0);
    }
}

/// The new rules do not compile: one line per problem, counted once.
pub struct RulesReloadRefused<'a> {
    pub trigger: &'a str,
    pub problems: &'a [crate::rules::Problem],
}

impl RulesReloadRefused<'_> {
    pub fn emit(self) {
        metrics::counter!(RULE_RELOADS.name, "result" => "refused").increment(1);
        metrics::gauge!(RULES_REFUSED.name).set(1.0);
        for p in self.problems {
            tracing::error!(target: DAEMON, trigger = self.trigger, file = %p.file, line = p.line, column = p.column, error = %p.message, "rules reload refused; the previous rules keep running");
        }
    }
}

/// The new rules compiled but their version could not be recorded, so they
/// are not swapped in: every decision must name a recorded version.
pub struct RulesVersionNotRecorded<'a> {
    pub error: &'a dyn Display,
}

impl RulesVersionNotRecorded<'_> {
    pub fn emit(self) {
        tracing::error!(target: DAEMON, error = %self.error, "cannot record the rule set version; keeping the old rules");
        metrics::counter!(RULE_RELOADS.name, "result" => "failed").increment(1);
    }
}

// ── Scheduler ───────────────────────────────────────────────────────────

/// What became of one due step (the dispatch log holds the details).
pub struct StepDecided {
    pub channel: &'static str,
    pub outcome: &'static str,
}

impl StepDecided {
    pub fn emit(self) {
        metrics::counter!(STEPS.name, "channel" => self.channel, "outcome" => self.outcome)
            .increment(1);
    }
}

/// One send to a channel endpoint, timed whatever its result.
pub struct StepDispatched {
    pub channel: &'static str,
    pub elapsed: Duration,
}

impl StepDispatched {
    pub fn emit(self) {
        metrics::histogram!(DISPATCH_SECONDS.name, "channel" => self.channel)
            .record(self.elapsed.as_secs_f64());
    }
}

/// A step over its channel's `rate`, deferred to its slot.
pub struct StepRateLimited {
    pub channel: &'static str,
    pub wait: Duration,
}

impl StepRateLimited {
    pub fn emit(self) {
        metrics::counter!(RATE_LIMITED.name, "channel" => self.channel).increment(1);
        metrics::histogram!(RATE_WAIT_SECONDS.name, "channel" => self.channel)
            .record(self.wait.as_secs_f64());
    }
}

/// A step's condition threw: the step is suppressed, the failure counted
/// against its journey.
pub struct StepConditionFailed<'a> {
    pub journey: &'a str,
    pub instance: &'a str,
    pub error: &'a dyn Display,
}

impl StepConditionFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: SCHEDULER, journey = %self.journey, instance = %self.instance, error = %self.error, "step condition failed");
        metrics::counter!(RULE_ERRORS.name, "journey" => self.journey.to_string()).increment(1);
    }
}

pub struct SchedulerRoundFailed<'a> {
    pub channel: &'static str,
    pub error: &'a dyn Display,
}

impl SchedulerRoundFailed<'_> {
    pub fn emit(self) {
        tracing::error!(target: SCHEDULER, channel = %self.channel, error = %self.error, "scheduler round failed; retrying in 1s");
        metrics::counter!(SCHEDULER_ERRORS.name).increment(1);
    }
}

pub struct StepResultsUnstored<'a> {
    pub channel: &'static str,
    pub error: &'a dyn Display,
}

impl StepResultsUnstored<'_> {
    pub fn emit(self) {
        tracing::warn!(target: SCHEDULER, channel = %self.channel, error = %self.error, "recording finished steps failed; writing them again");
        metrics::counter!(STEP_RESULTS_UNSTORED.name, "channel" => self.channel).increment(1);
    }
}

pub struct StepResultRefused<'a> {
    pub channel: &'static str,
    pub instance: &'a str,
    pub step: &'a str,
    pub error: &'a dyn Display,
}

impl StepResultRefused<'_> {
    pub fn emit(self) {
        tracing::error!(target: SCHEDULER, channel = %self.channel, instance = %self.instance, step = %self.step, error = %self.error, "the store refused a step's result for good; recording the step as failed");
        metrics::counter!(STEP_RESULTS_REFUSED.name, "channel" => self.channel).increment(1);
    }
}

/// A result fenced off by the store ([`crate::store::Store::settle_steps`]).
pub struct StepClaimLost<'a> {
    pub channel: &'static str,
    pub instance: &'a str,
    pub step: &'a str,
    pub outcome: &'a str,
}

impl StepClaimLost<'_> {
    pub fn emit(self) {
        tracing::warn!(target: SCHEDULER, channel = %self.channel, instance = %self.instance, step = %self.step, outcome = %self.outcome, "step taken over by another worker after this one's lease ran out; its result here is not recorded (the holder records the step, under the same idempotency key)");
        metrics::counter!(CLAIMS_LOST.name, "channel" => self.channel).increment(1);
    }
}

/// A step nudge stopped trying: refused by its receiver, out of attempts,
/// or past its lateness bound while the receiver failed. The dispatch log
/// has every one; the log line says that sending is failing, once per
/// channel and cause every quiet period (an outage fails thousands), with
/// ids only: a receiver's answer may quote the customer.
pub struct StepGivenUp<'a> {
    pub channel: &'static str,
    pub journey: &'a str,
    pub instance: &'a str,
    pub step: &'a str,
    /// `failed` or `expired`.
    pub outcome: &'static str,
    /// The kind of error, e.g. `unavailable`, `timeout`, `rejected`.
    pub cause: &'static str,
    pub http_status: Option<u16>,
    pub attempts: u32,
}

impl StepGivenUp<'_> {
    pub fn emit(self) {
        let key = format!("{}:{}:{}", self.channel, self.outcome, self.cause);
        if let Some(repeats) = GIVEN_UP_LINES.admit(&key, std::time::Instant::now()) {
            if self.cause == "timeout" {
                // The request went; its answer did not come in time.
                tracing::warn!(target: SCHEDULER, channel = %self.channel, journey = %self.journey, instance = %self.instance, step = %self.step, outcome = %self.outcome, cause = %self.cause, attempts = self.attempts, similar_not_logged = repeats, "step given up: its last try timed out, so the receiver may have it (nudge log --outcome {})", self.outcome);
            } else {
                tracing::warn!(target: SCHEDULER, channel = %self.channel, journey = %self.journey, instance = %self.instance, step = %self.step, outcome = %self.outcome, cause = %self.cause, http_status = self.http_status, attempts = self.attempts, similar_not_logged = repeats, "step given up: not sent (the dispatch log has the receiver's answer: nudge log --outcome {})", self.outcome);
            }
        }
    }
}

static GIVEN_UP_LINES: Throttle = Throttle::new(Duration::from_secs(10));

/// A claimed step let go unsent: its lease ran out before its send began.
pub struct StepLeaseRanOut<'a> {
    pub channel: &'static str,
    pub instance: &'a str,
    pub step: &'a str,
}

impl StepLeaseRanOut<'_> {
    pub fn emit(self) {
        tracing::warn!(target: SCHEDULER, channel = %self.channel, instance = %self.instance, step = %self.step, "lease on a claimed step ran out before its send began (this process stalled, or the wall clock stepped forward) and it is no longer this process's; not sent here: whoever claims it next sends it");
        metrics::counter!(CLAIMS_LOST.name, "channel" => self.channel).increment(1);
    }
}

pub struct LeaseRenewalFailed<'a> {
    pub channel: &'static str,
    pub error: &'a dyn Display,
}

impl LeaseRenewalFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: SCHEDULER, channel = %self.channel, error = %self.error, "renewing the leases of steps being sent failed");
        metrics::counter!(LEASE_RENEWAL_ERRORS.name, "channel" => self.channel).increment(1);
    }
}

pub struct NextDueUnreadable<'a> {
    pub channel: &'static str,
    pub error: &'a dyn Display,
}

impl NextDueUnreadable<'_> {
    pub fn emit(self) {
        tracing::error!(target: SCHEDULER, channel = %self.channel, error = %self.error, "cannot read next due step");
        metrics::counter!(SCHEDULER_ERRORS.name).increment(1);
    }
}

/// The listener for steps other replicas hand back lost its connection
/// (PostgreSQL); it reconnects with backoff, and meanwhile such steps wait
/// for this replica's next idle look.
pub struct ReleasedStepsUnheard<'a> {
    pub error: &'a dyn Display,
}

impl ReleasedStepsUnheard<'_> {
    pub fn emit(self) {
        tracing::warn!(target: SCHEDULER, error = %self.error, "not hearing steps other replicas hand back; reconnecting");
        metrics::counter!(SCHEDULER_ERRORS.name).increment(1);
    }
}

// ── Dead-letter publishing ──────────────────────────────────────────────

pub struct DeadLettersPublished {
    pub count: u64,
}

impl DeadLettersPublished {
    pub fn emit(self) {
        metrics::counter!(DEAD_LETTERS_PUBLISHED.name).increment(self.count);
    }
}

pub struct DeadLetterOutboxUnreadable<'a> {
    pub error: &'a dyn Display,
}

impl DeadLetterOutboxUnreadable<'_> {
    pub fn emit(self) {
        tracing::error!(target: DLQ, error = %self.error, "cannot read the dead-letter outbox");
        metrics::counter!(DEAD_LETTER_PUBLISH_ERRORS.name, "stage" => "read").increment(1);
    }
}

/// One attempt to publish a dead letter failed; it is tried again later.
pub struct DeadLetterPublishFailed<'a> {
    pub topic: &'a str,
    /// The letter's outbox id.
    pub id: i64,
    pub attempt: u32,
    pub error: &'a dyn Display,
}

impl DeadLetterPublishFailed<'_> {
    pub fn emit(self) {
        tracing::error!(target: DLQ, topic = %self.topic, letter = self.id, attempt = self.attempt, error = %self.error, "dead-letter publish failed; will retry");
        metrics::counter!(DEAD_LETTER_PUBLISH_ERRORS.name, "stage" => "publish").increment(1);
    }
}

/// A dead letter the topic refused `MAX_ATTEMPTS` times: kept in the store
/// marked failed, no longer tried; the letters behind it go on.
pub struct DeadLetterGivenUp<'a> {
    pub id: i64,
    /// Where the original record is.
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub attempts: u32,
    pub error: &'a dyn Display,
}

impl DeadLetterGivenUp<'_> {
    pub fn emit(self) {
        tracing::error!(target: DLQ, letter = self.id, source_topic = %self.topic, source_partition = self.partition, source_offset = self.offset, attempts = self.attempts, error = %self.error, "dead letter given up: kept in the store as failed");
        metrics::counter!(DEAD_LETTER_PUBLISH_ERRORS.name, "stage" => "publish").increment(1);
        metrics::counter!(DEAD_LETTER_PUBLISH_FAILURES.name).increment(1);
    }
}

/// What became of a letter's failed attempt could not be stored: it is
/// tried again on a later pass (that attempt not counted).
pub struct DeadLetterFailureNotRecorded<'a> {
    pub id: i64,
    pub error: &'a dyn Display,
}

impl DeadLetterFailureNotRecorded<'_> {
    pub fn emit(self) {
        tracing::error!(target: DLQ, letter = self.id, error = %self.error, "cannot record a failed dead-letter publish");
        metrics::counter!(DEAD_LETTER_PUBLISH_ERRORS.name, "stage" => "mark").increment(1);
    }
}

/// The outbox's unpublished letters, measured after a pass.
pub struct DeadLetterBacklogMeasured {
    pub waiting: u64,
    pub failed: u64,
}

impl DeadLetterBacklogMeasured {
    pub fn emit(self) {
        metrics::gauge!(DEAD_LETTERS_PENDING.name, "state" => "waiting").set(self.waiting as f64);
        metrics::gauge!(DEAD_LETTERS_PENDING.name, "state" => "failed").set(self.failed as f64);
    }
}

/// Published letters could not be marked so: they will be published again.
pub struct DeadLettersNotMarked<'a> {
    pub count: usize,
    pub error: &'a dyn Display,
}

impl DeadLettersNotMarked<'_> {
    pub fn emit(self) {
        tracing::error!(target: DLQ, letters = self.count, error = %self.error, "cannot mark dead letters published");
        metrics::counter!(DEAD_LETTER_PUBLISH_ERRORS.name, "stage" => "mark").increment(1);
    }
}

// ── Process ─────────────────────────────────────────────────────────────

pub struct RetentionPurgeFailed<'a> {
    pub error: &'a dyn Display,
}

impl RetentionPurgeFailed<'_> {
    pub fn emit(self) {
        tracing::error!(target: DAEMON, error = %self.error, "retention purge failed");
        metrics::counter!(RETENTION_ERRORS.name).increment(1);
    }
}

pub struct ReviewFoldFailed<'a> {
    pub error: &'a dyn Display,
}

impl ReviewFoldFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: DAEMON, error = %self.error, "folding the review counts failed");
        metrics::counter!(REVIEW_FOLD_ERRORS.name).increment(1);
    }
}

pub struct RetentionPurgePanicked<'a> {
    pub error: &'a dyn Display,
}

impl RetentionPurgePanicked<'_> {
    pub fn emit(self) {
        tracing::error!(target: DAEMON, error = %self.error, "retention purge panicked");
        metrics::counter!(RETENTION_ERRORS.name).increment(1);
    }
}

/// Logged only: the admin server is what serves `/metrics`, so a counter of
/// its own failure could never be scraped. Accepting a connection failed
/// (out of file descriptors, say); the server goes on after a pause.
pub struct AdminServerFailed<'a> {
    pub error: &'a dyn Display,
}

impl AdminServerFailed<'_> {
    pub fn emit(self) {
        tracing::error!(target: DAEMON, error = %self.error, "admin server could not accept a connection");
    }
}

/// A request to the review page or control API without a valid token.
/// The presented token is never logged, not even in part.
pub struct AdminAuthRefused<'a> {
    pub path: &'a str,
    /// `missing token`, `wrong token` or `reviewer token on an admin endpoint`.
    pub reason: &'static str,
    /// The address the request came from (an operator's, not a customer's).
    pub client: Option<std::net::IpAddr>,
}

impl AdminAuthRefused<'_> {
    pub fn emit(self) {
        metrics::counter!(ADMIN_AUTH_REFUSED.name, "reason" => self.reason).increment(1);
        // Anyone who reaches the port can send refused requests as fast as
        // the connection allows, with paths as long as the head: one line
        // per reason a quiet period, the path cut short (the counter above
        // counts them all).
        let Some(repeats) = ADMIN_REFUSED_LINES.admit(self.reason, std::time::Instant::now())
        else {
            return;
        };
        let client = self.client.map(|ip| ip.to_string()).unwrap_or_default();
        tracing::warn!(target: "nudge::admin", path = %shown_path(self.path), reason = self.reason, client = %client, similar_not_logged = repeats, "admin request refused");
    }
}

/// A request path as a log line shows it: its first 120 characters.
pub fn shown_path(path: &str) -> String {
    const SHOWN: usize = 120;
    match path.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}… ({} bytes)", &path[..cut], path.len()),
        None => path.to_string(),
    }
}

static ADMIN_REFUSED_LINES: Throttle = Throttle::new(Duration::from_secs(10));

/// Logged only: the process exits right after, before any scrape.
pub struct TaskStopped<'a> {
    pub failure: &'a crate::supervise::TaskFailure,
}

impl TaskStopped<'_> {
    pub fn emit(self) {
        tracing::error!(target: DAEMON, task = self.failure.task, cause = %self.failure.cause, "a long-running task stopped; the daemon stops");
    }
}

/// Logged only, once at start: a setting to change, not a rate to watch.
pub struct CatchUpShorterThanSession {
    pub catch_up: Duration,
    pub session: Duration,
}

impl CatchUpShorterThanSession {
    pub fn emit(self) {
        tracing::warn!(
            target: DAEMON,
            catch_up_timeout = %crate::humanize::duration(self.catch_up),
            session_timeout = %crate::humanize::duration(self.session),
            "kafka.catch_up_timeout is shorter than the consumer's session.timeout.ms: after a crash, sending may begin before the records that waited are read"
        );
    }
}

/// Sending starts: once the records that waited at start were read, or at
/// `kafka.catch_up_timeout` without them (a warning: an exit among them may
/// come after a step that fell due meanwhile is sent).
pub struct SendingBegins {
    pub waited: Duration,
    pub caught_up: bool,
}

impl SendingBegins {
    pub fn emit(self) {
        let waited_ms = self.waited.as_millis() as u64;
        match self.caught_up {
            true => tracing::info!(target: DAEMON, waited_ms, caught_up = true, "sending begins"),
            false => tracing::warn!(
                target: DAEMON,
                waited_ms,
                caught_up = false,
                "sending begins before the records that waited were read (kafka.catch_up_timeout)"
            ),
        }
    }
}

/// Logged only: the process exits right after, before any scrape.
pub struct DrainDeadlinePassed {
    pub deadline: Duration,
}

impl DrainDeadlinePassed {
    pub fn emit(self) {
        tracing::warn!(target: DAEMON, deadline = %crate::humanize::duration(self.deadline), "drain deadline passed; unfinished sends are leased and will be retried");
    }
}

pub struct AuditRecordsPublished {
    pub count: u64,
}

impl AuditRecordsPublished {
    pub fn emit(self) {
        metrics::counter!(AUDIT_RECORDS_PUBLISHED.name).increment(self.count);
    }
}

pub struct AuditOutboxUnreadable<'a> {
    pub error: &'a dyn Display,
}

impl AuditOutboxUnreadable<'_> {
    pub fn emit(self) {
        tracing::error!(target: AUDIT, error = %self.error, "cannot read or update the audit outbox");
        metrics::counter!(AUDIT_PUBLISH_ERRORS.name, "stage" => "read").increment(1);
    }
}

/// Records of a pass the audit topic did not acknowledge: kept in the
/// outbox (with the same customers' later records) and sent again.
pub struct AuditPublishFailed<'a> {
    pub topic: &'a str,
    pub count: u64,
    pub error: &'a dyn Display,
}

impl AuditPublishFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: AUDIT, topic = %self.topic, records = self.count, error = %self.error, "audit records not published; retrying");
        metrics::counter!(AUDIT_PUBLISH_ERRORS.name, "stage" => "produce").increment(1);
    }
}

pub struct AuditBacklogMeasured {
    pub waiting: u64,
}

impl AuditBacklogMeasured {
    pub fn emit(self) {
        metrics::gauge!(AUDIT_OUTBOX_PENDING.name).set(self.waiting as f64);
    }
}

/// Outbox rows whose log records retention deleted before publishing.
pub struct AuditRecordsLost {
    pub count: u64,
}

impl AuditRecordsLost {
    pub fn emit(self) {
        tracing::error!(target: AUDIT, records = self.count, "audit records purged by retention before they were published");
        metrics::counter!(AUDIT_RECORDS_LOST.name).increment(self.count);
    }
}

/// A journey's `rank(customer, vars)` threw or returned no number: its
/// step competes with the journey's `priority`, the failure counted against
/// the journey.
pub struct RankFailed<'a> {
    pub journey: &'a str,
    pub instance: &'a str,
    pub error: &'a dyn Display,
}

impl RankFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: SCHEDULER, journey = %self.journey, instance = %self.instance, error = %self.error, "rank failed; using the journey's priority");
        metrics::counter!(RULE_ERRORS.name, "journey" => self.journey.to_string()).increment(1);
    }
}

/// Logged only: a review-page read that failed (the page answers 500; the
/// store's own health is on `/readyz`).
pub struct ReviewReadFailed<'a> {
    pub what: &'a str,
    pub error: &'a dyn Display,
}

impl ReviewReadFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: "nudge::admin::page", what = self.what, error = %self.error, "review page: store read failed");
    }
}

/// Logged only: `policy.holidays` was checked when the config loaded, so
/// this is a file changed or removed since; no public holidays apply.
pub struct HolidayCalendarUnreadable<'a> {
    pub error: &'a dyn Display,
}

impl HolidayCalendarUnreadable<'_> {
    pub fn emit(self) {
        tracing::error!(target: "nudge::policy", error = %self.error, "holiday calendar unreadable; no public holidays apply");
    }
}

/// The holiday calendar runs out soon (or has run out).
pub struct HolidayCalendarEnding<'a> {
    pub note: &'a str,
}

impl HolidayCalendarEnding<'_> {
    pub fn emit(self) {
        tracing::warn!(target: "nudge::policy", note = %self.note, "holiday calendar ending");
    }
}

// ── Runtime control ─────────────────────────────────────────────────────

const CONTROL: &str = "nudge::control";

/// A journey or channel changed through the admin API: who (the token's
/// name, never the token), what, before and after.
pub struct ControlChanged<'a> {
    pub entry: &'a crate::store::control::ControlEntry,
}

impl ControlChanged<'_> {
    pub fn emit(self) {
        let e = self.entry;
        tracing::info!(target: CONTROL, seq = e.seq, who = %e.who, kind = %e.kind, name = %e.target, before = %e.before, after = %e.after, "runtime control changed");
        metrics::counter!(CONTROL_CHANGES.name, "kind" => e.kind.clone()).increment(1);
    }
}

/// The overrides could not be read; those in force stay.
pub struct ControlRefreshFailed<'a> {
    pub error: &'a dyn Display,
}

impl ControlRefreshFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: CONTROL, error = %self.error, "runtime-control overrides unreadable; the ones in force stay");
        metrics::counter!(CONTROL_REFRESH_ERRORS.name).increment(1);
    }
}

/// The propensity counts could not be read; scripts keep the last table.
pub struct PropensityRefreshFailed<'a> {
    pub error: &'a dyn Display,
}

impl PropensityRefreshFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(target: "nudge::propensity", error = %self.error, "propensity counts unreadable; scripts keep the last table");
        metrics::counter!(PROPENSITY_REFRESH_ERRORS.name).increment(1);
    }
}

/// Which build is running, as a series to join others on.
pub struct BuildInfo;

impl BuildInfo {
    pub fn emit(self) {
        metrics::gauge!(
            BUILD_INFO.name,
            "version" => env!("CARGO_PKG_VERSION"),
            "commit" => env!("NUDGE_COMMIT")
        )
        .set(1.0);
    }
}

/// Whether a channel is stopped by runtime control, set when the overrides change.
pub struct ChannelStopped<'a> {
    pub channel: &'a str,
    pub stopped: bool,
}

impl ChannelStopped<'_> {
    pub fn emit(self) {
        metrics::gauge!(CHANNEL_STOPPED.name, "channel" => self.channel.to_string())
            .set(if self.stopped { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_of_one_kind_share_a_throttle_key() {
        assert_eq!(
            kind_of("not valid JSON: expected value at line 1 column 7"),
            kind_of("not valid JSON: expected value at line 1 column 90")
        );
        assert_ne!(
            kind_of("not valid JSON: expected value at line 1 column 7"),
            kind_of("not a CloudEvent: missing `id`")
        );
    }

    #[test]
    fn a_repeated_error_is_logged_once_per_quiet_period_with_its_repeats() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(throttle.admit("all brokers down", at(0)), Some(0));
        assert_eq!(throttle.admit("all brokers down", at(50)), None);
        assert_eq!(throttle.admit("all brokers down", at(9_999)), None);
        assert_eq!(throttle.admit("all brokers down", at(10_000)), Some(2));
        assert_eq!(throttle.admit("all brokers down", at(10_001)), None);
        // Another error is news: logged at once.
        assert_eq!(throttle.admit("handshake failed", at(10_002)), Some(0));
        // Two errors taking turns (a broker down: the client's and each
        // receive's) are each held back, not logged on every turn.
        for ms in (10_003..19_000).step_by(50) {
            assert_eq!(throttle.admit("all brokers down", at(ms)), None);
            assert_eq!(throttle.admit("handshake failed", at(ms + 1)), None);
        }
        // The one at 10_001 and the 180 of the loop.
        assert_eq!(throttle.admit("all brokers down", at(20_000)), Some(181));
    }
}
