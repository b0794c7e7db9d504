//! Switchyard: an LLM API router. See README.md and `../shared/API.md`.

pub mod access;
pub mod actors;
pub mod auth;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod db;
pub mod domain;
pub mod error;
pub mod limits;
pub mod log_sink;
pub mod metering;
pub mod pacing;
pub mod proxy;
pub mod routes;
pub mod routing;
pub mod sched;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod upstream;
