//! The `kv` interface (granted with "kv"): the queue's key-value store, scoped to the plugin and
//! the tenant whose chain it is in (`""` for the global chain), whatever mail it is deciding on:
//! tenant A's plugin never reaches tenant B's keys, even under the same name.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::kv;

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> Option<Vec<u8>> {
        let store = self.kv.clone()?;
        store
            .get(&self.plugin().owner, &self.plugin().name, &key)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(plugin = %self.plugin().name, %error, "kv get failed");
                None
            })
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_seconds: Option<u32>) {
        if let Some(store) = self.kv.clone() {
            if let Err(error) = store
                .set(
                    &self.plugin().owner,
                    &self.plugin().name,
                    &key,
                    &value,
                    ttl_seconds,
                )
                .await
            {
                tracing::warn!(plugin = %self.plugin().name, %error, "kv set failed");
            }
        }
    }

    async fn increment(&mut self, key: String, delta: i64, ttl_seconds: u32) -> i64 {
        let Some(store) = self.kv.clone() else {
            return 0;
        };
        store
            .increment(
                &self.plugin().owner,
                &self.plugin().name,
                &key,
                delta,
                ttl_seconds,
            )
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(plugin = %self.plugin().name, %error, "kv increment failed");
                0
            })
    }

    async fn delete(&mut self, key: String) {
        if let Some(store) = self.kv.clone() {
            if let Err(error) = store
                .delete(&self.plugin().owner, &self.plugin().name, &key)
                .await
            {
                tracing::warn!(plugin = %self.plugin().name, %error, "kv delete failed");
            }
        }
    }
}

/// Adds the `kv` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    kv::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
