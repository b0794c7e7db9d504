//! OpenAI chat completions in Gemini's `generateContent`, and back.

use std::collections::HashMap;

use actix_web::http::header::{HeaderValue, ACCEPT};
use actix_web::web::Bytes;
use serde_json::{json, Map, Value};

use super::{
    arguments_object, choice, completion, content_text, max_tokens, reasoning_budget,
    stop_sequences, tool_call, unknown_role, user_parts, ChunkWriter, Media, Translated, Turns,
    Usage,
};
use crate::error::ApiError;

/// The thinking budget sent for `reasoning_effort: minimal`: the least every Gemini 2.5 model
/// takes (Flash-Lite's floor; Pro's is 128).
const LEAST_THINKING: u64 = 512;

pub(super) fn request(
    chat: &Map<String, Value>,
    model: &str,
    stream: bool,
) -> Result<Translated, ApiError> {
    let messages = chat
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("request body must have a `messages` array"))?;
    // A tool's result names its function in Gemini, its call's id in OpenAI.
    let mut call_names: HashMap<&str, &Value> = HashMap::new();
    let mut system: Vec<Value> = Vec::new();
    let mut contents = Turns::default();
    for message in messages {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let content = message.get("content");
        let (role, parts) = match role {
            "system" | "developer" => {
                let text = content_text(content);
                if !text.is_empty() {
                    system.push(json!({"text": text}));
                }
                continue;
            }
            "user" => (
                "user",
                user_parts(content, "Gemini", text_part, media_part)?,
            ),
            "assistant" => {
                let mut parts = Vec::new();
                let text = content_text(content);
                if !text.is_empty() {
                    parts.push(json!({"text": text}));
                }
                let calls = message.get("tool_calls").and_then(Value::as_array);
                for (n, call) in calls.into_iter().flatten().enumerate() {
                    let name = call.pointer("/function/name").unwrap_or(&Value::Null);
                    let id = call.get("id").and_then(Value::as_str);
                    if let Some(id) = id {
                        call_names.insert(id, name);
                    }
                    let args = arguments_object(call.pointer("/function/arguments"));
                    let mut part = json!({"functionCall": {"name": name, "args": args}});
                    let signed = id.and_then(|id| id.split_once(SIGNATURE_MARK));
                    match signed {
                        Some((_, signature)) => part["thoughtSignature"] = signature.into(),
                        // Gemini 3 refuses a turn whose first call lacks its signature; a call
                        // that never had one (a history from another model) gets Google's
                        // documented stand-in.
                        None if n == 0 && signs_calls(model) => {
                            part["thoughtSignature"] = NO_SIGNATURE.into()
                        }
                        None => {}
                    }
                    parts.push(part);
                }
                ("model", parts)
            }
            "tool" => {
                let id = message.get("tool_call_id").and_then(Value::as_str);
                let name = id
                    .and_then(|id| call_names.get(id).copied())
                    .or_else(|| message.get("name"))
                    .cloned()
                    .unwrap_or_else(|| "function".into());
                let response = json!({"content": content_text(content)});
                let part = json!({"functionResponse": {"name": name, "response": response}});
                ("user", vec![part])
            }
            other => return Err(unknown_role(other, "Gemini")),
        };
        contents.push(role, parts);
    }
    let mut body = json!({"contents": contents.into_json("parts")});
    if !system.is_empty() {
        body["systemInstruction"] = json!({"parts": system});
    }
    let mut config = generation_config(chat);
    if let Some(budget) = reasoning_budget(chat, LEAST_THINKING)? {
        // Thought summaries come back as `reasoning_content`; `none` turns thinking off where
        // the model allows it.
        let thinking = match budget {
            0 => json!({"thinkingBudget": 0}),
            _ => json!({"thinkingBudget": budget, "includeThoughts": true}),
        };
        config.insert("thinkingConfig".into(), thinking);
    }
    if !config.is_empty() {
        body["generationConfig"] = Value::Object(config);
    }
    if let Some(tools) = chat.get("tools").and_then(Value::as_array) {
        let declarations: Vec<Value> = tools.iter().filter_map(declaration).collect();
        if !declarations.is_empty() {
            body["tools"] = json!([{"functionDeclarations": declarations}]);
        }
    }
    if let Some(config) = tool_config(chat) {
        body["toolConfig"] = config;
    }
    let escaped = super::super::escape_segment(model);
    let (path, headers) = match stream {
        true => (
            format!("/models/{escaped}:streamGenerateContent?alt=sse"),
            vec![(ACCEPT, HeaderValue::from_static("text/event-stream"))],
        ),
        false => (format!("/models/{escaped}:generateContent"), Vec::new()),
    };
    Ok(Translated {
        path,
        body: Bytes::from(body.to_string()),
        headers,
    })
}

fn text_part(text: &Value) -> Value {
    json!({ "text": text })
}

/// An image, a file or a recording as a Gemini part: inline data, or a file by URL.
fn media_part(media: Media<'_>) -> Result<Value, ApiError> {
    Ok(match media {
        Media::Inline { media_type, data } => {
            json!({"inlineData": {"mimeType": media_type, "data": data}})
        }
        Media::Url(url) => json!({"fileData": {"fileUri": url}}),
    })
}

/// OpenAI's sampling options as Gemini's `generationConfig`.
fn generation_config(chat: &Map<String, Value>) -> Map<String, Value> {
    let mut config = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("n", "candidateCount"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(value) = chat.get(from).filter(|v| v.is_number()) {
            config.insert(to.into(), value.clone());
        }
    }
    if let Some(max) = max_tokens(chat) {
        config.insert("maxOutputTokens".into(), max.into());
    }
    if let Some(stops) = stop_sequences(chat) {
        config.insert("stopSequences".into(), stops);
    }
    let format = chat.get("response_format");
    match format.and_then(|f| f.get("type")).and_then(Value::as_str) {
        Some("json_object") => {
            config.insert("responseMimeType".into(), "application/json".into());
        }
        Some("json_schema") => {
            config.insert("responseMimeType".into(), "application/json".into());
            let schema = format.and_then(|f| f.pointer("/json_schema/schema"));
            if let Some(schema) = schema {
                config.insert("responseJsonSchema".into(), schema.clone());
            }
        }
        _ => {}
    }
    config
}

/// An OpenAI function tool as a Gemini function declaration. Its parameters go as JSON Schema
/// (`parametersJsonSchema`): Gemini's `parameters` takes only an OpenAPI subset and refuses
/// keys such as `additionalProperties`, which the SDKs' strict schemas carry. A function
/// without parameters (`{}`) declares none.
fn declaration(tool: &Value) -> Option<Value> {
    let function = tool.get("function")?;
    let mut out = json!({"name": function.get("name")?});
    if let Some(description) = function.get("description") {
        out["description"] = description.clone();
    }
    let parameters = function.get("parameters");
    if let Some(schema) = parameters.filter(|p| p.as_object().is_some_and(|p| !p.is_empty())) {
        out["parametersJsonSchema"] = schema.clone();
    }
    Some(out)
}

fn tool_config(chat: &Map<String, Value>) -> Option<Value> {
    let config = match chat.get("tool_choice")? {
        Value::String(mode) => match mode.as_str() {
            "required" => json!({"mode": "ANY"}),
            "none" => json!({"mode": "NONE"}),
            _ => json!({"mode": "AUTO"}),
        },
        Value::Object(named) => json!({"mode": "ANY",
            "allowedFunctionNames": [named.get("function")?.get("name")?]}),
        _ => return None,
    };
    Some(json!({"functionCallingConfig": config}))
}

/// Gemini's `finishReason` as OpenAI's `finish_reason`.
fn finish_reason(reason: &str, called: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ if called => "tool_calls",
        _ => "stop",
    }
}

/// Gemini's `usageMetadata` in OpenAI's terms: thoughts are part of the completion.
fn usage(metadata: &Value) -> Usage {
    let count = |key: &str| metadata.get(key).and_then(Value::as_i64).unwrap_or(0);
    let reasoning = count("thoughtsTokenCount");
    Usage {
        prompt: count("promptTokenCount"),
        cached: count("cachedContentTokenCount"),
        completion: count("candidatesTokenCount") + reasoning,
        reasoning,
    }
}

/// Where a call's thought signature rides in the id of the OpenAI tool call made of it: Gemini
/// 3 wants each call's signature back in the next turn, and an OpenAI chat carries only the
/// call's id back (signatures are base64, which has no `_`).
const SIGNATURE_MARK: &str = "__thought__";

/// A tool call's id without the Gemini signature it may carry, for other providers.
pub(super) fn unsigned_call_id(id: &str) -> &str {
    id.split_once(SIGNATURE_MARK).map_or(id, |(id, _)| id)
}

/// Google's documented stand-in for the signature of a call that never had one.
const NO_SIGNATURE: &str = "skip_thought_signature_validator";

/// Whether `model` signs its function calls and checks the signatures: Gemini 3 and later.
fn signs_calls(model: &str) -> bool {
    let Some(version) = model.strip_prefix("gemini-") else {
        return false;
    };
    let major: String = version.chars().take_while(char::is_ascii_digit).collect();
    major.parse::<u32>().is_ok_and(|major| major >= 3)
}

/// A function call a candidate made.
struct FunctionCall {
    name: String,
    args: String,
    /// The OpenAI tool call's id: Gemini's own, or a new one, with the signature if any.
    id: String,
}

/// What a candidate's parts say: its text, its thoughts and its function calls.
struct Parts {
    text: String,
    thoughts: String,
    calls: Vec<FunctionCall>,
}

fn parts_of(candidate: &Value) -> Parts {
    let mut parts = Parts {
        text: String::new(),
        thoughts: String::new(),
        calls: Vec::new(),
    };
    let list = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array);
    for part in list.into_iter().flatten() {
        if let Some(text) = part.get("text").and_then(Value::as_str) {
            match part.get("thought").and_then(Value::as_bool) == Some(true) {
                true => parts.thoughts.push_str(text),
                false => parts.text.push_str(text),
            }
        }
        if let Some(call) = part.get("functionCall") {
            let name = call.get("name").and_then(Value::as_str).unwrap_or("");
            let args = call.get("args").cloned().unwrap_or_else(|| json!({}));
            // Ids unique across turns: agents key their tool results by them.
            let mut id = match call.get("id").and_then(Value::as_str) {
                Some(id) => id.to_owned(),
                None => format!("call_{}", uuid::Uuid::new_v4().simple()),
            };
            if let Some(signature) = part.get("thoughtSignature").and_then(Value::as_str) {
                id.push_str(SIGNATURE_MARK);
                id.push_str(signature);
            }
            parts.calls.push(FunctionCall {
                name: name.to_owned(),
                args: args.to_string(),
                id,
            });
        }
    }
    parts
}

/// Whether Gemini blocked the prompt: it then answers with no candidates, and says why in
/// `promptFeedback`.
fn blocked(response: &Value) -> bool {
    response.get("candidates").is_none()
        && response.pointer("/promptFeedback/blockReason").is_some()
}

/// A whole `generateContent` answer as a chat completion; a blocked prompt is one empty choice
/// that `content_filter` finished, as OpenAI answers a filtered one.
pub(super) fn answer(response: &Value, model: &str) -> Option<Value> {
    let counted = response.get("usageMetadata").map(usage);
    let id = response.get("responseId").and_then(Value::as_str);
    if blocked(response) {
        let filtered = choice(
            0,
            Some(String::new()),
            String::new(),
            Vec::new(),
            "content_filter",
        );
        return Some(completion(id, model, vec![filtered], counted));
    }
    let candidates = response.get("candidates")?.as_array()?;
    let choices = candidates
        .iter()
        .enumerate()
        .map(|(i, candidate)| {
            let index = candidate
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(i as u64);
            let parts = parts_of(candidate);
            let calls: Vec<Value> = parts
                .calls
                .into_iter()
                .map(|call| tool_call(&call.id, &call.name, call.args))
                .collect();
            let reason = candidate.get("finishReason").and_then(Value::as_str);
            let finish = finish_reason(reason.unwrap_or("STOP"), !calls.is_empty());
            let text = (!parts.text.is_empty() || calls.is_empty()).then_some(parts.text);
            choice(index, text, parts.thoughts, calls, finish)
        })
        .collect();
    Some(completion(id, model, choices, counted))
}

/// What a Gemini stream has said so far.
#[derive(Default)]
pub(super) struct StreamState {
    /// The running usage (each event carries the whole count so far), once one came.
    usage: Option<Usage>,
    /// Function calls sent, by candidate (OpenAI's tool call index).
    calls: HashMap<u64, usize>,
    /// A candidate finished: the stream ended as it should.
    finished: bool,
    named: bool,
}

impl StreamState {
    pub(super) fn event(&mut self, event: &Value, out: &mut ChunkWriter) {
        if let Some(error) = event.get("error") {
            let message = error.get("message").and_then(Value::as_str).unwrap_or("");
            let status = error.get("status").and_then(Value::as_str);
            let code = status.map(str::to_ascii_lowercase);
            out.error(message, "api_error", code.as_deref());
            return;
        }
        if !self.named {
            self.named = true;
            if let Some(id) = event.get("responseId").and_then(Value::as_str) {
                out.id = super::completion_id(Some(id));
            }
        }
        if let Some(metadata) = event.get("usageMetadata") {
            self.usage = Some(usage(metadata));
        }
        if blocked(event) {
            self.finished = true;
            out.delta(0, json!({"content": ""}), Some("content_filter"));
            return;
        }
        let candidates = event.get("candidates").and_then(Value::as_array);
        for (i, candidate) in candidates.into_iter().flatten().enumerate() {
            let index = candidate
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(i as u64);
            let parts = parts_of(candidate);
            if !parts.thoughts.is_empty() {
                out.delta(index, json!({"reasoning_content": parts.thoughts}), None);
            }
            if !parts.text.is_empty() {
                out.delta(index, json!({"content": parts.text}), None);
            }
            for FunctionCall { name, args, id } in parts.calls {
                let n = self.calls.entry(index).or_default();
                let call = json!({"index": *n, "id": id,
                    "type": "function", "function": {"name": name, "arguments": args}});
                *n += 1;
                out.delta(index, json!({"tool_calls": [call]}), None);
            }
            if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
                self.finished = true;
                let called = self.calls.get(&index).is_some_and(|n| *n > 0);
                out.delta(index, json!({}), Some(finish_reason(reason, called)));
            }
        }
    }

    /// The counts so far.
    pub(super) fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The provider's stream ended: whole when a candidate finished.
    pub(super) fn end(&mut self, out: &mut ChunkWriter) {
        if self.finished {
            out.done(self.usage.unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chats_become_generate_content() {
        let chat = json!({
            "model": "g", "max_tokens": 20, "temperature": 0.5, "n": 2,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "tool_calls": [{"id": "call_9", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "rain"},
            ],
            "tools": [{"type": "function", "function": {"name": "weather"}}],
            "tool_choice": "required",
        });
        let Value::Object(chat) = chat else { panic!() };
        let out = request(&chat, "gemini-2.0-flash", true).unwrap();
        assert_eq!(
            out.path,
            "/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
        );
        let body: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(body["systemInstruction"]["parts"][0]["text"], "Be brief.");
        assert_eq!(body["contents"][1]["role"], "model");
        assert_eq!(
            body["contents"][1]["parts"][0]["functionCall"]["args"]["city"],
            "Oslo"
        );
        assert_eq!(
            body["contents"][2]["parts"][0]["functionResponse"]["name"],
            "weather"
        );
        let config = &body["generationConfig"];
        assert_eq!(config["maxOutputTokens"], 20);
        assert_eq!(config["candidateCount"], 2);
        assert_eq!(config["responseMimeType"], "application/json");
        assert_eq!(body["toolConfig"]["functionCallingConfig"]["mode"], "ANY");
    }

    /// `reasoning_effort` becomes a thinking budget, with the thoughts asked back.
    #[test]
    fn reasoning_effort_becomes_a_thinking_config() {
        let config = |effort: &str| {
            let chat = json!({"reasoning_effort": effort, "messages": []});
            let Value::Object(chat) = chat else { panic!() };
            let out = request(&chat, "gemini-2.5-flash", false).unwrap();
            serde_json::from_slice::<Value>(&out.body).unwrap()["generationConfig"]
                ["thinkingConfig"]
                .clone()
        };
        assert_eq!(
            config("medium"),
            json!({"thinkingBudget": 2048, "includeThoughts": true})
        );
        assert_eq!(config("minimal")["thinkingBudget"], 512);
        assert_eq!(config("none"), json!({"thinkingBudget": 0}));
        let chat = json!({"reasoning_effort": "max", "messages": []});
        let Value::Object(chat) = chat else { panic!() };
        assert!(request(&chat, "g", false).is_err());
    }

    /// Strict JSON Schemas go as `parametersJsonSchema`; files and recordings inline.
    #[test]
    fn tools_and_media_as_gemini_takes_them() {
        let schema = json!({"type": "object", "additionalProperties": false,
                            "properties": {"city": {"type": "string"}}, "required": ["city"]});
        let chat = json!({"messages": [{"role": "user", "content": [
                {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "text", "text": ""}]}],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": schema}},
                      {"type": "function", "function": {"name": "now", "parameters": {}}}]});
        let Value::Object(chat) = chat else { panic!() };
        let out = request(&chat, "gemini-2.5-flash", false).unwrap();
        let body: Value = serde_json::from_slice(&out.body).unwrap();
        let declarations = &body["tools"][0]["functionDeclarations"];
        assert_eq!(declarations[0]["parametersJsonSchema"], schema);
        assert!(declarations[0].get("parameters").is_none());
        assert_eq!(declarations[1], json!({"name": "now"}));
        assert_eq!(
            body["contents"][0]["parts"],
            json!([{"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
                   {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}}])
        );
    }

    /// With `n` above 1, each choice's first chunk carries its role, as OpenAI's do.
    #[test]
    fn every_streamed_choice_starts_with_its_role() {
        let candidate = |index: u64| {
            json!({"index": index,
            "content": {"role": "model", "parts": [{"text": "Hi"}]}})
        };
        let event = json!({"candidates": [candidate(0), candidate(1)]});
        let mut state = StreamState::default();
        let mut out = ChunkWriter::new("asked");
        state.event(&event, &mut out);
        state.event(&event, &mut out);
        let text = String::from_utf8(out.out.to_vec()).unwrap();
        let roles: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|c| c["choices"][0]["delta"]["role"] == "assistant")
            .map(|c| c["choices"][0]["index"].as_u64().unwrap())
            .collect();
        assert_eq!(roles, [0, 1], "{text}");
    }

    /// A prompt Gemini blocked (no candidates) is an empty choice finished by the filter, in
    /// a whole answer and in a stream, which then ends whole.
    #[test]
    fn a_blocked_prompt_is_a_filtered_answer() {
        let blocked = json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}});
        let out = answer(&blocked, "asked").unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(out["choices"][0]["message"]["content"], "");
        assert_eq!(out["usage"]["prompt_tokens"], 9);
        let mut state = StreamState::default();
        let mut out = ChunkWriter::new("asked");
        state.event(&blocked, &mut out);
        state.end(&mut out);
        let text = String::from_utf8(out.out.to_vec()).unwrap();
        assert!(
            text.contains(r#""finish_reason":"content_filter""#),
            "{text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    /// A call's thought signature goes out in its tool call's id and comes back on the call;
    /// Gemini 3 gets Google's stand-in for a call that has none.
    #[test]
    fn thought_signatures_go_round_in_tool_call_ids() {
        let response = json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "weather", "args": {"city": "Oslo"}},
             "thoughtSignature": "c2lnbmVk"},
            {"functionCall": {"name": "weather", "args": {"city": "Rome"}}}]},
            "finishReason": "STOP"}]});
        let out = answer(&response, "gemini-3-pro").unwrap();
        let calls = out["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap();
        let (first, second) = (
            calls[0]["id"].as_str().unwrap(),
            calls[1]["id"].as_str().unwrap(),
        );
        assert!(first.ends_with("__thought__c2lnbmVk"), "{first}");
        assert!(second.starts_with("call_") && !second.contains("__thought__"));
        assert_ne!(
            answer(&response, "m").unwrap()["choices"][0]["message"]["tool_calls"][1]["id"],
            second,
            "ids differ from turn to turn"
        );
        let follow_up = |model: &str, calls: &[Value]| {
            let chat = json!({"messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": calls},
                {"role": "tool", "tool_call_id": calls[0]["id"], "content": "rain"}]});
            let Value::Object(chat) = chat else { panic!() };
            let out = request(&chat, model, false).unwrap();
            serde_json::from_slice::<Value>(&out.body).unwrap()["contents"][1]["parts"].clone()
        };
        let parts = follow_up("gemini-3-pro", calls);
        assert_eq!(parts[0]["thoughtSignature"], "c2lnbmVk");
        assert!(
            parts[1].get("thoughtSignature").is_none(),
            "only the first call is signed"
        );
        let foreign = [json!({"id": "call_x", "type": "function",
            "function": {"name": "weather", "arguments": "{}"}})];
        assert_eq!(
            follow_up("gemini-3.1-flash", &foreign)[0]["thoughtSignature"],
            "skip_thought_signature_validator"
        );
        assert!(follow_up("gemini-2.5-flash", &foreign)[0]
            .get("thoughtSignature")
            .is_none());
    }

    #[test]
    fn answers_become_chat_completions() {
        let response = json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "thinking", "thought": true}, {"text": "Rain."},
                {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}]},
                "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 6,
                              "thoughtsTokenCount": 4, "cachedContentTokenCount": 2},
            "responseId": "abc"});
        let out = answer(&response, "asked").unwrap();
        assert_eq!(out["id"], "chatcmpl-abc");
        let choice = &out["choices"][0];
        assert_eq!(choice["message"]["content"], "Rain.");
        assert_eq!(choice["message"]["reasoning_content"], "thinking");
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(
            choice["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Oslo\"}"
        );
        assert_eq!(out["usage"]["completion_tokens"], 10);
        assert_eq!(
            out["usage"]["completion_tokens_details"]["reasoning_tokens"],
            4
        );
        assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    }
}
