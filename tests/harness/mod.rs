//! The one process-level harness of the tests and the benchmarks: the
//! Kafka-protocol broker (tansu, started by `scripts/kafka-broker.sh` unless
//! KAFKA_BROKERS points at one), unique topic and group names, topics and
//! producing, HTTP endpoints on 127.0.0.1 that answer 200, the `nudge` binary
//! (one-shot commands, and `nudge run` as a child process with its config,
//! readiness and signals), and waits that poll another process's state.
//!
//! Tests include it with `mod harness;`, benchmarks through `benches/common`
//! with `#[path]`; engine-level helpers stay in `tests/support`, bench-only
//! ones (arguments, rates, the result table) in `benches/common`.
//!
//! A probe that gets no answer is `None`, never "ready" or "unchanged", and a
//! wait on a daemon fails at once, with the daemon's log tail, when it exits.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------- files and the binary

/// Copies the files of `from` into `to` (created if missing).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

/// The shipped journeys (and their tests) copied into `to`.
pub fn copy_rules(to: &Path) {
    copy_dir(&repo().join("rules"), to);
}

/// Runs the `nudge` binary to completion in the repository directory:
/// (exit code, stdout, stderr).
pub fn nudge(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run nudge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

// ---------------------------------------------------------------- Kafka

/// The broker address, settled once per process: KAFKA_BROKERS when set,
/// else tansu on its default port. A local broker that does not answer is
/// started with `scripts/kafka-broker.sh`; a remote one that does not answer
/// fails here rather than being swapped for another broker.
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            let given = std::env::var("KAFKA_BROKERS").ok();
            let Some(given) = given else {
                return start_broker(None);
            };
            let first = given.split(',').next().unwrap_or_default().trim();
            if TcpStream::connect(first).is_ok() {
                return given;
            }
            let port = first
                .strip_prefix("127.0.0.1:")
                .or_else(|| first.strip_prefix("localhost:"))
                .unwrap_or_else(|| {
                    panic!(
                        "KAFKA_BROKERS={given}: nothing answers at {first}; \
                         start that broker or unset KAFKA_BROKERS to use tansu"
                    )
                });
            start_broker(Some(port))
        })
        .clone()
}

/// `scripts/kafka-broker.sh start [PORT]`; returns the address it prints.
fn start_broker(port: Option<&str>) -> String {
    let out = Command::new(repo().join("scripts/kafka-broker.sh"))
        .arg("start")
        .args(port)
        .output()
        .expect("run scripts/kafka-broker.sh");
    assert!(
        out.status.success(),
        "starting the broker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("KAFKA_BROKERS="))
        .expect("kafka-broker.sh prints KAFKA_BROKERS=...")
        .to_string()
}

/// `prefix-PID-COUNTER-NANOS`: unique within the run and across runs.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
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

/// Creates `topic` on `brokers()`.
pub fn create_topic(rt: &tokio::runtime::Runtime, topic: &str, partitions: i32) {
    create_topic_on(rt, &brokers(), topic, partitions);
}

pub fn create_topic_on(rt: &tokio::runtime::Runtime, brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
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

/// Counts the records the broker did not take, for `produce` to fail on.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.first_error
                .lock()
                .unwrap()
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// Produces (key, payload) records to `topic` on `brokers()` as fast as the
/// producer takes them (acks=all, linger 5 ms, idempotent); fails unless
/// every record was delivered. Returns records/s. An empty key produces a
/// record without a key.
pub fn produce(topic: &str, records: &[(String, Vec<u8>)]) -> f64 {
    produce_on(&brokers(), "rdkafka", topic, records)
}

/// `produce` to the broker at `brokers` as the client `client_id`.
pub fn produce_on(
    brokers: &str,
    client_id: &str,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> f64 {
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("enable.idempotence", "true")
        .create_with_context(Deliveries::default())
        .unwrap();
    let start = Instant::now();
    for (k, v) in records {
        let mut record = BaseRecord::to(topic).payload(v);
        if !k.is_empty() {
            record = record.key(k);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    if e.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::QueueFull) {
                        panic!("produce: {e}");
                    }
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    let rate = records.len() as f64 / start.elapsed().as_secs_f64();
    let failed = producer.context().failed.load(Ordering::Relaxed);
    assert!(
        failed == 0,
        "{failed} of {} records not delivered to {topic}: {:?}",
        records.len(),
        producer.context().first_error.lock().unwrap()
    );
    rate
}

/// A CloudEvent as (key, bytes), about 200-300 bytes like a real one.
pub fn event(
    id: &str,
    event_type: &str,
    customer: &str,
    data: serde_json::Value,
) -> (String, Vec<u8>) {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let e = serde_json::json!({"specversion":"1.0","id":id,"type":event_type,"source":"core-banking","subject":customer,"time":time,"data":data});
    (customer.to_string(), serde_json::to_vec(&e).unwrap())
}

/// Customer `c{c}` completed loan application `A{c}` and has not signed:
/// the trigger of `unsigned_loan`, as (key, bytes).
pub fn unsigned_loan(c: usize, product: &str) -> (String, Vec<u8>) {
    event(
        &format!("loan-{c}"),
        "loan_application.completed",
        &format!("c{c}"),
        serde_json::json!({"application_id": format!("A{c}"), "product": product,
            "amount": 1000, "signed": false, "resume_url": "u"}),
    )
}

/// Customers `c{from}`… each with the app (a contact update) and an
/// unsigned loan: one push due at once each, an email and a call planned.
pub fn loans(from: usize, n: usize) -> Records {
    let mut records = Vec::new();
    for c in from..from + n {
        records.push(event(
            &format!("ctx-{c}"),
            "customer.contact_updated",
            &format!("c{c}"),
            serde_json::json!({"app_installed": true}),
        ));
        records.push(unsigned_loan(c, "Personal loan"));
    }
    records
}

// ---------------------------------------------------------------- a broker behind a proxy

/// A tansu broker of its own on a free port that advertises the address of
/// a [`BrokerProxy`] in front of it: clients learn brokers from metadata,
/// so with the shared broker (which advertises itself) they would bypass a
/// proxy after bootstrap. Memory storage; killed when dropped.
pub struct ProxiedBroker {
    child: Child,
    pub proxy: BrokerProxy,
}

impl ProxiedBroker {
    /// `spared`: the client id whose connections the proxy never cuts.
    pub fn start(rt: &tokio::runtime::Runtime, spared: &str) -> Self {
        let out = Command::new(repo().join("scripts/kafka-broker.sh"))
            .arg("bin")
            .output()
            .expect("scripts/kafka-broker.sh bin");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{front_addr}"))
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        let broker = format!("127.0.0.1:{port}");
        let this = Self {
            child,
            proxy: BrokerProxy::start(rt, front, broker.clone(), spared),
        };
        wait_for(Duration::from_secs(20), "the proxied broker", || {
            TcpStream::connect(&broker).is_ok()
        });
        this
    }
}

impl Drop for ProxiedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a [`BrokerProxy`] did.
#[derive(Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    /// New connections closed at once because the link was cut.
    pub refused: AtomicU64,
    /// Established connections closed by a cut.
    pub cut: AtomicU64,
}

/// A TCP proxy on 127.0.0.1 in front of a Kafka broker that cuts the link on
/// demand: every connection is closed and every new one is closed as soon
/// as it says who it is, until the link is restored. Connections of the
/// client id `spared` (a test's producer, on the broker's side of the cut)
/// are never cut. The client id is read from the first request's header,
/// which every Kafka request version writes the same way.
pub struct BrokerProxy {
    pub addr: String,
    cut: tokio::sync::watch::Sender<bool>,
    pub stats: Arc<ProxyStats>,
}

impl BrokerProxy {
    pub fn start(
        rt: &tokio::runtime::Runtime,
        listener: std::net::TcpListener,
        upstream: String,
        spared: &str,
    ) -> Self {
        let addr = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let (cut, _) = tokio::sync::watch::channel(false);
        let stats = Arc::new(ProxyStats::default());
        let (rx, st, spared) = (cut.subscribe(), stats.clone(), spared.to_string());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let conn = proxy_connection(
                    client,
                    upstream.clone(),
                    rx.clone(),
                    spared.clone(),
                    st.clone(),
                );
                tokio::spawn(conn);
            }
        });
        Self { addr, cut, stats }
    }

    /// Cuts every connection (but the spared client's) and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

async fn proxy_connection(
    mut client: tokio::net::TcpStream,
    upstream: String,
    mut cut: tokio::sync::watch::Receiver<bool>,
    spared: String,
    stats: Arc<ProxyStats>,
) {
    use tokio::io::AsyncWriteExt;
    let first = tokio::time::timeout(Duration::from_secs(30), read_kafka_frame(&mut client)).await;
    let Ok(Ok(first)) = first else { return };
    let is_spared = kafka_client_id(&first).is_some_and(|id| id == spared);
    if !is_spared && *cut.borrow() {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        return; // dropped: closed
    }
    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
        return;
    };
    if server.write_all(&first).await.is_err() {
        return;
    }
    if is_spared {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    }
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.wait_for(|c| *c) => {
            stats.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One size-prefixed Kafka request, prefix included (at most 1 MiB: a
/// client's first request is ApiVersions or Metadata).
async fn read_kafka_frame(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).await?;
    let len = i32::from_be_bytes(size);
    if !(0..=1 << 20).contains(&len) {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut frame = size.to_vec();
    frame.resize(4 + len as usize, 0);
    stream.read_exact(&mut frame[4..]).await?;
    Ok(frame)
}

/// The client id of a request frame: after size (4), api key (2), api
/// version (2) and correlation id (4), an INT16-length string.
fn kafka_client_id(frame: &[u8]) -> Option<String> {
    let len = i16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let id = frame.get(14..14 + usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

// ---------------------------------------------------------------- HTTP endpoints

/// One request an endpoint received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub key: String,
    pub body: serde_json::Value,
}

/// What an endpoint does with a request's body besides counting it.
pub type OnRequest = Arc<dyn Fn(&[u8]) + Send + Sync>;

struct Recorder {
    /// Keep every request (tests) or only count them (benchmarks).
    keep: bool,
    requests: Mutex<Vec<Received>>,
    on_request: Option<OnRequest>,
    /// [`Receiver::holding`]: each request waits for a permit.
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Requests waiting at the gate now.
    waiting: AtomicU64,
}

/// HTTP/1.1 endpoints on 127.0.0.1 (any path) answering 200 to every request.
pub struct Receiver {
    pub base: String,
    /// Requests received so far.
    pub count: Arc<AtomicU64>,
    recorder: Arc<Recorder>,
}

impl Receiver {
    /// Records every request: path, idempotency key, JSON body.
    pub fn start(rt: &tokio::runtime::Runtime) -> Self {
        Self::serve(rt, true, None)
    }

    /// Only counts requests (and hands each body to `on_request`): for the
    /// hundreds of thousands of requests of a benchmark.
    pub fn counting(rt: &tokio::runtime::Runtime, on_request: Option<OnRequest>) -> Self {
        Self::serve(rt, false, on_request)
    }

    /// Records every request, answered only once the test adds a permit to
    /// `gate` for it (a slow endpoint whose sends are under way at will).
    pub fn holding(rt: &tokio::runtime::Runtime, gate: Arc<tokio::sync::Semaphore>) -> Self {
        Self::serve_with(rt, true, None, Some(gate))
    }

    /// Requests waiting for a permit of [`Receiver::holding`]'s gate.
    pub fn waiting(&self) -> u64 {
        self.recorder.waiting.load(Ordering::SeqCst)
    }

    fn serve(rt: &tokio::runtime::Runtime, keep: bool, on_request: Option<OnRequest>) -> Self {
        Self::serve_with(rt, keep, on_request, None)
    }

    fn serve_with(
        rt: &tokio::runtime::Runtime,
        keep: bool,
        on_request: Option<OnRequest>,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Self {
        let count = Arc::new(AtomicU64::new(0));
        let recorder = Arc::new(Recorder {
            keep,
            requests: Mutex::default(),
            on_request,
            gate,
            waiting: AtomicU64::new(0),
        });
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state((recorder.clone(), count.clone()));
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base,
            count,
            recorder,
        }
    }

    pub fn received(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.recorder.requests.lock().unwrap().clone()
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

async fn receive(
    State((recorder, count)): State<(Arc<Recorder>, Arc<AtomicU64>)>,
    request: Request,
) -> StatusCode {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST;
    };
    if let Some(gate) = &recorder.gate {
        recorder.waiting.fetch_add(1, Ordering::SeqCst);
        gate.acquire().await.unwrap().forget();
        recorder.waiting.fetch_sub(1, Ordering::SeqCst);
    }
    if let Some(f) = &recorder.on_request {
        f(&body);
    }
    if recorder.keep {
        let key = parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        recorder.requests.lock().unwrap().push(Received {
            path: parts.uri.path().to_string(),
            key,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        });
    }
    count.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A blocking GET over plain TCP (the admin server is HTTP/1.1 on loopback);
/// `None` when nothing answers or the answer is not HTTP.
pub fn http_get(host: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(host).ok()?;
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

// ---------------------------------------------------------------- the daemon

/// What `nudge run` is started with; `write` turns it into a TOML file.
pub struct DaemonConfig {
    pub dir: PathBuf,
    pub brokers: String,
    pub topic: String,
    pub dlq: String,
    pub group: String,
    pub rules: PathBuf,
    /// Base URL of the endpoints: `/push`, `/email`, `/call`.
    pub receiver: String,
    pub store: PathBuf,
    /// `store.url` instead of the SQLite file (e.g. a PostgreSQL schema).
    pub store_url: Option<String>,
    /// `rules.watch`: reload when a rules file changes.
    pub watch: bool,
    pub log_level: String,
    /// Lines of `[scheduler]`; empty leaves the section out (the defaults).
    pub scheduler: String,
    /// Extra lines of `[kafka]`.
    pub kafka: String,
    /// Extra lines of `[kafka.consumer_properties]`.
    pub consumer: String,
    /// Lines of `[policy]` (default: no frequency cap).
    pub policy: String,
    /// Extra lines of `[channels.push]`.
    pub push: String,
    /// Whole sections appended at the end.
    pub extra: String,
    /// Topics subscribed besides `topic` (not created).
    pub also_topics: Vec<String>,
}

impl DaemonConfig {
    /// For tests: the daemon's defaults, except a short lease and retry so
    /// recovery happens within a test, batches of 500, a 10 s drain and
    /// info logs.
    pub fn new(dir: &Path, receiver: &Receiver) -> Self {
        Self {
            scheduler: "lease = \"2s\"\nretry_base = \"100ms\"".into(),
            kafka: "batch_size = 500\ndrain_timeout = \"10s\"".into(),
            log_level: "info".into(),
            ..Self::with_defaults(dir, receiver)
        }
    }

    /// For benchmarks: what an operator runs, the daemon's own defaults
    /// (warn logs, so logging costs nothing measurable).
    pub fn with_defaults(dir: &Path, receiver: &Receiver) -> Self {
        Self {
            dir: dir.to_path_buf(),
            brokers: brokers(),
            topic: unique("events"),
            dlq: unique("dlq"),
            group: unique("group"),
            rules: repo().join("rules"),
            receiver: receiver.base.clone(),
            store: dir.join("nudge.db"),
            store_url: None,
            watch: false,
            log_level: "warn".into(),
            scheduler: String::new(),
            kafka: String::new(),
            consumer: String::new(),
            policy: "caps = []".into(),
            push: String::new(),
            extra: String::new(),
            also_topics: Vec::new(),
        }
    }

    /// Writes `name.toml` for one daemon (own admin port) and returns its
    /// path and admin address.
    pub fn write(&self, name: &str) -> (PathBuf, String) {
        let admin = format!("127.0.0.1:{}", free_port());
        let scheduler = if self.scheduler.is_empty() {
            String::new()
        } else {
            format!("[scheduler]\n{}\n", self.scheduler)
        };
        let text = format!(
            r#"
[store]
{store}
[rules]
dir = "{rules}"
watch = {watch}
{scheduler}[kafka]
brokers = "{brokers}"
topics = ["{topic}"{also}]
group_id = "{group}"
dead_letter_topic = "{dlq}"
{kafka}
[kafka.consumer_properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
{consumer}
[admin]
listen = "{admin}"
[log]
format = "json"
level = "{level}"
[policy]
{policy}
[policy.quiet_hours.push]
start = ""
end = ""
[channels.push]
url = "{recv}/push"
{push}
[channels.email]
url = "{recv}/email"
[channels.call_task]
url = "{recv}/call"
{extra}
"#,
            store = match &self.store_url {
                Some(url) => format!("url = {url:?}"),
                None => format!("path = {:?}", self.store.display().to_string()),
            },
            rules = self.rules.display(),
            watch = self.watch,
            brokers = self.brokers,
            topic = self.topic,
            group = self.group,
            dlq = self.dlq,
            kafka = self.kafka,
            consumer = self.consumer,
            level = self.log_level,
            recv = self.receiver,
            policy = self.policy,
            push = self.push,
            extra = self.extra,
            also = self
                .also_topics
                .iter()
                .map(|t| format!(", {t:?}"))
                .collect::<String>(),
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        (path, admin)
    }
}

/// One answer of `/readyz`.
#[derive(Debug)]
pub struct Readyz {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Readyz {
    pub fn ready(&self) -> bool {
        self.status == 200
    }

    pub fn rules_version(&self) -> Option<String> {
        self.body["rules_version"].as_str().map(String::from)
    }

    pub fn assigned_partitions(&self) -> Option<u64> {
        self.body["assigned_partitions"].as_u64()
    }
}

/// How often the waits poll.
pub const POLL: Duration = Duration::from_millis(50);

/// `nudge run` (this build) as a child process, killed when dropped.
pub struct Daemon {
    /// In a mutex so `exited` can reap it through `&self`.
    child: Mutex<Child>,
    pub name: String,
    pub admin: String,
    pub log: PathBuf,
    pub started: Instant,
}

impl Daemon {
    /// Writes `name.toml` in the config's directory and starts `nudge run`
    /// with it, stderr appended to `name.log`.
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
        Self {
            child: Mutex::new(child),
            name: name.to_string(),
            admin,
            log,
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// The exit status once the process has ended.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }

    /// SIGKILL: no drain, no commit, no goodbye.
    pub fn kill(mut self) {
        let child = self.child.get_mut().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM; panics with the log's tail unless the daemon exits 0.
    /// Returns how long the drain took.
    pub fn terminate(mut self) -> Duration {
        let started = Instant::now();
        self.signal("TERM");
        let status = self.child.get_mut().unwrap().wait().unwrap();
        let took = started.elapsed();
        assert!(
            status.success(),
            "SIGTERM: daemon {} exited with {status} after {took:?}; log tail:\n{}",
            self.name,
            self.log_tail()
        );
        took
    }

    /// Sends a signal by name (`HUP`, `TERM`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} {}", self.name);
    }

    /// Waits until the daemon has begun sending: ready, and caught up with
    /// the records that waited at start (`kafka.catch_up_timeout`).
    pub fn wait_sending(&self, limit: Duration) {
        self.wait_until(limit, "sending to begin", || {
            std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains("sending begins")
        });
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// GET on the admin address; `None` when nothing answers.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.admin, path)
    }

    /// `/readyz`; `None` when it does not answer with JSON.
    pub fn readyz(&self) -> Option<Readyz> {
        let (status, body) = self.get("/readyz")?;
        let body = serde_json::from_str(&body).ok()?;
        Some(Readyz { status, body })
    }

    /// The rules version `/readyz` reports; `None` when it does not answer.
    pub fn rules_version(&self) -> Option<String> {
        self.readyz()?.rules_version()
    }

    /// Partitions `/readyz` reports assigned; `None` when it does not answer.
    pub fn partitions(&self) -> Option<u64> {
        self.readyz()?.assigned_partitions()
    }

    /// Waits until `/readyz` answers 200; returns the time since start.
    pub fn wait_ready(&self, limit: Duration) -> Duration {
        self.poll_until(
            limit,
            Duration::from_millis(10),
            "/readyz to answer 200",
            || self.readyz().is_some_and(|r| r.ready()),
            String::new,
        );
        self.started.elapsed()
    }

    /// Waits until `ready` holds; see `poll_until`.
    pub fn wait_until(&self, limit: Duration, what: &str, ready: impl FnMut() -> bool) {
        self.poll_until(limit, POLL, what, ready, String::new);
    }

    /// Polls `ready` every `every` until it holds. Fails as soon as the
    /// daemon has exited, or after `limit`, with `context()`, the last
    /// `/readyz` answer and the log tail.
    pub fn poll_until(
        &self,
        limit: Duration,
        every: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
        context: impl FnOnce() -> String,
    ) {
        let deadline = Instant::now() + limit;
        while !ready() {
            let failure = if let Some(status) = self.exited() {
                format!(
                    "daemon {} exited ({status}) while waiting for {what}",
                    self.name
                )
            } else if Instant::now() >= deadline {
                format!(
                    "timed out after {limit:?} waiting for {what} from daemon {}; /readyz: {:?}",
                    self.name,
                    self.readyz()
                )
            } else {
                std::thread::sleep(every);
                continue;
            };
            let context = context();
            let context = if context.is_empty() {
                context
            } else {
                format!("\n{context}")
            };
            panic!("{failure}{context}\nlog tail:\n{}", self.log_tail());
        }
    }

    /// (VmRSS, VmHWM) in kB.
    pub fn rss_kb(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------- waiting

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
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------- the store a daemon wrote

/// Reads the store the daemon wrote (a second SQLite reader is fine in WAL mode).
pub fn store(path: &Path) -> nudge::store::SqliteStore {
    nudge::store::SqliteStore::open(path).unwrap()
}

/// A read-only connection to a daemon's store once it has its tables
/// (`None` before); WAL lets it read while the daemon writes.
pub fn store_reader(path: &Path) -> Option<rusqlite::Connection> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row("SELECT COUNT(*) FROM kafka_offsets", [], |r| {
        r.get::<_, i64>(0)
    })
    .ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    Some(conn)
}

/// Sum of the next offsets the store committed for `topic`.
pub fn committed(conn: &rusqlite::Connection, topic: &str) -> i64 {
    conn.query_row(
        "SELECT COALESCE(SUM(next_offset), 0) FROM kafka_offsets WHERE topic = ?1",
        [topic],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

/// `committed` through a fresh reader; 0 before the store exists.
pub fn stored_offsets_total(path: &Path, topic: &str) -> i64 {
    store_reader(path).map_or(0, |c| committed(&c, topic))
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

// ---------------------------------------------------------------- reading topics

/// One record read back from a topic (e.g. a dead letter).
pub struct Letter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the start until `want` records arrived (fails after 90 s).
pub fn read_topic(topic: &str, want: usize) -> Vec<Letter> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    wait_for(Duration::from_secs(90), "records on the topic", || {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for i in 0..h.count() {
                    let hd = h.get(i);
                    headers.insert(
                        hd.key.to_string(),
                        String::from_utf8_lossy(hd.value.unwrap_or_default()).to_string(),
                    );
                }
            }
            out.push(Letter {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
        out.len() >= want
    });
    out
}

// ---------------------------------------------------------------- PostgreSQL

/// The test database (`NUDGE_TEST_POSTGRES_URL`, by default `test` on
/// 127.0.0.1:5432 as `postgres`, trust auth).
pub fn pg_base() -> String {
    std::env::var("NUDGE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn pg_admin() -> postgres::Client {
    postgres::Client::connect(&pg_base(), postgres::NoTls)
        .unwrap_or_else(|e| panic!("these tests need PostgreSQL at {}: {e}", pg_base()))
}

/// A schema of its own in the test database, dropped at the end.
pub struct Schema {
    pub name: String,
    /// `store.url` of a store on this schema.
    pub url: String,
}

impl Schema {
    pub fn new() -> Self {
        let name = unique("nudge_daemon").replace('-', "_");
        pg_admin()
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .unwrap();
        let url = format!("{}?options=-csearch_path%3D{name}", pg_base());
        Self { name, url }
    }

    /// A client whose `search_path` is the schema.
    pub fn client(&self) -> postgres::Client {
        let mut c = pg_admin();
        c.batch_execute(&format!("SET search_path TO {}", self.name))
            .unwrap();
        c
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = pg_admin().batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
    }
}

/// Kafka records as (key, payload).
pub type Records = Vec<(String, Vec<u8>)>;

/// `examples/events.jsonl` re-timed to now (nothing past its lateness
/// bound): the starts, then the exits that must follow the pushes.
pub fn examples_now() -> (Records, Records) {
    let text = std::fs::read_to_string(repo().join("examples/events.jsonl")).unwrap();
    let now = chrono::Utc::now().to_rfc3339();
    let (mut starts, mut exits) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut e: serde_json::Value = serde_json::from_str(line).unwrap();
        e["time"] = serde_json::json!(now);
        let t = e["type"].as_str().unwrap().to_string();
        let record = (
            e["subject"].as_str().unwrap().to_string(),
            serde_json::to_vec(&e).unwrap(),
        );
        if t.ends_with(".signed") || t.ends_with(".withdrawn") || t.ends_with(".enrolled") {
            exits.push(record);
        } else {
            starts.push(record);
        }
    }
    (starts, exits)
}

/// The example events through a ready daemon on `topic`: the starts, their
/// five pushes at `recv`, then the exits, until the SQLite store at `db`
/// holds the two steps left pending and the four cancelled.
pub fn run_examples(daemon: &Daemon, topic: &str, recv: &Receiver, db: &Path, limit: Duration) {
    let (starts, exits) = examples_now();
    produce(topic, &starts);
    daemon.wait_until(limit, "five pushes", || recv.on("/push").len() >= 5);
    produce(topic, &exits);
    daemon.wait_until(limit, "the exits to be stored", || {
        let Some(conn) = store_reader(db) else {
            return false;
        };
        let count = |status: &str| -> i64 {
            conn.query_row(
                "SELECT COUNT(*) FROM steps WHERE status = ?1",
                [status],
                |r| r.get(0),
            )
            .unwrap_or(0)
        };
        count("pending") == 2 && count("cancelled") == 4
    });
}
