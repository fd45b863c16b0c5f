//! Propensity learned from outcomes: per journey, step and channel, how many
//! messages were sent and how many of them converted, and the rate scripts
//! read as `customer.propensity(journey, channel)` (the arbitration score of
//! `fn rank` can weigh by it).
//!
//! Counting happens in the store, in the transactions that already write
//! the facts (the store's `propensity_counts`):
//! - a **send** is counted in the transaction that logs the step `sent`
//!   (on the channel it went out on, a fallback's included);
//! - a **conversion** (an instance ended `converted` by its exit event) is
//!   credited to each step of that instance sent within
//!   `policy.attribution_window` before the exit, in the exit's transaction.
//!   Held-out and shadow steps were never sent, so they count for neither.
//!
//! The rate is Beta-smoothed: `(conversions + a) / (sends + a + b)` with the
//! prior `policy.propensity.prior` (default `a = 1, b = 19`: 5 % before
//! anything is known), so a step with 1 send and 1 conversion reads 10 %,
//! not 100 %, and the estimate moves towards the observed rate as sends
//! accumulate.
//!
//! Scripts read an in-memory [`Table`], never the store: the daemon reads
//! the counts again every `policy.propensity.refresh` (off the async
//! workers) and swaps the table in ([`Propensities::replace`]); a batch of
//! decisions pins one table for its whole run ([`Propensities::pin`]), so
//! every score of one arbitration is computed from the same counts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::config::settings::Prior;
use crate::model::ChannelKind;

/// Sends and conversions of one (journey, step, channel), as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PropensityCount {
    pub journey: String,
    pub step: String,
    pub channel: String,
    pub sends: u64,
    pub conversions: u64,
}

/// The Beta-smoothed conversion rate: the posterior mean of a Beta(a, b)
/// prior after `conversions` successes in `sends` trials. Conversions
/// above sends (sends purged, or counted before this version) are capped
/// at the sends, so the rate never exceeds 1.
pub fn smoothed(prior: Prior, sends: u64, conversions: u64) -> f64 {
    let conversions = conversions.min(sends) as f64;
    (conversions + prior.a) / (sends as f64 + prior.a + prior.b)
}

/// `conversions / sends`, or `None` before the first send.
pub fn raw(sends: u64, conversions: u64) -> Option<f64> {
    (sends > 0).then(|| conversions.min(sends) as f64 / sends as f64)
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    sends: u64,
    conversions: u64,
}

impl Counts {
    fn add(&mut self, sends: u64, conversions: u64) {
        self.sends += sends;
        self.conversions += conversions;
    }
}

fn slot(channel: ChannelKind) -> usize {
    ChannelKind::ALL
        .iter()
        .position(|c| *c == channel)
        .expect("every channel is in ALL")
}

/// One journey's counts, per channel over all steps and per step.
#[derive(Debug, Default)]
struct JourneyCounts {
    by_channel: [Counts; ChannelKind::ALL.len()],
    by_step: HashMap<String, [Counts; ChannelKind::ALL.len()]>,
}

/// A snapshot of the counts with the prior: what scripts read.
#[derive(Debug)]
pub struct Table {
    prior: Prior,
    journeys: HashMap<String, JourneyCounts>,
}

impl Default for Table {
    fn default() -> Self {
        Self::new(Prior::default(), &[])
    }
}

impl Table {
    /// Rows of an unknown channel (a newer binary's) are left out.
    pub fn new(prior: Prior, rows: &[PropensityCount]) -> Self {
        let mut journeys: HashMap<String, JourneyCounts> = HashMap::new();
        for r in rows {
            let Ok(channel) = r.channel.parse::<ChannelKind>() else {
                continue;
            };
            let j = journeys.entry(r.journey.clone()).or_default();
            j.by_channel[slot(channel)].add(r.sends, r.conversions);
            j.by_step.entry(r.step.clone()).or_default()[slot(channel)].add(r.sends, r.conversions);
        }
        Self { prior, journeys }
    }

    pub fn prior(&self) -> Prior {
        self.prior
    }

    /// The smoothed rate of `journey` on `channel`, over all its steps or
    /// of one `step`; the prior's mean when nothing was sent.
    pub fn rate(&self, journey: &str, step: Option<&str>, channel: ChannelKind) -> f64 {
        let counts = self
            .journeys
            .get(journey)
            .and_then(|j| match step {
                None => Some(j.by_channel[slot(channel)]),
                Some(s) => j.by_step.get(s).map(|c| c[slot(channel)]),
            })
            .unwrap_or_default();
        smoothed(self.prior, counts.sends, counts.conversions)
    }
}

thread_local! {
    /// Tables pinned on this thread, by the handle they were taken from.
    static PINNED: RefCell<Vec<(usize, Arc<Table>)>> = const { RefCell::new(Vec::new()) };
}

/// The live table, shared by every rule set of a daemon (or simulation)
/// and replaced whole when the counts are read again.
#[derive(Clone, Default)]
pub struct Propensities(Arc<RwLock<Arc<Table>>>);

impl std::fmt::Debug for Propensities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Propensities").finish_non_exhaustive()
    }
}

impl Propensities {
    fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// The table pinned on this thread for this handle, else the live one.
    pub fn current(&self) -> Arc<Table> {
        let id = self.id();
        let pinned = PINNED.with(|p| {
            p.borrow()
                .iter()
                .rev()
                .find(|(h, _)| *h == id)
                .map(|(_, t)| t.clone())
        });
        pinned.unwrap_or_else(|| self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Swaps in a new table; evaluations under a [`pin`](Self::pin) keep theirs.
    pub fn replace(&self, table: Table) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    /// Builds the table of `rows` with `prior` and swaps it in.
    pub fn set(&self, prior: Prior, rows: &[PropensityCount]) {
        self.replace(Table::new(prior, rows));
    }

    /// Until the guard drops, evaluations on this thread read the table
    /// live now, whatever replaces it meanwhile: one batch, one table.
    pub fn pin(&self) -> Pin {
        let table = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        PINNED.with(|p| p.borrow_mut().push((self.id(), table)));
        Pin { id: self.id() }
    }
}

/// See [`Propensities::pin`].
#[must_use = "the table stays pinned only while the guard lives"]
pub struct Pin {
    id: usize,
}

impl Drop for Pin {
    fn drop(&mut self) {
        PINNED.with(|p| {
            let mut p = p.borrow_mut();
            if let Some(i) = p.iter().rposition(|(h, _)| *h == self.id) {
                p.remove(i);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        journey: &str,
        step: &str,
        channel: &str,
        sends: u64,
        conversions: u64,
    ) -> PropensityCount {
        PropensityCount {
            journey: journey.into(),
            step: step.into(),
            channel: channel.into(),
            sends,
            conversions,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn the_smoothed_rate_starts_at_the_prior_and_moves_towards_the_observed_rate() {
        let prior = Prior { a: 1.0, b: 19.0 };
        assert!(close(smoothed(prior, 0, 0), 0.05), "the prior's mean");
        // One send, one conversion: 2/21, not 100 %.
        assert!(close(smoothed(prior, 1, 1), 2.0 / 21.0));
        // 1,000 sends at 30 %: close to 30 %, still pulled a little to 5 %.
        let r = smoothed(prior, 1000, 300);
        assert!(close(r, 301.0 / 1020.0), "{r}");
        assert!(r < 0.3 && r > 0.29, "{r}");
        // Sends without conversions pull it below the prior.
        assert!(smoothed(prior, 100, 0) < 0.05);
        // A flat prior: Laplace's rule of succession.
        let flat = Prior { a: 1.0, b: 1.0 };
        assert!(close(smoothed(flat, 2, 1), 0.5));
        assert!(close(smoothed(flat, 0, 0), 0.5));
        // More conversions than sends (counted before the sends were): at most 1.
        assert!(smoothed(prior, 2, 5) <= 1.0);
        assert!(close(smoothed(prior, 2, 5), smoothed(prior, 2, 2)));
        assert_eq!(raw(0, 0), None);
        assert_eq!(raw(4, 1), Some(0.25));
    }

    #[test]
    fn the_table_sums_steps_per_channel_and_answers_the_prior_for_the_unknown() {
        let prior = Prior { a: 1.0, b: 19.0 };
        let table = Table::new(
            prior,
            &[
                row("loan", "push", "push", 10, 4),
                row("loan", "reminder", "push", 10, 0),
                row("loan", "email", "email", 5, 1),
                row("loan", "x", "sms", 99, 99),
            ],
        );
        let push = table.rate("loan", None, ChannelKind::Push);
        assert!(close(push, 5.0 / 40.0), "{push}");
        let one = table.rate("loan", Some("push"), ChannelKind::Push);
        assert!(close(one, 5.0 / 30.0), "{one}");
        let email = table.rate("loan", None, ChannelKind::Email);
        assert!(close(email, 2.0 / 25.0), "{email}");
        assert!(close(table.rate("loan", None, ChannelKind::CallTask), 0.05));
        assert!(close(table.rate("other", None, ChannelKind::Push), 0.05));
        assert!(close(
            table.rate("loan", Some("nope"), ChannelKind::Push),
            0.05
        ));
    }

    #[test]
    fn a_pinned_table_holds_on_its_thread_until_the_guard_drops() {
        let live = Propensities::default();
        let other = Propensities::default();
        let prior = Prior { a: 1.0, b: 1.0 };
        live.set(prior, &[row("j", "s", "push", 8, 8)]);
        let before = live.current().rate("j", None, ChannelKind::Push);
        {
            let _pin = live.pin();
            live.set(prior, &[]);
            assert!(close(
                live.current().rate("j", None, ChannelKind::Push),
                before
            ));
            // Another handle is not pinned by it.
            other.set(prior, &[row("j", "s", "push", 2, 0)]);
            assert!(close(
                other.current().rate("j", None, ChannelKind::Push),
                0.25
            ));
            // Another thread sees the live table.
            let seen = std::thread::scope(|s| {
                s.spawn(|| live.current().rate("j", None, ChannelKind::Push))
                    .join()
                    .unwrap()
            });
            assert!(close(seen, 0.5));
        }
        assert!(close(
            live.current().rate("j", None, ChannelKind::Push),
            0.5
        ));
    }
}
