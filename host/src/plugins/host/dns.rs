//! The `dns` interface (granted with "dns"): TXT and address lookups through the host's resolver.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::dns;

impl dns::Host for HostState {
    async fn txt(&mut self, name: String) -> Result<Vec<String>, String> {
        match &self.resolver {
            Some(resolver) => resolver.txt(&name).await,
            None => Err("no resolver".to_string()),
        }
    }

    async fn ip(&mut self, name: String) -> Result<Vec<String>, String> {
        match &self.resolver {
            Some(resolver) => resolver.ips(&name).await,
            None => Err("no resolver".to_string()),
        }
    }
}

/// Adds the `dns` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    dns::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
