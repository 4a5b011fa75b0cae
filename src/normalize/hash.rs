//! Stable hashes of property names and JSON values: the compact memory that
//! lets the normalizer compute exact changed-property lists without keeping
//! any object's JSON.
//!
//! The encoding is part of the checkpoint format: changing it makes every
//! remembered property look changed once. xxh3 is a fixed, documented
//! algorithm, so the values are stable across versions and platforms.

use serde_json::Value;
use xxhash_rust::xxh3::{Xxh3, xxh3_64, xxh3_64_with_seed};

use crate::proto::fields::FieldValue;

/// Hash of a property name.
pub fn name_hash(name: &str) -> u64 {
    xxh3_64(name.as_bytes())
}

/// Hash of a JSON value, independent of formatting and of object key order.
/// `null` has no hash: a property set to null is remembered as absent, which
/// is also how Graph reports a property that was never set.
pub fn value_hash(value: &Value) -> Option<u64> {
    // Scalars (nearly every Graph property) take the one-shot path; the
    // seed keeps the types apart ("1" the string vs 1 the number).
    match value {
        Value::Null => None,
        Value::String(s) => Some(str_hash(s)),
        Value::Bool(b) => Some(xxh3_64_with_seed(&[*b as u8], 2)),
        Value::Number(n) => Some(xxh3_64_with_seed(&number_bytes(n), 3)),
        Value::Array(_) | Value::Object(_) => {
            let mut hasher = Xxh3::new();
            feed(&mut hasher, value);
            Some(hasher.digest())
        }
    }
}

/// A string value's hash, however the string is held.
fn str_hash(s: &str) -> u64 {
    xxh3_64_with_seed(s.as_bytes(), 1)
}

/// [`value_hash`] of a parsed member's value (a string hashes as the
/// same `Value::String` would).
pub fn field_hash(value: &FieldValue) -> Option<u64> {
    match value {
        FieldValue::Str(s) => Some(str_hash(s)),
        FieldValue::Json(v) => value_hash(v),
    }
}

/// A number's canonical bytes: integers as themselves, others as f64 bits.
/// A float with an integral value within ±9e15 counts as that integer:
/// events carry properties as a `google.protobuf.Struct`, whose numbers
/// are doubles, so `1.0` and `1` are the same value once published, and a
/// state rebuilt from the topics (`replay --verify`) must hash alike.
fn number_bytes(n: &serde_json::Number) -> [u8; 9] {
    let mut out = [0u8; 9];
    let integral = n
        .as_f64()
        .filter(|f| n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15)
        .map(|f| f as i64);
    if let Some(i) = n.as_i64().or(integral) {
        out[0] = b'i';
        out[1..].copy_from_slice(&i.to_le_bytes());
    } else if let Some(u) = n.as_u64() {
        out[0] = b'u';
        out[1..].copy_from_slice(&u.to_le_bytes());
    } else if let Some(f) = n.as_f64() {
        out[0] = b'f';
        out[1..].copy_from_slice(&f.to_bits().to_le_bytes());
    }
    out
}

/// Order-sensitive combination of 64-bit values (the content part of event
/// ids): cheap, and distinct inputs collide with negligible probability.
#[derive(Debug, Clone, Copy)]
pub struct Mix(u64);

impl Mix {
    pub const fn new(seed: u64) -> Self {
        Mix(seed ^ 0x243F_6A88_85A3_08D3)
    }

    pub fn add(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }

    pub fn add_bytes(&mut self, b: &[u8]) {
        self.add(xxh3_64(b));
    }

    pub fn finish(self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^ (x >> 33)
    }
}

fn feed(h: &mut Xxh3, value: &Value) {
    match value {
        Value::Null => h.update(b"n"),
        Value::Bool(true) => h.update(b"t"),
        Value::Bool(false) => h.update(b"f"),
        Value::Number(n) => {
            h.update(b"d");
            h.update(&number_bytes(n));
        }
        Value::String(s) => {
            h.update(b"s");
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Value::Array(items) => {
            h.update(b"a");
            h.update(&(items.len() as u64).to_le_bytes());
            for item in items {
                feed(h, item);
            }
        }
        Value::Object(map) => {
            h.update(b"o");
            h.update(&(map.len() as u64).to_le_bytes());
            // Sort explicitly: serde_json's map is ordered by key unless some
            // crate in the build enables `preserve_order`.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                h.update(&(k.len() as u64).to_le_bytes());
                h.update(k.as_bytes());
                feed(h, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn integral_floats_hash_as_the_integers_they_become_on_the_wire() {
        let float: Value = serde_json::from_str("1.0").unwrap();
        assert!(float.as_f64().is_some() && float.as_i64().is_none());
        assert_eq!(value_hash(&float), value_hash(&json!(1)));
        assert_eq!(value_hash(&json!([2.0])), value_hash(&json!([2])));
        assert_ne!(value_hash(&json!(1.5)), value_hash(&json!(1)));
        assert_ne!(
            value_hash(&json!(1e16)),
            value_hash(&json!(10_000_000_000_000_000i64))
        );
    }

    #[test]
    fn equal_values_hash_equal_regardless_of_format() {
        let a: Value = serde_json::from_str(r#"{"b": [1, "x"], "a": true}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":true,"b":[1,"\u0078"]}"#).unwrap();
        assert_eq!(value_hash(&a), value_hash(&b));
    }

    #[test]
    fn different_values_hash_differently() {
        let values = [
            json!("1"),
            json!(1),
            json!(true),
            json!([]),
            json!({}),
            json!([""]),
            json!(["", ""]),
            json!({"a": 1}),
            json!({"a": "1"}),
            json!(1.5),
        ];
        let mut hashes: Vec<u64> = values.iter().map(|v| value_hash(v).unwrap()).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), values.len());
        assert_eq!(value_hash(&Value::Null), None);
    }

    #[test]
    fn parsed_values_hash_as_the_json_values_they_are() {
        for text in [
            r#""""#,
            r#""short""#,
            r#""a string longer than twenty-four bytes""#,
            r#""esc\"aped \u00e9 \n""#,
            "0",
            "-3",
            "18446744073709551615",
            "1.5",
            "1.0",
            "true",
            "null",
            r#"["+1 206 555 0100"]"#,
            r#"{"b": [1, "x"], "a": true}"#,
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            let parsed: FieldValue = serde_json::from_str(text).unwrap();
            assert_eq!(field_hash(&parsed), value_hash(&value), "{text}");
            assert_eq!(
                field_hash(&FieldValue::from(value.clone())),
                value_hash(&value)
            );
            assert_eq!(
                field_hash(&FieldValue::Json(value.clone())),
                value_hash(&value)
            );
        }
    }
}
