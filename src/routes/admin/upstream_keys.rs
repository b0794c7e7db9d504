//! `/admin/upstream-keys`: the providers' keys the router spends, grouped by level.

use actix_web::{web, HttpResponse};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use super::{check, not_null, rfc3339, ListQuery, ListResponse};
use crate::actors::config_sync::Entity;
use crate::actors::key_pool::OpenBreakers;
use crate::crypto;
use crate::db::{repo, DbError};
use crate::domain::rules;
use crate::domain::{ids, now, Provider, UpstreamKey, UpstreamKeyState};
use crate::error::ApiError;
use crate::routes::JsonObject;
use crate::state::AppState;
use crate::upstream::{client, probe};

/// `POST /admin/upstream-keys` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUpstreamKey {
    provider: Provider,
    base_url: Option<String>,
    secret: String,
    level: Option<i32>,
    models: Option<Vec<String>>,
    weight: Option<i32>,
    enabled: Option<bool>,
}

/// `PATCH /admin/upstream-keys/{id}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUpstreamKey {
    #[serde(default, deserialize_with = "not_null")]
    provider: Option<Provider>,
    #[serde(default, deserialize_with = "not_null")]
    base_url: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    secret: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    level: Option<i32>,
    #[serde(default, deserialize_with = "not_null")]
    models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "not_null")]
    weight: Option<i32>,
    #[serde(default, deserialize_with = "not_null")]
    enabled: Option<bool>,
}

/// `POST /admin/upstream-keys/discover` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discover {
    provider: Provider,
    base_url: Option<String>,
    level: Option<i32>,
    models: Option<Vec<String>>,
    candidates: Vec<String>,
}

/// An upstream key as the admin API shows it: `secret_hint`, never the secret.
#[derive(Debug, Serialize)]
pub struct UpstreamKeyView {
    id: String,
    object: &'static str,
    provider: Provider,
    base_url: String,
    secret_hint: String,
    level: i32,
    models: Vec<String>,
    weight: i32,
    enabled: bool,
    state: UpstreamKeyState,
    cooldown_until: Option<String>,
    disabled_reason: Option<String>,
    created_at: String,
    updated_at: String,
}

impl UpstreamKeyView {
    /// `k` as an admin sees it. A key whose circuit breaker is open on this replica (after
    /// repeated 5xx, resets or timeouts) shows as cooling down until the breaker lets a probe
    /// through, as a key resting after a 429 does.
    pub fn new(k: &UpstreamKey, breakers: &OpenBreakers) -> Self {
        let now = now();
        let stored = k.state(now);
        let breaker = breakers.open_until(&k.id, now);
        let (state, cooldown_until) = match (stored, breaker) {
            (UpstreamKeyState::Healthy, Some(until)) => {
                (UpstreamKeyState::CoolingDown, Some(until))
            }
            (UpstreamKeyState::CoolingDown, _) => (stored, k.cooldown_until.max(breaker)),
            _ => (stored, None),
        };
        UpstreamKeyView {
            id: k.id.clone(),
            object: "upstream_key",
            provider: k.provider,
            base_url: k.base_url.clone(),
            secret_hint: k.secret_hint.clone(),
            level: k.level,
            models: k.models.clone(),
            weight: k.weight,
            enabled: k.enabled,
            state,
            cooldown_until: cooldown_until.map(rfc3339),
            disabled_reason: k.disabled_reason.clone(),
            created_at: rfc3339(k.created_at),
            updated_at: rfc3339(k.updated_at),
        }
    }
}

const MAX_SECRET_LEN: usize = 4096;
const MAX_CANDIDATES: usize = 100;

fn check_secret(secret: &str) -> Result<&str, ApiError> {
    let secret = secret.trim();
    if secret.is_empty() || secret.len() > MAX_SECRET_LEN || secret.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "secret must be 1 to {MAX_SECRET_LEN} printable characters"
        )));
    }
    Ok(secret)
}

fn check_models(models: &[String]) -> Result<(), ApiError> {
    models
        .iter()
        .try_for_each(|g| check(rules::check_model_glob(g)))
}

fn check_weight(weight: i32) -> Result<(), ApiError> {
    if (1..=1_000_000).contains(&weight) {
        Ok(())
    } else {
        Err(ApiError::invalid("weight must be between 1 and 1000000"))
    }
}

fn base_url_or_default(provider: Provider, base_url: Option<&str>) -> Result<String, ApiError> {
    rules::check_base_url(base_url.unwrap_or(provider.default_base_url()))
        .map_err(ApiError::invalid)
}

/// A new key record with `secret` sealed under the master key.
fn new_key(
    state: &AppState,
    provider: Provider,
    base_url: String,
    secret: &str,
    level: i32,
    models: Vec<String>,
) -> Result<UpstreamKey, ApiError> {
    let id = ids::new_id("upk");
    let at = now();
    Ok(UpstreamKey {
        secret_enc: state
            .master_key
            .encrypt(&id, secret)
            .map_err(ApiError::internal)?,
        secret_hint: crypto::hint(secret),
        id,
        provider,
        base_url,
        level,
        models,
        weight: 1,
        enabled: true,
        cooldown_until: None,
        disabled_at: None,
        disabled_reason: None,
        created_at: at,
        updated_at: at,
    })
}

/// `POST /admin/upstream-keys`.
pub async fn create(
    state: web::Data<AppState>,
    body: JsonObject<CreateUpstreamKey>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let secret = check_secret(&body.secret)?;
    let base_url = base_url_or_default(body.provider, body.base_url.as_deref())?;
    let level = body.level.unwrap_or(1);
    check(rules::check_level(level))?;
    let models = body.models.unwrap_or_default();
    check_models(&models)?;
    let mut key = new_key(&state, body.provider, base_url, secret, level, models)?;
    if let Some(weight) = body.weight {
        check_weight(weight)?;
        key.weight = weight;
    }
    key.enabled = body.enabled.unwrap_or(true);
    repo::upstream_keys::insert(&state.db, &key).await?;
    state.changed(Entity::UpstreamKey, &key.id).await;
    tracing::info!(upstream_key_id = %key.id, provider = key.provider.as_str(), level = key.level, "upstream key added");
    Ok(HttpResponse::Created().json(UpstreamKeyView::new(&key, &state.breakers)))
}

/// `GET /admin/upstream-keys`.
pub async fn list(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let (keys, more) = repo::upstream_keys::list(&state.db, query.page()?).await?;
    let views = keys
        .iter()
        .map(|k| UpstreamKeyView::new(k, &state.breakers))
        .collect();
    Ok(HttpResponse::Ok().json(ListResponse::new(views, more)))
}

/// `GET /admin/upstream-keys/{id}`.
pub async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key = load(&state, &id).await?;
    Ok(HttpResponse::Ok().json(UpstreamKeyView::new(&key, &state.breakers)))
}

/// `PATCH /admin/upstream-keys/{id}`. Enabling a key also clears a disable by the provider.
pub async fn update(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonObject<UpdateUpstreamKey>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let key = super::patch_until_written(|| async {
        let mut key = load(&state, &id).await?;
        let seen = key.updated_at;
        let reset_health = apply_update(&state, &body, &mut key)?;
        key.updated_at = crate::domain::next_stamp(seen);
        let written = repo::upstream_keys::update(&state.db, &key, reset_health, seen).await?;
        Ok(written.then_some(key))
    })
    .await?;
    state.changed(Entity::UpstreamKey, &key.id).await;
    tracing::info!(upstream_key_id = %key.id, "upstream key updated");
    Ok(HttpResponse::Ok().json(UpstreamKeyView::new(&key, &state.breakers)))
}

/// Applies a PATCH body to `key`; says whether the key's health starts afresh (a new secret,
/// or enabled again), which clears its cooldown and any disable.
fn apply_update(
    state: &AppState,
    body: &UpdateUpstreamKey,
    key: &mut UpstreamKey,
) -> Result<bool, ApiError> {
    let mut reset_health = false;
    if let Some(provider) = body.provider.filter(|p| *p != key.provider) {
        // A key moved to another provider keeps a base URL of its own, and trades the old
        // provider's default for the new one's; its health starts afresh.
        if key.base_url == key.provider.default_base_url() {
            key.base_url = provider.default_base_url().to_owned();
        }
        key.provider = provider;
        reset_health = true;
    }
    if let Some(url) = body.base_url.as_deref() {
        key.base_url = base_url_or_default(key.provider, Some(url))?;
    }
    if let Some(secret) = body.secret.as_deref() {
        let secret = check_secret(secret)?;
        key.secret_enc = state
            .master_key
            .encrypt(&key.id, secret)
            .map_err(ApiError::internal)?;
        key.secret_hint = crypto::hint(secret);
        // A new secret deserves a fresh start.
        reset_health = true;
    }
    if let Some(level) = body.level {
        check(rules::check_level(level))?;
        key.level = level;
    }
    if let Some(models) = &body.models {
        check_models(models)?;
        key.models = models.clone();
    }
    if let Some(weight) = body.weight {
        check_weight(weight)?;
        key.weight = weight;
    }
    if let Some(enabled) = body.enabled {
        key.enabled = enabled;
        reset_health |= enabled;
    }
    if reset_health {
        key.disabled_at = None;
        key.disabled_reason = None;
        key.cooldown_until = None;
    }
    Ok(reset_health)
}

/// `DELETE /admin/upstream-keys/{id}`.
pub async fn delete(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    repo::upstream_keys::delete(&state.db, &id)
        .await
        .map_err(|e| not_found_key(e, &id))?;
    state.changed(Entity::UpstreamKey, &id).await;
    tracing::info!(upstream_key_id = %id, "upstream key deleted");
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({"id": *id, "object": "upstream_key", "deleted": true})))
}

#[derive(Serialize)]
struct Rejected {
    hint: String,
    reason: String,
}

/// `POST /admin/upstream-keys/discover`: probes each candidate and adds those the provider
/// accepts, skipping secrets already present for the same provider and base URL.
pub async fn discover(
    state: web::Data<AppState>,
    body: JsonObject<Discover>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let base_url = base_url_or_default(body.provider, body.base_url.as_deref())?;
    let level = body.level.unwrap_or(1);
    check(rules::check_level(level))?;
    let models = body.models.unwrap_or_default();
    check_models(&models)?;
    if body.candidates.is_empty() || body.candidates.len() > MAX_CANDIDATES {
        return Err(ApiError::invalid(format!(
            "candidates must hold 1 to {MAX_CANDIDATES} secrets"
        )));
    }
    let candidates = body
        .candidates
        .iter()
        .map(|c| check_secret(c).map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()?;

    let mut known: Vec<String> = Vec::new();
    for key in repo::upstream_keys::all(&state.db).await? {
        if key.provider == body.provider && key.base_url == base_url {
            match state.master_key.decrypt(&key.id, &key.secret_enc) {
                Ok(secret) => known.push(secret),
                Err(err) => {
                    tracing::warn!(upstream_key_id = %key.id, error = %err, "cannot read stored secret")
                }
            }
        }
    }

    let http = client::build(probe::PROBE_TIMEOUT, probe::PROBE_TIMEOUT);
    let outcomes = join_all(candidates.iter().map(|secret| {
        let http = &http;
        let duplicate = known.iter().any(|k| crypto::constant_time_eq(k, secret));
        let base_url = base_url.as_str();
        async move {
            if duplicate {
                probe::ProbeOutcome::Rejected("already added".into())
            } else {
                probe::probe(http, body.provider, base_url, secret).await
            }
        }
    }))
    .await;

    let mut added = Vec::new();
    let mut rejected = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (secret, outcome) in candidates.iter().zip(outcomes) {
        let outcome = if seen.contains(&secret.as_str()) {
            probe::ProbeOutcome::Rejected("listed twice".into())
        } else {
            outcome
        };
        seen.push(secret);
        match outcome {
            probe::ProbeOutcome::Valid => {
                let key = new_key(
                    &state,
                    body.provider,
                    base_url.clone(),
                    secret,
                    level,
                    models.clone(),
                )?;
                repo::upstream_keys::insert(&state.db, &key).await?;
                state.changed(Entity::UpstreamKey, &key.id).await;
                added.push(key.id);
            }
            probe::ProbeOutcome::Rejected(reason) => rejected.push(Rejected {
                hint: crypto::hint(secret),
                reason,
            }),
        }
    }
    tracing::info!(
        added = added.len(),
        rejected = rejected.len(),
        provider = body.provider.as_str(),
        "upstream key discovery"
    );
    Ok(HttpResponse::Ok().json(serde_json::json!({"added": added, "rejected": rejected})))
}

async fn load(state: &AppState, id: &str) -> Result<UpstreamKey, ApiError> {
    repo::upstream_keys::get(&state.db, id)
        .await
        .map_err(|e| not_found_key(e, id))
}

fn not_found_key(err: DbError, id: &str) -> ApiError {
    match err {
        DbError::NotFound => ApiError::not_found(format!("no upstream key with id `{id}`")),
        other => other.into(),
    }
}
