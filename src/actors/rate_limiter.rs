//! The rate limiter's work that waits for nothing on the request path.
//!
//! - `RateLimiterActor`, one per worker thread: settles each call's token charge once its answer
//!   has been relayed. It lives on the worker that served the call, so a settlement is a
//!   same-thread message, not a wake-up of another thread per call.
//! - `LimiterUpkeep`, one per process: connects to Redis, notices when it is back after an
//!   outage, and prunes idle windows.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::limits::redis_store::RedisLink;
use crate::limits::{RateLimiter, RedisState, Ticket};

/// How often Redis is re-checked while away, and idle windows are pruned.
const TICK: Duration = Duration::from_secs(1);
/// Ticks between two prunes.
const PRUNE_EVERY: u32 = 30;

/// Settles an admitted call once its answer has been relayed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settle {
    pub ticket: Ticket,
    /// The tokens the provider reported, if it reported any.
    pub actual: Option<i64>,
    /// Whether the provider answered 2xx.
    pub succeeded: bool,
}

/// Settles the calls of one worker thread, over that worker's Redis connection.
pub struct RateLimiterActor {
    limiter: Arc<RateLimiter>,
    link: Rc<RedisLink>,
}

impl RateLimiterActor {
    pub fn new(limiter: Arc<RateLimiter>, link: Rc<RedisLink>) -> Self {
        RateLimiterActor { limiter, link }
    }
}

impl Actor for RateLimiterActor {
    type Context = Context<Self>;
}

impl Handler<Settle> for RateLimiterActor {
    type Result = ();

    fn handle(&mut self, msg: Settle, ctx: &mut Self::Context) {
        let actual = match msg.actual {
            Some(tokens) => tokens,
            // Nothing came back that a provider charges for: give the estimate back.
            None if !msg.succeeded => 0,
            None => return,
        };
        let (limiter, link) = (self.limiter.clone(), self.link.clone());
        ctx.spawn(async move { limiter.settle(&msg.ticket, actual, &link).await }.into_actor(self));
    }
}

/// Watches Redis and prunes the in-process windows.
pub struct LimiterUpkeep {
    limiter: Arc<RateLimiter>,
    ticks: u32,
    checking: bool,
}

impl LimiterUpkeep {
    pub fn new(limiter: Arc<RateLimiter>) -> Self {
        LimiterUpkeep {
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

impl Actor for LimiterUpkeep {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
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
