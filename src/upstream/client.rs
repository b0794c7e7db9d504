//! The outbound HTTP client: rustls with the webpki roots (no system certificates needed).

use std::sync::Arc;
use std::time::Duration;

/// A client for provider calls. awc clients are not `Send`: build one per worker thread.
pub fn build(timeout: Duration) -> awc::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let connector = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => {
            let mut config = builder.with_root_certificates(roots).with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            awc::Connector::new().rustls_0_23(Arc::new(config))
        }
        Err(err) => {
            tracing::error!(error = %err, "TLS set-up failed; only plain HTTP upstreams will work");
            awc::Connector::new()
        }
    };
    awc::Client::builder()
        .connector(connector)
        .timeout(timeout)
        .disable_redirects()
        .finish()
}
