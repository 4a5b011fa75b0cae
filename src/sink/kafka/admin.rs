//! Cluster checks and topic creation.
//!
//! - [`Admin::check`] is the startup check: it asks the cluster for its
//!   metadata with `sink.startup_timeout` (10 s by default), so a wrong
//!   address or a dead cluster is reported in seconds with the brokers and
//!   the usual causes, instead of after librdkafka's delivery timeout.
//! - [`Admin::ensure_topics`] creates the event topics the first time a batch
//!   names them (their names depend on the events' tenant and stream), with
//!   `sink.partitions`, `sink.replication_factor` and `sink.topic_config`;
//!   [`Admin::ensure_checkpoint_topic`] creates the exactly-once checkpoint
//!   topic compacted and refuses one that is not.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication},
    error::{KafkaError, RDKafkaErrorCode},
    metadata::Metadata,
};

use super::{config::KafkaSinkConfig, context::SinkContext};
use crate::sink::SinkError;

/// The longest a readiness probe waits for the cluster's metadata.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The admin side of the sink.
pub struct Admin {
    client: Arc<AdminClient<SinkContext>>,
    config: Arc<KafkaSinkConfig>,
    /// Topics known to exist (created by us or found in the metadata).
    ensured: tokio::sync::Mutex<HashSet<String>>,
    /// The first successful check is logged at INFO; readiness probes
    /// repeat it.
    announced: AtomicBool,
}

impl Admin {
    pub fn new(config: Arc<KafkaSinkConfig>) -> Result<Self, SinkError> {
        let mut cc = config.base_client_config()?;
        // The admin handle is a producer internally; asking for a missing
        // topic's metadata must not make a broker with
        // `auto.create.topics.enable` create it with its defaults.
        cc.set("allow.auto.create.topics", "false");
        let client = cc
            .create_with_context::<_, AdminClient<SinkContext>>(SinkContext::new("admin"))
            .map_err(|e| {
                SinkError::Permanent(format!(
                    "kafka: cannot create the admin client: {e}; check [sink.properties]"
                ))
            })?;
        Ok(Self {
            client: Arc::new(client),
            config,
            ensured: Default::default(),
            announced: AtomicBool::new(false),
        })
    }

    /// Fetches the cluster's metadata (all topics) within `timeout`.
    async fn metadata(&self, timeout: Duration) -> Result<Metadata, KafkaError> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || client.inner().fetch_metadata(None, timeout))
            .await
            .unwrap_or(Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail)))
    }

    /// The startup check: the brokers answer within `startup_timeout`.
    pub async fn check(&self) -> Result<(), SinkError> {
        // Once the cluster has answered, this is the readiness probe: it
        // must notice an outage within seconds, not after the (long)
        // startup timeout.
        let timeout = if self.announced.load(Ordering::Relaxed) {
            self.config.startup_timeout.min(PROBE_TIMEOUT)
        } else {
            self.config.startup_timeout
        };
        match self.metadata(timeout).await {
            Ok(md) => {
                if !self.announced.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        brokers = md.brokers().len(),
                        topics = md.topics().len(),
                        "Kafka cluster reachable."
                    );
                }
                Ok(())
            }
            Err(e) => Err(self.unreachable(&e, timeout)),
        }
    }

    fn unreachable(&self, e: &KafkaError, timeout: Duration) -> SinkError {
        let code = e.rdkafka_error_code();
        let message = format!(
            "kafka: no answer from brokers `{}` within {} ({e}): check sink.brokers, that the brokers' advertised listeners resolve and are reachable from this host, and security.protocol / sasl.* / ssl.* in [sink.properties]",
            self.config.brokers_display(),
            humantime::format_duration(timeout)
        );
        match code {
            Some(
                RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::InvalidArgument,
            ) => SinkError::Permanent(message),
            _ => SinkError::Retriable(message),
        }
    }

    /// Makes sure every topic in `topics` exists, creating missing ones when
    /// `sink.create_topics` allows it.
    pub async fn ensure_topics(&self, topics: &[Arc<str>]) -> Result<(), SinkError> {
        let mut ensured = self.ensured.lock().await;
        let wanted: Vec<&str> = topics
            .iter()
            .map(|t| &**t)
            .filter(|t| !ensured.contains(*t))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let config: Vec<(String, String)> = self
            .config
            .topic_config
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        let created = self
            .create_missing(&wanted, self.config.partitions, &config)
            .await?;
        for t in &wanted {
            ensured.insert(t.to_string());
        }
        for t in created {
            tracing::info!(topic = %t, partitions = ?self.config.partitions, replication_factor = ?self.config.replication_factor, "Created the event topic.");
        }
        Ok(())
    }

    /// Creates the checkpoint topic if missing (compacted, one partition)
    /// and checks that an existing one is compacted.
    pub async fn ensure_checkpoint_topic(&self) -> Result<(), SinkError> {
        let topic = self.config.checkpoint_topic.clone();
        let mut ensured = self.ensured.lock().await;
        if ensured.contains(&topic) {
            return Ok(());
        }
        let config = vec![
            ("cleanup.policy".to_string(), "compact".to_string()),
            // Room for a page's memory changes (the record carries them).
            (
                "max.message.bytes".to_string(),
                (16 * 1024 * 1024).to_string(),
            ),
        ];
        for t in self.create_missing(&[&topic], Some(1), &config).await? {
            tracing::info!(topic = %t, "Created the compacted checkpoint topic.");
        }
        self.check_compacted(&topic).await?;
        ensured.insert(topic);
        Ok(())
    }

    /// Creates those of `topics` the metadata does not list; returns them.
    async fn create_missing(
        &self,
        topics: &[&str],
        partitions: Option<i32>,
        config: &[(String, String)],
    ) -> Result<Vec<String>, SinkError> {
        let md = self
            .metadata(self.config.startup_timeout)
            .await
            .map_err(|e| self.unreachable(&e, self.config.startup_timeout))?;
        let mut existing: HashSet<&str> = HashSet::new();
        for t in md.topics().iter().filter(|t| topics.contains(&t.name())) {
            match t.error().map(RDKafkaErrorCode::from) {
                None if !t.partitions().is_empty() => {
                    existing.insert(t.name());
                }
                None | Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {}
                Some(code @ RDKafkaErrorCode::TopicAuthorizationFailed) => {
                    return Err(SinkError::Permanent(format!(
                        "kafka: topic `{}`: {code}: the principal may not describe or write to it; grant it DESCRIBE and WRITE on the topic (kafka-acls) or check the credentials in [sink.properties]",
                        t.name()
                    )));
                }
                // Leader elections and the like: the topic exists; the
                // producer waits for it to become writable.
                Some(_) => {
                    existing.insert(t.name());
                }
            }
        }
        let missing: Vec<&str> = topics
            .iter()
            .copied()
            .filter(|t| !existing.contains(t))
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        if !self.config.create_topics {
            return Err(SinkError::Permanent(format!(
                "kafka: topic `{}` does not exist and sink.create_topics = false: create it (see the sink's documentation for partitions and compaction) or set sink.create_topics = true",
                missing.join("`, `")
            )));
        }
        let replication = self.config.replication_factor.map_or(-1, i32::from);
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|name| {
                let mut t = NewTopic::new(
                    name,
                    partitions.unwrap_or(-1),
                    TopicReplication::Fixed(replication),
                );
                for (k, v) in config {
                    t = t.set(k, v);
                }
                t
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(self.config.startup_timeout));
        let results = self
            .client
            .create_topics(new.iter(), &opts)
            .await
            .map_err(|e| {
                self.create_failed(
                    &missing.join("`, `"),
                    e.rdkafka_error_code(),
                    &e.to_string(),
                )
            })?;
        let mut created = Vec::new();
        for r in results {
            match r {
                Ok(name) => created.push(name),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(self.create_failed(&name, Some(code), &code.to_string()));
                }
            }
        }
        Ok(created)
    }

    fn create_failed(
        &self,
        topic: &str,
        code: Option<RDKafkaErrorCode>,
        detail: &str,
    ) -> SinkError {
        let base = format!("kafka: cannot create topic `{topic}`: {detail}");
        match code {
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            ) => SinkError::Permanent(format!(
                "{base}; grant the principal CREATE on the topic (or the cluster), or create the topic yourself and set sink.create_topics = false"
            )),
            Some(RDKafkaErrorCode::InvalidReplicationFactor) => SinkError::Permanent(format!(
                "{base}; sink.replication_factor ({:?}) is more than the cluster's brokers: lower it",
                self.config.replication_factor
            )),
            Some(RDKafkaErrorCode::InvalidPartitions) => {
                SinkError::Permanent(format!("{base}; check sink.partitions"))
            }
            Some(
                RDKafkaErrorCode::InvalidConfig
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::InvalidRequest
                | RDKafkaErrorCode::UnsupportedVersion,
            ) => SinkError::Permanent(format!(
                "{base}; check sink.topic_config and the cluster's topic creation policy"
            )),
            _ => SinkError::Retriable(base),
        }
    }

    /// A checkpoint topic that deletes old segments would, one retention
    /// period after a stream's last batch, forget where the stream stands.
    async fn check_compacted(&self, topic: &str) -> Result<(), SinkError> {
        let opts = AdminOptions::new().request_timeout(Some(self.config.startup_timeout));
        let spec = ResourceSpecifier::Topic(topic);
        let policy = match self.client.describe_configs([&spec], &opts).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(resource)) => resource.get("cleanup.policy").and_then(|e| e.value.clone()),
                _ => None,
            },
            Err(_) => None,
        };
        match policy {
            Some(p) if p.split(',').any(|s| s.trim() == "compact") => Ok(()),
            Some(p) => Err(SinkError::Permanent(format!(
                "kafka: checkpoint topic `{topic}` has cleanup.policy={p}: it must be compacted, or checkpoints expire with its retention; run `kafka-configs --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact` or choose another sink.checkpoint_topic"
            ))),
            None => {
                tracing::warn!(
                    topic,
                    "Could not read the checkpoint topic's cleanup.policy (no DescribeConfigs permission?); make sure it is compacted."
                );
                Ok(())
            }
        }
    }
}
