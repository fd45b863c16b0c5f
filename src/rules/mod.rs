//! The rules stage: journey scripts compiled once into a [`RuleSet`].
//!
//! A rule set is immutable; reloading builds a whole new one and swaps it in
//! only if every file compiled (see [`RulesHandle`]). Only journeys whose
//! triggers or exits name an event's type are looked at (trigger index), so
//! the cost of an event does not grow with the number of journeys.

mod api;
mod fast;
mod load;

use std::collections::HashMap;

/// The trigger index is looked up several times per event: a fast hash
/// (foldhash, as hashbrown uses) instead of SipHash; event types are not
/// attacker-chosen keys of a long-lived table anyone can fill.
type Index<V> = HashMap<String, V, foldhash::fast::RandomState>;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::context::CustomerContext;
use crate::event::Event;
use crate::model::{Category, ChannelKind, Decision, ExitOutcome};

pub use api::{build_engine, host_api_reference, Limits};
pub use load::{load_dir, load_sources, parse_delay, LoadError, Problem};

/// One planned message of a journey, as declared in the script.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepPlan {
    pub id: String,
    pub channel: ChannelKind,
    pub template: String,
    /// Counted from the journey start.
    #[serde(with = "humantime_serde_compat")]
    pub delay: Duration,
    /// Name of a script function `fn NAME(customer, vars) -> bool`, asked when the step is due.
    pub condition: Option<String>,
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::humanize::duration(*d))
    }
}

/// A compiled journey script.
pub struct Journey {
    pub name: String,
    pub description: String,
    pub category: Category,
    pub priority: i64,
    pub triggers: Vec<String>,
    pub exits: Vec<(String, ExitOutcome)>,
    /// `data` field that identifies an instance (e.g. `application_id`); the
    /// customer id when absent.
    pub key_field: Option<String>,
    pub steps: Vec<StepPlan>,
    /// After an instance ends, a new one may not start for this long.
    pub cooldown: Option<Duration>,
    /// Percentage of customers (stable hash) kept as a control group.
    pub holdout_percent: u8,
    /// Percentage of customers the journey runs for at all (pilot).
    pub pilot_percent: u8,
    /// Decide and log, never send.
    pub shadow: bool,
    pub file: PathBuf,
    /// Content hash of the script file (recorded with every decision).
    pub hash: String,
    ast: rhai::AST,
    /// `decide` compiled, when the script stays within the fast subset.
    compiled: Option<fast::Program>,
}

impl Journey {
    /// Whether `decide` runs compiled (see `rules/fast.rs`); otherwise, or
    /// when an evaluation leaves the compiled subset, on the interpreter.
    pub fn compiled(&self) -> bool {
        self.compiled.is_some()
    }
}

impl fmt::Debug for Journey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journey")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}:{line}:{column}: journey `{journey}`: {message}")]
pub struct RuleError {
    pub journey: String,
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// All journeys of one `rules/` directory, with their trigger index.
pub struct RuleSet {
    journeys: Vec<Journey>,
    by_name: HashMap<String, usize>,
    by_trigger: Index<Vec<usize>>,
    by_exit: Index<Vec<(usize, ExitOutcome)>>,
    /// Hash over every file's hash: names this version of the rule set.
    pub version: String,
    engine: rhai::Engine,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field("version", &self.version)
            .field("journeys", &self.journeys)
            .finish()
    }
}

impl RuleSet {
    fn new(mut journeys: Vec<Journey>, engine: rhai::Engine) -> Self {
        // Higher priority first, so arbitration and output follow priority.
        journeys.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        let mut by_name = HashMap::new();
        let mut by_trigger: Index<Vec<usize>> = Index::default();
        let mut by_exit: Index<Vec<(usize, ExitOutcome)>> = Index::default();
        for (i, j) in journeys.iter().enumerate() {
            by_name.insert(j.name.clone(), i);
            for t in &j.triggers {
                by_trigger.entry(t.clone()).or_default().push(i);
            }
            for (e, outcome) in &j.exits {
                by_exit.entry(e.clone()).or_default().push((i, *outcome));
            }
        }
        let mut hasher = sha2::Sha256::default();
        for j in &journeys {
            sha2::Digest::update(&mut hasher, j.name.as_bytes());
            sha2::Digest::update(&mut hasher, j.hash.as_bytes());
        }
        let version = hex::encode(&sha2::Digest::finalize(hasher)[..6]);
        Self {
            journeys,
            by_name,
            by_trigger,
            by_exit,
            version,
            engine,
        }
    }

    pub fn journeys(&self) -> &[Journey] {
        &self.journeys
    }

    pub fn journey(&self, name: &str) -> Option<&Journey> {
        self.by_name.get(name).map(|&i| &self.journeys[i])
    }

    /// Journeys started by this event type, highest priority first.
    pub fn triggered_by(&self, event_type: &str) -> impl Iterator<Item = &Journey> {
        self.by_trigger
            .get(event_type)
            .into_iter()
            .flatten()
            .map(|&i| &self.journeys[i])
    }

    /// Journeys this event type ends, with how it ends them.
    pub fn exited_by(&self, event_type: &str) -> impl Iterator<Item = (&Journey, ExitOutcome)> {
        self.by_exit
            .get(event_type)
            .into_iter()
            .flatten()
            .map(|&(i, o)| (&self.journeys[i], o))
    }

    /// Whether any journey reacts to this event type (the cheap pre-filter).
    pub fn interested_in(&self, event_type: &str) -> bool {
        self.by_trigger.contains_key(event_type) || self.by_exit.contains_key(event_type)
    }

    /// Runs the journey's `decide(event, customer)`. A failing or runaway
    /// script fails only this evaluation.
    pub fn decide(
        &self,
        journey: &Journey,
        event: &Arc<Event>,
        customer: &Arc<CustomerContext>,
    ) -> Result<Decision, RuleError> {
        if let Some(decision) = journey
            .compiled
            .as_ref()
            .and_then(|p| p.decide(event, customer))
        {
            return Ok(decision);
        }
        api::decide(&self.engine, journey, event, customer)
    }

    /// `decide` on the rhai interpreter only (the reference the compiled
    /// form is held to; benchmarks compare the two).
    pub fn decide_interpreted(
        &self,
        journey: &Journey,
        event: &Arc<Event>,
        customer: &Arc<CustomerContext>,
    ) -> Result<Decision, RuleError> {
        api::decide(&self.engine, journey, event, customer)
    }

    /// Evaluates a step's condition function against the instance's variables.
    pub fn condition(
        &self,
        journey: &Journey,
        function: &str,
        customer: &Arc<CustomerContext>,
        vars: &Map<String, Value>,
    ) -> Result<bool, RuleError> {
        api::condition(&self.engine, journey, function, customer, vars)
    }
}

/// The live rule set, swapped atomically on reload. Readers clone the `Arc`
/// and keep a consistent version for the whole batch they work on.
#[derive(Clone)]
pub struct RulesHandle(Arc<RwLock<Arc<RuleSet>>>);

impl RulesHandle {
    pub fn new(rules: RuleSet) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(rules))))
    }

    pub fn current(&self) -> Arc<RuleSet> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn swap(&self, rules: RuleSet) -> Arc<RuleSet> {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *guard, Arc::new(rules))
    }
}

/// Stable percentage bucket (0..100) of a customer for a journey, used for
/// holdout and pilot groups: the same customer always lands in the same bucket.
pub fn bucket(customer: &str, journey: &str, salt: &str) -> u8 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{salt}:{journey}:{customer}").as_bytes());
    (u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 100) as u8
}
