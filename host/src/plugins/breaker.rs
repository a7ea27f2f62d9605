//! A plugin's circuit breaker. A plugin that keeps failing (a bug hit by every message, a
//! configuration that makes it loop) costs every transaction its full time limit before its
//! failure policy answers. After `failures` failures within `window` the circuit opens: the
//! plugin is not called and its failure policy answers at once, for `cooldown`. Then one call is
//! let through (half-open): a success closes the circuit, a failure opens it for another
//! cool-down. The breaker belongs to one loaded plugin, so a reload starts it closed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// What the breaker says of a call about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// The circuit is open (or its one trial call is under way): do not call.
    Skip,
}

/// A change of state the caller reports in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

/// The circuit's state, for `plugins list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Open for this long still.
    Open(Duration),
    HalfOpen,
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BreakerState::Closed => f.write_str("closed"),
            BreakerState::Open(left) => write!(f, "open({}s)", left.as_secs().max(1)),
            BreakerState::HalfOpen => f.write_str("half-open"),
        }
    }
}

pub struct Breaker {
    config: BreakerConfig,
    /// Read on every call without the lock: a closed circuit costs one atomic load.
    state: AtomicU8,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Failures within the window, oldest first.
    failures: VecDeque<Instant>,
    open_until: Option<Instant>,
    /// When the trial call of a half-open circuit was let through.
    trial_at: Option<Instant>,
    trips: u64,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            state: AtomicU8::new(CLOSED),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether to call the plugin now.
    pub fn admit(&self, now: Instant) -> Admission {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Admission::Call;
        }
        let mut inner = self.lock();
        match self.state.load(Ordering::Acquire) {
            CLOSED => Admission::Call,
            // One trial at a time; a trial that never reported (its transaction was dropped
            // mid-call) is given up after a cool-down, and another is let through.
            HALF_OPEN => match inner.trial_at {
                Some(at) if now.duration_since(at) < self.config.cooldown => Admission::Skip,
                _ => {
                    inner.trial_at = Some(now);
                    Admission::Call
                }
            },
            _ => match inner.open_until {
                Some(until) if now < until => Admission::Skip,
                // The cool-down is over: this call is the trial; the others wait for it.
                _ => {
                    self.state.store(HALF_OPEN, Ordering::Release);
                    inner.trial_at = Some(now);
                    Admission::Call
                }
            },
        }
    }

    /// A call succeeded. Only the trial's success closes an open circuit: a slow call admitted
    /// before the circuit opened does not cut the cool-down short.
    pub fn succeeded(&self) -> Option<Transition> {
        if self.state.load(Ordering::Acquire) != HALF_OPEN {
            return None;
        }
        let mut inner = self.lock();
        if self.state.load(Ordering::Acquire) != HALF_OPEN {
            return None;
        }
        inner.failures.clear();
        inner.open_until = None;
        inner.trial_at = None;
        self.state.store(CLOSED, Ordering::Release);
        Some(Transition::Closed)
    }

    /// A call failed (trap, timeout, memory overrun, failed `init`).
    pub fn failed(&self, now: Instant) -> Option<Transition> {
        if self.config.failures == 0 {
            return None;
        }
        let mut inner = self.lock();
        let window = self.config.window;
        while let Some(&oldest) = inner.failures.front() {
            if now.duration_since(oldest) > window {
                inner.failures.pop_front();
            } else {
                break;
            }
        }
        inner.failures.push_back(now);
        let trial_failed = self.state.load(Ordering::Acquire) == HALF_OPEN;
        let too_many = inner.failures.len() >= self.config.failures as usize;
        if !(trial_failed || too_many) || self.state.load(Ordering::Acquire) == OPEN {
            return None;
        }
        inner.open_until = Some(now + self.config.cooldown);
        inner.trial_at = None;
        inner.trips += 1;
        self.state.store(OPEN, Ordering::Release);
        Some(Transition::Opened)
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => match self.lock().open_until {
                Some(until) if now < until => BreakerState::Open(until - now),
                _ => BreakerState::HalfOpen,
            },
        }
    }

    /// Times the circuit opened.
    pub fn trips(&self) -> u64 {
        self.lock().trips
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failures,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
        })
    }

    #[test]
    fn opens_after_the_failures_of_one_window_then_lets_one_trial_through() {
        let breaker = breaker(3);
        let start = Instant::now();
        assert_eq!(breaker.failed(start), None);
        // A failure that has left the window does not count.
        let later = start + Duration::from_secs(11);
        assert_eq!(breaker.failed(later), None);
        assert_eq!(breaker.failed(later), None);
        assert_eq!(breaker.admit(later), Admission::Call);
        assert_eq!(breaker.failed(later), Some(Transition::Opened));
        assert_eq!(breaker.admit(later), Admission::Skip);
        assert!(matches!(breaker.state(later), BreakerState::Open(_)));
        // After the cool-down one call is the trial; others are skipped while it runs.
        let after = later + Duration::from_secs(6);
        assert_eq!(breaker.admit(after), Admission::Call);
        assert_eq!(breaker.admit(after), Admission::Skip);
        // A failed trial opens the circuit again at once.
        assert_eq!(breaker.failed(after), Some(Transition::Opened));
        assert_eq!(breaker.admit(after), Admission::Skip);
        let again = after + Duration::from_secs(6);
        assert_eq!(breaker.admit(again), Admission::Call);
        assert_eq!(breaker.succeeded(), Some(Transition::Closed));
        assert_eq!(breaker.state(again), BreakerState::Closed);
        assert_eq!(breaker.admit(again), Admission::Call);
        assert_eq!(breaker.trips(), 2);
        // The window starts empty after closing.
        assert_eq!(breaker.failed(again), None);
    }

    #[test]
    fn a_stale_success_does_not_close_and_a_lost_trial_is_replaced() {
        let breaker = breaker(1);
        let start = Instant::now();
        assert_eq!(breaker.failed(start), Some(Transition::Opened));
        // A call admitted before the circuit opened succeeds late: still open.
        assert_eq!(breaker.succeeded(), None);
        assert_eq!(breaker.admit(start), Admission::Skip);
        // The trial is let through, then never reports; after a cool-down another goes.
        let trial = start + Duration::from_secs(6);
        assert_eq!(breaker.admit(trial), Admission::Call);
        assert_eq!(
            breaker.admit(trial + Duration::from_secs(1)),
            Admission::Skip
        );
        assert_eq!(
            breaker.admit(trial + Duration::from_secs(6)),
            Admission::Call
        );
        assert_eq!(breaker.succeeded(), Some(Transition::Closed));
    }

    #[test]
    fn zero_failures_turns_it_off() {
        let breaker = breaker(0);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(breaker.failed(now), None);
        }
        assert_eq!(breaker.admit(now), Admission::Call);
    }
}
