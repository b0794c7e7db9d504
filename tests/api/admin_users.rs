//! `/admin/users` and the admin token.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, into_json, spawn_app, Backend};
use crate::on_both_backends;

on_both_backends!(
    admin_routes_refuse_a_missing_or_wrong_token,
    creating_a_user_applies_defaults_and_answers_201,
    creating_a_user_with_every_field_stores_them,
    user_name_must_be_unique,
    bad_user_input_is_refused_with_400,
    patch_changes_only_the_given_fields_and_null_clears,
    unknown_user_ids_answer_404,
    users_list_pages_with_has_more,
    deleting_a_user_removes_it,
    oversized_body_answers_413_and_the_router_goes_on,
    concurrent_patches_of_different_fields_all_land,
    blank_query_parameters_are_read_as_left_out,
);

async fn admin_routes_refuse_a_missing_or_wrong_token(backend: Backend) {
    let app = spawn_app(backend).await;
    let url = format!("{}/admin/users", app.address);
    let missing = into_json(app.http.get(&url).send().await.unwrap()).await;
    assert_error(missing, 401, "invalid_admin_token");
    let wrong = into_json(app.http.get(&url).bearer_auth("nope").send().await.unwrap()).await;
    assert_error(wrong, 401, "invalid_admin_token");
    let post = app
        .http
        .post(&url)
        .bearer_auth(format!("{}x", app.admin_token))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(into_json(post).await, 401, "invalid_admin_token");
    // The refused create wrote nothing.
    let (status, list) = app.admin_json(Method::GET, "/admin/users", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
}

async fn creating_a_user_applies_defaults_and_answers_201(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({"name": "alice"})).await;
    assert!(user["id"].as_str().unwrap().starts_with("usr_"));
    assert_eq!(user["name"], "alice");
    assert_eq!(user["status"], "active");
    assert_eq!(user["level"], 1);
    assert_eq!(user["fallback_levels"], json!([]));
    assert_eq!(user["ip_allowlist"], json!([]));
    assert_eq!(user["allowed_models"], json!([]));
    assert_eq!(user["allowed_endpoints"], json!([]));
    assert_eq!(user["spend_limit_usd"], json!(null));
    assert_eq!(user["spent_usd"], json!(0.0));
    assert_eq!(user["rpm"], json!(null));
    assert_eq!(user["model_limits"], json!({}));
    assert!(user["created_at"].as_str().unwrap().ends_with('Z'));
    let (status, fetched) = app
        .admin_json(
            Method::GET,
            &format!("/admin/users/{}", user["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(fetched, user);
}

async fn creating_a_user_with_every_field_stores_them(backend: Backend) {
    let app = spawn_app(backend).await;
    let fields = json!({
        "name": "bob",
        "status": "suspended",
        "level": 2,
        "fallback_levels": [3, 1],
        "ip_allowlist": ["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"],
        "allowed_models": ["gpt-4o*", "claude-*"],
        "allowed_endpoints": ["/v1/chat/*"],
        "spend_limit_usd": 12.5,
        "rpm": 60,
        "tpm": 100000,
        "model_limits": {"gpt-4o*": {"rpm": 10, "tpm": 5000}, "o1": {"rpm": 1}},
    });
    let user = app.create_user(fields).await;
    let (_, fetched) = app
        .admin_json(
            Method::GET,
            &format!("/admin/users/{}", user["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(fetched["status"], "suspended");
    assert_eq!(fetched["level"], 2);
    assert_eq!(fetched["fallback_levels"], json!([3, 1]));
    assert_eq!(
        fetched["ip_allowlist"],
        json!(["10.0.0.0/8", "2001:db8::/32", "192.168.1.7/32"])
    );
    assert_eq!(fetched["allowed_models"], json!(["gpt-4o*", "claude-*"]));
    assert_eq!(fetched["allowed_endpoints"], json!(["/v1/chat/*"]));
    assert_eq!(fetched["spend_limit_usd"], json!(12.5));
    assert_eq!(fetched["rpm"], 60);
    assert_eq!(fetched["tpm"], 100000);
    assert_eq!(
        fetched["model_limits"],
        json!({"gpt-4o*": {"rpm": 10, "tpm": 5000}, "o1": {"rpm": 1}})
    );
}

async fn user_name_must_be_unique(backend: Backend) {
    let app = spawn_app(backend).await;
    app.create_user(json!({"name": "carol"})).await;
    let dup = app
        .admin_json(Method::POST, "/admin/users", Some(json!({"name": "carol"})))
        .await;
    assert_error(dup, 409, "conflict");
    let other = app.create_user(json!({"name": "dave"})).await;
    let rename = app
        .admin_json(
            Method::PATCH,
            &format!("/admin/users/{}", other["id"].as_str().unwrap()),
            Some(json!({"name": "carol"})),
        )
        .await;
    assert_error(rename, 409, "conflict");
}

async fn bad_user_input_is_refused_with_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let cases = [
        json!({}),
        json!({"name": ""}),
        json!({"name": "x", "ip_allowlist": ["10.0.0.0/33"]}),
        json!({"name": "x", "ip_allowlist": ["not-an-ip"]}),
        json!({"name": "x", "allowed_models": ["gpt-["]}),
        json!({"name": "x", "allowed_endpoints": ["v1/chat/*"]}),
        json!({"name": "x", "level": 0}),
        json!({"name": "x", "level": -3}),
        json!({"name": "x", "fallback_levels": [2, 2]}),
        json!({"name": "x", "fallback_levels": [1]}),
        json!({"name": "x", "status": "frozen"}),
        json!({"name": "x", "spend_limit_usd": -1}),
        json!({"name": "x", "rpm": -5}),
        json!({"name": "x", "model_limits": {"gpt-[": {"rpm": 1}}}),
        json!({"name": "x", "model_limits": {"gpt-4o": {"rpm": 1, "burst": 2}}}),
        json!({"name": "x", "spent_usd": 5}),
        json!({"name": "x", "unknown_field": true}),
        json!("just a string"),
        json!({"name": "nul\u{0}name"}),
        json!(["by-position", "suspended", 3]),
    ];
    for body in cases {
        let result = app
            .admin_json(Method::POST, "/admin/users", Some(body.clone()))
            .await;
        assert_eq!(result.0, 400, "{body} -> {}", result.1);
        assert_error(result, 400, "invalid_request");
    }
    let not_json = app
        .admin(Method::POST, "/admin/users")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(into_json(not_json).await, 400, "invalid_request");
    let wrong_type = app
        .admin(Method::POST, "/admin/users")
        .header("content-type", "text/plain")
        .body("{\"name\":\"x\"}")
        .send()
        .await
        .unwrap();
    assert_error(into_json(wrong_type).await, 400, "invalid_request");
    // An id no record has: 404, or on PostgreSQL, which cannot even compare a NUL, 400.
    let nul_id = app
        .admin_json(Method::GET, "/admin/users/usr%00x", None)
        .await;
    match backend {
        Backend::Sqlite => assert_error(nul_id, 404, "not_found"),
        Backend::Postgres => assert_error(nul_id, 400, "invalid_request"),
    }
    // Nothing was stored, and a good request still works.
    let (_, list) = app.admin_json(Method::GET, "/admin/users", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    app.create_user(json!({"name": "fine"})).await;
}

async fn patch_changes_only_the_given_fields_and_null_clears(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app
        .create_user(
            json!({"name": "erin", "rpm": 10, "spend_limit_usd": 5.0, "allowed_models": ["gpt-*"]}),
        )
        .await;
    let path = format!("/admin/users/{}", user["id"].as_str().unwrap());
    let (status, patched) = app
        .admin_json(Method::PATCH, &path, Some(json!({"rpm": 20, "level": 3})))
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["rpm"], 20);
    assert_eq!(patched["level"], 3);
    assert_eq!(patched["spend_limit_usd"], json!(5.0));
    assert_eq!(patched["allowed_models"], json!(["gpt-*"]));
    assert_eq!(patched["name"], "erin");
    let (_, cleared) = app
        .admin_json(
            Method::PATCH,
            &path,
            Some(json!({"spend_limit_usd": null, "rpm": null})),
        )
        .await;
    assert_eq!(cleared["spend_limit_usd"], json!(null));
    assert_eq!(cleared["rpm"], json!(null));
    let (_, fetched) = app.admin_json(Method::GET, &path, None).await;
    assert_eq!(fetched, cleared);
    // A bad patch changes nothing.
    let bad = app
        .admin_json(
            Method::PATCH,
            &path,
            Some(json!({"rpm": 7, "ip_allowlist": ["nope"]})),
        )
        .await;
    assert_error(bad, 400, "invalid_request");
    let bad_fallback = app
        .admin_json(Method::PATCH, &path, Some(json!({"fallback_levels": [3]})))
        .await;
    assert_error(bad_fallback, 400, "invalid_request");
    // Only the nullable fields take null: a list is cleared with [], not null.
    for body in [json!({"ip_allowlist": null}), json!({"name": null})] {
        let refused = app.admin_json(Method::PATCH, &path, Some(body)).await;
        assert_error(refused, 400, "invalid_request");
    }
    let (_, after) = app.admin_json(Method::GET, &path, None).await;
    assert_eq!(after, cleared);
}

async fn unknown_user_ids_answer_404(backend: Backend) {
    let app = spawn_app(backend).await;
    app.assert_unknown_id("/admin/users/usr_doesnotexist", json!({"rpm": 1}))
        .await;
}

async fn users_list_pages_with_has_more(backend: Backend) {
    let app = spawn_app(backend).await;
    for i in 0..5 {
        app.create_user(json!({"name": format!("u{i}")})).await;
    }
    let (_, first) = app
        .admin_json(Method::GET, "/admin/users?limit=2", None)
        .await;
    assert_eq!(first["data"].as_array().unwrap().len(), 2);
    assert_eq!(first["has_more"], true);
    let (_, last) = app
        .admin_json(Method::GET, "/admin/users?limit=2&offset=4", None)
        .await;
    assert_eq!(last["data"].as_array().unwrap().len(), 1);
    assert_eq!(last["has_more"], false);
    let names: Vec<_> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(last["data"].as_array().unwrap())
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["u0", "u1", "u4"]);
    for bad in [
        "limit=0",
        "limit=100000",
        "offset=-1",
        "limit=abc",
        "bogus=1",
    ] {
        let result = app
            .admin_json(Method::GET, &format!("/admin/users?{bad}"), None)
            .await;
        assert_error(result, 400, "invalid_request");
    }
}

async fn deleting_a_user_removes_it(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({"name": "frank"})).await;
    let path = format!("/admin/users/{}", user["id"].as_str().unwrap());
    let (status, body) = app.admin_json(Method::DELETE, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["deleted"], true);
    assert_error(
        app.admin_json(Method::GET, &path, None).await,
        404,
        "not_found",
    );
    // The name is free again.
    app.create_user(json!({"name": "frank"})).await;
}

async fn oversized_body_answers_413_and_the_router_goes_on(backend: Backend) {
    let app = spawn_app(backend).await;
    let huge = "x".repeat(30 * 1024 * 1024);
    let response = app
        .admin(Method::POST, "/admin/users")
        .json(&json!({"name": huge}))
        .send()
        .await
        .expect("the router answers an oversized body");
    assert_error(into_json(response).await, 413, "invalid_request");
    app.create_user(json!({"name": "after-the-big-one"})).await;
}

/// PATCHes of different fields sent at once each change only their own field: none puts back
/// another's old value (a rename racing a suspension once lifted the suspension). The same
/// holds for upstream keys.
async fn concurrent_patches_of_different_fields_all_land(backend: Backend) {
    let app = spawn_app(backend).await;
    for round in 0..3 {
        let user = app
            .create_user(json!({"name": format!("racer-{round}")}))
            .await;
        let path = format!("/admin/users/{}", user["id"].as_str().unwrap());
        let changes = [
            json!({"status": "suspended"}),
            json!({"rpm": 7}),
            json!({"tpm": 700}),
            json!({"name": format!("renamed-{round}")}),
            json!({"level": 3}),
            json!({"allowed_models": ["gpt-*"]}),
            json!({"spend_limit_usd": 5.0}),
            json!({"fallback_levels": [4]}),
        ];
        patch_at_once_and_check(&app, &path, &changes).await;
    }

    let key = app
        .add_upstream(json!({"provider": "openai", "secret": "sk-racing-upstream"}))
        .await;
    let path = format!("/admin/upstream-keys/{key}");
    let changes = [
        json!({"enabled": false}),
        json!({"weight": 5}),
        json!({"level": 2}),
        json!({"models": ["gpt-4o*"]}),
    ];
    patch_at_once_and_check(&app, &path, &changes).await;
}

/// Sends every one-field PATCH in `changes` to `path` at once, then checks that each field
/// holds its new value.
async fn patch_at_once_and_check(app: &crate::helpers::TestApp, path: &str, changes: &[Value]) {
    let patches = changes
        .iter()
        .map(|change| app.admin_json(Method::PATCH, path, Some(change.clone())));
    for (status, body) in futures_util::future::join_all(patches).await {
        assert_eq!(status, 200, "{body}");
    }
    let (_, record) = app.admin_json(Method::GET, path, None).await;
    for change in changes {
        let (field, value) = change.as_object().unwrap().iter().next().unwrap();
        assert_eq!(&record[field], value, "{field} in {record}");
    }
}

/// Forms and URL templates send parameters they have no value for as `name=`: those are read
/// as left out (the lists API.md writes as `?user_id=&status=&limit=`), while a value that is
/// there must still be valid.
async fn blank_query_parameters_are_read_as_left_out(backend: Backend) {
    let app = spawn_app(backend).await;
    app.create_user(json!({"name": "listed"})).await;
    for path in [
        "/admin/users?limit=&offset=",
        "/admin/logs?user_id=&status=&limit=",
        "/admin/usage?user_id=&since=&until=&group_by=&limit=",
        "/admin/model-mappings?limit= ",
    ] {
        let (status, body) = app.admin_json(Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, users) = app
        .admin_json(Method::GET, "/admin/users?limit=", None)
        .await;
    assert_eq!(users["data"].as_array().unwrap().len(), 1, "{users}");
    for path in ["/admin/users?limit=x", "/admin/logs?status=abc"] {
        assert_error(
            app.admin_json(Method::GET, path, None).await,
            400,
            "invalid_request",
        );
    }
}
