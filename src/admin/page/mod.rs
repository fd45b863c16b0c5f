//! The review page (issue 14), served by the admin server behind the
//! reviewer token: plain server-rendered HTML ([`html`]) and one embedded
//! stylesheet, no script and no CDN.
//!
//! - `/`: the dispatch log, newest first, filtered by the GET form
//!   (`journey`, `step`, `channel`, `outcome`, `since`, `until`,
//!   `customer`), a page at a time by keyset: the "older" link carries the
//!   last record's position as `after=`, never an offset;
//! - `/funnel`: per journey the funnel, the uplift against the control group
//!   and both per rule version (`journey=` for one);
//! - `/log.csv`: every record of the same filters as CSV, streamed: a
//!   blocking task reads the log a page at a time and hands chunks to the
//!   response through a small bounded channel, so memory stays a few chunks
//!   whatever the count, and a slow client slows the reads;
//! - `/customers/{id}`: one customer's decision record, contacts masked
//!   (reviewers never see them unmasked);
//! - `/assets/app.css`.
//!
//! Every page says how far back the log reaches (`store.retention` and the
//! oldest record present). Nothing here writes. Store reads block, so they
//! run on the blocking pool.

pub mod html;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRef, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::review::log::{LogFormat, LogStream, LogWriter};
use crate::review::{LogCursor, LogFilter, ReviewRead};
use crate::store::StoreError;

/// The stylesheet, in the binary.
const APP_CSS: &str = include_str!("app.css");

/// Records on a page unless `limit=` says otherwise (at most [`MAX_LIMIT`]).
pub const PAGE_SIZE: usize = 100;
pub const MAX_LIMIT: usize = 1_000;
/// Bytes of CSV gathered before a chunk goes to the response.
const CSV_CHUNK: usize = 64 * 1024;
/// Chunks in flight between the store reader and the response.
const CSV_CHUNKS_IN_FLIGHT: usize = 4;
/// CSV downloads served at once; one more is answered 503.
pub const CSV_DOWNLOADS: usize = 4;

/// What the page reads: the store (`None` when the page is off) and the
/// retention it reports.
#[derive(Clone)]
pub struct PageState {
    pub review: Option<Arc<dyn ReviewRead>>,
    pub retention: Duration,
    /// The rules in force, whose journeys and steps the filters offer.
    rules: Option<crate::rules::RulesHandle>,
    /// CSV downloads under way: each holds a blocking thread and a store
    /// reader for as long as its client takes to read it.
    downloads: Arc<tokio::sync::Semaphore>,
}

impl PageState {
    pub fn new(review: Option<Arc<dyn ReviewRead>>, retention: Duration) -> Self {
        Self {
            review,
            retention,
            rules: None,
            downloads: Arc::new(tokio::sync::Semaphore::new(CSV_DOWNLOADS)),
        }
    }

    pub fn with_rules(mut self, rules: crate::rules::RulesHandle) -> Self {
        self.rules = Some(rules);
        self
    }

    /// The journeys and steps of the rules in force, sorted, each once.
    fn known(&self) -> html::Known {
        let Some(rules) = &self.rules else {
            return html::Known::default();
        };
        let set = rules.current();
        let mut journeys: Vec<String> = set.journeys().iter().map(|j| j.name.clone()).collect();
        let mut steps: Vec<String> = set
            .journeys()
            .iter()
            .flat_map(|j| j.steps.iter().map(|s| s.id.clone()))
            .collect();
        journeys.sort();
        steps.sort();
        steps.dedup();
        html::Known { journeys, steps }
    }
}

/// The page's routes, for a router whose state holds a [`PageState`]; the
/// caller adds the reviewer's auth layer.
pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PageState: FromRef<S>,
{
    Router::new()
        .route("/", get(log_page))
        .route("/funnel", get(funnel_page))
        .route("/log.csv", get(log_csv))
        .route("/customers/{id}", get(customer_page))
        .route("/customer", get(customer_by_query))
        .route("/assets/app.css", get(css))
}

/// The log filters and paging of a request, as the form sends them (an
/// empty field is no filter).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LogQuery {
    pub journey: Option<String>,
    pub step: Option<String>,
    pub channel: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub customer: Option<String>,
    pub after: Option<String>,
    pub limit: Option<String>,
    /// `/log.csv` only: `1` starts the file with a UTF-8 byte-order mark,
    /// without which Excel reads it as the system's code page (the page's
    /// download link asks for it; scripts get plain UTF-8).
    pub bom: Option<String>,
}

impl LogQuery {
    /// The fields set, empty ones as unset.
    fn tidy(mut self) -> Self {
        for f in [
            &mut self.journey,
            &mut self.step,
            &mut self.channel,
            &mut self.outcome,
            &mut self.since,
            &mut self.until,
            &mut self.customer,
            &mut self.after,
            &mut self.limit,
        ] {
            if f.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *f = None;
            }
        }
        self
    }

    /// The store's filter; an error names the field that is wrong.
    pub fn filter(&self, now: DateTime<Utc>) -> Result<LogFilter, String> {
        let time = |name: &str, v: &Option<String>| {
            v.as_deref()
                .map(|t| crate::review::parse_time(t, now))
                .transpose()
                .map_err(|e| format!("{name}: {e}"))
        };
        if let Some(c) = &self.channel {
            c.parse::<crate::model::ChannelKind>()
                .map_err(|e| format!("channel: {e}"))?;
        }
        Ok(LogFilter {
            journey: self.journey.clone(),
            step: self.step.clone(),
            channel: self.channel.clone(),
            outcome: self
                .outcome
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e| format!("outcome: {e}"))?,
            customer: self.customer.clone(),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
        })
    }

    fn cursor(&self) -> Result<Option<LogCursor>, String> {
        self.after
            .as_deref()
            .map(|a| parse_cursor(a).ok_or_else(|| format!("after: `{a}` is not a page position")))
            .transpose()
    }

    fn limit(&self) -> Result<usize, String> {
        match &self.limit {
            None => Ok(PAGE_SIZE),
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(format!("limit: give 1 to {MAX_LIMIT}")),
            },
        }
    }

    /// The filter fields set, as a query string (percent-encoded, `&`
    /// between them, not yet HTML-escaped), for links that keep the filter.
    pub fn filters_query(&self) -> String {
        [
            ("journey", &self.journey),
            ("step", &self.step),
            ("channel", &self.channel),
            ("outcome", &self.outcome),
            ("since", &self.since),
            ("until", &self.until),
            ("customer", &self.customer),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| format!("{k}={}", html::url(v))))
        .collect::<Vec<_>>()
        .join("&")
    }
}

/// A page position as a link carries it: `<time in ns since 1970>.<seq>`,
/// exact whatever precision the store keeps.
pub fn cursor_text(c: LogCursor) -> String {
    let nanos = c.time.timestamp_nanos_opt().unwrap_or(i64::MAX);
    format!("{nanos}.{}", c.seq)
}

pub fn parse_cursor(text: &str) -> Option<LogCursor> {
    let (nanos, seq) = text.split_once('.')?;
    Some(LogCursor {
        time: DateTime::from_timestamp_nanos(nanos.parse().ok()?),
        seq: seq.parse().ok()?,
    })
}

fn html_response(status: StatusCode, body: String) -> Response {
    (status, Html(body)).into_response()
}

fn bad_request(message: String) -> Response {
    html_response(StatusCode::BAD_REQUEST, html::error_page(&message))
}

fn off() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

/// Runs a store read on the blocking pool; a failure is logged (no
/// customer data: the store's error) and answered with a 500.
async fn read<T: Send + 'static>(
    review: Arc<dyn ReviewRead>,
    what: &'static str,
    f: impl FnOnce(&dyn ReviewRead) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(move || f(&*review)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            crate::telemetry::events::ReviewReadFailed { what, error: &e }.emit();
            Err(html_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                html::error_page("The store could not be read; the daemon's log says why."),
            ))
        }
        Err(e) => {
            crate::telemetry::events::ReviewReadFailed { what, error: &e }.emit();
            Err(StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}

async fn log_page(State(state): State<PageState>, Query(query): Query<LogQuery>) -> Response {
    let known = state.known();
    let Some(review) = state.review else {
        return off();
    };
    let query = query.tidy();
    let (filter, after, limit) = match (query.filter(Utc::now()), query.cursor(), query.limit()) {
        (Ok(f), Ok(a), Ok(l)) => (f, a, l),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return html_response(
                StatusCode::BAD_REQUEST,
                html::log_refused(&query, &e, &known),
            )
        }
    };
    let result = read(review, "log page", move |r| {
        let page = crate::review::log::page(r, &filter, after, limit)?;
        Ok((page, r.log_reach()?))
    })
    .await;
    match result {
        Ok((page, oldest)) => {
            let reach = html::Reach {
                oldest,
                retention: state.retention,
            };
            Html(html::log_page(&query, &page, &reach, &known)).into_response()
        }
        Err(response) => response,
    }
}

#[derive(Debug, Default, Deserialize)]
struct FunnelQuery {
    journey: Option<String>,
}

async fn funnel_page(State(state): State<PageState>, Query(query): Query<FunnelQuery>) -> Response {
    let known = state.known();
    let Some(review) = state.review else {
        return off();
    };
    let journey = query
        .journey
        .map(|j| j.trim().to_string())
        .filter(|j| !j.is_empty());
    let asked = journey.clone();
    match read(review, "funnel", move |r| {
        crate::review::funnel::funnels(r, asked.as_deref())
    })
    .await
    {
        Ok(report) => {
            let reach = html::Reach {
                oldest: report.log_reaches_back_to,
                retention: state.retention,
            };
            Html(html::funnel_page(
                &report,
                journey.as_deref(),
                &reach,
                &known,
            ))
            .into_response()
        }
        Err(response) => response,
    }
}

async fn customer_page(State(state): State<PageState>, Path(id): Path<String>) -> Response {
    let Some(review) = state.review else {
        return off();
    };
    // Reviewers never see contact details unmasked.
    match read(review, "decision record", move |r| {
        crate::review::record::decision_record(r, &id, false)
    })
    .await
    {
        Ok(record) => Html(html::customer_page(&record, state.retention)).into_response(),
        Err(response) => response,
    }
}

#[derive(Debug, Deserialize)]
struct CustomerQuery {
    id: String,
}

/// `/customer?id=`: the same page, for ids a path cannot carry (`..`).
async fn customer_by_query(
    state: State<PageState>,
    Query(query): Query<CustomerQuery>,
) -> Response {
    customer_page(state, Path(query.id)).await
}

async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS)
}

/// Gathers CSV into chunks and hands each to the response; a closed
/// channel (the client went away) fails the write, which ends the reads.
struct ChunkSender {
    buffer: Vec<u8>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    /// Released before the body ends (`tx` closes with the other sender).
    _download: tokio::sync::OwnedSemaphorePermit,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CSV_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CSV_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

async fn log_csv(State(state): State<PageState>, Query(query): Query<LogQuery>) -> Response {
    let Some(review) = state.review else {
        return off();
    };
    let query = query.tidy();
    let filter = match query.filter(Utc::now()) {
        Ok(f) => f,
        Err(e) => return bad_request(e),
    };
    let mut start = Vec::with_capacity(CSV_CHUNK);
    match query.bom.as_deref() {
        None | Some("0") => {}
        Some("1") => start.extend_from_slice("\u{feff}".as_bytes()),
        Some(other) => return bad_request(format!("bom: give 1 or 0, not `{other}`")),
    }
    let Ok(download) = state.downloads.clone().try_acquire_owned() else {
        let message = format!(
            "{CSV_DOWNLOADS} CSV downloads are under way, the most served at once: try again in a minute"
        );
        let mut response =
            html_response(StatusCode::SERVICE_UNAVAILABLE, html::error_page(&message));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("30"));
        return response;
    };
    let (tx, mut rx) = mpsc::channel(CSV_CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let errors = tx.clone();
        let mut writer = LogWriter::new(
            ChunkSender {
                buffer: start,
                tx,
                _download: download,
            },
            LogFormat::Csv,
        );
        for record in LogStream::new(&*review, filter, None) {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    crate::telemetry::events::ReviewReadFailed {
                        what: "csv",
                        error: &e,
                    }
                    .emit();
                    // Fails the body: the download ends as broken, not as a short file.
                    let _ = errors.blocking_send(Err(std::io::Error::other("store read failed")));
                    return;
                }
            };
            if writer.write(&record).is_err() {
                return; // the client went away
            }
        }
        let _ = writer.finish();
    });
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"nudge-log.csv\"",
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests;
