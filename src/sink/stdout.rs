//! The stdout sink: canonical-JSON events, one per line, for piping into
//! `jq` or another process. A batch is acknowledged once it is written and
//! flushed to the pipe; what the reader does with it is beyond our reach,
//! so prefer the file sink or a broker when every event matters.

use std::io::Write;

use async_trait::async_trait;
use serde::Deserialize;

use super::{OutBatch, Sink, SinkError};
use crate::proto::v1::EventsEncoding;

/// `[sink] type = "stdout"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}

/// The stdout sink.
pub struct StdoutSink;

impl StdoutSink {
    pub fn new(_config: &StdoutSinkConfig) -> Self {
        StdoutSink
    }
}

#[async_trait]
impl Sink for StdoutSink {
    fn kind(&self) -> &'static str {
        "stdout"
    }

    fn encoding(&self) -> EventsEncoding {
        EventsEncoding::JsonLines
    }

    /// Writes the runtime's encoding as it is.
    fn reads_events(&self) -> bool {
        false
    }

    async fn publish(&self, batch: OutBatch<'_>) -> Result<(), SinkError> {
        if batch.event_count == 0 {
            return Ok(());
        }
        let buf = batch.json_lines();
        tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(&buf)?;
            out.flush()
        })
        .await
        .map_err(|e| SinkError::Retriable(format!("stdout sink: writer task failed: {e}")))?
        .map_err(|e| {
            // A closed pipe will not reopen.
            SinkError::Permanent(format!("stdout sink: write failed: {e}"))
        })
    }
}
