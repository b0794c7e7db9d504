//! The key pools of every level: one `KeyPoolActor` each, rebuilt from the database when an
//! admin changes an upstream key.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::{Actor, Addr};
use parking_lot::RwLock;

use crate::actors::key_pool::{pool_key, KeyPoolActor, PoolKey, PoolPolicy, SetKeys};
use crate::crypto::MasterKey;
use crate::db::{repo, Db};

/// Every level's pool actor.
pub struct KeyPools {
    pools: RwLock<HashMap<i32, Addr<KeyPoolActor>>>,
    db: Db,
    master_key: MasterKey,
    policy: PoolPolicy,
}

impl KeyPools {
    /// No pools yet; call [`KeyPools::reload`] inside an actix System.
    pub fn new(db: Db, master_key: MasterKey, policy: PoolPolicy) -> Arc<Self> {
        Arc::new(KeyPools {
            pools: RwLock::new(HashMap::new()),
            db,
            master_key,
            policy,
        })
    }

    /// The pool of `level`, if any key was ever configured there.
    pub fn pool(&self, level: i32) -> Option<Addr<KeyPoolActor>> {
        self.pools.read().get(&level).cloned()
    }

    /// Loads every upstream key and hands each level its keys; starts pools for new levels.
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
        let mut pools = self.pools.write();
        for (level, addr) in pools.iter() {
            if !by_level.contains_key(level) {
                addr.do_send(SetKeys(Vec::new()));
            }
        }
        for (level, keys) in by_level {
            match pools.get(&level) {
                Some(addr) => addr.do_send(SetKeys(keys)),
                None => {
                    let actor = KeyPoolActor::new(level, keys, self.policy, self.db.clone());
                    pools.insert(level, actor.start());
                }
            }
        }
        Ok(())
    }
}
