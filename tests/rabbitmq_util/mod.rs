//! Shared harness for the RabbitMQ tests: the broker URL, unique names, an
//! independent consumer (plain lapin, not the sink) and cleanup that runs
//! even when a test panics.
//!
//! The broker is shared with other developers' tests: every test works on
//! its own exchange and queues and deletes them (and only them) at the end.
#![allow(dead_code)]

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use futures::StreamExt;
use graphdelta::{
    proto::v1::ChangeEvent,
    sink::rabbitmq::{AmqpUrl, RabbitMqSinkConfig},
};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use prost::Message;

/// `GRAPHDELTA_TEST_AMQP`, or the local broker with the default account.
pub fn amqp_url() -> String {
    std::env::var("GRAPHDELTA_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A name no other test (or developer) uses.
pub fn unique(what: &str) -> String {
    format!("gd-test-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A sink config on a fresh exchange; `extra` is more TOML (queues, ...).
pub fn sink_config(exchange: &str, extra: &str) -> RabbitMqSinkConfig {
    let mut c: RabbitMqSinkConfig = toml::from_str(&format!(
        "exchange = \"{exchange}\"\nconnection_name = \"{exchange}\"\nconfirm_timeout = \"10s\"\nconnect_timeout = \"5s\"\n{extra}"
    ))
    .unwrap();
    c.url = Some(AmqpUrl::new(amqp_url()));
    c
}

/// An admin connection for setup, consumption and cleanup. Panics with the
/// fix when the broker is not there: these tests never pass by skipping.
pub async fn admin() -> (Connection, Channel) {
    let url = amqp_url();
    let conn = match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "RabbitMQ is not reachable at {} ({e}): start it (`rabbitmq-server -detached`, or scripts/test does it) or point GRAPHDELTA_TEST_AMQP at a broker",
            graphdelta::sink::rabbitmq::config::redact_url(&url)
        ),
        Err(_) => panic!(
            "RabbitMQ at {} did not answer within 10s: is it running? (set GRAPHDELTA_TEST_AMQP)",
            graphdelta::sink::rabbitmq::config::redact_url(&url)
        ),
    };
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// Deletes the test's exchanges and queues when dropped, panic or not.
pub struct Cleanup {
    pub exchanges: Vec<String>,
    pub queues: Vec<String>,
}

impl Cleanup {
    pub fn new() -> Self {
        Self {
            exchanges: vec![],
            queues: vec![],
        }
    }

    pub fn exchange(mut self, name: &str) -> Self {
        self.exchanges.push(name.to_string());
        self
    }

    pub fn queue(mut self, name: &str) -> Self {
        self.queues.push(name.to_string());
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let exchanges = std::mem::take(&mut self.exchanges);
        let queues = std::mem::take(&mut self.queues);
        // Drop cannot await: delete from a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(Ok(conn)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    Connection::connect(&amqp_url(), ConnectionProperties::default()),
                )
                .await
                else {
                    return;
                };
                for q in queues {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for x in exchanges {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "OK".into()).await;
            });
        })
        .join();
    }
}

/// A message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub exchange: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    pub event: ChangeEvent,
}

impl Received {
    fn new(
        exchange: String,
        routing_key: String,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Self {
        let event = ChangeEvent::decode(&body[..]).unwrap_or_else(|e| {
            panic!("message with routing key {routing_key} is not a ChangeEvent: {e}")
        });
        Self {
            routing_key,
            exchange,
            properties,
            body,
            event,
        }
    }

    /// A string header's value.
    pub fn header(&self, name: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    pub fn raw_header(&self, name: &str) -> Option<AMQPValue> {
        self.properties
            .headers()
            .as_ref()?
            .inner()
            .get(name)
            .cloned()
    }
}

/// Takes messages off a (quorum or classic) queue until `expected` arrived
/// and nothing more came for a moment (duplicates would show up there), or
/// `timeout` passes. The consumer is cancelled before returning.
pub async fn drain(
    channel: &Channel,
    queue: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Received> {
    let tag = unique("drain");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        // Once everything expected is in, wait a little for extras.
        let until = if out.len() >= expected {
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(300))
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, consumer.next()).await {
            Ok(Some(Ok(d))) => out.push(Received::new(
                d.exchange.to_string(),
                d.routing_key.to_string(),
                d.properties,
                d.data,
            )),
            Ok(Some(Err(e))) => panic!("consuming {queue}: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    channel
        .basic_cancel(tag.as_str().into(), Default::default())
        .await
        .unwrap();
    out
}

/// The number of ready messages in a queue.
pub async fn depth(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue}: {e}"))
        .message_count()
}

/// Reads a stream queue from `offset` ("first", "last", "next") until
/// `expected` messages arrived or `timeout` passed.
pub async fn read_stream(
    conn: &Connection,
    queue: &str,
    offset: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Received> {
    let channel = conn.create_channel().await.unwrap();
    // Stream queues require a prefetch limit and manual acks.
    channel
        .basic_qos(100, BasicQosOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(offset.into()),
    );
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            unique("reader").as_str().into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap_or_else(|e| panic!("consume stream {queue}: {e}"));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let Ok(Some(delivery)) = next else { break };
        let d = delivery.unwrap();
        d.acker.ack(Default::default()).await.unwrap();
        out.push(Received::new(
            d.exchange.to_string(),
            d.routing_key.to_string(),
            d.properties,
            d.data,
        ));
    }
    let _ = channel.close(200, "OK".into()).await;
    out
}

/// Checks what at-least-once with ordered retries promises: every expected
/// event arrived; a repeated event id carries the identical message; and
/// per object, the events in order of first arrival have strictly
/// increasing `object_version`. Returns how many duplicates there were.
pub fn assert_complete_and_ordered(received: &[Received], expected: &[ChangeEvent]) -> usize {
    let mut first_seen: HashMap<&str, &Received> = HashMap::new();
    let mut duplicates = 0;
    let mut last_version: HashMap<(&str, &str), u64> = HashMap::new();
    for r in received {
        let id = r.event.event_id.as_str();
        if let Some(earlier) = first_seen.get(id) {
            assert_eq!(
                earlier.body, r.body,
                "event {id} arrived twice with different bodies"
            );
            assert_eq!(earlier.routing_key, r.routing_key);
            duplicates += 1;
            continue;
        }
        first_seen.insert(id, r);
        let object = (r.event.stream.as_str(), r.event.object_id.as_str());
        if let Some(prev) = last_version.insert(object, r.event.object_version) {
            assert!(
                r.event.object_version > prev,
                "stream {} object {}: version {} arrived after version {prev}",
                object.0,
                object.1,
                r.event.object_version
            );
        }
    }
    let got: HashSet<&str> = first_seen.keys().copied().collect();
    let missing: Vec<&str> = expected
        .iter()
        .map(|e| e.event_id.as_str())
        .filter(|id| !got.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events never arrived, e.g. {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(5)]
    );
    let wanted: HashSet<&str> = expected.iter().map(|e| e.event_id.as_str()).collect();
    let unexpected: Vec<&str> = got.difference(&wanted).copied().collect();
    assert!(
        unexpected.is_empty(),
        "events nobody published: {unexpected:?}"
    );
    duplicates
}

/// `rabbitmqctl` with arguments; panics with its output on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pids of the connections whose `connection_name` is `name`.
pub fn connections_named(name: &str) -> Vec<String> {
    rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"])
        .lines()
        .filter(|l| l.contains(&format!("{{\"connection_name\",\"{name}\"}}")))
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect()
}

/// Closes every connection named `name` (as an operator would); returns how
/// many there were.
pub fn close_connections_named(name: &str) -> usize {
    let pids = connections_named(name);
    for pid in &pids {
        // The connection may be gone already; that is fine.
        let _ = std::process::Command::new("rabbitmqctl")
            .args([
                "close_connection",
                pid,
                "graphdelta test: closing the connection",
            ])
            .output();
    }
    pids.len()
}

/// A TCP proxy in front of the broker that can turn every connection it
/// carries into a black hole: the sockets stay open, nothing passes, as
/// with a broker that hangs or a network that silently drops packets.
/// Connections accepted afterwards work normally.
pub struct BlackHoleProxy {
    pub addr: std::net::SocketAddr,
    dead_before: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHoleProxy {
    pub async fn start() -> Self {
        use std::sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        };
        let broker = url::Url::parse(&amqp_url()).unwrap();
        let upstream = format!(
            "{}:{}",
            broker.host_str().unwrap(),
            broker.port().unwrap_or(5672)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dead_before = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (dead, counter) = (dead_before.clone(), next.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let id = counter.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let dead = dead.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if id < dead.load(Ordering::SeqCst) {
                                // Swallowed; keep the socket open and silent.
                                continue;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self {
            addr,
            dead_before,
            next,
            task,
        }
    }

    /// The broker URL through the proxy.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }

    /// Every connection open now stops carrying anything, for good.
    pub fn swallow_existing(&self) {
        use std::sync::atomic::Ordering;
        self.dead_before
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for BlackHoleProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
