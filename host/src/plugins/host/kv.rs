//! The `kv` interface (granted with "kv"): the queue's key-value store, scoped to the plugin and
//! the tenant whose chain it is in (`""` for the global chain), whatever mail it is deciding on:
//! tenant A's plugin never reaches tenant B's keys, even under the same name.
//!
//! Every write is bounded: a key of at most [`MAX_KEY_BYTES`], a value of at most
//! [`MAX_VALUE_BYTES`], and the plugin's quota of keys and bytes (checked by the queue engine in
//! the write's transaction). The `try-` functions (0.2.2) tell the plugin why a write was refused;
//! the older ones cannot: `set` logs it, `compare-and-swap` answers false, and `increment` traps,
//! so a rate limit fails closed (its failure policy answers) instead of reading a count of 0.

use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::kv;
use crate::plugins::bindings::switchyard::plugin::kv::KvError;
use crate::queue::kv::Swap;
use crate::queue::QueueError;

/// The longest key, in bytes (the WIT promises it).
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value, in bytes (the WIT promises it).
pub const MAX_VALUE_BYTES: usize = 65536;

impl HostState {
    /// The current plugin's kv scope: the tenant whose chain it is in, and its name (a
    /// canary's is the live plugin's).
    fn kv_scope(&self) -> (std::sync::Arc<str>, std::sync::Arc<str>) {
        (self.plugin().owner.clone(), self.plugin().kv_name.clone())
    }
}

/// The key's and value's sizes checked against the bounds every write has.
fn within_bounds(key: &str, value: Option<&[u8]>) -> Result<(), KvError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::KeyTooLong(MAX_KEY_BYTES as u32));
    }
    if value.is_some_and(|value| value.len() > MAX_VALUE_BYTES) {
        return Err(KvError::ValueTooLarge(MAX_VALUE_BYTES as u32));
    }
    Ok(())
}

/// A store error as the plugin sees it.
fn kv_error(error: QueueError) -> KvError {
    match error {
        QueueError::OverQuota(why) => KvError::QuotaExceeded(why),
        other => KvError::Unavailable(other.to_string()),
    }
}

/// Words for the log.
fn describe(error: &KvError) -> String {
    match error {
        KvError::KeyTooLong(limit) => format!("key longer than {limit} bytes"),
        KvError::ValueTooLarge(limit) => format!("value larger than {limit} bytes"),
        KvError::QuotaExceeded(why) => format!("refused: {why}"),
        KvError::Unavailable(why) => format!("store unavailable: {why}"),
    }
}

impl HostState {
    async fn kv_set(
        &mut self,
        key: &str,
        value: &[u8],
        ttl_seconds: Option<u32>,
    ) -> Result<(), KvError> {
        within_bounds(key, Some(value))?;
        let Some(store) = self.kv.clone() else {
            return Err(KvError::Unavailable("no kv store".to_string()));
        };
        let (owner, name) = self.kv_scope();
        let quota = self.plugin().kv_quota;
        self.off_cpu(async {
            store
                .set(&owner, &name, key, value, ttl_seconds, quota)
                .await
        })
        .await
        .map_err(kv_error)
    }

    async fn kv_increment(
        &mut self,
        key: &str,
        delta: i64,
        ttl_seconds: u32,
    ) -> Result<i64, KvError> {
        within_bounds(key, None)?;
        let Some(store) = self.kv.clone() else {
            // Only tools run plugins without a store (`check-config` loading a plugin whose
            // `init` counts): they get 0, as before 0.2.2; a server always has its store.
            return Ok(0);
        };
        let (owner, name) = self.kv_scope();
        let quota = self.plugin().kv_quota;
        self.off_cpu(async {
            store
                .increment(&owner, &name, key, delta, ttl_seconds, quota)
                .await
        })
        .await
        .map_err(kv_error)
    }

    async fn kv_swap(
        &mut self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_seconds: Option<u32>,
    ) -> Result<bool, KvError> {
        within_bounds(key, Some(value))?;
        let Some(store) = self.kv.clone() else {
            return Err(KvError::Unavailable("no kv store".to_string()));
        };
        let (owner, name) = self.kv_scope();
        let swap = Swap {
            key,
            expected,
            value,
            ttl_seconds,
            quota: self.plugin().kv_quota,
        };
        self.off_cpu(async { store.compare_and_swap(&owner, &name, swap).await })
            .await
            .map_err(kv_error)
    }

    /// Logs a refused or failed write of the current plugin.
    fn kv_refused(&self, operation: &str, error: &KvError) {
        tracing::warn!(plugin = %self.plugin().name, tenant = %self.plugin().owner, operation, "kv write {}", describe(error));
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
        if let Err(error) = self.kv_set(&key, &value, ttl_seconds).await {
            self.kv_refused("set", &error);
        }
    }

    async fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_seconds: u32,
    ) -> wasmtime::Result<i64> {
        match self.kv_increment(&key, delta, ttl_seconds).await {
            Ok(value) => Ok(value),
            Err(error) => {
                self.kv_refused("increment", &error);
                // Fails closed: a trap, so the plugin's failure policy answers.
                Err(wasmtime::format_err!("kv increment {}", describe(&error)))
            }
        }
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_seconds: Option<u32>,
    ) -> bool {
        self.kv_swap(&key, expected.as_deref(), &value, ttl_seconds)
            .await
            .unwrap_or_else(|error| {
                self.kv_refused("compare-and-swap", &error);
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

    async fn try_set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_seconds: Option<u32>,
    ) -> Result<(), KvError> {
        let written = self.kv_set(&key, &value, ttl_seconds).await;
        if let Err(error) = &written {
            self.kv_refused("try-set", error);
        }
        written
    }

    async fn try_increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_seconds: u32,
    ) -> Result<i64, KvError> {
        let counted = self.kv_increment(&key, delta, ttl_seconds).await;
        if let Err(error) = &counted {
            self.kv_refused("try-increment", error);
        }
        counted
    }

    async fn try_compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_seconds: Option<u32>,
    ) -> Result<bool, KvError> {
        let swapped = self
            .kv_swap(&key, expected.as_deref(), &value, ttl_seconds)
            .await;
        if let Err(error) = &swapped {
            self.kv_refused("try-compare-and-swap", error);
        }
        swapped
    }
}

/// Adds the `kv` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    kv::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
