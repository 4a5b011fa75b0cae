//! Replaying the file sink's output: one canonical-JSON `ChangeEvent` per
//! line, in the order the batches were acknowledged.
//!
//! The file sink cuts a torn last line off when it opens the file again;
//! until then the file may end with a partial line (a batch that was never
//! acknowledged, so its checkpoint was not committed and it will be written
//! again). Such an unterminated last line is skipped here, with a warning.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use super::{Record, ReplayError, Source};
use crate::{proto::v1::ChangeEvent, sink::file::FileSinkConfig};

/// Reads `sink.path` from its first line to its end at the time of reading.
pub fn open(config: &FileSinkConfig) -> Result<Source, ReplayError> {
    let path = config.path.clone();
    let file = File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ReplayError::Config(format!(
                "file sink output `{}` does not exist: run the connector first, or fix sink.path",
                path.display()
            ))
        } else {
            ReplayError::Source(format!("cannot open `{}`: {e}", path.display()))
        }
    })?;
    let (tx, source) = Source::channel(format!("file `{}`", path.display()), None);
    std::thread::Builder::new()
        .name("replay-file".into())
        .spawn(move || {
            for record in Lines::new(file, &path) {
                let stop = record.is_err();
                if tx.blocking_send(record).is_err() || stop {
                    break;
                }
            }
        })
        .map_err(|e| ReplayError::Source(format!("cannot start the file reader: {e}")))?;
    Ok(source)
}

/// The events of a file sink's output, one per complete line.
struct Lines<'a> {
    reader: BufReader<File>,
    path: &'a Path,
    line: String,
    number: u64,
}

impl<'a> Lines<'a> {
    fn new(file: File, path: &'a Path) -> Self {
        Self {
            reader: BufReader::with_capacity(1 << 20, file),
            path,
            line: String::new(),
            number: 0,
        }
    }
}

impl Iterator for Lines<'_> {
    type Item = Result<Record, ReplayError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.line.clear();
            self.number += 1;
            match self.reader.read_line(&mut self.line) {
                Ok(0) => return None,
                Ok(_) if !self.line.ends_with('\n') => {
                    tracing::warn!(
                        file = %self.path.display(),
                        line = self.number,
                        "Skipping an unterminated last line: a batch that was never acknowledged (the connector writes it again)."
                    );
                    return None;
                }
                Ok(_) if self.line.trim().is_empty() => continue,
                Ok(_) => {
                    return Some(
                        serde_json::from_str::<ChangeEvent>(&self.line)
                            .map(|e| Record::Event(Box::new(e)))
                            .map_err(|e| {
                                ReplayError::Decode(format!(
                                    "`{}` line {}: not a graphdelta.v1.ChangeEvent in canonical JSON ({e}); is it the file sink's output?",
                                    self.path.display(),
                                    self.number
                                ))
                            }),
                    );
                }
                Err(e) => {
                    return Some(Err(ReplayError::Source(format!(
                        "reading `{}` at line {}: {e}",
                        self.path.display(),
                        self.number
                    ))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn reads_complete_lines_and_skips_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("gd-replay-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.ndjson");
        let mut f = File::create(&path).unwrap();
        writeln!(f, r#"{{"eventId":"a","stream":"users","objectId":"1","changeType":"CHANGE_TYPE_CREATED","objectVersion":"1"}}"#).unwrap();
        writeln!(f).unwrap();
        writeln!(f, r#"{{"eventId":"b","stream":"users","objectId":"1","changeType":"CHANGE_TYPE_UPDATED","objectVersion":"2"}}"#).unwrap();
        write!(f, r#"{{"eventId":"c","stream":"us"#).unwrap();
        drop(f);
        let records: Vec<_> = Lines::new(File::open(&path).unwrap(), &path)
            .map(|r| match r.unwrap() {
                Record::Event(e) => e.event_id,
                Record::Tombstone => unreachable!(),
            })
            .collect();
        assert_eq!(records, ["a", "b"]);

        std::fs::write(&path, "{\"eventId\": 5}\n").unwrap();
        let err = Lines::new(File::open(&path).unwrap(), &path)
            .next()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
