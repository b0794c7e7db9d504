//! Settings: `config/default.toml`, then an optional `--config` file, then environment variables.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Everything Switchyard reads at start-up.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub upstream: UpstreamSettings,
    pub redis: RedisSettings,
    pub auth: AuthSettings,
    pub log: LogSettings,
    pub metering: MeteringSettings,
    pub cluster: ClusterSettings,
}

/// How replicas keep each other's configuration current.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterSettings {
    /// Milliseconds between two reads of the stored configuration version; a replica that finds
    /// it ahead of what it applied (a missed announcement) reloads everything.
    pub version_check_ms: u64,
    /// Seconds a verified key or a user's rules stay in the shared Redis cache.
    pub shared_cache_ttl_secs: u64,
}

/// The HTTP listener.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub listen: String,
    pub workers: usize,
    pub max_body_bytes: usize,
    pub shutdown_timeout_secs: u64,
    /// Seconds an idle client connection is kept open.
    pub keep_alive_secs: u64,
    /// Proxies whose `X-Forwarded-For` is believed: CIDRs, as a TOML array or a comma-separated
    /// string (`SWITCHYARD_SERVER__TRUSTED_PROXIES=10.0.0.0/8,127.0.0.1`).
    #[serde(deserialize_with = "list_or_csv")]
    pub trusted_proxies: Vec<String>,
}

/// A list given either as an array (config files) or as one comma-separated string (environment
/// variables, which have no arrays).
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match Form::deserialize(d)? {
        Form::List(items) => items,
        Form::Csv(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// The database connection.
#[derive(Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: usize,
    pub acquire_timeout_secs: u64,
}

/// Calls to providers: timeouts, retries and key health.
#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamSettings {
    pub connect_timeout_secs: u64,
    pub first_byte_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_attempts: u32,
    pub total_deadline_secs: u64,
    pub default_cooldown_secs: u64,
    pub breaker_failures: u32,
    pub breaker_open_secs: u64,
    /// How often keys a provider refused are probed again; 0: never.
    pub reprobe_interval_secs: u64,
    /// Rest for a key whose account is out of credit (402, or 429 `insufficient_quota`).
    pub quota_cooldown_secs: u64,
    /// Whether streamed chat and text completions ask the provider for their usage
    /// (`stream_options.include_usage`) when the client did not.
    pub request_stream_usage: bool,
}

/// Redis, when replicas share state.
#[derive(Clone, Deserialize)]
pub struct RedisSettings {
    pub url: String,
    /// Prefix of every key Switchyard writes, so several installations can share one Redis.
    pub key_prefix: String,
    /// Milliseconds a Redis command may take before the call falls back to in-process limits.
    pub timeout_ms: u64,
}

/// Admin token, master key and the credential caches.
#[derive(Clone, Deserialize)]
pub struct AuthSettings {
    pub admin_token: String,
    pub master_key: String,
    pub key_cache_size: usize,
    pub user_cache_size: usize,
}

/// Usage, costs and request logs, written in the background.
#[derive(Debug, Clone, Deserialize)]
pub struct MeteringSettings {
    /// Milliseconds between two writes of buffered usage and log rows.
    pub flush_interval_ms: u64,
    /// Most rows in one multi-row insert.
    pub batch_size: usize,
    /// Most rows each writer holds while the database is away; past it they are dropped and
    /// counted.
    pub buffer_records: usize,
    /// Days request logs are kept; 0 keeps them forever.
    pub log_retention_days: u64,
    /// Seconds the final flush at shutdown may take.
    pub shutdown_flush_secs: u64,
    /// Whether the shipped price table seeds prices missing from the database at start.
    pub seed_prices: bool,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

// URLs may carry passwords and the auth section holds secrets: their Debug output says only
// whether they are set, so a `?settings` in a log line can never leak them.
impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("backend", &self.url.split(':').next().unwrap_or(""))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("configured", &!self.url.is_empty())
            .field("key_prefix", &self.key_prefix)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("admin_token_set", &!self.admin_token.is_empty())
            .field("master_key_set", &!self.master_key.is_empty())
            .field("key_cache_size", &self.key_cache_size)
            .finish()
    }
}

/// The defaults shipped in the binary, so it runs from any directory.
const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// API.md's short environment names and the setting each one sets.
const SHORT_ENV_NAMES: [(&str, &str); 5] = [
    ("SWITCHYARD_LISTEN", "server.listen"),
    ("SWITCHYARD_DATABASE_URL", "database.url"),
    ("SWITCHYARD_REDIS_URL", "redis.url"),
    ("SWITCHYARD_ADMIN_TOKEN", "auth.admin_token"),
    ("SWITCHYARD_MASTER_KEY", "auth.master_key"),
];

impl Settings {
    /// Layers the defaults, `config_file` and the process environment.
    pub fn load(config_file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(config_file, std::env::vars())
    }

    /// Like [`Settings::load`], with the environment given explicitly (tests use this).
    pub fn load_from(
        config_file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SWITCHYARD_"))
            .collect();
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = config_file {
            let path = path
                .to_str()
                .context("the --config path must be valid UTF-8")?;
            builder = builder
                .add_source(config::File::new(path, config::FileFormat::Toml).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("SWITCHYARD")
                .prefix_separator("_")
                .separator("__")
                // Values stay text until a field's type reads them: `try_parsing` would turn
                // a token such as `007` or `1e3` into a number and back (`7`, `1000`).
                .source(Some(env.clone())),
        );
        for (name, key) in SHORT_ENV_NAMES {
            if let Some(value) = env.get(name) {
                builder = builder.set_override(key, value.clone())?;
            }
        }
        let settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("invalid configuration")?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.database_kind()?;
        anyhow::ensure!(
            self.database.max_connections > 0,
            "database.max_connections must be at least 1"
        );
        anyhow::ensure!(
            self.upstream.max_attempts > 0 && self.upstream.breaker_failures > 0,
            "upstream.max_attempts and upstream.breaker_failures must be at least 1"
        );
        anyhow::ensure!(
            self.auth.key_cache_size > 0 && self.auth.user_cache_size > 0,
            "auth cache sizes must be at least 1"
        );
        self.trusted_proxies()?;
        anyhow::ensure!(
            self.redis.timeout_ms > 0,
            "redis.timeout_ms must be at least 1"
        );
        // Each of these at 0 would make every call, write or check fail or spin, not
        // "unbounded": say so at start rather than at the first call.
        let at_least_one = [
            ("cluster.version_check_ms", self.cluster.version_check_ms),
            (
                "cluster.shared_cache_ttl_secs",
                self.cluster.shared_cache_ttl_secs,
            ),
            (
                "database.acquire_timeout_secs",
                self.database.acquire_timeout_secs,
            ),
            (
                "upstream.connect_timeout_secs",
                self.upstream.connect_timeout_secs,
            ),
            (
                "upstream.first_byte_timeout_secs",
                self.upstream.first_byte_timeout_secs,
            ),
            (
                "upstream.idle_timeout_secs",
                self.upstream.idle_timeout_secs,
            ),
            (
                "upstream.total_deadline_secs",
                self.upstream.total_deadline_secs,
            ),
            (
                "metering.flush_interval_ms",
                self.metering.flush_interval_ms,
            ),
            ("metering.batch_size", self.metering.batch_size as u64),
            (
                "metering.buffer_records",
                self.metering.buffer_records as u64,
            ),
            (
                "metering.shutdown_flush_secs",
                self.metering.shutdown_flush_secs,
            ),
        ];
        for (name, value) in at_least_one {
            anyhow::ensure!(value > 0, "{name} must be at least 1");
        }
        anyhow::ensure!(
            self.log.level.parse::<tracing::Level>().is_ok(),
            "log.level must be one of trace, debug, info, warn, error"
        );
        Ok(())
    }

    /// The trusted proxies as networks.
    pub fn trusted_proxies(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        self.server
            .trusted_proxies
            .iter()
            .map(|text| {
                crate::domain::rules::parse_cidr(text)
                    .map_err(|e| anyhow::anyhow!("server.trusted_proxies: {e}"))
            })
            .collect()
    }

    /// Which backend the database URL names.
    pub fn database_kind(&self) -> anyhow::Result<DatabaseKind> {
        DatabaseKind::from_url(&self.database.url)
    }
}

/// The two storage backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseKind {
    /// A PostgreSQL server (production).
    Postgres,
    /// An embedded SQLite file at this path.
    Sqlite(PathBuf),
}

impl DatabaseKind {
    /// Reads the backend from the URL scheme.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            anyhow::ensure!(!path.is_empty(), "sqlite:// URL needs a file path");
            Ok(Self::Sqlite(PathBuf::from(path)))
        } else {
            anyhow::bail!("database URL must start with postgres:// or sqlite://")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_without_any_file_or_variable() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert_eq!(s.server.keep_alive_secs, 75, "longer than a proxy's 60 s");
        assert_eq!(
            s.database_kind().unwrap(),
            DatabaseKind::Sqlite("switchyard.db".into())
        );
    }

    #[test]
    fn short_names_and_sectioned_names_override_defaults() {
        let s = Settings::load_from(
            None,
            env(&[
                ("SWITCHYARD_LISTEN", "0.0.0.0:9000"),
                ("SWITCHYARD_DATABASE_URL", "postgres://db/x"),
                ("SWITCHYARD_SERVER__WORKERS", "3"),
                ("SWITCHYARD_LOG__FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen, "0.0.0.0:9000");
        assert_eq!(s.server.workers, 3);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.database_kind().unwrap(), DatabaseKind::Postgres);
    }

    #[test]
    fn sectioned_values_keep_their_text_and_still_fill_typed_fields() {
        let s = Settings::load_from(
            None,
            env(&[
                ("SWITCHYARD_AUTH__ADMIN_TOKEN", "007"),
                ("SWITCHYARD_REDIS__KEY_PREFIX", "1e3"),
                ("SWITCHYARD_SERVER__MAX_BODY_BYTES", "1024"),
                ("SWITCHYARD_METERING__SEED_PRICES", "false"),
                ("SWITCHYARD_UPSTREAM__REQUEST_STREAM_USAGE", "TRUE"),
            ]),
        )
        .unwrap();
        assert_eq!(s.auth.admin_token, "007");
        assert_eq!(s.redis.key_prefix, "1e3");
        assert_eq!(s.server.max_body_bytes, 1024);
        assert!(!s.metering.seed_prices);
        assert!(s.upstream.request_stream_usage);
    }

    #[test]
    fn trusted_proxies_read_from_a_list_or_a_comma_separated_variable() {
        let s = Settings::load_from(
            None,
            env(&[(
                "SWITCHYARD_SERVER__TRUSTED_PROXIES",
                "10.0.0.0/8, 127.0.0.1",
            )]),
        )
        .unwrap();
        assert_eq!(s.trusted_proxies().unwrap().len(), 2);
        let bad = Settings::load_from(
            None,
            env(&[("SWITCHYARD_SERVER__TRUSTED_PROXIES", "not-a-net")]),
        );
        assert!(format!("{:#}", bad.unwrap_err()).contains("trusted_proxies"));
    }

    #[test]
    fn unknown_database_scheme_is_refused() {
        let err = Settings::load_from(None, env(&[("SWITCHYARD_DATABASE_URL", "mysql://x")]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("postgres://"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let s = Settings::load_from(
            None,
            env(&[
                ("SWITCHYARD_ADMIN_TOKEN", "tok-very-secret"),
                ("SWITCHYARD_DATABASE_URL", "postgres://u:hunter2@db/x"),
            ]),
        )
        .unwrap();
        let text = format!("{s:?}");
        assert!(!text.contains("tok-very-secret"));
        assert!(!text.contains("hunter2"));
    }
}
