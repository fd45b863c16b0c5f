//! [`ReviewRead`] on PostgreSQL. A store opened by
//! [`PostgresStore::open_reader`] never migrates: it reads a schema the
//! daemon made. Its one write: before reading the funnel's counts it folds
//! the count deltas the writers appended into them (`review_fold()`,
//! schema v11), so its role needs write access to the `review_*` tables.

use chrono::{DateTime, Utc};
use postgres::types::ToSql;

use super::read::log_record;
use super::{conn::Pool, holder_name, schema, PgOptions, PostgresStore};
use crate::context::CustomerContext;
use crate::model::LogRecord;
use crate::store::review::{
    arm_counts_sql, log_page_sql, outcome_count_rows_sql, planned_steps_sql, ArmCount,
    InstanceRecord, LogCursor, LogFilter, OutcomeCount, Param, PlannedStep, ReviewRead,
    LOG_COLUMNS,
};
use crate::store::StoreError;

impl PostgresStore {
    /// Opens a pool on an existing schema to read it: no migration, and the
    /// schema must be this binary's version.
    pub fn open_reader(options: &PgOptions) -> Result<Self, StoreError> {
        let pool = Pool::open(options)?;
        let found = schema::version(&mut pool.get()?.client)?;
        if found > schema::VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: schema::VERSION,
            });
        }
        if found < schema::VERSION {
            return Err(StoreError::Config(format!(
                "the store's schema is version {found}, this binary's {}: run `nudge migrate` (or the daemon of this version) first",
                schema::VERSION
            )));
        }
        Ok(Self {
            pool,
            holder: holder_name(),
            requeued: Default::default(),
            alive: Default::default(),
        })
    }
}

/// Folds the count deltas the writers appended into the counts (schema v11).
#[cfg(test)]
pub(super) const FOLD: &str = "SELECT review_fold()";

/// Runs `review_fold()` with a `statement_timeout` of its own: its work grows with
/// the deltas written since the last fold, so under a DBA's short timeout a
/// fold that once fails would fail for good as they pile up, and the funnel
/// with it. Ten minutes still bounds it. (`SET LOCAL` holds for the one
/// implicit transaction of this query string, which a failure rolls back.)
pub(super) fn fold(client: &mut postgres::Client) -> Result<(), StoreError> {
    client.batch_execute("SET LOCAL statement_timeout = '10min'; SELECT review_fold()")?;
    Ok(())
}

fn placeholder(n: usize) -> String {
    format!("${n}")
}

fn param(p: &Param) -> &(dyn ToSql + Sync) {
    match p {
        Param::Text(s) => s,
        Param::Time(t) => t,
        Param::Int(i) => i,
    }
}

fn count(r: &postgres::Row, i: usize) -> Result<u64, StoreError> {
    Ok(r.try_get::<_, i64>(i)? as u64)
}

impl ReviewRead for PostgresStore {
    fn log_page(
        &self,
        filter: &LogFilter,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let (sql, params) = log_page_sql(filter, after, limit, LOG_COLUMNS, placeholder);
        let bound: Vec<&(dyn ToSql + Sync)> = params.iter().map(param).collect();
        self.conn()?
            .custom_plans()?
            .query(&sql, &bound)?
            .iter()
            .map(log_record)
            .collect()
    }

    fn outcome_counts(&self, journey: Option<&str>) -> Result<Vec<OutcomeCount>, StoreError> {
        let sql = outcome_count_rows_sql(journey.is_some(), "$1");
        let mut c = self.conn()?;
        // The deltas written since the last fold first (schema v11).
        fold(&mut c.client)?;
        let rows = match journey {
            Some(j) => c.custom_plans()?.query(&sql, &[&j])?,
            None => c.custom_plans()?.query(&sql, &[])?,
        };
        rows.iter()
            .map(|r| {
                Ok(OutcomeCount {
                    journey: r.try_get(0)?,
                    step: r.try_get(1)?,
                    outcome: r
                        .try_get::<_, &str>(2)?
                        .parse()
                        .map_err(StoreError::Corrupt)?,
                    reason: r.try_get(3)?,
                    count: count(r, 4)?,
                })
            })
            .collect()
    }

    fn arms(&self, journey: Option<&str>, by_rule: bool) -> Result<Vec<ArmCount>, StoreError> {
        // NULL::text: the per-version column is typed even when not grouped by.
        let sql =
            arm_counts_sql(journey.is_some(), by_rule, "$1").replace(", NULL,", ", NULL::text,");
        let mut c = self.conn()?;
        fold(&mut c.client)?;
        let rows = match journey {
            Some(j) => c.custom_plans()?.query(&sql, &[&j])?,
            None => c.custom_plans()?.query(&sql, &[])?,
        };
        rows.iter()
            .map(|r| {
                Ok(ArmCount {
                    journey: r.try_get(0)?,
                    rule_hash: r.try_get(1)?,
                    mode: r
                        .try_get::<_, &str>(2)?
                        .parse()
                        .map_err(StoreError::Corrupt)?,
                    instances: count(r, 3)?,
                    converted_instances: count(r, 4)?,
                    customers: count(r, 5)?,
                    converted_customers: count(r, 6)?,
                    first_started: r.try_get(7)?,
                    last_started: r.try_get(8)?,
                })
            })
            .collect()
    }

    fn planned_steps(&self, journey: &str) -> Result<Vec<PlannedStep>, StoreError> {
        let rows = self
            .conn()?
            .custom_plans()?
            .query(&planned_steps_sql("$1"), &[&journey])?;
        rows.iter()
            .map(|r| {
                Ok(PlannedStep {
                    step: r.try_get(0)?,
                    seq: r.try_get::<_, i32>(1)? as u32,
                    channel: r.try_get(2)?,
                })
            })
            .collect()
    }

    fn customer_instances(&self, customer: &str) -> Result<Vec<InstanceRecord>, StoreError> {
        let rows = self.conn()?.query(
            "SELECT id, journey, key, status, mode, category, started_at, ended_at, rule_hash, trigger_event,
                    vars::text, decision_inputs::text
             FROM instances WHERE customer = $1 ORDER BY started_at, id",
            &[&customer],
        )?;
        let json = |r: &postgres::Row, i: usize| -> Result<serde_json::Value, StoreError> {
            serde_json::from_str(r.try_get::<_, &str>(i)?)
                .map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))
        };
        let parse = |r: &postgres::Row, i: usize| -> Result<String, StoreError> {
            Ok(r.try_get::<_, String>(i)?)
        };
        rows.iter()
            .map(|r| {
                Ok(InstanceRecord {
                    id: r.try_get(0)?,
                    journey: r.try_get(1)?,
                    key: r.try_get(2)?,
                    status: parse(r, 3)?.parse().map_err(StoreError::Corrupt)?,
                    mode: parse(r, 4)?.parse().map_err(StoreError::Corrupt)?,
                    category: parse(r, 5)?.parse().map_err(StoreError::Corrupt)?,
                    started_at: r.try_get(6)?,
                    ended_at: r.try_get(7)?,
                    rule_hash: r.try_get(8)?,
                    trigger_event: r.try_get(9)?,
                    vars: json(r, 10)?,
                    decision_inputs: json(r, 11)?,
                })
            })
            .collect()
    }

    fn customer_context(&self, customer: &str) -> Result<Option<CustomerContext>, StoreError> {
        let row = self.conn()?.query_opt(
            "SELECT context::text FROM customers WHERE id = $1",
            &[&customer],
        )?;
        row.map(|r| {
            let mut c: CustomerContext = serde_json::from_str(r.try_get::<_, &str>(0)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            c.id = customer.to_string();
            Ok(c)
        })
        .transpose()
    }

    fn log_reach(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self
            .conn()?
            .query_one("SELECT min(time) FROM dispatch_log", &[])?
            .try_get(0)?)
    }

    fn control_changes(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<crate::store::control::ControlEntry>, StoreError> {
        self.read_control_log(since, until, limit)
    }

    fn propensity_stats(
        &self,
        journey: Option<&str>,
    ) -> Result<Vec<crate::propensity::PropensityCount>, StoreError> {
        super::propensity::counts(&mut *self.conn()?, journey)
    }

    fn customer_events(
        &self,
        customer: &str,
    ) -> Result<Vec<crate::store::received::ReceivedEvent>, StoreError> {
        super::received::of_customer(&mut *self.conn()?, customer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Outcome;
    use crate::store::postgres::testing::temp_store;

    #[test]
    fn a_reader_reads_a_migrated_schema_and_refuses_a_bare_one() {
        let store = temp_store();
        let (bare, options) = crate::store::postgres::testing::fresh_schema();
        let err = PostgresStore::open_reader(&options)
            .err()
            .expect("no schema");
        assert!(err.to_string().contains("nudge migrate"), "{err}");
        // The bare schema was left as it was: nothing migrated it.
        let mut c = store.conn().unwrap();
        let tables: i64 = c
            .client
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
                &[&bare],
            )
            .unwrap()
            .get(0);
        assert_eq!(tables, 0);
        drop(c);
        let current: String = store
            .conn()
            .unwrap()
            .client
            .query_one("SELECT current_schema()", &[])
            .unwrap()
            .get(0);
        let base = crate::store::postgres::testing::base_url();
        let reader = PostgresStore::open_reader(&PgOptions {
            url: format!("{base}?options=-csearch_path%3D{current}"),
            password: None,
            pool_size: 1,
            ca_file: None,
        })
        .unwrap();
        assert_eq!(reader.log_reach().unwrap(), None);
        assert!(reader.customer_instances("c1").unwrap().is_empty());
        let _ = store
            .conn()
            .unwrap()
            .client
            .batch_execute(&format!("DROP SCHEMA {bare} CASCADE"));
    }

    /// On a log of 60,000 records (analyzed), every page with any one filter
    /// and at any depth is an index scan in the page's order: no sequential
    /// scan of the log, and no sort but of a customer's dozen records.
    #[test]
    fn every_log_page_walks_an_index_in_page_order() {
        let store = temp_store();
        let mut c = store.conn().unwrap();
        c.client
            .batch_execute(
                "INSERT INTO dispatch_log (time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt)
                 SELECT timestamptz '2026-03-02 00:00:00+00' + (g / 3) * interval '1 second',
                        'c' || (g % 5000), CASE WHEN g % 4 = 0 THEN 'fee' ELSE 'loan' END, 'i' || g,
                        (ARRAY['push', 'email', 'call'])[g % 3 + 1],
                        (ARRAY['push', 'email', 'call_task'])[g % 3 + 1], 't',
                        CASE WHEN g % 100 = 0 THEN 'failed' ELSE 'sent' END, 'r', 'h', 1
                 FROM generate_series(1, 60000) AS g;
                 ANALYZE dispatch_log;",
            )
            .unwrap();
        let t = chrono::DateTime::parse_from_rfc3339("2026-03-02T05:00:00Z")
            .unwrap()
            .to_utc();
        let some = |f: fn(&mut LogFilter)| {
            let mut filter = LogFilter::default();
            f(&mut filter);
            filter
        };
        let filters = [
            LogFilter::default(),
            some(|f| f.journey = Some("fee".into())),
            some(|f| f.customer = Some("c42".into())),
            some(|f| f.outcome = Some(Outcome::Failed)),
            some(|f| f.channel = Some("push".into())),
            some(|f| {
                f.journey = Some("loan".into());
                f.step = Some("email".into());
            }),
        ];
        for filter in &filters {
            for after in [
                None,
                Some(LogCursor {
                    time: t,
                    seq: 15_000,
                }),
            ] {
                let (sql, params) = log_page_sql(filter, after, 100, LOG_COLUMNS, placeholder);
                let bound: Vec<&(dyn ToSql + Sync)> = params.iter().map(param).collect();
                let plan: Vec<String> = c
                    .client
                    .query(&format!("EXPLAIN {sql}"), &bound)
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let text = plan.join("\n");
                // A sort only over a filter's few rows (fetched by its index),
                // never over a walk that grows with the log.
                if let Some(at) = plan.iter().position(|l| l.contains("Sort  (")) {
                    let rows: u64 = plan[at + 2..]
                        .iter()
                        .find_map(|l| l.split("rows=").nth(1))
                        .and_then(|r| r.split(' ').next())
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(u64::MAX);
                    assert!(rows < 100, "sorted: {filter:?} {after:?}:\n{text}");
                }
                assert!(!text.contains("Seq Scan"), "{filter:?} {after:?}:\n{text}");
                assert!(
                    text.contains("dispatch_log_"),
                    "{filter:?} {after:?}:\n{text}"
                );
            }
        }
    }

    /// Rows of `sql`, each as text.
    fn rows(store: &PostgresStore, sql: &str) -> Vec<String> {
        store
            .conn()
            .unwrap()
            .client
            .query(&format!("SELECT t::text FROM ({sql}) AS t"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Each kind of count as (the full scan of the log and instances, the
    /// read of the counts the store keeps): the two must agree.
    fn scan_and_kept() -> [(String, String); 3] {
        use crate::store::review::{arms_sql, outcome_counts_sql};
        [
            (
                arms_sql(false, false, "$1"),
                arm_counts_sql(false, false, "$1"),
            ),
            (
                arms_sql(false, true, "$1"),
                arm_counts_sql(false, true, "$1"),
            ),
            (
                outcome_counts_sql(false, "$1"),
                outcome_count_rows_sql(false, "$1"),
            ),
        ]
    }

    /// A DBA's short `statement_timeout` on nudge's role: a backlog of
    /// deltas longer to fold than it still folds (the fold has a timeout of
    /// its own), and the counts hold every delta.
    #[test]
    fn a_backlog_of_deltas_folds_under_a_short_statement_timeout() {
        let store = crate::store::postgres::testing::temp_store();
        let mut c = store.conn().unwrap();
        c.client
            .batch_execute(
                "INSERT INTO review_outcome_deltas
                 SELECT 'j' || (i % 50), 'push', 'sent', '', 1 FROM generate_series(1, 400000) i;
                 SET statement_timeout = '20ms';",
            )
            .unwrap();
        fold(&mut c.client).unwrap();
        c.client.batch_execute("SET statement_timeout = 0").unwrap();
        drop(c);
        assert_eq!(
            rows(&store, "SELECT count(*) FROM review_outcome_deltas"),
            vec!["(0)"]
        );
        assert_eq!(
            rows(&store, "SELECT sum(records) FROM review_outcome_counts"),
            vec!["(400000)"]
        );
    }

    /// The counts the fold keeps are what the full-scan queries count, and
    /// migration 11 fills them so from a schema written before it.
    #[test]
    fn migration_11_fills_the_counts_the_fold_keeps() {
        let (schema, options) = crate::store::postgres::testing::fresh_schema();
        let _drop = crate::store::postgres::testing::TestStore::adopt(schema);
        let store = PostgresStore::open(&options).unwrap();
        crate::review::tests::generate(&store);
        let scans = |store: &PostgresStore| {
            store.conn().unwrap().client.execute(FOLD, &[]).unwrap();
            scan_and_kept().map(|(scan, kept)| (rows(store, &scan), rows(store, &kept)))
        };
        let kept = scans(&store);
        for (scan, kept) in &kept {
            assert!(!scan.is_empty());
            assert_eq!(scan, kept);
        }
        let deltas = "SELECT (SELECT count(*) FROM review_outcome_deltas) + (SELECT count(*) FROM review_instance_deltas)";
        assert_eq!(rows(&store, deltas), vec!["(0)"], "folded");
        // Back to version 10, as a schema written before it.
        store
            .conn()
            .unwrap()
            .client
            .batch_execute(
                "DROP FUNCTION review_log_inserted, review_log_deleted, review_instances_inserted,
                     review_instances_updated, review_instances_deleted, review_fold CASCADE;
                 DROP TABLE review_outcome_counts, review_arm_counts, review_rule_arm_counts,
                     review_arm_customers, review_rule_arm_customers, review_outcome_deltas,
                     review_instance_deltas, review_fold_batch;
                 ALTER TABLE received_events DROP COLUMN refused;
                 ALTER TABLE received_events DROP COLUMN ended_nothing;
                 DELETE FROM schema_version WHERE version >= 11;",
            )
            .unwrap();
        drop(store);
        assert_eq!(
            PostgresStore::migrate(&options).unwrap(),
            (10, schema::VERSION)
        );
        let store = PostgresStore::open(&options).unwrap();
        assert_eq!(scans(&store), kept);
    }

    /// Replicas writing at once while folds run: every delta is folded once
    /// (those committed during a fold stay for the next), and the counts
    /// end as the full scans count.
    #[test]
    fn folds_beside_concurrent_writers_lose_and_repeat_nothing() {
        let (a, b) = crate::store::postgres::testing::replicas();
        std::thread::scope(|scope| {
            for (w, store) in [(0, &*a), (1, &*b)] {
                scope.spawn(move || {
                    let mut c = store.conn().unwrap();
                    for round in 0..40 {
                        let mut tx = c.client.transaction().unwrap();
                        tx.execute(
                            "INSERT INTO instances (id, customer, journey, key, status, mode, category, started_at, rule_hash, trigger_event, vars, decision_inputs)
                             SELECT 'w' || $1::int || '-' || $2::int || '-' || g, 'c' || (g % 13), 'j' || (g % 3), 'k' || $1::int || '-' || $2::int || '-' || g,
                                    'open', (ARRAY['live', 'held_out'])[g % 2 + 1], 'service',
                                    timestamptz '2026-03-02 00:00:00+00' + ($2::int * 50 + g) * interval '1 minute',
                                    'h' || ($2::int % 2), 'e', '{}', '{}'
                             FROM generate_series(1, 25) AS g",
                            &[&w, &round],
                        )
                        .unwrap();
                        tx.execute(
                            "INSERT INTO dispatch_log (time, customer, journey, instance, step, channel, template, outcome, reason, rule_hash, attempt)
                             SELECT now(), 'c' || (g % 13), 'j' || (g % 3), 'i', 's' || (g % 2), 'push', 't',
                                    (ARRAY['sent', 'failed', 'retrying'])[g % 3 + 1], 'r', 'h', 1
                             FROM generate_series(1, 30) AS g",
                            &[],
                        )
                        .unwrap();
                        tx.execute(
                            "UPDATE instances SET status = 'converted', ended_at = now()
                             WHERE id LIKE 'w' || $1::int || '-' || $2::int || '-%' AND right(id, 1) IN ('3', '7')",
                            &[&w, &round],
                        )
                        .unwrap();
                        if round % 10 == 9 {
                            tx.execute(
                                "DELETE FROM instances WHERE id IN (SELECT id FROM instances WHERE status = 'converted' AND id LIKE 'w' || $1::int || '-%' ORDER BY started_at LIMIT 20)",
                                &[&w],
                            )
                            .unwrap();
                        }
                        tx.commit().unwrap();
                    }
                });
            }
            scope.spawn(|| {
                let mut c = a.conn().unwrap();
                for _ in 0..60 {
                    c.client.execute(FOLD, &[]).unwrap();
                }
            });
        });
        a.conn().unwrap().client.execute(FOLD, &[]).unwrap();
        for (scan, kept) in scan_and_kept() {
            let scan = rows(&a, &scan);
            assert!(!scan.is_empty());
            assert_eq!(scan, rows(&a, &kept));
        }
    }
}
