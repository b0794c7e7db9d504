//! The rows a background writer holds until they are in the database: written in batches (by
//! size and by time), kept through a database outage up to a bound, retried until they land.
//! Writes are idempotent (keyed by request id), so a batch whose commit was not confirmed is
//! simply sent again.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::db::DbError;

/// Wait before retrying a failed write.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Rows waiting to be written.
pub struct BatchBuffer<T> {
    /// What the rows are, for logs and metric labels (`usage`, `logs`).
    pub name: &'static str,
    rows: VecDeque<T>,
    bound: usize,
    batch: usize,
    interval: Duration,
    last_write: Instant,
    retry_at: Option<Instant>,
    /// Dropped since the last report.
    dropped: u64,
    /// Rows at the front to write one at a time: a batch the database refused is retried
    /// row by row, so that only the rows it refuses are set aside.
    one_by_one: usize,
}

impl<T> BatchBuffer<T> {
    pub fn new(name: &'static str, bound: usize, batch: usize, interval: Duration) -> Self {
        BatchBuffer {
            name,
            rows: VecDeque::new(),
            bound: bound.max(1),
            batch: batch.max(1),
            interval,
            last_write: Instant::now(),
            retry_at: None,
            dropped: 0,
            one_by_one: 0,
        }
    }

    /// Queues a row; past the bound it is dropped, counted, and handed back (what it held
    /// is lost, and its owner may have to undo what it counted for it).
    #[must_use = "a dropped row is handed back"]
    pub fn push(&mut self, row: T) -> Option<T> {
        if self.rows.len() < self.bound {
            self.rows.push_back(row);
            None
        } else {
            self.dropped += 1;
            Some(row)
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Most rows in one write.
    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows dropped since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Whether a write should start now: a full batch, or rows older than the interval, and
    /// not while waiting to retry.
    pub fn due(&self, now: Instant) -> bool {
        if self.rows.is_empty() || self.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        self.one_by_one > 0
            || self.rows.len() >= self.batch
            || now.duration_since(self.last_write) >= self.interval
    }

    /// The next batch to write.
    pub fn take_batch(&mut self) -> Vec<T> {
        let n = if self.one_by_one > 0 {
            self.one_by_one -= 1;
            1
        } else {
            self.rows.len().min(self.batch)
        };
        self.rows.drain(..n).collect()
    }

    /// Every row, for the final flush.
    pub fn take_all(&mut self) -> Vec<T> {
        self.rows.drain(..).collect()
    }

    /// A batch was written.
    pub fn written(&mut self) {
        if self.retry_at.take().is_some() {
            tracing::info!(
                rows = self.name,
                "database answers again: buffered rows are being written"
            );
        }
        self.last_write = Instant::now();
    }

    /// A batch failed: its rows go back to the front, to be retried in order. Rows that no
    /// longer fit are dropped, counted and handed back.
    #[must_use = "dropped rows are handed back"]
    pub fn failed(&mut self, batch: Vec<T>, error: &DbError) -> Vec<T> {
        if self.retry_at.is_none() {
            tracing::warn!(rows = self.name, error = %error, buffered = self.rows.len() + batch.len(), "writing to the database failed; holding rows until it answers");
        }
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
        for row in batch.into_iter().rev() {
            self.rows.push_front(row);
        }
        // Rows past the bound (pushed back over it) are the newest: drop those.
        let mut lost = Vec::new();
        while self.rows.len() > self.bound {
            lost.extend(self.rows.pop_back());
            self.dropped += 1;
        }
        lost
    }

    /// The database refused a batch (see [`DbError::is_refusal`]): retrying it whole would
    /// fail forever and hold up every row behind it. A batch of several rows goes back to the
    /// front to be written one at a time, at once; a single row is handed back, to be dropped.
    #[must_use = "a refused row is handed back"]
    pub fn refused(&mut self, batch: Vec<T>, error: &DbError) -> Vec<T> {
        if batch.len() == 1 {
            return batch;
        }
        tracing::warn!(rows = self.name, error = %error, batch = batch.len(), "the database refused a batch; writing its rows one at a time to set aside the ones it refuses");
        self.one_by_one = batch.len();
        for row in batch.into_iter().rev() {
            self.rows.push_front(row);
        }
        Vec::new()
    }

    /// Puts rows the final flush could not write back, so they are reported.
    pub fn restore(&mut self, rows: Vec<T>) {
        self.rows.extend(rows);
    }
}

/// Writes `rows` in batches of `batch` until all are written or `deadline` passes, retrying
/// failed batches, as a [`BatchBuffer`] does (a refused one row by row, setting aside the rows
/// refused). Returns what each write reported and the rows left unwritten, refused ones
/// included.
pub async fn write_all<T, R, F, Fut>(
    rows: Vec<T>,
    batch: usize,
    deadline: Instant,
    mut write: F,
) -> (Vec<R>, Vec<T>)
where
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = Result<R, (DbError, Vec<T>)>>,
{
    // Unbounded: everything held is already in memory.
    let mut buffer = BatchBuffer::new("final", usize::MAX, batch, Duration::ZERO);
    buffer.rows.extend(rows);
    let (mut reports, mut refused) = (Vec::new(), Vec::new());
    while !buffer.is_empty() && Instant::now() < deadline {
        match write(buffer.take_batch()).await {
            Ok(report) => {
                buffer.written();
                reports.push(report);
            }
            Err((error, failed)) if error.is_refusal() => {
                let lost = buffer.refused(failed, &error);
                if !lost.is_empty() {
                    tracing::error!(error = %error, "final write: the database refused a row");
                }
                refused.extend(lost);
            }
            Err((error, failed)) => {
                let lost = buffer.failed(failed, &error);
                debug_assert!(lost.is_empty(), "an unbounded buffer drops nothing");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    refused.extend(buffer.take_all());
    (reports, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_is_retried_first_and_the_bound_drops_the_newest() {
        let mut buffer = BatchBuffer::new("t", 3, 2, Duration::from_secs(60));
        let lost: Vec<i32> = (0..4).filter_map(|i| buffer.push(i)).collect();
        assert_eq!(lost, vec![3]);
        assert_eq!(buffer.take_dropped(), 1);
        assert!(buffer.due(Instant::now()));
        let batch = buffer.take_batch();
        assert_eq!(batch, vec![0, 1]);
        assert_eq!(buffer.push(4), None);
        let lost = buffer.failed(batch, &DbError::Unavailable("down".into()));
        assert_eq!(lost, vec![4], "the newest row goes");
        assert!(!buffer.due(Instant::now()));
        assert_eq!(buffer.take_all(), vec![0, 1, 2]);
    }

    #[test]
    fn a_refused_batch_is_written_row_by_row_and_only_the_refused_row_is_set_aside() {
        let refusal = DbError::InvalidValue("0x00".into());
        let mut buffer = BatchBuffer::new("t", 10, 3, Duration::from_secs(60));
        for i in 0..4 {
            assert_eq!(buffer.push(i), None);
        }
        let batch = buffer.take_batch();
        assert_eq!(batch, vec![0, 1, 2]);
        assert!(buffer.refused(batch, &refusal).is_empty());
        // Then one row a write, at once, for the three refused together; then batches again.
        for expected in [0, 1, 2] {
            assert!(buffer.due(Instant::now()));
            let one = buffer.take_batch();
            assert_eq!(one, vec![expected]);
            if expected == 1 {
                assert_eq!(buffer.refused(one, &refusal), vec![1]);
            } else {
                buffer.written();
            }
        }
        assert_eq!(buffer.take_batch(), vec![3]);
        assert_eq!(
            buffer.take_dropped(),
            0,
            "refused rows are not counted as overflow"
        );
    }

    #[actix_web::test]
    async fn the_final_write_sets_aside_a_refused_row_and_writes_the_rest() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (reports, left) = write_all(vec![1, 2, 3, 4, 5], 3, deadline, |rows| async move {
            if rows.contains(&2) {
                Err((DbError::InvalidValue("0x00".into()), rows))
            } else {
                Ok(rows)
            }
        })
        .await;
        assert_eq!(left, vec![2]);
        assert_eq!(reports.concat(), vec![1, 3, 4, 5]);
    }
}
