//! The HTTP surface: the AAD token endpoint, the Graph delta endpoints with
//! bearer authentication and fault injection, and the `/_sim` control API.
//!
//! Handlers never hold the tenant lock across an `.await`: a request resolves
//! its token and picks its fault under a read lock, sleeps (latency, slow
//! faults) without it, then builds the page under a read lock again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use serde_json::json;

use super::Simulator;
use super::delta::{
    Decorations, DeltaError, DeltaQuery, DeltaRequestKind, PageRequest, Prefer, Resource,
    initial_url,
};
use super::faults::{Fault, Target};
use super::model::now_rfc3339;
use super::stats::{AuthHeader, RequestKind};
use super::tenant::{ChurnSpec, Mutation};

/// The content type Graph answers pages with.
const ODATA_JSON: &str = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8";

/// Issued access tokens and their expiry.
///
/// Time is passed in (`*_at`) so that expiry is tested without sleeping.
#[derive(Debug, Default)]
pub(crate) struct TokenStore {
    tokens: HashMap<String, Instant>,
}

impl TokenStore {
    /// Issues a new opaque random token valid for `lifetime`.
    pub(crate) fn issue(&mut self, lifetime: Duration) -> String {
        self.issue_at(Instant::now(), lifetime)
    }

    fn issue_at(&mut self, now: Instant, lifetime: Duration) -> String {
        if self.tokens.len() > 1024 {
            self.tokens.retain(|_, exp| *exp > now);
        }
        let mut raw = Vec::with_capacity(32);
        raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        let token = URL_SAFE_NO_PAD.encode(raw);
        let expiry = now
            .checked_add(lifetime)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        self.tokens.insert(token.clone(), expiry);
        token
    }

    /// Whether `token` was issued and has not expired or been invalidated.
    pub(crate) fn valid(&self, token: &str) -> bool {
        self.valid_at(token, Instant::now())
    }

    fn valid_at(&self, token: &str, now: Instant) -> bool {
        self.tokens.get(token).is_some_and(|exp| *exp > now)
    }

    /// Invalidates every token.
    pub(crate) fn clear(&mut self) {
        self.tokens.clear();
    }
}

/// The simulator's routes.
pub(crate) fn router(sim: Simulator) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route("/v1.0/{resource}/{function}", get(delta))
        .route("/v1.0/{resource}/{function}/", get(delta))
        .route("/_sim/churn", post(control_churn))
        .route(
            "/_sim/faults",
            post(control_inject)
                .get(control_faults)
                .delete(control_clear_faults),
        )
        .route("/_sim/truth", get(control_truth))
        .route("/_sim/changes", get(control_changes))
        .route(
            "/_sim/stats",
            get(control_stats).delete(control_reset_stats),
        )
        .route("/_sim/mutate", post(control_mutate))
        .route("/_sim/page-latency", post(control_page_latency))
        .fallback(fallback)
        .with_state(sim)
}

// ----- response helpers ------------------------------------------------------

/// Sets `request-id` (and echoes `client-request-id`), as Graph does.
fn request_id_headers(resp: &mut Response, headers: &HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("request-id", v);
    }
    if let Some(v) = headers.get("client-request-id") {
        resp.headers_mut().insert("client-request-id", v.clone());
    }
}

/// A Graph error: `{"error":{"code","message","innerError":{...}}}`.
fn graph_error(status: StatusCode, code: &str, message: &str, headers: &HeaderMap) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let client_request_id = headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(&request_id)
        .to_owned();
    let body = json!({
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": now_rfc3339(),
                "request-id": request_id,
                "client-request-id": client_request_id,
            }
        }
    });
    let mut resp = (status, axum::Json(body)).into_response();
    request_id_headers(&mut resp, headers, &request_id);
    resp
}

/// An AAD token endpoint error.
fn aad_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    let trace = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {trace} Timestamp: {}",
            now_rfc3339()
        ),
        "error_codes": [code],
        "timestamp": now_rfc3339(),
        "trace_id": trace,
        "correlation_id": trace,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, axum::Json(body)).into_response()
}

fn delta_error(err: &DeltaError, headers: &HeaderMap) -> Response {
    match err {
        DeltaError::BadRequest { code, message } => {
            graph_error(StatusCode::BAD_REQUEST, code, message, headers)
        }
        DeltaError::NotFound { .. } => graph_error(
            StatusCode::NOT_FOUND,
            "Request_ResourceNotFound",
            &err.to_string(),
            headers,
        ),
        DeltaError::SyncState {
            status,
            code,
            message,
        } => graph_error(
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            message,
            headers,
        ),
        DeltaError::Gone { location } => {
            let mut resp = graph_error(
                StatusCode::GONE,
                "resyncRequired",
                "The sync state was reset. Start a new round at the URL in the Location header.",
                headers,
            );
            if let Ok(v) = HeaderValue::from_str(location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
    }
}

fn retry_after(resp: &mut Response, secs: Option<u64>) {
    if let Some(s) = secs {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
}

/// `http://{Host}/v1.0`, or the configured public base.
fn base_url(sim: &Simulator, headers: &HeaderMap, uri: &Uri) -> String {
    if let Some(base) = &sim.inner.cfg.public_base {
        return base.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_else(|| "localhost".to_owned());
    format!("http://{host}/v1.0")
}

/// `base` with its host (and optionally port) replaced by `host`.
fn foreign_base(base: &str, host: Option<&str>) -> String {
    let host = host.unwrap_or("evil.example");
    let Ok(mut url) = url::Url::parse(base) else {
        return format!("http://{host}/v1.0");
    };
    match url::Url::parse(&format!("http://{host}/")) {
        Ok(h) => {
            let _ = url.set_host(h.host_str());
            if h.port().is_some() {
                let _ = url.set_port(h.port());
            }
        }
        Err(_) => {
            let _ = url.set_host(Some("evil.example"));
        }
    }
    url.as_str().trim_end_matches('/').to_owned()
}

// ----- token endpoint ----------------------------------------------------------

async fn token(
    State(sim): State<Simulator>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = AuthHeader::of(&headers);
    let resp = issue_token(&sim, &tenant, &headers, &body).await;
    sim.record(RequestKind::Token, resp.status().as_u16(), auth);
    resp
}

/// Client credentials from `Authorization: Basic` (RFC 6749 §2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(rest.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| {
        url::form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

async fn issue_token(sim: &Simulator, tenant: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let inner = &sim.inner;
    if let Ok(mut s) = inner.stats.lock() {
        s.token_requests += 1;
    }
    let fault = inner
        .faults
        .lock()
        .ok()
        .and_then(|mut q| q.take(Target::Token));
    if let Some(f) = &fault {
        sim.count_fault(f);
    }
    match fault {
        Some(Fault::HttpError {
            status,
            retry_after: ra,
            ..
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let (error, code) = if status == StatusCode::TOO_MANY_REQUESTS {
                ("temporarily_unavailable", 50196)
            } else {
                ("temporarily_unavailable", 50001)
            };
            let mut resp = aad_error(
                status,
                error,
                code,
                "The service is temporarily unavailable (injected fault).",
            );
            retry_after(&mut resp, ra);
            return resp;
        }
        Some(Fault::Slow { delay_ms, .. }) => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        _ => {}
    }

    let cfg = &inner.cfg;
    let form: HashMap<String, String> = url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let missing = |p: &str| {
        aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900_144,
            &format!("The request body must contain the following parameter: '{p}'."),
        )
    };
    if !tenant.eq_ignore_ascii_case(&cfg.tenant_id) {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90_002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID \
                 and are signing into the correct cloud."
            ),
        );
    }
    let Some(grant) = form.get("grant_type") else {
        return missing("grant_type");
    };
    if grant != "client_credentials" {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70_003,
            &format!("The app requested an unsupported grant type '{grant}'."),
        );
    }
    let basic = basic_credentials(headers);
    let client_id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|b| b.0.clone()));
    let Some(client_id) = client_id else {
        return missing("client_id");
    };
    if client_id != cfg.client_id {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700_016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory \
                 '{}'.",
                cfg.tenant_id
            ),
        );
    }
    let secret = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.map(|b| b.1));
    let Some(secret) = secret else {
        return aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7_000_216,
            "'client_assertion', 'client_secret' or 'request' is required for the \
             'client_credentials' grant type.",
        );
    };
    if secret != cfg.client_secret {
        return aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7_000_215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is \
                 the client secret value, not the client secret ID, for a secret added to app \
                 '{client_id}'."
            ),
        );
    }
    let Some(scope) = form.get("scope") else {
        return missing("scope");
    };
    if !scope.ends_with("/.default") {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1_002_012,
            &format!(
                "The provided value for scope {scope} is not valid. Client credential flows must \
                 have a scope value with /.default suffixed to the resource identifier \
                 (application ID URI)."
            ),
        );
    }
    let lifetime = cfg.token_lifetime;
    let access_token = match inner.tokens.lock() {
        Ok(mut t) => t.issue(lifetime),
        Err(_) => {
            return aad_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                50_000,
                "Token store unavailable.",
            );
        }
    };
    if let Ok(mut s) = inner.stats.lock() {
        s.tokens_issued += 1;
    }
    let secs = lifetime.as_secs();
    let mut resp = axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": secs,
        "ext_expires_in": secs,
        "access_token": access_token,
    }))
    .into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    resp
}

// ----- delta endpoint ------------------------------------------------------------

fn classify(q: &Result<DeltaQuery, DeltaError>) -> RequestKind {
    match q {
        Ok(q) if q.skiptoken.is_some() => RequestKind::NextLink,
        Ok(q)
            if q.deltatoken
                .as_deref()
                .is_some_and(|t| !t.eq_ignore_ascii_case("latest")) =>
        {
            RequestKind::DeltaLink
        }
        _ => RequestKind::Initial,
    }
}

async fn delta(
    State(sim): State<Simulator>,
    Path((resource, function)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let auth = AuthHeader::of(&headers);
    let query = DeltaQuery::parse(uri.query());
    let is_delta = function.eq_ignore_ascii_case("delta")
        || function.eq_ignore_ascii_case("microsoft.graph.delta()");
    let parsed = Resource::parse(&resource).filter(|_| is_delta);
    let (kind, resp) = match parsed {
        None => (
            RequestKind::Other,
            delta_error(
                &DeltaError::NotFound {
                    segment: if is_delta { resource } else { function },
                },
                &headers,
            ),
        ),
        Some(res) => {
            let kind = classify(&query);
            let resp = serve_delta(&sim, res, &function, query, &uri, &headers).await;
            (kind, resp)
        }
    };
    sim.record(kind, resp.status().as_u16(), auth);
    resp
}

fn bearer_ok(sim: &Simulator, headers: &HeaderMap) -> Result<(), &'static str> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Err("Access token is empty.");
    };
    let v = v.to_str().unwrap_or("");
    let token = match v.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => return Err("Access token is empty."),
    };
    let valid = sim
        .inner
        .tokens
        .lock()
        .map(|t| t.valid(token))
        .unwrap_or(false);
    if valid {
        Ok(())
    } else {
        Err("Access token has expired or is not yet valid.")
    }
}

async fn serve_delta(
    sim: &Simulator,
    resource: Resource,
    function: &str,
    query: Result<DeltaQuery, DeltaError>,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let inner = &sim.inner;
    if let Err(message) = bearer_ok(sim, headers) {
        let mut resp = graph_error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            message,
            headers,
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"\", error=\"invalid_token\""),
        );
        return resp;
    }
    let query = match query {
        Ok(q) => q,
        Err(e) => return delta_error(&e, headers),
    };
    let base = base_url(sim, headers, uri);
    let prefer = Prefer::parse(
        headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let epoch = sim.epoch();
    let generation = sim.generation();
    let resolved = {
        let t = sim.read_tenant();
        inner
            .engine
            .resolve(&t, resource, &query, epoch, generation, &base)
    };
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => return delta_error(&e, headers),
    };
    let target = Target::Delta {
        kind: resolved.kind,
        token_generation: (resolved.kind != DeltaRequestKind::Initial)
            .then_some(resolved.state.generation),
    };
    let fault = inner.faults.lock().ok().and_then(|mut q| q.take(target));
    if let Some(f) = &fault {
        sim.count_fault(f);
        tracing::debug!(fault = f.name(), "Injecting fault.");
    }
    let mut deco = Decorations::default();
    let mut delay = sim.page_latency();
    let (mut truncate, mut malformed) = (false, false);
    match fault {
        Some(Fault::HttpError {
            status,
            retry_after: ra,
            ..
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            let (code, message) = match status.as_u16() {
                429 => (
                    "TooManyRequests",
                    "Too many requests. Retry after the time in the Retry-After header.",
                ),
                503 => (
                    "ServiceUnavailable",
                    "The service is temporarily unavailable.",
                ),
                504 => ("GatewayTimeout", "The gateway timed out."),
                _ => ("UnknownError", "An injected error occurred."),
            };
            let mut resp = graph_error(status, code, message, headers);
            retry_after(&mut resp, ra);
            return resp;
        }
        Some(Fault::Gone { .. }) => {
            sim.bump_epoch();
            let location = initial_url(&base, resource, &resolved.state);
            return delta_error(&DeltaError::Gone { location }, headers);
        }
        Some(Fault::SyncStateExpired { status, code, .. }) => {
            return delta_error(
                &DeltaError::SyncState {
                    status,
                    code,
                    message:
                        "The sync state was not found or has expired. Start a new initial round."
                            .to_owned(),
                },
                headers,
            );
        }
        Some(Fault::Slow { delay_ms, .. }) => {
            delay = delay.saturating_add(Duration::from_millis(delay_ms));
        }
        Some(Fault::TruncatedBody { .. }) => truncate = true,
        Some(Fault::MalformedJson { .. }) => malformed = true,
        Some(Fault::MissingId { .. }) => deco.missing_id = true,
        Some(Fault::UnknownRemovedReason { reason, .. }) => deco.unknown_reason = Some(reason),
        Some(Fault::HugePage { bytes, .. }) => deco.padding = bytes,
        Some(Fault::ForeignLink { host, .. }) => {
            deco.link_base = Some(foreign_base(&base, host.as_deref()));
        }
        Some(Fault::InvalidateTokens) | None => {}
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let request = PageRequest {
        base: &base,
        function,
        prefer,
    };
    let page = {
        let t = sim.read_tenant();
        inner.engine.build(&t, &resolved, &request, &deco)
    };
    let page = match page {
        Ok(p) => p,
        Err(e) => return delta_error(&e, headers),
    };
    tracing::debug!(
        resource = resource.segment(),
        objects = page.objects,
        round_complete = page.delta_link,
        "Delta page served."
    );
    if let Ok(mut s) = inner.stats.lock() {
        s.pages_served += 1;
        s.objects_served += page.objects as u64;
    }
    let mut body = page.body;
    if truncate {
        // Cut inside the envelope: whatever the length, the top-level object stays open.
        body.truncate((body.len() / 2).max(1));
    }
    if malformed {
        let at = body
            .windows(9)
            .position(|w| w == b"\"value\":[")
            .map_or(body.len() / 2, |p| p + 9);
        body.splice(at..at, b"{\"id\":,}".iter().copied());
    }
    let mut resp = Response::new(Body::from(Bytes::from(body)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ODATA_JSON));
    if !page.applied.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&page.applied.join(",")) {
            resp.headers_mut().insert("preference-applied", v);
        }
    }
    request_id_headers(&mut resp, headers, &uuid::Uuid::new_v4().to_string());
    resp
}

// ----- control API -----------------------------------------------------------------

fn control_json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

fn control_error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    control_json(status, &json!({ "error": message.to_string() }))
}

/// Parses a control request body; the error is the 400 answer's message.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

fn finish_control(sim: &Simulator, headers: &HeaderMap, resp: Response) -> Response {
    sim.record(
        RequestKind::Control,
        resp.status().as_u16(),
        AuthHeader::of(headers),
    );
    resp
}

async fn control_churn(State(sim): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    let resp = match parse_body::<ChurnSpec>(&body) {
        Ok(spec) => control_json(StatusCode::OK, &sim.churn(&spec)),
        Err(msg) => control_error(StatusCode::BAD_REQUEST, msg),
    };
    finish_control(&sim, &headers, resp)
}

async fn control_inject(State(sim): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    let faults: Result<Vec<Fault>, String> =
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Array(_)) => parse_body(&body),
            Ok(_) => parse_body::<Fault>(&body).map(|f| vec![f]),
            Err(e) => Err(format!("invalid JSON body: {e}")),
        };
    let resp = match faults {
        Ok(faults) => match faults.iter().try_for_each(Fault::validate) {
            Ok(()) => {
                let n = faults.len();
                for f in faults {
                    sim.inject(f);
                }
                control_json(StatusCode::OK, &json!({ "queued": n }))
            }
            Err(e) => control_error(StatusCode::BAD_REQUEST, e),
        },
        Err(msg) => control_error(StatusCode::BAD_REQUEST, msg),
    };
    finish_control(&sim, &headers, resp)
}

async fn control_faults(State(sim): State<Simulator>, headers: HeaderMap) -> Response {
    let resp = control_json(StatusCode::OK, &sim.queued_faults());
    finish_control(&sim, &headers, resp)
}

async fn control_clear_faults(State(sim): State<Simulator>, headers: HeaderMap) -> Response {
    sim.clear_faults();
    finish_control(&sim, &headers, StatusCode::NO_CONTENT.into_response())
}

async fn control_truth(State(sim): State<Simulator>, headers: HeaderMap) -> Response {
    let resp = control_json(StatusCode::OK, &sim.truth());
    finish_control(&sim, &headers, resp)
}

async fn control_changes(State(sim): State<Simulator>, headers: HeaderMap, uri: Uri) -> Response {
    let since = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "since")
        .map(|(_, v)| v.parse::<u64>());
    let resp = match since {
        Some(Err(_)) => control_error(StatusCode::BAD_REQUEST, "since must be a sequence number"),
        Some(Ok(s)) => control_json(StatusCode::OK, &sim.changes_since(s)),
        None => control_json(StatusCode::OK, &sim.changes()),
    };
    finish_control(&sim, &headers, resp)
}

async fn control_stats(State(sim): State<Simulator>, headers: HeaderMap) -> Response {
    // Recorded first, so that the snapshot includes this request.
    sim.record(RequestKind::Control, 200, AuthHeader::of(&headers));
    control_json(StatusCode::OK, &sim.stats())
}

async fn control_reset_stats(State(sim): State<Simulator>, headers: HeaderMap) -> Response {
    sim.reset_stats();
    finish_control(&sim, &headers, StatusCode::NO_CONTENT.into_response())
}

async fn control_mutate(State(sim): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    let resp = match parse_body::<Mutation>(&body) {
        Ok(m) => match sim.mutate(m) {
            Ok(outcome) => control_json(StatusCode::OK, &outcome),
            Err(e) => control_error(
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
                e,
            ),
        },
        Err(msg) => control_error(StatusCode::BAD_REQUEST, msg),
    };
    finish_control(&sim, &headers, resp)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PageLatency {
    #[serde(with = "humantime_serde")]
    page_latency: Duration,
}

async fn control_page_latency(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resp = match parse_body::<PageLatency>(&body) {
        Ok(p) => {
            sim.set_page_latency(p.page_latency);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(msg) => control_error(StatusCode::BAD_REQUEST, msg),
    };
    finish_control(&sim, &headers, resp)
}

async fn fallback(State(sim): State<Simulator>, uri: Uri, headers: HeaderMap) -> Response {
    let resp = graph_error(
        StatusCode::NOT_FOUND,
        "Request_ResourceNotFound",
        &format!("Resource not found for the segment '{}'.", uri.path()),
        &headers,
    );
    sim.record(RequestKind::Other, 404, AuthHeader::of(&headers));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_base_replaces_host_and_keeps_port() {
        assert_eq!(
            foreign_base("http://127.0.0.1:8080/v1.0", None),
            "http://evil.example:8080/v1.0"
        );
        assert_eq!(
            foreign_base("http://127.0.0.1:8080/v1.0", Some("127.0.0.2:9")),
            "http://127.0.0.2:9/v1.0"
        );
    }

    #[test]
    fn tokens_expire_and_can_be_invalidated() {
        let mut store = TokenStore::default();
        let t0 = Instant::now();
        let a = store.issue_at(t0, Duration::from_secs(60));
        assert!(store.valid_at(&a, t0 + Duration::from_secs(59)));
        assert!(!store.valid_at("forged", t0));
        assert!(!store.valid_at(&a, t0 + Duration::from_secs(61)));
        let b = store.issue(Duration::from_secs(60));
        assert!(store.valid(&b));
        store.clear();
        assert!(!store.valid(&b));
    }

    #[test]
    fn basic_client_credentials_are_decoded() {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", STANDARD.encode("my%20app:s3cr%3At"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        assert_eq!(
            basic_credentials(&h),
            Some(("my app".to_owned(), "s3cr:t".to_owned()))
        );
    }
}
