//! The next hop of a recipient domain: a configured route, the global smarthost, or its MX records.

use crate::config::{Config, Endpoint, HostPort, RouteConfig, TlsPolicy};
use crate::mail::address::domain_key;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHop {
    /// Look up the domain's MX records (or its address records if it has none).
    Mx { domain: String },
    /// Send to this host, whatever the domain.
    Relay { host: HostPort, tls: TlsPolicy },
    /// Write into this local Maildir under `[mailboxes] root` (a route hook's `mailbox(name)`),
    /// or hand it to `[mailboxes] lmtp`.
    Mailbox { name: String },
    /// Hand to this LMTP server (a `[[route]]`'s `lmtp`).
    Lmtp { endpoint: Endpoint, tls: TlsPolicy },
}

impl NextHop {
    /// Messages with the same key share connections and the per-destination limits.
    pub fn key(&self) -> String {
        match self {
            NextHop::Mx { domain } => domain.clone(),
            NextHop::Relay { host, .. } => format!("[{host}]"),
            NextHop::Mailbox { name } => format!("mailbox:{name}"),
            NextHop::Lmtp { endpoint, .. } => format!("lmtp:{endpoint}"),
        }
    }
}

/// The most specific `[[route]]` for a recipient domain, if one matches.
pub fn route_for<'a>(config: &'a Config, domain: &str) -> Option<&'a RouteConfig> {
    let domain = domain_key(domain);
    config
        .routes
        .iter()
        .filter(|route| {
            let pattern = domain_key(&route.domain);
            match pattern.strip_prefix("*.") {
                Some(parent) => domain == parent || domain.ends_with(&format!(".{parent}")),
                None => domain == pattern,
            }
        })
        .max_by_key(|route| (!route.domain.starts_with("*."), route.domain.len()))
}

/// Chooses the next hop for a recipient domain: the most specific `[[route]]`, then
/// `delivery.smarthost`, then MX.
pub fn next_hop(config: &Config, domain: &str) -> NextHop {
    let domain = domain_key(domain);
    if let Some(route) = route_for(config, &domain) {
        let tls = route.tls.unwrap_or(config.delivery.tls);
        return match (&route.smarthost, &route.lmtp) {
            (_, Some(endpoint)) => NextHop::Lmtp {
                endpoint: endpoint.clone(),
                tls,
            },
            (Some(host), None) => NextHop::Relay {
                host: host.clone(),
                tls,
            },
            // Validation requires one of the two; a route without either is no route.
            (None, None) => NextHop::Mx { domain },
        };
    }
    if let Some(smarthost) = &config.delivery.smarthost {
        return NextHop::Relay {
            host: smarthost.clone(),
            tls: config.delivery.tls,
        };
    }
    NextHop::Mx { domain }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_then_smarthost_then_mx() {
        let config = Config::parse(
            "[[route]]\ndomain = \"*.corp.test\"\nsmarthost = \"10.0.0.1:25\"\n\n[[route]]\ndomain = \"eu.corp.test\"\nsmarthost = \"10.0.0.2\"\ntls = \"require\"\n",
            "t",
        )
        .expect("config");
        assert_eq!(
            next_hop(&config, "Example.COM."),
            NextHop::Mx {
                domain: "example.com".into()
            }
        );
        let NextHop::Relay { host, tls } = next_hop(&config, "eu.corp.test") else {
            panic!("route")
        };
        assert_eq!((host.host.as_str(), tls), ("10.0.0.2", TlsPolicy::Require));
        let NextHop::Relay { host, .. } = next_hop(&config, "x.corp.test") else {
            panic!("wildcard")
        };
        assert_eq!(host.host, "10.0.0.1");
    }
}
