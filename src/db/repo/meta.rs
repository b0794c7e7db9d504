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

/// The `meta` entry holding the configuration version.
const CONFIG_VERSION: &str = "config_version";

/// The configuration version: how many admin changes were stored (0 before the first).
pub async fn config_version(db: &Db) -> Result<i64, DbError> {
    Ok(get(db, CONFIG_VERSION)
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Counts one more admin change and returns the new version. Atomic on both backends, so
/// replicas changing things at once each get their own version.
pub async fn bump_config_version(db: &Db) -> Result<i64, DbError> {
    #[derive(QueryableByName)]
    struct Version {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    // One statement both dialects accept: an upsert that adds one to the stored text.
    const BUMP: &str = "INSERT INTO meta (key, value) VALUES ('config_version', '1') \
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT) \
         RETURNING value";
    let row: Version = with_conn!(db, |conn| {
        diesel::sql_query(BUMP).get_result(conn).await?
    });
    row.value
        .parse()
        .map_err(|e| DbError::Query(diesel::result::Error::DeserializationError(Box::new(e))))
}
