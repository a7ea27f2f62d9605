//! The plugins' key-value store in the shared database: every node reads and counts the same
//! keys, so a rate limit holds across the cluster. Reads on the pool, writes through the
//! queue's writer.

use async_trait::async_trait;

use super::write::{WriteOp, WriteOutput};
use super::PgQueue;
use crate::queue::kv::{usage_of, KvEngine, KvWrite, KvWritten, Scope, Usage, USAGE_QUERY};
use crate::queue::{Millis, QueueError};

#[async_trait]
impl KvEngine for PgQueue {
    async fn read(
        &self,
        scope: Scope,
        key: &str,
        now: Millis,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let value = sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT value FROM kv WHERE tenant = $1 AND plugin = $2 AND key = $3
             AND (expires_at IS NULL OR expires_at > $4)",
        )
        .bind(scope.0)
        .bind(scope.1)
        .bind(key)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(value)
    }

    async fn write(&self, write: KvWrite) -> Result<KvWritten, QueueError> {
        match self.writer.submit(WriteOp::Kv(write)).await? {
            WriteOutput::Kv(written) => Ok(written),
            _ => Ok(KvWritten::Done),
        }
    }

    async fn read_usage(&self) -> Result<Vec<Usage>, QueueError> {
        let rows = sqlx::query_as(USAGE_QUERY).fetch_all(&self.pool).await?;
        Ok(usage_of(rows))
    }
}
