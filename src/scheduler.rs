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

use crate::clock::{span, Clock};
use crate::config::SchedulerConfig;
use crate::context::{CustomerContext, RecentSend};
use crate::dispatch::{Channels, DispatchError, Message, Withdrawal};
use crate::model::{
    ChannelKind, DueStep, HistoryEntry, InstanceStatus, LogRecord, Outcome, Variables,
};
use crate::policy::{Policy, Verdict};
use crate::rules::RulesHandle;
use crate::store::{AsyncStore, StepResult, Store, StoreError};
mod arbiter;
mod unrecorded;

use crate::telemetry::events::{
    LeaseRenewalFailed, NextDueUnreadable, RuleTimedOut, SchedulerRoundFailed, StepClaimLost,
    StepConditionFailed, StepDecided, StepDispatched, StepGivenUp, StepLeaseRanOut,
    StepRateLimited, StepResultRefused, StepResultsUnstored,
};
use arbiter::{declared_preferred, fallback_of, planned_channel, Arbiter};
use unrecorded::Unrecorded;

/// Records finished steps and, on the committing thread right after the
/// commit, tells [`Unrecorded`] (see [`Unrecorded::recorded`]).
fn settle_recorded(
    store: &dyn Store,
    unrecorded: &Unrecorded,
    results: &[StepResult],
) -> Result<Vec<Option<i64>>, StoreError> {
    let seqs = store.settle_steps(results)?;
    unrecorded.recorded(results.iter().filter_map(|r| {
        r.claimed_row
            .map(|row| (r.record.customer.as_str(), row, r.record.outcome))
    }));
    Ok(seqs)
}

/// What was decided about one due step, before it is a dispatch-log record.
struct Decision {
    outcome: Outcome,
    reason: String,
    /// Try the step again at this time (a retry or a deferral).
    again_at: Option<DateTime<Utc>>,
    /// A deferral: lateness is measured from the new time.
    replan: bool,
    /// How long after its due time the step went out.
    latency_ms: Option<u64>,
    /// An attempt on the channel: the receiver's HTTP status, when it answered.
    http_status: Option<u16>,
    /// An attempt on the channel: how long the channel took, in milliseconds.
    response_ms: Option<u64>,
}

impl Decision {
    fn new(outcome: Outcome, reason: String) -> Self {
        Self {
            outcome,
            reason,
            again_at: None,
            replan: false,
            latency_ms: None,
            http_status: None,
            response_ms: None,
        }
    }

    /// The decision about an attempt, with what the channel answered and how fast.
    fn answered(mut self, status: Option<u16>, took: std::time::Duration) -> Self {
        self.http_status = status;
        self.response_ms = Some(took.as_millis() as u64);
        self
    }

    fn sent(step: &DueStep, went_out: DateTime<Utc>) -> Self {
        let late = (went_out - step.due_at).num_milliseconds().max(0) as u64;
        Self {
            latency_ms: Some(late),
            ..Self::new(
                Outcome::Sent,
                format!("step {} of {}", step.step, step.journey),
            )
        }
    }

    /// Quiet hours: not dropped, planned again for when they end.
    fn deferred(until: DateTime<Utc>, reason: String) -> Self {
        let until_text = until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        Self {
            again_at: Some(until),
            replan: true,
            ..Self::new(Outcome::Deferred, format!("{reason}; until {until_text}"))
        }
    }
}

/// Only a claim that outlived its worker can belong to an ended instance
/// (closing cancels pending steps): it is settled, never sent. If that
/// worker had begun the send, the receiver may have it: on a channel that
/// takes back its deliveries it is withdrawn, as a delivery landing after
/// the exit is, so that no agent calls a customer who already signed.
fn settle_if_ended(
    step: &DueStep,
    now: DateTime<Utc>,
    withdraw: &[ChannelKind],
) -> Option<StepResult> {
    let outcome = match step.instance_status {
        InstanceStatus::Converted => Outcome::Converted,
        InstanceStatus::Cancelled => Outcome::Cancelled,
        InstanceStatus::Open | InstanceStatus::Completed => return None,
    };
    let ended = step.instance_status;
    let withdrawn = step.begun_before && withdraw.contains(&step.channel);
    let reason = match (step.begun_before, withdrawn) {
        (false, _) => format!("journey {ended} while the step was claimed; step not sent"),
        (true, true) => format!(
            "journey {ended} while the step was claimed; not sent again: a send had begun under an earlier claim, so the receiver may have it, and it is withdrawn"
        ),
        (true, false) => format!(
            "journey {ended} while the step was claimed; not sent again: a send had begun under an earlier claim, so the receiver may have it"
        ),
    };
    Some(StepResult {
        record: log_record(step, now, outcome, reason),
        again_at: None,
        replan: false,
        claimed_row: Some(step.row),
        withdraw_if_ended: withdrawn,
    })
}

/// What is recorded for a step whose result the store refused for good:
/// the step fails with the store's reason, whatever was decided (a send
/// already made keeps its idempotency key; the log says it may be out).
fn refused_result(mut result: StepResult, error: &StoreError) -> StepResult {
    let decided = result.record.outcome;
    result.record.outcome = Outcome::Failed;
    let error: String = error
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    result.record.reason = format!("the store refused this step's result ({decided}): {error}");
    result.again_at = None;
    result.replan = false;
    result
}

/// The dispatch-log record of a decision about `step`.
fn log_record(step: &DueStep, time: DateTime<Utc>, outcome: Outcome, reason: String) -> LogRecord {
    let mut record = LogRecord::about(step.subject(), time, outcome, reason);
    record.attempt = step.attempt;
    record
}

/// A claimed step once its batch is decided.
enum Planned {
    /// Nothing to send: the result is known.
    Settled(StepResult),
    /// A delivered step to take back (`<step>:withdraw`): no policy, no
    /// cap, no rate; its journey has ended, which is why it exists.
    Withdraw(DueStep),
    Decided {
        step: DueStep,
        verdict: Verdict,
        /// Where the channel sends it (none for push).
        address: Option<String>,
        /// The step goes on a fallback channel: why (the sent record's reason).
        fallback: Option<String>,
    },
}

impl Planned {
    /// The step this would send, if it sends one.
    fn to_send(&self) -> Option<&DueStep> {
        match self {
            Planned::Withdraw(step) => Some(step),
            Planned::Decided { step, verdict, .. } if *verdict == Verdict::Send => Some(step),
            _ => None,
        }
    }
}

/// What deciding and sending a claimed batch needs from the store.
struct BatchContext {
    /// Tells this batch's sends from other batches' in [`Unrecorded`].
    batch: u64,
    /// When its store read began, in [`Unrecorded`]'s epochs.
    read_epoch: u64,
    customers: HashMap<String, Mutex<CustomerContext>>,
    /// The journey so far of each claimed step's instance.
    histories: HashMap<String, Vec<HistoryEntry>>,
    /// Arbitration's look-ahead: each customer's pending steps due within
    /// `policy.arbitration.window` (read only when a cap is set).
    upcoming: HashMap<String, Vec<DueStep>>,
    /// The lease taken with the claim; the heartbeat extends it
    /// ([`InFlight::renewed_until`]).
    lease_until: DateTime<Utc>,
    /// When the batch was claimed: a last retry's claim may take a moment
    /// past its bound, its wait to be sent after that may not.
    claimed_at: DateTime<Utc>,
}

/// The claimed rows of one channel loop that are being decided or sent
/// (`held`), and those settled since its last claim began (`settled`).
///
/// A lease this loop failed to renew in time (a store or a machine slowed
/// down past a third of the lease) lets its own next claim take the row
/// again while the first send is still under way or just recorded. Such a
/// row is not sent a second time: the send under way settles it. (Seen in
/// the soak: 250 steps logged `sent` twice with a 2 s lease on a machine
/// at load 9.)
#[derive(Default)]
struct InFlight {
    held: std::collections::HashSet<i64>,
    settled: std::collections::HashSet<i64>,
    /// Until when the last heartbeat renewed the rows held, but for
    /// `not_renewed`.
    renewed_until: Option<DateTime<Utc>>,
    /// Rows the last heartbeat asked to renew and did not: settled since,
    /// or released or taken over (then no longer this loop's to send).
    not_renewed: std::collections::HashSet<i64>,
}

impl InFlight {
    /// Drops from a fresh claim the rows this loop still holds or settled
    /// while the claim ran; false when nothing is left.
    fn keep_new(&self, claimed: &mut Vec<DueStep>) -> bool {
        claimed.retain(|s| !self.held.contains(&s.row) && !self.settled.contains(&s.row));
        !claimed.is_empty()
    }
}

/// Why a channel cannot record what it sent, while the store refuses its
/// results (they are held and written again): for `/readyz`, since the
/// store still answers the reads its probe makes.
#[derive(Default)]
pub struct SendingHealth(Mutex<std::collections::BTreeMap<ChannelKind, String>>);

impl SendingHealth {
    /// The first channel's problem, `push: recording … failed: …`.
    pub fn problem(&self) -> Option<String> {
        let problems = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (channel, why) = problems.iter().next()?;
        Some(format!("{channel}: {why}"))
    }

    fn set(&self, channel: ChannelKind, problem: Option<String>) {
        let mut problems = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(why) => problems.insert(channel, why),
            None => problems.remove(&channel),
        };
    }
}

pub struct Scheduler {
    store: AsyncStore,
    health: Arc<SendingHealth>,
    unrecorded: Arc<Unrecorded>,
    /// Held from a claim until its batch is decided, when a cap is set:
    /// one customer's steps due together on different channels are claimed
    /// by different channel loops, and each loop's look-ahead sees only the
    /// steps still pending. Decided one batch at a time, a step decided
    /// second sees the first as a competitor (pending when the first was
    /// decided) or as a send (in [`Unrecorded`]), never as neither, so the
    /// higher score wins whichever loop woke first and the cap holds.
    /// Sends are not held by it.
    deciding: tokio::sync::Mutex<()>,
    next_batch: std::sync::atomic::AtomicU64,
    rules: RulesHandle,
    channels: Channels,
    clock: Arc<dyn Clock>,
    policy: Policy,
    config: SchedulerConfig,
    lateness: HashMap<ChannelKind, Duration>,
    wake: HashMap<ChannelKind, Arc<Notify>>,
    /// Steps that lost an arbitration before they were due ([`arbiter::Losses`]).
    losses: arbiter::Losses,
    /// Failed `rank` and step-condition evaluations since start (`nudge
    /// simulate` counts them among its rule failures).
    script_failures: std::sync::atomic::AtomicU64,
    /// `channels.<kind>.withdraw`: a delivery on these that lands after an
    /// exit ended its journey is taken back ([`StepResult::withdraw_if_ended`]).
    withdraw: Vec<ChannelKind>,
}

/// Most step outcomes written in one store transaction.
const FINISH_BATCH: usize = 128;
/// How long the daemon lets finished steps gather before writing them.
const FINISH_LINGER: Duration = Duration::from_millis(5);
/// Upper bound on a sleep, so that a look for due steps is never far off.
const MAX_IDLE: chrono::Duration = chrono::Duration::seconds(30);
/// How often a channel looks for due steps while sends are under way.
const LOOK_WHILE_SENDING: chrono::Duration = chrono::Duration::seconds(1);

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
            store: AsyncStore::new(store),
            health: Arc::default(),
            rules,
            channels,
            clock,
            policy,
            config,
            lateness,
            wake,
            unrecorded: Arc::default(),
            deciding: tokio::sync::Mutex::new(()),
            losses: arbiter::Losses::default(),
            next_batch: std::sync::atomic::AtomicU64::new(0),
            script_failures: std::sync::atomic::AtomicU64::new(0),
            withdraw: vec![ChannelKind::CallTask],
        }
    }

    /// What `/readyz` reports of the sending side.
    pub fn health(&self) -> Arc<SendingHealth> {
        self.health.clone()
    }

    /// The channels whose deliveries an exit takes back (default: call
    /// tasks only), as given to the pipeline.
    pub fn with_withdrawals(mut self, channels: Vec<ChannelKind>) -> Self {
        self.withdraw = channels;
        self
    }

    /// Checks and holds steps under these runtime-control overrides too.
    pub fn with_controls(mut self, controls: crate::control::Controls) -> Self {
        self.policy = self.policy.with_controls(controls);
        self
    }

    /// Whether runtime control has stopped the channel: its steps wait in
    /// the store, unclaimed, until it resumes.
    fn channel_stopped(&self, channel: ChannelKind) -> bool {
        self.policy.controls().current().channel_stopped(channel)
    }

    /// Tells the channel loops that new steps may be due earlier than they planned.
    pub fn wake(&self) {
        for n in self.wake.values() {
            n.notify_one();
        }
    }

    /// Failed `rank` and step-condition evaluations since start.
    pub fn script_failures(&self) -> u64 {
        self.script_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_script_failure(&self) {
        self.script_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tells one channel's loop to look for due steps now (steps another
    /// replica handed back).
    pub fn wake_channel(&self, channel: ChannelKind) {
        if let Some(n) = self.wake.get(&channel) {
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
        // Claimed rows not yet settled: the heartbeat keeps their leases alive.
        let in_flight = Mutex::new(InFlight::default());
        let in_flight = &in_flight;
        // Set while the store refuses results: no new send starts meanwhile,
        // so that what a restart would send again stays few.
        let (unstored_tx, unstored_rx) = watch::channel(false);
        // Owns the receiving end: if it fails, the sender's reservations fail
        // and it stops, rather than wait on a channel nobody empties.
        let writer = async move {
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
                let (results, seqs) = self
                    .finish_with_retry(channel, results, stop, &unstored_tx)
                    .await?;
                let mut rows = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                for (result, seq) in results.iter().zip(&seqs) {
                    let Some(row) = result.claimed_row else {
                        continue;
                    };
                    rows.held.remove(&row);
                    if seq.is_none() {
                        StepClaimLost {
                            channel: channel.as_str(),
                            instance: &result.record.instance,
                            step: &result.record.step,
                            outcome: result.record.outcome.as_str(),
                        }
                        .emit();
                    } else if result.again_at.is_none() {
                        // A retry or a deferral is pending again: once due, a
                        // claim of it in this round is its next try, not a copy.
                        rows.settled.insert(row);
                    }
                }
                drop(rows);
                if keep {
                    records.extend(results.into_iter().zip(seqs).filter_map(|(r, seq)| {
                        Some(LogRecord {
                            seq: seq?,
                            ..r.record
                        })
                    }));
                }
            }
            Ok::<_, StoreError>(records)
        };
        // Claims batches (with what deciding them needs) one ahead of the sends,
        // so that the channel never idles between batches.
        let (batch_tx, batch_rx) =
            tokio::sync::mpsc::channel::<(Vec<Planned>, Arc<BatchContext>)>(1);
        let claimer = async move {
            let lease = span(self.config.lease);
            let window = self.policy.lookback(self.longest_fatigue_pause());
            let limit = self.config.batch_size;
            while !stop.is_some_and(|s| *s.borrow()) && !self.channel_stopped(channel) {
                let deciding = match self.policy.caps().is_empty() {
                    true => None,
                    false => Some(self.deciding.lock().await),
                };
                let now = self.clock.now();
                in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .settled
                    .clear();
                let mut claimed = self
                    .store
                    .call(move |store| store.claim_due(channel, now, limit, now + lease))
                    .await?;
                if claimed.is_empty() {
                    drop(deciding);
                    match stop {
                        Some(stop) if self.sends_under_way(in_flight) => {
                            self.await_more_due(channel, stop).await;
                            continue;
                        }
                        _ => break,
                    }
                }
                if !in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .keep_new(&mut claimed)
                {
                    continue;
                }
                // Steps tried before are decided first: a claim taken over
                // from a dead worker may already have been delivered, so it
                // goes (again, under the same key) before a new message of
                // the same customer counts against the cap.
                claimed.sort_by_key(|s| std::cmp::Reverse(s.attempt));
                in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .held
                    .extend(claimed.iter().map(|s| s.row));
                // If deciding fails (the store went away), the claims are
                // handed back, not left to run out their lease while this
                // replica lives.
                let keys: Vec<(i64, String, String)> = claimed
                    .iter()
                    .map(|s| (s.row, s.instance_id.clone(), s.step.clone()))
                    .collect();
                let decided = async {
                    let (context, read) = self.batch_context(&claimed, now - window, now).await?;
                    let context = Arc::new(context);
                    // Each batch is decided whole, and its sends marked in the
                    // store in one write, before the first of them starts.
                    let planned = self.decide_batch(claimed, &context).await?;
                    drop(read);
                    Ok::<_, StoreError>((planned, context))
                }
                .await;
                drop(deciding);
                let (planned, context) = match decided {
                    Ok(decided) => decided,
                    Err(e) => {
                        self.hand_back(keys, in_flight).await;
                        return Err(e);
                    }
                };
                if batch_tx.send((planned, context)).await.is_err() {
                    break; // the sender failed; its error is returned below
                }
            }
            Ok::<_, StoreError>(())
        };
        let sender = async move {
            let steps = futures::stream::unfold(batch_rx, |mut rx| async move {
                rx.recv().await.map(|batch| (batch, rx))
            })
            .flat_map(|(planned, context)| {
                futures::stream::iter(planned.into_iter().map(move |p| (p, context.clone())))
            })
            // A step starts only with room for its result reserved, and not
            // while the store refuses results: the sends under way are then
            // still driven to their answers (a send left unpolled behind a
            // full queue would time out though delivered, and go again).
            .then(move |step| {
                let done_tx = done_tx.clone();
                let mut unstored = unstored_rx.clone();
                async move {
                    unstored.wait_for(|refused| !refused).await.ok()?;
                    let room = done_tx.reserve_owned().await.ok()?;
                    Some((step, room))
                }
            })
            // The writer failed: its error is returned below.
            .take_while(|reserved| std::future::ready(reserved.is_some()))
            .filter_map(std::future::ready);
            // Stopping, steps claimed but not yet started are handed back by `handle`.
            let handled = steps
                .map(|((planned, context), room)| async move {
                    if let Some(step) = planned.to_send() {
                        if self.lease_ran_out(step, &context, in_flight).await {
                            return Ok(());
                        }
                    }
                    if let Some(result) = self.handle(planned, &context, stop).await? {
                        room.send(result);
                    }
                    Ok::<_, StoreError>(())
                })
                .buffer_unordered(self.channels.concurrency(channel));
            let mut handled = std::pin::pin!(handled);
            while let Some(result) = handled.next().await {
                result?;
            }
            Ok::<_, StoreError>(())
        };
        let heartbeat = self.heartbeat(channel, in_flight);
        let work = async { futures::join!(claimer, sender, writer) };
        let (claimed, sent, written) = tokio::select! {
            done = work => done,
            never = heartbeat => match never {},
        };
        let records = written?;
        sent?;
        claimed?;
        Ok(records)
    }

    /// Puts claimed steps back unsent, after a round failed before sending
    /// them; stops at the first refusal (the store is still away: the
    /// leases free the rest).
    async fn hand_back(&self, keys: Vec<(i64, String, String)>, in_flight: &Mutex<InFlight>) {
        for (row, instance, step) in keys {
            let released = self
                .store
                .call(move |s| s.release_claim(&instance, &step, None))
                .await;
            if released.is_err() {
                return;
            }
            in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .held
                .remove(&row);
        }
    }

    /// Whether steps this loop claimed are still being decided or sent.
    fn sends_under_way(&self, in_flight: &Mutex<InFlight>) -> bool {
        !in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .is_empty()
    }

    /// While a round's slowest sends are still under way (a receiver that
    /// hangs until the channel timeout), the claimer keeps looking for steps
    /// falling due, so that one slow receiver never holds up the rest of the
    /// channel: at the next due step, a wake-up from the pipeline, or within
    /// `LOOK_WHILE_SENDING`.
    async fn await_more_due(&self, channel: ChannelKind, stop: &watch::Receiver<bool>) {
        let now = self.clock.now();
        let next = self
            .next_wake(channel, now)
            .await
            .min(now + LOOK_WHILE_SENDING);
        let mut stop = stop.clone();
        let mut controls = self.policy.controls().subscribe();
        tokio::select! {
            _ = self.clock.sleep_until(next) => {}
            _ = self.wake[&channel].notified() => {}
            _ = controls.changed() => {}
            _ = stop.changed() => {}
        }
    }

    /// Renews the leases of the claimed steps still being decided or sent,
    /// every third of a lease, so that a slow send keeps its claim while this
    /// worker lives and another replica takes it over only once it is dead.
    /// Runs until dropped.
    async fn heartbeat(
        &self,
        channel: ChannelKind,
        in_flight: &Mutex<InFlight>,
    ) -> std::convert::Infallible {
        let every = self.config.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let rows: Vec<i64> = in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .held
                .iter()
                .copied()
                .collect();
            if rows.is_empty() {
                continue;
            }
            let until = self.clock.now() + span(self.config.lease);
            let asked = rows.clone();
            match self.store.call(move |s| s.renew_claims(&rows, until)).await {
                // The rows not renewed keep the lease they had: settled
                // since, they need none; taken over, they are not ours. The
                // others' lease is extended even when some were not (one
                // settled while the renewal ran): else the wall clock
                // stepped forward past the claim's lease would have every
                // waiting step let go here and held in the store for a
                // whole lease.
                Ok(renewed) => {
                    let renewed: std::collections::HashSet<i64> = renewed.into_iter().collect();
                    let mut rows = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    rows.not_renewed = asked.into_iter().filter(|r| !renewed.contains(r)).collect();
                    rows.renewed_until = rows.renewed_until.max(Some(until));
                }
                Err(e) => LeaseRenewalFailed {
                    channel: channel.as_str(),
                    error: &e,
                }
                .emit(),
            }
        }
    }

    /// Records finished steps; a store that is briefly away (transient
    /// error) is waited for, so that a send already made is not forgotten
    /// and sent again after its lease. Gives up on a permanent error, or
    /// when stopping (the claims then run out and are taken again).
    async fn finish_with_retry(
        &self,
        channel: ChannelKind,
        results: Vec<StepResult>,
        stop: Option<&watch::Receiver<bool>>,
        unstored: &watch::Sender<bool>,
    ) -> Result<(Vec<StepResult>, Vec<Option<i64>>), StoreError> {
        let mut wait = Duration::from_millis(100);
        let mut results = results;
        loop {
            // The results travel to the blocking pool and back: a retry needs no copy.
            let unrecorded = self.unrecorded.clone();
            let (back, settled) = self
                .store
                .call(move |s| {
                    let settled = settle_recorded(s, &unrecorded, &results);
                    Ok((results, settled))
                })
                .await?;
            results = back;
            let refused = settled.as_ref().err().filter(|e| e.is_transient());
            unstored.send_replace(refused.is_some());
            self.health.set(
                channel,
                refused.map(|e| format!("recording sent steps failed (sending paused): {e}")),
            );
            match settled {
                Ok(seqs) => return Ok((results, seqs)),
                Err(e) if e.is_transient() && !stop.is_some_and(|s| *s.borrow()) => {
                    StepResultsUnstored {
                        channel: channel.as_str(),
                        error: &e,
                    }
                    .emit();
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) if !e.is_transient() => {
                    return self.settle_one_by_one(channel, results).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A group the store refused for good, settled step by step, so that
    /// only the step at fault is affected: its result is recorded as
    /// `failed` with the store's reason (the claim is settled, never taken
    /// again and sent forever). Fails only if even that is refused.
    async fn settle_one_by_one(
        &self,
        channel: ChannelKind,
        results: Vec<StepResult>,
    ) -> Result<(Vec<StepResult>, Vec<Option<i64>>), StoreError> {
        let mut settled = Vec::with_capacity(results.len());
        let mut seqs = Vec::with_capacity(results.len());
        for result in results {
            let unrecorded = self.unrecorded.clone();
            let (result, outcome) = self
                .store
                .call(move |s| {
                    let outcome = settle_recorded(s, &unrecorded, std::slice::from_ref(&result));
                    Ok((result, outcome))
                })
                .await?;
            let (result, seq) = match outcome {
                Ok(seq) => (result, seq),
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    StepResultRefused {
                        channel: channel.as_str(),
                        instance: &result.record.instance,
                        step: &result.record.step,
                        error: &e,
                    }
                    .emit();
                    let failed = refused_result(result, &e);
                    let unrecorded = self.unrecorded.clone();
                    self.store
                        .call(move |s| {
                            let seq =
                                settle_recorded(s, &unrecorded, std::slice::from_ref(&failed))?;
                            Ok((failed, seq))
                        })
                        .await?
                }
            };
            settled.push(result);
            seqs.extend(seq);
        }
        Ok((settled, seqs))
    }

    /// The customers and the journey-so-far of a claimed batch, read at once.
    async fn batch_context(
        &self,
        claimed: &[DueStep],
        window_start: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(BatchContext, unrecorded::Read), StoreError> {
        let mut ids: Vec<String> = claimed.iter().map(|s| s.customer.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        let instances: Vec<String> = claimed.iter().map(|s| s.instance_id.clone()).collect();
        // Conditions may look at everything; the policy only at recent sends,
        // and only when a frequency cap is set.
        let conditions = claimed.iter().any(|s| s.condition.is_some());
        let capped = !self.policy.caps().is_empty();
        let tired = self.fatigue_possible(claimed);
        let sends_since = (conditions || capped || tired).then_some(window_start);
        // Fatigue reads the conversions; only a cap makes steps compete,
        // and only rank scripts among competitors read the journeys.
        let ranked = capped && self.rules.current().journeys().iter().any(|j| j.rank);
        let journeys = conditions || tired || ranked;
        let ahead = capped.then(|| now + span(self.policy.config().arbitration.window));
        let unrecorded = self.unrecorded.clone();
        let (customers, histories, upcoming, read) = self
            .store
            .call(move |store| {
                let upcoming = match ahead {
                    Some(until) => store.upcoming_steps(&ids, until)?,
                    None => Vec::new(),
                };
                let read = unrecorded.begin_read();
                let customers = store.customers(&ids, sends_since, journeys)?;
                let histories = store.histories(&instances)?;
                let mut by_customer: HashMap<String, Vec<DueStep>> = HashMap::new();
                for step in upcoming {
                    by_customer
                        .entry(step.customer.clone())
                        .or_default()
                        .push(step);
                }
                Ok((
                    ids.into_iter()
                        .zip(customers.into_iter().map(Mutex::new))
                        .collect(),
                    instances.into_iter().zip(histories).collect(),
                    by_customer,
                    read,
                ))
            })
            .await?;
        let read_epoch = read.epoch;
        let context = BatchContext {
            batch: self
                .next_batch
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            read_epoch,
            customers,
            histories,
            upcoming,
            lease_until: now + span(self.config.lease),
            claimed_at: now,
        };
        Ok((context, read))
    }

    /// The daemon loop: runs until `shutdown` turns true; then sends already
    /// under way finish (bounded by the channel timeout) and claimed steps not
    /// yet started are handed back for the next run.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let loops = ChannelKind::ALL
            .into_iter()
            .map(|channel| self.clone().run_channel(channel, shutdown.clone()));
        futures::future::join_all(loops).await;
    }

    /// One channel's loop: send what is due, then sleep until its next due
    /// step, a wake-up from the pipeline or shutdown.
    async fn run_channel(
        self: Arc<Self>,
        channel: ChannelKind,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut controls = self.policy.controls().subscribe();
        while !*shutdown.borrow() {
            if self.channel_stopped(channel) {
                // Held: nothing is claimed until runtime control resumes it.
                tokio::select! {
                    _ = controls.changed() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let round = self.run_channel_due(channel, Some(&shutdown), false).await;
            self.health.set(
                channel,
                round.as_ref().err().map(|e| format!("sending failed: {e}")),
            );
            if let Err(e) = round {
                SchedulerRoundFailed {
                    channel: channel.as_str(),
                    error: &e,
                }
                .emit();
                // The store is failing: pause rather than spin on it.
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let now = self.clock.now();
            let next = self.next_wake(channel, now).await;
            if next <= now {
                continue;
            }
            tokio::select! {
                _ = self.clock.sleep_until(next) => {}
                _ = self.wake[&channel].notified() => {}
                _ = controls.changed() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// When the channel's loop looks again: at its next due step (or when
    /// another replica's claim runs out), but at least every `MAX_IDLE` or
    /// lease, whichever is shorter (a claim another replica makes while this
    /// one sleeps is seen before its lease can end), and after 1 s when the
    /// store cannot say.
    async fn next_wake(&self, channel: ChannelKind, now: DateTime<Utc>) -> DateTime<Utc> {
        let idle = MAX_IDLE.min(span(self.config.lease));
        match self.store.call(move |s| s.next_due(Some(channel))).await {
            Ok(Some(t)) => t.min(now + idle),
            Ok(None) => now + idle,
            Err(e) => {
                NextDueUnreadable {
                    channel: channel.as_str(),
                    error: &e,
                }
                .emit();
                now + chrono::Duration::seconds(1)
            }
        }
    }

    /// Decides a claimed batch: settles claims whose journey ended, asks the
    /// contact policy (and each step's condition), and records in the store
    /// which steps are about to be sent, before any is: a worker taking over
    /// this one's claims after a crash then counts them against the cap.
    async fn decide_batch(
        &self,
        claimed: Vec<DueStep>,
        context: &BatchContext,
    ) -> Result<Vec<Planned>, StoreError> {
        let now = self.clock.now();
        // Step conditions are script code, each bounded by `rules.timeout`:
        // a batch of slow ones must not hold an async worker (the admin
        // server and the other channels run there), so this worker hands
        // its other tasks over while they run (multi-threaded runtime only;
        // the tools' single-threaded runtime has nothing else to serve).
        let scripted = {
            let rules = self.rules.current();
            claimed
                .iter()
                .any(|s| s.condition.is_some() || rules.journey(&s.journey).is_some_and(|j| j.rank))
        };
        let decide = || self.decide_steps(claimed, context, now);
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let decided = match scripted && multi_thread {
            true => tokio::task::block_in_place(decide),
            false => decide(),
        };
        let (planned, sending) = match decided {
            Ok(d) => d,
            Err(e) => {
                self.forget_batch(context.batch);
                return Err(e);
            }
        };
        if !sending.is_empty() {
            let marked = self
                .store
                .call(move |s| s.mark_sending(&sending, now))
                .await;
            if let Err(e) = marked {
                // Nothing of this batch was sent: its claims run out and are
                // taken again.
                self.forget_batch(context.batch);
                return Err(e);
            }
        }
        Ok(planned)
    }

    /// The verdicts of a claimed batch, and the rows to be sent.
    fn decide_steps(
        &self,
        claimed: Vec<DueStep>,
        context: &BatchContext,
        now: DateTime<Utc>,
    ) -> Result<(Vec<Planned>, Vec<i64>), StoreError> {
        let mut planned = Vec::with_capacity(claimed.len());
        let mut sending = Vec::new();
        let rules = self.rules.current();
        // Every score and condition of this batch reads one propensity table.
        let _pin = rules.propensity().pin();
        let mut arbiter = Arbiter::new(self, &rules, &claimed);
        for mut step in claimed {
            arbiter.decided.insert(step.row);
            if crate::model::withdrawn_step(&step.step).is_some() {
                planned.push(Planned::Withdraw(step));
                continue;
            }
            if let Some(settled) = settle_if_ended(&step, now, &self.withdraw) {
                planned.push(Planned::Settled(settled));
                continue;
            }
            let moved = self.preferred_channel_now(&mut step, &rules, context);
            let fallback = match moved {
                Some(reason) => Some(reason),
                None => self.fallback_channel(&mut step, &rules, context)?,
            };
            let (mut verdict, address) = self.verdict(&step, context, now, &mut arbiter)?;
            if fallback.is_none() {
                self.name_refused_fallbacks(&step, &rules, context, &mut verdict);
            }
            if verdict == Verdict::Send {
                sending.push(step.row);
            }
            planned.push(Planned::Decided {
                step,
                verdict,
                address,
                fallback,
            });
        }
        Ok((planned, sending))
    }

    /// Sends of a batch that will not be made no longer count from [`Unrecorded`].
    fn forget_batch(&self, batch: u64) {
        self.unrecorded.forget_batch(batch);
    }

    /// Sends one decided step and says what to record (the caller writes
    /// it). When shutting down, a step not yet started is handed back
    /// unsent (`None`) instead of holding up the drain.
    async fn handle(
        &self,
        planned: Planned,
        context: &BatchContext,
        stop: Option<&watch::Receiver<bool>>,
    ) -> Result<Option<StepResult>, StoreError> {
        let (mut step, verdict, address, fallback) = match planned {
            Planned::Settled(result) => return Ok(Some(result)),
            Planned::Withdraw(step) => {
                let reason = withdrawal_reason(&step, context);
                let decision = self.withdraw(&step, reason).await;
                return Ok(Some(self.result(step, decision)));
            }
            Planned::Decided {
                step,
                verdict,
                address,
                fallback,
            } => (step, verdict, address, fallback),
        };
        // Stopping, or a channel stopped since the claim: a step about to be
        // sent waits, unsent, for this or another worker. A verdict that sends
        // nothing (suppressed, deferred, shadow) is recorded now, so that no
        // other worker has to decide it again.
        let halted = stop.is_some_and(|s| *s.borrow()) || self.channel_stopped(step.channel);
        if halted && verdict == Verdict::Send {
            let (instance, name) = (step.instance_id.clone(), step.step.clone());
            // Bound for a fallback: it waits with that channel's steps.
            let to = fallback.is_some().then_some(step.channel);
            self.store
                .call(move |s| s.release_claim(&instance, &name, to))
                .await?;
            self.forget_unsent(&step.customer, step.row);
            return Ok(None);
        }
        // Decided when claimed; a send that waited since (behind the
        // channel's concurrency, a stalled process, the clock stepped
        // forward) past its lateness bound is not sent stale.
        let verdict = match verdict {
            Verdict::Send => match self.expired_since_claim(&step, context) {
                Some(reason) => {
                    self.forget_unsent(&step.customer, step.row);
                    Verdict::Expire(reason)
                }
                None => Verdict::Send,
            },
            other => other,
        };
        let mut decision = self.act(&mut step, verdict, address, context).await;
        if let (Some(reason), Outcome::Sent) = (fallback, decision.outcome) {
            decision.reason = reason;
        }
        Ok(Some(self.result(step, decision)))
    }

    /// A send decided but handed back unsent no longer counts from [`Unrecorded`].
    /// A step about to be sent whose lease ran out (this process stalled
    /// past it: a pause, a partition from the store) may be another
    /// replica's now, and sent by it: it is let go unsent, its row no longer
    /// renewed, for whoever claims it next (this replica, if nobody did).
    /// Unless the store says the claim is still this worker's: the wall
    /// clock stepped forward past the lease reckoned here, and the
    /// heartbeat or this loop's own next claim has taken it again since
    /// (letting it go would leave it claimed, unsent, for a whole lease).
    async fn lease_ran_out(
        &self,
        step: &DueStep,
        context: &BatchContext,
        in_flight: &Mutex<InFlight>,
    ) -> bool {
        let reckoned_out = {
            let rows = in_flight.lock().unwrap_or_else(|e| e.into_inner());
            let until = match rows.not_renewed.contains(&step.row) {
                true => context.lease_until,
                false => rows
                    .renewed_until
                    .map_or(context.lease_until, |r| r.max(context.lease_until)),
            };
            self.clock.now() >= until
        };
        if !reckoned_out {
            return false;
        }
        let (row, now) = (step.row, self.clock.now());
        if let Ok(true) = self.store.call(move |s| s.claim_held(row, now)).await {
            return false;
        }
        in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .remove(&step.row);
        self.forget_unsent(&step.customer, step.row);
        StepLeaseRanOut {
            channel: step.channel.as_str(),
            instance: &step.instance_id,
            step: &step.step,
        }
        .emit();
        true
    }

    /// Why a step decided to be sent is too late to send now, if it is.
    fn expired_since_claim(&self, step: &DueStep, context: &BatchContext) -> Option<String> {
        let customer = context.customers.get(&step.customer)?;
        let customer = customer.lock().unwrap_or_else(|e| e.into_inner());
        self.policy.expiry(
            step,
            &customer,
            self.lateness(step.channel),
            self.clock.now(),
            context.claimed_at,
        )
    }

    fn forget_unsent(&self, customer: &str, row: i64) {
        self.unrecorded.forget_unsent(customer, row);
    }

    /// The contact policy's verdict, with the step's condition for a step
    /// that would go out, and the address the channel needs (none for push).
    ///
    /// Decided under the customer's lock: a send counts against the
    /// frequency cap of the customer's other steps in this batch at once.
    fn verdict(
        &self,
        step: &DueStep,
        context: &BatchContext,
        now: DateTime<Utc>,
        arbiter: &mut Arbiter<'_>,
    ) -> Result<(Verdict, Option<String>), StoreError> {
        let lateness = self.lateness(step.channel);
        let Some(customer) = context.customers.get(&step.customer) else {
            return Err(StoreError::Corrupt(format!(
                "customer {} of a claimed step not loaded",
                step.customer
            )));
        };
        let mut customer = customer.lock().unwrap_or_else(|e| e.into_inner());
        let mut unrecorded = self.unrecorded.lock();
        // Sends this process has under way in other batches, and sends the
        // store knows began but were never recorded (a dead worker's,
        // perhaps delivered): each counted once, the step itself not at all.
        let elsewhere: Vec<RecentSend> = unrecorded
            .elsewhere(&step.customer, context.batch, context.read_epoch)
            .cloned()
            .chain(
                customer
                    .possibly_sent
                    .iter()
                    .filter(|(row, _)| *row != step.row && !unrecorded.holds(&step.customer, *row))
                    .map(|(_, send)| send.clone()),
            )
            .collect();
        let seen = if elsewhere.is_empty() {
            std::borrow::Cow::Borrowed(&*customer)
        } else {
            let mut seen = customer.clone();
            seen.recent_sends.extend(elsewhere);
            seen.recent_sends
                .sort_unstable_by_key(|s| std::cmp::Reverse(s.at));
            std::borrow::Cow::Owned(seen)
        };
        let mut verdict = match self.unloaded_journey(step) {
            Some(reason) => Verdict::Suppress(reason),
            None => self.policy.check(step, &seen, lateness, now),
        };
        if let Verdict::Suppress(reason) = &verdict {
            if let Some(lost) = arbiter.lost_earlier(step, &seen, reason, now) {
                verdict = lost;
            }
        }
        if matches!(verdict, Verdict::Send | Verdict::Shadow(_)) {
            if let Some(reason) = self.fatigue_refusal(step, &seen, now) {
                verdict = match verdict {
                    Verdict::Shadow(_) => {
                        Verdict::Shadow(format!("shadow mode: would suppress ({reason})"))
                    }
                    _ => Verdict::Suppress(reason),
                };
            }
        }
        if matches!(verdict, Verdict::Send | Verdict::Shadow(_)) {
            if let Some(reason) = self.condition_refusal(step, &customer) {
                verdict = Verdict::Suppress(reason);
            }
        }
        if verdict == Verdict::Send {
            if let Some(lost) = arbiter.arbitrate(step, &seen, context, now) {
                verdict = lost;
            }
        }
        drop(seen);
        if verdict == Verdict::Send {
            if let Some(wait) = self.rate_wait(step, now) {
                verdict = wait;
            }
        }
        if verdict == Verdict::Send {
            let send = RecentSend {
                at: now,
                journey: step.journey.clone(),
                channel: step.channel,
                category: step.category,
            };
            customer.recent_sends.insert(0, send.clone());
            // Counted above as a send from now on, not as a possible one.
            customer.possibly_sent.retain(|(row, _)| *row != step.row);
            unrecorded.add(&step.customer, context.batch, step.row, send);
        }
        let address = match step.channel {
            ChannelKind::Email => customer.email.clone(),
            ChannelKind::CallTask => customer.phone.clone(),
            ChannelKind::Push => None,
        };
        Ok((verdict, address))
    }

    /// A step the policy lets go, over its channel's `rate`: deferred to
    /// the slot reserved for it. The last check before a send, so that only
    /// sends take tokens. A deferral moves the step's lateness bound with it
    /// and is not an attempt: the rate wait neither expires nor fails it.
    fn rate_wait(&self, step: &DueStep, now: DateTime<Utc>) -> Option<Verdict> {
        let bucket = self.channels.rate(step.channel)?;
        let until = bucket.admit(step.row, now).err()?;
        let wait = (until - now).to_std().unwrap_or_default();
        StepRateLimited {
            channel: step.channel.as_str(),
            wait,
        }
        .emit();
        Some(Verdict::Defer {
            until,
            reason: format!(
                "rate limit: channels.{}.rate is {}; waits {} for its turn",
                step.channel,
                bucket.rate(),
                crate::humanize::duration(wait)
            ),
        })
    }

    /// Moves a step declared on the customer's `preferred` channel to the one
    /// they prefer now, if that changed since it was planned: like consent
    /// and reachability, the preference is asked when the step is due. A
    /// channel stopped at run time is not moved to (the step goes as
    /// planned). Returns the reason the sent record carries.
    fn preferred_channel_now(
        &self,
        step: &mut DueStep,
        rules: &crate::rules::RuleSet,
        context: &BatchContext,
    ) -> Option<String> {
        if !declared_preferred(rules, step) {
            return None;
        }
        let customer = context.customers.get(&step.customer)?;
        let customer = customer.lock().unwrap_or_else(|e| e.into_inner());
        let (channel, reason) = self.policy.preferred_now(step, &customer)?;
        if self.channel_stopped(channel) {
            return None;
        }
        step.channel = channel;
        Some(reason)
    }

    /// Moves a step whose channel cannot reach the customer (no consent,
    /// unreachable) to the first of its step's `fallback` channels that
    /// can; returns the reason the sent record carries.
    fn fallback_channel(
        &self,
        step: &mut DueStep,
        rules: &crate::rules::RuleSet,
        context: &BatchContext,
    ) -> Result<Option<String>, StoreError> {
        let Some(list) = fallback_of(rules, step) else {
            return Ok(None);
        };
        // Handed back to a fallback that was stopped at run time: decided
        // again from the channel it was planned on (the customer may be
        // reachable there by now).
        if let Some(planned) = planned_channel(rules, step) {
            if planned != step.channel && list.contains(&step.channel) {
                step.channel = planned;
            }
        }
        let Some(customer) = context.customers.get(&step.customer) else {
            return Ok(None); // reported by `verdict`
        };
        let customer = customer.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self
            .policy
            .fallback(step, list, &customer)
            .map(|(channel, reason)| {
                step.channel = channel;
                reason
            }))
    }

    /// A step its channel refuses (no app, no consent), whose fallbacks
    /// could not take it either: the reason says why each could not.
    fn name_refused_fallbacks(
        &self,
        step: &DueStep,
        rules: &crate::rules::RuleSet,
        context: &BatchContext,
        verdict: &mut Verdict,
    ) {
        let Verdict::Suppress(reason) = verdict else {
            return;
        };
        if !(reason.starts_with("unreachable on ") || reason.contains(" consent for ")) {
            return;
        }
        let (Some(list), Some(customer)) = (
            fallback_of(rules, step),
            context.customers.get(&step.customer),
        ) else {
            return;
        };
        let customer = customer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = self.policy.fallbacks_refused(step, list, &customer) {
            reason.push_str(&why);
        }
    }

    /// What the verdict comes to: the send and its result, or why nothing
    /// is sent now.
    async fn act(
        &self,
        step: &mut DueStep,
        verdict: Verdict,
        address: Option<String>,
        context: &BatchContext,
    ) -> Decision {
        match verdict {
            Verdict::Send => self.dispatch(step, address, context).await,
            Verdict::Defer { until, reason } => Decision::deferred(until, reason),
            Verdict::Wait { until, reason } => {
                let until_text = until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                Decision {
                    again_at: Some(until),
                    ..Decision::new(Outcome::Deferred, format!("{reason}; until {until_text}"))
                }
            }
            Verdict::Suppress(reason) => Decision::new(Outcome::Suppressed, reason),
            Verdict::Expire(reason) => Decision::new(Outcome::Expired, reason),
            Verdict::HeldOut => Decision::new(
                Outcome::HeldOut,
                "control group: not sent, to measure the journey's effect".into(),
            ),
            Verdict::Shadow(reason) => Decision::new(Outcome::Shadow, reason),
        }
    }

    /// Sends the step through its channel, timed.
    async fn dispatch(
        &self,
        step: &mut DueStep,
        address: Option<String>,
        context: &BatchContext,
    ) -> Decision {
        let started = Instant::now();
        // Lateness is when it went out, not when the receiver answered.
        let went_out = self.clock.now();
        let history = context
            .histories
            .get(&step.instance_id)
            .cloned()
            .unwrap_or_default();
        // The variables go into the message: nothing reads them later.
        let variables = std::mem::take(&mut step.vars);
        let result = self.send(step, variables, address, history).await;
        let took = started.elapsed();
        StepDispatched {
            channel: step.channel.as_str(),
            elapsed: took,
        }
        .emit();
        let done = self.clock.now();
        match result {
            // A channel without HTTP (`nudge simulate`'s recorder) has
            // nothing to time: its record says nothing of a response.
            Ok(None) => Decision::sent(step, went_out),
            Ok(status) => Decision::sent(step, went_out).answered(status, took),
            Err(DispatchError::NotConfigured(kind)) => {
                self.send_failed(step, DispatchError::NotConfigured(kind), done)
            }
            Err(e) => {
                let status = e.http_status();
                self.send_failed(step, e, done).answered(status, took)
            }
        }
    }

    /// Takes back a delivered step on its channel, saying why
    /// ([`withdrawal_reason`]); a failure is retried like a send's.
    async fn withdraw(&self, step: &DueStep, reason: &str) -> Decision {
        let original = crate::model::withdrawn_step(&step.step).unwrap_or(&step.step);
        let Some(channel) = self.channels.get(step.channel) else {
            let now = self.clock.now();
            return self.send_failed(step, DispatchError::NotConfigured(step.channel), now);
        };
        let withdrawal = Withdrawal::new(&step.instance_id, original, reason);
        let started = Instant::now();
        let result = channel.withdraw_answered(&withdrawal).await;
        let took = started.elapsed();
        StepDispatched {
            channel: step.channel.as_str(),
            elapsed: took,
        }
        .emit();
        let done = self.clock.now();
        match result {
            Ok(status) => {
                let withdrawn = Decision::new(
                    Outcome::Withdrawn,
                    format!(
                        "step {original} withdrawn on {}: {}",
                        step.channel,
                        withdrawal_text(reason, step)
                    ),
                );
                match status {
                    Some(_) => withdrawn.answered(status, took),
                    None => withdrawn,
                }
            }
            Err(e) => {
                let status = e.http_status();
                self.send_failed(step, e, done).answered(status, took)
            }
        }
    }

    /// A failed send is tried again, with backoff, while the error may pass
    /// and attempts remain; otherwise it is final, and logged.
    ///
    /// A receiver's `Retry-After` is honoured: the retry comes no earlier
    /// than it asked (bounded by `retry_max`, so one answer cannot park a
    /// step for a day). The retry never waits past the step's lateness
    /// bound, when the policy would expire it unsent: our own backoff is cut
    /// short to give it a last try by then, and a `Retry-After` beyond the
    /// bound expires it at once.
    fn send_failed(&self, step: &DueStep, e: DispatchError, done: DateTime<Utc>) -> Decision {
        let decision = self.retry_or_give_up(step, &e, done);
        if matches!(decision.outcome, Outcome::Failed | Outcome::Expired) {
            StepGivenUp {
                channel: step.channel.as_str(),
                journey: &step.journey,
                instance: &step.instance_id,
                step: &step.step,
                outcome: decision.outcome.as_str(),
                cause: e.kind(),
                http_status: e.http_status(),
                attempts: step.attempt,
            }
            .emit();
        }
        decision
    }

    fn retry_or_give_up(&self, step: &DueStep, e: &DispatchError, done: DateTime<Utc>) -> Decision {
        if !e.retryable() {
            return Decision::new(Outcome::Failed, e.to_string());
        }
        let max = self.config.max_attempts;
        if step.attempt >= max {
            let reason = format!("{e}; gave up after {} attempts", step.attempt);
            return Decision::new(Outcome::Failed, reason);
        }
        let lateness = self.lateness(step.channel);
        // A withdrawal is never stale: the task it takes back stays open
        // until it goes, so only `max_attempts` ends its retries.
        let withdrawal = crate::model::withdrawn_step(&step.step).is_some();
        let deadline = step.planned_at + span(lateness);
        let bound = || {
            format!(
                "the {} lateness bound of {}",
                step.channel,
                crate::humanize::duration(lateness)
            )
        };
        let asked = e.retry_after().map(|d| d.min(self.config.retry_max));
        if let Some(asked) = asked.filter(|_| !withdrawal) {
            if done + span(asked) > deadline {
                let after = crate::humanize::duration(asked);
                let reason = format!("{e}; a retry after {after} would pass {}", bound());
                return Decision::new(Outcome::Expired, reason);
            }
        }
        if done >= deadline && !withdrawal {
            let reason = format!("{e}; {} is reached: not tried again", bound());
            return Decision::new(Outcome::Expired, reason);
        }
        let wait = self.backoff(step.attempt).max(asked.unwrap_or_default());
        let again = match withdrawal {
            true => done + span(wait),
            false => (done + span(wait)).min(deadline),
        };
        let next_in = crate::humanize::duration((again - done).to_std().unwrap_or_default());
        let reason = format!("{e}; attempt {} of {max}, next in {next_in}", step.attempt);
        Decision {
            again_at: Some(again),
            ..Decision::new(Outcome::Retrying, reason)
        }
    }

    /// The channel's lateness bound: a step due longer ago is expired.
    fn lateness(&self, channel: ChannelKind) -> Duration {
        self.lateness
            .get(&channel)
            .copied()
            .unwrap_or(crate::config::DEFAULT_LATENESS)
    }

    /// Counts the decision and makes it what the writer records.
    fn result(&self, step: DueStep, decision: Decision) -> StepResult {
        StepDecided {
            channel: step.channel.as_str(),
            outcome: decision.outcome.as_str(),
        }
        .emit();
        let mut record = log_record(&step, self.clock.now(), decision.outcome, decision.reason);
        record.latency_ms = decision.latency_ms;
        record.http_status = decision.http_status;
        record.response_ms = decision.response_ms;
        StepResult {
            record,
            again_at: decision.again_at,
            replan: decision.replan,
            claimed_row: Some(step.row),
            withdraw_if_ended: decision.outcome == Outcome::Sent
                && self.withdraw.contains(&step.channel),
        }
    }

    /// Runs the step's condition, if it has one; `Some(reason)` when it says
    /// no or fails.
    /// Fatigue of the step's journey (its own `fatigue`, else the config's).
    fn fatigue_refusal(
        &self,
        step: &DueStep,
        customer: &CustomerContext,
        now: DateTime<Utc>,
    ) -> Option<String> {
        let rules = self.rules.current();
        let own = rules.journey(&step.journey).and_then(|j| j.fatigue);
        self.policy.fatigue_refusal(own, step, customer, now)
    }

    /// The longest fatigue pause of any loaded journey (for how far back
    /// sends are read).
    fn longest_fatigue_pause(&self) -> Duration {
        let rules = self.rules.current();
        rules
            .journeys()
            .iter()
            .filter_map(|j| self.policy.fatigue_for(j.fatigue))
            .map(|f| f.pause)
            .max()
            .unwrap_or_default()
    }

    /// Whether fatigue may pause any of the claimed steps.
    fn fatigue_possible(&self, claimed: &[DueStep]) -> bool {
        let rules = self.rules.current();
        claimed.iter().any(|s| {
            let own = rules.journey(&s.journey).and_then(|j| j.fatigue);
            self.policy.fatigue_for(own).is_some()
        })
    }

    /// A step whose journey the loaded rules no longer hold (its file was
    /// removed or renamed) is not sent: neither its exits nor its
    /// conditions can be checked any more, so a customer who acted would
    /// still be reminded.
    fn unloaded_journey(&self, step: &DueStep) -> Option<String> {
        match self.rules.current().journey(&step.journey) {
            Some(_) => None,
            None => Some(format!(
                "journey {} is not in the rules loaded (removed or renamed): its exits and conditions cannot be checked",
                step.journey
            )),
        }
    }

    fn condition_refusal(&self, step: &DueStep, customer: &CustomerContext) -> Option<String> {
        let function = step.condition.as_deref()?;
        let rules = self.rules.current();
        let journey = rules.journey(&step.journey)?; // not loaded: refused before
        let customer = Arc::new(customer.clone());
        match rules.condition(journey, function, &customer, &step.vars.to_map()) {
            Ok(true) => None,
            Ok(false) => Some(format!("condition {function} is false")),
            Err(e) => {
                if e.timed_out {
                    RuleTimedOut {
                        journey: &step.journey,
                        function,
                    }
                    .emit();
                }
                StepConditionFailed {
                    journey: &step.journey,
                    instance: &step.instance_id,
                    error: &e,
                }
                .emit();
                self.count_script_failure();
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
    ) -> Result<Option<u16>, DispatchError> {
        let channel = self
            .channels
            .get(step.channel)
            .ok_or(DispatchError::NotConfigured(step.channel))?;
        let message = Message {
            idempotency_key: crate::model::idempotency_key(&step.instance_id, &step.step),
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
        channel.send_answered(&message).await
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
    /// Channels stopped by runtime control are left out: their steps wait.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let overrides = self.policy.controls().current();
        if !ChannelKind::ALL
            .iter()
            .any(|c| overrides.channel_stopped(*c))
        {
            return self.store.call(|s| s.next_due(None)).await;
        }
        let mut earliest: Option<DateTime<Utc>> = None;
        for channel in ChannelKind::ALL {
            if overrides.channel_stopped(channel) {
                continue;
            }
            let due = self.store.call(move |s| s.next_due(Some(channel))).await?;
            earliest = match (earliest, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(earliest)
    }
}

/// Why a delivered step is taken back, as the receiver reads it: how its
/// journey ended (`converted`, `cancelled`), or, while it still runs, why
/// the customer may no longer be contacted on the channel
/// (`consent_withdrawn`, `unreachable`; `contact_changed` when consent
/// came back before the withdrawal went: it is sent all the same).
fn withdrawal_reason(step: &DueStep, context: &BatchContext) -> &'static str {
    match step.instance_status {
        InstanceStatus::Converted | InstanceStatus::Cancelled => step.instance_status.as_str(),
        InstanceStatus::Open | InstanceStatus::Completed => {
            let Some(customer) = context.customers.get(&step.customer) else {
                return "contact_changed";
            };
            let customer = customer.lock().unwrap_or_else(|e| e.into_inner());
            if !customer.consented(step.channel, step.category) {
                "consent_withdrawn"
            } else if !customer.reachable(step.channel) {
                "unreachable"
            } else {
                "contact_changed"
            }
        }
    }
}

/// The dispatch log's words for a withdrawal's reason.
fn withdrawal_text(reason: &str, step: &DueStep) -> String {
    match reason {
        "consent_withdrawn" => format!(
            "the customer withdrew consent to {} ({})",
            step.channel, step.category
        ),
        "unreachable" => format!("the customer can no longer be reached on {}", step.channel),
        "contact_changed" => "the customer's contact details changed".to_string(),
        ended => format!("journey {ended}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A claim taken over from a dead worker, whose journey ended meanwhile,
    /// is never sent again; if that worker had begun its send, the record
    /// says the receiver may have it, and on a withdrawing channel the
    /// settle plans a withdrawal.
    #[test]
    fn an_ended_journeys_step_begun_by_a_dead_worker_is_withdrawn() {
        let now = Utc::now();
        let withdraw = [ChannelKind::CallTask];
        let mut step = crate::policy::tests::step(ChannelKind::CallTask, Category::Service, now);
        assert!(settle_if_ended(&step, now, &withdraw).is_none(), "open");
        step.instance_status = InstanceStatus::Converted;
        let never_begun = settle_if_ended(&step, now, &withdraw).unwrap();
        assert_eq!(never_begun.record.outcome, Outcome::Converted);
        assert!(!never_begun.withdraw_if_ended);
        assert!(never_begun.record.reason.ends_with("step not sent"));
        step.begun_before = true;
        let begun = settle_if_ended(&step, now, &withdraw).unwrap();
        assert_eq!(begun.record.outcome, Outcome::Converted);
        assert!(begun.withdraw_if_ended);
        assert!(begun
            .record
            .reason
            .contains("the receiver may have it, and it is withdrawn"));
        step.channel = ChannelKind::Email;
        let email = settle_if_ended(&step, now, &withdraw).unwrap();
        assert!(!email.withdraw_if_ended, "email does not withdraw");
        assert!(email.record.reason.ends_with("so the receiver may have it"));
    }

    use futures::future::BoxFuture;
    use serde_json::json;

    use super::*;
    use crate::clock::SystemClock;
    use crate::config::PolicyConfig;
    use crate::dispatch::{Channel, DispatchError, Message};
    use crate::model::{Category, Mode};
    use crate::store::postgres::testing;
    use crate::store::{NewInstance, NewStep, SqliteStore};

    /// Holds every send until the test opens the gate, so that two channels'
    /// sends are decided while neither is recorded.
    struct Gate {
        started: AtomicUsize,
        open: tokio::sync::Semaphore,
        sent: Mutex<Vec<Message>>,
    }

    impl Channel for Gate {
        fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), DispatchError>> {
            Box::pin(async move {
                self.started.fetch_add(1, Ordering::SeqCst);
                self.open.acquire().await.unwrap().forget();
                self.sent.lock().unwrap().push(message.clone());
                Ok(())
            })
        }
    }

    /// Instance `id` of the shipped fee alert journey (a step of a
    /// journey not loaded is not sent).
    fn instance(id: &str, now: DateTime<Utc>) -> NewInstance {
        NewInstance {
            id: id.into(),
            customer: "c1".into(),
            journey: "fee_increase".into(),
            key: id.into(),
            mode: Mode::Live,
            category: Category::Service,
            started_at: now,
            rule_hash: "h".into(),
            trigger_event: format!("e-{id}"),
            vars: Default::default(),
            decision_inputs: json!({}),
        }
    }

    fn step(channel: ChannelKind, now: DateTime<Utc>) -> NewStep {
        NewStep {
            step: channel.as_str().into(),
            seq: 0,
            channel,
            template: "t".into(),
            condition: None,
            due_at: now,
        }
    }

    /// Answers each send on the poll after it starts, as a network answer
    /// comes: a send that is never polled again is never answered.
    #[derive(Default)]
    struct Answering {
        started: AtomicUsize,
        answered: AtomicUsize,
        keys: Mutex<std::collections::HashSet<String>>,
    }

    impl Channel for Answering {
        fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), DispatchError>> {
            Box::pin(async move {
                self.started.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                let key = message.idempotency_key.clone();
                self.keys.lock().unwrap().insert(key);
                self.answered.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    /// `n` pushes due now, each for a customer of its own, in a PostgreSQL
    /// store on a fresh schema (its connections given `settings`, e.g.
    /// `-clock_timeout%3D50ms`).
    fn pushes_due(n: usize, settings: &str) -> (Schema, Arc<dyn Store>) {
        use crate::store::postgres::PostgresStore;
        let (name, mut options) = testing::fresh_schema();
        let schema = Schema {
            _dropped_with: testing::TestStore::adopt(name.clone()),
            name,
        };
        options.url.push_str(settings);
        let store: Arc<dyn Store> = Arc::new(PostgresStore::open(&options).unwrap());
        let now = Utc::now();
        let mut tx = store.begin().unwrap();
        for i in 0..n {
            let mut customer = CustomerContext::new(&format!("c{i}"));
            customer.app_installed = true;
            tx.save_customer(&customer, now).unwrap();
            let instance = NewInstance {
                customer: customer.id.clone(),
                ..instance(&format!("i{i}"), now)
            };
            tx.start_instance(&instance, &[step(ChannelKind::Push, now)])
                .unwrap();
        }
        tx.commit().unwrap();
        (schema, store)
    }

    /// A test's schema by name, dropped with it.
    struct Schema {
        name: String,
        _dropped_with: testing::TestStore,
    }

    /// Another session's lock on the dispatch log: reads go on, writes wait
    /// for its commit.
    fn lock_the_log<'c>(
        client: &'c mut postgres::Client,
        schema: &Schema,
    ) -> postgres::Transaction<'c> {
        let mut lock = client.transaction().unwrap();
        lock.batch_execute(&format!(
            "LOCK TABLE {}.dispatch_log IN EXCLUSIVE MODE",
            schema.name
        ))
        .unwrap();
        lock
    }

    /// The round ends once the store takes the results, with each of the
    /// `steps` sent on its first attempt.
    fn sent_once_each(
        runtime: &tokio::runtime::Runtime,
        run: tokio::task::JoinHandle<Result<Vec<LogRecord>, StoreError>>,
        steps: usize,
    ) {
        let records = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), run).await })
            .expect("the round ends once the store takes the results")
            .unwrap()
            .unwrap();
        let sent = records
            .iter()
            .filter(|r| r.outcome == Outcome::Sent && r.attempt == 1)
            .count();
        assert_eq!((sent, records.len()), (steps, steps), "{records:?}");
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A store slow to take results (the log locked by another session, as
    /// a full disk or a failover would hold it) does not starve the sends
    /// under way: a send starts only with room for its result, and those
    /// started are still driven to their answers. Before, a full queue of
    /// results held the loop that polls the sends: a push answered 200 ran
    /// past its timeout unpolled, was logged `timed out` and went again.
    #[test]
    fn sends_under_way_are_answered_while_the_store_holds_up_their_results() {
        let steps = 1000;
        let (schema, store) = pushes_due(steps, "");
        // Made before the lock, so dropped after it: a failing assertion
        // must not wait on its blocking threads while the lock holds them.
        let runtime = runtime();
        let mut other = postgres::Client::connect(&testing::base_url(), postgres::NoTls).unwrap();
        let lock = lock_the_log(&mut other, &schema);

        let channel = Arc::new(Answering::default());
        let scheduler = Arc::new(scheduler(&store, channel.clone(), 0));
        let run = runtime.spawn({
            let s = scheduler.clone();
            async move { s.run_due().await }
        });
        // The writer waits on the lock; the sends come to rest with every
        // one started answered (before, 32 stayed unanswered for good).
        let counts = || {
            (
                channel.started.load(Ordering::SeqCst),
                channel.answered.load(Ordering::SeqCst),
            )
        };
        let mut watcher = postgres::Client::connect(&testing::base_url(), postgres::NoTls).unwrap();
        let mut writer_waits = || -> bool {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock' AND query LIKE '%WITH settled AS%'",
                    &[],
                )
                .unwrap()
                .get(0);
            waiting > 0
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut last, mut unchanged) = (counts(), 0);
        loop {
            let now = counts();
            unchanged = if now == last { unchanged + 1 } else { 0 };
            last = now;
            let (started, answered) = now;
            if unchanged >= 25 && started >= 500 && answered == started && writer_waits() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "(started, answered) while the results wait: {now:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            counts().0 < steps,
            "no send starts without room for its result: {:?}",
            counts()
        );
        lock.commit().unwrap();

        sent_once_each(&runtime, run, steps);
        assert_eq!(counts(), (steps, steps));
        assert_eq!(channel.keys.lock().unwrap().len(), steps);
    }

    /// A store that refuses results (here: a lock timeout; a full disk
    /// likewise) pauses sending: the sends under way finish, no new one
    /// starts until the results are written (each would go again after a
    /// restart), and `/readyz` says why, though the store answers its
    /// probe's reads. All go, once each, when the store takes them again.
    #[test]
    fn refused_results_pause_sending_and_are_reported_until_written() {
        let steps = 600;
        let (schema, store) = pushes_due(steps, "%20-clock_timeout%3D50ms");
        let runtime = runtime();
        let mut other = postgres::Client::connect(&testing::base_url(), postgres::NoTls).unwrap();
        let lock = lock_the_log(&mut other, &schema);
        let gate = closed_gate();
        let scheduler = Arc::new(scheduler(&store, gate.clone(), 0));
        let health = scheduler.health();
        let run = runtime.spawn({
            let s = scheduler.clone();
            async move { s.run_due().await }
        });
        gate.open.add_permits(40);
        let deadline = Instant::now() + Duration::from_secs(30);
        let problem = loop {
            if let Some(problem) = health.problem() {
                break problem;
            }
            assert!(Instant::now() < deadline, "no problem reported");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            problem.starts_with("push: recording sent steps failed (sending paused): ")
                && problem.contains("lock"),
            "{problem}"
        );
        // Every send may now be answered: only those under way are.
        let started = gate.started.load(Ordering::SeqCst);
        gate.open.add_permits(steps);
        let answered = || gate.sent.lock().unwrap().len();
        while answered() < started {
            assert!(Instant::now() < deadline, "{} of {started}", answered());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Paused: none starts while the results are refused (a new one
        // would start within the loop's next poll).
        for _ in 0..25 {
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(gate.started.load(Ordering::SeqCst), started);
        }
        assert!(health.problem().is_some());
        lock.commit().unwrap();

        sent_once_each(&runtime, run, steps);
        assert_eq!(answered(), steps);
        assert_eq!(health.problem(), None);
    }

    /// A push and an email for one customer fall due together with a cap of
    /// one: the channel loops decide them apart, each from the customer as
    /// read when its batch was claimed, and neither is recorded before the
    /// other is decided. The cap counts the other loop's send in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cap_counts_sends_in_flight_on_another_channel() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let now = Utc::now();
        let mut tx = store.begin().unwrap();
        let mut customer = CustomerContext::new("c1");
        customer.app_installed = true;
        customer.email = Some("c1@example.com".into());
        tx.save_customer(&customer, now).unwrap();
        tx.start_instance(&instance("a", now), &[step(ChannelKind::Push, now)])
            .unwrap();
        tx.start_instance(&instance("b", now), &[step(ChannelKind::Email, now)])
            .unwrap();
        tx.commit().unwrap();

        let gate = closed_gate();
        let scheduler = Arc::new(scheduler(&store, gate.clone(), 1));
        let run = tokio::spawn({
            let s = scheduler.clone();
            async move { s.run_due().await }
        });
        // Both steps decided: one waits at the gate, the other is recorded
        // (or, without the fix, waits at the gate too).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let recorded = store.log_after(0, 10).unwrap().len();
            let waiting = gate.started.load(Ordering::SeqCst);
            if waiting + recorded >= 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{waiting} waiting, {recorded} recorded"
            );
            tokio::task::yield_now().await;
        }
        gate.open.add_permits(2);
        let records = run.await.unwrap().unwrap();
        let outcomes: Vec<Outcome> = records.iter().map(|r| r.outcome).collect();
        assert_eq!(gate.sent.lock().unwrap().len(), 1, "{records:?}");
        // The other is held by the cap: suppressed when the send in flight
        // is counted, or deferred by arbitration when the push loop reads
        // the email step as still pending (which loop claims first is the
        // runtime's choice).
        let held = |o: Outcome| matches!(o, Outcome::Suppressed | Outcome::Deferred);
        assert!(
            outcomes.contains(&Outcome::Sent) && outcomes.iter().any(|o| held(*o)),
            "{records:?}"
        );
        assert!(
            records
                .iter()
                .any(|r| held(r.outcome) && r.reason.contains("frequency cap")),
            "{records:?}"
        );
    }

    /// Stopping while a batch is under way (a rolling restart): the step
    /// about to be sent is handed back unsent, but its sibling that the cap
    /// held back is recorded, not left pending for another replica to decide
    /// again after its next idle look.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_records_the_verdicts_that_send_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let now = Utc::now();
        let mut tx = store.begin().unwrap();
        let mut customer = CustomerContext::new("c1");
        customer.app_installed = true;
        tx.save_customer(&customer, now).unwrap();
        // `a` (the loan, priority 80) is due first and wins arbitration;
        // `b` (the fee alert, 50) is held by the cap of one.
        let earlier = now - chrono::Duration::seconds(1);
        let a = NewInstance {
            journey: "unsigned_loan".into(),
            ..instance("a", earlier)
        };
        let b = NewInstance {
            journey: "fee_increase".into(),
            ..instance("b", now)
        };
        tx.start_instance(&a, &[step(ChannelKind::Push, earlier)])
            .unwrap();
        tx.start_instance(&b, &[step(ChannelKind::Push, now)])
            .unwrap();
        tx.commit().unwrap();
        let gate = closed_gate();
        // One send at a time: `b` is handled only once `a`'s send is done.
        let channels = Channels::default().with(ChannelKind::Push, gate.clone(), 1);
        let mut scheduler = scheduler(&store, gate.clone(), 1);
        scheduler.channels = channels;
        let scheduler = Arc::new(scheduler);
        let (stop_tx, stop_rx) = watch::channel(false);
        let run = tokio::spawn({
            let s = scheduler.clone();
            async move {
                s.run_channel_due(ChannelKind::Push, Some(&stop_rx), true)
                    .await
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.started.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no send started");
            tokio::task::yield_now().await;
        }
        stop_tx.send(true).unwrap();
        gate.open.add_permits(1);
        let records = run.await.unwrap().unwrap();
        let by_instance: HashMap<&str, Outcome> = records
            .iter()
            .map(|r| (r.instance.as_str(), r.outcome))
            .collect();
        assert_eq!(by_instance.get("a"), Some(&Outcome::Sent), "{records:?}");
        assert!(
            matches!(
                by_instance.get("b"),
                Some(Outcome::Suppressed | Outcome::Deferred)
            ),
            "{records:?}"
        );
        assert_eq!(gate.sent.lock().unwrap().len(), 1);
        let counts = store.step_counts().unwrap();
        assert!(
            !counts
                .iter()
                .any(|(status, n)| status == "claimed" && *n > 0),
            "{counts:?}"
        );
    }

    /// A scheduler over `store` sending through `channel` with a cap of
    /// `cap` a day and no quiet hours.
    fn scheduler(store: &Arc<dyn Store>, channel: Arc<dyn Channel>, cap: u32) -> Scheduler {
        scheduler_with(store, channel, cap, shipped_rules())
    }

    fn scheduler_with(
        store: &Arc<dyn Store>,
        channel: Arc<dyn Channel>,
        cap: u32,
        rules: crate::rules::RuleSet,
    ) -> Scheduler {
        Scheduler::new(
            store.clone(),
            RulesHandle::new(rules),
            Channels::all(channel),
            Arc::new(SystemClock),
            Policy::new(without_quiet_hours(Some(cap))),
            SchedulerConfig::default(),
            HashMap::new(),
        )
    }

    /// The journeys nudge ships in `rules/`.
    fn shipped_rules() -> crate::rules::RuleSet {
        crate::rules::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"),
            &crate::rules::Limits::default(),
        )
        .unwrap()
    }

    /// The default policy with the cap given and no quiet hours, so that a
    /// test's steps go whatever hour it runs at.
    fn without_quiet_hours(max_per_customer: Option<u32>) -> PolicyConfig {
        PolicyConfig {
            max_per_customer,
            quiet_hours: crate::config::QuietHours {
                channels: Default::default(),
                legacy: None,
            },
            ..PolicyConfig::default()
        }
    }

    /// The daemon's scheduler over the shipped rules on a virtual clock.
    fn on_virtual_clock(
        store: &Arc<dyn Store>,
        channels: Channels,
        clock: &crate::clock::VirtualClock,
        policy: PolicyConfig,
        lateness: HashMap<ChannelKind, Duration>,
    ) -> Arc<Scheduler> {
        Arc::new(Scheduler::new(
            store.clone(),
            RulesHandle::new(shipped_rules()),
            channels,
            Arc::new(clock.clone()),
            Policy::new(policy),
            SchedulerConfig::default(),
            lateness,
        ))
    }

    /// Customer c1 (app and email) with a push (instance `a`) and an email
    /// (instance `b`) due now.
    fn push_and_email_due(store: &Arc<dyn Store>, now: DateTime<Utc>) {
        let mut tx = store.begin().unwrap();
        let mut customer = CustomerContext::new("c1");
        customer.app_installed = true;
        customer.email = Some("c1@example.com".into());
        tx.save_customer(&customer, now).unwrap();
        tx.start_instance(&instance("a", now), &[step(ChannelKind::Push, now)])
            .unwrap();
        tx.start_instance(&instance("b", now), &[step(ChannelKind::Email, now)])
            .unwrap();
        tx.commit().unwrap();
    }

    /// A gate with `permits` sends let through before the test adds more.
    fn gate(permits: usize) -> Arc<Gate> {
        Arc::new(Gate {
            started: AtomicUsize::new(0),
            open: tokio::sync::Semaphore::new(permits),
            sent: Mutex::default(),
        })
    }

    fn closed_gate() -> Arc<Gate> {
        gate(0)
    }

    fn open_gate() -> Arc<Gate> {
        gate(1000)
    }

    /// The daemon loop on a virtual clock: a call task for a Perth customer
    /// falls due on Saturday morning, is deferred (not dropped, not expired)
    /// to Monday 09:00 local, waits through the weekend, and goes when the
    /// clock reaches the open slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_task_due_out_of_hours_is_sent_at_the_next_open_slot() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let saturday = at("2026-03-14T10:00:00+08:00");
        let monday = at("2026-03-16T09:00:00+08:00");
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let mut tx = store.begin().unwrap();
        let mut customer = CustomerContext::new("c1");
        customer.phone = Some("+61400000000".into());
        customer.timezone = Some("Australia/Perth".into());
        customer.region = Some("AU-WA".into());
        tx.save_customer(&customer, saturday).unwrap();
        tx.start_instance(
            &instance("a", saturday),
            &[step(ChannelKind::CallTask, saturday)],
        )
        .unwrap();
        tx.commit().unwrap();

        let clock = crate::clock::VirtualClock::new(saturday);
        let gate = open_gate();
        let scheduler = on_virtual_clock(
            &store,
            Channels::all(gate.clone()),
            &clock,
            PolicyConfig::default(),
            HashMap::from([(ChannelKind::CallTask, Duration::from_secs(3600))]),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let daemon = tokio::spawn(scheduler.clone().run(stop_rx));
        let deadline = Instant::now() + Duration::from_secs(20);
        let log = |n: usize| loop {
            let log = store.log_after(0, 10).unwrap();
            if log.len() >= n {
                return log;
            }
            assert!(Instant::now() < deadline, "{log:?}");
            std::thread::yield_now();
        };
        let deferred = log(1);
        assert_eq!(deferred[0].outcome, Outcome::Deferred, "{deferred:?}");
        assert_eq!(
            deferred[0].reason,
            "outside business hours Mon-Fri 09:00-17:00 in Australia/Perth; until 2026-03-16T01:00:00Z"
        );
        assert_eq!(store.next_due(None).unwrap(), Some(monday));
        assert!(gate.sent.lock().unwrap().is_empty());
        // Sunday: still closed, and far past the hour's lateness bound of
        // the planned time; the step is neither sent nor expired.
        clock.advance_to(at("2026-03-15T12:00:00+08:00"));
        clock.advance_to(monday);
        let records = log(2);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(
            (records[1].outcome, records[1].time),
            (Outcome::Sent, monday),
            "{records:?}"
        );
        assert_eq!(gate.sent.lock().unwrap().len(), 1);
        stop_tx.send(true).unwrap();
        daemon.await.unwrap();
    }

    /// Holds the sends to one customer until released; lets the rest through.
    struct HoldOne {
        held: &'static str,
        release: tokio::sync::Semaphore,
        holding: AtomicUsize,
        sent: Mutex<Vec<String>>,
    }

    impl Channel for HoldOne {
        fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), DispatchError>> {
            Box::pin(async move {
                if message.customer == self.held {
                    self.holding.fetch_add(1, Ordering::SeqCst);
                    self.release.acquire().await.unwrap().forget();
                }
                self.sent.lock().unwrap().push(message.customer.clone());
                Ok(())
            })
        }
    }

    /// A store where c1 (push due at `t0`) and c2 (push due at `c2_due`)
    /// both have the app.
    fn pushes_to_c1_and_c2(
        dir: &std::path::Path,
        t0: DateTime<Utc>,
        c2_due: DateTime<Utc>,
    ) -> Arc<dyn Store> {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("s.db")).unwrap());
        for (customer, id, due) in [("c1", "a", t0), ("c2", "b", c2_due)] {
            let mut tx = store.begin().unwrap();
            let mut c = CustomerContext::new(customer);
            c.app_installed = true;
            tx.save_customer(&c, t0).unwrap();
            let instance = NewInstance {
                customer: customer.into(),
                ..instance(id, t0)
            };
            tx.start_instance(&instance, &[step(ChannelKind::Push, due)])
                .unwrap();
            tx.commit().unwrap();
        }
        store
    }

    /// Polls `done` (yielding, no sleep) until it holds; fails after 30 s.
    fn wait_until(what: &str, done: &dyn Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::yield_now();
        }
    }

    /// A channel that holds c1's sends until released.
    fn holding_c1() -> Arc<HoldOne> {
        Arc::new(HoldOne {
            held: "c1",
            release: tokio::sync::Semaphore::new(0),
            holding: AtomicUsize::new(0),
            sent: Mutex::default(),
        })
    }

    /// The daemon loop on a virtual clock: a receiver hangs on c1's push;
    /// c2's push, falling due a minute later while it hangs, goes at once
    /// rather than when c1's ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_send_does_not_hold_up_steps_falling_due_meanwhile() {
        let t0 = Utc::now();
        let dir = tempfile::tempdir().unwrap();
        let store = pushes_to_c1_and_c2(dir.path(), t0, t0 + chrono::Duration::minutes(1));
        let channel = holding_c1();
        let clock = crate::clock::VirtualClock::new(t0);
        let scheduler = on_virtual_clock(
            &store,
            Channels::all(channel.clone()),
            &clock,
            without_quiet_hours(PolicyConfig::default().max_per_customer),
            HashMap::new(),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let daemon = tokio::spawn(scheduler.clone().run(stop_rx));
        wait_until("c1's push starts", &|| {
            channel.holding.load(Ordering::SeqCst) == 1
        });
        clock.advance_to(t0 + chrono::Duration::minutes(1));
        wait_until("c2's push goes while c1's hangs", &|| {
            channel.sent.lock().unwrap().contains(&"c2".to_string())
        });
        assert!(!channel.sent.lock().unwrap().contains(&"c1".to_string()));
        channel.release.add_permits(1);
        wait_until("c1's push ends", &|| {
            channel.sent.lock().unwrap().len() == 2
        });
        stop_tx.send(true).unwrap();
        daemon.await.unwrap();
        assert_eq!(*channel.sent.lock().unwrap(), ["c2", "c1"]);
    }

    /// Pushes to c1 and c2 due a second ago, sent one at a time on a
    /// virtual clock through a channel that holds c1's: c2's waits behind it.
    fn c2_behind_hung_c1(
        dir: &std::path::Path,
        lateness: HashMap<ChannelKind, Duration>,
    ) -> (
        Arc<dyn Store>,
        Arc<HoldOne>,
        crate::clock::VirtualClock,
        Arc<Scheduler>,
    ) {
        let t0 = Utc::now();
        let store = pushes_to_c1_and_c2(dir, t0, t0 + chrono::Duration::milliseconds(1));
        let channel = holding_c1();
        let clock = crate::clock::VirtualClock::new(t0 + chrono::Duration::seconds(1));
        let scheduler = on_virtual_clock(
            &store,
            Channels::default().with(ChannelKind::Push, channel.clone(), 1),
            &clock,
            without_quiet_hours(PolicyConfig::default().max_per_customer),
            lateness,
        );
        (store, channel, clock, scheduler)
    }

    /// A send decided when claimed but left waiting behind the channel's
    /// concurrency (here one send at a time, and c1's hangs) past its
    /// lateness bound is logged `expired`, not sent stale.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_that_waited_past_its_lateness_is_expired_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let lateness = HashMap::from([(ChannelKind::Push, Duration::from_secs(60))]);
        let (store, channel, clock, scheduler) = c2_behind_hung_c1(dir.path(), lateness);
        let (stop_tx, stop_rx) = watch::channel(false);
        let daemon = tokio::spawn(scheduler.clone().run(stop_rx));
        wait_until("c1's push starts", &|| {
            channel.holding.load(Ordering::SeqCst) == 1
        });
        // Past the minute's lateness, within the claim's lease.
        clock.advance(chrono::Duration::minutes(2));
        channel.release.add_permits(1);
        let outcomes = || -> Vec<(String, Outcome)> {
            store
                .log_after(0, 10)
                .unwrap()
                .into_iter()
                .map(|r| (r.customer, r.outcome))
                .collect()
        };
        wait_until("both recorded", &|| outcomes().len() == 2);
        stop_tx.send(true).unwrap();
        daemon.await.unwrap();
        assert_eq!(*channel.sent.lock().unwrap(), ["c1"]);
        assert_eq!(
            outcomes(),
            [
                ("c1".to_string(), Outcome::Sent),
                ("c2".to_string(), Outcome::Expired)
            ]
        );
        let reason = &store.log_after(0, 10).unwrap()[1].reason;
        assert!(
            reason.contains("past the push lateness bound of 1m"),
            "{reason}"
        );
    }

    /// A process that stalls past its lease mid-batch (here: a send hangs
    /// while the clock passes the lease) does not send the batch's other
    /// steps on the lease it reckoned when it resumes: another replica may
    /// have taken them over and sent them. Such a step goes once either
    /// way: let go and claimed again (attempt 2), or, when the store says
    /// the claim is still this process's (its own claim took it again
    /// meanwhile), sent on it. Taken over by another replica, it is let go
    /// (the store conformance test `abandoned_claims_are_taken_over_after_the_lease`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steps_whose_lease_ran_out_before_their_send_go_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, channel, clock, scheduler) = c2_behind_hung_c1(dir.path(), HashMap::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let daemon = tokio::spawn(scheduler.clone().run(stop_rx));
        wait_until("c1's push starts", &|| {
            channel.holding.load(Ordering::SeqCst) == 1
        });
        // The stall: past the lease (5m) with no heartbeat.
        let lease = span(SchedulerConfig::default().lease);
        clock.advance(lease + chrono::Duration::minutes(1));
        channel.release.add_permits(1);
        wait_until("c1's push ends", &|| {
            !channel.sent.lock().unwrap().is_empty()
        });
        let sent_log = || -> Vec<(String, u32)> {
            store
                .log_after(0, 10)
                .unwrap()
                .into_iter()
                .filter(|r| r.outcome == Outcome::Sent)
                .map(|r| (r.customer, r.attempt))
                .collect()
        };
        wait_until("c1 recorded", &|| !sent_log().is_empty());
        // A later look of the claimer finds c2's claim run out (its own
        // claim of the stall's end, if it made one, too) and takes it again.
        // The clock moves on a second per poll: whenever the claimer sleeps
        // on it, it wakes.
        wait_until("c2 sent", &|| {
            clock.advance(chrono::Duration::seconds(1));
            std::thread::sleep(Duration::from_millis(5));
            sent_log().len() == 2
        });
        stop_tx.send(true).unwrap();
        daemon.await.unwrap();
        assert_eq!(*channel.sent.lock().unwrap(), ["c1", "c2"]);
        let sent = sent_log();
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0], ("c1".to_string(), 1));
        assert_eq!(sent[1].0, "c2");
    }

    /// The wall clock steps forward past the claim's lease (an NTP step, a
    /// VM resumed) while a batch waits behind a hung send, and one of the
    /// batch's rows was settled before the heartbeat renewed the others.
    /// The renewal still counts for the rows it renewed: the waiting step
    /// goes on its first claim once the hung send ends, instead of being
    /// let go and held in the store for a whole lease.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renewal_that_missed_a_settled_row_still_keeps_the_others() {
        let t0 = Utc::now();
        let dir = tempfile::tempdir().unwrap();
        let store = pushes_to_c1_and_c2(dir.path(), t0, t0 + chrono::Duration::milliseconds(1));
        let mut tx = store.begin().unwrap();
        let mut c3 = CustomerContext::new("c3");
        c3.app_installed = true;
        tx.save_customer(&c3, t0).unwrap();
        let instance_c = NewInstance {
            customer: "c3".into(),
            ..instance("c", t0)
        };
        let due = t0 + chrono::Duration::milliseconds(2);
        tx.start_instance(&instance_c, &[step(ChannelKind::Push, due)])
            .unwrap();
        tx.commit().unwrap();
        let channel = holding_c1();
        let clock = crate::clock::VirtualClock::new(t0 + chrono::Duration::seconds(1));
        // A heartbeat every half second of real time.
        let config = SchedulerConfig {
            lease: Duration::from_millis(1500),
            ..SchedulerConfig::default()
        };
        let scheduler = Arc::new(Scheduler::new(
            store.clone(),
            RulesHandle::new(shipped_rules()),
            Channels::default().with(ChannelKind::Push, channel.clone(), 1),
            Arc::new(clock.clone()),
            Policy::new(without_quiet_hours(
                PolicyConfig::default().max_per_customer,
            )),
            config,
            HashMap::new(),
        ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let daemon = tokio::spawn(scheduler.clone().run(stop_rx));
        wait_until("c1's push starts", &|| {
            channel.holding.load(Ordering::SeqCst) == 1
        });
        // c3's row settles (as by a send that just ended), then the clock
        // jumps an hour.
        let file = rusqlite::Connection::open(dir.path().join("s.db")).unwrap();
        file.busy_timeout(Duration::from_secs(5)).unwrap();
        file.execute(
            "UPDATE steps SET status = 'sent', lease_until = NULL WHERE instance_id = 'c'",
            [],
        )
        .unwrap();
        let jumped = t0 + chrono::Duration::hours(1);
        clock.advance_to(jumped);
        let lease_of_c2 = || -> i64 {
            file.query_row(
                "SELECT coalesce(lease_until, 0) FROM steps WHERE instance_id = 'b'",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        wait_until("a heartbeat after the jump renews c2", &|| {
            lease_of_c2() > jumped.timestamp_millis()
        });
        channel.release.add_permits(1);
        wait_until("c2 sent", &|| channel.sent.lock().unwrap().len() == 2);
        stop_tx.send(true).unwrap();
        daemon.await.unwrap();
        assert_eq!(*channel.sent.lock().unwrap(), ["c1", "c2"]);
        let attempts: Vec<(String, u32)> = store
            .log_after(0, 10)
            .unwrap()
            .into_iter()
            .filter(|r| r.outcome == Outcome::Sent)
            .map(|r| (r.customer, r.attempt))
            .collect();
        assert_eq!(attempts, [("c1".to_string(), 1), ("c2".to_string(), 1)]);
    }

    /// Fatigue through the dispatch path: two earlier sends of journey `f`
    /// (its script says `fatigue: #{ after: 2, pause: "30d" }`) brought no
    /// conversion, so its next push is suppressed with a `fatigue` reason;
    /// the same push of a journey without fatigue goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fatigued_journey_is_suppressed_when_its_step_falls_due() {
        let now = Utc::now();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let script = |name: &str, fatigue: &str| {
            (
                std::path::PathBuf::from(format!("{name}.rhai")),
                format!(
                    "fn journey() {{ #{{ name: \"{name}\", category: \"service\", triggers: [\"x.y\"], {fatigue}
                     steps: [ #{{ id: \"push\", channel: \"push\", template: \"t\", delay: \"0s\" }} ] }} }}
                     fn decide(event, customer) {{ start() }}"
                ),
            )
        };
        let rules = crate::rules::load_sources(
            vec![
                script("f", "fatigue: #{ after: 2, pause: \"30d\" },"),
                script("g", ""),
            ],
            &crate::rules::Limits::default(),
        )
        .unwrap();
        let mut tx = store.begin().unwrap();
        let mut customer = CustomerContext::new("c1");
        customer.app_installed = true;
        tx.save_customer(&customer, now).unwrap();
        for journey in ["f", "g"] {
            for days in [3, 2] {
                let subject = crate::model::StepRef {
                    customer: "c1",
                    journey,
                    instance: "earlier",
                    step: "push",
                    channel: "push",
                    template: "t",
                    rule_hash: "h",
                };
                tx.append_log(&LogRecord::about(
                    subject,
                    now - chrono::Duration::days(days),
                    Outcome::Sent,
                    "ok",
                ))
                .unwrap();
            }
            let instance = NewInstance {
                journey: journey.into(),
                ..instance(journey, now)
            };
            tx.start_instance(&instance, &[step(ChannelKind::Push, now)])
                .unwrap();
        }
        tx.commit().unwrap();
        let gate = open_gate();
        let scheduler = scheduler_with(&store, gate.clone(), 0, rules);
        let records = scheduler.run_due().await.unwrap();
        let by_journey: HashMap<&str, &LogRecord> =
            records.iter().map(|r| (r.journey.as_str(), r)).collect();
        assert_eq!(by_journey["g"].outcome, Outcome::Sent, "{records:?}");
        assert_eq!(by_journey["f"].outcome, Outcome::Suppressed, "{records:?}");
        assert!(
            by_journey["f"]
                .reason
                .starts_with("fatigue: 2 sends of f without a conversion, paused until "),
            "{records:?}"
        );
        assert_eq!(gate.sent.lock().unwrap().len(), 1);
    }

    /// A journey removed from the rules (or renamed) while its instance
    /// waits: its exits no longer end it and its conditions cannot run, so
    /// its step is suppressed with that reason, never sent; a loaded
    /// journey's step due beside it goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_of_a_journey_no_longer_loaded_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let now = Utc::now();
        let mut tx = store.begin().unwrap();
        let mut customer = CustomerContext::new("c1");
        customer.app_installed = true;
        tx.save_customer(&customer, now).unwrap();
        let retired = NewInstance {
            journey: "retired_offer".into(),
            ..instance("a", now)
        };
        tx.start_instance(&retired, &[step(ChannelKind::Push, now)])
            .unwrap();
        tx.start_instance(&instance("b", now), &[step(ChannelKind::Push, now)])
            .unwrap();
        tx.commit().unwrap();
        let gate = open_gate();
        let records = scheduler(&store, gate.clone(), 0).run_due().await.unwrap();
        let by_instance: HashMap<&str, &LogRecord> =
            records.iter().map(|r| (r.instance.as_str(), r)).collect();
        assert_eq!(by_instance["b"].outcome, Outcome::Sent, "{records:?}");
        assert_eq!(
            (by_instance["a"].outcome, by_instance["a"].reason.as_str()),
            (
                Outcome::Suppressed,
                "journey retired_offer is not in the rules loaded (removed or renamed): its exits and conditions cannot be checked"
            ),
            "{records:?}"
        );
        let sent = gate.sent.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].journey, "fee_increase");
    }

    /// The store fails between the claim and the send (a table unreadable
    /// for a moment): the round fails, and its claims are handed back at
    /// once rather than held for the lease by a replica that is alive; the
    /// next round sends the push as its first attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_of_a_round_that_failed_before_sending_are_handed_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let now = Utc::now();
        let mut tx = store.begin().unwrap();
        let mut customer = CustomerContext::new("c1");
        customer.app_installed = true;
        tx.save_customer(&customer, now).unwrap();
        tx.start_instance(&instance("a", now), &[step(ChannelKind::Push, now)])
            .unwrap();
        tx.commit().unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute_batch("ALTER TABLE customers RENAME TO customers_away")
            .unwrap();
        let gate = open_gate();
        let scheduler = scheduler(&store, gate.clone(), 0);
        assert!(scheduler.run_due().await.is_err());
        raw.execute_batch("ALTER TABLE customers_away RENAME TO customers")
            .unwrap();
        let counts = store.step_counts().unwrap();
        assert_eq!(counts, [("pending".to_string(), 1)], "{counts:?}");
        let records = scheduler.run_due().await.unwrap();
        assert_eq!(
            records
                .iter()
                .map(|r| (r.outcome, r.attempt))
                .collect::<Vec<_>>(),
            [(Outcome::Sent, 1)],
            "{records:?}"
        );
        assert_eq!(gate.sent.lock().unwrap().len(), 1);
    }

    /// A worker claimed the push, began sending it and died before
    /// recording it (it may have reached the customer). After the restart
    /// the email, decided first, is held back by the cap of one: the push
    /// counts as possibly sent. The push itself goes again under its key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_workers_send_counts_against_the_cap_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let now = Utc::now();
        push_and_email_due(&store, now);
        let lease = now + chrono::Duration::minutes(5);
        let claimed = store.claim_due(ChannelKind::Push, now, 10, lease).unwrap();
        store.mark_sending(&[claimed[0].row], now).unwrap();
        // The restart: the dead worker's claims are handed back.
        assert_eq!(store.release_all_leases().unwrap(), 1);

        let gate = open_gate();
        let scheduler = scheduler(&store, gate.clone(), 1);
        let email = scheduler
            .run_channel_due(ChannelKind::Email, None, true)
            .await
            .unwrap();
        assert_eq!(email.len(), 1);
        assert_eq!(email[0].outcome, Outcome::Suppressed, "{email:?}");
        assert!(email[0].reason.contains("frequency cap"), "{email:?}");
        let push = scheduler.run_due().await.unwrap();
        assert_eq!(push.len(), 1);
        assert_eq!((push[0].outcome, push[0].attempt), (Outcome::Sent, 2));
        let sent = gate.sent.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].idempotency_key,
            crate::model::idempotency_key("a", "push")
        );
    }

    /// A result the store refuses for good (here a trigger) does not stall
    /// the channel or come back forever: that step is recorded as failed
    /// with the store's reason, the others of its group as decided.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_the_store_refuses_is_recorded_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let now = Utc::now();
        let mut tx = store.begin().unwrap();
        for id in ["a", "b", "c"] {
            tx.start_instance(&instance(id, now), &[step(ChannelKind::Email, now)])
                .unwrap();
        }
        let mut customer = CustomerContext::new("c1");
        customer.email = Some("c1@example.com".into());
        tx.save_customer(&customer, now).unwrap();
        tx.commit().unwrap();
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON dispatch_log
                 WHEN NEW.instance = 'b' AND NEW.outcome = 'sent'
                 BEGIN SELECT RAISE(ABORT, 'poisoned record'); END;",
            )
            .unwrap();

        let gate = open_gate();
        let scheduler = scheduler(&store, gate.clone(), 0);
        let records = scheduler.run_due().await.unwrap();
        let by_instance: HashMap<&str, &LogRecord> =
            records.iter().map(|r| (r.instance.as_str(), r)).collect();
        assert_eq!(records.len(), 3, "{records:?}");
        assert_eq!(by_instance["a"].outcome, Outcome::Sent);
        assert_eq!(by_instance["c"].outcome, Outcome::Sent);
        let b = by_instance["b"];
        assert_eq!(b.outcome, Outcome::Failed, "{b:?}");
        assert!(
            b.reason
                .contains("the store refused this step's result (sent)")
                && b.reason.contains("poisoned record"),
            "{b:?}"
        );
        assert_eq!(gate.sent.lock().unwrap().len(), 3);
        let counts: HashMap<String, i64> = store.step_counts().unwrap().into_iter().collect();
        assert_eq!(counts.get("failed"), Some(&1), "{counts:?}");
        assert_eq!(counts.get("sent"), Some(&2), "{counts:?}");
        assert!(
            scheduler.run_due().await.unwrap().is_empty(),
            "nothing comes back"
        );
    }

    /// A step condition that runs into `rules.timeout` is a suppression
    /// with the reason, and while it runs the async worker it was on serves
    /// other tasks (here the only worker: a ticker keeps ticking).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_slow_step_condition_is_bounded_and_does_not_hold_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let rules_dir = dir.path().join("rules");
        std::fs::create_dir(&rules_dir).unwrap();
        std::fs::write(
            rules_dir.join("slow.rhai"),
            r#"
fn journey() {
    #{
        name: "slow",
        category: "service",
        triggers: ["t"],
        steps: [#{ id: "push", channel: "push", template: "t", delay: "0s", when: "slow_check" }],
    }
}
fn decide(event, customer) { start(#{}) }
fn slow_check(customer, vars) {
    let a = [];
    for i in 0..10000 { a.push(i); }
    let n = 0;
    loop { n += a.index_of(9999); }
}
"#,
        )
        .unwrap();
        let limits = crate::rules::Limits {
            timeout: Duration::from_millis(300),
            ..crate::rules::Limits::default()
        };
        let rules = crate::rules::load_dir(&rules_dir, &limits).unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let now = Utc::now();
        let mut tx = store.begin().unwrap();
        let mut customer = CustomerContext::new("c1");
        customer.app_installed = true;
        tx.save_customer(&customer, now).unwrap();
        let mut push = step(ChannelKind::Push, now);
        push.condition = Some("slow_check".into());
        let slow = NewInstance {
            journey: "slow".into(),
            ..instance("slow", now)
        };
        tx.start_instance(&slow, &[push]).unwrap();
        tx.commit().unwrap();

        let gate = open_gate();
        let scheduler = Arc::new(scheduler_with(&store, gate.clone(), 0, rules));
        // The longest time the ticker went without a tick.
        let longest_gap = Arc::new(Mutex::new(Duration::ZERO));
        let ticker = tokio::spawn({
            let longest_gap = longest_gap.clone();
            async move {
                let mut last = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let gap = last.elapsed();
                    last = Instant::now();
                    let mut longest = longest_gap.lock().unwrap();
                    *longest = (*longest).max(gap);
                }
            }
        });
        let started = Instant::now();
        let records = tokio::spawn({
            let s = scheduler.clone();
            async move { s.run_due().await }
        })
        .await
        .unwrap()
        .unwrap();
        let took = started.elapsed();
        ticker.abort();
        let longest_gap = *longest_gap.lock().unwrap();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.outcome, Outcome::Suppressed, "{r:?}");
        assert!(
            r.reason.contains("condition slow_check failed") && r.reason.contains("rules.timeout"),
            "{r:?}"
        );
        assert!(took < Duration::from_secs(3), "bounded: {took:?}");
        // 5 ms sleeps through a 300 ms evaluation: a held worker would
        // leave a gap as long as the evaluation.
        assert!(
            took >= Duration::from_millis(300) && longest_gap < Duration::from_millis(150),
            "longest gap between ticks {longest_gap:?} in {took:?}"
        );
        assert!(gate.sent.lock().unwrap().is_empty());
    }

    /// `channels.push.rate = "2/s"` and ten pushes due at once: two go at
    /// once, each other is deferred once to its own slot half a second
    /// apart, none is dropped, failed or expired, none spends an attempt
    /// waiting, and each wait is counted. Virtual time throughout.
    #[tokio::test]
    async fn steps_over_the_rate_wait_their_turn_in_virtual_time() {
        let recorder = crate::telemetry::prometheus().unwrap().build_recorder();
        let _metrics = metrics::set_default_local_recorder(&recorder);
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let t0 = DateTime::parse_from_rfc3339("2026-03-02T03:00:00Z")
            .unwrap()
            .to_utc();
        let clock = Arc::new(crate::clock::VirtualClock::new(t0));
        let mut tx = store.begin().unwrap();
        for n in 0..10 {
            let id = format!("c{n}");
            let mut customer = CustomerContext::new(&id);
            customer.app_installed = true;
            tx.save_customer(&customer, t0).unwrap();
            let mut i = instance(&format!("i{n}"), t0);
            i.customer = id;
            tx.start_instance(&i, &[step(ChannelKind::Push, t0)])
                .unwrap();
        }
        tx.commit().unwrap();
        let gate = open_gate();
        let channels =
            Channels::all(gate.clone()).with_rate(ChannelKind::Push, "2/s".parse().unwrap());
        let scheduler = on_virtual_clock(
            &store,
            channels,
            &clock,
            without_quiet_hours(Some(0)),
            HashMap::from([(ChannelKind::Push, Duration::from_millis(1500))]),
        );
        let mut records = Vec::new();
        loop {
            records.extend(scheduler.run_due().await.unwrap());
            match scheduler.next_due().await.unwrap() {
                Some(next) => clock.advance_to(next),
                None => break,
            }
            assert!(records.len() < 100, "{records:?}");
        }
        let sent: Vec<&LogRecord> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Sent)
            .collect();
        let deferred: Vec<&LogRecord> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Deferred)
            .collect();
        assert_eq!(sent.len(), 10, "{records:?}");
        assert_eq!(deferred.len(), 8, "each waits once: {records:?}");
        assert_eq!(records.len(), 18, "nothing else: {records:?}");
        assert_eq!(gate.sent.lock().unwrap().len(), 10);
        assert!(
            deferred
                .iter()
                .all(|r| r.reason.contains("rate limit: channels.push.rate is 2/s")),
            "{deferred:?}"
        );
        assert!(
            sent.iter().all(|r| r.attempt == 1),
            "waiting is not an attempt: {sent:?}"
        );
        let mut times: Vec<DateTime<Utc>> = sent.iter().map(|r| r.time).collect();
        times.sort();
        // Two at t0, then one every 500 ms: the last at t0 + 4 s, past the
        // lateness bound of 1.5 s measured from t0.
        assert_eq!(times[1], t0);
        assert_eq!(times[9] - t0, chrono::Duration::seconds(4));
        assert!(
            times
                .windows(2)
                .skip(1)
                .all(|w| w[1] - w[0] == chrono::Duration::milliseconds(500)),
            "{times:?}"
        );
        let text = recorder.handle().render();
        assert!(
            text.contains("nudge_rate_limited_total{channel=\"push\"} 8"),
            "{text}"
        );
        assert!(
            text.contains("nudge_rate_wait_seconds_count{channel=\"push\"} 8"),
            "{text}"
        );
    }
}
