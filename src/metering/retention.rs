//! `LogRetention`: prunes request-log entries older than `metering.log_retention_days`, hourly,
//! first rolling their usage up into daily sums so `/admin/usage` keeps counting them.

use std::time::Duration;

use actix::prelude::*;
use chrono::TimeDelta;

use crate::db::{repo, Db};
use crate::domain::now;

/// How often old entries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The first prune, shortly after the start.
const FIRST_PRUNE: Duration = Duration::from_secs(10);

pub struct LogRetention {
    db: Db,
    keep: TimeDelta,
}

impl LogRetention {
    /// Keeps `days` of request logs; `None` when they are kept forever.
    pub fn new(db: Db, days: u64) -> Option<Self> {
        (days > 0).then(|| LogRetention {
            db,
            keep: TimeDelta::days(days.min(365_000) as i64),
        })
    }

    fn prune(&self, ctx: &mut Context<Self>) {
        let (db, before) = (self.db.clone(), now() - self.keep);
        ctx.spawn(
            async move {
                match repo::logs::prune(&db, before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "pruned old request logs"),
                    Err(e) => tracing::warn!(error = %e, "pruning request logs failed"),
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for LogRetention {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_later(FIRST_PRUNE, |actor, ctx| actor.prune(ctx));
        ctx.run_interval(PRUNE_EVERY, |actor, ctx| actor.prune(ctx));
    }
}
