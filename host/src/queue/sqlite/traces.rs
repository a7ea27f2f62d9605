//! The SQLite engine's trace records, written straight through the pool in one transaction per
//! batch (the trace writer batches them; the queue's own writer stays for mail).

use async_trait::async_trait;

use super::SqliteQueue;
use crate::queue::rows::{trace_from_row, TRACE_COLUMNS};
use crate::queue::traces::{StoredBody, TraceQuery, TraceRecord, TraceStore};
use crate::queue::{Millis, QueueError};

#[async_trait]
impl TraceStore for SqliteQueue {
    async fn append_traces(&self, records: &[TraceRecord]) -> Result<(), QueueError> {
        let mut transaction = self.pool.begin().await?;
        for record in records {
            sqlx::query(
                "INSERT INTO traces (message_id, at, phase, client_ip, sender, body)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&record.message_id)
            .bind(record.at)
            .bind(&record.phase)
            .bind(&record.client_ip)
            .bind(&record.sender)
            .bind(StoredBody::of(record))
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn message_trace(&self, message_id: &str) -> Result<Vec<TraceRecord>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {TRACE_COLUMNS} FROM traces
             WHERE message_id = ? ORDER BY at, seq"
        ))
        .bind(message_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(trace_from_row).collect())
    }

    async fn refused_traces(&self, query: &TraceQuery) -> Result<Vec<TraceRecord>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {TRACE_COLUMNS} FROM traces
             WHERE message_id IS NULL
               AND (? IS NULL OR client_ip = ?)
               AND (? IS NULL OR sender = ?)
               AND at >= ? AND at <= ?
             ORDER BY at DESC, seq DESC LIMIT ?"
        ))
        .bind(&query.client_ip)
        .bind(&query.client_ip)
        .bind(&query.sender)
        .bind(&query.sender)
        .bind(query.since.unwrap_or(0))
        .bind(query.until.unwrap_or(Millis::MAX))
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(trace_from_row).collect())
    }

    async fn prune_traces(&self, before: Millis) -> Result<u64, QueueError> {
        let done = sqlx::query("DELETE FROM traces WHERE at < ?")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
