//! A decide batch's writes, held until the transaction next reads or
//! commits, then written with one `UNNEST` statement per table: a round
//! trip costs 50-100 µs here, and a batch of a thousand events otherwise
//! pays two or three of them per event.
//!
//! Held writes are invisible to the database, so [`PgTx`](super::tx::PgTx)
//! flushes them before any statement that could read them; what its own
//! reads serve from the batch's prefetch is kept true to them there.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use super::conn::PgConn;
use crate::context::CustomerContext;
use crate::model::LogRecord;
use crate::store::{NewInstance, NewStep, ReceivedEvent, StoreError};

#[derive(Default)]
pub(super) struct Pending {
    /// Last context per customer (an upsert may touch a row only once per
    /// statement), with the position it was first saved at.
    customers: HashMap<String, (String, DateTime<Utc>)>,
    instances: Vec<InstanceRow>,
    steps: Vec<StepRow>,
    log: Vec<LogRecord>,
    /// Per partition: the offset expected in the store, and the next one.
    offsets: BTreeMap<(String, i32), (i64, i64)>,
    /// Received events of the decision record: nothing in the transaction
    /// reads them, so they wait for the commit ([`Pending::flush_received`])
    /// and never make a read flush.
    received: Vec<ReceivedEvent>,
}

struct InstanceRow {
    id: String,
    customer: String,
    journey: String,
    key: String,
    mode: &'static str,
    category: String,
    started_at: DateTime<Utc>,
    rule_hash: String,
    trigger_event: String,
    vars: String,
    decision_inputs: String,
}

struct StepRow {
    instance_id: String,
    customer: String,
    step: NewStep,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.customers.is_empty()
            && self.instances.is_empty()
            && self.log.is_empty()
            && self.offsets.is_empty()
    }

    pub(super) fn save_customer(
        &mut self,
        customer: &CustomerContext,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let text =
            serde_json::to_string(customer).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.customers.insert(customer.id.clone(), (text, at));
        Ok(())
    }

    pub(super) fn start_instance(
        &mut self,
        i: &NewInstance,
        steps: &[NewStep],
    ) -> Result<(), StoreError> {
        let vars =
            serde_json::to_string(&i.vars).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.instances.push(InstanceRow {
            id: i.id.clone(),
            customer: i.customer.clone(),
            journey: i.journey.clone(),
            key: i.key.clone(),
            mode: i.mode.as_str(),
            category: i.category.to_string(),
            started_at: i.started_at,
            rule_hash: i.rule_hash.clone(),
            trigger_event: i.trigger_event.clone(),
            vars,
            decision_inputs: i.decision_inputs.to_string(),
        });
        self.steps.extend(steps.iter().map(|s| StepRow {
            instance_id: i.id.clone(),
            customer: i.customer.clone(),
            step: s.clone(),
        }));
        Ok(())
    }

    pub(super) fn append_log(&mut self, record: &LogRecord) {
        self.log.push(record.clone());
    }

    /// A second move of one partition in the transaction starts where the
    /// first left it.
    pub(super) fn set_offset(
        &mut self,
        topic: &str,
        partition: i32,
        expected: i64,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        match self.offsets.get_mut(&(topic.to_owned(), partition)) {
            Some((_, next)) if *next == expected => *next = next_offset,
            Some((_, next)) => {
                return Err(StoreError::OffsetMoved {
                    topic: topic.to_owned(),
                    partition,
                    expected,
                    found: Some(*next),
                })
            }
            None => {
                self.offsets
                    .insert((topic.to_owned(), partition), (expected, next_offset));
            }
        }
        Ok(())
    }

    pub(super) fn record_event(&mut self, event: &ReceivedEvent) {
        self.received.push(event.clone());
    }

    /// Writes the received events held, in one statement (at commit).
    pub(super) fn flush_received(&mut self, c: &mut PgConn) -> Result<(), StoreError> {
        let rows = std::mem::take(&mut self.received);
        super::received::insert(c, &rows)
    }

    /// Writes everything held but the received events, one statement per
    /// table that has rows, and empties the buffers.
    pub(super) fn flush(&mut self, c: &mut PgConn) -> Result<(), StoreError> {
        if !self.customers.is_empty() {
            let customers = std::mem::take(&mut self.customers);
            let mut ids = Vec::with_capacity(customers.len());
            let mut contexts = Vec::with_capacity(customers.len());
            let mut ats = Vec::with_capacity(customers.len());
            for (id, (context, at)) in customers {
                ids.push(id);
                contexts.push(context);
                ats.push(at);
            }
            c.execute(
                "/* plan: generic */ INSERT INTO customers (id, context, updated_at)
                 SELECT u.id, u.context::jsonb, u.at
                 FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(id, context, at)
                 ON CONFLICT (id) DO UPDATE SET context = excluded.context, updated_at = excluded.updated_at",
                &[&ids, &contexts, &ats],
            )?;
        }
        if !self.instances.is_empty() {
            let rows = std::mem::take(&mut self.instances);
            let col = |f: fn(&InstanceRow) -> &str| -> Vec<&str> { rows.iter().map(f).collect() };
            let started: Vec<DateTime<Utc>> = rows.iter().map(|r| r.started_at).collect();
            c.execute(
                "/* plan: generic */ INSERT INTO instances (id, customer, journey, key, status, mode, category, started_at, rule_hash, trigger_event, vars, decision_inputs)
                 SELECT u.id, u.customer, u.journey, u.key, 'open', u.mode, u.category, u.started_at, u.rule_hash, u.trigger_event, u.vars::jsonb, u.inputs::jsonb
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::text[])
                     AS u(id, customer, journey, key, mode, category, started_at, rule_hash, trigger_event, vars, inputs)",
                &[
                    &col(|r| &r.id),
                    &col(|r| &r.customer),
                    &col(|r| &r.journey),
                    &col(|r| &r.key),
                    &col(|r| r.mode),
                    &col(|r| &r.category),
                    &started,
                    &col(|r| &r.rule_hash),
                    &col(|r| &r.trigger_event),
                    &col(|r| &r.vars),
                    &col(|r| &r.decision_inputs),
                ],
            )?;
        }
        if !self.steps.is_empty() {
            let rows = std::mem::take(&mut self.steps);
            let instance: Vec<&str> = rows.iter().map(|r| r.instance_id.as_str()).collect();
            let customer: Vec<&str> = rows.iter().map(|r| r.customer.as_str()).collect();
            let name: Vec<&str> = rows.iter().map(|r| r.step.step.as_str()).collect();
            let seq: Vec<i32> = rows.iter().map(|r| r.step.seq as i32).collect();
            let channel: Vec<&str> = rows.iter().map(|r| r.step.channel.as_str()).collect();
            let template: Vec<&str> = rows.iter().map(|r| r.step.template.as_str()).collect();
            let condition: Vec<Option<&str>> =
                rows.iter().map(|r| r.step.condition.as_deref()).collect();
            let due: Vec<DateTime<Utc>> = rows.iter().map(|r| r.step.due_at).collect();
            c.execute(
                "/* plan: generic */ INSERT INTO steps (instance_id, customer, step, seq, channel, template, condition, planned_at, due_at, status)
                 SELECT u.instance_id, u.customer, u.step, u.seq, u.channel, u.template, u.condition, u.due_at, u.due_at, 'pending'
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
                     AS u(instance_id, customer, step, seq, channel, template, condition, due_at)",
                &[&instance, &customer, &name, &seq, &channel, &template, &condition, &due],
            )?;
        }
        if !self.log.is_empty() {
            let rows = std::mem::take(&mut self.log);
            let records: Vec<&LogRecord> = rows.iter().collect();
            super::insert_logs(c, &records)?;
        }
        if !self.offsets.is_empty() {
            let offsets = std::mem::take(&mut self.offsets);
            move_offsets(c, &offsets)?;
        }
        Ok(())
    }
}

/// Moves each partition's offset from the one expected to the next, in one
/// statement: an update where the store holds the expected offset, an
/// insert where none is stored and none was expected (0). A partition
/// neither touched holds another offset: [`StoreError::OffsetMoved`].
/// Under READ COMMITTED a concurrent mover's update is waited for and the
/// condition checked again on its result, so two consumers cannot both move
/// one partition from the same offset.
fn move_offsets(
    c: &mut PgConn,
    offsets: &BTreeMap<(String, i32), (i64, i64)>,
) -> Result<(), StoreError> {
    let topics: Vec<&str> = offsets.keys().map(|(t, _)| t.as_str()).collect();
    let partitions: Vec<i32> = offsets.keys().map(|(_, p)| *p).collect();
    let expected: Vec<i64> = offsets.values().map(|(e, _)| *e).collect();
    let next: Vec<i64> = offsets.values().map(|(_, n)| *n).collect();
    let rows = c.query(
        "/* plan: generic */ WITH wanted AS (
             SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::int8[])
                 AS w(topic, partition, expected, next_offset)),
         moved AS (
             UPDATE kafka_offsets k SET next_offset = w.next_offset FROM wanted w
             WHERE k.topic = w.topic AND k.partition = w.partition AND k.next_offset = w.expected
             RETURNING k.topic, k.partition),
         fresh AS (
             INSERT INTO kafka_offsets (topic, partition, next_offset)
             SELECT topic, partition, next_offset FROM wanted WHERE expected = 0
             ON CONFLICT (topic, partition) DO NOTHING
             RETURNING topic, partition)
         SELECT topic, partition FROM moved UNION ALL SELECT topic, partition FROM fresh",
        &[&topics, &partitions, &expected, &next],
    )?;
    if rows.len() == offsets.len() {
        return Ok(());
    }
    let mut done = std::collections::BTreeSet::new();
    for r in rows {
        done.insert((r.try_get::<_, String>(0)?, r.try_get::<_, i32>(1)?));
    }
    let Some(((topic, partition), (expected, _))) =
        offsets.iter().find(|(key, _)| !done.contains(*key))
    else {
        return Ok(());
    };
    let found = c
        .query_opt(
            "SELECT next_offset FROM kafka_offsets WHERE topic = $1 AND partition = $2",
            &[topic, partition],
        )?
        .map(|r| r.try_get::<_, i64>(0))
        .transpose()?;
    Err(StoreError::OffsetMoved {
        topic: topic.clone(),
        partition: *partition,
        expected: *expected,
        found,
    })
}
