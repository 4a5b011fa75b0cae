//! The bodies of the fuzz targets, shared by `cargo fuzz` (the
//! `fuzz_targets/` binaries, nightly) and by `tests/bad_input.rs`, which
//! replays the committed corpus on stable in every CI run.
//!
//! The promise under test: no input makes the page parser, the normalizer
//! or the config loader panic; bad input is an `Err`. Allocation stays
//! proportional to the input (libFuzzer's `-rss_limit_mb` and
//! `-malloc_limit_mb` enforce it in `scripts/fuzz`).

// Each fuzz binary uses one of the two.
#![allow(dead_code)]

use graphdelta::{
    config::Config,
    graph::page::parse_page,
    normalize::{RoundContext, StreamContext, memory::MapMemory, normalize_page},
};

/// A delta page body: parsed, then normalized twice against an in-memory
/// memory (a full round, then an incremental one), as users and as groups,
/// and the events encoded as the file sink would.
pub fn delta_page(data: &[u8]) {
    let Ok(page) = parse_page(data) else {
        return;
    };
    for ctx in [
        StreamContext::new("t", "users", "users", "microsoft.graph.user", false),
        StreamContext::new("t", "groups", "groups", "microsoft.graph.group", true),
    ] {
        let mut memory = MapMemory::default();
        for (round, snapshot) in [(1, true), (1, false)] {
            let round = RoundContext::now(round, snapshot);
            match normalize_page(&ctx, &round, page.objects.clone(), &mut memory) {
                Ok(n) => {
                    memory.commit(&n.writes);
                    let mut out = Vec::new();
                    graphdelta::sink::encode_json_lines(&n.events, &mut out);
                    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        let back: Result<graphdelta::proto::v1::ChangeEvent, _> =
                            serde_json::from_slice(line);
                        assert!(back.is_ok(), "an event's JSON does not read back");
                    }
                }
                Err(e) => {
                    // Errors are sentences, never empty.
                    assert!(!e.to_string().is_empty());
                    break;
                }
            }
        }
    }
}

/// A connector file: parsed and validated; every error names something.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            // Secrets may be missing; resolving must still not panic.
            let _ = config.resolve();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
