//! Metering: exact usage and cost for every kind of call, the usage event hidden from clients
//! that did not ask for it, partial streams, failed attempts, the budget, `/metrics`, and usage
//! that survives a SIGTERM and a database outage.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, eventually, fresh_database_url, has_sample, into_json, log_entries, spawn_app,
    spawn_app_with, Backend, Outage, TestApp,
};
use crate::mock_upstream::MockUpstream;
use crate::on_both_backends;
use crate::operations::Server;
use crate::proxy::transcription_form;

on_both_backends!(
    json_calls_are_metered_exactly,
    a_usage_that_is_not_last_is_metered_exactly,
    a_stream_is_metered_and_its_usage_hidden_unless_asked,
    embeddings_images_and_audio_are_metered,
    an_aborted_stream_is_metered_as_partial,
    a_failed_attempt_costs_nothing_but_is_logged,
    the_budget_is_enforced_from_metered_spend,
    metrics_are_exported,
    usage_survives_sigterm_right_after_the_calls,
    a_stream_in_flight_at_sigterm_is_finished_and_metered,
    a_stream_cut_at_the_shutdown_timeout_is_metered_as_partial,
    usage_survives_a_database_outage,
    pruned_log_entries_keep_their_usage,
    a_retried_batch_is_stored_and_counted_once,
    a_burst_is_metered_whole_though_accounted_in_slices,
    concurrent_prunes_count_each_entry_once,
    calls_dropped_in_an_outage_leave_the_budget,
    long_responses_are_metered_from_their_usage,
    an_escaped_path_is_metered_as_the_route_it_reached,
    a_row_the_database_refuses_is_set_aside_and_the_rest_are_written,
    a_whole_stream_without_usage_is_metered_from_what_it_delivered,
);

/// An app that writes its usage every 50 ms, so tests wait little.
async fn metered_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, &[("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "50")]).await
}

async fn set_price(app: &TestApp, model: &str, price: Value) {
    let (status, body) = app
        .admin_json(Method::PUT, &format!("/admin/prices/{model}"), Some(price))
        .await;
    assert!(matches!(status, 200 | 201), "{status}: {body}");
}

/// Polls `/admin/usage` (`query` without `?`) until its rows count `requests` calls in all.
async fn usage_rows(app: &TestApp, query: &str, requests: i64) -> Vec<Value> {
    eventually(30, || async move {
        let (status, body) = app
            .admin_json(Method::GET, &format!("/admin/usage?{query}"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        let rows = body["data"].as_array().unwrap().clone();
        let total: i64 = rows.iter().map(|r| r["requests"].as_i64().unwrap()).sum();
        assert!(total <= requests, "more usage than calls: {body}");
        if total == requests {
            Ok(rows)
        } else {
            Err(format!("usage never reached {requests}: {body}"))
        }
    })
    .await
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hello"}]})
}

/// A user and key, an upstream answering with `secret`, and the test prices: `metered-model`
/// at 2 in, 8 out, 0.5 cached in, 16 reasoning (USD per million tokens).
async fn setup(app: &TestApp, secret: &str) -> (MockUpstream, String, String) {
    let mock = MockUpstream::start();
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": secret}))
        .await;
    set_price(
        app,
        "metered-model",
        json!({"input_per_mtok": 2, "output_per_mtok": 8, "cached_input_per_mtok": 0.5,
               "reasoning_per_mtok": 16}),
    )
    .await;
    let (user_id, key) = app.user_with_key().await;
    (mock, user_id, key)
}

/// One `usage` call at the test prices: (1000 - 400) × 2 + 400 × 0.5 + (200 - 50) × 8 +
/// 50 × 16 = 3400 per million tokens.
const USAGE_CALL_USD: f64 = 0.0034;

async fn json_calls_are_metered_exactly(backend: Backend) {
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "usage-a").await;
    for _ in 0..3 {
        let response = app.chat(&key, hello("metered-model")).await;
        assert_eq!(response.status(), 200);
    }
    let rows = usage_rows(&app, &format!("group_by=model&user_id={user_id}"), 3).await;
    assert_eq!(
        rows,
        [
            json!({"model": "metered-model", "requests": 3, "prompt_tokens": 3000,
                "completion_tokens": 600, "reasoning_tokens": 150, "cached_tokens": 1200,
                "cost_usd": 0.0102})
        ]
    );
    let (_, by_user) = app
        .admin_json(Method::GET, "/admin/usage?group_by=user", None)
        .await;
    assert_eq!(by_user["data"][0]["user_id"], json!(user_id));
    assert_eq!(by_user["data"][0]["requests"], 3);
    let (_, by_day) = app
        .admin_json(
            Method::GET,
            "/admin/usage?group_by=day&since=2000-01-01",
            None,
        )
        .await;
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(by_day["data"][0]["day"], json!(today));
    let (_, none) = app
        .admin_json(Method::GET, "/admin/usage?until=2000-01-01", None)
        .await;
    assert_eq!(none["data"], json!([]));
    assert_error(
        app.admin_json(Method::GET, "/admin/usage?group_by=hour", None)
            .await,
        400,
        "invalid_request",
    );

    let entries = log_entries(&app, &format!("user_id={user_id}"), 3).await;
    for entry in &entries {
        assert_eq!(entry["status"], 200);
        assert_eq!(entry["model"], "metered-model");
        assert_eq!(entry["upstream_model"], "metered-model");
        assert_eq!(entry["level"], 1);
        assert_eq!(entry["attempts"], 1);
        assert_eq!(entry["prompt_tokens"], 1000);
        assert_eq!(entry["completion_tokens"], 200);
        assert_eq!(entry["cost_usd"], json!(USAGE_CALL_USD));
        assert_eq!(entry["partial"], false);
        assert!(entry["upstream_key_id"]
            .as_str()
            .unwrap()
            .starts_with("upk_"));
        assert!(entry["latency_ms"].as_i64().unwrap() >= 0);
        assert!(entry["ttfb_ms"].is_i64());
        assert!(
            !entry.to_string().contains("usage-a"),
            "a secret in a log entry"
        );
    }
    let times: Vec<&str> = entries.iter().map(|e| e["ts"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first");
    let (_, limited) = app
        .admin_json(
            Method::GET,
            &format!("/admin/logs?user_id={user_id}&limit=2"),
            None,
        )
        .await;
    assert_eq!(limited["data"].as_array().unwrap().len(), 2);
    assert_eq!(limited["has_more"], true);

    // The user's spend is what was metered.
    app.wait_for_spend(&user_id, 0.0102).await;
}

/// Usage is read alone when it ends the answer; an answer that puts it first, and ends with
/// another object's `usage` key, is read whole, and metered the same.
async fn a_usage_that_is_not_last_is_metered_exactly(backend: Backend) {
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "leading-a").await;
    let response = app.chat(&key, hello("metered-model")).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["usage"]["prompt_tokens"], 1000);
    let rows = usage_rows(&app, &format!("group_by=model&user_id={user_id}"), 1).await;
    assert_eq!(
        rows,
        [
            json!({"model": "metered-model", "requests": 1, "prompt_tokens": 1000,
                "completion_tokens": 200, "reasoning_tokens": 50, "cached_tokens": 400,
                "cost_usd": USAGE_CALL_USD})
        ]
    );
}

async fn a_stream_is_metered_and_its_usage_hidden_unless_asked(backend: Backend) {
    let app = metered_app(backend).await;
    let (mock, user_id, key) = setup(&app, "usage-s").await;
    let mut body = hello("metered-model");
    body["stream"] = json!(true);
    let text = app.chat(&key, body.clone()).await.text().await.unwrap();
    // The provider was asked for the usage; the client, which did not ask, sees none of it.
    assert_eq!(
        mock.calls()[0].body["stream_options"]["include_usage"],
        json!(true)
    );
    assert!(!text.contains("usage"), "{text}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4, "three chunks and [DONE]: {text}");
    assert_eq!(events[3], "data: [DONE]");

    // Options sent as null are replaced, not duplicated.
    body["stream_options"] = Value::Null;
    let text = app.chat(&key, body.clone()).await.text().await.unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert_eq!(
        mock.calls()[1].body["stream_options"]["include_usage"],
        json!(true)
    );

    // A client that asks gets the usage event.
    body["stream_options"] = json!({"include_usage": true});
    let text = app.chat(&key, body).await.text().await.unwrap();
    assert!(text.contains(r#""prompt_tokens":1000"#), "{text}");

    let rows = usage_rows(&app, &format!("user_id={user_id}"), 3).await;
    assert_eq!(rows[0]["prompt_tokens"], 3000);
    assert_eq!(rows[0]["completion_tokens"], 600);
    assert_eq!(rows[0]["cost_usd"], json!(0.0102));
}

/// actix routes `/v1/chat/%63ompletions` to chat completions: the call is then sent upstream,
/// checked and metered as a chat call too (it was metered as an unknown route, at $0, and a
/// stream's usage was not asked for).
async fn an_escaped_path_is_metered_as_the_route_it_reached(backend: Backend) {
    let app = metered_app(backend).await;
    let (mock, user_id, key) = setup(&app, "usage-s").await;
    let mut body = hello("metered-model");
    body["stream"] = json!(true);
    let response = app
        .http
        .post(format!("{}/v1/chat/%63ompletions", app.address))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains("usage"), "{text}");
    let sent = &mock.calls()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.body["stream_options"]["include_usage"], json!(true));
    let rows = usage_rows(&app, &format!("user_id={user_id}"), 1).await;
    assert_eq!(rows[0]["prompt_tokens"], 1000);
    let entries = log_entries(&app, &format!("user_id={user_id}"), 1).await;
    assert_eq!(entries[0]["route"], "/v1/chat/completions");
}

/// The accountant works through what it has queued in slices of 100 µs, stepping aside
/// between them: a burst far longer than one slice is still metered once per call, in full.
async fn a_burst_is_metered_whole_though_accounted_in_slices(backend: Backend) {
    const CALLS: usize = 400;
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "usage-a").await;
    for wave in 0..CALLS / 50 {
        let calls = (0..50).map(|_| app.chat(&key, hello("metered-model")));
        for response in futures_util::future::join_all(calls).await {
            assert_eq!(response.status(), 200, "wave {wave}");
        }
    }
    let rows = usage_rows(
        &app,
        &format!("group_by=user&user_id={user_id}"),
        CALLS as i64,
    )
    .await;
    assert_eq!(rows[0]["prompt_tokens"], json!(1000 * CALLS));
    let cost = rows[0]["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - USAGE_CALL_USD * CALLS as f64).abs() < 1e-9,
        "{CALLS} calls at {USAGE_CALL_USD}: {cost}"
    );
    let (_, user) = app
        .admin_json(Method::GET, &format!("/admin/users/{user_id}"), None)
        .await;
    assert!(
        (user["spent_usd"].as_f64().unwrap() - USAGE_CALL_USD * CALLS as f64).abs() < 1e-9,
        "{user}"
    );
}

async fn embeddings_images_and_audio_are_metered(backend: Backend) {
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "ok-media").await;
    set_price(
        &app,
        "embed-model",
        json!({"input_per_mtok": 0.1, "output_per_mtok": 0}),
    )
    .await;
    set_price(
        &app,
        "image-model",
        json!({"input_per_mtok": 0, "output_per_mtok": 0, "per_image": 0.04}),
    )
    .await;
    set_price(
        &app,
        "image-model:hd:1024x1792",
        json!({"input_per_mtok": 0, "output_per_mtok": 0, "per_image": 0.12}),
    )
    .await;
    set_price(
        &app,
        "voice-model",
        json!({"input_per_mtok": 15, "output_per_mtok": 0}),
    )
    .await;
    set_price(
        &app,
        "listen-model",
        json!({"input_per_mtok": 0, "output_per_mtok": 0, "per_audio_second": 0.0001}),
    )
    .await;
    let post = |path: &str, body: Value| {
        app.http
            .post(format!("{}{path}", app.address))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let mut request_ids = Vec::new();
    for (path, body) in [
        (
            "/v1/embeddings",
            json!({"model": "embed-model", "input": "abc"}),
        ),
        (
            "/v1/images/generations",
            json!({"model": "image-model", "prompt": "a cat", "n": 2, "size": "1024x1792", "quality": "hd"}),
        ),
        (
            "/v1/images/generations",
            json!({"model": "image-model", "prompt": "a dog"}),
        ),
        // 6 MiB of base64: more than metering keeps of an answer, still counted whole.
        (
            "/v1/images/generations",
            json!({"model": "image-model", "prompt": "a bird", "n": 3, "response_format": "b64_json"}),
        ),
        (
            "/v1/audio/speech",
            json!({"model": "voice-model", "input": "Hello there", "voice": "alloy"}),
        ),
    ] {
        let response = post(path, body).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        request_ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        response.bytes().await.unwrap();
    }
    let response = app
        .http
        .post(format!("{}/v1/audio/transcriptions", app.address))
        .bearer_auth(&key)
        .multipart(transcription_form("listen-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    request_ids.push(
        response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned(),
    );
    // A plain-text transcript says nothing of the audio: its 4 words are 1.6 s of speech.
    let response = app
        .http
        .post(format!("{}/v1/audio/transcriptions", app.address))
        .bearer_auth(&key)
        .multipart(transcription_form("listen-model").text("response_format", "text"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "hello from the mock\n");

    let rows = usage_rows(&app, &format!("group_by=model&user_id={user_id}"), 7).await;
    let row = |model: &str| rows.iter().find(|r| r["model"] == model).unwrap().clone();
    // Four models: pages of two.
    assert_eq!(rows.len(), 4);
    for (page, more) in [("limit=2", true), ("limit=2&offset=2", false)] {
        let (status, body) = app
            .admin_json(
                Method::GET,
                &format!("/admin/usage?user_id={user_id}&{page}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"].as_array().unwrap().len(), 2, "{page}: {body}");
        assert_eq!(body["has_more"], more, "{page}: {body}");
    }
    assert_error(
        app.admin_json(Method::GET, "/admin/usage?limit=0", None)
            .await,
        400,
        "invalid_request",
    );
    assert_eq!(row("embed-model")["prompt_tokens"], 8);
    assert_eq!(row("embed-model")["cost_usd"], json!(0.0000008));
    assert_eq!(row("image-model")["requests"], 3);
    assert_eq!(
        row("image-model")["cost_usd"],
        json!(0.4),
        "2 × 0.12 + 0.04 + 3 × 0.04"
    );
    assert_eq!(
        row("voice-model")["cost_usd"],
        json!(0.000165),
        "11 characters at 15 per million"
    );
    assert_eq!(
        row("listen-model")["cost_usd"],
        json!(0.00316),
        "30 s and 1.6 s at 0.0001"
    );

    let db = app.db();
    let stored = |i: usize| {
        let (db, id) = (db.clone(), request_ids[i].clone());
        async move { switchyard::db::repo::logs::get(&db, &id).await.unwrap() }
    };
    assert_eq!(stored(1).await.images, 2);
    assert_eq!(stored(2).await.images, 1);
    assert_eq!(stored(3).await.images, 3);
    assert_eq!(stored(4).await.characters, 11);
    assert_eq!(stored(5).await.audio_seconds, 30.0);
}

async fn an_aborted_stream_is_metered_as_partial(backend: Backend) {
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "drip-a").await;
    let mut body = hello("gpt-4o");
    body["stream"] = json!(true);
    let mut response = app.chat(&key, body).await;
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().expect("a first chunk");
    assert!(String::from_utf8_lossy(&first).contains("\"x\""));
    drop(response);

    let entries = log_entries(&app, &format!("user_id={user_id}"), 1).await;
    assert_eq!(entries[0]["status"], 200);
    assert_eq!(entries[0]["partial"], true);
    let rows = usage_rows(&app, &format!("user_id={user_id}"), 1).await;
    // "Hello" is one token, with 4 for its message and 3 for the reply; each delivered chunk
    // is one "x", and far fewer than the 50 of the whole stream were delivered.
    assert_eq!(rows[0]["prompt_tokens"], 8);
    let completion = rows[0]["completion_tokens"].as_i64().unwrap();
    assert!((1..50).contains(&completion), "{completion}");
    assert!(rows[0]["cost_usd"].as_f64().unwrap() > 0.0);
}

async fn a_failed_attempt_costs_nothing_but_is_logged(backend: Backend) {
    let app = metered_app(backend).await;
    let mock = MockUpstream::start();
    let refused = app
        .add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "r429-a", "level": 1}))
        .await;
    let answered = app
        .add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "usage-b", "level": 2}))
        .await;
    set_price(&app, "metered-model", json!({"input_per_mtok": 2, "output_per_mtok": 8, "cached_input_per_mtok": 0.5, "reasoning_per_mtok": 16})).await;
    let user = app.create_user(json!({"fallback_levels": [2]})).await;
    let user_id = user["id"].as_str().unwrap();
    let (_, key) = app.create_key(user_id, json!({})).await;
    assert_eq!(app.chat(&key, hello("metered-model")).await.status(), 200);

    let entries = log_entries(&app, &format!("user_id={user_id}"), 1).await;
    assert_eq!(entries[0]["attempts"], 2);
    assert_eq!(entries[0]["level"], 2);
    assert_eq!(entries[0]["upstream_key_id"], json!(answered));
    let rows = usage_rows(&app, &format!("user_id={user_id}"), 1).await;
    assert_eq!(
        rows[0]["cost_usd"],
        json!(USAGE_CALL_USD),
        "only the answer is billed"
    );
    let metrics = app.metrics().await;
    assert!(
        has_sample(
            &metrics,
            "switchyard_upstream_attempts_total",
            &[
                &format!("upstream_key_id=\"{refused}\""),
                "outcome=\"rate_limited\""
            ],
            "1"
        ),
        "{metrics}"
    );
    assert!(has_sample(
        &metrics,
        "switchyard_upstream_attempts_total",
        &[
            &format!("upstream_key_id=\"{answered}\""),
            "outcome=\"answered\""
        ],
        "1"
    ));
}

async fn the_budget_is_enforced_from_metered_spend(backend: Backend) {
    let app = metered_app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "usage-c"}))
        .await;
    // 1000 prompt tokens at 1000 USD per million: 1 USD a call, against a 1.5 USD limit.
    set_price(
        &app,
        "pricey",
        json!({"input_per_mtok": 1000, "output_per_mtok": 0}),
    )
    .await;
    let user = app.create_user(json!({"spend_limit_usd": 1.5})).await;
    let user_id = user["id"].as_str().unwrap();
    let (_, key) = app.create_key(user_id, json!({})).await;
    assert_eq!(app.chat(&key, hello("pricey")).await.status(), 200);
    assert_eq!(app.chat(&key, hello("pricey")).await.status(), 200);
    let refusal = eventually(10, || {
        let key = key.clone();
        let app = &app;
        async move {
            let answer = into_json(app.chat(&key, hello("pricey")).await).await;
            if answer.0 == 402 {
                Ok(answer)
            } else {
                Err(format!("the budget was never enforced: {answer:?}"))
            }
        }
    })
    .await;
    assert_error(refusal, 402, "budget_exceeded");
    // The refusal is logged with its code.
    let entry = &log_entries(&app, &format!("user_id={user_id}&status=402"), 1).await[0];
    assert_eq!(entry["error_code"], "budget_exceeded");
    assert_eq!(entry["cost_usd"], json!(0.0));
}

async fn metrics_are_exported(backend: Backend) {
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "usage-m").await;
    for _ in 0..2 {
        assert_eq!(app.chat(&key, hello("metered-model")).await.status(), 200);
    }
    usage_rows(&app, &format!("user_id={user_id}"), 2).await;
    let metrics = app.metrics().await;
    let route = "route=\"/v1/chat/completions\"";
    assert!(
        has_sample(
            &metrics,
            "switchyard_calls_total",
            &[route, "model=\"metered-model\"", "status=\"200\""],
            "2"
        ),
        "{metrics}"
    );
    assert!(has_sample(
        &metrics,
        "switchyard_call_duration_seconds_count",
        &[route],
        "2"
    ));
    assert!(has_sample(
        &metrics,
        "switchyard_time_to_first_byte_seconds_count",
        &[route],
        "2"
    ));
    assert!(has_sample(
        &metrics,
        "switchyard_tokens_total",
        &["model=\"metered-model\"", "kind=\"prompt\""],
        "2000"
    ));
    assert!(has_sample(
        &metrics,
        "switchyard_tokens_total",
        &["kind=\"reasoning\""],
        "100"
    ));
    assert!(has_sample(
        &metrics,
        "switchyard_cost_usd_total",
        &["model=\"metered-model\""],
        "0.0068"
    ));
    assert!(has_sample(
        &metrics,
        "switchyard_cache_lookups_total",
        &["cache=\"user_keys\"", "layer=\"memory\"", "result=\"hit\""],
        "1"
    ));
    assert!(has_sample(
        &metrics,
        "switchyard_cache_hit_ratio",
        &["cache=\"user_keys\"", "layer=\"memory\""],
        "0.5"
    ));
    assert!(metrics.contains("switchyard_queue_depth{queue=\"writes\"}"));
    assert!(!metrics.contains("usage-m"), "a secret in the metrics");
}

/// A batch written again after a failure (some of its calls already stored) stores each call
/// once and adds each cost once. The batch is larger than one PostgreSQL insert may bind, so it
/// goes in several, and the retry finds calls stored in each of them.
async fn a_retried_batch_is_stored_and_counted_once(backend: Backend) {
    use switchyard::db::{models::LogRow, repo};
    let app = spawn_app(backend).await;
    let user_id = app.create_user(json!({"name": "batch"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let batch: Vec<String> = (0..3_000)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let row = |id: &String| log_row(id, &user_id);
    let db = app.db();
    let first: Vec<LogRow> = batch[..2_700].iter().map(row).collect();
    let written = repo::usage::insert_batch(&db, first).await.unwrap();
    assert_eq!(written.users, vec![(user_id.clone(), 2_700_000, 2_700_000)]);
    // The same calls again with three hundred more, as a retried batch would be.
    let again: Vec<LogRow> = batch.iter().map(row).collect();
    let written = repo::usage::insert_batch(&db, again).await.unwrap();
    assert_eq!(written.users, vec![(user_id.clone(), 3_000_000, 3_000_000)]);
    assert_eq!(stored(&db, &user_id).await, (3_000, 3_000_000, 3_000));
}

/// A metered call's log entry as the accountant writes it: 9 + 2 tokens, 1,000 nanodollars.
fn log_row(id: &str, user_id: &str) -> switchyard::db::models::LogRow {
    switchyard::db::models::LogRow {
        id: id.to_owned(),
        ts: chrono::Utc::now().naive_utc(),
        user_id: Some(user_id.to_owned()),
        key_id: Some("key_batch".into()),
        route: "/v1/chat/completions".into(),
        model: Some("gpt-4o-mini".into()),
        upstream_model: Some("gpt-4o-mini".into()),
        upstream_key_id: None,
        level: Some(0),
        status: 200,
        attempts: 1,
        latency_ms: 3,
        ttfb_ms: Some(2),
        prompt_tokens: 9,
        completion_tokens: 2,
        cost_nanos: 1_000,
        partial: false,
        error_code: None,
        metered: true,
        reasoning_tokens: 0,
        cached_tokens: 0,
        images: 0,
        audio_seconds: 0.0,
        characters: 0,
    }
}

/// Replicas prune at the same time (each runs retention): every entry reaches the daily sums
/// once, whichever replica moved it.
async fn concurrent_prunes_count_each_entry_once(backend: Backend) {
    use switchyard::db::repo;
    let app = spawn_app(backend).await;
    let user_id = app.create_user(json!({"name": "prunes"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let db = app.db();
    let rows: Vec<_> = (0..3_000)
        .map(|_| log_row(&uuid::Uuid::now_v7().to_string(), &user_id))
        .collect();
    repo::usage::insert_batch(&db, rows).await.unwrap();
    let cutoff = switchyard::domain::now() + chrono::TimeDelta::minutes(1);
    let pruned =
        futures_util::future::join_all((0..4).map(|_| repo::logs::prune(&db, cutoff))).await;
    let pruned: usize = pruned.into_iter().map(Result::unwrap).sum();
    assert_eq!(pruned, 3_000, "each entry pruned once");
    // What an admin reads: the calls counted once, their entries gone from the log.
    let rows = usage_rows(&app, &format!("group_by=user&user_id={user_id}"), 3_000).await;
    assert_eq!(
        rows[0]["cost_usd"],
        json!(0.003),
        "3,000 calls at 1,000 nano-USD"
    );
    log_entries(&app, &format!("user_id={user_id}"), 0).await;
}

/// A user's metered calls, their cost and log entries, straight from the database.
async fn stored(db: &switchyard::db::Db, user_id: &str) -> (i64, i64, usize) {
    use switchyard::db::repo;
    let filter = repo::usage::UsageFilter {
        user_id: Some(user_id.to_owned()),
        ..Default::default()
    };
    let groups = repo::usage::summary(db, &filter, repo::usage::GroupBy::User)
        .await
        .unwrap();
    (
        groups.iter().map(|g| g.requests).sum(),
        groups.iter().map(|g| g.cost_nanos).sum(),
        stored_entries(db, user_id).await.len(),
    )
}

/// A user's log entries, straight from the database, newest first.
async fn stored_entries(
    db: &switchyard::db::Db,
    user_id: &str,
) -> Vec<switchyard::db::models::LogRow> {
    use switchyard::db::repo;
    let logs = repo::logs::LogFilter {
        user_id: Some(user_id.to_owned()),
        status: None,
    };
    let page = repo::Page {
        limit: 10_000,
        offset: 0,
    };
    repo::logs::list(db, &logs, page).await.unwrap().0
}

/// Starts a `drip` stream (50 chunks over 5 s) for `key`, sends the server SIGTERM once its
/// first chunk is in, and reads the rest: the text received, and whether the stream broke off.
async fn stream_through_sigterm(server: &Server, app: &TestApp, key: &str) -> (String, bool) {
    let mut body = hello("metered-model");
    body["stream"] = json!(true);
    let response = app.chat(key, body).await;
    assert_eq!(response.status(), 200);
    let mut chunks = response.bytes_stream();
    let mut text = String::from_utf8(chunks.next().await.unwrap().unwrap().to_vec()).unwrap();
    server.send_sigterm();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(chunk) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

/// The real binary on a fresh database, writing no metering on a timer (only the shutdown
/// flush can store calls), and the app attached to it. The directory holds its files.
async fn binary_metering_only_at_exit(
    backend: Backend,
) -> (Server, TestApp, crate::helpers::tempdir::Dir) {
    binary_metering_only_at_exit_with(backend, &[]).await
}

/// As [`binary_metering_only_at_exit`], with `extra` settings.
async fn binary_metering_only_at_exit_with(
    backend: Backend,
    extra: &[(&str, &str)],
) -> (Server, TestApp, crate::helpers::tempdir::Dir) {
    let (database_url, dir) = fresh_database_url(backend).await;
    let dir = dir.unwrap_or_else(crate::helpers::tempdir::Dir::new);
    let token = format!("admin-{}", uuid::Uuid::new_v4().simple());
    let master_key = switchyard::crypto::MasterKey::generate_base64().unwrap();
    let env = [
        ("SWITCHYARD_DATABASE_URL", database_url.as_str()),
        ("SWITCHYARD_ADMIN_TOKEN", token.as_str()),
        ("SWITCHYARD_MASTER_KEY", master_key.as_str()),
        ("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "600000"),
    ];
    let env: Vec<(&str, &str)> = env.iter().chain(extra).copied().collect();
    let server = Server::start(dir.path(), &env).await;
    let app = TestApp::attach(&server.address, &token, &master_key, &database_url);
    (server, app, dir)
}

async fn usage_survives_sigterm_right_after_the_calls(backend: Backend) {
    let (server, app, _dir) = binary_metering_only_at_exit(backend).await;
    let (_mock, user_id, key) = setup(&app, "usage-t").await;
    let calls = (0..20).map(|_| app.chat(&key, hello("metered-model")));
    for response in futures_util::future::join_all(calls).await {
        assert_eq!(response.status(), 200);
    }
    let (status, log) = server.terminate();
    assert!(status.success(), "exit status {status}: {log}");
    // Every call, at its exact cost (0.0034 USD each), and its log entry.
    assert_eq!(
        stored(&app.db(), &user_id).await,
        (20, 20 * 3_400_000, 20),
        "{log}"
    );
}

/// SIGTERM while a stream is on its way: the process finishes the stream (within
/// `server.shutdown_timeout_secs`), meters it, and exits 0.
async fn a_stream_in_flight_at_sigterm_is_finished_and_metered(backend: Backend) {
    let (server, app, _dir) = binary_metering_only_at_exit(backend).await;
    let (_mock, user_id, key) = setup(&app, "drip-t").await;
    let (text, broke) = stream_through_sigterm(&server, &app, &key).await;
    assert!(!broke, "the stream ended whole: {text}");
    assert_eq!(
        text.matches("\"object\":\"chat.completion.chunk\"").count(),
        50,
        "every chunk: {text}"
    );
    let (status, log) = server.wait_for_exit();
    assert!(status.success(), "exit status {status}: {log}");
    let (requests, _, entries) = stored(&app.db(), &user_id).await;
    assert_eq!((requests, entries), (1, 1), "{log}");
}

/// SIGTERM while a stream longer than `server.shutdown_timeout_secs` is on its way: the stream
/// is cut when the grace ends, and what was delivered is metered, marked partial, before exit.
async fn a_stream_cut_at_the_shutdown_timeout_is_metered_as_partial(backend: Backend) {
    let (server, app, _dir) = binary_metering_only_at_exit_with(
        backend,
        &[("SWITCHYARD_SERVER__SHUTDOWN_TIMEOUT_SECS", "1")],
    )
    .await;
    // Most of the stream's 5 s are still to come when the grace ends.
    let (_mock, user_id, key) = setup(&app, "drip-c").await;
    let (text, _) = stream_through_sigterm(&server, &app, &key).await;
    let delivered = text.matches("\"object\":\"chat.completion.chunk\"").count();
    assert!(delivered < 50, "the stream was cut: {text}");
    let (status, log) = server.wait_for_exit();
    assert!(status.success(), "exit status {status}: {log}");
    let (requests, _, entries) = stored(&app.db(), &user_id).await;
    assert_eq!((requests, entries), (1, 1), "{log}");
    assert!(
        stored_entries(&app.db(), &user_id).await[0].partial,
        "{log}"
    );
}

/// `calls` successful calls while the database is away, which comes back once writes have
/// failed (SQLite's busy timeout is 5 s) and been retried.
async fn calls_through_an_outage(app: &TestApp, backend: Backend, key: &str, calls: usize) {
    let outage = Outage::begin(backend, &app.database_url).await;
    for _ in 0..calls {
        assert_eq!(app.chat(key, hello("metered-model")).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    outage.end().await;
}

async fn usage_survives_a_database_outage(backend: Backend) {
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "usage-o").await;
    // One call before, so the key and the user are in the caches the outage cannot reach.
    assert_eq!(app.chat(&key, hello("metered-model")).await.status(), 200);
    usage_rows(&app, &format!("user_id={user_id}"), 1).await;

    calls_through_an_outage(&app, backend, &key, 10).await;

    // Everything lands once the database is back, and nothing twice.
    let rows = usage_rows(&app, &format!("user_id={user_id}"), 11).await;
    assert_eq!(rows[0]["prompt_tokens"], 11_000);
    assert_eq!(rows[0]["cost_usd"], json!(0.0374), "11 calls at 0.0034");
    log_entries(&app, &format!("user_id={user_id}"), 11).await;
}

/// A Responses answer longer than metering keeps whole still gives its usage: a stream's last
/// event, which repeats the output ahead of the usage, is kept whole, and a JSON answer's tail
/// holds its usage, which other fields follow.
async fn long_responses_are_metered_from_their_usage(backend: Backend) {
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "long-r").await;
    let response = app
        .http
        .post(format!("{}/v1/responses", app.address))
        .bearer_auth(&key)
        .json(&json!({"model": "metered-model", "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().len() > 5 * 1024 * 1024);
    let response = app
        .http
        .post(format!("{}/v1/responses", app.address))
        .bearer_auth(&key)
        .json(&json!({"model": "metered-model", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().len() > 5 * 1024 * 1024);
    let entries = log_entries(&app, &format!("user_id={user_id}"), 2).await;
    for entry in &entries {
        assert_eq!(entry["prompt_tokens"], 9, "{entry}");
        assert_eq!(entry["completion_tokens"], 2, "{entry}");
        assert_eq!(entry["partial"], false, "{entry}");
    }
}

/// Calls dropped because the outage outlasted the buffer are lost, and so is their spend: it
/// no longer counts against the user's budget once the database is back.
async fn calls_dropped_in_an_outage_leave_the_budget(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "50"),
            ("SWITCHYARD_METERING__BUFFER_RECORDS", "2"),
        ],
    )
    .await;
    let (_mock, user_id, key) = setup(&app, "usage-d").await;
    // 0.0034 a call: room for four calls, not for six.
    let path = format!("/admin/users/{user_id}");
    let (status, _) = app
        .admin_json(
            Method::PATCH,
            &path,
            Some(json!({"spend_limit_usd": 0.015})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(app.chat(&key, hello("metered-model")).await.status(), 200);
    usage_rows(&app, &format!("user_id={user_id}"), 1).await;

    // Two of these calls wait in the buffer, two are dropped.
    calls_through_an_outage(&app, backend, &key, 4).await;

    let rows = usage_rows(&app, &format!("user_id={user_id}"), 3).await;
    assert_eq!(rows[0]["cost_usd"], json!(0.0102), "3 calls at 0.0034");
    // 0.0102 spent: the next call fits the budget (with the lost calls' 0.0068 it would not).
    assert_eq!(app.chat(&key, hello("metered-model")).await.status(), 200);
}

async fn pruned_log_entries_keep_their_usage(backend: Backend) {
    let app = metered_app(backend).await;
    let (_mock, user_id, key) = setup(&app, "usage-p").await;
    for _ in 0..3 {
        assert_eq!(app.chat(&key, hello("metered-model")).await.status(), 200);
    }
    let query = format!("group_by=model&user_id={user_id}");
    let before = usage_rows(&app, &query, 3).await;
    log_entries(&app, &format!("user_id={user_id}"), 3).await;

    // Retention reaches every entry: they leave the log, their usage stays, per day.
    let db = app.db();
    let cutoff = switchyard::domain::now() + chrono::TimeDelta::minutes(1);
    assert_eq!(
        switchyard::db::repo::logs::prune(&db, cutoff)
            .await
            .unwrap(),
        3
    );
    log_entries(&app, &format!("user_id={user_id}"), 0).await;
    assert_eq!(usage_rows(&app, &query, 3).await, before);
    let today = switchyard::domain::now().format("%Y-%m-%d").to_string();
    let days = usage_rows(
        &app,
        &format!("group_by=day&user_id={user_id}&since={today}"),
        3,
    )
    .await;
    assert_eq!(days[0]["day"], json!(today), "{days:?}");
    let (_, later) = app
        .admin_json(
            Method::GET,
            &format!("/admin/usage?user_id={user_id}&until={today}"),
            None,
        )
        .await;
    assert_eq!(later["data"], json!([]), "a day before today holds nothing");

    // New calls add to the same totals, and a second prune adds to the daily sums.
    assert_eq!(app.chat(&key, hello("metered-model")).await.status(), 200);
    let rows = usage_rows(&app, &query, 4).await;
    assert_eq!(rows[0]["cost_usd"], json!(4.0 * USAGE_CALL_USD));
    let cutoff = switchyard::domain::now() + chrono::TimeDelta::minutes(1);
    assert_eq!(
        switchyard::db::repo::logs::prune(&db, cutoff)
            .await
            .unwrap(),
        1
    );
    let rows = usage_rows(&app, &query, 4).await;
    assert_eq!(rows[0]["prompt_tokens"], json!(4000));
    assert_eq!(rows[0]["cost_usd"], json!(4.0 * USAGE_CALL_USD));
}

/// Runs `sql` on the app's database, behind the router's back.
async fn execute_on_database(app: &TestApp, backend: Backend, sql: &str) {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    match backend {
        Backend::Sqlite => {
            let path = app.database_url.trim_start_matches("sqlite://").to_owned();
            let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<
                diesel::SqliteConnection,
            >::establish(&path)
            .await
            .unwrap();
            conn.batch_execute(sql).await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = diesel_async::AsyncPgConnection::establish(&app.database_url)
                .await
                .unwrap();
            conn.batch_execute(sql).await.unwrap();
        }
    }
}

/// A row the database refuses (here a constraint the test adds; in life, say, a value it
/// cannot store) would fail its batch on every retry and hold up every call behind it: the
/// batch is written row by row instead, the refused row set aside and counted, the rest kept.
async fn a_row_the_database_refuses_is_set_aside_and_the_rest_are_written(backend: Backend) {
    // Batches of up to 1,000 rows every 2 s, so the refused call shares a batch with others.
    let app = spawn_app_with(
        backend,
        &[("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "2000")],
    )
    .await;
    let (_mock, user_id, key) = setup(&app, "usage-r").await;
    let refuse = match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER refuse_model BEFORE INSERT ON request_logs \
             WHEN NEW.model = 'refused-model' BEGIN SELECT RAISE(ABORT, 'refused'); END;"
        }
        Backend::Postgres => {
            "ALTER TABLE request_logs ADD CONSTRAINT refuse_model \
             CHECK (model IS DISTINCT FROM 'refused-model')"
        }
    };
    execute_on_database(&app, backend, refuse).await;
    for model in ["metered-model", "refused-model", "metered-model"] {
        assert_eq!(app.chat(&key, hello(model)).await.status(), 200);
    }
    let logged = |wanted: usize| {
        let app = &app;
        async move {
            let (_, body) = app.admin_json(Method::GET, "/admin/logs", None).await;
            let models: Vec<Value> = body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["model"].clone())
                .collect();
            match models.len() {
                n if n == wanted => Ok(models),
                _ => Err(format!("{} entries, not {wanted}: {body}", models.len())),
            }
        }
    };
    let models = eventually(30, || logged(2)).await;
    assert!(models.iter().all(|m| m == "metered-model"), "{models:?}");
    assert!(has_sample(
        &app.metrics().await,
        "switchyard_dropped_records_total",
        &["queue=\"writes\""],
        "1"
    ));
    // Nothing is held up: a later call is written too, and its usage counted.
    assert_eq!(app.chat(&key, hello("metered-model")).await.status(), 200);
    eventually(30, || logged(3)).await;
    usage_rows(&app, &format!("user_id={user_id}"), 3).await;
}

/// A stream that ends normally with no usage (a server that sends none, or the router told not
/// to ask for it) is metered from the request and the text it delivered, not at nothing.
async fn a_whole_stream_without_usage_is_metered_from_what_it_delivered(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("SWITCHYARD_METERING__FLUSH_INTERVAL_MS", "50"),
            ("SWITCHYARD_UPSTREAM__REQUEST_STREAM_USAGE", "false"),
        ],
    )
    .await;
    let (_mock, user_id, key) = setup(&app, "ok-w").await;
    let mut body = hello("gpt-4o");
    body["stream"] = json!(true);
    let response = app.chat(&key, body).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    assert!(
        !text.contains("\"usage\""),
        "the stream carried no usage: {text}"
    );

    let entries = log_entries(&app, &format!("user_id={user_id}"), 1).await;
    assert_eq!(entries[0]["partial"], false);
    let rows = usage_rows(&app, &format!("user_id={user_id}"), 1).await;
    // "Hello" is one token, with 4 for its message and 3 for the reply; the reply ("Hel",
    // "lo") is "Hello" again.
    assert_eq!(rows[0]["prompt_tokens"], 8);
    assert_eq!(rows[0]["completion_tokens"], 1);
    assert!(rows[0]["cost_usd"].as_f64().unwrap() > 0.0, "{}", rows[0]);
}
