//! Benchmark 9: the review at scale (issue 14). A SQLite store of N
//! dispatch-log records (default 1 M; the issue's figure is 10 M) with the
//! instances, received events and customer contexts behind them, written by
//! bulk SQL in large transactions (the instances' count triggers of schema
//! v10 run for every row, as they do in the daemon), then the log's records
//! folded into the outcome counts as the daemon does every 5 s
//! (`Store::fold_review_counts`, timed). Then, read through the review's own
//! code (`review::log::page`, `review::record::decision_record`,
//! `review::funnel::funnels` on `SqliteStore::open_reader`, as the admin
//! page and the CLI read), many times each, p50/p99/max:
//!
//! - the page's log query (100 records, the page's default): the first
//!   page, page 1,000 through the keyset cursor, and pages filtered by
//!   journey, channel and outcome, customer, and a day's time range;
//! - a customer's decision record (`nudge explain`);
//! - the funnel of every journey and of one;
//!
//! and beside them, on the same store in the same run, the raw indexed read:
//! one log record by primary key and 50 records by an index range, by
//! rusqlite directly. Once each, for scale: the full-scan GROUP BY queries
//! the funnel ran before the count tables.
//!
//!   cargo bench --bench review [-- --records 10000000 --reps 200 --path target/review-bench.db --keep 1]

mod common;

use std::path::PathBuf;
use std::time::Instant;

use chrono::{DateTime, Utc};
use common::*;
use nudge::context::CustomerContext;
use nudge::model::Outcome;
use nudge::review::funnel::funnels;
use nudge::review::log::page;
use nudge::review::record::decision_record;
use nudge::review::{LogCursor, LogFilter, ReviewRead};
use nudge::store::SqliteStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{params, Connection};

/// Records per page on the admin page (`admin::page::PAGE_SIZE`).
const PAGE: usize = nudge::admin::page::PAGE_SIZE;
/// The target for every review read, p99.
const TARGET_MS: f64 = 100.0;
const DAY_MS: i64 = 86_400_000;

/// (journey, its steps as (step, channel)).
const JOURNEYS: [(&str, &[(&str, &str)]); 4] = [
    (
        "unsigned_loan",
        &[("push", "push"), ("email", "email"), ("call", "call_task")],
    ),
    ("fee_increase", &[("alert", "push")]),
    ("card_activation", &[("push", "push"), ("email", "email")]),
    ("payment_failed", &[("push", "push"), ("call", "call_task")]),
];

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .to_utc()
}

/// What the generator wrote, for picking query parameters.
struct Written {
    records: i64,
    instances: u64,
    customers: u64,
    first_ms: i64,
    last_ms: i64,
}

/// One record's columns (time, customer, journey, instance, step, channel,
/// outcome, reason, rule hash, attempt).
struct Rec<'a> {
    time: i64,
    step: &'a str,
    channel: &'a str,
    outcome: &'a str,
    reason: String,
    attempt: i64,
}

/// Writes instances with their log records until `records` are written:
/// four journeys, 180 days, one customer per 8 records, 10 % of customers
/// held out and 2 % shadowed per journey, three script versions per
/// journey, live steps sent (most), retried, failed, suppressed, expired or
/// deferred, 30 % converting. Instances start in time order and their
/// records follow them, so the log is in time order per instance.
fn generate(conn: &mut Connection, records: u64, rng: &mut StdRng) -> Written {
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")
        .unwrap();
    let customers = (records / 8).max(100);
    let span_ms = 180 * DAY_MS;
    let start_ms = t0().timestamp_millis();
    // Instances: about 2.4 records each.
    let instances = records * 10 / 24;
    let mut written = 0u64;
    let mut i = 0u64;
    let mut last_ms = start_ms;
    let now_ms = start_ms + span_ms;
    let batch = 50_000;
    while written < records {
        let tx = conn.transaction().unwrap();
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO instances (id, customer, journey, key, status, mode, category, started_at, ended_at, rule_hash, trigger_event, vars, decision_inputs)
                     VALUES (?1, ?2, ?3, ?1, ?4, ?5, 'service', ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .unwrap();
            let mut step_ins = tx
                .prepare_cached(
                    "INSERT INTO steps (instance_id, step, seq, channel, template, planned_at, due_at, status, attempt)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1)",
                )
                .unwrap();
            let mut log = tx
                .prepare_cached(
                    "INSERT INTO dispatch_log (time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                )
                .unwrap();
            let mut received = tx
                .prepare_cached(
                    "INSERT INTO received_events (customer, event_id, event_type, event_time, received_at, context_updated, not_started)
                     VALUES (?1, ?2, ?3, ?4, ?4, 1, '[]')",
                )
                .unwrap();
            for _ in 0..batch {
                if written >= records {
                    break;
                }
                // Starts evenly over the span, in instance order.
                let started = start_ms + (i as i128 * span_ms as i128 / instances as i128) as i64;
                let c = rng.gen_range(0..customers);
                let customer = format!("c-{c:08}");
                let (journey, steps) = JOURNEYS[rng.gen_range(0..JOURNEYS.len())];
                // The control group by a stable hash of customer and journey.
                let draw = (c.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ journey.len() as u64) % 100;
                let mode = match draw {
                    0..10 => "held_out",
                    10..12 => "shadow",
                    _ => "live",
                };
                let version = ((started - start_ms) * 3 / span_ms).min(2);
                let rule_hash = format!("{journey}-v{version}");
                let id = format!("{journey}-{i:010}");
                let trigger = format!("ev-{i}");
                let converted = rng.gen_bool(if mode == "live" { 0.30 } else { 0.22 });
                let exit_after = rng.gen_range(0..=steps.len());
                let exit_ms = started + exit_after as i64 * DAY_MS - DAY_MS / 2;
                let last_due = started + (steps.len() as i64 - 1) * DAY_MS;
                let (status, ended) = if converted && exit_ms < now_ms {
                    ("converted", Some(exit_ms.max(started + 60_000)))
                } else if last_due + DAY_MS < now_ms {
                    ("completed", Some(last_due + 60_000))
                } else {
                    ("open", None)
                };
                ins.execute(params![
                    id,
                    customer,
                    journey,
                    status,
                    mode,
                    started,
                    ended,
                    rule_hash,
                    trigger,
                    r#"{"contact":"someone@example.com"}"#,
                    format!(r#"{{"event":{{"id":"{trigger}","type":"{journey}.started"}},"customer":{{"has_email":true}}}}"#),
                ])
                .unwrap();
                received
                    .execute(params![
                        customer,
                        trigger,
                        format!("{journey}.started"),
                        started
                    ])
                    .unwrap();
                let mut recs: Vec<Rec> = Vec::with_capacity(6);
                for (k, (step, channel)) in steps.iter().enumerate() {
                    let due = started + k as i64 * DAY_MS;
                    let step_status;
                    if status == "converted" && k >= exit_after {
                        recs.push(Rec {
                            time: exit_ms.max(started + 60_000),
                            step,
                            channel,
                            outcome: "converted",
                            reason: format!("{journey}.done ended the journey; step not sent"),
                            attempt: 0,
                        });
                        step_status = "converted";
                    } else if mode != "live" {
                        let (outcome, reason) = match mode {
                            "held_out" => (
                                "held_out",
                                "control group: not sent, to measure the journey's effect",
                            ),
                            _ => ("shadow", "shadow mode: would send"),
                        };
                        recs.push(Rec {
                            time: due,
                            step,
                            channel,
                            outcome,
                            reason: reason.into(),
                            attempt: 1,
                        });
                        step_status = outcome;
                    } else {
                        let sent = |time, attempt| Rec {
                            time,
                            step,
                            channel,
                            outcome: "sent",
                            reason: format!("step {step} of {journey}"),
                            attempt,
                        };
                        step_status = match rng.gen_range(0..100) {
                            0..55 => {
                                recs.push(sent(due, 1));
                                "sent"
                            }
                            55..65 => {
                                recs.push(Rec {
                                    time: due,
                                    step,
                                    channel,
                                    outcome: "retrying",
                                    reason: "503 Service Unavailable; attempt 1 of 5, next in 2s"
                                        .into(),
                                    attempt: 1,
                                });
                                recs.push(sent(due + 2_000, 2));
                                "sent"
                            }
                            65..70 => {
                                recs.push(Rec {
                                    time: due,
                                    step,
                                    channel,
                                    outcome: "failed",
                                    reason: "400 Bad Request".into(),
                                    attempt: 1,
                                });
                                "failed"
                            }
                            70..80 => {
                                recs.push(Rec {
                                    time: due,
                                    step,
                                    channel,
                                    outcome: "suppressed",
                                    reason: format!("no marketing consent for {channel}"),
                                    attempt: 1,
                                });
                                "suppressed"
                            }
                            80..85 => {
                                recs.push(Rec {
                                    time: due,
                                    step,
                                    channel,
                                    outcome: "suppressed",
                                    reason: "frequency cap: 3 messages within 7d".into(),
                                    attempt: 1,
                                });
                                "suppressed"
                            }
                            85..92 => {
                                recs.push(Rec {
                                    time: due + 7_200_000,
                                    step,
                                    channel,
                                    outcome: "expired",
                                    reason: format!(
                                        "due {}h ago, past the {channel} lateness bound of 1h",
                                        rng.gen_range(2..9)
                                    ),
                                    attempt: 1,
                                });
                                "expired"
                            }
                            _ => {
                                let until = due + 8 * 3_600_000;
                                recs.push(Rec {
                                    time: due,
                                    step,
                                    channel,
                                    outcome: "deferred",
                                    reason: "quiet hours 21:00-08:00 in Australia/Sydney".into(),
                                    attempt: 1,
                                });
                                recs.push(sent(until, 2));
                                "sent"
                            }
                        };
                    }
                    // Steps of every 10th instance (no review read but a
                    // journey's plan, from its latest instance, reads them).
                    if i.is_multiple_of(10) {
                        step_ins
                            .execute(params![
                                id,
                                step,
                                k as i64,
                                channel,
                                format!("{journey}_{step}"),
                                started,
                                due,
                                step_status
                            ])
                            .unwrap();
                    }
                }
                for r in &recs {
                    let sent = r.outcome == "sent";
                    log.execute(params![
                        r.time,
                        customer,
                        journey,
                        id,
                        r.step,
                        r.channel,
                        format!("{journey}_{}", r.step),
                        r.outcome,
                        r.reason,
                        rule_hash,
                        r.attempt,
                        sent.then(|| rng.gen_range(5..2_000i64)),
                        (r.outcome == "converted").then(|| format!("exit-{i}")),
                        sent.then_some(202i64),
                        sent.then(|| rng.gen_range(5..800i64)),
                    ])
                    .unwrap();
                    last_ms = last_ms.max(r.time);
                }
                written += recs.len() as u64;
                i += 1;
            }
        }
        tx.commit().unwrap();
    }
    // A context for every customer with an instance.
    let tx = conn.transaction().unwrap();
    {
        let mut ins = tx
            .prepare("INSERT OR IGNORE INTO customers (id, context, updated_at) SELECT DISTINCT customer, ?1, ?2 FROM instances")
            .unwrap();
        let mut ctx = CustomerContext::new("x");
        ctx.email = Some("someone@example.com".into());
        ctx.phone = Some("+61400000001".into());
        ctx.timezone = Some("Australia/Sydney".into());
        ins.execute(params![serde_json::to_string(&ctx).unwrap(), start_ms])
            .unwrap();
    }
    tx.commit().unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")
        .unwrap();
    Written {
        records: conn
            .query_row("SELECT max(seq) FROM dispatch_log", [], |r| r.get(0))
            .unwrap(),
        instances: i,
        customers,
        first_ms: start_ms,
        last_ms,
    }
}

/// Times of `reps` calls of `f` (given the repetition), in ms, sorted.
fn time(reps: usize, mut f: impl FnMut(usize)) -> Vec<f64> {
    // One untimed call: the statement prepared, the first pages read.
    f(reps);
    let mut v: Vec<f64> = (0..reps)
        .map(|k| {
            let s = Instant::now();
            f(k);
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn fmt_ms(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

fn summary(v: &[f64]) -> String {
    format!(
        "p50 {} / p99 {} / max {} ms",
        fmt_ms(pct(v, 0.5)),
        fmt_ms(pct(v, 0.99)),
        fmt_ms(v[v.len() - 1])
    )
}

fn main() {
    let records: u64 = arg("records", 1_000_000);
    let reps: usize = arg("reps", 200);
    let keep: u8 = arg("keep", 0);
    let path: PathBuf = arg(
        "path",
        PathBuf::from(format!("target/review-bench-{records}.db")),
    );
    println!("machine: {}", machine());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load before: {}", load.trim());
    let reuse = keep == 1 && path.exists();
    let gen_s;
    let written;
    if reuse {
        let conn = Connection::open(&path).unwrap();
        let q = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        written = Written {
            records: q("SELECT max(seq) FROM dispatch_log"),
            instances: q("SELECT count(*) FROM instances") as u64,
            customers: q("SELECT count(*) FROM customers") as u64,
            first_ms: q("SELECT min(time) FROM dispatch_log"),
            last_ms: q("SELECT max(time) FROM dispatch_log"),
        };
        gen_s = 0.0;
        println!("reusing {}", path.display());
    } else {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        // The schema as the daemon makes it (v10: with the count triggers).
        SqliteStore::migrate(&path).unwrap();
        let mut conn = Connection::open(&path).unwrap();
        let mut rng = StdRng::seed_from_u64(14);
        let s = Instant::now();
        written = generate(&mut conn, records, &mut rng);
        gen_s = s.elapsed().as_secs_f64();
        println!(
            "generated {} records, {} instances in {gen_s:.0} s",
            written.records, written.instances
        );
    }
    // The daemon folds every few seconds; a store that has run is folded.
    let s = Instant::now();
    let folded =
        nudge::store::Store::fold_review_counts(&SqliteStore::open(&path).unwrap()).unwrap();
    let fold_s = s.elapsed().as_secs_f64();
    println!(
        "folded {folded} records into the outcome counts in {fold_s:.1} s ({})",
        fmt_rate(folded as f64 / fold_s.max(1e-9))
    );
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let store = SqliteStore::open_reader(&path, nudge::config::DEFAULT_CACHE_MB).unwrap();
    let r: &dyn ReviewRead = &store;
    let raw = Connection::open(&path).unwrap();
    let rng = StdRng::seed_from_u64(9);
    let customer_of = |rng: &mut StdRng| -> String {
        // A customer with records (ids are drawn from 0..customers).
        format!("c-{:08}", rng.gen_range(0..written.customers.max(1)))
    };
    let day = |rng: &mut StdRng| -> (DateTime<Utc>, DateTime<Utc>) {
        let days = ((written.last_ms - written.first_ms) / DAY_MS).max(1);
        let from = written.first_ms + rng.gen_range(0..days) * DAY_MS;
        (
            DateTime::from_timestamp_millis(from).unwrap(),
            DateTime::from_timestamp_millis(from + DAY_MS).unwrap(),
        )
    };
    // The cursor of page 1,000 of the unfiltered and the journey's log.
    let deep = |filter: &LogFilter| -> Option<LogCursor> {
        let mut after = None;
        for _ in 0..999 {
            after = page(r, filter, after, PAGE).unwrap().next;
            after?;
        }
        after
    };
    let all = LogFilter::default();
    let journey = LogFilter {
        journey: Some("unsigned_loan".into()),
        ..LogFilter::default()
    };
    let deep_all = deep(&all);
    let deep_journey = deep(&journey);
    let mut rows: Vec<(&str, Vec<f64>, bool)> = Vec::new();
    let check = |n: usize| assert!(n > 0, "an empty read measures nothing");
    rows.push((
        "log page: first",
        time(reps, |_| {
            check(page(r, &all, None, PAGE).unwrap().records.len())
        }),
        true,
    ));
    rows.push((
        "log page: 1,000th (keyset)",
        time(reps, |_| {
            check(page(r, &all, deep_all, PAGE).unwrap().records.len())
        }),
        true,
    ));
    rows.push((
        "log page: journey, first",
        time(reps, |_| {
            check(page(r, &journey, None, PAGE).unwrap().records.len())
        }),
        true,
    ));
    rows.push((
        "log page: journey, 1,000th",
        time(reps, |_| {
            check(page(r, &journey, deep_journey, PAGE).unwrap().records.len())
        }),
        true,
    ));
    let failed_email = LogFilter {
        channel: Some("email".into()),
        outcome: Some(Outcome::Failed),
        ..LogFilter::default()
    };
    rows.push((
        "log page: channel + outcome (email, failed)",
        time(reps, |_| {
            check(page(r, &failed_email, None, PAGE).unwrap().records.len())
        }),
        true,
    ));
    let mut rng2 = rng.clone();
    rows.push((
        "log page: customer (random)",
        time(reps, |_| {
            let filter = LogFilter {
                customer: Some(customer_of(&mut rng2)),
                ..LogFilter::default()
            };
            page(r, &filter, None, PAGE).unwrap();
        }),
        true,
    ));
    let mut rng3 = rng.clone();
    rows.push((
        "log page: one day (random)",
        time(reps, |_| {
            let (since, until) = day(&mut rng3);
            let filter = LogFilter {
                since: Some(since),
                until: Some(until),
                ..LogFilter::default()
            };
            check(page(r, &filter, None, PAGE).unwrap().records.len());
        }),
        true,
    ));
    let mut rng4 = rng.clone();
    rows.push((
        "customer record (random customer)",
        time(reps, |_| {
            decision_record(r, &customer_of(&mut rng4), false).unwrap();
        }),
        true,
    ));
    rows.push((
        "funnel: all journeys",
        time(reps, |_| check(funnels(r, None).unwrap().journeys.len())),
        true,
    ));
    rows.push((
        "funnel: one journey",
        time(reps, |_| {
            check(funnels(r, Some("unsigned_loan")).unwrap().journeys.len())
        }),
        true,
    ));
    // The raw indexed reads, on the same file, in the same run.
    let mut pk = raw
        .prepare(&format!(
            "SELECT {} FROM dispatch_log WHERE seq = ?1",
            "seq, time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms"
        ))
        .unwrap();
    let mut range = raw
        .prepare(
            "SELECT seq, time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms
             FROM dispatch_log WHERE time >= ?1 ORDER BY time LIMIT 50",
        )
        .unwrap();
    let mut rng5 = rng.clone();
    rows.push((
        "raw: one record by primary key",
        time(reps, |_| {
            let seq = rng5.gen_range(1..=written.records);
            let n = pk
                .query_map([seq], |row| row.get::<_, i64>(0))
                .unwrap()
                .count();
            check(n);
        }),
        false,
    ));
    let mut rng6 = rng.clone();
    rows.push((
        "raw: 50 records by an index range",
        time(reps, |_| {
            let t = rng6.gen_range(written.first_ms..written.last_ms - DAY_MS);
            let n = range
                .query_map([t], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(9)?))
                })
                .unwrap()
                .count();
            check(n);
        }),
        false,
    ));
    // For scale, once: the full scans the funnel ran before v10.
    let once = |sql: &str| -> f64 {
        let s = Instant::now();
        let mut stmt = raw.prepare(sql).unwrap();
        let n = stmt.query_map([], |_| Ok(())).unwrap().count();
        assert!(n > 0);
        s.elapsed().as_secs_f64() * 1e3
    };
    let scan_outcomes = once(
        "SELECT journey, step, outcome, reason, count(*) FROM dispatch_log
         WHERE outcome NOT IN ('retrying', 'deferred')
         GROUP BY journey, step, outcome, reason ORDER BY journey, step, outcome, reason",
    );
    let scan_arms = once(
        "SELECT journey, rule_hash, mode, count(*),
                count(CASE WHEN status = 'converted' THEN 1 END),
                count(DISTINCT customer),
                count(DISTINCT CASE WHEN status = 'converted' THEN customer END),
                min(started_at), max(started_at)
         FROM instances GROUP BY journey, rule_hash, mode ORDER BY journey, rule_hash, mode",
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load after: {}", load.trim());

    let mut report = Report::default();
    let bench = format!("review, {:.1} M records", written.records as f64 / 1e6);
    report.info(
        &bench,
        "store",
        format!(
            "{} records, {} instances, {:.2} GB{}",
            written.records,
            written.instances,
            bytes as f64 / 1e9,
            if gen_s > 0.0 {
                format!(", generated in {gen_s:.0} s")
            } else {
                String::new()
            }
        ),
    );
    let raw_p99 = rows
        .iter()
        .filter(|(_, _, target)| !target)
        .map(|(_, v, _)| pct(v, 0.99))
        .fold(0.0, f64::max);
    for (metric, v, target) in &rows {
        let p99 = pct(v, 0.99);
        if *target {
            report.ratio(
                &bench,
                &format!("{metric}, {reps} reads"),
                summary(v),
                format!("{TARGET_MS:.0} ms (raw read p99 {} ms)", fmt_ms(raw_p99)),
                p99 / TARGET_MS,
                "p99 ≤ 100 ms",
                Some(p99 <= TARGET_MS),
            );
        } else {
            report.info(&bench, &format!("{metric}, {reps} reads"), summary(v));
        }
    }
    report.info(
        &bench,
        "before v10, once: outcome counts by full scan",
        format!("{} ms", fmt_ms(scan_outcomes)),
    );
    report.info(
        &bench,
        "before v10, once: arms by full scan",
        format!("{} ms", fmt_ms(scan_arms)),
    );
    report.finish("Benchmark 9: the review at scale");
    drop(store);
    if keep != 1 {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
