//! The `graphdelta` command. The pipeline itself lives in the connector file
//! (`connectors/*.toml`); flags only choose what to do with it.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // The demo prints its own report; only warnings (in text) unless asked.
    let (format, quiet) = match args.command {
        cli::Command::Demo(_) if args.log_format == cli::logging::LogFormat::Auto => {
            (cli::logging::LogFormat::Text, args.verbose == 0)
        }
        _ => (args.log_format, false),
    };
    cli::logging::init(format, args.verbose, quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("graphdelta")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(cli::dispatch(args));
    // Stream tasks are done; don't wait for blocking I/O threads.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

// The pipeline allocates many small strings per object; mimalloc handles
// that pattern far better than glibc's allocator (measured in `bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
