//! First start: the admin token (from settings only) and the master key (from settings, or
//! generated into a file beside an embedded database), and upstream keys taken from the
//! providers' usual environment variables.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::{DatabaseKind, Settings};
use crate::crypto::{self, MasterKey};
use crate::db::{repo, Db};
use crate::domain::{self, ids, Provider, UpstreamKey};

/// The secrets the service runs with.
pub struct Secrets {
    /// `None`: no admin token configured, so the admin API refuses every call.
    pub admin_token: Option<String>,
    pub master_key: MasterKey,
}

/// Resolves the admin token and master key. The token comes from settings alone: without one
/// the admin API answers 401 on every backend. The master key comes from settings, else on
/// SQLite from a file beside the database, read or created (mode 0600); on PostgreSQL a missing
/// master key is fatal.
pub fn resolve_secrets(settings: &Settings) -> anyhow::Result<Secrets> {
    let configured_token =
        Some(settings.auth.admin_token.trim().to_owned()).filter(|t| !t.is_empty());
    let configured_key = Some(settings.auth.master_key.trim().to_owned()).filter(|k| !k.is_empty());
    match settings.database_kind()? {
        DatabaseKind::Postgres => {
            let key = configured_key.context(
                "SWITCHYARD_MASTER_KEY is required with PostgreSQL: set it to base64 of 32 random \
                 bytes (e.g. `openssl rand -base64 32`) and keep it safe; it encrypts upstream secrets",
            )?;
            if configured_token.is_none() {
                warn_admin_disabled(None);
            }
            Ok(Secrets {
                admin_token: configured_token,
                master_key: MasterKey::from_base64(&key).context("SWITCHYARD_MASTER_KEY")?,
            })
        }
        DatabaseKind::Sqlite(db_path) => {
            let master_key = match configured_key {
                Some(key) => key,
                None => {
                    let path = sibling(&db_path, "master_key");
                    if !path.exists() && stored_secret_count(&db_path) > 0 {
                        anyhow::bail!(
                            "{} holds encrypted upstream secrets but {} is missing: restore that \
                             file or set SWITCHYARD_MASTER_KEY to the key they were stored with",
                            db_path.display(),
                            path.display()
                        );
                    }
                    read_or_create(&path, MasterKey::generate_base64)?.0
                }
            };
            if configured_token.is_none() {
                // Earlier versions generated a token into this file.
                let earlier = sibling(&db_path, "admin_token");
                warn_admin_disabled(Some(&earlier).filter(|path| path.exists()));
            }
            Ok(Secrets {
                admin_token: configured_token,
                master_key: MasterKey::from_base64(&master_key).context("the master key")?,
            })
        }
    }
}

/// Refuses a master key that decrypts none of the stored upstream secrets: it is not the key
/// they were stored with, and starting would only make every key unusable while `/readyz`
/// answers ready. (Some secrets not decrypting is logged per key when the pools load.)
pub async fn verify_master_key(db: &Db, master_key: &MasterKey) -> anyhow::Result<()> {
    let keys = repo::upstream_keys::all(db)
        .await
        .context("reading upstream keys")?;
    if keys.is_empty()
        || keys
            .iter()
            .any(|key| master_key.decrypt(&key.id, &key.secret_enc).is_ok())
    {
        return Ok(());
    }
    anyhow::bail!(
        "the master key decrypts none of the {} stored upstream secrets: it is not the key they \
         were stored with; set SWITCHYARD_MASTER_KEY to that key",
        keys.len()
    )
}

/// How many upstream secrets an existing SQLite file holds (0 when it or the table is absent).
fn stored_secret_count(db_path: &Path) -> i64 {
    use diesel::{Connection, QueryDsl, RunQueryDsl, SqliteConnection};
    if !db_path.exists() {
        return 0;
    }
    crate::db::prepare_sqlite_library();
    let Ok(mut conn) = SqliteConnection::establish(&db_path.to_string_lossy()) else {
        return 0;
    };
    crate::db::schema::upstream_keys::table
        .count()
        .get_result(&mut conn)
        .unwrap_or(0)
}

/// `switchyard.db` → `switchyard.<suffix>` in the same directory.
fn sibling(db_path: &Path, suffix: &str) -> PathBuf {
    let stem = db_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "switchyard".into());
    db_path.with_file_name(format!("{stem}.{suffix}"))
}

/// Says that the admin API is off, and how to turn it on (with the file an earlier version
/// generated a token into, when there is one).
fn warn_admin_disabled(earlier: Option<&PathBuf>) {
    match earlier {
        Some(file) => tracing::warn!(
            file = %file.display(),
            "SWITCHYARD_ADMIN_TOKEN is not set: the admin API answers 401 to every call; an \
             earlier version generated a token into this file, and setting \
             SWITCHYARD_ADMIN_TOKEN to its content keeps it"
        ),
        None => tracing::warn!(
            "SWITCHYARD_ADMIN_TOKEN is not set: the admin API answers 401 to every call (set \
             it to a long random string, e.g. `openssl rand -hex 32`)"
        ),
    }
}

/// Reads a secret file, or creates it (0600, never overwriting) with `make`. True if created.
fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<(String, bool)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let value = make()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(value.as_bytes())
                .and_then(|_| file.write_all(b"\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok((value, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let text = text.trim().to_owned();
            anyhow::ensure!(!text.is_empty(), "{} is empty", path.display());
            Ok((text, false))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Provider keys read from the environment on the very first start.
const PROVIDER_ENV: [(Provider, &str, &str); 3] = [
    (Provider::OpenAi, "OPENAI_API_KEY", "OPENAI_BASE_URL"),
    (
        Provider::Anthropic,
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
    ),
    (Provider::Gemini, "GEMINI_API_KEY", "GEMINI_BASE_URL"),
];

/// On the installation's first start only (replicas agree through the database), adds each of
/// `OPENAI_API_KEY`, `ANTHROPIC_API_KEY` and `GEMINI_API_KEY` that is set as a level-1 upstream key.
pub async fn seed_first_start(db: &Db, master_key: &MasterKey) -> anyhow::Result<()> {
    // Checked before the first start is recorded, so a fixed variable is still imported.
    let mut imports = Vec::new();
    for (provider, key_var, url_var) in PROVIDER_ENV {
        let Some(secret) = std::env::var(key_var).ok().filter(|s| !s.trim().is_empty()) else {
            continue;
        };
        // A base URL set wrong must not send the secret to the provider's default instead.
        let base_url = match std::env::var(url_var).ok().filter(|u| !u.trim().is_empty()) {
            Some(url) => domain::rules::check_base_url(url.trim())
                .map_err(|why| anyhow::anyhow!("{url_var} is not a usable base URL: {why}"))?,
            None => provider.default_base_url().to_owned(),
        };
        imports.push((provider, key_var, secret, base_url));
    }
    let now = domain::now();
    let first = repo::meta::insert_if_absent(db, "bootstrapped_at", &now.to_string())
        .await
        .context("recording the first start")?;
    if !first {
        return Ok(());
    }
    for (provider, key_var, secret, base_url) in imports {
        let id = ids::new_id("upk");
        let key = UpstreamKey {
            secret_enc: master_key.encrypt(&id, secret.trim())?,
            secret_hint: crypto::hint(secret.trim()),
            id,
            provider,
            base_url,
            level: 1,
            models: Vec::new(),
            weight: 1,
            enabled: true,
            cooldown_until: None,
            disabled_at: None,
            disabled_reason: None,
            created_at: now,
            updated_at: now,
        };
        repo::upstream_keys::insert(db, &key).await?;
        tracing::info!(provider = provider.as_str(), key_id = %key.id, "added upstream key from {key_var}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_created_once_with_owner_only_access() {
        let dir = std::env::temp_dir().join(format!("sy-boot-{}", uuid::Uuid::new_v4()));
        let path = dir.join("x.master_key");
        let (first, created) = read_or_create(&path, MasterKey::generate_base64).unwrap();
        assert!(created);
        let (second, created_again) = read_or_create(&path, MasterKey::generate_base64).unwrap();
        assert!(!created_again);
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn secret_files_sit_beside_the_database() {
        assert_eq!(
            sibling(Path::new("data/switchyard.db"), "master_key"),
            PathBuf::from("data/switchyard.master_key")
        );
    }
}
