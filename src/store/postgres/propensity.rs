//! Propensity counts on PostgreSQL (`crate::propensity`). The counters are
//! rows every replica's settles update (sends are counted inside `SETTLE`,
//! in `mod.rs`): each statement takes its rows in key order, so two
//! transactions wait for each other rather than deadlock.

use chrono::{DateTime, Utc};

use super::conn::PgConn;
use crate::propensity::PropensityCount;
use crate::store::StoreError;

pub(super) fn counts(
    c: &mut PgConn,
    journey: Option<&str>,
) -> Result<Vec<PropensityCount>, StoreError> {
    c.query(
        "SELECT journey, step, channel, sends, conversions FROM propensity_counts
         WHERE $1::text IS NULL OR journey = $1 ORDER BY journey, step, channel",
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

/// Through the dispatch log: the channel a step went out on (a fallback's).
pub(super) fn credit(
    c: &mut PgConn,
    instance_id: &str,
    sent_since: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Result<usize, StoreError> {
    Ok(c.execute(
        "INSERT INTO propensity_counts (journey, step, channel, sends, conversions)
         SELECT journey, step, channel, 0, 1 FROM dispatch_log
         WHERE instance = $1 AND outcome = 'sent' AND time >= $2 AND time <= $3
         GROUP BY journey, step, channel ORDER BY journey, step, channel
         ON CONFLICT (journey, step, channel)
         DO UPDATE SET conversions = propensity_counts.conversions + 1",
        &[&instance_id, &sent_since, &at],
    )? as usize)
}
