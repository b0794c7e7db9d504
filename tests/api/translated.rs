//! Chat completions served by Anthropic and Gemini keys: the OpenAI request arrives at the
//! provider in its own API, and the answer comes back as OpenAI's (JSON, chunks, usage, tool
//! calls, errors), metered like any chat completion.

use serde_json::{json, Value};

use crate::helpers::{into_json, log_entries, spawn_app_with, Backend, TestApp};
use crate::mock_upstream::{MockUpstream, MOCK_THOUGHT_SIGNATURE};
use crate::on_both_backends;

on_both_backends!(
    chat_completions_reach_anthropic_keys_translated,
    anthropic_errors_and_cut_streams_come_back_as_openais,
    chat_completions_reach_gemini_keys_translated,
    reasoning_effort_reaches_both_providers_as_thinking,
    claude_thinking_goes_back_with_its_tool_calls,
    claude_answers_json_when_asked_for_it,
    what_openai_clients_send_reaches_claude_and_gemini_as_they_take_it,
);

async fn app(backend: Backend) -> TestApp {
    spawn_app_with(backend, &[("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "50")]).await
}

fn key(provider: &str, mock: &MockUpstream, secret: &str, level: i32) -> Value {
    let base_url = match provider {
        "gemini" => mock.base_url.replace("/v1", "/v1beta"),
        _ => mock.base_url.clone(),
    };
    json!({"provider": provider, "base_url": base_url, "secret": secret, "level": level})
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"}]})
}

fn with_tool(mut body: Value) -> Value {
    body["tools"] = json!([{"type": "function", "function": {"name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    body
}

/// The JSON chunks of a chat stream, and whether it ended with `[DONE]`.
fn chunks(text: &str) -> (Vec<Value>, bool) {
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let done = data.last() == Some(&"[DONE]");
    let chunks = data
        .iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    (chunks, done)
}

/// Whether a chat stream's chunks finish with `reason`.
fn finishes(chunks: &[Value], reason: &str) -> bool {
    chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == reason)
}

/// The text a chat stream's deltas spell.
fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Each log entry is a whole chat completion answered 200, with the provider's token counts.
fn metered_whole<'a>(entries: impl IntoIterator<Item = &'a Value>, prompt: i64, completion: i64) {
    for entry in entries {
        assert_eq!(entry["route"], "/v1/chat/completions", "{entry}");
        assert_eq!(entry["status"], 200, "{entry}");
        assert_eq!(entry["prompt_tokens"], prompt, "{entry}");
        assert_eq!(entry["completion_tokens"], completion, "{entry}");
        assert_eq!(entry["partial"], false, "{entry}");
    }
}

/// A user on `level`, with a key.
async fn user_on(app: &TestApp, level: i32) -> (String, String) {
    let user = app.create_user(json!({"level": level})).await;
    let user_id = user["id"].as_str().unwrap().to_owned();
    let (_, key) = app.create_key(&user_id, json!({})).await;
    (user_id, key)
}

async fn stream_text(app: &TestApp, key: &str, body: Value) -> String {
    let response = app.chat(key, body).await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

async fn chat_completions_reach_anthropic_keys_translated(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    // Neither key names its models: the Anthropic key serves Claude models, and on a level
    // with one the OpenAI-compatible key no longer takes them.
    app.add_upstream(key("openai", &mock, "ok-oai", 1)).await;
    app.add_upstream(key("anthropic", &mock, "ok-ant", 1)).await;
    app.add_mapping(json!({"from": "smart", "to": "claude-3-5-haiku-latest"}))
        .await;
    let (user_id, key) = user_on(&app, 1).await;

    let (status, body) = into_json(app.chat(&key, chat("smart", false)).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert_eq!(body["model"], "smart", "the name the client asked for");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"]["prompt_tokens"], 30,
        "25 input and 5 from the cache"
    );
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 5);
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(body["usage"]["total_tokens"], 37);
    let sent = mock.calls().remove(0);
    assert_eq!(sent.secret, "ok-ant", "sent in x-api-key");
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.anthropic_version.as_deref(), Some("2023-06-01"));
    assert_eq!(sent.body["model"], "claude-3-5-haiku-latest");
    assert_eq!(sent.body["system"][0]["text"], "Be brief.");
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    );
    assert_eq!(
        sent.body["max_tokens"], 4096,
        "the Messages API needs a cap"
    );

    // An OpenAI model still goes to the OpenAI-compatible key, untranslated.
    let (status, body) = into_json(app.chat(&key, chat("gpt-4o-mini", false)).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.calls()[1].secret, "ok-oai");
    assert_eq!(mock.calls()[1].path, "/v1/chat/completions");

    // Streamed: OpenAI chunks, the role first, the text, the finish, `[DONE]`; the usage chunk
    // only when asked for.
    let text = stream_text(&app, &key, chat("smart", true)).await;
    let (streamed, done) = chunks(&text);
    assert!(done, "{text}");
    assert_eq!(
        streamed[0]["choices"][0]["delta"]["role"], "assistant",
        "{text}"
    );
    assert!(
        streamed
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "smart"),
        "{text}"
    );
    assert_eq!(streamed_text(&streamed), "Hello there, how are you");
    assert!(finishes(&streamed, "stop"), "{text}");
    assert!(streamed.iter().all(|c| c.get("usage").is_none()), "{text}");
    let mut asked = chat("smart", true);
    asked["stream_options"] = json!({"include_usage": true});
    let text = stream_text(&app, &key, asked).await;
    let (streamed, done) = chunks(&text);
    assert!(done, "{text}");
    let last = streamed.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{text}");
    assert_eq!(last["usage"]["prompt_tokens"], 30, "{text}");
    assert_eq!(last["usage"]["completion_tokens"], 7, "{text}");
    assert_eq!(mock.calls()[2].body["stream"], true);

    // Tools go over as Anthropic tools, and its tool call comes back as OpenAI's.
    let (status, body) = into_json(app.chat(&key, with_tool(chat("smart", false))).await).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], "toolu_mock");
    assert_eq!(call["function"]["name"], "weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Oslo"}));
    let sent = mock.calls().remove(4);
    assert_eq!(sent.body["tools"][0]["name"], "weather");
    assert_eq!(sent.body["tools"][0]["input_schema"]["type"], "object");
    let text = stream_text(&app, &key, with_tool(chat("smart", true))).await;
    let (streamed, done) = chunks(&text);
    assert!(done, "{text}");
    let arguments: String = streamed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, "{\"city\": \"Oslo\"}", "{text}");
    assert!(finishes(&streamed, "tool_calls"), "{text}");

    // Every call metered as a chat completion, with Anthropic's counts.
    let entries = log_entries(&app, &format!("user_id={user_id}"), 6).await;
    let claude: Vec<&Value> = entries
        .iter()
        .filter(|e| e["upstream_model"] == "claude-3-5-haiku-latest")
        .collect();
    assert_eq!(claude.len(), 5, "{entries:?}");
    metered_whole(claude, 30, 7);
    assert_eq!(mock.calls_with("ok-oai"), 1);
}

async fn anthropic_errors_and_cut_streams_come_back_as_openais(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    // Level 1: a failing key, then a good one. Level 2: a key whose calls are refused as the
    // caller's fault. Level 3: a key whose streams break.
    app.add_upstream(key("anthropic", &mock, "r500-ant", 1))
        .await;
    app.add_upstream(key("anthropic", &mock, "ok-ant", 1)).await;
    app.add_upstream(key("anthropic", &mock, "r400-ant", 2))
        .await;
    app.add_upstream(key("anthropic", &mock, "cut-ant", 3))
        .await;
    let model = "claude-3-5-haiku-latest";

    // A 500 from one key moves the call to the next, which answers.
    let (_, key1) = user_on(&app, 1).await;
    for _ in 0..2 {
        let (status, body) = into_json(app.chat(&key1, chat(model, false)).await).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    }
    assert!(mock.calls_with("r500-ant") >= 1);

    // What the provider refuses as the caller's fault comes back in OpenAI's shape, not
    // retried.
    let (_, key2) = user_on(&app, 2).await;
    let (status, body) = into_json(app.chat(&key2, chat(model, false)).await).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(
        body["error"]["message"], "max_tokens: 9999999 is too large",
        "{body}"
    );
    assert_eq!(mock.calls_with("r400-ant"), 1);

    // What Anthropic's API has no place for is refused before any key is tried.
    let mut two = chat(model, false);
    two["n"] = json!(2);
    let (status, body) = into_json(app.chat(&key2, two).await).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    assert_eq!(mock.calls_with("r400-ant"), 1);

    // A stream cut before its end: OpenAI's error event, no `[DONE]`, metered as partial.
    let (user3, key3) = user_on(&app, 3).await;
    let text = stream_text(&app, &key3, chat(model, true)).await;
    let (streamed, done) = chunks(&text);
    assert!(!done, "{text}");
    assert_eq!(streamed_text(&streamed), "Hello there, how are you");
    let last = streamed.last().unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{text}");
    let entry = log_entries(&app, &format!("user_id={user3}"), 1)
        .await
        .remove(0);
    assert_eq!(entry["partial"], true, "{entry}");
    assert_eq!(entry["prompt_tokens"], 30, "{entry}");

    // Bad input on the way in is the caller's 400; the router goes on serving.
    let response = app
        .http
        .post(format!("{}/v1/chat/completions", app.address))
        .bearer_auth(&key1)
        .json(&json!({"model": model, "messages": "hello"}))
        .send()
        .await
        .unwrap();
    let (status, body) = into_json(response).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    let (status, _) = into_json(app.chat(&key1, chat(model, false)).await).await;
    assert_eq!(status, 200);
}

async fn chat_completions_reach_gemini_keys_translated(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(key("openai", &mock, "ok-oai", 1)).await;
    app.add_upstream(key("gemini", &mock, "ok-gem", 1)).await;
    let (user_id, key) = user_on(&app, 1).await;
    let model = "gemini-2.0-flash";

    let mut body = chat(model, false);
    body["max_completion_tokens"] = json!(100);
    let (status, body) = into_json(app.chat(&key, body).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert_eq!(body["model"], model);
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 12);
    assert_eq!(
        body["usage"]["completion_tokens"], 10,
        "6 candidate and 4 thought tokens"
    );
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"],
        4
    );
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    let sent = mock.calls().remove(0);
    assert_eq!(sent.secret, "ok-gem", "sent in x-goog-api-key");
    assert_eq!(sent.path, "/v1beta/models/gemini-2.0-flash:generateContent");
    assert_eq!(
        sent.body["systemInstruction"]["parts"][0]["text"],
        "Be brief."
    );
    assert_eq!(
        sent.body["contents"],
        json!([{"role": "user", "parts": [{"text": "Hello"}]}])
    );
    assert_eq!(sent.body["generationConfig"]["maxOutputTokens"], 100);

    // Streamed through `alt=sse`.
    let text = stream_text(&app, &key, chat(model, true)).await;
    let (streamed, done) = chunks(&text);
    assert!(done, "{text}");
    assert_eq!(streamed_text(&streamed), "Hello");
    assert!(finishes(&streamed, "stop"), "{text}");
    assert!(streamed.iter().all(|c| c.get("usage").is_none()), "{text}");
    let sent = mock.calls().remove(1);
    assert_eq!(
        sent.path,
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    );
    assert_eq!(sent.query, "alt=sse");

    // A tool call, whole and streamed.
    let (status, body) = into_json(app.chat(&key, with_tool(chat(model, false))).await).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "weather"
    );
    assert_eq!(
        mock.calls()[2].body["tools"][0]["functionDeclarations"][0]["name"],
        "weather"
    );
    // The call's thought signature rides in its id, and goes back with it in the next turn.
    let called = choice["message"]["tool_calls"][0].clone();
    assert!(
        called["id"]
            .as_str()
            .unwrap()
            .ends_with("__thought__bW9jaw=="),
        "{called}"
    );
    let mut follow_up = with_tool(chat(model, false));
    let turns = follow_up["messages"].as_array_mut().unwrap();
    turns.push(json!({"role": "assistant", "content": null, "tool_calls": [called.clone()]}));
    turns.push(json!({"role": "tool", "tool_call_id": called["id"], "content": "rain"}));
    assert_eq!(app.chat(&key, follow_up).await.status(), 200);
    let sent = mock.calls().remove(3);
    let model_turn = &sent.body["contents"][1];
    assert_eq!(model_turn["role"], "model", "{}", sent.body);
    assert_eq!(model_turn["parts"][0]["thoughtSignature"], "bW9jaw==");
    assert_eq!(
        sent.body["contents"][2]["parts"][0]["functionResponse"]["name"],
        "weather"
    );
    let text = stream_text(&app, &key, with_tool(chat(model, true))).await;
    let (streamed, done) = chunks(&text);
    assert!(done, "{text}");
    let call = streamed
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0).cloned())
        .unwrap_or_else(|| panic!("no tool call: {text}"));
    assert_eq!(call["function"]["name"], "weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Oslo"}));

    let entries = log_entries(&app, &format!("user_id={user_id}"), 5).await;
    metered_whole(&entries, 12, 10);
    assert_eq!(mock.calls_with("ok-oai"), 0);
}

/// `reasoning_effort` reaches Anthropic as a thinking budget and Gemini as a thinking config;
/// an effort neither knows is the caller's 400, sent nowhere. An OpenAI key gets it as sent.
async fn reasoning_effort_reaches_both_providers_as_thinking(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    for provider in ["openai", "anthropic", "gemini"] {
        app.add_upstream(key(provider, &mock, &format!("ok-{provider}"), 1))
            .await;
    }
    let (_, key) = user_on(&app, 1).await;
    for model in ["gpt-5-mini", "claude-sonnet-4-5", "gemini-2.5-flash"] {
        let mut body = chat(model, false);
        body["reasoning_effort"] = json!("medium");
        let (status, answer) = into_json(app.chat(&key, body).await).await;
        assert_eq!(status, 200, "{model}: {answer}");
        assert_eq!(answer["model"], model);
    }
    let sent: Vec<Value> = mock.calls().into_iter().map(|c| c.body).collect();
    assert_eq!(
        sent[0]["reasoning_effort"], "medium",
        "as sent: {}",
        sent[0]
    );
    assert_eq!(
        sent[1]["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert_eq!(sent[1]["max_tokens"], 4096 + 2048);
    assert_eq!(
        sent[2]["generationConfig"]["thinkingConfig"],
        json!({"thinkingBudget": 2048, "includeThoughts": true})
    );
    let mut unknown = chat("claude-sonnet-4-5", false);
    unknown["reasoning_effort"] = json!("maximal");
    let (status, error) = into_json(app.chat(&key, unknown).await).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_request");
    assert_eq!(mock.calls().len(), 3, "sent nowhere");
}

/// Claude's thinking before a tool call comes back as `thinking_blocks` (whole, or streamed
/// whole once signed), and the next turn that sends the answer back as it came gives Anthropic
/// its signed thinking first. A client that keeps only OpenAI's fields, or forces a tool, gets
/// its answer without thinking where Anthropic would refuse the turn.
async fn claude_thinking_goes_back_with_its_tool_calls(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(key("anthropic", &mock, "ok-ant", 1)).await;
    let (_, key) = user_on(&app, 1).await;
    let thinking = |stream: bool| {
        let mut body = with_tool(chat("claude-sonnet-4-5", stream));
        body["reasoning_effort"] = json!("low");
        body
    };
    let signed = json!([{"type": "thinking", "thinking": "Oslo it is.",
                         "signature": MOCK_THOUGHT_SIGNATURE}]);

    let (status, answer) = into_json(app.chat(&key, thinking(false)).await).await;
    assert_eq!(status, 200, "{answer}");
    let message = answer["choices"][0]["message"].clone();
    assert_eq!(message["thinking_blocks"], signed, "{answer}");
    assert_eq!(message["reasoning_content"], "Oslo it is.");
    assert_eq!(message["tool_calls"][0]["id"], "toolu_mock");

    // The next turn, with the answer as it came: the thinking goes first, signed.
    let next = |assistant: Value, extra: Value| {
        let mut body = thinking(false);
        let messages = body["messages"].as_array_mut().unwrap();
        messages.push(assistant);
        messages.push(json!({"role": "tool", "tool_call_id": "toolu_mock", "content": "rain"}));
        for (name, value) in extra.as_object().unwrap() {
            body[name] = value.clone();
        }
        body
    };
    let (status, answer) = into_json(app.chat(&key, next(message.clone(), json!({}))).await).await;
    assert_eq!(status, 200, "{answer}");
    let sent = mock.calls().remove(1).body;
    assert_eq!(sent["thinking"]["type"], "enabled", "{sent}");
    let turn = &sent["messages"][1];
    assert_eq!(turn["role"], "assistant");
    assert_eq!(turn["content"][0], signed[0], "{sent}");
    assert_eq!(turn["content"][2]["type"], "tool_use", "{sent}");

    // Only OpenAI's fields back: the turn goes without thinking, not to Anthropic's 400.
    let bare = json!({"role": "assistant", "content": message["content"],
                      "tool_calls": message["tool_calls"]});
    let (status, answer) = into_json(app.chat(&key, next(bare, json!({}))).await).await;
    assert_eq!(status, 200, "{answer}");
    assert!(mock.calls()[2].body.get("thinking").is_none());
    // A forced tool and thinking do not go together on Anthropic: the tool wins.
    let (status, answer) = into_json(
        app.chat(&key, next(message, json!({"tool_choice": "required"})))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let sent = &mock.calls()[3].body;
    assert!(sent.get("thinking").is_none(), "{sent}");
    assert_eq!(sent["tool_choice"]["type"], "any");

    // Streamed: the reasoning as it comes, then the block whole once signed.
    let text = stream_text(&app, &key, thinking(true)).await;
    let (streamed, done) = chunks(&text);
    assert!(done, "{text}");
    let delta = |c: &Value| c["choices"][0]["delta"].clone();
    let reasoning: String = streamed
        .iter()
        .filter_map(|c| delta(c)["reasoning_content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(reasoning, "Oslo it is.", "{text}");
    let blocks: Vec<Value> = streamed
        .iter()
        .filter_map(|c| delta(c).get("thinking_blocks").cloned())
        .collect();
    assert_eq!(blocks, [signed], "{text}");
    assert!(finishes(&streamed, "tool_calls"), "{text}");
}

/// `response_format` on a Claude model: the model is made to call a tool of the schema, and its
/// input comes back as the answer's JSON text (whole and streamed), with no tool call in sight.
async fn claude_answers_json_when_asked_for_it(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(key("anthropic", &mock, "ok-ant", 1)).await;
    let (user_id, key) = user_on(&app, 1).await;
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"], "additionalProperties": false});
    let asking = |stream: bool| {
        let mut body = chat("claude-sonnet-4-5", stream);
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "place", "schema": schema, "strict": true}});
        body
    };

    let (status, answer) = into_json(app.chat(&key, asking(false)).await).await;
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{answer}");
    assert!(choice["message"].get("tool_calls").is_none(), "{answer}");
    let content: Value =
        serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(content, json!({"city": "Oslo"}));
    let sent = mock.calls().remove(0).body;
    assert_eq!(sent["tools"][0]["input_schema"], schema, "{sent}");
    assert_eq!(sent["tool_choice"]["type"], "tool", "{sent}");
    assert_eq!(sent["tool_choice"]["name"], sent["tools"][0]["name"]);

    let text = stream_text(&app, &key, asking(true)).await;
    let (streamed, done) = chunks(&text);
    assert!(done, "{text}");
    let content: Value = serde_json::from_str(&streamed_text(&streamed)).expect(&text);
    assert_eq!(content, json!({"city": "Oslo"}), "{text}");
    assert!(!text.contains("tool_calls"), "{text}");
    assert!(finishes(&streamed, "stop"), "{text}");

    let entries = log_entries(&app, &format!("user_id={user_id}"), 2).await;
    metered_whole(&entries, 30, 7);
}

/// What OpenAI clients send by habit reaches each provider in the form it takes (the mock
/// refuses as the real ones do): a strict tool schema to Gemini, `temperature` with `top_p`
/// or above 1 to Claude, a PDF to both; a prompt Gemini blocks is a filtered answer, metered.
async fn what_openai_clients_send_reaches_claude_and_gemini_as_they_take_it(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(key("anthropic", &mock, "ok-ant", 1)).await;
    app.add_upstream(key("gemini", &mock, "ok-gem", 1)).await;
    let (user_id, key) = user_on(&app, 1).await;
    let strict = json!([{"type": "function", "function": {"name": "weather", "strict": true,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": false}}}]);
    let pdf = json!({"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
        {"type": "text", "text": "Sum it up."}]});

    let mut body = chat("gemini-2.5-flash", false);
    body["tools"] = strict.clone();
    body["messages"].as_array_mut().unwrap().push(pdf.clone());
    let (status, answer) = into_json(app.chat(&key, body).await).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["finish_reason"], "tool_calls",
        "{answer}"
    );

    let mut body = chat("claude-sonnet-4-5", false);
    body["tools"] = strict;
    body["temperature"] = json!(1.6);
    body["top_p"] = json!(0.9);
    body["messages"].as_array_mut().unwrap().push(pdf);
    let (status, answer) = into_json(app.chat(&key, body).await).await;
    assert_eq!(status, 200, "{answer}");
    let sent = mock.calls().remove(1).body;
    assert_eq!(sent["temperature"], 1.0, "{sent}");
    // The two user messages are one turn.
    assert_eq!(
        sent["messages"][0]["content"][1]["type"], "document",
        "{sent}"
    );
    assert!(sent.get("top_p").is_none(), "{sent}");

    // Audio is for Gemini only: refused before any key is tried.
    let mut body = chat("claude-sonnet-4-5", false);
    body["messages"][1]["content"] = json!([{"type": "input_audio",
        "input_audio": {"data": "UklGRg==", "format": "wav"}}]);
    let (status, error) = into_json(app.chat(&key, body).await).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_request", "{error}");
    assert_eq!(mock.calls().len(), 2);

    let mut blocked = chat("gemini-2.5-flash", false);
    blocked["messages"][1]["content"] = json!("Something forbidden");
    let (status, answer) = into_json(app.chat(&key, blocked.clone()).await).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["finish_reason"], "content_filter",
        "{answer}"
    );
    assert_eq!(answer["choices"][0]["message"]["content"], "", "{answer}");
    blocked["stream"] = json!(true);
    let text = stream_text(&app, &key, blocked).await;
    let (streamed, done) = chunks(&text);
    assert!(done && finishes(&streamed, "content_filter"), "{text}");

    let entries = log_entries(&app, &format!("user_id={user_id}&status=200"), 4).await;
    let blocked: Vec<&Value> = entries
        .iter()
        .filter(|e| e["model"] == "gemini-2.5-flash" && e["completion_tokens"] == 0)
        .collect();
    assert_eq!(blocked.len(), 2, "{entries:?}");
    for entry in blocked {
        assert_eq!(entry["status"], 200, "{entry}");
        assert_eq!(entry["prompt_tokens"], 9, "{entry}");
        assert_eq!(entry["partial"], false, "{entry}");
    }
}
