//! The Microsoft Graph side: authentication, the delta client and the page
//! model. A delta page enters the process in [`client::GraphClient::fetch`].
//!
//! What this module promises (see `PROTOCOL.md` for the sources):
//! - links are followed exactly as Graph gave them, and only if their scheme,
//!   host and port are those of the configured `base_url`: the bearer token
//!   never leaves the Graph host, and redirects are never followed;
//! - 429/503/504 wait at least `Retry-After`; other 5xx, transport errors and
//!   truncated or malformed pages are retried with backoff and never handed
//!   on; a 401 fetches a new token once;
//! - 410 Gone and the sync-state error codes (`syncStateNotFound`,
//!   `resyncRequired`, `syncStateInvalid`, any case) surface as
//!   [`GraphError::Resync`] so the runtime starts a full round.

pub mod auth;
pub mod client;
pub mod page;

use std::time::Duration;

pub use self::{
    auth::TokenProvider,
    client::GraphClient,
    page::{Page, parse_page},
};
use crate::retry::RetryHint;

/// Error codes with which Graph says a delta token can no longer be used.
pub const SYNC_STATE_ERROR_CODES: &[&str] =
    &["syncStateNotFound", "resyncRequired", "syncStateInvalid"];

/// Everything that can go wrong talking to Graph. Messages name the host
/// (never a full link with its state token, never a bearer token).
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// 410 Gone or an expired/invalid sync token: start a full round.
    #[error("{host}: Graph reset the sync state ({reason}); a full resync round is needed")]
    Resync {
        host: String,
        reason: String,
        /// The fresh initial-request URL Graph offered (410 `Location`).
        location: Option<String>,
    },
    /// A nextLink, deltaLink or redirect pointing somewhere else.
    #[error(
        "link host `{host}` is not the configured Graph host `{expected}`; refusing to send the token there (check graph.base_url)"
    )]
    ForeignHost { host: String, expected: String },
    /// An HTTP error status from Graph.
    #[error("{host}: HTTP {status}{}: {message}", if code.is_empty() { String::new() } else { format!(" {code}") })]
    Status {
        host: String,
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Connection refused, timeout, TLS failure, reset mid-body.
    #[error("{host}: request failed: {message}")]
    Transport { host: String, message: String },
    /// A 200 whose body is not a delta page (truncated, invalid JSON, an
    /// object without `id`, no next/delta link).
    #[error("{host}: malformed delta page: {reason}")]
    MalformedPage { host: String, reason: String },
    /// A page larger than `graph.max_page_bytes`.
    #[error(
        "{host}: page body exceeds graph.max_page_bytes ({limit} bytes); raise the limit if this tenant really has such objects"
    )]
    PageTooLarge { host: String, limit: u64 },
    /// The token endpoint refused or failed.
    #[error("token endpoint {host}: {message}")]
    Auth {
        host: String,
        message: String,
        retriable: bool,
        retry_after: Option<Duration>,
    },
    /// Graph answered with a redirect; we do not follow redirects.
    #[error(
        "{host}: HTTP {status} redirect to `{target}` not followed (a redirect could carry the token to another host)"
    )]
    Redirect {
        host: String,
        status: u16,
        target: String,
    },
}

impl RetryHint for GraphError {
    fn is_retriable(&self) -> bool {
        match self {
            GraphError::Status { status, .. } => {
                matches!(status, 408 | 429) || (500..=599).contains(status)
            }
            GraphError::Transport { .. } | GraphError::MalformedPage { .. } => true,
            GraphError::Auth { retriable, .. } => *retriable,
            GraphError::Resync { .. }
            | GraphError::ForeignHost { .. }
            | GraphError::PageTooLarge { .. }
            | GraphError::Redirect { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            GraphError::Status { retry_after, .. } | GraphError::Auth { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

impl GraphError {
    /// Short label for metrics: `resync`, `throttled`, `http_5xx`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            GraphError::Resync { .. } => "resync",
            GraphError::ForeignHost { .. } => "foreign_host",
            GraphError::Status { status: 429, .. } => "throttled",
            GraphError::Status { status, .. } if *status >= 500 => "http_5xx",
            GraphError::Status { .. } => "http_4xx",
            GraphError::Transport { .. } => "transport",
            GraphError::MalformedPage { .. } => "malformed_page",
            GraphError::PageTooLarge { .. } => "page_too_large",
            GraphError::Auth { .. } => "auth",
            GraphError::Redirect { .. } => "redirect",
        }
    }
}

/// `scheme://host:port` of a URL, for messages and origin checks.
pub fn origin_of(url: &url::Url) -> String {
    url.origin().ascii_serialization()
}

/// The host of a link for error messages; never the path or query, which
/// carry Graph's state token.
pub fn host_of(link: &str) -> String {
    match url::Url::parse(link) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => "<no host>".to_string(),
        },
        Err(_) => "<unparseable link>".to_string(),
    }
}
