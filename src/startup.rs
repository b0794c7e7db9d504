//! Builds the whole service from settings: migrations, storage, secrets, actors, HTTP server.

use std::net::TcpListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::dev::Server;
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, ErrorHandlers};
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use tracing_actix_web::TracingLogger;

use crate::access::Gate;
use crate::actors::config_sync::{Caches, ConfigSyncActor};
use crate::actors::key_pool::PoolPolicy;
use crate::actors::key_prober::KeyProberActor;
use crate::actors::rate_limiter::{LimiterUpkeep, RateLimiterActor};
use crate::auth::cache::CacheStats;
use crate::auth::{AuthCache, Authenticator, SharedCache};
use crate::bootstrap;
use crate::cluster::bus::Bus;
use crate::config::Settings;
use crate::db::{migrate, repo, Db};
use crate::limits::redis_store::RedisLink;
use crate::limits::{self, RateLimiter};
use crate::metering::metrics::Metrics;
use crate::metering::Metering;
use crate::proxy::affinity::ResponseAffinity;
use crate::proxy::{Proxy, Worker};
use crate::routes;
use crate::routing::{KeyPools, ModelMapper};
use crate::state::AppState;
use crate::telemetry::{self, RequestSpan};
use crate::upstream;

/// Waits for SIGTERM or SIGINT; returns which.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM and SIGINT; stop the process by other means");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// How long a stop waits for the calls its grace period cut to hand over their records.
const CUT_CALLS_WAIT: Duration = Duration::from_secs(5);

/// A built, bound, not yet running service.
pub struct Application {
    port: u16,
    server: Server,
    metering: Arc<Metering>,
}

impl Application {
    /// Migrates the database, prepares secrets and binds the listener (port 0 picks a free port,
    /// which tests use). Must be called inside an actix System.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Secrets first: a missing master key stops the start before the database is touched.
        let secrets = bootstrap::resolve_secrets(&settings)?;
        let applied = migrate::run_pending_off_thread(settings.database.url.clone()).await?;
        let db = Db::connect(&settings.database).context("building the database pool")?;
        tracing::info!(
            backend = db.backend_name(),
            migrations_applied = applied,
            "database ready"
        );
        bootstrap::verify_master_key(&db, &secrets.master_key).await?;
        bootstrap::seed_first_start(&db, &secrets.master_key).await?;
        // Read before anything is loaded (prices, keys, mappings): a change stored meanwhile
        // shows as a newer version and is picked up by the first check.
        let config_version = repo::meta::config_version(&db)
            .await
            .context("reading the configuration version")?;

        let metrics = Arc::new(Metrics::new().context("registering metrics")?);
        let metering = Arc::new(Metering::start(&settings, metrics.clone()).await?);
        let auth_cache = Arc::new(AuthCache::new(
            settings.auth.key_cache_size,
            settings.auth.user_cache_size,
            CacheStats::exported(&metrics),
        ));
        let shared_cache = SharedCache::new(
            &settings.redis.url,
            &settings.redis.key_prefix,
            Duration::from_secs(settings.cluster.shared_cache_ttl_secs),
            Duration::from_millis(settings.redis.timeout_ms),
            secrets.master_key.clone(),
            &metrics,
        )?;
        shared_cache.connect().await;
        let bus = Bus::new(&settings.redis)?;
        let pools = KeyPools::new(
            db.clone(),
            secrets.master_key.clone(),
            PoolPolicy {
                breaker_failures: settings.upstream.breaker_failures,
                breaker_open: Duration::from_secs(settings.upstream.breaker_open_secs),
            },
            bus.clone(),
        );
        pools.reload().await.context("loading upstream keys")?;
        let breakers = pools.breakers();
        let mapper = Arc::new(ModelMapper::default());
        mapper.reload(&db).await.context("loading model mappings")?;
        let config_sync = ConfigSyncActor::new(
            Caches {
                auth: auth_cache.clone(),
                shared: shared_cache.clone(),
                pools: pools.clone(),
                mapper: mapper.clone(),
                prices: metering.prices.clone(),
            },
            bus.clone(),
            db.clone(),
            config_version,
            Duration::from_millis(settings.cluster.version_check_ms.max(50)),
        )
        .start();
        if settings.upstream.reprobe_interval_secs > 0 {
            KeyProberActor::new(
                db.clone(),
                secrets.master_key.clone(),
                config_sync.clone(),
                Duration::from_secs(settings.upstream.reprobe_interval_secs),
            )
            .start();
        }
        let limiter = Arc::new(
            RateLimiter::new(
                &settings.redis.url,
                &settings.redis.key_prefix,
                Duration::from_millis(settings.redis.timeout_ms),
            )
            .context("setting up rate limits")?,
        );
        if let Some(redis) = limiter.redis() {
            // Connect before serving, so a healthy Redis counts from the first call. A Redis
            // that is away does not stop the start: limits are held in process meanwhile.
            match redis.check().await {
                Ok(_) => tracing::info!("redis connected: rate limits are shared across replicas"),
                Err(err) => tracing::warn!(
                    error = %limits::describe(&err),
                    "redis unavailable: rate limits are held in process until it answers"
                ),
            }
        }
        let limiter_upkeep = LimiterUpkeep::new(limiter.clone()).start();
        let proxy = web::Data::new(Proxy {
            pools,
            mapper,
            settings: settings.upstream.clone(),
            limiter: limiter.clone(),
            recorder: metering.recorder.clone(),
            spend: metering.spend.clone(),
            affinity: Arc::new(ResponseAffinity::new(shared_cache.clone())),
            catalog: Arc::default(),
        });
        let gate = web::Data::new(Gate::new(settings.trusted_proxies()?));
        let connect_timeout = Duration::from_secs(settings.upstream.connect_timeout_secs);
        let first_byte_timeout = Duration::from_secs(settings.upstream.first_byte_timeout_secs);
        let state = web::Data::new(AppState {
            db: db.clone(),
            master_key: secrets.master_key,
            admin_token: secrets.admin_token,
            config_sync,
            limiter,
            limiter_upkeep,
            metering: metering.clone(),
            bus,
            breakers,
        });
        let authenticator = web::Data::new(Authenticator::new(db, auth_cache, shared_cache));

        let listener = TcpListener::bind(&settings.server.listen)
            .with_context(|| format!("binding {}", settings.server.listen))?;
        let port = listener.local_addr()?.port();
        let max_body = settings.server.max_body_bytes;
        let mut server = HttpServer::new(move || {
            // This closure runs once on each worker thread: per-thread state starts here.
            crate::sched::favour_request_path();
            let redis = Rc::new(RedisLink::default());
            let worker = web::Data::new(Worker {
                pools: proxy.pools.register_worker(),
                client: upstream::client::build(connect_timeout, first_byte_timeout),
                settler: RateLimiterActor::new(proxy.limiter.clone(), redis.clone()).start(),
                redis,
            });
            App::new()
                .app_data(worker)
                .app_data(proxy.clone())
                .app_data(state.clone())
                .app_data(authenticator.clone())
                .app_data(gate.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(max_body)
                        .error_handler(routes::json_error),
                )
                .app_data(web::PayloadConfig::new(max_body))
                .app_data(web::QueryConfig::default().error_handler(routes::query_error))
                .app_data(web::PathConfig::default().error_handler(routes::path_error))
                .configure(routes::configure)
                .default_service(web::to(routes::not_found))
                .wrap(
                    ErrorHandlers::new()
                        .handler(StatusCode::METHOD_NOT_ALLOWED, routes::json_error_page)
                        .handler(StatusCode::PAYLOAD_TOO_LARGE, routes::json_error_page),
                )
                .wrap(from_fn(telemetry::access_log))
                .wrap(TracingLogger::<RequestSpan>::new())
        })
        .listen(listener)?
        // Signals are ours (see `run_until_stopped`): actix-server would stop the whole actix
        // system after draining, before metering could write what the last calls used.
        .disable_signals()
        // A client that closes its connection while its call waits for the provider has left
        // (HTTP clients do not half-close to await an answer): the call is dropped, and with it
        // the upstream request, as nginx does, instead of running on at the provider's expense.
        .h1_allow_half_closed(false)
        .keep_alive(Duration::from_secs(settings.server.keep_alive_secs))
        .shutdown_timeout(settings.server.shutdown_timeout_secs);
        if settings.server.workers > 0 {
            server = server.workers(settings.server.workers);
        }
        tracing::info!(listen = %settings.server.listen, port, "switchyard listening");
        Ok(Application {
            port,
            server: server.run(),
            metering,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGTERM or SIGINT, then drains in-flight calls (bounded by
    /// `server.shutdown_timeout_secs`) and writes what they used and logged.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let mut server = self.server;
        tokio::select! {
            served = &mut server => served?,
            signal = stop_signal() => {
                tracing::info!(signal, "stopping: no new connections; draining calls in flight");
                // The server future carries the stop out, so it is polled while stopping.
                actix_web::rt::spawn(handle.stop(true));
                server.await?;
            }
        }
        // The calls the grace period cut are dropped on their workers' threads as these stop,
        // just after the server's future ends: their records are waited for, then written.
        if !self.metering.recorder.all_closed(CUT_CALLS_WAIT).await {
            tracing::warn!("calls cut at shutdown did not all end in time; their records are lost");
        }
        self.metering.flush().await;
        tracing::info!("switchyard stopped");
        Ok(())
    }
}
