//! Work that can wait, at a lower CPU priority than the path from Graph to
//! the sink: the memory's commits and the SQLite WAL's checkpoints.
//!
//! On a machine the connector shares (in `bench`, with the simulator that
//! serves its pages), a commit or checkpoint that takes a core for tens of
//! milliseconds delays the next page's request and answer. Neither holds
//! up an acknowledgement, and what waits for them is bounded (the staged
//! objects, the WAL's size), so they yield.
//!
//! A nice value counts against every process on the machine, though, not
//! only the connector's own threads. Beside other busy processes a commit
//! at +10 starved, and the stream stopped for it once what is staged for
//! the next one was full; so a commit that kept the stream waiting is
//! followed by some at the stream's own priority ([`Yielding`]). So is a
//! WAL checkpoint that found the WAL several checkpoints' worth long: when
//! they starved, nothing waited, but the WAL grew (a 1M-user sync beside
//! two busy loops: up to 180 MB, against 72 MB alone).

/// How much higher than the caller's the nice value of background work is
/// (a CPU-bound thread at +10 gets about a tenth of the share of a busy
/// thread beside it).
pub const BACKGROUND_NICE: libc::c_int = 10;

/// Raises this thread's nice value by [`BACKGROUND_NICE`] (at most to 19).
/// A hint: failing is harmless. On Linux a nice value belongs to a thread;
/// an unprivileged process can raise it but never lower it back, so only
/// threads that do nothing else call this.
fn lower_priority() {
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

/// The CPU priority of work run by [`on_own_thread`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// [`BACKGROUND_NICE`] lower than the caller's.
    Lower,
    /// The caller's.
    Same,
}

/// The priority of work that can wait until it falls behind (module
/// docs): lower, but after it fell behind (a commit the stream stopped
/// for, a WAL past several checkpoints' worth) the same as the caller's
/// for the next `window` runs.
#[derive(Debug)]
pub struct Yielding {
    window: u32,
    /// Runs still to go at the caller's priority.
    own: u32,
}

impl Yielding {
    pub fn new(window: u32) -> Self {
        Yielding { window, own: 0 }
    }

    /// The priority of the next run.
    pub fn next_run(&mut self) -> Priority {
        if self.own > 0 {
            self.own -= 1;
            Priority::Same
        } else {
            Priority::Lower
        }
    }

    /// The work fell behind: the next `window` runs at the caller's
    /// priority.
    pub fn fell_behind(&mut self) {
        self.own = self.window;
    }
}

/// Runs `f` on a thread of its own at `priority` and waits for it; a
/// panic in `f` is resumed here. The caller's own thread (a pooled one
/// that other work reuses) keeps its priority. If no thread can be
/// started, `f` runs here.
pub fn on_own_thread<T: Send>(name: &str, priority: Priority, f: impl FnOnce() -> T + Send) -> T {
    let mut f = Some(f);
    let ran = std::thread::scope(|scope| {
        let started = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, || {
                if priority == Priority::Lower {
                    lower_priority();
                }
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
    fn work_that_fell_behind_runs_at_the_callers_priority_for_a_while() {
        use Priority::{Lower, Same};
        let runs = |p: &mut Yielding, n: usize| (0..n).map(|_| p.next_run()).collect::<Vec<_>>();
        let mut p = Yielding::new(3);
        assert_eq!(runs(&mut p, 2), [Lower, Lower]);
        p.fell_behind();
        assert_eq!(runs(&mut p, 4), [Same, Same, Same, Lower]);
        // Falling behind again on the way starts the count again.
        p.fell_behind();
        assert_eq!(runs(&mut p, 1), [Same]);
        p.fell_behind();
        assert_eq!(runs(&mut p, 4), [Same, Same, Same, Lower]);
    }

    #[test]
    fn background_work_runs_on_its_own_thread_at_the_priority_asked() {
        let caller = std::thread::current().id();
        for priority in [Priority::Lower, Priority::Same] {
            let (value, other_thread) = on_own_thread("test", priority, || {
                (7, std::thread::current().id() != caller)
            });
            assert_eq!(value, 7);
            assert!(other_thread);
        }
        #[cfg(target_os = "linux")]
        {
            let before = nice_of_this_thread();
            let inside = on_own_thread("test", Priority::Lower, nice_of_this_thread);
            assert_eq!(inside, (before + BACKGROUND_NICE).min(19));
            let inside = on_own_thread("test", Priority::Same, nice_of_this_thread);
            assert_eq!(inside, before);
            // The caller's own priority is left as it was.
            assert_eq!(nice_of_this_thread(), before);
        }
        // A panic there is a panic here.
        let panicked = std::panic::catch_unwind(|| {
            on_own_thread("test", Priority::Lower, || panic!("in the commit"))
        });
        let message = panicked.unwrap_err();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"in the commit"));
    }
}
