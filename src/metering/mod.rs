//! Metering: every call's usage, cost and log entry, worked out and written in the background.
//!
//! The request path only hands a finished call's record to the [`record::Recorder`] queue. The
//! `UsageAccountant` empties it, reads the usage (`usage`), prices it (`prices`), keeps spend
//! (`spend`) and writes each call as one request-log row carrying its usage, in batches, with
//! the spend they add; `LogRetention` prunes old entries into daily sums. Both run on their own
//! thread, with their own database connections; the accountant is flushed at shutdown.

pub mod accountant;
pub mod buffer;
pub mod meter;
pub mod metrics;
pub mod observed;
pub mod prices;
pub mod record;
pub mod retention;
pub mod spend;
pub mod usage;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Arbiter};
use anyhow::Context;

use crate::config::Settings;
use crate::db::{repo, Db};
use accountant::{Flush, FlushReport, Ledger, UsageAccountant};
use metrics::Metrics;
use prices::PriceBook;
use record::Recorder;
use retention::LogRetention;
use spend::{SharedSpend, SpendBook};

/// Connections of metering's own pool: the writer, pruning, and reads of spend.
const METERING_CONNECTIONS: usize = 3;

/// The metering side of one instance.
pub struct Metering {
    pub recorder: Arc<Recorder>,
    pub prices: Arc<PriceBook>,
    pub spend: Arc<SpendBook>,
    pub metrics: Arc<Metrics>,
    accountant: Addr<UsageAccountant>,
    arbiter: Arbiter,
    flush_for: Duration,
}

impl Metering {
    /// Seeds and loads the prices, then starts the accountant and the log's retention on a
    /// thread of their own.
    pub async fn start(settings: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let mut db_settings = settings.database.clone();
        db_settings.max_connections = METERING_CONNECTIONS;
        let db = Db::connect(&db_settings).context("building metering's database pool")?;
        if settings.metering.seed_prices {
            let added = repo::prices::insert_missing(&db, &prices::default_prices()?)
                .await
                .context("seeding the price table")?;
            if added > 0 {
                tracing::info!(added, "seeded prices from the shipped table");
            }
        }
        let prices = Arc::new(PriceBook::default());
        prices.replace(repo::prices::all(&db).await.context("loading prices")?);
        let shared = match settings.redis.url.trim() {
            "" => None,
            url => Some(Arc::new(SharedSpend::new(
                url,
                &settings.redis.key_prefix,
                Duration::from_millis(settings.redis.timeout_ms),
            )?)),
        };
        let recorder = Arc::new(Recorder::new(settings.metering.buffer_records));
        let spend = Arc::new(SpendBook::default());
        let ledger = Ledger {
            recorder: recorder.clone(),
            db: db.clone(),
            prices: prices.clone(),
            spend: spend.clone(),
            shared,
            metrics: metrics.clone(),
        };
        let arbiter = Arbiter::new();
        // First on its thread: the SQLite writes run on threads this one starts, which inherit
        // its lower priority.
        arbiter.spawn_fn(crate::sched::yield_to_request_path);
        if let Some(retention) = LogRetention::new(db, settings.metering.log_retention_days) {
            LogRetention::start_in_arbiter(&arbiter.handle(), move |_| retention);
        }
        let metering = settings.metering.clone();
        let accountant = UsageAccountant::start_in_arbiter(&arbiter.handle(), move |_| {
            UsageAccountant::new(ledger, &metering)
        });
        Ok(Metering {
            recorder,
            prices,
            spend,
            metrics,
            accountant,
            arbiter,
            flush_for: Duration::from_secs(settings.metering.shutdown_flush_secs),
        })
    }

    /// Writes everything metered so far (at shutdown, once the server has drained), then stops
    /// the writers' thread.
    pub async fn flush(&self) -> FlushReport {
        let deadline = Instant::now() + self.flush_for;
        let sent = self.accountant.send(Flush { deadline });
        let report = match tokio::time::timeout(self.flush_for + Duration::from_secs(1), sent).await
        {
            Ok(Ok(report)) => report,
            Ok(Err(err)) => {
                tracing::error!(error = %err, "metering's writers are gone: what they held is lost");
                return FlushReport::default();
            }
            Err(_) => {
                tracing::error!("the final write of usage and logs did not finish in time");
                return FlushReport::default();
            }
        };
        if report == FlushReport::default() {
            tracing::info!("usage and request logs written");
        } else {
            tracing::error!(
                calls_left = report.calls_left,
                "the database did not take every call's log entry and usage before shutdown"
            );
        }
        self.arbiter.stop();
        report
    }
}
