//! The `request_logs` table.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{split_page, Page};
use crate::db::models::LogRow;
use crate::db::schema::request_logs;
use crate::db::{Db, DbError};
use crate::with_conn;

/// Writes a batch of log rows, skipping rows already stored (a retried batch); returns how many
/// were new. One multi-row insert on PostgreSQL; one insert per row in a single transaction on
/// SQLite, where diesel cannot batch an insert that skips conflicts.
pub async fn insert_batch(db: &Db, rows: &[LogRow]) -> Result<usize, DbError> {
    if rows.is_empty() {
        return Ok(0);
    }
    match db {
        Db::Pg(pool) => {
            let mut conn = pool.get().await?;
            Ok(diesel::insert_into(request_logs::table)
                .values(rows)
                .on_conflict_do_nothing()
                .execute(&mut conn)
                .await?)
        }
        Db::Sqlite(pool) => {
            // Synchronous diesel on the blocking pool writes one multi-row insert, which
            // diesel-async's SQLite wrapper cannot.
            let mut conn = pool.get().await?;
            let rows = rows.to_vec();
            Ok(conn
                .spawn_blocking(move |conn| sqlite::insert_batch(conn, &rows))
                .await?)
        }
    }
}

/// The SQLite side of [`insert_batch`], in synchronous diesel (its own trait imports).
mod sqlite {
    use diesel::prelude::*;

    use crate::db::models::LogRow;
    use crate::db::schema::request_logs;

    pub fn insert_batch(conn: &mut SqliteConnection, rows: &[LogRow]) -> QueryResult<usize> {
        // One prepared single-row insert, reused for every row, in one transaction: in
        // process, that costs less than parsing one statement of hundreds of rows per batch.
        conn.immediate_transaction(|conn| {
            let mut inserted = 0;
            for row in rows {
                inserted += diesel::insert_into(request_logs::table)
                    .values(row)
                    .on_conflict_do_nothing()
                    .execute(conn)?;
            }
            Ok(inserted)
        })
    }
}

/// Which log entries a read returns.
#[derive(Debug, Default, Clone)]
pub struct LogFilter {
    pub user_id: Option<String>,
    pub status: Option<i32>,
}

/// Log entries, newest first, a page at a time.
pub async fn list(db: &Db, filter: &LogFilter, page: Page) -> Result<(Vec<LogRow>, bool), DbError> {
    let rows: Vec<LogRow> = with_conn!(db, |conn| {
        let mut query = request_logs::table
            .select(LogRow::as_select())
            .order((request_logs::ts.desc(), request_logs::id.desc()))
            .limit(page.limit + 1)
            .offset(page.offset)
            .into_boxed();
        if let Some(user) = &filter.user_id {
            query = query.filter(request_logs::user_id.eq(user.clone()));
        }
        if let Some(status) = filter.status {
            query = query.filter(request_logs::status.eq(status));
        }
        query.load(conn).await?
    });
    Ok(split_page(rows, page))
}

/// Deletes entries older than `before`; returns how many.
pub async fn prune(db: &Db, before: NaiveDateTime) -> Result<usize, DbError> {
    with_conn!(db, |conn| {
        Ok(
            diesel::delete(request_logs::table.filter(request_logs::ts.lt(before)))
                .execute(conn)
                .await?,
        )
    })
}
