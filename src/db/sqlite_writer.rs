//! A SQLite connection of metering's own, through rusqlite, for its batch writes.
//!
//! Every metered call becomes a request-log row of 24 columns. Through diesel, building and
//! binding that insert cost about as many instructions as SQLite spent storing it: diesel
//! renders a multi-row insert's SQL again to find it in its statement cache, walks every bound
//! value through its query builder and formats each timestamp into a new string. Here the
//! statements are fixed text, prepared once, and the values are bound straight to SQLite.
//!
//! The connection is opened on first use with the pool's settings and serves one batch at a
//! time (the accountant waits for each write). It runs on the blocking pool: SQLite blocks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode};

use super::{DbError, SQLITE_PRAGMAS};

pub struct SqliteWriter {
    path: PathBuf,
    connection: Mutex<Option<Connection>>,
}

impl SqliteWriter {
    pub fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(SqliteWriter {
            path,
            connection: Mutex::new(None),
        })
    }

    /// Runs `work` on the writer's connection, on the blocking pool, opening the connection
    /// first if it is not open yet (a failed open is tried again by the next write).
    pub async fn run<R, F>(self: &Arc<Self>, work: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let writer = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = writer.connection.lock();
            if connection.is_none() {
                *connection = Some(open(&writer.path)?);
            }
            work(connection.as_mut().expect("opened above"))
        })
        .await
        .map_err(|e| DbError::Unavailable(format!("the write did not finish: {e}")))?
        .map_err(DbError::from)
    }
}

/// The connection that commits past `wal_autocheckpoint` pages of WAL copies them back into the
/// database file before its commit returns, on the router's own core. This connection commits
/// most, so it checkpoints most: every 100 pages (about 0.3 ms of copying) rather than SQLite's
/// default 1,000 (2.5–3 ms, which a request arriving meanwhile waited out).
const WRITER_PRAGMAS: &str = "PRAGMA wal_autocheckpoint = 100;";

fn open(path: &Path) -> rusqlite::Result<Connection> {
    super::prepare_sqlite_library();
    let connection = Connection::open(path)?;
    connection.execute_batch(SQLITE_PRAGMAS)?;
    connection.execute_batch(WRITER_PRAGMAS)?;
    Ok(connection)
}

impl From<rusqlite::Error> for DbError {
    fn from(err: rusqlite::Error) -> Self {
        match err.sqlite_error_code() {
            // A lock held too long, a file that cannot be opened or written: the database is
            // away for now, and the batch waits for it.
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::ReadOnly,
            ) => DbError::Unavailable(err.to_string()),
            Some(ErrorCode::ConstraintViolation) => DbError::Conflict(err.to_string()),
            _ => DbError::Write(err.to_string()),
        }
    }
}
