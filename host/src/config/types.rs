//! Small configuration value types that validate themselves while being deserialised.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The prefix lengths clients are counted by wherever a limit keys by client address
/// (`[smtp] client_prefix_v4` / `client_prefix_v6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPrefixes {
    pub v4: u8,
    pub v6: u8,
}

impl Default for ClientPrefixes {
    fn default() -> Self {
        ClientPrefixes { v4: 32, v6: 64 }
    }
}

/// A host name or IP address with an optional port: "mail.example.com", "10.0.0.5:2525",
/// "[2001:db8::1]:25".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: Option<u16>,
}

impl HostPort {
    pub fn port_or(&self, default: u16) -> u16 {
        self.port.unwrap_or(default)
    }
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty host".to_string());
        }
        if let Ok(address) = text.parse::<std::net::SocketAddr>() {
            return Ok(HostPort {
                host: address.ip().to_string(),
                port: Some(address.port()),
            });
        }
        if let Ok(ip) = text.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            return Ok(HostPort {
                host: ip.to_string(),
                port: None,
            });
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("invalid port `{port}` in `{text}`"))?;
                (host, Some(port))
            }
            None => (text, None),
        };
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if host.len() > 253 || !host.trim_end_matches('.').split('.').all(valid_label) {
            return Err(format!("invalid host name `{host}`"));
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(port) => write!(f, "{host}:{port}"),
            None => write!(f, "{host}"),
        }
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerRole {
    /// Mail from other servers: accepted for `relay.domains`, relayed only for `relay.networks`.
    Inbound,
    /// Mail from the organisation's own users and applications (port 587, STARTTLS).
    Submission,
    /// As `submission`, with TLS from the first byte (port 465, RFC 8314 implicit TLS).
    Submissions,
}

impl ListenerRole {
    /// Mail from users: AUTH offered, and required unless the client is in `relay.networks`.
    pub fn is_submission(self) -> bool {
        matches!(self, ListenerRole::Submission | ListenerRole::Submissions)
    }

    /// The TLS handshake comes before the greeting.
    pub fn implicit_tls(self) -> bool {
        self == ListenerRole::Submissions
    }
}

/// How hard to insist on STARTTLS when delivering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsPolicy {
    /// Never use TLS.
    None,
    /// Use STARTTLS when offered, taking any certificate; fall back to plain text if the
    /// handshake fails (Postfix's `may`). The log line still says whether the certificate
    /// would have verified.
    Opportunistic,
    /// Refuse to deliver without STARTTLS and a certificate that chains to a trusted root
    /// (`delivery.ca_file` or the system's store) and names the host connected to (Postfix's
    /// `secure` with `smtp_tls_secure_cert_match = nexthop, dot-nexthop`, matching the MX name).
    Require,
}

/// A list of durations written the humantime way: `["5m", "1h 10m"]`.
pub mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(list: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            list.iter()
                .map(|d| humantime::format_duration(*d).to_string()),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| {
                humantime::parse_duration(text)
                    .map_err(|e| serde::de::Error::custom(format!("`{text}`: {e}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        let plain: HostPort = "mx.example.com".parse().expect("host");
        assert_eq!((plain.host.as_str(), plain.port), ("mx.example.com", None));
        let with_port: HostPort = "mx.example.com:2525".parse().expect("host:port");
        assert_eq!(with_port.port, Some(2525));
        let v6: HostPort = "[::1]:25".parse().expect("v6");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", Some(25)));
        assert_eq!(v6.to_string(), "[::1]:25");
        assert!("mx..example".parse::<HostPort>().is_err());
        assert!("mx.example:99999".parse::<HostPort>().is_err());
    }
}

/// Where a service listens (a scanner, an LMTP server): `host:port`, or the path of a Unix
/// socket (any value starting with `/`: `/run/clamav/clamd.ctl`, `/run/dovecot/lmtp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl TryFrom<String> for Endpoint {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        if text.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(text)));
        }
        let parsed: HostPort = text.parse()?;
        if parsed.port.is_none() {
            return Err(format!(
                "address `{text}`: give host:port, or the path of a Unix socket"
            ));
        }
        Ok(Endpoint::Tcp(text))
    }
}

impl From<Endpoint> for String {
    fn from(address: Endpoint) -> String {
        address.to_string()
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(address) => f.write_str(address),
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}
