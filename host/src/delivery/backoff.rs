//! Automatic back-off: a destination that answers "slow down" in bulk (421s, or the replies its
//! rule names) has its rate cut by a factor, one step per bulk of such replies, never below a
//! floor; each step lasts a period, after which the rate comes back one step. Only replies the
//! destination itself sent count: this host's own temporary failures (a plugin's, a full disk,
//! a connection that could not be made) never slow a destination down.
//!
//! The rate that is cut is the rule's `rate`, or, for a destination without one, the rate it
//! was being sent at when the back-off began (measured over the rule's window).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::{Rate, ShapingConfig};
use crate::mail::reply::Reply;
use crate::mail::text::one_line;

/// The last triggering replies a back-off keeps, to say why it is in force.
const REASONS_KEPT: usize = 5;

/// A rule's back-off settings, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffRule {
    /// The replies that count: codes, enhanced statuses, or texts (lower case).
    pub on: Vec<String>,
    pub after: u32,
    pub window: Duration,
    pub factor: f64,
    pub floor: Rate,
    pub period: Duration,
    /// The rule's own rate: what a back-off cuts, as the rule says now (after a reload too).
    pub rate: Option<Rate>,
}

impl BackoffRule {
    /// The settings of `rule` (the defaults where it has none, or without a rule).
    pub fn of(rule: Option<&ShapingConfig>) -> BackoffRule {
        let floor = Rate {
            count: 10,
            per: Duration::from_secs(60),
        };
        BackoffRule {
            on: rule
                .and_then(|rule| rule.backoff_on.clone())
                .unwrap_or_else(|| vec!["421".to_string()])
                .into_iter()
                .map(|entry| entry.trim().to_ascii_lowercase())
                .collect(),
            after: rule.and_then(|rule| rule.backoff_after).unwrap_or(5),
            window: rule
                .and_then(|rule| rule.backoff_window)
                .unwrap_or(Duration::from_secs(60)),
            factor: rule.and_then(|rule| rule.backoff_factor).unwrap_or(0.5),
            floor: rule.and_then(|rule| rule.backoff_floor).unwrap_or(floor),
            period: rule
                .and_then(|rule| rule.backoff_period)
                .unwrap_or(Duration::from_secs(300)),
            rate: rule.and_then(|rule| rule.rate),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.on.is_empty()
    }

    /// Whether `reply` is one of the "slow down" replies: a temporary reply whose code,
    /// enhanced status or text one of the entries names.
    pub fn matches(&self, reply: &Reply) -> bool {
        if !(400..500).contains(&reply.code) {
            return false;
        }
        let code = reply.code.to_string();
        let text = reply.lines.join(" ").to_ascii_lowercase();
        self.on.iter().any(|entry| {
            if entry.len() == 3 && entry.bytes().all(|b| b.is_ascii_digit()) {
                *entry == code
            } else if is_enhanced(entry) {
                reply.enhanced == *entry || text.split_whitespace().any(|word| word == entry)
            } else {
                text.contains(entry.as_str())
            }
        })
    }

    fn floor_per_second(&self) -> f64 {
        per_second(self.floor)
    }
}

/// `4.7.28` and the like.
fn is_enhanced(entry: &str) -> bool {
    let parts: Vec<&str> = entry.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

pub fn per_second(rate: Rate) -> f64 {
    f64::from(rate.count) / rate.per.as_secs_f64()
}

/// A back-off in force.
#[derive(Debug, Clone)]
pub struct InForce {
    /// Steps cut: the rate is `base × factor^level`, at least the floor.
    pub level: u32,
    /// Messages per second before the cut.
    pub base: f64,
    /// When it began (wall clock, for people).
    pub began: SystemTime,
    /// When the current step began and ends: at its end the rate comes back one step.
    step_began: Instant,
    pub step_ends: Instant,
    /// The last replies that triggered it, oldest first, and how many did in all.
    pub reasons: VecDeque<String>,
    pub triggers: u64,
}

impl InForce {
    /// Messages per second allowed now: the rule's rate (or the rate sent at before, for a
    /// rule without one) cut `level` times, never below the floor, nor above what it cuts.
    pub fn rate(&self, rule: &BackoffRule) -> f64 {
        let base = rule.rate.map(per_second).unwrap_or(self.base);
        let level = i32::try_from(self.level).unwrap_or(i32::MAX);
        (base * rule.factor.powi(level)).max(rule.floor_per_second().min(base))
    }

    /// When the rate is back to what it was, if nothing triggers it again.
    pub fn ends(&self, rule: &BackoffRule) -> Instant {
        self.step_ends + rule.period * self.level.saturating_sub(1)
    }
}

/// Messages sent to a destination lately: two back-to-back buckets of one window each, the
/// older weighted by how much of it still falls in the window (no per-message memory).
#[derive(Debug, Default)]
struct Meter {
    bucket_began: Option<Instant>,
    current: u64,
    previous: u64,
}

impl Meter {
    fn count(&mut self, now: Instant, window: Duration) {
        self.roll(now, window);
        self.current += 1;
    }

    fn roll(&mut self, now: Instant, window: Duration) {
        let began = *self.bucket_began.get_or_insert(now);
        let elapsed = now.saturating_duration_since(began);
        if elapsed >= window * 2 {
            self.previous = 0;
            self.current = 0;
            self.bucket_began = Some(now);
        } else if elapsed >= window {
            self.previous = self.current;
            self.current = 0;
            self.bucket_began = Some(began + window);
        }
    }

    /// Messages per second over the last window.
    fn per_second(&mut self, now: Instant, window: Duration) -> f64 {
        self.roll(now, window);
        let Some(began) = self.bucket_began else {
            return 0.0;
        };
        let into = now.saturating_duration_since(began).as_secs_f64() / window.as_secs_f64();
        let counted = self.previous as f64 * (1.0 - into).max(0.0) + self.current as f64;
        counted / window.as_secs_f64()
    }

    fn idle(&mut self, now: Instant, window: Duration) -> bool {
        self.roll(now, window);
        self.current == 0 && self.previous == 0
    }
}

/// One destination's recent replies and sends, and its back-off.
#[derive(Debug, Default)]
pub struct Watch {
    /// When each "slow down" reply came that has not yet led to a step, within the window.
    hits: VecDeque<Instant>,
    /// The last "slow down" replies, oldest first: why a back-off began.
    recent: VecDeque<String>,
    sent: Meter,
    pub backoff: Option<InForce>,
}

/// What a reply did.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A back-off began, or went a step deeper, to this many messages per second.
    Cut {
        level: u32,
        rate: f64,
    },
    Nothing,
}

impl Watch {
    /// Counts a message sent.
    pub fn count_sent(&mut self, rule: &BackoffRule, now: Instant) {
        self.sent.count(now, rule.window);
    }

    /// Messages per second sent over the last window.
    pub fn sending_rate(&mut self, rule: &BackoffRule, now: Instant) -> f64 {
        self.sent.per_second(now, rule.window)
    }

    /// Counts a reply of the destination's under `rule`, whose configured rate is `configured`.
    pub fn reply(
        &mut self,
        rule: &BackoffRule,
        configured: Option<Rate>,
        reply: &Reply,
        now: Instant,
    ) -> Change {
        self.refresh(rule, now);
        if !rule.enabled() || !rule.matches(reply) {
            return Change::Nothing;
        }
        let text = one_line(&reply.to_string()).into_owned();
        if self.recent.len() == REASONS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(text);
        if let Some(backoff) = &mut self.backoff {
            backoff.triggers += 1;
            backoff.reasons = self.recent.clone();
        }
        self.hits.push_back(now);
        self.forget_old_hits(rule, now);
        if self.hits.len() < rule.after as usize {
            return Change::Nothing;
        }
        let hits = self.hits.len() as u64;
        self.hits.clear();
        let base = match (&self.backoff, configured) {
            (Some(backoff), _) => backoff.base,
            (None, Some(rate)) => per_second(rate),
            // Nothing measured (the replies came at connect): the floor is what it cuts to.
            (None, None) => Some(self.sent.per_second(now, rule.window))
                .filter(|rate| *rate > 0.0)
                .unwrap_or(rule.floor_per_second()),
        };
        let backoff = self.backoff.get_or_insert_with(|| InForce {
            level: 0,
            base,
            began: SystemTime::now(),
            step_began: now,
            step_ends: now,
            reasons: self.recent.clone(),
            triggers: hits,
        });
        // At the floor already: the step is renewed, not deepened.
        if backoff.rate(rule) > rule.floor_per_second() || backoff.level == 0 {
            backoff.level += 1;
        }
        backoff.step_began = now;
        backoff.step_ends = now + rule.period;
        Change::Cut {
            level: backoff.level,
            rate: backoff.rate(rule),
        }
    }

    /// Brings the back-off up to date: steps whose period is over are given back, and a rule
    /// changed at a reload applies (no back-off any more, or a shorter period).
    pub fn refresh(&mut self, rule: &BackoffRule, now: Instant) {
        let Some(backoff) = &mut self.backoff else {
            return;
        };
        if !rule.enabled() {
            self.backoff = None;
            self.hits.clear();
            return;
        }
        backoff.step_ends = backoff.step_ends.min(backoff.step_began + rule.period);
        while backoff.level > 0 && backoff.step_ends <= now {
            backoff.level -= 1;
            backoff.step_began = backoff.step_ends;
            backoff.step_ends += rule.period;
        }
        if backoff.level == 0 {
            self.backoff = None;
        }
    }

    /// Messages per second allowed by the back-off in force, if one is.
    pub fn rate(&self, rule: &BackoffRule) -> Option<f64> {
        self.backoff.as_ref().map(|backoff| backoff.rate(rule))
    }

    /// Ends the back-off in force at once (an operator's decision), and forgets the replies
    /// counted toward the next.
    pub fn cancel(&mut self) -> Option<InForce> {
        self.hits.clear();
        self.recent.clear();
        self.backoff.take()
    }

    fn forget_old_hits(&mut self, rule: &BackoffRule, now: Instant) {
        while self
            .hits
            .front()
            .is_some_and(|hit| now.saturating_duration_since(*hit) > rule.window)
        {
            self.hits.pop_front();
        }
    }

    /// Nothing worth keeping: no back-off, no replies counted, nothing sent lately.
    pub fn idle(&mut self, rule: &BackoffRule, now: Instant) -> bool {
        self.refresh(rule, now);
        self.forget_old_hits(rule, now);
        self.backoff.is_none() && self.hits.is_empty() && self.sent.idle(now, rule.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> BackoffRule {
        BackoffRule {
            on: vec!["421".into(), "4.7.28".into(), "try again later".into()],
            after: 2,
            window: Duration::from_secs(10),
            factor: 0.5,
            floor: Rate {
                count: 1,
                per: Duration::from_secs(1),
            },
            period: Duration::from_secs(60),
            rate: None,
        }
    }

    fn rate(count: u32) -> Option<Rate> {
        Some(Rate {
            count,
            per: Duration::from_secs(1),
        })
    }

    #[test]
    fn replies_match_by_code_enhanced_status_or_text_and_only_when_temporary() {
        let rule = rule();
        assert!(rule.matches(&Reply::new(421, "4.3.2", "busy")));
        assert!(rule.matches(&Reply::new(450, "4.7.28", "rate limited")));
        assert!(rule.matches(&Reply::plain(451, "4.7.28 our system has detected")));
        assert!(rule.matches(&Reply::new(451, "4.3.0", "Please Try Again Later")));
        assert!(!rule.matches(&Reply::new(451, "4.3.0", "mailbox busy")));
        assert!(
            !rule.matches(&Reply::new(550, "5.7.1", "try again later")),
            "a permanent reply never slows a destination"
        );
    }

    #[test]
    fn a_bulk_of_replies_cuts_the_rate_by_steps_to_the_floor_and_time_gives_it_back() {
        let rule = rule();
        let mut watch = Watch::default();
        let start = Instant::now();
        let busy = Reply::new(421, "4.3.2", "busy");
        assert_eq!(watch.reply(&rule, rate(16), &busy, start), Change::Nothing);
        let cut = watch.reply(&rule, rate(16), &busy, start);
        assert_eq!(
            cut,
            Change::Cut {
                level: 1,
                rate: 8.0
            }
        );
        watch.reply(&rule, rate(16), &busy, start);
        let deeper = watch.reply(&rule, rate(16), &busy, start);
        assert_eq!(
            deeper,
            Change::Cut {
                level: 2,
                rate: 4.0
            }
        );
        for _ in 0..10 {
            watch.reply(&rule, rate(16), &busy, start);
        }
        assert_eq!(watch.rate(&rule), Some(1.0), "never below the floor");
        let level = watch.backoff.as_ref().map(|b| b.level).unwrap_or_default();
        let reasons = watch.backoff.as_ref().map(|b| b.reasons.len());
        assert_eq!(reasons, Some(REASONS_KEPT));
        // Each period gives one step back.
        watch.refresh(&rule, start + rule.period);
        assert_eq!(watch.backoff.as_ref().map(|b| b.level), Some(level - 1));
        watch.refresh(&rule, start + rule.period * level);
        assert!(watch.backoff.is_none(), "restored in {level} periods");
    }

    #[test]
    fn spread_replies_do_not_trigger_and_a_cancel_or_a_reload_ends_a_back_off() {
        let rule = rule();
        let mut watch = Watch::default();
        let start = Instant::now();
        let busy = Reply::new(421, "4.3.2", "busy");
        watch.reply(&rule, None, &busy, start);
        let later = start + rule.window + Duration::from_secs(1);
        assert_eq!(watch.reply(&rule, None, &busy, later), Change::Nothing);
        watch.reply(&rule, rate(4), &busy, later);
        assert!(watch.backoff.is_some());
        assert!(watch.cancel().is_some());
        assert!(watch.rate(&rule).is_none());
        watch.reply(&rule, rate(4), &busy, later);
        watch.reply(&rule, rate(4), &busy, later);
        assert!(watch.backoff.is_some());
        let off = BackoffRule {
            on: Vec::new(),
            ..rule.clone()
        };
        watch.refresh(&off, later);
        assert!(watch.backoff.is_none(), "a rule without back-off ends it");
    }

    #[test]
    fn the_rule_as_it_is_now_bounds_the_cut_rate_and_the_floor_never_raises_it() {
        let mut rule = rule();
        rule.rate = rate(16);
        let mut watch = Watch::default();
        let now = Instant::now();
        let busy = Reply::new(421, "4.3.2", "busy");
        watch.reply(&rule, rule.rate, &busy, now);
        watch.reply(&rule, rule.rate, &busy, now);
        assert_eq!(watch.rate(&rule), Some(8.0));
        // A reload lowers the rule's rate: the back-off cuts that, not the old one.
        rule.rate = rate(4);
        assert_eq!(watch.rate(&rule), Some(2.0));
        // A rule slower than the floor is never sped up by its back-off.
        rule.rate = Some(Rate {
            count: 30,
            per: Duration::from_secs(60),
        });
        assert_eq!(watch.rate(&rule), Some(0.5));
    }

    #[test]
    fn old_replies_are_forgotten_so_an_idle_destination_can_be() {
        let rule = rule();
        let mut watch = Watch::default();
        let start = Instant::now();
        watch.reply(&rule, None, &Reply::new(421, "4.3.2", "busy"), start);
        assert!(!watch.idle(&rule, start), "a reply counted");
        let later = start + rule.window * 3;
        assert!(watch.idle(&rule, later), "the reply is out of the window");
    }

    #[test]
    fn without_a_configured_rate_the_rate_sent_at_is_cut() {
        let rule = rule();
        let mut watch = Watch::default();
        let start = Instant::now();
        for n in 0..100 {
            watch.count_sent(&rule, start + Duration::from_millis(n * 50));
        }
        let now = start + Duration::from_secs(5);
        let busy = Reply::new(421, "4.3.2", "busy");
        watch.reply(&rule, None, &busy, now);
        let Change::Cut { rate, .. } = watch.reply(&rule, None, &busy, now) else {
            panic!("no back-off");
        };
        // 100 messages in the last 10 s window: 10/s, halved.
        assert!((rate - 5.0).abs() < 0.01, "{rate}");
    }
}
