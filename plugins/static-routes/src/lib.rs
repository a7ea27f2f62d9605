//! `static-routes`: a routing table by recipient domain.
//!
//! ```toml
//! [[plugin]]
//! name = "static-routes"
//! path = "target/wasm32-wasip2/plugin/static_routes.wasm"
//! [plugin.config]
//! routes = [
//!   { domain = "corp.example", smarthost = "10.0.0.5:25", tls = "require" },
//!   { domain = "*.legacy.example", mx = "relay.example" },
//!   { domain = "archive.example", mailbox = "archive" },
//!   { domain = "old.example", reject = "550 5.1.2 this domain is gone" },
//! ]
//! ```
//!
//! The most specific entry wins: an exact domain before `*.parent`, a longer parent before a
//! shorter one. Recipients matching no entry are left to the rest of the chain (then the host's
//! own routes and MX lookup).

use serde::Deserialize;
use switchyard_plugin_sdk::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    pub domain: String,
    pub smarthost: Option<String>,
    pub tls: Option<String>,
    pub mx: Option<String>,
    pub mailbox: Option<String>,
    pub reject: Option<String>,
    #[serde(default)]
    pub discard: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub routes: Vec<RouteEntry>,
}

pub struct StaticRoutes {
    /// (pattern, hop), most specific first.
    table: Vec<(String, NextHop)>,
}

fn hop_of(entry: &RouteEntry) -> Result<NextHop, String> {
    let chosen = [
        entry.smarthost.is_some(),
        entry.mx.is_some(),
        entry.mailbox.is_some(),
        entry.reject.is_some(),
        entry.discard,
    ]
    .iter()
    .filter(|set| **set)
    .count();
    if chosen != 1 {
        return Err(format!(
            "route for `{}`: give exactly one of smarthost, mx, mailbox, reject, discard",
            entry.domain
        ));
    }
    if let Some(smarthost) = &entry.smarthost {
        let (host, port) = match smarthost.rsplit_once(':') {
            Some((host, port)) => (
                host.to_string(),
                port.parse()
                    .map_err(|_| format!("bad port in `{smarthost}`"))?,
            ),
            None => (smarthost.clone(), 25),
        };
        let tls = match entry.tls.as_deref().unwrap_or("opportunistic") {
            "none" => TlsPolicy::None,
            "opportunistic" => TlsPolicy::Opportunistic,
            "require" => TlsPolicy::Require,
            other => return Err(format!("unknown tls policy `{other}`")),
        };
        return Ok(NextHop::smarthost(host, port, tls));
    }
    if let Some(domain) = &entry.mx {
        return Ok(NextHop::Mx(domain.clone()));
    }
    if let Some(mailbox) = &entry.mailbox {
        return Ok(NextHop::Mailbox(mailbox.clone()));
    }
    if let Some(reject) = &entry.reject {
        let reply = Reply::parse(reject, 400..600).map_err(|error| format!("reject: {error}"))?;
        return Ok(NextHop::Fail(reply));
    }
    Ok(NextHop::Discard)
}

/// How specific a pattern is: exact domains first, then longer wildcards.
fn specificity(pattern: &str) -> (bool, usize) {
    (!pattern.starts_with("*."), pattern.len())
}

pub fn matches(pattern: &str, domain: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => domain == parent || domain.ends_with(&format!(".{parent}")),
        None => domain == pattern,
    }
}

impl StaticRoutes {
    pub fn lookup(&self, recipient: &str) -> Option<&NextHop> {
        let domain = recipient
            .rsplit_once('@')
            .map(|(_, d)| d)
            .unwrap_or(recipient)
            .trim_end_matches('.')
            .to_lowercase();
        self.table
            .iter()
            .find(|(pattern, _)| matches(pattern, &domain))
            .map(|(_, hop)| hop)
    }
}

impl Plugin for StaticRoutes {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::Route];

    fn new(config: Config) -> Result<Self, String> {
        let mut table = Vec::with_capacity(config.routes.len());
        for entry in &config.routes {
            table.push((
                entry.domain.trim_end_matches('.').to_lowercase(),
                hop_of(entry)?,
            ));
        }
        table.sort_by_key(|(pattern, _)| std::cmp::Reverse(specificity(pattern)));
        Ok(StaticRoutes { table })
    }

    fn route(&self, _message: &MessageFacts, recipient: &str) -> NextHop {
        self.lookup(recipient).cloned().unwrap_or(NextHop::Continue)
    }
}

export_plugin!(StaticRoutes);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(routes: &str) -> StaticRoutes {
        let config: Config = serde_json::from_str(routes).expect("config");
        StaticRoutes::new(config).expect("valid")
    }

    #[test]
    fn most_specific_wins() {
        let routes = plugin(
            r#"{"routes":[{"domain":"*.example","mx":"wild.test"},{"domain":"a.example","smarthost":"10.0.0.1:2525","tls":"none"}]}"#,
        );
        assert!(
            matches!(routes.lookup("x@A.example"), Some(NextHop::Smarthost(s)) if s.port == 2525)
        );
        assert!(matches!(routes.lookup("x@b.example"), Some(NextHop::Mx(d)) if d == "wild.test"));
        assert!(routes.lookup("x@other.test").is_none());
    }

    #[test]
    fn entries_are_checked() {
        let config: Config =
            serde_json::from_str(r#"{"routes":[{"domain":"a","mx":"b","discard":true}]}"#)
                .expect("json");
        assert!(StaticRoutes::new(config).is_err());
        let config: Config =
            serde_json::from_str(r#"{"routes":[{"domain":"a","reject":"250 ok"}]}"#).expect("json");
        assert!(StaticRoutes::new(config).is_err());
    }
}
