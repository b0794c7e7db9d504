//! The key pools of every level. Each HTTP worker thread runs its own `KeyPoolActor` per level
//! on its own arbiter, so leasing a key is a same-thread message (no thread wake-up on the
//! request path); what one pool learns about a key (a 429, a refusal, a failure streak) is told
//! to the same level's pool on every worker, so the instance acts as one, and cooldowns and
//! refusals are announced to the other replicas, so the fleet acts as one.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::{Actor, Addr};
use actix::{Arbiter, ArbiterHandle};
use chrono::NaiveDateTime;
use foldhash::HashMap;
use parking_lot::RwLock;

use crate::actors::key_pool::{
    pool_key, KeyPoolActor, OpenBreakers, Outcome, PoolKey, PoolPolicy, Report, SetKeys,
};
use crate::cluster::bus::{Announcement, Bus};
use crate::crypto::MasterKey;
use crate::db::{repo, Db};

/// Every worker's pools, and the current keys of each level.
pub struct KeyPools {
    keys: RwLock<BTreeMap<i32, Vec<PoolKey>>>,
    workers: RwLock<Vec<Arc<WorkerPools>>>,
    db: Db,
    master_key: MasterKey,
    policy: PoolPolicy,
    /// Where cooldowns and refusals are announced to the other replicas.
    bus: Arc<Bus>,
    /// The breakers open on any worker, for the admin view.
    breakers: Arc<OpenBreakers>,
}

/// One worker thread's pool actors, one per level, running on that worker's arbiter.
pub struct WorkerPools {
    arbiter: ArbiterHandle,
    /// Behind an `Arc` because a call takes its level's address twice (to lease, to report):
    /// cloning an actix `Addr` allocates a sender's own two cells, an `Arc` only counts.
    pools: RwLock<HashMap<i32, Arc<Addr<KeyPoolActor>>>>,
}

impl WorkerPools {
    /// This worker's pool of `level`, if that level has ever had keys.
    pub fn pool(&self, level: i32) -> Option<Arc<Addr<KeyPoolActor>>> {
        self.pools.read().get(&level).cloned()
    }

    fn apply(
        &self,
        by_level: &BTreeMap<i32, Vec<PoolKey>>,
        policy: PoolPolicy,
        breakers: &Arc<OpenBreakers>,
    ) {
        let mut pools = self.pools.write();
        for (level, addr) in pools.iter() {
            if !by_level.contains_key(level) {
                addr.do_send(SetKeys(Vec::new()));
            }
        }
        for (level, keys) in by_level {
            match pools.get(level) {
                Some(addr) => addr.do_send(SetKeys(keys.clone())),
                None => {
                    let (level, keys, breakers) = (*level, keys.clone(), breakers.clone());
                    let addr = KeyPoolActor::start_in_arbiter(&self.arbiter, move |_| {
                        KeyPoolActor::new(level, keys, policy, breakers)
                    });
                    pools.insert(level, Arc::new(addr));
                }
            }
        }
    }
}

impl KeyPools {
    /// No keys yet: call [`KeyPools::reload`], and [`KeyPools::register_worker`] on each worker.
    pub fn new(db: Db, master_key: MasterKey, policy: PoolPolicy, bus: Arc<Bus>) -> Arc<Self> {
        Arc::new(KeyPools {
            keys: RwLock::new(BTreeMap::new()),
            workers: RwLock::new(Vec::new()),
            db,
            master_key,
            policy,
            bus,
            breakers: Arc::default(),
        })
    }

    /// The breakers open on any of this process's workers.
    pub fn breakers(&self) -> Arc<OpenBreakers> {
        self.breakers.clone()
    }

    /// Starts pools for the calling worker thread (inside its arbiter) and returns them.
    pub fn register_worker(&self) -> Arc<WorkerPools> {
        let worker = Arc::new(WorkerPools {
            arbiter: Arbiter::current(),
            pools: RwLock::new(HashMap::default()),
        });
        // Holding the keys while joining means a concurrent reload either ran before (and these
        // keys are its result) or waits and then reaches this worker too. Lock order: keys, then
        // workers, as in `reload`.
        let keys = self.keys.read();
        worker.apply(&keys, self.policy, &self.breakers);
        self.workers.write().push(worker.clone());
        drop(keys);
        worker
    }

    /// Loads every upstream key and hands each worker's pools their level's keys.
    pub async fn reload(&self) -> anyhow::Result<()> {
        let keys = repo::upstream_keys::all(&self.db).await?;
        let mut by_level: BTreeMap<i32, Vec<PoolKey>> = BTreeMap::new();
        for key in &keys {
            match pool_key(key, &self.master_key) {
                Ok(pk) => by_level.entry(key.level).or_default().push(pk),
                // A secret that does not decrypt (another master key) cannot be used; say so.
                Err(err) => {
                    tracing::error!(upstream_key_id = %key.id, error = %err, "upstream key unusable")
                }
            }
        }
        let mut current = self.keys.write();
        for worker in self.workers.read().iter() {
            worker.apply(&by_level, self.policy, &self.breakers);
        }
        *current = by_level;
        Ok(())
    }

    /// Records how an attempt with `key_id` of `level` went: the leasing worker's pool always
    /// hears it; a health change goes to every worker, is announced to the other replicas and
    /// is written for the admin view.
    pub fn report(&self, local: &WorkerPools, level: i32, key_id: &str, outcome: Outcome) {
        match outcome {
            Outcome::Success | Outcome::Failed => {
                if let Some(pool) = local.pool(level) {
                    pool.do_send(Report {
                        key_id: key_id.to_owned(),
                        outcome,
                    });
                }
            }
            Outcome::RateLimited(rest) => {
                self.tell_workers(level, key_id, outcome);
                let until = crate::domain::now()
                    + chrono::Duration::from_std(rest).unwrap_or(chrono::Duration::zero());
                self.bus.publish_later(Announcement::KeyCooling {
                    key_id: key_id.to_owned(),
                    until_ms: until.and_utc().timestamp_millis(),
                });
                self.persist_cooldown(key_id.to_owned(), until);
            }
            Outcome::Rejected(status) => {
                self.tell_workers(level, key_id, outcome);
                self.bus.publish_later(Announcement::KeyRejected {
                    key_id: key_id.to_owned(),
                    status,
                });
                self.persist_rejection(key_id.to_owned(), status);
            }
        }
    }

    /// Another replica saw `key_id` rate-limited or refused: this replica's pools rest it too.
    pub fn heard(&self, key_id: &str, outcome: Outcome) {
        if let Some(level) = self.level_of(key_id) {
            self.tell_workers(level, key_id, outcome);
        }
    }

    /// The level of the key `key_id`, if it is loaded.
    pub fn level_of(&self, key_id: &str) -> Option<i32> {
        self.keys
            .read()
            .iter()
            .find(|(_, keys)| keys.iter().any(|k| k.id == key_id))
            .map(|(level, _)| *level)
    }

    fn tell_workers(&self, level: i32, key_id: &str, outcome: Outcome) {
        for worker in self.workers.read().iter() {
            if let Some(pool) = worker.pool(level) {
                pool.do_send(Report {
                    key_id: key_id.to_owned(),
                    outcome,
                });
            }
        }
    }

    // Written after the fact, off the request path, so the admin view (and later other
    // replicas) see it; a failed write costs only the admin view's freshness.
    fn persist_cooldown(&self, key_id: String, until: NaiveDateTime) {
        let db = self.db.clone();
        actix::spawn(async move {
            if let Err(err) = repo::upstream_keys::set_cooldown(&db, &key_id, until).await {
                tracing::warn!(upstream_key_id = %key_id, error = %err, "could not record cooldown");
            }
        });
    }

    fn persist_rejection(&self, key_id: String, status: u16) {
        let db = self.db.clone();
        actix::spawn(async move {
            let reason = format!("the provider refused the key ({status})");
            if let Err(err) = repo::upstream_keys::set_rejected(&db, &key_id, &reason).await {
                tracing::warn!(upstream_key_id = %key_id, error = %err, "could not record disabled key");
            }
        });
    }
}
