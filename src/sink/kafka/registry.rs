//! The Confluent Schema Registry client behind `wire_format = "confluent"`.
//!
//! Before the first record of a topic, the `graphdelta.v1` event schema is
//! registered under the subject `<topic>-value` (TopicNameStrategy) through
//! the REST API, as Confluent's own protobuf serializer does: first each
//! imported `google/protobuf/*.proto` under a subject named like the import,
//! then `change_event.proto` with references to them. Registering an
//! identical schema again returns the existing id, so restarts are harmless.
//! The id is cached per topic for the life of the process.
//!
//! The framing written before each protobuf value is
//! `0x00 | schema id (4 bytes, big endian) | message indexes`, where the
//! message indexes locate `ChangeEvent` among the messages of its file as a
//! zig-zag varint count followed by zig-zag varint indexes.

use std::{collections::HashMap, sync::Arc, time::Duration};

use prost::Message as _;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::{proto, sink::SinkError};

/// `proto/graphdelta/v1/change_event.proto`, as registered.
pub const CHANGE_EVENT_PROTO: &str =
    include_str!("../../../proto/graphdelta/v1/change_event.proto");

/// The well-known types `change_event.proto` imports, registered as
/// references (import path, text).
pub const REFERENCES: &[(&str, &str)] = &[
    (
        "google/protobuf/struct.proto",
        include_str!("../../../proto/third_party/google/protobuf/struct.proto"),
    ),
    (
        "google/protobuf/timestamp.proto",
        include_str!("../../../proto/third_party/google/protobuf/timestamp.proto"),
    ),
];

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A registered schema: its id and the framing prefix of its values.
type Registered = (u32, Arc<[u8]>);

/// A Schema Registry with the ids it handed out.
pub struct SchemaRegistry {
    base: Url,
    http: reqwest::Client,
    username: Option<String>,
    password: Option<SecretString>,
    /// Subject → framing prefix (magic byte, id, message indexes).
    prefixes: tokio::sync::Mutex<HashMap<String, Registered>>,
    /// Versions of the registered references, once known.
    references: tokio::sync::OnceCell<Vec<serde_json::Value>>,
    message_indexes: Vec<u8>,
}

#[derive(Deserialize)]
struct IdResponse {
    id: u32,
}

#[derive(Deserialize)]
struct VersionResponse {
    version: i64,
}

#[derive(Deserialize)]
struct ErrorResponse {
    #[serde(default)]
    error_code: i64,
    #[serde(default)]
    message: String,
}

impl SchemaRegistry {
    pub fn new(
        base: Url,
        username: Option<String>,
        password: Option<SecretString>,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("graphdelta/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Permanent(format!("schema registry client: {e}")))?;
        Ok(Self {
            base,
            http,
            username,
            password,
            prefixes: Default::default(),
            references: Default::default(),
            message_indexes: change_event_message_indexes(),
        })
    }

    /// The framing prefix for values of `topic`, registering the schema
    /// under `<topic>-value` the first time; also returns the schema id.
    pub async fn prefix_for(&self, topic: &str) -> Result<Registered, SinkError> {
        let subject = format!("{topic}-value");
        let mut prefixes = self.prefixes.lock().await;
        if let Some(p) = prefixes.get(&subject) {
            return Ok(p.clone());
        }
        let references = self
            .references
            .get_or_try_init(|| self.register_references())
            .await?;
        let body = serde_json::json!({
            "schemaType": "PROTOBUF",
            "schema": CHANGE_EVENT_PROTO,
            "references": references,
        });
        let id = self.register(&subject, &body).await?;
        let mut prefix = Vec::with_capacity(5 + self.message_indexes.len());
        prefix.push(0u8);
        prefix.extend_from_slice(&id.to_be_bytes());
        prefix.extend_from_slice(&self.message_indexes);
        let entry = (id, Arc::<[u8]>::from(prefix));
        tracing::info!(subject = %subject, schema_id = id, "Event schema registered.");
        prefixes.insert(subject, entry.clone());
        Ok(entry)
    }

    /// `<registry>/schemas/ids/<id>`: the CloudEvents `dataschema`.
    pub fn schema_url(&self, id: u32) -> String {
        format!(
            "{}/schemas/ids/{id}",
            self.base.as_str().trim_end_matches('/')
        )
    }

    async fn register_references(&self) -> Result<Vec<serde_json::Value>, SinkError> {
        let mut refs = Vec::new();
        for (name, text) in REFERENCES {
            let body = serde_json::json!({ "schemaType": "PROTOBUF", "schema": text });
            self.register(name, &body).await?;
            let found: VersionResponse = self.post(&[*name], &body).await?;
            refs.push(serde_json::json!({
                "name": name,
                "subject": name,
                "version": found.version,
            }));
        }
        Ok(refs)
    }

    async fn register(&self, subject: &str, body: &serde_json::Value) -> Result<u32, SinkError> {
        let r: IdResponse = self.post(&[subject, "versions"], body).await?;
        Ok(r.id)
    }

    /// POSTs to `/subjects/<segments...>`.
    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        segments: &[&str],
        body: &serde_json::Value,
    ) -> Result<T, SinkError> {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().map_err(|_| {
                SinkError::Permanent(format!(
                    "sink.schema_registry_url `{}` cannot be a base URL",
                    self.base
                ))
            })?;
            path.pop_if_empty().push("subjects");
            for s in segments {
                path.push(s);
            }
        }
        let mut request = self
            .http
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .body(body.to_string());
        if let Some(user) = &self.username {
            request = request.basic_auth(user, self.password.as_ref().map(|p| p.expose_secret()));
        }
        let subject = segments.first().copied().unwrap_or_default();
        let response = request.send().await.map_err(|e| {
            SinkError::Retriable(format!(
                "schema registry {}: cannot register subject `{subject}`: {e}",
                self.base
            ))
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            SinkError::Retriable(format!(
                "schema registry {}: subject `{subject}`: reading the response: {e}",
                self.base
            ))
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                SinkError::Permanent(format!(
                    "schema registry {}: subject `{subject}`: unexpected response ({e}); is sink.schema_registry_url a Confluent-compatible Schema Registry?",
                    self.base
                ))
            });
        }
        let detail = serde_json::from_slice::<ErrorResponse>(&bytes)
            .map(|e| format!("{} (error_code {})", e.message, e.error_code))
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(300).collect());
        let message = format!(
            "schema registry {}: registering subject `{subject}` failed with HTTP {status}: {detail}",
            self.base
        );
        Err(match status.as_u16() {
            401 | 403 => SinkError::Permanent(format!(
                "{message}; check sink.schema_registry_username and sink.schema_registry_password"
            )),
            409 => SinkError::Permanent(format!(
                "{message}; the subject's compatibility rules refuse this schema: check the subject's compatibility level or use another topic"
            )),
            408 | 429 => SinkError::Retriable(message),
            s if s >= 500 => SinkError::Retriable(message),
            _ => SinkError::Permanent(message),
        })
    }
}

/// The Confluent message-index list that locates `ChangeEvent` in its file,
/// derived from the descriptor set so that adding a message to the file
/// cannot silently shift it.
pub fn change_event_message_indexes() -> Vec<u8> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes");
    let file = set
        .file
        .iter()
        .find(|f| f.name() == "graphdelta/v1/change_event.proto")
        .expect("change_event.proto is in the descriptor set");
    let index = file
        .message_type
        .iter()
        .position(|m| m.name() == "ChangeEvent")
        .expect("ChangeEvent is in change_event.proto");
    encode_message_indexes(&[index as i32])
}

/// Confluent's `MessageIndexes` encoding: `[0]` is the single byte 0,
/// otherwise a zig-zag varint count and zig-zag varint indexes.
pub fn encode_message_indexes(indexes: &[i32]) -> Vec<u8> {
    let mut out = Vec::new();
    if indexes == [0] {
        out.push(0);
        return out;
    }
    put_zigzag(&mut out, indexes.len() as i32);
    for i in indexes {
        put_zigzag(&mut out, *i);
    }
    out
}

fn put_zigzag(out: &mut Vec<u8>, v: i32) {
    let mut n = ((v << 1) ^ (v >> 31)) as u32;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_indexes_follow_confluent() {
        assert_eq!(encode_message_indexes(&[0]), vec![0]);
        assert_eq!(encode_message_indexes(&[1]), vec![2, 2]);
        assert_eq!(encode_message_indexes(&[0, 2]), vec![4, 0, 4]);
        assert_eq!(encode_message_indexes(&[64]), vec![2, 0x80, 0x01]);
        // MemberChange is the first message of the file, ChangeEvent the second.
        assert_eq!(change_event_message_indexes(), vec![2, 2]);
    }

    #[test]
    fn the_registered_text_is_the_compiled_schema() {
        assert!(CHANGE_EVENT_PROTO.contains("message ChangeEvent"));
        for (name, text) in REFERENCES {
            assert!(CHANGE_EVENT_PROTO.contains(&format!("import \"{name}\"")));
            assert!(text.contains("package google.protobuf;"));
        }
    }
}
