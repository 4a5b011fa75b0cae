//! Replaying a RabbitMQ `stream` queue: an append-only log that reading
//! does not consume.
//!
//! The reader consumes with `x-stream-offset = "first"`, a prefetch limit
//! (`basic.qos` is mandatory on stream queues) and manual acks (on a stream
//! an ack only returns credit; nothing is removed).
//!
//! # Where it stops
//! A stream consumer never sees an "end": it waits for new messages. The
//! end is fixed when the replay starts: a passive `queue.declare` returns
//! the stream's message count `n` (RabbitMQ counts the messages from the
//! first retained offset to the last committed one), and every message
//! carries its offset in the `x-stream-offset` header, offsets being
//! consecutive. The replay stops after the message at offset `first + n -
//! 1`, where `first` is the offset of the first message delivered: exactly
//! the messages present at start, even while the connector keeps
//! publishing. Should that message never come (retention deleting the
//! head while the replay runs, a count from a lagging cluster member), the
//! replay ends when no message arrived for `--idle-timeout` and says how
//! many of the `n` it read.
//!
//! A queue that is not a stream would be consumed destructively by acks;
//! the first delivery without an `x-stream-offset` header is therefore
//! handed back (`basic.nack` with requeue) and the replay fails, having
//! acknowledged nothing.

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
    let count = match channel
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
        Ok(q) => u64::from(q.message_count()),
        Err(e) => {
            return Err(ReplayError::Config(format!(
                "rabbitmq broker {broker}: queue `{queue}` cannot be read ({e}); it must exist as a stream queue: declare it with [[sink.declare_queues]] type = \"stream\" and run the connector, or name another with --queue"
            )));
        }
    };
    let description = format!("stream queue `{queue}` on {broker}");
    let (tx, source) = Source::channel(description, Some(count));
    if count == 0 {
        let _ = channel.close(200, "OK".into()).await;
        let _ = conn.close(200, "OK".into()).await;
        return Ok(source);
    }
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| fail("basic.qos", e))?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "graphdelta-replay".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(|e| fail("basic.consume", e))?;
    let reader = Reader {
        queue,
        broker,
        count,
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

struct Reader {
    queue: String,
    broker: String,
    count: u64,
    idle: Duration,
}

impl Reader {
    async fn run(
        &self,
        mut consumer: lapin::Consumer,
        tx: &tokio::sync::mpsc::Sender<Result<Record, ReplayError>>,
    ) -> Result<(), ReplayError> {
        let mut first: Option<i64> = None;
        let mut read = 0u64;
        loop {
            let next = tokio::time::timeout(self.idle, consumer.next()).await;
            let delivery = match next {
                Err(_) => {
                    tracing::warn!(
                        queue = %self.queue,
                        read,
                        expected = self.count,
                        "No message for {}; ending the replay with fewer messages than the queue held at start (retention may have removed the oldest).",
                        humantime::format_duration(self.idle)
                    );
                    return Ok(());
                }
                Ok(None) => {
                    return Err(ReplayError::Source(format!(
                        "rabbitmq broker {}: queue `{}`: the consumer was cancelled after {read} of {} messages",
                        self.broker, self.queue, self.count
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
                return Err(ReplayError::Config(format!(
                    "rabbitmq broker {}: queue `{}` is not a stream queue (its messages carry no x-stream-offset): replay reads only stream queues, which reading does not consume; nothing was acknowledged",
                    self.broker, self.queue
                )));
            };
            let first = *first.get_or_insert(offset);
            read += 1;
            let last = offset >= first + self.count as i64 - 1;
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
    match properties.headers().as_ref()?.inner().get("x-stream-offset")? {
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
        assert!(choose_queue(&two, None).unwrap_err().to_string().contains("--queue"));
    }
}
