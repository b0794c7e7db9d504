//! Retry and failover: the next key of the level, then the user's fallback levels, until a
//! provider answers, the attempts run out or the deadline passes. Nothing has reached the
//! client yet, so every failure here is invisible to it.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use actix_web::http::{StatusCode, Uri};
use actix_web::web::Bytes;
use awc::error::SendRequestError;

use super::dialect::Dialect;
use super::translate::{self, Translated};
use super::{Call, Proxy};
use crate::actors::key_pool::{Lease, LeasedKey, NoKey, Outcome};
use crate::domain::Provider;
use crate::error::ApiError;
use crate::routing::pools::WorkerPools;

/// An upstream response whose head has arrived.
pub type UpstreamResponse = awc::ClientResponse;

/// How the attempts ended.
pub struct Answered {
    /// The response to relay, or the gateway error for the client.
    pub result: Result<UpstreamResponse, ApiError>,
    /// The response's body when it was small enough to read here (see `relay::read_small`).
    pub body: Option<Bytes>,
    pub attempts: u32,
    /// The key (and its level) that answered.
    pub key_id: Option<String>,
    /// The answering key's provider, when the call was translated to its API.
    pub translated: Option<Provider>,
    pub level: i32,
    /// The attempts that failed: key id and why (`rate_limited`, `rejected`, `server_error`,
    /// `timeout`, `unreachable`).
    pub failures: Vec<(String, &'static str)>,
}

/// Why the last attempt failed, which decides the gateway error.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LastFailure {
    None,
    Timeout,
    Upstream,
    /// Every key that answered last found the call over its per-minute token limit.
    TooLarge,
}

/// Tries keys until one answers with something other than a 429, 5xx, 401/403, refused or
/// reset connection, or timeout.
pub async fn send(
    client: &awc::Client,
    proxy: &Proxy,
    local: &WorkerPools,
    call: &Call,
    levels: &[i32],
) -> Answered {
    let settings = &proxy.settings;
    let deadline = Instant::now() + Duration::from_secs(settings.total_deadline_secs);
    let first_byte = Duration::from_secs(settings.first_byte_timeout_secs);
    let idle = Duration::from_secs(settings.idle_timeout_secs);
    let mut attempts = 0;
    let mut last = LastFailure::None;
    let mut failures = Vec::new();
    // When the first key that could serve the call, resting now (found so, or sent to rest by
    // its 429 here), is back.
    let mut soonest_back: Option<Instant> = None;
    // A chat completion written for Anthropic's or Gemini's API, once per call.
    let mut translations = Translations::default();
    'levels: for &level in levels {
        let Some(pool) = local.pool(level) else {
            continue;
        };
        let mut tried: Vec<String> = Vec::new();
        loop {
            let now = Instant::now();
            if attempts >= settings.max_attempts || now >= deadline {
                break 'levels;
            }
            let lease = Lease {
                providers: call.providers(),
                model: call.upstream_model().to_owned(),
                exclude: tried.clone(),
                prefer: call.pinned_key.clone(),
            };
            let key = match pool.send(lease).await {
                Ok(Ok(key)) => key,
                Ok(Err(NoKey { back_at })) => {
                    soonest_back = sooner(soonest_back, back_at);
                    continue 'levels;
                }
                Err(_) => continue 'levels,
            };
            let target = match translations.target(key.provider, call) {
                Ok(target) => target,
                // The call asks what the provider's API cannot do: the caller's to change.
                Err(error) => {
                    return Answered {
                        result: Err(error),
                        body: None,
                        attempts,
                        key_id: None,
                        translated: None,
                        level,
                        failures,
                    }
                }
            };
            tried.push(key.id.clone());
            attempts += 1;
            let timeout = first_byte.min(deadline - now);
            let outcome = attempt(client, &key, &target, call, timeout).await;
            let report = |outcome| proxy.pools.report(local, level, &key.id, outcome);
            match outcome {
                Ok(response) => {
                    let status = response.status();
                    // A 401 refuses the key; a 403 may refuse the call instead, and is then
                    // the caller's answer like any other. A 402, or a 429 for a quota used
                    // up, is the key's account out of credit: it rests long, as it will not
                    // recover in seconds.
                    // Gemini refuses a bad key with a 400 that names it (`API_KEY_INVALID`).
                    let gemini = key.provider == Provider::Gemini;
                    let (response, code) = match status.as_u16() {
                        403 | 429 => read_error_code(response, timeout).await,
                        400 if gemini => read_error_code(response, timeout).await,
                        _ => (response, ErrorCode::NotRead),
                    };
                    let key_refused = match status.as_u16() {
                        401 => true,
                        400 => matches!(&code, ErrorCode::Json(Some(c)) if c == "API_KEY_INVALID"),
                        // Anthropic refuses a bad key with a 401; its 403 (`permission_error`,
                        // with no code) is about the model or feature the call asked for.
                        403 if key.provider == Provider::Anthropic => false,
                        403 => match &code {
                            ErrorCode::Json(Some(code)) => !CALL_REFUSALS.contains(&code.as_str()),
                            ErrorCode::Json(None) | ErrorCode::Unreadable => true,
                            // Not an API error: a page from a firewall or proxy in front of the
                            // provider, about this call.
                            ErrorCode::NotJson | ErrorCode::NotRead | ErrorCode::TooLarge => false,
                        },
                        _ => false,
                    };
                    let out_of_credit = status == StatusCode::PAYMENT_REQUIRED
                        || matches!(&code, ErrorCode::Json(Some(c)) if c == "insufficient_quota");
                    if out_of_credit {
                        report(Outcome::RateLimited(Duration::from_secs(
                            settings.quota_cooldown_secs,
                        )));
                        tracing::warn!(upstream_key_id = %key.id, level, status = status.as_u16(), "upstream key out of credit; resting it and trying the next key");
                        failures.push((key.id.clone(), "out_of_credit"));
                        last = LastFailure::Upstream;
                    } else if status == StatusCode::TOO_MANY_REQUESTS
                        && matches!(code, ErrorCode::TooLarge)
                    {
                        // The key is fine, and a key of a higher tier may take the call.
                        report(Outcome::Success);
                        tracing::info!(upstream_key_id = %key.id, level, "call over the upstream key's token limit; trying the next key");
                        failures.push((key.id.clone(), "too_large"));
                        last = LastFailure::TooLarge;
                    } else if status == StatusCode::TOO_MANY_REQUESTS {
                        let rest = retry_after(&response, settings.default_cooldown_secs);
                        report(Outcome::RateLimited(rest));
                        soonest_back = sooner(soonest_back, Some(Instant::now() + rest));
                        tracing::info!(upstream_key_id = %key.id, level, "upstream 429; trying the next key");
                        failures.push((key.id.clone(), "rate_limited"));
                        last = LastFailure::Upstream;
                    } else if key_refused {
                        report(Outcome::Rejected(status.as_u16()));
                        failures.push((key.id.clone(), "rejected"));
                        last = LastFailure::Upstream;
                    } else if status.is_server_error() {
                        report(Outcome::Failed);
                        tracing::info!(upstream_key_id = %key.id, level, status = status.as_u16(), "upstream error; trying the next key");
                        failures.push((key.id.clone(), "server_error"));
                        last = LastFailure::Upstream;
                    } else {
                        // A small answer is read here, while a body that stalls or breaks can
                        // still move the call to the next key.
                        match super::relay::read_small(response, idle, call.stream).await {
                            Ok((response, body)) => {
                                report(Outcome::Success);
                                return Answered {
                                    result: Ok(response),
                                    body,
                                    attempts,
                                    key_id: Some(key.id.clone()),
                                    translated: target.translated.then_some(key.provider),
                                    level,
                                    failures,
                                };
                            }
                            Err(error) => {
                                report(Outcome::Failed);
                                let timed_out = error.status() == StatusCode::GATEWAY_TIMEOUT;
                                tracing::info!(upstream_key_id = %key.id, level, timed_out, error = %error, "upstream answer cut short; trying the next key");
                                let (why, failure) = unanswered(timed_out);
                                failures.push((key.id.clone(), why));
                                last = failure;
                            }
                        }
                    }
                }
                Err(err) => {
                    report(Outcome::Failed);
                    let timed_out = matches!(err, SendRequestError::Timeout);
                    tracing::info!(upstream_key_id = %key.id, level, timed_out, error = crate::upstream::client::describe(&err), "upstream unreachable; trying the next key");
                    let (why, failure) = unanswered(timed_out);
                    failures.push((key.id.clone(), why));
                    last = failure;
                }
            }
        }
    }
    let result = Err(match last {
        LastFailure::None => no_upstream(&call.model, soonest_back),
        // The caller's to fix (a smaller input or `max_tokens`), not an upstream failure.
        LastFailure::TooLarge => ApiError::invalid(
            "the request asks for more tokens than the upstream keys' per-minute limit allows; \
             reduce the input or max_tokens",
        ),
        LastFailure::Timeout => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the upstream provider did not answer in time",
        ),
        LastFailure::Upstream => {
            let error = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "every eligible upstream key failed",
            );
            // Every key tried is cooling down after its 429: when the first is back is known.
            let rate_limited = failures.iter().all(|(_, why)| *why == "rate_limited");
            match soonest_back {
                Some(at) if rate_limited => with_retry_after(error, at),
                _ => error,
            }
        }
    });
    Answered {
        result,
        body: None,
        attempts,
        key_id: None,
        translated: None,
        level: levels.first().copied().unwrap_or_default(),
        failures,
    }
}

/// 503 `no_upstream_available`; when the keys that could serve the call are only resting
/// (cooling down after a 429, or their circuit open), with the `Retry-After` of the first one
/// back, in whole seconds, so SDKs that honour it wait as long as needed and no longer.
fn no_upstream(model: &str, back_at: Option<Instant>) -> ApiError {
    let error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_upstream_available",
        format!("no upstream key can serve model `{model}` now"),
    );
    match back_at {
        Some(at) => with_retry_after(error, at),
        None => error,
    }
}

/// `error` with a `Retry-After` of the whole seconds until `at` (at least 1).
fn with_retry_after(error: ApiError, at: Instant) -> ApiError {
    let wait = at.saturating_duration_since(Instant::now());
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    error.with_header(RETRY_AFTER, HeaderValue::from(seconds.max(1)))
}

fn sooner(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    a.into_iter().chain(b).min()
}

/// An attempt that got no whole answer (no head, or a body that stalled or broke): why, for
/// the attempt's record, and the gateway error it leads to if it is the last.
fn unanswered(timed_out: bool) -> (&'static str, LastFailure) {
    if timed_out {
        ("timeout", LastFailure::Timeout)
    } else {
        ("unreachable", LastFailure::Upstream)
    }
}

/// Error codes of a provider's 403 that refuse the call, not the key (as does a 403 whose body
/// is not an API error at all: a firewall's or proxy's page about this call): OpenAI answers 403
/// `model_not_found` when the key's project may not use the model asked for, and
/// `unsupported_country_region_territory` to every key from where the router runs. Disabling
/// keys for these would take every key out of service on one caller's request.
const CALL_REFUSALS: [&str; 2] = ["model_not_found", "unsupported_country_region_territory"];

/// The `error.code` of a provider's error answer (for Gemini, whose `code` is the HTTP status,
/// the `reason` of its first detail), as far as it could be read.
enum ErrorCode {
    /// The body was not read (not needed for this status).
    NotRead,
    /// The body could not be read in time.
    Unreadable,
    /// The body is not an API error in JSON.
    NotJson,
    /// An API error, with its code if it has one.
    Json(Option<String>),
    /// OpenAI's 429 "Request too large": the call asks for more tokens than the key's
    /// per-minute limit allows at all, so no wait makes it pass on that key.
    TooLarge,
}

/// Reads a provider's error answer (64 KiB at most) for its `error.code`, and puts the body
/// back so the answer can still be passed on.
async fn read_error_code(
    mut response: UpstreamResponse,
    timeout: Duration,
) -> (UpstreamResponse, ErrorCode) {
    #[derive(serde::Deserialize)]
    struct Refusal {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: Option<serde_json::Value>,
        #[serde(default)]
        details: Vec<Reason>,
        #[serde(default)]
        message: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct Reason {
        reason: Option<String>,
    }
    let body = match tokio::time::timeout(timeout, response.body().limit(64 * 1024)).await {
        Ok(Ok(body)) => body,
        _ => return (response, ErrorCode::Unreadable),
    };
    let code = match serde_json::from_slice::<Refusal>(&body) {
        Ok(Refusal { error }) if matches!(&error.message, Some(serde_json::Value::String(m)) if m.starts_with("Request too large")) => {
            ErrorCode::TooLarge
        }
        Ok(Refusal { error }) => ErrorCode::Json(match error.code {
            Some(serde_json::Value::String(code)) => Some(code),
            _ => error.details.into_iter().find_map(|d| d.reason),
        }),
        Err(_) => ErrorCode::NotJson,
    };
    let response: UpstreamResponse = response.map_body(|_, _| actix_web::dev::Payload::from(body));
    (response, code)
}

/// What an attempt sends: the call as the client wrote it, or as translated for the key's
/// provider.
struct Target<'a> {
    path: &'a str,
    body: &'a Bytes,
    headers: &'a [(actix_web::http::header::HeaderName, HeaderValue)],
    /// Written for another provider's API than the client's.
    translated: bool,
}

/// The call's translations, each made the first time a key of its provider is tried.
#[derive(Default)]
struct Translations {
    anthropic: Option<Translated>,
    gemini: Option<Translated>,
}

impl Translations {
    fn target<'a>(
        &'a mut self,
        provider: Provider,
        call: &'a Call,
    ) -> Result<Target<'a>, ApiError> {
        if provider == call.dialect.provider() {
            return Ok(Target {
                path: &call.path,
                body: &call.body,
                headers: &call.headers,
                translated: false,
            });
        }
        let slot = match provider {
            Provider::Anthropic => &mut self.anthropic,
            Provider::Gemini => &mut self.gemini,
            Provider::OpenAi => return Err(ApiError::internal("no translation to OpenAI's API")),
        };
        if slot.is_none() {
            *slot = Some(translate::request(provider, call)?);
        }
        let translated = slot.as_ref().expect("made above");
        Ok(Target {
            path: &translated.path,
            body: &translated.body,
            headers: &translated.headers,
            translated: true,
        })
    }
}

/// One attempt with one key.
async fn attempt(
    client: &awc::Client,
    key: &LeasedKey,
    target: &Target<'_>,
    call: &Call,
    timeout: Duration,
) -> Result<UpstreamResponse, SendRequestError> {
    let started = Instant::now();
    match request(client, key, target, call, timeout)
        .send_body(target.body.clone())
        .await
    {
        // A kept-alive connection the provider closed as the call went out on it (its idle
        // timeout ran out first: uvicorn's and actix's are 5 s) is no failure of the key. The
        // call goes again, once, on a connection made for it; the provider never read it.
        Err(err) if closed_unanswered(&err) => {
            tracing::debug!(upstream_key_id = %key.id, error = crate::upstream::client::describe(&err), "upstream closed a kept-alive connection unanswered; sending again");
            let left = timeout.saturating_sub(started.elapsed());
            request(client, key, target, call, left)
                .send_body(target.body.clone())
                .await
        }
        result => result,
    }
}

/// Whether a send failed on a connection closed or reset before any answer: what a stale
/// keep-alive connection gives. A refused connection, a timeout or a malformed answer is not.
fn closed_unanswered(err: &SendRequestError) -> bool {
    use actix_web::error::ParseError;
    use awc::error::ConnectError;
    matches!(
        err,
        SendRequestError::Connect(ConnectError::Disconnected)
            | SendRequestError::Send(_)
            | SendRequestError::Response(ParseError::Io(_))
    )
}

/// The attempt's request to `key`, with its headers.
fn request(
    client: &awc::Client,
    key: &LeasedKey,
    target: &Target<'_>,
    call: &Call,
    timeout: Duration,
) -> awc::ClientRequest {
    let request = match upstream_uri(&key.base_url, target.path) {
        Some(uri) => client.post(uri),
        // Not a valid URL: awc reports it as the attempt's error.
        None => client.post(format!("{}{}", key.base_url, target.path)),
    };
    let mut request = request
        .timeout(timeout)
        .insert_header(key.credential.clone());
    match (&call.content_type, target.translated) {
        (_, true) => request = request.insert_header((CONTENT_TYPE, "application/json")),
        (Some(content_type), false) => {
            request = request.insert_header((CONTENT_TYPE, content_type.as_str()))
        }
        (None, false) => {}
    }
    // Gemini streams events only when asked with `alt=sse` (its call carries the header then,
    // as does a translated stream).
    if call.stream && call.dialect != Dialect::Gemini && !target.translated {
        request = request.insert_header((ACCEPT, HeaderValue::from_static("text/event-stream")));
    }
    for header in target.headers {
        request = request.insert_header(header.clone());
    }
    request
}

/// A key's base URL joined with a call's path, parsed once per thread: the same few URLs are
/// built on every call, and formatting and parsing one cost more than the rest of preparing the
/// request. At most [`MOST_URIS`] are kept (then the table starts again); `None` when the two do
/// not make a valid URL.
fn upstream_uri(base_url: &str, path: &str) -> Option<Uri> {
    type Paths = foldhash::HashMap<Box<str>, Uri>;
    thread_local! {
        static PARSED: RefCell<(usize, foldhash::HashMap<Box<str>, Paths>)> = RefCell::default();
    }
    PARSED.with_borrow_mut(|(count, parsed)| {
        if let Some(uri) = parsed.get(base_url).and_then(|paths| paths.get(path)) {
            return Some(uri.clone());
        }
        let uri = Uri::try_from(format!("{base_url}{path}")).ok()?;
        if *count >= MOST_URIS {
            parsed.clear();
            *count = 0;
        }
        *count += 1;
        parsed
            .entry(base_url.into())
            .or_default()
            .insert(path.into(), uri.clone());
        Some(uri)
    })
}

const MOST_URIS: usize = 1024;

/// The rest a 429 asks for: `Retry-After` as seconds or as an HTTP date, else the configured
/// default (at most an hour, so a silly header cannot bench a key for good).
fn retry_after(response: &UpstreamResponse, default_secs: u64) -> Duration {
    let header = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok());
    retry_after_secs(header, chrono::Utc::now(), default_secs)
}

fn retry_after_secs(
    header: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
    default_secs: u64,
) -> Duration {
    let secs = header.map(str::trim).and_then(|value| {
        match value.parse::<f64>() {
            Ok(s) => (s.is_finite() && s >= 0.0).then(|| s.ceil() as u64),
            // `Wed, 21 Oct 2026 07:28:00 GMT`: an HTTP date is an RFC 2822 date in GMT.
            Err(_) => chrono::DateTime::parse_from_rfc2822(value)
                .ok()
                .map(|at| (at.timestamp() - now.timestamp()).max(0) as u64),
        }
    });
    Duration::from_secs(secs.unwrap_or(default_secs).min(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uris_are_joined_parsed_and_kept() {
        let uri = upstream_uri("http://127.0.0.1:9/v1", "/chat/completions").unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9/v1/chat/completions");
        let again = upstream_uri("http://127.0.0.1:9/v1", "/chat/completions").unwrap();
        assert_eq!(again, uri);
        let other = upstream_uri("http://127.0.0.1:9/v1", "/embeddings").unwrap();
        assert_eq!(other.path(), "/v1/embeddings");
        assert!(upstream_uri("not a url", "/chat/completions").is_none());
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .to_utc();
        let secs = |header| retry_after_secs(header, now, 30).as_secs();
        assert_eq!(secs(Some("7")), 7);
        assert_eq!(secs(Some(" 1.2 ")), 2);
        assert_eq!(secs(Some("Wed, 25 Nov 2026 10:01:30 GMT")), 90);
        assert_eq!(
            secs(Some("Wed, 25 Nov 2026 09:00:00 GMT")),
            0,
            "a date passed"
        );
        assert_eq!(secs(Some("soon")), 30);
        assert_eq!(secs(Some("-5")), 30);
        assert_eq!(secs(None), 30);
        assert_eq!(secs(Some("86400")), 3600);
    }
}
