//! Background work in short slices, so that it never keeps the request path waiting long.
//!
//! Metering prices calls and writes them to SQLite on threads that share the router's cores
//! with the HTTP workers. Linux lets a running thread finish its time slice (0.7–3 ms under
//! EEVDF) before a woken worker may run, so one long stretch of background work (pricing a
//! hundred milliseconds of calls, inserting a batch of rows) became the latency of every request
//! that arrived meanwhile: the sequential p99 was 1.4–1.5 ms. Background loops now work in
//! slices of about [`SLICE`] and give the CPU up between them by sleeping: only a thread that
//! leaves the run queue reliably lets the worker in. On top of the slices, the threads' own
//! scheduling hints (`sched`: a lower weight for background threads, the shortest slice for the
//! workers) cut the remaining waits by about a third; alone, before the slices, they changed
//! nothing measurable, as `sched_yield` did not.

use std::time::{Duration, Instant};

/// Work done before giving the CPU up.
pub const SLICE: Duration = Duration::from_micros(100);

/// How long a blocking-pool thread steps aside: one request's worth of CPU for a worker that
/// was waiting. (The kernel's default timer slack rounds a shorter sleep up to about this.)
const STEP_ASIDE: Duration = Duration::from_micros(50);

/// How long an async background thread steps aside: the runtime's timer resolution.
pub const STEP_ASIDE_ASYNC: Duration = Duration::from_millis(1);

/// The time spent in the current slice.
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    started: Instant,
}

impl Slice {
    pub fn start() -> Self {
        Slice {
            started: Instant::now(),
        }
    }

    /// True once the slice has had its time.
    pub fn spent(&self) -> bool {
        self.started.elapsed() >= SLICE
    }

    /// On a blocking-pool thread: when the slice is spent, sleeps briefly (so that a waiting
    /// worker runs) and starts the next one.
    pub fn step_aside_if_spent(&mut self) {
        if self.spent() {
            std::thread::sleep(STEP_ASIDE);
            *self = Slice::start();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_is_spent_after_its_time_and_stepping_aside_starts_a_new_one() {
        let mut slice = Slice::start();
        let first = slice.started;
        std::thread::sleep(SLICE);
        assert!(slice.spent());
        slice.step_aside_if_spent();
        assert!(
            slice.started >= first + SLICE + STEP_ASIDE,
            "the next slice starts after the pause"
        );
    }
}
