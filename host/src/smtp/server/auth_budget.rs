//! Password guessing across sessions. `max_errors` ends one session that keeps guessing, but a
//! guesser opens another; so failed AUTH attempts are also counted per client address, over all
//! sessions (`[submission.auth_failures]`). Each failure is answered later than the one before,
//! and an address that spends its budget is banned: its connections to submission listeners get
//! 421 4.7.0 at once until the ban ends. Postfix's anvil (`smtpd_client_auth_rate_limit`) and
//! Stalwart's automatic ban do the same.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::AuthFailureLimits;
use crate::smtp::reply::Reply;

/// Addresses remembered before the table is swept of those with nothing left to remember.
const SWEEP_ABOVE: usize = 10_000;

/// What a failure costs the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Penalty {
    /// How long to hold back the 535 reply.
    pub delay: Duration,
    /// The address has spent its budget: the session ends with 421 after the reply.
    pub banned: bool,
}

#[derive(Debug, Default)]
struct Record {
    /// When each failure within the window happened, oldest first.
    failures: Vec<Instant>,
    banned_until: Option<Instant>,
}

pub struct AuthBudget {
    limits: AuthFailureLimits,
    records: Mutex<HashMap<IpAddr, Record>>,
}

impl AuthBudget {
    pub fn new(limits: AuthFailureLimits) -> AuthBudget {
        AuthBudget {
            limits,
            records: Mutex::new(HashMap::new()),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Record>> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The key an address is counted under, or `None` when the budget does not apply to it.
    fn key(&self, ip: IpAddr) -> Option<IpAddr> {
        let ip = super::limits::canonical(ip);
        if self.limits.limit == 0 || self.limits.exempt.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        Some(match ip {
            // One IPv6 host usually has a whole /64 to pick addresses from.
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
            v4 => v4,
        })
    }

    /// `Some(reply)` when `ip` is banned now: the reply to send before closing.
    pub fn refusal(&self, ip: IpAddr) -> Option<Reply> {
        self.refusal_at(ip, Instant::now())
    }

    fn refusal_at(&self, ip: IpAddr, now: Instant) -> Option<Reply> {
        let key = self.key(ip)?;
        let records = self.records();
        let until = records.get(&key)?.banned_until?;
        (now < until).then(|| {
            Reply::new(
                421,
                "4.7.0",
                format!(
                    "Too many failed authentication attempts from {ip}; try again in {}",
                    humantime::format_duration(Duration::from_secs((until - now).as_secs().max(1)))
                ),
            )
        })
    }

    /// Counts a failed attempt from `ip` and says what it costs.
    pub fn fail(&self, ip: IpAddr) -> Penalty {
        self.fail_at(ip, Instant::now())
    }

    fn fail_at(&self, ip: IpAddr, now: Instant) -> Penalty {
        let Some(key) = self.key(ip) else {
            return Penalty {
                delay: Duration::ZERO,
                banned: false,
            };
        };
        let limits = &self.limits;
        let mut records = self.records();
        if records.len() > SWEEP_ABOVE {
            records.retain(|_, record| {
                record.banned_until.is_some_and(|until| until > now)
                    || record
                        .failures
                        .last()
                        .is_some_and(|&last| now.duration_since(last) < limits.window)
            });
        }
        let record = records.entry(key).or_default();
        record
            .failures
            .retain(|&at| now.duration_since(at) < limits.window);
        record.failures.push(now);
        let count = record.failures.len() as u32;
        let banned = count >= limits.limit;
        if banned {
            record.failures.clear();
            record.banned_until = Some(now + limits.ban);
            metrics::counter!("switchyard_auth_bans_total").increment(1);
            tracing::warn!(client = %ip, failures = count, ban = %humantime::format_duration(limits.ban), "client banned after failed authentication attempts");
        }
        Penalty {
            delay: limits.delay * 2u32.pow(count.saturating_sub(1).min(4)),
            banned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> AuthBudget {
        AuthBudget::new(AuthFailureLimits {
            limit: 3,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
            delay: Duration::from_millis(100),
            exempt: vec!["10.0.0.0/8".parse().expect("net")],
        })
    }

    #[test]
    fn delays_grow_then_the_address_is_banned() {
        let budget = budget();
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let start = Instant::now();
        let delays: Vec<Penalty> = (0..3)
            .map(|n| budget.fail_at(ip, start + Duration::from_secs(n)))
            .collect();
        assert_eq!(
            delays
                .iter()
                .map(|p| p.delay.as_millis())
                .collect::<Vec<_>>(),
            [100, 200, 400]
        );
        assert_eq!(
            delays.iter().map(|p| p.banned).collect::<Vec<_>>(),
            [false, false, true]
        );
        let refusal = budget
            .refusal_at(ip, start + Duration::from_secs(10))
            .expect("banned");
        assert_eq!((refusal.code, refusal.enhanced.as_str()), (421, "4.7.0"));
        assert!(
            refusal.one_line().contains("try again in 4m 52s"),
            "{refusal:?}"
        );
        assert!(budget
            .refusal_at(ip, start + Duration::from_secs(303))
            .is_none());
        // Another address is not touched.
        assert!(budget
            .refusal_at("192.0.2.8".parse().expect("ip"), start)
            .is_none());
    }

    #[test]
    fn failures_age_out_of_the_window() {
        let budget = budget();
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let start = Instant::now();
        for minute in 0..10 {
            let penalty = budget.fail_at(ip, start + Duration::from_secs(61 * minute));
            assert_eq!(penalty.delay, Duration::from_millis(100));
            assert!(!penalty.banned);
        }
    }

    #[test]
    fn ipv6_counts_by_its_64_and_exempt_networks_not_at_all() {
        let budget = budget();
        let now = Instant::now();
        for host in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
            budget.fail_at(host.parse().expect("ip"), now);
        }
        assert!(budget
            .refusal_at("2001:db8:1:2::99".parse().expect("ip"), now)
            .is_some());
        assert!(budget
            .refusal_at("2001:db8:1:3::1".parse().expect("ip"), now)
            .is_none());
        let inside: IpAddr = "10.1.2.3".parse().expect("ip");
        for _ in 0..10 {
            assert_eq!(budget.fail_at(inside, now).delay, Duration::ZERO);
        }
        assert!(budget.refusal_at(inside, now).is_none());
        // IPv4 seen through an IPv6 socket is the same client.
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().expect("ip");
        for _ in 0..3 {
            budget.fail_at(mapped, now);
        }
        assert!(budget
            .refusal_at("192.0.2.9".parse().expect("ip"), now)
            .is_some());
    }
}
