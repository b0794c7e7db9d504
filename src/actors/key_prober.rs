//! `KeyProberActor`: gives keys a provider refused another chance. A 401 or 403 disables a key
//! on every replica at once, but a provider may refuse a key only for a while (a billing hold,
//! a project briefly suspended, a key rotated back). Every `upstream.reprobe_interval_secs`
//! each key disabled that way (not one an admin disabled) is probed with a cheap authenticated
//! call, and a key the provider accepts again is put back in service on every replica.

use std::time::Duration;

use actix::WrapFuture;
use actix::{Actor, ActorFutureExt, Addr, AsyncContext, AtomicResponse, Context, Handler, Message};

use super::config_sync::{Changed, ConfigSyncActor, Entity};
use crate::crypto::MasterKey;
use crate::db::{repo, Db};
use crate::upstream::{client, probe};

/// Probes every refused key once.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Round;

pub struct KeyProberActor {
    db: Db,
    master_key: MasterKey,
    config_sync: Addr<ConfigSyncActor>,
    every: Duration,
}

impl KeyProberActor {
    /// Probes refused keys every `every` (which must not be zero).
    pub fn new(
        db: Db,
        master_key: MasterKey,
        config_sync: Addr<ConfigSyncActor>,
        every: Duration,
    ) -> Self {
        KeyProberActor {
            db,
            master_key,
            config_sync,
            every,
        }
    }
}

impl Actor for KeyProberActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.every, |_, ctx| ctx.notify(Round));
    }
}

impl Handler<Round> for KeyProberActor {
    // One round at a time: a round slower than the interval delays the next, never doubles it.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Round, _: &mut Self::Context) -> Self::Result {
        let (db, master_key, config_sync) = (
            self.db.clone(),
            self.master_key.clone(),
            self.config_sync.clone(),
        );
        AtomicResponse::new(Box::pin(
            probe_refused_keys(db, master_key, config_sync)
                .into_actor(self)
                .map(|_, _, _| ()),
        ))
    }
}

async fn probe_refused_keys(db: Db, master_key: MasterKey, config_sync: Addr<ConfigSyncActor>) {
    let keys = match repo::upstream_keys::all(&db).await {
        Ok(keys) => keys,
        Err(err) => {
            tracing::debug!(error = %err, "could not read upstream keys to probe");
            return;
        }
    };
    let refused = keys
        .into_iter()
        .filter(|k| k.enabled && k.disabled_at.is_some());
    let http = client::build(probe::PROBE_TIMEOUT, probe::PROBE_TIMEOUT);
    for key in refused {
        let secret = match master_key.decrypt(&key.id, &key.secret_enc) {
            Ok(secret) => secret,
            Err(_) => continue, // another master key's secret: reported when the pools load it
        };
        let outcome = probe::probe(&http, key.provider, &key.base_url, &secret).await;
        let probe::ProbeOutcome::Valid = outcome else {
            tracing::debug!(upstream_key_id = %key.id, "upstream key still refused");
            continue;
        };
        // Only the refusal that was probed is lifted: an admin change or a newer refusal
        // meanwhile stands.
        match repo::upstream_keys::clear_rejection(&db, &key.id, key.updated_at).await {
            Ok(true) => {
                tracing::info!(upstream_key_id = %key.id, "the provider accepts the key again; back in service");
                let change = Changed {
                    entity: Entity::UpstreamKey,
                    id: key.id,
                    created: false,
                };
                if let Err(err) = config_sync.send(change).await {
                    tracing::error!(error = %err, "config-sync actor unreachable");
                }
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(upstream_key_id = %key.id, error = %err, "could not put a key back in service")
            }
        }
    }
}
