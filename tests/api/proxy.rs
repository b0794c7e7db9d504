//! The data plane against the mock provider: forwarding, streaming, mapping, retry, cooldown,
//! disabling, failover across levels, and the gateway errors.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, eventually, header, into_json, spawn_app, spawn_app_with, spawn_replica, Backend,
    SharedRedis, TestApp,
};
use crate::mock_upstream::{start_breaking_upstream, start_closing_upstream, MockUpstream};
use crate::on_both_backends;

on_both_backends!(
    a_chat_completion_is_forwarded_and_answered,
    a_mapped_model_goes_upstream_and_the_client_sees_its_own,
    a_stream_arrives_chunk_by_chunk_with_the_asked_model,
    a_429_cools_the_key_down_and_the_next_key_answers,
    a_401_from_the_provider_disables_the_key,
    a_403_refusing_the_model_is_the_callers_and_the_key_stays,
    a_refused_key_is_probed_again_and_back_in_service_when_accepted,
    server_errors_fail_over_to_the_users_fallback_level,
    repeated_failures_open_the_breaker_and_a_failed_probe_reopens_it,
    a_half_open_breaker_lets_one_probe_through,
    a_call_over_a_keys_token_limit_is_the_callers_to_fix,
    the_callers_own_errors_come_back_unretried,
    every_key_failing_is_a_gateway_error,
    an_error_that_is_not_json_comes_back_as_a_json_error,
    keys_out_of_credit_rest_and_a_firewall_403_is_the_callers,
    a_responses_follow_up_goes_to_the_key_that_stored_its_response,
    a_slow_provider_is_a_504,
    a_broken_stream_ends_with_an_error_event,
    chunked_json_answers_come_through_whole,
    a_kept_alive_connection_the_provider_closed_is_sent_again,
    a_provider_stalling_mid_answer_ends_the_call_cleanly,
    a_small_answer_that_stalls_is_a_504_not_a_cut_body,
    a_small_answer_cut_short_moves_the_call_to_the_next_key,
    a_responses_stream_shows_the_asked_model_and_a_cut_one_ends_with_an_error,
    keys_serve_only_the_models_they_list,
    weights_share_the_calls,
    bad_call_bodies_are_refused_with_400,
    a_transcription_form_passes_through_intact,
    a_client_that_disconnects_cancels_the_upstream_stream,
    a_client_that_hangs_up_before_the_answer_cancels_the_call,
);

async fn a_client_that_disconnects_cancels_the_upstream_stream(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("drip-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let mut response = app
        .chat(&key, json!({"model": "m", "stream": true, "messages": []}))
        .await;
    assert_eq!(response.status(), 200);
    // The first chunk arrives at once, long before the stream's 5 s end: nothing is buffered.
    let first = tokio::time::timeout(std::time::Duration::from_secs(2), response.chunk())
        .await
        .expect("first chunk in time")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(response);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while mock.cut_streams() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream stream was not cancelled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A client that gives up before a slow provider answers: the call ends when it hangs up, not
/// when the provider finally answers (its log entry shows how long it ran, and 499, as nginx
/// logs a client that closed first). The first-byte timeout is longer than the provider's 3 s,
/// so only the client's leaving can end the call early.
async fn a_client_that_hangs_up_before_the_answer_cancels_the_call(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[("SWITCHYARD_UPSTREAM__FIRST_BYTE_TIMEOUT_SECS", "10")],
    )
    .await;
    let mock = MockUpstream::start();
    app.add_upstream(upstream(&mock, "slow-a", 1)).await;
    let (user_id, key) = app.user_with_key().await;
    let gave_up = app
        .http
        .post(format!("{}/v1/chat/completions", app.address))
        .bearer_auth(&key)
        .timeout(std::time::Duration::from_millis(500))
        .json(&hello("m"))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    let entry = eventually(10, || {
        let app = &app;
        let path = format!("/admin/logs?user_id={user_id}");
        async move {
            let (_, body) = app.admin_json(Method::GET, &path, None).await;
            match body["data"].as_array().and_then(|d| d.first()) {
                Some(entry) => Ok(entry.clone()),
                None => Err(format!("no log entry yet: {body}")),
            }
        }
    })
    .await;
    let latency = entry["latency_ms"].as_i64().unwrap();
    assert!(
        latency < 2_000,
        "the call ran on after the client left: {entry}"
    );
    assert_eq!(entry["status"], 499, "{entry}");
}

pub(crate) fn transcription_form(model: &str) -> reqwest::multipart::Form {
    let audio = reqwest::multipart::Part::bytes(b"RIFF\x00\x01fake-wave".to_vec())
        .file_name("a.wav")
        .mime_str("audio/wav")
        .unwrap();
    reqwest::multipart::Form::new()
        .text("model", model.to_owned())
        .text("language", "en")
        .part("file", audio)
}

async fn a_transcription_form_passes_through_intact(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("ok-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let url = format!("{}/v1/audio/transcriptions", app.address);
    let response = app
        .http
        .post(&url)
        .bearer_auth(&key)
        .multipart(transcription_form("whisper-1"))
        .send()
        .await
        .unwrap();
    let (status, body) = into_json(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], "hello from the mock");
    let call = &mock.calls()[0];
    assert!(call
        .content_type
        .starts_with("multipart/form-data; boundary="));
    let raw = String::from_utf8_lossy(&call.raw);
    assert!(raw.contains("whisper-1") && raw.contains("fake-wave") && raw.contains("audio/wav"));

    // With a mapping the model field is replaced and the rest is kept.
    app.add_mapping(json!({"from": "stt", "to": "whisper-1"}))
        .await;
    let response = app
        .http
        .post(&url)
        .bearer_auth(&key)
        .multipart(transcription_form("stt"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let raw = String::from_utf8_lossy(&mock.calls()[1].raw).into_owned();
    assert!(raw.contains("\r\n\r\nwhisper-1\r\n"), "{raw}");
    assert!(!raw.contains("stt"), "{raw}");
    assert!(raw.contains("fake-wave") && raw.contains("name=\"language\""));

    // A form without a model, or not a form at all, is a 400.
    let no_model = reqwest::multipart::Form::new().text("language", "en");
    let response = app
        .http
        .post(&url)
        .bearer_auth(&key)
        .multipart(no_model)
        .send()
        .await
        .unwrap();
    assert_error(into_json(response).await, 400, "invalid_request");
    let response = app
        .http
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"model": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(into_json(response).await, 400, "invalid_request");
    // Two `model` fields: which one a server reads differs, so neither is.
    let twice = transcription_form("whisper-1").text("model", "whisper-large");
    let response = app
        .http
        .post(&url)
        .bearer_auth(&key)
        .multipart(twice)
        .send()
        .await
        .unwrap();
    assert_error(into_json(response).await, 400, "invalid_request");
    assert_eq!(mock.calls().len(), 2);
}

fn upstream(mock: &MockUpstream, secret: &str, level: i32) -> Value {
    json!({"provider": "openai", "base_url": mock.base_url, "secret": secret, "level": level})
}

async fn setup(backend: Backend, secrets: &[(&str, i32)]) -> (TestApp, MockUpstream, Vec<String>) {
    let app = spawn_app(backend).await;
    let mock = MockUpstream::start();
    let mut ids = Vec::new();
    for (secret, level) in secrets {
        ids.push(app.add_upstream(upstream(&mock, secret, *level)).await);
    }
    (app, mock, ids)
}

/// The admin view of an upstream key.
async fn key_view(app: &TestApp, id: &str) -> Value {
    let (status, view) = app
        .admin_json(Method::GET, &format!("/admin/upstream-keys/{id}"), None)
        .await;
    assert_eq!(status, 200, "{view}");
    view
}

/// The admin view of an upstream key once it shows `state`: the pool acts at once, and the
/// stored state the view reads is written just after, off the request path.
async fn key_in_state(app: &TestApp, id: &str, state: &str) -> Value {
    eventually(5, || async move {
        let view = key_view(app, id).await;
        if view["state"] == state {
            Ok(view)
        } else {
            Err(format!("expected {state}: {view}"))
        }
    })
    .await
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

async fn a_chat_completion_is_forwarded_and_answered(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("ok-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) = into_json(app.chat(&key, hello("gpt-4o-mini")).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].path, "/v1/chat/completions");
    assert_eq!(
        calls[0].secret, "ok-a",
        "the upstream gets its own key, not the user's"
    );
    assert_eq!(calls[0].body["messages"][0]["content"], "hi");
}

async fn a_mapped_model_goes_upstream_and_the_client_sees_its_own(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("ok-a", 1)]).await;
    let (user_id, key) = app.user_with_key().await;
    app.add_mapping(json!({"from": "fast*", "to": "sys-model"}))
        .await;
    let (_, body) = into_json(app.chat(&key, hello("fast-1")).await).await;
    assert_eq!(body["model"], "fast-1");
    assert_eq!(mock.calls()[0].body["model"], "sys-model");
    // The user's own mapping wins over the system-wide one.
    app.add_mapping(json!({"from": "fast-1", "to": "user-model", "user_id": user_id}))
        .await;
    let (_, body) = into_json(app.chat(&key, hello("fast-1")).await).await;
    assert_eq!(body["model"], "fast-1");
    assert_eq!(mock.calls()[1].body["model"], "user-model");
    // Another user still gets the system mapping.
    let (_, other) = app.user_with_key().await;
    into_json(app.chat(&other, hello("fast-1")).await).await;
    assert_eq!(mock.calls()[2].body["model"], "sys-model");
}

async fn a_stream_arrives_chunk_by_chunk_with_the_asked_model(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("ok-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    app.add_mapping(json!({"from": "alias", "to": "real-model"}))
        .await;
    let response = app
        .chat(
            &key,
            json!({"model": "alias", "stream": true, "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4, "{text}");
    assert_eq!(events[3], "data: [DONE]");
    let mut content = String::new();
    for event in &events[..3] {
        let chunk: Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(chunk["model"], "alias", "{event}");
        content.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert_eq!(content, "Hello");
    assert_eq!(mock.calls()[0].body["model"], "real-model");
}

async fn a_429_cools_the_key_down_and_the_next_key_answers(backend: Backend) {
    let (app, mock, ids) = setup(backend, &[("r429-a", 1), ("ok-b", 1)]).await;
    let (_, key) = app.user_with_key().await;
    for _ in 0..4 {
        let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(mock.calls_with("r429-a"), 1, "a cooling key is skipped");
    assert_eq!(mock.calls_with("ok-b"), 4);
    let view = key_in_state(&app, &ids[0], "cooling_down").await;
    let until =
        chrono::DateTime::parse_from_rfc3339(view["cooldown_until"].as_str().unwrap()).unwrap();
    let rest = until
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!(
        (4..=7).contains(&rest),
        "Retry-After: 7 honoured, {rest}s left"
    );
}

async fn a_401_from_the_provider_disables_the_key(backend: Backend) {
    let (app, mock, ids) = setup(backend, &[("r401-a", 1), ("ok-b", 1)]).await;
    let (_, key) = app.user_with_key().await;
    for _ in 0..3 {
        assert_eq!(app.chat(&key, hello("m")).await.status(), 200);
    }
    assert_eq!(mock.calls_with("r401-a"), 1);
    let view = key_in_state(&app, &ids[0], "disabled").await;
    assert!(view["disabled_reason"].as_str().unwrap().contains("401"));
    // An admin re-enabling it puts it back in rotation.
    app.admin_json(
        Method::PATCH,
        &format!("/admin/upstream-keys/{}", ids[0]),
        Some(json!({"enabled": true})),
    )
    .await;
    for _ in 0..2 {
        app.chat(&key, hello("m")).await;
    }
    assert_eq!(mock.calls_with("r401-a"), 2);
}

/// A 403 that refuses the model asked for (the key's project may not use it) refuses the call,
/// not the key: passed on as the provider sent it, not retried, and the key serves on.
/// A key the provider refused is probed again every `upstream.reprobe_interval_secs` and put
/// back in service once the provider accepts it; a key an admin disabled is left alone.
async fn a_refused_key_is_probed_again_and_back_in_service_when_accepted(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[("SWITCHYARD_UPSTREAM__REPROBE_INTERVAL_SECS", "1")],
    )
    .await;
    let mock = MockUpstream::start();
    let refused = app.add_upstream(upstream(&mock, "once401-a", 1)).await;
    let mut off = upstream(&mock, "r401-off", 1);
    off["enabled"] = json!(false);
    app.add_upstream(off).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
    assert_eq!(status, 502, "the only key was refused: {body}");
    key_in_state(&app, &refused, "disabled").await;
    // The next round's probe (GET /models) is accepted: the key serves again.
    let view = key_in_state(&app, &refused, "healthy").await;
    assert_eq!(view["disabled_reason"], json!(null), "{view}");
    let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
    assert_eq!(status, 200, "{body}");
    assert!(mock.calls().iter().any(|c| c.path.ends_with("/models")));
    assert_eq!(
        mock.calls_with("r401-off"),
        0,
        "an admin's disable is not probed"
    );
}

async fn a_403_refusing_the_model_is_the_callers_and_the_key_stays(backend: Backend) {
    let (app, mock, ids) = setup(backend, &[("noaccess-a", 1), ("noaccess-b", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) = into_json(app.chat(&key, hello("locked-model")).await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(mock.calls().len(), 1, "not retried on the other key");
    for id in &ids {
        assert_eq!(key_view(&app, id).await["state"], "healthy");
    }
    for _ in 0..2 {
        let (status, body) = into_json(app.chat(&key, hello("gpt-4o-mini")).await).await;
        assert_eq!(status, 200, "{body}");
    }
}

async fn server_errors_fail_over_to_the_users_fallback_level(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("r500-a", 1), ("r500-b", 1), ("ok-c", 2)]).await;
    let user = app.create_user(json!({"fallback_levels": [2]})).await;
    let (_, key) = app
        .create_key(user["id"].as_str().unwrap(), json!({}))
        .await;
    let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.calls_with("r500-a"), 1);
    assert_eq!(mock.calls_with("r500-b"), 1);
    assert_eq!(mock.calls_with("ok-c"), 1);
    // Without a fallback level the same failure is a gateway error.
    let (_, plain) = app.user_with_key().await;
    assert_error(
        into_json(app.chat(&plain, hello("m")).await).await,
        502,
        "upstream_error",
    );
}

/// Repeated failures open a key's circuit breaker: calls go to the other keys while it is
/// open, without trying it. When it has rested, one call probes it, and a failed probe opens
/// it again at once.
async fn repeated_failures_open_the_breaker_and_a_failed_probe_reopens_it(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("SWITCHYARD_UPSTREAM__BREAKER_FAILURES", "2"),
            ("SWITCHYARD_UPSTREAM__BREAKER_OPEN_SECS", "1"),
        ],
    )
    .await;
    let mock = MockUpstream::start();
    let failing = app.add_upstream(upstream(&mock, "r500-a", 1)).await;
    app.add_upstream(upstream(&mock, "ok-b", 1)).await;
    let (_, key) = app.user_with_key().await;
    let calls = |n: usize| {
        let (app, key) = (&app, &key);
        async move {
            for _ in 0..n {
                let (status, body) = into_json(app.chat(key, hello("m")).await).await;
                assert_eq!(status, 200, "the healthy key answers: {body}");
            }
        }
    };
    calls(6).await;
    assert_eq!(
        mock.calls_with("r500-a"),
        2,
        "open after its second failure"
    );
    assert_eq!(mock.calls_with("ok-b"), 6);
    // The admin view shows the open breaker as a rest, with its end.
    let view = key_view(&app, &failing).await;
    assert_eq!(view["state"], "cooling_down", "{view}");
    let until =
        chrono::DateTime::parse_from_rfc3339(view["cooldown_until"].as_str().unwrap()).unwrap();
    let left = until.signed_duration_since(chrono::Utc::now());
    assert!(
        left > chrono::Duration::zero() && left <= chrono::Duration::seconds(1),
        "{view}"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(key_view(&app, &failing).await["state"], "healthy");
    calls(6).await;
    assert_eq!(
        mock.calls_with("r500-a"),
        3,
        "one probe, open again at its failure"
    );
    assert_eq!(key_view(&app, &failing).await["state"], "cooling_down");
    // An admin's change to the key starts it afresh, breaker closed.
    let (status, _) = app
        .admin_json(
            Method::PATCH,
            &format!("/admin/upstream-keys/{failing}"),
            Some(json!({"weight": 2})),
        )
        .await;
    assert_eq!(status, 200);
    key_in_state(&app, &failing, "healthy").await;
}

/// Once an open breaker has rested, one call probes the key; calls meanwhile go to the other
/// keys rather than all at once to a key that may still be failing.
async fn a_half_open_breaker_lets_one_probe_through(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("SWITCHYARD_UPSTREAM__BREAKER_FAILURES", "1"),
            ("SWITCHYARD_UPSTREAM__BREAKER_OPEN_SECS", "1"),
        ],
    )
    .await;
    let mock = MockUpstream::start();
    app.add_upstream(upstream(&mock, "lagfail-a", 1)).await;
    app.add_upstream(upstream(&mock, "ok-b", 1)).await;
    let (_, key) = app.user_with_key().await;
    while mock.calls_with("lagfail-a") == 0 {
        assert_eq!(app.chat(&key, hello("m")).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // The probe takes 300 ms to fail; the calls sent meanwhile do not wait for it.
    let calls = (0..8).map(|_| app.chat(&key, hello("m")));
    for response in futures_util::future::join_all(calls).await {
        assert_eq!(response.status(), 200);
    }
    assert_eq!(mock.calls_with("lagfail-a"), 2, "one probe");
    assert!(mock.calls_with("ok-b") >= 8);
}

/// OpenAI's 429 "Request too large" is about the call, not the key: the key does not rest, a
/// key of a higher tier is tried, and when none takes it the caller gets a 400 to act on.
async fn a_call_over_a_keys_token_limit_is_the_callers_to_fix(backend: Backend) {
    let (app, mock, ids) = setup(backend, &[("toolarge-a", 1), ("toolarge-b", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
    assert_error((status, body.clone()), 400, "invalid_request");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_tokens"), "{message}");
    assert!(
        !message.contains("org-mock"),
        "the key's organisation stays hidden"
    );
    assert_eq!(
        mock.calls_with("toolarge-a") + mock.calls_with("toolarge-b"),
        2
    );
    for id in &ids {
        assert_eq!(key_view(&app, id).await["state"], "healthy");
    }
    // Both keys still serve: a second call tries them both again.
    app.chat(&key, hello("m")).await;
    assert_eq!(
        mock.calls_with("toolarge-a") + mock.calls_with("toolarge-b"),
        4
    );
    // A key of the same level with a larger limit takes the call.
    app.add_upstream(upstream(&mock, "ok-c", 1)).await;
    for _ in 0..3 {
        assert_eq!(app.chat(&key, hello("m")).await.status(), 200);
    }
}

async fn the_callers_own_errors_come_back_unretried(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("r400-a", 1), ("ok-b", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
        if status == 400 {
            assert_eq!(
                body["error"]["param"], "max_tokens",
                "the provider's own body: {body}"
            );
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 400],
        "round robin reached both keys; the 400 was not retried"
    );
    assert_eq!(mock.calls().len(), 2);
}

/// An error page from something in front of the provider reaches the client as the
/// contract's JSON error, with the page's status; the key stays in service.
async fn an_error_that_is_not_json_comes_back_as_a_json_error(backend: Backend) {
    let (app, mock, ids) = setup(backend, &[("html-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let response = app.chat(&key, hello("m")).await;
    assert_eq!(response.status(), 404);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let (_, body) = into_json(response).await;
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("text/html") && !message.contains("<html>"),
        "{message}"
    );
    assert_eq!(mock.calls().len(), 1, "the caller's answer, not retried");
    assert_eq!(key_view(&app, &ids[0]).await["state"], "healthy");
    // A plain-text error keeps its words.
    let (app, _mock, _) = setup(backend, &[("plain-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"]["message"],
        "the upstream answered 422: model 'm' does not support tools"
    );
}

/// A key whose account is out of credit (402, or 429 `insufficient_quota`) rests for
/// `upstream.quota_cooldown_secs` and the call goes to the next key; a firewall's 403 page
/// refuses the call, not the key.
async fn keys_out_of_credit_rest_and_a_firewall_403_is_the_callers(backend: Backend) {
    let (app, mock, ids) = setup(backend, &[("r402-a", 1), ("quota-b", 1), ("ok-c", 1)]).await;
    let (_, key) = app.user_with_key().await;
    for _ in 0..4 {
        let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(mock.calls_with("r402-a"), 1);
    assert_eq!(mock.calls_with("quota-b"), 1);
    for id in &ids[..2] {
        let view = key_in_state(&app, id, "cooling_down").await;
        let until =
            chrono::DateTime::parse_from_rfc3339(view["cooldown_until"].as_str().unwrap()).unwrap();
        let rest = until
            .signed_duration_since(chrono::Utc::now())
            .num_seconds();
        assert!(rest > 3000, "rests about an hour: {view}");
    }

    let (app, mock, ids) = setup(backend, &[("waf403-a", 1), ("ok-b", 2)]).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
    assert_error((status, body), 403, "upstream_error");
    assert_eq!(mock.calls().len(), 1, "not retried");
    assert_eq!(key_view(&app, &ids[0]).await["state"], "healthy");
}

/// A `/v1/responses` follow-up (`previous_response_id`) goes to the key that created the
/// response it names, as OpenAI answers it only through a key of the same project; round robin
/// would send every other one elsewhere. With Redis, another replica knows it too.
async fn a_responses_follow_up_goes_to_the_key_that_stored_its_response(backend: Backend) {
    let redis = SharedRedis::new();
    let app = spawn_app_with(backend, &redis.env()).await;
    let mock = MockUpstream::start();
    for secret in ["store-a", "store-b"] {
        app.add_upstream(upstream(&mock, secret, 1)).await;
    }
    let (_, key) = app.user_with_key().await;
    let respond = |app: &TestApp, body: Value| {
        let request = app
            .http
            .post(format!("{}/v1/responses", app.address))
            .bearer_auth(&key)
            .json(&body)
            .send();
        async move { into_json(request.await.unwrap()).await }
    };
    let (status, first) = respond(&app, json!({"model": "m", "input": "hi"})).await;
    assert_eq!(status, 200, "{first}");
    let mut previous = first["id"].as_str().unwrap().to_owned();
    for turn in 0..4 {
        let body = json!({"model": "m", "input": "more", "previous_response_id": previous});
        let (status, answer) = respond(&app, body).await;
        assert_eq!(status, 200, "turn {turn}: {answer}");
        previous = answer["id"].as_str().unwrap().to_owned();
    }
    // A streamed response's id is noted from its first event.
    let body = json!({"model": "m", "input": "hi", "stream": true});
    let streamed = app
        .http
        .post(format!("{}/v1/responses", app.address))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let created = streamed
        .lines()
        .find_map(|l| {
            l.strip_prefix("data: ")
                .filter(|d| d.contains("response.created"))
        })
        .unwrap();
    let created: Value = serde_json::from_str(created).unwrap();
    let streamed_id = created["response"]["id"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        let body = json!({"model": "m", "input": "more", "previous_response_id": streamed_id});
        let (status, answer) = respond(&app, body).await;
        assert_eq!(status, 200, "{answer}");
    }
    // Another replica learns it through Redis (shared in the background).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let replica = spawn_replica(&app, &redis.env()).await;
    for _ in 0..2 {
        let body = json!({"model": "m", "input": "more", "previous_response_id": previous});
        let (status, answer) = respond(&replica, body).await;
        assert_eq!(status, 200, "{answer}");
    }
    // The pairing is kept in Redis for a day, not the auth entries' 600 s.
    let ttl = redis.ttl_ms(&format!("auth:response:{previous}")).await;
    assert!(ttl > 23 * 3600 * 1000, "{ttl} ms left");

    // A background response could not be metered (it answers `queued`, its result is fetched
    // later): it is refused before any upstream is asked.
    let calls = mock.calls().len();
    let body = json!({"model": "m", "input": "hi", "background": true});
    assert_error(respond(&app, body).await, 400, "invalid_request");
    assert_eq!(mock.calls().len(), calls, "nothing went upstream");
    let body = json!({"model": "m", "input": "hi", "background": false});
    assert_eq!(respond(&app, body).await.0, 200);
}

async fn every_key_failing_is_a_gateway_error(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("r429-a", 1), ("r429-b", 1)]).await;
    let (_, key) = app.user_with_key().await;
    // Both keys answered 429 and now rest for the 7 s they asked: the client is told so.
    let failed = app.chat(&key, hello("m")).await;
    let retry_after = header(&failed, "retry-after");
    assert!(
        retry_after.is_some_and(|s| (1..=7).contains(&s)),
        "{retry_after:?}"
    );
    assert_error(into_json(failed).await, 502, "upstream_error");
    assert_eq!(mock.calls().len(), 2);
    // Both keys are now cooling down (7 s, as the provider asked): nothing is available,
    // nothing is sent, and the client is told when a key is back.
    let none = app.chat(&key, hello("m")).await;
    let retry_after = header(&none, "retry-after");
    assert!(
        retry_after.is_some_and(|s| (1..=7).contains(&s)),
        "{retry_after:?}"
    );
    assert_error(into_json(none).await, 503, "no_upstream_available");
    assert_eq!(mock.calls().len(), 2);
    // A level with no keys at all is the same, with no time to wait for.
    let user = app.create_user(json!({"level": 9})).await;
    let (_, nine) = app
        .create_key(user["id"].as_str().unwrap(), json!({}))
        .await;
    let none = app.chat(&nine, hello("m")).await;
    assert_eq!(header(&none, "retry-after"), None);
    assert_error(into_json(none).await, 503, "no_upstream_available");
}

async fn a_slow_provider_is_a_504(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("slow-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let timed_out = into_json(app.chat(&key, hello("m")).await).await;
    assert_error(timed_out, 504, "upstream_timeout");
    assert_eq!(mock.calls().len(), 1);
}

async fn a_broken_stream_ends_with_an_error_event(backend: Backend) {
    let app = spawn_app(backend).await;
    let base_url = start_breaking_upstream();
    app.add_upstream(
        json!({"provider": "openai", "base_url": base_url, "secret": "any", "level": 1}),
    )
    .await;
    let (_, key) = app.user_with_key().await;
    let response = app
        .chat(&key, json!({"model": "m", "stream": true, "messages": []}))
        .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap_or_default();
    assert!(text.contains("\"content\":\"Hel\""), "{text}");
    assert!(text.contains("\"code\":\"upstream_error\""), "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(!text.contains("\"finish_reason\":\"stop\""));

    // A JSON answer sent without a length and cut short: a 502, not a 200 with half a body,
    // whether it is read whole to restore a mapped model's name or not.
    let cut = into_json(app.chat(&key, hello("m")).await).await;
    assert_error(cut, 502, "upstream_error");
    app.add_mapping(json!({"from": "alias", "to": "m"})).await;
    let cut = into_json(app.chat(&key, hello("alias")).await).await;
    assert_error(cut, 502, "upstream_error");

    // Chunked audio cut short is not a whole answer: the client's body breaks rather than
    // ending as if complete.
    let speech = reqwest::Client::new()
        .post(format!("{}/v1/audio/speech", app.address))
        .bearer_auth(&key)
        .json(&json!({"model": "tts-1", "input": "hello", "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(speech.status(), 200);
    assert!(speech.bytes().await.is_err(), "a cut body read as whole");
}

/// JSON answers sent without a length (chunked) come through whole, small or large.
async fn chunked_json_answers_come_through_whole(backend: Backend) {
    let (app, _mock, _) = setup(backend, &[("chunked-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    let (app, _mock, _) = setup(backend, &[("chunked-big-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
    assert_eq!(status, 200);
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.len(), 100 * 1024);
}

/// A provider closing a kept-alive connection as a call is sent on it (a server whose idle
/// timeout is shorter than the router's, as uvicorn's 5 s is) costs nothing: the call goes
/// again on a new connection to the same key, one attempt, and the key is not blamed for it.
async fn a_kept_alive_connection_the_provider_closed_is_sent_again(backend: Backend) {
    // One failure would open the breaker: a stale connection must not count as one.
    let app = spawn_app_with(backend, &[("SWITCHYARD_UPSTREAM__BREAKER_FAILURES", "1")]).await;
    let (base_url, dropped) = start_closing_upstream();
    let key_id = app
        .add_upstream(
            json!({"provider": "openai", "base_url": base_url, "secret": "any", "level": 1}),
        )
        .await;
    let (user_id, key) = app.user_with_key().await;
    for call in 0..4 {
        let (status, body) = into_json(app.chat(&key, hello("m")).await).await;
        assert_eq!(status, 200, "call {call}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello", "{body}");
    }
    assert_eq!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "calls 2 to 4 each met a connection the provider closed"
    );
    assert_eq!(key_view(&app, &key_id).await["state"], "healthy");
    let entries = eventually(30, || async {
        let (_, logs) = app
            .admin_json(Method::GET, &format!("/admin/logs?user_id={user_id}"), None)
            .await;
        match logs["data"].as_array() {
            Some(entries) if entries.len() == 4 => Ok(entries.clone()),
            _ => Err(format!("not 4 log entries yet: {logs}")),
        }
    })
    .await;
    for entry in entries {
        assert_eq!(entry["attempts"], 1, "{entry}");
        assert_eq!(entry["status"], 200, "{entry}");
    }
}

/// A provider that goes silent halfway through its answer: a JSON answer read whole (to
/// restore a mapped model) ends at the idle timeout with 504 `upstream_timeout`, and a stream
/// ends with an error event that parses on its own, after the whole events that came before.
async fn a_provider_stalling_mid_answer_ends_the_call_cleanly(backend: Backend) {
    let (app, _mock, _) = setup(backend, &[("stall-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    app.add_mapping(json!({"from": "alias", "to": "real-model"}))
        .await;
    let started = std::time::Instant::now();
    let stalled = into_json(app.chat(&key, hello("alias")).await).await;
    assert_error(stalled, 504, "upstream_timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    for model in ["alias", "gpt-4o-mini"] {
        let response = app
            .chat(
                &key,
                json!({"model": model, "stream": true, "messages": []}),
            )
            .await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap_or_default();
        let events: Vec<&str> = text
            .split("\n\n")
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        assert_eq!(events.len(), 2, "{text}");
        let first: Value = serde_json::from_str(events[0].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(first["model"], model);
        let error: Value = serde_json::from_str(events[1].strip_prefix("data: ").unwrap())
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        // Silence is a timeout, as before the first byte; a broken connection is an error.
        assert_eq!(error["error"]["code"], "upstream_timeout");
    }
}

/// A non-streamed answer of small declared length is read whole before the client's response
/// starts: one that stalls half way is a clean 504 `upstream_timeout` (not a body cut short
/// after a 200), and its log entry says so.
async fn a_small_answer_that_stalls_is_a_504_not_a_cut_body(backend: Backend) {
    let (app, _mock, _) = setup(backend, &[("stall-sized-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let started = std::time::Instant::now();
    let stalled = into_json(app.chat(&key, hello("gpt-4o-mini")).await).await;
    assert_error(stalled, 504, "upstream_timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let entry = eventually(30, || async {
        let (_, body) = app.admin_json(Method::GET, "/admin/logs", None).await;
        match body["data"].as_array().and_then(|d| d.first()) {
            Some(entry) => Ok(entry.clone()),
            None => Err(format!("no log entry yet: {body}")),
        }
    })
    .await;
    assert_eq!(entry["status"], 504, "{entry}");
    assert_eq!(entry["error_code"], "upstream_timeout", "{entry}");
}

/// A small answer is read whole while the call can still move on: one that breaks or stalls
/// half way is a failed attempt, and the next key answers; the client sees only that answer.
/// With no other key, a body cut short is a 502, never a 200 with part of a body.
async fn a_small_answer_cut_short_moves_the_call_to_the_next_key(backend: Backend) {
    for broken in ["short-a", "stall-sized-a"] {
        let (app, mock, _) = setup(backend, &[]).await;
        let mut first = upstream(&mock, broken, 1);
        first["weight"] = json!(10);
        app.add_upstream(first).await;
        app.add_upstream(upstream(&mock, "ok-b", 1)).await;
        let (user_id, key) = app.user_with_key().await;
        let (status, body) = into_json(app.chat(&key, hello("gpt-4o-mini")).await).await;
        assert_eq!(status, 200, "{broken}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello", "{body}");
        let entry = eventually(30, || async {
            let (_, logs) = app
                .admin_json(Method::GET, &format!("/admin/logs?user_id={user_id}"), None)
                .await;
            match logs["data"].as_array().and_then(|d| d.first()) {
                Some(entry) => Ok(entry.clone()),
                None => Err(format!("no log entry yet: {logs}")),
            }
        })
        .await;
        assert_eq!(entry["attempts"], 2, "{broken}: {entry}");
        assert_eq!(entry["status"], 200, "{entry}");
    }
    let (app, _mock, _) = setup(backend, &[("short-c", 1)]).await;
    let (_, key) = app.user_with_key().await;
    let cut = into_json(app.chat(&key, hello("gpt-4o-mini")).await).await;
    assert_error(cut, 502, "upstream_error");
}

/// A Responses API stream: the model the client asked for is restored in the `response` of
/// every event, and a stream that ends before `response.completed` ends with an error event.
async fn a_responses_stream_shows_the_asked_model_and_a_cut_one_ends_with_an_error(
    backend: Backend,
) {
    let (app, mock, _) = setup(backend, &[("ok-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    app.add_mapping(json!({"from": "alias", "to": "real-model"}))
        .await;
    let stream = |key: String| {
        let request = app
            .http
            .post(format!("{}/v1/responses", app.address))
            .bearer_auth(key)
            .json(&json!({"model": "alias", "input": "hi", "stream": true}));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }
    };
    let text = stream(key.clone()).await;
    assert_eq!(mock.calls()[0].body["model"], "real-model");
    assert!(!text.contains("real-model"), "{text}");
    assert_eq!(text.matches("\"model\":\"alias\"").count(), 2, "{text}");
    assert!(text.contains("response.completed"), "{text}");
    assert!(!text.contains("upstream_error"), "{text}");

    let cut = MockUpstream::start();
    let (user_id, cut_key) = app.user_with_key().await;
    app.add_upstream(
        json!({"provider": "openai", "base_url": cut.base_url, "secret": "cut-a",
                            "level": 2}),
    )
    .await;
    let path = format!("/admin/users/{user_id}");
    app.admin_json(Method::PATCH, &path, Some(json!({"level": 2})))
        .await;
    let text = stream(cut_key).await;
    assert!(text.contains("response.output_text.delta"), "{text}");
    assert!(
        text.trim_end().ends_with("\"code\":\"upstream_error\"}}"),
        "{text}"
    );
}

async fn keys_serve_only_the_models_they_list(backend: Backend) {
    let app = spawn_app(backend).await;
    let mock = MockUpstream::start();
    let mut gpt = upstream(&mock, "ok-gpt", 1);
    gpt["models"] = json!(["gpt-*"]);
    let mut claude = upstream(&mock, "ok-claude", 1);
    claude["models"] = json!(["claude-*"]);
    app.add_upstream(gpt).await;
    app.add_upstream(claude).await;
    let (_, key) = app.user_with_key().await;
    for _ in 0..3 {
        assert_eq!(app.chat(&key, hello("gpt-4o")).await.status(), 200);
    }
    assert_eq!(mock.calls_with("ok-gpt"), 3);
    assert_eq!(mock.calls_with("ok-claude"), 0);
    assert_error(
        into_json(app.chat(&key, hello("gemini-pro")).await).await,
        503,
        "no_upstream_available",
    );
}

async fn weights_share_the_calls(backend: Backend) {
    let app = spawn_app(backend).await;
    let mock = MockUpstream::start();
    let mut heavy = upstream(&mock, "ok-heavy", 1);
    heavy["weight"] = json!(3);
    app.add_upstream(heavy).await;
    app.add_upstream(upstream(&mock, "ok-light", 1)).await;
    let (_, key) = app.user_with_key().await;
    for _ in 0..8 {
        assert_eq!(app.chat(&key, hello("m")).await.status(), 200);
    }
    assert_eq!(mock.calls_with("ok-heavy"), 6);
    assert_eq!(mock.calls_with("ok-light"), 2);
}

async fn bad_call_bodies_are_refused_with_400(backend: Backend) {
    let (app, mock, _) = setup(backend, &[("ok-a", 1)]).await;
    let (_, key) = app.user_with_key().await;
    for body in [
        "{not json",
        "[1,2]",
        "{\"messages\": []}",
        "{\"model\": 5}",
        "{\"model\": \"\"}",
        // Control characters: no name holds one, and PostgreSQL cannot store a NUL.
        "{\"model\": \"gpt\\u0000x\"}",
        "{\"model\": \"gpt\\nx\"}",
        // Fields only a full parse reads (a stream asking for its usage is parsed again).
        "{\"model\": \"m\", \"stream\": true, \"stream_options\": {}, \"x\": 1e400}",
        "{\"model\": \"m\", \"stream\": true, \"stream_options\": {}, \"x\": \"\\ud800\"}",
    ] {
        let response = app
            .http
            .post(format!("{}/v1/chat/completions", app.address))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_error(into_json(response).await, 400, "invalid_request");
    }
    // Unauthenticated calls never reach the provider either.
    let response = app
        .http
        .post(format!("{}/v1/chat/completions", app.address))
        .json(&hello("m"))
        .send()
        .await
        .unwrap();
    assert_error(into_json(response).await, 401, "invalid_api_key");
    // A known path with the wrong method: the contract's JSON, typed as the caller's error.
    let response = app
        .http
        .post(format!("{}/v1/models", app.address))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let allow = response
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        allow.as_deref().is_some_and(|a| a.contains("GET")),
        "Allow: {allow:?}"
    );
    let (status, body) = into_json(response).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(mock.calls().len(), 0);
    // HEAD wherever GET is, as probes send it: the head alone.
    for path in ["/healthz", "/v1/models"] {
        let response = app
            .http
            .head(format!("{}{path}", app.address))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "HEAD {path}");
        assert!(response.bytes().await.unwrap().is_empty());
    }
    // The router goes on serving, and metering goes on writing: the refused calls held
    // nothing up.
    assert_eq!(app.chat(&key, hello("m")).await.status(), 200);
    eventually(30, || async {
        let (_, body) = app.admin_json(Method::GET, "/admin/logs", None).await;
        let served = body["data"].as_array().into_iter().flatten();
        match served.filter(|e| e["status"] == 200).count() {
            1 => Ok(()),
            _ => Err(format!("the served call is not logged yet: {body}")),
        }
    })
    .await;
}
