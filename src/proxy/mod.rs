//! The data plane: OpenAI-compatible calls forwarded to a leased upstream key, with retry and
//! failover, streamed back as they arrive.

pub mod affinity;
pub mod dialect;
pub mod failover;
pub mod multipart;
pub mod relay;
pub mod translate;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::web::Bytes;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::{Map, Value};
use tracing_actix_web::RootSpan;

use actix::Addr;

use crate::access;
use crate::actors::rate_limiter::RateLimiterActor;
use crate::auth::Principal;
use crate::config::UpstreamSettings;
use crate::error::ApiError;
use crate::limits::redis_store::RedisLink;
use crate::limits::{estimate, Plan, RateLimiter};
use crate::metering::meter::CallMeter;
use crate::metering::record::Recorder;
use crate::metering::spend::SpendBook;
use crate::metering::usage::Endpoint;
use crate::routing::pools::WorkerPools;
use crate::routing::{KeyPools, ModelMapper};
use crate::telemetry;
use dialect::Dialect;

/// What the data plane shares across workers.
pub struct Proxy {
    pub pools: Arc<KeyPools>,
    pub mapper: Arc<ModelMapper>,
    pub settings: UpstreamSettings,
    pub limiter: Arc<RateLimiter>,
    /// Where finished calls go to be metered.
    pub recorder: Arc<Recorder>,
    /// Users' spend, for the budget check.
    pub spend: Arc<SpendBook>,
    /// Which key created each stored response, for follow-ups that name one.
    pub affinity: Arc<affinity::ResponseAffinity>,
    /// The models keys without a `models` list serve, as their providers list them.
    pub catalog: Arc<crate::routing::catalog::ModelCatalog>,
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
    /// The API the client speaks, which picks the provider whose keys serve it.
    pub dialect: Dialect,
    /// The upstream path after the provider's base URL, e.g. `/chat/completions` (with the
    /// query a Gemini call passes on).
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
    /// Switchyard asked the provider for a stream's usage on its own: the usage event is
    /// removed from what the client receives.
    pub hide_usage: bool,
    /// The stored response a `/v1/responses` call follows up (`previous_response_id`).
    pub previous_response: Option<String>,
    /// The key to try first: the one that created that response (looked up once the call is
    /// admitted).
    pub pinned_key: Option<String>,
    /// Request headers the provider needs passed on (Anthropic's `anthropic-version`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A chat completion, which Anthropic and Gemini keys serve too, translated.
    pub translatable: bool,
    /// The client asked for a stream's usage (`stream_options.include_usage`).
    pub usage_asked: bool,
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

    /// The providers whose keys may serve the call, its own first.
    pub fn providers(&self) -> &'static [crate::domain::Provider] {
        use crate::domain::Provider;
        match (self.translatable, self.dialect) {
            (true, _) => &[Provider::OpenAi, Provider::Anthropic, Provider::Gemini],
            (false, Dialect::OpenAi) => &[Provider::OpenAi],
            (false, Dialect::Anthropic) => &[Provider::Anthropic],
            (false, Dialect::Gemini) => &[Provider::Gemini],
        }
    }
}

/// A model name routing, logs and metrics can take: no control characters (none belongs in a
/// name, and PostgreSQL cannot store a NUL, which would hold up the call's log row).
pub(crate) fn check_model_name(model: &str) -> Result<(), ApiError> {
    if crate::domain::rules::has_control(model) {
        return Err(ApiError::invalid(
            "`model` must not contain control characters",
        ));
    }
    Ok(())
}

/// Reads a JSON call body: an object with a string `model`. The body goes upstream byte for
/// byte unless a mapping changes the model or a stream's usage must be asked for. A responses
/// call's `previous_response_id` is noted.
fn parse_json_call(
    req: &HttpRequest,
    endpoint: Endpoint,
    body: Bytes,
    principal: &Principal,
    proxy: &Proxy,
) -> Result<Call, ApiError> {
    // Only what routing needs is read: the rest is skipped without being built.
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow, default)]
        model: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        stream: Option<bool>,
        #[serde(default)]
        stream_options: Option<StreamOptions>,
        #[serde(borrow, default)]
        previous_response_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        background: Option<bool>,
    }
    #[derive(serde::Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: Option<bool>,
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
    check_model_name(&model)?;
    if endpoint == Endpoint::Responses && peek.background == Some(true) {
        // A background response answers `queued` with no usage, and its result is fetched
        // later by routes not served here: it could be neither metered nor limited.
        return Err(ApiError::invalid(
            "`background` responses are not supported by this router; omit `background` or set it to false",
        ));
    }
    let previous_response = match endpoint {
        Endpoint::Responses => peek.previous_response_id.map(|id| id.into_owned()),
        _ => None,
    };
    let stream = peek.stream.unwrap_or(false);
    let usage_asked = peek.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true);
    let hide_usage = stream
        && proxy.settings.request_stream_usage
        && endpoint.usage_on_request()
        && !usage_asked;
    let mapped = proxy.mapper.resolve(&principal.user.id, &model);
    let body = match (&mapped, hide_usage, &peek.stream_options) {
        (None, false, _) => body,
        // The common streaming case: only the usage to ask for, spliced in without a re-parse
        // (unless the body names `stream_options` at all, say as null: a second key could lose).
        (None, true, None) if !relay::contains(&body, b"\"stream_options\"") => {
            let start = body.iter().position(|b| *b == b'{').unwrap_or(0) + 1;
            let mut spliced = Vec::with_capacity(body.len() + INCLUDE_USAGE.len());
            spliced.extend_from_slice(&body[..start]);
            spliced.extend_from_slice(INCLUDE_USAGE);
            spliced.extend_from_slice(&body[start..]);
            Bytes::from(spliced)
        }
        _ => {
            // The peek skipped the fields it does not read; this parse reads them all, and a
            // bad one (a number out of range, a lone surrogate) is the caller's.
            let mut object: Map<String, Value> = serde_json::from_slice(&body)
                .map_err(|e| ApiError::invalid(crate::routes::describe_json_error(&e)))?;
            if let Some(to) = &mapped {
                object.insert("model".into(), Value::String(to.to_string()));
            }
            if hide_usage {
                let options = object
                    .entry("stream_options")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !options.is_object() {
                    *options = Value::Object(Map::new());
                }
                if let Value::Object(options) = options {
                    options.insert("include_usage".into(), Value::Bool(true));
                }
            }
            Bytes::from(serde_json::to_vec(&object).map_err(ApiError::internal)?)
        }
    };
    let call = Call {
        dialect: Dialect::OpenAi,
        path: upstream_path(req.match_info().as_str()),
        model,
        mapped,
        body,
        stream,
        content_type: Some("application/json".into()),
        hide_usage,
        previous_response,
        pinned_key: None,
        headers: Vec::new(),
        translatable: endpoint == Endpoint::Chat,
        usage_asked,
    };
    Ok(call)
}

/// The member that asks for a stream's usage, spliced in as the body's first member.
const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// Notes Switchyard's own refusal of a call on its meter, and passes the error on.
fn refuse(meter: &mut CallMeter, error: ApiError) -> ApiError {
    meter.refused(&error);
    error
}

/// `/v1/chat/completions` → `/chat/completions`: provider base URLs end with their version.
///
/// Every path here is the one the router matched (`match_info`), with escapes such as `%63`
/// decoded, not the raw `req.path()`: `/v1/chat/%63ompletions` is routed to chat, so it must
/// also be checked, sent upstream and metered as chat.
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
    let mut meter = CallMeter::start(&req, &principal, proxy.recorder.clone());
    let call = parse_json_call(&req, meter.endpoint(), body, &principal, &proxy)
        .map_err(|e| refuse(&mut meter, e))?;
    forward(&req, call, &principal, &proxy, &worker, meter).await
}

/// `POST /v1/messages`, Anthropic's Messages API (JSON and streamed), for Anthropic keys. The
/// body goes on as the client wrote it (the model mapped), with the client's
/// `anthropic-version` (2023-06-01 when it sends none) and `anthropic-beta`.
pub async fn forward_messages(
    req: HttpRequest,
    body: Bytes,
    principal: Principal,
    proxy: web::Data<Proxy>,
    worker: web::Data<Worker>,
) -> Result<HttpResponse, ApiError> {
    static VERSION: HeaderName = HeaderName::from_static("anthropic-version");
    static BETA: HeaderName = HeaderName::from_static("anthropic-beta");
    let mut meter = CallMeter::start(&req, &principal, proxy.recorder.clone());
    let mut call = parse_json_call(&req, meter.endpoint(), body, &principal, &proxy)
        .map_err(|e| refuse(&mut meter, e))?;
    call.dialect = Dialect::Anthropic;
    let version = req
        .headers()
        .get(&VERSION)
        .cloned()
        .unwrap_or(HeaderValue::from_static("2023-06-01"));
    call.headers.push((VERSION.clone(), version));
    if let Some(beta) = req.headers().get(&BETA) {
        call.headers.push((BETA.clone(), beta.clone()));
    }
    forward(&req, call, &principal, &proxy, &worker, meter).await
}

/// `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`, Gemini's API,
/// for Gemini keys. The model comes from the path, and a mapped one goes in the upstream's;
/// the query is passed on (`alt=sse`) without the caller's `key`.
pub async fn forward_gemini(
    req: HttpRequest,
    body: Bytes,
    principal: Principal,
    proxy: web::Data<Proxy>,
    worker: web::Data<Worker>,
) -> Result<HttpResponse, ApiError> {
    let mut meter = CallMeter::start(&req, &principal, proxy.recorder.clone());
    let call =
        parse_gemini_call(&req, body, &principal, &proxy).map_err(|e| refuse(&mut meter, e))?;
    forward(&req, call, &principal, &proxy, &worker, meter).await
}

/// Reads a Gemini call: the model and method from the path, a JSON object body.
fn parse_gemini_call(
    req: &HttpRequest,
    body: Bytes,
    principal: &Principal,
    proxy: &Proxy,
) -> Result<Call, ApiError> {
    let target = req.match_info().get("target").unwrap_or_default();
    let (model, method) = target.rsplit_once(':').unwrap_or((target, ""));
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => {
            return Err(ApiError::not_found(format!(
                "no route for POST {}: Switchyard serves `:generateContent` and `:streamGenerateContent`",
                req.path()
            )))
        }
    };
    let model = model.strip_prefix("models/").unwrap_or(model);
    if model.is_empty() {
        return Err(ApiError::invalid("the path must name a model"));
    }
    check_model_name(model)?;
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid("request body must be a JSON object"));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        .map_err(|e| ApiError::invalid(crate::routes::describe_json_error(&e)))?;
    let mapped = proxy.mapper.resolve(&principal.user.id, model);
    let upstream_model = mapped.as_deref().unwrap_or(model);
    // The caller's own key stays here; everything else (`alt=sse`, field masks) goes on. Names
    // are compared decoded, as authentication and Google read them (`k%65y` is `key`).
    let query: Vec<&str> = req
        .query_string()
        .split('&')
        .filter(|pair| query_pair(pair).is_some_and(|(name, _)| name != "key"))
        .collect();
    let mut path = format!("/models/{}:{method}", escape_segment(upstream_model));
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query.join("&"));
    }
    let sse = query
        .iter()
        .filter_map(|pair| query_pair(pair))
        .any(|(name, value)| name == "alt" && value.eq_ignore_ascii_case("sse"));
    let mut headers = Vec::new();
    if sse {
        headers.push((
            actix_web::http::header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        ));
    }
    Ok(Call {
        dialect: Dialect::Gemini,
        path,
        model: model.to_owned(),
        mapped,
        body,
        stream,
        content_type: Some("application/json".into()),
        hide_usage: false,
        previous_response: None,
        pinned_key: None,
        headers,
        translatable: false,
        usage_asked: false,
    })
}

/// A query pair (`name=value`) decoded, as a server reads it; none for an empty pair.
fn query_pair(pair: &str) -> Option<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
    url::form_urlencoded::parse(pair.as_bytes()).next()
}

/// A model name as one path segment: anything but unreserved characters percent-encoded.
fn escape_segment(name: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    if name.bytes().all(plain) {
        return name.into();
    }
    let mut out = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        match plain(b) {
            true => out.push(b as char),
            false => out.push_str(&format!("%{b:02X}")),
        }
    }
    out.into()
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
    let mut meter = CallMeter::start(&req, &principal, proxy.recorder.clone());
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let form = multipart::read_form(&content_type, body)
        .await
        .map_err(|e| refuse(&mut meter, e))?;
    let mapped = proxy.mapper.resolve(&principal.user.id, &form.model);
    let body = match &mapped {
        Some(to) => multipart::with_model(&form, to),
        None => form.body.clone(),
    };
    let call = Call {
        dialect: Dialect::OpenAi,
        path: upstream_path(req.match_info().as_str()),
        model: form.model.clone(),
        mapped,
        body,
        stream: form.stream,
        content_type: Some(content_type),
        hide_usage: false,
        previous_response: None,
        pinned_key: None,
        headers: Vec::new(),
        translatable: false,
        usage_asked: false,
    };
    forward(&req, call, &principal, &proxy, &worker, meter).await
}

/// Passes the call through the access gate and the rate limits, then failover, and relays the
/// answer with the caller's rate-limit headers.
async fn forward(
    req: &HttpRequest,
    mut call: Call,
    principal: &Principal,
    proxy: &Proxy,
    worker: &Worker,
    mut meter: CallMeter,
) -> Result<HttpResponse, ApiError> {
    let span = req.extensions().get::<RootSpan>().cloned();
    if let Some(span) = &span {
        // The model comes from the client: written escaped (quoted unless it is one word). The
        // mapped one only when it differs.
        match &call.mapped {
            Some(mapped) => telemetry::record(
                span,
                [("model", &call.model), ("upstream_model", &&**mapped)],
            ),
            None => telemetry::record(span, [("model", &call.model)]),
        }
    }
    meter.call(&call.model, call.upstream_model(), &call.body, call.stream);
    access::admit_call(
        principal,
        &proxy.spend,
        req.match_info().as_str(),
        &call.model,
    )
    .map_err(|e| refuse(&mut meter, e))?;
    let admitted = match Plan::for_call(&principal.user.id, &principal.rules, &call.model) {
        Some(mut plan) => {
            if plan.counts_tokens() && call.is_json() {
                plan.tokens = estimate_tokens(&call)
                    .await
                    .map_err(|e| refuse(&mut meter, e))?;
            }
            let admitted = proxy.limiter.admit(&plan, &worker.redis).await;
            Some(admitted.map_err(|e| refuse(&mut meter, e))?)
        }
        None => None,
    };
    let (ticket, headers) = admitted.unzip();
    // Token limits are settled with the usage the answer reports, after it is relayed.
    if let Some(ticket) = ticket.filter(|t| !t.token_keys.is_empty()) {
        meter.settle_with(ticket, worker.settler.clone());
    }
    // Only an admitted follow-up looks up (maybe in Redis) the key holding what it follows.
    if let Some(id) = &call.previous_response {
        call.pinned_key = proxy.affinity.key_for(id).await;
    }
    let result = send_and_relay(span, &call, principal, proxy, worker, meter).await;
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
    mut meter: CallMeter,
) -> Result<HttpResponse, ApiError> {
    let mut levels = Vec::with_capacity(1 + principal.user.fallback_levels.len());
    levels.push(principal.user.level);
    levels.extend(principal.user.fallback_levels.iter().copied());
    // A follow-up goes first to the level of the key that holds what it follows.
    if let Some(level) = call
        .pinned_key
        .as_deref()
        .and_then(|k| proxy.pools.level_of(k))
    {
        if let Some(at) = levels.iter().position(|l| *l == level) {
            levels[..=at].rotate_right(1);
        }
    }
    // Boxed: the failover's state (awc's request futures and their timers) is the largest part
    // of a call's future, which actix moves whole more than once before it first runs.
    let answered = Box::pin(failover::send(
        &worker.client,
        proxy,
        &worker.pools,
        call,
        &levels,
    ))
    .await;
    if let Some(span) = &span {
        match &answered.key_id {
            Some(key) => telemetry::record(
                span,
                [
                    ("attempts", &answered.attempts),
                    ("upstream_key_id", &key.as_str()),
                    ("level", &answered.level),
                ],
            ),
            None => telemetry::record(span, [("attempts", &answered.attempts)]),
        }
    }
    let answered_by = answered.key_id.as_deref().map(|k| (k, answered.level));
    meter.attempts(answered.attempts, answered_by, answered.failures);
    let response = answered.result.map_err(|e| refuse(&mut meter, e))?;
    let idle = Duration::from_secs(proxy.settings.idle_timeout_secs);
    // A stored response's id is noted with the key that created it.
    let note_id = match (&answered.key_id, meter.endpoint()) {
        (Some(key), Endpoint::Responses) if response.status().is_success() => Some(relay::NoteId {
            affinity: proxy.affinity.clone(),
            key_id: key.clone(),
        }),
        _ => None,
    };
    let translated = answered.translated;
    relay::respond(
        response,
        answered.body,
        call,
        idle,
        meter,
        note_id,
        translated,
    )
    .await
}
