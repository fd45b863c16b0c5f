//! Runtime control against a real daemon: the admin API with the admin
//! token from the environment (and without it, with a wrong one, with the
//! reviewer's), a journey switched to shadow and a channel stopped while
//! events flow through the real broker, the overrides still in force after
//! a restart, and `nudge control` calling the same API and reading the
//! control log.

mod harness;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use harness::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);
const TOKEN_ENV: &str = "NUDGE_TEST_CONTROL_ADMIN_TOKEN";
const ADMIN_TOKEN: &str = "adm1n-secret-for-the-control-test";
const REVIEWER_TOKEN: &str = "rev1ewer-secret-of-the-control-test";

/// An HTTP/1.1 request on loopback with an optional bearer token: (status, body).
fn http(host: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut stream, &mut buf).unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Outcomes the store logged for a journey's steps of one customer.
fn outcomes(db: &Path, customer: &str, journey: &str) -> Vec<(String, String)> {
    let Some(conn) = store_reader(db) else {
        return vec![];
    };
    let Ok(mut stmt) = conn.prepare(
        "SELECT outcome, reason FROM dispatch_log WHERE customer = ?1 AND journey = ?2 ORDER BY seq",
    ) else {
        return vec![];
    };
    stmt.query_map([customer, journey], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn step_status(db: &Path, customer: &str, step: &str) -> Option<String> {
    let conn = store_reader(db)?;
    conn.query_row(
        "SELECT s.status FROM steps s JOIN instances i ON i.id = s.instance_id
         WHERE i.customer = ?1 AND s.step = ?2",
        [customer, step],
        |r| r.get(0),
    )
    .ok()
}

fn fee_event(id: &str, customer: &str) -> (String, Vec<u8>) {
    event(
        id,
        "recurring_payment.amount_changed",
        customer,
        json!({"payment_id": format!("P-{id}"), "merchant": "Netflix", "previous_amount": 15.99, "new_amount": 18.99}),
    )
}

fn contact(id: &str, customer: &str) -> (String, Vec<u8>) {
    event(
        id,
        "customer.contact_updated",
        customer,
        json!({"timezone": "Australia/Sydney", "email": "x@example.com", "app_installed": true}),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = nudge(args);
    assert_eq!(code, 0, "nudge {args:?}: {err}");
    out
}

#[test]
fn journeys_and_channels_change_at_run_time_with_the_admin_token_and_stay_changed() {
    // Before any thread of this test reads the environment.
    std::env::set_var(TOKEN_ENV, ADMIN_TOKEN);
    let rt = runtime();
    let recv = Receiver::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let reviewer_file = dir.path().join("reviewer.token");
    std::fs::write(&reviewer_file, format!("{REVIEWER_TOKEN}\n")).unwrap();
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    cfg.extra = format!(
        "[admin.auth]\nadmin_token_env = \"{TOKEN_ENV}\"\nreviewer_token_file = {:?}\n",
        reviewer_file.display().to_string()
    );
    create_topic(&rt, &cfg.topic, 1);
    let db = cfg.store.clone();
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    let admin = daemon.admin.clone();
    let path = "/admin/journeys/fee_increase";

    // As loaded: live, from the defaults.
    let (status, body) = http(&admin, "GET", path, Some(ADMIN_TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let before = json_of(&body);
    assert_eq!(before["shadow"], json!(false));
    assert_eq!(before["sources"]["shadow"], json!("default"));

    // Refused: no token, a wrong one (401, logged without the token), the reviewer's (403).
    let shadow = r#"{"shadow": true}"#;
    assert_eq!(http(&admin, "PUT", path, None, shadow).0, 401);
    assert_eq!(
        http(&admin, "PUT", path, Some("not-the-token"), shadow).0,
        401
    );
    assert_eq!(
        http(&admin, "PUT", path, Some(REVIEWER_TOKEN), shadow).0,
        403
    );
    // The reviewer may read the review page, not the control API.
    assert_eq!(http(&admin, "GET", path, Some(REVIEWER_TOKEN), "").0, 403);
    // Refused by validation: named field, range, unknown journey.
    let (status, body) = http(
        &admin,
        "PUT",
        path,
        Some(ADMIN_TOKEN),
        r#"{"shadow": true, "shaddow": 1}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("unknown field `shaddow`"), "{body}");
    let (status, body) = http(
        &admin,
        "PUT",
        path,
        Some(ADMIN_TOKEN),
        r#"{"pilot_percent": 101}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("pilot_percent"), "{body}");
    assert_eq!(
        http(
            &admin,
            "PUT",
            "/admin/journeys/no_such",
            Some(ADMIN_TOKEN),
            shadow
        )
        .0,
        404
    );
    // Nothing refused changed anything.
    let (_, body) = http(&admin, "GET", path, Some(ADMIN_TOKEN), "");
    assert_eq!(json_of(&body)["shadow"], json!(false));
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    let refused = log
        .lines()
        .find(|l| l.contains("admin request refused"))
        .unwrap_or_else(|| panic!("{log}"));
    // Where the attempt came from, for whoever investigates it.
    assert!(refused.contains("127.0.0.1"), "{refused}");
    assert!(!log.contains("not-the-token") && !log.contains(ADMIN_TOKEN));

    // With the token: in force when the answer comes.
    let (status, body) = http(&admin, "PUT", path, Some(ADMIN_TOKEN), shadow);
    assert_eq!(status, 200, "{body}");
    let changed = json_of(&body);
    assert_eq!(changed["who"], json!("admin"));
    assert_eq!(changed["before"], json!({"shadow": false}));
    assert_eq!(changed["after"], json!({"shadow": true}));
    assert_eq!(changed["settings"]["sources"]["shadow"], json!("override"));

    // The next event's step is logged shadow, and nothing reaches the endpoint.
    produce(
        &cfg.topic,
        &[contact("ctx-1", "c-1"), fee_event("fee-1", "c-1")],
    );
    daemon.wait_until(LONG, "c-1's alert to be logged", || {
        !outcomes(&db, "c-1", "fee_increase").is_empty()
    });
    let logged = outcomes(&db, "c-1", "fee_increase");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].0, "shadow", "{logged:?}");
    assert!(recv.on("/push").is_empty());

    // A stopped channel holds its steps in the store; resumed, they go.
    let out = ok(&[
        "control",
        "channel",
        "push",
        "--stop",
        "--config",
        &cfg_path(dir.path(), "a"),
        "--token-env",
        TOKEN_ENV,
    ]);
    assert!(out.contains("enabled: true → false"), "{out}");
    produce(
        &cfg.topic,
        &[event(
            "loan-2",
            "loan_application.completed",
            "c-1",
            json!({"application_id": "A-2", "product": "Personal loan", "amount": 25000, "signed": false, "resume_url": "https://bank.example/loans/A-2/sign"}),
        )],
    );
    daemon.wait_until(LONG, "c-1's loan push to be stored", || {
        step_status(&db, "c-1", "push").is_some()
    });
    // Stored, due now, and the scheduler was woken for it: still pending.
    assert_eq!(step_status(&db, "c-1", "push").as_deref(), Some("pending"));
    assert!(
        recv.on("/push").is_empty(),
        "sent while the channel was stopped"
    );
    let out = ok(&[
        "control",
        "channel",
        "push",
        "--resume",
        "--config",
        &cfg_path(dir.path(), "a"),
    ]);
    assert!(out.contains("enabled: false → true"), "{out}");
    // Received first, logged once the endpoint's answer is back.
    daemon.wait_until(LONG, "the held push to go and be logged", || {
        recv.on("/push").len() == 1 && !outcomes(&db, "c-1", "unsigned_loan").is_empty()
    });
    assert_eq!(
        outcomes(&db, "c-1", "unsigned_loan")
            .iter()
            .map(|(o, _)| o.as_str())
            .collect::<Vec<_>>(),
        vec!["sent"],
        "held, not dropped nor deferred"
    );

    // After a restart the override is still in force.
    daemon.terminate();
    let daemon = Daemon::start(&cfg, "b");
    daemon.wait_ready(LONG);
    let (status, body) = http(&daemon.admin, "GET", path, Some(ADMIN_TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let after = json_of(&body);
    assert_eq!(after["shadow"], json!(true));
    assert_eq!(after["sources"]["shadow"], json!("override"));
    assert_eq!(after["updated_by"], json!("admin"));
    produce(
        &cfg.topic,
        &[contact("ctx-2", "c-2"), fee_event("fee-2", "c-2")],
    );
    daemon.wait_until(LONG, "c-2's alert to be logged", || {
        !outcomes(&db, "c-2", "fee_increase").is_empty()
    });
    assert_eq!(outcomes(&db, "c-2", "fee_increase")[0].0, "shadow");

    // `nudge control journey` calls the same API: back to live.
    let b = cfg_path(dir.path(), "b");
    let out = ok(&[
        "control",
        "journey",
        "fee_increase",
        "--live",
        "--config",
        &b,
    ]);
    assert!(out.contains("shadow: true → false"), "{out}");
    // Errors an operator can act on.
    let (code, _, err) = nudge(&[
        "control",
        "journey",
        "fee_increase",
        "--live",
        "--config",
        &b,
        "--token-file",
        reviewer_file.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    let (code, _, err) = nudge(&["control", "journey", "no_such", "--disable", "--config", &b]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown journey `no_such`"), "{err}");
    let (code, _, err) = nudge(&[
        "control",
        "journey",
        "fee_increase",
        "--disable",
        "--config",
        &b,
        "--url",
        &format!("http://127.0.0.1:{}", free_port()),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no nudge daemon answers"), "{err}");
    // A name that would change the path the request goes to is refused
    // before anything is sent (the channel below stays as it is).
    let (code, _, err) = nudge(&[
        "control",
        "journey",
        "../channels/push",
        "--disable",
        "--config",
        &b,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a journey name"), "{err}");
    // A wrong base path is told apart from a daemon whose API is off.
    let admin_url = format!("http://{}/admin", daemon.admin);
    let (code, _, err) = nudge(&[
        "control",
        "journey",
        "fee_increase",
        "--disable",
        "--config",
        &b,
        "--url",
        &admin_url,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is --url the daemon's admin address") && !err.contains("API is off"),
        "{err}"
    );

    // The control log lists every change: who, what, before, after.
    let entries: Vec<Value> =
        serde_json::from_str(&ok(&["control", "log", "--config", &b, "--format", "json"])).unwrap();
    let view: Vec<(Value, Value, Value, Value)> = entries
        .iter()
        .map(|e| {
            (
                e["who"].clone(),
                e["target"].clone(),
                e["before"].clone(),
                e["after"].clone(),
            )
        })
        .collect();
    assert_eq!(
        view,
        vec![
            (
                json!("admin"),
                json!("fee_increase"),
                json!({"shadow": false}),
                json!({"shadow": true})
            ),
            (
                json!("admin"),
                json!("push"),
                json!({"enabled": true}),
                json!({"enabled": false})
            ),
            (
                json!("admin"),
                json!("push"),
                json!({"enabled": false}),
                json!({"enabled": true})
            ),
            (
                json!("admin"),
                json!("fee_increase"),
                json!({"shadow": true}),
                json!({"shadow": false})
            ),
        ]
    );
    let table = ok(&["control", "log", "--config", &b]);
    assert!(
        table.contains("journey fee_increase\tshadow: false → true"),
        "{table}"
    );
    // `--limit 0` is every change, as for `nudge log`.
    let all = ok(&["control", "log", "--config", &b, "--limit", "0"]);
    assert_eq!(all.lines().count(), 1 + entries.len(), "{all}");
    let (code, newest, note) = nudge(&["control", "log", "--config", &b, "--limit", "1"]);
    assert_eq!(code, 0, "{note}");
    assert_eq!(newest.lines().count(), 2, "{newest}");
    assert!(
        newest.contains("journey fee_increase\tshadow: true → false"),
        "the newest change: {newest}"
    );
    assert_eq!(
        note.trim(),
        "nudge control log: the newest 1 change shown; --limit N (0: all) for more"
    );
    let (_, _, uncut) = nudge(&["control", "log", "--config", &b, "--limit", "4"]);
    assert_eq!(uncut, "", "four changes, none cut");

    // An override, even one that changed nothing, outlives the config's own
    // switches until it is cleared; cleared, the settings come from the
    // script and the config again.
    let show = ok(&["control", "journey", "fee_increase", "--config", &b]);
    assert!(show.contains("shadow false (override)"), "{show}");
    let out = ok(&[
        "control",
        "journey",
        "fee_increase",
        "--clear",
        "--config",
        &b,
    ]);
    assert!(
        out.contains("overrides cleared; now enabled true ("),
        "{out}"
    );
    assert!(!out.contains("(override)"), "{out}");
    let show = ok(&["control", "channel", "push", "--config", &b]);
    assert!(
        show.contains("push: running, enabled true (override)"),
        "{show}"
    );
    ok(&["control", "channel", "push", "--clear", "--config", &b]);
    let show = ok(&["control", "channel", "push", "--config", &b]);
    assert!(show.contains("push: running, enabled true ("), "{show}");
    assert!(!show.contains("(override)"), "{show}");
    daemon.terminate();
    std::mem::forget(recv);
    std::mem::forget(rt);
}

fn cfg_path(dir: &Path, name: &str) -> String {
    dir.join(format!("{name}.toml")).display().to_string()
}
