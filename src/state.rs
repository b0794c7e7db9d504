//! What handlers share: storage, secrets and the actors' addresses.

use std::sync::Arc;

use actix::Addr;

use crate::actors::config_sync::{Changed, ConfigSyncActor, Entity};
use crate::actors::key_pool::OpenBreakers;
use crate::actors::rate_limiter::LimiterUpkeep;
use crate::cluster::bus::Bus;
use crate::crypto::MasterKey;
use crate::db::Db;
use crate::limits::RateLimiter;
use crate::metering::Metering;

/// Shared by every worker through `web::Data`.
pub struct AppState {
    pub db: Db,
    pub master_key: MasterKey,
    /// `None` when no admin token is configured: the admin API then refuses every call.
    pub admin_token: Option<String>,
    pub config_sync: Addr<ConfigSyncActor>,
    /// Read by `/readyz` for Redis's state.
    pub limiter: Arc<RateLimiter>,
    /// Keeps the limiter's Redis watch running.
    pub limiter_upkeep: Addr<LimiterUpkeep>,
    /// Prices, spend, metrics and the writers of usage and logs.
    pub metering: Arc<Metering>,
    /// The replicas' channel, whose state `/readyz` reports.
    pub bus: Arc<Bus>,
    /// Upstream keys whose breaker is open on one of this replica's workers.
    pub breakers: Arc<OpenBreakers>,
}

impl AppState {
    /// Tells the config-sync actor that a record changed, and waits until the caches have
    /// dropped it, so the admin's next call already sees the change.
    pub async fn changed(&self, entity: Entity, id: &str) {
        self.tell(Changed {
            entity,
            id: id.to_owned(),
            created: false,
        })
        .await
    }

    /// Like [`AppState::changed`] for a record just created, which no cache can hold yet.
    pub async fn created(&self, entity: Entity, id: &str) {
        self.tell(Changed {
            entity,
            id: id.to_owned(),
            created: true,
        })
        .await
    }

    async fn tell(&self, msg: Changed) {
        if let Err(err) = self.config_sync.send(msg).await {
            tracing::error!(error = %err, "config-sync actor unreachable");
        }
    }
}
