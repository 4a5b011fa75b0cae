//! The Graph tenant simulator over real HTTP: OAuth, delta rounds, paging,
//! select/filter, minimal responses, member slices, faults, the control API,
//! and a reference client whose computed state must equal the ground truth.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use graphdelta::simulator::{
    ChangeKind, ChurnCounts, ChurnSpec, Fault, FaultScope, GroundTruth, ObjectKind, ObjectState,
    RequestKind, SimConfig, SimHandle, SimStats, Simulator,
};
use serde_json::{Value, json};

const SCOPE: &str = "https://graph.microsoft.com/.default";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A minimal Graph client for the tests.
struct Client {
    http: reqwest::Client,
    handle: SimHandle,
    token: String,
}

/// One complete round.
#[derive(Debug)]
struct Round {
    pages: Vec<Value>,
    objects: Vec<Value>,
    delta_link: String,
}

impl Client {
    async fn start(cfg: SimConfig) -> Self {
        let handle = Simulator::new(cfg).spawn(loopback()).await.unwrap();
        let http = reqwest::Client::new();
        let mut c = Client {
            http,
            handle,
            token: String::new(),
        };
        c.token = c.fetch_token().await;
        c
    }

    fn sim(&self) -> &Simulator {
        self.handle.simulator()
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.handle.base_url(), path_and_query)
    }

    fn control(&self, path: &str) -> String {
        format!("http://{}/_sim/{path}", self.handle.addr)
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(self.handle.token_url())
            .form(form)
            .send()
            .await
            .unwrap()
    }

    async fn fetch_token(&self) -> String {
        let resp = self
            .token_request(&[
                ("grant_type", "client_credentials"),
                ("client_id", "graphdelta-simulator"),
                ("client_secret", "simulator-secret"),
                ("scope", SCOPE),
            ])
            .await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    }

    async fn get(&self, url: &str, prefer: &[&str]) -> reqwest::Response {
        let mut req = self.http.get(url).bearer_auth(&self.token);
        for p in prefer {
            req = req.header("Prefer", *p);
        }
        req.send().await.unwrap()
    }

    async fn page(&self, url: &str, prefer: &[&str]) -> Value {
        let resp = self.get(url, prefer).await;
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 200, "GET {url}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: {e}: {body}"))
    }

    /// Follows nextLinks to the deltaLink, checking the envelope of each page.
    async fn round(&self, start: &str, prefer: &[&str]) -> Round {
        self.round_with(start, prefer, |_| {}).await
    }

    /// Like `round`, calling `between(page_number)` after each page.
    async fn round_with(
        &self,
        start: &str,
        prefer: &[&str],
        mut between: impl FnMut(usize),
    ) -> Round {
        let mut url = start.to_owned();
        let mut pages = Vec::new();
        let mut objects = Vec::new();
        for n in 0..100_000 {
            let page = self.page(&url, prefer).await;
            let next = page.get("@odata.nextLink").and_then(Value::as_str);
            let delta = page.get("@odata.deltaLink").and_then(Value::as_str);
            assert!(
                next.is_some() ^ delta.is_some(),
                "exactly one link per page: {page}"
            );
            assert!(
                page["@odata.context"]
                    .as_str()
                    .unwrap()
                    .contains("$metadata#")
            );
            objects.extend(page["value"].as_array().unwrap().iter().cloned());
            let next = next.map(str::to_owned);
            let delta = delta.map(str::to_owned);
            pages.push(page);
            between(n);
            match (next, delta) {
                (Some(n), _) => {
                    assert!(n.contains("$skiptoken="), "{n}");
                    url = n;
                }
                (None, Some(d)) => {
                    assert!(d.contains("$deltatoken="), "{d}");
                    return Round {
                        pages,
                        objects,
                        delta_link: d,
                    };
                }
                (None, None) => unreachable!(),
            }
        }
        panic!("round did not end");
    }
}

fn ids(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect()
}

fn small(users: usize) -> SimConfig {
    SimConfig {
        users,
        groups: 10,
        applications: 5,
        devices: 5,
        service_principals: 5,
        ..SimConfig::default()
    }
}

async fn error_code(resp: reqwest::Response) -> (u16, String, Value) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    let code = v["error"]["code"]
        .as_str()
        .or_else(|| v["error"].as_str())
        .unwrap_or_default()
        .to_owned();
    (status, code, v)
}

// ----- authentication -----------------------------------------------------------

#[tokio::test]
async fn token_flow_and_bad_credentials() {
    let c = Client::start(small(10)).await;
    let ok = c
        .token_request(&[
            ("grant_type", "client_credentials"),
            ("client_id", "graphdelta-simulator"),
            ("client_secret", "simulator-secret"),
            ("scope", SCOPE),
        ])
        .await;
    assert_eq!(ok.status(), 200);
    let v: Value = ok.json().await.unwrap();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3599);
    assert_eq!(v["ext_expires_in"], 3599);
    assert!(v["access_token"].as_str().unwrap().len() >= 32);

    let bad_secret = c
        .token_request(&[
            ("grant_type", "client_credentials"),
            ("client_id", "graphdelta-simulator"),
            ("client_secret", "wrong"),
            ("scope", SCOPE),
        ])
        .await;
    assert_eq!(bad_secret.status(), 401);
    let v: Value = bad_secret.json().await.unwrap();
    assert_eq!(v["error"], "invalid_client");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215: Invalid client secret provided.")
    );

    let bad_client = c
        .token_request(&[
            ("grant_type", "client_credentials"),
            ("client_id", "someone-else"),
            ("client_secret", "simulator-secret"),
            ("scope", SCOPE),
        ])
        .await;
    assert_eq!(bad_client.status(), 400);
    assert_eq!(error_code(bad_client).await.1, "unauthorized_client");

    let bad_grant = c
        .token_request(&[
            ("grant_type", "password"),
            ("client_id", "graphdelta-simulator"),
            ("client_secret", "simulator-secret"),
            ("scope", SCOPE),
        ])
        .await;
    assert_eq!(error_code(bad_grant).await.1, "unsupported_grant_type");

    let bad_scope = c
        .token_request(&[
            ("grant_type", "client_credentials"),
            ("client_id", "graphdelta-simulator"),
            ("client_secret", "simulator-secret"),
            ("scope", "User.Read"),
        ])
        .await;
    assert_eq!(error_code(bad_scope).await.1, "invalid_scope");

    let wrong_tenant = c
        .http
        .post(
            c.handle
                .token_url()
                .replace("contoso.onmicrosoft.com", "fabrikam.com"),
        )
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "graphdelta-simulator"),
            ("client_secret", "simulator-secret"),
            ("scope", SCOPE),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_tenant.status(), 400);

    // client_secret_basic works too.
    let basic = c
        .http
        .post(c.handle.token_url())
        .basic_auth("graphdelta-simulator", Some("simulator-secret"))
        .form(&[("grant_type", "client_credentials"), ("scope", SCOPE)])
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);

    let stats = c.sim().stats();
    assert_eq!(stats.token_requests, 8);
    assert_eq!(stats.tokens_issued, 3);
    assert_eq!(stats.bearer_headers(RequestKind::Token), 0);
    assert_eq!(stats.authorization[&RequestKind::Token].other, 1);
}

#[tokio::test]
async fn graph_requires_a_valid_bearer_token() {
    let c = Client::start(small(10)).await;
    let url = c.url("/users/delta");
    let none = c.http.get(&url).send().await.unwrap();
    let (status, code, _) = error_code(none).await;
    assert_eq!((status, code.as_str()), (401, "InvalidAuthenticationToken"));
    let forged = c.http.get(&url).bearer_auth("forged").send().await.unwrap();
    let (status, code, v) = error_code(forged).await;
    assert_eq!((status, code.as_str()), (401, "InvalidAuthenticationToken"));
    assert_eq!(
        v["error"]["message"],
        "Access token has expired or is not yet valid."
    );
    assert_eq!(c.get(&url, &[]).await.status(), 200);

    // Invalidating tokens: 401 until a new one is fetched.
    c.sim().inject(Fault::InvalidateTokens);
    assert_eq!(c.get(&url, &[]).await.status(), 401);
    let fresh = c.fetch_token().await;
    let resp = c.http.get(&url).bearer_auth(fresh).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let stats = c.sim().stats();
    assert_eq!(stats.authorization[&RequestKind::Initial].none, 1);
    assert_eq!(stats.bearer_headers(RequestKind::Initial), 4);
    assert_eq!(stats.status_count(RequestKind::Initial, 401), 3);
    assert_eq!(stats.status_count(RequestKind::Initial, 200), 2);
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let c = Client::start(SimConfig {
        token_lifetime: Duration::from_secs(1),
        ..small(5)
    })
    .await;
    assert_eq!(c.get(&c.url("/users/delta"), &[]).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(c.get(&c.url("/users/delta"), &[]).await.status(), 401);
}

// ----- rounds and paging -----------------------------------------------------------

#[tokio::test]
async fn initial_round_returns_every_user_exactly_once() {
    let c = Client::start(small(1050)).await;
    let round = c.round(&c.url("/users/delta"), &[]).await;
    assert_eq!(round.pages.len(), 6, "5 full pages of 200 and one of 50");
    for page in &round.pages[..5] {
        assert_eq!(page["value"].as_array().unwrap().len(), 200);
    }
    let got = ids(&round.objects);
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "a user was sent twice");
    let truth = c.sim().truth();
    let want: HashSet<&String> = truth.users.iter().map(|u| &u.id).collect();
    assert_eq!(unique, want);
    // Every link is absolute, on the simulator's host, with no query but the token.
    let base = c.handle.base_url();
    for page in &round.pages {
        let link = page
            .get("@odata.nextLink")
            .or_else(|| page.get("@odata.deltaLink"))
            .and_then(Value::as_str)
            .unwrap();
        assert!(link.starts_with(&format!("{base}/users/delta?$")), "{link}");
        assert_eq!(link.matches('=').count(), 1, "{link}");
    }
    // All properties without $select (mobilePhone is sometimes never set).
    let first = &round.objects[0];
    for p in [
        "displayName",
        "userPrincipalName",
        "businessPhones",
        "accountEnabled",
        "createdDateTime",
    ] {
        assert!(first.get(p).is_some(), "{p} missing in {first}");
    }
    let absent = round
        .objects
        .iter()
        .filter(|o| o.get("mobilePhone").is_none())
        .count();
    assert!(
        absent > 0 && absent < 1050,
        "mobilePhone is never set on some users only"
    );
    // Nothing changed: the next round is empty but has a new deltaLink.
    let again = c.round(&round.delta_link, &[]).await;
    assert!(again.objects.is_empty());
    assert_ne!(again.delta_link, round.delta_link);
}

#[tokio::test]
async fn select_is_honored_and_encoded_in_the_token() {
    let c = Client::start(small(450)).await;
    let round = c
        .round(&c.url("/users/delta?$select=displayName,jobTitle"), &[])
        .await;
    assert_eq!(round.objects.len(), 450);
    for o in &round.objects {
        let keys: BTreeSet<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(
            keys.is_subset(&BTreeSet::from(["displayName", "jobTitle", "id"])),
            "{o}"
        );
        assert!(keys.contains("id") && keys.contains("displayName"));
    }
    assert!(
        round.pages[0]["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/$metadata#users(displayName,jobTitle)")
    );
    for page in &round.pages {
        let link = page
            .get("@odata.nextLink")
            .or_else(|| page.get("@odata.deltaLink"))
            .and_then(Value::as_str)
            .unwrap();
        assert!(
            !link.contains("select") && !link.contains("displayName"),
            "{link}"
        );
    }
    // The select carries over to the next round, and only selected properties are tracked.
    let first = round.objects[0]["id"].as_str().unwrap().to_owned();
    let second = round.objects[1]["id"].as_str().unwrap().to_owned();
    c.sim()
        .update(&first, json!({"jobTitle": "Astronaut"}))
        .unwrap();
    c.sim()
        .update(&second, json!({"department": "Space"}))
        .unwrap();
    let next = c.round(&round.delta_link, &[]).await;
    assert_eq!(ids(&next.objects), vec![first]);
    assert_eq!(next.objects[0]["jobTitle"], "Astronaut");
    assert!(next.objects[0].get("department").is_none());

    let bad = c.get(&c.url("/users/delta?$select=shoeSize"), &[]).await;
    let (status, code, _) = error_code(bad).await;
    assert_eq!((status, code.as_str()), (400, "Request_BadRequest"));
}

#[tokio::test]
async fn max_page_size_preference_and_path_variants() {
    let c = Client::start(small(120)).await;
    let resp = c
        .get(&c.url("/users/delta"), &["odata.maxpagesize=50"])
        .await;
    assert_eq!(
        resp.headers()["preference-applied"].to_str().unwrap(),
        "odata.maxpagesize=50"
    );
    let round = c
        .round(
            &c.url("/users/microsoft.graph.delta()"),
            &["odata.maxpagesize=50, return=minimal"],
        )
        .await;
    assert_eq!(round.pages.len(), 3);
    assert_eq!(round.objects.len(), 120);
    let link = round.pages[0]["@odata.nextLink"].as_str().unwrap();
    assert!(
        link.contains("/users/microsoft.graph.delta()?$skiptoken="),
        "{link}"
    );
    // A larger preference than the page size is not applied.
    let resp = c
        .get(&c.url("/users/delta/"), &["odata.maxpagesize=5000"])
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("preference-applied").is_none());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["value"].as_array().unwrap().len(), 120);
}

#[tokio::test]
async fn deltatoken_latest_starts_from_now() {
    let c = Client::start(small(300)).await;
    let first = c.page(&c.url("/users/delta?$deltatoken=latest"), &[]).await;
    assert!(first["value"].as_array().unwrap().is_empty());
    let link = first["@odata.deltaLink"].as_str().unwrap().to_owned();
    let empty = c.round(&link, &[]).await;
    assert!(empty.objects.is_empty());
    let id = c.sim().object_id(ObjectKind::User, 7).unwrap();
    c.sim()
        .update(&id, json!({"displayName": "Renamed"}))
        .unwrap();
    let next = c.round(&empty.delta_link, &[]).await;
    assert_eq!(ids(&next.objects), vec![id]);
    assert_eq!(next.objects[0]["displayName"], "Renamed");
}

#[tokio::test]
async fn delta_round_after_churn_returns_exactly_the_changed_objects() {
    let c = Client::start(small(600)).await;
    let initial = c.round(&c.url("/users/delta"), &[]).await;
    // Some soft-deleted users first, so that churn can restore and hard-delete them.
    c.sim().churn(&ChurnSpec {
        users: ChurnCounts {
            soft_deletes: 10,
            ..ChurnCounts::default()
        },
        ..ChurnSpec::default()
    });
    let mid = c.round(&initial.delta_link, &[]).await;
    assert_eq!(mid.objects.len(), 10);
    assert!(
        mid.objects
            .iter()
            .all(|o| o["@removed"]["reason"] == "changed")
    );
    let seq = c.sim().truth().seq;
    let report = c.sim().churn(&ChurnSpec {
        users: ChurnCounts {
            creates: 15,
            updates: 40,
            soft_deletes: 8,
            hard_deletes: 6,
            restores: 4,
            ..ChurnCounts::default()
        },
        ..ChurnSpec::default()
    });
    assert_eq!(report.applied.users.total(), 73, "{report:?}");
    let round = c.round(&mid.delta_link, &[]).await;
    let changed: BTreeSet<String> = c
        .sim()
        .changes_since(seq)
        .into_iter()
        .filter(|r| r.kind == ObjectKind::User)
        .map(|r| r.id)
        .collect();
    let got = ids(&round.objects);
    assert_eq!(got.len(), changed.len(), "each changed user exactly once");
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), changed);
    let truth = c.sim().truth();
    let (mut soft, mut hard, mut live) = (0, 0, 0);
    for o in &round.objects {
        let id = o["id"].as_str().unwrap();
        match (
            truth.find(id).map(|t| t.state),
            o["@removed"]["reason"].as_str(),
        ) {
            (Some(ObjectState::Live), None) => live += 1,
            (Some(ObjectState::SoftDeleted), Some("changed")) => soft += 1,
            (None, Some("deleted")) => hard += 1,
            other => panic!("{id}: {other:?} in {o}"),
        }
    }
    assert_eq!(hard, 6);
    assert!(soft >= 8 - 4 && live >= 40, "soft {soft}, live {live}");
}

#[tokio::test]
async fn return_minimal_returns_only_changed_properties() {
    let c = Client::start(small(50)).await;
    let initial = c.round(&c.url("/users/delta"), &[]).await;
    let target = c.sim().object_id(ObjectKind::User, 3).unwrap();
    c.sim()
        .update(
            &target,
            json!({"jobTitle": "Pilot", "officeLocation": null}),
        )
        .unwrap();
    let created = c
        .sim()
        .create_user(json!({"displayName": "Nova Kim", "mobilePhone": null}))
        .unwrap();
    let resp = c.get(&initial.delta_link, &["return=minimal"]).await;
    assert_eq!(
        resp.headers()["preference-applied"].to_str().unwrap(),
        "return=minimal"
    );
    let round = c.round(&initial.delta_link, &["return=minimal"]).await;
    let by_id: HashMap<String, &Value> = round
        .objects
        .iter()
        .map(|o| (o["id"].as_str().unwrap().to_owned(), o))
        .collect();
    assert_eq!(by_id.len(), 2);
    assert_eq!(
        *by_id[&target],
        json!({"id": target, "jobTitle": "Pilot", "officeLocation": null})
    );
    // A created object comes whole, nulls included.
    let new = by_id[&created];
    assert_eq!(new["displayName"], "Nova Kim");
    assert_eq!(new["mobilePhone"], Value::Null);
    assert!(new.get("userPrincipalName").is_some() && new.get("createdDateTime").is_some());

    // Without the header: every selected property, changed or not.
    let full = c.round(&initial.delta_link, &[]).await;
    let t = full
        .objects
        .iter()
        .find(|o| o["id"] == target.as_str())
        .unwrap();
    assert_eq!(t["jobTitle"], "Pilot");
    assert_eq!(t["officeLocation"], Value::Null);
    assert!(t.get("displayName").is_some() && t.get("userPrincipalName").is_some());

    // return=minimal is not applied to an initial round.
    let resp = c.get(&c.url("/users/delta"), &["return=minimal"]).await;
    assert!(resp.headers().get("preference-applied").is_none());
}

// ----- groups and members ------------------------------------------------------------

#[tokio::test]
async fn a_large_group_is_split_into_slices_across_pages() {
    let c = Client::start(SimConfig {
        users: 200,
        groups: 30,
        members_per_group: 4,
        page_size: 7,
        ..small(200)
    })
    .await;
    let group = c.sim().create_group(json!({"displayName": "Big"})).unwrap();
    for i in 0..75 {
        let u = c.sim().object_id(ObjectKind::User, i * 2).unwrap();
        c.sim().add_member(&group, &u).unwrap();
    }
    let round = c
        .round(&c.url("/groups/delta?$select=displayName,members"), &[])
        .await;
    let mut pages_with_group = Vec::new();
    let mut union = BTreeSet::new();
    let mut slice_firsts = Vec::new();
    for (n, page) in round.pages.iter().enumerate() {
        for o in page["value"].as_array().unwrap() {
            if o["id"] == group.as_str() {
                pages_with_group.push(n);
                assert_eq!(o["displayName"], "Big");
                let slice = o["members@delta"].as_array().unwrap();
                assert!(slice.len() <= 20);
                slice_firsts.push(slice[0]["id"].as_str().unwrap().to_owned());
                for m in slice {
                    assert_eq!(m["@odata.type"], "#microsoft.graph.user");
                    assert!(m.get("@removed").is_none());
                    assert!(
                        union.insert(m["id"].as_str().unwrap().to_owned()),
                        "duplicate member"
                    );
                }
            }
        }
    }
    assert_eq!(pages_with_group.len(), 4, "75 members in slices of 20");
    let distinct: BTreeSet<_> = pages_with_group.iter().collect();
    assert_eq!(distinct.len(), 4, "each slice on another page");
    let truth = c.sim().truth();
    let want: BTreeSet<String> = truth
        .find(&group)
        .unwrap()
        .members
        .clone()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(union, want);
    // Every other group is complete too.
    for g in &truth.groups {
        let got: BTreeSet<String> = round
            .objects
            .iter()
            .filter(|o| o["id"] == g.id.as_str())
            .flat_map(|o| o["members@delta"].as_array().unwrap().clone())
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        let want: BTreeSet<String> = g.members.clone().unwrap().into_iter().collect();
        assert_eq!(got, want, "group {}", g.id);
    }
}

#[tokio::test]
async fn member_changes_show_in_the_next_round() {
    let c = Client::start(small(100)).await;
    let initial = c.round(&c.url("/groups/delta"), &[]).await;
    let truth = c.sim().truth();
    let g = &truth.groups[2];
    let members = g.members.clone().unwrap();
    let leaving = members[0].clone();
    let joining = truth
        .users
        .iter()
        .map(|u| u.id.clone())
        .find(|u| !members.contains(u))
        .unwrap();
    c.sim().add_member(&g.id, &joining).unwrap();
    c.sim().remove_member(&g.id, &leaving).unwrap();
    let round = c.round(&initial.delta_link, &[]).await;
    assert_eq!(ids(&round.objects), vec![g.id.clone()]);
    let delta = round.objects[0]["members@delta"].as_array().unwrap();
    assert_eq!(
        delta,
        &vec![
            json!({"@odata.type": "#microsoft.graph.user", "id": joining}),
            json!({"@odata.type": "#microsoft.graph.user", "id": leaving, "@removed": {"reason": "deleted"}}),
        ]
    );
    // Deleting a member user removes it from its groups.
    let next = c.round(&round.delta_link, &[]).await;
    assert!(next.objects.is_empty());
    c.sim().soft_delete(&joining).unwrap();
    let after = c.round(&next.delta_link, &[]).await;
    assert_eq!(ids(&after.objects), vec![g.id.clone()]);
    assert_eq!(
        after.objects[0]["members@delta"],
        json!([{"@odata.type": "#microsoft.graph.user", "id": joining, "@removed": {"reason": "deleted"}}])
    );
    // With a select without members, membership changes are not tracked.
    let no_members = c
        .round(&c.url("/groups/delta?$select=displayName"), &[])
        .await;
    assert!(
        no_members
            .objects
            .iter()
            .all(|o| o.get("members@delta").is_none())
    );
    c.sim().remove_member(&g.id, &members[1]).unwrap();
    let quiet = c.round(&no_members.delta_link, &[]).await;
    assert!(quiet.objects.is_empty());
}

#[tokio::test]
async fn membership_changes_during_a_round_are_not_lost() {
    let c = Client::start(SimConfig {
        page_size: 3,
        ..small(50)
    })
    .await;
    // Created last, so that it is served on the round's last page.
    let g = c
        .sim()
        .create_group(json!({"displayName": "Late"}))
        .unwrap();
    let m = c.sim().object_id(ObjectKind::User, 1).unwrap();
    let mut mirror = Mirror::default();
    let sim = c.sim().clone();
    let (g2, m2) = (g.clone(), m.clone());
    let round = c
        .round_with(&c.url("/groups/delta"), &[], |page| {
            if page == 0 {
                sim.add_member(&g2, &m2).unwrap();
            }
        })
        .await;
    round.objects.iter().for_each(|o| mirror.apply(o));
    // Removed again before the next round: whatever the client saw of the
    // add, the next round must leave it without the member.
    c.sim().remove_member(&g, &m).unwrap();
    let next = c.round(&round.delta_link, &[]).await;
    next.objects.iter().for_each(|o| mirror.apply(o));
    assert!(
        mirror.objects[&g].members.is_empty(),
        "{:?}",
        mirror.objects[&g]
    );
    mirror.assert_matches(&c.sim().truth(), &[ObjectKind::Group], "groups");
}

// ----- directoryObjects and filters ------------------------------------------------

#[tokio::test]
async fn directory_objects_with_isof_filter() {
    let c = Client::start(small(90)).await;
    let url = c.url(
        "/directoryObjects/delta?$filter=isof('microsoft.graph.user')%20or%20isof('microsoft.graph.group')",
    );
    let round = c.round(&url, &[]).await;
    let truth = c.sim().truth();
    assert_eq!(round.objects.len(), truth.users.len() + truth.groups.len());
    for o in &round.objects {
        let t = o["@odata.type"].as_str().unwrap();
        assert!(
            t == "#microsoft.graph.user" || t == "#microsoft.graph.group",
            "{o}"
        );
        assert_eq!(truth.find(o["id"].as_str().unwrap()).unwrap().odata_type, t);
    }
    let with_select = c
        .round(
            &c.url(
                "/directoryObjects/delta?$filter=isof('microsoft.graph.user')\
                 &$select=microsoft.graph.user/surname,microsoft.graph.group/displayName",
            ),
            &[],
        )
        .await;
    assert_eq!(with_select.objects.len(), truth.users.len());
    for o in &with_select.objects {
        let keys: BTreeSet<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["@odata.type", "id", "surname"]),
            "{o}"
        );
    }
    // @removed entries carry @odata.type too.
    let id = truth.users[4].id.clone();
    c.sim().hard_delete(&id).unwrap();
    let next = c.round(&with_select.delta_link, &[]).await;
    assert_eq!(
        next.objects,
        vec![
            json!({"@odata.type": "#microsoft.graph.user", "id": id, "@removed": {"reason": "deleted"}})
        ]
    );
    // Everything without a filter.
    let all = c.round(&c.url("/directoryObjects/delta"), &[]).await;
    assert_eq!(
        all.objects.len(),
        90 - 1 + 10 + 5 + 5 + 5 + 1,
        "hard delete is recent"
    );

    let bad = c
        .get(
            &c.url("/directoryObjects/delta?$filter=displayName%20eq%20'x'"),
            &[],
        )
        .await;
    let (status, code, _) = error_code(bad).await;
    assert_eq!((status, code.as_str()), (400, "Request_UnsupportedQuery"));
    let isof_on_users = c
        .get(
            &c.url("/users/delta?$filter=isof('microsoft.graph.user')"),
            &[],
        )
        .await;
    assert_eq!(isof_on_users.status(), 400);
    let unknown = c.get(&c.url("/contacts/delta"), &[]).await;
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn id_filter_tracks_only_those_objects() {
    let c = Client::start(small(300)).await;
    let a = c.sim().object_id(ObjectKind::User, 10).unwrap();
    let b = c.sim().object_id(ObjectKind::User, 250).unwrap();
    let url = c.url(&format!(
        "/users/delta?$filter=id%20eq%20'{a}'%20or%20id%20eq%20'{b}'"
    ));
    let round = c.round(&url, &[]).await;
    assert_eq!(ids(&round.objects), vec![a.clone(), b.clone()]);
    let other = c.sim().object_id(ObjectKind::User, 11).unwrap();
    c.sim().update(&other, json!({"jobTitle": "X"})).unwrap();
    c.sim().update(&b, json!({"jobTitle": "Y"})).unwrap();
    let next = c.round(&round.delta_link, &[]).await;
    assert_eq!(ids(&next.objects), vec![b]);
    let too_many = (0..51)
        .map(|i| {
            format!(
                "id%20eq%20'{}'",
                c.sim().object_id(ObjectKind::User, i).unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join("%20or%20");
    let resp = c
        .get(&c.url(&format!("/users/delta?$filter={too_many}")), &[])
        .await;
    assert_eq!(resp.status(), 400);
}

// ----- tokens and faults ------------------------------------------------------------

#[tokio::test]
async fn tampered_or_misused_tokens_are_refused() {
    let c = Client::start(small(300)).await;
    let page = c.page(&c.url("/users/delta"), &[]).await;
    let next = page["@odata.nextLink"].as_str().unwrap();
    let (prefix, token) = next.split_once("$skiptoken=").unwrap();
    let mut chars: Vec<char> = token.chars().collect();
    chars[5] = if chars[5] == 'A' { 'B' } else { 'A' };
    let tampered = format!(
        "{prefix}$skiptoken={}",
        chars.into_iter().collect::<String>()
    );
    let (status, code, _) = error_code(c.get(&tampered, &[]).await).await;
    assert_eq!((status, code.as_str()), (400, "syncStateInvalid"));
    let garbage = format!("{prefix}$skiptoken=not-a-token");
    assert_eq!(c.get(&garbage, &[]).await.status(), 400);
    // A users token on groups.
    let on_groups = next.replace("/users/", "/groups/");
    let (status, code, _) = error_code(c.get(&on_groups, &[]).await).await;
    assert_eq!((status, code.as_str()), (400, "syncStateInvalid"));
    // A skiptoken presented as a deltatoken.
    let as_delta = next.replace("$skiptoken=", "$deltatoken=");
    assert_eq!(c.get(&as_delta, &[]).await.status(), 400);
    // The untampered link still works, as often as asked.
    assert_eq!(c.page(next, &[]).await, c.page(next, &[]).await);
}

#[tokio::test]
async fn gone_resets_sync_state_with_a_location() {
    let c = Client::start(small(300)).await;
    let done = c
        .round(&c.url("/users/delta?$select=displayName"), &[])
        .await;
    let first = c.page(&c.url("/users/delta"), &[]).await;
    let next = first["@odata.nextLink"].as_str().unwrap().to_owned();
    c.sim().inject(Fault::Gone {
        count: 1,
        scope: FaultScope::DeltaLink,
    });
    let resp = c.get(&done.delta_link, &[]).await;
    assert_eq!(resp.status(), 410);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(
        location,
        format!("{}/users/delta?$select=displayName", c.handle.base_url())
    );
    // Every older token is gone now, skiptokens included.
    assert_eq!(c.get(&next, &[]).await.status(), 410);
    assert_eq!(c.get(&done.delta_link, &[]).await.status(), 410);
    // The Location starts a fresh round that works.
    let fresh = c.round(&location, &[]).await;
    assert_eq!(fresh.objects.len(), 300);
    assert_eq!(c.round(&fresh.delta_link, &[]).await.objects.len(), 0);
    assert_eq!(c.sim().stats().epoch, 1);
}

#[tokio::test]
async fn expired_sync_state_codes() {
    let c = Client::start(small(20)).await;
    for (status, code) in [
        (400, "syncStateNotFound"),
        (403, "resyncRequired"),
        (404, "SyncStateNotFound"),
        (400, "syncStateInvalid"),
    ] {
        let round = c.round(&c.url("/users/delta"), &[]).await;
        c.sim().inject(Fault::SyncStateExpired {
            status,
            code: code.to_owned(),
            count: 1,
            scope: FaultScope::Graph,
        });
        // A new round (no token) is not affected and does not consume the fault.
        let fresh = c.round(&c.url("/users/delta"), &[]).await;
        assert_eq!(c.sim().queued_faults().len(), 1);
        // Nor is a token issued after the fault.
        assert_eq!(c.get(&fresh.delta_link, &[]).await.status(), 200);
        let (got_status, got_code, _) = error_code(c.get(&round.delta_link, &[]).await).await;
        assert_eq!((got_status, got_code.as_str()), (status, code));
        // Consumed: the old link works again.
        assert_eq!(c.get(&round.delta_link, &[]).await.status(), 200);
    }
}

#[tokio::test]
async fn throttling_with_and_without_retry_after() {
    let c = Client::start(small(20)).await;
    let url = c.url("/users/delta");
    c.sim().inject(Fault::HttpError {
        status: 429,
        retry_after: Some(3),
        count: 2,
        scope: FaultScope::Graph,
    });
    c.sim().inject(Fault::HttpError {
        status: 503,
        retry_after: None,
        count: 1,
        scope: FaultScope::Graph,
    });
    for _ in 0..2 {
        let resp = c.get(&url, &[]).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "3");
        assert_eq!(error_code(resp).await.1, "TooManyRequests");
    }
    let resp = c.get(&url, &[]).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_none());
    c.sim().inject(Fault::HttpError {
        status: 504,
        retry_after: Some(1),
        count: 1,
        scope: FaultScope::NextLink,
    });
    // Scoped to nextLinks: the initial request passes, the next page fails.
    let page = c.page(&url, &["odata.maxpagesize=5"]).await;
    let next = page["@odata.nextLink"].as_str().unwrap();
    assert_eq!(c.get(next, &["odata.maxpagesize=5"]).await.status(), 504);
    assert_eq!(c.get(next, &["odata.maxpagesize=5"]).await.status(), 200);
    assert_eq!(c.sim().stats().faults_applied["http_error"], 4);
}

#[tokio::test]
async fn truncated_and_malformed_bodies() {
    let c = Client::start(small(100)).await;
    let url = c.url("/users/delta");
    let good = c.get(&url, &[]).await.text().await.unwrap();
    c.sim().inject(Fault::TruncatedBody {
        count: 1,
        scope: FaultScope::Graph,
    });
    let resp = c.get(&url, &[]).await;
    assert_eq!(resp.status(), 200);
    let declared: usize = resp.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = resp.bytes().await.unwrap();
    assert_eq!(declared, body.len(), "Content-Length matches the cut body");
    assert!(body.len() < good.len());
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    c.sim().inject(Fault::MalformedJson {
        count: 1,
        scope: FaultScope::Graph,
    });
    let resp = c.get(&url, &[]).await;
    assert_eq!(resp.status(), 200);
    assert!(serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).is_err());
    // Retrying gets a good page.
    let v: Value = c.get(&url, &[]).await.json().await.unwrap();
    assert_eq!(v["value"].as_array().unwrap().len(), 100);
}

#[tokio::test]
async fn foreign_host_links() {
    let c = Client::start(small(300)).await;
    c.sim().inject(Fault::ForeignLink {
        host: None,
        count: 1,
        scope: FaultScope::Graph,
    });
    let page = c.page(&c.url("/users/delta"), &[]).await;
    let link = url::Url::parse(page["@odata.nextLink"].as_str().unwrap()).unwrap();
    assert_eq!(link.host_str(), Some("evil.example"));
    assert_eq!(link.port(), Some(c.handle.addr.port()));
    // A configurable host: point it at a second simulator to see what a client sends there.
    let other = Simulator::new(small(1)).spawn(loopback()).await.unwrap();
    c.sim().inject(Fault::ForeignLink {
        host: Some(other.addr.to_string()),
        count: 1,
        scope: FaultScope::Graph,
    });
    let page = c.page(&c.url("/users/delta"), &[]).await;
    let link = page["@odata.nextLink"].as_str().unwrap();
    assert!(link.starts_with(&format!(
        "http://{}/v1.0/users/delta?$skiptoken=",
        other.addr
    )));
    assert_eq!(
        other
            .simulator()
            .stats()
            .bearer_headers(RequestKind::NextLink),
        0
    );
    other.shutdown().await;
}

#[tokio::test]
async fn odd_objects_huge_pages_and_slow_pages() {
    let c = Client::start(small(30)).await;
    let url = c.url("/users/delta");
    c.sim().inject(Fault::MissingId {
        count: 1,
        scope: FaultScope::Graph,
    });
    let page = c.page(&url, &[]).await;
    let value = page["value"].as_array().unwrap();
    assert_eq!(value.len(), 31);
    assert_eq!(value.iter().filter(|o| o.get("id").is_none()).count(), 1);

    c.sim().inject(Fault::UnknownRemovedReason {
        reason: "unknownFutureValue".to_owned(),
        count: 1,
        scope: FaultScope::Graph,
    });
    let page = c.page(&url, &[]).await;
    let odd: Vec<&Value> = page["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("@removed").is_some())
        .collect();
    assert_eq!(odd.len(), 1);
    assert_eq!(odd[0]["@removed"]["reason"], "unknownFutureValue");

    c.sim().inject(Fault::HugePage {
        bytes: 2_000_000,
        count: 1,
        scope: FaultScope::Graph,
    });
    let resp = c.get(&url, &[]).await;
    let body = resp.bytes().await.unwrap();
    assert!(body.len() > 2_000_000);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["value"][0]["@simulator.padding"].as_str().unwrap().len(),
        2_000_000
    );

    c.sim().inject(Fault::Slow {
        delay_ms: 300,
        count: 1,
        scope: FaultScope::Graph,
    });
    let start = Instant::now();
    assert_eq!(c.get(&url, &[]).await.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(300));

    c.sim().set_page_latency(Duration::from_millis(150));
    let start = Instant::now();
    assert_eq!(c.get(&url, &[]).await.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn token_endpoint_faults() {
    let c = Client::start(small(5)).await;
    c.sim().inject(Fault::HttpError {
        status: 503,
        retry_after: Some(2),
        count: 2,
        scope: FaultScope::Token,
    });
    // A Graph request does not consume a token-scoped fault.
    assert_eq!(c.get(&c.url("/users/delta"), &[]).await.status(), 200);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "graphdelta-simulator"),
        ("client_secret", "simulator-secret"),
        ("scope", SCOPE),
    ];
    for _ in 0..2 {
        let resp = c.token_request(&form).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "2");
    }
    assert_eq!(c.token_request(&form).await.status(), 200);
    c.sim().inject(Fault::Slow {
        delay_ms: 200,
        count: 1,
        scope: FaultScope::Token,
    });
    let start = Instant::now();
    assert_eq!(c.token_request(&form).await.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(200));
}

// ----- control API ------------------------------------------------------------------

#[tokio::test]
async fn control_api_over_http() {
    let c = Client::start(small(40)).await;
    let http = &c.http;
    let report: Value = http
        .post(c.control("churn"))
        .json(&json!({"users": {"updates": 5, "creates": 2}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["applied"]["users"]["updates"], 5);
    assert_eq!(report["applied"]["users"]["creates"], 2);
    let bad = http
        .post(c.control("churn"))
        .json(&json!({"users": {"explode": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let created: Value = http
        .post(c.control("mutate"))
        .json(&json!({"op": "create", "kind": "user", "properties": {"displayName": "Via HTTP"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let resp = http
        .post(c.control("mutate"))
        .json(&json!({"op": "soft_delete", "id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let again = http
        .post(c.control("mutate"))
        .json(&json!({"op": "soft_delete", "id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let missing = http
        .post(c.control("mutate"))
        .json(&json!({"op": "restore", "id": "00000000-0000-0000-0000-000000000001"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let truth: GroundTruth = http
        .get(c.control("truth"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(truth, c.sim().truth());
    assert_eq!(truth.find(&id).unwrap().state, ObjectState::SoftDeleted);
    assert_eq!(truth.mutations[&ChangeKind::Create], 3);

    let changes: Vec<Value> = http
        .get(c.control(&format!("changes?since={}", truth.seq - 1)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["change"], "soft_delete");

    let queued: Value = http
        .post(c.control("faults"))
        .json(&json!([{"kind": "http_error", "status": 429, "retry_after": 1}, {"kind": "gone", "scope": "delta_link"}]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queued["queued"], 2);
    let listed: Vec<Fault> = http
        .get(c.control("faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    let invalid = http
        .post(c.control("faults"))
        .json(&json!({"kind": "http_error", "status": 200}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);
    assert_eq!(c.get(&c.url("/users/delta"), &[]).await.status(), 429);
    let cleared = http.delete(c.control("faults")).send().await.unwrap();
    assert_eq!(cleared.status(), 204);
    assert!(c.sim().queued_faults().is_empty());

    let latency = http
        .post(c.control("page-latency"))
        .json(&json!({"page_latency": "20ms"}))
        .send()
        .await
        .unwrap();
    assert_eq!(latency.status(), 204);

    let stats: SimStats = http
        .get(c.control("stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.status_count(RequestKind::Initial, 429), 1);
    assert!(stats.requests_of(RequestKind::Control) >= 10);
    assert_eq!(stats.bearer_headers(RequestKind::Control), 0);
    assert_eq!(
        http.get(c.control("nope")).send().await.unwrap().status(),
        404
    );
}

#[tokio::test]
async fn automatic_churn_keeps_changing_the_tenant() {
    let c = Client::start(small(100)).await;
    let task = c
        .sim()
        .spawn_auto_churn(Duration::from_millis(40), ChurnSpec::mixed(10));
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.sim().seq() < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert!(c.sim().seq() >= 20, "only {} mutations", c.sim().seq());
}

#[tokio::test]
async fn a_million_users_start_instantly() {
    let start = Instant::now();
    let c = Client::start(SimConfig {
        users: 1_000_000,
        groups: 5000,
        ..SimConfig::default()
    })
    .await;
    let page = c.page(&c.url("/users/delta"), &[]).await;
    assert_eq!(page["value"].as_array().unwrap().len(), 200);
    let started = start.elapsed();
    let last = c.sim().object_id(ObjectKind::User, 999_999).unwrap();
    c.sim().update(&last, json!({"jobTitle": "Last"})).unwrap();
    println!(
        "1M-user tenant: first page after {started:?}, id lookup index built after {:?}",
        start.elapsed()
    );
    let delta = c.page(&c.url("/users/delta?$deltatoken=latest"), &[]).await;
    assert!(delta["value"].as_array().unwrap().is_empty());
    // Throughput of one sequential client over HTTP (printed, not asserted:
    // debug builds and a shared machine make any threshold meaningless).
    let mut url = page["@odata.nextLink"].as_str().unwrap().to_owned();
    let start = Instant::now();
    let mut objects = 0;
    for _ in 0..50 {
        let resp = c.get(&url, &[]).await;
        let body = resp.bytes().await.unwrap();
        objects += body.windows(6).filter(|w| w == b"\"id\":\"").count();
        let link_at = body
            .windows(17)
            .position(|w| w == b"@odata.nextLink\":")
            .unwrap();
        let rest = &body[link_at + 18..];
        let end = rest.iter().position(|&b| b == b'"').unwrap();
        url = String::from_utf8(rest[..end].to_vec()).unwrap();
    }
    assert_eq!(objects, 50 * 200);
    println!(
        "1M-user tenant over HTTP, one client: {:.0} objects/s",
        objects as f64 / start.elapsed().as_secs_f64()
    );
}

// ----- the reference client -------------------------------------------------------------

/// What a client that applies every round computes.
#[derive(Debug, Default)]
struct Mirror {
    objects: HashMap<String, Mirrored>,
}

#[derive(Debug, Clone)]
struct Mirrored {
    odata_type: Option<String>,
    soft_deleted: bool,
    props: serde_json::Map<String, Value>,
    members: BTreeSet<String>,
}

impl Mirror {
    fn apply(&mut self, o: &Value) {
        let id = o["id"].as_str().expect("object without id").to_owned();
        let odata_type = o
            .get("@odata.type")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(removed) = o.get("@removed") {
            match removed["reason"].as_str() {
                Some("deleted") => {
                    self.objects.remove(&id);
                }
                Some("changed") => {
                    let e = self.objects.entry(id).or_insert_with(|| Mirrored {
                        odata_type: odata_type.clone(),
                        soft_deleted: true,
                        props: serde_json::Map::new(),
                        members: BTreeSet::new(),
                    });
                    e.soft_deleted = true;
                }
                other => panic!("unknown @removed reason {other:?}"),
            }
            return;
        }
        let e = self.objects.entry(id).or_insert_with(|| Mirrored {
            odata_type: odata_type.clone(),
            soft_deleted: false,
            props: serde_json::Map::new(),
            members: BTreeSet::new(),
        });
        e.soft_deleted = false;
        for (k, v) in o.as_object().unwrap() {
            if k == "members@delta" {
                for m in v.as_array().unwrap() {
                    let mid = m["id"].as_str().unwrap().to_owned();
                    if m.get("@removed").is_some() {
                        e.members.remove(&mid);
                    } else {
                        e.members.insert(mid);
                    }
                }
            } else if k != "id" && !k.starts_with('@') {
                e.props.insert(k.clone(), v.clone());
            }
        }
    }

    /// Compares with the ground truth of `kinds`: ids and states of every
    /// object; properties and members of live ones.
    fn assert_matches(&self, truth: &GroundTruth, kinds: &[ObjectKind], label: &str) {
        let want: BTreeMap<&str, _> = kinds
            .iter()
            .flat_map(|&k| truth.objects(k))
            .map(|o| (o.id.as_str(), o))
            .collect();
        let got: BTreeSet<&str> = self.objects.keys().map(String::as_str).collect();
        let want_ids: BTreeSet<&str> = want.keys().copied().collect();
        assert_eq!(got, want_ids, "{label}: ids differ");
        for (id, t) in want {
            let m = &self.objects[id];
            assert_eq!(
                m.soft_deleted,
                t.state == ObjectState::SoftDeleted,
                "{label}: state of {id}"
            );
            if let Some(ty) = &m.odata_type {
                assert_eq!(ty, &t.odata_type);
            }
            if t.state == ObjectState::Live {
                assert_eq!(m.props, t.properties, "{label}: properties of {id}");
                if let Some(members) = &t.members {
                    let want: BTreeSet<String> = members.iter().cloned().collect();
                    assert_eq!(m.members, want, "{label}: members of {id}");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_client_applying_every_round_matches_the_ground_truth() {
    let c = Client::start(SimConfig {
        users: 700,
        groups: 40,
        applications: 15,
        devices: 15,
        service_principals: 15,
        members_per_group: 12,
        page_size: 37,
        member_slice: 5,
        replay_rate: 0.15,
        empty_pages: true,
        seed: 42,
        ..SimConfig::default()
    })
    .await;
    let streams = [
        ("/users/delta", vec![ObjectKind::User]),
        ("/groups/delta", vec![ObjectKind::Group]),
        (
            "/directoryObjects/delta?$filter=isof('microsoft.graph.application')%20or%20isof('microsoft.graph.device')%20or%20isof('microsoft.graph.servicePrincipal')",
            vec![
                ObjectKind::Application,
                ObjectKind::Device,
                ObjectKind::ServicePrincipal,
            ],
        ),
    ];
    let mut mirrors: Vec<Mirror> = streams.iter().map(|_| Mirror::default()).collect();
    let mut links: Vec<String> = streams.iter().map(|(p, _)| c.url(p)).collect();
    let churn = ChurnSpec {
        groups: ChurnCounts {
            creates: 2,
            updates: 5,
            soft_deletes: 2,
            hard_deletes: 1,
            restores: 1,
            member_adds: 25,
            member_removes: 15,
        },
        users: ChurnCounts {
            creates: 12,
            updates: 40,
            soft_deletes: 9,
            hard_deletes: 4,
            restores: 4,
            ..ChurnCounts::default()
        },
        ..ChurnSpec::mixed(60)
    };
    let mut replays_seen = 0;
    let mut empty_pages = 0;
    for round_no in 0..7 {
        let minimal = round_no % 2 == 1;
        let prefer: &[&str] = if minimal { &["return=minimal"] } else { &[] };
        for (i, mirror) in mirrors.iter_mut().enumerate() {
            // In some rounds the tenant changes while the round is in progress.
            let sim = c.sim().clone();
            let churn_mid = round_no % 3 == 0;
            let round = c
                .round_with(&links[i], prefer, |page| {
                    if churn_mid && page == 1 {
                        sim.churn(&ChurnSpec::mixed(30));
                    }
                })
                .await;
            let mut seen = HashSet::new();
            for o in &round.objects {
                if o.get("members@delta").is_none() && !seen.insert(o["id"].clone()) {
                    replays_seen += 1;
                }
                mirror.apply(o);
            }
            empty_pages += round
                .pages
                .iter()
                .filter(|p| {
                    p["value"].as_array().unwrap().is_empty() && p.get("@odata.nextLink").is_some()
                })
                .count();
            links[i] = round.delta_link;
        }
        c.sim().churn(&churn);
    }
    // A last round with a quiet tenant brings every mirror up to date.
    for (i, mirror) in mirrors.iter_mut().enumerate() {
        let round = c.round(&links[i], &["return=minimal"]).await;
        for o in &round.objects {
            mirror.apply(o);
        }
    }
    let truth = c.sim().truth();
    for (i, (path, kinds)) in streams.iter().enumerate() {
        mirrors[i].assert_matches(&truth, kinds, path);
    }
    let counts = &truth.mutations;
    assert!(counts[&ChangeKind::MemberRemove] > 0 && counts[&ChangeKind::Restore] > 0);
    assert!(replays_seen > 0, "replays were configured but none seen");
    assert!(empty_pages > 0, "empty pages were configured but none seen");
    println!(
        "reference client: {} mutations, {replays_seen} replays, {empty_pages} empty pages",
        truth.seq
    );
}
