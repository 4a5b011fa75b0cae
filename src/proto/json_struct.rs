//! `google.protobuf.Struct`, held as the JSON object's members ([`Fields`]).
//!
//! The properties of every event travel as a `Struct`. pbjson's `Struct`
//! keeps a `HashMap<String, Value>` of wrapper enums: building one per
//! object and serializing it again cost a fifth of the pipeline's CPU. This
//! type keeps the JSON object Graph sent, as parsed, and speaks the Struct
//! wire format (`map<string, Value> fields = 1`) and its canonical JSON
//! mapping (a plain JSON object) itself.
//!
//! Numbers are protobuf doubles on the wire (as in any `Struct`); decoding
//! turns integral doubles back into JSON integers.

use bytes::{Buf, BufMut};
use prost::{
    DecodeError, Message,
    encoding::{
        DecodeContext, WireType, double, encode_key, encode_varint, encoded_len_varint, int32,
        key_len, message, skip_field, string,
    },
};
use serde_json::{Map, Number, Value};

use super::{Fields, fields::FieldValue};

/// A `google.protobuf.Struct`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonStruct {
    pub fields: Fields,
}

impl From<Fields> for JsonStruct {
    fn from(fields: Fields) -> Self {
        JsonStruct { fields }
    }
}

impl From<Map<String, Value>> for JsonStruct {
    fn from(map: Map<String, Value>) -> Self {
        JsonStruct {
            fields: Fields::from(map),
        }
    }
}

// Field numbers of google/protobuf/struct.proto.
const STRUCT_FIELDS: u32 = 1;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
const VALUE_NULL: u32 = 1;
const VALUE_NUMBER: u32 = 2;
const VALUE_STRING: u32 = 3;
const VALUE_BOOL: u32 = 4;
const VALUE_STRUCT: u32 = 5;
const VALUE_LIST: u32 = 6;
const LIST_VALUES: u32 = 1;

/// A field's key: one byte, as every field number here is below 16.
/// prost's `encode_key` goes through a general varint writer, ten times
/// per property (≈ 100 varints an event, a tenth of the Kafka path's
/// instructions with the lengths below, callgrind).
#[inline(always)]
fn put_key(tag: u32, wire_type: WireType, buf: &mut impl BufMut) {
    debug_assert!(tag < 16);
    buf.put_u8(((tag << 3) | wire_type as u32) as u8);
}

/// A length: one byte below 128 (nearly every one), else a varint.
#[inline(always)]
fn put_len(len: usize, buf: &mut impl BufMut) {
    if len < 0x80 {
        buf.put_u8(len as u8);
    } else {
        encode_varint(len as u64, buf);
    }
}

fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// What the entries of a `Struct` hold: a nested map's `Value`s, or the
/// top level's [`FieldValue`]s.
trait StructValue {
    /// Length of its `Value` message (the body).
    fn message_len(&self) -> usize;
    /// Encodes its `Value` message body.
    fn encode_message(&self, buf: &mut impl BufMut);
}

impl StructValue for Value {
    fn message_len(&self) -> usize {
        value_len(self)
    }

    fn encode_message(&self, buf: &mut impl BufMut) {
        encode_value(self, buf);
    }
}

impl StructValue for FieldValue {
    fn message_len(&self) -> usize {
        match self {
            FieldValue::Str(s) => delimited_len(VALUE_STRING, s.len()),
            FieldValue::Json(v) => value_len(v),
        }
    }

    fn encode_message(&self, buf: &mut impl BufMut) {
        match self {
            FieldValue::Str(s) => encode_string(s, buf),
            FieldValue::Json(v) => encode_value(v, buf),
        }
    }
}

/// A JSON object's members: a nested `Map`, or the top level's [`Fields`].
fn map_len<'a, K: AsRef<str>, V: StructValue + 'a>(
    map: impl IntoIterator<Item = (K, &'a V)>,
) -> usize {
    map.into_iter()
        .map(|(k, v)| delimited_len(STRUCT_FIELDS, entry_len(k.as_ref(), v)))
        .sum()
}

fn entry_len(key: &str, value: &impl StructValue) -> usize {
    delimited_len(ENTRY_KEY, key.len()) + delimited_len(ENTRY_VALUE, value.message_len())
}

fn list_len(items: &[Value]) -> usize {
    items
        .iter()
        .map(|v| delimited_len(LIST_VALUES, value_len(v)))
        .sum()
}

/// Length of a `Value` message (its body).
fn value_len(value: &Value) -> usize {
    match value {
        Value::Null => key_len(VALUE_NULL) + 1,
        Value::Number(_) => key_len(VALUE_NUMBER) + 8,
        Value::String(s) => delimited_len(VALUE_STRING, s.len()),
        Value::Bool(_) => key_len(VALUE_BOOL) + 1,
        Value::Object(m) => delimited_len(VALUE_STRUCT, map_len(m)),
        Value::Array(a) => delimited_len(VALUE_LIST, list_len(a)),
    }
}

fn encode_map<'a, K: AsRef<str>, V: StructValue + 'a>(
    map: impl IntoIterator<Item = (K, &'a V)>,
    buf: &mut impl BufMut,
) {
    for (k, v) in map {
        let k = k.as_ref();
        put_key(STRUCT_FIELDS, WireType::LengthDelimited, buf);
        put_len(entry_len(k, v), buf);
        put_key(ENTRY_KEY, WireType::LengthDelimited, buf);
        put_len(k.len(), buf);
        buf.put_slice(k.as_bytes());
        put_key(ENTRY_VALUE, WireType::LengthDelimited, buf);
        put_len(v.message_len(), buf);
        v.encode_message(buf);
    }
}

fn encode_string(s: &str, buf: &mut impl BufMut) {
    put_key(VALUE_STRING, WireType::LengthDelimited, buf);
    put_len(s.len(), buf);
    buf.put_slice(s.as_bytes());
}

/// Encodes a `Value` message body.
fn encode_value(value: &Value, buf: &mut impl BufMut) {
    match value {
        Value::Null => {
            put_key(VALUE_NULL, WireType::Varint, buf);
            buf.put_u8(0);
        }
        Value::Number(n) => {
            put_key(VALUE_NUMBER, WireType::SixtyFourBit, buf);
            buf.put_f64_le(n.as_f64().unwrap_or(f64::NAN));
        }
        Value::String(s) => encode_string(s, buf),
        Value::Bool(b) => {
            put_key(VALUE_BOOL, WireType::Varint, buf);
            buf.put_u8(*b as u8);
        }
        Value::Object(m) => {
            put_key(VALUE_STRUCT, WireType::LengthDelimited, buf);
            put_len(map_len(m), buf);
            encode_map(m, buf);
        }
        Value::Array(a) => {
            put_key(VALUE_LIST, WireType::LengthDelimited, buf);
            put_len(list_len(a), buf);
            for v in a {
                put_key(LIST_VALUES, WireType::LengthDelimited, buf);
                put_len(value_len(v), buf);
                encode_value(v, buf);
            }
        }
    }
}

// Decoding goes through small `Message` wrappers so that prost's
// `message::merge` handles length prefixes and the recursion limit.

/// One `map<string, Value>` entry.
#[derive(Debug, Default)]
struct EntryMsg {
    key: String,
    value: ValueMsg,
}

/// A `google.protobuf.Value`.
#[derive(Debug, Default)]
struct ValueMsg(Value);

/// A `google.protobuf.ListValue`.
#[derive(Debug, Default)]
struct ListMsg(Vec<Value>);

impl Message for EntryMsg {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_key(ENTRY_KEY, WireType::LengthDelimited, buf);
        encode_varint(self.key.len() as u64, buf);
        buf.put_slice(self.key.as_bytes());
        encode_key(ENTRY_VALUE, WireType::LengthDelimited, buf);
        encode_varint(value_len(&self.value.0) as u64, buf);
        encode_value(&self.value.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            ENTRY_KEY => string::merge(wire_type, &mut self.key, buf, ctx),
            ENTRY_VALUE => message::merge(wire_type, &mut self.value, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        entry_len(&self.key, &self.value.0)
    }

    fn clear(&mut self) {
        *self = EntryMsg::default();
    }
}

impl Message for ValueMsg {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_value(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        self.0 = match tag {
            VALUE_NULL => {
                let mut null = 0i32;
                int32::merge(wire_type, &mut null, buf, ctx)?;
                Value::Null
            }
            VALUE_NUMBER => {
                let mut f = 0f64;
                double::merge(wire_type, &mut f, buf, ctx)?;
                number(f)
            }
            VALUE_STRING => {
                let mut s = String::new();
                string::merge(wire_type, &mut s, buf, ctx)?;
                Value::String(s)
            }
            VALUE_BOOL => {
                let mut b = false;
                prost::encoding::bool::merge(wire_type, &mut b, buf, ctx)?;
                Value::Bool(b)
            }
            VALUE_STRUCT => {
                let mut s = JsonStruct::default();
                message::merge(wire_type, &mut s, buf, ctx)?;
                Value::Object(s.fields.into_map())
            }
            VALUE_LIST => {
                let mut l = ListMsg::default();
                message::merge(wire_type, &mut l, buf, ctx)?;
                Value::Array(l.0)
            }
            _ => return skip_field(wire_type, tag, buf, ctx),
        };
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        value_len(&self.0)
    }

    fn clear(&mut self) {
        self.0 = Value::Null;
    }
}

impl Message for ListMsg {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for v in &self.0 {
            encode_key(LIST_VALUES, WireType::LengthDelimited, buf);
            encode_varint(value_len(v) as u64, buf);
            encode_value(v, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == LIST_VALUES {
            let mut v = ValueMsg::default();
            message::merge(wire_type, &mut v, buf, ctx)?;
            self.0.push(v.0);
            Ok(())
        } else {
            skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        list_len(&self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A protobuf double as JSON: integral values as integers.
fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

impl Message for JsonStruct {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_map(&self.fields, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == STRUCT_FIELDS {
            let mut entry = EntryMsg::default();
            message::merge(wire_type, &mut entry, buf, ctx)?;
            self.fields.insert(entry.key, entry.value.0);
            Ok(())
        } else {
            skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        map_len(&self.fields)
    }

    fn clear(&mut self) {
        self.fields.clear();
    }
}

impl serde::Serialize for JsonStruct {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.fields.serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for JsonStruct {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Fields::deserialize(deserializer).map(|fields| JsonStruct { fields })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> JsonStruct {
        let v = json!({
            "displayName": "Adele Vance",
            "accountEnabled": true,
            "mobilePhone": null,
            "businessPhones": ["+1 425 555 0109", ""],
            "age": 42,
            "ratio": 0.25,
            "nested": {"a": [1, {"b": null}], "c": "ü\"\n"},
            "empty": {},
            "none": []
        });
        JsonStruct::from(v.as_object().unwrap().clone())
    }

    #[test]
    fn wire_format_is_google_protobuf_struct() {
        let ours = sample();
        let bytes = ours.encode_to_vec();
        assert_eq!(bytes.len(), ours.encoded_len());
        // pbjson's (prost's) own Struct decodes it to the same values.
        let theirs = pbjson_types::Struct::decode(bytes.as_slice()).unwrap();
        // pbjson prints every number as a double (42.0); the same JSON
        // number as ours (42).
        fn doubles(v: serde_json::Value) -> serde_json::Value {
            match v {
                Value::Number(n) => json!(n.as_f64().unwrap()),
                Value::Array(a) => Value::Array(a.into_iter().map(doubles).collect()),
                Value::Object(m) => {
                    Value::Object(m.into_iter().map(|(k, v)| (k, doubles(v))).collect())
                }
                other => other,
            }
        }
        let back: serde_json::Value = serde_json::to_value(&theirs).unwrap();
        assert_eq!(doubles(back), doubles(serde_json::to_value(&ours).unwrap()));
        // And ours decodes theirs.
        let again = JsonStruct::decode(theirs.encode_to_vec().as_slice()).unwrap();
        assert_eq!(again, ours);
    }

    /// One-byte keys and lengths where they fit, varints where they do
    /// not: the bytes prost's general writers give.
    #[test]
    fn keys_and_lengths_are_written_as_prost_writes_them() {
        use prost::encoding::bytes;
        fn reference(value: &Value, buf: &mut Vec<u8>) {
            match value {
                Value::Null => {
                    encode_key(VALUE_NULL, WireType::Varint, buf);
                    encode_varint(0, buf);
                }
                Value::Number(n) => {
                    encode_key(VALUE_NUMBER, WireType::SixtyFourBit, buf);
                    buf.put_f64_le(n.as_f64().unwrap());
                }
                Value::String(s) => string::encode(VALUE_STRING, s, buf),
                Value::Bool(b) => {
                    encode_key(VALUE_BOOL, WireType::Varint, buf);
                    encode_varint(*b as u64, buf);
                }
                Value::Object(m) => {
                    let mut body = Vec::new();
                    for (k, v) in m {
                        let mut entry = Vec::new();
                        string::encode(ENTRY_KEY, k, &mut entry);
                        delimited(ENTRY_VALUE, v, &mut entry);
                        encode_key(STRUCT_FIELDS, WireType::LengthDelimited, &mut body);
                        encode_varint(entry.len() as u64, &mut body);
                        body.extend_from_slice(&entry);
                    }
                    bytes::encode(VALUE_STRUCT, &body, buf);
                }
                Value::Array(a) => {
                    let mut body = Vec::new();
                    for v in a {
                        delimited(LIST_VALUES, v, &mut body);
                    }
                    bytes::encode(VALUE_LIST, &body, buf);
                }
            }
        }
        /// A `Value` message as field `tag`.
        fn delimited(tag: u32, value: &Value, buf: &mut Vec<u8>) {
            let mut inner = Vec::new();
            reference(value, &mut inner);
            bytes::encode(tag, &inner, buf);
        }
        let long = "x".repeat(200);
        let value = json!({
            "short": "s",
            long.clone(): long.clone(),
            "k127": "y".repeat(127),
            "k128": "z".repeat(128),
            "deep": {"list": [long.clone(), 1.5, null, true, false, {"a": long}], "n": 7},
            "empty": {},
            "none": [],
        });
        let ours = JsonStruct::from(value.as_object().unwrap().clone());
        let mut theirs = Vec::new();
        reference(&value, &mut theirs);
        // `theirs` is the `Value` holding the struct: key, length, body.
        let mut body = &theirs[..];
        assert_eq!(body[0], (VALUE_STRUCT << 3) as u8 | 2);
        body = &body[1..];
        let len = prost::encoding::decode_varint(&mut body).unwrap() as usize;
        assert_eq!(len, body.len());
        assert_eq!(ours.encode_to_vec(), body);
    }

    #[test]
    fn json_mapping_is_a_plain_object() {
        let s = sample();
        let text = serde_json::to_string(&s).unwrap();
        let back: JsonStruct = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &[0x0a, 0xff][..],
            &[0x0a, 0x02, 0x12, 0x05],
            &[0x0a, 0x03, 0x0a, 0x01, 0xff],
        ] {
            assert!(JsonStruct::decode(bytes).is_err());
        }
    }
}
