//! The `meta` table: small facts about the installation.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::schema::meta;
use crate::db::{Db, DbError};
use crate::with_conn;

/// The value stored under `key`, if any.
pub async fn get(db: &Db, key: &str) -> Result<Option<String>, DbError> {
    with_conn!(db, |conn| {
        Ok(meta::table
            .find(key)
            .select(meta::value)
            .first(conn)
            .await
            .optional()?)
    })
}

/// Stores `value` under `key` only if nothing is there yet; true when this call stored it.
/// Replicas racing on first start agree on one winner this way.
pub async fn insert_if_absent(db: &Db, key: &str, value: &str) -> Result<bool, DbError> {
    with_conn!(db, |conn| {
        let inserted = diesel::insert_into(meta::table)
            .values((meta::key.eq(key), meta::value.eq(value)))
            .on_conflict_do_nothing()
            .execute(conn)
            .await?;
        Ok(inserted == 1)
    })
}
