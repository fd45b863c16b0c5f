//! The write transaction of the decide stage: one batch of events' effects
//! and the offsets that produced them, committed together.
//!
//! READ COMMITTED: one customer's events are decided by the one replica
//! that holds the customer's Kafka partition, and the unique keys (one open
//! instance per key, deterministic instance ids, processed event ids) turn
//! the overlap of a rebalance into a unique violation, which is transient:
//! the batch is retried and then finds the events processed.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use r2d2::PooledConnection;

use super::conn::Manager;
use super::pending::Pending;
use super::propensity;
use super::read;
use crate::context::CustomerContext;
use crate::model::{withdrawn_step, ChannelKind, InstanceStatus, LogRecord, Mode, WITHDRAW_SUFFIX};
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

    /// Whether a statement failed: the transaction is lost.
    pub(super) fn failed(&self) -> bool {
        self.failed
    }

    pub(super) fn commit(mut self) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Aborted);
        }
        self.open = false;
        let committed = self.conn.client.batch_execute("COMMIT");
        if committed.is_err() {
            // Rolled back: so was a `SET` inside it.
            self.conn.forget_plan_mode();
        }
        committed?;
        Ok(())
    }
}

impl Drop for Begun {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        self.conn.forget_plan_mode();
        if self.conn.client.batch_execute("ROLLBACK").is_err() {
            // The connection is unusable: the pool drops it (`has_broken`).
            let _ = self.conn.client.simple_query("");
        }
    }
}

pub(super) struct PgTx {
    pub(super) tx: Begun,
    /// What [`Tx::prefetch`] read for the batch, kept true to this
    /// transaction's own writes.
    pub(super) cache: Option<Prefetched>,
    /// Event ids marked processed, written in one statement at commit.
    pub(super) processed_now: Vec<(String, DateTime<Utc>)>,
    /// Writes held until the next read or the commit.
    pub(super) pending: Pending,
    /// Conversions credited, written at commit ([`propensity::credit_all`]).
    pub(super) credits: Vec<propensity::Credit>,
}

/// A batch's reads, made in one round trip per kind instead of several per
/// event: which event ids were processed before, the customers' contexts
/// and their open instances.
#[derive(Default)]
pub(super) struct Prefetched {
    processed: HashSet<String>,
    window_start: Option<DateTime<Utc>>,
    /// A customer whose journeys this transaction changed is dropped here
    /// and read again.
    customers: HashMap<String, CustomerContext>,
    /// Every prefetched customer's open instances, by (customer, journey, key).
    open: HashMap<(String, String, String), InstanceRef>,
    /// The customers asked for (an absent open instance then means none).
    known: HashSet<String>,
}

/// Whether event `$1` was processed.
const PROCESSED: &str = "/* plan: generic */ SELECT 1 FROM processed_events WHERE id = $1";

/// The instance of (`$1`, `$2`, `$3`) completed at or after `$4`, latest
/// first. Planned per run: kept from an empty table, its plan walked every
/// instance of the journey (`instances_by_journey`).
pub(super) const COMPLETED_INSTANCE: &str = "SELECT id, rule_hash FROM instances
     WHERE customer = $1 AND journey = $2 AND key = $3 AND status = 'completed' AND ended_at >= $4
     ORDER BY ended_at DESC LIMIT 1";

/// Ends instance `$1` with status `$2` at `$3`.
pub(super) const CLOSE_INSTANCE: &str =
    "/* plan: generic */ UPDATE instances SET status = $2, ended_at = $3
     WHERE id = $1 AND status IN ('open', 'completed')
     RETURNING customer";

/// Cancels the pending steps of instance `$1`. Planned per run: kept from
/// an empty table, its plan walked every pending step (`steps_pending`).
pub(super) const CANCEL_STEPS: &str =
    "UPDATE steps SET status = 'cancelled', lease_until = NULL, holder = NULL
     WHERE instance_id = $1 AND status = 'pending'
     RETURNING seq, step, channel, template";

/// A withdrawal step (`$4` the suffix) due at `$3` for each step of
/// instance `$1` sent on a channel of `$2`.
pub(super) const PLAN_WITHDRAWALS: &str = "/* plan: generic */ INSERT INTO steps (instance_id, customer, step, seq, channel, template, planned_at, due_at, status)
     SELECT s.instance_id, s.customer, s.step || $4::text, s.seq, d.channel, s.template, $3::timestamptz, $3::timestamptz, 'pending'
     FROM steps AS s
     JOIN dispatch_log AS d ON d.instance = s.instance_id AND d.step = s.step AND d.outcome = 'sent'
     WHERE s.instance_id = $1 AND s.status = 'sent' AND d.instance = $1 AND d.channel = ANY($2)
     UNION ALL
     -- An attempt that timed out may have landed: found through the
     -- customer's records (the instance index holds sends only).
     SELECT s.instance_id, s.customer, s.step || $4::text, s.seq, d.channel, s.template, $3::timestamptz, $3::timestamptz, 'pending'
     FROM steps AS s
     JOIN dispatch_log AS d
       ON d.customer = (SELECT i.customer FROM instances AS i WHERE i.id = $1)
      AND d.instance = $1 AND d.step = s.step
     WHERE s.instance_id = $1 AND s.status <> 'sent' AND s.step NOT LIKE '%' || $4::text
       AND d.outcome IN ('retrying', 'failed') AND d.reason LIKE 'timed out%' AND d.channel = ANY($2)
     UNION ALL
     -- A send begun by a replica that died (its claim handed back, then
     -- cancelled by this exit) may have landed.
     SELECT s.instance_id, s.customer, s.step || $4::text, s.seq, s.channel, s.template, $3::timestamptz, $3::timestamptz, 'pending'
     FROM steps AS s
     WHERE s.instance_id = $1 AND s.status = 'cancelled' AND s.sending_at IS NOT NULL
       AND s.step NOT LIKE '%' || $4::text AND s.channel = ANY($2)
     ON CONFLICT (instance_id, step) DO NOTHING
     RETURNING seq, step";

/// Open instances of the customers `$1`.
pub(super) const OPEN_INSTANCES: &str =
    "/* plan: generic */ SELECT customer, journey, key, id, rule_hash FROM instances
     WHERE customer = ANY($1::text[]) AND status = 'open'";

pub(super) const OPEN_INSTANCE: &str = "/* plan: generic */ SELECT id, rule_hash FROM instances
     WHERE customer = $1 AND journey = $2 AND key = $3 AND status = 'open'";

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
    fn prefetch(
        &mut self,
        events: &[(&str, &str)],
        window_start: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let ids: Vec<&str> = events.iter().map(|(id, _)| *id).collect();
        let mut customers: Vec<String> = events.iter().map(|(_, c)| c.to_string()).collect();
        customers.sort_unstable();
        customers.dedup();
        self.flush()?;
        let cache = self.tx.run(|c| {
            let mut cache = Prefetched {
                window_start: Some(window_start),
                ..Prefetched::default()
            };
            for r in c.query(
                "/* plan: generic */ SELECT id FROM processed_events WHERE id = ANY($1::text[])",
                &[&ids],
            )? {
                cache.processed.insert(r.try_get(0)?);
            }
            let contexts = read::customers(c, &customers, Some(window_start), true)?;
            for r in c.query(OPEN_INSTANCES, &[&customers])? {
                cache.open.insert(
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?),
                    InstanceRef {
                        id: r.try_get(3)?,
                        rule_hash: r.try_get(4)?,
                    },
                );
            }
            cache.known = customers.iter().cloned().collect();
            cache.customers = customers.into_iter().zip(contexts).collect();
            Ok(cache)
        })?;
        self.cache = Some(cache);
        Ok(())
    }

    fn already_processed(&mut self, event_id: &str) -> Result<bool, StoreError> {
        if let Some(cache) = &self.cache {
            if cache.processed.contains(event_id) {
                return Ok(true);
            }
        }
        if self.processed_now.iter().any(|(id, _)| id == event_id) {
            return Ok(true);
        }
        if self.cache.is_some() {
            // Every id of the batch was looked up at once.
            return Ok(false);
        }
        self.tx
            .run(|c| Ok(c.query_opt(PROCESSED, &[&event_id])?.is_some()))
    }

    fn mark_processed(&mut self, event_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.processed_now.push((event_id.to_owned(), at));
        Ok(())
    }

    fn customer(
        &mut self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError> {
        if let Some(cache) = &self.cache {
            if cache.window_start == Some(window_start) {
                if let Some(customer) = cache.customers.get(id) {
                    return Ok(customer.clone());
                }
            }
        }
        self.flush()?;
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
        if let Some(cache) = &mut self.cache {
            if let Some(cached) = cache.customers.get_mut(&customer.id) {
                cached.clone_from(customer);
            }
        }
        let pending = &mut self.pending;
        self.tx.run(|_| pending.save_customer(customer, at))
    }

    fn open_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
    ) -> Result<Option<InstanceRef>, StoreError> {
        if let Some(found) = self.cached_open(customer, journey, key) {
            return Ok(found);
        }
        self.flush()?;
        self.tx
            .run(|c| instance_ref(c.query_opt(OPEN_INSTANCE, &[&customer, &journey, &key])?))
    }

    fn instance_mode(&mut self, instance_id: &str) -> Result<Option<Mode>, StoreError> {
        self.flush()?;
        self.tx.run(|c| {
            c.query_opt(
                "/* plan: generic */ SELECT mode FROM instances WHERE id = $1",
                &[&instance_id],
            )?
            .map(|r| {
                r.try_get::<_, &str>(0)?
                    .parse()
                    .map_err(StoreError::Corrupt)
            })
            .transpose()
        })
    }

    fn exitable_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
        completed_since: DateTime<Utc>,
    ) -> Result<Option<InstanceRef>, StoreError> {
        let cached = self.cached_open(customer, journey, key);
        if let Some(Some(open)) = cached {
            return Ok(Some(open));
        }
        self.flush()?;
        self.tx.run(|c| {
            if cached.is_none() {
                if let Some(open) =
                    instance_ref(c.query_opt(OPEN_INSTANCE, &[&customer, &journey, &key])?)?
                {
                    return Ok(Some(open));
                }
            }
            instance_ref(c.query_opt(
                COMPLETED_INSTANCE,
                &[&customer, &journey, &key, &completed_since],
            )?)
        })
    }

    fn start_instance(&mut self, i: &NewInstance, steps: &[NewStep]) -> Result<(), StoreError> {
        if let Some(cache) = &mut self.cache {
            cache.customers.remove(&i.customer);
            if cache.known.contains(&i.customer) {
                cache.open.insert(
                    (i.customer.clone(), i.journey.clone(), i.key.clone()),
                    InstanceRef {
                        id: i.id.clone(),
                        rule_hash: i.rule_hash.clone(),
                    },
                );
            }
        }
        let pending = &mut self.pending;
        self.tx.run(|_| pending.start_instance(i, steps))
    }

    fn close_instance(
        &mut self,
        instance_id: &str,
        status: InstanceStatus,
        at: DateTime<Utc>,
    ) -> Result<Vec<ClosedStep>, StoreError> {
        if let Some(cache) = &mut self.cache {
            let ended: Vec<_> = cache
                .open
                .iter()
                .filter(|(_, i)| i.id == instance_id)
                .map(|(k, _)| k.clone())
                .collect();
            for key in ended {
                cache.customers.remove(&key.0);
                cache.open.remove(&key);
            }
        }
        self.flush()?;
        let cache = &mut self.cache;
        self.tx.run(|c| {
            // A completed instance (not in the open map) closed changes its
            // customer's journeys too.
            for r in c.query(CLOSE_INSTANCE, &[&instance_id, &status.as_str(), &at])? {
                if let Some(cache) = cache {
                    cache.customers.remove(r.try_get::<_, &str>(0)?);
                }
            }
            let rows = c.query(CANCEL_STEPS, &[&instance_id])?;
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

    fn plan_withdrawals(
        &mut self,
        instance_id: &str,
        channels: &[ChannelKind],
        at: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        let channels: Vec<&str> = channels.iter().map(|c| c.as_str()).collect();
        self.tx.run(|c| {
            let rows = c.query(
                PLAN_WITHDRAWALS,
                &[&instance_id, &channels, &at, &WITHDRAW_SUFFIX],
            )?;
            let mut planned = Vec::with_capacity(rows.len());
            for r in rows {
                planned.push((r.try_get::<_, i32>(0)?, r.try_get::<_, String>(1)?));
            }
            planned.sort();
            Ok(planned
                .into_iter()
                .map(|(_, step)| withdrawn_step(&step).unwrap_or(&step).to_string())
                .collect())
        })
    }

    fn append_log(&mut self, r: &LogRecord) -> Result<(), StoreError> {
        self.pending.append_log(r);
        Ok(())
    }

    fn set_offset(
        &mut self,
        topic: &str,
        partition: i32,
        expected: i64,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        let pending = &mut self.pending;
        self.tx
            .run(|_| pending.set_offset(topic, partition, expected, next_offset))
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

    fn record_event(&mut self, event: &crate::store::ReceivedEvent) -> Result<(), StoreError> {
        self.pending.record_event(event);
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.flush()?;
        if !self.tx.failed() {
            let pending = &mut self.pending;
            self.tx.run(|c| pending.flush_received(c))?;
        }
        if !self.credits.is_empty() && !self.tx.failed() {
            let credits = std::mem::take(&mut self.credits);
            self.tx.run(|c| propensity::credit_all(c, &credits))?;
        }
        if !self.processed_now.is_empty() && !self.tx.failed() {
            let ids: Vec<&str> = self
                .processed_now
                .iter()
                .map(|(id, _)| id.as_str())
                .collect();
            let ats: Vec<DateTime<Utc>> = self.processed_now.iter().map(|(_, at)| *at).collect();
            self.tx.run(|c| {
                c.execute(
                    "/* plan: generic */ INSERT INTO processed_events (id, at)
                     SELECT * FROM unnest($1::text[], $2::timestamptz[])
                     ON CONFLICT (id) DO NOTHING",
                    &[&ids, &ats],
                )?;
                Ok(())
            })?;
        }
        self.tx.commit()
    }

    fn credit_conversion(
        &mut self,
        instance_id: &str,
        sent_since: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        self.flush()?;
        let credited = self
            .tx
            .run(|c| propensity::creditable(c, instance_id, sent_since, at))?;
        if credited > 0 {
            self.credits.push(propensity::Credit {
                instance_id: instance_id.to_string(),
                sent_since,
                at,
            });
        }
        Ok(credited)
    }
}

impl PgTx {
    /// Writes what is held, before a statement that might read it.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() || self.tx.failed() {
            return Ok(());
        }
        let pending = &mut self.pending;
        self.tx.run(|c| pending.flush(c))
    }

    /// The open instance from the prefetched batch: `Some(found)` when the
    /// customer was prefetched (found or known absent), `None` when not.
    fn cached_open(&self, customer: &str, journey: &str, key: &str) -> Option<Option<InstanceRef>> {
        let cache = self.cache.as_ref()?;
        if !cache.known.contains(customer) {
            return None;
        }
        Some(
            cache
                .open
                .get(&(customer.to_owned(), journey.to_owned(), key.to_owned()))
                .cloned(),
        )
    }
}
