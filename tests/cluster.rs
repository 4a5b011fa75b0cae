//! Cluster mode against a real broker (tansu, `GRAPHDELTA_TEST_KAFKA`):
//! three `graphdelta run` processes in one consumer group share twelve
//! streams of the simulator; one is killed with SIGKILL and its streams
//! move to the survivors within the session timeout; a fourth joins and
//! takes some streams over without stopping the others; every topic folds
//! into the simulator's truth, and no object is announced as created twice
//! (the memory moved with the stream).
//!
//! Each process has its own checkpoint directory, as on separate machines:
//! a stream can only continue elsewhere through the state topic.

mod common;
mod kafka_support;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use graphdelta::{
    proto::v1::ChangeType,
    simulator::{ChurnSpec, SimConfig, SimHandle, Simulator},
};
use kafka_support::*;

const STREAMS: usize = 12;
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// Stream `sNN`: even ones read users, odd ones groups.
fn stream_name(i: usize) -> String {
    format!("s{i:02}")
}

fn is_users(i: usize) -> bool {
    i % 2 == 0
}

struct Setup {
    brokers: String,
    prefix: String,
    group: String,
    dir: tempfile::TempDir,
}

impl Setup {
    fn topic(&self, stream: &str) -> String {
        format!("{}.{stream}", self.prefix)
    }

    fn config(&self, handle: &SimHandle, instance: &str, http_port: u16) -> PathBuf {
        let mut streams = String::new();
        for i in 0..STREAMS {
            let (resource, select) = if is_users(i) {
                ("users", toml_list(USER_SELECT))
            } else {
                ("groups", toml_list(GROUP_SELECT))
            };
            streams.push_str(&format!(
                "[[streams]]\nname = \"{}\"\nresource = \"{resource}\"\nselect = [{select}]\npoll_interval = \"1s\"\n\n",
                stream_name(i)
            ));
        }
        let dir = self.dir.path().join(instance);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("connector.toml");
        std::fs::write(
            &path,
            format!(
                r#"
{graph}
{streams}
[sink]
type = "kafka"
brokers = "{brokers}"
topic = "{prefix}.{{stream}}"
partitions = 2

[cluster]
group = "{group}"
instance_id = "{instance}"
session_timeout = "{session}s"

[checkpoint]
path = "state"

[runtime]
checkpoint_interval = "200ms"
retry_min = "100ms"
retry_max = "1s"
drain_timeout = "10s"

[http]
listen = "127.0.0.1:{http_port}"
probe_interval = "500ms"
"#,
                graph = graph_toml(handle),
                brokers = self.brokers,
                prefix = self.prefix,
                group = self.group,
                session = SESSION_TIMEOUT.as_secs(),
            ),
        )
        .unwrap();
        path
    }
}

struct Instance {
    id: String,
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Instance {
    fn start(setup: &Setup, handle: &SimHandle, id: &str) -> Instance {
        let port = common::free_port();
        let config = setup.config(handle, id, port);
        let log = config.with_file_name("graphdelta.log");
        let child = Command::new(env!("CARGO_BIN_EXE_graphdelta"))
            .args(["run", "--config"])
            .arg(&config)
            .env(SECRET_ENV, "simulator-secret")
            .env("RUST_LOG", "info,librdkafka=warn")
            .env("GRAPHDELTA_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Instance {
            id: id.to_string(),
            port,
            child,
            log,
        }
    }

    async fn status(&self) -> Option<serde_json::Value> {
        let r = reqwest::get(format!("http://127.0.0.1:{}/status", self.port))
            .await
            .ok()?;
        r.json().await.ok()
    }

    fn log_grep(&self, words: &[&str]) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| words.iter().any(|w| l.contains(w)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Instance {
    /// A failed test leaves no process behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Per stream, as one instance reports it.
#[derive(Debug, Clone)]
struct Owned {
    instance: String,
    state: String,
    takeovers: u64,
    rounds: u64,
}

/// The streams each live instance says it owns; `None` if one does not
/// answer.
async fn ownership(instances: &[&Instance]) -> Option<BTreeMap<String, Vec<Owned>>> {
    let mut map: BTreeMap<String, Vec<Owned>> = BTreeMap::new();
    for inst in instances {
        let status = inst.status().await?;
        for s in status["streams"].as_array()? {
            if s["owner"].as_str() == Some(inst.id.as_str()) {
                map.entry(s["stream"].as_str()?.to_string())
                    .or_default()
                    .push(Owned {
                        instance: inst.id.clone(),
                        state: s["state"].as_str().unwrap_or_default().to_string(),
                        takeovers: s["takeovers"].as_u64().unwrap_or_default(),
                        rounds: s["rounds_completed"].as_u64().unwrap_or_default(),
                    });
            }
        }
    }
    Some(map)
}

/// `inst`'s `cluster.members` names the owners the live `instances` report
/// right now, stream by stream.
async fn group_view_matches(inst: &Instance, instances: &[&Instance]) -> bool {
    let Some(map) = ownership(instances)
        .await
        .filter(|m| one_owner_each(m, false))
    else {
        return false;
    };
    let Some(status) = inst.status().await else {
        return false;
    };
    let mut view: BTreeMap<String, String> = BTreeMap::new();
    for m in status["cluster"]["members"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for s in m["streams"].as_array().into_iter().flatten() {
            view.insert(
                s.as_str().unwrap_or_default().to_string(),
                m["instance_id"].as_str().unwrap_or_default().to_string(),
            );
        }
    }
    let want: BTreeMap<String, String> = map
        .iter()
        .map(|(s, o)| (s.clone(), o[0].instance.clone()))
        .collect();
    view == want
}

/// Every stream has exactly one owner among `instances`, and (with
/// `caught_up`) has completed a round since it was taken over.
fn one_owner_each(map: &BTreeMap<String, Vec<Owned>>, caught_up: bool) -> bool {
    (0..STREAMS).all(|i| {
        map.get(&stream_name(i)).is_some_and(|owners| {
            owners.len() == 1
                && (!caught_up || (owners[0].state == "caught_up" && owners[0].rounds > 0))
        })
    })
}

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    instances: &[&Instance],
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = instances
                .iter()
                .map(|i| format!("--- {} ---\n{}", i.id, i.log_tail()))
                .collect();
            let owners = ownership(instances).await;
            panic!(
                "timed out after {timeout:?} waiting for {what}\nownership: {owners:#?}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The differences between every stream's topic and the truth, plus
/// objects announced as created more than once (a lost memory).
fn differences(setup: &Setup, simulator: &Simulator) -> Vec<String> {
    let truth = simulator.truth();
    let mut diffs = Vec::new();
    for i in 0..STREAMS {
        let name = stream_name(i);
        let events = decode_events(&read_topic(&setup.brokers, &setup.topic(&name), false));
        let (objects, select) = if is_users(i) {
            (&truth.users, USER_SELECT)
        } else {
            (&truth.groups, GROUP_SELECT)
        };
        diffs.extend(compare(&name, &fold(&events), objects, select));
        let mut created: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        for e in &events {
            if e.change_type() == ChangeType::Created {
                created
                    .entry(e.object_id.as_str())
                    .or_default()
                    .insert(e.event_id.as_str());
            }
        }
        for (id, ids) in created {
            if ids.len() > 1 {
                diffs.push(format!(
                    "{name}: {id} announced as created {} times with different event ids",
                    ids.len()
                ));
            }
        }
    }
    diffs
}

async fn wait_for_truth(
    setup: &Setup,
    simulator: &Simulator,
    instances: &[&Instance],
    label: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        let diffs = differences(setup, simulator);
        if diffs.is_empty() {
            return;
        }
        // A created-twice is final: no later event repairs it.
        let fatal: Vec<&String> = diffs.iter().filter(|d| d.contains("created")).collect();
        assert!(fatal.is_empty(), "{label}: {fatal:#?}");
        if Instant::now() >= deadline {
            break diffs;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    };
    let logs: Vec<String> = instances
        .iter()
        .map(|i| format!("--- {} ---\n{}", i.id, i.log_tail()))
        .collect();
    panic!(
        "{label}: the topics do not match the truth after 120 s ({} differences):\n{}\n{}",
        last.len(),
        last.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        logs.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_twelve_streams_survive_a_kill_and_rebalance_on_join() {
    let brokers = test_brokers();
    set_secret();
    // GRAPHDELTA_CLUSTER_USERS scales the tenant up for a long run (the
    // figures are printed); the bounded default takes about a minute.
    let users: usize = std::env::var("GRAPHDELTA_CLUSTER_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let (simulator, handle) = start_simulator(SimConfig {
        users,
        groups: (users / 15).max(8),
        members_per_group: 5,
        member_slice: 4,
        page_size: 25,
        seed: 23,
        ..SimConfig::default()
    })
    .await;
    let setup = Setup {
        brokers,
        prefix: rand_name("gd-cluster"),
        group: rand_name("gd-cluster-group"),
        dir: tempfile::tempdir().unwrap(),
    };
    let test_started = Instant::now();

    // Three instances; every stream gets exactly one owner and catches up.
    let mut i1 = Instance::start(&setup, &handle, "i1");
    let i2 = Instance::start(&setup, &handle, "i2");
    let i3 = Instance::start(&setup, &handle, "i3");
    let three = [&i1, &i2, &i3];
    let started = Instant::now();
    let per_instance = |m: &BTreeMap<String, Vec<Owned>>| {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for owners in m.values() {
            *counts.entry(owners[0].instance.clone()).or_default() += 1;
        }
        counts
    };
    // The first instance up may own everything for a moment; the group
    // rebalances as the others join.
    let map = wait_for(
        "three instances to own the twelve streams, each caught up",
        Duration::from_secs(60 + users as u64 / 50),
        &three,
        async || {
            ownership(&three)
                .await
                .filter(|m| one_owner_each(m, true) && per_instance(m).len() == 3)
        },
    )
    .await;
    let counts = per_instance(&map);
    println!(
        "{users} users, {} groups per tenant; assigned and caught up in {:.1}s: {counts:?}",
        simulator.truth().groups.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(counts.len(), 3, "every instance owns streams: {counts:?}");
    assert!(
        counts.values().all(|&n| n == 4),
        "twelve streams over three instances: {counts:?}"
    );
    // Any instance's /status shows the whole group.
    wait_for(
        "i3's /status to show every instance's streams",
        Duration::from_secs(20),
        &three,
        async || group_view_matches(&i3, &three).await.then_some(()),
    )
    .await;
    let status = i2.status().await.unwrap();
    assert_eq!(status["cluster"]["group"], setup.group.as_str());
    assert_eq!(status["cluster"]["instance_id"], "i2");
    assert_eq!(status["cluster"]["owned"].as_array().unwrap().len(), 4);
    wait_for_truth(&setup, &simulator, &three, "initial").await;

    // Changes, then i1 dies without a word.
    simulator.churn(&ChurnSpec::mixed(40));
    let moved: Vec<String> = map
        .iter()
        .filter(|(_, o)| o[0].instance == "i1")
        .map(|(s, _)| s.clone())
        .collect();
    i1.child.kill().unwrap();
    i1.child.wait().unwrap();
    let killed = Instant::now();
    println!("killed i1 at {:?}", std::time::SystemTime::now());
    let survivors = [&i2, &i3];
    let map = wait_for(
        "the survivors to own the twelve streams",
        SESSION_TIMEOUT + Duration::from_secs(30),
        &survivors,
        async || {
            ownership(&survivors)
                .await
                .filter(|m| one_owner_each(m, false))
        },
    )
    .await;
    let failover = killed.elapsed();
    println!(
        "failover after kill -9: {:.1}s (session timeout {}s); moved {moved:?}; now {:?}",
        failover.as_secs_f64(),
        SESSION_TIMEOUT.as_secs(),
        per_instance(&map)
    );
    assert!(
        failover < SESSION_TIMEOUT + Duration::from_secs(25),
        "failover took {failover:?}"
    );
    wait_for(
        "i2's /status to show the new owners",
        Duration::from_secs(20),
        &survivors,
        async || group_view_matches(&i2, &survivors).await.then_some(()),
    )
    .await;
    if std::env::var("GRAPHDELTA_CLUSTER_DEBUG").is_ok() {
        println!(
            "{}",
            i2.log_grep(&["assigned", "revoked", "librdkafka", "Took"])
        );
    }
    simulator.churn(&ChurnSpec::mixed(40));
    wait_for_truth(&setup, &simulator, &survivors, "after the kill").await;

    // A fourth instance joins: it gets streams; the ones that stay where
    // they were are not stopped (cooperative rebalancing).
    let before = ownership(&survivors).await.unwrap();
    let i4 = Instance::start(&setup, &handle, "i4");
    let joined = Instant::now();
    let all = [&i2, &i3, &i4];
    let map = wait_for(
        "the fourth instance to take streams over",
        Duration::from_secs(45),
        &all,
        async || {
            ownership(&all)
                .await
                .filter(|m| one_owner_each(m, true) && m.values().any(|o| o[0].instance == "i4"))
        },
    )
    .await;
    let counts = per_instance(&map);
    println!(
        "rebalance after join: {:.1}s; now {counts:?}",
        joined.elapsed().as_secs_f64()
    );
    wait_for(
        "i4's /status to show every instance's streams",
        Duration::from_secs(20),
        &all,
        async || group_view_matches(&i4, &all).await.then_some(()),
    )
    .await;
    assert!(counts.values().all(|&n| n >= 2), "balanced: {counts:?}");
    // Streams that kept their owner and were never stopped: with eager
    // rebalancing there would be none. (cooperative-sticky may still move a
    // stream away and back within the rebalance's two rounds.)
    let undisturbed: Vec<&String> = map
        .iter()
        .filter(|(stream, owners)| {
            let was = &before[*stream][0];
            owners[0].instance == was.instance && owners[0].takeovers == was.takeovers
        })
        .map(|(s, _)| s)
        .collect();
    println!(
        "streams that kept running through the join: {} of {STREAMS}: {undisturbed:?}",
        undisturbed.len()
    );
    assert!(
        undisturbed.len() >= 4,
        "cooperative rebalancing leaves most streams running; only {undisturbed:?} did:\n{}",
        all.iter()
            .map(|i| i.log_grep(&["assigned", "revoked"]))
            .collect::<Vec<_>>()
            .join("\n")
    );
    simulator.churn(&ChurnSpec::mixed(40));
    wait_for_truth(&setup, &simulator, &all, "after the join").await;

    // Graceful stops leave the group and exit 0.
    let mut last = [i2, i3, i4];
    for inst in &last {
        let ok = Command::new("kill")
            .args(["-TERM", &inst.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    for inst in &mut last {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = inst.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{}: graceful stop: {status}\n{}",
                    inst.id,
                    inst.log_tail()
                );
                break;
            }
            assert!(Instant::now() < deadline, "{} did not stop", inst.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("whole test: {:.1}s", test_started.elapsed().as_secs_f64());
    handle.shutdown().await;
}

/// The state topic round trip: commits made through a store with the
/// mirror, read back and seeded into another directory (another machine),
/// give the same checkpoint, objects and memberships, including a group
/// forgotten with its memberships and a tombstoned object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_topic_carries_checkpoint_and_memory_to_another_store() {
    use graphdelta::{
        checkpoint::Store,
        cluster::state,
        normalize::memory::{MemberKey, MemberRow, StateWrites},
        proto::v1::{ObjectState, StreamCheckpoint},
    };
    let brokers = test_brokers();
    let topic = rand_name("gd-state");
    let kafka = sink_config(&brokers, "");
    // The topic exists before the mirror writes to it (the cluster run
    // creates it compacted); here: created by a plain sink on first use.
    let admin_sink = graphdelta::sink::kafka::KafkaSink::new(&sink_config(
        &brokers,
        &format!("topic = \"{topic}\"\npartitions = 3"),
    ))
    .unwrap();
    use graphdelta::sink::Sink as _;
    let cp0 = checkpoint("bootstrap", 1);
    let w0 = StateWrites::default();
    admin_sink
        .publish(out_batch(
            "bootstrap",
            1,
            &[event("bootstrap", "x", ChangeType::Created, 1)],
            &cp0,
            &w0,
        ))
        .await
        .unwrap();

    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let stream = "groups";
    let object = |v: u64| {
        Some(ObjectState {
            version: v,
            seen_round: 1,
            property_hashes: vec![v, v + 1],
            object_type: "microsoft.graph.group".into(),
            ..Default::default()
        })
    };
    let member = |g: &str, m: &str| MemberKey {
        group: g.into(),
        relationship: "members".into(),
        member: m.into(),
    };
    let row = || {
        Some(MemberRow {
            member_type: "microsoft.graph.user".into(),
            seen_round: 1,
        })
    };
    let cp = |seq: u64| StreamCheckpoint {
        stream: stream.into(),
        batch_seq: seq,
        link: format!("https://graph.example/next/{seq}"),
        round: 1,
        ..Default::default()
    };
    let mut store = Store::open(a.path(), stream).unwrap();
    store.set_mirror(Box::new(
        state::StateMirror::new(&kafka, &topic, 3, stream).unwrap(),
    ));
    tokio::task::block_in_place(|| {
        let mut w = StateWrites::default();
        for g in ["g1", "g2", "g3"] {
            w.objects.insert(g.into(), object(1));
            w.new_objects.insert(g.into());
        }
        for (g, m) in [("g1", "u1"), ("g1", "u2"), ("g2", "u1"), ("g2", "u3")] {
            w.members.insert(member(g, m), row());
        }
        store.commit(&cp(1), &w).unwrap();
        // g1 updated and loses u2; g2 hard-deleted (memberships forgotten);
        // g3 forgotten entirely.
        let mut w = StateWrites::default();
        w.objects.insert("g1".into(), object(2));
        w.members.insert(member("g1", "u2"), None);
        w.forget_group("g2");
        w.objects.insert(
            "g2".into(),
            Some(ObjectState {
                version: 2,
                hard_deleted: true,
                ..Default::default()
            }),
        );
        w.objects.insert("g3".into(), None);
        store.commit(&cp(2), &w).unwrap();
    });

    let seed = tokio::task::spawn_blocking({
        let kafka = kafka.clone();
        let topic = topic.clone();
        move || state::load(&kafka, &topic, 3, "groups", Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(seed.checkpoint, Some(cp(2)));
    let copy = state::seed(b.path(), stream, &seed).unwrap();
    assert_eq!(copy.load_checkpoint().unwrap(), Some(cp(2)));
    let dump = |s: &Store| {
        let mut objects = Vec::new();
        s.for_each_object(|id, st| objects.push((id.to_string(), st.clone())))
            .unwrap();
        let mut members = Vec::new();
        s.for_each_member("members", |g, m| {
            members.push((g.to_string(), m.to_string()))
        })
        .unwrap();
        (objects, members)
    };
    let (objects, members) = dump(&copy);
    assert_eq!((objects.clone(), members.clone()), dump(&store));
    assert_eq!(
        objects
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        ["g1", "g2"]
    );
    assert!(objects[1].1.hard_deleted, "the tombstone keeps its version");
    assert_eq!(members, [("g1".to_string(), "u1".to_string())]);
    // A store already at the topic's checkpoint is kept as it is.
    drop(copy);
    let again = state::seed(b.path(), stream, &seed).unwrap();
    assert_eq!(dump(&again), (objects, members));
}
