//! One client call as metering sees it, and the queue that carries it off the request path.
//!
//! A worker appends a finished call under a short lock and wakes no one; the accountant empties
//! the queue on its own clock. Like the log sink, this keeps a context switch per call off the
//! request path. Past its bound the queue refuses records, and counts them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use chrono::NaiveDateTime;
use parking_lot::Mutex;

use super::observed::Observed;
use super::usage::{Endpoint, Usage};

/// What one data-plane call did.
#[derive(Debug)]
pub struct CallRecord {
    pub request_id: String,
    pub ts: NaiveDateTime,
    pub user_id: String,
    pub key_id: String,
    pub route: &'static str,
    pub endpoint: Endpoint,
    /// The model asked for, once the body was read.
    pub model: Option<String>,
    /// The model sent upstream (the mapped one, or the one asked for).
    pub upstream_model: Option<String>,
    /// The key (and its level) that answered.
    pub upstream_key_id: Option<String>,
    pub level: Option<i32>,
    /// The status the client got.
    pub status: u16,
    /// The error code the client got, when Switchyard refused or failed the call.
    pub error_code: Option<&'static str>,
    pub attempts: u32,
    /// Attempts that failed before one answered (or all failed): key id and outcome. They cost
    /// nothing; they are counted in metrics and logged.
    pub failures: Vec<(String, &'static str)>,
    pub latency: Duration,
    pub ttfb: Option<Duration>,
    pub observed: Observed,
    /// The request body, for what only it says (images asked, characters spoken, the prompt of
    /// a stream cut before its usage arrived).
    pub request: Bytes,
    /// The provider's usage when the request thread already read it (to settle a token limit).
    pub reported: Option<Usage>,
}

/// The queue between the workers and the accountant.
pub struct Recorder {
    queue: Mutex<Vec<CallRecord>>,
    capacity: usize,
    dropped: AtomicU64,
    /// Calls begun whose record has not been pushed yet: at shutdown, the calls a worker cut
    /// are dropped on its thread a moment after the server stops, and are waited for.
    open: AtomicUsize,
}

impl Recorder {
    pub fn new(capacity: usize) -> Self {
        Recorder {
            queue: Mutex::new(Vec::with_capacity(1024)),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
            open: AtomicUsize::new(0),
        }
    }

    /// A call began; its record will be pushed when it ends.
    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits, up to `at_most`, until every call begun has pushed its record; whether they all did.
    pub async fn all_closed(&self, at_most: Duration) -> bool {
        let deadline = Instant::now() + at_most;
        while self.open.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Appends a finished call; past the bound the record is dropped and counted.
    pub fn push(&self, record: CallRecord) {
        let mut queue = self.queue.lock();
        if queue.len() < self.capacity {
            queue.push(record);
        } else {
            drop(queue);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        // After the record is queued, so that a shutdown that sees no call open finds it.
        self.open.fetch_sub(1, Ordering::Release);
    }

    /// Everything queued so far.
    pub fn take(&self) -> Vec<CallRecord> {
        std::mem::take(&mut *self.queue.lock())
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records refused since the last call (the accountant logs and counts them).
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}
