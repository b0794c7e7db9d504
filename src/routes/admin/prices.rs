//! `/admin/prices`: what each model costs, in USD per million tokens, per image and per second.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{rfc3339, ListQuery, ListResponse};
use crate::actors::config_sync::Entity;
use crate::db::repo;
use crate::domain::money::{nanos_to_usd, usd_to_nanos};
use crate::domain::{now, Price};
use crate::error::ApiError;
use crate::state::AppState;

/// `PUT /admin/prices/{model}` body, in USD.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutPrice {
    input_per_mtok: f64,
    output_per_mtok: f64,
    cached_input_per_mtok: Option<f64>,
    reasoning_per_mtok: Option<f64>,
    per_image: Option<f64>,
    per_audio_second: Option<f64>,
}

/// A price as the admin API shows it, in USD.
#[derive(Debug, Serialize)]
pub struct PriceView {
    model: String,
    object: &'static str,
    input_per_mtok: f64,
    output_per_mtok: f64,
    cached_input_per_mtok: Option<f64>,
    reasoning_per_mtok: Option<f64>,
    per_image: Option<f64>,
    per_audio_second: Option<f64>,
    updated_at: String,
}

impl From<&Price> for PriceView {
    fn from(p: &Price) -> Self {
        PriceView {
            model: p.model.clone(),
            object: "price",
            input_per_mtok: nanos_to_usd(p.input_per_mtok_nanos),
            output_per_mtok: nanos_to_usd(p.output_per_mtok_nanos),
            cached_input_per_mtok: p.cached_input_per_mtok_nanos.map(nanos_to_usd),
            reasoning_per_mtok: p.reasoning_per_mtok_nanos.map(nanos_to_usd),
            per_image: p.per_image_nanos.map(nanos_to_usd),
            per_audio_second: p.per_audio_second_nanos.map(nanos_to_usd),
            updated_at: rfc3339(p.updated_at),
        }
    }
}

fn nanos(field: &str, usd: f64) -> Result<i64, ApiError> {
    usd_to_nanos(usd)
        .ok_or_else(|| ApiError::invalid(format!("{field} must be a non-negative number")))
}

fn optional_nanos(field: &str, usd: Option<f64>) -> Result<Option<i64>, ApiError> {
    usd.map(|v| nanos(field, v)).transpose()
}

/// `PUT /admin/prices/{model}`: sets (or replaces) one model's prices.
pub async fn put(
    state: web::Data<AppState>,
    model: web::Path<String>,
    body: web::Json<PutPrice>,
) -> Result<HttpResponse, ApiError> {
    let model = model.into_inner();
    if model.trim().is_empty() || model.len() > 256 {
        return Err(ApiError::invalid("model must be 1 to 256 characters"));
    }
    let body = body.into_inner();
    let price = Price {
        input_per_mtok_nanos: nanos("input_per_mtok", body.input_per_mtok)?,
        output_per_mtok_nanos: nanos("output_per_mtok", body.output_per_mtok)?,
        cached_input_per_mtok_nanos: optional_nanos(
            "cached_input_per_mtok",
            body.cached_input_per_mtok,
        )?,
        reasoning_per_mtok_nanos: optional_nanos("reasoning_per_mtok", body.reasoning_per_mtok)?,
        per_image_nanos: optional_nanos("per_image", body.per_image)?,
        per_audio_second_nanos: optional_nanos("per_audio_second", body.per_audio_second)?,
        model,
        updated_at: now(),
    };
    repo::prices::upsert(&state.db, &price).await?;
    state.changed(Entity::Price, &price.model).await;
    tracing::info!(model = %price.model, "price set");
    Ok(HttpResponse::Ok().json(PriceView::from(&price)))
}

/// `GET /admin/prices`.
pub async fn list(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let (prices, more) = repo::prices::list(&state.db, query.page()?).await?;
    let views = prices.iter().map(PriceView::from).collect();
    Ok(HttpResponse::Ok().json(ListResponse::new(views, more)))
}
