//! `switchyard dkim keygen`: a new key pair, its private half as a PEM file and its public half
//! as the TXT record to publish.

use super::keys::{pem, rsa_subject_public_key_info};
use super::Algorithm;

/// A generated key pair.
pub struct Generated {
    /// The private key as PEM (PKCS#1 for RSA, PKCS#8 for Ed25519).
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
            (
                pem("PRIVATE KEY", pair.private_key()),
                pair.public_key().to_vec(),
            )
        }
    };
    Ok(Generated {
        private_pem,
        public_key: base64::engine::general_purpose::STANDARD.encode(public),
    })
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
}
