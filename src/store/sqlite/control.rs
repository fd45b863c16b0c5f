//! Runtime control on SQLite (`store::control`).

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{from_ms, ms};
use crate::store::control::{settings_of, ControlChange, ControlEntry, ControlRow};
use crate::store::StoreError;

pub(super) fn overrides(conn: &Connection) -> Result<Vec<ControlRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, target, settings, updated_at, updated_by FROM control_overrides ORDER BY kind, target",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(kind, target, settings, at, by)| {
            Ok(ControlRow {
                kind,
                target,
                settings: settings_of(&settings)?,
                updated_at: from_ms(at),
                updated_by: by,
            })
        })
        .collect()
}

/// In an immediate transaction: the write lock is taken before the read,
/// so the edit sees the settings its write replaces.
pub(super) fn change(
    conn: &mut Connection,
    change: &ControlChange<'_>,
) -> Result<ControlEntry, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: Option<String> = tx
        .query_row(
            "SELECT settings FROM control_overrides WHERE kind = ?1 AND target = ?2",
            params![change.kind, change.target],
            |r| r.get(0),
        )
        .optional()?;
    let current = match current {
        Some(text) => settings_of(&text)?,
        None => Default::default(),
    };
    let edit = (change.edit)(&current);
    if edit.settings.is_empty() {
        tx.execute(
            "DELETE FROM control_overrides WHERE kind = ?1 AND target = ?2",
            params![change.kind, change.target],
        )?;
    } else {
        tx.execute(
            "INSERT INTO control_overrides (kind, target, settings, updated_at, updated_by)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (kind, target) DO UPDATE SET settings = excluded.settings,
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by",
            params![
                change.kind,
                change.target,
                serde_json::Value::Object(edit.settings.clone()).to_string(),
                ms(change.at),
                change.who
            ],
        )?;
    }
    tx.execute(
        "INSERT INTO control_log (time, who, kind, target, before, after) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            ms(change.at),
            change.who,
            change.kind,
            change.target,
            edit.before.to_string(),
            edit.after.to_string()
        ],
    )?;
    let seq = tx.last_insert_rowid();
    tx.commit()?;
    Ok(ControlEntry {
        seq,
        time: change.at,
        who: change.who.to_string(),
        kind: change.kind.to_string(),
        target: change.target.to_string(),
        before: edit.before,
        after: edit.after,
    })
}

pub(super) fn log(
    conn: &Connection,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    limit: usize,
) -> Result<Vec<ControlEntry>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, time, who, kind, target, before, after FROM control_log
         WHERE time >= ?1 AND time < ?2 ORDER BY seq DESC LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(
            params![
                since.map_or(i64::MIN, ms),
                until.map_or(i64::MAX, ms),
                limit.min(i64::MAX as usize) as i64
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                ))
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let json = |text: &str| {
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("control log: {e}")))
    };
    let mut entries = rows
        .into_iter()
        .map(|(seq, time, who, kind, target, before, after)| {
            Ok(ControlEntry {
                seq,
                time: from_ms(time),
                who,
                kind,
                target,
                before: json(&before)?,
                after: json(&after)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    entries.reverse();
    Ok(entries)
}
