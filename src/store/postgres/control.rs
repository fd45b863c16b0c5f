//! Runtime control on PostgreSQL (`store::control`). Replicas each apply
//! changes: one at a time, under a transaction-scoped advisory lock, so an
//! edit sees the settings its write replaces (a row lock cannot hold a
//! row that does not exist yet).

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::PostgresStore;
use crate::store::control::{settings_of, ControlChange, ControlEntry, ControlRow};
use crate::store::StoreError;

impl PostgresStore {
    pub(super) fn read_control_overrides(&self) -> Result<Vec<ControlRow>, StoreError> {
        self.conn()?
            .query(
                "SELECT kind, target, settings::text, updated_at, updated_by
                 FROM control_overrides ORDER BY kind, target",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(ControlRow {
                    kind: r.try_get(0)?,
                    target: r.try_get(1)?,
                    settings: settings_of(r.try_get(2)?)?,
                    updated_at: r.try_get(3)?,
                    updated_by: r.try_get(4)?,
                })
            })
            .collect()
    }

    pub(super) fn write_control_change(
        &self,
        change: &ControlChange<'_>,
    ) -> Result<ControlEntry, StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.custom_plans()?.transaction()?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('nudge-control:' || current_schema()))",
            &[],
        )?;
        let current = match tx.query_opt(
            "SELECT settings::text FROM control_overrides WHERE kind = $1 AND target = $2",
            &[&change.kind, &change.target],
        )? {
            Some(row) => settings_of(row.try_get(0)?)?,
            None => Default::default(),
        };
        let edit = (change.edit)(&current);
        if edit.settings.is_empty() {
            tx.execute(
                "DELETE FROM control_overrides WHERE kind = $1 AND target = $2",
                &[&change.kind, &change.target],
            )?;
        } else {
            tx.execute(
                "INSERT INTO control_overrides (kind, target, settings, updated_at, updated_by)
                 VALUES ($1, $2, $3::text::jsonb, $4, $5)
                 ON CONFLICT (kind, target) DO UPDATE SET settings = excluded.settings,
                     updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                &[
                    &change.kind,
                    &change.target,
                    &Value::Object(edit.settings.clone()).to_string(),
                    &change.at,
                    &change.who,
                ],
            )?;
        }
        let row = tx.query_one(
            "INSERT INTO control_log (time, who, kind, target, before, after)
             VALUES ($1, $2, $3, $4, $5::text::jsonb, $6::text::jsonb) RETURNING seq",
            &[
                &change.at,
                &change.who,
                &change.kind,
                &change.target,
                &edit.before.to_string(),
                &edit.after.to_string(),
            ],
        )?;
        let seq: i64 = row.try_get(0)?;
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

    pub(super) fn read_control_log(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<ControlEntry>, StoreError> {
        let rows = self.conn()?.query(
            "SELECT seq, time, who, kind, target, before::text, after::text FROM control_log
             WHERE ($1::timestamptz IS NULL OR time >= $1) AND ($2::timestamptz IS NULL OR time < $2)
             ORDER BY seq DESC LIMIT $3",
            &[&since, &until, &(limit.min(i64::MAX as usize) as i64)],
        )?;
        let json = |text: &str| -> Result<Value, StoreError> {
            serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("control log: {e}")))
        };
        let mut entries = rows
            .iter()
            .map(|r| {
                Ok(ControlEntry {
                    seq: r.try_get(0)?,
                    time: r.try_get(1)?,
                    who: r.try_get(2)?,
                    kind: r.try_get(3)?,
                    target: r.try_get(4)?,
                    before: json(r.try_get(5)?)?,
                    after: json(r.try_get(6)?)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        entries.reverse();
        Ok(entries)
    }
}
