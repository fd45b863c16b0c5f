//! The audit outbox (see `store::audit`) on PostgreSQL: one replica holds
//! the publisher's lease at a time.

use chrono::{DateTime, Utc};

use super::read::log_record;
use super::PostgresStore;
use crate::store::audit::{pair, AuditRecord};
use crate::store::StoreError;

pub(super) fn set_enabled(store: &PostgresStore, enabled: bool) -> Result<(), StoreError> {
    store.conn()?.execute(
        "UPDATE audit_stream SET enabled = $1 WHERE id = 1",
        &[&enabled],
    )?;
    Ok(())
}

pub(super) fn claim(
    store: &PostgresStore,
    limit: usize,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut c = store.conn()?;
    let mut tx = c.custom_plans()?.transaction()?;
    let leased = tx.execute(
        "UPDATE audit_stream SET holder = $1, lease_until = $3
         WHERE id = 1 AND (holder IS NULL OR holder = $1 OR lease_until < $2)",
        &[&store.holder, &now, &until],
    )?;
    if leased == 0 {
        return Ok(Vec::new());
    }
    let limit = limit as i64;
    let rows = tx
        .query(
            "SELECT seq, customer FROM audit_outbox ORDER BY seq LIMIT $1",
            &[&limit],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(i64, String)>, StoreError>>()?;
    let records = tx
        .query(
            "SELECT seq, time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms
             FROM dispatch_log WHERE seq IN (SELECT seq FROM audit_outbox ORDER BY seq LIMIT $1)",
            &[&limit],
        )?
        .iter()
        .map(log_record)
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    Ok(pair(rows, records))
}

pub(super) fn delete(store: &PostgresStore, seqs: &[i64]) -> Result<(), StoreError> {
    if seqs.is_empty() {
        return Ok(());
    }
    store.conn()?.execute(
        "DELETE FROM audit_outbox WHERE seq = ANY($1::int8[])",
        &[&seqs],
    )?;
    Ok(())
}

pub(super) fn backlog(store: &PostgresStore) -> Result<u64, StoreError> {
    let row = store
        .conn()?
        .query_one("SELECT count(*) FROM audit_outbox", &[])?;
    Ok(row.try_get::<_, i64>(0)? as u64)
}
