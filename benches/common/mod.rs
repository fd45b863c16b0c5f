//! Shared by the benchmarks: arguments, timing, the result table, the
//! workloads. Every benchmark reports its figure beside a limit measured in
//! the same run. The broker, topics, producing, endpoints and `nudge run` come
//! from the tests' harness, re-exported here.
#![allow(dead_code)]

#[path = "../../tests/harness/mod.rs"]
pub mod harness;

use std::io::Write;
use std::time::{Duration, Instant};

pub use harness::*;

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

// ---------------------------------------------------------------- workloads

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
