//! A certificate authority made for one test, and certificates it issues, written as PEM files.

use std::path::{Path, PathBuf};

pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA's own certificate, for `delivery.ca_file`.
    pub certificate: PathBuf,
}

/// A certificate and its key, as files.
pub struct Issued {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written into `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let certificate = params.self_signed(&key).expect("CA certificate");
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, certificate.pem()).expect("write CA");
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            certificate: path,
        }
    }

    /// A server certificate for `names`, written into `dir` as `STEM.pem` and `STEM.key`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("params");
        let certificate = params.signed_by(&key, &self.issuer).expect("certificate");
        let issued = Issued {
            certificate: dir.join(format!("{stem}.pem")),
            private_key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&issued.certificate, certificate.pem()).expect("write certificate");
        std::fs::write(&issued.private_key, key.serialize_pem()).expect("write key");
        issued
    }
}
