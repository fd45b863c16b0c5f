//! Every metric nudge exports: name, type, labels and what it measures, in
//! one table. The events in [`super::events`] are the only writers;
//! README's metric table is generated from [`ALL`] ([`reference`]) and a
//! test keeps the two equal, so a metric cannot ship undocumented.
//!
//! Names are part of the interface (dashboards and alerts use them): rename
//! one only with a note in the changelog.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Exported with [`BUCKETS`]: without buckets the Prometheus exporter
    /// writes a summary, which cannot be aggregated across daemons.
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// Label names, in the order README lists them.
    pub labels: &'static [&'static str],
    /// One line for `# HELP` and README: what is counted and, for a failure,
    /// what nudge does about it.
    pub help: &'static str,
}

/// Bucket bounds of every histogram, in seconds.
pub const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

// Ingest.

pub const EVENTS_CONSUMED: Metric = Metric {
    name: "nudge_events_consumed_total",
    kind: Kind::Counter,
    labels: &["topic", "partition"],
    help: "records consumed from Kafka, whatever their type",
};
pub const CONSUMER_LAG: Metric = Metric {
    name: "nudge_consumer_lag",
    kind: Kind::Gauge,
    labels: &["topic", "partition"],
    help: "librdkafka's lag (high watermark minus position), from its statistics every 5 s",
};
pub const RECORD_AGE: Metric = Metric {
    name: "nudge_record_age_seconds",
    kind: Kind::Gauge,
    labels: &[],
    help: "age of the youngest record consumed in the last 5 s that brought records, by this host's clock against the record's Kafka timestamp: about the pipeline's delay when caught up and the clocks agree; negative: this host's clock is behind the producers' (or the broker's); large while nudge_consumer_lag is 0: this host's clock is ahead, and messages may expire",
};
pub const EVENTS_IGNORED: Metric = Metric {
    name: "nudge_events_ignored_total",
    kind: Kind::Counter,
    labels: &[],
    help: "records no journey and no customer context reads (unknown event types)",
};
pub const EVENTS_DUPLICATE: Metric = Metric {
    name: "nudge_events_duplicate_total",
    kind: Kind::Counter,
    labels: &[],
    help: "events skipped because their id (from the same `source`) was already processed (producer retries, replays)",
};
pub const KEY_MISMATCH: Metric = Metric {
    name: "nudge_key_mismatch_total",
    kind: Kind::Counter,
    labels: &[],
    help: "records whose Kafka key is not their customer id, or that have no key: that customer's events may be decided out of order",
};
pub const INGEST_BATCH_SECONDS: Metric = Metric {
    name: "nudge_ingest_batch_seconds",
    kind: Kind::Histogram,
    labels: &[],
    help: "deciding and storing one consumed batch",
};
pub const DEAD_LETTERS: Metric = Metric {
    name: "nudge_dead_letters_total",
    kind: Kind::Counter,
    labels: &["kind"],
    help: "records put in the dead-letter outbox: invalid (not a valid CloudEvent), rule (a journey failed on it), context (a customer context update failed), store (the store refused it for good)",
};
pub const KAFKA_ERRORS: Metric = Metric {
    name: "nudge_kafka_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "errors receiving from Kafka or reported by its client (all brokers down, a failed TLS handshake); the consumer keeps polling, and the log gives each distinct error once per 10 s with how many repeats it left out",
};
pub const KAFKA_REBALANCE_ERRORS: Metric = Metric {
    name: "nudge_kafka_rebalance_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "consumer group rebalances that failed; librdkafka retries them",
};
pub const OFFSET_RESUME_ERRORS: Metric = Metric {
    name: "nudge_offset_resume_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "assigned topics whose stored offsets could not be read; records read again are skipped by event id instead",
};
pub const STORE_OFFSET_MOVED: Metric = Metric {
    name: "nudge_store_offset_moved_total",
    kind: Kind::Counter,
    labels: &[],
    help: "partitions read again because the store held another offset than the consumer's (a failover to a standby that missed transactions, a restored backup, another consumer)",
};
pub const OFFSET_COMMIT_ERRORS: Metric = Metric {
    name: "nudge_offset_commit_errors_total",
    kind: Kind::Counter,
    labels: &["commit"],
    help: "Kafka offset commits that failed, after a batch (usual during a rebalance) or the final one on shutdown; the store's offsets are used on restart",
};
pub const STORE_ERRORS: Metric = Metric {
    name: "nudge_store_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "consumed batches the store could not write; the batch is retried until it is stored",
};

// Journeys.

pub const RULE_EVALUATIONS: Metric = Metric {
    name: "nudge_rule_evaluations_total",
    kind: Kind::Counter,
    labels: &["journey"],
    help: "runs of a journey's decide",
};
pub const RULE_ERRORS: Metric = Metric {
    name: "nudge_rule_errors_total",
    kind: Kind::Counter,
    labels: &["journey"],
    help: "runs of decide or of a step condition that failed (the event is dead-lettered, the step suppressed)",
};
pub const RULE_TIMEOUTS: Metric = Metric {
    name: "nudge_rule_timeouts_total",
    kind: Kind::Counter,
    labels: &["journey"],
    help: "runs of decide or of a step condition stopped at rules.timeout (also counted in nudge_rule_errors_total)",
};
pub const ADMIN_AUTH_REFUSED: Metric = Metric {
    name: "nudge_admin_auth_refused_total",
    kind: Kind::Counter,
    labels: &["reason"],
    help: "admin-server requests refused for a missing or wrong token (review page, control API)",
};
pub const JOURNEYS_STARTED: Metric = Metric {
    name: "nudge_journeys_started_total",
    kind: Kind::Counter,
    labels: &["journey"],
    help: "journey instances started",
};
pub const JOURNEYS_ENDED: Metric = Metric {
    name: "nudge_journeys_ended_total",
    kind: Kind::Counter,
    labels: &["journey", "outcome"],
    help: "journey instances closed by an exit event (converted or cancelled)",
};
pub const RULE_RELOADS: Metric = Metric {
    name: "nudge_rule_reloads_total",
    kind: Kind::Counter,
    labels: &["result"],
    help: "rule reloads that found a new version: ok (swapped in), refused (it does not compile) or failed (its version could not be stored); unless ok the previous rules keep running",
};

// Sending.

pub const STEPS: Metric = Metric {
    name: "nudge_steps_total",
    kind: Kind::Counter,
    labels: &["channel", "outcome"],
    help: "decisions about due steps, by dispatch-log outcome",
};
pub const DISPATCH_SECONDS: Metric = Metric {
    name: "nudge_dispatch_seconds",
    kind: Kind::Histogram,
    labels: &["channel"],
    help: "one send to a channel endpoint, whatever its result",
};
pub const SCHEDULER_ERRORS: Metric = Metric {
    name: "nudge_scheduler_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "scheduler rounds or next-due lookups that failed on the store (the channel's loop tries again after 1 s), and lost connections of the listener for steps other replicas hand back (PostgreSQL; it reconnects)",
};
pub const STEP_RESULTS_UNSTORED: Metric = Metric {
    name: "nudge_step_results_unstored_total",
    kind: Kind::Counter,
    labels: &["channel"],
    help: "groups of finished steps the store refused for a moment (transient error); they are written again with backoff, never dropped",
};
pub const STEP_RESULTS_REFUSED: Metric = Metric {
    name: "nudge_step_results_refused_total",
    kind: Kind::Counter,
    labels: &["channel"],
    help: "step results the store refused for good (permanent error): each is recorded as failed with the store's reason instead, so it is never retried forever",
};
pub const CLAIMS_LOST: Metric = Metric {
    name: "nudge_step_claims_lost_total",
    kind: Kind::Counter,
    labels: &["channel"],
    help: "claimed steps this replica let go because its lease on them ran out (a stall, a partition): not sent if their send had not begun, not recorded if another replica took them over meanwhile; whoever holds the step sends and records it, under the same idempotency key; a steady rate means the lease is too short",
};
pub const LEASE_RENEWAL_ERRORS: Metric = Metric {
    name: "nudge_lease_renewal_errors_total",
    kind: Kind::Counter,
    labels: &["channel"],
    help: "heartbeats that could not renew the leases of steps being sent; the next is a third of a lease later",
};
pub const RATE_LIMITED: Metric = Metric {
    name: "nudge_rate_limited_total",
    kind: Kind::Counter,
    labels: &["channel"],
    help: "steps over their channel's rate (channels.<kind>.rate), deferred in the store to their reserved slot: never dropped, not counted as an attempt",
};
pub const RATE_WAIT_SECONDS: Metric = Metric {
    name: "nudge_rate_wait_seconds",
    kind: Kind::Histogram,
    labels: &["channel"],
    help: "how long a step over its channel's rate waits for its slot",
};

// Dead-letter publishing and upkeep.

pub const DEAD_LETTERS_PUBLISHED: Metric = Metric {
    name: "nudge_dead_letters_published_total",
    kind: Kind::Counter,
    labels: &[],
    help: "dead letters published from the outbox to the dead-letter topic",
};
pub const DEAD_LETTER_PUBLISH_ERRORS: Metric = Metric {
    name: "nudge_dead_letter_publish_errors_total",
    kind: Kind::Counter,
    labels: &["stage"],
    help: "dead-letter publishing failures: read (the outbox), publish (one attempt to send a letter) or mark (recording what became of letters: a published one is published again); retried",
};
pub const DEAD_LETTERS_PENDING: Metric = Metric {
    name: "nudge_dead_letters_pending",
    kind: Kind::Gauge,
    labels: &["state"],
    help: "dead letters in the outbox not published, after the publisher's last pass: waiting (to be sent or retried) or failed (given up, kept in the store: alert on it)",
};
pub const DEAD_LETTER_PUBLISH_FAILURES: Metric = Metric {
    name: "nudge_dead_letter_publish_failures_total",
    kind: Kind::Counter,
    labels: &[],
    help: "dead letters given up after the topic refused them 5 times: kept in the store marked failed, the letters behind them go on",
};
pub const RETENTION_ERRORS: Metric = Metric {
    name: "nudge_retention_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "retention purges that failed; the next is an hour later",
};
pub const REVIEW_FOLD_ERRORS: Metric = Metric {
    name: "nudge_review_fold_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "folds of new dispatch-log records into the review page's counts that failed; the funnel stays right, only slower to read, and the next fold is seconds later",
};
pub const AUDIT_RECORDS_PUBLISHED: Metric = Metric {
    name: "nudge_audit_records_published_total",
    kind: Kind::Counter,
    labels: &[],
    help: "dispatch-log records published to `audit.topic` and acknowledged",
};
pub const AUDIT_PUBLISH_ERRORS: Metric = Metric {
    name: "nudge_audit_publish_errors_total",
    kind: Kind::Counter,
    labels: &["stage"],
    help: "audit-stream failures: `read` (the outbox), `produce` (records not acknowledged, kept and sent again)",
};
pub const AUDIT_OUTBOX_PENDING: Metric = Metric {
    name: "nudge_audit_outbox_pending",
    kind: Kind::Gauge,
    labels: &[],
    help: "dispatch-log records waiting in the outbox for `audit.topic`",
};
pub const AUDIT_RECORDS_LOST: Metric = Metric {
    name: "nudge_audit_records_lost_total",
    kind: Kind::Counter,
    labels: &[],
    help: "audit records retention deleted before they could be published (the topic unreachable for longer than `store.retention`)",
};

// Runtime control.

pub const CONTROL_CHANGES: Metric = Metric {
    name: "nudge_control_changes_total",
    kind: Kind::Counter,
    labels: &["kind"],
    help: "runtime-control changes made through this daemon's admin API (`journey` or `channel`), each in the control log",
};
pub const CONTROL_REFRESH_ERRORS: Metric = Metric {
    name: "nudge_control_refresh_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "reads of the runtime-control overrides that failed; the ones in force stay until the next read, a second later",
};
pub const PROPENSITY_REFRESH_ERRORS: Metric = Metric {
    name: "nudge_propensity_refresh_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "reads of the propensity counts that failed; scripts keep reading the last table until the next read (`policy.propensity.refresh`)",
};
pub const RULES_REFUSED: Metric = Metric {
    name: "nudge_rules_refused",
    kind: Kind::Gauge,
    labels: &[],
    help: "1 while the rules on disk do not compile (the last reload was refused: the rules in force keep running, but a restart would not start; `/readyz` says since when and why), else 0",
};
pub const BUILD_INFO: Metric = Metric {
    name: "nudge_build_info",
    kind: Kind::Gauge,
    labels: &["version", "commit"],
    help: "1, labelled with the running binary's version and the commit it was built from (as `nudge --version`)",
};
pub const CHANNEL_STOPPED: Metric = Metric {
    name: "nudge_channel_stopped",
    kind: Kind::Gauge,
    labels: &["channel"],
    help: "1 while the channel is stopped by runtime control (its due steps wait in the store), else 0",
};

/// Every metric, in README's order.
pub const ALL: &[&Metric] = &[
    &EVENTS_CONSUMED,
    &CONSUMER_LAG,
    &RECORD_AGE,
    &EVENTS_IGNORED,
    &EVENTS_DUPLICATE,
    &KEY_MISMATCH,
    &INGEST_BATCH_SECONDS,
    &DEAD_LETTERS,
    &KAFKA_ERRORS,
    &KAFKA_REBALANCE_ERRORS,
    &OFFSET_RESUME_ERRORS,
    &STORE_OFFSET_MOVED,
    &OFFSET_COMMIT_ERRORS,
    &STORE_ERRORS,
    &RULE_EVALUATIONS,
    &RULE_ERRORS,
    &RULE_TIMEOUTS,
    &ADMIN_AUTH_REFUSED,
    &JOURNEYS_STARTED,
    &JOURNEYS_ENDED,
    &RULE_RELOADS,
    &STEPS,
    &DISPATCH_SECONDS,
    &SCHEDULER_ERRORS,
    &STEP_RESULTS_UNSTORED,
    &STEP_RESULTS_REFUSED,
    &CLAIMS_LOST,
    &LEASE_RENEWAL_ERRORS,
    &RATE_LIMITED,
    &RATE_WAIT_SECONDS,
    &DEAD_LETTERS_PUBLISHED,
    &DEAD_LETTER_PUBLISH_ERRORS,
    &DEAD_LETTERS_PENDING,
    &DEAD_LETTER_PUBLISH_FAILURES,
    &RETENTION_ERRORS,
    &REVIEW_FOLD_ERRORS,
    &AUDIT_RECORDS_PUBLISHED,
    &AUDIT_PUBLISH_ERRORS,
    &AUDIT_OUTBOX_PENDING,
    &AUDIT_RECORDS_LOST,
    &CONTROL_CHANGES,
    &CONTROL_REFRESH_ERRORS,
    &CHANNEL_STOPPED,
    &PROPENSITY_REFRESH_ERRORS,
    &RULES_REFUSED,
    &BUILD_INFO,
];

/// The metric named `name`, if nudge exports one.
pub fn find(name: &str) -> Option<&'static Metric> {
    ALL.iter().copied().find(|m| m.name == name)
}

/// README's metric table, generated from [`ALL`].
pub fn reference() -> String {
    let mut out =
        String::from("| metric | type | labels | what it measures |\n| --- | --- | --- | --- |\n");
    for m in ALL {
        let labels: Vec<String> = m.labels.iter().map(|l| format!("`{l}`")).collect();
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            m.name,
            m.kind.as_str(),
            labels.join(", "),
            m.help
        );
    }
    out
}

/// Gives every metric its `# HELP` line in the installed recorder.
pub fn describe() {
    for m in ALL {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}
