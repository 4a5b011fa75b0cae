//! `graphdelta replay`: rebuild a stream's state from what its sink holds,
//! write it out, and optionally check it against the connector's memory.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use graphdelta::{
    checkpoint::Store,
    config::Config,
    replay::{self, ReplayError, ReplayStore, SourceOptions},
    sink::SinkConfig,
};
use indicatif::{ProgressBar, ProgressStyle};

use super::{EXIT_CONFIG, load};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The connector file (its [sink] says where to read, its [checkpoint]
    /// what to verify against).
    #[arg(long, short, env = "GRAPHDELTA_CONFIG")]
    pub config: PathBuf,
    /// The stream to rebuild.
    #[arg(long)]
    pub stream: String,
    /// Where the rebuilt state goes: `FILE.jsonl` (one object per line) or
    /// `sqlite:FILE` (tables objects, members, tombstones). Replaced if it
    /// exists; written under a temporary name and renamed when complete.
    #[arg(long)]
    pub out: Option<String>,
    /// Compare the rebuilt state with the connector's checkpoint memory
    /// (ids, versions, deleted flags, property hashes, memberships); exit 0
    /// only if they agree.
    #[arg(long)]
    pub verify: bool,
    /// RabbitMQ: the stream queue to read (default: the only `type =
    /// "stream"` queue in [[sink.declare_queues]]).
    #[arg(long)]
    pub queue: Option<String>,
    /// RabbitMQ: end the replay when no message arrived for this long (a
    /// fallback: the normal end is the stream's last offset at start); an
    /// empty stream is recognised after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
}

/// Where the state is written.
enum Output {
    Jsonl(PathBuf),
    Sqlite(PathBuf),
}

impl Output {
    fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix("sqlite:") {
            Some("") => Err("--out sqlite: needs a file name: --out sqlite:users.db".to_string()),
            Some(path) => Ok(Output::Sqlite(PathBuf::from(path))),
            None if text.is_empty() => {
                Err("--out needs a file: users.jsonl or sqlite:users.db".to_string())
            }
            None => Ok(Output::Jsonl(PathBuf::from(text))),
        }
    }
}

/// `FILE` → `FILE.partial`: the name a result is written under until it is
/// complete.
fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

pub async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let config = match load(&args.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let output = match args.out.as_deref().map(Output::parse).transpose() {
        Ok(o) => o,
        Err(why) => {
            eprintln!("error: {why}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    if output.is_none() && !args.verify {
        eprintln!(
            "error: nothing to do: give --out FILE.jsonl, --out sqlite:FILE, and/or --verify"
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let stream = args.stream.clone();
    let options = SourceOptions {
        queue: args.queue.clone(),
        idle_timeout: args.idle_timeout,
    };
    let started = Instant::now();
    let mut source = match replay::open_source(&config, &stream, &options).await {
        Ok(s) => s,
        Err(ReplayError::Config(why)) => {
            eprintln!("error: {why}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(e) => return Err(e.into()),
    };
    let mut store = match &output {
        Some(Output::Sqlite(path)) => ReplayStore::create(&partial(path))?,
        _ => ReplayStore::temporary()?,
    };

    let bar = progress_bar(&stream, source.total);
    let folding = {
        let bar = bar.clone();
        let stream = stream.clone();
        tokio::task::spawn_blocking(move || {
            let result = replay::fold(&mut source, &mut store, &stream, |n| {
                if let Some(b) = &bar {
                    // The expected count is an estimate (Kafka watermarks).
                    if b.length().is_some_and(|len| n > len) {
                        b.set_length(n);
                    }
                    b.set_position(n);
                }
            });
            result.map(|()| (source, store))
        })
    };
    let (source, mut store) = folding.await.context("the replay task failed")??;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    store.commit(&stream, &source.description)?;
    let stats = store.stats();
    let (objects, soft_deleted) = store.object_count()?;
    let elapsed = started.elapsed();

    let destination = match &output {
        None => String::new(),
        Some(Output::Jsonl(path)) => {
            let tmp = partial(path);
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create `{}`", tmp.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            store.write_jsonl(&mut writer)?;
            use std::io::Write;
            writer
                .flush()
                .and_then(|()| writer.get_ref().sync_all())
                .with_context(|| format!("cannot write `{}`", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename `{}`", tmp.display()))?;
            format!(" → {}", path.display())
        }
        Some(Output::Sqlite(path)) => {
            std::mem::replace(&mut store, ReplayStore::temporary()?).close()?;
            replay::store::remove_database(path)?;
            std::fs::rename(partial(path), path)
                .with_context(|| format!("cannot rename to `{}`", path.display()))?;
            format!(" → sqlite:{}", path.display())
        }
    };
    println!(
        "{stream}: {} events from {} in {:.1}s: {} applied, {} duplicates skipped{}{}; state: {objects} objects ({soft_deleted} soft-deleted){destination}",
        stats.events,
        source.description,
        elapsed.as_secs_f64(),
        stats.applied,
        stats.duplicates,
        if stats.tombstones > 0 {
            format!(", {} tombstones", stats.tombstones)
        } else {
            String::new()
        },
        if stats.other_streams > 0 {
            format!(", {} records of other streams", stats.other_streams)
        } else {
            String::new()
        },
    );
    if output.is_some() && stats.events == 0 {
        eprintln!(
            "warning: {stream}: no events found in {}; is this the stream's sink, and has the connector run?",
            source.description
        );
    }
    if !args.verify {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(Output::Sqlite(path)) = &output {
        store = ReplayStore::open(path)?;
    }
    Ok(if verify(&config, &stream, &store)? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints the verification; true if the state agrees with the store.
fn verify(config: &Config, stream: &str, store: &ReplayStore) -> anyhow::Result<bool> {
    let Some(memory) = Store::open_read_only(&config.checkpoint.path, stream)? else {
        anyhow::bail!(
            "stream `{stream}` has no checkpoint store under `{}`: --verify compares with the connector's memory, so run the connector first (or fix [checkpoint] path)",
            config.checkpoint.path.display()
        );
    };
    // Exactly-once: the topic may hold a batch the store has not committed
    // (a crash between the two commits); the connector rolls the store
    // forward from the checkpoint topic on its next start. Verify against a
    // copy rolled forward the same way.
    let mut rolled = None;
    if let SinkConfig::Kafka(k) = &config.sink {
        if k.exactly_once {
            let record = {
                let k = k.as_ref().clone();
                let stream = stream.to_string();
                tokio::task::block_in_place(move || {
                    graphdelta::sink::kafka::transactional::read_checkpoint(&k, &stream)
                })?
            };
            if let Some(record) = record {
                rolled =
                    replay::verify::roll_forward(&config.checkpoint.path, stream, &memory, record)?;
            }
            if let Some(r) = &rolled {
                println!(
                    "{stream}: the checkpoint topic is at batch {}, the store at {}: verifying against a copy of the store rolled forward (the connector does the same on its next start)",
                    r.batch_seq, r.store_batch_seq
                );
            }
        }
    }
    let memory = rolled.as_ref().map_or(&memory, |r| &r.store);
    let report = replay::verify(store, memory)?;
    if report.agrees() {
        println!(
            "{stream}: verified: {} objects and {} memberships agree with the checkpoint store",
            report.objects, report.memberships
        );
        return Ok(true);
    }
    println!(
        "{stream}: verification FAILED: {} difference{} with the checkpoint store ({} objects, {} memberships): {} missing from the replay, {} extra, {} differing; memberships: {} missing, {} extra",
        report.differences(),
        if report.differences() == 1 { "" } else { "s" },
        report.objects,
        report.memberships,
        report.missing,
        report.extra,
        report.differing,
        report.missing_members,
        report.extra_members,
    );
    for line in &report.examples {
        println!("  {line}");
    }
    if (report.examples.len() as u64) < report.differences() {
        println!(
            "  ... and {} more",
            report.differences() - report.examples.len() as u64
        );
    }
    Ok(false)
}

/// A bar (records read of the records expected) or a counter, on a terminal.
fn progress_bar(stream: &str, total: Option<u64>) -> Option<ProgressBar> {
    let multi = super::progress::multi()?;
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{spinner:.green} {prefix:.bold} replay [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} records ({per_sec}, {eta})",
            )
            .expect("valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template(
                "{spinner:.green} {prefix:.bold} replay [{elapsed_precise}] {human_pos} records ({per_sec})",
            )
            .expect("valid template"),
        ),
    };
    let bar = multi.add(bar);
    bar.set_prefix(stream.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}
