//! Typed configuration: a TOML file merged with `NUDGE_SECTION__KEY`
//! environment overrides, refused at start-up if a key is unknown or a value
//! is out of range. Secrets never live here: a channel names the environment
//! variable or file that holds its token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Deserializer};

use crate::model::ChannelKind;
pub mod holidays;
pub mod settings;

pub use settings::{
    BusinessHours, BusinessHoursByChannel, Cap, Fatigue, HolidayHold, Prior, PropensityConfig,
    QuietHours, Window, WindowSpec,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The loader's message, kept as text: as a source it would be printed
    /// twice in an error chain.
    #[error("config: {0}")]
    Load(String),
    #[error("config: invalid values:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error("config: cannot read secret for `{key}` from {source_name}: {reason}")]
    Secret {
        key: String,
        source_name: String,
        reason: String,
    },
}

/// A key an empty override unset that cannot be unset: said with the
/// variable that emptied it, not as the loader's "unit value".
fn emptied_needs_a_value(error: config::ConfigError, emptied: &[(String, String)]) -> ConfigError {
    let text = error.to_string();
    for (key, var) in emptied {
        if text.contains(&format!("`{key}`")) || text.contains(&format!("key `{key}.")) {
            return ConfigError::Load(format!(
                "{key}: {var} is empty, and this key needs a value: give one, or remove \
                 the variable to keep the file's value or the default"
            ));
        }
    }
    error.into()
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        ConfigError::Load(values_hidden(&dotted_keys(&e.to_string())))
    }
}

/// The loader quotes the value it could not use (`invalid type: string
/// "sasl.password=…"`); under `kafka.properties`, or for a key that names a
/// secret, that value may be one, so it is not shown.
fn values_hidden(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    let secret = ["kafka.properties", "password", "secret", "token", "key"]
        .iter()
        .any(|word| lower.contains(word));
    if !secret {
        return message.to_string();
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("string \"") {
        out.push_str(&rest[..at]);
        out.push_str("a string (not shown: it may be a secret)");
        let value = &rest[at + "string \"".len()..];
        let mut end = value.len();
        let mut escaped = false;
        for (i, c) in value.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &value[end.min(value.len())..];
    }
    out.push_str(rest);
    out
}

/// The loader writes a key inside a list as `policy.caps[0]per`; people
/// write `policy.caps[0].per`.
fn dotted_keys(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 4);
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']'
            && chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_')
        {
            out.push('.');
        }
    }
    out
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: StoreConfig,
    pub rules: RulesConfig,
    pub scheduler: SchedulerConfig,
    pub policy: PolicyConfig,
    /// One entry per channel kind (`push`, `email`, `call_task`).
    pub channels: BTreeMap<ChannelKind, ChannelConfig>,
    pub kafka: KafkaConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub audit: AuditConfig,
}

/// The config key `words` (a variable's name after `NUDGE_`, lower case,
/// one underscore between every word) would set, if any: each way of
/// reading its underscores as level separators is tried against the config's
/// own schema, so only real keys are named.
fn override_key(words: &str, value: &str) -> Option<String> {
    const SECTIONS: [&str; 9] = [
        "store",
        "rules",
        "scheduler",
        "policy",
        "channels",
        "kafka",
        "admin",
        "log",
        "audit",
    ];
    let (section, rest) = words.split_once('_')?;
    if !SECTIONS.contains(&section) || rest.is_empty() {
        return None;
    }
    let parts: Vec<&str> = rest.split('_').collect();
    if parts.iter().any(|p| p.is_empty()) || parts.len() > 6 {
        return None;
    }
    for cuts in 0u32..(1 << (parts.len() - 1)) {
        let mut key = format!("{section}.{}", parts[0]);
        for (i, part) in parts.iter().enumerate().skip(1) {
            key.push(if cuts & (1 << (i - 1)) != 0 { '.' } else { '_' });
            key.push_str(part);
        }
        if is_config_key(&key, value) {
            return Some(key);
        }
    }
    None
}

/// Whether `key` is in the config's schema: setting it alone is refused, if
/// at all, for its value or a missing sibling, never for its own name.
fn is_config_key(key: &str, value: &str) -> bool {
    let Ok(built) = config::Config::builder()
        .set_override(key, value)
        .and_then(|b| b.build())
    else {
        return false;
    };
    match built.try_deserialize::<Config>() {
        Ok(_) => true,
        Err(e) => {
            // An unknown name is quoted in the error (`token`, `push_url`);
            // a table where a value was given is no key to set alone.
            let text = e.to_string();
            let table = text.contains("expected struct") || text.contains("expected a map");
            !table
                && !key
                    .split('.')
                    .skip(1)
                    .any(|name| name != value && text.contains(&format!("`{name}`")))
        }
    }
}

/// SQLite's own page cache size (`store.cache_mb`'s default). A 64 MiB cache
/// once measured slower for sending; with the build options in
/// `.cargo/config.toml` it is no faster (BENCHMARKS.md, 3): larger caches are
/// for bulk loads.
pub const DEFAULT_CACHE_MB: u32 = 2;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The database: `sqlite:///var/lib/nudge/nudge.db` (one node) or
    /// `postgres://nudge@db:5432/nudge?sslmode=verify-full` (replicas
    /// sharing it). Unset: the SQLite file at `path`. Never with a password.
    pub url: Option<String>,
    /// SQLite database file (WAL mode), when `url` is unset. Created if missing.
    pub path: PathBuf,
    /// PostgreSQL: environment variable holding the password.
    pub password_env: Option<String>,
    /// PostgreSQL: file holding the password (e.g. a mounted secret).
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: connections per replica at most.
    pub pool_size: u32,
    /// PostgreSQL: PEM of CA certificates trusted for the server besides
    /// the system's (`sslmode=require` then checks the chain too).
    pub ca_file: Option<PathBuf>,
    /// Ended journeys, their steps, dispatch-log records, processed event ids
    /// and published dead letters older than this are deleted (10 min after
    /// start, then hourly).
    /// Event-id dedup reaches back this far. "0s" keeps everything.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// SQLite page cache, MiB. SQLite's own default (2): measured larger
    /// caches made sending slower (BENCHMARKS.md); the OS page cache holds
    /// the file anyway. Raise it for bulk loads.
    pub cache_mb: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            path: PathBuf::from("nudge.db"),
            password_env: None,
            password_file: None,
            pool_size: DEFAULT_POOL_SIZE,
            ca_file: None,
            retention: Duration::from_secs(180 * 24 * 3600),
            cache_mb: DEFAULT_CACHE_MB,
        }
    }
}

/// The sandbox's operation budget per evaluation (`rules.max_operations`'s default).
pub const DEFAULT_MAX_OPERATIONS: u64 = 100_000;

/// The sandbox's wall-clock budget per evaluation (`rules.timeout`'s
/// default): the shipped journeys decide in microseconds, and an event's
/// batch (and the store's writer) waits for its slowest evaluation.
pub const DEFAULT_RULES_TIMEOUT: Duration = Duration::from_millis(100);

/// PostgreSQL connections per replica (`store.pool_size`'s default): the
/// decide stage, each channel's claims and writes, and the readers.
pub const DEFAULT_POOL_SIZE: u32 = 8;

/// The database `store.url` (or `store.path`) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    /// The URL as given (no password in it).
    Postgres(String),
}

impl StoreConfig {
    /// Which database to open: `store.url` when set, else `store.path`.
    pub fn target(&self) -> Result<StoreUrl, String> {
        let Some(url) = &self.url else {
            return Ok(StoreUrl::Sqlite(self.path.clone()));
        };
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = match rest.strip_prefix("//") {
                // `sqlite://x/nudge.db` names a host `x`, not a file: a
                // slash short of `sqlite:///x/nudge.db`.
                Some(p) if !p.starts_with('/') => {
                    return Err(
                        "names a host, not a file: write sqlite:///absolute/path/nudge.db \
                         (three slashes) or sqlite:relative/path/nudge.db"
                            .into(),
                    )
                }
                Some(p) => p,
                None => rest,
            };
            if path.is_empty() {
                return Err("names no file".into());
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            parse_postgres_url(url)?;
            return Ok(StoreUrl::Postgres(url.clone()));
        }
        Err("expected sqlite:///path/to/nudge.db or postgres://user@host:5432/database".into())
    }

    /// The database for messages: the file, or the URL (never holding a password).
    pub fn describe(&self) -> String {
        match self.target() {
            Ok(StoreUrl::Sqlite(path)) => path.display().to_string(),
            Ok(StoreUrl::Postgres(url)) => url,
            Err(_) => shown_url(self.url.as_deref().unwrap_or_default()),
        }
    }

    /// Reads the PostgreSQL password from the environment or file the config names.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        if let Some(var) = &self.password_env {
            return std::env::var(var)
                .map(Some)
                .map_err(|e| ConfigError::Secret {
                    key: "store.password_env".into(),
                    source_name: format!("environment variable {var}"),
                    reason: e.to_string(),
                });
        }
        if let Some(path) = &self.password_file {
            let secret = |reason: String| ConfigError::Secret {
                key: "store.password_file".into(),
                source_name: path.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| secret(e.to_string()))?;
            let password = text.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err(secret("the file is empty".into()));
            }
            return Ok(Some(password.to_string()));
        }
        Ok(None)
    }

    fn problems(&self, problems: &mut Vec<String>) {
        if !(1..=65_536).contains(&self.cache_mb) {
            problems.push("store.cache_mb: must be between 1 and 65536".into());
        }
        let target = match self.target() {
            Ok(target) => target,
            Err(e) => {
                let url = shown_url(self.url.as_deref().unwrap_or_default());
                problems.push(format!("store.url: `{url}` {e}"));
                return;
            }
        };
        if self.password_env.is_some() && self.password_file.is_some() {
            problems.push("store.password_env: set password_env or password_file, not both".into());
        }
        if matches!(target, StoreUrl::Sqlite(_)) {
            for (key, set) in [
                ("password_env", self.password_env.is_some()),
                ("password_file", self.password_file.is_some()),
                ("ca_file", self.ca_file.is_some()),
            ] {
                if set {
                    problems.push(format!(
                        "store.{key}: only for a PostgreSQL store.url (the store is SQLite)"
                    ));
                }
            }
        }
        if !(1..=1_000).contains(&self.pool_size) {
            problems.push("store.pool_size: must be between 1 and 1000".into());
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Directory of `*.rhai` journey scripts.
    pub dir: PathBuf,
    /// Reload when a file in `dir` changes (SIGHUP always reloads).
    pub watch: bool,
    /// Sandbox: rhai operations one evaluation may run before it is stopped.
    pub max_operations: u64,
    /// Sandbox: wall-clock time one evaluation may run before it is stopped
    /// (operations differ in cost: one `index_of` on a long array is one).
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("rules"),
            watch: false,
            max_operations: DEFAULT_MAX_OPERATIONS,
            timeout: DEFAULT_RULES_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Due steps claimed per round, per channel.
    pub batch_size: usize,
    /// How long a claimed step is reserved before another worker may take it.
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
    /// Sends tried per step before it is `failed` (5xx and timeouts only).
    /// The default's backoff spans at least 8.5 minutes: a receiver down for
    /// five minutes loses nothing.
    pub max_attempts: u32,
    #[serde(deserialize_with = "duration")]
    pub retry_base: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            lease: Duration::from_secs(300),
            max_attempts: 10,
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Used when a customer's time zone is unknown (IANA name).
    #[serde(deserialize_with = "timezone")]
    pub default_timezone: Tz,
    /// Quiet hours per channel (`[policy.quiet_hours.push]`); the old
    /// single window (`start`, `end`, `channels`) still loads, deprecated.
    pub quiet_hours: QuietHours,
    /// Deprecated: one cap on everything, `max_per_customer` within
    /// `cap_window` (rounded up to calendar days). Use `policy.caps`.
    pub max_per_customer: Option<u32>,
    /// Deprecated with `max_per_customer`; still the window of the rules'
    /// count of recent contacts.
    #[serde(deserialize_with = "duration")]
    pub cap_window: Duration,
    /// Kill switches: journeys and channels whose steps are suppressed.
    pub disabled_journeys: Vec<String>,
    pub disabled_channels: Vec<ChannelKind>,
    /// Journeys that decide and log but never send (outcome `shadow`).
    pub shadow_journeys: Vec<String>,
    /// An exit event this long after a journey's last step still counts as
    /// its conversion (so marketing sees whether the outreach worked).
    #[serde(deserialize_with = "duration")]
    pub attribution_window: Duration,
    // -- calendar: caps, fatigue, business hours, holidays --
    /// Frequency caps by category and channel, per calendar days in the
    /// customer's time zone. Unset: 4 messages a day (or the deprecated
    /// `max_per_customer`); `[]`: no cap.
    pub caps: Option<Vec<Cap>>,
    /// Fatigue for journeys that do not set their own; unset: off.
    pub fatigue: Option<Fatigue>,
    /// Channels bound to opening hours; default call tasks Mon-Fri 09:00-17:00.
    pub business_hours: BusinessHoursByChannel,
    /// Public holiday calendar (TOML); unset: the shipped Australian one.
    pub holidays: Option<PathBuf>,
    /// Region (ISO 3166-2 or a country) of customers whose region is unknown.
    pub default_region: String,
    /// Steps held on public holidays besides business-hours channels.
    pub holiday_hold: HolidayHold,
    /// Arbitration between a customer's competing steps (issue 13).
    pub arbitration: ArbitrationConfig,
    /// Conversion rates learned from outcomes, for scripts (`customer.propensity`).
    pub propensity: PropensityConfig,
}

/// `policy.arbitration`: how far ahead the scheduler looks for a customer's
/// competing steps when the caps leave room for fewer than want to go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArbitrationConfig {
    /// Steps of one customer due within this of each other compete; `0s`
    /// turns look-ahead off (only steps due together compete).
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
}

impl Default for ArbitrationConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(600),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default_timezone: chrono_tz::Australia::Sydney,
            quiet_hours: QuietHours::default(),
            max_per_customer: None,
            cap_window: Duration::from_secs(24 * 3600),
            disabled_journeys: vec![],
            disabled_channels: vec![],
            shadow_journeys: vec![],
            attribution_window: Duration::from_secs(30 * 24 * 3600),
            caps: None,
            fatigue: None,
            business_hours: BusinessHoursByChannel::default(),
            holidays: None,
            default_region: "AU".into(),
            holiday_hold: HolidayHold::default(),
            arbitration: ArbitrationConfig::default(),
            propensity: PropensityConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// The caps in force: `policy.caps`, else the deprecated single cap,
    /// else 4 messages a calendar day.
    pub fn effective_caps(&self) -> Vec<Cap> {
        if let Some(caps) = &self.caps {
            return caps.clone();
        }
        let max = self.max_per_customer.unwrap_or(4);
        if max == 0 {
            return vec![];
        }
        let day = 24 * 3600;
        let per = self.cap_window.as_secs().div_ceil(day).max(1);
        vec![Cap {
            category: None,
            channel: None,
            max,
            per: u32::try_from(per).unwrap_or(u32::MAX),
        }]
    }

    fn calendar_problems(&self, problems: &mut Vec<String>) {
        self.quiet_hours.problems(problems);
        for (i, cap) in self.caps.iter().flatten().enumerate() {
            if cap.max == 0 {
                problems.push(format!(
                    "policy.caps[{i}].max: must be at least 1 (to hold a channel or a journey \
                     entirely, use policy.disabled_channels or policy.disabled_journeys)"
                ));
            }
        }
        if self.caps.is_some() && self.max_per_customer.is_some() {
            problems.push(
                "policy.max_per_customer: deprecated and replaced by policy.caps; set only policy.caps".into(),
            );
        }
        if let Some(f) = &self.fatigue {
            if f.after > 0 && f.pause.is_zero() {
                problems.push("policy.fatigue.pause: must be longer than 0s".into());
            }
        }
        if self.attribution_window.is_zero() {
            problems.push("policy.attribution_window: must be longer than 0s".into());
        }
        self.propensity.problems(problems);
        if let Some(path) = &self.holidays {
            if let Err(e) = holidays::Holidays::load(path) {
                problems.push(e.to_string());
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Endpoint that receives one JSON POST per step.
    pub url: String,
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// A step due longer ago than this is `expired`, never sent stale.
    #[serde(default = "default_lateness", deserialize_with = "duration")]
    pub lateness: Duration,
    /// Sends in flight at once on this channel.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Environment variable holding the bearer token (never the token itself).
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding the bearer token (e.g. a mounted Kubernetes secret).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM file of extra CA certificates to trust for this endpoint (a
    /// private CA); the system's trust store is always used.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Most sends per second, minute or hour (`"200/s"`, `"30/m"`,
    /// `"1000/h"`); steps over it wait in the store for their turn. None:
    /// no limit but `concurrency`.
    #[serde(default)]
    pub rate: Option<crate::dispatch::Rate>,
    /// When a journey ends by an exit event, take back each step delivered
    /// on this channel (a POST `{"action": "withdraw", ...}`). Default: true
    /// for `call_task` (no agent calls a customer who already signed),
    /// false for the others.
    #[serde(default)]
    pub withdraw: Option<bool>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
/// A step due longer ago than this is `expired` (`channels.<kind>.lateness`'s default).
pub const DEFAULT_LATENESS: Duration = Duration::from_secs(12 * 3600);

fn default_lateness() -> Duration {
    DEFAULT_LATENESS
}
fn default_concurrency() -> usize {
    32
}

/// The channels whose delivered steps an exit withdraws
/// (`channels.<kind>.withdraw`, true by default for `call_task` only).
pub fn withdraw_channels(channels: &BTreeMap<ChannelKind, ChannelConfig>) -> Vec<ChannelKind> {
    ChannelKind::ALL
        .into_iter()
        .filter(|k| {
            channels
                .get(k)
                .and_then(|c| c.withdraw)
                .unwrap_or(*k == ChannelKind::CallTask)
        })
        .collect()
}

impl ChannelConfig {
    /// Reads the bearer token from the environment or file the config names.
    pub fn token(&self, kind: ChannelKind) -> Result<Option<String>, ConfigError> {
        read_secret(
            &format!("channels.{kind}.token"),
            self.token_env.as_deref(),
            self.token_file.as_deref(),
            1,
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    /// Where records that cannot be processed go, with the reason in headers.
    pub dead_letter_topic: String,
    /// librdkafka properties for every client, consumer and dead-letter
    /// producer (e.g. `security.protocol`, `sasl.mechanism`, `sasl.username`,
    /// `ssl.ca.location`). Secrets: `sasl_password_env` / `sasl_password_file`.
    #[serde(deserialize_with = "dotted_names")]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only (e.g. `session.timeout.ms`).
    #[serde(deserialize_with = "dotted_names")]
    pub consumer_properties: BTreeMap<String, String>,
    pub sasl_password_env: Option<String>,
    pub sasl_password_file: Option<PathBuf>,
    /// Other secret librdkafka properties, by where their value is: property
    /// name → environment variable (e.g. `"ssl.key.password" = "KAFKA_KEY_PASSWORD"`).
    #[serde(deserialize_with = "dotted_names")]
    pub secret_properties_env: BTreeMap<String, String>,
    /// Property name → file holding the value.
    #[serde(deserialize_with = "dotted_names")]
    pub secret_properties_file: BTreeMap<String, PathBuf>,
    /// Records processed per store transaction.
    pub batch_size: usize,
    /// Time allowed to drain in-flight work on shutdown or revoke.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// At start, how long sending waits for the records that arrived while
    /// the daemon was down (an exit among them withdraws a step that fell
    /// due meanwhile); it starts sooner once they are read.
    #[serde(deserialize_with = "duration")]
    pub catch_up_timeout: Duration,
}

impl KafkaConfig {
    /// A SASL password under a `security.protocol` without SASL: librdkafka
    /// would connect without authenticating, ignore the password, and the
    /// broker's refusal would read as an outage.
    fn sasl_password_unused(&self) -> Option<String> {
        let key = match (&self.sasl_password_env, &self.sasl_password_file) {
            (Some(_), _) => "kafka.sasl_password_env",
            (None, Some(_)) => "kafka.sasl_password_file",
            (None, None) => return None,
        };
        let (at, protocol) = [
            ("kafka.consumer_properties", &self.consumer_properties),
            ("kafka.properties", &self.properties),
        ]
        .into_iter()
        .find_map(|(at, map)| map.get("security.protocol").map(|p| (at, p.as_str())))
        .unwrap_or(("", ""));
        if protocol.to_ascii_uppercase().starts_with("SASL_") {
            return None;
        }
        let set = match protocol {
            "" => "security.protocol is not set (plaintext)".to_string(),
            p => format!("{at}.security.protocol is \"{p}\""),
        };
        Some(format!(
            "{key}: a SASL password is set but {set}, so it would never be sent; set kafka.properties.\"security.protocol\" = \"SASL_SSL\" (or SASL_PLAINTEXT), or remove the password"
        ))
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topics: vec!["customer-events".into()],
            group_id: "nudge".into(),
            dead_letter_topic: "customer-events.dlq".into(),
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            sasl_password_env: None,
            sasl_password_file: None,
            secret_properties_env: BTreeMap::new(),
            secret_properties_file: BTreeMap::new(),
            batch_size: 1000,
            drain_timeout: Duration::from_secs(20),
            catch_up_timeout: DEFAULT_CATCH_UP,
        }
    }
}

/// `kafka.catch_up_timeout` by default: after a crash the partitions come
/// back once the group drops the dead member, after its session timeout
/// (librdkafka's default 45 s) and a rebalance, so 30 s was too short.
pub const DEFAULT_CATCH_UP: Duration = Duration::from_secs(120);

impl KafkaConfig {
    /// The consumer's `session.timeout.ms` (librdkafka's default when unset).
    pub fn session_timeout(&self) -> Duration {
        self.consumer_properties
            .get("session.timeout.ms")
            .or_else(|| self.properties.get("session.timeout.ms"))
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::from_secs(45), Duration::from_millis)
    }

    /// Whether sending may begin, after a crash, before the partitions are
    /// back: a catch-up bound (not `0s`) shorter than the session timeout.
    pub fn catch_up_shorter_than_session(&self) -> bool {
        !self.catch_up_timeout.is_zero() && self.catch_up_timeout < self.session_timeout()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of /healthz, /readyz and /metrics (always open, for probes),
    /// and of the review page and control API (behind `admin.auth`).
    pub listen: String,
    pub auth: AuthConfig,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            auth: AuthConfig::default(),
        }
    }
}

/// Where the admin server's tokens come from; never the token itself, so a
/// config file can be shared without a secret in it. A role whose token is
/// not configured is off: its endpoints answer 404.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Environment variable holding the admin token (review and control).
    pub admin_token_env: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    /// Environment variable holding the reviewer token (read-only review).
    pub reviewer_token_env: Option<String>,
    pub reviewer_token_file: Option<PathBuf>,
}

impl AuthConfig {
    /// The admin token, if one is configured.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            "admin.auth.admin_token",
            self.admin_token_env.as_deref(),
            self.admin_token_file.as_deref(),
            OWN_TOKEN_MIN_CHARS,
        )
    }

    /// The reviewer token, if one is configured.
    pub fn reviewer_token(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            "admin.auth.reviewer_token",
            self.reviewer_token_env.as_deref(),
            self.reviewer_token_file.as_deref(),
            OWN_TOKEN_MIN_CHARS,
        )
    }
}

/// Equal secrets, compared in time that depends only on their lengths.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `name` is an environment variable's name as POSIX shells take
/// it. A secret pasted where its variable's name belongs
/// is not one, and must not be echoed in "variable not found".
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The fewest different characters a token nudge checks may have: a
/// long run of one key (`aaaa…`) is long but not hard to guess.
const MIN_DISTINCT_CHARS: usize = 6;

fn distinct_chars(text: &str) -> usize {
    text.chars()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// A variable's name that reads like a token (`deadbeefcafe01234567`):
/// long, letters and digits mixed, no `_` between words. Not echoed when
/// missing, since it is most likely the secret pasted in place of its name.
fn looks_like_a_secret(name: &str) -> bool {
    name.len() >= 16
        && !name.contains('_')
        && name.chars().any(|c| c.is_ascii_digit())
        && name.chars().any(|c| c.is_ascii_alphabetic())
}

/// The shortest admin or reviewer token taken. The admin port answers
/// every try at once and does not lock anyone out (that would let anyone
/// lock the operators out): a token must be long enough not to be guessed
/// at thousands of tries a second.
pub const OWN_TOKEN_MIN_CHARS: usize = 16;

/// A token from `<key>_env` or `<key>_file`, trimmed. An empty token is
/// refused: it would let anyone in who sends an empty password, or send an
/// empty credential to a channel. Tokens nudge itself checks must have
/// `min_chars`; a channel's credential is the receiver's to choose.
fn read_secret(
    key: &str,
    env: Option<&str>,
    file: Option<&Path>,
    min_chars: usize,
) -> Result<Option<String>, ConfigError> {
    let (value, key, source_name) = if let Some(var) = env {
        let value = std::env::var(var).map_err(|e| ConfigError::Secret {
            key: format!("{key}_env"),
            source_name: match looks_like_a_secret(var) {
                true => format!(
                    "the environment variable it names ({} characters, not shown: it looks like a secret rather than a variable's name)",
                    var.len()
                ),
                false => format!("environment variable {var}"),
            },
            reason: e.to_string(),
        })?;
        (
            value,
            format!("{key}_env"),
            format!("environment variable {var}"),
        )
    } else if let Some(path) = file {
        let value = std::fs::read_to_string(path).map_err(|e| ConfigError::Secret {
            key: format!("{key}_file"),
            source_name: path.display().to_string(),
            reason: e.to_string(),
        })?;
        (value, format!("{key}_file"), path.display().to_string())
    } else {
        return Ok(None);
    };
    let value = value.trim().to_string();
    let refused = if value.is_empty() {
        Some("the token is empty".to_string())
    } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
        // A bearer token travels in an HTTP header: a space or a non-ASCII
        // letter would make a token no client can present.
        Some("the token holds a character other than visible ASCII".to_string())
    } else if value.len() < min_chars {
        Some(format!(
            "the token has {} characters; it needs at least {min_chars}, e.g. `openssl rand -hex 32`",
            value.len()
        ))
    } else if min_chars > 0 && distinct_chars(&value) < MIN_DISTINCT_CHARS {
        Some(format!(
            "the token repeats too few characters ({} different) to be hard to guess; make one with `openssl rand -hex 32`",
            distinct_chars(&value)
        ))
    } else {
        None
    };
    if let Some(reason) = refused {
        return Err(ConfigError::Secret {
            key,
            source_name,
            reason,
        });
    }
    Ok(Some(value))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `auto` (JSON unless stderr is a terminal), `json` or `text`.
    pub format: String,
    /// tracing filter, e.g. `info,nudge=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "auto".into(),
            level: "info".into(),
        }
    }
}

/// The audit stream: the dispatch log published to Kafka for a warehouse.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Topic that receives every dispatch-log record as JSON, keyed by
    /// customer id, through an outbox in the store (on the `kafka.brokers`
    /// cluster). Unset: no stream, no outbox.
    pub topic: Option<String>,
}

impl Config {
    /// Loads the file (if given) and `NUDGE_SECTION__KEY` overrides, then
    /// validates; a deprecated form that still loads is named on stderr.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Self::load_with_env(file, std::env::vars())?;
        // Once per process: a command may load its config twice.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            let unread = config.unread_overrides(std::env::vars());
            for warning in config.deprecations().into_iter().chain(unread) {
                eprintln!("nudge: config: {warning}");
            }
        });
        Ok(config)
    }

    /// Variables written like an override with one underscore where two
    /// belong (`NUDGE_STORE_PATH`): only `NUDGE_SECTION__KEY` is read, so
    /// such a setting would be ignored without a word. A variable a key of
    /// this config names as a secret's (`token_env = "NUDGE_PUSH_TOKEN"`)
    /// is not one of them.
    pub fn unread_overrides(&self, env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
        let secrets: Vec<&str> = self
            .secret_variables()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let mut found = Vec::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("NUDGE_") else {
                continue;
            };
            if rest.contains("__") || secrets.contains(&name.as_str()) {
                continue;
            }
            if let Some(key) = override_key(&rest.to_ascii_lowercase(), &value) {
                let suggested = format!("NUDGE_{}", key.replace('.', "__").to_ascii_uppercase());
                found.push(format!(
                    "{name} is not read: overrides take two underscores between levels; \
                     for {key} write {suggested}"
                ));
            }
        }
        found.sort();
        found
    }

    /// Deprecated forms in use, each with what replaces it.
    pub fn deprecations(&self) -> Vec<String> {
        let mut found = Vec::new();
        if self.policy.max_per_customer.is_some() {
            found.push(
                "policy.max_per_customer is deprecated: write policy.caps = [{ max = N, per = \"1d\" }]"
                    .to_string(),
            );
        }
        if self.policy.quiet_hours.legacy.is_some() {
            found.push(
                "policy.quiet_hours.start/end/channels are deprecated: write a table per channel, \
                 [policy.quiet_hours.push] start = \"21:00\" end = \"08:00\""
                    .to_string(),
            );
        }
        found
    }

    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        // Only `NUDGE_SECTION__KEY` are overrides, so secret variables such as
        // NUDGE_PUSH_TOKEN are never mistaken for (unknown) config keys.
        let (overrides, emptied): (config::Map<String, String>, config::Map<String, String>) = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("NUDGE_") && k.contains("__"))
            .partition(|(_, v)| !v.trim().is_empty());
        // An empty override unsets the key, the file's value too: an
        // optional key is then unset (so that `token_env` in the file can
        // give way to `token_file` from the environment), and a key that
        // needs a value is refused, naming the variable, rather than read
        // as an empty name, path or list.
        let emptied: Vec<(String, String)> = emptied
            .into_keys()
            .map(|var| {
                let key = var["NUDGE_".len()..]
                    .to_ascii_lowercase()
                    .replace("__", ".");
                (key, var)
            })
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("NUDGE")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("kafka.topics")
                .with_list_parse_key("policy.disabled_journeys")
                .with_list_parse_key("policy.disabled_channels")
                .with_list_parse_key("policy.shadow_journeys")
                .source(Some(overrides)),
        );
        for (key, _) in &emptied {
            builder = builder.set_override(
                key.as_str(),
                config::Value::new(None, config::ValueKind::Nil),
            )?;
        }
        let config: Config = builder
            .build()?
            .try_deserialize()
            .map_err(|e| emptied_needs_a_value(e, &emptied))?;
        if let Some(path) = file {
            file_types(path)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Every key that names an environment variable holding a secret, with
    /// the name it holds.
    fn secret_variables(&self) -> Vec<(String, &str)> {
        let mut found: Vec<(String, Option<&String>)> = vec![
            (
                "store.password_env".into(),
                self.store.password_env.as_ref(),
            ),
            (
                "kafka.sasl_password_env".into(),
                self.kafka.sasl_password_env.as_ref(),
            ),
            (
                "admin.auth.admin_token_env".into(),
                self.admin.auth.admin_token_env.as_ref(),
            ),
            (
                "admin.auth.reviewer_token_env".into(),
                self.admin.auth.reviewer_token_env.as_ref(),
            ),
        ];
        for (kind, ch) in &self.channels {
            found.push((format!("channels.{kind}.token_env"), ch.token_env.as_ref()));
        }
        for (property, var) in &self.kafka.secret_properties_env {
            found.push((format!("kafka.secret_properties_env.{property}"), Some(var)));
        }
        found
            .into_iter()
            .filter_map(|(key, var)| Some((key, var?.as_str())))
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.policy.calendar_problems(&mut problems);
        self.store.problems(&mut problems);
        if self.scheduler.batch_size == 0 {
            problems.push("scheduler.batch_size: must be at least 1".into());
        }
        if self.scheduler.lease < Duration::from_secs(1) {
            problems.push(
                "scheduler.lease: must be at least 1s (leases are renewed every third of it)"
                    .into(),
            );
        }
        if self.scheduler.max_attempts == 0 {
            problems.push("scheduler.max_attempts: must be at least 1".into());
        }
        if self.scheduler.retry_base > self.scheduler.retry_max {
            problems.push("scheduler.retry_base: must not exceed scheduler.retry_max".into());
        }
        if self.rules.timeout < Duration::from_millis(1)
            || self.rules.timeout > Duration::from_secs(60)
        {
            problems.push(
                "rules.timeout: must be between 1ms and 60s (an evaluation holds up its batch)"
                    .into(),
            );
        }
        if self.rules.max_operations == 0 {
            problems.push(
                "rules.max_operations: must be at least 1 (the sandbox reads 0 as no limit)".into(),
            );
        }
        if self.kafka.batch_size == 0 {
            problems.push("kafka.batch_size: must be at least 1".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            problems.push(format!(
                "log.level: `{}` is not a filter like `info` or `info,nudge=debug`: {e}",
                self.log.level
            ));
        }
        if !crate::context::is_region(&self.policy.default_region) {
            problems.push(format!(
                "policy.default_region: `{}` is not a region like AU or AU-VIC (ISO 3166)",
                self.policy.default_region
            ));
        }
        for (role, env, file) in [
            (
                "admin_token",
                &self.admin.auth.admin_token_env,
                &self.admin.auth.admin_token_file,
            ),
            (
                "reviewer_token",
                &self.admin.auth.reviewer_token_env,
                &self.admin.auth.reviewer_token_file,
            ),
        ] {
            if env.is_some() && file.is_some() {
                problems.push(format!(
                    "admin.auth.{role}_env: set {role}_env or {role}_file, not both"
                ));
            }
        }
        for (kind, ch) in &self.channels {
            match reqwest::Url::parse(&ch.url) {
                Ok(url) if url.scheme() == "http" || url.scheme() == "https" => {}
                _ => problems.push(format!(
                    "channels.{kind}.url: `{}` is not an http(s) URL",
                    ch.url
                )),
            }
            if ch.concurrency == 0 {
                problems.push(format!("channels.{kind}.concurrency: must be at least 1"));
            }
            if ch.token_env.is_some() && ch.token_file.is_some() {
                problems.push(format!(
                    "channels.{kind}.token_env: set token_env or token_file, not both"
                ));
            }
        }
        for key in self
            .kafka
            .properties
            .keys()
            .chain(self.kafka.consumer_properties.keys())
        {
            if is_secret_property(key) {
                problems.push(format!(
                    "kafka properties `{key}`: secrets must not be in the config file; use kafka.sasl_password_env/_file or kafka.secret_properties_env/_file"
                ));
            }
        }
        for key in self
            .kafka
            .properties
            .keys()
            .chain(self.kafka.consumer_properties.keys())
        {
            if [
                "enable.auto.commit",
                "enable.auto.offset.store",
                "group.id",
                "bootstrap.servers",
            ]
            .contains(&key.as_str())
            {
                problems.push(format!(
                    "kafka properties `{key}`: set by nudge (offsets are committed only after the store commits); use kafka.brokers / kafka.group_id"
                ));
            }
        }
        if self.kafka.sasl_password_env.is_some() && self.kafka.sasl_password_file.is_some() {
            problems.push(
                "kafka.sasl_password_env: set sasl_password_env or sasl_password_file, not both"
                    .into(),
            );
        }
        if let Some(problem) = self.kafka.sasl_password_unused() {
            problems.push(problem);
        }
        for key in self.kafka.secret_properties_env.keys() {
            if self.kafka.secret_properties_file.contains_key(key) {
                problems.push(format!("kafka.secret_properties_env.{key}: also in kafka.secret_properties_file; set one"));
            }
        }
        if self.kafka.topics.is_empty() {
            problems.push("kafka.topics: name at least one topic".into());
        }
        for (key, var) in self.secret_variables() {
            if !is_variable_name(var) {
                problems.push(format!(
                    "{key}: must name an environment variable (letters, digits and `_`, not starting with a digit); what is there is not a name and is not shown: if it is the secret itself, put it in the environment and its name here"
                ));
            }
        }
        if !["auto", "json", "text"].contains(&self.log.format.as_str()) {
            problems.push(format!(
                "log.format: `{}` is not one of auto, json, text",
                self.log.format
            ));
        }
        if self.admin.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "admin.listen: `{}` is not an address like 127.0.0.1:9464",
                self.admin.listen
            ));
        }
        if let Some(topic) = &self.audit.topic {
            if topic.trim().is_empty() || self.kafka.topics.contains(topic) {
                problems.push(format!(
                    "audit.topic: `{topic}` must be a topic name other than the input topics"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// A local wall-clock time, minute precision ("HH:MM" in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay {
    minutes: u32,
}

impl TimeOfDay {
    /// Panics unless `hour < 24` and `minute < 60` (for constants).
    pub const fn new(hour: u32, minute: u32) -> Self {
        assert!(hour < 24 && minute < 60);
        Self {
            minutes: hour * 60 + minute,
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (h, m) = text.split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60 && text.len() == 5).then(|| Self::new(h, m))
    }

    /// Minutes after midnight.
    pub fn minutes(self) -> u32 {
        self.minutes
    }
}

impl std::fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}", self.minutes / 60, self.minutes % 60)
    }
}

fn timezone<'de, D: Deserializer<'de>>(d: D) -> Result<Tz, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{text}` is not an IANA time zone like Australia/Sydney"
        ))
    })
}

/// Longest duration accepted anywhere in the config, so that every one of
/// them converts to a date offset without overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Durations as text: "30s", "5m", "1d", "1h 30m"; at most 100 years.
/// A librdkafka property's value as a file or an override may write it.
#[derive(Deserialize)]
#[serde(untagged)]
enum PropertyValue {
    Text(String),
    Whole(i64),
    Number(f64),
    Flag(bool),
    /// Dots in a name nest: TOML reads `security.protocol = "SSL"` (unquoted)
    /// as a table, and so does an override
    /// `NUDGE_KAFKA__PROPERTIES__security.protocol`.
    Nested(BTreeMap<String, PropertyValue>),
}

impl PropertyValue {
    fn flatten_into<T: From<String>>(self, name: String, out: &mut BTreeMap<String, T>) {
        let text = match self {
            PropertyValue::Text(t) => t,
            PropertyValue::Whole(n) => n.to_string(),
            PropertyValue::Number(n) => n.to_string(),
            PropertyValue::Flag(b) => b.to_string(),
            PropertyValue::Nested(inner) => {
                for (part, value) in inner {
                    value.flatten_into(format!("{name}.{part}"), out);
                }
                return;
            }
        };
        out.insert(name, T::from(text));
    }
}

/// librdkafka properties that hold a credential: any `*password*` or
/// `*secret*`, a private key given inline, and the OAUTHBEARER config
/// (`clientSecret=…`). Read from `kafka.secret_properties_env`/`_file`.
fn is_secret_property(name: &str) -> bool {
    name.contains("password")
        || name.contains("secret")
        || ["ssl.key.pem", "ssl_key", "sasl.oauthbearer.config"].contains(&name)
}

/// The file's values with the types they were written in. The loader
/// converts a value to its key's type where it can (`"2"` to a number,
/// `10.7` to a whole one, `"yes"` to a flag), which overrides need, being
/// text, but which in a file hides a mistake: there a value of the wrong
/// type is refused, naming its line.
fn file_types(path: &Path) -> Result<(), ConfigError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        // The loader read it a moment ago; it says why when it cannot.
        return Ok(());
    };
    let Err(e) = toml::from_str::<Config>(&text) else {
        return Ok(());
    };
    let at = e.span().map(|span| {
        let line = text[..span.start].matches('\n').count() + 1;
        let written = text.lines().nth(line - 1).unwrap_or_default().trim();
        format!(" line {line}, `{written}`:")
    });
    Err(ConfigError::Load(format!(
        "{}:{} {}",
        path.display(),
        at.unwrap_or_default(),
        e.message().trim_end()
    )))
}

/// A map of librdkafka property names, however their dots were written:
/// quoted (`"security.protocol"`), nested, or from the environment.
fn dotted_names<'de, D, T>(d: D) -> Result<BTreeMap<String, T>, D::Error>
where
    D: Deserializer<'de>,
    T: From<String>,
{
    let nested = BTreeMap::<String, PropertyValue>::deserialize(d)?;
    let mut out = BTreeMap::new();
    for (name, value) in nested {
        value.flatten_into(name, &mut out);
    }
    Ok(out)
}

pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// A config duration (`30s`, `5m`, `1d`), the error quoting the text as written.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let value = crate::humanize::parse_span(text)
        .map_err(|e| format!("`{text}` is not a duration: {e}"))?;
    if value > MAX_DURATION {
        return Err(format!("`{text}` is longer than 100 years"));
    }
    Ok(value)
}

// PostgreSQL URLs: parsed here, once, so a bad `store.url` stops start-up
// naming the key, and the store connects with what was checked.

/// A store URL fit for a message: a password in it (`user:secret@`,
/// `password=…`) shown as `***`, whatever else is wrong with the URL.
pub fn shown_url(url: &str) -> String {
    let mut shown = url.to_string();
    // user:password@ in the authority.
    if let Some(scheme_end) = shown.find("://") {
        let start = scheme_end + 3;
        let authority_end = shown[start..]
            .find(['/', '?'])
            .map_or(shown.len(), |i| start + i);
        if let Some(at) = shown[start..authority_end].rfind('@') {
            if let Some(colon) = shown[start..start + at].find(':') {
                shown.replace_range(start + colon + 1..start + at, "***");
            }
        }
    }
    // password=… as a query pair or a key=value setting.
    let lower = shown.to_ascii_lowercase();
    let mut out = String::with_capacity(shown.len());
    let mut rest = 0;
    for (i, _) in lower.match_indices("password=") {
        if i < rest {
            continue;
        }
        let value = i + "password=".len();
        let end = shown[value..]
            .find(['&', ' '])
            .map_or(shown.len(), |e| value + e);
        out.push_str(&shown[rest..value]);
        out.push_str("***");
        rest = end;
    }
    out.push_str(&shown[rest..]);
    hide_encoded_password_pairs(&out)
}

/// A query pair whose key spells `password` with escapes (`%70assword=…`):
/// the client decodes the key, so the value is a password too.
fn hide_encoded_password_pairs(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if percent_decoded(key)
                    .to_ascii_lowercase()
                    .contains("password") =>
            {
                format!("{key}=***")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

/// `%XX` escapes decoded (a malformed one kept as written).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How far the server's certificate is checked (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, unchecked (libpq's default).
    Prefer,
    /// TLS, unchecked unless `store.ca_file` is set (then as `VerifyCa`).
    Require,
    /// TLS; the chain is checked against the system trust store and `store.ca_file`.
    VerifyCa,
    /// `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

/// Parses a `postgres://` URL: the client's configuration and the TLS mode
/// (taken out of the URL: the client itself knows only disable, prefer and
/// require). A password in the URL is refused: it would sit in the config
/// file and in the environment of every process that reads it.
pub fn parse_postgres_url(url: &str) -> Result<(postgres::Config, SslMode), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = SslMode::Prefer;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("sslmode=") {
            Some(value) => {
                mode = match value {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                        "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
                    ))
                    }
                }
            }
            None => kept.push(pair),
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    let mut config: postgres::Config = rest
        .parse()
        .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
    if config.get_password().is_some() {
        return Err(
            "has a password: put it in the environment variable named by store.password_env or the file named by store.password_file".into(),
        );
    }
    if config.get_hosts().is_empty() {
        return Err("names no host: postgres://USER@HOST:PORT/DATABASE".into());
    }
    config.ssl_mode(match mode {
        SslMode::Disable => postgres::config::SslMode::Disable,
        SslMode::Prefer => postgres::config::SslMode::Prefer,
        _ => postgres::config::SslMode::Require,
    });
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok((config, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nudge.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load_with_env(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    /// The loader would read `"2"` as 2, `10.7` as 10 and `"no"` as false;
    /// in a file each is a mistake, refused with its line. Overrides are
    /// text and keep being converted.
    #[test]
    fn a_value_of_the_wrong_type_in_the_file_is_refused_naming_its_line() {
        for (toml, says) in [
            (
                "[store]\ncache_mb = \"2\"\n",
                "line 2, `cache_mb = \"2\"`: invalid type: string \"2\", expected u32",
            ),
            (
                "[kafka]\nbatch_size = 10.7\n",
                "line 2, `batch_size = 10.7`: invalid type: floating point `10.7`",
            ),
            (
                "[kafka]\ntopics = [\"a\", 5]\n",
                "line 2, `topics = [\"a\", 5]`: invalid type: integer `5`",
            ),
            (
                "# rules\n[rules]\nwatch = \"yes\"\n",
                "line 3, `watch = \"yes\"`: invalid type: string \"yes\", expected a boolean",
            ),
        ] {
            let err = load(toml, &[]).unwrap_err().to_string();
            assert!(
                err.contains("nudge.toml: ") && err.contains(says),
                "{toml}: {err}"
            );
        }
        let c = load(
            "[store]\ncache_mb = 4\n[kafka.properties]\n\"session.timeout.ms\" = 10000\n",
            &[
                ("NUDGE_SCHEDULER__MAX_ATTEMPTS", "3"),
                ("NUDGE_RULES__WATCH", "false"),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.store.cache_mb, c.scheduler.max_attempts, c.rules.watch),
            (4, 3, false)
        );
        assert_eq!(c.kafka.properties["session.timeout.ms"], "10000");
    }

    /// A pasted secret that happens to be a valid name is not echoed as
    /// the variable "not found"; a conventional name is.
    #[test]
    fn a_missing_variable_that_looks_like_a_secret_is_not_echoed() {
        let c = load(
            "[admin.auth]\nadmin_token_env = \"deadbeefcafe0123456789ab\"\n",
            &[],
        )
        .unwrap();
        let err = c.admin.auth.admin_token().unwrap_err().to_string();
        assert!(err.contains("24 characters, not shown"), "{err}");
        assert!(!err.contains("deadbeef"), "{err}");
        let c = load(
            "[admin.auth]\nadmin_token_env = \"NUDGE_TEST_ABSENT_TOKEN\"\n",
            &[],
        )
        .unwrap();
        let err = c.admin.auth.admin_token().unwrap_err().to_string();
        assert!(
            err.contains("environment variable NUDGE_TEST_ABSENT_TOKEN"),
            "{err}"
        );
    }

    /// A secret pasted where the name of its variable belongs is refused
    /// at start without being echoed (it was printed as a variable "not
    /// found"); a real variable's name is accepted.
    #[test]
    fn a_secret_in_place_of_its_variable_name_is_refused_unshown() {
        for (toml, key) in [
            (
                "[channels.email]\nurl = \"http://127.0.0.1:1/e\"\ntoken_env = \"9f8e/Zq+tok=\"\n",
                "channels.email.token_env",
            ),
            (
                "[admin.auth]\nadmin_token_env = \"hunter2 hunter2\"\n",
                "admin.auth.admin_token_env",
            ),
            (
                "[store]\nurl = \"postgres://nudge@db/nudge\"\npassword_env = \"pa$$word\"\n",
                "store.password_env",
            ),
            (
                "[kafka.secret_properties_env]\n\"ssl.key.password\" = \"0secret\"\n",
                "kafka.secret_properties_env.ssl.key.password",
            ),
        ] {
            let err = load(toml, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            assert!(err.contains("must name an environment variable"), "{err}");
            for secret in ["9f8e", "hunter2", "pa$$", "0secret"] {
                assert!(!err.contains(secret), "{err}");
            }
        }
        let config = load(
            "[channels.email]\nurl = \"http://127.0.0.1:1/e\"\ntoken_env = \"EMAIL_TOKEN_2\"\n",
            &[],
        );
        assert!(config.is_ok(), "{config:?}");
    }

    /// Values that used to be taken and then misread are refused at load,
    /// naming the key: 0 operations (no limit at all), a log filter with
    /// bad directives (dropped with a warning), a default region that is
    /// no region, an admin token in two places (the file was ignored).
    #[test]
    fn values_that_were_misread_are_refused_naming_the_key() {
        for (toml, key) in [
            (
                "[rules]\nmax_operations = 0\n",
                "rules.max_operations: must be at least 1",
            ),
            (
                "[log]\nlevel = \"info,,==\"\n",
                "log.level: `info,,==` is not a filter",
            ),
            (
                "[policy]\ndefault_region = \"Narnia!\"\n",
                "policy.default_region: `Narnia!`",
            ),
            (
                "[admin.auth]\nadmin_token_env = \"T\"\nadmin_token_file = \"/t\"\n",
                "admin.auth.admin_token_env: set admin_token_env or admin_token_file, not both",
            ),
            (
                "[admin.auth]\nreviewer_token_env = \"T\"\nreviewer_token_file = \"/t\"\n",
                "admin.auth.reviewer_token_env: set reviewer_token_env",
            ),
        ] {
            let err = load(toml, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{key} in {err}");
        }
        for toml in [
            "[log]\nlevel = \"info,nudge=debug\"\n",
            "[policy]\ndefault_region = \"AU-VIC\"\n",
            "[rules]\nmax_operations = 1\n",
        ] {
            assert!(load(toml, &[]).is_ok(), "{toml}");
        }
    }

    /// An override of the wrong shape is refused without quoting its value,
    /// which may be a secret.
    #[test]
    fn a_malformed_kafka_property_override_is_not_echoed() {
        let err = load(
            "",
            &[("NUDGE_KAFKA__PROPERTIES", "sasl.password=EnvKafkaPw")],
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("EnvKafkaPw"), "{err}");
        assert!(err.contains("kafka.properties"), "{err}");
        assert!(err.contains("not shown"), "{err}");
    }

    /// A channel's token is read like the admin's: trimmed, and refused when
    /// empty or when it could not travel in a header, naming the key.
    #[test]
    fn a_channel_token_that_is_empty_or_not_visible_ascii_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = |text: &str| {
            let path = dir.path().join("token");
            std::fs::write(&path, text).unwrap();
            let config = load(
                &format!(
                    "[channels.email]\nurl = \"http://127.0.0.1:1/e\"\ntoken_file = {:?}\n",
                    path
                ),
                &[],
            )
            .unwrap();
            config.channels[&ChannelKind::Email]
                .token(ChannelKind::Email)
                .map_err(|e| e.to_string())
        };
        assert_eq!(token("s3cret\n"), Ok(Some("s3cret".into())));
        let empty = token("\n").unwrap_err();
        assert!(
            empty.contains("channels.email.token_file") && empty.contains("the token is empty"),
            "{empty}"
        );
        let accented = token("pässwörd").unwrap_err();
        assert!(accented.contains("other than visible ASCII"), "{accented}");
        assert!(!accented.contains("pässwörd"), "{accented}");
    }

    /// nudge's own tokens guard a port that answers every try at once: one
    /// short enough to guess is refused, naming the key and not the token;
    /// a channel's credential of any length is the receiver's choice.
    #[test]
    fn an_admin_or_reviewer_token_too_short_to_resist_guessing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let auth = |role: &str, text: &str| {
            let path = dir.path().join(role);
            std::fs::write(&path, text).unwrap();
            let config = load(&format!("[admin.auth]\n{role}_file = {path:?}\n"), &[]).unwrap();
            let token = match role {
                "admin_token" => config.admin.auth.admin_token(),
                _ => config.admin.auth.reviewer_token(),
            };
            token.map_err(|e| e.to_string())
        };
        let short = auth("admin_token", "adm1n-s3cret\n").unwrap_err();
        assert!(
            short.contains("admin.auth.admin_token_file")
                && short.contains("the token has 12 characters; it needs at least 16"),
            "{short}"
        );
        assert!(!short.contains("adm1n-s3cret"), "{short}");
        let short = auth("reviewer_token", "0123456789abcde").unwrap_err();
        assert!(short.contains("admin.auth.reviewer_token_file"), "{short}");
        assert_eq!(
            auth("reviewer_token", "0123456789abcdef"),
            Ok(Some("0123456789abcdef".into()))
        );
        // Long, but one key held down.
        let repeated = auth("admin_token", &"a".repeat(20)).unwrap_err();
        assert!(
            repeated.contains("repeats too few characters (1 different)"),
            "{repeated}"
        );
        assert!(auth("admin_token", &"ab12cd".repeat(3)).is_ok());
    }

    /// The catch-up bound outlasts the consumer's session by default, so a
    /// restart after a crash reads what waited before sending; a bound set
    /// shorter than the session is what the daemon warns about.
    #[test]
    fn the_catch_up_bound_is_compared_with_the_session_timeout() {
        let kafka = |toml: &str| load(toml, &[]).unwrap().kafka;
        let default = kafka("");
        assert_eq!(default.session_timeout(), Duration::from_secs(45));
        assert!(!default.catch_up_shorter_than_session());
        assert!(kafka("[kafka]\ncatch_up_timeout = \"30s\"\n").catch_up_shorter_than_session());
        let quick = kafka(
            "[kafka]\ncatch_up_timeout = \"30s\"\n[kafka.properties]\n\"session.timeout.ms\" = \"10000\"\n",
        );
        assert_eq!(quick.session_timeout(), Duration::from_secs(10));
        assert!(!quick.catch_up_shorter_than_session());
        assert!(!kafka("[kafka]\ncatch_up_timeout = \"0s\"\n").catch_up_shorter_than_session());
    }

    #[test]
    fn calendar_policy_keys_load_and_old_forms_keep_working() {
        let c = load(
            "[policy]\ncaps = [{ category = \"marketing\", max = 1, per = \"1d\" }, { channel = \"call_task\", max = 1, per = \"7d\" }]\nfatigue = { after = 3, pause = \"30d\" }\n[policy.quiet_hours.email]\nstart = \"20:00\"\nend = \"09:00\"\n[policy.business_hours.call_task]\ndays = [\"mon\", \"sat\"]\nstart = \"10:00\"\nend = \"14:00\"\n",
            &[],
        )
        .unwrap();
        let caps = c.policy.effective_caps();
        assert_eq!(caps.len(), 2);
        assert_eq!(
            (caps[0].what(), caps[0].max, caps[0].per),
            ("marketing".into(), 1, 1)
        );
        assert_eq!((caps[1].what(), caps[1].per), ("call_task".into(), 7));
        assert_eq!(c.policy.fatigue.unwrap().after, 3);
        assert_eq!(
            c.policy
                .quiet_hours
                .window(ChannelKind::Email)
                .unwrap()
                .to_string(),
            "20:00-09:00"
        );
        assert_eq!(
            c.policy.quiet_hours.window(ChannelKind::Push),
            None,
            "a table per channel"
        );
        let hours = &c.policy.business_hours.0[&ChannelKind::CallTask];
        assert_eq!(hours.describe(), "Mon,Sat 10:00-14:00");
        // The deprecated single cap: one cap on everything, in calendar days.
        let old = load(
            "[policy]\nmax_per_customer = 2\ncap_window = \"36h\"\n",
            &[],
        )
        .unwrap();
        let caps = old.policy.effective_caps();
        assert_eq!(
            (caps[0].what(), caps[0].max, caps[0].per),
            ("messages".into(), 2, 2)
        );
        assert_eq!(old.deprecations().len(), 1, "{:?}", old.deprecations());
        assert!(old.deprecations()[0].contains("policy.caps"));
        assert!(c.deprecations().is_empty());
        assert!(load("[policy]\nmax_per_customer = 0\n", &[])
            .unwrap()
            .policy
            .effective_caps()
            .is_empty());
        assert!(load("[policy]\ncaps = []\n", &[])
            .unwrap()
            .policy
            .effective_caps()
            .is_empty());
        for (toml, says) in [
            ("[policy]\nmax_per_customer = 2\ncaps = []\n", "policy.caps"),
            (
                "[policy]\ncaps = [{ max = 1, per = \"36h\" }]\n",
                "whole number of days",
            ),
            (
                "[policy]\ncaps = [{ max = 1, per = \"1d\" }, { category = \"marketing\", max = 0, per = \"1d\" }]\n",
                "policy.caps[1].max: must be at least 1",
            ),
            (
                "[policy]\ncaps = [{ max = 1, per = \"1d\", kind = \"x\" }]\n",
                "kind",
            ),
            (
                "[policy.quiet_hours.fax]\nstart = \"20:00\"\nend = \"09:00\"\n",
                "policy.quiet_hours.fax",
            ),
            (
                "[policy.quiet_hours.email]\nstart = \"20:00\"\n",
                "policy.quiet_hours.email.start",
            ),
            (
                "[policy.business_hours.call_task]\ndays = [\"someday\"]\n",
                "policy.business_hours.call_task.days",
            ),
            (
                "[policy.business_hours.call_task]\nstart = \"17:00\"\nend = \"09:00\"\n",
                "policy.business_hours.call_task.end",
            ),
            (
                "[policy]\nholidays = \"/nonexistent/h.toml\"\n",
                "policy.holidays",
            ),
            ("[policy]\nfatigue = { after = 3 }\n", "pause"),
        ] {
            let err = load(toml, &[]).unwrap_err().to_string();
            assert!(err.contains(says), "{toml}: {err}");
        }
    }

    #[test]
    fn the_deploy_examples_load() {
        for file in [
            "nudge.example.toml",
            "nudge.local.toml",
            "nudge.container.toml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy")
                .join(file);
            let loaded = Config::load_with_env(Some(&path), std::iter::empty::<(String, String)>());
            if let Err(e) = &loaded {
                // Secrets named by the examples may be absent here; the
                // policy keys are what this checks.
                assert!(!e.to_string().contains("policy."), "{file}: {e}");
            }
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.scheduler.max_attempts, 10);
        let push = c.policy.quiet_hours.window(ChannelKind::Push).unwrap();
        assert_eq!(push.start, TimeOfDay::new(21, 0));
        assert_eq!(c.policy.quiet_hours.window(ChannelKind::Email), None);
        assert_eq!(c.policy.effective_caps().len(), 1, "4 a day by default");
        assert_eq!(c.policy.default_timezone, chrono_tz::Australia::Sydney);
    }

    #[test]
    fn arbitration_window_defaults_to_ten_minutes_and_loads_from_the_example() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.policy.arbitration.window, Duration::from_secs(600));
        let c = load("[policy.arbitration]\nwindow = \"5m\"\n", &[]).unwrap();
        assert_eq!(c.policy.arbitration.window, Duration::from_secs(300));
        let err = load("[policy.arbitration]\nwindwo = \"5m\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("windwo"), "{err}");
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nudge.example.toml");
        let c = Config::load_with_env(Some(&example), std::iter::empty()).unwrap();
        assert_eq!(c.policy.arbitration.window, Duration::from_secs(600));
    }

    /// `policy.propensity`: defaults (5 % prior, 5 s), read from the
    /// example, and bad values refused naming their key, with a zero
    /// `policy.attribution_window`.
    #[test]
    fn propensity_prior_and_refresh_are_read_and_checked() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.policy.propensity.prior, Prior { a: 1.0, b: 19.0 });
        assert_eq!(c.policy.propensity.refresh, Duration::from_secs(5));
        let c = load(
            "[policy.propensity]\nprior = { a = 2, b = 8.5 }\nrefresh = \"1m\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.policy.propensity.prior, Prior { a: 2.0, b: 8.5 });
        assert_eq!(c.policy.propensity.refresh, Duration::from_secs(60));
        let err = load(
            "[policy]\nattribution_window = \"0s\"\n[policy.propensity]\nprior = { a = 0, b = -1 }\nrefresh = \"0s\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        for key in [
            "policy.propensity.prior.a: must be a number above 0",
            "policy.propensity.prior.b: must be a number above 0",
            "policy.propensity.refresh: must be at least 100ms",
            "policy.attribution_window: must be longer than 0s",
        ] {
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = load("[policy.propensity]\nprio = { a = 1, b = 1 }\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("prio"), "{err}");
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nudge.example.toml");
        let c = Config::load_with_env(Some(&example), std::iter::empty()).unwrap();
        assert_eq!(c.policy.propensity.prior, Prior { a: 1.0, b: 19.0 });
        assert_eq!(c.policy.propensity.refresh, Duration::from_secs(5));
    }

    #[test]
    fn rules_timeout_is_a_human_duration_within_bounds() {
        assert_eq!(
            load("", &[]).unwrap().rules.timeout,
            Duration::from_millis(100)
        );
        let c = load("[rules]\ntimeout = \"250ms\"\n", &[]).unwrap();
        assert_eq!(c.rules.timeout, Duration::from_millis(250));
        let c = load("", &[("NUDGE_RULES__TIMEOUT", "2s")]).unwrap();
        assert_eq!(c.rules.timeout, Duration::from_secs(2));
        for bad in ["0s", "5m"] {
            let err = load(&format!("[rules]\ntimeout = \"{bad}\"\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("rules.timeout: must be between"),
                "{bad}: {err}"
            );
        }
        let err = load("[rules]\ntimeout = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon") && err.contains("timeout"), "{err}");
    }

    /// `channels.<kind>.rate` and `withdraw`: read, defaulted (withdraw on
    /// for call tasks only), a bad rate refused naming its key; the
    /// shipped example loads with them.
    #[test]
    fn channel_rate_and_withdraw_are_read_and_defaulted() {
        let config = load(
            "[channels.push]\nurl = \"http://x\"\nrate = \"200/s\"\nwithdraw = true\n[channels.call_task]\nurl = \"http://y\"\n",
            &[],
        )
        .unwrap();
        let push = &config.channels[&ChannelKind::Push];
        assert_eq!(push.rate, Some("200/s".parse().unwrap()));
        assert_eq!(
            withdraw_channels(&config.channels),
            [ChannelKind::Push, ChannelKind::CallTask]
        );
        assert_eq!(withdraw_channels(&BTreeMap::new()), [ChannelKind::CallTask]);
        let err = load(
            "[channels.push]\nurl = \"http://x\"\nrate = \"fast\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("rate") && err.contains("not a rate"), "{err}");
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nudge.example.toml");
        let text = std::fs::read_to_string(example).unwrap();
        let config = load(&text, &[]).unwrap();
        assert_eq!(withdraw_channels(&config.channels), [ChannelKind::CallTask]);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = load("[store]\npth = \"x.db\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("pth"), "{err}");
    }

    #[test]
    fn bad_values_are_reported_together_with_their_keys() {
        let err = load(
            "[store]\ncache_mb = 0\n[policy.quiet_hours]\nstart = \"22:00\"\nend = \"\"\n[channels.push]\nurl = \"ftp://x\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("policy.quiet_hours.start"), "{err}");
        assert!(err.contains("channels.push.url"), "{err}");
        assert!(err.contains("store.cache_mb"), "{err}");
    }

    #[test]
    fn times_and_zones_are_parsed_at_load_and_named_when_bad() {
        let c = load(
            "[policy]\ndefault_timezone = \"Australia/Perth\"\n[policy.quiet_hours]\nstart = \"20:30\"\nend = \"07:05\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.policy.default_timezone, chrono_tz::Australia::Perth);
        let push = c.policy.quiet_hours.window(ChannelKind::Push).unwrap();
        assert_eq!(push.start.minutes(), 20 * 60 + 30);
        assert_eq!(push.end.to_string(), "07:05");
        let off = load("[policy.quiet_hours]\nstart = \"\"\nend = \"\"\n", &[]).unwrap();
        assert_eq!(off.policy.quiet_hours.window(ChannelKind::Push), None);
        for (toml, key, value) in [
            (
                "[policy]\ndefault_timezone = \"Mars/Olympus\"\n",
                "default_timezone",
                "Mars/Olympus",
            ),
            (
                "[policy.quiet_hours]\nstart = \"25:00\"\n",
                "start",
                "25:00",
            ),
            ("[policy.quiet_hours]\nend = \"9:5\"\n", "end", "9:5"),
            (
                "[store]\nretention = \"1000years\"\n",
                "retention",
                "1000years",
            ),
        ] {
            let err = load(toml, &[]).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(value), "{toml}: {err}");
        }
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = load("[scheduler]\nlease = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lease"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file_and_ignores_secret_variables() {
        let c = load(
            "[store]\npath = \"a.db\"\n",
            &[
                ("NUDGE_STORE__PATH", "b.db"),
                ("NUDGE_KAFKA__TOPICS", "a,b"),
                ("NUDGE_PUSH_TOKEN", "s3cret"),
            ],
        )
        .unwrap();
        assert_eq!(c.store.path, PathBuf::from("b.db"));
        assert_eq!(c.kafka.topics, vec!["a".to_string(), "b".to_string()]);
    }

    /// An empty variable unsets its key, the file's value too: an
    /// optional key gives way (a token file from the environment replaces
    /// the file's token variable), a key that needs a value is refused
    /// naming the variable (it was read as an empty broker list, path or
    /// topic and failed later, or never).
    #[test]
    fn an_empty_override_unsets_its_key_or_is_refused_naming_it() {
        let file = "[channels.push]\nurl = \"http://127.0.0.1:1/push\"\ntoken_env = \"X_TOKEN\"\n\
                    [store]\nurl = \"postgres://db/nudge\"\n";
        let c = load(
            file,
            &[
                ("NUDGE_CHANNELS__PUSH__TOKEN_ENV", ""),
                ("NUDGE_CHANNELS__PUSH__TOKEN_FILE", "/run/secrets/push"),
                ("NUDGE_STORE__URL", " "),
            ],
        )
        .unwrap();
        let push = &c.channels[&ChannelKind::Push];
        assert_eq!(push.token_env, None);
        assert_eq!(push.token_file, Some(PathBuf::from("/run/secrets/push")));
        assert_eq!(c.store.url, None, "the file's URL unset");
        for (var, key) in [
            ("NUDGE_KAFKA__BROKERS", "kafka.brokers"),
            ("NUDGE_KAFKA__TOPICS", "kafka.topics"),
            ("NUDGE_KAFKA__GROUP_ID", "kafka.group_id"),
            ("NUDGE_KAFKA__DEAD_LETTER_TOPIC", "kafka.dead_letter_topic"),
            ("NUDGE_STORE__PATH", "store.path"),
            ("NUDGE_RULES__DIR", "rules.dir"),
            ("NUDGE_CHANNELS__PUSH__URL", "channels.push.url"),
        ] {
            let err = load(file, &[(var, "")]).unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "{key}: {var} is empty, and this key needs a value"
                )),
                "{var}: {err}"
            );
        }
    }

    /// librdkafka's names hold dots: quoted, unquoted (TOML nests them) or
    /// from the environment, they reach librdkafka as written.
    #[test]
    fn kafka_property_names_keep_their_dots_however_written() {
        let c = load(
            "[kafka.properties]\n\"socket.timeout.ms\" = 10000\nsecurity.protocol = \"SSL\"\n\
             [kafka.consumer_properties]\nsession.timeout.ms = 6000\n",
            &[("NUDGE_KAFKA__PROPERTIES__ssl.ca.location", "/etc/ca.pem")],
        )
        .unwrap();
        let names: Vec<(&str, &str)> = c
            .kafka
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("security.protocol", "SSL"),
                ("socket.timeout.ms", "10000"),
                ("ssl.ca.location", "/etc/ca.pem"),
            ]
        );
        assert_eq!(
            c.kafka
                .consumer_properties
                .get("session.timeout.ms")
                .map(String::as_str),
            Some("6000")
        );
    }

    #[test]
    fn an_override_with_one_underscore_is_named_with_the_spelling_that_works() {
        let c = load(
            "[channels.push]\nurl = \"http://127.0.0.1:1/\"\ntoken_env = \"NUDGE_PUSH_TOKEN\"\n",
            &[],
        )
        .unwrap();
        let warnings = c.unread_overrides(
            [
                ("NUDGE_STORE_PATH", "b.db"),
                ("NUDGE_STORE_PASSWORD_ENV", "PGPASS"),
                ("NUDGE_CHANNELS_PUSH_URL", "http://x"),
                ("NUDGE_LOG_FORMAT", "xml"),
                ("NUDGE_SCHEDULER_BATCH_SIZE", "64"),
                ("NUDGE_POLICY_BUSINESS_HOURS_CALL_TASK_START", "08:00"),
                // Not overrides: the CLI's token, a secret this config
                // names, a proper override, a word that is no key.
                ("NUDGE_ADMIN_TOKEN", "t"),
                ("NUDGE_PUSH_TOKEN", "s3cret"),
                ("NUDGE_STORE__PATH", "c.db"),
                ("NUDGE_STORE_COLOUR", "blue"),
                ("HOME", "/root"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let expect = [
            ("NUDGE_CHANNELS_PUSH_URL", "NUDGE_CHANNELS__PUSH__URL"),
            ("NUDGE_LOG_FORMAT", "NUDGE_LOG__FORMAT"),
            (
                "NUDGE_POLICY_BUSINESS_HOURS_CALL_TASK_START",
                "NUDGE_POLICY__BUSINESS_HOURS__CALL_TASK__START",
            ),
            ("NUDGE_SCHEDULER_BATCH_SIZE", "NUDGE_SCHEDULER__BATCH_SIZE"),
            ("NUDGE_STORE_PASSWORD_ENV", "NUDGE_STORE__PASSWORD_ENV"),
            ("NUDGE_STORE_PATH", "NUDGE_STORE__PATH"),
        ];
        assert_eq!(warnings.len(), expect.len(), "{warnings:#?}");
        for ((name, suggested), warning) in expect.iter().zip(&warnings) {
            assert!(
                warning.starts_with(name) && warning.ends_with(suggested),
                "{warning}"
            );
        }
        // The value is never shown: it may be a secret.
        assert!(!warnings
            .iter()
            .any(|w| w.contains("b.db") || w.contains("http://x")));
    }

    #[test]
    fn the_store_url_picks_the_backend_and_path_keeps_working() {
        let c = load("[store]\npath = \"a.db\"\n", &[]).unwrap();
        assert_eq!(c.store.target(), Ok(StoreUrl::Sqlite("a.db".into())));
        let c = load("[store]\nurl = \"sqlite:///var/lib/nudge/nudge.db\"\n", &[]).unwrap();
        assert_eq!(
            c.store.target(),
            Ok(StoreUrl::Sqlite("/var/lib/nudge/nudge.db".into()))
        );
        let url = "postgres://nudge@db:5432/nudge?sslmode=verify-full";
        let c = load(
            "[store]\npassword_env = \"PGPASS\"\npool_size = 4\n",
            &[("NUDGE_STORE__URL", url), ("PGPASS", "s3cret")],
        )
        .unwrap();
        assert_eq!(c.store.target(), Ok(StoreUrl::Postgres(url.into())));
        assert_eq!(c.store.pool_size, 4);
        assert_eq!(c.store.describe(), url);
        std::env::set_var("NUDGE_TEST_STORE_PASSWORD", "s3cret");
        let c = load(
            "[store]\nurl = \"postgres://nudge@db/nudge\"\npassword_env = \"NUDGE_TEST_STORE_PASSWORD\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.store.password().unwrap().as_deref(), Some("s3cret"));
        // An empty password file is a mistake (a secret not mounted yet).
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("pw");
        std::fs::write(&empty, "\n").unwrap();
        let c = load(
            &format!(
                "[store]\nurl = \"postgres://nudge@db/nudge\"\npassword_file = {:?}\n",
                empty.to_str().unwrap()
            ),
            &[],
        )
        .unwrap();
        let err = c.store.password().unwrap_err().to_string();
        assert!(
            err.contains("store.password_file") && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn store_settings_that_cannot_work_are_refused_naming_their_keys() {
        for (toml, key, absent) in [
            (
                "[store]\nurl = \"postgres://nudge:s3cret@db/nudge\"\n",
                "store.url",
                Some("s3cret"),
            ),
            ("[store]\nurl = \"mysql://db/nudge\"\n", "store.url", None),
            // A password is never echoed, whatever else is wrong.
            (
                "[store]\nurl = \"mysql://u:Sekrit99@h/db\"\n",
                "store.url",
                Some("Sekrit99"),
            ),
            (
                "[store]\nurl = \"postgres://u:Sekrit99@db:notaport/nudge\"\n",
                "store.url",
                Some("Sekrit99"),
            ),
            (
                "[store]\nurl = \"postgres://u:Sekrit99@db/nudge?sslmode=bogus\"\n",
                "store.url",
                Some("Sekrit99"),
            ),
            (
                "[store]\nurl = \"host=db password=Sekrit99 dbname=nudge\"\n",
                "store.url",
                Some("Sekrit99"),
            ),
            (
                "[store]\nurl = \"postgres://db/nudge?sslmode=bogus&password=Sekrit99\"\n",
                "store.url",
                Some("Sekrit99"),
            ),
            // A key spelt with escapes is a password key to the client too.
            (
                "[store]\nurl = \"postgres://u@db/nudge?%70assword=Sekrit99\"\n",
                "store.url",
                Some("Sekrit99"),
            ),
            ("[store]\nurl = \"postgres://\"\n", "names no host", None),
            // A slash short: a host, not a file.
            ("[store]\nurl = \"sqlite://relative/x.db\"\n", "three slashes", None),
            (
                "[store]\nurl = \"postgres://nudge@db/nudge?sslmode=sometimes\"\n",
                "store.url",
                None,
            ),
            (
                "[store]\nurl = \"postgres://nudge@db/nudge\"\npassword_env = \"A\"\npassword_file = \"/p\"\n",
                "store.password_env",
                None,
            ),
            (
                "[store]\npath = \"a.db\"\npassword_env = \"A\"\n",
                "store.password_env",
                None,
            ),
            (
                "[store]\nurl = \"postgres://nudge@db/nudge\"\npool_size = 0\n",
                "store.pool_size",
                None,
            ),
        ] {
            let err = load(toml, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
            if let Some(secret) = absent {
                assert!(!err.contains(secret), "{toml}: {err}");
            }
        }
    }

    #[test]
    fn secrets_in_kafka_properties_are_refused() {
        let err = load("[kafka.properties]\n\"sasl.password\" = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sasl.password"), "{err}");
        // A private key inline, or an OAUTHBEARER client secret.
        for name in ["ssl.key.pem", "sasl.oauthbearer.config"] {
            let err = load(&format!("[kafka.properties]\n\"{name}\" = \"x\"\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("`{name}`: secrets must not be in the config file")),
                "{err}"
            );
        }
    }

    /// A SASL password under a protocol without SASL would never be sent:
    /// refused at `nudge check`, naming the key and the protocol in force.
    #[test]
    fn a_sasl_password_needs_a_sasl_protocol() {
        let password = "[kafka]\nsasl_password_file = \"/run/secrets/pw\"\n";
        let err = load(password, &[]).unwrap_err().to_string();
        assert!(
            err.contains("kafka.sasl_password_file: a SASL password is set but security.protocol is not set (plaintext)"),
            "{err}"
        );
        let ssl = format!("{password}[kafka.properties]\n\"security.protocol\" = \"SSL\"\n");
        let err = load(&ssl, &[]).unwrap_err().to_string();
        assert!(
            err.contains("kafka.properties.security.protocol is \"SSL\""),
            "{err}"
        );
        for protocol in ["SASL_SSL", "sasl_plaintext"] {
            let toml =
                format!("{password}[kafka.properties]\n\"security.protocol\" = \"{protocol}\"\n");
            load(&toml, &[]).unwrap();
        }
        // The consumer's own protocol is the one its password goes with.
        let consumer = format!(
            "{password}[kafka.consumer_properties]\n\"security.protocol\" = \"SASL_SSL\"\n"
        );
        load(&consumer, &[]).unwrap();
        load(
            "[kafka]\nsasl_password_env = \"PW\"\n",
            &[("NUDGE_KAFKA__PROPERTIES__security.protocol", "SASL_SSL")],
        )
        .unwrap();
    }
}
