//! The SQLite engine's tables, created when the queue opens.

use sqlx::SqliteConnection;

use crate::queue::QueueError;

const TABLES: &[&str] = &[
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

/// Creates whatever of the schema the file does not have yet.
pub(super) async fn create(connection: &mut SqliteConnection) -> Result<(), QueueError> {
    for statement in TABLES {
        sqlx::query(statement).execute(&mut *connection).await?;
    }
    Ok(())
}
