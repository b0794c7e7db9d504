//! The `model_mappings` table.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{split_page, Page};
use crate::db::models::ModelMappingRow;
use crate::db::schema::model_mappings;
use crate::db::{Db, DbError};
use crate::domain::ModelMapping;
use crate::with_conn;

/// Stores a new mapping; an unknown user is [`DbError::MissingReference`].
pub async fn insert(db: &Db, mapping: &ModelMapping) -> Result<(), DbError> {
    let row = ModelMappingRow::from(mapping);
    with_conn!(db, |conn| {
        diesel::insert_into(model_mappings::table)
            .values(&row)
            .execute(conn)
            .await?;
        Ok(())
    })
}

/// Mappings in creation order, a page at a time.
pub async fn list(db: &Db, page: Page) -> Result<(Vec<ModelMapping>, bool), DbError> {
    let rows: Vec<ModelMappingRow> = with_conn!(db, |conn| {
        model_mappings::table
            .order(model_mappings::id)
            .limit(page.limit + 1)
            .offset(page.offset)
            .select(ModelMappingRow::as_select())
            .load(conn)
            .await?
    });
    let (rows, more) = split_page(rows, page);
    Ok((rows.into_iter().map(ModelMapping::from).collect(), more))
}

/// Every mapping, for routing.
pub async fn all(db: &Db) -> Result<Vec<ModelMapping>, DbError> {
    let rows: Vec<ModelMappingRow> = with_conn!(db, |conn| {
        model_mappings::table
            .order(model_mappings::id)
            .select(ModelMappingRow::as_select())
            .load(conn)
            .await?
    });
    Ok(rows.into_iter().map(ModelMapping::from).collect())
}

/// Deletes a mapping.
pub async fn delete(db: &Db, id: &str) -> Result<(), DbError> {
    let deleted = with_conn!(db, |conn| {
        diesel::delete(model_mappings::table.find(id))
            .execute(conn)
            .await?
    });
    if deleted == 0 {
        return Err(DbError::NotFound);
    }
    Ok(())
}
