//! The SQLite engine's trace records, in a file of their own beside the queue
//! (`queue.db-traces`): SQLite has one writer per file, and trace batches must never make a
//! message's commit wait for the write lock. Durability is `synchronous=NORMAL` (WAL): a power
//! cut may lose the last traces, never corrupt the file; mail's own commits are unaffected.
//! The schema is created here, not by the queue's migrations: traces are disposable, and a
//! schema change may start the file afresh.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use crate::queue::rows::{trace_from_row, TRACE_COLUMNS};
use crate::queue::traces::{PendingTrace, TraceQuery, TraceRecord, TraceStore};
use crate::queue::{Millis, QueueError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS traces (
    seq INTEGER PRIMARY KEY,
    message_id TEXT,
    at INTEGER NOT NULL,
    phase TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_message ON traces (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS traces_refused ON traces (at) WHERE message_id IS NULL;
";

/// Rows in one INSERT: six parameters each, well under SQLite's limit of 32,766.
const ROWS_PER_STATEMENT: usize = 1000;

/// The traces of the SQLite queue at a path.
pub struct SqliteTraces {
    pool: SqlitePool,
}

/// Where the traces of the queue at `queue` live.
pub fn traces_path(queue: &Path) -> PathBuf {
    let mut name = queue.as_os_str().to_owned();
    name.push("-traces");
    PathBuf::from(name)
}

impl SqliteTraces {
    pub async fn open(queue: &Path) -> Result<SqliteTraces, QueueError> {
        let path = traces_path(queue);
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(SqliteTraces { pool })
    }
}

#[async_trait]
impl TraceStore for SqliteTraces {
    async fn append_traces(&self, records: &[PendingTrace]) -> Result<(), QueueError> {
        // A few statements per batch, not one per record: every statement is a round trip to
        // the driver's thread.
        let mut transaction = self.pool.begin().await?;
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            let mut insert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO traces (message_id, at, phase, client_ip, sender, body) ",
            );
            insert.push_values(chunk, |mut row, record| {
                row.push_bind(record.message_id.clone())
                    .push_bind(record.at)
                    .push_bind(record.phase)
                    .push_bind(record.client_ip.clone())
                    .push_bind(record.sender.clone())
                    .push_bind(record.body());
            });
            insert.build().execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn message_trace(&self, message_id: &str) -> Result<Vec<TraceRecord>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {TRACE_COLUMNS} FROM traces
             WHERE message_id = ? ORDER BY at, seq"
        ))
        .bind(message_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(trace_from_row).collect())
    }

    async fn refused_traces(&self, query: &TraceQuery) -> Result<Vec<TraceRecord>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {TRACE_COLUMNS} FROM traces
             WHERE message_id IS NULL
               AND (? IS NULL OR client_ip = ?)
               AND (? IS NULL OR sender = ?)
               AND at >= ? AND at <= ?
             ORDER BY at DESC, seq DESC LIMIT ?"
        ))
        .bind(&query.client_ip)
        .bind(&query.client_ip)
        .bind(&query.sender)
        .bind(&query.sender)
        .bind(query.since.unwrap_or(0))
        .bind(query.until.unwrap_or(Millis::MAX))
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(trace_from_row).collect())
    }

    async fn prune_traces(&self, before: Millis) -> Result<u64, QueueError> {
        // Rows are appended in time order, so the old ones are the first ones: walk from the
        // oldest by rowid, a slice at a time, instead of keeping an index of times that every
        // insert would pay for.
        let mut pruned = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM traces WHERE seq IN
                     (SELECT seq FROM traces ORDER BY seq LIMIT 5000) AND at < ?",
            )
            .bind(before)
            .execute(&self.pool)
            .await?;
            pruned += done.rows_affected();
            if done.rows_affected() < 5000 {
                return Ok(pruned);
            }
        }
    }
}
