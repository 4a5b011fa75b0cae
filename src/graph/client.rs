//! The delta client: builds a stream's initial request, fetches pages by
//! link, and turns every HTTP outcome into a page, a retry or a
//! [`GraphError`].

use std::{sync::Arc, time::Duration};

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use url::Url;

use super::{GraphError, SYNC_STATE_ERROR_CODES, TokenProvider, auth::describe_reqwest, page};
use crate::{
    config::{GraphSettings, StreamConfig},
    graph::Page,
    retry::{self, Policy},
};

/// Characters percent-encoded in `$select`/`$filter` values. OData's own
/// punctuation (`'`, `(`, `)`, `,`, `/`, `.`) stays readable, as in
/// Microsoft's examples; spaces become `%20`.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'>')
    .add(b'=')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'|')
    .add(b'\\')
    .add(b'^');

/// Per-request options.
#[derive(Debug, Clone, Copy, Default)]
pub struct FetchOptions {
    /// Send `Prefer: return=minimal` (only on deltaLink rounds).
    pub return_minimal: bool,
}

/// A Graph client for one tenant. Cheap to clone; streams of the same
/// tenant share the HTTP connection pool and the token.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    auth: Arc<TokenProvider>,
    settings: Arc<GraphSettings>,
    host: String,
}

/// One attempt's failure, with whether it was a rejected token.
enum Attempt {
    Unauthorized(GraphError),
    Failed(GraphError),
}

#[derive(serde::Deserialize)]
struct GraphErrorBody {
    error: GraphErrorDetail,
}

#[derive(serde::Deserialize)]
struct GraphErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl GraphClient {
    /// Builds the HTTP client (rustls, no redirects) and the token provider.
    pub fn new(settings: Arc<GraphSettings>) -> Result<Self, GraphError> {
        let http = build_http(&settings)?;
        let auth = Arc::new(TokenProvider::new(http.clone(), settings.clone()));
        Ok(Self::with_parts(http, auth, settings))
    }

    /// A client sharing an existing HTTP client and token provider.
    pub fn with_parts(
        http: reqwest::Client,
        auth: Arc<TokenProvider>,
        settings: Arc<GraphSettings>,
    ) -> Self {
        let host = super::host_of(settings.base_url.as_str());
        Self {
            http,
            auth,
            settings,
            host,
        }
    }

    /// The tenant's settings.
    pub fn settings(&self) -> &GraphSettings {
        &self.settings
    }

    /// Checks that the token endpoint accepts our credentials (readiness).
    pub async fn check_auth(&self) -> Result<(), GraphError> {
        self.auth.token().await.map(|_| ())
    }

    /// The first request of a round: `{base}/{resource}/delta` with the
    /// stream's `$select` and `$filter` (Graph encodes them into every later
    /// link), or `$deltatoken=latest` to start from now.
    pub fn initial_url(&self, stream: &StreamConfig, latest: bool) -> String {
        let mut url = format!("{}/{}/delta", self.settings.base_url, stream.resource);
        let mut params = Vec::new();
        if !stream.select.is_empty() {
            let list: Vec<&str> = stream.select.iter().map(|s| s.trim()).collect();
            params.push(format!(
                "$select={}",
                utf8_percent_encode(&list.join(","), QUERY_VALUE)
            ));
        }
        if let Some(filter) = &stream.filter {
            params.push(format!(
                "$filter={}",
                utf8_percent_encode(filter, QUERY_VALUE)
            ));
        }
        if latest {
            params.push("$deltatoken=latest".to_string());
        }
        if !params.is_empty() {
            url.push('?');
            url.push_str(&params.join("&"));
        }
        url
    }

    /// Parses a link and refuses it unless its scheme, host and port are the
    /// configured Graph host's.
    pub fn check_link(&self, link: &str) -> Result<Url, GraphError> {
        let url = Url::parse(link).map_err(|_| GraphError::MalformedPage {
            host: self.host.clone(),
            reason: "a link is not an absolute URL".to_string(),
        })?;
        if url.origin() != self.settings.base_url.origin() {
            return Err(GraphError::ForeignHost {
                host: super::origin_of(&url),
                expected: super::origin_of(&self.settings.base_url),
            });
        }
        Ok(url)
    }

    /// Fetches one page, retrying what can be retried. Every page returned
    /// was completely received, parsed and checked (its link included).
    #[tracing::instrument(level = "debug", skip_all, fields(host = %self.host))]
    pub async fn fetch(&self, link: &str, options: FetchOptions) -> Result<Page, GraphError> {
        let url = self.check_link(link)?;
        let policy = Policy::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Some(self.settings.max_attempts),
        );
        retry::retry(
            policy,
            || self.fetch_with_fresh_token(&url, options),
            |e, wait| {
                metrics::counter!(crate::runtime::metrics::GRAPH_RETRIES, "kind" => e.kind())
                    .increment(1);
                if matches!(e, GraphError::Status { status: 429, .. }) {
                    metrics::counter!(crate::runtime::metrics::GRAPH_THROTTLED_SECONDS)
                        .increment(wait.as_secs());
                }
                tracing::warn!(error = %e, retry_in = ?wait, "Graph request failed; retrying.");
            },
        )
        .await
    }

    /// One attempt; a 401 gets one more try with a new token (Graph tokens
    /// can be revoked or expire early), which does not count as a retry.
    async fn fetch_with_fresh_token(
        &self,
        url: &Url,
        options: FetchOptions,
    ) -> Result<Page, GraphError> {
        let token = self.auth.token().await?;
        match self.fetch_once(url, options, token.secret()).await {
            Ok(page) => Ok(page),
            Err(Attempt::Failed(e)) => Err(e),
            Err(Attempt::Unauthorized(_)) => {
                tracing::info!(host = %self.host, "Graph rejected the access token; requesting a new one.");
                self.auth.invalidate(&token).await;
                let token = self.auth.token().await?;
                match self.fetch_once(url, options, token.secret()).await {
                    Ok(page) => Ok(page),
                    Err(Attempt::Failed(e) | Attempt::Unauthorized(e)) => Err(e),
                }
            }
        }
    }

    async fn fetch_once(
        &self,
        url: &Url,
        options: FetchOptions,
        token: &str,
    ) -> Result<Page, Attempt> {
        let mut request = self
            .http
            .get(url.clone())
            .bearer_auth(token)
            .header(reqwest::header::ACCEPT, "application/json")
            .header("client-request-id", uuid::Uuid::new_v4().to_string());
        let mut prefer = Vec::new();
        if options.return_minimal {
            prefer.push("return=minimal".to_string());
        }
        if let Some(n) = self.settings.page_size {
            prefer.push(format!("odata.maxpagesize={n}"));
        }
        if !prefer.is_empty() {
            request = request.header("Prefer", prefer.join(", "));
        }
        if self.settings.low_priority {
            request = request.header("x-ms-throttle-priority", "low");
        }
        let started = std::time::Instant::now();
        let response = request.send().await.map_err(|e| {
            Attempt::Failed(GraphError::Transport {
                host: self.host.clone(),
                message: describe_reqwest(e),
            })
        })?;
        let status = response.status().as_u16();
        metrics::counter!(crate::runtime::metrics::GRAPH_REQUESTS, "status" => status_class(status))
            .increment(1);
        let headers = response.headers().clone();
        let header = |name: reqwest::header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if status == 200 {
            let body = self.read_body(response).await.map_err(Attempt::Failed)?;
            metrics::histogram!(crate::runtime::metrics::GRAPH_PAGE_SECONDS)
                .record(started.elapsed().as_secs_f64());
            let parsed = if body.len() > 1 << 20 {
                tokio::task::block_in_place(|| page::parse_page(&body))
            } else {
                page::parse_page(&body)
            };
            let page = parsed.map_err(|reason| {
                Attempt::Failed(GraphError::MalformedPage {
                    host: self.host.clone(),
                    reason,
                })
            })?;
            // A page whose link leaves the Graph host is refused before it is
            // processed, so the foreign link is never committed.
            self.check_link(page.link.url()).map_err(Attempt::Failed)?;
            return Ok(page);
        }
        let retry_after = header(reqwest::header::RETRY_AFTER)
            .as_deref()
            .and_then(retry::parse_retry_after);
        if (300..400).contains(&status) {
            let target = header(reqwest::header::LOCATION)
                .map(|l| super::host_of(&l))
                .unwrap_or_else(|| "<none>".to_string());
            return Err(Attempt::Failed(GraphError::Redirect {
                host: self.host.clone(),
                status,
                target,
            }));
        }
        let body = response.bytes().await.unwrap_or_default();
        let (code, message) = match serde_json::from_slice::<GraphErrorBody>(&body) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => (
                String::new(),
                String::from_utf8_lossy(&body[..body.len().min(300)])
                    .trim()
                    .to_string(),
            ),
        };
        // 410 Gone: the sync state was reset (tenant maintenance, migration).
        if status == 410 {
            return Err(Attempt::Failed(GraphError::Resync {
                host: self.host.clone(),
                reason: format!(
                    "HTTP 410 Gone{}",
                    if code.is_empty() {
                        String::new()
                    } else {
                        format!(" {code}")
                    }
                ),
                location: header(reqwest::header::LOCATION),
            }));
        }
        // Expired or unknown delta token: HTTP 400 (sometimes another 4xx)
        // with one of the sync-state codes, in any letter case.
        if (400..500).contains(&status)
            && SYNC_STATE_ERROR_CODES
                .iter()
                .any(|c| c.eq_ignore_ascii_case(&code))
        {
            return Err(Attempt::Failed(GraphError::Resync {
                host: self.host.clone(),
                reason: format!("HTTP {status} {code}"),
                location: None,
            }));
        }
        let message = match status {
            403 => format!(
                "{message} (grant the app registration the Graph application permission this resource needs, e.g. User.Read.All or Directory.Read.All, with admin consent)"
            ),
            404 => format!("{message} (check the stream's resource name and graph.base_url)"),
            _ => message,
        };
        let error = GraphError::Status {
            host: self.host.clone(),
            status,
            code,
            message,
            retry_after,
        };
        if status == 401 {
            Err(Attempt::Unauthorized(error))
        } else {
            Err(Attempt::Failed(error))
        }
    }

    async fn read_body(&self, mut response: reqwest::Response) -> Result<Vec<u8>, GraphError> {
        let limit = self.settings.max_page_bytes;
        let too_large = || GraphError::PageTooLarge {
            host: self.host.clone(),
            limit,
        };
        if response.content_length().is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let capacity = response.content_length().unwrap_or(64 * 1024).min(limit) as usize;
        let mut body = Vec::with_capacity(capacity);
        while let Some(chunk) = response.chunk().await.map_err(|e| GraphError::Transport {
            host: self.host.clone(),
            message: format!("reading the page failed: {}", describe_reqwest(e)),
        })? {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        200 => "200",
        401 => "401",
        410 => "410",
        429 => "429",
        503 => "503",
        504 => "504",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// The HTTP client for one tenant: rustls, no redirects, request timeout,
/// optional extra CA.
pub fn build_http(settings: &GraphSettings) -> Result<reqwest::Client, GraphError> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(settings.request_timeout)
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("graphdelta/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(90));
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path).map_err(|e| GraphError::Transport {
            host: super::host_of(settings.base_url.as_str()),
            message: format!("cannot read graph.ca_file `{}`: {e}", path.display()),
        })?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| GraphError::Transport {
            host: super::host_of(settings.base_url.as_str()),
            message: format!(
                "graph.ca_file `{}` is not a PEM certificate: {e}",
                path.display()
            ),
        })?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| GraphError::Transport {
        host: super::host_of(settings.base_url.as_str()),
        message: format!("cannot build the HTTP client: {}", describe_reqwest(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn client(base: &str) -> GraphClient {
        let text = format!(
            r#"
[graph]
base_url = "{base}"
tenant_id = "t"
client_id = "c"
client_secret_env = "GD_TEST_CLIENT_SECRET"
[[streams]]
name = "s"
resource = "users"
select = ["displayName", "givenName"]
filter = "id eq '1'"
[sink]
type = "stdout"
"#
        );
        unsafe { std::env::set_var("GD_TEST_CLIENT_SECRET", "x") };
        let c = Config::parse(&text).unwrap();
        let r = c.resolve().unwrap();
        GraphClient::new(r[0].graph.clone()).unwrap()
    }

    #[test]
    fn initial_url_keeps_odata_punctuation() {
        let c = client("https://graph.microsoft.com/v1.0");
        let s: StreamConfig = toml::from_str(
            "name='s'\nresource='directoryObjects'\nselect=['microsoft.graph.user/surname','displayName']\nfilter=\"isof('microsoft.graph.user') or isof('microsoft.graph.group')\"",
        )
        .unwrap();
        assert_eq!(
            c.initial_url(&s, false),
            "https://graph.microsoft.com/v1.0/directoryObjects/delta?$select=microsoft.graph.user/surname,displayName&$filter=isof('microsoft.graph.user')%20or%20isof('microsoft.graph.group')"
        );
        let plain: StreamConfig = toml::from_str("name='s'\nresource='users'").unwrap();
        assert_eq!(
            c.initial_url(&plain, true),
            "https://graph.microsoft.com/v1.0/users/delta?$deltatoken=latest"
        );
    }

    #[test]
    fn links_must_stay_on_the_graph_host() {
        let c = client("https://graph.microsoft.com/v1.0");
        assert!(
            c.check_link("https://graph.microsoft.com/v1.0/users/delta?$skiptoken=x")
                .is_ok()
        );
        let err = c
            .check_link("https://evil.example/v1.0/users/delta?$skiptoken=secret")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("evil.example") && text.contains("graph.microsoft.com"),
            "{text}"
        );
        assert!(
            !text.contains("secret"),
            "the state token must not be logged: {text}"
        );
        assert!(
            c.check_link("http://graph.microsoft.com/v1.0/users/delta")
                .is_err(),
            "scheme"
        );
        assert!(
            c.check_link("https://graph.microsoft.com:8443/v1.0/users/delta")
                .is_err(),
            "port"
        );
    }
}
