//! The SQLite schema as numbered migrations, embedded in the binary and
//! applied in order when the store opens. The database's version is SQLite's
//! `user_version`; a database newer than this binary is refused, never
//! written to. A shipped migration is never edited: add the next one.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::StoreError;

/// Migration `n` (1-based) takes a database from version `n - 1` to `n`.
const MIGRATIONS: &[&str] = &[
    V1_TABLES,
    V2_DECISION_INPUTS,
    V3_SEND_INTENTS,
    V4_DEAD_LETTER_HEADERS_AND_RETRIES,
    V5_REVIEW_INDEXES,
    V6_AUDIT_OUTBOX,
    V7_RUNTIME_CONTROL,
    V8_PROPENSITY_COUNTS,
    V9_DECISION_RECORD,
    V10_REVIEW_COUNTS,
    V11_AUDIT_OUTBOX_IN_CODE,
    V12_ONE_LOG_INDEX_BY_CUSTOMER,
    V13_REFUSED_EVENTS,
    V14_EXITS_THAT_ENDED_NOTHING,
    V15_STORE_MOVED,
];

/// The schema version this binary writes.
pub const VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database to [`VERSION`]; returns how many migrations ran.
/// Each runs in its own immediate transaction that re-reads the version, so
/// two processes opening one new file at once apply each migration once.
pub fn migrate(conn: &mut Connection) -> Result<u32, StoreError> {
    let mut applied = 0;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = version(&tx)?;
        if current > VERSION {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported: VERSION,
            });
        }
        if current == VERSION {
            return Ok(applied);
        }
        if applied == 0 {
            // Nothing else is said until it ends, and a large store takes minutes.
            tracing::info!(from = current, to = VERSION, "migrating the store's schema");
        }
        tx.execute_batch(MIGRATIONS[current as usize])?;
        tx.pragma_update(None, "user_version", current + 1)?;
        tx.commit()?;
        applied += 1;
    }
}

/// The database's schema version (0 for a new file).
pub fn version(conn: &Connection) -> Result<u32, StoreError> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

/// Version 1: the tables as they were before versioning (`IF NOT EXISTS`, so
/// a database created then, at `user_version` 0, adopts it unchanged).
pub(super) const V1_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY,
    context TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    journey TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    mode TEXT NOT NULL,
    category TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    rule_hash TEXT NOT NULL,
    trigger_event TEXT NOT NULL,
    vars TEXT NOT NULL,
    seen TEXT NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS instances_one_open ON instances (customer, journey, key) WHERE status = 'open';
CREATE INDEX IF NOT EXISTS instances_by_customer ON instances (customer, started_at);
CREATE TABLE IF NOT EXISTS steps (
    instance_id TEXT NOT NULL,
    step TEXT NOT NULL,
    seq INTEGER NOT NULL,
    channel TEXT NOT NULL,
    template TEXT NOT NULL,
    condition TEXT,
    planned_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER
);
-- A rowid table: rows lie in the order they were planned, so a batch of
-- steps falling due together shares a few pages instead of one page each
-- (a claim from 10 M pending steps stays as cheap as from a thousand).
CREATE UNIQUE INDEX IF NOT EXISTS steps_key ON steps (instance_id, step);
CREATE INDEX IF NOT EXISTS steps_pending ON steps (channel, due_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS steps_claimed ON steps (channel, lease_until) WHERE status = 'claimed';
CREATE TABLE IF NOT EXISTS dispatch_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    customer TEXT NOT NULL,
    journey TEXT NOT NULL,
    instance TEXT NOT NULL,
    step TEXT NOT NULL,
    channel TEXT NOT NULL,
    template TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    rule_hash TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    latency_ms INTEGER,
    event_id TEXT
);
CREATE INDEX IF NOT EXISTS dispatch_log_sends ON dispatch_log (customer, time) WHERE outcome = 'sent';
CREATE INDEX IF NOT EXISTS dispatch_log_instance ON dispatch_log (instance) WHERE outcome = 'sent';
CREATE TABLE IF NOT EXISTS processed_events (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kafka_offsets (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    key BLOB,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    journey TEXT,
    event_id TEXT,
    created_at INTEGER NOT NULL,
    published_at INTEGER
);
CREATE INDEX IF NOT EXISTS dead_letters_unpublished ON dead_letters (id) WHERE published_at IS NULL;
-- Retention purges by age: without these it scans whole tables while holding
-- the write lock (seconds at millions of rows, stalling ingest and sending).
CREATE INDEX IF NOT EXISTS processed_events_at ON processed_events (at);
CREATE INDEX IF NOT EXISTS dead_letters_published ON dead_letters (published_at) WHERE published_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS rule_versions (
    version TEXT PRIMARY KEY,
    loaded_at INTEGER NOT NULL,
    files TEXT NOT NULL
) WITHOUT ROWID;
"#;

/// Version 2: the instance's decision record is named for what it is.
const V2_DECISION_INPUTS: &str = "ALTER TABLE instances RENAME COLUMN seen TO decision_inputs;";

/// Version 3: when a claimed step's send began, until its result is
/// recorded. A step still marked after its sender died may have been
/// delivered: the frequency cap counts it (see `Store::mark_sending`).
/// No index: it is read through the customer's instances, and keeping one
/// up to date cost more than the column (two index writes per send).
const V3_SEND_INTENTS: &str = "ALTER TABLE steps ADD COLUMN sending_at INTEGER;";

/// Version 4: a dead letter keeps the original record's headers, and its
/// publish attempts: how many failed, the last error, when to try again,
/// and when it was given up (kept, never claimed again).
const V4_DEAD_LETTER_HEADERS_AND_RETRIES: &str = "
ALTER TABLE dead_letters ADD COLUMN headers TEXT;
ALTER TABLE dead_letters ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN last_error TEXT;
ALTER TABLE dead_letters ADD COLUMN retry_at INTEGER;
ALTER TABLE dead_letters ADD COLUMN failed_at INTEGER;
CREATE INDEX dead_letters_failed ON dead_letters (id) WHERE failed_at IS NOT NULL AND published_at IS NULL;
";

/// Version 5: the review's reads (`store::review`). The dispatch log in the
/// review's order (time, then seq: the rowid every index entry ends with)
/// overall and after each filter a reviewer sets most, so that a page of the
/// log is a seek and a short walk at any depth (keyset paging); instances
/// by journey for funnels and a journey's plan. Built under the write lock:
/// on a large log the first start of this version takes a while.
const V5_REVIEW_INDEXES: &str = "
CREATE INDEX dispatch_log_time ON dispatch_log (time);
CREATE INDEX dispatch_log_journey ON dispatch_log (journey, time);
CREATE INDEX dispatch_log_customer ON dispatch_log (customer, time);
CREATE INDEX dispatch_log_outcome ON dispatch_log (outcome, time);
CREATE INDEX instances_by_journey ON instances (journey, started_at);
";

/// Version 6 (audit stream): the outbox of dispatch-log records to publish
/// to `audit.topic`. A trigger filled it (version 11 moved that into the
/// code) in the transaction that writes the record, while `audit_stream.enabled` is set
/// (the daemon sets it from its config at start); the publisher deletes a
/// row once the broker acknowledged it. `holder`/`lease_until`: one
/// publisher at a time, so per-customer order holds.
const V6_AUDIT_OUTBOX: &str = "
CREATE TABLE audit_outbox (
    seq INTEGER PRIMARY KEY,
    customer TEXT NOT NULL
);
CREATE TABLE audit_stream (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    enabled INTEGER NOT NULL,
    holder TEXT,
    lease_until INTEGER
);
INSERT INTO audit_stream (id, enabled) VALUES (1, 0);
CREATE TRIGGER dispatch_log_audit AFTER INSERT ON dispatch_log
WHEN (SELECT enabled FROM audit_stream WHERE id = 1)
BEGIN
    INSERT INTO audit_outbox (seq, customer) VALUES (NEW.seq, NEW.customer);
END;
";

/// Version 7: runtime control (`store::control`): the overrides in force,
/// one row per journey or channel, and the control log of every change
/// (kept for good: retention does not purge it).
const V7_RUNTIME_CONTROL: &str = "
CREATE TABLE control_overrides (
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    settings TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (kind, target)
) WITHOUT ROWID;
CREATE TABLE control_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    who TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT NOT NULL,
    after TEXT NOT NULL
);
CREATE INDEX control_log_time ON control_log (time);
";

/// Version 8 (issue 13, item 2): sends and conversions per journey, step
/// and channel (`crate::propensity`), kept for good (retention does not purge them).
/// Filled from the dispatch log that retention left: every send, and as
/// conversions the sends of instances that converted within 30 days (the
/// default `policy.attribution_window`) after them.
const V8_PROPENSITY_COUNTS: &str = "
CREATE TABLE propensity_counts (
    journey TEXT NOT NULL,
    step TEXT NOT NULL,
    channel TEXT NOT NULL,
    sends INTEGER NOT NULL DEFAULT 0,
    conversions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (journey, step, channel)
) WITHOUT ROWID;
INSERT INTO propensity_counts (journey, step, channel, sends, conversions)
SELECT d.journey, d.step, d.channel, count(*),
       count(CASE WHEN i.status = 'converted' AND d.time <= i.ended_at
                       AND d.time >= i.ended_at - 2592000000 THEN 1 END)
FROM dispatch_log d LEFT JOIN instances i ON i.id = d.instance
WHERE d.outcome = 'sent'
GROUP BY d.journey, d.step, d.channel;
";

/// Version 9 (the decision record, `store::received`): every event the
/// decide stage processed, per customer, with the journeys it triggered that
/// did not start and why; and each dispatch attempt's HTTP status and
/// response time on its log record. Received events are purged oldest
/// first by `id` (written in time order), so no index on their time.
const V9_DECISION_RECORD: &str = "
CREATE TABLE received_events (
    id INTEGER PRIMARY KEY,
    customer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    event_time INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    context_updated INTEGER NOT NULL,
    not_started TEXT NOT NULL
);
CREATE INDEX received_events_customer ON received_events (customer, received_at);
ALTER TABLE dispatch_log ADD COLUMN http_status INTEGER;
ALTER TABLE dispatch_log ADD COLUMN response_ms INTEGER;
";

/// Version 10 (issue 14): the counts behind the funnel, kept by triggers in
/// the transaction that writes the rows, so that `ReviewRead::arms` and
/// `ReviewRead::outcome_counts` read a few rows instead of grouping the
/// whole log and every instance (seconds at 10 M records).
///
/// - `review_outcome_counts`: settled log records (retrying and deferred
///   left out, as the full-scan query left them) per journey, step,
///   outcome and reason, up to the record `review_outcome_folded.seq`.
///   Not kept by a trigger: one on the log's insert cost each settled step
///   24 k instructions (29 % of the settle, measured by callgrind), on the
///   writer every send waits for. The daemon folds the records after the
///   mark into the counts every few seconds ([`super::fold`]: the log is
///   written by one writer, so its seqs are in commit order), and a read
///   adds the few records after the mark itself. Retention's deletes take
///   folded records off the counts (a trigger; purges are not on the
///   sending path).
/// - `review_arm_counts` (per journey and mode) and `review_rule_arm_counts`
///   (per script version too): instances, converted instances, distinct
///   customers, distinct converted customers, first and last start.
///   Distinct customers are kept through one row per (arm, customer)
///   (`review_arm_customers`, `review_rule_arm_customers`): a customer
///   counts while that row's `instances` is above 0, and as converted while
///   its `converted` is. A customer's instances in two script versions are
///   one customer of the journey's arm: the journey's counts are not the sum
///   of its versions'.
/// - An instance's customer, journey, mode, rule hash and start are its
///   decision record and never change; its status does (an exit converts an
///   open or completed one, [`CONVERSION_COUNTS`], in the exit's
///   transaction: a trigger on status updates ran, condition false, for
///   every completion on the sending path, 15 k instructions a step), and
///   retention deletes ended ones. When it
///   deletes an arm's first (or last) start, the next one is read from
///   `instances_by_journey` (retention deletes the oldest: the walk stops at
///   the first remaining instance of the arm).
///
/// Filled from the rows there are, then kept by the triggers.
const V10_REVIEW_COUNTS: &str = "
CREATE TABLE review_outcome_counts (
    journey TEXT NOT NULL,
    step TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    records INTEGER NOT NULL,
    PRIMARY KEY (journey, step, outcome, reason)
) WITHOUT ROWID;
CREATE TABLE review_arm_counts (
    journey TEXT NOT NULL,
    mode TEXT NOT NULL,
    instances INTEGER NOT NULL,
    converted_instances INTEGER NOT NULL,
    customers INTEGER NOT NULL,
    converted_customers INTEGER NOT NULL,
    first_started INTEGER NOT NULL,
    last_started INTEGER NOT NULL,
    PRIMARY KEY (journey, mode)
) WITHOUT ROWID;
CREATE TABLE review_rule_arm_counts (
    journey TEXT NOT NULL,
    rule_hash TEXT NOT NULL,
    mode TEXT NOT NULL,
    instances INTEGER NOT NULL,
    converted_instances INTEGER NOT NULL,
    customers INTEGER NOT NULL,
    converted_customers INTEGER NOT NULL,
    first_started INTEGER NOT NULL,
    last_started INTEGER NOT NULL,
    PRIMARY KEY (journey, rule_hash, mode)
) WITHOUT ROWID;
CREATE TABLE review_arm_customers (
    journey TEXT NOT NULL,
    mode TEXT NOT NULL,
    customer TEXT NOT NULL,
    instances INTEGER NOT NULL,
    converted INTEGER NOT NULL,
    PRIMARY KEY (journey, mode, customer)
) WITHOUT ROWID;
CREATE TABLE review_rule_arm_customers (
    journey TEXT NOT NULL,
    rule_hash TEXT NOT NULL,
    mode TEXT NOT NULL,
    customer TEXT NOT NULL,
    instances INTEGER NOT NULL,
    converted INTEGER NOT NULL,
    PRIMARY KEY (journey, rule_hash, mode, customer)
) WITHOUT ROWID;

CREATE TABLE review_outcome_folded (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO review_outcome_folded (id, seq) SELECT 1, coalesce(max(seq), 0) FROM dispatch_log;
INSERT INTO review_outcome_counts (journey, step, outcome, reason, records)
SELECT journey, step, outcome, reason, count(*) FROM dispatch_log
WHERE outcome NOT IN ('retrying', 'deferred')
GROUP BY journey, step, outcome, reason;
INSERT INTO review_arm_customers (journey, mode, customer, instances, converted)
SELECT journey, mode, customer, count(*), count(CASE WHEN status = 'converted' THEN 1 END)
FROM instances GROUP BY journey, mode, customer;
INSERT INTO review_rule_arm_customers (journey, rule_hash, mode, customer, instances, converted)
SELECT journey, rule_hash, mode, customer, count(*), count(CASE WHEN status = 'converted' THEN 1 END)
FROM instances GROUP BY journey, rule_hash, mode, customer;
INSERT INTO review_arm_counts (journey, mode, instances, converted_instances, customers,
    converted_customers, first_started, last_started)
SELECT journey, mode, count(*), count(CASE WHEN status = 'converted' THEN 1 END),
    count(DISTINCT customer), count(DISTINCT CASE WHEN status = 'converted' THEN customer END),
    min(started_at), max(started_at)
FROM instances GROUP BY journey, mode;
INSERT INTO review_rule_arm_counts (journey, rule_hash, mode, instances, converted_instances,
    customers, converted_customers, first_started, last_started)
SELECT journey, rule_hash, mode, count(*), count(CASE WHEN status = 'converted' THEN 1 END),
    count(DISTINCT customer), count(DISTINCT CASE WHEN status = 'converted' THEN customer END),
    min(started_at), max(started_at)
FROM instances GROUP BY journey, rule_hash, mode;

CREATE TRIGGER review_outcome_delete AFTER DELETE ON dispatch_log
WHEN OLD.outcome NOT IN ('retrying', 'deferred')
  AND OLD.seq <= (SELECT seq FROM review_outcome_folded WHERE id = 1)
BEGIN
    UPDATE review_outcome_counts SET records = records - 1
    WHERE journey = OLD.journey AND step = OLD.step AND outcome = OLD.outcome AND reason = OLD.reason;
    DELETE FROM review_outcome_counts
    WHERE journey = OLD.journey AND step = OLD.step AND outcome = OLD.outcome AND reason = OLD.reason
      AND records <= 0;
END;

CREATE TRIGGER review_arms_insert AFTER INSERT ON instances
BEGIN
    INSERT INTO review_arm_customers (journey, mode, customer, instances, converted)
    VALUES (NEW.journey, NEW.mode, NEW.customer, 1, NEW.status = 'converted')
    ON CONFLICT (journey, mode, customer) DO UPDATE
    SET instances = instances + 1, converted = converted + excluded.converted;
    INSERT INTO review_arm_counts (journey, mode, instances, converted_instances, customers,
        converted_customers, first_started, last_started)
    VALUES (NEW.journey, NEW.mode, 1, NEW.status = 'converted', 1, NEW.status = 'converted',
        NEW.started_at, NEW.started_at)
    ON CONFLICT (journey, mode) DO UPDATE SET
        instances = instances + 1,
        converted_instances = converted_instances + excluded.converted_instances,
        customers = customers + (SELECT c.instances = 1 FROM review_arm_customers c
            WHERE c.journey = NEW.journey AND c.mode = NEW.mode AND c.customer = NEW.customer),
        converted_customers = converted_customers + (NEW.status = 'converted' AND
            (SELECT c.converted = 1 FROM review_arm_customers c
             WHERE c.journey = NEW.journey AND c.mode = NEW.mode AND c.customer = NEW.customer)),
        first_started = min(first_started, excluded.first_started),
        last_started = max(last_started, excluded.last_started);
    INSERT INTO review_rule_arm_customers (journey, rule_hash, mode, customer, instances, converted)
    VALUES (NEW.journey, NEW.rule_hash, NEW.mode, NEW.customer, 1, NEW.status = 'converted')
    ON CONFLICT (journey, rule_hash, mode, customer) DO UPDATE
    SET instances = instances + 1, converted = converted + excluded.converted;
    INSERT INTO review_rule_arm_counts (journey, rule_hash, mode, instances, converted_instances,
        customers, converted_customers, first_started, last_started)
    VALUES (NEW.journey, NEW.rule_hash, NEW.mode, 1, NEW.status = 'converted', 1,
        NEW.status = 'converted', NEW.started_at, NEW.started_at)
    ON CONFLICT (journey, rule_hash, mode) DO UPDATE SET
        instances = instances + 1,
        converted_instances = converted_instances + excluded.converted_instances,
        customers = customers + (SELECT c.instances = 1 FROM review_rule_arm_customers c
            WHERE c.journey = NEW.journey AND c.rule_hash = NEW.rule_hash AND c.mode = NEW.mode
              AND c.customer = NEW.customer),
        converted_customers = converted_customers + (NEW.status = 'converted' AND
            (SELECT c.converted = 1 FROM review_rule_arm_customers c
             WHERE c.journey = NEW.journey AND c.rule_hash = NEW.rule_hash AND c.mode = NEW.mode
               AND c.customer = NEW.customer)),
        first_started = min(first_started, excluded.first_started),
        last_started = max(last_started, excluded.last_started);
END;


CREATE TRIGGER review_arms_delete AFTER DELETE ON instances
BEGIN
    UPDATE review_arm_customers
    SET instances = instances - 1, converted = converted - (OLD.status = 'converted')
    WHERE journey = OLD.journey AND mode = OLD.mode AND customer = OLD.customer;
    UPDATE review_arm_counts SET
        instances = instances - 1,
        converted_instances = converted_instances - (OLD.status = 'converted'),
        customers = customers - (SELECT c.instances = 0 FROM review_arm_customers c
            WHERE c.journey = OLD.journey AND c.mode = OLD.mode AND c.customer = OLD.customer),
        converted_customers = converted_customers - (OLD.status = 'converted' AND
            (SELECT c.converted = 0 FROM review_arm_customers c
             WHERE c.journey = OLD.journey AND c.mode = OLD.mode AND c.customer = OLD.customer)),
        first_started = CASE WHEN OLD.started_at > first_started THEN first_started
            ELSE coalesce((SELECT started_at FROM instances
                WHERE journey = OLD.journey AND mode = OLD.mode
                ORDER BY started_at LIMIT 1), first_started) END,
        last_started = CASE WHEN OLD.started_at < last_started THEN last_started
            ELSE coalesce((SELECT started_at FROM instances
                WHERE journey = OLD.journey AND mode = OLD.mode
                ORDER BY started_at DESC LIMIT 1), last_started) END
    WHERE journey = OLD.journey AND mode = OLD.mode;
    DELETE FROM review_arm_customers
    WHERE journey = OLD.journey AND mode = OLD.mode AND customer = OLD.customer AND instances <= 0;
    DELETE FROM review_arm_counts
    WHERE journey = OLD.journey AND mode = OLD.mode AND instances <= 0;
    UPDATE review_rule_arm_customers
    SET instances = instances - 1, converted = converted - (OLD.status = 'converted')
    WHERE journey = OLD.journey AND rule_hash = OLD.rule_hash AND mode = OLD.mode
      AND customer = OLD.customer;
    UPDATE review_rule_arm_counts SET
        instances = instances - 1,
        converted_instances = converted_instances - (OLD.status = 'converted'),
        customers = customers - (SELECT c.instances = 0 FROM review_rule_arm_customers c
            WHERE c.journey = OLD.journey AND c.rule_hash = OLD.rule_hash AND c.mode = OLD.mode
              AND c.customer = OLD.customer),
        converted_customers = converted_customers - (OLD.status = 'converted' AND
            (SELECT c.converted = 0 FROM review_rule_arm_customers c
             WHERE c.journey = OLD.journey AND c.rule_hash = OLD.rule_hash AND c.mode = OLD.mode
               AND c.customer = OLD.customer)),
        first_started = CASE WHEN OLD.started_at > first_started THEN first_started
            ELSE coalesce((SELECT started_at FROM instances
                WHERE journey = OLD.journey AND rule_hash = OLD.rule_hash AND mode = OLD.mode
                ORDER BY started_at LIMIT 1), first_started) END,
        last_started = CASE WHEN OLD.started_at < last_started THEN last_started
            ELSE coalesce((SELECT started_at FROM instances
                WHERE journey = OLD.journey AND rule_hash = OLD.rule_hash AND mode = OLD.mode
                ORDER BY started_at DESC LIMIT 1), last_started) END
    WHERE journey = OLD.journey AND rule_hash = OLD.rule_hash AND mode = OLD.mode;
    DELETE FROM review_rule_arm_customers
    WHERE journey = OLD.journey AND rule_hash = OLD.rule_hash AND mode = OLD.mode
      AND customer = OLD.customer AND instances <= 0;
    DELETE FROM review_rule_arm_counts
    WHERE journey = OLD.journey AND rule_hash = OLD.rule_hash AND mode = OLD.mode
      AND instances <= 0;
END;
";

/// An instance converted (`Tx::close_instance`, the only way into
/// `converted`; nothing leaves it but retention's delete): its arm's and
/// its script version's counts, for `?1` journey, `?2` mode, `?3`
/// customer, `?4` rule hash. A customer's first conversion in an arm makes
/// them a converted customer.
pub(super) const CONVERSION_COUNTS: [&str; 4] = [
    "UPDATE review_arm_customers SET converted = converted + 1
     WHERE journey = ?1 AND mode = ?2 AND customer = ?3 AND ?4 = ?4",
    "UPDATE review_arm_counts SET converted_instances = converted_instances + 1,
         converted_customers = converted_customers + (SELECT c.converted = 1
             FROM review_arm_customers c WHERE c.journey = ?1 AND c.mode = ?2 AND c.customer = ?3)
     WHERE journey = ?1 AND mode = ?2 AND ?4 = ?4",
    "UPDATE review_rule_arm_customers SET converted = converted + 1
     WHERE journey = ?1 AND rule_hash = ?4 AND mode = ?2 AND customer = ?3",
    "UPDATE review_rule_arm_counts SET converted_instances = converted_instances + 1,
         converted_customers = converted_customers + (SELECT c.converted = 1
             FROM review_rule_arm_customers c
             WHERE c.journey = ?1 AND c.rule_hash = ?4 AND c.mode = ?2 AND c.customer = ?3)
     WHERE journey = ?1 AND rule_hash = ?4 AND mode = ?2",
];

/// Version 11: the audit outbox row of a log record is written by the code
/// that writes the record (`insert_log`, `settle_steps`), in its
/// transaction, no longer by the `dispatch_log_audit` trigger: with the
/// trigger present, even with its condition false (the stream off), an
/// insert into the log cost three times as much (100 k inserts: 1.55 s of
/// CPU against 0.43 s), on the writer every send waits for.
const V11_AUDIT_OUTBOX_IN_CODE: &str = "DROP TRIGGER IF EXISTS dispatch_log_audit;";

/// Version 12: a customer's recent sends are read through the review's
/// `dispatch_log_customer (customer, time)`; `dispatch_log_sends`, the same
/// key limited to sends, was a second index entry written with every send
/// (the reads fetch each record's row for its journey and channel anyway, so
/// the outcome test there costs only the customer's few other records).
const V12_ONE_LOG_INDEX_BY_CUSTOMER: &str = "DROP INDEX IF EXISTS dispatch_log_sends;";

/// Version 13: a received event whose context update was refused (and
/// dead-lettered) keeps why, so the decision record shows it.
const V13_REFUSED_EVENTS: &str = "ALTER TABLE received_events ADD COLUMN refused TEXT;";

/// Version 14: an exit event that found no instance to end keeps which
/// journeys and keys it looked for, and from when (the attribution window),
/// so the decision record says why it converted nothing.
const V14_EXITS_THAT_ENDED_NOTHING: &str =
    "ALTER TABLE received_events ADD COLUMN ended_nothing TEXT;";

/// Version 15: the file was copied into PostgreSQL (`nudge migrate --from`)
/// and where to: a daemon must not run on it again, or it would send what
/// the replicas there send (`SqliteStore::open_exclusive` refuses it).
const V15_STORE_MOVED: &str = "
CREATE TABLE store_moved (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    target TEXT NOT NULL,
    at INTEGER NOT NULL
);
";
