//! Who is calling: the key from wherever the client's SDK put it, checked against the replica's
//! cache, then the cache shared by replicas in Redis, then the database and argon2.

pub mod cache;
pub mod shared;

use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use futures_util::future::LocalBoxFuture;
use subtle::ConstantTimeEq;
use tracing_actix_web::RootSpan;

use crate::access::rules::AccessRules;
use crate::access::{self, Gate};
use crate::crypto;
use crate::db::{repo, Db, DbError};
use crate::domain::api_key::PresentedKey;
use crate::domain::{User, UserKey};
use crate::error::ApiError;
use cache::VerifiedKey;
pub use cache::{AuthCache, CachedUser};
pub use shared::SharedCache;

/// An authenticated caller: the key used and the rules of its user.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub user: Arc<User>,
    /// The user's rules, compiled.
    pub rules: Arc<AccessRules>,
}

/// Checks presented keys. Shared by every worker.
pub struct Authenticator {
    db: Db,
    cache: Arc<AuthCache>,
    shared: Arc<SharedCache>,
    /// Bounds concurrent argon2 runs: each takes ~19 MiB and a core for tens of milliseconds,
    /// so a burst of cache misses (a cold start, a flood of forged keys) queues instead of
    /// exhausting memory and CPU.
    argon2_permits: tokio::sync::Semaphore,
}

/// Concurrent argon2 verifications allowed.
const ARGON2_CONCURRENCY: usize = 2;

/// Finds the key in `Authorization: Bearer`, `x-api-key`, `x-goog-api-key` or `?key=`.
pub fn key_from_request(headers: &HeaderMap, query: &str) -> Option<String> {
    // Looked up by `HeaderName`: a `&str` name is parsed and validated on every lookup.
    static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
    static X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
    let header = |name: &HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    if let Some(auth) = header(&AUTHORIZATION) {
        let mut parts = auth.splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next()) {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some(token.trim().to_owned());
            }
        }
    }
    if let Some(key) = header(&X_API_KEY).or_else(|| header(&X_GOOG_API_KEY)) {
        return Some(key.to_owned());
    }
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "key")
        .map(|(_, value)| value.into_owned())
}

impl Authenticator {
    /// An authenticator over `db`, remembering verified keys in `cache` and `shared`.
    pub fn new(db: Db, cache: Arc<AuthCache>, shared: Arc<SharedCache>) -> Self {
        Authenticator {
            db,
            cache,
            shared,
            argon2_permits: tokio::sync::Semaphore::new(ARGON2_CONCURRENCY),
        }
    }

    /// Resolves a presented key to its principal, or the error the client must see.
    pub async fn authenticate(&self, text: &str) -> Result<Principal, ApiError> {
        let invalid = || ApiError::invalid_api_key("invalid API key");
        let presented = PresentedKey::parse(text).ok_or_else(invalid)?;
        let key_id = presented.record_id();
        let digest = crypto::digest(presented.secret());

        let key = match self.cache.key(&key_id) {
            Some(cached) => Self::check_cached(cached, &digest)?,
            None => {
                let generation = self.cache.generation();
                if let Some(shared) = self.shared.key(&key_id).await {
                    let key = Self::check_cached(shared, &digest)?;
                    self.cache
                        .insert_key(key_id.clone(), key.clone(), generation);
                    return self.check_state(key_id, &key).await;
                }
                // Read before waiting for a permit: a key that does not exist is refused at
                // once, so a flood of made-up keys cannot queue ahead of real ones.
                let stored = match repo::user_keys::get(&self.db, &key_id).await {
                    Ok(stored) => stored,
                    Err(DbError::NotFound) => return Err(invalid()),
                    Err(other) => return Err(other.into()),
                };
                // A revoked or expired key is refused whatever secret came with it, before
                // argon2: holding a dead key's id must not buy a caller the slow check.
                refuse_dead(stored.revoked_at, stored.expires_at)?;
                let _permit = self
                    .argon2_permits
                    .acquire()
                    .await
                    .map_err(ApiError::internal)?;
                // Calls that missed together wait here; all but the first find the key
                // verified by the time they get a permit, and skip argon2.
                match self.cache.key_again(&key_id) {
                    Some(cached) => Self::check_cached(cached, &digest)?,
                    None => {
                        self.verify(&key_id, stored, &presented, digest, generation)
                            .await?
                    }
                }
            }
        };
        self.check_state(key_id, &key).await
    }

    fn check_cached(cached: VerifiedKey, digest: &[u8; 32]) -> Result<VerifiedKey, ApiError> {
        // The cached digest is of a secret argon2 accepted, so a different digest is a wrong
        // secret: refuse without paying argon2 again.
        if bool::from(cached.secret_digest.ct_eq(digest)) {
            Ok(cached)
        } else {
            Err(ApiError::invalid_api_key("invalid API key"))
        }
    }

    /// Refuses revoked and expired keys; otherwise the principal. The user's own state (status,
    /// addresses, budget) is the access gate's to check.
    async fn check_state(&self, key_id: String, key: &VerifiedKey) -> Result<Principal, ApiError> {
        refuse_dead(key.revoked_at, key.expires_at)?;
        let CachedUser { user, rules } = self.user(&key.user_id).await?;
        Ok(Principal {
            key_id,
            user,
            rules,
        })
    }

    /// Checks the presented secret against the stored key with argon2; caches what passes, as
    /// of cache `generation` (read before the key was).
    async fn verify(
        &self,
        key_id: &str,
        stored: UserKey,
        presented: &PresentedKey,
        digest: [u8; 32],
        generation: u64,
    ) -> Result<VerifiedKey, ApiError> {
        let secret = presented.secret().to_owned();
        let hash = stored.key_hash.clone();
        // argon2 is deliberately slow: it runs on the blocking pool, never on a worker thread.
        let ok = web::block(move || crypto::verify_secret(&secret, &hash))
            .await
            .map_err(ApiError::internal)?;
        if !ok {
            return Err(ApiError::invalid_api_key("invalid API key"));
        }
        let verified = VerifiedKey {
            secret_digest: digest,
            user_id: stored.user_id,
            expires_at: stored.expires_at,
            revoked_at: stored.revoked_at,
        };
        self.cache
            .insert_key(key_id.to_owned(), verified.clone(), generation);
        // Shared only if no change came in since the key was read: a record read before a
        // revocation must not be planted in Redis after its tombstone is gone.
        if self.cache.generation() == generation {
            self.shared.remember_key(key_id, &verified);
        }
        Ok(verified)
    }

    async fn user(&self, user_id: &str) -> Result<CachedUser, ApiError> {
        if let Some(user) = self.cache.user(user_id) {
            return Ok(user);
        }
        let generation = self.cache.generation();
        if let Some(user) = self.shared.user(user_id).await {
            let user = CachedUser::new(user);
            self.cache.insert_user(user.clone(), generation);
            return Ok(user);
        }
        match repo::users::get(&self.db, user_id).await {
            Ok(user) => {
                if self.cache.generation() == generation {
                    self.shared.remember_user(&user);
                }
                let user = CachedUser::new(user);
                self.cache.insert_user(user.clone(), generation);
                Ok(user)
            }
            // The key outlived its user (deleted a moment ago): the key is no longer valid.
            Err(DbError::NotFound) => Err(ApiError::invalid_api_key("invalid API key")),
            Err(other) => Err(other.into()),
        }
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let auth = req.app_data::<web::Data<Authenticator>>().cloned();
        let key = key_from_request(req.headers(), req.query_string());
        let span = req.extensions().get::<RootSpan>().cloned();
        let client_ip = req
            .app_data::<web::Data<Gate>>()
            .and_then(|gate| gate.client_ip(req));
        Box::pin(async move {
            let auth = auth.ok_or_else(|| ApiError::internal("authenticator not configured"))?;
            let key = key.ok_or_else(|| {
                ApiError::invalid_api_key(
                    "missing API key: send it as `Authorization: Bearer sk-...`",
                )
            })?;
            let principal = auth.authenticate(&key).await?;
            if let Some(span) = span {
                crate::telemetry::record(
                    &span,
                    [
                        ("user_id", &principal.user.id.as_str()),
                        ("key_id", &principal.key_id.as_str()),
                    ],
                );
            }
            access::admit_caller(client_ip, &principal)?;
            Ok(principal)
        })
    }
}

/// Refuses a key that is revoked, or expired by now.
fn refuse_dead(
    revoked_at: Option<chrono::NaiveDateTime>,
    expires_at: Option<chrono::NaiveDateTime>,
) -> Result<(), ApiError> {
    if revoked_at.is_some() {
        return Err(ApiError::invalid_api_key("this API key has been revoked"));
    }
    if expires_at.is_some_and(|at| at <= crate::domain::now()) {
        return Err(ApiError::invalid_api_key("this API key has expired"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn key_is_found_wherever_sdks_put_it() {
        assert_eq!(
            key_from_request(&headers(&[("authorization", "Bearer sk-a")]), ""),
            Some("sk-a".into())
        );
        assert_eq!(
            key_from_request(&headers(&[("x-api-key", "sk-b")]), ""),
            Some("sk-b".into())
        );
        assert_eq!(
            key_from_request(&headers(&[("x-goog-api-key", "sk-c")]), ""),
            Some("sk-c".into())
        );
        assert_eq!(
            key_from_request(&headers(&[]), "alt=sse&key=sk-d"),
            Some("sk-d".into())
        );
        assert_eq!(key_from_request(&headers(&[]), "alt=sse"), None);
        assert_eq!(
            key_from_request(&headers(&[("authorization", "Basic xyz")]), ""),
            None
        );
    }
}
