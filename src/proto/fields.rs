//! A JSON object's members as a vector sorted by key: what a page's
//! objects are parsed into and what an event's properties are kept as.
//!
//! A `serde_json::Map` is a `BTreeMap`. Parsing a page inserted every key
//! of every object into one (≈ 4.9k instructions for a user of 14
//! properties: each insert walks a node comparing whole keys), and dropping
//! the map walked the tree again. The members are pushed in the order
//! Graph sends them and sorted once, by their first eight bytes as one
//! integer (whole keys only break ties). Everything after the parse reads
//! the members in key order or looks up a few keys, which a sorted vector
//! does as well. Nested objects stay `serde_json` maps: Graph's objects are
//! nearly flat.
//!
//! Keys and string values are kept inline up to 24 bytes ([`Key`],
//! [`FieldValue::Str`]): a user's property names and most of its values
//! are that short, so parsing a page allocates little but the ids, the
//! longer strings and the member vectors. Each `String` had cost an
//! allocation on the fetcher's thread and a free on the normalizer's.

use std::{fmt, ops::Index};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A member's key, inline up to 24 bytes. Most Graph property names are
/// that short (`userPrincipalName` has 17 bytes); a few, such as
/// `signInSessionsValidFromDateTime`, are longer and allocated.
pub type Key = compact_str::CompactString;

/// A member's value: a string (inline up to 24 bytes), or any other JSON
/// value. Strings are always `Str` (every constructor here makes them so),
/// but two values compare by their JSON either way.
#[derive(Debug, Clone)]
pub enum FieldValue {
    Str(Key),
    /// Null, a boolean, a number, an array or an object.
    Json(Value),
}

impl FieldValue {
    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::Str(s) => Some(s),
            FieldValue::Json(v) => v.as_str(),
        }
    }

    /// The string, if it is one (a long one keeps its allocation).
    pub fn into_string(self) -> Option<String> {
        match self {
            FieldValue::Str(s) => Some(s.into_string()),
            FieldValue::Json(Value::String(s)) => Some(s),
            FieldValue::Json(_) => None,
        }
    }

    /// A member of an object value, as `Value::get` finds it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            FieldValue::Str(_) => None,
            FieldValue::Json(v) => v.get(key),
        }
    }

    pub fn into_value(self) -> Value {
        match self {
            FieldValue::Str(s) => Value::String(s.into_string()),
            FieldValue::Json(v) => v,
        }
    }
}

impl Default for FieldValue {
    fn default() -> Self {
        FieldValue::Json(Value::Null)
    }
}

impl From<Value> for FieldValue {
    fn from(value: Value) -> Self {
        match value {
            Value::String(s) => FieldValue::Str(s.into()),
            other => FieldValue::Json(other),
        }
    }
}

impl PartialEq for FieldValue {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (FieldValue::Json(a), FieldValue::Json(b)) => a == b,
            _ => self.as_str().is_some() && self.as_str() == other.as_str(),
        }
    }
}

impl PartialEq<Value> for FieldValue {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (FieldValue::Json(a), b) => a == b,
            (FieldValue::Str(a), Value::String(b)) => a == b,
            (FieldValue::Str(_), _) => false,
        }
    }
}

impl serde::Serialize for FieldValue {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            FieldValue::Str(s) => serializer.serialize_str(s),
            FieldValue::Json(v) => v.serialize(serializer),
        }
    }
}

impl<'de> serde::Deserialize<'de> for FieldValue {
    /// Strings straight into a [`Key`]; anything else as `serde_json` reads it.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldValueVisitor)
    }
}

struct FieldValueVisitor;

impl<'de> Visitor<'de> for FieldValueVisitor {
    type Value = FieldValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldValue, E> {
        Ok(FieldValue::Str(Key::new(s)))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<FieldValue, E> {
        Ok(FieldValue::Str(s.into()))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<FieldValue, E> {
        Ok(FieldValue::Json(Value::Bool(b)))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<FieldValue, E> {
        Ok(FieldValue::Json(Value::from(n)))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<FieldValue, E> {
        Ok(FieldValue::Json(Value::from(n)))
    }

    /// As `serde_json` does: a float that is not finite is null.
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<FieldValue, E> {
        Ok(FieldValue::Json(
            serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<FieldValue, E> {
        Ok(FieldValue::Json(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<FieldValue, E> {
        Ok(FieldValue::Json(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<FieldValue, D::Error> {
        serde::Deserialize::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<FieldValue, A::Error> {
        serde::Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))
            .map(FieldValue::Json)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FieldValue, A::Error> {
        serde::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))
            .map(FieldValue::Json)
    }
}

/// A JSON object's members, sorted by key, each key once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(Vec<(Key, FieldValue)>);

impl Fields {
    /// Members in any order; a repeated key keeps its last value (as
    /// `serde_json` does).
    pub fn from_entries(entries: Vec<(Key, FieldValue)>) -> Self {
        KeySorter::default().fields(entries)
    }

    /// Members already sorted by key, each key once.
    fn from_sorted(entries: Vec<(Key, FieldValue)>) -> Self {
        debug_assert!(entries.is_sorted_by(|a, b| a.0 < b.0));
        Fields(entries)
    }

    /// Byte order of keys, decided by their prefixes when they differ
    /// there (one integer comparison), else by the whole keys.
    fn find(&self, key: &str) -> Result<usize, usize> {
        // The key's prefix once, not at every probe.
        let prefix = key_prefix(key);
        self.0
            .binary_search_by(|(k, _)| key_prefix(k).cmp(&prefix).then_with(|| k.as_str().cmp(key)))
    }

    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// Whether a key starts with `@` (`@removed`, `@odata.type`, ...).
    /// Such keys sort together, right after every key of a smaller first
    /// byte: one binary search on prefixes.
    pub fn has_key_starting_with_at(&self) -> bool {
        const AT: u64 = (b'@' as u64) << 56;
        let first = self.0.partition_point(|(k, _)| key_prefix(k) < AT);
        self.0
            .get(first)
            .is_some_and(|(k, _)| k.as_bytes().first() == Some(&b'@'))
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets a member; returns the value it replaces.
    pub fn insert(
        &mut self,
        key: impl Into<Key>,
        value: impl Into<FieldValue>,
    ) -> Option<FieldValue> {
        let (key, value) = (key.into(), value.into());
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut FieldValue) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The members in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// The key of the `i`-th member in key order.
    pub fn key_at(&self, i: usize) -> &str {
        &self.0[i].0
    }

    /// As a `serde_json` map.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
            .into_iter()
            .map(|(k, v)| (k.into_string(), v.into_value()))
            .collect()
    }
}

/// Sorts the members of parsed objects, cheaply for objects that come with
/// their keys in the same order (those of one stream mostly do: Graph
/// serializes every object of a `$select` alike, leaving some out).
///
/// It remembers the orders that sorted the last four objects of distinct
/// shapes. An object is checked against each of as many members, by index
/// (one comparison of key prefixes per member), and moved into the first
/// that sorts it; if none does, it is sorted by (key prefix, arrival)
/// pairs, plain integers, and runs of equal prefixes by whole keys. With
/// one remembered order, half of the simulator's users (12 or 13
/// properties, alternating) were sorted in full: ≈ 1.9k instructions a
/// user on average (callgrind). `sort_by` on the members themselves, with
/// whole-key comparisons and 56-byte moves, cost ≈ 2.3k instructions a user.
#[derive(Debug, Default)]
pub struct KeySorter {
    /// Arrival index of each member of recent objects, in key order: the
    /// orders that sorted the last few objects of distinct shapes, most
    /// recent first (a page's objects mostly come in two or three shapes,
    /// the properties Graph left out varying).
    orders: Vec<Vec<u32>>,
    /// Scratch: (key prefix, arrival index).
    pairs: Vec<(u64, u32)>,
    /// Scratch: an emptied vector of members, whose room the next object
    /// put in a remembered order is moved into (no allocation).
    spare: Vec<(Key, FieldValue)>,
}

/// Orders a [`KeySorter`] remembers.
const REMEMBERED_ORDERS: usize = 4;

impl KeySorter {
    /// An empty vector for the next object's members, with room for as
    /// many as the largest of the remembered shapes has (24 before any).
    /// Each object keeps its vector: room for 24 members of 56 bytes where
    /// a user has 13 was ≈ 600 bytes a user of memory written for nothing
    /// (and page faults for it, as freed pages go back to the system).
    pub fn entries(&self) -> Vec<(Key, FieldValue)> {
        let room = self.orders.iter().map(Vec::len).max().unwrap_or(24);
        Vec::with_capacity(room)
    }

    pub fn fields(&mut self, mut entries: Vec<(Key, FieldValue)>) -> Fields {
        let hit = self
            .orders
            .iter()
            .position(|order| order.len() == entries.len() && sorts(order, &entries));
        if let Some(k) = hit {
            self.orders[..=k].rotate_right(1);
            let mut sorted = std::mem::take(&mut self.spare);
            sorted.clear();
            sorted.extend(
                self.orders[0]
                    .iter()
                    .map(|&i| std::mem::take(&mut entries[i as usize])),
            );
            entries.clear();
            self.spare = entries;
            return Fields::from_sorted(sorted);
        }
        self.pairs.clear();
        self.pairs.extend(
            entries
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (key_prefix(k), i as u32)),
        );
        self.pairs.sort_unstable();
        // Equal prefixes: by whole key, then arrival (a repeated key's
        // members stay in arrival order).
        let mut start = 0;
        while start < self.pairs.len() {
            let prefix = self.pairs[start].0;
            let end = start
                + self.pairs[start..]
                    .iter()
                    .take_while(|p| p.0 == prefix)
                    .count();
            if end - start > 1 {
                self.pairs[start..end].sort_unstable_by(|a, b| {
                    let key = |p: &(u64, u32)| entries[p.1 as usize].0.as_str();
                    key(a).cmp(key(b)).then(a.1.cmp(&b.1))
                });
            }
            start = end;
        }
        // A repeated key keeps its last member in arrival order (members
        // of one key are next to each other now, in arrival order).
        let mut order = if self.orders.len() == REMEMBERED_ORDERS {
            self.orders.pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        order.clear();
        for (j, &(prefix, i)) in self.pairs.iter().enumerate() {
            let last_of_its_key = self.pairs.get(j + 1).is_none_or(|next| {
                next.0 != prefix || entries[next.1 as usize].0 != entries[i as usize].0
            });
            if last_of_its_key {
                order.push(i);
            }
        }
        let fields = Fields::from_sorted(
            order
                .iter()
                .map(|&i| std::mem::take(&mut entries[i as usize]))
                .collect(),
        );
        // An order that drops members is not one to try on later objects.
        if order.len() == self.pairs.len() {
            self.orders.insert(0, order);
        }
        fields
    }
}

/// Whether `order` (arrival indexes) puts `entries` in strict key order.
fn sorts(order: &[u32], entries: &[(Key, FieldValue)]) -> bool {
    strictly_ascending(order.iter().map(|&i| entries[i as usize].0.as_str()))
}

/// Whether the keys come in strict key order. Each key's prefix is taken
/// once; whole keys are compared only where prefixes are equal.
fn strictly_ascending<'a>(keys: impl Iterator<Item = &'a str>) -> bool {
    let mut keys = keys.map(|key| (key_prefix(key), key));
    let Some(mut previous) = keys.next() else {
        return true;
    };
    keys.all(|key| {
        let ascending = previous.0 < key.0 || (previous.0 == key.0 && previous.1 < key.1);
        previous = key;
        ascending
    })
}

/// A key's first eight bytes as a big-endian integer, zero-padded: integer
/// order agrees with byte order (ties go to the whole keys).
fn key_prefix(key: &str) -> u64 {
    let bytes = key.as_bytes();
    match bytes.first_chunk::<8>() {
        Some(first) => u64::from_be_bytes(*first),
        // Shifts, not a copy into a padded array (a `memcpy` call).
        None => bytes
            .iter()
            .enumerate()
            .fold(0, |prefix, (i, &b)| prefix | u64::from(b) << (56 - 8 * i)),
    }
}

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a str, &'a FieldValue);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Key, FieldValue)>,
        fn(&'a (Key, FieldValue)) -> (&'a str, &'a FieldValue),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl From<Map<String, Value>> for Fields {
    fn from(map: Map<String, Value>) -> Self {
        // In key order already (byte order, as `key_prefix` orders them)
        // unless serde_json's `preserve_order` is on somewhere in the build.
        let entries: Vec<(Key, FieldValue)> =
            map.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        if strictly_ascending(entries.iter().map(|(k, _)| k.as_str())) {
            Fields(entries)
        } else {
            Fields::from_entries(entries)
        }
    }
}

impl From<Fields> for Map<String, Value> {
    fn from(fields: Fields) -> Self {
        fields.into_map()
    }
}

impl<K: Into<Key>, V: Into<FieldValue>> FromIterator<(K, V)> for Fields {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Fields::from_entries(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl Index<&str> for Fields {
    type Output = FieldValue;

    /// The member's value; panics if there is none (as `Map` does).
    fn index(&self, key: &str) -> &FieldValue {
        self.get(key)
            .unwrap_or_else(|| panic!("no member `{key}` in the object"))
    }
}

impl serde::Serialize for Fields {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Map::deserialize(deserializer).map(Fields::from)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(pairs: &[(&str, i64)]) -> Fields {
        Fields::from_entries(
            pairs
                .iter()
                .map(|(k, v)| (Key::from(*k), json!(v).into()))
                .collect(),
        )
    }

    /// What `serde_json`'s map makes of the pairs: the reference.
    fn as_map(pairs: &[(&str, i64)]) -> Fields {
        let mut map = Map::new();
        for (k, v) in pairs {
            map.insert(k.to_string(), json!(v));
        }
        Fields::from(map)
    }

    #[test]
    fn room_for_members_is_the_largest_remembered_shape() {
        let object = |n: usize| -> Vec<(Key, FieldValue)> {
            (0..n)
                .map(|i| (Key::from(format!("k{i:02}")), FieldValue::default()))
                .collect()
        };
        let mut sorter = KeySorter::default();
        assert_eq!(sorter.entries().capacity(), 24);
        sorter.fields(object(13));
        sorter.fields(object(12));
        assert_eq!(sorter.entries().capacity(), 13);
        // Remembered shapes age out: four of 5 members leave room for 5.
        for n in [2, 3, 4, 5] {
            sorter.fields(object(n));
        }
        assert_eq!(sorter.entries().capacity(), 5);
        // An object with more members than there is room for still fits.
        let mut more = sorter.entries();
        more.extend(object(30));
        assert_eq!(sorter.fields(more).len(), 30);
    }

    #[test]
    fn sorted_like_a_map_with_the_last_of_a_repeated_key() {
        // Keys alike in their first eight bytes, shorter than eight, empty,
        // prefixes of each other, with bytes above 0x7f, repeated apart.
        let keys = [
            "onPremisesSyncEnabled",
            "id",
            "onPremisesImmutableId",
            "",
            "onPremises",
            "onPremise",
            "mail",
            "onPremisesSyncEnabled",
            "b",
            "onPremisesA",
            "zoë",
            "zo",
            "z\u{7f}",
            "mail",
            "mailNickname",
            "mailNicknam",
        ];
        // Many orders of the same keys (a simple permutation walk).
        for shift in 0..keys.len() {
            for step in [1, 3, 5, 7] {
                let order: Vec<(&str, i64)> = (0..keys.len())
                    .map(|i| {
                        let at = (shift + i * step) % keys.len();
                        (keys[at], i as i64)
                    })
                    .collect();
                let mine = fields(&order);
                let mut map = Map::new();
                for (k, v) in &order {
                    map.insert(k.to_string(), json!(v));
                }
                assert_eq!(mine.clone().into_map(), map, "{order:?}");
                assert_eq!(
                    mine.keys().collect::<Vec<_>>(),
                    map.keys().collect::<Vec<_>>()
                );
                for k in keys {
                    assert_eq!(mine.get(k).unwrap(), map.get(k).unwrap(), "{k}");
                    assert_eq!(mine[k], map[k]);
                }
                assert_eq!(mine.get("absent"), None);
                assert_eq!(Fields::from(map), mine);
            }
        }
    }

    #[test]
    fn the_sorter_agrees_with_sorting_whatever_the_previous_object() {
        let a = [("b", 1), ("a", 2), ("c", 3)];
        let same_keys_other_order = [("a", 4), ("c", 5), ("b", 6)];
        let repeated = [("b", 7), ("a", 8), ("b", 9)];
        let fewer = [("b", 10), ("a", 11)];
        let shorter_keys = [("bb", 12), ("a", 13), ("c", 14)];
        let same_size_other_keys = [("z", 15), ("a", 16), ("c", 17)];
        let alike_prefixes = [("onPremisesB", 18), ("onPremisesA", 19), ("onPremises", 20)];
        let mut sorter = KeySorter::default();
        for objects in [
            vec![
                &a[..],
                &a,
                &same_keys_other_order,
                &a,
                &repeated,
                &repeated,
                &a,
            ],
            vec![&repeated[..], &fewer, &a, &shorter_keys, &a, &a, &fewer],
            vec![
                &a[..],
                &same_size_other_keys,
                &a,
                &alike_prefixes,
                &a,
                &alike_prefixes,
            ],
        ] {
            for pairs in objects {
                let entries: Vec<(Key, FieldValue)> = pairs
                    .iter()
                    .map(|(k, v)| (Key::from(*k), json!(v).into()))
                    .collect();
                assert_eq!(sorter.fields(entries), as_map(pairs), "{pairs:?}");
            }
        }
        // Every sequence of four, through one sorter: whatever orders it
        // remembers (up to four, of any of these shapes).
        let all: [&[(&str, i64)]; 7] = [
            &a,
            &same_keys_other_order,
            &repeated,
            &fewer,
            &shorter_keys,
            &same_size_other_keys,
            &alike_prefixes,
        ];
        let mut sorter = KeySorter::default();
        for n in 0..all.len().pow(4) {
            let sequence = [n % 7, n / 7 % 7, n / 49 % 7, n / 343 % 7];
            for pairs in sequence.map(|i| all[i]) {
                let entries: Vec<(Key, FieldValue)> = pairs
                    .iter()
                    .map(|(k, v)| (Key::from(*k), json!(v).into()))
                    .collect();
                assert_eq!(sorter.fields(entries), as_map(pairs), "{sequence:?}");
            }
        }
    }

    #[test]
    fn keys_starting_with_at_are_found_among_any_others() {
        for (keys, expected) in [
            (&[][..], false),
            (&["a", "b"][..], false),
            (&["x@odata.context", "a"][..], false),
            (&["?", "#", "0", "A"][..], false),
            (&["@"][..], true),
            (&["@removed", "id"][..], true),
            (&["$x", "#y", "9", "@odata.type", "a", "~"][..], true),
            (&["\u{0}", "@", "@@"][..], true),
            (&["?", "A@b", "\u{7f}"][..], false),
        ] {
            let f = fields(&keys.iter().map(|k| (*k, 1)).collect::<Vec<_>>());
            assert_eq!(f.has_key_starting_with_at(), expected, "{keys:?}");
        }
    }

    #[test]
    fn insert_remove_retain_keep_the_order() {
        let mut f = fields(&[("b", 1), ("a", 2)]);
        assert_eq!(f.insert("c", json!(3)), None);
        assert_eq!(f.insert("a", json!(4)), Some(json!(2).into()));
        assert_eq!(f.insert("", json!(5)), None);
        assert_eq!(f.keys().collect::<Vec<_>>(), ["", "a", "b", "c"]);
        assert_eq!(f.remove("b"), Some(json!(1).into()));
        assert_eq!(f.remove("b"), None);
        f.retain(|k, _| k != "c");
        assert_eq!(serde_json::to_value(&f).unwrap(), json!({"": 5, "a": 4}));
        let back: Fields = serde_json::from_value(json!({"z": 1, "y": 2})).unwrap();
        assert_eq!(back.keys().collect::<Vec<_>>(), ["y", "z"]);
        assert_eq!(back.len(), 2);
        f.clear();
        assert!(f.is_empty());
    }

    /// Every kind of JSON value, parsed as a member's value and as a
    /// `serde_json::Value`: the same JSON, and strings always inline or
    /// heap `Str`, never `Json`.
    #[test]
    fn values_parse_as_serde_json_reads_them() {
        for text in [
            r#""""#,
            r#""twenty-four bytes, inline""#,
            r#""twenty-five bytes, on heap""#,
            r#""esc\"aped \u00e9 \ud83d\ude00 \n \/""#,
            "0",
            "-9223372036854775808",
            "18446744073709551615",
            "1.5",
            "-0.0",
            "true",
            "false",
            "null",
            "[]",
            r#"["+1 206 555 0100", 2, null]"#,
            r#"{"b": [1, "x"], "a": {"c": true}}"#,
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            let parsed: FieldValue = serde_json::from_str(text).unwrap();
            assert_eq!(parsed, value, "{text}");
            assert_eq!(parsed, FieldValue::from(value.clone()), "{text}");
            assert_eq!(parsed.clone().into_value(), value, "{text}");
            assert_eq!(serde_json::to_value(&parsed).unwrap(), value, "{text}");
            assert_eq!(
                matches!(parsed, FieldValue::Str(_)),
                value.is_string(),
                "{text}"
            );
            assert_eq!(parsed.as_str(), value.as_str());
            assert_eq!(
                parsed.clone().into_string(),
                value.as_str().map(String::from)
            );
        }
        // A string held either way is the same value.
        let held = FieldValue::Json(json!("x"));
        assert_eq!(held, FieldValue::Str(Key::new("x")));
        assert_eq!(FieldValue::Str(Key::new("x")), held);
        assert_eq!(held.into_string().as_deref(), Some("x"));
        assert_ne!(FieldValue::Str(Key::new("1")), FieldValue::Json(json!(1)));
        assert_eq!(
            FieldValue::Json(json!({"reason": "changed"})).get("reason"),
            Some(&json!("changed"))
        );
    }
}
