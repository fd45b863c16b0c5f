//! Shared by the daemon tests: a real Kafka-protocol broker (tansu, started by
//! `scripts/kafka-broker.sh` unless KAFKA_BROKERS points at one), unique
//! topics and groups per test, recording HTTP endpoints on 127.0.0.1, and
//! `nudge run` as a child process that can be stopped or killed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The broker address; starts tansu once per test binary if none is given.
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            if let Ok(b) = std::env::var("KAFKA_BROKERS") {
                if std::net::TcpStream::connect(&b).is_ok() {
                    return b;
                }
            }
            let out = Command::new(repo().join("scripts/kafka-broker.sh"))
                .arg("start")
                .output()
                .expect("run scripts/kafka-broker.sh");
            assert!(
                out.status.success(),
                "starting the broker failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            "127.0.0.1:19092".to_string()
        })
        .clone()
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn create_topic(rt: &tokio::runtime::Runtime, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let results = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ))
        .expect("create topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
}

pub fn produce(rt: &tokio::runtime::Runtime, topic: &str, records: &[(String, Vec<u8>)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    rt.block_on(async {
        let sends = records.iter().map(|(k, v)| {
            producer.send(
                FutureRecord::to(topic).key(k).payload(v),
                Duration::from_secs(30),
            )
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).expect("produce");
        }
    });
}

/// One request an endpoint received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub key: String,
    pub body: serde_json::Value,
}

/// HTTP endpoints on 127.0.0.1 that record every request and answer 200.
pub struct Receiver {
    pub base: String,
    requests: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub fn start(rt: &tokio::runtime::Runtime) -> Self {
        let requests: Arc<Mutex<Vec<Received>>> = Arc::default();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(
                |State(reqs): State<Arc<Mutex<Vec<Received>>>>,
                 uri: Uri,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    reqs.lock().unwrap().push(Received {
                        path: uri.path().to_string(),
                        key,
                        body,
                    });
                    StatusCode::OK
                },
            )
            .with_state(requests.clone());
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, requests }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    pub fn on(&self, path: &str) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Requests per idempotency key.
    pub fn by_key(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.requests() {
            *m.entry(r.key).or_default() += 1;
        }
        m
    }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct DaemonConfig {
    pub dir: PathBuf,
    pub topic: String,
    pub dlq: String,
    pub group: String,
    pub rules: PathBuf,
    pub receiver: String,
    pub store: PathBuf,
    /// `rules.watch`: reload when a rules file changes.
    pub watch: bool,
}

impl DaemonConfig {
    pub fn new(dir: &Path, receiver: &Receiver) -> Self {
        Self {
            dir: dir.to_path_buf(),
            topic: unique("events"),
            dlq: unique("dlq"),
            group: unique("group"),
            rules: repo().join("rules"),
            receiver: receiver.base.clone(),
            store: dir.join("nudge.db"),
            watch: false,
        }
    }

    /// Writes a config for one daemon (own admin port) and returns its path and admin address.
    pub fn write(&self, name: &str) -> (PathBuf, String) {
        let admin = format!("127.0.0.1:{}", free_port());
        let text = format!(
            r#"
[store]
path = "{store}"
[rules]
dir = "{rules}"
watch = {watch}
[scheduler]
lease = "2s"
retry_base = "100ms"
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
dead_letter_topic = "{dlq}"
batch_size = 500
drain_timeout = "10s"
[kafka.consumer_properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[admin]
listen = "{admin}"
[log]
format = "json"
level = "info"
[policy]
max_per_customer = 0
[policy.quiet_hours]
start = ""
end = ""
[channels.push]
url = "{recv}/push"
[channels.email]
url = "{recv}/email"
[channels.call_task]
url = "{recv}/call"
"#,
            store = self.store.display(),
            rules = self.rules.display(),
            brokers = brokers(),
            topic = self.topic,
            group = self.group,
            dlq = self.dlq,
            recv = self.receiver,
            watch = self.watch,
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        (path, admin)
    }
}

pub struct Daemon {
    child: Child,
    pub admin: String,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &DaemonConfig, name: &str) -> Self {
        let (path, admin) = config.write(name);
        let log = config.dir.join(format!("{name}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nudge"))
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn nudge run");
        Self { child, admin, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no commit, no goodbye.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; panics with the log's tail unless the daemon exits 0.
    /// Returns how long the drain took.
    pub fn terminate(mut self) -> Duration {
        let started = Instant::now();
        unsafe_kill(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        let took = started.elapsed();
        assert!(
            status.success(),
            "SIGTERM: daemon exited with {status} after {took:?}; log tail:\n{}",
            self.log_tail()
        );
        took
    }

    pub fn signal(&self, sig: &str) {
        unsafe_kill(self.child.id(), sig);
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&format!("http://{}{path}", self.admin))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// A blocking GET over plain TCP (the admin server is HTTP/1.1 on loopback).
pub fn http_get(url: &str) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut stream, &mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Waits for another process to reach a state; fails with `what` after `limit`.
/// (Polling an external process, not timing a test: the assertion is on the state.)
pub fn wait_for(limit: Duration, what: &str, ready: impl FnMut() -> bool) {
    wait_for_or(limit, what, ready, String::new);
}

/// As `wait_for`, with `context` (e.g. daemon logs) in the failure message.
pub fn wait_for_or(
    limit: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() >= deadline {
            panic!(
                "timed out after {limit:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CloudEvent as (key, bytes).
pub fn event(
    id: &str,
    event_type: &str,
    customer: &str,
    data: serde_json::Value,
) -> (String, Vec<u8>) {
    let time = chrono::Utc::now().to_rfc3339();
    let e = serde_json::json!({"specversion":"1.0","id":id,"type":event_type,"source":"test","subject":customer,"time":time,"data":data});
    (customer.to_string(), serde_json::to_vec(&e).unwrap())
}

/// Reads the store the daemon wrote (a second SQLite reader is fine in WAL mode).
pub fn store(path: &Path) -> nudge::store::SqliteStore {
    nudge::store::SqliteStore::open(path).unwrap()
}

/// Dispatch log records with outcome `sent`, as (instance, step).
pub fn sent_steps(path: &Path) -> Vec<(String, String)> {
    use nudge::store::Store;
    let s = store(path);
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = s.log_after(after, 5000).unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(
            page.into_iter()
                .filter(|r| r.outcome == nudge::model::Outcome::Sent)
                .map(|r| (r.instance, r.step)),
        );
    }
    out
}

pub fn stored_offsets_total(path: &Path, topic: &str) -> i64 {
    use nudge::store::Store;
    store(path)
        .offsets(topic)
        .unwrap()
        .iter()
        .map(|(_, o)| o)
        .sum()
}
