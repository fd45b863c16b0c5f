//! The review page over real HTTP: the admin server's reviewer routes
//! (auth layer included) served by axum on 127.0.0.1, read with reqwest,
//! over a real SQLite store opened the way the daemon opens its reader.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{json, Map};

use super::*;
use crate::admin::auth::Tokens;
use crate::model::{Category, ChannelKind, LogRecord, Mode, Outcome};
use crate::review::log::{LogPage, STREAM_PAGE};
use crate::store::{NewInstance, NewStep, SqliteStore, StepResult, Store};

const REVIEWER: &str = "rev-token-1";
const ADMIN: &str = "adm-token-1";
/// A customer id and a journey name an attacker might send in events.
const EVIL_CUSTOMER: &str = "<script>alert('c')</script>\"&x";
const EVIL_JOURNEY: &str = "<img src=x onerror=alert(1)>";

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-02T00:00:00Z")
        .unwrap()
        .to_utc()
}

/// A store with `n` log records over three journeys, every outcome, many
/// sharing a time (the keyset's tie-break), plus one instance and record
/// of the hostile customer and journey.
fn seeded(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("page.db");
    let store = SqliteStore::open(&path).unwrap();
    let outcomes = [
        Outcome::Sent,
        Outcome::Suppressed,
        Outcome::Failed,
        Outcome::HeldOut,
        Outcome::Expired,
    ];
    let journeys = ["unsigned_loan", "fee_refund", "card_activation"];
    let mut records: Vec<LogRecord> = (0..n)
        .map(|i| LogRecord {
            seq: 0,
            time: t0() + chrono::Duration::seconds((i / 3) as i64),
            customer: format!("c-{}", i % 97),
            journey: journeys[i % 3].into(),
            instance: format!("i-{i}"),
            step: ["push", "email"][i % 2].into(),
            channel: ["push", "email"][i % 2].into(),
            template: "t".into(),
            outcome: outcomes[i % outcomes.len()],
            reason: format!("reason {}", i % 4),
            rule_hash: "abcdef0123456789".into(),
            attempt: 1,
            latency_ms: Some(i as u64 % 1000),
            event_id: Some(format!("e-{i}")),
            http_status: Some(200),
            response_ms: Some(i as u64 % 50),
        })
        .collect();
    let evil = NewInstance {
        id: "i-evil".into(),
        customer: EVIL_CUSTOMER.into(),
        journey: EVIL_JOURNEY.into(),
        key: "k".into(),
        mode: Mode::Live,
        category: Category::Service,
        started_at: t0(),
        rule_hash: "<b>hash</b>".into(),
        trigger_event: "<i>ev</i>".into(),
        vars: Map::from_iter([("contact".to_string(), json!("alice@example.com"))]),
        decision_inputs: json!({"event": {"id": "<i>ev</i>", "type": "<x>.started", "time": t0()}}),
    };
    let plan = [NewStep {
        step: "push".into(),
        seq: 0,
        channel: ChannelKind::Push,
        template: "t".into(),
        condition: None,
        due_at: t0() + chrono::Duration::days(3650),
    }];
    let mut tx = store.begin().unwrap();
    tx.start_instance(&evil, &plan).unwrap();
    tx.commit().unwrap();
    records.push(LogRecord {
        customer: EVIL_CUSTOMER.into(),
        journey: EVIL_JOURNEY.into(),
        instance: "i-evil".into(),
        reason: "</td><script>alert('r')</script>".into(),
        step: "push".into(),
        ..records[0].clone()
    });
    for chunk in records.chunks(5_000) {
        let results: Vec<StepResult> = chunk
            .iter()
            .map(|r| StepResult {
                record: r.clone(),
                again_at: None,
                replan: false,
                claimed_row: None,
                withdraw_if_ended: false,
            })
            .collect();
        store.settle_steps(&results).unwrap();
    }
    (dir, path)
}

fn reader(path: &std::path::Path) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open_reader(path, 16).unwrap())
}

/// Serves the admin server's reviewer routes on 127.0.0.1; returns the base URL.
async fn serve(tokens: Tokens, review: Arc<dyn ReviewRead>) -> String {
    let app = crate::admin::reviewer_routes(Arc::new(tokens)).with_state(PageState::new(
        Some(review),
        Duration::from_secs(180 * 24 * 3600),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

fn basic(user: &str, token: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
    )
}

async fn get(base: &str, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reviewer_get(base, path).await;
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

async fn reviewer_get(base: &str, path: &str) -> reqwest::Response {
    client()
        .get(format!("{base}{path}"))
        .header("authorization", format!("Bearer {REVIEWER}"))
        .send()
        .await
        .unwrap()
}

/// The `data-seq` of each log row of a page, in order.
fn seqs(html: &str) -> Vec<i64> {
    html.split("<tr data-seq=\"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
        .collect()
}

/// The `after=` of the page's "older" link.
fn older(html: &str) -> Option<String> {
    let at = html.find("id=\"older\"")?;
    let link = &html[at..];
    let after = &link[link.find("after=")? + 6..];
    Some(after[..after.find(['"', '&']).unwrap()].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_configured_means_no_page() {
    let (_dir, path) = seeded(10);
    let base = serve(Tokens::new(None, None), reader(&path)).await;
    for p in [
        "/",
        "/funnel",
        "/log.csv",
        "/customers/c-1",
        "/assets/app.css",
    ] {
        let r = client()
            .get(format!("{base}{p}"))
            .header("authorization", format!("Bearer {REVIEWER}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_answers_are_protected() {
    let (_dir, path) = seeded(10);
    let base = serve(
        Tokens::new(Some(ADMIN.into()), Some(REVIEWER.into())),
        reader(&path),
    )
    .await;
    for p in ["/", "/funnel", "/log.csv", "/customers/c-1"] {
        let r = client().get(format!("{base}{p}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{p} without credentials");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"));
        let r = client()
            .get(format!("{base}{p}"))
            .header("authorization", basic("anyone", "wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{p} with a wrong token");
        for auth in [
            basic("anyone", REVIEWER),
            basic("", REVIEWER),
            format!("Bearer {REVIEWER}"),
            format!("Bearer {ADMIN}"),
        ] {
            let r = client()
                .get(format!("{base}{p}"))
                .header("authorization", &auth)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{p} with {auth}");
            let h = r.headers();
            assert_eq!(h["cache-control"], "no-store");
            let csp = h["content-security-policy"].to_str().unwrap();
            assert!(
                csp.contains("default-src 'none'") && !csp.contains("script-src"),
                "{csp}"
            );
        }
    }
    let (status, headers, css) = get(&base, "/assets/app.css").await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/css"));
    assert!(css.contains("@media"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_keyset_pages_are_what_the_store_selects() {
    let (_dir, path) = seeded(3_000);
    let store = reader(&path);
    let base = serve(Tokens::new(None, Some(REVIEWER.into())), store.clone()).await;
    let until = (t0() + chrono::Duration::seconds(700)).to_rfc3339();
    let cases: Vec<(String, LogFilter)> = vec![
        (String::new(), LogFilter::default()),
        (
            "journey=unsigned_loan".into(),
            LogFilter {
                journey: Some("unsigned_loan".into()),
                ..LogFilter::default()
            },
        ),
        (
            format!(
                "journey=fee_refund&step=email&channel=email&outcome=sent&since=2026-03-02T00%3A02%3A00Z&until={}&customer=",
                html::url(&until)
            ),
            LogFilter {
                journey: Some("fee_refund".into()),
                step: Some("email".into()),
                channel: Some("email".into()),
                outcome: Some(Outcome::Sent),
                since: Some(t0() + chrono::Duration::seconds(120)),
                until: Some(t0() + chrono::Duration::seconds(700)),
                ..LogFilter::default()
            },
        ),
        (
            "customer=c-5&outcome=held_out".into(),
            LogFilter {
                customer: Some("c-5".into()),
                outcome: Some(Outcome::HeldOut),
                ..LogFilter::default()
            },
        ),
    ];
    for (query, filter) in cases {
        let expected: Vec<i64> = LogStream::new(&*store, filter.clone(), None)
            .map(|r| r.unwrap().seq)
            .collect();
        assert!(!expected.is_empty(), "{query}");
        // Every page by following the "older" links, 250 records a page.
        let mut got = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &after {
                Some(a) => format!("/?{query}&limit=250&after={a}"),
                None => format!("/?{query}&limit=250"),
            };
            let (status, _, html) = get(&base, &path).await;
            assert_eq!(status, 200, "{path}: {html}");
            let page = seqs(&html);
            assert!(page.len() <= 250);
            got.extend(page);
            pages += 1;
            after = older(&html);
            if after.is_none() {
                break;
            }
        }
        assert_eq!(got, expected, "{query}");
        assert_eq!(pages, expected.len().div_ceil(250).max(1), "{query}");
    }
    // A wrong filter is a 400 naming the field.
    let (status, _, html) = get(&base, "/?outcome=delivered").await;
    assert_eq!(status, 400);
    assert!(html.contains("outcome:"), "{html}");
    let (status, _, html) = get(&base, "/?since=yesterdayish").await;
    assert_eq!(status, 400);
    assert!(html.contains("since:"), "{html}");
    // How far back the log reaches, with the retention.
    let (_, _, html) = get(&base, "/").await;
    let oldest = store.log_reach().unwrap().unwrap();
    assert!(
        html.contains(&format!(
            "The log reaches back to <time>{}</time>",
            oldest.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )),
        "{html}"
    );
    assert!(
        html.contains("records older than 180d are deleted"),
        "{html}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csv_is_the_filters_records_as_the_cli_writes_them() {
    let (_dir, path) = seeded(3_000);
    let store = reader(&path);
    let base = serve(Tokens::new(None, Some(REVIEWER.into())), store.clone()).await;
    for (query, filter) in [
        ("", LogFilter::default()),
        (
            "?journey=unsigned_loan&outcome=sent&step=",
            LogFilter {
                journey: Some("unsigned_loan".into()),
                outcome: Some(Outcome::Sent),
                ..LogFilter::default()
            },
        ),
    ] {
        let (status, headers, body) = get(&base, &format!("/log.csv{query}")).await;
        assert_eq!(status, 200);
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv"));
        assert!(headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment"));
        // What `nudge log --format csv --limit 0` with the same filter prints.
        let mut out = Vec::new();
        let mut w = LogWriter::new(&mut out, LogFormat::Csv);
        for r in LogStream::new(&*store, filter, None) {
            w.write(&r.unwrap()).unwrap();
        }
        w.finish().unwrap();
        let expected = String::from_utf8(out).unwrap();
        assert_eq!(body, expected, "{query}");
        assert!(body.lines().count() > 100);
    }
}

/// The store, with the test holding its `gate`-th page read until it says so.
struct Gated {
    inner: Arc<SqliteStore>,
    calls: AtomicUsize,
    largest_read: AtomicUsize,
    gate: usize,
    /// Every read from the gate on waits (until `release` is dropped).
    hold_all: bool,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
    reached: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl ReviewRead for Gated {
    fn control_changes(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<crate::store::control::ControlEntry>, StoreError> {
        self.inner.control_changes(since, until, limit)
    }
    fn propensity_stats(
        &self,
        journey: Option<&str>,
    ) -> Result<Vec<crate::propensity::PropensityCount>, StoreError> {
        self.inner.propensity_stats(journey)
    }

    fn customer_events(
        &self,
        customer: &str,
    ) -> Result<Vec<crate::store::ReceivedEvent>, StoreError> {
        self.inner.customer_events(customer)
    }
    fn log_page(
        &self,
        filter: &LogFilter,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<Vec<LogRecord>, StoreError> {
        self.largest_read.fetch_max(limit, Ordering::SeqCst);
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call == self.gate || (self.hold_all && call > self.gate) {
            if let Some(tx) = self.reached.lock().unwrap().take() {
                let _ = tx.send(());
            }
            let _ = self.release.lock().unwrap().recv();
        }
        self.inner.log_page(filter, after, limit)
    }
    fn outcome_counts(
        &self,
        journey: Option<&str>,
    ) -> Result<Vec<crate::store::review::OutcomeCount>, StoreError> {
        self.inner.outcome_counts(journey)
    }
    fn arms(
        &self,
        journey: Option<&str>,
        by_rule: bool,
    ) -> Result<Vec<crate::store::review::ArmCount>, StoreError> {
        self.inner.arms(journey, by_rule)
    }
    fn planned_steps(
        &self,
        journey: &str,
    ) -> Result<Vec<crate::store::review::PlannedStep>, StoreError> {
        self.inner.planned_steps(journey)
    }
    fn customer_instances(
        &self,
        customer: &str,
    ) -> Result<Vec<crate::store::review::InstanceRecord>, StoreError> {
        self.inner.customer_instances(customer)
    }
    fn customer_context(
        &self,
        customer: &str,
    ) -> Result<Option<crate::context::CustomerContext>, StoreError> {
        self.inner.customer_context(customer)
    }
    fn log_reach(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.inner.log_reach()
    }
}

/// The CSV streams: its first bytes reach the client while the store read
/// of a later page has not even returned, and no read asks the store for
/// more than one page, so memory is a page and a few chunks whatever the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csv_streams_a_page_at_a_time() {
    let records = 12_000;
    let (_dir, path) = seeded(records);
    let (release, gate_rx) = std::sync::mpsc::channel();
    let (reached_tx, reached) = tokio::sync::oneshot::channel();
    let gated = Arc::new(Gated {
        inner: reader(&path),
        calls: AtomicUsize::new(0),
        largest_read: AtomicUsize::new(0),
        gate: 8,
        hold_all: false,
        release: Mutex::new(gate_rx),
        reached: Mutex::new(Some(reached_tx)),
    });
    let base = serve(Tokens::new(None, Some(REVIEWER.into())), gated.clone()).await;
    let mut response = client()
        .get(format!("{base}/log.csv"))
        .header("authorization", format!("Bearer {REVIEWER}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().expect("a first chunk");
    assert!(first.starts_with(b"seq,time,customer"));
    // The 8th page read is held: the query is not finished, yet bytes arrived.
    reached.await.unwrap();
    assert_eq!(gated.calls.load(Ordering::SeqCst), 8);
    release.send(()).unwrap();
    let mut body = first.to_vec();
    while let Some(chunk) = response.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let lines = body.iter().filter(|b| **b == b'\n').count();
    assert_eq!(
        lines,
        records + 1 + 1,
        "header, records and the hostile one"
    );
    assert_eq!(gated.largest_read.load(Ordering::SeqCst), STREAM_PAGE);
    assert!(gated.calls.load(Ordering::SeqCst) > records / STREAM_PAGE);
}

/// Each CSV download holds a blocking thread and a store reader while its
/// client reads: past `CSV_DOWNLOADS` at once, one more is answered 503
/// (with `Retry-After`) until one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_downloads_past_the_limit_wait_their_turn() {
    let (_dir, path) = seeded(10);
    let (release, gate_rx) = std::sync::mpsc::channel::<()>();
    let (reached_tx, _reached) = tokio::sync::oneshot::channel();
    let gated = Arc::new(Gated {
        inner: reader(&path),
        calls: AtomicUsize::new(0),
        largest_read: AtomicUsize::new(0),
        gate: 1,
        hold_all: true,
        release: Mutex::new(gate_rx),
        reached: Mutex::new(Some(reached_tx)),
    });
    let base = serve(Tokens::new(None, Some(REVIEWER.into())), gated.clone()).await;
    let csv = || {
        client()
            .get(format!("{base}/log.csv"))
            .header("authorization", format!("Bearer {REVIEWER}"))
            .send()
    };
    let mut held = Vec::new();
    for _ in 0..super::CSV_DOWNLOADS {
        let response = csv().await.unwrap();
        assert_eq!(response.status(), 200);
        held.push(response);
    }
    let refused = csv().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "30");
    assert!(refused
        .text()
        .await
        .unwrap()
        .contains("CSV downloads are under way"));
    // The reads go on; the downloads end, and their places are free again.
    drop(release);
    for response in held {
        let body = response.text().await.unwrap();
        assert!(body.starts_with("seq,time,customer"), "{body}");
    }
    let again = csv().await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.text().await.unwrap().starts_with("seq,time,customer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_and_names_are_shown_as_text() {
    let (_dir, path) = seeded(10);
    let base = serve(Tokens::new(None, Some(REVIEWER.into())), reader(&path)).await;
    let (status, _, log) = get(&base, "/").await;
    assert_eq!(status, 200);
    let (status, _, funnel) = get(&base, "/funnel").await;
    assert_eq!(status, 200);
    let (status, _, record) = get(&base, &format!("/customers/{}", html::url(EVIL_CUSTOMER))).await;
    assert_eq!(status, 200);
    let (status, _, filtered) =
        get(&base, &format!("/?customer={}", html::url(EVIL_CUSTOMER))).await;
    assert_eq!(status, 200);
    assert_eq!(seqs(&filtered).len(), 1);
    for (name, page) in [
        ("log", &log),
        ("funnel", &funnel),
        ("record", &record),
        ("filtered", &filtered),
    ] {
        for raw in ["<script", "<img", "onerror=alert(1)>", "<b>hash", "<i>ev"] {
            assert!(!page.contains(raw), "{name} holds {raw}: {page}");
        }
        assert!(!page.contains(" style="), "{name}: inline style");
    }
    assert!(log.contains(&format!("{}", html::esc(EVIL_CUSTOMER))));
    assert!(log.contains("&lt;img src=x onerror=alert(1)&gt;"));
    assert!(log.contains(&format!("/customers/{}", html::url(EVIL_CUSTOMER))));
    assert!(funnel.contains("&lt;img src=x onerror=alert(1)&gt;"));
    assert!(record.contains("Customer &lt;script&gt;alert(&#39;c&#39;)&lt;/script&gt;&quot;&amp;x"));
    // The record's addresses are masked for reviewers.
    assert!(!record.contains("alice@example.com"));
    assert!(record.contains("a***@example.com"));
    assert!(filtered.contains(&format!("value=\"{}\"", html::esc(EVIL_CUSTOMER))));
}

#[test]
fn cursors_round_trip_exactly() {
    let c = LogCursor {
        time: DateTime::parse_from_rfc3339("2026-03-02T01:02:03.123456789Z")
            .unwrap()
            .to_utc(),
        seq: 42,
    };
    assert_eq!(parse_cursor(&cursor_text(c)), Some(c));
    assert_eq!(parse_cursor("12"), None);
    assert_eq!(parse_cursor("x.1"), None);
}

/// The body as sent (`text()` would drop a byte-order mark).
async fn get_bytes(base: &str, path: &str) -> (u16, Vec<u8>) {
    let r = reviewer_get(base, path).await;
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_words_and_links_around_the_table_lead_the_reviewer_on() {
    let (_dir, path) = seeded(300);
    let store = SqliteStore::open(&path).unwrap();
    let dots = LogRecord {
        seq: 0,
        time: t0(),
        customer: "..".into(),
        journey: "unsigned_loan".into(),
        instance: "i-dots".into(),
        step: "push".into(),
        channel: "push".into(),
        template: "t".into(),
        outcome: Outcome::Sent,
        reason: String::new(),
        rule_hash: "abcdef0123456789".into(),
        attempt: 1,
        latency_ms: None,
        event_id: None,
        http_status: Some(200),
        response_ms: Some(3),
    };
    store
        .settle_steps(&[StepResult {
            record: dots,
            again_at: None,
            replan: false,
            claimed_row: None,
            withdraw_if_ended: false,
        }])
        .unwrap();
    let base = serve(Tokens::new(None, Some(REVIEWER.into())), reader(&path)).await;

    // A page of several says it is one, and offers a way past its rows.
    let (_, _, first) = get(&base, "/?journey=unsigned_loan&limit=20").await;
    assert!(
        first.contains(
            "The newest 20 records (older ones on the next pages) where journey unsigned_loan"
        ),
        "{first}"
    );
    assert!(first.contains("href=\"#results\"") && first.contains("href=\"#pages\""));
    assert!(first.contains("id=\"pages\""));
    let after = older(&first).unwrap();
    let (_, _, second) = get(
        &base,
        &format!("/?journey=unsigned_loan&limit=20&after={after}"),
    )
    .await;
    assert!(
        second.contains("20 older records (more on the next pages)"),
        "{second}"
    );
    // "Newest" keeps the filter and the page size.
    assert!(
        second.contains("id=\"newest\" href=\"/?journey=unsigned_loan&amp;limit=20\""),
        "{second}"
    );
    // One page: no page links to skip to.
    let (_, _, single) = get(&base, "/?customer=c-5").await;
    assert!(!seqs(&single).is_empty());
    assert!(!single.contains("href=\"#pages\""), "{single}");
    assert!(single.contains("href=\"#results\""));

    // A pasted id with a space finds nothing, and the page offers the id without it.
    let (_, _, spaced) = get(&base, "/?customer=%20c-5%20").await;
    assert!(spaced.contains("No record passes this filter."), "{spaced}");
    assert!(
        spaced.contains("id=\"trimmed\" href=\"/?customer=c-5\""),
        "{spaced}"
    );

    // An id a browser would resolve as a path step is linked by query.
    let (_, _, log) = get(&base, "/?customer=..").await;
    assert_eq!(seqs(&log).len(), 1, "{log}");
    assert!(log.contains("href=\"/customer?id=..\""), "{log}");
    let (status, _, record) = get(&base, "/customer?id=..").await;
    assert_eq!(status, 200);
    assert!(record.contains("<h1>Customer ..</h1>"), "{record}");
    assert!(
        !record.contains("Nothing recorded for this customer"),
        "{record}"
    );

    // The page's download starts with a byte-order mark, for spreadsheets;
    // the plain URL, for scripts, does not; both end records with CRLF.
    assert!(
        log.contains("href=\"/log.csv?customer=..&amp;bom=1\""),
        "{log}"
    );
    let (status, with_bom) = get_bytes(&base, "/log.csv?customer=..&bom=1").await;
    assert_eq!(status, 200);
    let (_, plain) = get_bytes(&base, "/log.csv?customer=..").await;
    assert_eq!(&with_bom[..3], "\u{feff}".as_bytes());
    assert_eq!(&with_bom[3..], &plain[..]);
    let plain = String::from_utf8(plain).unwrap();
    assert!(plain.starts_with("seq,"), "{plain}");
    assert_eq!(plain.matches("\r\n").count(), 2, "{plain:?}");
    let (status, _, refused) = get(&base, "/log.csv?bom=yes").await;
    assert_eq!(status, 400);
    assert!(refused.contains("bom: give 1 or 0"), "{refused}");
}

#[test]
fn a_filter_naming_what_the_rules_do_not_have_says_what_they_have() {
    let known = html::Known {
        journeys: vec!["fee_increase".into(), "unsigned_loan".into()],
        steps: vec!["email".into(), "push".into()],
    };
    let reach = html::Reach {
        oldest: None,
        retention: Duration::ZERO,
    };
    let empty = LogPage {
        records: Vec::new(),
        next: None,
    };
    let query = |journey: &str| LogQuery {
        journey: Some(journey.into()),
        ..LogQuery::default()
    };
    let page = html::log_page(&query("UNSIGNED_LOAN"), &empty, &reach, &known);
    assert!(
        page.contains(
            "The rules in force have no journey named <code>UNSIGNED_LOAN</code> \
             (they have <code>fee_increase</code>, <code>unsigned_loan</code>)"
        ),
        "{page}"
    );
    // A known name, or no rules to compare with: no hint.
    let page = html::log_page(&query("unsigned_loan"), &empty, &reach, &known);
    assert!(!page.contains("have no journey"), "{page}");
    let page = html::log_page(&query("x"), &empty, &reach, &html::Known::default());
    assert!(!page.contains("have no journey"), "{page}");

    let report = crate::review::funnel::FunnelReport {
        log_reaches_back_to: None,
        journeys: Vec::new(),
    };
    let funnel = html::funnel_page(&report, Some("nope"), &reach, &known);
    assert!(
        funnel.contains("No instance of journey <code>nope</code> in the store."),
        "{funnel}"
    );
    assert!(
        funnel.contains("have no journey named <code>nope</code>"),
        "{funnel}"
    );
    assert!(
        funnel.contains("<datalist id=\"journey-suggestions\">"),
        "{funnel}"
    );
    let all = html::funnel_page(&report, None, &reach, &known);
    assert!(
        all.contains("No instance of any journey in the store."),
        "{all}"
    );
}
