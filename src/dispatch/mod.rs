//! Channel adapters: how a due step leaves nudge. Every message carries an
//! idempotency key that is stable across retries and restarts (instance +
//! step), so the receiver can drop repeats; errors say whether to retry.

mod http;
mod rate;
mod recording;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::model::{ChannelKind, HistoryEntry, Variables};

pub use http::HttpChannel;
pub use rate::{Rate, RateLimiter};
pub use recording::RecordingChannel;

/// What a channel receives for one step (the JSON body of the HTTP adapter).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub idempotency_key: String,
    pub customer: String,
    pub journey: String,
    pub instance: String,
    pub step: String,
    pub channel: ChannelKind,
    pub template: String,
    pub variables: Variables,
    /// Address for this channel (email or phone) when the channel needs one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub address: Option<String>,
    /// What this journey already told the customer, oldest first, so the next
    /// message (or the agent taking the call) continues the conversation.
    pub history: Vec<HistoryEntry>,
    pub attempt: u32,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DispatchError {
    /// The receiver refused the message; sending it again will not help.
    #[error("rejected with HTTP {status}{}", body_hint(body))]
    Rejected { status: u16, body: String },
    /// The receiver is overloaded or failing; try again later, not before
    /// `retry_after` when it said when (`Retry-After` on a 429 or 503).
    #[error("unavailable: HTTP {status}{}", retry_hint(retry_after))]
    Unavailable {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The request may have reached the receiver: delivery is unknown.
    #[error("timed out (the receiver may have it)")]
    Timeout,
    #[error("transport error: {0}")]
    Transport(String),
    #[error("no adapter configured for channel {0}")]
    NotConfigured(ChannelKind),
}

/// `: <the receiver's body>`, or nothing when it sent none.
fn body_hint(body: &str) -> String {
    match body.trim() {
        "" => String::new(),
        body => format!(": {body}"),
    }
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(", retry after {}", crate::humanize::duration(*d)),
        None => String::new(),
    }
}

impl DispatchError {
    /// How long the receiver asked us to wait before trying again, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DispatchError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The kind of error, for logs and metrics (no receiver's text).
    pub fn kind(&self) -> &'static str {
        match self {
            DispatchError::Rejected { .. } => "rejected",
            DispatchError::Unavailable { .. } => "unavailable",
            DispatchError::Timeout => "timeout",
            DispatchError::Transport(_) => "transport",
            DispatchError::NotConfigured(_) => "not_configured",
        }
    }

    /// The receiver's HTTP status, when it answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            DispatchError::Rejected { status, .. } | DispatchError::Unavailable { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(
            self,
            DispatchError::Unavailable { .. }
                | DispatchError::Timeout
                | DispatchError::Transport(_)
        )
    }
}

/// What a channel receives to take back a step it delivered (an open call
/// task, an in-app card) when the journey ended by an exit event, so that
/// no agent calls a customer who already signed. Sent with the header
/// `Idempotency-Key: <instance>:<step>:withdraw`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Withdrawal {
    /// Always `"withdraw"`.
    pub action: String,
    /// The idempotency key the step was delivered with (`<instance>:<step>`).
    pub idempotency_key: String,
    /// How the journey ended (`converted`, `cancelled`), or why the customer
    /// may no longer be contacted on the channel (`consent_withdrawn`,
    /// `unreachable`, `contact_changed`).
    pub reason: String,
}

impl Withdrawal {
    pub fn new(instance: &str, step: &str, reason: &str) -> Self {
        Self {
            action: "withdraw".into(),
            idempotency_key: crate::model::idempotency_key(instance, step),
            reason: reason.into(),
        }
    }

    /// The key the receiver drops repeats of this withdrawal by.
    pub fn key(&self) -> String {
        format!("{}:withdraw", self.idempotency_key)
    }
}

pub trait Channel: Send + Sync {
    fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), DispatchError>>;

    /// [`send`](Self::send), with the receiver's HTTP status when the
    /// adapter speaks HTTP (the decision record keeps it per attempt).
    fn send_answered<'a>(
        &'a self,
        message: &'a Message,
    ) -> BoxFuture<'a, Result<Option<u16>, DispatchError>> {
        Box::pin(async move { self.send(message).await.map(|()| None) })
    }

    /// [`withdraw`](Self::withdraw), with the receiver's HTTP status as
    /// [`send_answered`](Self::send_answered) gives it.
    fn withdraw_answered<'a>(
        &'a self,
        withdrawal: &'a Withdrawal,
    ) -> BoxFuture<'a, Result<Option<u16>, DispatchError>> {
        Box::pin(async move { self.withdraw(withdrawal).await.map(|()| None) })
    }

    /// Takes back a delivered step. Adapters that cannot say it refuse
    /// (not configured), so a withdrawal is never reported done unsaid.
    fn withdraw<'a>(
        &'a self,
        withdrawal: &'a Withdrawal,
    ) -> BoxFuture<'a, Result<(), DispatchError>> {
        let _ = withdrawal;
        Box::pin(async {
            Err(DispatchError::Transport(
                "this adapter cannot withdraw".into(),
            ))
        })
    }
}

/// The adapters by channel kind, each with its own concurrency limit so a
/// slow channel cannot hold up the others.
#[derive(Clone, Default)]
pub struct Channels {
    adapters: HashMap<ChannelKind, (Arc<dyn Channel>, usize)>,
    /// `channels.<kind>.rate`: the channels with a send-rate limit.
    rates: HashMap<ChannelKind, Arc<RateLimiter>>,
}

impl Channels {
    pub fn with(
        mut self,
        kind: ChannelKind,
        channel: Arc<dyn Channel>,
        concurrency: usize,
    ) -> Self {
        self.adapters.insert(kind, (channel, concurrency.max(1)));
        self
    }

    /// The same adapter for every channel (simulate, tests).
    pub fn all(channel: Arc<dyn Channel>) -> Self {
        ChannelKind::ALL
            .into_iter()
            .fold(Self::default(), |c, k| c.with(k, channel.clone(), 64))
    }

    pub fn get(&self, kind: ChannelKind) -> Option<&Arc<dyn Channel>> {
        self.adapters.get(&kind).map(|(c, _)| c)
    }

    pub fn concurrency(&self, kind: ChannelKind) -> usize {
        self.adapters.get(&kind).map(|(_, n)| *n).unwrap_or(1)
    }

    /// Limits the channel's sends to `rate` (see [`RateLimiter`]).
    pub fn with_rate(mut self, kind: ChannelKind, rate: Rate) -> Self {
        self.rates.insert(kind, Arc::new(RateLimiter::new(rate)));
        self
    }

    /// The channel's send-rate limit, if it has one.
    pub fn rate(&self, kind: ChannelKind) -> Option<&RateLimiter> {
        self.rates.get(&kind).map(Arc::as_ref)
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Every adapter must deliver a message to a healthy receiver exactly as given.
    use super::*;

    pub fn sample_message() -> Message {
        Message {
            idempotency_key: crate::model::idempotency_key("unsigned_loan-abc", "email"),
            customer: "c1".into(),
            journey: "unsigned_loan".into(),
            instance: "unsigned_loan-abc".into(),
            step: "email".into(),
            channel: ChannelKind::Email,
            template: "loan_unsigned_email".into(),
            variables: serde_json::json!({"product":"home loan"})
                .as_object()
                .unwrap()
                .clone()
                .into(),
            address: Some("c1@example.com".into()),
            history: vec![HistoryEntry {
                step: "push".into(),
                channel: "push".into(),
                template: "loan_unsigned_push".into(),
                sent_at: "2026-01-01T00:00:00Z".into(),
            }],
            attempt: 1,
        }
    }

    pub async fn delivers(channel: &dyn Channel) {
        channel
            .send(&sample_message())
            .await
            .expect("healthy receiver accepts");
    }

    #[test]
    fn variables_go_out_as_stored_and_come_back_as_a_map() {
        let text = r#"{"product":"home loan","amount":18.99,"nested":{"a":[1,2]}}"#;
        let vars = Variables::from_json(text.into()).unwrap();
        let mut message = sample_message();
        message.variables = vars.clone();
        let body = serde_json::to_string(&message).unwrap();
        assert!(body.contains(&format!(r#""variables":{text}"#)), "{body}");
        let back: Message = serde_json::from_str(&body).unwrap();
        assert_eq!(back.variables, vars);
        assert_eq!(back.variables.get("amount"), Some(serde_json::json!(18.99)));
        let via_value: Message =
            serde_json::from_value(serde_json::to_value(&message).unwrap()).unwrap();
        assert_eq!(via_value, message);
        assert!(Variables::from_json("[1]".into()).is_err());
        assert!(Variables::from_json("{\"a\":".into()).is_err());
        assert_eq!(Variables::default().as_json(), "{}");
    }

    #[test]
    fn a_refusal_quotes_the_receivers_body_only_when_there_is_one() {
        let refused = |body: &str| {
            DispatchError::Rejected {
                status: 400,
                body: body.into(),
            }
            .to_string()
        };
        assert_eq!(refused(""), "rejected with HTTP 400");
        assert_eq!(
            refused("no such user"),
            "rejected with HTTP 400: no such user"
        );
    }

    #[test]
    fn channel_kind_round_trips() {
        for k in ChannelKind::ALL {
            assert_eq!(k.as_str().parse::<ChannelKind>().unwrap(), k);
        }
        assert!("fax".parse::<ChannelKind>().is_err());
    }
}
