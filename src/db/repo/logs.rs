//! The `request_logs` table: one entry per client call (written with its usage by
//! `repo::usage::insert_batch`), read newest first, pruned by age.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::{split_page, Page};
use crate::db::models::LogRow;
use crate::db::schema::request_logs;
use crate::db::{Db, DbError};
use crate::with_conn;

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

/// One entry by request id (tests and support).
pub async fn get(db: &Db, id: &str) -> Result<LogRow, DbError> {
    with_conn!(db, |conn| {
        Ok(request_logs::table
            .find(id)
            .select(LogRow::as_select())
            .first(conn)
            .await?)
    })
}

/// Deletes entries older than `before`, first adding their usage to `usage_daily` (in the same
/// transaction), so pruning the log never loses usage; returns how many entries went.
///
/// Every replica prunes. On PostgreSQL two prunes at once would each add the same old entries
/// to the daily sums (under READ COMMITTED the second one's sum reads rows the first is about to
/// delete), so a prune first takes a transaction-scoped advisory lock: the second waits, and
/// its sum then starts after the first committed and sees nothing left to add. SQLite's single
/// writer already serialises them.
pub async fn prune(db: &Db, before: NaiveDateTime) -> Result<usize, DbError> {
    let (day, at, serialise) = match db {
        Db::Pg(_) => (
            "to_char(ts, 'YYYY-MM-DD')",
            "$1",
            Some("SELECT pg_advisory_xact_lock(hashtext('switchyard.prune'))"),
        ),
        Db::Sqlite(..) => ("strftime('%Y-%m-%d', ts)", "?", None),
    };
    let rollup = format!(
        "INSERT INTO usage_daily (day, user_id, model, requests, prompt_tokens, \
         completion_tokens, reasoning_tokens, cached_tokens, images, audio_seconds, characters, \
         cost_nanos) \
         SELECT {day}, user_id, COALESCE(model, ''), COUNT(*), SUM(prompt_tokens), \
         SUM(completion_tokens), SUM(reasoning_tokens), SUM(cached_tokens), SUM(images), \
         SUM(audio_seconds), SUM(characters), SUM(cost_nanos) \
         FROM request_logs WHERE ts < {at} AND metered AND user_id IS NOT NULL \
         GROUP BY {day}, user_id, COALESCE(model, '') \
         ON CONFLICT (day, user_id, model) DO UPDATE SET \
         requests = usage_daily.requests + excluded.requests, \
         prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, \
         completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, \
         reasoning_tokens = usage_daily.reasoning_tokens + excluded.reasoning_tokens, \
         cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens, \
         images = usage_daily.images + excluded.images, \
         audio_seconds = usage_daily.audio_seconds + excluded.audio_seconds, \
         characters = usage_daily.characters + excluded.characters, \
         cost_nanos = usage_daily.cost_nanos + excluded.cost_nanos"
    );
    let rollup = rollup.as_str();
    with_conn!(db, |conn| {
        conn.transaction::<_, DbError, _>(async |conn| {
            if let Some(serialise) = serialise {
                diesel::sql_query(serialise).execute(conn).await?;
            }
            diesel::sql_query(rollup)
                .bind::<diesel::sql_types::Timestamp, _>(before)
                .execute(conn)
                .await?;
            Ok(
                diesel::delete(request_logs::table.filter(request_logs::ts.lt(before)))
                    .execute(conn)
                    .await?,
            )
        })
        .await
    })
}
