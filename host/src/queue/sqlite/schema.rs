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
        tenant TEXT NOT NULL DEFAULT '',
        dsn_ret TEXT,
        dsn_envid TEXT,
        requiretls INTEGER NOT NULL DEFAULT 0
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
        notify INTEGER NOT NULL DEFAULT 0,
        orcpt TEXT,
        delay_warned INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (message_id, idx)
    )",
    "CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, next_attempt)",
    "CREATE TABLE IF NOT EXISTS sts_policies (
        domain TEXT PRIMARY KEY,
        id TEXT NOT NULL,
        policy TEXT NOT NULL,
        fetched_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tls_outcomes (
        domain TEXT NOT NULL,
        policy_type TEXT NOT NULL,
        policy_text TEXT NOT NULL,
        mx_host TEXT NOT NULL,
        result TEXT NOT NULL,
        receiving_ip TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_at INTEGER NOT NULL,
        last_at INTEGER NOT NULL,
        PRIMARY KEY (domain, policy_type, policy_text, mx_host, result, receiving_ip, reason)
    )",
    "CREATE TABLE IF NOT EXISTS kv (
        tenant TEXT NOT NULL,
        plugin TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        expires_at INTEGER,
        PRIMARY KEY (tenant, plugin, key)
    )",
];

/// Columns added since the first release, with their definitions: a queue file written by an
/// earlier version gains them when it opens (its messages asked for nothing of them).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("messages", "tenant", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "dsn_ret", "TEXT"),
    ("messages", "dsn_envid", "TEXT"),
    ("messages", "requiretls", "INTEGER NOT NULL DEFAULT 0"),
    ("recipients", "notify", "INTEGER NOT NULL DEFAULT 0"),
    ("recipients", "orcpt", "TEXT"),
    ("recipients", "delay_warned", "INTEGER NOT NULL DEFAULT 0"),
];

/// The message columns every query of messages reads.
pub(super) const MESSAGE_COLUMNS: &str =
    "id, sender, received_at, size, smtputf8, eight_bit, tenant, dsn_ret, dsn_envid, requiretls";

/// The recipient columns every query of recipients reads.
pub(super) const RECIPIENT_COLUMNS: &str =
    "idx, address, state, attempts, next_attempt, last_reply, notify, orcpt, delay_warned";

/// Creates whatever of the schema the file does not have yet.
pub(super) async fn create(connection: &mut SqliteConnection) -> Result<(), QueueError> {
    for statement in TABLES {
        sqlx::query(statement).execute(&mut *connection).await?;
    }
    for (table, column, definition) in ADDED_COLUMNS {
        let columns: Vec<String> =
            sqlx::query_scalar(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .fetch_all(&mut *connection)
                .await?;
        if !columns.iter().any(|present| present == column) {
            sqlx::query(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))
            .execute(&mut *connection)
            .await?;
        }
    }
    Ok(())
}
