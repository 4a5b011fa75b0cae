//! From Graph objects to [`ChangeEvent`]s.
//!
//! Graph says only "this object is in the round" (or `@removed`); what kind
//! of change it is follows from the connector's memory ([`memory`]):
//!
//! | Graph sends                         | memory                 | event                        |
//! |-------------------------------------|------------------------|------------------------------|
//! | object, no annotation               | unknown                | CREATED                      |
//! | object, no annotation               | live                   | UPDATED if a tracked property or membership changed, else nothing |
//! | object, no annotation               | soft-deleted           | RESTORED                     |
//! | `@removed: {"reason": "changed"}`   | unknown or live        | SOFT_DELETED                 |
//! | `@removed: {"reason": "changed"}`   | soft-deleted           | nothing (a replay)           |
//! | `@removed: {"reason": "deleted"}`   | any                    | HARD_DELETED, memory forgets |
//!
//! Changed properties are computed against per-property hashes ([`hash`]),
//! so they are exact in both response modes: under `Prefer: return=minimal`
//! they are the properties present whose value differs from memory. Every
//! `<relationship>@delta` entry becomes a [`MemberChange`]; an added member
//! the memory already has is a replay and is not reported again.
//!
//! Event ids are UUIDv8 holding the xxh3-128 of (a namespace per tenant and
//! stream, object id, per-object version, change type, content hash)
//! ([`event_id`]): re-normalizing the same page from the same committed
//! memory, as after a crash, yields the same ids.
//!
//! A page's events are handed on as [`ChangeEvent`]s, or, for sinks that
//! write only their JSON lines, written as JSON while they are made
//! ([`EventsOut`]).

pub mod filter;
pub mod hash;
pub mod memory;

use std::{borrow::Cow, time::SystemTime};

use pbjson_types::Timestamp;
use serde_json::{Map, Value};
use uuid::Uuid;

use self::memory::{MemberKey, MemberRow, MemoryView, PropertyHashes, StateWrites};
use crate::{
    checkpoint::CheckpointError,
    config::ResolvedStream,
    proto::{
        Fields, JsonStruct,
        fields::FieldValue,
        json::{ChangedNames, EventView, JsonWriter},
        v1::{ChangeEvent, ChangeType, MemberChange, MemberChangeType, ObjectState},
    },
};

/// The stream an object belongs to.
#[derive(Debug, Clone)]
pub struct StreamContext {
    pub tenant_id: String,
    pub stream: String,
    pub resource: String,
    /// Type of objects that carry no `@odata.type`.
    pub default_object_type: String,
    /// Whether full rounds list every membership of every group.
    pub tracks_members: bool,
    namespace: Uuid,
}

impl StreamContext {
    pub fn new(
        tenant_id: &str,
        stream: &str,
        resource: &str,
        default_object_type: &str,
        tracks_members: bool,
    ) -> Self {
        let namespace = Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            format!("graphdelta:{tenant_id}:{stream}").as_bytes(),
        );
        Self {
            tenant_id: tenant_id.to_string(),
            stream: stream.to_string(),
            resource: resource.to_string(),
            default_object_type: default_object_type.to_string(),
            tracks_members,
            namespace,
        }
    }

    pub fn from_resolved(r: &ResolvedStream) -> Self {
        Self::new(
            &r.graph.tenant_id,
            &r.stream.name,
            &r.stream.resource,
            r.default_object_type(),
            r.stream.tracks_members(),
        )
    }

    /// Relationships whose memberships a full round lists completely, so
    /// that reconciliation may infer removals.
    pub fn reconciled_relationships(&self) -> &'static [&'static str] {
        if self.tracks_members {
            &["members"]
        } else {
            &[]
        }
    }
}

/// The round a page belongs to.
#[derive(Debug, Clone)]
pub struct RoundContext {
    /// Number of the latest full round (objects seen are marked with it).
    pub round: u64,
    /// True in full rounds (initial, resync): events get `snapshot = true`.
    pub snapshot: bool,
    /// A resnapshot: announce every object, not only changes (known live
    /// objects as UPDATED with their full properties, every listed member
    /// as added).
    pub resnapshot: bool,
    pub observed_at: Timestamp,
}

impl RoundContext {
    pub fn now(round: u64, snapshot: bool) -> Self {
        Self {
            round,
            snapshot,
            resnapshot: false,
            observed_at: timestamp(SystemTime::now()),
        }
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The events of a page and the memory changes that go with them.
#[derive(Debug, Default)]
pub struct Normalized {
    /// The events, with [`EventsOut::Events`].
    pub events: Vec<ChangeEvent>,
    /// The events as JSON lines, with [`EventsOut::JsonLines`].
    pub json_lines: Vec<u8>,
    /// How many events, in either form.
    pub counts: EventCounts,
    pub writes: StateWrites,
}

/// The form in which [`normalize_page_as`] hands on a page's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsOut {
    /// Assembled as [`ChangeEvent`]s.
    Events,
    /// Written as JSON lines as they are made, never assembled: what the
    /// file and stdout sinks write. A `ChangeEvent` is a struct of
    /// `String`s; assembling one copied the tenant, stream, resource,
    /// object type and id and every changed property's name (≈ 19
    /// allocations for a created user) for a writer that only reads them.
    JsonLines,
}

/// A batch's number of events, by change type.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventCounts {
    pub total: usize,
    /// Indexed by `ChangeType`.
    pub by_change: [u64; 6],
}

impl EventCounts {
    pub fn of(events: &[ChangeEvent]) -> EventCounts {
        let mut counts = EventCounts::default();
        for e in events {
            counts.add(e.change_type);
        }
        counts
    }

    fn add(&mut self, change_type: i32) {
        self.total += 1;
        self.by_change[change_type as usize % 6] += 1;
    }
}

/// An object Graph sent that cannot be turned into an event. The page is
/// rejected as a whole: nothing of it is published or committed.
#[derive(Debug, thiserror::Error)]
pub enum NormalizeError {
    #[error(
        "object `{id}`: unknown @removed reason `{reason}` (Graph documents `changed` and `deleted`); the page is not committed"
    )]
    UnknownRemovedReason { id: String, reason: String },
    #[error(
        "object `{id}`: entry {index} of `{relationship}@delta` has no string `id`; the page is not committed"
    )]
    BadRelationshipEntry {
        id: String,
        relationship: String,
        index: usize,
    },
    #[error("object `{id}`: `{relationship}@delta` is not an array; the page is not committed")]
    BadRelationship { id: String, relationship: String },
    #[error("an object has no string `id`; the page is not committed")]
    MissingId,
    #[error(transparent)]
    Memory(#[from] CheckpointError),
}

enum Removed {
    No,
    Changed,
    Deleted,
}

/// Normalizes one page. `memory` is what was committed (plus pending
/// batches); the result's writes must be committed with the page's
/// checkpoint.
pub fn normalize_page(
    ctx: &StreamContext,
    round: &RoundContext,
    objects: Vec<Fields>,
    memory: &mut dyn MemoryView,
) -> Result<Normalized, NormalizeError> {
    normalize_page_as(ctx, round, objects, memory, EventsOut::Events)
}

/// [`normalize_page`], its events handed on in the form `out` asks for.
pub fn normalize_page_as(
    ctx: &StreamContext,
    round: &RoundContext,
    objects: Vec<Fields>,
    memory: &mut dyn MemoryView,
    out: EventsOut,
) -> Result<Normalized, NormalizeError> {
    // Each object's id, taken out of it once.
    let objects = objects
        .into_iter()
        .map(
            |mut object| match object.remove("id").and_then(FieldValue::into_string) {
                Some(id) if !id.is_empty() => Ok((id, object)),
                _ => Err(NormalizeError::MissingId),
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    let ids: Vec<&str> = objects.iter().map(|(id, _)| id.as_str()).collect();
    memory.prefetch(&ids)?;
    drop(ids);
    let mut n = Normalizer {
        ctx,
        round,
        memory,
        hash_order: HashOrder::default(),
        changed: Vec::new(),
        form: out,
        json: JsonWriter::default(),
        objects_left: objects.len(),
        out: Normalized {
            // Nearly every object of a full round makes an event.
            events: Vec::with_capacity(match out {
                EventsOut::Events => objects.len(),
                EventsOut::JsonLines => 0,
            }),
            ..Normalized::default()
        },
    };
    n.out.writes.objects.reserve(objects.len());
    for (id, object) in objects {
        n.objects_left -= 1;
        n.object(id, object)?;
    }
    Ok(n.out)
}

struct Normalizer<'a> {
    ctx: &'a StreamContext,
    round: &'a RoundContext,
    memory: &'a mut dyn MemoryView,
    /// Sorts new objects' property hashes (see [`HashOrder`]).
    hash_order: HashOrder,
    /// Scratch: the indices of an object's changed properties.
    changed: Vec<u32>,
    form: EventsOut,
    /// Writes the events with [`EventsOut::JsonLines`].
    json: JsonWriter,
    /// Objects of the page after the current one.
    objects_left: usize,
    out: Normalized,
}

impl Normalizer<'_> {
    fn current_object(&mut self, id: &str) -> Result<Option<ObjectState>, CheckpointError> {
        match self.out.writes.objects.get(id) {
            Some(state) => Ok(state.clone()),
            None => self.memory.object(id),
        }
    }

    fn current_member(&mut self, key: &MemberKey) -> Result<Option<MemberRow>, CheckpointError> {
        if let Some(row) = self.out.writes.members.get(key) {
            return Ok(row.clone());
        }
        if self.out.writes.forgotten_groups.contains(&key.group) {
            return Ok(None);
        }
        self.memory.member(key)
    }

    fn object(&mut self, id: String, mut object: Fields) -> Result<(), NormalizeError> {
        // Most objects have no key that starts with `@`: one search to
        // know, not one per annotation.
        let annotated = object.has_key_starting_with_at();
        let removed = match annotated.then(|| object.remove("@removed")).flatten() {
            None => Removed::No,
            Some(v) => match v.get("reason").and_then(Value::as_str) {
                Some("changed") => Removed::Changed,
                Some("deleted") => Removed::Deleted,
                other => {
                    return Err(NormalizeError::UnknownRemovedReason {
                        id,
                        reason: other.unwrap_or("<missing>").to_string(),
                    });
                }
            },
        };
        let sent_type = annotated
            .then(|| object.remove("@odata.type"))
            .flatten()
            .and_then(|t| t.as_str().map(|t| t.trim_start_matches('#').to_string()));
        let relationship_deltas = extract_relationship_deltas(&id, &mut object)?;
        // What remains minus annotations (`@odata.etag`, `x@odata.context`,
        // ...) is the object's properties as Graph returned them.
        if !object.keys().all(is_property) {
            object.retain(|k, _| is_property(k));
        }

        let remembered = self.current_object(&id)?;
        // A tombstone keeps the version counter of a hard-deleted object;
        // for everything else the object is gone.
        let tombstone = remembered.as_ref().is_some_and(|p| p.hard_deleted);
        let previous = remembered.clone().filter(|p| !p.hard_deleted);
        let ctx = self.ctx;
        let object_type: Cow<'_, str> = match sent_type {
            Some(t) => Cow::Owned(t),
            None => match remembered.as_ref().filter(|p| !p.object_type.is_empty()) {
                Some(p) => Cow::Owned(p.object_type.clone()),
                None => Cow::Borrowed(&ctx.default_object_type),
            },
        };

        if remembered.is_none() && !self.out.writes.objects.contains_key(&id) {
            self.out.writes.new_objects.insert(id.clone());
        }
        let mut state = match &previous {
            Some(p) => p.clone(),
            None => ObjectState {
                version: remembered.as_ref().map_or(0, |p| p.version),
                ..ObjectState::default()
            },
        };
        state.seen_round = self.round.round;
        state.object_type = if object_type == ctx.default_object_type {
            String::new()
        } else {
            object_type.clone().into_owned()
        };

        let mut content = hash::Mix::new(0);
        self.changed.clear();
        let change_type = match removed {
            Removed::Deleted => {
                self.out.writes.forget_group(&id);
                state.hard_deleted = true;
                state.soft_deleted = false;
                state.property_hashes.clear();
                // Deleted once already: a replay of that deletion.
                (!tombstone).then_some(ChangeType::HardDeleted)
            }
            Removed::Changed => {
                let replay = previous.as_ref().is_some_and(|p| p.soft_deleted);
                state.soft_deleted = true;
                (!replay).then_some(ChangeType::SoftDeleted)
            }
            Removed::No => {
                diff_properties(
                    &object,
                    &mut state,
                    previous.is_none(),
                    &mut content,
                    &mut self.hash_order,
                    &mut self.changed,
                );
                let kind = match &previous {
                    None => Some(ChangeType::Created),
                    Some(p) if p.soft_deleted => Some(ChangeType::Restored),
                    Some(_) => Some(ChangeType::Updated),
                };
                state.soft_deleted = false;
                kind
            }
        };

        let mut member_changes = Vec::new();
        if !matches!(removed, Removed::Deleted) {
            for (relationship, entries) in relationship_deltas {
                for entry in entries {
                    if let Some(change) =
                        self.member_entry(&id, &relationship, entry, &mut content)?
                    {
                        member_changes.push(change);
                    }
                }
            }
        }

        let change_type = match change_type {
            Some(ChangeType::Updated)
                if self.changed.is_empty()
                    && member_changes.is_empty()
                    && !self.round.resnapshot =>
            {
                None
            }
            other => other,
        };

        match change_type {
            None => {
                // Nothing to report; remember that the object was seen.
                if remembered.as_ref() != Some(&state) {
                    self.out.writes.objects.insert(id, Some(state));
                }
            }
            Some(change_type) => {
                state.version += 1;
                self.emit(
                    &id,
                    &object_type,
                    change_type,
                    state.version,
                    object,
                    member_changes,
                    content.finish(),
                );
                self.out.writes.objects.insert(id, Some(state));
            }
        }
        Ok(())
    }

    /// One `<relationship>@delta` entry: returns the change to report, if
    /// it is one, and updates the membership memory.
    fn member_entry(
        &mut self,
        group: &str,
        relationship: &str,
        entry: (String, String, bool),
        content: &mut hash::Mix,
    ) -> Result<Option<MemberChange>, CheckpointError> {
        let (member, member_type, removed) = entry;
        let key = MemberKey {
            group: group.to_string(),
            relationship: relationship.to_string(),
            member,
        };
        let current = self.current_member(&key)?;
        let change = if removed {
            self.out.writes.members.insert(key.clone(), None);
            Some(MemberChangeType::MemberChangeRemoved)
        } else {
            let row = MemberRow {
                member_type: member_type.clone(),
                seen_round: self.round.round,
            };
            let known = current.is_some();
            if current.as_ref() != Some(&row) {
                self.out.writes.members.insert(key.clone(), Some(row));
            }
            (!known || self.round.resnapshot).then_some(MemberChangeType::MemberChangeAdded)
        };
        Ok(change.map(|change| {
            content.add_bytes(relationship.as_bytes());
            content.add(change as u64);
            content.add_bytes(key.member.as_bytes());
            MemberChange {
                member_id: key.member,
                member_type,
                change: change as i32,
                relationship: relationship.to_string(),
            }
        }))
    }

    /// Hands on the event of an object, in the form asked for.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        id: &str,
        object_type: &str,
        change_type: ChangeType,
        version: u64,
        properties: Fields,
        member_changes: Vec<MemberChange>,
        content: u64,
    ) {
        let (ctx, round) = (self.ctx, self.round);
        self.out.counts.add(change_type as i32);
        match self.form {
            EventsOut::Events => {
                let changed_properties = self
                    .changed
                    .iter()
                    .map(|&i| properties.key_at(i as usize).to_owned())
                    .collect();
                let event = build_event(
                    ctx,
                    round,
                    EventParts {
                        id,
                        object_type: object_type.to_owned(),
                        change_type,
                        version,
                        properties: Some(to_struct(properties)),
                        changed_properties,
                        member_changes,
                        inferred: false,
                        content,
                    },
                );
                self.out.events.push(event);
            }
            EventsOut::JsonLines => {
                let event_id = event_id(ctx, id, version, change_type, false, content);
                let view = EventView {
                    event_id: event_id.as_str(),
                    tenant_id: &ctx.tenant_id,
                    stream: &ctx.stream,
                    resource: &ctx.resource,
                    object_type,
                    object_id: id,
                    change_type: change_type as i32,
                    snapshot: round.snapshot,
                    inferred: false,
                    properties: Some(&properties),
                    changed_properties: ChangedNames::Keys(&properties, &self.changed),
                    member_changes: &member_changes,
                    observed_at: Some(round.observed_at),
                    object_version: version,
                };
                let buf = &mut self.out.json_lines;
                let start = buf.len();
                self.json.write(&view, buf);
                buf.push(b'\n');
                if start == 0 {
                    // Room for the rest at the first one's size and a
                    // quarter, rather than growing (and copying) the batch
                    // several times.
                    let first = buf.len();
                    buf.reserve(self.objects_left * (first + first / 4));
                }
            }
        }
    }
}

/// Everything an event is made of.
pub struct EventParts<'a> {
    pub id: &'a str,
    pub object_type: String,
    pub change_type: ChangeType,
    pub version: u64,
    pub properties: Option<JsonStruct>,
    pub changed_properties: Vec<String>,
    pub member_changes: Vec<MemberChange>,
    pub inferred: bool,
    /// Hash of what changed; part of the event id.
    pub content: u64,
}

/// Assembles a [`ChangeEvent`] with its deterministic id.
pub fn build_event(ctx: &StreamContext, round: &RoundContext, p: EventParts<'_>) -> ChangeEvent {
    ChangeEvent {
        event_id: event_id(ctx, p.id, p.version, p.change_type, p.inferred, p.content)
            .as_str()
            .to_owned(),
        tenant_id: ctx.tenant_id.clone(),
        stream: ctx.stream.clone(),
        resource: ctx.resource.clone(),
        object_type: p.object_type,
        object_id: p.id.to_string(),
        change_type: p.change_type as i32,
        snapshot: round.snapshot,
        inferred: p.inferred,
        properties: p.properties,
        changed_properties: p.changed_properties,
        member_changes: p.member_changes,
        observed_at: Some(round.observed_at),
        object_version: p.version,
    }
}

/// The deterministic event id: a UUIDv8 (RFC 9562, custom) holding the
/// xxh3-128 of (stream namespace, object id, version, change, inferred,
/// content). The same change re-emitted after a crash gets the same id; any
/// two different events differ in at least one input.
pub fn event_id(
    ctx: &StreamContext,
    object_id: &str,
    version: u64,
    change: ChangeType,
    inferred: bool,
    content: u64,
) -> EventId {
    // namespace, id, separator, version, change, inferred, content.
    let mut name = Vec::with_capacity(16 + object_id.len() + 1 + 8 + 1 + 1 + 8);
    name.extend_from_slice(ctx.namespace.as_bytes());
    name.extend_from_slice(object_id.as_bytes());
    name.push(0x1f);
    name.extend_from_slice(&version.to_le_bytes());
    name.push(change as u8);
    name.push(inferred as u8);
    name.extend_from_slice(&content.to_le_bytes());
    let digest = xxhash_rust::xxh3::xxh3_128(&name).to_be_bytes();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Builder::from_custom_bytes(digest)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut text);
    EventId(text)
}

/// An event id's text, held without an allocation (an event written as
/// JSON straight away needs no `String` of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventId([u8; uuid::fmt::Hyphenated::LENGTH]);

impl EventId {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a hyphenated UUID is ASCII")
    }
}

/// A key that is a property, not an annotation (`@odata.etag`,
/// `x@odata.context`, ...). Nearly every key has no `@` at all.
fn is_property(key: &str) -> bool {
    !has_at(key.as_bytes()) || (!key.starts_with('@') && !key.contains("@odata."))
}

/// Whether the bytes hold an `@`, eight at a time (a lane equal to `@`
/// sets its high bit: exact as a yes/no answer). A byte loop cost ≈ 4
/// instructions a byte, and `find` sets up a searcher.
#[inline]
fn has_at(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let word = |w: [u8; 8]| {
        let x = u64::from_le_bytes(w) ^ (ONES * u64::from(b'@'));
        x.wrapping_sub(ONES) & !x & (ONES << 7) != 0
    };
    let mut chunks = bytes.chunks_exact(8);
    if chunks.any(|c| word(c.try_into().expect("8 bytes"))) {
        return true;
    }
    match chunks.remainder() {
        [] => false,
        // The last eight bytes, overlapping the words checked.
        _ if bytes.len() >= 8 => word(bytes[bytes.len() - 8..].try_into().expect("8 bytes")),
        rest => rest.contains(&b'@'),
    }
}

/// Compares the properties with the remembered hashes, updating `state`;
/// puts the indices of changed properties in `changed`, in key order (the
/// order of `Fields`). For a new object every property present counts as
/// changed.
fn diff_properties(
    properties: &Fields,
    state: &mut ObjectState,
    is_new: bool,
    content: &mut hash::Mix,
    hash_order: &mut HashOrder,
    changed: &mut Vec<u32>,
) {
    changed.clear();
    if is_new {
        // Nothing to compare with: hash everything, sort once.
        let mut pairs = std::mem::take(&mut hash_order.pairs);
        pairs.clear();
        for (i, (name, value)) in properties.iter().enumerate() {
            let name_hash = hash::name_hash(name);
            let value_hash = hash::field_hash(value);
            changed.push(i as u32);
            content.add(name_hash);
            content.add(value_hash.unwrap_or(0));
            if let Some(v) = value_hash {
                pairs.push((name_hash, v));
            }
        }
        hash_order.sorted(&pairs, &mut state.property_hashes);
        hash_order.pairs = pairs;
    } else {
        for (i, (name, value)) in properties.iter().enumerate() {
            let name_hash = hash::name_hash(name);
            let value_hash = hash::field_hash(value);
            let before = state.property_hash(name_hash);
            if before != value_hash {
                changed.push(i as u32);
                content.add(name_hash);
                content.add(value_hash.unwrap_or(0));
                state.set_property_hash(name_hash, value_hash);
            }
        }
    }
}

/// Puts a new object's (name hash, value hash) pairs in name-hash order,
/// each name once, as `ObjectState::property_hashes` keeps them. Objects of
/// one page mostly come in a few shapes (the same properties in the same
/// key order, some left out), so the orders that sorted the last few
/// shapes are tried first: one comparison per pair to check one, where
/// sorting them cost ≈ 560 instructions a user.
#[derive(Debug, Default)]
struct HashOrder {
    /// Most recent first: a shape's name hashes in its key order, and the
    /// positions of its pairs in name-hash order, repeats left out.
    shapes: Vec<(Vec<u64>, Vec<usize>)>,
    /// Scratch: a new object's (name hash, value hash) pairs.
    pairs: Vec<(u64, u64)>,
}

/// Shapes a [`HashOrder`] remembers.
const REMEMBERED_SHAPES: usize = 4;

impl HashOrder {
    fn sorted(&mut self, pairs: &[(u64, u64)], out: &mut Vec<u64>) {
        let hit = self.shapes.iter().position(|(names, _)| {
            pairs.len() == names.len() && pairs.iter().zip(names).all(|(p, name)| p.0 == *name)
        });
        match hit {
            Some(k) => self.shapes[..=k].rotate_right(1),
            None => {
                let (mut names, mut order) = if self.shapes.len() == REMEMBERED_SHAPES {
                    self.shapes.pop().unwrap_or_default()
                } else {
                    Default::default()
                };
                names.clear();
                names.extend(pairs.iter().map(|p| p.0));
                order.clear();
                order.extend(0..pairs.len());
                // Stable: of pairs whose names hash alike, the first stays.
                order.sort_by_key(|&i| pairs[i].0);
                order.dedup_by_key(|i| pairs[*i].0);
                self.shapes.insert(0, (names, order));
            }
        }
        out.clear();
        out.reserve(self.shapes[0].1.len() * 2);
        for &i in &self.shapes[0].1 {
            out.extend_from_slice(&[pairs[i].0, pairs[i].1]);
        }
    }
}

/// Removes every `<relationship>@delta` array from the object and returns
/// its entries as (member id, member type, removed).
#[allow(clippy::type_complexity)]
fn extract_relationship_deltas(
    id: &str,
    object: &mut Fields,
) -> Result<Vec<(String, Vec<(String, String, bool)>)>, NormalizeError> {
    let keys: Vec<String> = object
        .keys()
        .filter(|k| k.ends_with("@delta") && k.len() > "@delta".len())
        .map(str::to_owned)
        .collect();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let relationship = key.trim_end_matches("@delta").to_string();
        let Some(FieldValue::Json(Value::Array(items))) = object.remove(&key) else {
            return Err(NormalizeError::BadRelationship {
                id: id.to_string(),
                relationship,
            });
        };
        let mut entries = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let member = item
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let Some(member) = member else {
                return Err(NormalizeError::BadRelationshipEntry {
                    id: id.to_string(),
                    relationship,
                    index,
                });
            };
            let member_type = item
                .get("@odata.type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim_start_matches('#')
                .to_string();
            let removed = item.get("@removed").is_some();
            entries.push((member.to_string(), member_type, removed));
        }
        out.push((relationship, entries));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// JSON object → `google.protobuf.Struct` (explicit nulls kept).
pub fn to_struct(fields: Fields) -> JsonStruct {
    JsonStruct::from(fields)
}

/// `google.protobuf.Struct` → JSON object (for replay and tools).
pub fn struct_to_json(s: &JsonStruct) -> Map<String, Value> {
    s.fields.clone().into_map()
}

/// Reconciliation after a full round: `id` was known but not returned, so
/// it was deleted during the gap. Returns the event and the write.
pub fn inferred_deletion(
    ctx: &StreamContext,
    round: &RoundContext,
    id: &str,
    state: &ObjectState,
) -> ChangeEvent {
    let object_type = if state.object_type.is_empty() {
        ctx.default_object_type.clone()
    } else {
        state.object_type.clone()
    };
    build_event(
        ctx,
        round,
        EventParts {
            id,
            object_type,
            change_type: ChangeType::HardDeleted,
            version: state.version + 1,
            properties: None,
            changed_properties: Vec::new(),
            member_changes: Vec::new(),
            inferred: true,
            content: 0,
        },
    )
}

/// The memory of an object after its (reported or inferred) hard deletion.
pub fn tombstone(state: &ObjectState) -> ObjectState {
    ObjectState {
        version: state.version + 1,
        soft_deleted: false,
        seen_round: state.seen_round,
        property_hashes: Vec::new(),
        object_type: state.object_type.clone(),
        hard_deleted: true,
    }
}

/// Reconciliation of a group listed in a full round: memberships it had
/// but the round did not list were removed during the gap.
pub fn inferred_member_removals(
    ctx: &StreamContext,
    round: &RoundContext,
    group: &str,
    state: &mut ObjectState,
    removed: Vec<(MemberKey, MemberRow)>,
) -> ChangeEvent {
    let mut content = hash::Mix::new(0);
    let member_changes = removed
        .into_iter()
        .map(|(key, row)| {
            content.add_bytes(key.relationship.as_bytes());
            content.add_bytes(key.member.as_bytes());
            MemberChange {
                member_id: key.member,
                member_type: row.member_type,
                change: MemberChangeType::MemberChangeRemoved as i32,
                relationship: key.relationship,
            }
        })
        .collect();
    state.version += 1;
    let object_type = if state.object_type.is_empty() {
        ctx.default_object_type.clone()
    } else {
        state.object_type.clone()
    };
    build_event(
        ctx,
        round,
        EventParts {
            id: group,
            object_type,
            change_type: ChangeType::Updated,
            version: state.version,
            properties: None,
            changed_properties: Vec::new(),
            member_changes,
            inferred: true,
            content: content.finish(),
        },
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{memory::MapMemory, *};

    fn ctx() -> StreamContext {
        StreamContext::new("t", "users", "users", "microsoft.graph.user", false)
    }

    fn groups_ctx() -> StreamContext {
        StreamContext::new("t", "groups", "groups", "microsoft.graph.group", true)
    }

    fn page(v: Value) -> Vec<Fields> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|o| Fields::from(o.as_object().unwrap().clone()))
            .collect()
    }

    fn run(ctx: &StreamContext, mem: &mut MapMemory, snapshot: bool, v: Value) -> Vec<ChangeEvent> {
        let round = RoundContext::now(1, snapshot);
        let n = normalize_both(ctx, &round, v, mem);
        mem.commit(&n.writes);
        n.events
    }

    /// Normalizes a page in both forms: the JSON lines written as the
    /// events are made must be those of the assembled events, byte for
    /// byte, with the same counts and memory changes. Returns the events.
    fn normalize_both(
        ctx: &StreamContext,
        round: &RoundContext,
        v: Value,
        mem: &mut MapMemory,
    ) -> Normalized {
        let n = normalize_page(ctx, round, page(v.clone()), mem).unwrap();
        let json = normalize_page_as(ctx, round, page(v), mem, EventsOut::JsonLines).unwrap();
        assert!(json.events.is_empty());
        assert_eq!(
            String::from_utf8(json.json_lines).unwrap(),
            String::from_utf8(crate::sink::encode_events(
                crate::proto::v1::EventsEncoding::JsonLines,
                &n.events
            ))
            .unwrap()
        );
        assert_eq!(json.counts.total, n.events.len());
        assert_eq!(json.counts.by_change, EventCounts::of(&n.events).by_change);
        assert_eq!(format!("{:?}", json.writes), format!("{:?}", n.writes));
        n
    }

    fn kinds(events: &[ChangeEvent]) -> Vec<(String, ChangeType)> {
        events
            .iter()
            .map(|e| (e.object_id.clone(), e.change_type()))
            .collect()
    }

    #[test]
    fn lifecycle_created_updated_soft_restored_hard() {
        let c = ctx();
        let mut m = MapMemory::default();
        let e = run(
            &c,
            &mut m,
            true,
            json!([{"id": "a", "displayName": "A", "mail": null}]),
        );
        assert_eq!(kinds(&e), vec![("a".into(), ChangeType::Created)]);
        assert_eq!(e[0].changed_properties, vec!["displayName", "mail"]);
        assert!(e[0].snapshot);
        assert_eq!(e[0].object_type, "microsoft.graph.user");
        assert_eq!(e[0].object_version, 1);

        // Same values again (full response mode): nothing to report.
        assert!(run(&c, &mut m, false, json!([{"id": "a", "displayName": "A"}])).is_empty());
        // An explicit null for a property never set is no change either.
        assert!(
            run(
                &c,
                &mut m,
                false,
                json!([{"id": "a", "displayName": "A", "mail": null}])
            )
            .is_empty()
        );

        let e = run(
            &c,
            &mut m,
            false,
            json!([{"id": "a", "displayName": "B", "mail": "x@y"}]),
        );
        assert_eq!(kinds(&e), vec![("a".into(), ChangeType::Updated)]);
        assert_eq!(e[0].changed_properties, vec!["displayName", "mail"]);
        assert!(!e[0].snapshot);

        // Cleared to null: changed, and null is kept in properties.
        let e = run(&c, &mut m, false, json!([{"id": "a", "mail": null}]));
        assert_eq!(e[0].changed_properties, vec!["mail"]);
        assert_eq!(
            e[0].properties.as_ref().unwrap().fields["mail"],
            Value::Null
        );

        let e = run(
            &c,
            &mut m,
            false,
            json!([{"id": "a", "@removed": {"reason": "changed"}}]),
        );
        assert_eq!(kinds(&e), vec![("a".into(), ChangeType::SoftDeleted)]);
        assert!(
            run(
                &c,
                &mut m,
                false,
                json!([{"id": "a", "@removed": {"reason": "changed"}}])
            )
            .is_empty()
        );

        let e = run(&c, &mut m, false, json!([{"id": "a", "displayName": "B"}]));
        assert_eq!(kinds(&e), vec![("a".into(), ChangeType::Restored)]);
        assert!(
            e[0].changed_properties.is_empty(),
            "nothing changed while deleted"
        );

        let e = run(
            &c,
            &mut m,
            false,
            json!([{"id": "a", "@removed": {"reason": "deleted"}}]),
        );
        assert_eq!(kinds(&e), vec![("a".into(), ChangeType::HardDeleted)]);
        assert_eq!(e[0].object_version, 6);
        // A tombstone remains: a replayed deletion is not reported again,
        // and the version never restarts.
        assert!(m.objects["a"].hard_deleted);
        assert!(m.objects["a"].property_hashes.is_empty());
        assert!(
            run(
                &c,
                &mut m,
                false,
                json!([{"id": "a", "@removed": {"reason": "deleted"}}])
            )
            .is_empty()
        );
        let e = run(&c, &mut m, false, json!([{"id": "a", "displayName": "B"}]));
        assert_eq!(kinds(&e), vec![("a".into(), ChangeType::Created)]);
        assert_eq!(e[0].object_version, 7);
        assert_eq!(e[0].changed_properties, vec!["displayName"]);
    }

    #[test]
    fn unseen_objects_arriving_deleted_still_emit() {
        let c = ctx();
        let mut m = MapMemory::default();
        let e = run(
            &c,
            &mut m,
            false,
            json!([
                {"id": "x", "@removed": {"reason": "changed"}},
                {"id": "y", "@removed": {"reason": "deleted"}}
            ]),
        );
        assert_eq!(
            kinds(&e),
            vec![
                ("x".into(), ChangeType::SoftDeleted),
                ("y".into(), ChangeType::HardDeleted)
            ]
        );
        // x is remembered as soft-deleted: its return is a restore.
        let e = run(&c, &mut m, false, json!([{"id": "x", "displayName": "X"}]));
        assert_eq!(kinds(&e), vec![("x".into(), ChangeType::Restored)]);
        assert_eq!(e[0].changed_properties, vec!["displayName"]);
    }

    #[test]
    fn minimal_mode_reports_only_real_changes() {
        let c = ctx();
        let mut m = MapMemory::default();
        run(
            &c,
            &mut m,
            true,
            json!([{"id": "a", "displayName": "A", "jobTitle": "J"}]),
        );
        let e = run(&c, &mut m, false, json!([{"id": "a", "jobTitle": "K"}]));
        assert_eq!(e[0].changed_properties, vec!["jobTitle"]);
        let props = e[0].properties.as_ref().unwrap();
        assert_eq!(
            props.fields.len(),
            1,
            "properties are as Graph returned them"
        );
    }

    #[test]
    fn annotations_are_removed_and_type_is_taken_from_odata_type() {
        let c = StreamContext::new(
            "t",
            "dir",
            "directoryObjects",
            "microsoft.graph.directoryObject",
            false,
        );
        let mut m = MapMemory::default();
        let e = run(
            &c,
            &mut m,
            true,
            json!([{"@odata.type": "#microsoft.graph.group", "@odata.etag": "W/1", "id": "g", "displayName": "G"}]),
        );
        assert_eq!(e[0].object_type, "microsoft.graph.group");
        assert_eq!(e[0].cloudevents_type(), "graphdelta.v1.group.created");
        let props = e[0].properties.as_ref().unwrap();
        assert_eq!(props.fields.keys().collect::<Vec<_>>(), vec!["displayName"]);
        // The type is remembered for the later bare @removed entry.
        let e = run(
            &c,
            &mut m,
            false,
            json!([{"id": "g", "@removed": {"reason": "deleted"}}]),
        );
        assert_eq!(e[0].object_type, "microsoft.graph.group");
    }

    #[test]
    fn member_slices_across_pages_are_all_reported_once() {
        let c = groups_ctx();
        let mut m = MapMemory::default();
        let user = |id: &str| json!({"@odata.type": "#microsoft.graph.user", "id": id});
        let e = run(
            &c,
            &mut m,
            true,
            json!([{"id": "g", "displayName": "G", "members@delta": [user("1"), user("2")]}]),
        );
        assert_eq!(kinds(&e), vec![("g".into(), ChangeType::Created)]);
        assert_eq!(e[0].member_changes.len(), 2);
        // The next slice of the same group on a later page.
        let e = run(
            &c,
            &mut m,
            true,
            json!([{"id": "g", "displayName": "G", "members@delta": [user("3"), user("1")]}]),
        );
        assert_eq!(kinds(&e), vec![("g".into(), ChangeType::Updated)]);
        assert_eq!(e[0].member_changes.len(), 1, "member 1 is a replay");
        assert_eq!(e[0].member_changes[0].member_id, "3");
        assert_eq!(e[0].member_changes[0].member_type, "microsoft.graph.user");
        assert!(e[0].changed_properties.is_empty());
        let e = run(
            &c,
            &mut m,
            false,
            json!([{"id": "g", "members@delta": [{"@odata.type": "#microsoft.graph.user", "id": "2", "@removed": {"reason": "deleted"}}]}]),
        );
        assert_eq!(
            e[0].member_changes[0].change(),
            MemberChangeType::MemberChangeRemoved
        );
        assert_eq!(m.members.len(), 2);
        // A hard-deleted group forgets its memberships.
        run(
            &c,
            &mut m,
            false,
            json!([{"id": "g", "@removed": {"reason": "deleted"}}]),
        );
        assert!(m.members.is_empty());
    }

    #[test]
    fn same_object_twice_in_one_page_is_handled_in_order() {
        let c = ctx();
        let mut m = MapMemory::default();
        let e = run(
            &c,
            &mut m,
            true,
            json!([{"id": "a", "displayName": "A"}, {"id": "a", "displayName": "A"}, {"id": "a", "displayName": "B"}]),
        );
        assert_eq!(
            kinds(&e),
            vec![
                ("a".into(), ChangeType::Created),
                ("a".into(), ChangeType::Updated)
            ]
        );
    }

    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        let c = ctx();
        let p = json!([{"id": "a", "displayName": "A"}, {"id": "b", "displayName": "A"}]);
        let mut m1 = MapMemory::default();
        let mut m2 = MapMemory::default();
        let e1 = run(&c, &mut m1, true, p.clone());
        let e2 = run(&c, &mut m2, true, p);
        assert_eq!(e1[0].event_id, e2[0].event_id);
        assert_ne!(e1[0].event_id, e1[1].event_id);
        // A->B->A: the third event differs from the first although the
        // content is the same.
        let e3 = run(&c, &mut m1, false, json!([{"id": "a", "displayName": "B"}]));
        let e4 = run(&c, &mut m1, false, json!([{"id": "a", "displayName": "A"}]));
        assert_ne!(e3[0].event_id, e4[0].event_id);
        let other_stream =
            StreamContext::new("t", "users2", "users", "microsoft.graph.user", false);
        let e5 = run(
            &other_stream,
            &mut MapMemory::default(),
            true,
            json!([{"id": "a", "displayName": "A"}]),
        );
        assert_ne!(e1[0].event_id, e5[0].event_id);
    }

    /// The id is the UUIDv8 of the xxh3-128 of the documented bytes: ids
    /// must not change between versions (a batch re-published after an
    /// upgrade keeps its ids).
    #[test]
    fn event_ids_hash_the_documented_name() {
        let c = ctx();
        for len in [0, 36, 300] {
            let object_id = "x".repeat(len);
            let mut name = c.namespace.as_bytes().to_vec();
            name.extend_from_slice(object_id.as_bytes());
            name.push(0x1f);
            name.extend_from_slice(&7u64.to_le_bytes());
            name.push(ChangeType::Updated as u8);
            name.push(1);
            name.extend_from_slice(&0xfeed_u64.to_le_bytes());
            let digest = xxhash_rust::xxh3::xxh3_128(&name).to_be_bytes();
            let expected = uuid::Builder::from_custom_bytes(digest)
                .into_uuid()
                .hyphenated()
                .to_string();
            assert_eq!(
                event_id(&c, &object_id, 7, ChangeType::Updated, true, 0xfeed).as_str(),
                expected,
                "{len}"
            );
        }
    }

    #[test]
    fn a_resnapshot_announces_known_objects_and_members() {
        let c = groups_ctx();
        let mut m = MapMemory::default();
        let page = json!([{"id": "g", "displayName": "G", "members@delta": [{"id": "u1"}]}]);
        run(&c, &mut m, true, page.clone());
        assert!(
            run(&c, &mut m, true, page.clone()).is_empty(),
            "a resync announces nothing"
        );
        let mut round = RoundContext::now(2, true);
        round.resnapshot = true;
        let n = normalize_both(&c, &round, page, &mut m);
        assert_eq!(kinds(&n.events), vec![("g".into(), ChangeType::Updated)]);
        assert!(n.events[0].changed_properties.is_empty());
        assert_eq!(n.events[0].member_changes.len(), 1);
        assert!(
            n.events[0]
                .properties
                .as_ref()
                .unwrap()
                .fields
                .contains_key("displayName")
        );
    }

    #[test]
    fn bad_objects_reject_the_page() {
        let c = ctx();
        let round = RoundContext::now(1, false);
        let mut m = MapMemory::default();
        let err = normalize_page(
            &c,
            &round,
            page(json!([{"id": "a", "@removed": {"reason": "purged"}}])),
            &mut m,
        )
        .unwrap_err();
        assert!(err.to_string().contains("purged"));
        let err =
            normalize_page(&c, &round, page(json!([{"displayName": "x"}])), &mut m).unwrap_err();
        assert!(matches!(err, NormalizeError::MissingId));
        let err = normalize_page(
            &c,
            &round,
            page(json!([{"id": "g", "members@delta": [{"x": 1}]}])),
            &mut m,
        )
        .unwrap_err();
        assert!(err.to_string().contains("members@delta"));
    }

    #[test]
    fn annotations_are_told_from_properties() {
        for key in ["displayName", "mail", "x", "e@mail", "a@odata"] {
            assert!(is_property(key), "{key}");
        }
        for key in [
            "@odata.etag",
            "@removed",
            "@",
            "manager@odata.context",
            "x@odata.type",
        ] {
            assert!(!is_property(key), "{key}");
        }
    }

    #[test]
    fn at_signs_are_found_at_every_position() {
        for key in [
            "@odata.type",
            "@removed",
            "x@odata.context",
            "displayName@odata.etag",
        ] {
            assert!(!is_property(key), "{key}");
        }
        for key in [
            "displayName",
            "id",
            "",
            "mail",
            "members@delta",
            "a@b",
            "onPremisesSyncEnabled",
        ] {
            assert!(is_property(key), "{key}");
        }
        // `@` at every position of keys up to 17 bytes.
        for len in 0..=17 {
            assert!(!has_at(&vec![b'a'; len]));
            for at in 0..len {
                let mut key = vec![b'a'; len];
                key[at] = b'@';
                assert!(has_at(&key), "{len} {at}");
                key[at] = b'@' + 1;
                assert!(!has_at(&key));
                key[at] = b'@' - 1;
                assert!(!has_at(&key));
            }
        }
    }

    /// The remembered orders give what sorting gives, whatever came before.
    #[test]
    fn property_hashes_are_sorted_whatever_the_previous_object() {
        let reference = |pairs: &[(u64, u64)]| {
            let mut sorted = pairs.to_vec();
            sorted.sort_by_key(|p| p.0);
            sorted.dedup_by_key(|p| p.0);
            sorted
                .into_iter()
                .flat_map(|(n, v)| [n, v])
                .collect::<Vec<u64>>()
        };
        let objects: Vec<Vec<(u64, u64)>> = vec![
            vec![(5, 1), (3, 2), (9, 3), (1, 4)],
            vec![(5, 5), (3, 6), (9, 7), (1, 8)],
            vec![(3, 1), (5, 2), (9, 3), (1, 4)],
            vec![(5, 1), (3, 2), (9, 3)],
            vec![],
            vec![(7, 1), (7, 2), (2, 3)],
            vec![(7, 9), (7, 8), (2, 7)],
            vec![(u64::MAX, 1), (0, 2)],
            vec![(5, 1), (3, 2), (9, 3), (1, 4)],
        ];
        let mut order = HashOrder::default();
        let n = objects.len();
        for k in 0..n.pow(3) {
            let sequence = [k % n, k / n % n, k / n / n % n];
            for pairs in sequence.map(|i| &objects[i]) {
                let mut out = vec![42];
                order.sorted(pairs, &mut out);
                assert_eq!(out, reference(pairs), "{sequence:?}");
            }
        }
    }

    #[test]
    fn struct_round_trips_to_json() {
        let v = json!({"a": 1, "b": [true, null, "x"], "c": {"d": 1.5}});
        let s = to_struct(Fields::from(v.as_object().unwrap().clone()));
        assert_eq!(Value::Object(struct_to_json(&s)), v);
    }
}
