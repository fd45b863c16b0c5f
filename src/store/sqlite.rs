//! The embedded store: one SQLite file in WAL mode. One process owns the file
//! (single node); several replicas need the PostgreSQL store.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::{
    ClosedStep, DeadLetter, DueStep, Mode, NewInstance, NewStep, OpenInstance, StepResult, Store,
    StoreError, Tx,
};
use crate::audit::{LogRecord, Outcome};
use crate::context::{CustomerContext, JourneySummary};
use crate::dispatch::{ChannelKind, HistoryEntry, Variables};

const SCHEMA: &str = r#"
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

// Statements of the dispatch path. A batch's keys are bound as one
// `rarray(?)` parameter: each key still costs an index seek, but the batch
// costs one statement rather than one per step (measured: 15 k instructions
// a step less).

/// The instances of claimed steps (`?1`: their ids), one row per id in order
/// (LEFT JOIN: a missing instance shows as NULL instead of shifting the rows).
const CLAIMED_INSTANCES: &str =
    "SELECT i.customer, i.journey, i.mode, i.category, i.rule_hash, i.vars, i.status
     FROM rarray(?1) AS a LEFT JOIN instances AS i ON i.id = a.value";

/// Customers' stored contexts (`?1`: ids), one row per id in order, NULL when none.
const CUSTOMER_CONTEXTS: &str =
    "SELECT c.context FROM rarray(?1) AS a LEFT JOIN customers AS c ON c.id = a.value";

/// Sends to the customers `?1` since `?2`.
const RECENT_SENDS: &str =
    "SELECT a.value, d.time FROM rarray(?1) AS a CROSS JOIN dispatch_log AS d
     ON d.customer = a.value AND d.outcome = 'sent' AND d.time >= ?2";

/// Sent steps of the instances `?1`.
const HISTORIES: &str = "SELECT a.value, d.seq, d.step, d.channel, d.template, d.time
     FROM rarray(?1) AS a CROSS JOIN dispatch_log AS d
     ON d.instance = a.value AND d.outcome = 'sent'";

/// Completes the instance `?1` at `?2` when the step just settled was its last.
const COMPLETE_INSTANCE: &str = "UPDATE instances SET status = 'completed', ended_at = ?2
     WHERE id = ?1 AND status = 'open'
       AND NOT EXISTS (SELECT 1 FROM steps WHERE instance_id = ?1 AND status IN ('pending', 'claimed'))";

/// Rows deleted per purge transaction: the write lock is released between
/// chunks, so ingest and sending wait milliseconds, not the whole purge.
const PURGE_CHUNK: usize = 2_000;

/// The last instance id of the next purge chunk (`?1` exclusive start).
const PURGE_INSTANCES_CHUNK_END: &str =
    "SELECT id FROM instances WHERE id > ?1 ORDER BY id LIMIT 1 OFFSET ?2";
/// Ended, old instances with ids in (`?1`, `?2`]: their steps, then them.
const PURGE_INSTANCES: (&str, &str) = (
    "DELETE FROM steps WHERE instance_id IN (SELECT id FROM instances WHERE id > ?1 AND id <= ?2 AND status <> 'open' AND ended_at < ?3)",
    "DELETE FROM instances WHERE id > ?1 AND id <= ?2 AND status <> 'open' AND ended_at < ?3",
);
/// The same for every id after `?1` (`?2` unused): the last, partial chunk.
const PURGE_INSTANCES_TAIL: (&str, &str) = (
    "DELETE FROM steps WHERE instance_id IN (SELECT id FROM instances WHERE id > ?1 AND ?2 = ?2 AND status <> 'open' AND ended_at < ?3)",
    "DELETE FROM instances WHERE id > ?1 AND ?2 = ?2 AND status <> 'open' AND ended_at < ?3",
);

/// Purges of the append-only tables, a chunk at a time. The dispatch log is
/// written in time order, so its oldest rows come first by `seq` (no index
/// on `time` to maintain for every send); a chunk that reaches a row newer
/// than the cutoff ends the purge.
const PURGE_BY_AGE: [&str; 3] = [
    "DELETE FROM dispatch_log WHERE seq IN (SELECT seq FROM dispatch_log ORDER BY seq LIMIT ?2) AND time < ?1",
    "DELETE FROM processed_events WHERE id IN (SELECT id FROM processed_events WHERE at < ?1 LIMIT ?2)",
    "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE published_at < ?1 LIMIT ?2)",
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// A second connection for the dispatch path's batch reads, so that they
    /// run beside the writer's transactions (WAL: readers never wait for
    /// it) instead of queueing behind them on one thread: the store's
    /// single thread of writes is the critical path of sending.
    reader: Mutex<Connection>,
}

/// Page cache when none is configured (`store.cache_mb`'s default): SQLite's
/// own. A 64 MiB cache halved the scheduler's rate (pages re-read at every
/// transaction; see BENCHMARKS.md), so larger caches are for bulk loads.
pub const DEFAULT_CACHE_MB: u32 = 2;

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_MB)
    }

    pub fn open_with_cache(path: &Path, cache_mb: u32) -> Result<Self, StoreError> {
        // Switching a new file to WAL does not go through the busy handler, so
        // a second process opening the same new file at once retries here.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Self::try_open(path, cache_mb) {
                Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path, cache_mb: u32) -> Result<Self, StoreError> {
        let conn = Self::connect(path, cache_mb)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a commit survives a process crash; only an OS
        // crash or power loss may lose the last transactions.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        let reader = Self::connect(path, cache_mb)?;
        Ok(Self {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
        })
    }

    fn connect(path: &Path, cache_mb: u32) -> Result<Connection, StoreError> {
        let conn = Connection::open(path)?;
        // Negative: KiB rather than pages.
        conn.pragma_update(None, "cache_size", -(i64::from(cache_mb) * 1024))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // For `rarray(?)` in the batch statements.
        rusqlite::vtab::array::load_module(&conn)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For reads that need not be in a write transaction; they see every
    /// transaction committed before they start.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

fn load_customer(
    conn: &Connection,
    id: &str,
    window_start: DateTime<Utc>,
) -> Result<CustomerContext, StoreError> {
    load_customer_parts(conn, id, Some(window_start), true)
}

/// The customer's context; journeys and recent sends only when asked for.
fn load_customer_parts(
    conn: &Connection,
    id: &str,
    sends_since: Option<DateTime<Utc>>,
    journeys: bool,
) -> Result<CustomerContext, StoreError> {
    let context: Option<String> = conn
        .prepare_cached("SELECT context FROM customers WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let mut customer = match context {
        Some(text) => {
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?
        }
        None => CustomerContext::new(id),
    };
    customer.id = id.to_string();
    if journeys {
        customer.journeys = load_journeys(conn, id)?;
    }
    if let Some(window_start) = sends_since {
        let mut stmt = conn.prepare_cached(
            "SELECT time FROM dispatch_log WHERE customer = ?1 AND outcome = 'sent' AND time >= ?2 ORDER BY time DESC",
        )?;
        customer.recent_sends = stmt
            .query_map(params![id, ms(window_start)], |r| Ok(from_ms(r.get(0)?)))?
            .collect::<Result<_, _>>()?;
    }
    Ok(customer)
}

/// The customer's latest journeys, newest first.
fn load_journeys(conn: &Connection, id: &str) -> Result<Vec<JourneySummary>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT journey, key, status, started_at, ended_at, mode FROM instances WHERE customer = ?1 ORDER BY started_at DESC LIMIT 100",
    )?;
    let rows = stmt
        .query_map([id], |r| {
            Ok(JourneySummary {
                journey: r.get(0)?,
                key: r.get(1)?,
                status: r.get(2)?,
                started_at: from_ms(r.get(3)?),
                ended_at: r.get::<_, Option<i64>>(4)?.map(from_ms),
                mode: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// A text column read in place (no copy).
fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r str, StoreError> {
    r.get_ref(i)?
        .as_str()
        .map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))
}

/// Keys bound as one `rarray(?)` parameter.
fn text_array<'a>(keys: impl Iterator<Item = &'a str>) -> rusqlite::vtab::array::Array {
    std::rc::Rc::new(
        keys.map(|k| rusqlite::types::Value::Text(k.to_owned()))
            .collect(),
    )
}

/// Where each distinct key occurs in `keys` (a key may be asked for twice).
fn positions(keys: &[String]) -> std::collections::HashMap<&str, Vec<usize>> {
    let mut at: std::collections::HashMap<&str, Vec<usize>> =
        std::collections::HashMap::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        at.entry(k.as_str()).or_default().push(i);
    }
    at
}

const INSERT_LOG: &str = "INSERT INTO dispatch_log (time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

fn insert_log(conn: &Connection, r: &LogRecord) -> Result<i64, StoreError> {
    insert_log_with(&mut *conn.prepare_cached(INSERT_LOG)?, r)?;
    Ok(conn.last_insert_rowid())
}

/// Executes the prepared [`INSERT_LOG`]; the caller reads the new seq.
fn insert_log_with(stmt: &mut rusqlite::Statement<'_>, r: &LogRecord) -> Result<(), StoreError> {
    stmt.execute(params![
        ms(r.time),
        r.customer,
        r.journey,
        r.instance,
        r.step,
        r.channel,
        r.template,
        r.outcome.as_str(),
        r.reason,
        r.rule_hash,
        r.attempt,
        r.latency_ms.map(|l| l as i64),
        r.event_id,
    ])?;
    Ok(())
}

/// The WHERE clause that finds a claimed step (`?1` instance, `?2` step) by
/// its rowid (`?4`) when the claim handed it over, saving a key lookup
/// per settled step, and by its key otherwise.
macro_rules! step_by_row {
    () => {
        " WHERE rowid = coalesce(?4, (SELECT rowid FROM steps WHERE instance_id = ?1 AND step = ?2))
           AND instance_id = ?1 AND step = ?2"
    };
}

impl Store for SqliteStore {
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError> {
        let conn = self.conn();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Box::new(SqliteTx { conn, open: true }))
    }

    fn claim_due(
        &self,
        channel: ChannelKind,
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<DueStep>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "UPDATE steps SET status = 'pending', lease_until = NULL WHERE status = 'claimed' AND channel = ?1 AND lease_until < ?2",
        )?
        .execute(params![channel.as_str(), ms(now)])?;
        // The claimed steps' own columns come back from the UPDATE; their
        // instances' from one batch read.
        type Claimed = (i64, String, String, String, Option<String>, i64, i64, u32);
        let claimed: Vec<Claimed> = tx
            .prepare_cached(
                "UPDATE steps SET status = 'claimed', lease_until = ?1, attempt = attempt + 1
                 WHERE rowid IN (
                     SELECT rowid FROM steps
                     WHERE status = 'pending' AND channel = ?2 AND due_at <= ?3
                     ORDER BY due_at LIMIT ?4)
                 RETURNING rowid, instance_id, step, template, condition, planned_at, due_at, attempt",
            )?
            .query_map(
                params![ms(lease_until), channel.as_str(), ms(now), limit as i64],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                },
            )?
            .collect::<Result<_, _>>()?;
        tx.commit()?;
        drop(conn);
        // The instances are read beside the writer (the claim is committed:
        // no other worker takes these steps meanwhile).
        let mut due = Vec::with_capacity(claimed.len());
        if !claimed.is_empty() {
            let reader = self.reader();
            let ids = text_array(claimed.iter().map(|c| c.1.as_str()));
            let mut stmt = reader.prepare_cached(CLAIMED_INSTANCES)?;
            let mut rows = stmt.query([ids])?;
            for (row, instance_id, step, template, condition, planned_at, due_at, attempt) in
                claimed
            {
                let r = rows.next()?.ok_or_else(|| {
                    StoreError::Corrupt("claimed steps outnumber their instances".into())
                })?;
                let Some(customer) = r.get::<_, Option<String>>(0)? else {
                    return Err(StoreError::Corrupt(format!(
                        "step {instance_id}/{step} has no instance"
                    )));
                };
                due.push(DueStep {
                    row,
                    channel,
                    template,
                    condition,
                    planned_at: from_ms(planned_at),
                    due_at: from_ms(due_at),
                    attempt,
                    customer,
                    journey: r.get(1)?,
                    mode: Mode::parse(text(r, 2)?)?,
                    category: text(r, 3)?.parse().map_err(StoreError::Corrupt)?,
                    rule_hash: r.get(4)?,
                    vars: Variables::from_json(r.get(5)?)
                        .map_err(|e| StoreError::Corrupt(format!("instance vars: {e}")))?,
                    instance_status: r.get(6)?,
                    instance_id,
                    step,
                });
            }
        }
        Ok(due)
    }

    fn finish_step(&self, result: &StepResult) -> Result<LogRecord, StoreError> {
        let mut written = self.finish_steps(vec![result.clone()])?;
        Ok(written.pop().expect("one record per result"))
    }

    fn finish_steps(&self, results: Vec<StepResult>) -> Result<Vec<LogRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(results.len());
        {
            let mut settle = tx.prepare_cached(concat!(
                "UPDATE steps SET status = ?3, lease_until = NULL",
                step_by_row!()
            ))?;
            let mut complete = tx.prepare_cached(COMPLETE_INSTANCE)?;
            let mut log = tx.prepare_cached(INSERT_LOG)?;
            for result in results {
                let r = &result.record;
                let row = result.claimed_row;
                match result.again_at {
                    Some(at) => {
                        let sql = if result.replan {
                            concat!(
                                "UPDATE steps SET status = 'pending', lease_until = NULL, due_at = ?3, planned_at = ?3",
                                step_by_row!()
                            )
                        } else {
                            concat!(
                                "UPDATE steps SET status = 'pending', lease_until = NULL, due_at = ?3",
                                step_by_row!()
                            )
                        };
                        tx.prepare_cached(sql)?.execute(params![
                            r.instance,
                            r.step,
                            ms(at),
                            row
                        ])?;
                    }
                    None => {
                        settle.execute(params![r.instance, r.step, r.outcome.as_str(), row])?;
                        // The last step settled: the journey is complete.
                        complete.execute(params![r.instance, ms(r.time)])?;
                    }
                }
                insert_log_with(&mut log, r)?;
                let mut written = result.record;
                written.seq = tx.last_insert_rowid();
                out.push(written);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn next_due(&self, channel: Option<ChannelKind>) -> Result<Option<DateTime<Utc>>, StoreError> {
        let conn = self.conn();
        let v: Option<i64> = match channel {
            Some(c) => conn
                .prepare_cached(
                    "SELECT MIN(due_at) FROM steps WHERE status = 'pending' AND channel = ?1",
                )?
                .query_row([c.as_str()], |r| r.get(0))?,
            None => conn
                .prepare_cached("SELECT MIN(due_at) FROM steps WHERE status = 'pending'")?
                .query_row([], |r| r.get(0))?,
        };
        Ok(v.map(from_ms))
    }

    fn release_all_leases(&self) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE steps SET status = 'pending', lease_until = NULL WHERE status = 'claimed'",
            [],
        )?)
    }

    fn customer(
        &self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError> {
        load_customer(&self.reader(), id, window_start)
    }

    fn history(&self, instance_id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut one = self.histories(&[instance_id.to_owned()])?;
        Ok(one.pop().unwrap_or_default())
    }

    fn customers(
        &self,
        ids: &[String],
        sends_since: Option<DateTime<Utc>>,
        journeys: bool,
    ) -> Result<Vec<CustomerContext>, StoreError> {
        let conn = self.reader();
        let keys = text_array(ids.iter().map(String::as_str));
        let mut out = Vec::with_capacity(ids.len());
        {
            let mut stmt = conn.prepare_cached(CUSTOMER_CONTEXTS)?;
            let mut rows = stmt.query([keys.clone()])?;
            for id in ids {
                let r = rows
                    .next()?
                    .ok_or_else(|| StoreError::Corrupt("customer rows missing".into()))?;
                let mut customer = match r
                    .get_ref(0)?
                    .as_str_or_null()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?
                {
                    Some(text) => serde_json::from_str(text)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    None => CustomerContext::new(id),
                };
                customer.id.clone_from(id);
                out.push(customer);
            }
        }
        if journeys {
            for customer in &mut out {
                customer.journeys = load_journeys(&conn, &customer.id)?;
            }
        }
        if let Some(window_start) = sends_since {
            let position = positions(ids);
            let mut stmt = conn.prepare_cached(RECENT_SENDS)?;
            let mut rows = stmt.query(params![keys, ms(window_start)])?;
            while let Some(r) = rows.next()? {
                for &i in &position[text(r, 0)?] {
                    out[i].recent_sends.push(from_ms(r.get(1)?));
                }
            }
            for customer in &mut out {
                customer.recent_sends.sort_unstable_by(|a, b| b.cmp(a));
            }
        }
        Ok(out)
    }

    fn histories(&self, instance_ids: &[String]) -> Result<Vec<Vec<HistoryEntry>>, StoreError> {
        let conn = self.reader();
        let position = positions(instance_ids);
        let mut out: Vec<Vec<(i64, HistoryEntry)>> = vec![Vec::new(); instance_ids.len()];
        let mut stmt = conn.prepare_cached(HISTORIES)?;
        let mut rows = stmt.query([text_array(position.keys().copied())])?;
        while let Some(r) = rows.next()? {
            let entry = HistoryEntry {
                step: r.get(2)?,
                channel: r.get(3)?,
                template: r.get(4)?,
                sent_at: from_ms(r.get(5)?).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            };
            let seq: i64 = r.get(1)?;
            for &i in &position[text(r, 0)?] {
                out[i].push((seq, entry.clone()));
            }
        }
        Ok(out
            .into_iter()
            .map(|mut entries| {
                entries.sort_unstable_by_key(|(seq, _)| *seq);
                entries.into_iter().map(|(_, e)| e).collect()
            })
            .collect())
    }

    fn log_after(&self, after: i64, limit: usize) -> Result<Vec<LogRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id
             FROM dispatch_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok((
                LogRecord {
                    seq: r.get(0)?,
                    time: from_ms(r.get(1)?),
                    customer: r.get(2)?,
                    journey: r.get(3)?,
                    instance: r.get(4)?,
                    step: r.get(5)?,
                    channel: r.get(6)?,
                    template: r.get(7)?,
                    outcome: Outcome::Sent,
                    reason: r.get(9)?,
                    rule_hash: r.get(10)?,
                    attempt: r.get(11)?,
                    latency_ms: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
                    event_id: r.get(13)?,
                },
                r.get::<_, String>(8)?,
            ))
        })?;
        rows.map(|row| {
            let (mut rec, outcome) = row?;
            rec.outcome = outcome.parse().map_err(StoreError::Corrupt)?;
            Ok(rec)
        })
        .collect()
    }

    fn offsets(&self, topic: &str) -> Result<Vec<(i32, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT partition, next_offset FROM kafka_offsets WHERE topic = ?1 ORDER BY partition",
        )?;
        let rows = stmt
            .query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn record_rules(
        &self,
        version: &str,
        files: &Value,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO rule_versions (version, loaded_at, files) VALUES (?1, ?2, ?3)
             ON CONFLICT (version) DO UPDATE SET loaded_at = excluded.loaded_at",
            params![version, ms(at), files.to_string()],
        )?;
        Ok(())
    }

    fn unpublished_dead_letters(&self, limit: usize) -> Result<Vec<(i64, DeadLetter)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, topic, partition, offset, key, payload, reason, journey, event_id
             FROM dead_letters WHERE published_at IS NULL ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok((
                    r.get(0)?,
                    DeadLetter {
                        topic: r.get(1)?,
                        partition: r.get(2)?,
                        offset: r.get(3)?,
                        key: r.get(4)?,
                        payload: r.get(5)?,
                        reason: r.get(6)?,
                        journey: r.get(7)?,
                        event_id: r.get(8)?,
                    },
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn mark_dead_letters_published(
        &self,
        ids: &[i64],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("UPDATE dead_letters SET published_at = ?2 WHERE id = ?1")?;
            for id in ids {
                stmt.execute(params![id, ms(at)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn release_claim(&self, instance_id: &str, step: &str) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE steps SET status = 'pending', lease_until = NULL, attempt = attempt - 1
                 WHERE instance_id = ?1 AND step = ?2 AND status = 'claimed'",
            )?
            .execute(params![instance_id, step])?;
        Ok(())
    }

    fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let cutoff = ms(before);
        let mut deleted = 0u64;
        // Ended instances with their steps: the table is walked in key order a
        // chunk at a time, so the lock is held for milliseconds. (An index on
        // `ended_at` would avoid the walk but cost every finished journey an
        // index write: 15 % of the sending rate, measured.)
        let mut after = String::new();
        loop {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let upto: Option<String> = tx
                .query_row(
                    PURGE_INSTANCES_CHUNK_END,
                    params![after, PURGE_CHUNK - 1],
                    |r| r.get(0),
                )
                .optional()?;
            // No `upto`: fewer than a chunk of instances are left after `after`.
            let (steps, instances) = match &upto {
                Some(_) => PURGE_INSTANCES,
                None => PURGE_INSTANCES_TAIL,
            };
            let bound = upto.clone().unwrap_or_default();
            deleted += tx.execute(steps, params![after, bound, cutoff])? as u64;
            deleted += tx.execute(instances, params![after, bound, cutoff])? as u64;
            tx.commit()?;
            match upto {
                Some(id) => after = id,
                None => break,
            }
        }
        for sql in PURGE_BY_AGE {
            loop {
                let n = self.conn().execute(sql, params![cutoff, PURGE_CHUNK])?;
                deleted += n as u64;
                if n < PURGE_CHUNK {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    fn step_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT status, COUNT(*) FROM steps GROUP BY status ORDER BY status")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

struct SqliteTx<'a> {
    conn: MutexGuard<'a, Connection>,
    open: bool,
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl Tx for SqliteTx<'_> {
    fn seen(&mut self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM processed_events WHERE id = ?1")?
            .exists([event_id])?)
    }

    fn mark_processed(&mut self, event_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO processed_events (id, at) VALUES (?1, ?2)")?
            .execute(params![event_id, ms(at)])?;
        Ok(())
    }

    fn customer(
        &mut self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError> {
        load_customer(&self.conn, id, window_start)
    }

    fn save_customer(
        &mut self,
        customer: &CustomerContext,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let text =
            serde_json::to_string(customer).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn
            .prepare_cached(
                "INSERT INTO customers (id, context, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET context = excluded.context, updated_at = excluded.updated_at",
            )?
            .execute(params![customer.id, text, ms(at)])?;
        Ok(())
    }

    fn open_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
    ) -> Result<Option<OpenInstance>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT id, rule_hash FROM instances WHERE customer = ?1 AND journey = ?2 AND key = ?3 AND status = 'open'",
            )?
            .query_row(params![customer, journey, key], |r| {
                Ok(OpenInstance {
                    id: r.get(0)?,
                    rule_hash: r.get(1)?,
                })
            })
            .optional()?)
    }

    fn exit_target(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
        completed_since: DateTime<Utc>,
    ) -> Result<Option<OpenInstance>, StoreError> {
        if let Some(open) = self.open_instance(customer, journey, key)? {
            return Ok(Some(open));
        }
        Ok(self
            .conn
            .prepare_cached(
                "SELECT id, rule_hash FROM instances
                 WHERE customer = ?1 AND journey = ?2 AND key = ?3 AND status = 'completed' AND ended_at >= ?4
                 ORDER BY ended_at DESC LIMIT 1",
            )?
            .query_row(params![customer, journey, key, ms(completed_since)], |r| {
                Ok(OpenInstance {
                    id: r.get(0)?,
                    rule_hash: r.get(1)?,
                })
            })
            .optional()?)
    }

    fn start_instance(&mut self, i: &NewInstance, steps: &[NewStep]) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO instances (id, customer, journey, key, status, mode, category, started_at, rule_hash, trigger_event, vars, seen)
                 VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                i.id,
                i.customer,
                i.journey,
                i.key,
                i.mode.as_str(),
                i.category.to_string(),
                ms(i.started_at),
                i.rule_hash,
                i.trigger_event,
                Value::Object(i.vars.clone()).to_string(),
                i.seen.to_string(),
            ])?;
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO steps (instance_id, step, seq, channel, template, condition, planned_at, due_at, status)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 'pending')",
        )?;
        for s in steps {
            stmt.execute(params![
                i.id,
                s.step,
                s.seq,
                s.channel.as_str(),
                s.template,
                s.condition,
                ms(s.due_at)
            ])?;
        }
        Ok(())
    }

    fn close_instance(
        &mut self,
        instance_id: &str,
        status: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<ClosedStep>, StoreError> {
        self.conn
            .prepare_cached("UPDATE instances SET status = ?2, ended_at = ?3 WHERE id = ?1 AND status IN ('open', 'completed')")?
            .execute(params![instance_id, status, ms(at)])?;
        let mut closed: Vec<(u32, String, String, String)> = self
            .conn
            .prepare_cached(
                "UPDATE steps SET status = 'cancelled', lease_until = NULL
                 WHERE instance_id = ?1 AND status = 'pending'
                 RETURNING seq, step, channel, template",
            )?
            .query_map([instance_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<_, _>>()?;
        closed.sort();
        closed
            .into_iter()
            .map(|(_, step, channel, template)| {
                Ok(ClosedStep {
                    step,
                    channel: channel.parse().map_err(StoreError::Corrupt)?,
                    template,
                })
            })
            .collect()
    }

    fn append_log(&mut self, record: &LogRecord) -> Result<(), StoreError> {
        insert_log(&self.conn, record).map(|_| ())
    }

    fn set_offset(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO kafka_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
            )?
            .execute(params![topic, partition, next_offset])?;
        Ok(())
    }

    fn add_dead_letter(&mut self, l: &DeadLetter, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO dead_letters (topic, partition, offset, key, payload, reason, journey, event_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![l.topic, l.partition, l.offset, l.key, l.payload, l.reason, l.journey, l.event_id, ms(at)])?;
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT")?;
        self.open = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> SqliteStore {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        // Keep the directory alive for the test's duration.
        std::mem::forget(dir);
        store
    }

    crate::store_conformance!(temp_store());

    /// Every purge statement finds its rows through an index: a full scan
    /// would hold the write lock for seconds on a large store.
    #[test]
    fn purge_statements_use_indexes() {
        let store = temp_store();
        let conn = store.conn();
        let mut statements: Vec<&str> = PURGE_BY_AGE.to_vec();
        statements.extend([
            PURGE_INSTANCES_CHUNK_END,
            PURGE_INSTANCES.0,
            PURGE_INSTANCES.1,
            PURGE_INSTANCES_TAIL.0,
            PURGE_INSTANCES_TAIL.1,
        ]);
        for sql in statements {
            // The dispatch log's chunk is its first rows in rowid order: a
            // scan that stops at the LIMIT.
            let bounded = sql.contains("ORDER BY seq LIMIT");
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let args: Vec<i64> = (0..stmt.parameter_count() as i64).collect();
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let scans = plan.iter().filter(|step| step.starts_with("SCAN ")).count();
            assert!(scans <= bounded as usize, "{sql}: {plan:?}");
        }
    }

    /// More than one chunk of old rows: all of them go, the recent ones stay.
    #[test]
    fn batch_statements_seek_each_key() {
        let store = temp_store();
        let conn = store.conn();
        for sql in [
            CLAIMED_INSTANCES,
            CUSTOMER_CONTEXTS,
            RECENT_SENDS,
            HISTORIES,
            COMPLETE_INSTANCE,
        ] {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let args: Vec<rusqlite::types::Value> = (0..stmt.parameter_count())
                .map(|i| match i {
                    0 if sql.contains("rarray") => rusqlite::types::Value::Null,
                    _ => rusqlite::types::Value::Integer(0),
                })
                .collect();
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            // Only the bound keys are walked; every table is searched by key.
            let scans: Vec<&String> = plan
                .iter()
                .filter(|step| step.starts_with("SCAN ") && !step.contains("VIRTUAL TABLE"))
                .collect();
            assert!(scans.is_empty(), "{sql}: {plan:?}");
            assert!(
                plan.iter().any(|step| step.starts_with("SEARCH ")),
                "{sql}: {plan:?}"
            );
        }
    }

    #[test]
    fn purge_deletes_in_chunks_until_nothing_old_is_left() {
        let store = temp_store();
        let old = Utc.timestamp_millis_opt(1_000_000).unwrap();
        let recent = Utc.timestamp_millis_opt(9_000_000).unwrap();
        let n = PURGE_CHUNK * 2 + 7;
        let mut tx = store.begin().unwrap();
        for i in 0..n {
            tx.mark_processed(&format!("old-{i}"), old).unwrap();
        }
        tx.mark_processed("recent", recent).unwrap();
        let record = |i: usize, time| LogRecord {
            seq: 0,
            time,
            customer: format!("c-{i}"),
            journey: "j".into(),
            instance: format!("i-{i}"),
            step: "push".into(),
            channel: "push".into(),
            template: "t".into(),
            outcome: Outcome::Sent,
            reason: String::new(),
            rule_hash: "h".into(),
            attempt: 1,
            latency_ms: None,
            event_id: None,
        };
        for i in 0..n {
            tx.append_log(&record(i, old)).unwrap();
        }
        tx.append_log(&record(n, recent)).unwrap();
        // Instances over several chunks: every third ended long ago, every
        // third ended recently, the rest open.
        use crate::store::conformance::{instance, steps};
        for i in 0..n {
            let id = format!("inst-{i:05}");
            tx.start_instance(&instance(&id, &format!("c-{i}"), "k"), &steps())
                .unwrap();
            match i % 3 {
                0 => tx.close_instance(&id, "converted", old).unwrap(),
                1 => tx.close_instance(&id, "converted", recent).unwrap(),
                _ => Vec::new(),
            };
        }
        tx.commit().unwrap();
        let cutoff = Utc.timestamp_millis_opt(5_000_000).unwrap();
        let old_instances = n.div_ceil(3);
        // Rows: processed ids, log records, old instances and their steps.
        let per_instance = 1 + steps().len();
        assert_eq!(
            store.purge(cutoff).unwrap(),
            (2 * n + old_instances * per_instance) as u64
        );
        let left = store.log_after(0, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].time, recent);
        let conn = store.conn();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            count("SELECT COUNT(*) FROM instances") as usize,
            n - old_instances
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM instances WHERE ended_at < 5000000"),
            0
        );
        drop(conn);
        let mut tx = store.begin().unwrap();
        assert!(!tx.seen("old-0").unwrap());
        assert!(!tx.seen(&format!("old-{}", n - 1)).unwrap());
        assert!(tx.seen("recent").unwrap());
    }
}
