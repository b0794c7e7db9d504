//! OpenAI chat completions in Anthropic's Messages API, and back.

use actix_web::http::header::{HeaderName, HeaderValue, ACCEPT};
use actix_web::web::Bytes;
use serde_json::{json, Map, Value};

use super::{
    arguments_object, choice, completion, content_text, max_tokens, reasoning_budget,
    stop_sequences, tool_call, unknown_role, user_parts, ChunkWriter, Media, Translated, Turns,
    Usage,
};
use crate::error::ApiError;

/// The output cap sent when the chat names none: the Messages API requires one.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The smallest thinking budget the Messages API takes.
const LEAST_THINKING: u64 = 1024;

/// The tool a chat asking for a JSON answer (`response_format`) is made to call: the Messages
/// API has no JSON mode, and a forced tool's input is JSON of the tool's schema (as LiteLLM
/// does it). Its input comes back as the answer's text, never as a tool call.
const ANSWER_TOOL: &str = "json_answer";

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
    let answer_tool = answer_tool(chat);
    let user_tools = chat.get("tools").and_then(Value::as_array);
    let choice = match &answer_tool {
        // Alone, the answer tool is forced; beside the caller's tools, the caller's choice
        // stands and the model may answer through either.
        Some(_) if user_tools.is_none_or(Vec::is_empty) => {
            Some(json!({"type": "tool", "name": ANSWER_TOOL}))
        }
        _ => tool_choice(chat),
    };
    let thinking = reasoning_budget(chat, LEAST_THINKING)?
        .filter(|budget| *budget > 0)
        .filter(|_| thinking_possible(messages, choice.as_ref()));
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
                user_parts(content, "Anthropic", text_block, media_block)?,
            ),
            "assistant" => ("assistant", assistant_blocks(message, thinking.is_some())),
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
    if let Some((name, value)) = sampling(chat, thinking.is_some()) {
        body[name] = value.into();
    }
    if let Some(stops) = stop_sequences(chat) {
        body["stop_sequences"] = stops;
    }
    if let Some(user) = chat
        .get("user")
        .and_then(Value::as_str)
        .filter(|u| opaque(u))
    {
        body["metadata"] = json!({"user_id": user});
    }
    if stream {
        body["stream"] = Value::Bool(true);
    }
    let mut tools: Vec<Value> = user_tools.into_iter().flatten().filter_map(tool).collect();
    tools.extend(answer_tool);
    if user_tools.is_some() || !tools.is_empty() {
        body["tools"] = Value::Array(tools);
    }
    if let Some(choice) = choice {
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

/// An image (base64, or by URL) or a PDF as a Messages block; the API takes no other media.
fn media_block(media: Media<'_>) -> Result<Value, ApiError> {
    let block = match media {
        Media::Inline {
            media_type: media_type @ "application/pdf",
            data,
        } => json!({"type": "document", "source":
            {"type": "base64", "media_type": media_type, "data": data}}),
        Media::Inline { media_type, data } if media_type.starts_with("image/") => {
            json!({"type": "image", "source":
                {"type": "base64", "media_type": media_type, "data": data}})
        }
        Media::Inline { media_type, .. } => {
            return Err(ApiError::invalid(format!(
                "content of type `{media_type}` cannot be sent to Anthropic, which takes \
                 images and PDFs"
            )))
        }
        Media::Url(url) => json!({"type": "image", "source": {"type": "url", "url": url}}),
    };
    Ok(block)
}

/// Whether the Messages API takes thinking for this chat. It refuses thinking with a forced tool
/// choice, and when the last assistant message called tools without starting with its thinking
/// blocks, as a client that keeps only OpenAI's fields of the answer sends it back. Such a chat
/// goes without thinking, which the API allows at any turn, rather than failing.
fn thinking_possible(messages: &[Value], choice: Option<&Value>) -> bool {
    let forced = choice
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|kind| kind == "any" || kind == "tool");
    let last_assistant = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
    let unthought_calls = last_assistant.is_some_and(|message| {
        let calls = message.get("tool_calls").and_then(Value::as_array);
        calls.is_some_and(|calls| !calls.is_empty()) && kept_thoughts(message).next().is_none()
    });
    !forced && !unthought_calls
}

/// The thinking blocks an assistant message brings back (`thinking_blocks`, as the answer gave
/// them). Anthropic checks each block's signature, so each goes back exactly as it came.
fn kept_thoughts(message: &Value) -> impl Iterator<Item = Value> + '_ {
    let blocks = message.get("thinking_blocks").and_then(Value::as_array);
    blocks.into_iter().flatten().filter_map(thought)
}

/// A thinking block of the Messages API (`thinking` with its signature, or `redacted_thinking`)
/// as it is given to the client and taken back; anything else is none.
fn thought(block: &Value) -> Option<Value> {
    let text = |key: &str| block.get(key).and_then(Value::as_str);
    match text("type")? {
        "thinking" => Some(json!({"type": "thinking", "thinking": text("thinking")?,
                                  "signature": text("signature")?})),
        "redacted_thinking" => Some(json!({"type": "redacted_thinking", "data": text("data")?})),
        _ => None,
    }
}

/// An assistant message (its thinking when `thinking` is on, text and tool calls) as Messages
/// blocks. Without thinking its blocks are left out: they only count in a chat that thinks.
fn assistant_blocks(message: &Value, thinking: bool) -> Vec<Value> {
    let mut blocks = Vec::new();
    if thinking {
        blocks.extend(kept_thoughts(message));
    }
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

/// The tool whose input is the JSON answer a `response_format` of `json_object` or
/// `json_schema` asks for (`text` asks for nothing).
fn answer_tool(chat: &Map<String, Value>) -> Option<Value> {
    let format = chat.get("response_format")?;
    let (schema, name) = match format.get("type")?.as_str()? {
        "json_object" => (json!({"type": "object"}), None),
        "json_schema" => (
            format
                .pointer("/json_schema/schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"})),
            format.pointer("/json_schema/name").and_then(Value::as_str),
        ),
        _ => return None,
    };
    let mut description = "Give your answer by calling this tool: its input is the answer, as \
                           JSON of this schema."
        .to_owned();
    if let Some(name) = name {
        description.push_str(" The answer is a `");
        description.push_str(name);
        description.push_str("`.");
    }
    if let Some(about) = format
        .pointer("/json_schema/description")
        .and_then(Value::as_str)
    {
        description.push(' ');
        description.push_str(about);
    }
    Some(json!({"name": ANSWER_TOOL, "description": description, "input_schema": schema}))
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

/// Whether a chat's `user` may go to Anthropic as `metadata.user_id`, which its docs want an
/// opaque id (a UUID, a hash) of at most 256 characters, never an email address or a phone
/// number (as LiteLLM checks it); apps often send the user's email, which stays here.
fn opaque(user: &str) -> bool {
    let email = user
        .split_once('@')
        .is_some_and(|(name, domain)| !name.is_empty() && domain.contains('.'));
    let digits = user.bytes().filter(u8::is_ascii_digit).count();
    let phone = digits >= 7
        && user
            .bytes()
            .all(|b| b.is_ascii_digit() || b" +-().".contains(&b));
    !user.is_empty() && user.len() <= 256 && !email && !phone
}

/// The one sampling option sent, as the Messages API takes them: `temperature` (at most 1,
/// Anthropic's top, where OpenAI's goes to 2), else `top_p`. Recent Claude models refuse both
/// together, and none with thinking on, which samples as it must.
fn sampling(chat: &Map<String, Value>, thinking: bool) -> Option<(&'static str, f64)> {
    let number = |name: &str| chat.get(name).and_then(Value::as_f64);
    if thinking {
        return None;
    }
    match number("temperature") {
        Some(temperature) => Some(("temperature", temperature.min(1.0))),
        None => number("top_p").map(|top_p| ("top_p", top_p)),
    }
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`; a stop for the answer tool alone is
/// a plain stop, as the caller asked for no tool.
fn finish_reason<T>(stop_reason: Option<&str>, calls: &[T]) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") if calls.is_empty() => "stop",
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
    let mut thoughts = Vec::new();
    let mut calls = Vec::new();
    let mut json_answer = None;
    for block in blocks {
        thoughts.extend(thought(block));
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str)?),
            Some("thinking") => {
                thinking.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or(""))
            }
            Some("tool_use") if block.get("name").and_then(Value::as_str) == Some(ANSWER_TOOL) => {
                json_answer = block.get("input").map(Value::to_string);
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
    let finish = finish_reason(message.get("stop_reason").and_then(Value::as_str), &calls);
    // A JSON answer is the answer tool's input alone: any words around it would not parse.
    let text = json_answer.unwrap_or(text);
    let text = (!text.is_empty() || calls.is_empty()).then_some(text);
    let id = message.get("id").and_then(Value::as_str);
    let mut choice = choice(0, text, thinking, calls, finish);
    // Where LiteLLM puts them: a client that sends the message back as it came keeps them.
    if !thoughts.is_empty() {
        choice["message"]["thinking_blocks"] = Value::Array(thoughts);
    }
    Some(completion(id, model, vec![choice], Some(counted)))
}

/// What a Messages stream has said so far.
#[derive(Default)]
pub(super) struct StreamState {
    /// `message_start` came.
    started: bool,
    usage: Usage,
    /// The content block index of each tool call, in the order they came (OpenAI's index).
    tool_blocks: Vec<u64>,
    /// The thinking block streaming now, its text and signature so far: it goes to the client
    /// whole when it ends, as `thinking_blocks`, to come back in the next turn.
    thought: Option<Value>,
    /// The content block index of the answer tool's call, whose input streams as the text.
    answer_block: Option<u64>,
}

impl StreamState {
    /// The counts so far, once the message started.
    pub(super) fn usage(&self) -> Option<Usage> {
        self.started.then_some(self.usage)
    }

    /// Appends `text` to a field of the thinking block streaming now.
    fn add_to_thought(&mut self, field: &str, text: &str) {
        if let Some(Value::String(so_far)) = self.thought.as_mut().and_then(|t| t.get_mut(field)) {
            so_far.push_str(text);
        }
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
                    Some("tool_use")
                        if block.get("name").and_then(Value::as_str) == Some(ANSWER_TOOL) =>
                    {
                        self.answer_block = Some(index);
                    }
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
                    Some("thinking") => {
                        let text = block.get("thinking").and_then(Value::as_str).unwrap_or("");
                        if !text.is_empty() {
                            out.delta(0, json!({"reasoning_content": text}), None);
                        }
                        self.thought = Some(json!({"type": "thinking", "thinking": text,
                                                   "signature": ""}));
                    }
                    Some("redacted_thinking") => self.thought = thought(block),
                    _ => {}
                }
            }
            "content_block_stop" => {
                if let Some(thought) = self.thought.take() {
                    out.delta(0, json!({"thinking_blocks": [thought]}), None);
                }
            }
            "content_block_delta" => {
                let delta = event.get("delta").unwrap_or(&Value::Null);
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                let text = |key: &str| delta.get(key).and_then(Value::as_str).unwrap_or("");
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => out.delta(0, json!({"content": text("text")}), None),
                    Some("thinking_delta") => {
                        self.add_to_thought("thinking", text("thinking"));
                        out.delta(0, json!({"reasoning_content": text("thinking")}), None)
                    }
                    Some("signature_delta") => self.add_to_thought("signature", text("signature")),
                    Some("input_json_delta") if self.answer_block == Some(index) => {
                        out.delta(0, json!({"content": text("partial_json")}), None)
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
                out.delta(0, json!({}), Some(finish_reason(stop, &self.tool_blocks)));
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

    /// The chunks a Messages event stream becomes, and their text.
    fn translated_stream(events: &[Value]) -> (String, Vec<Value>) {
        let mut state = StreamState::default();
        let mut out = ChunkWriter::new("asked");
        for event in events {
            state.event(event, &mut out);
        }
        let text = String::from_utf8(out.out.to_vec()).unwrap();
        let chunks = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .collect();
        (text, chunks)
    }

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

    /// One sampling option within Anthropic's range, none with thinking; PDFs as documents,
    /// empty text left out, and media the API cannot take refused before any key is tried.
    #[test]
    fn sampling_and_media_as_the_messages_api_takes_them() {
        let body = |chat: Value| {
            let Value::Object(chat) = chat else { panic!() };
            request(&chat, "claude", false)
                .map(|out| serde_json::from_slice::<Value>(&out.body).unwrap())
        };
        let both = body(json!({"temperature": 1.5, "top_p": 0.9, "messages": []})).unwrap();
        assert_eq!(both["temperature"], 1.0, "{both}");
        assert!(both.get("top_p").is_none(), "{both}");
        let top_p = body(json!({"top_p": 0.9, "messages": []})).unwrap();
        assert_eq!(top_p["top_p"], 0.9, "{top_p}");
        let thinking = body(
            json!({"reasoning_effort": "low", "temperature": 0.2, "top_p": 0.5,
                                   "messages": []}),
        )
        .unwrap();
        assert!(thinking.get("temperature").is_none() && thinking.get("top_p").is_none());

        let pdf = "data:application/pdf;base64,JVBERi0=";
        let sent = body(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": ""},
            {"type": "file", "file": {"filename": "a.pdf", "file_data": pdf}},
            {"type": "text", "text": "Sum it up."}]}]}))
        .unwrap();
        assert_eq!(
            sent["messages"][0]["content"],
            json!([{"type": "document", "source": {"type": "base64",
                     "media_type": "application/pdf", "data": "JVBERi0="}},
                   {"type": "text", "text": "Sum it up."}])
        );
        for refused in [
            json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
            json!({"type": "file", "file": {"file_id": "file-abc"}}),
            json!({"type": "file", "file": {"file_data": "data:text/csv;base64,YQ=="}}),
            json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}),
        ] {
            let chat = json!({"messages": [{"role": "user", "content": [refused.clone()]}]});
            let error = body(chat).unwrap_err();
            assert_eq!(error.code(), "invalid_request", "{refused}");
        }

        for (user, sent) in [
            ("usr_8f2c", true),
            ("0b5e9c1e-3c4f-4e0f-9d1a-2f6f3e1b7a10", true),
            ("ada@example.com", false),
            ("+47 22 33 44 55", false),
        ] {
            let out = body(json!({"user": user, "messages": []})).unwrap();
            assert_eq!(out.get("metadata").is_some(), sent, "{user}: {out}");
        }

        let cut = json!({"id": "msg_1", "content": [{"type": "text", "text": "Par"}],
                         "stop_reason": "model_context_window_exceeded"});
        let out = answer(&cut, "asked").unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], "length");
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
        assert_eq!(
            choice["message"]["thinking_blocks"],
            json!([{"type": "thinking", "thinking": "Oslo, then.", "signature": "s"}]),
            "signed, to come back with the tool's result"
        );
        assert_eq!(choice["finish_reason"], "tool_calls");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "weather");
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(out["usage"]["prompt_tokens"], 16);
        assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 6);
        assert_eq!(out["usage"]["completion_tokens"], 4);
    }

    /// The thinking blocks of an answer come back before its tool calls, and a chat that cannot
    /// think (its calls came back without them, or a tool is forced) goes without thinking.
    #[test]
    fn thinking_goes_back_with_its_tool_calls() {
        let sent = |assistant: Value, extra: Value| {
            let mut chat = json!({"reasoning_effort": "low", "messages": [
                {"role": "user", "content": "Weather?"},
                assistant,
                {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
            ], "tools": [{"type": "function", "function": {"name": "weather"}}]});
            for (key, value) in extra.as_object().unwrap() {
                chat[key] = value.clone();
            }
            let Value::Object(chat) = chat else { panic!() };
            let out = request(&chat, "claude", false).unwrap();
            serde_json::from_slice::<Value>(&out.body).unwrap()
        };
        let call = json!([{"id": "toolu_1", "type": "function",
                           "function": {"name": "weather", "arguments": "{}"}}]);
        let thoughts = json!([
            {"type": "thinking", "thinking": "Oslo.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "thinking", "thinking": "unsigned"},
        ]);
        let kept = json!({"role": "assistant", "content": "Checking.", "tool_calls": call,
                          "thinking_blocks": thoughts});
        let body = sent(kept.clone(), json!({}));
        assert_eq!(body["thinking"]["budget_tokens"], 1024);
        assert_eq!(
            body["messages"][1]["content"],
            json!([
                {"type": "thinking", "thinking": "Oslo.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}},
            ]),
            "a block without its signature is not one Anthropic takes"
        );
        let bare = json!({"role": "assistant", "content": null, "tool_calls": call});
        let body = sent(bare, json!({}));
        assert!(body.get("thinking").is_none(), "{body}");
        let body = sent(kept.clone(), json!({"tool_choice": "required"}));
        assert!(body.get("thinking").is_none(), "a forced tool: {body}");
        assert_eq!(body["tool_choice"]["type"], "any");
        assert_eq!(body["messages"][1]["content"][0]["type"], "text");
        let body = sent(kept, json!({"reasoning_effort": "none"}));
        assert!(body.get("thinking").is_none(), "{body}");
        assert_eq!(
            body["messages"][1]["content"][0]["type"], "text",
            "thinking blocks only go to a chat that thinks"
        );
    }

    /// A streamed thinking block reaches the client as reasoning deltas, then whole with its
    /// signature once it ends.
    #[test]
    fn streamed_thinking_ends_as_a_whole_block() {
        let (text, chunks) = translated_stream(&[
            json!({"type": "message_start", "message": {"id": "msg_1", "usage": {}}}),
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "thinking", "thinking": ""}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "thinking_delta", "thinking": "Oslo"}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "thinking_delta", "thinking": ", then."}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "signature_delta", "signature": "sig"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1,
                   "content_block": {"type": "redacted_thinking", "data": "opaque"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "content_block_start", "index": 2,
                   "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_stop", "index": 2}),
        ]);
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        let reasoning: String = deltas
            .iter()
            .filter_map(|d| d["reasoning_content"].as_str())
            .collect();
        assert_eq!(reasoning, "Oslo, then.");
        let blocks: Vec<&Value> = deltas
            .iter()
            .filter_map(|d| d.get("thinking_blocks"))
            .collect();
        assert_eq!(
            blocks,
            [
                &json!([{"type": "thinking", "thinking": "Oslo, then.", "signature": "sig"}]),
                &json!([{"type": "redacted_thinking", "data": "opaque"}]),
            ],
            "{text}"
        );
    }

    /// A chat asking for JSON makes the model call the answer tool, whose input comes back as
    /// the answer's text, whole or streamed.
    #[test]
    fn json_answers_come_through_the_answer_tool() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]});
        let chat = |extra: Value| {
            let mut chat = json!({"messages": [{"role": "user", "content": "Where?"}],
                "response_format": {"type": "json_schema",
                    "json_schema": {"name": "place", "schema": schema, "strict": true}}});
            for (key, value) in extra.as_object().unwrap() {
                chat[key] = value.clone();
            }
            let Value::Object(chat) = chat else { panic!() };
            serde_json::from_slice::<Value>(&request(&chat, "claude", false).unwrap().body).unwrap()
        };
        let body = chat(json!({"reasoning_effort": "low"}));
        assert_eq!(body["tools"][0]["name"], ANSWER_TOOL);
        assert_eq!(body["tools"][0]["input_schema"], schema);
        assert!(body["tools"][0]["description"]
            .as_str()
            .unwrap()
            .contains("`place`"));
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": ANSWER_TOOL})
        );
        assert!(
            body.get("thinking").is_none(),
            "a forced tool goes without thinking"
        );
        let with_tools = chat(json!({"tools": [{"type": "function",
            "function": {"name": "weather"}}]}));
        let names: Vec<&Value> = with_tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["name"])
            .collect();
        assert_eq!(names, [&json!("weather"), &json!(ANSWER_TOOL)]);
        assert!(with_tools.get("tool_choice").is_none(), "{with_tools}");
        let Value::Object(plain) =
            json!({"messages": [], "response_format": {"type": "json_object"}})
        else {
            panic!()
        };
        let plain: Value =
            serde_json::from_slice(&request(&plain, "claude", false).unwrap().body).unwrap();
        assert_eq!(plain["tools"][0]["input_schema"], json!({"type": "object"}));

        let message = json!({"id": "msg_1", "content": [{"type": "text", "text": "Here:"},
            {"type": "tool_use", "id": "toolu_1",
            "name": ANSWER_TOOL, "input": {"city": "Oslo"}}], "stop_reason": "tool_use",
            "usage": {"input_tokens": 3, "output_tokens": 2}});
        let out = answer(&message, "asked").unwrap();
        let choice = &out["choices"][0];
        assert_eq!(
            choice["message"]["content"], "{\"city\":\"Oslo\"}",
            "the JSON alone, without the words around it"
        );
        assert!(choice["message"].get("tool_calls").is_none(), "{out}");
        assert_eq!(choice["finish_reason"], "stop");

        let (text, chunks) = translated_stream(&[
            json!({"type": "message_start", "message": {"id": "msg_1", "usage": {}}}),
            json!({"type": "content_block_start", "index": 0, "content_block":
                {"type": "tool_use", "id": "toolu_1", "name": ANSWER_TOOL, "input": {}}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "input_json_delta", "partial_json": "\"Oslo\"}"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}}),
        ]);
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, "{\"city\": \"Oslo\"}");
        assert!(!text.contains("tool_calls"), "{text}");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
    }
}
