//! The PostgreSQL engine's write operations, applied by the group-commit writer inside one
//! transaction per group: enqueue, record results (and DSNs), and the kv store's writes. Each
//! operation is a fixed number of statements, whatever its recipients (arrays unnested), since
//! every statement is a round trip to the server.

use async_trait::async_trait;
use sqlx::{PgPool, Postgres, Transaction};

use crate::queue::kv::{KvWrite, KvWritten};
use crate::queue::writer::Apply;
use crate::queue::{Millis, NewMessage, Outcome, QueueError, RecipientResult, RecipientState};

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
    Kv(KvWrite),
}

pub(crate) enum WriteOutput {
    Done,
    Kv(KvWritten),
}

pub(crate) struct PgWriter {
    pool: PgPool,
    /// The queue's NOTIFY channel, told of unleased work at commit.
    channel: String,
    /// The open group's transaction, on a connection of its own from the pool.
    transaction: Option<Transaction<'static, Postgres>>,
    /// The open group queued work no node holds: notify at commit.
    notify: bool,
}

impl PgWriter {
    pub(super) fn new(pool: PgPool, channel: String) -> PgWriter {
        PgWriter {
            pool,
            channel,
            transaction: None,
            notify: false,
        }
    }

    fn transaction(&mut self) -> Result<&mut Transaction<'static, Postgres>, QueueError> {
        self.transaction.as_mut().ok_or(QueueError::WriterGone)
    }

    async fn insert(
        &mut self,
        message: &NewMessage,
        lease: Option<&(String, Millis)>,
    ) -> Result<(), QueueError> {
        let meta = &message.meta;
        let transaction = self.transaction()?;
        sqlx::query(
            "INSERT INTO messages (id, sender, received_at, size, smtputf8, eight_bit, content, tenant,
                                   dsn_ret, dsn_envid, requiretls)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
        .execute(&mut **transaction)
        .await?;
        let state = if message.quarantine.is_some() {
            RecipientState::Quarantined.as_i64()
        } else {
            RecipientState::Queued.as_i64()
        };
        let count = message.recipients.len();
        let indexes: Vec<i64> = (0..count as i64).collect();
        let (notify, orcpt): (Vec<i64>, Vec<Option<String>>) = (0..count)
            .map(|index| {
                let dsn = message
                    .recipient_dsn
                    .get(index)
                    .cloned()
                    .unwrap_or_default();
                (dsn.notify.bits(), dsn.orcpt)
            })
            .unzip();
        sqlx::query(
            "INSERT INTO recipients (message_id, idx, address, state, attempts, next_attempt,
                                     last_reply, lease_owner, lease_until, notify, orcpt)
             SELECT $1, r.idx, r.address, $2, 0, $3, $4, $5, $6, r.notify, r.orcpt
             FROM UNNEST($7::bigint[], $8::text[], $9::bigint[], $10::text[])
                  AS r(idx, address, notify, orcpt)",
        )
        .bind(&meta.id)
        .bind(state)
        .bind(meta.received_at)
        .bind(message.quarantine.as_deref())
        .bind(lease.map(|(owner, _)| owner.as_str()))
        .bind(lease.map(|(_, until)| *until))
        .bind(&indexes)
        .bind(&message.recipients)
        .bind(&notify)
        .bind(&orcpt)
        .execute(&mut **transaction)
        .await?;
        if lease.is_none() {
            self.notify = true;
        }
        Ok(())
    }

    async fn record(
        &mut self,
        results: &[RecipientResult],
        bounces: &[NewMessage],
    ) -> Result<(), QueueError> {
        let mut ids = Vec::with_capacity(results.len());
        let mut indexes = Vec::with_capacity(results.len());
        let mut states = Vec::with_capacity(results.len());
        let mut attempts = Vec::with_capacity(results.len());
        let mut next_attempts: Vec<Option<Millis>> = Vec::with_capacity(results.len());
        let mut replies = Vec::with_capacity(results.len());
        let mut warned = Vec::with_capacity(results.len());
        for result in results {
            let (state, next_attempt) = match result.outcome {
                Outcome::Delivered => (RecipientState::Delivered, None),
                Outcome::Deferred { next_attempt } => (RecipientState::Queued, Some(next_attempt)),
                Outcome::Failed => (RecipientState::Failed, None),
            };
            ids.push(result.message_id.as_str());
            indexes.push(result.index);
            states.push(state.as_i64());
            attempts.push(result.attempts);
            next_attempts.push(next_attempt);
            replies.push(result.reply.as_str());
            warned.push(result.delay_warned as i64);
        }
        let transaction = self.transaction()?;
        sqlx::query(
            "UPDATE recipients AS r SET state = u.state, attempts = u.attempts,
               next_attempt = COALESCE(u.next_attempt, r.next_attempt), last_reply = u.reply,
               lease_owner = NULL, lease_until = NULL,
               delay_warned = GREATEST(r.delay_warned, u.warned)
             FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                         $6::text[], $7::bigint[])
                  AS u(message_id, idx, state, attempts, next_attempt, reply, warned)
             WHERE r.message_id = u.message_id AND r.idx = u.idx",
        )
        .bind(&ids)
        .bind(&indexes)
        .bind(&states)
        .bind(&attempts)
        .bind(&next_attempts)
        .bind(&replies)
        .bind(&warned)
        .execute(&mut **transaction)
        .await?;
        // A message none of whose recipients is left to deliver goes, its recipients with it.
        sqlx::query(
            "DELETE FROM messages AS m WHERE m.id = ANY($1)
             AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND r.state IN (0, 3))",
        )
        .bind(&ids)
        .execute(&mut **transaction)
        .await?;
        for bounce in bounces {
            self.insert(bounce, None).await?;
        }
        Ok(())
    }

    /// The plugins' key-value operations. Counters are stored as decimal text, as in the
    /// SQLite engine; an expired one starts again from the delta.
    async fn apply_kv(&mut self, op: &KvWrite) -> Result<KvWritten, QueueError> {
        let transaction = self.transaction()?;
        match op {
            KvWrite::Set {
                scope,
                key,
                value,
                expires_at,
            } => {
                sqlx::query(
                    "INSERT INTO kv (tenant, plugin, key, value, expires_at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (tenant, plugin, key)
                     DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                )
                .bind(&scope.0)
                .bind(&scope.1)
                .bind(key)
                .bind(value)
                .bind(expires_at)
                .execute(&mut **transaction)
                .await?;
                Ok(KvWritten::Done)
            }
            KvWrite::Increment {
                scope,
                key,
                delta,
                now,
                expires_at,
            } => {
                let value: i64 = sqlx::query_scalar(
                    "INSERT INTO kv (tenant, plugin, key, value, expires_at)
                     VALUES ($1, $2, $3, convert_to($4::bigint::text, 'UTF8'), $5)
                     ON CONFLICT (tenant, plugin, key) DO UPDATE SET
                       value = CASE WHEN kv.expires_at IS NOT NULL AND kv.expires_at <= $6
                                    THEN convert_to($4::bigint::text, 'UTF8')
                                    ELSE convert_to((convert_from(kv.value, 'UTF8')::bigint + $4::bigint)::text, 'UTF8') END,
                       expires_at = CASE WHEN kv.expires_at IS NOT NULL AND kv.expires_at <= $6
                                    THEN $5 ELSE kv.expires_at END
                     RETURNING convert_from(value, 'UTF8')::bigint",
                )
                .bind(&scope.0)
                .bind(&scope.1)
                .bind(key)
                .bind(delta)
                .bind(expires_at)
                .bind(now)
                .fetch_one(&mut **transaction)
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
            } => {
                // Atomic across nodes: the upsert takes the row lock, and a concurrent UPDATE
                // re-checks its WHERE on the row another node just wrote (so one of them wins).
                let statement = match expected {
                    None => {
                        "INSERT INTO kv (tenant, plugin, key, value, expires_at) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (tenant, plugin, key) DO UPDATE
                         SET value = excluded.value, expires_at = excluded.expires_at
                         WHERE kv.expires_at IS NOT NULL AND kv.expires_at <= $6"
                    }
                    Some(_) => {
                        "UPDATE kv SET value = $4, expires_at = $5
                         WHERE tenant = $1 AND plugin = $2 AND key = $3 AND value = $7
                           AND (expires_at IS NULL OR expires_at > $6)"
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
                let written = query.execute(&mut **transaction).await?.rows_affected();
                Ok(KvWritten::Swapped(written == 1))
            }
            KvWrite::Delete { scope, key } => {
                sqlx::query("DELETE FROM kv WHERE tenant = $1 AND plugin = $2 AND key = $3")
                    .bind(&scope.0)
                    .bind(&scope.1)
                    .bind(key)
                    .execute(&mut **transaction)
                    .await?;
                Ok(KvWritten::Done)
            }
        }
    }
}

#[async_trait]
impl Apply for PgWriter {
    type Op = WriteOp;
    type Output = WriteOutput;

    async fn begin(&mut self) -> Result<(), QueueError> {
        self.transaction = Some(self.pool.begin().await?);
        self.notify = false;
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
            WriteOp::Kv(write) => Ok(WriteOutput::Kv(self.apply_kv(write).await?)),
        }
    }

    async fn commit(&mut self) -> Result<(), QueueError> {
        if self.notify {
            // Delivered to listeners when (and only if) the transaction commits.
            let channel = self.channel.clone();
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(channel)
                .execute(&mut **self.transaction()?)
                .await?;
        }
        let transaction = self.transaction.take().ok_or(QueueError::WriterGone)?;
        transaction.commit().await?;
        Ok(())
    }

    async fn rollback(&mut self) {
        if let Some(transaction) = self.transaction.take() {
            if let Err(error) = transaction.rollback().await {
                tracing::debug!(%error, "rollback after a failed transaction");
            }
        }
    }
}
