//! The shared store: PostgreSQL, for several replicas in one Kafka consumer
//! group. Kafka partitions spread the deciding; `FOR UPDATE SKIP LOCKED`
//! spreads the sending.
//!
//! - A claim takes due steps no other claim holds (`SKIP LOCKED`: claimers
//!   never wait on each other) under a lease in the row; the replica renews
//!   the leases of what it is still sending ([`Store::renew_claims`]), and a
//!   step whose lease ran out (its replica died) is claimed again by anyone.
//! - A customer's steps are with one replica at a time: a claim also takes
//!   a lease on each of its steps' customers (`customer_claims`), and skips
//!   steps of customers another replica holds a live lease on. Caps and
//!   arbitration decide from the sends read when the steps were claimed, so
//!   no two replicas decide for one customer at once; the lease ends when
//!   the customer's last claimed step settles (in the transaction that logs
//!   the send, so the next claimer sees it) or runs out.
//! - Writes of many rows bind one array per column (`UNNEST`): one
//!   statement per batch, not per row.
//!
//! The client is the synchronous `postgres` crate: the engine calls the
//! store from blocking threads only (never from an async worker: the
//! client runs a small runtime of its own and would panic there).

use chrono::{DateTime, Utc};
use serde_json::Value;

mod audit;
mod conn;
mod control;
pub mod import;
mod listen;
mod pending;
mod propensity;
mod purge;
mod read;
mod received;
mod review;
pub mod schema;
mod tx;
mod upcoming;

pub use conn::{check_options, parse_url, report_pool_errors_to, PgOptions, SslMode};

use super::{ClaimedDeadLetter, DeadLetter, DeadLetterBacklog, StepResult, Store, StoreError, Tx};
use crate::context::CustomerContext;
use crate::model::{ChannelKind, DueStep, HistoryEntry, LogRecord, Variables, WITHDRAW_SUFFIX};
use conn::{PgConn, Pool};
use tx::{Begun, PgTx};

pub struct PostgresStore {
    pool: Pool,
    /// This replica's name in the claims it holds: host, pid and a random
    /// part (a restarted replica never mistakes its predecessor's claims
    /// for its own; they run out within the lease).
    holder: String,
    /// When (the claimer's `now`) expired claims of each channel were last
    /// handed back: at most every [`REQUEUE_EVERY`], not on every claim.
    requeued: std::sync::Mutex<std::collections::HashMap<ChannelKind, DateTime<Utc>>>,
    /// Held while the store is open: its listener ([`listen`]) stops once
    /// this is dropped.
    alive: std::sync::Arc<()>,
}

/// A claim handed back (its replica died or restarted) whose send never
/// began was no attempt: uncounted, so that a crash loop does not spend
/// `max_attempts` on a step it never tried. One whose send began counts,
/// since it may have gone out.
macro_rules! uncount_unbegun_attempt {
    () => {
        "attempt = CASE WHEN sending_at IS NULL THEN greatest(attempt - 1, 0) ELSE attempt END"
    };
}

/// How often a claimer looks for a dead replica's claims: the look walks
/// the claimed steps' index, dead entries and all, so once per claim would
/// cost more than the claim; a dead replica's steps wait this much longer.
const REQUEUE_EVERY: chrono::Duration = chrono::Duration::milliseconds(250);

/// Steps of a dead replica (lease run out) back to pending, skipping rows
/// another claimer is re-queuing at this moment.
const REQUEUE_EXPIRED: &str = concat!(
    "UPDATE steps SET status = 'pending', lease_until = NULL, holder = NULL, ",
    uncount_unbegun_attempt!(),
    "
     WHERE id IN (
         SELECT id FROM steps
         WHERE status = 'claimed' AND channel = $1 AND lease_until < $2
         FOR UPDATE SKIP LOCKED)
       AND status = 'claimed' AND lease_until < $2"
);

// `OFFSET 0` in a `NOT EXISTS` below keeps it a probe of the looked-up
// table's index per row: pulled up into an anti-join, it was planned from
// statistics taken while `customer_claims` and the claimed steps were few,
// as a scan of the whole table or partial index per row, and those grow
// with dead rows between vacuums (a settle of 128 steps spent 7 ms
// for that alone).

/// Claims up to `$3` due steps of channel `$1` at `$2` for holder `$4`
/// until `$5`, in one statement: candidates (not locked by another claim,
/// customer not held by another replica), then the customers' leases (a
/// customer another replica took meanwhile is left out: the arbiter is the
/// unique key, whatever the snapshot saw), then the steps of the customers
/// held, with their instances.
///
/// Every step and instance is found by its key, whatever the statistics
/// say: the steps updated by `id = ANY` of the candidates kept (an index
/// condition; the customers held looked up in one hash, `CASE … IN`), the
/// instances by a lateral probe (`OFFSET 0`). Written as joins, a new
/// store's tables (never analyzed, every estimate one row) had the claimed
/// candidates matched to the leases by a nested loop of one CTE scan per
/// candidate (65 k comparisons for 256 steps, 12 of a claim's 15 ms), and
/// once analyzed, the steps and instances hashed whole from sequential scans
/// (20 of 31 ms on a 20 k-step table, and growing with it).
const CLAIM: &str = "/* plan: generic */ WITH candidates AS MATERIALIZED (
         SELECT s.id, s.customer FROM steps AS s
         WHERE s.status = 'pending' AND s.channel = $1 AND s.due_at <= $2
           AND NOT EXISTS (
               SELECT 1 FROM customer_claims AS c
               WHERE c.customer = s.customer AND c.holder <> $4::text AND c.lease_until >= $2
               OFFSET 0)
         ORDER BY s.due_at
         LIMIT $3
         FOR UPDATE OF s SKIP LOCKED),
     held AS (
         INSERT INTO customer_claims (customer, holder, lease_until)
         SELECT DISTINCT customer, $4::text, $5::timestamptz FROM candidates ORDER BY customer
         ON CONFLICT (customer) DO UPDATE
             SET holder = excluded.holder,
                 lease_until = CASE WHEN customer_claims.holder = excluded.holder
                     THEN GREATEST(customer_claims.lease_until, excluded.lease_until)
                     ELSE excluded.lease_until END
             WHERE customer_claims.holder = excluded.holder OR customer_claims.lease_until < $2
         RETURNING customer),
     claimed AS (
         UPDATE steps AS s SET status = 'claimed', lease_until = $5, holder = $4, attempt = s.attempt + 1
         WHERE s.id = ANY (ARRAY(
             SELECT k.id FROM candidates AS k
             WHERE CASE WHEN k.customer IN (SELECT customer FROM held) THEN true END))
         RETURNING s.id, s.instance_id, s.step, s.template, s.condition, s.planned_at, s.due_at, s.attempt,
             s.sending_at IS NOT NULL AS begun_before)
     SELECT c.id, c.instance_id, c.step, c.template, c.condition, c.planned_at, c.due_at, c.attempt,
            i.customer, i.journey, i.mode, i.category, i.rule_hash, i.vars::text, i.status, c.begun_before
     FROM claimed AS c LEFT JOIN LATERAL (
         SELECT customer, journey, mode, category, rule_hash, vars, status
         FROM instances WHERE id = c.instance_id OFFSET 0) AS i ON true
     ORDER BY c.due_at, c.id";

/// Settles (`status` an outcome) or reschedules (`status` pending, `again_at`
/// set) claimed steps `$1`-`$5`, by key; completes the instances `$6` (at
/// `$7`) left with no step to send; writes the log records `$8`-`$22`; and
/// ends holder `$24`'s leases on the customers `$23` left with no step
/// claimed by it; counts the sends among the records written per journey,
/// step and channel (`propensity_counts`, rows taken in key order): one
/// statement, one round trip, atomic without a transaction around it.
/// A step fenced (`$25`: its claim is known) is settled only while it is
/// still `$24`'s claim or pending (its lease ran out and nobody took it
/// since), and a fenced record (`$26`) is written only if its step was
/// ([`Store::settle_steps`]). Its parts share one snapshot, from before the
/// settle, so the completion and the release look at each step as the
/// settle leaves it: the status settled for a step settled here, the stored
/// one for any other (`IN (SELECT … FROM settled)`: one hash of the settled keys,
/// probed per step; the completion's probe is by `i.id`, so that it runs
/// for the instances named only). The steps updated are also named by
/// `id = ANY` (their ids looked up by key, one probe each), and the
/// instance's `open` test is a `CASE` that matches no partial index: so both
/// are found through their keys whatever the statistics say (on a new
/// store's tables, never analyzed, the settle hashed every step from a
/// sequential scan and every open instance from `instances_one_open`: 17
/// of a 128-step settle's 22 ms on a 20 k-step table). The instances
/// completed are named by `id = ANY (ARRAY(SELECT unnest($6)))`, which the
/// planner takes for a few rows, and their `ended_at` picked from `$7` by
/// position (no join): named by the bound array itself, 128 ids on a table
/// never analyzed were estimated at 64 % of it (0.5 % an id) and the
/// instances scanned whole below about 40 k narrow rows (in `psql`, 2.5 of
/// a 7.6 ms settle on 20 k; the bench's wider rows kept the index).
const SETTLE: &str = "/* plan: generic */ WITH settled AS (
         UPDATE steps AS s SET status = u.status, lease_until = NULL, holder = NULL, sending_at = NULL,
             due_at = COALESCE(u.again_at, s.due_at),
             planned_at = CASE WHEN u.replan AND u.again_at IS NOT NULL THEN u.again_at ELSE s.planned_at END,
             attempt = CASE WHEN u.replan AND u.again_at IS NOT NULL THEN GREATEST(s.attempt - 1, 0) ELSE s.attempt END
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bool[], $25::bool[])
             AS u(instance_id, step, status, again_at, replan, fenced)
         WHERE s.instance_id = u.instance_id AND s.step = u.step
           AND (NOT u.fenced OR CASE s.status WHEN 'pending' THEN true WHEN 'claimed' THEN s.holder = $24 ELSE false END)
           AND s.id = ANY (ARRAY(
               SELECT k.id FROM unnest($1::text[], $2::text[]) AS n(instance_id, step)
               CROSS JOIN LATERAL (
                   SELECT id FROM steps WHERE instance_id = n.instance_id AND step = n.step OFFSET 0) AS k))
         RETURNING s.instance_id, s.step, s.status),
     completed AS (
         UPDATE instances AS i SET status = 'completed',
             ended_at = ($7::timestamptz[])[array_position($6::text[], i.id)]
         WHERE i.id = ANY (ARRAY(SELECT unnest($6::text[]))) AND CASE WHEN i.status = 'open' THEN true END
           AND NOT EXISTS (
               SELECT 1 FROM steps AS s
               WHERE s.instance_id = i.id
                 AND CASE WHEN (s.instance_id, s.step) IN (SELECT instance_id, step FROM settled)
                     THEN (s.instance_id, s.step) IN (SELECT instance_id, step FROM settled WHERE status = 'pending')
                     ELSE s.status IN ('pending', 'claimed') END
               OFFSET 0)),
     released AS (
         DELETE FROM customer_claims AS c
         WHERE c.customer = ANY($23::text[]) AND c.holder = $24
           AND NOT EXISTS (
               SELECT 1 FROM steps AS s
               WHERE s.customer = c.customer AND s.status = 'claimed' AND s.holder = $24
                 AND (s.instance_id, s.step) NOT IN (SELECT instance_id, step FROM settled)
               OFFSET 0)),
     logged AS (
         INSERT INTO dispatch_log (time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms)
         SELECT time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms
         FROM unnest($8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                     $15::text[], $16::text[], $17::text[], $18::int4[], $19::int8[], $20::text[], $21::int4[], $22::int8[], $26::bool[])
             WITH ORDINALITY AS l(time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms, fenced, ord)
         WHERE NOT l.fenced OR (l.instance, l.step) IN (SELECT instance_id, step FROM settled)
         ORDER BY ord
         RETURNING seq, journey, instance, step, channel, outcome),
     counted AS (
         INSERT INTO propensity_counts (journey, step, channel, sends, conversions)
         SELECT journey, step, channel, count(*), 0
         FROM logged
         WHERE outcome = 'sent'
         GROUP BY journey, step, channel ORDER BY journey, step, channel
         ON CONFLICT (journey, step, channel)
         DO UPDATE SET sends = propensity_counts.sends + EXCLUDED.sends)
     SELECT seq, instance, step FROM logged ORDER BY seq";

/// Withdrawals of steps just delivered (`$1`/`$2`, on `$3` at `$4`) whose
/// journey an exit ended while they were being sent (the exit's own
/// `PLAN_WITHDRAWALS` saw them claimed, not sent).
const PLAN_LATE_WITHDRAWALS: &str = "/* plan: generic */ INSERT INTO steps (instance_id, customer, step, seq, channel, template, planned_at, due_at, status)
     SELECT s.instance_id, s.customer, s.step || $5, s.seq, u.channel, s.template, u.at, u.at, 'pending'
     FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS u(instance_id, step, channel, at)
     JOIN steps AS s ON s.instance_id = u.instance_id AND s.step = u.step
     JOIN instances AS i ON i.id = u.instance_id
     WHERE i.status IN ('converted', 'cancelled')
     ON CONFLICT (instance_id, step) DO NOTHING";

/// Log records in one statement; their seqs, in the order given, come back
/// as the sorted RETURNING values (the identity is drawn in insertion order).
const INSERT_LOGS: &str = "/* plan: generic */ INSERT INTO dispatch_log (time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms)
     SELECT time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms
     FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                 $8::text[], $9::text[], $10::text[], $11::int4[], $12::int8[], $13::text[], $14::int4[], $15::int8[])
         WITH ORDINALITY AS u(time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms, ord)
     ORDER BY ord
     RETURNING seq";

/// The columns of log records, bound as one array each (`INSERT_LOGS`'
/// fifteen parameters, in order).
struct LogColumns<'a> {
    times: Vec<DateTime<Utc>>,
    text: [Vec<&'a str>; 6],
    outcomes: Vec<&'a str>,
    reasons: Vec<&'a str>,
    rule_hashes: Vec<&'a str>,
    attempts: Vec<i32>,
    latencies: Vec<Option<i64>>,
    events: Vec<Option<&'a str>>,
    http_statuses: Vec<Option<i32>>,
    responses: Vec<Option<i64>>,
}

impl<'a> LogColumns<'a> {
    fn new(records: &[&'a LogRecord]) -> Self {
        let col =
            |f: fn(&LogRecord) -> &str| -> Vec<&'a str> { records.iter().map(|r| f(r)).collect() };
        Self {
            times: records.iter().map(|r| r.time).collect(),
            text: [
                col(|r| &r.customer),
                col(|r| &r.journey),
                col(|r| &r.instance),
                col(|r| &r.step),
                col(|r| &r.channel),
                col(|r| &r.template),
            ],
            outcomes: records.iter().map(|r| r.outcome.as_str()).collect(),
            reasons: col(|r| &r.reason),
            rule_hashes: col(|r| &r.rule_hash),
            attempts: records.iter().map(|r| r.attempt as i32).collect(),
            latencies: records
                .iter()
                .map(|r| r.latency_ms.map(|l| l as i64))
                .collect(),
            events: records.iter().map(|r| r.event_id.as_deref()).collect(),
            http_statuses: records
                .iter()
                .map(|r| r.http_status.map(i32::from))
                .collect(),
            responses: records
                .iter()
                .map(|r| r.response_ms.map(|l| l as i64))
                .collect(),
        }
    }

    fn params(&self) -> [&(dyn postgres::types::ToSql + Sync); 15] {
        [
            &self.times,
            &self.text[0],
            &self.text[1],
            &self.text[2],
            &self.text[3],
            &self.text[4],
            &self.text[5],
            &self.outcomes,
            &self.reasons,
            &self.rule_hashes,
            &self.attempts,
            &self.latencies,
            &self.events,
            &self.http_statuses,
            &self.responses,
        ]
    }
}

/// Writes `records` in one statement and returns their seqs (unsorted).
fn insert_logs(c: &mut PgConn, records: &[&LogRecord]) -> Result<Vec<i64>, StoreError> {
    let columns = LogColumns::new(records);
    c.query(INSERT_LOGS, &columns.params())?
        .iter()
        .map(|r| r.try_get(0).map_err(StoreError::from))
        .collect()
}

/// When this replica (`$2`) may next claim a step of channel `$1`: the
/// earliest due step of a customer no other replica holds, or, for a
/// customer another holds, its due time or the hold's end if later (the
/// holder claims the step itself meanwhile). So a replica sleeps through
/// another's hold instead of claiming nothing in a busy loop, and a dead
/// replica's hold is taken over when it runs out. The second column is the
/// earliest end of a claim another replica holds (live ones renew theirs):
/// an idle replica wakes then to take a dead one's steps over, not only at
/// its idle bound (walks the claimed steps' small index, as
/// [`REQUEUE_EXPIRED`] does).
const NEXT_DUE: &str = "SELECT LEAST(
         (SELECT s.due_at FROM steps AS s
          WHERE s.status = 'pending' AND s.channel = $1
            AND NOT EXISTS (SELECT 1 FROM customer_claims AS c WHERE c.customer = s.customer AND c.holder <> $2 OFFSET 0)
          ORDER BY s.due_at LIMIT 1),
         (SELECT MIN(GREATEST(c.lease_until, s.due_at))
          FROM customer_claims AS c
          JOIN instances AS i ON i.customer = c.customer
          JOIN steps AS s ON s.instance_id = i.id
          WHERE c.holder <> $2 AND s.status = 'pending' AND s.channel = $1)),
       (SELECT MIN(lease_until) FROM steps
        WHERE status = 'claimed' AND channel = $1 AND holder <> $2)";

/// Marks the claimed steps `$1` of holder `$3` as being sent since `$2`.
/// The claim's test is a `CASE`, so that the rows are found by key (not by
/// walking `steps_claimed_by_customer` whole); the ids go through
/// `ARRAY(SELECT unnest(…))`, which the planner takes for a few rows: 256
/// bound ids on steps never analyzed were taken for most of the table, and
/// it was scanned whole below about 40 k steps.
const MARK_SENDING: &str = "/* plan: generic */ UPDATE steps SET sending_at = $2
     WHERE id = ANY (ARRAY(SELECT unnest($1::int8[])))
       AND CASE WHEN status = 'claimed' AND holder = $3 THEN true END";

/// Ends holder `$2`'s leases on the customers `$1` that have no step left claimed by it.
const RELEASE_CUSTOMERS: &str = "/* plan: generic */ DELETE FROM customer_claims AS c
     WHERE c.customer = ANY($1::text[]) AND c.holder = $2
       AND NOT EXISTS (SELECT 1 FROM steps AS s WHERE s.customer = c.customer AND s.status = 'claimed' AND s.holder = $2 OFFSET 0)";

impl PostgresStore {
    /// Connects (a bounded pool; TLS as the URL's `sslmode` says) and
    /// migrates the schema. Claims of other replicas are left alone: a dead
    /// replica's run out within their lease (but see
    /// [`release_dead_predecessors`](Self::release_dead_predecessors)).
    pub fn open(options: &PgOptions) -> Result<Self, StoreError> {
        let holder = holder_name();
        let pool = Pool::open_named(options, &format!("nudge/{holder}"))?;
        let mut first = pool.get()?;
        schema::migrate(&mut first.client)?;
        schema::check_privileges(&mut first.client)?;
        drop(first);
        Ok(Self {
            pool,
            holder,
            requeued: Default::default(),
            alive: Default::default(),
        })
    }

    /// Migrates the schema (the `nudge migrate` command): (version found, version now).
    pub fn migrate(options: &PgOptions) -> Result<(u32, u32), StoreError> {
        let pool = Pool::open(&PgOptions {
            pool_size: 1,
            ..options.clone()
        })?;
        let mut conn = pool.get()?;
        let before = schema::version(&mut conn.client)?;
        schema::migrate(&mut conn.client)?;
        let after = schema::version(&mut conn.client)?;
        Ok((before, after))
    }

    /// Whether a claim at `now` looks for expired claims of `channel` first
    /// (and notes that it does): `REQUEUE_EVERY` after the last look, or
    /// when the clock went back.
    fn requeue_due(&self, channel: ChannelKind, now: DateTime<Utc>) -> bool {
        let mut last = self.requeued.lock().unwrap_or_else(|e| e.into_inner());
        match last.get(&channel) {
            Some(&at) if now >= at && now - at < REQUEUE_EVERY => false,
            _ => {
                last.insert(channel, now);
                true
            }
        }
    }

    /// Returns to pending the claims of the replicas that ran before this
    /// one in the same place (host and pid: a container restarted in its
    /// pod, where every replica may be pid 1) and are gone (no session
    /// named after them), so their steps go out now rather than when their
    /// lease runs out. A sibling that shares the host's name and pid in
    /// another container is alive, so its sessions are there and its
    /// claims are kept; with the sessions named in the URL (no way to
    /// tell) nothing is released. Returns the steps released.
    pub fn release_dead_predecessors(&self) -> Result<usize, StoreError> {
        if !self.pool.names_sessions() {
            return Ok(0);
        }
        let Some((place, _)) = self.holder.rsplit_once('/') else {
            return Ok(0);
        };
        let place = format!("{place}/");
        let mut tx = self.transaction()?;
        let released = tx.run(|c| {
            let n = c.execute(
                concat!(
                    "UPDATE steps SET status = 'pending', lease_until = NULL, holder = NULL, ",
                    uncount_unbegun_attempt!(),
                    " WHERE status = 'claimed' AND starts_with(holder, $1) AND holder <> $2
                      AND NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a
                                      WHERE a.application_name = 'nudge/' || steps.holder)"
                ),
                &[&place, &self.holder],
            )?;
            c.execute(
                "DELETE FROM customer_claims AS c
                 WHERE starts_with(c.holder, $1) AND c.holder <> $2
                   AND NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a
                                   WHERE a.application_name = 'nudge/' || c.holder)",
                &[&place, &self.holder],
            )?;
            Ok(n as usize)
        })?;
        tx.commit()?;
        Ok(released)
    }

    /// The name this replica's claims carry.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<conn::Manager>, StoreError> {
        self.pool.get()
    }

    fn transaction(&self) -> Result<Begun, StoreError> {
        Begun::new(self.conn()?)
    }
}

fn holder_name() -> String {
    let host = conn::host_tail();
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

fn due_step(channel: ChannelKind, r: &postgres::Row) -> Result<DueStep, StoreError> {
    let instance_id: String = r.try_get(1)?;
    let step: String = r.try_get(2)?;
    let Some(customer) = r.try_get::<_, Option<String>>(8)? else {
        return Err(StoreError::Corrupt(format!(
            "step {instance_id}/{step} has no instance"
        )));
    };
    let parse = |i: usize| -> Result<&str, StoreError> { Ok(r.try_get::<_, &str>(i)?) };
    Ok(DueStep {
        row: r.try_get(0)?,
        channel,
        template: r.try_get(3)?,
        condition: r.try_get(4)?,
        planned_at: r.try_get(5)?,
        due_at: r.try_get(6)?,
        attempt: r.try_get::<_, i32>(7)? as u32,
        customer,
        journey: r.try_get(9)?,
        mode: parse(10)?.parse().map_err(StoreError::Corrupt)?,
        category: parse(11)?.parse().map_err(StoreError::Corrupt)?,
        rule_hash: r.try_get(12)?,
        vars: Variables::from_json(r.try_get(13)?)
            .map_err(|e| StoreError::Corrupt(format!("instance vars: {e}")))?,
        instance_status: parse(14)?.parse().map_err(StoreError::Corrupt)?,
        // Set by the claim (column 15); the look-ahead reads pending steps.
        begun_before: false,
        instance_id,
        step,
    })
}

/// Columns 0..=9 of a `dead_letters` row (id, topic, partition,
/// record_offset, key, payload, reason, journey, event_id, headers): the
/// letter and its outbox id.
fn dead_letter(r: &postgres::Row) -> Result<(i64, DeadLetter), StoreError> {
    let headers: Option<String> = r.try_get(9)?;
    Ok((
        r.try_get(0)?,
        DeadLetter {
            topic: r.try_get(1)?,
            partition: r.try_get(2)?,
            offset: r.try_get(3)?,
            key: r.try_get(4)?,
            payload: r.try_get(5)?,
            reason: r.try_get(6)?,
            journey: r.try_get(7)?,
            event_id: r.try_get(8)?,
            headers: super::dead_letters::decode_headers(headers.as_deref())?,
        },
    ))
}

/// `finish_steps`' writes, in one statement (`SETTLE`).
fn finish(
    c: &mut PgConn,
    holder: &str,
    results: &[StepResult],
) -> Result<Vec<Option<i64>>, StoreError> {
    // A step named twice (it cannot be, short of a bug) ends as the last says.
    let mut last = std::collections::HashMap::with_capacity(results.len());
    for (i, r) in results.iter().enumerate() {
        last.insert((r.record.instance.as_str(), r.record.step.as_str()), i);
    }
    let mut order: Vec<usize> = last.into_values().collect();
    order.sort_unstable();
    let settles: Vec<&StepResult> = order.iter().map(|&i| &results[i]).collect();
    let instances: Vec<&str> = settles.iter().map(|r| r.record.instance.as_str()).collect();
    let steps: Vec<&str> = settles.iter().map(|r| r.record.step.as_str()).collect();
    let statuses: Vec<&str> = settles
        .iter()
        .map(|r| match r.again_at {
            Some(_) => "pending",
            None => r.record.outcome.as_str(),
        })
        .collect();
    let again: Vec<Option<DateTime<Utc>>> = settles.iter().map(|r| r.again_at).collect();
    let replan: Vec<bool> = settles.iter().map(|r| r.replan).collect();
    // The instances whose step settled for good, at the time of the last such record.
    let mut completed: Vec<(&str, DateTime<Utc>)> = Vec::new();
    for r in results.iter().filter(|r| r.again_at.is_none()) {
        match completed
            .iter_mut()
            .find(|(id, _)| *id == r.record.instance)
        {
            Some(entry) => entry.1 = r.record.time,
            None => completed.push((&r.record.instance, r.record.time)),
        }
    }
    let completed_ids: Vec<&str> = completed.iter().map(|c| c.0).collect();
    let completed_at: Vec<DateTime<Utc>> = completed.iter().map(|c| c.1).collect();
    let records: Vec<&LogRecord> = results.iter().map(|r| &r.record).collect();
    let log = LogColumns::new(&records);
    let mut customers: Vec<&str> = records.iter().map(|r| r.customer.as_str()).collect();
    customers.sort_unstable();
    customers.dedup();
    let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![
        &instances,
        &steps,
        &statuses,
        &again,
        &replan,
        &completed_ids,
        &completed_at,
    ];
    params.extend(log.params());
    params.push(&customers);
    params.push(&holder);
    let fenced_settles: Vec<bool> = settles.iter().map(|r| r.claimed_row.is_some()).collect();
    let fenced_records: Vec<bool> = results.iter().map(|r| r.claimed_row.is_some()).collect();
    params.push(&fenced_settles);
    params.push(&fenced_records);
    let written = c.query(SETTLE, &params)?;
    // The records written come back in the order given (their seqs are
    // drawn in insertion order), those fenced off left out.
    let mut written = written.iter().peekable();
    let mut seqs = Vec::with_capacity(results.len());
    for r in results {
        let seq = match written.peek() {
            Some(row)
                if row.try_get::<_, &str>(1)? == r.record.instance
                    && row.try_get::<_, &str>(2)? == r.record.step =>
            {
                let seq = row.try_get(0)?;
                written.next();
                Some(seq)
            }
            _ => None,
        };
        seqs.push(seq);
    }
    Ok(seqs)
}

impl Store for PostgresStore {
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError> {
        Ok(Box::new(PgTx {
            tx: self.transaction()?,
            cache: None,
            processed_now: Vec::new(),
            pending: Default::default(),
            credits: Vec::new(),
        }))
    }

    fn claim_due(
        &self,
        channel: ChannelKind,
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<DueStep>, StoreError> {
        let mut c = self.conn()?;
        let name = channel.as_str();
        if self.requeue_due(channel, now) {
            c.execute(REQUEUE_EXPIRED, &[&name, &now])?;
        }
        let rows = c.query(
            CLAIM,
            &[&name, &now, &(limit as i64), &self.holder, &lease_until],
        )?;
        rows.iter()
            .map(|r| {
                let mut step = due_step(channel, r)?;
                step.begun_before = r.try_get(15)?;
                Ok(step)
            })
            .collect()
    }

    fn settle_steps(&self, results: &[StepResult]) -> Result<Vec<Option<i64>>, StoreError> {
        if results.is_empty() {
            return Ok(Vec::new());
        }
        let late: Vec<&StepResult> = results
            .iter()
            .filter(|r| r.withdraw_if_ended && r.again_at.is_none())
            .collect();
        if late.is_empty() {
            // One statement: atomic on its own, no transaction to open.
            let mut c = self.conn()?;
            return finish(&mut c, &self.holder, results);
        }
        // Deliveries on a withdrawing channel (call tasks): their journey
        // may have ended while they were sent, so the settle and their
        // withdrawals are one transaction.
        let instances: Vec<&str> = late.iter().map(|r| r.record.instance.as_str()).collect();
        let steps: Vec<&str> = late.iter().map(|r| r.record.step.as_str()).collect();
        let channels: Vec<&str> = late.iter().map(|r| r.record.channel.as_str()).collect();
        let times: Vec<DateTime<Utc>> = late.iter().map(|r| r.record.time).collect();
        let mut tx = self.transaction()?;
        let seqs = tx.run(|c| {
            let seqs = finish(c, &self.holder, results)?;
            c.execute(
                PLAN_LATE_WITHDRAWALS,
                &[&instances, &steps, &channels, &times, &WITHDRAW_SUFFIX],
            )?;
            Ok(seqs)
        })?;
        tx.commit()?;
        Ok(seqs)
    }

    fn renew_claims(&self, rows: &[i64], until: DateTime<Utc>) -> Result<Vec<i64>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let row = self.conn()?.query_one(
            "WITH renewed AS (
                 UPDATE steps SET lease_until = GREATEST(lease_until, $2)
                 WHERE id = ANY($1::int8[]) AND status = 'claimed' AND holder = $3
                 RETURNING id, customer),
             customers AS (
                 UPDATE customer_claims SET lease_until = GREATEST(lease_until, $2)
                 WHERE holder = $3 AND customer IN (SELECT customer FROM renewed))
             SELECT coalesce(array_agg(id), '{}') FROM renewed",
            &[&rows, &until, &self.holder],
        )?;
        Ok(row.try_get::<_, Vec<i64>>(0)?)
    }

    fn claim_held(&self, row: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let held = self.conn()?.query_one(
            "SELECT EXISTS (SELECT 1 FROM steps
                 WHERE id = $1 AND status = 'claimed' AND holder = $2 AND lease_until > $3)",
            &[&row, &self.holder, &now],
        )?;
        Ok(held.try_get(0)?)
    }

    fn mark_sending(&self, rows: &[i64], at: DateTime<Utc>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.conn()?
            .execute(MARK_SENDING, &[&rows, &at, &self.holder])?;
        Ok(())
    }

    fn next_due(&self, channel: Option<ChannelKind>) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut c = self.conn()?;
        let row = match channel {
            Some(channel) => {
                let row = c.query_one(NEXT_DUE, &[&channel.as_str(), &self.holder])?;
                let due: Option<DateTime<Utc>> = row.try_get(0)?;
                // A claim that ran out goes back to pending at a claimer's
                // next look for expired claims, at most `REQUEUE_EVERY`
                // later: waking before that would find nothing to claim.
                let lease_ends: Option<DateTime<Utc>> = row.try_get(1)?;
                let take_over = lease_ends.map(|t| t + REQUEUE_EVERY);
                return Ok(due.into_iter().chain(take_over).min());
            }
            // Per channel, so that each is one descent of the pending index.
            None => c.query_one(
                "SELECT MIN(n.due_at) FROM unnest(ARRAY['push', 'email', 'call_task']) AS k(channel)
                 CROSS JOIN LATERAL (
                     SELECT due_at FROM steps WHERE status = 'pending' AND channel = k.channel
                     ORDER BY due_at LIMIT 1) AS n",
                &[],
            )?,
        };
        Ok(row.try_get(0)?)
    }

    fn release_all_leases(&self) -> Result<usize, StoreError> {
        let mut tx = self.transaction()?;
        let released = tx.run(|c| {
            let n = c.execute(
                concat!(
                    "UPDATE steps SET status = 'pending', lease_until = NULL, holder = NULL, ",
                    uncount_unbegun_attempt!(),
                    " WHERE status = 'claimed' AND holder = $1"
                ),
                &[&self.holder],
            )?;
            c.execute(
                "DELETE FROM customer_claims WHERE holder = $1",
                &[&self.holder],
            )?;
            Ok(n as usize)
        })?;
        tx.commit()?;
        Ok(released)
    }

    fn customer(
        &self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError> {
        let mut one = read::customers(
            &mut *self.conn()?,
            &[id.to_owned()],
            Some(window_start),
            true,
        )?;
        Ok(one.pop().expect("one context per id"))
    }

    fn history(&self, instance_id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut one = self.histories(&[instance_id.to_owned()])?;
        Ok(one.pop().unwrap_or_default())
    }

    fn customers(
        &self,
        ids: &[String],
        sends_since: Option<DateTime<Utc>>,
        journeys: bool,
    ) -> Result<Vec<CustomerContext>, StoreError> {
        read::customers(&mut *self.conn()?, ids, sends_since, journeys)
    }

    fn histories(&self, instance_ids: &[String]) -> Result<Vec<Vec<HistoryEntry>>, StoreError> {
        read::histories(&mut *self.conn()?, instance_ids)
    }

    fn log_after(&self, after: i64, limit: usize) -> Result<Vec<LogRecord>, StoreError> {
        self.conn()?
            .query(
                "SELECT seq, time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms
                 FROM dispatch_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &(limit as i64)],
            )?
            .iter()
            .map(read::log_record)
            .collect()
    }

    fn offsets(&self, topic: &str) -> Result<Vec<(i32, i64)>, StoreError> {
        self.conn()?
            .query(
                "SELECT partition, next_offset FROM kafka_offsets WHERE topic = $1 ORDER BY partition",
                &[&topic],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    fn record_rules(
        &self,
        version: &str,
        files: &Value,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.conn()?.execute(
            "INSERT INTO rule_versions (version, loaded_at, files) VALUES ($1, $2, $3::text::jsonb)
             ON CONFLICT (version) DO NOTHING",
            &[&version, &at, &files.to_string()],
        )?;
        Ok(())
    }

    fn unpublished_dead_letters(&self, limit: usize) -> Result<Vec<(i64, DeadLetter)>, StoreError> {
        let rows = self.conn()?.query(
            "SELECT id, topic, partition, record_offset, key, payload, reason, journey, event_id, headers::text
             FROM dead_letters WHERE published_at IS NULL AND failed_at IS NULL ORDER BY id LIMIT $1",
            &[&(limit as i64)],
        )?;
        rows.iter().map(dead_letter).collect()
    }

    fn claim_dead_letters(
        &self,
        limit: usize,
        max_payload: usize,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<ClaimedDeadLetter>, StoreError> {
        let max_payload = max_payload.min(i32::MAX as usize) as i32;
        let rows = self.conn()?.query(
            "UPDATE dead_letters SET claimed_until = $3
             WHERE id IN (
                 SELECT id FROM dead_letters
                 WHERE published_at IS NULL AND failed_at IS NULL
                   AND (claimed_until IS NULL OR claimed_until < $2)
                   AND (retry_at IS NULL OR retry_at <= $2)
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, topic, partition, record_offset, key, substring(payload from 1 for $4),
                       reason, journey, event_id, headers::text, octet_length(payload), attempts",
            &[&(limit as i64), &now, &until, &max_payload],
        )?;
        let mut letters = rows
            .iter()
            .map(|r| {
                let (id, letter) = dead_letter(r)?;
                let size: i32 = r.try_get(10)?;
                let attempts: i32 = r.try_get(11)?;
                Ok(ClaimedDeadLetter {
                    id,
                    letter,
                    payload_size: size.max(0) as usize,
                    attempts: attempts.max(0) as u32,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        letters.sort_unstable_by_key(|l| l.id);
        Ok(letters)
    }

    fn mark_dead_letters_published(
        &self,
        ids: &[i64],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE dead_letters SET published_at = $2 WHERE id = ANY($1::int8[])",
            &[&ids, &at],
        )?;
        Ok(())
    }

    fn dead_letter_publish_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        give_up: bool,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE dead_letters SET attempts = attempts + 1, last_error = $2, retry_at = $3,
                    claimed_until = NULL, failed_at = CASE WHEN $4 THEN $5::timestamptz END
             WHERE id = $1 AND published_at IS NULL",
            &[&id, &error, &retry_at, &give_up, &at],
        )?;
        Ok(())
    }

    fn dead_letter_backlog(&self) -> Result<DeadLetterBacklog, StoreError> {
        let row = self.conn()?.query_one(
            "SELECT COUNT(*) - COUNT(failed_at), COUNT(failed_at) FROM dead_letters WHERE published_at IS NULL",
            &[],
        )?;
        let (waiting, failed): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        Ok(DeadLetterBacklog {
            waiting: waiting.max(0) as u64,
            failed: failed.max(0) as u64,
        })
    }

    fn release_claim(
        &self,
        instance_id: &str,
        step: &str,
        to: Option<ChannelKind>,
    ) -> Result<(), StoreError> {
        let to = to.map(|c| c.as_str());
        let mut tx = self.transaction()?;
        tx.run(|c| {
            let released = c.query(
                "UPDATE steps SET status = 'pending', lease_until = NULL, holder = NULL, sending_at = NULL, attempt = attempt - 1,
                     channel = COALESCE($4, channel)
                 WHERE instance_id = $1 AND step = $2 AND status = 'claimed' AND holder = $3
                 RETURNING customer, channel",
                &[&instance_id, &step, &self.holder, &to],
            )?;
            let customers: Vec<String> = released
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if !customers.is_empty() {
                c.execute(RELEASE_CUSTOMERS, &[&customers, &self.holder])?;
            }
            // The other replicas take it at once (delivered on commit).
            for r in &released {
                let channel: &str = r.try_get(1)?;
                c.execute(listen::NOTIFY_RELEASED, &[&channel])?;
            }
            Ok(())
        })?;
        tx.commit()
    }

    fn on_steps_released(
        &self,
        heard: Box<dyn Fn(Result<ChannelKind, StoreError>) + Send + Sync>,
    ) -> Result<(), StoreError> {
        listen::spawn(
            self.pool.manager(),
            std::sync::Arc::downgrade(&self.alive),
            heard,
        )
        .map_err(|e| StoreError::Config(format!("cannot start the release listener: {e}")))
    }

    fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        purge::purge(self, before)
    }

    fn step_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.conn()?
            .query(
                "SELECT status, COUNT(*) FROM steps GROUP BY status ORDER BY status COLLATE \"C\"",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    fn set_audit_outbox(&self, enabled: bool) -> Result<(), StoreError> {
        audit::set_enabled(self, enabled)
    }

    fn claim_audit_records(
        &self,
        limit: usize,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<super::AuditRecord>, StoreError> {
        audit::claim(self, limit, now, until)
    }

    fn delete_audit_records(&self, seqs: &[i64]) -> Result<(), StoreError> {
        audit::delete(self, seqs)
    }

    fn audit_backlog(&self) -> Result<u64, StoreError> {
        audit::backlog(self)
    }

    fn upcoming_steps(
        &self,
        customers: &[String],
        until: DateTime<Utc>,
    ) -> Result<Vec<DueStep>, StoreError> {
        upcoming::upcoming_steps(&mut *self.conn()?, customers, until)
    }

    // Runtime control: in `control.rs`.

    fn control_overrides(&self) -> Result<Vec<crate::store::control::ControlRow>, StoreError> {
        self.read_control_overrides()
    }

    fn change_control(
        &self,
        change: &crate::store::control::ControlChange<'_>,
    ) -> Result<crate::store::control::ControlEntry, StoreError> {
        self.write_control_change(change)
    }

    fn control_log(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<crate::store::control::ControlEntry>, StoreError> {
        self.read_control_log(since, until, limit)
    }

    fn propensity_counts(
        &self,
        journey: Option<&str>,
    ) -> Result<Vec<crate::propensity::PropensityCount>, StoreError> {
        propensity::counts(&mut *self.conn()?, journey)
    }

    fn received_events(
        &self,
        customer: &str,
    ) -> Result<Vec<crate::store::received::ReceivedEvent>, StoreError> {
        received::of_customer(&mut *self.conn()?, customer)
    }

    /// Folds the writers' count deltas (`review_fold()`, schema v11), so
    /// that they never pile up between reviews; the number is not counted.
    fn fold_review_counts(&self) -> Result<u64, StoreError> {
        review::fold(&mut self.conn()?.client)?;
        Ok(0)
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
