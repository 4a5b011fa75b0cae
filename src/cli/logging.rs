//! Logs go to stderr (stdout may be the event sink): human-readable on a
//! terminal, JSON lines with `--log-format json` (or `auto` when stderr is
//! not a terminal). `RUST_LOG` overrides the level.

use std::io::{IsTerminal, Write};

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

pub fn init(format: LogFormat, verbose: u8, quiet: bool) {
    let default = match verbose {
        0 if quiet => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default},graphdelta={default},rdkafka=warn,lapin=warn,hyper=warn,reqwest=warn"
        ))
    });
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    // lapin logs every frame it writes at TRACE, the SASL response that
    // carries the RabbitMQ password included: no RUST_LOG lets that through.
    let no_lapin_trace = tracing_subscriber::filter::filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("lapin"))
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(no_lapin_trace);
    if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true),
            )
            .init();
    } else {
        registry
            .with(
                fmt::layer()
                    .with_writer(AboveBars)
                    .with_target(false)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .init();
    }
}

/// Writes log lines to stderr above any progress bars.
#[derive(Clone, Copy)]
struct AboveBars;

impl<'a> fmt::MakeWriter<'a> for AboveBars {
    type Writer = AboveBarsWriter;
    fn make_writer(&'a self) -> Self::Writer {
        AboveBarsWriter(Vec::new())
    }
}

/// Buffers one event and prints it in one piece when dropped.
struct AboveBarsWriter(Vec<u8>);

impl std::io::Write for AboveBarsWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for AboveBarsWriter {
    fn drop(&mut self) {
        let write = || {
            let _ = std::io::stderr().write_all(&self.0);
        };
        match super::progress::multi() {
            Some(m) => m.suspend(write),
            None => write(),
        }
    }
}
