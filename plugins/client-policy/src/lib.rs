//! `client-policy`: who may talk to the server at all, decided at connect, at HELO/EHLO and at
//! AUTH, in the spirit of Postfix's `smtpd_client_restrictions`, `smtpd_helo_restrictions` and
//! access maps for SASL logins.
//!
//! ```toml
//! [[plugin]]
//! name = "client-policy"
//! path = "target/wasm32-wasip2/plugin/client_policy.wasm"
//! [plugin.config]
//! blocked_networks = ["192.0.2.0/24", "2001:db8::/32"]
//! connect_reply = "554 5.7.1 Your network is not welcome here"
//! require_fqdn_helo = true
//! blocked_helo = ["localhost.localdomain"]
//! helo_reply = "550 5.7.1 Say HELO with your own fully-qualified name"
//! suspended_identities = ["former-employee@example.com"]
//! auth_reply = "535 5.7.8 Account suspended"
//! submission_networks = ["10.0.0.0/8"]
//! ```
//!
//! A client in `blocked_networks` gets `connect_reply` instead of the greeting and is
//! disconnected. A HELO/EHLO name that is listed in `blocked_helo` (case-insensitive), or that is
//! not fully qualified while `require_fqdn_helo` is set (a bare word such as `localhost`, or an
//! address literal such as `[192.0.2.1]`), gets `helo_reply`; the client may say HELO again.
//!
//! At AUTH (after the host has checked the password): an identity listed in
//! `suspended_identities` (case-insensitive) gets `auth_reply`, and so does any identity
//! logging in from outside `submission_networks` when that list is not empty.

use ipnet::IpNet;
use serde::Deserialize;
use switchyard_plugin_sdk::*;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub blocked_networks: Vec<String>,
    pub connect_reply: Option<String>,
    pub require_fqdn_helo: bool,
    pub blocked_helo: Vec<String>,
    pub helo_reply: Option<String>,
    pub suspended_identities: Vec<String>,
    pub auth_reply: Option<String>,
    pub submission_networks: Vec<String>,
}

pub struct ClientPolicy {
    blocked_networks: Vec<IpNet>,
    connect_reply: Reply,
    require_fqdn_helo: bool,
    blocked_helo: Vec<String>,
    helo_reply: Reply,
    suspended_identities: Vec<String>,
    auth_reply: Reply,
    submission_networks: Vec<IpNet>,
}

fn networks(key: &str, list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|network| {
            network
                .parse::<IpNet>()
                .or_else(|_| network.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{key}: `{network}` is not an address or network"))
        })
        .collect()
}

fn client_in(session: &Session, list: &[IpNet]) -> bool {
    session
        .client_ip()
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| list.iter().any(|net| net.contains(&ip)))
}

/// True for a name with at least two labels of letters, digits and hyphens.
pub fn is_fqdn(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
        })
        // The last label of a real domain is never all digits (that is an IPv4 address).
        && labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|byte| byte.is_ascii_digit()))
}

impl Plugin for ClientPolicy {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::Connect, Hook::Helo, Hook::Auth];

    fn new(config: Config) -> Result<Self, String> {
        Ok(ClientPolicy {
            blocked_networks: networks("blocked_networks", &config.blocked_networks)?,
            connect_reply: Reply::parse(
                config
                    .connect_reply
                    .as_deref()
                    .unwrap_or("554 5.7.1 Access denied"),
                400..600,
            )?,
            require_fqdn_helo: config.require_fqdn_helo,
            blocked_helo: config
                .blocked_helo
                .iter()
                .map(|name| name.to_ascii_lowercase())
                .collect(),
            helo_reply: Reply::parse(
                config
                    .helo_reply
                    .as_deref()
                    .unwrap_or("550 5.7.1 Helo command rejected: need fully-qualified hostname"),
                400..600,
            )?,
            suspended_identities: config
                .suspended_identities
                .iter()
                .map(|identity| identity.to_lowercase())
                .collect(),
            auth_reply: Reply::parse(
                config
                    .auth_reply
                    .as_deref()
                    .unwrap_or("535 5.7.8 Authentication credentials invalid"),
                400..600,
            )?,
            submission_networks: networks("submission_networks", &config.submission_networks)?,
        })
    }

    fn connect(&self, session: &Session) -> Verdict {
        if client_in(session, &self.blocked_networks) {
            Verdict::refuse(&self.connect_reply)
        } else {
            Verdict::Continue
        }
    }

    fn helo(&self, _session: &Session, name: &str) -> Verdict {
        let listed = self.blocked_helo.contains(&name.to_ascii_lowercase());
        if listed || (self.require_fqdn_helo && !is_fqdn(name)) {
            Verdict::refuse(&self.helo_reply)
        } else {
            Verdict::Continue
        }
    }

    fn auth(&self, session: &Session, _mechanism: &str, identity: &str) -> Verdict {
        let suspended = self.suspended_identities.contains(&identity.to_lowercase());
        let outside =
            !self.submission_networks.is_empty() && !client_in(session, &self.submission_networks);
        if suspended || outside {
            Verdict::refuse(&self.auth_reply)
        } else {
            Verdict::Continue
        }
    }
}

export_plugin!(ClientPolicy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fully_qualified_names() {
        for good in ["mail.example.com", "a.b", "mx-1.example.co.uk."] {
            assert!(is_fqdn(good), "{good}");
        }
        for bad in [
            "localhost",
            "[192.0.2.1]",
            "192.0.2.1",
            "-bad.example",
            "a..b",
            "",
        ] {
            assert!(!is_fqdn(bad), "{bad}");
        }
    }

    #[test]
    fn configuration_is_checked() {
        let config: Config =
            serde_json::from_str(r#"{"blocked_networks":["not a network"]}"#).expect("json");
        assert!(ClientPolicy::new(config).is_err());
        let config: Config = serde_json::from_str(r#"{"connect_reply":"250 ok"}"#).expect("json");
        assert!(ClientPolicy::new(config).is_err());
        let config: Config =
            serde_json::from_str(r#"{"blocked_networks":["192.0.2.7","10.0.0.0/8"]}"#)
                .expect("json");
        assert!(ClientPolicy::new(config).is_ok());
    }
}
