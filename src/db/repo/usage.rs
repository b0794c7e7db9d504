//! Calls' usage: written with their request-log entries (one row per call) together with the
//! spend it adds to `users`, and summed from those entries and from `usage_daily` (what
//! outlived the log's retention).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::NaiveDateTime;
use diesel::dsl::sql;
use diesel::expression::SqlLiteral;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

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

/// Each metered row's user and cost.
fn metered_costs<'a>(
    rows: impl Iterator<Item = &'a LogRow>,
) -> impl Iterator<Item = (&'a str, i64)> {
    rows.filter(|r| r.metered)
        .filter_map(|r| Some((r.user_id.as_deref()?, r.cost_nanos)))
}

/// A batch that could not be written, handed back to be tried again.
pub type Unwritten = (DbError, Vec<LogRow>);

/// Writes a batch of calls (their log entries, usage included) and adds their cost to their
/// users' spend, in one transaction. Calls already stored (same request id, from a retried
/// batch) are skipped and not counted again, so a batch can be retried safely. PostgreSQL gets
/// one multi-row insert; SQLite, in process, one prepared insert per row on metering's own
/// connection (`SqliteWriter`).
pub async fn insert_batch(db: &Db, rows: Vec<LogRow>) -> Result<SpendWritten, Unwritten> {
    if rows.is_empty() {
        return Ok(SpendWritten::default());
    }
    let mut batch_cost: BTreeMap<&str, i64> = BTreeMap::new();
    for (user, cost) in metered_costs(rows.iter()) {
        *batch_cost.entry(user).or_default() += cost;
    }
    // Owned, since the rows move into the write.
    let batch_cost: BTreeMap<String, i64> = batch_cost
        .into_iter()
        .map(|(user, cost)| (user.to_owned(), cost))
        .collect();
    let user_ids: Vec<String> = batch_cost.keys().cloned().collect();
    let totals = match db {
        Db::Pg(pool) => match insert_pg(pool, &rows, &user_ids).await {
            Ok(totals) => totals,
            Err(e) => return Err((e, rows)),
        },
        Db::Sqlite(_, writer) => {
            // Shared with the blocking thread, and taken back whole if the write fails.
            let rows = Arc::new(rows);
            let written = {
                let (rows, user_ids) = (rows.clone(), user_ids.clone());
                writer
                    .run(move |conn| sqlite::insert_batch(conn, &rows, &user_ids))
                    .await
            };
            match written {
                Ok(totals) => totals,
                Err(e) => {
                    let rows = Arc::try_unwrap(rows).unwrap_or_else(|rows| (*rows).clone());
                    return Err((e, rows));
                }
            }
        }
    };
    let totals: BTreeMap<String, i64> = totals.into_iter().collect();
    Ok(SpendWritten {
        users: batch_cost
            .into_iter()
            // A user deleted since the call has no total to report.
            .filter_map(|(u, cost)| totals.get(&u).map(|t| (u, cost, *t)))
            .collect(),
    })
}

/// Rows in one PostgreSQL insert: well inside the protocol's 65,535 bound values.
const PG_ROWS_PER_INSERT: usize = 1000;

async fn insert_pg(
    pool: &Pool<AsyncPgConnection>,
    rows: &[LogRow],
    user_ids: &[String],
) -> Result<Vec<(String, i64)>, DbError> {
    let mut conn = pool.get().await?;
    conn.transaction::<_, DbError, _>(async |conn| {
        // The insert comes first, so the transaction takes its locks at once. A statement
        // binds at most 65,535 values (24 a row), so a large batch goes in several.
        let mut new_ids: HashSet<String> = HashSet::with_capacity(rows.len());
        for chunk in rows.chunks(PG_ROWS_PER_INSERT) {
            new_ids.extend(
                diesel::insert_into(request_logs::table)
                    .values(chunk)
                    .on_conflict_do_nothing()
                    .returning(request_logs::id)
                    .get_results::<String>(conn)
                    .await?,
            );
        }
        for (user, nanos) in added_spend(rows, |id| new_ids.contains(id)) {
            diesel::update(users::table.find(user))
                .set(users::spent_nanos.eq(users::spent_nanos + nanos))
                .execute(conn)
                .await?;
        }
        Ok(users::table
            .filter(users::id.eq_any(user_ids))
            .select((users::id, users::spent_nanos))
            .load(conn)
            .await?)
    })
    .await
}

/// The spend the rows just stored add, per user (users whose new rows cost nothing left out).
fn added_spend(rows: &[LogRow], is_new: impl Fn(&str) -> bool) -> BTreeMap<&str, i64> {
    let mut added: BTreeMap<&str, i64> = BTreeMap::new();
    for (user, cost) in metered_costs(rows.iter().filter(|r| is_new(&r.id))) {
        *added.entry(user).or_default() += cost;
    }
    added.retain(|_, nanos| *nanos != 0);
    added
}

/// The SQLite side of [`insert_batch`], in plain SQL on metering's own connection.
mod sqlite {
    use std::collections::HashSet;
    use std::fmt::Write;

    use chrono::{Datelike, NaiveDateTime, Timelike};
    use rusqlite::{params, Connection, TransactionBehavior};

    use super::added_spend;
    use crate::db::models::LogRow;
    use crate::pacing::Slice;

    pub(super) const INSERT: &str =
        "INSERT OR IGNORE INTO request_logs (id, ts, user_id, key_id, route, \
        model, upstream_model, upstream_key_id, level, status, attempts, latency_ms, ttfb_ms, \
        prompt_tokens, completion_tokens, cost_nanos, partial, error_code, metered, \
        reasoning_tokens, cached_tokens, images, audio_seconds, characters) \
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
        ?18, ?19, ?20, ?21, ?22, ?23, ?24)";
    const ADD_SPEND: &str = "UPDATE users SET spent_nanos = spent_nanos + ?2 WHERE id = ?1";
    const SPENT: &str = "SELECT spent_nanos FROM users WHERE id = ?1";

    pub fn insert_batch(
        conn: &mut Connection,
        rows: &[LogRow],
        user_ids: &[String],
    ) -> rusqlite::Result<Vec<(String, i64)>> {
        // The write lock is taken up front, so the batch never fails half way for want of it.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut new_ids = HashSet::with_capacity(rows.len());
        // Between rows, and before the spend and the commit, the thread steps aside when its
        // slice is spent: this runs on the router's own cores (see `pacing`).
        let mut slice = Slice::start();
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            let mut ts = String::with_capacity(32);
            for row in rows {
                slice.step_aside_if_spent();
                ts.clear();
                write_timestamp(&mut ts, &row.ts);
                // `INSERT OR IGNORE` keeps a stored row (a retried batch): it changes nothing.
                let inserted = insert.execute(params![
                    row.id,
                    ts,
                    row.user_id,
                    row.key_id,
                    row.route,
                    row.model,
                    row.upstream_model,
                    row.upstream_key_id,
                    row.level,
                    row.status,
                    row.attempts,
                    row.latency_ms,
                    row.ttfb_ms,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.cost_nanos,
                    row.partial,
                    row.error_code,
                    row.metered,
                    row.reasoning_tokens,
                    row.cached_tokens,
                    row.images,
                    row.audio_seconds,
                    row.characters,
                ])?;
                if inserted == 1 {
                    new_ids.insert(row.id.as_str());
                }
            }
        }
        slice.step_aside_if_spent();
        {
            let mut add = tx.prepare_cached(ADD_SPEND)?;
            for (user, nanos) in added_spend(rows, |id| new_ids.contains(id)) {
                add.execute(params![user, nanos])?;
            }
        }
        let mut totals = Vec::with_capacity(user_ids.len());
        {
            let mut spent = tx.prepare_cached(SPENT)?;
            for user in user_ids {
                let mut found = spent.query(params![user])?;
                // A user deleted since the call has no row, and no total.
                if let Some(row) = found.next()? {
                    totals.push((user.clone(), row.get(0)?));
                }
            }
        }
        tx.commit()?;
        Ok(totals)
    }

    /// Writes `ts` as diesel writes a timestamp to SQLite (chrono's `%F %T%.f`: the fraction
    /// left out when zero, else in 3, 6 or 9 digits), so that both read it back alike and
    /// their text sorts alike. By hand: chrono's formatter cost a tenth of the write.
    pub(super) fn write_timestamp(out: &mut String, ts: &NaiveDateTime) {
        let year = ts.year();
        if !(0..=9999).contains(&year) {
            write!(out, "{}", ts.format("%F %T%.f")).expect("formatting to a String");
            return;
        }
        // A leap second is kept in the nanoseconds (1_000_000_000 and up), and shown as :60.
        let (second, nanos) = match ts.nanosecond() {
            n if n >= 1_000_000_000 => (ts.second() + 1, n - 1_000_000_000),
            n => (ts.second(), n),
        };
        let digits = |out: &mut String, value: u32, width: u32| {
            for place in (0..width).rev() {
                out.push(char::from(b'0' + (value / 10u32.pow(place) % 10) as u8));
            }
        };
        digits(out, year as u32, 4);
        out.push('-');
        digits(out, ts.month(), 2);
        out.push('-');
        digits(out, ts.day(), 2);
        out.push(' ');
        digits(out, ts.hour(), 2);
        out.push(':');
        digits(out, ts.minute(), 2);
        out.push(':');
        digits(out, second, 2);
        if nanos != 0 {
            out.push('.');
            match nanos {
                n if n % 1_000_000 == 0 => digits(out, n / 1_000_000, 3),
                n if n % 1_000 == 0 => digits(out, n / 1_000, 6),
                n => digits(out, n, 9),
            }
        }
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
        (GroupBy::Day, Db::Sqlite(..)) => "strftime('%Y-%m-%d', ts)",
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

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, NaiveDateTime};

    use super::sqlite::{write_timestamp, INSERT};

    #[test]
    fn timestamps_are_written_as_diesel_writes_them() {
        let at = |y, nanos| -> NaiveDateTime {
            NaiveDate::from_ymd_opt(y, 3, 7)
                .unwrap()
                .and_hms_nano_opt(4, 5, 59, nanos)
                .unwrap()
        };
        for ts in [
            at(2026, 0),
            at(2026, 120_000_000),
            at(2026, 123_456_000),
            at(2026, 123_456_789),
            at(2026, 7),
            at(2026, 1_000_000_000),
            at(2026, 1_250_000_000),
            at(987, 5_000),
            at(10_000, 0),
            at(-3, 1),
        ] {
            let mut written = String::new();
            write_timestamp(&mut written, &ts);
            assert_eq!(written, ts.format("%F %T%.f").to_string());
        }
    }

    /// The SQLite insert is written by hand: a column added to the table must be added to it.
    #[test]
    fn the_sqlite_insert_writes_every_column_of_the_log() {
        use diesel::prelude::*;
        use diesel::sqlite::Sqlite;

        use crate::db::schema::request_logs;
        let select = request_logs::table.select(request_logs::all_columns);
        let select = diesel::debug_query::<Sqlite, _>(&select).to_string();
        let table: Vec<&str> = select
            .split("`request_logs`.`")
            .skip(1)
            .map(|column| column.split('`').next().unwrap())
            .collect();
        let listed = INSERT
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(')'))
            .unwrap()
            .0;
        let inserted: Vec<&str> = listed.split(',').map(str::trim).collect();
        assert_eq!(inserted, table);
        let placeholders = INSERT.rsplit_once("VALUES").unwrap().1.matches('?').count();
        assert_eq!(placeholders, table.len());
    }
}
