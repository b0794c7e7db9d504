//! OpenAI chat completions in Anthropic's Messages API, and back.

use actix_web::http::header::{HeaderName, HeaderValue, ACCEPT};
use actix_web::web::Bytes;
use serde_json::{json, Map, Value};

use super::{
    arguments_object, choice, completion, content_text, max_tokens, reasoning_budget,
    stop_sequences, tool_call, unknown_role, user_parts, ChunkWriter, Image, Translated, Turns,
    Usage,
};
use crate::error::ApiError;

/// The output cap sent when the chat names none: the Messages API requires one.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The smallest thinking budget the Messages API takes.
const LEAST_THINKING: u64 = 1024;

/// The API version the translation is written for.
const VERSION: &str = "2023-06-01";

pub(super) fn request(
    chat: &Map<String, Value>,
    model: &str,
    stream: bool,
) -> Result<Translated, ApiError> {
    if chat.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(ApiError::invalid(
            "`n` above 1 cannot be sent to Anthropic, which answers one choice",
        ));
    }
    let messages = chat
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("request body must have a `messages` array"))?;
    let mut system: Vec<Value> = Vec::new();
    // The Messages API alternates turns.
    let mut turns = Turns::default();
    for message in messages {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let content = message.get("content");
        let (role, blocks) = match role {
            "system" | "developer" => {
                let text = content_text(content);
                if !text.is_empty() {
                    system.push(json!({"type": "text", "text": text}));
                }
                continue;
            }
            "user" => (
                "user",
                user_parts(content, "Anthropic", text_block, image_block)?,
            ),
            "assistant" => ("assistant", assistant_blocks(message)),
            // A tool's result goes back in a user turn, after the assistant's call.
            "tool" => {
                let id = message.get("tool_call_id").and_then(Value::as_str);
                let id = id.map(super::gemini::unsigned_call_id);
                let result = json!({"type": "tool_result", "tool_use_id": id.unwrap_or(""),
                                    "content": content_text(content)});
                ("user", vec![result])
            }
            other => return Err(unknown_role(other, "Anthropic")),
        };
        turns.push(role, blocks);
    }
    let thinking = reasoning_budget(chat, LEAST_THINKING)?.filter(|budget| *budget > 0);
    // OpenAI's output cap counts the reasoning; Anthropic's thinking budget lies within the cap
    // too. Without a cap, the answer keeps the default beyond the thinking.
    let cap = max_tokens(chat).unwrap_or(DEFAULT_MAX_TOKENS + thinking.unwrap_or(0));
    let mut body = json!({
        "model": model,
        "messages": turns.into_json("content"),
        "max_tokens": cap,
    });
    if let Some(budget) = thinking {
        let budget = budget.min(cap.saturating_sub(1));
        if budget < LEAST_THINKING {
            return Err(ApiError::invalid(format!(
                "`reasoning_effort` on Anthropic needs an output cap above {LEAST_THINKING} \
                 tokens (`max_completion_tokens`): its thinking takes at least {LEAST_THINKING}"
            )));
        }
        body["thinking"] = json!({"type": "enabled", "budget_tokens": budget});
    }
    if !system.is_empty() {
        body["system"] = Value::Array(system);
    }
    for (from, to) in [("temperature", "temperature"), ("top_p", "top_p")] {
        if let Some(value) = chat.get(from).filter(|v| v.is_number()) {
            body[to] = value.clone();
        }
    }
    if let Some(stops) = stop_sequences(chat) {
        body["stop_sequences"] = stops;
    }
    if let Some(user) = chat.get("user").and_then(Value::as_str) {
        body["metadata"] = json!({"user_id": user});
    }
    if stream {
        body["stream"] = Value::Bool(true);
    }
    if let Some(tools) = chat.get("tools").and_then(Value::as_array) {
        body["tools"] = Value::Array(tools.iter().filter_map(tool).collect());
    }
    if let Some(choice) = tool_choice(chat) {
        body["tool_choice"] = choice;
    }
    let mut headers = vec![(
        HeaderName::from_static("anthropic-version"),
        HeaderValue::from_static(VERSION),
    )];
    if stream {
        headers.push((ACCEPT, HeaderValue::from_static("text/event-stream")));
    }
    Ok(Translated {
        path: "/messages".to_owned(),
        body: Bytes::from(body.to_string()),
        headers,
    })
}

fn text_block(text: &Value) -> Value {
    json!({"type": "text", "text": text})
}

/// An image as a Messages block: base64, or by URL.
fn image_block(image: Image<'_>) -> Value {
    match image {
        Image::Inline { media_type, data } => json!({"type": "image", "source":
            {"type": "base64", "media_type": media_type, "data": data}}),
        Image::Url(url) => json!({"type": "image", "source": {"type": "url", "url": url}}),
    }
}

/// An assistant message (text and tool calls) as Messages blocks.
fn assistant_blocks(message: &Value) -> Vec<Value> {
    let mut blocks = Vec::new();
    let text = content_text(message.get("content"));
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    let calls = message.get("tool_calls").and_then(Value::as_array);
    for call in calls.into_iter().flatten() {
        blocks.push(json!({
            "type": "tool_use",
            // A call Gemini made earlier in the chat carries its signature in its id, in
            // characters Anthropic's ids may not hold.
            "id": call.get("id").and_then(Value::as_str).map(super::gemini::unsigned_call_id),
            "name": call.pointer("/function/name"),
            "input": arguments_object(call.pointer("/function/arguments")),
        }));
    }
    blocks
}

/// An OpenAI function tool as an Anthropic tool.
fn tool(tool: &Value) -> Option<Value> {
    let function = tool.get("function")?;
    let mut out = json!({
        "name": function.get("name")?,
        "input_schema": function.get("parameters").cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
    });
    if let Some(description) = function.get("description") {
        out["description"] = description.clone();
    }
    Some(out)
}

/// How the model may use the tools (only with tools: the API refuses a choice without them).
fn tool_choice(chat: &Map<String, Value>) -> Option<Value> {
    chat.get("tools")?
        .as_array()
        .filter(|tools| !tools.is_empty())?;
    let mut choice = match chat.get("tool_choice") {
        Some(Value::String(mode)) => match mode.as_str() {
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            _ => json!({"type": "auto"}),
        },
        Some(Value::Object(named)) => {
            json!({"type": "tool", "name": named.get("function")?.get("name")?})
        }
        _ if chat.get("parallel_tool_calls") == Some(&Value::Bool(false)) => {
            json!({"type": "auto"})
        }
        _ => return None,
    };
    if chat.get("parallel_tool_calls") == Some(&Value::Bool(false)) && choice["type"] != "none" {
        choice["disable_parallel_tool_use"] = Value::Bool(true);
    }
    Some(choice)
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Anthropic's usage in OpenAI's terms: cache reads and writes are part of the prompt.
fn usage(value: &Value, into: &mut Usage) {
    let count = |key: &str| value.get(key).and_then(Value::as_i64);
    let read = count("cache_read_input_tokens");
    if let Some(input) = count("input_tokens") {
        into.prompt = input + read.unwrap_or(0) + count("cache_creation_input_tokens").unwrap_or(0);
        into.cached = read.unwrap_or(0);
    }
    if let Some(output) = count("output_tokens") {
        into.completion = output;
    }
}

/// A whole Messages answer as a chat completion.
pub(super) fn answer(message: &Value, model: &str) -> Option<Value> {
    let blocks = message.get("content")?.as_array()?;
    let mut text = String::new();
    let mut thinking = String::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str)?),
            Some("thinking") => {
                thinking.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or(""))
            }
            Some("tool_use") => calls.push(tool_call(
                block.get("id").and_then(Value::as_str).unwrap_or(""),
                block.get("name").and_then(Value::as_str).unwrap_or(""),
                block.get("input").map(Value::to_string).unwrap_or_default(),
            )),
            _ => {}
        }
    }
    let mut counted = Usage::default();
    if let Some(u) = message.get("usage") {
        usage(u, &mut counted);
    }
    let finish = finish_reason(message.get("stop_reason").and_then(Value::as_str));
    let text = (!text.is_empty() || calls.is_empty()).then_some(text);
    let id = message.get("id").and_then(Value::as_str);
    Some(completion(
        id,
        model,
        vec![choice(0, text, thinking, calls, finish)],
        Some(counted),
    ))
}

/// What a Messages stream has said so far.
#[derive(Default)]
pub(super) struct StreamState {
    /// `message_start` came.
    started: bool,
    usage: Usage,
    /// The content block index of each tool call, in the order they came (OpenAI's index).
    tool_blocks: Vec<u64>,
}

impl StreamState {
    /// The counts so far, once the message started.
    pub(super) fn usage(&self) -> Option<Usage> {
        self.started.then_some(self.usage)
    }

    pub(super) fn event(&mut self, event: &Value, out: &mut ChunkWriter) {
        match event.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                self.started = true;
                let message = event.get("message");
                if let Some(id) = message.and_then(|m| m.get("id")).and_then(Value::as_str) {
                    out.id = super::completion_id(Some(id));
                }
                if let Some(u) = message.and_then(|m| m.get("usage")) {
                    usage(u, &mut self.usage);
                }
                out.delta(0, json!({"content": ""}), None);
            }
            "content_block_start" => {
                let block = event.get("content_block").unwrap_or(&Value::Null);
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let call = json!({
                            "index": self.tool_blocks.len(), "id": block.get("id"),
                            "type": "function",
                            "function": {"name": block.get("name"), "arguments": ""},
                        });
                        self.tool_blocks.push(index);
                        out.delta(0, json!({"tool_calls": [call]}), None);
                    }
                    Some("text") => {
                        let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                        if !text.is_empty() {
                            out.delta(0, json!({"content": text}), None);
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = event.get("delta").unwrap_or(&Value::Null);
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                let text = |key: &str| delta.get(key).and_then(Value::as_str).unwrap_or("");
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => out.delta(0, json!({"content": text("text")}), None),
                    Some("thinking_delta") => {
                        out.delta(0, json!({"reasoning_content": text("thinking")}), None)
                    }
                    Some("input_json_delta") => {
                        let Some(call) = self.tool_blocks.iter().position(|b| *b == index) else {
                            return;
                        };
                        let call = json!({"index": call,
                                          "function": {"arguments": text("partial_json")}});
                        out.delta(0, json!({"tool_calls": [call]}), None);
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(u) = event.get("usage") {
                    usage(u, &mut self.usage);
                }
                let stop = event.pointer("/delta/stop_reason").and_then(Value::as_str);
                out.delta(0, json!({}), Some(finish_reason(stop)));
            }
            "message_stop" => out.done(self.usage),
            "error" => {
                let error = event.get("error").unwrap_or(&Value::Null);
                let kind = error
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("api_error");
                let message = error.get("message").and_then(Value::as_str).unwrap_or("");
                out.error(message, kind, Some(kind));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chats_become_messages() {
        let chat = json!({
            "model": "claude", "max_tokens": 50, "stop": "END", "temperature": 0.2,
            "parallel_tool_calls": false,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1__thought__c2ln+/=",
                    "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1__thought__c2ln+/=", "content": "rain"},
                {"role": "user", "content": "And tomorrow?"},
            ],
            "tools": [{"type": "function", "function": {"name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        });
        let Value::Object(chat) = chat else { panic!() };
        let out = request(&chat, "claude-3-5-haiku", false).unwrap();
        assert_eq!(out.path, "/messages");
        let body: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(body["model"], "claude-3-5-haiku");
        assert_eq!(body["max_tokens"], 50);
        assert_eq!(body["system"][0]["text"], "Be brief.");
        assert_eq!(body["stop_sequences"], json!(["END"]));
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(
            messages.len(),
            3,
            "the tool result and the next question are one turn"
        );
        assert_eq!(
            messages[0]["content"][1]["source"]["media_type"],
            "image/png"
        );
        assert_eq!(messages[1]["content"][0]["input"]["city"], "Oslo");
        assert_eq!(
            messages[1]["content"][0]["id"], "call_1",
            "a Gemini signature stays out of Anthropic's ids"
        );
        assert_eq!(messages[2]["content"][0]["type"], "tool_result");
        assert_eq!(messages[2]["content"][0]["tool_use_id"], "call_1");
        assert_eq!(messages[2]["content"][1]["text"], "And tomorrow?");
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(body["tool_choice"]["disable_parallel_tool_use"], true);
        let two = json!({"model": "c", "n": 2, "messages": []});
        let Value::Object(two) = two else { panic!() };
        assert!(request(&two, "c", false).is_err());
    }

    /// `reasoning_effort` becomes a thinking budget inside the output cap.
    #[test]
    fn reasoning_effort_becomes_thinking() {
        let body = |chat: Value| {
            let Value::Object(chat) = chat else { panic!() };
            request(&chat, "claude", false)
                .map(|out| serde_json::from_slice::<Value>(&out.body).unwrap())
        };
        let high = body(json!({"reasoning_effort": "high", "messages": []})).unwrap();
        assert_eq!(
            high["thinking"],
            json!({"type": "enabled", "budget_tokens": 4096})
        );
        assert_eq!(
            high["max_tokens"],
            4096 + 4096,
            "the default beyond the thinking"
        );
        let capped = body(
            json!({"reasoning_effort": "high", "max_completion_tokens": 3000, "messages": []}),
        )
        .unwrap();
        assert_eq!(capped["max_tokens"], 3000);
        assert_eq!(capped["thinking"]["budget_tokens"], 2999);
        let off = body(json!({"reasoning_effort": "none", "messages": []})).unwrap();
        assert!(off.get("thinking").is_none(), "{off}");
        assert_eq!(off["max_tokens"], 4096);
        let minimal = body(json!({"reasoning_effort": "minimal", "messages": []})).unwrap();
        assert_eq!(minimal["thinking"]["budget_tokens"], 1024);
        for refused in [
            json!({"reasoning_effort": "low", "max_tokens": 1000, "messages": []}),
            json!({"reasoning_effort": "extreme", "messages": []}),
            json!({"reasoning_effort": 3, "messages": []}),
        ] {
            let error = body(refused.clone()).unwrap_err();
            assert_eq!(error.code(), "invalid_request", "{refused}");
        }
    }

    #[test]
    fn messages_become_chat_completions() {
        let message = json!({"id": "msg_1", "type": "message", "role": "assistant",
            "content": [{"type": "thinking", "thinking": "Oslo, then.", "signature": "s"},
                        {"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 6}});
        let out = answer(&message, "asked").unwrap();
        assert_eq!(out["model"], "asked");
        assert_eq!(out["id"], "chatcmpl-msg_1");
        let choice = &out["choices"][0];
        assert_eq!(choice["message"]["content"], "Let me check.");
        assert_eq!(choice["message"]["reasoning_content"], "Oslo, then.");
        assert_eq!(choice["finish_reason"], "tool_calls");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "weather");
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(out["usage"]["prompt_tokens"], 16);
        assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 6);
        assert_eq!(out["usage"]["completion_tokens"], 4);
    }
}
