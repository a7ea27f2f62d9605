//! Concurrent session limits, in total and per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::mail::reply::Reply;

pub struct SessionLimits {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one session's place; dropping it frees the place.
pub struct SessionGuard {
    limits: Arc<SessionLimits>,
    ip: IpAddr,
}

impl SessionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<SessionLimits> {
        Arc::new(SessionLimits {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Takes a place for a session from `ip`, or says why not (the reply to send before closing).
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<SessionGuard, Reply> {
        let ip = canonical(ip);
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

    #[test]
    fn per_ip_and_total() {
        let limits = SessionLimits::new(3, 2);
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
}
