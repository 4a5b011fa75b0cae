//! `[sink] type = "kafka"`: what the operator writes, checked before anything
//! connects, and turned into librdkafka client configurations.
//!
//! The defaults are chosen for the guarantees described in the module docs
//! of [`super`]: idempotent producer, `acks=all`, and a delivery timeout
//! short enough that a dead cluster surfaces as a retriable error in half a
//! minute rather than librdkafka's five.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use rdkafka::ClientConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use url::Url;

use crate::{config::ConfigError, sink::SinkError};

/// `[sink] type = "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap brokers, comma separated: `"kafka-1:9092,kafka-2:9092"`
    /// (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    /// Topic of each stream's events. `{tenant}` (the configured tenant id),
    /// `{stream}` and `{resource}` are replaced, and any character Kafka does
    /// not allow in a topic name (anything but `a-z A-Z 0-9 . _ -`) becomes
    /// `_`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// `false` (default): at-least-once: an idempotent producer with
    /// `acks=all`; a retried batch can appear twice (same `ce_id`).
    /// `true`: exactly-once for `read_committed` consumers: each batch and
    /// its checkpoint are written in one Kafka transaction.
    #[serde(default)]
    pub exactly_once: bool,
    /// After each `HARD_DELETED` event, also write a record with the same key
    /// and no value, so that a compacted topic forgets the object.
    #[serde(default = "default_tombstones")]
    pub tombstones: bool,
    /// `raw`: the value is the `graphdelta.v1.ChangeEvent` protobuf.
    /// `confluent`: the Confluent Schema Registry framing (magic byte 0, the
    /// 4-byte schema id, the message-index list) before the protobuf; needs
    /// `schema_registry_url`.
    #[serde(default)]
    pub wire_format: WireFormat,
    /// Schema Registry base URL for `wire_format = "confluent"`. The schema
    /// is registered (idempotently) under `<topic>-value` before the first
    /// record of each topic.
    #[serde(default)]
    pub schema_registry_url: Option<String>,
    /// Basic-auth user name for the Schema Registry.
    #[serde(default)]
    pub schema_registry_username: Option<String>,
    /// Where the Schema Registry basic-auth password comes from:
    /// `{ env = "VAR" }` or `{ file = "/run/secrets/x" }`.
    #[serde(default)]
    pub schema_registry_password: Option<SecretRef>,
    /// How long librdkafka may try to deliver a record (its
    /// `message.timeout.ms`) before the batch fails with a retriable error
    /// and is published again. librdkafka's own default is 5 minutes.
    #[serde(default = "default_delivery_timeout", with = "crate::config::duration")]
    pub delivery_timeout: Duration,
    /// How long the startup check waits for the cluster's metadata before
    /// reporting the brokers unreachable.
    #[serde(default = "default_startup_timeout", with = "crate::config::duration")]
    pub startup_timeout: Duration,
    /// Create missing topics (events and checkpoints) with the settings
    /// below. Turn off where the principal may not create topics; they must
    /// then exist before the first record.
    #[serde(default = "default_create_topics")]
    pub create_topics: bool,
    /// Partitions of created event topics. Default: the broker's
    /// `num.partitions`.
    #[serde(default)]
    pub partitions: Option<i32>,
    /// Replication factor of created topics. Default: the broker's
    /// `default.replication.factor`.
    #[serde(default)]
    pub replication_factor: Option<i16>,
    /// Topic-level configs of created event topics, e.g.
    /// `{ "cleanup.policy" = "compact", "delete.retention.ms" = "604800000" }`.
    #[serde(default)]
    pub topic_config: BTreeMap<String, PropertyValue>,
    /// Exactly-once: the compacted topic holding each stream's last
    /// committed checkpoint (key = stream name). Created with
    /// `cleanup.policy=compact` if missing; one per connector.
    #[serde(default = "default_checkpoint_topic")]
    pub checkpoint_topic: String,
    /// Exactly-once: each stream's producer uses `transactional.id =
    /// <prefix><stream>`. Two processes with the same id fence each other
    /// (the older one stops): keep it unique per connector.
    #[serde(default = "default_transactional_id_prefix")]
    pub transactional_id_prefix: String,
    /// Exactly-once: `transaction.timeout.ms`; the broker aborts a
    /// transaction left open longer (for example by a killed process).
    #[serde(
        default = "default_transaction_timeout",
        with = "crate::config::duration"
    )]
    pub transaction_timeout: Duration,
    /// librdkafka properties passed verbatim (`security.protocol`,
    /// `sasl.mechanisms`, `ssl.ca.location`, `compression.type`,
    /// `linger.ms`, ...). Numbers and booleans may be written unquoted.
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
    /// librdkafka properties whose values are secrets (`sasl.password`,
    /// `ssl.key.password`, ...), each read from `{ env = "VAR" }` or
    /// `{ file = "path" }`.
    #[serde(default)]
    pub secret_properties: BTreeMap<String, SecretRef>,
}

fn default_topic() -> String {
    "graphdelta.{tenant}.{stream}".to_string()
}
const fn default_tombstones() -> bool {
    true
}
const fn default_delivery_timeout() -> Duration {
    Duration::from_secs(30)
}
const fn default_startup_timeout() -> Duration {
    Duration::from_secs(10)
}
const fn default_create_topics() -> bool {
    true
}
fn default_checkpoint_topic() -> String {
    "graphdelta.checkpoints".to_string()
}
fn default_transactional_id_prefix() -> String {
    "graphdelta-".to_string()
}
const fn default_transaction_timeout() -> Duration {
    Duration::from_secs(60)
}

/// How record values are framed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// The bare `ChangeEvent` protobuf.
    #[default]
    Raw,
    /// Confluent Schema Registry framing before the protobuf.
    Confluent,
}

/// A librdkafka or topic property value: written as a string, a number or a
/// boolean in TOML, passed on as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyValue(pub String);

impl<'de> Deserialize<'de> for PropertyValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Int(i64),
            Float(f64),
            Bool(bool),
        }
        Ok(PropertyValue(
            match Scalar::deserialize(d)
                .map_err(|_| serde::de::Error::custom("expected a string, a number or a boolean"))?
            {
                Scalar::Text(s) => s,
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Bool(b) => b.to_string(),
            },
        ))
    }
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a secret comes from: `{ env = "VAR" }` or `{ file = "path" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SecretRef {
    /// The name of an environment variable.
    Env(String),
    /// A file whose content, without the trailing newline, is the secret.
    File(PathBuf),
}

impl SecretRef {
    /// Reads the secret; `what` names the setting in the error.
    pub fn load(&self, what: &str) -> Result<SecretString, String> {
        let (value, place) = match self {
            SecretRef::Env(var) => (
                std::env::var(var).map_err(|_| {
                    format!(
                        "{what}: environment variable `{var}` is not set (or not UTF-8); export it"
                    )
                })?,
                format!("environment variable `{var}`"),
            ),
            SecretRef::File(path) => (
                std::fs::read_to_string(path).map_err(|e| {
                    format!("{what}: cannot read secret file `{}`: {e}", path.display())
                })?,
                format!("secret file `{}`", path.display()),
            ),
        };
        let value = value.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(format!("{what}: {place} is empty"));
        }
        Ok(SecretString::from(value.to_string()))
    }

    fn rebase(&mut self, base: &Path) {
        if let SecretRef::File(p) = self
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }
}

/// Properties the sink sets itself: overriding them would break the
/// guarantees, so they are refused with the reason.
const MANAGED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use sink.brokers"),
    ("metadata.broker.list", "use sink.brokers"),
    (
        "enable.idempotence",
        "the producer is always idempotent: without it a retried send can reorder or duplicate records",
    ),
    (
        "acks",
        "records are acknowledged by all in-sync replicas (acks=all); anything less can lose acknowledged events",
    ),
    ("request.required.acks", "see acks: always all"),
    (
        "transactional.id",
        "set sink.transactional_id_prefix; the id is <prefix><stream>",
    ),
    ("message.timeout.ms", "use sink.delivery_timeout"),
    ("delivery.timeout.ms", "use sink.delivery_timeout"),
    ("transaction.timeout.ms", "use sink.transaction_timeout"),
    (
        "isolation.level",
        "the checkpoint reader always uses read_committed",
    ),
    ("enable.auto.commit", "the sink commits no consumer offsets"),
];

/// Properties holding secrets: they belong in `secret_properties`.
const SECRET_KEYS: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.key.pem",
    "ssl_key",
];

/// The largest checkpoint record the sink can write (the checkpoint topic's
/// `max.message.bytes`, plus room for the request around it).
pub const CHECKPOINT_MAX_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;

/// The longest legal Kafka topic name.
const MAX_TOPIC_LEN: usize = 249;

/// The placeholders of `topic`.
const PLACEHOLDERS: &[&str] = &["tenant", "stream", "resource"];

impl KafkaSinkConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return invalid(
                "sink.brokers is empty: list the bootstrap brokers, e.g. \"kafka-1:9092,kafka-2:9092\""
                    .to_string(),
            );
        }
        TopicTemplate::parse(&self.topic).map_err(ConfigError::Invalid)?;
        if !is_legal_topic(&self.checkpoint_topic) {
            return invalid(format!(
                "sink.checkpoint_topic `{}` is not a legal Kafka topic name: use 1 to 249 of a-z A-Z 0-9 . _ -",
                self.checkpoint_topic
            ));
        }
        if self.wire_format == WireFormat::Confluent && self.schema_registry_url.is_none() {
            return invalid(
                "sink.wire_format = \"confluent\" needs sink.schema_registry_url, e.g. \"http://schema-registry:8081\""
                    .to_string(),
            );
        }
        if let Some(url) = &self.schema_registry_url {
            self.registry_url(url).map_err(ConfigError::Invalid)?;
        }
        if self.schema_registry_password.is_some() && self.schema_registry_username.is_none() {
            return invalid(
                "sink.schema_registry_password is set without sink.schema_registry_username"
                    .to_string(),
            );
        }
        if let Some(p) = self.partitions
            && p < 1
        {
            return invalid(format!(
                "sink.partitions = {p}: use 1 or more, or leave it out for the broker's num.partitions"
            ));
        }
        if let Some(r) = self.replication_factor
            && r < 1
        {
            return invalid(format!(
                "sink.replication_factor = {r}: use 1 or more, or leave it out for the broker's default.replication.factor"
            ));
        }
        if self.delivery_timeout < Duration::from_secs(1) {
            return invalid(format!(
                "sink.delivery_timeout = {}: use at least 1s",
                humantime::format_duration(self.delivery_timeout)
            ));
        }
        if self.startup_timeout.is_zero() {
            return invalid("sink.startup_timeout must be above 0".to_string());
        }
        if self.exactly_once {
            if self.transactional_id_prefix.is_empty() {
                return invalid(
                    "sink.transactional_id_prefix is empty: name the connector, e.g. \"graphdelta-contoso-\""
                        .to_string(),
                );
            }
            // librdkafka refuses a producer whose records may outlive the
            // transaction they belong to.
            if self.delivery_timeout > self.transaction_timeout {
                return invalid(format!(
                    "sink.delivery_timeout ({}) exceeds sink.transaction_timeout ({}): a transaction cannot wait for its records; lower the first or raise the second",
                    humantime::format_duration(self.delivery_timeout),
                    humantime::format_duration(self.transaction_timeout)
                ));
            }
        }
        for key in self.properties.keys().chain(self.secret_properties.keys()) {
            if let Some((_, why)) = MANAGED.iter().find(|(k, _)| k == key) {
                return invalid(format!(
                    "sink.properties.\"{key}\" is managed by graphdelta: {why}"
                ));
            }
        }
        for key in self.properties.keys() {
            if SECRET_KEYS.contains(&key.as_str()) {
                return invalid(format!(
                    "sink.properties.\"{key}\" holds a secret: move it to [sink.secret_properties] as \"{key}\" = {{ env = \"VARIABLE\" }} (or {{ file = \"path\" }})"
                ));
            }
        }
        Ok(())
    }

    /// The parsed `schema_registry_url`.
    pub(crate) fn registry_url(&self, url: &str) -> Result<Url, String> {
        match Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(u),
            Ok(_) => Err(format!(
                "sink.schema_registry_url `{url}`: use an http(s) URL such as \"http://schema-registry:8081\""
            )),
            Err(e) => Err(format!("sink.schema_registry_url `{url}`: {e}")),
        }
    }

    pub(crate) fn rebase_paths(&mut self, base: &Path) {
        for s in self.secret_properties.values_mut() {
            s.rebase(base);
        }
        if let Some(s) = self.schema_registry_password.as_mut() {
            s.rebase(base);
        }
    }

    /// The settings shared by every client: brokers, the operator's
    /// properties and secrets, applied over `c`'s defaults.
    pub(crate) fn apply_common(&self, c: &mut ClientConfig) -> Result<(), SinkError> {
        c.set("bootstrap.servers", self.brokers.trim());
        if c.get("client.id").is_none() {
            c.set("client.id", "graphdelta");
        }
        // librdkafka backs off reconnects up to 10 s by default: after an
        // outage the stream would wait that long for a broker that is back.
        // Retry each second at most (tests/chaos.rs: resume within 5 s).
        c.set("reconnect.backoff.ms", "100");
        c.set("reconnect.backoff.max.ms", "1000");
        for (k, v) in &self.properties {
            c.set(k, &v.0);
        }
        for (k, source) in &self.secret_properties {
            let secret = source
                .load(&format!("sink.secret_properties.\"{k}\""))
                .map_err(SinkError::Permanent)?;
            c.set(k, secret.expose_secret());
        }
        Ok(())
    }

    /// A client configuration with only the common settings.
    pub(crate) fn base_client_config(&self) -> Result<ClientConfig, SinkError> {
        let mut c = ClientConfig::new();
        self.apply_common(&mut c)?;
        Ok(c)
    }

    /// The producer's configuration; `transactional_id` for exactly-once.
    pub(crate) fn producer_config(
        &self,
        transactional_id: Option<&str>,
    ) -> Result<ClientConfig, SinkError> {
        let mut c = ClientConfig::new();
        c.set("enable.idempotence", "true");
        c.set("acks", "all");
        c.set(
            "message.timeout.ms",
            self.delivery_timeout.as_millis().to_string(),
        );
        // Java's partitioner: a consumer or Kafka Streams app computing a
        // key's partition the Java way finds it where we wrote it.
        c.set("partitioner", "murmur2_random");
        if let Some(id) = transactional_id {
            c.set("transactional.id", id);
            c.set(
                "transaction.timeout.ms",
                self.transaction_timeout.as_millis().to_string(),
            );
            // A checkpoint record carries a page's memory changes: allow
            // what the checkpoint topic is created to accept (16 MiB) plus
            // the request overhead. Event topics keep their own limit.
            c.set("message.max.bytes", CHECKPOINT_MAX_BYTES.to_string());
        }
        // The operator's properties win over the defaults above (the
        // guarantee-bearing ones are refused by `validate`).
        self.apply_common(&mut c)?;
        Ok(c)
    }

    /// A consumer for reading the checkpoint topic back.
    pub(crate) fn consumer_config(&self, read_committed: bool) -> Result<ClientConfig, SinkError> {
        let mut c = self.base_client_config()?;
        // Producer-only properties would make librdkafka warn on a consumer.
        for key in PRODUCER_ONLY {
            c.remove(key);
        }
        c.set("group.id", "graphdelta-checkpoint-reader");
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        c.set("enable.partition.eof", "true");
        // The end of the partition is found by fetching; don't let the
        // broker hold each empty fetch for the default 500 ms.
        c.set("fetch.wait.max.ms", "50");
        c.set("auto.offset.reset", "earliest");
        c.set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        );
        Ok(c)
    }

    /// The brokers as written, for error messages.
    pub(crate) fn brokers_display(&self) -> String {
        self.brokers.trim().to_string()
    }
}

const PRODUCER_ONLY: &[&str] = &[
    "compression.type",
    "compression.codec",
    "compression.level",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "batch.num.messages",
    "batch.size",
    "partitioner",
    "sticky.partitioning.linger.ms",
    "retries",
    "message.send.max.retries",
    "retry.backoff.ms",
    "retry.backoff.max.ms",
];

/// Whether Kafka accepts `name` as a topic name.
pub fn is_legal_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Replaces every character Kafka does not allow in a topic name with `_`.
pub fn sanitize_topic_part(part: &str) -> String {
    part.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The parsed `topic` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Tenant,
    Stream,
    Resource,
}

impl TopicTemplate {
    /// Parses a template; the error names the setting and the fix.
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("sink.topic `{template}`: `{{` without a closing `}}`"))?;
            parts.push(match &after[..close] {
                "tenant" => Part::Tenant,
                "stream" => Part::Stream,
                "resource" => Part::Resource,
                other => {
                    return Err(format!(
                        "sink.topic `{template}`: unknown placeholder `{{{other}}}`; use {}",
                        PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        for p in &parts {
            if let Part::Literal(l) = p
                && (l.contains('}') || sanitize_topic_part(l) != *l)
            {
                return Err(format!(
                    "sink.topic `{template}`: `{l}` has characters Kafka does not allow in a topic name; use a-z A-Z 0-9 . _ -"
                ));
            }
        }
        if parts.is_empty() {
            return Err("sink.topic is empty: e.g. \"graphdelta.{tenant}.{stream}\"".to_string());
        }
        // A fixed name is legal or not now; a templated one at render time.
        if parts.iter().all(|p| matches!(p, Part::Literal(_))) && !is_legal_topic(template) {
            return Err(format!(
                "sink.topic `{template}` is not a legal Kafka topic name (at most 249 of a-z A-Z 0-9 . _ -)"
            ));
        }
        Ok(Self { parts })
    }

    /// The topic for one stream; values are sanitized into legal characters.
    pub fn render(&self, tenant: &str, stream: &str, resource: &str) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Tenant => out.push_str(&sanitize_topic_part(tenant)),
                Part::Stream => out.push_str(&sanitize_topic_part(stream)),
                Part::Resource => out.push_str(&sanitize_topic_part(resource)),
            }
        }
        if is_legal_topic(&out) {
            Ok(out)
        } else {
            Err(format!(
                "topic `{out}` (from sink.topic for stream `{stream}`) is not a legal Kafka topic name: it is empty, `.`/`..` or longer than 249 characters; shorten sink.topic"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> KafkaSinkConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse("brokers = \"k:9092\"");
        c.validate().unwrap();
        assert_eq!(c.topic, "graphdelta.{tenant}.{stream}");
        assert!(!c.exactly_once);
        assert!(c.tombstones);
        assert_eq!(c.wire_format, WireFormat::Raw);
        assert_eq!(c.delivery_timeout, Duration::from_secs(30));
        assert_eq!(c.checkpoint_topic, "graphdelta.checkpoints");
        let p = c.producer_config(None).unwrap();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("message.timeout.ms"), Some("30000"));
        assert_eq!(p.get("transactional.id"), None);
    }

    #[test]
    fn the_template_sanitizes_values_and_rejects_unknown_placeholders() {
        let t = TopicTemplate::parse("graphdelta.{tenant}.{stream}.{resource}").unwrap();
        assert_eq!(
            t.render("contoso.onmicrosoft.com", "all users", "users")
                .unwrap(),
            "graphdelta.contoso.onmicrosoft.com.all_users.users"
        );
        assert_eq!(
            t.render("Ω/tenant", "s", "r").unwrap(),
            "graphdelta.__tenant.s.r"
        );
        let e = TopicTemplate::parse("x.{tennant}").unwrap_err();
        assert!(e.contains("unknown placeholder `{tennant}`"), "{e}");
        assert!(TopicTemplate::parse("x.{stream").is_err());
        assert!(TopicTemplate::parse("bad topic").is_err());
        assert!(TopicTemplate::parse(&"a".repeat(250)).is_err());
        let long = TopicTemplate::parse("{stream}").unwrap();
        assert!(long.render("t", &"s".repeat(250), "r").is_err());
    }

    #[test]
    fn properties_accept_scalars_and_refuse_managed_or_secret_keys() {
        let c = parse(
            r#"
            brokers = "k:9092"
            [properties]
            "linger.ms" = 20
            "enable.ssl.certificate.verification" = false
            "compression.type" = "zstd"
            [secret_properties]
            "sasl.password" = { env = "KAFKA_PASSWORD" }
            "#,
        );
        c.validate().unwrap();
        assert_eq!(c.properties["linger.ms"].0, "20");
        assert_eq!(
            c.properties["enable.ssl.certificate.verification"].0,
            "false"
        );

        let c = parse("brokers = \"k\"\n[properties]\nacks = \"1\"");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("acks") && e.contains("all in-sync"), "{e}");

        let c = parse("brokers = \"k\"\n[properties]\n\"sasl.password\" = \"hunter2\"");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("secret_properties"), "{e}");
        assert!(!e.contains("hunter2"));
    }

    #[test]
    fn secret_properties_are_read_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pem"), "-----BEGIN KEY-----\n").unwrap();
        let mut c =
            parse("brokers = \"k\"\n[secret_properties]\n\"ssl.key.pem\" = { file = \"pem\" }");
        c.rebase_paths(dir.path());
        let cc = c.producer_config(None).unwrap();
        assert_eq!(cc.get("ssl.key.pem"), Some("-----BEGIN KEY-----"));

        let c = parse(
            "brokers = \"k\"\n[secret_properties]\n\"sasl.password\" = { env = \"GRAPHDELTA_TEST_UNSET_VARIABLE\" }",
        );
        let e = c.producer_config(None).unwrap_err().to_string();
        assert!(e.contains("GRAPHDELTA_TEST_UNSET_VARIABLE"), "{e}");
    }

    #[test]
    fn cross_field_rules() {
        let c = parse("brokers = \"k\"\nwire_format = \"confluent\"");
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("schema_registry_url")
        );
        let c = parse(
            "brokers = \"k\"\nexactly_once = true\ndelivery_timeout = \"2m\"\ntransaction_timeout = \"1m\"",
        );
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("transaction_timeout")
        );
        let c = parse("brokers = \" , \"");
        assert!(c.validate().is_err());
        let c = parse("brokers = \"k\"\npartitions = 0");
        assert!(c.validate().is_err());
        assert!(toml::from_str::<KafkaSinkConfig>("brokers = \"k\"\ntopics = \"x\"").is_err());
    }
}
