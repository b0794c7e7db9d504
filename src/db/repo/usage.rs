//! The `usage_records` table, and the spend it adds to `users`.

use std::collections::{BTreeMap, HashSet};

use chrono::NaiveDateTime;
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};

use crate::db::models::UsageRow;
use crate::db::schema::{usage_records, users};
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
        for row in $rows.iter().filter(|r| new.contains(r.request_id.as_str())) {
            *added.entry(row.user_id.as_str()).or_default() += row.cost_nanos;
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

/// Writes a batch of usage rows and adds their cost to their users' spend, in one transaction.
/// Rows already stored (same request id, from a retried batch) are skipped and not counted
/// again, so a batch can be retried safely. PostgreSQL gets one multi-row insert; SQLite, where
/// diesel cannot batch an insert that skips conflicts, one insert per row in the same
/// transaction (local, so no round trips).
pub async fn insert_batch(db: &Db, rows: &[UsageRow]) -> Result<SpendWritten, DbError> {
    if rows.is_empty() {
        return Ok(SpendWritten::default());
    }
    let mut batch_cost: BTreeMap<&str, i64> = BTreeMap::new();
    for row in rows {
        *batch_cost.entry(row.user_id.as_str()).or_default() += row.cost_nanos;
    }
    let user_ids: Vec<String> = batch_cost.keys().map(|u| u.to_string()).collect();
    let user_ids = &user_ids;
    let totals = match db {
        Db::Pg(pool) => {
            let mut conn = pool.get().await?;
            conn.transaction::<_, DbError, _>(async |conn| {
                // The insert comes first, so the transaction takes its locks at once.
                let new_ids: Vec<String> = diesel::insert_into(usage_records::table)
                    .values(rows)
                    .on_conflict_do_nothing()
                    .returning(usage_records::request_id)
                    .get_results(conn)
                    .await?;
                add_spend!(conn, rows, new_ids, user_ids, ., await)
            })
            .await?
        }
        Db::Sqlite(pool) => {
            // Synchronous diesel on the blocking pool: it writes the batch as one multi-row
            // insert (diesel-async's SQLite wrapper cannot), under a write lock taken up front.
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

    use crate::db::models::UsageRow;
    use crate::db::schema::{usage_records, users};

    pub fn insert_batch(
        conn: &mut SqliteConnection,
        rows: &[UsageRow],
        user_ids: &[String],
    ) -> QueryResult<Vec<(String, i64)>> {
        conn.immediate_transaction(|conn| {
            // One prepared single-row insert, reused for every row: in process, that costs
            // less than parsing one statement of hundreds of rows per batch.
            let mut new_ids = Vec::with_capacity(rows.len());
            for row in rows {
                let inserted = diesel::insert_into(usage_records::table)
                    .values(row)
                    .on_conflict_do_nothing()
                    .execute(conn)?;
                if inserted == 1 {
                    new_ids.push(row.request_id.clone());
                }
            }
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

/// Sums of usage per group, ordered by the group key.
pub async fn summary(
    db: &Db,
    filter: &UsageFilter,
    group_by: GroupBy,
) -> Result<Vec<UsageGroup>, DbError> {
    // The key is an SQL expression; only the day's differs between the backends.
    let key = match (group_by, db) {
        (GroupBy::Model, _) => "model",
        (GroupBy::User, _) => "user_id",
        (GroupBy::Day, Db::Pg(_)) => "to_char(ts, 'YYYY-MM-DD')",
        (GroupBy::Day, Db::Sqlite(_)) => "strftime('%Y-%m-%d', ts)",
    };
    let total =
        |column: &str| sql::<BigInt>(&format!("CAST(COALESCE(SUM({column}), 0) AS BIGINT)"));
    with_conn!(db, |conn| {
        let mut query = usage_records::table
            .group_by(sql::<Text>(key))
            .select((
                sql::<Text>(key),
                sql::<BigInt>("CAST(COUNT(*) AS BIGINT)"),
                total("prompt_tokens"),
                total("completion_tokens"),
                total("reasoning_tokens"),
                total("cached_tokens"),
                total("cost_nanos"),
            ))
            .order(sql::<Text>(key))
            .into_boxed();
        if let Some(user) = &filter.user_id {
            query = query.filter(usage_records::user_id.eq(user.clone()));
        }
        if let Some(since) = filter.since {
            query = query.filter(usage_records::ts.ge(since));
        }
        if let Some(until) = filter.until {
            query = query.filter(usage_records::ts.lt(until));
        }
        Ok(query.load::<UsageGroup>(conn).await?)
    })
}

/// Every usage row of a request, if it was metered (tests and support).
pub async fn get(db: &Db, request_id: &str) -> Result<UsageRow, DbError> {
    with_conn!(db, |conn| {
        Ok(usage_records::table
            .find(request_id)
            .select(UsageRow::as_select())
            .first(conn)
            .await?)
    })
}
