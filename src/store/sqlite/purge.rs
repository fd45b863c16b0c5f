//! Retention: old ended journeys, log records, event ids, received events and published dead
//! letters, deleted in chunks so the write lock is held for milliseconds.

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};

use super::{ms, SqliteStore};
use crate::store::StoreError;

/// Rows deleted per purge transaction: the write lock is released between
/// chunks, so ingest and sending wait milliseconds, not the whole purge.
pub(super) const PURGE_CHUNK: usize = 2_000;

/// The last instance id of the next purge chunk (`?1` exclusive start).
pub(super) const PURGE_INSTANCES_CHUNK_END: &str =
    "SELECT id FROM instances WHERE id > ?1 ORDER BY id LIMIT 1 OFFSET ?2";
/// Ended, old instances with ids in (`?1`, `?2`]: their steps, then them.
pub(super) const PURGE_INSTANCES: (&str, &str) = (
    "DELETE FROM steps WHERE instance_id IN (SELECT id FROM instances WHERE id > ?1 AND id <= ?2 AND status <> 'open' AND ended_at < ?3)",
    "DELETE FROM instances WHERE id > ?1 AND id <= ?2 AND status <> 'open' AND ended_at < ?3",
);
/// The same for every id after `?1` (`?2` unused): the last, partial chunk.
pub(super) const PURGE_INSTANCES_TAIL: (&str, &str) = (
    "DELETE FROM steps WHERE instance_id IN (SELECT id FROM instances WHERE id > ?1 AND ?2 = ?2 AND status <> 'open' AND ended_at < ?3)",
    "DELETE FROM instances WHERE id > ?1 AND ?2 = ?2 AND status <> 'open' AND ended_at < ?3",
);

/// Purges of the append-only tables, a chunk at a time. The dispatch log is
/// written in time order, so its oldest rows come first by `seq` (no index
/// on `time` to maintain for every send); a chunk that reaches a row newer
/// than the cutoff ends the purge.
pub(super) const PURGE_BY_AGE: [&str; 4] = [
    "DELETE FROM dispatch_log WHERE seq IN (SELECT seq FROM dispatch_log ORDER BY seq LIMIT ?2) AND time < ?1",
    "DELETE FROM received_events WHERE id IN (SELECT id FROM received_events ORDER BY id LIMIT ?2) AND received_at < ?1",
    "DELETE FROM processed_events WHERE id IN (SELECT id FROM processed_events WHERE at < ?1 LIMIT ?2)",
    "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE published_at < ?1 LIMIT ?2)",
];

/// Deletes, a chunk per transaction, what is older than `before` and no
/// longer needed (see [`Store::purge`](crate::store::Store::purge)).
pub(super) fn purge(store: &SqliteStore, before: DateTime<Utc>) -> Result<u64, StoreError> {
    // Not during a fold of the review counts (`review::fold`): a record it
    // read must not be deleted before its counts are in.
    let _no_fold = store.upkeep();
    let cutoff = ms(before);
    let mut deleted = 0u64;
    // Ended instances with their steps: the table is walked in key order a
    // chunk at a time, so the lock is held for milliseconds. (An index on
    // `ended_at` would avoid the walk but cost every finished journey an
    // index write: 15 % of the sending rate, measured.)
    let mut after = String::new();
    loop {
        let mut conn = store.conn();
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
            let n = store.conn().execute(sql, params![cutoff, PURGE_CHUNK])?;
            deleted += n as u64;
            if n < PURGE_CHUNK {
                break;
            }
        }
    }
    Ok(deleted)
}
