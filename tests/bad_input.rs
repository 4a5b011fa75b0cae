//! The fuzz targets on stable, in every CI run: each committed corpus seed
//! (`fuzz/corpus/<target>/`), every prefix of it (truncated bodies) and a
//! few thousand deterministic byte mutations must neither panic nor fail
//! an invariant of `fuzz/targets.rs`. The real fuzzing (coverage-guided,
//! nightly) is `scripts/fuzz`.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5, "{}: too few seeds", dir.display());
    out
}

/// Seeds, their prefixes, and mutations (flips, deletions, duplications,
/// JSON/TOML-significant bytes inserted), all derived from a fixed seed.
fn exercise(target: &str, f: fn(&[u8])) {
    let mut state = 0x5EED_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    const SPICE: &[u8] = b"{}[]\":,\\=.@#\n\0-e9";
    let mut runs = 0;
    for (name, seed) in seeds(target) {
        let run = |input: &[u8], what: &str| {
            let r = std::panic::catch_unwind(|| f(input));
            assert!(
                r.is_ok(),
                "{target}: {name} ({what}) panicked; input: {:?}",
                String::from_utf8_lossy(input)
            );
        };
        run(&seed, "as is");
        for cut in 0..seed.len() {
            run(&seed[..cut], "truncated");
        }
        for _ in 0..300 {
            let mut m = seed.clone();
            for _ in 0..=(next() % 4) {
                if m.is_empty() {
                    break;
                }
                let at = (next() as usize) % m.len();
                match next() % 4 {
                    0 => m[at] ^= 1 << (next() % 8),
                    1 => {
                        m.remove(at);
                    }
                    2 => m.insert(at, SPICE[(next() as usize) % SPICE.len()]),
                    _ => {
                        let end = (at + 1 + (next() as usize) % 16).min(m.len());
                        let chunk = m[at..end].to_vec();
                        m.splice(at..at, chunk);
                    }
                }
            }
            run(&m, "mutated");
            runs += 1;
        }
    }
    eprintln!("{target}: {runs} mutated inputs");
}

#[test]
fn the_delta_page_target_survives_its_seeds_and_their_mutations() {
    exercise("delta_page", targets::delta_page);
}

#[test]
fn the_config_target_survives_its_seeds_and_their_mutations() {
    exercise("config", targets::config);
}

/// A minimal valid connector file.
const MINIMAL: &str = r#"
[graph]
tenant_id = "contoso.onmicrosoft.com"
client_id = "00000000-0000-0000-0000-000000000000"
client_secret_env = "GD_BAD_INPUT_SECRET"

[[streams]]
name = "users"
resource = "users"

[sink]
type = "stdout"

[checkpoint]
path = "state"
"#;

/// Every kind of configuration error, through `graphdelta validate` as an
/// operator meets it: exit code 2 and a message naming the key (or the
/// variable) and the fix. None of them may echo a secret.
#[test]
fn every_config_error_names_the_key_and_the_fix() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown key",
            MINIMAL.replace(
                "resource = \"users\"",
                "resource = \"users\"\npol_interval = \"5s\"",
            ),
            &["pol_interval", "poll_interval"],
        ),
        (
            "bad duration",
            MINIMAL.replace(
                "resource = \"users\"",
                "resource = \"users\"\npoll_interval = \"5 parsecs\"",
            ),
            &["poll_interval", "5 parsecs", "\"30s\""],
        ),
        (
            "missing secret",
            MINIMAL.replace("GD_BAD_INPUT_SECRET", "GD_BAD_INPUT_NEVER_SET"),
            &["GD_BAD_INPUT_NEVER_SET", "export"],
        ),
        (
            "secret in the file",
            MINIMAL.replace(
                "client_secret_env = \"GD_BAD_INPUT_SECRET\"",
                "client_secret = \"hunter2-in-the-file\"",
            ),
            &["client_secret", "client_secret_env"],
        ),
        (
            "unknown resource",
            MINIMAL.replace("resource = \"users\"", "resource = \"usres\""),
            &["usres", "directoryObjects"],
        ),
        (
            "invalid URL",
            MINIMAL.replace(
                "[graph]",
                "[graph]\nbase_url = \"https//graph.microsoft.com\"",
            ),
            &["base_url"],
        ),
        (
            "plain http off loopback",
            MINIMAL.replace(
                "[graph]",
                "[graph]\nbase_url = \"http://graph.example.com/v1.0\"",
            ),
            &["base_url", "https"],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for (what, text, words) in cases {
        let path = dir.path().join("connector.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_graphdelta"))
            .args(["validate", "--config"])
            .arg(&path)
            .env("GD_BAD_INPUT_SECRET", "s3cret-value")
            .env_remove("GD_BAD_INPUT_NEVER_SET")
            .output()
            .unwrap();
        let msg = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{what}: {msg}");
        for w in *words {
            assert!(msg.contains(w), "{what}: the message lacks `{w}`: {msg}");
        }
        assert!(
            !msg.contains("hunter2-in-the-file"),
            "{what}: echoes the secret: {msg}"
        );
        assert!(
            !msg.contains("s3cret-value"),
            "{what}: echoes the secret: {msg}"
        );
        report.push(format!("{what}: {}", msg.trim()));
    }
    eprintln!("{}", report.join("\n"));
}
