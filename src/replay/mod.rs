//! Rebuilding state from the event stream: the topics are the source of
//! truth a service can rebuild from.
//!
//! [`Materializer`] folds a stream's events, in order, into the current
//! state of every object: properties merged per property (an explicit null
//! clears), soft-deleted objects kept with a flag, hard-deleted ones gone,
//! group memberships as sets. Duplicates from at-least-once delivery are
//! recognised by `object_version`: the connector never reuses a version for
//! an object (it keeps tombstones of hard-deleted objects), and one object's
//! events keep their order in every sink, so an event whose version is not
//! above the object's current one is a duplicate (or older) and is skipped.

pub mod materialize;

pub use materialize::{Materialized, Materializer, ObjectStatus, ReplayStats};
