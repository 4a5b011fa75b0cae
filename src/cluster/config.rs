//! `[cluster]`: several graphdelta processes sharing one connector file,
//! coordinated by a Kafka consumer group.
//!
//! ```toml
//! [cluster]
//! group = "graphdelta-prod"                 # the Kafka consumer group
//! # instance_id = "graphdelta-1"            # default: hostname-pid
//! # assignments_topic = "graphdelta-prod.assignments"  # one partition per stream
//! # state_topic = "graphdelta-prod.state"   # compacted: checkpoints + memory
//! # session_timeout = "10s"                 # a dead instance's streams move after this
//! # assignment_strategy = "cooperative-sticky"
//! ```

use std::time::Duration;

use serde::Deserialize;

use crate::{config::ConfigError, sink::kafka::config::is_legal_topic};

/// The `[cluster]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The Kafka consumer group the instances join. Instances with the same
    /// group and the same connector file share its streams; each stream has
    /// one owner at a time.
    pub group: String,
    /// This instance's name in `/status` and in the group (`client.id`).
    /// Default: `<hostname>-<pid>`.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The topic whose partitions the group divides: partition *i* is the
    /// *i*-th stream by name. Its only records are the owners' claims (who
    /// runs which stream, for `/status`). Default: `<group>.assignments`.
    #[serde(default)]
    pub assignments_topic: Option<String>,
    /// The compacted topic holding each stream's checkpoint and memory, so
    /// that whichever instance takes a stream over resumes where its last
    /// owner committed. Default: `<group>.state`.
    #[serde(default)]
    pub state_topic: Option<String>,
    /// Partitions of the state topic when it is created (a stream's records
    /// all go to one partition, chosen by a hash of its name). Default: the
    /// number of streams. Never change an existing topic's partition count:
    /// streams would look for their state in another partition.
    #[serde(default)]
    pub state_partitions: Option<i32>,
    /// The group's session timeout: an instance that stops heartbeating
    /// (crash, `kill -9`, network partition) loses its streams to the others
    /// after this long. Kafka brokers accept 6 s to 30 min by default.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// librdkafka's `partition.assignment.strategy`. `cooperative-sticky`
    /// (default) moves only the streams that must move when an instance
    /// joins or leaves; `range` or `roundrobin` stop every stream at each
    /// rebalance (use them only if the brokers cannot do better).
    #[serde(default = "default_strategy")]
    pub assignment_strategy: String,
}

const fn default_session_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_strategy() -> String {
    "cooperative-sticky".to_string()
}

impl ClusterConfig {
    pub fn assignments_topic(&self) -> String {
        self.assignments_topic
            .clone()
            .unwrap_or_else(|| format!("{}.assignments", self.group))
    }

    pub fn state_topic(&self) -> String {
        self.state_topic
            .clone()
            .unwrap_or_else(|| format!("{}.state", self.group))
    }

    /// The configured instance id, or `<hostname>-<pid>`.
    pub fn instance_id(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "graphdelta".to_string());
            format!("{host}-{}", std::process::id())
        })
    }

    pub(crate) fn validate(&self, sink_is_kafka: bool) -> Result<(), ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        if !sink_is_kafka {
            return Err(invalid(
                "[cluster] needs the Kafka sink (the group, the assignments and the state live in Kafka): set [sink] type = \"kafka\", or remove [cluster] to run one instance".to_string(),
            ));
        }
        if self.group.trim().is_empty() {
            return Err(invalid(
                "cluster.group is empty: name the consumer group the instances share, e.g. \"graphdelta-prod\"".to_string(),
            ));
        }
        for (key, topic) in [
            ("cluster.assignments_topic", self.assignments_topic()),
            ("cluster.state_topic", self.state_topic()),
        ] {
            if !is_legal_topic(&topic) {
                return Err(invalid(format!(
                    "{key} `{topic}` is not a legal Kafka topic name (a-z A-Z 0-9 . _ - only, at most 249 characters); set it explicitly or choose another cluster.group"
                )));
            }
        }
        if self.assignments_topic() == self.state_topic() {
            return Err(invalid(
                "cluster.assignments_topic and cluster.state_topic must differ".to_string(),
            ));
        }
        if self.state_partitions.is_some_and(|p| p < 1) {
            return Err(invalid(
                "cluster.state_partitions must be at least 1".to_string(),
            ));
        }
        if self.session_timeout < Duration::from_secs(1) {
            return Err(invalid(format!(
                "cluster.session_timeout = {} is too short: heartbeats go every third of it; use a few seconds at least (Kafka's default minimum is 6s)",
                humantime::format_duration(self.session_timeout)
            )));
        }
        match self.assignment_strategy.as_str() {
            "cooperative-sticky" | "range" | "roundrobin" => {}
            other => {
                return Err(invalid(format!(
                    "cluster.assignment_strategy `{other}`: use cooperative-sticky, range or roundrobin"
                )));
            }
        }
        if self.instance_id.as_deref().is_some_and(str::is_empty) {
            return Err(invalid(
                "cluster.instance_id is empty: remove it (default: hostname-pid) or name the instance".to_string(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> ClusterConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn defaults_derive_from_the_group() {
        let c = parse("group = \"gd-prod\"");
        assert_eq!(c.assignments_topic(), "gd-prod.assignments");
        assert_eq!(c.state_topic(), "gd-prod.state");
        assert_eq!(c.session_timeout, Duration::from_secs(10));
        assert_eq!(c.assignment_strategy, "cooperative-sticky");
        assert!(c.validate(true).is_ok());
        assert!(!c.instance_id().is_empty());
    }

    #[test]
    fn bad_settings_name_the_key_and_the_fix() {
        let err = parse("group = \"g\"").validate(false).unwrap_err();
        assert!(err.to_string().contains("type = \"kafka\""), "{err}");
        let err = parse("group = \"g\"\nassignment_strategy = \"sticky\"")
            .validate(true)
            .unwrap_err();
        assert!(err.to_string().contains("cooperative-sticky"), "{err}");
        let err = parse("group = \"g h\"").validate(true).unwrap_err();
        assert!(
            err.to_string().contains("cluster.assignments_topic"),
            "{err}"
        );
        let err = parse("group = \"g\"\nsession_timeout = \"100ms\"")
            .validate(true)
            .unwrap_err();
        assert!(err.to_string().contains("session_timeout"), "{err}");
    }
}
