//! `GET /v1/models`: the models this caller may use, in OpenAI's list format.

use std::collections::BTreeSet;

use actix_web::{web, HttpResponse};
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
    req: actix_web::HttpRequest,
) -> Result<HttpResponse, ApiError> {
    crate::access::admit_endpoint(&principal, req.path())?;
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
    let data: Vec<_> = names
        .into_iter()
        .filter(|name| !is_glob(name))
        .filter(|name| principal.rules.allows_model(name))
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "switchyard"}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

fn is_glob(name: &str) -> bool {
    name.contains(['*', '?', '[', '{'])
}
