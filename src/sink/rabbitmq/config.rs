//! `[sink] type = "rabbitmq"`: what the operator writes, checked before
//! anything connects.
//!
//! The broker URL carries a password, so it is wrapped in [`AmqpUrl`], whose
//! `Debug` and `Display` print `[redacted]` in its place; `url_env` and
//! `url_file` keep it out of the connector file altogether.

use std::{collections::HashSet, fmt, path::PathBuf, time::Duration};

use lapin::uri::{AMQPScheme, AMQPUri};
use serde::Deserialize;

use crate::config::ConfigError;

/// `[sink] type = "rabbitmq"`.
///
/// ```toml
/// [sink]
/// type = "rabbitmq"
/// url_env = "AMQP_URL"                    # amqp://user:password@host:5672/%2f
/// exchange = "graphdelta"                 # durable topic exchange, declared if missing
/// routing_key = "{tenant}.{stream}.{change}"
///
/// [[sink.declare_queues]]
/// name = "directory-changes"
/// type = "stream"                         # replayable: consume with x-stream-offset = "first"
/// binding_keys = ["#"]
/// max_age = "30days"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqSinkConfig {
    /// The broker's URL: `amqp://user:password@host:5672/vhost`, or
    /// `amqps://` for TLS (port 5671). The default vhost `/` is written
    /// `%2f`. Query parameters `heartbeat` (seconds), `frame_max`,
    /// `channel_max` and `auth_mechanism` (`plain`, or `external` for
    /// client certificates) are honoured. The password never appears in logs
    /// or errors; prefer `url_env` or `url_file` so it is not in this file.
    #[serde(default)]
    pub url: Option<AmqpUrl>,
    /// Name of an environment variable holding the URL (instead of `url`).
    #[serde(default)]
    pub url_env: Option<String>,
    /// A file holding the URL, e.g. a Docker or Kubernetes secret (instead of
    /// `url`); a trailing newline is ignored.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// The exchange every event is published to.
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Declare the exchange as a durable `topic` exchange if it does not
    /// exist. With `false` it must exist already (of any type); the startup
    /// check says so if it does not.
    #[serde(default = "default_true")]
    pub declare_exchange: bool,
    /// The routing key of each event. Placeholders: `{tenant}` (the tenant
    /// id), `{stream}` (the stream name), `{resource}` (e.g. `users`),
    /// `{type}` (the object type without namespace, e.g. `user`) and
    /// `{change}` (`created`, `updated`, `soft_deleted`, `hard_deleted`,
    /// `restored`). A `.` inside a value becomes `_`, so each placeholder
    /// stays one word of a topic pattern: tenant `contoso.onmicrosoft.com`,
    /// stream `users` and an update give `contoso_onmicrosoft_com.users.updated`.
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    /// Queues to declare and bind to the exchange at startup and after every
    /// reconnect. Declaring a queue that exists with other arguments fails
    /// with a message naming the queue. Leave empty when consumers declare
    /// their own queues: until one is bound, every publish is returned
    /// unroutable and nothing is committed.
    #[serde(default)]
    pub declare_queues: Vec<QueueConfig>,
    /// How long a batch (or the group of queued batches sent with it) may
    /// take from its first message being sent to its last publisher
    /// confirm. Batches not fully confirmed in time are published again on
    /// a new connection (nothing is committed meanwhile).
    #[serde(default = "default_confirm_timeout", with = "crate::config::duration")]
    pub confirm_timeout: Duration,
    /// Timeout of the TCP connect, TLS and AMQP handshake.
    #[serde(default = "default_connect_timeout", with = "crate::config::duration")]
    pub connect_timeout: Duration,
    /// The connection's name as shown by `rabbitmqctl list_connections
    /// client_properties` and the management UI.
    #[serde(default = "default_connection_name")]
    pub connection_name: String,
    /// A PEM file of CA certificates to trust for `amqps://`, for a broker
    /// whose certificate is signed by a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_exchange() -> String {
    "graphdelta".to_string()
}
const fn default_true() -> bool {
    true
}
fn default_routing_key() -> String {
    "{tenant}.{stream}.{change}".to_string()
}
const fn default_confirm_timeout() -> Duration {
    Duration::from_secs(30)
}
const fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connection_name() -> String {
    "graphdelta".to_string()
}

/// One queue the sink declares and binds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// The queue's name.
    pub name: String,
    /// Topic patterns binding the queue to the exchange: `*` matches one
    /// word, `#` zero or more (`*.*.hard_deleted`, `contoso_onmicrosoft_com.#`).
    /// Default: `["#"]`, every event.
    #[serde(default = "default_binding_keys")]
    pub binding_keys: Vec<String>,
    /// `quorum` (replicated, the default), `stream` (an append-only log that
    /// consumers can replay from any offset) or `classic`. Always durable.
    #[serde(default, rename = "type")]
    pub queue_type: QueueType,
    /// Stream queues only: segments older than this are deleted
    /// (`x-max-age`), e.g. `"30days"`.
    #[serde(default, with = "crate::config::duration::option")]
    pub max_age: Option<Duration>,
    /// Stream queues only: the stream keeps at most this many bytes, oldest
    /// segments deleted first (`x-max-length-bytes`).
    #[serde(default)]
    pub max_length_bytes: Option<u64>,
    /// Stream queues only: size of one segment file
    /// (`x-stream-max-segment-size-bytes`); retention deletes whole segments.
    #[serde(default)]
    pub max_segment_size_bytes: Option<u64>,
}

fn default_binding_keys() -> Vec<String> {
    vec!["#".to_string()]
}

/// The `x-queue-type` of a declared queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Raft-replicated, durable, at-least-once; the recommended default.
    #[default]
    Quorum,
    /// An append-only log: messages stay after they are read, so events can
    /// be replayed (`x-stream-offset`), like a compacted Kafka topic.
    Stream,
    /// A single-node classic queue (durable).
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
            QueueType::Classic => "classic",
        }
    }
}

/// An AMQP URL that may hold a password: `Debug` and `Display` show it
/// as `[redacted]`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Parses the URL; the error never repeats it.
    pub fn parse(&self) -> Result<AMQPUri, String> {
        parse_amqp_url(&self.0)
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({:?})", redact_url(&self.0))
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// The URL with the password replaced by `[redacted]`; a URL that does not
/// parse is not shown at all (its password could be anywhere in it).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) if parsed.has_host() => {
            let user = parsed.username();
            let userinfo = match (user.is_empty(), parsed.password().is_some()) {
                (_, true) => format!("{user}:[redacted]@"),
                (false, false) => format!("{user}@"),
                (true, false) => String::new(),
            };
            let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
            let query = parsed.query().map(|q| format!("?{q}")).unwrap_or_default();
            format!(
                "{}://{userinfo}{}{port}{}{query}",
                parsed.scheme(),
                parsed.host_str().unwrap_or_default(),
                parsed.path()
            )
        }
        _ => "[unparseable URL, not shown]".to_string(),
    }
}

/// Parses an AMQP URL into lapin's form. Errors describe the problem
/// without echoing the URL (it may hold a password).
pub fn parse_amqp_url(url: &str) -> Result<AMQPUri, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a valid URL ({e})"))?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return Err(format!(
            "scheme `{}` is not supported; use amqp:// or amqps://",
            parsed.scheme()
        ));
    }
    if !parsed.has_host() || parsed.host_str().is_some_and(str::is_empty) {
        return Err("no host; write amqp://user:password@host:5672/%2f".to_string());
    }
    url.parse::<AMQPUri>().map_err(|e| {
        // amq-protocol-uri's messages may quote the whole URL.
        if e.contains(url) || e.contains("://") {
            "the URL's query string or vhost is invalid".to_string()
        } else {
            format!("invalid AMQP URL: {e}")
        }
    })
}

/// Placeholders of the routing key template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Tenant,
    Stream,
    Resource,
    Type,
    Change,
}

impl Field {
    const ALL: [(&'static str, Field); 5] = [
        ("tenant", Field::Tenant),
        ("stream", Field::Stream),
        ("resource", Field::Resource),
        ("type", Field::Type),
        ("change", Field::Change),
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Part {
    Literal(String),
    Field(Field),
}

/// A parsed `routing_key` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoutingKeyTemplate {
    pub(crate) parts: Vec<Part>,
}

impl RoutingKeyTemplate {
    pub(crate) fn parse(template: &str) -> Result<Self, String> {
        let known = || {
            Field::ALL
                .iter()
                .map(|(n, _)| format!("{{{n}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Literal(rest.to_string()));
                    break;
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!(
                        "a `}}` without its `{{`; placeholders are {}",
                        known()
                    ));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Literal(rest[..i].to_string()));
                    }
                    let after = &rest[i + 1..];
                    let Some(end) = after.find('}') else {
                        return Err(format!(
                            "a `{{` without its `}}`; placeholders are {}",
                            known()
                        ));
                    };
                    let name = &after[..end];
                    let field = Field::ALL
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, f)| *f)
                        .ok_or_else(|| {
                            format!("unknown placeholder `{{{name}}}`; use {}", known())
                        })?;
                    parts.push(Part::Field(field));
                    rest = &after[end + 1..];
                }
            }
        }
        if parts.is_empty() {
            return Err(format!(
                "it is empty; use e.g. \"{}\"",
                default_routing_key()
            ));
        }
        Ok(Self { parts })
    }
}

impl RabbitMqSinkConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(format!("sink (rabbitmq): {m}"));
        let sources = [
            self.url.is_some(),
            self.url_env.is_some(),
            self.url_file.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => {
                return Err(invalid(
                    "no broker URL: set `url_env = \"AMQP_URL\"` (an environment variable holding amqp://user:password@host:5672/%2f), `url_file`, or `url`".to_string(),
                ));
            }
            1 => {}
            _ => {
                return Err(invalid(
                    "set only one of `url`, `url_env` and `url_file`".to_string(),
                ));
            }
        }
        if let Some(url) = &self.url {
            url.parse()
                .map_err(|e| invalid(format!("url `{url}`: {e}")))?;
        }
        if self.url_env.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(invalid(
                "url_env is empty: name the environment variable holding the URL".to_string(),
            ));
        }
        check_name("exchange", &self.exchange).map_err(invalid)?;
        if self.declare_exchange && self.exchange.starts_with("amq.") {
            return Err(invalid(format!(
                "exchange `{}`: names starting with `amq.` are reserved by RabbitMQ and cannot be declared; pick another name, or set declare_exchange = false to use the existing one",
                self.exchange
            )));
        }
        RoutingKeyTemplate::parse(&self.routing_key)
            .map_err(|e| invalid(format!("routing_key `{}`: {e}", self.routing_key)))?;
        if self.confirm_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(invalid(
                "confirm_timeout and connect_timeout must be more than zero, e.g. \"30s\""
                    .to_string(),
            ));
        }
        if self.connection_name.trim().is_empty() {
            return Err(invalid(
                "connection_name is empty; it names the connection in `rabbitmqctl list_connections`".to_string(),
            ));
        }
        let mut seen = HashSet::new();
        for q in &self.declare_queues {
            let label = format!("declare_queues `{}`", q.name);
            check_name("declare_queues.name", &q.name).map_err(invalid)?;
            if q.name.starts_with("amq.") {
                return Err(invalid(format!(
                    "{label}: names starting with `amq.` are reserved by RabbitMQ"
                )));
            }
            if !seen.insert(q.name.as_str()) {
                return Err(invalid(format!("{label} is listed twice")));
            }
            if q.binding_keys.is_empty() {
                return Err(invalid(format!(
                    "{label}: binding_keys is empty, so the queue would get nothing; use [\"#\"] for every event"
                )));
            }
            for key in &q.binding_keys {
                if key.len() > 255 {
                    return Err(invalid(format!(
                        "{label}: binding key `{key}` is longer than 255 bytes"
                    )));
                }
            }
            let retention = q.max_age.is_some()
                || q.max_length_bytes.is_some()
                || q.max_segment_size_bytes.is_some();
            if retention && q.queue_type != QueueType::Stream {
                return Err(invalid(format!(
                    "{label}: max_age, max_length_bytes and max_segment_size_bytes are retention settings of stream queues; set type = \"stream\" or remove them"
                )));
            }
            if q.max_age.is_some_and(|d| d.as_secs() == 0) {
                return Err(invalid(format!(
                    "{label}: max_age must be at least one second"
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn rebase_paths(&mut self, base: &std::path::Path) {
        for p in [self.url_file.as_mut(), self.ca_file.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!("{what} must be 1 to 255 bytes long"));
    }
    Ok(())
}

/// Whether a URL's scheme is `amqps`.
pub(crate) fn is_tls(uri: &AMQPUri) -> bool {
    uri.scheme == AMQPScheme::AMQPS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RabbitMqSinkConfig, String> {
        let c: RabbitMqSinkConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults() {
        let c = parse("url_env = 'AMQP_URL'").unwrap();
        assert_eq!(c.exchange, "graphdelta");
        assert!(c.declare_exchange);
        assert_eq!(c.routing_key, "{tenant}.{stream}.{change}");
        assert_eq!(c.confirm_timeout, Duration::from_secs(30));
        assert!(c.declare_queues.is_empty());
    }

    #[test]
    fn the_password_never_shows() {
        let c = parse("url = 'amqp://svc:hunter2@rabbit.internal:5672/%2f?heartbeat=10'").unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(
            debug.contains("amqp://svc:[redacted]@rabbit.internal:5672/%2f?heartbeat=10"),
            "{debug}"
        );
        assert_eq!(
            c.url.as_ref().unwrap().to_string(),
            "amqp://svc:[redacted]@rabbit.internal:5672/%2f?heartbeat=10"
        );
        // A URL that does not parse is not shown at all.
        assert_eq!(
            redact_url("amqp://svc:hun ter2@[bad"),
            "[unparseable URL, not shown]"
        );
        let err = parse("url = 'amqp://svc:hunter2@:5672/%2f'").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse("url = 'http://svc:hunter2@host/'").unwrap_err();
        assert!(!err.contains("hunter2") && err.contains("amqp://"), "{err}");
    }

    #[test]
    fn exactly_one_url_source() {
        let err = parse("exchange = 'x'").unwrap_err();
        assert!(err.contains("url_env"), "{err}");
        let err = parse("url = 'amqp://h/'\nurl_env = 'X'").unwrap_err();
        assert!(err.contains("only one"), "{err}");
    }

    #[test]
    fn routing_key_templates() {
        let t = RoutingKeyTemplate::parse("gd.{tenant}.{stream}.{change}").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Literal("gd.".into()),
                Part::Field(Field::Tenant),
                Part::Literal(".".into()),
                Part::Field(Field::Stream),
                Part::Literal(".".into()),
                Part::Field(Field::Change),
            ]
        );
        let err = parse("url_env='A'\nrouting_key = '{tenant}.{chnage}'").unwrap_err();
        assert!(
            err.contains("{chnage}") && err.contains("{change}"),
            "{err}"
        );
        assert!(RoutingKeyTemplate::parse("{tenant").is_err());
        assert!(RoutingKeyTemplate::parse("tenant}").is_err());
        assert!(RoutingKeyTemplate::parse("").is_err());
        assert!(RoutingKeyTemplate::parse("fixed").is_ok());
    }

    #[test]
    fn queues() {
        let c = parse(
            r#"
url_env = "A"
[[declare_queues]]
name = "all"
[[declare_queues]]
name = "replay"
type = "stream"
binding_keys = ["*.*.hard_deleted", "*.users.*"]
max_age = "30days"
max_length_bytes = 1000000000
"#,
        )
        .unwrap();
        assert_eq!(c.declare_queues[0].queue_type, QueueType::Quorum);
        assert_eq!(c.declare_queues[0].binding_keys, vec!["#"]);
        assert_eq!(c.declare_queues[1].queue_type, QueueType::Stream);
        assert_eq!(
            c.declare_queues[1].max_age,
            Some(Duration::from_secs(30 * 86400))
        );
        let err = parse("url_env='A'\n[[declare_queues]]\nname='q'\nmax_age='1day'").unwrap_err();
        assert!(err.contains("stream"), "{err}");
        let err = parse("url_env='A'\n[[declare_queues]]\nname='q'\n[[declare_queues]]\nname='q'")
            .unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = parse("url_env='A'\n[[declare_queues]]\nname='q'\ntype='lazy'").unwrap_err();
        assert!(err.contains("lazy"), "{err}");
        let err = parse("url_env='A'\n[[declare_queues]]\nname='q'\nbinding_keys=[]").unwrap_err();
        assert!(err.contains("binding_keys"), "{err}");
    }

    #[test]
    fn reserved_exchange_names_are_refused_only_when_declaring() {
        assert!(parse("url_env='A'\nexchange='amq.topic'").is_err());
        assert!(parse("url_env='A'\nexchange='amq.topic'\ndeclare_exchange=false").is_ok());
    }

    #[test]
    fn a_connector_file_selects_the_sink_by_type() {
        let file = |sink: &str| {
            format!(
                "[graph]\ntenant_id = 't'\nclient_id = 'c'\nclient_secret_env = 'S'\n[[streams]]\nname = 'users'\nresource = 'users'\n[sink]\ntype = 'rabbitmq'\n{sink}"
            )
        };
        let c = crate::config::Config::parse(&file("url_env = 'AMQP_URL'")).unwrap();
        assert_eq!(c.sink.kind(), "rabbitmq");
        let err = crate::config::Config::parse(&file("url_env = 'AMQP_URL'\nexchnage = 'x'"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exchnage"), "{err}");
        let err = crate::config::Config::parse(&file("exchange = 'x'"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("url_env"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("url_env='A'\nrouting-key='x'").unwrap_err();
        assert!(err.contains("routing-key"), "{err}");
    }
}
