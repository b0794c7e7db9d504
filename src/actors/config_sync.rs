//! `ConfigSyncActor`: hears of every admin change and makes the caches forget what changed.
//!
//! A change made here is applied, counted in the stored configuration version, then announced
//! on the Redis channel; other replicas apply what they hear. Announcements are not durable, so
//! each replica also reads the stored version every `cluster.version_check_ms` and reloads
//! everything when it finds changes it never heard of (after a Redis restart, a network blip,
//! or with no Redis at all).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorFutureExt, AsyncContext, AtomicResponse, Context, Handler, Message, WrapFuture,
};

use crate::actors::key_pool::Outcome;
use crate::auth::shared::Kind;
use crate::auth::{AuthCache, SharedCache};
use crate::cluster::bus::{Announcement, Bus, Heard};
use crate::db::{repo, Db};
use crate::metering::prices::PriceBook;
use crate::routing::{KeyPools, ModelMapper};

/// The kinds of record an admin can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// The record is new: no cache holds an older state of it.
    pub created: bool,
}

/// Drops the shared cache entry of a change whose first attempt could not reach Redis, and
/// then announces the change again: replicas that read the stale entry meanwhile took it into
/// their own caches.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct ForgetAgain {
    entity: Entity,
    id: String,
    /// After this the stale entry has expired by its ttl.
    until: Instant,
    /// Until the next attempt: doubles from a second to a minute while Redis stays away.
    delay: Duration,
}

/// Counts in the stored configuration version, and announces, a change made here whose first
/// count failed: until it is counted, replicas that missed its announcement would never learn
/// of it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct CountAgain {
    entity: Entity,
    id: String,
    /// Until the next attempt: doubles from a second to a minute while the database is away.
    delay: Duration,
}

const FIRST_FORGET_RETRY: Duration = Duration::from_secs(1);
const LAST_FORGET_RETRY: Duration = Duration::from_secs(60);

/// Reads the stored configuration version now; a full resync follows when it is ahead of what
/// this replica applied.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct CheckVersion {
    /// Resync at the first sight of a newer version (the channel was down, so nothing else
    /// will bring the change).
    at_once: bool,
}

/// Owns the reaction to configuration changes, local and announced, and the configuration
/// version this replica has applied.
pub struct ConfigSyncActor {
    caches: Caches,
    bus: Arc<Bus>,
    db: Db,
    /// The configuration version everything held here reflects.
    version: i64,
    /// Versions announced beyond `version + 1`, applied but waiting for the ones between.
    ahead: BTreeSet<i64>,
    /// The last check found the stored version ahead, perhaps of an announcement on its way.
    behind: bool,
    /// A reload failed (the database was away): what is held here may be older than `version`
    /// says, so the next check reloads everything whatever the stored version.
    stale: bool,
    check_every: Duration,
}

/// What a change makes stale.
#[derive(Clone)]
pub struct Caches {
    pub auth: Arc<AuthCache>,
    pub shared: Arc<SharedCache>,
    pub pools: Arc<KeyPools>,
    pub mapper: Arc<ModelMapper>,
    pub prices: Arc<PriceBook>,
}

impl ConfigSyncActor {
    /// An actor keeping `caches` current. `version` is the configuration version read before
    /// they were loaded; the stored version is read every `check_every`.
    pub fn new(caches: Caches, bus: Arc<Bus>, db: Db, version: i64, check_every: Duration) -> Self {
        ConfigSyncActor {
            caches,
            bus,
            db,
            version,
            ahead: BTreeSet::new(),
            behind: false,
            stale: false,
            check_every,
        }
    }

    /// Counts version `v` as applied, and any announced after it that were waiting for it.
    fn advance(&mut self, v: i64) {
        if v > self.version {
            self.ahead.insert(v);
        }
        while self.ahead.remove(&(self.version + 1)) {
            self.version += 1;
        }
    }

    /// Everything was reloaded from the database as of version `v`.
    fn resynced(&mut self, v: i64) {
        self.version = self.version.max(v);
        let version = self.version;
        self.ahead.retain(|&a| a > version);
        self.advance(version);
        self.behind = false;
        self.stale = false;
    }

    /// Version `v` was announced; `reloaded` tells whether its reload succeeded.
    fn applied(&mut self, v: i64, reloaded: bool) {
        self.advance(v);
        if !reloaded {
            self.stale = true;
        }
    }
}

impl Actor for ConfigSyncActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.bus.listen(ctx.address().recipient());
        ctx.run_interval(self.check_every, |act, ctx| {
            let at_once = !act.bus.is_listening();
            ctx.notify(CheckVersion { at_once });
        });
    }
}

impl Handler<Changed> for ConfigSyncActor {
    // Reloads finish before the reply, so the admin's answer means the change is in force here
    // and announced; messages run one at a time, so an older snapshot can never land after a
    // newer one.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Changed, _: &mut Self::Context) -> Self::Result {
        let (caches, bus, db) = (self.caches.clone(), self.bus.clone(), self.db.clone());
        let (entity, id) = (msg.entity, msg.id.clone());
        let work = async move {
            // The shared entry goes first: this replica's next call must not find it there.
            let forgotten = match shared_kind(msg.entity) {
                Some(kind) if !msg.created => caches.shared.forget(kind, &msg.id).await,
                _ => true,
            };
            let reloaded = react(&caches, &db, msg.entity, &msg.id).await;
            let version = count_change(&db, &bus, msg.entity, &msg.id).await;
            (version, reloaded, forgotten)
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            move |(version, reloaded, forgotten), act, ctx| {
                match version {
                    Some(v) => act.applied(v, reloaded),
                    None => {
                        act.stale |= !reloaded;
                        let again = CountAgain {
                            entity,
                            id: id.clone(),
                            delay: FIRST_FORGET_RETRY,
                        };
                        ctx.notify_later(again, FIRST_FORGET_RETRY);
                    }
                }
                if !forgotten {
                    let again = ForgetAgain {
                        entity,
                        id,
                        until: Instant::now() + act.caches.shared.ttl(),
                        delay: FIRST_FORGET_RETRY,
                    };
                    ctx.notify_later(again, FIRST_FORGET_RETRY);
                }
            },
        )))
    }
}

impl Handler<CountAgain> for ConfigSyncActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: CountAgain, _: &mut Self::Context) -> Self::Result {
        let (bus, db) = (self.bus.clone(), self.db.clone());
        let work = async move {
            let version = count_change(&db, &bus, msg.entity, &msg.id).await;
            (msg, version)
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            |(mut msg, version), act, ctx| match version {
                // This replica reloaded when the change was made; what it holds is as of `v`
                // unless a reload failed, which `stale` remembers.
                Some(v) => act.advance(v),
                None => {
                    msg.delay = (msg.delay * 2).min(LAST_FORGET_RETRY);
                    let delay = msg.delay;
                    ctx.notify_later(msg, delay);
                }
            },
        )))
    }
}

impl Handler<ForgetAgain> for ConfigSyncActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: ForgetAgain, _: &mut Self::Context) -> Self::Result {
        let shared = self.caches.shared.clone();
        let work = async move {
            let kind = shared_kind(msg.entity).expect("only shared kinds are forgotten again");
            let forgotten = shared.forget(kind, &msg.id).await;
            (msg, forgotten)
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            |(mut msg, forgotten), _, ctx| {
                if forgotten {
                    ctx.notify(Changed {
                        entity: msg.entity,
                        id: msg.id,
                        created: false,
                    });
                } else if Instant::now() < msg.until {
                    let delay = (msg.delay * 2).min(LAST_FORGET_RETRY);
                    msg.delay = delay;
                    ctx.notify_later(msg, delay);
                }
            },
        )))
    }
}

/// The shared cache layer holding records of `entity`, if any does.
fn shared_kind(entity: Entity) -> Option<Kind> {
    match entity {
        Entity::User => Some(Kind::User),
        Entity::UserKey => Some(Kind::Key),
        _ => None,
    }
}

impl Handler<Heard> for ConfigSyncActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Heard, ctx: &mut Self::Context) -> Self::Result {
        let announcement = match msg {
            Heard::Subscribed => {
                // Whatever was announced while the channel was down is lost: compare versions.
                ctx.notify(CheckVersion { at_once: true });
                return AtomicResponse::new(Box::pin(actix::fut::ready(())));
            }
            Heard::Announcement(announcement) => announcement,
        };
        let (caches, db) = (self.caches.clone(), self.db.clone());
        match announcement {
            Announcement::Changed {
                entity,
                id,
                version,
            } => {
                let work = async move { react(&caches, &db, entity, &id).await };
                AtomicResponse::new(Box::pin(
                    work.into_actor(self)
                        .map(move |reloaded, act, _| act.applied(version, reloaded)),
                ))
            }
            Announcement::KeyCooling { key_id, until_ms } => {
                let rest = until_ms - chrono::Utc::now().timestamp_millis();
                if rest > 0 {
                    let rest = Duration::from_millis(rest as u64);
                    caches.pools.heard(&key_id, Outcome::RateLimited(rest));
                }
                AtomicResponse::new(Box::pin(actix::fut::ready(())))
            }
            Announcement::KeyRejected { key_id, status } => {
                caches.pools.heard(&key_id, Outcome::Rejected(status));
                AtomicResponse::new(Box::pin(actix::fut::ready(())))
            }
        }
    }
}

impl Handler<CheckVersion> for ConfigSyncActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: CheckVersion, _: &mut Self::Context) -> Self::Result {
        let (caches, db) = (self.caches.clone(), self.db.clone());
        let (applied, stale) = (self.version, self.stale);
        // An announcement may be on its way: with the channel up, resync only when a second
        // check still finds the version ahead.
        let resync_now = msg.at_once || self.behind;
        let work = async move {
            let stored = match repo::meta::config_version(&db).await {
                Ok(v) => v,
                Err(err) => {
                    tracing::debug!(error = %err, "could not read the configuration version");
                    return Checked::Unknown;
                }
            };
            if stored <= applied && !stale {
                return Checked::Current;
            }
            if stored > applied && !stale && !resync_now {
                return Checked::Behind(stored);
            }
            if stale {
                tracing::info!("retrying a failed configuration reload; reloading everything");
            } else {
                tracing::info!(
                    applied,
                    stored,
                    "configuration changes were missed; reloading everything"
                );
            }
            if resync(&caches, &db).await {
                Checked::Resynced(stored)
            } else {
                Checked::Unknown
            }
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            move |checked, act, _| match checked {
                Checked::Behind(stored) => act.behind = stored > act.version,
                Checked::Resynced(stored) => act.resynced(stored),
                Checked::Current => act.behind = false,
                // Nothing learnt: the next check tries again.
                Checked::Unknown => {}
            },
        )))
    }
}

/// What a version check found.
enum Checked {
    /// Nothing to do.
    Current,
    /// The stored version is ahead; an announcement may still bring the change.
    Behind(i64),
    /// Everything was reloaded as of this version.
    Resynced(i64),
    /// The database could not be read: nothing changes until the next check.
    Unknown,
}

/// Counts a change made here in the stored version and announces it; the new version, or
/// None when it could not be counted (it is announced all the same, for the replicas that
/// hear it).
async fn count_change(db: &Db, bus: &Arc<Bus>, entity: Entity, id: &str) -> Option<i64> {
    let version = match repo::meta::bump_config_version(db).await {
        Ok(v) => Some(v),
        Err(err) => {
            tracing::error!(error = %err, "could not count a configuration change; will retry");
            None
        }
    };
    bus.publish(Announcement::Changed {
        entity,
        id: id.to_owned(),
        // Version 0 is never waited for: hearers apply the change and count nothing.
        version: version.unwrap_or(0),
    })
    .await;
    version
}

/// Makes what changed in `entity` `id` stale here; false when a reload failed.
async fn react(caches: &Caches, db: &Db, entity: Entity, id: &str) -> bool {
    tracing::debug!(entity = ?entity, id, "configuration changed");
    match entity {
        Entity::User => {
            caches.auth.invalidate_user(id);
            // A deleted user's own mappings went with it.
            reload_mappings(&caches.mapper, db).await
        }
        Entity::UserKey => {
            caches.auth.invalidate_key(id);
            true
        }
        Entity::UpstreamKey => reload_pools(&caches.pools).await,
        Entity::ModelMapping => reload_mappings(&caches.mapper, db).await,
        Entity::Price => reload_prices(&caches.prices, db).await,
    }
}

/// Reloads everything that can change, after changes were missed; false when a reload failed.
async fn resync(caches: &Caches, db: &Db) -> bool {
    caches.auth.invalidate_all_users();
    // Keys change only by revocation or deletion: keep the verified ones still live, so a
    // resync costs a few queries instead of argon2 for every caller.
    for ids in caches.auth.key_ids().chunks(500) {
        match repo::user_keys::live_ids(db, ids).await {
            Ok(live) => {
                for id in ids.iter().filter(|id| !live.contains(id)) {
                    caches.auth.invalidate_key(id);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "could not check cached keys; forgetting them");
                ids.iter().for_each(|id| caches.auth.invalidate_key(id));
            }
        }
    }
    // All three run even when one fails: each holds what it could read.
    let pools = reload_pools(&caches.pools).await;
    let mappings = reload_mappings(&caches.mapper, db).await;
    let prices = reload_prices(&caches.prices, db).await;
    pools && mappings && prices
}

async fn reload_pools(pools: &KeyPools) -> bool {
    pools
        .reload()
        .await
        .map_err(|err| tracing::error!(error = %err, "reloading upstream keys failed"))
        .is_ok()
}

async fn reload_mappings(mapper: &ModelMapper, db: &Db) -> bool {
    mapper
        .reload(db)
        .await
        .map_err(|err| tracing::error!(error = %err, "reloading model mappings failed"))
        .is_ok()
}

async fn reload_prices(prices: &PriceBook, db: &Db) -> bool {
    repo::prices::all(db)
        .await
        .map(|all| prices.replace(all))
        .map_err(|err| tracing::error!(error = %err, "reloading prices failed"))
        .is_ok()
}
