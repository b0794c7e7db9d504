//! `/admin/users/{id}/keys` and `/admin/keys/{id}`.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{assert_error, spawn_app, Backend};
use crate::on_both_backends;

on_both_backends!(
    created_key_is_shown_once_and_stored_only_as_a_hash,
    keys_of_unknown_users_answer_404,
    bad_key_input_is_refused_with_400,
    revoking_marks_the_key_and_unknown_ids_answer_404,
);

async fn created_key_is_shown_once_and_stored_only_as_a_hash(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({})).await;
    let user_id = user["id"].as_str().unwrap();
    let (status, created) = app
        .admin_json(
            Method::POST,
            &format!("/admin/users/{user_id}/keys"),
            Some(json!({"name": "laptop", "expires_at": "2099-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("sk-"));
    assert_eq!(created["name"], "laptop");
    assert_eq!(created["user_id"], user_id);
    assert_eq!(created["status"], "active");
    assert_eq!(created["expires_at"], "2099-01-01T00:00:00.000Z");
    let secret_tail = &key[key.len() - 4..];
    assert!(created["hint"].as_str().unwrap().ends_with(secret_tail));

    // An empty body is fine too.
    let bare = app
        .admin(Method::POST, &format!("/admin/users/{user_id}/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 201);

    let (status, list) = app
        .admin_json(Method::GET, &format!("/admin/users/{user_id}/keys"), None)
        .await;
    assert_eq!(status, 200);
    let text = list.to_string();
    assert!(!text.contains(key), "the key itself is never listed");
    assert!(!text.contains("argon2"), "nor its hash");
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(list["has_more"], false);
    let (_, page) = app
        .admin_json(
            Method::GET,
            &format!("/admin/users/{user_id}/keys?limit=1"),
            None,
        )
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["has_more"], true);

    let stored = switchyard::db::repo::user_keys::get(&app.db(), created["id"].as_str().unwrap())
        .await
        .unwrap();
    assert!(stored.key_hash.starts_with("$argon2id$"));
    assert!(!stored.key_hash.contains(&key[20..]));
}

async fn keys_of_unknown_users_answer_404(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_error(
        app.admin_json(
            Method::POST,
            "/admin/users/usr_nobody/keys",
            Some(json!({})),
        )
        .await,
        404,
        "not_found",
    );
    assert_error(
        app.admin_json(Method::GET, "/admin/users/usr_nobody/keys", None)
            .await,
        404,
        "not_found",
    );
}

async fn bad_key_input_is_refused_with_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({})).await;
    let path = format!("/admin/users/{}/keys", user["id"].as_str().unwrap());
    for body in [
        json!({"expires_at": "tomorrow"}),
        json!({"expires_at": "2000-01-01T00:00:00Z"}),
        json!({"name": 5}),
        json!({"scopes": ["all"]}),
        json!(["laptop"]),
        json!({"name": "nul\u{0}"}),
    ] {
        let result = app
            .admin_json(Method::POST, &path, Some(body.clone()))
            .await;
        assert_eq!(result.0, 400, "{body}");
        assert_error(result, 400, "invalid_request");
    }
    let (_, list) = app.admin_json(Method::GET, &path, None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
}

async fn revoking_marks_the_key_and_unknown_ids_answer_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({})).await;
    let (key_id, _) = app
        .create_key(user["id"].as_str().unwrap(), json!({}))
        .await;
    let (status, revoked) = app
        .admin_json(Method::DELETE, &format!("/admin/keys/{key_id}"), None)
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert!(revoked["revoked_at"].is_string());
    // Revoking again keeps the first revocation time.
    let (_, again) = app
        .admin_json(Method::DELETE, &format!("/admin/keys/{key_id}"), None)
        .await;
    assert_eq!(again["revoked_at"], revoked["revoked_at"]);
    assert_error(
        app.admin_json(Method::DELETE, "/admin/keys/key_0000000000000000", None)
            .await,
        404,
        "not_found",
    );
}
