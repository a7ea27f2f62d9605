//! `[dns]`, `[delivery]`, `[mta_sts]`, `[tls_reports]`, `[[route]]` and `[mailboxes]`: how mail
//! leaves.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Endpoint, HostPort, TlsPolicy};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers ("ip" or "ip:port"); empty means the system's /etc/resolv.conf.
    pub nameservers: Vec<HostPort>,
    /// Time allowed for one query.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Which addresses of a host with both are tried first (Postfix's
    /// `smtp_address_preference`): `ipv4`, `ipv6`, or `any` (as the resolver gives them). The
    /// other family follows when every address of the first fails to connect.
    pub address_preference: AddressPreference,
}

/// The address family tried first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressPreference {
    #[default]
    Ipv4,
    Ipv6,
    Any,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            address_preference: AddressPreference::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The port of MX hosts (25 on the internet; tests use others).
    pub port: u16,
    /// The name sent in EHLO; defaults to `hostname`.
    pub helo_name: Option<String>,
    /// Send everything through this host instead of looking up MX records.
    pub smarthost: Option<HostPort>,
    /// STARTTLS towards MX hosts and the smarthost.
    pub tls: TlsPolicy,
    /// PEM file of the certificate authorities trusted when a certificate is verified; without
    /// it, the system's store (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the distribution's bundle).
    pub ca_file: Option<PathBuf>,
    /// DANE (RFC 7672) towards MX hosts with DNSSEC-validated TLSA records, as the resolvers'
    /// AD bit says: only with a validating resolver on this host.
    pub dane: bool,
    /// Passwords for relays that want SMTP AUTH: lines of `HOST[:PORT] USERNAME:PASSWORD`,
    /// used for the smarthost, routes and plugin-chosen relays of that host, sent with AUTH
    /// PLAIN over TLS only.
    pub credentials_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for each reply of the remote server.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Outbound connections open at once, over all destinations.
    pub max_connections: usize,
    /// Outbound connections open at once to one destination (domain or smarthost).
    pub max_connections_per_destination: usize,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            helo_name: None,
            smarthost: None,
            tls: TlsPolicy::Opportunistic,
            ca_file: None,
            dane: false,
            credentials_file: None,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            max_connections: 200,
            max_connections_per_destination: 20,
            max_messages_per_connection: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtaStsConfig {
    /// Look for and apply recipient domains' policies.
    pub enabled: bool,
    /// How long a domain's `_mta-sts` record is trusted before it is looked at again.
    #[serde(with = "humantime_serde")]
    pub recheck: Duration,
    /// Time allowed to fetch a policy file.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// The port of policy hosts (443 on the internet; tests use others).
    pub https_port: u16,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            recheck: Duration::from_secs(300),
            fetch_timeout: Duration::from_secs(10),
            https_port: 443,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsReportsConfig {
    /// Count deliveries' TLS outcomes to policy domains and send them reports.
    pub enabled: bool,
    /// How often reports go out (RFC 8460 asks for daily ones).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for TlsReportsConfig {
    fn default() -> Self {
        TlsReportsConfig {
            enabled: true,
            interval: Duration::from_secs(24 * 3600),
        }
    }
}

/// A next hop chosen by recipient domain instead of its MX records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The recipient domain; "*.example.com" also matches every subdomain.
    pub domain: String,
    /// Where to send its mail by SMTP (one of `smarthost` and `lmtp`).
    #[serde(default)]
    pub smarthost: Option<HostPort>,
    /// Where to hand its mail by LMTP (RFC 2033): a mailbox server's `host:port` or Unix socket
    /// path (Dovecot's `/run/dovecot/lmtp`), one reply per recipient.
    #[serde(default)]
    pub lmtp: Option<Endpoint>,
    /// STARTTLS policy towards that host (LMTP over TCP too); defaults to `delivery.tls`.
    pub tls: Option<TlsPolicy>,
    /// ARC-seal checked inbound mail with a recipient on this route (forwarded through it),
    /// with the `[arc]` key, even when `[arc] seal` is off.
    #[serde(default)]
    pub arc_seal: bool,
}

/// Local delivery into Maildir folders.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxesConfig {
    /// Where a route hook's `mailbox(name)` delivers: the Maildir `root/name/`. In a file,
    /// relative to the file. Without it (and without `lmtp`) such recipients are deferred.
    pub root: Option<PathBuf>,
    /// Hand a route hook's `mailbox(name)` recipients to this LMTP server (a mailbox server's
    /// `host:port` or Unix socket path) instead of writing Maildirs: the server files the
    /// message for the recipient's address.
    pub lmtp: Option<Endpoint>,
}
