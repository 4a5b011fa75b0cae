//! End to end against the simulator: many rounds of churn (creates, updates
//! under return=minimal, soft and hard deletes, restores, membership changes
//! in slices, replays, empty pages), a 410 resync and an expired delta token.
//! After every round the events, folded into state, must equal the
//! simulator's ground truth object by object.

mod common;

use std::collections::BTreeSet;

use common::*;
use graphdelta::{
    proto::v1::ChangeEvent,
    replay::{Materializer, ObjectStatus},
    simulator::{
        ChurnSpec, Fault, FaultScope, GroundTruth, ObjectState, SimConfig, Simulator, TruthObject,
    },
};
use serde_json::{Map, Value};

const USER_SELECT: &[&str] = &[
    "displayName",
    "givenName",
    "surname",
    "jobTitle",
    "department",
    "mobilePhone",
    "businessPhones",
    "accountEnabled",
];
const GROUP_SELECT: &[&str] = &["displayName", "description", "members"];

fn config(
    handle: &graphdelta::simulator::SimHandle,
    dir: &std::path::Path,
) -> graphdelta::config::Config {
    set_secret();
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"
[graph]
base_url = "{base}"
token_url = "{token}"
tenant_id = "contoso.onmicrosoft.com"
client_id = "graphdelta-simulator"
client_secret_env = "{SECRET_ENV}"

[[streams]]
name = "users"
resource = "users"
select = [{users}]
return_minimal = true

[[streams]]
name = "groups"
resource = "groups"
select = [{groups}]

[sink]
type = "file"
path = "{events}"

[checkpoint]
path = "{state}"
"#,
        base = handle.base_url(),
        token = handle.token_url(),
        users = list(USER_SELECT),
        groups = list(GROUP_SELECT),
        events = events_path(dir).display(),
        state = dir.join("state").display(),
    );
    graphdelta::config::Config::parse(&text).unwrap()
}

fn fold(events: &[ChangeEvent], stream: &str) -> Materializer {
    let mut m = Materializer::new();
    for e in events.iter().filter(|e| e.stream == stream) {
        m.apply(e);
    }
    m
}

fn non_null(map: &Map<String, Value>, keep: &[&str]) -> Map<String, Value> {
    map.iter()
        .filter(|(k, v)| !v.is_null() && keep.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Compares the folded events with the truth; returns the differences.
fn compare(label: &str, m: &Materializer, truth: &[TruthObject], select: &[&str]) -> Vec<String> {
    let mut diffs = Vec::new();
    let want: BTreeSet<&str> = truth.iter().map(|o| o.id.as_str()).collect();
    let have: BTreeSet<&str> = m.objects().map(|(id, _)| id.as_str()).collect();
    for id in want.difference(&have) {
        diffs.push(format!("{label}: missing {id}"));
    }
    for id in have.difference(&want) {
        diffs.push(format!(
            "{label}: extra {id} ({:?})",
            m.get(id).unwrap().status
        ));
    }
    for t in truth {
        let Some(o) = m.get(&t.id) else { continue };
        let status = match t.state {
            ObjectState::Live => ObjectStatus::Live,
            ObjectState::SoftDeleted => ObjectStatus::SoftDeleted,
        };
        if o.status != status {
            diffs.push(format!(
                "{label}: {} is {:?}, truth {:?}",
                t.id, o.status, status
            ));
            continue;
        }
        if status != ObjectStatus::Live {
            continue;
        }
        let want_props = non_null(&t.properties, select);
        if o.properties != want_props {
            diffs.push(format!(
                "{label}: {} properties {:?} != truth {:?}",
                t.id, o.properties, want_props
            ));
        }
        if let Some(members) = &t.members {
            let want: BTreeSet<String> = members.iter().cloned().collect();
            let have = o.members.get("members").cloned().unwrap_or_default();
            if want != have {
                diffs.push(format!(
                    "{label}: {} members: missing {:?}, extra {:?}",
                    t.id,
                    want.difference(&have).collect::<Vec<_>>(),
                    have.difference(&want).collect::<Vec<_>>()
                ));
            }
        }
    }
    diffs
}

fn check(round: &str, dir: &std::path::Path, truth: &GroundTruth) {
    let events = read_events(&events_path(dir));
    let mut diffs = compare(
        &format!("{round} users"),
        &fold(&events, "users"),
        &truth.users,
        USER_SELECT,
    );
    diffs.extend(compare(
        &format!("{round} groups"),
        &fold(&events, "groups"),
        &truth.groups,
        GROUP_SELECT,
    ));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    // Every event id is unique: nothing was published twice in these
    // crash-free runs.
    let mut ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "{round}: duplicate event ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_fold_into_the_ground_truth_across_churn_and_resyncs() {
    let simulator = Simulator::new(SimConfig {
        users: 400,
        groups: 25,
        members_per_group: 12,
        member_slice: 5,
        page_size: 40,
        replay_rate: 0.1,
        empty_pages: true,
        seed: 7,
        ..SimConfig::default()
    });
    let handle = common::serve(&simulator).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&handle, dir.path());

    run_once(&config).await.unwrap();
    check("initial", dir.path(), &simulator.truth());
    let initial = read_events(&events_path(dir.path()));
    assert!(initial.iter().all(|e| e.snapshot));
    assert_eq!(initial.iter().filter(|e| e.stream == "users").count(), 400);

    for round in 1..=6 {
        simulator.churn(&ChurnSpec::mixed(80));
        run_once(&config).await.unwrap();
        check(&format!("round {round}"), dir.path(), &simulator.truth());
    }
    let before = read_events(&events_path(dir.path())).len();

    // Graph resets the sync state: a full round, deletions inferred.
    simulator.churn(&ChurnSpec::mixed(80));
    simulator.inject(Fault::Gone {
        count: 2,
        scope: FaultScope::DeltaLink,
    });
    run_once(&config).await.unwrap();
    check("after 410", dir.path(), &simulator.truth());
    let events = read_events(&events_path(dir.path()));
    assert!(
        events[before..].iter().all(|e| e.change_type()
            != graphdelta::proto::v1::ChangeType::Created
            || initial.iter().all(|i| i.object_id != e.object_id)),
        "a known object was re-announced as created"
    );

    // An expired delta token (odd casing of the code): resync again.
    simulator.churn(&ChurnSpec::mixed(80));
    simulator.inject(Fault::SyncStateExpired {
        status: 400,
        code: "ResyncRequired".into(),
        count: 2,
        scope: FaultScope::DeltaLink,
    });
    run_once(&config).await.unwrap();
    check("after expired token", dir.path(), &simulator.truth());

    simulator.churn(&ChurnSpec::mixed(80));
    run_once(&config).await.unwrap();
    check("final", dir.path(), &simulator.truth());
    handle.shutdown().await;
}
