//! `resnapshot`: a full round that announces every object while the
//! stream's deltaLink is kept, deletions inferred like a resync, then
//! incremental polling resumes from the kept deltaLink: no change made
//! meanwhile is lost.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use graphdelta::{
    checkpoint::Store,
    proto::v1::{ChangeType, Phase},
    replay::Materializer,
    simulator::{ChurnSpec, SimConfig, Simulator},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnapshot_announces_everything_and_loses_no_change() {
    let simulator = Simulator::new(SimConfig {
        users: 600,
        groups: 0,
        page_size: 50,
        ..SimConfig::default()
    });
    let handle = common::serve(&simulator).await;
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(
        &handle.base_url(),
        &handle.token_url(),
        dir.path(),
        r#"select = ["displayName", "jobTitle"]"#,
    );
    run_once(&config).await.unwrap();
    simulator.churn(&ChurnSpec::mixed(60));
    run_once(&config).await.unwrap();
    let before = read_events(&events_path(dir.path())).len();
    let kept = Store::open_read_only(&dir.path().join("state"), "users")
        .unwrap()
        .unwrap()
        .load_checkpoint()
        .unwrap()
        .unwrap();

    // Changes after the kept deltaLink, then the resnapshot (by the CLI),
    // with more changes while its full round runs (slow pages).
    simulator.churn(&ChurnSpec::mixed(60));
    simulator.set_page_latency(Duration::from_millis(30));
    let churner = {
        let simulator = simulator.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            simulator.churn(&ChurnSpec::mixed(60))
        })
    };
    let config_path = dir.path().join("connector.toml");
    std::fs::write(
        &config_path,
        format!(
            "[graph]\nbase_url = \"{}\"\ntoken_url = \"{}\"\ntenant_id = \"contoso.onmicrosoft.com\"\nclient_id = \"graphdelta-simulator\"\nclient_secret_env = \"{SECRET_ENV}\"\nmax_attempts = 3\n\n[[streams]]\nname = \"users\"\nresource = \"users\"\nselect = [\"displayName\", \"jobTitle\"]\n\n[sink]\ntype = \"file\"\npath = \"events.ndjson\"\n\n[checkpoint]\npath = \"state\"\n",
            handle.base_url(),
            handle.token_url()
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_graphdelta"))
            .args(["resnapshot", "--config"])
            .arg(&config_path)
            .args(["--stream", "users"])
            .env(SECRET_ENV, "simulator-secret")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("resnapshot done"));
    churner.await.unwrap();
    simulator.set_page_latency(Duration::ZERO);

    let events = read_events(&events_path(dir.path()));
    let snapshot: Vec<_> = events[before..].iter().filter(|e| e.snapshot).collect();
    // Every live object was announced by the resnapshot.
    let truth_then_live = snapshot
        .iter()
        .filter(|e| {
            !e.inferred
                && e.change_type() != ChangeType::HardDeleted
                && e.change_type() != ChangeType::SoftDeleted
        })
        .count();
    assert!(
        truth_then_live >= 600,
        "only {truth_then_live} objects announced"
    );
    assert!(
        snapshot
            .iter()
            .any(|e| e.change_type() == ChangeType::Updated && e.changed_properties.is_empty()),
        "unchanged objects are announced too"
    );
    // Polling resumed from the kept deltaLink (and then moved on).
    let cp = Store::open_read_only(&dir.path().join("state"), "users")
        .unwrap()
        .unwrap()
        .load_checkpoint()
        .unwrap()
        .unwrap();
    assert_eq!(cp.phase(), Phase::Incremental);
    assert!(!cp.resnapshot && cp.resume_link.is_empty());
    assert_ne!(cp.link, kept.link);

    // One more round picks up anything left; the fold equals the truth.
    run_once(&config).await.unwrap();
    let events = read_events(&events_path(dir.path()));
    let mut m = Materializer::new();
    for e in &events {
        m.apply(e);
    }
    let truth = simulator.truth();
    let want: std::collections::BTreeSet<&str> =
        truth.users.iter().map(|o| o.id.as_str()).collect();
    let have: std::collections::BTreeSet<&str> = m.objects().map(|(id, _)| id.as_str()).collect();
    assert_eq!(want, have);
    for t in &truth.users {
        if t.state == graphdelta::simulator::ObjectState::Live {
            let o = m.get(&t.id).unwrap();
            for p in ["displayName", "jobTitle"] {
                assert_eq!(
                    o.properties.get(p),
                    t.properties.get(p).filter(|v| !v.is_null()),
                    "{} {p}",
                    t.id
                );
            }
        }
    }
    handle.shutdown().await;
}
