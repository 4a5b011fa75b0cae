//! The delta protocol engine: query parsing, opaque sync-state tokens,
//! rounds, paging and the JSON of a page.
//!
//! # Rounds
//!
//! - An **initial round** (no token) enumerates the objects that existed at
//!   the round's snapshot `S` (the tenant's seq when the round started), in
//!   creation order, each in its state at the time its page is served. Objects
//!   created after `S` are left to the next round; the round's deltaLink covers
//!   `(S, ∞)`, so whatever changed during the round shows up again next time.
//! - An **incremental round** (from a deltaLink with `since`) fixes
//!   `upto` = the seq at its first request and serves every object with a
//!   relevant change in `(since, upto]` (an update of an unselected property
//!   is not relevant; a membership change is relevant only when `members` is
//!   selected), in the order of first change, each in its current state. Its
//!   deltaLink covers `(upto, ∞)`.
//!
//! # Tokens
//!
//! A `$skiptoken`/`$deltatoken` is `base64url(json ‖ xxh3_64(json, secret))`
//! where the JSON is a `SyncState`: the sync epoch (bumped by a 410), the
//! fault generation, resource, round mode, `since`/`upto`, the enumeration
//! cursor, the select masks, the filter, the pending member slices and the
//! page number. Everything a page needs is in the token, so any link can be
//! requested again (retries after a fault get the same page) and the server
//! keeps no per-client state. The secret is random per simulator: a token from
//! another simulator instance, or an edited one, answers 400 `syncStateInvalid`.
//!
//! # Member slices
//!
//! A group whose `members@delta` has more entries than `member_slice` is sent
//! several times: its first slice where the enumeration reaches it, the other
//! slices one per page on the following pages, in a seeded shuffled order.
//! The token carries `(group, next slice)` pairs. Slices are cut from the
//! membership as of the round's snapshot, which stays fixed during the round,
//! so no slice can be lost even when members change meanwhile.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::model::{Key, MEMBERS_BIT, ObjectKind, write_json_str};
use super::rng::{SplitMix64, mix};
use super::tenant::{Life, ObjView, Tenant};

/// At most this many `id eq '...'` terms in a `$filter` (Graph's limit).
pub(crate) const MAX_FILTER_IDS: usize = 50;

/// How many window lists are cached (a cache miss only costs a log scan).
const WINDOW_CACHE: usize = 32;

/// A delta-capable collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Resource {
    /// One object kind: `/users/delta`, ...
    Kind(ObjectKind),
    /// `/directoryObjects/delta`: every kind, `@odata.type` on each object.
    DirectoryObjects,
}

impl Resource {
    /// Parses a collection segment (case-insensitive, like Graph).
    pub(crate) fn parse(segment: &str) -> Option<Self> {
        if segment.eq_ignore_ascii_case("directoryObjects") {
            return Some(Resource::DirectoryObjects);
        }
        ObjectKind::ALL
            .into_iter()
            .find(|k| k.collection().eq_ignore_ascii_case(segment))
            .map(Resource::Kind)
    }

    /// The canonical collection segment.
    pub(crate) const fn segment(self) -> &'static str {
        match self {
            Resource::Kind(k) => k.collection(),
            Resource::DirectoryObjects => "directoryObjects",
        }
    }

    const fn code(self) -> u8 {
        match self {
            Resource::Kind(k) => k.index() as u8,
            Resource::DirectoryObjects => 9,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            9 => Some(Resource::DirectoryObjects),
            c => ObjectKind::ALL
                .get(usize::from(c))
                .copied()
                .map(Resource::Kind),
        }
    }

    /// The kinds served, restricted by an `isof` mask (0 = no restriction).
    fn kinds(self, types: u8) -> Vec<ObjectKind> {
        match self {
            Resource::Kind(k) => vec![k],
            Resource::DirectoryObjects => ObjectKind::ALL
                .into_iter()
                .filter(|k| types == 0 || types & (1 << k.index()) != 0)
                .collect(),
        }
    }
}

/// A request that the delta endpoint refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DeltaError {
    /// 400 with a Graph error code (`Request_UnsupportedQuery`, `Request_BadRequest`).
    #[error("{message}")]
    BadRequest {
        /// Graph error code.
        code: &'static str,
        /// Human-readable message.
        message: String,
    },
    /// 404: no such collection.
    #[error("Resource not found for the segment '{segment}'.")]
    NotFound {
        /// The unknown segment.
        segment: String,
    },
    /// A token that cannot be used (tampered, expired, wrong resource).
    #[error("{message}")]
    SyncState {
        /// HTTP status (400 unless a fault says otherwise).
        status: u16,
        /// `syncStateInvalid`, `syncStateNotFound`, ...
        code: String,
        /// Human-readable message.
        message: String,
    },
    /// 410: the sync state was reset; start again at `location`.
    #[error("The sync state was reset; start a new round at {location}")]
    Gone {
        /// A fresh initial-request URL.
        location: String,
    },
}

impl DeltaError {
    fn unsupported(message: impl Into<String>) -> Self {
        DeltaError::BadRequest {
            code: "Request_UnsupportedQuery",
            message: message.into(),
        }
    }

    fn invalid_token(message: impl Into<String>) -> Self {
        DeltaError::SyncState {
            status: 400,
            code: "syncStateInvalid".to_owned(),
            message: message.into(),
        }
    }
}

/// The query parameters of a delta request that the simulator reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DeltaQuery {
    pub select: Option<String>,
    pub filter: Option<String>,
    pub skiptoken: Option<String>,
    pub deltatoken: Option<String>,
}

impl DeltaQuery {
    /// Parses a raw query string. `$select` and `select` are both accepted.
    pub(crate) fn parse(raw: Option<&str>) -> Result<Self, DeltaError> {
        let mut q = DeltaQuery::default();
        for (name, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let bare = name.strip_prefix('$').unwrap_or(&name).to_ascii_lowercase();
            let value = value.into_owned();
            match bare.as_str() {
                "select" => q.select = Some(value),
                "filter" => q.filter = Some(value),
                "skiptoken" => q.skiptoken = Some(value),
                "deltatoken" => q.deltatoken = Some(value),
                // Graph ignores $top on users/groups delta.
                "top" => {}
                "orderby" | "search" | "expand" | "skip" | "count" => {
                    return Err(DeltaError::unsupported(format!(
                        "The query parameter '${bare}' is not supported with delta queries."
                    )));
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// Parsed `Prefer` preferences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Prefer {
    /// `odata.maxpagesize=N`.
    pub max_page_size: Option<usize>,
    /// `return=minimal`.
    pub minimal: bool,
}

impl Prefer {
    /// Parses every `Prefer` header value; preferences may be comma-separated.
    pub(crate) fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut p = Prefer::default();
        for value in values {
            for pref in value.split(',') {
                let pref = pref.split(';').next().unwrap_or("").trim();
                let (name, val) = pref.split_once('=').unwrap_or((pref, ""));
                let val = val.trim().trim_matches('"');
                match name.trim().to_ascii_lowercase().as_str() {
                    "odata.maxpagesize" | "maxpagesize" => {
                        p.max_page_size = val.parse().ok().filter(|&n| n > 0);
                    }
                    "return" if val.eq_ignore_ascii_case("minimal") => p.minimal = true,
                    _ => {}
                }
            }
        }
        p
    }
}

/// Parses `$select` into per-kind masks (indexed like [`ObjectKind::ALL`]).
pub(crate) fn parse_select(resource: Resource, select: &str) -> Result<[u32; 5], DeltaError> {
    let mut masks = [0u32; 5];
    for raw in select.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (qualifier, name) = match raw.rsplit_once('/') {
            Some((q, n)) => (Some(q), n),
            None => (None, raw),
        };
        let kinds: Vec<ObjectKind> = match (resource, qualifier) {
            (_, Some(q)) => {
                let kind = ObjectKind::from_type_name(q).ok_or_else(|| {
                    DeltaError::unsupported(format!("Unknown type '{q}' in $select."))
                })?;
                if let Resource::Kind(k) = resource {
                    if k != kind {
                        return Err(DeltaError::unsupported(format!(
                            "Type '{q}' in $select does not apply to '{}'.",
                            resource.segment()
                        )));
                    }
                }
                vec![kind]
            }
            (Resource::Kind(k), None) => vec![k],
            (Resource::DirectoryObjects, None) => ObjectKind::ALL.to_vec(),
        };
        if name.eq_ignore_ascii_case("id") {
            continue;
        }
        let mut found = false;
        for kind in kinds {
            if kind == ObjectKind::Group && name.eq_ignore_ascii_case("members") {
                masks[kind.index()] |= MEMBERS_BIT;
                found = true;
            } else if let Some(i) = kind
                .schema()
                .iter()
                .position(|p| p.name.eq_ignore_ascii_case(name))
            {
                masks[kind.index()] |= 1 << i;
                found = true;
            }
        }
        if !found {
            return Err(DeltaError::BadRequest {
                code: "Request_BadRequest",
                message: format!(
                    "Could not find a property named '{name}' on type '{}'.",
                    match resource {
                        Resource::Kind(k) => k.type_name(),
                        Resource::DirectoryObjects => "microsoft.graph.directoryObject",
                    }
                ),
            });
        }
    }
    Ok(masks)
}

/// A parsed `$filter`: an `isof` type mask and/or explicit ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    /// Bit `k` set: kind `k` requested by `isof` (0: no `isof` term).
    pub types: u8,
    /// Ids from `id eq '...'` terms, in order.
    pub ids: Vec<Uuid>,
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Open,
    Close,
}

fn lex(s: &str) -> Result<Vec<Tok>, DeltaError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::Open);
            }
            ')' => {
                chars.next();
                out.push(Tok::Close);
            }
            '\'' => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            v.push('\'');
                        }
                        Some('\'') => break,
                        Some(ch) => v.push(ch),
                        None => {
                            return Err(DeltaError::unsupported(
                                "Unterminated string literal in $filter.",
                            ));
                        }
                    }
                }
                out.push(Tok::Str(v));
            }
            c if c.is_alphanumeric() || c == '.' || c == '_' || c == '-' => {
                let mut v = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_alphanumeric() || ch == '.' || ch == '_' || ch == '-' {
                        v.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(v));
            }
            other => {
                return Err(DeltaError::unsupported(format!(
                    "Unexpected character '{other}' in $filter."
                )));
            }
        }
    }
    Ok(out)
}

/// Parses the filters Graph supports on delta: `isof('type')` (directoryObjects
/// only) and `id eq 'guid'`, joined by `or`.
pub(crate) fn parse_filter(resource: Resource, filter: &str) -> Result<Filter, DeltaError> {
    let toks = lex(filter)?;
    let mut f = Filter::default();
    let mut i = 0;
    let ident = |t: Option<&Tok>, word: &str| matches!(t, Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(word));
    let unsupported = || {
        DeltaError::unsupported(format!(
            "Unsupported filter '{filter}': delta supports only \"id eq '{{id}}'\" and \
             \"isof('{{type}}')\" terms joined by 'or'."
        ))
    };
    loop {
        if ident(toks.get(i), "isof") {
            let (Some(Tok::Open), Some(Tok::Str(ty)), Some(Tok::Close)) =
                (toks.get(i + 1), toks.get(i + 2), toks.get(i + 3))
            else {
                return Err(unsupported());
            };
            if resource != Resource::DirectoryObjects {
                return Err(DeltaError::unsupported(format!(
                    "isof() is supported only on directoryObjects/delta, not on {}/delta.",
                    resource.segment()
                )));
            }
            let kind = ObjectKind::from_type_name(ty).ok_or_else(|| {
                DeltaError::unsupported(format!("Type '{ty}' is not supported by delta."))
            })?;
            f.types |= 1 << kind.index();
            i += 4;
        } else if ident(toks.get(i), "id") && ident(toks.get(i + 1), "eq") {
            let Some(Tok::Str(id)) = toks.get(i + 2) else {
                return Err(unsupported());
            };
            let uuid = Uuid::parse_str(id).map_err(|_| DeltaError::BadRequest {
                code: "Request_BadRequest",
                message: format!("Invalid object identifier '{id}'."),
            })?;
            f.ids.push(uuid);
            if f.ids.len() > MAX_FILTER_IDS {
                return Err(DeltaError::unsupported(format!(
                    "Too many id filters: at most {MAX_FILTER_IDS} are allowed."
                )));
            }
            i += 3;
        } else {
            return Err(unsupported());
        }
        match toks.get(i) {
            None => break,
            Some(t) if ident(Some(t), "or") => i += 1,
            Some(_) => return Err(unsupported()),
        }
    }
    Ok(f)
}

/// The round a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Mode {
    /// A page of an initial round (`$skiptoken`).
    #[serde(rename = "i")]
    Initial,
    /// A page of an incremental round (`$skiptoken`).
    #[serde(rename = "c")]
    Changes,
    /// The start of the next incremental round (`$deltatoken`).
    #[serde(rename = "d")]
    NextRound,
}

/// The state encoded in a `$skiptoken` / `$deltatoken`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SyncState {
    #[serde(rename = "e")]
    pub epoch: u64,
    #[serde(rename = "g")]
    pub generation: u64,
    #[serde(rename = "r")]
    pub resource: u8,
    #[serde(rename = "m")]
    pub mode: Mode,
    #[serde(rename = "s", default)]
    pub since: u64,
    #[serde(rename = "u", default)]
    pub upto: u64,
    #[serde(rename = "k", default)]
    pub kind_pos: u8,
    #[serde(rename = "o", default)]
    pub offset: u64,
    /// Select masks; `None` = no `$select` (everything).
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub select: Option<[u32; 5]>,
    #[serde(rename = "t", default, skip_serializing_if = "is_zero")]
    pub types: u8,
    /// Filtered ids: base64url of the concatenated 16-byte ids.
    #[serde(rename = "i", default, skip_serializing_if = "String::is_empty")]
    pub ids: String,
    /// `[group index, next slice position]` of groups with slices still to send.
    #[serde(rename = "p", default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<[u32; 2]>,
    #[serde(rename = "n", default)]
    pub page: u32,
    /// Rounds completed on this chain of links, so that every round ends
    /// with a new deltaLink even when nothing changed.
    #[serde(rename = "c", default)]
    pub round: u64,
    /// This state was already answered once with an injected empty page.
    #[serde(rename = "x", default, skip_serializing_if = "is_false")]
    pub empty_served: bool,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl SyncState {
    fn resource(&self) -> Option<Resource> {
        Resource::from_code(self.resource)
    }

    fn select_mask(&self, kind: ObjectKind) -> u32 {
        self.select.map_or(kind.full_mask(), |m| m[kind.index()])
    }

    fn filter_ids(&self) -> Vec<Uuid> {
        URL_SAFE_NO_PAD
            .decode(&self.ids)
            .unwrap_or_default()
            .chunks_exact(16)
            .filter_map(|c| Uuid::from_slice(c).ok())
            .collect()
    }

    fn encode_ids(ids: &[Uuid]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|u| *u.as_bytes()).collect();
        URL_SAFE_NO_PAD.encode(bytes)
    }
}

/// What kind of delta request this is (for faults and statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeltaRequestKind {
    /// No token, or `$deltatoken=latest`.
    Initial,
    /// `$skiptoken`.
    NextLink,
    /// `$deltatoken`.
    DeltaLink,
}

/// A request resolved to the state to serve.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub kind: DeltaRequestKind,
    pub state: SyncState,
    /// `$deltatoken=latest`: answer an empty round.
    pub latest: bool,
}

/// Page-level fault decorations, applied while rendering.
#[derive(Debug, Clone, Default)]
pub(crate) struct Decorations {
    /// Build the next/delta link on this base URL instead (a foreign host).
    pub link_base: Option<String>,
    /// Append an object without `id`.
    pub missing_id: bool,
    /// Append a `@removed` entry with this unknown reason.
    pub unknown_reason: Option<String>,
    /// Pad the first object (or the envelope) with this many bytes.
    pub padding: usize,
}

/// Where and how a page is requested.
#[derive(Debug, Clone)]
pub(crate) struct PageRequest<'a> {
    /// `http://host:port/v1.0`.
    pub base: &'a str,
    /// The function segment as requested (`delta` or `microsoft.graph.delta()`).
    pub function: &'a str,
    pub prefer: Prefer,
}

/// A rendered page.
#[derive(Debug, Clone)]
pub(crate) struct BuiltPage {
    pub body: Vec<u8>,
    /// Entries in `value` (replays and injected entries included).
    pub objects: usize,
    /// Whether the page ends the round (carries a deltaLink).
    pub delta_link: bool,
    /// The `Preference-Applied` values.
    pub applied: Vec<String>,
}

/// Knobs of the engine that don't change while serving.
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    pub seed: u64,
    pub page_size: usize,
    pub member_slice: usize,
    pub replay_rate: f64,
    pub empty_pages: bool,
}

type WindowKey = (u8, Option<[u32; 5]>, u8, String, u64, u64);

/// The delta engine: token codec and page builder.
#[derive(Debug)]
pub(crate) struct Engine {
    cfg: EngineConfig,
    secret: Vec<u8>,
    windows: Mutex<VecDeque<(WindowKey, Arc<Vec<Key>>)>>,
}

thread_local! {
    /// Reusable buffer for a page's objects (one per server thread).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Engine {
    /// An engine with a fresh random token secret.
    pub(crate) fn new(cfg: EngineConfig) -> Self {
        let secret: Vec<u8> = (0..12).flat_map(|_| *Uuid::new_v4().as_bytes()).collect();
        Self {
            cfg,
            secret,
            windows: Mutex::new(VecDeque::new()),
        }
    }

    // ----- tokens ----------------------------------------------------------

    /// Encodes a state as an opaque token.
    pub(crate) fn encode(&self, st: &SyncState) -> String {
        let mut bytes = serde_json::to_vec(st).unwrap_or_default();
        let mac = xxhash_rust::xxh3::xxh3_64_with_secret(&bytes, &self.secret);
        bytes.extend_from_slice(&mac.to_le_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Decodes and authenticates a token.
    pub(crate) fn decode(&self, token: &str) -> Result<SyncState, DeltaError> {
        let bad = || DeltaError::invalid_token("The sync token is invalid or was altered.");
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim_end_matches('='))
            .map_err(|_| bad())?;
        if bytes.len() < 9 {
            return Err(bad());
        }
        let (json, mac) = bytes.split_at(bytes.len() - 8);
        let mut mac_bytes = [0u8; 8];
        mac_bytes.copy_from_slice(mac);
        if xxhash_rust::xxh3::xxh3_64_with_secret(json, &self.secret)
            != u64::from_le_bytes(mac_bytes)
        {
            return Err(bad());
        }
        serde_json::from_slice(json).map_err(|_| bad())
    }

    /// Works out which state a request asks for.
    pub(crate) fn resolve(
        &self,
        t: &Tenant,
        resource: Resource,
        q: &DeltaQuery,
        epoch: u64,
        generation: u64,
        base: &str,
    ) -> Result<Resolved, DeltaError> {
        let token = match (&q.skiptoken, &q.deltatoken) {
            (Some(tok), _) => Some((tok, DeltaRequestKind::NextLink)),
            (None, Some(tok)) if !tok.eq_ignore_ascii_case("latest") => {
                Some((tok, DeltaRequestKind::DeltaLink))
            }
            _ => None,
        };
        if let Some((tok, kind)) = token {
            let st = self.decode(tok)?;
            if st.resource() != Some(resource) {
                return Err(DeltaError::invalid_token(format!(
                    "The sync token does not belong to '{}'.",
                    resource.segment()
                )));
            }
            let mode_ok = match kind {
                DeltaRequestKind::NextLink => st.mode != Mode::NextRound,
                _ => st.mode == Mode::NextRound,
            };
            if !mode_ok || st.epoch > epoch {
                return Err(DeltaError::invalid_token("The sync token is invalid."));
            }
            if st.epoch < epoch {
                return Err(DeltaError::Gone {
                    location: initial_url(base, resource, &st),
                });
            }
            return Ok(Resolved {
                kind,
                state: st,
                latest: false,
            });
        }
        let select = q
            .select
            .as_deref()
            .map(|s| parse_select(resource, s))
            .transpose()?;
        let filter = q
            .filter
            .as_deref()
            .map(|s| parse_filter(resource, s))
            .transpose()?
            .unwrap_or_default();
        let seq = t.seq();
        Ok(Resolved {
            kind: DeltaRequestKind::Initial,
            state: SyncState {
                epoch,
                generation,
                resource: resource.code(),
                mode: Mode::Initial,
                since: seq,
                upto: seq,
                kind_pos: 0,
                offset: 0,
                select,
                types: filter.types,
                ids: SyncState::encode_ids(&filter.ids),
                pending: Vec::new(),
                page: 0,
                round: 0,
                empty_served: false,
            },
            latest: q.deltatoken.is_some(),
        })
    }

    // ----- windows ---------------------------------------------------------

    fn window(
        &self,
        t: &Tenant,
        st: &SyncState,
        kinds: &[ObjectKind],
    ) -> Result<Arc<Vec<Key>>, DeltaError> {
        let key: WindowKey = (
            st.resource,
            st.select,
            st.types,
            st.ids.clone(),
            st.since,
            st.upto,
        );
        if let Ok(cache) = self.windows.lock() {
            if let Some((_, list)) = cache.iter().find(|(k, _)| *k == key) {
                return Ok(Arc::clone(list));
            }
        }
        let ids: HashSet<Key> = st
            .filter_ids()
            .into_iter()
            .filter_map(|id| t.resolve(id))
            .collect();
        let filtered = !st.ids.is_empty();
        let list = t
            .window(st.since, st.upto, |e| {
                kinds.contains(&e.key.kind)
                    && e.relevant_to(st.select_mask(e.key.kind))
                    && (!filtered || ids.contains(&e.key))
            })
            .map_err(|_| DeltaError::SyncState {
                status: 400,
                code: "syncStateNotFound".to_owned(),
                message: "The sync state has expired; start a new initial round.".to_owned(),
            })?;
        let list = Arc::new(list);
        if let Ok(mut cache) = self.windows.lock() {
            if cache.len() >= WINDOW_CACHE {
                cache.pop_front();
            }
            cache.push_back((key, Arc::clone(&list)));
        }
        Ok(list)
    }

    // ----- pages -----------------------------------------------------------

    /// Builds the page for a resolved request.
    pub(crate) fn build(
        &self,
        t: &Tenant,
        resolved: &Resolved,
        req: &PageRequest<'_>,
        deco: &Decorations,
    ) -> Result<BuiltPage, DeltaError> {
        let mut st = resolved.state.clone();
        let resource = st
            .resource()
            .ok_or_else(|| DeltaError::invalid_token("Unknown resource in sync token."))?;
        let mut applied = Vec::new();
        let mut cap = self.cfg.page_size.max(1);
        if let Some(n) = req.prefer.max_page_size {
            if n < cap {
                cap = n;
                applied.push(format!("odata.maxpagesize={n}"));
            }
        }
        if resolved.latest {
            let next = SyncState {
                mode: Mode::NextRound,
                since: t.seq(),
                upto: t.seq(),
                ..st
            };
            let body = self.assemble(req, deco, &next, true, &[], 0, resource);
            return Ok(BuiltPage {
                body,
                objects: 0,
                delta_link: true,
                applied,
            });
        }
        if st.mode == Mode::NextRound {
            st = SyncState {
                mode: Mode::Changes,
                upto: t.seq(),
                kind_pos: 0,
                offset: 0,
                pending: Vec::new(),
                page: 0,
                empty_served: false,
                ..st
            };
        }
        let minimal = req.prefer.minimal && st.mode == Mode::Changes;
        if minimal {
            applied.push("return=minimal".to_owned());
        }
        let kinds = resource.kinds(st.types);
        let window = match st.mode {
            Mode::Changes => Some(self.window(t, &st, &kinds)?),
            _ => None,
        };

        // An injected empty page keeps the cursor and says so in the token.
        if self.cfg.empty_pages
            && !st.empty_served
            && mix(&[self.cfg.seed, u64::from(st.page), st.offset, st.upto, 0xE]) % 5 == 0
        {
            let next = SyncState {
                empty_served: true,
                ..st.clone()
            };
            let body = self.assemble(req, deco, &next, false, &[], 0, resource);
            return Ok(BuiltPage {
                body,
                objects: 0,
                delta_link: false,
                applied,
            });
        }

        SCRATCH.with(|scratch| {
            let mut objs = scratch.take();
            objs.clear();
            let mut w = PageWriter {
                t,
                engine: self,
                st: &st,
                out: &mut objs,
                count: 0,
                typed: resource == Resource::DirectoryObjects,
                minimal,
            };
            let next = w.fill(cap, &kinds, window.as_deref().map(Vec::as_slice));
            let count = w.count;
            let done = next.is_none();
            let next = next.unwrap_or_else(|| SyncState {
                mode: Mode::NextRound,
                since: st.upto,
                upto: st.upto,
                round: st.round.saturating_add(1),
                kind_pos: 0,
                offset: 0,
                pending: Vec::new(),
                page: 0,
                empty_served: false,
                ..st.clone()
            });
            let body = self.assemble(req, deco, &next, done, &objs, count, resource);
            scratch.replace(objs);
            Ok(BuiltPage {
                body,
                objects: count
                    + usize::from(deco.missing_id)
                    + usize::from(deco.unknown_reason.is_some()),
                delta_link: done,
                applied,
            })
        })
    }

    /// Puts the envelope around the objects.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        &self,
        req: &PageRequest<'_>,
        deco: &Decorations,
        next: &SyncState,
        delta_link: bool,
        objs: &[u8],
        count: usize,
        resource: Resource,
    ) -> Vec<u8> {
        let token = self.encode(next);
        let link_base = deco.link_base.as_deref().unwrap_or(req.base);
        let mut out = Vec::with_capacity(objs.len() + token.len() + 400 + deco.padding);
        out.extend_from_slice(b"{\"@odata.context\":");
        let mut context = format!("{}/$metadata#{}", req.base, resource.segment());
        if let (Resource::Kind(kind), Some(masks)) = (resource, next.select) {
            let names = select_names(kind, masks[kind.index()]);
            if !names.is_empty() {
                context.push('(');
                context.push_str(&names.join(","));
                context.push(')');
            }
        }
        write_json_str(&mut out, &context);
        let link = format!(
            "{link_base}/{}/{}?{}={token}",
            resource.segment(),
            req.function,
            if delta_link {
                "$deltatoken"
            } else {
                "$skiptoken"
            }
        );
        out.extend_from_slice(if delta_link {
            b",\"@odata.deltaLink\":"
        } else {
            b",\"@odata.nextLink\":"
        });
        write_json_str(&mut out, &link);
        let pad_envelope = deco.padding > 0 && objs.is_empty();
        if pad_envelope {
            out.extend_from_slice(b",\"@simulator.padding\":\"");
            out.resize(out.len() + deco.padding, b'x');
            out.push(b'"');
        }
        out.extend_from_slice(b",\"value\":[");
        if deco.padding > 0 && !objs.is_empty() {
            // objs starts with the first object's '{'.
            out.extend_from_slice(b"{\"@simulator.padding\":\"");
            out.resize(out.len() + deco.padding, b'x');
            out.extend_from_slice(b"\",");
            out.extend_from_slice(objs.get(1..).unwrap_or_default());
        } else {
            out.extend_from_slice(objs);
        }
        let mut n = count;
        let typed = resource == Resource::DirectoryObjects;
        let first_kind = resource
            .kinds(next.types)
            .first()
            .copied()
            .unwrap_or(ObjectKind::User);
        if deco.missing_id {
            if n > 0 {
                out.push(b',');
            }
            out.push(b'{');
            if typed {
                out.extend_from_slice(b"\"@odata.type\":");
                write_json_str(&mut out, first_kind.odata_type());
                out.push(b',');
            }
            out.extend_from_slice(b"\"displayName\":\"Object without id\"}");
            n += 1;
        }
        if let Some(reason) = &deco.unknown_reason {
            if n > 0 {
                out.push(b',');
            }
            out.push(b'{');
            if typed {
                out.extend_from_slice(b"\"@odata.type\":");
                write_json_str(&mut out, first_kind.odata_type());
                out.push(b',');
            }
            out.extend_from_slice(b"\"id\":");
            write_json_str(&mut out, &Uuid::new_v4().to_string());
            out.extend_from_slice(b",\"@removed\":{\"reason\":");
            write_json_str(&mut out, reason);
            out.extend_from_slice(b"}}");
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// Property names of a select mask, in schema order (`members` last).
fn select_names(kind: ObjectKind, mask: u32) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = kind
        .schema()
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, p)| p.name)
        .collect();
    if mask & MEMBERS_BIT != 0 {
        names.push("members");
    }
    names
}

/// A fresh initial-request URL reproducing a token's `$select` and `$filter`.
pub(crate) fn initial_url(base: &str, resource: Resource, st: &SyncState) -> String {
    let mut params = Vec::new();
    if let Some(masks) = st.select {
        let names: Vec<String> = match resource {
            Resource::Kind(k) => select_names(k, masks[k.index()])
                .into_iter()
                .map(str::to_owned)
                .collect(),
            Resource::DirectoryObjects => ObjectKind::ALL
                .into_iter()
                .flat_map(|k| {
                    select_names(k, masks[k.index()])
                        .into_iter()
                        .map(move |n| format!("{}/{n}", k.type_name()))
                })
                .collect(),
        };
        params.push(format!("$select={}", encode_query_value(&names.join(","))));
    }
    let mut terms: Vec<String> = ObjectKind::ALL
        .into_iter()
        .filter(|k| st.types & (1 << k.index()) != 0)
        .map(|k| format!("isof('{}')", k.type_name()))
        .collect();
    terms.extend(st.filter_ids().iter().map(|id| format!("id eq '{id}'")));
    if !terms.is_empty() {
        params.push(format!(
            "$filter={}",
            encode_query_value(&terms.join(" or "))
        ));
    }
    let mut url = format!("{base}/{}/delta", resource.segment());
    if !params.is_empty() {
        url.push('?');
        url.push_str(&params.join("&"));
    }
    url
}

/// Percent-encodes a query value, keeping OData's readable characters.
fn encode_query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~$,'()/*:@!".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A group's `members@delta` for one round, cut into slices.
struct MemberPlan {
    /// `(member, removed)`.
    entries: Vec<(Key, bool)>,
    /// Slice order: appearance `j` sends slice `order[j]`.
    order: Vec<usize>,
}

/// Writes the objects of one page.
struct PageWriter<'a> {
    t: &'a Tenant,
    engine: &'a Engine,
    st: &'a SyncState,
    out: &'a mut Vec<u8>,
    count: usize,
    typed: bool,
    minimal: bool,
}

impl PageWriter<'_> {
    /// Writes up to `cap` entries; returns the next state, `None` if the round is complete.
    fn fill(
        &mut self,
        cap: usize,
        kinds: &[ObjectKind],
        window: Option<&[Key]>,
    ) -> Option<SyncState> {
        let st = self.st;
        let cfg = &self.engine.cfg;
        // Replays take part of the page, so that a page never exceeds `cap`.
        let mut rng = SplitMix64::new(mix(&[
            cfg.seed,
            st.upto,
            st.since,
            st.offset,
            u64::from(st.page),
            u64::from(st.kind_pos),
        ]));
        let mut replays = 0;
        if cfg.replay_rate > 0.0 && st.page > 0 {
            replays = (0..cap).filter(|_| rng.chance(cfg.replay_rate)).count();
        }
        let normal_cap = cap.saturating_sub(replays).max(1);

        // 1. Pending slices of large groups, one slice per group per page.
        let mut carried = Vec::new();
        let mut continuing = Vec::new();
        for &[g, next] in &st.pending {
            if self.count >= normal_cap {
                carried.push([g, next]);
                continue;
            }
            let slices = self.emit(Key::new(ObjectKind::Group, g), next as usize);
            if (next as usize) + 1 < slices {
                continuing.push([g, next + 1]);
            }
        }

        // 2. The enumeration proper.
        let ids = (!st.ids.is_empty()).then(|| st.filter_ids());
        let start_kind_pos = st.kind_pos;
        let start_offset = st.offset;
        let mut kind_pos = st.kind_pos;
        let mut offset = st.offset;
        let mut scanned = 0usize;
        let scan_limit = cap.saturating_mul(64);
        let finished = loop {
            if self.count >= normal_cap || scanned >= scan_limit {
                break false;
            }
            scanned += 1;
            let key = match (window, &ids) {
                (Some(list), _) => match list.get(offset as usize) {
                    Some(&k) => k,
                    None => break true,
                },
                (None, Some(ids)) => match ids.get(offset as usize) {
                    Some(&id) => match self.t.resolve(id) {
                        Some(k)
                            if kinds.contains(&k.kind)
                                && k.idx < self.t.count_at(k.kind, st.upto) =>
                        {
                            k
                        }
                        _ => {
                            offset += 1;
                            continue;
                        }
                    },
                    None => break true,
                },
                (None, None) => {
                    let Some(&kind) = kinds.get(usize::from(kind_pos)) else {
                        break true;
                    };
                    if offset >= u64::from(self.t.count_at(kind, st.upto)) {
                        kind_pos += 1;
                        offset = 0;
                        continue;
                    }
                    Key::new(kind, offset as u32)
                }
            };
            offset += 1;
            if self.emit(key, 0) > 1 {
                continuing.push([key.idx, 1]);
            }
        };

        // 3. Replays of objects already sent in this round.
        if replays > 0 && kind_pos == start_kind_pos && start_offset > 0 {
            for _ in 0..replays {
                let pos = rng.below(start_offset) as usize;
                let key = match (window, &ids) {
                    (Some(list), _) => list.get(pos).copied(),
                    (None, Some(ids)) => ids.get(pos).and_then(|&id| self.t.resolve(id)),
                    (None, None) => kinds
                        .get(usize::from(start_kind_pos))
                        .map(|&k| Key::new(k, pos as u32)),
                };
                if let Some(key) = key {
                    self.emit(key, 0);
                }
            }
        }

        let mut pending = carried;
        pending.extend(continuing);
        if finished && pending.is_empty() {
            return None;
        }
        Some(SyncState {
            kind_pos,
            offset,
            pending,
            page: st.page.saturating_add(1),
            empty_served: false,
            ..st.clone()
        })
    }

    fn begin(&mut self) {
        if self.count > 0 {
            self.out.push(b',');
        }
        self.count += 1;
        self.out.push(b'{');
    }

    /// `"@odata.type":"#microsoft.graph.user",` on directoryObjects.
    fn write_type(&mut self, kind: ObjectKind) {
        if self.typed {
            self.out.extend_from_slice(b"\"@odata.type\":\"");
            self.out.extend_from_slice(kind.odata_type().as_bytes());
            self.out.extend_from_slice(b"\",");
        }
    }

    fn write_id(&mut self, key: Key) {
        self.out.extend_from_slice(b"\"id\":\"");
        let mut buf = [0u8; 36];
        let s = self.t.id(key).hyphenated().encode_lower(&mut buf);
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(b'"');
    }

    fn removed(&mut self, key: Key, reason: &str) {
        self.begin();
        self.write_type(key.kind);
        self.write_id(key);
        self.out.extend_from_slice(b",\"@removed\":{\"reason\":\"");
        self.out.extend_from_slice(reason.as_bytes());
        self.out.extend_from_slice(b"\"}}");
    }

    /// Whether `view` is served whole in an incremental round (created or
    /// restored within the window).
    fn whole(&self, view: &ObjView<'_>) -> bool {
        let (since, upto) = (self.st.since, self.st.upto);
        self.st.mode == Mode::Initial
            || (view.created_seq > since && view.created_seq <= upto)
            || (view.restored_seq > since && view.restored_seq <= upto)
    }

    fn member_plan(&self, g: u32, whole: bool) -> MemberPlan {
        let st = self.st;
        let t = self.t;
        let entries: Vec<(Key, bool)> = if st.mode == Mode::Initial {
            t.members_at(g, st.upto)
                .into_iter()
                .map(|m| (m, false))
                .collect()
        } else if whole {
            let current = t.members_at(g, st.upto);
            let former = t.former_members(g, st.upto, &current);
            current
                .into_iter()
                .map(|m| (m, false))
                .chain(former.into_iter().map(|m| (m, true)))
                .collect()
        } else {
            let (added, removed) = t.member_delta(g, st.since, st.upto);
            added
                .into_iter()
                .map(|m| (m, false))
                .chain(removed.into_iter().map(|m| (m, true)))
                .collect()
        };
        let slice = self.engine.cfg.member_slice.max(1);
        let slices = entries.len().div_ceil(slice).max(1);
        let mut order: Vec<usize> = (0..slices).collect();
        SplitMix64::new(mix(&[
            self.engine.cfg.seed,
            u64::from(g),
            st.since,
            st.upto,
            0x5_11CE,
        ]))
        .shuffle(&mut order);
        MemberPlan { entries, order }
    }

    /// Writes `key` (for a sliced group: appearance `appearance`); returns
    /// the group's number of slices (1 for anything else, 0 if nothing written).
    fn emit(&mut self, key: Key, appearance: usize) -> usize {
        let Some(view) = self.t.view(key) else {
            return 0;
        };
        match view.life {
            Life::HardDeleted => {
                if self.st.mode == Mode::Initial
                    && view.removed_seq < self.t.recent_hard_threshold(key.kind)
                {
                    return 0;
                }
                self.removed(key, "deleted");
                1
            }
            Life::SoftDeleted => {
                self.removed(key, "changed");
                1
            }
            Life::Live => self.live(key, &view, appearance),
        }
    }

    fn live(&mut self, key: Key, view: &ObjView<'_>, appearance: usize) -> usize {
        let st = self.st;
        let mask = st.select_mask(key.kind);
        let whole = self.whole(view);
        let only_changed = self.minimal && !whole;
        self.begin();
        self.write_type(key.kind);
        for (i, (def, value)) in key.kind.schema().iter().zip(view.props.iter()).enumerate() {
            let Some(value) = value else { continue };
            if mask & (1 << i) == 0 || (only_changed && view.prop_seq(i) <= st.since) {
                continue;
            }
            self.out.push(b'"');
            self.out.extend_from_slice(def.name.as_bytes());
            self.out.extend_from_slice(b"\":");
            value.write_json(self.out);
            self.out.push(b',');
        }
        self.write_id(key);
        let mut slices = 1;
        if key.kind == ObjectKind::Group && mask & MEMBERS_BIT != 0 {
            let plan = self.member_plan(key.idx, whole);
            slices = plan.order.len();
            let show = st.mode == Mode::Initial || whole || !plan.entries.is_empty();
            if show {
                let slice = self.engine.cfg.member_slice.max(1);
                let which = plan.order.get(appearance).copied().unwrap_or(0);
                let part = plan.entries.iter().skip(which * slice).take(slice);
                self.out.extend_from_slice(b",\"members@delta\":[");
                for (n, &(m, removed)) in part.enumerate() {
                    if n > 0 {
                        self.out.push(b',');
                    }
                    self.out.extend_from_slice(b"{\"@odata.type\":");
                    write_json_str(self.out, m.kind.odata_type());
                    self.out.push(b',');
                    self.write_id(m);
                    if removed {
                        self.out
                            .extend_from_slice(b",\"@removed\":{\"reason\":\"deleted\"}");
                    }
                    self.out.push(b'}');
                }
                self.out.push(b']');
            }
        }
        self.out.push(b'}');
        slices
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::model::GenCtx;
    use crate::simulator::tenant::Population;

    fn engine(page_size: usize) -> Engine {
        Engine::new(EngineConfig {
            seed: 1,
            page_size,
            member_slice: 20,
            replay_rate: 0.0,
            empty_pages: false,
        })
    }

    fn tenant(users: u32) -> Tenant {
        Tenant::new(
            GenCtx::new(1, "contoso.onmicrosoft.com", 10, users, 20),
            Population {
                users,
                groups: 50,
                applications: 20,
                devices: 20,
                service_principals: 20,
            },
        )
    }

    fn req() -> PageRequest<'static> {
        PageRequest {
            base: "http://localhost/v1.0",
            function: "delta",
            prefer: Prefer::default(),
        }
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let e = engine(200);
        let t = tenant(10);
        let r = e
            .resolve(
                &t,
                Resource::Kind(ObjectKind::User),
                &DeltaQuery::default(),
                0,
                0,
                "b",
            )
            .unwrap();
        let tok = e.encode(&r.state);
        assert_eq!(e.decode(&tok).unwrap(), r.state);
        let mut bytes = URL_SAFE_NO_PAD.decode(&tok).unwrap();
        bytes[3] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(bytes);
        assert!(matches!(
            e.decode(&tampered),
            Err(DeltaError::SyncState { ref code, .. }) if code == "syncStateInvalid"
        ));
        assert!(e.decode("!!!").is_err());
        assert!(e.decode("").is_err());
        // Another simulator's secret does not validate.
        assert!(engine(200).decode(&tok).is_err());
    }

    #[test]
    fn select_parsing() {
        let u = Resource::Kind(ObjectKind::User);
        let m = parse_select(u, "displayName, id,givenName").unwrap();
        assert_eq!(m[0], 0b11);
        assert!(parse_select(u, "nope").is_err());
        assert!(parse_select(u, "members").is_err());
        let g = parse_select(Resource::Kind(ObjectKind::Group), "members").unwrap();
        assert_eq!(g[1], MEMBERS_BIT);
        let d = parse_select(
            Resource::DirectoryObjects,
            "microsoft.graph.user/surname,displayName",
        )
        .unwrap();
        assert_eq!(d[0], 0b101);
        assert_eq!(d[1], 0b1);
        assert!(parse_select(Resource::DirectoryObjects, "microsoft.graph.nope/x").is_err());
    }

    #[test]
    fn filter_parsing() {
        let d = Resource::DirectoryObjects;
        let f = parse_filter(
            d,
            "isof('microsoft.graph.user') or isof('microsoft.graph.group')",
        )
        .unwrap();
        assert_eq!(f.types, 0b11);
        let id = Uuid::new_v4();
        let f = parse_filter(Resource::Kind(ObjectKind::User), &format!("id eq '{id}'")).unwrap();
        assert_eq!(f.ids, vec![id]);
        assert!(
            parse_filter(
                Resource::Kind(ObjectKind::User),
                "isof('microsoft.graph.user')"
            )
            .is_err()
        );
        assert!(parse_filter(d, "displayName eq 'x'").is_err());
        assert!(parse_filter(d, "id eq 'not-a-guid'").is_err());
        assert!(parse_filter(d, "id eq 'x").is_err());
        let many = (0..51)
            .map(|_| format!("id eq '{}'", Uuid::new_v4()))
            .collect::<Vec<_>>()
            .join(" or ");
        assert!(parse_filter(d, &many).is_err());
    }

    #[test]
    fn prefer_parsing() {
        let p = Prefer::parse(["odata.maxpagesize=50, return=minimal"]);
        assert_eq!(
            p,
            Prefer {
                max_page_size: Some(50),
                minimal: true
            }
        );
        let p = Prefer::parse(["return=representation", "odata.maxpagesize=\"7\""]);
        assert_eq!(
            p,
            Prefer {
                max_page_size: Some(7),
                minimal: false
            }
        );
        assert_eq!(Prefer::parse(["odata.maxpagesize=0"]).max_page_size, None);
    }

    #[test]
    fn initial_url_reproduces_select_and_filter() {
        let st = SyncState {
            epoch: 0,
            generation: 0,
            resource: Resource::DirectoryObjects.code(),
            mode: Mode::Initial,
            since: 0,
            upto: 0,
            kind_pos: 0,
            offset: 0,
            select: Some([0b1, 0, 0, 0, 0]),
            types: 0b1,
            ids: String::new(),
            pending: vec![],
            page: 0,
            round: 0,
            empty_served: false,
        };
        let url = initial_url("http://h/v1.0", Resource::DirectoryObjects, &st);
        assert_eq!(
            url,
            "http://h/v1.0/directoryObjects/delta?$select=microsoft.graph.user/displayName\
             &$filter=isof('microsoft.graph.user')"
        );
    }

    fn link_token(body: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let link = v["@odata.deltaLink"]
            .as_str()
            .or_else(|| v["@odata.nextLink"].as_str())
            .unwrap();
        link.rsplit_once('=').unwrap().1.to_owned()
    }

    #[test]
    fn deltalinks_older_than_the_log_expire() {
        let e = engine(200);
        let mut t = tenant(10);
        t.set_log_retention(2);
        let q = DeltaQuery {
            deltatoken: Some("latest".to_owned()),
            ..DeltaQuery::default()
        };
        let users = Resource::Kind(ObjectKind::User);
        let r = e.resolve(&t, users, &q, 0, 0, "b").unwrap();
        let page = e.build(&t, &r, &req(), &Decorations::default()).unwrap();
        let token = link_token(&page.body);
        let q = DeltaQuery {
            deltatoken: Some(token),
            ..DeltaQuery::default()
        };
        let r = e.resolve(&t, users, &q, 0, 0, "b").unwrap();
        assert_eq!(r.kind, DeltaRequestKind::DeltaLink);
        for i in 0..5 {
            t.soft_delete(Key::new(ObjectKind::Application, i)).unwrap();
        }
        let err = e
            .build(&t, &r, &req(), &Decorations::default())
            .unwrap_err();
        assert!(
            matches!(err, DeltaError::SyncState { status: 400, ref code, .. } if code == "syncStateNotFound"),
            "{err:?}"
        );
        // A newer epoch makes the same token answer 410 with a fresh URL.
        let err = e.resolve(&t, users, &q, 1, 0, "http://h/v1.0").unwrap_err();
        assert_eq!(
            err,
            DeltaError::Gone {
                location: "http://h/v1.0/users/delta".to_owned()
            }
        );
    }

    /// Not a benchmark assertion: prints how long a 200-user page takes.
    #[test]
    fn page_build_time() {
        let e = engine(200);
        let t = tenant(1_000_000);
        let r = e
            .resolve(
                &t,
                Resource::Kind(ObjectKind::User),
                &DeltaQuery::default(),
                0,
                0,
                "b",
            )
            .unwrap();
        let request = req();
        let mut total = std::time::Duration::ZERO;
        let mut state = r;
        let rounds = 50;
        let mut bytes = 0;
        for _ in 0..rounds {
            let start = std::time::Instant::now();
            let page = e
                .build(&t, &state, &request, &Decorations::default())
                .unwrap();
            total += start.elapsed();
            bytes = page.body.len();
            assert_eq!(page.objects, 200);
            let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
            let link = v["@odata.nextLink"].as_str().unwrap();
            let tok = link.split("$skiptoken=").nth(1).unwrap();
            state = Resolved {
                kind: DeltaRequestKind::NextLink,
                state: e.decode(tok).unwrap(),
                latest: false,
            };
        }
        println!(
            "page of 200 users: {:?} per page ({} bytes), {:.0} objects/s on one core",
            total / rounds,
            bytes,
            200.0 * f64::from(rounds) / total.as_secs_f64()
        );
    }
}
