//! Every shipped connector definition (connectors/*.toml) parses, validates
//! and resolves: a user can run each as is (given its secret).

use std::path::Path;

use graphdelta::config::Config;

#[test]
fn every_connector_file_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors");
    let mut checked = 0;
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.extend(
        std::fs::read_dir(dir.join("compose"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Each file names the env vars its secrets come from; give them values.
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.split_once("_env").and_then(|(_, r)| r.split_once('"')) {
                let var = rest.1.split('"').next().unwrap();
                // SAFETY: single-threaded test.
                unsafe { std::env::set_var(var, "amqp://guest:guest@127.0.0.1:5672/%2f") };
            }
        }
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        config
            .resolve()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            text.lines().next().unwrap().starts_with('#'),
            "{} starts with a comment saying what it is",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 8, "found only {checked} connector files");
}
