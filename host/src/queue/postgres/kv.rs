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
        if let KvWrite::Purge { now, limit } = write {
            return self.purge(now, limit).await;
        }
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

impl PgQueue {
    /// One owner's expired keys at a time, in a transaction of its own: the owner's usage row
    /// first, then its rows in key order, as every writer locks them, so a purge never waits in
    /// a circle with a writer. Rows another node is writing are left for the next purge.
    async fn purge(&self, now: Millis, limit: u32) -> Result<KvWritten, QueueError> {
        let mut transaction = self.pool.begin().await?;
        // The owner is chosen by its usage row, skipping one a writer holds: a busy owner waits
        // for the next purge, and the others are purged meanwhile.
        let owner: Option<(String, String)> = sqlx::query_as(
            "SELECT tenant, plugin FROM kv_usage AS usage WHERE EXISTS (SELECT 1 FROM kv
               WHERE kv.tenant = usage.tenant AND kv.plugin = usage.plugin
                 AND kv.expires_at IS NOT NULL AND kv.expires_at <= $1)
             LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some((tenant, plugin)) = owner else {
            return Ok(KvWritten::Purged(0));
        };
        let purged = sqlx::query(
            "DELETE FROM kv WHERE ctid IN (SELECT ctid FROM kv
             WHERE tenant = $1 AND plugin = $2 AND expires_at IS NOT NULL AND expires_at <= $3
             ORDER BY key LIMIT $4 FOR UPDATE SKIP LOCKED)",
        )
        .bind(&tenant)
        .bind(&plugin)
        .bind(now)
        .bind(i64::from(limit))
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        transaction.commit().await?;
        Ok(KvWritten::Purged(purged))
    }
}
