//! Does a journey work? Per journey: the funnel of its live instances
//! (started → each step sent → converted) with what was not sent and why,
//! and the uplift against its control group, overall and per script version.
//!
//! Units. The funnel counts instances: `started` is the journey's live
//! instances, a step's `sent` its `sent` records (one per instance that got
//! it), `converted` the live instances an exit event converted. The uplift
//! counts customers, the unit the control group is drawn by (a stable hash
//! of customer and journey): a customer is treated if they have a live
//! instance, held out if they have a held-out one, and converted if one of
//! those instances converted. Instances still open count as not (yet)
//! converted, in both arms alike. Shadow instances are in neither arm.
//!
//! The interval. With `x` of `n` customers converted in an arm, `p = x / n`;
//! the difference `d = p_treated - p_control` has the standard error
//! `se = sqrt(p_t (1 - p_t) / n_t + p_c (1 - p_c) / n_c)` (two independent
//! proportions, not pooled), and its 95 % confidence interval is
//! `d ± 1.959964 · se` (the normal approximation, Wald). It is marked
//! unreliable when an arm has fewer than 5 conversions or 5
//! non-conversions, where the approximation is poor.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::{percent, rate, ReviewRead};
use crate::model::{Mode, Outcome};
use crate::store::review::ArmCount;
use crate::store::StoreError;

/// The two-sided 95 % quantile of the standard normal distribution.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Every journey's funnel (one journey's when asked), and how far back the
/// log reaches (retention removes what is older).
#[derive(Debug, Clone, Serialize)]
pub struct FunnelReport {
    pub log_reaches_back_to: Option<DateTime<Utc>>,
    pub journeys: Vec<Funnel>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Funnel {
    pub journey: String,
    /// Live instances started.
    pub started: u64,
    pub steps: Vec<FunnelStep>,
    /// Live instances converted.
    pub converted: u64,
    /// `converted / started`.
    pub conversion_rate: Option<f64>,
    pub held_out_instances: u64,
    pub shadow_instances: u64,
    /// Treated against held-out customers, all script versions together.
    pub uplift: Uplift,
    /// The same per script version (the journey's hash), oldest first.
    pub by_rule_version: Vec<RuleVersion>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunnelStep {
    pub step: String,
    /// `sent` records of this step.
    pub sent: u64,
    /// `sent / started`.
    pub of_started: Option<f64>,
    /// `sent` over the stage before (`started` for the first step).
    pub of_previous: Option<f64>,
    /// Records of this step that settled without sending it, by outcome and
    /// reason (control group and shadow records left out: they are the arms,
    /// shown in the uplift), most frequent first.
    pub not_sent: Vec<ReasonCount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    pub outcome: Outcome,
    /// The reason with its per-record details cut ([`reason_group`]).
    pub reason: String,
    pub count: u64,
}

/// One arm of the comparison, in customers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Arm {
    pub customers: u64,
    pub converted: u64,
    pub rate: Option<f64>,
}

impl Arm {
    pub fn new(customers: u64, converted: u64) -> Self {
        Self {
            customers,
            converted,
            rate: rate(converted, customers),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Uplift {
    pub treated: Arm,
    pub held_out: Arm,
    /// `treated.rate - held_out.rate` (none without customers in both arms).
    pub difference: Option<f64>,
    /// 95 % confidence interval of the difference (see the module doc).
    pub ci95: Option<(f64, f64)>,
    /// Whether each arm has at least 5 conversions and 5 non-conversions.
    pub reliable: bool,
}

impl Uplift {
    pub fn new(treated: Arm, held_out: Arm) -> Self {
        let interval = difference_ci(
            (treated.converted, treated.customers),
            (held_out.converted, held_out.customers),
        );
        let enough = |a: &Arm| a.converted >= 5 && a.customers.saturating_sub(a.converted) >= 5;
        Self {
            treated,
            held_out,
            difference: interval.map(|i| i.0),
            ci95: interval.map(|i| (i.1, i.2)),
            reliable: enough(&treated) && enough(&held_out),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleVersion {
    pub rule_hash: String,
    /// When its first and last instance (any arm) started.
    pub first_started: DateTime<Utc>,
    pub last_started: DateTime<Utc>,
    /// Live instances started and converted under this version.
    pub started: u64,
    pub converted: u64,
    pub uplift: Uplift,
}

/// The difference of two proportions `x / n` (treated minus control) and
/// its 95 % interval, `(d, low, high)`: see the module doc. `None` when an
/// arm is empty.
pub fn difference_ci(treated: (u64, u64), control: (u64, u64)) -> Option<(f64, f64, f64)> {
    let (xt, nt) = treated;
    let (xc, nc) = control;
    if nt == 0 || nc == 0 {
        return None;
    }
    let (pt, pc) = (xt as f64 / nt as f64, xc as f64 / nc as f64);
    let d = pt - pc;
    let se = (pt * (1.0 - pt) / nt as f64 + pc * (1.0 - pc) / nc as f64).sqrt();
    Some((d, d - Z95 * se, d + Z95 * se))
}

/// A reason without what differs from record to record: what follows the
/// first `; ` (the time a deferral lasts until, a retry's attempt, "step
/// not sent") and an expiry's lateness ("due 3h ago, past the push lateness
/// bound of 1h" → "past the push lateness bound of 1h"), so that records
/// not sent for one reason are counted together. A receiver's refusal
/// quoting the (masked) address counts as one reason whoever it was about:
/// `invalid recipient +*********05` → `invalid recipient …`. Why no
/// fallback could take the step stays: it is part of why it was not sent.
pub fn reason_group(reason: &str) -> String {
    let mut parts = reason.split("; ");
    let head = parts.next().unwrap_or(reason);
    let mut head = match head.split_once(", past the ") {
        Some((due, bound)) if due.starts_with("due ") => format!("past the {bound}"),
        _ => head.to_string(),
    };
    for fallback in parts.filter(|p| p.starts_with("no fallback could take it: ")) {
        head.push_str("; ");
        head.push_str(fallback);
    }
    if !head.contains('*') {
        return head;
    }
    let mut words: Vec<String> = Vec::new();
    for word in head.split(' ') {
        let masked = match (word.contains('*'), word.split_once('@')) {
            (false, _) => word.to_string(),
            (true, Some((_, domain))) => format!("…@{domain}"),
            (true, None) => {
                // A phone's masked digits, with what closes the quote.
                let tail: String = word
                    .chars()
                    .rev()
                    .take_while(|c| !c.is_ascii_alphanumeric() && *c != '*')
                    .collect();
                format!("…{}", tail.chars().rev().collect::<String>())
            }
        };
        // A phone spread over several words is one `…`.
        match words.last_mut() {
            Some(last) if last == "…" && masked.starts_with('…') && !masked.contains('@') => {
                *last = masked
            }
            _ => words.push(masked),
        }
    }
    words.join(" ")
}

/// The funnels of every journey in the store, or of `journey`.
pub fn funnels(store: &dyn ReviewRead, journey: Option<&str>) -> Result<FunnelReport, StoreError> {
    let arms = store.arms(journey, false)?;
    let versions = store.arms(journey, true)?;
    let counts = store.outcome_counts(journey)?;
    let names: BTreeSet<&str> = arms
        .iter()
        .map(|a| a.journey.as_str())
        .chain(counts.iter().map(|c| c.journey.as_str()))
        .collect();
    let mut journeys = Vec::with_capacity(names.len());
    for name in names {
        let arm = |arms: &[ArmCount], mode: Mode| -> Option<ArmCount> {
            arms.iter()
                .find(|a| a.journey == name && a.mode == mode)
                .cloned()
        };
        let live = arm(&arms, Mode::Live);
        let held = arm(&arms, Mode::HeldOut);
        let started = live.as_ref().map_or(0, |a| a.instances);
        let converted = live.as_ref().map_or(0, |a| a.converted_instances);
        // Steps in plan order, then any the plan no longer has. A
        // withdrawal (`<step>:withdraw`, planned at an exit) is no step of
        // the funnel: it is not a send.
        let mut order: Vec<String> = store
            .planned_steps(name)?
            .into_iter()
            .map(|s| s.step)
            .filter(|s| crate::model::withdrawn_step(s).is_none())
            .collect();
        let logged: BTreeSet<&str> = counts
            .iter()
            .filter(|c| {
                c.journey == name
                    && c.step != "-"
                    && crate::model::withdrawn_step(&c.step).is_none()
            })
            .map(|c| c.step.as_str())
            .collect();
        for s in logged {
            if !order.iter().any(|o| o == s) {
                order.push(s.to_string());
            }
        }
        let mut previous = started;
        let mut steps = Vec::with_capacity(order.len());
        for step in order {
            let mut sent = 0;
            let mut reasons: BTreeMap<(&str, String), (Outcome, u64)> = BTreeMap::new();
            for c in counts
                .iter()
                .filter(|c| c.journey == name && c.step == step)
            {
                match c.outcome {
                    Outcome::Sent => sent += c.count,
                    Outcome::HeldOut | Outcome::Shadow | Outcome::Withdrawn => {}
                    o => {
                        reasons
                            .entry((o.as_str(), reason_group(&c.reason)))
                            .or_insert((o, 0))
                            .1 += c.count
                    }
                }
            }
            let mut not_sent: Vec<ReasonCount> = reasons
                .into_iter()
                .map(|((_, reason), (outcome, count))| ReasonCount {
                    outcome,
                    reason,
                    count,
                })
                .collect();
            not_sent.sort_by_key(|n| std::cmp::Reverse(n.count));
            steps.push(FunnelStep {
                of_started: rate(sent, started),
                of_previous: rate(sent, previous),
                step,
                sent,
                not_sent,
            });
            previous = sent;
        }
        let customers = |a: &Option<ArmCount>| {
            a.as_ref().map_or(Arm::new(0, 0), |a| {
                Arm::new(a.customers, a.converted_customers)
            })
        };
        let mut hashes: Vec<(&str, DateTime<Utc>, DateTime<Utc>)> = Vec::new();
        for v in versions.iter().filter(|v| v.journey == name) {
            let hash = v.rule_hash.as_deref().unwrap_or_default();
            match hashes.iter_mut().find(|h| h.0 == hash) {
                Some(h) => {
                    h.1 = h.1.min(v.first_started);
                    h.2 = h.2.max(v.last_started);
                }
                None => hashes.push((hash, v.first_started, v.last_started)),
            }
        }
        hashes.sort_by_key(|h| (h.1, h.0));
        let by_rule_version = hashes
            .into_iter()
            .map(|(hash, first, last)| {
                let of = |mode: Mode| {
                    versions
                        .iter()
                        .find(|v| {
                            v.journey == name
                                && v.rule_hash.as_deref() == Some(hash)
                                && v.mode == mode
                        })
                        .cloned()
                };
                let (live, held) = (of(Mode::Live), of(Mode::HeldOut));
                RuleVersion {
                    rule_hash: hash.to_string(),
                    first_started: first,
                    last_started: last,
                    started: live.as_ref().map_or(0, |a| a.instances),
                    converted: live.as_ref().map_or(0, |a| a.converted_instances),
                    uplift: Uplift::new(customers(&live), customers(&held)),
                }
            })
            .collect();
        journeys.push(Funnel {
            journey: name.to_string(),
            started,
            steps,
            converted,
            conversion_rate: rate(converted, started),
            held_out_instances: held.as_ref().map_or(0, |a| a.instances),
            shadow_instances: arm(&arms, Mode::Shadow).map_or(0, |a| a.instances),
            uplift: Uplift::new(customers(&live), customers(&held)),
            by_rule_version,
        });
    }
    Ok(FunnelReport {
        log_reaches_back_to: store.log_reach()?,
        journeys,
    })
}

/// The report as `nudge funnel` prints it for a terminal.
pub fn to_text(report: &FunnelReport) -> String {
    let mut out = String::new();
    match report.log_reaches_back_to {
        Some(t) => {
            let _ = writeln!(
                out,
                "the dispatch log reaches back to {} (store.retention removes older records)\n",
                t.to_rfc3339_opts(SecondsFormat::Secs, true)
            );
        }
        None => out.push_str("the dispatch log is empty\n\n"),
    }
    if report.journeys.is_empty() {
        out.push_str("no journey has started or logged anything yet\n");
    }
    for f in &report.journeys {
        let _ = writeln!(out, "{}", f.journey);
        let _ = writeln!(out, "  {:<22} {:>8}", "started", f.started);
        for s in &f.steps {
            let _ = writeln!(
                out,
                "  {:<22} {:>8}  {:>6} of started  {:>6} of previous",
                format!("{} sent", s.step),
                s.sent,
                percent(s.of_started),
                percent(s.of_previous)
            );
        }
        let _ = writeln!(
            out,
            "  {:<22} {:>8}  {:>6} of started",
            "converted",
            f.converted,
            percent(f.conversion_rate)
        );
        if f.steps.iter().any(|s| !s.not_sent.is_empty()) {
            out.push_str("  not sent:\n");
            for s in &f.steps {
                for r in &s.not_sent {
                    let _ = writeln!(
                        out,
                        "    {:<8} {:<10} {:>6}  {}",
                        s.step,
                        r.outcome.as_str(),
                        r.count,
                        r.reason
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "  uplift: {}{}",
            uplift_text(&f.uplift),
            if f.shadow_instances > 0 {
                format!(" ({} shadow instances in neither arm)", f.shadow_instances)
            } else {
                String::new()
            }
        );
        if !f.by_rule_version.is_empty() {
            out.push_str("  per script version:\n");
            for v in &f.by_rule_version {
                let _ = writeln!(
                    out,
                    "    {} ({} to {}): {} started, {} converted; {}",
                    v.rule_hash,
                    v.first_started.to_rfc3339_opts(SecondsFormat::Secs, true),
                    v.last_started.to_rfc3339_opts(SecondsFormat::Secs, true),
                    v.started,
                    v.converted,
                    uplift_text(&v.uplift)
                );
            }
        }
        out.push('\n');
    }
    out
}

fn uplift_text(u: &Uplift) -> String {
    let arm = |a: &Arm| format!("{}/{} ({})", a.converted, a.customers, percent(a.rate));
    let mut text = format!(
        "treated {} vs held out {} customers converted",
        arm(&u.treated),
        arm(&u.held_out)
    );
    match (u.difference, u.ci95) {
        (Some(d), Some((lo, hi))) => {
            let pp = |v: f64| format!("{:+.1}", v * 100.0);
            let _ = write!(
                text,
                ", difference {} points (95% CI {} to {}){}",
                pp(d),
                pp(lo),
                pp(hi),
                if u.reliable {
                    ""
                } else {
                    ", too few customers for the interval to be reliable"
                }
            );
        }
        _ => text.push_str(", no difference without customers in both arms"),
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: 40 of 100 treated, 30 of 100 held out. d = 0.1; se =
    /// sqrt(0.4·0.6/100 + 0.3·0.7/100) = sqrt(0.0045) = 0.0670820;
    /// 1.959964 · se = 0.1314784; the interval is [-0.0314784, 0.2314784].
    #[test]
    fn the_interval_of_a_difference_matches_a_hand_computation() {
        let (d, lo, hi) = difference_ci((40, 100), (30, 100)).unwrap();
        assert!((d - 0.1).abs() < 1e-12, "{d}");
        assert!((lo - -0.031_478_4).abs() < 1e-6, "{lo}");
        assert!((hi - 0.231_478_4).abs() < 1e-6, "{hi}");
        let u = Uplift::new(Arm::new(100, 40), Arm::new(100, 30));
        assert!(u.reliable);
        assert_eq!(u.ci95, Some((lo, hi)));
        // An empty arm has no difference; a tiny one is flagged.
        assert_eq!(difference_ci((1, 2), (0, 0)), None);
        assert!(!Uplift::new(Arm::new(10, 2), Arm::new(10, 5)).reliable);
        // All or nothing converted: the interval collapses to the difference.
        assert_eq!(difference_ci((5, 5), (0, 5)), Some((1.0, 1.0, 1.0)));
    }

    #[test]
    fn reasons_lose_their_per_record_details() {
        assert_eq!(
            reason_group("quiet hours 21:00-08:00 in Australia/Sydney; until 2026-03-02T21:00:00Z"),
            "quiet hours 21:00-08:00 in Australia/Sydney"
        );
        assert_eq!(
            reason_group("loan.signed ended the journey; step not sent"),
            "loan.signed ended the journey"
        );
        assert_eq!(
            reason_group("due 3h 2m ago, past the push lateness bound of 1h"),
            "past the push lateness bound of 1h"
        );
        assert_eq!(
            reason_group("no marketing consent for email"),
            "no marketing consent for email"
        );
        let unreachable = "unreachable on push: no app installed; no fallback could take it: email (no email address)";
        assert_eq!(reason_group(unreachable), unreachable);
        // Refusals quoting a masked address: one reason for everyone.
        for (one, other) in [
            (
                r#"rejected with HTTP 400: {"error": "invalid recipient +*********05"}"#,
                r#"rejected with HTTP 400: {"error": "invalid recipient +*********07"}"#,
            ),
            (
                "rejected with HTTP 400: no mailbox v***@fail.example here",
                "rejected with HTTP 400: no mailbox q***@fail.example here",
            ),
            (
                "rejected with HTTP 400: call +** *** *** *02 failed",
                "rejected with HTTP 400: call +** *** *** *17 failed",
            ),
        ] {
            assert_eq!(reason_group(one), reason_group(other));
        }
        assert_eq!(
            reason_group(r#"rejected with HTTP 400: {"error": "invalid recipient +*********05"}"#),
            r#"rejected with HTTP 400: {"error": "invalid recipient …"}"#
        );
        assert_eq!(
            reason_group("rejected with HTTP 400: call +** *** *** *02 failed"),
            "rejected with HTTP 400: call … failed"
        );
    }
}
