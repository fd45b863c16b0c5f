//! Several `nudge run` replicas in one consumer group over one PostgreSQL:
//! Kafka partitions spread the deciding, `FOR UPDATE SKIP LOCKED` claims
//! spread the sending. One replica is SIGKILLed and another restarted while
//! they work; every step must still go out once (counted by idempotency key
//! at the endpoint), no event may be lost, and the per-customer frequency cap
//! must hold across replicas. And a record the database refuses for good
//! is dead-lettered without stalling the others.

mod harness;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

/// Customers whose context is set, a fifth of them with both a loan to sign
/// and a fee that went up (two pushes due at once, one allowed by the cap),
/// and untriggered noise up to `total`. Returns the records and the
/// customers who must get exactly one push.
fn workload(total: usize, customers: usize) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut records = Vec::with_capacity(total);
    let mut doubled = Vec::new();
    for c in 0..customers {
        let cust = format!("c{c}");
        records.push(event(
            &format!("ctx-{c}"),
            "customer.contact_updated",
            &cust,
            json!({"app_installed": true, "email": "x@example.com"}),
        ));
        if c % 5 == 0 {
            doubled.push(cust.clone());
            records.push(unsigned_loan(c, "Personal loan"));
            records.push(event(&format!("fee-{c}"), "recurring_payment.amount_changed", &cust,
                json!({"payment_id": format!("P{c}"), "merchant": "Gym", "previous_amount": 50, "new_amount": 55})));
        }
    }
    let mut i = 0;
    while records.len() < total {
        let cust = format!("c{}", i % customers);
        records.push(event(
            &format!("card-{i}"),
            "card.transaction",
            &cust,
            json!({"amount": i}),
        ));
        i += 1;
    }
    (records, doubled)
}

#[test]
fn three_replicas_send_each_step_once_through_a_kill_and_a_restart_within_the_cap() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let schema = Schema::new();
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.store_url = Some(schema.url.clone());
    // One message a day per customer: of a loan push and a fee alert due
    // together, one goes and the other is suppressed, whichever replica sends.
    cfg.policy = "caps = [{ max = 1, per = \"1d\" }]".into();
    create_topic(&rt, &cfg.topic, 6);
    let (records, doubled) = workload(30_000, 7_500);

    let a = Daemon::start(&cfg, "a");
    let b = Daemon::start(&cfg, "b");
    let c = Daemon::start(&cfg, "c");
    for d in [&a, &b, &c] {
        d.wait_ready(LONG);
    }
    produce(&cfg.topic, &records);
    a.wait_until(LONG, "a third of the pushes", || {
        recv.by_key().len() >= doubled.len() / 3
    });
    a.kill();
    b.wait_until(LONG, "two thirds of the pushes", || {
        recv.by_key().len() >= doubled.len() * 2 / 3
    });
    b.terminate();
    let b2 = Daemon::start(&cfg, "b2");
    b2.wait_until(LONG * 2, "one push per doubled customer", || {
        recv.by_key().len() >= doubled.len()
    });
    // Every offset is stored once every record is decided.
    let mut db = schema.client();
    c.wait_until(LONG, "every offset stored", || {
        let row = db
            .query_one(
                "SELECT COALESCE(SUM(next_offset), 0)::BIGINT FROM kafka_offsets WHERE topic = $1",
                &[&cfg.topic],
            )
            .unwrap();
        row.get::<_, i64>(0) == records.len() as i64
    });
    // A step handed back unsent by `b`'s drain is pending again until a
    // live replica's next look (at most `MAX_IDLE`): wait until every doubled
    // customer's second step is decided, then check how.
    c.wait_until(LONG, "both steps of every doubled customer decided", || {
        let row = db
            .query_one(
                "SELECT COUNT(DISTINCT customer) FROM dispatch_log WHERE outcome IN ('suppressed', 'deferred')",
                &[],
            )
            .unwrap();
        row.get::<_, i64>(0) >= doubled.len() as i64
    });
    c.wait_until(LONG, "no step left claimed", || {
        let row = db
            .query_one("SELECT COUNT(*) FROM steps WHERE status = 'claimed'", &[])
            .unwrap();
        row.get::<_, i64>(0) == 0
    });
    let logs = format!("{}\n{}", c.log_tail(), b2.log_tail());
    c.terminate();
    b2.terminate();

    // At the endpoint: one distinct step per doubled customer (repeats of a
    // key after the kill are the receiver's to drop), never two.
    let mut keys_by_customer: HashMap<String, HashSet<String>> = HashMap::new();
    for r in recv.requests() {
        let customer = r.body["customer"].as_str().unwrap().to_string();
        keys_by_customer
            .entry(customer)
            .or_default()
            .insert(r.key.clone());
    }
    // The cap holds across replicas, through the kill too: a send under way
    // when its replica died is marked in the store before it starts, so the
    // replica that takes the customer over counts it as possibly delivered.
    let over_cap: Vec<_> = keys_by_customer
        .iter()
        .filter(|(_, keys)| keys.len() > 1)
        .collect();
    assert!(
        over_cap.is_empty(),
        "{} customers got two messages where the cap allows one: {over_cap:?}\n{logs}",
        over_cap.len()
    );
    let served: HashSet<&String> = keys_by_customer.keys().collect();
    let missing: Vec<_> = doubled.iter().filter(|c| !served.contains(c)).collect();
    assert!(
        missing.is_empty(),
        "{} customers got nothing: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(keys_by_customer.len(), doubled.len());

    // In the dispatch log: per doubled customer one `sent` and the other
    // step held back by the cap, each decided once (a send made by the
    // killed replica is recorded by the one that took it over). The fee
    // alert loses the arbitration to the loan push (80 vs 50): dropped when
    // the cap frees (Sydney's midnight) past its 12 h lateness bound,
    // deferred to then when the test runs within 12 h of it.
    let rows = db
        .query(
            "SELECT customer, CASE outcome WHEN 'deferred' THEN 'suppressed' ELSE outcome END, COUNT(*)
             FROM dispatch_log WHERE outcome IN ('sent', 'suppressed', 'deferred') GROUP BY 1, 2",
            &[],
        )
        .unwrap();
    let deferred: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM dispatch_log WHERE outcome = 'deferred' AND reason LIKE '%arbitration: lost to unsigned_loan/push (score 80 vs 50)%'",
            &[],
        )
        .unwrap()
        .get(0);
    let mut outcomes: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for r in rows {
        outcomes
            .entry(r.get(0))
            .or_default()
            .insert(r.get(1), r.get(2));
    }
    for customer in &doubled {
        let o = &outcomes[customer];
        assert_eq!(
            (o.get("sent"), o.get("suppressed")),
            (Some(&1), Some(&1)),
            "{customer}: {o:?}"
        );
    }
    // No event lost: every loan's email and call are planned.
    let pending: i64 = db
        .query_one("SELECT COUNT(*) FROM steps WHERE status = 'pending'", &[])
        .unwrap()
        .get(0);
    assert_eq!(pending, 2 * doubled.len() as i64 + deferred, "{logs}");
}

/// Two replicas on one single-partition topic: the partition's owner has
/// decided `LOANS` loan pushes and holds at least two of them claimed, its
/// first send held at the endpoint's gate (one send at a time). `scheduler`
/// is the `[scheduler]` section (its lease sets how often the other,
/// partitionless replica looks for due steps; `other_may_send` when that
/// is often enough for it to hold sends of its own).
struct OwnerHolding {
    owner: Daemon,
    other: Daemon,
    recv: Receiver,
    gate: Arc<tokio::sync::Semaphore>,
    schema: Schema,
    /// Claims the owner held.
    held: i64,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

const LOANS: i64 = 20;

impl OwnerHolding {
    fn start(scheduler: &str, other_may_send: bool) -> Self {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let recv = Receiver::holding(&rt, gate.clone());
        let schema = Schema::new();
        let mut cfg = DaemonConfig::new(dir.path(), &recv);
        cfg.store_url = Some(schema.url.clone());
        cfg.scheduler = scheduler.into();
        // One send at a time: the owner's other claims wait, unstarted.
        cfg.push = "concurrency = 1".into();
        // One partition: only its owner decides the loans, and only its
        // scheduler is woken to send them.
        create_topic(&rt, &cfg.topic, 1);
        let a = Daemon::start(&cfg, "a");
        let b = Daemon::start(&cfg, "b");
        // The replica without a partition is not ready (it consumes nothing)
        // but sends all the same.
        a.wait_until(LONG, "one replica to own the partition", || {
            matches!(
                (a.partitions(), b.partitions()),
                (Some(1), Some(0)) | (Some(0), Some(1))
            )
        });
        let (owner, other) = if a.partitions() == Some(1) {
            (a, b)
        } else {
            (b, a)
        };
        owner.wait_ready(LONG);
        // Both send once caught up with what waited at start (nothing here):
        // from then on the owner claims what it decides, as it decides it.
        for d in [&owner, &other] {
            d.wait_sending(LONG);
        }
        let mut records = Vec::new();
        for c in 0..LOANS {
            let cust = format!("c{c}");
            records.push(event(
                &format!("ctx-{c}"),
                "customer.contact_updated",
                &cust,
                json!({"app_installed": true}),
            ));
            records.push(unsigned_loan(c as usize, "Car loan"));
        }
        produce(&cfg.topic, &records);
        let mut db = schema.client();
        let holder = format!("/{}/", owner.pid());
        let mut held = 0;
        owner.wait_until(
            LONG,
            "every push stored, the owner's first send at the endpoint and more of its claims waiting",
            || {
                let row = db
                    .query_one(
                        "SELECT COUNT(*),
                             COUNT(*) FILTER (WHERE status = 'claimed' AND strpos(holder, $1) > 0)
                         FROM steps WHERE channel = 'push'",
                        &[&holder],
                    )
                    .unwrap();
                held = row.get::<_, i64>(1);
                let waiting = recv.waiting();
                row.get::<_, i64>(0) == LOANS
                    && held >= 2
                    && (waiting == 1 || other_may_send && waiting >= 1)
            },
        );
        Self {
            owner,
            other,
            recv,
            gate,
            schema,
            held,
            _dir: dir,
            _rt: rt,
        }
    }
}

/// A replica stopped (SIGTERM) while it holds claimed pushes hands back
/// those not yet started, and the other replica, idle until then, sends
/// them at once: it hears of the release (PostgreSQL `NOTIFY`) instead of
/// finding them at its next idle look, up to 30 s after its last.
#[test]
fn steps_a_draining_replica_hands_back_go_out_from_another_at_once() {
    // A lease long enough that the other replica's idle look (at most
    // every lease, 30 s at most) does not find the steps first.
    let w = OwnerHolding::start("lease = \"60s\"\nretry_base = \"100ms\"", false);
    let (owner, other, recv) = (w.owner, w.other, &w.recv);
    // The owner drains: its send under way finishes, the rest go back.
    owner.signal("TERM");
    wait_for_or(
        LONG,
        "the owner to begin draining",
        || owner.log_tail().contains("stopping: no new records"),
        || owner.log_tail(),
    );
    w.gate.add_permits(10_000);
    let opened = Instant::now();
    wait_for_or(
        LONG,
        "the owner to exit",
        || owner.exited().is_some(),
        || owner.log_tail(),
    );
    assert!(owner.exited().unwrap().success(), "{}", owner.log_tail());
    other.wait_until(LONG, "every push", || recv.by_key().len() == LOANS as usize);
    let took = opened.elapsed();
    eprintln!(
        "{} claimed by the owner; all sent {took:?} after its drain began",
        w.held
    );
    assert!(
        took < Duration::from_secs(5),
        "the steps handed back waited {took:?} for the other replica\n{}",
        other.log_tail()
    );
    // The receiver has the last push a moment before its record commits.
    let sent = || -> i64 {
        w.schema
            .client()
            .query_one(
                "SELECT COUNT(*) FROM dispatch_log WHERE outcome = 'sent' AND channel = 'push'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    other.wait_until(LONG, "every push recorded", || sent() >= LOANS);
    assert_eq!(sent(), LOANS, "each push sent once");
    other.terminate();
}

/// A replica SIGKILLed while it holds claimed pushes: the other replica
/// takes them over when their lease (2 s here) ends, not at its next idle
/// look (up to 30 s later). It may hold sends of its own meanwhile: with a
/// lease this short it looks for due steps every 2 s.
#[test]
fn a_killed_replicas_claims_go_out_from_another_when_the_lease_ends() {
    let w = OwnerHolding::start("lease = \"2s\"\nretry_base = \"100ms\"", true);
    let (owner, other, recv) = (w.owner, w.other, &w.recv);
    owner.kill();
    let killed = Instant::now();
    w.gate.add_permits(10_000);
    other.wait_until(LONG, "every push", || recv.by_key().len() == LOANS as usize);
    let took = killed.elapsed();
    eprintln!(
        "{} claimed by the killed replica; all sent {took:?} after the kill",
        w.held
    );
    assert!(
        took < Duration::from_secs(8),
        "the killed replica's claims (lease 2 s) waited {took:?} for the other\n{}",
        other.log_tail()
    );
    other.terminate();
}

/// PostgreSQL cannot store a NUL character in `jsonb`: a loan whose product
/// name holds one is refused for good, whatever is retried. Its batch is
/// stored record by record; that record goes to the dead-letter topic with
/// the database's reason, and every other record of the batch goes on.
#[test]
fn a_record_the_database_refuses_for_good_is_dead_lettered_and_the_rest_go_on() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let schema = Schema::new();
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.store_url = Some(schema.url.clone());
    create_topic(&rt, &cfg.topic, 1);
    create_topic(&rt, &cfg.dlq, 1);
    let mut records = Vec::new();
    for c in 0..20 {
        let cust = format!("c{c}");
        let product = if c == 7 { "Car\u{0}loan" } else { "Car loan" };
        records.push(event(
            &format!("ctx-{c}"),
            "customer.contact_updated",
            &cust,
            json!({"app_installed": true}),
        ));
        records.push(unsigned_loan(c, product));
    }
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    produce(&cfg.topic, &records);
    daemon.wait_until(LONG, "the other 19 pushes", || recv.by_key().len() == 19);
    let letters = read_topic(&cfg.dlq, 1);
    let letter = &letters[0];
    assert_eq!(letter.headers["nudge.event_id"], "loan-7");
    assert!(
        letter.headers["nudge.reason"].contains("the store refused this record"),
        "{:?}",
        letter.headers
    );
    assert_eq!(letter.key.as_deref(), Some(&b"c7"[..]));
    let mut db = schema.client();
    daemon.wait_until(LONG, "every offset stored", || {
        db.query_one(
            "SELECT COALESCE(SUM(next_offset), 0)::BIGINT FROM kafka_offsets WHERE topic = $1",
            &[&cfg.topic],
        )
        .unwrap()
        .get::<_, i64>(0)
            == records.len() as i64
    });
    assert!(daemon.readyz().is_some_and(|r| r.ready()), "ready again");
    assert!(
        !recv.requests().iter().any(|r| r.body["customer"] == "c7"),
        "nothing sent for the refused loan"
    );
    daemon.terminate();
}

/// A role of its own owning a schema of its own: unlike the tests'
/// superuser, privileges apply to it. Both dropped at the end.
struct OwnRole {
    role: String,
    schema: Schema,
}

impl OwnRole {
    fn new() -> Self {
        let schema = Schema::new();
        let role = schema.name.replace("nudge_daemon", "nudge_role");
        pg_admin()
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN; ALTER SCHEMA {} OWNER TO {role}",
                schema.name
            ))
            .unwrap();
        Self { role, schema }
    }

    /// A role granted the data of a schema the tests' superuser owns and
    /// has migrated, and nothing else (README's grants): it may not
    /// change the schema.
    fn data_only() -> Self {
        let schema = Schema::new();
        let role = schema.name.replace("nudge_daemon", "nudge_app");
        let mut admin = schema.client();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("owner.toml");
        std::fs::write(&config, format!("[store]\nurl = {:?}\n", schema.url)).unwrap();
        let (code, out, err) = nudge(&["migrate", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        let name = &schema.name;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN;
                 GRANT USAGE ON SCHEMA {name} TO {role};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {name} TO {role};
                 GRANT USAGE ON ALL SEQUENCES IN SCHEMA {name} TO {role};"
            ))
            .unwrap();
        Self { role, schema }
    }

    /// `store.url` as the role.
    fn url(&self) -> String {
        let base = pg_base();
        assert!(
            base.starts_with("postgres://postgres@"),
            "this test logs in as a role of its own; it needs a base URL of user postgres: {base}"
        );
        self.schema.url.replacen(
            "postgres://postgres@",
            &format!("postgres://{}@", self.role),
            1,
        )
    }
}

impl Drop for OwnRole {
    fn drop(&mut self) {
        let _ = pg_admin().batch_execute(&format!(
            "DROP SCHEMA {} CASCADE; DROP OWNED BY {role}; DROP ROLE {role}",
            self.schema.name,
            role = self.role
        ));
    }
}

/// Replicas run as a role that may read and write nudge's tables but not
/// change the schema (least privilege): at the binary's version the schema
/// is only read at start, so the daemon starts, decides and sends.
#[test]
fn a_replica_runs_as_a_role_granted_only_the_data() {
    let app = OwnRole::data_only();
    let d = pg_daemon(&app.url(), 1);
    produce(&d.cfg.topic, &loans(0, 10));
    d.daemon
        .wait_until(LONG, "every push sent", || d.recv.by_key().len() == 10);
    let logs = d.daemon.log_tail();
    d.daemon.terminate();
    assert!(!logs.contains("permission denied"), "{logs}");
}

/// A DBA takes away a privilege the engine needs (INSERT on the processed
/// events) for a while. No record is at fault, so none is dead-lettered:
/// the daemon waits, not ready and saying why, and once the privilege is
/// back every event is decided and every push sent once.
#[test]
fn a_privilege_taken_away_for_a_while_loses_no_event() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let own = OwnRole::new();
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.store_url = Some(own.url());
    create_topic(&rt, &cfg.topic, 2);
    create_topic(&rt, &cfg.dlq, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    produce(&cfg.topic, &loans(0, 30));
    daemon.wait_until(LONG, "the first pushes", || recv.by_key().len() == 30);

    let mut admin = own.schema.client();
    admin
        .batch_execute(&format!(
            "REVOKE INSERT ON processed_events FROM {}",
            own.role
        ))
        .unwrap();
    produce(&cfg.topic, &loans(30, 30));
    daemon.wait_until(LONG, "/readyz to say the store refuses", || {
        daemon
            .readyz()
            .is_some_and(|r| !r.ready() && r.body.to_string().contains("permission denied"))
    });
    admin
        .batch_execute(&format!("GRANT INSERT ON processed_events TO {}", own.role))
        .unwrap();
    daemon.wait_until(LONG, "ready again and every push sent", || {
        daemon.readyz().is_some_and(|r| r.ready()) && recv.by_key().len() == 60
    });
    let logs = daemon.log_tail();
    daemon.terminate();
    let letters: i64 = admin
        .query_one("SELECT COUNT(*) FROM dead_letters", &[])
        .unwrap()
        .get(0);
    assert_eq!(letters, 0, "no event dead-lettered\n{logs}");
    let by_key = recv.by_key();
    assert!(by_key.values().all(|&n| n == 1), "{by_key:?}");
    let planned: i64 = admin
        .query_one("SELECT COUNT(*) FROM steps WHERE status = 'pending'", &[])
        .unwrap()
        .get(0);
    assert_eq!(planned, 120, "every loan's email and call planned\n{logs}");
}

/// One daemon on the PostgreSQL store `url`, ready, reading a topic of
/// `partitions` of its own and sending to a receiver of its own. Its
/// parts are used in place (`d.daemon`, `d.recv`): the runtime and the
/// directory live as long as it.
struct PgDaemon {
    daemon: Daemon,
    cfg: DaemonConfig,
    recv: Receiver,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

fn pg_daemon(url: &str, partitions: i32) -> PgDaemon {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.store_url = Some(url.to_string());
    create_topic(&rt, &cfg.topic, partitions);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    PgDaemon {
        daemon,
        cfg,
        recv,
        _dir: dir,
        _rt: rt,
    }
}

/// A DBA's transaction keeps a lock the engine needs (here on the table of
/// processed events): the daemon does not wait silently behind it. Its
/// statements give up after `lock_timeout`, `/readyz` names the lock
/// timeout, and once the transaction ends every event is decided, once.
#[test]
fn a_lock_another_session_keeps_makes_the_daemon_not_ready_saying_so() {
    let schema = Schema::new();
    let d = pg_daemon(&schema.url, 1);
    let (daemon, cfg, recv) = (&d.daemon, &d.cfg, &d.recv);
    let mut dba = schema.client();
    let mut tx = dba.transaction().unwrap();
    tx.batch_execute("LOCK TABLE processed_events IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    produce(&cfg.topic, &loans(0, 20));
    daemon.wait_until(LONG, "/readyz to name the lock timeout", || {
        daemon
            .readyz()
            .is_some_and(|r| !r.ready() && r.body.to_string().contains("lock timeout"))
    });
    assert!(recv.by_key().is_empty(), "nothing decided behind the lock");
    tx.commit().unwrap();
    daemon.wait_until(LONG, "ready again and every push sent", || {
        daemon.readyz().is_some_and(|r| r.ready()) && recv.by_key().len() == 20
    });
    d.daemon.terminate();
    assert!(d.recv.by_key().values().all(|&n| n == 1));
}

/// The schema's tables as they are now, copied into a schema beside it:
/// what a standby that stops receiving here would be promoted with.
fn standby_copy(schema: &Schema) -> String {
    let copy = format!("{}_standby", schema.name);
    let mut admin = pg_admin();
    let tables = tables_of(&mut admin, &schema.name);
    // One snapshot of every table, as one point of the primary's history.
    let mut tx = admin
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    tx.batch_execute(&format!("CREATE SCHEMA {copy}")).unwrap();
    for table in tables {
        tx.batch_execute(&format!(
            "CREATE TABLE {copy}.{table} AS SELECT * FROM {}.{table}",
            schema.name
        ))
        .unwrap();
    }
    tx.commit().unwrap();
    copy
}

fn tables_of(admin: &mut postgres::Client, schema: &str) -> Vec<String> {
    admin
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = $1 AND table_type = 'BASE TABLE' ORDER BY 1",
            &[&schema],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Puts the copy's rows back in one transaction, as a failover to that
/// standby would: every transaction committed since the copy is lost
/// (triggers off, as in a standby's replay).
fn fail_over_to(schema: &Schema, copy: &str) {
    let mut admin = pg_admin();
    let tables = tables_of(&mut admin, &schema.name);
    let all: Vec<String> = tables
        .iter()
        .map(|t| format!("{}.{t}", schema.name))
        .collect();
    // The daemon's transactions take the same tables' locks in another
    // order: a deadlock ends one side, and the restore is tried again.
    let restore = |admin: &mut postgres::Client| -> Result<(), postgres::Error> {
        let mut tx = admin.transaction()?;
        tx.batch_execute("SET LOCAL session_replication_role = replica")?;
        tx.batch_execute(&format!("TRUNCATE {}", all.join(", ")))?;
        for table in &tables {
            tx.batch_execute(&format!(
                "INSERT INTO {}.{table} OVERRIDING SYSTEM VALUE SELECT * FROM {copy}.{table}",
                schema.name
            ))?;
        }
        tx.commit()
    };
    let mut tries = 0;
    while let Err(e) = restore(&mut admin) {
        tries += 1;
        assert!(
            tries < 20 && e.code() == Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED),
            "{e:?}"
        );
    }
    admin
        .batch_execute(&format!("DROP SCHEMA {copy} CASCADE"))
        .unwrap();
}

/// A failover to a standby that had not received the last transactions:
/// the store's offsets go back under the running consumer, and with them
/// the loans decided and the signatures that ended them. Kafka still holds
/// those records: the daemon notices (here with no new record coming, so
/// by its periodic check), reads each partition again from the store's
/// offset and decides them again. Every loan has its instance, the signed
/// ones stay converted with nothing left to send, and a push the lost
/// transactions had recorded as sent goes again under the same key.
#[test]
fn a_failover_to_a_standby_that_missed_transactions_decides_them_again() {
    let schema = Schema::new();
    let d = pg_daemon(&schema.url, 2);
    let (daemon, cfg, recv) = (&d.daemon, &d.cfg, &d.recv);
    produce(&cfg.topic, &loans(0, 30));
    daemon.wait_until(LONG, "the first pushes", || recv.by_key().len() == 30);
    let standby = standby_copy(&schema);

    let mut db = schema.client();
    let count =
        |db: &mut postgres::Client, sql: &str| -> i64 { db.query_one(sql, &[]).unwrap().get(0) };
    let mut later = loans(30, 30);
    for c in 0..10 {
        later.push(event(
            &format!("signed-{c}"),
            "loan_application.signed",
            &format!("c{c}"),
            json!({"application_id": format!("A{c}")}),
        ));
    }
    produce(&cfg.topic, &later);
    let converted = "SELECT COUNT(*) FROM instances WHERE status = 'converted'";
    daemon.wait_until(
        LONG,
        "the later loans sent and the signed converted",
        || recv.by_key().len() == 60 && count(&mut db, converted) == 10,
    );
    let before = count(&mut db, "SELECT COUNT(*) FROM instances");

    fail_over_to(&schema, &standby);
    assert_eq!(count(&mut db, "SELECT COUNT(*) FROM instances"), 30);
    assert_eq!(
        count(&mut db, converted),
        0,
        "the signatures are lost with it"
    );
    daemon.wait_until(LONG, "the lost decisions made again", || {
        count(&mut db, "SELECT COUNT(*) FROM instances") == before
            && count(&mut db, converted) == 10
            && count(
                &mut db,
                "SELECT COUNT(*) FROM steps WHERE step = 'push' AND status <> 'sent'",
            ) == 0
    });
    let logs = daemon.log_tail();
    d.daemon.terminate();
    assert!(
        logs.contains("the store's offset is not this consumer's"),
        "the failover is said\n{logs}"
    );
    let signed_pending = count(
        &mut db,
        "SELECT COUNT(*) FROM steps s JOIN instances i ON i.id = s.instance_id
         WHERE i.status = 'converted' AND s.status = 'pending'",
    );
    assert_eq!(
        signed_pending, 0,
        "no reminder left for a signed loan\n{logs}"
    );
    let by_key = d.recv.by_key();
    assert_eq!(by_key.len(), 60, "{by_key:?}");
    assert!(by_key.values().all(|&n| n <= 2), "{by_key:?}");
}
