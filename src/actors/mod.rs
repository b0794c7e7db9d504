//! Actors, each the only owner of one concern's mutable state.

pub mod config_sync;
pub mod key_pool;
pub mod key_prober;
pub mod rate_limiter;
