//! The embedded file sink: appends each event's canonical JSON as one line
//! (NDJSON) and acknowledges a batch once its lines are written and, by
//! default, fsynced.
//!
//! One writer thread appends and fsyncs: batches that arrive while it is
//! busy are written together and share one fsync (group commit), so the
//! fsync latency does not cap throughput.
//!
//! A crash can leave a partial last line (a batch that was never
//! acknowledged, so its checkpoint was not committed and it will be written
//! again). Opening the file cuts such a torn tail off, so every line of the
//! file is a complete event.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::PathBuf,
    sync::Mutex,
};

use async_trait::async_trait;
use serde::Deserialize;

use super::{OutBatch, Sink, SinkError};
use crate::config::ConfigError;
use crate::proto::v1::EventsEncoding;

/// `[sink] type = "file"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The NDJSON file events are appended to (created if missing).
    pub path: PathBuf,
    /// fsync every batch before acknowledging it. Turning this off keeps
    /// events safe from process crashes but not from power loss.
    #[serde(default = "default_fsync")]
    pub fsync: bool,
}

const fn default_fsync() -> bool {
    true
}

impl FileSinkConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "sink.path is empty: name the file events are appended to, e.g. \"events.ndjson\""
                    .to_string(),
            ));
        }
        Ok(())
    }
}

/// A batch's lines and who waits for them to be durable.
struct Job {
    bytes: bytes::Bytes,
    done: tokio::sync::oneshot::Sender<std::io::Result<()>>,
}

/// The file sink.
pub struct FileSink {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
}

impl FileSink {
    /// Opens the file for appending, repairing a torn tail.
    pub fn open(config: &FileSinkConfig) -> Result<Self, SinkError> {
        let path = config.path.clone();
        let fail = |what: &str, e: std::io::Error| {
            SinkError::Permanent(format!(
                "file sink `{}`: cannot {what}: {e} (check sink.path and its directory's permissions)",
                path.display()
            ))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail("create its directory", e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| fail("open it", e))?;
        let cut = repair_torn_tail(&mut file).map_err(|e| fail("check its last line", e))?;
        if cut > 0 {
            tracing::warn!(path = %path.display(), bytes = cut, "Removed a partial last line left by a crash; that batch was never acknowledged and will be written again.");
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let fsync = config.fsync;
        let writer = std::thread::Builder::new()
            .name("graphdelta-file-sink".into())
            .spawn(move || write_loop(file, rx, fsync))
            .map_err(|e| fail("start its writer thread", e))?;
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            path,
        })
    }
}

/// Writes every queued batch, then one fsync for all of them.
fn write_loop(mut file: File, jobs: std::sync::mpsc::Receiver<Job>, fsync: bool) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while let Ok(more) = jobs.try_recv() {
            batch.push(more);
        }
        let mut result = Ok(());
        for job in &batch {
            if crate::failpoint::fire("mid_publish") {
                // A torn batch: what a crash in the middle of a write leaves.
                let _ = file.write_all(&job.bytes[..job.bytes.len() / 2]);
                crate::failpoint::crash("mid_publish");
            }
            if let Err(e) = file.write_all(&job.bytes) {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() && fsync {
            result = file.sync_data();
        }
        for job in batch {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            let _ = job.done.send(outcome);
        }
    }
}

/// Truncates the file after its last `\n`; returns the bytes removed.
fn repair_torn_tail(file: &mut File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let mut pos = len;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let start = pos.saturating_sub(buf.len() as u64);
        let n = (pos - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                file.set_len(keep)?;
                file.sync_all()?;
            }
            return Ok(len - keep);
        }
        if start == 0 {
            file.set_len(0)?;
            file.sync_all()?;
            return Ok(len);
        }
        pos = start;
    }
}

#[async_trait]
impl Sink for FileSink {
    fn kind(&self) -> &'static str {
        "file"
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
        let bytes = batch.json_lines();
        let (done, acked) = tokio::sync::oneshot::channel();
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|jobs| jobs.send(Job { bytes, done }).is_ok())
            .unwrap_or(false);
        let closed =
            || SinkError::Permanent(format!("file sink `{}`: closed", self.path.display()));
        if !sent {
            return Err(closed());
        }
        acked.await.map_err(|_| closed())?.map_err(|e| {
            let message = format!("file sink `{}`: write failed: {e}", self.path.display());
            // A full disk may free up; a read-only one needs an operator.
            if e.kind() == std::io::ErrorKind::StorageFull {
                SinkError::Retriable(message)
            } else {
                SinkError::Permanent(message)
            }
        })
    }

    async fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = writer {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
    }

    async fn check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::{ChangeEvent, StreamCheckpoint};

    #[tokio::test]
    async fn appends_lines_and_repairs_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/events.ndjson");
        let config = FileSinkConfig {
            path: path.clone(),
            fsync: true,
        };
        let sink = FileSink::open(&config).unwrap();
        let events = vec![
            ChangeEvent {
                object_id: "a".into(),
                ..Default::default()
            },
            ChangeEvent {
                object_id: "b".into(),
                ..Default::default()
            },
        ];
        let cp = StreamCheckpoint::default();
        sink.publish(OutBatch {
            stream: "s",
            seq: 1,
            event_count: events.len(),
            events: &events,
            checkpoint: &cp,
            writes: &Default::default(),
            encoded: None,
        })
        .await
        .unwrap();
        drop(sink);
        // Simulate a crash mid-write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"objectId\":\"c").unwrap();
        drop(f);
        let sink = FileSink::open(&config).unwrap();
        drop(sink);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let e: ChangeEvent = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(e.object_id, "b");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn a_file_of_only_a_partial_line_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e");
        std::fs::write(&path, b"{\"partial").unwrap();
        FileSink::open(&FileSinkConfig {
            path: path.clone(),
            fsync: false,
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 0);
    }
}
