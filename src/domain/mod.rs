//! The values Switchyard reasons about, each built only through a checked constructor.

pub mod api_key;
pub mod ids;
pub mod money;
pub mod rules;

use std::collections::BTreeMap;

use chrono::NaiveDateTime;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use rules::ModelLimit;

/// Whether a user may make calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Suspended,
}

impl UserStatus {
    /// The stored and wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Suspended => "suspended",
        }
    }

    /// Reads the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(UserStatus::Active),
            "suspended" => Some(UserStatus::Suspended),
            _ => None,
        }
    }
}

/// An upstream provider family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI and every OpenAI-compatible server.
    #[serde(rename = "openai")]
    OpenAi,
    Anthropic,
    Gemini,
}

impl Provider {
    /// The stored and wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }

    /// Reads the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(Provider::OpenAi),
            "anthropic" => Some(Provider::Anthropic),
            "gemini" => Some(Provider::Gemini),
            _ => None,
        }
    }

    /// The provider's public API base, used when a key is added without one.
    pub fn default_base_url(self) -> &'static str {
        match self {
            Provider::OpenAi => "https://api.openai.com/v1",
            Provider::Anthropic => "https://api.anthropic.com/v1",
            Provider::Gemini => "https://generativelanguage.googleapis.com/v1beta",
        }
    }

    /// Whether `model` is of this provider's own families: the models its keys without a
    /// `models` list serve when a chat completion is translated to its API (OpenAI-compatible
    /// keys without one serve every model, as they always have).
    pub fn makes(self, model: &str) -> bool {
        match self {
            Provider::OpenAi => false,
            Provider::Anthropic => model.starts_with("claude"),
            Provider::Gemini => ["gemini", "gemma", "learnlm"]
                .iter()
                .any(|family| model.starts_with(family)),
        }
    }
}

/// A user of the router and every rule that applies to their calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub status: UserStatus,
    pub level: i32,
    pub fallback_levels: Vec<i32>,
    pub ip_allowlist: Vec<IpNet>,
    pub allowed_models: Vec<String>,
    pub allowed_endpoints: Vec<String>,
    pub spend_limit_nanos: Option<i64>,
    pub spent_nanos: i64,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub model_limits: BTreeMap<String, ModelLimit>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// A user's API key as stored: never the key itself, only its argon2 hash and a hint.
#[derive(Debug, Clone, PartialEq)]
pub struct UserKey {
    pub id: String,
    pub user_id: String,
    pub name: Option<String>,
    pub key_hash: String,
    pub key_hint: String,
    pub created_at: NaiveDateTime,
    pub expires_at: Option<NaiveDateTime>,
    pub revoked_at: Option<NaiveDateTime>,
}

/// An upstream provider key, its secret still encrypted.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamKey {
    pub id: String,
    pub provider: Provider,
    pub base_url: String,
    pub secret_enc: String,
    pub secret_hint: String,
    pub level: i32,
    pub models: Vec<String>,
    pub weight: i32,
    pub enabled: bool,
    pub cooldown_until: Option<NaiveDateTime>,
    pub disabled_at: Option<NaiveDateTime>,
    pub disabled_reason: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// What the admin view reports of an upstream key's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKeyState {
    Healthy,
    CoolingDown,
    Disabled,
}

impl UpstreamKey {
    /// The key's state at `now`: switched off by an admin or the provider, resting after a
    /// 429, or ready.
    pub fn state(&self, now: NaiveDateTime) -> UpstreamKeyState {
        if !self.enabled || self.disabled_at.is_some() {
            UpstreamKeyState::Disabled
        } else if self.cooldown_until.is_some_and(|until| until > now) {
            UpstreamKeyState::CoolingDown
        } else {
            UpstreamKeyState::Healthy
        }
    }
}

/// A model-name rewrite, system-wide or for one user.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMapping {
    pub id: String,
    pub from: String,
    pub to: String,
    pub user_id: Option<String>,
    pub created_at: NaiveDateTime,
}

/// Prices of one model, in nano-USD.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub model: String,
    pub input_per_mtok_nanos: i64,
    pub output_per_mtok_nanos: i64,
    pub cached_input_per_mtok_nanos: Option<i64>,
    pub reasoning_per_mtok_nanos: Option<i64>,
    pub per_image_nanos: Option<i64>,
    pub per_audio_second_nanos: Option<i64>,
    pub updated_at: NaiveDateTime,
}

/// The current time as stored: UTC, microsecond precision (both backends keep microseconds).
pub fn now() -> NaiveDateTime {
    let now = chrono::Utc::now().naive_utc();
    let micros = now.and_utc().timestamp_micros();
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.naive_utc())
        .unwrap_or(now)
}

/// The `updated_at` of a new version of a record last stamped `seen`: now, and always after
/// `seen`, so that a write-if-unchanged never mistakes the new version for the one it read.
pub fn next_stamp(seen: NaiveDateTime) -> NaiveDateTime {
    now().max(seen + chrono::Duration::microseconds(1))
}
