use chrono::{TimeZone, Utc};

use super::testing::{fresh_schema, replicas, temp_store};
use super::*;
use crate::store::conformance::{instance, steps, t0};

crate::store_conformance!(temp_store(), replicas: replicas());

#[test]
fn propensity_counts_survive_a_restart() {
    let (schema, options) = fresh_schema();
    // Dropping this drops the schema at the end.
    let _cleanup = super::testing::TestStore::adopt(schema);
    crate::store::conformance::propensity_counts_survive_a_restart(&|| {
        Box::new(PostgresStore::open(&options).unwrap())
    });
}

#[test]
fn a_conversion_holds_no_counter_a_settle_needs() {
    let store = temp_store();
    crate::store::conformance::a_conversion_holds_no_counter_a_settle_needs(&*store, &|| {
        super::testing::admin()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            > 0
    });
}

#[test]
fn a_new_schema_is_migrated_once_and_a_newer_one_refused() {
    let (schema, options) = fresh_schema();
    assert_eq!(
        PostgresStore::migrate(&options).unwrap(),
        (0, schema::VERSION)
    );
    assert_eq!(
        PostgresStore::migrate(&options).unwrap(),
        (schema::VERSION, schema::VERSION)
    );
    // Replicas starting at once: each migration runs once.
    let (other, options2) = fresh_schema();
    std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| drop(PostgresStore::open(&options2).unwrap()));
        }
    });
    let store = PostgresStore::open(&options2).unwrap();
    let applied: i64 = store
        .conn()
        .unwrap()
        .client
        .query_one("SELECT count(*) FROM schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(applied, i64::from(schema::VERSION));
    store
        .conn()
        .unwrap()
        .client
        .execute(
            "INSERT INTO schema_version (version, binary_version) VALUES ($1, 'future')",
            &[&(schema::VERSION as i32 + 1)],
        )
        .unwrap();
    let err = PostgresStore::open(&options2).err().expect("refused");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, supported } if found == schema::VERSION + 1 && supported == schema::VERSION),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this binary"), "{err}");
    assert!(!err.is_transient());
    drop(store);
    for s in [schema, other] {
        drop_schema(&s);
    }
}

/// A search_path naming no schema that exists: refused saying so, with
/// how to name one, not PostgreSQL's "no schema has been selected".
#[test]
fn a_search_path_without_a_schema_is_refused_naming_it() {
    let (schema, options) = fresh_schema();
    drop_schema(&schema);
    let err = PostgresStore::migrate(&options).expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains(&format!("search_path `{schema}`")) && text.contains("CREATE SCHEMA"),
        "{text}"
    );
    assert!(!err.is_transient());
}

fn drop_schema(schema: &str) {
    let (config, _) = parse_url(&super::testing::base_url()).unwrap();
    let mut client = config.connect(postgres::NoTls).unwrap();
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}

#[test]
fn a_rule_version_keeps_when_it_was_first_loaded() {
    let store = temp_store();
    let first = Utc.timestamp_millis_opt(1_000).unwrap();
    let files = serde_json::json!({"rules/a.rhai": "h1"});
    store.record_rules("v1", &files, first).unwrap();
    store
        .record_rules("v1", &files, first + chrono::Duration::days(3))
        .unwrap();
    let row = store
        .conn()
        .unwrap()
        .client
        .query_one(
            "SELECT loaded_at, files->>'rules/a.rhai' FROM rule_versions WHERE version = 'v1'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, DateTime<Utc>>(0), first);
    assert_eq!(row.get::<_, String>(1), "h1");
}

/// A unique key another writer took first is transient (the batch is
/// retried and then finds the work done); a failed statement loses the
/// whole transaction, and `commit` says so instead of committing half.
#[test]
fn errors_are_classified_and_a_failed_transaction_commits_nothing() {
    let store = temp_store();
    let mut tx = store.begin().unwrap();
    tx.start_instance(&instance("i1", "c1", "a1"), &steps())
        .unwrap();
    tx.commit().unwrap();
    let mut tx = store.begin().unwrap();
    tx.mark_processed("e9", t0()).unwrap();
    // Writes are held until the next read or the commit, which reports
    // the violation.
    tx.start_instance(&instance("i1", "c1", "a1"), &steps())
        .unwrap();
    let err = tx.open_instance("c1", "a9", "k").unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(matches!(tx.commit(), Err(StoreError::Aborted)));
    let mut tx = store.begin().unwrap();
    tx.start_instance(&instance("i1", "c1", "a1"), &steps())
        .unwrap();
    let err = tx.commit().unwrap_err();
    assert!(err.is_transient(), "{err}");
    let mut tx = store.begin().unwrap();
    assert!(!tx.already_processed("e9").unwrap(), "nothing committed");
    drop(tx);
    // A statement the server refuses as such will fail again.
    let err: StoreError = store
        .conn()
        .unwrap()
        .client
        .batch_execute("SELEC 1")
        .unwrap_err()
        .into();
    assert!(!err.is_transient(), "{err}");
    // Named by the server's message and code, not the client's "db error".
    assert_eq!(
        err.to_string(),
        "postgres: syntax error at or near \"SELEC\" (42601)"
    );
    // No server at all: transient.
    let (mut config, _) = parse_url("postgres://postgres@127.0.0.1:1/test").unwrap();
    config.connect_timeout(std::time::Duration::from_secs(1));
    let err: StoreError = config
        .connect(postgres::NoTls)
        .err()
        .expect("nothing listens on port 1")
        .into();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
}

/// A claim's statements find their rows through indexes.
#[test]
fn claims_and_settles_use_indexes() {
    let store = temp_store();
    let mut conn = store.conn().unwrap();
    conn.client
        .batch_execute("SET enable_seqscan = off")
        .unwrap();
    for (sql, params) in [
        (REQUEUE_EXPIRED, "('push', now())"),
        (CLAIM, "('push', now(), 10, 'me', now())"),
        (RELEASE_CUSTOMERS, "(ARRAY['c1'], 'me')"),
        (NEXT_DUE, "('push', 'me')"),
        (SETTLE, SETTLE_PARAMS),
    ] {
        let plan = plan_of(&mut conn.client, sql, params);
        assert!(!plan.contains("Seq Scan on steps"), "{sql}\n{plan}");
    }
}

/// `SETTLE`'s parameters for one step of `c1` (instance `i1`, step `push`) sent.
const SETTLE_PARAMS: &str = "(ARRAY['i1'], ARRAY['push'], ARRAY['sent'], ARRAY[NULL::timestamptz], ARRAY[false],
    ARRAY['i1'], ARRAY[now()], ARRAY[now()], ARRAY['c1'], ARRAY['j'], ARRAY['i1'], ARRAY['push'], ARRAY['push'],
    ARRAY['t'], ARRAY['sent'], ARRAY['r'], ARRAY['h'], ARRAY[1], ARRAY[NULL::int8], ARRAY[NULL::text],
    ARRAY[200], ARRAY[12::int8], ARRAY['c1'], 'me', ARRAY[true], ARRAY[true])";

/// A `NOT EXISTS` looking up a customer's lease or claimed steps is a probe
/// by that customer per row, whatever the statistics say: planned as a
/// join, with the tables' statistics from when they were empty, it scanned
/// the whole table or index once per row, and those grow with dead rows.
#[test]
fn lease_lookups_probe_by_customer() {
    let store = temp_store();
    let mut conn = store.conn().unwrap();
    // Statistics of empty tables, as a fresh store has; a scan of an empty
    // table costs nothing, so tables of one page or more are what it is
    // about (a whole index scanned with a join filter is what went wrong).
    conn.client
        .batch_execute("ANALYZE steps; ANALYZE customer_claims; SET enable_seqscan = off")
        .unwrap();
    for (sql, params, probe) in [
        (
            CLAIM,
            "('push', now(), 10, 'me', now())",
            "Index Cond: (customer = s.customer)",
        ),
        (
            RELEASE_CUSTOMERS,
            "(ARRAY['c1'], 'me')",
            "Index Cond: (customer = c.customer)",
        ),
        (SETTLE, SETTLE_PARAMS, "Index Cond: (customer = c.customer)"),
        (SETTLE, SETTLE_PARAMS, "Index Cond: (instance_id = i.id)"),
    ] {
        for plan_of in PLANNERS {
            let plan = plan_of(&mut conn.client, sql, params);
            assert!(plan.contains(probe), "{sql}\n{plan}");
        }
    }
}

/// A dispatch batch's statements find each row through its key, however
/// the tables' statistics look: written as joins, a new store's tables (no
/// statistics: every estimate a row) had a claim match its candidates to
/// the leases by one scan per candidate, and once analyzed the steps,
/// instances and customers were hashed whole from sequential scans, the
/// histories walked the whole log in `seq` order and the recent sends
/// every send in the window through the review's outcome index.
#[test]
fn dispatch_statements_probe_by_key() {
    let store = temp_store();
    let mut conn = store.conn().unwrap();
    let customers = "ARRAY['c1', 'c2']";
    for analyzed in [false, true] {
        if analyzed {
            conn.client.batch_execute("ANALYZE").unwrap();
        }
        // As in `lease_lookups_probe_by_customer`: an empty table costs
        // nothing to scan; which index serves is what is checked.
        conn.client
            .batch_execute("SET enable_seqscan = off")
            .unwrap();
        let reads = format!("({customers}, now())");
        let histories = "(ARRAY['i1', 'i2'])".to_string();
        for (sql, params, probes) in [
            (
                CLAIM,
                "('push', now(), 10, 'me', now())".to_string(),
                &[
                    "Index Cond: (id = ANY",
                    "hashed SubPlan",
                    "Index Cond: (id = c.instance_id)",
                ][..],
            ),
            (
                SETTLE,
                SETTLE_PARAMS.to_string(),
                &[
                    "Index Cond: ((instance_id = n.instance_id) AND (step = n.step))",
                    "instances_pkey",
                ][..],
            ),
            (
                read::CUSTOMER_CONTEXTS,
                format!("({customers})"),
                &["Index Cond: (id = u.id)"][..],
            ),
            (
                read::RECENT_SENDS,
                reads.clone(),
                &["dispatch_log_customer", "customer = u.id"][..],
            ),
            (
                read::HISTORIES,
                histories,
                &["Index Cond: (instance = u.id)"][..],
            ),
            (
                upcoming::UPCOMING,
                reads,
                &[
                    "Index Cond: (customer = u.customer)",
                    "Index Scan using instances_pkey",
                ][..],
            ),
        ] {
            for plan_of in PLANNERS {
                let plan = plan_of(&mut conn.client, sql, &params);
                for probe in probes {
                    assert!(plan.contains(probe), "analyzed: {analyzed}\n{sql}\n{plan}");
                }
                // A hash join would read one side whole (the settle's joins are
                // between the bound arrays and the rows found by key: either way).
                if sql != SETTLE {
                    assert!(
                        !plan.contains("Hash"),
                        "analyzed: {analyzed}\n{sql}\n{plan}"
                    );
                }
                // Every open instance, for the completion of a few.
                assert!(
                    !plan.contains("instances_one_open"),
                    "analyzed: {analyzed}\n{sql}\n{plan}"
                );
            }
        }
    }
}

/// A settle's completion and a batch's send mark name many rows at once;
/// on tables never analyzed, a bound array of ids was estimated at 0.5 % of
/// the table an id, and below about 40 k rows the steps or instances were
/// scanned whole for a batch (2.5 of a 7.6 ms settle of 128 on 20 k). Here
/// with sequential scans allowed, on 20 k rows never analyzed.
#[test]
fn many_ids_are_probed_by_key_on_a_new_store() {
    let store = temp_store();
    let mut conn = store.conn().unwrap();
    insert_due_pushes(&mut conn.client, 20_000);
    let n = 128;
    let list = |f: &dyn Fn(usize) -> String| {
        let items: Vec<String> = (1..=n).map(f).collect();
        format!("ARRAY[{}]", items.join(", "))
    };
    let ids = list(&|i| format!("'i{i}'"));
    let customers = list(&|i| format!("'c{i}'"));
    let text = |v: &str| list(&|_| format!("'{v}'"));
    let times = list(&|_| "now()".into());
    let fenced = list(&|_| "true".into());
    let settle = format!(
        "({ids}, {}, {}, {}, {}, {ids}, {times}, {times}, {customers}, {}, {ids}, {}, {}, {},
          {}, {}, {}, {}, {}, {}, {}, {}, {customers}, 'me', {fenced}, {fenced})",
        text("push"),
        text("sent"),
        list(&|_| "NULL::timestamptz".into()),
        list(&|_| "false".into()),
        text("j"),
        text("push"),
        text("push"),
        text("t"),
        text("sent"),
        text("r"),
        text("h"),
        list(&|_| "1".into()),
        list(&|_| "NULL::int8".into()),
        list(&|_| "NULL::text".into()),
        list(&|_| "200".into()),
        list(&|_| "12::int8".into()),
    );
    let mark = format!("({}, now(), 'me')", list(&|i| i.to_string()));
    for (sql, params, probe) in [
        (SETTLE, settle, "instances_pkey"),
        (MARK_SENDING, mark, "steps_pkey"),
    ] {
        let plan = plan_of(&mut conn.client, sql, &params);
        assert!(plan.contains(probe), "{sql}\n{plan}");
        for table in ["steps", "instances"] {
            assert!(
                !plan.contains(&format!("Seq Scan on {table}")),
                "{sql}\n{plan}"
            );
        }
    }
}

/// The plan PostgreSQL uses for `sql` prepared as the pool prepares it and
/// executed with `params` (a parenthesized argument list).
fn plan_of(client: &mut postgres::Client, sql: &str, params: &str) -> String {
    client
        .batch_execute(&format!("PREPARE q AS {sql}"))
        .unwrap();
    let plan = client
        .query(&format!("EXPLAIN EXECUTE q {params}"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    client.batch_execute("DEALLOCATE q").unwrap();
    plan
}

/// Plans per run and plans kept: the dispatch statements are marked
/// [`conn::GENERIC_PLAN`], and planned per run where a test's connection
/// plans them itself.
const PLANNERS: [fn(&mut postgres::Client, &str, &str) -> String; 2] = [plan_of, generic_plan_of];

/// The plan of `sql` as [`plan_of`] gives it, in the session the statements
/// marked [`conn::GENERIC_PLAN`] run in (one plan kept, no scan where an
/// index serves).
fn generic_plan_of(client: &mut postgres::Client, sql: &str, params: &str) -> String {
    let show = |client: &mut postgres::Client, name: &str| -> String {
        client
            .query_one(&format!("SHOW {name}"), &[])
            .unwrap()
            .get(0)
    };
    let (mode, seqscan) = (
        show(client, "plan_cache_mode"),
        show(client, "enable_seqscan"),
    );
    client.batch_execute(conn::GENERIC_SESSION).unwrap();
    let plan = plan_of(client, sql, params);
    client
        .batch_execute(&format!(
            "SET plan_cache_mode = {mode}; SET enable_seqscan = {seqscan}"
        ))
        .unwrap();
    plan
}

/// A statement marked [`conn::GENERIC_PLAN`] keeps the plan made at its
/// first run on a connection (until an `ANALYZE` of its tables), and a
/// daemon's first runs are on a new, empty store: that plan must find rows
/// by key, neither scan a table nor walk an index that grows, whatever the
/// statistics of small or empty tables say (a scan chosen because a table
/// was empty stayed in a cached generic plan as it grew: 238 µs a step,
/// see `conn`). Statements whose kept plan failed this are planned per run
/// and listed. The batch inserts from `unnest` read no table but the bound
/// arrays and are not listed.
#[test]
fn generic_plans_probe_by_key_on_empty_tables() {
    let store = temp_store();
    let mut conn = store.conn().unwrap();
    let marked = [
        (CLAIM, "('push', now(), 10, 'me', now())".to_string()),
        (SETTLE, SETTLE_PARAMS.into()),
        (MARK_SENDING, "(ARRAY[1::int8, 2], now(), 'me')".into()),
        (RELEASE_CUSTOMERS, "(ARRAY['c1', 'c2'], 'me')".into()),
        (read::CUSTOMER_CONTEXTS, "(ARRAY['c1', 'c2'])".into()),
        (read::JOURNEYS, "(ARRAY['c1', 'c2'])".into()),
        (read::RECENT_SENDS, "(ARRAY['c1', 'c2'], now())".into()),
        (read::POSSIBLY_SENT, "(ARRAY['c1', 'c2'], now())".into()),
        (read::HISTORIES, "(ARRAY['i1', 'i2'])".into()),
        (upcoming::UPCOMING, "(ARRAY['c1', 'c2'], now())".into()),
        (tx::OPEN_INSTANCES, "(ARRAY['c1', 'c2'])".into()),
        (tx::OPEN_INSTANCE, "('c1', 'j', 'k')".into()),
        (tx::CLOSE_INSTANCE, "('i1', 'converted', now())".into()),
        (
            tx::PLAN_WITHDRAWALS,
            "('i1', ARRAY['call_task'], now(), ':withdraw')".into(),
        ),
    ];
    for (sql, _) in &marked {
        assert!(sql.starts_with(conn::GENERIC_PLAN), "{sql}");
    }
    // Kept from empty tables, these walked every instance of a journey
    // (`instances_by_journey`), every pending step, or every instance and
    // lease (the look for the next due step of a customer another replica
    // holds), or every unsettled step (the look for expired claims, once
    // analyzed): planned per run.
    for sql in [
        tx::COMPLETED_INSTANCE,
        tx::CANCEL_STEPS,
        NEXT_DUE,
        REQUEUE_EXPIRED,
    ] {
        assert!(!sql.starts_with(conn::GENERIC_PLAN), "{sql}");
    }
    // The states a kept plan can be made in: a new store (never analyzed,
    // empty), tables analyzed while empty, rows come since (statistics
    // still of empty tables), analyzed with rows.
    for state in ["new", "analyzed empty", "rows since", "analyzed"] {
        match state {
            "analyzed empty" | "analyzed" => conn.client.batch_execute("ANALYZE").unwrap(),
            "rows since" => insert_due_pushes(&mut conn.client, 200),
            _ => {}
        }
        for (sql, params) in &marked {
            // A settle names claimed steps: their table is not empty when
            // it runs (on an empty one analyzed, its kept plan would walk
            // the steps' key index).
            if state == "analyzed empty" && *sql == SETTLE {
                continue;
            }
            let plan = generic_plan_of(&mut conn.client, sql, params);
            for table in [
                "steps",
                "instances",
                "dispatch_log",
                "customers",
                "customer_claims",
                "processed_events",
            ] {
                assert!(
                    !plan.contains(&format!("Seq Scan on {table} ")),
                    "{state}\n{sql}\n{plan}"
                );
            }
            // Nor walks an index whole.
            let walked = walks_an_index(&plan);
            assert!(
                walked.is_empty(),
                "{state}: walks {walked:?}\n{sql}\n{plan}"
            );
        }
    }
}

/// The indexes a plan scans without an index condition (walked whole, rows
/// only filtered).
fn walks_an_index(plan: &str) -> Vec<String> {
    let lines: Vec<&str> = plan.lines().collect();
    let mut walked = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(index) = [
            "Index Scan using ",
            "Index Scan Backward using ",
            "Index Only Scan using ",
        ]
        .iter()
        .find_map(|scan| line.split(scan).nth(1))
        .and_then(|rest| rest.split(' ').next()) else {
            continue;
        };
        // The node's own lines: deeper than it, up to its first child.
        let depth = line.len() - line.trim_start().len();
        let conditioned = lines[at + 1..]
            .iter()
            .take_while(|l| {
                l.len() - l.trim_start().len() > depth && !l.trim_start().starts_with("->")
            })
            .any(|l| l.contains("Index Cond:"));
        if !conditioned {
            walked.push(index.to_string());
        }
    }
    walked
}

/// `n` open instances `i1`… of customers `c1`…, each with its push step due now.
fn insert_due_pushes(client: &mut postgres::Client, n: i32) {
    client
        .execute(
            "INSERT INTO instances (id, customer, journey, key, status, mode, category, started_at,
                 rule_hash, trigger_event, vars, decision_inputs)
             SELECT 'i' || g, 'c' || g, 'j', '', 'open', 'live', 'service', now(), 'h', 'e' || g,
                 '{}', '{\"event\": {\"id\": \"e\"}}'
             FROM generate_series(1, $1) AS g",
            &[&n],
        )
        .unwrap();
    client
        .execute(
            "INSERT INTO steps (instance_id, customer, step, seq, channel, template, planned_at,
                 due_at, status)
             SELECT 'i' || g, 'c' || g, 'push', 0, 'push', 't', now(), now(), 'pending'
             FROM generate_series(1, $1) AS g",
            &[&n],
        )
        .unwrap();
}

/// A replica draining on SIGTERM hands its unsent claims back: the other
/// replicas on the schema hear of it at once (`NOTIFY`), not at their next
/// idle look, and only for their own schema.
#[test]
fn replicas_hear_steps_handed_back() {
    use std::sync::mpsc;
    use std::time::Duration as StdDuration;

    let (a, b) = replicas();
    let elsewhere = temp_store();
    let (heard_tx, heard) = mpsc::channel();
    b.on_steps_released(Box::new(move |heard| {
        if let Ok(channel) = heard {
            let _ = heard_tx.send(channel);
        }
    }))
    .unwrap();
    // Listening: every channel is woken once, for what it may have missed.
    let mut first: Vec<ChannelKind> = (0..3)
        .map(|_| heard.recv_timeout(StdDuration::from_secs(30)).unwrap())
        .collect();
    first.sort_by_key(|c| c.as_str());
    assert_eq!(first.len(), ChannelKind::ALL.len());

    for store in [&*elsewhere, &*a] {
        let mut tx = store.begin().unwrap();
        tx.start_instance(&instance("i1", "c1", "a1"), &steps())
            .unwrap();
        tx.commit().unwrap();
    }
    // Another schema's release (an email, committed first: notifications
    // arrive in commit order) is not this replica's business.
    let later = t0() + chrono::Duration::days(2);
    let claimed = elsewhere
        .claim_due(
            ChannelKind::Email,
            later,
            10,
            later + chrono::Duration::minutes(5),
        )
        .unwrap();
    assert_eq!(claimed.len(), 1);
    elsewhere.release_claim("i1", "email", None).unwrap();
    let claim_push = |store: &PostgresStore| {
        store
            .claim_due(
                ChannelKind::Push,
                t0(),
                10,
                t0() + chrono::Duration::minutes(5),
            )
            .unwrap()
    };
    assert_eq!(claim_push(&a).len(), 1);
    a.release_claim("i1", "push", None).unwrap();
    assert_eq!(
        heard.recv_timeout(StdDuration::from_secs(30)),
        Ok(ChannelKind::Push)
    );
    assert!(heard.try_recv().is_err(), "one release, one wake-up");
    // And `b` takes the step at once.
    assert_eq!(claim_push(&b).len(), 1);
}

/// A DBA looking at `pg_stat_activity` tells the replicas apart: each
/// session is named after its replica, as its claims' holder is.
#[test]
fn sessions_are_named_after_their_replica() {
    let store = temp_store();
    let name: String = store
        .conn()
        .unwrap()
        .client
        .query_one("SELECT current_setting('application_name')", &[])
        .unwrap()
        .get(0);
    assert_eq!(name, format!("nudge/{}", store.holder()));
    assert!(
        name.starts_with(&super::conn::replica_name()),
        "the process's name, then the claims' random part"
    );
    assert!(name.len() <= 63, "within PostgreSQL's NAMEDATALEN: {name}");
}

/// A container restarted in its pod (same host name, same pid) takes its
/// predecessor's claims back at once instead of waiting out their lease;
/// a live replica that happens to share host and pid keeps its own.
#[test]
fn a_replica_gone_from_the_same_place_has_its_claims_released() {
    let (alive, gone, options) = super::testing::replicas_with_options();
    let mut tx = alive.begin().unwrap();
    for (id, customer) in [("i1", "c1"), ("i2", "c2")] {
        tx.start_instance(&instance(id, customer, "a1"), &steps()[..1])
            .unwrap();
    }
    tx.commit().unwrap();
    let lease = t0() + chrono::Duration::minutes(5);
    let kept = alive.claim_due(ChannelKind::Push, t0(), 1, lease).unwrap();
    let lost = gone.claim_due(ChannelKind::Push, t0(), 1, lease).unwrap();
    assert_eq!((kept.len(), lost.len()), (1, 1));
    let name = format!("nudge/{}", gone.holder());
    drop(gone);
    // The server ends a session a moment after its client closed it.
    let mut admin = super::testing::admin();
    while admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    let successor = PostgresStore::open(&options).unwrap();
    assert_eq!(successor.release_dead_predecessors().unwrap(), 1);
    let again = successor
        .claim_due(ChannelKind::Push, t0(), 10, lease)
        .unwrap();
    assert_eq!(
        again.iter().map(|s| &s.instance_id).collect::<Vec<_>>(),
        [&lost[0].instance_id],
        "the gone replica's step at once, the live one's kept"
    );
    assert_eq!(again[0].attempt, 1, "its send had not begun: no attempt");
    assert_eq!(successor.release_dead_predecessors().unwrap(), 0);
}

/// A role of its own for a test, dropped with its privileges at the end.
struct Role(String);

impl Drop for Role {
    fn drop(&mut self) {
        let _ = super::testing::admin()
            .batch_execute(&format!("DROP OWNED BY {0}; DROP ROLE {0}", self.0));
    }
}

/// A runtime role that may not change the schema (least privilege) is told
/// what is missing at start, in the terms a DBA acts on: the schema's use,
/// a migration to run as the owner, each table or function not granted.
#[test]
fn a_role_short_of_privileges_is_told_what_to_grant() {
    let (schema, options) = fresh_schema();
    let _cleanup = super::testing::TestStore::adopt(schema.clone());
    let role = Role(format!("{schema}_app"));
    let mut admin = super::testing::admin();
    admin
        .batch_execute(&format!("CREATE ROLE {} LOGIN", role.0))
        .unwrap();
    let as_role = PgOptions {
        url: options
            .url
            .replacen("://postgres@", &format!("://{}@", role.0), 1),
        ..options.clone()
    };
    assert!(as_role.url.contains(&role.0), "{}", as_role.url);
    let refused = |why: &str| {
        let err = PostgresStore::open(&as_role).err().expect("refused");
        assert!(err.to_string().contains(why), "{err}");
    };
    refused("grant its use (GRANT USAGE ON SCHEMA");
    admin
        .batch_execute(&format!("GRANT USAGE ON SCHEMA {schema} TO {}", role.0))
        .unwrap();
    refused("the schema is version 0, this binary's");
    refused("run `nudge migrate --config FILE` as the schema's owner first");

    PostgresStore::migrate(&options).unwrap();
    admin
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {r};
             REVOKE UPDATE, DELETE ON {schema}.control_log FROM {r};
             REVOKE EXECUTE ON FUNCTION {schema}.review_fold() FROM PUBLIC;",
            r = role.0
        ))
        .unwrap();
    refused("control_log: UPDATE, DELETE; review_fold(): EXECUTE");
    admin
        .batch_execute(&format!(
            "GRANT UPDATE, DELETE ON {schema}.control_log TO {r};
             GRANT EXECUTE ON FUNCTION {schema}.review_fold() TO {r};",
            r = role.0
        ))
        .unwrap();
    let store = PostgresStore::open(&as_role).unwrap();
    assert!(store.offsets("events").unwrap().is_empty());
}

/// The server's message is said once, with its code, also where the error
/// is shown with its chain of causes (`nudge funnel`, start-up errors).
#[test]
fn a_server_error_is_said_once_with_its_code() {
    let store = temp_store();
    let err: StoreError = store
        .conn()
        .unwrap()
        .client
        .query_one("SELECT 1 / (SELECT 0)", &[])
        .unwrap_err()
        .into();
    let shown = format!("{:#}", anyhow::Error::new(err));
    assert_eq!(shown.matches("division by zero").count(), 1, "{shown}");
    assert!(shown.contains("(22012)"), "{shown}");
}

/// A DBA's short `statement_timeout` on nudge's role does not cut a
/// migration short: it would fail at every start as the tables grow.
#[test]
fn migrations_run_under_a_short_statement_timeout() {
    let (schema, mut options) = fresh_schema();
    let _cleanup = super::testing::TestStore::adopt(schema);
    options.url.push_str("%20-cstatement_timeout%3D5");
    let mut c = parse_url(&options.url)
        .unwrap()
        .0
        .connect(postgres::NoTls)
        .unwrap();
    let timeout: String = c.query_one("SHOW statement_timeout", &[]).unwrap().get(0);
    assert_eq!(timeout, "5ms");
    assert_eq!(
        PostgresStore::migrate(&options).unwrap(),
        (0, schema::VERSION)
    );
}
