//! `address-rewrite`: Postfix-style canonical (sender) and virtual (recipient) maps.
//!
//! ```toml
//! [[plugin]]
//! name = "address-rewrite"
//! path = "target/wasm32-wasip2/plugin/address_rewrite.wasm"
//! [plugin.config]
//! senders = { "root@host.example" = "ops@example.com", "@old.example" = "@example.com" }
//! recipients = { "info@example.com" = "team@example.net", "@alias.example" = "@example.net" }
//! ```
//!
//! A full address matches first (case-insensitive); then `@domain`, which keeps the local part
//! and replaces the domain (`@domain` → `user@domain` maps everything to one address). The null
//! sender is never rewritten.

use std::collections::HashMap;

use serde::Deserialize;
use switchyard_plugin_sdk::*;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub senders: HashMap<String, String>,
    #[serde(default)]
    pub recipients: HashMap<String, String>,
}

/// One map, keys lower-cased.
pub struct Map(HashMap<String, String>);

impl Map {
    fn new(entries: HashMap<String, String>) -> Result<Map, String> {
        for (key, value) in &entries {
            if !key.contains('@') || !value.contains('@') {
                return Err(format!("`{key}` = `{value}`: both sides need an @"));
            }
        }
        Ok(Map(entries
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect()))
    }

    /// The rewritten address, if the map has one.
    pub fn rewrite(&self, address: &str) -> Option<String> {
        if address.is_empty() {
            return None;
        }
        if let Some(target) = self.0.get(&address.to_lowercase()) {
            return Some(target.clone());
        }
        let (local, domain) = address.rsplit_once('@')?;
        let target = self.0.get(&format!("@{}", domain.to_lowercase()))?;
        Some(match target.strip_prefix('@') {
            Some(new_domain) => format!("{local}@{new_domain}"),
            None => target.clone(),
        })
    }
}

pub struct AddressRewrite {
    senders: Map,
    recipients: Map,
}

impl Plugin for AddressRewrite {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::MailFrom, Hook::RcptTo];

    fn new(config: Config) -> Result<Self, String> {
        Ok(AddressRewrite {
            senders: Map::new(config.senders)?,
            recipients: Map::new(config.recipients)?,
        })
    }

    fn mail_from(&self, _: &Session, sender: &str, _: &[Param]) -> AddressDecision {
        self.senders
            .rewrite(sender)
            .map(AddressDecision::rewrite)
            .unwrap_or_else(AddressDecision::next)
    }

    fn rcpt_to(&self, _: &Session, _: &Envelope, recipient: &str, _: &[Param]) -> AddressDecision {
        self.recipients
            .rewrite(recipient)
            .map(AddressDecision::rewrite)
            .unwrap_or_else(AddressDecision::next)
    }
}

export_plugin!(AddressRewrite);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_before_domain() {
        let map = Map::new(HashMap::from([
            (
                "info@alias.example".to_string(),
                "desk@example.net".to_string(),
            ),
            ("@alias.example".to_string(), "@example.net".to_string()),
            (
                "@catchall.example".to_string(),
                "all@example.net".to_string(),
            ),
        ]))
        .expect("map");
        assert_eq!(
            map.rewrite("Info@Alias.example").as_deref(),
            Some("desk@example.net")
        );
        assert_eq!(
            map.rewrite("bob@alias.example").as_deref(),
            Some("bob@example.net")
        );
        assert_eq!(
            map.rewrite("x@catchall.example").as_deref(),
            Some("all@example.net")
        );
        assert_eq!(map.rewrite("x@other.example"), None);
        assert_eq!(map.rewrite(""), None);
    }
}
