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

use crate::audit::{LogRecord, Outcome};
use crate::clock::Clock;
use crate::config::PolicyConfig;
use crate::context;
use crate::event::Event;
use crate::rules::{bucket, Decision, Journey, RuleError, RuleSet, RulesHandle};
use crate::store::{step_record, DeadLetter, Mode, NewInstance, NewStep, Store, StoreError};

/// Where a batch of records came from, committed with its effects.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceOffset {
    pub topic: String,
    pub partition: i32,
    /// The next offset to read after this batch.
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
}

pub struct Pipeline {
    store: Arc<dyn Store>,
    rules: RulesHandle,
    clock: Arc<dyn Clock>,
    policy: PolicyConfig,
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
            policy,
        }
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
        let now = self.clock.now();
        let window_start =
            now - Duration::from_std(self.policy.cap_window).unwrap_or(Duration::days(1));
        let attribution =
            Duration::from_std(self.policy.attribution_window).unwrap_or(Duration::days(30));
        let mut out = BatchOutcome::default();
        let relevant: Vec<usize> = (0..events.len())
            .filter(|&i| {
                let t = events[i].event_type.as_str();
                context::is_context_event(t) || rules.interested_in(t)
            })
            .collect();
        out.ignored = events.len() - relevant.len();
        if relevant.is_empty() && offsets.is_empty() && rejects.is_empty() {
            return Ok(out);
        }
        let mut tx = self.store.begin()?;
        for letter in rejects {
            tx.add_dead_letter(letter, now)?;
        }
        for index in relevant {
            let event = &events[index];
            if tx.seen(&event.id)? {
                out.duplicates += 1;
                continue;
            }
            let mut customer = tx.customer(&event.customer, window_start)?;
            let mut changed = false;
            match customer.apply_update(event) {
                Ok(true) => {
                    tx.save_customer(&customer, now)?;
                    out.context_updates += 1;
                    changed = true;
                }
                Ok(false) => {}
                Err(e) => {
                    out.failures.push(EventFailure {
                        index,
                        event_id: event.id.clone(),
                        journey: None,
                        reason: e.to_string(),
                    });
                    continue;
                }
            }

            for (journey, outcome) in rules.exited_by(&event.event_type) {
                let key = match instance_key(journey, event) {
                    Ok(k) => k,
                    Err(_) => continue, // an exit without the key ends nothing
                };
                let Some(open) =
                    tx.exit_target(&event.customer, &journey.name, &key, now - attribution)?
                else {
                    continue;
                };
                let cancelled = tx.close_instance(&open.id, outcome.as_str(), now)?;
                let step_outcome = match outcome {
                    crate::rules::ExitOutcome::Converted => Outcome::Converted,
                    crate::rules::ExitOutcome::Cancelled => Outcome::Cancelled,
                };
                let reason = format!("{} ended the journey", event.event_type);
                let mut records: Vec<LogRecord> = cancelled
                    .iter()
                    .map(|s| {
                        step_record(
                            now,
                            &event.customer,
                            &journey.name,
                            &open.id,
                            &s.step,
                            s.channel.as_str(),
                            &s.template,
                            step_outcome,
                            format!("{reason}; step not sent"),
                            &open.rule_hash,
                        )
                    })
                    .collect();
                if records.is_empty() {
                    records.push(step_record(
                        now,
                        &event.customer,
                        &journey.name,
                        &open.id,
                        "-",
                        "-",
                        "-",
                        step_outcome,
                        format!("{reason} after all steps"),
                        &open.rule_hash,
                    ));
                }
                for mut r in records {
                    r.event_id = Some(event.id.clone());
                    tx.append_log(&r)?;
                    out.records.push(r);
                }
                for j in customer.journeys.iter_mut().filter(|j| {
                    j.journey == journey.name
                        && j.key == key
                        && (j.status == "open" || j.status == "completed")
                }) {
                    j.status = outcome.as_str().into();
                    j.ended_at = Some(now);
                }
                out.ended.push((journey.name.clone(), step_outcome));
                changed = true;
            }

            let mut triggered = rules.triggered_by(&event.event_type).peekable();
            if triggered.peek().is_some() {
                let customer = Arc::new(customer);
                for journey in triggered {
                    if journey.pilot_percent < 100
                        && bucket(&event.customer, &journey.name, "pilot") >= journey.pilot_percent
                    {
                        continue;
                    }
                    let decision = rules.decide(journey, event, &customer);
                    out.evaluations
                        .push((journey.name.clone(), decision.is_ok()));
                    let (key, vars) = match decision {
                        Ok(Decision::Start { key, vars }) => (key, vars),
                        Ok(Decision::Skip(_)) => continue,
                        Err(e) => {
                            out.failures.push(rule_failure(index, event, e));
                            continue;
                        }
                    };
                    let key = match key.map(Ok).unwrap_or_else(|| instance_key(journey, event)) {
                        Ok(k) => k,
                        Err(e) => {
                            out.failures.push(rule_failure(index, event, e));
                            continue;
                        }
                    };
                    if tx
                        .open_instance(&event.customer, &journey.name, &key)?
                        .is_some()
                    {
                        continue; // already running: starting again is a no-op
                    }
                    // Delays count from the journey start: the event's time, so a
                    // replayed or late event plans steps that may already be expired.
                    let start = event.time.min(now);
                    let id = instance_id(&journey.name, &event.customer, &key, &event.id);
                    if let Some(cooldown) = journey.cooldown {
                        let cooldown = Duration::from_std(cooldown).unwrap_or(Duration::zero());
                        let recent = customer.journeys.iter().any(|j| {
                            j.journey == journey.name
                                && j.ended_at.is_some_and(|e| e > start - cooldown)
                        });
                        if recent {
                            for s in &journey.steps {
                                let mut r = step_record(
                                    now,
                                    &event.customer,
                                    &journey.name,
                                    &id,
                                    &s.id,
                                    s.channel.as_str(),
                                    &s.template,
                                    Outcome::Suppressed,
                                    format!(
                                        "cooldown: {} ended within {}",
                                        journey.name,
                                        crate::humanize::duration(
                                            journey.cooldown.unwrap_or_default()
                                        )
                                    ),
                                    &journey.hash,
                                );
                                r.event_id = Some(event.id.clone());
                                tx.append_log(&r)?;
                                out.records.push(r);
                            }
                            changed = true;
                            continue;
                        }
                    }
                    let mode =
                        if journey.shadow || self.policy.shadow_journeys.contains(&journey.name) {
                            Mode::Shadow
                        } else if journey.holdout_percent > 0
                            && bucket(&event.customer, &journey.name, "holdout")
                                < journey.holdout_percent
                        {
                            Mode::HeldOut
                        } else {
                            Mode::Live
                        };
                    let steps: Vec<NewStep> = journey
                        .steps
                        .iter()
                        .enumerate()
                        .map(|(seq, s)| NewStep {
                            step: s.id.clone(),
                            seq: seq as u32,
                            channel: s.channel,
                            template: s.template.clone(),
                            condition: s.condition.clone(),
                            due_at: start + Duration::from_std(s.delay).unwrap_or(Duration::zero()),
                        })
                        .collect();
                    if let Some(first) = steps.iter().map(|s| s.due_at).min() {
                        out.earliest_due = Some(out.earliest_due.map_or(first, |e| e.min(first)));
                    }
                    let seen = json!({
                        "event": {"id": event.id, "type": event.event_type, "time": event.time},
                        "customer": {
                            "has_app": customer.app_installed,
                            "has_email": customer.email.is_some(),
                            "has_phone": customer.phone.is_some(),
                            "timezone": customer.timezone,
                            "consents": customer.consents,
                            "profile": customer.profile,
                            "open_journeys": customer.journeys.iter().filter(|j| j.status == "open").map(|j| &j.journey).collect::<Vec<_>>(),
                            "recent_contacts": customer.recent_sends.len(),
                        },
                        "rule_set": rules.version,
                    });
                    tx.start_instance(
                        &NewInstance {
                            id: id.clone(),
                            customer: event.customer.clone(),
                            journey: journey.name.clone(),
                            key,
                            mode,
                            category: journey.category,
                            started_at: start,
                            rule_hash: journey.hash.clone(),
                            trigger_event: event.id.clone(),
                            vars,
                            seen,
                        },
                        &steps,
                    )?;
                    out.started.push(id);
                    changed = true;
                }
            }
            if changed {
                tx.mark_processed(&event.id, now)?;
            }
        }
        for f in &out.failures {
            if let Some(origin) = origins.get(f.index) {
                tx.add_dead_letter(
                    &origin.dead_letter(
                        f.reason.clone(),
                        f.journey.clone(),
                        Some(f.event_id.clone()),
                    ),
                    now,
                )?;
            }
        }
        for o in offsets {
            tx.set_offset(&o.topic, o.partition, o.next_offset)?;
        }
        tx.commit()?;
        Ok(out)
    }
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
        }),
    }
}

/// Deterministic, so re-processing the same event names the same instance
/// and the idempotency keys of its steps do not change.
fn instance_id(journey: &str, customer: &str, key: &str, event_id: &str) -> String {
    let digest =
        crate::rules::content_hash(format!("{customer}\u{1f}{key}\u{1f}{event_id}").as_bytes());
    format!("{journey}-{digest}")
}

/// Loads rules and records the version in the store (for the decision trail).
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
