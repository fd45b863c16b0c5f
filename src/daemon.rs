//! `nudge run`: wires ingest, pipeline, scheduler, dispatch, the dead-letter
//! publisher and the admin server, and owns the process lifecycle:
//! SIGTERM/SIGINT stop intake, drain and exit 0 within `kafka.drain_timeout`;
//! SIGHUP (and file changes when `rules.watch` is on) reload the rules.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::audit_stream::AuditPublisher;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::dispatch::{Channels, HttpChannel};
use crate::ingest::dlq::DeadLetterPublisher;
use crate::ingest::KafkaIngest;
use crate::journey::{record_rules_version, Pipeline};
use crate::model::ChannelKind;
use crate::policy::Policy;
use crate::rules::{self, Limits, RulesHandle};
use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::supervise::{DrainOutcome, Tasks};
use crate::telemetry::events::{
    DrainDeadlinePassed, DuplicateEvents, EventsIgnored, JourneyEnded, JourneyStarted,
    ReleasedStepsUnheard, RetentionPurgeFailed, RetentionPurgePanicked, ReviewFoldFailed,
    RuleEvaluated, RuleTimedOut, RulesReloadRefused, RulesReloaded, RulesUnchanged,
    RulesVersionNotRecorded, TaskStopped,
};

pub fn init_logging(format: &str, level: &str) {
    // An empty `RUST_LOG=` (a template's unset value) would filter out
    // every line, errors too: it counts as not set.
    let from_env = std::env::var("RUST_LOG")
        .is_ok_and(|v| !v.trim().is_empty())
        .then(tracing_subscriber::EnvFilter::try_from_default_env)
        .and_then(Result::ok);
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    let json = format == "json" || (format == "auto" && !std::io::stderr().is_terminal());
    // Colour codes only for a terminal, never into files or journald.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .fmt_fields(crate::telemetry::text_log_fields())
            .try_init()
    };
}

/// The journeys of `rules.dir`, refused when they do not compile or send on
/// a channel with no endpoint.
fn load_rules(config: &Config, limits: &Limits) -> anyhow::Result<rules::RuleSet> {
    let rule_set = rules::load_dir(&config.rules.dir, limits).map_err(|e| {
        anyhow::anyhow!(
            "rules in {} do not compile; not starting:\n{e}",
            config.rules.dir.display()
        )
    })?;
    let served: Vec<ChannelKind> = config.channels.keys().copied().collect();
    let unserved = rules::unserved_channels(&rule_set, &served);
    if !unserved.is_empty() {
        let problems: Vec<String> = unserved.iter().map(|p| p.to_string()).collect();
        bail!(
            "config: journeys send on channels with no endpoint; not starting:\n{}",
            problems.join("\n")
        );
    }
    // A misspelt kill switch would leave the journey sending.
    for (key, names) in [
        ("policy.disabled_journeys", &config.policy.disabled_journeys),
        ("policy.shadow_journeys", &config.policy.shadow_journeys),
    ] {
        let unknown: Vec<&str> = names
            .iter()
            .filter(|name| rule_set.journey(name).is_none())
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            let known: Vec<&str> = rule_set
                .journeys()
                .iter()
                .map(|j| j.name.as_str())
                .collect();
            bail!(
                "{key}: no journey named {} in {} (journeys: {}); not starting",
                unknown.join(", "),
                config.rules.dir.display(),
                known.join(", ")
            );
        }
    }
    Ok(rule_set)
}

/// The channel adapters (tokens read, CA files parsed) and their lateness bounds.
fn build_channels(config: &Config) -> anyhow::Result<(Channels, HashMap<ChannelKind, Duration>)> {
    let mut channels = Channels::default();
    let mut lateness = HashMap::new();
    for (kind, ch) in &config.channels {
        let token = ch.token(*kind)?;
        let ca = match &ch.ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("channels.{kind}.ca_file: {}", path.display()))?,
            ),
            None => None,
        };
        let adapter = HttpChannel::with_ca(&ch.url, ch.timeout, token, ca.as_deref())
            .map_err(|e| anyhow::anyhow!("channels.{kind}: {e}"))?;
        channels = channels.with(*kind, Arc::new(adapter), ch.concurrency);
        if let Some(rate) = ch.rate {
            channels = channels.with_rate(*kind, rate);
        }
        lateness.insert(*kind, ch.lateness);
    }
    Ok((channels, lateness))
}

/// What the daemon checks at start-up before it contacts anything (`nudge
/// check --config`): the admin tokens, the rules against the channels, each
/// channel's token and CA, and the Kafka settings with their secrets (the
/// broker and the database are not contacted). Returns the rule set.
///
/// Every problem is reported at once (three channels' missing tokens are
/// one round of fixing, not three).
pub fn preflight(config: &Config) -> anyhow::Result<rules::RuleSet> {
    let mut problems = Vec::new();
    if let Err(e) = crate::admin::auth::Tokens::from_config(&config.admin.auth) {
        problems.push(format!("{e:#}"));
    }
    for (kind, ch) in &config.channels {
        if let Err(e) = ch.token(*kind) {
            problems.push(format!("{e:#}"));
        }
    }
    if let Err(e) = crate::ingest::kafka::consumer_config(&config.kafka) {
        problems.push(format!("{e:#}"));
    }
    if let Err(e) = crate::store::check_settings(&config.store) {
        problems.push(format!("{e:#}"));
    }
    let rule_set = load_rules(config, &Limits::from_config(&config.rules));
    if let Err(e) = &rule_set {
        problems.push(format!("{e:#}"));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    build_channels(config)?;
    rule_set
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Listening before anything else: a SIGTERM during start-up (rules
    // compiling, the broker not yet reached) then stops the daemon cleanly
    // once it is up, instead of killing it with the signal's default action.
    let mut stop_signals = StopSignals::listen()?;
    tracing::info!(version = crate::VERSION, "nudge starting");
    crate::store::postgres::report_pool_errors_to(|error| {
        crate::telemetry::events::StorePoolConnectFailed { error }.emit()
    });
    let rule_set = preflight(&config)?;
    let tokens = crate::admin::auth::Tokens::from_config(&config.admin.auth)?;
    let limits = Limits::from_config(&config.rules);
    let served: Vec<ChannelKind> = config.channels.keys().copied().collect();
    // Secrets, CA files and Kafka settings were refused by `preflight`,
    // before the store is opened (and perhaps migrated), not after.
    let (channels, lateness) = build_channels(&config)?;

    let metrics = crate::admin::install_metrics()?;
    {
        let channels: Vec<&str> = served.iter().map(|c| c.as_str()).collect();
        let journeys: Vec<&str> = rule_set
            .journeys()
            .iter()
            .map(|j| j.name.as_str())
            .collect();
        crate::telemetry::export_known_series(&channels, &journeys);
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let rules = RulesHandle::new(rule_set);
    let store = open_store(&config, &rules, clock.now()).await?;
    tracing::info!(version = %rules.current().version, journeys = rules.current().journeys().len(), "rules loaded");

    // Runtime control: the overrides stored before this start are in
    // force from the first event and the first step.
    let controls = crate::control::Controls::default();
    {
        let (store, controls) = (store.clone(), controls.clone());
        tokio::task::spawn_blocking(move || controls.load(store.as_ref()))
            .await
            .context("reading the runtime-control overrides")?
            .context("store: reading the runtime-control overrides")?;
    }
    // Propensity: the counts stored before this start are what scripts read
    // from the first decision (`crate::propensity`).
    let propensities = rules.propensity();
    {
        let (store, propensities, prior) = (
            store.clone(),
            propensities.clone(),
            config.policy.propensity.prior,
        );
        tokio::task::spawn_blocking(move || {
            store
                .propensity_counts(None)
                .map(|rows| propensities.set(prior, &rows))
        })
        .await
        .context("reading the propensity counts")?
        .context("store: reading the propensity counts")?;
    }
    let pipeline = Arc::new(
        Pipeline::new(
            store.clone(),
            rules.clone(),
            clock.clone(),
            config.policy.clone(),
        )
        .with_withdrawals(crate::config::withdraw_channels(&config.channels))
        .with_controls(controls.clone()),
    );
    let scheduler = Arc::new(
        Scheduler::new(
            store.clone(),
            rules.clone(),
            channels,
            clock.clone(),
            Policy::new(config.policy.clone()),
            config.scheduler.clone(),
            lateness,
        )
        .with_withdrawals(crate::config::withdraw_channels(&config.channels))
        .with_controls(controls.clone()),
    );
    {
        // Steps another replica hands back go out at once (PostgreSQL).
        let scheduler = Arc::downgrade(&scheduler);
        store
            .on_steps_released(Box::new(move |heard| match heard {
                Ok(channel) => {
                    if let Some(s) = scheduler.upgrade() {
                        s.wake_channel(channel);
                    }
                }
                Err(error) => ReleasedStepsUnheard { error: &error }.emit(),
            }))
            .context("store: listening for released steps")?;
    }
    let dlq = DeadLetterPublisher::new(&config.kafka, store.clone(), clock.clone())?;
    let dlq_wake = dlq.waker();
    let dlq_status = dlq.status();
    // The store calls block (the PostgreSQL client panics on an async worker).
    let audit = {
        let (kafka, topic, store, clock) = (
            config.kafka.clone(),
            config.audit.topic.clone(),
            store.clone(),
            clock.clone(),
        );
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            Ok(match topic {
                Some(topic) => Some(AuditPublisher::new(&kafka, &topic, store, clock)?),
                None => {
                    // Rows written while it was on would wait forever: stop adding.
                    store.set_audit_outbox(false)?;
                    None
                }
            })
        })
        .await
        .context("starting the audit stream")??
    };
    let audit_status = audit
        .as_ref()
        .zip(config.audit.topic.clone())
        .map(|(a, topic)| (topic, a.status()));
    let wake_scheduler = scheduler.clone();
    let ingest = KafkaIngest::new(
        &config.kafka,
        pipeline,
        store.clone(),
        Box::new(move |outcome, dead_letters| {
            record_batch_metrics(outcome);
            if outcome.earliest_due.is_some() {
                wake_scheduler.wake();
            }
            if dead_letters {
                dlq_wake.notify_one();
            }
        }),
    )?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let page = crate::admin::page::PageState::new(
        open_review(&config, &tokens).await?,
        config.store.retention,
    )
    .with_rules(rules.clone());
    let admin = crate::admin::router(crate::admin::AdminState {
        metrics,
        readiness: ingest.readiness(),
        store: store.clone(),
        rules: rules.clone(),
        dead_letters: dlq_status,
        tokens: Arc::new(tokens),
        audit: audit_status,
        page,
        controls: controls.clone(),
        policy: Arc::new(config.policy.clone()),
        sending: scheduler.health(),
    });
    let listener = tokio::net::TcpListener::bind(&config.admin.listen)
        .await
        .with_context(|| format!("admin.listen: binding {}", config.admin.listen))?;
    tracing::info!(address = %config.admin.listen, "admin server listening");
    let mut tasks = Tasks::default();
    tasks.spawn(
        "admin server",
        crate::admin::serve::serve(listener, admin, stop_rx.clone()),
    );

    if config.kafka.catch_up_shorter_than_session() {
        crate::telemetry::events::CatchUpShorterThanSession {
            catch_up: config.kafka.catch_up_timeout,
            session: config.kafka.session_timeout(),
        }
        .emit();
    }
    let readiness = ingest.readiness();
    tasks.spawn(
        "scheduler",
        send_once_caught_up(
            scheduler.clone(),
            readiness.caught_up(),
            config.kafka.catch_up_timeout,
            stop_rx.clone(),
        ),
    );
    tasks.spawn("dead-letter publisher", dlq.run(stop_rx.clone()));
    if let Some(audit) = audit {
        tasks.spawn("audit publisher", audit.run(stop_rx.clone()));
    }
    tokio::spawn(crate::control::refresh(
        store.clone(),
        controls,
        stop_rx.clone(),
    ));
    tokio::spawn(refresh_propensity(
        store.clone(),
        propensities,
        config.policy.propensity,
        stop_rx.clone(),
    ));
    tasks.spawn_fallible("ingest", ingest.run(stop_rx.clone()));
    spawn_reloader(
        config.rules.dir.clone(),
        limits,
        served,
        rules.clone(),
        store.clone(),
        clock.clone(),
        config.rules.watch,
    )?;
    spawn_retention(
        store.clone(),
        clock.clone(),
        config.store.retention,
        stop_rx.clone(),
    );
    spawn_review_fold(store.clone(), stop_rx.clone());

    let requested = async {
        stop_signals.wait().await;
        tracing::info!("stopping: no new records; draining in-flight work");
    };
    let outcome = tasks
        .supervise(requested, &stop_tx, config.kafka.drain_timeout, |failure| {
            TaskStopped { failure }.emit();
            readiness.halt(failure.to_string());
        })
        .await?;
    if outcome == DrainOutcome::DeadlinePassed {
        DrainDeadlinePassed {
            deadline: config.kafka.drain_timeout,
        }
        .emit();
    }
    tracing::info!("stopped");
    Ok(())
}

fn record_batch_metrics(outcome: &crate::journey::BatchOutcome) {
    EventsIgnored {
        count: outcome.ignored as u64,
    }
    .emit();
    DuplicateEvents {
        count: outcome.duplicates as u64,
    }
    .emit();
    for (journey, ok) in &outcome.evaluations {
        RuleEvaluated { journey, ok: *ok }.emit();
    }
    for journey in &outcome.timeouts {
        RuleTimedOut {
            journey,
            function: "decide",
        }
        .emit();
    }
    for id in &outcome.started {
        let journey = id.rsplit_once('-').map(|(j, _)| j).unwrap_or(id);
        JourneyStarted { journey }.emit();
    }
    for (journey, how) in &outcome.ended {
        JourneyEnded {
            journey,
            outcome: how.as_str(),
        }
        .emit();
    }
}

/// The review page's read-only connections to the store (its own, so a
/// page never waits behind the daemon's writer), when a token opens the page.
async fn open_review(
    config: &Config,
    tokens: &crate::admin::auth::Tokens,
) -> anyhow::Result<Option<Arc<dyn crate::store::review::ReviewRead>>> {
    if !tokens.enabled(crate::admin::auth::Role::Reviewer) {
        return Ok(None);
    }
    let store = config.store.clone();
    let reader = tokio::task::spawn_blocking(move || crate::store::open_reader(&store))
        .await?
        .with_context(|| format!("the review page's reader of {}", config.store.describe()))?;
    Ok(Some(Arc::from(reader)))
}

/// Deletes what is older than `store.retention`: ten minutes after start
/// (on a large store the purge's walk of `instances` would otherwise slow a
/// restart's first sends) and hourly after that.
fn spawn_retention(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if retention.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(600);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            wait = Duration::from_secs(3600);
            let before = clock.now() - crate::clock::span(retention);
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.purge(before)).await {
                Ok(Ok(n)) if n > 0 => {
                    tracing::info!(rows = n, before = %before, "retention: old rows deleted")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => RetentionPurgeFailed { error: &e }.emit(),
                Err(e) => RetentionPurgePanicked { error: &e }.emit(),
            }
        }
    });
}

/// How often new dispatch-log records are folded into the review page's
/// counts: a funnel read adds at most this much of the log itself.
const REVIEW_FOLD_EVERY: Duration = Duration::from_secs(5);

/// Keeps the review page's funnel counts up to date
/// ([`Store::fold_review_counts`]), off the sending path.
fn spawn_review_fold(store: Arc<dyn Store>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REVIEW_FOLD_EVERY) => {}
                _ = stop.changed() => return,
            }
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.fold_review_counts()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => ReviewFoldFailed { error: &e }.emit(),
                Err(e) => ReviewFoldFailed { error: &e }.emit(),
            }
        }
    });
}

struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM"),
            _ = self.int.recv() => tracing::info!("SIGINT"),
        }
    }
}

/// Opens the store as its one owner and records the rule set in force, on
/// the blocking pool (a store client may block or drive its own runtime).
async fn open_store(
    config: &Config,
    rules: &RulesHandle,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Arc<dyn Store>> {
    let store_config = config.store.clone();
    let current = rules.current();
    tokio::task::spawn_blocking(move || {
        let (store, released) = crate::store::open(&store_config)
            .with_context(|| format!("store: opening {}", store_config.describe()))?;
        // Which database, never with a password (the URL holds none).
        tracing::info!(store = %store_config.describe(), "store opened");
        if released > 0 {
            tracing::info!(steps = released, "claims of the previous run released");
        }
        record_rules_version(store.as_ref(), &current, now).context("recording the rule set")?;
        Ok(store)
    })
    .await
    .context("opening the store")?
}

/// Keeps the propensity table scripts read in step with the counts in the
/// store (this replica's and the others'): every `policy.propensity.refresh`,
/// read off the async workers, until `stop`. A failed read keeps the last table.
async fn refresh_propensity(
    store: Arc<dyn Store>,
    propensities: crate::propensity::Propensities,
    settings: crate::config::PropensityConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(settings.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the table was read at start.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (store, propensities) = (store.clone(), propensities.clone());
        let read = tokio::task::spawn_blocking(move || {
            store
                .propensity_counts(None)
                .map(|rows| propensities.set(settings.prior, &rows))
        })
        .await;
        if let Ok(Err(e)) = read {
            crate::telemetry::events::PropensityRefreshFailed { error: &e }.emit();
        }
    }
}

/// Reloads on SIGHUP and, when watching, on changes in the rules directory.
fn spawn_reloader(
    dir: std::path::PathBuf,
    limits: Limits,
    served: Vec<ChannelKind>,
    rules: RulesHandle,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    watch_files: bool,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let mut hup = signal(SignalKind::hangup())?;
    let hup_tx = tx.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = hup_tx.send("SIGHUP");
        }
    });
    if watch_files {
        use notify::Watcher;
        let file_tx = tx.clone();
        // Any change in the directory, not only to *.rhai paths: Kubernetes
        // updates a mounted ConfigMap by swapping a `..data` symlink. A reload
        // that finds the same version changes nothing.
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                let _ = file_tx.send("file change");
            }
        })
        .context("rules.watch: starting the file watcher")?;
        watcher
            .watch(&dir, notify::RecursiveMode::Recursive)
            .with_context(|| format!("rules.watch: watching {}", dir.display()))?;
        // The watcher lives as long as the process.
        std::mem::forget(watcher);
    }
    tokio::spawn(async move {
        while let Some(why) = rx.recv().await {
            // Editors write files in several steps: let them settle.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            // Compiling and recording a version block: off the async workers.
            let (dir, limits, served, rules, store) = (
                dir.clone(),
                limits.clone(),
                served.clone(),
                rules.clone(),
                store.clone(),
            );
            let now = clock.now();
            let _ = tokio::task::spawn_blocking(move || {
                reload(&dir, &limits, &served, &rules, store.as_ref(), now, why)
            })
            .await;
        }
    });
    Ok(())
}

/// The journeys two rule sets differ by, each list by name.
#[derive(Debug, Default, PartialEq)]
pub struct JourneyDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same name, another script.
    pub changed: Vec<String>,
}

impl JourneyDiff {
    pub fn between(old: &rules::RuleSet, new: &rules::RuleSet) -> Self {
        let hashes = |set: &rules::RuleSet| -> std::collections::BTreeMap<String, String> {
            set.journeys()
                .iter()
                .map(|j| (j.name.clone(), j.hash.clone()))
                .collect()
        };
        let (old, new) = (hashes(old), hashes(new));
        let mut diff = Self::default();
        for (name, hash) in &new {
            match old.get(name) {
                None => diff.added.push(name.clone()),
                Some(before) if before != hash => diff.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        diff.removed = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        diff
    }
}

/// Names for a log field: the first 20, then how many more.
fn names_text(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// Compiles the whole directory; swaps it in only if all of it compiled and
/// every channel it sends on has an endpoint (`served`), as at start: rules
/// a restart would refuse never go live.
///
/// The log line names the journeys added, removed and changed: a removed
/// journey's pending steps are suppressed when due, which ops should hear
/// of when it happens, not from the dispatch log later.
pub fn reload(
    dir: &Path,
    limits: &Limits,
    served: &[ChannelKind],
    rules: &RulesHandle,
    store: &dyn Store,
    now: chrono::DateTime<chrono::Utc>,
    why: &str,
) -> bool {
    let loaded = rules::load_dir(dir, limits).and_then(|set| {
        let problems = rules::unserved_channels(&set, served);
        match problems.is_empty() {
            true => Ok(set),
            false => Err(rules::LoadError { problems }),
        }
    });
    match loaded {
        Ok(set) => {
            if set.version == rules.current().version {
                let refused_before = rules.refused().is_some();
                rules.clear_refused();
                RulesUnchanged {
                    trigger: why,
                    version: &set.version,
                    refused_before,
                }
                .emit();
                return true;
            }
            if let Err(e) = record_rules_version(store, &set, now) {
                RulesVersionNotRecorded { error: &e }.emit();
                return false;
            }
            let new_version = set.version.clone();
            let old = rules.swap(set);
            rules.clear_refused();
            let diff = JourneyDiff::between(&old, &rules.current());
            // A journey new to this process shows in its series at 0, so
            // that an alert on their increase sees its first error.
            let added: Vec<&str> = diff.added.iter().map(String::as_str).collect();
            crate::telemetry::export_known_series(&[], &added);
            RulesReloaded {
                trigger: why,
                old: &old.version,
                new: &new_version,
                added: &names_text(&diff.added),
                removed: &names_text(&diff.removed),
                changed: &names_text(&diff.changed),
            }
            .emit();
            true
        }
        Err(e) => {
            rules.note_refused(&e.problems, now);
            RulesReloadRefused {
                trigger: why,
                problems: &e.problems,
            }
            .emit();
            false
        }
    }
}

/// Runs the scheduler once the consumer has read the records that arrived
/// while the daemon was down, or after `limit`: a customer who acted
/// meanwhile (an exit waiting in Kafka) is not sent the step that fell due
/// in the gap before their exit is read.
async fn send_once_caught_up(
    scheduler: Arc<Scheduler>,
    mut caught_up: watch::Receiver<bool>,
    limit: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let waited = std::time::Instant::now();
    tokio::select! {
        _ = tokio::time::timeout(limit, caught_up.wait_for(|c| *c)) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
    crate::telemetry::events::SendingBegins {
        waited: waited.elapsed(),
        caught_up: *caught_up.borrow(),
    }
    .emit();
    scheduler.run(stop).await;
}
