//! The documentation is generated from, or checked against, the code.

mod harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use harness::repo;
use nudge::config::PolicyConfig;
use nudge::context::CustomerContext;
use nudge::event::Event;
use nudge::model::{Decision, Outcome};
use nudge::rules::{host_api_reference, load_sources, Limits, RuleSet};
use nudge::sim::Simulation;
use nudge::store::Store;

#[test]
fn rules_readme_holds_the_generated_api_reference() {
    let readme = std::fs::read_to_string(repo().join("rules/README.md")).unwrap();
    let begin = "<!-- BEGIN rules-doc -->\n";
    let start = readme.find(begin).expect("BEGIN marker") + begin.len();
    let end = readme.find("<!-- END rules-doc -->").expect("END marker");
    assert_eq!(
        &readme[start..end],
        host_api_reference(),
        "rules/README.md is out of date: regenerate the section with `nudge rules-doc`"
    );
}

#[test]
fn the_walkthrough_journey_compiles_with_the_shipped_ones() {
    let mut sources = Vec::new();
    for dir in [repo().join("rules"), repo().join("examples/journeys")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "rhai") {
                let text = std::fs::read_to_string(&path).unwrap();
                sources.push((path, text));
            }
        }
    }
    let set = load_sources(sources, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
    let card = set
        .journey("card_expiring")
        .expect("walkthrough journey loaded");
    assert_eq!(card.key_field.as_deref(), Some("card_id"));
    assert_eq!(card.steps.len(), 2);
    assert!(Path::new(&card.file).ends_with("examples/journeys/card_expiring.rhai"));
}

#[test]
fn readme_lists_every_metric_and_only_those() {
    use std::collections::BTreeSet;

    use nudge::telemetry::{catalog, metrics_reference};

    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let begin = "<!-- BEGIN metrics -->\n";
    let start = readme.find(begin).expect("BEGIN metrics marker") + begin.len();
    let end = readme
        .find("<!-- END metrics -->")
        .expect("END metrics marker");
    let table = &readme[start..end];
    let listed: BTreeSet<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`'))
        .map(|(name, _)| name)
        .collect();
    let exported: BTreeSet<&str> = catalog::ALL.iter().map(|m| m.name).collect();
    let missing: Vec<_> = exported.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&exported).collect();
    let expected = metrics_reference();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README.md's metric table has no row for {missing:?} and rows for {unknown:?}, \
         which nudge does not export; the table should read:\n{expected}"
    );
    assert_eq!(
        table, expected,
        "README.md's metric table is out of date (src/telemetry/catalog.rs); it should read:\n{expected}"
    );
}

/// The `customer` row of the reference whose first cell starts with `name`.
fn reference_row(name: &str) -> &'static str {
    host_api_reference()
        .lines()
        .find(|l| l.starts_with(&format!("| `{name}")))
        .unwrap_or_else(|| panic!("no row for {name} in the reference"))
}

/// The backticked words of `row` inside the parentheses after `` `field` ``.
fn listed_values(row: &str, field: &str) -> BTreeSet<String> {
    let open = format!("`{field}` (");
    let start = row.find(&open).unwrap_or_else(|| panic!("{open} in {row}")) + open.len();
    let inner = &row[start..start + row[start..].find(')').expect("closing parenthesis")];
    inner
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

fn cloud_event(id: &str, kind: &str, minutes: i64, data: Value) -> Event {
    let time = t0() + chrono::Duration::minutes(minutes);
    let json = json!({"specversion": "1.0", "id": id, "type": kind, "source": "tests",
                      "subject": "c-1", "time": time.to_rfc3339(), "data": data});
    Event::parse(json.to_string().as_bytes()).unwrap()
}

fn t0() -> DateTime<Utc> {
    // Monday 11:00 in Sydney: outside quiet hours.
    DateTime::parse_from_rfc3339("2026-03-02T00:00:00Z")
        .unwrap()
        .to_utc()
}

const LIFECYCLE: &str = r#"
fn journey() {
    #{ name: "NAME", category: "service", triggers: ["NAME.start"], key: "k", EXTRA
       exits: #{ "NAME.won": "converted", "NAME.lost": "cancelled" },
       steps: [#{ id: "a", channel: "push", template: "t", delay: "0s" },
               #{ id: "b", channel: "push", template: "t", delay: "1d" }] }
}
fn decide(event, customer) { start() }
"#;

const PROBE: &str = r#"
fn journey() {
    #{ name: "probe", category: "service", triggers: ["probe"],
       steps: [#{ id: "a", channel: "push", template: "t", delay: "0s" }] }
}
fn decide(event, customer) {
    let seen = [];
    let fields = [];
    for j in customer.journeys {
        seen.push(`${j.journey}/${j.key} ${j.status} ${j.mode}`);
        fields = j.keys();
    }
    start(#{ seen: seen, fields: fields })
}
"#;

fn lifecycle_rules() -> RuleSet {
    let mut sources = vec![(PathBuf::from("probe.rhai"), PROBE.to_string())];
    for (name, extra) in [
        ("live", ""),
        ("held", "holdout: 100,"),
        ("shadowed", "shadow: true,"),
    ] {
        let text = LIFECYCLE.replace("NAME", name).replace("EXTRA", extra);
        sources.push((PathBuf::from(format!("{name}.rhai")), text));
    }
    load_sources(sources, &Limits::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// Held-out instances record conversions like treated ones (the control group
/// is measured against them), so the status says how an instance ended and
/// `mode` says whether it was sent; the reference must list exactly these.
#[tokio::test]
async fn instance_statuses_and_modes_in_the_reference_are_the_ones_scripts_see() {
    let sim = Simulation::new(lifecycle_rules(), t0(), PolicyConfig::default()).unwrap();
    let contact = json!({"app_installed": true, "timezone": "Australia/Sydney"});
    let day = 24 * 60;
    let events = [
        cloud_event("e1", "customer.contact_updated", 0, contact),
        cloud_event("e2", "live.start", 0, json!({"k": "won"})),
        cloud_event("e3", "live.start", 0, json!({"k": "lost"})),
        cloud_event("e4", "live.start", 0, json!({"k": "done"})),
        cloud_event("e5", "held.start", 0, json!({"k": "won"})),
        cloud_event("e6", "live.won", 60, json!({"k": "won"})),
        cloud_event("e7", "live.lost", 60, json!({"k": "lost"})),
        cloud_event("e8", "held.won", 60, json!({"k": "won"})),
        cloud_event("e9", "live.start", 2 * day, json!({"k": "open"})),
        cloud_event("e10", "held.start", 2 * day, json!({"k": "open"})),
        cloud_event("e11", "shadowed.start", 2 * day, json!({"k": "open"})),
    ];
    let mut log = Vec::new();
    for e in events {
        log.extend(sim.feed(e).await.unwrap().1);
    }
    log.extend(
        sim.run_until(sim.now() + chrono::Duration::hours(1))
            .await
            .unwrap(),
    );
    let outcomes: BTreeSet<_> = log
        .iter()
        .map(|r| format!("{}/{}", r.journey, r.outcome))
        .collect();
    for o in [
        "held/held_out",
        "shadowed/shadow",
        "live/sent",
        "live/converted",
    ] {
        assert!(outcomes.contains(o), "{o} not in {outcomes:?}");
    }
    // A control-group instance's steps stay in its arm when an exit ends
    // it (the funnel's arms, not losses); its status records the conversion.
    assert!(
        log.iter().any(|r| r.journey == "held"
            && r.outcome == Outcome::HeldOut
            && r.reason.contains("held.won ended the journey")),
        "{log:#?}"
    );

    // What a script sees in `customer.journeys`.
    let customer = sim.store.customer("c-1", sim.now()).unwrap();
    let rules = lifecycle_rules();
    let probe = cloud_event("p", "probe", 2 * day + 60, json!({}));
    let vars = match rules
        .decide(
            rules.journey("probe").unwrap(),
            &Arc::new(probe),
            &Arc::new(customer),
        )
        .unwrap()
    {
        Decision::Start { vars, .. } => vars,
        other => panic!("{other:?}"),
    };
    let strings = |v: &Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let seen = strings(&vars["seen"]);
    let expected: BTreeSet<String> = [
        "live/won converted live",
        "live/lost cancelled live",
        "live/done completed live",
        "live/open open live",
        "held/won converted held_out",
        "held/open open held_out",
        "shadowed/open open shadow",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(seen, expected);

    let row = reference_row("customer.journeys");
    let word = |s: &String, i: usize| s.split(' ').nth(i).unwrap().to_string();
    assert_eq!(
        listed_values(row, "status"),
        seen.iter().map(|s| word(s, 1)).collect(),
        "the statuses the reference lists are the ones scripts see"
    );
    assert_eq!(
        listed_values(row, "mode"),
        seen.iter().map(|s| word(s, 2)).collect(),
        "the modes the reference lists are the ones scripts see"
    );
    for field in strings(&vars["fields"]) {
        assert!(
            row.contains(&format!("`{field}`")),
            "field {field} of customer.journeys is not in the reference: {row}"
        );
    }
}

/// The properties of `event` and `customer` the reference lists, e.g.
/// `customer.has_app` / `has_email` / `has_phone`; methods are left out.
fn listed_properties(object: &str) -> BTreeSet<String> {
    let prefix = format!("| `{object}.");
    host_api_reference()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .flat_map(|l| {
            let first_cell = l.split('|').nth(1).unwrap();
            first_cell
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|name| !name.contains('('))
                .map(|name| name.trim_start_matches(&prefix[3..]).to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_reference_lists_every_property_scripts_can_read_and_no_other() {
    let (event, customer) = (listed_properties("event"), listed_properties("customer"));
    assert!(event.contains("data") && customer.contains("has_phone"));

    // Registered in the engine (src/rules/api.rs), so listed.
    let api = std::fs::read_to_string(repo().join("src/rules/api.rs")).unwrap();
    let registered: BTreeSet<String> = api
        .split("register_get(\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_string())
        .collect();
    assert!(
        !registered.is_empty(),
        "no register_get in src/rules/api.rs"
    );
    let listed: BTreeSet<String> = event.union(&customer).cloned().collect();
    assert_eq!(registered, listed, "registered properties vs the reference");

    // Listed, so a script reads each of them without an error.
    let reads: Vec<String> = event
        .iter()
        .map(|p| format!("event.{p}"))
        .chain(customer.iter().map(|p| format!("customer.{p}")))
        .collect();
    let script = format!(
        r#"fn journey() {{ #{{ name: "reads", category: "service", triggers: ["t"],
               steps: [#{{ id: "a", channel: "push", template: "t", delay: "0s" }}] }} }}
           fn decide(event, customer) {{ let all = [{}]; start() }}"#,
        reads.join(", ")
    );
    let rules = load_sources(
        vec![(PathBuf::from("reads.rhai"), script)],
        &Limits::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let e = Arc::new(cloud_event("r", "t", 0, json!({})));
    let c = Arc::new(CustomerContext::new("c-1"));
    rules
        .decide(rules.journey("reads").unwrap(), &e, &c)
        .unwrap_or_else(|e| panic!("reading {reads:?}: {e}"));
}

/// The functions and methods the reference lists, as written: (receiver,
/// name, argument names), e.g. (`customer`, `consented`, [`channel`, `category`]).
fn listed_functions() -> Vec<(Option<String>, String, Vec<String>)> {
    let mut out = Vec::new();
    for line in host_api_reference()
        .lines()
        .filter(|l| l.starts_with("| `"))
    {
        let first_cell = line.split('|').nth(1).unwrap();
        for code in first_cell.split('`').skip(1).step_by(2) {
            let Some((callee, args)) = code.strip_suffix(')').and_then(|c| c.split_once('('))
            else {
                continue;
            };
            let (receiver, name) = match callee.rsplit_once('.') {
                Some((r, n)) => (Some(r.to_string()), n.to_string()),
                None => (None, callee.to_string()),
            };
            let args = args
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect();
            out.push((receiver, name, args));
        }
    }
    out
}

#[test]
fn the_reference_lists_every_function_scripts_can_call_and_no_other() {
    let listed = listed_functions();
    let names: BTreeSet<&str> = listed.iter().map(|(_, n, _)| n.as_str()).collect();
    assert!(names.contains("consented") && names.contains("start") && names.contains("money"));

    // Registered in the engine (src/rules/api.rs), so listed.
    let api = std::fs::read_to_string(repo().join("src/rules/api.rs")).unwrap();
    let registered: BTreeSet<String> = api
        .split("register_fn(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"'))
        .map(|rest| rest.split('"').next().unwrap().to_string())
        .collect();
    assert!(
        registered.len() >= 7,
        "register_fn in src/rules/api.rs: {registered:?}"
    );
    let unlisted: Vec<&String> = registered
        .iter()
        .filter(|r| !names.contains(r.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "registered but not in the reference: {unlisted:?}"
    );

    // Listed, so a script calls each one as written, with values of the
    // documented kinds, and the engine finds it.
    let value = |arg: &str| match arg {
        "vars" => "#{}".to_string(),
        "x" => "18.5".to_string(),
        quoted if quoted.starts_with('"') => quoted.to_string(),
        other => format!("\"{other}\""),
    };
    let receiver = |r: &str| match r {
        "customer" => "customer".to_string(),
        _ => "#{ field: 1 }".to_string(),
    };
    for (on, name, args) in &listed {
        let args: Vec<String> = args.iter().map(|a| value(a)).collect();
        let call = match on {
            Some(r) => format!("{}.{name}({})", receiver(r), args.join(", ")),
            None => format!("{name}({})", args.join(", ")),
        };
        let script = format!(
            r#"fn journey() {{ #{{ name: "calls", category: "service", triggers: ["t"],
                   steps: [#{{ id: "a", channel: "push", template: "t", delay: "0s" }}] }} }}
               fn decide(event, customer) {{ let r = {call}; start() }}"#
        );
        let rules = load_sources(
            vec![(PathBuf::from("calls.rhai"), script)],
            &Limits::default(),
        )
        .unwrap_or_else(|e| panic!("{call}: {e}"));
        let e = Arc::new(cloud_event("r", "t", 0, json!({})));
        let c = Arc::new(CustomerContext::new("c-1"));
        if let Err(err) = rules.decide(rules.journey("calls").unwrap(), &e, &c) {
            assert!(
                !err.message.contains("no function `"),
                "the reference lists `{call}`, scripts cannot call it: {err}"
            );
        }
    }
}
