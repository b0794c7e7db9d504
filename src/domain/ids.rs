//! Record ids: a short type prefix and a time-ordered UUID, so ids sort by creation.

/// A new id such as `usr_0193...`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
