//! A signing key loaded from its PEM file, ready to sign, and the DNS record that publishes it.

use base64::Engine;
use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::config::DkimKeyConfig;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// The two algorithms DKIM has (RFC 6376 and RFC 8463).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Rsa,
    Ed25519,
}

impl Algorithm {
    /// The `k=` tag of the key record.
    pub fn record_tag(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

enum Prepared {
    Rsa(Box<DkimSigner<RsaKey<Sha256>, Done>>),
    Ed25519(Box<DkimSigner<Ed25519Key, Done>>),
}

/// The same key set up to seal an ARC set (RFC 8617 knows rsa-sha256 only, and verifiers such
/// as dkimpy refuse anything else, so an Ed25519 key does not seal).
struct PreparedSealer(Box<ArcSealer<RsaKey<Sha256>, Done>>);

/// One configured key: where it signs, and the signer set up for it.
pub struct SigningKey {
    /// Lower case, no trailing dot.
    pub domain: String,
    pub selector: String,
    pub active: bool,
    pub algorithm: Algorithm,
    /// The public key as the `p=` tag carries it (base64).
    pub public_key: String,
    prepared: Prepared,
    sealer: Option<PreparedSealer>,
}

impl SigningKey {
    pub fn load(config: &DkimKeyConfig) -> Result<SigningKey, KeyError> {
        let path = &config.private_key;
        let error = |message: String| KeyError::File {
            path: path.display().to_string(),
            message,
        };
        let der = PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                error("no private key in PEM file".to_string())
            }
            other => error(other.to_string()),
        })?;
        let domain = crate::mail::address::domain_key(&config.domain);
        let (algorithm, public_key, prepared) = match &der {
            PrivateKeyDer::Pkcs8(pkcs8) => {
                match Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der()) {
                    Ok(key) => (
                        Algorithm::Ed25519,
                        key.public_key(),
                        Prepared::Ed25519(Box::new(prepare(key, &domain, config))),
                    ),
                    Err(_) => rsa(&der, &domain, config).map_err(&error)?,
                }
            }
            PrivateKeyDer::Pkcs1(_) => rsa(&der, &domain, config).map_err(&error)?,
            _ => {
                return Err(error(
                    "not an RSA or Ed25519 key (DKIM has no other kind)".to_string(),
                ))
            }
        };
        let sealer = sealer(&der, algorithm, &domain, config).map_err(&error)?;
        Ok(SigningKey {
            sealer,
            domain,
            selector: config.selector.clone(),
            active: config.active,
            algorithm,
            public_key: base64::engine::general_purpose::STANDARD.encode(public_key),
            prepared,
        })
    }

    /// The `DKIM-Signature:` header field for `message` (CRLF line ends).
    pub fn sign(&self, message: &[u8]) -> Result<String, mail_auth::Error> {
        use mail_auth::common::headers::HeaderWriter;
        let signature = match &self.prepared {
            Prepared::Rsa(signer) => signer.sign(message)?,
            Prepared::Ed25519(signer) => signer.sign(message)?,
        };
        Ok(signature.to_header())
    }

    /// Whether the key can seal ARC sets (an RSA key).
    pub fn seals(&self) -> bool {
        self.sealer.is_some()
    }

    /// The ARC set (`ARC-Seal`, `ARC-Message-Signature`, `ARC-Authentication-Results`) that
    /// seals `message` with this hop's `results`, continuing the chain `arc` found.
    pub fn seal(
        &self,
        message: &AuthenticatedMessage<'_>,
        results: &AuthenticationResults<'_>,
        arc: &ArcOutput<'_>,
    ) -> Result<String, mail_auth::Error> {
        use mail_auth::common::headers::HeaderWriter;
        let Some(PreparedSealer(sealer)) = &self.sealer else {
            return Err(mail_auth::Error::Arc(mail_auth::arc::ArcError::InvalidCV));
        };
        Ok(sealer.seal(message, results, arc)?.to_header())
    }

    /// Where the key's record lives.
    pub fn record_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    /// The TXT record that publishes the key.
    pub fn record(&self) -> String {
        format!(
            "v=DKIM1; k={}; p={}",
            self.algorithm.record_tag(),
            self.public_key
        )
    }
}

/// A signer for `key` as the entry says: relaxed/relaxed canonicalization (it survives the
/// whitespace changes of relays), its header list and lifetime.
fn prepare<K: mail_auth::common::crypto::SigningKey>(
    key: K,
    domain: &str,
    config: &DkimKeyConfig,
) -> DkimSigner<K, Done> {
    DkimSigner::from_key(key)
        .domain(domain.to_string())
        .selector(config.selector.clone())
        .headers(config.signed_headers())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
        .expiration(config.expire.map(|d| d.as_secs()).unwrap_or(0))
}

/// The ARC sealer of an RSA key (`None` for Ed25519). ARC-Message-Signature covers the same
/// fields as the DKIM signature, and the DKIM signatures themselves.
fn sealer(
    der: &PrivateKeyDer<'_>,
    algorithm: Algorithm,
    domain: &str,
    config: &DkimKeyConfig,
) -> Result<Option<PreparedSealer>, String> {
    if algorithm != Algorithm::Rsa {
        return Ok(None);
    }
    let mut headers = config.signed_headers();
    headers.push("DKIM-Signature".to_string());
    let key = RsaKey::<Sha256>::from_key_der(der.clone_key())
        .map_err(|error| format!("not usable for ARC: {error}"))?;
    Ok(Some(PreparedSealer(Box::new(
        ArcSealer::from_key(key)
            .domain(domain.to_string())
            .selector(config.selector.clone())
            .headers(headers),
    ))))
}

fn rsa(
    der: &PrivateKeyDer<'_>,
    domain: &str,
    config: &DkimKeyConfig,
) -> Result<(Algorithm, Vec<u8>, Prepared), String> {
    let key = RsaKey::<Sha256>::from_key_der(der.clone_key())
        .map_err(|error| format!("not a usable RSA (2048 bits or more) or Ed25519 key: {error}"))?;
    // ring gives the bare RSAPublicKey; the record carries it in a SubjectPublicKeyInfo, as
    // opendkim-genkey and `openssl rsa -pubout` publish it.
    let public = rsa_subject_public_key_info(&key.public_key());
    let signer = prepare(key, domain, config);
    Ok((Algorithm::Rsa, public, Prepared::Rsa(Box::new(signer))))
}

/// DER length octets.
fn der_length(length: usize, out: &mut Vec<u8>) {
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes: Vec<u8> = length
            .to_be_bytes()
            .into_iter()
            .skip_while(|&byte| byte == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (RFC 5280 4.1, rsaEncryption).
pub fn rsa_subject_public_key_info(rsa_public_key: &[u8]) -> Vec<u8> {
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x03];
    der_length(rsa_public_key.len() + 1, &mut bit_string);
    bit_string.push(0);
    bit_string.extend_from_slice(rsa_public_key);
    let mut spki = vec![0x30];
    der_length(ALGORITHM.len() + bit_string.len(), &mut spki);
    spki.extend_from_slice(ALGORITHM);
    spki.extend(bit_string);
    spki
}

/// A DER document as PEM text.
pub fn pem(label: &str, der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}
