//! The `upstream_keys` table.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{split_page, Page};
use crate::db::models::UpstreamKeyRow;
use crate::db::schema::upstream_keys;
use crate::db::{Db, DbError};
use crate::domain::UpstreamKey;
use crate::with_conn;

/// Stores a new upstream key.
pub async fn insert(db: &Db, key: &UpstreamKey) -> Result<(), DbError> {
    let row = UpstreamKeyRow::from(key);
    with_conn!(db, |conn| {
        diesel::insert_into(upstream_keys::table)
            .values(&row)
            .execute(conn)
            .await?;
        Ok(())
    })
}

/// One key by id.
pub async fn get(db: &Db, id: &str) -> Result<UpstreamKey, DbError> {
    let row: UpstreamKeyRow = with_conn!(db, |conn| {
        upstream_keys::table
            .find(id)
            .select(UpstreamKeyRow::as_select())
            .first(conn)
            .await?
    });
    row.try_into()
}

/// Keys in creation order, a page at a time.
pub async fn list(db: &Db, page: Page) -> Result<(Vec<UpstreamKey>, bool), DbError> {
    let rows: Vec<UpstreamKeyRow> = with_conn!(db, |conn| {
        upstream_keys::table
            .order(upstream_keys::id)
            .limit(page.limit + 1)
            .offset(page.offset)
            .select(UpstreamKeyRow::as_select())
            .load(conn)
            .await?
    });
    let (rows, more) = split_page(rows, page);
    Ok((rows_to_keys(rows)?, more))
}

/// Every key (for the pools and for duplicate checks).
pub async fn all(db: &Db) -> Result<Vec<UpstreamKey>, DbError> {
    let rows: Vec<UpstreamKeyRow> = with_conn!(db, |conn| {
        upstream_keys::table
            .order(upstream_keys::id)
            .select(UpstreamKeyRow::as_select())
            .load(conn)
            .await?
    });
    rows_to_keys(rows)
}

fn rows_to_keys(rows: Vec<UpstreamKeyRow>) -> Result<Vec<UpstreamKey>, DbError> {
    rows.into_iter().map(UpstreamKey::try_from).collect()
}

/// Writes an admin's change: the admin-owned columns of `key`, and the health columns
/// (cooldown, disable) only when `reset_health` says so. Health set by the pools meanwhile is
/// otherwise kept. Written only if the stored key is still the version stamped `seen`; says
/// whether it was (a key deleted meanwhile is not either).
pub async fn update(
    db: &Db,
    key: &UpstreamKey,
    reset_health: bool,
    seen: NaiveDateTime,
) -> Result<bool, DbError> {
    let row = UpstreamKeyRow::from(key);
    let updated = with_conn!(db, |conn| {
        let target = upstream_keys::table
            .find(&key.id)
            .filter(upstream_keys::updated_at.eq(seen));
        let admin_columns = (
            upstream_keys::provider.eq(&row.provider),
            upstream_keys::base_url.eq(&row.base_url),
            upstream_keys::secret_enc.eq(&row.secret_enc),
            upstream_keys::secret_hint.eq(&row.secret_hint),
            upstream_keys::level.eq(row.level),
            upstream_keys::models.eq(&row.models),
            upstream_keys::weight.eq(row.weight),
            upstream_keys::enabled.eq(row.enabled),
            upstream_keys::updated_at.eq(row.updated_at),
        );
        if reset_health {
            diesel::update(target)
                .set((
                    admin_columns,
                    upstream_keys::cooldown_until.eq(None::<NaiveDateTime>),
                    upstream_keys::disabled_at.eq(None::<NaiveDateTime>),
                    upstream_keys::disabled_reason.eq(None::<String>),
                ))
                .execute(conn)
                .await?
        } else {
            diesel::update(target)
                .set(admin_columns)
                .execute(conn)
                .await?
        }
    });
    Ok(updated > 0)
}

/// Lifts a provider's refusal of `id` (and any cooldown), as a new version of the key so that
/// every pool starts it afresh; only if the key is still the version stamped `seen`, still
/// enabled and still refused. Says whether it was.
pub async fn clear_rejection(db: &Db, id: &str, seen: NaiveDateTime) -> Result<bool, DbError> {
    let stamp = crate::domain::next_stamp(seen);
    let updated = with_conn!(db, |conn| {
        diesel::update(
            upstream_keys::table
                .find(id)
                .filter(upstream_keys::updated_at.eq(seen))
                .filter(upstream_keys::enabled.eq(true))
                .filter(upstream_keys::disabled_at.is_not_null()),
        )
        .set((
            upstream_keys::disabled_at.eq(None::<NaiveDateTime>),
            upstream_keys::disabled_reason.eq(None::<String>),
            upstream_keys::cooldown_until.eq(None::<NaiveDateTime>),
            upstream_keys::updated_at.eq(stamp),
        ))
        .execute(conn)
        .await?
    });
    Ok(updated > 0)
}

/// Deletes a key.
pub async fn delete(db: &Db, id: &str) -> Result<(), DbError> {
    let deleted = with_conn!(db, |conn| {
        diesel::delete(upstream_keys::table.find(id))
            .execute(conn)
            .await?
    });
    if deleted == 0 {
        return Err(DbError::NotFound);
    }
    Ok(())
}

/// Records that a key rests until `until` after a 429.
pub async fn set_cooldown(db: &Db, id: &str, until: NaiveDateTime) -> Result<(), DbError> {
    with_conn!(db, |conn| {
        diesel::update(upstream_keys::table.find(id))
            .set(upstream_keys::cooldown_until.eq(until))
            .execute(conn)
            .await?;
        Ok(())
    })
}

/// Records that the provider refused a key, disabling it until an admin re-enables it.
pub async fn set_rejected(db: &Db, id: &str, reason: &str) -> Result<(), DbError> {
    let now = crate::domain::now();
    with_conn!(db, |conn| {
        diesel::update(upstream_keys::table.find(id))
            .set((
                upstream_keys::disabled_at.eq(now),
                upstream_keys::disabled_reason.eq(reason),
            ))
            .execute(conn)
            .await?;
        Ok(())
    })
}
