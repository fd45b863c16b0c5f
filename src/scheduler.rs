//! Sends due steps. One loop per channel sleeps until that channel's next due
//! step (or until the pipeline plans an earlier one), claims a batch under a
//! lease, checks the contact policy at send time and hands each step to the
//! channel adapter with bounded concurrency. Retries are rescheduled in the
//! store with backoff, so a failing endpoint never blocks a worker or another
//! channel, and a crash loses nothing: an unfinished claim is taken again when
//! its lease runs out and sent with the same idempotency key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::Rng;
use tokio::sync::{watch, Notify};

use crate::audit::{LogRecord, Outcome};
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::context::CustomerContext;
use crate::dispatch::{ChannelKind, Channels, DispatchError, HistoryEntry, Message, Variables};
use crate::policy::{Policy, Verdict};
use crate::rules::RulesHandle;
use crate::store::{step_record, DueStep, StepResult, Store, StoreError};

/// What deciding and sending a claimed batch needs from the store.
struct BatchContext {
    customers: HashMap<String, Mutex<CustomerContext>>,
    /// The journey so far of each claimed step's instance.
    histories: HashMap<String, Vec<HistoryEntry>>,
}

pub struct Scheduler {
    store: Arc<dyn Store>,
    rules: RulesHandle,
    channels: Channels,
    clock: Arc<dyn Clock>,
    policy: Policy,
    config: SchedulerConfig,
    lateness: HashMap<ChannelKind, Duration>,
    wake: HashMap<ChannelKind, Arc<Notify>>,
}

const DEFAULT_LATENESS: Duration = Duration::from_secs(12 * 3600);
/// Most step outcomes written in one store transaction.
const FINISH_BATCH: usize = 128;
/// How long the daemon lets finished steps gather before writing them.
const FINISH_LINGER: Duration = Duration::from_millis(5);
/// Upper bound on a sleep, so expired leases of dead workers are noticed.
const MAX_IDLE: chrono::Duration = chrono::Duration::seconds(30);

impl Scheduler {
    pub fn new(
        store: Arc<dyn Store>,
        rules: RulesHandle,
        channels: Channels,
        clock: Arc<dyn Clock>,
        policy: Policy,
        config: SchedulerConfig,
        lateness: HashMap<ChannelKind, Duration>,
    ) -> Self {
        let wake = ChannelKind::ALL
            .into_iter()
            .map(|c| (c, Arc::new(Notify::new())))
            .collect();
        Self {
            store,
            rules,
            channels,
            clock,
            policy,
            config,
            lateness,
            wake,
        }
    }

    /// Tells the channel loops that new steps may be due earlier than they planned.
    pub fn wake(&self) {
        for n in self.wake.values() {
            n.notify_one();
        }
    }

    /// Sends every step due now on every channel, concurrently per channel,
    /// and returns the log records written.
    pub async fn run_due(&self) -> Result<Vec<LogRecord>, StoreError> {
        let per_channel = futures::future::join_all(
            ChannelKind::ALL
                .into_iter()
                .map(|c| self.run_channel_due(c, None, true)),
        )
        .await;
        let mut records = Vec::new();
        for r in per_channel {
            records.extend(r?);
        }
        records.sort_by_key(|r| r.seq);
        Ok(records)
    }

    /// Claims and handles due steps of one channel until none is due.
    ///
    /// Store work happens off the async workers (`spawn_blocking`), once per
    /// batch where it can: the claim, then the customers and histories of the
    /// whole batch, so that the sends only wait on the network. Outcomes go to
    /// a writer that records each group of steps that finished together in
    /// one transaction while the next sends are under way. `keep` returns the
    /// log records and writes each group at once (`run_due`); the daemon
    /// keeps nothing and lets groups gather for up to `FINISH_LINGER`.
    async fn run_channel_due(
        &self,
        channel: ChannelKind,
        stop: Option<&watch::Receiver<bool>>,
        keep: bool,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<StepResult>(4 * FINISH_BATCH);
        let writer = async {
            let mut records = Vec::new();
            let mut chunk = Vec::with_capacity(FINISH_BATCH);
            while done_rx.recv_many(&mut chunk, FINISH_BATCH).await > 0 {
                // Let a group gather for a moment: each transaction rewrites
                // whole pages, so one per step would cost more than the step.
                if !keep {
                    let deadline = tokio::time::Instant::now() + FINISH_LINGER;
                    while chunk.len() < FINISH_BATCH {
                        let room = FINISH_BATCH - chunk.len();
                        match tokio::time::timeout_at(deadline, done_rx.recv_many(&mut chunk, room))
                            .await
                        {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        }
                    }
                }
                let results = std::mem::replace(&mut chunk, Vec::with_capacity(FINISH_BATCH));
                let written = self
                    .blocking(move |store| store.finish_steps(results))
                    .await?;
                if keep {
                    records.extend(written);
                }
            }
            Ok::<_, StoreError>(records)
        };
        // Claims batches (with what deciding them needs) one ahead of the sends,
        // so that the channel never idles between batches.
        let (batch_tx, batch_rx) =
            tokio::sync::mpsc::channel::<(Vec<DueStep>, Arc<BatchContext>)>(1);
        let claimer = async move {
            let lease = chrono::Duration::from_std(self.config.lease)
                .unwrap_or(chrono::Duration::minutes(5));
            let window = chrono::Duration::from_std(self.policy.config().cap_window)
                .unwrap_or(chrono::Duration::days(1));
            let limit = self.config.batch_size;
            while !stop.is_some_and(|s| *s.borrow()) {
                let now = self.clock.now();
                let claimed = self
                    .blocking(move |store| store.claim_due(channel, now, limit, now + lease))
                    .await?;
                if claimed.is_empty() {
                    break;
                }
                let context = Arc::new(self.batch_context(&claimed, now - window).await?);
                if batch_tx.send((claimed, context)).await.is_err() {
                    break; // the sender failed; its error is returned below
                }
            }
            Ok::<_, StoreError>(())
        };
        let sender = async move {
            let steps = futures::stream::unfold(batch_rx, |mut rx| async move {
                rx.recv().await.map(|batch| (batch, rx))
            })
            .flat_map(|(claimed, context)| {
                futures::stream::iter(claimed.into_iter().map(move |s| (s, context.clone())))
            });
            // Stopping, steps claimed but not yet started are handed back by `handle`.
            let handled = steps
                .map(|(step, context)| async move { self.handle(step, &context, stop).await })
                .buffer_unordered(self.channels.concurrency(channel));
            let mut handled = std::pin::pin!(handled);
            while let Some(result) = handled.next().await {
                if let Some(result) = result? {
                    if done_tx.send(result).await.is_err() {
                        break; // the writer failed; its error is returned below
                    }
                }
            }
            Ok::<_, StoreError>(())
        };
        let (claimed, sent, written) = futures::join!(claimer, sender, writer);
        let records = written?;
        sent?;
        claimed?;
        Ok(records)
    }

    /// Runs store work on the blocking pool, not on an async worker.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(store.as_ref()))
            .await
            .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
    }

    /// The customers and the journey-so-far of a claimed batch, read at once.
    async fn batch_context(
        &self,
        claimed: &[DueStep],
        window_start: DateTime<Utc>,
    ) -> Result<BatchContext, StoreError> {
        let mut ids: Vec<String> = claimed.iter().map(|s| s.customer.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        let instances: Vec<String> = claimed.iter().map(|s| s.instance_id.clone()).collect();
        // Conditions may look at everything; the policy only at recent sends,
        // and only when a frequency cap is set.
        let conditions = claimed.iter().any(|s| s.condition.is_some());
        let capped = self.policy.config().max_per_customer > 0;
        let sends_since = (conditions || capped).then_some(window_start);
        let (customers, histories) = self
            .blocking(move |store| {
                let customers = store.customers(&ids, sends_since, conditions)?;
                let histories = store.histories(&instances)?;
                Ok((
                    ids.into_iter()
                        .zip(customers.into_iter().map(Mutex::new))
                        .collect(),
                    instances.into_iter().zip(histories).collect(),
                ))
            })
            .await?;
        Ok(BatchContext {
            customers,
            histories,
        })
    }

    /// The daemon loop: runs until `shutdown` turns true; then sends already
    /// under way finish (bounded by the channel timeout) and claimed steps not
    /// yet started are handed back for the next run.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let loops = ChannelKind::ALL.into_iter().map(|channel| {
            let this = self.clone();
            let mut shutdown = shutdown.clone();
            async move {
                while !*shutdown.borrow() {
                    if let Err(e) = this.run_channel_due(channel, Some(&shutdown), false).await {
                        tracing::error!(%channel, error = %e, "scheduler round failed; retrying in 1s");
                        metrics::counter!("nudge_scheduler_errors_total").increment(1);
                        // The store is failing: pause rather than spin on it.
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                    let now = this.clock.now();
                    let next = match this.store.next_due(Some(channel)) {
                        Ok(Some(t)) => t.min(now + MAX_IDLE),
                        Ok(None) => now + MAX_IDLE,
                        Err(e) => {
                            tracing::error!(%channel, error = %e, "cannot read next due step");
                            now + chrono::Duration::seconds(1)
                        }
                    };
                    if next <= now {
                        continue;
                    }
                    tokio::select! {
                        _ = this.clock.sleep_until(next) => {}
                        _ = this.wake[&channel].notified() => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        });
        futures::future::join_all(loops).await;
    }

    /// Decides and sends one claimed step and says what to record (the caller
    /// writes it). When shutting down, a step not yet started is handed back
    /// unsent (`None`) instead of holding up the drain.
    async fn handle(
        &self,
        mut step: DueStep,
        context: &BatchContext,
        stop: Option<&watch::Receiver<bool>>,
    ) -> Result<Option<StepResult>, StoreError> {
        if stop.is_some_and(|s| *s.borrow()) {
            self.store.release_claim(&step.instance_id, &step.step)?;
            return Ok(None);
        }
        let now = self.clock.now();
        // Only a claim that outlived its worker can belong to an ended
        // instance (closing cancels pending steps): settle it, never send it.
        let ended = match step.instance_status.as_str() {
            "converted" => Some(Outcome::Converted),
            "cancelled" => Some(Outcome::Cancelled),
            _ => None,
        };
        if let Some(outcome) = ended {
            let mut record = step_record(
                now,
                &step.customer,
                &step.journey,
                &step.instance_id,
                &step.step,
                step.channel.as_str(),
                &step.template,
                outcome,
                format!(
                    "journey {} while the step was claimed; step not sent",
                    step.instance_status
                ),
                &step.rule_hash,
            );
            record.attempt = step.attempt;
            return Ok(Some(StepResult {
                record,
                again_at: None,
                replan: false,
                claimed_row: Some(step.row),
            }));
        }
        let lateness = self
            .lateness
            .get(&step.channel)
            .copied()
            .unwrap_or(DEFAULT_LATENESS);
        let Some(customer) = context.customers.get(&step.customer) else {
            return Err(StoreError::Corrupt(format!(
                "customer {} of a claimed step not loaded",
                step.customer
            )));
        };
        // Decided under the customer's lock: a send counts against the
        // frequency cap of the customer's other steps in this batch at once.
        let (verdict, address) = {
            let mut customer = customer.lock().unwrap_or_else(|e| e.into_inner());
            let mut verdict = self.policy.check(&step, &customer, lateness, now);
            if matches!(verdict, Verdict::Send | Verdict::Shadow(_)) {
                if let Some(function) = &step.condition {
                    if let Some(reason) = self.condition_refusal(&step, function, &customer) {
                        verdict = Verdict::Suppress(reason);
                    }
                }
            }
            if verdict == Verdict::Send {
                customer.recent_sends.insert(0, now);
            }
            let address = match step.channel {
                ChannelKind::Email => customer.email.clone(),
                ChannelKind::CallTask => customer.phone.clone(),
                ChannelKind::Push => None,
            };
            (verdict, address)
        };
        let mut again_at = None;
        let mut replan = false;
        let mut latency_ms = None;
        let (outcome, reason) = match verdict {
            Verdict::Send => {
                let started = Instant::now();
                let history = context
                    .histories
                    .get(&step.instance_id)
                    .cloned()
                    .unwrap_or_default();
                // The variables go into the message: nothing reads them later.
                let variables = std::mem::take(&mut step.vars);
                let result = self.send(&step, variables, address, history).await;
                metrics::histogram!("nudge_dispatch_seconds", "channel" => step.channel.as_str())
                    .record(started.elapsed().as_secs_f64());
                let done = self.clock.now();
                match result {
                    Ok(()) => {
                        latency_ms = Some((done - step.due_at).num_milliseconds().max(0) as u64);
                        (
                            Outcome::Sent,
                            format!("step {} of {}", step.step, step.journey),
                        )
                    }
                    Err(e) if e.retryable() && step.attempt < self.config.max_attempts => {
                        let wait = self.backoff(step.attempt);
                        again_at = Some(
                            done + chrono::Duration::from_std(wait)
                                .unwrap_or(chrono::Duration::seconds(1)),
                        );
                        (
                            Outcome::Retrying,
                            format!(
                                "{e}; attempt {} of {}, next in {}",
                                step.attempt,
                                self.config.max_attempts,
                                crate::humanize::duration(wait)
                            ),
                        )
                    }
                    Err(e) if e.retryable() => (
                        Outcome::Failed,
                        format!("{e}; gave up after {} attempts", step.attempt),
                    ),
                    Err(e) => (Outcome::Failed, e.to_string()),
                }
            }
            Verdict::Defer { until, reason } => {
                again_at = Some(until);
                replan = true;
                (
                    Outcome::Deferred,
                    format!(
                        "{reason}; until {}",
                        until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ),
                )
            }
            Verdict::Suppress(reason) => (Outcome::Suppressed, reason),
            Verdict::Expire(reason) => (Outcome::Expired, reason),
            Verdict::HeldOut => (
                Outcome::HeldOut,
                "control group: not sent, to measure the journey's effect".into(),
            ),
            Verdict::Shadow(reason) => (Outcome::Shadow, reason),
        };
        metrics::counter!("nudge_steps_total", "channel" => step.channel.as_str(), "outcome" => outcome.as_str()).increment(1);
        let mut record = step_record(
            self.clock.now(),
            &step.customer,
            &step.journey,
            &step.instance_id,
            &step.step,
            step.channel.as_str(),
            &step.template,
            outcome,
            reason,
            &step.rule_hash,
        );
        record.attempt = step.attempt;
        record.latency_ms = latency_ms;
        Ok(Some(StepResult {
            record,
            again_at,
            replan,
            claimed_row: Some(step.row),
        }))
    }

    /// Runs the step's condition; `Some(reason)` when it says no or fails.
    fn condition_refusal(
        &self,
        step: &DueStep,
        function: &str,
        customer: &CustomerContext,
    ) -> Option<String> {
        let rules = self.rules.current();
        let journey = rules.journey(&step.journey)?; // journey removed: keep the planned step
        let customer = Arc::new(customer.clone());
        match rules.condition(journey, function, &customer, &step.vars.to_map()) {
            Ok(true) => None,
            Ok(false) => Some(format!("condition {function} is false")),
            Err(e) => {
                tracing::warn!(journey = %step.journey, instance = %step.instance_id, error = %e, "step condition failed");
                metrics::counter!("nudge_rule_errors_total", "journey" => step.journey.clone())
                    .increment(1);
                Some(format!("condition {function} failed: {}", e.message))
            }
        }
    }

    async fn send(
        &self,
        step: &DueStep,
        variables: Variables,
        address: Option<String>,
        history: Vec<HistoryEntry>,
    ) -> Result<(), DispatchError> {
        let channel = self
            .channels
            .get(step.channel)
            .ok_or(DispatchError::NotConfigured(step.channel))?;
        let message = Message {
            idempotency_key: Message::idempotency_key(&step.instance_id, &step.step),
            customer: step.customer.clone(),
            journey: step.journey.clone(),
            instance: step.instance_id.clone(),
            step: step.step.clone(),
            channel: step.channel,
            template: step.template.clone(),
            variables,
            address,
            history,
            attempt: step.attempt,
        };
        channel.send(&message).await
    }

    /// Exponential backoff with jitter in [half, full] of the step's slot.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.config.retry_base.as_millis() as u64;
        let exp = base.saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        let full = exp.min(self.config.retry_max.as_millis() as u64).max(1);
        let jittered = rand::thread_rng().gen_range(full / 2..=full);
        Duration::from_millis(jittered)
    }

    /// Earliest due step on any channel (simulate uses it to move the clock).
    pub fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.store.next_due(None)
    }
}
