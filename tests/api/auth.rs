//! Authentication of data-plane calls with user keys.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::{assert_error, into_json, spawn_app, Backend};
use crate::on_both_backends;

on_both_backends!(
    a_key_is_accepted_wherever_sdks_send_it,
    missing_unknown_and_malformed_keys_answer_401,
    a_wrong_secret_is_refused_before_and_after_the_key_is_cached,
    a_revoked_key_is_refused_on_the_next_call,
    an_expired_key_is_refused,
    a_suspended_user_gets_403_until_reactivated,
    a_deleted_users_key_is_refused,
    every_response_carries_a_request_id,
    a_burst_of_first_calls_with_one_key_all_succeed,
);

async fn a_burst_of_first_calls_with_one_key_all_succeed(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.user_with_key().await;
    let (prefix, _) = key.rsplit_once('-').unwrap();
    let forged = format!("{prefix}-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB");
    // Cold cache: every call misses at once; verification is bounded and shared.
    let calls = (0..8).map(|i| {
        let key = if i % 4 == 3 {
            forged.clone()
        } else {
            key.clone()
        };
        let app = &app;
        async move { (i % 4 == 3, app.call_with_key(&key).await.0) }
    });
    for (is_forged, status) in futures_util::future::join_all(calls).await {
        assert_eq!(status, if is_forged { 401 } else { 200 });
    }
}

async fn a_key_is_accepted_wherever_sdks_send_it(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.user_with_key().await;
    let url = format!("{}/v1/models", app.address);
    let requests = [
        app.http.get(&url).bearer_auth(&key),
        app.http.get(&url).header("x-api-key", &key),
        app.http.get(&url).header("x-goog-api-key", &key),
        app.http.get(format!("{url}?key={key}")),
    ];
    for request in requests {
        let (status, body) = into_json(request.send().await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "list");
    }
}

async fn missing_unknown_and_malformed_keys_answer_401(backend: Backend) {
    let app = spawn_app(backend).await;
    let url = format!("{}/v1/models", app.address);
    let missing = into_json(app.http.get(&url).send().await.unwrap()).await;
    assert_error(missing, 401, "invalid_api_key");
    for key in [
        "sk-0123456789abcdef-doesnotexistatall",
        "sk-short",
        "not-a-key",
        "sk-0123456789abcdef-",
    ] {
        assert_error(app.call_with_key(key).await, 401, "invalid_api_key");
    }
}

async fn a_wrong_secret_is_refused_before_and_after_the_key_is_cached(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.user_with_key().await;
    let (prefix, _) = key.rsplit_once('-').unwrap();
    let forged = format!("{prefix}-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_error(app.call_with_key(&forged).await, 401, "invalid_api_key");
    assert_eq!(app.call_with_key(&key).await.0, 200);
    assert_error(app.call_with_key(&forged).await, 401, "invalid_api_key");
    assert_eq!(app.call_with_key(&key).await.0, 200);
}

async fn a_revoked_key_is_refused_on_the_next_call(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({})).await;
    let user_id = user["id"].as_str().unwrap();
    let (key_id, key) = app.create_key(user_id, json!({})).await;
    let (_, other_key) = app.create_key(user_id, json!({})).await;
    assert_eq!(app.call_with_key(&key).await.0, 200);
    let (status, _) = app
        .admin_json(Method::DELETE, &format!("/admin/keys/{key_id}"), None)
        .await;
    assert_eq!(status, 200);
    let refused = app.call_with_key(&key).await;
    assert_eq!(
        refused.1["error"]["message"], "this API key has been revoked",
        "{}",
        refused.1
    );
    assert_error(refused, 401, "invalid_api_key");
    // A wrong secret for the revoked key is refused as revoked, before argon2 (which would
    // have answered "invalid API key"): a dead key's id buys no slow check.
    let (prefix, _) = key.rsplit_once('-').unwrap();
    let forged = format!("{prefix}-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let refused = app.call_with_key(&forged).await;
    assert_eq!(
        refused.1["error"]["message"],
        "this API key has been revoked"
    );
    assert_error(refused, 401, "invalid_api_key");
    // The user's other key is untouched.
    assert_eq!(app.call_with_key(&other_key).await.0, 200);
}

async fn an_expired_key_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({})).await;
    let expires = chrono::Utc::now() + chrono::Duration::seconds(2);
    let (_, key) = app
        .create_key(
            user["id"].as_str().unwrap(),
            json!({"expires_at": expires.to_rfc3339()}),
        )
        .await;
    assert_eq!(app.call_with_key(&key).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let refused = app.call_with_key(&key).await;
    assert_eq!(refused.1["error"]["message"], "this API key has expired");
    assert_error(refused, 401, "invalid_api_key");
}

async fn a_suspended_user_gets_403_until_reactivated(backend: Backend) {
    let app = spawn_app(backend).await;
    let (user_id, key) = app.user_with_key().await;
    assert_eq!(app.call_with_key(&key).await.0, 200);
    let path = format!("/admin/users/{user_id}");
    app.admin_json(Method::PATCH, &path, Some(json!({"status": "suspended"})))
        .await;
    assert_error(app.call_with_key(&key).await, 403, "user_suspended");
    app.admin_json(Method::PATCH, &path, Some(json!({"status": "active"})))
        .await;
    assert_eq!(app.call_with_key(&key).await.0, 200);
}

async fn a_deleted_users_key_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let (user_id, key) = app.user_with_key().await;
    assert_eq!(app.call_with_key(&key).await.0, 200);
    app.admin_json(Method::DELETE, &format!("/admin/users/{user_id}"), None)
        .await;
    assert_error(app.call_with_key(&key).await, 401, "invalid_api_key");
}

async fn every_response_carries_a_request_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.user_with_key().await;
    let responses = [
        app.http
            .get(format!("{}/v1/models", app.address))
            .bearer_auth(&key),
        app.http.get(format!("{}/v1/models", app.address)),
        app.http.get(format!("{}/no/such/route", app.address)),
        app.http.get(format!("{}/healthz", app.address)),
        app.http.get(format!("{}/admin/users", app.address)),
    ];
    let mut ids = Vec::new();
    for request in responses {
        let response = request.send().await.unwrap();
        let id = response
            .headers()
            .get("x-request-id")
            .expect("x-request-id")
            .to_str()
            .unwrap()
            .to_owned();
        assert!(!id.is_empty());
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "each request gets its own id");
    let unknown = into_json(
        app.http
            .get(format!("{}/no/such/route", app.address))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(unknown, 404, "not_found");
}
