//! Arbitration's look-ahead on PostgreSQL: the customers' pending steps due soon.

use chrono::{DateTime, Utc};

use super::conn::PgConn;
use super::due_step;
use crate::model::{ChannelKind, DueStep};
use crate::store::StoreError;

/// Columns as [`due_step`] reads them, then the channel. Found through the
/// index of the customers' unsettled steps (a step carries its instance's
/// customer), not through all their instances.
const UPCOMING: &str = "SELECT s.id, s.instance_id, s.step, s.template, s.condition, s.planned_at,
        s.due_at, s.attempt, i.customer, i.journey, i.mode, i.category, i.rule_hash, i.vars::text,
        i.status, s.channel
     FROM steps AS s JOIN instances AS i ON i.id = s.instance_id
     WHERE s.customer = ANY($1::text[]) AND s.status = 'pending' AND s.due_at <= $2
       AND i.status = 'open'
     ORDER BY s.due_at, s.id";

pub(super) fn upcoming_steps(
    conn: &mut PgConn,
    customers: &[String],
    until: DateTime<Utc>,
) -> Result<Vec<DueStep>, StoreError> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let rows = conn.query(UPCOMING, &[&customers, &until])?;
    rows.iter()
        .map(|r| {
            let channel: ChannelKind = r
                .try_get::<_, &str>(15)?
                .parse()
                .map_err(StoreError::Corrupt)?;
            due_step(channel, r)
        })
        .collect()
}
