//! TLS set-up for listeners: the server certificate for STARTTLS and implicit TLS, and the PEM
//! reading that the client side's CA file shares.

use std::path::Path;
use std::sync::Arc;

use std::collections::HashMap;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{CertificateFiles, TlsFiles};

/// Certificates by the DNS names they are served for.
pub type Named = Vec<(String, Arc<CertifiedKey>)>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(path: &Path, message: String) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message,
    }
}

fn pem_error(path: &Path, error: pem::Error, what: &str) -> TlsError {
    match error {
        pem::Error::NoItemsFound => file_error(path, format!("no {what} in PEM file")),
        pem::Error::Io(error) => file_error(path, error.to_string()),
        other => file_error(path, other.to_string()),
    }
}

/// Every certificate in a PEM file; an error when there is none.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|error| pem_error(path, error, "certificate"))?
        .collect::<Result<_, _>>()
        .map_err(|error| pem_error(path, error, "certificate"))?;
    if certificates.is_empty() {
        return Err(file_error(path, "no certificate in PEM file".to_string()));
    }
    Ok(certificates)
}

/// Loads a PEM certificate chain and private key into a signing key for a server.
pub fn certified_key(
    certificate: &Path,
    private_key: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certificates(certificate)?;
    let key = PrivateKeyDer::from_pem_file(private_key)
        .map_err(|error| pem_error(private_key, error, "private key"))?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|error| {
        file_error(
            private_key,
            format!("does not go with {}: {error}", certificate.display()),
        )
    })?;
    Ok(Arc::new(key))
}

/// The listeners' certificates: the default one, and more served to clients that ask (by SNI)
/// for a name one of them carries.
#[derive(Debug)]
pub struct Certificates {
    default: Arc<CertifiedKey>,
    /// Lower-case DNS names (`*.example.com` for wildcards) to their certificate.
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl Certificates {
    pub fn load(files: &TlsFiles) -> Result<Certificates, TlsError> {
        let default = certified_key(&files.certificate, &files.private_key)?;
        let mut by_name = HashMap::new();
        for extra in &files.sni {
            let (key, names) = named_key(extra)?;
            for name in names {
                by_name.insert(name, key.clone());
            }
        }
        Ok(Certificates { default, by_name })
    }
}

/// A certificate for SNI and the names it is chosen by; an error when it names none.
fn named_key(files: &CertificateFiles) -> Result<(Arc<CertifiedKey>, Vec<String>), TlsError> {
    let key = certified_key(&files.certificate, &files.private_key)?;
    let names = dns_names(&key).map_err(|message| file_error(&files.certificate, message))?;
    if names.is_empty() {
        return Err(file_error(
            &files.certificate,
            "the certificate names no DNS name for SNI to choose it by".to_string(),
        ));
    }
    Ok((key, names))
}

/// The DNS names of a certificate's subject alternative names, lower case.
fn dns_names(key: &CertifiedKey) -> Result<Vec<String>, String> {
    let end_entity = key
        .cert
        .first()
        .ok_or_else(|| "no certificate".to_string())?;
    let parsed = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|error| format!("cannot read the certificate: {error}"))?;
    Ok(parsed
        .valid_dns_names()
        .map(|name| name.to_ascii_lowercase())
        .collect())
}

/// Chooses the certificate of each handshake from the current set, which a reload replaces
/// while connections keep coming: the operator's names first, then the tenants', then the
/// default.
#[derive(Debug)]
pub struct CertificateResolver {
    current: ArcSwap<Certificates>,
    /// Every tenant's names, merged for the handshake's lookup.
    tenant_names: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    /// Each tenant's names and certificates, from which `tenant_names` is rebuilt.
    tenants: std::sync::Mutex<HashMap<String, Named>>,
}

impl CertificateResolver {
    pub fn new(certificates: Certificates) -> CertificateResolver {
        CertificateResolver {
            current: ArcSwap::from_pointee(certificates),
            tenant_names: ArcSwap::default(),
            tenants: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Loads the files again; on an error the certificates in use stay.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), TlsError> {
        self.current.store(Arc::new(Certificates::load(files)?));
        Ok(())
    }

    /// Loads a tenant's certificates: each must name only `domains` or names below them (a
    /// tenant cannot take another's name). Nothing changes on an error.
    pub fn load_tenant(files: &[CertificateFiles], domains: &[String]) -> Result<Named, TlsError> {
        let mut loaded = Vec::new();
        for entry in files {
            let (key, names) = named_key(entry)?;
            for name in names {
                let bare = name.strip_prefix("*.").unwrap_or(&name);
                let owned = domains.iter().any(|domain| {
                    bare == domain
                        || bare
                            .strip_suffix(domain.as_str())
                            .is_some_and(|prefix| prefix.ends_with('.'))
                });
                if !owned {
                    return Err(file_error(
                        &entry.certificate,
                        format!("`{name}` is not one of the tenant's domains or below one"),
                    ));
                }
                loaded.push((name, key.clone()));
            }
        }
        Ok(loaded)
    }

    /// Replaces a tenant's certificates (`None`: the tenant is gone).
    pub fn set_tenant(&self, tenant: &str, certificates: Option<Named>) {
        let mut tenants = self
            .tenants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match certificates {
            Some(certificates) if !certificates.is_empty() => {
                tenants.insert(tenant.to_string(), certificates);
            }
            _ => {
                tenants.remove(tenant);
            }
        }
        let merged: HashMap<String, Arc<CertifiedKey>> = tenants
            .values()
            .flatten()
            .map(|(name, key)| (name.clone(), key.clone()))
            .collect();
        self.tenant_names.store(Arc::new(merged));
    }

    fn choose(&self, asked: Option<&str>) -> Arc<CertifiedKey> {
        let current = self.current.load();
        let Some(asked) = asked.map(|name| name.trim_end_matches('.').to_ascii_lowercase()) else {
            return current.default.clone();
        };
        let tenants = self.tenant_names.load();
        let wildcard = asked
            .split_once('.')
            .map(|(_, parent)| format!("*.{parent}"));
        let lookup = |map: &HashMap<String, Arc<CertifiedKey>>| {
            map.get(&asked)
                .or_else(|| wildcard.as_ref().and_then(|name| map.get(name)))
                .cloned()
        };
        lookup(&current.by_name)
            .or_else(|| lookup(&tenants))
            .unwrap_or_else(|| current.default.clone())
    }
}

impl ResolvesServerCert for CertificateResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(hello.server_name()))
    }
}

/// A server configuration whose certificate `resolver` chooses.
pub fn server_config(
    resolver: Arc<CertificateResolver>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(Arc::new(config))
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
        assert!(certified_key(&certificate, &key).is_ok());
        let error = |certificate: &Path, key: &Path| {
            certified_key(certificate, key)
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
        // A key of another certificate.
        let other = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).expect("cert");
        let other_key = dir.path().join("other.key");
        std::fs::write(&other_key, other.signing_key.serialize_pem()).expect("write key");
        assert!(error(&certificate, &other_key).contains("does not go with"));
    }

    #[test]
    fn sni_chooses_by_exact_name_then_wildcard_then_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |stem: &str, names: &[&str]| {
            let generated = rcgen::generate_simple_self_signed(
                names
                    .iter()
                    .map(|name| name.to_string())
                    .collect::<Vec<_>>(),
            )
            .expect("certificate");
            let certificate = dir.path().join(format!("{stem}.pem"));
            let private_key = dir.path().join(format!("{stem}.key"));
            std::fs::write(&certificate, generated.cert.pem()).expect("write");
            std::fs::write(&private_key, generated.signing_key.serialize_pem()).expect("write");
            crate::config::CertificateFiles {
                certificate,
                private_key,
            }
        };
        let default = write("default", &["mx.provider.test"]);
        let files = TlsFiles {
            certificate: default.certificate.clone(),
            private_key: default.private_key.clone(),
            sni: vec![
                write("acme", &["mail.acme.test"]),
                write("bravo", &["*.bravo.test"]),
            ],
        };
        let resolver = CertificateResolver::new(Certificates::load(&files).expect("load"));
        let leaf = |name: Option<&str>| resolver.choose(name).cert[0].clone();
        let default_leaf = leaf(None);
        assert_ne!(leaf(Some("MAIL.ACME.TEST.")), default_leaf);
        assert_ne!(leaf(Some("smtp.bravo.test")), default_leaf);
        assert_ne!(leaf(Some("smtp.bravo.test")), leaf(Some("mail.acme.test")));
        assert_eq!(leaf(Some("a.b.bravo.test")), default_leaf);
        assert_eq!(leaf(Some("unknown.test")), default_leaf);

        // A tenant's certificate serves its own names; the operator's names come first.
        let tenant = write("tenant", &["mail.tenant.test"]);
        let served = CertificateResolver::load_tenant(
            std::slice::from_ref(&tenant),
            &["tenant.test".to_string()],
        )
        .expect("tenant certificate");
        resolver.set_tenant("t1", Some(served));
        assert_ne!(leaf(Some("mail.tenant.test")), default_leaf);
        resolver.set_tenant("t1", None);
        assert_eq!(leaf(Some("mail.tenant.test")), default_leaf);
        let error = CertificateResolver::load_tenant(
            std::slice::from_ref(&tenant),
            &["other.test".to_string()],
        )
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
        assert!(
            error.contains("`mail.tenant.test` is not one of the tenant's domains"),
            "{error}"
        );
    }
}
