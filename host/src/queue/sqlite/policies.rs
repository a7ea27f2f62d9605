//! The SQLite engine's policy cache: one row per domain, written straight through the pool
//! (policies change rarely; the queue's writer is for the hot path).

use async_trait::async_trait;
use sqlx::Row;

use super::SqliteQueue;
use crate::queue::policies::{PolicyStore, StoredPolicy};
use crate::queue::QueueError;

#[async_trait]
impl PolicyStore for SqliteQueue {
    async fn sts_policy(&self, domain: &str) -> Result<Option<StoredPolicy>, QueueError> {
        let row = sqlx::query(
            "SELECT id, policy, fetched_at, expires_at FROM sts_policies WHERE domain = ?",
        )
        .bind(domain)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| StoredPolicy {
            id: row.get("id"),
            text: row.get("policy"),
            fetched_at: row.get("fetched_at"),
            expires_at: row.get("expires_at"),
        }))
    }

    async fn store_sts_policy(
        &self,
        domain: &str,
        policy: &StoredPolicy,
    ) -> Result<(), QueueError> {
        sqlx::query(
            "INSERT INTO sts_policies (domain, id, policy, fetched_at, expires_at)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (domain) DO UPDATE SET id = excluded.id, policy = excluded.policy,
               fetched_at = excluded.fetched_at, expires_at = excluded.expires_at",
        )
        .bind(domain)
        .bind(&policy.id)
        .bind(&policy.text)
        .bind(policy.fetched_at)
        .bind(policy.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
