//! [`ReviewRead`] on SQLite: on the reader connection (WAL: never waits for
//! the writer). A store opened by [`SqliteStore::open_reader`] has only
//! query-only connections, for the review beside a running daemon.

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{from_ms, ms, schema, text, SqliteStore};
use crate::context::CustomerContext;
use crate::model::{LogRecord, Outcome};
use crate::store::review::{
    arm_counts_sql, log_page_sql, planned_steps_sql, ArmCount, InstanceRecord, LogCursor,
    LogFilter, OutcomeCount, Param, PlannedStep, ReviewRead, LOG_COLUMNS,
};
use crate::store::StoreError;

impl SqliteStore {
    /// Opens an existing store to read it and nothing else: no migration,
    /// no owner lock (the daemon may be running), connections refusing
    /// writes. Its schema must be this binary's version.
    pub fn open_reader(path: &Path, cache_mb: u32) -> Result<Self, StoreError> {
        let connect = || -> Result<Connection, StoreError> {
            // Read-write without create: a missing file is an error, and a
            // WAL database whose -shm is gone can still be opened.
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| StoreError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
            conn.pragma_update(None, "cache_size", -(i64::from(cache_mb) * 1024))?;
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            conn.pragma_update(None, "query_only", true)?;
            Ok(conn)
        };
        let conn = connect()?;
        check_version(&conn, path)?;
        Ok(Self {
            _owner: None,
            conn: Mutex::new(conn),
            reader: Mutex::new(connect()?),
            upkeep: Mutex::new(connect()?),
        })
    }
}

/// A store to read must have this binary's schema: an older one lacks what
/// the queries read (and its indexes), a newer one may mean something else.
fn check_version(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found = schema::version(conn)?;
    if found > schema::VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: schema::VERSION,
        });
    }
    if found == 0 {
        // Stores from before schema versions hold the tables at version 0.
        let unversioned: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'instances')",
            [],
            |r| r.get(0),
        )?;
        return Err(StoreError::Config(match unversioned {
            true => format!(
                "{}: a store from before schema versions: run `nudge migrate` (or the daemon) first",
                path.display()
            ),
            false => format!("{}: not a nudge store (no schema)", path.display()),
        }));
    }
    if found < schema::VERSION {
        return Err(StoreError::Config(format!(
            "{}: schema version {found} is older than this binary's {}: run `nudge migrate` (or the daemon of this version) first",
            path.display(),
            schema::VERSION
        )));
    }
    Ok(())
}

fn placeholder(n: usize) -> String {
    format!("?{n}")
}

fn to_sql(p: Param) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    match p {
        Param::Text(s) => Value::Text(s),
        Param::Time(t) => Value::Integer(ms(t)),
        Param::Int(i) => Value::Integer(i),
    }
}

/// A row of [`LOG_COLUMNS`].
pub(super) fn log_record(r: &rusqlite::Row<'_>) -> Result<LogRecord, StoreError> {
    Ok(LogRecord {
        seq: r.get(0)?,
        time: from_ms(r.get(1)?),
        customer: r.get(2)?,
        journey: r.get(3)?,
        instance: r.get(4)?,
        step: r.get(5)?,
        channel: r.get(6)?,
        template: r.get(7)?,
        outcome: text(r, 8)?.parse().map_err(StoreError::Corrupt)?,
        reason: r.get(9)?,
        rule_hash: r.get(10)?,
        attempt: r.get(11)?,
        latency_ms: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
        event_id: r.get(13)?,
        http_status: r.get::<_, Option<i64>>(14)?.map(|v| v as u16),
        response_ms: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
    })
}

fn json(r: &rusqlite::Row<'_>, i: usize) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text(r, i)?).map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))
}

impl ReviewRead for SqliteStore {
    fn log_page(
        &self,
        filter: &LogFilter,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let (sql, params) = log_page_sql(filter, after, limit, LOG_COLUMNS, placeholder);
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params.into_iter().map(to_sql)))?;
        let mut out = Vec::with_capacity(limit.min(10_000));
        while let Some(r) = rows.next()? {
            out.push(log_record(r)?);
        }
        Ok(out)
    }

    fn outcome_counts(&self, journey: Option<&str>) -> Result<Vec<OutcomeCount>, StoreError> {
        let conn = self.reader();
        // The folded counts (schema v10) and the records after the fold
        // mark, not a scan of the log.
        let mut stmt = conn.prepare_cached(&folded_outcome_counts_sql(journey.is_some()))?;
        let mut rows = match journey {
            Some(j) => stmt.query([j])?,
            None => stmt.query([])?,
        };
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(OutcomeCount {
                journey: r.get(0)?,
                step: r.get(1)?,
                outcome: text(r, 2)?
                    .parse::<Outcome>()
                    .map_err(StoreError::Corrupt)?,
                reason: r.get(3)?,
                count: r.get::<_, i64>(4)? as u64,
            });
        }
        Ok(out)
    }

    fn arms(&self, journey: Option<&str>, by_rule: bool) -> Result<Vec<ArmCount>, StoreError> {
        let conn = self.reader();
        // The counts the instances' triggers keep (schema v10).
        let mut stmt = conn.prepare_cached(&arm_counts_sql(journey.is_some(), by_rule, "?1"))?;
        let mut rows = match journey {
            Some(j) => stmt.query([j])?,
            None => stmt.query([])?,
        };
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(ArmCount {
                journey: r.get(0)?,
                rule_hash: r.get(1)?,
                mode: text(r, 2)?.parse().map_err(StoreError::Corrupt)?,
                instances: r.get::<_, i64>(3)? as u64,
                converted_instances: r.get::<_, i64>(4)? as u64,
                customers: r.get::<_, i64>(5)? as u64,
                converted_customers: r.get::<_, i64>(6)? as u64,
                first_started: from_ms(r.get(7)?),
                last_started: from_ms(r.get(8)?),
            });
        }
        Ok(out)
    }

    fn planned_steps(&self, journey: &str) -> Result<Vec<PlannedStep>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&planned_steps_sql("?1"))?;
        let rows = stmt
            .query_map([journey], |r| {
                Ok(PlannedStep {
                    step: r.get(0)?,
                    seq: r.get(1)?,
                    channel: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn customer_instances(&self, customer: &str) -> Result<Vec<InstanceRecord>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT id, journey, key, status, mode, category, started_at, ended_at, rule_hash, trigger_event, vars, decision_inputs
             FROM instances WHERE customer = ?1 ORDER BY started_at, id",
        )?;
        let mut rows = stmt.query([customer])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(InstanceRecord {
                id: r.get(0)?,
                journey: r.get(1)?,
                key: r.get(2)?,
                status: text(r, 3)?.parse().map_err(StoreError::Corrupt)?,
                mode: text(r, 4)?.parse().map_err(StoreError::Corrupt)?,
                category: text(r, 5)?.parse().map_err(StoreError::Corrupt)?,
                started_at: from_ms(r.get(6)?),
                ended_at: r.get::<_, Option<i64>>(7)?.map(from_ms),
                rule_hash: r.get(8)?,
                trigger_event: r.get(9)?,
                vars: json(r, 10)?,
                decision_inputs: json(r, 11)?,
            });
        }
        Ok(out)
    }

    fn customer_context(&self, customer: &str) -> Result<Option<CustomerContext>, StoreError> {
        let conn = self.reader();
        let context: Option<String> = conn
            .prepare_cached("SELECT context FROM customers WHERE id = ?1")?
            .query_row([customer], |r| r.get(0))
            .optional()?;
        context
            .map(|text| {
                let mut c: CustomerContext =
                    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                c.id = customer.to_string();
                Ok(c)
            })
            .transpose()
    }

    fn log_reach(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let conn = self.reader();
        let v: Option<i64> = conn
            .prepare_cached("SELECT min(time) FROM dispatch_log")?
            .query_row(params![], |r| r.get(0))?;
        Ok(v.map(from_ms))
    }

    fn control_changes(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<crate::store::control::ControlEntry>, StoreError> {
        super::control::log(&self.reader(), since, until, limit)
    }

    fn propensity_stats(
        &self,
        journey: Option<&str>,
    ) -> Result<Vec<crate::propensity::PropensityCount>, StoreError> {
        super::propensity::counts(&self.reader(), journey)
    }

    fn customer_events(
        &self,
        customer: &str,
    ) -> Result<Vec<crate::store::received::ReceivedEvent>, StoreError> {
        super::received::of_customer(&self.reader(), customer)
    }
}

/// [`ReviewRead::outcome_counts`] on SQLite: the folded counts plus the
/// records logged after the fold mark, in one statement (one snapshot: a
/// fold moves counts and mark in one transaction). `NOT INDEXED`: the tail
/// is read by seq, never through the journey's index (all its records).
pub(super) fn folded_outcome_counts_sql(journey: bool) -> String {
    let (kept, tail) = match journey {
        true => ("WHERE journey = ?1", "AND journey = ?1"),
        false => ("", ""),
    };
    format!(
        "SELECT journey, step, outcome, reason, sum(records) FROM (
             SELECT journey, step, outcome, reason, records FROM review_outcome_counts {kept}
             UNION ALL
             SELECT journey, step, outcome, reason, count(*) FROM dispatch_log NOT INDEXED
             WHERE seq > (SELECT seq FROM review_outcome_folded WHERE id = 1)
               AND outcome NOT IN ('retrying', 'deferred') {tail}
             GROUP BY journey, step, outcome, reason)
         GROUP BY journey, step, outcome, reason ORDER BY journey, step, outcome, reason"
    )
}

/// Records folded per transaction: the aggregate is read beside the
/// writer, and the writer's lock is held only for the few upserts.
const FOLD_CHUNK: i64 = 50_000;

/// Folds the dispatch-log records after the fold mark into
/// `review_outcome_counts` (see schema v10), a chunk per transaction;
/// returns the records folded. The log has one writer, so seqs are in
/// commit order: every record up to the newest one seen is committed, and
/// the next fold starts after it. Retention's purge waits for a fold (the
/// upkeep connection's lock), so no folded chunk loses a record under it.
pub(super) fn fold(store: &SqliteStore) -> Result<u64, StoreError> {
    let upkeep = store.upkeep();
    let mut folded = 0u64;
    loop {
        let from: i64 = upkeep.query_row(
            "SELECT seq FROM review_outcome_folded WHERE id = 1",
            [],
            |r| r.get(0),
        )?;
        let upto: Option<i64> = upkeep
            .prepare_cached(
                "SELECT max(seq) FROM (SELECT seq FROM dispatch_log WHERE seq > ?1 ORDER BY seq LIMIT ?2)",
            )?
            .query_row(params![from, FOLD_CHUNK], |r| r.get(0))?;
        let Some(upto) = upto else {
            return Ok(folded);
        };
        type Group = (String, String, String, String, i64);
        let groups: Vec<Group> = upkeep
            .prepare_cached(
                "SELECT journey, step, outcome, reason, count(*) FROM dispatch_log
                 WHERE seq > ?1 AND seq <= ?2 AND outcome NOT IN ('retrying', 'deferred')
                 GROUP BY journey, step, outcome, reason",
            )?
            .query_map(params![from, upto], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut conn = store.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut add = tx.prepare_cached(
                "INSERT INTO review_outcome_counts (journey, step, outcome, reason, records)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (journey, step, outcome, reason) DO UPDATE SET records = records + excluded.records",
            )?;
            for (journey, step, outcome, reason, n) in &groups {
                add.execute(params![journey, step, outcome, reason, n])?;
                folded += *n as u64;
            }
        }
        let moved = tx
            .prepare_cached("UPDATE review_outcome_folded SET seq = ?2 WHERE id = 1 AND seq = ?1")?
            .execute(params![from, upto])?;
        if moved != 1 {
            return Err(StoreError::Corrupt(
                "the review counts' fold mark moved during a fold".into(),
            ));
        }
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader opens a daemon's store beside it (no owner lock), never
    /// writes, and refuses what it cannot read.
    #[test]
    fn a_reader_opens_beside_the_owner_and_refuses_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owned.db");
        let (_owner, _) = SqliteStore::open_exclusive(&path, 2).unwrap();
        let reader = SqliteStore::open_reader(&path, 2).unwrap();
        assert_eq!(reader.log_reach().unwrap(), None);
        let err = reader
            .reader()
            .execute("DELETE FROM dispatch_log", [])
            .unwrap_err();
        assert!(err.to_string().contains("readonly"), "{err}");
        let missing = SqliteStore::open_reader(&dir.path().join("none.db"), 2)
            .err()
            .expect("no file");
        assert!(missing.to_string().contains("none.db"), "{missing}");
        assert!(!dir.path().join("none.db").exists(), "not created");
        let old = dir.path().join("old.db");
        Connection::open(&old)
            .unwrap()
            .execute_batch(schema::V1_TABLES)
            .unwrap();
        Connection::open(&old)
            .unwrap()
            .pragma_update(None, "user_version", 1)
            .unwrap();
        let err = SqliteStore::open_reader(&old, 2).err().expect("old schema");
        assert!(err.to_string().contains("nudge migrate"), "{err}");
        // From before schema versions: the tables at version 0.
        let unversioned = dir.path().join("unversioned.db");
        Connection::open(&unversioned)
            .unwrap()
            .execute_batch(schema::V1_TABLES)
            .unwrap();
        let err = SqliteStore::open_reader(&unversioned, 2)
            .err()
            .expect("unversioned");
        assert!(
            err.to_string().ends_with(
                "a store from before schema versions: run `nudge migrate` (or the daemon) first"
            ),
            "{err}"
        );
    }

    /// Every page of the log, with any one filter and at any depth, walks an
    /// index in the page's order and stops at the limit: no full scan, no sort.
    #[test]
    fn every_log_page_walks_an_index_in_page_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("plan.db")).unwrap();
        let conn = store.reader();
        let t = chrono::DateTime::parse_from_rfc3339("2026-03-02T00:00:00Z")
            .unwrap()
            .to_utc();
        let some = |f: fn(&mut LogFilter)| {
            let mut filter = LogFilter::default();
            f(&mut filter);
            filter
        };
        let filters = [
            LogFilter::default(),
            some(|f| f.journey = Some("j".into())),
            some(|f| f.customer = Some("c".into())),
            some(|f| f.outcome = Some(Outcome::Failed)),
            some(|f| f.channel = Some("push".into())),
            some(|f| {
                f.journey = Some("j".into());
                f.step = Some("s".into());
                f.outcome = Some(Outcome::Sent);
            }),
            some(|f| {
                f.since = Some(chrono::DateTime::UNIX_EPOCH);
                f.until = Some(chrono::DateTime::UNIX_EPOCH);
            }),
        ];
        for filter in &filters {
            for after in [
                None,
                Some(LogCursor {
                    time: t,
                    seq: 1_000,
                }),
            ] {
                let (sql, params) = log_page_sql(filter, after, 100, LOG_COLUMNS, placeholder);
                let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
                let plan: Vec<String> = stmt
                    .query_map(
                        rusqlite::params_from_iter(params.into_iter().map(to_sql)),
                        |r| r.get::<_, String>(3),
                    )
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert!(
                    plan.iter().all(|s| !s.contains("TEMP B-TREE")),
                    "sorted: {filter:?} {after:?}: {plan:?}"
                );
                assert!(
                    plan.iter().any(|s| s.contains("USING INDEX dispatch_log_")
                        || s.contains("USING COVERING INDEX dispatch_log_")),
                    "{filter:?} {after:?}: {plan:?}"
                );
            }
        }
    }

    /// What the full-scan queries count, as rows of text.
    fn table(conn: &Connection, sql: &str) -> Vec<Vec<String>> {
        let mut stmt = conn.prepare(sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => "NULL".to_string(),
                        rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                        v => v.as_str().unwrap().to_string(),
                    })
                })
                .collect()
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    /// The counts the triggers keep are what the full-scan queries count,
    /// and migration 10 fills them so from a store written before it.
    #[test]
    fn migration_10_fills_the_counts_the_triggers_keep() {
        use crate::store::review::{arm_counts_sql, arms_sql};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counts.db");
        let store = SqliteStore::open(&path).unwrap();
        crate::review::tests::generate(&store);
        let scans = |conn: &Connection| {
            [
                (
                    arms_sql(false, false, "?1"),
                    arm_counts_sql(false, false, "?1"),
                ),
                (
                    arms_sql(false, true, "?1"),
                    arm_counts_sql(false, true, "?1"),
                ),
                (
                    crate::store::review::outcome_counts_sql(false, "?1"),
                    folded_outcome_counts_sql(false),
                ),
            ]
            .map(|(scan, kept)| (table(conn, &scan), table(conn, &kept)))
        };
        let kept = scans(&store.reader());
        for (scan, kept) in &kept {
            assert!(!scan.is_empty());
            assert_eq!(scan, kept);
        }
        drop(store);
        // Back to version 9, as a store written before it.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE review_outcome_folded; DROP TRIGGER review_outcome_delete;
             DROP TRIGGER review_arms_insert;
             DROP TRIGGER review_arms_delete;
             DROP TABLE review_outcome_counts; DROP TABLE review_arm_counts;
             DROP TABLE review_rule_arm_counts; DROP TABLE review_arm_customers;
             DROP TABLE review_rule_arm_customers;
             ALTER TABLE received_events DROP COLUMN refused;
             ALTER TABLE received_events DROP COLUMN ended_nothing;
             DROP TABLE store_moved;
             PRAGMA user_version = 9;",
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(schema::version(&store.reader()).unwrap(), schema::VERSION);
        assert_eq!(scans(&store.reader()), kept);
        let helpers = |sql: &str| table(&store.reader(), sql);
        assert_eq!(
            helpers("SELECT count(*), sum(instances) FROM review_rule_arm_customers"),
            helpers("SELECT count(DISTINCT journey || ' ' || rule_hash || ' ' || mode || ' ' || customer), count(*) FROM instances"),
        );
    }

    /// Reading the counts is a walk of the small count tables, and a purge's
    /// search for an arm's next first start is a seek on `instances_by_journey`.
    #[test]
    fn the_counts_are_read_without_scanning_the_log() {
        use crate::store::review::arm_counts_sql;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("plan.db")).unwrap();
        let conn = store.reader();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows: Vec<String> = stmt
                .query_map(["j"], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            rows.join("; ")
        };
        for by_rule in [false, true] {
            let p = plan(&arm_counts_sql(true, by_rule, "?1"));
            assert!(p.contains("review_") && !p.contains("instances "), "{p}");
        }
        // The folded counts, and the log only after the fold mark, by seq.
        let p = plan(&folded_outcome_counts_sql(true));
        assert!(
            p.contains("review_outcome_counts")
                && p.contains("dispatch_log USING INTEGER PRIMARY KEY (rowid>?)")
                && !p.contains("SCAN dispatch_log"),
            "{p}"
        );
        let p = plan(
            "SELECT started_at FROM instances WHERE journey = ?1 AND rule_hash = 'h' AND mode = 'live'
             ORDER BY started_at LIMIT 1",
        );
        assert!(
            p.contains("instances_by_journey") && !p.contains("TEMP B-TREE"),
            "{p}"
        );
    }
}
