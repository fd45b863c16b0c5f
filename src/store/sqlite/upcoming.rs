//! Arbitration's look-ahead on SQLite: the customers' pending steps due soon.

use chrono::{DateTime, Utc};
use rusqlite::Connection;

use super::batch::text_array;
use super::{from_ms, ms, text};
use crate::model::{DueStep, Variables};
use crate::store::StoreError;

/// Through `instances_by_customer`, then each instance's steps by key.
const UPCOMING: &str =
    "SELECT s.rowid, s.instance_id, s.step, s.template, s.condition, s.planned_at,
        s.due_at, s.attempt, i.customer, i.journey, i.mode, i.category, i.rule_hash, i.vars,
        i.status, s.channel
     FROM rarray(?1) AS a
     JOIN instances AS i ON i.customer = a.value AND i.status = 'open'
     JOIN steps AS s ON s.instance_id = i.id
     WHERE s.status = 'pending' AND s.due_at <= ?2
     ORDER BY s.due_at, s.rowid";

pub(super) fn upcoming_steps(
    conn: &Connection,
    customers: &[String],
    until: DateTime<Utc>,
) -> Result<Vec<DueStep>, StoreError> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let ids = text_array(customers.iter().map(String::as_str));
    let mut stmt = conn.prepare_cached(UPCOMING)?;
    let mut rows = stmt.query(rusqlite::params![ids, ms(until)])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(DueStep {
            row: r.get(0)?,
            instance_id: r.get(1)?,
            step: r.get(2)?,
            template: r.get(3)?,
            condition: r.get(4)?,
            planned_at: from_ms(r.get(5)?),
            due_at: from_ms(r.get(6)?),
            attempt: r.get(7)?,
            customer: r.get(8)?,
            journey: r.get(9)?,
            mode: text(r, 10)?.parse().map_err(StoreError::Corrupt)?,
            category: text(r, 11)?.parse().map_err(StoreError::Corrupt)?,
            rule_hash: r.get(12)?,
            vars: Variables::from_json(r.get(13)?)
                .map_err(|e| StoreError::Corrupt(format!("instance vars: {e}")))?,
            instance_status: text(r, 14)?.parse().map_err(StoreError::Corrupt)?,
            channel: text(r, 15)?.parse().map_err(StoreError::Corrupt)?,
            // Only pending steps are looked ahead at.
            begun_before: false,
        });
    }
    Ok(out)
}
