//! The SQLite engine's policy cache: one row per domain, written straight through the pool
//! (policies change rarely; the queue's writer is for the hot path).

use async_trait::async_trait;

use super::SqliteQueue;
use crate::queue::policies::{CountedOutcome, PolicyStore, StoredPolicy, TlsOutcome};
use crate::queue::rows::{counted_outcome_from_row, stored_policy_from_row, SELECT_TLS_OUTCOMES};
use crate::queue::{Millis, QueueError};

#[async_trait]
impl PolicyStore for SqliteQueue {
    async fn count_tls_outcome(&self, outcome: &TlsOutcome, at: Millis) -> Result<(), QueueError> {
        let query = sqlx::query(
            "INSERT INTO tls_outcomes (domain, policy_type, policy_text, mx_host, result,
                                       receiving_ip, reason, count, first_at, last_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
             ON CONFLICT (domain, policy_type, policy_text, mx_host, result, receiving_ip, reason)
             DO UPDATE SET count = count + 1, last_at = excluded.last_at",
        );
        bind_key(query, outcome)
            .bind(at)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn tls_outcomes(&self) -> Result<Vec<CountedOutcome>, QueueError> {
        let rows = sqlx::query(SELECT_TLS_OUTCOMES)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(counted_outcome_from_row).collect())
    }

    async fn forget_tls_outcomes(&self, reported: &[CountedOutcome]) -> Result<(), QueueError> {
        let mut transaction = self.pool.begin().await?;
        for counted in reported {
            let outcome = &counted.outcome;
            let query = sqlx::query(
                "UPDATE tls_outcomes SET count = count - ?
                 WHERE domain = ? AND policy_type = ? AND policy_text = ? AND mx_host = ?
                   AND result = ? AND receiving_ip = ? AND reason = ?",
            )
            .bind(counted.count);
            bind_key(query, outcome).execute(&mut *transaction).await?;
        }
        sqlx::query("DELETE FROM tls_outcomes WHERE count <= 0")
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn sts_policy(&self, domain: &str) -> Result<Option<StoredPolicy>, QueueError> {
        let row = sqlx::query(
            "SELECT id, policy, fetched_at, expires_at FROM sts_policies WHERE domain = ?",
        )
        .bind(domain)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(stored_policy_from_row))
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

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds the seven columns that tell one kind of TLS outcome from another, in table order.
fn bind_key<'q>(query: SqliteQuery<'q>, outcome: &'q TlsOutcome) -> SqliteQuery<'q> {
    query
        .bind(&outcome.domain)
        .bind(&outcome.policy_type)
        .bind(&outcome.policy_text)
        .bind(&outcome.mx_host)
        .bind(&outcome.result)
        .bind(&outcome.receiving_ip)
        .bind(&outcome.reason)
}
