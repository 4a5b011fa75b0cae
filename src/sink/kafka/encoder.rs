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
    /// Values alike for many records (spec version, source, type, time,
    /// content type) are shared, not made again for each.
    pub headers: Vec<(&'static str, Arc<str>)>,
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
        let mut shared = SharedHeaders::default();
        // The last event's topic: a batch's events are one stream's.
        let mut last: Option<(&ChangeEvent, Arc<str>)> = None;
        for (i, event) in batch.events.iter().enumerate() {
            let topic = match &last {
                Some((e, topic))
                    if e.tenant_id == event.tenant_id
                        && e.stream == event.stream
                        && e.resource == event.resource =>
                {
                    topic.clone()
                }
                _ => self.topic_for(event)?,
            };
            last = Some((event, topic.clone()));
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
            let mut headers = shared.headers(event);
            if let Some(f) = frame {
                headers.push(("ce_dataschema", f.schema_url.into()));
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
pub fn cloudevents_headers(event: &ChangeEvent) -> Vec<(&'static str, Arc<str>)> {
    SharedHeaders::default().headers(event)
}

/// Makes the CloudEvents headers of a batch's events. What is alike for
/// many of them (spec version, content type, and the last source, type and
/// time) is made once and shared: formatting the source, type and time of
/// every event cost ≈ 3k instructions an event (callgrind, Kafka sink).
#[derive(Default)]
struct SharedHeaders {
    fixed: Option<(Arc<str>, Arc<str>)>,
    /// (tenant, stream) and its source.
    source: Option<(String, String, Arc<str>)>,
    /// (object type, change type) and its event type.
    kind: Option<(String, i32, Arc<str>)>,
    /// `observedAt` (seconds, nanos) and its text (`None`: out of
    /// range, no header).
    time: Option<(i64, i32, Option<Arc<str>>)>,
}

impl SharedHeaders {
    fn headers(&mut self, event: &ChangeEvent) -> Vec<(&'static str, Arc<str>)> {
        let (spec, content_type) = self
            .fixed
            .get_or_insert_with(|| (Arc::from("1.0"), Arc::from(CONTENT_TYPE)))
            .clone();
        let source = match &self.source {
            Some((tenant, stream, source))
                if *tenant == event.tenant_id && *stream == event.stream =>
            {
                source.clone()
            }
            _ => {
                let source: Arc<str> = cloudevents_source(&event.tenant_id, &event.stream).into();
                self.source = Some((
                    event.tenant_id.clone(),
                    event.stream.clone(),
                    source.clone(),
                ));
                source
            }
        };
        let kind = match &self.kind {
            Some((object_type, change, kind))
                if *object_type == event.object_type && *change == event.change_type =>
            {
                kind.clone()
            }
            _ => {
                let kind: Arc<str> = event.cloudevents_type().into();
                self.kind = Some((event.object_type.clone(), event.change_type, kind.clone()));
                kind
            }
        };
        let mut headers = Vec::with_capacity(8);
        headers.push(("ce_specversion", spec));
        headers.push(("ce_id", Arc::from(event.event_id.as_str())));
        headers.push(("ce_source", source));
        headers.push(("ce_type", kind));
        headers.push(("ce_subject", Arc::from(event.object_id.as_str())));
        if let Some(t) = &event.observed_at {
            let time = match &self.time {
                Some((seconds, nanos, time)) if (*seconds, *nanos) == (t.seconds, t.nanos) => {
                    time.clone()
                }
                _ => {
                    let time = time_header(t.seconds, t.nanos);
                    self.time = Some((t.seconds, t.nanos, time.clone()));
                    time
                }
            };
            if let Some(time) = time {
                headers.push(("ce_time", time));
            }
        }
        headers.push(("content-type", content_type));
        headers
    }
}

/// `ce_time`: RFC 3339 in UTC, to the millisecond; `None` out of range.
fn time_header(seconds: i64, nanos: i32) -> Option<Arc<str>> {
    let nanos = u32::try_from(nanos).ok()?;
    let secs = u64::try_from(seconds).ok()?;
    let time = SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))?;
    Some(humantime::format_rfc3339_millis(time).to_string().into())
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
            ("content-type", CONTENT_TYPE.into()),
            (
                "graphdelta_message",
                "graphdelta.v1.CheckpointRecord".into(),
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

    /// A batch of `events`, not encoded beforehand.
    fn batch_of<'a>(events: &'a [ChangeEvent], cp: &'a StreamCheckpoint) -> OutBatch<'a> {
        OutBatch {
            stream: "users",
            seq: 1,
            event_count: events.len(),
            events,
            checkpoint: cp,
            writes: &EMPTY_WRITES,
            encoded: None,
        }
    }

    static EMPTY_WRITES: std::sync::LazyLock<crate::normalize::memory::StateWrites> =
        std::sync::LazyLock::new(Default::default);

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
        let batch = batch_of(&events, &cp);
        let records = encoder.encode(&batch).await.unwrap();
        assert_eq!(records.len(), 3, "two events and one tombstone");
        let r = &records[0];
        assert_eq!(&*r.topic, "graphdelta.contoso.onmicrosoft.com.users");
        assert_eq!(r.key, "a");
        assert_eq!(r.timestamp_ms, Some(1_700_000_000_123));
        let decoded = ChangeEvent::decode(r.value.as_deref().unwrap()).unwrap();
        assert_eq!(decoded, events[0]);
        let h: HashMap<_, _> = r.headers.iter().map(|(k, v)| (*k, &**v)).collect();
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
                .map(|(_, v)| &**v)
                .unwrap(),
            "graphdelta.v1.user.hard_deleted"
        );
        assert_eq!(records[2].key, "b");
        assert_eq!(records[2].value, None);
        assert!(records[2].headers.is_empty());

        let no_tombstones = Encoder::new(&config("tombstones = false")).unwrap();
        assert_eq!(no_tombstones.encode(&batch).await.unwrap().len(), 2);
    }

    /// Headers and topics shared within a batch are those each event
    /// gets on its own, whichever of its parts changes from one event to
    /// the next.
    #[tokio::test]
    async fn shared_headers_and_topics_are_each_events_own() {
        let encoder = Encoder::new(&config("topic = \"t.{tenant}.{stream}.{resource}\"")).unwrap();
        let base = event("a", ChangeType::Created);
        let mut events = Vec::new();
        for i in 0..24u32 {
            let mut e = event(&format!("o{i}"), ChangeType::Created);
            if i % 2 == 1 {
                e.change_type = ChangeType::Updated as i32;
            }
            if i % 3 == 1 {
                e.object_type = "microsoft.graph.group".into();
            }
            if i % 4 == 2 {
                e.stream = "other".into();
            }
            if i % 5 == 3 {
                e.tenant_id = "fabrikam".into();
            }
            if i % 6 == 4 {
                e.resource = "groups".into();
            }
            if i % 7 == 5 {
                e.observed_at.as_mut().unwrap().nanos += 1_000_000;
            }
            if i % 8 == 6 {
                e.observed_at = None;
            }
            if i % 9 == 7 {
                if let Some(t) = e.observed_at.as_mut() {
                    t.seconds = -5;
                }
            }
            events.push(e);
        }
        events.push(base);
        let cp = StreamCheckpoint::default();
        let batch = batch_of(&events, &cp);
        let records = encoder.encode(&batch).await.unwrap();
        assert_eq!(records.len(), events.len());
        for (r, e) in records.iter().zip(&events) {
            assert_eq!(r.topic, encoder.topic_for(e).unwrap());
            assert_eq!(r.headers, cloudevents_headers(e), "{}", e.object_id);
            let h: HashMap<_, _> = r.headers.iter().map(|(k, v)| (*k, &**v)).collect();
            assert_eq!(h["ce_id"], e.event_id);
            assert_eq!(h["ce_subject"], e.object_id);
            assert_eq!(h["ce_type"], e.cloudevents_type());
            assert_eq!(h["ce_source"], cloudevents_source(&e.tenant_id, &e.stream));
            let t = e.observed_at.filter(|t| t.seconds >= 0);
            assert_eq!(
                h.get("ce_time").copied(),
                t.map(|t| humantime::format_rfc3339_millis(
                    SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
                )
                .to_string())
                    .as_deref()
            );
        }
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
