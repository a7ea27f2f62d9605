//! Certificate checks on the connections the delivery client opens.
//!
//! Two client configurations share one set of trust anchors: the *verifying* one refuses a
//! handshake whose chain does not lead to a trusted root or whose certificate does not name the
//! host (Postfix's `secure`/`verify` levels), the *accepting* one encrypts with any certificate
//! (Postfix's `may`). After an accepting handshake the same verifier still looks at the
//! certificate, so every delivery can say whether its TLS was `verified` or only `unverified`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::tls::{provider, read_certificates, TlsError};

/// What protected one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// Plain text.
    None,
    /// Encrypted, but the certificate was not checked or did not check out.
    Unverified,
    /// Encrypted to a certificate that chains to a trusted root and names the host.
    Verified,
}

impl fmt::Display for TlsState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsState::None => "none",
            TlsState::Unverified => "unverified",
            TlsState::Verified => "verified",
        })
    }
}

/// Where the trust anchors came from, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorSource {
    /// The operator's PEM file (`delivery.ca_file`): only its certificates are trusted.
    File(String),
    /// The operating system's store, as `rustls-native-certs` finds it (`SSL_CERT_FILE`,
    /// `SSL_CERT_DIR`, else the distribution's bundle).
    System,
}

/// The delivery client's TLS configurations and the verifier behind them.
pub struct ClientTls {
    accepting: Arc<rustls::ClientConfig>,
    /// `None` when there is no trust anchor at all: nothing can be verified.
    verifying: Option<(Arc<rustls::ClientConfig>, Arc<WebPkiServerVerifier>)>,
    pub anchors: AnchorSource,
    pub anchor_count: usize,
}

impl ClientTls {
    /// Trusts the certificates of `ca_file`, or the system's store when there is none.
    pub fn new(ca_file: Option<&Path>) -> Result<ClientTls, TlsError> {
        let (certificates, anchors) = match ca_file {
            Some(path) => (
                read_certificates(path)?,
                AnchorSource::File(path.display().to_string()),
            ),
            None => {
                let found = rustls_native_certs::load_native_certs();
                for error in &found.errors {
                    tracing::warn!(%error, "cannot read a system trust anchor");
                }
                (found.certs, AnchorSource::System)
            }
        };
        let mut roots = RootCertStore::empty();
        let (anchor_count, unusable) = roots.add_parsable_certificates(certificates);
        if let (AnchorSource::File(path), true) = (&anchors, unusable > 0) {
            return Err(TlsError::File {
                path: path.clone(),
                message: format!("{unusable} certificate(s) are not usable trust anchors"),
            });
        }
        let verifying = if anchor_count == 0 {
            None
        } else {
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|error| rustls::Error::General(error.to_string()))?;
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_webpki_verifier(verifier.clone())
                .with_no_client_auth();
            Some((Arc::new(config), verifier))
        };
        Ok(ClientTls {
            accepting: accepting_config()?,
            verifying,
            anchors,
            anchor_count,
        })
    }

    /// The configuration for a handshake: one that refuses unverifiable certificates when
    /// `verify`, else one that takes any. `Err` says why verification is impossible.
    pub fn config(&self, verify: bool) -> Result<Arc<rustls::ClientConfig>, String> {
        if !verify {
            return Ok(self.accepting.clone());
        }
        match &self.verifying {
            Some((config, _)) => Ok(config.clone()),
            None => Err(self.no_anchors()),
        }
    }

    fn no_anchors(&self) -> String {
        match &self.anchors {
            AnchorSource::File(path) => format!("no trust anchor in {path}"),
            AnchorSource::System => {
                "no trust anchor: the system has no CA certificates (install ca-certificates or set delivery.ca_file)".to_string()
            }
        }
    }

    /// Checks a certificate chain the accepting configuration let through: `Ok` when it chains
    /// to a trust anchor and names `host`, else the reason.
    pub fn check(&self, chain: &[CertificateDer<'_>], host: &str) -> Result<(), String> {
        let Some((_, verifier)) = &self.verifying else {
            return Err(self.no_anchors());
        };
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Err("no certificate presented".to_string());
        };
        let name = server_name(host)?;
        verifier
            .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|error| error.to_string())
    }
}

/// A client configuration that takes any certificate (opportunistic TLS, and tests that talk
/// to a listener with a throwaway certificate).
pub fn accepting_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate::new()))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name a certificate must carry for `host` (a DNS name or an IP literal), without the
/// root's trailing dot.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_end_matches('.');
    let host = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|_| format!("`{host}` is not a host name"))
}

/// Takes any certificate: for opportunistic TLS, which protects against passive eavesdropping
/// only (MX names are not authenticated by plain DNS; MTA-STS and DANE do that).
/// Its signature checks (the provider's algorithms) serve the other verifiers too.
#[derive(Debug)]
pub(crate) struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl AcceptAnyCertificate {
    pub(crate) fn new() -> AcceptAnyCertificate {
        AcceptAnyCertificate(provider())
    }
}

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

    /// A CA and a certificate it issued for `names`, as PEM text.
    fn issued(ca_name: &str, names: &[&str]) -> (String, CertificateDer<'static>) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
        (ca.pem(), leaf.der().clone())
    }

    #[test]
    fn a_chain_is_verified_against_the_ca_file_and_the_host_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, leaf) = issued("trusted", &["mx.example.test"]);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca).expect("write");
        let tls = ClientTls::new(Some(&ca_file)).expect("client tls");
        assert_eq!(tls.anchor_count, 1);
        assert_eq!(
            tls.check(std::slice::from_ref(&leaf), "mx.example.test."),
            Ok(())
        );
        let wrong_name = tls
            .check(std::slice::from_ref(&leaf), "other.example.test")
            .expect_err("wrong name");
        assert!(wrong_name.contains("not valid for name"), "{wrong_name}");
        let (_, stranger) = issued("stranger", &["mx.example.test"]);
        let unknown = tls
            .check(&[stranger], "mx.example.test")
            .expect_err("unknown CA");
        assert!(unknown.contains("UnknownIssuer"), "{unknown}");
        assert!(tls.config(true).is_ok());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").expect("write");
        let error = ClientTls::new(Some(&empty)).err().map(|e| e.to_string());
        assert_eq!(
            error,
            Some(format!("{}: no certificate in PEM file", empty.display()))
        );
    }

    #[test]
    fn host_names_and_literals() {
        assert!(server_name("mx.example.test.").is_ok());
        assert!(server_name("[192.0.2.1]").is_ok());
        assert!(server_name("::1").is_ok());
        assert!(server_name("bad name").is_err());
    }
}
