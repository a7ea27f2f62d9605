//! The embedded queue engine: one SQLite file in WAL mode, `synchronous=FULL` so that a commit is
//! on disk (fsync) before a 250 is sent, with writes grouped by [`super::writer`].

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};

use super::writer::{Apply, Writer};
use super::{
    MessageMeta, Millis, NewMessage, Outcome, Queue, QueueError, QueuedMessage, RecipientResult,
    RecipientRow, RecipientState,
};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS messages (
        id TEXT PRIMARY KEY,
        sender TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        size INTEGER NOT NULL,
        smtputf8 INTEGER NOT NULL,
        eight_bit INTEGER NOT NULL,
        content BLOB NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS recipients (
        message_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        address TEXT NOT NULL,
        state INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt INTEGER NOT NULL,
        last_reply TEXT,
        lease_owner TEXT,
        lease_until INTEGER,
        PRIMARY KEY (message_id, idx)
    )",
    "CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, next_attempt)",
    "CREATE TABLE IF NOT EXISTS kv (
        tenant TEXT NOT NULL,
        plugin TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        expires_at INTEGER,
        PRIMARY KEY (tenant, plugin, key)
    )",
];

/// The SQLite queue. Cheap to clone.
#[derive(Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    writer: Writer<SqliteWriter>,
}

impl SqliteQueue {
    /// Opens (creating if needed) the queue file and starts its writer.
    pub async fn open(path: &Path, commit_window: Duration) -> Result<SqliteQueue, QueueError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|error| QueueError::Database(sqlx::Error::Io(error)))?;
            }
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let mut connection = SqliteConnection::connect_with(&options).await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&mut connection).await?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let writer = Writer::spawn(SqliteWriter { connection }, commit_window);
        Ok(SqliteQueue { pool, writer })
    }

    async fn load_recipients(&self, id: &str) -> Result<Vec<RecipientRow>, QueueError> {
        let rows = sqlx::query(
            "SELECT idx, address, state, attempts, next_attempt, last_reply FROM recipients
             WHERE message_id = ? ORDER BY idx",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(recipient_from_row).collect())
    }
}

fn recipient_from_row(row: &sqlx::sqlite::SqliteRow) -> RecipientRow {
    RecipientRow {
        index: row.get("idx"),
        address: row.get("address"),
        state: RecipientState::from_i64(row.get("state")),
        attempts: row.get("attempts"),
        next_attempt: row.get("next_attempt"),
        last_reply: row.get("last_reply"),
    }
}

fn meta_from_row(row: &sqlx::sqlite::SqliteRow) -> MessageMeta {
    MessageMeta {
        id: row.get("id"),
        sender: row.get("sender"),
        received_at: row.get("received_at"),
        size: row.get::<i64, _>("size").max(0) as u64,
        smtputf8: row.get::<i64, _>("smtputf8") != 0,
        eight_bit: row.get::<i64, _>("eight_bit") != 0,
    }
}

/// Write operations, applied by the writer task.
pub(crate) enum WriteOp {
    Enqueue {
        message: NewMessage,
        lease: Option<(String, Millis)>,
    },
    Record {
        results: Vec<RecipientResult>,
        bounces: Vec<NewMessage>,
    },
    Claim {
        owner: String,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    },
    KvSet {
        scope: (String, String),
        key: String,
        value: Vec<u8>,
        expires_at: Option<Millis>,
    },
    KvIncrement {
        scope: (String, String),
        key: String,
        delta: i64,
        now: Millis,
        expires_at: Millis,
    },
    KvDelete {
        scope: (String, String),
        key: String,
    },
}

pub(crate) struct SqliteWriter {
    connection: SqliteConnection,
}

impl SqliteWriter {
    async fn insert(
        &mut self,
        message: &NewMessage,
        lease: Option<&(String, Millis)>,
    ) -> Result<(), QueueError> {
        let meta = &message.meta;
        sqlx::query(
            "INSERT INTO messages (id, sender, received_at, size, smtputf8, eight_bit, content)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&meta.id)
        .bind(&meta.sender)
        .bind(meta.received_at)
        .bind(meta.size as i64)
        .bind(meta.smtputf8 as i64)
        .bind(meta.eight_bit as i64)
        .bind(message.content.as_ref())
        .execute(&mut self.connection)
        .await?;
        let state = if message.quarantine.is_some() {
            RecipientState::Quarantined.as_i64()
        } else {
            RecipientState::Queued.as_i64()
        };
        for (index, address) in message.recipients.iter().enumerate() {
            sqlx::query(
                "INSERT INTO recipients (message_id, idx, address, state, attempts, next_attempt, last_reply, lease_owner, lease_until)
                 VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
            )
            .bind(&meta.id)
            .bind(index as i64)
            .bind(address)
            .bind(state)
            .bind(meta.received_at)
            .bind(message.quarantine.as_deref())
            .bind(lease.map(|(owner, _)| owner.as_str()))
            .bind(lease.map(|(_, until)| *until))
            .execute(&mut self.connection)
            .await?;
        }
        Ok(())
    }

    async fn record(
        &mut self,
        results: &[RecipientResult],
        bounces: &[NewMessage],
    ) -> Result<(), QueueError> {
        let mut touched: Vec<&str> = Vec::new();
        for result in results {
            let (state, next_attempt) = match result.outcome {
                Outcome::Delivered => (RecipientState::Delivered, None),
                Outcome::Deferred { next_attempt } => (RecipientState::Queued, Some(next_attempt)),
                Outcome::Failed => (RecipientState::Failed, None),
            };
            sqlx::query(
                "UPDATE recipients SET state = ?, attempts = ?, next_attempt = COALESCE(?, next_attempt),
                 last_reply = ?, lease_owner = NULL, lease_until = NULL
                 WHERE message_id = ? AND idx = ?",
            )
            .bind(state.as_i64())
            .bind(result.attempts)
            .bind(next_attempt)
            .bind(&result.reply)
            .bind(&result.message_id)
            .bind(result.index)
            .execute(&mut self.connection)
            .await?;
            if !touched.contains(&result.message_id.as_str()) {
                touched.push(&result.message_id);
            }
        }
        for id in touched {
            sqlx::query(
                "DELETE FROM recipients WHERE message_id = ?1
                 AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1 AND state IN (0, 3))",
            )
            .bind(id)
            .execute(&mut self.connection)
            .await?;
            sqlx::query("DELETE FROM messages WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1)")
                .bind(id)
                .execute(&mut self.connection)
                .await?;
        }
        for bounce in bounces {
            self.insert(bounce, None).await?;
        }
        Ok(())
    }

    /// The plugins' key-value operations.
    async fn apply_kv(&mut self, op: &WriteOp) -> Result<WriteOutput, QueueError> {
        match op {
            WriteOp::KvSet {
                scope,
                key,
                value,
                expires_at,
            } => {
                sqlx::query(
                    "INSERT INTO kv (tenant, plugin, key, value, expires_at) VALUES (?, ?, ?, ?, ?)
                     ON CONFLICT (tenant, plugin, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                )
                .bind(&scope.0)
                .bind(&scope.1)
                .bind(key)
                .bind(value)
                .bind(expires_at)
                .execute(&mut self.connection)
                .await?;
                Ok(WriteOutput::Done)
            }
            WriteOp::KvIncrement {
                scope,
                key,
                delta,
                now,
                expires_at,
            } => {
                // Counters are stored as decimal text; an expired one starts again from zero.
                let value: i64 = sqlx::query_scalar(
                    "INSERT INTO kv (tenant, plugin, key, value, expires_at) VALUES (?1, ?2, ?3, CAST(?4 AS TEXT), ?5)
                     ON CONFLICT (tenant, plugin, key) DO UPDATE SET
                       value = CASE WHEN kv.expires_at IS NOT NULL AND kv.expires_at <= ?6
                                    THEN CAST(?4 AS TEXT)
                                    ELSE CAST(CAST(CAST(kv.value AS TEXT) AS INTEGER) + ?4 AS TEXT) END,
                       expires_at = CASE WHEN kv.expires_at IS NOT NULL AND kv.expires_at <= ?6
                                    THEN ?5 ELSE kv.expires_at END
                     RETURNING CAST(CAST(value AS TEXT) AS INTEGER)",
                )
                .bind(&scope.0)
                .bind(&scope.1)
                .bind(key)
                .bind(delta)
                .bind(expires_at)
                .bind(now)
                .fetch_one(&mut self.connection)
                .await?;
                Ok(WriteOutput::Counter(value))
            }
            WriteOp::KvDelete { scope, key } => {
                sqlx::query("DELETE FROM kv WHERE tenant = ? AND plugin = ? AND key = ?")
                    .bind(&scope.0)
                    .bind(&scope.1)
                    .bind(key)
                    .execute(&mut self.connection)
                    .await?;
                Ok(WriteOutput::Done)
            }
            _ => Ok(WriteOutput::Done),
        }
    }

    async fn claim(
        &mut self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<QueuedMessage>, QueueError> {
        let rows = sqlx::query(
            "UPDATE recipients SET lease_owner = ?1, lease_until = ?2
             WHERE state = 0 AND next_attempt <= ?3 AND (lease_until IS NULL OR lease_until < ?3)
               AND message_id IN (
                 SELECT message_id FROM recipients
                 WHERE state = 0 AND next_attempt <= ?3 AND (lease_until IS NULL OR lease_until < ?3)
                 GROUP BY message_id ORDER BY MIN(next_attempt) LIMIT ?4)
             RETURNING message_id, idx, address, state, attempts, next_attempt, last_reply",
        )
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut self.connection)
        .await?;
        let mut grouped: BTreeMap<String, Vec<RecipientRow>> = BTreeMap::new();
        for row in &rows {
            grouped
                .entry(row.get("message_id"))
                .or_default()
                .push(recipient_from_row(row));
        }
        let mut claimed = Vec::with_capacity(grouped.len());
        for (id, mut recipients) in grouped {
            let meta = sqlx::query("SELECT id, sender, received_at, size, smtputf8, eight_bit FROM messages WHERE id = ?")
                .bind(&id)
                .fetch_optional(&mut self.connection)
                .await?;
            match meta {
                Some(row) => {
                    recipients.sort_by_key(|recipient| recipient.index);
                    claimed.push(QueuedMessage {
                        meta: meta_from_row(&row),
                        recipients,
                    });
                }
                None => {
                    tracing::warn!(queue_id = %id, "recipients without a message; removing them");
                    sqlx::query("DELETE FROM recipients WHERE message_id = ?")
                        .bind(&id)
                        .execute(&mut self.connection)
                        .await?;
                }
            }
        }
        Ok(claimed)
    }
}

pub(crate) enum WriteOutput {
    Done,
    Claimed(Vec<QueuedMessage>),
    Counter(i64),
}

#[async_trait]
impl Apply for SqliteWriter {
    type Op = WriteOp;
    type Output = WriteOutput;

    async fn begin(&mut self) -> Result<(), QueueError> {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.connection)
            .await?;
        Ok(())
    }

    async fn apply(&mut self, op: &WriteOp) -> Result<WriteOutput, QueueError> {
        match op {
            WriteOp::Enqueue { message, lease } => {
                self.insert(message, lease.as_ref()).await?;
                Ok(WriteOutput::Done)
            }
            WriteOp::Record { results, bounces } => {
                self.record(results, bounces).await?;
                Ok(WriteOutput::Done)
            }
            WriteOp::Claim {
                owner,
                now,
                lease_until,
                limit,
            } => Ok(WriteOutput::Claimed(
                self.claim(owner, *now, *lease_until, *limit).await?,
            )),
            kv => self.apply_kv(kv).await,
        }
    }

    async fn commit(&mut self) -> Result<(), QueueError> {
        sqlx::query("COMMIT").execute(&mut self.connection).await?;
        Ok(())
    }

    async fn rollback(&mut self) {
        if let Err(error) = sqlx::query("ROLLBACK").execute(&mut self.connection).await {
            tracing::debug!(%error, "rollback after a failed transaction");
        }
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn enqueue(
        &self,
        message: NewMessage,
        lease: Option<(String, Millis)>,
    ) -> Result<(), QueueError> {
        self.writer
            .submit(WriteOp::Enqueue { message, lease })
            .await
            .map(|_| ())
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

    async fn content(&self, id: &str) -> Result<Option<Bytes>, QueueError> {
        let row = sqlx::query("SELECT content FROM messages WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| Bytes::from(row.get::<Vec<u8>, _>("content"))))
    }

    async fn record(
        &self,
        results: Vec<RecipientResult>,
        bounces: Vec<NewMessage>,
    ) -> Result<(), QueueError> {
        self.writer
            .submit(WriteOp::Record { results, bounces })
            .await
            .map(|_| ())
    }

    async fn list(&self) -> Result<Vec<QueuedMessage>, QueueError> {
        let rows = sqlx::query("SELECT id, sender, received_at, size, smtputf8, eight_bit FROM messages ORDER BY received_at")
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
        let row = sqlx::query(
            "SELECT id, sender, received_at, size, smtputf8, eight_bit FROM messages WHERE id = ?",
        )
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
        Ok(result.rows_affected())
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
        let rows = sqlx::query(
            "UPDATE recipients SET lease_owner = ?1, lease_until = ?2
             WHERE message_id = ?3 AND state IN (0, 3) AND (lease_until IS NULL OR lease_until < ?4)
             RETURNING message_id, idx, address, state, attempts, next_attempt, last_reply",
        )
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
        let meta = sqlx::query(
            "SELECT id, sender, received_at, size, smtputf8, eight_bit FROM messages WHERE id = ?",
        )
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

    async fn release_leases(&self, owner: Option<&str>) -> Result<u64, QueueError> {
        let result = match owner {
            Some(owner) => {
                sqlx::query("UPDATE recipients SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?")
                    .bind(owner)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("UPDATE recipients SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL")
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(result.rows_affected())
    }
}

fn scope(tenant: &str, plugin: &str) -> (String, String) {
    (tenant.to_string(), plugin.to_string())
}

/// The plugins' key-value store lives beside the queue, so it is as durable and as shared.
#[async_trait]
impl crate::plugins::kv::KvStore for SqliteQueue {
    async fn get(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let value = sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT CAST(value AS BLOB) FROM kv WHERE tenant = ? AND plugin = ? AND key = ?
             AND (expires_at IS NULL OR expires_at > ?)",
        )
        .bind(tenant)
        .bind(plugin)
        .bind(key)
        .bind(super::now_millis())
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
        let expires_at = ttl_seconds.map(|ttl| super::now_millis() + i64::from(ttl) * 1000);
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
        let now = super::now_millis();
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
            _ => 0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::now_millis;

    #[tokio::test]
    async fn kv_counters_expire_and_are_scoped() {
        use crate::plugins::kv::KvStore;
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = SqliteQueue::open(&dir.path().join("q.db"), Duration::ZERO)
            .await
            .expect("open");
        let queue: &dyn KvStore = &queue;
        assert_eq!(queue.increment("t", "p", "k", 1, 60).await.expect("inc"), 1);
        assert_eq!(queue.increment("t", "p", "k", 2, 60).await.expect("inc"), 3);
        assert_eq!(
            queue
                .increment("t", "other", "k", 1, 60)
                .await
                .expect("inc"),
            1,
            "per plugin"
        );
        assert_eq!(
            queue.get("t", "p", "k").await.expect("get"),
            Some(b"3".to_vec())
        );
        queue
            .set("t", "p", "gone", b"x", Some(0))
            .await
            .expect("set");
        assert_eq!(
            queue.get("t", "p", "gone").await.expect("get"),
            None,
            "expired"
        );
        assert_eq!(
            queue.increment("t", "p", "gone", 5, 60).await.expect("inc"),
            5,
            "expired counter restarts"
        );
        queue.delete("t", "p", "k").await.expect("delete");
        assert_eq!(queue.get("t", "p", "k").await.expect("get"), None);
    }

    fn message(id: &str, recipients: &[&str]) -> NewMessage {
        NewMessage {
            meta: MessageMeta {
                id: id.to_string(),
                sender: "a@example.com".to_string(),
                received_at: now_millis(),
                size: 5,
                smtputf8: false,
                eight_bit: false,
            },
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            content: Bytes::from_static(b"x\r\n"),
            quarantine: None,
        }
    }

    #[tokio::test]
    async fn enqueue_claim_record_cycle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = SqliteQueue::open(&dir.path().join("q.db"), Duration::ZERO)
            .await
            .expect("open");
        queue
            .enqueue(message("m1", &["b@x.test", "c@y.test"]), None)
            .await
            .expect("enqueue");
        let now = now_millis();
        let claimed = queue
            .claim_due("node", now + 1, now + 60_000, 10)
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].recipients.len(), 2);
        // Leased: a second claim finds nothing.
        assert!(queue
            .claim_due("other", now + 1, now + 60_000, 10)
            .await
            .expect("claim")
            .is_empty());
        let result = |index, outcome| RecipientResult {
            message_id: "m1".into(),
            index,
            attempts: 1,
            outcome,
            reply: "250 ok".into(),
        };
        queue
            .record(
                vec![
                    result(0, Outcome::Delivered),
                    result(
                        1,
                        Outcome::Deferred {
                            next_attempt: now + 5000,
                        },
                    ),
                ],
                vec![],
            )
            .await
            .expect("record");
        let listed = queue.get("m1").await.expect("get").expect("still queued");
        assert_eq!(listed.recipients[0].state, RecipientState::Delivered);
        assert_eq!(listed.recipients[1].state, RecipientState::Queued);
        assert!(queue
            .claim_due("node", now + 1, now + 60_000, 10)
            .await
            .expect("claim")
            .is_empty());
        assert_eq!(
            queue
                .claim_due("node", now + 6000, now + 60_000, 10)
                .await
                .expect("claim")
                .len(),
            1
        );
        queue
            .record(
                vec![result(1, Outcome::Failed)],
                vec![message("bounce", &["a@example.com"])],
            )
            .await
            .expect("record");
        assert!(
            queue.get("m1").await.expect("get").is_none(),
            "finished message removed"
        );
        assert!(
            queue.get("bounce").await.expect("get").is_some(),
            "bounce queued atomically"
        );
    }

    #[tokio::test]
    async fn commits_are_durable_wal_with_full_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = SqliteQueue::open(&dir.path().join("q.db"), Duration::ZERO)
            .await
            .expect("open");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&queue.pool)
            .await
            .expect("pragma");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&queue.pool)
            .await
            .expect("pragma");
        assert_eq!(
            (mode.as_str(), sync),
            ("wal", 2),
            "WAL with synchronous=FULL (2)"
        );
    }

    #[tokio::test]
    async fn concurrent_enqueues_share_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = SqliteQueue::open(&dir.path().join("q.db"), Duration::ZERO)
            .await
            .expect("open");
        let mut tasks = Vec::new();
        for n in 0..200 {
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                queue
                    .enqueue(message(&format!("m{n}"), &["b@x.test"]), None)
                    .await
            }));
        }
        for task in tasks {
            task.await.expect("join").expect("enqueue");
        }
        assert_eq!(queue.list().await.expect("list").len(), 200);
        // A duplicate id fails alone, without failing the rest of its group.
        let (dup, fresh) = tokio::join!(
            queue.enqueue(message("m1", &["b@x.test"]), None),
            queue.enqueue(message("fresh", &["b@x.test"]), None)
        );
        assert!(dup.is_err());
        assert!(fresh.is_ok());
    }
}
