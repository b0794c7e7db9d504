//! `RateLimiterActor`: the limiter's work that waits for nothing on the request path: settling
//! each call's token charge once its usage is known, pruning idle windows, and watching Redis
//! (connecting at start, noticing it is back after an outage).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::limits::{RateLimiter, RedisState, Ticket};
use crate::proxy::usage::Observed;

/// How often Redis is re-checked while away, and idle windows are pruned.
const TICK: Duration = Duration::from_secs(1);
/// Ticks between two prunes.
const PRUNE_EVERY: u32 = 30;

/// Settles an admitted call once its answer has been relayed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settle {
    pub ticket: Ticket,
    pub observed: Observed,
}

/// Owns the limiter's background duties.
pub struct RateLimiterActor {
    limiter: Arc<RateLimiter>,
    ticks: u32,
    checking: bool,
}

impl RateLimiterActor {
    pub fn new(limiter: Arc<RateLimiter>) -> Self {
        RateLimiterActor {
            limiter,
            ticks: 0,
            checking: false,
        }
    }

    fn check_redis(&mut self, ctx: &mut Context<Self>) {
        if self.checking || self.limiter.redis_state() != RedisState::Down {
            return;
        }
        self.checking = true;
        let limiter = self.limiter.clone();
        let check = async move {
            let Some(redis) = limiter.redis() else {
                return;
            };
            match redis.check().await {
                Ok(true) => {
                    // Counts kept during the outage describe a window Redis now owns again.
                    limiter.local().clear();
                    tracing::info!("redis answers: rate limits are shared across replicas again");
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::debug!(error = %crate::limits::describe(&err), "redis still unavailable");
                }
            }
        };
        ctx.spawn(
            check
                .into_actor(self)
                .map(|(), actor, _| actor.checking = false),
        );
    }
}

impl Actor for RateLimiterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.limiter.redis_state() == RedisState::Down {
            tracing::info!("connecting to redis for shared rate limits");
        }
        self.check_redis(ctx);
        ctx.run_interval(TICK, |actor, ctx| {
            actor.ticks += 1;
            if actor.ticks % PRUNE_EVERY == 0 {
                actor.limiter.prune();
            }
            actor.check_redis(ctx);
        });
    }
}

impl Handler<Settle> for RateLimiterActor {
    type Result = ();

    fn handle(&mut self, msg: Settle, ctx: &mut Self::Context) {
        let actual = match msg.observed.total_tokens() {
            Some(tokens) => tokens,
            // Nothing came back that a provider charges for: give the estimate back.
            None if !msg.observed.succeeded => 0,
            None => return,
        };
        let limiter = self.limiter.clone();
        ctx.spawn(async move { limiter.settle(&msg.ticket, actual).await }.into_actor(self));
    }
}
