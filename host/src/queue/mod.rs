//! The durable queue: messages and their recipients, each recipient with its own state, attempts,
//! next attempt time and last reply.
//!
//! Four ports, [`Queue`], [`kv::KvStore`], [`policies::PolicyStore`] and
//! [`traces::TraceStore`], with one error type that names no driver, and two engines behind
//! them, chosen by `[queue] engine` and opened by [`open`]: SQLite ([`sqlite::SqliteQueue`], one file, one node) and PostgreSQL
//! ([`postgres::PgQueue`], one database shared by several nodes). A claim carries its owner
//! (the node's id) and an expiry: recipients whose claim has run out are due again, whichever
//! node claimed them.

pub mod kv;
mod migrations;
pub mod policies;
pub mod postgres;
mod rows;
pub mod sqlite;
#[cfg(test)]
mod tests;
pub mod traces;
mod writer;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::QueueEngine;

pub use crate::mail::dsn_params::{MessageDsn, RecipientDsn};

/// Milliseconds since the Unix epoch: the queue's clock.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The engine's database failed; the source is the driver's error.
    #[error("queue database: {0}")]
    Database(Box<dyn std::error::Error + Send + Sync>),
    #[error("queue files: {0}")]
    Io(#[from] std::io::Error),
    #[error("queue writer has stopped")]
    WriterGone,
    /// The database cannot be reached or takes no writes now (connection lost, server shutting
    /// down or in recovery, a lock held past `lock_timeout`): nothing in the same transaction
    /// can succeed, so a group fails whole instead of being retried one by one.
    #[error("queue database unavailable: {0}")]
    Unavailable(String),
    /// The database's schema is older than this Switchyard's, and the caller may not migrate.
    #[error(
        "the queue's schema is at version {found}, this Switchyard needs {needed}: run \
         `switchyard queue migrate` (or start a node of this version)"
    )]
    SchemaTooOld { found: i64, needed: i64 },
    /// A kv write that would take its owner past its quota; nothing was written.
    #[error("kv {0}")]
    OverQuota(String),
    /// The database was migrated by a newer Switchyard than this one.
    #[error(
        "the queue's schema is at version {found}, newer than this Switchyard knows (up to {known}): \
         run the newer version, or restore a database of this version"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

impl QueueError {
    /// Whether every other operation would fail the same way now (see `Unavailable`).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

impl From<sqlx::Error> for QueueError {
    fn from(error: sqlx::Error) -> QueueError {
        let unavailable = match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // SQLSTATE classes 08 (connection), 57P (operator intervention: shutdown,
            // terminated backend), 25006 (a standby: read-only), 55P03 (lock timeout).
            sqlx::Error::Database(database) => database.code().is_some_and(|code| {
                code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "25006"
                    || code == "55P03"
            }),
            _ => false,
        };
        if unavailable {
            QueueError::Unavailable(error.to_string())
        } else {
            QueueError::Database(Box::new(error))
        }
    }
}

/// An open queue: the queue itself and the kv store that lives beside it.
pub struct Opened {
    pub queue: Arc<dyn Queue>,
    pub kv: Arc<dyn kv::KvStore>,
    /// The MTA-STS policy cache.
    pub policies: Arc<dyn policies::PolicyStore>,
    /// The plugins' decision traces.
    pub traces: Arc<dyn traces::TraceStore>,
    /// Where it lives, for logs and errors.
    pub location: String,
}

/// Whether opening a queue may change its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// Create it or bring it up to this binary's version (`serve`, `queue migrate`).
    Migrate,
    /// Use it only at this binary's version (the operator's commands): on a shared queue, a
    /// command run with a newer binary must not migrate the schema under the running nodes.
    /// The embedded engine, which one node owns, migrates either way.
    AsIs,
}

/// Opens the queue `config` names (an SQLite file relative to `data_dir`, or a PostgreSQL
/// database).
pub async fn open(
    config: &crate::config::QueueConfig,
    data_dir: &Path,
    schema: Schema,
) -> Result<Opened, QueueError> {
    match config.engine {
        QueueEngine::Sqlite => {
            let path = data_dir.join(&config.path);
            let queue = Arc::new(sqlite::SqliteQueue::open(&path, config.commit_window).await?);
            let traces = Arc::new(sqlite::traces::SqliteTraces::open(&path).await?);
            Ok(Opened {
                queue: queue.clone(),
                kv: queue.clone(),
                policies: queue,
                traces,
                location: path.display().to_string(),
            })
        }
        QueueEngine::Postgres => {
            let queue = Arc::new(postgres::PgQueue::open(config, schema).await?);
            Ok(Opened {
                location: queue.location(),
                queue: queue.clone(),
                kv: queue.clone(),
                policies: queue.clone(),
                traces: queue,
            })
        }
    }
}

/// Where `config`'s queue lives, for messages before it is opened.
pub fn location(config: &crate::config::QueueConfig, data_dir: &Path) -> String {
    match config.engine {
        QueueEngine::Sqlite => data_dir.join(&config.path).display().to_string(),
        QueueEngine::Postgres => postgres::describe(config),
    }
}

/// Facts about a queued message that delivery needs, without its content.
#[derive(Debug, Clone)]
pub struct MessageMeta {
    pub id: String,
    /// Envelope sender; empty for the null sender (bounces).
    pub sender: String,
    pub received_at: Millis,
    pub size: u64,
    /// The envelope used SMTPUTF8 (addresses or headers may be UTF-8).
    pub smtputf8: bool,
    /// The content has 8-bit bytes (BODY=8BITMIME).
    pub eight_bit: bool,
    /// The tenant the message belongs to (`""`: none).
    pub tenant: String,
    /// RET, ENVID and REQUIRETLS as the sender gave them.
    pub dsn: MessageDsn,
}

/// A message ready to be written to the queue.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub meta: MessageMeta,
    pub recipients: Vec<String>,
    /// NOTIFY and ORCPT of each recipient, in the same order (missing ones: not given).
    pub recipient_dsn: Vec<RecipientDsn>,
    /// The whole message, headers and body, with CRLF line endings.
    pub content: Bytes,
    /// Held instead of delivered, for this reason (a data hook said so).
    pub quarantine: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientState {
    Queued,
    Delivered,
    Failed,
    /// Held by a plugin's quarantine verdict; `queue retry` releases it.
    Quarantined,
    /// Held by an operator (`queue hold`): not delivered, and not expired, until `queue
    /// release`.
    Held,
}

impl RecipientState {
    pub fn as_i64(self) -> i64 {
        match self {
            RecipientState::Queued => 0,
            RecipientState::Delivered => 1,
            RecipientState::Failed => 2,
            RecipientState::Quarantined => 3,
            RecipientState::Held => 4,
        }
    }

    pub fn from_i64(value: i64) -> RecipientState {
        match value {
            1 => RecipientState::Delivered,
            2 => RecipientState::Failed,
            3 => RecipientState::Quarantined,
            4 => RecipientState::Held,
            _ => RecipientState::Queued,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RecipientState::Queued => "queued",
            RecipientState::Delivered => "delivered",
            RecipientState::Failed => "failed",
            RecipientState::Quarantined => "quarantined",
            RecipientState::Held => "held",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecipientRow {
    pub index: i64,
    pub address: String,
    pub state: RecipientState,
    pub attempts: i64,
    pub next_attempt: Millis,
    pub last_reply: Option<String>,
    pub dsn: RecipientDsn,
    /// A delay DSN was sent for it already.
    pub delay_warned: bool,
    /// Who holds it for delivery, and until when (as last written: it may have run out).
    pub lease: Option<Lease>,
}

/// How much is in the queue. Recipients, except `messages`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub messages: i64,
    /// Still to deliver (leased or not).
    pub queued: i64,
    pub quarantined: i64,
    /// Held by an operator (`queue hold`) until released.
    pub held: i64,
    /// Queued and held by a live lease: being delivered by some node.
    pub leased: i64,
    /// Of those, held by the node asking.
    pub leased_here: i64,
}

/// A claim on a recipient: the node (or operator command) delivering it, and its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub until: Millis,
}

/// A message with the recipients a claim handed over (or all of them, for listings).
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub meta: MessageMeta,
    pub recipients: Vec<RecipientRow>,
}

/// What happened to one recipient in one attempt.
#[derive(Debug, Clone)]
pub enum Outcome {
    Delivered,
    Deferred { next_attempt: Millis },
    Failed,
}

#[derive(Debug, Clone)]
pub struct RecipientResult {
    pub message_id: String,
    pub index: i64,
    /// Attempts made so far, this one included.
    pub attempts: i64,
    pub outcome: Outcome,
    pub reply: String,
    /// A delay DSN for it goes out with this record: it is not sent again.
    pub delay_warned: bool,
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// Writes a message; returns only once it is durable. With a lease (owner, until), the message
    /// is claimed by that owner at once (the accepting node delivers it without a scan).
    async fn enqueue(
        &self,
        message: NewMessage,
        lease: Option<(String, Millis)>,
    ) -> Result<(), QueueError>;

    /// Claims messages with recipients due at `now` and not leased by anyone, leasing those
    /// recipients to `owner` until `lease_until`: up to `limit` messages (SQLite) or `limit`
    /// recipients (PostgreSQL, whose claim locks rows, not messages).
    async fn claim_due(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<QueuedMessage>, QueueError>;

    /// The content of a message.
    async fn content(&self, id: &str) -> Result<Option<Bytes>, QueueError>;

    /// Records attempt results made under `owner`'s leases and, in the same transaction, queues
    /// `bounces` (DSNs). A result for a recipient no longer leased to `owner` (its lease ran out
    /// and another node took it over, or an operator's command did) is stale and not applied,
    /// and then neither are the bounces: what the current holder records stands. Returns how
    /// many results were stale. A message none of whose recipients is still queued is removed.
    async fn record(
        &self,
        owner: &str,
        results: Vec<RecipientResult>,
        bounces: Vec<NewMessage>,
    ) -> Result<usize, QueueError>;

    /// Every message in the queue with all its recipients, oldest first.
    async fn list(&self) -> Result<Vec<QueuedMessage>, QueueError>;

    /// One message with all its recipients.
    async fn get(&self, id: &str) -> Result<Option<QueuedMessage>, QueueError>;

    /// Makes queued recipients due now and releases quarantined ones (one message, or all with
    /// `None`); returns how many.
    async fn retry_now(&self, id: Option<&str>) -> Result<u64, QueueError>;

    /// Holds the queued recipients of a message (or of every message with `None`) that nobody
    /// is delivering at `now`: they stay in the queue, undelivered and unexpired, until
    /// released. Returns how many were held, and how many are being delivered (their attempt
    /// finishes; hold them again after it if they are still queued).
    async fn hold(&self, id: Option<&str>, now: Millis) -> Result<(u64, u64), QueueError>;

    /// Releases held recipients (of one message, or all): due at once. Returns how many.
    async fn release(&self, id: Option<&str>) -> Result<u64, QueueError>;

    /// Takes a message's queued (and quarantined) recipients away from delivery for an
    /// operator's command: leases those that nobody is delivering now to `owner` until `lease_until`, atomically. Returns the
    /// message with just those recipients, and how many queued recipients are being delivered by
    /// someone else (their lease runs at `now`); `None` if there is no such message.
    async fn lease_message(
        &self,
        id: &str,
        owner: &str,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<(QueuedMessage, usize)>, QueueError>;

    /// The bytes of the queued messages of each tenant (messages of no tenant are left out).
    async fn queued_bytes(&self) -> Result<std::collections::HashMap<String, u64>, QueueError>;
    /// Removes a message without delivering or bouncing it; false if there was none.
    async fn delete(&self, id: &str) -> Result<bool, QueueError>;

    /// Drops the leases held by `owner`; returns how many.
    async fn release_leases(&self, owner: &str) -> Result<u64, QueueError>;

    /// At start: takes back what an earlier run of this node left leased, so it is due again at
    /// once. The embedded engine belongs to one process and voids every lease; a shared one
    /// voids only `node_id`'s (other nodes' leases run out by themselves if those nodes died).
    async fn recover_leases(&self, node_id: &str) -> Result<u64, QueueError>;

    /// Extends the leases `owner` holds on queued recipients of `message_ids` to `until`: a node
    /// renews its claims while it works on them, so only a node that stopped loses them.
    async fn renew_leases(
        &self,
        owner: &str,
        message_ids: &[String],
        until: Millis,
    ) -> Result<u64, QueueError>;

    /// Resolves when work may have become due (a message queued without a lease, a retry
    /// ordered), on this node or, for a shared engine, on any; a scanner waits on it between
    /// scans. It may also resolve for nothing.
    async fn work_arrived(&self);

    /// Counts of the whole queue (every node's, for a shared one), for the metrics.
    async fn stats(&self, node_id: &str, now: Millis) -> Result<QueueStats, QueueError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), QueueError>;

    /// The newest schema version applied to the database.
    async fn schema_version(&self) -> Result<i64, QueueError>;

    /// Write transactions this process has committed to the queue (each a group of one or more
    /// writes): group commit makes it fewer than the writes.
    fn commits(&self) -> u64;
}
