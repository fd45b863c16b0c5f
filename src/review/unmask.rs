//! Who may see a decision record's contact addresses unmasked: only the
//! holder of the admin token (`admin.auth.admin_token_env` /
//! `admin_token_file`), the same token that controls the daemon. The CLI
//! reads the token presented from a file (`--token-file`) or from
//! `NUDGE_ADMIN_TOKEN`, never from an argument (arguments show in `ps`
//! and shell history), and compares it with the configured one in constant
//! time. No admin token configured: nobody unmasks.

use std::path::Path;

use crate::config::{AuthConfig, ConfigError};

/// Environment variable a user presents the admin token in.
pub const TOKEN_ENV: &str = "NUDGE_ADMIN_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum UnmaskError {
    #[error("--unmask needs the admin token, and none is configured (admin.auth.admin_token_env or admin.auth.admin_token_file): contacts stay masked")]
    NotConfigured,
    #[error("--unmask needs the admin token: present it with --token-file FILE or in {TOKEN_ENV}")]
    NotPresented,
    #[error("--unmask: the token presented is not the admin token")]
    Wrong,
    #[error("--token-file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The token the user presents: the file's content (trimmed) when given,
/// else `env` (the value of [`TOKEN_ENV`]).
pub fn presented(file: Option<&Path>, env: Option<String>) -> Result<Option<String>, UnmaskError> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|source| UnmaskError::Read {
                path: path.display().to_string(),
                source,
            }),
        None => Ok(env.map(|t| t.trim().to_string())),
    }
}

/// Allows unmasking when `presented` is the configured admin token.
pub fn authorize(auth: &AuthConfig, presented: Option<&str>) -> Result<(), UnmaskError> {
    let Some(admin) = auth.admin_token()? else {
        return Err(UnmaskError::NotConfigured);
    };
    match presented {
        None | Some("") => Err(UnmaskError::NotPresented),
        Some(p) if crate::config::constant_time_eq(&admin, p) => Ok(()),
        Some(_) => Err(UnmaskError::Wrong),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_admin_token_unmasks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin");
        std::fs::write(&file, "s3cret-of-16-chars\n").unwrap();
        let auth = AuthConfig {
            admin_token_file: Some(file.clone()),
            ..AuthConfig::default()
        };
        assert!(authorize(&auth, Some("s3cret-of-16-chars")).is_ok());
        assert!(matches!(
            authorize(&auth, Some("nope")),
            Err(UnmaskError::Wrong)
        ));
        assert!(matches!(
            authorize(&auth, None),
            Err(UnmaskError::NotPresented)
        ));
        assert!(matches!(
            authorize(&AuthConfig::default(), Some("s3cret")),
            Err(UnmaskError::NotConfigured)
        ));
        assert_eq!(
            presented(Some(&file), Some("other".into()))
                .unwrap()
                .as_deref(),
            Some("s3cret-of-16-chars"),
            "the file wins over the environment"
        );
        assert_eq!(
            presented(None, Some("t".into())).unwrap().as_deref(),
            Some("t")
        );
        assert!(presented(Some(&dir.path().join("missing")), None).is_err());
    }
}
