//! Liveness, readiness and metrics.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

/// Alive: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metering.metrics.render())
}

/// Ready: migrations ran at start-up and the database answers now. Redis is reported, not
/// required: without it limits are held in process and configuration changes are found by
/// the stored version.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let redis = json!({
        "status": state.limiter.redis_state().as_str(),
        "config_channel": match (state.bus.is_shared(), state.bus.is_listening()) {
            (false, _) => "disabled",
            (true, true) => "subscribed",
            (true, false) => "unavailable",
        },
    });
    match state.db.ping().await {
        Ok(()) => HttpResponse::Ok().json(json!({
            "status": "ready",
            "database": {"backend": state.db.backend_name(), "status": "ok", "migrated": true},
            "redis": redis,
        })),
        Err(err) => {
            tracing::warn!(error = %err, "readiness check: database unreachable");
            HttpResponse::ServiceUnavailable().json(json!({
                "status": "unavailable",
                "database": {"backend": state.db.backend_name(), "status": "unreachable"},
                "redis": redis,
            }))
        }
    }
}
