//! The network a client is counted under. Limits keyed by client address (sessions at once, the
//! AUTH failure budget) count an IPv6 client by its /64, not its address: one host usually holds
//! a whole /64 and could otherwise walk past every per-address limit by picking a new address.

use std::net::IpAddr;

use ipnet::IpNet;

pub use crate::config::ClientPrefixes;

/// A client's counting key; shown as the address alone when it is one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientNetwork(IpNet);

impl ClientNetwork {
    /// The network `ip` counts under: its address cut to the prefix length of its family. An
    /// IPv4 client seen through an IPv6 socket counts as its IPv4 address. Lengths above the
    /// family's width count whole addresses.
    pub fn of(ip: IpAddr, prefixes: ClientPrefixes) -> ClientNetwork {
        let ip = canonical(ip);
        let length = match ip {
            IpAddr::V4(_) => prefixes.v4.min(32),
            IpAddr::V6(_) => prefixes.v6.min(128),
        };
        // A valid length by construction: clamped to the family's width just above.
        let network = IpNet::new(ip, length)
            .map(|net| net.trunc())
            .unwrap_or_else(|_| IpNet::from(ip));
        ClientNetwork(network)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

impl std::fmt::Display for ClientNetwork {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(out, "{}", self.0.addr())
        } else {
            write!(out, "{}", self.0)
        }
    }
}

/// An IPv4 client seen through an IPv6 socket counts as its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn ipv6_counts_by_its_64_and_ipv4_by_its_address() {
        let prefixes = ClientPrefixes::default();
        let a = ClientNetwork::of(ip("2001:db8:1:2::1"), prefixes);
        assert_eq!(a, ClientNetwork::of(ip("2001:db8:1:2:ffff::3"), prefixes));
        assert_ne!(a, ClientNetwork::of(ip("2001:db8:1:3::1"), prefixes));
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(ClientNetwork::of(ip("::1"), prefixes).to_string(), "::/64");
        let v4 = ClientNetwork::of(ip("192.0.2.7"), prefixes);
        assert_eq!(v4.to_string(), "192.0.2.7");
        assert_ne!(v4, ClientNetwork::of(ip("192.0.2.8"), prefixes));
        assert_eq!(v4, ClientNetwork::of(ip("::ffff:192.0.2.7"), prefixes));
    }

    #[test]
    fn lengths_are_configurable_and_clamped() {
        let prefixes = ClientPrefixes { v4: 24, v6: 48 };
        assert_eq!(
            ClientNetwork::of(ip("127.0.0.1"), prefixes),
            ClientNetwork::of(ip("127.0.0.2"), prefixes)
        );
        assert_eq!(
            ClientNetwork::of(ip("127.0.0.1"), prefixes).to_string(),
            "127.0.0.0/24"
        );
        assert_eq!(
            ClientNetwork::of(ip("2001:db8:1:2::1"), prefixes),
            ClientNetwork::of(ip("2001:db8:1:9::1"), prefixes)
        );
        let whole = ClientPrefixes { v4: 40, v6: 200 };
        assert_eq!(ClientNetwork::of(ip("::1"), whole).to_string(), "::1");
        assert!(ClientNetwork::of(ip("10.0.0.1"), whole).contains(ip("::ffff:10.0.0.1")));
    }
}
