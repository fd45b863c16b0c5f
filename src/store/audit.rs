//! The audit stream's outbox (`audit.topic`): every dispatch-log record,
//! once the daemon turns the outbox on, gets an outbox row in the
//! transaction that writes the record (on PostgreSQL a statement trigger,
//! so no write path can forget it; on SQLite the one function each path
//! writes the log through, since a trigger there tripled an insert's cost),
//! and stays there until the publisher has the
//! broker's acknowledgement. One publisher at a time holds the outbox
//! (a lease in the store), reading it in log order, so one customer's
//! records reach the topic in the order they were logged.

use crate::model::LogRecord;

/// An outbox row, with the log record it stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub seq: i64,
    pub customer: String,
    /// `None` when retention deleted the log record before it was published
    /// (an outage of the topic longer than `store.retention`).
    pub record: Option<LogRecord>,
}

/// Pairs outbox rows with their records (found by seq).
pub(crate) fn pair(rows: Vec<(i64, String)>, records: Vec<LogRecord>) -> Vec<AuditRecord> {
    let mut by_seq: std::collections::HashMap<i64, LogRecord> =
        records.into_iter().map(|r| (r.seq, r)).collect();
    rows.into_iter()
        .map(|(seq, customer)| AuditRecord {
            seq,
            customer,
            record: by_seq.remove(&seq),
        })
        .collect()
}
