//! HTTP routes: operations, the data plane and the admin API.

pub mod admin;
pub mod health;
pub mod models;

use actix_web::dev::ServiceResponse;
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{web, HttpRequest, ResponseError};

use crate::error::ApiError;
use crate::proxy;

/// Registers every route on `cfg`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/healthz").get(health::healthz))
        .service(web::resource("/readyz").get(health::readyz))
        .service(web::resource("/v1/models").get(models::list))
        .service(web::resource("/v1/chat/completions").post(proxy::forward_json))
        .service(web::resource("/v1/completions").post(proxy::forward_json))
        .service(web::resource("/v1/embeddings").post(proxy::forward_json))
        .service(web::resource("/v1/responses").post(proxy::forward_json))
        .service(web::resource("/v1/images/generations").post(proxy::forward_json))
        .service(web::resource("/v1/audio/speech").post(proxy::forward_json))
        .service(admin::scope());
}

/// JSON bodies that fail to parse become 400 (413 when too large) in the contract's shape.
pub fn json_error(err: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let api = match &err {
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            format!("request body is larger than the limit of {limit} bytes"),
        ),
        JsonPayloadError::ContentType => {
            ApiError::invalid("request body must be JSON with Content-Type: application/json")
        }
        JsonPayloadError::Deserialize(e) => ApiError::invalid(format!("invalid JSON body: {e}")),
        other => ApiError::invalid(format!("invalid request body: {other}")),
    };
    api.into()
}

/// Malformed query strings become 400.
pub fn query_error(err: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::invalid(format!("invalid query string: {err}")).into()
}

/// Malformed path parameters become 400.
pub fn path_error(err: PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::invalid(format!("invalid path: {err}")).into()
}

/// Unknown routes: 404 in the contract's shape.
pub async fn not_found(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// Error responses that actix renders itself (405 for a known path with the wrong method, 413
/// from a body limit) get the contract's JSON shape; JSON errors of our own pass unchanged.
pub fn json_error_page<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let (req, _) = res.into_parts();
    let error = if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "invalid_request",
            "request body is larger than the limit",
        )
    } else {
        let message = format!("{} is not allowed on {}", req.method(), req.path());
        ApiError::new(status, "method_not_allowed", message)
    };
    let res = ServiceResponse::new(req, error.error_response()).map_into_right_body();
    Ok(ErrorHandlerResponse::Response(res))
}
