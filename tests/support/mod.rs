//! Shared by the engine tests: recording HTTP endpoints on 127.0.0.1 that can
//! be told to fail or be slow, CloudEvents built with serde_json, and a
//! simulation wired to one endpoint per channel. Process-level helpers are in
//! `tests/harness`, which a test using this module declares beside it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::Value;

use nudge::config::PolicyConfig;
use nudge::dispatch::{Channels, HttpChannel, Message, RecordingChannel};
use nudge::event::Event;
use nudge::journey::BatchOutcome;
use nudge::model::{ChannelKind, LogRecord, Outcome};
use nudge::rules::{load_dir, load_sources, Limits, RuleSet};
use nudge::sim::Simulation;
use nudge::store::Store;

use crate::harness::repo;

pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// Monday 2 March 2026, 11:00 in Sydney: outside quiet hours.
pub fn t0() -> DateTime<Utc> {
    at("2026-03-02T00:00:00Z")
}

pub fn shipped_rules() -> RuleSet {
    load_dir(&repo().join("rules"), &Limits::default()).expect("shipped rules compile")
}

pub fn inline_rules(scripts: &[(&str, &str)]) -> RuleSet {
    let sources = scripts
        .iter()
        .map(|(name, text)| {
            (
                PathBuf::from(format!("inline/{name}.rhai")),
                text.to_string(),
            )
        })
        .collect();
    load_sources(sources, &Limits::default()).unwrap_or_else(|e| panic!("inline rules: {e}"))
}

/// A CloudEvent built as JSON and decoded by the engine's own parser.
pub fn event(id: &str, kind: &str, customer: &str, time: DateTime<Utc>, data: Value) -> Event {
    let json = serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "type": kind,
        "source": "tests",
        "subject": customer,
        "time": time.to_rfc3339(),
        "data": data,
    });
    Event::parse(json.to_string().as_bytes()).expect("test event parses")
}

/// Reachable on every channel, in Sydney.
pub fn contact(customer: &str, time: DateTime<Utc>) -> Event {
    event(
        &format!("ctx-{customer}-{}", time.timestamp_millis()),
        "customer.contact_updated",
        customer,
        time,
        serde_json::json!({
            "timezone": "Australia/Sydney",
            "app_installed": true,
            "email": format!("{customer}@example.com"),
            "phone": "+61400000000",
        }),
    )
}

pub fn loan_completed(id: &str, customer: &str, app: &str, time: DateTime<Utc>) -> Event {
    event(
        id,
        "loan_application.completed",
        customer,
        time,
        serde_json::json!({
            "application_id": app,
            "product": "Car loan",
            "amount": 9000,
            "signed": false,
            "resume_url": format!("https://bank.example/loans/{app}/sign"),
        }),
    )
}

/// One request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Value,
    /// What the endpoint answered.
    pub status: u16,
    /// When it arrived (real time).
    pub at: std::time::Instant,
}

impl Received {
    pub fn key(&self) -> Option<&str> {
        self.headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
    }

    pub fn message(&self) -> Message {
        serde_json::from_value(self.body.clone()).expect("body is a dispatch message")
    }

    pub fn str(&self, pointer: &str) -> &str {
        self.body
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no string at {pointer} in {}", self.body))
    }
}

/// Decides an answer (status and extra headers) at the moment a request
/// arrives, e.g. from a virtual clock; `None` leaves it to the other settings.
pub type Answer = Arc<dyn Fn() -> Option<(StatusCode, Vec<(&'static str, String)>)> + Send + Sync>;

struct SinkState {
    received: Mutex<Vec<Received>>,
    answer: Mutex<Option<Answer>>,
    /// Accept the connection and the request, never answer.
    hang: std::sync::atomic::AtomicBool,
    /// Requests left unanswered so far.
    hung: std::sync::atomic::AtomicUsize,
    /// Answers used first, one per request; then `default`.
    scripted: Mutex<VecDeque<StatusCode>>,
    default: Mutex<Option<StatusCode>>,
    delay: Mutex<Option<Duration>>,
    /// Requests received so far, for endpoints that wait on this one.
    arrivals: tokio::sync::watch::Sender<usize>,
    /// Answer only once this other endpoint has received a request.
    gate: Mutex<Option<tokio::sync::watch::Receiver<usize>>>,
}

impl Default for SinkState {
    fn default() -> Self {
        Self {
            received: Mutex::default(),
            answer: Mutex::default(),
            hang: Default::default(),
            hung: Default::default(),
            scripted: Mutex::default(),
            default: Mutex::default(),
            delay: Mutex::default(),
            arrivals: tokio::sync::watch::Sender::new(0),
            gate: Mutex::default(),
        }
    }
}

/// A real HTTP endpoint on 127.0.0.1 that records every request.
#[derive(Clone)]
pub struct Sink {
    pub url: String,
    state: Arc<SinkState>,
}

async fn receive(
    State(state): State<Arc<SinkState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, HeaderMap) {
    let at = std::time::Instant::now();
    if state.hang.load(std::sync::atomic::Ordering::SeqCst) {
        state.hung.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Until the client gives up and drops the connection.
        return futures::future::pending().await;
    }
    let rule = state.answer.lock().unwrap().clone();
    let (status, extra) = match rule.and_then(|f| f()) {
        Some(answer) => answer,
        None => (
            state
                .scripted
                .lock()
                .unwrap()
                .pop_front()
                .or(*state.default.lock().unwrap())
                .unwrap_or(StatusCode::OK),
            Vec::new(),
        ),
    };
    let mut answer_headers = HeaderMap::new();
    for (name, value) in extra {
        answer_headers.insert(name, value.parse().expect("header value"));
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.received.lock().unwrap().push(Received {
        headers,
        body,
        status: status.as_u16(),
        at,
    });
    state.arrivals.send_modify(|n| *n += 1);
    let gate = state.gate.lock().unwrap().clone();
    if let Some(mut other) = gate {
        // Bounded so a broken engine fails the test instead of hanging it.
        let _ = tokio::time::timeout(Duration::from_secs(10), other.wait_for(|n| *n > 0)).await;
    }
    let delay = *state.delay.lock().unwrap();
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    (status, answer_headers)
}

impl Sink {
    pub async fn start() -> Sink {
        let state = Arc::new(SinkState::default());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/messages", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Sink { url, state }
    }

    /// The next `n` requests are answered with `status`.
    pub fn fail_next(&self, n: usize, status: StatusCode) {
        let mut q = self.state.scripted.lock().unwrap();
        q.extend(std::iter::repeat_n(status, n));
    }

    /// Every request (after scripted ones) is answered with `status`.
    pub fn always(&self, status: StatusCode) {
        *self.state.default.lock().unwrap() = Some(status);
    }

    /// Every answer decided by `answer` while it returns `Some`.
    pub fn answer_with(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = Some(answer);
    }

    /// Accepts connections and requests but never answers (or, with
    /// `false`, answers again).
    pub fn hang(&self, on: bool) {
        self.state
            .hang
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Requests left unanswered while hanging.
    pub fn hung(&self) -> usize {
        self.state.hung.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests answered 2xx, by idempotency key.
    pub fn delivered_by_key(&self) -> std::collections::HashMap<String, usize> {
        let mut by_key = std::collections::HashMap::new();
        for r in self.requests() {
            if (200..300).contains(&r.status) {
                *by_key
                    .entry(r.key().unwrap_or_default().to_string())
                    .or_default() += 1;
            }
        }
        by_key
    }

    /// Each answer comes this late (after the request was recorded).
    pub fn slow(&self, by: Duration) {
        *self.state.delay.lock().unwrap() = Some(by);
    }

    /// Holds each answer until `other` has received a request: only an
    /// engine that sends on both channels at once gets an answer in time.
    pub fn answer_after(&self, other: &Sink) {
        *self.state.gate.lock().unwrap() = Some(other.state.arrivals.subscribe());
    }

    /// Waits until `n` requests have arrived (bounded, so that a broken
    /// engine fails the test instead of hanging it).
    pub async fn wait_for_requests(&self, n: usize) {
        let mut arrivals = self.state.arrivals.subscribe();
        tokio::time::timeout(Duration::from_secs(10), arrivals.wait_for(|c| *c >= n))
            .await
            .expect("requests arrived in time")
            .expect("endpoint alive");
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    pub fn channel(&self, timeout: Duration) -> Arc<HttpChannel> {
        Arc::new(HttpChannel::new(&self.url, timeout, None).expect("valid url"))
    }
}

/// One endpoint per channel kind.
pub struct Sinks {
    pub push: Sink,
    pub email: Sink,
    pub call: Sink,
}

impl Sinks {
    pub async fn start() -> Sinks {
        Sinks {
            push: Sink::start().await,
            email: Sink::start().await,
            call: Sink::start().await,
        }
    }

    pub fn get(&self, kind: ChannelKind) -> &Sink {
        match kind {
            ChannelKind::Push => &self.push,
            ChannelKind::Email => &self.email,
            ChannelKind::CallTask => &self.call,
        }
    }

    pub fn channels(&self, timeout: Duration) -> Channels {
        ChannelKind::ALL
            .into_iter()
            .fold(Channels::default(), |c, k| {
                c.with(k, self.get(k).channel(timeout), 16)
            })
    }

    pub fn total(&self) -> usize {
        self.push.count() + self.email.count() + self.call.count()
    }
}

/// The engine on a virtual clock, sending to real HTTP endpoints.
pub struct Harness {
    pub sim: Simulation,
    pub sinks: Sinks,
}

impl Harness {
    pub async fn new(rules: RuleSet, start: DateTime<Utc>) -> Harness {
        Self::with_timeout(rules, start, Duration::from_secs(5)).await
    }

    pub async fn with_timeout(rules: RuleSet, start: DateTime<Utc>, timeout: Duration) -> Harness {
        let sinks = Sinks::start().await;
        let sim = Simulation::with_channels(
            rules,
            start,
            PolicyConfig::default(),
            Arc::new(RecordingChannel::default()),
            sinks.channels(timeout),
        )
        .expect("simulation");
        Harness { sim, sinks }
    }

    pub async fn feed(&self, e: Event) -> (BatchOutcome, Vec<LogRecord>) {
        self.sim.feed(e).await.expect("feed")
    }

    pub async fn run_until(&self, t: DateTime<Utc>) -> Vec<LogRecord> {
        self.sim.run_until(t).await.expect("run_until")
    }

    pub async fn finish(&self) -> Vec<LogRecord> {
        self.sim.finish().await.expect("finish")
    }

    /// The whole dispatch log as stored.
    pub fn log(&self) -> Vec<LogRecord> {
        self.sim.store.log_after(0, 100_000).expect("log")
    }
}

/// Records of one customer's step, oldest first.
pub fn of<'a>(log: &'a [LogRecord], customer: &str, step: &str) -> Vec<&'a LogRecord> {
    log.iter()
        .filter(|r| r.customer == customer && r.step == step)
        .collect()
}

/// The one record of a customer's step, failing if there is not exactly one.
pub fn only<'a>(log: &'a [LogRecord], customer: &str, step: &str) -> &'a LogRecord {
    let found = of(log, customer, step);
    assert_eq!(
        found.len(),
        1,
        "expected one record of {customer}/{step}, got {found:#?}"
    );
    found[0]
}

pub fn outcomes(records: &[&LogRecord]) -> Vec<Outcome> {
    records.iter().map(|r| r.outcome).collect()
}

pub fn rules_dir() -> PathBuf {
    repo().join("rules")
}

pub fn examples() -> PathBuf {
    repo().join("examples/events.jsonl")
}
