//! `client-policy`: who may talk to the server at all, decided at connect and at HELO/EHLO, in the
//! spirit of Postfix's `smtpd_client_restrictions` and `smtpd_helo_restrictions`.
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
//! ```
//!
//! A client in `blocked_networks` gets `connect_reply` instead of the greeting and is
//! disconnected. A HELO/EHLO name that is listed in `blocked_helo` (case-insensitive), or that is
//! not fully qualified while `require_fqdn_helo` is set (a bare word such as `localhost`, or an
//! address literal such as `[192.0.2.1]`), gets `helo_reply`; the client may say HELO again.

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
}

pub struct ClientPolicy {
    blocked_networks: Vec<IpNet>,
    connect_reply: Reply,
    require_fqdn_helo: bool,
    blocked_helo: Vec<String>,
    helo_reply: Reply,
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
    const HOOKS: &'static [Hook] = &[Hook::Connect, Hook::Helo];

    fn new(config: Config) -> Result<Self, String> {
        let blocked_networks = config
            .blocked_networks
            .iter()
            .map(|network| {
                network
                    .parse::<IpNet>()
                    .or_else(|_| network.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!("blocked_networks: `{network}` is not an address or network")
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(ClientPolicy {
            blocked_networks,
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
        })
    }

    fn connect(&self, session: &Session) -> Verdict {
        let blocked = session
            .client_ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| self.blocked_networks.iter().any(|net| net.contains(&ip)));
        if blocked {
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
