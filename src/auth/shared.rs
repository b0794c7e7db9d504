//! The Redis layer of the auth caches, between each replica's LRU and the database: a key one
//! replica verified with argon2 is trusted by the others without paying argon2 again, and a
//! user's rules are read once per fleet rather than once per replica.
//!
//! Entries are signed with a key derived from the master key: whoever can write to Redis still
//! cannot plant a key or rules a replica would believe. An admin change replaces the entry with
//! a short-lived tombstone before it is announced, and entries are only written where nothing
//! is, so a replica that read the database just before the change cannot put the old record
//! back while the tombstone stands.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;

use super::cache::VerifiedKey;
use crate::crypto::MasterKey;
use crate::domain::User;
use crate::limits::redis_store::{manager_config, query_retrying_once};
use crate::metering::metrics::Metrics;

/// How long a tombstone keeps stale writers out after an admin change.
const TOMBSTONE: Duration = Duration::from_secs(2);
const TOMBSTONE_VALUE: &str = "-";
/// After a failed command, Redis is skipped for this long: a miss then costs the database read
/// alone instead of a Redis timeout as well.
const BACKOFF_MS: i64 = 1_000;
/// How long the key that created a stored response is remembered in Redis. The pairing never
/// goes stale (a response stays in its project), so it is not bound by the auth entries' ttl: a
/// conversation picked up a day later on another replica still reaches its key. A day of ids
/// at a few hundred bytes each.
const RESPONSE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Length of the signature (HMAC-SHA-256) that opens every entry.
const TAG_LEN: usize = 32;

/// What a layer of the cache holds.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Key,
    User,
    /// The upstream key that created a stored response (`/v1/responses`).
    Response,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Key => "key",
            Kind::User => "user",
            Kind::Response => "response",
        }
    }
}

struct LayerStats {
    hits: IntCounter,
    misses: IntCounter,
}

/// The shared layer, or nothing without Redis.
pub struct SharedCache {
    inner: Option<Inner>,
}

struct Inner {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    signer: MasterKey,
    /// Unix ms before which Redis is not asked (after a failure).
    skip_until_ms: AtomicI64,
    keys: LayerStats,
    users: LayerStats,
    responses: LayerStats,
}

impl SharedCache {
    /// A layer on `redis_url` (none when empty), signing with `signer`.
    pub fn new(
        redis_url: &str,
        prefix: &str,
        ttl: Duration,
        timeout: Duration,
        signer: MasterKey,
        metrics: &Metrics,
    ) -> anyhow::Result<Arc<Self>> {
        if redis_url.is_empty() {
            return Ok(Arc::new(SharedCache { inner: None }));
        }
        let client = redis::Client::open(redis_url)
            .map_err(|e| anyhow::anyhow!("redis.url is not a valid Redis URL: {}", e.category()))?;
        let stats = |cache| LayerStats {
            hits: metrics.cache_counter(cache, "redis", true),
            misses: metrics.cache_counter(cache, "redis", false),
        };
        Ok(Arc::new(SharedCache {
            inner: Some(Inner {
                client,
                connection: OnceCell::new(),
                prefix: prefix.to_owned(),
                ttl,
                timeout,
                signer,
                skip_until_ms: AtomicI64::new(0),
                keys: stats("user_keys"),
                users: stats("users"),
                responses: stats("response_keys"),
            }),
        }))
    }

    /// Connects now, so the connection's driver runs on the calling thread (call it from the
    /// actix system's). A Redis that is away is tried again on use.
    pub async fn connect(&self) {
        if let Some(inner) = &self.inner {
            if let Err(err) = inner.connection().await {
                inner.failed(&err);
            }
        }
    }

    /// The verified key `key_id`, if a replica stored it.
    pub async fn key(&self, key_id: &str) -> Option<VerifiedKey> {
        self.get(Kind::Key, key_id).await
    }

    /// Shares a key this replica verified (in the background).
    pub fn remember_key(self: &Arc<Self>, key_id: &str, key: &VerifiedKey) {
        self.put(Kind::Key, key_id, key);
    }

    /// The user `user_id`, if a replica stored it.
    pub async fn user(&self, user_id: &str) -> Option<User> {
        self.get(Kind::User, user_id).await
    }

    /// Shares a user this replica read (in the background).
    pub fn remember_user(self: &Arc<Self>, user: &User) {
        self.put(Kind::User, &user.id, user);
    }

    /// The upstream key that created the stored response `response_id`, if a replica shared it.
    pub async fn response_key(&self, response_id: &str) -> Option<String> {
        self.get(Kind::Response, response_id).await
    }

    /// Shares which upstream key created a stored response (in the background).
    pub fn remember_response_key(self: &Arc<Self>, response_id: &str, key_id: &str) {
        self.put(Kind::Response, response_id, &key_id);
    }

    /// How long an entry lives: the longest a stale one could be read.
    pub fn ttl(&self) -> Duration {
        self.inner
            .as_ref()
            .map_or(Duration::ZERO, |inner| inner.ttl)
    }

    /// Replaces the entry with a tombstone: no replica reads it, and none can write the old
    /// record back for a few seconds. Awaited by the admin change before it is announced.
    /// Says whether the entry is gone (or there is no shared layer); when Redis could not be
    /// reached the entry may still be there, for other replicas to read.
    pub async fn forget(&self, kind: Kind, id: &str) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let key = inner.key(kind, id);
        let command = redis::cmd("SET")
            .arg(&key)
            .arg(TOMBSTONE_VALUE)
            .arg("PX")
            .arg(TOMBSTONE.as_millis() as u64)
            .to_owned();
        // Always tried, even while backing off, and tried twice: a stale shared entry is worse
        // than a slow admin call.
        let outcome = match inner.connection().await {
            Ok(mut connection) => query_retrying_once::<()>(&command, &mut connection).await,
            Err(err) => Err(err),
        };
        match outcome {
            Ok(()) => true,
            Err(err) => {
                inner.failed(&err);
                tracing::warn!(
                    error = %crate::limits::describe(&err),
                    kind = kind.name(),
                    "could not drop a shared cache entry; trying again until it is gone or expired"
                );
                false
            }
        }
    }

    async fn get<T: DeserializeOwned>(&self, kind: Kind, id: &str) -> Option<T> {
        let inner = self.inner.as_ref()?;
        if inner.backing_off() {
            return None;
        }
        let stats = match kind {
            Kind::Key => &inner.keys,
            Kind::User => &inner.users,
            Kind::Response => &inner.responses,
        };
        let command = redis::cmd("GET").arg(inner.key(kind, id)).to_owned();
        let found = match inner.run::<Option<Vec<u8>>>(command).await {
            Ok(found) => found.and_then(|raw| inner.open(kind, id, &raw)),
            Err(err) => {
                inner.failed(&err);
                None
            }
        };
        if found.is_some() {
            &stats.hits
        } else {
            &stats.misses
        }
        .inc();
        found
    }

    fn put<T: Serialize>(self: &Arc<Self>, kind: Kind, id: &str, value: &T) {
        let Some(inner) = &self.inner else { return };
        if inner.backing_off() {
            return;
        }
        let entry = inner.seal(kind, id, value);
        let ttl = match kind {
            Kind::Key | Kind::User => inner.ttl,
            Kind::Response => RESPONSE_TTL,
        };
        let command = redis::cmd("SET")
            .arg(inner.key(kind, id))
            .arg(entry)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .to_owned();
        let this = self.clone();
        actix::spawn(async move {
            let Some(inner) = &this.inner else { return };
            if let Err(err) = inner.run::<Option<String>>(command).await {
                inner.failed(&err);
            }
        });
    }
}

impl Inner {
    fn key(&self, kind: Kind, id: &str) -> String {
        format!("{}auth:{}:{}", self.prefix, kind.name(), id)
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        self.connection
            .get_or_try_init(|| {
                self.client
                    .get_connection_manager_with_config(manager_config(self.timeout))
            })
            .await
            .cloned()
    }

    async fn run<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> redis::RedisResult<T> {
        let mut connection = self.connection().await?;
        command.query_async(&mut connection).await
    }

    fn backing_off(&self) -> bool {
        now_ms() < self.skip_until_ms.load(Ordering::Relaxed)
    }

    fn failed(&self, err: &redis::RedisError) {
        tracing::debug!(error = %crate::limits::describe(err), "shared cache unavailable");
        self.skip_until_ms
            .store(now_ms() + BACKOFF_MS, Ordering::Relaxed);
    }

    /// The signed data covers the entry's kind and id, so an entry cannot be moved to another.
    fn signed_data(kind: Kind, id: &str, body: &[u8]) -> Vec<u8> {
        let mut data = Vec::with_capacity(id.len() + body.len() + 8);
        data.extend_from_slice(kind.name().as_bytes());
        data.push(0);
        data.extend_from_slice(id.as_bytes());
        data.push(0);
        data.extend_from_slice(body);
        data
    }

    /// `tag ‖ json`.
    fn seal<T: Serialize>(&self, kind: Kind, id: &str, value: &T) -> Vec<u8> {
        let body = serde_json::to_vec(value).expect("cache entries serialize");
        let tag = self.signer.sign(&Self::signed_data(kind, id, &body));
        let mut entry = tag.to_vec();
        entry.extend_from_slice(&body);
        entry
    }

    fn open<T: DeserializeOwned>(&self, kind: Kind, id: &str, raw: &[u8]) -> Option<T> {
        if raw == TOMBSTONE_VALUE.as_bytes() || raw.len() < TAG_LEN {
            return None;
        }
        let (tag, body) = raw.split_at(TAG_LEN);
        if !self.signer.verify(&Self::signed_data(kind, id, body), tag) {
            tracing::warn!(
                kind = kind.name(),
                "ignored a shared cache entry with a bad signature (another master key, or forged)"
            );
            return None;
        }
        serde_json::from_slice(body).ok()
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
