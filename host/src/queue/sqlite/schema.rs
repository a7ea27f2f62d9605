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
        content BLOB NOT NULL,
        tenant TEXT NOT NULL DEFAULT ''
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

/// Creates whatever of the schema the file does not have yet. A queue written before tenants
/// existed gains the `tenant` column (its messages are of no tenant).
pub(super) async fn create(connection: &mut SqliteConnection) -> Result<(), QueueError> {
    for statement in TABLES {
        sqlx::query(statement).execute(&mut *connection).await?;
    }
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('messages')")
        .fetch_all(&mut *connection)
        .await?;
    if !columns.iter().any(|column| column == "tenant") {
        sqlx::query("ALTER TABLE messages ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}
