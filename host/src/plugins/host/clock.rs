//! Time, for plugins granted "clock": the `clock` interface, and WASI's clocks, which every
//! toolchain's runtime imports (componentize-py's reads them as it starts). A plugin granted
//! `clock` gets the real time from both; any other gets WASI clocks stopped at the Unix epoch
//! (wall clock 0) and at 0 (monotonic clock), so the time is not something it can learn without
//! the grant. On replay both give the time the step was recorded at, so a plugin that compares
//! dates decides as it did then.

use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::clock;
use crate::plugins::record::SharedTape;

/// Milliseconds since the Unix epoch: now, or on replay the recorded step's time.
fn now_millis(tape: Option<&SharedTape>) -> u64 {
    if let Some(tape) = tape {
        let tape = tape.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if tape.replaying {
            return tape.now.max(0) as u64;
        }
    }
    crate::queue::now_millis().max(0) as u64
}

impl clock::Host for HostState {
    async fn now_millis(&mut self) -> u64 {
        now_millis(self.tape.as_ref())
    }
}

/// Adds the `clock` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    clock::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}

/// WASI's context for the plugins of a run: with the real clocks when `granted`, else with the
/// stopped ones. Nothing preopened, no network, no environment.
pub(super) fn wasi_context(granted: bool, tape: Option<SharedTape>) -> WasiCtx {
    let mut builder = WasiCtxBuilder::new();
    if granted {
        builder
            .wall_clock(GrantedClock {
                tape: tape.clone(),
                started: Instant::now(),
            })
            .monotonic_clock(GrantedClock {
                tape,
                started: Instant::now(),
            });
    } else {
        builder
            .wall_clock(StoppedClock)
            .monotonic_clock(StoppedClock);
    }
    builder.build()
}

/// The real clocks, or the recorded time on replay.
struct GrantedClock {
    tape: Option<SharedTape>,
    /// The monotonic clock's zero.
    started: Instant,
}

impl GrantedClock {
    fn replayed(&self) -> Option<u64> {
        let tape = self.tape.as_ref()?;
        let tape = tape.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tape.replaying.then_some(tape.now.max(0) as u64)
    }
}

impl HostWallClock for GrantedClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        Duration::from_millis(now_millis(self.tape.as_ref()))
    }
}

impl HostMonotonicClock for GrantedClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }

    fn now(&self) -> u64 {
        match self.replayed() {
            Some(millis) => millis.saturating_mul(1_000_000),
            None => u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

/// The clocks of a plugin without the grant: always 0.
struct StoppedClock;

impl HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
    }
}
