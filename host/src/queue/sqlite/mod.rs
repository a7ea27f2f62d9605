//! The embedded queue engine: one SQLite file in WAL mode, `synchronous=FULL` so that a commit is
//! on disk (fsync) before a 250 is sent. Reads go through a small pool of connections; every
//! write goes through one writer task that commits them in groups (`super::writer`, with the
//! operations in `write.rs`). The plugins' kv store shares the file (`kv.rs`).

mod kv;
mod policies;
mod schema;
pub mod traces;
mod write;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::Notify;

use super::rows::{
    meta_from_row, recipient_from_row, stats_from_row, StatsRow, MESSAGE_COLUMNS, RECIPIENT_COLUMNS,
};
use super::writer::Writer;
use super::{
    migrations, Millis, NewMessage, Queue, QueueError, QueueStats, QueuedMessage, RecipientResult,
    RecipientRow,
};
use write::{SqliteWriter, WriteOp, WriteOutput};

/// The SQLite queue. Cheap to clone.
#[derive(Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    writer: Writer<SqliteWriter>,
    /// Wakes this process's scanner when unleased work is queued (one process owns the file).
    work: Arc<Notify>,
}

impl SqliteQueue {
    /// Opens (creating if needed) the queue file and starts its writer.
    pub async fn open(path: &Path, commit_window: Duration) -> Result<SqliteQueue, QueueError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let mut connection = SqliteConnection::connect_with(&options).await?;
        schema::migrate(&mut connection).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let writer = Writer::spawn(vec![SqliteWriter::new(connection)], commit_window);
        Ok(SqliteQueue {
            pool,
            writer,
            work: Arc::new(Notify::new()),
        })
    }

    /// `PRAGMA synchronous` as the queue's connections have it (they are all opened with the
    /// write connection's options): 2 is FULL.
    #[cfg(test)]
    pub(crate) async fn synchronous(&self) -> Result<i64, QueueError> {
        Ok(sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn load_recipients(&self, id: &str) -> Result<Vec<RecipientRow>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ? ORDER BY idx"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(recipient_from_row).collect())
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn enqueue(
        &self,
        message: NewMessage,
        lease: Option<(String, Millis)>,
    ) -> Result<(), QueueError> {
        let unleased = lease.is_none();
        self.writer
            .submit(WriteOp::Enqueue { message, lease })
            .await?;
        if unleased {
            self.work.notify_one();
        }
        Ok(())
    }

    async fn claim_due(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<QueuedMessage>, QueueError> {
        let output = self
            .writer
            .submit(WriteOp::Claim {
                owner: owner.to_string(),
                now,
                lease_until,
                limit,
            })
            .await?;
        Ok(match output {
            WriteOutput::Claimed(messages) => messages,
            _ => Vec::new(),
        })
    }

    async fn queued_bytes(&self) -> Result<std::collections::HashMap<String, u64>, QueueError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT tenant, SUM(size) FROM messages WHERE tenant != '' GROUP BY tenant",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(tenant, bytes)| (tenant, bytes.max(0) as u64))
            .collect())
    }

    async fn content(&self, id: &str) -> Result<Option<Bytes>, QueueError> {
        let row = sqlx::query("SELECT content FROM messages WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| Bytes::from(row.get::<Vec<u8>, _>("content"))))
    }

    async fn record(
        &self,
        owner: &str,
        results: Vec<RecipientResult>,
        bounces: Vec<NewMessage>,
    ) -> Result<usize, QueueError> {
        let bounced = !bounces.is_empty();
        let output = self
            .writer
            .submit(WriteOp::Record {
                owner: owner.to_string(),
                results,
                bounces,
            })
            .await?;
        let stale = match output {
            WriteOutput::Recorded { stale } => stale,
            _ => 0,
        };
        if bounced && stale == 0 {
            self.work.notify_one();
        }
        Ok(stale)
    }

    async fn list(&self) -> Result<Vec<QueuedMessage>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages ORDER BY received_at"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let meta = meta_from_row(row);
            let recipients = self.load_recipients(&meta.id).await?;
            messages.push(QueuedMessage { meta, recipients });
        }
        Ok(messages)
    }

    async fn get(&self, id: &str) -> Result<Option<QueuedMessage>, QueueError> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => {
                let meta = meta_from_row(&row);
                let recipients = self.load_recipients(&meta.id).await?;
                Ok(Some(QueuedMessage { meta, recipients }))
            }
            None => Ok(None),
        }
    }

    async fn retry_now(&self, id: Option<&str>) -> Result<u64, QueueError> {
        let now = super::now_millis();
        let result = match id {
            Some(id) => {
                sqlx::query(
                    "UPDATE recipients SET next_attempt = ?, state = 0 WHERE state IN (0, 3) AND message_id = ?",
                )
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?
            }
            None => {
                sqlx::query("UPDATE recipients SET next_attempt = ?, state = 0 WHERE state IN (0, 3)")
                    .bind(now)
                    .execute(&self.pool)
                    .await?
            }
        };
        self.work.notify_one();
        Ok(result.rows_affected())
    }

    async fn hold(&self, id: Option<&str>, now: Millis) -> Result<(u64, u64), QueueError> {
        let mut transaction = self.pool.begin().await?;
        let held = sqlx::query(
            "UPDATE recipients SET state = 4
             WHERE state = 0 AND (?1 IS NULL OR message_id = ?1)
               AND (lease_until IS NULL OR lease_until < ?2)",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        let busy: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recipients
             WHERE state = 0 AND (?1 IS NULL OR message_id = ?1) AND lease_until >= ?2",
        )
        .bind(id)
        .bind(now)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok((held, busy.max(0) as u64))
    }

    async fn release(&self, id: Option<&str>) -> Result<u64, QueueError> {
        let released = sqlx::query(
            "UPDATE recipients SET state = 0, next_attempt = ?1
             WHERE state = 4 AND (?2 IS NULL OR message_id = ?2)",
        )
        .bind(super::now_millis())
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        self.work.notify_one();
        Ok(released)
    }

    async fn lease_message(
        &self,
        id: &str,
        owner: &str,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<(QueuedMessage, usize)>, QueueError> {
        // The write comes first: a deferred transaction that read first could not upgrade to a
        // writer once the server commits in between (SQLITE_BUSY_SNAPSHOT, which no busy timeout
        // waits out); writing first waits for the write lock like any other writer.
        let mut transaction = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "UPDATE recipients SET lease_owner = ?1, lease_until = ?2
             WHERE message_id = ?3 AND state IN (0, 3, 4) AND (lease_until IS NULL OR lease_until < ?4)
             RETURNING message_id, {RECIPIENT_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease_until)
        .bind(id)
        .bind(now)
        .fetch_all(&mut *transaction)
        .await?;
        let busy: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recipients
             WHERE message_id = ?1 AND state = 0 AND lease_owner IS NOT ?2 AND lease_until >= ?3",
        )
        .bind(id)
        .bind(owner)
        .bind(now)
        .fetch_one(&mut *transaction)
        .await?;
        let meta = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&mut *transaction)
        .await?;
        // No such message: dropping the transaction rolls back any lease taken on stray rows.
        let Some(meta) = meta else {
            return Ok(None);
        };
        transaction.commit().await?;
        let mut recipients: Vec<RecipientRow> = rows.iter().map(recipient_from_row).collect();
        recipients.sort_by_key(|recipient| recipient.index);
        let message = QueuedMessage {
            meta: meta_from_row(&meta),
            recipients,
        };
        Ok(Some((message, usize::try_from(busy).unwrap_or(usize::MAX))))
    }

    async fn delete(&self, id: &str) -> Result<bool, QueueError> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM recipients WHERE message_id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        let deleted = sqlx::query("DELETE FROM messages WHERE id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        transaction.commit().await?;
        Ok(deleted > 0)
    }

    async fn release_leases(&self, owner: &str) -> Result<u64, QueueError> {
        let result = sqlx::query(
            "UPDATE recipients SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn recover_leases(&self, _node_id: &str) -> Result<u64, QueueError> {
        // The file belongs to this process: whoever held a lease before it started is gone.
        let result = sqlx::query(
            "UPDATE recipients SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL",
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn renew_leases(
        &self,
        owner: &str,
        message_ids: &[String],
        until: Millis,
    ) -> Result<u64, QueueError> {
        // The ids as one JSON array: SQLite binds no arrays.
        let ids = serde_json::to_string(message_ids).unwrap_or_else(|_| "[]".to_string());
        let result = sqlx::query(
            "UPDATE recipients SET lease_until = ? WHERE lease_owner = ? AND state IN (0, 3, 4)
             AND message_id IN (SELECT value FROM json_each(?))",
        )
        .bind(until)
        .bind(owner)
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn work_arrived(&self) {
        self.work.notified().await;
    }

    async fn stats(&self, node_id: &str, now: Millis) -> Result<QueueStats, QueueError> {
        let row: StatsRow = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM messages),
                        COALESCE(SUM(state = 0), 0), COALESCE(SUM(state = 3), 0),
                        COALESCE(SUM(state = 0 AND lease_until >= ?2), 0),
                        COALESCE(SUM(state = 0 AND lease_until >= ?2 AND lease_owner = ?1), 0),
                        COALESCE(SUM(state = 4), 0)
                 FROM recipients",
        )
        .bind(node_id)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(stats_from_row(row))
    }

    async fn ping(&self) -> Result<(), QueueError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn commits(&self) -> u64 {
        self.writer.commits()
    }

    async fn schema_version(&self) -> Result<i64, QueueError> {
        Ok(sqlx::query_scalar(migrations::APPLIED_VERSION)
            .fetch_one(&self.pool)
            .await?)
    }
}
