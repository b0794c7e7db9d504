//! Rows as stored, and their conversion to and from the domain types.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{model_mappings, prices, request_logs, upstream_keys, user_keys, users};
use super::DbError;
use crate::domain::{ModelMapping, Price, Provider, UpstreamKey, User, UserKey, UserStatus};

/// A `users` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = users)]
pub struct UserRow {
    pub id: String,
    pub name: String,
    pub status: String,
    pub level: i32,
    pub fallback_levels: String,
    pub ip_allowlist: String,
    pub allowed_models: String,
    pub allowed_endpoints: String,
    pub spend_limit_nanos: Option<i64>,
    pub spent_nanos: i64,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub model_limits: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// The columns an admin may change; `spent_nanos` belongs to metering and is never written here.
#[derive(Debug, Clone, AsChangeset)]
#[diesel(table_name = users, treat_none_as_null = true)]
pub struct UserRulesChange {
    pub name: String,
    pub status: String,
    pub level: i32,
    pub fallback_levels: String,
    pub ip_allowlist: String,
    pub allowed_models: String,
    pub allowed_endpoints: String,
    pub spend_limit_nanos: Option<i64>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub model_limits: String,
    pub updated_at: NaiveDateTime,
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising plain vectors and maps of strings and numbers cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn from_json<T: serde::de::DeserializeOwned>(column: &str, text: &str) -> Result<T, DbError> {
    serde_json::from_str(text).map_err(|e| DbError::Corrupt(format!("{column}: {e}")))
}

impl From<&User> for UserRow {
    fn from(u: &User) -> Self {
        UserRow {
            id: u.id.clone(),
            name: u.name.clone(),
            status: u.status.as_str().to_owned(),
            level: u.level,
            fallback_levels: to_json(&u.fallback_levels),
            ip_allowlist: to_json(&u.ip_allowlist),
            allowed_models: to_json(&u.allowed_models),
            allowed_endpoints: to_json(&u.allowed_endpoints),
            spend_limit_nanos: u.spend_limit_nanos,
            spent_nanos: u.spent_nanos,
            rpm: u.rpm,
            tpm: u.tpm,
            model_limits: to_json(&u.model_limits),
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}

impl From<&User> for UserRulesChange {
    fn from(u: &User) -> Self {
        let row = UserRow::from(u);
        UserRulesChange {
            name: row.name,
            status: row.status,
            level: row.level,
            fallback_levels: row.fallback_levels,
            ip_allowlist: row.ip_allowlist,
            allowed_models: row.allowed_models,
            allowed_endpoints: row.allowed_endpoints,
            spend_limit_nanos: row.spend_limit_nanos,
            rpm: row.rpm,
            tpm: row.tpm,
            model_limits: row.model_limits,
            updated_at: row.updated_at,
        }
    }
}

impl TryFrom<UserRow> for User {
    type Error = DbError;

    fn try_from(r: UserRow) -> Result<Self, DbError> {
        Ok(User {
            status: UserStatus::parse(&r.status)
                .ok_or_else(|| DbError::Corrupt(format!("users.status `{}`", r.status)))?,
            fallback_levels: from_json("users.fallback_levels", &r.fallback_levels)?,
            ip_allowlist: from_json("users.ip_allowlist", &r.ip_allowlist)?,
            allowed_models: from_json("users.allowed_models", &r.allowed_models)?,
            allowed_endpoints: from_json("users.allowed_endpoints", &r.allowed_endpoints)?,
            model_limits: from_json("users.model_limits", &r.model_limits)?,
            id: r.id,
            name: r.name,
            level: r.level,
            spend_limit_nanos: r.spend_limit_nanos,
            spent_nanos: r.spent_nanos,
            rpm: r.rpm,
            tpm: r.tpm,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// A `user_keys` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = user_keys)]
pub struct UserKeyRow {
    pub id: String,
    pub user_id: String,
    pub name: Option<String>,
    pub key_hash: String,
    pub key_hint: String,
    pub created_at: NaiveDateTime,
    pub expires_at: Option<NaiveDateTime>,
    pub revoked_at: Option<NaiveDateTime>,
}

impl From<UserKeyRow> for UserKey {
    fn from(r: UserKeyRow) -> Self {
        UserKey {
            id: r.id,
            user_id: r.user_id,
            name: r.name,
            key_hash: r.key_hash,
            key_hint: r.key_hint,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
        }
    }
}

impl From<&UserKey> for UserKeyRow {
    fn from(k: &UserKey) -> Self {
        UserKeyRow {
            id: k.id.clone(),
            user_id: k.user_id.clone(),
            name: k.name.clone(),
            key_hash: k.key_hash.clone(),
            key_hint: k.key_hint.clone(),
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// An `upstream_keys` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = upstream_keys)]
pub struct UpstreamKeyRow {
    pub id: String,
    pub provider: String,
    pub base_url: String,
    pub secret_enc: String,
    pub secret_hint: String,
    pub level: i32,
    pub models: String,
    pub weight: i32,
    pub enabled: bool,
    pub cooldown_until: Option<NaiveDateTime>,
    pub disabled_at: Option<NaiveDateTime>,
    pub disabled_reason: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

impl From<&UpstreamKey> for UpstreamKeyRow {
    fn from(k: &UpstreamKey) -> Self {
        UpstreamKeyRow {
            id: k.id.clone(),
            provider: k.provider.as_str().to_owned(),
            base_url: k.base_url.clone(),
            secret_enc: k.secret_enc.clone(),
            secret_hint: k.secret_hint.clone(),
            level: k.level,
            models: to_json(&k.models),
            weight: k.weight,
            enabled: k.enabled,
            cooldown_until: k.cooldown_until,
            disabled_at: k.disabled_at,
            disabled_reason: k.disabled_reason.clone(),
            created_at: k.created_at,
            updated_at: k.updated_at,
        }
    }
}

impl TryFrom<UpstreamKeyRow> for UpstreamKey {
    type Error = DbError;

    fn try_from(r: UpstreamKeyRow) -> Result<Self, DbError> {
        Ok(UpstreamKey {
            provider: Provider::parse(&r.provider).ok_or_else(|| {
                DbError::Corrupt(format!("upstream_keys.provider `{}`", r.provider))
            })?,
            models: from_json("upstream_keys.models", &r.models)?,
            id: r.id,
            base_url: r.base_url,
            secret_enc: r.secret_enc,
            secret_hint: r.secret_hint,
            level: r.level,
            weight: r.weight,
            enabled: r.enabled,
            cooldown_until: r.cooldown_until,
            disabled_at: r.disabled_at,
            disabled_reason: r.disabled_reason,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// A `model_mappings` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = model_mappings)]
pub struct ModelMappingRow {
    pub id: String,
    pub from_pattern: String,
    pub to_model: String,
    pub user_id: Option<String>,
    pub created_at: NaiveDateTime,
}

impl From<ModelMappingRow> for ModelMapping {
    fn from(r: ModelMappingRow) -> Self {
        ModelMapping {
            id: r.id,
            from: r.from_pattern,
            to: r.to_model,
            user_id: r.user_id,
            created_at: r.created_at,
        }
    }
}

impl From<&ModelMapping> for ModelMappingRow {
    fn from(m: &ModelMapping) -> Self {
        ModelMappingRow {
            id: m.id.clone(),
            from_pattern: m.from.clone(),
            to_model: m.to.clone(),
            user_id: m.user_id.clone(),
            created_at: m.created_at,
        }
    }
}

/// A `prices` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = prices, treat_none_as_null = true)]
pub struct PriceRow {
    pub model: String,
    pub input_per_mtok_nanos: i64,
    pub output_per_mtok_nanos: i64,
    pub cached_input_per_mtok_nanos: Option<i64>,
    pub reasoning_per_mtok_nanos: Option<i64>,
    pub per_image_nanos: Option<i64>,
    pub per_audio_second_nanos: Option<i64>,
    pub updated_at: NaiveDateTime,
}

impl From<PriceRow> for Price {
    fn from(r: PriceRow) -> Self {
        Price {
            model: r.model,
            input_per_mtok_nanos: r.input_per_mtok_nanos,
            output_per_mtok_nanos: r.output_per_mtok_nanos,
            cached_input_per_mtok_nanos: r.cached_input_per_mtok_nanos,
            reasoning_per_mtok_nanos: r.reasoning_per_mtok_nanos,
            per_image_nanos: r.per_image_nanos,
            per_audio_second_nanos: r.per_audio_second_nanos,
            updated_at: r.updated_at,
        }
    }
}

impl From<&Price> for PriceRow {
    fn from(p: &Price) -> Self {
        PriceRow {
            model: p.model.clone(),
            input_per_mtok_nanos: p.input_per_mtok_nanos,
            output_per_mtok_nanos: p.output_per_mtok_nanos,
            cached_input_per_mtok_nanos: p.cached_input_per_mtok_nanos,
            reasoning_per_mtok_nanos: p.reasoning_per_mtok_nanos,
            per_image_nanos: p.per_image_nanos,
            per_audio_second_nanos: p.per_audio_second_nanos,
            updated_at: p.updated_at,
        }
    }
}

/// A `request_logs` row: one client call, and what it used and cost when an upstream answered
/// it (`metered`). `None` is written as NULL, not as the column's default, so every row has
/// the same shape (one multi-row insert on PostgreSQL). On SQLite the rows are written by
/// metering's own connection (`db::SqliteWriter`), column by column in `repo::usage`.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = request_logs, treat_none_as_default_value = false)]
pub struct LogRow {
    pub id: String,
    pub ts: NaiveDateTime,
    pub user_id: Option<String>,
    pub key_id: Option<String>,
    pub route: String,
    pub model: Option<String>,
    pub upstream_model: Option<String>,
    pub upstream_key_id: Option<String>,
    pub level: Option<i32>,
    pub status: i32,
    pub attempts: i32,
    pub latency_ms: i64,
    pub ttfb_ms: Option<i64>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_nanos: i64,
    pub partial: bool,
    pub error_code: Option<String>,
    /// An upstream answered: the usage below counts in `/admin/usage` and in spend.
    pub metered: bool,
    pub reasoning_tokens: i64,
    pub cached_tokens: i64,
    pub images: i64,
    pub audio_seconds: f64,
    pub characters: i64,
}
