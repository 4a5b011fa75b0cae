//! The outbox's files (see the store's "The outbox"): batches handed to the
//! sink and not yet committed, appended to segment files in
//! `<stream>.outbox/` beside the stream's SQLite file.
//!
//! A record is appended with one `writev` before its batch reaches the sink,
//! and is never rewritten: a commit makes every record up to its batch
//! obsolete, and segments holding only obsolete records are deleted. This
//! is what a SQLite table did before, at a fraction of the cost (a page's
//! events went through the B-tree, the WAL and its checkpoint, then the
//! freelist; they are now written once).
//!
//! Record: `len: u32 LE | check: u64 LE | seq: u64 LE | record_len: u32 LE |
//! record | events`, where `len` counts what follows `check` and `check` is
//! its xxh3-64. A process killed mid-write leaves a torn last record, which
//! fails its length or check and ends the segment's valid part; appends
//! never follow it, because a segment whose write failed is closed and each
//! process appends to segments of its own (numbered after every existing
//! one). Durability is the WAL's in `synchronous = NORMAL`: a record
//! survives the process (kill -9) at any instant, not a power loss, which
//! can also roll the checkpoint back.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, IoSlice, Write},
    path::{Path, PathBuf},
};

/// A new segment is begun once the current one is this large.
const SEGMENT_BYTES: u64 = 8 << 20;
/// `len` and `check`.
const HEADER: usize = 12;
/// `seq` and `record_len`.
const FIXED: usize = 12;

/// One recorded batch: its `CheckpointRecord` and its encoded events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub record: Vec<u8>,
    pub events: Vec<u8>,
}

struct Segment {
    number: u64,
    path: PathBuf,
    /// Highest batch recorded in it (0: none).
    max_seq: u64,
    bytes: u64,
}

/// The segments of one stream's outbox.
pub struct OutboxLog {
    dir: PathBuf,
    /// Oldest first; appends go to the last one while `current` is open.
    segments: Vec<Segment>,
    current: Option<File>,
}

impl OutboxLog {
    /// The outbox in `dir` (which need not exist yet: it is created by the
    /// first append). Reads every existing segment to learn what it holds.
    pub fn open(dir: &Path) -> io::Result<OutboxLog> {
        let mut segments = Vec::new();
        match fs::read_dir(dir) {
            Ok(listing) => {
                for entry in listing {
                    let path = entry?.path();
                    let number = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".log"))
                        .and_then(|n| n.parse::<u64>().ok());
                    if let Some(number) = number {
                        let mut max_seq = 0;
                        let bytes = scan_segment(&path, |seq, _, _| max_seq = max_seq.max(seq))?;
                        segments.push(Segment {
                            number,
                            path,
                            max_seq,
                            bytes,
                        });
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        segments.sort_by_key(|s| s.number);
        Ok(OutboxLog {
            dir: dir.to_path_buf(),
            segments,
            current: None,
        })
    }

    /// The directory of the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The recorded batches after `committed`, by batch. A batch recorded
    /// twice reads as its last record.
    pub fn pending(&self, committed: u64) -> io::Result<BTreeMap<u64, Entry>> {
        let mut out = BTreeMap::new();
        for segment in self.segments.iter().filter(|s| s.max_seq > committed) {
            scan_segment(&segment.path, |seq, record, events| {
                if seq > committed {
                    let entry = Entry {
                        seq,
                        record: record.to_vec(),
                        events: events.to_vec(),
                    };
                    out.insert(seq, entry);
                }
            })?;
        }
        Ok(out)
    }

    /// Frames and appends a record (see [`head`]).
    #[cfg(test)]
    pub fn append(
        &mut self,
        seq: u64,
        record: &[u8],
        events: &[u8],
    ) -> Result<(), (PathBuf, io::Error)> {
        let head = head(seq, |buf| buf.extend_from_slice(record), events);
        self.append_framed(seq, &head, events)
    }

    /// Appends a record: its [`head`] and its events, with one `writev`
    /// (more only if the kernel writes part of it). On an error, what was
    /// written of it is left behind in a segment that is never appended to
    /// again. The error names the file.
    pub fn append_framed(
        &mut self,
        seq: u64,
        head: &[u8],
        events: &[u8],
    ) -> Result<(), (PathBuf, io::Error)> {
        if self.current.is_none()
            || self
                .segments
                .last()
                .is_some_and(|s| s.bytes >= SEGMENT_BYTES)
        {
            self.begin_segment()?;
        }
        let segment = self.segments.last_mut().expect("begun above");
        let size = head.len() + events.len();
        let body = size.saturating_sub(HEADER);
        if u32::try_from(body).is_err() {
            return Err((
                segment.path.clone(),
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a batch of {body} bytes is too large for the outbox (4 GiB at most)"),
                ),
            ));
        }
        let file = self.current.as_mut().expect("begun above");
        if crate::failpoint::fire("mid_record") {
            let _ = file.write_all(&[head, events].concat()[..size / 2]);
            crate::failpoint::crash("mid_record");
        }
        if let Err(e) = write_all_vectored(file, &mut [IoSlice::new(head), IoSlice::new(events)]) {
            self.current = None;
            return Err((segment.path.clone(), e));
        }
        segment.max_seq = segment.max_seq.max(seq);
        segment.bytes += size as u64;
        Ok(())
    }

    fn begin_segment(&mut self) -> Result<(), (PathBuf, io::Error)> {
        self.current = None;
        fs::create_dir_all(&self.dir).map_err(|e| (self.dir.clone(), e))?;
        let number = self.segments.last().map_or(1, |s| s.number + 1);
        let path = self.dir.join(format!("{number:020}.log"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| (path.clone(), e))?;
        self.segments.push(Segment {
            number,
            path,
            max_seq: 0,
            bytes: 0,
        });
        self.current = Some(file);
        Ok(())
    }

    /// Every batch up to `seq` is committed: deletes the segments that hold
    /// nothing else. Failing to delete one only leaves it for later (what
    /// it holds is skipped by [`OutboxLog::pending`]).
    pub fn committed(&mut self, seq: u64) {
        let last = self.segments.len().saturating_sub(1);
        let mut kept = Vec::with_capacity(self.segments.len());
        for (i, segment) in std::mem::take(&mut self.segments).into_iter().enumerate() {
            if segment.max_seq > seq {
                kept.push(segment);
                continue;
            }
            if i == last {
                self.current = None;
            }
            match fs::remove_file(&segment.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(
                        path = %segment.path.display(),
                        error = %e,
                        "Cannot delete a committed outbox segment; it is skipped and deleted later."
                    );
                    kept.push(segment);
                }
            }
        }
        self.segments = kept;
    }
}

/// The head of an outbox record: everything before its events, which
/// follow it in the segment. `record` appends the record to the buffer
/// (encoded in place, not copied in). The events stay in a buffer of their
/// own (the normalizer writes a JSON sink's events there as it goes, and
/// the sink is handed them from there), so they are neither copied nor
/// encoded twice.
pub fn head(seq: u64, record: impl FnOnce(&mut Vec<u8>), events: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&[0; HEADER]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    record(&mut buf);
    // Larger records are refused by `append_framed`.
    let record_len = (buf.len() - HEADER - FIXED) as u32;
    buf[HEADER + 8..HEADER + FIXED].copy_from_slice(&record_len.to_le_bytes());
    let len = (buf.len() - HEADER + events.len()) as u32;
    let mut check = xxhash_rust::xxh3::Xxh3Default::new();
    check.update(&buf[HEADER..]);
    check.update(events);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..HEADER].copy_from_slice(&check.digest().to_le_bytes());
    buf
}

/// `write_all` for several buffers, in as few `writev`s as the kernel
/// allows.
fn write_all_vectored(file: &mut File, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match file.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Calls `each(seq, record, events)` for the valid records of a segment, in
/// order; returns the length of its valid part. A torn or damaged record
/// ends it.
fn scan_segment(path: &Path, mut each: impl FnMut(u64, &[u8], &[u8])) -> io::Result<u64> {
    let data = match fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut at = 0;
    while let Some(header) = data.get(at..at + HEADER) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let check = u64::from_le_bytes(header[4..].try_into().expect("8 bytes"));
        let Some(body) = data.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if len < FIXED || xxhash_rust::xxh3::xxh3_64(body) != check {
            break;
        }
        let seq = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        let record_len = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
        let Some(record) = body.get(FIXED..FIXED + record_len) else {
            break;
        };
        each(seq, record, &body[FIXED + record_len..]);
        at += HEADER + len;
    }
    Ok(at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, size: usize) -> Entry {
        Entry {
            seq,
            record: vec![seq as u8; 7],
            events: vec![b'e'; size],
        }
    }

    fn append(log: &mut OutboxLog, e: &Entry) {
        log.append(e.seq, &e.record, &e.events).unwrap();
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map(|l| l.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    #[test]
    fn records_read_back_after_the_committed_batch_and_a_later_record_wins() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.outbox");
        let mut log = OutboxLog::open(&out).unwrap();
        assert!(
            log.pending(0).unwrap().is_empty(),
            "nothing before the first append"
        );
        assert!(!out.exists(), "created by the first append");
        for seq in 1..=3 {
            append(&mut log, &entry(seq, 10));
        }
        let again = Entry {
            events: b"again".to_vec(),
            ..entry(3, 0)
        };
        append(&mut log, &again);
        let pending = OutboxLog::open(&out).unwrap().pending(1).unwrap();
        assert_eq!(pending.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(pending[&2], entry(2, 10));
        assert_eq!(pending[&3], again);
        // A record without events (a batch that only changes the memory).
        append(&mut log, &entry(4, 0));
        let pending = OutboxLog::open(&out).unwrap().pending(3).unwrap();
        assert_eq!(pending[&4], entry(4, 0));
    }

    /// A process killed mid-write leaves a torn record: it and anything
    /// after it in that segment are not read, and the next process appends
    /// to a segment of its own.
    #[test]
    fn a_torn_record_ends_its_segment_and_the_next_process_starts_another() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.outbox");
        let mut log = OutboxLog::open(&out).unwrap();
        append(&mut log, &entry(1, 100));
        append(&mut log, &entry(2, 100));
        let file = segment_files(&out).pop().unwrap();
        let whole = fs::read(&file).unwrap();
        for cut in [1, 30, 100, 125] {
            fs::write(&file, &whole[..whole.len() - cut]).unwrap();
            let pending = OutboxLog::open(&out).unwrap().pending(0).unwrap();
            assert_eq!(
                pending.keys().copied().collect::<Vec<_>>(),
                [1],
                "cut {cut}"
            );
        }
        // A damaged byte inside the last record is caught by its check.
        let mut damaged = whole.clone();
        damaged[whole.len() - 50] ^= 0xff;
        fs::write(&file, &damaged).unwrap();
        let mut log = OutboxLog::open(&out).unwrap();
        assert_eq!(log.pending(0).unwrap().len(), 1);
        append(&mut log, &entry(2, 5));
        assert_eq!(segment_files(&out).len(), 2, "a segment of its own");
        let pending = OutboxLog::open(&out).unwrap().pending(0).unwrap();
        assert_eq!(pending.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(pending[&2], entry(2, 5));
    }

    #[test]
    fn commits_delete_segments_holding_only_committed_batches() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.outbox");
        let mut log = OutboxLog::open(&out).unwrap();
        // Three segments: 1-2, 3-4, 5.
        let big = (SEGMENT_BYTES / 2) as usize;
        for seq in 1..=5 {
            append(&mut log, &entry(seq, big));
        }
        assert_eq!(segment_files(&out).len(), 3);
        log.committed(3);
        assert_eq!(
            segment_files(&out).len(),
            2,
            "1-2 deleted, 3-4 still needed"
        );
        assert_eq!(
            log.pending(3).unwrap().keys().copied().collect::<Vec<_>>(),
            [4, 5]
        );
        // A leftover of an earlier process is deleted by a later commit too.
        let mut later = OutboxLog::open(&out).unwrap();
        append(&mut later, &entry(6, 1));
        later.committed(5);
        assert_eq!(segment_files(&out).len(), 1);
        later.committed(6);
        assert!(segment_files(&out).is_empty());
        // The next append begins a new segment.
        append(&mut later, &entry(7, 1));
        assert_eq!(
            later
                .pending(6)
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [7]
        );
    }
}
