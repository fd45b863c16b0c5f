//! Stores for tests: each on a schema of its own in the test database
//! (`NUDGE_TEST_POSTGRES_URL`, by default `test` on 127.0.0.1:5432 as
//! `postgres`), dropped when the test ends. Plain `#[test]` functions only:
//! the synchronous client must not run inside an async runtime.

use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{parse_url, PgOptions, PostgresStore};

pub fn base_url() -> String {
    std::env::var("NUDGE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn admin() -> postgres::Client {
    let (config, _) = parse_url(&base_url()).expect("NUDGE_TEST_POSTGRES_URL");
    config.connect(postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "the PostgreSQL tests need a database at {} (set NUDGE_TEST_POSTGRES_URL): {e}",
            base_url()
        )
    })
}

/// A new, empty schema: its name and the options of a store on it.
pub fn fresh_schema() -> (String, PgOptions) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let schema = format!(
        "nudge_test_{}_{}_{:06x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xff_ffff
    );
    admin()
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let url = base_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let options = PgOptions {
        url: format!("{url}{separator}options=-csearch_path%3D{schema}"),
        password: None,
        pool_size: 4,
        ca_file: None,
    };
    (schema, options)
}

/// A store on a schema of its own, which it drops when dropped (unless it
/// shares the schema with another).
pub struct TestStore {
    store: Option<PostgresStore>,
    schema: Option<String>,
}

impl Deref for TestStore {
    type Target = PostgresStore;
    fn deref(&self) -> &PostgresStore {
        self.store.as_ref().expect("open until dropped")
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        drop(self.store.take());
        if let Some(schema) = &self.schema {
            let _ = admin().batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
        }
    }
}

impl TestStore {
    /// No store of its own: drops `schema` when dropped.
    pub fn adopt(schema: String) -> Self {
        Self {
            store: None,
            schema: Some(schema),
        }
    }
}

pub fn temp_store() -> TestStore {
    let (schema, options) = fresh_schema();
    TestStore {
        store: Some(PostgresStore::open(&options).unwrap()),
        schema: Some(schema),
    }
}

/// Two replicas on one schema (the first drops it).
pub fn replicas() -> (TestStore, TestStore) {
    let (first, second, _) = replicas_with_options();
    (first, second)
}

/// [`replicas`], and the options that open another on their schema.
pub fn replicas_with_options() -> (TestStore, TestStore, PgOptions) {
    let (schema, options) = fresh_schema();
    let first = TestStore {
        store: Some(PostgresStore::open(&options).unwrap()),
        schema: Some(schema),
    };
    let second = TestStore {
        store: Some(PostgresStore::open(&options).unwrap()),
        schema: None,
    };
    assert_ne!(first.holder(), second.holder());
    (first, second, options)
}
