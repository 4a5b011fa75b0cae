//! Request statistics, including every `Authorization` header seen, so that
//! tests can check what a client sent where (e.g. no bearer token on the token
//! endpoint) and benchmarks can count pages and objects.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a request was, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// `POST /{tenant}/oauth2/v2.0/token`.
    Token,
    /// A delta request without a token (or with `$deltatoken=latest`).
    Initial,
    /// A delta request with `$skiptoken`.
    NextLink,
    /// A delta request with `$deltatoken`.
    DeltaLink,
    /// `/_sim/...` control API.
    Control,
    /// Anything else (unknown paths).
    Other,
}

/// How many requests carried which kind of `Authorization` header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationCounts {
    /// `Authorization: Bearer ...` (valid or not).
    pub bearer: u64,
    /// Another scheme (e.g. `Basic` client credentials on the token endpoint).
    pub other: u64,
    /// No `Authorization` header.
    pub none: u64,
}

/// A snapshot of the simulator's counters since start (or the last reset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Requests by kind and HTTP status.
    pub requests: BTreeMap<RequestKind, BTreeMap<u16, u64>>,
    /// `Authorization` headers by request kind.
    pub authorization: BTreeMap<RequestKind, AuthorizationCounts>,
    /// Delta pages answered with 200.
    pub pages_served: u64,
    /// Entries in the `value` of those pages (replays and @removed included).
    pub objects_served: u64,
    /// Requests to the token endpoint.
    pub token_requests: u64,
    /// Access tokens issued.
    pub tokens_issued: u64,
    /// Faults triggered, by kind name (`http_error`, `gone`, ...).
    pub faults_applied: BTreeMap<String, u64>,
    /// The current sync epoch (bumped by each `gone` fault).
    pub epoch: u64,
}

impl SimStats {
    /// Requests of `kind`, any status.
    pub fn requests_of(&self, kind: RequestKind) -> u64 {
        self.requests
            .get(&kind)
            .map_or(0, |by_status| by_status.values().sum())
    }

    /// Requests of `kind` answered with `status`.
    pub fn status_count(&self, kind: RequestKind, status: u16) -> u64 {
        self.requests
            .get(&kind)
            .and_then(|by_status| by_status.get(&status))
            .copied()
            .unwrap_or(0)
    }

    /// Requests of `kind` that carried a bearer token.
    pub fn bearer_headers(&self, kind: RequestKind) -> u64 {
        self.authorization.get(&kind).map_or(0, |a| a.bearer)
    }

    pub(crate) fn record(&mut self, kind: RequestKind, status: u16, auth: AuthHeader) {
        *self
            .requests
            .entry(kind)
            .or_default()
            .entry(status)
            .or_default() += 1;
        let a = self.authorization.entry(kind).or_default();
        match auth {
            AuthHeader::Bearer => a.bearer += 1,
            AuthHeader::Other => a.other += 1,
            AuthHeader::None => a.none += 1,
        }
    }
}

/// The kind of `Authorization` header of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthHeader {
    Bearer,
    Other,
    None,
}

impl AuthHeader {
    /// Classifies the request's `Authorization` header.
    pub(crate) fn of(headers: &axum::http::HeaderMap) -> Self {
        match headers.get(axum::http::header::AUTHORIZATION) {
            None => AuthHeader::None,
            Some(v) => {
                let v = v.as_bytes();
                if v.len() >= 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
                    AuthHeader::Bearer
                } else {
                    AuthHeader::Other
                }
            }
        }
    }
}
