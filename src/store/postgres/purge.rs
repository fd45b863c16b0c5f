//! Retention: old ended journeys, log records, event ids and published dead
//! letters, deleted a chunk per statement so that row locks are held
//! briefly. Every replica purges; `SKIP LOCKED` lets two purges (or a purge
//! and a writer) pass each other instead of queueing.

use chrono::{DateTime, Utc};

use super::PostgresStore;
use crate::store::StoreError;

/// Rows deleted per statement.
pub(super) const PURGE_CHUNK: i64 = 5_000;

/// A chunk of ended instances older than `$1` and their steps; returns
/// (instances, steps) deleted.
const PURGE_INSTANCES: &str = "WITH gone AS (
         DELETE FROM instances WHERE id IN (
             SELECT id FROM instances WHERE status <> 'open' AND ended_at < $1
             LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING id),
     steps_gone AS (
         DELETE FROM steps WHERE instance_id IN (SELECT id FROM gone) RETURNING 1)
     SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM steps_gone)";

/// The append-only tables, a chunk at a time. The dispatch log is written
/// in time order, so its oldest rows come first by `seq` (no index on
/// `time` to maintain for every send); a chunk that reaches a row newer
/// than the cutoff ends the purge.
const PURGE_BY_AGE: [&str; 4] = [
    "DELETE FROM dispatch_log WHERE seq IN (
         SELECT seq FROM dispatch_log ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)
       AND time < $1",
    "DELETE FROM received_events WHERE id IN (
         SELECT id FROM received_events ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
       AND received_at < $1",
    "DELETE FROM processed_events WHERE id IN (
         SELECT id FROM processed_events WHERE at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
    "DELETE FROM dead_letters WHERE id IN (
         SELECT id FROM dead_letters WHERE published_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
];

/// Deletes what is older than `before` and no longer needed (see
/// [`Store::purge`](crate::store::Store::purge)).
pub(super) fn purge(store: &PostgresStore, before: DateTime<Utc>) -> Result<u64, StoreError> {
    let mut c = store.conn()?;
    let mut deleted = 0u64;
    loop {
        let row = c.query_one(PURGE_INSTANCES, &[&before, &PURGE_CHUNK])?;
        let (instances, steps): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        deleted += (instances + steps) as u64;
        if instances < PURGE_CHUNK {
            break;
        }
    }
    for sql in PURGE_BY_AGE {
        loop {
            let n = c.execute(sql, &[&before, &PURGE_CHUNK])?;
            deleted += n;
            if n < PURGE_CHUNK as u64 {
                break;
            }
        }
    }
    // What the purge took off the review's counts, with what was written
    // since the last fold (schema v11), so deltas do not pile up.
    super::review::fold(&mut c.client)?;
    // Customer leases of replicas that died long ago (housekeeping, not counted).
    c.execute(
        "DELETE FROM customer_claims WHERE lease_until < $1",
        &[&before],
    )?;
    Ok(deleted)
}
