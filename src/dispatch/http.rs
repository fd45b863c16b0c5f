//! POSTs each message as JSON to the channel's endpoint.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, DATE, RETRY_AFTER};

use super::{Channel, DispatchError, Message, Withdrawal};

pub struct HttpChannel {
    client: reqwest::Client,
    url: reqwest::Url,
    token: Option<String>,
    /// A request's whole time, answer included (see [`answered_within`]).
    timeout: Duration,
}

impl HttpChannel {
    pub fn new(url: &str, timeout: Duration, token: Option<String>) -> Result<Self, DispatchError> {
        Self::with_ca(url, timeout, token, None)
    }

    /// `extra_ca_pem`: certificates to trust besides the system's (a private CA).
    pub fn with_ca(
        url: &str,
        timeout: Duration,
        token: Option<String>,
        extra_ca_pem: Option<&[u8]>,
    ) -> Result<Self, DispatchError> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| DispatchError::Transport(format!("bad url {url}: {e}")))?;
        // A redirect is not followed: a 303 would turn the POST into a GET
        // without the message, and a 307 would hand the message and its
        // token to whatever the Location names. The 3xx is a final failure.
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64);
        if let Some(pem) = extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| DispatchError::Transport(format!("ca_file: {e}")))?;
            if certs.is_empty() {
                return Err(DispatchError::Transport(
                    "ca_file: no PEM certificate found".into(),
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| DispatchError::Transport(e.to_string()))?;
        Ok(Self {
            client,
            url,
            token,
            timeout,
        })
    }
}

impl Channel for HttpChannel {
    fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), DispatchError>> {
        Box::pin(async move {
            self.post(&message.idempotency_key, message)
                .await
                .map(|_| ())
        })
    }

    fn send_answered<'a>(
        &'a self,
        message: &'a Message,
    ) -> BoxFuture<'a, Result<Option<u16>, DispatchError>> {
        Box::pin(async move { self.post(&message.idempotency_key, message).await.map(Some) })
    }

    fn withdraw_answered<'a>(
        &'a self,
        withdrawal: &'a Withdrawal,
    ) -> BoxFuture<'a, Result<Option<u16>, DispatchError>> {
        Box::pin(async move { self.post(&withdrawal.key(), withdrawal).await.map(Some) })
    }

    /// The same endpoint, token and error classification as a send.
    fn withdraw<'a>(
        &'a self,
        withdrawal: &'a Withdrawal,
    ) -> BoxFuture<'a, Result<(), DispatchError>> {
        Box::pin(async move { self.post(&withdrawal.key(), withdrawal).await.map(|_| ()) })
    }
}

impl HttpChannel {
    /// POSTs `body` as JSON with `key` as its `Idempotency-Key`; the
    /// receiver's (successful) HTTP status, within the channel's timeout.
    async fn post<T: serde::Serialize + ?Sized>(
        &self,
        key: &str,
        body: &T,
    ) -> Result<u16, DispatchError> {
        answered_within(self.timeout, self.exchange(key, body))
            .await
            .unwrap_or(Err(DispatchError::Timeout))
    }

    async fn exchange<T: serde::Serialize + ?Sized>(
        &self,
        key: &str,
        body: &T,
    ) -> Result<u16, DispatchError> {
        {
            let mut request = self
                .client
                .post(self.url.clone())
                .header("Idempotency-Key", key)
                .json(body);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            let mut response = request.send().await.map_err(|e| {
                if e.is_timeout() {
                    DispatchError::Timeout
                } else {
                    DispatchError::Transport(with_causes(&e))
                }
            })?;
            let status = response.status();
            if status.is_success() {
                return Ok(status.as_u16());
            }
            let code = status.as_u16();
            // 408 and 429 ask us to come back; other 4xx are final.
            if status.is_server_error() || code == 408 || code == 429 {
                return Err(DispatchError::Unavailable {
                    status: code,
                    retry_after: retry_after(response.headers()),
                });
            }
            if status.is_redirection() {
                return Err(DispatchError::Rejected {
                    status: code,
                    body:
                        "a redirect, not followed: the endpoint's url should name where it answers"
                            .into(),
                });
            }
            // Only the start of the body is read: the excerpt keeps 200 bytes,
            // and a receiver's error page may be any size.
            let mut head = Vec::new();
            while head.len() < REFUSAL_READ {
                match response.chunk().await {
                    Ok(Some(chunk)) => head.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            head.truncate(REFUSAL_READ);
            Err(DispatchError::Rejected {
                status: code,
                body: excerpt(&String::from_utf8_lossy(&head)),
            })
        }
    }
}

/// How much of a refusal's body is read for its excerpt.
const REFUSAL_READ: usize = 2048;

/// How far past its deadline a timeout may fire before this process is
/// taken to have stood still (SIGSTOP, a paused VM, starved of CPU) rather
/// than the receiver to have been slow.
const STALL: Duration = Duration::from_secs(1);

/// After such a stall, how long an answer that may already have arrived
/// gets to be read.
const AFTER_STALL: Duration = Duration::from_millis(500);

/// `exchange`'s result if it completes within `timeout`. A deadline noticed
/// only well after it passed means this process stood still meanwhile, and
/// the receiver's answer may be waiting unread in the socket: it gets a
/// moment to be read, so that a delivered message is recorded as sent, not
/// as timed out and sent again. (reqwest's own timeout is checked before
/// the response, so it would discard that answer.)
async fn answered_within<F: std::future::Future>(
    timeout: Duration,
    exchange: F,
) -> Option<F::Output> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut exchange = std::pin::pin!(exchange);
    if let Ok(done) = tokio::time::timeout_at(deadline, &mut exchange).await {
        return Some(done);
    }
    if tokio::time::Instant::now() - deadline < STALL {
        return None;
    }
    tokio::time::timeout(AFTER_STALL, exchange).await.ok()
}

/// The error with what caused it (a refused certificate, a closed
/// connection, a name that does not resolve): reqwest's own message names
/// only the request.
fn with_causes(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), &shown_url(url));
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// The endpoint as failures name it: no credentials and no query, since
/// the reason is recorded in the dispatch log that reviewers read and the
/// audit topic carries (a receiver may take its key as `?api_key=`).
fn shown_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_fragment(None);
    let query = shown.query().is_some();
    shown.set_query(None);
    match query {
        true => format!("{shown}?…"),
        false => shown.to_string(),
    }
}

/// `Retry-After` as a wait: delay-seconds, or an HTTP-date. A date is
/// measured against the response's own `Date` when it has one, so that the
/// two hosts' clock skew does not count, else against this host's clock; a
/// date already past is no wait. An unreadable value is ignored (the
/// scheduler's own backoff applies). The scheduler bounds the wait.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = http_date(value)?;
    let now = headers
        .get(DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| http_date(d.trim()))
        .unwrap_or_else(Utc::now);
    Some((at - now).to_std().unwrap_or_default())
}

/// An HTTP-date (RFC 9110 5.6.7): the IMF-fixdate every sender must use,
/// and the two obsolete forms a recipient must still accept.
fn http_date(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc2822(text) {
        return Some(t.to_utc());
    }
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .into_iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|t| t.and_utc())
}

/// The start of a refusal's body, for the dispatch log's reason: at most 200
/// bytes, cut on a character boundary, control characters (a NUL, which
/// PostgreSQL cannot store in text, or line breaks) as spaces, and contact
/// details masked (a receiver's error often quotes the address it refused,
/// and the log is read by marketing; customer data there is kept to ids).
/// The body is the endpoint's to choose; a log record must never fail
/// because of it.
fn excerpt(body: &str) -> String {
    let head: String = body.chars().take(400).collect();
    let masked = crate::mask::mask_contacts(&head);
    let mut out = String::with_capacity(masked.len().min(200));
    for c in masked.chars() {
        if out.len() + c.len_utf8() > 200 {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, StatusCode};

    use super::*;
    use crate::dispatch::conformance::{delivers, sample_message};

    /// The runtime's clock jumps past a send's deadline, as after SIGSTOP:
    /// the timeout is noticed first, the answer only just after.
    #[tokio::test(start_paused = true)]
    async fn an_answer_that_came_while_the_process_stood_still_is_read_not_timed_out() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u16>();
        let send = tokio::spawn(answered_within(Duration::from_secs(5), rx));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(12)).await;
            tx.send(200).unwrap();
        });
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(12)).await;
        assert_eq!(send.await.unwrap(), Some(Ok(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_that_never_answers_times_out_at_the_timeout() {
        let (_tx, rx) = tokio::sync::oneshot::channel::<u16>();
        let started = tokio::time::Instant::now();
        assert_eq!(answered_within(Duration::from_secs(5), rx).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[test]
    fn a_refusal_body_is_cut_on_a_character_boundary_without_control_characters() {
        // The two bytes of `é` straddle byte 200: `String::truncate(200)` panics there.
        let body = format!("{}\u{0}é{}", "x".repeat(198), "y".repeat(50));
        let e = excerpt(&body);
        assert_eq!(e, format!("{} ", "x".repeat(198)));
        assert_eq!(excerpt(&format!("{}é", "x".repeat(197))).len(), 199);
        assert_eq!(excerpt("bad\r\nrequest"), "bad  request");
        assert_eq!(excerpt(""), "");
        // Contact details a receiver quotes back are masked.
        assert_eq!(
            excerpt(r#"{"error": "mailbox h14.secret@example.com does not exist"}"#),
            r#"{"error": "mailbox h***@example.com does not exist"}"#
        );
        assert_eq!(
            excerpt("no such number: +61 400 123 456 (code 404)"),
            "no such number: +** *** *** *56 (code 404)"
        );
        assert_eq!(
            excerpt("unknown template t_42 at 2026-12-05T12:30:00Z"),
            "unknown template t_42 at 2026-12-05T12:30:00Z"
        );
    }

    /// A real endpoint on 127.0.0.1 answering `status`, recording what it got.
    async fn endpoint(status: StatusCode) -> (String, Arc<Mutex<Vec<(HeaderMap, Message)>>>) {
        endpoint_with(status, &[]).await
    }

    /// As `endpoint`, with these headers on every answer.
    async fn endpoint_with(
        status: StatusCode,
        answer_headers: &[(&'static str, &str)],
    ) -> (String, Arc<Mutex<Vec<(HeaderMap, Message)>>>) {
        let got: Arc<Mutex<Vec<(HeaderMap, Message)>>> = Arc::default();
        let seen = got.clone();
        let mut answer = HeaderMap::new();
        for (name, value) in answer_headers {
            answer.insert(*name, value.parse().unwrap());
        }
        let app = axum::Router::new().fallback(
            move |headers: HeaderMap, axum::Json(m): axum::Json<Message>| {
                let (seen, answer) = (seen.clone(), answer.clone());
                async move {
                    seen.lock().unwrap().push((headers, m));
                    (status, answer)
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/push", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, got)
    }

    #[tokio::test]
    async fn http_channel_conforms_and_sends_key_and_token() {
        let (url, got) = endpoint(StatusCode::OK).await;
        let ch = HttpChannel::new(&url, Duration::from_secs(5), Some("t0ken".into())).unwrap();
        delivers(&ch).await;
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, sample_message());
        assert_eq!(got[0].0["idempotency-key"], "unsigned_loan-abc:email");
        assert_eq!(got[0].0["authorization"], "Bearer t0ken");
    }

    /// A withdrawal goes to the channel's endpoint with exactly the body
    /// and key of the contract; a 503 is retryable like a send's.
    #[tokio::test]
    async fn a_withdrawal_posts_the_exact_body_and_key_and_a_503_is_retryable() {
        type Got = Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>;
        async fn receiver(status: StatusCode) -> (String, Got) {
            let got: Got = Arc::default();
            let seen = got.clone();
            let app = axum::Router::new().fallback(
                move |headers: HeaderMap, axum::Json(v): axum::Json<serde_json::Value>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push((headers, v));
                        status
                    }
                },
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/call-tasks", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            (url, got)
        }
        let withdrawal = Withdrawal::new("unsigned_loan-abc", "call", "converted");
        let (url, got) = receiver(StatusCode::OK).await;
        let ch = HttpChannel::new(&url, Duration::from_secs(5), Some("t0ken".into())).unwrap();
        ch.withdraw(&withdrawal).await.unwrap();
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(
                got[0].1,
                serde_json::json!({
                    "action": "withdraw",
                    "idempotency_key": "unsigned_loan-abc:call",
                    "reason": "converted"
                })
            );
            assert_eq!(
                got[0].0["idempotency-key"],
                "unsigned_loan-abc:call:withdraw"
            );
            assert_eq!(got[0].0["authorization"], "Bearer t0ken");
        }

        let (url, got) = receiver(StatusCode::SERVICE_UNAVAILABLE).await;
        let ch = HttpChannel::new(&url, Duration::from_secs(5), None).unwrap();
        let e = ch.withdraw(&withdrawal).await.unwrap_err();
        assert!(e.retryable(), "{e}");
        assert_eq!(got.lock().unwrap().len(), 1);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn retry_after_reads_seconds_and_the_three_date_forms() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "120")])),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", " 0 ")])),
            Some(Duration::ZERO)
        );
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        for form in [
            "Sun, 06 Nov 1994 08:50:07 GMT",
            "Sunday, 06-Nov-94 08:50:07 GMT",
            "Sun Nov  6 08:50:07 1994",
        ] {
            assert_eq!(
                retry_after(&headers(&[("retry-after", form), ("date", date)])),
                Some(Duration::from_secs(30)),
                "{form}"
            );
        }
        let past = headers(&[
            ("retry-after", "Sun, 06 Nov 1994 08:49:00 GMT"),
            ("date", date),
        ]);
        assert_eq!(
            retry_after(&past),
            Some(Duration::ZERO),
            "a past date: no wait"
        );
        for unreadable in ["-5", "soon", "1.5", "", "Sun, 06 Nov 1994"] {
            assert_eq!(
                retry_after(&headers(&[("retry-after", unreadable)])),
                None,
                "{unreadable:?}"
            );
        }
        assert_eq!(retry_after(&HeaderMap::new()), None);
        // Without `Date`, against this host's clock.
        let at = (Utc::now() + chrono::Duration::seconds(60))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let wait = retry_after(&headers(&[("retry-after", &at)])).unwrap();
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
    }

    /// A real endpoint's `Retry-After` on 429 and 503 reaches the scheduler
    /// with the error; on a 500 or without the header there is none.
    #[tokio::test]
    async fn retry_after_comes_back_with_the_error() {
        let date = "Fri, 04 Dec 2026 16:00:00 GMT";
        for (status, answer, want) in [
            (
                StatusCode::TOO_MANY_REQUESTS,
                vec![("retry-after", "7")],
                Some(7),
            ),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                vec![
                    ("retry-after", "Fri, 04 Dec 2026 16:02:00 GMT"),
                    ("date", date),
                ],
                Some(120),
            ),
            (StatusCode::SERVICE_UNAVAILABLE, vec![], None),
            (
                StatusCode::TOO_MANY_REQUESTS,
                vec![("retry-after", "later")],
                None,
            ),
        ] {
            let (url, _) = endpoint_with(status, &answer).await;
            let ch = HttpChannel::new(&url, Duration::from_secs(5), None).unwrap();
            let err = ch.send(&sample_message()).await.unwrap_err();
            assert!(err.retryable(), "{err}");
            assert_eq!(
                err.retry_after(),
                want.map(Duration::from_secs),
                "{status} {answer:?}"
            );
            if let Some(s) = want {
                let said = crate::humanize::duration(Duration::from_secs(s));
                assert!(
                    err.to_string().ends_with(&format!("retry after {said}")),
                    "{err}"
                );
            }
        }
    }

    #[tokio::test]
    async fn errors_say_whether_to_retry() {
        for (status, retry) in [
            (StatusCode::SERVICE_UNAVAILABLE, true),
            (StatusCode::TOO_MANY_REQUESTS, true),
            (StatusCode::BAD_REQUEST, false),
            (StatusCode::NOT_FOUND, false),
        ] {
            let (url, _) = endpoint(status).await;
            let ch = HttpChannel::new(&url, Duration::from_secs(5), None).unwrap();
            let err = ch.send(&sample_message()).await.unwrap_err();
            assert_eq!(err.retryable(), retry, "{status}: {err}");
            if !retry {
                assert!(err.to_string().contains(&status.as_u16().to_string()));
            }
        }
        // Nothing listening: a transport error, retried.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ch = HttpChannel::new(
            &format!("http://user:URLPASS@127.0.0.1:{port}/push?api_key=QUERYKEY#f"),
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        let err = ch.send(&sample_message()).await.unwrap_err();
        assert!(err.retryable());
        // The cause is named, not only the request.
        assert!(err.to_string().contains("Connection refused"), "{err}");
        // The endpoint is named without what could be its key (the reason
        // reaches the review page and the audit topic).
        assert!(
            err.to_string()
                .contains(&format!("(http://127.0.0.1:{port}/push?…)")),
            "{err}"
        );
        for secret in ["URLPASS", "QUERYKEY", "user"] {
            assert!(!err.to_string().contains(secret), "{err}");
        }
    }

    /// A redirect is a final failure: neither a 303 (the message would be
    /// lost to a GET) nor a 307 (the message and its token would go where
    /// the Location says) is followed.
    #[tokio::test]
    async fn a_redirect_is_refused_not_followed() {
        let (elsewhere, got_elsewhere) = endpoint(StatusCode::OK).await;
        for status in [
            StatusCode::FOUND,
            StatusCode::SEE_OTHER,
            StatusCode::TEMPORARY_REDIRECT,
        ] {
            let (url, got) = endpoint_with(status, &[("location", &elsewhere)]).await;
            let ch = HttpChannel::new(&url, Duration::from_secs(5), Some("t0ken".into())).unwrap();
            let err = ch.send(&sample_message()).await.unwrap_err();
            assert!(!err.retryable(), "{status}: {err}");
            assert!(
                err.to_string().contains(&status.as_u16().to_string()),
                "{err}"
            );
            assert!(err.to_string().contains("redirect, not followed"), "{err}");
            assert_eq!(got.lock().unwrap().len(), 1);
        }
        assert!(got_elsewhere.lock().unwrap().is_empty());
    }

    /// A refusal's body is read only as far as its excerpt needs: an error
    /// page of any size, even one that never ends, costs a few kilobytes.
    #[tokio::test]
    async fn only_the_start_of_a_refusals_body_is_read() {
        let app = axum::Router::new().fallback(|| async {
            use futures::StreamExt;
            let head = futures::stream::iter([Ok::<_, std::io::Error>(
                axum::body::Bytes::from_static(b"{\"error\": \"bad template\"}"),
            )]);
            let endless =
                futures::stream::repeat_with(|| Ok(axum::body::Bytes::from(vec![b' '; 64 << 10])));
            (
                StatusCode::BAD_REQUEST,
                axum::body::Body::from_stream(head.chain(endless)),
            )
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/push", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let ch = HttpChannel::new(&url, Duration::from_secs(5), None).unwrap();
        let err = ch.send(&sample_message()).await.unwrap_err();
        assert_eq!(
            err,
            DispatchError::Rejected {
                status: 400,
                body: format!("{{\"error\": \"bad template\"}}{}", " ".repeat(200 - 25)),
            }
        );
    }
}
