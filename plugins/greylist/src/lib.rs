//! `greylist`: greylisting (RFC 6647). The first time a (client network, sender, recipient)
//! triplet is seen, RCPT gets a temporary refusal; a retry after `delay_seconds` (and within
//! `retry_window_seconds` of the first attempt) passes, and the triplet then passes at once for
//! `pass_seconds`. Authenticated (submission) sessions are never greylisted.
//!
//! The records live in the host's key-value store (grants `kv` and `clock`). Each step is a
//! compare-and-swap, so on a cluster sharing a PostgreSQL queue the first attempt may reach one
//! node and the retry another: the record is the same, and two nodes seeing a triplet at once
//! agree on its first-seen time.
//!
//! ```toml
//! [[plugin]]
//! name = "greylist"
//! path = "target/wasm32-wasip2/plugin/greylist.wasm"
//! grants = ["kv", "clock"]
//! [plugin.config]
//! delay_seconds = 300
//! retry_window_seconds = 14400
//! pass_seconds = 3024000
//! reply = "451 4.7.1 Greylisted, please try again later"
//! ```
//!
//! Clients are grouped by network (IPv4 /24, IPv6 /64), since large senders retry from another
//! address of the same pool.

use std::net::IpAddr;

use serde::Deserialize;
use switchyard_plugin_sdk::host::{clock, kv};
use switchyard_plugin_sdk::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub delay_seconds: u32,
    pub retry_window_seconds: u32,
    pub pass_seconds: u32,
    pub reply: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            delay_seconds: 300,
            retry_window_seconds: 4 * 3600,
            pass_seconds: 35 * 24 * 3600,
            reply: "451 4.7.1 Greylisted, please try again later".to_string(),
        }
    }
}

pub struct Greylist {
    config: Config,
    reply: Reply,
}

/// The record of a triplet: seen first at a time (milliseconds), or passed.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    FirstSeen(u64),
    Passed,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::FirstSeen(at) => format!("first:{at}").into_bytes(),
            Record::Passed => b"pass".to_vec(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let text = std::str::from_utf8(bytes).ok()?;
        if text == "pass" {
            return Some(Record::Passed);
        }
        text.strip_prefix("first:")?
            .parse()
            .ok()
            .map(Record::FirstSeen)
    }
}

/// The client's network: its /24 (IPv4) or /64 (IPv6), as text; the address itself if it does
/// not parse.
pub fn network(client_ip: &str) -> String {
    match client_ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            let [a, b, c, _] = ip.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        Ok(IpAddr::V6(ip)) => {
            let segments = ip.segments();
            format!(
                "{:x}:{:x}:{:x}:{:x}::/64",
                segments[0], segments[1], segments[2], segments[3]
            )
        }
        Err(_) => client_ip.to_string(),
    }
}

/// What to do with a triplet whose record is `record` at `now`.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Pass; write `Record::Passed` in place of the first-seen record if there is one.
    Pass { promote: bool },
    /// Refuse for now.
    Wait,
    /// No usable record (missing, expired past the retry window, unreadable): start again.
    Start,
}

pub fn step(record: Option<&Record>, now: u64, config: &Config) -> Step {
    match record {
        Some(Record::Passed) => Step::Pass { promote: false },
        Some(Record::FirstSeen(at)) => {
            let waited = now.saturating_sub(*at);
            if waited < u64::from(config.delay_seconds) * 1000 {
                Step::Wait
            } else if waited <= u64::from(config.retry_window_seconds) * 1000 {
                Step::Pass { promote: true }
            } else {
                Step::Start
            }
        }
        None => Step::Start,
    }
}

impl Greylist {
    fn refuse(&self) -> AddressDecision {
        AddressDecision::tempfail(
            self.reply.code,
            &self.reply.enhanced,
            self.reply.text.clone(),
        )
    }
}

impl Plugin for Greylist {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::RcptTo];

    fn new(config: Config) -> Result<Self, String> {
        if config.delay_seconds >= config.retry_window_seconds {
            return Err("delay_seconds must be shorter than retry_window_seconds".to_string());
        }
        let reply = Reply::parse(&config.reply, 400..500)?;
        Ok(Greylist { config, reply })
    }

    fn rcpt_to(
        &self,
        session: &Session,
        envelope: &Envelope,
        recipient: &str,
        _: &[Param],
    ) -> AddressDecision {
        if session.auth_identity().is_some() {
            return AddressDecision::next();
        }
        let key = format!(
            "{}|{}|{}",
            network(&session.client_ip()),
            envelope.sender.to_lowercase(),
            recipient.to_lowercase()
        );
        let now = clock::now_millis();
        let stored = kv::get(&key);
        let record = stored.as_deref().and_then(Record::decode);
        match step(record.as_ref(), now, &self.config) {
            Step::Pass { promote } => {
                if promote {
                    // Another node may have promoted it first: either way it passes.
                    kv::compare_and_swap(
                        &key,
                        stored.as_deref(),
                        &Record::Passed.encode(),
                        Some(self.config.pass_seconds),
                    );
                }
                AddressDecision::next()
            }
            Step::Wait => self.refuse(),
            Step::Start => {
                // Whoever writes the first-seen record first sets the time for every node.
                kv::compare_and_swap(
                    &key,
                    stored.as_deref(),
                    &Record::FirstSeen(now).encode(),
                    Some(self.config.retry_window_seconds),
                );
                self.refuse()
            }
        }
    }
}

export_plugin!(Greylist);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            delay_seconds: 60,
            retry_window_seconds: 3600,
            ..Config::default()
        }
    }

    #[test]
    fn a_client_that_retries_after_the_delay_passes_through_the_hook() {
        use switchyard_plugin_sdk::testing::Harness;
        let harness = Harness::<Greylist>::new(r#"{"delay_seconds": 60}"#).expect("config");
        let envelope = Envelope {
            sender: "s@sender.example".to_string(),
            recipients: Vec::new(),
        };
        harness.host(|host| host.now_millis = 1_000_000);
        let first = harness.rcpt_to_in(&envelope, "r@example.com", &[]);
        assert!(
            matches!(first.verdict, Verdict::Tempfail(_)),
            "{:?}",
            first.verdict
        );
        harness.host(|host| host.now_millis += 30_000);
        let early = harness.rcpt_to_in(&envelope, "r@example.com", &[]);
        assert!(matches!(early.verdict, Verdict::Tempfail(_)), "too early");
        harness.host(|host| host.now_millis += 31_000);
        let later = harness.rcpt_to_in(&envelope, "r@example.com", &[]);
        assert_eq!(later.verdict, Verdict::Continue);
        // An authenticated client is never greylisted.
        let mut trusted = harness;
        trusted.session.auth_identity = Some("user@example.com".to_string());
        let other = trusted.rcpt_to_in(&envelope, "new@example.com", &[]);
        assert_eq!(other.verdict, Verdict::Continue);
    }

    #[test]
    fn a_triplet_waits_then_passes_then_is_remembered() {
        let config = config();
        assert_eq!(step(None, 1_000, &config), Step::Start);
        let first = Record::FirstSeen(1_000);
        assert_eq!(step(Some(&first), 30_000, &config), Step::Wait);
        assert_eq!(
            step(Some(&first), 61_000, &config),
            Step::Pass { promote: true }
        );
        assert_eq!(
            step(Some(&first), 3_700_000, &config),
            Step::Start,
            "too late"
        );
        assert_eq!(
            step(Some(&Record::Passed), 0, &config),
            Step::Pass { promote: false }
        );
    }

    #[test]
    fn records_round_trip_and_junk_is_ignored() {
        for record in [Record::FirstSeen(42), Record::Passed] {
            assert_eq!(Record::decode(&record.encode()), Some(record));
        }
        assert_eq!(Record::decode(b"first:soon"), None);
        assert_eq!(Record::decode(b"\xff"), None);
    }

    #[test]
    fn clients_are_grouped_by_network() {
        assert_eq!(network("192.0.2.77"), "192.0.2.0/24");
        assert_eq!(network("2001:db8:1:2:3::9"), "2001:db8:1:2::/64");
        assert_eq!(network("unix"), "unix");
    }

    #[test]
    fn the_delay_must_fit_the_window() {
        let config = Config {
            delay_seconds: 10,
            retry_window_seconds: 5,
            ..Config::default()
        };
        assert!(Greylist::new(config).is_err());
        let config = Config {
            reply: "550 5.7.1 no".into(),
            ..Config::default()
        };
        assert!(Greylist::new(config).is_err(), "temporary replies only");
    }
}
