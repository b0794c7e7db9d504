//! Storage: one repository layer over a PostgreSQL or SQLite pool, chosen from the URL scheme.

pub mod migrate;
pub mod models;
pub mod pg_tls;
pub mod repo;
pub mod schema;
mod sqlite_writer;

use std::sync::Arc;
use std::time::Duration;

use diesel::SqliteConnection;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::FutureExt;

use crate::config::{DatabaseKind, DatabaseSettings};
pub use sqlite_writer::SqliteWriter;

/// The async SQLite connection: diesel's sync connection run on the blocking pool.
pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

/// A pool of connections to whichever backend is configured.
#[derive(Clone)]
pub enum Db {
    /// PostgreSQL (production, shared by replicas).
    Pg(Pool<AsyncPgConnection>),
    /// The embedded SQLite file, and metering's own connection for its batch writes.
    Sqlite(Pool<SqliteConn>, Arc<SqliteWriter>),
}

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The row asked for does not exist.
    #[error("not found")]
    NotFound,
    /// A unique constraint refused the write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A referenced row does not exist.
    #[error("reference to a missing row: {0}")]
    MissingReference(String),
    /// No connection could be had in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database error.
    #[error("database error: {0}")]
    Query(diesel::result::Error),
    /// Any other error of metering's SQLite writer.
    #[error("database error: {0}")]
    Write(String),
    /// A stored value could not be read back (corrupt JSON, unknown enum value).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// The database refused a value given to it: text holding a NUL character, which
    /// PostgreSQL cannot store (SQLite can).
    #[error("the database refused a value: {0}")]
    InvalidValue(String),
}

impl DbError {
    /// The database answered and refused what it was given (a value it cannot store, a
    /// constraint): sending the same again fails the same way, unlike a lost connection or a
    /// busy lock, which a retry outlasts.
    pub fn is_refusal(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match self {
            DbError::InvalidValue(_) | DbError::Conflict(_) | DbError::MissingReference(_) => true,
            DbError::Query(Error::DatabaseError(kind, _)) => {
                matches!(kind, Kind::CheckViolation | Kind::NotNullViolation)
            }
            DbError::Query(Error::SerializationError(_)) => true,
            _ => false,
        }
    }
}

impl From<diesel::result::Error> for DbError {
    fn from(err: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        match err {
            Error::NotFound => DbError::NotFound,
            Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                DbError::Conflict(info.message().to_owned())
            }
            Error::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, info) => {
                DbError::MissingReference(info.message().to_owned())
            }
            // SQLSTATE 22021, which diesel does not name: PostgreSQL's text holds no NUL.
            Error::DatabaseError(_, info) if info.message().ends_with("0x00") => {
                DbError::InvalidValue(info.message().to_owned())
            }
            other => DbError::Query(other),
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for DbError {
    fn from(err: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        DbError::Unavailable(err.to_string())
    }
}

/// Runs `$body` with `$conn` bound to a pooled connection of whichever backend `$db` holds.
/// The body is compiled once per backend, so every query must be portable.
#[macro_export]
macro_rules! with_conn {
    ($db:expr, |$conn:ident| $body:expr) => {
        match $db {
            $crate::db::Db::Pg(pool) => {
                let mut guard = pool.get().await?;
                let $conn = &mut *guard;
                $body
            }
            $crate::db::Db::Sqlite(pool, _) => {
                let mut guard = pool.get().await?;
                let $conn = &mut *guard;
                $body
            }
        }
    };
}

// SQLite settings every connection needs: WAL lets readers run beside the one writer, the busy
// timeout makes a writer wait instead of failing, and foreign keys are off unless asked for.
// Temporary files in memory: a multi-row insert that skips conflicts keeps a statement journal,
// which would otherwise be a file written page by page (most of the cost of metering's batches).
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; \
     PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;";

/// Puts the SQLite library in multi-thread mode, once, before its first connection opens.
///
/// The bundled library defaults to serialized mode, in which every call on a connection takes
/// that connection's mutex: 9% of the instructions of metering's batch inserts, which bind 24
/// values a row. Here each connection is used by one thread at a time (the pool hands it out,
/// diesel-async's wrapper holds it under its own lock; metering's `SqliteWriter` under its
/// mutex), which is all multi-thread mode asks.
/// Once SQLite has initialized the call is refused and the library stays serialized, which
/// is only slower.
pub(crate) fn prepare_sqlite_library() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config is documented as callable before sqlite3_initialize, from one
        // thread (the Once); after initialization it returns SQLITE_MISUSE and changes nothing.
        let rc =
            unsafe { libsqlite3_sys::sqlite3_config(libsqlite3_sys::SQLITE_CONFIG_MULTITHREAD) };
        if rc != libsqlite3_sys::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite was already initialized: it stays in serialized mode"
            );
        }
    });
}

impl Db {
    /// Builds the pool for `settings.url`. Connections open lazily, on first use.
    pub fn connect(settings: &DatabaseSettings) -> anyhow::Result<Self> {
        let wait = Some(Duration::from_secs(settings.acquire_timeout_secs));
        match DatabaseKind::from_url(&settings.url)? {
            DatabaseKind::Postgres => {
                let mut config = ManagerConfig::default();
                // A checkout must not cost a round trip; a dead connection surfaces as an error
                // on first use and is dropped by the pool.
                config.recycling_method = RecyclingMethod::Fast;
                config.custom_setup = Box::new(|url: &str| {
                    let url = url.to_owned();
                    async move { pg_tls::establish(&url).await }.boxed()
                });
                let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
                    settings.url.clone(),
                    config,
                );
                let pool = Pool::builder(manager)
                    .max_size(settings.max_connections)
                    .wait_timeout(wait)
                    .create_timeout(wait)
                    .runtime(deadpool::Runtime::Tokio1)
                    .build()?;
                Ok(Db::Pg(pool))
            }
            DatabaseKind::Sqlite(path) => {
                prepare_sqlite_library();
                let mut config = ManagerConfig::<SqliteConn>::default();
                config.recycling_method = RecyclingMethod::Fast;
                config.custom_setup = Box::new(|path: &str| {
                    let path = path.to_owned();
                    async move {
                        let mut conn = SqliteConn::establish(&path).await?;
                        conn.batch_execute(SQLITE_PRAGMAS)
                            .await
                            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    }
                    .boxed()
                });
                let manager = AsyncDieselConnectionManager::<SqliteConn>::new_with_config(
                    path.to_string_lossy(),
                    config,
                );
                let pool = Pool::builder(manager)
                    .max_size(settings.max_connections)
                    .wait_timeout(wait)
                    .create_timeout(wait)
                    .runtime(deadpool::Runtime::Tokio1)
                    .build()?;
                Ok(Db::Sqlite(pool, SqliteWriter::new(path)))
            }
        }
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), DbError> {
        with_conn!(self, |conn| {
            conn.batch_execute("SELECT 1").await?;
            Ok(())
        })
    }

    /// The backend's name, for logs and `/readyz`.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Db::Pg(_) => "postgres",
            Db::Sqlite(..) => "sqlite",
        }
    }
}
