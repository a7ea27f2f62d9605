//! The SQLite engine's schema: the numbered migrations of `host/migrations/sqlite`, after
//! bringing a queue file from before migrations up to the first of them.

use sqlx::SqliteConnection;

use crate::queue::migrations;
use crate::queue::QueueError;

/// Columns added before the schema had migrations, with their definitions: a queue file written
/// by such a version gains them before the first migration (which creates only missing tables)
/// is recorded.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("messages", "tenant", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "dsn_ret", "TEXT"),
    ("messages", "dsn_envid", "TEXT"),
    ("messages", "requiretls", "INTEGER NOT NULL DEFAULT 0"),
    ("recipients", "notify", "INTEGER NOT NULL DEFAULT 0"),
    ("recipients", "orcpt", "TEXT"),
    ("recipients", "delay_warned", "INTEGER NOT NULL DEFAULT 0"),
];

/// Migrates the file to the schema this binary knows, or refuses a newer one.
pub(super) async fn migrate(connection: &mut SqliteConnection) -> Result<(), QueueError> {
    upgrade_unversioned(connection).await?;
    let migrator = migrations::migrator(migrations::SQLITE).await?;
    migrator
        .run(&mut *connection)
        .await
        .map_err(|error| migrations::error(error, migrations::SQLITE))
}

async fn table_exists(connection: &mut SqliteConnection, table: &str) -> Result<bool, QueueError> {
    let count: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?")
            .bind(table)
            .fetch_one(&mut *connection)
            .await?;
    Ok(count > 0)
}

/// A file from before migrations has the tables but not every column, and no record of
/// migrations: it gains the columns its version lacked.
async fn upgrade_unversioned(connection: &mut SqliteConnection) -> Result<(), QueueError> {
    if table_exists(connection, "_sqlx_migrations").await?
        || !table_exists(connection, "messages").await?
    {
        return Ok(());
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
