//! `/admin/users/{id}/keys` and `/admin/keys/{id}`: users' API keys.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{optional_json, parse_time, rfc3339, users, ListQuery, ListResponse};
use crate::actors::config_sync::Entity;
use crate::crypto;
use crate::db::{repo, DbError};
use crate::domain::{api_key, now, rules, UserKey};
use crate::error::ApiError;
use crate::state::AppState;

/// `POST /admin/users/{id}/keys` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: Option<String>,
    expires_at: Option<String>,
}

/// A key as the admin API shows it: never the secret, only a hint.
#[derive(Debug, Serialize)]
pub struct KeyView {
    id: String,
    object: &'static str,
    user_id: String,
    name: Option<String>,
    hint: String,
    status: &'static str,
    created_at: String,
    expires_at: Option<String>,
    revoked_at: Option<String>,
}

impl From<&UserKey> for KeyView {
    fn from(k: &UserKey) -> Self {
        let status = if k.revoked_at.is_some() {
            "revoked"
        } else if k.expires_at.is_some_and(|t| t <= now()) {
            "expired"
        } else {
            "active"
        };
        KeyView {
            id: k.id.clone(),
            object: "user_key",
            user_id: k.user_id.clone(),
            name: k.name.clone(),
            hint: k.key_hint.clone(),
            status,
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            revoked_at: k.revoked_at.map(rfc3339),
        }
    }
}

/// The creation answer: the record plus the key itself, shown this once.
#[derive(Serialize)]
struct CreatedKey {
    #[serde(flatten)]
    view: KeyView,
    key: String,
}

/// `POST /admin/users/{id}/keys`.
pub async fn create(
    state: web::Data<AppState>,
    user_id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body: CreateKey = optional_json(&body)?;
    let user = users::load(&state, &user_id).await?;
    let created_at = now();
    let expires_at = body
        .expires_at
        .as_deref()
        .map(|t| parse_time("expires_at", t))
        .transpose()?;
    if expires_at.is_some_and(|t| t <= created_at) {
        return Err(ApiError::invalid("expires_at must be in the future"));
    }
    if body
        .name
        .as_ref()
        .is_some_and(|n| n.len() > 200 || rules::has_control(n))
    {
        return Err(ApiError::invalid(
            "name must be at most 200 characters, without control characters",
        ));
    }
    let generated = api_key::generate().map_err(ApiError::internal)?;
    let secret = generated.secret.clone();
    let key_hash = web::block(move || crypto::hash_secret(&secret))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let key = UserKey {
        id: generated.record_id.clone(),
        user_id: user.id.clone(),
        name: body.name,
        key_hash,
        key_hint: generated.hint.clone(),
        created_at,
        expires_at,
        revoked_at: None,
    };
    repo::user_keys::insert(&state.db, &key).await?;
    state.created(Entity::UserKey, &key.id).await;
    tracing::info!(user_id = %user.id, key_id = %key.id, "user key created");
    Ok(HttpResponse::Created().json(CreatedKey {
        view: KeyView::from(&key),
        key: generated.full,
    }))
}

/// `GET /admin/users/{id}/keys`.
pub async fn list(
    state: web::Data<AppState>,
    user_id: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let page = query.page()?;
    users::load(&state, &user_id).await?;
    let keys = repo::user_keys::list_for_user(&state.db, &user_id).await?;
    let total = keys.len();
    let start = (page.offset as usize).min(total);
    let end = start.saturating_add(page.limit as usize).min(total);
    let views = keys[start..end].iter().map(KeyView::from).collect();
    Ok(HttpResponse::Ok().json(ListResponse::new(views, end < total)))
}

/// `DELETE /admin/keys/{id}`: revokes the key; it is refused from the next call on.
pub async fn revoke(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key = repo::user_keys::revoke(&state.db, &id, now())
        .await
        .map_err(|e| match e {
            DbError::NotFound => ApiError::not_found(format!("no key with id `{id}`")),
            other => other.into(),
        })?;
    state.changed(Entity::UserKey, &key.id).await;
    tracing::info!(key_id = %key.id, "user key revoked");
    Ok(HttpResponse::Ok().json(KeyView::from(&key)))
}
