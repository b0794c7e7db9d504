//! One module per entity; every function runs on whichever backend is configured.

pub mod logs;
pub mod mappings;
pub mod meta;
pub mod prices;
pub mod upstream_keys;
pub mod usage;
pub mod user_keys;
pub mod users;

/// A window of a list: at most `limit` rows after skipping `offset`.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

/// Turns `limit + 1` fetched rows into the page and whether more follow.
pub fn split_page<T>(mut rows: Vec<T>, page: Page) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > page.limit;
    rows.truncate(page.limit as usize);
    (rows, more)
}
