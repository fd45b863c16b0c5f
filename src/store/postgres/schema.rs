//! The PostgreSQL schema as numbered migrations, embedded in the binary and
//! applied in order when the store opens (the SQLite store's design, with
//! the version in a `schema_version` table, one row per migration applied).
//! Replicas starting at once take turns on an advisory lock, so each
//! migration runs once; DDL is transactional, so a migration applies whole
//! or not at all. A database newer than this binary is refused, never
//! written to. A shipped migration is never edited: add the next one.

use postgres::error::SqlState;
use postgres::Client;

use crate::store::StoreError;

/// Migration `n` (1-based) takes a database from version `n - 1` to `n`.
const MIGRATIONS: &[&str] = &[
    V1_TABLES,
    V2_SEND_INTENTS,
    V3_DEAD_LETTER_HEADERS_AND_RETRIES,
    V4_REVIEW_INDEXES,
    V5_WITHDRAWN,
    V6_AUDIT_OUTBOX,
    V7_RUNTIME_CONTROL,
    V8_DISPATCH_INDEXES,
    V9_PROPENSITY_COUNTS,
    V10_DECISION_RECORD,
    V11_REVIEW_COUNTS,
    V12_REFUSED_EVENTS,
    V13_EXITS_THAT_ENDED_NOTHING,
];

/// The schema version this binary writes.
pub const VERSION: u32 = MIGRATIONS.len() as u32;

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    binary_version text NOT NULL
)";

/// Brings the schema (the first on `search_path`) to [`VERSION`]; returns
/// how many migrations ran.
pub fn migrate(client: &mut Client) -> Result<u32, StoreError> {
    let row = client.query_one(
        "SELECT current_schema(), current_setting('search_path')",
        &[],
    )?;
    if row.get::<_, Option<String>>(0).is_none() {
        let path: String = row.get(1);
        return Err(StoreError::Config(format!(
            "no schema to hold nudge's tables: none on search_path `{path}` exists or may be \
             used by this role; create it (CREATE SCHEMA nudge), grant its use (GRANT USAGE ON \
             SCHEMA nudge TO …) or name one in store.url, e.g. \
             postgres://nudge@db:5432/nudge?options=-csearch_path%3Dnudge"
        )));
    }
    // A current schema is only read: a runtime role granted no more than
    // its tables (no CREATE on the schema) starts, and replicas starting
    // together do not queue on the lock.
    let found = match version(client)? {
        current if current > VERSION => {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported: VERSION,
            })
        }
        VERSION => return Ok(0),
        older => older,
    };
    apply(client).map_err(|e| match &e {
        StoreError::Postgres(pg) if pg.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            StoreError::Config(format!(
                "the schema is version {found}, this binary's {VERSION}, and this role may not \
                 change it ({e}): run `nudge migrate --config FILE` as the schema's owner first"
            ))
        }
        _ => e,
    })
}

/// Refuses a role that lacks what the engine does with the schema's
/// tables and functions, naming each: granted at the first migration, a
/// grant forgotten for a table a later one added would otherwise surface
/// only as the review page or the admin API failing, with `/readyz` green.
pub fn check_privileges(client: &mut Client) -> Result<(), StoreError> {
    let missing: Vec<String> = client
        .query(
            "SELECT c.relname || ': ' || array_to_string(ARRAY(
                 SELECT p FROM unnest(CASE WHEN c.relname = 'schema_version' THEN ARRAY['SELECT']
                     ELSE ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'] END) p
                 WHERE NOT has_table_privilege(c.oid, p)), ', ')
             FROM pg_class c
             WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
             UNION ALL
             SELECT p.proname || '(): EXECUTE' FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
                 AND NOT has_function_privilege(p.oid, 'EXECUTE')
             ORDER BY 1",
            &[],
        )?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|m| !m.ends_with(": "))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(StoreError::Config(format!(
        "this role lacks privileges nudge uses in its schema: {}; grant them (README, \
         \"Several replicas on PostgreSQL\")",
        missing.join("; ")
    )))
}

/// Applies the migrations the schema lacks, one transaction each.
fn apply(client: &mut Client) -> Result<u32, StoreError> {
    let mut applied = 0;
    loop {
        let mut tx = client.transaction()?;
        // Per schema, so that tests (a schema each) do not wait on each other.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('nudge-migrate:' || current_schema()))",
            &[],
        )?;
        // `IF NOT EXISTS` would say NOTICE on every start.
        tx.batch_execute("SET LOCAL client_min_messages = warning")?;
        // A DBA's statement_timeout is for the engine's queries: a migration
        // cut short would fail at every start as the tables grow.
        tx.batch_execute("SET LOCAL statement_timeout = 0")?;
        tx.batch_execute(VERSION_TABLE)?;
        let current = read_version(&mut tx)?;
        if current > VERSION {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported: VERSION,
            });
        }
        if current == VERSION {
            tx.commit()?;
            return Ok(applied);
        }
        if applied == 0 {
            // Nothing else is said until it ends, and a large store takes minutes.
            tracing::info!(from = current, to = VERSION, "migrating the store's schema");
        }
        tx.batch_execute(MIGRATIONS[current as usize])?;
        tx.execute(
            "INSERT INTO schema_version (version, binary_version) VALUES ($1, $2)",
            &[&(current as i32 + 1), &env!("CARGO_PKG_VERSION")],
        )?;
        tx.commit()?;
        applied += 1;
    }
}

/// The schema's version (0 when nudge never wrote to it).
pub fn version(client: &mut Client) -> Result<u32, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?
        .get(0);
    match exists {
        true => read_version(client),
        false => Ok(0),
    }
}

fn read_version(client: &mut impl postgres::GenericClient) -> Result<u32, StoreError> {
    let v: i32 = client
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?
        .get(0);
    Ok(v as u32)
}

/// Version 1. Times are `timestamptz`, documents `jsonb`, statuses text
/// with CHECK constraints (a new status is a constraint swapped in a
/// migration, where an enum value could not be used in the transaction that
/// adds it).
pub(super) const V1_TABLES: &str = r#"
CREATE TABLE customers (
    id text PRIMARY KEY,
    context jsonb NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE instances (
    id text PRIMARY KEY,
    customer text NOT NULL,
    journey text NOT NULL,
    key text NOT NULL,
    status text NOT NULL CHECK (status IN ('open', 'completed', 'converted', 'cancelled')),
    mode text NOT NULL CHECK (mode IN ('live', 'held_out', 'shadow')),
    category text NOT NULL CHECK (category IN ('service', 'marketing')),
    started_at timestamptz NOT NULL,
    ended_at timestamptz,
    rule_hash text NOT NULL,
    trigger_event text NOT NULL,
    vars jsonb NOT NULL,
    decision_inputs jsonb NOT NULL
);
CREATE UNIQUE INDEX instances_one_open ON instances (customer, journey, key) WHERE status = 'open';
CREATE INDEX instances_by_customer ON instances (customer, started_at);
-- Retention finds ended journeys without walking the table.
CREATE INDEX instances_ended ON instances (ended_at) WHERE status <> 'open';
CREATE TABLE steps (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id text NOT NULL,
    -- The instance's customer, here so that a claim can keep each
    -- customer's steps on one replica at a time without a join.
    customer text NOT NULL,
    step text NOT NULL,
    seq integer NOT NULL,
    channel text NOT NULL CHECK (channel IN ('push', 'email', 'call_task')),
    template text NOT NULL,
    condition text,
    planned_at timestamptz NOT NULL,
    due_at timestamptz NOT NULL,
    -- pending, claimed, or what settled it: an outcome, or cancelled.
    status text NOT NULL CHECK (status IN ('pending', 'claimed', 'sent', 'failed', 'retrying',
        'suppressed', 'deferred', 'cancelled', 'expired', 'held_out', 'shadow', 'converted')),
    attempt integer NOT NULL DEFAULT 0,
    lease_until timestamptz,
    -- The replica holding the claim.
    holder text,
    UNIQUE (instance_id, step)
);
CREATE INDEX steps_pending ON steps (channel, due_at) WHERE status = 'pending';
CREATE INDEX steps_claimed ON steps (channel, lease_until) WHERE status = 'claimed';
-- A customer's lease ends when none of its steps is claimed any more.
CREATE INDEX steps_claimed_by_customer ON steps (customer) WHERE status = 'claimed';
-- Which replica may send to a customer now: the one holding a live lease
-- here. Caps and arbitration read the customer's recent sends when its
-- steps are claimed; only one replica at a time may act on what it read.
CREATE TABLE customer_claims (
    customer text PRIMARY KEY,
    holder text NOT NULL,
    lease_until timestamptz NOT NULL
);
CREATE TABLE dispatch_log (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time timestamptz NOT NULL,
    customer text NOT NULL,
    journey text NOT NULL,
    instance text NOT NULL,
    step text NOT NULL,
    channel text NOT NULL,
    template text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('sent', 'failed', 'retrying', 'suppressed',
        'deferred', 'cancelled', 'expired', 'held_out', 'shadow', 'converted')),
    reason text NOT NULL,
    rule_hash text NOT NULL,
    attempt integer NOT NULL,
    latency_ms bigint,
    event_id text
);
CREATE INDEX dispatch_log_sends ON dispatch_log (customer, time) WHERE outcome = 'sent';
CREATE INDEX dispatch_log_instance ON dispatch_log (instance) WHERE outcome = 'sent';
CREATE TABLE processed_events (
    id text PRIMARY KEY,
    at timestamptz NOT NULL
);
CREATE INDEX processed_events_at ON processed_events (at);
CREATE TABLE kafka_offsets (
    topic text NOT NULL,
    partition integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE dead_letters (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic text NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    key bytea,
    payload bytea NOT NULL,
    reason text NOT NULL,
    journey text,
    event_id text,
    created_at timestamptz NOT NULL,
    published_at timestamptz,
    -- Held by the replica publishing it until then (claim_dead_letters).
    claimed_until timestamptz
);
CREATE INDEX dead_letters_unpublished ON dead_letters (id) WHERE published_at IS NULL;
CREATE INDEX dead_letters_published ON dead_letters (published_at) WHERE published_at IS NOT NULL;
CREATE TABLE rule_versions (
    version text PRIMARY KEY,
    loaded_at timestamptz NOT NULL,
    files jsonb NOT NULL
);
"#;

/// Version 2: when a claimed step's send began, until its result is
/// recorded. A step still marked after its replica died may have been
/// delivered: the frequency cap counts it (see `Store::mark_sending`).
const V2_SEND_INTENTS: &str = "ALTER TABLE steps ADD COLUMN sending_at timestamptz;
CREATE INDEX steps_sending ON steps (customer) WHERE sending_at IS NOT NULL;";

/// Version 3: a dead letter keeps the original record's headers (`[name,
/// value]` pairs, see `store::dead_letters`), and its publish attempts: how
/// many failed, the last error, when to try again, and when it was given up
/// (kept, never claimed again).
const V3_DEAD_LETTER_HEADERS_AND_RETRIES: &str = "
ALTER TABLE dead_letters
    ADD COLUMN headers jsonb,
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error text,
    ADD COLUMN retry_at timestamptz,
    ADD COLUMN failed_at timestamptz;
CREATE INDEX dead_letters_failed ON dead_letters (id) WHERE failed_at IS NOT NULL AND published_at IS NULL;
";

/// Version 4: the review's reads (`store::review`). The dispatch log in the
/// review's order (time, seq) overall and after each filter a reviewer sets
/// most, so that a page of the log is a seek and a short walk at any depth
/// (keyset paging); instances by journey for funnels and a journey's plan.
/// In the migration's transaction (not CONCURRENTLY): writes to the log
/// wait while a large one is indexed.
const V4_REVIEW_INDEXES: &str = "
CREATE INDEX dispatch_log_time ON dispatch_log (time, seq);
CREATE INDEX dispatch_log_journey ON dispatch_log (journey, time, seq);
CREATE INDEX dispatch_log_customer ON dispatch_log (customer, time, seq);
CREATE INDEX dispatch_log_outcome ON dispatch_log (outcome, time, seq);
CREATE INDEX instances_by_journey ON instances (journey, started_at);
";

/// Version 5: a delivered step taken back on its channel after an exit
/// (`channels.<kind>.withdraw`) settles as `withdrawn`.
const V5_WITHDRAWN: &str = "
ALTER TABLE steps DROP CONSTRAINT steps_status_check;
ALTER TABLE steps ADD CONSTRAINT steps_status_check CHECK (status IN ('pending', 'claimed', 'sent',
    'failed', 'retrying', 'suppressed', 'deferred', 'cancelled', 'expired', 'held_out', 'shadow',
    'converted', 'withdrawn'));
ALTER TABLE dispatch_log DROP CONSTRAINT dispatch_log_outcome_check;
ALTER TABLE dispatch_log ADD CONSTRAINT dispatch_log_outcome_check CHECK (outcome IN ('sent',
    'failed', 'retrying', 'suppressed', 'deferred', 'cancelled', 'expired', 'held_out', 'shadow',
    'converted', 'withdrawn'));
";

/// Version 6 (audit stream): the outbox of dispatch-log records to publish
/// to `audit.topic`, filled by a statement trigger in the transaction that
/// writes the records (one insert per statement, however many rows a batch
/// writes) while `audit_stream.enabled` is set (the daemon sets it from its
/// config at start); the publisher deletes a row once the broker
/// acknowledged it. `holder`/`lease_until`: one replica publishes at a
/// time, so per-customer order holds.
const V6_AUDIT_OUTBOX: &str = "
CREATE TABLE audit_outbox (
    seq bigint PRIMARY KEY,
    customer text NOT NULL
);
CREATE TABLE audit_stream (
    id integer PRIMARY KEY CHECK (id = 1),
    enabled boolean NOT NULL,
    holder text,
    lease_until timestamptz
);
INSERT INTO audit_stream (id, enabled) VALUES (1, false);
CREATE FUNCTION dispatch_log_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT enabled FROM audit_stream WHERE id = 1) THEN
        INSERT INTO audit_outbox (seq, customer) SELECT seq, customer FROM new_rows;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER dispatch_log_audit AFTER INSERT ON dispatch_log
REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION dispatch_log_audit();
";

/// Version 7: runtime control (`store::control`): the overrides in force,
/// one row per journey or channel, and the control log of every change
/// (kept for good: retention does not purge it).
const V7_RUNTIME_CONTROL: &str = "
CREATE TABLE control_overrides (
    kind text NOT NULL,
    target text NOT NULL,
    settings jsonb NOT NULL,
    updated_at timestamptz NOT NULL,
    updated_by text NOT NULL,
    PRIMARY KEY (kind, target)
);
CREATE TABLE control_log (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time timestamptz NOT NULL,
    who text NOT NULL,
    kind text NOT NULL,
    target text NOT NULL,
    before jsonb NOT NULL,
    after jsonb NOT NULL
);
CREATE INDEX control_log_time ON control_log (time);
";

/// Fewer index writes a dispatched step. A step's claim, send mark and
/// settle each rewrite its row; a row version that changes no indexed
/// column (nor one in an index's predicate) and fits on its page is written
/// in place (a HOT update) and touches no index. So:
/// - a customer's unsettled steps (pending or claimed) are found through
///   one index, which serves the possibly-sent read (those with
///   `sending_at`) and arbitration's look-ahead; `sending_at` is in no
///   index any more, so marking a send writes no index entry (it wrote five);
/// - the claimed steps are found by customer only (`steps_claimed_by_customer`):
///   the look for expired claims walks that small index whole, and with
///   one claimed-steps index the planner cannot take the wrong one (a walk
///   of all claims per customer released);
/// - steps' pages keep room for in-place versions (`fillfactor`);
/// - a customer's recent sends are read through `dispatch_log_customer`,
///   which leads with the same columns as `dispatch_log_sends`: one index
///   less to write for every log record.
const V8_DISPATCH_INDEXES: &str = "
CREATE INDEX steps_unsettled_by_customer ON steps (customer) WHERE status IN ('pending', 'claimed');
DROP INDEX steps_sending;
DROP INDEX steps_claimed;
ALTER TABLE steps SET (fillfactor = 70);
DROP INDEX dispatch_log_sends;
";

/// Version 9 (issue 13, item 2): sends and conversions per journey, step and channel
/// (`crate::propensity`), kept for good (retention does not purge them).
/// Filled from the dispatch log that retention left: every send, and as
/// conversions the sends of instances that converted within 30 days (the
/// default `policy.attribution_window`) after them.
const V9_PROPENSITY_COUNTS: &str = "
CREATE TABLE propensity_counts (
    journey text NOT NULL,
    step text NOT NULL,
    channel text NOT NULL,
    sends bigint NOT NULL DEFAULT 0,
    conversions bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (journey, step, channel)
);
INSERT INTO propensity_counts (journey, step, channel, sends, conversions)
SELECT d.journey, d.step, d.channel, count(*),
       count(*) FILTER (WHERE i.status = 'converted' AND d.time <= i.ended_at
                          AND d.time >= i.ended_at - interval '30 days')
FROM dispatch_log d LEFT JOIN instances i ON i.id = d.instance
WHERE d.outcome = 'sent'
GROUP BY d.journey, d.step, d.channel;
";

/// Version 10 (the decision record, `store::received`): every event the
/// decide stage processed, per customer, with the journeys it triggered that
/// did not start and why; and each dispatch attempt's HTTP status and
/// response time on its log record. Received events are purged oldest
/// first by `id` (written in time order), so no index on their time.
const V10_DECISION_RECORD: &str = "
CREATE TABLE received_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer text NOT NULL,
    event_id text NOT NULL,
    event_type text NOT NULL,
    event_time timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    context_updated boolean NOT NULL,
    not_started jsonb NOT NULL
);
CREATE INDEX received_events_customer ON received_events (customer, received_at);
ALTER TABLE dispatch_log ADD COLUMN http_status integer;
ALTER TABLE dispatch_log ADD COLUMN response_ms bigint;
";

/// Version 11 (issue 14): the counts behind the funnel (the SQLite store's
/// v10 tables: `review_outcome_counts`, `review_arm_counts`,
/// `review_rule_arm_counts`, and per (arm, customer) rows for the distinct
/// customers), so that `ReviewRead::arms` and `outcome_counts` read a few
/// rows instead of grouping the whole log and every instance.
///
/// Not kept in the writers' transactions: several replicas write at once,
/// and a journey's count row updated by each would be locked until each
/// commits, serialising them. Instead statement triggers (transition
/// tables, as the audit outbox's) append what a statement changed,
/// aggregated, to insert-only delta tables (`review_outcome_deltas`,
/// `review_instance_deltas`: no row is ever updated there, so writers never
/// wait on each other), and `review_fold()` folds the deltas into the
/// counts in one transaction under an advisory lock (one fold at a time).
/// Its `DELETE ... RETURNING` takes the deltas committed when it starts;
/// those committed later stay for the next fold. The review folds before it
/// reads the counts, and retention folds after it purges, so deltas do not
/// pile up between reviews for longer than a purge interval.
///
/// An instance's customer, journey, mode, rule hash and start never change;
/// its status does (a conversion is a +1/-1 delta). Where instances were
/// deleted the fold reads the arm's first and last start again from
/// `instances_by_journey`. Filled from the rows there are.
const V11_REVIEW_COUNTS: &str = r#"
CREATE TABLE review_outcome_counts (
    journey text NOT NULL,
    step text NOT NULL,
    outcome text NOT NULL,
    reason text NOT NULL,
    records bigint NOT NULL,
    PRIMARY KEY (journey, step, outcome, reason)
);
CREATE TABLE review_arm_counts (
    journey text NOT NULL,
    mode text NOT NULL,
    instances bigint NOT NULL,
    converted_instances bigint NOT NULL,
    customers bigint NOT NULL,
    converted_customers bigint NOT NULL,
    first_started timestamptz NOT NULL,
    last_started timestamptz NOT NULL,
    PRIMARY KEY (journey, mode)
);
CREATE TABLE review_rule_arm_counts (
    journey text NOT NULL,
    rule_hash text NOT NULL,
    mode text NOT NULL,
    instances bigint NOT NULL,
    converted_instances bigint NOT NULL,
    customers bigint NOT NULL,
    converted_customers bigint NOT NULL,
    first_started timestamptz NOT NULL,
    last_started timestamptz NOT NULL,
    PRIMARY KEY (journey, rule_hash, mode)
);
CREATE TABLE review_arm_customers (
    journey text NOT NULL,
    mode text NOT NULL,
    customer text NOT NULL,
    instances bigint NOT NULL,
    converted bigint NOT NULL,
    PRIMARY KEY (journey, mode, customer)
);
CREATE TABLE review_rule_arm_customers (
    journey text NOT NULL,
    rule_hash text NOT NULL,
    mode text NOT NULL,
    customer text NOT NULL,
    instances bigint NOT NULL,
    converted bigint NOT NULL,
    PRIMARY KEY (journey, rule_hash, mode, customer)
);
CREATE INDEX review_arm_customers_gone ON review_arm_customers (journey) WHERE instances <= 0;
CREATE INDEX review_rule_arm_customers_gone ON review_rule_arm_customers (journey) WHERE instances <= 0;
CREATE TABLE review_outcome_deltas (
    journey text NOT NULL,
    step text NOT NULL,
    outcome text NOT NULL,
    reason text NOT NULL,
    records bigint NOT NULL
);
CREATE TABLE review_instance_deltas (
    journey text NOT NULL,
    rule_hash text NOT NULL,
    mode text NOT NULL,
    customer text NOT NULL,
    instances bigint NOT NULL,
    converted bigint NOT NULL,
    first_started timestamptz,
    last_started timestamptz,
    deleted boolean NOT NULL
);
CREATE TABLE review_fold_batch (
    journey text NOT NULL,
    rule_hash text NOT NULL,
    mode text NOT NULL,
    customer text NOT NULL,
    instances bigint NOT NULL,
    converted bigint NOT NULL,
    first_started timestamptz,
    last_started timestamptz,
    deleted boolean NOT NULL
);

INSERT INTO review_outcome_counts (journey, step, outcome, reason, records)
SELECT journey, step, outcome, reason, count(*) FROM dispatch_log
WHERE outcome NOT IN ('retrying', 'deferred')
GROUP BY journey, step, outcome, reason;
INSERT INTO review_arm_customers (journey, mode, customer, instances, converted)
SELECT journey, mode, customer, count(*), count(*) FILTER (WHERE status = 'converted')
FROM instances GROUP BY journey, mode, customer;
INSERT INTO review_rule_arm_customers (journey, rule_hash, mode, customer, instances, converted)
SELECT journey, rule_hash, mode, customer, count(*), count(*) FILTER (WHERE status = 'converted')
FROM instances GROUP BY journey, rule_hash, mode, customer;
INSERT INTO review_arm_counts (journey, mode, instances, converted_instances, customers,
    converted_customers, first_started, last_started)
SELECT journey, mode, count(*), count(*) FILTER (WHERE status = 'converted'),
    count(DISTINCT customer), count(DISTINCT customer) FILTER (WHERE status = 'converted'),
    min(started_at), max(started_at)
FROM instances GROUP BY journey, mode;
INSERT INTO review_rule_arm_counts (journey, rule_hash, mode, instances, converted_instances,
    customers, converted_customers, first_started, last_started)
SELECT journey, rule_hash, mode, count(*), count(*) FILTER (WHERE status = 'converted'),
    count(DISTINCT customer), count(DISTINCT customer) FILTER (WHERE status = 'converted'),
    min(started_at), max(started_at)
FROM instances GROUP BY journey, rule_hash, mode;

CREATE FUNCTION review_log_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO review_outcome_deltas (journey, step, outcome, reason, records)
    SELECT journey, step, outcome, reason, count(*) FROM new_rows
    WHERE outcome NOT IN ('retrying', 'deferred')
    GROUP BY journey, step, outcome, reason;
    RETURN NULL;
END
$$;
CREATE TRIGGER review_log_inserted AFTER INSERT ON dispatch_log
REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION review_log_inserted();
CREATE FUNCTION review_log_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO review_outcome_deltas (journey, step, outcome, reason, records)
    SELECT journey, step, outcome, reason, -count(*) FROM old_rows
    WHERE outcome NOT IN ('retrying', 'deferred')
    GROUP BY journey, step, outcome, reason;
    RETURN NULL;
END
$$;
CREATE TRIGGER review_log_deleted AFTER DELETE ON dispatch_log
REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION review_log_deleted();

CREATE FUNCTION review_instances_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO review_instance_deltas (journey, rule_hash, mode, customer, instances, converted,
        first_started, last_started, deleted)
    SELECT journey, rule_hash, mode, customer, count(*), count(*) FILTER (WHERE status = 'converted'),
        min(started_at), max(started_at), false
    FROM new_rows GROUP BY journey, rule_hash, mode, customer;
    RETURN NULL;
END
$$;
CREATE TRIGGER review_instances_inserted AFTER INSERT ON instances
REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION review_instances_inserted();
CREATE FUNCTION review_instances_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO review_instance_deltas (journey, rule_hash, mode, customer, instances, converted,
        first_started, last_started, deleted)
    SELECT n.journey, n.rule_hash, n.mode, n.customer, 0,
        sum((n.status = 'converted')::int - (o.status = 'converted')::int), NULL, NULL, false
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE (n.status = 'converted') <> (o.status = 'converted')
    GROUP BY n.journey, n.rule_hash, n.mode, n.customer;
    RETURN NULL;
END
$$;
CREATE TRIGGER review_instances_updated AFTER UPDATE ON instances
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION review_instances_updated();
CREATE FUNCTION review_instances_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO review_instance_deltas (journey, rule_hash, mode, customer, instances, converted,
        first_started, last_started, deleted)
    SELECT journey, rule_hash, mode, customer, -count(*), -count(*) FILTER (WHERE status = 'converted'),
        NULL, NULL, true
    FROM old_rows GROUP BY journey, rule_hash, mode, customer;
    RETURN NULL;
END
$$;
CREATE TRIGGER review_instances_deleted AFTER DELETE ON instances
REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION review_instances_deleted();

CREATE FUNCTION review_fold() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('nudge-review-fold:' || current_schema()));
    WITH gone AS (DELETE FROM review_outcome_deltas RETURNING *),
    d AS (SELECT journey, step, outcome, reason, sum(records)::bigint AS records FROM gone
          GROUP BY journey, step, outcome, reason)
    INSERT INTO review_outcome_counts AS c (journey, step, outcome, reason, records)
    SELECT journey, step, outcome, reason, records FROM d WHERE records <> 0
    ON CONFLICT (journey, step, outcome, reason) DO UPDATE SET records = c.records + excluded.records;
    DELETE FROM review_outcome_counts WHERE records <= 0;

    WITH gone AS (DELETE FROM review_instance_deltas RETURNING *)
    INSERT INTO review_fold_batch
    SELECT journey, rule_hash, mode, customer, sum(instances), sum(converted),
        min(first_started), max(last_started), bool_or(deleted)
    FROM gone GROUP BY journey, rule_hash, mode, customer;

    -- Per journey: old per-customer counts (the snapshot) plus the deltas.
    WITH d AS (
        SELECT journey, mode, customer, sum(instances) AS di, sum(converted) AS dc,
            min(first_started) AS f, max(last_started) AS l
        FROM review_fold_batch GROUP BY journey, mode, customer),
    j AS (
        SELECT d.*, coalesce(h.instances, 0) AS oi, coalesce(h.converted, 0) AS oc
        FROM d LEFT JOIN review_arm_customers h USING (journey, mode, customer)),
    up AS (
        INSERT INTO review_arm_customers AS h (journey, mode, customer, instances, converted)
        SELECT journey, mode, customer, oi + di, oc + dc FROM j
        ON CONFLICT (journey, mode, customer) DO UPDATE
        SET instances = excluded.instances, converted = excluded.converted),
    a AS (
        SELECT journey, mode, sum(di)::bigint AS di, sum(dc)::bigint AS dc,
            sum(((oi + di) > 0)::int - (oi > 0)::int)::bigint AS dcu,
            sum(((oc + dc) > 0)::int - (oc > 0)::int)::bigint AS dcc,
            min(f) AS f, max(l) AS l
        FROM j GROUP BY journey, mode)
    INSERT INTO review_arm_counts AS c (journey, mode, instances, converted_instances, customers,
        converted_customers, first_started, last_started)
    SELECT journey, mode, di, dc, dcu, dcc, coalesce(f, '-infinity'), coalesce(l, 'infinity') FROM a
    ON CONFLICT (journey, mode) DO UPDATE SET
        instances = c.instances + excluded.instances,
        converted_instances = c.converted_instances + excluded.converted_instances,
        customers = c.customers + excluded.customers,
        converted_customers = c.converted_customers + excluded.converted_customers,
        first_started = least(c.first_started, nullif(excluded.first_started, '-infinity')),
        last_started = greatest(c.last_started, nullif(excluded.last_started, 'infinity'));

    WITH d AS (
        SELECT journey, rule_hash, mode, customer, instances AS di, converted AS dc,
            first_started AS f, last_started AS l
        FROM review_fold_batch),
    j AS (
        SELECT d.*, coalesce(h.instances, 0) AS oi, coalesce(h.converted, 0) AS oc
        FROM d LEFT JOIN review_rule_arm_customers h USING (journey, rule_hash, mode, customer)),
    up AS (
        INSERT INTO review_rule_arm_customers AS h (journey, rule_hash, mode, customer, instances, converted)
        SELECT journey, rule_hash, mode, customer, oi + di, oc + dc FROM j
        ON CONFLICT (journey, rule_hash, mode, customer) DO UPDATE
        SET instances = excluded.instances, converted = excluded.converted),
    a AS (
        SELECT journey, rule_hash, mode, sum(di)::bigint AS di, sum(dc)::bigint AS dc,
            sum(((oi + di) > 0)::int - (oi > 0)::int)::bigint AS dcu,
            sum(((oc + dc) > 0)::int - (oc > 0)::int)::bigint AS dcc,
            min(f) AS f, max(l) AS l
        FROM j GROUP BY journey, rule_hash, mode)
    INSERT INTO review_rule_arm_counts AS c (journey, rule_hash, mode, instances,
        converted_instances, customers, converted_customers, first_started, last_started)
    SELECT journey, rule_hash, mode, di, dc, dcu, dcc, coalesce(f, '-infinity'),
        coalesce(l, 'infinity') FROM a
    ON CONFLICT (journey, rule_hash, mode) DO UPDATE SET
        instances = c.instances + excluded.instances,
        converted_instances = c.converted_instances + excluded.converted_instances,
        customers = c.customers + excluded.customers,
        converted_customers = c.converted_customers + excluded.converted_customers,
        first_started = least(c.first_started, nullif(excluded.first_started, '-infinity')),
        last_started = greatest(c.last_started, nullif(excluded.last_started, 'infinity'));

    -- Where instances were deleted, the first and last start are read again.
    UPDATE review_arm_counts c SET
        first_started = coalesce((SELECT min(started_at) FROM instances i
            WHERE i.journey = c.journey AND i.mode = c.mode), c.first_started),
        last_started = coalesce((SELECT max(started_at) FROM instances i
            WHERE i.journey = c.journey AND i.mode = c.mode), c.last_started)
    WHERE (journey, mode) IN (SELECT journey, mode FROM review_fold_batch WHERE deleted);
    UPDATE review_rule_arm_counts c SET
        first_started = coalesce((SELECT min(started_at) FROM instances i
            WHERE i.journey = c.journey AND i.rule_hash = c.rule_hash AND i.mode = c.mode),
            c.first_started),
        last_started = coalesce((SELECT max(started_at) FROM instances i
            WHERE i.journey = c.journey AND i.rule_hash = c.rule_hash AND i.mode = c.mode),
            c.last_started)
    WHERE (journey, rule_hash, mode) IN
        (SELECT journey, rule_hash, mode FROM review_fold_batch WHERE deleted);
    DELETE FROM review_arm_customers WHERE instances <= 0;
    DELETE FROM review_rule_arm_customers WHERE instances <= 0;
    DELETE FROM review_arm_counts WHERE instances <= 0;
    DELETE FROM review_rule_arm_counts WHERE instances <= 0;
    DELETE FROM review_fold_batch;
END
$$;
"#;

/// Version 12: a received event whose context update was refused (and
/// dead-lettered) keeps why, so the decision record shows it.
const V12_REFUSED_EVENTS: &str = "ALTER TABLE received_events ADD COLUMN refused text;";

/// Version 13: an exit event that found no instance to end keeps which
/// journeys and keys it looked for, and from when (the attribution window),
/// so the decision record says why it converted nothing.
const V13_EXITS_THAT_ENDED_NOTHING: &str =
    "ALTER TABLE received_events ADD COLUMN ended_nothing jsonb;";
