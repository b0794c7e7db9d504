//! `/admin/model-mappings`: rewrites of model names, system-wide or for one user.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{check, rfc3339, users, ListQuery, ListResponse};
use crate::actors::config_sync::Entity;
use crate::db::{repo, DbError};
use crate::domain::{ids, now, rules, ModelMapping};
use crate::error::ApiError;
use crate::routes::JsonObject;
use crate::state::AppState;

/// `POST /admin/model-mappings` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMapping {
    from: String,
    to: String,
    user_id: Option<String>,
}

/// A mapping as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct MappingView {
    id: String,
    object: &'static str,
    from: String,
    to: String,
    user_id: Option<String>,
    created_at: String,
}

impl From<&ModelMapping> for MappingView {
    fn from(m: &ModelMapping) -> Self {
        MappingView {
            id: m.id.clone(),
            object: "model_mapping",
            from: m.from.clone(),
            to: m.to.clone(),
            user_id: m.user_id.clone(),
            created_at: rfc3339(m.created_at),
        }
    }
}

/// `POST /admin/model-mappings`.
pub async fn create(
    state: web::Data<AppState>,
    body: JsonObject<CreateMapping>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    // Trimmed as `to` is: a name asked for never has surrounding spaces to match.
    let from = body.from.trim();
    check(rules::check_model_glob(from))?;
    let to = body.to.trim();
    if to.is_empty()
        || to.len() > 256
        || to.contains(['*', '?', '[', '{'])
        || rules::has_control(to)
    {
        return Err(ApiError::invalid(
            "to must be a model name (1 to 256 characters, no glob or control characters)",
        ));
    }
    if let Some(user_id) = body.user_id.as_deref() {
        users::load(&state, user_id).await?;
    }
    let mapping = ModelMapping {
        id: ids::new_id("map"),
        from: from.to_owned(),
        to: to.to_owned(),
        user_id: body.user_id,
        created_at: now(),
    };
    repo::mappings::insert(&state.db, &mapping)
        .await
        .map_err(|err| match err {
            DbError::Conflict(_) => ApiError::conflict(format!(
                "{} already maps {:?}: delete that mapping first",
                match &mapping.user_id {
                    Some(_) => "this user",
                    None => "a system-wide mapping",
                },
                mapping.from
            )),
            other => other.into(),
        })?;
    state.changed(Entity::ModelMapping, &mapping.id).await;
    tracing::info!(mapping_id = %mapping.id, "model mapping created");
    Ok(HttpResponse::Created().json(MappingView::from(&mapping)))
}

/// `GET /admin/model-mappings`.
pub async fn list(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let (mappings, more) = repo::mappings::list(&state.db, query.page()?).await?;
    let views = mappings.iter().map(MappingView::from).collect();
    Ok(HttpResponse::Ok().json(ListResponse::new(views, more)))
}

/// `DELETE /admin/model-mappings/{id}`.
pub async fn delete(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    repo::mappings::delete(&state.db, &id)
        .await
        .map_err(|e| match e {
            DbError::NotFound => ApiError::not_found(format!("no model mapping with id `{id}`")),
            other => other.into(),
        })?;
    state.changed(Entity::ModelMapping, &id).await;
    tracing::info!(mapping_id = %id, "model mapping deleted");
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({"id": *id, "object": "model_mapping", "deleted": true})))
}
