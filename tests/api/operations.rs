//! The real binary: first start, migrations, readiness, SIGTERM, refusal without a master key,
//! and no secret in any log line at any level.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use switchyard::crypto::MasterKey;

use crate::helpers::{
    binary, eventually, free_port, fresh_database_url, into_json, pg_admin_url, spawn_app,
    spawn_app_at, spawn_mock_provider, tempdir, Backend, Outage,
};
use crate::on_both_backends;

/// A `switchyard serve` child process with its output going to a file.
pub(crate) struct Server {
    child: Child,
    pub(crate) address: String,
    log_path: std::path::PathBuf,
}

impl Server {
    /// Starts the binary in `dir` with `env` (and a fresh port), waiting until `/healthz` answers.
    pub(crate) async fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let log_path = dir.join(format!("switchyard-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(binary());
        command
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SWITCHYARD_LISTEN", format!("127.0.0.1:{port}"))
            .env("SWITCHYARD_SERVER__WORKERS", "1")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start switchyard");
        let server = Server {
            child,
            address: format!("http://127.0.0.1:{port}"),
            log_path,
        };
        server.wait_healthy().await;
        server
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::Client::new();
        while Instant::now() < deadline {
            if let Ok(r) = client.get(format!("{}/healthz", self.address)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("switchyard did not become healthy:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and returns the exit status.
    pub(crate) fn terminate(self) -> (std::process::ExitStatus, String) {
        self.send_sigterm();
        self.wait_for_exit()
    }

    pub(crate) fn child_id(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn send_sigterm(&self) {
        let pid = self.child_id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }

    /// Waits (30 s at most) for the process to exit: its status and its log.
    pub(crate) fn wait_for_exit(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log());
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn admin(
    address: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{address}{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    into_json(request.send().await.unwrap()).await
}

/// `GET /admin/upstream-keys` on `server`.
async fn upstream_keys(server: &Server, token: &str) -> Value {
    let (status, keys) = admin(
        &server.address,
        token,
        Method::GET,
        "/admin/upstream-keys",
        None,
    )
    .await;
    assert_eq!(status, 200, "{keys}");
    keys
}

#[actix_web::test]
async fn first_start_on_sqlite_needs_nothing_and_keeps_its_secrets_in_files() {
    let dir = tempdir::Dir::new();
    let env = [("OPENAI_API_KEY", "openai-from-env-4321")];
    let server = Server::start(dir.path(), &env).await;
    assert!(dir.path().join("switchyard.db").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let file = dir.path().join("switchyard.master_key");
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // No admin token configured: the admin API answers 401 to every call, and says why.
    assert!(!dir.path().join("switchyard.admin_token").exists());
    let (status, body) = admin(
        &server.address,
        "anything",
        Method::GET,
        "/admin/users",
        None,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_admin_token", "{body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log().contains("SWITCHYARD_ADMIN_TOKEN is not set") {
        assert!(Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = server.terminate();
    assert!(status.success());

    // With a token, the provider key from the environment is there: a level-1 upstream key,
    // shown only by its hint, added once.
    let token = "admin-token-for-this-test";
    let env = [
        ("OPENAI_API_KEY", "another-env-key-8765"),
        ("SWITCHYARD_ADMIN_TOKEN", token),
    ];
    let server = Server::start(dir.path(), &env).await;
    let keys = upstream_keys(&server, token).await;
    let keys = keys["data"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["provider"], "openai");
    assert_eq!(keys[0]["level"], 1);
    assert_eq!(keys[0]["secret_hint"], "4321");
    assert!(
        !server.log().contains(token),
        "the token never reaches a log"
    );
    drop(server);

    // A token file an earlier version generated is named, never used.
    std::fs::write(dir.path().join("switchyard.admin_token"), "sya-earlier\n").unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let (status, _) = admin(
        &server.address,
        "sya-earlier",
        Method::GET,
        "/admin/users",
        None,
    )
    .await;
    assert_eq!(status, 401);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log().contains("switchyard.admin_token") {
        assert!(Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !server.log().contains("sya-earlier"),
        "its content never reaches a log"
    );
    drop(server);

    // Losing the master key file while secrets are stored is refused, not papered over.
    std::fs::remove_file(dir.path().join("switchyard.master_key")).unwrap();
    let text = fails_to_start(dir.path(), &[]);
    assert!(text.contains("switchyard.master_key is missing"), "{text}");
}

/// Runs `switchyard serve` in `dir` with only `env`, expects it to exit with an error, and
/// returns everything it printed.
fn fails_to_start(dir: &Path, env: &[(&str, &str)]) -> String {
    let output = Command::new(binary())
        .current_dir(dir)
        .env_clear()
        .env("SWITCHYARD_LISTEN", format!("127.0.0.1:{}", free_port()))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "it started:\n{text}");
    text
}

/// A provider key imported from the environment with a base URL set wrong is a start-up error
/// (the secret must not go to the provider's default URL instead), and the import happens once
/// the variable is fixed.
#[actix_web::test]
async fn a_wrong_provider_base_url_in_the_environment_stops_the_first_start() {
    let dir = tempdir::Dir::new();
    let text = fails_to_start(
        dir.path(),
        &[
            ("OPENAI_API_KEY", "sk-env-1234"),
            ("OPENAI_BASE_URL", "ftp://llm.internal/v1"),
        ],
    );
    assert!(
        text.contains("OPENAI_BASE_URL is not a usable base URL"),
        "{text}"
    );
    assert!(!text.contains("sk-env-1234"), "{text}");
    let token = "admin-token-for-the-base-url-test";
    let server = Server::start(
        dir.path(),
        &[
            ("OPENAI_API_KEY", "sk-env-1234"),
            ("OPENAI_BASE_URL", "http://llm.internal/v1/"),
            ("SWITCHYARD_ADMIN_TOKEN", token),
        ],
    )
    .await;
    let keys = upstream_keys(&server, token).await;
    assert_eq!(
        keys["data"][0]["base_url"], "http://llm.internal/v1",
        "{keys}"
    );
    let (status, _) = server.terminate();
    assert!(status.success());
}

#[actix_web::test]
async fn sigterm_stops_the_server_with_exit_code_zero() {
    let dir = tempdir::Dir::new();
    let server = Server::start(dir.path(), &[("SWITCHYARD_ADMIN_TOKEN", "t-sigterm")]).await;
    let (status, log) = server.terminate();
    assert!(status.success(), "exit status {status:?}\n{log}");
    assert!(log.contains("switchyard stopped"), "{log}");
}

/// An idle client connection stays open for `server.keep_alive_secs`, then is closed. The
/// default (75 s) outlasts the idle timeout of the proxies usually in front (60 s), which would
/// otherwise reuse a connection the router is closing and answer that POST with a 502.
#[actix_web::test]
async fn idle_connections_are_kept_open_for_the_configured_time() {
    use std::io::{Read, Write};

    /// Sends `GET /healthz` on `stream` and reads the answer's head and body.
    fn exchange(stream: &mut std::net::TcpStream) -> String {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: switchyard\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0; 4096];
        loop {
            let n = stream.read(&mut buffer).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&answer).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    return text;
                }
            }
        }
    }

    let dir = tempdir::Dir::new();
    let server = Server::start(
        dir.path(),
        &[
            ("SWITCHYARD_ADMIN_TOKEN", "t-keep-alive"),
            ("SWITCHYARD_SERVER__KEEP_ALIVE_SECS", "2"),
        ],
    )
    .await;
    let address = server.address.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert!(exchange(&mut stream).starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_secs(1));
        let again = exchange(&mut stream);
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
        // Past the keep-alive, the router closes the connection on its own.
        std::thread::sleep(Duration::from_millis(3500));
        let mut buffer = [0; 64];
        let closed = match stream.read(&mut buffer) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "still open past the keep-alive");
    })
    .await
    .unwrap();
}

#[actix_web::test]
async fn postgres_without_a_master_key_refuses_to_start() {
    let dir = tempdir::Dir::new();
    let text = fails_to_start(dir.path(), &[("SWITCHYARD_DATABASE_URL", &pg_admin_url())]);
    assert!(text.contains("SWITCHYARD_MASTER_KEY is required"), "{text}");
}

#[actix_web::test]
async fn a_bad_master_key_or_database_url_is_a_clear_start_up_error() {
    let dir = tempdir::Dir::new();
    for (name, value, expected) in [
        ("SWITCHYARD_MASTER_KEY", "too-short", "master key"),
        ("SWITCHYARD_DATABASE_URL", "mysql://nope", "postgres://"),
        (
            "SWITCHYARD_METERING__BUFFER_RECORDS",
            "0",
            "metering.buffer_records must be at least 1",
        ),
        (
            "SWITCHYARD_CLUSTER__VERSION_CHECK_MS",
            "0",
            "cluster.version_check_ms must be at least 1",
        ),
        ("SWITCHYARD_LOG__LEVEL", "loud", "log.level must be one of"),
    ] {
        let text = fails_to_start(dir.path(), &[(name, value)]);
        assert!(text.contains(expected), "{name}: {text}");
        assert!(
            !text.contains(value) || name != "SWITCHYARD_MASTER_KEY",
            "{text}"
        );
    }
}

on_both_backends!(
    migrate_subcommand_applies_migrations_once,
    a_master_key_that_decrypts_no_stored_secret_refuses_to_start,
);

/// Started with another master key than the one the upstream secrets were stored with, the
/// router would only find every key unusable while `/readyz` answers ready: it refuses.
async fn a_master_key_that_decrypts_no_stored_secret_refuses_to_start(backend: Backend) {
    let app = spawn_app(backend).await;
    app.add_upstream(
        json!({"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "secret": "sk-stored"}),
    )
    .await;
    let dir = tempdir::Dir::new();
    let wrong = MasterKey::generate_base64().unwrap();
    let text = fails_to_start(
        dir.path(),
        &[
            ("SWITCHYARD_DATABASE_URL", app.database_url.as_str()),
            ("SWITCHYARD_MASTER_KEY", wrong.as_str()),
        ],
    );
    assert!(text.contains("decrypts none of the 1 stored"), "{text}");
    assert!(
        !text.contains(&wrong) && !text.contains("sk-stored"),
        "{text}"
    );
    // The right key starts it.
    let server = Server::start(
        dir.path(),
        &[
            ("SWITCHYARD_DATABASE_URL", app.database_url.as_str()),
            ("SWITCHYARD_MASTER_KEY", app.master_key.as_str()),
        ],
    )
    .await;
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
}

async fn migrate_subcommand_applies_migrations_once(backend: Backend) {
    let (url, dir) = fresh_database_url(backend).await;
    let work = tempdir::Dir::new();
    let run = || {
        Command::new(binary())
            .arg("migrate")
            .current_dir(dir.as_ref().map(|d| d.path()).unwrap_or(work.path()))
            .env("SWITCHYARD_DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stdout)
    );
    let first = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        first.contains("applied=") && !first.contains("applied=0"),
        "{first}"
    );
    let second = run();
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("applied=0"));
}

#[actix_web::test]
async fn replicas_migrating_one_postgres_at_once_do_not_race() {
    let (url, _) = fresh_database_url(Backend::Postgres).await;
    let children: Vec<Child> = (0..4)
        .map(|_| {
            Command::new(binary())
                .arg("migrate")
                .env("SWITCHYARD_DATABASE_URL", &url)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut applied = Vec::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        applied.push(text.contains("applied=") && !text.contains("applied=0"));
    }
    assert_eq!(
        applied.iter().filter(|a| **a).count(),
        1,
        "exactly one replica migrated"
    );
}

/// `sslmode=require` in the database URL: the migrations, the pool and metering's pool all
/// connect over TLS (the test server has Debian's self-signed certificate). `verify-full`
/// refuses that certificate, which no trusted root signed.
#[actix_web::test]
async fn postgres_is_reached_over_tls_when_the_url_asks() {
    let (url, _) = fresh_database_url(Backend::Postgres).await;
    let app = spawn_app_at(&format!("{url}?sslmode=require")).await;
    let user = app.create_user(json!({"name": "over-tls"})).await;
    let (_, key) = app
        .create_key(user["id"].as_str().unwrap(), json!({}))
        .await;
    let (status, _) = app.call_with_key(&key).await;
    assert_eq!(status, 200, "a call authenticated from the database");
    let database = url.rsplit_once('/').unwrap().1.to_owned();
    let (client, connection) = tokio_postgres::connect(&pg_admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    actix_web::rt::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
            &[&database],
        )
        .await
        .unwrap();
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        all > 0 && encrypted == all,
        "{encrypted} of {all} connections encrypted"
    );

    // The binary refuses to start, saying why (and not with the URL's password).
    let dir = tempdir::Dir::new();
    let master_key = MasterKey::generate_base64().unwrap();
    let verify = format!("{url}?sslmode=verify-full");
    let text = fails_to_start(
        dir.path(),
        &[
            ("SWITCHYARD_DATABASE_URL", verify.as_str()),
            ("SWITCHYARD_MASTER_KEY", master_key.as_str()),
        ],
    );
    assert!(text.contains("certificate"), "{text}");
    assert!(!text.contains("postgres:postgres@"), "{text}");
}

#[actix_web::test]
async fn readyz_follows_the_database_and_recovers() {
    let app = spawn_app(Backend::Postgres).await;
    let client = reqwest::Client::new();
    let ready = || async {
        client
            .get(format!("{}/readyz", app.address))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 200);
    // Take the database away: it refuses connections and every session on it is ended.
    let outage = Outage::begin(Backend::Postgres, &app.database_url).await;
    assert_eq!(ready().await, 503);
    assert_eq!(
        into_json(
            client
                .get(format!("{}/healthz", app.address))
                .send()
                .await
                .unwrap()
        )
        .await
        .0,
        200
    );
    outage.end().await;
    eventually(10, || async {
        match ready().await {
            200 => Ok(()),
            status => Err(format!("readyz did not recover: {status}")),
        }
    })
    .await;
}

on_both_backends!(no_secret_reaches_the_logs_at_trace_level);

async fn no_secret_reaches_the_logs_at_trace_level(backend: Backend) {
    let (url, db_dir) = fresh_database_url(backend).await;
    let work = tempdir::Dir::new();
    let dir = db_dir.as_ref().map(|d| d.path()).unwrap_or(work.path());
    let admin_token = format!("admin-token-{}", uuid::Uuid::new_v4().simple());
    let master_key = MasterKey::generate_base64().unwrap();
    let env_secret = format!("env-openai-secret-{}", uuid::Uuid::new_v4().simple());
    let server = Server::start(
        dir,
        &[
            ("SWITCHYARD_DATABASE_URL", &url),
            ("SWITCHYARD_ADMIN_TOKEN", &admin_token),
            ("SWITCHYARD_MASTER_KEY", &master_key),
            ("SWITCHYARD_LOG__LEVEL", "trace"),
            ("OPENAI_API_KEY", &env_secret),
        ],
    )
    .await;
    let address = server.address.clone();
    let call = |method: Method, path: String, body: Option<Value>| {
        let (address, token) = (address.clone(), admin_token.clone());
        async move { admin(&address, &token, method, &path, body).await }
    };

    let (_, user) = call(
        Method::POST,
        "/admin/users".into(),
        Some(json!({"name": "logged"})),
    )
    .await;
    let user_id = user["id"].as_str().unwrap().to_owned();
    let (_, created) = call(
        Method::POST,
        format!("/admin/users/{user_id}/keys"),
        Some(json!({})),
    )
    .await;
    let user_key = created["key"].as_str().unwrap().to_owned();
    // `sk-<lookup>-<secret>`: the lookup is hex, the secret base64url, which may hold a `-`.
    let key_secret = user_key
        .strip_prefix("sk-")
        .and_then(|rest| rest.split_once('-'))
        .unwrap()
        .1
        .to_owned();
    let upstream_secret = format!("upstream-secret-{}", uuid::Uuid::new_v4().simple());
    let (_, upstream) = call(
        Method::POST,
        "/admin/upstream-keys".into(),
        Some(json!({"provider": "openai", "secret": upstream_secret})),
    )
    .await;
    let patched_secret = format!("patched-secret-{}", uuid::Uuid::new_v4().simple());
    call(
        Method::PATCH,
        format!("/admin/upstream-keys/{}", upstream["id"].as_str().unwrap()),
        Some(json!({"secret": patched_secret})),
    )
    .await;
    let mock = spawn_mock_provider();
    let good_candidate = format!("good-{}", uuid::Uuid::new_v4().simple());
    let bad_candidate = format!("bad-{}", uuid::Uuid::new_v4().simple());
    call(
        Method::POST,
        "/admin/upstream-keys/discover".into(),
        Some(json!({"provider": "openai", "base_url": mock, "candidates": [good_candidate, bad_candidate]})),
    )
    .await;
    // Bad input that carries a secret-like value.
    call(
        Method::POST,
        "/admin/upstream-keys".into(),
        Some(json!({"provider": "nope", "secret": upstream_secret})),
    )
    .await;

    let client = reqwest::Client::new();
    let models = format!("{address}/v1/models");
    for request in [
        client.get(&models).bearer_auth(&user_key),
        client.get(&models).header("x-api-key", &user_key),
        client.get(format!("{models}?key={user_key}")),
        client.get(&models).bearer_auth(format!("{user_key}x")),
        client
            .get(format!("{address}/admin/users"))
            .bearer_auth(format!("{admin_token}-wrong")),
    ] {
        request.send().await.unwrap();
    }
    let (status, log) = server.terminate();
    assert!(status.success());
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging is on"
    );
    for secret in [
        &admin_token,
        &master_key,
        &user_key,
        &key_secret,
        &upstream_secret,
        &patched_secret,
        &good_candidate,
        &bad_candidate,
        &env_secret,
    ] {
        assert!(
            !log.contains(secret.as_str()),
            "a secret reached the log:\n{log}"
        );
    }
}

on_both_backends!(stored_usage_moves_onto_the_log_when_upgrading);

/// The upgrade to one row per call, on data an earlier version stored: usage of calls still in
/// the log moves onto their entries; usage of pruned calls becomes daily sums.
async fn stored_usage_moves_onto_the_log_when_upgrading(backend: Backend) {
    use diesel::sql_types::BigInt;
    use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let dir = match backend {
        Backend::Sqlite => "migrations/sqlite",
        Backend::Postgres => "migrations/postgres",
    };
    let read = |name: &str| {
        std::fs::read_to_string(format!(
            "{}/{dir}/{name}/up.sql",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let (foundation, upgrade) = (
        read("2026-11-24-000001_foundation"),
        read("2026-11-25-000001_one_row_per_call"),
    );
    let stored = "\
        INSERT INTO request_logs (id, ts, user_id, key_id, route, model, status, latency_ms, \
            prompt_tokens, completion_tokens, cost_nanos) \
        VALUES ('r1', '2026-01-01 10:00:00', 'u1', 'k1', '/v1/chat/completions', 'm', 200, 5, \
            3, 4, 50); \
        INSERT INTO usage_records (request_id, ts, user_id, key_id, model, upstream_model, \
            prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, images, \
            audio_seconds, characters, cost_nanos) \
        VALUES ('r1', '2026-01-01 10:00:00', 'u1', 'k1', 'm', 'm', 3, 4, 5, 7, 1, 2.5, 9, 50), \
               ('r2', '2026-01-02 03:04:05', 'u1', 'k1', 'm', 'm', 10, 0, 0, 0, 0, 0, 0, 100), \
               ('r3', '2026-01-02 23:00:00', 'u1', 'k1', 'm', 'm', 20, 0, 0, 0, 0, 0, 0, 200);";
    let checks = [
        "SELECT COUNT(*) AS n FROM request_logs WHERE id = 'r1' AND metered \
         AND reasoning_tokens = 5 AND cached_tokens = 7 AND images = 1 AND audio_seconds = 2.5 \
         AND characters = 9 AND cost_nanos = 50",
        "SELECT COUNT(*) AS n FROM usage_daily WHERE day = '2026-01-02' AND user_id = 'u1' \
         AND model = 'm' AND requests = 2 AND prompt_tokens = 30 AND cost_nanos = 300",
        "SELECT COUNT(*) AS n FROM usage_daily",
    ];
    macro_rules! upgrade_and_check {
        ($conn:expr) => {{
            let conn = &mut $conn;
            conn.batch_execute(&foundation).await.unwrap();
            conn.batch_execute(stored).await.unwrap();
            conn.batch_execute(&upgrade).await.unwrap();
            for check in checks {
                let count: Count = diesel::sql_query(check).get_result(conn).await.unwrap();
                assert_eq!(count.n, 1, "{check}");
            }
            assert!(
                conn.batch_execute("SELECT 1 FROM usage_records")
                    .await
                    .is_err(),
                "usage_records is gone"
            );
        }};
    }
    let (url, _dir) = fresh_database_url(backend).await;
    match backend {
        Backend::Sqlite => {
            let path = url.trim_start_matches("sqlite://").to_owned();
            let conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<
                diesel::SqliteConnection,
            >::establish(&path);
            upgrade_and_check!(conn.await.unwrap())
        }
        Backend::Postgres => {
            upgrade_and_check!(diesel_async::AsyncPgConnection::establish(&url)
                .await
                .unwrap())
        }
    }
}

/// Background threads (metering, its SQLite writes, the log writer) run at a lower priority
/// than the HTTP worker, which asks for the kernel's shortest time slice where the kernel has
/// custom slices (Linux 6.12+), so that a request is not kept waiting behind them.
#[cfg(target_os = "linux")]
#[actix_web::test]
async fn background_threads_yield_the_core_to_the_http_worker() {
    let dir = tempdir::Dir::new();
    let token = "t-threads";
    let server = Server::start(dir.path(), &[("SWITCHYARD_ADMIN_TOKEN", token)]).await;
    let address = server.address.clone();
    // One metered call, so metering's SQLite writer thread has started.
    let (_, user) = admin(
        &address,
        token,
        Method::POST,
        "/admin/users",
        Some(json!({"name": "t"})),
    )
    .await;
    let user_id = user["id"].as_str().unwrap();
    let (_, created) = admin(
        &address,
        token,
        Method::POST,
        &format!("/admin/users/{user_id}/keys"),
        Some(json!({})),
    )
    .await;
    let mock = crate::mock_upstream::MockUpstream::start();
    admin(
        &address,
        token,
        Method::POST,
        "/admin/upstream-keys",
        Some(json!({"provider": "openai", "secret": "sk-upstream", "base_url": mock.base_url})),
    )
    .await;
    let response = reqwest::Client::new()
        .post(format!("{address}/v1/chat/completions"))
        .bearer_auth(created["key"].as_str().unwrap())
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    eventually(10, || {
        let address = address.clone();
        async move {
            let (_, logs) = admin(&address, token, Method::GET, "/admin/logs", None).await;
            match logs["data"].as_array() {
                Some(entries) if !entries.is_empty() => Ok(()),
                _ => Err(format!("the call was not logged: {logs}")),
            }
        }
    })
    .await;

    // Each thread: its name, nice level (field 19 of its stat) and, where the kernel reports
    // one, its slice.
    let pid = server.child_id();
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm"))
            .unwrap()
            .trim()
            .to_owned();
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        // The name in parentheses may hold spaces: the fields start after its closing one.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let nice: i32 = fields[16].parse().unwrap();
        let tid: i32 = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
        threads.push((name, nice, slice_of(tid)));
    }
    let listed = format!("{threads:?}");
    let nice_of = |name: &str| {
        threads
            .iter()
            .filter(|t| t.0 == name)
            .map(|t| t.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(nice_of("log-writer"), [5], "{listed}");
    // The metering arbiter at 5, the HTTP worker at 0 (both are actix threads).
    let actix = nice_of("actix-rt|system");
    assert!(actix.contains(&5) && actix.contains(&0), "{listed}");
    // SQLite runs on the blocking pool of metering's arbiter, whose threads inherit its level.
    let pool = nice_of("tokio-rt-worker");
    assert!(pool.contains(&5), "{listed}");
    // The kernel reports slices from 6.12 on: the default (0.7-3 ms) for the others, 0.1 ms for
    // the worker.
    if threads.iter().all(|t| t.2.is_some_and(|slice| slice > 0)) {
        let worker = threads
            .iter()
            .find(|t| t.0 == "actix-rt|system" && t.1 == 0)
            .unwrap();
        assert_eq!(worker.2, Some(100_000), "{listed}");
        let log_writer = threads.iter().find(|t| t.0 == "log-writer").unwrap();
        assert!(log_writer.2.unwrap() > 100_000, "{listed}");
    }
}

/// A thread's slice in nanoseconds as `sched_getattr` reports it (0 before Linux 6.12).
#[cfg(target_os = "linux")]
fn slice_of(tid: i32) -> Option<u64> {
    // struct sched_attr, first version: 48 bytes, read into 56.
    let mut attr = [0u64; 7];
    // SAFETY: the buffer is larger than the 48 bytes asked for.
    let result =
        unsafe { libc::syscall(libc::SYS_sched_getattr, tid, attr.as_mut_ptr(), 48u32, 0u32) };
    // size, policy | flags | nice, priority | runtime (the slice) | ...
    (result == 0).then_some(attr[3])
}
