//! How the kernel shares a core between the request path and the background work beside it.
//!
//! Metering (pricing, SQLite writes) and the log writer run on threads that share the router's
//! cores with the HTTP workers. Under Linux's EEVDF scheduler a worker woken by a request that
//! arrives while one of them runs often waits until that thread's slice ends: recorded with
//! `BENCH_SCHED` (`perf sched`), those waits were the most frequent wake-up delays of more than
//! 100 µs, and so a good part of the sequential p99. Two hints cut them (see README.md,
//! Performance):
//!
//! - each HTTP worker asks for the shortest slice the kernel allows, which lets a woken worker
//!   preempt a thread with the default slice, and bounds how long such a thread may keep the
//!   core once the worker is runnable;
//! - background threads run at a lower weight (nice 5), so the worker is more often the one
//!   with the earliest deadline. At nice 5 a background thread still gets a quarter of a core
//!   that the workers saturate, well above what metering needs there (about a seventh), so it
//!   keeps up rather than dropping records.
//!
//! Both are hints: where the kernel or a sandbox refuses them (another OS, a kernel before
//! 6.12 for slices, a seccomp profile), the router runs as before and says so at debug level.

/// The nice level of background threads (0 is the default; higher yields more).
pub const BACKGROUND_NICE: i32 = 5;

/// The slice an HTTP worker asks for: the kernel's minimum.
#[cfg(target_os = "linux")]
const WORKER_SLICE_NS: u64 = 100_000;

/// Called on each HTTP worker thread as it starts.
pub fn favour_request_path() {
    #[cfg(target_os = "linux")]
    if let Err(err) = linux::set_slice(WORKER_SLICE_NS) {
        tracing::debug!(error = %err, "the kernel refused a short time slice for the worker");
    }
}

/// Called on a background thread before it does any work; threads it starts inherit it.
pub fn yield_to_request_path() {
    #[cfg(target_os = "linux")]
    if let Err(err) = linux::set_nice(BACKGROUND_NICE) {
        tracing::debug!(error = %err, "could not lower a background thread's priority");
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;

    /// `struct sched_attr` as its first version (`SCHED_ATTR_SIZE_VER0`) lays it out.
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        /// For `SCHED_OTHER` since Linux 6.12: the task's slice.
        runtime: u64,
        deadline: u64,
        period: u64,
    }

    /// The calling thread's id: `setpriority` and `getpriority` given a thread id act on that
    /// one thread, not the process.
    fn thread_id() -> libc::id_t {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() as libc::id_t }
    }

    pub fn set_nice(nice: i32) -> io::Result<()> {
        // SAFETY: plain system call on the calling thread.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, thread_id(), nice) };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn nice() -> io::Result<i32> {
        // getpriority may return -1 as a value: errno tells an error apart.
        // SAFETY: errno is thread-local; the call has no preconditions.
        unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, thread_id());
            match io::Error::last_os_error() {
                err if err.raw_os_error() != Some(0) && nice == -1 => Err(err),
                _ => Ok(nice),
            }
        }
    }

    /// Keeps the calling thread's policy (`SCHED_OTHER`) and nice level, with a slice of
    /// `slice_ns`. `sched_setattr` sets the nice level too, so the current one is passed on.
    pub fn set_slice(slice_ns: u64) -> io::Result<()> {
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy: libc::SCHED_OTHER as u32,
            nice: nice()?,
            runtime: slice_ns,
            ..SchedAttr::default()
        };
        // SAFETY: `attr` is a valid `sched_attr` of the size it declares; 0 is this thread.
        let result =
            unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_lowered_thread_keeps_its_nice_level_when_it_asks_for_a_slice() {
            let before = nice().unwrap();
            std::thread::spawn(|| {
                set_nice(19).unwrap();
                assert_eq!(nice().unwrap(), 19);
                // A kernel before 6.12 may refuse or ignore the slice; the nice level stays.
                let _ = set_slice(100_000);
                assert_eq!(nice().unwrap(), 19);
            })
            .join()
            .unwrap();
            assert_eq!(nice().unwrap(), before, "other threads keep theirs");
        }
    }
}
