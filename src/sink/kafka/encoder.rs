//! Turns a batch into Kafka records: topic, key, value, CloudEvents headers.
//!
//! - **Topic**: `sink.topic` rendered for the event's tenant, stream and
//!   resource (sanitized into legal topic characters).
//! - **Key**: the object id, so that one object's events land in one
//!   partition, in order, and compaction keeps its latest event.
//! - **Value**: the `graphdelta.v1.ChangeEvent` protobuf, bare (`raw`) or
//!   behind the Confluent framing (`confluent`, see [`super::registry`]).
//! - **Headers**: CloudEvents 1.0 Kafka protocol binding, binary content
//!   mode: `ce_specversion`, `ce_id` (the deterministic event id),
//!   `ce_source` (`/graphdelta/<tenant>/<stream>`), `ce_type`
//!   (`graphdelta.v1.user.updated`), `ce_subject` (the object id),
//!   `ce_time` (when the page was received, RFC 3339), `content-type`;
//!   with the Confluent framing also `ce_dataschema` (the registry's URL
//!   of the schema id).
//! - **Timestamp**: the event's `observed_at`.
//! - **Tombstone**: with `sink.tombstones`, a record with the same key and
//!   no value (and no headers) right after each `HARD_DELETED` event.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use prost::Message as _;

use super::{
    config::{KafkaSinkConfig, TopicTemplate, WireFormat},
    registry::SchemaRegistry,
};
use crate::{
    proto::v1::{ChangeEvent, ChangeType, CheckpointRecord},
    sink::{OutBatch, SinkError},
};

/// `content-type` of every event record.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Characters escaped in the tenant and stream parts of `ce_source` (a URI
/// reference): controls, space and the URI delimiters.
const SOURCE_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// One record, ready to hand to the producer.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: Arc<str>,
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, String)>,
    /// Milliseconds since the epoch; `None`: the producer's clock.
    pub timestamp_ms: Option<i64>,
}

/// The Confluent framing of one topic's values.
#[derive(Clone)]
struct Framing {
    prefix: Arc<[u8]>,
    /// The CloudEvents `dataschema`.
    schema_url: String,
}

/// Encodes batches for one sink.
pub struct Encoder {
    template: TopicTemplate,
    tombstones: bool,
    registry: Option<SchemaRegistry>,
    /// (tenant, stream, resource) → topic; a handful of entries.
    topics: Mutex<HashMap<(String, String, String), Arc<str>>>,
}

impl Encoder {
    pub fn new(config: &KafkaSinkConfig) -> Result<Self, SinkError> {
        let template = TopicTemplate::parse(&config.topic).map_err(SinkError::Permanent)?;
        let registry = match (config.wire_format, &config.schema_registry_url) {
            (WireFormat::Confluent, Some(url)) => {
                let password = config
                    .schema_registry_password
                    .as_ref()
                    .map(|s| s.load("sink.schema_registry_password"))
                    .transpose()
                    .map_err(SinkError::Permanent)?;
                Some(SchemaRegistry::new(
                    config.registry_url(url).map_err(SinkError::Permanent)?,
                    config.schema_registry_username.clone(),
                    password,
                    config.delivery_timeout,
                )?)
            }
            (WireFormat::Confluent, None) => {
                return Err(SinkError::Permanent(
                    "sink.wire_format = \"confluent\" needs sink.schema_registry_url".to_string(),
                ));
            }
            (WireFormat::Raw, _) => None,
        };
        Ok(Self {
            template,
            tombstones: config.tombstones,
            registry,
            topics: Mutex::new(HashMap::new()),
        })
    }

    /// The topic of an event.
    pub fn topic_for(&self, event: &ChangeEvent) -> Result<Arc<str>, SinkError> {
        let key = (
            event.tenant_id.clone(),
            event.stream.clone(),
            event.resource.clone(),
        );
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = topics.get(&key) {
            return Ok(t.clone());
        }
        let topic: Arc<str> = self
            .template
            .render(&event.tenant_id, &event.stream, &event.resource)
            .map_err(SinkError::Permanent)?
            .into();
        topics.insert(key, topic.clone());
        Ok(topic)
    }

    /// The records of a batch's events, in order (tombstones right after
    /// their `HARD_DELETED` event).
    pub async fn encode(&self, batch: &OutBatch<'_>) -> Result<Vec<Record>, SinkError> {
        let mut records = Vec::with_capacity(batch.events.len() + batch.events.len() / 8);
        // Per topic (Confluent wire format only).
        let mut framing: HashMap<Arc<str>, Option<Framing>> = HashMap::new();
        // The events as the runtime already encoded them, if it did.
        let encoded = batch
            .encoded
            .and_then(|blob| crate::sink::split_delimited(blob, batch.events.len()));
        for (i, event) in batch.events.iter().enumerate() {
            let topic = self.topic_for(event)?;
            let frame = match framing.get(&topic) {
                Some(f) => f.clone(),
                None => {
                    let f = match &self.registry {
                        Some(r) => {
                            let (id, prefix) = r.prefix_for(&topic).await?;
                            Some(Framing {
                                prefix,
                                schema_url: r.schema_url(id),
                            })
                        }
                        None => None,
                    };
                    framing.insert(topic.clone(), f.clone());
                    f
                }
            };
            let timestamp_ms = event.observed_at.as_ref().map(|t| {
                t.seconds
                    .saturating_mul(1000)
                    .saturating_add(i64::from(t.nanos / 1_000_000))
            });
            let prefix = frame.as_ref().map_or(&[][..], |f| &f.prefix[..]);
            let value = match &encoded {
                Some(messages) => [prefix, messages[i]].concat(),
                None => {
                    let mut value = Vec::with_capacity(event.encoded_len() + prefix.len());
                    value.extend_from_slice(prefix);
                    event
                        .encode(&mut value)
                        .expect("a Vec grows to fit the encoding");
                    value
                }
            };
            let mut headers = cloudevents_headers(event);
            if let Some(f) = frame {
                headers.push(("ce_dataschema", f.schema_url));
            }
            records.push(Record {
                topic: topic.clone(),
                key: event.object_id.clone(),
                value: Some(value),
                headers,
                timestamp_ms,
            });
            if self.tombstones && event.change_type() == ChangeType::HardDeleted {
                records.push(Record {
                    topic,
                    key: event.object_id.clone(),
                    value: None,
                    headers: Vec::new(),
                    timestamp_ms,
                });
            }
        }
        Ok(records)
    }
}

/// The CloudEvents binary-mode headers of an event.
pub fn cloudevents_headers(event: &ChangeEvent) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("ce_specversion", "1.0".to_string()),
        ("ce_id", event.event_id.clone()),
        (
            "ce_source",
            cloudevents_source(&event.tenant_id, &event.stream),
        ),
        ("ce_type", event.cloudevents_type()),
        ("ce_subject", event.object_id.clone()),
    ];
    if let Some(time) = event.observed_at.as_ref().and_then(|t| {
        let nanos = u32::try_from(t.nanos).ok()?;
        let secs = u64::try_from(t.seconds).ok()?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    }) {
        headers.push((
            "ce_time",
            humantime::format_rfc3339_millis(time).to_string(),
        ));
    }
    headers.push(("content-type", CONTENT_TYPE.to_string()));
    headers
}

/// `/graphdelta/<tenant>/<stream>`, each part percent-encoded as a path
/// segment.
pub fn cloudevents_source(tenant: &str, stream: &str) -> String {
    format!(
        "/graphdelta/{}/{}",
        utf8_percent_encode(tenant, SOURCE_SEGMENT),
        utf8_percent_encode(stream, SOURCE_SEGMENT)
    )
}

/// The checkpoint record of a batch: key = stream name, value =
/// `CheckpointRecord { checkpoint, state }`.
pub fn checkpoint_record(topic: &Arc<str>, batch: &OutBatch<'_>) -> Record {
    let value = CheckpointRecord {
        checkpoint: Some(batch.checkpoint.clone()),
        state: Some(batch.writes.to_proto()),
        ..Default::default()
    }
    .encode_to_vec();
    Record {
        topic: topic.clone(),
        key: batch.stream.to_string(),
        value: Some(value),
        headers: vec![
            ("content-type", CONTENT_TYPE.to_string()),
            (
                "graphdelta_message",
                "graphdelta.v1.CheckpointRecord".to_string(),
            ),
        ],
        timestamp_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::{EventsEncoding, StreamCheckpoint};

    fn config(extra: &str) -> KafkaSinkConfig {
        toml::from_str(&format!("brokers = \"k:9092\"\n{extra}")).unwrap()
    }

    fn event(id: &str, change: ChangeType) -> ChangeEvent {
        ChangeEvent {
            event_id: format!("ev-{id}"),
            tenant_id: "contoso.onmicrosoft.com".into(),
            stream: "users".into(),
            resource: "users".into(),
            object_type: "microsoft.graph.user".into(),
            object_id: id.into(),
            change_type: change as i32,
            observed_at: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            }),
            ..Default::default()
        }
    }

    /// The runtime's pre-encoded events give the very records the encoder
    /// makes itself.
    #[tokio::test]
    async fn pre_encoded_events_give_the_same_records() {
        let encoder = Encoder::new(&config("")).unwrap();
        let mut events = vec![
            event("a", ChangeType::Created),
            event("b", ChangeType::HardDeleted),
            event("c", ChangeType::Updated),
        ];
        events[2].properties = Some(crate::proto::JsonStruct::from(
            serde_json::json!({"displayName": "C", "n": 1.5})
                .as_object()
                .unwrap()
                .clone(),
        ));
        let blob = bytes::Bytes::from(crate::sink::encode_events(
            EventsEncoding::ProtobufDelimited,
            &events,
        ));
        let cp = StreamCheckpoint::default();
        let writes = Default::default();
        let batch = |encoded| OutBatch {
            stream: "users",
            seq: 1,
            event_count: events.len(),
            events: &events,
            checkpoint: &cp,
            writes: &writes,
            encoded,
        };
        let plain = encoder.encode(&batch(None)).await.unwrap();
        let pre = encoder.encode(&batch(Some(&blob))).await.unwrap();
        let values = |r: &[Record]| r.iter().map(|r| r.value.clone()).collect::<Vec<_>>();
        assert_eq!(values(&plain), values(&pre));
        assert_eq!(plain.len(), 4);
        // A blob that does not match the events is not used.
        let short = bytes::Bytes::from(crate::sink::encode_events(
            EventsEncoding::ProtobufDelimited,
            &events[..2],
        ));
        let fallback = encoder.encode(&batch(Some(&short))).await.unwrap();
        assert_eq!(values(&plain), values(&fallback));
    }

    #[tokio::test]
    async fn events_become_keyed_records_with_cloudevents_headers() {
        let encoder = Encoder::new(&config("")).unwrap();
        let events = vec![
            event("a", ChangeType::Created),
            event("b", ChangeType::HardDeleted),
        ];
        let cp = StreamCheckpoint::default();
        let batch = OutBatch {
            stream: "users",
            seq: 1,
            event_count: events.len(),
            events: &events,
            checkpoint: &cp,
            writes: &Default::default(),
            encoded: None,
        };
        let records = encoder.encode(&batch).await.unwrap();
        assert_eq!(records.len(), 3, "two events and one tombstone");
        let r = &records[0];
        assert_eq!(&*r.topic, "graphdelta.contoso.onmicrosoft.com.users");
        assert_eq!(r.key, "a");
        assert_eq!(r.timestamp_ms, Some(1_700_000_000_123));
        let decoded = ChangeEvent::decode(r.value.as_deref().unwrap()).unwrap();
        assert_eq!(decoded, events[0]);
        let h: HashMap<_, _> = r.headers.iter().cloned().collect();
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["ce_id"], "ev-a");
        assert_eq!(h["ce_source"], "/graphdelta/contoso.onmicrosoft.com/users");
        assert_eq!(h["ce_type"], "graphdelta.v1.user.created");
        assert_eq!(h["ce_subject"], "a");
        assert_eq!(h["ce_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(h["content-type"], "application/x-protobuf");
        assert_eq!(records[1].key, "b");
        assert_eq!(
            records[1]
                .headers
                .iter()
                .find(|(k, _)| *k == "ce_type")
                .unwrap()
                .1,
            "graphdelta.v1.user.hard_deleted"
        );
        assert_eq!(records[2].key, "b");
        assert_eq!(records[2].value, None);
        assert!(records[2].headers.is_empty());

        let no_tombstones = Encoder::new(&config("tombstones = false")).unwrap();
        assert_eq!(no_tombstones.encode(&batch).await.unwrap().len(), 2);
    }

    #[test]
    fn the_source_escapes_path_delimiters() {
        assert_eq!(
            cloudevents_source("t/1", "all users"),
            "/graphdelta/t%2F1/all%20users"
        );
    }

    #[test]
    fn the_checkpoint_record_carries_the_checkpoint_and_the_state() {
        let cp = StreamCheckpoint {
            stream: "users".into(),
            batch_seq: 7,
            link: "https://graph/delta?x".into(),
            ..Default::default()
        };
        let batch = OutBatch {
            stream: "users",
            seq: 7,
            event_count: 0,
            events: &[],
            checkpoint: &cp,
            writes: &Default::default(),
            encoded: None,
        };
        let r = checkpoint_record(&Arc::from("graphdelta.checkpoints"), &batch);
        assert_eq!(r.key, "users");
        let back = CheckpointRecord::decode(r.value.as_deref().unwrap()).unwrap();
        assert_eq!(back.checkpoint.unwrap(), cp);
        assert!(back.state.is_some());
    }
}
