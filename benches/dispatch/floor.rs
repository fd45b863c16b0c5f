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
//! `--floor-extra` adds one of those costs at a time (see [`Extra`]).

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

/// A cost of nudge's beside the floor's, added to it for `--floor-extra`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// The floor alone.
    None,
    /// The log carries nudge's columns (customer, journey, instance, step,
    /// channel, template, reason, rule hash, attempt) and nudge's indexes on
    /// `dispatch_log`: (time, seq), (journey, time, seq),
    /// (customer, time, seq), (outcome, time, seq) and the sent steps'
    /// (instance).
    LogIndexes,
    /// Each step belongs to an open instance (a row of its own with nudge's
    /// one-open-instance partial unique index, (customer, journey) where
    /// open); the settle completes it in the same statement.
    Complete,
    /// A claim takes a lease on each step's customer (`customer_claims`,
    /// upsert in the claim's statement) and the settle ends it (delete in
    /// the settle's statement), as nudge does for caps across replicas.
    Leases,
    /// After each claim, the batch's sends marked (`sending_at`) in one
    /// more statement before they start, as nudge does.
    SendMark,
}

impl FromStr for Extra {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => Self::None,
            "log-indexes" => Self::LogIndexes,
            "complete" => Self::Complete,
            "leases" => Self::Leases,
            "send-mark" => Self::SendMark,
            other => {
                return Err(format!(
                    "--floor-extra {other}: one of none, log-indexes, complete, leases, send-mark"
                ))
            }
        })
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

/// The same, taking a lease on each claimed step's customer (`Extra::Leases`).
const CLAIM_LEASES: &str = "WITH claimed AS (
         UPDATE queue SET status = 'claimed', lease_until = $4
         WHERE id = ANY (ARRAY(
             SELECT id FROM queue
             WHERE status = 'pending' AND channel = $1 AND due_at <= $2
             ORDER BY due_at LIMIT $3
             FOR UPDATE SKIP LOCKED))
         RETURNING id, customer),
     held AS (
         INSERT INTO customer_claims (customer, holder, lease_until)
         SELECT DISTINCT customer, 'floor', $4 FROM claimed ORDER BY customer
         ON CONFLICT (customer) DO UPDATE SET lease_until = excluded.lease_until)
     SELECT id FROM claimed";

/// Marks the steps `$1` as being sent since `$2` (`Extra::SendMark`).
const SEND_MARK: &str =
    "UPDATE queue SET sending_at = $2 WHERE id = ANY($1::int8[]) AND status = 'claimed'";

/// Settles the steps sent `$1` and logs every result (`$2`-`$5`: step,
/// time, outcome, HTTP status), in one statement.
const SETTLE: &str = "WITH settled AS (
         UPDATE queue SET status = 'sent', lease_until = NULL
         WHERE id = ANY($1::int8[]) AND status = 'claimed')
     INSERT INTO log (step, time, outcome, http_status)
     SELECT * FROM unnest($2::int8[], $3::timestamptz[], $4::text[], $5::int4[])";

/// The same, with nudge's log columns (`Extra::LogIndexes`).
const SETTLE_WIDE_LOG: &str = "WITH settled AS (
         UPDATE queue SET status = 'sent', lease_until = NULL
         WHERE id = ANY($1::int8[]) AND status = 'claimed')
     INSERT INTO log (step, time, outcome, http_status, customer, journey, instance, step_name,
                      channel, template, reason, rule_hash, attempt)
     SELECT id, time, outcome, http_status, 'c-' || lpad(id::text, 7, '0'), 'fee_increase',
            'floor-' || id, 'alert', 'push', 'fee_increase_alert', 'step', 'hash-of-the-rules', 1
     FROM unnest($2::int8[], $3::timestamptz[], $4::text[], $5::int4[]) AS l(id, time, outcome, http_status)";

/// The same, completing each settled step's instance (`Extra::Complete`).
const SETTLE_COMPLETE: &str = "WITH settled AS (
         UPDATE queue SET status = 'sent', lease_until = NULL
         WHERE id = ANY($1::int8[]) AND status = 'claimed'),
     completed AS (
         UPDATE instances SET status = 'completed', ended_at = now()
         WHERE id = ANY($1::int8[]) AND status = 'open')
     INSERT INTO log (step, time, outcome, http_status)
     SELECT * FROM unnest($2::int8[], $3::timestamptz[], $4::text[], $5::int4[])";

/// The same, ending the customers' leases (`Extra::Leases`).
const SETTLE_LEASES: &str = "WITH settled AS (
         UPDATE queue SET status = 'sent', lease_until = NULL
         WHERE id = ANY($1::int8[]) AND status = 'claimed'),
     released AS (
         DELETE FROM customer_claims
         WHERE customer = ANY (ARRAY(SELECT 'c-' || lpad(unnest($1::int8[])::text, 7, '0')))
           AND holder = 'floor')
     INSERT INTO log (step, time, outcome, http_status)
     SELECT * FROM unnest($2::int8[], $3::timestamptz[], $4::text[], $5::int4[])";

/// One result: step, when it finished, HTTP status (`None`: failed, or no HTTP).
type Done = (i64, DateTime<Utc>, Option<u16>, bool);

pub struct Floor {
    schema: Schema,
    tls: bool,
    /// `synchronous_commit` on (durable; the default) or off, per session:
    /// a diagnosis of what waiting for the WAL flush costs, not a floor.
    sync_commit: bool,
    extra: Extra,
    /// The next step id to insert.
    next: i64,
}

/// What a run of the floor found, checked: every step inserted settled sent
/// once, one `sent` record each.
pub struct Run {
    pub rate: f64,
    /// WAL bytes written a step, WAL syncs a claimed batch (`pg_stat_wal`:
    /// the whole server's, so other tenants' writes count too).
    pub wal: (f64, f64),
}

/// `pg_stat_wal`'s bytes and syncs so far.
fn wal(c: &mut Client) -> (f64, f64) {
    let row = c
        .query_one(
            "SELECT wal_bytes::float8, wal_sync::float8 FROM pg_stat_wal",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

impl Floor {
    /// A fresh schema with the floor's tables (and those `extra` needs).
    pub fn new(tls: bool, sync_commit: bool, extra: Extra) -> Self {
        let schema = Schema::new();
        let floor = Self {
            schema,
            tls,
            sync_commit,
            extra,
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
        match extra {
            Extra::LogIndexes => ddl.push_str(
                "CREATE INDEX log_time ON log (time, seq);
                 CREATE INDEX log_journey ON log (journey, time, seq);
                 CREATE INDEX log_customer ON log (customer, time, seq);
                 CREATE INDEX log_outcome ON log (outcome, time, seq);
                 CREATE INDEX log_instance ON log (instance) WHERE outcome = 'sent';",
            ),
            Extra::Complete => ddl.push_str(
                "CREATE TABLE instances (
                     id bigint PRIMARY KEY,
                     customer text NOT NULL,
                     journey text NOT NULL,
                     status text NOT NULL DEFAULT 'open',
                     ended_at timestamptz);
                 CREATE UNIQUE INDEX instances_one_open ON instances (customer, journey)
                     WHERE status = 'open';",
            ),
            Extra::Leases => ddl.push_str(
                "CREATE TABLE customer_claims (
                     customer text PRIMARY KEY,
                     holder text NOT NULL,
                     lease_until timestamptz NOT NULL);",
            ),
            Extra::None | Extra::SendMark => {}
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
                "SET search_path TO {}; SET synchronous_commit = {}",
                self.schema.name,
                if self.sync_commit { "on" } else { "off" }
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
            "INSERT INTO queue (id, channel, due_at, customer)
             SELECT g, 'push', now() - interval '1 second', 'c-' || lpad(g::text, 7, '0')
             FROM generate_series($1::int8, $2::int8 - 1) AS g",
            &[&ids.start, &ids.end],
        )
        .unwrap();
        if self.extra == Extra::Complete {
            c.execute(
                "INSERT INTO instances (id, customer, journey)
                 SELECT g, 'c-' || lpad(g::text, 7, '0'), 'fee_increase'
                 FROM generate_series($1::int8, $2::int8 - 1) AS g",
                &[&ids.start, &ids.end],
            )
            .unwrap();
        }
        c.batch_execute(match self.extra {
            Extra::Complete => "ANALYZE queue, log, instances",
            Extra::Leases => "ANALYZE queue, log, customer_claims",
            _ => "ANALYZE queue, log",
        })
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
        let extra = self.extra;
        let claim_sql = if extra == Extra::Leases {
            CLAIM_LEASES
        } else {
            CLAIM
        };
        let settle_sql = match extra {
            Extra::LogIndexes => SETTLE_WIDE_LOG,
            Extra::Complete => SETTLE_COMPLETE,
            Extra::Leases => SETTLE_LEASES,
            Extra::None | Extra::SendMark => SETTLE,
        };
        let claim = claimer_conn.prepare(claim_sql).unwrap();
        let mark = claimer_conn.prepare(SEND_MARK).unwrap();
        let settle = settler_conn.prepare(settle_sql).unwrap();
        let (batch_tx, batch_rx) = tokio::sync::mpsc::channel::<Vec<i64>>(1);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Done>();
        let wal_before = wal(&mut settler_conn);
        let start = Instant::now();
        let claimer = std::thread::spawn(move || {
            let lease = chrono::Duration::seconds(300);
            loop {
                let now = Utc::now();
                let rows = claimer_conn
                    .query(&claim, &[&"push", &now, &(batch as i64), &(now + lease)])
                    .unwrap();
                if rows.is_empty() {
                    break;
                }
                let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                if extra == Extra::SendMark {
                    claimer_conn.execute(&mark, &[&ids, &Utc::now()]).unwrap();
                }
                if batch_tx.blocking_send(ids).is_err() {
                    break;
                }
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
        claimer.join().unwrap();
        rt.block_on(sender).unwrap();
        let (settled, wal_after) = settler.join().unwrap();
        let elapsed = start.elapsed();
        assert_eq!(settled, n, "the floor settled every step it claimed");
        self.check(ids);
        Run {
            rate: n as f64 / elapsed.as_secs_f64(),
            wal: (
                (wal_after.0 - wal_before.0) / n as f64,
                (wal_after.1 - wal_before.1) / n as f64 * batch as f64,
            ),
        }
    }

    /// Every step of `ids` is settled sent, with one `sent` record each.
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
    }

    /// The store's work alone, one connection, one statement at a time: claim
    /// `batch`, settle it in groups of `SETTLE_GROUP`; (claim, settle) µs a
    /// step and steps/s.
    pub fn serial(&self, ids: std::ops::Range<i64>, batch: usize) -> (f64, f64, f64) {
        let n = (ids.end - ids.start) as usize;
        let mut c = self.connect();
        let claim = c
            .prepare(if self.extra == Extra::Leases {
                CLAIM_LEASES
            } else {
                CLAIM
            })
            .unwrap();
        let settle = c
            .prepare(match self.extra {
                Extra::LogIndexes => SETTLE_WIDE_LOG,
                Extra::Complete => SETTLE_COMPLETE,
                Extra::Leases => SETTLE_LEASES,
                Extra::None | Extra::SendMark => SETTLE,
            })
            .unwrap();
        let mark = c.prepare(SEND_MARK).unwrap();
        let (mut claim_time, mut settle_time) = (Duration::ZERO, Duration::ZERO);
        let mut done = 0;
        loop {
            let t = Instant::now();
            let now = Utc::now();
            let claimed: Vec<i64> = c
                .query(
                    &claim,
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
            if self.extra == Extra::SendMark && !claimed.is_empty() {
                c.execute(&mark, &[&claimed, &Utc::now()]).unwrap();
            }
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
