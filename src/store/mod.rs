//! Durable state behind one trait: customer context, journey instances,
//! scheduled steps, processed event ids, Kafka offsets and the dispatch log.
//!
//! Guarantees every implementation gives (checked by the conformance suite):
//! - everything written through one [`Tx`] commits or rolls back together, so
//!   one event's effects (and the Kafka offset that produced them) are atomic;
//! - at most one open instance per (customer, journey, key);
//! - a due step is claimed by one worker at a time, under a lease that
//!   expires if the worker dies, so no step is lost and none is claimed twice;
//! - with several replicas on one database (PostgreSQL), a customer's steps
//!   are claimed by one replica at a time, so caps and arbitration hold.
//!
//! Two backends, chosen by `store.url` ([`open`]): SQLite, one file for one
//! node, and PostgreSQL, shared by replicas. Errors say whether retrying
//! can help ([`StoreError::is_transient`]).

pub mod audit;
#[cfg(test)]
pub(crate) mod conformance;
pub mod control;
mod dead_letters;
mod handle;
pub mod postgres;
pub mod received;
pub mod review;
pub mod sqlite;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::config::{StoreConfig, StoreUrl};
use crate::context::CustomerContext;
use crate::model::{Category, ChannelKind, DueStep, HistoryEntry, InstanceStatus, LogRecord, Mode};

pub use self::postgres::PostgresStore;
pub use audit::AuditRecord;
pub use dead_letters::{ClaimedDeadLetter, DeadLetter, DeadLetterBacklog, RecordHeader};
pub use handle::AsyncStore;
pub use received::{EndedNothing, NotStarted, NotStartedWhy, ReceivedEvent};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Not the error's `source`: its text already holds the server's
    /// message, which a chain of causes would print twice.
    #[error("postgres: {}", postgres_reason(.0))]
    Postgres(::postgres::Error),
    /// No connection within the pool's timeout (the database is down,
    /// unreachable, or every connection is busy).
    #[error("no database connection: {0}")]
    Pool(String),
    /// The store's settings cannot work (URL, password, TLS files).
    #[error("{0}")]
    Config(String),
    /// A write of the transaction failed, so it was rolled back whole.
    #[error("the transaction was rolled back: a statement in it failed")]
    Aborted,
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("the database's schema is version {found}, newer than this binary's {supported}: run a newer nudge, or restore a backup taken before the upgrade")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("{path} is in use by another nudge process{}: one daemon per SQLite file (several replicas need a shared database)", holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default())]
    Locked { path: String, holder: Option<u32> },
    /// The SQLite file was copied into PostgreSQL: running a daemon on it
    /// again would send a second time what the replicas there send.
    #[error("{path} was moved to {to} at {at} (nudge migrate --from): a daemon on this file would send again what is sent from there; run nudge with store.url = \"{to}\"")]
    Moved {
        path: String,
        to: String,
        at: DateTime<Utc>,
    },
    /// [`Tx::set_offset`] found the store at another offset than the
    /// consumer's: the transaction is rolled back and the consumer must
    /// read again from the store's offset.
    #[error("the store holds offset {} for {topic}/{partition}, not {expected} as this consumer last stored: the store went back (a failover to a standby that missed the last transactions, a restored backup) or another consumer moved it", found.map_or("none".to_string(), |o| o.to_string()))]
    OffsetMoved {
        topic: String,
        partition: i32,
        expected: i64,
        found: Option<i64>,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> Self {
        StoreError::Postgres(e)
    }
}

/// The server's own message and SQLSTATE, or the cause of a connection
/// failure: the client's display of either is a bare "db error". The
/// server's detail line is left out (it may quote a row's values).
fn postgres_reason(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

impl StoreError {
    /// Whether the same work may succeed when tried again later: the
    /// database busy, unreachable or restarting, a concurrent writer
    /// (serialization failure, deadlock, a unique key another replica wrote
    /// first), or the machine short of something ops can give back (a full
    /// disk, an I/O error, a file made read-only). The caller retries with
    /// backoff and reports not ready meanwhile: the events wait in Kafka
    /// rather than being dead-lettered. So is a privilege or object the
    /// engine's statements need taken away under it: no record is at fault.
    /// Anything else (corrupt rows, a schema newer than the binary, bad
    /// settings, a value the database refuses, constraint violations of the
    /// engine's own making) will fail again the same way.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::ReadOnly
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::OutOfMemory
            ),
            StoreError::Postgres(e) => match e.as_db_error() {
                Some(db) => transient_sqlstate(db.code()),
                // No answer from the server: the connection broke or never came up.
                None => {
                    e.is_closed()
                        || std::error::Error::source(e)
                            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
                }
            },
            StoreError::Pool(_) => true,
            // The database file removed or replaced under the daemon: ops
            // restore it or restart; meanwhile the events wait in Kafka.
            StoreError::Io { .. } => true,
            StoreError::Sqlite(_)
            | StoreError::Corrupt(_)
            | StoreError::SchemaTooNew { .. }
            | StoreError::Locked { .. }
            | StoreError::Moved { .. }
            | StoreError::Config(_)
            | StoreError::Aborted => false,
            // Retrying the same batch fails the same way: the consumer
            // reads again from the store's offset instead.
            StoreError::OffsetMoved { .. } => false,
        }
    }
}

/// PostgreSQL error codes that a retry can get past.
fn transient_sqlstate(code: &::postgres::error::SqlState) -> bool {
    use ::postgres::error::SqlState;
    // Class 08: connection exceptions; 25: a transaction state the server
    // imposed (read-only after a failover, idle-session timeouts); 3F and
    // the undefined objects and privilege of 42 below: a schema, table,
    // function or privilege the engine's own statements need is gone (a
    // DBA's REVOKE, a changed search_path), which no record causes:
    // dead-lettering would throw away every event of the moment, waiting
    // loses none (a syntax error, also 42, stays permanent); 53:
    // insufficient resources (disk full,
    // out of memory, too many connections); 55: a lock or object another
    // session holds; 57: operator intervention (cancelled, shut down);
    // 58: system (I/O) errors.
    ["08", "25", "3F", "53", "55", "57", "58"]
        .iter()
        .any(|class| code.code().starts_with(class))
        || [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            // Another replica inserted the same key first.
            SqlState::UNIQUE_VIOLATION,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            // Connected to a standby during a failover.
            SqlState::READ_ONLY_SQL_TRANSACTION,
            // Taken away under the engine (its schema was migrated at start).
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::UNDEFINED_TABLE,
            SqlState::UNDEFINED_COLUMN,
            SqlState::UNDEFINED_FUNCTION,
            SqlState::UNDEFINED_OBJECT,
        ]
        .contains(code)
}

/// Opens the store `config` names, as the daemon does: SQLite as the file's
/// one owner (claims left by a dead predecessor released at once), or a
/// pool on PostgreSQL (claims of a predecessor that is gone from the same
/// host and pid released at once). Either way the schema is migrated first. Returns the
/// store and the number of claims released. Call it from a blocking
/// context (not an async worker): the PostgreSQL client blocks.
pub fn open(config: &StoreConfig) -> Result<(Arc<dyn Store>, usize), StoreError> {
    match target(config)? {
        StoreUrl::Sqlite(path) => {
            let (store, released) = SqliteStore::open_exclusive(&path, config.cache_mb)?;
            Ok((Arc::new(store), released))
        }
        StoreUrl::Postgres(url) => {
            let store = PostgresStore::open(&pg_options(config, url)?)?;
            let released = store.release_dead_predecessors()?;
            Ok((Arc::new(store), released))
        }
    }
}

/// Refuses what opening the store `config` names would refuse before
/// connecting: the URL, the password's source, the TLS settings and CA
/// file (`nudge check`, and the daemon before it opens anything).
pub fn check_settings(config: &StoreConfig) -> Result<(), StoreError> {
    if let StoreUrl::Postgres(url) = target(config)? {
        postgres::check_options(&pg_options(config, url)?)?;
    }
    Ok(())
}

/// Opens the store `config` names to review it ([`review::ReviewRead`]):
/// beside a running daemon, without migrating or locking it (a SQLite file
/// is read through query-only connections; PostgreSQL through a small
/// pool). The schema must be this binary's version. Blocking, like [`open`].
pub fn open_reader(config: &StoreConfig) -> Result<Box<dyn review::ReviewRead>, StoreError> {
    match target(config)? {
        StoreUrl::Sqlite(path) => Ok(Box::new(SqliteStore::open_reader(&path, config.cache_mb)?)),
        StoreUrl::Postgres(url) => {
            let options = postgres::PgOptions {
                pool_size: 2,
                ..pg_options(config, url)?
            };
            Ok(Box::new(PostgresStore::open_reader(&options)?))
        }
    }
}

/// Brings the schema of the store `config` names to this binary's version
/// (the `nudge migrate` command): (version found, version now).
pub fn migrate(config: &StoreConfig) -> Result<(u32, u32), StoreError> {
    match target(config)? {
        StoreUrl::Sqlite(path) => SqliteStore::migrate(&path),
        StoreUrl::Postgres(url) => PostgresStore::migrate(&pg_options(config, url)?),
    }
}

/// Copies the SQLite store at `source` into the PostgreSQL store `config`
/// names, which must be empty (`nudge migrate --from`; see
/// [`postgres::import`]).
pub fn move_to_postgres(
    source: &std::path::Path,
    config: &StoreConfig,
    force: bool,
) -> Result<postgres::import::Moved, postgres::import::MoveError> {
    match target(config)? {
        StoreUrl::Postgres(url) => {
            postgres::import::from_sqlite(source, &pg_options(config, url.clone())?, &url, force)
        }
        StoreUrl::Sqlite(path) => Err(StoreError::Config(format!(
            "the store to move into is the SQLite file {}: name the PostgreSQL store in store.url \
             (or NUDGE_STORE__URL)",
            path.display()
        ))
        .into()),
    }
}

/// Where the SQLite store `config` names was moved to, and when
/// (`nudge migrate --from`), for readers of its history to say so; `None`
/// for PostgreSQL, a file never moved, or one that cannot be read.
pub fn moved_to(config: &StoreConfig) -> Option<(String, DateTime<Utc>)> {
    let Ok(StoreUrl::Sqlite(path)) = target(config) else {
        return None;
    };
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row("SELECT target, at FROM store_moved", [], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)?))
    })
    .ok()
    .and_then(|(to, at)| Some((to, DateTime::from_timestamp_millis(at)?)))
}

fn target(config: &StoreConfig) -> Result<StoreUrl, StoreError> {
    config
        .target()
        .map_err(|e| StoreError::Config(format!("store.url: {e}")))
}

fn pg_options(config: &StoreConfig, url: String) -> Result<postgres::PgOptions, StoreError> {
    Ok(postgres::PgOptions {
        url,
        password: config
            .password()
            .map_err(|e| StoreError::Config(e.to_string()))?,
        pool_size: config.pool_size,
        ca_file: config.ca_file.clone(),
    })
}

#[derive(Debug, Clone)]
pub struct NewInstance {
    pub id: String,
    pub customer: String,
    pub journey: String,
    pub key: String,
    pub mode: Mode,
    pub category: Category,
    pub started_at: DateTime<Utc>,
    pub rule_hash: String,
    pub trigger_event: String,
    pub vars: Map<String, Value>,
    /// What the script saw when it decided: the decision record.
    pub decision_inputs: Value,
}

#[derive(Debug, Clone)]
pub struct NewStep {
    pub step: String,
    pub seq: u32,
    pub channel: ChannelKind,
    pub template: String,
    pub condition: Option<String>,
    pub due_at: DateTime<Utc>,
}

/// An existing instance, as an event that ends it needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRef {
    pub id: String,
    pub rule_hash: String,
}

/// A step that was pending when its instance closed.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedStep {
    pub step: String,
    pub channel: ChannelKind,
    pub template: String,
}

/// What became of a claimed step.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub record: LogRecord,
    /// Try again at this time (retry or deferral) instead of settling the step.
    pub again_at: Option<DateTime<Utc>>,
    /// For deferrals: lateness is measured from the new time.
    pub replan: bool,
    /// [`DueStep::row`] of the step settled, when known.
    pub claimed_row: Option<i64>,
    /// The step was delivered on a channel that takes back its deliveries
    /// (`channels.<kind>.withdraw`): if an exit ended its journey while it
    /// was being sent, a withdrawal is planned in the settle's transaction,
    /// as the exit plans one for what was delivered before it.
    pub withdraw_if_ended: bool,
}

pub trait Store: Send + Sync {
    /// Starts a write transaction; dropping it without `commit` rolls back.
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError>;

    /// Claims up to `limit` steps of `channel` due at `now` (and steps whose
    /// lease expired), leasing them until `lease_until`.
    fn claim_due(
        &self,
        channel: ChannelKind,
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<DueStep>, StoreError>;

    /// Settles (or reschedules) claimed steps and appends their log
    /// records, in one transaction (all of them or none); returns each
    /// record's position in the log, in order. By reference, so that a
    /// caller meeting a transient error tries the same results again
    /// without copying them first.
    ///
    /// A result with a [`StepResult::claimed_row`] is fenced: it is
    /// recorded only while its step is still this worker's claim (or back
    /// to pending after its lease ran out, unclaimed since). A worker that
    /// stalled past its lease while another took the step over (or
    /// settled it) gets `None` for it and writes nothing: the holder
    /// records that step, so one send is never logged (and counted against
    /// caps) twice.
    fn settle_steps(&self, results: &[StepResult]) -> Result<Vec<Option<i64>>, StoreError>;

    /// [`settle_steps`](Self::settle_steps), returning the records written
    /// (a result fenced off is left out).
    fn finish_steps(&self, results: Vec<StepResult>) -> Result<Vec<LogRecord>, StoreError> {
        let seqs = self.settle_steps(&results)?;
        Ok(results
            .into_iter()
            .zip(seqs)
            .filter_map(|(r, seq)| {
                Some(LogRecord {
                    seq: seq?,
                    ..r.record
                })
            })
            .collect())
    }

    /// [`finish_steps`](Self::finish_steps) for one step: `None` when it
    /// was fenced off.
    fn finish_step(&self, result: &StepResult) -> Result<Option<LogRecord>, StoreError> {
        let seq = self.settle_steps(std::slice::from_ref(result))?;
        Ok(seq[0].map(|seq| LogRecord {
            seq,
            ..result.record.clone()
        }))
    }

    /// Extends the leases of claimed steps ([`DueStep::row`]) that this
    /// worker still holds to `until` (a lease is never shortened): the
    /// heartbeat of a worker still sending them, so that no other replica
    /// takes them over. Renew well within the lease: a step whose lease ran
    /// out may already be someone else's. Returns the rows renewed (the
    /// others were settled, released or taken over).
    fn renew_claims(&self, rows: &[i64], until: DateTime<Utc>) -> Result<Vec<i64>, StoreError>;

    /// Records that the claimed steps `rows` are about to be sent, before
    /// the first byte leaves: until their results are settled they count
    /// against the customer's frequency cap as possibly delivered (see
    /// [`CustomerContext::possibly_sent`]), so that a worker taking over a
    /// dead one's claims knows what may already have reached the customer.
    fn mark_sending(&self, rows: &[i64], at: DateTime<Utc>) -> Result<(), StoreError>;

    /// Earliest time a pending step of `channel` (any channel if None) is due.
    /// With a channel, on a store that replicas share: the earliest time this
    /// replica can claim one (a customer another replica holds waits for
    /// the end of its lease at the latest), or take over a step another
    /// replica claimed and did not renew (when its lease ends).
    fn next_due(&self, channel: Option<ChannelKind>) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Returns the claimed steps this store holds to pending: on SQLite (one
    /// node) every claim, at start-up, where no other worker can hold one;
    /// on PostgreSQL this replica's claims only.
    fn release_all_leases(&self) -> Result<usize, StoreError>;

    /// The customer's context, with journeys and sends since `window_start`.
    fn customer(
        &self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError>;

    /// Steps of an instance already sent, oldest first.
    fn history(&self, instance_id: &str) -> Result<Vec<HistoryEntry>, StoreError>;

    /// [`customer`](Self::customer) for several customers, in order, reading
    /// only what the caller needs: sends since `sends_since` (none when
    /// `None`) and the journeys only when `journeys`.
    fn customers(
        &self,
        ids: &[String],
        sends_since: Option<DateTime<Utc>>,
        journeys: bool,
    ) -> Result<Vec<CustomerContext>, StoreError> {
        ids.iter()
            .map(|id| {
                let mut c = self.customer(id, sends_since.unwrap_or(DateTime::<Utc>::MAX_UTC))?;
                if !journeys {
                    c.journeys.clear();
                }
                Ok(c)
            })
            .collect()
    }

    /// [`history`](Self::history) for several instances, in order.
    fn histories(&self, instance_ids: &[String]) -> Result<Vec<Vec<HistoryEntry>>, StoreError> {
        instance_ids.iter().map(|id| self.history(id)).collect()
    }

    /// Dispatch log records with seq > `after`, oldest first.
    fn log_after(&self, after: i64, limit: usize) -> Result<Vec<LogRecord>, StoreError>;

    /// Next offset to consume per partition of `topic`, as committed with the effects.
    fn offsets(&self, topic: &str) -> Result<Vec<(i32, i64)>, StoreError>;

    /// Remembers a rule set version (content hash per file) when it is loaded.
    fn record_rules(
        &self,
        version: &str,
        files: &Value,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Dead letters waiting to be published (neither published nor given
    /// up), oldest first, with their outbox ids.
    fn unpublished_dead_letters(&self, limit: usize) -> Result<Vec<(i64, DeadLetter)>, StoreError>;

    /// Waiting dead letters for this worker to publish, oldest first, each
    /// payload cut to its first `max_payload` bytes (a publisher cannot send
    /// more, and a huge original need not cross the wire): those not
    /// waiting for a retry (`retry_at` after `now`). With several replicas
    /// on one store each letter is handed to one of them at a time, until
    /// `until` (then, unpublished, to any), so the topic does not get every
    /// letter once per replica.
    fn claim_dead_letters(
        &self,
        limit: usize,
        max_payload: usize,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<ClaimedDeadLetter>, StoreError>;

    fn mark_dead_letters_published(&self, ids: &[i64], at: DateTime<Utc>)
        -> Result<(), StoreError>;

    /// Records that publishing claimed dead letter `id` failed with `error`:
    /// one more attempt, its claim released, not claimed again before
    /// `retry_at`; with `give_up`, marked failed at `at` instead and never
    /// claimed again (it stays in the store, counted by
    /// [`dead_letter_backlog`](Self::dead_letter_backlog), until an operator
    /// clears `failed_at`).
    fn dead_letter_publish_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        give_up: bool,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// How many dead letters are not published: waiting (for their first
    /// try or a retry) and failed (given up).
    fn dead_letter_backlog(&self) -> Result<DeadLetterBacklog, StoreError>;

    /// Whether this worker still holds the claim of step `row` after `now`.
    /// A worker that reckons a claim's lease ran out (it stalled, or the
    /// wall clock stepped forward) asks before letting the step go: a claim
    /// its heartbeat renewed, or its own later claim took again, is still
    /// its to send; one released or taken over is not.
    fn claim_held(&self, row: i64, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Puts a claimed step back as it was, unsent (shutting down before
    /// sending it); on channel `to` when given: a step bound for a fallback
    /// that runtime control stopped waits with that channel's steps, not
    /// with its own channel's (which would claim it again at once).
    fn release_claim(
        &self,
        instance_id: &str,
        step: &str,
        to: Option<ChannelKind>,
    ) -> Result<(), StoreError>;

    /// Calls `heard` with a channel whenever another process sharing the
    /// store hands claimed steps of that channel back unsent (a replica
    /// draining on SIGTERM), so that this one takes them at once rather
    /// than at its next idle look; and with the error when it cannot
    /// listen for now (it tries again with backoff). A store one process
    /// owns alone has no one to hear: the default does nothing.
    fn on_steps_released(
        &self,
        heard: Box<dyn Fn(Result<ChannelKind, StoreError>) + Send + Sync>,
    ) -> Result<(), StoreError> {
        drop(heard);
        Ok(())
    }

    /// Deletes what is older than `before` and no longer needed: ended
    /// instances and their steps, dispatch-log records, processed event ids,
    /// received events, published dead letters. Returns the rows deleted.
    fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Counts steps by status (for metrics, tests and the benchmarks).
    fn step_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;

    // Audit stream (`audit.topic`, see `store::audit`).

    /// Turns the audit outbox on or off for every writer of this store:
    /// while on, each dispatch-log record written gets an outbox row in
    /// the same transaction.
    fn set_audit_outbox(&self, enabled: bool) -> Result<(), StoreError>;

    /// Takes (or renews) the one publisher's lease until `until` and returns
    /// up to `limit` outbox rows, oldest first; none while another replica
    /// holds a lease that has not run out at `now`.
    fn claim_audit_records(
        &self,
        limit: usize,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// Removes published rows from the outbox.
    fn delete_audit_records(&self, seqs: &[i64]) -> Result<(), StoreError>;

    /// Outbox rows waiting to be published.
    fn audit_backlog(&self) -> Result<u64, StoreError>;

    // --- Arbitration (issue 13) ---

    /// The pending steps of open instances of `customers` due at or before
    /// `until`, soonest first: what arbitration weighs a claimed step
    /// against. A read only: nothing is claimed, so the steps still go
    /// through their own channel's claim when due. With replicas, the
    /// caller holds these customers (its claim of their due steps), so no
    /// other replica decides for them meanwhile.
    fn upcoming_steps(
        &self,
        customers: &[String],
        until: DateTime<Utc>,
    ) -> Result<Vec<DueStep>, StoreError>;

    // ── Runtime control (the control module: admin API, `nudge control`) ──

    /// Every runtime-control override in force, by kind and target.
    fn control_overrides(&self) -> Result<Vec<control::ControlRow>, StoreError>;

    /// Applies one change in one transaction: reads the target's override
    /// under a lock (so concurrent changes, on any replica, each see the
    /// other's result), writes what `change.edit` makes of it (removed when
    /// empty) and appends the control-log entry, which it returns.
    fn change_control(
        &self,
        change: &control::ControlChange<'_>,
    ) -> Result<control::ControlEntry, StoreError>;

    /// Control-log entries with `since <= time < until`, oldest first; the
    /// newest `limit` when there are more. Retention never purges them.
    fn control_log(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<control::ControlEntry>, StoreError>;

    // ── Propensity (issue 13, item 2; see `crate::propensity`) ──

    /// Sends and conversions per (journey, step, channel), of `journey` or
    /// of all, ordered by journey, step and channel. A send is counted by
    /// [`settle_steps`](Self::settle_steps) in the transaction that logs
    /// the step `sent`, a conversion by [`Tx::credit_conversion`]; retention
    /// never purges them.
    fn propensity_counts(
        &self,
        journey: Option<&str>,
    ) -> Result<Vec<crate::propensity::PropensityCount>, StoreError>;

    // ── Decision record (issue 14 item 2, issue 13 item 10) ──

    /// The events the decide stage kept for `customer`
    /// ([`Tx::record_event`]), oldest first.
    fn received_events(&self, customer: &str) -> Result<Vec<ReceivedEvent>, StoreError>;

    // ── Review counts (issue 14: the funnel at 10 M records) ──

    /// Brings the funnel's kept counts up to date with what was written
    /// since the last call, off the sending path; the daemon calls it every
    /// few seconds. Reads are right without it (they add, or fold, what is
    /// not yet folded), only slower the more there is. Returns the records
    /// folded where the store counts them (SQLite; 0 on PostgreSQL).
    fn fold_review_counts(&self) -> Result<u64, StoreError>;
}

/// One atomic unit of work: the effects of one or more events. After a
/// method fails the transaction is lost: drop it (PostgreSQL rolls it back
/// whole, and `commit` then fails with [`StoreError::Aborted`]).
pub trait Tx {
    /// Reads at once what deciding a batch of events (dedup key, customer) will
    /// ask for, where each read is a round trip (PostgreSQL); the reads
    /// that follow answer from it, kept true to the transaction's own
    /// writes. `window_start` as in [`customer`](Self::customer).
    fn prefetch(
        &mut self,
        events: &[(&str, &str)],
        window_start: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _ = (events, window_start);
        Ok(())
    }
    /// Whether this event ([`Event::dedup_key`](crate::event::Event::dedup_key):
    /// source and id) was processed before (the dedup window).
    fn already_processed(&mut self, event_id: &str) -> Result<bool, StoreError>;
    fn mark_processed(&mut self, event_id: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
    fn customer(
        &mut self,
        id: &str,
        window_start: DateTime<Utc>,
    ) -> Result<CustomerContext, StoreError>;
    fn save_customer(
        &mut self,
        customer: &CustomerContext,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    fn open_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
    ) -> Result<Option<InstanceRef>, StoreError>;
    /// The instance an exit event ends: the open one, or else the latest one
    /// that completed (all steps settled) at or after `completed_since`, so
    /// a conversion after the last step still counts.
    fn exitable_instance(
        &mut self,
        customer: &str,
        journey: &str,
        key: &str,
        completed_since: DateTime<Utc>,
    ) -> Result<Option<InstanceRef>, StoreError>;
    /// The instance's arm (live, control group, shadow); `None` if unknown.
    fn instance_mode(&mut self, instance_id: &str) -> Result<Option<Mode>, StoreError>;
    /// A second open instance for one key is refused, here or (where the
    /// backend holds writes to batch them) at the next read or the commit.
    fn start_instance(
        &mut self,
        instance: &NewInstance,
        steps: &[NewStep],
    ) -> Result<(), StoreError>;
    /// Ends an open (or completed) instance and cancels its pending steps,
    /// returning them in plan order.
    fn close_instance(
        &mut self,
        instance_id: &str,
        status: InstanceStatus,
        at: DateTime<Utc>,
    ) -> Result<Vec<ClosedStep>, StoreError>;
    fn append_log(&mut self, record: &LogRecord) -> Result<(), StoreError>;
    /// Moves a partition's offset from `expected`, the offset this consumer
    /// last stored or found at assignment (0: none stored), to
    /// `next_offset`, forward or back (a log restarted beneath the store's
    /// offset, a re-created topic, is read again from its start). Fails with
    /// [`StoreError::OffsetMoved`], here or at the commit, when the store
    /// holds another offset: it went back under the consumer (a failover to
    /// a standby that missed the last transactions, a restored backup) or
    /// another consumer moved it, and either way the batch's effects would
    /// be written over a position that is not theirs.
    fn set_offset(
        &mut self,
        topic: &str,
        partition: i32,
        expected: i64,
        next_offset: i64,
    ) -> Result<(), StoreError>;
    fn add_dead_letter(&mut self, letter: &DeadLetter, at: DateTime<Utc>)
        -> Result<(), StoreError>;
    fn commit(self: Box<Self>) -> Result<(), StoreError>;

    // Withdrawal (issue 13, item 9).

    /// Plans the withdrawal of each step of `instance_id` delivered (`sent`)
    /// on one of `channels`: a pending step `<step>:withdraw` on the channel
    /// it went out on (a fallback's, as the dispatch log says), due at `at`, that the scheduler sends and retries like any
    /// step. Planned once (a second call adds nothing). Returns the steps
    /// withdrawn, in plan order.
    fn plan_withdrawals(
        &mut self,
        instance_id: &str,
        channels: &[ChannelKind],
        at: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError>;

    // Propensity (issue 13, item 2).

    /// Credits the conversion of `instance_id` (ended `converted` by its
    /// exit event at `at`) to each of its steps sent at or after
    /// `sent_since` and not after `at`, on the channel each went out on:
    /// one conversion per (journey, step, channel). Returns how many steps
    /// were credited.
    fn credit_conversion(
        &mut self,
        instance_id: &str,
        sent_since: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<usize, StoreError>;

    // Decision record (issue 14 item 2, issue 13 item 10).

    /// Keeps an event the decide stage processed (not a duplicate): whose
    /// it was, whether it changed the context, and each journey it
    /// triggered that did not start, with why. Purged by retention.
    fn record_event(&mut self, event: &ReceivedEvent) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::postgres::error::SqlState;

    #[test]
    fn busy_databases_and_concurrent_writers_are_transient_the_rest_permanent() {
        for code in [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::UNIQUE_VIOLATION,
            SqlState::CONNECTION_FAILURE,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::READ_ONLY_SQL_TRANSACTION,
            // Ops can give these back: the events wait in Kafka meanwhile.
            SqlState::DISK_FULL,
            SqlState::IO_ERROR,
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::UNDEFINED_TABLE,
            SqlState::INVALID_SCHEMA_NAME,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        ] {
            assert!(transient_sqlstate(&code), "{code:?}");
        }
        for code in [
            SqlState::SYNTAX_ERROR,
            SqlState::CHECK_VIOLATION,
            SqlState::CHARACTER_NOT_IN_REPERTOIRE,
            SqlState::NOT_NULL_VIOLATION,
            SqlState::INVALID_PASSWORD,
        ] {
            assert!(!transient_sqlstate(&code), "{code:?}");
        }
        let sqlite = |code| {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        assert!(sqlite(rusqlite::ffi::SQLITE_BUSY).is_transient());
        assert!(sqlite(rusqlite::ffi::SQLITE_LOCKED).is_transient());
        assert!(sqlite(rusqlite::ffi::SQLITE_FULL).is_transient());
        assert!(sqlite(rusqlite::ffi::SQLITE_IOERR).is_transient());
        assert!(sqlite(rusqlite::ffi::SQLITE_READONLY).is_transient());
        assert!(!sqlite(rusqlite::ffi::SQLITE_CONSTRAINT).is_transient());
        assert!(!sqlite(rusqlite::ffi::SQLITE_CORRUPT).is_transient());
        for permanent in [
            StoreError::Corrupt("x".into()),
            StoreError::SchemaTooNew {
                found: 9,
                supported: 2,
            },
            StoreError::Config("x".into()),
            StoreError::Aborted,
            StoreError::Locked {
                path: "x".into(),
                holder: None,
            },
            StoreError::Moved {
                path: "x".into(),
                to: "y".into(),
                at: DateTime::UNIX_EPOCH,
            },
        ] {
            assert!(!permanent.is_transient(), "{permanent}");
        }
    }
}
