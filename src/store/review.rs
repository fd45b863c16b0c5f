//! Reads for reviewing what the daemon did (marketing and risk): the
//! dispatch log filtered and paged by keyset, the counts behind funnels and
//! control groups, and one customer's instances. Nothing here writes rows
//! the daemon reads (PostgreSQL's reader folds the funnel's count deltas
//! into its counts, see `postgres::schema`): both backends implement
//! [`ReviewRead`] on connections that never migrate or lock the store
//! ([`open_reader`]), so the review runs beside a live daemon.
//!
//! The funnel's counts are kept as rows are written (SQLite v10,
//! PostgreSQL v11), not counted at read time: at 10 M log records a scan
//! of the log and every instance takes seconds.
//!
//! Paging is by keyset, never OFFSET: the log is ordered newest first by
//! (time, seq), a page ends at a [`LogCursor`], and the next page seeks
//! straight to the records before it through an index whose order is the
//! page's order (`dispatch_log_{time,journey,customer,outcome}`), so the
//! 1,000th page costs what the first does.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::StoreError;
use crate::context::CustomerContext;
use crate::model::{Category, InstanceStatus, LogRecord, Mode, Outcome};

/// Which dispatch-log records to read; every field set narrows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogFilter {
    pub journey: Option<String>,
    pub step: Option<String>,
    pub channel: Option<String>,
    pub outcome: Option<Outcome>,
    pub customer: Option<String>,
    /// Records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Records before this time.
    pub until: Option<DateTime<Utc>>,
}

impl LogFilter {
    /// Whether `r` passes the filter (what the store's query selects).
    pub fn matches(&self, r: &LogRecord) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.journey, &r.journey)
            && eq(&self.step, &r.step)
            && eq(&self.channel, &r.channel)
            && eq(&self.customer, &r.customer)
            && self.outcome.is_none_or(|o| o == r.outcome)
            && self.since.is_none_or(|t| r.time >= t)
            && self.until.is_none_or(|t| r.time < t)
    }
}

/// The last record of a page in the log's review order (time, then seq,
/// both descending): the next page starts strictly after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogCursor {
    pub time: DateTime<Utc>,
    pub seq: i64,
}

impl LogCursor {
    pub fn of(r: &LogRecord) -> Self {
        Self {
            time: r.time,
            seq: r.seq,
        }
    }
}

/// Dispatch-log records of one (journey, step, outcome, reason), counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeCount {
    pub journey: String,
    pub step: String,
    pub outcome: Outcome,
    pub reason: String,
    pub count: u64,
}

/// The instances of one arm (mode) of a journey, optionally of one script
/// version: how many, of how many customers, and how many converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmCount {
    pub journey: String,
    /// Set when counted per script version.
    pub rule_hash: Option<String>,
    pub mode: Mode,
    pub instances: u64,
    pub converted_instances: u64,
    /// Distinct customers with an instance in this arm.
    pub customers: u64,
    /// Distinct customers with a converted instance in this arm.
    pub converted_customers: u64,
    pub first_started: DateTime<Utc>,
    pub last_started: DateTime<Utc>,
}

/// A step of a journey's plan, as its latest instance has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedStep {
    pub step: String,
    pub seq: u32,
    pub channel: String,
}

/// An instance as stored: the rule decision that started it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceRecord {
    pub id: String,
    pub journey: String,
    pub key: String,
    pub status: InstanceStatus,
    #[serde(serialize_with = "mode_text")]
    pub mode: Mode,
    pub category: Category,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub rule_hash: String,
    pub trigger_event: String,
    /// The template variables the script produced.
    pub vars: Value,
    /// What the script saw when it decided (the customer context then).
    pub decision_inputs: Value,
}

fn mode_text<S: serde::Serializer>(m: &Mode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

/// Read-only queries for the review (CLI now, the admin page later).
pub trait ReviewRead: Send + Sync {
    /// Up to `limit` records passing `filter`, newest first by (time, seq),
    /// starting after `after` (from the newest when `None`).
    fn log_page(
        &self,
        filter: &LogFilter,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<Vec<LogRecord>, StoreError>;

    /// Settled log records (retrying and deferred left out: they are not
    /// what became of a step) counted per journey, step, outcome and reason.
    fn outcome_counts(&self, journey: Option<&str>) -> Result<Vec<OutcomeCount>, StoreError>;

    /// Instances counted per journey and mode, and per script version too when `by_rule`.
    fn arms(&self, journey: Option<&str>, by_rule: bool) -> Result<Vec<ArmCount>, StoreError>;

    /// The journey's steps in plan order, from its latest instance (empty
    /// when retention removed them all).
    fn planned_steps(&self, journey: &str) -> Result<Vec<PlannedStep>, StoreError>;

    /// The customer's instances, oldest first.
    fn customer_instances(&self, customer: &str) -> Result<Vec<InstanceRecord>, StoreError>;

    /// The customer's context as stored now (`None`: no context event yet).
    fn customer_context(&self, customer: &str) -> Result<Option<CustomerContext>, StoreError>;

    /// The time of the oldest record retention left in the log.
    fn log_reach(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// The runtime-control log (`nudge control log`), as
    /// [`Store::control_log`](super::Store::control_log) reads it.
    fn control_changes(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<super::control::ControlEntry>, StoreError>;

    /// The propensity counts (`nudge stats`), as
    /// [`Store::propensity_counts`](super::Store::propensity_counts) reads them.
    fn propensity_stats(
        &self,
        journey: Option<&str>,
    ) -> Result<Vec<crate::propensity::PropensityCount>, StoreError>;

    /// The events the decide stage kept for `customer`, oldest first, as
    /// [`Store::received_events`](super::Store::received_events) reads them.
    fn customer_events(
        &self,
        customer: &str,
    ) -> Result<Vec<super::received::ReceivedEvent>, StoreError>;
}

/// A value bound to a statement built by [`log_page_sql`].
#[derive(Debug, Clone)]
pub(crate) enum Param {
    Text(String),
    Time(DateTime<Utc>),
    Int(i64),
}

/// The statement of [`ReviewRead::log_page`] for `filter` and `after`, with
/// `placeholder(n)` naming the n-th (1-based) parameter and `columns` the
/// selected columns. Only the filters set appear, so that the planner sees
/// plain equalities and picks the index they lead.
pub(crate) fn log_page_sql(
    filter: &LogFilter,
    after: Option<LogCursor>,
    limit: usize,
    columns: &str,
    placeholder: fn(usize) -> String,
) -> (String, Vec<Param>) {
    let mut clauses = Vec::new();
    let mut params = Vec::new();
    let mut bind = |column: &str, op: &str, p: Param, clauses: &mut Vec<String>| {
        params.push(p);
        clauses.push(format!("{column} {op} {}", placeholder(params.len())));
    };
    let text = |v: &Option<String>| v.clone().map(Param::Text);
    for (column, value) in [
        ("journey", text(&filter.journey)),
        ("step", text(&filter.step)),
        ("channel", text(&filter.channel)),
        ("customer", text(&filter.customer)),
        (
            "outcome",
            filter.outcome.map(|o| Param::Text(o.as_str().into())),
        ),
    ] {
        if let Some(v) = value {
            bind(column, "=", v, &mut clauses);
        }
    }
    if let Some(t) = filter.since {
        bind("time", ">=", Param::Time(t), &mut clauses);
    }
    if let Some(t) = filter.until {
        bind("time", "<", Param::Time(t), &mut clauses);
    }
    if let Some(c) = after {
        params.push(Param::Time(c.time));
        params.push(Param::Int(c.seq));
        clauses.push(format!(
            "(time, seq) < ({}, {})",
            placeholder(params.len() - 1),
            placeholder(params.len())
        ));
    }
    let mut sql = format!("SELECT {columns} FROM dispatch_log");
    if !clauses.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&clauses.join(" AND "));
    }
    params.push(Param::Int(limit as i64));
    sql.push_str(&format!(
        " ORDER BY time DESC, seq DESC LIMIT {}",
        placeholder(params.len())
    ));
    (sql, params)
}

/// The statement of [`ReviewRead::arms`] as a full scan of the instances
/// (what the kept counts must equal; the tests compare them).
#[cfg(test)]
pub(crate) fn arms_sql(journey: bool, by_rule: bool, placeholder: &str) -> String {
    let hash = if by_rule { "rule_hash" } else { "NULL" };
    let filter = if journey {
        format!("WHERE journey = {placeholder}")
    } else {
        String::new()
    };
    let group = if by_rule {
        "journey, rule_hash, mode"
    } else {
        "journey, mode"
    };
    format!(
        "SELECT journey, {hash}, mode, count(*),
                count(CASE WHEN status = 'converted' THEN 1 END),
                count(DISTINCT customer),
                count(DISTINCT CASE WHEN status = 'converted' THEN customer END),
                min(started_at), max(started_at)
         FROM instances {filter} GROUP BY {group} ORDER BY {group}"
    )
}

/// The statement of [`ReviewRead::outcome_counts`] as a full scan of the log
/// (what the kept counts must equal; the tests compare them).
#[cfg(test)]
pub(crate) fn outcome_counts_sql(journey: bool, placeholder: &str) -> String {
    let filter = if journey {
        format!("AND journey = {placeholder}")
    } else {
        String::new()
    };
    format!(
        "SELECT journey, step, outcome, reason, count(*) FROM dispatch_log
         WHERE outcome NOT IN ('retrying', 'deferred') {filter}
         GROUP BY journey, step, outcome, reason ORDER BY journey, step, outcome, reason"
    )
}

/// Plan of the latest instance of journey `placeholder` that has steps left.
pub(crate) fn planned_steps_sql(placeholder: &str) -> String {
    format!(
        "SELECT step, seq, channel FROM steps WHERE instance_id = (
             SELECT id FROM instances WHERE journey = {placeholder}
             ORDER BY started_at DESC LIMIT 1)
         ORDER BY seq"
    )
}

/// Columns of a dispatch-log row, as `log_record` readers expect them.
pub(crate) const LOG_COLUMNS: &str = "seq, time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms";

/// [`ReviewRead::arms`] from the count tables kept with the instances
/// (`review_arm_counts`, `review_rule_arm_counts`): the rows `arms_sql`
/// groups, read instead of computed.
pub(crate) fn arm_counts_sql(journey: bool, by_rule: bool, placeholder: &str) -> String {
    let (table, hash, order) = if by_rule {
        (
            "review_rule_arm_counts",
            "rule_hash",
            "journey, rule_hash, mode",
        )
    } else {
        ("review_arm_counts", "NULL", "journey, mode")
    };
    let filter = if journey {
        format!("WHERE journey = {placeholder}")
    } else {
        String::new()
    };
    format!(
        "SELECT journey, {hash}, mode, instances, converted_instances, customers,
                converted_customers, first_started, last_started
         FROM {table} {filter} ORDER BY {order}"
    )
}

/// [`ReviewRead::outcome_counts`] from `review_outcome_counts`, kept with
/// the log: the rows `outcome_counts_sql` groups.
pub(crate) fn outcome_count_rows_sql(journey: bool, placeholder: &str) -> String {
    let filter = if journey {
        format!("WHERE journey = {placeholder}")
    } else {
        String::new()
    };
    format!(
        "SELECT journey, step, outcome, reason, records FROM review_outcome_counts {filter}
         ORDER BY journey, step, outcome, reason"
    )
}
