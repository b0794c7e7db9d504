//! Connections to PostgreSQL, over TLS when the database URL's `sslmode` asks for it. Managed
//! databases often refuse anything else (RDS's `rds.force_ssl`, Azure's
//! `require_secure_transport`). The modes read as libpq reads them:
//!
//! - absent, `disable` or `prefer`: plain TCP (`prefer` does not try TLS here);
//! - `require`: encrypted; the server's certificate is not checked (libpq's `require` without
//!   a root certificate file);
//! - `verify-ca` and `verify-full`: encrypted, and the certificate must chain to the webpki
//!   roots, or to the PEM file `sslrootcert` names, and name the host (both modes check it).

use std::path::PathBuf;
use std::sync::Arc;

use diesel::ConnectionError;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// What a database URL asks of the connection's transport.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Transport {
    Plain,
    /// TLS without checking the certificate.
    Encrypted,
    /// TLS with the certificate checked, against these roots (`None`: the webpki roots).
    Verified(Option<PathBuf>),
}

/// Splits the TLS settings off a database URL: the URL tokio-postgres reads (without
/// `sslmode` and `sslrootcert`, whose `verify-*` values it does not know) and the transport.
fn split(url: &str) -> Result<(String, Transport), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Transport::Plain));
    };
    let mut mode = None;
    let mut root = None;
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "sslmode" => mode = Some(value.into_owned()),
            "sslrootcert" => root = Some(PathBuf::from(value.into_owned())),
            _ => {
                kept.append_pair(&name, &value);
            }
        }
    }
    let transport = match mode.as_deref() {
        None | Some("disable" | "prefer" | "allow") => Transport::Plain,
        Some("require") if root.is_none() => Transport::Encrypted,
        Some("require" | "verify-ca" | "verify-full") => Transport::Verified(root),
        Some(other) => return Err(format!("unknown sslmode `{other}` in the database URL")),
    };
    let kept = kept.finish();
    let url = match kept.is_empty() {
        true => base.to_owned(),
        false => format!("{base}?{kept}"),
    };
    Ok((url, transport))
}

/// Opens a connection to the PostgreSQL database at `url`, over TLS when its `sslmode` says so.
pub async fn establish(url: &str) -> Result<AsyncPgConnection, ConnectionError> {
    let (url, transport) = split(url).map_err(ConnectionError::BadConnection)?;
    let config = match transport {
        Transport::Plain => return AsyncPgConnection::establish(&url).await,
        Transport::Encrypted => client_config(Roots::Unchecked),
        Transport::Verified(None) => client_config(Roots::Webpki),
        Transport::Verified(Some(path)) => client_config(Roots::File(path)),
    }
    .map_err(ConnectionError::BadConnection)?;
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    // The URL's own sslmode is gone: TLS is required once asked for, never silently dropped.
    let mut pg_config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectionError::BadConnection(e.to_string()))?;
    pg_config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = pg_config
        .connect(tls)
        .await
        .map_err(|e| ConnectionError::BadConnection(with_causes(&e)))?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

/// An error and its causes (a failed handshake says why only in its source: an unknown
/// issuer, a name mismatch). tokio-postgres's errors never hold the URL's password.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

enum Roots {
    Unchecked,
    Webpki,
    File(PathBuf),
}

fn client_config(roots: Roots) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::Unchecked => {
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
                .with_no_client_auth())
        }
        Roots::Webpki => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::File(path) => {
            let pem = std::fs::read(&path)
                .map_err(|e| format!("reading sslrootcert {}: {e}", path.display()))?;
            let mut found = 0;
            for cert in rustls_pki_certs(&pem) {
                store
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                found += 1;
            }
            if found == 0 {
                return Err(format!(
                    "sslrootcert {} holds no PEM certificate",
                    path.display()
                ));
            }
        }
    }
    Ok(builder.with_root_certificates(store).with_no_client_auth())
}

/// The certificates of a PEM file.
fn rustls_pki_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// `sslmode=require`: the channel is encrypted, the certificate taken as it comes (the
/// signatures of the handshake are still checked, so the session is with the key's holder).
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_off_the_url() {
        let plain = "postgres://u:p@db:5432/x";
        assert_eq!(split(plain).unwrap(), (plain.to_owned(), Transport::Plain));
        assert_eq!(
            split("postgres://db/x?sslmode=disable&application_name=sy").unwrap(),
            (
                "postgres://db/x?application_name=sy".to_owned(),
                Transport::Plain
            )
        );
        assert_eq!(
            split("postgres://db/x?sslmode=require").unwrap(),
            ("postgres://db/x".to_owned(), Transport::Encrypted)
        );
        assert_eq!(
            split("postgres://db/x?sslmode=verify-full").unwrap().1,
            Transport::Verified(None)
        );
        assert_eq!(
            split("postgres://db/x?sslrootcert=%2Fetc%2Fca.pem&sslmode=require")
                .unwrap()
                .1,
            Transport::Verified(Some("/etc/ca.pem".into()))
        );
        assert!(split("postgres://db/x?sslmode=sometimes").is_err());
    }
}
