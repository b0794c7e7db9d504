//! The API dialects the data plane speaks: OpenAI's (every OpenAI route), Anthropic's Messages
//! API (`/v1/messages`) and Gemini's (`/v1beta/models/{model}:generateContent`). A call in one
//! reaches keys of its own provider, and its errors, Switchyard's own included, come in its
//! provider's shape, so that the provider's SDK reads them as it reads the provider's.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderValue, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use serde_json::json;

use crate::domain::Provider;
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Dialect {
    /// The provider whose keys serve calls in this dialect.
    pub fn provider(self) -> Provider {
        match self {
            Dialect::OpenAi => Provider::OpenAi,
            Dialect::Anthropic => Provider::Anthropic,
            Dialect::Gemini => Provider::Gemini,
        }
    }

    /// The dialect of a routed data-plane path.
    pub fn of_path(path: &str) -> Dialect {
        if path == "/v1/messages" {
            Dialect::Anthropic
        } else if path.starts_with("/v1beta/") {
            Dialect::Gemini
        } else {
            Dialect::OpenAi
        }
    }

    /// An error's body in this dialect's shape; Switchyard's own code rides along (Anthropic:
    /// `error.code`; Gemini: an `ErrorInfo` detail's `reason`, as Google's APIs carry theirs).
    pub fn error_body(self, status: StatusCode, code: &str, message: &str) -> Bytes {
        let body = match self {
            Dialect::OpenAi => return Bytes::new(),
            Dialect::Anthropic => json!({
                "type": "error",
                "error": {"type": anthropic_type(status), "message": message, "code": code},
            }),
            Dialect::Gemini => json!({
                "error": {
                    "code": status.as_u16(),
                    "message": message,
                    "status": gemini_status(status),
                    "details": [{
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": code.to_ascii_uppercase(),
                        "domain": "switchyard",
                    }],
                },
            }),
        };
        Bytes::from(body.to_string())
    }

    /// The event that ends a stream the upstream broke off (`timed_out`: went silent), after
    /// whole lines only (see `relay`), so the blank line it starts with never glues it to
    /// half an event.
    pub fn stream_error_event(self, timed_out: bool) -> &'static [u8] {
        match (self, timed_out) {
            (Dialect::OpenAi, false) => b"\ndata: {\"error\":{\"message\":\"the upstream stream was interrupted\",\"type\":\"api_error\",\"code\":\"upstream_error\"}}\n\n",
            (Dialect::OpenAi, true) => b"\ndata: {\"error\":{\"message\":\"the upstream stream went silent\",\"type\":\"api_error\",\"code\":\"upstream_timeout\"}}\n\n",
            // Anthropic's SDKs raise on an `error` event, as the API sends one mid-stream.
            (Dialect::Anthropic, false) => b"\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"the upstream stream was interrupted\",\"code\":\"upstream_error\"}}\n\n",
            (Dialect::Anthropic, true) => b"\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"timeout_error\",\"message\":\"the upstream stream went silent\",\"code\":\"upstream_timeout\"}}\n\n",
            (Dialect::Gemini, false) => b"\ndata: {\"error\":{\"code\":502,\"message\":\"the upstream stream was interrupted\",\"status\":\"UNAVAILABLE\"}}\n\n",
            (Dialect::Gemini, true) => b"\ndata: {\"error\":{\"code\":504,\"message\":\"the upstream stream went silent\",\"status\":\"DEADLINE_EXCEEDED\"}}\n\n",
        }
    }
}

/// Anthropic's `error.type` for a status.
fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Google's canonical status name for an HTTP status.
fn gemini_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "UNAUTHENTICATED",
        402 => "FAILED_PRECONDITION",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        501 => "UNIMPLEMENTED",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        400..=499 => "INVALID_ARGUMENT",
        _ => "INTERNAL",
    }
}

/// Middleware of the Anthropic and Gemini routes: an error response of Switchyard's own (from
/// authentication, the access gate, rate limits, failover, or actix refusing the body) gets
/// the route's provider shape, keeping its status and headers (`Retry-After`, rate limits).
/// Answers the provider sent pass untouched.
pub async fn native_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody, Bytes>>, actix_web::Error> {
    let dialect = Dialect::of_path(req.match_info().as_str());
    let res = next.call(req).await?;
    let status = res.status();
    // actix answers a wrong method with a bare 405 of its own, not an error.
    let error = res.response().error();
    if error.is_none() && status != StatusCode::METHOD_NOT_ALLOWED {
        return Ok(res.map_into_left_body());
    }
    let body = match error.and_then(|e| e.as_error::<ApiError>()) {
        Some(api) => dialect.error_body(status, api.code(), api.message()),
        None => {
            let code = match status.as_u16() {
                405 => "method_not_allowed",
                _ => "invalid_request",
            };
            let reason = status.canonical_reason().unwrap_or("request refused");
            dialect.error_body(status, code, reason)
        }
    };
    if body.is_empty() {
        return Ok(res.map_into_left_body());
    }
    Ok(res.map_body(|head, _| {
        head.headers
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        EitherBody::right(body)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn errors_take_each_providers_shape() {
        let status = StatusCode::TOO_MANY_REQUESTS;
        let anthropic: Value = serde_json::from_slice(&Dialect::Anthropic.error_body(
            status,
            "rate_limit_exceeded",
            "slow down",
        ))
        .unwrap();
        assert_eq!(anthropic["type"], "error");
        assert_eq!(anthropic["error"]["type"], "rate_limit_error");
        assert_eq!(anthropic["error"]["code"], "rate_limit_exceeded");
        let gemini: Value = serde_json::from_slice(&Dialect::Gemini.error_body(
            status,
            "rate_limit_exceeded",
            "slow down",
        ))
        .unwrap();
        assert_eq!(gemini["error"]["code"], 429);
        assert_eq!(gemini["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(
            gemini["error"]["details"][0]["reason"],
            "RATE_LIMIT_EXCEEDED"
        );
        for timed_out in [false, true] {
            for dialect in [Dialect::OpenAi, Dialect::Anthropic, Dialect::Gemini] {
                let event = std::str::from_utf8(dialect.stream_error_event(timed_out)).unwrap();
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                serde_json::from_str::<Value>(data).unwrap();
            }
        }
    }

    #[test]
    fn paths_pick_their_dialect() {
        assert_eq!(Dialect::of_path("/v1/messages"), Dialect::Anthropic);
        assert_eq!(
            Dialect::of_path("/v1beta/models/gemini-2.0-flash:generateContent"),
            Dialect::Gemini
        );
        assert_eq!(Dialect::of_path("/v1/chat/completions"), Dialect::OpenAi);
    }
}
