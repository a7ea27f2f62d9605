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
//! ```
//!
//! Each MAIL FROM counts once against both limits; past either, MAIL gets the (4xx) reply.

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
}

pub struct RateLimit {
    per_sender: Option<Limit>,
    per_ip: Option<Limit>,
    reply: Reply,
}

/// Parses "450 4.7.1 text"; only temporary codes make sense for a rate limit.
pub fn parse_reply(text: &str) -> Result<Reply, String> {
    Reply::parse(text, 400..500)
}

impl RateLimit {
    fn exceeded(key: String, limit: Option<Limit>) -> bool {
        match limit {
            Some(limit) => kv::increment(&key, 1, limit.window_seconds) > limit.limit,
            None => false,
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
        })
    }

    fn mail_from(&self, session: &Session, sender: &str, _: &[Param]) -> AddressDecision {
        let by_sender = !sender.is_empty()
            && Self::exceeded(format!("sender:{}", sender.to_lowercase()), self.per_sender);
        let by_ip = Self::exceeded(format!("ip:{}", session.client_ip()), self.per_ip);
        if by_sender || by_ip {
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
    fn replies_must_be_temporary() {
        assert_eq!(parse_reply("450 4.7.1 slow down").expect("ok").code, 450);
        assert!(parse_reply("550 5.7.1 no").is_err());
    }
}
