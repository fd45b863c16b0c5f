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

/// A conversion to credit at commit: the steps of `instance_id` sent at or
/// after `sent_since` and not after `at`.
pub(super) struct Credit {
    pub instance_id: String,
    pub sent_since: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

/// How many (journey, step, channel) a conversion credits. A read, which
/// takes no lock: the counters are written at commit.
pub(super) fn creditable(
    c: &mut PgConn,
    instance_id: &str,
    sent_since: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let row = c.query_one(
        "SELECT count(*) FROM (SELECT DISTINCT journey, step, channel FROM dispatch_log
             WHERE instance = $1 AND outcome = 'sent' AND time >= $2 AND time <= $3) AS k",
        &[&instance_id, &sent_since, &at],
    )?;
    Ok(row.try_get::<_, i64>(0)?.max(0) as usize)
}

/// Credits a batch's conversions, through the dispatch log (the channel a
/// step went out on, a fallback's): one per instance and (journey, step,
/// channel). One statement at the end of the batch, its counters taken in
/// key order, as the settle takes them: a decide batch that credited as
/// it went held each counter's lock while it went on to cancel steps, and
/// a replica settling those steps then waited for a counter it already
/// held the next of (deadlock, 40P01, seen with three replicas).
pub(super) fn credit_all(c: &mut PgConn, credits: &[Credit]) -> Result<(), StoreError> {
    let ids: Vec<&str> = credits.iter().map(|k| k.instance_id.as_str()).collect();
    let since: Vec<DateTime<Utc>> = credits.iter().map(|k| k.sent_since).collect();
    let at: Vec<DateTime<Utc>> = credits.iter().map(|k| k.at).collect();
    c.execute(
        "INSERT INTO propensity_counts (journey, step, channel, sends, conversions)
         SELECT d.journey, d.step, d.channel, 0, count(DISTINCT u.instance)
         FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS u(instance, since, at)
         CROSS JOIN LATERAL (
             SELECT journey, step, channel FROM dispatch_log
             WHERE instance = u.instance AND outcome = 'sent' AND time >= u.since AND time <= u.at
             OFFSET 0) AS d
         GROUP BY d.journey, d.step, d.channel ORDER BY d.journey, d.step, d.channel
         ON CONFLICT (journey, step, channel)
         DO UPDATE SET conversions = propensity_counts.conversions + EXCLUDED.conversions",
        &[&ids, &since, &at],
    )?;
    Ok(())
}
