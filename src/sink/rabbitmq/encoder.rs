//! One [`ChangeEvent`] → one AMQP message: routing key, properties,
//! CloudEvents headers and the protobuf body.
//!
//! The message follows the CloudEvents AMQP binding in binary mode: the body
//! is the event data (the `graphdelta.v1.ChangeEvent` protobuf), the
//! `content_type` property is its media type, and every other CloudEvents
//! attribute is an application property (header) prefixed `cloudEvents_`.
//! A consumer can therefore filter and route on headers, the `type`
//! property and the routing key without decoding the body.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use prost::Message;

use super::config::{Field, Part, RoutingKeyTemplate};
use crate::proto::v1::ChangeEvent;

/// The body's media type.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// The `app_id` property of every message.
pub const APP_ID: &str = "graphdelta";
/// The CloudEvents version of the headers.
pub const SPEC_VERSION: &str = "1.0";
/// The `cloudEvents_dataschema` header: the protobuf message of the body.
pub const DATA_SCHEMA: &str = "urn:graphdelta:proto:graphdelta.v1.ChangeEvent";

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub routing_key: ShortString,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

/// Why an event cannot become a message (no retry helps).
#[derive(Debug, thiserror::Error)]
#[error("event {event_id} (object {object_id}): {reason}")]
pub struct EncodeError {
    pub event_id: String,
    pub object_id: String,
    pub reason: String,
}

/// Turns events into messages with the configured routing key.
#[derive(Debug, Clone)]
pub struct Encoder {
    template: RoutingKeyTemplate,
}

impl Encoder {
    pub(crate) fn new(template: RoutingKeyTemplate) -> Self {
        Self { template }
    }

    /// The routing key of `event`: the template with each value's `.`
    /// replaced by `_` (a value stays one word of a topic pattern).
    pub fn routing_key(&self, event: &ChangeEvent) -> String {
        let mut key = String::with_capacity(64);
        for part in &self.template.parts {
            match part {
                Part::Literal(s) => key.push_str(s),
                Part::Field(f) => {
                    let value = match f {
                        Field::Tenant => event.tenant_id.as_str(),
                        Field::Stream => event.stream.as_str(),
                        Field::Resource => event.resource.as_str(),
                        Field::Type => short_type(&event.object_type),
                        Field::Change => event.change_type().short_name(),
                    };
                    key.extend(value.chars().map(|c| if c == '.' { '_' } else { c }));
                }
            }
        }
        key
    }

    pub fn encode(&self, event: &ChangeEvent) -> Result<Encoded, EncodeError> {
        self.encode_with(event, None)
    }

    /// As [`Encoder::encode`], with the event's protobuf encoding if the
    /// runtime already made it.
    pub fn encode_with(
        &self,
        event: &ChangeEvent,
        encoded: Option<&[u8]>,
    ) -> Result<Encoded, EncodeError> {
        let fail = |reason: String| EncodeError {
            event_id: event.event_id.clone(),
            object_id: event.object_id.clone(),
            reason,
        };
        let key = self.routing_key(event);
        let key_len = key.len();
        let routing_key = ShortString::try_new(key).map_err(|_| {
            fail(format!(
                "its routing key is {key_len} bytes long, AMQP allows 255; shorten sink.routing_key"
            ))
        })?;
        let ce_type = event.cloudevents_type();
        let short = |what: &str, v: String| {
            ShortString::try_new(v)
                .map_err(|_| fail(format!("its {what} is longer than 255 bytes")))
        };
        let observed = event.observed_at.unwrap_or_default();
        // RFC 3339 with the fraction of a second Graph's clock gave us.
        let time = prost_types::Timestamp {
            seconds: observed.seconds,
            nanos: observed.nanos,
        }
        .to_string();
        let mut headers = FieldTable::default();
        let mut put = |k: &str, v: AMQPValue| {
            headers.insert(k.into(), v);
        };
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        put("cloudEvents_specversion", text(SPEC_VERSION));
        put("cloudEvents_id", text(&event.event_id));
        put(
            "cloudEvents_source",
            text(&format!("/graphdelta/{}/{}", event.tenant_id, event.stream)),
        );
        put("cloudEvents_type", text(&ce_type));
        put("cloudEvents_subject", text(&event.object_id));
        put("cloudEvents_time", text(&time));
        put("cloudEvents_dataschema", text(DATA_SCHEMA));
        put("graphdelta_tenant", text(&event.tenant_id));
        put("graphdelta_stream", text(&event.stream));
        put("graphdelta_resource", text(&event.resource));
        put("graphdelta_object_type", text(&event.object_type));
        put("graphdelta_change", text(event.change_type().short_name()));
        put(
            "graphdelta_object_version",
            AMQPValue::LongLongInt(i64::try_from(event.object_version).unwrap_or(i64::MAX)),
        );
        put("graphdelta_snapshot", AMQPValue::Boolean(event.snapshot));
        put("graphdelta_inferred", AMQPValue::Boolean(event.inferred));

        let properties = BasicProperties::default()
            // 2 = persistent: written to disk by classic queues (quorum and
            // stream queues persist everything); a confirm for a transient
            // message would promise nothing after a broker restart.
            .with_delivery_mode(2)
            .with_content_type(CONTENT_TYPE.into())
            .with_message_id(short("event id", event.event_id.clone())?)
            .with_type(short("CloudEvents type", ce_type)?)
            .with_timestamp(u64::try_from(observed.seconds).unwrap_or(0))
            .with_app_id(APP_ID.into())
            .with_headers(headers);
        Ok(Encoded {
            routing_key,
            properties,
            body: encoded.map_or_else(|| event.encode_to_vec(), <[u8]>::to_vec),
        })
    }
}

/// `microsoft.graph.user` → `user`.
fn short_type(object_type: &str) -> &str {
    object_type
        .rsplit('.')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("directoryObject")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::ChangeType;

    fn event() -> ChangeEvent {
        ChangeEvent {
            event_id: "4b0d6a4e-0000-5000-8000-000000000001".into(),
            tenant_id: "contoso.onmicrosoft.com".into(),
            stream: "users.eu".into(),
            resource: "users".into(),
            object_type: "microsoft.graph.user".into(),
            object_id: "u-1".into(),
            change_type: ChangeType::HardDeleted as i32,
            object_version: 7,
            observed_at: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn routing_key_keeps_one_word_per_placeholder() {
        let enc = Encoder::new(RoutingKeyTemplate::parse("{tenant}.{stream}.{change}").unwrap());
        assert_eq!(
            enc.routing_key(&event()),
            "contoso_onmicrosoft_com.users_eu.hard_deleted"
        );
        let enc = Encoder::new(RoutingKeyTemplate::parse("gd.{resource}.{type}.{change}").unwrap());
        assert_eq!(enc.routing_key(&event()), "gd.users.user.hard_deleted");
    }

    #[test]
    fn a_pre_encoded_body_is_the_body() {
        let enc = Encoder::new(RoutingKeyTemplate::parse("{tenant}.{stream}.{change}").unwrap());
        let plain = enc.encode(&event()).unwrap();
        let body = event().encode_to_vec();
        let pre = enc.encode_with(&event(), Some(&body)).unwrap();
        assert_eq!(plain.body, pre.body);
        assert_eq!(plain.properties, pre.properties);
        assert_eq!(plain.routing_key, pre.routing_key);
    }

    #[test]
    fn properties_and_headers() {
        let enc = Encoder::new(RoutingKeyTemplate::parse("{tenant}.{stream}.{change}").unwrap());
        let m = enc.encode(&event()).unwrap();
        let p = &m.properties;
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(p.content_type().as_ref().unwrap().as_str(), CONTENT_TYPE);
        assert_eq!(
            p.message_id().as_ref().unwrap().as_str(),
            "4b0d6a4e-0000-5000-8000-000000000001"
        );
        assert_eq!(
            p.kind().as_ref().unwrap().as_str(),
            "graphdelta.v1.user.hard_deleted"
        );
        assert_eq!(*p.timestamp(), Some(1_700_000_000));
        let h = p.headers().as_ref().unwrap().inner();
        let s = |k: &str| match h.get(k) {
            Some(AMQPValue::LongString(v)) => v.to_string(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(s("cloudEvents_specversion"), "1.0");
        assert_eq!(
            s("cloudEvents_source"),
            "/graphdelta/contoso.onmicrosoft.com/users.eu"
        );
        assert_eq!(s("cloudEvents_subject"), "u-1");
        assert_eq!(s("cloudEvents_time"), "2023-11-14T22:13:20.500Z");
        assert_eq!(s("graphdelta_change"), "hard_deleted");
        assert_eq!(
            h.get("graphdelta_object_version"),
            Some(&AMQPValue::LongLongInt(7))
        );
        assert_eq!(ChangeEvent::decode(&m.body[..]).unwrap(), event());
    }

    #[test]
    fn an_overlong_routing_key_is_an_error_not_a_panic() {
        let enc = Encoder::new(RoutingKeyTemplate::parse("{stream}").unwrap());
        let mut e = event();
        e.stream = "s".repeat(300);
        let err = enc.encode(&e).unwrap_err().to_string();
        assert!(err.contains("255") && err.contains("u-1"), "{err}");
    }
}
