//! Calls' usage: written with their request-log entries (one row per call) together with the
//! spend it adds to `users`, and summed from those entries and from `usage_daily` (what
//! outlived the log's retention).

use std::collections::{BTreeMap, HashSet};

use chrono::NaiveDateTime;
use diesel::dsl::sql;
use diesel::expression::SqlLiteral;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};

use crate::db::models::LogRow;
use crate::db::schema::{request_logs, usage_daily, users};
use crate::db::{Db, DbError};
use crate::with_conn;

/// What a batch write did to each user's stored spend.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SpendWritten {
    /// Per user: the cost of the batch's rows (new or already stored) and the stored total now.
    pub users: Vec<(String, i64, i64)>,
}

/// Adds the cost of the rows just inserted to their users' spend and reads back the totals of
/// every user in the batch, inside the batch's transaction. Expanded once per backend: with
/// `.await` after each query for PostgreSQL's async connection, with nothing for SQLite's, which
/// runs whole on the blocking pool.
macro_rules! add_spend {
    ($conn:expr, $rows:expr, $new_ids:expr, $user_ids:expr $(, $suffix:tt)*) => {{
        let new: HashSet<&str> = $new_ids.iter().map(String::as_str).collect();
        let mut added: BTreeMap<&str, i64> = BTreeMap::new();
        for (user, cost) in metered_costs($rows.iter().filter(|r| new.contains(r.id.as_str()))) {
            *added.entry(user).or_default() += cost;
        }
        for (user, nanos) in added.iter().filter(|(_, n)| **n != 0) {
            diesel::update(users::table.find(*user))
                .set(users::spent_nanos.eq(users::spent_nanos + *nanos))
                .execute($conn) $($suffix)* ?;
        }
        let totals: Vec<(String, i64)> = users::table
            .filter(users::id.eq_any($user_ids))
            .select((users::id, users::spent_nanos))
            .load($conn) $($suffix)* ?;
        Ok(totals)
    }};
}

/// Each metered row's user and cost.
fn metered_costs<'a>(
    rows: impl Iterator<Item = &'a LogRow>,
) -> impl Iterator<Item = (&'a str, i64)> {
    rows.filter(|r| r.metered)
        .filter_map(|r| Some((r.user_id.as_deref()?, r.cost_nanos)))
}

/// Writes a batch of calls (their log entries, usage included) and adds their cost to their
/// users' spend, in one transaction. Calls already stored (same request id, from a retried
/// batch) are skipped and not counted again, so a batch can be retried safely. PostgreSQL gets
/// one multi-row insert; SQLite, in process, prepared inserts of ten rows reused.
pub async fn insert_batch(db: &Db, rows: &[LogRow]) -> Result<SpendWritten, DbError> {
    if rows.is_empty() {
        return Ok(SpendWritten::default());
    }
    let mut batch_cost: BTreeMap<&str, i64> = BTreeMap::new();
    for (user, cost) in metered_costs(rows.iter()) {
        *batch_cost.entry(user).or_default() += cost;
    }
    let user_ids: Vec<String> = batch_cost.keys().map(|u| u.to_string()).collect();
    let user_ids = &user_ids;
    let totals = match db {
        Db::Pg(pool) => {
            let mut conn = pool.get().await?;
            conn.transaction::<_, DbError, _>(async |conn| {
                // The insert comes first, so the transaction takes its locks at once.
                let new_ids: Vec<String> = diesel::insert_into(request_logs::table)
                    .values(rows)
                    .on_conflict_do_nothing()
                    .returning(request_logs::id)
                    .get_results(conn)
                    .await?;
                add_spend!(conn, rows, new_ids, user_ids, ., await)
            })
            .await?
        }
        Db::Sqlite(pool) => {
            // Synchronous diesel on the blocking pool (diesel-async's SQLite wrapper cannot
            // tell which rows were new), under a write lock taken up front.
            let mut conn = pool.get().await?;
            let (rows, user_ids) = (rows.to_vec(), user_ids.clone());
            conn.spawn_blocking(move |conn| sqlite::insert_batch(conn, &rows, &user_ids))
                .await?
        }
    };
    let totals: BTreeMap<String, i64> = totals.into_iter().collect();
    Ok(SpendWritten {
        users: batch_cost
            .into_iter()
            // A user deleted since the call has no total to report.
            .filter_map(|(u, cost)| totals.get(u).map(|t| (u.to_owned(), cost, *t)))
            .collect(),
    })
}

/// The SQLite side of [`insert_batch`], in synchronous diesel (its own trait imports).
mod sqlite {
    use std::collections::{BTreeMap, HashSet};

    use diesel::prelude::*;

    use super::metered_costs;
    use crate::db::models::LogRow;
    use crate::db::schema::{request_logs, users};
    use crate::pacing::Slice;

    /// Rows per multi-row statement.
    const ROWS_PER_STATEMENT: usize = 10;

    pub fn insert_batch(
        conn: &mut SqliteConnection,
        rows: &[LogRow],
        user_ids: &[String],
    ) -> QueryResult<Vec<(String, i64)>> {
        conn.immediate_transaction(|conn| {
            // Rows go in by statements of a fixed number of rows, each prepared once and
            // reused: diesel caches a statement by its type, and an array's length is part of
            // it. `INSERT OR IGNORE` keeps a stored row; `RETURNING` names the new ones.
            // Between statements the thread steps aside when its slice is spent: this runs on
            // the router's own cores (see `pacing`).
            let mut slice = Slice::start();
            let mut new_ids = Vec::with_capacity(rows.len());
            let mut chunks = rows.chunks_exact(ROWS_PER_STATEMENT);
            for chunk in &mut chunks {
                slice.step_aside_if_spent();
                let chunk: &[LogRow; ROWS_PER_STATEMENT] =
                    chunk.try_into().expect("chunks_exact gives whole chunks");
                new_ids.extend(
                    diesel::insert_or_ignore_into(request_logs::table)
                        .values(chunk)
                        .returning(request_logs::id)
                        .get_results::<String>(conn)?,
                );
            }
            // The rows that do not fill a statement, one by one (prepared once too).
            for row in chunks.remainder() {
                slice.step_aside_if_spent();
                new_ids.extend(
                    diesel::insert_or_ignore_into(request_logs::table)
                        .values(row)
                        .returning(request_logs::id)
                        .get_results::<String>(conn)?,
                );
            }
            slice.step_aside_if_spent();
            add_spend!(conn, rows, new_ids, user_ids)
        })
    }
}

/// Stored spend of `user_ids`.
pub async fn spent(db: &Db, user_ids: &[String]) -> Result<Vec<(String, i64)>, DbError> {
    with_conn!(db, |conn| {
        Ok(users::table
            .filter(users::id.eq_any(user_ids))
            .select((users::id, users::spent_nanos))
            .load(conn)
            .await?)
    })
}

/// How usage is grouped in a summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Model,
    User,
    Day,
}

/// Which usage a summary covers.
#[derive(Debug, Default, Clone)]
pub struct UsageFilter {
    pub user_id: Option<String>,
    /// Inclusive.
    pub since: Option<NaiveDateTime>,
    /// Exclusive.
    pub until: Option<NaiveDateTime>,
}

/// One group of a summary.
#[derive(Debug, Clone, PartialEq, Queryable)]
pub struct UsageGroup {
    pub key: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cached_tokens: i64,
    pub cost_nanos: i64,
}

/// Sums of usage per group, ordered by the group key: calls still in the request log, plus the
/// daily sums of older ones (which `since` and `until` select by whole days).
pub async fn summary(
    db: &Db,
    filter: &UsageFilter,
    group_by: GroupBy,
) -> Result<Vec<UsageGroup>, DbError> {
    let mut groups: BTreeMap<String, UsageGroup> = BTreeMap::new();
    for group in recent(db, filter, group_by)
        .await?
        .into_iter()
        .chain(daily(db, filter, group_by).await?)
    {
        match groups.get_mut(&group.key) {
            Some(sum) => sum.add(&group),
            None => {
                groups.insert(group.key.clone(), group);
            }
        }
    }
    Ok(groups.into_values().collect())
}

impl UsageGroup {
    fn add(&mut self, other: &UsageGroup) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
        self.cached_tokens += other.cached_tokens;
        self.cost_nanos += other.cost_nanos;
    }
}

/// `CAST(COALESCE(SUM(column), 0) AS BIGINT)`: a sum both backends read as a BIGINT.
fn total(column: &str) -> SqlLiteral<BigInt> {
    sql::<BigInt>(&format!("CAST(COALESCE(SUM({column}), 0) AS BIGINT)"))
}

type GroupColumns = (
    SqlLiteral<Text>,
    SqlLiteral<BigInt>,
    SqlLiteral<BigInt>,
    SqlLiteral<BigInt>,
    SqlLiteral<BigInt>,
    SqlLiteral<BigInt>,
    SqlLiteral<BigInt>,
);

/// The columns of a [`UsageGroup`]: the group `key` and `requests` (SQL expressions), then the
/// sums, which both tables name alike.
fn group_columns(key: &str, requests: SqlLiteral<BigInt>) -> GroupColumns {
    (
        sql::<Text>(key),
        requests,
        total("prompt_tokens"),
        total("completion_tokens"),
        total("reasoning_tokens"),
        total("cached_tokens"),
        total("cost_nanos"),
    )
}

/// Sums over the metered calls still in the request log.
async fn recent(
    db: &Db,
    filter: &UsageFilter,
    group_by: GroupBy,
) -> Result<Vec<UsageGroup>, DbError> {
    // The key is an SQL expression; only the day's differs between the backends.
    let key = match (group_by, db) {
        (GroupBy::Model, _) => "COALESCE(model, '')",
        (GroupBy::User, _) => "COALESCE(user_id, '')",
        (GroupBy::Day, Db::Pg(_)) => "to_char(ts, 'YYYY-MM-DD')",
        (GroupBy::Day, Db::Sqlite(_)) => "strftime('%Y-%m-%d', ts)",
    };
    with_conn!(db, |conn| {
        let mut query = request_logs::table
            .filter(request_logs::metered.eq(true))
            .group_by(sql::<Text>(key))
            .select(group_columns(
                key,
                sql::<BigInt>("CAST(COUNT(*) AS BIGINT)"),
            ))
            .into_boxed();
        if let Some(user) = &filter.user_id {
            query = query.filter(request_logs::user_id.eq(user.clone()));
        }
        if let Some(since) = filter.since {
            query = query.filter(request_logs::ts.ge(since));
        }
        if let Some(until) = filter.until {
            query = query.filter(request_logs::ts.lt(until));
        }
        Ok(query.load::<UsageGroup>(conn).await?)
    })
}

/// Sums over the daily rows of calls pruned from the log. A day counts when any of it falls
/// in `[since, until)`.
async fn daily(
    db: &Db,
    filter: &UsageFilter,
    group_by: GroupBy,
) -> Result<Vec<UsageGroup>, DbError> {
    let key = match group_by {
        GroupBy::Model => "model",
        GroupBy::User => "user_id",
        GroupBy::Day => "day",
    };
    let day = |t: NaiveDateTime| t.format("%Y-%m-%d").to_string();
    with_conn!(db, |conn| {
        let mut query = usage_daily::table
            .group_by(sql::<Text>(key))
            .select(group_columns(key, total("requests")))
            .into_boxed();
        if let Some(user) = &filter.user_id {
            query = query.filter(usage_daily::user_id.eq(user.clone()));
        }
        if let Some(since) = filter.since {
            query = query.filter(usage_daily::day.ge(day(since)));
        }
        if let Some(until) = filter.until {
            // `until` is exclusive: its own day counts only when it starts after midnight.
            let last = until - chrono::TimeDelta::nanoseconds(1);
            query = query.filter(usage_daily::day.le(day(last)));
        }
        Ok(query.load::<UsageGroup>(conn).await?)
    })
}
