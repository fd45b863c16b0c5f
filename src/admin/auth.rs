//! Who may use the review page and the control API: two roles, each with
//! one token read from env or a file (`admin.auth`). A role without a token
//! is off (404), never open. Browsers send the token as the password of
//! HTTP basic auth (any user name); scripts send `Authorization: Bearer`.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::config::{constant_time_eq, AuthConfig, ConfigError};
use crate::telemetry::events::AdminAuthRefused;

/// What a caller may do. `Admin` includes everything a `Reviewer` may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read the dispatch log, funnels and decision records (addresses masked).
    Reviewer,
    /// Also change journeys and channels at run time and unmask addresses.
    Admin,
}

/// The authenticated caller, put in the request's extensions for handlers
/// that record who did something (`Extension<Caller>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The token's name as recorded in the control log: `admin` or `reviewer`.
    pub name: &'static str,
}

/// The configured tokens, read once at start-up.
#[derive(Clone, Default)]
pub struct Tokens {
    admin: Option<String>,
    reviewer: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("admin", &self.admin.as_ref().map(|_| "<set>"))
            .field("reviewer", &self.reviewer.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Tokens {
    pub fn from_config(config: &AuthConfig) -> Result<Self, ConfigError> {
        let tokens = Self {
            admin: config.admin_token()?,
            reviewer: config.reviewer_token()?,
        };
        match (&tokens.admin, &tokens.reviewer) {
            // The admin token is tried first: the reviewer would be an admin.
            (Some(admin), Some(reviewer)) if constant_time_eq(admin, reviewer) => {
                Err(ConfigError::Invalid(vec![
                    "admin.auth.reviewer_token: the same token as the admin's, which would give \
                     reviewers the admin's rights: give each role a token of its own"
                        .into(),
                ]))
            }
            _ => Ok(tokens),
        }
    }

    pub fn new(admin: Option<String>, reviewer: Option<String>) -> Self {
        Self { admin, reviewer }
    }

    /// Whether any endpoint that needs `role` is served at all.
    pub fn enabled(&self, role: Role) -> bool {
        match role {
            Role::Admin => self.admin.is_some(),
            Role::Reviewer => self.admin.is_some() || self.reviewer.is_some(),
        }
    }

    /// The caller a presented token identifies, compared in constant time.
    pub fn identify(&self, presented: &str) -> Option<Caller> {
        if self
            .admin
            .as_deref()
            .is_some_and(|t| constant_time_eq(t, presented))
        {
            return Some(Caller {
                role: Role::Admin,
                name: "admin",
            });
        }
        if self
            .reviewer
            .as_deref()
            .is_some_and(|t| constant_time_eq(t, presented))
        {
            return Some(Caller {
                role: Role::Reviewer,
                name: "reviewer",
            });
        }
        None
    }

    /// Checks a request's credentials against `needed`.
    pub fn authorize(&self, headers: &HeaderMap, needed: Role) -> Result<Caller, Refusal> {
        if !self.enabled(needed) {
            return Err(Refusal::Off);
        }
        let presented = presented_token(headers).ok_or(Refusal::Missing)?;
        let caller = self.identify(&presented).ok_or(Refusal::Wrong)?;
        if caller.role < needed {
            return Err(Refusal::Forbidden);
        }
        Ok(caller)
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token is configured for the role: the endpoint does not exist.
    Off,
    Missing,
    Wrong,
    /// A reviewer token on an endpoint that needs the admin token.
    Forbidden,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Off => "off",
            Refusal::Missing => "missing token",
            Refusal::Wrong => "wrong token",
            Refusal::Forbidden => "reviewer token on an admin endpoint",
        }
    }

    fn response(self) -> Response {
        match self {
            Refusal::Off => StatusCode::NOT_FOUND.into_response(),
            Refusal::Missing | Refusal::Wrong => (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    // Basic makes a browser ask; scripts send Bearer.
                    r#"Basic realm="nudge", charset="UTF-8""#,
                )],
                "a valid token is needed: HTTP basic auth with the token as password, or Authorization: Bearer <token>\n",
            )
                .into_response(),
            Refusal::Forbidden => (
                StatusCode::FORBIDDEN,
                "this endpoint needs the admin token\n",
            )
                .into_response(),
        }
    }
}

/// The token from `Authorization: Bearer T` or `Authorization: Basic
/// base64(user:T)`.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (_user, password) = decoded.split_once(':')?;
        return Some(password.to_string());
    }
    None
}

/// Middleware for routes only a reviewer or admin may see.
pub async fn require_reviewer(
    State(tokens): State<std::sync::Arc<Tokens>>,
    request: Request,
    next: Next,
) -> Response {
    require(&tokens, Role::Reviewer, request, next).await
}

/// Middleware for routes only the admin may use.
pub async fn require_admin(
    State(tokens): State<std::sync::Arc<Tokens>>,
    request: Request,
    next: Next,
) -> Response {
    require(&tokens, Role::Admin, request, next).await
}

async fn require(tokens: &Tokens, needed: Role, mut request: Request, next: Next) -> Response {
    match tokens.authorize(request.headers(), needed) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            let mut response = next.run(request).await;
            protect(response.headers_mut());
            response
        }
        Err(refusal) => {
            if refusal != Refusal::Off {
                AdminAuthRefused {
                    path: request.uri().path(),
                    reason: refusal.reason(),
                    client: request
                        .extensions()
                        .get::<crate::admin::serve::ClientAddr>()
                        .map(|c| c.0),
                }
                .emit();
            }
            let browser = request
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
            let mut response = match refusal {
                Refusal::Missing | Refusal::Wrong if browser => refusal_page(refusal),
                _ => refusal.response(),
            };
            protect(response.headers_mut());
            response
        }
    }
}

/// A 401 a person reads in a browser (after cancelling its sign-in box, or
/// with a wrong token): what is needed and where to get it.
fn refusal_page(refusal: Refusal) -> Response {
    let tried = if refusal == Refusal::Wrong {
        "<p>The token given was not accepted.</p>"
    } else {
        ""
    };
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Sign-in needed · nudge review</title></head><body><main>\
         <h1>Sign-in needed</h1>{tried}<p>These pages show what was sent to customers, so \
         they need the reviewer token. When your browser asks, enter any user name and the \
         token as the password. Whoever runs nudge gives out the token.</p>\
         <p><a href=\"/\">Try again</a></p></main></body></html>\n"
    );
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            r#"Basic realm="nudge", charset="UTF-8""#,
        )],
        axum::response::Html(body),
    )
        .into_response()
}

/// Headers on every authenticated answer: nothing cached (customer data),
/// nothing loaded from elsewhere, never framed.
pub fn protect(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn basic(password: &str) -> HeaderMap {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("anyone:{password}"));
        headers(&format!("Basic {encoded}"))
    }

    #[test]
    fn roles_tokens_and_schemes() {
        let tokens = Tokens::new(Some("adm1n".into()), Some("rev1ew".into()));
        let admin = tokens
            .authorize(&headers("Bearer adm1n"), Role::Admin)
            .unwrap();
        assert_eq!(admin.name, "admin");
        assert_eq!(
            tokens
                .authorize(&basic("rev1ew"), Role::Reviewer)
                .unwrap()
                .role,
            Role::Reviewer
        );
        assert_eq!(
            tokens
                .authorize(&basic("adm1n"), Role::Reviewer)
                .unwrap()
                .role,
            Role::Admin,
            "the admin token opens the review page too"
        );
        assert_eq!(
            tokens.authorize(&headers("Bearer rev1ew"), Role::Admin),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            tokens.authorize(&headers("Bearer adm1"), Role::Admin),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            tokens.authorize(&HeaderMap::new(), Role::Reviewer),
            Err(Refusal::Missing)
        );
        assert_eq!(
            tokens.authorize(&headers("Digest adm1n"), Role::Admin),
            Err(Refusal::Missing)
        );
    }

    #[test]
    fn one_token_for_both_roles_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, token: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, token).unwrap();
            path
        };
        let admin = file("admin", "the-same-long-token-for-both-roles\n");
        let auth = |reviewer: &std::path::Path| -> AuthConfig {
            toml::from_str(&format!(
                "admin_token_file = {admin:?}\nreviewer_token_file = {reviewer:?}\n"
            ))
            .unwrap()
        };
        let err = Tokens::from_config(&auth(&admin)).unwrap_err().to_string();
        assert!(
            err.contains("admin.auth.reviewer_token: the same token as the admin's"),
            "{err}"
        );
        assert!(!err.contains("the-same-long"), "{err}");
        let other = file("other", "another-long-token-for-reviewers");
        assert!(Tokens::from_config(&auth(&other))
            .unwrap()
            .enabled(Role::Admin));
    }

    #[test]
    fn a_role_without_a_token_is_off_not_open() {
        let none = Tokens::default();
        assert_eq!(
            none.authorize(&headers("Bearer "), Role::Reviewer),
            Err(Refusal::Off)
        );
        let reviewer_only = Tokens::new(None, Some("r".into()));
        assert_eq!(
            reviewer_only.authorize(&headers("Bearer r"), Role::Admin),
            Err(Refusal::Off)
        );
        assert!(reviewer_only.enabled(Role::Reviewer));
    }
}
