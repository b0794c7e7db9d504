//! The `user_keys` table.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::models::UserKeyRow;
use crate::db::schema::user_keys;
use crate::db::{Db, DbError};
use crate::domain::UserKey;
use crate::with_conn;

/// Stores a new key; an unknown user is [`DbError::MissingReference`].
pub async fn insert(db: &Db, key: &UserKey) -> Result<(), DbError> {
    let row = UserKeyRow::from(key);
    with_conn!(db, |conn| {
        diesel::insert_into(user_keys::table)
            .values(&row)
            .execute(conn)
            .await?;
        Ok(())
    })
}

/// One key by id.
pub async fn get(db: &Db, id: &str) -> Result<UserKey, DbError> {
    let row: UserKeyRow = with_conn!(db, |conn| {
        user_keys::table
            .find(id)
            .select(UserKeyRow::as_select())
            .first(conn)
            .await?
    });
    Ok(row.into())
}

/// Every key of a user, oldest first.
pub async fn list_for_user(db: &Db, user_id: &str) -> Result<Vec<UserKey>, DbError> {
    let rows: Vec<UserKeyRow> = with_conn!(db, |conn| {
        user_keys::table
            .filter(user_keys::user_id.eq(user_id))
            .order(user_keys::created_at)
            .select(UserKeyRow::as_select())
            .load(conn)
            .await?
    });
    Ok(rows.into_iter().map(UserKey::from).collect())
}

/// Marks a key revoked at `when`, unless it already was; returns the key as it now stands.
pub async fn revoke(db: &Db, id: &str, when: NaiveDateTime) -> Result<UserKey, DbError> {
    with_conn!(db, |conn| {
        diesel::update(
            user_keys::table
                .find(id)
                .filter(user_keys::revoked_at.is_null()),
        )
        .set(user_keys::revoked_at.eq(when))
        .execute(conn)
        .await?;
    });
    get(db, id).await
}

/// Which of `ids` still name a key that is not revoked.
pub async fn live_ids(db: &Db, ids: &[String]) -> Result<Vec<String>, DbError> {
    with_conn!(db, |conn| {
        Ok(user_keys::table
            .filter(user_keys::id.eq_any(ids))
            .filter(user_keys::revoked_at.is_null())
            .select(user_keys::id)
            .load(conn)
            .await?)
    })
}
