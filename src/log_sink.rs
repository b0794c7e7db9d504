//! Where log lines go: a shared buffer that a writer thread empties to stdout every few
//! milliseconds (or sooner when it fills), like nginx's `access_log buffer= flush=`. A request
//! only appends its line under a short lock; no thread is woken per line, so logging costs no
//! context switch on the request path. Past a bound, lines are dropped and counted.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};
use tracing_subscriber::fmt::MakeWriter;

/// How often buffered lines are written out.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Wake the writer early once this much is buffered.
const HIGH_WATER: usize = 256 * 1024;
/// Drop lines rather than buffer more than this.
const MAX_BUFFERED: usize = 8 * 1024 * 1024;

struct Shared {
    buffer: Mutex<Vec<u8>>,
    wake: Condvar,
    closing: AtomicBool,
    dropped: AtomicU64,
}

/// The `MakeWriter` handed to the tracing subscriber.
#[derive(Clone)]
pub struct BatchedStdout {
    shared: Arc<Shared>,
}

/// Keeps the writer thread alive; dropping it writes out what is left and stops the thread.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread.
pub fn batched_stdout() -> (BatchedStdout, FlushGuard) {
    let shared = Arc::new(Shared {
        buffer: Mutex::new(Vec::with_capacity(HIGH_WATER)),
        wake: Condvar::new(),
        closing: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
    });
    let for_thread = shared.clone();
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_out(&for_thread))
        .ok();
    (
        BatchedStdout {
            shared: shared.clone(),
        },
        FlushGuard { shared, thread },
    )
}

fn write_out(shared: &Shared) {
    crate::sched::yield_to_request_path();
    let mut spare = Vec::with_capacity(HIGH_WATER);
    let mut stdout = std::io::stdout();
    loop {
        let closing = {
            let mut buffer = shared.buffer.lock();
            if !shared.closing.load(Ordering::Acquire) {
                // Woken early only by a full buffer or by shutdown.
                shared.wake.wait_for(&mut buffer, FLUSH_EVERY);
            }
            std::mem::swap(&mut *buffer, &mut spare);
            shared.closing.load(Ordering::Acquire)
        };
        if !spare.is_empty() {
            // Nowhere to report a failing stdout: the lines are lost either way.
            let _ = stdout.write_all(&spare).and_then(|_| stdout.flush());
            spare.clear();
        }
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(stdout, "log buffer full: {dropped} lines dropped");
        }
        if closing {
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One event's writer: appends to the shared buffer while it holds the lock.
pub struct LineWriter<'a> {
    buffer: Option<MutexGuard<'a, Vec<u8>>>,
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Some(buffer) = self.buffer.as_mut() {
            buffer.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            let full = buffer.len() >= HIGH_WATER;
            drop(buffer);
            if full {
                self.shared.wake.notify_one();
            }
        }
    }
}

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        let shared: &'a Shared = &self.shared;
        let buffer = shared.buffer.lock();
        let buffer = if buffer.len() < MAX_BUFFERED {
            Some(buffer)
        } else {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            None
        };
        LineWriter { buffer, shared }
    }
}
