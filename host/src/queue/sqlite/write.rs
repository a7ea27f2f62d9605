//! The SQLite engine's write operations, applied inside the writer task's open transaction:
//! enqueue, record results (and DSNs), claim due recipients, and the kv store's writes.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::{Row, SqliteConnection};

use crate::queue::kv::{over_quota, KvRows, KvWrite, KvWritten, Scope};
use crate::queue::rows::{meta_from_row, recipient_from_row, MESSAGE_COLUMNS, RECIPIENT_COLUMNS};
use crate::queue::writer::Apply;
use crate::queue::{
    Millis, NewMessage, Outcome, QueueError, QueuedMessage, RecipientResult, RecipientRow,
    RecipientState,
};

/// Write operations, applied by the writer task.
pub(crate) enum WriteOp {
    Enqueue {
        message: NewMessage,
        lease: Option<(String, Millis)>,
    },
    Record {
        owner: String,
        results: Vec<RecipientResult>,
        bounces: Vec<NewMessage>,
    },
    Claim {
        owner: String,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    },
    Kv(KvWrite),
}

pub(crate) struct SqliteWriter {
    connection: SqliteConnection,
}

impl SqliteWriter {
    pub(super) fn new(connection: SqliteConnection) -> SqliteWriter {
        SqliteWriter { connection }
    }

    async fn insert(
        &mut self,
        message: &NewMessage,
        lease: Option<&(String, Millis)>,
    ) -> Result<(), QueueError> {
        let meta = &message.meta;
        sqlx::query(
            "INSERT INTO messages (id, sender, received_at, size, smtputf8, eight_bit, content, tenant,
                                   dsn_ret, dsn_envid, requiretls)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&meta.id)
        .bind(&meta.sender)
        .bind(meta.received_at)
        .bind(meta.size as i64)
        .bind(meta.smtputf8 as i64)
        .bind(meta.eight_bit as i64)
        .bind(message.content.as_ref())
        .bind(&meta.tenant)
        .bind(meta.dsn.ret.map(|ret| ret.as_str()))
        .bind(meta.dsn.envid.as_deref())
        .bind(meta.dsn.requiretls as i64)
        .execute(&mut self.connection)
        .await?;
        let state = if message.quarantine.is_some() {
            RecipientState::Quarantined.as_i64()
        } else {
            RecipientState::Queued.as_i64()
        };
        for (index, address) in message.recipients.iter().enumerate() {
            let dsn = message
                .recipient_dsn
                .get(index)
                .cloned()
                .unwrap_or_default();
            sqlx::query(
                "INSERT INTO recipients (message_id, idx, address, state, attempts, next_attempt, last_reply,
                                         lease_owner, lease_until, notify, orcpt)
                 VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&meta.id)
            .bind(index as i64)
            .bind(address)
            .bind(state)
            .bind(meta.received_at)
            .bind(message.quarantine.as_deref())
            .bind(lease.map(|(owner, _)| owner.as_str()))
            .bind(lease.map(|(_, until)| *until))
            .bind(dsn.notify.bits())
            .bind(dsn.orcpt.as_deref())
            .execute(&mut self.connection)
            .await?;
        }
        Ok(())
    }

    /// Returns how many results were stale (their recipient no longer leased to `owner`).
    async fn record(
        &mut self,
        owner: &str,
        results: &[RecipientResult],
        bounces: &[NewMessage],
    ) -> Result<usize, QueueError> {
        let mut touched: Vec<&str> = Vec::new();
        let mut stale = 0;
        for result in results {
            let (state, next_attempt) = match result.outcome {
                Outcome::Delivered => (RecipientState::Delivered, None),
                Outcome::Deferred { next_attempt } => (RecipientState::Queued, Some(next_attempt)),
                Outcome::Failed => (RecipientState::Failed, None),
            };
            let written = sqlx::query(
                "UPDATE recipients SET state = ?, attempts = ?, next_attempt = COALESCE(?, next_attempt),
                 last_reply = ?, lease_owner = NULL, lease_until = NULL,
                 delay_warned = MAX(delay_warned, ?)
                 WHERE message_id = ? AND idx = ? AND lease_owner = ? AND state IN (0, 3, 4)",
            )
            .bind(state.as_i64())
            .bind(result.attempts)
            .bind(next_attempt)
            .bind(&result.reply)
            .bind(result.delay_warned as i64)
            .bind(&result.message_id)
            .bind(result.index)
            .bind(owner)
            .execute(&mut self.connection)
            .await?;
            if written.rows_affected() == 0 {
                stale += 1;
            }
            if !touched.contains(&result.message_id.as_str()) {
                touched.push(&result.message_id);
            }
        }
        for id in touched {
            sqlx::query(
                "DELETE FROM recipients WHERE message_id = ?1
                 AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1 AND state IN (0, 3, 4))",
            )
            .bind(id)
            .execute(&mut self.connection)
            .await?;
            sqlx::query("DELETE FROM messages WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1)")
                .bind(id)
                .execute(&mut self.connection)
                .await?;
        }
        if stale > 0 {
            if !bounces.is_empty() {
                tracing::warn!(
                    stale,
                    "results for recipients no longer leased here: their DSNs are dropped"
                );
            }
            return Ok(stale);
        }
        for bounce in bounces {
            self.insert(bounce, None).await?;
        }
        Ok(0)
    }

    /// The plugins' key-value operations, each checked against its owner's quota first.
    async fn apply_kv(&mut self, op: &KvWrite) -> Result<KvWritten, QueueError> {
        if let Some(why) = over_quota(self, op).await? {
            return Ok(KvWritten::OverQuota(why));
        }
        match op {
            KvWrite::Set {
                scope,
                key,
                value,
                expires_at,
                ..
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
                Ok(KvWritten::Done)
            }
            KvWrite::Increment {
                scope,
                key,
                delta,
                now,
                expires_at,
                ..
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
                Ok(KvWritten::Counter(value))
            }
            KvWrite::Swap {
                scope,
                key,
                expected,
                value,
                now,
                expires_at,
                ..
            } => {
                // Missing or expired: insert, or replace only an expired row. Otherwise: replace
                // only the row that holds the expected bytes (counters are text: compared as
                // bytes).
                let statement = match expected {
                    None => {
                        "INSERT INTO kv (tenant, plugin, key, value, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (tenant, plugin, key) DO UPDATE
                         SET value = excluded.value, expires_at = excluded.expires_at
                         WHERE kv.expires_at IS NOT NULL AND kv.expires_at <= ?6"
                    }
                    Some(_) => {
                        "UPDATE kv SET value = ?4, expires_at = ?5
                         WHERE tenant = ?1 AND plugin = ?2 AND key = ?3 AND CAST(value AS BLOB) = ?7
                           AND (expires_at IS NULL OR expires_at > ?6)"
                    }
                };
                let mut query = sqlx::query(statement)
                    .bind(&scope.0)
                    .bind(&scope.1)
                    .bind(key)
                    .bind(value)
                    .bind(expires_at)
                    .bind(now);
                if let Some(expected) = expected {
                    query = query.bind(expected);
                }
                let written = query.execute(&mut self.connection).await?.rows_affected();
                Ok(KvWritten::Swapped(written == 1))
            }
            KvWrite::Delete { scope, key } => {
                sqlx::query("DELETE FROM kv WHERE tenant = ? AND plugin = ? AND key = ?")
                    .bind(&scope.0)
                    .bind(&scope.1)
                    .bind(key)
                    .execute(&mut self.connection)
                    .await?;
                Ok(KvWritten::Done)
            }
            KvWrite::Purge { now, limit } => {
                let purged = sqlx::query(
                    "DELETE FROM kv WHERE rowid IN (SELECT rowid FROM kv
                     WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
                )
                .bind(now)
                .bind(limit)
                .execute(&mut self.connection)
                .await?
                .rows_affected();
                Ok(KvWritten::Purged(purged))
            }
        }
    }

    async fn claim(
        &mut self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<QueuedMessage>, QueueError> {
        let rows = sqlx::query(&format!(
            "UPDATE recipients SET lease_owner = ?1, lease_until = ?2
             WHERE state = 0 AND next_attempt <= ?3 AND (lease_until IS NULL OR lease_until < ?3)
               AND message_id IN (
                 SELECT message_id FROM recipients
                 WHERE state = 0 AND next_attempt <= ?3 AND (lease_until IS NULL OR lease_until < ?3)
                 GROUP BY message_id ORDER BY MIN(next_attempt) LIMIT ?4)
             RETURNING message_id, {RECIPIENT_COLUMNS}"
        ))
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
            let meta = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?"
            ))
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

    async fn apply_one(&mut self, op: &WriteOp) -> Result<WriteOutput, QueueError> {
        match op {
            WriteOp::Enqueue { message, lease } => {
                self.insert(message, lease.as_ref()).await?;
                Ok(WriteOutput::Done)
            }
            WriteOp::Record {
                owner,
                results,
                bounces,
            } => Ok(WriteOutput::Recorded {
                stale: self.record(owner, results, bounces).await?,
            }),
            WriteOp::Claim {
                owner,
                now,
                lease_until,
                limit,
            } => Ok(WriteOutput::Claimed(
                self.claim(owner, *now, *lease_until, *limit).await?,
            )),
            WriteOp::Kv(write) => Ok(WriteOutput::Kv(self.apply_kv(write).await?)),
        }
    }
}

pub(crate) enum WriteOutput {
    Done,
    Claimed(Vec<QueuedMessage>),
    Kv(KvWritten),
    Recorded { stale: usize },
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

    async fn apply(&mut self, ops: &[&WriteOp]) -> Result<Vec<WriteOutput>, QueueError> {
        // In-process statements cost no round trip: one operation at a time.
        let mut outputs = Vec::with_capacity(ops.len());
        for op in ops {
            outputs.push(self.apply_one(op).await?);
        }
        Ok(outputs)
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
impl KvRows for SqliteWriter {
    async fn row(
        &mut self,
        scope: &Scope,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<Millis>)>, QueueError> {
        Ok(sqlx::query_as(
            "SELECT CAST(value AS BLOB), expires_at FROM kv WHERE tenant = ? AND plugin = ? AND key = ?",
        )
        .bind(&scope.0)
        .bind(&scope.1)
        .bind(key)
        .fetch_optional(&mut self.connection)
        .await?)
    }

    async fn used(&mut self, scope: &Scope) -> Result<(i64, i64), QueueError> {
        let used: Option<(i64, i64)> =
            sqlx::query_as("SELECT keys, bytes FROM kv_usage WHERE tenant = ? AND plugin = ?")
                .bind(&scope.0)
                .bind(&scope.1)
                .fetch_optional(&mut self.connection)
                .await?;
        Ok(used.unwrap_or((0, 0)))
    }
}
