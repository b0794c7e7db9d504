//! `/admin/users`: users and their rules.

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{check, double_option, not_null, rfc3339, ListQuery, ListResponse};
use crate::actors::config_sync::Entity;
use crate::db::{repo, DbError};
use crate::domain::money::{nanos_to_usd, usd_to_nanos};
use crate::domain::rules::{self, ModelLimit};
use crate::domain::{ids, now, User, UserStatus};
use crate::error::ApiError;
use crate::routes::JsonObject;
use crate::state::AppState;

/// The fields of a user an admin may write. On create only `name` is required; on PATCH every
/// field is optional and the nullable ones accept `null` to clear them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFields {
    #[serde(default, deserialize_with = "not_null")]
    name: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    status: Option<UserStatus>,
    #[serde(default, deserialize_with = "not_null")]
    level: Option<i32>,
    #[serde(default, deserialize_with = "not_null")]
    fallback_levels: Option<Vec<i32>>,
    #[serde(default, deserialize_with = "not_null")]
    ip_allowlist: Option<Vec<String>>,
    #[serde(default, deserialize_with = "not_null")]
    allowed_models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "not_null")]
    allowed_endpoints: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    spend_limit_usd: Option<Option<f64>>,
    #[serde(default, deserialize_with = "double_option")]
    rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    tpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "not_null")]
    model_limits: Option<BTreeMap<String, ModelLimit>>,
}

/// A user as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct UserView {
    id: String,
    object: &'static str,
    name: String,
    status: UserStatus,
    level: i32,
    fallback_levels: Vec<i32>,
    ip_allowlist: Vec<String>,
    allowed_models: Vec<String>,
    allowed_endpoints: Vec<String>,
    spend_limit_usd: Option<f64>,
    spent_usd: f64,
    rpm: Option<i64>,
    tpm: Option<i64>,
    model_limits: BTreeMap<String, ModelLimit>,
    created_at: String,
    updated_at: String,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        UserView {
            id: u.id.clone(),
            object: "user",
            name: u.name.clone(),
            status: u.status,
            level: u.level,
            fallback_levels: u.fallback_levels.clone(),
            ip_allowlist: u.ip_allowlist.iter().map(|n| n.to_string()).collect(),
            allowed_models: u.allowed_models.clone(),
            allowed_endpoints: u.allowed_endpoints.clone(),
            spend_limit_usd: u.spend_limit_nanos.map(nanos_to_usd),
            spent_usd: nanos_to_usd(u.spent_nanos),
            rpm: u.rpm,
            tpm: u.tpm,
            model_limits: u.model_limits.clone(),
            created_at: rfc3339(u.created_at),
            updated_at: rfc3339(u.updated_at),
        }
    }
}

impl UserFields {
    /// Writes the given fields onto `user` and checks the result as a whole.
    fn apply(self, user: &mut User) -> Result<(), ApiError> {
        if let Some(name) = self.name {
            let name = name.trim().to_owned();
            if name.is_empty() || name.len() > 200 || rules::has_control(&name) {
                return Err(ApiError::invalid(
                    "name must be 1 to 200 characters, without control characters",
                ));
            }
            user.name = name;
        }
        if let Some(status) = self.status {
            user.status = status;
        }
        if let Some(level) = self.level {
            check(rules::check_level(level))?;
            user.level = level;
        }
        if let Some(levels) = self.fallback_levels {
            user.fallback_levels = levels;
        }
        check(rules::check_fallback_levels(
            user.level,
            &user.fallback_levels,
        ))?;
        if let Some(cidrs) = self.ip_allowlist {
            user.ip_allowlist = cidrs
                .iter()
                .map(|c| rules::parse_cidr(c))
                .collect::<Result<_, _>>()
                .map_err(ApiError::invalid)?;
        }
        if let Some(globs) = self.allowed_models {
            for g in &globs {
                check(rules::check_model_glob(g))?;
            }
            user.allowed_models = globs;
        }
        if let Some(globs) = self.allowed_endpoints {
            for g in &globs {
                check(rules::check_path_glob(g))?;
            }
            user.allowed_endpoints = globs;
        }
        if let Some(limit) = self.spend_limit_usd {
            user.spend_limit_nanos = match limit {
                None => None,
                Some(usd) => Some(usd_to_nanos(usd).ok_or_else(|| {
                    ApiError::invalid("spend_limit_usd must be a non-negative number")
                })?),
            };
        }
        if let Some(rpm) = self.rpm {
            if let Some(v) = rpm {
                check(rules::check_limit("rpm", v))?;
            }
            user.rpm = rpm;
        }
        if let Some(tpm) = self.tpm {
            if let Some(v) = tpm {
                check(rules::check_limit("tpm", v))?;
            }
            user.tpm = tpm;
        }
        if let Some(limits) = self.model_limits {
            for (glob, limit) in &limits {
                check(rules::check_model_glob(glob))?;
                if let Some(v) = limit.rpm {
                    check(rules::check_limit("model_limits rpm", v))?;
                }
                if let Some(v) = limit.tpm {
                    check(rules::check_limit("model_limits tpm", v))?;
                }
            }
            user.model_limits = limits;
        }
        Ok(())
    }
}

fn name_taken(err: DbError) -> ApiError {
    match err {
        DbError::Conflict(_) => ApiError::conflict("a user with that name already exists"),
        other => other.into(),
    }
}

/// `POST /admin/users`.
pub async fn create(
    state: web::Data<AppState>,
    body: JsonObject<UserFields>,
) -> Result<HttpResponse, ApiError> {
    let fields = body.into_inner();
    if fields.name.is_none() {
        return Err(ApiError::invalid("name is required"));
    }
    let at = now();
    let mut user = User {
        id: ids::new_id("usr"),
        name: String::new(),
        status: UserStatus::Active,
        level: 1,
        fallback_levels: Vec::new(),
        ip_allowlist: Vec::new(),
        allowed_models: Vec::new(),
        allowed_endpoints: Vec::new(),
        spend_limit_nanos: None,
        spent_nanos: 0,
        rpm: None,
        tpm: None,
        model_limits: BTreeMap::new(),
        created_at: at,
        updated_at: at,
    };
    fields.apply(&mut user)?;
    repo::users::insert(&state.db, &user)
        .await
        .map_err(name_taken)?;
    state.created(Entity::User, &user.id).await;
    tracing::info!(user_id = %user.id, "user created");
    Ok(HttpResponse::Created().json(UserView::from(&user)))
}

/// `GET /admin/users`.
pub async fn list(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let (users, more) = repo::users::list(&state.db, query.page()?).await?;
    let views = users.iter().map(UserView::from).collect();
    Ok(HttpResponse::Ok().json(ListResponse::new(views, more)))
}

/// `GET /admin/users/{id}`.
pub async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = load(&state, &id).await?;
    Ok(HttpResponse::Ok().json(UserView::from(&user)))
}

/// `PATCH /admin/users/{id}`.
pub async fn update(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonObject<UserFields>,
) -> Result<HttpResponse, ApiError> {
    let fields = body.into_inner();
    let user = super::patch_until_written(|| async {
        let mut user = load(&state, &id).await?;
        let seen = user.updated_at;
        fields.clone().apply(&mut user)?;
        user.updated_at = crate::domain::next_stamp(seen);
        let written = repo::users::update_rules(&state.db, &user, seen)
            .await
            .map_err(name_taken)?;
        Ok(written.then_some(user))
    })
    .await?;
    state.changed(Entity::User, &user.id).await;
    tracing::info!(user_id = %user.id, "user updated");
    Ok(HttpResponse::Ok().json(UserView::from(&user)))
}

/// `DELETE /admin/users/{id}`: the user, their keys and their own mappings.
pub async fn delete(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let keys = repo::user_keys::list_for_user(&state.db, &id).await?;
    repo::users::delete(&state.db, &id)
        .await
        .map_err(|e| not_found_user(e, &id))?;
    state.changed(Entity::User, &id).await;
    for key in keys {
        state.changed(Entity::UserKey, &key.id).await;
    }
    tracing::info!(user_id = %id, "user deleted");
    Ok(HttpResponse::Ok().json(serde_json::json!({"id": *id, "object": "user", "deleted": true})))
}

/// Loads a user or answers 404.
pub async fn load(state: &AppState, id: &str) -> Result<User, ApiError> {
    repo::users::get(&state.db, id)
        .await
        .map_err(|e| not_found_user(e, id))
}

fn not_found_user(err: DbError, id: &str) -> ApiError {
    match err {
        DbError::NotFound => ApiError::not_found(format!("no user with id `{id}`")),
        other => other.into(),
    }
}
