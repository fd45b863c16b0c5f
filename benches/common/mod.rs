//! Shared by the benchmarks: timing, the result table, the broker, topics,
//! producing, an HTTP endpoint answering 200, and `nudge run` as a process.
//! Every benchmark reports its figure beside a limit measured in the same run.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `--name value` from the command line (cargo bench adds `--bench`, ignored).
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    let flag = format!("--{name}");
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f` (which does `per_call` units of work) repeatedly for at least
/// `min` and returns units per second.
pub fn rate(per_call: u64, min: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        f();
        n += per_call;
        let el = start.elapsed();
        if el >= min {
            return n as f64 / el.as_secs_f64();
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One line of the result table.
pub struct Row {
    pub bench: String,
    pub metric: String,
    pub value: String,
    pub limit: String,
    pub ratio: String,
    pub target: String,
    pub pass: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    /// A row with a ratio against a limit and a target on that ratio.
    #[allow(clippy::too_many_arguments)]
    pub fn ratio(
        &mut self,
        bench: &str,
        metric: &str,
        value: String,
        limit: String,
        ratio: f64,
        target: &str,
        pass: Option<bool>,
    ) {
        self.rows.push(Row {
            bench: bench.into(),
            metric: metric.into(),
            value,
            limit,
            ratio: format!("{ratio:.2}"),
            target: target.into(),
            pass,
        });
    }

    pub fn info(&mut self, bench: &str, metric: &str, value: String) {
        self.rows.push(Row {
            bench: bench.into(),
            metric: metric.into(),
            value,
            limit: "".into(),
            ratio: "".into(),
            target: "".into(),
            pass: None,
        });
    }

    /// Prints the table and appends it to `$NUDGE_BENCH_OUT` (a markdown file) when set.
    pub fn finish(&self, title: &str) {
        let mut text = format!(
            "\n### {title}\n\n| bench | metric | nudge | limit (same run) | ratio | target | result |\n| --- | --- | --- | --- | --- | --- | --- |\n"
        );
        for r in &self.rows {
            let result = match r.pass {
                Some(true) => "pass",
                Some(false) => "**FAIL**",
                None => "",
            };
            text.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                r.bench, r.metric, r.value, r.limit, r.ratio, r.target, result
            ));
        }
        println!("{text}");
        if let Ok(path) = std::env::var("NUDGE_BENCH_OUT") {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open NUDGE_BENCH_OUT");
            f.write_all(text.as_bytes()).unwrap();
        }
    }
}

pub fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k/s", v / 1e3)
    } else {
        format!("{v:.0} /s")
    }
}

// ---------------------------------------------------------------- Kafka

pub fn brokers() -> String {
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
}

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

pub fn create_topic(rt: &tokio::runtime::Runtime, brokers: &str, topic: &str, partitions: i32) {
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

/// Produces (key, payload) records as fast as the producer takes them;
/// returns records/s.
pub fn produce_all(brokers: &str, topic: &str, records: &[(String, Vec<u8>)]) -> f64 {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let start = Instant::now();
    for (k, v) in records {
        let mut record = BaseRecord::to(topic).key(k).payload(v);
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
    records.len() as f64 / start.elapsed().as_secs_f64()
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

/// An event no journey listens to.
pub fn untriggered(i: u64) -> (String, Vec<u8>) {
    event(
        &format!("tx-{i}"),
        "card.transaction",
        &format!("c-{}", i % 100_000),
        serde_json::json!({"amount": 42.5, "merchant": "Corner Coffee", "card": "x1234", "channel": "pos"}),
    )
}

/// An event that starts a journey for a customer of its own: alternately a
/// fee increase (one push) and an unsigned loan (push, email, call task).
pub fn starting(i: u64) -> (String, Vec<u8>) {
    let customer = format!("s-{i}");
    if i.is_multiple_of(2) {
        event(
            &format!("fee-{i}"),
            "recurring_payment.amount_changed",
            &customer,
            serde_json::json!({"payment_id": format!("p-{i}"), "merchant": "StreamFlix", "previous_amount": 15.99, "new_amount": 18.99, "currency": "AUD"}),
        )
    } else {
        event(
            &format!("loan-{i}"),
            "loan_application.completed",
            &customer,
            serde_json::json!({"application_id": format!("A-{i}"), "product": "Car loan", "amount": 32000.5, "resume_url": "https://bank.example/resume/x", "signed": false}),
        )
    }
}

// ---------------------------------------------------------------- HTTP endpoint

/// An HTTP/1.1 endpoint on 127.0.0.1 answering 200 to every POST, counting
/// requests; `on_request` sees each body.
pub struct Endpoint {
    pub base: String,
    pub count: Arc<AtomicU64>,
}

pub type OnRequest = Arc<dyn Fn(&[u8]) + Send + Sync>;

impl Endpoint {
    pub fn start(rt: &tokio::runtime::Runtime, on_request: Option<OnRequest>) -> Self {
        let count = Arc::new(AtomicU64::new(0));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let c = count.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let c = c.clone();
            let on = on_request.clone();
            async move {
                if let Some(f) = on {
                    f(&body);
                }
                c.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        });
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, count }
    }

    pub fn received(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------- the daemon

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct DaemonSpec<'a> {
    pub dir: &'a Path,
    pub store: &'a Path,
    pub brokers: &'a str,
    pub topic: &'a str,
    pub group: &'a str,
    pub endpoint: &'a str,
    /// Extra `[kafka.consumer_properties]` lines (`"key" = "value"`).
    pub consumer: &'a str,
    pub extra: &'a str,
}

/// Writes a config and starts `nudge run` (release build) with it.
pub fn start_daemon(spec: &DaemonSpec) -> Daemon {
    let admin = format!("127.0.0.1:{}", free_port());
    let text = format!(
        r#"
[store]
path = "{store}"
[rules]
dir = "{rules}"
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
dead_letter_topic = "{topic}.dlq"
[kafka.consumer_properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
{consumer}
[admin]
listen = "{admin}"
[log]
format = "json"
level = "warn"
[policy]
max_per_customer = 0
[policy.quiet_hours]
start = ""
end = ""
[channels.push]
url = "{ep}/push"
[channels.email]
url = "{ep}/email"
[channels.call_task]
url = "{ep}/call"
{extra}
"#,
        store = spec.store.display(),
        rules = repo().join("rules").display(),
        brokers = spec.brokers,
        topic = spec.topic,
        group = spec.group,
        ep = spec.endpoint,
        consumer = spec.consumer,
        extra = spec.extra,
    );
    let path = spec.dir.join("nudge.toml");
    std::fs::write(&path, text).unwrap();
    let log = spec.dir.join("nudge.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn nudge run");
    Daemon {
        child,
        admin,
        log,
        started: Instant::now(),
    }
}

pub struct Daemon {
    pub child: Child,
    pub admin: String,
    pub log: PathBuf,
    pub started: Instant,
}

impl Daemon {
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.admin, path)
    }

    /// Waits until `/readyz` answers 200; returns the time since start.
    pub fn wait_ready(&mut self, limit: Duration) -> Duration {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((200, _)) = self.get("/readyz") {
                return self.started.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nudge run exited ({status}):\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "nudge run not ready after {limit:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn rss_kb(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
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

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking GET over plain TCP (the admin server is HTTP/1.1 on loopback).
pub fn http_get(host: &str, path: &str) -> Option<(u16, String)> {
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

/// Sum of the next offsets the store committed for `topic` (read through a
/// second SQLite connection; WAL allows it while the daemon writes).
pub fn committed(conn: &rusqlite::Connection, topic: &str) -> i64 {
    conn.query_row(
        "SELECT COALESCE(SUM(next_offset), 0) FROM kafka_offsets WHERE topic = ?1",
        [topic],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    format!(
        "{} cores, {cpu}, {mem}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}
