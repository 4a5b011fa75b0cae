//! The `graphdelta` command. The pipeline itself lives in the connector file
//! (`connectors/*.toml`); flags only choose what to do with it.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tune_allocator();
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
// that pattern far better than glibc's allocator (`graphdelta bench`: 40%
// less CPU per event).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// mimalloc, called as `mi_malloc` when the alignment asked for is at most
/// a word's. The `mimalloc` crate's allocator calls `mi_malloc_aligned`
/// for every allocation, whose checks before the same fast path cost ≈ 20
/// instructions each (a 20k-user sync makes ≈ 1M allocations). Every
/// mimalloc block is word-aligned: a page's first block is aligned to 16
/// bytes (`MI_PAGE_MIN_START_BLOCK_ALIGN`, mimalloc's `types.h`) and block
/// sizes are whole words.
#[cfg(not(feature = "system-allocator"))]
struct Mimalloc;

#[cfg(not(feature = "system-allocator"))]
const WORD: usize = std::mem::size_of::<usize>();

#[cfg(not(feature = "system-allocator"))]
// SAFETY: every block comes from mimalloc and goes back to it (`mi_free`
// takes aligned and unaligned blocks alike); alignments above a word take
// mimalloc's aligned calls.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: as the trait requires; see the impl.
        unsafe {
            if layout.align() <= WORD {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: as the trait requires; see the impl.
        unsafe {
            if layout.align() <= WORD {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe {
            if layout.align() <= WORD {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Memory must not grow with the tenant: have mimalloc commit arena memory
/// on demand, return freed pages at once instead of keeping them for
/// reuse, and not back its arenas with transparent huge pages (with THP a
/// page is only returned once a whole 2 MiB span is free). Measured with
/// `graphdelta bench`, 100k users: peak RSS 122 MiB → 63 MiB for the first
/// two, and 99 → 74 MiB for the third once mimalloc v3 turned THP on.
fn tune_allocator() {
    if cfg!(feature = "system-allocator") {
        return;
    }
    // Option numbers of mimalloc v3's `mi_option_e` (mimalloc.h).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
    // SAFETY: plain setters of mimalloc's global options; any value is valid.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(ALLOW_THP, 0);
    }
    // mimalloc reserved its first arena (with MADV_HUGEPAGE) before `main`;
    // the option only covers later ones. This covers the whole process.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments only; failure is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
