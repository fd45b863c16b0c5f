//! `nudge stats`: what nudge learned from outcomes, per journey, step and
//! channel: sends, conversions credited to them within
//! `policy.attribution_window`, the raw rate and the Beta-smoothed rate
//! scripts read as `customer.propensity(...)` ([`crate::propensity`]).

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

use super::{percent, ReviewRead};
use crate::config::Prior;
use crate::propensity::{raw, smoothed};
use crate::store::StoreError;

/// One (journey, step, channel).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsRow {
    pub journey: String,
    pub step: String,
    pub channel: String,
    pub sends: u64,
    pub conversions: u64,
    /// `conversions / sends`; `None` before the first send.
    pub rate: Option<f64>,
    /// `(conversions + a) / (sends + a + b)`: what scripts read for this step.
    pub smoothed_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PriorText {
    pub a: f64,
    pub b: f64,
}

/// The whole answer, with the settings it was computed with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub prior: PriorText,
    /// `policy.attribution_window`, e.g. `30days`.
    pub attribution_window: String,
    pub rows: Vec<StatsRow>,
}

/// The counts of `journey` (all journeys when `None`), ordered by journey,
/// step and channel, with rates under `prior`.
pub fn stats(
    store: &dyn ReviewRead,
    journey: Option<&str>,
    prior: Prior,
    attribution_window: Duration,
) -> Result<Stats, StoreError> {
    let rows = store
        .propensity_stats(journey)?
        .into_iter()
        .map(|c| StatsRow {
            rate: raw(c.sends, c.conversions),
            smoothed_rate: smoothed(prior, c.sends, c.conversions),
            journey: c.journey,
            step: c.step,
            channel: c.channel,
            sends: c.sends,
            conversions: c.conversions,
        })
        .collect();
    Ok(Stats {
        prior: PriorText {
            a: prior.a,
            b: prior.b,
        },
        attribution_window: crate::humanize::duration(attribution_window),
        rows,
    })
}

/// The table `nudge stats` prints.
pub fn to_text(stats: &Stats) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "conversions within {} of a send; smoothed = (conversions + {}) / (sends + {} + {})\n",
        stats.attribution_window, stats.prior.a, stats.prior.a, stats.prior.b
    );
    if stats.rows.is_empty() {
        out.push_str("nothing sent yet\n");
        return out;
    }
    let width = |f: fn(&StatsRow) -> usize, title: &str| {
        stats.rows.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let (jw, sw, cw) = (
        width(|r| r.journey.len(), "journey"),
        width(|r| r.step.len(), "step"),
        width(|r| r.channel.len(), "channel"),
    );
    let _ = writeln!(
        out,
        "{:<jw$}  {:<sw$}  {:<cw$}  {:>8}  {:>11}  {:>6}  {:>8}",
        "journey", "step", "channel", "sends", "conversions", "rate", "smoothed"
    );
    for r in &stats.rows {
        let _ = writeln!(
            out,
            "{:<jw$}  {:<sw$}  {:<cw$}  {:>8}  {:>11}  {:>6}  {:>8}",
            r.journey,
            r.step,
            r.channel,
            r.sends,
            r.conversions,
            percent(r.rate),
            percent(Some(r.smoothed_rate))
        );
    }
    out
}
