//! The data plane: OpenAI-compatible calls forwarded to a leased upstream key, with retry and
//! failover, streamed back as they arrive.

pub mod failover;
pub mod multipart;
pub mod relay;
pub mod usage;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::{Map, Value};
use tracing::field::display;
use tracing_actix_web::RootSpan;

use actix::Addr;

use crate::access;
use crate::actors::rate_limiter::{RateLimiterActor, Settle};
use crate::auth::Principal;
use crate::config::UpstreamSettings;
use crate::error::ApiError;
use crate::limits::redis_store::RedisLink;
use crate::limits::{estimate, Plan, RateLimiter};
use crate::routing::pools::WorkerPools;
use crate::routing::{KeyPools, ModelMapper};
use crate::telemetry;

/// What the data plane shares across workers.
pub struct Proxy {
    pub pools: Arc<KeyPools>,
    pub mapper: Arc<ModelMapper>,
    pub settings: UpstreamSettings,
    pub limiter: Arc<RateLimiter>,
}

/// What each worker thread has of its own: its view of the key pools, its HTTP client (awc
/// clients are not `Send`), its Redis connection and its settlement actor, all reached without
/// leaving the thread.
pub struct Worker {
    pub pools: Arc<WorkerPools>,
    pub client: awc::Client,
    pub redis: Rc<RedisLink>,
    pub settler: Addr<RateLimiterActor>,
}

/// Bodies larger than this are tokenised on the blocking pool rather than on a worker thread
/// (as is any body whose tokenizer is not loaded yet).
const INLINE_ESTIMATE_BYTES: usize = 32 * 1024;

/// One client call, parsed: what was asked, where it goes, what to send.
pub struct Call {
    /// The upstream path after the provider's base URL, e.g. `/chat/completions`.
    pub path: String,
    /// The model the client asked for (what it will see in answers).
    pub model: String,
    /// The model sent upstream when a mapping applies.
    pub mapped: Option<Arc<str>>,
    /// The body to send upstream.
    pub body: Bytes,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The request's content type, passed on.
    pub content_type: Option<String>,
}

impl Call {
    /// Whether the body is JSON (not a multipart form).
    pub fn is_json(&self) -> bool {
        self.content_type.as_deref() == Some("application/json")
    }

    /// The model to ask the upstream for.
    pub fn upstream_model(&self) -> &str {
        self.mapped.as_deref().unwrap_or(&self.model)
    }
}

/// Reads a JSON call body: an object with a string `model`. When a mapping applies the body is
/// re-serialised with the mapped model; otherwise it goes upstream byte for byte.
fn parse_json_call(
    req: &HttpRequest,
    body: Bytes,
    principal: &Principal,
    mapper: &ModelMapper,
) -> Result<Call, ApiError> {
    // Only `model` and `stream` are read: the rest is skipped without being built, and the
    // body goes upstream as it came unless a mapping changes the model.
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow, default)]
        model: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        stream: Option<bool>,
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid("request body must be a JSON object"));
    }
    let peek: Peek = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(crate::routes::describe_json_error(&e)))?;
    let model = match peek.model {
        Some(m) if !m.is_empty() => m.into_owned(),
        _ => return Err(ApiError::invalid("request body must have a string `model`")),
    };
    let stream = peek.stream.unwrap_or(false);
    let mapped = mapper.resolve(&principal.user.id, &model);
    let body = match &mapped {
        Some(to) => {
            let mut object: Map<String, Value> =
                serde_json::from_slice(&body).map_err(ApiError::internal)?;
            object.insert("model".into(), Value::String(to.to_string()));
            Bytes::from(serde_json::to_vec(&object).map_err(ApiError::internal)?)
        }
        None => body,
    };
    Ok(Call {
        path: upstream_path(req.path()),
        model,
        mapped,
        body,
        stream,
        content_type: Some("application/json".into()),
    })
}

/// `/v1/chat/completions` → `/chat/completions`: provider base URLs end with their version.
fn upstream_path(path: &str) -> String {
    path.strip_prefix("/v1").unwrap_or(path).to_owned()
}

/// `POST` of every JSON route: chat and text completions, embeddings, responses, images and
/// speech.
pub async fn forward_json(
    req: HttpRequest,
    body: Bytes,
    principal: Principal,
    proxy: web::Data<Proxy>,
    worker: web::Data<Worker>,
) -> Result<HttpResponse, ApiError> {
    let call = parse_json_call(&req, body, &principal, &proxy.mapper)?;
    forward(&req, call, &principal, &proxy, &worker).await
}

/// `POST /v1/audio/transcriptions` and `/v1/audio/translations`: multipart forms passed on
/// intact (rebuilt only to put a mapped model in).
pub async fn forward_multipart(
    req: HttpRequest,
    body: Bytes,
    principal: Principal,
    proxy: web::Data<Proxy>,
    worker: web::Data<Worker>,
) -> Result<HttpResponse, ApiError> {
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let form = multipart::read_form(&content_type, body).await?;
    let mapped = proxy.mapper.resolve(&principal.user.id, &form.model);
    let body = match &mapped {
        Some(to) => multipart::with_model(&form, to),
        None => form.body.clone(),
    };
    let call = Call {
        path: upstream_path(req.path()),
        model: form.model.clone(),
        mapped,
        body,
        stream: form.stream,
        content_type: Some(content_type),
    };
    forward(&req, call, &principal, &proxy, &worker).await
}

/// Passes the call through the access gate and the rate limits, then failover, and relays the
/// answer with the caller's rate-limit headers.
async fn forward(
    req: &HttpRequest,
    call: Call,
    principal: &Principal,
    proxy: &Proxy,
    worker: &Worker,
) -> Result<HttpResponse, ApiError> {
    let span = req.extensions().get::<RootSpan>().cloned();
    if let Some(span) = &span {
        // The model comes from the client: recorded quoted and escaped. The mapped one only
        // when it differs.
        match &call.mapped {
            Some(mapped) => telemetry::record(
                span,
                [("model", &call.model), ("upstream_model", &&**mapped)],
            ),
            None => telemetry::record(span, [("model", &call.model)]),
        }
    }
    access::admit_call(principal, req.path(), &call.model)?;
    let admitted = match Plan::for_call(&principal.user.id, &principal.rules, &call.model) {
        Some(mut plan) => {
            if plan.counts_tokens() && call.is_json() {
                plan.tokens = estimate_tokens(&call).await?;
            }
            Some(proxy.limiter.admit(&plan, &worker.redis).await?)
        }
        None => None,
    };
    let (ticket, headers) = admitted.unzip();
    // Token limits are settled with the usage the answer reports, after it is relayed.
    let tap = ticket.filter(|t| !t.token_keys.is_empty()).map(|ticket| {
        let actor = worker.settler.clone();
        usage::Tap::new(move |observed| actor.do_send(Settle { ticket, observed }))
    });
    let result = send_and_relay(span, &call, principal, proxy, worker, tap).await;
    match (result, headers) {
        (Ok(mut response), Some(headers)) => {
            headers.apply(response.headers_mut());
            Ok(response)
        }
        (Err(error), Some(headers)) => Err(headers.apply_to_error(error)),
        (result, None) => result,
    }
}

/// The tokens to charge a JSON call, counted for the model it goes to.
async fn estimate_tokens(call: &Call) -> Result<i64, ApiError> {
    let model = call.upstream_model().to_owned();
    if call.body.len() <= INLINE_ESTIMATE_BYTES && !estimate::may_load(&model) {
        return Ok(estimate::tokens(&model, &call.body));
    }
    let body = call.body.clone();
    web::block(move || estimate::tokens(&model, &body))
        .await
        .map_err(ApiError::internal)
}

/// Failover, then the relay of whatever answered.
async fn send_and_relay(
    span: Option<RootSpan>,
    call: &Call,
    principal: &Principal,
    proxy: &Proxy,
    worker: &Worker,
    tap: Option<usage::Tap>,
) -> Result<HttpResponse, ApiError> {
    let mut levels = Vec::with_capacity(1 + principal.user.fallback_levels.len());
    levels.push(principal.user.level);
    levels.extend(principal.user.fallback_levels.iter().copied());
    let answered = failover::send(&worker.client, proxy, &worker.pools, call, &levels).await;
    if let Some(span) = &span {
        match &answered.key_id {
            Some(key) => telemetry::record(
                span,
                [
                    ("attempts", &answered.attempts),
                    ("upstream_key_id", &display(key)),
                    ("level", &answered.level),
                ],
            ),
            None => telemetry::record(span, [("attempts", &answered.attempts)]),
        }
    }
    let response = answered.result?;
    let idle = Duration::from_secs(proxy.settings.idle_timeout_secs);
    relay::respond(response, call, idle, tap).await
}
