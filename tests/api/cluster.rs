//! Replicas acting as one: three replicas hold one user's rpm together, and a replica keeps
//! serving on in-process limits while Redis is away, then goes back to it by itself; a user's
//! spend metered on one replica stops the user on another; an admin change made through one
//! replica is in force on the others (announced on Redis, or found by the configuration version
//! when the announcement is missed); upstream keys' cooldowns and refusals are shared; a key
//! verified on one replica is trusted by another from the shared cache.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{
    assert_error, eventually, free_port, has_sample, into_json, spawn_app_with, spawn_replica,
    Backend, SharedRedis, TestApp,
};
use crate::mock_upstream::MockUpstream;
use crate::on_both_backends;

on_both_backends!(
    three_replicas_hold_one_rpm_limit_together,
    serving_goes_on_without_redis_and_returns_to_it,
    a_redis_that_refuses_writes_stays_away,
    spend_is_shared_across_replicas_through_redis,
    admin_changes_reach_other_replicas_through_redis,
    a_missed_announcement_is_healed_by_the_configuration_version,
    a_reload_that_failed_is_tried_again,
    upstream_key_cooldowns_and_refusals_are_shared,
    a_key_verified_on_one_replica_is_trusted_by_another,
    a_shared_entry_a_replica_could_not_drop_is_dropped_once_it_can,
    redis_is_reached_over_tls_with_a_rediss_url,
);

fn hello() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

/// A user with these fields and a key: the key.
async fn user_key(app: &TestApp, fields: Value) -> String {
    let user = app.create_user(fields).await;
    app.create_key(user["id"].as_str().unwrap(), json!({}))
        .await
        .1
}

async fn three_replicas_hold_one_rpm_limit_together(backend: Backend) {
    const LIMIT: usize = 30;
    const CALLS: usize = 90;
    let redis = SharedRedis::new();
    let env = redis.env();
    let first = spawn_app_with(backend, &env).await;
    let mock = MockUpstream::start();
    first
        .add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-a"}))
        .await;
    let key = user_key(&first, json!({"rpm": LIMIT})).await;
    // Two more replicas on the same database and Redis, started after the setup they load.
    let second = spawn_replica(&first, &env).await;
    let third = spawn_replica(&first, &env).await;
    let replicas = [&first, &second, &third];
    let calls = (0..CALLS).map(|i| {
        let app = replicas[i % 3];
        let key = key.clone();
        async move { app.chat(&key, hello()).await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    println!("three replicas: {admitted} of {CALLS} calls admitted against an rpm of {LIMIT}");
    assert_eq!(admitted + refused, CALLS, "{statuses:?}");
    let tolerance = LIMIT as f64 * 0.05;
    assert!(
        (admitted as f64 - LIMIT as f64).abs() <= tolerance,
        "{admitted} admitted for a limit of {LIMIT}"
    );
    assert_eq!(mock.calls().len(), admitted);
}

/// A Redis server of this test's own, so stopping it disturbs no other test.
pub(crate) struct OwnRedis {
    pub(crate) port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    pub(crate) fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        Self::wait_listening(port, child)
    }

    /// A server that speaks only TLS on `port`, with a self-signed certificate made in `dir`
    /// (clients are not asked for certificates).
    pub(crate) fn start_tls(port: u16, dir: &std::path::Path) -> Self {
        let (cert, key) = (dir.join("redis.crt"), dir.join("redis.key"));
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(made.success(), "openssl made no certificate");
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        Self::wait_listening(port, child)
    }

    fn wait_listening(port: u16, child: Child) -> Self {
        let redis = OwnRedis {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Rate-limit windows stored (spend totals live beside them), not counting the health
    /// check's own.
    async fn keys(&self) -> usize {
        let keys: Vec<String> = self.command(&["KEYS", "*rl:*"]).await;
        keys.iter().filter(|k| !k.ends_with("rl:health")).count()
    }

    /// Runs one command on it.
    async fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd(args[0])
            .arg(&args[1..])
            .query_async(&mut connection)
            .await
            .unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An app on `redis` with one upstream key.
async fn app_on(redis: &OwnRedis, backend: Backend) -> (TestApp, MockUpstream) {
    let url = redis.url();
    let app = spawn_app_with(backend, &[("SWITCHYARD_REDIS_URL", url.as_str())]).await;
    let mock = MockUpstream::start();
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-a"}))
        .await;
    (app, mock)
}

async fn redis_status(app: &TestApp) -> (u16, String) {
    let (status, body) = app.readyz().await;
    (
        status,
        body["redis"]["status"].as_str().unwrap_or("").to_owned(),
    )
}

async fn serving_goes_on_without_redis_and_returns_to_it(backend: Backend) {
    let port = free_port();
    let mut redis = OwnRedis::start(port);
    let (app, _mock) = app_on(&redis, backend).await;
    let busy = user_key(&app, json!({"rpm": 1000})).await;
    assert_eq!(redis_status(&app).await, (200, "ok".to_owned()));
    assert_eq!(app.chat(&busy, hello()).await.status(), 200);
    assert_eq!(redis.keys().await, 1, "the window lives in Redis");

    redis.stop();
    // Every call is still served; the first one after the outage notices it.
    for _ in 0..3 {
        assert_eq!(app.chat(&busy, hello()).await.status(), 200);
    }
    assert_eq!(redis_status(&app).await, (200, "unavailable".to_owned()));
    // Limits still hold, in process.
    let strict = user_key(&app, json!({"rpm": 1})).await;
    assert_eq!(app.chat(&strict, hello()).await.status(), 200);
    assert_error(
        into_json(app.chat(&strict, hello()).await).await,
        429,
        "rate_limit_exceeded",
    );

    let redis = OwnRedis::start(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_status(&app).await.1 != "ok" {
        assert!(
            Instant::now() < deadline,
            "the router did not go back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.chat(&busy, hello()).await.status(), 200);
    assert_eq!(redis.keys().await, 1, "counting in Redis again");
}

/// A Redis that answers `PING` but refuses every write (out of memory here; a read-only replica
/// or an ACL without scripts alike) stays away for the limiter: limits hold in process, rather
/// than starting afresh each time a ping makes Redis look back.
async fn a_redis_that_refuses_writes_stays_away(backend: Backend) {
    let redis = OwnRedis::start(free_port());
    let (app, _mock) = app_on(&redis, backend).await;
    let strict = user_key(&app, json!({"rpm": 2})).await;
    assert_eq!(redis_status(&app).await, (200, "ok".to_owned()));
    let _: String = redis.command(&["CONFIG", "SET", "maxmemory", "1"]).await;
    for _ in 0..2 {
        assert_eq!(app.chat(&strict, hello()).await.status(), 200);
    }
    // Several health checks later, Redis still refuses writes and still counts as away.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(redis_status(&app).await, (200, "unavailable".to_owned()));
    assert_error(
        into_json(app.chat(&strict, hello()).await).await,
        429,
        "rate_limit_exceeded",
    );
    // Once it takes writes again, the limiter goes back to it.
    let _: String = redis.command(&["CONFIG", "SET", "maxmemory", "0"]).await;
    eventually(5, || async {
        match redis_status(&app).await {
            (200, status) if status == "ok" => Ok(()),
            seen => Err(format!("the router did not go back to Redis: {seen:?}")),
        }
    })
    .await;
}

async fn spend_is_shared_across_replicas_through_redis(backend: Backend) {
    let redis = SharedRedis::new();
    let [url, prefix] = redis.env();
    let env = [
        url,
        prefix,
        ("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "50"),
    ];
    let first = spawn_app_with(backend, &env).await;
    let mock = MockUpstream::start();
    first
        .add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "usage-a"}))
        .await;
    // The mock reports 1000 prompt tokens: 1 USD a call at this price, against 1.5 USD.
    let (status, _) = first
        .admin_json(
            reqwest::Method::PUT,
            "/admin/prices/pricey",
            Some(json!({"input_per_mtok": 1000, "output_per_mtok": 0})),
        )
        .await;
    assert_eq!(status, 201);
    let user = first.create_user(json!({"spend_limit_usd": 1.5})).await;
    let user_id = user["id"].as_str().unwrap();
    let (_, key) = first.create_key(user_id, json!({})).await;
    let second = spawn_replica(&first, &env).await;
    let pricey = json!({"model": "pricey", "messages": [{"role": "user", "content": "hi"}]});

    // The second replica serves (and caches) the user first: 1 USD spent there.
    assert_eq!(second.chat(&key, pricey.clone()).await.status(), 200);
    first.wait_for_spend(user_id, 1.0).await;
    // The first replica sees 1 USD, under the limit, and spends 1 more.
    assert_eq!(first.chat(&key, pricey.clone()).await.status(), 200);
    first.wait_for_spend(user_id, 2.0).await;
    // The second replica learns of it through Redis within its one-second refresh, though its
    // own count says 1 USD.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_error(
        into_json(second.chat(&key, pricey).await).await,
        402,
        "budget_exceeded",
    );
}

/// Two replicas on one database and `redis` (if any), reading the configuration version every
/// `check_ms`, with one upstream key and a user key.
async fn two_replicas(
    backend: Backend,
    redis: Option<&SharedRedis>,
    check_ms: &str,
) -> (TestApp, TestApp, MockUpstream, String, String, String) {
    let mut env = vec![("SWITCHYARD_CLUSTER__VERSION_CHECK_MS", check_ms)];
    env.extend(redis.iter().flat_map(|r| r.env()));
    let first = spawn_app_with(backend, &env).await;
    let mock = MockUpstream::start();
    first
        .add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-a"}))
        .await;
    let user = first.create_user(json!({})).await;
    let user_id = user["id"].as_str().unwrap().to_owned();
    let (key_id, key) = first.create_key(&user_id, json!({})).await;
    let second = spawn_replica(&first, &env).await;
    (first, second, mock, user_id, key_id, key)
}

/// Makes an admin change through `by`, then calls `on` until `in_force` accepts what it
/// answers; the time that took.
async fn propagation<F, Fut>(by: &TestApp, path: &str, change: Value, in_force: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (status, body) = by
        .admin_json(reqwest::Method::PATCH, path, Some(change))
        .await;
    assert_eq!(status, 200, "{body}");
    let changed = Instant::now();
    while !in_force().await {
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "the change to {path} never reached the other replica"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    changed.elapsed()
}

/// Changes the user's fields through `app`.
async fn patch_user(app: &TestApp, user_id: &str, fields: Value) {
    let (status, body) = app
        .admin_json(
            reqwest::Method::PATCH,
            &format!("/admin/users/{user_id}"),
            Some(fields),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Suspends the user through `first`; how long until `second` refuses the user's key.
async fn suspension_reaches(
    first: &TestApp,
    second: &TestApp,
    user_id: &str,
    key: &str,
) -> Duration {
    propagation(
        first,
        &format!("/admin/users/{user_id}"),
        json!({"status": "suspended"}),
        || async { second.chat(key, hello()).await.status() == 403 },
    )
    .await
}

async fn admin_changes_reach_other_replicas_through_redis(backend: Backend) {
    // The version is read only once a minute: whatever arrives sooner came over Redis.
    let (first, second, mock, user_id, key_id, key) =
        two_replicas(backend, Some(&SharedRedis::new()), "60000").await;
    // The second replica has the key and the user in its caches.
    assert_eq!(second.chat(&key, hello()).await.status(), 200);

    let suspended = suspension_reaches(&first, &second, &user_id, &key).await;
    let restored = propagation(
        &first,
        &format!("/admin/users/{user_id}"),
        json!({"status": "active", "allowed_models": ["other-*"]}),
        || async { second.chat(&key, hello()).await.status() == 403 },
    )
    .await;
    assert_error(
        into_json(second.chat(&key, hello()).await).await,
        403,
        "model_not_allowed",
    );
    println!("admin change in force on another replica after {suspended:?} and {restored:?}");
    assert!(suspended < Duration::from_secs(1) && restored < Duration::from_secs(1));

    // A model mapping made through the first replica is applied by the second.
    patch_user(&first, &user_id, json!({"allowed_models": []})).await;
    let (status, body) = first
        .admin_json(
            reqwest::Method::POST,
            "/admin/model-mappings",
            Some(json!({"from": "alias-*", "to": "gpt-4o-mini"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let aliased = json!({"model": "alias-small", "messages": [{"role": "user", "content": "hi"}]});
    eventually(1, || async {
        let status = second.chat(&key, aliased.clone()).await.status();
        let upstream = mock.calls().last().map(|c| c.body["model"].clone());
        match (status.as_u16(), upstream) {
            (200, Some(model)) if model == "gpt-4o-mini" => Ok(()),
            seen => Err(format!(
                "mapping not applied on the second replica: {seen:?}"
            )),
        }
    })
    .await;

    // A key revoked through the first replica is refused by the second.
    let (status, _) = first
        .admin_json(
            reqwest::Method::DELETE,
            &format!("/admin/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    eventually(1, || async {
        match into_json(second.chat(&key, hello()).await).await {
            (401, body) if body["error"]["code"] == "invalid_api_key" => Ok(()),
            seen => Err(format!("a revoked key still served: {seen:?}")),
        }
    })
    .await;
}

async fn a_missed_announcement_is_healed_by_the_configuration_version(backend: Backend) {
    // No Redis at all: nothing is announced, so only the version check brings the change.
    let (first, second, _mock, user_id, _, key) = two_replicas(backend, None, "100").await;
    assert_eq!(second.chat(&key, hello()).await.status(), 200);
    let took = suspension_reaches(&first, &second, &user_id, &key).await;
    println!("without redis, a change reached another replica after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // An upstream key disabled through the first replica is out of the second's pool too.
    patch_user(&first, &user_id, json!({"status": "active"})).await;
    let (_, keys) = first
        .admin_json(reqwest::Method::GET, "/admin/upstream-keys", None)
        .await;
    let upstream_id = keys["data"][0]["id"].as_str().unwrap().to_owned();
    propagation(
        &first,
        &format!("/admin/upstream-keys/{upstream_id}"),
        json!({"enabled": false}),
        || async { second.chat(&key, hello()).await.status() == 503 },
    )
    .await;
}

async fn a_reload_that_failed_is_tried_again(backend: Backend) {
    let app = spawn_app_with(backend, &[("SWITCHYARD_CLUSTER__VERSION_CHECK_MS", "100")]).await;
    let mock = MockUpstream::start();
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-a"}))
        .await;
    let key = user_key(&app, json!({})).await;
    // Another replica adds a mapping and counts the change, while this one cannot read the
    // mappings (as in a database failover): its reload after the missed change fails.
    app.run_sql(
        "INSERT INTO model_mappings (id, from_pattern, to_model, user_id, created_at) \
         VALUES ('mm-behind', 'alias-*', 'gpt-4o-mini', NULL, CURRENT_TIMESTAMP); \
         ALTER TABLE model_mappings RENAME TO model_mappings_away; \
         UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) \
         WHERE key = 'config_version';",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    app.run_sql("ALTER TABLE model_mappings_away RENAME TO model_mappings;")
        .await;
    // No further change is made: the failed reload alone must be tried again.
    let aliased = json!({"model": "alias-small", "messages": [{"role": "user", "content": "hi"}]});
    eventually(3, || async {
        let status = app.chat(&key, aliased.clone()).await.status();
        let upstream = mock.calls().last().map(|c| c.body["model"].clone());
        match (status.as_u16(), upstream) {
            (200, Some(model)) if model == "gpt-4o-mini" => Ok(()),
            seen => Err(format!("the failed reload was never tried again: {seen:?}")),
        }
    })
    .await;
}

async fn upstream_key_cooldowns_and_refusals_are_shared(backend: Backend) {
    let redis = SharedRedis::new();
    let env = redis.env();
    let first = spawn_app_with(backend, &env).await;
    let mock = MockUpstream::start();
    // The heavy keys are picked first; the light one absorbs their failures.
    for (secret, weight) in [("r429-shared", 100), ("r401-shared", 50), ("ok-light", 1)] {
        first
            .add_upstream(json!({"provider": "openai", "base_url": mock.base_url,
                                 "secret": secret, "weight": weight}))
            .await;
    }
    let key = user_key(&first, json!({})).await;
    let second = spawn_replica(&first, &env).await;

    // The first replica meets the 429 and the 401, and fails over.
    assert_eq!(first.chat(&key, hello()).await.status(), 200);
    assert_eq!(mock.calls_with("r429-shared"), 1);
    assert_eq!(mock.calls_with("r401-shared"), 1);
    // The announcements travel while the client reads its answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        assert_eq!(second.chat(&key, hello()).await.status(), 200);
    }
    assert_eq!(
        (
            mock.calls_with("r429-shared"),
            mock.calls_with("r401-shared")
        ),
        (1, 1),
        "the second replica tried a key the first had seen refused"
    );
    assert_eq!(mock.calls_with("ok-light"), 6);
}

async fn a_key_verified_on_one_replica_is_trusted_by_another(backend: Backend) {
    let redis = SharedRedis::new();
    let (first, second, _mock, user_id, _, key) = two_replicas(backend, Some(&redis), "1000").await;
    assert_eq!(first.chat(&key, hello()).await.status(), 200);
    // Shared in the background after the first call.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(second.chat(&key, hello()).await.status(), 200);
    let metrics = second.metrics().await;
    for cache in ["user_keys", "users"] {
        let labels = [&format!("cache=\"{cache}\"") as &str, "layer=\"redis\""];
        assert!(
            has_sample(
                &metrics,
                "switchyard_cache_lookups_total",
                &[labels[0], labels[1], "result=\"hit\""],
                "1"
            ),
            "{cache} not found in the shared cache:\n{metrics}"
        );
        assert!(has_sample(
            &metrics,
            "switchyard_cache_hit_ratio",
            &labels,
            "1"
        ));
    }
    // A wrong secret for the same key id is refused without the database's help.
    let last = if key.ends_with('x') { "y" } else { "x" };
    let forged = format!("{}{last}", &key[..key.len() - 1]);
    assert_error(
        into_json(second.chat(&forged, hello()).await).await,
        401,
        "invalid_api_key",
    );
    // Suspension replaces the shared entry: a third replica reads the new state.
    patch_user(&first, &user_id, json!({"status": "suspended"})).await;
    let third = spawn_replica(&first, &redis.env()).await;
    assert_error(
        into_json(third.chat(&key, hello()).await).await,
        403,
        "user_suspended",
    );
}

/// A TCP relay to a Redis server that can be cut: while cut, connections through it are
/// closed at once, as when a replica loses its network to Redis and others do not.
struct RedisRelay {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    streams: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl RedisRelay {
    fn start(to: u16) -> Self {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = RedisRelay {
            port: listener.local_addr().unwrap().port(),
            open: Default::default(),
            streams: Default::default(),
        };
        relay.open.store(true, Ordering::SeqCst);
        let (open, streams) = (relay.open.clone(), relay.streams.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                if !open.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let mut held = streams.lock().unwrap();
                held.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        relay
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the relay and refuses new ones until `restore`.
    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A revocation made on a replica that could not reach Redis just then left the key's shared
/// cache entry there, for other replicas to read. It is not left to the entry's ttl: the
/// replica drops the entry as soon as it reaches Redis again and announces the change once
/// more, so a replica that took the stale entry meanwhile refuses the key from then on.
async fn a_shared_entry_a_replica_could_not_drop_is_dropped_once_it_can(backend: Backend) {
    let redis = OwnRedis::start(free_port());
    let relay = RedisRelay::start(redis.port);
    let (direct, relayed) = (redis.url(), relay.url());
    let check = ("SWITCHYARD_CLUSTER__VERSION_CHECK_MS", "200");
    let first = spawn_app_with(
        backend,
        &[("SWITCHYARD_REDIS_URL", relayed.as_str()), check],
    )
    .await;
    let mock = MockUpstream::start();
    first
        .add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-a"}))
        .await;
    let user = first.create_user(json!({})).await;
    let (key_id, key) = first
        .create_key(user["id"].as_str().unwrap(), json!({}))
        .await;
    let second = spawn_replica(&first, &[("SWITCHYARD_REDIS_URL", direct.as_str()), check]).await;
    // Verified on the first replica, and shared through Redis in the background.
    assert_eq!(first.chat(&key, hello()).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;

    relay.cut();
    let (status, body) = first
        .admin_json(
            reqwest::Method::DELETE,
            &format!("/admin/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The second replica finds the change by the configuration version, and reads the key
    // from the stale shared entry.
    tokio::time::sleep(Duration::from_millis(600)).await;
    relay.restore();
    let refused = eventually(15, || async {
        match into_json(second.chat(&key, hello()).await).await {
            (401, body) => Ok(body),
            (status, body) => Err(format!("{status}: {body}")),
        }
    })
    .await;
    assert_eq!(refused["error"]["code"], "invalid_api_key");
}

/// A `rediss://` URL: limits, the shared caches and the announcements all go to Redis over
/// TLS (`#insecure` takes the test server's self-signed certificate as it comes).
async fn redis_is_reached_over_tls_with_a_rediss_url(backend: Backend) {
    let dir = crate::helpers::tempdir::Dir::new();
    let redis = OwnRedis::start_tls(free_port(), dir.path());
    let url = format!("rediss://127.0.0.1:{}/#insecure", redis.port);
    let app = spawn_app_with(backend, &[("SWITCHYARD_REDIS_URL", url.as_str())]).await;
    assert_eq!(redis_status(&app).await, (200, "ok".to_owned()));
    let mock = MockUpstream::start();
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-a"}))
        .await;
    let key = user_key(&app, json!({"rpm": 1})).await;
    assert_eq!(app.chat(&key, hello()).await.status(), 200);
    assert_error(
        into_json(app.chat(&key, hello()).await).await,
        429,
        "rate_limit_exceeded",
    );
    // The window is in Redis, read back over TLS.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let windows: Vec<String> = redis::cmd("KEYS")
        .arg("*rl:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(!windows.is_empty(), "no rate window in Redis");
}
