//! Integration tests: the real application over HTTP, on SQLite and on PostgreSQL.

mod access;
mod admin_mappings_prices;
mod admin_upstream_keys;
mod admin_user_keys;
mod admin_users;
mod auth;
mod cluster;
mod fleet;
mod helpers;
mod metering;
mod mock_upstream;
mod native;
mod operations;
mod proxy;
mod sdks;
mod translated;
