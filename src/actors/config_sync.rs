//! `ConfigSyncActor`: hears of every admin change and makes the caches forget what changed.
//! Within one instance a change is delivered by message; replicas learn of it through Redis.

use std::sync::Arc;

use actix::{Actor, Context, Handler, Message};

use crate::auth::AuthCache;

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
}

impl ConfigSyncActor {
    /// An actor that invalidates `auth_cache`.
    pub fn new(auth_cache: Arc<AuthCache>) -> Self {
        ConfigSyncActor { auth_cache }
    }
}

impl Actor for ConfigSyncActor {
    type Context = Context<Self>;
}

impl Handler<Changed> for ConfigSyncActor {
    type Result = ();

    fn handle(&mut self, msg: Changed, _: &mut Self::Context) {
        tracing::debug!(entity = ?msg.entity, id = %msg.id, "configuration changed");
        match msg.entity {
            Entity::User => self.auth_cache.invalidate_user(&msg.id),
            Entity::UserKey => self.auth_cache.invalidate_key(&msg.id),
            // Routing state (pools, mappings, prices) is read from the database per change
            // by the data plane; nothing is cached for it here yet.
            Entity::UpstreamKey | Entity::ModelMapping | Entity::Price => {}
        }
    }
}
