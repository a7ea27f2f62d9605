//! Password guessing across sessions. `max_errors` ends one session that keeps guessing, but a
//! guesser opens another; so failed AUTH attempts are also counted per client address, over all
//! sessions (`[submission.auth_failures]`). Each failure is answered later than the one before,
//! and an address that spends its budget is banned: its connections to submission listeners get
//! 421 4.7.0 at once until the ban ends. Postfix's anvil (`smtpd_client_auth_rate_limit`) and
//! Stalwart's automatic ban do the same.
//!
//! A password check in progress counts against the budget until its outcome is known, so many
//! sessions side by side cannot get more guesses checked than the budget allows: an attempt starts
//! only while failures plus attempts under way stay below the limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::AuthFailureLimits;
use crate::mail::reply::Reply;
use crate::net::client_network::{ClientNetwork, ClientPrefixes};

/// Addresses remembered before the table is swept of those with nothing left to remember.
const SWEEP_ABOVE: usize = 10_000;
/// Addresses remembered at most: beyond it (after a sweep) new addresses are not counted, so an
/// attack from more addresses than this cannot grow the host's memory without bound.
const MAX_ADDRESSES: usize = 100_000;
/// How often a full table may be swept: a sweep holds the lock for the whole table.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Password checks started and not finished.
    in_flight: u32,
    banned_until: Option<Instant>,
}

impl Record {
    fn forget_before(&mut self, now: Instant, window: Duration) {
        self.failures
            .retain(|&at| now.saturating_duration_since(at) < window);
        if self.banned_until.is_some_and(|until| until <= now) {
            self.banned_until = None;
        }
    }

    fn is_idle(&self) -> bool {
        self.failures.is_empty() && self.in_flight == 0 && self.banned_until.is_none()
    }
}

struct Table {
    records: HashMap<ClientNetwork, Record>,
    last_sweep: Option<Instant>,
}

pub struct AuthBudget {
    limits: AuthFailureLimits,
    prefixes: ClientPrefixes,
    table: Mutex<Table>,
}

/// One password check under way, counted against its address's budget until its outcome is
/// told ([`Attempt::failed`]) or it is dropped (a success, or an exchange that ended first).
pub struct Attempt<'a> {
    budget: &'a AuthBudget,
    /// `None` when the budget does not apply to the address.
    key: Option<ClientNetwork>,
    ip: IpAddr,
}

impl AuthBudget {
    pub fn new(limits: AuthFailureLimits, prefixes: ClientPrefixes) -> AuthBudget {
        AuthBudget {
            limits,
            prefixes,
            table: Mutex::new(Table {
                records: HashMap::new(),
                last_sweep: None,
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The network an address is counted under (an IPv6 /64 by default: one host usually has a
    /// whole /64 to pick addresses from), or `None` when the budget does not apply to it.
    fn key(&self, ip: IpAddr) -> Option<ClientNetwork> {
        let ip = crate::net::client_network::canonical(ip);
        if self.limits.limit == 0 || self.limits.exempt.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        Some(ClientNetwork::of(ip, self.prefixes))
    }

    /// `Some(reply)` when `ip` is banned now: the reply to send before closing.
    pub fn refusal(&self, ip: IpAddr) -> Option<Reply> {
        self.refusal_at(ip, Instant::now())
    }

    fn refusal_at(&self, ip: IpAddr, now: Instant) -> Option<Reply> {
        let key = self.key(ip)?;
        let table = self.table();
        let until = table.records.get(&key)?.banned_until?;
        (now < until).then(|| banned_reply(ip, until - now))
    }

    /// Starts a password check for `ip`, or refuses it (the reply to send before closing): the
    /// address is banned, or its failures and the checks already under way fill its budget.
    pub fn attempt(&self, ip: IpAddr) -> Result<Attempt<'_>, Reply> {
        self.attempt_at(ip, Instant::now())
    }

    fn attempt_at(&self, ip: IpAddr, now: Instant) -> Result<Attempt<'_>, Reply> {
        let Some(key) = self.key(ip) else {
            return Ok(Attempt {
                budget: self,
                key: None,
                ip,
            });
        };
        let limits = &self.limits;
        let mut table = self.table();
        self.sweep(&mut table, now);
        if !table.records.contains_key(&key) && table.records.len() >= MAX_ADDRESSES {
            tracing::warn!(client = %ip, "authentication failure table full; address not counted");
            return Ok(Attempt {
                budget: self,
                key: None,
                ip,
            });
        }
        let record = table.records.entry(key).or_default();
        record.forget_before(now, limits.window);
        if let Some(until) = record.banned_until {
            return Err(banned_reply(ip, until - now));
        }
        if record.failures.len() as u64 + u64::from(record.in_flight) >= u64::from(limits.limit) {
            return Err(Reply::new(
                421,
                "4.7.0",
                format!("Too many authentication attempts from {ip} at once; try again later"),
            ));
        }
        record.in_flight += 1;
        Ok(Attempt {
            budget: self,
            key: Some(key),
            ip,
        })
    }

    /// Sweeps a large table of addresses with nothing left to remember, at most once a
    /// `SWEEP_INTERVAL`.
    fn sweep(&self, table: &mut Table, now: Instant) {
        let due = table
            .last_sweep
            .is_none_or(|last| now.saturating_duration_since(last) >= SWEEP_INTERVAL);
        if table.records.len() <= SWEEP_ABOVE || !due {
            return;
        }
        table.last_sweep = Some(now);
        let window = self.limits.window;
        table.records.retain(|_, record| {
            record.forget_before(now, window);
            !record.is_idle()
        });
    }

    /// Ends an attempt: `failed` counts it as a failure and says what that costs.
    fn finish(&self, key: ClientNetwork, ip: IpAddr, failed: bool, now: Instant) -> Penalty {
        let limits = &self.limits;
        let mut table = self.table();
        let Some(record) = table.records.get_mut(&key) else {
            return Penalty::NONE;
        };
        record.in_flight = record.in_flight.saturating_sub(1);
        if !failed {
            return Penalty::NONE;
        }
        record.forget_before(now, limits.window);
        record.failures.push(now);
        let count = record.failures.len() as u32;
        let banned = count >= limits.limit;
        if banned {
            record.failures.clear();
            // A ban too long to represent lasts as long as the process.
            record.banned_until = now
                .checked_add(limits.ban)
                .or_else(|| now.checked_add(FOREVER));
            metrics::counter!("switchyard_auth_bans_total").increment(1);
            tracing::warn!(client = %ip, failures = count, ban = %humantime::format_duration(limits.ban), "client banned after failed authentication attempts");
        }
        Penalty {
            delay: limits
                .delay
                .saturating_mul(2u32.pow(count.saturating_sub(1).min(4))),
            banned,
        }
    }
}

/// Stands in for a ban longer than an `Instant` can reach.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Penalty {
    const NONE: Penalty = Penalty {
        delay: Duration::ZERO,
        banned: false,
    };
}

impl Attempt<'_> {
    /// The password was wrong: counts the failure and says what it costs.
    pub fn failed(self) -> Penalty {
        self.failed_at(Instant::now())
    }

    fn failed_at(mut self, now: Instant) -> Penalty {
        match self.key.take() {
            Some(key) => self.budget.finish(key, self.ip, true, now),
            None => Penalty::NONE,
        }
    }
}

impl Drop for Attempt<'_> {
    /// A success, or a check that never finished: the attempt no longer counts.
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.budget.finish(key, self.ip, false, Instant::now());
        }
    }
}

fn banned_reply(ip: IpAddr, left: Duration) -> Reply {
    Reply::new(
        421,
        "4.7.0",
        format!(
            "Too many failed authentication attempts from {ip}; try again in {}",
            humantime::format_duration(Duration::from_secs(left.as_secs().max(1)))
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail_at(budget: &AuthBudget, ip: IpAddr, now: Instant) -> Penalty {
        budget.attempt_at(ip, now).expect("attempt").failed_at(now)
    }

    fn budget() -> AuthBudget {
        AuthBudget::new(
            AuthFailureLimits {
                limit: 3,
                window: Duration::from_secs(60),
                ban: Duration::from_secs(300),
                delay: Duration::from_millis(100),
                exempt: vec!["10.0.0.0/8".parse().expect("net")],
            },
            ClientPrefixes::default(),
        )
    }

    #[test]
    fn delays_grow_then_the_address_is_banned() {
        let budget = budget();
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let start = Instant::now();
        let delays: Vec<Penalty> = (0..3)
            .map(|n| fail_at(&budget, ip, start + Duration::from_secs(n)))
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
            let penalty = fail_at(&budget, ip, start + Duration::from_secs(61 * minute));
            assert_eq!(penalty.delay, Duration::from_millis(100));
            assert!(!penalty.banned);
        }
    }

    #[test]
    fn ipv6_counts_by_its_64_and_exempt_networks_not_at_all() {
        let budget = budget();
        let now = Instant::now();
        for host in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
            fail_at(&budget, host.parse().expect("ip"), now);
        }
        assert!(budget
            .refusal_at("2001:db8:1:2::99".parse().expect("ip"), now)
            .is_some());
        assert!(budget
            .refusal_at("2001:db8:1:3::1".parse().expect("ip"), now)
            .is_none());
        let inside: IpAddr = "10.1.2.3".parse().expect("ip");
        for _ in 0..10 {
            assert_eq!(fail_at(&budget, inside, now).delay, Duration::ZERO);
        }
        assert!(budget.refusal_at(inside, now).is_none());
        // IPv4 seen through an IPv6 socket is the same client.
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().expect("ip");
        for _ in 0..3 {
            fail_at(&budget, mapped, now);
        }
        assert!(budget
            .refusal_at("192.0.2.9".parse().expect("ip"), now)
            .is_some());
    }

    /// Checks under way count: with a budget of 3, three sessions side by side may each start a
    /// check, a fourth may not, and a success gives its place back.
    #[test]
    fn parallel_attempts_cannot_outrun_the_budget() {
        let budget = budget();
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let now = Instant::now();
        let first = budget.attempt_at(ip, now).expect("first");
        let second = budget.attempt_at(ip, now).expect("second");
        let third = budget.attempt_at(ip, now).expect("third");
        let refused = budget.attempt_at(ip, now).err().expect("a fourth at once");
        assert!(refused
            .one_line()
            .starts_with("421 4.7.0 Too many authentication attempts from 192.0.2.7 at once"));
        drop(third); // a success
        let fourth = budget.attempt_at(ip, now).expect("a place was given back");
        assert!(!first.failed_at(now).banned);
        assert!(!second.failed_at(now).banned);
        assert!(fourth.failed_at(now).banned, "the third failure bans");
        assert!(budget.attempt_at(ip, now).is_err());
    }

    #[test]
    fn huge_settings_do_not_overflow() {
        let budget = AuthBudget::new(
            AuthFailureLimits {
                limit: 1,
                window: Duration::MAX,
                ban: Duration::MAX,
                delay: Duration::MAX,
                exempt: Vec::new(),
            },
            ClientPrefixes::default(),
        );
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let now = Instant::now();
        let penalty = fail_at(&budget, ip, now);
        assert!(penalty.banned);
        assert_eq!(penalty.delay, Duration::MAX);
        assert!(budget.refusal_at(ip, now).is_some());
    }
}
