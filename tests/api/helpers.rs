//! Test fixtures: the real application on a random port against a fresh SQLite file or a fresh
//! PostgreSQL database, a scriptable mock provider, and a client with the admin token.

use std::net::TcpListener;
use std::path::PathBuf;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use serde_json::{json, Value};
use switchyard::config::Settings;
use switchyard::crypto::MasterKey;
use switchyard::startup::Application;

/// The storage backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs one async test body on both backends, as two test functions.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    $crate::helpers::run_test(super::$name($crate::helpers::Backend::Sqlite))
                }
                #[test]
                fn postgres() {
                    $crate::helpers::run_test(super::$name($crate::helpers::Backend::Postgres))
                }
            }
        )*
    };
}

/// Runs a test body on an actix System of its own, then stops that System, which stops every
/// arbiter the apps under test started (HTTP workers, metering) and so closes their database
/// connections now, not when the whole test binary ends: PostgreSQL allows only so many.
pub fn run_test(body: impl std::future::Future<Output = ()>) {
    let system = actix_web::rt::System::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| system.block_on(body)));
    system.block_on(async { actix_web::rt::System::current().stop() });
    let _ = system.run();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The server's PostgreSQL, where each test creates its own database.
pub fn pg_admin_url() -> String {
    std::env::var("SWITCHYARD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{name}")
}

/// A fresh, empty database for one test: its URL.
pub async fn fresh_database_url(backend: Backend) -> (String, Option<tempdir::Dir>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempdir::Dir::new();
            let url = format!("sqlite://{}", dir.path().join("switchyard.db").display());
            (url, Some(dir))
        }
        Backend::Postgres => {
            let name = format!("sy_test_{}", uuid::Uuid::new_v4().simple());
            let admin = pg_admin_url();
            let mut conn = AsyncPgConnection::establish(&admin)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL unreachable (SWITCHYARD_TEST_PG_URL): {e}"));
            conn.batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await
                .expect("create test database");
            (replace_db_name(&admin, &name), None)
        }
    }
}

/// Temporary directories removed on drop.
pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory under the system temp dir, deleted with its contents on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        /// Creates a new empty directory.
        pub fn new() -> Self {
            let path =
                std::env::temp_dir().join(format!("switchyard-test-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&path).expect("create temp dir");
            Dir(path)
        }

        /// Its path.
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running application and what a test needs to talk to it.
pub struct TestApp {
    pub address: String,
    pub admin_token: String,
    pub master_key: String,
    pub database_url: String,
    pub http: reqwest::Client,
    _dir: Option<tempdir::Dir>,
}

/// The settings a test app runs with: a random port, one worker, the given database.
pub fn test_settings(database_url: &str, admin_token: &str, master_key: &str) -> Settings {
    test_settings_with(database_url, admin_token, master_key, &[])
}

/// [`test_settings`] with more `SWITCHYARD_*` variables.
pub fn test_settings_with(
    database_url: &str,
    admin_token: &str,
    master_key: &str,
    extra: &[(&str, &str)],
) -> Settings {
    let env = [
        ("SWITCHYARD_LISTEN", "127.0.0.1:0"),
        ("SWITCHYARD_DATABASE_URL", database_url),
        ("SWITCHYARD_ADMIN_TOKEN", admin_token),
        ("SWITCHYARD_MASTER_KEY", master_key),
        ("SWITCHYARD_SERVER__WORKERS", "1"),
        ("SWITCHYARD_SERVER__SHUTDOWN_TIMEOUT_SECS", "1"),
        ("SWITCHYARD_DATABASE__MAX_CONNECTIONS", "4"),
        ("SWITCHYARD_UPSTREAM__FIRST_BYTE_TIMEOUT_SECS", "1"),
        ("SWITCHYARD_UPSTREAM__IDLE_TIMEOUT_SECS", "2"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    Settings::load_from(None, env).expect("test settings")
}

/// Starts the application on `backend` with a fresh database.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, &[]).await
}

/// [`spawn_app`] with more `SWITCHYARD_*` variables.
pub async fn spawn_app_with(backend: Backend, extra: &[(&str, &str)]) -> TestApp {
    let (database_url, dir) = fresh_database_url(backend).await;
    let admin_token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
    let master_key = MasterKey::generate_base64().unwrap();
    let mut app = start(&database_url, &admin_token, &master_key, extra).await;
    app._dir = dir;
    app
}

/// The application on the database at `database_url` (already created), with new secrets.
pub async fn spawn_app_at(database_url: &str) -> TestApp {
    let admin_token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
    let master_key = MasterKey::generate_base64().unwrap();
    start(database_url, &admin_token, &master_key, &[]).await
}

/// Another instance of `app` (a replica): same database and secrets, its own port.
pub async fn spawn_replica(app: &TestApp, extra: &[(&str, &str)]) -> TestApp {
    start(&app.database_url, &app.admin_token, &app.master_key, extra).await
}

async fn start(
    database_url: &str,
    admin_token: &str,
    master_key: &str,
    extra: &[(&str, &str)],
) -> TestApp {
    let settings = test_settings_with(database_url, admin_token, master_key, extra);
    let app = Application::build(settings).await.expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    actix_web::rt::spawn(app.run_until_stopped());
    TestApp {
        address,
        admin_token: admin_token.to_owned(),
        master_key: master_key.to_owned(),
        database_url: database_url.to_owned(),
        http: reqwest::Client::new(),
        _dir: None,
    }
}

/// The test Redis (the script's, or the local default).
fn redis_url() -> String {
    std::env::var("SWITCHYARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A test's own part of the test Redis: its URL and a key prefix no other test uses, so tests
/// (and the replicas of one test) can share one Redis server.
pub struct SharedRedis {
    url: String,
    prefix: String,
}

impl SharedRedis {
    pub fn new() -> Self {
        SharedRedis {
            url: redis_url(),
            prefix: format!("sytest:{}:", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The settings that put an instance there.
    pub fn env(&self) -> [(&str, &str); 2] {
        [
            ("SWITCHYARD_REDIS_URL", self.url.as_str()),
            ("SWITCHYARD_REDIS__KEY_PREFIX", self.prefix.as_str()),
        ]
    }

    /// Milliseconds the entry `key` (after the prefix) has left: negative when there is none.
    pub async fn ttl_ms(&self, key: &str) -> i64 {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("PTTL")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut connection)
            .await
            .unwrap()
    }
}

impl TestApp {
    /// A request to `path` with the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.address))
            .bearer_auth(&self.admin_token)
    }

    /// Sends an admin call and returns its status and JSON body (Null when empty).
    pub async fn admin_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.admin(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        into_json(request.send().await.expect("admin call")).await
    }

    /// Creates a user with `fields` (a name is added when missing) and returns its JSON.
    pub async fn create_user(&self, mut fields: Value) -> Value {
        if fields.get("name").is_none() {
            fields["name"] = json!(format!("user-{}", uuid::Uuid::new_v4().simple()));
        }
        let (status, body) = self
            .admin_json(reqwest::Method::POST, "/admin/users", Some(fields))
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Creates a key for `user_id` and returns (key id, full key).
    pub async fn create_key(&self, user_id: &str, body: Value) -> (String, String) {
        let (status, body) = self
            .admin_json(
                reqwest::Method::POST,
                &format!("/admin/users/{user_id}/keys"),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["key"].as_str().unwrap().to_owned(),
        )
    }

    /// A new active user with one key: (user id, full key).
    pub async fn user_with_key(&self) -> (String, String) {
        let user = self.create_user(json!({})).await;
        let user_id = user["id"].as_str().unwrap().to_owned();
        let (_, key) = self.create_key(&user_id, json!({})).await;
        (user_id, key)
    }

    /// `GET /v1/models` with the key as a bearer token: status and body.
    pub async fn call_with_key(&self, key: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}/v1/models", self.address))
            .bearer_auth(key)
            .send()
            .await
            .expect("data-plane call");
        into_json(response).await
    }

    /// Adds an upstream key and returns its id.
    pub async fn add_upstream(&self, fields: Value) -> String {
        let (status, body) = self
            .admin_json(reqwest::Method::POST, "/admin/upstream-keys", Some(fields))
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Adds a model mapping (`{"from", "to", "user_id"?}`).
    pub async fn add_mapping(&self, fields: Value) {
        let (status, body) = self
            .admin_json(reqwest::Method::POST, "/admin/model-mappings", Some(fields))
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Asserts that GET, PATCH (with `patch`) and DELETE of `path` all answer 404 `not_found`.
    pub async fn assert_unknown_id(&self, path: &str, patch: Value) {
        for (method, body) in [
            (reqwest::Method::GET, None),
            (reqwest::Method::PATCH, Some(patch)),
            (reqwest::Method::DELETE, None),
        ] {
            assert_error(self.admin_json(method, path, body).await, 404, "not_found");
        }
    }

    /// `POST /v1/chat/completions` with `key` and `body`.
    pub async fn chat(&self, key: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.address))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("chat call")
    }

    /// A running server (say, a child process) seen through the helpers.
    pub fn attach(address: &str, admin_token: &str, master_key: &str, database_url: &str) -> Self {
        TestApp {
            address: address.to_owned(),
            admin_token: admin_token.to_owned(),
            master_key: master_key.to_owned(),
            database_url: database_url.to_owned(),
            http: reqwest::Client::new(),
            _dir: None,
        }
    }

    /// The storage layer on the same database, to check what is stored.
    pub fn db(&self) -> switchyard::db::Db {
        let settings = test_settings(&self.database_url, &self.admin_token, &self.master_key);
        switchyard::db::Db::connect(&settings.database).expect("db")
    }
}

/// Status and JSON body of a response (Null when the body is empty).
pub async fn into_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
    };
    (status, body)
}

/// A numeric response header (`Retry-After`, `x-ratelimit-*`), if present.
pub fn header(response: &reqwest::Response, name: &str) -> Option<i64> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

/// Asserts the contract's error shape with `status` and `code`.
pub fn assert_error(actual: (u16, Value), status: u16, code: &str) {
    let (got_status, body) = actual;
    assert_eq!(got_status, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
}

/// A mock provider answering `GET /models`: 200 for secrets starting with `good`, 429 for
/// `busy`, 401 otherwise. Returns its base URL.
pub fn spawn_mock_provider() -> String {
    async fn models(req: HttpRequest) -> HttpResponse {
        let headers = req.headers();
        let secret = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .or_else(|| headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()))
            .unwrap_or("");
        if secret.starts_with("good") {
            HttpResponse::Ok().json(json!({"object": "list", "data": []}))
        } else if secret.starts_with("busy") {
            HttpResponse::TooManyRequests().json(json!({"error": {"message": "slow down"}}))
        } else {
            HttpResponse::Unauthorized().json(json!({"error": {"message": "bad key"}}))
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(|| App::new().route("/v1/models", web::get().to(models)))
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
    actix_web::rt::spawn(server);
    format!("http://127.0.0.1:{port}/v1")
}

/// A port that was free a moment ago, for a child process to bind.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The built `switchyard` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

/// Polls `check` every 50 ms until it gives `Ok`, and panics with its last `Err` (what it saw)
/// after `secs` seconds: for what the app does in the background, such as metering.
pub async fn eventually<T, F, Fut>(secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) if std::time::Instant::now() >= deadline => panic!("{seen}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

impl TestApp {
    /// Waits until the user's `spent_usd` reads `usd`.
    pub async fn wait_for_spend(&self, user_id: &str, usd: f64) {
        eventually(10, || async move {
            let (_, user) = self
                .admin_json(
                    reqwest::Method::GET,
                    &format!("/admin/users/{user_id}"),
                    None,
                )
                .await;
            if user["spent_usd"] == json!(usd) {
                Ok(())
            } else {
                Err(format!("spend never reached {usd}: {user}"))
            }
        })
        .await
    }
}

/// A database made unreachable: PostgreSQL refusing connections to it (and its open ones cut),
/// or SQLite's write lock held by another connection.
pub enum Outage {
    Postgres(Box<diesel_async::AsyncPgConnection>, String),
    Sqlite(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>),
}

impl Outage {
    pub async fn begin(backend: Backend, database_url: &str) -> Outage {
        use diesel_async::{AsyncConnection, SimpleAsyncConnection};
        match backend {
            Backend::Postgres => {
                let name = database_url.rsplit('/').next().unwrap().to_owned();
                let mut admin = diesel_async::AsyncPgConnection::establish(&pg_admin_url())
                    .await
                    .unwrap();
                admin
                    .batch_execute(&format!(
                        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
                         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
                    ))
                    .await
                    .unwrap();
                Outage::Postgres(Box::new(admin), name)
            }
            Backend::Sqlite => {
                use diesel::connection::SimpleConnection;
                use diesel::Connection;
                let path = database_url.strip_prefix("sqlite://").unwrap().to_owned();
                let (locked_tx, locked_rx) = std::sync::mpsc::channel();
                let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
                let holder = std::thread::spawn(move || {
                    let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
                    conn.batch_execute("BEGIN EXCLUSIVE").unwrap();
                    locked_tx.send(()).unwrap();
                    let _ = release_rx.recv();
                    conn.batch_execute("ROLLBACK").unwrap();
                });
                locked_rx.recv().unwrap();
                Outage::Sqlite(release_tx, holder)
            }
        }
    }

    pub async fn end(self) {
        use diesel_async::SimpleAsyncConnection;
        match self {
            Outage::Postgres(mut admin, name) => admin
                .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
                .await
                .unwrap(),
            Outage::Sqlite(release, holder) => {
                release.send(()).unwrap();
                tokio::task::spawn_blocking(move || holder.join().unwrap())
                    .await
                    .unwrap();
            }
        }
    }
}

impl TestApp {
    /// `GET /readyz`: status and body.
    pub async fn readyz(&self) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}/readyz", self.address))
            .send()
            .await
            .unwrap();
        into_json(response).await
    }

    /// `GET /metrics`, checked to be Prometheus text.
    pub async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        response.text().await.unwrap()
    }
}

/// Whether `metrics` has a sample of `name` with every label in `labels` and `value`.
pub fn has_sample(metrics: &str, name: &str, labels: &[&str], value: &str) -> bool {
    metrics.lines().any(|line| {
        line.starts_with(&format!("{name}{{"))
            && labels.iter().all(|l| line.contains(l))
            && line.rsplit(' ').next() == Some(value)
    })
}

/// Polls `/admin/logs` (`query` without `?`) until it lists `n` entries.
pub async fn log_entries(app: &TestApp, query: &str, n: usize) -> Vec<Value> {
    eventually(30, || async move {
        let (_, body) = app
            .admin_json(reqwest::Method::GET, &format!("/admin/logs?{query}"), None)
            .await;
        let entries = body["data"].as_array().unwrap().clone();
        if entries.len() == n {
            Ok(entries)
        } else {
            Err(format!("expected {n} log entries: {body}"))
        }
    })
    .await
}

impl TestApp {
    /// Runs `sql` on the app's database behind its back, as another replica or an operator
    /// would.
    pub async fn run_sql(&self, sql: &str) {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        use diesel_async::{AsyncConnection, SimpleAsyncConnection};
        match self.database_url.strip_prefix("sqlite://") {
            Some(path) => {
                let (path, sql) = (path.to_owned(), sql.to_owned());
                tokio::task::spawn_blocking(move || {
                    diesel::SqliteConnection::establish(&path)
                        .unwrap()
                        .batch_execute(&sql)
                        .unwrap()
                })
                .await
                .unwrap()
            }
            None => diesel_async::AsyncPgConnection::establish(&self.database_url)
                .await
                .unwrap()
                .batch_execute(sql)
                .await
                .unwrap(),
        }
    }
}
