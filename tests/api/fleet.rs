//! The fleet as operators run it: three `switchyard` binaries on one PostgreSQL and one Redis,
//! behind nginx. A change made through one replica is in force on the others within a second
//! (the times are printed); a user's rpm holds across the three; an upstream key's cooldown is
//! shared; Redis restarted mid-way is recovered from without restarting anything; a replica
//! stopped under load costs at most the calls in flight on it, and every call answered 200 has
//! its usage row.
//!
//! PostgreSQL only: a fleet shares one database server (SQLite is the single-instance default).
//! Needs nginx, which `scripts/test.sh` installs; run it alone, with its figures shown, by
//! `cargo test --test api -- fleet:: --nocapture`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use switchyard::crypto::MasterKey;
use switchyard::db::repo;

use crate::cluster::OwnRedis;
use crate::helpers::{eventually, free_port, fresh_database_url, tempdir, Backend, TestApp};
use crate::mock_upstream::MockUpstream;
use crate::operations::Server;

const REPLICAS: usize = 3;
/// Clients calling at once in the load phase: the most calls a stopped replica can hold.
const CLIENTS: usize = 16;

fn hello() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

/// nginx as a keep-alive load balancer in front of the replicas.
struct Nginx {
    child: Child,
    address: String,
}

impl Nginx {
    fn start(dir: &Path, backends: &[String]) -> Nginx {
        let port = free_port();
        let servers: String = backends
            .iter()
            .map(|address| format!("    server {};\n", address.trim_start_matches("http://")))
            .collect();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nuser root;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx.error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             upstream fleet {{\n{servers}    keepalive 64;\n  }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
             proxy_pass http://fleet;\n      proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = std::fs::read_to_string(dir.join("nginx.error.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "nginx did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            address: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> PathBuf {
    let on_path = Command::new("nginx")
        .arg("-v")
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if on_path {
        return PathBuf::from("nginx");
    }
    let sbin = PathBuf::from("/usr/sbin/nginx");
    assert!(
        sbin.exists(),
        "the fleet test needs nginx: install it (scripts/test.sh does)"
    );
    sbin
}

/// Three replicas, nginx in front, the mock provider behind.
struct Fleet {
    /// Calls through nginx.
    front: TestApp,
    /// Calls to each replica directly.
    apps: Vec<TestApp>,
    servers: Vec<Option<Server>>,
    redis: OwnRedis,
    redis_port: u16,
    mock: MockUpstream,
    _nginx: Nginx,
    _dir: tempdir::Dir,
}

impl Fleet {
    async fn start() -> Fleet {
        let dir = tempdir::Dir::new();
        let redis_port = free_port();
        let redis = OwnRedis::start(redis_port);
        let (database_url, _) = fresh_database_url(Backend::Postgres).await;
        let token = format!("admin-{}", uuid::Uuid::new_v4().simple());
        let master_key = MasterKey::generate_base64().unwrap();
        let redis_url = redis.url();
        let env = [
            ("SWITCHYARD_DATABASE_URL", database_url.as_str()),
            ("SWITCHYARD_REDIS_URL", redis_url.as_str()),
            ("SWITCHYARD_ADMIN_TOKEN", token.as_str()),
            ("SWITCHYARD_MASTER_KEY", master_key.as_str()),
            ("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "200"),
            ("SWITCHYARD_SERVER__SHUTDOWN_TIMEOUT_SECS", "5"),
        ];
        let mut servers = Vec::new();
        for _ in 0..REPLICAS {
            servers.push(Some(Server::start(dir.path(), &env).await));
        }
        let addresses: Vec<String> = servers
            .iter()
            .map(|s| s.as_ref().unwrap().address.clone())
            .collect();
        let nginx = Nginx::start(dir.path(), &addresses);
        let attach = |address: &str| TestApp::attach(address, &token, &master_key, &database_url);
        let fleet = Fleet {
            front: attach(&nginx.address),
            apps: addresses.iter().map(|a| attach(a)).collect(),
            servers,
            redis,
            redis_port,
            mock: MockUpstream::start(),
            _nginx: nginx,
            _dir: dir,
        };
        fleet
            .front
            .add_upstream(
                json!({"provider": "openai", "base_url": fleet.mock.base_url,
                                 "secret": "ok-fleet"}),
            )
            .await;
        fleet
    }

    /// A new user with `fields`, and a key: (user id, key).
    async fn user(&self, fields: Value) -> (String, String) {
        let user = self.front.create_user(fields).await;
        let id = user["id"].as_str().unwrap().to_owned();
        let key = self.front.create_key(&id, json!({})).await.1;
        (id, key)
    }
}

#[actix_web::test]
async fn three_replicas_behind_nginx_act_as_one_router() {
    let mut fleet = Fleet::start().await;
    let times = propagation(&fleet, "with redis", 30).await;
    assert!(
        times.iter().all(|t| *t < Duration::from_secs(1)),
        "{times:?}"
    );
    rpm_is_held_across_the_fleet(&fleet).await;
    cooldowns_are_shared(&fleet).await;
    redis_restarts_are_recovered_from(&mut fleet).await;
    a_stopped_replica_loses_no_usage(&mut fleet).await;
}

/// Suspends and restores a user through each replica in turn; how long each of the other
/// replicas took to apply it, timed from the admin call's start.
async fn propagation(fleet: &Fleet, label: &str, rounds: usize) -> Vec<Duration> {
    let (user_id, key) = fleet.user(json!({})).await;
    for app in &fleet.apps {
        assert_eq!(app.chat(&key, hello()).await.status(), 200);
    }
    let mut times = Vec::new();
    for round in 0..rounds {
        let by = round % REPLICAS;
        let (status, expect) = if round % 2 == 0 {
            ("suspended", 403)
        } else {
            ("active", 200)
        };
        let started = Instant::now();
        let (code, body) = fleet.apps[by]
            .admin_json(
                Method::PATCH,
                &format!("/admin/users/{user_id}"),
                Some(json!({"status": status})),
            )
            .await;
        assert_eq!(code, 200, "{body}");
        let others = fleet
            .apps
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != by)
            .map(|(i, app)| {
                let key = key.clone();
                async move {
                    while app.chat(&key, hello()).await.status() != expect {
                        assert!(
                            started.elapsed() < Duration::from_secs(10),
                            "replica {i} never applied a change made through replica {by}"
                        );
                    }
                    started.elapsed()
                }
            });
        times.extend(join_all(others).await);
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "fleet: a change through one replica in force on the others ({label}, {} samples): \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        times.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
    );
    times
}

async fn rpm_is_held_across_the_fleet(fleet: &Fleet) {
    const LIMIT: usize = 60;
    const CALLS: usize = 180;
    let (_, key) = fleet.user(json!({"rpm": LIMIT})).await;
    let statuses = join_all((0..CALLS).map(|_| fleet.front.chat(&key, hello()))).await;
    let statuses: Vec<u16> = statuses.iter().map(|r| r.status().as_u16()).collect();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    println!(
        "fleet: rpm {LIMIT} across {REPLICAS} replicas behind nginx: {admitted} of {CALLS} calls \
         admitted, {refused} refused with 429"
    );
    assert_eq!(admitted + refused, CALLS, "{statuses:?}");
    assert!(
        (admitted as f64 - LIMIT as f64).abs() <= LIMIT as f64 * 0.05,
        "{admitted} admitted for an rpm of {LIMIT}"
    );
}

async fn cooldowns_are_shared(fleet: &Fleet) {
    // Level 2: a heavy key that answers 429 (picked first) and a light one that works.
    for (secret, weight) in [("r429-fleet", 100), ("ok-fleet-2", 1)] {
        fleet
            .front
            .add_upstream(
                json!({"provider": "openai", "base_url": fleet.mock.base_url,
                                 "secret": secret, "weight": weight, "level": 2}),
            )
            .await;
    }
    let (_, key) = fleet.user(json!({"level": 2})).await;
    // The new keys reach every replica's pools by announcement.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fleet.apps[0].chat(&key, hello()).await.status(), 200);
    assert_eq!(fleet.mock.calls_with("r429-fleet"), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..10 {
        let app = &fleet.apps[1 + i % 2];
        assert_eq!(app.chat(&key, hello()).await.status(), 200);
    }
    let tried = fleet.mock.calls_with("r429-fleet") - 1;
    println!(
        "fleet: after a 429 on replica 1, the other replicas sent {tried} of 10 calls to that key"
    );
    assert_eq!(tried, 0);
}

/// `/readyz`'s view of Redis: (limits, configuration channel).
async fn redis_view(app: &TestApp) -> (String, String) {
    let (_, body) = app.readyz().await;
    let field = |name: &str| body["redis"][name].as_str().unwrap_or("").to_owned();
    (field("status"), field("config_channel"))
}

async fn redis_restarts_are_recovered_from(fleet: &mut Fleet) {
    let (_, key) = fleet.user(json!({"rpm": 1000})).await;
    fleet.redis.stop();
    // Calls go on, on in-process limits.
    for _ in 0..6 {
        assert_eq!(fleet.front.chat(&key, hello()).await.status(), 200);
    }
    // Changes still reach every replica, found by the configuration version.
    let times = propagation(fleet, "redis stopped", 6).await;
    assert!(
        times.iter().all(|t| *t < Duration::from_secs(3)),
        "{times:?}"
    );
    fleet.redis = OwnRedis::start(fleet.redis_port);
    for app in &fleet.apps {
        eventually(15, || async {
            match redis_view(app).await {
                (limits, channel) if limits == "ok" && channel == "subscribed" => Ok(()),
                seen => Err(format!("a replica did not go back to redis: {seen:?}")),
            }
        })
        .await;
    }
    // Announced again: every change in force well before a version check could find it.
    let times = propagation(fleet, "after a redis restart", 12).await;
    assert!(
        times.iter().all(|t| *t < Duration::from_secs(1)),
        "{times:?}"
    );
    // And limits are counted in Redis again, for the fleet as a whole.
    rpm_is_held_across_the_fleet(fleet).await;
}

async fn a_stopped_replica_loses_no_usage(fleet: &mut Fleet) {
    let (user_id, key) = fleet.user(json!({})).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..CLIENTS).map(|_| {
        let (front, key, stop) = (&fleet.front, key.clone(), stop.clone());
        async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let response = front.chat(&key, hello()).await;
                let request_id = response
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                answers.push((response.status().as_u16(), request_id));
            }
            answers
        }
    });
    let server = fleet.servers[REPLICAS - 1].take().unwrap();
    let stopper = {
        let stop = stop.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // SIGTERM, as Kubernetes stops a pod: the replica drains and writes what it holds.
            let (status, log) = tokio::task::spawn_blocking(move || server.terminate())
                .await
                .unwrap();
            assert!(status.success(), "{log}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.store(true, Ordering::Relaxed);
        }
    };
    let (answers, ()) = tokio::join!(join_all(clients), stopper);
    let answers: Vec<_> = answers.into_iter().flatten().collect();
    let served: Vec<String> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, id)| id.clone().expect("every answer carries x-request-id"))
        .collect();
    let failed = answers.len() - served.len();
    println!(
        "fleet: a replica stopped under load ({CLIENTS} clients): {} calls answered 200, {failed} \
         failed",
        served.len()
    );
    assert!(failed <= CLIENTS, "{failed} calls failed");

    let db = fleet.front.db();
    let filter = repo::usage::UsageFilter {
        user_id: Some(user_id),
        ..Default::default()
    };
    let expected = served.len() as i64;
    eventually(15, || async {
        let groups = repo::usage::summary(&db, &filter, repo::usage::GroupBy::User)
            .await
            .unwrap();
        match groups.iter().map(|g| g.requests).sum::<i64>() {
            n if n == expected => Ok(()),
            n => Err(format!("{n} usage rows for {expected} calls answered 200")),
        }
    })
    .await;
    for id in &served {
        let entry = repo::logs::get(&db, id).await;
        assert!(entry.is_ok_and(|e| e.metered), "no metered entry for {id}");
    }
    println!(
        "fleet: every one of the {} calls answered 200 has its metered log entry",
        served.len()
    );
}
