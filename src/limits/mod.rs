//! Rate limits: requests and tokens per minute, per user and per user and model rule, counted
//! in one sliding window per counter. With Redis every replica counts in the same windows
//! (`redis_store`); without it, or while it is away, each counts in process (`window`).
//!
//! The request path calls [`RateLimiter::admit`] directly: one lock in process, or one script
//! round trip to Redis. Answers that are already certain skip Redis: a user with no limit costs
//! nothing, and a refusal is remembered until its `Retry-After` has passed. Settling a call's
//! real token usage (`RateLimiterActor`, one per worker) happens after the response; watching
//! Redis (`LimiterUpkeep`) in the background.

pub mod estimate;
pub mod redis_store;
pub mod window;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use actix_web::http::StatusCode;
use foldhash::HashMap;
use parking_lot::Mutex;

use crate::access::rules::{AccessRules, Quota};
use crate::error::ApiError;
use redis_store::{RedisLink, RedisWindows};
use window::LocalWindows;

/// The most tokens one call is charged or settled with (2^40, about a trillion). A body may
/// ask for `max_tokens` up to `i64::MAX`; charged as such it would overflow the windows' sums,
/// and Redis's Lua, which counts in doubles, would refuse it. Any real limit is far below.
pub const MOST_TOKENS: i64 = 1 << 40;

/// One window a call is counted in.
#[derive(Debug, Clone)]
pub struct Counter {
    /// `<user id>` for the user's own limits, `<user id>:m:<pattern>` for a `model_limits` rule.
    pub key: String,
    pub quota: Quota,
}

/// A counter's totals in the current window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub requests: i64,
    pub tokens: i64,
}

/// What a window check answered. `used` includes the call when it was admitted.
#[derive(Debug)]
pub struct Outcome {
    pub admitted: bool,
    pub retry_ms: i64,
    pub bucket: i64,
    pub used: Vec<Used>,
}

/// The counters a call is charged to and the tokens estimated for it.
#[derive(Debug)]
pub struct Plan {
    pub user_id: String,
    pub counters: Vec<Counter>,
    pub tokens: i64,
}

impl Plan {
    /// The counters that apply to `model` for this user; `None` when no limit does.
    pub fn for_call(user_id: &str, rules: &AccessRules, model: &str) -> Option<Plan> {
        let mut counters = Vec::with_capacity(2);
        if rules.quota.is_limited() {
            counters.push(Counter {
                key: format!("{{{user_id}}}"),
                quota: rules.quota,
            });
        }
        if let Some(rule) = rules.model_rule(model).filter(|r| r.quota.is_limited()) {
            counters.push(Counter {
                key: format!("{{{user_id}}}:m:{}", rule.pattern),
                quota: rule.quota,
            });
        }
        (!counters.is_empty()).then(|| Plan {
            user_id: user_id.to_owned(),
            counters,
            tokens: 0,
        })
    }

    /// Whether a tokens-per-minute limit applies, so tokens must be estimated and settled.
    pub fn counts_tokens(&self) -> bool {
        self.counters.iter().any(|c| c.quota.tpm.is_some())
    }
}

/// An admitted call's charge, kept until its real usage is known.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub user_id: String,
    /// Counters with a token limit: the ones a correction applies to.
    pub token_keys: Vec<String>,
    pub bucket: i64,
    /// Tokens charged at admission.
    pub charged: i64,
    /// Whether Redis counted the charge (else this process did): the correction goes where the
    /// charge went, whichever store is in use when the call ends.
    pub in_redis: bool,
}

/// The limit and what is left of it, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<(i64, i64)>,
    pub tokens: Option<(i64, i64)>,
}

static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");

impl RateHeaders {
    fn pairs(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
        let requests = self.requests.into_iter().flat_map(|(limit, remaining)| {
            [(&LIMIT_REQUESTS, limit), (&REMAINING_REQUESTS, remaining)]
        });
        let tokens = self.tokens.into_iter().flat_map(|(limit, remaining)| {
            [(&LIMIT_TOKENS, limit), (&REMAINING_TOKENS, remaining)]
        });
        requests
            .chain(tokens)
            .map(|(name, value)| (name.clone(), HeaderValue::from(value)))
    }

    /// Sets the headers on a response.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in self.pairs() {
            headers.insert(name, value);
        }
    }

    /// Sets the headers on an error response.
    pub fn apply_to_error(&self, mut error: ApiError) -> ApiError {
        for (name, value) in self.pairs() {
            error = error.with_header(name, value);
        }
        error
    }
}

/// Reads an outcome: the headers, and for a refusal which limit refused.
fn read_outcome(plan: &Plan, outcome: &Outcome) -> (RateHeaders, Option<String>) {
    let cost = plan.tokens.max(1);
    let mut headers = RateHeaders::default();
    let mut refused_by = None;
    for (counter, used) in plan.counters.iter().zip(&outcome.used) {
        let scope = || match counter.key.split_once(":m:") {
            Some((_, pattern)) => format!(" for models `{pattern}`"),
            None => String::new(),
        };
        if let Some(rpm) = counter.quota.rpm {
            let over = !outcome.admitted && used.requests + 1 > rpm;
            let remaining = if over {
                0
            } else {
                (rpm - used.requests).max(0)
            };
            if headers.requests.is_none_or(|(_, r)| remaining < r) {
                headers.requests = Some((rpm, remaining));
            }
            if over && refused_by.is_none() {
                refused_by = Some(format!("{rpm} requests per minute{}", scope()));
            }
        }
        if let Some(tpm) = counter.quota.tpm {
            let over = !outcome.admitted && used.tokens + cost > tpm;
            let remaining = if over { 0 } else { (tpm - used.tokens).max(0) };
            if headers.tokens.is_none_or(|(_, r)| remaining < r) {
                headers.tokens = Some((tpm, remaining));
            }
            if over && refused_by.is_none() {
                refused_by = Some(format!(
                    "{tpm} tokens per minute{} (this call is estimated at {} tokens)",
                    scope(),
                    plan.tokens
                ));
            }
        }
    }
    if !outcome.admitted && refused_by.is_none() {
        refused_by = Some("the rate limit".into());
    }
    (headers, refused_by)
}

/// Whether Redis carries the limits now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisState {
    NotConfigured,
    Up,
    /// Configured but not answering: limits are held in process.
    Down,
}

impl RedisState {
    /// The wire form for `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::NotConfigured => "not_configured",
            RedisState::Up => "ok",
            RedisState::Down => "unavailable",
        }
    }
}

/// A refusal remembered so that the same counters are refused again without asking Redis
/// before the window can have room.
struct Remembered {
    until_ms: i64,
    used: Vec<Used>,
}

/// The limiter every worker shares.
pub struct RateLimiter {
    local: LocalWindows,
    redis: Option<RedisWindows>,
    refusals: Mutex<HashMap<String, Remembered>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl RateLimiter {
    /// A limiter counting in process, and in Redis when `redis_url` is set.
    pub fn new(redis_url: &str, prefix: &str, timeout: Duration) -> anyhow::Result<Self> {
        let redis = if redis_url.is_empty() {
            None
        } else {
            // The URL may hold a password: the error names the setting, not the value.
            Some(RedisWindows::new(redis_url, prefix, timeout).map_err(|e| {
                anyhow::anyhow!("redis.url is not a valid Redis URL: {}", e.category())
            })?)
        };
        Ok(RateLimiter {
            local: LocalWindows::default(),
            redis,
            refusals: Mutex::new(HashMap::default()),
        })
    }

    /// Where limits are counted now.
    pub fn redis_state(&self) -> RedisState {
        match &self.redis {
            None => RedisState::NotConfigured,
            Some(r) if r.is_up() => RedisState::Up,
            Some(_) => RedisState::Down,
        }
    }

    pub(crate) fn redis(&self) -> Option<&RedisWindows> {
        self.redis.as_ref()
    }

    pub(crate) fn local(&self) -> &LocalWindows {
        &self.local
    }

    /// Admits the call or refuses it with 429 `rate_limit_exceeded` and `Retry-After`.
    /// `link` is the calling worker's own Redis connection.
    pub async fn admit(
        &self,
        plan: &Plan,
        link: &RedisLink,
    ) -> Result<(Ticket, RateHeaders), ApiError> {
        // Only a Redis round trip is worth saving: counting in process costs less than a memo.
        let memo_key = (self.redis_state() == RedisState::Up).then(|| {
            plan.counters
                .iter()
                .map(|c| c.key.as_str())
                .collect::<Vec<_>>()
                .join("|")
        });
        let remembered = memo_key
            .as_deref()
            .and_then(|k| self.remembered_refusal(k, plan));
        let (outcome, in_redis) = match remembered {
            Some(outcome) => (outcome, true),
            None => self.count(plan, link).await,
        };
        let (headers, refused_by) = read_outcome(plan, &outcome);
        if outcome.admitted {
            let ticket = Ticket {
                user_id: plan.user_id.clone(),
                token_keys: plan
                    .counters
                    .iter()
                    .filter(|c| c.quota.tpm.is_some())
                    .map(|c| c.key.clone())
                    .collect(),
                bucket: outcome.bucket,
                charged: plan.tokens,
                in_redis,
            };
            return Ok((ticket, headers));
        }
        if let Some(memo_key) = memo_key.filter(|_| self.redis_state() == RedisState::Up) {
            self.refusals.lock().insert(
                memo_key,
                Remembered {
                    until_ms: now_ms() + outcome.retry_ms,
                    used: outcome.used.clone(),
                },
            );
        }
        let retry_after = (outcome.retry_ms.max(1) as u64).div_ceil(1000);
        let refused_by = refused_by.unwrap_or_default();
        // A call estimated above a whole minute's tokens, or under a limit of 0, is refused
        // however long it waits: say what would let it through rather than when to retry.
        let never_fits = plan.counters.iter().any(|c| {
            c.quota.tpm.is_some_and(|tpm| plan.tokens.max(1) > tpm) || c.quota.rpm == Some(0)
        });
        let zero = plan
            .counters
            .iter()
            .any(|c| c.quota.rpm == Some(0) || c.quota.tpm == Some(0));
        let message = if zero {
            format!("rate limit exceeded: {refused_by} is 0, so no call is allowed")
        } else if never_fits {
            format!(
                "rate limit exceeded: {refused_by}, more than a minute allows; lower max_tokens \
                 or send less input"
            )
        } else {
            format!("rate limit exceeded: {refused_by}; retry in {retry_after} s")
        };
        let error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            message,
        )
        .with_header(RETRY_AFTER, HeaderValue::from(retry_after));
        Err(headers.apply_to_error(error))
    }

    /// A refusal of the same counters remembered from Redis, when it settles this call too:
    /// what the window held then (it can only have emptied since) must leave no room for this
    /// call under the limits as they are now. A smaller call, or a limit raised since, is
    /// counted again.
    fn remembered_refusal(&self, memo_key: &str, plan: &Plan) -> Option<Outcome> {
        let mut refusals = self.refusals.lock();
        let now = now_ms();
        match refusals.get(memo_key) {
            Some(r) if r.until_ms > now => {
                let cost = plan.tokens.max(1);
                let certain = plan.counters.iter().zip(&r.used).any(|(counter, used)| {
                    counter.quota.rpm.is_some_and(|rpm| used.requests + 1 > rpm)
                        || counter
                            .quota
                            .tpm
                            .is_some_and(|tpm| used.tokens + cost > tpm)
                });
                certain.then(|| Outcome {
                    admitted: false,
                    retry_ms: r.until_ms - now,
                    bucket: 0,
                    used: r.used.clone(),
                })
            }
            Some(_) => {
                refusals.remove(memo_key);
                None
            }
            None => None,
        }
    }

    /// Counts the call in Redis when it is up, else in process; says which counted it.
    async fn count(&self, plan: &Plan, link: &RedisLink) -> (Outcome, bool) {
        if let Some(redis) = self.redis.as_ref().filter(|r| r.is_up()) {
            match redis.acquire(link, &plan.counters, plan.tokens).await {
                Ok(outcome) => return (outcome, true),
                Err(err) => redis.failed(&err),
            }
        }
        let outcome = self
            .local
            .acquire(&plan.user_id, &plan.counters, plan.tokens, now_ms());
        (outcome, false)
    }

    /// Corrects a call's token charge to what it really used, in the store that counted the
    /// charge. A Redis charge whose correction cannot reach Redis is left as it is: moving it
    /// into this process's windows would shrink other calls' counts there, and the Redis
    /// window expires with its minute anyway.
    pub async fn settle(&self, ticket: &Ticket, actual: i64, link: &RedisLink) {
        let delta = actual.clamp(0, MOST_TOKENS) - ticket.charged;
        if delta == 0 || ticket.token_keys.is_empty() {
            return;
        }
        if ticket.in_redis {
            if let Some(redis) = self.redis.as_ref().filter(|r| r.is_up()) {
                if let Err(err) = redis
                    .settle(link, &ticket.token_keys, ticket.bucket, delta)
                    .await
                {
                    redis.failed(&err);
                }
            }
            return;
        }
        self.local.settle(
            &ticket.user_id,
            &ticket.token_keys,
            ticket.bucket,
            delta,
            now_ms(),
        );
    }

    /// Drops idle windows and expired refusals.
    pub fn prune(&self) {
        let now = now_ms();
        self.local.prune(now);
        self.refusals.lock().retain(|_, r| r.until_ms > now);
    }
}

/// A Redis error for the log: its kind and text, which never hold the URL or its password.
pub fn describe(err: &redis::RedisError) -> String {
    format!(
        "{}: {}",
        err.category(),
        err.detail().unwrap_or("no detail")
    )
}
