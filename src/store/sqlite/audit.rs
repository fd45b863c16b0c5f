//! The audit outbox (see `store::audit`) on SQLite.

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::review::log_record;
use super::{ms, SqliteStore};
use crate::store::audit::{pair, AuditRecord};
use crate::store::StoreError;

/// The one holder on SQLite: one daemon owns the file.
const HOLDER: &str = "local";

pub(super) fn set_enabled(store: &SqliteStore, enabled: bool) -> Result<(), StoreError> {
    store
        .conn()
        .prepare_cached("UPDATE audit_stream SET enabled = ?1 WHERE id = 1")?
        .execute([enabled])?;
    Ok(())
}

pub(super) fn claim(
    store: &SqliteStore,
    limit: usize,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut conn = store.conn();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let leased = tx
        .prepare_cached(
            "UPDATE audit_stream SET holder = ?1, lease_until = ?3
             WHERE id = 1 AND (holder IS NULL OR holder = ?1 OR lease_until < ?2)",
        )?
        .execute(params![HOLDER, ms(now), ms(until)])?;
    if leased == 0 {
        return Ok(Vec::new());
    }
    let rows = tx
        .prepare_cached("SELECT seq, customer FROM audit_outbox ORDER BY seq LIMIT ?1")?
        .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<(i64, String)>, _>>()?;
    let records = {
        let mut stmt = tx.prepare_cached(
            "SELECT seq, time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms
             FROM dispatch_log WHERE seq IN (SELECT seq FROM audit_outbox ORDER BY seq LIMIT ?1)",
        )?;
        let mut q = stmt.query([limit as i64])?;
        let mut out = Vec::new();
        while let Some(r) = q.next()? {
            out.push(log_record(r)?);
        }
        out
    };
    tx.commit()?;
    Ok(pair(rows, records))
}

pub(super) fn delete(store: &SqliteStore, seqs: &[i64]) -> Result<(), StoreError> {
    if seqs.is_empty() {
        return Ok(());
    }
    let ids: rusqlite::vtab::array::Array = std::rc::Rc::new(
        seqs.iter()
            .map(|&s| rusqlite::types::Value::Integer(s))
            .collect(),
    );
    store
        .conn()
        .prepare_cached("DELETE FROM audit_outbox WHERE seq IN rarray(?1)")?
        .execute([ids])?;
    Ok(())
}

pub(super) fn backlog(store: &SqliteStore) -> Result<u64, StoreError> {
    Ok(store
        .reader()
        .prepare_cached("SELECT count(*) FROM audit_outbox")?
        .query_row([], |r| r.get::<_, i64>(0))? as u64)
}
