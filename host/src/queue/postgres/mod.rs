//! The shared queue engine: one PostgreSQL database that several nodes use at once.
//!
//! - A `250` waits for its message's commit, with `synchronous_commit = on` whatever the
//!   server's default; writes go through the same group commit as the SQLite engine
//!   (`super::writer`, operations in `write.rs`), with three writers committing side by side,
//!   each on a connection taken from the pool for each group, so a lost connection costs one
//!   group (answered `451`) and the next group reconnects.
//! - Claims take due recipients with `FOR UPDATE SKIP LOCKED`, so nodes scanning at once never
//!   wait for each other nor take the same recipient; each lease names the node and expires.
//! - Nodes wake each other with `NOTIFY` when unleased work is queued (`listen.rs`); the scan
//!   interval remains the fallback (and finds the leases of a node that died).
//! - The plugins' kv store (`kv.rs`) and the policy cache (`policies.rs`) share the database,
//!   so every node sees the same counters and policies.

mod kv;
mod listen;
mod policies;
mod traces;
mod write;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Once};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::sync::Notify;

use super::rows::{
    meta_from_row, recipient_from_row, stats_from_row, StatsRow, MESSAGE_COLUMNS, RECIPIENT_COLUMNS,
};
use super::writer::Writer;
use super::Schema;
use super::{
    migrations, Millis, NewMessage, Queue, QueueError, QueueStats, QueuedMessage, RecipientResult,
    RecipientRow,
};
use crate::config::QueueConfig;
use write::{PgWriter, WriteOp, WriteOutput};

/// How long a caller waits for a connection before its operation fails (a `451` for a
/// session): a database that is down must not hold sessions for the pool's default 30 s.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Groups committed side by side: while one waits for its WAL flush, the next is sent. (Each
/// holds a pooled connection while it commits.)
const WRITERS: usize = 3;

/// The PostgreSQL queue. Cheap to clone.
#[derive(Clone)]
pub struct PgQueue {
    pub(in crate::queue) pool: PgPool,
    writer: Writer<PgWriter>,
    /// The NOTIFY channel of this queue's schema.
    channel: String,
    work: Arc<Notify>,
    listening: Arc<Once>,
    location: String,
}

/// `config`'s database as logs and errors name it: never its password.
pub fn describe(config: &QueueConfig) -> String {
    let place = match &config.url {
        Some(url) => match PgConnectOptions::from_str(url) {
            Ok(options) => format!(
                "postgres://{}@{}:{}/{}",
                options.get_username(),
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or("")
            ),
            Err(_) => "postgres (unreadable url)".to_string(),
        },
        None => "postgres (PG* environment)".to_string(),
    };
    match &config.schema {
        Some(schema) => format!("{place} schema {schema}"),
        None => place,
    }
}

impl PgQueue {
    /// Connects (failing at once on a wrong address, user or password), creates the schema if
    /// needed, migrates it and starts the writer.
    pub async fn open(config: &QueueConfig, schema_use: Schema) -> Result<PgQueue, QueueError> {
        let (options, schema) = connect_options(config)?;
        if let Some(schema) = &config.schema {
            // Before the pool: its connections' search path names the schema.
            create_schema(&mut connect(config).await?, schema).await?;
        }
        let settings = session_settings(config);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |connection, _| {
                let settings = settings.clone();
                Box::pin(async move {
                    use sqlx::Executor;
                    // No arguments: the simple protocol, which takes several statements.
                    connection.execute(settings.as_str()).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let mut connection = pool.acquire().await?;
        match schema_use {
            Schema::Migrate => {
                let migrator = migrations::migrator(migrations::POSTGRES).await?;
                migrator
                    .run(&mut *connection)
                    .await
                    .map_err(|error| migrations::error(error, migrations::POSTGRES))?;
            }
            Schema::AsIs => {
                let found = applied_version(&mut connection).await?;
                let needed = migrations::newest(migrations::POSTGRES);
                if found > needed {
                    return Err(QueueError::SchemaTooNew {
                        found,
                        known: needed,
                    });
                }
                if found < needed {
                    return Err(QueueError::SchemaTooOld { found, needed });
                }
            }
        }
        drop(connection);
        let channel = format!("switchyard_work_{schema}");
        let writers = (0..WRITERS)
            .map(|_| PgWriter::new(pool.clone(), channel.clone()))
            .collect();
        let writer = Writer::spawn(writers, config.commit_window);
        Ok(PgQueue {
            pool,
            writer,
            channel,
            work: Arc::new(Notify::new()),
            listening: Arc::new(Once::new()),
            location: describe(config),
        })
    }

    pub fn location(&self) -> String {
        self.location.clone()
    }

    /// Each listed message with its recipients (all of them, in order).
    async fn with_recipients(
        &self,
        metas: Vec<sqlx::postgres::PgRow>,
    ) -> Result<Vec<QueuedMessage>, QueueError> {
        let ids: Vec<String> = metas.iter().map(|row| row.get("id")).collect();
        let rows = sqlx::query(&format!(
            "SELECT message_id, {RECIPIENT_COLUMNS} FROM recipients
             WHERE message_id = ANY($1) ORDER BY message_id, idx"
        ))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut grouped: BTreeMap<String, Vec<RecipientRow>> = BTreeMap::new();
        for row in &rows {
            grouped
                .entry(row.get("message_id"))
                .or_default()
                .push(recipient_from_row(row));
        }
        Ok(metas
            .iter()
            .map(|row| {
                let meta = meta_from_row(row);
                let recipients = grouped.remove(&meta.id).unwrap_or_default();
                QueuedMessage { meta, recipients }
            })
            .collect())
    }
}

/// How to connect to `config`'s database, and the schema the queue lives in.
fn connect_options(config: &QueueConfig) -> Result<(PgConnectOptions, String), QueueError> {
    let mut options = match &config.url {
        Some(url) => PgConnectOptions::from_str(url)?,
        None => PgConnectOptions::new(),
    };
    let schema = config
        .schema
        .clone()
        .unwrap_or_else(|| "public".to_string());
    options = options.application_name(&format!("switchyard/{schema}"));
    Ok((options, schema))
}

/// The settings every connection starts with, sent as `SET` statements rather than startup
/// options so that a pooler in session mode (which passes few startup options on) keeps them:
/// - `synchronous_commit = on`: a commit, and so a `250`, waits for the WAL flush (and for a
///   synchronous standby), whatever the server's default;
/// - `lock_timeout`: a group waiting for rows that a frozen node's transaction holds fails
///   (its messages answered `451`) instead of waiting for ever;
/// - `idle_in_transaction_session_timeout`: the server ends the transaction of a node that
///   froze or lost the network mid-group, releasing its locks;
/// - `search_path`: the queue's schema, when one is configured.
fn session_settings(config: &QueueConfig) -> String {
    let mut settings = "SET synchronous_commit = on; SET lock_timeout = '5s'; \
                        SET idle_in_transaction_session_timeout = '15s';"
        .to_string();
    if let Some(schema) = &config.schema {
        // The name is checked by the configuration (lower-case letters, digits, _).
        settings.push_str(&format!(" SET search_path = \"{schema}\";"));
    }
    settings
}

/// Opens one connection with [`session_settings`] applied.
async fn connect(config: &QueueConfig) -> Result<sqlx::PgConnection, QueueError> {
    use sqlx::Connection;
    let (options, _) = connect_options(config)?;
    let mut connection = sqlx::PgConnection::connect_with(&options).await?;
    sqlx::raw_sql(&session_settings(config))
        .execute(&mut connection)
        .await?;
    Ok(connection)
}

/// For `check-config`: connects as the queue would (so a wrong address, user or password is
/// found) and reads the schema version without changing anything; a schema newer than this
/// binary knows is refused. Returns the version (0: not created yet).
pub async fn check(config: &QueueConfig) -> Result<i64, QueueError> {
    let mut connection = connect(config).await?;
    let version = applied_version(&mut connection).await?;
    let known = migrations::newest(migrations::POSTGRES);
    if version > known {
        return Err(QueueError::SchemaTooNew {
            found: version,
            known,
        });
    }
    Ok(version)
}

/// The newest migration applied to the schema on the search path (0: none yet).
async fn applied_version(connection: &mut sqlx::PgConnection) -> Result<i64, QueueError> {
    let has_table: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *connection)
        .await?;
    if !has_table {
        return Ok(0);
    }
    Ok(sqlx::query_scalar(migrations::APPLIED_VERSION)
        .fetch_one(&mut *connection)
        .await?)
}

/// Creates the queue's schema if it is missing: only then, since creating needs the right to
/// create schemas in the database, which a role given a schema made by its administrator does
/// not have. Nodes starting together take turns (an advisory lock): `CREATE SCHEMA IF NOT
/// EXISTS` may still collide when two run at once.
async fn create_schema(
    connection: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<(), QueueError> {
    use sqlx::Connection;
    let mut transaction = connection.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('switchyard schema'))")
        .execute(&mut *transaction)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *transaction)
            .await?;
    if !exists {
        // The name is checked by the configuration (lower-case letters, digits, _).
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
            .execute(&mut *transaction)
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}

#[async_trait]
impl Queue for PgQueue {
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
        // SKIP LOCKED: recipients another node is claiming right now are left to it. The limit
        // counts recipients; a message cut by it has the rest claimed by the next scan.
        // One transaction: a claim whose message read failed leaves nothing leased.
        let mut transaction = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "WITH due AS (
               SELECT message_id AS due_id, idx AS due_idx FROM recipients
               WHERE state = 0 AND next_attempt <= $3 AND (lease_until IS NULL OR lease_until < $3)
               ORDER BY next_attempt LIMIT $4
               FOR UPDATE SKIP LOCKED)
             UPDATE recipients SET lease_owner = $1, lease_until = $2
             FROM due WHERE message_id = due_id AND idx = due_idx
             RETURNING message_id, {RECIPIENT_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *transaction)
        .await?;
        let mut grouped: BTreeMap<String, Vec<RecipientRow>> = BTreeMap::new();
        for row in &rows {
            grouped
                .entry(row.get("message_id"))
                .or_default()
                .push(recipient_from_row(row));
        }
        if grouped.is_empty() {
            transaction.commit().await?;
            return Ok(Vec::new());
        }
        let ids: Vec<&String> = grouped.keys().collect();
        let metas = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ANY($1)"
        ))
        .bind(&ids)
        .fetch_all(&mut *transaction)
        .await?;
        transaction.commit().await?;
        let mut claimed = Vec::with_capacity(metas.len());
        for row in &metas {
            let meta = meta_from_row(row);
            if let Some(mut recipients) = grouped.remove(&meta.id) {
                recipients.sort_by_key(|recipient| recipient.index);
                claimed.push(QueuedMessage { meta, recipients });
            }
        }
        // Recipients whose message went meanwhile (deleted by an operator): the foreign key
        // removed them with it, so nothing is left to clean up.
        Ok(claimed)
    }

    async fn content(&self, id: &str) -> Result<Option<Bytes>, QueueError> {
        let content: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT content FROM messages WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(content.map(Bytes::from))
    }

    async fn record(
        &self,
        owner: &str,
        results: Vec<RecipientResult>,
        bounces: Vec<NewMessage>,
    ) -> Result<usize, QueueError> {
        let output = self
            .writer
            .submit(WriteOp::Record {
                owner: owner.to_string(),
                results,
                bounces,
            })
            .await?;
        Ok(match output {
            WriteOutput::Recorded { stale } => stale,
            _ => 0,
        })
    }

    async fn list(&self) -> Result<Vec<QueuedMessage>, QueueError> {
        let metas = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages ORDER BY received_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        self.with_recipients(metas).await
    }

    async fn get(&self, id: &str) -> Result<Option<QueuedMessage>, QueueError> {
        let metas = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(self.with_recipients(metas).await?.into_iter().next())
    }

    async fn retry_now(&self, id: Option<&str>) -> Result<u64, QueueError> {
        let now = super::now_millis();
        let mut transaction = self.pool.begin().await?;
        let result = sqlx::query(
            "UPDATE recipients SET next_attempt = $1, state = 0
             WHERE state IN (0, 3) AND ($2::text IS NULL OR message_id = $2)",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(result.rows_affected())
    }

    async fn hold(&self, id: Option<&str>, now: Millis) -> Result<(u64, u64), QueueError> {
        let mut transaction = self.pool.begin().await?;
        let held = sqlx::query(
            "UPDATE recipients SET state = 4
             WHERE state = 0 AND ($1::text IS NULL OR message_id = $1)
               AND (lease_until IS NULL OR lease_until < $2)",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        let busy: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recipients
             WHERE state = 0 AND ($1::text IS NULL OR message_id = $1) AND lease_until >= $2",
        )
        .bind(id)
        .bind(now)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok((held, busy.max(0) as u64))
    }

    async fn release(&self, id: Option<&str>) -> Result<u64, QueueError> {
        let mut transaction = self.pool.begin().await?;
        let released = sqlx::query(
            "UPDATE recipients SET state = 0, next_attempt = $1
             WHERE state = 4 AND ($2::text IS NULL OR message_id = $2)",
        )
        .bind(super::now_millis())
        .bind(id)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(released)
    }

    async fn lease_message(
        &self,
        id: &str,
        owner: &str,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<(QueuedMessage, usize)>, QueueError> {
        let mut transaction = self.pool.begin().await?;
        let meta = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(meta) = meta else {
            return Ok(None);
        };
        let rows = sqlx::query(&format!(
            "UPDATE recipients SET lease_owner = $1, lease_until = $2
             WHERE message_id = $3 AND state IN (0, 3, 4) AND (lease_until IS NULL OR lease_until < $4)
             RETURNING {RECIPIENT_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease_until)
        .bind(id)
        .bind(now)
        .fetch_all(&mut *transaction)
        .await?;
        let busy: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recipients
             WHERE message_id = $1 AND state = 0 AND lease_owner IS DISTINCT FROM $2
               AND lease_until >= $3",
        )
        .bind(id)
        .bind(owner)
        .bind(now)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        let mut recipients: Vec<RecipientRow> = rows.iter().map(recipient_from_row).collect();
        recipients.sort_by_key(|recipient| recipient.index);
        let message = QueuedMessage {
            meta: meta_from_row(&meta),
            recipients,
        };
        Ok(Some((message, usize::try_from(busy).unwrap_or(usize::MAX))))
    }

    async fn queued_bytes(&self) -> Result<std::collections::HashMap<String, u64>, QueueError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT tenant, SUM(size)::bigint FROM messages WHERE tenant != '' GROUP BY tenant",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(tenant, bytes)| (tenant, bytes.max(0) as u64))
            .collect())
    }

    async fn delete(&self, id: &str) -> Result<bool, QueueError> {
        // The recipients go with their message (ON DELETE CASCADE).
        let deleted = sqlx::query("DELETE FROM messages WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn release_leases(&self, owner: &str) -> Result<u64, QueueError> {
        let result = sqlx::query(
            "UPDATE recipients SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn recover_leases(&self, node_id: &str) -> Result<u64, QueueError> {
        // Only this node's: the others may be alive and delivering. (Two processes must never
        // share a node id; the configuration says so.)
        self.release_leases(node_id).await
    }

    async fn renew_leases(
        &self,
        owner: &str,
        message_ids: &[String],
        until: Millis,
    ) -> Result<u64, QueueError> {
        let result = sqlx::query(
            "UPDATE recipients SET lease_until = $1
             WHERE lease_owner = $2 AND message_id = ANY($3) AND state IN (0, 3, 4)",
        )
        .bind(until)
        .bind(owner)
        .bind(message_ids)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn work_arrived(&self) {
        let queue = self.clone();
        self.listening.call_once(move || {
            tokio::spawn(listen::run(queue.pool, queue.channel, queue.work));
        });
        self.work.notified().await;
    }

    async fn stats(&self, node_id: &str, now: Millis) -> Result<QueueStats, QueueError> {
        let row: StatsRow = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM messages),
                        COUNT(*) FILTER (WHERE state = 0), COUNT(*) FILTER (WHERE state = 3),
                        COUNT(*) FILTER (WHERE state = 0 AND lease_until >= $2),
                        COUNT(*) FILTER (WHERE state = 0 AND lease_until >= $2 AND lease_owner = $1),
                        COUNT(*) FILTER (WHERE state = 4)
                 FROM recipients",
        )
        .bind(node_id)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(stats_from_row(row))
    }

    async fn ping(&self) -> Result<(), QueueError> {
        // Answering is not enough: a standby, or a primary demoted by a failover, answers too
        // but takes no write.
        let recovering: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&self.pool)
            .await?;
        if recovering {
            return Err(QueueError::Database(
                "the queue's database is a standby (in recovery): it takes no writes".into(),
            ));
        }
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
