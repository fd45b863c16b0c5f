//! Benchmark 1: the rules stage in process, on one core.
//!
//! Per event: CloudEvent parse → trigger index → `decide` of every journey the
//! event type triggers, with the shipped rhai journeys, beside a hand-written
//! native Rust version of the same three journeys (same parse, a `match` on
//! the type, the same `Decision` built by Rust code). Then the same events
//! with 2,000 generated journeys loaded beside the 3 real ones.
//!
//! Competition (case d): `--competing` (default 20) of the generated
//! journeys trigger on one event type (`offer.eligible`) and define `rank`;
//! one such event starts all of them for one customer, and each is scored
//! as the arbiter scores it (`RuleSet::rank`). Its cost per competing
//! journey (decide + rank) with the 2,003 loaded is compared with the same
//! with 3 competing journeys loaded beside the 3 shipped ones.
//!
//!   cargo bench --bench rules [-- --secs 0.4 --rounds 7 --journeys 2000 --competing 20]
//!   cargo bench --bench rules -- --profile d --iters 400 [--small 1] --timeout-ms 10000   (callgrind)

mod common;

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nudge::context::CustomerContext;
use nudge::event::Event;
use nudge::model::{Decision, InstanceStatus};
use nudge::rules::{self, Limits, RuleSet};
use serde_json::{json, Map, Value};

/// The stage as the pipeline runs it, minus the store.
fn nudge_stage(rules: &RuleSet, bytes: &[u8], customer: &Arc<CustomerContext>) -> usize {
    let event = Arc::new(Event::parse(bytes).expect("valid event"));
    let t = event.event_type.as_str();
    if !(nudge::context::is_context_event(t) || rules.interested_in(t)) {
        return 0;
    }
    let mut n = 0;
    for exit in rules.exited_by(t) {
        black_box(exit);
    }
    for journey in rules.triggered_by(t) {
        let d = rules.decide(journey, &event, customer).expect("decides");
        n += matches!(d, Decision::Start { .. }) as usize;
        black_box(d);
    }
    n
}

/// An event several journeys trigger on for one customer: each decides,
/// and each that starts is scored for arbitration (`rank`, else priority).
fn competing_stage(rules: &RuleSet, bytes: &[u8], customer: &Arc<CustomerContext>) -> usize {
    let event = Arc::new(Event::parse(bytes).expect("valid event"));
    let t = event.event_type.as_str();
    if !(nudge::context::is_context_event(t) || rules.interested_in(t)) {
        return 0;
    }
    let mut n = 0;
    for journey in rules.triggered_by(t) {
        let d = rules.decide(journey, &event, customer).expect("decides");
        if let Decision::Start { vars, .. } = &d {
            black_box(rules.rank(journey, customer, vars).expect("ranks"));
            n += 1;
        }
        black_box(d);
    }
    n
}

/// The same logic written in Rust by hand.
fn native_stage(bytes: &[u8], customer: &Arc<CustomerContext>) -> usize {
    let event = Arc::new(Event::parse(bytes).expect("valid event"));
    let d = match event.event_type.as_str() {
        "recurring_payment.amount_changed" => native_fee_increase(&event),
        "loan_application.completed" => native_unsigned_loan(&event),
        "customer.profile_updated" => native_energy_rebate(customer),
        _ => return 0,
    };
    let n = matches!(d, Decision::Start { .. }) as usize;
    black_box(d);
    n
}

fn money(v: &Value) -> String {
    match v.as_i64() {
        Some(i) => format!("{i}.00"),
        None => format!("{:.2}", v.as_f64().unwrap_or(f64::NAN)),
    }
}

fn field(data: &Map<String, Value>, k: &str) -> Value {
    data.get(k).cloned().unwrap_or(Value::Null)
}

fn native_fee_increase(e: &Event) -> Decision {
    let d = &e.data;
    let (prev, new) = match (d.get("previous_amount"), d.get("new_amount")) {
        (Some(p), Some(n)) if !p.is_null() && !n.is_null() => (p, n),
        _ => return Decision::Skip("amounts missing".into()),
    };
    if new.as_f64() <= prev.as_f64() {
        return Decision::Skip("amount did not go up".into());
    }
    let currency = match d.get("currency") {
        Some(c) if !c.is_null() => c.clone(),
        _ => Value::from("AUD"),
    };
    let merchant = field(d, "merchant");
    let (previous, new) = (money(prev), money(new));
    let mut vars = Map::new();
    vars.insert(
        "message".into(),
        Value::String(format!(
            "Your {} payment went up from ${previous} to ${new}.",
            merchant.as_str().unwrap_or(""),
        )),
    );
    vars.insert("merchant".into(), merchant);
    vars.insert("previous_amount".into(), Value::String(previous));
    vars.insert("new_amount".into(), Value::String(new));
    vars.insert("currency".into(), currency);
    Decision::Start { key: None, vars }
}

fn native_unsigned_loan(e: &Event) -> Decision {
    let d = &e.data;
    if d.get("signed") == Some(&Value::Bool(true)) {
        return Decision::Skip("already signed".into());
    }
    let amount = field(d, "amount");
    let mut vars = Map::new();
    vars.insert("application_id".into(), field(d, "application_id"));
    vars.insert("product".into(), field(d, "product"));
    vars.insert("amount".into(), Value::String(money(&amount)));
    vars.insert("amount_value".into(), amount);
    vars.insert("resume_url".into(), field(d, "resume_url"));
    vars.insert(
        "remaining_steps".into(),
        json!(["review the loan contract", "sign electronically"]),
    );
    Decision::Start { key: None, vars }
}

fn native_energy_rebate(c: &CustomerContext) -> Decision {
    let p = &c.profile;
    if p.get("energy_rebate_enrolled") == Some(&Value::Bool(true))
        || c.has_status("energy_rebate", InstanceStatus::Converted)
    {
        return Decision::Skip("already enrolled".into());
    }
    let state = p.get("state").and_then(Value::as_str).unwrap_or("");
    let status = p.get("residential_status").and_then(Value::as_str);
    let eligible = p.get("concession_card") == Some(&Value::Bool(true))
        && ["NSW", "VIC", "QLD", "SA", "ACT"].contains(&state)
        && matches!(status, Some("owner") | Some("renter"));
    if !eligible {
        return Decision::Skip("not eligible".into());
    }
    let mut vars = Map::new();
    vars.insert("state".into(), field(p, "state"));
    Decision::Start { key: None, vars }
}

/// `n` generated journeys; the first `competing` trigger on
/// `offer.eligible` (the others each on their own type) and define `rank`.
fn generated(n: usize, competing: usize) -> Vec<(PathBuf, String)> {
    (0..n)
        .map(|i| {
            let (trigger, rank) = if i < competing {
                (
                    "offer.eligible".to_string(),
                    format!(
                        "\nfn rank(customer, vars) {{\n    let lever = if customer.has_app {{ 1.0 }} else {{ 0.5 }};\n    vars.value * lever * {w}\n}}\n",
                        w = 0.5 + (i % 10) as f64 / 20.0
                    ),
                )
            } else {
                (format!("generated.event_{i:04}"), String::new())
            };
            let text = format!(
                r#"
fn journey() {{
    #{{
        name: "generated_{i:04}",
        category: "{cat}",
        priority: {prio},
        triggers: ["{trigger}"],
        exits: #{{ "generated.done_{i:04}": "converted" }},
        steps: [
            #{{ id: "push", channel: "push", template: "generated_{i:04}_push", delay: "0s" }},
            #{{ id: "email", channel: "email", template: "generated_{i:04}_email", delay: "{days}d" }},
        ],
    }}
}}

fn decide(event, customer) {{
    let d = event.data;
    if d.amount == () || d.amount < {threshold} {{
        return skip("below threshold");
    }}
    start(#{{ amount: money(d.amount), reference: d.reference, value: d.amount / 100.0 }})
}}
{rank}"#,
                cat = if i % 3 == 0 { "marketing" } else { "service" },
                prio = i % 97,
                days = 1 + i % 7,
                threshold = 100 + i,
            );
            (PathBuf::from(format!("generated/generated_{i:04}.rhai")), text)
        })
        .collect()
}

fn sources_of(dir: &std::path::Path) -> Vec<(PathBuf, String)> {
    let mut v: Vec<(PathBuf, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    v.sort();
    v
}

fn main() {
    let secs: f64 = arg("secs", 0.4);
    let rounds: usize = arg("rounds", 7);
    let n_generated: usize = arg("journeys", 2000);
    let n_competing: usize = arg("competing", 20).min(n_generated);
    let slice = Duration::from_secs_f64(secs);
    println!("machine: {}", machine());

    // `--timeout-ms`: the sandbox's clock (rules.timeout); raise it under
    // callgrind, which runs the scripts some fifty times slower.
    let limits = Limits {
        timeout: Duration::from_millis(arg("timeout-ms", 100)),
        ..Limits::default()
    };
    let real = sources_of(&repo().join("rules"));
    let three = rules::load_sources(real.clone(), &limits).expect("shipped rules compile");
    let mut all = real.clone();
    all.extend(generated(n_generated, n_competing));
    // "The cost of 3": three competing journeys beside the shipped ones.
    let mut small = real.clone();
    small.extend(generated(3, 3));
    let three_competing = rules::load_sources(small, &limits).expect("competing rules compile");
    let load_start = Instant::now();
    let many = rules::load_sources(all, &limits).expect("generated rules compile");
    let load_time = load_start.elapsed();
    assert_eq!(many.journeys().len(), 3 + n_generated);

    let mut customer = CustomerContext::new("c-1001");
    customer.app_installed = true;
    customer.profile =
        json!({"concession_card": true, "state": "NSW", "residential_status": "renter"})
            .as_object()
            .unwrap()
            .clone();
    let customer = Arc::new(customer);

    let ev = |t: &str, data: Value| {
        serde_json::to_vec(&json!({"specversion":"1.0","id":"e-7f3a9c21","type":t,"source":"core-banking","subject":"c-1001","time":"2026-03-02T01:00:00.000Z","data":data})).unwrap()
    };
    let cases: Vec<(&str, &str, Vec<u8>, bool)> = vec![
        (
            "a",
            "untriggered (card.transaction)",
            ev(
                "card.transaction",
                json!({"amount": 42.5, "merchant": "Corner Coffee", "card": "x1234", "channel": "pos"}),
            ),
            false,
        ),
        (
            "b",
            "evaluated, no match (fee decrease)",
            ev(
                "recurring_payment.amount_changed",
                json!({"payment_id": "p-77", "merchant": "StreamFlix", "previous_amount": 18.99, "new_amount": 15.99, "currency": "AUD"}),
            ),
            false,
        ),
        (
            "c1",
            "starts fee_increase",
            ev(
                "recurring_payment.amount_changed",
                json!({"payment_id": "p-77", "merchant": "StreamFlix", "previous_amount": 15.99, "new_amount": 18.99, "currency": "AUD"}),
            ),
            true,
        ),
        (
            "c2",
            "starts unsigned_loan",
            ev(
                "loan_application.completed",
                json!({"application_id": "A-2", "product": "Car loan", "amount": 32000.5, "resume_url": "https://bank.example/resume/A-2", "signed": false}),
            ),
            true,
        ),
    ];

    // Same decisions on both sides, or the comparison is meaningless.
    for (_, what, bytes, starts) in &cases {
        let e = Arc::new(Event::parse(bytes).unwrap());
        let rhai: Vec<Decision> = three
            .triggered_by(&e.event_type)
            .map(|j| three.decide(j, &e, &customer).unwrap())
            .collect();
        let native: Vec<Decision> = match e.event_type.as_str() {
            "recurring_payment.amount_changed" => vec![native_fee_increase(&e)],
            "loan_application.completed" => vec![native_unsigned_loan(&e)],
            _ => vec![],
        };
        assert_eq!(rhai, native, "{what}: rhai and native disagree");
        assert_eq!(nudge_stage(&three, bytes, &customer) > 0, *starts, "{what}");
        assert_eq!(nudge_stage(&many, bytes, &customer) > 0, *starts, "{what}");
    }

    let offer = ev(
        "offer.eligible",
        json!({"amount": 5000, "reference": "R-9"}),
    );
    assert_eq!(competing_stage(&many, &offer, &customer), n_competing);
    assert_eq!(competing_stage(&three_competing, &offer, &customer), 3);

    // `--profile CASE --iters N`: only run nudge's stage on one case (for callgrind).
    let profile: String = arg("profile", String::new());
    if profile == "d" {
        // `--small 1`: the 3 competing journeys instead of the 2,003 loaded.
        let iters: u64 = arg("iters", 20_000);
        let set = if arg("small", 0u8) == 1 {
            &three_competing
        } else {
            &many
        };
        for _ in 0..iters {
            black_box(competing_stage(set, black_box(&offer), &customer));
        }
        return;
    }
    if !profile.is_empty() {
        let iters: u64 = arg("iters", 20_000);
        let (_, _, bytes, _) = cases.iter().find(|c| c.0 == profile).expect("case id");
        for _ in 0..iters {
            black_box(nudge_stage(&three, black_box(bytes), &customer));
        }
        return;
    }

    let mut report = Report::default();
    let batch = 200u64;
    for (id, what, bytes, starts) in &cases {
        // Interleaved rounds, so background load hits all sides alike.
        let (mut native, mut n3, mut n2k) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            native.push(rate(batch, slice, || {
                for _ in 0..batch {
                    black_box(native_stage(black_box(bytes), &customer));
                }
            }));
            n3.push(rate(batch, slice, || {
                for _ in 0..batch {
                    black_box(nudge_stage(&three, black_box(bytes), &customer));
                }
            }));
            n2k.push(rate(batch, slice, || {
                for _ in 0..batch {
                    black_box(nudge_stage(&many, black_box(bytes), &customer));
                }
            }));
        }
        let ratios: Vec<f64> = native.iter().zip(&n3).map(|(n, r)| n / r).collect();
        let ratios_2k: Vec<f64> = n3.iter().zip(&n2k).map(|(a, b)| a / b).collect();
        let (native, n3, n2k) = (median(native), median(n3), median(n2k));
        let ratio = median(ratios);
        let ratio_2k = median(ratios_2k);
        let limit = if *starts { 3.0 } else { 1.5 };
        report.ratio(
            "1 rules",
            &format!("({id}) {what}: cost vs native"),
            format!("{} ({:.2} µs)", fmt_rate(n3), 1e6 / n3),
            format!("native {} ({:.2} µs)", fmt_rate(native), 1e6 / native),
            ratio,
            &format!("≤ {limit}×"),
            Some(ratio <= limit),
        );
        report.ratio(
            "1 rules",
            &format!("({id}) {}+3 journeys vs 3", n_generated),
            format!("{} ({:.2} µs)", fmt_rate(n2k), 1e6 / n2k),
            format!("3 journeys {}", fmt_rate(n3)),
            ratio_2k,
            "≤ 1.5×",
            Some(ratio_2k <= 1.5),
        );
    }
    // (d) competition: per competing journey (decide + rank), 2,003 loaded
    // with `n_competing` competing against 6 loaded with 3 competing.
    {
        let (mut small, mut large) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            small.push(rate(batch, slice, || {
                for _ in 0..batch {
                    black_box(competing_stage(
                        &three_competing,
                        black_box(&offer),
                        &customer,
                    ));
                }
            }));
            large.push(rate(batch, slice, || {
                for _ in 0..batch {
                    black_box(competing_stage(&many, black_box(&offer), &customer));
                }
            }));
        }
        // Rates are events/s; per competing journey: events/s × journeys.
        let per_journey: Vec<f64> = small
            .iter()
            .zip(&large)
            .map(|(s, l)| (l * n_competing as f64) / (s * 3.0))
            .collect();
        let ratio = 1.0 / median(per_journey);
        let (small, large) = (median(small), median(large));
        report.ratio(
            "1 rules",
            &format!(
                "(d) {n_competing} of {} loaded compete for one customer: per competing journey (decide + rank)",
                n_generated + 3
            ),
            format!("{:.2} µs per journey ({:.2} µs per event)", 1e6 / (large * n_competing as f64), 1e6 / large),
            format!("3 competing of 6 loaded: {:.2} µs per journey ({:.2} µs per event)", 1e6 / (small * 3.0), 1e6 / small),
            ratio,
            "≤ 1.5×",
            Some(ratio <= 1.5),
        );
    }
    // A generated journey's own trigger, for context.
    let gen_event = ev(
        "generated.event_1234",
        json!({"amount": 5000, "reference": "R-1"}),
    );
    let g = median(
        (0..rounds)
            .map(|_| {
                rate(batch, slice, || {
                    for _ in 0..batch {
                        black_box(nudge_stage(&many, black_box(&gen_event), &customer));
                    }
                })
            })
            .collect(),
    );
    report.info(
        "1 rules",
        &format!("a generated journey starting, {} loaded", n_generated + 3),
        format!("{} ({:.2} µs)", fmt_rate(g), 1e6 / g),
    );
    let parse = median(
        (0..rounds)
            .map(|_| {
                rate(batch, slice, || {
                    for _ in 0..batch {
                        black_box(Event::parse(black_box(&cases[0].2)).unwrap());
                    }
                })
            })
            .collect(),
    );
    report.info(
        "1 rules",
        "Event::parse alone (event a, 180 B)",
        format!("{} ({:.2} µs)", fmt_rate(parse), 1e6 / parse),
    );
    report.info(
        "1 rules",
        &format!("compile {} journeys", n_generated + 3),
        format!("{:.2} s", load_time.as_secs_f64()),
    );
    report.finish("Benchmark 1: rules stage, one core");
}
