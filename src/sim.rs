//! The engine on a virtual clock: an embedded SQLite store in a temporary
//! directory and a recording channel. `nudge simulate`, the rule tests and
//! replay all run journeys through this, the same code the daemon runs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::clock::{Clock, VirtualClock};
use crate::config::{Config, PolicyConfig, SchedulerConfig};
use crate::dispatch::{Channel, Channels, Rate, RecordingChannel};
use crate::event::Event;
use crate::journey::{BatchOutcome, Pipeline};
use crate::model::{ChannelKind, LogRecord};
use crate::policy::Policy;
use crate::rules::{RuleSet, RulesHandle};
use crate::scheduler::Scheduler;
use crate::store::{SqliteStore, Store, StoreError};

/// How far past the last event `finish` follows the schedule.
const HORIZON_DAYS: i64 = 400;

/// Each channel's lateness bound: a step due longer ago is `expired`. A
/// channel not in the map has the default bound (12h).
pub type Lateness = HashMap<ChannelKind, Duration>;

/// The lateness bounds of the channels a config names, as the daemon applies them.
pub fn channel_lateness(config: &Config) -> Lateness {
    config
        .channels
        .iter()
        .map(|(kind, channel)| (*kind, channel.lateness))
        .collect()
}

/// What the simulated daemon takes from a config's channels, as `nudge run`
/// does: each channel's lateness bound, its send-rate limit
/// (`channels.<kind>.rate`, on the virtual clock) and whether an exit
/// withdraws what was delivered on it (`channels.<kind>.withdraw`).
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub lateness: Lateness,
    pub rates: HashMap<ChannelKind, Rate>,
    pub withdraw: Vec<ChannelKind>,
}

impl Default for ChannelSettings {
    /// No config: the default bounds, no rate limit, call tasks withdrawn.
    fn default() -> Self {
        Self::with_lateness(Lateness::new())
    }
}

impl ChannelSettings {
    /// The daemon's settings for the channels `config` names.
    pub fn of(config: &Config) -> Self {
        Self {
            lateness: channel_lateness(config),
            rates: config
                .channels
                .iter()
                .filter_map(|(kind, channel)| channel.rate.map(|r| (*kind, r)))
                .collect(),
            withdraw: crate::config::withdraw_channels(&config.channels),
        }
    }

    /// These lateness bounds and the other defaults.
    pub fn with_lateness(lateness: Lateness) -> Self {
        Self {
            lateness,
            rates: HashMap::new(),
            withdraw: crate::config::withdraw_channels(&Default::default()),
        }
    }
}

pub struct Simulation {
    pub clock: VirtualClock,
    pub store: Arc<SqliteStore>,
    pub pipeline: Pipeline,
    pub scheduler: Scheduler,
    pub channel: Arc<RecordingChannel>,
    /// Runtime control of the simulated daemon (`replace` to change it).
    pub controls: crate::control::Controls,
    /// The table scripts read, and the prior it is built with.
    propensity: (crate::propensity::Propensities, crate::config::Prior),
    _dir: tempfile::TempDir,
}

impl Simulation {
    pub fn new(
        rules: RuleSet,
        start: DateTime<Utc>,
        policy: PolicyConfig,
    ) -> Result<Self, StoreError> {
        Self::with_settings(rules, start, policy, ChannelSettings::default())
    }

    /// With a config's channel settings (see [`ChannelSettings::of`]),
    /// every channel the recording channel.
    pub fn with_settings(
        rules: RuleSet,
        start: DateTime<Utc>,
        policy: PolicyConfig,
        settings: ChannelSettings,
    ) -> Result<Self, StoreError> {
        let channel = Arc::new(RecordingChannel::default());
        let channels = settings
            .rates
            .iter()
            .fold(Channels::all(channel.clone()), |c, (kind, rate)| {
                c.with_rate(*kind, *rate)
            });
        Self::build(rules, start, policy, settings, channel, channels)
    }

    /// With other channel adapters (tests use real HTTP endpoints).
    pub fn with_channels(
        rules: RuleSet,
        start: DateTime<Utc>,
        policy: PolicyConfig,
        recording: Arc<RecordingChannel>,
        channels: Channels,
    ) -> Result<Self, StoreError> {
        Self::build(
            rules,
            start,
            policy,
            ChannelSettings::default(),
            recording,
            channels,
        )
    }

    fn build(
        rules: RuleSet,
        start: DateTime<Utc>,
        policy: PolicyConfig,
        settings: ChannelSettings,
        recording: Arc<RecordingChannel>,
        channels: Channels,
    ) -> Result<Self, StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(format!("temp dir: {e}")))?;
        let store = Arc::new(SqliteStore::open_scratch(&dir.path().join("simulate.db"))?);
        let clock = VirtualClock::new(start);
        let clock_dyn: Arc<dyn Clock> = Arc::new(clock.clone());
        let rules = RulesHandle::new(rules);
        crate::journey::record_rules_version(store.as_ref(), &rules.current(), start)?;
        let propensity = (rules.propensity(), policy.propensity.prior);
        let store_dyn: Arc<dyn Store> = store.clone();
        let controls = crate::control::Controls::default();
        let pipeline = Pipeline::new(
            store_dyn.clone(),
            rules.clone(),
            clock_dyn.clone(),
            policy.clone(),
        )
        .with_withdrawals(settings.withdraw.clone())
        .with_controls(controls.clone());
        let scheduler = Scheduler::new(
            store_dyn,
            rules,
            channels,
            clock_dyn,
            Policy::new(policy),
            SchedulerConfig::default(),
            settings.lateness,
        )
        .with_withdrawals(settings.withdraw)
        .with_controls(controls.clone());
        Ok(Self {
            clock,
            store,
            pipeline,
            scheduler,
            channel: recording,
            controls,
            propensity,
            _dir: dir,
        })
    }

    /// Reads the simulation's propensity counts into the table its scripts
    /// read: before each event and each round of due steps, so a simulated
    /// conversion weighs on the next decision, in virtual time and
    /// deterministically (the daemon reads them every
    /// `policy.propensity.refresh` instead).
    fn refresh_propensity(&self) -> Result<(), StoreError> {
        let (table, prior) = &self.propensity;
        table.set(*prior, &self.store.propensity_counts(None)?);
        Ok(())
    }

    /// One round of the scheduler, on fresh propensity counts.
    async fn run_due(&self) -> Result<Vec<LogRecord>, StoreError> {
        self.refresh_propensity()?;
        self.scheduler.run_due().await
    }

    /// Every message sent so far, in order.
    pub fn messages(&self) -> Vec<crate::dispatch::Message> {
        self.channel.messages()
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Sends what falls due up to `t` in time order, then leaves the clock at `t`.
    pub async fn run_until(&self, t: DateTime<Utc>) -> Result<Vec<LogRecord>, StoreError> {
        let mut records = Vec::new();
        loop {
            records.extend(self.run_due().await?);
            match self.scheduler.next_due().await? {
                Some(next) if next <= t => self.clock.advance_to(next),
                _ => break,
            }
        }
        self.clock.advance_to(t);
        records.extend(self.run_due().await?);
        Ok(records)
    }

    /// Moves time to the event, processes it, and sends what is due at once.
    pub async fn feed(&self, event: Event) -> Result<(BatchOutcome, Vec<LogRecord>), StoreError> {
        self.feed_batch(vec![event]).await
    }

    /// Events of one moment, decided as one batch (as the daemon decides the
    /// records it reads together) before anything they plan is sent, so that
    /// arbitration sees every step they make due at once. Time moves to the
    /// first event's.
    pub async fn feed_batch(
        &self,
        events: Vec<Event>,
    ) -> Result<(BatchOutcome, Vec<LogRecord>), StoreError> {
        let Some(at) = events.first().map(|e| e.time) else {
            return Ok((BatchOutcome::default(), Vec::new()));
        };
        let mut records = self.run_until(at).await?;
        self.refresh_propensity()?;
        let events: Vec<Arc<Event>> = events.into_iter().map(Arc::new).collect();
        let outcome = self.pipeline.process(&events, &[])?;
        records.extend(outcome.records.iter().cloned());
        records.extend(self.run_due().await?);
        Ok((outcome, records))
    }

    /// Feeds events in order, those of one moment (consecutive, same time)
    /// as one batch; their failures (with the index among `events`) and the
    /// records made on the way.
    pub async fn feed_in_moments(
        &self,
        events: Vec<Event>,
    ) -> Result<(Vec<crate::journey::EventFailure>, Vec<LogRecord>), StoreError> {
        let mut failures = Vec::new();
        let mut records = Vec::new();
        let mut events = events.into_iter().enumerate().peekable();
        while let Some((first_index, first)) = events.next() {
            let at = first.time;
            let mut moment = vec![first];
            while let Some((_, next)) = events.next_if(|(_, e)| e.time == at) {
                moment.push(next);
            }
            let (outcome, made) = self.feed_batch(moment).await?;
            failures.extend(outcome.failures.into_iter().map(|mut f| {
                f.index += first_index;
                f
            }));
            records.extend(made);
        }
        Ok((failures, records))
    }

    /// Follows the schedule until nothing is pending (bounded by a horizon).
    pub async fn finish(&self) -> Result<Vec<LogRecord>, StoreError> {
        let horizon = self.clock.now() + chrono::Duration::days(HORIZON_DAYS);
        self.run_until(horizon).await
    }
}

/// A parsed events file: events in file order, and the lines that were not events.
pub struct EventsFile {
    pub events: Vec<(usize, Event)>,
    pub errors: Vec<(usize, String)>,
}

/// Reads CloudEvents JSON lines; blank lines and `#` comments are skipped.
pub fn read_events(path: &Path) -> std::io::Result<EventsFile> {
    let text = std::fs::read_to_string(path)?;
    let mut events = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match Event::parse(trimmed.as_bytes()) {
            Ok(e) => events.push((line_no, e)),
            Err(e) => errors.push((line_no, e.to_string())),
        }
    }
    Ok(EventsFile { events, errors })
}

/// Summary of a simulation run, printed to stderr.
#[derive(Debug, Default)]
pub struct Summary {
    pub events: usize,
    pub skipped_lines: usize,
    /// `decide` failures, and failed `rank` and step conditions.
    pub rule_failures: usize,
    pub records: usize,
}

/// Runs an events file through the rules, writing each log record as it is made.
pub async fn simulate(
    rules: RuleSet,
    policy: PolicyConfig,
    settings: ChannelSettings,
    events_path: &Path,
    mut emit: impl FnMut(&LogRecord) -> std::io::Result<()>,
    mut warn: impl FnMut(String),
) -> anyhow::Result<Summary> {
    // Ids and reasons come from the file: a line break or an escape
    // sequence in them is shown, never acted on (a forged line).
    let mut warn = |line: String| warn(crate::review::printable(&line).into_owned());
    use anyhow::Context;
    let file =
        read_events(events_path).with_context(|| format!("reading {}", events_path.display()))?;
    let shown = events_path.display();
    let mut summary = Summary {
        skipped_lines: file.errors.len(),
        ..Summary::default()
    };
    let mut bad = file.errors.into_iter().peekable();
    let start = file
        .events
        .first()
        .map(|(_, e)| e.time)
        .unwrap_or_else(Utc::now);
    let sim = Simulation::with_settings(rules, start, policy, settings)?;
    let mut latest: Option<(usize, DateTime<Utc>)> = None;
    let mut events = file.events.into_iter().peekable();
    while let Some(first) = events.next() {
        // Consecutive events of one moment are one batch.
        let mut moment = vec![first];
        while let Some(next) = events.next_if(|(_, e)| e.time == moment[0].1.time) {
            moment.push(next);
        }
        for (line, event) in &moment {
            // The virtual clock only goes forward: an event dated before one
            // above it is decided late, its steps past their lateness bound.
            match latest {
                Some((above, at)) if event.time < at => warn(format!(
                    "{shown}:{line}: event {} is dated {}, before line {above} ({}): the clock does not go back, so its steps may be logged expired; sort the file by time",
                    event.id,
                    event.time.to_rfc3339(),
                    at.to_rfc3339()
                )),
                _ => latest = Some((*line, event.time)),
            }
            while let Some((bad_line, _)) = bad.peek() {
                if *bad_line > *line {
                    break;
                }
                let (bad_line, reason) = bad.next().expect("peeked");
                warn(format!("{shown}:{bad_line}: skipped: {reason}"));
            }
        }
        summary.events += moment.len();
        let lines: Vec<(usize, String)> = moment.iter().map(|(l, e)| (*l, e.id.clone())).collect();
        let (outcome, records) = sim
            .feed_batch(moment.into_iter().map(|(_, e)| e).collect())
            .await?;
        for f in &outcome.failures {
            summary.rule_failures += 1;
            let (line, id) = &lines[f.index];
            warn(format!("{shown}:{line}: event {id}: {}", f.reason));
        }
        for r in &records {
            emit(r)?;
        }
        summary.records += records.len();
    }
    for (bad_line, reason) in bad {
        warn(format!("{shown}:{bad_line}: skipped: {reason}"));
    }
    let records = sim.finish().await?;
    for r in &records {
        emit(r)?;
    }
    summary.records += records.len();
    summary.rule_failures += sim.scheduler.script_failures() as usize;
    Ok(summary)
}

/// The recording channel as a trait object (for `Channels::all`).
pub fn recording_channel() -> (Arc<RecordingChannel>, Arc<dyn Channel>) {
    let rec = Arc::new(RecordingChannel::default());
    (rec.clone(), rec)
}
