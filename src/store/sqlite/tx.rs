//! The write transaction of the decide stage: one batch of events' effects
//! and the offsets that produced them, committed together.

use std::sync::MutexGuard;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::{insert_log, load_customer_parts, ms, recent_sends_of};
use crate::context::{CustomerContext, RecentSend};
use crate::model::{withdrawn_step, ChannelKind, InstanceStatus, LogRecord, Mode, WITHDRAW_SUFFIX};
use crate::store::{ClosedStep, DeadLetter, InstanceRef, NewInstance, NewStep, StoreError, Tx};

pub(super) struct SqliteTx<'a> {
    pub(super) conn: MutexGuard<'a, Connection>,
    pub(super) open: bool,
    /// Each customer's sends in the policy window, read once a batch: the
    /// decide stage writes none, and a batch of many events for a customer
    /// with many sends read them all again per event (sends × events: a
    /// flood for one such customer stalled every other customer's ingest).
    pub(super) sends: std::collections::HashMap<String, (DateTime<Utc>, Vec<RecentSend>)>,
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl Tx for SqliteTx<'_> {
    fn already_processed(&mut self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM processed_events WHERE id = ?1")?
            .exists([event_id])?)
    }

    fn mark_processed(&mut self, event_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO processed_events (id, at) VALUES (?1, ?2)")?
            .execute(params![event_id, ms(at)])?;
        Ok(())
    }

    fn customer(
        &mut self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError> {
        let mut customer = load_customer_parts(&self.conn, id, None, true)?;
        match self.sends.get(id) {
            Some((since, sends)) if *since == window_start => {
                customer.recent_sends.clone_from(sends)
            }
            _ => {
                customer.recent_sends = recent_sends_of(&self.conn, id, window_start)?;
                self.sends
                    .insert(id.to_owned(), (window_start, customer.recent_sends.clone()));
            }
        }
        Ok(customer)
    }

    fn save_customer(
        &mut self,
        customer: &CustomerContext,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let text =
            serde_json::to_string(customer).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn
            .prepare_cached(
                "INSERT INTO customers (id, context, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET context = excluded.context, updated_at = excluded.updated_at",
            )?
            .execute(params![customer.id, text, ms(at)])?;
        Ok(())
    }

    fn open_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
    ) -> Result<Option<InstanceRef>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT id, rule_hash FROM instances WHERE customer = ?1 AND journey = ?2 AND key = ?3 AND status = 'open'",
            )?
            .query_row(params![customer, journey, key], |r| {
                Ok(InstanceRef {
                    id: r.get(0)?,
                    rule_hash: r.get(1)?,
                })
            })
            .optional()?)
    }

    fn instance_mode(&mut self, instance_id: &str) -> Result<Option<Mode>, StoreError> {
        let mode: Option<String> = self
            .conn
            .prepare_cached("SELECT mode FROM instances WHERE id = ?1")?
            .query_row([instance_id], |r| r.get(0))
            .optional()?;
        mode.map(|m| m.parse().map_err(StoreError::Corrupt))
            .transpose()
    }

    fn exitable_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
        completed_since: DateTime<Utc>,
    ) -> Result<Option<InstanceRef>, StoreError> {
        if let Some(open) = self.open_instance(customer, journey, key)? {
            return Ok(Some(open));
        }
        Ok(self
            .conn
            .prepare_cached(
                "SELECT id, rule_hash FROM instances
                 WHERE customer = ?1 AND journey = ?2 AND key = ?3 AND status = 'completed' AND ended_at >= ?4
                 ORDER BY ended_at DESC LIMIT 1",
            )?
            .query_row(params![customer, journey, key, ms(completed_since)], |r| {
                Ok(InstanceRef {
                    id: r.get(0)?,
                    rule_hash: r.get(1)?,
                })
            })
            .optional()?)
    }

    fn start_instance(&mut self, i: &NewInstance, steps: &[NewStep]) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO instances (id, customer, journey, key, status, mode, category, started_at, rule_hash, trigger_event, vars, decision_inputs)
                 VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                i.id,
                i.customer,
                i.journey,
                i.key,
                i.mode.as_str(),
                i.category.to_string(),
                ms(i.started_at),
                i.rule_hash,
                i.trigger_event,
                Value::Object(i.vars.clone()).to_string(),
                i.decision_inputs.to_string(),
            ])?;
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO steps (instance_id, step, seq, channel, template, condition, planned_at, due_at, status)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 'pending')",
        )?;
        for s in steps {
            stmt.execute(params![
                i.id,
                s.step,
                s.seq,
                s.channel.as_str(),
                s.template,
                s.condition,
                ms(s.due_at)
            ])?;
        }
        Ok(())
    }

    fn close_instance(
        &mut self,
        instance_id: &str,
        status: InstanceStatus,
        at: DateTime<Utc>,
    ) -> Result<Vec<ClosedStep>, StoreError> {
        let ended: Option<(String, String, String, String)> = self
            .conn
            .prepare_cached(
                "UPDATE instances SET status = ?2, ended_at = ?3 WHERE id = ?1 AND status IN ('open', 'completed')
                 RETURNING journey, mode, customer, rule_hash",
            )?
            .query_row(params![instance_id, status.as_str(), ms(at)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        if let (Some(arm), InstanceStatus::Converted) = (&ended, status) {
            for sql in super::schema::CONVERSION_COUNTS {
                self.conn
                    .prepare_cached(sql)?
                    .execute(params![arm.0, arm.1, arm.2, arm.3])?;
            }
        }
        let mut closed: Vec<(u32, String, String, String)> = self
            .conn
            .prepare_cached(
                "UPDATE steps SET status = 'cancelled', lease_until = NULL
                 WHERE instance_id = ?1 AND status = 'pending'
                 RETURNING seq, step, channel, template",
            )?
            .query_map([instance_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<_, _>>()?;
        closed.sort();
        closed
            .into_iter()
            .map(|(_, step, channel, template)| {
                Ok(ClosedStep {
                    step,
                    channel: channel.parse().map_err(StoreError::Corrupt)?,
                    template,
                })
            })
            .collect()
    }

    fn plan_withdrawals(
        &mut self,
        instance_id: &str,
        channels: &[ChannelKind],
        at: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        let channels: Vec<&str> = channels.iter().map(|c| c.as_str()).collect();
        let mut planned: Vec<(u32, String)> = self
            .conn
            .prepare_cached(
                "INSERT INTO steps (instance_id, step, seq, channel, template, planned_at, due_at, status)
                 SELECT s.instance_id, s.step || ?4, s.seq, d.channel, s.template, ?3, ?3, 'pending'
                 FROM steps AS s
                 JOIN dispatch_log AS d ON d.instance = s.instance_id AND d.step = s.step AND d.outcome = 'sent'
                 WHERE s.instance_id = ?1 AND s.status = 'sent' AND d.instance = ?1
                   AND instr(',' || ?2 || ',', ',' || d.channel || ',') > 0
                 UNION ALL
                 -- An attempt that timed out may have landed: found through
                 -- the customer's records (the instance index holds sends only).
                 SELECT s.instance_id, s.step || ?4, s.seq, d.channel, s.template, ?3, ?3, 'pending'
                 FROM steps AS s
                 JOIN instances AS i ON i.id = s.instance_id
                 JOIN dispatch_log AS d INDEXED BY dispatch_log_customer
                   ON d.customer = i.customer AND d.instance = s.instance_id AND d.step = s.step
                 WHERE s.instance_id = ?1 AND s.status <> 'sent' AND s.step NOT LIKE '%' || ?4
                   AND d.outcome IN ('retrying', 'failed') AND d.reason LIKE 'timed out%'
                   AND instr(',' || ?2 || ',', ',' || d.channel || ',') > 0
                 UNION ALL
                 -- A send begun by a worker that died (its claim handed
                 -- back, then cancelled by this exit) may have landed.
                 SELECT s.instance_id, s.step || ?4, s.seq, s.channel, s.template, ?3, ?3, 'pending'
                 FROM steps AS s
                 WHERE s.instance_id = ?1 AND s.status = 'cancelled' AND s.sending_at IS NOT NULL
                   AND s.step NOT LIKE '%' || ?4
                   AND instr(',' || ?2 || ',', ',' || s.channel || ',') > 0
                 ON CONFLICT (instance_id, step) DO NOTHING
                 RETURNING seq, step",
            )?
            .query_map(
                params![instance_id, channels.join(","), ms(at), WITHDRAW_SUFFIX],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect::<Result<_, _>>()?;
        planned.sort();
        Ok(planned
            .into_iter()
            .map(|(_, step)| withdrawn_step(&step).unwrap_or(&step).to_string())
            .collect())
    }

    fn append_log(&mut self, record: &LogRecord) -> Result<(), StoreError> {
        if record.outcome == crate::model::Outcome::Sent {
            self.sends.remove(&record.customer);
        }
        insert_log(&self.conn, record).map(|_| ())
    }

    fn set_offset(
        &mut self,
        topic: &str,
        partition: i32,
        expected: i64,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        let moved = self
            .conn
            .prepare_cached(
                "UPDATE kafka_offsets SET next_offset = ?4
                 WHERE topic = ?1 AND partition = ?2 AND next_offset = ?3",
            )?
            .execute(params![topic, partition, expected, next_offset])?;
        let inserted = if moved == 0 && expected == 0 {
            self.conn
                .prepare_cached(
                    "INSERT INTO kafka_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)
                     ON CONFLICT (topic, partition) DO NOTHING",
                )?
                .execute(params![topic, partition, next_offset])?
        } else {
            0
        };
        if moved + inserted == 1 {
            return Ok(());
        }
        let found = self
            .conn
            .prepare_cached(
                "SELECT next_offset FROM kafka_offsets WHERE topic = ?1 AND partition = ?2",
            )?
            .query_row(params![topic, partition], |r| r.get(0))
            .optional()?;
        Err(StoreError::OffsetMoved {
            topic: topic.to_owned(),
            partition,
            expected,
            found,
        })
    }

    fn add_dead_letter(&mut self, l: &DeadLetter, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO dead_letters (topic, partition, offset, key, payload, reason, journey, event_id, created_at, headers)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                l.topic,
                l.partition,
                l.offset,
                l.key,
                l.payload,
                l.reason,
                l.journey,
                l.event_id,
                ms(at),
                crate::store::dead_letters::encode_headers(&l.headers)
            ])?;
        Ok(())
    }

    fn record_event(
        &mut self,
        event: &crate::store::received::ReceivedEvent,
    ) -> Result<(), StoreError> {
        super::received::insert(&self.conn, event)
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT")?;
        self.open = false;
        Ok(())
    }

    fn credit_conversion(
        &mut self,
        instance_id: &str,
        sent_since: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        super::propensity::credit(&self.conn, instance_id, sent_since, at)
    }
}
