//! The `bag` interface: the transaction-scoped store of small strings, one per plugin.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::bag;

/// Limits of the transaction bag.
const BAG_ENTRIES: usize = 64;
const BAG_ITEM: usize = 4096;

impl bag::Host for HostState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.plugin().bag.get(&key).cloned()
    }

    async fn set(&mut self, key: String, value: String) {
        if key.len() > BAG_ITEM || value.len() > BAG_ITEM {
            tracing::warn!(plugin = %self.plugin().name, "bag entry over {BAG_ITEM} bytes ignored");
            return;
        }
        let bag = &mut self.plugin_mut().bag;
        if bag.len() >= BAG_ENTRIES && !bag.contains_key(&key) {
            tracing::warn!(plugin = %self.plugin().name, "bag full ({BAG_ENTRIES} entries); entry ignored");
            return;
        }
        self.plugin_mut().bag.insert(key, value);
    }
}

/// Adds the `bag` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    bag::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
