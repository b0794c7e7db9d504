//! What makes replicas act as one router: the Redis channel on which they announce admin
//! changes and upstream keys' health to each other.

pub mod bus;
