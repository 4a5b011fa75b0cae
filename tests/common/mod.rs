//! Shared test harness: a scripted Graph server for protocol tests, connector
//! configs pointing at loopback servers, and readers for the file sink.
#![allow(dead_code)]

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    response::Response,
    routing::any,
};
use graphdelta::{config::Config, proto::v1::ChangeEvent};

/// The client secret every test config reads from this variable.
pub const SECRET_ENV: &str = "GRAPHDELTA_TEST_CLIENT_SECRET";

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Scripted {
    pub fn json(body: impl Into<String>) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn status(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A fixture file from `tests/fixtures/`.
    pub fn fixture(path: &str) -> Self {
        let full = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path);
        Self::json(
            std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display())),
        )
    }
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub authorization: Option<String>,
    pub prefer: Option<String>,
}

#[derive(Default)]
struct Script {
    routes: HashMap<String, VecDeque<Scripted>>,
    last: HashMap<String, Scripted>,
    requests: Vec<Recorded>,
    token_requests: u32,
    origin: String,
}

/// A Graph stand-in that answers each `path?query` with scripted responses
/// (in order; once they are used up, the last one repeats) and records every request. Bodies may
/// use Microsoft's origin `https://graph.microsoft.com`: it is replaced by
/// the server's own.
#[derive(Clone)]
pub struct ScriptedGraph {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl ScriptedGraph {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script {
            origin: format!("http://{addr}"),
            ..Default::default()
        }));
        let app = Router::new()
            .fallback(any(handle))
            .with_state(script.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, script }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1.0", self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/{{tenant}}/oauth2/v2.0/token", self.addr)
    }

    /// Queues `response` for requests to `path_and_query`.
    pub fn on(&self, path_and_query: &str, response: Scripted) {
        self.script
            .lock()
            .unwrap()
            .routes
            .entry(path_and_query.to_string())
            .or_default()
            .push_back(response);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.script.lock().unwrap().requests.clone()
    }

    pub fn graph_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path_and_query.starts_with("/v1.0/"))
            .collect()
    }

    pub fn token_requests(&self) -> u32 {
        self.script.lock().unwrap().token_requests
    }
}

async fn handle(State(script): State<Arc<Mutex<Script>>>, request: Request) -> Response {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers: &HeaderMap = request.headers();
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let recorded = Recorded {
        method: request.method().to_string(),
        path_and_query: path_and_query.clone(),
        authorization: header("authorization"),
        prefer: header("prefer"),
    };
    let is_token = path_and_query.ends_with("/oauth2/v2.0/token");
    let (scripted, origin) = {
        let mut s = script.lock().unwrap();
        s.requests.push(recorded);
        if is_token {
            s.token_requests += 1;
        }
        let n = s.token_requests;
        let origin = s.origin.clone();
        let next = s
            .routes
            .get_mut(&path_and_query)
            .and_then(VecDeque::pop_front);
        let scripted = match next {
            Some(x) => {
                s.last.insert(path_and_query.clone(), x.clone());
                Some(x)
            }
            None => s.last.get(&path_and_query).cloned().or_else(|| {
                is_token.then(|| {
                    Scripted::json(format!(
                        r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"token-{n}"}}"#
                    ))
                })
            }),
        };
        (scripted, origin)
    };
    let Some(scripted) = scripted else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from(format!(
                r#"{{"error":{{"code":"NotScripted","message":"no scripted response for {path_and_query}"}}}}"#
            )))
            .unwrap();
    };
    if !scripted.delay.is_zero() {
        tokio::time::sleep(scripted.delay).await;
    }
    let mut builder = Response::builder().status(scripted.status);
    for (k, v) in &scripted.headers {
        builder = builder.header(k, v.replace("https://graph.microsoft.com", &origin));
    }
    builder
        .body(Body::from(
            scripted
                .body
                .replace("https://graph.microsoft.com", &origin),
        ))
        .unwrap()
}

/// A connector file for one stream against `base_url`/`token_url`, with the
/// file sink at `dir/events.ndjson` and the store at `dir/state`.
/// `stream_extra` is appended to the `[[streams]]` table.
pub fn file_config(base_url: &str, token_url: &str, dir: &Path, stream_extra: &str) -> Config {
    set_secret();
    let text = format!(
        r#"
[graph]
base_url = "{base_url}"
token_url = "{token_url}"
tenant_id = "contoso.onmicrosoft.com"
client_id = "graphdelta-simulator"
client_secret_env = "{SECRET_ENV}"
max_attempts = 3

[[streams]]
name = "users"
resource = "users"
poll_interval = "1s"
{stream_extra}

[sink]
type = "file"
path = "{events}"

[checkpoint]
path = "{state}"

[runtime]
retry_min = "10ms"
retry_max = "50ms"
"#,
        events = dir.join("events.ndjson").display(),
        state = dir.join("state").display(),
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// `simulator` serving on a free loopback port.
pub async fn serve(
    simulator: &graphdelta::simulator::Simulator,
) -> graphdelta::simulator::SimHandle {
    simulator
        .clone()
        .spawn(([127, 0, 0, 1], 0).into())
        .await
        .expect("the simulator listens on loopback")
}

pub fn set_secret() {
    // SAFETY: every test sets the same value; nothing reads it concurrently
    // in a way that could observe a torn write.
    unsafe { std::env::set_var(SECRET_ENV, "simulator-secret") };
}

/// Every event in a file sink's output, in order.
pub fn read_events(path: &Path) -> Vec<ChangeEvent> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l}: {e}")))
        .collect()
}

pub fn events_path(dir: &Path) -> PathBuf {
    dir.join("events.ndjson")
}

/// Runs the config once (every stream to its deltaLink).
pub async fn run_once(config: &Config) -> Result<(), graphdelta::runtime::RunError> {
    graphdelta::runtime::run(
        config,
        graphdelta::runtime::RunOptions {
            once: true,
            ..Default::default()
        },
    )
    .await
}

/// A TCP relay to a broker that can be cut (existing connections dropped,
/// new ones refused) and restored: the sink "goes away" without touching
/// the broker other tests share.
pub struct Switch {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Switch {
    pub async fn start(upstream: std::net::SocketAddr) -> Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused, in effect
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        });
        Switch { port, up, conns }
    }

    pub fn set(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for c in self.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }
}

/// GET `url`: its status and body; `None` if nothing answered.
pub async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

/// Polls `f` every 50 ms until it yields, for at most `timeout`.
pub async fn poll<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Copies a directory and everything under it (a stream's store is a
/// SQLite file and its outbox directory).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            std::fs::copy(&path, &target)?;
        }
    }
    Ok(())
}
