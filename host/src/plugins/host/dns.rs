//! The `dns` interface (granted with "dns"): TXT and address lookups through the host's resolver.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::dns;

impl dns::Host for HostState {
    // A lookup waits for the network with the plugin's place in its tenant's CPU share given
    // up (see `HostState::off_cpu`).
    async fn txt(&mut self, name: String) -> Result<Vec<String>, String> {
        let Some(resolver) = self.resolver.clone() else {
            return Err("no resolver".to_string());
        };
        self.off_cpu(async { resolver.txt(&name).await }).await
    }

    async fn ip(&mut self, name: String) -> Result<Vec<String>, String> {
        let Some(resolver) = self.resolver.clone() else {
            return Err("no resolver".to_string());
        };
        self.off_cpu(async { resolver.ips(&name).await }).await
    }
}

/// Adds the `dns` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    dns::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
