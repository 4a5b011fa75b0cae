//! The proto3 canonical JSON of a `ChangeEvent`, written directly.
//!
//! This is what the file and stdout sinks write. The generated pbjson
//! serializer produces the same mapping (lowerCamelCase names, default
//! values omitted, enums as names, `uint64` as a string, timestamps as RFC
//! 3339 in UTC), but through serde's generic machinery and a byte-at-a-time
//! string escaper it was the single most expensive step of the pipeline;
//! this writer checks whole strings with vector instructions and knows the
//! field layout.
//! Tests check that pbjson reads back exactly the event that was written.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::v1::{ChangeEvent, ChangeType, MemberChange, MemberChangeType};

/// Appends the event's canonical JSON (no trailing newline).
pub fn write_event(e: &ChangeEvent, out: &mut Vec<u8>) {
    let mut w = Fields::new(out);
    w.str_field("eventId", &e.event_id);
    w.str_field("tenantId", &e.tenant_id);
    w.str_field("stream", &e.stream);
    w.str_field("resource", &e.resource);
    w.str_field("objectType", &e.object_type);
    w.str_field("objectId", &e.object_id);
    if e.change_type != 0 {
        let name = ChangeType::try_from(e.change_type)
            .map_or("CHANGE_TYPE_UNSPECIFIED", |c| c.as_str_name());
        w.raw_str_field("changeType", name);
    }
    if e.snapshot {
        w.key("snapshot");
        w.out.extend_from_slice(b"true");
    }
    if e.inferred {
        w.key("inferred");
        w.out.extend_from_slice(b"true");
    }
    if let Some(p) = &e.properties {
        w.key("properties");
        write_object(&p.fields, w.out);
    }
    if !e.changed_properties.is_empty() {
        w.key("changedProperties");
        w.out.push(b'[');
        for (i, name) in e.changed_properties.iter().enumerate() {
            if i > 0 {
                w.out.push(b',');
            }
            write_str(name, w.out);
        }
        w.out.push(b']');
    }
    if !e.member_changes.is_empty() {
        w.key("memberChanges");
        w.out.push(b'[');
        for (i, m) in e.member_changes.iter().enumerate() {
            if i > 0 {
                w.out.push(b',');
            }
            write_member_change(m, w.out);
        }
        w.out.push(b']');
    }
    if let Some(t) = &e.observed_at {
        w.key("observedAt");
        let at = UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
        w.out.push(b'"');
        w.out
            .extend_from_slice(humantime::format_rfc3339_nanos(at).to_string().as_bytes());
        w.out.push(b'"');
    }
    if e.object_version != 0 {
        w.key("objectVersion");
        w.out.push(b'"');
        w.out
            .extend_from_slice(e.object_version.to_string().as_bytes());
        w.out.push(b'"');
    }
    w.finish();
}

fn write_member_change(m: &MemberChange, out: &mut Vec<u8>) {
    let mut w = Fields::new(out);
    w.str_field("memberId", &m.member_id);
    w.str_field("memberType", &m.member_type);
    if m.change != 0 {
        let name = MemberChangeType::try_from(m.change)
            .map_or("MEMBER_CHANGE_TYPE_UNSPECIFIED", |c| c.as_str_name());
        w.raw_str_field("change", name);
    }
    w.str_field("relationship", &m.relationship);
    w.finish();
}

/// An object being written: braces and commas.
struct Fields<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Fields<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Fields { out, first: true }
    }

    /// `"name":` (names are ASCII identifiers: no escaping needed).
    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string field, omitted when empty (proto3 default).
    fn str_field(&mut self, name: &str, value: &str) {
        if !value.is_empty() {
            self.key(name);
            write_str(value, self.out);
        }
    }

    /// A string that needs no escaping (enum names).
    fn raw_str_field(&mut self, name: &str, value: &str) {
        self.key(name);
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
    }

    fn finish(self) {
        self.out.push(b'}');
    }
}

fn write_object(map: &Map<String, Value>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(k, out);
        out.push(b':');
        write_value(v, out);
    }
    out.push(b'}');
}

fn write_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // serde_json prints numbers canonically (itoa/ryu) and cannot fail
        // writing into a Vec.
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(map, out),
    }
}

/// True if any byte needs escaping: `"`, `\` or a control character.
/// Written without early exit so that it compiles to vector instructions.
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// Writes a JSON string literal, escaping as serde_json does.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if !needs_escape(bytes) {
        // Nearly every Graph string.
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::proto::JsonStruct;

    fn event(props: Value) -> ChangeEvent {
        ChangeEvent {
            event_id: "3f0c6a63-7d1e-5d2b-9a5e-4c1b2a3d4e5f".into(),
            tenant_id: "contoso.onmicrosoft.com".into(),
            stream: "users".into(),
            resource: "users".into(),
            object_type: "microsoft.graph.user".into(),
            object_id: "25dcffff-959e-4ece-9973-e5d9b800e8cc".into(),
            change_type: ChangeType::Updated as i32,
            snapshot: true,
            inferred: false,
            properties: Some(JsonStruct::from(props.as_object().unwrap().clone())),
            changed_properties: vec!["displayName".into(), "surname".into()],
            member_changes: vec![MemberChange {
                member_id: "m1".into(),
                member_type: "microsoft.graph.user".into(),
                change: MemberChangeType::MemberChangeRemoved as i32,
                relationship: "members".into(),
            }],
            observed_at: Some(pbjson_types::Timestamp {
                seconds: 1_763_900_000,
                nanos: 123_456_789,
            }),
            object_version: 7,
        }
    }

    fn ours(e: &ChangeEvent) -> String {
        let mut out = Vec::new();
        write_event(e, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pbjson_reads_back_exactly_the_event() {
        let strings = [
            "plain",
            "",
            "Renée Müller 😀",
            "quote \" backslash \\ slash /",
            "ctl \u{1} \u{1f} \n\r\t\u{8}\u{c} end",
            "exactly8",
            "a much longer string that crosses several eight-byte words \" here",
        ];
        for s in strings {
            let e = event(json!({
                "displayName": s,
                "n": 42, "f": 1.5, "neg": -3, "t": true, "nul": null,
                "list": [s, 1, [], {}], "obj": {"k": s}
            }));
            let text = ours(&e);
            let back: ChangeEvent =
                serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {text}"));
            assert_eq!(back, e, "{text}");
            // Same JSON value as the generated serializer (number forms aside).
            let theirs: Value = serde_json::to_value(&e).unwrap();
            let mine: Value = serde_json::from_str(&text).unwrap();
            let mut theirs_obj = theirs.as_object().unwrap().clone();
            let mut mine_obj = mine.as_object().unwrap().clone();
            // Timestamps: both RFC 3339, formatted differently ("Z" vs "+00:00").
            theirs_obj.remove("observedAt");
            mine_obj.remove("observedAt");
            assert_eq!(mine_obj, theirs_obj);
        }
    }

    #[test]
    fn defaults_are_omitted_and_escapes_match_serde_json() {
        let e = ChangeEvent {
            object_id: "x".into(),
            ..Default::default()
        };
        assert_eq!(ours(&e), r#"{"objectId":"x"}"#);
        for s in ["\u{0}\u{7f}é", "tab\there", "12345678\"", "\\\\"] {
            let mut out = Vec::new();
            write_str(s, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }
}
