//! The official OpenAI, Anthropic and Google GenAI Python SDKs, unchanged but for their base
//! URL and key, through Switchyard: JSON and streamed calls, a mapped model, and an
//! authentication error.

use std::process::Command;

use serde_json::json;

use crate::helpers::{spawn_app, Backend, TestApp};
use crate::mock_upstream::{MockUpstream, Received, MOCK_THOUGHT_SIGNATURE};
use crate::on_both_backends;

on_both_backends!(
    the_openai_python_sdk_works_through_the_router,
    the_anthropic_python_sdk_works_through_the_router,
    the_google_genai_python_sdk_works_through_the_router,
    the_openai_python_sdk_reaches_claude_and_gemini,
    the_openai_python_sdk_keeps_claudes_thinking_in_a_tool_loop,
    the_openai_python_sdk_parses_claudes_structured_answers,
);

const SCRIPT: &str = r#"
import os
import openai
from openai import OpenAI

model = os.environ.get("SY_MODEL", "alias")
client = OpenAI(base_url=os.environ["SY_BASE"], api_key=os.environ["SY_KEY"], max_retries=0)
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
print("JSON", r.model, r.choices[0].message.content, r.usage.prompt_tokens)
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hi"}], stream=True)
parts = []
models = set()
for chunk in stream:
    models.add(chunk.model)
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
print("STREAM", ",".join(sorted(models)), "".join(parts))
bad = OpenAI(base_url=os.environ["SY_BASE"], api_key="sk-0123456789abcdef-not-a-real-key", max_retries=0)
try:
    bad.chat.completions.create(model="alias", messages=[])
except openai.AuthenticationError as e:
    print("AUTH", e.status_code, e.code)
"#;

/// A router whose one upstream key (`ok-sdk`) is of `provider` on a new mock, with `alias`
/// mapped to `model`, and a user's key.
async fn router_with_alias(
    backend: Backend,
    provider: &str,
    model: &str,
) -> (TestApp, MockUpstream, String) {
    let app = spawn_app(backend).await;
    let mock = MockUpstream::start();
    let base_url = match provider {
        "gemini" => mock.base_url.replace("/v1", "/v1beta"),
        _ => mock.base_url.clone(),
    };
    app.add_upstream(json!({"provider": provider, "base_url": base_url, "secret": "ok-sdk"}))
        .await;
    app.add_mapping(json!({"from": "alias", "to": model})).await;
    let (_, key) = app.user_with_key().await;
    (app, mock, key)
}

async fn the_openai_python_sdk_works_through_the_router(backend: Backend) {
    let (app, mock, key) = router_with_alias(backend, "openai", "gpt-4o-mini").await;
    let stdout = run_python(SCRIPT, format!("{}/v1", app.address), key, "alias").await;
    assert!(stdout.contains("JSON alias Hello"), "{stdout}");
    assert!(stdout.contains("STREAM alias Hello"), "{stdout}");
    assert!(stdout.contains("AUTH 401 invalid_api_key"), "{stdout}");
    assert!(mock
        .calls()
        .iter()
        .all(|c| c.body["model"] == "gpt-4o-mini"));
    assert_eq!(mock.calls().len(), 2);
}

/// Runs `script` with the SDKs `scripts/test.sh` installs, the router's base URL and a key in
/// `SY_BASE` and `SY_KEY`; returns what it printed, once it succeeded.
/// `SY_MODEL` names the model the OpenAI script asks for.
async fn run_python(script: &'static str, base: String, key: String, model: &str) -> String {
    let model = model.to_owned();
    let output = actix_web::web::block(move || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .env(
                "PYTHONPATH",
                std::env::var("SWITCHYARD_TEST_PYTHONPATH").unwrap_or_default(),
            )
            .env("SY_BASE", base)
            .env("SY_KEY", key)
            .env("SY_MODEL", model)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (scripts/test.sh installs the SDKs)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    stdout
}

const ANTHROPIC_SCRIPT: &str = r#"
import os
import anthropic

client = anthropic.Anthropic(base_url=os.environ["SY_BASE"], api_key=os.environ["SY_KEY"], max_retries=0)
m = client.messages.create(model="alias", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
print("JSON", m.model, m.content[0].text, m.usage.input_tokens, m.usage.output_tokens)
with client.messages.stream(model="alias", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
print("STREAM", final.model, text, final.usage.output_tokens)
bad = anthropic.Anthropic(base_url=os.environ["SY_BASE"], api_key="sk-0123456789abcdef-not-a-real-key", max_retries=0)
try:
    bad.messages.create(model="alias", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
except anthropic.AuthenticationError as e:
    print("AUTH", e.status_code, e.body["error"]["type"], e.body["error"]["code"])
"#;

async fn the_anthropic_python_sdk_works_through_the_router(backend: Backend) {
    let (app, mock, key) = router_with_alias(backend, "anthropic", "claude-3-5-haiku-latest").await;
    // The SDK adds `/v1/messages` to its base URL.
    let stdout = run_python(ANTHROPIC_SCRIPT, app.address.clone(), key, "alias").await;
    assert!(stdout.contains("JSON alias Hello 25 7"), "{stdout}");
    assert!(
        stdout.contains("STREAM alias Hello there, how are you 7"),
        "{stdout}"
    );
    assert!(
        stdout.contains("AUTH 401 authentication_error invalid_api_key"),
        "{stdout}"
    );
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls
        .iter()
        .all(|c| c.body["model"] == "claude-3-5-haiku-latest" && c.secret == "ok-sdk"));
}

const GENAI_SCRIPT: &str = r#"
import os
from google import genai
from google.genai import errors, types

def client(key):
    options = types.HttpOptions(base_url=os.environ["SY_BASE"], api_version="v1beta")
    return genai.Client(api_key=key, http_options=options)

sy = client(os.environ["SY_KEY"])
r = sy.models.generate_content(model="alias", contents="hi")
u = r.usage_metadata
print("JSON", r.model_version, r.text, u.prompt_token_count, u.candidates_token_count,
      u.thoughts_token_count)
parts, last = [], None
for chunk in sy.models.generate_content_stream(model="alias", contents="hi"):
    parts.append(chunk.text or "")
    last = chunk
print("STREAM", last.model_version, "".join(parts), last.candidates[0].finish_reason.name)
chat = sy.chats.create(model="alias")
print("CHAT", chat.send_message("hi").text, chat.send_message("again").text)
bad = client("sk-0123456789abcdef-not-a-real-key")
try:
    bad.models.generate_content(model="alias", contents="hi")
except errors.ClientError as e:
    print("AUTH", e.code, e.status)
"#;

/// Google's GenAI SDK on the native Gemini routes: `generateContent`, its stream (`alt=sse`),
/// a chat of two turns, and a refused key in Google's error shape.
async fn the_google_genai_python_sdk_works_through_the_router(backend: Backend) {
    let (app, mock, key) = router_with_alias(backend, "gemini", "gemini-2.0-flash").await;
    // The SDK adds `/v1beta/models/{model}:generateContent` to its base URL.
    let stdout = run_python(GENAI_SCRIPT, app.address.clone(), key, "alias").await;
    assert!(stdout.contains("JSON alias Hello 12 6 4"), "{stdout}");
    assert!(stdout.contains("STREAM alias Hello STOP"), "{stdout}");
    assert!(stdout.contains("CHAT Hello Hello"), "{stdout}");
    assert!(stdout.contains("AUTH 401 UNAUTHENTICATED"), "{stdout}");
    let calls = mock.calls();
    assert_eq!(calls.len(), 4, "the refused key reaches no provider");
    assert!(calls
        .iter()
        .all(|c| c.secret == "ok-sdk" && c.path.starts_with("/v1beta/models/gemini-2.0-flash:")));
    assert_eq!(calls[1].query, "alt=sse");
    // The chat's second turn carries the first, as the SDK keeps it.
    let turns = calls[3].body["contents"].as_array().unwrap();
    assert_eq!(turns.len(), 3, "{}", calls[3].body);
    assert_eq!(turns[1]["role"], "model");
}

/// The OpenAI SDK's chat completions, JSON and streamed, reaching an Anthropic key and a
/// Gemini key through translation.
async fn the_openai_python_sdk_reaches_claude_and_gemini(backend: Backend) {
    let app = spawn_app(backend).await;
    let mock = MockUpstream::start();
    let gemini_base = mock.base_url.replace("/v1", "/v1beta");
    app.add_upstream(
        json!({"provider": "anthropic", "base_url": mock.base_url, "secret": "ok-ant"}),
    )
    .await;
    app.add_upstream(json!({"provider": "gemini", "base_url": gemini_base, "secret": "ok-gem"}))
        .await;
    app.add_mapping(json!({"from": "alias", "to": "claude-3-5-haiku-latest"}))
        .await;
    let (_, key) = app.user_with_key().await;
    let base = format!("{}/v1", app.address);
    let stdout = run_python(SCRIPT, base.clone(), key.clone(), "alias").await;
    assert!(stdout.contains("JSON alias Hello 30"), "{stdout}");
    assert!(
        stdout.contains("STREAM alias Hello there, how are you"),
        "{stdout}"
    );
    let stdout = run_python(SCRIPT, base, key, "gemini-2.0-flash").await;
    assert!(
        stdout.contains("JSON gemini-2.0-flash Hello 12"),
        "{stdout}"
    );
    assert!(stdout.contains("STREAM gemini-2.0-flash Hello"), "{stdout}");
    let calls = mock.calls();
    assert_eq!(calls.len(), 4);
    assert!(calls[..2]
        .iter()
        .all(|c| c.secret == "ok-ant" && c.path == "/v1/messages"));
    assert!(calls[2..].iter().all(|c| c.secret == "ok-gem"));
}

/// Runs an OpenAI SDK `script` asking for a Claude model, through a router whose one key is an
/// Anthropic key on the mock; returns what it printed and what the mock received.
async fn run_python_on_claude(backend: Backend, script: &'static str) -> (String, Vec<Received>) {
    let app = spawn_app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(
        json!({"provider": "anthropic", "base_url": mock.base_url, "secret": "ok-ant"}),
    )
    .await;
    let (_, key) = app.user_with_key().await;
    let base = format!("{}/v1", app.address);
    let stdout = run_python(script, base, key, "claude-sonnet-4-5").await;
    (stdout, mock.calls())
}

/// A tool loop as OpenAI's docs write it: the answer's message is appended as the SDK gives it,
/// then the tool's result.
const TOOL_LOOP_SCRIPT: &str = r#"
import os
from openai import OpenAI

client = OpenAI(base_url=os.environ["SY_BASE"], api_key=os.environ["SY_KEY"], max_retries=0)
tools = [{"type": "function", "function": {"name": "weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
messages = [{"role": "user", "content": "Weather in Oslo?"}]
for turn in range(2):
    r = client.chat.completions.create(model=os.environ["SY_MODEL"], messages=messages,
                                       tools=tools, reasoning_effort="low")
    message = r.choices[0].message
    print("TURN", turn, r.choices[0].finish_reason, message.tool_calls[0].function.name)
    messages.append(message)
    messages.append({"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "rain"})
"#;

/// Through the OpenAI SDK, a Claude tool loop with thinking keeps going: the SDK sends the
/// answer's `thinking_blocks` back, and Anthropic gets the signed thinking first in that turn.
async fn the_openai_python_sdk_keeps_claudes_thinking_in_a_tool_loop(backend: Backend) {
    let (stdout, mut sent) = run_python_on_claude(backend, TOOL_LOOP_SCRIPT).await;
    assert!(stdout.contains("TURN 0 tool_calls weather"), "{stdout}");
    assert!(stdout.contains("TURN 1 tool_calls weather"), "{stdout}");
    let second = sent.remove(1).body;
    assert_eq!(second["thinking"]["type"], "enabled", "{second}");
    assert_eq!(
        second["messages"][1]["content"][0],
        json!({"type": "thinking", "thinking": "Oslo it is.",
               "signature": MOCK_THOUGHT_SIGNATURE}),
        "{second}"
    );
}

/// The SDK's structured outputs: a Pydantic model as `response_format`, the answer parsed.
const PARSE_SCRIPT: &str = r#"
import os
from openai import OpenAI
from pydantic import BaseModel

class Place(BaseModel):
    city: str

client = OpenAI(base_url=os.environ["SY_BASE"], api_key=os.environ["SY_KEY"], max_retries=0)
r = client.chat.completions.parse(model=os.environ["SY_MODEL"], response_format=Place,
                                  messages=[{"role": "user", "content": "Where is it raining?"}])
print("PARSED", r.choices[0].message.parsed.city, r.choices[0].finish_reason)
"#;

/// `client.chat.completions.parse` against a Claude model parses the answer into its model.
async fn the_openai_python_sdk_parses_claudes_structured_answers(backend: Backend) {
    let (stdout, mut sent) = run_python_on_claude(backend, PARSE_SCRIPT).await;
    assert!(stdout.contains("PARSED Oslo stop"), "{stdout}");
    let sent = sent.remove(0).body;
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["city"]["type"], "string",
        "{sent}"
    );
}
