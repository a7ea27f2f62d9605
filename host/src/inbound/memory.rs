//! Admission under memory pressure: a soft limit on the process's resident memory (`[smtp]
//! memory_limit`, by default 75 % of what it may use, as KumoMTA does), above which new sessions
//! get `421 4.3.2` instead of a greeting, so that a connection flood ends in polite refusals,
//! not in the kernel's OOM killer taking the process and every session with it. Sessions under
//! way go on. Admission comes back once the memory is a tenth below the limit again (so the
//! refusals do not flap around it), or once half the sessions open when the refusals began are
//! gone (see [`MemoryGuard::admits`]). While new sessions are refused, a session's new plugin
//! run (a transaction's instances, which take memory) waits for admission to come back, a few
//! seconds at most, and its transaction is deferred if it does not (see
//! [`MemoryGuard::runs_may_start`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the resident memory is read.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Whether new sessions are admitted, from the resident memory against the limit.
#[derive(Debug)]
pub struct MemoryGuard {
    limit: u64,
    pressed: AtomicBool,
    resident: AtomicU64,
    /// The sessions open when new ones were first refused in this spell (0: none refused).
    sessions_at_refusal: std::sync::atomic::AtomicUsize,
    /// Admission came back in this spell by the sessions' count, the memory still above the
    /// limit.
    readmitted: AtomicBool,
}

impl MemoryGuard {
    /// A guard at `limit` bytes, checked once now and then every 250 ms while the returned
    /// guard (or a clone of it) lives. Must run inside the tokio runtime.
    pub fn start(limit: u64) -> Arc<MemoryGuard> {
        let guard = Arc::new(MemoryGuard::new(limit));
        if let Some(resident) = resident_bytes() {
            guard.update(resident);
        }
        let watched = Arc::downgrade(&guard);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(guard) = watched.upgrade() else {
                    return;
                };
                if let Some(resident) = resident_bytes() {
                    guard.update(resident);
                }
            }
        });
        guard
    }

    fn new(limit: u64) -> MemoryGuard {
        MemoryGuard {
            limit,
            pressed: AtomicBool::new(false),
            resident: AtomicU64::new(0),
            sessions_at_refusal: std::sync::atomic::AtomicUsize::new(0),
            readmitted: AtomicBool::new(false),
        }
    }

    /// True while the resident memory is above the limit (and not yet a tenth below it).
    pub fn pressed(&self) -> bool {
        self.pressed.load(Ordering::Relaxed)
    }

    /// Whether a new session may start, with `sessions` open now. Above the limit it may not,
    /// until the sessions open when the refusals began are down to half: what stays resident
    /// after they are gone (the plugin pool's warm slots, the allocator's free lists) is not
    /// theirs, and refusing on until it is given back would refuse for good.
    pub fn admits(&self, sessions: usize) -> bool {
        if !self.pressed() {
            self.sessions_at_refusal.store(0, Ordering::Relaxed);
            return true;
        }
        let at_refusal = match self.sessions_at_refusal.load(Ordering::Relaxed) {
            0 => {
                let at_refusal = sessions.max(1);
                self.sessions_at_refusal
                    .store(at_refusal, Ordering::Relaxed);
                at_refusal
            }
            at_refusal => at_refusal,
        };
        let admitted = sessions * 2 < at_refusal;
        if admitted {
            self.readmitted.store(true, Ordering::Relaxed);
        }
        admitted
    }

    /// Whether a session's new plugin run may start: unless new sessions are being refused,
    /// by the same rule as [`MemoryGuard::admits`] (read, not counted as a refusal).
    pub fn runs_may_start(&self) -> bool {
        !self.pressed() || self.readmitted.load(Ordering::Relaxed)
    }

    /// Takes a reading of the resident memory; says so in the log when admission changes.
    fn update(&self, resident: u64) {
        self.resident.store(resident, Ordering::Relaxed);
        metrics::gauge!("switchyard_resident_bytes").set(resident as f64);
        let was = self.pressed();
        let now = if was {
            resident >= self.limit / 10 * 9
        } else {
            resident > self.limit
        };
        if now == was {
            return;
        }
        self.pressed.store(now, Ordering::Relaxed);
        self.readmitted.store(false, Ordering::Relaxed);
        metrics::gauge!("switchyard_memory_pressure").set(f64::from(u8::from(now)));
        if now {
            tracing::warn!(
                resident,
                limit = self.limit,
                "resident memory above [smtp] memory_limit: new sessions get 421 until it is a tenth below"
            );
        } else {
            tracing::info!(
                resident,
                limit = self.limit,
                "resident memory back below [smtp] memory_limit: new sessions admitted"
            );
        }
    }
}

/// The process's resident memory (`VmRSS`), if `/proc` tells it.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kibibytes(&status, "VmRSS:")
}

/// The memory this process may use: its cgroup's limit (v2 `memory.max`, else v1), or the
/// machine's, whichever is lower; `None` when neither can be read.
pub fn available_bytes() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| kibibytes(&meminfo, "MemTotal:"));
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    // "max", or a v1 "no limit" of nearly 2^63, parse to nothing or to more than the machine.
    .find_map(|text| text.trim().parse::<u64>().ok());
    match (machine, cgroup) {
        (Some(machine), Some(cgroup)) => Some(machine.min(cgroup)),
        (machine, cgroup) => machine.or(cgroup),
    }
}

/// The value of a `Name:   123 kB` line, in bytes.
fn kibibytes(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(name))?;
    let value: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    value.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_refused_above_the_limit_and_admitted_a_tenth_below_it() {
        let guard = MemoryGuard::new(1000);
        guard.update(900);
        assert!(!guard.pressed());
        guard.update(1001);
        assert!(guard.pressed(), "above the limit");
        guard.update(950);
        assert!(guard.pressed(), "not yet a tenth below: no flapping");
        guard.update(899);
        assert!(!guard.pressed(), "a tenth below: admitted again");
    }

    #[test]
    fn above_the_limit_sessions_are_admitted_again_once_half_of_those_open_are_gone() {
        let guard = MemoryGuard::new(1000);
        assert!(guard.runs_may_start());
        guard.update(2000);
        assert!(!guard.runs_may_start(), "plugin runs wait while refusing");
        assert!(!guard.admits(40), "refused, with 40 sessions open");
        assert!(!guard.admits(25));
        assert!(!guard.runs_may_start());
        assert!(
            guard.admits(19),
            "the sessions' memory is gone: what stays is not theirs"
        );
        assert!(guard.runs_may_start(), "runs start again with admission");
        guard.update(100);
        assert!(guard.admits(500), "below the limit");
        guard.update(2000);
        assert!(
            !guard.runs_may_start(),
            "a new spell of pressure waits again"
        );
    }

    #[test]
    fn proc_readings_are_bytes() {
        assert_eq!(
            kibibytes("Name:\tx\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2048 * 1024)
        );
        assert_eq!(kibibytes("VmRSS:\n", "VmRSS:"), None);
        let resident = resident_bytes().expect("this process's VmRSS");
        let available = available_bytes().expect("the machine's memory");
        assert!(resident > 0 && resident < available);
    }
}
