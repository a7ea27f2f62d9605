//! `[kv]`: the bounds of the plugins' key-value store.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::queue::kv::Quota;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    /// Keys each plugin of the global chain may hold (a tenant's plugins: `[tenants.limits]
    /// kv_keys`).
    pub max_keys: u64,
    /// Bytes (keys and values) each plugin of the global chain may hold.
    pub max_bytes: u64,
    /// How often expired keys are purged.
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
    /// Keys deleted per purge transaction: a purge of many keys is many short transactions,
    /// so it never holds the queue's write lock for long.
    pub purge_batch: u32,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            max_keys: 100_000,
            max_bytes: 64 * 1024 * 1024,
            purge_interval: Duration::from_secs(60),
            purge_batch: 1000,
        }
    }
}

impl KvConfig {
    /// The kv quota of each plugin of the global chain.
    pub fn quota(&self) -> Quota {
        Quota {
            keys: self.max_keys,
            bytes: self.max_bytes,
        }
    }
}
