//! Benchmark 3: dispatch. N due push steps (one per customer, inserted
//! through the Store API into a fresh SQLite store) sent by the scheduler's
//! daemon loop (`Scheduler::run`, HTTP channel adapter, default batch size
//! and concurrency 32) to an HTTP endpoint on 127.0.0.1 answering 200;
//! beside a plain reqwest client posting the same JSON to the same endpoint
//! with the same concurrency. The two take turns in rounds (`--rounds`, the
//! first in each round alternating); the figure is the median of the rounds'
//! ratios.
//!
//!   cargo bench --bench dispatch [-- --steps 1000000 --plain 500000 --rounds 5]
//!   cargo bench --bench dispatch -- --store-only 1 [--finish-group 128]   (the store alone)
//!   cargo bench --bench dispatch -- --cache-mb 64   (SQLite page cache per connection)
//!   cargo bench --bench dispatch -- --policy 1 [--rate 1000000] [--competing 3]   (the
//!     contact policy at work: each customer has `--competing` push steps due
//!     at once, of as many journeys, under calendar-day caps that leave room
//!     for two: with three, arbitration sends the two best and drops the third
//!     (marketing); with one, the caps, arbitration's read-ahead and the rate
//!     limit are all checked and nothing competes. A send-rate limit of
//!     `--rate`/s on push, by default too high to bind. The headline rate
//!     counts messages sent, so nudge's figure carries a dropped step's cost;
//!     the rate of steps decided is printed beside it)
//!   cargo bench --bench dispatch -- --postgres 1 --replicas 3   (PostgreSQL: a fresh
//!     schema in the test database, `--replicas` schedulers each on its own
//!     pool, as replicas on one database; see harness::pg_base; `--analyze 1`:
//!     its tables analyzed after each insert of due steps)
//!   cargo bench --bench dispatch -- --postgres 1 --floor 1 [--floor-only 1] [--check-keys 1]
//!     [--floor-extra X,Y+Z] [--floor-tls 0] [--floor-sync-commit 0]
//!     (the floor, what any durable sender on PostgreSQL reaches here: a
//!     minimal sender written directly against PostgreSQL (dispatch/floor.rs;
//!     a queue table and a log table, claim with `FOR UPDATE SKIP LOCKED`,
//!     settle in one statement a group), with nudge's HTTP channel adapter,
//!     batch, settle group and concurrency, takes its turn in each round
//!     beside nudge and the plain client, on a fresh schema of its own; then
//!     its store work alone, pipelined as it runs with the sends accepted at
//!     once, and one statement at a time (µs a step). Each floor run is
//!     checked: the endpoint received one request per step (`--check-keys 1`:
//!     each step's key once), every step settled sent with one `sent` record.
//!     `--floor-only 1`: nudge sits the rounds out; `--floor-extra`: beside
//!     the floor, one variant of it per comma-separated item with those of
//!     nudge's costs added (joined by `+`; `all`, or step-indexes: nudge's
//!     other indexes on the due steps; log-indexes: nudge's log columns and
//!     indexes; complete: the instance's completion; leases: customer leases;
//!     send-mark; reads: the batch's customers and histories; custom-plans:
//!     every statement planned at each run, as nudge's are, not in `all`),
//!     each over HTTP and one statement at a time, in the same rounds;
//!     `--floor-tls 0`: the floor's connections without TLS (nudge's use
//!     it: the server offers it and `sslmode` defaults to prefer);
//!     `--floor-sync-commit 0`:
//!     the floor's sessions do not wait for the WAL flush at commit (not
//!     durable: a diagnosis of the flush's share, not a floor). Each floor
//!     round also prints the WAL written a step (the server's WAL insert
//!     position before and after), and the CPU time a step of each
//!     turn's timed part, PostgreSQL's (every `postgres` process, from
//!     `/proc`) and this process's (endpoint and sender))

mod common;
#[path = "dispatch/floor.rs"]
mod floor;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use futures::StreamExt;
use nudge::clock::{Clock, SystemClock};
use nudge::config::{PolicyConfig, SchedulerConfig};
use nudge::context::CustomerContext;
use nudge::dispatch::{Channels, HttpChannel, Message};
use nudge::model::{Category, ChannelKind, Mode};
use nudge::policy::Policy;
use nudge::rules::{self, Limits, RulesHandle};
use nudge::scheduler::Scheduler;
use nudge::store::{NewInstance, NewStep, SqliteStore, Store};
use serde_json::json;

static CONCURRENCY: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| arg("concurrency", 32));

/// `--null-channel 1`: a channel that accepts at once (the scheduler and store alone).
struct NullChannel(Arc<std::sync::atomic::AtomicU64>);

impl nudge::dispatch::Channel for NullChannel {
    fn send<'a>(
        &'a self,
        _: &'a Message,
    ) -> futures::future::BoxFuture<'a, Result<(), nudge::dispatch::DispatchError>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
}

fn vars(i: u64) -> serde_json::Map<String, serde_json::Value> {
    json!({
        "merchant": "StreamFlix", "previous_amount": "15.99", "new_amount": "18.99", "currency": "AUD",
        "message": format!("Your StreamFlix payment went up from $15.99 to $18.99. (p-{i})"),
    })
    .as_object()
    .unwrap()
    .clone()
}

/// The journeys whose steps the bench inserts: (journey, step, category,
/// template, rule hash). The first `n` of three (two service, one
/// marketing), competing for each customer.
type Planned = (&'static str, &'static str, Category, &'static str, String);

fn planned(rule_set: &rules::RuleSet, n: usize) -> Vec<Planned> {
    let hash = |j: &str| rule_set.journey(j).unwrap().hash.clone();
    let mut v = vec![(
        "fee_increase",
        "alert",
        Category::Service,
        "fee_increase_alert",
        hash("fee_increase"),
    )];
    if n > 1 {
        v.push((
            "unsigned_loan",
            "push",
            Category::Service,
            "loan_unsigned_push",
            hash("unsigned_loan"),
        ));
        v.push((
            "energy_rebate",
            "invite",
            Category::Marketing,
            "energy_rebate_invite",
            hash("energy_rebate"),
        ));
    }
    v.truncate(n);
    v
}

/// Inserts due steps for `n` customers numbered from `first`, one per
/// planned journey each; returns the insert rate (customers per second).
fn insert_due_steps(store: &dyn Store, first: u64, n: u64, journeys: &[Planned]) -> f64 {
    let start = Instant::now();
    let now = Utc::now();
    let due = now - chrono::Duration::seconds(1);
    let mut i = first;
    let end = first + n;
    while i < end {
        let mut tx = store.begin().unwrap();
        for _ in 0..(10_000 / journeys.len() as u64).min(end - i) {
            let customer = format!("c-{i:07}");
            let mut c = CustomerContext::new(&customer);
            c.app_installed = true;
            if journeys.len() > 1 {
                // Marketing push is opt-in.
                c.consents
                    .entry(ChannelKind::Push)
                    .or_default()
                    .insert(Category::Marketing, true);
            }
            tx.save_customer(&c, now).unwrap();
            for (journey, step, category, template, rule_hash) in journeys {
                tx.start_instance(
                    &NewInstance {
                        id: format!("{journey}-{i:012x}"),
                        customer: customer.clone(),
                        journey: (*journey).into(),
                        key: format!("p-{i}"),
                        mode: Mode::Live,
                        category: *category,
                        started_at: due,
                        rule_hash: rule_hash.clone(),
                        trigger_event: format!("e-{journey}-{i}"),
                        vars: vars(i),
                        decision_inputs: json!({"event": {"id": format!("e-{journey}-{i}")}}),
                    },
                    &[NewStep {
                        step: (*step).into(),
                        seq: 0,
                        channel: ChannelKind::Push,
                        template: (*template).into(),
                        condition: None,
                        due_at: due,
                    }],
                )
                .unwrap();
            }
            i += 1;
        }
        tx.commit().unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// One round of `--floor 1`: the rates of the plain client, the floor, the
/// floor's store work pipelined as it runs (no HTTP), the floor's store work
/// one statement at a time (claim µs, settle µs a step, rate), nudge's; and
/// each variant's with nudge's costs (over HTTP, one statement at a time).
struct FloorRound {
    plain: f64,
    floor: f64,
    store: f64,
    serial: (f64, f64, f64),
    nudge: Option<f64>,
    variants: Vec<(f64, (f64, f64, f64))>,
}

/// CPU seconds used so far by PostgreSQL (every process named `postgres`,
/// with the children the server has reaped: sessions that ended) and by this
/// process (the endpoint, the plain client, nudge and the floor all run in
/// it), from `/proc`; each a tick (10 ms) at best.
pub fn cpu_seconds() -> (f64, f64) {
    // utime, stime, cutime, cstime: fields 14-17, after the `(comm)`.
    let read = |path: &std::path::Path| -> Option<(bool, f64)> {
        let stat = std::fs::read_to_string(path).ok()?;
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..15)?
            .iter()
            .map(|f| f.parse::<f64>().unwrap_or(0.0))
            .sum();
        Some((&stat[open + 1..close] == "postgres", ticks / 100.0))
    };
    let pg = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| read(&e.path().join("stat")))
        .filter(|(postgres, _)| *postgres)
        .map(|(_, s)| s)
        .sum();
    let own = read(std::path::Path::new("/proc/self/stat")).map_or(0.0, |(_, s)| s);
    (pg, own)
}

/// The floor's message for step `id`: the plain client's shape, a key of its own.
fn floor_message(id: i64) -> Message {
    let instance = format!("floor-{id:012x}");
    Message {
        idempotency_key: nudge::model::idempotency_key(&instance, "alert"),
        customer: format!("c-{id:07}"),
        journey: "fee_increase".into(),
        instance,
        step: "alert".into(),
        channel: ChannelKind::Push,
        template: "fee_increase_alert".into(),
        variables: vars(id as u64).into(),
        address: None,
        history: vec![],
        attempt: 1,
    }
}

/// A plain reqwest client: the same body, header and concurrency. Its rate,
/// and the CPU seconds (PostgreSQL, this process) of its timed part.
fn plain_client(rt: &tokio::runtime::Runtime, url: &str, n: u64) -> (f64, (f64, f64)) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let message = Message {
        idempotency_key: nudge::model::idempotency_key("fee_increase-000000000001", "alert"),
        customer: "c-0000001".into(),
        journey: "fee_increase".into(),
        instance: "fee_increase-000000000001".into(),
        step: "alert".into(),
        channel: ChannelKind::Push,
        template: "fee_increase_alert".into(),
        variables: vars(1).into(),
        address: None,
        history: vec![],
        attempt: 1,
    };
    rt.block_on(async {
        let cpu = cpu_seconds();
        let start = Instant::now();
        let ok = futures::stream::iter(0..n)
            .map(|_| {
                let req = client
                    .post(url)
                    .header("Idempotency-Key", &message.idempotency_key)
                    .json(&message);
                async move { req.send().await.map(|r| r.status().is_success()) }
            })
            .buffer_unordered(*CONCURRENCY)
            .filter(|r| futures::future::ready(matches!(r, Ok(true))))
            .count()
            .await;
        assert_eq!(ok as u64, n);
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let after = cpu_seconds();
        (rate, (after.0 - cpu.0, after.1 - cpu.1))
    })
}

/// The store's share of dispatch alone: claim, read the batch's customers and
/// histories, record every step as sent (no HTTP, no policy).
fn store_only(store: &dyn Store, n: u64) {
    use nudge::model::{LogRecord, Outcome};
    use nudge::store::StepResult;
    let (mut claim, mut read, mut finish) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut done = 0;
    let window = Utc::now() - chrono::Duration::days(1);
    loop {
        let now = Utc::now();
        let t = Instant::now();
        let claimed = store
            .claim_due(
                ChannelKind::Push,
                now,
                256,
                now + chrono::Duration::minutes(5),
            )
            .unwrap();
        claim += t.elapsed();
        if claimed.is_empty() {
            break;
        }
        let t = Instant::now();
        let ids: Vec<String> = claimed.iter().map(|s| s.customer.clone()).collect();
        let inst: Vec<String> = claimed.iter().map(|s| s.instance_id.clone()).collect();
        std::hint::black_box(store.customers(&ids, Some(window), false).unwrap());
        std::hint::black_box(store.histories(&inst).unwrap());
        read += t.elapsed();
        let t = Instant::now();
        let results: Vec<StepResult> = claimed
            .iter()
            .map(|s| StepResult {
                record: LogRecord::about(s.subject(), now, Outcome::Sent, "step"),
                again_at: None,
                replan: false,
                claimed_row: Some(s.row),
                withdraw_if_ended: false,
            })
            .collect();
        let group = arg("finish-group", 128);
        let mut results = results;
        while !results.is_empty() {
            let rest = results.split_off(group.min(results.len()));
            store.finish_steps(results).unwrap();
            results = rest;
        }
        finish += t.elapsed();
        done += claimed.len() as u64;
    }
    assert_eq!(done, n);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "store only: {} steps/s; per step: claim {:.1} µs, customers+histories {:.1} µs, finish {:.1} µs",
        fmt_rate(n as f64 / (claim + read + finish).as_secs_f64()),
        per(claim),
        per(read),
        per(finish)
    );
}

fn main() {
    let n: u64 = arg("steps", 1_000_000);
    // The machine's speed drifts by tens of percent within a minute (other
    // tenants), so nudge and the plain client take turns in rounds, and each
    // round's pair of rates gives a ratio; the median of those is the figure.
    let rounds: u64 = arg("rounds", 5).max(1);
    let with_policy = arg("policy", 0u8) == 1;
    let competing: u64 = if with_policy {
        arg("competing", 3u64).clamp(1, 3)
    } else {
        1
    };
    // The caps leave room for two of a customer's steps.
    let sent_per_customer = competing.min(2);
    let per_round = n / rounds / sent_per_customer * sent_per_customer;
    let plain_per_round: u64 = arg("plain", n / 2) / rounds;
    println!("machine: {}", machine());
    let server_rt = runtime();
    // `--check-keys 1`: the endpoint also keeps each request's idempotency
    // key and customer, and a failed count names the keys sent twice and the
    // customers over the cap (it costs the endpoint a JSON parse a request).
    let seen: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
    let on_request: Option<OnRequest> = (arg("check-keys", 0u8) == 1).then(|| {
        let seen = seen.clone();
        Arc::new(move |body: &[u8]| {
            let m: serde_json::Value = serde_json::from_slice(body).unwrap();
            seen.lock().unwrap().push((
                m["idempotency_key"].as_str().unwrap_or("").to_string(),
                m["customer"].as_str().unwrap_or("").to_string(),
            ));
        }) as OnRequest
    });
    let endpoint = Receiver::counting(&server_rt, on_request);
    let client_rt = runtime();
    let url = format!("{}/push", endpoint.base);

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nudge.db");
    let cache_mb = arg("cache-mb", nudge::config::DEFAULT_CACHE_MB);
    let replicas: usize = arg("replicas", 1usize).max(1);
    let postgres = arg("postgres", 0u8) == 1;
    let schema = postgres.then(Schema::new);
    // One store per replica: on PostgreSQL each its own pool (a replica), on
    // SQLite the one file's store.
    let stores: Vec<Arc<dyn Store>> = match &schema {
        Some(schema) => (0..replicas)
            .map(|_| {
                let config = nudge::config::StoreConfig {
                    url: Some(schema.url.clone()),
                    ..Default::default()
                };
                nudge::store::open(&config).unwrap().0
            })
            .collect(),
        None => {
            assert_eq!(replicas, 1, "several replicas need --postgres 1");
            vec![Arc::new(
                SqliteStore::open_with_cache(&db, cache_mb).unwrap(),
            )]
        }
    };
    let store = stores[0].clone();
    println!(
        "store: {}, {replicas} replica(s)",
        if postgres { "PostgreSQL" } else { "SQLite" }
    );
    // `--analyze 1` (PostgreSQL): the tables analyzed once the due steps are
    // in, as autovacuum leaves a store that has run a while; a new schema's
    // tables are otherwise planned as if they had ten pages.
    let analyze = || {
        if let (Some(schema), 1) = (&schema, arg("analyze", 0u8)) {
            schema.client().batch_execute("ANALYZE").unwrap();
        }
    };
    let rule_set = rules::load_dir(&repo().join("rules"), &Limits::default()).unwrap();
    let journeys = planned(&rule_set, competing as usize);

    if arg("store-only", 0u8) == 1 {
        let insert_rate = insert_due_steps(store.as_ref(), 0, n, &journeys[..1]);
        println!("{n} due steps inserted at {}", fmt_rate(insert_rate));
        analyze();
        store_only(store.as_ref(), n);
        return;
    }

    // The default policy (frequency cap 4 a day), without quiet hours, which
    // would make the figure depend on the time of day in Sydney.
    let mut policy = PolicyConfig {
        quiet_hours: nudge::config::QuietHours {
            channels: Default::default(),
            legacy: None,
        },
        ..PolicyConfig::default()
    };
    if with_policy {
        // Calendar-day caps leaving room for two of each customer's three
        // steps (the marketing one loses: dropped); arbitration's default
        // window (10m); fatigue on (no sends yet, so it never binds).
        let cap = |category, channel, max, per| nudge::config::settings::Cap {
            category,
            channel,
            max,
            per,
        };
        policy.caps = Some(vec![
            cap(None, None, 2, 1),
            cap(Some(Category::Marketing), None, 1, 1),
            cap(Some(Category::Marketing), None, 3, 7),
            cap(None, Some(ChannelKind::CallTask), 1, 7),
        ]);
    }
    let rate: u32 = arg("rate", 1_000_000);
    println!(
        "policy: {}",
        if with_policy {
            format!("caps by calendar day (2 a day), {competing} journey(s) competing per customer, push rate {rate}/s")
        } else {
            "default (cap 4 a day), no quiet hours".into()
        }
    );
    let mut channels = Channels::default();
    for (kind, path) in [
        (ChannelKind::Push, "push"),
        (ChannelKind::Email, "email"),
        (ChannelKind::CallTask, "call"),
    ] {
        let ch: Arc<dyn nudge::dispatch::Channel> = if arg("null-channel", 0u8) == 1 {
            Arc::new(NullChannel(endpoint.count.clone()))
        } else {
            Arc::new(
                HttpChannel::new(
                    &format!("{}/{path}", endpoint.base),
                    Duration::from_secs(5),
                    None,
                )
                .unwrap(),
            )
        };
        channels = channels.with(kind, ch, *CONCURRENCY);
    }
    if with_policy {
        channels = channels.with_rate(
            ChannelKind::Push,
            nudge::dispatch::Rate {
                count: rate,
                per: Duration::from_secs(1),
            },
        );
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let schedulers: Vec<Arc<Scheduler>> = stores
        .iter()
        .map(|store| {
            Arc::new(Scheduler::new(
                store.clone(),
                RulesHandle::new(
                    rules::load_dir(&repo().join("rules"), &Limits::default()).unwrap(),
                ),
                channels.clone(),
                clock.clone(),
                Policy::new(policy.clone()),
                SchedulerConfig::default(),
                HashMap::new(),
            ))
        })
        .collect();
    // Steps still to send (pending or claimed): on SQLite from the two
    // partial indexes (polled every 20 ms, so it must cost next to nothing,
    // or it shows in the instruction counts), elsewhere through the Store API.
    let reader = (!postgres).then(|| {
        let reader = rusqlite::Connection::open(&db).unwrap();
        reader.busy_timeout(Duration::from_secs(10)).unwrap();
        reader
    });
    let open_steps = || -> i64 {
        match &reader {
            Some(reader) => reader
                .query_row(
                    "SELECT (SELECT COUNT(*) FROM steps WHERE status = 'pending' AND channel = 'push')
                          + (SELECT COUNT(*) FROM steps WHERE status = 'claimed' AND channel = 'push')",
                    [],
                    |r| r.get(0),
                )
                .unwrap(),
            None => store
                .step_counts()
                .unwrap()
                .into_iter()
                .filter(|(status, _)| status == "pending" || status == "claimed")
                .map(|(_, n)| n)
                .sum(),
        }
    };
    let nudge_rt = runtime();

    // The server's WAL insert position in bytes (PostgreSQL), else 0.
    let wal_position = || -> f64 {
        if !postgres {
            return 0.0;
        }
        pg_admin()
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::float8",
                &[],
            )
            .unwrap()
            .get(0)
    };
    // nudge sends `per_round` due steps; returns its rate, the CPU seconds
    // (PostgreSQL, this process) of its timed part and the WAL bytes
    // written a step (PostgreSQL).
    let run_nudge = |round: u64| -> (f64, (f64, f64), f64) {
        let base_count = endpoint.received();
        seen.lock().unwrap().clear();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wal_before = wal_position();
        let cpu = cpu_seconds();
        let start = Instant::now();
        let tasks: Vec<_> = schedulers
            .iter()
            .map(|s| nudge_rt.spawn(s.clone().run(stop_rx.clone())))
            .collect();
        let deadline = start + Duration::from_secs(900);
        loop {
            std::thread::sleep(Duration::from_millis(20));
            if endpoint.received() - base_count >= per_round && open_steps() == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dispatch stalled in round {round}"
            );
        }
        let elapsed = start.elapsed();
        let cpu_after = cpu_seconds();
        let wal_after = wal_position();
        let _ = stop_tx.send(true);
        for task in tasks {
            nudge_rt.block_on(task).unwrap();
        }
        if endpoint.received() - base_count != per_round {
            let mut keys: HashMap<String, usize> = HashMap::new();
            let mut customers: HashMap<String, usize> = HashMap::new();
            for (key, customer) in seen.lock().unwrap().iter() {
                *keys.entry(key.clone()).or_default() += 1;
                *customers.entry(customer.clone()).or_default() += 1;
            }
            keys.retain(|_, n| *n > 1);
            customers.retain(|_, n| *n > sent_per_customer as usize);
            eprintln!("keys sent more than once: {keys:?}; customers over the cap: {customers:?}");
        }
        assert_eq!(
            endpoint.received() - base_count,
            per_round,
            "each step sent exactly once"
        );
        (
            per_round as f64 / elapsed.as_secs_f64(),
            (cpu_after.0 - cpu.0, cpu_after.1 - cpu.1),
            (wal_after - wal_before) / per_round as f64,
        )
    };

    // `--floor 1` (PostgreSQL): the floor, a minimal durable sender on
    // PostgreSQL (floor.rs), takes its turn in each round beside nudge and
    // the plain client, with the same endpoint, batch and concurrency; and
    // its store work alone, pipelined as it runs (no HTTP) and one statement
    // at a time. Each on a fresh schema of its own. `--floor-only 1`: nudge
    // sits the rounds out. `--floor-extra A,B+C`: besides the floor, one
    // variant of it per item, with those of nudge's costs added (sent over
    // HTTP, and its store work one statement at a time).
    let with_floor = arg("floor", 0u8) == 1 || arg("floor-only", 0u8) == 1;
    let floor_only = arg("floor-only", 0u8) == 1;
    assert!(!with_floor || postgres, "--floor 1 needs --postgres 1");
    let floor_extras: Vec<floor::Extras> = arg("floor-extra", String::new())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let floor_tls = arg("floor-tls", 1u8) == 1;
    // `--floor-sync-commit 0`: the floor's sessions do not wait for the WAL
    // flush at commit (not durable: a diagnosis, not a floor).
    let floor_sync_commit = arg("floor-sync-commit", 1u8) == 1;
    let batch = SchedulerConfig::default().batch_size;
    let new_floor = |extras| floor::Floor::new(floor_tls, floor_sync_commit, extras);
    // The floor over HTTP, its store work pipelined, one statement at a
    // time; then each variant over HTTP and one statement at a time.
    let mut floors: Vec<floor::Floor> = Vec::new();
    if with_floor {
        println!(
            "floor: claim {batch}, settle groups of {} (linger {:?}), concurrency {}, TLS {}, synchronous_commit {}, variants with nudge's costs: {}",
            floor::SETTLE_GROUP,
            floor::LINGER,
            *CONCURRENCY,
            if floor_tls { "as nudge (prefer)" } else { "off" },
            if floor_sync_commit { "on (durable)" } else { "OFF (not durable, diagnosis only)" },
            floor_extras
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        floors.extend((0..3).map(|_| new_floor(floor::Extras::default())));
        for x in &floor_extras {
            floors.extend((0..2).map(|_| new_floor(*x)));
        }
    }
    let floor_rt = runtime();
    let floor_channel: Arc<dyn nudge::dispatch::Channel> =
        Arc::new(HttpChannel::new(&url, Duration::from_secs(5), None).unwrap());
    let check_keys = arg("check-keys", 0u8) == 1;
    let run_floor = |floor: &floor::Floor, ids: std::ops::Range<i64>, http: bool| -> floor::Run {
        let base_count = endpoint.received();
        seen.lock().unwrap().clear();
        let run = floor.run(
            &floor_rt,
            http.then(|| floor_channel.clone()),
            floor_message,
            ids.clone(),
            batch,
            *CONCURRENCY,
        );
        let n = (ids.end - ids.start) as u64;
        assert_eq!(
            endpoint.received() - base_count,
            if http { n } else { 0 },
            "floor: each step sent exactly once"
        );
        if http && check_keys {
            let seen = seen.lock().unwrap();
            let keys: std::collections::HashSet<&str> =
                seen.iter().map(|(key, _)| key.as_str()).collect();
            assert_eq!(seen.len() as u64, n, "floor: requests");
            assert_eq!(keys.len() as u64, n, "floor: keys seen once each");
            for id in ids {
                assert!(
                    keys.contains(floor_message(id).idempotency_key.as_str()),
                    "floor: step {id} not seen"
                );
            }
        }
        run
    };

    #[derive(Clone, Copy, PartialEq)]
    enum Turn {
        Nudge,
        Plain,
        /// The floor (0), or a variant (1..): over HTTP.
        Floor(usize),
        FloorStore,
    }
    let mut turns = vec![Turn::Plain];
    if !floor_only {
        turns.insert(0, Turn::Nudge);
    }
    if with_floor {
        turns.push(Turn::Floor(0));
        turns.push(Turn::FloorStore);
        turns.extend((1..=floor_extras.len()).map(Turn::Floor));
    }
    // Floors by role: over HTTP (the floor, then each variant), one
    // statement at a time (the same order); the pipelined store work.
    let http_floor = |v: usize| if v == 0 { 0 } else { 1 + 2 * v };
    let serial_floor = |v: usize| if v == 0 { 2 } else { 2 + 2 * v };

    let (mut nudge_time, mut plain_time) = (0.0, 0.0);
    let mut ratios = Vec::new();
    let mut insert_rates = Vec::new();
    let mut floor_rounds: Vec<FloorRound> = Vec::new();
    let mut cpu_by_turn: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for round in 0..rounds {
        let customers = per_round / sent_per_customer;
        if !floor_only {
            insert_rates.push(insert_due_steps(
                store.as_ref(),
                round * customers,
                customers,
                &journeys,
            ));
            analyze();
            assert_eq!(open_steps(), (customers * journeys.len() as u64) as i64);
        }
        let floor_ids: Vec<std::ops::Range<i64>> =
            floors.iter_mut().map(|f| f.insert(per_round)).collect();
        // Take turns, the first of each round rotating, so that a drift
        // favours none.
        let (mut nudge_rate, mut plain_rate, mut nudge_wal) = (None, 0.0, 0.0);
        let mut over_http = vec![(0.0, 0.0); 1 + floor_extras.len()];
        let mut store_rate = 0.0;
        // CPU µs a step of each turn (PostgreSQL, this process), by name.
        let mut cpu: Vec<(String, f64, f64)> = Vec::new();
        for k in 0..turns.len() {
            let turn = turns[(k + round as usize) % turns.len()];
            let used = match turn {
                Turn::Nudge => {
                    let (rate, cpu, wal) = run_nudge(round);
                    nudge_rate = Some(rate);
                    nudge_wal = wal;
                    cpu
                }
                Turn::Plain => {
                    let (rate, cpu) = plain_client(&client_rt, &url, plain_per_round);
                    plain_rate = rate;
                    cpu
                }
                Turn::Floor(v) => {
                    let i = http_floor(v);
                    let run = run_floor(&floors[i], floor_ids[i].clone(), true);
                    over_http[v] = (run.rate, run.wal);
                    run.cpu
                }
                Turn::FloorStore => {
                    let run = run_floor(&floors[1], floor_ids[1].clone(), false);
                    store_rate = run.rate;
                    run.cpu
                }
            };
            let (name, steps) = match turn {
                Turn::Nudge => ("nudge".to_string(), per_round),
                Turn::Plain => ("plain".to_string(), plain_per_round),
                Turn::Floor(0) => ("floor".to_string(), per_round),
                Turn::Floor(v) => (format!("floor + {}", floor_extras[v - 1]), per_round),
                Turn::FloorStore => ("floor store only".to_string(), per_round),
            };
            cpu.push((
                name,
                used.0 * 1e6 / steps as f64,
                used.1 * 1e6 / steps as f64,
            ));
        }
        cpu.sort_by_key(|(name, ..)| {
            ["nudge", "plain", "floor", "floor store only"]
                .iter()
                .position(|n| n == name)
                .unwrap_or(4)
        });
        if with_floor {
            println!(
                "round {}: CPU µs a step (PostgreSQL + this process): {}",
                round + 1,
                cpu.iter()
                    .map(|(name, pg, own)| format!("{name} {pg:.1} + {own:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (name, pg, own) in cpu {
                cpu_by_turn.entry(name).or_default().push((pg, own));
            }
        }
        plain_time += plain_per_round as f64 / plain_rate;
        if let Some(nudge_rate) = nudge_rate {
            nudge_time += per_round as f64 / nudge_rate;
            ratios.push(nudge_rate / plain_rate);
            println!(
                "round {}: nudge {} / plain {} = {:.2} (steps decided: {:.2})",
                round + 1,
                fmt_rate(nudge_rate),
                fmt_rate(plain_rate),
                nudge_rate / plain_rate,
                nudge_rate / plain_rate * competing as f64 / sent_per_customer as f64
            );
        }
        if with_floor {
            // One statement at a time, the floor and its variants, rotating.
            let variants = 1 + floor_extras.len();
            let mut serial = vec![(0.0, 0.0, 0.0); variants];
            for k in 0..variants {
                let v = (k + round as usize) % variants;
                let i = serial_floor(v);
                serial[v] = floors[i].serial(floor_ids[i].clone(), batch);
            }
            let (floor_rate, floor_wal) = over_http[0];
            println!(
                "round {}: plain {} | floor {} = {:.2} of plain (WAL {:.0} B a step) | floor store only {} pipelined; serial {} (claim {:.1} µs, settle {:.1} µs a step){}",
                round + 1,
                fmt_rate(plain_rate),
                fmt_rate(floor_rate),
                floor_rate / plain_rate,
                floor_wal,
                fmt_rate(store_rate),
                fmt_rate(serial[0].2),
                serial[0].0,
                serial[0].1,
                match nudge_rate {
                    Some(r) => format!(
                        " | nudge {} = {:.2} of plain, {:.2} of floor (WAL {nudge_wal:.0} B a step)",
                        fmt_rate(r),
                        r / plain_rate,
                        r / floor_rate
                    ),
                    None => String::new(),
                }
            );
            for (v, x) in floor_extras.iter().enumerate() {
                let ((rate, wal), s) = (over_http[v + 1], serial[v + 1]);
                println!(
                    "round {}:   floor + {x}: {} = {:.2} of plain, {:.2} of floor (WAL {:.0} B a step); serial {} (claim {:.1} µs, settle {:.1} µs a step)",
                    round + 1,
                    fmt_rate(rate),
                    rate / plain_rate,
                    rate / floor_rate,
                    wal,
                    fmt_rate(s.2),
                    s.0,
                    s.1
                );
            }
            floor_rounds.push(FloorRound {
                plain: plain_rate,
                floor: floor_rate,
                store: store_rate,
                serial: serial[0],
                nudge: nudge_rate,
                variants: over_http[1..]
                    .iter()
                    .zip(&serial[1..])
                    .map(|(h, s)| (h.0, *s))
                    .collect(),
            });
        }
    }
    if with_floor {
        let med = |f: &dyn Fn(&FloorRound) -> Option<f64>| {
            let v: Vec<f64> = floor_rounds.iter().filter_map(f).collect();
            if v.is_empty() {
                f64::NAN
            } else {
                median(v)
            }
        };
        println!(
            "floor medians of {rounds} rounds: plain {}, floor {} ({:.2} of plain), floor store only {} pipelined, serial {} (claim {:.1} µs, settle {:.1} µs); nudge {} ({:.2} of plain, {:.2} of floor)",
            fmt_rate(med(&|r| Some(r.plain))),
            fmt_rate(med(&|r| Some(r.floor))),
            med(&|r| Some(r.floor / r.plain)),
            fmt_rate(med(&|r| Some(r.store))),
            fmt_rate(med(&|r| Some(r.serial.2))),
            med(&|r| Some(r.serial.0)),
            med(&|r| Some(r.serial.1)),
            fmt_rate(med(&|r| r.nudge)),
            med(&|r| r.nudge.map(|n| n / r.plain)),
            med(&|r| r.nudge.map(|n| n / r.floor)),
        );
        println!(
            "CPU µs a step (PostgreSQL + this process), medians: {}",
            cpu_by_turn
                .iter()
                .map(|(name, v)| format!(
                    "{name} {:.1} + {:.1}",
                    median(v.iter().map(|c| c.0).collect()),
                    median(v.iter().map(|c| c.1).collect())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (v, x) in floor_extras.iter().enumerate() {
            println!(
                "floor + {x}, medians: {} ({:.2} of plain, {:.2} of floor); serial {} (claim {:.1} µs, settle {:.1} µs)",
                fmt_rate(med(&|r| Some(r.variants[v].0))),
                med(&|r| Some(r.variants[v].0 / r.plain)),
                med(&|r| Some(r.variants[v].0 / r.floor)),
                fmt_rate(med(&|r| Some(r.variants[v].1 .2))),
                med(&|r| Some(r.variants[v].1 .0)),
                med(&|r| Some(r.variants[v].1 .1)),
            );
        }
        if floor_only {
            return;
        }
    }
    let total = per_round * rounds;
    // `sent` records: on SQLite one count (the bench's own reads stay out of
    // the instruction counts), elsewhere paged through the Store API.
    let logged: i64 = match &reader {
        Some(reader) => reader
            .query_row(
                "SELECT COUNT(*) FROM dispatch_log WHERE outcome = 'sent'",
                [],
                |r| r.get(0),
            )
            .unwrap(),
        None => {
            let (mut logged, mut after) = (0, 0);
            loop {
                let page = store.log_after(after, 10_000).unwrap();
                let Some(last) = page.last() else { break };
                after = last.seq;
                logged += page
                    .iter()
                    .filter(|r| r.outcome == nudge::model::Outcome::Sent)
                    .count() as i64;
            }
            logged
        }
    };
    assert_eq!(logged as u64, total, "one `sent` record per step");
    if competing == 3 {
        if let Some(reader) = &reader {
            let lost: i64 = reader
                .query_row(
                    "SELECT COUNT(*) FROM dispatch_log WHERE outcome = 'suppressed'
                       AND journey = 'energy_rebate'
                       AND (reason LIKE '%arbitration: lost to%' OR reason LIKE 'frequency cap: 2 %')",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let reasons: Vec<(String, String, i64)> = reader
                .prepare(
                    "SELECT journey, reason, COUNT(*) FROM dispatch_log WHERE outcome = 'suppressed'
                     GROUP BY journey, reason LIMIT 5",
                )
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            println!("dropped: {reasons:?}");
            assert_eq!(
                lost as u64,
                total / 2,
                "each customer's third step (marketing, lowest score) is dropped: {reasons:?}"
            );
        }
    }
    let nudge_rate = total as f64 / nudge_time;
    let plain_rate = (plain_per_round * rounds) as f64 / plain_time;
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let per_step = competing as f64 / sent_per_customer as f64;
    println!(
        "median ratio per message sent {median:.2}; per step decided ({competing} steps for {sent_per_customer} messages) {:.2}",
        median * per_step
    );
    println!(
        "nudge: {total} steps in {nudge_time:.1} s = {}; plain client {}",
        fmt_rate(nudge_rate),
        fmt_rate(plain_rate)
    );

    let mut report = Report::default();
    report.ratio(
        "3 dispatch",
        &format!(
            "{total} {} → HTTP 200, concurrency {}, {rounds} rounds (median of the rounds' ratios)",
            if with_policy {
                format!("push messages sent of {competing} step(s) per customer competing under caps of 2 a day, rate limit on")
            } else {
                "due push steps".to_string()
            },
            *CONCURRENCY
        ),
        fmt_rate(nudge_rate),
        format!(
            "plain reqwest {}; round ratios {}",
            fmt_rate(plain_rate),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        median,
        "≥ 0.5 and ≥ 20 k/s",
        Some(median >= 0.5 && nudge_rate >= 20_000.0),
    );
    report.info(
        "3 dispatch",
        "inserting the due steps (Store API, 10k per transaction)",
        fmt_rate(insert_rates.iter().sum::<f64>() / insert_rates.len() as f64),
    );
    report.finish("Benchmark 3: dispatch");
}
