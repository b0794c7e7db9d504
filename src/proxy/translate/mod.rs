//! Chat completions served by Anthropic and Gemini keys: the OpenAI request is written in the
//! provider's API, and its answer (JSON, event stream or error) back as OpenAI's, so apps on
//! the OpenAI SDK reach Claude and Gemini models without knowing it.
//!
//! What the provider's API has no place for is refused (`n` above 1 for Anthropic, audio input)
//! rather than dropped in silence; sampling options both APIs share are passed on; the rest of
//! OpenAI's options (`logprobs`, `seed` for Anthropic, `logit_bias`) are left out.

mod anthropic;
mod gemini;

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::{Bytes, BytesMut};
use awc::error::PayloadError;
use eventsource_stream::{EventStream, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::{json, Map, Value};

use super::Call;
use crate::domain::Provider;
use crate::error::ApiError;

/// A chat completion as one provider's API request.
pub struct Translated {
    /// The path after the key's base URL (with Gemini's `?alt=sse` for a stream).
    pub path: String,
    pub body: Bytes,
    /// Headers the provider needs (Anthropic's `anthropic-version`, Accept for a stream).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The chat completion `call` written for `provider`'s API; a 400 when it asks what that API
/// cannot do.
pub fn request(provider: Provider, call: &Call) -> Result<Translated, ApiError> {
    let chat: Map<String, Value> = serde_json::from_slice(&call.body)
        .map_err(|e| ApiError::invalid(crate::routes::describe_json_error(&e)))?;
    let model = call.upstream_model();
    match provider {
        Provider::Anthropic => anthropic::request(&chat, model, call.stream),
        Provider::Gemini => gemini::request(&chat, model, call.stream),
        Provider::OpenAi => Err(ApiError::internal("an OpenAI call needs no translation")),
    }
}

/// A provider's whole answer (`status`) as OpenAI's: a chat completion naming `model`, or an
/// error in OpenAI's shape; `None` when the body is not what the provider sends.
pub fn answer(provider: Provider, status: StatusCode, body: &[u8], model: &str) -> Option<Bytes> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let out = match (status.is_success(), provider) {
        (true, Provider::Anthropic) => anthropic::answer(&value, model)?,
        (true, Provider::Gemini) => gemini::answer(&value, model)?,
        (false, provider) => error_body(provider, status, &value)?,
        (true, Provider::OpenAi) => return None,
    };
    Some(Bytes::from(out.to_string()))
}

/// A provider's error answer in OpenAI's shape, with the provider's words.
fn error_body(provider: Provider, status: StatusCode, value: &Value) -> Option<Value> {
    let error = value.get("error")?;
    let message = error.get("message").and_then(Value::as_str).unwrap_or("");
    let (kind, code) = match provider {
        // `{"type":"error","error":{"type":"invalid_request_error","message":…}}`
        Provider::Anthropic => {
            let kind = error.get("type").and_then(Value::as_str);
            (
                kind.unwrap_or("api_error").to_owned(),
                kind.map(str::to_owned),
            )
        }
        // `{"error":{"code":400,"message":…,"status":"INVALID_ARGUMENT"}}`
        _ => (
            openai_error_type(status).to_owned(),
            error
                .get("status")
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase),
        ),
    };
    Some(json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
}

/// OpenAI's `error.type` for a status.
fn openai_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// A provider's event stream as OpenAI chat-completion chunks naming `model`, ending with the
/// usage chunk and `data: [DONE]` only when the provider's stream ended as it should (a stream
/// cut short ends without them, which the relay reports as a broken stream).
pub fn events<S>(provider: Provider, upstream: S, model: &str) -> TranslatedEvents<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    let translator = match provider {
        Provider::Gemini => Translator::Gemini(gemini::StreamState::default()),
        _ => Translator::Anthropic(anthropic::StreamState::default()),
    };
    TranslatedEvents {
        events: upstream.eventsource(),
        translator,
        out: ChunkWriter::new(model),
        ended: false,
        broken: None,
    }
}

enum Translator {
    Anthropic(anthropic::StreamState),
    Gemini(gemini::StreamState),
}

impl Translator {
    fn event(&mut self, data: &str, out: &mut ChunkWriter) {
        let Ok(value) = serde_json::from_str::<Value>(data) else {
            return;
        };
        match self {
            Translator::Anthropic(state) => state.event(&value, out),
            Translator::Gemini(state) => state.event(&value, out),
        }
    }

    /// The provider's stream ended; Gemini's ends whole once a candidate has finished.
    fn end(&mut self, out: &mut ChunkWriter) {
        if let Translator::Gemini(state) = self {
            state.end(out);
        }
        // Cut short: what the provider counted so far still goes to the meter.
        if !out.finished {
            self.cut(out);
        }
    }

    /// The stream broke off: a usage chunk with the provider's counts so far (the prompt, the
    /// completion up to here), without `[DONE]`, so the call is metered as partial from them.
    fn cut(&mut self, out: &mut ChunkWriter) {
        let usage = match self {
            Translator::Anthropic(state) => state.usage(),
            Translator::Gemini(state) => state.usage(),
        };
        if let Some(usage) = usage {
            out.chunk(Vec::new(), Some(usage));
        }
        out.finished = true;
    }
}

/// The translated stream: the provider's events in, OpenAI's chunks out.
pub struct TranslatedEvents<S> {
    events: EventStream<S>,
    translator: Translator,
    out: ChunkWriter,
    ended: bool,
    /// A broken connection, reported after the usage chunk that goes out first.
    broken: Option<PayloadError>,
}

impl<S> Stream for TranslatedEvents<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(error) = this.broken.take() {
                this.ended = true;
                return Poll::Ready(Some(Err(error)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(this.events.poll_next_unpin(cx)) {
                Some(Ok(event)) => {
                    if this.out.finished {
                        continue;
                    }
                    this.translator.event(&event.data, &mut this.out);
                }
                Some(Err(error)) => {
                    this.broken = Some(match error {
                        EventStreamError::Transport(error) => error,
                        // Not an event stream after all: as broken as a cut one.
                        _ => PayloadError::EncodingCorrupted,
                    });
                    if !this.out.finished {
                        this.translator.cut(&mut this.out);
                    }
                }
                None => {
                    this.ended = true;
                    if !this.out.finished {
                        this.translator.end(&mut this.out);
                    }
                }
            }
            let chunk = this.out.take();
            if !chunk.is_empty() {
                return Poll::Ready(Some(Ok(chunk)));
            }
        }
    }
}

/// Token counts in OpenAI's terms: the prompt includes what was read from (or written to) the
/// cache; the completion includes reasoning.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    prompt: i64,
    cached: i64,
    completion: i64,
    reasoning: i64,
}

impl Usage {
    fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        })
    }
}

/// Writes one translated stream's chat-completion chunks.
struct ChunkWriter {
    id: String,
    created: i64,
    model: String,
    out: BytesMut,
    /// The stream ended (`[DONE]`, or an error event): nothing more is written.
    finished: bool,
    /// The choices whose role went out (in each one's first chunk, as OpenAI sends it).
    started: Vec<u64>,
}

impl ChunkWriter {
    fn new(model: &str) -> Self {
        ChunkWriter {
            id: completion_id(None),
            created: chrono::Utc::now().timestamp(),
            model: model.to_owned(),
            out: BytesMut::new(),
            finished: false,
            started: Vec::new(),
        }
    }

    /// A chunk of choice `index` carrying `delta` (and the role, in that choice's first).
    fn delta(&mut self, index: u64, mut delta: Value, finish: Option<&str>) {
        if !self.started.contains(&index) {
            self.started.push(index);
            if let Value::Object(delta) = &mut delta {
                delta.insert("role".into(), "assistant".into());
            }
        }
        let choice = json!({"index": index, "delta": delta, "logprobs": null,
                            "finish_reason": finish});
        self.chunk(vec![choice], None);
    }

    fn chunk(&mut self, choices: Vec<Value>, usage: Option<Usage>) {
        let mut chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage.to_json();
        }
        self.data(&chunk.to_string());
    }

    /// The stream's normal end: the usage chunk (which the relay removes when the client did
    /// not ask for it) and `[DONE]`.
    fn done(&mut self, usage: Usage) {
        self.chunk(Vec::new(), Some(usage));
        self.data("[DONE]");
        self.finished = true;
    }

    /// An error event in OpenAI's stream shape, which ends the stream.
    fn error(&mut self, message: &str, kind: &str, code: Option<&str>) {
        let event = json!({"error": {"message": message, "type": kind, "code": code}});
        self.data(&event.to_string());
        self.finished = true;
    }

    fn data(&mut self, data: &str) {
        self.out.extend_from_slice(b"data: ");
        self.out.extend_from_slice(data.as_bytes());
        self.out.extend_from_slice(b"\n\n");
    }

    fn take(&mut self) -> Bytes {
        self.out.split().freeze()
    }
}

/// A completion id: the provider's, or a new one.
fn completion_id(provider_id: Option<&str>) -> String {
    match provider_id {
        Some(id) if !id.is_empty() => format!("chatcmpl-{id}"),
        _ => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
    }
}

/// A whole chat completion naming `model`, in OpenAI's shape.
fn completion(id: Option<&str>, model: &str, choices: Vec<Value>, usage: Option<Usage>) -> Value {
    let mut out = json!({
        "id": completion_id(id), "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(), "model": model, "choices": choices,
    });
    if let Some(usage) = usage {
        out["usage"] = usage.to_json();
    }
    out
}

/// One choice of a whole completion.
fn choice(
    index: u64,
    text: Option<String>,
    reasoning: String,
    tool_calls: Vec<Value>,
    finish: &str,
) -> Value {
    let mut message = json!({"role": "assistant", "content": text});
    // Where OpenAI-compatible servers that show reasoning put it, as the chunks do.
    if !reasoning.is_empty() {
        message["reasoning_content"] = Value::String(reasoning);
    }
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    json!({"index": index, "message": message, "logprobs": null, "finish_reason": finish})
}

/// An OpenAI tool call.
fn tool_call(id: &str, name: &str, arguments: String) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// The text of an OpenAI message's `content`: a string, or the `text` of its text parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// What a media part of a user message carries: data inline (a `data:` URL's media type and
/// base64, a PDF, a recording), or a URL for the provider to fetch.
enum Media<'a> {
    Inline { media_type: &'a str, data: &'a str },
    Url(&'a str),
}

/// A `data:` URL as its media type and base64 data; another URL as itself.
fn media_of_url<'a>(url: &'a str, what: &str) -> Result<Media<'a>, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Ok(Media::Url(url));
    };
    let (media_type, data) = rest
        .split_once(";base64,")
        .ok_or_else(|| ApiError::invalid(format!("{what} `data:` URL must be base64")))?;
    Ok(Media::Inline { media_type, data })
}

/// An `image_url` part's image.
fn image_of(part: &Value) -> Result<Media<'_>, ApiError> {
    let url = part
        .pointer("/image_url/url")
        .or_else(|| part.get("image_url"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("an `image_url` part must have a `url`"))?;
    media_of_url(url, "an image")
}

/// A `file` part's file, sent inline as `file_data` (a `data:` URL). A `file_id` names a file
/// kept by OpenAI, which no other provider can read.
fn file_of<'a>(part: &'a Value, provider: &str) -> Result<Media<'a>, ApiError> {
    if let Some(data) = part.pointer("/file/file_data").and_then(Value::as_str) {
        return match media_of_url(data, "a file's")? {
            inline @ Media::Inline { .. } => Ok(inline),
            Media::Url(_) => Err(ApiError::invalid(
                "a file's `file_data` must be a `data:` URL of its base64 content",
            )),
        };
    }
    Err(ApiError::invalid(format!(
        "a `file` part must carry its content in `file_data` for {provider}: a `file_id` names \
         a file kept by OpenAI"
    )))
}

/// An `input_audio` part's recording (`wav` or `mp3`, base64).
fn audio_of(part: &Value) -> Result<Media<'_>, ApiError> {
    let data = part.pointer("/input_audio/data").and_then(Value::as_str);
    let format = part.pointer("/input_audio/format").and_then(Value::as_str);
    let media_type = match format {
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mp3",
        _ => {
            return Err(ApiError::invalid(
                "an `input_audio` part's `format` must be `wav` or `mp3`",
            ))
        }
    };
    let data = data.ok_or_else(|| ApiError::invalid("an `input_audio` part must have `data`"))?;
    Ok(Media::Inline { media_type, data })
}

/// A user message's content as a provider's parts, made by `text` (from the text) and `media`
/// (from an image, a file or a recording, which it may refuse); empty text parts are left out,
/// as the providers refuse them, and part types no provider takes are refused.
fn user_parts(
    content: Option<&Value>,
    provider: &str,
    text: impl Fn(&Value) -> Value,
    media: impl Fn(Media<'_>) -> Result<Value, ApiError>,
) -> Result<Vec<Value>, ApiError> {
    let parts = match content {
        Some(Value::String(said)) if said.is_empty() => return Ok(Vec::new()),
        Some(said @ Value::String(_)) => return Ok(vec![text(said)]),
        Some(Value::Array(parts)) => parts,
        _ => return Ok(Vec::new()),
    };
    let said = |part: &Value| part.get("text").is_none_or(|t| t != "");
    parts
        .iter()
        .filter(|part| part.get("type").and_then(Value::as_str) != Some("text") || said(part))
        .map(|part| match part.get("type").and_then(Value::as_str) {
            Some("text") => Ok(text(part.get("text").unwrap_or(&Value::Null))),
            Some("image_url") => media(image_of(part)?),
            Some("file") => media(file_of(part, provider)?),
            Some("input_audio") => media(audio_of(part)?),
            other => Err(ApiError::invalid(format!(
                "content parts of type `{}` cannot be sent to {provider}",
                other.unwrap_or("(none)")
            ))),
        })
        .collect()
}

/// A message role neither provider's API has.
fn unknown_role(role: &str, provider: &str) -> ApiError {
    ApiError::invalid(format!(
        "messages of role `{role}` cannot be sent to {provider}"
    ))
}

/// A conversation as a provider's alternating turns: one role's consecutive messages (a
/// user's question after a tool's result, say) make one turn.
#[derive(Default)]
struct Turns(Vec<(&'static str, Vec<Value>)>);

impl Turns {
    fn push(&mut self, role: &'static str, items: Vec<Value>) {
        if items.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some((last, previous)) if *last == role => previous.extend(items),
            _ => self.0.push((role, items)),
        }
    }

    /// The turns as `{"role": …, <items>: […]}` objects.
    fn into_json(self, items: &str) -> Vec<Value> {
        self.0
            .into_iter()
            .map(|(role, list)| {
                let mut turn = json!({ "role": role });
                turn[items] = Value::Array(list);
                turn
            })
            .collect()
    }
}

/// `stop` as a list: a string or an array of strings.
fn stop_sequences(chat: &Map<String, Value>) -> Option<Value> {
    match chat.get("stop")? {
        Value::String(stop) => Some(json!([stop])),
        Value::Array(stops) if !stops.is_empty() => Some(Value::Array(stops.clone())),
        _ => None,
    }
}

/// The thinking tokens a chat's `reasoning_effort` asks for: `Some(0)` for `none`, `None` when
/// it names no effort. `low`, `medium` and `high` are 1,024, 2,048 and 4,096 tokens, as other
/// gateways map them; `minimal` is `least`, the smallest budget the provider takes.
fn reasoning_budget(chat: &Map<String, Value>, least: u64) -> Result<Option<u64>, ApiError> {
    let effort = match chat.get("reasoning_effort") {
        None | Some(Value::Null) => return Ok(None),
        Some(effort) => effort.as_str(),
    };
    let budget = match effort {
        Some("none") => 0,
        Some("minimal") => least,
        Some("low") => 1024,
        Some("medium") => 2048,
        Some("high") => 4096,
        _ => {
            return Err(ApiError::invalid(
                "`reasoning_effort` must be one of none, minimal, low, medium or high",
            ))
        }
    };
    Ok(Some(budget))
}

/// The output cap a chat names: `max_completion_tokens`, or the older `max_tokens`.
fn max_tokens(chat: &Map<String, Value>) -> Option<u64> {
    chat.get("max_completion_tokens")
        .or_else(|| chat.get("max_tokens"))
        .and_then(Value::as_u64)
}

/// A tool call's arguments (a JSON string in OpenAI's API) as the object both providers take.
fn arguments_object(arguments: Option<&Value>) -> Value {
    match arguments {
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(object @ Value::Object(_)) => object,
            _ => json!({}),
        },
        Some(object @ Value::Object(_)) => object.clone(),
        _ => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_errors_take_openais_shape() {
        let anthropic = json!({"type": "error", "error": {"type": "invalid_request_error",
                               "message": "max_tokens: too large"}});
        let out = error_body(Provider::Anthropic, StatusCode::BAD_REQUEST, &anthropic).unwrap();
        assert_eq!(out["error"]["message"], "max_tokens: too large");
        assert_eq!(out["error"]["type"], "invalid_request_error");
        let gemini = json!({"error": {"code": 404, "message": "models/x is not found",
                            "status": "NOT_FOUND"}});
        let out = error_body(Provider::Gemini, StatusCode::NOT_FOUND, &gemini).unwrap();
        assert_eq!(out["error"]["type"], "not_found_error");
        assert_eq!(out["error"]["code"], "not_found");
    }

    #[tokio::test]
    async fn streams_end_with_usage_and_done_only_when_whole() {
        let upstream = |chunks: Vec<&'static str>| {
            futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, PayloadError>(Bytes::from_static(c.as_bytes()))),
            )
        };
        async fn collect(
            provider: Provider,
            chunks: impl Stream<Item = Result<Bytes, PayloadError>> + Unpin,
        ) -> String {
            let out: Vec<Bytes> = events(provider, chunks, "asked")
                .map(|c| c.unwrap())
                .collect()
                .await;
            String::from_utf8(out.concat()).unwrap()
        }
        let whole = collect(
            Provider::Gemini,
            upstream(vec![
                "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]}}]}\r\n\r\n",
                "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"!\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":2}}\r\n\r\n",
            ]),
        )
        .await;
        assert!(whole.contains("\"content\":\"Hi\""), "{whole}");
        assert!(whole.contains("\"finish_reason\":\"stop\""), "{whole}");
        assert!(whole.contains("\"prompt_tokens\":3"), "{whole}");
        assert!(whole.ends_with("data: [DONE]\n\n"), "{whole}");
        let cut = collect(
            Provider::Gemini,
            upstream(vec![
                "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]}}]}\r\n\r\n",
            ]),
        )
        .await;
        assert!(!cut.contains("[DONE]"), "{cut}");
    }
}
