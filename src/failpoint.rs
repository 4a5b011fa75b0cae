//! Crash points for the fault suite (`tests/chaos.rs`, `scripts/chaos`).
//!
//! A `kill -9` at a random instant rarely lands in the few microseconds
//! between a broker's ack and the checkpoint commit. These points let the
//! suite crash the process exactly there, and in the other phases of a
//! batch's life:
//!
//! | name | where the process dies |
//! |---|---|
//! | `fetched` | a delta page was read from Graph, before the pipeline saw it (mid-fetch) |
//! | `mid_record` | half of the batch's outbox record is written (a torn record), before the sink sees the batch |
//! | `mid_publish` | the batch is partly handed to the sink: file sink: half of its bytes written (a torn line); Kafka: records queued, delivery reports not yet received; RabbitMQ: messages published, confirms not yet received |
//! | `acked` | the sink acknowledged the batch; its checkpoint is not committed (between ack and commit) |
//! | `committing` | inside the checkpoint's SQLite transaction, every row written, before `COMMIT` (mid-commit) |
//! | `reconcile_acked` | a batch of changes inferred by the reconciliation after a full round was acknowledged; not committed |
//!
//! `GRAPHDELTA_FAILPOINT=<name>[@<n>]` aborts the process (`abort()`: no
//! destructors, no flushing, as abrupt as SIGKILL) the `n`-th time (default:
//! the first) execution reaches that point, after printing one line to
//! stderr. Unset, every point is one relaxed atomic load and a branch; the
//! points are always compiled in so that the binary under test is the one
//! that ships.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering},
};

/// The variable that arms a failpoint.
pub const ENV: &str = "GRAPHDELTA_FAILPOINT";

/// Every failpoint, in the order a batch reaches them.
pub const NAMES: &[&str] = &[
    "fetched",
    "mid_record",
    "mid_publish",
    "acked",
    "committing",
    "reconcile_acked",
];

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            match parse(&spec) {
                Ok((name, at)) => Some(Armed {
                    name,
                    at,
                    hits: AtomicU64::new(0),
                }),
                Err(why) => {
                    // Test-only machinery: a bad spec must not stop a real
                    // process, but the test that set it must see why it
                    // never fired.
                    eprintln!("graphdelta: ignoring {ENV}={spec:?}: {why}");
                    None
                }
            }
        })
        .as_ref()
}

fn parse(spec: &str) -> Result<(String, u64), String> {
    let (name, at) = match spec.split_once('@') {
        Some((name, n)) => (
            name,
            n.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("`{n}` is not a hit count (1, 2, ...)"))?,
        ),
        None => (spec, 1),
    };
    if !NAMES.contains(&name) {
        return Err(format!(
            "unknown failpoint `{name}`; known: {}",
            NAMES.join(", ")
        ));
    }
    Ok((name.to_string(), at))
}

/// Counts a pass through `name`; true when this pass must crash (then call
/// [`crash`], after leaving behind whatever partial state the point stands
/// for).
pub fn fire(name: &str) -> bool {
    match armed() {
        Some(a) if a.name == name => a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.at,
        _ => false,
    }
}

/// Dies at once.
pub fn crash(name: &str) -> ! {
    eprintln!("graphdelta: failpoint `{name}` reached; aborting");
    std::process::abort()
}

/// Crashes here if `name` is armed and this is its `n`-th pass.
pub fn hit(name: &str) {
    if fire(name) {
        crash(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_known_point_and_a_positive_count() {
        assert_eq!(parse("acked"), Ok(("acked".into(), 1)));
        assert_eq!(parse("committing@7"), Ok(("committing".into(), 7)));
        assert!(parse("acked@0").unwrap_err().contains("hit count"));
        assert!(parse("nowhere").unwrap_err().contains("known: fetched"));
    }

    #[test]
    fn unarmed_points_never_fire() {
        // The test process does not set the variable.
        assert!(std::env::var(ENV).is_err());
        for name in NAMES {
            assert!(!fire(name));
        }
    }
}
