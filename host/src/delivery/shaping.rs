//! Traffic shaping: each destination's rule (`[[shaping]]`, on the `[delivery]` caps as
//! defaults) and its pace. A rate is kept by handing out send times one interval apart: the
//! next message to a destination may go at the later of now and the slot after the last one
//! given, so a backlog drains at the rate, evenly, and messages that wait do not bunch up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::route::NextHop;
use crate::config::{Config, Rate};

/// What applies to one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The `[[shaping]]` domain it came from (`None`: the `[delivery]` defaults alone).
    pub source: Option<String>,
    pub connections: usize,
    pub messages_per_connection: usize,
    pub rate: Option<Rate>,
}

/// Every destination's rule and pace.
pub struct Shaper {
    config: Arc<Config>,
    /// The next free send time of each paced destination, by its key.
    next_slot: Mutex<HashMap<String, Instant>>,
}

impl Shaper {
    pub fn new(config: Arc<Config>) -> Shaper {
        Shaper {
            config,
            next_slot: Mutex::new(HashMap::new()),
        }
    }

    /// The rule for `hop`: the most specific `[[shaping]]` whose domain matches its
    /// destination (an MX destination's domain; `*` alone for relays, LMTP and mailboxes),
    /// its unset values from `[delivery]`.
    pub fn rule_for(&self, hop: &NextHop) -> Rule {
        let delivery = &self.config.delivery;
        let domain = match hop {
            NextHop::Mx { domain } => Some(domain.as_str()),
            _ => None,
        };
        let rule = self
            .config
            .shaping
            .iter()
            .filter_map(|rule| {
                let rank = match domain {
                    Some(domain) => rule.rank(domain)?,
                    None if rule.domain == "*" => (0, 0),
                    None => return None,
                };
                Some((rank, rule))
            })
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, rule)| rule);
        Rule {
            source: rule.map(|rule| rule.domain.clone()),
            connections: rule
                .and_then(|rule| rule.connections)
                .unwrap_or(delivery.max_connections_per_destination),
            messages_per_connection: rule
                .and_then(|rule| rule.messages_per_connection)
                .unwrap_or(delivery.max_messages_per_connection),
            rate: rule.and_then(|rule| rule.rate),
        }
    }

    /// Waits for the destination's next send time under `rule`'s rate (at once without one).
    pub async fn pace(&self, key: &str, rule: &Rule) {
        let Some(rate) = rule.rate else {
            return;
        };
        let slot = self.take_slot(key, rate.interval());
        tokio::time::sleep_until(slot).await;
    }

    /// The send time given to the next message of `key`, one `interval` after the last.
    fn take_slot(&self, key: &str, interval: Duration) -> Instant {
        let now = Instant::now();
        let mut slots = self
            .next_slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Forget destinations idle for a while: the map holds only those being paced.
        if slots.len() > 10_000 {
            slots.retain(|_, next| *next > now);
        }
        let next = slots.entry(key.to_string()).or_insert(now);
        let slot = (*next).max(now);
        *next = slot + interval;
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Arc<Config> {
        Arc::new(Config::parse(text, "t").expect("config"))
    }

    #[test]
    fn rules_match_by_domain_on_the_delivery_defaults() {
        let shaper = Shaper::new(config(
            "[delivery]\nmax_connections_per_destination = 7\n\n\
             [[shaping]]\ndomain = \"*.example.com\"\nrate = \"10/s\"\n\n\
             [[shaping]]\ndomain = \"big.example.com\"\nconnections = 2\n\n\
             [[shaping]]\ndomain = \"*\"\nmessages_per_connection = 5\n",
        ));
        let mx = |domain: &str| NextHop::Mx {
            domain: domain.to_string(),
        };
        let big = shaper.rule_for(&mx("big.example.com"));
        assert_eq!(
            (big.connections, big.rate),
            (2, None),
            "the exact rule alone"
        );
        let other = shaper.rule_for(&mx("x.example.com"));
        assert_eq!(other.connections, 7);
        assert_eq!(
            other.rate.map(|rate| rate.interval()),
            Some(Duration::from_millis(100))
        );
        let elsewhere = shaper.rule_for(&mx("example.org"));
        assert_eq!(elsewhere.messages_per_connection, 5);
        assert_eq!(elsewhere.source.as_deref(), Some("*"));
    }

    #[tokio::test]
    async fn slots_are_one_interval_apart_and_never_in_the_past() {
        let shaper = Shaper::new(config(""));
        let interval = Duration::from_millis(100);
        let before = Instant::now();
        let first = shaper.take_slot("d", interval);
        assert!(first >= before && first <= Instant::now());
        let gaps: Vec<Duration> = (1..4)
            .map(|_| shaper.take_slot("d", interval) - first)
            .collect();
        assert_eq!(
            gaps,
            [100, 200, 300].map(Duration::from_millis),
            "a backlog is spread evenly"
        );
        // Another destination has its own pace.
        assert!(shaper.take_slot("e", interval) <= Instant::now());
        // Once the slots given have passed, a message goes at once.
        let quick = Duration::from_millis(1);
        shaper.take_slot("f", quick);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let at = Instant::now();
        let slot = shaper.take_slot("f", quick);
        assert!(
            slot >= at && slot <= Instant::now(),
            "an idle destination sends at once"
        );
    }
}
