//! The PostgreSQL engine's trace records, written straight through the pool in one transaction per
//! batch (the trace writer batches them; the queue's writers stay for mail).

use async_trait::async_trait;

use super::PgQueue;
use crate::queue::rows::{trace_from_row, TRACE_COLUMNS};
use crate::queue::traces::{PendingTrace, TraceQuery, TraceRecord, TraceStore};
use crate::queue::{Millis, QueueError};

#[async_trait]
impl TraceStore for PgQueue {
    async fn append_traces(&self, records: &[PendingTrace]) -> Result<(), QueueError> {
        // One statement for the whole batch: arrays bound and unnested.
        let message_ids: Vec<Option<String>> =
            records.iter().map(|r| r.message_id.clone()).collect();
        let ats: Vec<Millis> = records.iter().map(|r| r.at).collect();
        let phases: Vec<&str> = records.iter().map(|r| r.phase).collect();
        let clients: Vec<String> = records.iter().map(|r| r.client_ip.clone()).collect();
        let senders: Vec<String> = records.iter().map(|r| r.sender.clone()).collect();
        let bodies: Vec<String> = records.iter().map(PendingTrace::body).collect();
        sqlx::query(
            "INSERT INTO traces (message_id, at, phase, client_ip, sender, body)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                                  $6::text[])",
        )
        .bind(message_ids)
        .bind(ats)
        .bind(phases)
        .bind(clients)
        .bind(senders)
        .bind(bodies)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn message_trace(&self, message_id: &str) -> Result<Vec<TraceRecord>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {TRACE_COLUMNS} FROM traces
             WHERE message_id = $1 ORDER BY at, seq"
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
               AND ($1::text IS NULL OR client_ip = $1)
               AND ($2::text IS NULL OR sender = $2)
               AND at >= $3 AND at <= $4
             ORDER BY at DESC, seq DESC LIMIT $5"
        ))
        .bind(&query.client_ip)
        .bind(&query.sender)
        .bind(query.since.unwrap_or(0))
        .bind(query.until.unwrap_or(Millis::MAX))
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(trace_from_row).collect())
    }

    async fn prune_traces(&self, before: Millis) -> Result<u64, QueueError> {
        let done = sqlx::query("DELETE FROM traces WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
