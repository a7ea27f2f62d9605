//! `dnsbl`: DNS blocklists and allow-lists, asked through the host's resolver (grant `dns`),
//! scored as Postfix's postscreen does: each list that answers adds its weight (an allow-list
//! subtracts it), and a client whose score reaches `threshold` is refused with a reply that names
//! the lists.
//!
//! ```toml
//! [[plugin]]
//! name = "dnsbl"
//! path = "target/wasm32-wasip2/plugin/dnsbl.wasm"
//! grants = ["dns", "metrics"]
//! time_limit = "3s"             # room for the lists' lookups
//! failure_policy = "continue"   # a list that never answers makes the plugin fail: let mail in
//! [plugin.config]
//! threshold = 2
//! reply = "554 5.7.1 Service unavailable; listed by {lists} (client [{ip}])"
//! [[plugin.config.zones]]
//! zone = "zen.spamhaus.org"
//! weight = 2
//! answers = { "127.0.0.2" = 2, "127.0.0.4" = 2, "127.0.0.10" = 0 }   # the answer's meaning
//! [[plugin.config.zones]]
//! zone = "list.dnswl.org"
//! weight = 3
//! allow = true
//! [[plugin.config.zones]]
//! zone = "dbl.example.org"
//! kind = "domain"         # RHSBL: the HELO name and the sender's domain, not the address
//! weight = 2
//! ```
//!
//! Address lists (`kind = "ip"`, the default) are asked at connect: `d.c.b.a.ZONE` for IPv4,
//! the 32 reversed nibbles of the address for IPv6. Domain lists are asked at HELO (the name) and
//! at MAIL FROM (the sender's domain). Each stage scores its own lists against the threshold
//! (a session's later transactions start afresh, so nothing is carried from one to the next). An answer
//! counts when it is an A record in 127.0.0.0/8; with `answers`, only the listed addresses count,
//! each with its own weight; answers in 127.255.255.0/24 (the lists' "you may not query" and
//! "rate limited" codes) never count unless `answers` names them. A lookup that fails counts for
//! nothing: a broken list never refuses mail. A lookup waits for the host's resolver (its
//! `[dns] timeout` and attempts); when the plugin gets the answer past its `time_limit` it is
//! stopped there, and its failure policy answers: give it `failure_policy = "continue"`, as above.
//! IP literals are not looked up in domain lists. Each list that answers adds one to the counter `listed_ZONE` (grant
//! `metrics`, the zone's dots and dashes as `_`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use switchyard_plugin_sdk::host::{dns, metrics};
use switchyard_plugin_sdk::*;

#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The client's address.
    #[default]
    Ip,
    /// A domain: the HELO name, the sender's domain.
    Domain,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub zone: String,
    #[serde(default = "one")]
    pub weight: f64,
    /// What each answer means: its weight. Without it, any 127.0.0.0/8 answer has `weight`.
    #[serde(default)]
    pub answers: BTreeMap<String, f64>,
    /// An allow-list (DNSWL): its weight is subtracted.
    #[serde(default)]
    pub allow: bool,
    #[serde(default)]
    pub kind: Kind,
}

fn one() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub zones: Vec<Zone>,
    #[serde(default = "one")]
    pub threshold: f64,
    pub reply: Option<String>,
}

pub struct Dnsbl {
    zones: Vec<Zone>,
    threshold: f64,
    reply: Reply,
}

/// The name to look up for `ip` in `zone`: reversed octets, or reversed nibbles for IPv6.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{zone}")
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => query_name(IpAddr::V4(v4), zone),
            None => {
                let mut name = String::with_capacity(64 + zone.len());
                for byte in v6.octets().iter().rev() {
                    name.push_str(&format!("{:x}.{:x}.", byte & 0x0f, byte >> 4));
                }
                name.push_str(zone);
                name
            }
        },
    }
}

/// Whether a list's answer says "listed": an address in 127.0.0.0/8, except 127.255.255.0/24,
/// which lists use for errors (a public resolver refused, a query limit reached).
pub fn is_listing(answer: &str) -> bool {
    answer.starts_with("127.") && !answer.starts_with("127.255.255.")
}

/// A domain worth asking a domain list about: not an IP literal, bracketed or not.
fn is_domain(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('[') && name.parse::<IpAddr>().is_err()
}

/// The counter of a zone: letters, digits and `_`, at most 64 characters.
pub fn counter_name(zone: &str) -> String {
    let mut name: String = format!("listed_{zone}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    name.truncate(64);
    name
}

impl Dnsbl {
    /// The weight `zone` gives `name` (its answers looked up); 0 when not listed or the lookup
    /// failed.
    fn weight(zone: &Zone, name: &str) -> f64 {
        let Ok(answers) = dns::ip(name) else {
            return 0.0;
        };
        let weight = answers
            .iter()
            .map(|answer| match zone.answers.get(answer.as_str()) {
                Some(weight) => *weight,
                None if zone.answers.is_empty() && is_listing(answer) => zone.weight,
                None => 0.0,
            })
            .fold(0.0, f64::max);
        if weight != 0.0 {
            metrics::counter_add(&counter_name(&zone.zone), 1);
        }
        if zone.allow {
            -weight
        } else {
            weight
        }
    }

    /// Asks the lists of `kind` (each about `name_of(zone)`) and refuses when their score
    /// reaches the threshold.
    fn score(&self, kind: Kind, client: &str, name_of: impl Fn(&str) -> String) -> Verdict {
        let mut score = 0.0;
        let mut lists: Vec<&str> = Vec::new();
        for zone in self.zones.iter().filter(|zone| zone.kind == kind) {
            let weight = Self::weight(zone, &name_of(&zone.zone));
            score += weight;
            if weight > 0.0 {
                lists.push(&zone.zone);
            }
        }
        if !lists.is_empty() && score >= self.threshold {
            let text = self
                .reply
                .text
                .replace("{ip}", client)
                .replace("{lists}", &lists.join(", "));
            Verdict::reject(self.reply.code, &self.reply.enhanced, text)
        } else {
            Verdict::Continue
        }
    }
}

impl Plugin for Dnsbl {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::Connect, Hook::Helo, Hook::MailFrom];

    fn new(config: Config) -> Result<Self, String> {
        if config.zones.is_empty() {
            return Err("zones: at least one list is needed".to_string());
        }
        if config.threshold.is_nan() || config.threshold <= 0.0 {
            return Err(format!(
                "threshold must be above 0, not {}",
                config.threshold
            ));
        }
        for zone in &config.zones {
            if zone.zone.trim_end_matches('.').is_empty() || zone.weight < 0.0 {
                return Err(format!(
                    "zone `{}`: a zone name and a weight of 0 or more are needed",
                    zone.zone
                ));
            }
            if let Some(bad) = zone
                .answers
                .keys()
                .find(|answer| answer.parse::<IpAddr>().is_err())
            {
                return Err(format!(
                    "zone `{}`: answer `{bad}` is not an address",
                    zone.zone
                ));
            }
        }
        Ok(Dnsbl {
            zones: config.zones,
            threshold: config.threshold,
            reply: Reply::parse(
                config
                    .reply
                    .as_deref()
                    .unwrap_or("554 5.7.1 Service unavailable; listed by {lists} (client [{ip}])"),
                500..600,
            )?,
        })
    }

    fn connect(&self, session: &Session) -> Verdict {
        let client = session.client_ip();
        let Ok(ip) = client.parse::<IpAddr>() else {
            return Verdict::Continue;
        };
        self.score(Kind::Ip, &client, |zone| query_name(ip, zone))
    }

    fn helo(&self, session: &Session, name: &str) -> Verdict {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !is_domain(&name) {
            return Verdict::Continue;
        }
        self.score(Kind::Domain, &session.client_ip(), |zone| {
            format!("{name}.{zone}")
        })
    }

    fn mail_from(&self, session: &Session, sender: &str, _: &[Param]) -> AddressDecision {
        let Some((_, domain)) = sender.rsplit_once('@') else {
            return AddressDecision::next();
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_domain(&domain) {
            return AddressDecision::next();
        }
        match self.score(Kind::Domain, &session.client_ip(), |zone| {
            format!("{domain}.{zone}")
        }) {
            Verdict::Continue => AddressDecision::next(),
            refused => AddressDecision {
                verdict: refused,
                rewrite: None,
            },
        }
    }
}

export_plugin!(Dnsbl);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin_sdk::testing::Harness;

    #[test]
    fn names_are_reversed_octets_and_nibbles() {
        assert_eq!(
            query_name("192.0.2.99".parse().expect("ip"), "zen.example."),
            "99.2.0.192.zen.example"
        );
        assert_eq!(
            query_name("2001:db8::1".parse().expect("ip"), "zen.example"),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.example"
        );
        assert_eq!(
            counter_name("zen.spam-haus.org"),
            "listed_zen_spam_haus_org"
        );
        assert!(
            is_listing("127.0.0.2") && !is_listing("127.255.255.254") && !is_listing("10.0.0.1")
        );
        assert!(is_domain("example.org") && !is_domain("192.0.2.1") && !is_domain("[192.0.2.1]"));
    }

    const CONFIG: &str = r#"{
        "threshold": 2,
        "zones": [
            {"zone": "bl.test", "weight": 2, "answers": {"127.0.0.2": 2, "127.0.0.10": 0}},
            {"zone": "wl.test", "weight": 3, "allow": true},
            {"zone": "dbl.test", "kind": "domain", "weight": 2}
        ]
    }"#;

    fn answer(harness: &Harness<Dnsbl>, name: &str, answer: &str) {
        harness.host(|host| {
            host.dns.insert(
                ("ip".to_string(), name.to_string()),
                Ok(vec![answer.to_string()]),
            )
        });
    }

    #[test]
    fn a_listed_client_is_refused_naming_the_list() {
        let mut harness = Harness::<Dnsbl>::new(CONFIG).expect("config");
        harness.session.client_ip = "192.0.2.7".to_string();
        answer(&harness, "7.2.0.192.bl.test", "127.0.0.2");
        let verdict = harness.connect();
        assert!(
            matches!(&verdict, Verdict::Reject(reply) if reply.code == 554
                && reply.text == "Service unavailable; listed by bl.test (client [192.0.2.7])"),
            "{verdict:?}"
        );
        harness.host(|host| assert_eq!(host.counters["listed_bl_test"], 1));
    }

    #[test]
    fn an_allow_list_subtracts_and_answers_have_their_meaning() {
        let mut harness = Harness::<Dnsbl>::new(CONFIG).expect("config");
        harness.session.client_ip = "192.0.2.8".to_string();
        answer(&harness, "8.2.0.192.bl.test", "127.0.0.2");
        answer(&harness, "8.2.0.192.wl.test", "127.0.0.5");
        assert_eq!(harness.connect(), Verdict::Continue, "2 - 3 is below 2");

        let mut harness = Harness::<Dnsbl>::new(CONFIG).expect("config");
        harness.session.client_ip = "192.0.2.9".to_string();
        answer(&harness, "9.2.0.192.bl.test", "127.0.0.10");
        assert_eq!(
            harness.connect(),
            Verdict::Continue,
            "an answer that means nothing here"
        );
    }

    #[test]
    fn a_failed_lookup_counts_for_nothing() {
        let mut harness = Harness::<Dnsbl>::new(CONFIG).expect("config");
        harness.session.client_ip = "2001:db8::1".to_string();
        // No answer configured: the mock's lookup fails, as a timeout would.
        assert_eq!(harness.connect(), Verdict::Continue);
    }

    #[test]
    fn a_listed_sender_domain_is_refused_at_mail_from() {
        let harness = Harness::<Dnsbl>::new(CONFIG).expect("config");
        answer(&harness, "spammy.example.dbl.test", "127.0.1.2");
        assert_eq!(harness.connect(), Verdict::Continue);
        let decision = harness.mail_from("x@Spammy.Example");
        assert!(
            matches!(decision.verdict, Verdict::Reject(_)),
            "{decision:?}"
        );
        assert!(Harness::<Dnsbl>::new(r#"{"zones": []}"#).is_err());
    }
}
