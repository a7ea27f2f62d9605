//! `switchyard dkim keygen`: a new key pair, its private half as a PEM file and its public half
//! as the TXT record to publish.

use super::keys::{pem, rsa_subject_public_key_info};
use super::Algorithm;

/// A generated key pair.
pub struct Generated {
    /// The private key as PEM: PKCS#1 for RSA (as `openssl genrsa -traditional` and
    /// opendkim-genkey write it), PKCS#8 v1 for Ed25519 (as `openssl genpkey` writes it).
    pub private_pem: String,
    /// The record's `p=` value (base64).
    pub public_key: String,
}

/// Generates a key: RSA of `bits` bits, or Ed25519.
pub fn generate(algorithm: Algorithm, bits: usize) -> Result<Generated, mail_auth::Error> {
    use base64::Engine;
    let (private_pem, public) = match algorithm {
        Algorithm::Rsa => {
            let pair = mail_auth::dkim::generate::DkimKeyPair::generate_rsa(bits)?;
            (
                pem("RSA PRIVATE KEY", pair.private_key()),
                rsa_subject_public_key_info(pair.public_key()),
            )
        }
        Algorithm::Ed25519 => {
            let pair = mail_auth::dkim::generate::DkimKeyPair::generate_ed25519()?;
            let private = pkcs8_v1_ed25519(pair.private_key()).ok_or_else(|| {
                mail_auth::Error::Crypto(mail_auth::common::crypto::CryptoError::Library(
                    "unexpected Ed25519 PKCS#8 layout".to_string(),
                ))
            })?;
            (pem("PRIVATE KEY", &private), pair.public_key().to_vec())
        }
    };
    Ok(Generated {
        private_pem,
        public_key: base64::engine::general_purpose::STANDARD.encode(public),
    })
}

/// The DER before the 32-byte seed of an Ed25519 key in PKCS#8 v2 as ring writes it (RFC 5958:
/// version 1, then the public key after the seed) and in v1 (RFC 8410 section 7: version 0, the
/// seed alone).
const ED25519_PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// ring's PKCS#8 v2 Ed25519 key rewritten as v1: OpenSSL 3.0 and Python's cryptography refuse
/// v2, and every tool reads v1. `None` if `v2` is not laid out as ring writes it.
fn pkcs8_v1_ed25519(v2: &[u8]) -> Option<Vec<u8>> {
    let seed = v2.strip_prefix(&ED25519_PKCS8_V2_PREFIX)?.get(..32)?;
    let mut v1 = ED25519_PKCS8_V1_PREFIX.to_vec();
    v1.extend_from_slice(seed);
    Some(v1)
}

/// A TXT record's text as a zone file writes it: quoted strings of at most 255 octets each
/// (RFC 1035 3.3.14), which resolvers join back together.
pub fn zone_text(record: &str) -> String {
    record
        .as_bytes()
        .chunks(255)
        .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_records_are_split_into_strings_of_255() {
        let record = "p=".to_string() + &"A".repeat(400);
        let text = zone_text(&record);
        let strings: Vec<&str> = text.split("\" \"").collect();
        assert_eq!(strings.len(), 2);
        assert_eq!(strings[0].trim_start_matches('"').len(), 255);
    }

    #[test]
    fn ed25519_public_keys_are_the_raw_32_bytes() {
        use base64::Engine;
        let generated = generate(Algorithm::Ed25519, 0).expect("key");
        let public = base64::engine::general_purpose::STANDARD
            .decode(&generated.public_key)
            .expect("base64");
        assert_eq!(public.len(), 32);
        assert!(generated
            .private_pem
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
    }

    #[test]
    fn ed25519_private_keys_are_pkcs8_v1_and_load_back() {
        use rustls_pki_types::pem::PemObject;
        let generated = generate(Algorithm::Ed25519, 0).expect("key");
        let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(generated.private_pem.as_bytes())
            .expect("PEM");
        let rustls_pki_types::PrivateKeyDer::Pkcs8(pkcs8) = der else {
            panic!("not PKCS#8");
        };
        let bytes = pkcs8.secret_pkcs8_der();
        assert_eq!(bytes.len(), 48);
        assert_eq!(bytes[..16], ED25519_PKCS8_V1_PREFIX);
        let key = mail_auth::common::crypto::Ed25519Key::from_pkcs8_maybe_unchecked_der(bytes)
            .expect("a v1 key loads");
        use base64::Engine;
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(key.public_key()),
            generated.public_key
        );
        assert!(pkcs8_v1_ed25519(&[0u8; 83]).is_none());
    }
}
