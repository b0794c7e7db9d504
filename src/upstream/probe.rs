//! Validation probes: a cheap authenticated call (`GET {base_url}/models`) that tells whether a
//! provider accepts a key.

use std::time::Duration;

use crate::domain::Provider;

/// What a probe found out about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The provider accepted the key (a 429 counts: the key authenticated, it is only busy).
    Valid,
    /// The provider refused the key or could not be asked; the reason is safe to show.
    Rejected(String),
}

/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET {base_url}/models` authenticated as `provider` wants: the cheapest authenticated call
/// a provider answers, used to probe a key and to read the models it serves.
pub fn models_request(
    client: &awc::Client,
    provider: Provider,
    base_url: &str,
    secret: &str,
) -> awc::ClientRequest {
    let url = format!("{}/models", base_url.trim_end_matches('/'));
    let request = client.get(url);
    match provider {
        Provider::OpenAi => request.bearer_auth(secret),
        Provider::Anthropic => request
            .insert_header(("x-api-key", secret))
            .insert_header(("anthropic-version", "2023-06-01")),
        Provider::Gemini => request.insert_header(("x-goog-api-key", secret)),
    }
}

/// Asks the provider whether it accepts `secret`.
pub async fn probe(
    client: &awc::Client,
    provider: Provider,
    base_url: &str,
    secret: &str,
) -> ProbeOutcome {
    match models_request(client, provider, base_url, secret)
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status();
            if status.is_success() || status.as_u16() == 429 {
                ProbeOutcome::Valid
            } else if matches!(status.as_u16(), 401 | 403) {
                ProbeOutcome::Rejected(format!(
                    "the provider refused the key ({})",
                    status.as_u16()
                ))
            } else {
                ProbeOutcome::Rejected(format!("the provider answered {}", status.as_u16()))
            }
        }
        Err(err) => ProbeOutcome::Rejected(format!(
            "the provider could not be reached: {}",
            super::client::describe(&err)
        )),
    }
}
