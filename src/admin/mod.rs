//! Operator endpoints: `/healthz` (the process answers), `/readyz` (partitions
//! assigned, store reachable, rules loaded; the dead-letter backlog in its
//! details) and `/metrics` (Prometheus text).
//! Nothing here changes state, so nothing here needs a token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

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
}

/// How long `/readyz` waits for the store before it says not ready.
const STORE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let partitions = s.readiness.assigned_partitions();
    let store = s.store.clone();
    // A store that does not answer in time is as good as down for a probe.
    let probe = tokio::time::timeout(
        STORE_PROBE_TIMEOUT,
        tokio::task::spawn_blocking(move || store.next_due(None).map(|_| ())),
    )
    .await;
    let store_state = match (probe, s.readiness.store_problem()) {
        (Ok(Ok(Ok(()))), None) => "ok".to_string(),
        (Ok(Ok(Ok(()))), Some(problem)) => problem,
        (Ok(Ok(Err(e))), _) => format!("unreachable: {e}"),
        (Ok(Err(e)), _) => format!("unreachable: {e}"),
        (Err(_), _) => format!(
            "no answer within {}",
            crate::humanize::duration(STORE_PROBE_TIMEOUT)
        ),
    };
    let store_ok = store_state == "ok";
    let rules = s.rules.current();
    let halted = s.readiness.halted();
    let ready = partitions > 0 && store_ok && !rules.journeys().is_empty() && halted.is_none();
    let body = json!({
        "ready": ready,
        "halted": halted,
        "assigned_partitions": partitions,
        "store": store_state,
        "rules_version": rules.version,
        "journeys": rules.journeys().len(),
        "dead_letters": s.dead_letters.report(),
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
