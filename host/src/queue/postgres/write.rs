//! The PostgreSQL engine's write operations, applied by the group-commit writer inside one
//! transaction per group: enqueue, record results (and DSNs), and the kv store's writes. A
//! whole group's messages and results take a fixed number of statements, whatever their number
//! (columns bound as arrays and unnested), since every statement is a round trip to the server.

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::{PgPool, Postgres, Transaction};

use crate::queue::kv::{over_quota, KvRows, KvWrite, KvWritten, Scope};
use crate::queue::writer::Apply;
use crate::queue::{Millis, NewMessage, Outcome, QueueError, RecipientResult, RecipientState};

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
    Kv(KvWrite),
}

pub(crate) enum WriteOutput {
    Done,
    Kv(KvWritten),
    Recorded { stale: usize },
}

/// The message columns of a group, one array per column (bound to `UNNEST`).
#[derive(Default)]
struct MessageColumns<'a> {
    id: Vec<&'a str>,
    sender: Vec<&'a str>,
    received_at: Vec<i64>,
    size: Vec<i64>,
    smtputf8: Vec<i64>,
    eight_bit: Vec<i64>,
    content: Vec<&'a [u8]>,
    tenant: Vec<&'a str>,
    dsn_ret: Vec<Option<&'static str>>,
    dsn_envid: Vec<Option<&'a str>>,
    requiretls: Vec<i64>,
}

impl<'a> MessageColumns<'a> {
    fn push(&mut self, message: &'a NewMessage) {
        let meta = &message.meta;
        self.id.push(&meta.id);
        self.sender.push(&meta.sender);
        self.received_at.push(meta.received_at);
        self.size.push(meta.size as i64);
        self.smtputf8.push(meta.smtputf8 as i64);
        self.eight_bit.push(meta.eight_bit as i64);
        self.content.push(message.content.as_ref());
        self.tenant.push(&meta.tenant);
        self.dsn_ret.push(meta.dsn.ret.map(|ret| ret.as_str()));
        self.dsn_envid.push(meta.dsn.envid.as_deref());
        self.requiretls.push(meta.dsn.requiretls as i64);
    }
}

/// The recipient columns of a group's messages, one array per column.
#[derive(Default)]
struct RecipientColumns<'a> {
    message_id: Vec<&'a str>,
    idx: Vec<i64>,
    address: Vec<&'a str>,
    state: Vec<i64>,
    next_attempt: Vec<i64>,
    last_reply: Vec<Option<&'a str>>,
    lease_owner: Vec<Option<&'a str>>,
    lease_until: Vec<Option<i64>>,
    notify: Vec<i64>,
    orcpt: Vec<Option<&'a str>>,
}

impl<'a> RecipientColumns<'a> {
    fn push(&mut self, message: &'a NewMessage, lease: Option<&'a (String, Millis)>) {
        let state = if message.quarantine.is_some() {
            RecipientState::Quarantined
        } else {
            RecipientState::Queued
        };
        for (index, address) in message.recipients.iter().enumerate() {
            let dsn = message.recipient_dsn.get(index);
            self.message_id.push(&message.meta.id);
            self.idx.push(index as i64);
            self.address.push(address);
            self.state.push(state.as_i64());
            self.next_attempt.push(message.meta.received_at);
            self.last_reply.push(message.quarantine.as_deref());
            self.lease_owner
                .push(lease.map(|(owner, _)| owner.as_str()));
            self.lease_until.push(lease.map(|(_, until)| *until));
            self.notify
                .push(dsn.map(|dsn| dsn.notify.bits()).unwrap_or_default());
            self.orcpt.push(dsn.and_then(|dsn| dsn.orcpt.as_deref()));
        }
    }
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

    /// Inserts every message of the group, and all their recipients: two statements in all.
    async fn insert(
        &mut self,
        messages: &[(&NewMessage, Option<&(String, Millis)>)],
    ) -> Result<(), QueueError> {
        let mut rows = MessageColumns::default();
        let mut recipients = RecipientColumns::default();
        for (message, lease) in messages {
            rows.push(message);
            recipients.push(message, *lease);
            if lease.is_none() {
                self.notify = true;
            }
        }
        let transaction = self.transaction()?;
        sqlx::query(
            "INSERT INTO messages (id, sender, received_at, size, smtputf8, eight_bit, content, tenant,
                                   dsn_ret, dsn_envid, requiretls)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                                  $6::bigint[], $7::bytea[], $8::text[], $9::text[], $10::text[],
                                  $11::bigint[])",
        )
        .bind(&rows.id)
        .bind(&rows.sender)
        .bind(&rows.received_at)
        .bind(&rows.size)
        .bind(&rows.smtputf8)
        .bind(&rows.eight_bit)
        .bind(&rows.content)
        .bind(&rows.tenant)
        .bind(&rows.dsn_ret)
        .bind(&rows.dsn_envid)
        .bind(&rows.requiretls)
        .execute(&mut **transaction)
        .await?;
        sqlx::query(
            "INSERT INTO recipients (message_id, idx, address, state, attempts, next_attempt,
                                     last_reply, lease_owner, lease_until, notify, orcpt)
             SELECT r.message_id, r.idx, r.address, r.state, 0, r.next_attempt, r.last_reply,
                    r.lease_owner, r.lease_until, r.notify, r.orcpt
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::text[])
                  AS r(message_id, idx, address, state, next_attempt, last_reply, lease_owner,
                       lease_until, notify, orcpt)",
        )
        .bind(&recipients.message_id)
        .bind(&recipients.idx)
        .bind(&recipients.address)
        .bind(&recipients.state)
        .bind(&recipients.next_attempt)
        .bind(&recipients.last_reply)
        .bind(&recipients.lease_owner)
        .bind(&recipients.lease_until)
        .bind(&recipients.notify)
        .bind(&recipients.orcpt)
        .execute(&mut **transaction)
        .await?;
        Ok(())
    }

    /// Records every result of the group made under its owner's lease, and removes the messages
    /// it finished: three statements. Returns the (message, index) of the results applied.
    async fn record(
        &mut self,
        results: &[(&str, &RecipientResult)],
    ) -> Result<HashSet<(String, i64)>, QueueError> {
        let mut owners = Vec::with_capacity(results.len());
        let mut ids = Vec::with_capacity(results.len());
        let mut indexes = Vec::with_capacity(results.len());
        let mut states = Vec::with_capacity(results.len());
        let mut attempts = Vec::with_capacity(results.len());
        let mut next_attempts: Vec<Option<Millis>> = Vec::with_capacity(results.len());
        let mut replies = Vec::with_capacity(results.len());
        let mut warned = Vec::with_capacity(results.len());
        for (owner, result) in results {
            let (state, next_attempt) = match result.outcome {
                Outcome::Delivered => (RecipientState::Delivered, None),
                Outcome::Deferred { next_attempt } => (RecipientState::Queued, Some(next_attempt)),
                Outcome::Failed => (RecipientState::Failed, None),
            };
            owners.push(*owner);
            ids.push(result.message_id.as_str());
            indexes.push(result.index);
            states.push(state.as_i64());
            attempts.push(result.attempts);
            next_attempts.push(next_attempt);
            replies.push(result.reply.as_str());
            warned.push(result.delay_warned as i64);
        }
        let transaction = self.transaction()?;
        // The messages first, in id order: two transactions recording recipients of one message
        // (two nodes, or two writers) take turns, so the second sees the first's results and
        // removes the message if it is finished, and neither can deadlock on the other.
        sqlx::query("SELECT id FROM messages WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .execute(&mut **transaction)
            .await?;
        // Only under the lease the result was made under: a node whose lease ran out and was
        // taken over must not overwrite the new holder's state.
        let applied: Vec<(String, i64)> = sqlx::query_as(
            "UPDATE recipients AS r SET state = u.state, attempts = u.attempts,
               next_attempt = COALESCE(u.next_attempt, r.next_attempt), last_reply = u.reply,
               lease_owner = NULL, lease_until = NULL,
               delay_warned = GREATEST(r.delay_warned, u.warned)
             FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                         $6::text[], $7::bigint[], $8::text[])
                  AS u(message_id, idx, state, attempts, next_attempt, reply, warned, owner)
             WHERE r.message_id = u.message_id AND r.idx = u.idx
               AND r.lease_owner = u.owner AND r.state IN (0, 3, 4)
             RETURNING r.message_id, r.idx",
        )
        .bind(&ids)
        .bind(&indexes)
        .bind(&states)
        .bind(&attempts)
        .bind(&next_attempts)
        .bind(&replies)
        .bind(&warned)
        .bind(&owners)
        .fetch_all(&mut **transaction)
        .await?;
        // A message none of whose recipients is left to deliver goes, its recipients with it.
        sqlx::query(
            "DELETE FROM messages AS m WHERE m.id = ANY($1)
             AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND r.state IN (0, 3, 4))",
        )
        .bind(&ids)
        .execute(&mut **transaction)
        .await?;
        Ok(applied.into_iter().collect())
    }

    /// The plugins' key-value operations. Counters are stored as decimal text, as in the
    /// SQLite engine; an expired one starts again from the delta.
    async fn apply_kv(&mut self, op: &KvWrite) -> Result<KvWritten, QueueError> {
        if let Some(why) = over_quota(self, op).await? {
            return Ok(KvWritten::OverQuota(why));
        }
        let transaction = self.transaction()?;
        match op {
            KvWrite::Set {
                scope,
                key,
                value,
                expires_at,
                ..
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
                ..
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
                ..
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
            // Purges run in a transaction of their own (`PgQueue::purge`), never in a group.
            KvWrite::Purge { .. } => Err(QueueError::Database(
                "a purge reached the group writer".into(),
            )),
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

    /// The whole group in a fixed number of statements (each is a round trip to the server):
    /// its results, then its new messages (those queued and the DSNs of the results), then its
    /// kv writes one by one.
    async fn apply(&mut self, ops: &[&WriteOp]) -> Result<Vec<WriteOutput>, QueueError> {
        let results: Vec<(&str, &RecipientResult)> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Record { owner, results, .. } => Some((owner.as_str(), results)),
                _ => None,
            })
            .flat_map(|(owner, results)| results.iter().map(move |result| (owner, result)))
            .collect();
        let applied = if results.is_empty() {
            HashSet::new()
        } else {
            self.record(&results).await?
        };
        let mut messages = Vec::new();
        let mut stale_counts = vec![0; ops.len()];
        for (position, op) in ops.iter().enumerate() {
            match op {
                WriteOp::Enqueue { message, lease } => messages.push((message, lease.as_ref())),
                WriteOp::Record {
                    results, bounces, ..
                } => {
                    let stale = results
                        .iter()
                        .filter(|r| !applied.contains(&(r.message_id.clone(), r.index)))
                        .count();
                    stale_counts[position] = stale;
                    if stale == 0 {
                        messages.extend(bounces.iter().map(|bounce| (bounce, None)));
                    } else if !bounces.is_empty() {
                        tracing::warn!(
                            stale,
                            "results for recipients no longer leased here: their DSNs are dropped"
                        );
                    }
                }
                WriteOp::Kv(_) => {}
            }
        }
        if !messages.is_empty() {
            self.insert(&messages).await?;
        }
        let mut outputs: Vec<WriteOutput> = ops
            .iter()
            .zip(&stale_counts)
            .map(|(op, stale)| match op {
                WriteOp::Record { .. } => WriteOutput::Recorded { stale: *stale },
                _ => WriteOutput::Done,
            })
            .collect();
        // Kv writes in key order, so that concurrent groups lock keys in one order (no
        // deadlock); writes to one key keep their order (a stable sort).
        let mut writes: Vec<(usize, &KvWrite)> = ops
            .iter()
            .enumerate()
            .filter_map(|(position, op)| match op {
                WriteOp::Kv(write) => Some((position, write)),
                _ => None,
            })
            .collect();
        writes.sort_by(|a, b| a.1.key().cmp(&b.1.key()));
        // Most kv writes change their owner's usage row (the trigger; a same-length update does
        // not), and a growing one reads it FOR UPDATE before its kv row: the group's owners'
        // usage rows are locked first, in one order, so two groups (or a delete and a growing
        // write) never hold what the other waits for. The price: one plugin's writes from every
        // node wait for each other, a group at a time.
        let mut owners: Vec<(&str, &str)> = writes
            .iter()
            .filter_map(|(_, write)| write.key().map(|(tenant, plugin, _)| (tenant, plugin)))
            .collect();
        owners.dedup();
        if !owners.is_empty() {
            let (tenants, plugins): (Vec<&str>, Vec<&str>) = owners.into_iter().unzip();
            sqlx::query(
                "SELECT 1 FROM kv_usage WHERE (tenant, plugin) IN
                   (SELECT * FROM UNNEST($1::text[], $2::text[]))
                 ORDER BY tenant, plugin FOR UPDATE",
            )
            .bind(tenants)
            .bind(plugins)
            .execute(&mut **self.transaction()?)
            .await?;
        }
        for (position, write) in writes {
            outputs[position] = WriteOutput::Kv(self.apply_kv(write).await?);
        }
        Ok(outputs)
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

#[async_trait]
impl KvRows for PgWriter {
    async fn row(
        &mut self,
        scope: &Scope,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<Millis>)>, QueueError> {
        let transaction = self.transaction()?;
        Ok(sqlx::query_as(
            "SELECT value, expires_at FROM kv WHERE tenant = $1 AND plugin = $2 AND key = $3",
        )
        .bind(&scope.0)
        .bind(&scope.1)
        .bind(key)
        .fetch_optional(&mut **transaction)
        .await?)
    }

    /// Locks the owner's usage row until the commit, so two nodes growing one owner at once
    /// check one after the other. (An owner with no row yet has nothing to lock: its first
    /// writes at once on several nodes may pass the quota by a few keys.)
    async fn used(&mut self, scope: &Scope) -> Result<(i64, i64), QueueError> {
        let transaction = self.transaction()?;
        let used: Option<(i64, i64)> = sqlx::query_as(
            "SELECT keys, bytes FROM kv_usage WHERE tenant = $1 AND plugin = $2 FOR UPDATE",
        )
        .bind(&scope.0)
        .bind(&scope.1)
        .fetch_optional(&mut **transaction)
        .await?;
        Ok(used.unwrap_or((0, 0)))
    }
}
