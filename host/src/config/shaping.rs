//! `[[shaping]]`: how mail goes to a destination: connections at once, messages per connection,
//! and a rate. The `[delivery]` caps (`max_connections_per_destination`,
//! `max_messages_per_connection`) are the defaults every rule starts from.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A rate: `N/s`, `N/m` or `N/h` (messages per second, minute or hour).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The time between two messages at this rate.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

impl TryFrom<String> for Rate {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let invalid = || format!("rate `{text}`: write N/s, N/m or N/h with N above 0");
        let (count, unit) = text.trim().split_once('/').ok_or_else(invalid)?;
        let count: u32 = count.trim().parse().map_err(|_| invalid())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(invalid()),
        };
        if count == 0 {
            return Err(invalid());
        }
        Ok(Rate { count, per })
    }
}

impl From<Rate> for String {
    fn from(rate: Rate) -> String {
        let unit = match rate.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        format!("{}/{unit}", rate.count)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingConfig {
    /// The recipient domain the rule is for: `example.com`, `*.example.com` (the domain and its
    /// subdomains), or `*` (every destination). The most specific rule that matches applies.
    #[serde(default)]
    pub domain: String,
    /// Instead of `domain`: the MX host names the rule is for (`mx.example.net`, or
    /// `*.mail.protection.outlook.com`). Every recipient domain whose MX hosts it matches shares
    /// the rule's rate and back-off: the provider's, whatever domain the mail is for.
    pub mx: Option<String>,
    /// Connections open at once to the destination (default: `[delivery]
    /// max_connections_per_destination`).
    pub connections: Option<usize>,
    /// Messages sent over one connection before it is closed (default: `[delivery]
    /// max_messages_per_connection`).
    pub messages_per_connection: Option<usize>,
    /// Messages sent to the destination at most, spread evenly (one every `per / N`), so a
    /// backlog drains at the rate, not in bursts. None: as fast as the connections go.
    pub rate: Option<Rate>,
    /// Destinations this rule applies to whose MX hosts are the same set share one pace and
    /// back-off (`site:HOST,HOST`): the domains a provider hosts on the same servers count as
    /// one, without naming the provider (default false).
    #[serde(default)]
    pub by_mx_set: bool,
    /// How long a connection with nothing more to send stays open for the destination's next
    /// message (default `0s`: closed at once).
    #[serde(default, with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    /// Idle connections kept open at most for the destination (default: `connections`); idle
    /// and busy ones together never exceed `connections`.
    pub idle_connections: Option<usize>,
    /// The replies from the destination that count toward an automatic back-off: a reply code
    /// (`421`), an enhanced status (`4.7.28`), or a text found in the reply (any case). Only
    /// temporary (4xx) replies the destination itself sent count, never this host's own.
    /// Default `["421"]`; `[]` turns automatic back-off off for the rule.
    pub backoff_on: Option<Vec<String>>,
    /// How many such replies within `backoff_window` start a back-off, or cut a back-off in
    /// force one step further (default 5).
    pub backoff_after: Option<u32>,
    /// The window the replies are counted in (default 1 minute).
    #[serde(default, with = "humantime_serde::option")]
    pub backoff_window: Option<Duration>,
    /// Each step of a back-off multiplies the rate by this (default 0.5). The rate cut is the
    /// rule's `rate`, or without one the rate the destination was being sent at.
    pub backoff_factor: Option<f64>,
    /// The rate a back-off never cuts below (default `10/m`).
    pub backoff_floor: Option<Rate>,
    /// How long each step lasts: after it, the rate is restored one step (default 5 minutes).
    #[serde(default, with = "humantime_serde::option")]
    pub backoff_period: Option<Duration>,
}

impl ShapingConfig {
    /// The rule's name: its domain, or `mx:PATTERN`.
    pub fn name(&self) -> String {
        match &self.mx {
            Some(mx) => format!("mx:{}", mx.to_ascii_lowercase()),
            None => self.domain.clone(),
        }
    }

    /// What is wrong with this rule on its own, if anything.
    pub fn problem(&self) -> Option<String> {
        if let Some(mx) = &self.mx {
            let host = mx.trim_start_matches("*.");
            if !self.domain.is_empty() {
                return Some(format!(
                    "shaping: `domain = \"{}\"` and `mx = \"{mx}\"`: a rule is for one or the other",
                    self.name()
                ));
            }
            if host.is_empty() || !host.contains('.') || host.contains(['@', ' ', '*', '/']) {
                return Some(format!(
                    "shaping: mx `{mx}`: a host name or *.domain (`*.mail.protection.outlook.com`)"
                ));
            }
            return self.settings_problem();
        }
        if self.domain.is_empty() {
            return Some("shaping: every rule needs a `domain` or an `mx`".to_string());
        }
        let pattern = self.domain.trim_start_matches("*.");
        let valid =
            self.domain == "*" || (!pattern.is_empty() && !pattern.contains(['@', ' ', '*', '/']));
        if !valid {
            return Some(format!(
                "shaping: domain `{}`: a domain, *.domain or *",
                self.name()
            ));
        }
        self.settings_problem()
    }

    /// What is wrong with the rule's settings, whatever it matches.
    fn settings_problem(&self) -> Option<String> {
        if self.connections == Some(0) || self.messages_per_connection == Some(0) {
            return Some(format!(
                "shaping `{}`: connections and messages_per_connection must be above 0",
                self.name()
            ));
        }
        if let Some(factor) = self.backoff_factor {
            if !(factor > 0.0 && factor < 1.0) {
                return Some(format!(
                    "shaping `{}`: backoff_factor {factor} must be above 0 and below 1",
                    self.name()
                ));
            }
        }
        if self.backoff_after == Some(0)
            || self.backoff_window == Some(Duration::ZERO)
            || self.backoff_period == Some(Duration::ZERO)
        {
            return Some(format!(
                "shaping `{}`: backoff_after, backoff_window and backoff_period must be above 0",
                self.name()
            ));
        }
        if let Some(entry) = self
            .backoff_on
            .iter()
            .flatten()
            .find(|entry| entry.trim().is_empty() || entry.starts_with('5'))
        {
            return Some(format!(
                "shaping `{}`: backoff_on `{entry}`: give a 4xx code, an enhanced status or a \
                 reply text (a permanent 5xx reply never means \"slow down\")",
                self.name()
            ));
        }
        None
    }

    /// How well the rule matches `domain` (lower case, no trailing dot): `None` when it does
    /// not; a more specific match ranks higher.
    pub fn rank(&self, domain: &str) -> Option<(u8, usize)> {
        if self.mx.is_some() {
            return None;
        }
        let pattern = self.domain.to_ascii_lowercase();
        if pattern == "*" {
            return Some((0, 0));
        }
        match pattern.strip_prefix("*.") {
            Some(parent) if domain == parent || domain.ends_with(&format!(".{parent}")) => {
                Some((1, parent.len()))
            }
            Some(_) => None,
            None => (domain == pattern).then_some((2, pattern.len())),
        }
    }

    /// How well an `mx` rule matches a destination whose MX hosts are `hosts` (lower case, no
    /// trailing dot): `None` when it names none of them; a longer pattern ranks higher.
    pub fn mx_rank(&self, hosts: &[String]) -> Option<usize> {
        let pattern = self.mx.as_deref()?.to_ascii_lowercase();
        let matches = |host: &String| match pattern.strip_prefix("*.") {
            Some(parent) => host.ends_with(&format!(".{parent}")),
            None => *host == pattern,
        };
        hosts.iter().any(matches).then_some(pattern.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_counts_per_second_minute_or_hour() {
        let rate = Rate::try_from("10/s".to_string()).expect("rate");
        assert_eq!(rate.interval(), Duration::from_millis(100));
        let rate = Rate::try_from("120/m".to_string()).expect("rate");
        assert_eq!(rate.interval(), Duration::from_millis(500));
        assert_eq!(String::from(rate), "120/m");
        for bad in ["0/s", "10", "10/d", "x/s"] {
            assert!(Rate::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_most_specific_rule_ranks_first() {
        let rule = |domain: &str| ShapingConfig {
            domain: domain.to_string(),
            mx: None,
            by_mx_set: false,
            connections: None,
            messages_per_connection: None,
            rate: None,
            idle_timeout: None,
            idle_connections: None,
            backoff_on: None,
            backoff_after: None,
            backoff_window: None,
            backoff_factor: None,
            backoff_floor: None,
            backoff_period: None,
        };
        let exact = rule("mail.example.com");
        let wildcard = rule("*.example.com");
        let any = rule("*");
        assert!(exact.rank("mail.example.com") > wildcard.rank("mail.example.com"));
        assert!(wildcard.rank("mail.example.com") > any.rank("mail.example.com"));
        assert_eq!(exact.rank("example.org"), None);
        assert!(wildcard.rank("example.com").is_some());
        assert!(rule("a b").problem().is_some());
        let factor = ShapingConfig {
            backoff_factor: Some(1.5),
            ..rule("x.test")
        };
        assert!(factor
            .problem()
            .is_some_and(|p| p.contains("backoff_factor")));
        let permanent = ShapingConfig {
            backoff_on: Some(vec!["550".to_string()]),
            ..rule("x.test")
        };
        assert!(permanent.problem().is_some_and(|p| p.contains("5xx")));
        let provider = ShapingConfig {
            mx: Some("*.protection.outlook.com".to_string()),
            ..rule("")
        };
        assert_eq!(provider.problem(), None);
        assert_eq!(
            provider.rank("example.com"),
            None,
            "an mx rule matches no domain"
        );
        let hosts = ["example-com.mail.protection.outlook.com".to_string()];
        assert!(provider.mx_rank(&hosts).is_some());
        assert_eq!(provider.mx_rank(&["mx.example.com".to_string()]), None);
        let both = ShapingConfig {
            mx: Some("mx.example.net".to_string()),
            ..rule("example.com")
        };
        assert!(both
            .problem()
            .is_some_and(|p| p.contains("one or the other")));
    }
}
