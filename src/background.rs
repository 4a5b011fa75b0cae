//! Work that can wait, at a lower CPU priority than the path from Graph to
//! the sink: the memory's commits and the SQLite WAL's checkpoints.
//!
//! On a machine the connector shares (in `bench`, with the simulator that
//! serves its pages), a commit or checkpoint that takes a core for tens of
//! milliseconds delays the next page's request and answer. Neither holds
//! up an acknowledgement, and what waits for them is bounded (the staged
//! objects, the WAL's size), so they yield.

/// How much higher than the caller's the nice value of background work is
/// (a CPU-bound thread at +10 gets about a tenth of the share of a busy
/// thread beside it).
pub const BACKGROUND_NICE: libc::c_int = 10;

/// Raises this thread's nice value by [`BACKGROUND_NICE`] (at most to 19).
/// A hint: failing is harmless. On Linux a nice value belongs to a thread;
/// an unprivileged process can raise it but never lower it back, so only
/// threads that do nothing else call this.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on this thread's own id; no memory is
    // passed.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now != -1 || *libc::__errno_location() == 0 {
            libc::setpriority(libc::PRIO_PROCESS, tid, (now + BACKGROUND_NICE).min(19));
        }
    }
}

/// Runs `f` on a thread of its own at a lower CPU priority and waits for
/// it; a panic in `f` is resumed here. The caller's own thread (a pooled
/// one that other work reuses) keeps its priority. If no thread can be
/// started, `f` runs here.
pub fn in_background<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let mut f = Some(f);
    let ran = std::thread::scope(|scope| {
        let started = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, || {
                lower_priority();
                (f.take().expect("taken once"))()
            });
        started.ok().map(|t| t.join())
    });
    match ran {
        Some(Ok(value)) => value,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => (f.take().expect("not taken: no thread started"))(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn nice_of_this_thread() -> libc::c_int {
        // SAFETY: a plain system call on this thread's own id.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn background_work_runs_on_its_own_thread_at_a_lower_priority() {
        let caller = std::thread::current().id();
        let (value, other_thread) =
            in_background("test", || (7, std::thread::current().id() != caller));
        assert_eq!(value, 7);
        assert!(other_thread);
        #[cfg(target_os = "linux")]
        {
            let before = nice_of_this_thread();
            let inside = in_background("test", nice_of_this_thread);
            assert_eq!(inside, (before + BACKGROUND_NICE).min(19));
            // The caller's own priority is left as it was.
            assert_eq!(nice_of_this_thread(), before);
        }
        // A panic there is a panic here.
        let panicked =
            std::panic::catch_unwind(|| in_background("test", || panic!("in the commit")));
        let message = panicked.unwrap_err();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"in the commit"));
    }
}
