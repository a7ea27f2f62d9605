//! TLS set-up: the server certificate for STARTTLS on listeners, and the client configuration for
//! STARTTLS when delivering.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM certificate chain and private key into a server configuration.
pub fn server_config(
    certificate: &Path,
    private_key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let file_error = |path: &Path, message: String| TlsError::File {
        path: path.display().to_string(),
        message,
    };
    let pem_error = |path: &Path, error: pem::Error, what: &str| match error {
        pem::Error::NoItemsFound => file_error(path, format!("no {what} in PEM file")),
        pem::Error::Io(error) => file_error(path, error.to_string()),
        other => file_error(path, other.to_string()),
    };
    let chains: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .map_err(|error| pem_error(certificate, error, "certificate"))?
        .collect::<Result<_, _>>()
        .map_err(|error| pem_error(certificate, error, "certificate"))?;
    if chains.is_empty() {
        return Err(file_error(
            certificate,
            "no certificate in PEM file".to_string(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(private_key)
        .map_err(|error| pem_error(private_key, error, "private key"))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chains, key)?;
    Ok(Arc::new(config))
}

/// Client configuration for opportunistic and mandatory-unverified STARTTLS: encryption against
/// passive eavesdropping, as Postfix's `may` and `encrypt` levels. Certificates are not checked
/// because MX host names are not authenticated by plain DNS anyway (that is DANE's and MTA-STS's job).
pub fn unverified_client_config() -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|builder| {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))))
                .with_no_client_auth()
        });
    Arc::new(config)
}

#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
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
    fn pem_files_load_or_say_what_is_wrong_with_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let generated =
            rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).expect("certificate");
        let certificate = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&certificate, generated.cert.pem()).expect("write cert");
        std::fs::write(&key, generated.signing_key.serialize_pem()).expect("write key");
        std::fs::write(&empty, "not PEM at all\n").expect("write empty");
        assert!(server_config(&certificate, &key).is_ok());
        let error = |certificate: &Path, key: &Path| {
            server_config(certificate, key)
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            error(&empty, &key),
            format!("{}: no certificate in PEM file", empty.display())
        );
        assert_eq!(
            error(&certificate, &empty),
            format!("{}: no private key in PEM file", empty.display())
        );
        // The certificate is not a key.
        assert_eq!(
            error(&certificate, &certificate),
            format!("{}: no private key in PEM file", certificate.display())
        );
        let missing = dir.path().join("missing.pem");
        assert!(error(&missing, &key).starts_with(&format!("{}: ", missing.display())));
    }
}
