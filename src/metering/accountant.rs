//! `UsageAccountant`: turns each finished call into its usage, cost and log entry, off the
//! request path. It empties the recorder's queue every few milliseconds, prices what each call
//! used, keeps every user's spend (shared across replicas through Redis when configured), and
//! writes the calls in batches: one request-log row per call, carrying its usage, in the same
//! transaction as the spend they add.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::buffer::{write_all, BatchBuffer};
use super::metrics::Metrics;
use super::prices::{cost_nanos, PriceBook};
use super::record::{CallRecord, Recorder};
use super::spend::{SharedSpend, SpendBook};
use super::usage::{self, Endpoint, Usage};
use crate::config::MeteringSettings;
use crate::db::models::LogRow;
use crate::db::repo::usage::SpendWritten;
use crate::db::{repo, Db};
use crate::domain::money::nanos_to_usd;
use crate::pacing::{Slice, STEP_ASIDE_ASYNC};

/// How often the recorder's queue is emptied.
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// Past this many calls waiting, the accountant stops stepping aside between slices and works
/// until it has caught up: every call metered matters more than latency at saturation.
const CATCH_UP_AT: usize = 2_000;
/// How often the spend of this replica's users is read back from the shared store.
const REFRESH_SPEND_EVERY: Duration = Duration::from_secs(1);

/// Writes everything (calls still queued included) until `deadline`.
#[derive(Message)]
#[rtype(result = "FlushReport")]
pub struct Flush {
    pub deadline: Instant,
}

/// What the final flush could not write.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    pub calls_left: usize,
}

/// What the accountant works with.
pub struct Ledger {
    pub recorder: Arc<Recorder>,
    pub db: Db,
    pub prices: Arc<PriceBook>,
    pub spend: Arc<SpendBook>,
    pub shared: Option<Arc<SharedSpend>>,
    pub metrics: Arc<Metrics>,
}

pub struct UsageAccountant {
    ledger: Ledger,
    /// Calls taken from the recorder and not yet accounted. While it holds any, the next
    /// slice of the drain is scheduled.
    backlog: VecDeque<CallRecord>,
    buffer: BatchBuffer<LogRow>,
    /// Models already reported as having no price.
    unpriced: HashSet<String>,
    refreshing: bool,
}

impl UsageAccountant {
    pub fn new(ledger: Ledger, settings: &MeteringSettings) -> Self {
        UsageAccountant {
            ledger,
            backlog: VecDeque::new(),
            buffer: BatchBuffer::new(
                "calls",
                settings.buffer_records,
                settings.batch_size,
                Duration::from_millis(settings.flush_interval_ms),
            ),
            unpriced: HashSet::new(),
            refreshing: false,
        }
    }

    /// Takes the recorder's queue into the backlog.
    fn collect(&mut self) {
        self.backlog.extend(self.ledger.recorder.take());
        let dropped = self.ledger.recorder.take_dropped();
        if dropped > 0 {
            tracing::warn!(dropped, "metering queue full: calls dropped unmetered");
            self.ledger.metrics.dropped("calls", dropped);
        }
    }

    /// Accounts the backlog into rows to write, one slice at a time: between slices the
    /// thread steps aside (see `pacing`), unless the backlog is long enough to need catching up.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        self.collect();
        let slice = Slice::start();
        while let Some(record) = self.backlog.pop_front() {
            let row = self.account(record);
            if let Some(lost) = self.buffer.push(row) {
                self.forget(&[lost]);
            }
            if slice.spent() && self.backlog.len() < CATCH_UP_AT {
                break;
            }
        }
        self.report_depths();
        self.write(ctx);
        if !self.backlog.is_empty() {
            ctx.run_later(STEP_ASIDE_ASYNC, |actor, ctx| actor.drain(ctx));
        }
    }

    /// Accounts everything queued at once (the final flush).
    fn drain_all(&mut self) {
        self.collect();
        while let Some(record) = self.backlog.pop_front() {
            let row = self.account(record);
            if let Some(lost) = self.buffer.push(row) {
                self.forget(&[lost]);
            }
        }
        self.report_depths();
    }

    /// Rows the write buffer had to drop: the spend they added here will never be written,
    /// so it leaves the users' pending spend (else their budget checks would count it for as
    /// long as this replica runs).
    fn forget(&self, lost: &[LogRow]) {
        for row in lost {
            if let Some(user_id) = &row.user_id {
                self.ledger.spend.release(user_id, row.cost_nanos);
            }
        }
    }

    /// Rows dropped for want of room, and the queues' depths, for logs and metrics.
    fn report_depths(&mut self) {
        let dropped = self.buffer.take_dropped();
        if dropped > 0 {
            tracing::warn!(dropped, "write buffer full: calls dropped unwritten");
            self.ledger.metrics.dropped("writes", dropped);
        }
        self.ledger
            .metrics
            .queue_depth("calls", self.ledger.recorder.len() + self.backlog.len());
        self.ledger.metrics.queue_depth("writes", self.buffer.len());
    }

    /// One call: its usage and cost, its metrics, its log entry.
    fn account(&mut self, mut record: CallRecord) -> LogRow {
        let metrics = self.ledger.metrics.clone();
        for (key, outcome) in &record.failures {
            metrics.attempt(key, outcome);
        }
        if let Some(key) = &record.upstream_key_id {
            metrics.attempt(key, "answered");
        }
        metrics.call(
            record.route,
            record.model.as_deref(),
            record.status,
            record.latency.as_secs_f64(),
            record.ttfb.map(|t| t.as_secs_f64()),
        );
        let model = record.upstream_model.clone().unwrap_or_default();
        let reported = record
            .reported
            .take()
            .or_else(|| usage::reported(record.endpoint, &record.observed));
        let measured = usage::measure(
            record.endpoint,
            &record.observed,
            reported,
            &record.request,
            &model,
        );
        // A call an upstream answered is recorded even when it reported no usage.
        let usage = measured.or_else(|| record.observed.succeeded().then(Usage::default));
        let partial = record.observed.succeeded() && record.observed.partial();
        let cost = usage.as_ref().map_or(0, |u| self.cost(&record, &model, u));
        if let Some(usage) = &usage {
            metrics.usage(&model, usage, nanos_to_usd(cost));
            self.ledger.spend.add_pending(&record.user_id, cost);
        }
        let usage = usage.as_ref();
        let count = |f: fn(&Usage) -> i64| usage.map_or(0, f);
        LogRow {
            id: record.request_id,
            ts: record.ts,
            user_id: Some(record.user_id),
            key_id: Some(record.key_id),
            route: record.route.to_owned(),
            model: storable(record.model),
            upstream_model: storable(record.upstream_model),
            upstream_key_id: record.upstream_key_id,
            level: record.level,
            status: i32::from(record.status),
            attempts: record.attempts as i32,
            latency_ms: record.latency.as_millis() as i64,
            ttfb_ms: record.ttfb.map(|t| t.as_millis() as i64),
            prompt_tokens: count(|u| u.prompt_tokens),
            completion_tokens: count(|u| u.completion_tokens),
            cost_nanos: cost,
            partial,
            error_code: record.error_code.map(str::to_owned),
            metered: usage.is_some(),
            reasoning_tokens: count(|u| u.reasoning_tokens),
            cached_tokens: count(|u| u.cached_tokens),
            images: count(|u| u.images),
            audio_seconds: usage.map_or(0.0, |u| u.audio_seconds),
            characters: count(|u| u.characters),
        }
    }

    /// The cost of `usage` at the price of `model` (0 when the model has no price, which is
    /// logged once per model).
    fn cost(&mut self, record: &CallRecord, model: &str, usage: &Usage) -> i64 {
        let image =
            (record.endpoint == Endpoint::Images).then(|| usage::image_spec(&record.request));
        match self.ledger.prices.price_of(model, image.as_ref()) {
            Some(price) => cost_nanos(usage, &price),
            None => {
                if self.unpriced.insert(model.to_owned()) {
                    tracing::warn!(model, "no price for this model: its calls are metered at no cost; set one with PUT /admin/prices/{{model}}");
                }
                0
            }
        }
    }

    /// Writes one batch of usage if one is due; the actor waits for it, so writes never overlap.
    fn write(&mut self, ctx: &mut Context<Self>) {
        if !self.buffer.due(Instant::now()) {
            return;
        }
        let batch = self.buffer.take_batch();
        let db = self.ledger.db.clone();
        let write = async move { repo::usage::insert_batch(&db, batch).await };
        ctx.wait(write.into_actor(self).map(|result, actor, ctx| {
            match result {
                Ok(written) => {
                    actor.buffer.written();
                    actor.confirm(&[written], ctx);
                }
                Err((error, batch)) if error.is_refusal() => {
                    let lost = actor.buffer.refused(batch, &error);
                    for row in &lost {
                        tracing::error!(request_id = %row.id, error = %error, "the database refused this call's log row: dropped and counted");
                    }
                    actor.forget(&lost);
                    actor.ledger.metrics.dropped("writes", lost.len() as u64);
                }
                Err((error, batch)) => {
                    let lost = actor.buffer.failed(batch, &error);
                    actor.forget(&lost);
                }
            }
            actor.write(ctx);
        }));
    }

    /// Spend that reached the database: confirmed here, and published to the other replicas.
    fn confirm(&self, written: &[SpendWritten], ctx: &mut Context<Self>) {
        let mut totals = Vec::new();
        for (user, cost, total) in written.iter().flat_map(|w| w.users.iter()) {
            self.ledger.spend.confirm(user, *cost, *total);
            totals.push((user.clone(), *total));
        }
        if let (Some(shared), false) = (self.ledger.shared.clone(), totals.is_empty()) {
            ctx.spawn(
                async move {
                    if let Err(e) = shared.publish(&totals).await {
                        tracing::debug!(error = %crate::limits::describe(&e), "publishing spend to redis failed");
                    }
                }
                .into_actor(self),
            );
        }
    }

    /// Reads back the spend of the users this replica checks budgets for, as the other replicas
    /// left it (Redis), or as stored (the database, when there is no Redis).
    fn refresh_spend(&mut self, ctx: &mut Context<Self>) {
        if self.refreshing {
            return;
        }
        let users = self.ledger.spend.watched();
        if users.is_empty() {
            return;
        }
        self.refreshing = true;
        let (shared, db, spend) = (
            self.ledger.shared.clone(),
            self.ledger.db.clone(),
            self.ledger.spend.clone(),
        );
        let refresh = async move {
            let totals = match shared {
                Some(shared) => shared
                    .read(&users)
                    .await
                    .map_err(|e| crate::limits::describe(&e)),
                None => repo::usage::spent(&db, &users)
                    .await
                    .map_err(|e| e.to_string()),
            };
            match totals {
                Ok(totals) => totals.iter().for_each(|(u, t)| spend.refresh(u, *t)),
                Err(e) => tracing::debug!(error = %e, "reading shared spend failed"),
            }
        };
        ctx.spawn(
            refresh
                .into_actor(self)
                .map(|(), actor, _| actor.refreshing = false),
        );
    }
}

impl Actor for UsageAccountant {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(DRAIN_EVERY, |actor, ctx| {
            // A backlog means a drain is under way, its next slice scheduled.
            if actor.backlog.is_empty() {
                actor.drain(ctx);
            }
        });
        ctx.run_interval(REFRESH_SPEND_EVERY, |actor, ctx| actor.refresh_spend(ctx));
    }
}

impl Handler<Flush> for UsageAccountant {
    type Result = AtomicResponse<Self, FlushReport>;

    fn handle(&mut self, msg: Flush, _: &mut Self::Context) -> Self::Result {
        self.drain_all();
        let rows = self.buffer.take_all();
        let db = self.ledger.db.clone();
        let batch = self.buffer.batch();
        let flush = write_all(rows, batch, msg.deadline, move |batch| {
            let db = db.clone();
            async move { repo::usage::insert_batch(&db, batch).await }
        });
        AtomicResponse::new(Box::pin(flush.into_actor(self).map(
            |(written, left), actor, ctx| {
                actor.confirm(&written, ctx);
                let report = FlushReport {
                    calls_left: left.len(),
                };
                actor.buffer.restore(left);
                report
            },
        )))
    }
}

/// Text PostgreSQL can store. The data plane refuses control characters in a model name, but a
/// NUL slipping through would have the database refuse its batch, and every batch behind it,
/// for as long as the router runs: it becomes U+FFFD instead.
fn storable(text: Option<String>) -> Option<String> {
    text.map(|t| {
        if t.contains('\0') {
            t.replace('\0', "\u{FFFD}")
        } else {
            t
        }
    })
}

#[cfg(test)]
mod tests {
    use super::storable;

    #[test]
    fn a_nul_in_logged_text_is_replaced_so_postgresql_takes_the_row() {
        assert_eq!(
            storable(Some("gpt\0x".into())).as_deref(),
            Some("gpt\u{FFFD}x")
        );
        assert_eq!(storable(Some("gpt-4o".into())).as_deref(), Some("gpt-4o"));
        assert_eq!(storable(None), None);
    }
}
