//! The official OpenAI Python SDK, unchanged but for its base URL and key, through Switchyard:
//! JSON and streamed chat completions, a mapped model, and an authentication error.

use std::process::Command;

use serde_json::json;

use crate::helpers::{spawn_app, Backend};
use crate::mock_upstream::MockUpstream;
use crate::on_both_backends;

on_both_backends!(the_openai_python_sdk_works_through_the_router);

const SCRIPT: &str = r#"
import os
import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["SY_BASE"], api_key=os.environ["SY_KEY"], max_retries=0)
r = client.chat.completions.create(model="alias", messages=[{"role": "user", "content": "hi"}])
print("JSON", r.model, r.choices[0].message.content)
stream = client.chat.completions.create(
    model="alias", messages=[{"role": "user", "content": "hi"}], stream=True)
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

async fn the_openai_python_sdk_works_through_the_router(backend: Backend) {
    let app = spawn_app(backend).await;
    let mock = MockUpstream::start();
    app.add_upstream(json!({"provider": "openai", "base_url": mock.base_url, "secret": "ok-sdk"}))
        .await;
    app.add_mapping(json!({"from": "alias", "to": "gpt-4o-mini"}))
        .await;
    let (_, key) = app.user_with_key().await;
    let base = format!("{}/v1", app.address);
    let output = actix_web::web::block(move || {
        Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .env(
                "PYTHONPATH",
                std::env::var("SWITCHYARD_TEST_PYTHONPATH").unwrap_or_default(),
            )
            .env("SY_BASE", base)
            .env("SY_KEY", key)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (scripts/test.sh installs the openai SDK)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("JSON alias Hello"), "{stdout}");
    assert!(stdout.contains("STREAM alias Hello"), "{stdout}");
    assert!(stdout.contains("AUTH 401 invalid_api_key"), "{stdout}");
    assert!(mock
        .calls()
        .iter()
        .all(|c| c.body["model"] == "gpt-4o-mini"));
    assert_eq!(mock.calls().len(), 2);
}
