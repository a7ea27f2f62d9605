//! `[[scanner]]`: content scanners the host asks about each message after DATA, before the data
//! hooks (rspamd over its HTTP protocol, clamd over `zINSTREAM`). Their verdicts are inputs to
//! the plugins (the `scanners` grant), never decisions of their own.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScannerKind {
    /// rspamd's normal worker: `POST /checkv2` (default port 11333).
    Rspamd,
    /// clamd: `zINSTREAM` (default port 3310, or its local socket).
    Clamav,
}

impl ScannerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScannerKind::Rspamd => "rspamd",
            ScannerKind::Clamav => "clamav",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScannerConfig {
    /// The scanner's name, as plugins, the trace and the metrics show it: letters, digits,
    /// `-` and `_`.
    pub name: String,
    pub kind: ScannerKind,
    pub address: Endpoint,
    /// How long one scan may take, connecting included; a scan that takes longer is a
    /// `timeout` result for the plugins (never "clean").
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    /// Messages larger than this are not sent; the plugins get a `too-large` result. The default
    /// is the default `[smtp] max_message_size` (25 MiB) and 1 MiB for the header fields the
    /// host adds. Keep it at or below the scanner's own limit (clamd's `StreamMaxLength`;
    /// rspamd's `max_message`, 50 MiB).
    #[serde(default = "default_max_size")]
    pub max_size: u64,
    /// The listeners (by name) whose mail is scanned; empty: every listener.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// The tenants whose mail is scanned, `""` naming mail of no tenant; absent: all mail.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(15)
}

fn default_max_size() -> u64 {
    26 * 1024 * 1024
}

impl ScannerConfig {
    /// Whether mail arriving on `listener` for `tenant` goes to this scanner.
    pub fn applies_to(&self, listener: &str, tenant: &str) -> bool {
        (self.listeners.is_empty() || self.listeners.iter().any(|name| name == listener))
            && self
                .tenants
                .as_ref()
                .is_none_or(|tenants| tenants.iter().any(|name| name == tenant))
    }

    /// What is wrong with this entry on its own, if anything.
    pub fn problem(&self) -> Option<String> {
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Some(format!(
                "scanner name `{}`: letters, digits, - and _, at most 64",
                self.name
            ));
        }
        if self.timeout.is_zero() || self.max_size == 0 {
            return Some(format!(
                "scanner `{}`: timeout and max_size must be above 0",
                self.name
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanner(text: &str) -> Result<ScannerConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn addresses_are_host_and_port_or_a_socket_path() {
        let tcp =
            scanner("name = \"r\"\nkind = \"rspamd\"\naddress = \"127.0.0.1:11333\"").expect("tcp");
        assert_eq!(tcp.address, Endpoint::Tcp("127.0.0.1:11333".into()));
        assert_eq!(tcp.timeout, Duration::from_secs(15));
        let unix = scanner("name = \"c\"\nkind = \"clamav\"\naddress = \"/run/clamav/clamd.ctl\"")
            .expect("unix");
        assert_eq!(unix.address, Endpoint::Unix("/run/clamav/clamd.ctl".into()));
        let error = scanner("name = \"c\"\nkind = \"clamav\"\naddress = \"localhost\"")
            .expect_err("no port");
        assert!(error.message().contains("give host:port"), "{error}");
        assert!(scanner("name = \"c\"\nkind = \"spamassassin\"\naddress = \"a:1\"").is_err());
    }

    #[test]
    fn listeners_and_tenants_narrow_what_is_scanned() {
        let mut config =
            scanner("name = \"r\"\nkind = \"rspamd\"\naddress = \"127.0.0.1:1\"").expect("config");
        assert!(config.applies_to("inbound", ""));
        config.listeners = vec!["mx".into()];
        config.tenants = Some(vec!["".into(), "acme".into()]);
        assert!(config.applies_to("mx", "acme") && config.applies_to("mx", ""));
        assert!(!config.applies_to("submission", "acme"));
        assert!(!config.applies_to("mx", "globex"));
    }
}
