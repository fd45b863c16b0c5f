//! Reads: a batch's customers and histories in one statement per kind,
//! whatever the batch size (keys bound as one array), and the dispatch log.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use postgres::Row;

use super::conn::PgConn;
use crate::context::{CustomerContext, JourneySummary, RecentSend};
use crate::model::{HistoryEntry, LogRecord};
use crate::store::StoreError;

// The reads below find each row through its key by a lateral subquery per
// key (`OFFSET 0` keeps it one, not a join): planned as joins, they were
// planned from statistics, which a new store's tables do not have yet or
// have from when they were empty: once analyzed, the 256 contexts of a
// batch were hashed from a sequential scan of all customers (8 ms on 20 k),
// and the histories walked the whole dispatch log in `seq` order.

/// Customers' stored contexts (`$1`: ids), one row per id in order, NULL when none.
pub(super) const CUSTOMER_CONTEXTS: &str = "/* plan: generic */ SELECT c.context::text
     FROM unnest($1::text[]) WITH ORDINALITY AS u(id, ord)
     LEFT JOIN LATERAL (SELECT context FROM customers WHERE id = u.id OFFSET 0) AS c ON true
     ORDER BY u.ord";

/// The latest 100 journeys of each customer of `$1`.
pub(super) const JOURNEYS: &str =
    "/* plan: generic */ SELECT u.id, i.journey, i.key, i.status, i.started_at, i.ended_at, i.mode
     FROM unnest($1::text[]) AS u(id)
     CROSS JOIN LATERAL (
         SELECT journey, key, status, started_at, ended_at, mode FROM instances
         WHERE customer = u.id ORDER BY started_at DESC LIMIT 100) AS i";

/// Sends to the customers `$1` since `$2`, through `dispatch_log_customer`
/// (customer, time): the `outcome` test is a `CASE` and the time's a row
/// comparison led by the customer, which only that index matches, because
/// with a new store's statistics the planner took the review's
/// `dispatch_log_outcome` (every send in the window, per customer: 74 ms
/// for 256 customers with 3 k sends logged).
pub(super) const RECENT_SENDS: &str = "/* plan: generic */ SELECT d.customer, d.time, d.journey, d.channel,
         coalesce(i.category, 'service')
     FROM unnest($1::text[]) AS u(id)
     CROSS JOIN LATERAL (
         SELECT customer, time, journey, channel, instance FROM dispatch_log
         WHERE customer = u.id AND (customer, time) >= (u.id, $2)
           AND CASE WHEN outcome = 'sent' THEN true END
         OFFSET 0) AS d
     LEFT JOIN LATERAL (SELECT category FROM instances WHERE id = d.instance OFFSET 0) AS i ON true";

/// Steps of the customers `$1` whose send began at or after `$2` and whose
/// result is not recorded (the partial index holds only those).
pub(super) const POSSIBLY_SENT: &str =
    "/* plan: generic */ SELECT s.customer, s.id, s.sending_at, i.journey, s.channel, i.category
     FROM steps AS s
     CROSS JOIN LATERAL (SELECT journey, category FROM instances WHERE id = s.instance_id OFFSET 0) AS i
     WHERE s.customer = ANY($1::text[]) AND s.sending_at IS NOT NULL AND s.sending_at >= $2
       AND s.status IN ('pending', 'claimed')";

/// Sent steps of the instances `$1`, in log order.
pub(super) const HISTORIES: &str =
    "/* plan: generic */ SELECT d.instance, d.step, d.channel, d.template, d.time
     FROM unnest($1::text[]) AS u(id)
     CROSS JOIN LATERAL (
         SELECT seq, instance, step, channel, template, time FROM dispatch_log
         WHERE instance = u.id AND outcome = 'sent' OFFSET 0) AS d
     ORDER BY d.seq";

/// A send from the columns `at`, then journey, channel and category.
fn recent_send(r: &Row, at: usize) -> Result<RecentSend, StoreError> {
    Ok(RecentSend {
        at: r.try_get(at)?,
        journey: r.try_get(at + 1)?,
        channel: r
            .try_get::<_, &str>(at + 2)?
            .parse()
            .map_err(StoreError::Corrupt)?,
        category: r
            .try_get::<_, &str>(at + 3)?
            .parse()
            .map_err(StoreError::Corrupt)?,
    })
}

/// Where each distinct key occurs in `keys` (a key may be asked for twice).
fn positions(keys: &[String]) -> HashMap<&str, Vec<usize>> {
    let mut at: HashMap<&str, Vec<usize>> = HashMap::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        at.entry(k.as_str()).or_default().push(i);
    }
    at
}

/// The contexts of `ids`, in order: sends since `sends_since` and the
/// journeys only when asked for.
pub(super) fn customers(
    conn: &mut PgConn,
    ids: &[String],
    sends_since: Option<DateTime<Utc>>,
    journeys: bool,
) -> Result<Vec<CustomerContext>, StoreError> {
    let rows = conn.query(CUSTOMER_CONTEXTS, &[&ids])?;
    if rows.len() != ids.len() {
        return Err(StoreError::Corrupt("customer rows missing".into()));
    }
    let mut out = Vec::with_capacity(ids.len());
    for (id, r) in ids.iter().zip(&rows) {
        let mut customer = match r.try_get::<_, Option<&str>>(0)? {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))?
            }
            None => CustomerContext::new(id),
        };
        customer.id.clone_from(id);
        out.push(customer);
    }
    if !journeys && sends_since.is_none() {
        return Ok(out);
    }
    let position = positions(ids);
    let distinct: Vec<&str> = position.keys().copied().collect();
    if journeys {
        for r in conn.query(JOURNEYS, &[&distinct])? {
            let summary = JourneySummary {
                journey: r.try_get(1)?,
                key: r.try_get(2)?,
                status: r
                    .try_get::<_, &str>(3)?
                    .parse()
                    .map_err(StoreError::Corrupt)?,
                started_at: r.try_get(4)?,
                ended_at: r.try_get(5)?,
                mode: r
                    .try_get::<_, &str>(6)?
                    .parse()
                    .map_err(StoreError::Corrupt)?,
            };
            for &i in &position[r.try_get::<_, &str>(0)?] {
                out[i].journeys.push(summary.clone());
            }
        }
        for customer in &mut out {
            customer
                .journeys
                .sort_by_key(|j| std::cmp::Reverse(j.started_at));
        }
    }
    if let Some(window_start) = sends_since {
        for r in conn.query(RECENT_SENDS, &[&distinct, &window_start])? {
            let send = recent_send(&r, 1)?;
            for &i in &position[r.try_get::<_, &str>(0)?] {
                out[i].recent_sends.push(send.clone());
            }
        }
        for r in conn.query(POSSIBLY_SENT, &[&distinct, &window_start])? {
            let send = recent_send(&r, 2)?;
            for &i in &position[r.try_get::<_, &str>(0)?] {
                out[i].possibly_sent.push((r.try_get(1)?, send.clone()));
            }
        }
        for customer in &mut out {
            customer
                .recent_sends
                .sort_unstable_by_key(|s| std::cmp::Reverse(s.at));
        }
    }
    Ok(out)
}

/// The sent steps of each instance of `instance_ids`, in order, oldest first.
pub(super) fn histories(
    conn: &mut PgConn,
    instance_ids: &[String],
) -> Result<Vec<Vec<HistoryEntry>>, StoreError> {
    let position = positions(instance_ids);
    let distinct: Vec<&str> = position.keys().copied().collect();
    let mut out: Vec<Vec<HistoryEntry>> = vec![Vec::new(); instance_ids.len()];
    for r in conn.query(HISTORIES, &[&distinct])? {
        let entry = HistoryEntry {
            step: r.try_get(1)?,
            channel: r.try_get(2)?,
            template: r.try_get(3)?,
            sent_at: r
                .try_get::<_, DateTime<Utc>>(4)?
                .to_rfc3339_opts(SecondsFormat::Millis, true),
        };
        for &i in &position[r.try_get::<_, &str>(0)?] {
            out[i].push(entry.clone());
        }
    }
    Ok(out)
}

/// A dispatch-log row: seq, time, customer, journey, instance, step,
/// channel, template, outcome, reason, rule_hash, attempt, latency_ms,
/// event_id, http_status, response_ms.
pub(super) fn log_record(r: &Row) -> Result<LogRecord, StoreError> {
    Ok(LogRecord {
        seq: r.try_get(0)?,
        time: r.try_get(1)?,
        customer: r.try_get(2)?,
        journey: r.try_get(3)?,
        instance: r.try_get(4)?,
        step: r.try_get(5)?,
        channel: r.try_get(6)?,
        template: r.try_get(7)?,
        outcome: r
            .try_get::<_, &str>(8)?
            .parse()
            .map_err(StoreError::Corrupt)?,
        reason: r.try_get(9)?,
        rule_hash: r.try_get(10)?,
        attempt: r.try_get::<_, i32>(11)? as u32,
        latency_ms: r.try_get::<_, Option<i64>>(12)?.map(|v| v as u64),
        event_id: r.try_get(13)?,
        http_status: r.try_get::<_, Option<i32>>(14)?.map(|v| v as u16),
        response_ms: r.try_get::<_, Option<i64>>(15)?.map(|v| v as u64),
    })
}
