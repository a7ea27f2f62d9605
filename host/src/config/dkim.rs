//! `[[dkim]]`: the keys that sign outbound mail, in the main file (mail of no tenant) and in
//! tenant files (the tenant's mail). One entry per selector; several per domain rotate keys.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The header fields signed by default: those RFC 6376 5.4.1 recommends that are commonly
/// present, plus the MIME and list fields whose change would alter what a reader sees.
pub const DEFAULT_SIGNED_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// Fields signed once more than they occur (over-signing, RFC 6376 8.15): a copy added in
/// transit, which a reader might see instead of the signed one, breaks the signature.
pub const DEFAULT_OVERSIGNED_HEADERS: &[&str] = &["From", "Subject", "To", "Date"];

/// One signing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    /// The signing domain (`d=`). Mail whose From: address is in this domain or below it is
    /// signed (relaxed DMARC alignment).
    pub domain: String,
    /// The selector (`s=`): the key's record is at `SELECTOR._domainkey.DOMAIN`.
    pub selector: String,
    /// PEM private key: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8), as `switchyard dkim
    /// keygen` writes. In a file, relative to the file.
    pub private_key: PathBuf,
    /// `false` retires the key: it signs nothing, and `switchyard dkim records` still lists its
    /// record, which stays published until mail it signed has been read.
    #[serde(default = "active_by_default")]
    pub active: bool,
    /// The header fields to sign; by default [`DEFAULT_SIGNED_HEADERS`].
    #[serde(default)]
    pub headers: Option<Vec<String>>,
    /// The fields signed once more than they occur; by default [`DEFAULT_OVERSIGNED_HEADERS`].
    #[serde(default)]
    pub oversign: Option<Vec<String>>,
    /// How long a signature is valid (`x=`); none by default.
    #[serde(default, with = "humantime_serde")]
    pub expire: Option<Duration>,
}

fn active_by_default() -> bool {
    true
}

impl DkimKeyConfig {
    /// The `h=` list as given to the signer: every signed field, then the over-signed ones
    /// again (the signer lists a field that no longer occurs as an empty one).
    pub fn signed_headers(&self) -> Vec<String> {
        let listed = |given: &Option<Vec<String>>, default: &[&str]| -> Vec<String> {
            given
                .clone()
                .unwrap_or_else(|| default.iter().map(|name| name.to_string()).collect())
        };
        let mut headers = listed(&self.headers, DEFAULT_SIGNED_HEADERS);
        headers.extend(listed(&self.oversign, DEFAULT_OVERSIGNED_HEADERS));
        headers
    }

    /// Problems a key entry can have on its own; `None` when it is fine.
    pub fn problem(&self) -> Option<String> {
        if let Some(problem) = self.naming_problem() {
            return Some(problem);
        }
        (!self.private_key.is_file()).then(|| {
            format!(
                "dkim: {}/{}: no such private_key file `{}`",
                self.domain,
                self.selector,
                self.private_key.display()
            )
        })
    }

    /// Problems of the domain, selector and header names (not of the key file).
    pub fn naming_problem(&self) -> Option<String> {
        let domain = crate::mail::address::domain_key(&self.domain);
        if !crate::mail::address::is_domain(&domain) {
            return Some(format!("dkim: invalid domain `{}`", self.domain));
        }
        let selector_ok = !self.selector.is_empty()
            && self.selector.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !selector_ok {
            return Some(format!("dkim: invalid selector `{}`", self.selector));
        }
        let headers = self.signed_headers();
        if !headers.iter().any(|name| name.eq_ignore_ascii_case("From")) {
            return Some(format!(
                "dkim: {}/{}: the signed headers must include From (RFC 6376 5.4)",
                self.domain, self.selector
            ));
        }
        headers
            .iter()
            .find(|name| {
                name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            })
            .map(|bad| format!("dkim: invalid header field name `{bad}`"))
    }
}

/// `[arc]`: sealing (RFC 8617) of mail that arrived from the internet and was checked, so the
/// next hop can trust this hop's authentication results when it forwards the mail on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArcConfig {
    /// Seal every message this server checked (inbound from outside `relay.networks`).
    pub seal: bool,
    /// The `[[dkim]]` key that seals: its domain and selector.
    pub domain: String,
    pub selector: String,
}

impl ArcConfig {
    /// A key to seal with is named (for `seal`, or for routes with `arc_seal`).
    pub fn names_key(&self) -> bool {
        !self.domain.is_empty() && !self.selector.is_empty()
    }

    /// With `seal` on (or `needed` by a route), the key it names must be among `keys`.
    pub fn problem(&self, keys: &[DkimKeyConfig], needed: bool) -> Option<String> {
        if !self.seal && !needed && !self.names_key() {
            return None;
        }
        let domain = crate::mail::address::domain_key(&self.domain);
        let found = keys.iter().any(|key| {
            crate::mail::address::domain_key(&key.domain) == domain
                && key.selector.eq_ignore_ascii_case(&self.selector)
        });
        (!found).then(|| {
            format!(
                "arc: no [[dkim]] key {}._domainkey.{} to seal with",
                self.selector, self.domain
            )
        })
    }
}

/// Two entries for one selector of one domain are a mistake: only one record can be published.
pub fn duplicate(keys: &[DkimKeyConfig]) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    keys.iter().find_map(|key| {
        let name = format!(
            "{}._domainkey.{}",
            key.selector.to_ascii_lowercase(),
            crate::mail::address::domain_key(&key.domain)
        );
        (!seen.insert(name.clone())).then(|| format!("dkim: {name} is configured twice"))
    })
}
