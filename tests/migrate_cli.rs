//! `nudge migrate --config FILE` as an operator runs it before a rollout,
//! and `nudge migrate --from` as ops run it when one node is not enough:
//! a node's SQLite store moved into PostgreSQL for replicas.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{
    create_topic, produce, run_examples, runtime, store_reader, unsigned_loan, wait_for, Daemon,
    DaemonConfig, Receiver, Schema,
};

fn nudge(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run nudge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn migrate_creates_the_schema_then_finds_it_up_to_date_and_refuses_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nudge.db");
    let config = dir.path().join("nudge.toml");
    std::fs::write(
        &config,
        format!("[store]\npath = {:?}\n", db.to_str().unwrap()),
    )
    .unwrap();
    let args = ["migrate", "--config", config.to_str().unwrap()];

    let (code, out, err) = nudge(&args, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("nudge.db: schema version ") && out.contains("(was 0)"),
        "{out}"
    );
    let version: u32 = out
        .split("schema version ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a version number");
    assert!(version >= 1);

    let (code, out, _) = nudge(&args, &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("schema version {version} (up to date)")),
        "{out}"
    );

    // A file written by a newer binary is refused, not touched.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "user_version", version + 1)
        .unwrap();
    drop(conn);
    let (code, out, err) = nudge(&args, &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("newer than this binary") && err.contains("store.path"),
        "{err}"
    );

    // Refused while a daemon owns the file (its lock held, as `nudge run`
    // holds it), whatever name the file is given.
    let lock = std::fs::File::create(dir.path().join("nudge.db.lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(dir.path().join("nudge.db.lock"), "4242\n").unwrap();
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    let linked = dir.path().join("linked.toml");
    std::fs::write(
        &linked,
        format!("[store]\npath = {:?}\n", link.to_str().unwrap()),
    )
    .unwrap();
    for config in [&config, &linked] {
        let (code, out, err) = nudge(&["migrate", "--config", config.to_str().unwrap()], &[]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("in use") && err.contains("4242"), "{err}");
    }
    drop(lock);

    // The environment names the store as it does for `nudge run`.
    let other = dir.path().join("other.db");
    let (code, out, err) = nudge(&args, &[("NUDGE_STORE__PATH", other.to_str().unwrap())]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("other.db") && other.exists(), "{out}");
}

const LONG: Duration = Duration::from_secs(90);

/// A node ran the example events on SQLite (five pushes, then the exits;
/// an email and a call task left for the coming days) and is stopped; ops move its store into
/// PostgreSQL and start a replica there in a new consumer group. The node's
/// history is in PostgreSQL's log, the email goes out once when due,
/// and nothing the node read is decided again: the partition resumes at the
/// node's offset, and a new event's push is the only other request. The
/// node's file is refused to a daemon now. (Several replicas sharing the
/// work: `tests/replicas.rs`.)
#[test]
fn a_node_moves_to_postgresql_and_a_replica_goes_on_where_it_stopped() {
    let rt = runtime();
    let recv = Receiver::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    create_topic(&rt, &cfg.topic, 1);
    let node = Daemon::start(&cfg, "node");
    node.wait_ready(LONG);
    run_examples(&node, &cfg.topic, &recv, &cfg.store, LONG);
    node.terminate();
    let node_config = dir.path().join("node.toml");
    let log_on = |config: &std::path::Path| {
        let (code, out, err) = nudge(
            &[
                "log",
                "--config",
                config.to_str().unwrap(),
                "--format",
                "json",
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        let mut lines: Vec<String> = out.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    let node_log = log_on(&node_config);
    assert!(node_log.len() >= 9, "{node_log:?}");
    let sqlite = store_reader(&cfg.store).unwrap();
    let count = |sql: &str| -> i64 { sqlite.query_row(sql, [], |r| r.get(0)).unwrap() };
    let node_instances = count("SELECT count(*) FROM instances");
    let node_sent = recv.requests().len();
    drop(sqlite);

    let schema = Schema::new();
    cfg.store_url = Some(schema.url.clone());
    cfg.group = harness::unique("replicas");
    let (replica_config, _) = cfg.write("replica");
    let db = cfg.store.to_str().unwrap();
    let from = format!("sqlite://{db}");
    let (code, out, err) = nudge(
        &[
            "migrate",
            "--config",
            replica_config.to_str().unwrap(),
            "--from",
            &from,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    for table in [
        "instances",
        "steps",
        "dispatch_log",
        "kafka_offsets",
        "processed_events",
    ] {
        assert!(out.contains(table), "{out}");
    }
    assert!(out.contains("marked as moved"), "{out}");
    assert_eq!(log_on(&replica_config), node_log, "the log came across");

    // The node's file is refused to a daemon now, with where it went.
    let mut again = Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["run", "--config", node_config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(LONG, "the node to refuse its moved file", || {
        again.try_wait().unwrap().is_some()
    });
    let out = again.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("was moved to") && err.contains(&schema.name),
        "{err}"
    );
    // Run again into the same store (a retried init step): nothing to do.
    let replica = replica_config.to_str().unwrap();
    let (code, out, err) = nudge(&["migrate", "--config", replica, "--from", db], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("already moved") && out.contains("nothing to do"),
        "{out}"
    );
    // The node's history still reads, saying where the rest is.
    let (code, _, err) = nudge(&["log", "--config", node_config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("note:") && err.contains(&schema.name), "{err}");

    // A day passes for the email left (the daemon's clock is the wall's);
    // the call task stays pending for its day.
    let mut pg = schema.client();
    let pending = |pg: &mut postgres::Client| -> Vec<String> {
        let rows = pg
            .query(
                "SELECT channel FROM steps WHERE status = 'pending' ORDER BY 1",
                &[],
            )
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    };
    assert_eq!(pending(&mut pg), ["call_task", "email"]);
    pg.execute(
        "UPDATE steps SET due_at = now() WHERE status = 'pending' AND channel = 'email'",
        &[],
    )
    .unwrap();
    let a = Daemon::start(&cfg, "replica");
    a.wait_ready(LONG);
    a.wait_until(LONG, "the email left", || recv.on("/email").len() == 1);
    assert_eq!(recv.requests().len(), node_sent + 1);
    // Whatever the node read is behind the replicas' offsets: a new event is
    // the next thing decided, and its push the only request after the two.
    let contact = harness::event(
        "ctx-900",
        "customer.contact_updated",
        "c900",
        serde_json::json!({"app_installed": true, "email": "c900@example.com", "timezone": "UTC"}),
    );
    produce(&cfg.topic, &[contact, unsigned_loan(900, "Personal loan")]);
    a.wait_until(LONG, "the new event's push", || {
        recv.requests().len() >= node_sent + 2
    });
    let requests = recv.requests();
    assert_eq!(requests.len(), node_sent + 2);
    assert!(
        requests[node_sent + 1].body.to_string().contains("c900"),
        "{:?}",
        requests[node_sent + 1]
    );
    // The node's call task waits for its day beside the new journey's steps.
    assert_eq!(pending(&mut pg), ["call_task", "call_task", "email"]);
    assert!(
        recv.by_key().values().all(|&n| n == 1),
        "{:?}",
        recv.by_key()
    );
    let instances: i64 = pg
        .query_one("SELECT count(*) FROM instances", &[])
        .unwrap()
        .get(0);
    assert_eq!(instances, node_instances + 1);
    let log = std::fs::read_to_string(&a.log).unwrap();
    assert!(
        log.contains(r#""partitions":1,"at_stored_offsets":1"#),
        "{log}"
    );
    a.terminate();
}
