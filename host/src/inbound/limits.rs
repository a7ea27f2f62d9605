//! Concurrent session limits, in total and per client network (an IPv4 address, an IPv6 /64 by
//! default: see [`crate::net::client_network`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::mail::reply::Reply;
use crate::net::client_network::{ClientNetwork, ClientPrefixes};

pub struct SessionLimits {
    max_total: usize,
    max_per_ip: usize,
    prefixes: ClientPrefixes,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<ClientNetwork, usize>,
}

/// Holds one session's place; dropping it frees the place.
pub struct SessionGuard {
    limits: Arc<SessionLimits>,
    ip: ClientNetwork,
}

impl SessionLimits {
    pub fn new(
        max_total: usize,
        max_per_ip: usize,
        prefixes: ClientPrefixes,
    ) -> Arc<SessionLimits> {
        Arc::new(SessionLimits {
            max_total,
            max_per_ip,
            prefixes,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Sessions open now.
    pub fn total(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .total
    }

    /// Takes a place for a session from `ip`, or says why not (the reply to send before closing).
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<SessionGuard, Reply> {
        let ip = ClientNetwork::of(ip, self.prefixes);
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if counts.total >= self.max_total {
            return Err(Reply::new(
                421,
                "4.3.2",
                "Too many connections, try again later",
            ));
        }
        let from_ip = counts.per_ip.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            return Err(Reply::new(
                421,
                "4.7.0",
                format!("Too many connections from {ip}, try again later"),
            ));
        }
        *from_ip += 1;
        counts.total += 1;
        Ok(SessionGuard {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut counts = self
            .limits
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(count) = counts.per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total() {
        let limits = SessionLimits::new(3, 2, ClientPrefixes::default());
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let first = limits.enter(a).expect("first");
        let _second = limits.enter(a).expect("second");
        assert_eq!(limits.enter(a).err().map(|r| r.code), Some(421));
        let _third = limits.enter(b).expect("other ip");
        assert_eq!(
            limits.enter(b).err().map(|r| r.enhanced),
            Some("4.3.2".to_string())
        );
        drop(first);
        assert!(limits.enter(b).is_ok());
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let limits = SessionLimits::new(100, 2, ClientPrefixes::default());
        let ip = |text: &str| -> IpAddr { text.parse().expect("ip") };
        let _a = limits.enter(ip("2001:db8:1:2::1")).expect("first");
        let _b = limits.enter(ip("2001:db8:1:2::2")).expect("second");
        let refused = limits
            .enter(ip("2001:db8:1:2:ffff::3"))
            .err()
            .expect("third");
        assert_eq!(
            refused.lines[0],
            "Too many connections from 2001:db8:1:2::/64, try again later"
        );
        assert!(limits.enter(ip("2001:db8:1:3::1")).is_ok(), "another /64");
    }
}
