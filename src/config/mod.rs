//! The connector definition: one TOML file (see `connectors/`) that names the
//! Graph tenant(s), the streams to read, the sink and the checkpoint store.
//!
//! Everything is checked before anything runs: unknown keys are errors (every
//! struct has `deny_unknown_fields`), and [`Config::validate`] checks the rules
//! that span fields (unique stream names, known resources, https only off
//! loopback, secrets that resolve). Errors name the key and the fix.
//!
//! Secrets never live in the file: `client_secret_env` names an environment
//! variable and `client_secret_file` a file; the value is held in a
//! [`secrecy::SecretString`] whose `Debug` prints `[REDACTED]`.

pub mod duration;
mod secret;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

pub use self::secret::{SecretSource, load_secret};
use crate::sink::SinkConfig;

/// A configuration problem, worded for the person who edits the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file `{path}`: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// The whole connector definition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Graph tenant and app registration used by every stream that does
    /// not name a `tenant`.
    #[serde(default)]
    pub graph: Option<GraphConfig>,
    /// More tenants in one process: each entry is a `[graph]` table plus a
    /// unique `name`; a stream selects one with `tenant = "<name>"`.
    #[serde(default)]
    pub tenants: Vec<GraphConfig>,
    /// The delta streams to read: one per tenant × resource (× filter).
    pub streams: Vec<StreamConfig>,
    /// Where events go.
    pub sink: SinkConfig,
    /// Where checkpoints and the remembered object state live.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Pipelining and retry settings shared by all streams.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Optional HTTP endpoint for metrics, health and status.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    /// Several instances sharing the streams through a Kafka consumer group
    /// (see [`crate::cluster`]).
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// Which Microsoft cloud the tenant lives in: decides the login and Graph
/// hosts. Tokens do not cross clouds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    /// login.microsoftonline.com, graph.microsoft.com
    #[default]
    Global,
    /// US Government L4: login.microsoftonline.us, graph.microsoft.us
    Usgov,
    /// US Government L5 (DoD): login.microsoftonline.us, dod-graph.microsoft.us
    UsgovDod,
    /// China operated by 21Vianet: login.chinacloudapi.cn, microsoftgraph.chinacloudapi.cn
    China,
}

impl Cloud {
    /// The login (token) origin of the cloud.
    pub const fn login_origin(self) -> &'static str {
        match self {
            Cloud::Global => "https://login.microsoftonline.com",
            Cloud::Usgov | Cloud::UsgovDod => "https://login.microsoftonline.us",
            Cloud::China => "https://login.chinacloudapi.cn",
        }
    }

    /// The Graph origin of the cloud.
    pub const fn graph_origin(self) -> &'static str {
        match self {
            Cloud::Global => "https://graph.microsoft.com",
            Cloud::Usgov => "https://graph.microsoft.us",
            Cloud::UsgovDod => "https://dod-graph.microsoft.us",
            Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
        }
    }
}

/// A Graph tenant and the app registration that reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Only inside `[[tenants]]`: the name streams refer to.
    #[serde(default)]
    pub name: Option<String>,
    /// global | usgov | usgov-dod | china.
    #[serde(default)]
    pub cloud: Cloud,
    /// Graph API root including the version, e.g.
    /// `https://graph.microsoft.com/v1.0`. Defaults to the cloud's host.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Token endpoint; `{tenant}` is replaced by `tenant_id`. Defaults to the
    /// cloud's login host.
    #[serde(default)]
    pub token_url: Option<String>,
    /// OAuth2 scope; defaults to `{graph origin}/.default`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Directory (tenant) id or a verified domain.
    pub tenant_id: String,
    /// Application (client) id of the app registration.
    pub client_id: String,
    /// Name of the environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// File holding the client secret (trailing newline ignored).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Refused with a pointer to `client_secret_env` / `client_secret_file`:
    /// secrets do not belong in the connector file.
    #[serde(default)]
    pub client_secret: Option<toml::Value>,
    /// Ask Graph for at most this many objects per page
    /// (`Prefer: odata.maxpagesize`); Graph may return fewer.
    #[serde(default)]
    pub page_size: Option<u32>,
    /// Send `x-ms-throttle-priority: low` so Graph sheds this background
    /// traffic before interactive traffic of the same app.
    #[serde(default)]
    pub low_priority: bool,
    /// Timeout of one HTTP request to Graph or the token endpoint.
    #[serde(default = "default_request_timeout", with = "crate::config::duration")]
    pub request_timeout: Duration,
    /// Attempts per page before a failing request (5xx, 429, malformed
    /// body) stops the round.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Largest page body accepted, in bytes.
    #[serde(default = "default_max_page_bytes")]
    pub max_page_bytes: u64,
    /// Extra PEM CA certificate to trust (a TLS-intercepting proxy, a test CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

const fn default_request_timeout() -> Duration {
    Duration::from_secs(100)
}
const fn default_max_attempts() -> u32 {
    8
}
const fn default_max_page_bytes() -> u64 {
    256 * 1024 * 1024
}

/// Where a stream begins when it has no checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// Enumerate every object once (CREATED snapshot events), then follow changes.
    #[default]
    Full,
    /// `$deltatoken=latest`: only changes from now on.
    Latest,
}

/// Graph resources that support delta queries and that graphdelta knows the
/// object type of.
pub const RESOURCES: &[(&str, &str)] = &[
    ("users", "microsoft.graph.user"),
    ("groups", "microsoft.graph.group"),
    ("directoryObjects", "microsoft.graph.directoryObject"),
    ("applications", "microsoft.graph.application"),
    ("servicePrincipals", "microsoft.graph.servicePrincipal"),
    ("devices", "microsoft.graph.device"),
    ("orgContacts", "microsoft.graph.orgContact"),
    ("administrativeUnits", "microsoft.graph.administrativeUnit"),
    ("directoryRoles", "microsoft.graph.directoryRole"),
    (
        "oauth2PermissionGrants",
        "microsoft.graph.oAuth2PermissionGrant",
    ),
];

/// The object type of a resource's objects, used when Graph sends no
/// `@odata.type` (e.g. `/users/delta`).
pub fn resource_object_type(resource: &str) -> Option<&'static str> {
    RESOURCES
        .iter()
        .find(|(r, _)| *r == resource)
        .map(|(_, t)| *t)
}

/// One delta stream: a tenant × resource, with its query options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Unique name: used in topics, metrics and checkpoints.
    pub name: String,
    /// The Graph resource, e.g. `users`, `groups`, `directoryObjects`.
    pub resource: String,
    /// Name of a `[[tenants]]` entry; default: the `[graph]` table.
    #[serde(default)]
    pub tenant: Option<String>,
    /// `$select`: only these properties are returned and tracked.
    #[serde(default)]
    pub select: Vec<String>,
    /// `$filter`, passed verbatim (e.g. `isof('microsoft.graph.user')`).
    #[serde(default)]
    pub filter: Option<String>,
    /// Send `Prefer: return=minimal` on deltaLink rounds: only changed
    /// properties come back.
    #[serde(default)]
    pub return_minimal: bool,
    /// `full` (initial enumeration) or `latest` (changes from now on).
    #[serde(default)]
    pub start: StartFrom,
    /// Time between the starts of two rounds; a round that overruns is
    /// followed immediately by the next, never overlapped.
    #[serde(default = "default_poll_interval", with = "crate::config::duration")]
    pub poll_interval: Duration,
}

const fn default_poll_interval() -> Duration {
    Duration::from_secs(60)
}

impl StreamConfig {
    /// Whether the stream tracks `members@delta`: groups (directly or via
    /// directoryObjects) with no `$select` or one naming `members`.
    pub fn tracks_members(&self) -> bool {
        matches!(self.resource.as_str(), "groups" | "directoryObjects")
            && (self.select.is_empty()
                || self
                    .select
                    .iter()
                    .any(|s| s == "members" || s.ends_with("/members")))
    }
}

/// The embedded checkpoint store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory of the store (per stream: a SQLite file and an outbox
    /// directory).
    #[serde(default = "default_checkpoint_path")]
    pub path: PathBuf,
}

fn default_checkpoint_path() -> PathBuf {
    PathBuf::from("state")
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            path: default_checkpoint_path(),
        }
    }
}

/// Pipelining and retry settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Pages fetched ahead of the one being published (per stream).
    #[serde(default = "default_prefetch_pages")]
    pub prefetch_pages: usize,
    /// Batches published but not yet acknowledged (per stream). Checkpoints
    /// are still committed strictly in order.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_batches: usize,
    /// ... and at most this many bytes of Graph pages and the outbox records
    /// made from them (events and memory changes; per stream; one batch is
    /// always allowed): memory stays bounded whatever the page size.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// Acknowledged batches are committed together at least this often (and
    /// at the end of every round). Longer: fewer checkpoint writes; a crash
    /// re-reads (and re-publishes, with the same event ids) at most this
    /// much. `0s` commits every batch on its own.
    #[serde(
        default = "default_checkpoint_interval",
        with = "crate::config::duration"
    )]
    pub checkpoint_interval: Duration,
    /// First delay after a failed round or publish; doubles up to `retry_max`.
    #[serde(default = "default_retry_min", with = "crate::config::duration")]
    pub retry_min: Duration,
    /// Longest delay between two attempts.
    #[serde(default = "default_retry_max", with = "crate::config::duration")]
    pub retry_max: Duration,
    /// On SIGTERM, how long in-flight batches may take to be acknowledged and
    /// committed before the process exits anyway (nothing is lost either way).
    #[serde(default = "default_drain_timeout", with = "crate::config::duration")]
    pub drain_timeout: Duration,
}

const fn default_prefetch_pages() -> usize {
    2
}
const fn default_max_in_flight() -> usize {
    16
}
const fn default_max_in_flight_bytes() -> usize {
    4 << 20
}
const fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(1)
}
const fn default_retry_min() -> Duration {
    Duration::from_millis(500)
}
const fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}
const fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            prefetch_pages: default_prefetch_pages(),
            max_in_flight_batches: default_max_in_flight(),
            max_in_flight_bytes: default_max_in_flight_bytes(),
            checkpoint_interval: default_checkpoint_interval(),
            retry_min: default_retry_min(),
            retry_max: default_retry_max(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

/// The operator endpoint (`/metrics`, `/health/*`, `/status`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on; loopback unless you mean otherwise.
    #[serde(default = "default_http_listen")]
    pub listen: String,
    /// How often readiness probes Graph's token endpoint and the sink.
    #[serde(default = "default_probe_interval", with = "crate::config::duration")]
    pub probe_interval: Duration,
}

const fn default_probe_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_http_listen() -> String {
    "127.0.0.1:9464".to_string()
}

/// A tenant's settings with defaults applied and the secret loaded.
#[derive(Debug, Clone)]
pub struct GraphSettings {
    /// `[graph]` or the `[[tenants]]` name.
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Graph API root, e.g. `https://graph.microsoft.com/v1.0` (no trailing `/`).
    pub base_url: Url,
    pub token_url: Url,
    pub scope: String,
    pub page_size: Option<u32>,
    pub low_priority: bool,
    pub request_timeout: Duration,
    pub max_attempts: u32,
    pub max_page_bytes: u64,
    pub ca_file: Option<PathBuf>,
}

/// A stream with its tenant resolved.
#[derive(Debug, Clone)]
pub struct ResolvedStream {
    pub stream: StreamConfig,
    pub graph: Arc<GraphSettings>,
}

impl ResolvedStream {
    /// The object type for objects that carry no `@odata.type`.
    pub fn default_object_type(&self) -> &'static str {
        resource_object_type(&self.stream.resource).unwrap_or("microsoft.graph.directoryObject")
    }

    /// A fingerprint of everything Graph encodes into the stream's links: if
    /// it changes, stored links no longer describe this stream.
    pub fn fingerprint(&self) -> String {
        let material = format!(
            "v1\n{}\n{}\n{}\n{}\n{}",
            self.graph.base_url,
            self.graph.tenant_id,
            self.stream.resource,
            self.stream.select.join(","),
            self.stream.filter.as_deref().unwrap_or("")
        );
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(material.as_bytes()))
    }
}

impl Config {
    /// Reads, parses and validates a connector file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        // Relative paths in the file are relative to the file, so a
        // connector definition works from any working directory.
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(config.rebase_paths(base))
    }

    /// Parses TOML text and validates it (relative paths stay relative).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn rebase_paths(mut self, base: &Path) -> Config {
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut self.checkpoint.path);
        for g in self.graph.iter_mut().chain(self.tenants.iter_mut()) {
            if let Some(p) = g.client_secret_file.as_mut() {
                rebase(p);
            }
            if let Some(p) = g.ca_file.as_mut() {
                rebase(p);
            }
        }
        self.sink.rebase_paths(base);
        self
    }

    /// Cross-field rules. Secrets are not read here (see [`Config::resolve`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.streams.is_empty() {
            return Err(invalid(
                "no streams: add at least one [[streams]] table with `name` and `resource`",
            ));
        }
        let mut tenant_names = HashSet::new();
        if let Some(g) = &self.graph {
            if g.name.is_some() {
                return Err(invalid(
                    "graph.name: only [[tenants]] entries have a name; remove it from [graph]",
                ));
            }
            validate_graph(g, "graph")?;
        }
        for (i, t) in self.tenants.iter().enumerate() {
            let Some(name) = &t.name else {
                return Err(invalid(format!(
                    "tenants[{i}].name is missing: every [[tenants]] entry needs a unique name that streams refer to with `tenant = \"...\"`"
                )));
            };
            if !tenant_names.insert(name.clone()) {
                return Err(invalid(format!(
                    "tenants: the name `{name}` is used twice; tenant names must be unique"
                )));
            }
            validate_graph(t, &format!("tenants `{name}`"))?;
        }
        let mut names = HashSet::new();
        for s in &self.streams {
            validate_name(&s.name)
                .map_err(|why| invalid(format!("stream name `{}` {why}", s.name)))?;
            if !names.insert(s.name.as_str()) {
                return Err(invalid(format!(
                    "stream `{}` is defined twice: stream names must be unique (they key checkpoints and topics)",
                    s.name
                )));
            }
            if resource_object_type(&s.resource).is_none() {
                let known: Vec<&str> = RESOURCES.iter().map(|(r, _)| *r).collect();
                return Err(invalid(format!(
                    "stream `{}`: unknown resource `{}`; use one of {} (names are case-sensitive)",
                    s.name,
                    s.resource,
                    known.join(", ")
                )));
            }
            match &s.tenant {
                Some(t) if !tenant_names.contains(t) => {
                    return Err(invalid(format!(
                        "stream `{}`: tenant `{t}` is not defined; add a [[tenants]] entry with name = \"{t}\"",
                        s.name
                    )));
                }
                None if self.graph.is_none() => {
                    return Err(invalid(format!(
                        "stream `{}` has no tenant: add a [graph] table, or set `tenant` to a [[tenants]] name",
                        s.name
                    )));
                }
                _ => {}
            }
            if s.poll_interval.is_zero() {
                return Err(invalid(format!(
                    "stream `{}`: poll_interval must be more than zero, e.g. \"60s\"",
                    s.name
                )));
            }
            if s.select
                .iter()
                .any(|p| p.trim().is_empty() || p.contains(','))
            {
                return Err(invalid(format!(
                    "stream `{}`: select is a list of property names, one per string (e.g. [\"displayName\", \"mail\"])",
                    s.name
                )));
            }
        }
        if self.runtime.max_in_flight_batches == 0
            || self.runtime.max_in_flight_bytes == 0
            || self.runtime.prefetch_pages == 0
        {
            return Err(invalid(
                "runtime.max_in_flight_batches, runtime.max_in_flight_bytes and runtime.prefetch_pages must be at least 1",
            ));
        }
        self.sink.validate()?;
        if let Some(c) = &self.cluster {
            c.validate(matches!(self.sink, SinkConfig::Kafka(_)))?;
        }
        Ok(())
    }

    /// Resolves every stream's tenant, loading secrets from env vars or files.
    pub fn resolve(&self) -> Result<Vec<ResolvedStream>, ConfigError> {
        let mut settings = std::collections::HashMap::new();
        if let Some(g) = &self.graph {
            settings.insert(None, Arc::new(resolve_graph(g, "graph")?));
        }
        for t in &self.tenants {
            let name = t.name.clone().unwrap_or_default();
            let label = format!("tenants `{name}`");
            settings.insert(Some(name), Arc::new(resolve_graph(t, &label)?));
        }
        self.streams
            .iter()
            .map(|s| {
                let graph = settings
                    .get(&s.tenant)
                    .cloned()
                    .ok_or_else(|| invalid(format!("stream `{}`: no tenant", s.name)))?;
                Ok(ResolvedStream {
                    stream: s.clone(),
                    graph,
                })
            })
            .collect()
    }
}

/// Stream names become file names, topic names and metric labels.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 100 {
        Err("must be 1 to 100 characters long")
    } else if !ok_chars || name.starts_with('.') || name.starts_with('-') {
        Err(
            "may only contain letters, digits, `.`, `_` and `-`, and must start with a letter or digit",
        )
    } else {
        Ok(())
    }
}

fn validate_graph(g: &GraphConfig, label: &str) -> Result<(), ConfigError> {
    if g.client_secret.is_some() {
        return Err(invalid(format!(
            "{label}.client_secret: secrets are not read from the connector file; put the secret in an environment variable named by `client_secret_env`, or in a file named by `client_secret_file`"
        )));
    }
    match (&g.client_secret_env, &g.client_secret_file) {
        (None, None) => {
            return Err(invalid(format!(
                "{label}: no client secret configured; set `client_secret_env = \"GRAPH_CLIENT_SECRET\"` (an environment variable) or `client_secret_file = \"/run/secrets/graph\"`"
            )));
        }
        (Some(_), Some(_)) => {
            return Err(invalid(format!(
                "{label}: set only one of `client_secret_env` and `client_secret_file`"
            )));
        }
        _ => {}
    }
    if g.tenant_id.trim().is_empty() {
        return Err(invalid(format!(
            "{label}.tenant_id is empty: use the directory id or a verified domain"
        )));
    }
    if g.client_id.trim().is_empty() {
        return Err(invalid(format!(
            "{label}.client_id is empty: use the app registration's application (client) id"
        )));
    }
    let base = graph_base_url(g, label)?;
    token_url(g, label)?;
    if g.page_size == Some(0) {
        return Err(invalid(format!("{label}.page_size must be at least 1")));
    }
    if g.max_attempts == 0 {
        return Err(invalid(format!("{label}.max_attempts must be at least 1")));
    }
    let _ = base;
    Ok(())
}

/// True for `localhost` and loopback IP literals.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn parse_http_url(raw: &str, key: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw).map_err(|e| {
        invalid(format!(
            "{key} `{raw}` is not a valid URL ({e}); write it like `https://graph.microsoft.com/v1.0`"
        ))
    })?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(invalid(format!(
            "{key} `{raw}` uses plain http: only https is allowed, except for loopback hosts such as the built-in simulator"
        ))),
        other => Err(invalid(format!(
            "{key} `{raw}` has scheme `{other}`; use https"
        ))),
    }
}

fn graph_base_url(g: &GraphConfig, label: &str) -> Result<Url, ConfigError> {
    let raw = g
        .base_url
        .clone()
        .unwrap_or_else(|| format!("{}/v1.0", g.cloud.graph_origin()));
    let mut url = parse_http_url(&raw, &format!("{label}.base_url"))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(format!(
            "{label}.base_url `{raw}` must not have a query or fragment"
        )));
    }
    let trimmed = url.path().trim_end_matches('/').to_string();
    url.set_path(&trimmed);
    Ok(url)
}

fn token_url(g: &GraphConfig, label: &str) -> Result<Url, ConfigError> {
    let template = g
        .token_url
        .clone()
        .unwrap_or_else(|| format!("{}/{{tenant}}/oauth2/v2.0/token", g.cloud.login_origin()));
    let raw = template.replace("{tenant}", g.tenant_id.trim());
    parse_http_url(&raw, &format!("{label}.token_url"))
}

fn resolve_graph(g: &GraphConfig, label: &str) -> Result<GraphSettings, ConfigError> {
    let base_url = graph_base_url(g, label)?;
    let token_url = token_url(g, label)?;
    let source = match (&g.client_secret_env, &g.client_secret_file) {
        (Some(var), _) => SecretSource::Env(var.clone()),
        (None, Some(path)) => SecretSource::File(path.clone()),
        (None, None) => unreachable!("validate() requires a secret source"),
    };
    let client_secret = load_secret(&source).map_err(|why| invalid(format!("{label}: {why}")))?;
    let scope = g.scope.clone().unwrap_or_else(|| {
        if g.base_url.is_some() {
            format!("{}/.default", base_url.origin().ascii_serialization())
        } else {
            format!("{}/.default", g.cloud.graph_origin())
        }
    });
    Ok(GraphSettings {
        name: g.name.clone().unwrap_or_else(|| "graph".to_string()),
        tenant_id: g.tenant_id.trim().to_string(),
        client_id: g.client_id.trim().to_string(),
        client_secret,
        base_url,
        token_url,
        scope,
        page_size: g.page_size,
        low_priority: g.low_priority,
        request_timeout: g.request_timeout,
        max_attempts: g.max_attempts,
        max_page_bytes: g.max_page_bytes,
        ca_file: g.ca_file.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[graph]
tenant_id = "contoso.onmicrosoft.com"
client_id = "app"
client_secret_env = "GD_TEST_SECRET_MINIMAL"

[[streams]]
name = "users"
resource = "users"

[sink]
type = "stdout"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        let s = &c.streams[0];
        assert_eq!(s.poll_interval, Duration::from_secs(60));
        assert_eq!(s.start, StartFrom::Full);
        assert!(!s.return_minimal);
        assert_eq!(c.checkpoint.path, PathBuf::from("state"));
        // SAFETY: tests in this module use distinct variable names.
        unsafe { std::env::set_var("GD_TEST_SECRET_MINIMAL", "s3cret") };
        let r = c.resolve().unwrap();
        assert_eq!(
            r[0].graph.base_url.as_str(),
            "https://graph.microsoft.com/v1.0"
        );
        assert_eq!(
            r[0].graph.token_url.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(r[0].graph.scope, "https://graph.microsoft.com/.default");
        assert!(!format!("{:?}", r[0].graph).contains("s3cret"));
    }

    #[test]
    fn national_clouds_pick_their_hosts() {
        let text = MINIMAL.replace("[graph]", "[graph]\ncloud = \"usgov-dod\"");
        let c = Config::parse(&text).unwrap();
        unsafe { std::env::set_var("GD_TEST_SECRET_MINIMAL", "s3cret") };
        let r = c.resolve().unwrap();
        assert_eq!(
            r[0].graph.base_url.as_str(),
            "https://dod-graph.microsoft.us/v1.0"
        );
        assert!(
            r[0].graph
                .token_url
                .as_str()
                .starts_with("https://login.microsoftonline.us/")
        );
        assert_eq!(r[0].graph.scope, "https://dod-graph.microsoft.us/.default");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace(
            "resource = \"users\"",
            "resource = \"users\"\npol_interval = \"5s\"",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("pol_interval"), "{err}");
        assert!(
            err.contains("poll_interval"),
            "should list the expected keys: {err}"
        );
    }

    #[test]
    fn bad_duration_is_named() {
        let text = MINIMAL.replace(
            "resource = \"users\"",
            "resource = \"users\"\npoll_interval = \"5 parsecs\"",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("poll_interval"), "{err}");
    }

    #[test]
    fn unknown_resource_lists_the_known_ones() {
        let text = MINIMAL.replace("resource = \"users\"", "resource = \"usres\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("`usres`") && err.contains("directoryObjects"),
            "{err}"
        );
    }

    #[test]
    fn inline_secret_is_refused_with_the_fix() {
        let text = MINIMAL.replace(
            "client_secret_env = \"GD_TEST_SECRET_MINIMAL\"",
            "client_secret = \"oops\"",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("client_secret_env") && !err.contains("oops"),
            "{err}"
        );
    }

    #[test]
    fn missing_secret_env_is_named() {
        let text = MINIMAL.replace("GD_TEST_SECRET_MINIMAL", "GD_TEST_SECRET_NEVER_SET");
        let c = Config::parse(&text).unwrap();
        let err = c.resolve().unwrap_err().to_string();
        assert!(err.contains("GD_TEST_SECRET_NEVER_SET"), "{err}");
    }

    #[test]
    fn plain_http_only_on_loopback() {
        let text = MINIMAL.replace(
            "[graph]",
            "[graph]\nbase_url = \"http://graph.example.com/v1.0\"",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("https"), "{err}");
        let text = MINIMAL.replace(
            "[graph]",
            "[graph]\nbase_url = \"http://127.0.0.1:8080/v1.0/\"",
        );
        let c = Config::parse(&text).unwrap();
        unsafe { std::env::set_var("GD_TEST_SECRET_MINIMAL", "s3cret") };
        let r = c.resolve().unwrap();
        assert_eq!(r[0].graph.base_url.as_str(), "http://127.0.0.1:8080/v1.0");
        assert_eq!(r[0].graph.scope, "http://127.0.0.1:8080/.default");
    }

    #[test]
    fn duplicate_stream_names_are_refused() {
        let text = format!("{MINIMAL}\n[[streams]]\nname = \"users\"\nresource = \"groups\"\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("defined twice"), "{err}");
    }

    #[test]
    fn tenants_are_resolved_per_stream() {
        let text = r#"
[[tenants]]
name = "fabrikam"
cloud = "china"
tenant_id = "fabrikam.partner.onmschina.cn"
client_id = "app2"
client_secret_env = "GD_TEST_SECRET_TENANTS"

[[streams]]
name = "fab-users"
resource = "users"
tenant = "fabrikam"

[sink]
type = "stdout"
"#;
        let c = Config::parse(text).unwrap();
        unsafe { std::env::set_var("GD_TEST_SECRET_TENANTS", "x") };
        let r = c.resolve().unwrap();
        assert_eq!(r[0].graph.name, "fabrikam");
        assert_eq!(
            r[0].graph.base_url.as_str(),
            "https://microsoftgraph.chinacloudapi.cn/v1.0"
        );
        let bad = text.replace("tenant = \"fabrikam\"", "tenant = \"nope\"");
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("`nope`"), "{err}");
    }

    #[test]
    fn tracks_members_only_for_groups_with_members_selected() {
        let mut s: StreamConfig = toml::from_str("name='g'\nresource='groups'").unwrap();
        assert!(s.tracks_members());
        s.select = vec!["displayName".into()];
        assert!(!s.tracks_members());
        s.select.push("members".into());
        assert!(s.tracks_members());
        s.resource = "users".into();
        assert!(!s.tracks_members());
    }
}
