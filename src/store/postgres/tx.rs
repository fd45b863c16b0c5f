//! The write transaction of the decide stage: one batch of events' effects
//! and the offsets that produced them, committed together.
//!
//! READ COMMITTED: one customer's events are decided by the one replica
//! that holds the customer's Kafka partition, and the unique keys (one open
//! instance per key, deterministic instance ids, processed event ids) turn
//! the overlap of a rebalance into a unique violation, which is transient:
//! the batch is retried and then finds the events processed.

use chrono::{DateTime, Utc};
use r2d2::PooledConnection;

use super::conn::Manager;
use super::read;
use crate::context::CustomerContext;
use crate::model::{InstanceStatus, LogRecord};
use crate::store::{ClosedStep, DeadLetter, InstanceRef, NewInstance, NewStep, StoreError, Tx};

/// A transaction on a pooled connection, rolled back when dropped open.
/// After a failed statement PostgreSQL ignores the rest of the transaction
/// (and would answer COMMIT with a rollback): `commit` then fails instead.
pub(super) struct Begun {
    pub(super) conn: PooledConnection<Manager>,
    open: bool,
    failed: bool,
}

impl Begun {
    pub(super) fn new(mut conn: PooledConnection<Manager>) -> Result<Self, StoreError> {
        conn.client.batch_execute("BEGIN")?;
        Ok(Self {
            conn,
            open: true,
            failed: false,
        })
    }

    /// Runs `work`, remembering whether it failed.
    pub(super) fn run<T>(
        &mut self,
        work: impl FnOnce(&mut super::conn::PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = work(&mut self.conn);
        self.failed |= result.is_err();
        result
    }

    pub(super) fn commit(mut self) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Aborted);
        }
        self.open = false;
        self.conn.client.batch_execute("COMMIT")?;
        Ok(())
    }
}

impl Drop for Begun {
    fn drop(&mut self) {
        if self.open && self.conn.client.batch_execute("ROLLBACK").is_err() {
            // The connection is unusable: the pool drops it (`has_broken`).
            let _ = self.conn.client.simple_query("");
        }
    }
}

pub(super) struct PgTx {
    pub(super) tx: Begun,
}

const OPEN_INSTANCE: &str = "SELECT id, rule_hash FROM instances
     WHERE customer = $1 AND journey = $2 AND key = $3 AND status = 'open'";

/// An instance and its steps in one statement (one round trip), whatever
/// the number of steps: one array per column.
const INSERT_INSTANCE: &str = "WITH instance AS (
         INSERT INTO instances (id, customer, journey, key, status, mode, category, started_at, rule_hash, trigger_event, vars, decision_inputs)
         VALUES ($1, $2, $3, $4, 'open', $5, $6, $7, $8, $9, $10::text::jsonb, $11::text::jsonb))
     INSERT INTO steps (instance_id, customer, step, seq, channel, template, condition, planned_at, due_at, status)
     SELECT $1, $2, u.step, u.seq, u.channel, u.template, u.condition, u.due_at, u.due_at, 'pending'
     FROM unnest($12::text[], $13::int4[], $14::text[], $15::text[], $16::text[], $17::timestamptz[])
         AS u(step, seq, channel, template, condition, due_at)";

pub(super) const INSERT_LOG: &str = "INSERT INTO dispatch_log (time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

fn instance_ref(row: Option<postgres::Row>) -> Result<Option<InstanceRef>, StoreError> {
    row.map(|r| {
        Ok(InstanceRef {
            id: r.try_get(0)?,
            rule_hash: r.try_get(1)?,
        })
    })
    .transpose()
}

impl Tx for PgTx {
    fn already_processed(&mut self, event_id: &str) -> Result<bool, StoreError> {
        self.tx.run(|c| {
            Ok(
                c.query_opt("SELECT 1 FROM processed_events WHERE id = $1", &[&event_id])?
                    .is_some(),
            )
        })
    }

    fn mark_processed(&mut self, event_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.tx.run(|c| {
            c.execute(
                "INSERT INTO processed_events (id, at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                &[&event_id, &at],
            )?;
            Ok(())
        })
    }

    fn customer(
        &mut self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError> {
        self.tx.run(|c| {
            let mut one = read::customers(c, &[id.to_owned()], Some(window_start), true)?;
            Ok(one.pop().expect("one context per id"))
        })
    }

    fn save_customer(
        &mut self,
        customer: &CustomerContext,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.run(|c| {
            let text =
                serde_json::to_string(customer).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            c.execute(
                "INSERT INTO customers (id, context, updated_at) VALUES ($1, $2::text::jsonb, $3)
                 ON CONFLICT (id) DO UPDATE SET context = excluded.context, updated_at = excluded.updated_at",
                &[&customer.id, &text, &at],
            )?;
            Ok(())
        })
    }

    fn open_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
    ) -> Result<Option<InstanceRef>, StoreError> {
        self.tx
            .run(|c| instance_ref(c.query_opt(OPEN_INSTANCE, &[&customer, &journey, &key])?))
    }

    fn exitable_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
        completed_since: DateTime<Utc>,
    ) -> Result<Option<InstanceRef>, StoreError> {
        self.tx.run(|c| {
            if let Some(open) =
                instance_ref(c.query_opt(OPEN_INSTANCE, &[&customer, &journey, &key])?)?
            {
                return Ok(Some(open));
            }
            instance_ref(c.query_opt(
                "SELECT id, rule_hash FROM instances
                 WHERE customer = $1 AND journey = $2 AND key = $3 AND status = 'completed' AND ended_at >= $4
                 ORDER BY ended_at DESC LIMIT 1",
                &[&customer, &journey, &key, &completed_since],
            )?)
        })
    }

    fn start_instance(&mut self, i: &NewInstance, steps: &[NewStep]) -> Result<(), StoreError> {
        self.tx.run(|c| {
            let category = i.category.to_string();
            let vars =
                serde_json::to_string(&i.vars).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let inputs = i.decision_inputs.to_string();
            let names: Vec<&str> = steps.iter().map(|s| s.step.as_str()).collect();
            let seqs: Vec<i32> = steps.iter().map(|s| s.seq as i32).collect();
            let channels: Vec<&str> = steps.iter().map(|s| s.channel.as_str()).collect();
            let templates: Vec<&str> = steps.iter().map(|s| s.template.as_str()).collect();
            let conditions: Vec<Option<&str>> =
                steps.iter().map(|s| s.condition.as_deref()).collect();
            let due: Vec<DateTime<Utc>> = steps.iter().map(|s| s.due_at).collect();
            c.execute(
                INSERT_INSTANCE,
                &[
                    &i.id,
                    &i.customer,
                    &i.journey,
                    &i.key,
                    &i.mode.as_str(),
                    &category,
                    &i.started_at,
                    &i.rule_hash,
                    &i.trigger_event,
                    &vars,
                    &inputs,
                    &names,
                    &seqs,
                    &channels,
                    &templates,
                    &conditions,
                    &due,
                ],
            )?;
            Ok(())
        })
    }

    fn close_instance(
        &mut self,
        instance_id: &str,
        status: InstanceStatus,
        at: DateTime<Utc>,
    ) -> Result<Vec<ClosedStep>, StoreError> {
        self.tx.run(|c| {
            c.execute(
                "UPDATE instances SET status = $2, ended_at = $3 WHERE id = $1 AND status IN ('open', 'completed')",
                &[&instance_id, &status.as_str(), &at],
            )?;
            let rows = c.query(
                "UPDATE steps SET status = 'cancelled', lease_until = NULL, holder = NULL
                 WHERE instance_id = $1 AND status = 'pending'
                 RETURNING seq, step, channel, template",
                &[&instance_id],
            )?;
            let mut closed = Vec::with_capacity(rows.len());
            for r in rows {
                closed.push((
                    r.try_get::<_, i32>(0)?,
                    ClosedStep {
                        step: r.try_get(1)?,
                        channel: r
                            .try_get::<_, &str>(2)?
                            .parse()
                            .map_err(StoreError::Corrupt)?,
                        template: r.try_get(3)?,
                    },
                ));
            }
            closed.sort_by_key(|(seq, _)| *seq);
            Ok(closed.into_iter().map(|(_, s)| s).collect())
        })
    }

    fn append_log(&mut self, r: &LogRecord) -> Result<(), StoreError> {
        self.tx.run(|c| {
            c.execute(
                INSERT_LOG,
                &[
                    &r.time,
                    &r.customer,
                    &r.journey,
                    &r.instance,
                    &r.step,
                    &r.channel,
                    &r.template,
                    &r.outcome.as_str(),
                    &r.reason,
                    &r.rule_hash,
                    &(r.attempt as i32),
                    &r.latency_ms.map(|l| l as i64),
                    &r.event_id,
                ],
            )?;
            Ok(())
        })
    }

    fn set_offset(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        self.tx.run(|c| {
            c.execute(
                "INSERT INTO kafka_offsets (topic, partition, next_offset) VALUES ($1, $2, $3)
                 ON CONFLICT (topic, partition) DO UPDATE
                 SET next_offset = GREATEST(kafka_offsets.next_offset, excluded.next_offset)",
                &[&topic, &partition, &next_offset],
            )?;
            Ok(())
        })
    }

    fn add_dead_letter(&mut self, l: &DeadLetter, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.tx.run(|c| {
            c.execute(
                "INSERT INTO dead_letters (topic, partition, record_offset, key, payload, reason, journey, event_id, created_at, headers)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::jsonb)",
                &[
                    &l.topic,
                    &l.partition,
                    &l.offset,
                    &l.key,
                    &l.payload,
                    &l.reason,
                    &l.journey,
                    &l.event_id,
                    &at,
                    &crate::store::dead_letters::encode_headers(&l.headers),
                ],
            )?;
            Ok(())
        })
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit()
    }
}
