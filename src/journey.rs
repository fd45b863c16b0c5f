//! The decide stage: one batch of events in, one store transaction out.
//!
//! Per event: skip it cheaply if no journey listens to its type; drop it if
//! its id was processed before; update the customer's context; end the
//! instances it exits; ask each triggered journey's script what to do and
//! plan the steps of the instances it starts. An event that changes nothing
//! writes nothing. A script that fails affects only its own journey.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde_json::json;

use crate::clock::{span, Clock};
use crate::config::PolicyConfig;
use crate::context::{self, CustomerContext, ExitRead};
use crate::control::{Controls, JourneySettings, Overrides};
use crate::event::Event;
use crate::model::{
    instance_id, Category, ChannelKind, Decision, InstanceStatus, LogRecord, Mode, Outcome, StepRef,
};
use crate::rules::{bucket, Journey, RuleError, RuleSet, RulesHandle};
use crate::store::{
    DeadLetter, EndedNothing, NewInstance, NewStep, NotStarted, NotStartedWhy, ReceivedEvent,
    RecordHeader, Store, StoreError, Tx,
};

/// Where a batch of records came from, committed with its effects.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceOffset {
    pub topic: String,
    pub partition: i32,
    /// The offset the store held when the batch was read (0: none), which
    /// the batch moves from ([`crate::store::Tx::set_offset`]).
    pub expected: i64,
    /// The next offset to read after this batch (below `expected` when the
    /// log restarted beneath the store's offset).
    pub next_offset: i64,
}

/// Where a record came from, so a failure can be dead-lettered with its
/// original bytes.
#[derive(Debug, Clone)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Arc<[u8]>,
    /// The record's headers but `nudge.*` ones, for its dead letter.
    pub headers: Vec<RecordHeader>,
}

impl Origin {
    pub fn dead_letter(
        &self,
        reason: String,
        journey: Option<String>,
        event_id: Option<String>,
    ) -> DeadLetter {
        DeadLetter {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            key: self.key.clone(),
            payload: self.payload.to_vec(),
            reason,
            journey,
            event_id,
            headers: self.headers.clone(),
        }
    }
}

/// Why one event (or one journey's evaluation of it) failed.
#[derive(Debug, Clone, PartialEq)]
pub struct EventFailure {
    /// Index of the event in the batch.
    pub index: usize,
    pub event_id: String,
    pub journey: Option<String>,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub records: Vec<LogRecord>,
    pub failures: Vec<EventFailure>,
    pub started: Vec<String>,
    pub ended: Vec<(String, Outcome)>,
    pub ignored: usize,
    pub duplicates: usize,
    pub context_updates: usize,
    /// Earliest due time of a step planned by this batch (to wake the scheduler).
    pub earliest_due: Option<DateTime<Utc>>,
    /// Evaluations per journey (journey, ok) for metrics.
    pub evaluations: Vec<(String, bool)>,
    /// Journeys whose evaluation ran past `rules.timeout` (one entry each time).
    pub timeouts: Vec<String>,
}

impl BatchOutcome {
    /// Adds the outcome of a part of the batch whose events started at `first`.
    pub fn absorb(&mut self, part: BatchOutcome, first: usize) {
        self.records.extend(part.records);
        self.failures.extend(part.failures.into_iter().map(|mut f| {
            f.index += first;
            f
        }));
        self.started.extend(part.started);
        self.ended.extend(part.ended);
        self.ignored += part.ignored;
        self.duplicates += part.duplicates;
        self.context_updates += part.context_updates;
        self.earliest_due = match (self.earliest_due, part.earliest_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.evaluations.extend(part.evaluations);
        self.timeouts.extend(part.timeouts);
    }
}

pub struct Pipeline {
    store: Arc<dyn Store>,
    rules: RulesHandle,
    clock: Arc<dyn Clock>,
    policy: PolicyConfig,
    cap_window: Duration,
    attribution_window: Duration,
    /// `channels.<kind>.withdraw`: where an exit withdraws delivered steps.
    withdraw: Vec<ChannelKind>,
    /// Runtime control: pilot, holdout and shadow changed while running.
    controls: Controls,
}

impl Pipeline {
    pub fn new(
        store: Arc<dyn Store>,
        rules: RulesHandle,
        clock: Arc<dyn Clock>,
        policy: PolicyConfig,
    ) -> Self {
        Self {
            store,
            rules,
            clock,
            cap_window: span(policy.cap_window),
            attribution_window: span(policy.attribution_window),
            policy,
            withdraw: vec![ChannelKind::CallTask],
            controls: Controls::default(),
        }
    }

    /// The channels whose delivered steps an exit withdraws (default: call
    /// tasks only, as `channels.call_task.withdraw` defaults to true).
    pub fn with_withdrawals(mut self, channels: Vec<ChannelKind>) -> Self {
        self.withdraw = channels;
        self
    }

    /// Decides with these runtime-control overrides too.
    pub fn with_controls(mut self, controls: Controls) -> Self {
        self.controls = controls;
        self
    }

    pub fn rules(&self) -> &RulesHandle {
        &self.rules
    }

    /// Processes events in order in one transaction, together with the source
    /// offsets they came from. Either all of it is durable or none of it.
    pub fn process(
        &self,
        events: &[Arc<Event>],
        offsets: &[SourceOffset],
    ) -> Result<BatchOutcome, StoreError> {
        self.process_with(events, &[], &[], offsets)
    }

    /// As [`process`](Self::process), for records from a source: `origins`
    /// (parallel to `events`, or empty) let failures be dead-lettered, and
    /// `rejects` (records that were not events at all) are dead-lettered in
    /// the same transaction as the offsets that pass over them.
    pub fn process_with(
        &self,
        events: &[Arc<Event>],
        origins: &[Origin],
        rejects: &[DeadLetter],
        offsets: &[SourceOffset],
    ) -> Result<BatchOutcome, StoreError> {
        let rules = self.rules.current();
        // Every script of this batch reads one propensity table.
        let _pin = rules.propensity().pin();
        let now = self.clock.now();
        let mut run = BatchRun {
            rules: &rules,
            policy: &self.policy,
            overrides: self.controls.current(),
            now,
            sends_since: now - self.cap_window,
            attribution_window: self.attribution_window,
            withdraw: &self.withdraw,
            out: BatchOutcome::default(),
            not_started: Vec::new(),
            ended_nothing: Vec::new(),
        };
        let relevant: Vec<usize> = (0..events.len())
            .filter(|&i| {
                let t = events[i].event_type.as_str();
                context::is_context_event(t) || rules.interested_in(t)
            })
            .collect();
        run.out.ignored = events.len() - relevant.len();
        if relevant.is_empty() && offsets.is_empty() && rejects.is_empty() {
            return Ok(run.out);
        }
        let mut tx = self.store.begin()?;
        let keys: Vec<String> = relevant.iter().map(|&i| events[i].dedup_key()).collect();
        let wanted: Vec<(&str, &str)> = relevant
            .iter()
            .zip(&keys)
            .map(|(&i, key)| (key.as_str(), events[i].customer.as_str()))
            .collect();
        if !wanted.is_empty() {
            tx.prefetch(&wanted, run.sends_since)?;
        }
        for letter in rejects {
            tx.add_dead_letter(letter, now)?;
        }
        for (index, key) in relevant.into_iter().zip(&keys) {
            run.event(&mut *tx, index, &events[index], key)?;
        }
        for f in &run.out.failures {
            if let Some(origin) = origins.get(f.index) {
                let letter = origin.dead_letter(
                    f.reason.clone(),
                    f.journey.clone(),
                    Some(f.event_id.clone()),
                );
                tx.add_dead_letter(&letter, now)?;
            }
        }
        for o in offsets {
            tx.set_offset(&o.topic, o.partition, o.expected, o.next_offset)?;
        }
        tx.commit()?;
        Ok(run.out)
    }
}

/// One batch being decided inside its transaction.
struct BatchRun<'a> {
    rules: &'a RuleSet,
    policy: &'a PolicyConfig,
    /// Runtime control, as in force when the batch began.
    overrides: Arc<Overrides>,
    now: DateTime<Utc>,
    /// Recent sends in the customer's context reach back to here (the cap window).
    sends_since: DateTime<Utc>,
    /// An exit still converts an instance completed no longer than this
    /// before the customer acted (the exit's own time, not when it was read).
    attribution_window: chrono::Duration,
    withdraw: &'a [ChannelKind],
    out: BatchOutcome,
    /// The journeys the current event triggered that did not start (the
    /// decision record).
    not_started: Vec<NotStarted>,
    /// The journeys the current event exits that it found nothing of.
    ended_nothing: Vec<EndedNothing>,
}

impl BatchRun<'_> {
    /// One event: dedup, the customer's context, the instances it ends, the
    /// journeys it starts. The event id is remembered (for dedup) only if it
    /// changed something; the event itself is kept for the decision record
    /// either way, with the journeys it triggered that did not start.
    fn event(
        &mut self,
        tx: &mut dyn Tx,
        index: usize,
        event: &Arc<Event>,
        dedup_key: &str,
    ) -> Result<(), StoreError> {
        if tx.already_processed(dedup_key)? {
            self.out.duplicates += 1;
            return Ok(());
        }
        // A time ahead of the clock counts as now (a producer's clock
        // running fast), for the scripts as for what is remembered: an exit
        // stamped years ahead would otherwise refuse every later trigger of
        // its key for as long as it is kept.
        let clamped;
        let event = if event.time > self.now {
            clamped = Arc::new(Event {
                time: self.now,
                ..Event::clone(event)
            });
            &clamped
        } else {
            event
        };
        let mut customer = tx.customer(&event.customer, self.sends_since)?;
        let mut context_updated = false;
        // Only an update of the context can take a channel away.
        let before = context::is_context_event(&event.event_type)
            .then(|| customer.contactable(self.withdraw));
        let mut changed = match customer.apply_update_at(event, self.now) {
            Ok(true) => {
                self.context_changed(tx, &customer, before)?;
                context_updated = true;
                true
            }
            Ok(false) => false,
            Err(e) => {
                // A contact update's good fields are applied beside a bad one.
                let partly = !e.applied.is_empty();
                if partly {
                    self.context_changed(tx, &customer, before)?;
                }
                let reason = e.to_string();
                // Dead-lettered with its reason (not remembered as
                // processed, so a corrected copy with its id applies); the
                // decision record says so.
                tx.record_event(&ReceivedEvent {
                    refused: Some(reason.clone()),
                    ..self.received(event, partly)
                })?;
                self.out.failures.push(EventFailure {
                    index,
                    event_id: event.id.clone(),
                    journey: None,
                    reason,
                });
                return Ok(());
            }
        };
        changed |= self.exit_instances(tx, index, event, &mut customer)?;
        let mut triggered = self.rules.triggered_by(&event.event_type).peekable();
        if triggered.peek().is_some() {
            let customer = Arc::new(customer);
            for journey in triggered {
                changed |= self.start_journey(tx, index, event, journey, &customer)?;
            }
        }
        if changed {
            tx.mark_processed(dedup_key, self.now)?;
        }
        tx.record_event(&self.received(event, context_updated))?;
        Ok(())
    }

    /// The decision record's entry of `event`, with the journeys it did not
    /// start (taken: the next event starts its own list).
    fn received(&mut self, event: &Event, context_updated: bool) -> ReceivedEvent {
        ReceivedEvent {
            event_id: event.id.clone(),
            customer: event.customer.clone(),
            event_type: event.event_type.clone(),
            event_time: event.time,
            received_at: self.now,
            context_updated,
            not_started: std::mem::take(&mut self.not_started),
            refused: None,
            ended_nothing: std::mem::take(&mut self.ended_nothing),
        }
    }

    /// Notes, for the decision record, that `journey` did not start.
    fn not_started(&mut self, journey: &Journey, why: NotStartedWhy, reason: String) {
        self.not_started.push(NotStarted {
            journey: journey.name.clone(),
            rule_hash: journey.hash.clone(),
            why,
            reason,
        });
    }

    /// Ends every instance the event exits, logging its unsent steps (or the
    /// conversion itself when all were sent), and remembers the exit in the
    /// customer's context. Returns whether anything changed.
    fn exit_instances(
        &mut self,
        tx: &mut dyn Tx,
        index: usize,
        event: &Event,
        customer: &mut CustomerContext,
    ) -> Result<bool, StoreError> {
        let mut ended_any = false;
        let mut remembered = false;
        for (journey, exit) in self.rules.exited_by(&event.event_type) {
            // An exit without the instance key cannot say which instance
            // it ends: dead-lettered with the journey, so that a customer
            // who signed is not left to be reminded without a trace.
            let key = match instance_key(journey, event) {
                Ok(key) => key,
                Err(mut e) => {
                    e.message = format!("{}: nothing ended", e.message);
                    // Said in the decision record too: a customer who acted
                    // and is still reminded is what someone looks up there.
                    self.ended_nothing.push(EndedNothing {
                        journey: journey.name.clone(),
                        key: String::new(),
                        completed_since: self.now,
                        refused: Some(e.message.clone()),
                    });
                    self.out.failures.push(rule_failure(index, event, e));
                    continue;
                }
            };
            // Remembered whether or not an instance is open: a trigger read
            // after it (from another partition, or sent out of order) must
            // not start what the customer has already done.
            customer.remember_exit(
                ExitRead {
                    journey: journey.name.clone(),
                    key: key.clone(),
                    event_type: event.event_type.clone(),
                    event_id: event.id.clone(),
                    time: event.time,
                },
                self.now,
            );
            remembered = true;
            // Counted from when the customer acted: an exit read late (a
            // backlog, an outage, a replay) converts what it would have
            // converted when read at once.
            let completed_since = event.time.min(self.now) - self.attribution_window;
            let Some(instance) =
                tx.exitable_instance(&event.customer, &journey.name, &key, completed_since)?
            else {
                // Kept for the decision record: why this converted nothing.
                self.ended_nothing.push(EndedNothing {
                    journey: journey.name.clone(),
                    key,
                    completed_since,
                    refused: None,
                });
                continue;
            };
            let status = InstanceStatus::from(exit);
            let outcome = Outcome::from(exit);
            let cancelled = tx.close_instance(&instance.id, status, self.now)?;
            // The customer acted: each step sent within the attribution
            // window before it counts as converted (`crate::propensity`).
            if status == InstanceStatus::Converted {
                // Sends after the customer acted (the exit's own time, when
                // it was read late) did not bring the conversion about; the
                // slack allows for the producer's clock running behind ours.
                // The window reaches back from when the customer acted.
                let acted = (event.time + context::EXIT_CLOCK_SLACK).min(self.now);
                tx.credit_conversion(&instance.id, completed_since, acted)?;
            }
            // What was delivered and is no longer wanted is taken back:
            // planned in this transaction, sent by the scheduler.
            if !tx
                .plan_withdrawals(&instance.id, self.withdraw, self.now)?
                .is_empty()
            {
                self.out.earliest_due =
                    Some(self.out.earliest_due.map_or(self.now, |t| t.min(self.now)));
            }
            // About the instance as a whole; each cancelled step fills in its own.
            let whole = StepRef {
                customer: &event.customer,
                journey: &journey.name,
                instance: &instance.id,
                step: "-",
                channel: "-",
                template: "-",
                rule_hash: &instance.rule_hash,
            };
            let reason = format!("{} ended the journey", event.event_type);
            // A control-group or shadow instance's steps were never to be
            // sent: they stay in their arm, not losses of the journey.
            let (step_outcome, step_reason) = match cancelled.is_empty() {
                true => (outcome, String::new()),
                false => match tx.instance_mode(&instance.id)? {
                    Some(Mode::HeldOut) => (
                        Outcome::HeldOut,
                        format!("control group: not sent; {reason}"),
                    ),
                    Some(Mode::Shadow) => {
                        (Outcome::Shadow, format!("shadow mode: not sent; {reason}"))
                    }
                    _ => (outcome, format!("{reason}; step not sent")),
                },
            };
            let mut records: Vec<LogRecord> = cancelled
                .iter()
                .map(|s| {
                    let subject = StepRef {
                        step: &s.step,
                        channel: s.channel.as_str(),
                        template: &s.template,
                        ..whole
                    };
                    LogRecord::about(subject, self.now, step_outcome, step_reason.clone())
                })
                .collect();
            if records.is_empty() {
                records.push(LogRecord::about(
                    whole,
                    self.now,
                    outcome,
                    format!("{reason} after all steps"),
                ));
            }
            for record in records {
                self.log(tx, record, event)?;
            }
            for j in customer
                .journeys
                .iter_mut()
                .filter(|j| j.journey == journey.name && j.key == key && j.status.exitable())
            {
                j.status = status;
                j.ended_at = Some(self.now);
            }
            self.out.ended.push((journey.name.clone(), outcome));
            ended_any = true;
        }
        if remembered {
            tx.save_customer(customer, self.now)?;
        }
        Ok(ended_any || remembered)
    }

    /// Saves an updated context, and withdraws what was delivered on a
    /// channel the update took away (`before`: the channels it was
    /// contactable on).
    fn context_changed(
        &mut self,
        tx: &mut dyn Tx,
        customer: &CustomerContext,
        before: Option<std::collections::BTreeSet<(ChannelKind, Category)>>,
    ) -> Result<(), StoreError> {
        tx.save_customer(customer, self.now)?;
        self.out.context_updates += 1;
        let lost: Vec<_> = before
            .unwrap_or_default()
            .difference(&customer.contactable(self.withdraw))
            .copied()
            .collect();
        if !lost.is_empty() {
            self.withdraw_lost_contact(tx, customer, &lost)?;
        }
        Ok(())
    }

    /// The customer can no longer be contacted on a channel whose deliveries
    /// are taken back (`channels.<kind>.withdraw`, call tasks by default):
    /// consent withdrawn, or the address or number removed. What was
    /// delivered on it by a journey still running (or completed within the
    /// attribution window) is withdrawn, so an agent does not phone a
    /// customer who has just said not to; steps still to come are held by
    /// the policy when due.
    fn withdraw_lost_contact(
        &mut self,
        tx: &mut dyn Tx,
        customer: &CustomerContext,
        lost: &[(ChannelKind, Category)],
    ) -> Result<(), StoreError> {
        let since = self.now - self.attribution_window;
        for j in customer
            .journeys
            .iter()
            .filter(|j| j.status.exitable() && j.mode == Mode::Live)
        {
            let category = self.rules.journey(&j.journey).map(|r| r.category);
            let channels: Vec<ChannelKind> = lost
                .iter()
                .filter(|(_, c)| category.is_none_or(|category| category == *c))
                .map(|(channel, _)| *channel)
                .collect();
            if channels.is_empty() {
                continue;
            }
            let Some(instance) = tx.exitable_instance(&customer.id, &j.journey, &j.key, since)?
            else {
                continue;
            };
            if !tx
                .plan_withdrawals(&instance.id, &channels, self.now)?
                .is_empty()
            {
                self.out.earliest_due =
                    Some(self.out.earliest_due.map_or(self.now, |t| t.min(self.now)));
            }
        }
        Ok(())
    }

    /// Asks one triggered journey whether to start, and starts it. Returns
    /// whether anything was written.
    fn start_journey(
        &mut self,
        tx: &mut dyn Tx,
        index: usize,
        event: &Arc<Event>,
        journey: &Journey,
        customer: &Arc<CustomerContext>,
    ) -> Result<bool, StoreError> {
        let settings = self.settings(journey);
        let pilot = settings.pilot_percent.value;
        if pilot < 100 && bucket(&event.customer, &journey.name, "pilot") >= pilot {
            let reason = format!("customer outside the pilot ({pilot}% of customers)");
            self.not_started(journey, NotStartedWhy::Pilot, reason);
            return Ok(false);
        }
        let decision = self.rules.decide(journey, event, customer);
        self.out
            .evaluations
            .push((journey.name.clone(), decision.is_ok()));
        let (key, vars) = match decision {
            Ok(Decision::Start { key, vars }) => (key, vars),
            Ok(Decision::Skip(reason)) => {
                self.not_started(journey, NotStartedWhy::Skip, reason);
                return Ok(false);
            }
            Err(e) => {
                if e.timed_out {
                    self.out.timeouts.push(journey.name.clone());
                }
                self.not_started(journey, NotStartedWhy::RuleError, e.message.clone());
                self.out.failures.push(rule_failure(index, event, e));
                return Ok(false);
            }
        };
        let key = match key.map(Ok).unwrap_or_else(|| instance_key(journey, event)) {
            Ok(k) => k,
            Err(e) => {
                self.not_started(journey, NotStartedWhy::RuleError, e.message.clone());
                self.out.failures.push(rule_failure(index, event, e));
                return Ok(false);
            }
        };
        if let Some(exit) = customer.exit_since(&journey.name, &key, event.time) {
            let reason = format!(
                "{} (event {}, at {}) ended key {key} before this trigger was read: the customer had already acted",
                exit.event_type,
                exit.event_id,
                exit.time.format("%Y-%m-%d %H:%M:%S UTC")
            );
            self.not_started(journey, NotStartedWhy::AlreadyEnded, reason);
            return Ok(false);
        }
        if let Some(open) = tx.open_instance(&event.customer, &journey.name, &key)? {
            // Already running: starting again is a no-op.
            let reason = format!("instance {} is open for key {key}", open.id);
            self.not_started(journey, NotStartedWhy::AlreadyOpen, reason);
            return Ok(false);
        }
        // Delays count from the journey start: the event's time, so a
        // replayed or late event plans steps that may already be expired.
        let start = event.time.min(self.now);
        let id = instance_id(&journey.name, &event.customer, &key, &event.id);
        if in_cooldown(journey, customer, start) {
            self.log_cooldown(tx, event, journey, &id)?;
            return Ok(true);
        }
        let steps = plan_steps(journey, start, customer);
        if let Some(first) = steps.iter().map(|s| s.due_at).min() {
            self.out.earliest_due = Some(self.out.earliest_due.map_or(first, |e| e.min(first)));
        }
        let instance = NewInstance {
            id: id.clone(),
            customer: event.customer.clone(),
            journey: journey.name.clone(),
            key,
            mode: self.mode(journey, &event.customer),
            category: journey.category,
            started_at: start,
            rule_hash: journey.hash.clone(),
            trigger_event: event.id.clone(),
            vars,
            decision_inputs: decision_inputs(event, customer, &self.rules.version),
        };
        tx.start_instance(&instance, &steps)?;
        self.out.started.push(id);
        Ok(true)
    }

    /// Shadow, control group or live, by the journey and a stable hash of the customer.
    fn mode(&self, journey: &Journey, customer: &str) -> Mode {
        let settings = self.settings(journey);
        let holdout = settings.holdout_percent.value;
        if settings.shadow.value {
            Mode::Shadow
        } else if holdout > 0 && bucket(customer, &journey.name, "holdout") < holdout {
            Mode::HeldOut
        } else {
            Mode::Live
        }
    }

    /// The journey's settings in force: script, config and runtime control.
    fn settings(&self, journey: &Journey) -> JourneySettings {
        JourneySettings::of(journey, self.policy, self.overrides.journey(&journey.name))
    }

    /// Every step of a journey that may not start again yet is logged suppressed.
    fn log_cooldown(
        &mut self,
        tx: &mut dyn Tx,
        event: &Event,
        journey: &Journey,
        instance: &str,
    ) -> Result<(), StoreError> {
        let cooldown = crate::humanize::duration(journey.cooldown.unwrap_or_default());
        for s in &journey.steps {
            let subject = StepRef {
                customer: &event.customer,
                journey: &journey.name,
                instance,
                step: &s.id,
                channel: s.channel.as_str(),
                template: &s.template,
                rule_hash: &journey.hash,
            };
            let reason = format!("cooldown: {} ended within {cooldown}", journey.name);
            let record = LogRecord::about(subject, self.now, Outcome::Suppressed, reason);
            self.log(tx, record, event)?;
        }
        Ok(())
    }

    /// Appends a record caused by `event` and keeps it for the caller.
    fn log(
        &mut self,
        tx: &mut dyn Tx,
        mut record: LogRecord,
        event: &Event,
    ) -> Result<(), StoreError> {
        record.event_id = Some(event.id.clone());
        tx.append_log(&record)?;
        self.out.records.push(record);
        Ok(())
    }
}

/// Whether an instance of the journey ended within its cooldown before `start`.
fn in_cooldown(journey: &Journey, customer: &CustomerContext, start: DateTime<Utc>) -> bool {
    let Some(cooldown) = journey.cooldown else {
        return false;
    };
    let since = start - span(cooldown);
    customer
        .journeys
        .iter()
        .any(|j| j.journey == journey.name && j.ended_at.is_some_and(|e| e > since))
}

/// The journey's steps, due their delay after `start`.
fn plan_steps(journey: &Journey, start: DateTime<Utc>, customer: &CustomerContext) -> Vec<NewStep> {
    journey
        .steps
        .iter()
        .enumerate()
        .map(|(seq, s)| NewStep {
            step: s.id.clone(),
            seq: seq as u32,
            channel: s.channel_for(customer),
            template: s.template.clone(),
            condition: s.condition.clone(),
            due_at: start + span(s.delay),
        })
        .collect()
}

/// What the script saw when it decided, kept with the instance (the decision
/// record): the event's identity and the customer's context at that moment,
/// contact details reduced to whether they exist.
fn decision_inputs(event: &Event, customer: &CustomerContext, rule_set: &str) -> serde_json::Value {
    let open_journeys: Vec<&str> = customer
        .journeys
        .iter()
        .filter(|j| j.status == InstanceStatus::Open)
        .map(|j| j.journey.as_str())
        .collect();
    json!({
        "event": {"id": event.id, "type": event.event_type, "time": event.time},
        "customer": {
            "has_app": customer.app_installed,
            "has_email": customer.email.is_some(),
            "has_phone": customer.phone.is_some(),
            "timezone": customer.timezone,
            "consents": customer.consents,
            "profile": profile_seen(customer),
            "open_journeys": open_journeys,
            "recent_contacts": customer.recent_sends.len(),
        },
        "rule_set": rule_set,
    })
}

/// The profile as the decision record keeps it: a profile stored before
/// profiles were bounded, over the bound, is summarised, not copied into
/// every record.
fn profile_seen(customer: &CustomerContext) -> serde_json::Value {
    let profile = &customer.profile;
    if profile.len() <= context::PROFILE_MAX_FIELDS {
        let bytes = serde_json::to_vec(profile).map_or(usize::MAX, |v| v.len());
        if bytes <= context::PROFILE_MAX_BYTES {
            return json!(profile);
        }
    }
    json!({"omitted": format!("{} fields, over the bound of a profile", profile.len())})
}

fn rule_failure(index: usize, event: &Event, e: RuleError) -> EventFailure {
    EventFailure {
        index,
        event_id: event.id.clone(),
        journey: Some(e.journey.clone()),
        reason: e.to_string(),
    }
}

/// The instance key: the journey's key field from the event data, or the customer id.
fn instance_key(journey: &Journey, event: &Event) -> Result<String, RuleError> {
    match &journey.key_field {
        None => Ok(event.customer.clone()),
        Some(field) => event.data_key(field).ok_or_else(|| RuleError {
            journey: journey.name.clone(),
            file: journey.file.display().to_string(),
            line: 0,
            column: 0,
            message: format!(
                "event {} has no data.{field}, the journey's instance key",
                event.id
            ),
            timed_out: false,
        }),
    }
}

/// Records the rule set's version in the store (for the decision trail).
pub fn record_rules_version(
    store: &dyn Store,
    rules: &RuleSet,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let files: serde_json::Value = rules
        .journeys()
        .iter()
        .map(|j| {
            (
                j.file.display().to_string(),
                serde_json::Value::String(j.hash.clone()),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    store.record_rules(&rules.version, &files, at)
}
