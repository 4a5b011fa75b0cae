//! OAuth 2.0 client credentials against the Microsoft identity platform.
//!
//! `POST {token_url}` with `grant_type=client_credentials`, `client_id`,
//! `client_secret` and `scope={graph origin}/.default`. The answer has an
//! `access_token` and `expires_in` (about an hour) and no refresh token, so a
//! new token is requested shortly before expiry, and once more after a 401.
//! One provider is shared by every stream of a tenant, so they share a token.

use std::{fmt, sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio::{sync::Mutex, time::Instant};

use super::GraphError;
use crate::{
    config::GraphSettings,
    retry::{self, Policy},
};

/// A bearer token. `Debug` never shows it.
#[derive(Clone)]
pub struct AccessToken(Arc<str>);

impl AccessToken {
    /// The header value's secret part; only ever passed to reqwest.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
}

/// Fetches and caches client-credential tokens for one tenant.
pub struct TokenProvider {
    http: reqwest::Client,
    settings: Arc<GraphSettings>,
    cached: Mutex<Option<Cached>>,
    host: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct TokenErrorResponse {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenProvider {
    pub fn new(http: reqwest::Client, settings: Arc<GraphSettings>) -> Self {
        let host = super::host_of(settings.token_url.as_str());
        Self {
            http,
            settings,
            cached: Mutex::new(None),
            host,
        }
    }

    /// A valid token, from the cache or freshly requested.
    pub async fn token(&self) -> Result<AccessToken, GraphError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.request_with_retries().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// Forgets `rejected` (Graph answered 401 to it), unless another task
    /// already replaced it.
    pub async fn invalidate(&self, rejected: &AccessToken) {
        let mut cached = self.cached.lock().await;
        if cached
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.token.0, &rejected.0))
        {
            *cached = None;
        }
    }

    async fn request_with_retries(&self) -> Result<Cached, GraphError> {
        let policy = Policy::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
            Some(self.settings.max_attempts),
        );
        retry::retry(
            policy,
            || self.request_once(),
            |e, d| {
                tracing::warn!(tenant = %self.settings.name, error = %e, retry_in = ?d, "Token request failed; retrying.");
            },
        )
        .await
    }

    async fn request_once(&self) -> Result<Cached, GraphError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.settings.client_id.as_str()),
            ("client_secret", self.settings.client_secret.expose_secret()),
            ("scope", self.settings.scope.as_str()),
        ];
        let started = Instant::now();
        let response = self
            .http
            .post(self.settings.token_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| GraphError::Auth {
                host: self.host.clone(),
                message: format!("request failed: {}", describe_reqwest(e)),
                retriable: true,
                retry_after: None,
            })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry::parse_retry_after);
        let body = response.bytes().await.map_err(|e| GraphError::Auth {
            host: self.host.clone(),
            message: format!("reading the answer failed: {}", describe_reqwest(e)),
            retriable: true,
            retry_after: None,
        })?;
        if status == 200 {
            let parsed: TokenResponse =
                serde_json::from_slice(&body).map_err(|e| GraphError::Auth {
                    host: self.host.clone(),
                    message: format!("answer is not a token response: {e}"),
                    retriable: true,
                    retry_after: None,
                })?;
            let lifetime = parsed
                .expires_in
                .as_ref()
                .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_secs(3599));
            // Renew ahead of expiry: 5 minutes, or a tenth of a short lifetime.
            let margin = (lifetime / 10).min(Duration::from_secs(300));
            tracing::debug!(tenant = %self.settings.name, lifetime = ?lifetime, "Access token acquired.");
            return Ok(Cached {
                token: AccessToken(Arc::from(parsed.access_token)),
                refresh_at: started + lifetime.saturating_sub(margin),
            });
        }
        let detail = serde_json::from_slice::<TokenErrorResponse>(&body)
            .map(|e| {
                let first_line = e.error_description.lines().next().unwrap_or("").to_string();
                format!("{} {}", e.error, first_line).trim().to_string()
            })
            .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        let retriable = status == 429 || status >= 500;
        let hint = if matches!(status, 400 | 401) {
            " (check tenant_id, client_id and the client secret)"
        } else {
            ""
        };
        Err(GraphError::Auth {
            host: self.host.clone(),
            message: format!("HTTP {status}: {detail}{hint}"),
            retriable,
            retry_after,
        })
    }
}

/// reqwest's error with its sources, without the URL (which reqwest puts in
/// its Display and which, for Graph links, carries the state token).
pub(crate) fn describe_reqwest(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
