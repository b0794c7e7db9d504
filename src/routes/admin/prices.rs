//! `/admin/prices`: what each model costs, in USD per million tokens, per image and per second.

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::{rfc3339, ListQuery, ListResponse};
use crate::actors::config_sync::Entity;
use crate::db::repo;
use crate::domain::money::nanos_to_usd;
use crate::domain::{rules, Price};
use crate::error::ApiError;
use crate::metering::prices::PriceInUsd;
use crate::routes::JsonObject;
use crate::state::AppState;

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

/// `PUT /admin/prices/{model}`: sets (or replaces) one model's prices.
pub async fn put(
    state: web::Data<AppState>,
    model: web::Path<String>,
    body: JsonObject<PriceInUsd>,
) -> Result<HttpResponse, ApiError> {
    let model = model.into_inner();
    if model.trim().is_empty() || model.len() > 256 || rules::has_control(&model) {
        return Err(ApiError::invalid(
            "model must be 1 to 256 characters, without control characters",
        ));
    }
    let price = body
        .into_inner()
        .into_price(model)
        .map_err(ApiError::invalid)?;
    let created = repo::prices::upsert(&state.db, &price).await?;
    state.changed(Entity::Price, &price.model).await;
    tracing::info!(model = %price.model, created, "price set");
    // Creating answers 201, as every create does; replacing answers 200.
    let mut answer = if created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(answer.json(PriceView::from(&price)))
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
