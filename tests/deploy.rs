//! The deployment files: docker-compose.yml is valid Compose (checked with
//! docker-compose; no Docker engine runs here), wires the four services
//! with healthchecks, and runs a connector file that is valid; the
//! Dockerfile builds in stages and runs as a non-root user.

use std::{path::Path, process::Command};

use graphdelta::config::Config;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose(args: &[&str]) -> String {
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(root().join("docker-compose.yml"))
        .args(args)
        .output()
        .expect("docker-compose is not installed: scripts/test installs it (apt-get install docker-compose)");
    assert!(
        out.status.success(),
        "docker-compose {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn compose_file_is_valid_and_complete() {
    compose(&["config", "-q"]);
    let services = compose(&["config", "--services"]);
    let mut services: Vec<&str> = services.lines().collect();
    services.sort();
    assert_eq!(
        services,
        vec!["graphdelta", "kafka", "rabbitmq", "simulator"]
    );
    // The healthchecks and images are checked on the raw file, which is what
    // users edit.
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    assert!(
        !text.lines().any(|l| l.starts_with("name:")),
        "docker-compose 1.29 rejects a top-level name:"
    );
    assert_eq!(
        text.matches("    healthcheck:").count(),
        4,
        "every service needs a healthcheck"
    );
    assert!(
        text.contains("image: apache/kafka:"),
        "the official Apache Kafka image"
    );
    assert!(
        text.contains("KAFKA_PROCESS_ROLES: broker,controller"),
        "KRaft, single node"
    );
    assert!(text.contains("rabbitmq:4-management"));
}

#[test]
fn the_connector_compose_runs_is_valid() {
    // SAFETY: single-threaded test.
    unsafe { std::env::set_var("GRAPH_CLIENT_SECRET", "simulator-secret") };
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let config = text
        .lines()
        .find_map(|l| l.split("/etc/graphdelta/").nth(1))
        .and_then(|rest| rest.split('"').next())
        .expect("graphdelta runs a file from /etc/graphdelta (connectors/)");
    let path = root().join("connectors").join(config);
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    config.resolve().unwrap();
    assert_eq!(config.sink.kind(), "kafka");
}

#[test]
fn dockerfile_is_multi_stage_and_non_root() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    let user = text
        .lines()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(
        !user.contains("root") && !user.trim_end().ends_with(" 0") && !user.contains(" 0:"),
        "{user}"
    );
    assert!(text.contains("--locked"), "reproducible build");
}
