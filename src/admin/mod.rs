//! Operator endpoints: `/healthz` (the process answers), `/readyz` (partitions
//! assigned, store reachable, rules loaded) and `/metrics` (Prometheus text).
//! Nothing here changes state, so nothing here needs a token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::ingest::Readiness;
use crate::rules::RulesHandle;
use crate::store::Store;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: PrometheusHandle,
    pub readiness: Arc<Readiness>,
    pub store: Arc<dyn Store>,
    pub rules: RulesHandle,
}

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
    let store_ok = tokio::task::spawn_blocking(move || store.next_due(None).is_ok())
        .await
        .unwrap_or(false);
    let rules = s.rules.current();
    let ready = partitions > 0 && store_ok && !rules.journeys().is_empty();
    let body = json!({
        "ready": ready,
        "assigned_partitions": partitions,
        "store": if store_ok { "ok" } else { "unreachable" },
        "rules_version": rules.version,
        "journeys": rules.journeys().len(),
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

/// Installs the process-wide Prometheus recorder with the latency
/// histograms' buckets (without buckets they would be summaries, which
/// cannot be aggregated across daemons).
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    const BUCKETS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("nudge_dispatch_seconds".into()),
            BUCKETS,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("nudge_ingest_batch_seconds".into()),
            BUCKETS,
        )?
        .install_recorder()?;
    Ok(handle)
}
