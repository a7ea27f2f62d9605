//! Traffic shaping: each destination's rule (`[[shaping]]`, on the `[delivery]` caps as
//! defaults), its pace and its back-off (`backoff.rs`). A rate is kept by handing out send
//! times one interval apart: the next message to a destination may go at the later of now and
//! the slot after the last one given, so a backlog drains at the rate, evenly, and messages
//! that wait do not bunch up. A back-off in force replaces the rule's rate with its cut one.
//!
//! The rules are swapped at a reload; destinations pick the new rule up with their next
//! message, and back-offs in force are measured against it from then on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::backoff::{per_second, BackoffRule, Change, InForce, Watch};
use super::route::NextHop;
use crate::config::{Config, Rate};
use crate::mail::reply::Reply;

/// Connections with nothing to send are closed at once unless a rule keeps them: a kept one
/// goes on to the host it was opened to, under the credentials and policies of then.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::ZERO;

/// Destinations kept in memory without a back-off or a recent message are forgotten past this.
const PACES_KEPT: usize = 10_000;

/// What applies to one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The `[[shaping]]` rule it came from, by name (its domain, or `mx:PATTERN`); `None`: the
    /// `[delivery]` defaults alone.
    pub source: Option<String>,
    /// The rule is for MX host names: every destination it applies to shares one pace and
    /// back-off, kept under the rule's name.
    pub site: bool,
    /// Destinations with the same MX hosts share one pace and back-off (`site:HOSTS`).
    pub by_mx_set: bool,
    pub connections: usize,
    pub messages_per_connection: usize,
    pub rate: Option<Rate>,
    /// How long, and how many, connections with nothing to send stay open (`idle.rs`).
    pub idle_timeout: Duration,
    pub idle_connections: usize,
    pub backoff: BackoffRule,
}

/// One destination's pace: its next send time and what its replies have been.
struct Pace {
    hop: NextHop,
    /// The `mx` rule whose site this is, by name (`None`: a destination of its own).
    site: Option<String>,
    next_slot: Option<Instant>,
    /// The next send time of each tenant held to a part of the rate.
    tenant_slots: HashMap<String, Instant>,
    /// How many times a back-off has cut the rate: a send time given before the last cut is
    /// not kept.
    cuts: u64,
    watch: Watch,
}

impl Pace {
    fn new(hop: &NextHop, rule: &Rule) -> Pace {
        Pace {
            hop: hop.clone(),
            site: rule.source.clone().filter(|_| rule.site),
            next_slot: None,
            tenant_slots: HashMap::new(),
            cuts: 0,
            watch: Watch::default(),
        }
    }

    /// Messages per second allowed now: the back-off's, else the rule's.
    fn allowed(&self, rule: &Rule) -> Option<f64> {
        self.watch.rate(&rule.backoff).or(rule.rate.map(per_second))
    }
}

/// A tenant held to a part of each destination's rate.
#[derive(Debug, Clone, Copy)]
pub struct TenantShare<'a> {
    pub tenant: &'a str,
    /// The part, above 0 and below 1.
    pub part: f64,
}

/// A destination's pace and back-off as the admin API shows them.
#[derive(Debug, Clone)]
pub struct PaceStatus {
    pub key: String,
    pub hop: NextHop,
    /// The rule that applies now.
    pub rule: Rule,
    /// Messages per second allowed now (the back-off's, else the rule's), if limited.
    pub allowed: Option<f64>,
    /// Messages per second sent over the back-off window.
    pub sending: f64,
    /// The next send time still to come, if one is.
    pub next_slot: Option<SystemTime>,
    pub backoff: Option<BackoffStatus>,
}

#[derive(Debug, Clone)]
pub struct BackoffStatus {
    pub level: u32,
    pub rate: f64,
    pub began: SystemTime,
    /// When the current step ends (one step back then).
    pub step_ends: SystemTime,
    /// When the rate is back in full, if nothing triggers it again.
    pub ends: SystemTime,
    pub triggers: u64,
    pub reasons: Vec<String>,
}

/// Every destination's rule, pace and back-off.
pub struct Shaper {
    config: ArcSwap<Config>,
    /// Bumped at each reload: destinations holding an older rule fetch theirs again.
    generation: AtomicU64,
    paces: Mutex<HashMap<String, Pace>>,
    /// The size of `paces` past which idle entries are swept.
    prune_at: std::sync::atomic::AtomicUsize,
}

impl Shaper {
    pub fn new(config: Arc<Config>) -> Shaper {
        Shaper {
            config: ArcSwap::new(config),
            generation: AtomicU64::new(0),
            paces: Mutex::new(HashMap::new()),
            prune_at: std::sync::atomic::AtomicUsize::new(PACES_KEPT),
        }
    }

    /// Takes the rules of a reloaded configuration.
    pub fn reload(&self, config: Arc<Config>) {
        self.config.store(config);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The rules' generation (see [`Shaper::reload`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn paces(&self) -> MutexGuard<'_, HashMap<String, Pace>> {
        self.paces
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The rule for `hop`: the most specific `[[shaping]]` whose domain matches its
    /// destination (an MX destination's domain; `*` alone for relays, LMTP and mailboxes),
    /// its unset values from `[delivery]`.
    pub fn rule_for(&self, hop: &NextHop) -> Rule {
        let config = self.config.load();
        let domain = match hop {
            NextHop::Mx { domain } => Some(domain.as_str()),
            _ => None,
        };
        let rule = best_domain_rule(&config, domain).map(|(_, rule)| rule);
        build_rule(&config, rule)
    }

    /// Whether any rule goes by MX hosts (`mx = ...`, `by_mx_set`): only then are an MX
    /// destination's hosts looked up before its pace is chosen.
    pub fn goes_by_mx(&self) -> bool {
        let config = self.config.load();
        config
            .shaping
            .iter()
            .any(|rule| rule.mx.is_some() || rule.by_mx_set)
    }

    /// The rule of an MX destination whose MX hosts are `hosts`, when an `mx` rule matches one
    /// of them and no rule names the domain itself (`*` aside: a provider's rule is more
    /// specific than the catch-all). `None`: [`Shaper::rule_for`] applies.
    pub fn rule_for_site(&self, hop: &NextHop, hosts: &[String]) -> Option<Rule> {
        let NextHop::Mx { domain } = hop else {
            return None;
        };
        let config = self.config.load();
        if best_domain_rule(&config, Some(domain)).is_some_and(|(rank, _)| rank.0 > 0) {
            return None;
        }
        let rule = config
            .shaping
            .iter()
            .filter_map(|rule| Some((rule.mx_rank(hosts)?, rule)))
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, rule)| rule)?;
        Some(build_rule(&config, Some(rule)))
    }

    /// The rule of a site as the configuration has it now (`None`: the rule is gone).
    fn rule_for_mx(&self, source: &str) -> Option<Rule> {
        let config = self.config.load();
        let rule = config.shaping.iter().find(|rule| rule.name() == source)?;
        Some(build_rule(&config, Some(rule)))
    }
}

/// The most specific rule naming `domain` (`None` for a relay, LMTP or mailbox destination:
/// only `*` names those), with its rank.
fn best_domain_rule<'a>(
    config: &'a Config,
    domain: Option<&str>,
) -> Option<((u8, usize), &'a crate::config::ShapingConfig)> {
    config
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
}

/// `rule` on the `[delivery]` caps as defaults (those alone without a rule).
fn build_rule(config: &Config, rule: Option<&crate::config::ShapingConfig>) -> Rule {
    let delivery = &config.delivery;
    Rule {
        source: rule.map(|rule| rule.name()),
        site: rule.is_some_and(|rule| rule.mx.is_some()),
        by_mx_set: rule.is_some_and(|rule| rule.by_mx_set),
        connections: rule
            .and_then(|rule| rule.connections)
            .unwrap_or(delivery.max_connections_per_destination),
        messages_per_connection: rule
            .and_then(|rule| rule.messages_per_connection)
            .unwrap_or(delivery.max_messages_per_connection),
        rate: rule.and_then(|rule| rule.rate),
        idle_timeout: rule
            .and_then(|rule| rule.idle_timeout)
            .unwrap_or(DEFAULT_IDLE_TIMEOUT),
        idle_connections: rule
            .and_then(|rule| rule.idle_connections.or(rule.connections))
            .unwrap_or(delivery.max_connections_per_destination),
        backoff: BackoffRule::of(rule),
    }
}

impl Shaper {
    /// Waits for the destination's next send time: under its back-off's rate while one is in
    /// force, else under `rule`'s rate (at once without one). A tenant held to a `share` of
    /// the rate first waits for its own next time, at that part of the rate; only then does
    /// it take the destination's, so a tenant waiting for its turn holds no one else up.
    pub async fn pace(
        &self,
        key: &str,
        hop: &NextHop,
        rule: &Rule,
        share: Option<TenantShare<'_>>,
    ) {
        if let Some(share) = share {
            if let Some(slot) = self.take_tenant_slot(key, hop, rule, share) {
                tokio::time::sleep_until(slot).await;
            }
        }
        let mut counted = false;
        // A send time given before a back-off cut the rate is not kept: the message waits for
        // one at the cut rate, as those reserved after the cut do.
        while let Some((slot, cuts)) = self.take_slot(key, hop, rule, !counted) {
            counted = true;
            tokio::time::sleep_until(slot).await;
            if self.cuts(key) == cuts {
                return;
            }
        }
    }

    /// How long from now until the next send time of `key` that is not yet given out.
    pub fn wait_ahead(&self, key: &str) -> Duration {
        let now = Instant::now();
        self.paces()
            .get(key)
            .and_then(|pace| pace.next_slot)
            .map(|next| next.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// How many times `key`'s rate has been cut so far.
    fn cuts(&self, key: &str) -> u64 {
        self.paces()
            .get(key)
            .map(|pace| pace.cuts)
            .unwrap_or_default()
    }

    /// The tenant's next send time at its part of the destination's rate; `None` when nothing
    /// limits the rate.
    fn take_tenant_slot(
        &self,
        key: &str,
        hop: &NextHop,
        rule: &Rule,
        share: TenantShare<'_>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let mut paces = self.paces();
        let pace = paces
            .entry(key.to_string())
            .or_insert_with(|| Pace::new(hop, rule));
        pace.watch.refresh(&rule.backoff, now);
        let allowed = pace.allowed(rule)? * share.part;
        let interval = Duration::from_secs_f64(1.0 / allowed.max(1e-6));
        let next = pace
            .tenant_slots
            .entry(share.tenant.to_string())
            .or_insert(now);
        let slot = (*next).max(now);
        *next = slot + interval;
        Some(slot)
    }

    /// `tenant`'s next send time to `key`, when it is still to come (a destination's workers
    /// take the tenant whose time comes first).
    pub fn tenant_next(&self, key: &str, tenant: &str) -> Option<Instant> {
        let now = Instant::now();
        self.paces()
            .get(key)
            .and_then(|pace| pace.tenant_slots.get(tenant).copied())
            .filter(|next| *next > now)
    }

    /// The send time given to the next message of `key`, one interval after the last, with
    /// the count of the rate's cuts it was given under; `None` when nothing limits the rate.
    /// Counts the message as sent when `count`.
    fn take_slot(
        &self,
        key: &str,
        hop: &NextHop,
        rule: &Rule,
        count: bool,
    ) -> Option<(Instant, u64)> {
        let now = Instant::now();
        let mut paces = self.paces();
        if paces.len() > self.prune_at.load(Ordering::Relaxed) {
            self.forget_idle(&mut paces, now);
            // Not again before the map has doubled: a sweep takes every entry, and what is in
            // use cannot be forgotten.
            self.prune_at
                .store((paces.len() * 2).max(PACES_KEPT), Ordering::Relaxed);
        }
        let pace = paces
            .entry(key.to_string())
            .or_insert_with(|| Pace::new(hop, rule));
        pace.watch.refresh(&rule.backoff, now);
        if count {
            pace.watch.count_sent(&rule.backoff, now);
        }
        let interval = match pace.watch.rate(&rule.backoff) {
            Some(cut) => Duration::from_secs_f64(1.0 / cut.max(1e-6)),
            None => rule.rate?.interval(),
        };
        let slot = pace.next_slot.unwrap_or(now).max(now);
        pace.next_slot = Some(slot + interval);
        Some((slot, pace.cuts))
    }

    /// Forgets the destinations with nothing in force and nothing sent lately.
    fn forget_idle(&self, paces: &mut HashMap<String, Pace>, now: Instant) {
        paces.retain(|_, pace| {
            let rule = self.rule_of(pace);
            pace.tenant_slots.retain(|_, next| *next > now);
            pace.next_slot.is_some_and(|next| next > now)
                || !pace.tenant_slots.is_empty()
                || !pace.watch.idle(&rule.backoff, now)
        });
    }

    /// Counts the destination's replies to one transaction (or to a connection attempt):
    /// the first "slow down" among them counts once. Only replies the destination sent may be
    /// passed here.
    pub fn observe(&self, key: &str, hop: &NextHop, rule: &Rule, replies: &[Reply]) {
        if !rule.backoff.enabled() {
            return;
        }
        let Some(reply) = replies.iter().find(|reply| rule.backoff.matches(reply)) else {
            return;
        };
        let now = Instant::now();
        let mut paces = self.paces();
        let pace = paces
            .entry(key.to_string())
            .or_insert_with(|| Pace::new(hop, rule));
        let change = pace.watch.reply(&rule.backoff, rule.rate, reply, now);
        if let Change::Cut { rate, .. } = change {
            // The send times given at the old rate are void (see `pace`): spacing starts again
            // one interval of the cut rate from now.
            pace.cuts += 1;
            pace.next_slot = Some(now + Duration::from_secs_f64(1.0 / rate.max(1e-6)));
        }
        drop(paces);
        if let Change::Cut { level, rate } = change {
            let rule_name = rule
                .source
                .clone()
                .unwrap_or_else(|| "[delivery]".to_string());
            metrics::counter!("switchyard_backoff_steps_total", "rule" => rule_name.clone())
                .increment(1);
            tracing::warn!(
                destination = %key,
                rule = %rule_name,
                level,
                rate = %format!("{rate:.3}/s"),
                period = ?rule.backoff.period,
                last_reply = %reply,
                "destination asks to slow down: rate cut"
            );
        }
    }

    /// The rule a pace goes by now: its site's, or its destination's.
    fn rule_of(&self, pace: &Pace) -> Rule {
        pace.site
            .as_deref()
            .and_then(|site| self.rule_for_mx(site))
            .unwrap_or_else(|| self.rule_for(&pace.hop))
    }

    /// Ends the back-off in force for `key` (an operator's decision); `None` when none was.
    pub fn cancel(&self, key: &str) -> Option<InForce> {
        let mut paces = self.paces();
        let cancelled = paces.get_mut(key)?.watch.cancel();
        if cancelled.is_some() {
            tracing::info!(destination = %key, "back-off cancelled by the operator");
        }
        cancelled
    }

    /// The pace and back-off of every destination kept (each brought up to date first).
    pub fn statuses(&self) -> Vec<PaceStatus> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let at = |instant: Instant| {
            let ahead = instant.saturating_duration_since(now);
            wall + ahead
        };
        let mut paces = self.paces();
        paces
            .iter_mut()
            .map(|(key, pace)| {
                let rule = self.rule_of(pace);
                pace.watch.refresh(&rule.backoff, now);
                let backoff = pace.watch.backoff.as_ref().map(|backoff| BackoffStatus {
                    level: backoff.level,
                    rate: backoff.rate(&rule.backoff),
                    began: backoff.began,
                    step_ends: at(backoff.step_ends),
                    ends: at(backoff.ends(&rule.backoff)),
                    triggers: backoff.triggers,
                    reasons: backoff.reasons.iter().cloned().collect(),
                });
                PaceStatus {
                    key: key.clone(),
                    hop: pace.hop.clone(),
                    rule: rule.clone(),
                    allowed: pace.allowed(&rule),
                    sending: pace.watch.sending_rate(&rule.backoff, now),
                    next_slot: pace.next_slot.filter(|next| *next > now).map(at),
                    backoff,
                }
            })
            .collect()
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
        let hop = NextHop::Mx {
            domain: "d.test".to_string(),
        };
        let rule = |count: u32| Rule {
            rate: Some(Rate {
                count,
                per: Duration::from_secs(1),
            }),
            ..shaper.rule_for(&hop)
        };
        let (tenth, quick) = (rule(10), rule(1000));
        let before = Instant::now();
        let first = shaper.take_slot("d", &hop, &tenth, true).expect("a slot").0;
        assert!(first >= before && first <= Instant::now());
        let gaps: Vec<Duration> = (1..4)
            .map(|_| shaper.take_slot("d", &hop, &tenth, true).expect("a slot").0 - first)
            .collect();
        assert_eq!(
            gaps,
            [100, 200, 300].map(Duration::from_millis),
            "a backlog is spread evenly"
        );
        // Another destination has its own pace.
        assert!(shaper.take_slot("e", &hop, &tenth, true).expect("a slot").0 <= Instant::now());
        // Once the slots given have passed, a message goes at once.
        shaper.take_slot("f", &hop, &quick, true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let at = Instant::now();
        let slot = shaper.take_slot("f", &hop, &quick, true).expect("a slot").0;
        assert!(
            slot >= at && slot <= Instant::now(),
            "an idle destination sends at once"
        );
    }
}
