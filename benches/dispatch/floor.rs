//! The floor (`--floor 1`): a minimal durable sender written directly against
//! PostgreSQL, for what any store-backed sender can reach on this machine.
//!
//! Its own schema: a queue of due steps (id, channel, due_at, status,
//! lease_until) with a partial index on (channel, due_at) of the pending
//! ones, and a log (seq, step, time, outcome, http status). Per batch it does
//! what nudge's scheduler does at the least: a claim of up to
//! `scheduler.batch_size` due steps under a lease (`FOR UPDATE SKIP LOCKED`,
//! one statement, one commit), the sends through nudge's own HTTP channel
//! adapter with the channel's concurrency, and the settle of each group of
//! up to `FINISH_BATCH` results (gathered for up to `FINISH_LINGER`, one
//! group at a time) in one statement: the steps marked sent and their log
//! records written (`UNNEST`), one commit. The claim of the next batch runs
//! while the sends are under way (one batch ahead, as nudge's claimer), on a
//! connection of its own; the settles on another. The same client crate
//! (`postgres`, synchronous, on threads of their own) and the same TLS mode
//! as nudge's store (`sslmode=prefer`: TLS, since the server offers it).
//!
//! Not done, since nudge's figure must pay for it and the floor need not: no
//! instance, no customer lease, no reads of customers or histories, no send
//! mark, no lease renewal or take-over of expired claims, no review indexes.
//! `--floor-extra` adds those costs (see [`Extras`]).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use nudge::dispatch::{Channel, Message};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres::Client;
use postgres_openssl::MakeTlsConnector;

use crate::common::{pg_base, Schema};

/// Most results settled in one statement: the scheduler's `FINISH_BATCH`.
pub const SETTLE_GROUP: usize = 128;
/// How long results may gather before a settle: the scheduler's `FINISH_LINGER`.
pub const LINGER: Duration = Duration::from_millis(5);

/// Costs of nudge's beside the floor's, added to it (`--floor-extra`, names
/// joined by `+`); none by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extras {
    /// `step-indexes`: the queue carries nudge's other indexes on `steps`:
    /// (instance_id, step) unique, the claimed steps' (customer), the
    /// unsettled steps' (customer), and its `fillfactor` of 70.
    pub step_indexes: bool,
    /// `log-indexes`: the log carries nudge's columns (customer, journey,
    /// instance, step, channel, template, reason, rule hash, attempt) and
    /// nudge's indexes on `dispatch_log`: (time, seq), (journey, time, seq),
    /// (customer, time, seq), (outcome, time, seq) and the sent steps'
    /// (instance).
    pub log_indexes: bool,
    /// `complete`: each step belongs to an open instance (a row of its own
    /// with nudge's indexes on `instances`: one open per (customer, journey)
    /// (unique, partial), (customer, started_at), (journey, started_at), the
    /// ended ones' (ended_at)); the settle completes it in the same
    /// statement once its step is no longer pending or claimed.
    pub complete: bool,
    /// `leases`: a claim skips steps of customers another holder has a live
    /// lease on and takes a lease on each claimed step's customer
    /// (`customer_claims`, upsert in the claim's statement); the settle ends
    /// them (delete in the settle's statement), as nudge does so that caps
    /// hold across replicas.
    pub leases: bool,
    /// `send-mark`: after each claim, the batch's sends marked (`sending_at`)
    /// in one more statement (and commit) before they start, as nudge does.
    pub send_mark: bool,
    /// `reads`: after each claim, the batch's customers (a row each, with a
    /// JSON context) and their steps' past log records (the histories)
    /// read, one statement each, as nudge does before deciding.
    pub reads: bool,
    /// `custom-plans`: every statement planned for its values at each run
    /// (`plan_cache_mode = force_custom_plan`), as nudge's connections are.
    /// Not in `all`.
    pub custom_plans: bool,
}

impl FromStr for Extras {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut x = Self::default();
        for name in s.split('+') {
            match name {
                "none" => {}
                "step-indexes" => x.step_indexes = true,
                "log-indexes" => x.log_indexes = true,
                "complete" => x.complete = true,
                "leases" => x.leases = true,
                "send-mark" => x.send_mark = true,
                "reads" => x.reads = true,
                "custom-plans" => x.custom_plans = true,
                "all" => {
                    x = Self {
                        step_indexes: true,
                        log_indexes: true,
                        complete: true,
                        leases: true,
                        send_mark: true,
                        reads: true,
                        ..x
                    }
                }
                other => {
                    return Err(format!(
                        "--floor-extra {other}: none, all, or step-indexes, log-indexes, complete, leases, send-mark, reads, custom-plans joined by +"
                    ))
                }
            }
        }
        Ok(x)
    }
}

impl std::fmt::Display for Extras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.step_indexes, "step-indexes"),
            (self.log_indexes, "log-indexes"),
            (self.complete, "complete"),
            (self.leases, "leases"),
            (self.send_mark, "send-mark"),
            (self.reads, "reads"),
            (self.custom_plans, "custom-plans"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join("+"))
        }
    }
}

/// Claims up to `$3` due steps of channel `$1` at `$2` until `$4`. The
/// rows locked are updated through `id = ANY (ARRAY(…))`, one probe of the
/// primary key each: written `id IN (…)`, PostgreSQL hashed the locked ids
/// and scanned the whole queue for them (7.8 ms for 256 steps on 40 k rows
/// in `psql`, against 1.1 ms).
const CLAIM: &str = "UPDATE queue SET status = 'claimed', lease_until = $4
     WHERE id = ANY (ARRAY(
         SELECT id FROM queue
         WHERE status = 'pending' AND channel = $1 AND due_at <= $2
         ORDER BY due_at LIMIT $3
         FOR UPDATE SKIP LOCKED))
     RETURNING id";

/// The same, skipping customers another holder has a live lease on and
/// taking a lease on each claimed step's customer (`Extras::leases`).
const CLAIM_LEASES: &str = "WITH claimed AS (
         UPDATE queue SET status = 'claimed', lease_until = $4
         WHERE id = ANY (ARRAY(
             SELECT q.id FROM queue AS q
             WHERE q.status = 'pending' AND q.channel = $1 AND q.due_at <= $2
               AND NOT EXISTS (
                   SELECT 1 FROM customer_claims AS c
                   WHERE c.customer = q.customer AND c.holder <> 'floor' AND c.lease_until >= $2
                   OFFSET 0)
             ORDER BY q.due_at LIMIT $3
             FOR UPDATE OF q SKIP LOCKED))
         RETURNING id, customer),
     held AS (
         INSERT INTO customer_claims (customer, holder, lease_until)
         SELECT DISTINCT customer, 'floor', $4 FROM claimed ORDER BY customer
         ON CONFLICT (customer) DO UPDATE SET lease_until = excluded.lease_until
             WHERE customer_claims.holder = excluded.holder OR customer_claims.lease_until < $2)
     SELECT id FROM claimed";

/// Marks the steps `$1` as being sent since `$2` (`Extras::send_mark`).
const SEND_MARK: &str =
    "UPDATE queue SET sending_at = $2 WHERE id = ANY($1::int8[]) AND status = 'claimed'";

/// The batch's customers (`Extras::reads`).
const READ_CUSTOMERS: &str = "SELECT c.id, c.context::text FROM unnest($1::text[]) AS k(id)
     CROSS JOIN LATERAL (SELECT id, context FROM customers WHERE id = k.id OFFSET 0) AS c";

/// The past log records of the batch's steps (`Extras::reads`).
const READ_HISTORIES: &str = "SELECT h.step, h.time, h.outcome FROM unnest($1::int8[]) AS k(step)
     CROSS JOIN LATERAL (SELECT step, time, outcome FROM log WHERE step = k.step AND outcome = 'sent' OFFSET 0) AS h";

/// Settles the steps sent `$1` and logs every result (`$2`-`$5`: step,
/// time, outcome, HTTP status), in one statement; with `extras`, also
/// completes the instances and ends the customers' leases, and writes
/// nudge's log columns.
fn settle_sql(extras: Extras) -> String {
    let mut ctes = vec!["settled AS (
             UPDATE queue SET status = 'sent', lease_until = NULL
             WHERE id = ANY($1::int8[]) AND status = 'claimed')"
        .to_string()];
    if extras.complete {
        // The settle's snapshot still sees the settled steps claimed.
        ctes.push(
            "completed AS (
                 UPDATE instances AS i SET status = 'completed', ended_at = now()
                 WHERE i.id = ANY($1::int8[]) AND CASE WHEN i.status = 'open' THEN true END
                   AND NOT EXISTS (
                       SELECT 1 FROM queue AS q
                       WHERE q.id = i.id AND q.status IN ('pending', 'claimed')
                         AND q.id <> ALL ($1::int8[])
                       OFFSET 0))"
                .into(),
        );
    }
    if extras.leases {
        ctes.push(
            "released AS (
                 DELETE FROM customer_claims
                 WHERE customer = ANY (ARRAY(SELECT 'c-' || lpad(unnest($1::int8[])::text, 7, '0')))
                   AND holder = 'floor')"
                .into(),
        );
    }
    let insert = if extras.log_indexes {
        "INSERT INTO log (step, time, outcome, http_status, customer, journey, instance, step_name,
                          channel, template, reason, rule_hash, attempt)
         SELECT id, time, outcome, http_status, 'c-' || lpad(id::text, 7, '0'), 'fee_increase',
                'floor-' || id, 'alert', 'push', 'fee_increase_alert', 'step', 'hash-of-the-rules', 1
         FROM unnest($2::int8[], $3::timestamptz[], $4::text[], $5::int4[]) AS l(id, time, outcome, http_status)"
    } else {
        "INSERT INTO log (step, time, outcome, http_status)
         SELECT * FROM unnest($2::int8[], $3::timestamptz[], $4::text[], $5::int4[])"
    };
    format!("WITH {} {insert}", ctes.join(",\n"))
}

/// The statements of a claim: the claim, then (with `extras`) the send mark
/// and the batch reads.
struct Claimer {
    claim: postgres::Statement,
    mark: Option<postgres::Statement>,
    reads: Option<(postgres::Statement, postgres::Statement)>,
}

impl Claimer {
    fn prepare(c: &mut Client, extras: Extras) -> Self {
        Self {
            claim: c
                .prepare(if extras.leases { CLAIM_LEASES } else { CLAIM })
                .unwrap(),
            mark: extras.send_mark.then(|| c.prepare(SEND_MARK).unwrap()),
            reads: extras.reads.then(|| {
                (
                    c.prepare(READ_CUSTOMERS).unwrap(),
                    c.prepare(READ_HISTORIES).unwrap(),
                )
            }),
        }
    }

    /// Claims up to `batch` steps; marks and reads them as `extras` ask.
    fn claim(&self, c: &mut Client, batch: usize) -> Vec<i64> {
        let now = Utc::now();
        let ids: Vec<i64> = c
            .query(
                &self.claim,
                &[
                    &"push",
                    &now,
                    &(batch as i64),
                    &(now + chrono::Duration::seconds(300)),
                ],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.is_empty() {
            return ids;
        }
        if let Some((customers, histories)) = &self.reads {
            let names: Vec<String> = ids.iter().map(|id| format!("c-{id:07}")).collect();
            let rows = c.query(customers, &[&names]).unwrap();
            assert_eq!(rows.len(), ids.len(), "floor: a customer a step");
            std::hint::black_box(
                rows.iter()
                    .map(|r| r.get::<_, &str>(1).len())
                    .sum::<usize>(),
            );
            std::hint::black_box(c.query(histories, &[&ids]).unwrap());
        }
        if let Some(mark) = &self.mark {
            c.execute(mark, &[&ids, &Utc::now()]).unwrap();
        }
        ids
    }
}

/// One result: step, when it finished, HTTP status (`None`: failed, or no HTTP).
type Done = (i64, DateTime<Utc>, Option<u16>, bool);

pub struct Floor {
    schema: Schema,
    tls: bool,
    /// `synchronous_commit` on (durable; the default) or off, per session:
    /// a diagnosis of what waiting for the WAL flush costs, not a floor.
    sync_commit: bool,
    extras: Extras,
    /// The next step id to insert.
    next: i64,
}

/// What a run of the floor found, checked: every step inserted settled sent
/// once, one `sent` record each.
pub struct Run {
    pub rate: f64,
    /// WAL bytes written a step (the server's WAL insert position before
    /// and after: other tenants' writes meanwhile count too).
    pub wal: f64,
    /// CPU seconds of PostgreSQL and of this process while it ran (the
    /// timed part: no connecting, no check).
    pub cpu: (f64, f64),
}

/// The server's WAL insert position, in bytes. (Not `pg_stat_wal`: a
/// session reports its WAL use there at most once a second.)
fn wal(c: &mut Client) -> f64 {
    c.query_one(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::float8",
        &[],
    )
    .unwrap()
    .get(0)
}

impl Floor {
    /// A fresh schema with the floor's tables (and what `extras` needs).
    pub fn new(tls: bool, sync_commit: bool, extras: Extras) -> Self {
        let schema = Schema::new();
        let floor = Self {
            schema,
            tls,
            sync_commit,
            extras,
            next: 1,
        };
        let mut c = floor.connect();
        let mut ddl = String::from(
            "CREATE TABLE queue (
                 id bigint PRIMARY KEY,
                 channel text NOT NULL,
                 due_at timestamptz NOT NULL,
                 status text NOT NULL DEFAULT 'pending',
                 lease_until timestamptz,
                 customer text,
                 instance_id text,
                 step text,
                 sending_at timestamptz);
             CREATE INDEX queue_due ON queue (channel, due_at) WHERE status = 'pending';
             CREATE TABLE log (
                 seq bigserial PRIMARY KEY,
                 step bigint NOT NULL,
                 time timestamptz NOT NULL,
                 outcome text NOT NULL,
                 http_status integer,
                 customer text, journey text, instance text, step_name text, channel text,
                 template text, reason text, rule_hash text, attempt integer);",
        );
        if extras.step_indexes {
            ddl.push_str(
                "CREATE UNIQUE INDEX queue_instance_step ON queue (instance_id, step);
                 CREATE INDEX queue_claimed_by_customer ON queue (customer) WHERE status = 'claimed';
                 CREATE INDEX queue_unsettled_by_customer ON queue (customer)
                     WHERE status IN ('pending', 'claimed');
                 ALTER TABLE queue SET (fillfactor = 70);",
            );
        }
        if extras.log_indexes {
            ddl.push_str(
                "CREATE INDEX log_time ON log (time, seq);
                 CREATE INDEX log_journey ON log (journey, time, seq);
                 CREATE INDEX log_customer ON log (customer, time, seq);
                 CREATE INDEX log_outcome ON log (outcome, time, seq);
                 CREATE INDEX log_instance ON log (instance) WHERE outcome = 'sent';",
            );
        }
        if extras.complete {
            ddl.push_str(
                "CREATE TABLE instances (
                     id bigint PRIMARY KEY,
                     customer text NOT NULL,
                     journey text NOT NULL,
                     status text NOT NULL DEFAULT 'open',
                     started_at timestamptz NOT NULL,
                     ended_at timestamptz);
                 CREATE UNIQUE INDEX instances_one_open ON instances (customer, journey)
                     WHERE status = 'open';
                 CREATE INDEX instances_by_customer ON instances (customer, started_at);
                 CREATE INDEX instances_by_journey ON instances (journey, started_at);
                 CREATE INDEX instances_ended ON instances (ended_at) WHERE status <> 'open';",
            );
        }
        if extras.leases {
            ddl.push_str(
                "CREATE TABLE customer_claims (
                     customer text PRIMARY KEY,
                     holder text NOT NULL,
                     lease_until timestamptz NOT NULL);",
            );
        }
        if extras.reads {
            ddl.push_str(
                "CREATE TABLE customers (id text PRIMARY KEY, context jsonb NOT NULL);
                 CREATE INDEX log_step ON log (step) WHERE outcome = 'sent';",
            );
        }
        c.batch_execute(&ddl).unwrap();
        floor
    }

    /// A connection to the floor's schema, with nudge's TLS mode (prefer).
    fn connect(&self) -> Client {
        let mut config = postgres::Config::from_str(&pg_base()).unwrap();
        let mut client = if self.tls {
            config.ssl_mode(postgres::config::SslMode::Prefer);
            let mut builder = SslConnector::builder(SslMethod::tls_client()).unwrap();
            builder.set_verify(SslVerifyMode::NONE);
            let mut connector = MakeTlsConnector::new(builder.build());
            connector.set_callback(|ssl, _| {
                ssl.set_verify_hostname(false);
                Ok(())
            });
            config.connect(connector).unwrap()
        } else {
            config.ssl_mode(postgres::config::SslMode::Disable);
            config.connect(postgres::NoTls).unwrap()
        };
        client
            .batch_execute(&format!(
                "SET search_path TO {}; SET synchronous_commit = {}; SET plan_cache_mode = {}",
                self.schema.name,
                if self.sync_commit { "on" } else { "off" },
                if self.extras.custom_plans {
                    "force_custom_plan"
                } else {
                    "auto"
                }
            ))
            .unwrap();
        client
    }

    /// Inserts `n` steps due now (not timed), analyzed, so that the floor's
    /// plans are the best PostgreSQL has for it. Returns their ids.
    pub fn insert(&mut self, n: u64) -> std::ops::Range<i64> {
        let ids = self.next..self.next + n as i64;
        self.next = ids.end;
        let mut c = self.connect();
        c.execute(
            "INSERT INTO queue (id, channel, due_at, customer, instance_id, step)
             SELECT g, 'push', now() - interval '1 second', 'c-' || lpad(g::text, 7, '0'),
                    'fee_increase-' || g, 'alert'
             FROM generate_series($1::int8, $2::int8 - 1) AS g",
            &[&ids.start, &ids.end],
        )
        .unwrap();
        let mut tables = vec!["queue", "log"];
        if self.extras.complete {
            c.execute(
                "INSERT INTO instances (id, customer, journey, started_at)
                 SELECT g, 'c-' || lpad(g::text, 7, '0'), 'fee_increase', now()
                 FROM generate_series($1::int8, $2::int8 - 1) AS g",
                &[&ids.start, &ids.end],
            )
            .unwrap();
            tables.push("instances");
        }
        if self.extras.leases {
            tables.push("customer_claims");
        }
        if self.extras.reads {
            c.execute(
                "INSERT INTO customers (id, context)
                 SELECT 'c-' || lpad(g::text, 7, '0'),
                        jsonb_build_object('id', 'c-' || lpad(g::text, 7, '0'), 'app_installed', true,
                                           'segment', 'retail', 'attributes', jsonb_build_object('tier', 'gold'))
                 FROM generate_series($1::int8, $2::int8 - 1) AS g",
                &[&ids.start, &ids.end],
            )
            .unwrap();
            tables.push("customers");
        }
        c.batch_execute(&format!("ANALYZE {}", tables.join(", ")))
            .unwrap();
        ids
    }

    /// Sends the steps `ids` (all of them due) with `channel` (`None`: the
    /// store's work alone, each send accepted at once) and concurrency
    /// `concurrency`, claims `batch` at a time, one batch ahead; returns the
    /// rate once checked in the store: every step sent, one `sent` record
    /// each.
    pub fn run(
        &self,
        rt: &tokio::runtime::Runtime,
        channel: Option<Arc<dyn Channel>>,
        message: fn(i64) -> Message,
        ids: std::ops::Range<i64>,
        batch: usize,
        concurrency: usize,
    ) -> Run {
        let n = (ids.end - ids.start) as usize;
        let mut claimer_conn = self.connect();
        let mut settler_conn = self.connect();
        let claimer = Claimer::prepare(&mut claimer_conn, self.extras);
        let settle = settler_conn.prepare(&settle_sql(self.extras)).unwrap();
        let (batch_tx, batch_rx) = tokio::sync::mpsc::channel::<Vec<i64>>(1);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Done>();
        let wal_before = wal(&mut settler_conn);
        let cpu_before = crate::cpu_seconds();
        let start = Instant::now();
        let claiming = std::thread::spawn(move || loop {
            let ids = claimer.claim(&mut claimer_conn, batch);
            if ids.is_empty() || batch_tx.blocking_send(ids).is_err() {
                break;
            }
        });
        let sender = rt.spawn(async move {
            let steps = futures::stream::unfold(batch_rx, |mut rx| async move {
                rx.recv().await.map(|batch| (batch, rx))
            })
            .flat_map(futures::stream::iter);
            let mut sent = std::pin::pin!(steps
                .map(|id| {
                    let channel = channel.clone();
                    async move {
                        match channel {
                            Some(channel) => {
                                let m = message(id);
                                let r = channel.send_answered(&m).await;
                                (
                                    id,
                                    Utc::now(),
                                    r.as_ref().ok().copied().flatten(),
                                    r.is_ok(),
                                )
                            }
                            None => (id, Utc::now(), None, true),
                        }
                    }
                })
                .buffer_unordered(concurrency));
            while let Some(done) = sent.next().await {
                if done_tx.send(done).is_err() {
                    break;
                }
            }
        });
        let settler = std::thread::spawn(move || {
            let mut settled = 0;
            while let Ok(first) = done_rx.recv() {
                let mut group = vec![first];
                let deadline = Instant::now() + LINGER;
                while group.len() < SETTLE_GROUP {
                    match done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(done) => group.push(done),
                        Err(_) => break,
                    }
                }
                let sent: Vec<i64> = group.iter().filter(|d| d.3).map(|d| d.0).collect();
                let steps: Vec<i64> = group.iter().map(|d| d.0).collect();
                let times: Vec<DateTime<Utc>> = group.iter().map(|d| d.1).collect();
                let outcomes: Vec<&str> = group
                    .iter()
                    .map(|d| if d.3 { "sent" } else { "failed" })
                    .collect();
                let statuses: Vec<Option<i32>> = group.iter().map(|d| d.2.map(i32::from)).collect();
                settler_conn
                    .execute(&settle, &[&sent, &steps, &times, &outcomes, &statuses])
                    .unwrap();
                settled += group.len();
            }
            (settled, wal(&mut settler_conn))
        });
        claiming.join().unwrap();
        rt.block_on(sender).unwrap();
        let (settled, wal_after) = settler.join().unwrap();
        let elapsed = start.elapsed();
        let cpu_after = crate::cpu_seconds();
        assert_eq!(settled, n, "the floor settled every step it claimed");
        self.check(ids);
        Run {
            rate: n as f64 / elapsed.as_secs_f64(),
            wal: (wal_after - wal_before) / n as f64,
            cpu: (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1),
        }
    }

    /// Every step of `ids` is settled sent, with one `sent` record each (and
    /// with `extras`, its instance completed and no customer lease left).
    fn check(&self, ids: std::ops::Range<i64>) {
        let n = ids.end - ids.start;
        let mut c = self.connect();
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM queue WHERE id >= $1 AND id < $2 AND status = 'sent'),
                        (SELECT count(*) FROM queue WHERE id >= $1 AND id < $2),
                        (SELECT count(*) FROM log WHERE step >= $1 AND step < $2 AND outcome = 'sent'),
                        (SELECT count(DISTINCT step) FROM log WHERE step >= $1 AND step < $2 AND outcome = 'sent'),
                        (SELECT count(*) FROM log WHERE step >= $1 AND step < $2)",
                &[&ids.start, &ids.end],
            )
            .unwrap();
        let counts: Vec<i64> = (0..5).map(|i| row.get(i)).collect();
        assert_eq!(
            counts,
            vec![n; 5],
            "floor: steps sent, steps, `sent` records, steps logged sent, records"
        );
        if self.extras.complete {
            let completed: i64 = c
                .query_one(
                    "SELECT count(*) FROM instances WHERE id >= $1 AND id < $2 AND status = 'completed'",
                    &[&ids.start, &ids.end],
                )
                .unwrap()
                .get(0);
            assert_eq!(completed, n, "floor: instances completed");
        }
        if self.extras.leases {
            let held: i64 = c
                .query_one("SELECT count(*) FROM customer_claims", &[])
                .unwrap()
                .get(0);
            assert_eq!(held, 0, "floor: customer leases left");
        }
    }

    /// The store's work alone, one connection, one statement at a time: claim
    /// `batch`, settle it in groups of `SETTLE_GROUP`; (claim, settle) µs a
    /// step and steps/s.
    pub fn serial(&self, ids: std::ops::Range<i64>, batch: usize) -> (f64, f64, f64) {
        let n = (ids.end - ids.start) as usize;
        let mut c = self.connect();
        let claimer = Claimer::prepare(&mut c, self.extras);
        let settle = c.prepare(&settle_sql(self.extras)).unwrap();
        let (mut claim_time, mut settle_time) = (Duration::ZERO, Duration::ZERO);
        let mut done = 0;
        loop {
            let t = Instant::now();
            let claimed = claimer.claim(&mut c, batch);
            claim_time += t.elapsed();
            if claimed.is_empty() {
                break;
            }
            let t = Instant::now();
            for group in claimed.chunks(SETTLE_GROUP) {
                let now = Utc::now();
                let times = vec![now; group.len()];
                let outcomes = vec!["sent"; group.len()];
                let statuses: Vec<Option<i32>> = vec![None; group.len()];
                c.execute(&settle, &[&group, &group, &times, &outcomes, &statuses])
                    .unwrap();
            }
            settle_time += t.elapsed();
            done += claimed.len();
        }
        assert_eq!(done, n);
        self.check(ids);
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        (
            per(claim_time),
            per(settle_time),
            n as f64 / (claim_time + settle_time).as_secs_f64(),
        )
    }
}
