//! The real binary: `nudge simulate` and `nudge check` as a journey designer runs them.

mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use harness::{nudge, repo};
use serde_json::Value;

fn simulate(events: &Path, format: &str) -> (i32, String, String) {
    let rules = repo().join("rules");
    nudge(&[
        "simulate",
        "--rules",
        rules.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--format",
        format,
    ])
}

/// Journey name → script hash, as `nudge check` reports them.
fn shipped_hashes() -> BTreeMap<String, String> {
    let (code, out, err) = nudge(&["check", repo().join("rules").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    out.lines()
        .skip(1)
        .filter(|l| !l.starts_with("    ")) // a journey's description
        .map(|l| {
            let name = l.split_whitespace().next().unwrap().to_string();
            let hash = l.split_whitespace().last().unwrap().to_string();
            (name, hash)
        })
        .collect()
}

const FIELDS: [&str; 10] = [
    "time",
    "customer",
    "journey",
    "instance",
    "step",
    "channel",
    "template",
    "outcome",
    "reason",
    "rule_hash",
];

#[test]
fn simulate_prints_one_json_record_per_decision() {
    let events = repo().join("examples/events.jsonl");
    let (code, out, err) = simulate(&events, "jsonl");
    assert_eq!(code, 0, "{err}");
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let reported: usize = err
        .split(" log records")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("summary on stderr: {err}"));
    assert_eq!(records.len(), reported);
    assert!(!records.is_empty());
    let hashes = shipped_hashes();
    for r in &records {
        for f in FIELDS {
            assert!(r[f].is_string(), "{f} missing in {r}");
        }
        chrono::DateTime::parse_from_rfc3339(r["time"].as_str().unwrap()).unwrap();
        // The recorder answers without HTTP: no status, nothing timed (a
        // wall-clock time would also make two runs differ).
        for f in ["http_status", "response_ms"] {
            assert!(r.get(f).is_none(), "{f} in {r}");
        }
        assert!(r["outcome"]
            .as_str()
            .unwrap()
            .parse::<nudge::model::Outcome>()
            .is_ok());
        assert_eq!(
            r["rule_hash"].as_str(),
            hashes
                .get(r["journey"].as_str().unwrap())
                .map(String::as_str),
            "{r}"
        );
    }
    let journeys: std::collections::BTreeSet<_> = records
        .iter()
        .map(|r| r["journey"].as_str().unwrap())
        .collect();
    assert_eq!(
        journeys,
        hashes.keys().map(String::as_str).collect(),
        "every shipped journey acts on the examples"
    );
}

#[test]
fn simulate_skips_a_malformed_line_with_its_position_and_prints_the_rest() {
    let events = repo().join("examples/events.jsonl");
    let (_, clean, _) = simulate(&events, "jsonl");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("events.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.insert(2, "{\"id\": \"broken\", this is not json".into());
    std::fs::write(&copy, lines.join("\n")).unwrap();

    let (code, out, err) = simulate(&copy, "jsonl");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{}:3: skipped:", copy.display())),
        "{err}"
    );
    assert_eq!(
        err.matches("skipped:").count(),
        1,
        "only the bad line: {err}"
    );
    assert!(!out.is_empty());
    assert_eq!(out, clean, "the other lines simulate exactly as before");
}

/// An event dated before the line above it is named on stderr (the
/// virtual clock does not go back); the shipped examples, in time order,
/// draw no such warning.
#[test]
fn simulate_warns_of_an_event_dated_before_the_line_above() {
    let events = repo().join("examples/events.jsonl");
    let (_, _, clean) = simulate(&events, "jsonl");
    assert!(!clean.contains("the clock does not go back"), "{clean}");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("events.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let last = lines.pop().unwrap();
    lines.insert(0, last);
    std::fs::write(&copy, lines.join("\n")).unwrap();
    let (code, _, err) = simulate(&copy, "jsonl");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{}:2: event ", copy.display()))
            && err.contains("before line 1")
            && err.contains("sort the file by time"),
        "{err}"
    );
}

#[test]
fn simulate_table_has_a_header_and_one_row_per_record() {
    let events = repo().join("examples/events.jsonl");
    let (_, json, _) = simulate(&events, "jsonl");
    let (code, table, err) = simulate(&events, "table");
    assert_eq!(code, 0, "{err}");
    let mut lines = table.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    for col in [
        "time", "customer", "journey", "step", "channel", "outcome", "reason",
    ] {
        assert!(header.contains(&col), "{header:?}");
    }
    let rows: Vec<_> = lines.collect();
    let records: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), records.len(), "{table}");
    for (row, r) in rows.iter().zip(&records) {
        let cells: Vec<_> = row.split_whitespace().collect();
        for f in ["customer", "journey", "step", "outcome"] {
            assert!(cells.contains(&r[f].as_str().unwrap()), "{f}: {row} vs {r}");
        }
    }
}

/// A loan completed two hours before the customer's contact update that
/// precedes it in the file (a late event), and a config whose push lateness
/// bound is one hour; email keeps the default (12h).
fn late_loan(dir: &Path) -> (PathBuf, PathBuf) {
    let events = dir.join("late.jsonl");
    let contact = serde_json::json!({
        "specversion": "1.0", "id": "ctx-1", "type": "customer.contact_updated",
        "source": "tests", "subject": "c-1", "time": "2026-03-02T00:00:00Z",
        "data": {"timezone": "Australia/Sydney", "app_installed": true, "email": "c1@example.com"},
    });
    let loan = serde_json::json!({
        "specversion": "1.0", "id": "loan-1", "type": "loan_application.completed",
        "source": "tests", "subject": "c-1", "time": "2026-03-01T22:00:00Z",
        "data": {"application_id": "A-1", "signed": false, "product": "Car loan",
                 "amount": 9000, "resume_url": "https://example.com/A-1"},
    });
    std::fs::write(&events, format!("{contact}\n{loan}\n")).unwrap();
    let config = dir.join("nudge.toml");
    std::fs::write(
        &config,
        "[channels.push]\nurl = \"http://127.0.0.1:9/push\"\nlateness = \"1h\"\n",
    )
    .unwrap();
    (events, config)
}

#[test]
fn simulate_takes_each_channels_lateness_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let (events, config) = late_loan(dir.path());
    let rules = repo().join("rules");
    let run = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec![
            "simulate",
            "--rules",
            rules.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = nudge(&args);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let step = |records: &[Value], step: &str| -> (String, String) {
        let r = records
            .iter()
            .find(|r| r["journey"] == "unsigned_loan" && r["step"] == step)
            .unwrap_or_else(|| panic!("no {step} in {records:?}"));
        (
            r["outcome"].as_str().unwrap().into(),
            r["reason"].as_str().unwrap().into(),
        )
    };

    // Two hours late is within the default 12h bound.
    let defaults = run(&[]);
    assert_eq!(step(&defaults, "push").0, "sent");
    // Past the config's 1h bound for push; email keeps its own bound.
    let configured = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(
        step(&configured, "push"),
        (
            "expired".to_string(),
            "due 2h ago, past the push lateness bound of 1h".to_string()
        )
    );
    assert_eq!(step(&configured, "email").0, "sent");
}

#[test]
fn replay_takes_each_channels_lateness_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let (events, config) = late_loan(dir.path());
    let rules = repo().join("rules");
    let sent = |extra: &[&str], channel: &str| -> u64 {
        let mut args = vec![
            "replay",
            "--rules",
            rules.to_str().unwrap(),
            "--baseline",
            rules.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = nudge(&args);
        assert_eq!(code, 0, "{err}");
        let report: Value = serde_json::from_str(&out).unwrap();
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["journey"] == "unsigned_loan" && r["channel"] == channel)
            .map_or(0, |r| r["baseline_sent"].as_u64().unwrap())
    };
    assert_eq!(sent(&[], "push"), 1);
    let with_config = ["--config", config.to_str().unwrap()];
    assert_eq!(sent(&with_config, "push"), 0, "expired, not sent");
    assert_eq!(sent(&with_config, "email"), 1);
}

/// (file, script, the text the error must point at)
const BROKEN: [(&str, &str, &str); 9] = [
    (
        "syntax.rhai",
        r#"// a syntax error in decide
fn journey() {
    #{ name: "syntax", category: "service", triggers: ["a.b"],
       steps: [#{ id: "p", channel: "push", template: "t", delay: "0s" }] }
}
fn decide(event, customer) {
    let = 3;
    start()
}
"#,
        "= 3",
    ),
    (
        "unknown_variable.rhai",
        r#"fn journey() {
    #{ name: "unknown_variable", category: "service", triggers: ["a.b"],
       steps: [#{ id: "p", channel: "push", template: "t", delay: "0s" }] }
}
fn decide(event, customer) {
    let d = event.data;
    if days_left > 30 { return skip("later"); }
    start()
}
"#,
        "days_left",
    ),
    (
        "fax.rhai",
        r#"fn journey() {
    #{ name: "bad_channel", category: "service", triggers: ["a.b"],
       steps: [
           #{ id: "p", channel: "push", template: "t", delay: "0s" },
           #{ id: "f", channel: "fax", template: "t", delay: "1d" },
       ] }
}
fn decide(event, customer) { start() }
"#,
        "\"fax\"",
    ),
    (
        "tomorrow.rhai",
        r#"fn journey() {
    #{ name: "bad_delay", category: "service", triggers: ["a.b"],
       steps: [
           #{ id: "p", channel: "push", template: "t",
              delay: "tomorrow" },
       ] }
}
fn decide(event, customer) { start() }
"#,
        "\"tomorrow\"",
    ),
    (
        "no_triggers.rhai",
        r#"// starts on nothing

fn journey() {
    #{ name: "no_triggers", category: "service", triggers: [],
       steps: [#{ id: "p", channel: "push", template: "t", delay: "0s" }] }
}
fn decide(event, customer) { start() }
"#,
        "fn journey",
    ),
    (
        // `exit` for `exits`: reported where it is set, not in the trigger name
        "unknown_key.rhai",
        r#"fn journey() {
    #{ name: "unknown_key", category: "service", triggers: ["loan.exit"],
       steps: [#{ id: "p", channel: "push", template: "t", delay: "0s" }],
       exit: #{ "loan.signed": "converted" } }
}
fn decide(event, customer) { start() }
"#,
        "exit:",
    ),
    (
        "unknown_step_key.rhai",
        r#"fn journey() {
    #{ name: "unknown_step_key", category: "service", triggers: ["a.b"],
       steps: [#{ id: "p", channel: "push", template: "t",
                  "delays": "0s" }] }
}
fn decide(event, customer) { start() }
"#,
        "\"delays\"",
    ),
    (
        "empty_exit.rhai",
        r#"fn journey() {
    #{ name: "empty_exit", category: "service", triggers: ["a.b"],
       steps: [#{ id: "p", channel: "push", template: "t", delay: "0s" }],
       exits: #{ "": "converted" } }
}
fn decide(event, customer) { start() }
"#,
        "exits:",
    ),
    (
        "exit_is_trigger.rhai",
        r#"fn journey() {
    #{ name: "exit_is_trigger", category: "service", triggers: ["card.expiring"],
       steps: [#{ id: "p", channel: "push", template: "t", delay: "0s" }],
       exits: #{ "card.expiring": "converted" } }
}
fn decide(event, customer) { start() }
"#,
        "\"card.expiring\": ",
    ),
];

/// 1-based line and column of the first occurrence of `needle`.
fn position(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(i, l)| l.find(needle).map(|c| (i + 1, c + 1)))
        .unwrap_or_else(|| panic!("{needle} not in script"))
}

#[test]
fn check_reports_file_line_and_column_of_every_broken_script() {
    let dir = tempfile::tempdir().unwrap();
    for (file, text, _) in BROKEN {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    // Two good files with one name: the second names the first.
    let dup = r#"fn journey() {
    #{ name: "dup", category: "service", triggers: ["a.b"],
       steps: [#{ id: "p", channel: "push", template: "t", delay: "0s" }] }
}
fn decide(event, customer) { start() }
"#;
    std::fs::write(dir.path().join("dup_a.rhai"), dup).unwrap();
    std::fs::write(dir.path().join("dup_b.rhai"), dup).unwrap();
    let (code, out, err) = nudge(&["check", dir.path().to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    for (file, text, needle) in BROKEN {
        let (line, col) = position(text, needle);
        let at = format!("{}:{line}:{col}: error:", dir.path().join(file).display());
        assert!(err.contains(&at), "expected {at} in:\n{err}");
    }
    assert!(err.contains("10 problems; nothing loaded"), "{err}");
    assert!(err.contains("unknown journey field `exit`"), "{err}");
    assert!(err.contains("unknown step field `delays`"), "{err}");
    assert!(err.contains("an exit needs an event type"), "{err}");
    assert!(err.contains("is both a trigger and an exit"), "{err}");
    let (line, col) = position(dup, "\"dup\"");
    assert!(
        err.contains(&format!(
            "{}:{line}:{col}: error: journey name `dup` is already used by {}",
            dir.path().join("dup_b.rhai").display(),
            dir.path().join("dup_a.rhai").display()
        )),
        "{err}"
    );
    // The shipped rules are fine.
    let (code, out, err) = nudge(&["check", repo().join("rules").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok: "), "{out}");
    // Each journey's description is shown under it.
    assert!(
        out.contains("\n  unsigned_loan (service, 3 steps, triggers: loan_application.completed) ")
            && out
                .contains("\n    Loan application completed but not signed: push, email next day"),
        "{out}"
    );
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("talk.rhai"),
        r#"fn journey() { #{ name: "talk", category: "service", triggers: ["card.transaction"],
             steps: [#{ id: "push", channel: "push", template: "t", delay: "0s" }] } }
           fn decide(event, customer) { print("deciding " + event.id); skip("quiet") }"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["simulate", "--rules"])
        .arg(dir.path())
        .args(["--events", "examples/events.jsonl"])
        .env("RUST_LOG", "nudge::script=debug")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("deciding card-1001"),
        "the script's print was logged: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI escapes in piped logs: {stderr:?}"
    );
}

/// README.md's contact-policy example, run exactly as the README says: the
/// output printed there is the binary's, and it shows each decision of the
/// policy with its reason (issue 13's proof), so neither can go stale.
#[test]
fn the_readme_policy_example_prints_what_the_readme_shows() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme
        .find("\nnudge simulate --rules rules --rules examples/journeys --events examples/policy.jsonl")
        .expect("README.md runs examples/policy.jsonl");
    let rest = &readme[at + 1..];
    let command = rest.lines().next().unwrap();
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let shown = rest
        .split_once("```text\n")
        .and_then(|(_, after)| after.split_once("```"))
        .map(|(block, _)| block)
        .expect("the output follows the command in a ```text block");

    let (code, out, err) = nudge(&args);
    assert_eq!(code, 0, "{err}");
    let trimmed =
        |s: &str| -> Vec<String> { s.lines().map(|l| l.trim_end().to_string()).collect() };
    assert_eq!(
        trimmed(shown),
        trimmed(&out),
        "README.md's output of `{command}` is stale; it prints:\n{out}"
    );

    // Each rule of the policy at work, with its reason.
    let rows: Vec<&str> = out.lines().skip(1).collect();
    let row = |outcome: &str, reason: &str| {
        rows.iter()
            .find(|r| r.split_whitespace().nth(5) == Some(outcome) && r.contains(reason))
            .unwrap_or_else(|| panic!("no {outcome} row with {reason:?} in\n{out}"))
    };
    let arbitration = row(
        "deferred",
        "arbitration: lost to unsigned_loan/email (score 80 vs 50)",
    );
    assert!(arbitration.contains("fee_increase"), "{arbitration}");
    row("deferred", "quiet hours 21:00-08:00 in Australia/Sydney");
    row(
        "suppressed",
        "frequency cap: 1 marketing within 7 calendar days",
    );
    row("held_out", "control group");
    let fallback = row("sent", "fallback from push: no app installed");
    assert!(
        fallback.split_whitespace().nth(4) == Some("email"),
        "{fallback}"
    );
    let withdrawn = row("withdrawn", "withdrawn on call_task: journey converted");
    assert!(withdrawn.contains("call:withdraw"), "{withdrawn}");
}

/// `--config` brings each channel's send-rate limit: two fee alerts due at
/// once on a push channel of one a minute, the second waits its slot.
#[test]
fn simulate_takes_each_channels_rate_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("rate.jsonl");
    let mut lines = Vec::new();
    for c in ["c-1", "c-2"] {
        lines.push(serde_json::json!({
            "specversion": "1.0", "id": format!("ctx-{c}"), "type": "customer.contact_updated",
            "source": "tests", "subject": c, "time": "2026-03-02T00:00:00Z",
            "data": {"timezone": "Australia/Sydney", "app_installed": true},
        }));
    }
    for c in ["c-1", "c-2"] {
        lines.push(serde_json::json!({
            "specversion": "1.0", "id": format!("fee-{c}"), "type": "recurring_payment.amount_changed",
            "source": "tests", "subject": c, "time": "2026-03-02T01:00:00Z",
            "data": {"payment_id": format!("p-{c}"), "merchant": "StreamCo", "previous_amount": 10, "new_amount": 12},
        }));
    }
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&events, text.join("\n")).unwrap();
    let config = dir.path().join("nudge.toml");
    std::fs::write(
        &config,
        "[channels.push]\nurl = \"http://127.0.0.1:9/push\"\nrate = \"1/m\"\n",
    )
    .unwrap();
    let rules = repo().join("rules");
    let (code, out, err) = nudge(&[
        "simulate",
        "--rules",
        rules.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcomes: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["customer"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [("c-1", "sent"), ("c-2", "deferred"), ("c-2", "sent")],
        "{out}"
    );
    assert!(
        records[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("rate limit: channels.push.rate is 1/m"),
        "{out}"
    );
    assert_eq!(records[2]["time"], "2026-03-02T01:01:00.000Z", "{out}");
}

/// A step on the customer's `preferred` channel, planned on push, goes by
/// email when the customer asked for email after the journey started: the
/// preference is read when the step is due, and the record says why.
#[test]
fn simulate_follows_a_preference_changed_before_the_step_is_due() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("reminder.rhai"),
        r#"fn journey() {
    #{ name: "reminder", category: "service", triggers: ["statement.ready"],
       steps: [
           #{ id: "now", channel: "preferred", template: "statement_now", delay: "0s" },
           #{ id: "later", channel: "preferred", template: "statement_later", delay: "1d" },
       ] }
}
fn decide(event, customer) { start(#{}) }
"#,
    )
    .unwrap();
    let event = |id: &str, kind: &str, time: &str, data: Value| {
        serde_json::json!({
            "specversion": "1.0", "id": id, "type": kind, "source": "tests",
            "subject": "c-1", "time": time, "data": data,
        })
        .to_string()
    };
    let lines = [
        event(
            "ctx-1",
            "customer.contact_updated",
            "2026-03-02T00:00:00Z",
            serde_json::json!({"timezone": "Australia/Sydney", "app_installed": true,
                "email": "c1@example.com", "preferred_channel": "push"}),
        ),
        event(
            "st-1",
            "statement.ready",
            "2026-03-02T01:00:00Z",
            serde_json::json!({}),
        ),
        event(
            "ctx-2",
            "customer.contact_updated",
            "2026-03-02T03:00:00Z",
            serde_json::json!({"preferred_channel": "email"}),
        ),
    ];
    let events = dir.path().join("events.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let (code, out, err) = nudge(&[
        "simulate",
        "--rules",
        rules.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let sent: Vec<(String, String, String)> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["outcome"] == "sent")
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap().to_string();
            (text("step"), text("channel"), text("reason"))
        })
        .collect();
    assert_eq!(
        sent,
        [
            ("now".into(), "push".into(), "step now of reminder".into()),
            (
                "later".into(),
                "email".into(),
                "preferred channel: the customer prefers email since the step was planned on push"
                    .into()
            ),
        ],
        "{out}"
    );
}

/// Events of one moment are decided together, as the daemon decides the
/// records it reads in one batch: with a cap of one a day, the loan push
/// (priority 80) wins arbitration over the fee alert (priority 50) whatever
/// the order of the lines, and the fee alert, a service message, is
/// deferred, not suppressed.
#[test]
fn simulate_decides_events_of_one_moment_together() {
    let dir = tempfile::tempdir().unwrap();
    let at = "2026-03-02T01:00:00Z";
    let events = [
        format!(
            r#"{{"specversion": "1.0", "id": "ctx", "type": "customer.contact_updated", "source": "t", "subject": "c-1", "time": "{at}", "data": {{"timezone": "Australia/Sydney", "app_installed": true, "email": "c@example.com"}}}}"#
        ),
        format!(
            r#"{{"specversion": "1.0", "id": "fee", "type": "recurring_payment.amount_changed", "source": "t", "subject": "c-1", "time": "{at}", "data": {{"payment_id": "P-1", "merchant": "Netflix", "previous_amount": 15.99, "new_amount": 18.99, "currency": "AUD"}}}}"#
        ),
        format!(
            r#"{{"specversion": "1.0", "id": "loan", "type": "loan_application.completed", "source": "t", "subject": "c-1", "time": "{at}", "data": {{"application_id": "A-1", "product": "Personal loan", "amount": 15000, "signed": false, "resume_url": "https://bank.example/loans/A-1/sign"}}}}"#
        ),
    ];
    let path = dir.path().join("moment.jsonl");
    std::fs::write(&path, events.join("\n")).unwrap();
    let (code, out, err) = nudge(&[
        "simulate",
        "--rules",
        repo().join("rules").to_str().unwrap(),
        "--events",
        path.to_str().unwrap(),
        "--config",
        repo().join("examples/policy.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = |journey: &str| {
        records
            .iter()
            .find(|r| r["journey"] == journey && r["channel"] == "push")
            .unwrap_or_else(|| panic!("no {journey} push in {out}"))
            .clone()
    };
    assert_eq!(first("unsigned_loan")["outcome"], "sent", "{out}");
    let fee = first("fee_increase");
    assert_eq!(fee["outcome"], "deferred", "{out}");
    assert!(
        fee["reason"]
            .as_str()
            .unwrap()
            .contains("lost to unsigned_loan/push"),
        "{fee}"
    );
}

/// `nudge check --config` checks what the daemon checks before contacting
/// anything: a misspelt secret Kafka property is refused by its nudge key,
/// its value never shown, and a good config is reported ready.
#[test]
fn check_with_a_config_checks_the_daemons_settings_without_showing_secrets() {
    let local = repo().join("deploy/nudge.local.toml");
    let (code, out, err) = nudge(&["check", "--config", local.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: config "), "{out}");
    assert!(out.contains("3 journeys"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("key-password");
    std::fs::write(&secret, "TopSecret99\n").unwrap();
    let config = dir.path().join("nudge.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[kafka.secret_properties_file]\n\"ssl.key.pasword\" = {:?}\n",
            std::fs::read_to_string(&local).unwrap(),
            secret
        ),
    )
    .unwrap();
    let (code, out, err) = nudge(&["check", "--config", config.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("ssl.key.pasword"), "{err}");
    assert!(!err.contains("TopSecret99"), "{err}");
    assert!(!out.contains("ok:"), "{out}");

    // What only the daemon refused before, after opening its store: a
    // misspelt kill switch (the journey went on sending) and a SASL
    // mechanism this build has no provider for.
    let text = std::fs::read_to_string(&local).unwrap();
    for (changed, key) in [
        (
            text.replace(
                "[policy.quiet_hours.push]",
                "[policy]\ndisabled_journeys = [\"unsigned_loan\", \"fee_increse\"]\n\n[policy.quiet_hours.push]",
            ),
            "policy.disabled_journeys: no journey named fee_increse",
        ),
        (
            format!("{text}\n[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"GSSAPI\"\n"),
            "kafka.properties.sasl.mechanism: `GSSAPI` is not supported",
        ),
        // The store's secret and CA file, which only connecting used to read.
        (
            text.replace(
                "path = \"nudge-local.db\"",
                "url = \"postgres://nudge@db:5432/nudge\"\npassword_file = \"/nonexistent/pg-password\"",
            ),
            "store.password_file",
        ),
        (
            text.replace(
                "path = \"nudge-local.db\"",
                "url = \"postgres://nudge@db:5432/nudge?sslmode=verify-full\"\nca_file = \"/nonexistent/ca.crt\"",
            ),
            "store.ca_file: cannot read /nonexistent/ca.crt",
        ),
    ] {
        assert_ne!(changed, text);
        std::fs::write(&config, changed).unwrap();
        let (code, out, err) = nudge(&["check", "--config", config.to_str().unwrap()]);
        assert_ne!(code, 0, "{out}{err}");
        assert!(err.contains(key), "{key} in {err}");
    }
}

/// `nudge check --config` on the annotated example, without the token
/// variables it names: every missing secret is reported at once, not one
/// per run.
#[test]
fn check_reports_every_missing_secret_at_once() {
    let example = repo().join("deploy/nudge.example.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["check", "--config", example.to_str().unwrap()])
        .current_dir(repo())
        .env_remove("NUDGE_PUSH_TOKEN")
        .env_remove("NUDGE_EMAIL_TOKEN")
        .env_remove("NUDGE_CALL_TASK_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for var in [
        "NUDGE_PUSH_TOKEN",
        "NUDGE_EMAIL_TOKEN",
        "NUDGE_CALL_TASK_TOKEN",
    ] {
        assert!(err.contains(var), "{var} in {err}");
    }
}

/// A setting spelt with one underscore where two belong is not read; the
/// command says so, with the spelling that works, and never the value.
#[test]
fn check_names_an_override_spelt_with_one_underscore() {
    let local = repo().join("deploy/nudge.local.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["check", "--config", local.to_str().unwrap()])
        .current_dir(repo())
        .env("NUDGE_STORE_PATH", "/srv/elsewhere.db")
        .env("NUDGE_STORE__RETENTION", "30d")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("NUDGE_STORE_PATH is not read")
            && err.contains("for store.path write NUDGE_STORE__PATH"),
        "{err}"
    );
    assert!(!err.contains("NUDGE_STORE__RETENTION"), "{err}");
    assert!(!err.contains("elsewhere"), "{err}");
}

/// `--version` names the commit the binary was built from, so ops can tell
/// two builds of one version apart.
#[test]
fn version_names_the_commit() {
    let (code, out, err) = nudge(&["--version"]);
    assert_eq!(code, 0, "{err}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let commit = head.as_deref().unwrap_or("unknown");
    let expected = format!("nudge {} (commit {commit}", env!("CARGO_PKG_VERSION"));
    assert!(
        out.starts_with(&expected),
        "{out:?} does not start {expected:?}"
    );
    assert!(
        out.trim_end().ends_with(')') && !out.contains("(commit )"),
        "{out:?}"
    );
}

/// Serves one fixed HTTP answer on 127.0.0.1 to every connection; returns
/// the address.
fn answering(status: &str, body: &'static str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let status = status.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            // The whole request, whatever the writes it came in.
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    address
}

/// `nudge probe`: the exit code for a health check, the status on stdout,
/// and why an endpoint is not ready on stderr (it said only `503`).
#[test]
fn probe_exits_by_status_and_says_why_not_ready() {
    let not_ready = answering(
        "503 Service Unavailable",
        r#"{"ready":false,"reason":"kafka: no broker reachable"}"#,
    );
    let (code, out, err) = nudge(&["probe", "--address", &not_ready]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(out.trim(), "503");
    assert!(err.contains("kafka: no broker reachable"), "{err}");
    let ready = answering("200 OK", r#"{"ready":true}"#);
    let (code, out, err) = nudge(&["probe", "--address", &ready, "healthz"]);
    assert_eq!((code, out.trim()), (0, "200"), "{err}");
    assert!(err.is_empty(), "{err}");
    // Nothing listening: 2.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (code, _, err) = nudge(&["probe", "--address", &gone]);
    assert_eq!(code, 2, "{err}");
    // A server that takes the connection and closes it without answering
    // (saturated, or stopped inside): never a pass, however the close lands
    // (the request's write refused with EPIPE passed as a closed stdout,
    // exit 0 in silence, about half the time).
    let closer = answering_raw(None);
    for _ in 0..20 {
        let (code, out, err) = nudge(&["probe", "--address", &closer]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("no answer"), "{err}");
    }
    // An answer cut short is no answer either.
    for cut in [
        "HTTP/1.1 200 OK\r\nContent-Le",
        "HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n{\"ready\"",
        "SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ] {
        let server = answering_raw(Some(cut));
        let (code, out, err) = nudge(&["probe", "--address", &server]);
        assert_eq!((code, out.as_str()), (2, ""), "{cut:?}: {err}");
        assert!(err.starts_with("nudge: probing http://"), "{err}");
    }
}

/// `nudge control` tells a change made from an answer that only looks
/// like success: a 200 that is not a control log entry, or a redirect.
#[test]
fn control_reports_a_change_only_when_the_daemon_records_one() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a-long-enough-admin-token-1234").unwrap();
    let token = token.to_str().unwrap();
    let control = |server: &str, what: &[&str]| {
        let url = format!("http://{server}");
        let mut args = vec!["control"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["--url", &url, "--token-file", token]);
        nudge(&args)
    };
    let stop_push = ["channel", "push", "--stop"];
    let not_nudge = answering("200 OK", r#"{"error":"<x>"}"#);
    let (code, out, err) = control(&not_nudge, &stop_push);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(
        err.contains("is not a nudge control change (no control log entry), so the change may not have been made: {\"error\":\"<x>\"}"),
        "{err}"
    );
    let moved = answering("307 Temporary Redirect", "");
    let (code, out, err) = control(&moved, &["journey", "fee_increase", "--disable"]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("answered 307"), "{err}");
    // The daemon's answer is a log entry: reported as the change.
    let daemon = answering(
        "200 OK",
        r#"{"seq":7,"who":"admin","kind":"channel","target":"push","before":{"enabled":null},"after":{"enabled":false}}"#,
    );
    let (code, out, err) = control(&daemon, &stop_push);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(by admin, control log #7)"), "{out}");
}

/// A server that reads nothing and writes `raw` (or nothing) before it closes.
fn answering_raw(raw: Option<&'static str>) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            if let Some(raw) = raw {
                let _ = stream.write_all(raw.as_bytes());
            }
        }
    });
    address
}

/// `RUST_LOG=` (set but empty, as a template leaves it) is as if unset:
/// the daemon logs at `log.level`, errors included, instead of nothing.
#[test]
fn an_empty_rust_log_does_not_silence_the_daemon() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["run", "--config", "deploy/nudge.local.toml"])
        .current_dir(repo())
        .env("RUST_LOG", "")
        .env("NUDGE_STORE__PATH", dir.path().join("s.db"))
        .env("NUDGE_KAFKA__BROKERS", "127.0.0.1:1")
        .env("NUDGE_ADMIN__LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first line comes at once; the wait only bounds a daemon that says nothing.
    let first = rx.recv_timeout(std::time::Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let first = first.expect("the daemon logged nothing with RUST_LOG empty");
    assert!(first.contains("nudge starting"), "{first}");
}
