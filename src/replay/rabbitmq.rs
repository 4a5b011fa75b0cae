//! Replaying a RabbitMQ `stream` queue: an append-only log that reading
//! does not consume.
//!
//! The reader consumes with `x-stream-offset = "first"`, a prefetch limit
//! (`basic.qos` is mandatory on stream queues) and manual acks (on a stream
//! an ack only returns credit; nothing is removed).
//!
//! # Where it stops
//! A stream consumer never sees an "end": it waits for new messages. The
//! end is fixed when the replay starts, from the `x-stream-offset` header
//! every stream delivery carries (offsets are consecutive):
//! 1. a probe consumer starting at `x-stream-offset = "last"` receives the
//!    stream's last chunk whole; the highest offset in it is the end (read
//!    until the deliveries pause for 300 ms, 2 s at most while a publisher
//!    keeps appending, so the end may include what arrived meanwhile);
//! 2. a probe at `"first"` gives the first retained offset (for the
//!    progress bar's length);
//! 3. the replay consumes from `"first"` and stops after the message at the
//!    end offset: the messages present at start, however much the
//!    connector publishes meanwhile.
//!
//! The queue's message count from `queue.declare-ok` is no use: RabbitMQ
//! 3.10 reports 0 for streams, and cluster members disagree (rabbitmq-server
//! #3758). Should the end offset never arrive (retention deleting segments
//! while the replay runs), the replay ends when no message came for
//! `--idle-timeout`, with a warning. An empty stream is recognised the same
//! way: the `"last"` probe gets nothing within `--idle-timeout`.
//!
//! A queue that is not a stream would be consumed destructively by acks.
//! RabbitMQ refuses `x-stream-offset` on classic queues (PRECONDITION_FAILED),
//! which is reported as such; should a queue accept it anyway, the first
//! delivery without an `x-stream-offset` header is handed back (`basic.nack`
//! with requeue) and the replay fails, having acknowledged nothing.

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use prost::Message as _;

use super::{Record, ReplayError, Source, SourceOptions};
use crate::{
    proto::v1::ChangeEvent,
    sink::rabbitmq::{
        QueueType, RabbitMqSinkConfig,
        channel::{Connector, Settings},
        resolve_url,
    },
};

/// Messages delivered ahead of acks.
const PREFETCH: u16 = 1000;
/// Acks are sent for this many messages at once (`multiple`).
const ACK_EVERY: u64 = 200;

/// Opens the stream queue for reading; fails at once if the broker cannot
/// be reached or the queue does not exist.
pub async fn open(
    config: &RabbitMqSinkConfig,
    options: &SourceOptions,
) -> Result<Source, ReplayError> {
    let queue = choose_queue(config, options.queue.as_deref())?;
    let url = resolve_url(config).map_err(|e| ReplayError::Config(e.to_string()))?;
    let settings = Settings::new(config, &url).map_err(|e| ReplayError::Config(e.to_string()))?;
    let broker = settings.host_port.clone();
    let connector = Connector::new(settings);
    let conn = connector
        .connect()
        .await
        .map_err(|e| ReplayError::Source(e.to_string()))?;
    let fail = |what: &str, e: lapin::Error| {
        ReplayError::Source(format!(
            "rabbitmq broker {broker}: queue `{queue}`: {what}: {e}"
        ))
    };
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| fail("opening a channel", e))?;
    if let Err(e) = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        return Err(ReplayError::Config(format!(
            "rabbitmq broker {broker}: queue `{queue}` cannot be read ({e}); it must exist as a stream queue: declare it with [[sink.declare_queues]] type = \"stream\" and run the connector, or name another with --queue"
        )));
    }
    let probe = Probe {
        conn: &conn,
        queue: &queue,
        broker: &broker,
        idle: options.idle_timeout,
    };
    let Some(end) = probe.offset("last").await? else {
        // Nothing arrived within the idle timeout: an empty stream.
        let _ = conn.close(200, "OK".into()).await;
        let (_, source) = Source::channel(
            format!("stream queue `{queue}` on {broker} (empty)"),
            Some(0),
        );
        return Ok(source);
    };
    let first = probe.offset("first").await?.unwrap_or(0);
    let description = format!("stream queue `{queue}` on {broker} (offsets {first}..={end})");
    let (tx, source) = Source::channel(description, Some((end - first + 1).max(0) as u64));
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| fail("basic.qos", e))?;
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "graphdelta-replay".into(),
            BasicConsumeOptions::default(),
            offset_argument("first"),
        )
        .await
        .map_err(|e| fail("basic.consume", e))?;
    let reader = Reader {
        queue,
        broker,
        end,
        idle: options.idle_timeout,
    };
    tokio::spawn(async move {
        let outcome = reader.run(consumer, &tx).await;
        if let Err(e) = outcome {
            let _ = tx.send(Err(e)).await;
        }
        let _ = channel.close(200, "OK".into()).await;
        let _ = conn.close(200, "OK".into()).await;
    });
    Ok(source)
}

/// `x-stream-offset = <offset>` as consumer arguments.
fn offset_argument(offset: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(offset.into()),
    );
    args
}

/// A short-lived consumer that finds where the stream begins or ends.
struct Probe<'a> {
    conn: &'a lapin::Connection,
    queue: &'a str,
    broker: &'a str,
    idle: Duration,
}

impl Probe<'_> {
    /// `"first"`: the offset of the first message. `"last"`: the highest
    /// offset of the last chunk (RabbitMQ delivers that chunk whole when
    /// a consumer starts at `last`): read until the deliveries pause for
    /// [`QUIET`], or for [`PROBE_MAX`] at most while a publisher keeps
    /// appending. `None`: no message within the idle timeout.
    async fn offset(&self, at: &str) -> Result<Option<i64>, ReplayError> {
        let fail = |what: &str, e: lapin::Error| {
            ReplayError::Source(format!(
                "rabbitmq broker {}: queue `{}`: {what}: {e}",
                self.broker, self.queue
            ))
        };
        let channel = self
            .conn
            .create_channel()
            .await
            .map_err(|e| fail("opening a channel", e))?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|e| fail("basic.qos", e))?;
        let mut consumer = channel
            .basic_consume(
                self.queue.into(),
                format!("graphdelta-replay-probe-{at}").as_str().into(),
                BasicConsumeOptions::default(),
                offset_argument(at),
            )
            .await
            .map_err(|e| {
                // Classic and quorum queues refuse the argument outright.
                if e.to_string().contains("x-stream-offset") {
                    not_a_stream(self.broker, self.queue)
                } else {
                    fail("basic.consume", e)
                }
            })?;
        let started = tokio::time::Instant::now();
        let mut found: Option<i64> = None;
        let outcome = loop {
            let wait = if found.is_some() { QUIET } else { self.idle };
            let delivery = match tokio::time::timeout(wait, consumer.next()).await {
                Err(_) | Ok(None) => break Ok(found),
                Ok(Some(Err(e))) => break Err(fail("probing the stream", e)),
                Ok(Some(Ok(d))) => d,
            };
            let Some(offset) = stream_offset(&delivery.properties) else {
                let _ = delivery
                    .acker
                    .nack(lapin::options::BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await;
                break Err(not_a_stream(self.broker, self.queue));
            };
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            found = Some(found.map_or(offset, |f| f.max(offset)));
            if at == "first" || started.elapsed() > PROBE_MAX {
                break Ok(found);
            }
        };
        let _ = channel.close(200, "OK".into()).await;
        outcome
    }
}

/// A pause in the deliveries of the last chunk that ends the probe.
const QUIET: Duration = Duration::from_millis(300);
/// The longest a probe for the last offset reads.
const PROBE_MAX: Duration = Duration::from_secs(2);

fn not_a_stream(broker: &str, queue: &str) -> ReplayError {
    ReplayError::Config(format!(
        "rabbitmq broker {broker}: queue `{queue}` is not a stream queue (its messages carry no x-stream-offset): replay reads only stream queues, which reading does not consume; nothing was acknowledged"
    ))
}

struct Reader {
    queue: String,
    broker: String,
    /// The last offset to read (found by the probe).
    end: i64,
    idle: Duration,
}

impl Reader {
    async fn run(
        &self,
        mut consumer: lapin::Consumer,
        tx: &tokio::sync::mpsc::Sender<Result<Record, ReplayError>>,
    ) -> Result<(), ReplayError> {
        let mut read = 0u64;
        loop {
            let next = tokio::time::timeout(self.idle, consumer.next()).await;
            let delivery = match next {
                Err(_) => {
                    tracing::warn!(
                        queue = %self.queue,
                        read,
                        end = self.end,
                        "No message for {}; ending the replay before the last offset seen at start (retention may have removed the oldest).",
                        humantime::format_duration(self.idle)
                    );
                    return Ok(());
                }
                Ok(None) => {
                    return Err(ReplayError::Source(format!(
                        "rabbitmq broker {}: queue `{}`: the consumer was cancelled after {read} messages",
                        self.broker, self.queue
                    )));
                }
                Ok(Some(Err(e))) => {
                    return Err(ReplayError::Source(format!(
                        "rabbitmq broker {}: queue `{}`: {e}",
                        self.broker, self.queue
                    )));
                }
                Ok(Some(Ok(d))) => d,
            };
            let Some(offset) = stream_offset(&delivery.properties) else {
                // Not a stream queue: give everything back, ack nothing.
                let _ = delivery
                    .acker
                    .nack(lapin::options::BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await;
                return Err(not_a_stream(&self.broker, &self.queue));
            };
            read += 1;
            let last = offset >= self.end;
            if last || read % ACK_EVERY == 0 {
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await
                    .map_err(|e| {
                        ReplayError::Source(format!(
                            "rabbitmq broker {}: queue `{}`: ack: {e}",
                            self.broker, self.queue
                        ))
                    })?;
            }
            let record = ChangeEvent::decode(delivery.data.as_slice())
                .map(|e| Record::Event(Box::new(e)))
                .map_err(|e| {
                    ReplayError::Decode(format!(
                        "queue `{}` offset {offset}: not a graphdelta.v1.ChangeEvent ({e}); is the queue bound to a graphdelta exchange only?",
                        self.queue
                    ))
                });
            let stop = record.is_err();
            if tx.send(record).await.is_err() || stop {
                return Ok(());
            }
            if last {
                return Ok(());
            }
        }
    }
}

/// The `x-stream-offset` header of a stream delivery.
fn stream_offset(properties: &lapin::BasicProperties) -> Option<i64> {
    match properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-stream-offset")?
    {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// `--queue`, or the only stream queue the sink declares.
fn choose_queue(config: &RabbitMqSinkConfig, named: Option<&str>) -> Result<String, ReplayError> {
    if let Some(q) = named {
        return Ok(q.to_string());
    }
    let streams: Vec<&str> = config
        .declare_queues
        .iter()
        .filter(|q| q.queue_type == QueueType::Stream)
        .map(|q| q.name.as_str())
        .collect();
    match streams.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(ReplayError::Config(
            "replay from RabbitMQ reads a stream queue, and [sink] declares none: add [[sink.declare_queues]] with type = \"stream\" (bound to the stream's routing keys) and let the connector fill it, or name an existing stream queue with --queue".to_string(),
        )),
        several => Err(ReplayError::Config(format!(
            "[sink] declares several stream queues ({}): choose one with --queue",
            several.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_only_stream_queue_is_chosen() {
        let config = |queues: &str| -> RabbitMqSinkConfig {
            toml::from_str(&format!("url = \"amqp://127.0.0.1\"\n{queues}")).unwrap()
        };
        let one = config(
            "[[declare_queues]]\nname = \"q\"\n[[declare_queues]]\nname = \"s\"\ntype = \"stream\"",
        );
        assert_eq!(choose_queue(&one, None).unwrap(), "s");
        assert_eq!(choose_queue(&one, Some("x")).unwrap(), "x");
        let none = config("[[declare_queues]]\nname = \"q\"");
        assert!(
            choose_queue(&none, None)
                .unwrap_err()
                .to_string()
                .contains("type = \"stream\"")
        );
        let two = config(
            "[[declare_queues]]\nname = \"a\"\ntype = \"stream\"\n[[declare_queues]]\nname = \"b\"\ntype = \"stream\"",
        );
        assert!(
            choose_queue(&two, None)
                .unwrap_err()
                .to_string()
                .contains("--queue")
        );
    }
}
