//! In-process caches of verified keys and users' rules, so argon2 and the database are paid only
//! on a miss. Entries are dropped by the config-sync actor when an admin changes them.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::NaiveDateTime;
use lru::LruCache;
use parking_lot::Mutex;
use prometheus::IntCounter;
use serde::{Deserialize, Serialize};

use crate::access::rules::AccessRules;
use crate::domain::User;
use crate::metering::metrics::Metrics;

/// A user's record and its rules compiled for checking.
#[derive(Clone)]
pub struct CachedUser {
    pub user: Arc<User>,
    pub rules: Arc<AccessRules>,
}

impl CachedUser {
    /// Compiles the rules of a freshly read user.
    pub fn new(user: User) -> Self {
        let rules = Arc::new(AccessRules::compile(&user));
        CachedUser {
            user: Arc::new(user),
            rules,
        }
    }
}

/// What is remembered of a key whose secret was verified once.
#[derive(Clone, Serialize, Deserialize)]
pub struct VerifiedKey {
    /// SHA-256 of the verified secret: a presented secret matches when its digest does.
    pub secret_digest: [u8; 32],
    pub user_id: String,
    pub expires_at: Option<NaiveDateTime>,
    pub revoked_at: Option<NaiveDateTime>,
}

/// The two caches and a generation counter that keeps a slow loader from re-inserting an entry
/// that was invalidated while it was reading the database.
pub struct AuthCache {
    keys: Mutex<LruCache<String, VerifiedKey>>,
    users: Mutex<LruCache<String, CachedUser>>,
    generation: AtomicU64,
    /// Lookups answered and missed, for `/metrics`.
    pub stats: CacheStats,
}

/// Hits and misses of the two caches (Prometheus counters: one relaxed atomic add a lookup).
pub struct CacheStats {
    pub key_hits: IntCounter,
    pub key_misses: IntCounter,
    pub user_hits: IntCounter,
    pub user_misses: IntCounter,
}

impl CacheStats {
    /// Counters exported in `metrics`.
    pub fn exported(metrics: &Metrics) -> Self {
        CacheStats {
            key_hits: metrics.cache_counter("user_keys", "memory", true),
            key_misses: metrics.cache_counter("user_keys", "memory", false),
            user_hits: metrics.cache_counter("users", "memory", true),
            user_misses: metrics.cache_counter("users", "memory", false),
        }
    }
}

fn count<T>(found: Option<T>, hits: &IntCounter, misses: &IntCounter) -> Option<T> {
    if found.is_some() { hits } else { misses }.inc();
    found
}

/// A bounded LRU that grows with use: `LruCache::new` would allocate room for every entry up
/// front, tens of megabytes for a cache that may hold a handful of keys.
fn bounded<K: std::hash::Hash + Eq, V>(n: usize) -> LruCache<K, V> {
    let mut cache = LruCache::unbounded();
    cache.resize(NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN));
    cache
}

impl AuthCache {
    /// Empty caches holding at most the given numbers of keys and users.
    pub fn new(key_capacity: usize, user_capacity: usize, stats: CacheStats) -> Self {
        AuthCache {
            keys: Mutex::new(bounded(key_capacity)),
            users: Mutex::new(bounded(user_capacity)),
            generation: AtomicU64::new(0),
            stats,
        }
    }

    /// The current generation; pass it back to the `insert_*` calls after a database read.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The verified key with this record id.
    pub fn key(&self, key_id: &str) -> Option<VerifiedKey> {
        let found = self.keys.lock().get(key_id).cloned();
        count(found, &self.stats.key_hits, &self.stats.key_misses)
    }

    /// [`AuthCache::key`] without counting a lookup: a second look by a call that missed.
    pub fn key_again(&self, key_id: &str) -> Option<VerifiedKey> {
        self.keys.lock().get(key_id).cloned()
    }

    /// Remembers a verified key, unless something was invalidated since `generation`.
    pub fn insert_key(&self, key_id: String, key: VerifiedKey, generation: u64) {
        let mut keys = self.keys.lock();
        if self.generation() == generation {
            keys.put(key_id, key);
        }
    }

    /// The cached rules of a user.
    pub fn user(&self, user_id: &str) -> Option<CachedUser> {
        let found = self.users.lock().get(user_id).cloned();
        count(found, &self.stats.user_hits, &self.stats.user_misses)
    }

    /// Remembers a user's rules, unless something was invalidated since `generation`.
    pub fn insert_user(&self, user: CachedUser, generation: u64) {
        let mut users = self.users.lock();
        if self.generation() == generation {
            users.put(user.user.id.clone(), user);
        }
    }

    /// Forgets a key (revoked or deleted).
    pub fn invalidate_key(&self, key_id: &str) {
        let mut keys = self.keys.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        keys.pop(key_id);
    }

    /// Forgets a user's rules (changed, suspended or deleted).
    pub fn invalidate_user(&self, user_id: &str) {
        let mut users = self.users.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        users.pop(user_id);
    }

    /// Forgets every user's rules (after a missed announcement: any of them may have changed).
    pub fn invalidate_all_users(&self) {
        let mut users = self.users.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        users.clear();
    }

    /// The ids of the keys held now.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.lock().iter().map(|(id, _)| id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_within_its_bound() {
        let cache = AuthCache::new(2, 2, CacheStats::exported(&Metrics::new().unwrap()));
        for i in 0..5 {
            let key = VerifiedKey {
                secret_digest: [0; 32],
                user_id: "u".into(),
                expires_at: None,
                revoked_at: None,
            };
            cache.insert_key(format!("k{i}"), key, cache.generation());
        }
        assert!(cache.key("k4").is_some());
        assert!(cache.key("k0").is_none());
        assert_eq!(cache.keys.lock().len(), 2);
    }
}
