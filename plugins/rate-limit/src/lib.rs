//! `rate-limit`: fixed-window limits on messages per sender address and per client IP, counted
//! in the host's key-value store (grant `kv`), so the counts survive restarts. In a tenant's chain
//! the counts are that tenant's alone (the store keeps each tenant's keys apart); in the global
//! chain they cover all mail.
//! Every refusal adds one to the counter `limited_total` (grant `metrics`), exported as
//! `switchyard_plugin_counter_total{plugin="rate-limit",tenant="...",name="limited_total"}` (the
//! tenant of the refused mail).
//!
//! ```toml
//! [[plugin]]
//! name = "rate-limit"
//! path = "target/wasm32-wasip2/plugin/rate_limit.wasm"
//! grants = ["kv", "metrics"]
//! [plugin.config]
//! per_sender = { limit = 100, window_seconds = 3600 }
//! per_ip = { limit = 1000, window_seconds = 3600 }
//! reply = "450 4.7.1 Rate limit exceeded, try again later"
//! ipv4_prefix = 32   # the default: each IPv4 address counts alone
//! ipv6_prefix = 64   # the default: an IPv6 client counts by its /64
//! ```
//!
//! Each MAIL FROM counts once against both limits (the sender only while the client's network
//! is within its own); past either, MAIL gets the (4xx) reply. A count that cannot be made
//! because the store is down defers the mail with `451 4.3.0` (the limit fails closed); one the
//! plugin's kv quota refuses lets it through and adds one to `uncounted_total`, so that whoever
//! fills the quota with made-up senders does not stop everyone's mail.
//! `per_ip` counts client networks, not addresses: an IPv6 host usually holds a whole /64 and
//! could otherwise take a fresh address for every message.

use std::net::IpAddr;

use serde::Deserialize;
use switchyard_plugin_sdk::host::{kv, metrics};
use switchyard_plugin_sdk::*;

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub limit: i64,
    pub window_seconds: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub per_sender: Option<Limit>,
    pub per_ip: Option<Limit>,
    pub reply: Option<String>,
    /// The prefix length `per_ip` counts an IPv4 client by (1 to 32; default 32).
    pub ipv4_prefix: Option<u8>,
    /// The prefix length `per_ip` counts an IPv6 client by (1 to 128; default 64).
    pub ipv6_prefix: Option<u8>,
}

pub struct RateLimit {
    per_sender: Option<Limit>,
    per_ip: Option<Limit>,
    reply: Reply,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
}

/// Parses "450 4.7.1 text"; only temporary codes make sense for a rate limit.
pub fn parse_reply(text: &str) -> Result<Reply, String> {
    Reply::parse(text, 400..500)
}

/// What a count that could not be made means. A store that is down defers the mail (451): the
/// limit fails closed. A spent kv quota lets it through, counted in `uncounted_total`: a full
/// table must not stop everyone's mail, or whoever fills it with made-up senders would. (The host
/// logs either.)
fn uncounted(error: kv::KvError) -> AddressDecision {
    match error {
        kv::KvError::QuotaExceeded(_) => {
            metrics::counter_add("uncounted_total", 1);
            AddressDecision::next()
        }
        _ => AddressDecision::tempfail(
            451,
            "4.3.0",
            "Rate limit unavailable, try again later".to_string(),
        ),
    }
}

/// `ip` cut to its prefix: `a.b.c.d/len` or `x:x::/len`, the key `per_ip` counts under. An
/// address that is not one (the host always gives one) counts as itself.
pub fn client_network(ip: &str, ipv4_prefix: u8, ipv6_prefix: u8) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(ipv4_prefix))
                .unwrap_or(0);
            format!(
                "{}/{ipv4_prefix}",
                std::net::Ipv4Addr::from(u32::from(v4) & mask)
            )
        }
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => client_network(&v4.to_string(), ipv4_prefix, ipv6_prefix),
            None => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(ipv6_prefix))
                    .unwrap_or(0);
                format!(
                    "{}/{ipv6_prefix}",
                    std::net::Ipv6Addr::from(u128::from(v6) & mask)
                )
            }
        },
        Err(_) => ip.to_string(),
    }
}

impl RateLimit {
    /// Whether `key` is past its limit once this message counts; `Err` when the count cannot
    /// be made (a store that is down, a spent kv quota).
    fn exceeded(key: String, limit: Option<Limit>) -> Result<bool, kv::KvError> {
        match limit {
            Some(limit) => Ok(kv::try_increment(&key, 1, limit.window_seconds)? > limit.limit),
            None => Ok(false),
        }
    }
}

impl Plugin for RateLimit {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::MailFrom];

    fn new(config: Config) -> Result<Self, String> {
        for limit in [config.per_sender, config.per_ip].into_iter().flatten() {
            if limit.limit < 1 || limit.window_seconds < 1 {
                return Err("limit and window_seconds must be at least 1".to_string());
            }
        }
        let ipv4_prefix = config.ipv4_prefix.unwrap_or(32);
        let ipv6_prefix = config.ipv6_prefix.unwrap_or(64);
        if !(1..=32).contains(&ipv4_prefix) || !(1..=128).contains(&ipv6_prefix) {
            return Err(
                "ipv4_prefix must be from 1 to 32 and ipv6_prefix from 1 to 128".to_string(),
            );
        }
        let reply = parse_reply(
            config
                .reply
                .as_deref()
                .unwrap_or("450 4.7.1 Rate limit exceeded, try again later"),
        )?;
        Ok(RateLimit {
            per_sender: config.per_sender,
            per_ip: config.per_ip,
            reply,
            ipv4_prefix,
            ipv6_prefix,
        })
    }

    fn mail_from(&self, session: &Session, sender: &str, _: &[Param]) -> AddressDecision {
        // The client's network first: a client past its limit is refused before its sender is
        // counted, so made-up senders from one network cannot fill the plugin's kv quota.
        let network = client_network(&session.client_ip(), self.ipv4_prefix, self.ipv6_prefix);
        let limited = match Self::exceeded(format!("ip:{network}"), self.per_ip) {
            Ok(true) => true,
            Ok(false) if sender.is_empty() => false,
            Ok(false) => {
                match Self::exceeded(format!("sender:{}", sender.to_lowercase()), self.per_sender) {
                    Ok(limited) => limited,
                    Err(error) => return uncounted(error),
                }
            }
            Err(error) => return uncounted(error),
        };
        if limited {
            metrics::counter_add("limited_total", 1);
            AddressDecision::tempfail(
                self.reply.code,
                &self.reply.enhanced,
                self.reply.text.clone(),
            )
        } else {
            AddressDecision::next()
        }
    }
}

export_plugin!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;

    use switchyard_plugin_sdk::testing::Harness;

    #[test]
    fn the_sender_past_its_limit_is_deferred_and_counted() {
        // The plugin as the host builds it, its kv and metrics answered by the SDK's mock host.
        let harness = Harness::<RateLimit>::new(
            r#"{"per_sender": {"limit": 2, "window_seconds": 60}, "reply": "451 4.7.1 Later"}"#,
        )
        .expect("config");
        for _ in 0..2 {
            assert_eq!(
                harness.mail_from("A@Example.com").verdict,
                Verdict::Continue
            );
        }
        let third = harness.mail_from("a@example.com");
        assert!(
            matches!(&third.verdict, Verdict::Tempfail(reply) if reply.code == 451 && reply.text == "Later"),
            "{:?}",
            third.verdict
        );
        assert_eq!(
            harness.mail_from("b@example.com").verdict,
            Verdict::Continue
        );
        harness.host(|host| {
            assert_eq!(host.kv["sender:a@example.com"], b"3");
            assert_eq!(host.counters["limited_total"], 1);
        });
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        assert_eq!(
            client_network("2001:db8:1:2::1", 32, 64),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            client_network("2001:db8:1:2:ffff:1:2:3", 32, 64),
            "2001:db8:1:2::/64"
        );
        assert_eq!(client_network("::1", 32, 64), "::/64");
        assert_eq!(client_network("::1", 32, 128), "::1/128");
        assert_eq!(client_network("192.0.2.7", 32, 64), "192.0.2.7/32");
        assert_eq!(client_network("192.0.2.7", 24, 64), "192.0.2.0/24");
        assert_eq!(client_network("::ffff:192.0.2.7", 32, 64), "192.0.2.7/32");

        // Through the hook: three addresses of one /64 share its count, another /64 has its own.
        let mut harness =
            Harness::<RateLimit>::new(r#"{"per_ip": {"limit": 2, "window_seconds": 60}}"#)
                .expect("config");
        for (address, expected) in [
            ("2001:db8:1:2::1", true),
            ("2001:db8:1:2::2", true),
            ("2001:db8:1:2:ffff::3", false),
            ("2001:db8:1:3::1", true),
        ] {
            harness.session.client_ip = address.to_string();
            let passed = harness.mail_from("s@example.com").verdict == Verdict::Continue;
            assert_eq!(passed, expected, "{address}");
        }
        harness.host(|host| assert_eq!(host.kv["ip:2001:db8:1:2::/64"], b"3"));
        assert!(Harness::<RateLimit>::new(r#"{"ipv6_prefix": 129}"#).is_err());
    }

    #[test]
    fn a_store_that_is_down_defers_and_a_full_quota_lets_mail_through_counted() {
        let harness =
            Harness::<RateLimit>::new(r#"{"per_sender": {"limit": 5, "window_seconds": 60}}"#)
                .expect("config");
        harness.host(|host| {
            host.kv_refuses = Some(kv::KvError::Unavailable("database down".to_string()))
        });
        let refused = harness.mail_from("a@example.com");
        assert!(
            matches!(&refused.verdict, Verdict::Tempfail(reply) if reply.code == 451),
            "{:?}",
            refused.verdict
        );
        harness.host(|host| {
            host.kv_refuses = Some(kv::KvError::QuotaExceeded(
                "quota of 10 keys reached".to_string(),
            ))
        });
        assert_eq!(
            harness.mail_from("a@example.com").verdict,
            Verdict::Continue
        );
        harness.host(|host| assert_eq!(host.counters["uncounted_total"], 1));
    }

    #[test]
    fn a_network_past_its_limit_adds_no_sender_keys() {
        let harness =
            Harness::<RateLimit>::new(r#"{"per_ip": {"limit": 1, "window_seconds": 60}, "per_sender": {"limit": 5, "window_seconds": 60}}"#)
                .expect("config");
        assert_eq!(
            harness.mail_from("a@example.com").verdict,
            Verdict::Continue
        );
        for n in 0..3 {
            assert!(matches!(
                harness
                    .mail_from(&format!("made-up-{n}@example.com"))
                    .verdict,
                Verdict::Tempfail(_)
            ));
        }
        harness.host(|host| {
            assert_eq!(
                host.kv
                    .keys()
                    .filter(|key| key.starts_with("sender:"))
                    .count(),
                1
            )
        });
    }

    #[test]
    fn replies_must_be_temporary() {
        assert_eq!(parse_reply("450 4.7.1 slow down").expect("ok").code, 450);
        assert!(parse_reply("550 5.7.1 no").is_err());
    }
}
