//! Anthropic's Messages API and Gemini's generateContent, natively: calls reach keys of their
//! own provider with that provider's key header, models are mapped both ways, usage is read
//! from each provider's shape, and Switchyard's own errors come in the provider's shape.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{eventually, into_json, log_entries, spawn_app_with, Backend, TestApp};
use crate::mock_upstream::MockUpstream;
use crate::on_both_backends;

on_both_backends!(
    anthropic_messages_reach_anthropic_keys_and_are_metered,
    anthropic_errors_come_in_anthropics_shape_and_failover_holds,
    gemini_calls_reach_gemini_keys_and_are_metered,
    gemini_errors_come_in_googles_shape_and_a_refused_key_is_disabled,
    an_anthropic_403_refuses_the_call_not_the_key,
    a_cut_gemini_event_stream_ends_with_an_error_event,
);

async fn app(backend: Backend) -> TestApp {
    spawn_app_with(backend, &[("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "50")]).await
}

fn anthropic_key(mock: &MockUpstream, secret: &str) -> Value {
    json!({"provider": "anthropic", "base_url": mock.base_url, "secret": secret})
}

fn gemini_key(mock: &MockUpstream, secret: &str) -> Value {
    let base_url = mock.base_url.replace("/v1", "/v1beta");
    json!({"provider": "gemini", "base_url": base_url, "secret": secret})
}

fn message(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream,
           "messages": [{"role": "user", "content": "Hello"}]})
}

/// `POST /v1beta/models/{target}` (with its query) with the key in `x-goog-api-key`.
async fn post_gemini(app: &TestApp, target: &str, key: &str, body: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/v1beta/models/{target}", app.address))
        .header("x-goog-api-key", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// A Gemini stream (`target` with its query) of `content`, answered 200: its text.
async fn stream_gemini(app: &TestApp, target: &str, key: &str, content: &Value) -> String {
    let response = post_gemini(app, target, key, &content.to_string()).await;
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

async fn post_message(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/messages", app.address))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The data lines of an event stream, as JSON.
fn events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect()
}

/// A user's request log, once it has `n` entries.
async fn logs(app: &TestApp, user_id: &str, n: usize) -> Vec<Value> {
    log_entries(app, &format!("user_id={user_id}"), n).await
}

async fn usage_by_model(app: &TestApp, user_id: &str) -> Value {
    let (status, body) = app
        .admin_json(
            Method::GET,
            &format!("/admin/usage?user_id={user_id}&group_by=model"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn anthropic_messages_reach_anthropic_keys_and_are_metered(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    // An OpenAI key on the same level never serves a Messages call.
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-oai"}))
        .await;
    app.add_upstream(anthropic_key(&mock, "ok-ant")).await;
    app.add_mapping(json!({"from": "fast", "to": "claude-3-5-haiku-latest"}))
        .await;
    let (user_id, key) = app.user_with_key().await;

    let (status, body) = into_json(post_message(&app, &key, message("fast", false)).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["type"], "message");
    assert_eq!(
        body["model"], "fast",
        "the client sees the name it asked for"
    );
    assert_eq!(body["content"][0]["text"], "Hello");
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].secret, "ok-ant", "sent in x-api-key");
    assert_eq!(calls[0].path, "/v1/messages");
    assert_eq!(calls[0].body["model"], "claude-3-5-haiku-latest");
    assert_eq!(calls[0].anthropic_version.as_deref(), Some("2023-06-01"));

    // Streamed: every event passes, the model restored in `message_start`.
    let response = post_message(&app, &key, message("fast", true)).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = response.text().await.unwrap();
    assert!(text.contains("event: message_start"), "{text}");
    assert!(text.contains("event: message_stop"), "{text}");
    let events = events(&text);
    assert_eq!(events[0]["message"]["model"], "fast", "{text}");
    assert!(events.iter().all(|e| e["type"] != "error"), "{text}");
    assert_eq!(mock.calls()[1].body["model"], "claude-3-5-haiku-latest");

    // Without a version header, the default one goes upstream.
    let response = app
        .http
        .post(format!("{}/v1/messages", app.address))
        .bearer_auth(&key)
        .json(&message("claude-3-5-haiku-latest", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        mock.calls()[2].anthropic_version.as_deref(),
        Some("2023-06-01")
    );

    // Each call: 25 input tokens, 5 more read from the cache, 7 output.
    let entries = logs(&app, &user_id, 3).await;
    for entry in &entries {
        assert_eq!(entry["route"], "/v1/messages", "{entry}");
        assert_eq!(entry["status"], 200, "{entry}");
        assert_eq!(entry["prompt_tokens"], 30, "{entry}");
        assert_eq!(entry["completion_tokens"], 7, "{entry}");
        assert_eq!(
            entry["upstream_model"], "claude-3-5-haiku-latest",
            "{entry}"
        );
        assert_eq!(entry["partial"], false, "{entry}");
    }
    let usage = eventually(30, || {
        let app = &app;
        let user_id = &user_id;
        async move {
            let body = usage_by_model(app, user_id).await;
            let rows = body["data"].as_array().unwrap();
            let requests: i64 = rows.iter().map(|r| r["requests"].as_i64().unwrap()).sum();
            match requests {
                3 => Ok(body),
                _ => Err(format!("usage not written yet: {body}")),
            }
        }
    })
    .await;
    let cached: i64 = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cached_tokens"].as_i64().unwrap())
        .sum();
    assert_eq!(cached, 15, "{usage}");
    let calls = mock.calls();
    assert!(calls.iter().all(|c| c.secret == "ok-ant"), "{calls:?}");
}

async fn anthropic_errors_come_in_anthropics_shape_and_failover_holds(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    let (user_id, key) = app.user_with_key().await;

    // No key: Anthropic's shape, Switchyard's code.
    let (status, body) = into_json(post_message(&app, "sk-nope", message("m", false)).await).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "authentication_error", "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");

    // No Anthropic key at all (only an OpenAI one): 503.
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-oai"}))
        .await;
    let (status, body) = into_json(post_message(&app, &key, message("m", false)).await).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_upstream_available", "{body}");
    assert_eq!(body["error"]["type"], "overloaded_error", "{body}");

    // A body that is not JSON: 400 in the same shape.
    let response = app
        .http
        .post(format!("{}/v1/messages", app.address))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, body) = into_json(response).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");

    // A wrong method: 405 in the same shape, with its `Allow`.
    let response = app
        .http
        .get(format!("{}/v1/messages", app.address))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("allow"));
    let (status, body) = into_json(response).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    assert_eq!(body["type"], "error", "{body}");

    // A 429 from one Anthropic key is absorbed by the next.
    app.add_upstream(anthropic_key(&mock, "r429-ant")).await;
    app.add_upstream(anthropic_key(&mock, "ok-ant")).await;
    for _ in 0..2 {
        let (status, body) = into_json(post_message(&app, &key, message("m", false)).await).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(mock.calls_with("r429-ant"), 1, "cooled down after its 429");

    // Suspended: 403 in Anthropic's shape.
    let (status, _) = app
        .admin_json(
            Method::PATCH,
            &format!("/admin/users/{user_id}"),
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = into_json(post_message(&app, &key, message("m", false)).await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    assert_eq!(body["error"]["code"], "user_suspended", "{body}");
    let (status, _) = app
        .admin_json(
            Method::PATCH,
            &format!("/admin/users/{user_id}"),
            Some(json!({"status": "active"})),
        )
        .await;
    assert_eq!(status, 200);

    // A stream cut before its end: an Anthropic error event, and the call metered as partial,
    // its completion counted from the text it delivered.
    let cut = MockUpstream::start();
    let app2 = self::app(backend).await;
    app2.add_upstream(anthropic_key(&cut, "cut-ant")).await;
    let (user2, key2) = app2.user_with_key().await;
    let response = post_message(&app2, &key2, message("claude-3-5-haiku-latest", true)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("Hello there"), "{text}");
    assert!(text.trim_end().ends_with("}"), "{text}");
    assert!(text.contains("event: error"), "{text}");
    let last = events(&text).pop().unwrap();
    assert_eq!(last["type"], "error", "{text}");
    assert_eq!(last["error"]["code"], "upstream_error", "{text}");
    let entry = logs(&app2, &user2, 1).await.remove(0);
    assert_eq!(entry["partial"], true, "{entry}");
    assert_eq!(entry["prompt_tokens"], 30, "{entry}");
    assert!(entry["completion_tokens"].as_i64().unwrap() >= 5, "{entry}");
}

async fn gemini_calls_reach_gemini_keys_and_are_metered(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-oai"}))
        .await;
    app.add_upstream(gemini_key(&mock, "ok-gem")).await;
    app.add_mapping(json!({"from": "g-alias", "to": "gemini-2.0-flash"}))
        .await;
    let (user_id, key) = app.user_with_key().await;
    let content = json!({"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]});

    // The Google SDKs' `?key=`: it authenticates the caller and never goes upstream, however
    // its name is encoded.
    let response = app
        .http
        .post(format!(
            "{}/v1beta/models/g-alias:generateContent?key={key}&k%65y={key}",
            app.address
        ))
        .json(&content)
        .send()
        .await
        .unwrap();
    let (status, body) = into_json(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["candidates"][0]["content"]["parts"][0]["text"],
        "Hello"
    );
    assert_eq!(
        body["modelVersion"], "g-alias",
        "the name the client asked for"
    );
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].secret, "ok-gem", "sent in x-goog-api-key");
    assert_eq!(
        calls[0].path,
        "/v1beta/models/gemini-2.0-flash:generateContent"
    );
    assert_eq!(calls[0].query, "", "the caller's key stays in the router");

    // Streamed as events (`alt=sse`), the key in `x-goog-api-key`.
    let text = stream_gemini(
        &app,
        "gemini-2.0-flash:streamGenerateContent?alt=sse",
        &key,
        &content,
    )
    .await;
    let streamed = events(&text);
    assert_eq!(streamed.len(), 2, "{text}");
    assert_eq!(streamed[1]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(mock.calls()[1].query, "alt=sse");
    assert_eq!(
        mock.calls()[1].path,
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    );

    // Streamed as one JSON array, relayed as it comes.
    let text = stream_gemini(
        &app,
        "gemini-2.0-flash:streamGenerateContent",
        &key,
        &content,
    )
    .await;
    let array: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(array.len(), 2);
    // Mapped, each object of the array names the model asked for.
    let text = stream_gemini(&app, "g-alias:streamGenerateContent", &key, &content).await;
    let array: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(array.len(), 2);
    assert!(
        array.iter().all(|o| o["modelVersion"] == "g-alias"),
        "{array:?}"
    );

    // Each call: 12 prompt tokens (2 cached), 6 candidate and 4 thought tokens.
    let entries = logs(&app, &user_id, 4).await;
    for entry in &entries {
        assert_eq!(entry["status"], 200, "{entry}");
        assert_eq!(entry["prompt_tokens"], 12, "{entry}");
        assert_eq!(entry["completion_tokens"], 10, "{entry}");
        assert_eq!(entry["upstream_model"], "gemini-2.0-flash", "{entry}");
    }
    let routes: Vec<&str> = entries
        .iter()
        .map(|e| e["route"].as_str().unwrap())
        .collect();
    assert!(
        routes.contains(&"/v1beta/models/{model}:streamGenerateContent")
            && routes.contains(&"/v1beta/models/{model}:generateContent"),
        "{routes:?}"
    );
    let usage = eventually(30, || {
        let app = &app;
        let user_id = &user_id;
        async move {
            let body = usage_by_model(app, user_id).await;
            let rows = body["data"].as_array().unwrap().clone();
            let requests: i64 = rows.iter().map(|r| r["requests"].as_i64().unwrap()).sum();
            match requests {
                4 => Ok(rows),
                _ => Err(format!("usage not written yet: {body}")),
            }
        }
    })
    .await;
    let sum = |field: &str| -> i64 { usage.iter().map(|r| r[field].as_i64().unwrap()).sum() };
    assert_eq!(sum("reasoning_tokens"), 16, "{usage:?}");
    assert_eq!(sum("cached_tokens"), 8, "{usage:?}");
    assert_eq!(mock.calls_with("ok-oai"), 0);
}

async fn gemini_errors_come_in_googles_shape_and_a_refused_key_is_disabled(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    let (_, key) = app.user_with_key().await;
    let hello = r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;

    let (status, body) =
        into_json(post_gemini(&app, "gemini-2.0-flash:generateContent", "sk-no", hello).await)
            .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], 401, "{body}");
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED", "{body}");
    assert_eq!(
        body["error"]["details"][0]["reason"], "INVALID_API_KEY",
        "{body}"
    );

    let (status, body) =
        into_json(post_gemini(&app, "gemini-2.0-flash:embedContent", &key, hello).await).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["status"], "NOT_FOUND", "{body}");

    let (status, body) =
        into_json(post_gemini(&app, "gemini-2.0-flash:generateContent", &key, "[1]").await).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT", "{body}");

    // Gemini refuses a bad key with a 400 naming it: the key is disabled, the next serves.
    let bad = app.add_upstream(gemini_key(&mock, "badkey-gem")).await;
    app.add_upstream(gemini_key(&mock, "ok-gem")).await;
    for _ in 0..3 {
        let (status, body) =
            into_json(post_gemini(&app, "gemini-2.0-flash:generateContent", &key, hello).await)
                .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(mock.calls_with("badkey-gem"), 1);
    eventually(5, || async {
        let (_, view) = app
            .admin_json(Method::GET, &format!("/admin/upstream-keys/{bad}"), None)
            .await;
        match view["state"] == "rejected" || view["state"] == "disabled" {
            true => Ok(()),
            false => Err(format!("not disabled: {view}")),
        }
    })
    .await;
}

/// Anthropic refuses a bad key with a 401; its 403 `permission_error` is about what the call
/// asked for, so it goes back to the caller and the key keeps serving everyone else.
async fn an_anthropic_403_refuses_the_call_not_the_key(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    let id = app.add_upstream(anthropic_key(&mock, "noaccess-ant")).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) =
        into_json(post_message(&app, &key, message("locked-model", false)).await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    let (status, body) = into_json(post_message(&app, &key, message("m", false)).await).await;
    assert_eq!(status, 200, "{body}");
    let (_, view) = app
        .admin_json(Method::GET, &format!("/admin/upstream-keys/{id}"), None)
        .await;
    assert_eq!(view["state"], "healthy", "{view}");
    assert_eq!(mock.calls_with("noaccess-ant"), 2);
}

/// awc reads a connection lost between chunks as a normal end, so a Gemini event stream is
/// whole only once a candidate finished: one cut before ends with Google's error event and is
/// metered as partial, never passed off as complete.
async fn a_cut_gemini_event_stream_ends_with_an_error_event(backend: Backend) {
    let app = app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(gemini_key(&mock, "cut-gem")).await;
    let (user_id, key) = app.user_with_key().await;
    let content = json!({"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]});
    let text = stream_gemini(
        &app,
        "gemini-2.0-flash:streamGenerateContent?alt=sse",
        &key,
        &content,
    )
    .await;
    let streamed = events(&text);
    assert_eq!(streamed.len(), 2, "{text}");
    assert_eq!(
        streamed[0]["candidates"][0]["content"]["parts"][0]["text"],
        "Hel"
    );
    assert_eq!(streamed[1]["error"]["status"], "UNAVAILABLE", "{text}");
    let entries = logs(&app, &user_id, 1).await;
    assert_eq!(entries[0]["partial"], true, "{}", entries[0]);
}
