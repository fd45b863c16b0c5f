//! `nudge control`: the same admin API an operator's script calls, over
//! HTTP with the admin token, so the command line can do nothing the API
//! does not allow (and the change is logged the same way).

use std::time::Duration;

use serde_json::Value;

/// Where the API is and the token to use.
#[derive(Clone)]
pub struct Endpoint {
    /// `http://127.0.0.1:9464`, without a trailing slash.
    pub base: String,
    pub token: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Why a control request failed, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no nudge daemon answers at {base} (admin.listen, or --url): is it running? ({source})"
    )]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the admin API refused the token (401): it is not the daemon's admin token (admin.auth.admin_token_env / admin.auth.admin_token_file, or --token-env / --token-file)")]
    Unauthorized,
    #[error("the token is the reviewer's (403): changes need the admin token")]
    Forbidden,
    #[error("the control API is off (404): the daemon has no admin token configured (admin.auth.admin_token_env or admin.auth.admin_token_file)")]
    Off,
    #[error("{0} (404)")]
    NotFound(String),
    #[error("nothing answers at {base}{path} (404), and {base}/healthz is not nudge's: is --url the daemon's admin address, without a path?")]
    NotNudge { base: String, path: String },
    #[error("refused (400): {0}")]
    BadRequest(String),
    #[error("the daemon answered {status}: {body}")]
    Other { status: u16, body: String },
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// A 2xx whose body is not the change the API records: another server,
    /// or a proxy's page. The change may not have been made.
    #[error("the answer from {base} is not a nudge control change (no control log entry), so the change may not have been made: {body}")]
    NotAChange { base: String, body: String },
}

/// The base URL for an `admin.listen` address: a wildcard address is
/// reached on loopback.
pub fn base_url(listen: &str) -> String {
    let address = listen
        .strip_prefix("0.0.0.0:")
        .map(|port| format!("127.0.0.1:{port}"))
        .or_else(|| {
            listen
                .strip_prefix("[::]:")
                .map(|port| format!("[::1]:{port}"))
        })
        .unwrap_or_else(|| listen.to_string());
    format!("http://{address}")
}

impl Endpoint {
    /// GET `path`: the JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// PUT `body` to `path`: the control log entry the daemon answers with.
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let answer = self.call(reqwest::Method::PUT, path, Some(body)).await?;
        let entry = answer["seq"].is_u64()
            && answer["who"].is_string()
            && answer.get("before").is_some()
            && answer.get("after").is_some();
        match entry {
            true => Ok(answer),
            false => {
                let mut body = answer.to_string();
                if body.len() > 200 {
                    body.truncate(body.floor_char_boundary(200));
                    body.push('…');
                }
                Err(ClientError::NotAChange {
                    base: self.base.clone(),
                    body,
                })
            }
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        // A redirect is answered as the failure it is (it would take the
        // change elsewhere), not followed.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut request = client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|source| {
            if source.is_connect() || source.is_timeout() {
                ClientError::Unreachable {
                    base: self.base.clone(),
                    source,
                }
            } else {
                ClientError::Http(source)
            }
        })?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let error = || {
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
        };
        match status {
            200..=299 => serde_json::from_str(&text).map_err(|_| ClientError::Other {
                status,
                body: text.trim().to_string(),
            }),
            401 => Err(ClientError::Unauthorized),
            403 => Err(ClientError::Forbidden),
            404 => match error() {
                Some(message) => Err(ClientError::NotFound(message)),
                // The daemon answers a bare 404 when its control API is off;
                // so does any server at a wrong address.
                None if self.is_nudge(&client).await => Err(ClientError::Off),
                None => Err(ClientError::NotNudge {
                    base: self.base.clone(),
                    path: path.to_string(),
                }),
            },
            400 => Err(ClientError::BadRequest(
                error().unwrap_or_else(|| text.trim().to_string()),
            )),
            _ => Err(ClientError::Other {
                status,
                body: text.trim().to_string(),
            }),
        }
    }
}

impl Endpoint {
    /// Whether a nudge admin server answers at the base: its liveness probe.
    async fn is_nudge(&self, client: &reqwest::Client) -> bool {
        let probe = client.get(format!("{}/healthz", self.base)).send().await;
        match probe {
            Ok(r) if r.status().is_success() => r.text().await.is_ok_and(|t| t.trim() == "ok"),
            _ => false,
        }
    }
}

/// A journey name as the API takes it in a path: snake_case, as the rules
/// require, so that nothing in it can change the path it is put in.
pub fn journey_path(name: &str) -> Result<String, String> {
    let snake = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if snake {
        Ok(format!("/admin/journeys/{name}"))
    } else {
        Err(format!(
            "`{}` is not a journey name: journey names are snake_case (nudge check lists them)",
            name.escape_debug()
        ))
    }
}

/// "shadow: false → true, pilot_percent: 100 → 10" from a change's answer.
pub fn describe_change(before: &Value, after: &Value) -> String {
    let Some(after) = after.as_object() else {
        return format!("{before} → {after}");
    };
    after
        .iter()
        .map(|(field, now)| format!("{field}: {} → {now}", before[field]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The control log as a table, oldest first.
pub fn log_table(entries: &[crate::store::control::ControlEntry]) -> String {
    let mut out = String::from("seq\ttime\twho\ttarget\tchange\n");
    for e in entries {
        out.push_str(&format!(
            "{}\t{}\t{}\t{} {}\t{}\n",
            e.seq,
            e.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            e.who,
            e.kind,
            e.target,
            describe_change(&e.before, &e.after)
        ));
    }
    out
}
