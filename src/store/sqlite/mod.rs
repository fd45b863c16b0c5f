//! The embedded store: one SQLite file in WAL mode, for one node. One
//! process owns the file; several replicas need a shared database server.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

mod audit;
mod batch;
mod control;
mod lock;
mod propensity;
mod purge;
mod received;
mod review;
pub mod schema;
mod tx;
mod upcoming;

use super::{ClaimedDeadLetter, DeadLetter, DeadLetterBacklog, StepResult, Store, StoreError, Tx};
use crate::context::{CustomerContext, JourneySummary};
use crate::model::{
    ChannelKind, DueStep, HistoryEntry, LogRecord, Outcome, Variables, WITHDRAW_SUFFIX,
};
use batch::{text_array, CLAIMED_INSTANCES};
use tx::SqliteTx;

/// Completes the instance `?1` at `?2` when the step just settled was its last.
const COMPLETE_INSTANCE: &str = "UPDATE instances SET status = 'completed', ended_at = ?2
     WHERE id = ?1 AND status = 'open'
       AND NOT EXISTS (SELECT 1 FROM steps WHERE instance_id = ?1 AND status IN ('pending', 'claimed'))";

/// A withdrawal of the step `?1`/`?2`, just delivered on `?3` at `?4`,
/// when an exit ended its journey while it was being sent (the exit's own
/// `plan_withdrawals` saw it claimed, not sent).
const PLAN_LATE_WITHDRAWAL: &str =
    "INSERT INTO steps (instance_id, step, seq, channel, template, planned_at, due_at, status)
     SELECT s.instance_id, s.step || ?5, s.seq, ?3, s.template, ?4, ?4, 'pending'
     FROM steps AS s JOIN instances AS i ON i.id = s.instance_id
     WHERE s.instance_id = ?1 AND s.step = ?2 AND i.status IN ('converted', 'cancelled')
     ON CONFLICT (instance_id, step) DO NOTHING";

/// A claim handed back (its holder died or its lease ran out) whose send
/// never began was no attempt: uncounted, so that a crash loop does not
/// spend `max_attempts` on a step it never tried. One whose send began
/// counts, since it may have gone out.
macro_rules! uncount_unbegun_attempt {
    () => {
        "attempt = CASE WHEN sending_at IS NULL THEN max(attempt - 1, 0) ELSE attempt END"
    };
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// A second connection for the dispatch path's batch reads, so that they
    /// run beside the writer's transactions (WAL: readers never wait for
    /// it) instead of queueing behind them on one thread: the store's
    /// single thread of writes is the critical path of sending.
    reader: Mutex<Connection>,
    /// A third, for background upkeep (folding the review counts, see
    /// `review::fold`), so that a fold's read never holds up the dispatch
    /// path's batch reads. Its lock also keeps retention's purge and a fold
    /// from running at once.
    upkeep: Mutex<Connection>,
    /// Held for the store's lifetime when opened by the daemon
    /// ([`SqliteStore::open_exclusive`]). Last, so dropped after the
    /// connections (see [`lock::OwnerLock`]).
    _owner: Option<lock::OwnerLock>,
}

impl SqliteStore {
    /// Opens the store as its one owner, the daemon: refused while another
    /// process owns the file (the error names it and its pid). Claims left by
    /// a dead predecessor are released at once, since no live worker can
    /// hold them, so their steps go out now rather than when their lease ends.
    /// A file moved into PostgreSQL (`nudge migrate --from`) is refused.
    pub fn open_exclusive(path: &Path, cache_mb: u32) -> Result<(Self, usize), StoreError> {
        let (store, released) = Self::open_owned(path, cache_mb)?;
        if let Some((to, at)) = store.moved_to()? {
            return Err(StoreError::Moved {
                path: path.display().to_string(),
                to,
                at,
            });
        }
        Ok((store, released))
    }

    /// As the file's one owner, moved or not (the copy into PostgreSQL may
    /// be run again from a moved file).
    pub(in crate::store) fn open_owned(
        path: &Path,
        cache_mb: u32,
    ) -> Result<(Self, usize), StoreError> {
        let mut owner = lock::OwnerLock::acquire(path)?;
        let mut store = Self::open_with_cache(path, cache_mb)?;
        owner.watch(path)?;
        store._owner = Some(owner);
        let released = store.release_all_leases()?;
        Ok((store, released))
    }

    /// Where the file was moved to, and when, if it was.
    pub fn moved_to(&self) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT target, at FROM store_moved", [], |r| {
                Ok((r.get(0)?, from_ms(r.get(1)?)))
            })
            .optional()?)
    }

    /// Records that the file was moved to `to` (`None`: takes that back).
    pub(in crate::store) fn set_moved(
        &self,
        to: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        match to {
            Some(to) => conn.execute(
                "INSERT OR REPLACE INTO store_moved (id, target, at) VALUES (1, ?1, ?2)",
                params![to, ms(at)],
            )?,
            None => conn.execute("DELETE FROM store_moved", [])?,
        };
        Ok(())
    }

    /// The writer's connection, for the copy into PostgreSQL.
    pub(in crate::store) fn writer(&self) -> MutexGuard<'_, Connection> {
        self.conn()
    }

    /// The schema version of the file at `path`, migrating it first (the
    /// `nudge migrate` command): (version found, version now). Refused
    /// while a daemon owns the file: its schema must not change under it.
    pub fn migrate(path: &Path) -> Result<(u32, u32), StoreError> {
        let _owner = lock::OwnerLock::acquire(path)?;
        let before = match path.exists() {
            true => schema::version(&Connection::open(path)?)?,
            false => 0,
        };
        let store = Self::open(path)?;
        let after = schema::version(&store.conn())?;
        Ok((before, after))
    }

    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, crate::config::DEFAULT_CACHE_MB)
    }

    pub fn open_with_cache(path: &Path, cache_mb: u32) -> Result<Self, StoreError> {
        // Switching a new file to WAL does not go through the busy handler, so
        // a second process opening the same new file at once retries here.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Self::try_open(path, cache_mb, false) {
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

    /// A scratch store (`simulate`, `nudge test`) in a file that is thrown
    /// away: nothing is synced to disk, from its creation on (a test run
    /// makes one per case).
    pub fn open_scratch(path: &Path) -> Result<Self, StoreError> {
        Self::try_open(path, crate::config::DEFAULT_CACHE_MB, true)
    }

    fn try_open(path: &Path, cache_mb: u32, scratch: bool) -> Result<Self, StoreError> {
        let mut conn = Self::connect(path, cache_mb)?;
        if scratch {
            conn.pragma_update(None, "synchronous", "OFF")?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a commit survives a process crash; only an OS
        // crash or power loss may lose the last transactions.
        conn.pragma_update(None, "synchronous", if scratch { "OFF" } else { "NORMAL" })?;
        schema::migrate(&mut conn)?;
        let reader = Self::connect(path, cache_mb)?;
        let upkeep = Self::connect(path, 2)?;
        if scratch {
            // The last connection to close checkpoints, under its own setting.
            for c in [&reader, &upkeep] {
                c.pragma_update(None, "synchronous", "OFF")?;
            }
        }
        Ok(Self {
            _owner: None,
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
            upkeep: Mutex::new(upkeep),
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

    /// [`lock::OwnerLock::file_in_place`], for the daemon's store.
    fn file_in_place(&self) -> Result<(), StoreError> {
        self._owner
            .as_ref()
            .map_or(Ok(()), lock::OwnerLock::file_in_place)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For reads that need not be in a write transaction; they see every
    /// transaction committed before they start.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn upkeep(&self) -> MutexGuard<'_, Connection> {
        self.upkeep.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Columns 1..=9 of a `dead_letters` row (topic, partition, offset, key,
/// payload, reason, journey, event_id, headers): the letter, and its
/// headers column still encoded.
fn dead_letter(r: &rusqlite::Row<'_>) -> rusqlite::Result<(DeadLetter, Option<String>)> {
    Ok((
        DeadLetter {
            topic: r.get(1)?,
            partition: r.get(2)?,
            offset: r.get(3)?,
            key: r.get(4)?,
            payload: r.get(5)?,
            reason: r.get(6)?,
            journey: r.get(7)?,
            event_id: r.get(8)?,
            headers: Vec::new(),
        },
        r.get(9)?,
    ))
}

fn with_headers(mut letter: DeadLetter, column: Option<String>) -> Result<DeadLetter, StoreError> {
    letter.headers = super::dead_letters::decode_headers(column.as_deref())?;
    Ok(letter)
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
        customer.recent_sends = recent_sends_of(conn, id, window_start)?;
    }
    Ok(customer)
}

/// The customer's sends since `window_start`, newest first.
fn recent_sends_of(
    conn: &Connection,
    id: &str,
    window_start: DateTime<Utc>,
) -> Result<Vec<crate::context::RecentSend>, StoreError> {
    let mut stmt = conn.prepare_cached(batch::RECENT_SENDS_OF)?;
    let mut rows = stmt.query(params![id, ms(window_start)])?;
    let mut sends = Vec::new();
    while let Some(r) = rows.next()? {
        sends.push(batch::recent_send(r, 0)?);
    }
    Ok(sends)
}

/// The customer's latest journeys, newest first.
fn load_journeys(conn: &Connection, id: &str) -> Result<Vec<JourneySummary>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT journey, key, status, started_at, ended_at, mode FROM instances WHERE customer = ?1 ORDER BY started_at DESC LIMIT 100",
    )?;
    let mut rows = stmt.query([id])?;
    let mut journeys = Vec::new();
    while let Some(r) = rows.next()? {
        journeys.push(JourneySummary {
            journey: r.get(0)?,
            key: r.get(1)?,
            status: text(r, 2)?.parse().map_err(StoreError::Corrupt)?,
            started_at: from_ms(r.get(3)?),
            ended_at: r.get::<_, Option<i64>>(4)?.map(from_ms),
            mode: text(r, 5)?.parse().map_err(StoreError::Corrupt)?,
        });
    }
    Ok(journeys)
}

/// A text column read in place (no copy).
fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r str, StoreError> {
    r.get_ref(i)?
        .as_str()
        .map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))
}

const INSERT_LOG: &str = "INSERT INTO dispatch_log (time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)";

fn insert_log(conn: &Connection, r: &LogRecord) -> Result<i64, StoreError> {
    insert_log_with(&mut *conn.prepare_cached(INSERT_LOG)?, r)?;
    let seq = conn.last_insert_rowid();
    if audit_enabled(conn)? {
        conn.prepare_cached(INSERT_OUTBOX)?
            .execute(params![seq, r.customer])?;
    }
    Ok(seq)
}

/// Whether the audit stream is on (`audit_stream.enabled`, set by the
/// daemon from its config): then each log record gets an outbox row in the
/// transaction that writes it. Written here, not by a trigger: a trigger on
/// the log's insert, even with its condition false, made every insert
/// three times as expensive (schema v11).
fn audit_enabled(conn: &Connection) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT enabled FROM audit_stream WHERE id = 1")?
        .query_row([], |r| r.get(0))?)
}

const INSERT_OUTBOX: &str = "INSERT INTO audit_outbox (seq, customer) VALUES (?1, ?2)";

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
        r.http_status,
        r.response_ms.map(|l| l as i64),
    ])?;
    Ok(())
}

/// The WHERE clause that finds a claimed step (`?1` instance, `?2` step) by
/// its rowid (`?4`) when the claim handed it over, saving a key lookup
/// per settled step, and by its key otherwise.
/// The step `?1`/`?2` (row `?4` when known). A claimed row is fenced
/// ([`Store::settle_steps`]): on one node only a step already settled (by
/// this process, after taking it again past its lease) is left alone.
macro_rules! step_by_row {
    () => {
        " WHERE rowid = coalesce(?4, (SELECT rowid FROM steps WHERE instance_id = ?1 AND step = ?2))
           AND instance_id = ?1 AND step = ?2
           AND (?4 IS NULL OR status IN ('claimed', 'pending'))"
    };
}

impl Store for SqliteStore {
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError> {
        self.file_in_place()?;
        let conn = self.conn();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Box::new(SqliteTx {
            conn,
            open: true,
            sends: Default::default(),
        }))
    }

    fn claim_due(
        &self,
        channel: ChannelKind,
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<DueStep>, StoreError> {
        self.file_in_place()?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.prepare_cached(concat!(
            "UPDATE steps SET status = 'pending', lease_until = NULL, ",
            uncount_unbegun_attempt!(),
            " WHERE status = 'claimed' AND channel = ?1 AND lease_until < ?2"
        ))?
        .execute(params![channel.as_str(), ms(now)])?;
        // The claimed steps' own columns come back from the UPDATE; their
        // instances' from one batch read.
        type Claimed = (
            i64,
            String,
            String,
            String,
            Option<String>,
            i64,
            i64,
            u32,
            bool,
        );
        let claimed: Vec<Claimed> = tx
            .prepare_cached(
                "UPDATE steps SET status = 'claimed', lease_until = ?1, attempt = attempt + 1
                 WHERE rowid IN (
                     SELECT rowid FROM steps
                     WHERE status = 'pending' AND channel = ?2 AND due_at <= ?3
                     ORDER BY due_at LIMIT ?4)
                 RETURNING rowid, instance_id, step, template, condition, planned_at, due_at, attempt,
                     sending_at IS NOT NULL",
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
                        r.get(8)?,
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
            for (
                row,
                instance_id,
                step,
                template,
                condition,
                planned_at,
                due_at,
                attempt,
                begun_before,
            ) in claimed
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
                    mode: text(r, 2)?.parse().map_err(StoreError::Corrupt)?,
                    category: text(r, 3)?.parse().map_err(StoreError::Corrupt)?,
                    rule_hash: r.get(4)?,
                    vars: Variables::from_json(r.get(5)?)
                        .map_err(|e| StoreError::Corrupt(format!("instance vars: {e}")))?,
                    instance_status: text(r, 6)?.parse().map_err(StoreError::Corrupt)?,
                    begun_before,
                    instance_id,
                    step,
                });
            }
        }
        Ok(due)
    }

    fn settle_steps(&self, results: &[StepResult]) -> Result<Vec<Option<i64>>, StoreError> {
        self.file_in_place()?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(results.len());
        {
            let mut settle = tx.prepare_cached(concat!(
                "UPDATE steps SET status = ?3, lease_until = NULL, sending_at = NULL",
                step_by_row!()
            ))?;
            let mut complete = tx.prepare_cached(COMPLETE_INSTANCE)?;
            let mut log = tx.prepare_cached(INSERT_LOG)?;
            let audit = audit_enabled(&tx)?;
            let mut outbox = tx.prepare_cached(INSERT_OUTBOX)?;
            let mut sends = propensity::SendTally::default();
            for result in results {
                let r = &result.record;
                let row = result.claimed_row;
                let changed = match result.again_at {
                    Some(at) => {
                        let sql = if result.replan {
                            concat!(
                                "UPDATE steps SET status = 'pending', lease_until = NULL, sending_at = NULL, due_at = ?3, planned_at = ?3, attempt = max(attempt - 1, 0)",
                                step_by_row!()
                            )
                        } else {
                            concat!(
                                "UPDATE steps SET status = 'pending', lease_until = NULL, sending_at = NULL, due_at = ?3",
                                step_by_row!()
                            )
                        };
                        tx.prepare_cached(sql)?
                            .execute(params![r.instance, r.step, ms(at), row])?
                    }
                    None => {
                        let changed =
                            settle.execute(params![r.instance, r.step, r.outcome.as_str(), row])?;
                        if changed > 0 {
                            // The last step settled: the journey is complete.
                            complete.execute(params![r.instance, ms(r.time)])?;
                            if result.withdraw_if_ended {
                                tx.prepare_cached(PLAN_LATE_WITHDRAWAL)?.execute(params![
                                    r.instance,
                                    r.step,
                                    r.channel,
                                    ms(r.time),
                                    WITHDRAW_SUFFIX
                                ])?;
                            }
                        }
                        changed
                    }
                };
                if changed == 0 && row.is_some() {
                    out.push(None);
                    continue;
                }
                insert_log_with(&mut log, r)?;
                let seq = tx.last_insert_rowid();
                if audit {
                    outbox.execute(params![seq, r.customer])?;
                }
                out.push(Some(seq));
                if r.outcome == Outcome::Sent {
                    sends.add(&r.journey, &r.step, &r.channel);
                }
            }
            sends.write(&tx)?;
        }
        tx.commit()?;
        Ok(out)
    }

    fn renew_claims(&self, rows: &[i64], until: DateTime<Utc>) -> Result<Vec<i64>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: rusqlite::vtab::array::Array = std::rc::Rc::new(
            rows.iter()
                .map(|&row| rusqlite::types::Value::Integer(row))
                .collect(),
        );
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "UPDATE steps SET lease_until = MAX(lease_until, ?2)
                 WHERE rowid IN rarray(?1) AND status = 'claimed'
                 RETURNING rowid",
        )?;
        let renewed = stmt
            .query_map(params![ids, ms(until)], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(renewed)
    }

    fn claim_held(&self, row: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
        // One process owns the file: every claim in it is this one's.
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM steps WHERE rowid = ?1 AND status = 'claimed' AND lease_until > ?2)",
            )?
            .query_row(params![row, ms(now)], |r| r.get(0))?)
    }

    fn mark_sending(&self, rows: &[i64], at: DateTime<Utc>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: rusqlite::vtab::array::Array = std::rc::Rc::new(
            rows.iter()
                .map(|&row| rusqlite::types::Value::Integer(row))
                .collect(),
        );
        self.conn()
            .prepare_cached(
                "UPDATE steps SET sending_at = ?2 WHERE rowid IN rarray(?1) AND status = 'claimed'",
            )?
            .execute(params![ids, ms(at)])?;
        Ok(())
    }

    fn next_due(&self, channel: Option<ChannelKind>) -> Result<Option<DateTime<Utc>>, StoreError> {
        // Also the readiness probe's question: a file gone is said there.
        // On the reader: a decide batch holding the writer (a script
        // running up to rules.timeout) must not make the store look away.
        self.file_in_place()?;
        let conn = self.reader();
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

    fn customers(
        &self,
        ids: &[String],
        sends_since: Option<DateTime<Utc>>,
        journeys: bool,
    ) -> Result<Vec<CustomerContext>, StoreError> {
        batch::customers(&self.reader(), ids, sends_since, journeys)
    }

    fn histories(&self, instance_ids: &[String]) -> Result<Vec<Vec<HistoryEntry>>, StoreError> {
        batch::histories(&self.reader(), instance_ids)
    }

    fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        purge::purge(self, before)
    }

    fn release_all_leases(&self) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            concat!(
                "UPDATE steps SET status = 'pending', lease_until = NULL, ",
                uncount_unbegun_attempt!(),
                " WHERE status = 'claimed'"
            ),
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

    fn log_after(&self, after: i64, limit: usize) -> Result<Vec<LogRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms
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
                    http_status: r.get::<_, Option<i64>>(14)?.map(|v| v as u16),
                    response_ms: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
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
        // What is committed; not held up by a batch being decided.
        let conn = self.reader();
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
             ON CONFLICT (version) DO NOTHING",
            params![version, ms(at), files.to_string()],
        )?;
        Ok(())
    }

    fn unpublished_dead_letters(&self, limit: usize) -> Result<Vec<(i64, DeadLetter)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, topic, partition, offset, key, payload, reason, journey, event_id, headers
             FROM dead_letters WHERE published_at IS NULL AND failed_at IS NULL ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([limit as i64], |r| Ok((r.get(0)?, dead_letter(r)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, (letter, headers))| Ok((id, with_headers(letter, headers)?)))
            .collect()
    }

    /// One publisher per SQLite file: `until` is not needed to share letters.
    fn claim_dead_letters(
        &self,
        limit: usize,
        max_payload: usize,
        now: DateTime<Utc>,
        _until: DateTime<Utc>,
    ) -> Result<Vec<ClaimedDeadLetter>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, topic, partition, offset, key,
                    CASE WHEN length(payload) <= ?2 THEN payload ELSE substr(payload, 1, ?2) END, reason, journey,
                    event_id, headers, length(payload), attempts
             FROM dead_letters
             WHERE published_at IS NULL AND failed_at IS NULL AND (retry_at IS NULL OR retry_at <= ?3)
             ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt
            .query_map(
                params![
                    limit as i64,
                    max_payload.min(i64::MAX as usize) as i64,
                    ms(now)
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        dead_letter(r)?,
                        r.get::<_, i64>(10)?,
                        r.get::<_, i64>(11)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, (letter, headers), size, attempts)| {
                Ok(ClaimedDeadLetter {
                    id,
                    letter: with_headers(letter, headers)?,
                    payload_size: size.max(0) as usize,
                    attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                })
            })
            .collect()
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

    fn dead_letter_publish_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        give_up: bool,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE dead_letters SET attempts = attempts + 1, last_error = ?2, retry_at = ?3,
                        failed_at = CASE WHEN ?4 THEN ?5 END
                 WHERE id = ?1 AND published_at IS NULL",
            )?
            .execute(params![id, error, ms(retry_at), give_up, ms(at)])?;
        Ok(())
    }

    fn dead_letter_backlog(&self) -> Result<DeadLetterBacklog, StoreError> {
        let (waiting, failed): (i64, i64) = self.conn().prepare_cached(
            "SELECT COUNT(*) - COUNT(failed_at), COUNT(failed_at) FROM dead_letters WHERE published_at IS NULL",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(DeadLetterBacklog {
            waiting: waiting.max(0) as u64,
            failed: failed.max(0) as u64,
        })
    }

    fn release_claim(
        &self,
        instance_id: &str,
        step: &str,
        to: Option<ChannelKind>,
    ) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE steps SET status = 'pending', lease_until = NULL, sending_at = NULL, attempt = attempt - 1,
                     channel = coalesce(?3, channel)
                 WHERE instance_id = ?1 AND step = ?2 AND status = 'claimed'",
            )?
            .execute(params![instance_id, step, to.map(|c| c.as_str())])?;
        Ok(())
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

    fn set_audit_outbox(&self, enabled: bool) -> Result<(), StoreError> {
        audit::set_enabled(self, enabled)
    }

    fn claim_audit_records(
        &self,
        limit: usize,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<super::AuditRecord>, StoreError> {
        audit::claim(self, limit, now, until)
    }

    fn delete_audit_records(&self, seqs: &[i64]) -> Result<(), StoreError> {
        audit::delete(self, seqs)
    }

    fn audit_backlog(&self) -> Result<u64, StoreError> {
        audit::backlog(self)
    }

    fn upcoming_steps(
        &self,
        customers: &[String],
        until: DateTime<Utc>,
    ) -> Result<Vec<DueStep>, StoreError> {
        upcoming::upcoming_steps(&self.reader(), customers, until)
    }

    // Runtime control: reads on the reader connection (a batch may hold the writer).

    fn control_overrides(&self) -> Result<Vec<super::control::ControlRow>, StoreError> {
        control::overrides(&self.reader())
    }

    fn change_control(
        &self,
        change: &super::control::ControlChange<'_>,
    ) -> Result<super::control::ControlEntry, StoreError> {
        control::change(&mut self.conn(), change)
    }

    fn control_log(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<super::control::ControlEntry>, StoreError> {
        control::log(&self.reader(), since, until, limit)
    }

    fn propensity_counts(
        &self,
        journey: Option<&str>,
    ) -> Result<Vec<crate::propensity::PropensityCount>, StoreError> {
        propensity::counts(&self.reader(), journey)
    }

    fn received_events(
        &self,
        customer: &str,
    ) -> Result<Vec<super::received::ReceivedEvent>, StoreError> {
        received::of_customer(&self.reader(), customer)
    }

    fn fold_review_counts(&self) -> Result<u64, StoreError> {
        review::fold(self)
    }
}

#[cfg(test)]
mod tests {
    use super::batch::{CUSTOMER_CONTEXTS, HISTORIES, RECENT_SENDS, RECENT_SENDS_OF};
    use super::purge::{
        PURGE_BY_AGE, PURGE_CHUNK, PURGE_INSTANCES, PURGE_INSTANCES_CHUNK_END, PURGE_INSTANCES_TAIL,
    };
    use super::*;
    use crate::model::InstanceStatus;

    fn temp_store() -> SqliteStore {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        // Keep the directory alive for the test's duration.
        std::mem::forget(dir);
        store
    }

    crate::store_conformance!(Box::new(temp_store()));

    /// The daemon's database file deleted (or replaced) under it: every
    /// write and the readiness probe fail, transient and naming the file,
    /// so the ingest stops consuming (the events wait in Kafka) instead of
    /// writing to a file nothing will read again.
    #[test]
    fn a_database_file_removed_under_the_daemon_stops_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nudge.db");
        let (store, _) = SqliteStore::open_exclusive(&path, 2).unwrap();
        assert!(store.begin().is_ok());
        std::fs::rename(&path, dir.path().join("moved.db")).unwrap();
        for failed in [
            store.begin().map(|_| ()).unwrap_err(),
            store.next_due(None).map(|_| ()).unwrap_err(),
            store
                .claim_due(ChannelKind::Push, chrono::Utc::now(), 1, chrono::Utc::now())
                .map(|_| ())
                .unwrap_err(),
        ] {
            assert!(failed.is_transient(), "{failed}");
            let text = failed.to_string();
            assert!(
                text.contains("nudge.db") && text.contains("removed"),
                "{text}"
            );
        }
        // Put back, the same file: writes go on.
        std::fs::rename(dir.path().join("moved.db"), &path).unwrap();
        assert!(store.begin().is_ok());
        assert!(store.next_due(None).is_ok());
    }

    /// A full disk (here the database at its `max_page_count`, which SQLite
    /// reports as it does a full disk) is a wait, not a refusal: the write
    /// fails as transient (the ingest retries, the events stay in Kafka)
    /// and the same write goes through once there is room.
    #[test]
    fn a_full_disk_is_transient_and_the_write_goes_through_after() {
        let store = temp_store();
        let pages: i64 = store
            .conn()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        let limit = |pages: i64| {
            store
                .conn()
                .execute_batch(&format!("PRAGMA max_page_count = {pages}"))
                .unwrap()
        };
        limit(pages);
        let letter = crate::store::DeadLetter {
            topic: "events".into(),
            partition: 0,
            offset: 1,
            key: None,
            payload: vec![b'x'; 256 * 1024],
            reason: "r".into(),
            journey: None,
            event_id: None,
            headers: Vec::new(),
        };
        let write = || -> Result<(), StoreError> {
            let mut tx = store.begin()?;
            tx.add_dead_letter(&letter, chrono::Utc::now())?;
            tx.commit()
        };
        let full = write().unwrap_err();
        assert!(full.to_string().contains("full"), "{full}");
        assert!(full.is_transient(), "{full}");
        limit(1_000_000);
        write().unwrap();
        assert_eq!(store.unpublished_dead_letters(10).unwrap().len(), 1);
    }

    #[test]
    fn propensity_counts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        crate::store::conformance::propensity_counts_survive_a_restart(&|| {
            Box::new(SqliteStore::open_exclusive(&path, 8).unwrap().0)
        });
    }

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
            // The dispatch log's and received events' chunk is their first
            // rows in rowid order: a scan that stops at the LIMIT.
            let bounded = sql.contains("ORDER BY seq LIMIT") || sql.contains("ORDER BY id LIMIT");
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
            RECENT_SENDS_OF,
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
    fn a_database_from_before_versioning_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // As the schema was before migrations: the tables, user_version 0.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(schema::V1_TABLES).unwrap();
            conn.execute(
                "INSERT INTO instances (id, customer, journey, key, status, mode, category, started_at, rule_hash, trigger_event, vars, seen)
                 VALUES ('i1', 'c1', 'j', 'c1', 'open', 'live', 'service', 0, 'h', 'e1', '{}', '{\"event\":1}')",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let conn = store.conn();
        assert_eq!(schema::version(&conn).unwrap(), schema::VERSION);
        let inputs: String = conn
            .query_row(
                "SELECT decision_inputs FROM instances WHERE id = 'i1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(inputs, r#"{"event":1}"#);
        // v12: the sends-only index by customer, which v1 created, is gone.
        let sends_index: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'dispatch_log_sends'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(sends_index, 0);
        drop(conn);
        // Opening again applies nothing.
        drop(store);
        let mut conn = Connection::open(&path).unwrap();
        assert_eq!(schema::migrate(&mut conn).unwrap(), 0);
    }

    #[test]
    fn a_database_newer_than_the_binary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", schema::VERSION + 1)
            .unwrap();
        let err = SqliteStore::open(&path).err().expect("refused");
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, supported } if found == schema::VERSION + 1 && supported == schema::VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("newer than this binary"), "{err}");
    }

    #[test]
    fn one_owner_per_file_and_its_predecessors_claims_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owned.db");
        let (first, released) = SqliteStore::open_exclusive(&path, 2).unwrap();
        assert_eq!(released, 0);
        let err = SqliteStore::open_exclusive(&path, 2)
            .err()
            .expect("second owner refused");
        let text = err.to_string();
        assert!(
            matches!(err, StoreError::Locked { holder: Some(pid), .. } if pid == std::process::id()),
            "{text}"
        );
        assert!(
            text.contains("owned.db") && text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // A claim left behind by the owner (as if it died while sending)...
        let mut tx = first.begin().unwrap();
        tx.start_instance(
            &crate::store::conformance::instance("i1", "c1", "k"),
            &crate::store::conformance::steps(),
        )
        .unwrap();
        tx.commit().unwrap();
        let t0 = crate::store::conformance::t0();
        let claimed = first
            .claim_due(ChannelKind::Push, t0, 10, t0 + chrono::Duration::minutes(5))
            .unwrap();
        assert_eq!(claimed.len(), 1);
        drop(first);
        // ...is released for the next owner at once, not after the lease.
        let (second, released) = SqliteStore::open_exclusive(&path, 2).unwrap();
        assert_eq!(released, 1);
        let again = second
            .claim_due(ChannelKind::Push, t0, 10, t0 + chrono::Duration::minutes(5))
            .unwrap();
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn a_rule_version_keeps_when_it_was_first_loaded() {
        let store = temp_store();
        let first = Utc.timestamp_millis_opt(1_000).unwrap();
        let files = serde_json::json!({"rules/a.rhai": "h1"});
        store.record_rules("v1", &files, first).unwrap();
        store
            .record_rules("v1", &files, first + chrono::Duration::days(3))
            .unwrap();
        let loaded_at: i64 = store
            .conn()
            .query_row(
                "SELECT loaded_at FROM rule_versions WHERE version = 'v1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(loaded_at, 1_000);
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
            http_status: None,
            response_ms: None,
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
                0 => tx
                    .close_instance(&id, InstanceStatus::Converted, old)
                    .unwrap(),
                1 => tx
                    .close_instance(&id, InstanceStatus::Converted, recent)
                    .unwrap(),
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
        assert!(!tx.already_processed("old-0").unwrap());
        assert!(!tx.already_processed(&format!("old-{}", n - 1)).unwrap());
        assert!(tx.already_processed("recent").unwrap());
    }
}
