//! Injectable faults: the failures a production Graph client must survive.
//!
//! A fault is queued with a `count` and a [`FaultScope`]; each request the
//! scope matches consumes one unit, first queued first. Several faults may be
//! queued; one request triggers at most one of them. Apart from
//! [`Fault::Gone`], whose 410 also bumps the sync epoch (so that every older
//! token answers 410 from then on, as after a tenant migration), a fault
//! leaves no trace: retrying the same link afterwards returns the intended
//! page, because tokens carry all the state.

use serde::{Deserialize, Serialize};

use super::SimError;
use super::delta::DeltaRequestKind;

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultScope {
    /// Any Graph delta request (initial, nextLink or deltaLink). The default.
    #[default]
    Graph,
    /// Only the token endpoint (only `http_error` and `slow` apply there).
    Token,
    /// Only initial delta requests (no token, or `$deltatoken=latest`).
    Initial,
    /// Only `$skiptoken` (nextLink) requests.
    NextLink,
    /// Only `$deltatoken` (deltaLink) requests.
    DeltaLink,
    /// Any request, token endpoint included.
    Any,
}

const fn one() -> u32 {
    1
}

const fn status_429() -> u16 {
    429
}

const fn status_400() -> u16 {
    400
}

fn sync_state_not_found() -> String {
    "syncStateNotFound".to_owned()
}

fn unknown_future_value() -> String {
    "unknownFutureValue".to_owned()
}

const fn fifty_megabytes() -> usize {
    50 * 1024 * 1024
}

/// A failure to inject (serde: internally tagged by `kind`, snake_case).
///
/// `count` defaults to 1 (0 counts as 1) and `scope` to `graph`. Examples:
/// `{"kind":"http_error","status":429,"retry_after":2}`,
/// `{"kind":"gone","scope":"delta_link"}`,
/// `{"kind":"sync_state_expired","code":"SyncStateNotFound","status":404}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Answer `status` (429, 503, 504, 500, ...) with an error body, and a
    /// `Retry-After: {retry_after}` header when given (seconds). On the token
    /// endpoint the body is AAD-style.
    HttpError {
        /// HTTP status, 400..=599. Default 429.
        #[serde(default = "status_429")]
        status: u16,
        /// `Retry-After` in seconds; absent: no header.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
        /// Requests to fail.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// 410 Gone with a `Location` holding a fresh initial-request URL; bumps
    /// the sync epoch so that every older token answers 410 too.
    Gone {
        /// Requests to fail (each bumps the epoch again).
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// Tokens issued before this fault was injected are expired: answer
    /// `status` with error `code` (`syncStateNotFound`, `resyncRequired`,
    /// `syncStateInvalid`, any casing). Requests without a token, or with a
    /// newer one, are not affected and do not consume it.
    SyncStateExpired {
        /// HTTP status, 400..=499. Default 400.
        #[serde(default = "status_400")]
        status: u16,
        /// Graph error code. Default `syncStateNotFound`.
        #[serde(default = "sync_state_not_found")]
        code: String,
        /// Requests to fail.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// A 200 whose body is cut in the middle, with a matching Content-Length.
    TruncatedBody {
        /// Requests affected.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// A 200 whose body is not valid JSON.
    MalformedJson {
        /// Requests affected.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// Wait `delay_ms` before answering (normally).
    Slow {
        /// Delay in milliseconds.
        delay_ms: u64,
        /// Requests affected.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// Append an object without `id` to the page.
    MissingId {
        /// Requests affected.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// Append an entry (random unknown id) with `@removed: {"reason": reason}`.
    UnknownRemovedReason {
        /// The reason. Default `unknownFutureValue`.
        #[serde(default = "unknown_future_value")]
        reason: String,
        /// Requests affected.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// Pad the page's first object with an `@simulator.padding` annotation of
    /// `bytes` bytes (the envelope, if the page is empty). Default 50 MiB.
    HugePage {
        /// Padding size in bytes.
        #[serde(default = "fifty_megabytes")]
        bytes: usize,
        /// Requests affected.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// Build the page's nextLink/deltaLink on another host
    /// (default `evil.example`, same port; `host:port` to set the port).
    ForeignLink {
        /// The foreign host (`evil.example` or `127.0.0.2:9999`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// Requests affected.
        #[serde(default = "one")]
        count: u32,
        /// Requests affected.
        #[serde(default)]
        scope: FaultScope,
    },
    /// Not queued: invalidates every access token at once; Graph requests
    /// answer 401 until the client fetches a new token.
    InvalidateTokens,
}

impl Fault {
    /// The snake_case name of the fault kind (as in the JSON `kind`).
    pub fn name(&self) -> &'static str {
        match self {
            Fault::HttpError { .. } => "http_error",
            Fault::Gone { .. } => "gone",
            Fault::SyncStateExpired { .. } => "sync_state_expired",
            Fault::TruncatedBody { .. } => "truncated_body",
            Fault::MalformedJson { .. } => "malformed_json",
            Fault::Slow { .. } => "slow",
            Fault::MissingId { .. } => "missing_id",
            Fault::UnknownRemovedReason { .. } => "unknown_removed_reason",
            Fault::HugePage { .. } => "huge_page",
            Fault::ForeignLink { .. } => "foreign_link",
            Fault::InvalidateTokens => "invalidate_tokens",
        }
    }

    /// How many requests the fault affects (at least 1).
    pub fn count(&self) -> u32 {
        match self {
            Fault::HttpError { count, .. }
            | Fault::Gone { count, .. }
            | Fault::SyncStateExpired { count, .. }
            | Fault::TruncatedBody { count, .. }
            | Fault::MalformedJson { count, .. }
            | Fault::Slow { count, .. }
            | Fault::MissingId { count, .. }
            | Fault::UnknownRemovedReason { count, .. }
            | Fault::HugePage { count, .. }
            | Fault::ForeignLink { count, .. } => (*count).max(1),
            Fault::InvalidateTokens => 1,
        }
    }

    /// The requests the fault applies to.
    pub fn scope(&self) -> FaultScope {
        match self {
            Fault::HttpError { scope, .. }
            | Fault::Gone { scope, .. }
            | Fault::SyncStateExpired { scope, .. }
            | Fault::TruncatedBody { scope, .. }
            | Fault::MalformedJson { scope, .. }
            | Fault::Slow { scope, .. }
            | Fault::MissingId { scope, .. }
            | Fault::UnknownRemovedReason { scope, .. }
            | Fault::HugePage { scope, .. }
            | Fault::ForeignLink { scope, .. } => *scope,
            Fault::InvalidateTokens => FaultScope::Any,
        }
    }

    /// Checks statuses and sizes.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |why: String| Err(SimError::InvalidFault { reason: why });
        match self {
            Fault::HttpError { status, .. } if !(400..=599).contains(status) => {
                bad(format!("http_error status {status} is not in 400..=599"))
            }
            Fault::SyncStateExpired { status, .. } if !(400..=499).contains(status) => bad(
                format!("sync_state_expired status {status} is not in 400..=499"),
            ),
            Fault::HugePage { bytes, .. } if *bytes > 1 << 30 => {
                bad(format!("huge_page of {bytes} bytes is over 1 GiB"))
            }
            Fault::ForeignLink { host: Some(h), .. }
                if h.is_empty() || url::Url::parse(&format!("http://{h}/")).is_err() =>
            {
                bad(format!("foreign_link host '{h}' is not a host[:port]"))
            }
            _ => Ok(()),
        }
    }

    /// Whether the fault can apply to the token endpoint.
    fn applies_to_token(&self) -> bool {
        matches!(self, Fault::HttpError { .. } | Fault::Slow { .. })
    }
}

/// The request a fault is being looked up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The token endpoint.
    Token,
    /// A delta request of this kind; `token_generation` is the fault
    /// generation recorded in its token (none for initial requests).
    Delta {
        kind: DeltaRequestKind,
        token_generation: Option<u64>,
    },
}

impl FaultScope {
    fn matches(self, target: Target) -> bool {
        match (self, target) {
            (FaultScope::Any, _) => true,
            (FaultScope::Token, Target::Token) => true,
            (FaultScope::Graph, Target::Delta { .. }) => true,
            (FaultScope::Initial, Target::Delta { kind, .. }) => kind == DeltaRequestKind::Initial,
            (FaultScope::NextLink, Target::Delta { kind, .. }) => {
                kind == DeltaRequestKind::NextLink
            }
            (FaultScope::DeltaLink, Target::Delta { kind, .. }) => {
                kind == DeltaRequestKind::DeltaLink
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Queued {
    fault: Fault,
    remaining: u32,
    /// The fault generation when injected (tokens of this generation or
    /// older count as "older" for `sync_state_expired`).
    generation: u64,
}

/// The queue of pending faults.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    queued: Vec<Queued>,
}

impl FaultQueue {
    /// Queues a fault injected at `generation`.
    pub(crate) fn push(&mut self, fault: Fault, generation: u64) {
        let remaining = fault.count();
        self.queued.push(Queued {
            fault,
            remaining,
            generation,
        });
    }

    /// Drops every queued fault.
    pub(crate) fn clear(&mut self) {
        self.queued.clear();
    }

    /// The queued faults, with `count` set to what remains.
    pub(crate) fn list(&self) -> Vec<Fault> {
        self.queued
            .iter()
            .map(|q| {
                let mut f = q.fault.clone();
                set_count(&mut f, q.remaining);
                f
            })
            .collect()
    }

    /// Consumes one unit of the first fault that applies to `target`.
    pub(crate) fn take(&mut self, target: Target) -> Option<Fault> {
        let pos = self.queued.iter().position(|q| {
            q.fault.scope().matches(target)
                && match target {
                    Target::Token => q.fault.applies_to_token(),
                    Target::Delta {
                        token_generation, ..
                    } => match q.fault {
                        Fault::SyncStateExpired { .. } => {
                            token_generation.is_some_and(|g| g <= q.generation)
                        }
                        _ => true,
                    },
                }
        })?;
        let q = self.queued.get_mut(pos)?;
        q.remaining = q.remaining.saturating_sub(1);
        let fault = q.fault.clone();
        if q.remaining == 0 {
            self.queued.remove(pos);
        }
        Some(fault)
    }
}

fn set_count(f: &mut Fault, n: u32) {
    match f {
        Fault::HttpError { count, .. }
        | Fault::Gone { count, .. }
        | Fault::SyncStateExpired { count, .. }
        | Fault::TruncatedBody { count, .. }
        | Fault::MalformedJson { count, .. }
        | Fault::Slow { count, .. }
        | Fault::MissingId { count, .. }
        | Fault::UnknownRemovedReason { count, .. }
        | Fault::HugePage { count, .. }
        | Fault::ForeignLink { count, .. } => *count = n,
        Fault::InvalidateTokens => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEXT: Target = Target::Delta {
        kind: DeltaRequestKind::NextLink,
        token_generation: Some(0),
    };

    #[test]
    fn faults_deserialize_with_defaults() {
        let f: Fault = serde_json::from_str(r#"{"kind":"http_error"}"#).unwrap();
        assert_eq!(
            f,
            Fault::HttpError {
                status: 429,
                retry_after: None,
                count: 1,
                scope: FaultScope::Graph
            }
        );
        let f: Fault = serde_json::from_str(
            r#"{"kind":"sync_state_expired","code":"SyncStateNotFound","scope":"delta_link"}"#,
        )
        .unwrap();
        assert_eq!(f.scope(), FaultScope::DeltaLink);
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"gone","colour":1}"#).is_err());
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"nope"}"#).is_err());
    }

    #[test]
    fn queue_consumes_counts_in_order_and_respects_scope() {
        let mut q = FaultQueue::default();
        q.push(
            Fault::HttpError {
                status: 503,
                retry_after: Some(1),
                count: 2,
                scope: FaultScope::DeltaLink,
            },
            0,
        );
        q.push(
            Fault::Gone {
                count: 1,
                scope: FaultScope::Graph,
            },
            0,
        );
        assert!(q.take(Target::Token).is_none());
        assert_eq!(q.take(NEXT).map(|f| f.name()), Some("gone"));
        assert!(q.take(NEXT).is_none());
        let dl = Target::Delta {
            kind: DeltaRequestKind::DeltaLink,
            token_generation: Some(0),
        };
        assert_eq!(q.take(dl).map(|f| f.name()), Some("http_error"));
        assert_eq!(q.list().first().map(Fault::count), Some(1));
        assert!(q.take(dl).is_some());
        assert!(q.take(dl).is_none());
    }

    #[test]
    fn sync_state_expiry_hits_only_older_tokens() {
        let mut q = FaultQueue::default();
        q.push(
            Fault::SyncStateExpired {
                status: 400,
                code: "resyncRequired".into(),
                count: 1,
                scope: FaultScope::Graph,
            },
            5,
        );
        let initial = Target::Delta {
            kind: DeltaRequestKind::Initial,
            token_generation: None,
        };
        let newer = Target::Delta {
            kind: DeltaRequestKind::DeltaLink,
            token_generation: Some(6),
        };
        let older = Target::Delta {
            kind: DeltaRequestKind::DeltaLink,
            token_generation: Some(5),
        };
        assert!(q.take(initial).is_none());
        assert!(q.take(newer).is_none());
        assert!(q.take(older).is_some());
    }

    #[test]
    fn validation() {
        assert!(
            Fault::HttpError {
                status: 200,
                retry_after: None,
                count: 1,
                scope: FaultScope::Graph
            }
            .validate()
            .is_err()
        );
        assert!(
            Fault::ForeignLink {
                host: Some("evil.example:8443".into()),
                count: 1,
                scope: FaultScope::Graph
            }
            .validate()
            .is_ok()
        );
    }
}
