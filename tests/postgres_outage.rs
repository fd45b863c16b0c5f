//! PostgreSQL goes away under a running daemon: it keeps running, stops
//! consuming, says why on `/readyz`, and when the database is back it
//! resumes without losing or doubling anything. Its own test binary: it
//! stops the machine's PostgreSQL server, which no other test may see.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::*;

const LONG: Duration = Duration::from_secs(120);

fn pg_ctl(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            version.to_str().unwrap(),
            "main",
            action,
        ])
        .status()
        .expect("pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster {action}: {status:?}");
}

/// Starts PostgreSQL again however the test ends.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .args(["-c", "pg_isready -q -h 127.0.0.1 || pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"])
            .status();
    }
}

#[test]
fn the_database_going_away_makes_the_daemon_not_ready_and_it_resumes_without_loss() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let recv = Receiver::start(&rt);
    let schema = Schema::new();
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.store_url = Some(schema.url.clone());
    create_topic(&rt, &cfg.topic, 3);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    produce(&cfg.topic, &loans(0, 200));
    daemon.wait_until(LONG, "the first pushes", || recv.by_key().len() == 200);

    let _restart = RestartOnDrop;
    pg_ctl("stop");
    // Not ready, and saying why: the probe's failure, not only that no
    // answer came within its second. (Whether the pool's timeout carries
    // the server's refusal depends on which waiter took r2d2's last error.)
    daemon.wait_until(LONG, "/readyz to say why the store is unreachable", || {
        daemon.readyz().is_some_and(|r| {
            !r.ready()
                && r.body["store"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("unreachable: "))
        })
    });
    // Records keep arriving while the database is down.
    produce(&cfg.topic, &loans(200, 200));
    assert!(daemon.exited().is_none(), "the daemon keeps running");
    pg_ctl("start");
    daemon.wait_until(LONG, "ready again and every push sent", || {
        daemon.readyz().is_some_and(|r| r.ready()) && recv.by_key().len() == 400
    });
    let logs = daemon.log_tail();
    daemon.terminate();
    let by_key = recv.by_key();
    assert_eq!(by_key.len(), 400, "{logs}");
    let mut db = schema.client();
    let sent: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM dispatch_log WHERE outcome = 'sent'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(sent, 400, "each push recorded sent once\n{logs}");
    let planned: i64 = db
        .query_one("SELECT COUNT(*) FROM steps WHERE status = 'pending'", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        planned, 800,
        "every loan's email and call planned: no event lost"
    );
}
