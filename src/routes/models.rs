//! `GET /v1/models`: the models this caller may use, in OpenAI's list format.

use std::collections::BTreeSet;

use actix_web::{web, HttpResponse};
use globset::Glob;
use serde_json::json;

use crate::auth::Principal;
use crate::db::repo;
use crate::error::ApiError;
use crate::state::AppState;

/// Named models come from the price table, mappings and upstream keys' model lists (globs name
/// no single model, so they are left out), filtered by the caller's `allowed_models`.
pub async fn list(
    principal: Principal,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut names = BTreeSet::new();
    names.extend(
        repo::prices::all(&state.db)
            .await?
            .into_iter()
            .map(|p| p.model),
    );
    for mapping in repo::mappings::all(&state.db).await? {
        if mapping.user_id.is_none() || mapping.user_id.as_deref() == Some(&principal.user.id) {
            names.insert(mapping.from);
            names.insert(mapping.to);
        }
    }
    for key in repo::upstream_keys::all(&state.db).await? {
        names.extend(key.models);
    }
    let allowed: Vec<_> = principal
        .user
        .allowed_models
        .iter()
        .filter_map(|g| Glob::new(g).ok().map(|g| g.compile_matcher()))
        .collect();
    let data: Vec<_> = names
        .into_iter()
        .filter(|name| !is_glob(name))
        .filter(|name| allowed.is_empty() || allowed.iter().any(|m| m.is_match(name)))
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "switchyard"}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

fn is_glob(name: &str) -> bool {
    name.contains(['*', '?', '[', '{'])
}
