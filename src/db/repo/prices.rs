//! The `prices` table.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{split_page, Page};
use crate::db::models::PriceRow;
use crate::db::schema::prices;
use crate::db::{Db, DbError};
use crate::domain::Price;
use crate::with_conn;

/// Creates or replaces the price of `price.model`; says whether it was created.
///
/// Replace first, else create: each step alone is atomic, and whichever succeeds is what is
/// stored, even with a `DELETE` of the same price in between (a transaction would not stop that
/// under PostgreSQL's read committed). A create that loses to another one's is tried again.
pub async fn upsert(db: &Db, price: &Price) -> Result<bool, DbError> {
    let row = PriceRow::from(price);
    with_conn!(db, |conn| {
        for _ in 0..8 {
            let replaced = diesel::update(prices::table.find(&row.model))
                .set((
                    prices::input_per_mtok_nanos.eq(row.input_per_mtok_nanos),
                    prices::output_per_mtok_nanos.eq(row.output_per_mtok_nanos),
                    prices::cached_input_per_mtok_nanos.eq(row.cached_input_per_mtok_nanos),
                    prices::reasoning_per_mtok_nanos.eq(row.reasoning_per_mtok_nanos),
                    prices::per_image_nanos.eq(row.per_image_nanos),
                    prices::per_audio_second_nanos.eq(row.per_audio_second_nanos),
                    prices::updated_at.eq(row.updated_at),
                ))
                .execute(conn)
                .await?;
            if replaced > 0 {
                return Ok(false);
            }
            let created = diesel::insert_into(prices::table)
                .values(&row)
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
            if created > 0 {
                return Ok(true);
            }
        }
        Err(DbError::Conflict(format!(
            "the price of {} kept changing; try again",
            row.model
        )))
    })
}

/// Prices ordered by model name, a page at a time.
pub async fn list(db: &Db, page: Page) -> Result<(Vec<Price>, bool), DbError> {
    let rows: Vec<PriceRow> = with_conn!(db, |conn| {
        prices::table
            .order(prices::model)
            .limit(page.limit + 1)
            .offset(page.offset)
            .select(PriceRow::as_select())
            .load(conn)
            .await?
    });
    let (rows, more) = split_page(rows, page);
    Ok((rows.into_iter().map(Price::from).collect(), more))
}

/// Every price.
pub async fn all(db: &Db) -> Result<Vec<Price>, DbError> {
    let rows: Vec<PriceRow> = with_conn!(db, |conn| {
        prices::table
            .order(prices::model)
            .select(PriceRow::as_select())
            .load(conn)
            .await?
    });
    Ok(rows.into_iter().map(Price::from).collect())
}

/// Stores the prices of models that have none yet; set prices are left as they are. Returns
/// how many were added.
pub async fn insert_missing(db: &Db, prices: &[Price]) -> Result<usize, DbError> {
    let rows: Vec<PriceRow> = prices.iter().map(PriceRow::from).collect();
    // One row at a time (diesel cannot batch a conflict-skipping insert on SQLite); this runs
    // once at start, on a few dozen rows.
    with_conn!(db, |conn| {
        let mut added = 0;
        for row in &rows {
            added += diesel::insert_into(prices::table)
                .values(row)
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
        }
        Ok(added)
    })
}
