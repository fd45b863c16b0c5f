//! The review's queries against every store (`review_suite!` runs each
//! test on SQLite and on PostgreSQL), on a generated log of 100,000 records
//! whose every count the generator knows independently of the store.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map};

use super::funnel::{funnels, reason_group, Z95};
use super::log::{page, LogStream};
use super::record::{decision_record, Kind};
use super::{LogCursor, LogFilter, ReviewRead};
use crate::context::CustomerContext;
use crate::model::{Category, ChannelKind, InstanceStatus, LogRecord, Mode, Outcome};
use crate::store::review::{ArmCount, OutcomeCount};
use crate::store::{NewInstance, NewStep, StepResult, Store};

/// Records the generated log holds at least.
const RECORDS: usize = 100_000;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-02T00:00:00Z")
        .unwrap()
        .to_utc()
}

/// One generated instance and everything logged about it.
pub(crate) struct GenInstance {
    id: String,
    customer: String,
    journey: &'static str,
    mode: Mode,
    rule_hash: &'static str,
    started_at: DateTime<Utc>,
    converted: bool,
}

/// What was written, as the generator made it.
pub(crate) struct Generated {
    instances: Vec<GenInstance>,
    records: Vec<LogRecord>,
    /// A customer with a context (contact details) and several instances.
    known_customer: String,
}

const LOAN_STEPS: [(&str, ChannelKind); 3] = [
    ("push", ChannelKind::Push),
    ("email", ChannelKind::Email),
    ("call", ChannelKind::CallTask),
];
const FEE_STEPS: [(&str, ChannelKind); 1] = [("alert", ChannelKind::Push)];

fn steps_of(journey: &str) -> &'static [(&'static str, ChannelKind)] {
    match journey {
        "loan" => &LOAN_STEPS,
        _ => &FEE_STEPS,
    }
}

/// Writes instances and a log of at least [`RECORDS`] records: live
/// instances get each step sent, retried then sent, failed, suppressed,
/// expired or deferred then sent, and some convert (the steps left logged
/// `converted`); held-out ones log `held_out` per step and convert less
/// often; a few cooldown refusals have no instance. Times are whole seconds
/// and many records share one (the keyset's tie-break), and records are
/// written out of time order (the log's order is by time, not seq).
pub(crate) fn generate(store: &dyn Store) -> Generated {
    let mut rng = StdRng::seed_from_u64(14);
    let mut instances = Vec::new();
    let mut records: Vec<LogRecord> = Vec::new();
    let mut i = 0usize;
    // Control group per (customer, journey), as the engine's stable hash draws it.
    let mut arm: HashMap<(String, &str), Mode> = HashMap::new();
    while records.len() < RECORDS {
        let customer = format!("c{:05}", rng.gen_range(0..9_000));
        let journey = if rng.gen_bool(0.7) { "loan" } else { "fee" };
        let mode = *arm.entry((customer.clone(), journey)).or_insert_with(|| {
            match rng.gen_range(0..100) {
                0..20 => Mode::HeldOut,
                20..22 => Mode::Shadow,
                _ => Mode::Live,
            }
        });
        // Starts spread over 30 days, in whole minutes (many share one).
        let started_at = t0() + Duration::minutes(rng.gen_range(0..30 * 24 * 60));
        let rule_hash = if started_at < t0() + Duration::days(15) {
            "hash-a"
        } else {
            "hash-b"
        };
        let id = format!("{journey}-{i:06}");
        i += 1;
        let convert_p = match (mode, rule_hash) {
            (Mode::Live, "hash-a") => 0.30,
            (Mode::Live, _) => 0.40,
            _ => 0.20,
        };
        let converted = rng.gen_bool(convert_p);
        // The step after which the exit event arrives (steps.len(): after all).
        let steps = steps_of(journey);
        let exit_after = rng.gen_range(0..=steps.len());
        let record = |step: &str, channel: &str, time, outcome, reason: String, attempt| {
            let mut r = LogRecord::about(
                crate::model::StepRef {
                    customer: &customer,
                    journey,
                    instance: &id,
                    step,
                    channel,
                    template: &format!("{journey}_{step}"),
                    rule_hash,
                },
                time,
                outcome,
                reason,
            );
            r.attempt = attempt;
            r
        };
        for (k, (step, channel)) in steps.iter().enumerate() {
            let due = started_at + Duration::hours(k as i64 * 24);
            let channel = channel.as_str();
            if converted && k >= exit_after {
                let at =
                    started_at + Duration::hours(exit_after as i64 * 24 - 12).max(Duration::zero());
                let mut r = record(
                    step,
                    channel,
                    at,
                    Outcome::Converted,
                    format!("{journey}.done ended the journey; step not sent"),
                    0,
                );
                r.event_id = Some(format!("exit-{id}"));
                records.push(r);
                continue;
            }
            match mode {
                Mode::HeldOut => records.push(record(
                    step,
                    channel,
                    due,
                    Outcome::HeldOut,
                    "control group: not sent, to measure the journey's effect".into(),
                    1,
                )),
                Mode::Shadow => records.push(record(
                    step,
                    channel,
                    due,
                    Outcome::Shadow,
                    "shadow mode: would send".into(),
                    1,
                )),
                Mode::Live => match rng.gen_range(0..100) {
                    0..55 => {
                        let mut r = record(
                            step,
                            channel,
                            due,
                            Outcome::Sent,
                            format!("step {step} of {journey}"),
                            1,
                        );
                        r.latency_ms = Some(rng.gen_range(0..2_000));
                        records.push(r);
                    }
                    55..65 => {
                        records.push(record(
                            step,
                            channel,
                            due,
                            Outcome::Retrying,
                            "503 Service Unavailable; attempt 1 of 5, next in 2s".into(),
                            1,
                        ));
                        let mut r = record(
                            step,
                            channel,
                            due + Duration::seconds(2),
                            Outcome::Sent,
                            format!("step {step} of {journey}"),
                            2,
                        );
                        r.latency_ms = Some(2_000);
                        records.push(r);
                    }
                    65..70 => records.push(record(
                        step,
                        channel,
                        due,
                        Outcome::Failed,
                        "400 Bad Request".into(),
                        1,
                    )),
                    70..80 => records.push(record(
                        step,
                        channel,
                        due,
                        Outcome::Suppressed,
                        format!("no marketing consent for {channel}"),
                        1,
                    )),
                    80..85 => records.push(record(
                        step,
                        channel,
                        due,
                        Outcome::Suppressed,
                        "frequency cap: 3 messages within 7d".into(),
                        1,
                    )),
                    85..92 => records.push(record(
                        step,
                        channel,
                        due + Duration::hours(2),
                        Outcome::Expired,
                        format!(
                            "due {}h ago, past the {channel} lateness bound of 1h",
                            rng.gen_range(2..9)
                        ),
                        1,
                    )),
                    _ => {
                        let until = due + Duration::hours(8);
                        records.push(record(
                            step,
                            channel,
                            due,
                            Outcome::Deferred,
                            format!(
                                "quiet hours 21:00-08:00 in Australia/Sydney; until {}",
                                until.to_rfc3339()
                            ),
                            1,
                        ));
                        records.push(record(
                            step,
                            channel,
                            until,
                            Outcome::Sent,
                            format!("step {step} of {journey}"),
                            2,
                        ));
                    }
                },
            }
        }
        if converted && exit_after == steps.len() {
            let mut r = record(
                "-",
                "-",
                started_at + Duration::hours(steps.len() as i64 * 24),
                Outcome::Converted,
                format!("{journey}.done ended the journey after all steps"),
                0,
            );
            r.event_id = Some(format!("exit-{id}"));
            records.push(r);
        }
        // Now and then a cooldown refusal, with no instance behind it.
        if rng.gen_range(0..50) == 0 {
            let mut r = record(
                steps[0].0,
                steps[0].1.as_str(),
                started_at,
                Outcome::Suppressed,
                format!("cooldown: {journey} ended within 90d"),
                0,
            );
            r.instance = format!("{id}-cooldown");
            r.event_id = Some(format!("again-{id}"));
            records.push(r);
        }
        instances.push(GenInstance {
            id,
            customer,
            journey,
            mode,
            rule_hash,
            started_at,
            converted,
        });
    }
    let known_customer = instances
        .iter()
        .filter(|g| g.converted && g.mode == Mode::Live && g.journey == "loan")
        .map(|g| g.customer.clone())
        .next()
        .expect("a converted loan customer");

    // Instances with their plans (due far ahead: nothing is claimed).
    let mut tx = store.begin().unwrap();
    for g in &instances {
        let plan: Vec<NewStep> = steps_of(g.journey)
            .iter()
            .enumerate()
            .map(|(k, (step, channel))| NewStep {
                step: step.to_string(),
                seq: k as u32,
                channel: *channel,
                template: format!("{}_{step}", g.journey),
                condition: None,
                due_at: t0() + Duration::days(3650),
            })
            .collect();
        let instance = NewInstance {
            id: g.id.clone(),
            customer: g.customer.clone(),
            journey: g.journey.into(),
            key: g.id.clone(),
            mode: g.mode,
            category: Category::Service,
            started_at: g.started_at,
            rule_hash: g.rule_hash.into(),
            trigger_event: format!("start-{}", g.id),
            vars: Map::from_iter([("contact".to_string(), json!("alice@example.com"))]),
            decision_inputs: json!({
                "event": {"id": format!("start-{}", g.id), "type": format!("{}.started", g.journey), "time": g.started_at},
                "customer": {"has_email": true},
            }),
        };
        tx.start_instance(&instance, &plan).unwrap();
    }
    let mut context = CustomerContext::new(&known_customer);
    context.email = Some("alice@example.com".into());
    context.phone = Some("+61400000001".into());
    context.timezone = Some("Australia/Sydney".into());
    tx.save_customer(&context, t0()).unwrap();
    tx.commit().unwrap();
    // The log in batches, as the scheduler writes it.
    for chunk in records.chunks(5_000) {
        let results: Vec<StepResult> = chunk
            .iter()
            .map(|r| StepResult {
                record: r.clone(),
                again_at: None,
                replan: false,
                claimed_row: None,
                withdraw_if_ended: false,
            })
            .collect();
        store.settle_steps(&results).unwrap();
    }
    let mut tx = store.begin().unwrap();
    for g in instances.iter().filter(|g| g.converted) {
        tx.close_instance(
            &g.id,
            InstanceStatus::Converted,
            g.started_at + Duration::days(5),
        )
        .unwrap();
    }
    tx.commit().unwrap();
    Generated {
        instances,
        records,
        known_customer,
    }
}

/// Every record the store holds, read in seq order (the plain full scan).
fn full_scan(store: &dyn Store) -> Vec<LogRecord> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(0, |r: &LogRecord| r.seq);
        let page = store.log_after(after, 10_000).unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// The review's order: newest first by (time, seq).
fn review_order(mut records: Vec<LogRecord>) -> Vec<LogRecord> {
    records.sort_by_key(|r| std::cmp::Reverse(LogCursor::of(r)));
    records
}

pub fn filters_and_keyset_pages_match_a_full_scan(w: &dyn Store, r: &dyn ReviewRead) {
    let g = generate(w);
    let all = full_scan(w);
    assert_eq!(all.len(), g.records.len());
    assert!(all.len() >= RECORDS);
    let mid = t0() + Duration::days(10);
    let filters = [
        LogFilter::default(),
        LogFilter {
            journey: Some("loan".into()),
            ..LogFilter::default()
        },
        LogFilter {
            step: Some("email".into()),
            ..LogFilter::default()
        },
        LogFilter {
            channel: Some("call_task".into()),
            ..LogFilter::default()
        },
        LogFilter {
            outcome: Some(Outcome::Failed),
            ..LogFilter::default()
        },
        LogFilter {
            customer: Some(g.known_customer.clone()),
            ..LogFilter::default()
        },
        LogFilter {
            since: Some(mid),
            until: Some(mid + Duration::days(2)),
            ..LogFilter::default()
        },
        LogFilter {
            journey: Some("fee".into()),
            outcome: Some(Outcome::Sent),
            since: Some(mid),
            ..LogFilter::default()
        },
        LogFilter {
            journey: Some("nope".into()),
            ..LogFilter::default()
        },
    ];
    for filter in &filters {
        // What the generator wrote that passes (independent of the store).
        let generated = g.records.iter().filter(|x| filter.matches(x)).count();
        let expected = review_order(all.iter().filter(|x| filter.matches(x)).cloned().collect());
        assert_eq!(expected.len(), generated, "{filter:?}");
        // Streamed in pages of an odd size, so that pages end inside runs of equal times.
        let streamed: Vec<LogRecord> = LogStream::with_page_size(r, filter.clone(), None, 997)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(streamed.len(), expected.len(), "{filter:?}");
        assert!(
            streamed == expected,
            "{filter:?}: paged rows differ from the full scan"
        );
    }
    // Equal times exist across page boundaries (the tie-break is exercised).
    let times: BTreeSet<_> = all.iter().map(|x| x.time).collect();
    assert!(times.len() < all.len() / 2, "many records share a time");
    // A limit stops the stream; `page` hands out cursors until the last page.
    let limited: Vec<_> = LogStream::with_page_size(r, LogFilter::default(), Some(2_500), 1_000)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(limited.len(), 2_500);
    let filter = &filters[1];
    let expected = review_order(all.iter().filter(|x| filter.matches(x)).cloned().collect());
    let (mut after, mut seen, mut pages) = (None, Vec::new(), 0);
    loop {
        let p = page(r, filter, after, 1_000).unwrap();
        pages += 1;
        seen.extend(p.records.iter().map(|x| x.seq));
        match p.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, expected.len().div_ceil(1_000));
    assert_eq!(seen, expected.iter().map(|x| x.seq).collect::<Vec<_>>());
}

pub fn funnel_and_uplift_match_the_generated_counts(w: &dyn Store, r: &dyn ReviewRead) {
    let g = generate(w);
    let report = funnels(r, None).unwrap();
    assert_eq!(
        report.log_reaches_back_to,
        g.records.iter().map(|x| x.time).min()
    );
    let names: Vec<&str> = report.journeys.iter().map(|f| f.journey.as_str()).collect();
    assert_eq!(names, vec!["fee", "loan"]);
    for f in &report.journeys {
        let j = f.journey.as_str();
        let of = |mode: Mode| {
            g.instances
                .iter()
                .filter(move |x| x.journey == j && x.mode == mode)
        };
        assert_eq!(f.started, of(Mode::Live).count() as u64, "{j}");
        assert_eq!(
            f.converted,
            of(Mode::Live).filter(|x| x.converted).count() as u64,
            "{j}"
        );
        assert_eq!(f.held_out_instances, of(Mode::HeldOut).count() as u64);
        assert_eq!(f.shadow_instances, of(Mode::Shadow).count() as u64);
        let step_names: Vec<&str> = f.steps.iter().map(|s| s.step.as_str()).collect();
        let plan: Vec<&str> = steps_of(j).iter().map(|s| s.0).collect();
        assert_eq!(step_names, plan, "steps in plan order");
        let mut previous = f.started;
        for s in &f.steps {
            let records = g
                .records
                .iter()
                .filter(|x| x.journey == j && x.step == s.step);
            let sent = records
                .clone()
                .filter(|x| x.outcome == Outcome::Sent)
                .count() as u64;
            assert_eq!(s.sent, sent, "{j}/{}", s.step);
            assert_eq!(s.of_started, Some(sent as f64 / f.started as f64));
            assert_eq!(s.of_previous, Some(sent as f64 / previous as f64));
            previous = sent;
            let mut reasons: BTreeMap<(&str, String), u64> = BTreeMap::new();
            for x in records.filter(|x| {
                !matches!(
                    x.outcome,
                    Outcome::Sent
                        | Outcome::Retrying
                        | Outcome::Deferred
                        | Outcome::HeldOut
                        | Outcome::Shadow
                )
            }) {
                *reasons
                    .entry((x.outcome.as_str(), reason_group(&x.reason)))
                    .or_default() += 1;
            }
            let got: BTreeMap<(&str, String), u64> = s
                .not_sent
                .iter()
                .map(|n| ((n.outcome.as_str(), n.reason.clone()), n.count))
                .collect();
            assert_eq!(got, reasons, "{j}/{}", s.step);
            // Expiries of every lateness count as one reason.
            assert!(got.keys().any(|k| k.1.starts_with("past the ")), "{got:?}");
        }
        // Uplift in customers: a customer is in an arm if any instance is,
        // converted if any such instance converted.
        let arm = |mode: Mode| {
            let mut customers: BTreeMap<&str, bool> = BTreeMap::new();
            for x in of(mode) {
                *customers.entry(&x.customer).or_default() |= x.converted;
            }
            (
                customers.values().filter(|c| **c).count() as u64,
                customers.len() as u64,
            )
        };
        let (xt, nt) = arm(Mode::Live);
        let (xc, nc) = arm(Mode::HeldOut);
        assert_eq!(
            (f.uplift.treated.converted, f.uplift.treated.customers),
            (xt, nt)
        );
        assert_eq!(
            (f.uplift.held_out.converted, f.uplift.held_out.customers),
            (xc, nc)
        );
        // The interval by hand: d ± z·sqrt(pt(1-pt)/nt + pc(1-pc)/nc).
        let (pt, pc) = (xt as f64 / nt as f64, xc as f64 / nc as f64);
        let se = (pt * (1.0 - pt) / nt as f64 + pc * (1.0 - pc) / nc as f64).sqrt();
        let (lo, hi) = f.uplift.ci95.unwrap();
        assert!((f.uplift.difference.unwrap() - (pt - pc)).abs() < 1e-12);
        assert!((lo - (pt - pc - 1.96 * se)).abs() < 1e-4, "{lo}");
        assert!((hi - (pt - pc + 1.96 * se)).abs() < 1e-4, "{hi}");
        assert!((hi - lo - 2.0 * Z95 * se).abs() < 1e-12);
        assert!(f.uplift.reliable);
        // The generator converts live customers more often: the whole
        // interval lies above zero at these sizes.
        assert!(lo > 0.0, "{:?}", f.uplift);
        // Per script version: the same split, hash-b converting more.
        let hashes: Vec<&str> = f
            .by_rule_version
            .iter()
            .map(|v| v.rule_hash.as_str())
            .collect();
        assert_eq!(hashes, vec!["hash-a", "hash-b"]);
        for v in &f.by_rule_version {
            let of_v = |mode: Mode| {
                let mut customers: BTreeMap<&str, bool> = BTreeMap::new();
                for x in of(mode).filter(|x| x.rule_hash == v.rule_hash) {
                    *customers.entry(&x.customer).or_default() |= x.converted;
                }
                (
                    customers.values().filter(|c| **c).count() as u64,
                    customers.len() as u64,
                )
            };
            assert_eq!(
                (v.uplift.treated.converted, v.uplift.treated.customers),
                of_v(Mode::Live)
            );
            assert_eq!(
                (v.uplift.held_out.converted, v.uplift.held_out.customers),
                of_v(Mode::HeldOut)
            );
            let live = of(Mode::Live).filter(|x| x.rule_hash == v.rule_hash);
            assert_eq!(v.started, live.clone().count() as u64);
            assert_eq!(v.converted, live.filter(|x| x.converted).count() as u64);
        }
        assert!(
            f.by_rule_version[1].uplift.difference > f.by_rule_version[0].uplift.difference,
            "{:?}",
            f.by_rule_version
        );
    }
    // One journey asked for: the same figures for it alone.
    let loan = funnels(r, Some("loan")).unwrap();
    assert_eq!(loan.journeys.len(), 1);
    let all_loan = report
        .journeys
        .iter()
        .find(|f| f.journey == "loan")
        .unwrap();
    assert_eq!(loan.journeys[0].started, all_loan.started);
    assert_eq!(loan.journeys[0].uplift, all_loan.uplift);
    assert!(funnels(r, Some("nope")).unwrap().journeys.is_empty());

    // A withdrawal planned at an exit is no step of the funnel, though the
    // funnel's plan is read from the latest instance's steps.
    let latest = g.instances.iter().map(|x| x.started_at).max().unwrap() + Duration::days(1);
    let mut tx = w.begin().unwrap();
    tx.start_instance(
        &crate::store::NewInstance {
            id: "latest-loan".into(),
            customer: "c-latest".into(),
            journey: "loan".into(),
            key: "k".into(),
            mode: Mode::Live,
            category: crate::model::Category::Service,
            started_at: latest,
            rule_hash: "hash-b".into(),
            trigger_event: "e-latest".into(),
            vars: Default::default(),
            decision_inputs: serde_json::json!({}),
        },
        &steps_of("loan")
            .iter()
            .enumerate()
            .map(|(seq, (step, channel))| crate::store::NewStep {
                step: step.to_string(),
                seq: seq as u32,
                channel: *channel,
                template: "t".into(),
                condition: None,
                due_at: latest,
            })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    tx.commit().unwrap();
    let claimed = w
        .claim_due(
            ChannelKind::Push,
            latest,
            100_000,
            latest + Duration::minutes(5),
        )
        .unwrap();
    let push = claimed
        .iter()
        .find(|d| d.instance_id == "latest-loan")
        .unwrap();
    let mut record = LogRecord::about(push.subject(), latest, Outcome::Sent, "sent");
    record.attempt = 1;
    w.finish_step(&crate::store::StepResult {
        record,
        again_at: None,
        replan: false,
        claimed_row: Some(push.row),
        withdraw_if_ended: false,
    })
    .unwrap();
    let mut tx = w.begin().unwrap();
    let withdrawn = tx
        .plan_withdrawals("latest-loan", &[ChannelKind::Push], latest)
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(withdrawn, ["push"]);
    let steps: Vec<String> = funnels(r, Some("loan")).unwrap().journeys[0]
        .steps
        .iter()
        .map(|s| s.step.clone())
        .collect();
    let plan: Vec<&str> = steps_of("loan").iter().map(|s| s.0).collect();
    assert_eq!(steps, plan);
}

pub fn a_customers_record_is_in_time_order_and_masked(w: &dyn Store, r: &dyn ReviewRead) {
    let g = generate(w);
    let c = g.known_customer.as_str();
    let record = decision_record(r, c, false).unwrap();
    let mine: Vec<&GenInstance> = g.instances.iter().filter(|x| x.customer == c).collect();
    let logged: Vec<&LogRecord> = g.records.iter().filter(|x| x.customer == c).collect();
    let count = |k: Kind| record.entries.iter().filter(|e| e.kind == k).count();
    assert_eq!(count(Kind::Decision), mine.len());
    assert_eq!(
        count(Kind::Verdict) + count(Kind::Attempt) + count(Kind::Exit),
        logged.len()
    );
    // Every trigger and exit event once.
    let mut events: BTreeSet<String> = mine.iter().map(|x| format!("start-{}", x.id)).collect();
    events.extend(logged.iter().filter_map(|x| x.event_id.clone()));
    let shown: BTreeSet<String> = record
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Event)
        .map(|e| e.event_id.clone().unwrap())
        .collect();
    assert_eq!(shown, events);
    assert!(
        record.entries.windows(2).all(|p| p[0].time <= p[1].time),
        "time order"
    );
    // Each decision carries its script hash and what the script saw.
    for x in &mine {
        let d = record
            .entries
            .iter()
            .find(|e| e.kind == Kind::Decision && e.instance.as_deref() == Some(&x.id))
            .unwrap();
        assert_eq!(d.rule_hash.as_deref(), Some(x.rule_hash));
        assert_eq!(d.time, x.started_at);
        assert_eq!(
            d.inputs.as_ref().unwrap()["event"]["id"],
            format!("start-{}", x.id)
        );
        assert_eq!(d.variables.as_ref().unwrap()["contact"], "a***@example.com");
    }
    let contact = record.contact.as_ref().unwrap();
    assert_eq!(contact.email.as_deref(), Some("a***@example.com"));
    assert_eq!(contact.phone.as_deref(), Some("+*********01"));
    let text = super::record::to_text(&record);
    assert!(!text.contains("alice@"), "{text}");
    assert!(text.contains("not recorded"), "{text}");
    let open = decision_record(r, c, true).unwrap();
    assert_eq!(
        open.contact.unwrap().email.as_deref(),
        Some("alice@example.com")
    );
    // A customer the store never saw has an empty record, not an error.
    let nobody = decision_record(r, "nobody", false).unwrap();
    assert!(nobody.entries.is_empty() && nobody.contact.is_none());

    // Control changes to one of the customer's journeys before its first
    // entry: the last of them (the setting in force then) is shown, the one
    // it replaced is not; one to another journey neither.
    let first = record.entries.first().unwrap().time;
    let other = ["fee", "loan", "rebate"]
        .into_iter()
        .find(|j| mine.iter().all(|x| x.journey != *j))
        .expect("a journey the customer never had");
    for (journey, minutes, pilot) in [
        (mine[0].journey, 120, 50),
        (mine[0].journey, 60, 0),
        (other, 30, 10),
    ] {
        let edit = move |_: &Map<String, serde_json::Value>| crate::store::control::ControlEdit {
            settings: Map::from_iter([("pilot_percent".to_string(), json!(pilot))]),
            before: json!({"pilot_percent": 100}),
            after: json!({"pilot_percent": pilot}),
        };
        w.change_control(&crate::store::control::ControlChange {
            kind: crate::control::JOURNEY,
            target: journey,
            who: "admin",
            at: first - Duration::minutes(minutes),
            edit: &edit,
        })
        .unwrap();
    }
    let with_control = decision_record(r, c, false).unwrap();
    let shown: Vec<(Option<String>, serde_json::Value)> = with_control
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Control)
        .map(|e| (e.journey.clone(), e.control.as_ref().unwrap().after.clone()))
        .collect();
    assert_eq!(
        shown,
        vec![(
            Some(mine[0].journey.to_string()),
            json!({"pilot_percent": 0})
        )]
    );

    // An event read well after its own time says when it was read: what it
    // caused is listed then, not at the event's time.
    let time = first - Duration::hours(3);
    let mut tx = w.begin().unwrap();
    tx.record_event(&crate::store::ReceivedEvent {
        event_id: "late-\u{1b}[2J1".into(),
        customer: "late-reader".into(),
        event_type: "loan_application.signed".into(),
        event_time: time,
        received_at: time + Duration::milliseconds(17_400),
        context_updated: false,
        not_started: Vec::new(),
        refused: None,
        ended_nothing: Vec::new(),
    })
    .unwrap();
    tx.commit().unwrap();
    let late = decision_record(r, "late-reader", false).unwrap();
    let event = &late.entries[0];
    assert_eq!((event.kind, event.time), (Kind::Event, time));
    assert_eq!(
        event.received_at,
        Some(time + Duration::milliseconds(17_400))
    );
    assert!(
        event.text.contains("read by nudge at") && event.text.contains("17.4s after its time"),
        "{}",
        event.text
    );
    // An id holding an escape sequence is shown escaped in the text.
    let text = super::record::to_text(&late);
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert!(text.contains("late-\\u{1b}[2J1"), "{text}");

    // Events of one time are listed in the order nudge read them, whatever
    // their ids; a refused one says why.
    let mut tx = w.begin().unwrap();
    for (id, refused) in [
        ("z-applied", None),
        (
            "a-refused",
            Some("invalid customer update: app_installed must be a boolean"),
        ),
    ] {
        tx.record_event(&crate::store::ReceivedEvent {
            event_id: id.into(),
            customer: "same-time".into(),
            event_type: "customer.contact_updated".into(),
            event_time: time,
            received_at: time,
            context_updated: refused.is_none(),
            not_started: Vec::new(),
            refused: refused.map(String::from),
            ended_nothing: Vec::new(),
        })
        .unwrap();
    }
    tx.commit().unwrap();
    let same = decision_record(r, "same-time", false).unwrap();
    let ids: Vec<&str> = same
        .entries
        .iter()
        .filter_map(|e| e.event_id.as_deref())
        .collect();
    assert_eq!(ids, ["z-applied", "a-refused"]);
    assert!(same.entries[1].text.contains("refused and dead-lettered"));
    assert!(same.entries[1].refused.is_some());
}

/// The counts the store keeps, sorted, and the same counted from the rows
/// it holds (its instances read per customer, its log by a full scan).
type Counts = (Vec<ArmCount>, Vec<ArmCount>, Vec<OutcomeCount>);

fn sorted_counts(r: &dyn ReviewRead, journey: Option<&str>) -> Counts {
    let key = |a: &ArmCount| (a.journey.clone(), a.rule_hash.clone(), a.mode.as_str());
    let mut arms = r.arms(journey, false).unwrap();
    arms.sort_by_key(key);
    let mut versions = r.arms(journey, true).unwrap();
    versions.sort_by_key(key);
    let mut outcomes = r.outcome_counts(journey).unwrap();
    outcomes.sort_by_key(|c| {
        (
            c.journey.clone(),
            c.step.clone(),
            c.outcome.as_str(),
            c.reason.clone(),
        )
    });
    (arms, versions, outcomes)
}

fn counted_from_rows(
    w: &dyn Store,
    r: &dyn ReviewRead,
    customers: &BTreeSet<String>,
    journey: Option<&str>,
) -> Counts {
    let wanted = |j: &str| journey.is_none_or(|want| want == j);
    let mut instances = Vec::new();
    for c in customers {
        instances.extend(r.customer_instances(c).unwrap().into_iter().map(|i| (c, i)));
    }
    let arms = |by_rule: bool| -> Vec<ArmCount> {
        type Acc = (
            u64,
            u64,
            BTreeSet<String>,
            BTreeSet<String>,
            DateTime<Utc>,
            DateTime<Utc>,
        );
        let mut acc: BTreeMap<(String, Option<String>, &'static str), (Mode, Acc)> =
            BTreeMap::new();
        for (customer, i) in instances.iter().filter(|(_, i)| wanted(&i.journey)) {
            let hash = by_rule.then(|| i.rule_hash.clone());
            let (_, a) = acc
                .entry((i.journey.clone(), hash, i.mode.as_str()))
                .or_insert((
                    i.mode,
                    (
                        0,
                        0,
                        BTreeSet::new(),
                        BTreeSet::new(),
                        i.started_at,
                        i.started_at,
                    ),
                ));
            let converted = i.status == InstanceStatus::Converted;
            a.0 += 1;
            a.1 += converted as u64;
            a.2.insert(customer.to_string());
            if converted {
                a.3.insert(customer.to_string());
            }
            a.4 = a.4.min(i.started_at);
            a.5 = a.5.max(i.started_at);
        }
        acc.into_iter()
            .map(|((journey, rule_hash, _), (mode, a))| ArmCount {
                journey,
                rule_hash,
                mode,
                instances: a.0,
                converted_instances: a.1,
                customers: a.2.len() as u64,
                converted_customers: a.3.len() as u64,
                first_started: a.4,
                last_started: a.5,
            })
            .collect()
    };
    let mut outcomes: BTreeMap<(String, String, &'static str, String), (Outcome, u64)> =
        BTreeMap::new();
    for x in full_scan(w).iter().filter(|x| {
        wanted(&x.journey) && !matches!(x.outcome, Outcome::Retrying | Outcome::Deferred)
    }) {
        outcomes
            .entry((
                x.journey.clone(),
                x.step.clone(),
                x.outcome.as_str(),
                x.reason.clone(),
            ))
            .or_insert((x.outcome, 0))
            .1 += 1;
    }
    let outcomes = outcomes
        .into_iter()
        .map(
            |((journey, step, _, reason), (outcome, count))| OutcomeCount {
                journey,
                step,
                outcome,
                reason,
                count,
            },
        )
        .collect();
    (arms(false), arms(true), outcomes)
}

/// The funnel's counts, which the stores keep as rows are written rather
/// than count at read time, are what the rows there are add up to: after
/// starts and logging, conversions, cancellations, and a retention purge
/// that deletes ended instances (the oldest starts among them) and old
/// records.
pub fn counts_follow_starts_conversions_and_retention(w: &dyn Store, r: &dyn ReviewRead) {
    let g = generate(w);
    let customers: BTreeSet<String> = g.instances.iter().map(|x| x.customer.clone()).collect();
    let check = |when: &str| {
        for journey in [None, Some("loan"), Some("fee")] {
            assert_eq!(
                sorted_counts(r, journey),
                counted_from_rows(w, r, &customers, journey),
                "{when}, {journey:?}"
            );
        }
    };
    // Before and after the records are folded into the kept counts (a
    // store that folds reads the rest from the log itself), and a second
    // fold finds nothing new.
    check("generated, not folded");
    w.fold_review_counts().unwrap();
    check("generated, folded");
    assert_eq!(w.fold_review_counts().unwrap(), 0);
    // The open instances of the first 10 days end: half without
    // converting, half converting late (a customer's second conversion in
    // an arm is not a second customer). Later ones stay open.
    let mut tx = w.begin().unwrap();
    let early = |x: &&GenInstance| !x.converted && x.started_at < t0() + Duration::days(10);
    for (k, x) in g.instances.iter().filter(early).enumerate() {
        let (status, at) = match k % 2 {
            0 => (InstanceStatus::Cancelled, x.started_at + Duration::days(1)),
            _ => (InstanceStatus::Converted, x.started_at + Duration::days(2)),
        };
        tx.close_instance(&x.id, status, at).unwrap();
    }
    tx.commit().unwrap();
    check("ended");
    // Old records logged after the fold mark: a purge deletes them before
    // they are folded, and the counts follow.
    let late: Vec<StepResult> = g
        .records
        .iter()
        .filter(|x| x.time < t0() + Duration::days(5))
        .take(50)
        .map(|x| StepResult {
            record: x.clone(),
            again_at: None,
            replan: false,
            claimed_row: None,
            withdraw_if_ended: false,
        })
        .collect();
    assert_eq!(late.len(), 50);
    w.settle_steps(&late).unwrap();
    check("old records logged after the fold");
    let before = sorted_counts(r, None);
    assert!(w.purge(t0() + Duration::days(12)).unwrap() > 0);
    let after = sorted_counts(r, None);
    check("purged");
    w.fold_review_counts().unwrap();
    check("purged, folded");
    let total = |c: &Counts| c.0.iter().map(|a| a.instances).sum::<u64>();
    assert!(total(&after) < total(&before), "instances were purged");
    // Every instance started in the first 7 days ended before day 12.
    assert!(
        after
            .0
            .iter()
            .all(|a| a.first_started >= t0() + Duration::days(7)),
        "the oldest starts went with their instances: {:?}",
        after.0
    );
    let records = |c: &Counts| c.2.iter().map(|o| o.count).sum::<u64>();
    assert!(records(&after) < records(&before), "records were purged");
    // Everything ended and purged: no counts left of it.
    let mut tx = w.begin().unwrap();
    for x in &g.instances {
        tx.close_instance(&x.id, InstanceStatus::Cancelled, t0() + Duration::days(40))
            .unwrap();
    }
    tx.commit().unwrap();
    w.purge(t0() + Duration::days(400)).unwrap();
    let empty = sorted_counts(r, None);
    assert!(
        empty.0.is_empty() && empty.1.is_empty() && empty.2.is_empty(),
        "{empty:?}"
    );
    check("all purged");
}

macro_rules! review_suite {
    ($make:expr) => {
        $crate::review::tests::review_suite!(@each $make;
            filters_and_keyset_pages_match_a_full_scan,
            funnel_and_uplift_match_the_generated_counts,
            a_customers_record_is_in_time_order_and_masked,
            counts_follow_starts_conversions_and_retention
        );
    };
    (@each $make:expr; $($name:ident),+) => {
        $(
            #[test]
            fn $name() {
                let store = $make;
                $crate::review::tests::$name(&*store, &*store);
            }
        )+
    };
}
pub(crate) use review_suite;

mod sqlite {
    fn store() -> Box<crate::store::SqliteStore> {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("review.db")).unwrap();
        std::mem::forget(dir);
        Box::new(store)
    }
    super::review_suite!(store());
}

mod postgres {
    super::review_suite!(crate::store::postgres::testing::temp_store());
}
