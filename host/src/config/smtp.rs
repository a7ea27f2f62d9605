//! `[[listener]]`, `[smtp]`, `[tls]`, `[relay]` and `[authentication]`: the SMTP server's
//! listeners, limits, certificates, who may relay, and the checks of inbound mail.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ClientPrefixes, ListenerRole};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// Socket address, for example "0.0.0.0:25".
    pub address: toml::Spanned<String>,
    /// `inbound` (mail from the internet: MX role) or `submission` (mail from your users).
    pub role: ListenerRole,
    /// How long to wait before the greeting; a client that talks first is refused.
    #[serde(with = "humantime_serde")]
    pub greeting_delay: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "inbound".to_string(),
            address: toml::Spanned::new(0..0, "127.0.0.1:2525".to_string()),
            role: ListenerRole::Inbound,
            greeting_delay: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpLimits {
    /// Largest message accepted, in bytes (advertised with SIZE).
    pub max_message_size: u64,
    /// Recipients per message; more get 452 4.5.3.
    pub max_recipients: usize,
    /// Concurrent sessions over all listeners; more get 421 4.3.2.
    pub max_sessions: usize,
    /// Concurrent sessions from one client network (see `client_prefix_v4`/`_v6`); more get
    /// 421 4.7.0.
    pub max_sessions_per_ip: usize,
    /// The prefix length an IPv4 client is counted by, wherever a limit keys by client address
    /// (`max_sessions_per_ip`, the AUTH failure budget): 32, each address, by default.
    pub client_prefix_v4: u8,
    /// The same for IPv6 clients: 64 by default, since one host usually holds a whole /64.
    pub client_prefix_v6: u8,
    /// Longest command line, in bytes including CRLF.
    pub max_command_line: usize,
    /// Longest line of message content, in bytes excluding CRLF (RFC 5321: 998).
    pub max_data_line: usize,
    /// How long to wait for the next command before closing with 421 4.4.2.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long the whole DATA or BDAT transfer may take.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Protocol errors tolerated before the session is closed.
    pub max_errors: u32,
    /// More Received headers than this is a mail loop: 554 5.4.6.
    pub max_received_headers: usize,
    /// Resident memory above which new sessions get 421 4.3.2 (sessions under way go on):
    /// `75%` of what the process may use (its cgroup's limit, else the machine's), or bytes
    /// (`2GiB`, `512MiB`, `1048576`).
    pub memory_limit: String,
}

impl SmtpLimits {
    /// `memory_limit` in bytes, a percentage taken of `available` (`Ok(None)`: a percentage,
    /// and what the process may use is not known).
    pub fn memory_limit_bytes(&self, available: Option<u64>) -> Result<Option<u64>, String> {
        let text = self.memory_limit.trim();
        let invalid = || {
            format!(
                "smtp.memory_limit `{text}`: a percentage from 1 to 100 (`75%`) or a size (`2GiB`, `512MiB`, `1048576`)"
            )
        };
        if let Some(percent) = text.strip_suffix('%') {
            let percent: u64 = percent.trim().parse().map_err(|_| invalid())?;
            if !(1..=100).contains(&percent) {
                return Err(invalid());
            }
            return Ok(available.map(|available| available / 100 * percent));
        }
        let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
            Some(at) => text.split_at(at),
            None => (text, ""),
        };
        let scale: u64 = match unit.trim() {
            "" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(invalid()),
        };
        let number: u64 = number.parse().map_err(|_| invalid())?;
        match number.checked_mul(scale) {
            Some(0) | None => Err(invalid()),
            Some(bytes) => Ok(Some(bytes)),
        }
    }

    /// The prefix lengths clients are counted by.
    pub fn client_prefixes(&self) -> ClientPrefixes {
        ClientPrefixes {
            v4: self.client_prefix_v4,
            v6: self.client_prefix_v6,
        }
    }
}

impl Default for SmtpLimits {
    fn default() -> Self {
        SmtpLimits {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_sessions: 1000,
            max_sessions_per_ip: 50,
            client_prefix_v4: 32,
            client_prefix_v6: 64,
            max_command_line: 2048,
            max_data_line: 998,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_errors: 20,
            max_received_headers: 50,
            memory_limit: "75%".to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file with the certificate chain.
    pub certificate: PathBuf,
    /// PEM file with the private key.
    pub private_key: PathBuf,
    /// More certificates, each served to clients that ask (by SNI) for a DNS name it carries
    /// (one per hosted domain, say); the one above serves every other client.
    #[serde(default)]
    pub sni: Vec<CertificateFiles>,
}

/// A certificate chain and its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM file with the certificate chain.
    pub certificate: PathBuf,
    /// PEM file with the private key.
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Domains this server is a final or backup destination for: anyone may send mail to them.
    pub domains: Vec<String>,
    /// Client networks allowed to relay to any domain.
    pub networks: Vec<ipnet::IpNet>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            domains: Vec::new(),
            networks: vec![
                "127.0.0.0/8".parse().expect("literal network"),
                "::1/128".parse().expect("literal network"),
            ],
        }
    }
}

/// Sender authentication of inbound mail.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthenticationConfig {
    /// Check SPF, DKIM and DMARC on mail that inbound listeners receive from clients outside
    /// `relay.networks`, add an Authentication-Results header and give the results to the data
    /// hook.
    pub verify: bool,
}

impl Default for AuthenticationConfig {
    fn default() -> Self {
        AuthenticationConfig { verify: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_limit_is_a_share_of_what_may_be_used_or_a_size() {
        let limit = |text: &str, available: Option<u64>| {
            SmtpLimits {
                memory_limit: text.to_string(),
                ..SmtpLimits::default()
            }
            .memory_limit_bytes(available)
        };
        assert_eq!(limit("75%", Some(1000)), Ok(Some(750)));
        assert_eq!(limit("75%", None), Ok(None));
        assert_eq!(limit("512MiB", None), Ok(Some(512 << 20)));
        assert_eq!(limit("2GiB", None), Ok(Some(2 << 30)));
        assert_eq!(limit("1048576", None), Ok(Some(1 << 20)));
        for bad in ["150%", "0%", "0", "12 MB", "lots", ""] {
            assert!(limit(bad, Some(1000)).is_err(), "{bad}");
        }
    }
}
