//! Talking to providers: the HTTP client and key validation probes.

pub mod client;
pub mod probe;
