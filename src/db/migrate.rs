//! Embedded migrations, one set per backend, run under a lock so replicas can start together.

use anyhow::Context;
use diesel::{Connection, RunQueryDsl, SqliteConnection};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::AsyncPgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::config::DatabaseKind;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Session-level advisory lock id ("switchyard" folded into 63 bits): held while migrating so
/// that replicas starting at once run the migrations one after another, not side by side.
const MIGRATION_LOCK_ID: i64 = 0x5357_4954_4348_5944;

/// Applies every pending migration and returns how many ran. Blocking: call it from a plain
/// thread, never from an async executor (diesel's harness blocks on its own runtime).
pub fn run_pending(url: &str) -> anyhow::Result<usize> {
    match DatabaseKind::from_url(url)? {
        DatabaseKind::Postgres => {
            // diesel's harness is synchronous: the wrapper blocks on this runtime's handle,
            // whose worker thread drives the connection (TLS or not, as the URL asks).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the migrations' runtime")?;
            let _entered = runtime.enter();
            let conn = runtime
                .block_on(super::pg_tls::establish(url))
                .context("connecting to PostgreSQL")?;
            let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
            diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))
                .execute(&mut conn)
                .context("taking the migration lock")?;
            let applied = conn
                .run_pending_migrations(PG_MIGRATIONS)
                .map(|done| done.len())
                .map_err(|e| anyhow::anyhow!("running PostgreSQL migrations: {e}"));
            // The lock also ends with the session; unlocking explicitly frees waiters sooner.
            let _ = diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"))
                .execute(&mut conn);
            applied
        }
        DatabaseKind::Sqlite(path) => {
            super::prepare_sqlite_library();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut conn = SqliteConnection::establish(&path.to_string_lossy())
                .with_context(|| format!("opening {}", path.display()))?;
            diesel::sql_query("PRAGMA busy_timeout = 5000").execute(&mut conn)?;
            diesel::sql_query("PRAGMA journal_mode = WAL").execute(&mut conn)?;
            conn.run_pending_migrations(SQLITE_MIGRATIONS)
                .map(|done| done.len())
                .map_err(|e| anyhow::anyhow!("running SQLite migrations: {e}"))
        }
    }
}

/// Runs [`run_pending`] on its own thread, so it is safe to call from async code at start-up.
pub async fn run_pending_off_thread(url: String) -> anyhow::Result<usize> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("migrations".into())
        .spawn(move || {
            let _ = tx.send(run_pending(&url));
        })
        .context("starting the migration thread")?;
    rx.await.context("the migration thread died")?
}
