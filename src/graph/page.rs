//! One delta response page: `value` plus exactly one of `@odata.nextLink`
//! (more pages) or `@odata.deltaLink` (round complete). A page that breaks
//! these rules is malformed and never reaches the normalizer.

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
};

use crate::proto::{
    Fields,
    fields::{Key, KeySorter},
};

/// A parsed delta page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The objects of `value`, each a JSON object with a string `id`.
    pub objects: Vec<Fields>,
    /// Where the round continues, or where the next round starts.
    pub link: PageLink,
    /// Size of the HTTP body, for metrics.
    pub body_bytes: usize,
}

/// The link a page ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageLink {
    /// `@odata.nextLink`: the round has more pages.
    Next(String),
    /// `@odata.deltaLink`: the round is complete; start the next round here.
    Delta(String),
}

impl PageLink {
    pub fn url(&self) -> &str {
        match self {
            PageLink::Next(u) | PageLink::Delta(u) => u,
        }
    }

    pub fn is_delta(&self) -> bool {
        matches!(self, PageLink::Delta(_))
    }
}

#[derive(Deserialize)]
struct RawPage {
    #[serde(rename = "@odata.nextLink", default)]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink", default)]
    delta_link: Option<String>,
    #[serde(default, deserialize_with = "items")]
    value: Option<Vec<Item>>,
}

/// The elements of `value` (`null` counts as absent), their members
/// sorted by one [`KeySorter`].
fn items<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<Item>>, D::Error> {
    deserializer.deserialize_any(ItemsVisitor)
}

struct ItemsVisitor;

impl<'de> Visitor<'de> for ItemsVisitor {
    type Value = Option<Vec<Item>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut sorter = KeySorter::default();
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(ItemSeed(&mut sorter))? {
            items.push(item);
        }
        Ok(Some(items))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// An element of `value`: an object, or anything else (an error, reported
/// with its index once the whole page has parsed).
enum Item {
    Object(Fields),
    NotAnObject,
}

struct ItemSeed<'s>(&'s mut KeySorter);

impl<'de> DeserializeSeed<'de> for ItemSeed<'_> {
    type Value = Item;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Item, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemSeed<'_> {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    /// The members in Graph's order, sorted once ([`Fields`]).
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
        let mut entries = self.0.entries();
        while let Some(key) = map.next_key::<Key>()? {
            entries.push((key, map.next_value()?));
        }
        Ok(Item::Object(self.0.fields(entries)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Item::NotAnObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Item, E> {
        Ok(Item::NotAnObject)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Item, E> {
        Ok(Item::NotAnObject)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Item, E> {
        Ok(Item::NotAnObject)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Item, E> {
        Ok(Item::NotAnObject)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Item, E> {
        Ok(Item::NotAnObject)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Item, E> {
        Ok(Item::NotAnObject)
    }
}

/// Parses and checks a page body. The error explains what is wrong without
/// quoting the body (which may be large or hold personal data).
pub fn parse_page(body: &[u8]) -> Result<Page, String> {
    let truncated = || {
        format!(
            "body ends early ({} bytes received): truncated response",
            body.len()
        )
    };
    // Checked once for the whole body (ASCII runs a word at a time), so
    // that the parser need not check every string it reads.
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        // A character cut off at the end.
        Err(e) if e.error_len().is_none() => return Err(truncated()),
        Err(e) => {
            return Err(format!(
                "invalid JSON: the body is not UTF-8 (at byte {})",
                e.valid_up_to()
            ));
        }
    };
    let raw: RawPage = serde_json::from_str(text).map_err(|e| {
        if e.is_eof() {
            truncated()
        } else {
            format!("invalid JSON: {e}")
        }
    })?;
    let Some(value) = raw.value else {
        return Err("no `value` array".to_string());
    };
    let link = match (raw.next_link, raw.delta_link) {
        (Some(next), None) => PageLink::Next(next),
        (None, Some(delta)) => PageLink::Delta(delta),
        (Some(_), Some(_)) => {
            return Err("both @odata.nextLink and @odata.deltaLink are present".to_string());
        }
        (None, None) => {
            return Err("neither @odata.nextLink nor @odata.deltaLink is present".to_string());
        }
    };
    let mut objects = Vec::with_capacity(value.len());
    for (i, item) in value.into_iter().enumerate() {
        let Item::Object(object) = item else {
            return Err(format!("value[{i}] is not a JSON object"));
        };
        match object.get("id").map(|id| id.as_str()) {
            Some(Some(id)) if !id.is_empty() => {}
            Some(_) => {
                return Err(format!(
                    "value[{i}] has an `id` that is not a non-empty string"
                ));
            }
            None => return Err(format!("value[{i}] has no `id`")),
        }
        objects.push(object);
    }
    Ok(Page {
        objects,
        link,
        body_bytes: body.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_and_delta_pages() {
        let p = parse_page(br#"{"@odata.nextLink":"https://g/next","value":[{"id":"a","x":1}]}"#)
            .unwrap();
        assert_eq!(p.link, PageLink::Next("https://g/next".into()));
        assert_eq!(p.objects.len(), 1);
        // Keys sorted, a repeated key keeps its last value, nested objects
        // and arrays as they were.
        let p = parse_page(
            br#"{"@odata.nextLink":"n","value":[{"z":[1,{"b":2,"a":1}],"id":"a","x":1,"x":2,"m":{}}]}"#,
        )
        .unwrap();
        let o = &p.objects[0];
        assert_eq!(o.keys().collect::<Vec<_>>(), ["id", "m", "x", "z"]);
        assert_eq!(o["x"], serde_json::json!(2));
        assert_eq!(
            serde_json::Value::Object(o.clone().into_map()),
            serde_json::json!({"id":"a","x":2,"m":{},"z":[1,{"a":1,"b":2}]})
        );
        let p =
            parse_page(br#"{"@odata.context":"c","@odata.deltaLink":"https://g/d","value":[]}"#)
                .unwrap();
        assert!(p.link.is_delta());
        assert!(p.objects.is_empty());
    }

    #[test]
    fn broken_pages_are_explained() {
        let full = br#"{"@odata.nextLink":"https://g/next","value":[{"id":"a"}]}"#;
        let err = parse_page(&full[..full.len() - 5]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(
            parse_page(br#"{"value":[]}"#)
                .unwrap_err()
                .contains("neither")
        );
        assert!(
            parse_page(br#"{"@odata.deltaLink":"d","value":[{"displayName":"x"}]}"#)
                .unwrap_err()
                .contains("no `id`")
        );
        for not_an_object in ["1", "\"a\"", "null", "true", "[1,[2]]", "-1.5"] {
            let body =
                format!(r#"{{"@odata.deltaLink":"d","value":[{{"id":"a"}},{not_an_object}]}}"#);
            assert!(
                parse_page(body.as_bytes())
                    .unwrap_err()
                    .contains("value[1] is not a JSON object"),
                "{body}"
            );
        }
        assert!(
            parse_page(br#"{"@odata.deltaLink":"d","@odata.nextLink":"n","value":[]}"#)
                .unwrap_err()
                .contains("both")
        );
        assert!(
            parse_page(br#"{"@odata.deltaLink":"d"}"#)
                .unwrap_err()
                .contains("no `value` array")
        );
        assert!(
            parse_page(br#"{"@odata.deltaLink":"d","value":null}"#)
                .unwrap_err()
                .contains("no `value` array")
        );
        let err = parse_page(br#"{"@odata.deltaLink":"d","value":{"id":"a"}}"#).unwrap_err();
        assert!(
            err.contains("invalid JSON") && err.contains("expected an array"),
            "{err}"
        );
        // Objects alike and not: the remembered key order is only reused
        // for the same keys in the same order.
        let p = parse_page(
            br#"{"@odata.deltaLink":"d","value":[{"b":1,"id":"x","a":2},{"b":3,"id":"y","a":4},{"id":"z","b":5,"a":6},{"b":7,"id":"w","b":8},{"b":9,"id":"v","a":0}]}"#,
        )
        .unwrap();
        let keys: Vec<Vec<&str>> = p.objects.iter().map(|o| o.keys().collect()).collect();
        assert_eq!(keys[0], ["a", "b", "id"]);
        assert_eq!(keys[1], ["a", "b", "id"]);
        assert_eq!(keys[2], ["a", "b", "id"]);
        assert_eq!(keys[3], ["b", "id"]);
        assert_eq!(p.objects[3]["b"], serde_json::json!(8));
        assert_eq!(keys[4], ["a", "b", "id"]);
        assert_eq!(p.objects[1]["a"], serde_json::json!(4));
        assert_eq!(p.objects[4]["id"].as_str(), Some("v"));
        // Cut inside a character, or not UTF-8 at all.
        let accented = r#"{"@odata.deltaLink":"d","value":[{"id":"a","displayName":"Zoë"}]}"#;
        let cut = accented.find('ë').unwrap() + 1;
        assert!(
            parse_page(&accented.as_bytes()[..cut])
                .unwrap_err()
                .contains("truncated")
        );
        let mut latin1 = accented.as_bytes().to_vec();
        latin1.splice(cut - 1..cut + 1, [0xeb]);
        let err = parse_page(&latin1).unwrap_err();
        assert!(
            err.contains("not UTF-8") && err.contains(&format!("byte {}", cut - 1)),
            "{err}"
        );
        assert_eq!(
            parse_page(accented.as_bytes()).unwrap().objects[0]["displayName"].as_str(),
            Some("Zoë")
        );
        // Microsoft's own example 3 of directoryObject delta has a trailing comma.
        assert!(
            parse_page(br#"{"@odata.deltaLink":"d","value":[{"id":"a",}]}"#)
                .unwrap_err()
                .contains("invalid JSON")
        );
    }
}
