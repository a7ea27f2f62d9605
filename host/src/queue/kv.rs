//! The kv port: the per-tenant, per-plugin key-value store plugins reach through the `kv`
//! import. Each queue engine keeps it in its own database, so it is as durable as the queue.

use async_trait::async_trait;

use super::QueueError;

#[async_trait]
pub trait KvStore: Send + Sync {
    async fn get(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, QueueError>;
    async fn set(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        value: &[u8],
        ttl_seconds: Option<u32>,
    ) -> Result<(), QueueError>;
    async fn increment(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        delta: i64,
        ttl_seconds: u32,
    ) -> Result<i64, QueueError>;
    async fn delete(&self, tenant: &str, plugin: &str, key: &str) -> Result<(), QueueError>;
}
