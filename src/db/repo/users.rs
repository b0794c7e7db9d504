//! The `users` table.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{split_page, Page};
use crate::db::models::{UserRow, UserRulesChange};
use crate::db::schema::users;
use crate::db::{Db, DbError};
use crate::domain::User;
use crate::with_conn;

/// Stores a new user; a taken name is [`DbError::Conflict`].
pub async fn insert(db: &Db, user: &User) -> Result<(), DbError> {
    let row = UserRow::from(user);
    with_conn!(db, |conn| {
        diesel::insert_into(users::table)
            .values(&row)
            .execute(conn)
            .await?;
        Ok(())
    })
}

/// One user by id.
pub async fn get(db: &Db, id: &str) -> Result<User, DbError> {
    let row: UserRow = with_conn!(db, |conn| {
        users::table
            .find(id)
            .select(UserRow::as_select())
            .first(conn)
            .await?
    });
    row.try_into()
}

/// Users in creation order.
pub async fn list(db: &Db, page: Page) -> Result<(Vec<User>, bool), DbError> {
    let rows: Vec<UserRow> = with_conn!(db, |conn| {
        users::table
            .order(users::id)
            .limit(page.limit + 1)
            .offset(page.offset)
            .select(UserRow::as_select())
            .load(conn)
            .await?
    });
    let (rows, more) = split_page(rows, page);
    let users = rows
        .into_iter()
        .map(User::try_from)
        .collect::<Result<_, _>>()?;
    Ok((users, more))
}

/// Writes an admin's change of `user`'s rules (never its spend), if the stored user is still
/// the version stamped `seen`; says whether it was (a user deleted meanwhile is not either).
pub async fn update_rules(db: &Db, user: &User, seen: NaiveDateTime) -> Result<bool, DbError> {
    let change = UserRulesChange::from(user);
    let updated = with_conn!(db, |conn| {
        diesel::update(
            users::table
                .find(&user.id)
                .filter(users::updated_at.eq(seen)),
        )
        .set(&change)
        .execute(conn)
        .await?
    });
    Ok(updated > 0)
}

/// Deletes a user with their keys and mappings.
pub async fn delete(db: &Db, id: &str) -> Result<(), DbError> {
    let deleted = with_conn!(db, |conn| {
        diesel::delete(users::table.find(id)).execute(conn).await?
    });
    if deleted == 0 {
        return Err(DbError::NotFound);
    }
    Ok(())
}
