//! `LogWriter`: the request log. Rows arrive in batches from the accountant, are written as
//! multi-row inserts, held through a database outage, and pruned by age.

use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::TimeDelta;

use super::buffer::{write_all, BatchBuffer};
use super::metrics::Metrics;
use crate::config::MeteringSettings;
use crate::db::models::LogRow;
use crate::db::{repo, Db};
use crate::domain::now;

/// How often the buffer is checked for a due write.
const TICK: Duration = Duration::from_millis(100);
/// How often old entries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Log rows to write.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Log(pub Vec<LogRow>);

/// Writes everything buffered, until `deadline`; answers how many rows are left unwritten.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct FlushLogs {
    pub deadline: Instant,
}

pub struct LogWriter {
    db: Db,
    metrics: std::sync::Arc<Metrics>,
    buffer: BatchBuffer<LogRow>,
    retention: Option<TimeDelta>,
}

impl LogWriter {
    pub fn new(db: Db, metrics: std::sync::Arc<Metrics>, settings: &MeteringSettings) -> Self {
        LogWriter {
            db,
            metrics,
            buffer: BatchBuffer::new(
                "logs",
                settings.buffer_records,
                settings.batch_size,
                Duration::from_millis(settings.flush_interval_ms),
            ),
            retention: (settings.log_retention_days > 0)
                .then(|| TimeDelta::days(settings.log_retention_days as i64)),
        }
    }

    fn report(&mut self) {
        let dropped = self.buffer.take_dropped();
        if dropped > 0 {
            tracing::warn!(dropped, "request log buffer full: entries dropped");
            self.metrics.dropped("logs", dropped);
        }
        self.metrics.queue_depth("logs", self.buffer.len());
    }

    /// Writes one batch if one is due; the actor waits for it, so writes never overlap.
    fn write(&mut self, ctx: &mut Context<Self>) {
        if !self.buffer.due(Instant::now()) {
            return;
        }
        let batch = self.buffer.take_batch();
        let db = self.db.clone();
        let write = async move {
            match repo::logs::insert_batch(&db, &batch).await {
                Ok(_) => Ok(()),
                Err(e) => Err((e, batch)),
            }
        };
        ctx.wait(write.into_actor(self).map(|result, actor, ctx| {
            match result {
                Ok(()) => actor.buffer.written(),
                Err((error, batch)) => actor.buffer.failed(batch, &error),
            }
            actor.report();
            actor.write(ctx);
        }));
    }

    fn prune(&self, ctx: &mut Context<Self>) {
        let Some(retention) = self.retention else {
            return;
        };
        let db = self.db.clone();
        ctx.spawn(
            async move {
                match repo::logs::prune(&db, now() - retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "pruned old request logs"),
                    Err(e) => tracing::warn!(error = %e, "pruning request logs failed"),
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for LogWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, |actor, ctx| actor.write(ctx));
        ctx.run_later(Duration::from_secs(10), |actor, ctx| actor.prune(ctx));
        ctx.run_interval(PRUNE_EVERY, |actor, ctx| actor.prune(ctx));
    }
}

impl Handler<Log> for LogWriter {
    type Result = ();

    fn handle(&mut self, msg: Log, ctx: &mut Self::Context) {
        for row in msg.0 {
            self.buffer.push(row);
        }
        self.report();
        self.write(ctx);
    }
}

impl Handler<FlushLogs> for LogWriter {
    type Result = AtomicResponse<Self, usize>;

    fn handle(&mut self, msg: FlushLogs, _: &mut Self::Context) -> Self::Result {
        let rows = self.buffer.take_all();
        let db = self.db.clone();
        let batch = self.buffer.batch();
        let write = write_all(rows, batch, msg.deadline, move |batch| {
            let db = db.clone();
            async move {
                match repo::logs::insert_batch(&db, &batch).await {
                    Ok(n) => Ok(n),
                    Err(e) => Err((e, batch)),
                }
            }
        });
        AtomicResponse::new(Box::pin(write.into_actor(self).map(
            |(_, left), actor, _| {
                let n = left.len();
                actor.buffer.restore(left);
                actor.report();
                n
            },
        )))
    }
}
