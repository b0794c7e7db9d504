//! The outbound HTTP client: rustls with the webpki roots (no system certificates needed).

use std::sync::Arc;
use std::time::Duration;

/// A client for provider calls: `connect` bounds opening a connection, `timeout` the wait for
/// a response head. awc clients are not `Send`: build one per worker thread.
pub fn build(connect: Duration, timeout: Duration) -> awc::Client {
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
    }
    .timeout(connect)
    // Keep-alive connections to providers are the cheapest part of a call: allow plenty.
    .limit(4096);
    awc::Client::builder()
        .connector(connector)
        .timeout(timeout)
        .disable_redirects()
        .finish()
}

/// The kind of a failed send, for logs and reasons shown to admins. Only the kind: an error's
/// full chain is not needed and is not worth the risk of echoing a request.
pub fn describe(err: &awc::error::SendRequestError) -> &'static str {
    use awc::error::SendRequestError as E;
    match err {
        E::Timeout => "timed out",
        E::Connect(_) => "connection failed",
        E::Send(_) => "connection reset while sending",
        E::Response(_) => "malformed response",
        E::Url(_) => "bad URL",
        _ => "request failed",
    }
}
