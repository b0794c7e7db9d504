//! `KeyPoolActor`: one per level, the only owner of that level's upstream keys, their
//! round-robin state, cooldowns and health.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message, MessageResult};
use actix_web::http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use chrono::NaiveDateTime;
use globset::GlobSet;

use crate::domain::{Provider, UpstreamKey};

/// A key as a pool holds it: the secret decrypted, the model globs compiled.
#[derive(Clone)]
pub struct PoolKey {
    pub id: String,
    pub provider: Provider,
    pub base_url: Arc<str>,
    /// The header the key is sent in, as its provider wants it (`Authorization: Bearer`,
    /// `x-api-key`, `x-goog-api-key`): built once, not per call, and its value marked sensitive,
    /// so nothing prints it.
    pub credential: (HeaderName, HeaderValue),
    /// Models this key may serve; `None` = all.
    pub models: Option<Arc<GlobSet>>,
    pub weight: i64,
    pub enabled: bool,
    /// Disabled because the provider refused the key (401/403).
    pub rejected: bool,
    pub cooldown_until: Option<NaiveDateTime>,
    /// When an admin last changed the key: a newer one means their word replaces the pool's.
    pub updated_at: NaiveDateTime,
}

impl std::fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A key handed out for one attempt.
#[derive(Clone)]
pub struct LeasedKey {
    pub id: String,
    pub provider: Provider,
    pub base_url: Arc<str>,
    pub credential: (HeaderName, HeaderValue),
}

/// No key of the level can serve the call now.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKey {
    /// When the first key that could serve it, resting now (cooling down after a 429, or its
    /// circuit open), is back: what a client can be told to wait.
    pub back_at: Option<Instant>,
}

/// Asks for the next key able to serve `model`, skipping `exclude` (keys already tried).
#[derive(Message)]
#[rtype(result = "Result<LeasedKey, NoKey>")]
pub struct Lease {
    /// The providers whose keys may serve the call: its dialect's own, and for a chat
    /// completion also those it is translated for (see `Slot::serves_model`).
    pub providers: &'static [Provider],
    pub model: String,
    pub exclude: Vec<String>,
    /// A key to hand out before any other when it can serve (it holds what the call follows).
    pub prefer: Option<String>,
}

/// How an attempt with a key ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The provider answered (2xx or a caller's error such as 400).
    Success,
    /// 429: rest the key for this long.
    RateLimited(Duration),
    /// 401/403: the provider refused the key itself.
    Rejected(u16),
    /// 5xx, a refused or reset connection, or a timeout.
    Failed,
}

/// Reports the outcome of an attempt with key `key_id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Report {
    pub key_id: String,
    pub outcome: Outcome,
}

/// Replaces the pool's keys (after an admin change), keeping runtime state of keys that stay.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetKeys(pub Vec<PoolKey>);

/// Health rules of a pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolPolicy {
    /// Consecutive failures that open a key's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps the key out.
    pub breaker_open: Duration,
}

struct Slot {
    key: PoolKey,
    /// Smooth weighted round robin's running weight.
    current: i64,
    consecutive_failures: u32,
    /// Breaker or 429 rest, in monotonic time.
    resting_until: Option<Instant>,
    /// The breaker opened and has not closed: once the rest is over, one call at a time
    /// probes the key.
    half_open: bool,
    /// When the probe in flight was handed out.
    probe_since: Option<Instant>,
    /// How long a probe's outcome is awaited before another call may probe (one whose
    /// outcome never came, say because its client left).
    probe_wait: Duration,
}

impl Slot {
    fn leased(&self) -> LeasedKey {
        LeasedKey {
            id: self.key.id.clone(),
            provider: self.key.provider,
            base_url: self.key.base_url.clone(),
            credential: self.key.credential.clone(),
        }
    }

    fn can_serve(&self, msg: &Lease, now: Instant) -> bool {
        self.back_at(now).is_none() && self.could_serve(msg)
    }

    /// When the key is back, if it is resting at `now`: a rest, or a probe of its half-open
    /// breaker in flight.
    fn back_at(&self, now: Instant) -> Option<Instant> {
        let probe = self
            .probe_since
            .filter(|_| self.half_open)
            .map(|since| since + self.probe_wait);
        later(self.resting_until, probe).filter(|t| *t > now)
    }

    /// Hands the key out for one attempt: a half-open breaker's probe.
    fn lease_at(&mut self, now: Instant) -> LeasedKey {
        if self.half_open {
            self.probe_since = Some(now);
        }
        self.leased()
    }

    /// Whether the key serves the call once any rest is over.
    fn could_serve(&self, msg: &Lease) -> bool {
        self.eligible(msg) && !msg.exclude.contains(&self.key.id)
    }

    /// Whether the key is in service for the call's provider and model, tried or not.
    fn eligible(&self, msg: &Lease) -> bool {
        let key = &self.key;
        key.enabled
            && !key.rejected
            && msg.providers.contains(&key.provider)
            && self.serves_model(msg)
    }

    /// A key with a `models` list serves what the list matches. One without serves every model
    /// when the call is in its provider's own API, and only its provider's families when the
    /// call is translated to that API (an Anthropic key is not sent a `gpt-4o` chat).
    fn serves_model(&self, msg: &Lease) -> bool {
        let key = &self.key;
        match &key.models {
            Some(globs) => globs.is_match(&msg.model),
            None => key.provider == msg.providers[0] || key.provider.makes(&msg.model),
        }
    }

    /// An OpenAI-compatible key without a `models` list, which serves any model by default.
    fn serves_by_default(&self) -> bool {
        self.key.provider == Provider::OpenAi && self.key.models.is_none()
    }
}

/// The keys whose circuit breaker is open on some worker of this process, and until when (wall
/// clock), for the admin view. Breakers live in each worker's pools and open rarely (after a
/// streak of failures), so one lock written only then costs the request path nothing.
#[derive(Default)]
pub struct OpenBreakers(parking_lot::Mutex<foldhash::HashMap<String, NaiveDateTime>>);

impl OpenBreakers {
    fn opened(&self, key_id: &str, until: NaiveDateTime) {
        let now = crate::domain::now();
        let mut open = self.0.lock();
        // Breakers that closed since are forgotten here, so the map holds only open ones.
        open.retain(|_, until| *until > now);
        let entry = open.entry(key_id.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// An admin changed the key: its breakers start closed.
    fn closed(&self, key_id: &str) {
        self.0.lock().remove(key_id);
    }

    /// Until when `key_id`'s breaker is open, if it is open at `now`.
    pub fn open_until(&self, key_id: &str, now: NaiveDateTime) -> Option<NaiveDateTime> {
        self.0
            .lock()
            .get(key_id)
            .copied()
            .filter(|until| *until > now)
    }
}

/// The keys of one level.
pub struct KeyPoolActor {
    level: i32,
    slots: Vec<Slot>,
    policy: PoolPolicy,
    breakers: Arc<OpenBreakers>,
}

impl KeyPoolActor {
    /// A pool for `level` holding `keys`, telling `breakers` when one opens.
    pub fn new(
        level: i32,
        keys: Vec<PoolKey>,
        policy: PoolPolicy,
        breakers: Arc<OpenBreakers>,
    ) -> Self {
        let mut pool = KeyPoolActor {
            level,
            slots: Vec::new(),
            policy,
            breakers,
        };
        pool.set_keys(keys);
        pool
    }

    fn set_keys(&mut self, keys: Vec<PoolKey>) {
        let mut old: HashMap<String, Slot> = self
            .slots
            .drain(..)
            .map(|s| (s.key.id.clone(), s))
            .collect();
        let now_wall = crate::domain::now();
        self.slots = keys
            .into_iter()
            .map(|key| {
                let stored_rest = rest_from_wall_clock(key.cooldown_until, now_wall);
                match old.remove(&key.id) {
                    Some(mut slot) => {
                        if key.updated_at == slot.key.updated_at {
                            // No admin change: keep what this pool learnt that the database
                            // may not show yet (its writes are asynchronous).
                            let rejected = key.rejected || slot.key.rejected;
                            slot.resting_until = later(slot.resting_until, stored_rest);
                            slot.key = PoolKey { rejected, ..key };
                        } else {
                            // An admin re-enabled, re-keyed or reconfigured it: start afresh.
                            slot.resting_until = stored_rest;
                            slot.consecutive_failures = 0;
                            slot.half_open = false;
                            slot.probe_since = None;
                            self.breakers.closed(&key.id);
                            slot.key = key;
                        }
                        slot
                    }
                    None => Slot {
                        key,
                        current: 0,
                        consecutive_failures: 0,
                        resting_until: stored_rest,
                        half_open: false,
                        probe_since: None,
                        probe_wait: self.policy.breaker_open,
                    },
                }
            })
            .collect();
    }

    /// Smooth weighted round robin (nginx's): every eligible key gains its weight, the
    /// richest is picked and pays back the total, which spreads picks evenly by weight.
    fn lease(&mut self, msg: &Lease) -> Result<LeasedKey, NoKey> {
        let now = Instant::now();
        // A chat completion for a model an Anthropic or Gemini key of this level serves goes to
        // those keys, not to an OpenAI-compatible key that only takes it because it has no
        // `models` list (which would most likely answer 404).
        let native = |s: &Slot| s.key.provider != Provider::OpenAi && s.eligible(msg);
        let defer_defaults = msg.providers.len() > 1 && self.slots.iter().any(native);
        let usable = |s: &Slot| !(defer_defaults && s.serves_by_default());
        if let Some(preferred) = &msg.prefer {
            // Outside the round robin: the turn of the other keys is not taken.
            let slot = self
                .slots
                .iter_mut()
                .find(|s| &s.key.id == preferred && s.can_serve(msg, now) && usable(s));
            if let Some(slot) = slot {
                return Ok(slot.lease_at(now));
            }
        }
        let mut total = 0;
        let mut best: Option<usize> = None;
        for i in 0..self.slots.len() {
            if !self.slots[i].can_serve(msg, now) || !usable(&self.slots[i]) {
                continue;
            }
            let slot = &mut self.slots[i];
            slot.current += slot.key.weight;
            total += slot.key.weight;
            if best.is_none_or(|b| self.slots[i].current > self.slots[b].current) {
                best = Some(i);
            }
        }
        let Some(best) = best else {
            let back_at = self
                .slots
                .iter()
                .filter(|s| s.could_serve(msg) && usable(s))
                .filter_map(|s| s.back_at(now))
                .min();
            return Err(NoKey { back_at });
        };
        let slot = &mut self.slots[best];
        slot.current -= total;
        Ok(slot.lease_at(now))
    }

    fn report(&mut self, msg: Report) {
        let Some(slot) = self.slots.iter_mut().find(|s| s.key.id == msg.key_id) else {
            return;
        };
        let now = Instant::now();
        if msg.outcome != Outcome::Failed {
            // The provider answered: the breaker, if it was half open, closes.
            slot.half_open = false;
            slot.probe_since = None;
        }
        match msg.outcome {
            Outcome::Success => slot.consecutive_failures = 0,
            Outcome::RateLimited(rest) => {
                slot.resting_until = later(slot.resting_until, Some(now + rest));
                tracing::debug!(level = self.level, upstream_key_id = %slot.key.id, rest_secs = rest.as_secs(), "upstream key cooling down");
            }
            Outcome::Rejected(status) => {
                slot.key.rejected = true;
                tracing::debug!(level = self.level, upstream_key_id = %slot.key.id, status, "upstream key disabled");
            }
            Outcome::Failed => {
                slot.consecutive_failures += 1;
                if slot.consecutive_failures >= self.policy.breaker_failures {
                    // Half open once the rest is over: the next attempt is a probe (one at
                    // a time: the others go to other keys meanwhile), and its
                    // failure opens the breaker again at once, where a reset count would let
                    // `breaker_failures` more calls fail first. A success resets the count.
                    slot.consecutive_failures = self.policy.breaker_failures - 1;
                    slot.half_open = true;
                    slot.probe_since = None;
                    slot.resting_until =
                        later(slot.resting_until, Some(now + self.policy.breaker_open));
                    let open = chrono::Duration::from_std(self.policy.breaker_open)
                        .unwrap_or(chrono::Duration::zero());
                    self.breakers
                        .opened(&slot.key.id, crate::domain::now() + open);
                    tracing::warn!(level = self.level, upstream_key_id = %slot.key.id, "upstream key failing; circuit open");
                }
            }
        }
    }
}

fn later(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn rest_from_wall_clock(until: Option<NaiveDateTime>, now: NaiveDateTime) -> Option<Instant> {
    let remaining = (until? - now).to_std().ok()?;
    Some(Instant::now() + remaining)
}

impl Actor for KeyPoolActor {
    type Context = Context<Self>;
}

impl Handler<Lease> for KeyPoolActor {
    type Result = MessageResult<Lease>;

    fn handle(&mut self, msg: Lease, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.lease(&msg))
    }
}

impl Handler<Report> for KeyPoolActor {
    type Result = ();

    fn handle(&mut self, msg: Report, _: &mut Self::Context) {
        self.report(msg);
    }
}

impl Handler<SetKeys> for KeyPoolActor {
    type Result = ();

    fn handle(&mut self, msg: SetKeys, _: &mut Self::Context) {
        self.set_keys(msg.0);
    }
}

/// The header `provider` takes `secret` in. The error does not quote the secret.
pub fn credential(provider: Provider, secret: &str) -> anyhow::Result<(HeaderName, HeaderValue)> {
    let (name, value) = match provider {
        Provider::OpenAi => (
            AUTHORIZATION,
            HeaderValue::try_from(format!("Bearer {secret}")),
        ),
        Provider::Anthropic => (
            HeaderName::from_static("x-api-key"),
            HeaderValue::try_from(secret),
        ),
        Provider::Gemini => (
            HeaderName::from_static("x-goog-api-key"),
            HeaderValue::try_from(secret),
        ),
    };
    let mut value =
        value.map_err(|_| anyhow::anyhow!("the secret cannot be sent in an HTTP header"))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// Turns a stored key into a pool key, decrypting its secret.
pub fn pool_key(key: &UpstreamKey, master: &crate::crypto::MasterKey) -> anyhow::Result<PoolKey> {
    let models = if key.models.is_empty() {
        None
    } else {
        let mut set = globset::GlobSetBuilder::new();
        for g in &key.models {
            set.add(globset::Glob::new(g)?);
        }
        Some(Arc::new(set.build()?))
    };
    Ok(PoolKey {
        id: key.id.clone(),
        provider: key.provider,
        base_url: key.base_url.as_str().into(),
        credential: credential(key.provider, &master.decrypt(&key.id, &key.secret_enc)?)?,
        models,
        weight: i64::from(key.weight.max(1)),
        enabled: key.enabled,
        rejected: key.disabled_at.is_some(),
        cooldown_until: key.cooldown_until,
        updated_at: key.updated_at,
    })
}
