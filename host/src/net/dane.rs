//! DANE for SMTP (RFC 7672): TLSA records of an MX host, trusted only when a validating
//! resolver says they are (its AD bit, Postfix's model: `smtp_dns_support_level = dnssec` with a
//! local validating resolver such as unbound), and the check of a server's certificate chain
//! against them.
//!
//! Switchyard does not validate DNSSEC itself: it asks the configured resolvers with the AD and
//! DO bits set and believes the AD bit of the answer. That is only as safe as the path to the
//! resolver, so DANE is off unless `[delivery] dane = true`, which belongs with a resolver on the
//! same host.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::op::{Edns, Message, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::tls::provider;
use super::verify::AcceptAnyCertificate;

/// One usable TLSA record (RFC 7672 3.1: DANE-TA(2) and DANE-EE(3) only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    /// 2 (DANE-TA) or 3 (DANE-EE).
    pub usage: u8,
    /// 0 (full certificate) or 1 (SubjectPublicKeyInfo).
    pub selector: u8,
    /// 0 (exact), 1 (SHA-256) or 2 (SHA-512).
    pub matching: u8,
    pub data: Vec<u8>,
}

/// What DNS says of a host's TLSA records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsaAnswer {
    /// No validated answer (no records, or the resolver did not vouch for them): no DANE.
    Insecure,
    /// Validated records, none of them usable: TLS is still required, but not authenticated.
    Unusable,
    /// Validated, usable records: the certificate must match one.
    Usable(Vec<Tlsa>),
}

/// A DNS answer as a validating resolver gives it.
pub struct Validated {
    pub records: Vec<RData>,
    /// The resolver's AD bit: it validated the answer with DNSSEC.
    pub authentic: bool,
    pub code: ResponseCode,
}

/// Asks `servers` (in turn) for `name`/`kind` with AD and DO set (RFC 6840 5.7).
pub async fn query(
    servers: &[SocketAddr],
    name: &str,
    kind: RecordType,
    timeout: Duration,
) -> Result<Validated, String> {
    let fqdn = format!("{}.", name.trim_end_matches('.'));
    let name = Name::from_ascii(&fqdn).map_err(|error| format!("`{fqdn}`: {error}"))?;
    let mut message = Message::query();
    message.metadata.id = fastrand::u16(..);
    message.metadata.recursion_desired = true;
    message.metadata.authentic_data = true;
    message.add_query(Query::query(name, kind));
    let mut edns = Edns::new();
    edns.set_dnssec_ok(true);
    edns.set_max_payload(1232);
    message.set_edns(edns);
    let request = message.to_vec().map_err(|error| error.to_string())?;
    let mut last_error = "no resolver to ask".to_string();
    for server in servers {
        match tokio::time::timeout(timeout, exchange(*server, &request, message.metadata.id)).await
        {
            Ok(Ok(answer)) => {
                return Ok(Validated {
                    authentic: answer.metadata.authentic_data,
                    code: answer.metadata.response_code,
                    records: answer
                        .answers
                        .iter()
                        .filter(|record| record.record_type() == kind)
                        .map(|record| record.data.clone())
                        .collect(),
                })
            }
            Ok(Err(error)) => last_error = format!("{server}: {error}"),
            Err(_) => last_error = format!("{server}: no answer within {timeout:?}"),
        }
    }
    Err(last_error)
}

/// One request over UDP, again over TCP when the answer was truncated.
async fn exchange(server: SocketAddr, request: &[u8], id: u16) -> Result<Message, String> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| "address")?
    } else {
        "[::]:0".parse().map_err(|_| "address")?
    };
    let socket = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(|error| error.to_string())?;
    socket
        .send_to(request, server)
        .await
        .map_err(|error| error.to_string())?;
    let mut buffer = vec![0u8; 4096];
    loop {
        let (length, from) = socket
            .recv_from(&mut buffer)
            .await
            .map_err(|error| error.to_string())?;
        if from != server {
            continue;
        }
        let Ok(answer) = Message::from_vec(&buffer[..length]) else {
            continue;
        };
        if answer.metadata.id != id {
            continue;
        }
        if !answer.metadata.truncation {
            return Ok(answer);
        }
        break;
    }
    let mut tcp = tokio::net::TcpStream::connect(server)
        .await
        .map_err(|error| error.to_string())?;
    let length = u16::try_from(request.len()).map_err(|_| "request too long")?;
    tcp.write_all(&length.to_be_bytes())
        .await
        .map_err(|error| error.to_string())?;
    tcp.write_all(request)
        .await
        .map_err(|error| error.to_string())?;
    let mut prefix = [0u8; 2];
    tcp.read_exact(&mut prefix)
        .await
        .map_err(|error| error.to_string())?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|error| error.to_string())?;
    Message::from_vec(&answer).map_err(|error| error.to_string())
}

/// The TLSA answer for an MX host's SMTP port (`_25._tcp.HOST`).
pub async fn tlsa_for(
    servers: &[SocketAddr],
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TlsaAnswer, String> {
    let answer = query(
        servers,
        &format!("_{port}._tcp.{host}"),
        RecordType::TLSA,
        timeout,
    )
    .await?;
    // A lookup that failed (SERVFAIL, REFUSED...) is not an absence of records: for a host
    // whose MX records were validated, RFC 7672 2.2 forbids trying it without its TLSA answer,
    // which falling back to "no DANE" would do.
    if !matches!(answer.code, ResponseCode::NoError | ResponseCode::NXDomain) {
        return Err(format!("the resolver answered {}", answer.code));
    }
    if !answer.authentic || answer.records.is_empty() {
        return Ok(TlsaAnswer::Insecure);
    }
    let usable: Vec<Tlsa> = answer
        .records
        .iter()
        .filter_map(|record| match record {
            RData::TLSA(tlsa) => usable(tlsa),
            _ => None,
        })
        .collect();
    Ok(if usable.is_empty() {
        TlsaAnswer::Unusable
    } else {
        TlsaAnswer::Usable(usable)
    })
}

fn usable(record: &hickory_resolver::proto::rr::rdata::TLSA) -> Option<Tlsa> {
    let usage = match record.cert_usage {
        CertUsage::DaneTa => 2,
        CertUsage::DaneEe => 3,
        // PKIX-TA and PKIX-EE are not for SMTP (RFC 7672 3.1.3).
        _ => return None,
    };
    let selector = match record.selector {
        Selector::Full => 0,
        Selector::Spki => 1,
        _ => return None,
    };
    let matching = match record.matching {
        Matching::Raw => 0,
        Matching::Sha256 => 1,
        Matching::Sha512 => 2,
        _ => return None,
    };
    Some(Tlsa {
        usage,
        selector,
        matching,
        data: record.cert_data.clone(),
    })
}

impl std::fmt::Display for Tlsa {
    /// The presentation form (RFC 6698 2.2): `3 1 1 <hex>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        for byte in &self.data {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl Tlsa {
    /// Whether `certificate` matches this record.
    fn matches(&self, certificate: &CertificateDer<'_>) -> bool {
        let selected: Vec<u8> = match self.selector {
            0 => certificate.as_ref().to_vec(),
            _ => match subject_public_key_info(certificate) {
                Some(spki) => spki,
                None => return false,
            },
        };
        let digest = match self.matching {
            0 => selected,
            1 => sha2::Sha256::digest(&selected).to_vec(),
            _ => sha2::Sha512::digest(&selected).to_vec(),
        };
        digest == self.data
    }
}

/// The SubjectPublicKeyInfo of a certificate, as DER.
fn subject_public_key_info(certificate: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let parsed = webpki::EndEntityCert::try_from(certificate).ok()?;
    let spki = parsed.subject_public_key_info();
    Some(spki.as_ref().to_vec())
}

/// Checks server certificates against an MX host's usable TLSA records (RFC 7672 3.1): a
/// DANE-EE(3) record matching the end-entity certificate authenticates it whatever its names and
/// dates; a DANE-TA(2) record matching a certificate of the chain makes that certificate the
/// trust anchor of an ordinary chain check against the MX host's name.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<Tlsa>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The handshake's signature checks, as every verifier makes them.
    signatures: AcceptAnyCertificate,
}

impl DaneVerifier {
    pub fn new(records: Vec<Tlsa>) -> DaneVerifier {
        DaneVerifier {
            records,
            provider: provider(),
            signatures: AcceptAnyCertificate::new(),
        }
    }

    /// A client configuration that refuses any certificate these records do not vouch for.
    pub fn client_config(records: Vec<Tlsa>) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(DaneVerifier::new(records)))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let end_entity_match = self
            .records
            .iter()
            .any(|record| record.usage == 3 && record.matches(end_entity));
        if end_entity_match {
            return Ok(ServerCertVerified::assertion());
        }
        for record in self.records.iter().filter(|record| record.usage == 2) {
            for anchor in intermediates.iter().filter(|cert| record.matches(cert)) {
                let mut roots = RootCertStore::empty();
                if roots.add(anchor.clone().into_owned()).is_err() {
                    continue;
                }
                let verifier = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .build()
                .map_err(|error| rustls::Error::General(error.to_string()))?;
                if verifier
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                    .is_ok()
                {
                    return Ok(ServerCertVerified::assertion());
                }
            }
        }
        Err(rustls::Error::General(
            "DANE: no TLSA record matches the certificate chain".to_string(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dane_ee_matches_the_public_key_and_nothing_else() {
        let generated =
            rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).expect("cert");
        let der = generated.cert.der().clone();
        let spki = subject_public_key_info(&der).expect("spki");
        let record = Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: sha2::Sha256::digest(&spki).to_vec(),
        };
        assert!(record.matches(&der));
        let full = Tlsa {
            usage: 3,
            selector: 0,
            matching: 0,
            data: der.as_ref().to_vec(),
        };
        assert!(full.matches(&der));
        let other = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).expect("cert");
        assert!(!record.matches(other.cert.der()));
    }
}
