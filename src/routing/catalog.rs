//! The models an upstream key without a `models` list serves, as its provider lists them
//! (`GET {base_url}/models`), for `GET /v1/models`. Such a key may be a vLLM or Ollama server
//! with models no price names, or an OpenAI key: listing every priced model for it (Claude and
//! Gemini included) would offer model pickers names that fail. Lists are fetched when asked for
//! and kept for a while; a provider that does not list its models leaves the priced ones.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use parking_lot::Mutex;

use crate::domain::Provider;
use crate::upstream::probe::models_request;

/// How long a fetched list is used before it is fetched again.
const FRESH: Duration = Duration::from_secs(600);
/// How long a failed fetch is remembered, so a provider that does not list is not asked on
/// every call.
const FAILED_FOR: Duration = Duration::from_secs(60);
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest list read.
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Default)]
pub struct ModelCatalog {
    /// By key id and the key's version (a new secret or base URL lists again).
    lists: Mutex<HashMap<(String, NaiveDateTime), Listed>>,
}

#[derive(Clone)]
struct Listed {
    models: Option<Vec<String>>,
    at: Instant,
}

/// An upstream key as the catalog needs it; its secret is read only when the list is fetched.
pub struct ListedKey<'a, S: FnOnce() -> Option<String>> {
    pub id: &'a str,
    pub version: NaiveDateTime,
    pub base_url: &'a str,
    pub secret: S,
}

impl ModelCatalog {
    /// The models `key`'s provider lists, fetched now unless known; `None` when it does not
    /// list them (an error, or not OpenAI's list format).
    pub async fn models_of<S: FnOnce() -> Option<String>>(
        &self,
        client: &awc::Client,
        key: ListedKey<'_, S>,
    ) -> Option<Vec<String>> {
        let entry = (key.id.to_owned(), key.version);
        if let Some(listed) = self.lists.lock().get(&entry) {
            let ttl = if listed.models.is_some() {
                FRESH
            } else {
                FAILED_FOR
            };
            if listed.at.elapsed() < ttl {
                return listed.models.clone();
            }
        }
        let models = match (key.secret)() {
            Some(secret) => fetch(client, key.base_url, &secret).await,
            None => None,
        };
        let mut lists = self.lists.lock();
        // Versions of a key other than this one are stale.
        lists.retain(|(id, version), _| id != key.id || *version == key.version);
        lists.insert(
            entry,
            Listed {
                models: models.clone(),
                at: Instant::now(),
            },
        );
        models
    }
}

async fn fetch(client: &awc::Client, base_url: &str, secret: &str) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Model>,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        id: String,
    }
    let mut response = models_request(client, Provider::OpenAi, base_url, secret)
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .ok()
        .filter(|r| r.status().is_success())?;
    let body = tokio::time::timeout(FETCH_TIMEOUT, response.body().limit(MAX_LIST_BYTES))
        .await
        .ok()?
        .ok()?;
    let list: List = serde_json::from_slice(&body).ok()?;
    Some(list.data.into_iter().map(|m| m.id).collect())
}
