//! DKIM signing of outbound mail (RFC 6376, RFC 8463 for Ed25519) with mail-auth.
//!
//! Keys come from `[[dkim]]` entries: the main file's sign mail of no tenant, a tenant file's
//! sign that tenant's mail and nobody else's. A message is signed by every active key of the
//! most specific configured domain that its From: address is in or below (one RSA and one
//! Ed25519 key make the dual signature RFC 8463 advises). Keys are swapped in whole on reload,
//! so a message is signed by one generation's keys or the next's, never a mix.

pub mod keygen;
pub mod keys;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{ArcConfig, DkimKeyConfig};
pub use keys::{Algorithm, KeyError, SigningKey};

/// The keys of one owner (the global configuration or one tenant).
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Arc<SigningKey>>,
    /// The key that ARC-seals checked inbound mail, when `[arc]` names one.
    sealer: Option<Arc<SigningKey>>,
    /// `[arc] seal`: every checked message, not only those routed through `arc_seal` routes.
    seal_all: bool,
}

impl KeySet {
    /// Loads every key file; the first that does not load is the error.
    pub fn load(configs: &[DkimKeyConfig]) -> Result<KeySet, KeyError> {
        let keys = configs
            .iter()
            .map(|config| SigningKey::load(config).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(KeySet {
            keys,
            sealer: None,
            seal_all: false,
        })
    }

    /// Seals with the key `arc` names (the configuration checked that it exists), for all
    /// checked mail (`seal`) or for routes with `arc_seal`; an error when that key cannot seal
    /// (Ed25519: ARC knows RSA only).
    pub fn with_sealer(mut self, arc: &ArcConfig) -> Result<KeySet, KeyError> {
        if !arc.seal && !arc.names_key() {
            return Ok(self);
        }
        let domain = crate::mail::address::domain_key(&arc.domain);
        let key = self
            .keys
            .iter()
            .find(|key| key.domain == domain && key.selector.eq_ignore_ascii_case(&arc.selector))
            .cloned();
        match key {
            Some(key) if key.seals() => {
                self.sealer = Some(key);
                self.seal_all = arc.seal;
                Ok(self)
            }
            Some(key) => Err(KeyError::File {
                path: key.record_name(),
                message: "ARC seals with RSA keys only (RFC 8617 defines rsa-sha256 alone)"
                    .to_string(),
            }),
            None => Ok(self),
        }
    }

    /// Every key, active or retired, for `switchyard dkim records`.
    pub fn keys(&self) -> &[Arc<SigningKey>] {
        &self.keys
    }

    /// The active keys that sign mail from `domain`: those of the longest configured domain
    /// that is `domain` or one of its parents.
    fn for_domain(&self, domain: &str) -> Vec<&SigningKey> {
        let covers = |key: &SigningKey| {
            domain == key.domain
                || domain
                    .strip_suffix(key.domain.as_str())
                    .is_some_and(|prefix| prefix.ends_with('.'))
        };
        let best = self
            .keys
            .iter()
            .filter(|key| key.active && covers(key))
            .map(|key| key.domain.len())
            .max();
        self.keys
            .iter()
            .filter(|key| key.active && covers(key) && Some(key.domain.len()) == best)
            .map(|key| key.as_ref())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("DKIM signing with {selector}._domainkey.{domain} failed: {message}")]
pub struct SignError {
    pub domain: String,
    pub selector: String,
    pub message: String,
}

/// What signing added to a message.
pub struct Signed {
    /// The `DKIM-Signature:` fields, to go before the message's first line.
    pub headers: String,
    /// `selector._domainkey.domain` of each signature, for the log.
    pub keys: Vec<String>,
}

/// Every owner's keys, swapped on reload.
#[derive(Default)]
pub struct Signer {
    global: ArcSwap<KeySet>,
    tenants: ArcSwap<HashMap<String, Arc<KeySet>>>,
}

impl Signer {
    pub fn new(global: KeySet) -> Signer {
        Signer {
            global: ArcSwap::from_pointee(global),
            tenants: ArcSwap::default(),
        }
    }

    pub fn set_global(&self, keys: KeySet) {
        self.global.store(Arc::new(keys));
    }

    /// Replaces a tenant's keys (`None`: the tenant is gone).
    pub fn set_tenant(&self, tenant: &str, keys: Option<KeySet>) {
        let keys = keys.map(Arc::new);
        self.tenants.rcu(|current| {
            let mut next = HashMap::clone(current);
            match &keys {
                Some(keys) => next.insert(tenant.to_string(), keys.clone()),
                None => next.remove(tenant),
            };
            next
        });
    }

    /// The key that ARC-seals the checked inbound mail of `tenant` (`""`: no tenant), if any,
    /// and whether it seals all of it (`[arc] seal`) or only mail on `arc_seal` routes.
    pub fn sealer(&self, tenant: &str) -> Option<(Arc<SigningKey>, bool)> {
        let keys = if tenant.is_empty() {
            self.global.load_full()
        } else {
            self.tenants.load().get(tenant)?.clone()
        };
        Some((keys.sealer.clone()?, keys.seal_all))
    }

    /// Whether any owner has a key: without one, messages are not even parsed for a From.
    pub fn is_empty(&self) -> bool {
        self.global.load().keys.is_empty() && self.tenants.load().is_empty()
    }

    /// Signs `message` for its owner (`""`: no tenant). `Ok(None)` when no key covers its
    /// From: domain.
    pub fn sign(&self, tenant: &str, message: &[u8]) -> Result<Option<Signed>, SignError> {
        if self.is_empty() {
            return Ok(None);
        }
        let keys = if tenant.is_empty() {
            self.global.load_full()
        } else {
            match self.tenants.load().get(tenant) {
                Some(keys) => keys.clone(),
                None => return Ok(None),
            }
        };
        let Some(domain) = from_domain(message) else {
            return Ok(None);
        };
        let signing = keys.for_domain(&domain);
        if signing.is_empty() {
            return Ok(None);
        }
        let mut signed = Signed {
            headers: String::new(),
            keys: Vec::new(),
        };
        for key in signing {
            let header = key.sign(message).map_err(|error| SignError {
                domain: key.domain.clone(),
                selector: key.selector.clone(),
                message: error.to_string(),
            })?;
            signed.headers.push_str(&header);
            signed.keys.push(key.record_name());
        }
        Ok(Some(signed))
    }
}

/// The domain of the (first) From: address, lower case.
fn from_domain(message: &[u8]) -> Option<String> {
    crate::mail::header::from_domains(message)
        .into_iter()
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_config(
        dir: &std::path::Path,
        domain: &str,
        selector: &str,
        ed25519: bool,
    ) -> DkimKeyConfig {
        let generated = if ed25519 {
            keygen::generate(Algorithm::Ed25519, 0)
        } else {
            keygen::generate(Algorithm::Rsa, 2048)
        }
        .expect("key");
        let path = dir.join(format!("{domain}.{selector}.key"));
        std::fs::write(&path, &generated.private_pem).expect("write");
        DkimKeyConfig {
            domain: domain.to_string(),
            selector: selector.to_string(),
            private_key: path,
            active: true,
            headers: None,
            oversign: None,
            expire: None,
        }
    }

    const MESSAGE: &[u8] = b"From: Alice <alice@mail.example.com>\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello.\r\n";

    #[test]
    fn the_most_specific_domain_signs_with_every_active_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut retired = key_config(dir.path(), "example.com", "old", true);
        retired.active = false;
        let keys = KeySet::load(&[
            key_config(dir.path(), "example.com", "rsa", false),
            key_config(dir.path(), "example.com", "ed", true),
            retired,
            key_config(dir.path(), "other.test", "s1", true),
        ])
        .expect("keys");
        let signer = Signer::new(keys);
        let signed = signer.sign("", MESSAGE).expect("sign").expect("signed");
        assert_eq!(
            signed.keys,
            ["rsa._domainkey.example.com", "ed._domainkey.example.com"]
        );
        assert!(signed.headers.contains("a=rsa-sha256"));
        assert!(signed.headers.contains("a=ed25519-sha256"));
        // From, Subject, To and Date signed once more than they occur.
        let h = signed
            .headers
            .split("h=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap_or_default()
            .replace([' ', '\t', '\r', '\n'], "");
        assert_eq!(h.matches("From").count(), 2, "{h}");
        // A tenant without keys signs nothing, and nor does mail from elsewhere.
        assert!(signer.sign("acme", MESSAGE).expect("sign").is_none());
        let stranger = b"From: x@elsewhere.test\r\n\r\nHi\r\n";
        assert!(signer.sign("", stranger).expect("sign").is_none());
    }

    #[test]
    fn tenants_sign_with_their_own_keys_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = Signer::new(
            KeySet::load(&[key_config(dir.path(), "example.com", "global", true)]).expect("keys"),
        );
        signer.set_tenant(
            "acme",
            Some(
                KeySet::load(&[key_config(dir.path(), "mail.example.com", "acme", true)])
                    .expect("keys"),
            ),
        );
        let signed = signer.sign("acme", MESSAGE).expect("sign").expect("signed");
        assert_eq!(signed.keys, ["acme._domainkey.mail.example.com"]);
        signer.set_tenant("acme", None);
        assert!(signer.sign("acme", MESSAGE).expect("sign").is_none());
    }
}
