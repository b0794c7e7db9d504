//! `GET /v1/models`: the models this caller may use, in OpenAI's list format.

use std::collections::BTreeSet;

use actix_web::{web, HttpResponse};
use futures_util::future::join_all;
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde_json::json;

use crate::auth::Principal;
use crate::db::repo;
use crate::domain::Provider;
use crate::error::ApiError;
use crate::proxy::{Proxy, Worker};
use crate::routing::catalog::ListedKey;
use crate::state::AppState;

/// `GET /v1/models`: the models the caller may use (see [`usable`]).
pub async fn list(
    principal: Principal,
    state: web::Data<AppState>,
    proxy: web::Data<Proxy>,
    worker: web::Data<Worker>,
    req: actix_web::HttpRequest,
) -> Result<HttpResponse, ApiError> {
    crate::access::admit_endpoint(&principal, req.match_info().as_str())?;
    let data: Vec<_> = usable(&principal, &state, &proxy, &worker)
        .await?
        .into_iter()
        .map(model_object)
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// `GET /v1/models/{model}` (the SDKs' `models.retrieve`): one model of the list, or 404
/// `model_not_found` for a model the caller may not use or no key of its levels serves.
pub async fn retrieve(
    principal: Principal,
    state: web::Data<AppState>,
    proxy: web::Data<Proxy>,
    worker: web::Data<Worker>,
    req: actix_web::HttpRequest,
    model: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    crate::access::admit_endpoint(&principal, req.match_info().as_str())?;
    let model = model.into_inner();
    if usable(&principal, &state, &proxy, &worker)
        .await?
        .contains(&model)
    {
        return Ok(HttpResponse::Ok().json(model_object(model)));
    }
    Err(ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "model_not_found",
        "no such model for this key",
    ))
}

fn model_object(id: String) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "switchyard"})
}

/// Named models come from the upstream keys that may serve the caller (its levels, in service):
/// a key's `models` list, or for an OpenAI-compatible key without one the models its provider
/// lists (`GET /models`, fetched and kept a while), or failing that every priced model, and for
/// an Anthropic or Gemini key without one the priced models of its provider's families (which
/// chat completions reach translated); from the
/// price table where a key's globs match; and from mappings whose target one of those keys
/// serves (globs name no single model, so they are left out). All filtered by the caller's
/// `allowed_models`.
async fn usable(
    principal: &Principal,
    state: &AppState,
    proxy: &Proxy,
    worker: &Worker,
) -> Result<BTreeSet<String>, ApiError> {
    let mut names = BTreeSet::new();
    let user = &principal.user;
    let keys: Vec<_> = repo::upstream_keys::all(&state.db)
        .await?
        .into_iter()
        .filter(|k| k.enabled && k.disabled_at.is_none())
        .filter(|k| k.level == user.level || user.fallback_levels.contains(&k.level))
        .collect();
    let unlisted = |k: &&crate::domain::UpstreamKey| k.models.is_empty();
    let openai = |k: &&crate::domain::UpstreamKey| k.provider == Provider::OpenAi;
    // The providers whose keys without a list serve their own families of models.
    let families: Vec<Provider> = keys
        .iter()
        .filter(|k| unlisted(k) && !openai(k))
        .map(|k| k.provider)
        .collect();
    let of_families = |model: &str| families.iter().any(|p| p.makes(model));
    let listed = join_all(keys.iter().filter(|k| unlisted(k) && openai(k)).map(|key| {
        let (catalog, client, master_key) = (&proxy.catalog, &worker.client, &state.master_key);
        let listed = ListedKey {
            id: &key.id,
            version: key.updated_at,
            base_url: &key.base_url,
            secret: || master_key.decrypt(&key.id, &key.secret_enc).ok(),
        };
        catalog.models_of(client, listed)
    }))
    .await;
    // A key without a list whose provider did not list its models may serve any priced one.
    let any_priced = listed.iter().any(Option::is_none);
    names.extend(listed.into_iter().flatten().flatten());
    let servable: Vec<GlobSet> = keys
        .iter()
        .filter(|k| !k.models.is_empty())
        .map(|k| globs(&k.models))
        .collect();
    for price in repo::prices::all(&state.db).await? {
        // `model:quality:size` entries price variants of one image model.
        let model = price.model;
        let served =
            any_priced || of_families(&model) || servable.iter().any(|g| g.is_match(&model));
        if !model.contains(':') && served {
            names.insert(model);
        }
    }
    // A key without a `models` list takes any model in routing.
    let serves_any = keys.iter().any(|k| unlisted(&k) && openai(&k));
    for key in keys {
        names.extend(key.models);
    }
    // A mapped name is listed when a key that may serve the caller serves what routing maps it
    // to for this caller (the caller's own mapping wins, an exact name over a glob).
    let serves = |model: &str| {
        serves_any
            || names.contains(model)
            || of_families(model)
            || servable.iter().any(|g| g.is_match(model))
    };
    let mut reachable = Vec::new();
    for mapping in repo::mappings::all(&state.db).await? {
        let visible = mapping
            .user_id
            .as_deref()
            .is_none_or(|owner| owner == user.id);
        if !visible || is_glob(&mapping.from) {
            continue;
        }
        if let Some(to) = proxy.mapper.resolve(&user.id, &mapping.from) {
            if serves(&to) {
                reachable.push((mapping.from, to.to_string()));
            }
        }
    }
    for (from, to) in reachable {
        names.insert(from);
        names.insert(to);
    }
    Ok(names
        .into_iter()
        .filter(|name| !is_glob(name))
        .filter(|name| principal.rules.allows_model(name))
        .collect())
}

/// A key's model globs (an invalid one, refused when the key was saved, matches nothing).
fn globs(patterns: &[String]) -> GlobSet {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        if let Ok(glob) = Glob::new(pattern) {
            set.add(glob);
        }
    }
    set.build().unwrap_or_else(|_| GlobSet::empty())
}

fn is_glob(name: &str) -> bool {
    name.contains(['*', '?', '[', '{'])
}
