//! The per-tenant, per-plugin key-value store plugins reach through the `kv` import, kept in the
//! queue's database.

use async_trait::async_trait;

use crate::queue::QueueError;

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
