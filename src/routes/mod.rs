//! HTTP routes: operations, the data plane and the admin API.

pub mod admin;
pub mod health;
pub mod models;

use actix_web::dev::ServiceResponse;
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, ErrorHandlerResponse};
use actix_web::{web, HttpRequest, ResponseError};

use crate::error::ApiError;
use crate::proxy;

/// Registers every route on `cfg`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    // HEAD wherever GET is (probes use it; actix leaves the body out).
    cfg.service(
        web::resource("/healthz")
            .get(health::healthz)
            .head(health::healthz),
    )
    .service(
        web::resource("/readyz")
            .get(health::readyz)
            .head(health::readyz),
    )
    .service(
        web::resource("/metrics")
            .get(health::metrics)
            .head(health::metrics),
    )
    .service(
        web::resource("/v1/models")
            .get(models::list)
            .head(models::list),
    )
    .service(web::resource("/v1/chat/completions").post(proxy::forward_json))
    .service(web::resource("/v1/completions").post(proxy::forward_json))
    .service(web::resource("/v1/embeddings").post(proxy::forward_json))
    .service(web::resource("/v1/responses").post(proxy::forward_json))
    .service(web::resource("/v1/images/generations").post(proxy::forward_json))
    .service(web::resource("/v1/audio/speech").post(proxy::forward_json))
    .service(web::resource("/v1/audio/transcriptions").post(proxy::forward_multipart))
    .service(web::resource("/v1/audio/translations").post(proxy::forward_multipart))
    .service(
        web::resource("/v1/messages")
            .wrap(from_fn(proxy::dialect::native_errors))
            .post(proxy::forward_messages),
    )
    // After the calls: its pattern is a regex, which every request tried before it would run
    // (3,000 instructions a call).
    .service(
        web::resource("/v1/models/{model:.+}")
            .get(models::retrieve)
            .head(models::retrieve),
    )
    .service(
        web::resource("/v1beta/models/{target}")
            .wrap(from_fn(proxy::dialect::native_errors))
            .post(proxy::forward_gemini),
    )
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
        JsonPayloadError::Deserialize(e) => ApiError::invalid(describe_json_error(e)),
        other => ApiError::invalid(format!("invalid request body: {other}")),
    };
    api.into()
}

/// A JSON request body that must be an object. serde takes an array for a struct too, its
/// items read as the fields in order (`["alice","suspended",3]` would make a user): an admin
/// body is refused unless it names its fields.
pub struct JsonObject<T>(pub T);

impl<T> JsonObject<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T: serde::de::DeserializeOwned + 'static> actix_web::FromRequest for JsonObject<T> {
    type Error = actix_web::Error;
    type Future = futures_util::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        // Content type, size limit and syntax errors as every JSON body has them.
        let body = web::Json::<serde_json::Value>::from_request(req, payload);
        Box::pin(async move {
            let web::Json(value) = body.await?;
            if !value.is_object() {
                return Err(ApiError::invalid("request body must be a JSON object").into());
            }
            T::deserialize(value)
                .map(JsonObject)
                .map_err(|e| ApiError::invalid(describe_json_error(&e)).into())
        })
    }
}

/// A JSON error for the client, without the values it quotes: serde repeats a mistyped string
/// (`invalid type: string "..."`), and that string may be a secret put in the wrong field.
/// Field and variant names the API defines are kept, as they tell the caller what to fix.
pub fn describe_json_error(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let redacted = match err.classify() {
        serde_json::error::Category::Data => redact_quoted(&text),
        _ => text,
    };
    format!("invalid JSON body: {redacted}")
}

fn redact_quoted(text: &str) -> String {
    // `unknown variant `x`, expected one of ...`: the first backticked value is the caller's.
    if let Some(rest) = text.strip_prefix("unknown variant `") {
        if let Some(end) = rest.find('`') {
            return format!(
                "unknown variant, expected{}",
                rest[end + 1..].trim_start_matches(',')
            );
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut in_quotes = false;
    for c in text.chars() {
        if c == '"' {
            if !in_quotes {
                out.push_str("\"...\"");
            }
            in_quotes = !in_quotes;
        } else if !in_quotes {
            out.push(c);
        }
    }
    out
}

/// Malformed query strings become 400.
pub fn query_error(err: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    let detail = match &err {
        QueryPayloadError::Deserialize(e) => redact_quoted(&e.to_string()),
        _ => "malformed query string".to_owned(),
    };
    ApiError::invalid(format!("invalid query string: {detail}")).into()
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
    // actix names the methods a path takes on its 405: kept on ours.
    let allow = res.headers().get(actix_web::http::header::ALLOW).cloned();
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
    let mut response = error.error_response();
    if let Some(allow) = allow {
        response
            .headers_mut()
            .insert(actix_web::http::header::ALLOW, allow);
    }
    let res = ServiceResponse::new(req, response).map_into_right_body();
    Ok(ErrorHandlerResponse::Response(res))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_for(json: &str) -> String {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body {
            weight: Option<i32>,
            provider: Option<crate::domain::Provider>,
        }
        describe_json_error(&serde_json::from_str::<Body>(json).unwrap_err())
    }

    #[test]
    fn json_errors_do_not_repeat_the_callers_values() {
        let wrong_type = error_for(r#"{"weight": "sk-secret-value"}"#);
        assert!(!wrong_type.contains("sk-secret-value"), "{wrong_type}");
        assert!(wrong_type.contains("expected i32"), "{wrong_type}");
        let variant = error_for(r#"{"provider": "sk-secret-value"}"#);
        assert!(!variant.contains("sk-secret-value"), "{variant}");
        assert!(variant.contains("openai"), "{variant}");
        let field = error_for(r#"{"wieght": 1}"#);
        assert!(field.contains("wieght"), "field names are kept: {field}");
    }
}
