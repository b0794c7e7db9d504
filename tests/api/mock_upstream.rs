//! A mock OpenAI-compatible provider: a real HTTP server whose behaviour is chosen by the
//! upstream secret's prefix, and which records every call it receives.
//!
//! | secret prefix | answer |
//! | --- | --- |
//! | `ok` | 200: a chat completion (or an SSE stream when `stream: true`) |
//! | `r429` | 429 with `Retry-After: 7` |
//! | `r500` | 500 |
//! | `lagfail` | waits 300 ms, then 500 |
//! | `toolarge` | 429 "Request too large" (`type: tokens`), a call over the key's TPM on its own |
//! | `r401` | 401 |
//! | `once401` | 401 to its first call, then like `ok` (a refusal the provider lifts) |
//! | `html` | 404 with an HTML page, as a proxy in front of a provider answers a wrong path |
//! | `plain` | 422 with a plain-text error, as some self-hosted servers answer |
//! | `lists` | like `ok`, and `GET /models` lists `llama-3-8b` and `qwen2` (others answer it like `ok`, with no list) |
//! | `store` | `/responses` answers (JSON or stream) with ids `resp_<secret>_<n>`, and 400 `previous_response_not_found` for a `previous_response_id` another secret created (as OpenAI keeps responses per project) |
//! | `waf403` | 403 with an HTML page, as a firewall in front of a provider refuses a call |
//! | `r402` | 402, an account out of credit (as DeepSeek and OpenRouter answer) |
//! | `quota` | 429 `insufficient_quota`, without `Retry-After` (as OpenAI answers) |
//! | `noaccess` | like `ok`, but 403 `model_not_found` for `locked-model` (on `/v1/messages`, Anthropic's 403 `permission_error`) |
//! | `r400` | 400 with a provider error body (the caller's fault) |
//! | `slow` | waits 3 s, then answers like `ok` |
//! | `cut` | like `ok`, but a `/responses` stream ends before its `response.completed` |
//! | `long` | like `ok`, but a `/responses` stream of 5 MiB, and a 100 KiB last event; a `/responses` JSON answer of 5 MiB, its `usage` followed by `user` and `metadata` as OpenAI orders them |
//! | `stall` | 200, then (streams: a whole first event and) half a line, then 30 s of silence |
//! | `stall-sized` | as `stall`, a JSON answer declaring a `content-length` of 200 |
//! | `chunked` | like `ok`, the JSON answer sent without a length, in pieces (`chunked-big`: its content 100 KiB) |
//! | `short` | 200, a JSON answer declaring a `content-length` of 200 that sends 25 bytes and closes |
//! | `drip` | streams 50 chunks, 100 ms apart; counts streams cut before their end |
//! | `tokens` | like `ok`, reporting 100 prompt and 500 completion tokens |
//! | `usage` | like `ok`, reporting 1000 prompt tokens (400 cached) and 200 completion tokens (50 of them reasoning) |
//! | `leading` | like `usage`, with `usage` first in the answer and a `usage` key of another object last |
//!
//! Anthropic's `/v1/messages` (the secret in `x-api-key`) answers a message, or its event
//! stream, reporting 25 input tokens, 5 more read from the cache and 7 output tokens (`cut`:
//! the stream stops after its text, before `message_delta`). Gemini's
//! `/v1beta/models/{model}:generateContent` and `:streamGenerateContent` (the secret in
//! `x-goog-api-key`) answer candidates with `modelVersion` set to the path's model, reporting
//! 12 prompt (2 cached), 6 candidate and 4 thought tokens; streams as events with `alt=sse`,
//! else as one JSON array (`cut`: an event stream without its finishing event); `badkey`
//! answers Gemini's 400 `API_KEY_INVALID`. Asked with tools,
//! both call the first one with `{"city": "Oslo"}`; `r400` answers in the shape of the
//! provider whose API was called. Both refuse what the real ones refuse: Anthropic thinking
//! with a forced tool or an unsigned tool-call turn, `temperature` with `top_p`, above 1, or
//! with thinking; Gemini `additionalProperties` in a tool's OpenAPI `parameters`. Gemini
//! blocks a prompt that says `forbidden` (no candidates, `promptFeedback.blockReason`).
//!
//! Embeddings report 8 prompt tokens; images answer `n` images (2 MiB each as `b64_json`);
//! speech answers audio bytes;
//! transcriptions report 30 seconds of audio (in `response_format=text`, the transcript alone).
//!
//! Two raw TCP providers beside it: `start_breaking_upstream` (every stream breaks after one
//! event, every other answer after the first bytes of its JSON) and `start_closing_upstream`
//! (every connection answers one call, then closes as the next one arrives on it).

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::web::{Bytes, Data};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};

/// One call the mock received.
#[derive(Debug, Clone)]
pub struct Received {
    pub secret: String,
    pub path: String,
    pub query: String,
    /// The `anthropic-version` header, when sent.
    pub anthropic_version: Option<String>,
    pub body: Value,
    pub raw: Bytes,
    pub content_type: String,
}

/// A running mock provider.
#[derive(Clone)]
pub struct MockUpstream {
    pub base_url: String,
    calls: Arc<Mutex<Vec<Received>>>,
    cut_streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl MockUpstream {
    /// Starts the mock on a random port.
    pub fn start() -> MockUpstream {
        let calls: Arc<Mutex<Vec<Received>>> = Arc::default();
        let cut_streams: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let shared = Data::new(calls.clone());
        let cut = Data::new(cut_streams.clone());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(cut.clone())
                .default_service(web::to(handle))
        })
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        actix_web::rt::spawn(server);
        MockUpstream {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            calls,
            cut_streams,
        }
    }

    /// Every call received so far.
    pub fn calls(&self) -> Vec<Received> {
        self.calls.lock().unwrap().clone()
    }

    /// How many `drip` streams ended early because the other side went away.
    pub fn cut_streams(&self) -> usize {
        self.cut_streams.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many calls used `secret`.
    pub fn calls_with(&self, secret: &str) -> usize {
        self.calls().iter().filter(|c| c.secret == secret).count()
    }
}

/// Counts a drip stream as cut when it is dropped before its last chunk.
struct DripGuard {
    sent: usize,
    cut: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for DripGuard {
    fn drop(&mut self) {
        if self.sent < DRIP_CHUNKS {
            self.cut.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

const DRIP_CHUNKS: usize = 50;

async fn handle(
    req: HttpRequest,
    body: Bytes,
    calls: Data<Arc<Mutex<Vec<Received>>>>,
    cut: Data<Arc<std::sync::atomic::AtomicUsize>>,
) -> HttpResponse {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // Each provider's own header: OpenAI's bearer token, Anthropic's and Gemini's key headers.
    let secret = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
        .or_else(|| header("x-api-key"))
        .or_else(|| header("x-goog-api-key"))
        .unwrap_or_default();
    let raw = body;
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (first_with_secret, call_number) = {
        let mut calls = calls.lock().unwrap();
        calls.push(Received {
            secret: secret.clone(),
            path: req.path().to_owned(),
            query: req.query_string().to_owned(),
            anthropic_version: header("anthropic-version"),
            body: body.clone(),
            raw: raw.clone(),
            content_type,
        });
        let first = calls.iter().filter(|c| c.secret == secret).count() == 1;
        (first, calls.len())
    };
    if secret.starts_with("waf403") {
        return HttpResponse::Forbidden()
            .content_type("text/html")
            .body("<html><body>Request blocked</body></html>");
    }
    if secret.starts_with("r402") {
        return HttpResponse::PaymentRequired().json(
            json!({"error": {"message": "Insufficient Balance", "code": "insufficient_balance"}}),
        );
    }
    if secret.starts_with("quota") {
        return HttpResponse::TooManyRequests().json(json!({"error": {
            "message": "You exceeded your current quota", "type": "insufficient_quota",
            "code": "insufficient_quota"}}));
    }
    if secret.starts_with("lists") && req.path().ends_with("/models") {
        return HttpResponse::Ok().json(json!({"object": "list", "data": [
            {"id": "llama-3-8b", "object": "model"}, {"id": "qwen2", "object": "model"}]}));
    }
    if secret.starts_with("plain") {
        return HttpResponse::UnprocessableEntity()
            .content_type("text/plain")
            .body("model 'm' does not support\n  tools");
    }
    if secret.starts_with("html") {
        return HttpResponse::NotFound()
            .content_type("text/html; charset=utf-8")
            .body("<html><body><h1>404 Not Found</h1></body></html>");
    }
    if secret.starts_with("once401") && first_with_secret {
        return HttpResponse::Unauthorized()
            .json(json!({"error": {"message": "bad key", "code": "invalid_api_key"}}));
    }
    if req.path().ends_with("/audio/transcriptions") {
        // `response_format=text`: the transcript alone, as OpenAI sends it.
        if memchr::memmem::find(&raw, b"name=\"response_format\"\r\n\r\ntext\r\n").is_some() {
            return HttpResponse::Ok()
                .content_type("text/plain; charset=utf-8")
                .body("hello from the mock\n");
        }
        return HttpResponse::Ok().json(
            json!({"text": "hello from the mock", "usage": {"type": "duration", "seconds": 30}}),
        );
    }
    if req.path().ends_with("/embeddings") {
        return HttpResponse::Ok().json(json!({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }));
    }
    if req.path().ends_with("/images/generations") {
        let n = body["n"].as_u64().unwrap_or(1);
        // As base64 when asked: 2 MiB an image, so a few outgrow what metering keeps whole.
        let base64 = body["response_format"] == "b64_json";
        let data: Vec<Value> = (0..n)
            .map(|i| match base64 {
                true => json!({"b64_json": "A".repeat(2 * 1024 * 1024)}),
                false => json!({"url": format!("https://images.example/{i}.png")}),
            })
            .collect();
        return HttpResponse::Ok().json(json!({"created": 1, "data": data}));
    }
    if req.path().ends_with("/audio/speech") {
        return HttpResponse::Ok()
            .content_type("audio/mpeg")
            .body(vec![0xffu8; 4096]);
    }
    let model = body["model"].as_str().unwrap_or("none").to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    if secret.starts_with("r429") {
        return HttpResponse::TooManyRequests()
            .insert_header(("retry-after", "7"))
            .json(json!({"error": {"message": "rate limited", "type": "requests"}}));
    }
    if secret.starts_with("r500") {
        return HttpResponse::InternalServerError().json(json!({"error": {"message": "boom"}}));
    }
    if secret.starts_with("lagfail") {
        tokio::time::sleep(Duration::from_millis(300)).await;
        return HttpResponse::InternalServerError().json(json!({"error": {"message": "boom"}}));
    }
    if secret.starts_with("toolarge") {
        // As OpenAI answers a call over the key's tokens-per-minute limit on its own.
        return HttpResponse::TooManyRequests().json(json!({"error": {
            "message": "Request too large for gpt-4o in organization org-mock on tokens per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced in order to run successfully.",
            "type": "tokens", "param": null, "code": "rate_limit_exceeded"}}));
    }
    if secret.starts_with("noaccess") && model == "locked-model" && req.path() == "/v1/messages" {
        // As Anthropic answers a key without access to what the call asks for.
        return HttpResponse::Forbidden().json(json!({"type": "error", "error": {
            "type": "permission_error",
            "message": "Your API key does not have permission to use the specified resource."}}));
    }
    if secret.starts_with("noaccess") && model == "locked-model" {
        // As OpenAI answers a project that may not use a model.
        return HttpResponse::Forbidden().json(json!({"error": {
            "message": "Project `proj_mock` does not have access to model `locked-model`",
            "type": "invalid_request_error", "param": null, "code": "model_not_found"}}));
    }
    if secret.starts_with("r401") {
        return HttpResponse::Unauthorized()
            .json(json!({"error": {"message": "bad key", "code": "invalid_api_key"}}));
    }
    if secret.starts_with("r400") {
        // In the shape of the provider whose API was called.
        return HttpResponse::BadRequest().json(match req.path() {
            "/v1/messages" => json!({"type": "error", "error": {
                "type": "invalid_request_error", "message": "max_tokens: 9999999 is too large"}}),
            path if path.starts_with("/v1beta/") => json!({"error": {"code": 400,
                "message": "maxOutputTokens is too large", "status": "INVALID_ARGUMENT"}}),
            _ => json!({"error": {"message": "max_tokens is too large",
                "type": "invalid_request_error", "param": "max_tokens", "code": null}}),
        });
    }
    // Asked with tools, both providers call the first one.
    let tool = body["tools"][0]["name"]
        .as_str()
        .or(body["tools"][0]["functionDeclarations"][0]["name"].as_str())
        .map(str::to_owned);
    if req.path() == "/v1/messages" {
        if let Some(refusal) =
            anthropic_thinking_refusal(&body).or_else(|| anthropic_sampling_refusal(&body))
        {
            return refusal;
        }
        let thinking = body["thinking"]["type"] == "enabled";
        // A forced tool is called at once, with no words before it.
        let forced = body["tool_choice"]["type"] == "tool";
        let tool = match body["tool_choice"]["name"].as_str() {
            Some(named) if forced => Some(named.to_owned()),
            _ => tool,
        };
        return anthropic_message(
            &model,
            stream,
            secret.starts_with("cut"),
            tool.as_deref().map(|name| (name, forced)),
            thinking,
        );
    }
    if let Some(target) = req.path().strip_prefix("/v1beta/models/") {
        if secret.starts_with("badkey") {
            return HttpResponse::BadRequest().json(json!({"error": {
                "code": 400, "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT", "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}));
        }
        let (model, method) = target.rsplit_once(':').unwrap_or((target, ""));
        let sse = req.query_string().split('&').any(|p| p == "alt=sse");
        if let Some(refusal) = gemini_schema_refusal(&body) {
            return refusal;
        }
        if body["contents"].to_string().contains("forbidden") {
            return gemini_blocked(method == "streamGenerateContent", sse);
        }
        let mut answer = gemini_answer(
            model,
            method == "streamGenerateContent",
            sse,
            tool.as_deref(),
        );
        // `cut…`: an event stream that stops before its finishing event.
        if secret.starts_with("cut") && sse {
            answer = HttpResponse::Ok()
                .content_type("text/event-stream")
                .body("data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hel\"}],\"role\":\"model\"},\"index\":0}]}\r\n\r\n");
        }
        return answer;
    }
    if secret.starts_with("drip") {
        let guard = DripGuard {
            sent: 0,
            cut: cut.get_ref().clone(),
        };
        let body = stream::unfold(guard, move |mut guard| {
            let model = model.clone();
            async move {
                if guard.sent == DRIP_CHUNKS {
                    return None;
                }
                if guard.sent > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                guard.sent += 1;
                Some((
                    Ok::<_, std::io::Error>(sse(&chunk(&model, "x", None))),
                    guard,
                ))
            }
        });
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .streaming(body);
    }
    let stored = secret.starts_with("store");
    let response_id = match stored {
        true => format!("resp_{secret}_{call_number}"),
        false => "resp-mock".to_owned(),
    };
    if stored && req.path().ends_with("/responses") {
        if let Some(previous) = body["previous_response_id"].as_str() {
            if !previous.starts_with(&format!("resp_{secret}_")) {
                return HttpResponse::BadRequest().json(json!({"error": {
                    "message": format!("Previous response with id '{previous}' not found."),
                    "type": "invalid_request_error", "param": "previous_response_id",
                    "code": "previous_response_not_found"}}));
            }
        }
        if !stream {
            return HttpResponse::Ok().json(json!({
                "id": response_id, "object": "response", "model": model, "status": "completed",
                "output": [{"id": "msg_1", "type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hello"}]}],
                "usage": {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11},
            }));
        }
    }
    if req.path().ends_with("/responses") && !stream && secret.starts_with("long") {
        let text = "x".repeat(5 * 1024 * 1024);
        let body = format!(
            r#"{{"id":"{response_id}","object":"response","model":"{model}","status":"completed","output":[{{"type":"message","role":"assistant","content":[{{"type":"output_text","text":"{text}"}}]}}],"usage":{{"input_tokens":9,"output_tokens":2,"total_tokens":11}},"user":null,"metadata":{{}}}}"#
        );
        return HttpResponse::Ok()
            .content_type("application/json")
            .body(body);
    }
    if req.path().ends_with("/responses") && stream {
        // A Responses API stream: events named by type, the model inside each `response`.
        let response = |status: &str| {
            json!({"id": response_id, "object": "response", "model": model, "status": status,
                   "error": null})
        };
        let mut completed = response("completed");
        completed["usage"] = json!({"input_tokens": 9, "output_tokens": 2, "total_tokens": 11});
        let mut events = vec![
            json!({"type": "response.created", "response": response("in_progress")}),
            json!({"type": "response.output_text.delta", "delta": "Hello"}),
        ];
        // `long…` keys stream 5 MiB of text, which the last event repeats (100 KiB of it).
        if secret.starts_with("long") {
            let text = "x".repeat(64 * 1024);
            for _ in 0..80 {
                events.push(json!({"type": "response.output_text.delta", "delta": text}));
            }
            completed["output_text"] = json!("y".repeat(100 * 1024));
        }
        events.push(json!({"type": "response.completed", "response": completed}));
        // `cut…` keys end the stream before its last event, as a dropped connection would.
        if secret.starts_with("cut") {
            events.pop();
        }
        return typed_events(&events);
    }
    if secret.starts_with("stall") {
        // A whole first event (streams only), half of the next line, then silence past the
        // router's idle timeout.
        let (content_type, sent) = if stream {
            let mut sent = sse(&chunk(&model, "Hel", None)).to_vec();
            sent.extend_from_slice(b"data: {\"id\":\"chatcmpl-mock\",\"cho");
            ("text/event-stream", sent)
        } else {
            (
                "application/json",
                b"{\"id\":\"chatcmpl-mock\",\"mo".to_vec(),
            )
        };
        let silence = stream::once(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, std::io::Error>(Bytes::new())
        });
        let body = stream::once(async move { Ok(Bytes::from(sent)) }).chain(silence);
        let mut response = HttpResponse::Ok();
        response.content_type(content_type);
        // `stall-sized…`: the answer declares its length (200 bytes) and sends 25 of them.
        if secret.starts_with("stall-sized") && !stream {
            return response.body(actix_web::body::SizedStream::new(200, body));
        }
        return response.streaming(body);
    }
    if secret.starts_with("short") {
        // Declares 200 bytes, sends 25 and closes: a connection lost in the middle of a body.
        let sent = Bytes::from_static(b"{\"id\":\"chatcmpl-mock\",\"mo");
        let body = stream::once(async move { Ok::<_, std::io::Error>(sent) });
        return HttpResponse::Ok()
            .content_type("application/json")
            .body(actix_web::body::SizedStream::new(200, body));
    }
    if secret.starts_with("slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // `tokens…` keys report a large usage (100 in, 500 out), others a small one (5 in, 1 out).
    let (prompt, completion) = if secret.starts_with("tokens") {
        (100, 500)
    } else {
        (5, 1)
    };
    let usage = if secret.starts_with("usage") || secret.starts_with("leading") {
        json!({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
               "prompt_tokens_details": {"cached_tokens": 400},
               "completion_tokens_details": {"reasoning_tokens": 50}})
    } else {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    };
    if stream {
        // As OpenAI does: with usage asked for, every other chunk carries `"usage": null`.
        let include_usage = body["stream_options"]["include_usage"] == json!(true);
        let event = |content: &str, finish: Option<&str>| {
            let mut event = chunk(&model, content, finish);
            if include_usage {
                event["usage"] = Value::Null;
            }
            Ok(sse(&event))
        };
        let mut chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            event("Hel", None),
            event("lo", None),
            event("", Some("stop")),
        ];
        if include_usage {
            chunks.push(Ok(sse(&json!({
                "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1,
                "model": model, "choices": [], "usage": usage,
            }))));
        }
        chunks.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .streaming(stream::iter(chunks));
    }
    if secret.starts_with("leading") {
        // Written by hand: `json!` orders keys, which would put `usage` last.
        let choice = json!({"index": 0, "message": {"role": "assistant", "content": "Hello"},
            "finish_reason": "stop", "extra": {"usage": {"prompt_tokens": 999_999}}});
        return HttpResponse::Ok().content_type("application/json").body(format!(
            r#"{{"usage":{usage},"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":{model},"choices":[{choice}]}}"#,
            model = Value::String(model),
        ));
    }
    let content = match secret.starts_with("chunked-big") {
        true => "x".repeat(100 * 1024),
        false => "Hello".to_owned(),
    };
    let answer = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage,
    });
    if secret.starts_with("chunked") {
        // Without a length, in pieces, as Go servers send bodies of more than a few KiB.
        let text = answer.to_string().into_bytes();
        let pieces: Vec<Result<Bytes, std::io::Error>> = text
            .chunks(16 * 1024)
            .map(|piece| Ok(Bytes::copy_from_slice(piece)))
            .collect();
        return HttpResponse::Ok()
            .content_type("application/json")
            .streaming(stream::iter(pieces));
    }
    HttpResponse::Ok().json(answer)
}

/// Anthropic's 400s for thinking it cannot do: with a forced tool choice, and in a tool-use
/// cycle whose last assistant turn does not start with its thinking block.
fn anthropic_thinking_refusal(body: &Value) -> Option<HttpResponse> {
    if body["thinking"]["type"] != "enabled" {
        return None;
    }
    let refuse = |message: &str| {
        HttpResponse::BadRequest().json(json!({"type": "error", "error": {
            "type": "invalid_request_error", "message": message}}))
    };
    if matches!(body["tool_choice"]["type"].as_str(), Some("any" | "tool")) {
        return Some(refuse(
            "Thinking may not be enabled when tool_choice forces tool use.",
        ));
    }
    let messages = body["messages"].as_array()?;
    let last = messages.iter().rposition(|m| m["role"] == "assistant")?;
    let blocks = messages[last]["content"].as_array()?;
    let calls = blocks.iter().any(|b| b["type"] == "tool_use");
    let starts_thinking = matches!(
        blocks.first().and_then(|b| b["type"].as_str()),
        Some("thinking" | "redacted_thinking")
    );
    (calls && !starts_thinking).then(|| {
        refuse(&format!(
            "messages.{last}.content.0.type: Expected `thinking` or `redacted_thinking`, but \
             found `tool_use`. When `thinking` is enabled, a final `assistant` message must \
             start with a thinking block."
        ))
    })
}

/// Anthropic's refusals of sampling options: recent Claude models take `temperature` or
/// `top_p`, not both; `temperature` goes up to 1; thinking takes neither changed.
fn anthropic_sampling_refusal(body: &Value) -> Option<HttpResponse> {
    let refuse = |message: &str| {
        Some(
            HttpResponse::BadRequest().json(json!({"type": "error", "error": {
            "type": "invalid_request_error", "message": message}})),
        )
    };
    let temperature = body.get("temperature").and_then(Value::as_f64);
    if temperature.is_some() && body.get("top_p").is_some() {
        return refuse("`temperature` and `top_p` cannot both be specified for this model. Please use only one.");
    }
    if temperature.is_some_and(|t| t > 1.0) {
        return refuse("temperature: range: 0..1");
    }
    if body["thinking"]["type"] == "enabled" && temperature.is_some_and(|t| t != 1.0) {
        return refuse("`temperature` may only be set to 1 when thinking is enabled.");
    }
    None
}

/// Gemini's refusal of JSON Schema keys in a tool's OpenAPI `parameters`.
fn gemini_schema_refusal(body: &Value) -> Option<HttpResponse> {
    let declarations = body["tools"][0]["functionDeclarations"].as_array()?;
    let strict = declarations
        .iter()
        .any(|d| d["parameters"].to_string().contains("additionalProperties"));
    strict.then(|| {
        HttpResponse::BadRequest().json(json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "Invalid JSON payload received. Unknown name \"additionalProperties\" at \
                        'tools[0].function_declarations[0].parameters': Cannot find field."}}))
    })
}

/// Gemini's answer to a prompt it blocked: no candidates, the reason, the prompt's usage.
fn gemini_blocked(stream: bool, sse: bool) -> HttpResponse {
    let answer = json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}});
    match (stream, sse) {
        (false, _) => HttpResponse::Ok().json(answer),
        (true, true) => HttpResponse::Ok()
            .content_type("text/event-stream")
            .body(format!("data: {answer}\r\n\r\n")),
        (true, false) => HttpResponse::Ok().json(json!([answer])),
    }
}

/// The mock's thinking before a tool call, and the signature Anthropic would give it.
const MOCK_THOUGHT: &str = "Oslo it is.";
pub const MOCK_THOUGHT_SIGNATURE: &str = "c2lnLW1vY2s=";

/// An Anthropic Messages answer, or its event stream (`cut`: without its end); asked with a
/// tool, a call of it (after a signed thinking block, with `thinking`).
fn anthropic_message(
    model: &str,
    stream: bool,
    cut: bool,
    tool: Option<(&str, bool)>,
    thinking: bool,
) -> HttpResponse {
    let usage = json!({"input_tokens": 25, "output_tokens": 7,
                       "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0});
    if let Some((tool, forced)) = tool {
        return anthropic_tool_call(model, stream, tool, usage, thinking, forced);
    }
    if !stream {
        return HttpResponse::Ok().json(json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
            "stop_sequence": null, "usage": usage,
        }));
    }
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut events = vec![
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "usage": start_usage}}),
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0,
               "delta": {"type": "text_delta", "text": "Hello there, how are you"}}),
    ];
    if !cut {
        events.push(json!({"type": "content_block_stop", "index": 0}));
        events.push(json!({"type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 7}}));
        events.push(json!({"type": "message_stop"}));
    }
    typed_events(&events)
}

/// A Messages answer calling `tool` with `{"city": "Oslo"}`, whole or streamed; with
/// `thinking`, a signed thinking block comes first; unless `forced`, a few words before it.
fn anthropic_tool_call(
    model: &str,
    stream: bool,
    tool: &str,
    usage: Value,
    thinking: bool,
    forced: bool,
) -> HttpResponse {
    if !stream {
        let mut content = vec![json!({"type": "tool_use", "id": "toolu_mock", "name": tool,
                                      "input": {"city": "Oslo"}})];
        if !forced {
            content.insert(0, json!({"type": "text", "text": "Checking."}));
        }
        if thinking {
            content.insert(
                0,
                json!({"type": "thinking", "thinking": MOCK_THOUGHT,
                       "signature": MOCK_THOUGHT_SIGNATURE}),
            );
        }
        return HttpResponse::Ok().json(json!({
            "id": "msg_tool", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "tool_use", "stop_sequence": null, "usage": usage,
        }));
    }
    let mut events = vec![
        json!({"type": "message_start", "message": {"id": "msg_tool",
        "type": "message", "role": "assistant", "model": model, "content": [], "usage": usage}}),
    ];
    let call = usize::from(thinking);
    if thinking {
        let (text, rest) = MOCK_THOUGHT.split_at(5);
        events.extend([
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "thinking", "thinking": ""}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "thinking_delta", "thinking": text}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "thinking_delta", "thinking": rest}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "signature_delta", "signature": MOCK_THOUGHT_SIGNATURE}}),
            json!({"type": "content_block_stop", "index": 0}),
        ]);
    }
    events.extend([
        json!({"type": "content_block_start", "index": call, "content_block":
            {"type": "tool_use", "id": "toolu_mock", "name": tool, "input": {}}}),
        json!({"type": "content_block_delta", "index": call,
               "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
        json!({"type": "content_block_delta", "index": call,
               "delta": {"type": "input_json_delta", "partial_json": "\"Oslo\"}"}}),
        json!({"type": "content_block_stop", "index": call}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
               "usage": {"output_tokens": 7}}),
        json!({"type": "message_stop"}),
    ]);
    typed_events(&events)
}

/// An event stream whose events are named by their `type` (`event: <type>`), as the Responses
/// API and Anthropic send them.
fn typed_events(events: &[Value]) -> HttpResponse {
    let body: Vec<Result<Bytes, std::io::Error>> = events
        .iter()
        .map(|event| {
            let kind = event["type"].as_str().unwrap();
            Ok(Bytes::from(format!("event: {kind}\ndata: {event}\n\n")))
        })
        .collect();
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(stream::iter(body))
}

/// A Gemini answer: one object, or a stream (events with `alt=sse`, else one JSON array) of
/// two, whose running usage ends at the same figures; asked with a tool, the answer's last
/// part calls it with `{"city": "Oslo"}`, signed `bW9jaw==`.
fn gemini_answer(model: &str, stream: bool, sse: bool, tool: Option<&str>) -> HttpResponse {
    let event = |text: &str, candidates: i64, thoughts: i64, finish: Option<&str>| {
        let mut parts = vec![json!({"text": text})];
        if let (Some(tool), Some(_)) = (tool, finish) {
            parts.push(
                json!({"functionCall": {"name": tool, "args": {"city": "Oslo"}},
                              "thoughtSignature": "bW9jaw=="}),
            );
        }
        let mut candidate = json!({"content": {"parts": parts, "role": "model"},
                                   "index": 0});
        if let Some(finish) = finish {
            candidate["finishReason"] = json!(finish);
        }
        json!({"candidates": [candidate], "modelVersion": model, "usageMetadata": {
            "promptTokenCount": 12, "candidatesTokenCount": candidates,
            "thoughtsTokenCount": thoughts, "cachedContentTokenCount": 2,
            "totalTokenCount": 12 + candidates + thoughts}})
    };
    if !stream {
        return HttpResponse::Ok().json(event("Hello", 6, 4, Some("STOP")));
    }
    let events = [event("Hel", 2, 4, None), event("lo", 6, 4, Some("STOP"))];
    let chunks: Vec<Result<Bytes, std::io::Error>> = if sse {
        events
            .iter()
            .map(|e| Ok(Bytes::from(format!("data: {e}\r\n\r\n"))))
            .collect()
    } else {
        vec![
            Ok(Bytes::from(format!("[{},\r\n", events[0]))),
            Ok(Bytes::from(format!("{}]", events[1]))),
        ]
    };
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/json"
    };
    HttpResponse::Ok()
        .content_type(content_type)
        .streaming(stream::iter(chunks))
}

fn chunk(model: &str, content: &str, finish: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    })
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// A provider whose answers break: it answers a stream with the head of a chunked SSE response
/// and one event, speech with the first bytes of chunked audio, any other call with the head of
/// a chunked JSON answer and its first bytes, then closes the connection without ending the body. Returns its base URL.
pub fn start_breaking_upstream() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    actix_web::rt::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 65536];
            let read = socket.read(&mut buf).await.unwrap_or(0);
            let stream = memchr::memmem::find(&buf[..read], b"\"stream\":true").is_some();
            let speech = memchr::memmem::find(&buf[..read], b"/audio/speech").is_some();
            let (content_type, sent) = match stream {
                _ if speech => ("audio/mpeg", "ID3audio".to_owned()),
                true => (
                    "text/event-stream",
                    format!("data: {}\n\n", chunk("m", "Hel", None)),
                ),
                false => (
                    "application/json",
                    r#"{"id":"chatcmpl-cut","model":"m","cho"#.to_owned(),
                ),
            };
            let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n");
            let body = format!("{:x}\r\n{sent}\r\n", sent.len());
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.flush().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(socket);
        }
    });
    format!("http://127.0.0.1:{port}/v1")
}

/// A provider that closes idle keep-alive connections just as a request arrives on them, as a
/// server whose keep-alive timeout is shorter than the client's does now and then: every
/// connection answers its first request with a whole chat completion, then reads the next one
/// and closes without an answer. Returns its base URL and how many requests it dropped so.
pub fn start_closing_upstream() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dropped: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let counter = dropped.clone();
    actix_web::rt::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        while let Ok((mut socket, _)) = listener.accept().await {
            let dropped = counter.clone();
            actix_web::rt::spawn(async move {
                // The first request, head and body.
                let mut request = Vec::new();
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok(n @ 1..) = socket.read(&mut buf).await else {
                        return;
                    };
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text
                            .lines()
                            .find_map(|line| line.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let body = json!({
                    "id": "chatcmpl-closing", "object": "chat.completion", "created": 1,
                    "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "Hello"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                })
                .to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if socket.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                // The next request on this connection is read and never answered.
                if let Ok(1..) = socket.read(&mut buf).await {
                    dropped.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (format!("http://127.0.0.1:{port}/v1"), dropped)
}
