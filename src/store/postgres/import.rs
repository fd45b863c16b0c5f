//! Moving a node's SQLite store into PostgreSQL (`nudge migrate --from`),
//! for when one node is no longer enough. Everything the daemon keeps goes
//! across in one PostgreSQL transaction: the journeys under way and their
//! due steps, each customer's context, the dispatch log and the decision
//! record, dead letters, runtime control, the propensity counts, the ids of
//! processed events and each partition's Kafka offset, so that replicas
//! resume where the node stopped, with nothing decided or sent twice.
//!
//! The file is taken as its owner (a running daemon keeps it, and the copy
//! is refused), and marked as moved before the copy commits: a daemon
//! started on it again afterwards would send what the replicas send, so
//! [`SqliteStore::open_exclusive`] refuses it. If the copy fails, the mark is
//! taken back and PostgreSQL keeps nothing of it.

use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use postgres::types::ToSql;
use postgres::Transaction;

use super::{PgOptions, PostgresStore};
use crate::store::{SqliteStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--from {0}: no such file")]
    NoSource(String),
    #[error("--from {0}: holds no nudge store (not a SQLite database, or no schema): give the node's store.path")]
    NotAStore(String),
    #[error("--from {0}: the store holds none of nudge's data (no customer, journey, log record, offset or dead letter): give the node's store.path")]
    NothingToMove(String),
    #[error("{path} is in use by a running nudge (pid {}): stop it (SIGTERM) and run the move again", holder.map_or("unknown".to_string(), |p| p.to_string()))]
    Running { path: String, holder: Option<u32> },
    #[error("{path} was already moved to {to} at {at}: replicas there may be sending its steps, and a second copy would send them again; if that store is lost and nothing runs on it, move again with --force")]
    AlreadyMoved {
        path: String,
        to: String,
        at: DateTime<Utc>,
    },
    #[error("{target} already holds nudge's data ({tables}): move into an empty store (a new database, or a schema of its own named in store.url)")]
    NotEmpty { target: String, tables: String },
    #[error("{count} steps in {source_name} belong to no journey instance (e.g. instance {example}): the file is damaged; nothing was copied")]
    OrphanSteps {
        source_name: String,
        count: i64,
        example: String,
    },
    #[error("copying {table}: {source}; nothing was copied")]
    Table {
        table: &'static str,
        source: StoreError,
    },
    #[error("copying {table}: {read} rows read, {arrived} arrived; nothing was copied")]
    Lost {
        table: &'static str,
        read: u64,
        arrived: i64,
    },
}

/// What was moved: rows per table, and the claims of a dead daemon that
/// were released first (their steps are due again, as at a restart).
#[derive(Debug)]
pub struct Moved {
    /// Set when the file had been moved into this same store before: nothing was done.
    pub already: Option<DateTime<Utc>>,
    pub rows: Vec<(&'static str, u64)>,
    pub released: usize,
    pub version: u32,
}

/// How a column's SQLite value becomes PostgreSQL's.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    /// Text holding JSON, `jsonb` there.
    Json,
    Int8,
    Int4,
    /// Milliseconds since the epoch, `timestamptz` there.
    Time,
    /// 0 or 1, `boolean` there.
    Bool,
    Bytes,
}

impl Kind {
    fn array_type(self) -> &'static str {
        match self {
            Kind::Text | Kind::Json => "text[]",
            Kind::Int8 => "int8[]",
            Kind::Int4 => "int4[]",
            Kind::Time => "timestamptz[]",
            Kind::Bool => "bool[]",
            Kind::Bytes => "bytea[]",
        }
    }
}

struct Table {
    name: &'static str,
    /// The SQLite query, its columns in `columns`' order.
    select: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// An identity column whose values are kept (the log's seqs are read
    /// by the audit outbox, the review's cursors, `nudge log --after`); its
    /// sequence continues after them.
    identity: Option<&'static str>,
    /// Rows there may be before the copy (the rule versions a replica
    /// recorded at its start); every other table must be empty.
    may_hold_rows: bool,
}

use Kind::*;

const TABLES: &[Table] = &[
    Table {
        name: "customers",
        select: "SELECT id, context, updated_at FROM customers",
        columns: &[("id", Text), ("context", Json), ("updated_at", Time)],
        identity: None,
        may_hold_rows: false,
    },
    Table {
        name: "instances",
        select: "SELECT id, customer, journey, key, status, mode, category, started_at, ended_at,
                 rule_hash, trigger_event, vars, decision_inputs FROM instances",
        columns: &[
            ("id", Text),
            ("customer", Text),
            ("journey", Text),
            ("key", Text),
            ("status", Text),
            ("mode", Text),
            ("category", Text),
            ("started_at", Time),
            ("ended_at", Time),
            ("rule_hash", Text),
            ("trigger_event", Text),
            ("vars", Json),
            ("decision_inputs", Json),
        ],
        identity: None,
        may_hold_rows: false,
    },
    // In the order they were planned (new ids there), each with its
    // instance's customer, which PostgreSQL keeps on the step.
    Table {
        name: "steps",
        select: "SELECT s.instance_id, i.customer, s.step, s.seq, s.channel, s.template,
                 s.condition, s.planned_at, s.due_at, s.status, s.attempt, s.lease_until,
                 s.sending_at
                 FROM steps AS s LEFT JOIN instances AS i ON i.id = s.instance_id ORDER BY s.rowid",
        columns: &[
            ("instance_id", Text),
            ("customer", Text),
            ("step", Text),
            ("seq", Int4),
            ("channel", Text),
            ("template", Text),
            ("condition", Text),
            ("planned_at", Time),
            ("due_at", Time),
            ("status", Text),
            ("attempt", Int4),
            ("lease_until", Time),
            ("sending_at", Time),
        ],
        identity: None,
        may_hold_rows: false,
    },
    Table {
        name: "dispatch_log",
        select: "SELECT seq, time, customer, journey, instance, step, channel, template, outcome,
                 reason, rule_hash, attempt, latency_ms, event_id, http_status, response_ms
                 FROM dispatch_log ORDER BY seq",
        columns: &[
            ("seq", Int8),
            ("time", Time),
            ("customer", Text),
            ("journey", Text),
            ("instance", Text),
            ("step", Text),
            ("channel", Text),
            ("template", Text),
            ("outcome", Text),
            ("reason", Text),
            ("rule_hash", Text),
            ("attempt", Int4),
            ("latency_ms", Int8),
            ("event_id", Text),
            ("http_status", Int4),
            ("response_ms", Int8),
        ],
        identity: Some("seq"),
        may_hold_rows: false,
    },
    Table {
        name: "processed_events",
        select: "SELECT id, at FROM processed_events",
        columns: &[("id", Text), ("at", Time)],
        identity: None,
        may_hold_rows: false,
    },
    Table {
        name: "kafka_offsets",
        select: "SELECT topic, partition, next_offset FROM kafka_offsets",
        columns: &[("topic", Text), ("partition", Int4), ("next_offset", Int8)],
        identity: None,
        may_hold_rows: false,
    },
    Table {
        name: "dead_letters",
        select: "SELECT id, topic, partition, offset, key, payload, reason, journey, event_id,
                 created_at, published_at, headers, attempts, last_error, retry_at, failed_at
                 FROM dead_letters ORDER BY id",
        columns: &[
            ("id", Int8),
            ("topic", Text),
            ("partition", Int4),
            ("record_offset", Int8),
            ("key", Bytes),
            ("payload", Bytes),
            ("reason", Text),
            ("journey", Text),
            ("event_id", Text),
            ("created_at", Time),
            ("published_at", Time),
            ("headers", Json),
            ("attempts", Int4),
            ("last_error", Text),
            ("retry_at", Time),
            ("failed_at", Time),
        ],
        identity: Some("id"),
        may_hold_rows: false,
    },
    Table {
        name: "rule_versions",
        select: "SELECT version, loaded_at, files FROM rule_versions",
        columns: &[("version", Text), ("loaded_at", Time), ("files", Json)],
        identity: None,
        may_hold_rows: true,
    },
    Table {
        name: "control_overrides",
        select: "SELECT kind, target, settings, updated_at, updated_by FROM control_overrides",
        columns: &[
            ("kind", Text),
            ("target", Text),
            ("settings", Json),
            ("updated_at", Time),
            ("updated_by", Text),
        ],
        identity: None,
        may_hold_rows: false,
    },
    Table {
        name: "control_log",
        select: "SELECT seq, time, who, kind, target, before, after FROM control_log ORDER BY seq",
        columns: &[
            ("seq", Int8),
            ("time", Time),
            ("who", Text),
            ("kind", Text),
            ("target", Text),
            ("before", Json),
            ("after", Json),
        ],
        identity: Some("seq"),
        may_hold_rows: false,
    },
    Table {
        name: "propensity_counts",
        select: "SELECT journey, step, channel, sends, conversions FROM propensity_counts",
        columns: &[
            ("journey", Text),
            ("step", Text),
            ("channel", Text),
            ("sends", Int8),
            ("conversions", Int8),
        ],
        identity: None,
        may_hold_rows: false,
    },
    Table {
        name: "received_events",
        select: "SELECT id, customer, event_id, event_type, event_time, received_at,
                 context_updated, not_started, refused, ended_nothing
                 FROM received_events ORDER BY id",
        columns: &[
            ("id", Int8),
            ("customer", Text),
            ("event_id", Text),
            ("event_type", Text),
            ("event_time", Time),
            ("received_at", Time),
            ("context_updated", Bool),
            ("not_started", Json),
            ("refused", Text),
            ("ended_nothing", Json),
        ],
        identity: Some("id"),
        may_hold_rows: false,
    },
    // Log records the audit stream has yet to publish.
    Table {
        name: "audit_outbox",
        select: "SELECT seq, customer FROM audit_outbox ORDER BY seq",
        columns: &[("seq", Int8), ("customer", Text)],
        identity: None,
        may_hold_rows: false,
    },
];

/// Rows per statement: one array per column, as the store's own batch writes.
const BATCH: usize = 5_000;

/// Copies the SQLite store at `source` into the PostgreSQL store at
/// `options` (migrated first; `target` names it in messages and in the mark
/// left on the file). The target must hold none of nudge's data. A file
/// already moved elsewhere is refused unless `force` (its mark then names
/// the new store); one already moved into this store is left as it is.
pub fn from_sqlite(
    source: &Path,
    options: &PgOptions,
    target: &str,
    force: bool,
) -> Result<Moved, MoveError> {
    let name = source.display().to_string();
    if !source.is_file() {
        return Err(MoveError::NoSource(name));
    }
    // Looked at before it is opened as a store, which would create the
    // schema in a blank file given by mistake.
    let schema =
        rusqlite::Connection::open_with_flags(source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.pragma_query_value(None, "user_version", |r| r.get::<_, u32>(0)));
    match schema {
        Ok(0) => return Err(MoveError::NotAStore(name)),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::NotADatabase =>
        {
            return Err(MoveError::NotAStore(name))
        }
        other => other.map_err(StoreError::from)?,
    };
    let (sqlite, released) = match SqliteStore::open_owned(source, crate::config::DEFAULT_CACHE_MB)
    {
        Err(StoreError::Locked { path, holder }) => {
            return Err(MoveError::Running { path, holder })
        }
        other => other?,
    };
    let moved_before = sqlite.moved_to()?;
    if let Some((to, at)) = &moved_before {
        if to != target && !force {
            return Err(MoveError::AlreadyMoved {
                path: name,
                to: to.clone(),
                at: *at,
            });
        }
    }
    // Rule versions alone are what a daemon leaves that never read an event.
    let any_rows: Vec<String> = TABLES
        .iter()
        .filter(|t| !t.may_hold_rows)
        .map(|t| format!("EXISTS (SELECT 1 FROM {})", t.name))
        .collect();
    let holds_data: bool = sqlite
        .writer()
        .query_row(&format!("SELECT {}", any_rows.join(" OR ")), [], |r| {
            r.get(0)
        })
        .map_err(StoreError::from)?;
    if !holds_data {
        return Err(MoveError::NothingToMove(name));
    }
    let store = PostgresStore::open(options)?;
    let version = super::schema::VERSION;
    let mut conn = store.conn()?;
    let mut tx = conn.client.transaction().map_err(StoreError::from)?;
    let held: Vec<&str> = TABLES
        .iter()
        .filter(|t| !t.may_hold_rows)
        .map(|t| -> Result<Option<&str>, StoreError> {
            let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", t.name);
            let any: bool = tx.query_one(&sql, &[])?.get(0);
            Ok(any.then_some(t.name))
        })
        .filter_map(Result::transpose)
        .collect::<Result<_, _>>()?;
    match &moved_before {
        // Run again after it succeeded (an init step retried, say).
        Some((to, at)) if to == target && !held.is_empty() => {
            return Ok(Moved {
                already: Some(*at),
                rows: Vec::new(),
                released,
                version,
            })
        }
        _ => {}
    }
    if !held.is_empty() {
        return Err(MoveError::NotEmpty {
            target: target.to_owned(),
            tables: held.join(", "),
        });
    }
    let src = sqlite.writer();
    let (orphans, example): (i64, Option<String>) = src
        .query_row(
            "SELECT count(*), min(s.instance_id) FROM steps AS s
             WHERE NOT EXISTS (SELECT 1 FROM instances AS i WHERE i.id = s.instance_id)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(StoreError::from)?;
    if orphans > 0 {
        return Err(MoveError::OrphanSteps {
            source_name: source.display().to_string(),
            count: orphans,
            example: example.unwrap_or_default(),
        });
    }
    // The log copied here must not be queued for the audit stream again:
    // what the node had not yet published comes across with its outbox.
    let audit_enabled: bool = tx
        .query_one("SELECT enabled FROM audit_stream WHERE id = 1", &[])
        .map_err(StoreError::from)?
        .get(0);
    tx.execute("UPDATE audit_stream SET enabled = false WHERE id = 1", &[])
        .map_err(StoreError::from)?;
    let mut rows = Vec::new();
    for table in TABLES {
        let read = copy_table(&src, &mut tx, table).map_err(|source| MoveError::Table {
            table: table.name,
            source,
        })?;
        let arrived: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {}", table.name), &[])
            .map_err(StoreError::from)?
            .get(0);
        let lost = match table.may_hold_rows {
            true => arrived < read as i64,
            false => arrived != read as i64,
        };
        if lost {
            return Err(MoveError::Lost {
                table: table.name,
                read,
                arrived,
            });
        }
        rows.push((table.name, read));
    }
    tx.execute(
        "UPDATE audit_stream SET enabled = $1 WHERE id = 1",
        &[&audit_enabled],
    )
    .map_err(StoreError::from)?;
    // The funnel's counts, from the deltas the copy's inserts left.
    tx.execute("SELECT review_fold()", &[])
        .map_err(StoreError::from)?;
    drop(src);
    // Marked before the copy commits: a crash in between leaves the file
    // refused with nothing copied (run the copy again), never a file a
    // daemon would send from beside a store that holds its journeys.
    sqlite.set_moved(Some(target), Utc::now())?;
    if let Err(e) = tx.commit() {
        // As it was: unmarked, or (a forced move) marked with where it went before.
        match &moved_before {
            Some((to, at)) => sqlite.set_moved(Some(to), *at)?,
            None => sqlite.set_moved(None, Utc::now())?,
        }
        return Err(StoreError::from(e).into());
    }
    // Statistics for the planner now, not when autovacuum gets to them;
    // the move has committed, so a failure here is autovacuum's to mend.
    let names: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
    let _ = conn
        .client
        .batch_execute(&format!("ANALYZE {}", names.join(", ")));
    Ok(Moved {
        already: None,
        rows,
        released,
        version,
    })
}

/// One column's values for one statement.
enum Values {
    Text(Vec<Option<String>>),
    Int8(Vec<Option<i64>>),
    Int4(Vec<Option<i32>>),
    Time(Vec<Option<DateTime<Utc>>>),
    Bool(Vec<Option<bool>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Values {
    fn new(kind: Kind) -> Self {
        match kind {
            Text | Json => Values::Text(Vec::new()),
            Int8 => Values::Int8(Vec::new()),
            Int4 => Values::Int4(Vec::new()),
            Time => Values::Time(Vec::new()),
            Bool => Values::Bool(Vec::new()),
            Bytes => Values::Bytes(Vec::new()),
        }
    }

    fn push(&mut self, row: &rusqlite::Row, i: usize) -> Result<(), StoreError> {
        match self {
            Values::Text(v) => v.push(row.get(i)?),
            Values::Int8(v) => v.push(row.get(i)?),
            Values::Int4(v) => {
                let wide: Option<i64> = row.get(i)?;
                let narrow = wide
                    .map(|w| {
                        i32::try_from(w).map_err(|_| {
                            StoreError::Corrupt(format!("{w} does not fit a 4-byte integer"))
                        })
                    })
                    .transpose()?;
                v.push(narrow)
            }
            Values::Time(v) => {
                let ms: Option<i64> = row.get(i)?;
                v.push(ms.map(|ms| Utc.timestamp_millis_opt(ms).single().unwrap_or_default()))
            }
            Values::Bool(v) => v.push(row.get::<_, Option<i64>>(i)?.map(|b| b != 0)),
            Values::Bytes(v) => v.push(row.get(i)?),
        }
        Ok(())
    }

    fn clear(&mut self) {
        match self {
            Values::Text(v) => v.clear(),
            Values::Int8(v) => v.clear(),
            Values::Int4(v) => v.clear(),
            Values::Time(v) => v.clear(),
            Values::Bool(v) => v.clear(),
            Values::Bytes(v) => v.clear(),
        }
    }

    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Values::Text(v) => v,
            Values::Int8(v) => v,
            Values::Int4(v) => v,
            Values::Time(v) => v,
            Values::Bool(v) => v,
            Values::Bytes(v) => v,
        }
    }
}

/// `INSERT … SELECT … FROM UNNEST($1::type[], …)` for `table`.
fn insert_sql(table: &Table) -> String {
    let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let arrays: Vec<String> = table
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| format!("${}::{}", i + 1, kind.array_type()))
        .collect();
    let aliases: Vec<String> = (1..=names.len()).map(|i| format!("c{i}")).collect();
    let values: Vec<String> = table
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| match kind {
            Json => format!("c{}::jsonb", i + 1),
            _ => format!("c{}", i + 1),
        })
        .collect();
    format!(
        "INSERT INTO {} ({}) {}SELECT {} FROM UNNEST({}) AS u ({}){}",
        table.name,
        names.join(", "),
        if table.identity.is_some() {
            "OVERRIDING SYSTEM VALUE "
        } else {
            ""
        },
        values.join(", "),
        arrays.join(", "),
        aliases.join(", "),
        if table.may_hold_rows {
            " ON CONFLICT DO NOTHING"
        } else {
            ""
        },
    )
}

/// Copies one table in batches; returns the rows read.
fn copy_table(
    src: &rusqlite::Connection,
    tx: &mut Transaction<'_>,
    table: &Table,
) -> Result<u64, StoreError> {
    let insert = tx.prepare(&insert_sql(table))?;
    let mut columns: Vec<Values> = table.columns.iter().map(|(_, k)| Values::new(*k)).collect();
    let mut query = src.prepare(table.select)?;
    let mut rows = query.query([])?;
    let (mut read, mut pending) = (0u64, 0usize);
    let flush = |columns: &mut Vec<Values>, tx: &mut Transaction<'_>| {
        let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(Values::param).collect();
        tx.execute(&insert, &params)?;
        columns.iter_mut().for_each(Values::clear);
        Ok::<_, StoreError>(())
    };
    while let Some(row) = rows.next()? {
        for (i, column) in columns.iter_mut().enumerate() {
            column.push(row, i)?;
        }
        read += 1;
        pending += 1;
        if pending == BATCH {
            flush(&mut columns, tx)?;
            pending = 0;
        }
    }
    if pending > 0 {
        flush(&mut columns, tx)?;
    }
    if let Some(column) = table.identity {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{0}', '{column}'), max({column}))
                 FROM {0} HAVING max({column}) IS NOT NULL",
                table.name
            ),
            &[],
        )?;
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fresh_schema, TestStore};
    use super::*;
    use crate::model::ChannelKind;
    use crate::store::conformance as scenario;
    use crate::store::review::{LogFilter, ReviewRead};
    use crate::store::Store;

    /// What the engine, the review and the CLI read back from a store, as
    /// text: the same on both sides when nothing was lost or changed.
    /// Step row ids are left out (PostgreSQL numbers the steps anew).
    fn reads<S: Store + ReviewRead>(
        store: &S,
        customers: &[String],
        instances: &[String],
        topics: &[String],
        events: &[String],
    ) -> Vec<String> {
        let far = Utc.with_ymd_and_hms(2100, 1, 1, 0, 0, 0).unwrap();
        let past = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
        let due = |steps: Vec<crate::model::DueStep>| {
            let mut text: Vec<String> = steps
                .into_iter()
                .map(|s| {
                    // JSON as parsed: jsonb spaces its text its own way.
                    let vars = s.vars.to_map();
                    let blank = crate::model::Variables::from_json("{}".into()).unwrap();
                    let step = crate::model::DueStep {
                        row: 0,
                        vars: blank,
                        ..s
                    };
                    format!("{step:?} {vars:?}")
                })
                .collect();
            text.sort();
            text
        };
        let mut counts = store.step_counts().unwrap();
        counts.sort();
        let mut out = vec![
            format!("{:?}", store.log_after(0, 1_000_000).unwrap()),
            format!("{counts:?}"),
            format!(
                "{:?}",
                store.customers(customers, Some(past), true).unwrap()
            ),
            format!("{:?}", store.histories(instances).unwrap()),
            format!("{:?}", due(store.upcoming_steps(customers, far).unwrap())),
            format!("{:?}", store.next_due(None).unwrap()),
            format!("{:?}", store.unpublished_dead_letters(1_000).unwrap()),
            format!("{:?}", store.dead_letter_backlog().unwrap()),
            format!("{:?}", store.control_overrides().unwrap()),
            format!("{:?}", store.control_log(None, None, 1_000).unwrap()),
            format!("{:?}", Store::propensity_counts(store, None).unwrap()),
            format!("{:?}", store.audit_backlog().unwrap()),
            format!("{:?}", store.outcome_counts(None).unwrap()),
            format!("{:?}", store.arms(None, true).unwrap()),
            format!(
                "{:?}",
                store.log_page(&LogFilter::default(), None, 1_000).unwrap()
            ),
        ];
        let mut tx = store.begin().unwrap();
        for id in events.iter().map(String::as_str).chain(["never-seen"]) {
            out.push(format!("{id} {}", tx.already_processed(id).unwrap()));
        }
        drop(tx);
        for topic in topics {
            out.push(format!("{topic} {:?}", store.offsets(topic).unwrap()));
        }
        for c in customers {
            out.push(format!("{c} {:?}", store.received_events(c).unwrap()));
            out.push(format!("{c} {:?}", store.customer_instances(c).unwrap()));
        }
        // Last, as it claims: the same steps fall due on both sides.
        for channel in [ChannelKind::Push, ChannelKind::Email, ChannelKind::CallTask] {
            out.push(format!(
                "{:?}",
                due(store.claim_due(channel, far, 1_000, far).unwrap())
            ));
        }
        out
    }

    /// Event ids remembered as processed, committed with an offset.
    fn processed_and_not(store: &dyn Store) {
        let mut tx = store.begin().unwrap();
        for id in ["e1", "e2"] {
            tx.mark_processed(id, scenario::t0()).unwrap();
        }
        tx.set_offset("events", 0, 0, 2).unwrap();
        tx.commit().unwrap();
    }

    fn ids(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    /// Each scenario of the conformance suite leaves a SQLite store with
    /// something in it (steps in every state, sends begun, withdrawals,
    /// dead letters, control changes, propensity counts, decision
    /// records, offsets, the audit outbox); moved into PostgreSQL, every
    /// read gives what it gave on SQLite.
    #[test]
    fn every_read_answers_the_same_after_the_move() {
        type Scenario = fn(&dyn Store);
        let scenarios: &[(&str, Scenario)] = &[
            (
                "finish_steps",
                scenario::finish_steps_writes_a_batch_in_order,
            ),
            (
                "retry",
                scenario::retry_reschedules_and_customer_round_trips,
            ),
            ("sends_begun", scenario::sends_begun_count_until_settled),
            (
                "withdrawals",
                scenario::exits_plan_withdrawals_of_delivered_steps,
            ),
            (
                "late_withdrawal",
                scenario::a_delivery_landing_after_its_exit_is_withdrawn,
            ),
            (
                "dead_letters",
                scenario::failed_dead_letters_back_off_and_are_given_up_but_kept,
            ),
            (
                "headers",
                scenario::dead_letters_keep_their_headers_and_claims_cut_payloads,
            ),
            ("control", scenario::control_overrides_and_log_round_trip),
            (
                "propensity",
                scenario::propensity_counts_sends_and_conversions_within_the_window,
            ),
            (
                "received",
                scenario::received_events_and_attempt_answers_round_trip,
            ),
            (
                "audit",
                scenario::audit_outbox_follows_the_log_in_its_transaction,
            ),
            (
                "offsets",
                scenario::offsets_are_per_partition_and_move_from_the_one_expected,
            ),
            ("dedup", processed_and_not),
            ("rules", scenario::log_pages_in_order_and_rules_record_once),
            (
                "upcoming",
                scenario::upcoming_steps_are_the_customers_pending_steps_due_soon,
            ),
            ("claimed", scenario::claims_are_exclusive_and_leases_expire),
            (
                "converted",
                scenario::exit_after_last_step_converts_within_window,
            ),
        ];
        for (name, run) in scenarios {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("nudge.db");
            run(&SqliteStore::open(&path).unwrap());
            let (schema, options) = fresh_schema();
            let _drop = TestStore::adopt(schema);
            let moved = from_sqlite(&path, &options, "postgres://test", false)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(moved.rows.iter().any(|(_, n)| *n > 0), "{name}: {moved:?}");
            let sqlite = SqliteStore::open(&path).unwrap();
            let (customers, instances, topics, events) = {
                let conn = sqlite.writer();
                (
                    ids(
                        &conn,
                        "SELECT id FROM customers UNION SELECT customer FROM instances
                         UNION SELECT customer FROM received_events ORDER BY 1",
                    ),
                    ids(&conn, "SELECT id FROM instances ORDER BY id"),
                    ids(&conn, "SELECT DISTINCT topic FROM kafka_offsets ORDER BY 1"),
                    ids(&conn, "SELECT id FROM processed_events ORDER BY 1"),
                )
            };
            let postgres = PostgresStore::open(&options).unwrap();
            let before = reads(&sqlite, &customers, &instances, &topics, &events);
            let after = reads(&postgres, &customers, &instances, &topics, &events);
            for (b, a) in before.iter().zip(&after) {
                assert_eq!(b, a, "{name}");
            }
        }
    }

    /// Every table and column of the SQLite schema is copied, or is named
    /// here as rebuilt or not carried: a column added by a later migration
    /// and left out of [`TABLES`] fails this, not a bank's move.
    #[test]
    fn the_move_covers_every_column_of_the_sqlite_schema() {
        // Kept by PostgreSQL's own triggers and `review_fold()` from the
        // rows copied, or state of the node itself.
        let not_carried = [
            "review_outcome_counts",
            "review_arm_counts",
            "review_rule_arm_counts",
            "review_arm_customers",
            "review_rule_arm_customers",
            "review_outcome_folded",
            "audit_stream",
            "store_moved",
            "sqlite_sequence",
        ];
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("nudge.db")).unwrap();
        let conn = store.writer();
        let tables = ids(
            &conn,
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
        );
        for table in tables.iter().filter(|t| !not_carried.contains(&t.as_str())) {
            let spec = TABLES
                .iter()
                .find(|t| t.name == table)
                .unwrap_or_else(|| panic!("table {table} is not moved"));
            let words: Vec<&str> = spec
                .select
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .collect();
            for column in ids(
                &conn,
                &format!("SELECT name FROM pragma_table_info('{table}')"),
            ) {
                assert!(
                    words.contains(&column.as_str()),
                    "{table}.{column} is not moved"
                );
            }
        }
    }

    /// The file is refused to a daemon once moved. Moving it again into
    /// the same store does nothing; elsewhere it is refused unless forced,
    /// and never into a store holding data. A running node's file, a blank
    /// file and a store with nothing in it are refused too.
    #[test]
    fn a_moved_file_is_refused_to_the_daemon_and_moved_again_only_when_forced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nudge.db");
        scenario::finish_steps_writes_a_batch_in_order(&SqliteStore::open(&path).unwrap());
        let (schema, options) = fresh_schema();
        let _drop = TestStore::adopt(schema);
        let first = from_sqlite(&path, &options, "postgres://db/nudge", false).unwrap();
        assert!(first.already.is_none());

        let refused = SqliteStore::open_exclusive(&path, 2).err().expect("moved");
        let text = refused.to_string();
        assert!(
            matches!(refused, StoreError::Moved { .. })
                && text.contains("was moved to postgres://db/nudge")
                && text.contains("store.url"),
            "{text}"
        );
        let again = from_sqlite(&path, &options, "postgres://db/nudge", false).unwrap();
        assert!(
            again.already.is_some() && again.rows.is_empty(),
            "{again:?}"
        );
        let (other, other_options) = fresh_schema();
        let _drop_other = TestStore::adopt(other);
        let elsewhere = from_sqlite(&path, &other_options, "postgres://db/other", false);
        assert!(
            matches!(&elsewhere, Err(MoveError::AlreadyMoved { to, .. }) if to == "postgres://db/nudge"),
            "{elsewhere:?}"
        );
        let full = from_sqlite(&path, &options, "postgres://db/renamed", true).unwrap_err();
        assert!(
            matches!(&full, MoveError::NotEmpty { tables, .. } if tables.contains("instances")),
            "{full}"
        );
        from_sqlite(&path, &other_options, "postgres://db/other", true).unwrap();
        let refused = SqliteStore::open_exclusive(&path, 2).err().unwrap();
        assert!(
            refused.to_string().contains("postgres://db/other"),
            "{refused}"
        );

        let (third, options) = fresh_schema();
        let _drop_third = TestStore::adopt(third);
        let (owner, _) = SqliteStore::open_owned(&path, 2).unwrap();
        let busy = from_sqlite(&path, &options, "x", true).unwrap_err();
        assert!(
            matches!(busy, MoveError::Running { .. }) && busy.to_string().contains("SIGTERM"),
            "{busy}"
        );
        drop(owner);
        let missing = dir.path().join("none.db");
        let err = from_sqlite(&missing, &options, "x", false).unwrap_err();
        assert!(matches!(err, MoveError::NoSource(_)), "{err}");
        assert!(!missing.exists());
        let blank = dir.path().join("blank.db");
        std::fs::write(&blank, b"").unwrap();
        let err = from_sqlite(&blank, &options, "x", false).unwrap_err();
        assert!(matches!(err, MoveError::NotAStore(_)), "{err}");
        assert_eq!(
            std::fs::metadata(&blank).unwrap().len(),
            0,
            "left as it was"
        );
        std::fs::write(&blank, b"hello\n").unwrap();
        let err = from_sqlite(&blank, &options, "x", false).unwrap_err();
        assert!(matches!(err, MoveError::NotAStore(_)), "{err}");
        let unused = dir.path().join("unused.db");
        drop(SqliteStore::open(&unused).unwrap());
        let err = from_sqlite(&unused, &options, "x", false).unwrap_err();
        assert!(matches!(err, MoveError::NothingToMove(_)), "{err}");
    }
}
