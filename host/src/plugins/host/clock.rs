//! The `clock` interface (granted with "clock"): the current time.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::clock;

impl clock::Host for HostState {
    async fn now_millis(&mut self) -> u64 {
        // On replay, the time the step was recorded at: a plugin that compares dates decides
        // as it did then.
        if let Some(tape) = &self.tape {
            let tape = tape.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if tape.replaying {
                return tape.now.max(0) as u64;
            }
        }
        crate::queue::now_millis().max(0) as u64
    }
}

/// Adds the `clock` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    clock::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
