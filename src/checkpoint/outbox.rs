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
//! its xxh3-64 XOR the segment's mark (below). A process killed mid-write
//! leaves a torn last record, which fails its length or check and ends the
//! segment's valid part; appends never follow it, because a segment whose
//! write failed is closed and each process appends to segments of its own
//! (numbered after every existing one). Durability is the WAL's in
//! `synchronous = NORMAL`: a record survives the process (kill -9) at any
//! instant, not a power loss, which can also roll the checkpoint back.
//!
//! Segments are recycled: one that holds only committed batches is kept as
//! a spare (up to `SPARES`), renamed to the next segment's number when one
//! is begun, and overwritten from its start. Overwriting pages the file
//! already has costs the kernel less than appending to a new file and
//! deleting it: writing 1.2 GB in 300 kB records through 8 MiB segments
//! took 0.40-0.50 system CPU-s appending and 0.13-0.18 recycling (three
//! runs each). A recycled segment still holds its earlier records after
//! the ones written since; they must not read as valid. So each segment
//! file (`<number>.seg`) marks its checks with its own number: an earlier
//! record, marked with the number the file had then, fails its check and
//! ends the valid part like a torn one. Segments of versions before
//! recycling (`<number>.log`, unmarked) are read, never recycled.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, IoSlice, Write},
    path::{Path, PathBuf},
};

/// A new segment is begun once the current one is this large.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Segments kept for reuse once all they hold is committed. A commit
/// covers a few MB of records (2,500 objects), so one segment or two are
/// in use at a time: a 100k-user sync (`strace`) created 2 segment files,
/// reused them 12 times, and deleted them when it stopped.
const SPARES: usize = 2;
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
    /// XORed into each record's check: see the module docs.
    mark: u64,
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
    /// Segments holding only committed batches, to be overwritten.
    spares: Vec<PathBuf>,
    /// The next segment's number: after every number a file here has
    /// had, so that no recycled file takes a number it had before (its
    /// earlier records would read as valid again).
    next_number: u64,
}

/// The mark of a segment file's checks, from its name: 0 for the
/// segments of earlier versions (`.log`), which are never recycled.
fn segment_mark(name: &str) -> Option<(u64, u64)> {
    if let Some(number) = name.strip_suffix(".seg") {
        let number = number.parse::<u64>().ok()?;
        Some((number, mark(number)))
    } else {
        Some((name.strip_suffix(".log")?.parse::<u64>().ok()?, 0))
    }
}

fn mark(number: u64) -> u64 {
    // Never 0 in practice, and different for every number.
    xxhash_rust::xxh3::xxh3_64(&number.to_le_bytes())
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
                    let named = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(segment_mark);
                    if let Some((number, mark)) = named {
                        let mut max_seq = 0;
                        let bytes =
                            scan_segment(&path, mark, |seq, _, _| max_seq = max_seq.max(seq))?;
                        segments.push(Segment {
                            number,
                            path,
                            mark,
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
            // A file's name is the highest number it has had.
            next_number: segments.last().map_or(1, |s| s.number + 1),
            segments,
            current: None,
            spares: Vec::new(),
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
            scan_segment(&segment.path, segment.mark, |seq, record, events| {
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
        // The head's check, marked as this segment's.
        let mut header = [0; HEADER];
        header[..4].copy_from_slice(&head[..4]);
        let check = u64::from_le_bytes(head[4..HEADER].try_into().expect("8 bytes"));
        header[4..].copy_from_slice(&(check ^ segment.mark).to_le_bytes());
        let file = self.current.as_mut().expect("begun above");
        if crate::failpoint::fire("mid_record") {
            let _ = file.write_all(&[&header, &head[HEADER..], events].concat()[..size / 2]);
            crate::failpoint::crash("mid_record");
        }
        let mut bufs = [
            IoSlice::new(&header),
            IoSlice::new(&head[HEADER..]),
            IoSlice::new(events),
        ];
        if let Err(e) = write_all_vectored(file, &mut bufs) {
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
        let number = self.next_number;
        self.next_number += 1;
        let path = self.dir.join(format!("{number:020}.seg"));
        let file = match self.spares.pop() {
            // Written from its start (not appended to): what it held
            // before fails the checks of its new number.
            Some(spare) => {
                fs::rename(&spare, &path).and_then(|()| OpenOptions::new().write(true).open(&path))
            }
            None => OpenOptions::new().create_new(true).write(true).open(&path),
        }
        .map_err(|e| (path.clone(), e))?;
        self.segments.push(Segment {
            number,
            path,
            mark: mark(number),
            max_seq: 0,
            bytes: 0,
        });
        self.current = Some(file);
        Ok(())
    }

    /// Every batch up to `seq` is committed: the segments that hold nothing
    /// else become spares, or are deleted. Failing to delete one only
    /// leaves it for later (what it holds is skipped by
    /// [`OutboxLog::pending`]).
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
            if segment.mark != 0 && self.spares.len() < SPARES {
                self.spares.push(segment.path);
                continue;
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

impl Drop for OutboxLog {
    /// A stream that stops leaves no spare behind (one left by a crash is
    /// an obsolete segment, recycled or deleted by the next commit).
    fn drop(&mut self) {
        for spare in &self.spares {
            let _ = fs::remove_file(spare);
        }
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

/// Calls `each(seq, record, events)` for the valid records of a segment
/// whose checks carry `mark`, in order; returns the length of its valid
/// part. A torn or damaged record, or one of the file's earlier life, ends
/// it.
fn scan_segment(
    path: &Path,
    mark: u64,
    mut each: impl FnMut(u64, &[u8], &[u8]),
) -> io::Result<u64> {
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
        if len < FIXED || xxhash_rust::xxh3::xxh3_64(body) ^ mark != check {
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

    /// The numbers of the segment files, in order.
    fn names(dir: &Path) -> Vec<u64> {
        segment_files(dir)
            .iter()
            .map(|f| {
                let name = f.file_name().unwrap().to_str().unwrap();
                segment_mark(name).unwrap().0
            })
            .collect()
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
    fn commits_recycle_segments_holding_only_committed_batches() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.outbox");
        let mut log = OutboxLog::open(&out).unwrap();
        // Four segments: 1-2, 3-4, 5-6, 7.
        let big = (SEGMENT_BYTES / 2) as usize;
        for seq in 1..=7 {
            append(&mut log, &entry(seq, big));
        }
        assert_eq!(segment_files(&out).len(), 4);
        log.committed(3);
        assert_eq!(log.spares.len(), 1, "1-2 is a spare, 3-4 still needed");
        assert_eq!(
            log.pending(3).unwrap().keys().copied().collect::<Vec<_>>(),
            [4, 5, 6, 7]
        );
        log.committed(6);
        assert_eq!(log.spares.len(), SPARES);
        assert_eq!(names(&out), [1, 2, 4], "3 deleted: two spares are enough");
        // The next segments are the spares, under new numbers: no file is
        // created, and none takes a number it had.
        for seq in 8..=11 {
            append(&mut log, &entry(seq, big));
        }
        assert_eq!(names(&out), [4, 5, 6]);
        assert_eq!(
            OutboxLog::open(&out)
                .unwrap()
                .pending(0)
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [7, 8, 9, 10, 11]
        );
        // Everything committed: the numbering goes on.
        log.committed(11);
        append(&mut log, &entry(12, 1));
        assert_eq!(names(&out), [4, 7], "4 a spare, 5 reused as 7, 6 deleted");
        // A stopped stream leaves only what is not committed.
        drop(log);
        assert_eq!(names(&out), [7]);
    }

    /// A recycled segment holds its earlier records after the ones written
    /// since; whole as they are, they are not read: they carry the checks
    /// of the file's earlier number.
    #[test]
    fn a_recycled_segment_reads_only_what_was_written_since() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.outbox");
        let mut log = OutboxLog::open(&out).unwrap();
        let big = (SEGMENT_BYTES / 2) as usize;
        for seq in 1..=4 {
            append(&mut log, &entry(seq, big));
        }
        log.committed(4);
        assert_eq!(log.spares.len(), 2);
        // As large as the records before it: the next earlier record starts
        // right where it ends.
        append(&mut log, &entry(5, big));
        assert_eq!(names(&out), [1, 3], "2 reused as 3; 1 still a spare");
        let recycled = out.join(format!("{:020}.seg", 3));
        assert!(
            fs::metadata(&recycled).unwrap().len() > big as u64 * 2,
            "with records 3 and 4 in it"
        );
        let mut read = Vec::new();
        let valid = scan_segment(&recycled, mark(3), |seq, _, _| read.push(seq)).unwrap();
        assert_eq!(read, [5], "4 is whole but of the file's earlier life");
        assert_eq!(valid, (HEADER + FIXED + 7 + big) as u64);
        let pending = OutboxLog::open(&out).unwrap().pending(4).unwrap();
        assert_eq!(pending.keys().copied().collect::<Vec<_>>(), [5]);
        assert_eq!(pending[&5], entry(5, big));
        // A later process appends after everything, in a segment of its
        // own, whatever the spare's earlier life left.
        let mut later = OutboxLog::open(&out).unwrap();
        append(&mut later, &entry(6, 3));
        assert_eq!(names(&out), [1, 3, 4]);
        let pending = OutboxLog::open(&out).unwrap().pending(4).unwrap();
        assert_eq!(pending.keys().copied().collect::<Vec<_>>(), [5, 6]);
    }

    /// Segments of versions before recycling (`.log`, unmarked checks) are
    /// read, and deleted once committed, never reused.
    #[test]
    fn segments_of_earlier_versions_are_read_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.outbox");
        fs::create_dir_all(&out).unwrap();
        let old = entry(1, 10);
        let head = head(old.seq, |b| b.extend_from_slice(&old.record), &old.events);
        let path = out.join(format!("{:020}.log", 4));
        fs::write(&path, [head.as_slice(), &old.events].concat()).unwrap();
        let mut log = OutboxLog::open(&out).unwrap();
        assert_eq!(log.pending(0).unwrap()[&1], old);
        append(&mut log, &entry(2, 10));
        let names = segment_files(&out);
        assert!(names[1].ends_with(format!("{:020}.seg", 5)), "{names:?}");
        log.committed(1);
        assert!(!path.exists());
        assert!(log.spares.is_empty());
    }
}
