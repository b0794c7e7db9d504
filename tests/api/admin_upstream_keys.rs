//! `/admin/upstream-keys`, including discovery against a mock provider.

use reqwest::Method;
use serde_json::json;
use switchyard::crypto::MasterKey;

use crate::helpers::{assert_error, spawn_app, spawn_mock_provider, Backend};
use crate::on_both_backends;

on_both_backends!(
    upstream_secret_is_encrypted_and_never_shown,
    upstream_key_defaults_and_updates,
    bad_upstream_key_input_is_refused_with_400,
    unknown_upstream_key_ids_answer_404,
    discovery_adds_the_keys_the_provider_accepts,
);

async fn upstream_secret_is_encrypted_and_never_shown(backend: Backend) {
    let app = spawn_app(backend).await;
    let secret = "provider-secret-value-9876";
    let (status, created) = app
        .admin_json(
            Method::POST,
            "/admin/upstream-keys",
            Some(
                json!({"provider": "openai", "base_url": "https://api.openai.com/v1",
                        "secret": secret, "level": 2, "models": ["gpt-4o*"], "weight": 3}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert!(!created.to_string().contains(secret));
    assert!(created.get("secret").is_none());
    assert_eq!(created["secret_hint"], "9876");
    assert_eq!(created["level"], 2);
    assert_eq!(created["weight"], 3);
    assert_eq!(created["state"], "healthy");
    let id = created["id"].as_str().unwrap();

    let (_, list) = app
        .admin_json(Method::GET, "/admin/upstream-keys", None)
        .await;
    assert!(!list.to_string().contains(secret));
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    let stored = switchyard::db::repo::upstream_keys::get(&app.db(), id)
        .await
        .unwrap();
    assert!(!stored.secret_enc.contains(secret));
    let master = MasterKey::from_base64(&app.master_key).unwrap();
    assert_eq!(master.decrypt(id, &stored.secret_enc).unwrap(), secret);
}

async fn upstream_key_defaults_and_updates(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, created) = app
        .admin_json(
            Method::POST,
            "/admin/upstream-keys",
            Some(json!({"provider": "anthropic", "secret": "anthropic-secret-1111"})),
        )
        .await;
    assert_eq!(created["base_url"], "https://api.anthropic.com/v1");
    assert_eq!(created["level"], 1);
    assert_eq!(created["weight"], 1);
    assert_eq!(created["enabled"], true);
    assert_eq!(created["models"], json!([]));
    let path = format!("/admin/upstream-keys/{}", created["id"].as_str().unwrap());

    let (status, patched) = app
        .admin_json(
            Method::PATCH,
            &path,
            Some(json!({"level": 2, "enabled": false, "secret": "anthropic-secret-2222"})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["level"], 2);
    assert_eq!(patched["enabled"], false);
    assert_eq!(patched["state"], "disabled");
    assert_eq!(patched["secret_hint"], "2222");
    let (_, fetched) = app.admin_json(Method::GET, &path, None).await;
    assert_eq!(fetched, patched);

    let (_, enabled) = app
        .admin_json(Method::PATCH, &path, Some(json!({"enabled": true})))
        .await;
    assert_eq!(enabled["state"], "healthy");

    // Another provider: its default base URL in place of the old one's, a custom one kept.
    let (status, moved) = app
        .admin_json(Method::PATCH, &path, Some(json!({"provider": "gemini"})))
        .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["provider"], "gemini");
    assert_eq!(
        moved["base_url"],
        "https://generativelanguage.googleapis.com/v1beta"
    );
    let (_, moved) = app
        .admin_json(
            Method::PATCH,
            &path,
            Some(json!({"provider": "openai", "base_url": "http://10.0.0.7:8000/v1"})),
        )
        .await;
    assert_eq!(moved["base_url"], "http://10.0.0.7:8000/v1");
    let (_, moved) = app
        .admin_json(Method::PATCH, &path, Some(json!({"provider": "anthropic"})))
        .await;
    assert_eq!(
        moved["base_url"], "http://10.0.0.7:8000/v1",
        "its own, kept"
    );
    assert_error(
        app.admin_json(Method::PATCH, &path, Some(json!({"provider": "azure"})))
            .await,
        400,
        "invalid_request",
    );
    let (_, fetched) = app.admin_json(Method::GET, &path, None).await;
    assert_eq!(fetched["provider"], "anthropic");

    let (status, deleted) = app.admin_json(Method::DELETE, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(deleted["deleted"], true);
    assert_error(
        app.admin_json(Method::GET, &path, None).await,
        404,
        "not_found",
    );
}

async fn bad_upstream_key_input_is_refused_with_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let cases = [
        json!({"provider": "azure", "secret": "s-123456789"}),
        json!({"provider": "openai"}),
        json!({"provider": "openai", "secret": ""}),
        json!({"provider": "openai", "secret": "s-123456789", "base_url": "not a url"}),
        json!({"provider": "openai", "secret": "s-123456789", "base_url": "ftp://x/v1"}),
        json!({"provider": "openai", "secret": "s-123456789", "level": 0}),
        json!({"provider": "openai", "secret": "s-123456789", "weight": 0}),
        json!({"provider": "openai", "secret": "s-123456789", "models": ["gpt-["]}),
        json!({"provider": "openai", "secret": "s-123456789", "state": "healthy"}),
        // Fields by position: serde would take them, the API names its fields.
        json!(["openai", null, "s-123456789"]),
    ];
    for body in cases {
        let result = app
            .admin_json(Method::POST, "/admin/upstream-keys", Some(body.clone()))
            .await;
        assert_eq!(result.0, 400, "{body}: {}", result.1);
        assert_error(result, 400, "invalid_request");
    }
    let (_, created) = app
        .admin_json(
            Method::POST,
            "/admin/upstream-keys",
            Some(json!({"provider": "gemini", "secret": "gemini-secret-3333"})),
        )
        .await;
    let path = format!("/admin/upstream-keys/{}", created["id"].as_str().unwrap());
    for body in [
        json!({"level": -1}),
        json!({"base_url": "https://user:pw@host/v1"}),
        json!({"provider": "azure"}),
        json!({"provider": null}),
        json!({"weight": "heavy"}),
        // Fields with no null: a null would otherwise read as left out, and change nothing.
        json!({"models": null}),
        json!({"enabled": null}),
    ] {
        let result = app
            .admin_json(Method::PATCH, &path, Some(body.clone()))
            .await;
        assert_eq!(result.0, 400, "{body}: {}", result.1);
    }
    let (_, list) = app
        .admin_json(Method::GET, "/admin/upstream-keys", None)
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["level"], 1);
}

async fn unknown_upstream_key_ids_answer_404(backend: Backend) {
    let app = spawn_app(backend).await;
    app.assert_unknown_id("/admin/upstream-keys/upk_missing", json!({"level": 2}))
        .await;
}

async fn discovery_adds_the_keys_the_provider_accepts(backend: Backend) {
    let app = spawn_app(backend).await;
    let base_url = spawn_mock_provider();
    let (status, result) = app
        .admin_json(
            Method::POST,
            "/admin/upstream-keys/discover",
            Some(json!({
                "provider": "openai",
                "base_url": base_url,
                "level": 2,
                "models": ["gpt-4o*"],
                "candidates": ["good-key-aaaa", "bad-key-bbbb", "busy-key-cccc", "good-key-aaaa"],
            })),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["added"].as_array().unwrap().len(), 2, "{result}");
    let rejected = result["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{result}");
    assert_eq!(rejected[0]["hint"], "bbbb");
    assert!(rejected[0]["reason"].as_str().unwrap().contains("401"));
    assert_eq!(rejected[1]["reason"], "listed twice");
    assert!(!result.to_string().contains("good-key-aaaa"));

    // Running it again finds the accepted keys already present.
    let (_, again) = app
        .admin_json(
            Method::POST,
            "/admin/upstream-keys/discover",
            Some(
                json!({"provider": "openai", "base_url": base_url, "level": 2,
                        "candidates": ["good-key-aaaa"]}),
            ),
        )
        .await;
    assert_eq!(again["added"], json!([]));
    assert_eq!(again["rejected"][0]["reason"], "already added");

    let (_, list) = app
        .admin_json(Method::GET, "/admin/upstream-keys", None)
        .await;
    let keys = list["data"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys
        .iter()
        .all(|k| k["level"] == 2 && k["models"] == json!(["gpt-4o*"])));

    // An unreachable provider rejects every candidate with a reason, and bad input is a 400.
    let (_, unreachable) = app
        .admin_json(
            Method::POST,
            "/admin/upstream-keys/discover",
            Some(
                json!({"provider": "gemini", "base_url": "http://127.0.0.1:9/v1beta",
                        "candidates": ["good-key-dddd"]}),
            ),
        )
        .await;
    assert_eq!(unreachable["added"], json!([]));
    assert!(unreachable["rejected"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("could not be reached"));
    assert_error(
        app.admin_json(
            Method::POST,
            "/admin/upstream-keys/discover",
            Some(json!({"provider": "openai", "candidates": []})),
        )
        .await,
        400,
        "invalid_request",
    );
}
