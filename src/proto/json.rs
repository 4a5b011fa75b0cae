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

use std::{
    ops::Range,
    time::{Duration, UNIX_EPOCH},
};

use serde_json::Value;

use super::{
    fields::FieldValue,
    v1::{ChangeEvent, ChangeType, MemberChange, MemberChangeType},
};

/// Appends the event's canonical JSON (no trailing newline).
pub fn write_event(e: &ChangeEvent, out: &mut Vec<u8>) {
    JsonWriter::default().write_event(e, out);
}

/// Writes events one after another. It keeps the text of the last
/// `observedAt` it formatted (every event of a round has the same one),
/// and of the last tenant, stream and resource (every event of a stream).
#[derive(Debug, Default)]
pub struct JsonWriter {
    stamp: Option<(i64, i32)>,
    stamp_text: Vec<u8>,
    /// `tenantId`, `stream` and `resource` of the last event, and their
    /// members' text (each with its leading comma; empty ones omitted).
    source: [String; 3],
    source_text: Vec<u8>,
    /// Where the last event's property names lie in the output, quoted and
    /// escaped: its changed names are copied from there (a created user
    /// lists all 13 again), not checked for escapes a second time.
    key_spans: Vec<Range<usize>>,
}

/// An event as the JSON writer reads it: borrowed parts, so that an event
/// can be written without being assembled into a [`ChangeEvent`] first
/// (the normalizer writes the events of JSON sinks this way).
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub event_id: &'a str,
    pub tenant_id: &'a str,
    pub stream: &'a str,
    pub resource: &'a str,
    pub object_type: &'a str,
    pub object_id: &'a str,
    pub change_type: i32,
    pub snapshot: bool,
    pub inferred: bool,
    pub properties: Option<&'a super::Fields>,
    pub changed_properties: ChangedNames<'a>,
    pub member_changes: &'a [MemberChange],
    pub observed_at: Option<pbjson_types::Timestamp>,
    pub object_version: u64,
}

/// The names of an event's changed properties.
#[derive(Debug, Clone, Copy)]
pub enum ChangedNames<'a> {
    /// As a [`ChangeEvent`] holds them.
    Names(&'a [String]),
    /// The keys of these members of the event's properties, by index.
    Keys(&'a super::Fields, &'a [u32]),
}

impl ChangedNames<'_> {
    fn is_empty(&self) -> bool {
        match self {
            ChangedNames::Names(names) => names.is_empty(),
            ChangedNames::Keys(_, at) => at.is_empty(),
        }
    }
}

impl<'a> From<&'a ChangeEvent> for EventView<'a> {
    fn from(e: &'a ChangeEvent) -> Self {
        EventView {
            event_id: &e.event_id,
            tenant_id: &e.tenant_id,
            stream: &e.stream,
            resource: &e.resource,
            object_type: &e.object_type,
            object_id: &e.object_id,
            change_type: e.change_type,
            snapshot: e.snapshot,
            inferred: e.inferred,
            properties: e.properties.as_ref().map(|p| &p.fields),
            changed_properties: ChangedNames::Names(&e.changed_properties),
            member_changes: &e.member_changes,
            observed_at: e.observed_at,
            object_version: e.object_version,
        }
    }
}

impl JsonWriter {
    /// Appends the event's canonical JSON (no trailing newline).
    pub fn write_event(&mut self, e: &ChangeEvent, out: &mut Vec<u8>) {
        self.write(&EventView::from(e), out);
    }

    /// Appends the canonical JSON of the event `e` shows (no trailing
    /// newline).
    pub fn write(&mut self, e: &EventView<'_>, out: &mut Vec<u8>) {
        let mut w = Fields::new(out);
        w.str_field(b"\"eventId\":", e.event_id);
        if self.source[0] != e.tenant_id
            || self.source[1] != e.stream
            || self.source[2] != e.resource
        {
            self.source = [
                e.tenant_id.to_owned(),
                e.stream.to_owned(),
                e.resource.to_owned(),
            ];
            self.source_text.clear();
            let mut source = Fields {
                out: &mut self.source_text,
                // Every member gets its comma; the first is cut below if
                // no event id came before.
                first: false,
            };
            source.str_field(b"\"tenantId\":", e.tenant_id);
            source.str_field(b"\"stream\":", e.stream);
            source.str_field(b"\"resource\":", e.resource);
        }
        if !self.source_text.is_empty() {
            let text = if w.first {
                &self.source_text[1..]
            } else {
                &self.source_text[..]
            };
            w.out.extend_from_slice(text);
            w.first = false;
        }
        w.str_field(b"\"objectType\":", e.object_type);
        w.str_field(b"\"objectId\":", e.object_id);
        if e.change_type != 0 {
            let name = ChangeType::try_from(e.change_type)
                .map_or("CHANGE_TYPE_UNSPECIFIED", |c| c.as_str_name());
            w.raw_str_field(b"\"changeType\":", name);
        }
        if e.snapshot {
            w.key(b"\"snapshot\":");
            w.out.extend_from_slice(b"true");
        }
        if e.inferred {
            w.key(b"\"inferred\":");
            w.out.extend_from_slice(b"true");
        }
        self.key_spans.clear();
        if let Some(p) = e.properties {
            w.key(b"\"properties\":");
            let spans = &mut self.key_spans;
            write_object_noting_keys(p, w.out, write_field_value, |key| spans.push(key));
        }
        if !e.changed_properties.is_empty() {
            w.key(b"\"changedProperties\":");
            match e.changed_properties {
                ChangedNames::Names(names) => {
                    write_array(names, w.out, |name, out| write_str(name, out));
                }
                // The keys of the properties just written: copied.
                ChangedNames::Keys(fields, at)
                    if e.properties.is_some_and(|p| std::ptr::eq(p, fields)) =>
                {
                    let spans = &self.key_spans;
                    write_array(at, w.out, |&i, out| {
                        out.extend_from_within(spans[i as usize].clone())
                    });
                }
                ChangedNames::Keys(fields, at) => {
                    write_array(at, w.out, |&i, out| {
                        write_str(fields.key_at(i as usize), out)
                    });
                }
            }
        }
        if !e.member_changes.is_empty() {
            w.key(b"\"memberChanges\":");
            write_array(e.member_changes, w.out, write_member_change);
        }
        if let Some(t) = &e.observed_at {
            w.key(b"\"observedAt\":");
            if self.stamp != Some((t.seconds, t.nanos)) {
                let at = UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
                self.stamp_text.clear();
                self.stamp_text.push(b'"');
                self.stamp_text
                    .extend_from_slice(humantime::format_rfc3339_nanos(at).to_string().as_bytes());
                self.stamp_text.push(b'"');
                self.stamp = Some((t.seconds, t.nanos));
            }
            w.out.extend_from_slice(&self.stamp_text);
        }
        if e.object_version != 0 {
            w.key(b"\"objectVersion\":");
            w.out.push(b'"');
            w.out
                .extend_from_slice(itoa::Buffer::new().format(e.object_version).as_bytes());
            w.out.push(b'"');
        }
        w.finish();
    }
}

fn write_member_change(m: &MemberChange, out: &mut Vec<u8>) {
    let mut w = Fields::new(out);
    w.str_field(b"\"memberId\":", &m.member_id);
    w.str_field(b"\"memberType\":", &m.member_type);
    if m.change != 0 {
        let name = MemberChangeType::try_from(m.change)
            .map_or("MEMBER_CHANGE_TYPE_UNSPECIFIED", |c| c.as_str_name());
        w.raw_str_field(b"\"change\":", name);
    }
    w.str_field(b"\"relationship\":", &m.relationship);
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

    /// A key, given as its literal `"name":` (names are ASCII identifiers).
    fn key(&mut self, quoted: &[u8]) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.extend_from_slice(quoted);
    }

    /// A string field, omitted when empty (proto3 default).
    fn str_field(&mut self, quoted: &[u8], value: &str) {
        if !value.is_empty() {
            self.key(quoted);
            write_str(value, self.out);
        }
    }

    /// A string that needs no escaping (enum names).
    fn raw_str_field(&mut self, quoted: &[u8], value: &str) {
        self.key(quoted);
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
    }

    fn finish(self) {
        self.out.push(b'}');
    }
}

/// A JSON object's members: a nested `Map`, or the top level's `Fields`.
fn write_object<'a, K: AsRef<str>, V: 'a + ?Sized>(
    map: impl IntoIterator<Item = (K, &'a V)>,
    out: &mut Vec<u8>,
    write: fn(&V, &mut Vec<u8>),
) {
    write_object_noting_keys(map, out, write, |_| {});
}

/// [`write_object`], telling `noted` where each key's text (quoted and
/// escaped) lies in `out`, in the map's order.
fn write_object_noting_keys<'a, K: AsRef<str>, V: 'a + ?Sized>(
    map: impl IntoIterator<Item = (K, &'a V)>,
    out: &mut Vec<u8>,
    write: fn(&V, &mut Vec<u8>),
    mut noted: impl FnMut(Range<usize>),
) {
    out.push(b'{');
    for (i, (k, v)) in map.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let start = out.len();
        write_str(k.as_ref(), out);
        noted(start..out.len());
        out.push(b':');
        write(v, out);
    }
    out.push(b'}');
}

fn write_field_value(v: &FieldValue, out: &mut Vec<u8>) {
    match v {
        FieldValue::Str(s) => write_str(s, out),
        FieldValue::Json(v) => write_value(v, out),
    }
}

fn write_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => write_array(items, out, write_value),
        Value::Object(map) => write_object(map, out, write_value),
    }
}

/// `[item,item,...]`.
fn write_array<T>(items: &[T], out: &mut Vec<u8>, mut each: impl FnMut(&T, &mut Vec<u8>)) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(item, out);
    }
    out.push(b']');
}

/// A number as serde_json prints it: integers by itoa, floats by ryu.
fn write_number(n: &serde_json::Number, out: &mut Vec<u8>) {
    if let Some(i) = n.as_i64() {
        out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
    } else if let Some(u) = n.as_u64() {
        out.extend_from_slice(itoa::Buffer::new().format(u).as_bytes());
    } else {
        // Writing into a Vec cannot fail.
        let _ = std::io::Write::write_fmt(out, format_args!("{n}"));
    }
}

/// True if a word of eight bytes holds one that needs escaping: `"`, `\`
/// or a control character. A byte below 0x20, or equal to `"` or `\`,
/// sets the high bit of its lane (the classic "has a zero/less-than byte"
/// tests, exact as a yes/no answer: borrows only start at a matching byte).
#[inline(always)]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    let q = w ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q;
    let b = w ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b;
    (control | quote | backslash) & HIGH != 0
}

/// Writes a JSON string literal, escaping as serde_json does.
///
/// Nearly every Graph string needs no escape: it is checked and copied in
/// one pass, eight bytes at a time (fixed-size copies, no `memcpy` call per
/// string; a last partial word is read as the string's last eight bytes,
/// or padded when the string is shorter, copied whole and cut back).
/// On the first word that needs an escape, what was copied is dropped and
/// the string is written byte by byte.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    write_literal(s.as_bytes(), out);
}

/// [`write_str`] on bytes (the tests try every byte value, UTF-8 or not).
///
/// The words are read and written through pointers into the room reserved
/// first: `extend_from_slice` checked the capacity and moved the length
/// for every word (≈ 1.7k instructions a user, callgrind).
#[inline(always)]
fn write_literal(bytes: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    let n = bytes.len();
    // The quotes, and a short string's whole padded word.
    out.reserve(n + 2 + 8);
    let src = bytes.as_ptr();
    // SAFETY: `reserve` made room for `n + 10` bytes from `start`. Every
    // write below lands in `start..start + n + 2`, except a short string's
    // padded word (`start + 1..start + 9`), all inside that room; every read
    // is of `bytes` (`i + 8 <= n`, or the last eight when `n >= 8`). The
    // length is set only over bytes written: `start + 1` (the quote) on the
    // slow path, `start + n + 2` once the string and its closing quote are.
    unsafe {
        let base = out.as_mut_ptr().add(start);
        base.write(b'"');
        let dst = base.add(1);
        let mut i = 0;
        let mut clean = true;
        while i + 8 <= n {
            let w = src.add(i).cast::<u64>().read_unaligned();
            if word_needs_escape(w) {
                clean = false;
                break;
            }
            dst.add(i).cast::<u64>().write_unaligned(w);
            i += 8;
        }
        if clean && i < n {
            // The last word: for a string of eight bytes or more, its last
            // eight (overlapping what is written, and written again); for a
            // shorter one, its bytes padded with one that needs no escape.
            let (last, at) = if n >= 8 {
                (src.add(n - 8).cast::<u64>().read_unaligned(), n - 8)
            } else {
                let mut padded = [b'a'; 8];
                padded[..n].copy_from_slice(bytes);
                (u64::from_ne_bytes(padded), 0)
            };
            clean = !word_needs_escape(last);
            if clean {
                dst.add(at).cast::<u64>().write_unaligned(last);
            }
        }
        if clean {
            dst.add(n).write(b'"');
            out.set_len(start + n + 2);
            return;
        }
        out.set_len(start + 1);
    }
    write_escaped(bytes, out);
    out.push(b'"');
}

/// The body of a string literal that holds bytes to escape.
#[cold]
fn write_escaped(bytes: &[u8], out: &mut Vec<u8>) {
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
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::proto::JsonStruct;

    /// Changed names given as the properties' keys are copied from where
    /// the keys were written: the same text as names given one by one,
    /// escapes included, in the order asked for; keys of other fields are
    /// written afresh.
    #[test]
    fn changed_keys_are_copied_as_written() {
        let props: crate::proto::Fields = json!({
            "a\"quote": 1, "accountEnabled": true, "b\\slash": "x",
            "displayName": "Ada", "tab\tkey": null, "é": [1], "z": {"k\n": 2}
        })
        .as_object()
        .unwrap()
        .clone()
        .into();
        let other: crate::proto::Fields = json!({"a\"quote": 1, "q": 2, "r": 3})
            .as_object()
            .unwrap()
            .clone()
            .into();
        let e = event(json!({}));
        let mut writer = JsonWriter::default();
        for (keys_of, at) in [
            (&props, vec![0u32, 2, 4, 5, 6]),
            (&props, vec![6, 1, 0]),
            (&props, vec![3]),
            (&other, vec![2, 0]),
        ] {
            let names: Vec<String> = at
                .iter()
                .map(|&i| keys_of.key_at(i as usize).to_string())
                .collect();
            let mut view = EventView::from(&e);
            view.properties = Some(&props);
            view.changed_properties = ChangedNames::Names(&names);
            let mut expected = Vec::new();
            JsonWriter::default().write(&view, &mut expected);
            view.changed_properties = ChangedNames::Keys(keys_of, &at);
            let mut got = Vec::new();
            writer.write(&view, &mut got);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }

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
    fn the_word_at_a_time_copy_agrees_with_a_byte_at_a_time_escape() {
        let naive = |b: &[u8]| {
            let mut out = vec![b'"'];
            write_escaped(b, &mut out);
            out.push(b'"');
            out
        };
        // Every byte value at every position of strings up to 17 bytes,
        // on a background of plain, high (UTF-8 continuation) and
        // just-above-the-limit bytes, after some bytes already written.
        for background in [b'a', 0x80, 0xff, 0x20, 0x21, b'"' + 1, b'\\' + 1] {
            for len in 0..=17 {
                for pos in 0..len {
                    for byte in 0..=255u8 {
                        let mut bytes = vec![background; len];
                        bytes[pos] = byte;
                        let mut out = b"x:".to_vec();
                        write_literal(&bytes, &mut out);
                        assert_eq!(out[2..], naive(&bytes), "{bytes:?}");
                        if let Ok(s) = std::str::from_utf8(&bytes) {
                            assert_eq!(out[2..], serde_json::to_vec(s).unwrap(), "{bytes:?}");
                        }
                    }
                }
                let mut out = Vec::new();
                write_literal(&vec![background; len], &mut out);
                assert_eq!(out, naive(&vec![background; len]));
            }
        }
    }

    #[test]
    fn one_writer_writes_each_event_with_its_own_timestamp() {
        let mut a = event(json!({"x": 1}));
        let mut b = a.clone();
        b.observed_at = Some(pbjson_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        });
        a.object_version = u64::MAX;
        let mut writer = JsonWriter::default();
        for e in [&a, &a, &b, &a] {
            let mut out = Vec::new();
            writer.write_event(e, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), ours(e));
            let back: ChangeEvent = serde_json::from_str(&ours(e)).unwrap();
            assert_eq!(&back, e);
        }
    }

    #[test]
    fn one_writer_writes_each_event_with_its_own_tenant_stream_and_resource() {
        let a = event(json!({"x": 1}));
        let mut b = a.clone();
        b.stream = "groups-\"eu\"".into();
        let mut c = a.clone();
        c.event_id.clear();
        let mut d = a.clone();
        d.tenant_id.clear();
        d.resource.clear();
        let mut f = d.clone();
        f.event_id.clear();
        f.stream.clear();
        let mut writer = JsonWriter::default();
        for e in [&a, &a, &b, &c, &a, &d, &f, &c, &f] {
            let mut out = Vec::new();
            writer.write_event(e, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), ours(e));
        }
    }

    #[test]
    fn numbers_are_written_as_serde_json_writes_them() {
        for n in [
            json!(0),
            json!(-1),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(1.5),
            json!(-0.25),
            json!(1e300),
            json!(2.0),
        ] {
            let mut out = Vec::new();
            write_value(&n, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
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
