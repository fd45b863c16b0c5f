//! The admin server. Open, for probes: `/healthz` (the process answers),
//! `/readyz` (partitions assigned, store reachable, rules loaded; the
//! dead-letter backlog in its details) and `/metrics` (Prometheus text).
//! Behind a token ([`auth`]): everything else.

pub mod auth;
mod control;
pub mod page;
pub mod serve;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::sync::watch;

use crate::ingest::dlq::DeadLetterStatus;
use crate::ingest::Readiness;
use crate::rules::RulesHandle;
use crate::store::Store;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: PrometheusHandle,
    pub readiness: Arc<Readiness>,
    pub store: Arc<dyn Store>,
    pub rules: RulesHandle,
    /// Reported, not a readiness condition: a backlog of dead letters does
    /// not stop events from being processed (and a restart would not help).
    pub dead_letters: Arc<DeadLetterStatus>,
    pub tokens: Arc<auth::Tokens>,
    /// The audit stream (`audit.topic` and its publisher's status), when on;
    /// reported like dead letters, not a readiness condition.
    pub audit: Option<(String, Arc<crate::audit_stream::AuditStatus>)>,
    /// The review page's store reader and retention.
    pub page: page::PageState,
    /// Runtime control: the overrides in force, and the config they override.
    pub controls: crate::control::Controls,
    pub policy: Arc<crate::config::PolicyConfig>,
    /// The scheduler's results the store refuses, which its read probe
    /// does not see.
    pub sending: Arc<crate::scheduler::SendingHealth>,
}

impl FromRef<AdminState> for page::PageState {
    fn from_ref(state: &AdminState) -> Self {
        state.page.clone()
    }
}

/// How long a store probe may take before `/readyz` says the store is not answering.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `/readyz` waits for a probe it started before it answers with
/// the last one's result: the answer never waits for the store.
const PROBE_WAIT: Duration = Duration::from_millis(20);

pub fn router(state: AdminState) -> Router {
    let probe = Arc::new(StoreProbe::default());
    let tokens = state.tokens.clone();
    let reviewer = reviewer_routes(tokens.clone());
    // Routes that change state: the admin token only.
    let admin: Router<AdminState> = Router::new()
        .route("/admin/journeys", get(control::journeys))
        .route(
            "/admin/journeys/{name}",
            get(control::journey).put(control::change_journey),
        )
        .route("/admin/channels", get(control::channels))
        .route("/admin/channels/{kind}", put(control::change_channel))
        .route_layer(axum::middleware::from_fn_with_state(
            tokens,
            auth::require_admin,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move |s: State<AdminState>| ready(s, probe.clone())),
        )
        .route("/metrics", get(metrics))
        .merge(reviewer)
        .merge(admin)
        .fallback(not_found)
        .with_state(state)
}

/// A page a person can read, with the way back (a browser shows its own
/// blank error for an empty 404); it names nothing of the store.
async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::response::Html(page::html::not_found_page(uri.path())),
    )
        .into_response()
}

/// Routes any reviewer (or the admin) may read: the review page and
/// `/admin/whoami`, behind the reviewer's auth layer.
pub fn reviewer_routes<S>(tokens: Arc<auth::Tokens>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    page::PageState: FromRef<S>,
{
    page::routes()
        .route("/admin/whoami", get(whoami))
        .route_layer(axum::middleware::from_fn_with_state(
            tokens,
            auth::require_reviewer,
        ))
}

/// Which role a token has: lets a script check its token before using it.
async fn whoami(Extension(caller): Extension<auth::Caller>) -> impl IntoResponse {
    Json(json!({ "name": caller.name, "role": format!("{:?}", caller.role).to_lowercase() }))
}

/// The store's answer to a cheap query, taken beside `/readyz` rather than
/// inside it: a query waits for the store's writer, which a batch holds
/// while its scripts run (up to `rules.timeout` each), and a probe must
/// answer within its own deadline whatever the store does.
struct StoreProbe {
    state: Mutex<ProbeState>,
    /// Bumped when a probe ends.
    done: watch::Sender<u64>,
}

#[derive(Default)]
struct ProbeState {
    last: Option<Result<(), String>>,
    running_since: Option<Instant>,
}

impl Default for StoreProbe {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            done: watch::channel(0).0,
        }
    }
}

impl StoreProbe {
    /// Starts a probe unless one is running, waits briefly for it, and says
    /// what is known: `Ok` or why the store is not usable.
    async fn check(self: Arc<Self>, store: &Arc<dyn Store>) -> Result<(), String> {
        let mut done = self.done.subscribe();
        let start = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let start = state.running_since.is_none();
            if start {
                state.running_since = Some(Instant::now());
            }
            start
        };
        if start {
            let (probe, store) = (self.clone(), store.clone());
            tokio::task::spawn_blocking(move || {
                let result = store.next_due(None).map(|_| ()).map_err(|e| e.to_string());
                let mut state = probe.state.lock().unwrap_or_else(|e| e.into_inner());
                state.last = Some(result);
                state.running_since = None;
                drop(state);
                probe.done.send_modify(|n| *n += 1);
            });
        }
        let _ = tokio::time::timeout(PROBE_WAIT, done.changed()).await;
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match (&state.last, state.running_since) {
            // A probe of a store that is down may wait out the pool's
            // connection timeout: meanwhile the last answer says why.
            (Some(Err(e)), Some(since)) if since.elapsed() > STORE_PROBE_TIMEOUT => {
                Err(format!("unreachable: {e}"))
            }
            (_, Some(since)) if since.elapsed() > STORE_PROBE_TIMEOUT => Err(format!(
                "no answer within {}",
                crate::humanize::duration(STORE_PROBE_TIMEOUT)
            )),
            (Some(Ok(())), _) => Ok(()),
            (Some(Err(e)), _) => Err(format!("unreachable: {e}")),
            (None, _) => Err("first probe under way".into()),
        }
    }
}

async fn ready(State(s): State<AdminState>, probe: Arc<StoreProbe>) -> impl IntoResponse {
    let partitions = s.readiness.assigned_partitions();
    let problem = s.readiness.store_problem().or_else(|| s.sending.problem());
    let store_state = match (probe.check(&s.store).await, problem) {
        (Ok(()), None) => "ok".to_string(),
        (Ok(()), Some(problem)) => problem,
        // Ingest's own failed write names the cause; the probe may only
        // know that no answer came.
        (Err(e), Some(problem)) if e.starts_with("no answer") => problem,
        (Err(e), _) => e,
    };
    let store_ok = store_state == "ok";
    let rules = s.rules.current();
    let halted = s.readiness.halted();
    let kafka = s.readiness.kafka_state();
    let missing_topics = s.readiness.missing_topics();
    let reason = if let Some(why) = &halted {
        Some(format!("halted: {why}"))
    } else if !store_ok {
        Some(format!("store: {store_state}"))
    } else if !missing_topics.is_empty() {
        Some(format!(
            "kafka.topics: {} not on the broker",
            missing_topics
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    } else if partitions == 0 {
        Some(match kafka.as_str() {
            "ok" => "no partitions assigned (yet, or the group gave this replica none)".to_string(),
            _ => format!("no partitions assigned; kafka: {kafka}"),
        })
    } else if rules.journeys().is_empty() {
        Some("no journeys loaded".to_string())
    } else {
        None
    };
    let ready = reason.is_none();
    let body = json!({
        "ready": ready,
        "reason": reason,
        "halted": halted,
        "kafka": kafka,
        "assigned_partitions": partitions,
        "store": store_state,
        "rules_version": rules.version,
        "journeys": rules.journeys().len(),
        // Not a readiness condition (the rules in force run), but a restart
        // would not start: alert on it.
        "rules_refused": s.rules.refused(),
        "dead_letters": s.dead_letters.report(),
        "audit": s.audit.as_ref().map(|(topic, status)| status.report(topic)),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}

/// Installs the process-wide Prometheus recorder, set up for the metric
/// catalog (histogram buckets, `# HELP` lines).
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = crate::telemetry::prometheus()?.install_recorder()?;
    crate::telemetry::catalog::describe();
    Ok(handle)
}
