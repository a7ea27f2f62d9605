//! The one resolver every part shares (delivery, SPF/DKIM/DMARC, plugins granted `dns`), through
//! hickory: a domain's mail hosts (MX records in preference order, the implicit MX of a domain
//! without them, null MX of RFC 7505), a host's addresses, TXT records.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use crate::config::DnsConfig;
use crate::mail::reply::Reply;

/// One host to try, with its addresses.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
}

pub struct Dns {
    resolver: TokioResolver,
    /// The resolvers asked directly for DNSSEC-validated answers (DANE): the configured ones,
    /// else those of /etc/resolv.conf.
    validating: Vec<SocketAddr>,
    timeout: std::time::Duration,
    /// Which family of a host's addresses is tried first.
    preference: crate::config::AddressPreference,
}

impl Dns {
    pub fn new(config: &DnsConfig) -> anyhow::Result<Dns> {
        let mut options = ResolverOpts::default();
        options.timeout = config.timeout;
        options.attempts = 2;
        // A and AAAA both: a host reachable over one family only is reached, and a host with
        // both falls back to the other family when the first fails to connect.
        options.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let mut validating = Vec::new();
        for server in &config.nameservers {
            if let Ok(ip) = server.host.parse::<IpAddr>() {
                validating.push(SocketAddr::new(ip, server.port_or(53)));
            }
        }
        if validating.is_empty() {
            validating = system_nameservers();
        }
        let builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio()?
        } else {
            let mut servers = Vec::new();
            for server in &config.nameservers {
                let ip: IpAddr = server.host.parse().map_err(|_| {
                    anyhow::anyhow!("dns.nameservers: `{server}` is not an IP address")
                })?;
                let mut name_server = NameServerConfig::udp_and_tcp(ip);
                for connection in &mut name_server.connections {
                    connection.port = server.port_or(53);
                }
                servers.push(name_server);
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let resolver = builder.with_options(options).build()?;
        Ok(Dns {
            resolver,
            validating,
            timeout: config.timeout,
            preference: config.address_preference,
        })
    }

    /// Whether a validating resolver vouches (AD bit) for `domain`'s MX records: only then is
    /// an MX host's name trusted enough for DANE (RFC 7672 2.2.1).
    pub async fn mx_is_authentic(&self, domain: &str) -> bool {
        use hickory_resolver::proto::rr::RecordType;
        match super::dane::query(&self.validating, domain, RecordType::MX, self.timeout).await {
            Ok(answer) => answer.authentic && !answer.records.is_empty(),
            Err(_) => false,
        }
    }

    /// The validated TLSA records of `host`'s SMTP service on `port`.
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<super::dane::TlsaAnswer, String> {
        super::dane::tlsa_for(&self.validating, host, port, self.timeout).await
    }

    /// SPF, DKIM and DMARC verification through this resolver (same nameservers and cache).
    pub fn authenticator(&self) -> mail_auth::MessageAuthenticator {
        mail_auth::MessageAuthenticator(self.resolver.clone())
    }

    /// One host (a name or an IP address) with its addresses. An `Err` is the reply to record
    /// for every recipient that was to go there.
    pub async fn host_target(&self, host: &str, port: u16) -> Result<Target, Reply> {
        Ok(Target {
            name: host.to_string(),
            addresses: self.addresses(host, port).await?,
        })
    }

    /// The names of a domain's MX hosts (lower case, no trailing dot), for shaping rules by MX
    /// host; none when the lookup fails or finds none (the rule by domain applies then).
    pub async fn mx_names(&self, domain: &str) -> Vec<String> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::MX(mx) => Some(
                        mx.exchange
                            .to_string()
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                    ),
                    _ => None,
                })
                .filter(|name| !name.is_empty())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// A domain's mail hosts, best first. An `Err` is the reply to record for every recipient
    /// behind it: 5xx when the domain cannot receive mail, 4xx when DNS failed.
    pub async fn mx_targets(&self, domain: &str, port: u16) -> Result<Vec<Target>, Reply> {
        if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            let ip: IpAddr = literal.trim_start_matches("IPv6:").parse().map_err(|_| {
                Reply::new(550, "5.1.2", format!("invalid address literal {domain}"))
            })?;
            return Ok(vec![Target {
                name: domain.to_string(),
                addresses: vec![SocketAddr::new(ip, port)],
            }]);
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mut exchanges: Vec<(u16, String)> = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_string())),
                    _ => None,
                })
                .collect(),
            Err(error) if error.is_nx_domain() => {
                return Err(Reply::new(
                    550,
                    "5.1.2",
                    format!("Host or domain name not found: {domain} (NXDOMAIN)"),
                ));
            }
            Err(error) if error.is_no_records_found() => Vec::new(),
            Err(error) => {
                return Err(Reply::new(
                    451,
                    "4.4.3",
                    format!("DNS lookup of MX for {domain} failed: {error}"),
                ));
            }
        };
        if exchanges.is_empty() {
            // No MX: the domain itself is the implicit MX (RFC 5321 5.1).
            let addresses = self.addresses(&fqdn, port).await?;
            return Ok(vec![Target {
                name: domain.to_string(),
                addresses,
            }]);
        }
        if exchanges.iter().all(|(_, exchange)| exchange == ".") {
            return Err(Reply::new(
                556,
                "5.1.10",
                format!("Domain {domain} does not accept mail (null MX)"),
            ));
        }
        exchanges.retain(|(_, exchange)| exchange != ".");
        // Equal preferences are shuffled to spread load (RFC 5321 5.1), then sorted stably.
        fastrand::shuffle(&mut exchanges);
        exchanges.sort_by_key(|(preference, _)| *preference);
        let mut targets = Vec::new();
        let mut last_error = None;
        for (_, exchange) in exchanges {
            match self.addresses(&exchange, port).await {
                Ok(addresses) => targets.push(Target {
                    name: exchange.trim_end_matches('.').to_string(),
                    addresses,
                }),
                Err(reply) => last_error = Some(reply),
            }
        }
        if targets.is_empty() {
            let reason = last_error.map(|reply| reply.one_line()).unwrap_or_default();
            return Err(Reply::new(
                451,
                "4.4.3",
                format!("No MX host of {domain} has an address: {reason}"),
            ));
        }
        Ok(targets)
    }

    /// TXT records of a name, for plugins granted `dns`.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        match self.resolver.txt_lookup(fqdn.as_str()).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TXT(txt) => Some(txt.to_string()),
                    _ => None,
                })
                .collect()),
            Err(error) if error.is_nx_domain() || error.is_no_records_found() => Ok(Vec::new()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// A and AAAA records of a name as text, for plugins granted `dns`.
    pub async fn ips(&self, name: &str) -> Result<Vec<String>, String> {
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => Ok(lookup.iter().map(|ip| ip.to_string()).collect()),
            Err(error) if error.is_nx_domain() || error.is_no_records_found() => Ok(Vec::new()),
            Err(error) => Err(error.to_string()),
        }
    }

    async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Reply> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let name = if host.ends_with('.') {
            host.to_string()
        } else {
            format!("{host}.")
        };
        match self.resolver.lookup_ip(name.as_str()).await {
            Ok(lookup) => {
                let mut addresses: Vec<SocketAddr> =
                    lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                // Stable: within a family, the resolver's order stays.
                match self.preference {
                    crate::config::AddressPreference::Ipv4 => {
                        addresses.sort_by_key(|address| address.is_ipv6())
                    }
                    crate::config::AddressPreference::Ipv6 => {
                        addresses.sort_by_key(|address| address.is_ipv4())
                    }
                    crate::config::AddressPreference::Any => {}
                }
                if addresses.is_empty() {
                    Err(Reply::new(
                        550,
                        "5.1.2",
                        format!("Host {host} has no address"),
                    ))
                } else {
                    Ok(addresses)
                }
            }
            Err(error) if error.is_nx_domain() || error.is_no_records_found() => Err(Reply::new(
                550,
                "5.1.2",
                format!("Host or domain name not found: {host}"),
            )),
            Err(error) => Err(Reply::new(
                451,
                "4.4.3",
                format!("DNS lookup of {host} failed: {error}"),
            )),
        }
    }
}

/// The `nameserver` lines of /etc/resolv.conf (port 53).
fn system_nameservers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}
