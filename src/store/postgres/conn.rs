//! Connections: the URL and its TLS mode, a bounded pool, and a statement
//! cache per connection (a statement prepared once per connection runs in
//! one round trip instead of two).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};
use postgres_openssl::MakeTlsConnector;

pub use crate::config::{parse_postgres_url as parse_url, SslMode};
use crate::store::StoreError;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/db?sslmode=…`, without a password.
    pub url: String,
    /// From `store.password_env` / `store.password_file`.
    pub password: Option<String>,
    /// Connections in the pool at most.
    pub pool_size: u32,
    /// PEM of CA certificates trusted besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Refuses what [`Pool::open`] would refuse before connecting: the URL and
/// the TLS settings with their CA file (`nudge check`, the daemon's preflight).
pub fn check_options(options: &PgOptions) -> Result<(), StoreError> {
    let (_, mode) =
        parse_url(&options.url).map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
    tls(mode, options.ca_file.as_deref()).map(drop)
}

/// The TLS connector for `mode`: OpenSSL (already linked for Kafka).
fn tls(mode: SslMode, ca_file: Option<&Path>) -> Result<MakeTlsConnector, StoreError> {
    let tls_error = |e: openssl::error::ErrorStack| StoreError::Config(format!("store TLS: {e}"));
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(tls_error)?;
    if let Some(path) = ca_file {
        // OpenSSL's own error for a missing file is a stack of BIO lines.
        std::fs::metadata(path).map_err(|e| {
            StoreError::Config(format!(
                "store.ca_file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        builder.set_ca_file(path).map_err(|e| {
            StoreError::Config(format!(
                "store.ca_file: cannot load {}: {e}",
                path.display()
            ))
        })?;
    }
    let verify = match mode {
        SslMode::Disable | SslMode::Prefer => false,
        SslMode::Require => ca_file.is_some(),
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    };
    if !verify {
        builder.set_verify(SslVerifyMode::NONE);
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    if mode != SslMode::VerifyFull {
        connector.set_callback(|ssl, _| {
            ssl.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(connector)
}

/// Marks a statement whose plan PostgreSQL makes once per connection (its
/// text starts with this): a batch statement of the dispatch path or the
/// decide stage whose every row is found by key whatever the statistics say
/// (each checked by `generic_plans_probe_by_key_on_empty_tables`). Planned
/// anew on every run, the claim and the settle spent more time planning
/// than executing (dispatch bench, store only, 20 k steps: claim 39 and
/// settle 87 µs a step planned per run, 25 and 49 with the plan kept).
pub const GENERIC_PLAN: &str = "/* plan: generic */";

/// The session for statements marked [`GENERIC_PLAN`]: one plan, made at
/// the first run, where a table is scanned only if no index can serve (on a
/// new store's empty tables a scan is the cheapest plan, and a kept plan
/// would go on scanning as the tables grow).
pub const GENERIC_SESSION: &str =
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off";
/// The session for every other statement: planned for each run's values.
/// How long one of the engine's statements waits for a lock.
const LOCK_TIMEOUT: &str = "SET lock_timeout = '10s'";

pub const CUSTOM_SESSION: &str = "SET plan_cache_mode = force_custom_plan; SET enable_seqscan = on";

/// How the session plans prepared statements (`plan_cache_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanMode {
    /// For each run's values: the default, for statements whose best plan
    /// depends on them or on statistics that change as tables grow.
    Custom,
    /// Once, kept: for statements marked [`GENERIC_PLAN`].
    Generic,
}

impl PlanMode {
    fn of(sql: &str) -> Self {
        match sql.trim_start().starts_with(GENERIC_PLAN) {
            true => Self::Generic,
            false => Self::Custom,
        }
    }

    fn set(self) -> &'static str {
        match self {
            Self::Custom => CUSTOM_SESSION,
            Self::Generic => GENERIC_SESSION,
        }
    }
}

/// One pooled connection and the statements prepared on it.
pub struct PgConn {
    pub client: Client,
    statements: HashMap<&'static str, (Statement, PlanMode)>,
    /// The session's plan mode; `None` when unknown (a transaction rolled
    /// back undoes a `SET` made inside it).
    mode: Option<PlanMode>,
}

impl PgConn {
    /// The statement for `sql`, prepared on first use on this connection,
    /// with the session switched to the plan mode it asks for.
    pub fn prepare(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        let (statement, mode) = match self.statements.get(sql) {
            Some(known) => known.clone(),
            None => {
                let statement = self.client.prepare(sql)?;
                let mode = PlanMode::of(sql);
                self.statements.insert(sql, (statement.clone(), mode));
                (statement, mode)
            }
        };
        self.switch_to(mode)?;
        Ok(statement)
    }

    fn switch_to(&mut self, mode: PlanMode) -> Result<(), postgres::Error> {
        if self.mode != Some(mode) {
            // Unknown until it succeeds: a failed SET leaves it so.
            self.mode = None;
            self.client.batch_execute(mode.set())?;
            self.mode = Some(mode);
        }
        Ok(())
    }

    /// The client, planning per run: for statements not prepared through
    /// [`PgConn::prepare`] (a statement with parameters would otherwise get
    /// a generic plan if the last one asked for it).
    pub fn custom_plans(&mut self) -> Result<&mut Client, postgres::Error> {
        self.switch_to(PlanMode::Custom)?;
        Ok(&mut self.client)
    }

    /// After a rollback: a `SET` inside the transaction was undone.
    pub fn forget_plan_mode(&mut self) {
        self.mode = None;
    }

    pub fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.prepare(sql)?;
        self.client.query(&statement, params)
    }

    pub fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let statement = self.prepare(sql)?;
        self.client.query_opt(&statement, params)
    }

    pub fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        let statement = self.prepare(sql)?;
        self.client.query_one(&statement, params)
    }

    pub fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let statement = self.prepare(sql)?;
        self.client.execute(&statement, params)
    }
}

/// Opens [`PgConn`]s for the pool (r2d2_postgres hands out bare clients,
/// with no place for a statement cache).
#[derive(Clone)]
pub struct Manager {
    config: postgres::Config,
    tls: MakeTlsConnector,
    /// Why the last connection attempt failed, until one succeeds: r2d2
    /// hands its own copy to the first waiter that times out only, so
    /// every other waiter (`/readyz`'s probe among them) would be told
    /// "timed out waiting for connection" without the server's reason.
    last_failure: Arc<Mutex<Option<String>>>,
}

impl Manager {
    /// A connection outside the pool, as configured (URL, password, TLS).
    pub fn connect_plain(&self) -> Result<Client, postgres::Error> {
        self.config.connect(self.tls.clone())
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    /// The store's error, so that the pool's "timed out waiting for
    /// connection" and its log lines carry the server's reason, not the
    /// client's bare "db error".
    type Error = StoreError;

    fn connect(&self) -> Result<PgConn, StoreError> {
        let connected = self.open_session();
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            connected.as_ref().err().map(ToString::to_string);
        connected
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), StoreError> {
        Ok(conn.client.simple_query("").map(|_| ())?)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}

impl Manager {
    fn open_session(&self) -> Result<PgConn, StoreError> {
        let mut client = self.config.connect(self.tls.clone())?;
        // Statements are prepared once per connection; after five runs
        // PostgreSQL may switch a prepared statement to a generic plan made
        // without the bound arrays' sizes, and one made while the tables
        // were small stays a sequential scan as they grow (measured in the
        // dispatch bench's store-only run, 20 k steps: a batch's customer
        // and history reads 238 µs a step with cached generic plans, 16.6 µs
        // planned per run; settling costs 47 -> 69 µs for the planning).
        // Plan each run for its values by default; only the statements
        // marked [`GENERIC_PLAN`], written to be found by key whatever the
        // statistics, keep one plan.
        client.batch_execute(PlanMode::Custom.set())?;
        // A lock another session keeps (a DBA's forgotten transaction, a
        // migration's table lock) fails the statement after a while instead
        // of holding it silently: the work is retried with backoff, and
        // `/readyz` says which lock timed out meanwhile.
        client.batch_execute(LOCK_TIMEOUT)?;
        Ok(PgConn {
            client,
            statements: HashMap::new(),
            mode: Some(PlanMode::Custom),
        })
    }

    /// The pool's error with the reason the database gave last, if r2d2
    /// handed that to another waiter.
    fn explain(&self, timeout: r2d2::Error) -> StoreError {
        let text = timeout.to_string();
        let last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_deref() {
            Some(reason) if !text.contains(reason) => StoreError::Pool(format!("{text}: {reason}")),
            _ => StoreError::Pool(text),
        }
    }
}

/// The pool's own connection errors (it keeps `min_idle` connections open
/// in the background): while the database is away it retries each several
/// times a second, and r2d2's own handler logs every failure; these go to
/// [`report_pool_errors_to`], throttled there.
#[derive(Debug)]
struct ThrottledErrors;

impl r2d2::HandleError<StoreError> for ThrottledErrors {
    fn handle_error(&self, error: StoreError) {
        if let Some(report) = POOL_ERRORS.get() {
            report(&error);
        }
    }
}

/// Where the pools' background connection errors go: the daemon installs
/// its throttled log line ([`report_pool_errors_to`]); a command that reads
/// the store fails with the error itself instead.
static POOL_ERRORS: std::sync::OnceLock<fn(&StoreError)> = std::sync::OnceLock::new();

/// Sends every pool's background connection errors to `report` (once per
/// process; a second call changes nothing).
pub fn report_pool_errors_to(report: fn(&StoreError)) {
    let _ = POOL_ERRORS.set(report);
}

/// `nudge/<host>/<pid>`: which process a session in `pg_stat_activity`
/// is, for a DBA about to end it. A replica's store names its sessions
/// `nudge/<holder>` instead (its claims' holder, which begins the same),
/// so that its successor on the host can tell it is gone.
pub fn replica_name() -> String {
    format!("nudge/{}/{}", host_tail(), std::process::id())
}

/// The host's name, cut from the left to fit PostgreSQL's 63 bytes of
/// `application_name` beside the pid: a pod's name ends in what tells it
/// apart from its siblings (`…-7c9d8f6b5d-x2k4z`), and in a container
/// every replica may be pid 1.
pub fn host_tail() -> String {
    let host = host_name();
    let chars: Vec<char> = host.chars().collect();
    chars[chars.len().saturating_sub(40)..].iter().collect()
}

/// The host's name (a pod's name under Kubernetes), or "nudge".
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "nudge".into())
}

/// The bounded pool. Dropped on a thread of its own when dropped inside an
/// async runtime: the synchronous client runs a runtime of its own, which
/// may not be shut down from an async worker.
/// The manager beside it: r2d2 does not lend its own.
pub struct Pool(Option<r2d2::Pool<Manager>>, Manager, bool);

impl Pool {
    pub fn open(options: &PgOptions) -> Result<Self, StoreError> {
        Self::open_named(options, &replica_name())
    }

    /// Sessions named `name` in `pg_stat_activity`, unless the URL names them.
    pub fn open_named(options: &PgOptions, name: &str) -> Result<Self, StoreError> {
        Self::open_waiting(options, name, Duration::from_secs(10))
    }

    /// A pool whose `get` gives up after `wait`.
    fn open_waiting(options: &PgOptions, name: &str, wait: Duration) -> Result<Self, StoreError> {
        let (mut config, mode) =
            parse_url(&options.url).map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
        if let Some(password) = &options.password {
            config.password(password);
        }
        let named = config.get_application_name().is_none();
        if named {
            config.application_name(name);
        }
        let manager = Manager {
            config,
            tls: tls(mode, options.ca_file.as_deref())?,
            last_failure: Arc::default(),
        };
        // One connection first, so that a start fails at once with the
        // client's own error (refused, TLS, authentication) rather than
        // with a pool timeout.
        let first = r2d2::ManageConnection::connect(&manager)?;
        let pool = r2d2::Pool::builder()
            .max_size(options.pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(wait)
            .error_handler(Box::new(ThrottledErrors))
            .build_unchecked(manager.clone());
        drop(first);
        Ok(Self(Some(pool), manager, named))
    }

    /// Whether the sessions carry the name given at open (the URL did not
    /// name them otherwise).
    pub fn names_sessions(&self) -> bool {
        self.2
    }

    /// How the pool connects, for a connection of one's own (`LISTEN`).
    pub fn manager(&self) -> Manager {
        self.1.clone()
    }

    pub fn get(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        self.0
            .as_ref()
            .expect("the pool lives until dropped")
            .get()
            .map_err(|e| self.1.explain(e))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let pool = self.0.take();
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(pool)).join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_mode_is_taken_out_of_the_url_and_other_options_stay() {
        let (config, mode) = parse_url(
            "postgres://nudge@db:5432/nudge?sslmode=verify-full&options=-csearch_path%3Dx",
        )
        .unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(config.get_user(), Some("nudge"));
        assert_eq!(config.get_dbname(), Some("nudge"));
        assert_eq!(config.get_options(), Some("-csearch_path=x"));
        assert_eq!(config.get_application_name(), None, "set by the pool");
        let (_, mode) = parse_url("postgresql://nudge@db/nudge").unwrap();
        assert_eq!(mode, SslMode::Prefer);
        assert!(parse_url("postgres://nudge@db/nudge?sslmode=allow")
            .unwrap_err()
            .contains("allow"));
    }

    /// The stranger's case: `ALTER DATABASE … ALLOW_CONNECTIONS false`
    /// under a running daemon, whose `/readyz` said only "timed out
    /// waiting for connection" while its log had the server's refusal.
    #[test]
    fn every_waiter_for_a_connection_is_told_why_the_database_refused_it() {
        use crate::store::postgres::testing::{admin, base_url};
        let db = format!("nudge_refusing_{:08x}", rand::random::<u32>());
        admin()
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
        let url = base_url().replace("/test", &format!("/{db}"));
        assert!(url.contains(&db), "the test database is named test: {url}");
        let options = PgOptions {
            url,
            password: None,
            pool_size: 2,
            ca_file: None,
        };
        let pool = Pool::open_waiting(&options, "nudge/test", Duration::from_millis(1500)).unwrap();
        let mut admin = admin();
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {db} ALLOW_CONNECTIONS false;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
            ))
            .unwrap();
        // pg_terminate_backend only signals: until the pool's sessions have
        // ended, a waiter may still be handed one of them (seen under load).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                &[&db],
            )
            .unwrap()
            .get::<_, i64>(0)
            > 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the sessions of {db} did not end"
            );
            std::thread::yield_now();
        }
        let errors: Vec<Option<String>> = std::thread::scope(|s| {
            let waiters: Vec<_> = (0..3)
                .map(|_| s.spawn(|| pool.get().err().map(|e| e.to_string())))
                .collect();
            waiters.into_iter().map(|w| w.join().unwrap()).collect()
        });
        drop(pool);
        let _ = admin.batch_execute(&format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS true; DROP DATABASE {db} WITH (FORCE)"
        ));
        for error in errors {
            let error = error.expect("no connection while the database refuses them");
            assert!(error.contains("55000"), "{error}");
        }
    }

    #[test]
    fn a_password_in_the_url_is_refused() {
        for url in [
            "postgres://nudge:s3cret@db/nudge",
            "postgres://nudge@db/nudge?password=s3cret",
        ] {
            let err = parse_url(url).unwrap_err();
            assert!(err.contains("password_env"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }
}
