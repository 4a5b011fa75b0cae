//! Durations in connector files: human strings (`"30s"`, `"5m"`,
//! `"1h30m"`), read with `humantime`. A bad one is refused with an example
//! of a good one (serde's position in the TOML error names the key).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

const FIX: &str = "write a duration like \"500ms\", \"30s\", \"5m\" or \"1h30m\"";

fn parse<E: serde::de::Error>(text: &str) -> Result<Duration, E> {
    humantime::parse_duration(text)
        .map_err(|e| E::custom(format!("`{text}` is not a duration ({e}): {FIX}")))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse(&String::deserialize(d)?)
}

pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    humantime_serde::serialize(value, s)
}

/// For `Option<Duration>` fields.
pub mod option {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| parse(&t))
            .transpose()
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::option::serialize(value, s)
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct T {
        #[serde(with = "super")]
        d: std::time::Duration,
    }

    #[test]
    fn a_bad_duration_shows_a_good_one() {
        let err = toml::from_str::<T>("d = \"5 parsecs\"")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`5 parsecs` is not a duration"), "{err}");
        assert!(err.contains("\"30s\""), "{err}");
        let ok: T = toml::from_str("d = \"1m30s\"").unwrap();
        assert_eq!(ok.d, std::time::Duration::from_secs(90));
    }
}
