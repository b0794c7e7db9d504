//! `/admin/model-mappings` and `/admin/prices`.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, spawn_replica, Backend, TestApp};
use crate::on_both_backends;

on_both_backends!(
    mappings_are_created_listed_and_deleted,
    bad_mappings_are_refused,
    prices_are_seeded_set_replaced_and_listed,
    bad_prices_are_refused,
);

async fn mappings_are_created_listed_and_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({})).await;
    let user_id = user["id"].as_str().unwrap();
    let (status, system) = app
        .admin_json(
            Method::POST,
            "/admin/model-mappings",
            Some(json!({"from": "gpt-4*", "to": "gpt-4o-mini"})),
        )
        .await;
    assert_eq!(status, 201, "{system}");
    assert_eq!(system["user_id"], json!(null));
    let (status, own) = app
        .admin_json(
            Method::POST,
            "/admin/model-mappings",
            Some(json!({"from": "fast", "to": "gpt-4o-mini", "user_id": user_id})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(own["user_id"], user_id);

    // A second mapping of the same name for the same owner could never apply: 409. The name
    // is trimmed, as the target is. The same name for another owner is a mapping of its own.
    let post = |body: Value| app.admin_json(Method::POST, "/admin/model-mappings", Some(body));
    assert_error(
        post(json!({"from": " gpt-4* ", "to": "o3"})).await,
        409,
        "conflict",
    );
    assert_error(
        post(json!({"from": "fast", "to": "o3", "user_id": user_id})).await,
        409,
        "conflict",
    );

    let (status, everyone) = post(json!({"from": "fast", "to": "o3"})).await;
    assert_eq!(status, 201, "{everyone}");
    let path = format!("/admin/model-mappings/{}", everyone["id"].as_str().unwrap());
    assert_eq!(app.admin_json(Method::DELETE, &path, None).await.0, 200);

    let (_, list) = app
        .admin_json(Method::GET, "/admin/model-mappings", None)
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(list["has_more"], false);

    let path = format!("/admin/model-mappings/{}", system["id"].as_str().unwrap());
    let (status, _) = app.admin_json(Method::DELETE, &path, None).await;
    assert_eq!(status, 200);
    assert_error(
        app.admin_json(Method::DELETE, &path, None).await,
        404,
        "not_found",
    );
    let (_, list) = app
        .admin_json(Method::GET, "/admin/model-mappings", None)
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    // A user's own mappings go with the user.
    app.admin_json(Method::DELETE, &format!("/admin/users/{user_id}"), None)
        .await;
    let (_, list) = app
        .admin_json(Method::GET, "/admin/model-mappings", None)
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
}

async fn bad_mappings_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    for body in [
        json!({"from": "gpt-[", "to": "x"}),
        json!({"from": "a", "to": ""}),
        json!({"from": "a", "to": "b*"}),
        json!({"from": "a"}),
        json!({"from": "a", "to": "b", "extra": 1}),
        // No name holds a control character (and PostgreSQL cannot store a NUL).
        json!({"from": "a\u{0}", "to": "b"}),
        json!({"from": "a", "to": "b\u{0}"}),
        json!(["a", "b", null]),
    ] {
        let result = app
            .admin_json(Method::POST, "/admin/model-mappings", Some(body.clone()))
            .await;
        assert_eq!(result.0, 400, "{body}: {}", result.1);
        assert_error(result, 400, "invalid_request");
    }
    assert_error(
        app.admin_json(
            Method::POST,
            "/admin/model-mappings",
            Some(json!({"from": "a", "to": "b", "user_id": "usr_nobody"})),
        )
        .await,
        404,
        "not_found",
    );
}

/// A price as `GET /admin/prices` lists it.
async fn listed_price(app: &TestApp, model: &str) -> Option<Value> {
    let (_, list) = app
        .admin_json(Method::GET, "/admin/prices?limit=1000", None)
        .await;
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model"] == model)
        .cloned()
}

async fn prices_are_seeded_set_replaced_and_listed(backend: Backend) {
    let app = spawn_app(backend).await;
    // The shipped table is there from the first start.
    let seeded = listed_price(&app, "gpt-4o")
        .await
        .expect("gpt-4o is priced");
    assert_eq!(seeded["input_per_mtok"], json!(2.5));
    assert_eq!(seeded["cached_input_per_mtok"], json!(1.25));
    assert!(listed_price(&app, "claude-sonnet-4").await.is_some());
    assert!(listed_price(&app, "gemini-2.5-pro").await.is_some());

    let (status, price) = app
        .admin_json(
            Method::PUT,
            "/admin/prices/my-model",
            Some(json!({"input_per_mtok": 2.5, "output_per_mtok": 10.0,
                        "cached_input_per_mtok": 1.25})),
        )
        .await;
    assert_eq!(status, 201, "a new price is created: {price}");
    assert_eq!(price["model"], "my-model");
    assert_eq!(price["input_per_mtok"], json!(2.5));
    assert_eq!(price["cached_input_per_mtok"], json!(1.25));
    assert_eq!(price["reasoning_per_mtok"], json!(null));
    let (status, replaced) = app
        .admin_json(
            Method::PUT,
            "/admin/prices/gpt-4o",
            Some(json!({"input_per_mtok": 0.15, "output_per_mtok": 0.6})),
        )
        .await;
    assert_eq!(status, 200, "a price is replaced: {replaced}");
    assert_eq!(replaced["input_per_mtok"], json!(0.15));
    assert_eq!(replaced["cached_input_per_mtok"], json!(null));
    assert_eq!(
        listed_price(&app, "my-model").await.unwrap()["output_per_mtok"],
        json!(10.0)
    );

    // A restart seeds again, but never over a price an admin set.
    let replica = spawn_replica(&app, &[]).await;
    let kept = listed_price(&replica, "gpt-4o").await.unwrap();
    assert_eq!(kept["input_per_mtok"], json!(0.15));
    assert_eq!(kept["output_per_mtok"], json!(0.6));
}

async fn bad_prices_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    for body in [
        json!({"input_per_mtok": -1, "output_per_mtok": 1}),
        json!({"input_per_mtok": 1}),
        json!({"input_per_mtok": "cheap", "output_per_mtok": 1}),
        json!({"input_per_mtok": 1, "output_per_mtok": 1, "per_image": -0.5}),
        json!({"input_per_mtok": 1, "output_per_mtok": 1, "per_token": 1}),
    ] {
        let result = app
            .admin_json(Method::PUT, "/admin/prices/gpt-4o", Some(body.clone()))
            .await;
        assert_eq!(result.0, 400, "{body}: {}", result.1);
        assert_error(result, 400, "invalid_request");
    }
    let nul_name = app
        .admin_json(
            Method::PUT,
            "/admin/prices/gpt%00x",
            Some(json!({"input_per_mtok": 1, "output_per_mtok": 1})),
        )
        .await;
    assert_error(nul_name, 400, "invalid_request");
    // Nothing was written.
    let price = listed_price(&app, "gpt-4o").await.unwrap();
    assert_eq!(price["input_per_mtok"], json!(2.5));
}
