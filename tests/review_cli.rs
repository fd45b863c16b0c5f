//! `nudge log`, `nudge explain`, `nudge funnel` and `nudge stats` as a reviewer runs them:
//! against the store a real daemon wrote (the example events through the
//! real broker to the recording endpoints), with the daemon's config file,
//! their output checked against the store's own tables.

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use harness::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

const ADMIN_TOKEN: &str = "review-cli-admin-token";

/// `nudge explain --unmask` with `NUDGE_ADMIN_TOKEN` set to `env` (unset when `None`).
fn explain_unmasked(args: &[&str], env: Option<&str>) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"));
    cmd.args(args)
        .current_dir(repo())
        .env_remove("NUDGE_ADMIN_TOKEN");
    if let Some(v) = env {
        cmd.env("NUDGE_ADMIN_TOKEN", v);
    }
    let out = cmd.output().expect("run nudge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A log row as (seq, customer, journey, step, outcome).
type Row = (i64, String, String, String, String);

/// A store written by a daemon from the examples; returns the daemon's
/// config file and the store's path (the daemon still running).
fn daemon_run(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Daemon) {
    let rt = runtime();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir, &recv);
    // The admin token `explain --unmask` asks for.
    let token = dir.join("admin-token");
    std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
    cfg.extra = format!(
        "[admin.auth]\nadmin_token_file = {:?}\n",
        token.display().to_string()
    );
    create_topic(&rt, &cfg.topic, 3);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    run_examples(&daemon, &cfg.topic, &recv, &cfg.store, LONG);
    // Keep the receiver's runtime alive with the daemon: leak it (the test process ends soon).
    std::mem::forget(recv);
    std::mem::forget(rt);
    (dir.join("a.toml"), cfg.store, daemon)
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = nudge(args);
    assert_eq!(code, 0, "nudge {args:?}: {err}");
    out
}

/// The store's log, newest first by (time, seq), as (seq, customer, journey, step, outcome).
fn stored_log(db: &Path) -> Vec<Row> {
    let conn = store_reader(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, customer, journey, step, outcome FROM dispatch_log ORDER BY time DESC, seq DESC")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn count(db: &Path, sql: &str, param: &str) -> u64 {
    let conn = store_reader(db).unwrap();
    conn.query_row(sql, [param], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

#[test]
fn log_explain_and_funnel_read_what_a_daemon_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (config, db, daemon) = daemon_run(dir.path());
    let config = config.to_str().unwrap();

    // Beside the running daemon: the CLI neither locks nor migrates its store.
    let live: Value =
        serde_json::from_str(&ok(&["log", "--config", config, "--format", "json"])).unwrap();
    assert!(!live.as_array().unwrap().is_empty());
    daemon.terminate();

    let stored = stored_log(&db);
    assert!(stored.len() >= 10, "{stored:?}");

    // --format json --limit 0: every record, newest first, as the store has them.
    let all: Vec<Value> = serde_json::from_str(&ok(&[
        "log", "--config", config, "--format", "json", "--limit", "0",
    ]))
    .unwrap();
    let got: Vec<Row> = all
        .iter()
        .map(|r| {
            let s = |f: &str| r[f].as_str().unwrap().to_string();
            (
                r["seq"].as_i64().unwrap(),
                s("customer"),
                s("journey"),
                s("step"),
                s("outcome"),
            )
        })
        .collect();
    assert_eq!(got, stored);

    // Filters: each equals the store's rows that pass it, in order.
    let expect = |f: &dyn Fn(&Row) -> bool| -> Vec<i64> {
        stored.iter().filter(|r| f(r)).map(|r| r.0).collect()
    };
    let seqs = |args: &[&str]| -> Vec<i64> {
        let mut full = vec![
            "log", "--config", config, "--format", "json", "--limit", "0",
        ];
        full.extend_from_slice(args);
        let v: Vec<Value> = serde_json::from_str(&ok(&full)).unwrap();
        v.iter().map(|r| r["seq"].as_i64().unwrap()).collect()
    };
    let loan = expect(&|r| r.2 == "unsigned_loan");
    assert!(!loan.is_empty());
    assert_eq!(seqs(&["--journey", "unsigned_loan"]), loan);
    assert_eq!(seqs(&["--outcome", "sent"]), expect(&|r| r.4 == "sent"));
    assert_eq!(
        seqs(&["--customer", "c-1002"]),
        expect(&|r| r.1 == "c-1002")
    );
    assert_eq!(
        seqs(&[
            "--journey",
            "unsigned_loan",
            "--step",
            "push",
            "--channel",
            "push"
        ]),
        expect(&|r| r.2 == "unsigned_loan" && r.3 == "push")
    );
    // Relative times: everything happened within the last hour, nothing before it.
    assert_eq!(seqs(&["--since", "1h"]), expect(&|_| true));
    assert!(seqs(&["--until", "1h"]).is_empty());
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    assert_eq!(seqs(&["--until", &tomorrow]), expect(&|_| true));

    // CSV: a header and one row per record of the filter.
    let csv = ok(&[
        "log",
        "--config",
        config,
        "--format",
        "csv",
        "--limit",
        "0",
        "--journey",
        "unsigned_loan",
    ]);
    let mut lines = csv.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("seq,time,customer,journey,instance,step,channel"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), loan.len());
    let first: Vec<&str> = rows[0].split(',').collect();
    assert_eq!(first[0], loan[0].to_string());
    assert_eq!(first[3], "unsigned_loan");

    // The table: the default limit and a note on stderr when it cut.
    let (code, table, err) = nudge(&["log", "--config", config, "--limit", "3"]);
    assert_eq!(code, 0, "{err}");
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in [
        "time", "customer", "journey", "step", "channel", "outcome", "reason",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert_eq!(lines.count(), 3);
    assert!(err.contains("newest 3 records"), "{err}");
    // A limit that cuts nothing says nothing.
    let every = stored.len().to_string();
    let (code, table, err) = nudge(&["log", "--config", config, "--limit", &every]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(table.lines().count(), stored.len() + 1);
    assert!(!err.contains("newest"), "{err}");

    // A journey nobody knows is an error naming the known ones, not an
    // empty answer that reads like "nothing yet".
    for command in ["log", "funnel", "stats"] {
        let (code, out, err) = nudge(&[command, "--config", config, "--journey", "unsigned_loans"]);
        assert_eq!(code, 2, "{command}: {out}");
        assert!(
            err.contains("--journey unsigned_loans: no such journey")
                && err.contains("unsigned_loan"),
            "{command}: {err}"
        );
    }

    // Bad input is an error naming the flag.
    let (code, _, err) = nudge(&["log", "--config", config, "--channel", "fax"]);
    assert_eq!(code, 2);
    assert!(err.contains("--channel") && err.contains("fax"), "{err}");
    let (code, _, err) = nudge(&["log", "--config", config, "--since", "last tuesday"]);
    assert_eq!(code, 2);
    assert!(err.contains("--since"), "{err}");

    // explain: Bob (c-1002), whose A-2 ran its course and A-3 was withdrawn.
    let record: Value = serde_json::from_str(&ok(&[
        "explain", "c-1002", "--config", config, "--format", "json",
    ]))
    .unwrap();
    let entries = record["entries"].as_array().unwrap();
    let kind = |k: &str| entries.iter().filter(|e| e["kind"] == k).count() as u64;
    let started = entries
        .iter()
        .filter(|e| e["kind"] == "decision" && e.get("not_started").is_none())
        .count() as u64;
    assert_eq!(
        started,
        count(
            &db,
            "SELECT COUNT(*) FROM instances WHERE customer = ?1",
            "c-1002"
        )
    );
    assert_eq!(
        kind("verdict") + kind("attempt") + kind("exit"),
        count(
            &db,
            "SELECT COUNT(*) FROM dispatch_log WHERE customer = ?1",
            "c-1002"
        )
    );
    assert_eq!(
        kind("attempt"),
        count(
            &db,
            "SELECT COUNT(*) FROM dispatch_log WHERE customer = ?1 AND outcome = 'sent'",
            "c-1002"
        )
    );
    let times: Vec<&str> = entries
        .iter()
        .map(|e| e["time"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|p| p[0] <= p[1]),
        "time order: {times:?}"
    );
    for e in entries
        .iter()
        .filter(|e| e["kind"] == "decision" && e.get("not_started").is_none())
    {
        let hash = count(
            &db,
            "SELECT COUNT(*) FROM instances WHERE rule_hash = ?1",
            e["rule_hash"].as_str().unwrap(),
        );
        assert!(hash > 0, "{e}");
        assert_eq!(e["inputs"]["customer"]["has_email"], true, "{e}");
    }
    assert_eq!(record["contact"]["email"], "b***@example.com");
    assert_eq!(record["contact"]["phone"], "+*********02");
    let text = ok(&["explain", "c-1002", "--config", config]);
    assert!(
        text.starts_with("decision record of customer c-1002"),
        "{text}"
    );
    // Two instances of one journey: each line names its key.
    for line in [
        "unsigned_loan/push (key A-2) via push: sent",
        "unsigned_loan/push (key A-3) via push: sent",
        "unsigned_loan/email (key A-3) via email: not sent, journey cancelled",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    assert!(
        !text.contains("bob@example.com") && !text.contains("+61400000002"),
        "{text}"
    );
    assert!(text.contains("sent, template loan_unsigned_push"), "{text}");
    assert!(text.contains("not recorded"), "{text}");

    // --unmask: only with the configured admin token, from a file or
    // NUDGE_ADMIN_TOKEN; refused (nothing printed) otherwise.
    let unmask = [
        "explain", "c-1002", "--config", config, "--format", "json", "--unmask",
    ];
    for (env, why) in [
        (None, "--token-file"),
        (Some("wrong"), "not the admin token"),
    ] {
        let (code, out, err) = explain_unmasked(&unmask, env);
        assert_eq!(code, 2, "{out}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains(why), "{err}");
        assert!(!err.contains(ADMIN_TOKEN), "{err}");
    }
    let wrong_file = dir.path().join("wrong-token");
    std::fs::write(&wrong_file, "nope").unwrap();
    let wrong = wrong_file.to_str().unwrap();
    let mut with_file = unmask.to_vec();
    with_file.extend(["--token-file", wrong]);
    let (code, _, err) = explain_unmasked(&with_file, Some(ADMIN_TOKEN));
    assert_ne!(code, 0, "the file is what is presented: {err}");
    let (code, out, err) = explain_unmasked(&unmask, Some(ADMIN_TOKEN));
    assert_eq!(code, 0, "{err}");
    let unmasked: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(unmasked["contact"]["email"], "bob@example.com");
    assert_eq!(unmasked["contact"]["phone"], "+61400000002");
    let right_file = dir.path().join("admin-token");
    let mut with_file = unmask.to_vec();
    with_file.extend(["--token-file", right_file.to_str().unwrap()]);
    let (code, out, err) = explain_unmasked(&with_file, None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bob@example.com"));

    // funnel: per journey, the store's counts.
    let report: Value =
        serde_json::from_str(&ok(&["funnel", "--config", config, "--format", "json"])).unwrap();
    let journeys = report["journeys"].as_array().unwrap();
    let names: Vec<&str> = journeys
        .iter()
        .map(|j| j["journey"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["energy_rebate", "fee_increase", "unsigned_loan"]
    );
    for j in journeys {
        let name = j["journey"].as_str().unwrap();
        assert_eq!(
            j["started"].as_u64().unwrap(),
            count(
                &db,
                "SELECT COUNT(*) FROM instances WHERE journey = ?1 AND mode = 'live'",
                name
            )
        );
        assert_eq!(
            j["converted"].as_u64().unwrap(),
            count(&db, "SELECT COUNT(*) FROM instances WHERE journey = ?1 AND mode = 'live' AND status = 'converted'", name)
        );
        assert_eq!(
            j["uplift"]["treated"]["customers"].as_u64().unwrap(),
            count(&db, "SELECT COUNT(DISTINCT customer) FROM instances WHERE journey = ?1 AND mode = 'live'", name)
        );
        let mut sent: BTreeMap<String, u64> = BTreeMap::new();
        for s in j["steps"].as_array().unwrap() {
            sent.insert(
                s["step"].as_str().unwrap().into(),
                s["sent"].as_u64().unwrap(),
            );
        }
        let conn = store_reader(&db).unwrap();
        let mut stmt = conn
            .prepare("SELECT step, COUNT(*) FROM dispatch_log WHERE journey = ?1 AND outcome = 'sent' GROUP BY step")
            .unwrap();
        let stored: BTreeMap<String, u64> = stmt
            .query_map([name], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (step, n) in &stored {
            assert_eq!(sent.get(step), Some(n), "{name}/{step}");
        }
    }
    let loan = journeys
        .iter()
        .find(|j| j["journey"] == "unsigned_loan")
        .unwrap();
    let steps: Vec<&str> = loan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, vec!["push", "email", "call"], "plan order");
    // A-1 signed and A-3 withdrawn before their email: not sent, and why.
    let email_not_sent = &loan["steps"][1]["not_sent"];
    assert!(
        email_not_sent
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["outcome"] == "converted"),
        "{email_not_sent}"
    );
    let table = ok(&["funnel", "--config", config, "--journey", "unsigned_loan"]);
    assert!(table.contains("unsigned_loan\n"), "{table}");
    assert!(table.contains("push sent"), "{table}");
    assert!(table.contains("uplift: treated"), "{table}");
    assert!(!table.contains("fee_increase"), "{table}");

    // stats: per journey, step and channel, the sends the daemon logged and
    // the conversions of the instances that converted after them.
    let conn = store_reader(&db).unwrap();
    let mut expected: BTreeMap<(String, String, String), (u64, u64)> = BTreeMap::new();
    let mut stmt = conn
        .prepare(
            "SELECT d.journey, d.step, d.channel, count(*),
                    count(CASE WHEN i.status = 'converted' THEN 1 END)
             FROM dispatch_log d JOIN instances i ON i.id = d.instance
             WHERE d.outcome = 'sent' GROUP BY d.journey, d.step, d.channel",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                (r.get(0)?, r.get(1)?, r.get(2)?),
                (r.get::<_, i64>(3)? as u64, r.get::<_, i64>(4)? as u64),
            ))
        })
        .unwrap();
    for row in rows {
        let (key, counts) = row.unwrap();
        expected.insert(key, counts);
    }
    assert!(
        expected.values().any(|(_, converted)| *converted > 0),
        "the examples convert after a push: {expected:?}"
    );
    let stats: Value =
        serde_json::from_str(&ok(&["stats", "--config", config, "--format", "json"])).unwrap();
    assert_eq!(stats["prior"], json!({"a": 1.0, "b": 19.0}));
    let got: BTreeMap<(String, String, String), (u64, u64)> = stats["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap().to_string();
            (
                (text("journey"), text("step"), text("channel")),
                (
                    r["sends"].as_u64().unwrap(),
                    r["conversions"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, expected);
    for r in stats["rows"].as_array().unwrap() {
        let (sends, conversions) = (
            r["sends"].as_f64().unwrap(),
            r["conversions"].as_f64().unwrap(),
        );
        assert_eq!(r["rate"].as_f64().unwrap(), conversions / sends, "{r}");
        let smoothed = (conversions + 1.0) / (sends + 20.0);
        assert!(
            (r["smoothed_rate"].as_f64().unwrap() - smoothed).abs() < 1e-12,
            "{r}"
        );
    }
    let table = ok(&["stats", "--config", config, "--journey", "unsigned_loan"]);
    assert!(table.contains("journey"), "{table}");
    assert!(table.contains("smoothed"), "{table}");
    let (_, (sends, conversions)) = expected
        .iter()
        .find(|((j, s, _), _)| j == "unsigned_loan" && s == "push")
        .expect("unsigned_loan's push was sent");
    let line = table
        .lines()
        .find(|l| l.starts_with("unsigned_loan") && l.split_whitespace().nth(1) == Some("push"))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cells[3], sends.to_string(), "{table}");
    assert_eq!(cells[4], conversions.to_string(), "{table}");
    assert!(!table.contains("fee_increase"), "{table}");

    // A reader that goes away (`| head`) ends each command quietly: no
    // panic, no error, exit 0.
    let customer = stored[0].1.clone();
    for args in [
        vec!["explain", customer.as_str(), "--config", config],
        vec![
            "explain",
            customer.as_str(),
            "--config",
            config,
            "--format",
            "json",
        ],
        vec!["funnel", "--config", config],
        vec!["stats", "--config", config],
        vec!["log", "--config", config],
        vec!["control", "log", "--config", config, "--format", "json"],
    ] {
        let (code, err) = with_stdout_closed(&args);
        assert_eq!((code, err.as_str()), (0, ""), "nudge {args:?}");
    }
}

/// Runs nudge with its stdout a pipe whose reading end is already closed.
fn with_stdout_closed(args: &[&str]) -> (i32, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Received events of `customer` the daemon stored.
fn received(db: &Path, customer: &str) -> u64 {
    store_reader(db)
        .and_then(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM received_events WHERE customer = ?1",
                [customer],
                |r| r.get::<_, i64>(0),
            )
            .ok()
        })
        .unwrap_or(0) as u64
}

/// The decision record keeps what was decided not to do and why, what the
/// channel answered, and what an operator changed, in time order: a
/// context-only event, a script's skip, a start and its push (HTTP status
/// and response time from a real endpoint on 127.0.0.1), an event for the
/// instance already open, a control change (the journey's pilot cut to 0 %
/// through the admin API) and the pilot exclusion it causes.
#[test]
fn explain_shows_skips_refusals_pilot_exclusions_answers_and_control_changes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    let token = dir.path().join("admin-token");
    std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
    cfg.extra = format!(
        "[admin.auth]\nadmin_token_file = {:?}\n",
        token.display().to_string()
    );
    create_topic(&rt, &cfg.topic, 1);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    let db = cfg.store.clone();
    let config = dir.path().join("a.toml");
    let config = config.to_str().unwrap();
    let who = "c-record";
    let loan = |id: &str, application: &str, signed: bool| {
        event(
            id,
            "loan_application.completed",
            who,
            json!({"application_id": application, "product": "Car loan", "amount": 5000,
                   "signed": signed, "resume_url": "https://bank.example/sign"}),
        )
    };
    // One event at a time, each stored before the next is made, so their
    // times are in this order.
    let mut sent = 0;
    let mut one = |record: (String, Vec<u8>), what: &str| {
        produce(&cfg.topic, &[record]);
        sent += 1;
        daemon.wait_until(LONG, what, || received(&db, who) >= sent);
    };
    one(
        event(
            "rec-contact",
            "customer.contact_updated",
            who,
            json!({"timezone": "Australia/Sydney", "app_installed": true, "email": "rec@example.com"}),
        ),
        "the contact update",
    );
    one(loan("rec-skip", "A-8", true), "the skipped application");
    one(loan("rec-start", "A-9", false), "the started application");
    daemon.wait_until(LONG, "the push", || {
        recv.on("/push").iter().any(|r| r.body["customer"] == who)
    });
    daemon.wait_until(LONG, "the push to be logged", || {
        count(
            &db,
            "SELECT COUNT(*) FROM dispatch_log WHERE customer = ?1 AND outcome = 'sent'",
            who,
        ) == 1
    });
    one(loan("rec-again", "A-9", false), "the repeated application");
    ok(&[
        "control",
        "journey",
        "unsigned_loan",
        "--pilot-percent",
        "0",
        "--config",
        config,
        "--token-file",
        token.to_str().unwrap(),
    ]);
    one(
        loan("rec-pilot", "A-10", false),
        "the application outside the pilot",
    );
    daemon.terminate();

    let record: Value = serde_json::from_str(&ok(&[
        "explain", who, "--config", config, "--format", "json",
    ]))
    .unwrap();
    let entries = record["entries"].as_array().unwrap();
    let position = |what: &str, f: &dyn Fn(&Value) -> bool| -> usize {
        entries
            .iter()
            .position(f)
            .unwrap_or_else(|| panic!("no {what} in {entries:#?}"))
    };
    let not_started = |why: &'static str, event: &'static str| {
        move |e: &Value| {
            e["kind"] == "decision" && e["not_started"] == why && e["event_id"] == event
        }
    };
    let context = position("context-only event", &|e| {
        e["kind"] == "event"
            && e["event_id"] == "rec-contact"
            && e["event_type"] == "customer.contact_updated"
            && e["context_updated"] == true
    });
    let skip = position("skip", &not_started("skip", "rec-skip"));
    assert_eq!(entries[skip]["reason"], "already signed");
    assert_eq!(entries[skip]["journey"], "unsigned_loan");
    let hash = entries[skip]["rule_hash"].as_str().unwrap();
    assert!(!hash.is_empty(), "the script's hash");
    let start = position("start", &|e| {
        e["kind"] == "decision" && e["event_id"] == "rec-start" && e.get("not_started").is_none()
    });
    assert_eq!(entries[start]["rule_hash"], hash);
    let attempt = position("attempt", &|e| e["kind"] == "attempt");
    assert_eq!(entries[attempt]["http_status"], 200, "{}", entries[attempt]);
    assert!(
        entries[attempt]["response_ms"].is_u64(),
        "{}",
        entries[attempt]
    );
    assert!(
        entries[attempt]["text"]
            .as_str()
            .unwrap()
            .contains("HTTP 200 in"),
        "{}",
        entries[attempt]
    );
    let again = position("already open", &not_started("already_open", "rec-again"));
    assert!(
        entries[again]["reason"]
            .as_str()
            .unwrap()
            .contains("is open for key A-9"),
        "{}",
        entries[again]
    );
    let control = position("control change", &|e| {
        e["kind"] == "control" && e["journey"] == "unsigned_loan"
    });
    assert_eq!(entries[control]["control"]["after"]["pilot_percent"], 0);
    let pilot = position("pilot exclusion", &not_started("pilot", "rec-pilot"));
    assert_eq!(entries[pilot]["rule_hash"], hash);
    assert!(
        entries[pilot]["reason"]
            .as_str()
            .unwrap()
            .contains("outside the pilot"),
        "{}",
        entries[pilot]
    );
    let order = [context, skip, start, attempt, again, control, pilot];
    assert!(
        order.windows(2).all(|p| p[0] < p[1]),
        "{order:?}: {entries:#?}"
    );
    // Every event received is there, once.
    let events: Vec<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "event")
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "rec-contact",
            "rec-skip",
            "rec-start",
            "rec-again",
            "rec-pilot"
        ]
    );
    let times: Vec<&str> = entries
        .iter()
        .map(|e| e["time"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|p| p[0] <= p[1]), "{times:?}");
    // The terminal text says the same.
    let text = ok(&["explain", who, "--config", config]);
    for want in [
        "already signed",
        "outside the pilot",
        "is open for key A-9",
        "HTTP 200 in",
        "journey unsigned_loan changed by",
        "updated the context",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    std::mem::forget(recv);
    std::mem::forget(rt);
}
