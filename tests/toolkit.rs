//! The journey designer's toolkit: `nudge test`, `nudge replay`, safe reload.

mod harness;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use nudge::clock::{Clock, VirtualClock};
use nudge::config::PolicyConfig;
use nudge::event::Event;
use nudge::journey::Pipeline;
use nudge::model::ChannelKind;
use nudge::rules::{load_dir, Limits, RulesHandle};
use nudge::store::{SqliteStore, Store};

use harness::{copy_rules, nudge, repo};

#[test]
fn nudge_test_passes_the_shipped_journey_tests() {
    let (code, out, _) = nudge(&["test", repo().join("rules").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let passed: usize = out
        .split("nudge test: ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(passed >= 12, "every shipped case ran: {out}");
}

#[test]
fn nudge_test_fails_with_a_diff_naming_file_and_case() {
    let dir = tempfile::tempdir().unwrap();
    copy_rules(dir.path());
    // The designer believes the email goes out after two days.
    let wrong = r#"
journey = "unsigned_loan"
[[case]]
name = "email on day two"
events = [
  { type = "customer.contact_updated", data = { app_installed = true, email = "a@example.com" } },
  { type = "loan_application.completed", data = { application_id = "A-1", product = "Car loan", amount = 900, signed = false, resume_url = "u" } },
]
expect = [
  { at = "0s", step = "push", outcome = "sent" },
  { at = "2d", step = "email", outcome = "sent" },
]
"#;
    let file = dir.path().join("mine.test.toml");
    std::fs::write(&file, wrong).unwrap();
    let (code, out, _) = nudge(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAIL {}: case \"email on day two\" failed:",
            file.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("  -      2d  c-1      unsigned_loan.email sent"),
        "the expected line is marked missing: {out}"
    );
    assert!(
        out.contains("  +      1d  c-1      unsigned_loan.email sent"),
        "the actual line is marked extra: {out}"
    );
    // What was not sent says why, in the diff itself.
    assert!(
        out.contains(
            "  +      3d  c-1      unsigned_loan.call suppressed  (unreachable on call_task: no phone number)"
        ),
        "{out}"
    );
    assert!(
        out.contains("  +      1d  c-1      unsigned_loan.email sent\n"),
        "a sent line needs no reason: {out}"
    );
    assert!(
        out.contains("       0s  c-1      unsigned_loan.push sent"),
        "common lines stay unmarked: {out}"
    );
    // As `diff -u` reads: what was expected, then what came instead.
    assert!(
        out.find("  -      2d").unwrap() < out.find("  +      1d").unwrap(),
        "{out}"
    );
    assert!(out.contains("cases passed, 1 failed"), "{out}");
}

/// A catalogue where two journeys share a trigger: a file that expects the
/// whole log fails on the other journey's records; `scope = "journey"`
/// compares only its own (the other still runs, and a script error in it is
/// not this file's). `nudge test FILE` runs that file alone, against the
/// journeys of its directory, in a team's subdirectory too.
#[test]
fn nudge_test_scopes_a_file_to_its_journey_and_runs_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let team = dir.path().join("cards");
    std::fs::create_dir(&team).unwrap();
    let journey = |name: &str, decide: &str| {
        format!(
            "fn journey() {{ #{{ name: \"{name}\", category: \"service\", triggers: [\"card.issued\"],\n  steps: [#{{ id: \"push\", channel: \"push\", template: \"t\", delay: \"0s\" }}] }} }}\nfn decide(event, customer) {{ {decide} }}\n"
        )
    };
    std::fs::write(team.join("mine.rhai"), journey("mine", "start()")).unwrap();
    std::fs::write(team.join("theirs.rhai"), journey("theirs", "start()")).unwrap();
    std::fs::write(
        team.join("broken.rhai"),
        journey("broken", "if event.data.n > 0 { 1 / 0 } start()"),
    )
    .unwrap();
    let test = |scope: &str| {
        format!(
            "journey = \"mine\"\n{scope}\n[[case]]\nname = \"pushes\"\nevents = [\n  {{ type = \"customer.contact_updated\", data = {{ app_installed = true }} }},\n  {{ type = \"card.issued\", data = {{ n = 1 }} }},\n]\nexpect = [ {{ at = \"0s\", step = \"push\", outcome = \"sent\" }} ]\n"
        )
    };
    let file = team.join("mine.test.toml");
    std::fs::write(&file, test("")).unwrap();
    let (code, out, _) = nudge(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "every journey's records and errors count: {out}");
    assert!(out.contains("journey `broken`: Division by zero"), "{out}");
    std::fs::rename(team.join("broken.rhai"), dir.path().join("broken.off")).unwrap();
    let (code, out, _) = nudge(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("+      0s  c-1      theirs.push sent"),
        "{out}"
    );
    std::fs::rename(dir.path().join("broken.off"), team.join("broken.rhai")).unwrap();

    std::fs::write(&file, test("scope = \"journey\"")).unwrap();
    let (code, out, err) = nudge(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nudge test: 1 case passed, 0 failed"), "{out}");

    // One file, from anywhere; its directory's journeys, or --rules.
    std::fs::write(dir.path().join("other.test.toml"), "nonsense = 1").unwrap();
    let (code, out, err) = nudge(&["test", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nudge test: 1 case passed, 0 failed"), "{out}");
    let (code, out, err) = nudge(&[
        "test",
        file.to_str().unwrap(),
        "--rules",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // A misspelt step is named, with the nearest of the journey's steps.
    std::fs::write(
        dir.path().join("typo.test.toml"),
        test("").replace("step = \"push\"", "step = \"psuh\""),
    )
    .unwrap();
    let (code, out, _) = nudge(&["test", dir.path().join("typo.test.toml").to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("an expectation names step `psuh` of journey `mine`, which has no such step (did you mean `push`? its steps: push)"),
        "{out}"
    );
    std::fs::remove_file(dir.path().join("typo.test.toml")).unwrap();
    let (code, _, err) = nudge(&["test", team.join("mine.rhai").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("mine.rhai is not a test file"), "{err}");
    // Scope all over the whole directory reads the stray file too.
    let (code, out, _) = nudge(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("other.test.toml: cannot read test file"),
        "{out}"
    );
}

/// Script errors found by `nudge test` name the line and column where they
/// happened (inside the script's own function), and a script stopped by
/// `rules.timeout` says so at the function that was called.
#[test]
fn nudge_test_shows_script_errors_at_their_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let head = |name: &str| {
        format!(
            r#"fn journey() {{ #{{ name: "{name}", category: "service", triggers: ["{name}.happened"],
  steps: [#{{ id: "push", channel: "push", template: "t", delay: "0s" }}] }} }}
"#
        )
    };
    // Line 5, column 11: the `*` of `"x" * 2` in `label`, called from `decide` on line 8.
    let broken = format!(
        "{}fn label(event) {{\n  let n = event.data.n;\n  n + \"x\" * 2\n}}\nfn decide(event, customer) {{\n  let l = label(event);\n  start()\n}}\n",
        head("broken")
    );
    // `decide` on line 3, column 28; seconds of `index_of`, under the operation limit.
    let slow = format!(
        "{}fn decide(event, customer) {{\n  let a = [];\n  for i in 0..10000 {{ a.push(i); }}\n  let n = 0;\n  for i in 0..10000 {{ n += a.index_of(9999); }}\n  start()\n}}\n",
        head("slow")
    );
    for (name, text) in [("broken", &broken), ("slow", &slow)] {
        std::fs::write(dir.path().join(format!("{name}.rhai")), text).unwrap();
        std::fs::write(
            dir.path().join(format!("{name}.test.toml")),
            format!(
                "journey = \"{name}\"\n[[case]]\nname = \"starts\"\nevents = [ {{ type = \"{name}.happened\", data = {{ n = 1 }} }} ]\nexpect = [ {{ at = \"0s\", step = \"push\", outcome = \"sent\" }} ]\n"
            ),
        )
        .unwrap();
    }
    let (code, out, _) = nudge(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let at = |name: &str, line: usize, column: usize| {
        format!(
            "{}:{line}:{column}: journey `{name}`: ",
            dir.path().join(format!("{name}.rhai")).display()
        )
    };
    assert!(
        out.contains(&format!("{}no operator `*` for (", at("broken", 5, 11))),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{}stopped: the evaluation ran longer than rules.timeout (100ms)",
            at("slow", 3, 28)
        )),
        "{out}"
    );
    assert!(!out.contains(":0:0:"), "{out}");
    assert!(out.contains("0 cases passed, 2 failed"), "{out}");
}

#[test]
fn replay_reports_a_changed_delay_and_a_changed_condition() {
    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("candidate");
    copy_rules(&candidate);
    let loan = candidate.join("unsigned_loan.rhai");
    let text = std::fs::read_to_string(&loan).unwrap();
    std::fs::write(
        &loan,
        text.replace(
            r#"template: "loan_unsigned_email", delay: "1d""#,
            r#"template: "loan_unsigned_email", delay: "2d""#,
        ),
    )
    .unwrap();
    let fee = candidate.join("fee_increase.rhai");
    let text = std::fs::read_to_string(&fee).unwrap();
    std::fs::write(
        &fee,
        text.replace(
            "if d.new_amount <= d.previous_amount {",
            "if d.new_amount - d.previous_amount < 5 {",
        ),
    )
    .unwrap();

    let limits = Limits::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt
        .block_on(nudge::toolkit::replay::replay(
            &repo().join("examples/events.jsonl"),
            load_dir(&repo().join("rules"), &limits).unwrap(),
            load_dir(&candidate, &limits).unwrap(),
            &PolicyConfig::default(),
            &Default::default(),
        ))
        .unwrap();
    let row = |j: &str, c: &str| {
        report
            .rows
            .iter()
            .find(|r| r.journey == j && r.channel == c)
            .unwrap()
    };
    let fee_row = row("fee_increase", "push");
    assert_eq!(
        (
            fee_row.baseline_sent,
            fee_row.candidate_sent,
            fee_row.customers_fewer
        ),
        (1, 0, 1)
    );
    assert!(
        fee_row.examples[0].contains("c-1003"),
        "{:?}",
        fee_row.examples
    );
    let email = row("unsigned_loan", "email");
    assert_eq!(
        (email.baseline_sent, email.candidate_sent, email.retimed),
        (2, 2, 2)
    );
    assert!(
        email
            .examples
            .iter()
            .all(|e| e.contains("moves from") && e.contains("c-1002")),
        "{:?}",
        email.examples
    );
    assert_eq!(
        row("unsigned_loan", "push").retimed + row("unsigned_loan", "push").customers_more,
        0
    );
    assert!(report.changed());

    // The same through the command line, with --fail-on-change for CI.
    let (code, out, _) = replay_against_shipped(&candidate, &["--fail-on-change"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("fee_increase/push: c-1003 gets 0 instead of 1"),
        "{out}"
    );
    let (same, out, _) = nudge(&[
        "replay",
        "--rules",
        "rules",
        "--baseline",
        "rules",
        "--events",
        "examples/events.jsonl",
        "--fail-on-change",
    ]);
    assert_eq!(same, 0, "{out}");
    assert!(
        out.contains("no customer would get a different message"),
        "{out}"
    );
}

/// `nudge replay` of `candidate` against the shipped rules over the
/// example events.
fn replay_against_shipped(candidate: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let (rules, events) = (repo().join("rules"), repo().join("examples/events.jsonl"));
    let mut args = vec![
        "replay",
        "--rules",
        candidate.to_str().unwrap(),
        "--baseline",
        rules.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    nudge(&args)
}

/// A candidate whose script fails sends nothing: the replay says it
/// failed, and why, rather than only that customers get fewer messages.
#[test]
fn replay_says_when_the_candidates_script_fails() {
    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("candidate");
    copy_rules(&candidate);
    let path = candidate.join("fee_increase.rhai");
    let script = std::fs::read_to_string(&path).unwrap().replacen(
        "    let d = event.data;",
        "    let d = event.data;\n    let masked = mask(d.merchant);",
        1,
    );
    std::fs::write(&path, script).unwrap();
    let (code, out, err) = replay_against_shipped(&candidate, &["--fail-on-change"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("candidate rules failed on 2 events (fee_increase 2), each dead-lettered by the daemon:"),
        "{out}"
    );
    assert!(
        out.contains(
            "no function `mask` taking (string): neither this script nor nudge defines one"
        ),
        "{out}"
    );
    assert!(!out.contains("baseline rules failed"), "{out}");
    assert!(
        out.contains(
            "fee_increase/push: c-1003 gets 0 instead of 1 (candidate: script failed on event"
        ),
        "{out}"
    );
    // JSON carries both sides' counts.
    let (_, json, _) = replay_against_shipped(&candidate, &["--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["candidate_failures"]["count"], 2, "{json}");
    assert_eq!(report["baseline_failures"]["count"], 0, "{json}");
}

/// A change to what a message says, not to whether or when it goes: a
/// review pipeline's `--fail-on-change` must catch it too.
#[test]
fn replay_reports_a_message_that_says_something_else() {
    let dir = tempfile::tempdir().unwrap();
    for (name, from, to, expect) in [
        (
            "template",
            r#"template: "fee_increase_alert""#,
            r#"template: "fee_increase_alert_v2""#,
            "says something else: template fee_increase_alert -> fee_increase_alert_v2",
        ),
        (
            "variables",
            "new_amount: current,",
            "new_amount: money(d.new_amount * 10),",
            "says something else: variables new_amount differ",
        ),
    ] {
        let candidate = dir.path().join(name);
        copy_rules(&candidate);
        let fee = candidate.join("fee_increase.rhai");
        let text = std::fs::read_to_string(&fee).unwrap();
        assert!(text.contains(from));
        std::fs::write(&fee, text.replace(from, to)).unwrap();
        let (code, out, err) = nudge(&[
            "replay",
            "--rules",
            candidate.to_str().unwrap(),
            "--baseline",
            repo().join("rules").to_str().unwrap(),
            "--events",
            repo().join("examples/events.jsonl").to_str().unwrap(),
            "--fail-on-change",
        ]);
        assert_eq!(code, 1, "{name}: {out}{err}");
        assert!(out.contains(expect), "{name}: {out}");
        assert!(
            !out.contains("no customer would get a different message"),
            "{out}"
        );
    }
}

fn t0() -> DateTime<Utc> {
    "2026-01-05T01:00:00Z".parse().unwrap()
}

fn fee_event(id: &str, customer: &str) -> Arc<Event> {
    let json = serde_json::json!({
        "specversion": "1.0", "id": id, "type": "recurring_payment.amount_changed", "source": "t",
        "subject": customer, "time": t0().to_rfc3339(),
        "data": {"payment_id": id, "merchant": "Netflix", "previous_amount": 10, "new_amount": 12}
    });
    Arc::new(Event::parse(json.to_string().as_bytes()).unwrap())
}

#[test]
fn reload_swaps_only_a_rule_set_that_compiles_and_decisions_carry_the_new_hash() {
    let dir = tempfile::tempdir().unwrap();
    let rules_dir = dir.path().join("rules");
    copy_rules(&rules_dir);
    let limits = Limits::default();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("n.db")).unwrap());
    let clock = VirtualClock::new(t0());
    let handle = RulesHandle::new(load_dir(&rules_dir, &limits).unwrap());
    let pipeline = Pipeline::new(
        store.clone(),
        handle.clone(),
        Arc::new(clock.clone()),
        PolicyConfig::default(),
    );
    let old_hash = handle
        .current()
        .journey("fee_increase")
        .unwrap()
        .hash
        .clone();
    let old_version = handle.current().version.clone();

    // A broken edit: refused, the old set keeps deciding.
    let fee = rules_dir.join("fee_increase.rhai");
    let good = std::fs::read_to_string(&fee).unwrap();
    std::fs::write(&fee, good.replace("let currency", "let currency = ;")).unwrap();
    assert!(!nudge::daemon::reload(
        &rules_dir,
        &limits,
        &ChannelKind::ALL,
        &handle,
        store.as_ref(),
        clock.now(),
        "test"
    ));
    assert_eq!(handle.current().version, old_version);
    let out = pipeline.process(&[fee_event("e1", "c1")], &[]).unwrap();
    assert_eq!(out.started.len(), 1, "the old rules still run");

    // A good edit: swapped in; new decisions carry the new file hash. The
    // reload names what changed: one journey edited, one removed.
    let before = handle.current();
    std::fs::write(&fee, good.replace("priority: 50", "priority: 55")).unwrap();
    std::fs::remove_file(rules_dir.join("energy_rebate.rhai")).unwrap();
    assert!(nudge::daemon::reload(
        &rules_dir,
        &limits,
        &ChannelKind::ALL,
        &handle,
        store.as_ref(),
        clock.now(),
        "test"
    ));
    let new_hash = handle
        .current()
        .journey("fee_increase")
        .unwrap()
        .hash
        .clone();
    assert_ne!(new_hash, old_hash);
    assert_eq!(
        nudge::daemon::JourneyDiff::between(&before, &handle.current()),
        nudge::daemon::JourneyDiff {
            added: vec![],
            removed: vec!["energy_rebate".into()],
            changed: vec!["fee_increase".into()],
        }
    );
    pipeline.process(&[fee_event("e2", "c2")], &[]).unwrap();

    // Rules that send on a channel this daemon has no endpoint for are
    // refused, as a restart would refuse them: the set in force stays.
    let swapped = handle.current().version.clone();
    assert!(!nudge::daemon::reload(
        &rules_dir,
        &limits,
        &[ChannelKind::Push, ChannelKind::Email],
        &handle,
        store.as_ref(),
        clock.now(),
        "test"
    ));
    assert_eq!(handle.current().version, swapped);
    let set = load_dir(&rules_dir, &limits).unwrap();
    let problems = nudge::rules::unserved_channels(&set, &[ChannelKind::Push, ChannelKind::Email]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let unsigned = std::fs::read_to_string(rules_dir.join("unsigned_loan.rhai")).unwrap();
    let line = unsigned
        .lines()
        .position(|l| l.contains("\"call_task\""))
        .unwrap()
        + 1;
    assert_eq!(
        (
            problems[0].file.ends_with("unsigned_loan.rhai"),
            problems[0].line
        ),
        (true, line),
        "{problems:?}"
    );
    assert!(
        problems[0]
            .message
            .contains("sends on call_task, which has no endpoint"),
        "{problems:?}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = Arc::new(nudge::dispatch::RecordingChannel::default());
    let scheduler = nudge::scheduler::Scheduler::new(
        store.clone(),
        handle.clone(),
        nudge::dispatch::Channels::all(channel),
        Arc::new(clock.clone()),
        nudge::policy::Policy::new(PolicyConfig::default()),
        Default::default(),
        Default::default(),
    );
    let records = rt.block_on(scheduler.run_due()).unwrap();
    let hash_of = |c: &str| {
        records
            .iter()
            .find(|r| r.customer == c)
            .map(|r| r.rule_hash.clone())
            .unwrap()
    };
    assert_eq!(
        hash_of("c1"),
        old_hash,
        "an instance keeps the version that planned it"
    );
    assert_eq!(hash_of("c2"), new_hash);
}

/// `nudge test --config` runs the cases under that file's contact policy:
/// two loans at once both push under the default caps, and not under
/// examples/policy.toml's one message a day.
#[test]
fn test_takes_the_contact_policy_of_a_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("rules/unsigned_loan.rhai"),
        dir.path().join("unsigned_loan.rhai"),
    )
    .unwrap();
    let both = r#"
journey = "unsigned_loan"
[[case]]
name = "two loans, two pushes"
events = [
  { type = "customer.contact_updated", data = { app_installed = true } },
  { type = "loan_application.completed", data = { application_id = "A-1", product = "Car loan", amount = 900, signed = false, resume_url = "u" } },
  { type = "loan_application.completed", data = { application_id = "A-2", product = "Car loan", amount = 900, signed = false, resume_url = "u" } },
]
expect = [
  { at = "0s", step = "push", outcome = "sent" },
  { at = "0s", step = "push", outcome = "sent" },
  { at = "1d", step = "email", outcome = "suppressed" },
  { at = "1d", step = "email", outcome = "suppressed" },
  { at = "3d", step = "call", outcome = "suppressed" },
  { at = "3d", step = "call", outcome = "suppressed" },
]
"#;
    let file = dir.path().join("both.test.toml");
    std::fs::write(&file, both).unwrap();
    let (code, out, err) = nudge(&["test", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let policy = repo().join("examples/policy.toml");
    let (code, out, err) = nudge(&[
        "test",
        file.to_str().unwrap(),
        "--config",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("FAIL") && out.contains("two loans, two pushes"),
        "{out}"
    );
    // The config's push lateness (1d) too: the losing push waits for the
    // cap to free (at the default 12h it would be past its bound, dropped).
    let deferred = r#"
journey = "unsigned_loan"
[[case]]
name = "the losing push waits for the cap"
events = [
  { type = "customer.contact_updated", data = { app_installed = true } },
  { type = "loan_application.completed", data = { application_id = "A-1", product = "Car loan", amount = 900, signed = false, resume_url = "u" } },
  { type = "loan_application.completed", data = { application_id = "A-2", product = "Car loan", amount = 900, signed = false, resume_url = "u" } },
]
expect = [
  { at = "0s", step = "push", outcome = "sent" },
  { at = "0s", step = "push", outcome = "deferred" },
  { at = "12h", step = "push", outcome = "deferred" },
  { at = "20h", step = "push", outcome = "sent" },
  { at = "1d", step = "email", outcome = "suppressed" },
  { at = "1d", step = "email", outcome = "suppressed" },
  { at = "3d", step = "call", outcome = "suppressed" },
  { at = "3d", step = "call", outcome = "suppressed" },
]
"#;
    let lateness = dir.path().join("lateness.test.toml");
    std::fs::write(&lateness, deferred).unwrap();
    let (code, out, err) = nudge(&[
        "test",
        lateness.to_str().unwrap(),
        "--config",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = nudge(&[
        "test",
        file.to_str().unwrap(),
        "--config",
        "/nonexistent.toml",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent.toml"), "{err}");
}
