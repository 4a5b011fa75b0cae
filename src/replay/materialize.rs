//! Folding change events into current state.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    normalize::struct_to_json,
    proto::v1::{ChangeEvent, ChangeType, MemberChangeType},
};

/// Where an object stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectStatus {
    Live,
    SoftDeleted,
    /// Kept only to recognise late duplicates; not part of the state.
    HardDeleted,
}

/// One object's current state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Materialized {
    pub object_type: String,
    pub status: ObjectStatus,
    /// The version of the last event applied.
    pub version: u64,
    /// Latest value of every property ever reported (nulls cleared).
    pub properties: Map<String, Value>,
    /// Relationship (`members`, `owners`) → member ids.
    pub members: BTreeMap<String, BTreeSet<String>>,
}

/// Counters of a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayStats {
    /// Events read.
    pub events: u64,
    /// Events applied.
    pub applied: u64,
    /// Events skipped as duplicates or older than the state.
    pub duplicates: u64,
    /// Kafka tombstones (null-value records) read; they carry nothing the
    /// `HARD_DELETED` event before them did not.
    pub tombstones: u64,
    /// Records of other streams sharing the topic, queue or file, skipped.
    pub other_streams: u64,
}

/// The state of one stream, rebuilt from its events.
#[derive(Debug, Default)]
pub struct Materializer {
    objects: BTreeMap<String, Materialized>,
    stats: ReplayStats,
}

impl Materializer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event (in stream order). Returns false for a duplicate.
    pub fn apply(&mut self, event: &ChangeEvent) -> bool {
        self.stats.events += 1;
        let change = event.change_type();
        let entry = self
            .objects
            .entry(event.object_id.clone())
            .or_insert_with(|| Materialized {
                object_type: event.object_type.clone(),
                status: ObjectStatus::HardDeleted,
                version: 0,
                properties: Map::new(),
                members: BTreeMap::new(),
            });
        if event.object_version <= entry.version {
            self.stats.duplicates += 1;
            return false;
        }
        self.stats.applied += 1;
        entry.version = event.object_version;
        if !event.object_type.is_empty() {
            entry.object_type = event.object_type.clone();
        }
        let properties = event
            .properties
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_default();
        let step = transition(entry.status, change);
        entry.status = step.status;
        if step.reset {
            entry.properties.clear();
            entry.members.clear();
        }
        if step.status != ObjectStatus::HardDeleted {
            merge(&mut entry.properties, properties);
        }
        if entry.status != ObjectStatus::HardDeleted {
            for m in &event.member_changes {
                let set = entry.members.entry(m.relationship.clone()).or_default();
                match m.change() {
                    MemberChangeType::MemberChangeAdded => {
                        set.insert(m.member_id.clone());
                    }
                    MemberChangeType::MemberChangeRemoved => {
                        set.remove(&m.member_id);
                    }
                    MemberChangeType::Unspecified => {}
                }
            }
            entry.members.retain(|_, set| !set.is_empty());
        }
        true
    }

    /// Objects that exist (live or soft-deleted), by id.
    pub fn objects(&self) -> impl Iterator<Item = (&String, &Materialized)> {
        self.objects
            .iter()
            .filter(|(_, o)| o.status != ObjectStatus::HardDeleted)
    }

    pub fn get(&self, id: &str) -> Option<&Materialized> {
        self.objects
            .get(id)
            .filter(|o| o.status != ObjectStatus::HardDeleted)
    }

    pub fn stats(&self) -> ReplayStats {
        self.stats
    }
}

/// A state built elsewhere (a replay's output store), for comparisons.
impl FromIterator<(String, Materialized)> for Materializer {
    fn from_iter<I: IntoIterator<Item = (String, Materialized)>>(iter: I) -> Self {
        Self {
            objects: iter.into_iter().collect(),
            stats: ReplayStats::default(),
        }
    }
}

/// What an event does to an object, given where the object stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    /// Where the object stands afterwards.
    pub status: ObjectStatus,
    /// The event starts a new lifecycle (or ends one): properties and
    /// memberships from before do not carry over.
    pub reset: bool,
}

/// The one folding rule, shared by [`Materializer`] and the SQLite store
/// (`super::store`). An object never seen stands as `HardDeleted`.
pub(crate) fn transition(current: ObjectStatus, change: ChangeType) -> Transition {
    let gone = current == ObjectStatus::HardDeleted;
    match change {
        // A new lifecycle: nothing from before carries over.
        ChangeType::Created => Transition {
            status: ObjectStatus::Live,
            reset: true,
        },
        ChangeType::Updated | ChangeType::Restored | ChangeType::Unspecified => Transition {
            status: ObjectStatus::Live,
            reset: gone,
        },
        ChangeType::SoftDeleted => Transition {
            status: ObjectStatus::SoftDeleted,
            reset: gone,
        },
        ChangeType::HardDeleted => Transition {
            status: ObjectStatus::HardDeleted,
            reset: true,
        },
    }
}

/// Per-property merge: a value replaces, an explicit null clears.
pub(crate) fn merge(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        if v.is_null() {
            into.remove(&k);
        } else {
            into.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        normalize::{RoundContext, StreamContext, memory::MapMemory, normalize_page},
        proto::v1::ChangeEvent,
    };

    fn events(m: &mut MapMemory, pages: Vec<serde_json::Value>) -> Vec<ChangeEvent> {
        let ctx = StreamContext::new("t", "g", "groups", "microsoft.graph.group", true);
        let mut out = vec![];
        for p in pages {
            let objects = p
                .as_array()
                .unwrap()
                .iter()
                .map(|o| crate::proto::Fields::from(o.as_object().unwrap().clone()))
                .collect();
            let n = normalize_page(&ctx, &RoundContext::now(1, false), objects, m).unwrap();
            m.commit(&n.writes);
            out.extend(n.events);
        }
        out
    }

    #[test]
    fn merges_per_property_and_skips_duplicates() {
        let mut mem = MapMemory::default();
        let evs = events(
            &mut mem,
            vec![
                json!([{"id": "g", "displayName": "G", "description": "d", "members@delta": [{"id": "u1"}, {"id": "u2"}]}]),
                json!([{"id": "g", "description": null, "members@delta": [{"id": "u1", "@removed": {"reason": "deleted"}}]}]),
                json!([{"id": "x", "displayName": "X"}]),
                json!([{"id": "x", "@removed": {"reason": "changed"}}]),
                json!([{"id": "y", "displayName": "Y"}]),
                json!([{"id": "y", "@removed": {"reason": "deleted"}}]),
            ],
        );
        let mut m = Materializer::new();
        for e in &evs {
            m.apply(e);
        }
        // At-least-once: the whole stream again, then a suffix again.
        for e in evs.iter().chain(evs[2..].iter()) {
            assert!(!m.apply(e));
        }
        let g = m.get("g").unwrap();
        assert_eq!(
            g.properties,
            json!({"displayName": "G"}).as_object().unwrap().clone()
        );
        assert_eq!(g.members["members"], BTreeSet::from(["u2".to_string()]));
        assert_eq!(m.get("x").unwrap().status, ObjectStatus::SoftDeleted);
        assert!(m.get("y").is_none());
        assert_eq!(m.objects().count(), 2);
        assert_eq!(m.stats().applied, evs.len() as u64);
        assert_eq!(m.stats().duplicates, (evs.len() * 2 - 2) as u64);
    }
}
