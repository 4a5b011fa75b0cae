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

/// The CPU priority of work run by [`Workers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// [`BACKGROUND_NICE`] lower than the caller's.
    Lower = 0,
    /// The caller's (the first caller's, when the thread was started).
    Same = 1,
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

/// A job for a kept thread; it sends its result (or its panic) back.
type Job = Box<dyn FnOnce() + Send>;

/// Threads kept for background work: one for each [`Priority`], started
/// on first use and ended when this is dropped. A thread whose priority
/// was lowered cannot be raised back, so each priority has its own.
/// Callers' own threads (pooled ones that other work reuses) keep their
/// priority.
///
/// A thread started for each run, as before, cost ≈ 2% of a 100k-user
/// sync's CPU (`perf`, 40 commits): mimalloc collected each exiting
/// thread's heap, with TLB shootdowns, and the next thread's heap faulted
/// its pages in again.
pub struct Workers {
    name: &'static str,
    /// By priority: `Lower`, `Same`.
    lanes: std::sync::Mutex<[Option<std::sync::mpsc::Sender<Job>>; 2]>,
}

impl Workers {
    /// Threads named `name` (none is started yet).
    pub fn new(name: &'static str) -> Self {
        Workers {
            name,
            lanes: std::sync::Mutex::new([None, None]),
        }
    }

    /// Runs `f` on the thread kept for `priority` and waits for it; a
    /// panic in `f` is resumed here. If no thread can be started, `f` runs
    /// here.
    pub fn run<T: Send + 'static>(
        &self,
        priority: Priority,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = done.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        });
        match self.lane(priority) {
            // A kept thread ends only once its sender is dropped, and a
            // job's panic is caught in the job: the send cannot fail.
            Some(lane) => lane.send(job).expect("a kept thread runs until dropped"),
            None => job(),
        }
        match result.recv().expect("every job sends its result") {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// The sender of the thread kept for `priority`, started if need be.
    fn lane(&self, priority: Priority) -> Option<std::sync::mpsc::Sender<Job>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let lane = &mut lanes[priority as usize];
        if lane.is_none() {
            let (jobs, queue) = std::sync::mpsc::channel::<Job>();
            let started = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || {
                    if priority == Priority::Lower {
                        lower_priority();
                    }
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                });
            *lane = started.ok().map(|_| jobs);
        }
        lane.clone()
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
    fn background_work_runs_on_a_kept_thread_for_each_priority() {
        let caller = std::thread::current().id();
        let workers = Workers::new("test");
        let thread = |p| workers.run(p, || std::thread::current().id());
        let (lower, same) = (thread(Priority::Lower), thread(Priority::Same));
        assert!(lower != caller && same != caller && lower != same);
        for _ in 0..3 {
            assert_eq!(thread(Priority::Lower), lower, "kept, not started again");
            assert_eq!(thread(Priority::Same), same);
        }
        #[cfg(target_os = "linux")]
        {
            let before = nice_of_this_thread();
            let inside = workers.run(Priority::Lower, nice_of_this_thread);
            assert_eq!(inside, (before + BACKGROUND_NICE).min(19));
            let inside = workers.run(Priority::Same, nice_of_this_thread);
            assert_eq!(inside, before);
            // The caller's own priority is left as it was.
            assert_eq!(nice_of_this_thread(), before);
        }
        // A panic there is a panic here, and the thread goes on.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            workers.run(Priority::Lower, || panic!("in the commit"))
        }));
        let message = panicked.unwrap_err();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"in the commit"));
        assert_eq!(thread(Priority::Lower), lower);
        assert_eq!(workers.run(Priority::Lower, || 7), 7);
    }
}
