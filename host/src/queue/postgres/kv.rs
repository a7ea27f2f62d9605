//! The plugins' key-value store in the shared database: every node reads and counts the same
//! keys, so a rate limit holds across the cluster.

use async_trait::async_trait;

use super::write::{WriteOp, WriteOutput};
use super::PgQueue;
use crate::queue::kv::KvStore;
use crate::queue::{now_millis, QueueError};

fn scope(tenant: &str, plugin: &str) -> (String, String) {
    (tenant.to_string(), plugin.to_string())
}

#[async_trait]
impl KvStore for PgQueue {
    async fn get(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let value = sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT value FROM kv WHERE tenant = $1 AND plugin = $2 AND key = $3
             AND (expires_at IS NULL OR expires_at > $4)",
        )
        .bind(tenant)
        .bind(plugin)
        .bind(key)
        .bind(now_millis())
        .fetch_optional(&self.pool)
        .await?;
        Ok(value)
    }

    async fn set(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        value: &[u8],
        ttl_seconds: Option<u32>,
    ) -> Result<(), QueueError> {
        let expires_at = ttl_seconds.map(|ttl| now_millis() + i64::from(ttl) * 1000);
        self.writer
            .submit(WriteOp::KvSet {
                scope: scope(tenant, plugin),
                key: key.to_string(),
                value: value.to_vec(),
                expires_at,
            })
            .await
            .map(|_| ())
    }

    async fn increment(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        delta: i64,
        ttl_seconds: u32,
    ) -> Result<i64, QueueError> {
        let now = now_millis();
        let output = self
            .writer
            .submit(WriteOp::KvIncrement {
                scope: scope(tenant, plugin),
                key: key.to_string(),
                delta,
                now,
                expires_at: now + i64::from(ttl_seconds) * 1000,
            })
            .await?;
        Ok(match output {
            WriteOutput::Counter(value) => value,
            WriteOutput::Done => 0,
        })
    }

    async fn delete(&self, tenant: &str, plugin: &str, key: &str) -> Result<(), QueueError> {
        self.writer
            .submit(WriteOp::KvDelete {
                scope: scope(tenant, plugin),
                key: key.to_string(),
            })
            .await
            .map(|_| ())
    }
}
