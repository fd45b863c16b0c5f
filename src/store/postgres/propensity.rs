//! Propensity counts on PostgreSQL (`crate::propensity`). The counters are
//! rows every replica's settles update (sends are counted inside `SETTLE`,
//! in `mod.rs`), each connection in the slot of its backend (schema v12,
//! [`SLOT`]), so that concurrent settles rarely wait for each other; the
//! reads sum the slots. Each statement takes its rows in key order, so two
//! transactions that do meet wait for each other rather than deadlock.

/// The slot of the counts a connection writes (spelled out in `SETTLE` and
/// [`CREDIT`]; a test checks they use it).
#[cfg(test)]
pub(super) const SLOT: &str = "(pg_backend_pid() % 32)::int2";

use chrono::{DateTime, Utc};

use super::conn::PgConn;
use crate::propensity::PropensityCount;
use crate::store::StoreError;

pub(super) fn counts(
    c: &mut PgConn,
    journey: Option<&str>,
) -> Result<Vec<PropensityCount>, StoreError> {
    c.query(
        "SELECT journey, step, channel, sum(sends)::int8, sum(conversions)::int8
         FROM propensity_counts
         WHERE $1::text IS NULL OR journey = $1
         GROUP BY journey, step, channel ORDER BY journey, step, channel",
        &[&journey],
    )?
    .iter()
    .map(|r| {
        Ok(PropensityCount {
            journey: r.try_get(0)?,
            step: r.try_get(1)?,
            channel: r.try_get(2)?,
            sends: r.try_get::<_, i64>(3)?.max(0) as u64,
            conversions: r.try_get::<_, i64>(4)?.max(0) as u64,
        })
    })
    .collect()
}

/// A conversion of instance `$1` credited to its sends between `$2` and
/// `$3`, in the connection's slot ([`SLOT`]).
pub(super) const CREDIT: &str =
    "INSERT INTO propensity_counts (journey, step, channel, slot, sends, conversions)
     SELECT journey, step, channel, (pg_backend_pid() % 32)::int2, 0, 1 FROM dispatch_log
     WHERE instance = $1 AND outcome = 'sent' AND time >= $2 AND time <= $3
     GROUP BY journey, step, channel ORDER BY journey, step, channel
     ON CONFLICT (journey, step, channel, slot)
     DO UPDATE SET conversions = propensity_counts.conversions + 1";

/// Through the dispatch log: the channel a step went out on (a fallback's).
pub(super) fn credit(
    c: &mut PgConn,
    instance_id: &str,
    sent_since: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Result<usize, StoreError> {
    Ok(c.execute(CREDIT, &[&instance_id, &sent_since, &at])? as usize)
}
