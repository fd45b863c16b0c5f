//! Propensity counts on SQLite (`crate::propensity`).

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use super::ms;
use crate::propensity::PropensityCount;
use crate::store::StoreError;

/// `?4` sends of (journey, step, channel): in `settle_steps`' transaction,
/// once per key and group (an upsert per send cost a tenth of a settle).
pub(super) const COUNT_SENDS: &str =
    "INSERT INTO propensity_counts (journey, step, channel, sends, conversions) VALUES (?1, ?2, ?3, ?4, 0)
     ON CONFLICT (journey, step, channel) DO UPDATE SET sends = sends + excluded.sends";

/// A settle group's sends by (journey, step, channel). A group holds few
/// distinct keys, so a linear search beats hashing.
#[derive(Default)]
pub(super) struct SendTally<'a>(Vec<(&'a str, &'a str, &'a str, i64)>);

impl<'a> SendTally<'a> {
    pub(super) fn add(&mut self, journey: &'a str, step: &'a str, channel: &'a str) {
        match self
            .0
            .iter_mut()
            .find(|(j, s, c, _)| *j == journey && *s == step && *c == channel)
        {
            Some(entry) => entry.3 += 1,
            None => self.0.push((journey, step, channel, 1)),
        }
    }

    pub(super) fn write(&self, conn: &Connection) -> Result<(), StoreError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut stmt = conn.prepare_cached(COUNT_SENDS)?;
        for (journey, step, channel, n) in &self.0 {
            stmt.execute(params![journey, step, channel, n])?;
        }
        Ok(())
    }
}

pub(super) fn counts(
    conn: &Connection,
    journey: Option<&str>,
) -> Result<Vec<PropensityCount>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT journey, step, channel, sends, conversions FROM propensity_counts
         WHERE ?1 IS NULL OR journey = ?1 ORDER BY journey, step, channel",
    )?;
    let rows = stmt
        .query_map([journey], |r| {
            Ok(PropensityCount {
                journey: r.get(0)?,
                step: r.get(1)?,
                channel: r.get(2)?,
                sends: r.get::<_, i64>(3)?.max(0) as u64,
                conversions: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Through the dispatch log: the channel a step went out on (a fallback's).
pub(super) fn credit(
    conn: &Connection,
    instance_id: &str,
    sent_since: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached(
            "INSERT INTO propensity_counts (journey, step, channel, sends, conversions)
             SELECT journey, step, channel, 0, 1 FROM dispatch_log
             WHERE instance = ?1 AND outcome = 'sent' AND time >= ?2 AND time <= ?3
             GROUP BY journey, step, channel
             ON CONFLICT (journey, step, channel) DO UPDATE SET conversions = conversions + 1",
        )?
        .execute(params![instance_id, ms(sent_since), ms(at)])?)
}
