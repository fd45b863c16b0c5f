//! The control API (admin token only, see [`super::auth`]): journeys' and
//! channels' settings read and changed at run time ([`crate::control`]).
//!
//! - `GET /admin/journeys`, `GET /admin/journeys/{name}`: settings in force
//!   and where each comes from.
//! - `PUT /admin/journeys/{name}`: any of `enabled`, `shadow`,
//!   `pilot_percent`, `holdout_percent` (`null` clears the override).
//! - `GET /admin/channels`, `PUT /admin/channels/{kind}`: `{"enabled": false}`
//!   stops a channel, `true` resumes it.
//!
//! A change is stored with its control-log entry, then put in force here at
//! once (the other replicas within [`crate::control::REFRESH`]); the answer
//! carries the entry: `seq`, `who`, `before`, `after`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Caller;
use super::AdminState;
use crate::control::{channel_setting, JourneySettings, Patch, CHANNEL, JOURNEY};
use crate::model::ChannelKind;
use crate::store::control::{ControlChange, ControlEntry};
use crate::telemetry::events::ControlChanged;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn store_error(e: impl std::fmt::Display) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the store did not take the change: {e}"),
    )
}

fn unknown_journey(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("unknown journey `{name}`: not in the rules loaded"),
    )
}

pub async fn journeys(State(s): State<AdminState>) -> Response {
    let rules = s.rules.current();
    let overrides = s.controls.current();
    let list: Vec<Value> = rules
        .journeys()
        .iter()
        .map(|j| {
            let o = overrides.journey(&j.name);
            JourneySettings::of(j, &s.policy, o).view(&j.name, o)
        })
        .collect();
    Json(json!({ "journeys": list })).into_response()
}

pub async fn journey(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    let rules = s.rules.current();
    let Some(j) = rules.journey(&name) else {
        return unknown_journey(&name);
    };
    let overrides = s.controls.current();
    let o = overrides.journey(&name);
    Json(JourneySettings::of(j, &s.policy, o).view(&name, o)).into_response()
}

pub async fn change_journey(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let patch = match crate::control::journey_patch(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let rules = s.rules.current();
    if rules.journey(&name).is_none() {
        return unknown_journey(&name);
    }
    let entry = {
        let (s, name) = (s.clone(), name.clone());
        apply(s.clone(), caller, JOURNEY, name.clone(), move |current| {
            let j = rules.journey(&name).expect("checked above");
            patch.journey_edit(j, &s.policy, current)
        })
        .await
    };
    let entry = match entry {
        Ok(e) => e,
        Err(response) => return response,
    };
    let overrides = s.controls.current();
    let o = overrides.journey(&name);
    let rules = s.rules.current();
    let settings = rules
        .journey(&name)
        .map(|j| JourneySettings::of(j, &s.policy, o).view(&name, o));
    Json(json!({
        "seq": entry.seq,
        "time": entry.time,
        "who": entry.who,
        "journey": name,
        "before": entry.before,
        "after": entry.after,
        "settings": settings,
    }))
    .into_response()
}

pub async fn channels(State(s): State<AdminState>) -> Response {
    let overrides = s.controls.current();
    let list: Vec<Value> = ChannelKind::ALL
        .into_iter()
        .map(|c| {
            let setting = channel_setting(c, &s.policy, &overrides);
            json!({ "channel": c, "enabled": setting.value, "source": setting.source })
        })
        .collect();
    Json(json!({ "channels": list })).into_response()
}

pub async fn change_channel(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(kind): Path<String>,
    body: Bytes,
) -> Response {
    let patch: Patch = match crate::control::channel_patch(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let Ok(channel) = kind.parse::<ChannelKind>() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown channel `{kind}`: channels are push, email and call_task"),
        );
    };
    let policy = s.policy.clone();
    let entry = apply(s.clone(), caller, CHANNEL, kind, move |current| {
        patch.channel_edit(channel, &policy, current)
    })
    .await;
    let entry = match entry {
        Ok(e) => e,
        Err(response) => return response,
    };
    let setting = channel_setting(channel, &s.policy, &s.controls.current());
    Json(json!({
        "seq": entry.seq,
        "time": entry.time,
        "who": entry.who,
        "channel": channel,
        "before": entry.before,
        "after": entry.after,
        "enabled": setting.value,
        "source": setting.source,
    }))
    .into_response()
}

/// Stores the change with its log entry, then puts the overrides in force
/// here before answering, off the async workers (the store blocks).
async fn apply(
    s: AdminState,
    caller: Caller,
    kind: &'static str,
    target: String,
    edit: impl Fn(&serde_json::Map<String, Value>) -> crate::store::control::ControlEdit
        + Send
        + Sync
        + 'static,
) -> Result<ControlEntry, Response> {
    let store = s.store.clone();
    let controls = s.controls.clone();
    let now = chrono::Utc::now();
    let done = tokio::task::spawn_blocking(move || {
        let entry = store.change_control(&ControlChange {
            kind,
            target: &target,
            who: caller.name,
            at: now,
            edit: &edit,
        })?;
        // In force before the answer; a failure here is caught up by the
        // periodic refresh.
        if let Err(e) = controls.load(store.as_ref()) {
            crate::telemetry::events::ControlRefreshFailed { error: &e }.emit();
        }
        Ok::<_, crate::store::StoreError>(entry)
    })
    .await;
    match done {
        Ok(Ok(entry)) => {
            ControlChanged { entry: &entry }.emit();
            Ok(entry)
        }
        Ok(Err(e)) => Err(store_error(e)),
        Err(e) => Err(store_error(e)),
    }
}
