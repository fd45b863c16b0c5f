//! The rules stage: journey scripts compiled once into a [`RuleSet`].
//!
//! A rule set is immutable; reloading builds a whole new one and swaps it in
//! only if every file compiled (see [`RulesHandle`]). Only journeys whose
//! triggers or exits name an event's type are looked at (trigger index), so
//! the cost of an event does not grow with the number of journeys.

mod api;
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
use crate::model::OnLose;
use crate::model::{Category, ChannelKind, Decision, ExitOutcome};
use crate::propensity::Propensities;

pub use api::{build_engine, host_api_reference, Limits};
pub use load::{
    files_under, load_dir, load_dirs, load_sources, parse_delay, unserved_channels, LoadError,
    Problem,
};

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
    /// Channels tried in order when `channel` is unreachable or not consented.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<ChannelKind>,
    /// Declared `channel: "preferred"`: planned on the customer's
    /// `preferred_channel` when reachable, else on the first of `fallback`
    /// (push without one); `channel` holds that default. When due, it moves
    /// to a preference changed since (`Policy::preferred_now`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub preferred: bool,
}

impl StepPlan {
    /// The channel the step is planned on for this customer.
    pub fn channel_for(&self, customer: &CustomerContext) -> ChannelKind {
        match customer.preferred_channel {
            Some(c) if self.preferred && customer.reachable(c) => c,
            _ => self.channel,
        }
    }
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
    /// Pause after this many sends without a conversion (`fatigue` key);
    /// `None`: `policy.fatigue`.
    pub fatigue: Option<crate::config::settings::Fatigue>,
    /// What becomes of its step when it loses arbitration.
    pub on_lose: OnLose,
    /// The script defines `fn rank(customer, vars)`: its steps' score in
    /// arbitration (else `priority`).
    pub rank: bool,
    pub file: PathBuf,
    /// Content hash of the script file (recorded with every decision).
    pub hash: String,
    ast: rhai::AST,
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

#[derive(Debug, Clone)]
pub struct RuleError {
    pub journey: String,
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The evaluation ran longer than `rules.timeout` (counted apart, as
    /// `nudge_rule_timeouts_total`).
    pub timed_out: bool,
}

impl std::error::Error for RuleError {}

/// `file:line:column: journey …: message`, without a position when the
/// error is about the event rather than a place in the script (line 0).
impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": journey `{}`: {}", self.journey, self.message)
    }
}

/// All journeys of one `rules/` directory, with their trigger index.
pub struct RuleSet {
    /// Shared by [`RuleSet::fresh_copy`]s: compiled once.
    journeys: Arc<Vec<Journey>>,
    by_name: HashMap<String, usize>,
    by_trigger: Index<Vec<usize>>,
    by_exit: Index<Vec<(usize, ExitOutcome)>>,
    /// Hash over every file's name and hash: names this version of the rule set.
    pub version: String,
    engine: rhai::Engine,
    /// `rules.timeout`: wall clock per evaluation.
    timeout: Duration,
    /// What `customer.propensity(...)` reads: shared by every rule set of
    /// one [`RulesHandle`], so a reload keeps it.
    propensity: Propensities,
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
    fn new(mut journeys: Vec<Journey>, engine: rhai::Engine, timeout: Duration) -> Self {
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
        // The file names count too: a renamed file is a new version, so a
        // reload takes it and errors name the file as it is now.
        let mut hasher = sha2::Sha256::default();
        for j in &journeys {
            sha2::Digest::update(&mut hasher, j.name.as_bytes());
            sha2::Digest::update(&mut hasher, j.hash.as_bytes());
            let file = j.file.file_name().unwrap_or_default();
            sha2::Digest::update(&mut hasher, file.as_encoded_bytes());
            sha2::Digest::update(&mut hasher, [0]);
        }
        let version = hex::encode(&sha2::Digest::finalize(hasher)[..6]);
        Self {
            journeys: Arc::new(journeys),
            by_name,
            by_trigger,
            by_exit,
            version,
            engine,
            timeout,
            propensity: Propensities::default(),
        }
    }

    /// The same journeys, compiled once, with nothing learned: a new
    /// propensity table and an engine of its own. `nudge test` runs each
    /// case on one, so that a catalogue is not compiled again per case.
    pub fn fresh_copy(&self, limits: &Limits) -> RuleSet {
        Self {
            journeys: Arc::clone(&self.journeys),
            by_name: self.by_name.clone(),
            by_trigger: self.by_trigger.clone(),
            by_exit: self.by_exit.clone(),
            version: self.version.clone(),
            engine: build_engine(limits),
            timeout: self.timeout,
            propensity: Propensities::default(),
        }
    }

    /// The propensity table scripts of this rule set read.
    pub fn propensity(&self) -> &Propensities {
        &self.propensity
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
        api::decide(
            &self.engine,
            self.timeout,
            journey,
            event,
            customer,
            self.propensity.current(),
        )
    }

    /// Evaluates a step's condition function against the instance's variables.
    pub fn condition(
        &self,
        journey: &Journey,
        function: &str,
        customer: &Arc<CustomerContext>,
        vars: &Map<String, Value>,
    ) -> Result<bool, RuleError> {
        api::condition(
            &self.engine,
            self.timeout,
            journey,
            function,
            customer,
            self.propensity.current(),
            vars,
        )
    }
}

impl RuleSet {
    /// The journey's score for arbitration: `rank(customer, vars)` when the
    /// script defines it, else `priority`. Bounded like every evaluation.
    pub fn rank(
        &self,
        journey: &Journey,
        customer: &Arc<CustomerContext>,
        vars: &Map<String, Value>,
    ) -> Result<f64, RuleError> {
        if !journey.rank {
            return Ok(journey.priority as f64);
        }
        api::rank(
            &self.engine,
            self.timeout,
            journey,
            customer,
            self.propensity.current(),
            vars,
        )
    }
}

/// The live rule set, swapped atomically on reload. Readers clone the `Arc`
/// and keep a consistent version for the whole batch they work on.
#[derive(Clone)]
pub struct RulesHandle {
    current: Arc<RwLock<Arc<RuleSet>>>,
    /// The rules on disk do not compile: the last reload was refused.
    refused: Arc<std::sync::Mutex<Option<RefusedReload>>>,
}

/// A reload refused since `since` (the first refusal of the run of them):
/// the set in force keeps running, but a restart would not start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusedReload {
    pub since: chrono::DateTime<chrono::Utc>,
    pub problems: usize,
    /// The first problem, `file:line:column: message`.
    pub first: String,
}

impl RulesHandle {
    pub fn new(rules: RuleSet) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(rules))),
            refused: Arc::default(),
        }
    }

    pub fn current(&self) -> Arc<RuleSet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the rules on disk were refused at the last reload, and since when.
    pub fn refused(&self) -> Option<RefusedReload> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The reload at `at` refused the rules on disk for `problems`.
    pub fn note_refused(&self, problems: &[Problem], at: chrono::DateTime<chrono::Utc>) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let since = refused.as_ref().map_or(at, |r| r.since);
        *refused = Some(RefusedReload {
            since,
            problems: problems.len(),
            first: problems.first().map(|p| p.to_string()).unwrap_or_default(),
        });
    }

    /// The rules on disk compile again (loaded, or the same as in force).
    pub fn clear_refused(&self) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The propensity table of every rule set this handle holds (now and after reloads).
    pub fn propensity(&self) -> Propensities {
        self.current().propensity.clone()
    }

    /// Swaps in a new rule set; it reads the same propensity table as the one it replaces.
    pub fn swap(&self, mut rules: RuleSet) -> Arc<RuleSet> {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        rules.propensity = guard.propensity.clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const HEAD: &str = r#"fn journey() { #{ name: "j", category: "service", triggers: ["t"],
  steps: [#{ id: "a", channel: "push", template: "t", delay: "0s", when: "ok_to_send" }] } }
"#;

    /// Rules of one journey whose script is `HEAD` (line 1-2) then `body` (from line 3).
    fn rules(body: &str, timeout: Duration) -> RuleSet {
        let limits = Limits {
            timeout,
            ..Limits::default()
        };
        load_sources(
            vec![(PathBuf::from("j.rhai"), format!("{HEAD}{body}"))],
            &limits,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A renamed file is a new version of the rule set (a reload takes it,
    /// and errors name the file as it is now); the same files are the same.
    #[test]
    fn a_renamed_file_is_a_new_version() {
        let text = format!("{HEAD}fn ok_to_send(customer, vars) {{ true }}\nfn decide(event, customer) {{ start() }}\n");
        let version = |file: &str| {
            load_sources(
                vec![(PathBuf::from(file), text.clone())],
                &Limits::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .version
        };
        assert_eq!(version("j.rhai"), version("j.rhai"));
        assert_ne!(version("j.rhai"), version("carte_expirée.rhai"));
    }

    /// `channel: "preferred"` plans the step on the customer's preferred
    /// channel when reachable, else on the first fallback.
    #[test]
    fn a_preferred_channel_step_follows_the_customer() {
        let text = r#"fn journey() { #{ name: "p", category: "service", triggers: ["t"],
  steps: [#{ id: "a", channel: "preferred", template: "t", delay: "0s", fallback: ["email"] }] } }
fn decide(event, customer) { start() }
"#;
        let rules = load_sources(
            vec![(PathBuf::from("p.rhai"), text.into())],
            &Limits::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let plan = &rules.journey("p").unwrap().steps[0];
        let mut c = CustomerContext::new("c");
        c.app_installed = true;
        c.email = Some("c@example.com".into());
        c.preferred_channel = Some(ChannelKind::Push);
        assert_eq!(plan.channel_for(&c), ChannelKind::Push);
        c.app_installed = false;
        assert_eq!(
            plan.channel_for(&c),
            ChannelKind::Email,
            "unreachable: the fallback"
        );
        c.preferred_channel = None;
        assert_eq!(
            plan.channel_for(&c),
            ChannelKind::Email,
            "unknown: the fallback"
        );
    }

    /// A module read from elsewhere would change a journey without
    /// changing its recorded version.
    #[test]
    fn a_script_cannot_import_a_module() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.rhai"), "export const secret = 1;\n").unwrap();
        let text = format!(
            "fn journey() {{ #{{ name: \"i\", category: \"service\", triggers: [\"t\"],\n  steps: [#{{ id: \"a\", channel: \"push\", template: \"t\", delay: \"0s\" }}] }} }}\nimport \"{}\" as m;\nfn decide(event, customer) {{ start(#{{ v: m::secret }}) }}\n",
            dir.path().join("m").display()
        );
        let Err(err) = load_sources(vec![(PathBuf::from("i.rhai"), text)], &Limits::default())
        else {
            panic!("an import is refused")
        };
        let err = err.to_string();
        assert!(err.contains("i.rhai:3:1"), "{err}");
        assert!(err.contains("import"), "{err}");
    }

    fn decide(rules: &RuleSet) -> Result<Decision, RuleError> {
        let event = Event::parse(
            br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c-1","time":"2026-01-01T00:00:00Z","data":{"amount":3}}"#,
        )
        .unwrap();
        let customer = Arc::new(CustomerContext::new("c-1"));
        rules.decide(rules.journey("j").unwrap(), &Arc::new(event), &customer)
    }

    const OK: &str = "fn ok_to_send(customer, vars) { true }\n";

    #[test]
    fn a_runtime_error_names_its_line_and_column_inside_the_function_called() {
        let set = rules(
            &format!(
                "{OK}fn describe(event) {{\n  let amount = event.data.amount;\n  amount + \"x\" * 2\n}}\nfn decide(event, customer) {{\n  let text = describe(event);\n  start()\n}}\n"
            ),
            Duration::from_millis(100),
        );
        let err = decide(&set).unwrap_err();
        // `"x" * 2` on line 6 (of `describe`), not the call on line 9.
        assert_eq!((err.line, err.column), (6, 16), "{err}");
        assert!(
            err.to_string()
                .starts_with("j.rhai:6:16: journey `j`: no operator `*` for (string, integer)"),
            "{err}"
        );
        assert!(!err.timed_out);

        // A missing field is `()`, named whole, brackets balanced.
        let set = rules(
            &format!("{OK}fn decide(event, customer) {{\n  let x = 2.5 * event.data.nope;\n  start()\n}}\n"),
            Duration::from_millis(100),
        );
        let err = decide(&set).unwrap_err().to_string();
        assert!(
            err.contains("no operator `*` for (number, () (nothing: a missing field?)): convert"),
            "{err}"
        );

        let set = rules(
            &format!("{OK}fn decide(event, customer) {{\n  if event.data.amount > 2 {{\n    throw \"too big\";\n  }}\n  start()\n}}\n"),
            Duration::from_millis(100),
        );
        let err = decide(&set).unwrap_err();
        assert_eq!((err.line, err.column), (6, 5), "{err}");
        assert!(err.message.contains("too big"), "{err}");
    }

    #[test]
    fn a_wrong_result_or_a_limit_names_the_function_not_line_zero() {
        let set = rules(
            &format!("{OK}fn decide(event, customer) {{\n  \"yes\"\n}}\n"),
            Duration::from_millis(100),
        );
        let err = decide(&set).unwrap_err();
        assert_eq!((err.line, err.column), (4, 28), "{err}");
        assert!(err.message.contains("decide returned a string"), "{err}");

        // rhai reports limits without a position: the function called stands in.
        let set = rules(
            &format!("{OK}fn spin() {{\n  let x = 0;\n  loop {{ x += 1; }}\n}}\nfn decide(event, customer) {{\n  spin()\n}}\n"),
            Duration::from_secs(10),
        );
        let err = decide(&set).unwrap_err();
        assert_eq!((err.line, err.column), (8, 28), "{err}");
        assert!(err.message.contains("too many operations"), "{err}");
        assert!(!err.timed_out);
    }

    /// A field the script never reads, over the string limit, still fails
    /// it (the data is handed over whole): the reason says so.
    #[test]
    fn data_over_the_limits_is_explained() {
        let set = rules(
            &format!("{OK}fn decide(event, customer) {{\n  let amount = event.data.amount;\n  start()\n}}\n"),
            Duration::from_millis(500),
        );
        let text = format!(
            r#"{{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c-1","time":"2026-01-01T00:00:00Z","data":{{"amount":3,"pdf":"{}"}}}}"#,
            "A".repeat(70_000)
        );
        let event = Event::parse(text.as_bytes()).unwrap();
        let customer = Arc::new(CustomerContext::new("c-1"));
        let err = set
            .decide(set.journey("j").unwrap(), &Arc::new(event), &customer)
            .unwrap_err();
        assert!(err.message.contains("strings 64 KiB"), "{err}");
        assert!(err.message.contains("given whole"), "{err}");
        assert_eq!(err.line, 4, "the function called (rhai gives no position)");
    }

    #[test]
    fn contact_details_in_a_failure_or_a_skip_reason_are_masked() {
        let event = Arc::new(
            Event::parse(br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c-1","time":"2026-01-01T00:00:00Z","data":{"email":"carol.secret@example.com","phone":"+61 400 999 888"}}"#)
                .unwrap(),
        );
        let customer = Arc::new(CustomerContext::new("c-1"));
        let run = |body: &str| {
            let set = rules(&format!("{OK}{body}"), Duration::from_millis(500));
            set.decide(set.journey("j").unwrap(), &event, &customer)
        };
        let failed =
            run("fn decide(event, customer) {\n  parse_int(event.data.email)\n}\n").unwrap_err();
        assert!(failed.message.contains("***@example.com"), "{failed}");
        assert!(!failed.to_string().contains("carol"), "{failed}");
        let thrown =
            run("fn decide(event, customer) {\n  throw event.data.phone\n}\n").unwrap_err();
        assert!(thrown.message.contains("+** *** *** *88"), "{thrown}");
        let skipped = run(
            "fn decide(event, customer) {\n  skip(\"for \" + event.data.email + \" at \" + event.data.phone)\n}\n",
        )
        .unwrap();
        assert_eq!(
            skipped,
            Decision::Skip("for c***@example.com at +** *** *** *88".into())
        );
    }

    /// Under the operation limit (each `index_of` is one operation) but
    /// seconds long without the clock.
    const SLOW: &str = "fn decide(event, customer) {\n  let a = [];\n  for i in 0..10000 { a.push(i); }\n  let n = 0;\n  for i in 0..10000 { n += a.index_of(9999); }\n  start()\n}\n";

    #[test]
    fn an_evaluation_past_the_timeout_is_stopped_and_says_so() {
        let set = rules(&format!("{OK}{SLOW}"), Duration::from_millis(100));
        let started = Instant::now();
        let err = decide(&set).unwrap_err();
        let took = started.elapsed();
        assert!(err.timed_out, "{err}");
        assert_eq!(
            err.to_string(),
            "j.rhai:4:28: journey `j`: stopped: the evaluation ran longer than rules.timeout (100ms)"
        );
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_millis(600), "stopped late: {took:?}");

        // The deadline was one evaluation's: the next starts afresh.
        let quick = rules(
            &format!("{OK}fn decide(event, customer) {{ start() }}\n"),
            Duration::from_millis(100),
        );
        assert!(decide(&quick).is_ok());
    }

    #[test]
    fn a_step_condition_is_bounded_by_the_same_timeout() {
        let set = rules(
            "fn ok_to_send(customer, vars) {\n  let a = [];\n  for i in 0..10000 { a.push(i); }\n  let n = 0;\n  for i in 0..10000 { n += a.index_of(9999); }\n  true\n}\nfn decide(event, customer) { start() }\n",
            Duration::from_millis(50),
        );
        let customer = Arc::new(CustomerContext::new("c-1"));
        let started = Instant::now();
        let err = set
            .condition(
                set.journey("j").unwrap(),
                "ok_to_send",
                &customer,
                &Map::new(),
            )
            .unwrap_err();
        assert!(err.timed_out, "{err}");
        assert!(err.message.contains("rules.timeout (50ms)"), "{err}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn a_slow_journey_definition_is_a_load_problem() {
        let text = format!(
            "fn journey() {{\n  let a = [];\n  for i in 0..10000 {{ a.push(i); }}\n  for i in 0..10000 {{ a.index_of(9999); }}\n  #{{ name: \"j\" }}\n}}\n{SLOW}"
        );
        let limits = Limits {
            timeout: Duration::from_millis(50),
            ..Limits::default()
        };
        let err = load_sources(vec![(PathBuf::from("j.rhai"), text)], &limits).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].line, 1, "{err}");
        assert!(
            err.to_string().contains(
                "journey() failed: stopped: the evaluation ran longer than rules.timeout (50ms)"
            ),
            "{err}"
        );
    }
}
