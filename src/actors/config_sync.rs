//! `ConfigSyncActor`: hears of every admin change and makes the caches forget what changed.
//! Within one instance a change is delivered by message; replicas learn of it through Redis.

use std::sync::Arc;

use actix::{Actor, ActorFutureExt, AtomicResponse, Context, Handler, Message, WrapFuture};
use futures_util::future::BoxFuture;

use crate::auth::AuthCache;
use crate::db::{repo, Db};
use crate::metering::prices::PriceBook;
use crate::routing::{KeyPools, ModelMapper};

/// The kinds of record an admin can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    User,
    UserKey,
    UpstreamKey,
    ModelMapping,
    Price,
}

/// An admin changed (created, updated or deleted) the record `id` of kind `entity`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Changed {
    pub entity: Entity,
    pub id: String,
}

/// Owns the reaction to configuration changes.
pub struct ConfigSyncActor {
    auth_cache: Arc<AuthCache>,
    pools: Arc<KeyPools>,
    mapper: Arc<ModelMapper>,
    prices: Arc<PriceBook>,
    db: Db,
}

impl ConfigSyncActor {
    /// An actor that invalidates `auth_cache` and reloads the pools, the mappings and the
    /// prices.
    pub fn new(
        auth_cache: Arc<AuthCache>,
        pools: Arc<KeyPools>,
        mapper: Arc<ModelMapper>,
        prices: Arc<PriceBook>,
        db: Db,
    ) -> Self {
        ConfigSyncActor {
            auth_cache,
            pools,
            mapper,
            prices,
            db,
        }
    }
}

impl Actor for ConfigSyncActor {
    type Context = Context<Self>;
}

impl Handler<Changed> for ConfigSyncActor {
    // Reloads finish before the reply, so the admin's answer means the change is in force, and
    // they run one at a time, so an older snapshot can never land after a newer one.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Changed, _: &mut Self::Context) -> Self::Result {
        let work = self.react(msg);
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|_, _, _| ())))
    }
}

impl ConfigSyncActor {
    fn react(&self, msg: Changed) -> BoxFuture<'static, ()> {
        tracing::debug!(entity = ?msg.entity, id = %msg.id, "configuration changed");
        let db = self.db.clone();
        match msg.entity {
            Entity::User => {
                self.auth_cache.invalidate_user(&msg.id);
                // A deleted user's own mappings went with it.
                let mapper = self.mapper.clone();
                Box::pin(async move { reload_mappings(&mapper, &db).await })
            }
            Entity::UserKey => {
                self.auth_cache.invalidate_key(&msg.id);
                Box::pin(async {})
            }
            Entity::UpstreamKey => {
                let pools = self.pools.clone();
                Box::pin(async move {
                    if let Err(err) = pools.reload().await {
                        tracing::error!(error = %err, "reloading upstream keys failed");
                    }
                })
            }
            Entity::ModelMapping => {
                let mapper = self.mapper.clone();
                Box::pin(async move { reload_mappings(&mapper, &db).await })
            }
            Entity::Price => {
                let prices = self.prices.clone();
                Box::pin(async move {
                    match repo::prices::all(&db).await {
                        Ok(all) => prices.replace(all),
                        Err(err) => tracing::error!(error = %err, "reloading prices failed"),
                    }
                })
            }
        }
    }
}

async fn reload_mappings(mapper: &ModelMapper, db: &Db) {
    if let Err(err) = mapper.reload(db).await {
        tracing::error!(error = %err, "reloading model mappings failed");
    }
}
