//! Arbitration's look-ahead on PostgreSQL: the customers' pending steps due soon.

use chrono::{DateTime, Utc};

use super::conn::PgConn;
use super::due_step;
use crate::model::{ChannelKind, DueStep};
use crate::store::StoreError;

/// Columns as [`due_step`] reads them, then the channel. Found through the
/// index of the customers' unsettled steps (a step carries its instance's
/// customer), not through all their instances: a lateral probe per customer
/// and per step's instance (`OFFSET 0`), whatever the statistics say (the
/// exact status tests are `CASE`s, which match no partial index: with small
/// tables' statistics the planner walked `steps_pending` or
/// `instances_one_open` whole per customer or step otherwise). As
/// `customer = ANY($1)` and a join, each run was planned anew over the 256
/// bound customers and every index that could serve (1.7 ms of planning for
/// 0.8 ms of work; a sixth of the database's time in the dispatch bench).
pub(super) const UPCOMING: &str =
    "/* plan: generic */ SELECT s.id, s.instance_id, s.step, s.template, s.condition, s.planned_at,
        s.due_at, s.attempt, i.customer, i.journey, i.mode, i.category, i.rule_hash, i.vars::text,
        i.status, s.channel
     FROM unnest($1::text[]) AS u(customer)
     CROSS JOIN LATERAL (
         SELECT id, instance_id, step, template, condition, planned_at, due_at, attempt, channel
         FROM steps
         WHERE customer = u.customer AND status IN ('pending', 'claimed')
           AND CASE WHEN status = 'pending' AND due_at <= $2 THEN true END
         OFFSET 0) AS s
     CROSS JOIN LATERAL (
         SELECT customer, journey, mode, category, rule_hash, vars, status
         FROM instances WHERE id = s.instance_id AND CASE WHEN status = 'open' THEN true END
         OFFSET 0) AS i
     ORDER BY s.due_at, s.id";

pub(super) fn upcoming_steps(
    conn: &mut PgConn,
    customers: &[String],
    until: DateTime<Utc>,
) -> Result<Vec<DueStep>, StoreError> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    // Each customer once: the statement reads per customer bound.
    let mut distinct: Vec<&str> = customers.iter().map(String::as_str).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let rows = conn.query(UPCOMING, &[&distinct, &until])?;
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
