//! The connector against Microsoft's own example responses (tests/fixtures),
//! served over loopback, and against scripted protocol faults: every event
//! is checked, and so is what is (not) committed.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use common::*;
use graphdelta::{
    checkpoint::Store,
    proto::v1::{ChangeEvent, ChangeType, MemberChangeType, Phase},
    runtime::{Prepared, RunOptions},
    sink::{OutBatch, Sink, SinkError},
};

const INITIAL: &str = "/v1.0/users/delta?$select=displayName,givenName,surname";
const SKIP1: &str = "/v1.0/users/delta?$skiptoken=oEBwdSP6uehIAxQOWq_3Ksh_TLol6KIm3stvdc6hGhZRi1hQ7Spe__dpvm3U4zReE4CYXC2zOtaKdi7KHlUtC2CbRiBIUwOxPKLa";
const SKIP2: &str = "/v1.0/users/delta?$skiptoken=pqwSUjGYvb3jQpbwVAwEL7yuI3dU1LecfkkfLPtnIjtQ5LOhVoS7qQG_wdVCHHlbQpga7";
const DELTA1: &str = "/v1.0/users/delta?$deltatoken=oEcOySpF_hWYmTIUZBOIfPzcwisr_rPe8o9M54L45qEXQGmvQC6T2dbL-9O7nSU-njKhFiGlAZqewNAThmCVnNxqPu5gOBegrm1CaVZ-ZtFZ2tPOAO98OD9y0ao460";
const DELTA2: &str = "/v1.0/users/delta?$deltatoken=MF1LuFYbK6Lw4DtZ4o9PDrcGekRP65WEJfDmM0H26l4v9zILCPFiPwSAAeRBghxgiwsXEfywcVQ9R8VEWuYAB50Yw3KvJ-8Z1zamVotGX2b_AHVS_Z-3b0NAtmGpod";
const SELECT: &str = r#"select = ["displayName", "givenName", "surname"]"#;

fn walkthrough_round1(server: &ScriptedGraph) {
    server.on(
        INITIAL,
        Scripted::fixture("users-delta-walkthrough/1-initial.json"),
    );
    server.on(
        SKIP1,
        Scripted::fixture("users-delta-walkthrough/2-next.json"),
    );
    server.on(
        SKIP2,
        Scripted::fixture("users-delta-walkthrough/3-final.json"),
    );
}

fn walkthrough(server: &ScriptedGraph) {
    walkthrough_round1(server);
    server.on(
        DELTA1,
        Scripted::fixture("users-delta-walkthrough/4-delta-changes.json"),
    );
    server.on(
        DELTA2,
        Scripted::fixture("users-delta-walkthrough/5-delta-empty.json"),
    );
}

fn summary(events: &[ChangeEvent]) -> Vec<(String, ChangeType, Vec<String>, bool)> {
    events
        .iter()
        .map(|e| {
            (
                e.object_id.clone(),
                e.change_type(),
                e.changed_properties.clone(),
                e.snapshot,
            )
        })
        .collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn checkpoint(dir: &std::path::Path) -> graphdelta::proto::v1::StreamCheckpoint {
    Store::open_read_only(&dir.join("state"), "users")
        .unwrap()
        .expect("store exists")
        .load_checkpoint()
        .unwrap()
        .expect("a checkpoint was committed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_users_walkthrough_three_rounds() {
    let server = ScriptedGraph::start().await;
    walkthrough(&server);
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&server.base_url(), &server.token_url(), dir.path(), SELECT);

    // Round 1: the initial round, three pages, every user created.
    run_once(&config).await.unwrap();
    let events = read_events(&events_path(dir.path()));
    let all3 = names(&["displayName", "givenName", "surname"]);
    assert_eq!(
        summary(&events),
        vec![
            (
                "ffff7b1a-13b6-477b-8c0c-380905cd99f7".into(),
                ChangeType::Created,
                all3.clone(),
                true
            ),
            (
                "605d1257-ffff-40b6-8e6f-528a53f5dc55".into(),
                ChangeType::Created,
                all3.clone(),
                true
            ),
            // Never seen, arrives deleted: still reported.
            (
                "86462606-fde0-4fc4-9e0c-a20eb73e54c6".into(),
                ChangeType::HardDeleted,
                vec![],
                true
            ),
            (
                "6ea91a8d-e32e-41a1-b7bd-d2d185eed0e0".into(),
                ChangeType::Created,
                names(&["displayName"]),
                true
            ),
            (
                "d8c37826-ffff-4cae-b348-e2725b1e814b".into(),
                ChangeType::Created,
                all3.clone(),
                true
            ),
            (
                "8b1ee412-cd8f-4d59-ffff-24010edb9f1f".into(),
                ChangeType::Created,
                all3.clone(),
                true
            ),
            (
                "25dcffff-959e-4ece-9973-e5d9b800e8cc".into(),
                ChangeType::Created,
                all3.clone(),
                true
            ),
            (
                "f6ede700-27d0-4c42-bfb9-4dffff43c74a".into(),
                ChangeType::Created,
                all3.clone(),
                true
            ),
        ]
    );
    let cameron = &events[0];
    assert_eq!(cameron.tenant_id, "contoso.onmicrosoft.com");
    assert_eq!(cameron.stream, "users");
    assert_eq!(cameron.resource, "users");
    assert_eq!(cameron.object_type, "microsoft.graph.user");
    assert!(!cameron.inferred);
    assert_eq!(cameron.object_version, 1);
    let props = graphdelta::normalize::struct_to_json(cameron.properties.as_ref().unwrap());
    assert_eq!(
        serde_json::Value::Object(props),
        serde_json::json!({"displayName": "Cameron White", "givenName": "Cameron", "surname": "White"})
    );
    assert!(cameron.observed_at.is_some());
    // The canonical JSON mapping: camelCase names, enum names.
    let line = std::fs::read_to_string(events_path(dir.path())).unwrap();
    assert!(
        line.lines()
            .next()
            .unwrap()
            .contains(r#""changeType":"CHANGE_TYPE_CREATED""#)
    );
    let cp = checkpoint(dir.path());
    assert_eq!(cp.phase(), Phase::Incremental);
    assert!(
        cp.link.ends_with(&DELTA1[DELTA1.find('?').unwrap()..]),
        "{}",
        cp.link
    );

    // The requests: the initial one with $select, then the links as given,
    // every one with the bearer token, no Prefer header.
    let requests = server.graph_requests();
    let paths: Vec<&str> = requests.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(paths, vec![INITIAL, SKIP1, SKIP2]);
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer token-1"))
    );
    assert!(requests.iter().all(|r| r.prefer.is_none()));
    assert_eq!(server.token_requests(), 1);

    // Round 2: MOD Administrator (was Lidia Holloway) updated; an unknown
    // user soft-deleted.
    run_once(&config).await.unwrap();
    let events = read_events(&events_path(dir.path()));
    assert_eq!(
        summary(&events[8..]),
        vec![
            (
                "25dcffff-959e-4ece-9973-e5d9b800e8cc".into(),
                ChangeType::Updated,
                all3.clone(),
                false
            ),
            (
                "8ffff70c-1c63-4860-b963-e34ec660931d".into(),
                ChangeType::SoftDeleted,
                vec![],
                false
            ),
        ]
    );
    assert_eq!(events[8].object_version, 2);
    assert_ne!(events[8].event_id, events[6].event_id);

    // Round 3: nothing changed: no event, the new deltaLink is kept.
    run_once(&config).await.unwrap();
    assert_eq!(read_events(&events_path(dir.path())).len(), 10);
    let cp = checkpoint(dir.path());
    assert!(cp.link.ends_with(&DELTA2[DELTA2.find('?').unwrap()..]));
    let paths: Vec<String> = server
        .graph_requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(paths[3..], [DELTA1.to_string(), DELTA2.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_directory_objects_users_and_groups_with_members() {
    let server = ScriptedGraph::start().await;
    server.on(
        // The url crate percent-encodes `'` in queries; Graph accepts both forms.
        "/v1.0/directoryObjects/delta?$filter=isof(%27microsoft.graph.user%27)%20or%20isof(%27microsoft.graph.group%27)",
        Scripted::fixture("directory-objects/users-and-groups.json"),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = file_config(&server.base_url(), &server.token_url(), dir.path(), "");
    config.streams[0].resource = "directoryObjects".into();
    config.streams[0].filter =
        Some("isof('microsoft.graph.user') or isof('microsoft.graph.group')".into());
    run_once(&config).await.unwrap();
    let events = read_events(&events_path(dir.path()));
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].object_type, "microsoft.graph.user");
    assert_eq!(events[0].cloudevents_type(), "graphdelta.v1.user.created");
    let group = &events[1];
    assert_eq!(group.object_type, "microsoft.graph.group");
    assert_eq!(group.change_type(), ChangeType::Created);
    let members: Vec<(&str, &str, MemberChangeType)> = group
        .member_changes
        .iter()
        .map(|m| (m.member_id.as_str(), m.member_type.as_str(), m.change()))
        .collect();
    assert_eq!(
        members,
        vec![
            (
                "693acd06-2877-4339-8ade-b704261fe7a0",
                "microsoft.graph.user",
                MemberChangeType::MemberChangeAdded
            ),
            (
                "49320844-be99-4164-8167-87ff5d047ace",
                "microsoft.graph.user",
                MemberChangeType::MemberChangeAdded
            ),
        ]
    );
    assert!(
        group
            .member_changes
            .iter()
            .all(|m| m.relationship == "members")
    );
    let props = group.properties.as_ref().unwrap();
    assert!(
        !props.fields.contains_key("members@delta") && !props.fields.contains_key("@odata.type")
    );
    assert!(props.fields.contains_key("groupTypes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_page_is_retried_and_never_committed() {
    let server = ScriptedGraph::start().await;
    // Microsoft's example 4, trailing comma and all: invalid JSON.
    server.on(
        "/v1.0/users/delta",
        Scripted::fixture("directory-objects/minimal-trailing-comma.json"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&server.base_url(), &server.token_url(), dir.path(), "");
    let err = run_once(&config).await.unwrap_err().to_string();
    assert!(err.contains("stream `users`"), "{err}");
    assert!(
        err.contains(&server.addr.to_string()),
        "names the host: {err}"
    );
    assert!(err.contains("malformed delta page"), "{err}");
    assert!(!err.contains("token-"), "no bearer token in errors: {err}");
    assert_eq!(server.graph_requests().len(), 3, "max_attempts = 3");
    assert!(read_events(&events_path(dir.path())).is_empty());
    let store = Store::open_read_only(&dir.path().join("state"), "users")
        .unwrap()
        .unwrap();
    assert!(store.load_checkpoint().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_page_is_retried_then_succeeds() {
    let server = ScriptedGraph::start().await;
    let full = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/users-delta-walkthrough/3-final.json"
    ))
    .unwrap();
    server.on("/v1.0/users/delta", Scripted::json(&full[..full.len() / 2]));
    server.on("/v1.0/users/delta", Scripted::json(full));
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&server.base_url(), &server.token_url(), dir.path(), "");
    run_once(&config).await.unwrap();
    assert_eq!(read_events(&events_path(dir.path())).len(), 2);
    assert_eq!(server.graph_requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_to_another_host_gets_no_token() {
    let evil = ScriptedGraph::start().await;
    let server = ScriptedGraph::start().await;
    server.on(
        "/v1.0/users/delta",
        Scripted::json(format!(
            r#"{{"@odata.nextLink":"{}/users/delta?$skiptoken=steal","value":[{{"id":"a","displayName":"A"}}]}}"#,
            evil.base_url()
        )),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&server.base_url(), &server.token_url(), dir.path(), "");
    let err = run_once(&config).await.unwrap_err().to_string();
    assert!(
        err.contains(&evil.addr.to_string()),
        "names the foreign host: {err}"
    );
    assert!(err.contains("refusing to send the token"), "{err}");
    assert!(!err.contains("steal"), "no state token in errors: {err}");
    assert!(evil.requests().is_empty(), "the foreign host got a request");
    // The page that carried the foreign link is not committed either.
    assert!(read_events(&events_path(dir.path())).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_waits_for_retry_after() {
    let server = ScriptedGraph::start().await;
    server.on(
        "/v1.0/users/delta",
        Scripted::status(
            429,
            r#"{"error":{"code":"TooManyRequests","message":"slow down"}}"#,
        )
        .header("Retry-After", "1"),
    );
    server.on(
        "/v1.0/users/delta",
        Scripted::fixture("users-delta-walkthrough/5-delta-empty.json"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&server.base_url(), &server.token_url(), dir.path(), "");
    let started = Instant::now();
    run_once(&config).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried before Retry-After"
    );
    assert_eq!(server.graph_requests().len(), 2);
    assert_eq!(checkpoint(dir.path()).phase(), Phase::Incremental);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_fetches_a_new_token_once() {
    let server = ScriptedGraph::start().await;
    server.on(
        "/v1.0/users/delta",
        Scripted::status(401, r#"{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid."}}"#),
    );
    server.on(
        "/v1.0/users/delta",
        Scripted::fixture("users-delta-walkthrough/3-final.json"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&server.base_url(), &server.token_url(), dir.path(), "");
    run_once(&config).await.unwrap();
    assert_eq!(server.token_requests(), 2);
    let auth: Vec<Option<String>> = server
        .graph_requests()
        .into_iter()
        .map(|r| r.authorization)
        .collect();
    assert_eq!(
        auth,
        vec![Some("Bearer token-1".into()), Some("Bearer token-2".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_page_with_a_next_link_is_followed() {
    let server = ScriptedGraph::start().await;
    server.on(
        "/v1.0/users/delta",
        Scripted::json(r#"{"@odata.nextLink":"https://graph.microsoft.com/v1.0/users/delta?$skiptoken=2","value":[]}"#),
    );
    server.on(
        "/v1.0/users/delta?$skiptoken=2",
        Scripted::fixture("users-delta-walkthrough/3-final.json"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&server.base_url(), &server.token_url(), dir.path(), "");
    run_once(&config).await.unwrap();
    assert_eq!(read_events(&events_path(dir.path())).len(), 2);
}

async fn resync_after(fault: Scripted) {
    let server = ScriptedGraph::start().await;
    walkthrough_round1(&server);
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&server.base_url(), &server.token_url(), dir.path(), SELECT);
    run_once(&config).await.unwrap();
    assert_eq!(read_events(&events_path(dir.path())).len(), 8);

    // Graph resets the sync state on the next deltaLink; the full round it
    // then serves lacks five users and changed one.
    server.on(DELTA1, fault);
    server.on(
        INITIAL,
        Scripted::json(
            r#"{"@odata.deltaLink":"https://graph.microsoft.com/v1.0/users/delta?$deltatoken=after-resync","value":[
            {"displayName":"Cameron White","givenName":"Cameron","surname":"White","id":"ffff7b1a-13b6-477b-8c0c-380905cd99f7"},
            {"displayName":"Delia Dennis-Smith","givenName":"Delia","surname":"Dennis-Smith","id":"605d1257-ffff-40b6-8e6f-528a53f5dc55"},
            {"displayName":"New Hire","givenName":"New","surname":"Hire","id":"0000aaaa-0000-0000-0000-000000000001"}]}"#,
        ),
    );
    run_once(&config).await.unwrap();
    let events = read_events(&events_path(dir.path()));
    let resync = summary(&events[8..]);
    assert_eq!(
        resync[0],
        (
            "605d1257-ffff-40b6-8e6f-528a53f5dc55".into(),
            ChangeType::Updated,
            names(&["displayName", "surname"]),
            true
        )
    );
    assert_eq!(
        resync[1].1,
        ChangeType::Created,
        "a new user during the gap"
    );
    let inferred: Vec<&ChangeEvent> = events[8..].iter().filter(|e| e.inferred).collect();
    let mut ids: Vec<&str> = inferred.iter().map(|e| e.object_id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            "25dcffff-959e-4ece-9973-e5d9b800e8cc",
            "6ea91a8d-e32e-41a1-b7bd-d2d185eed0e0",
            "8b1ee412-cd8f-4d59-ffff-24010edb9f1f",
            "d8c37826-ffff-4cae-b348-e2725b1e814b",
            "f6ede700-27d0-4c42-bfb9-4dffff43c74a",
        ]
    );
    assert!(
        inferred
            .iter()
            .all(|e| e.change_type() == ChangeType::HardDeleted && e.snapshot)
    );
    assert_eq!(events.len(), 8 + 2 + 5, "Cameron is not re-announced");
    let cp = checkpoint(dir.path());
    assert_eq!(cp.phase(), Phase::Incremental);
    assert_eq!(cp.round, 2);
    assert!(cp.link.ends_with("after-resync"));
    let store = Store::open_read_only(&dir.path().join("state"), "users")
        .unwrap()
        .unwrap();
    assert_eq!(store.object_count().unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_starts_a_resync_and_infers_deletions() {
    resync_after(
        Scripted::status(
            410,
            r#"{"error":{"code":"Gone","message":"sync state reset"}}"#,
        )
        .header(
            "Location",
            "https://graph.microsoft.com/v1.0/users/delta?$select=displayName,givenName,surname",
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_sync_token_in_any_letter_case_starts_a_resync() {
    resync_after(Scripted::status(
        400,
        r#"{"error":{"code":"SyncStateNotFound","message":"The sync state is not found"}}"#,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_minimal_is_sent_on_delta_link_rounds_only() {
    let server = ScriptedGraph::start().await;
    walkthrough(&server);
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(
        &server.base_url(),
        &server.token_url(),
        dir.path(),
        &format!("{SELECT}\nreturn_minimal = true"),
    );
    run_once(&config).await.unwrap();
    run_once(&config).await.unwrap();
    let prefer: Vec<Option<String>> = server
        .graph_requests()
        .into_iter()
        .map(|r| r.prefer)
        .collect();
    assert_eq!(
        prefer,
        vec![None, None, None, Some("return=minimal".into())]
    );
}

/// A sink that fails the first `fail` publishes with `error`, then acks.
struct FlakySink {
    fail: u32,
    permanent: bool,
    calls: AtomicU32,
    acked: std::sync::Mutex<Vec<ChangeEvent>>,
}

#[async_trait]
impl Sink for FlakySink {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    async fn publish(&self, batch: OutBatch<'_>) -> Result<(), SinkError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.fail {
            return Err(if self.permanent {
                SinkError::Permanent("topic authorization failed".into())
            } else {
                SinkError::Retriable("broker down".into())
            });
        }
        self.acked.lock().unwrap().extend_from_slice(batch.events);
        Ok(())
    }
}

async fn run_with_sink(
    sink: Arc<FlakySink>,
    dir: &std::path::Path,
    server: &ScriptedGraph,
) -> Result<(), graphdelta::runtime::RunError> {
    let config = file_config(&server.base_url(), &server.token_url(), dir, SELECT);
    let resolved = config.resolve().unwrap();
    let options = RunOptions::default();
    Prepared::with_sink(&config, &options, sink, resolved)
        .unwrap()
        .run(true)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_checkpoint_without_an_ack() {
    let server = ScriptedGraph::start().await;
    walkthrough(&server);
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(FlakySink {
        fail: u32::MAX,
        permanent: true,
        calls: AtomicU32::new(0),
        acked: Default::default(),
    });
    let err = run_with_sink(sink.clone(), dir.path(), &server)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("topic authorization failed") && err.contains("stream `users`"),
        "{err}"
    );
    let store = Store::open_read_only(&dir.path().join("state"), "users")
        .unwrap()
        .unwrap();
    assert!(
        store.load_checkpoint().unwrap().is_none(),
        "committed without an ack"
    );
    assert_eq!(store.object_count().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_sink_errors_republish_in_order_and_lose_nothing() {
    let server = ScriptedGraph::start().await;
    walkthrough(&server);
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(FlakySink {
        fail: 2,
        permanent: false,
        calls: AtomicU32::new(0),
        acked: Default::default(),
    });
    run_with_sink(sink.clone(), dir.path(), &server)
        .await
        .unwrap();
    let acked = sink.acked.lock().unwrap().clone();
    // Every event of the round arrived; an object's events never go back in
    // order (duplicates carry the same id).
    let mut ids: Vec<&str> = acked.iter().map(|e| e.event_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8);
    let cp = checkpoint(dir.path());
    assert_eq!(cp.phase(), Phase::Incremental);
}
