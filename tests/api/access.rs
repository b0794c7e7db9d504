//! The access gate and rate limits as a caller meets them: each 403, 402 and 429 with its code
//! and headers, the trusted-proxy rule, per-model limits, and TPM settled with real usage.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, header, into_json, spawn_app, spawn_app_with, Backend, SharedRedis, TestApp,
};
use crate::mock_upstream::MockUpstream;
use crate::on_both_backends;

on_both_backends!(
    the_ip_allowlist_ignores_a_forged_forwarded_for_by_default,
    a_trusted_proxy_names_the_client,
    suspended_over_budget_and_acl_refusals_have_their_codes,
    the_models_list_shows_only_allowed_models,
    a_key_without_models_lists_what_its_provider_serves,
    rpm_refuses_with_retry_after_and_the_headers_count_down,
    model_limits_apply_only_to_their_models,
    tpm_is_settled_with_the_usage_the_answer_reports,
    tpm_is_settled_from_a_streamed_usage_chunk,
    rule_and_limit_changes_apply_on_the_next_call,
    a_remembered_refusal_refuses_only_what_it_must,
    a_huge_completion_cap_is_charged_without_upsetting_the_counts,
);

async fn app_with_upstream(backend: Backend, secret: &str) -> (TestApp, MockUpstream) {
    let app = spawn_app(backend).await;
    let mock = add_mock(&app, secret).await;
    (app, mock)
}

async fn add_mock(app: &TestApp, secret: &str) -> MockUpstream {
    let mock = MockUpstream::start();
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": secret}))
        .await;
    mock
}

/// A user with these fields and a key for it: (user id, key).
async fn user(app: &TestApp, fields: Value) -> (String, String) {
    let user = app.create_user(fields).await;
    let id = user["id"].as_str().unwrap().to_owned();
    let (_, key) = app.create_key(&id, json!({})).await;
    (id, key)
}

/// A chat call for `model`: status and body.
async fn ask(app: &TestApp, key: &str, model: &str) -> (u16, Value) {
    into_json(app.chat(key, hello(model)).await).await
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

async fn chat_from(app: &TestApp, key: &str, forwarded_for: Option<&str>) -> (u16, Value) {
    let mut request = app
        .http
        .post(format!("{}/v1/chat/completions", app.address))
        .bearer_auth(key)
        .json(&hello("gpt-4o-mini"));
    if let Some(value) = forwarded_for {
        request = request.header("x-forwarded-for", value);
    }
    into_json(request.send().await.unwrap()).await
}

async fn the_ip_allowlist_ignores_a_forged_forwarded_for_by_default(backend: Backend) {
    let (app, mock) = app_with_upstream(backend, "ok-a").await;
    let (_, elsewhere) = user(&app, json!({"ip_allowlist": ["10.9.9.0/24"]})).await;
    let (_, here) = user(&app, json!({"ip_allowlist": ["127.0.0.1", "::1"]})).await;
    assert_error(
        chat_from(&app, &elsewhere, None).await,
        403,
        "ip_not_allowed",
    );
    // No proxy is trusted: the header is the caller's own word and changes nothing.
    assert_error(
        chat_from(&app, &elsewhere, Some("10.9.9.9")).await,
        403,
        "ip_not_allowed",
    );
    assert_eq!(chat_from(&app, &here, Some("10.9.9.9")).await.0, 200);
    assert_eq!(
        mock.calls().len(),
        1,
        "refused calls never reach the provider"
    );
}

async fn a_trusted_proxy_names_the_client(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[("SWITCHYARD_SERVER__TRUSTED_PROXIES", "127.0.0.0/8")],
    )
    .await;
    add_mock(&app, "ok-a").await;
    let (_, key) = user(&app, json!({"ip_allowlist": ["10.9.9.0/24"]})).await;
    // The test client is the trusted proxy (127.0.0.1): the header names the client.
    assert_eq!(chat_from(&app, &key, Some("10.9.9.9")).await.0, 200);
    assert_error(
        chat_from(&app, &key, Some("6.6.6.6")).await,
        403,
        "ip_not_allowed",
    );
    // A forged left-most entry is not believed: the right-most untrusted hop is the client.
    assert_error(
        chat_from(&app, &key, Some("10.9.9.9, 6.6.6.6")).await,
        403,
        "ip_not_allowed",
    );
    assert_eq!(
        chat_from(&app, &key, Some("6.6.6.6, 10.9.9.9, 127.0.0.1"))
            .await
            .0,
        200
    );
    // Without the header the proxy itself is the caller.
    assert_error(chat_from(&app, &key, None).await, 403, "ip_not_allowed");

    // A header with bytes that are not text is read all the same: the client's garbage is no
    // address, so the proxy's own one is not taken for the caller's.
    let (_, inside) = user(&app, json!({"ip_allowlist": ["127.0.0.0/8"]})).await;
    for forged in [&b"\xff"[..], b"\xff, 6.6.6.6"] {
        let response = app
            .http
            .post(format!("{}/v1/chat/completions", app.address))
            .bearer_auth(&inside)
            .header(
                "x-forwarded-for",
                reqwest::header::HeaderValue::from_bytes(forged).unwrap(),
            )
            .json(&hello("gpt-4o-mini"))
            .send()
            .await
            .unwrap();
        assert_error(into_json(response).await, 403, "ip_not_allowed");
    }
}

async fn suspended_over_budget_and_acl_refusals_have_their_codes(backend: Backend) {
    let (app, mock) = app_with_upstream(backend, "ok-a").await;
    let (_, suspended) = user(&app, json!({"status": "suspended"})).await;
    assert_error(
        chat_from(&app, &suspended, None).await,
        403,
        "user_suspended",
    );

    let (_, broke) = user(&app, json!({"spend_limit_usd": 0})).await;
    assert_error(chat_from(&app, &broke, None).await, 402, "budget_exceeded");

    let (_, picky) = user(&app, json!({"allowed_models": ["gpt-4o*"]})).await;
    assert_eq!(ask(&app, &picky, "gpt-4o-mini").await.0, 200);
    assert_error(ask(&app, &picky, "o3").await, 403, "model_not_allowed");

    let (_, embed_only) = user(&app, json!({"allowed_endpoints": ["/v1/embeddings"]})).await;
    assert_error(
        chat_from(&app, &embed_only, None).await,
        403,
        "endpoint_not_allowed",
    );
    let embedded = app
        .http
        .post(format!("{}/v1/embeddings", app.address))
        .bearer_auth(&embed_only)
        .json(&json!({"model": "text-embedding-3-small", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(embedded.status(), 200);
    assert_error(
        app.call_with_key(&embed_only).await,
        403,
        "endpoint_not_allowed",
    );
    assert_eq!(
        mock.calls().len(),
        2,
        "only the two allowed calls went upstream"
    );
}

async fn the_models_list_shows_only_allowed_models(backend: Backend) {
    let app = spawn_app(backend).await;
    // Priced models are listed when a key may serve them; this key serves three of them.
    app.add_upstream(
        json!({"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "secret": "ok",
                            "models": ["gpt-4o", "gpt-4o-mini", "o3"]}),
    )
    .await;
    for model in ["gpt-4o", "gpt-4o-mini", "o3", "my-model"] {
        let (status, _) = app
            .admin_json(
                Method::PUT,
                &format!("/admin/prices/{model}"),
                Some(json!({"input_per_mtok": 1, "output_per_mtok": 2})),
            )
            .await;
        assert!(matches!(status, 200 | 201), "{status}");
    }
    // Keys that cannot serve the caller add nothing: one on a level it does not reach, one
    // taken out of service.
    app.add_upstream(
        json!({"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "secret": "far",
               "level": 7, "models": ["gpt-4o-far"]}),
    )
    .await;
    let off = app
        .add_upstream(
            json!({"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "secret": "off",
                   "models": ["gpt-4o-off"]}),
        )
        .await;
    let path = format!("/admin/upstream-keys/{off}");
    let patched = app
        .admin_json(Method::PATCH, &path, Some(json!({"enabled": false})))
        .await;
    assert_eq!(patched.0, 200, "{}", patched.1);
    let (user_id, key) = user(&app, json!({"allowed_models": ["gpt-4o*"]})).await;
    // A mapped name is listed when a key that may serve the caller serves its target, the
    // caller's own mapping standing in for the system-wide one.
    for mapping in [
        json!({"from": "gpt-4o-fast", "to": "gpt-4o-mini"}),
        json!({"from": "gpt-4o-ghost", "to": "gpt-4o-far"}),
        json!({"from": "gpt-4o-best", "to": "gpt-4o-far"}),
        json!({"from": "gpt-4o-best", "to": "o3", "user_id": user_id}),
    ] {
        let (status, body) = app
            .admin_json(Method::POST, "/admin/model-mappings", Some(mapping))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = app.call_with_key(&key).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o", "gpt-4o-best", "gpt-4o-fast", "gpt-4o-mini"]);
    // One model, as the SDKs' `models.retrieve` asks: only those of the list.
    let retrieve = |model: &'static str| {
        let request = app
            .http
            .get(format!("{}/v1/models/{model}", app.address))
            .bearer_auth(&key);
        async move { into_json(request.send().await.unwrap()).await }
    };
    let (status, body) = retrieve("gpt-4o-fast").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "gpt-4o-fast");
    assert_eq!(body["object"], "model");
    for hidden in ["gpt-4o-ghost", "gpt-4o-far", "o3", "org/none"] {
        assert_error(retrieve(hidden).await, 404, "model_not_found");
    }
}

/// A key without a `models` list adds the models its provider lists (`GET /models`, asked
/// once and kept), not every priced one; a provider that does not list them leaves the priced
/// models.
async fn a_key_without_models_lists_what_its_provider_serves(backend: Backend) {
    let (app, mock) = app_with_upstream(backend, "lists-a").await;
    let (_, key) = user(&app, json!({})).await;
    let ids = |body: Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    for _ in 0..2 {
        let (status, body) = app.call_with_key(&key).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(ids(body), ["llama-3-8b", "qwen2"]);
    }
    let listings = mock
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/models"))
        .count();
    assert_eq!(listings, 1, "the list is kept");
    // A key whose provider gives no list may serve any priced model.
    add_mock(&app, "ok-b").await;
    let (_, body) = app.call_with_key(&key).await;
    let listed = ids(body);
    assert!(listed.iter().any(|m| m == "qwen2"), "{listed:?}");
    assert!(listed.iter().any(|m| m == "gpt-4o"), "{listed:?}");
}

async fn rpm_refuses_with_retry_after_and_the_headers_count_down(backend: Backend) {
    let (app, mock) = app_with_upstream(backend, "ok-a").await;
    let (_, key) = user(&app, json!({"rpm": 2})).await;
    for remaining in [1, 0] {
        let response = app.chat(&key, hello("gpt-4o-mini")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit-requests"), Some(2));
        assert_eq!(
            header(&response, "x-ratelimit-remaining-requests"),
            Some(remaining)
        );
        assert_eq!(
            header(&response, "x-ratelimit-limit-tokens"),
            None,
            "no token limit set"
        );
    }
    let refused = app.chat(&key, hello("gpt-4o-mini")).await;
    assert_eq!(refused.status(), 429);
    let retry_after = header(&refused, "retry-after").expect("Retry-After");
    assert!((1..=62).contains(&retry_after), "{retry_after}");
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), Some(0));
    assert!(refused.headers().contains_key("x-request-id"));
    assert_error(into_json(refused).await, 429, "rate_limit_exceeded");
    assert_eq!(mock.calls().len(), 2);

    // A user without limits gets no rate-limit headers at all.
    let (_, free) = user(&app, json!({})).await;
    let response = app.chat(&free, hello("gpt-4o-mini")).await;
    assert_eq!(response.status(), 200);
    assert!(!response
        .headers()
        .contains_key("x-ratelimit-limit-requests"));

    // A limit of 0 lets nothing through, and says so rather than naming a time to retry.
    let (_, none) = user(&app, json!({"model_limits": {"gpt-4o*": {"rpm": 0}}})).await;
    let (status, body) = ask(&app, &none, "gpt-4o-mini").await;
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_error((status, body), 429, "rate_limit_exceeded");
    assert!(message.contains("is 0"), "{message}");
    assert_eq!(
        ask(&app, &none, "o3").await.0,
        200,
        "other models are not limited"
    );
}

async fn model_limits_apply_only_to_their_models(backend: Backend) {
    let (app, _mock) = app_with_upstream(backend, "ok-a").await;
    let (_, key) = user(&app, json!({"model_limits": {"gpt-4o*": {"rpm": 1}}})).await;
    assert_eq!(ask(&app, &key, "gpt-4o-mini").await.0, 200);
    // The glob's one call a minute is shared by every model it matches.
    assert_error(ask(&app, &key, "gpt-4o").await, 429, "rate_limit_exceeded");
    for _ in 0..3 {
        let response = app.chat(&key, hello("o3")).await;
        assert_eq!(response.status(), 200);
        assert!(!response
            .headers()
            .contains_key("x-ratelimit-limit-requests"));
    }
}

/// "hi" in one user message: 1 token of text, 4 of message framing, 3 for the reply.
const HELLO_ESTIMATE: i64 = 8;

async fn tpm_is_settled_with_the_usage_the_answer_reports(backend: Backend) {
    // Every answer reports 600 tokens used.
    let (app, _mock) = app_with_upstream(backend, "tokens-a").await;
    let (_, key) = user(&app, json!({"tpm": 1000})).await;
    let first = app.chat(&key, hello("gpt-4o-mini")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), Some(1000));
    assert_eq!(
        header(&first, "x-ratelimit-remaining-tokens"),
        Some(1000 - HELLO_ESTIMATE)
    );
    first.bytes().await.unwrap();
    let second = eventually_remaining(&app, &key, 1000 - 600 - HELLO_ESTIMATE).await;
    assert_eq!(second.status(), 200);
    second.bytes().await.unwrap();
    // 1200 used: the window is full until these calls leave it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = app.chat(&key, hello("gpt-4o-mini")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-ratelimit-remaining-tokens"), Some(0));
    assert!(header(&refused, "retry-after").is_some());
    // A call that could not fit in a whole minute says how to make it fit.
    let mut too_large = hello("gpt-4o-mini");
    too_large["max_tokens"] = json!(5000);
    let (status, body) = into_json(app.chat(&key, too_large).await).await;
    assert_eq!(status, 429, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("lower max_tokens"), "{message}");
    // So does one on Gemini's own route, whose cap sits in its `generationConfig`.
    let response = app
        .http
        .post(format!(
            "{}/v1beta/models/gemini-2.0-flash:generateContent",
            app.address
        ))
        .header("x-goog-api-key", &key)
        .json(&json!({"contents": [{"parts": [{"text": "hi"}]}],
                      "generationConfig": {"maxOutputTokens": 5000}}))
        .send()
        .await
        .unwrap();
    let (status, body) = into_json(response).await;
    assert_eq!(status, 429, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("lower max_tokens"), "{message}");
}

async fn tpm_is_settled_from_a_streamed_usage_chunk(backend: Backend) {
    let (app, _mock) = app_with_upstream(backend, "tokens-a").await;
    let (_, key) = user(&app, json!({"tpm": 5000})).await;
    let body = json!({
        "model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}],
    });
    let streamed = app.chat(&key, body).await;
    assert_eq!(streamed.status(), 200);
    let text = String::from_utf8(streamed.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("\"total_tokens\":600"), "{text}");
    eventually_remaining(&app, &key, 5000 - 600 - HELLO_ESTIMATE).await;
}

/// The next call, once the previous answer's settlement (a background message, sent when the
/// answer ended) has had time to land; asserts its `x-ratelimit-remaining-tokens`.
async fn eventually_remaining(app: &TestApp, key: &str, expected: i64) -> reqwest::Response {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = app.chat(key, hello("gpt-4o-mini")).await;
    assert_eq!(
        header(&response, "x-ratelimit-remaining-tokens"),
        Some(expected)
    );
    response
}

async fn rule_and_limit_changes_apply_on_the_next_call(backend: Backend) {
    let (app, _mock) = app_with_upstream(backend, "ok-a").await;
    let (id, key) = user(&app, json!({"rpm": 1})).await;
    assert_eq!(chat_from(&app, &key, None).await.0, 200);
    assert_error(
        chat_from(&app, &key, None).await,
        429,
        "rate_limit_exceeded",
    );
    let path = format!("/admin/users/{id}");
    let patch = |body: Value| app.admin_json(Method::PATCH, &path, Some(body));
    assert_eq!(patch(json!({"rpm": 5})).await.0, 200);
    assert_eq!(chat_from(&app, &key, None).await.0, 200);
    assert_eq!(patch(json!({"allowed_models": ["o3"]})).await.0, 200);
    assert_error(chat_from(&app, &key, None).await, 403, "model_not_allowed");
    assert_eq!(patch(json!({"status": "suspended"})).await.0, 200);
    assert_error(chat_from(&app, &key, None).await, 403, "user_suspended");
}

/// With Redis, a refusal is remembered so that calls it certainly refuses do not each cost a
/// round trip; a smaller call that fits, or a call under a limit raised since, is not refused
/// by the memory of it.
async fn a_remembered_refusal_refuses_only_what_it_must(backend: Backend) {
    let redis = SharedRedis::new();
    let app = spawn_app_with(backend, &redis.env()).await;
    // Every answer reports 600 tokens used.
    let _mock = add_mock(&app, "tokens-a").await;
    let (id, key) = user(&app, json!({"tpm": 1000})).await;
    let large = json!({
        "model": "gpt-4o-mini", "max_tokens": 900,
        "messages": [{"role": "user", "content": "hi"}],
    });
    // The large call once the last answer's usage is settled.
    let large_once_settled = || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        into_json(app.chat(&key, large.clone()).await).await
    };
    assert_eq!(ask(&app, &key, "gpt-4o-mini").await.0, 200);
    // 600 used: a call that may use 900 more does not fit...
    assert_error(large_once_settled().await, 429, "rate_limit_exceeded");
    // ...but a small one does, though the refusal is remembered.
    assert_eq!(ask(&app, &key, "gpt-4o-mini").await.0, 200);
    // 1,200 used: the large call is refused again...
    assert_error(large_once_settled().await, 429, "rate_limit_exceeded");
    // ...but a raised limit is counted again at once.
    let path = format!("/admin/users/{id}");
    assert_eq!(
        app.admin_json(Method::PATCH, &path, Some(json!({"tpm": 100000})))
            .await
            .0,
        200
    );
    assert_eq!(into_json(app.chat(&key, large).await).await.0, 200);
}

/// A body may ask for any `max_tokens` up to `i64::MAX`. It is charged as a trillion tokens at
/// most: the sums in Redis (whose Lua counts in doubles) and in process stay exact, Redis
/// stays in use, and the charge is settled with the usage the answer reports.
async fn a_huge_completion_cap_is_charged_without_upsetting_the_counts(backend: Backend) {
    let redis = SharedRedis::new();
    let app = spawn_app_with(backend, &redis.env()).await;
    // Every answer reports 600 tokens used.
    let _mock = add_mock(&app, "tokens-a").await;
    let tpm: i64 = 10_000_000_000_000;
    let (_, key) = user(&app, json!({"tpm": tpm})).await;
    let huge = json!({
        "model": "gpt-4o-mini", "max_tokens": i64::MAX,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let admitted = app.chat(&key, huge).await;
    assert_eq!(admitted.status(), 200);
    assert_eq!(
        header(&admitted, "x-ratelimit-remaining-tokens"),
        Some(tpm - (1 << 40))
    );
    admitted.bytes().await.unwrap();
    let next = eventually_remaining(&app, &key, tpm - 600 - HELLO_ESTIMATE).await;
    assert_eq!(next.status(), 200);
    let ready = app.http.get(format!("{}/readyz", app.address)).send();
    let (status, body) = into_json(ready.await.unwrap()).await;
    assert_eq!(
        (status, &body["redis"]["status"]),
        (200, &json!("ok")),
        "{body}"
    );
}
