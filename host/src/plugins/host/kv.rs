//! The `kv` interface (granted with "kv"): the queue's key-value store, scoped to the plugin and
//! the tenant whose chain it is in (`""` for the global chain), whatever mail it is deciding on:
//! tenant A's plugin never reaches tenant B's keys, even under the same name.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::kv;
use crate::queue::kv::Swap;

impl HostState {
    /// The current plugin's kv scope: the tenant whose chain it is in, and its name (a
    /// canary's is the live plugin's).
    fn kv_scope(&self) -> (std::sync::Arc<str>, std::sync::Arc<str>) {
        (self.plugin().owner.clone(), self.plugin().kv_name.clone())
    }
}

// Each call waits for the queue's database (a write, for its commit) with the plugin's place in
// its tenant's CPU share given up (see `HostState::off_cpu`).
impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> Option<Vec<u8>> {
        let store = self.kv.clone()?;
        let (owner, name) = self.kv_scope();
        let read = self
            .off_cpu(async { store.get(&owner, &name, &key).await })
            .await;
        read.unwrap_or_else(|error| {
            tracing::warn!(plugin = %name, %error, "kv get failed");
            None
        })
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_seconds: Option<u32>) {
        let Some(store) = self.kv.clone() else {
            return;
        };
        let (owner, name) = self.kv_scope();
        let written = self
            .off_cpu(async { store.set(&owner, &name, &key, &value, ttl_seconds).await })
            .await;
        if let Err(error) = written {
            tracing::warn!(plugin = %name, %error, "kv set failed");
        }
    }

    async fn increment(&mut self, key: String, delta: i64, ttl_seconds: u32) -> i64 {
        let Some(store) = self.kv.clone() else {
            return 0;
        };
        let (owner, name) = self.kv_scope();
        let counted = self
            .off_cpu(async {
                store
                    .increment(&owner, &name, &key, delta, ttl_seconds)
                    .await
            })
            .await;
        counted.unwrap_or_else(|error| {
            tracing::warn!(plugin = %name, %error, "kv increment failed");
            0
        })
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_seconds: Option<u32>,
    ) -> bool {
        let Some(store) = self.kv.clone() else {
            return false;
        };
        let (owner, name) = self.kv_scope();
        let swap = Swap {
            key: &key,
            expected: expected.as_deref(),
            value: &value,
            ttl_seconds,
        };
        let swapped = self
            .off_cpu(async { store.compare_and_swap(&owner, &name, swap).await })
            .await;
        swapped.unwrap_or_else(|error| {
            tracing::warn!(plugin = %name, %error, "kv compare-and-swap failed");
            false
        })
    }

    async fn delete(&mut self, key: String) {
        let Some(store) = self.kv.clone() else {
            return;
        };
        let (owner, name) = self.kv_scope();
        let deleted = self
            .off_cpu(async { store.delete(&owner, &name, &key).await })
            .await;
        if let Err(error) = deleted {
            tracing::warn!(plugin = %name, %error, "kv delete failed");
        }
    }
}

/// Adds the `kv` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    kv::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
